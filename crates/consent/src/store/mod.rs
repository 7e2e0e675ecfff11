//! Where consents live: one [`ConsentStore`] trait, two implementations in the
//! same family as the audit log's stores.
//!
//! - [`sqlite::SqliteConsentStore`]: the embedded default,
//!   `<data_dir>/consent.db`, WAL with `synchronous=FULL` (durable when a call
//!   returns);
//! - [`postgres::PostgresConsentStore`]: `postgres://...`, which several nodes
//!   of the consent authority (or of a provider) may share.
//!
//! The consent authority keeps grants and revocations here; a provider's
//! security server keeps the use counts of consents with a maximum number of
//! uses here (its own store, so that a use is counted where the data is
//! released, durably, before the registry is called).
//!
//! Revocations carry a sequence number that increases in commit order (the
//! revocation feed's cursor): SQLite has one writer; PostgreSQL assigns it
//! under the lock of a one-row head table, as the audit store does.

pub(crate) mod postgres;
pub(crate) mod sqlite;
#[cfg(test)]
mod tests;

use std::{path::Path, sync::Arc};

use futures_util::future::BoxFuture;

use super::grant::Grant;

/// What went wrong in a store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened or created.
    #[error("cannot open the consent store: {0}")]
    Open(String),
    /// A read failed, or a stored row is malformed.
    #[error("cannot read the consent store: {0}")]
    Read(String),
    /// A write failed; nothing was changed.
    #[error("cannot write the consent store: {0}")]
    Write(String),
    /// A grant with this id exists already.
    #[error("a consent with id {0} exists already")]
    Duplicate(String),
}

/// One stored revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Its sequence number (the feed's cursor), from 1.
    pub seq: u64,
    /// The revoked consent.
    pub consent_id: String,
    /// When it was revoked (ms since the Unix epoch).
    pub revoked_at_ms: i64,
    /// The consent's `not_after`: the revocation matters until then.
    pub not_after: i64,
}

/// The result of [`ConsentStore::revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// Revoked now.
    Revoked(Grant, Revocation),
    /// It was revoked before; nothing changed.
    AlreadyRevoked(Grant, Revocation),
    /// The subject has no consent with that id.
    NotFound,
}

/// The result of [`ConsentStore::consume_use`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseOutcome {
    /// The use was counted; `used` uses so far, this one included.
    Counted {
        /// Uses so far.
        used: u32,
    },
    /// Every allowed use was taken; nothing was counted.
    Exhausted {
        /// Uses so far.
        used: u32,
    },
}

/// A storage backend for consents, revocations and use counts.
pub trait ConsentStore: Send + Sync + 'static {
    /// A short description for messages (`sqlite:/path`, `postgres://host/db`).
    fn describe(&self) -> String;

    /// Stores a new grant, durably when this resolves.
    fn insert(&self, grant: Grant) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A grant by id.
    fn get(&self, id: String) -> BoxFuture<'_, Result<Option<Grant>, StoreError>>;

    /// Every grant of a subject (`scheme:value`), newest first.
    fn of_subject(&self, subject: String) -> BoxFuture<'_, Result<Vec<Grant>, StoreError>>;

    /// Revokes the grant `id` of `subject` at `at_ms`, durably when this
    /// resolves; a grant of another subject is [`RevokeOutcome::NotFound`].
    fn revoke(
        &self,
        id: String,
        subject: String,
        at_ms: i64,
    ) -> BoxFuture<'_, Result<RevokeOutcome, StoreError>>;

    /// Up to `limit` revocations with `seq > since`, in sequence order.
    fn revocations_after(
        &self,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Revocation>, StoreError>>;

    /// Counts one use of consent `id`, which allows `max` uses and lasts until
    /// `not_after`, unless all are taken; atomic across the store's users and
    /// durable when this resolves.
    fn consume_use(
        &self,
        id: String,
        max: u32,
        not_after: i64,
    ) -> BoxFuture<'_, Result<UseOutcome, StoreError>>;
}

/// Opens (creating if needed) the store: PostgreSQL if `database` is a
/// non-empty URL, else the embedded one under `data_dir`.
pub async fn open(
    data_dir: &Path,
    database: Option<&str>,
) -> Result<Arc<dyn ConsentStore>, StoreError> {
    Ok(match database.map(str::trim) {
        Some(url) if !url.is_empty() => {
            Arc::new(postgres::PostgresConsentStore::connect(url).await?)
        }
        _ => Arc::new(sqlite::SqliteConsentStore::open_in(data_dir).await?),
    })
}

/// A grant's columns as stored (text ids, JSON methods), before checking.
#[derive(Debug)]
pub(crate) struct GrantRow {
    pub(crate) id: String,
    pub(crate) subject: String,
    pub(crate) client: String,
    pub(crate) service: String,
    pub(crate) methods: String,
    pub(crate) purpose: String,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    pub(crate) max_uses: Option<i64>,
    pub(crate) granted_at_ms: i64,
    pub(crate) revoked_at_ms: Option<i64>,
}

/// The columns of the grants table, in [`GrantRow`] order.
pub(crate) const GRANT_COLUMNS: &str = "id, subject, client, service, methods, purpose, not_before, not_after, max_uses, granted_at_ms, revoked_at_ms";

impl GrantRow {
    pub(crate) fn of(g: &Grant) -> Self {
        Self {
            id: g.id.clone(),
            subject: g.subject.to_string(),
            client: g.client.to_string(),
            service: g.service.to_string(),
            methods: serde_json::to_string(&g.methods).unwrap_or_else(|_| "[]".into()),
            purpose: g.purpose.to_string(),
            not_before: g.not_before,
            not_after: g.not_after,
            max_uses: g.max_uses.map(i64::from),
            granted_at_ms: g.granted_at_ms,
            revoked_at_ms: g.revoked_at_ms,
        }
    }

    /// The grant, or why the row is not one (only tampering makes one).
    pub(crate) fn into_grant(self) -> Result<Grant, StoreError> {
        let id = self.id.clone();
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Read(format!("stored consent {id}: {what}: {e}"))
        };
        Ok(Grant {
            subject: self.subject.parse().map_err(|e| bad("subject", &e))?,
            client: self.client.parse().map_err(|e| bad("client", &e))?,
            service: self.service.parse().map_err(|e| bad("service", &e))?,
            methods: serde_json::from_str(&self.methods).map_err(|e| bad("methods", &e))?,
            purpose: self.purpose.parse().map_err(|e| bad("purpose", &e))?,
            not_before: self.not_before,
            not_after: self.not_after,
            max_uses: self
                .max_uses
                .map(u32::try_from)
                .transpose()
                .map_err(|e| bad("max_uses", &e))?,
            granted_at_ms: self.granted_at_ms,
            revoked_at_ms: self.revoked_at_ms,
            id: self.id,
        })
    }
}

/// A stored sequence number (negative ones come only from tampering).
pub(crate) fn seq_from_db(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// Sequence numbers are `u64` in Rust and `BIGINT` in the stores.
pub(crate) fn seq_to_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A use count as stored.
pub(crate) fn used_from_db(used: i64) -> u32 {
    u32::try_from(used).unwrap_or(u32::MAX)
}
