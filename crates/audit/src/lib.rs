//! The audit trail: what the security path records, and the seam where a record
//! is made durable before data moves ("no audit, no data").
//!
//! The exchange path builds an [`AuditRecord`] for each step of an exchange and
//! awaits its commit: [`AuditLog::append_written`] for the first record of a
//! side, before the request is forwarded or the registry called, and
//! [`AuditLog::append`] for the last, which makes both durable before the
//! answer is released. A failed append stops the exchange with `UNAVAILABLE` /
//! `audit.unavailable`.
//!
//! The parts, in the order a record meets them:
//!
//! - [`pseudonym`]: the subject is replaced by a keyed pseudonym (HMAC-SHA256
//!   under a key kept outside the log) before anything is stored;
//! - [`handle`]: [`AuditHandle`], the server's [`AuditLog`]; its single writer
//!   task batches concurrent appends into one transaction (group commit) and
//!   signs [`checkpoint`]s at an interval, on demand and at shutdown;
//! - [`record`]: the stored form of a record, its canonical bytes and the hash
//!   chain (each record carries the SHA-256 of the one before);
//! - [`merkle`]: an RFC 6962 Merkle tree over the record hashes, with inclusion
//!   and consistency proofs, so one record can be checked against a signed
//!   checkpoint without reading the whole log;
//! - [`store`]: one [`store::AuditStore`] trait, with an embedded SQLite store
//!   (the default, `<data_dir>/audit.db`) and a PostgreSQL store (shared by the
//!   server nodes of one member);
//! - [`verify`]: walks the chain and checkpoints and names the first bad record;
//! - [`signatures`]: checks the exchange signature a record keeps;
//! - [`export`]: self-contained archives of a range, verifiable offline;
//! - [`service`]: the gRPC `AuditService` for the admin port;

pub mod checkpoint;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod handle;
pub mod inspect;
pub(crate) mod merkle;
pub mod pseudonym;
pub mod record;
pub(crate) mod service;
pub mod signatures;
pub mod store;
#[cfg(test)]
mod tests;
pub mod verify;

pub use handle::{AuditConfig, AuditHandle, WriterOptions, open};
pub use record::{AuditRecord, Record};
pub use service::AuditServiceImpl;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Which side of the exchange wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The consumer's security server (the client's side).
    Consumer,
    /// The provider's security server (the registry's side).
    Provider,
}

/// The step of the exchange a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Provider: every check passed; the registry is about to be called.
    Accepted,
    /// Either side: the request was refused (the reason says why).
    Refused,
    /// Consumer: the signed request is about to be sent to the provider.
    Forwarded,
    /// Either side: an answer (with the registry's status) is about to be released.
    Answered,
    /// Either side: the exchange failed after it was accepted or forwarded
    /// (provider or registry unavailable, response signature invalid...).
    Failed,
}

impl Side {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Consumer => "consumer",
            Side::Provider => "provider",
        }
    }
}

impl Side {
    /// The side named by [`Side::as_str`].
    pub fn parse(text: &str) -> Option<Side> {
        match text {
            "consumer" => Some(Side::Consumer),
            "provider" => Some(Side::Provider),
            _ => None,
        }
    }
}

impl Step {
    /// Every step, in the order an exchange meets them.
    pub const ALL: &'static [Step] = &[
        Step::Accepted,
        Step::Refused,
        Step::Forwarded,
        Step::Answered,
        Step::Failed,
    ];

    /// The step named by [`Step::as_str`].
    pub fn parse(text: &str) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| s.as_str() == text)
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Accepted => "accepted",
            Step::Refused => "refused",
            Step::Forwarded => "forwarded",
            Step::Answered => "answered",
            Step::Failed => "failed",
        }
    }
}

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store refused or failed the write.
    #[error("audit store write failed: {0}")]
    Write(String),
    /// The store is closed or its writer stopped.
    #[error("audit store is not running")]
    Closed,
    /// The store could not be opened or prepared (schema, connection, file).
    #[error("audit store cannot be opened: {0}")]
    Open(String),
    /// A read from the store failed.
    #[error("audit store read failed: {0}")]
    Read(String),
    /// The pseudonym key could not be read or created.
    #[error("pseudonym key: {0}")]
    Key(String),
    /// A request to the log was malformed (bad range, bad filter, bad archive).
    #[error("invalid audit request: {0}")]
    Invalid(String),
    /// What was asked for is not in the log.
    #[error("not found: {0}")]
    NotFound(String),
}

/// Where a security server makes its audit records durable.
pub trait AuditLog: Send + Sync + 'static {
    /// Appends a record; resolves once it is durable (or the write failed),
    /// and with it every record appended before it.
    fn append(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>>;

    /// Appends a record that a later [`AuditLog::append`] of the same
    /// exchange will follow before the server answers anyone: resolves once
    /// it is written in chain order and safe from a crash of the process
    /// (or the write failed), without waiting for the disk. That later append
    /// makes it durable. The exchange path uses it for the record made before
    /// a request goes on (the consumer's `forwarded`, the provider's
    /// `accepted`), so that an exchange waits for the disk once per server,
    /// not twice, and releases no data before both records are durable. A
    /// record left written only (its exchange cancelled, say) becomes durable
    /// with the next append or checkpoint.
    fn append_written(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>>;
}
