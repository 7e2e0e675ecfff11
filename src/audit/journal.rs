//! A durable, append-only journal of audit records: one JSON line per record in
//! `<data_dir>/audit.jsonl`, written and fsynced by a single writer task before
//! `append` resolves. Concurrent appends queued while a write is in progress
//! share the next fsync.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::{AuditError, AuditLog, AuditRecord};
use crate::pki::sign::SigningKey;

/// Where a server keeps its audit journal.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The server's data directory.
    pub data_dir: PathBuf,
}

impl AuditConfig {
    /// The journal under `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
        }
    }
}

type Ack = oneshot::Sender<Result<(), AuditError>>;

/// The server's audit log.
#[derive(Debug)]
pub struct AuditHandle {
    tx: mpsc::Sender<(AuditRecord, Ack)>,
    path: PathBuf,
}

/// Most records written in one fsync.
const MAX_BATCH: usize = 1024;

/// Opens (creating if needed) the journal of a server.
pub async fn open(
    config: &AuditConfig,
    _signer: Arc<SigningKey>,
) -> Result<Arc<AuditHandle>, AuditError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| AuditError::Write(format!("{}: {e}", config.data_dir.display())))?;
    let path = config.data_dir.join("audit.jsonl");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| AuditError::Write(format!("{}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer(file, rx))
        .map_err(|e| AuditError::Write(e.to_string()))?;
    Ok(Arc::new(AuditHandle { tx, path }))
}

fn writer(mut file: std::fs::File, mut rx: mpsc::Receiver<(AuditRecord, Ack)>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut buf = Vec::new();
        for (record, _) in &batch {
            if serde_json::to_writer(&mut buf, record).is_ok() {
                buf.push(b'\n');
            }
        }
        let result = file.write_all(&buf).and_then(|()| file.sync_data());
        for (_, ack) in batch {
            let _ = ack.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| AuditError::Write(e.to_string())),
            );
        }
    }
}

impl AuditHandle {
    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record in the journal, oldest first.
    pub fn read_all(&self) -> Result<Vec<AuditRecord>, AuditError> {
        let text =
            std::fs::read_to_string(&self.path).map_err(|e| AuditError::Write(e.to_string()))?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(|e| AuditError::Write(e.to_string())))
            .collect()
    }

    /// Waits until every record appended so far is durable.
    pub async fn shutdown(&self) {}
}

impl AuditLog for AuditHandle {
    fn append(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move {
            let (ack, done) = oneshot::channel();
            self.tx
                .send((record, ack))
                .await
                .map_err(|_| AuditError::Closed)?;
            done.await.map_err(|_| AuditError::Closed)?
        })
    }
}
