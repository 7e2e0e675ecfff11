//! Audit logs for tests: one that refuses every write (to show that an
//! exchange stops with `audit.unavailable` and nothing leaks) and one that
//! keeps records in memory (to look at what the security path recorded).

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use futures_util::future::BoxFuture;

use super::{AuditError, AuditLog, AuditRecord};

/// A log whose every append fails with [`AuditError::Write`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RefusingLog;

impl AuditLog for RefusingLog {
    fn append(&self, _record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async { Err(AuditError::Write("the store refuses writes (test)".into())) })
    }
}

/// A log that keeps every record in memory, and can be told to start
/// refusing writes.
#[derive(Debug, Default)]
pub struct MemoryLog {
    records: Mutex<Vec<AuditRecord>>,
    refuse: AtomicBool,
}

impl MemoryLog {
    /// An empty log that accepts writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record appended so far, in order.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The records of one exchange.
    pub fn of_request(&self, request_id: &str) -> Vec<AuditRecord> {
        self.records()
            .into_iter()
            .filter(|r| r.request_id == request_id)
            .collect()
    }

    /// From now on, refuse (`true`) or accept (`false`) appends.
    pub fn set_refusing(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }
}

impl AuditLog for MemoryLog {
    fn append(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(AuditError::Write("the store refuses writes (test)".into()));
            }
            self.records
                .lock()
                .map_err(|_| AuditError::Write("memory log poisoned".into()))?
                .push(record);
            Ok(())
        })
    }
}
