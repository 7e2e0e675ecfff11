//! Where records and checkpoints are kept: one [`AuditStore`] trait and its
//! two implementations.
//!
//! - [`sqlite::SqliteStore`]: the embedded default, `<data_dir>/audit.db`,
//!   with a record journal beside it: a commit is durable when it returns
//!   (its records are synced in the journal), and SQLite takes them in
//!   batches behind it;
//! - [`postgres::PostgresStore`]: `postgres://...`, which several server nodes
//!   of one member may share; chain appends are serialised by `SELECT ... FOR
//!   UPDATE` on a one-row head table, and each node's records carry its name.
//!
//! A store chains what it appends itself (under its own lock), because only it
//! knows the true head when several nodes write. It never sees a subject in
//! clear: [`Entry`] carries the pseudonym.

pub mod postgres;
pub mod sqlite;

use std::{path::Path, sync::Arc};

use futures_util::future::BoxFuture;

use super::{
    AuditError, Side, Step,
    checkpoint::Checkpoint,
    record::{Entry, Hash, Link, StoredRecord},
};

/// The most records one page of a query may return.
pub const MAX_PAGE: usize = 1000;

/// Filters of a query; every given filter must match. Results come newest
/// first (by sequence number), `limit` at a time, before the cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Exact request id.
    pub request_id: Option<String>,
    /// Exact client subsystem id.
    pub client: Option<String>,
    /// Exact provider subsystem id.
    pub service: Option<String>,
    /// Exact method path.
    pub method: Option<String>,
    /// Subject pseudonym (see [`super::pseudonym::PseudonymKey::pseudonym`]).
    pub subject: Option<Hash>,
    /// Exact purpose code.
    pub purpose: Option<String>,
    /// The step (outcome) of the record.
    pub step: Option<Step>,
    /// The side that wrote it.
    pub side: Option<Side>,
    /// gRPC status code.
    pub status: Option<i32>,
    /// `kopir-error` reason.
    pub reason: Option<String>,
    /// Writing node.
    pub node: Option<String>,
    /// Only records at or after this time (ms since the epoch).
    pub from_ms: Option<i64>,
    /// Only records before this time (ms since the epoch, exclusive).
    pub to_ms: Option<i64>,
    /// Cursor: only records with a smaller sequence number (the previous
    /// page's last `seq`).
    pub before_seq: Option<u64>,
    /// Page size (at most [`MAX_PAGE`]; 0 means the default of 50).
    pub limit: usize,
}

impl Query {
    /// The page size to use.
    pub(crate) fn page_size(&self) -> usize {
        match self.limit {
            0 => 50,
            n => n.min(MAX_PAGE),
        }
    }
}

/// One page of query results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Records, newest first.
    pub records: Vec<StoredRecord>,
    /// The cursor for the next page (`Query::before_seq`), if there may be more.
    pub next: Option<u64>,
}

impl Page {
    /// Builds a page from a result of at most `limit` rows.
    pub(crate) fn from_rows(records: Vec<StoredRecord>, limit: usize) -> Self {
        let next = if records.len() == limit {
            records.last().map(|r| r.seq)
        } else {
            None
        };
        Self { records, next }
    }
}

/// One row of [`AuditStore::scan`].
pub(crate) type Scanned = Result<StoredRecord, Malformed>;

/// A stored row that is not a well-formed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// Its sequence number as stored.
    pub seq: i64,
    /// What is wrong with it.
    pub why: String,
}

/// A stored checkpoint with the writer's Merkle frontier at that point (a
/// cache that spares a restart from rereading every record hash; it is not
/// signed and is checked against the signed root before use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// [`super::merkle::Frontier::encode`] of the tree it signs.
    pub frontier: Vec<u8>,
}

/// How far an append's commit goes before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// On stable storage: the commit waits for the disk (fsync). Everything
    /// committed before it is then durable too, as both stores keep one
    /// ordered log (the embedded store's journal, PostgreSQL's WAL).
    Durable,
    /// Written, in chain order, and safe from a crash of the process (in the
    /// operating system's cache), but not waited for: the next
    /// [`Commit::Durable`] commit makes it durable.
    Written,
}

/// A storage backend for the audit log.
///
/// Appends are only ever called by one writer task per node; reads may run
/// concurrently with it.
pub trait AuditStore: Send + Sync + 'static {
    /// A short description for messages (`sqlite:/path`, `postgres://host/db`).
    fn describe(&self) -> String;

    /// Appends `entries` after the current head in one transaction, committed
    /// as `commit` says when this resolves; returns each entry's sequence
    /// number and hash, in order. On error nothing was appended.
    fn append(
        &self,
        entries: Vec<Entry>,
        commit: Commit,
    ) -> BoxFuture<'_, Result<Vec<Link>, AuditError>>;

    /// The last record's sequence number and hash (`None` for an empty log).
    fn head(&self) -> BoxFuture<'_, Result<Option<Link>, AuditError>>;

    /// Up to `limit` rows with `seq >= from`, in sequence order; a row that
    /// cannot be read as a record (only tampering makes one) is returned as a
    /// [`Malformed`] so that `verify` can name it.
    fn scan(&self, from: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Scanned>, AuditError>>;

    /// The hashes of the records with `from <= seq <= to`, in sequence order.
    fn hashes(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<(u64, Hash)>, AuditError>>;

    /// One page of records matching `query`, newest first.
    fn query(&self, query: Query) -> BoxFuture<'_, Result<Page, AuditError>>;

    /// Every record of one exchange, in sequence order.
    fn by_request(
        &self,
        request_id: String,
    ) -> BoxFuture<'_, Result<Vec<StoredRecord>, AuditError>>;

    /// The smallest and largest sequence numbers of records with
    /// `from_ms <= at_ms < to_ms` (`None` if there are none).
    fn seq_range(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> BoxFuture<'_, Result<Option<(u64, u64)>, AuditError>>;

    /// Stores a signed checkpoint.
    fn put_checkpoint(&self, checkpoint: StoredCheckpoint)
    -> BoxFuture<'_, Result<(), AuditError>>;

    /// Every checkpoint, by sequence number then storing order.
    fn checkpoints(&self) -> BoxFuture<'_, Result<Vec<Checkpoint>, AuditError>>;

    /// The checkpoint with the highest sequence number, with its frontier.
    fn latest_checkpoint(&self) -> BoxFuture<'_, Result<Option<StoredCheckpoint>, AuditError>>;

    /// Every record, oldest first, read synchronously (for tests and tools on
    /// small logs; the embedded store only, others say they cannot).
    fn read_all_blocking(&self) -> Result<Vec<StoredRecord>, AuditError> {
        Err(AuditError::Invalid(format!(
            "{} cannot be read synchronously; use AuditHandle::records",
            self.describe()
        )))
    }
}

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded store in this folder (`<dir>/audit.db`).
    Embedded(std::path::PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
}

impl Location {
    /// `database` if given, else the embedded store under `data_dir`.
    pub fn new(data_dir: &Path, database: Option<&str>) -> Self {
        match database {
            Some(url) if !url.trim().is_empty() => Location::Postgres(url.trim().to_owned()),
            _ => Location::Embedded(data_dir.to_path_buf()),
        }
    }
}

/// Opens (creating if needed) the store at `location`.
pub async fn open(location: &Location) -> Result<Arc<dyn AuditStore>, AuditError> {
    Ok(match location {
        Location::Embedded(dir) => Arc::new(sqlite::SqliteStore::open_in(dir).await?),
        Location::Postgres(url) => Arc::new(postgres::PostgresStore::connect(url).await?),
    })
}

/// Opens an existing store for inspection (the embedded file must exist;
/// while a server writes it, it is opened to read only, see
/// [`sqlite::SqliteStore::open_to_inspect`]).
pub async fn open_existing(location: &Location) -> Result<Arc<dyn AuditStore>, AuditError> {
    match location {
        Location::Embedded(dir) => {
            let file = sqlite::db_path(dir);
            if !file.exists() {
                return Err(AuditError::Open(format!(
                    "no audit log at {} (give --data-dir or --database)",
                    file.display()
                )));
            }
            Ok(Arc::new(sqlite::SqliteStore::open_to_inspect(&file).await?))
        }
        Location::Postgres(_) => open(location).await,
    }
}

/// A query's conditions as SQL, with `$n`/`?n` placeholders from `next`.
pub(crate) struct Conditions {
    pub(crate) clauses: Vec<String>,
    pub(crate) values: Vec<SqlValue>,
}

/// A query parameter, converted by each store to its own type.
#[derive(Debug, Clone)]
pub(crate) enum SqlValue {
    Text(String),
    Int(i64),
    Int4(i32),
    Bytes(Vec<u8>),
}

impl Conditions {
    /// Builds the conditions; `placeholder(n)` names parameter `n` (from 1).
    pub(crate) fn of(q: &Query, placeholder: impl Fn(usize) -> String) -> Self {
        let mut c = Conditions {
            clauses: Vec::new(),
            values: Vec::new(),
        };
        let mut add = |column: &str, op: &str, v: SqlValue| {
            c.values.push(v);
            c.clauses
                .push(format!("{column} {op} {}", placeholder(c.values.len())));
        };
        let text = |s: &Option<String>| s.clone().map(SqlValue::Text);
        for (column, value) in [
            ("request_id", text(&q.request_id)),
            ("client", text(&q.client)),
            ("service", text(&q.service)),
            ("method", text(&q.method)),
            ("purpose", text(&q.purpose)),
            ("reason", text(&q.reason)),
            ("node", text(&q.node)),
            ("step", q.step.map(|s| SqlValue::Text(s.as_str().into()))),
            ("side", q.side.map(|s| SqlValue::Text(s.as_str().into()))),
            ("subject", q.subject.map(|h| SqlValue::Bytes(h.to_vec()))),
            ("status", q.status.map(SqlValue::Int4)),
        ] {
            if let Some(v) = value {
                add(column, "=", v);
            }
        }
        if let Some(t) = q.from_ms {
            add("at_ms", ">=", SqlValue::Int(t));
        }
        if let Some(t) = q.to_ms {
            add("at_ms", "<", SqlValue::Int(t));
        }
        if let Some(s) = q.before_seq {
            add("seq", "<", SqlValue::Int(seq_to_db(s)));
        }
        c
    }

    /// `WHERE a AND b ...`, or nothing.
    pub(crate) fn where_clause(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }
}

/// The columns of the records table, in the order the stores read them.
pub(crate) const COLUMNS: &str = "seq, prev_hash, hash, node, request_id, at_ms, side, step, client, service, method, purpose, subject, basis, user_id, peer, status, reason, message, body_sha256, request_hash, signature, signer_key, signed_hash, body, query_group, hidden_until_ms, hidden_reason";

/// Sequence numbers are `u64` in Rust and `BIGINT` in the stores.
pub(crate) fn seq_to_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A stored sequence number (negative ones come only from tampering).
pub(crate) fn seq_from_db(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

fn stored_hash(what: &str, seq: i64, bytes: &[u8]) -> Result<Hash, Malformed> {
    bytes.try_into().map_err(|_| Malformed {
        seq,
        why: format!("{what} is not 32 bytes"),
    })
}

/// A stored 32-byte column of a checkpoint; a wrong length (tampering) gives
/// a value whose signature cannot verify rather than an error.
pub(crate) fn lossy_hash(bytes: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    let n = bytes.len().min(32);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// One column of a stored record row, read by index in the store's own
/// types. A failure is the driver's (a column of an unexpected type).
pub(crate) trait RowReader {
    /// A `TEXT` column.
    fn text(&self, i: usize) -> Result<String, AuditError>;
    /// A nullable `TEXT` column.
    fn opt_text(&self, i: usize) -> Result<Option<String>, AuditError>;
    /// A `BLOB`/`BYTEA` column.
    fn bytes(&self, i: usize) -> Result<Vec<u8>, AuditError>;
    /// A nullable `BLOB`/`BYTEA` column.
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, AuditError>;
    /// A 64-bit integer column.
    fn int(&self, i: usize) -> Result<i64, AuditError>;
    /// A nullable 64-bit integer column.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, AuditError>;
    /// A 32-bit integer column.
    fn int4(&self, i: usize) -> Result<i32, AuditError>;
}

/// Takes the columns of one record row, in [`COLUMNS`] order, in the store's
/// own types (bound parameters, or one array per column).
pub(crate) trait RowWriter<'a> {
    /// A (nullable) 64-bit integer.
    fn int(&mut self, v: Option<i64>);
    /// A 32-bit integer.
    fn int4(&mut self, v: i32);
    /// A (nullable) text.
    fn text(&mut self, v: Option<&'a str>);
    /// (Nullable) bytes.
    fn bytes(&mut self, v: Option<&'a [u8]>);
}

/// Writes the row of `entry`, chained at `seq` after `prev` with `hash`:
/// with [`read_row`] the one mapping between a record's fields and the
/// columns of both stores.
pub(crate) fn write_row<'a>(
    (seq, prev, hash): (u64, &'a Hash, &'a Hash),
    e: &'a Entry,
    w: &mut impl RowWriter<'a>,
) {
    let hash32 = |h: &'a Option<Hash>| h.as_ref().map(|h| &h[..]);
    w.int(Some(seq_to_db(seq)));
    w.bytes(Some(prev));
    w.bytes(Some(hash));
    w.text(Some(&e.node));
    w.text(Some(&e.request_id));
    w.int(Some(e.at_ms));
    w.text(Some(e.side.as_str()));
    w.text(Some(e.step.as_str()));
    w.text(Some(&e.client));
    w.text(Some(&e.service));
    w.text(Some(&e.method));
    w.text(Some(&e.purpose));
    w.bytes(hash32(&e.subject));
    w.text(e.basis.as_deref());
    w.text(e.user.as_deref());
    w.text(e.peer.as_deref());
    w.int4(e.status);
    w.text(e.reason.as_deref());
    w.text(e.message.as_deref());
    w.bytes(hash32(&e.body_sha256));
    w.bytes(hash32(&e.request_hash));
    w.bytes(e.signature.as_deref());
    w.bytes(hash32(&e.signer_key));
    w.bytes(hash32(&e.signed_hash));
    w.bytes(e.body.as_deref());
    w.text(e.query_group.as_deref());
    w.int(e.hidden_until_ms);
    w.text(e.hidden_reason.as_deref());
}

/// Reads a row of [`COLUMNS`] as a record, or says why its content is not
/// one (a hash of the wrong length, an unknown step: `verify` reports it as
/// a bad record). The outer error is the driver's.
pub(crate) fn read_row(r: &impl RowReader) -> Result<Scanned, AuditError> {
    match record_of(r) {
        Ok(record) => Ok(Ok(record)),
        Err(RowError::Malformed(m)) => Ok(Err(m)),
        Err(RowError::Driver(e)) => Err(e),
    }
}

/// Why [`record_of`] could not read a row.
enum RowError {
    Driver(AuditError),
    Malformed(Malformed),
}

impl From<AuditError> for RowError {
    fn from(e: AuditError) -> Self {
        Self::Driver(e)
    }
}

impl From<Malformed> for RowError {
    fn from(m: Malformed) -> Self {
        Self::Malformed(m)
    }
}

fn record_of(r: &impl RowReader) -> Result<StoredRecord, RowError> {
    let seq = r.int(0)?;
    let bad = |why: &str| Malformed {
        seq,
        why: why.to_owned(),
    };
    let hash = |i: usize, what: &str| -> Result<Hash, RowError> {
        Ok(stored_hash(what, seq, &r.bytes(i)?)?)
    };
    let opt_hash = |i: usize, what: &str| -> Result<Option<Hash>, RowError> {
        Ok(r.opt_bytes(i)?
            .map(|b| stored_hash(what, seq, &b))
            .transpose()?)
    };
    Ok(StoredRecord {
        seq: u64::try_from(seq).map_err(|_| bad("negative sequence number"))?,
        prev_hash: hash(1, "prev_hash")?,
        hash: hash(2, "hash")?,
        entry: Entry {
            node: r.text(3)?,
            request_id: r.text(4)?,
            at_ms: r.int(5)?,
            side: Side::parse(&r.text(6)?).ok_or_else(|| bad("unknown side"))?,
            step: Step::parse(&r.text(7)?).ok_or_else(|| bad("unknown step"))?,
            client: r.text(8)?,
            service: r.text(9)?,
            method: r.text(10)?,
            purpose: r.text(11)?,
            subject: opt_hash(12, "subject")?,
            basis: r.opt_text(13)?,
            user: r.opt_text(14)?,
            peer: r.opt_text(15)?,
            status: r.int4(16)?,
            reason: r.opt_text(17)?,
            message: r.opt_text(18)?,
            body_sha256: opt_hash(19, "body_sha256")?,
            request_hash: opt_hash(20, "request_hash")?,
            signature: r.opt_bytes(21)?,
            signer_key: opt_hash(22, "signer_key")?,
            signed_hash: opt_hash(23, "signed_hash")?,
            body: r.opt_bytes(24)?,
            query_group: r.opt_text(25)?,
            hidden_until_ms: r.opt_int(26)?,
            hidden_reason: r.opt_text(27)?,
        },
    })
}

/// Reads a row of [`COLUMNS`] as a record; a row that is not a well-formed
/// record is an error that names it.
pub(crate) fn read_record(r: &impl RowReader) -> Result<StoredRecord, AuditError> {
    read_row(r)?.map_err(|m| AuditError::Read(format!("record {} is malformed: {}", m.seq, m.why)))
}
