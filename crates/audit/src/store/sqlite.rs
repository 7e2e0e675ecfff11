//! The embedded store: SQLite (compiled into kopir) at `<data_dir>/audit.db`,
//! with a record journal beside it (`audit.journal-0` and `-1`).
//!
//! An append goes to the journal ([`journal`]): one write, and for a durable
//! commit one `fdatasync`, however many records the writer task's batch
//! holds. It runs in the blocking pool, or on the writer's own thread for a
//! lone record while that is quick. The upkeep thread folds the journal into
//! SQLite every [`FOLD_EVERY`], in one transaction per journal file (WAL
//! mode, `synchronous=FULL`, synced with `fdatasync`, see
//! `.cargo/config.toml`), and every read folds first, so queries, `verify`
//! and checkpoints see every record appended. Should SQLite refuse a fold,
//! the records stay in the journal and appends are refused until a fold
//! succeeds ("no audit, no data"); a failed write or sync of the journal
//! refuses appends until the journal has repaired its file (see [`journal`]). Reads use a small pool of their own
//! connections; the same thread folds the WAL back into the database file.
//!
//! One process writes a log at a time (the journal is locked). A second
//! process, such as `kopir audit verify` beside a running server, opens it
//! to read only: it sees what the server has folded, at most about
//! [`FOLD_EVERY`] behind.
//!
//! # Indexes
//!
//! Time is indexed directly: it grows with the log, so an append touches the
//! same last pages of that index. Subject pseudonyms, request ids, clients and
//! services go into a key index of sorted runs instead ([`keys`]).

mod journal;
mod keys;

pub(crate) use journal::{frame_of, records_in};

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::future::BoxFuture;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, params,
    types::{ToSqlOutput, Value, ValueRef},
};

use super::{
    AuditStore, COLUMNS, Commit, Conditions, Page, Query, RowReader, RowWriter, Scanned, SqlValue,
    StoredCheckpoint, lossy_hash, read_record, read_row, seq_from_db, seq_to_db, write_row,
};
use crate::{
    AuditError,
    checkpoint::Checkpoint,
    record::{Entry, Hash, Link, StoredRecord},
};

/// The file name of the embedded store under the data directory.
pub(crate) const DB_FILE: &str = "audit.db";

/// `<data_dir>/audit.db`.
pub(crate) fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    node TEXT NOT NULL,
    request_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    side TEXT NOT NULL,
    step TEXT NOT NULL,
    client TEXT NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    purpose TEXT NOT NULL,
    subject BLOB,
    basis TEXT,
    user_id TEXT,
    peer TEXT,
    status INTEGER NOT NULL,
    reason TEXT,
    message TEXT,
    body_sha256 BLOB,
    request_hash BLOB,
    signature BLOB,
    signer_key BLOB,
    signed_hash BLOB,
    body BLOB,
    query_group TEXT,
    hidden_until_ms INTEGER,
    hidden_reason TEXT
);
CREATE INDEX IF NOT EXISTS audit_records_at ON audit_records(at_ms);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    root BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    key_id BLOB NOT NULL,
    cert_der BLOB NOT NULL,
    signature BLOB NOT NULL,
    frontier BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_seq ON audit_checkpoints(seq);
";

/// How many idle read connections are kept.
const READERS: usize = 4;

struct Inner {
    path: PathBuf,
    /// The connection that writes SQLite: folds, and checkpoints.
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    keys: Mutex<keys::Keys>,
    /// Where appends go first; `None` when another process writes this log
    /// (this one may only read what is in SQLite).
    journal: Option<Mutex<journal::Journal>>,
    /// Held by the one fold at a time ([`fold`]).
    folding: Mutex<()>,
    /// Set while the last fold failed: appends first retry it, and are
    /// refused while it fails, so that records cannot pile up where no
    /// query or verification sees them.
    fold_failed: AtomicBool,
    /// True while the last durable append committed within [`QUICK_COMMIT`].
    quick: AtomicBool,
}

impl Inner {
    fn new(
        path: &Path,
        conn: Connection,
        keys: Mutex<keys::Keys>,
        journal: Option<journal::Journal>,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            keys,
            journal: journal.map(Mutex::new),
            folding: Mutex::new(()),
            fold_failed: AtomicBool::new(false),
            quick: AtomicBool::new(false),
        }
    }
}

/// What a store is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// To write: a server.
    Write,
    /// To inspect: a tool, which may only read while a server writes.
    Inspect,
}

/// A store opened afresh.
enum Opened {
    /// With its journal locked: it may write.
    Writable(Inner),
    /// Another process holds the journal: it may only read.
    InUse(Inner),
}

/// How long [`SqliteStore::open`] waits for another writer to let go.
pub(crate) const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The key of a database file in [`OPEN`]: its folder resolved (links and
/// `..`), so that two spellings of one path name one store.
fn registry_key(path: &Path) -> PathBuf {
    let resolved = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .ok()
        .zip(path.file_name())
        .map(|(dir, name)| dir.join(name));
    resolved.unwrap_or_else(|| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

impl Drop for Inner {
    /// A store closed cleanly leaves every record in SQLite.
    fn drop(&mut self) {
        if let Err(e) = fold(self) {
            tracing::warn!(error = %e, "audit journal: records stay there until the next open");
        }
    }
}

/// An append of one record is written to the journal on the calling thread,
/// without a hand-off to the blocking pool and back, while durable appends
/// take less than this (a written one, with no sync, always is). A lone
/// record means the server is nearly idle, and two thread switches would cost
/// about as much as the write itself; a slower disk sends every durable
/// append to the blocking pool, where it cannot hold up other calls.
const QUICK_COMMIT: std::time::Duration = std::time::Duration::from_millis(1);

/// True if the runtime has other workers to run tasks while this one commits
/// (a commit never blocks a runtime's only thread).
fn other_workers() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() > 1)
}

/// The stores open in this process, by database path.
static OPEN: std::sync::LazyLock<
    Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<Inner>>>,
> = std::sync::LazyLock::new(Default::default);

/// The embedded SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn open_err(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Open(format!("{}: {e}", path.display()))
}

fn read_err(e: rusqlite::Error) -> AuditError {
    AuditError::Read(format!("sqlite: {e}"))
}

fn write_err(e: rusqlite::Error) -> AuditError {
    AuditError::Write(format!("sqlite: {e}"))
}

/// Durability and cache settings of every connection. `synchronous=FULL`
/// makes each commit durable; a larger WAL before it is folded back into the
/// database file lets repeated writes of the same pages (the last pages of
/// the table and its indexes) be folded once. A reader's page cache is
/// 16 MiB: queries and `verify` read each page about once, so a larger one
/// would only add to the server's memory, once per reader.
const PRAGMAS: &str = "PRAGMA synchronous=FULL; PRAGMA cache_size=-16384; PRAGMA temp_store=MEMORY; PRAGMA wal_autocheckpoint=10000; PRAGMA journal_size_limit=134217728;";

/// How often the upkeep thread folds the journal into SQLite: often enough
/// that each fold is small (about 250 records at 10,000 a second), and that
/// a tool reading the log beside a running server is little behind.
const FOLD_EVERY: std::time::Duration = std::time::Duration::from_millis(25);
/// Every this many folds, the upkeep thread also folds the WAL back into the
/// database file (a page written by several folds is copied once).
const WAL_FOLD_EVERY: u32 = 10;

/// The store's upkeep, every [`FOLD_EVERY`] on a thread of its own: it folds
/// the journal's records into SQLite ([`fold`]: one transaction and one sync
/// for all of them). Every [`WAL_FOLD_EVERY`] rounds it then folds the WAL
/// back into the database file with a passive checkpoint on a connection of
/// its own (nothing else writes meanwhile, so it catches up and the next
/// fold starts the WAL over), and prepares the key index's next chunk
/// ([`keys::prepare`]). SQLite's automatic checkpoint remains as a
/// backstop. It ends with the store. A round that panics is logged, and the next round goes
/// on with a fresh connection: the thread never stops while the store is
/// open.
fn upkeep_in_background(path: &Path, store: std::sync::Weak<Inner>) {
    let path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("audit-upkeep".into())
        .spawn(move || {
            let mut conn = None;
            for round in 1u32.. {
                std::thread::sleep(FOLD_EVERY);
                let Some(inner) = store.upgrade() else {
                    return;
                };
                let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    upkeep_round(&path, &inner, &mut conn, round)
                }));
                if let Err(panic) = turn {
                    conn = None;
                    tracing::error!(
                        panic = kopir_core::logging::panic_message(&*panic),
                        "audit upkeep failed; it goes on at the next round"
                    );
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no audit upkeep thread: the journal is folded at reads and when full");
    }
}

/// One round of the upkeep thread; `conn` is its connection, made when
/// first needed.
fn upkeep_round(path: &Path, inner: &Inner, conn: &mut Option<Connection>, round: u32) {
    if let Err(e) = fold(inner) {
        tracing::warn!(error = %e, "audit journal: fold failed, will retry");
    }
    if !round.is_multiple_of(WAL_FOLD_EVERY) {
        return;
    }
    let conn = match conn {
        Some(conn) => conn,
        None => match connect_small_cache(path) {
            Ok(fresh) => conn.insert(fresh),
            Err(e) => {
                tracing::warn!(error = %e, "audit upkeep: no connection for WAL checkpoints; will retry");
                return;
            }
        },
    };
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::debug!(error = %e, "audit WAL checkpoint");
    }
    if let Err(e) = keys::prepare(conn, &inner.keys) {
        tracing::debug!(error = %e, "audit key index: will retry");
    }
}

/// The page cache of the writer and of the upkeep thread: 2 MiB. The writer
/// only appends, touching the last pages of the table and its indexes (a
/// large cache costs a scan of it at every commit); the upkeep thread reads
/// each chunk of the key index once. Both caches fill up with pages read or
/// written once and never again, so a larger one only costs the server
/// memory.
const SMALL_CACHE: &str = "PRAGMA cache_size=-2048;";

/// A connection with the [`SMALL_CACHE`]: the writer's and the upkeep thread's.
fn connect_small_cache(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = connect(path)?;
    conn.execute_batch(SMALL_CACHE)?;
    Ok(conn)
}

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, not wal"
        )));
    }
    conn.execute_batch(PRAGMAS)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/audit.db`.
    pub async fn open_in(data_dir: &Path) -> Result<Self, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| AuditError::Open(format!("cannot create {}: {e}", data_dir.display())))?;
        Self::open(&db_path(data_dir)).await
    }

    /// Opens (creating if needed) the database file at `path` to write it,
    /// with its journal: records a crash left there are written into SQLite
    /// first. Within one process a path has one store (a second open shares
    /// it). Fails if another process writes the log (after waiting up to
    /// [`IN_USE_WAIT`] for it to let go, as a restarted server may start
    /// before the old one has quite stopped).
    pub async fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_as(path, Access::Write).await
    }

    /// Opens the database file at `path` to inspect it (`kopir audit ...`):
    /// like [`SqliteStore::open`], but if another process writes the log,
    /// this one may only read it. Appends then fail, and records that process
    /// has not yet folded into SQLite (at most about [`FOLD_EVERY`] of them)
    /// are not seen.
    pub(crate) async fn open_to_inspect(path: &Path) -> Result<Self, AuditError> {
        Self::open_as(path, Access::Inspect).await
    }

    async fn open_as(path: &Path, access: Access) -> Result<Self, AuditError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let key = registry_key(&path);
            let waited = std::time::Instant::now();
            loop {
                let mut open = OPEN
                    .lock()
                    .map_err(|_| AuditError::Open("audit store registry poisoned".into()))?;
                if let Some(inner) = open.get(&key).and_then(std::sync::Weak::upgrade) {
                    return Ok(Self { inner });
                }
                let in_use = match (Self::open_new(&path)?, access) {
                    (Opened::Writable(inner), _) => {
                        let inner = Arc::new(inner);
                        open.retain(|_, store| store.strong_count() > 0);
                        open.insert(key, Arc::downgrade(&inner));
                        upkeep_in_background(&inner.path, Arc::downgrade(&inner));
                        return Ok(Self { inner });
                    }
                    (Opened::InUse(inner), Access::Inspect) => {
                        tracing::info!(path = %path.display(), "audit log written by another process: read only");
                        return Ok(Self {
                            inner: Arc::new(inner),
                        });
                    }
                    (Opened::InUse(_), Access::Write) => true,
                };
                drop(open);
                if in_use && waited.elapsed() >= IN_USE_WAIT {
                    return Err(AuditError::Open(format!(
                        "{} is written by another process (another `kopir serve` on the same data directory?)",
                        path.display()
                    )));
                }
                std::thread::sleep(IN_USE_WAIT / 100);
            }
        })
        .await
        .map_err(|e| AuditError::Open(format!("sqlite open task: {e}")))?
    }

    fn open_new(path: &Path) -> Result<Opened, AuditError> {
        let mut conn = connect_small_cache(path).map_err(open_err(path))?;
        conn.execute_batch(SCHEMA).map_err(open_err(path))?;
        conn.execute_batch(keys::SCHEMA).map_err(open_err(path))?;
        add_missing_columns(&conn).map_err(open_err(path))?;
        keys::drop_older_index(&conn).map_err(open_err(path))?;
        let keys = Mutex::new(keys::Keys::new(
            keys::keys_upto(&conn).map_err(open_err(path))?,
        ));
        let journal_err =
            |e: std::io::Error| AuditError::Open(format!("{}: audit journal: {e}", path.display()));
        let journal = match journal::Journal::lock(path) {
            Ok(journal) => Some(journal),
            Err(journal::OpenError::InUse) => None,
            Err(journal::OpenError::Io(e)) => return Err(journal_err(e)),
        };
        if let Some(mut journal) = journal {
            // The head is read once the journal is locked: no other writer
            // moves it any more.
            let head = head_of(&conn).map_err(open_err(path))?;
            let recovered = journal.recover(head).map_err(journal_err)?;
            if !recovered.is_empty() {
                insert_batch(&mut conn, &keys, &recovered).map_err(|e| {
                    AuditError::Open(format!(
                        "{}: cannot take in the records of the journal: {e}",
                        path.display()
                    ))
                })?;
                tracing::info!(
                    records = recovered.len(),
                    "audit journal: took in the records of an unclean stop"
                );
            }
            Ok(Opened::Writable(Inner::new(
                path,
                conn,
                keys,
                Some(journal),
            )))
        } else {
            Ok(Opened::InUse(Inner::new(path, conn, keys, None)))
        }
    }

    /// Sets how many records go into one sorted chunk of the key index (for
    /// tests that want the indexed path on short logs).
    #[cfg(test)]
    pub(crate) fn set_key_chunk(&self, records: u64) {
        if let Ok(mut k) = keys::lock(&self.inner.keys) {
            k.set_chunk(records);
        }
    }

    /// How far the key index reaches (records `1..=n` are in it).
    #[cfg(test)]
    pub(crate) fn keys_indexed(&self) -> u64 {
        keys::lock(&self.inner.keys).map(|k| k.upto).unwrap_or(0)
    }

    /// Runs `f` on a read connection in the blocking pool, once every
    /// record appended so far is in SQLite. Should that fold fail, `f` reads
    /// what SQLite has (and the failure is logged).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, AuditError> + Send + 'static,
    ) -> Result<T, AuditError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = fold(&inner) {
                tracing::warn!(error = %e, "audit journal: a read sees only what SQLite has");
            }
            let idle = relock(&inner.readers, "audit reader pool", Vec::clear).pop();
            let conn = match idle {
                Some(c) => c,
                None => connect(&inner.path).map_err(read_err)?,
            };
            let out = f(&conn);
            let mut pool = relock(&inner.readers, "audit reader pool", Vec::clear);
            if pool.len() < READERS {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| AuditError::Read(format!("sqlite read task: {e}")))?
    }

    /// Runs `f` on the write connection in the blocking pool, once every
    /// record appended so far is in SQLite.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Mutex<keys::Keys>) -> Result<T, AuditError> + Send + 'static,
    ) -> Result<T, AuditError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            fold(&inner)?;
            let mut writer = relock(&inner.writer, "audit writer connection", |_| {});
            f(&mut writer, &inner.keys)
        })
        .await
        .map_err(|e| AuditError::Write(format!("sqlite write task: {e}")))?
    }
}

impl RowReader for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn int(&self, i: usize) -> Result<i64, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, AuditError> {
        self.get(i).map_err(read_err)
    }
    fn int4(&self, i: usize) -> Result<i32, AuditError> {
        self.get(i).map_err(read_err)
    }
}

/// A record row as the parameters of one `INSERT`, borrowed from the entry.
impl<'a> RowWriter<'a> for Vec<ToSqlOutput<'a>> {
    fn int(&mut self, v: Option<i64>) {
        self.push(v.map_or(ToSqlOutput::Owned(Value::Null), |v| {
            ToSqlOutput::Owned(Value::Integer(v))
        }));
    }
    fn int4(&mut self, v: i32) {
        self.push(ToSqlOutput::Owned(Value::Integer(i64::from(v))));
    }
    fn text(&mut self, v: Option<&'a str>) {
        self.push(v.map_or(ToSqlOutput::Owned(Value::Null), |v| {
            ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes()))
        }));
    }
    fn bytes(&mut self, v: Option<&'a [u8]>) {
        self.push(v.map_or(ToSqlOutput::Owned(Value::Null), |v| {
            ToSqlOutput::Borrowed(ValueRef::Blob(v))
        }));
    }
}

fn records(
    conn: &Connection,
    sql: &str,
    values: &[SqlValue],
) -> Result<Vec<StoredRecord>, AuditError> {
    let mut stmt = conn.prepare_cached(sql).map_err(read_err)?;
    let params = rusqlite::params_from_iter(values.iter().map(to_sql));
    let mut rows = stmt.query(params).map_err(read_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(read_err)? {
        out.push(read_record(row)?);
    }
    Ok(out)
}

fn to_sql(v: &SqlValue) -> Value {
    match v {
        SqlValue::Text(s) => Value::Text(s.clone()),
        SqlValue::Int(i) => Value::Integer(*i),
        SqlValue::Int4(i) => Value::Integer(i64::from(*i)),
        SqlValue::Bytes(b) => Value::Blob(b.clone()),
    }
}

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
    let head: Vec<u8> = r.get(1)?;
    let root: Vec<u8> = r.get(2)?;
    let key_id: Vec<u8> = r.get(5)?;
    Ok(StoredCheckpoint {
        checkpoint: Checkpoint {
            seq: seq_from_db(r.get(0)?),
            head: lossy_hash(&head),
            root: lossy_hash(&root),
            at_ms: r.get(3)?,
            node: r.get(4)?,
            key_id: lossy_hash(&key_id),
            cert_der: r.get(6)?,
            signature: r.get(7)?,
        },
        frontier: r.get(8)?,
    })
}

const CHECKPOINT_COLUMNS: &str =
    "seq, head, root, at_ms, node, key_id, cert_der, signature, frontier";

/// The statement that inserts one record (built once: the writer looks it up
/// in its statement cache at every append).
fn insert_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let marks: Vec<String> = (1..=28).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO audit_records ({COLUMNS}) VALUES ({})",
            marks.join(", ")
        )
    });
    &SQL
}

/// Runs one of the writer's fixed statements (`BEGIN`, `COMMIT`, a
/// `PRAGMA`...) from the statement cache: parsing it anew at every append
/// cost the writer more than inserting the record.
fn run_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.raw_execute().map(drop)
}

/// The writer's transaction: `BEGIN IMMEDIATE` to `COMMIT`, rolled back if
/// dropped before it commits.
struct WriteTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> WriteTx<'c> {
    fn begin(conn: &'c Connection) -> Result<Self, rusqlite::Error> {
        run_cached(conn, "BEGIN IMMEDIATE")?;
        Ok(Self { conn, open: true })
    }

    fn commit(mut self) -> Result<(), rusqlite::Error> {
        run_cached(self.conn, "COMMIT")?;
        self.open = false;
        Ok(())
    }

    /// Runs `f` within a savepoint: what it wrote is undone if it fails,
    /// and the transaction goes on either way.
    fn within_savepoint(
        &self,
        f: impl FnOnce(&Connection) -> Result<(), rusqlite::Error>,
    ) -> Result<(), rusqlite::Error> {
        run_cached(self.conn, "SAVEPOINT side_work")?;
        let done = f(self.conn);
        if done.is_err() {
            run_cached(self.conn, "ROLLBACK TO side_work")?;
        }
        run_cached(self.conn, "RELEASE side_work")?;
        done
    }
}

impl Drop for WriteTx<'_> {
    /// Rolls back, unless SQLite already has (as it does after a full disk
    /// or an I/O error).
    fn drop(&mut self) {
        if self.open
            && !self.conn.is_autocommit()
            && let Err(e) = run_cached(self.conn, "ROLLBACK")
        {
            tracing::warn!(error = %e, "audit append: rollback failed");
        }
    }
}

/// Columns added after the first schema, with their types: a store made
/// before them gets them on open (empty in its old records, which keep
/// their first canonical form; see `record.rs`).
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("query_group", "TEXT"),
    ("hidden_until_ms", "INTEGER"),
    ("hidden_reason", "TEXT"),
];

fn add_missing_columns(conn: &Connection) -> Result<(), rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('audit_records')")?;
    let present = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for (name, ty) in ADDED_COLUMNS {
        if !present.iter().any(|p| p == name) {
            conn.execute_batch(&format!("ALTER TABLE audit_records ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

/// A query through the key index when it names a request id, subject,
/// client or service: the unindexed tail first (newest), then the runs, in
/// one read transaction. Other queries go straight to the table.
fn query_keyed(
    conn: &Connection,
    query: &Query,
    limit: usize,
) -> Result<Vec<StoredRecord>, AuditError> {
    // The most selective key the query names.
    let key = if let Some(id) = &query.request_id {
        Some((keys::Kind::Request, keys::text_key(id)))
    } else if let Some(h) = &query.subject {
        Some((keys::Kind::Subject, keys::subject_key(h)))
    } else if let Some(c) = &query.client {
        Some((keys::Kind::Client, keys::text_key(c)))
    } else {
        query
            .service
            .as_ref()
            .map(|s| (keys::Kind::Service, keys::text_key(s)))
    };
    let c = Conditions::of(query, |n| format!("?{n}"));
    let Some((kind, key)) = key else {
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records {} ORDER BY seq DESC LIMIT {limit}",
            c.where_clause()
        );
        return records(conn, &sql, &c.values);
    };
    conn.execute_batch("BEGIN").map_err(read_err)?;
    let result = (|| {
        let upto = seq_to_db(keys::keys_upto(conn).map_err(read_err)?);
        let n = c.values.len();
        let mut values = c.values.clone();
        values.push(SqlValue::Int(upto));
        let mut clauses = c.clauses.clone();
        clauses.push(format!("seq > ?{}", n + 1));
        let tail = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE {} ORDER BY seq DESC LIMIT {limit}",
            clauses.join(" AND ")
        );
        let mut out = records(conn, &tail, &values)?;
        // Then each sorted run, newest first (a run is named by its last
        // sequence number), each record it names checked against the query.
        let one = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE {} seq = ?{}",
            c.clauses
                .iter()
                .map(|cl| format!("{cl} AND "))
                .collect::<String>(),
            n + 1
        );
        let before = query.before_seq.map(seq_to_db).unwrap_or(i64::MAX);
        let mut next_run = keys::run_at_or_below(conn, upto).map_err(read_err)?;
        while let Some(run) = next_run {
            if out.len() >= limit {
                break;
            }
            next_run = keys::run_at_or_below(conn, run - 1).map_err(read_err)?;
            // Runs wholly at or after the cursor hold nothing for this page.
            if next_run.is_some_and(|lo| before <= lo + 1) {
                continue;
            }
            for seq in keys::seqs_in_run(conn, run, kind, key).map_err(read_err)? {
                if out.len() >= limit {
                    break;
                }
                if seq < before {
                    values[n] = SqlValue::Int(seq);
                    out.extend(records(conn, &one, &values)?);
                }
            }
        }
        Ok(out)
    })();
    let _ = conn.execute_batch("COMMIT");
    result
}

fn head_of(conn: &Connection) -> Result<Option<Link>, rusqlite::Error> {
    conn.prepare_cached("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .optional()
        .map(|row| {
            row.map(|(seq, hash)| Link {
                seq: seq_from_db(seq),
                hash: lossy_hash(&hash),
            })
        })
}

impl AuditStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.inner.path.display())
    }

    fn append(
        &self,
        entries: Vec<Entry>,
        commit: Commit,
    ) -> BoxFuture<'_, Result<Vec<Link>, AuditError>> {
        let quick = commit == Commit::Written || self.inner.quick.load(Ordering::Relaxed);
        if entries.len() == 1 && quick && other_workers() {
            return Box::pin(std::future::ready(append_timed(
                &self.inner,
                entries,
                commit,
            )));
        }
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || append_timed(&inner, entries, commit))
                .await
                .map_err(|e| AuditError::Write(format!("sqlite write task: {e}")))?
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<Option<Link>, AuditError>> {
        Box::pin(self.read(|conn| head_of(conn).map_err(read_err)))
    }

    fn scan(&self, from: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Scanned>, AuditError>> {
        Box::pin(self.read(move |conn| {
            let sql = format!(
                "SELECT {COLUMNS} FROM audit_records WHERE seq >= ?1 ORDER BY seq LIMIT ?2"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(read_err)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut rows = stmt
                .query(params![seq_to_db(from), limit])
                .map_err(read_err)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(read_err)? {
                out.push(read_row(row)?);
            }
            Ok(out)
        }))
    }

    fn hashes(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<(u64, Hash)>, AuditError>> {
        Box::pin(self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, hash FROM audit_records WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq",
                )
                .map_err(read_err)?;
            let rows = stmt
                .query_map(params![seq_to_db(from), seq_to_db(to)], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(read_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, hash) = row.map_err(read_err)?;
                out.push((seq_from_db(seq), lossy_hash(&hash)));
            }
            Ok(out)
        }))
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<Page, AuditError>> {
        Box::pin(self.read(move |conn| {
            let limit = query.page_size();
            Ok(Page::from_rows(query_keyed(conn, &query, limit)?, limit))
        }))
    }

    fn by_request(
        &self,
        request_id: String,
    ) -> BoxFuture<'_, Result<Vec<StoredRecord>, AuditError>> {
        Box::pin(self.read(move |conn| {
            let q = Query {
                request_id: Some(request_id),
                ..Query::default()
            };
            let mut rows = query_keyed(conn, &q, 100_000)?;
            rows.reverse();
            Ok(rows)
        }))
    }

    fn seq_range(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> BoxFuture<'_, Result<Option<(u64, u64)>, AuditError>> {
        Box::pin(self.read(move |conn| {
            let (lo, hi): (Option<i64>, Option<i64>) = conn
                .query_row(
                    "SELECT MIN(seq), MAX(seq) FROM audit_records WHERE at_ms >= ?1 AND at_ms < ?2",
                    params![from_ms, to_ms],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(read_err)?;
            Ok(lo.zip(hi).map(|(a, b)| (seq_from_db(a), seq_from_db(b))))
        }))
    }

    fn put_checkpoint(&self, cp: StoredCheckpoint) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(self.write(move |conn, _| {
            let c = &cp.checkpoint;
            conn.execute(
                &format!(
                    "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ),
                params![
                    seq_to_db(c.seq),
                    &c.head[..],
                    &c.root[..],
                    c.at_ms,
                    c.node,
                    &c.key_id[..],
                    c.cert_der,
                    c.signature,
                    cp.frontier,
                ],
            )
            .map_err(write_err)?;
            Ok(())
        }))
    }

    fn checkpoints(&self) -> BoxFuture<'_, Result<Vec<Checkpoint>, AuditError>> {
        Box::pin(self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq, id"
                ))
                .map_err(read_err)?;
            let rows = stmt.query_map([], checkpoint_row).map_err(read_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(read_err)?.checkpoint);
            }
            Ok(out)
        }))
    }

    fn read_all_blocking(&self) -> Result<Vec<StoredRecord>, AuditError> {
        fold(&self.inner)?;
        let conn = connect(&self.inner.path).map_err(read_err)?;
        records(
            &conn,
            &format!("SELECT {COLUMNS} FROM audit_records ORDER BY seq"),
            &[],
        )
    }

    fn latest_checkpoint(&self) -> BoxFuture<'_, Result<Option<StoredCheckpoint>, AuditError>> {
        Box::pin(self.read(|conn| {
            conn.query_row(
                &format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC, id DESC LIMIT 1"
                ),
                [],
                checkpoint_row,
            )
            .optional()
            .map_err(read_err)
        }))
    }
}

/// Appends `entries` to the journal, and notes whether a durable commit was
/// quick.
fn append_timed(
    inner: &Inner,
    mut entries: Vec<Entry>,
    commit: Commit,
) -> Result<Vec<Link>, AuditError> {
    let Some(journal) = &inner.journal else {
        return Err(AuditError::Write(format!(
            "{} is written by another process; this one may only read it",
            inner.path.display()
        )));
    };
    if inner.fold_failed.load(Ordering::Relaxed) {
        fold(inner).map_err(|e| {
            AuditError::Write(format!(
                "the audit database does not take the journal's records: {e}"
            ))
        })?;
    }
    let started = std::time::Instant::now();
    let append = |entries: &mut Vec<Entry>| {
        lock(journal)?
            .append(entries, commit)
            .map_err(|e| AuditError::Write(format!("audit journal: {e}")))
    };
    let links = match append(&mut entries)? {
        Some(links) => links,
        // Both files are full: the fold is behind. Fold here, then go on.
        None => {
            fold(inner)?;
            append(&mut entries)?
                .ok_or_else(|| AuditError::Write("audit journal: no room after a fold".into()))?
        }
    };
    if commit == Commit::Durable {
        inner
            .quick
            .store(started.elapsed() < QUICK_COMMIT, Ordering::Relaxed);
    }
    Ok(links)
}

/// Locks the journal. Should a thread have panicked while holding it, the
/// active file is repaired before the next append (see [`journal`]).
fn lock(
    journal: &Mutex<journal::Journal>,
) -> Result<std::sync::MutexGuard<'_, journal::Journal>, AuditError> {
    Ok(relock(journal, "audit journal", journal::Journal::distrust))
}

/// Locks `mutex`, taking it over if a thread panicked while holding it: a
/// panic in one fold or append must not refuse every later one. `put_right`
/// is given the state that thread may have left half changed.
pub(super) fn relock<'m, T>(
    mutex: &'m Mutex<T>,
    what: &str,
    put_right: impl FnOnce(&mut T),
) -> std::sync::MutexGuard<'m, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        tracing::error!("{what}: taken over from a thread that failed while holding it");
        let mut guard = poisoned.into_inner();
        put_right(&mut guard);
        mutex.clear_poison();
        guard
    })
}

/// Writes every journaled record into SQLite, one sealed file at a time,
/// each in one transaction (and one sync); the file is reused only after
/// that commit. At most two rounds, so that appends cannot keep a reader
/// waiting: the file sealed before (if a fold of it failed or is under way
/// elsewhere), then the active one, which holds every record appended before
/// this call. Notes in [`Inner::fold_failed`] whether it failed.
fn fold(inner: &Inner) -> Result<(), AuditError> {
    let Some(journal) = &inner.journal else {
        return Ok(());
    };
    if lock(journal)?.is_empty() {
        return Ok(());
    }
    let _one = relock(&inner.folding, "audit fold", |_| {});
    let folded = fold_rounds(inner, journal);
    inner.fold_failed.store(folded.is_err(), Ordering::Relaxed);
    folded
}

/// The rounds of [`fold`], run by the one fold at a time.
fn fold_rounds(inner: &Inner, journal: &Mutex<journal::Journal>) -> Result<(), AuditError> {
    for _ in 0..2 {
        let sealed = lock(journal)?
            .seal()
            .map_err(|e| AuditError::Write(format!("audit journal: {e}")))?;
        let Some(sealed) = sealed else {
            break;
        };
        let records = sealed
            .records()
            .map_err(|e| AuditError::Write(format!("audit journal: {e}")))?;
        {
            let mut writer = relock(&inner.writer, "audit writer connection", |_| {});
            insert_batch(&mut writer, &inner.keys, &records)?;
        }
        lock(journal)?.folded();
    }
    Ok(())
}

/// Inserts journaled records (already chained) in one transaction, with the
/// key index's blocks when due.
fn insert_batch(
    conn: &mut Connection,
    keys: &Mutex<keys::Keys>,
    records: &[journal::Journaled],
) -> Result<(), AuditError> {
    let Some(last) = records.last() else {
        return Ok(());
    };
    let record_keys: Vec<_> = records
        .iter()
        .map(|r| {
            let e = &r.entry;
            keys::record_keys(e.subject.as_ref(), &e.request_id, &e.client, &e.service)
        })
        .collect();
    let tx = WriteTx::begin(conn).map_err(write_err)?;
    {
        let mut stmt = conn.prepare_cached(insert_sql()).map_err(write_err)?;
        for r in records {
            let mut row = Vec::with_capacity(28);
            write_row((r.seq, &r.prev, &r.hash), &r.entry, &mut row);
            stmt.execute(rusqlite::params_from_iter(row))
                .map_err(write_err)?;
        }
    }
    // Blocks of the key index ride in the same transaction (and fsync).
    // Should they fail, the records still go in: the run is prepared again.
    let head = last.seq;
    let blocks_ok = !keys::due(keys, head)
        || match tx.within_savepoint(|conn| keys::write(conn, keys, head, records.len())) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "audit key index: will retry");
                false
            }
        };
    tx.commit().map_err(write_err)?;
    if let Ok(mut k) = keys::lock(keys) {
        if blocks_ok {
            k.settle();
        } else {
            k.abandon();
        }
        for (r, rk) in records.iter().zip(record_keys) {
            k.gather(r.seq, rk);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Side, Step, pseudonym::PseudonymKey};

    /// Appends the records `seqs` one by one, each durable and then folded
    /// into SQLite (by a read) in a transaction of its own.
    async fn append_each(
        store: &SqliteStore,
        key: &PseudonymKey,
        seqs: std::ops::RangeInclusive<u64>,
    ) {
        for i in seqs {
            store
                .append(vec![entry(i, key)], Commit::Durable)
                .await
                .unwrap();
            assert_eq!(store.head().await.unwrap().map(|h| h.seq), Some(i));
        }
    }

    fn entry(i: u64, key: &PseudonymKey) -> Entry {
        Entry {
            request_id: format!("req-{}", i / 3),
            at_ms: i as i64,
            client: format!("c{}", i % 2),
            service: "s".into(),
            method: "m".into(),
            purpose: "p".into(),
            subject: (!i.is_multiple_of(10)).then(|| key.pseudonym(&format!("iin:{}", i % 4))),
            ..Entry::bare("n", Side::Consumer, Step::Answered)
        }
    }

    /// A thread that panics while holding the journal, the writer's
    /// connection and the key index refuses no later append: the locks are
    /// taken over, the journal's file repaired, and every record lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_that_fails_holding_the_locks_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        let key = PseudonymKey::random().unwrap();
        append_each(&store, &key, 1..=2).await;
        let inner = store.inner.clone();
        let failed = std::thread::spawn(move || {
            let _journal = inner.journal.as_ref().map(|j| j.lock().unwrap());
            let _writer = inner.writer.lock().unwrap();
            let _keys = inner.keys.lock().unwrap();
            panic!("injected failure while holding the store's locks");
        })
        .join();
        assert!(failed.is_err());
        assert!(store.inner.writer.is_poisoned() && store.inner.keys.is_poisoned());
        append_each(&store, &key, 3..=5).await;
        let seqs: Vec<u64> = store
            .read_all_blocking()
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert!(!store.inner.writer.is_poisoned());
    }

    /// A store made before the report columns existed gains them on open;
    /// its old records read back unchanged and still verify.
    #[tokio::test]
    async fn an_older_store_gains_the_report_columns() {
        let dir = tempfile::tempdir().unwrap();
        let key = PseudonymKey::random().unwrap();
        let old_schema = SCHEMA.replace(
            "body BLOB,\n    query_group TEXT,\n    hidden_until_ms INTEGER,\n    hidden_reason TEXT\n",
            "body BLOB\n",
        );
        assert_ne!(old_schema, SCHEMA);
        let old = entry(1, &key);
        let (seq, prev, hash) = crate::record::chain(None, std::slice::from_ref(&old))[0];
        {
            let conn = Connection::open(db_path(dir.path())).unwrap();
            conn.execute_batch(&old_schema).unwrap();
            let cols: Vec<String> = COLUMNS.split(", ").take(25).map(str::to_owned).collect();
            let marks: Vec<String> = (1..=25).map(|i| format!("?{i}")).collect();
            conn.execute(
                &format!(
                    "INSERT INTO audit_records ({}) VALUES ({})",
                    cols.join(", "),
                    marks.join(", ")
                ),
                params![
                    seq_to_db(seq),
                    &prev[..],
                    &hash[..],
                    old.node,
                    old.request_id,
                    old.at_ms,
                    old.side.as_str(),
                    old.step.as_str(),
                    old.client,
                    old.service,
                    old.method,
                    old.purpose,
                    old.subject.as_ref().map(|h| &h[..]),
                    old.basis,
                    old.user,
                    old.peer,
                    old.status,
                    old.reason,
                    old.message,
                    old.body_sha256.as_ref().map(|h| &h[..]),
                    old.request_hash.as_ref().map(|h| &h[..]),
                    old.signature.as_deref(),
                    old.signer_key.as_ref().map(|h| &h[..]),
                    old.signed_hash.as_ref().map(|h| &h[..]),
                    old.body.as_deref(),
                ],
            )
            .unwrap();
        }
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        let mut new = entry(2, &key);
        new.query_group = Some("claim-1".into());
        new.hidden_until_ms = Some(5);
        new.hidden_reason = Some("inquiry".into());
        store
            .append(vec![new.clone()], Commit::Durable)
            .await
            .unwrap();
        let all = store.read_all_blocking().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].entry, old);
        assert_eq!(all[1].entry, new);
        assert!(all.iter().all(|r| r.recompute() == r.hash));
    }

    /// Queries by subject and request id give the same answers whether the
    /// records are in the key index, in the tail after it, or both.
    /// While another process writes the log (here: holds its journal), a
    /// server cannot open it, and a tool opens it to read only.
    #[tokio::test]
    async fn a_log_written_elsewhere_is_refused_to_writers_and_read_by_tools() {
        let dir = tempfile::tempdir().unwrap();
        let key = PseudonymKey::random().unwrap();
        let path = db_path(dir.path());
        let store = SqliteStore::open(&path).await.unwrap();
        append_each(&store, &key, 1..=3).await;
        drop(store);
        let other = journal::Journal::lock(&path).unwrap();
        let began = std::time::Instant::now();
        let err = SqliteStore::open(&path).await.unwrap_err();
        assert!(began.elapsed() >= IN_USE_WAIT, "it did not wait");
        assert!(err.to_string().contains("another process"), "{err}");
        let tool = SqliteStore::open_to_inspect(&path).await.unwrap();
        assert_eq!(tool.head().await.unwrap().map(|h| h.seq), Some(3));
        let refused = tool.append(vec![entry(4, &key)], Commit::Durable).await;
        assert!(
            matches!(&refused, Err(AuditError::Write(m)) if m.contains("another process")),
            "{refused:?}"
        );
        drop((tool, other));
        // Once it lets go, a server opens it and goes on.
        let store = SqliteStore::open(&path).await.unwrap();
        append_each(&store, &key, 4..=4).await;
    }

    /// A store reopened while its last handle is still being dropped (its
    /// final fold under way) waits for it rather than opening read-only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_reopened_while_it_closes_is_writable() {
        let dir = tempfile::tempdir().unwrap();
        let key = PseudonymKey::random().unwrap();
        let path = db_path(dir.path());
        for round in 0..10u64 {
            let store = SqliteStore::open(&path).await.unwrap();
            store
                .append(vec![entry(2 * round + 1, &key)], Commit::Durable)
                .await
                .unwrap();
            let closing = std::thread::spawn(move || drop(store));
            let again = SqliteStore::open(&path).await.unwrap();
            closing.join().unwrap();
            again
                .append(vec![entry(2 * round + 2, &key)], Commit::Durable)
                .await
                .unwrap();
            assert_eq!(
                again.head().await.unwrap().map(|h| h.seq),
                Some(2 * round + 2)
            );
        }
    }

    /// The upkeep thread folds the journal into SQLite, unasked, and the WAL
    /// back into the database file, so that the next fold starts it over
    /// instead of letting it grow to its checkpoint size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_journal_and_the_wal_are_folded_behind_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        let key = PseudonymKey::random().unwrap();
        let probe = connect(&store.inner.path).unwrap();
        let in_sqlite = || -> i64 {
            probe
                .query_row("SELECT COUNT(*) FROM audit_records", [], |r| r.get(0))
                .unwrap()
        };
        let wait_for = |n: i64| {
            let began = std::time::Instant::now();
            while in_sqlite() < n && began.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::sleep(FOLD_EVERY / 5);
            }
            assert_eq!(in_sqlite(), n, "the journal was not folded");
        };
        for i in 1..=60 {
            store
                .append(vec![entry(i, &key)], Commit::Durable)
                .await
                .unwrap();
        }
        wait_for(60);
        std::thread::sleep(FOLD_EVERY * WAL_FOLD_EVERY * 3);
        store
            .append(vec![entry(61, &key)], Commit::Durable)
            .await
            .unwrap();
        wait_for(61);
        let after: i64 = probe
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap();
        assert!(
            (1..20).contains(&after),
            "the WAL holds {after} frames: it was not started over"
        );
        assert_eq!(store.head().await.unwrap().map(|h| h.seq), Some(61));
    }

    /// Appends that never pause still see the WAL started over after the
    /// background checkpoints (SQLite's automatic checkpoint, which would
    /// also start it over, is turned off here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_started_over_under_steady_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        let key = PseudonymKey::random().unwrap();
        store
            .inner
            .writer
            .lock()
            .unwrap()
            .execute_batch("PRAGMA wal_autocheckpoint=0")
            .unwrap();
        let mut wal = db_path(dir.path()).into_os_string();
        wal.push("-wal");
        // The WAL header's checkpoint sequence number, one up at each start-over.
        let starts = || {
            use std::io::Read;
            let mut header = [0u8; 16];
            std::fs::File::open(&wal)
                .and_then(|mut f| f.read_exact(&mut header))
                .map_or(0, |()| {
                    u32::from_be_bytes([header[12], header[13], header[14], header[15]])
                })
        };
        store
            .append(vec![entry(1, &key)], Commit::Durable)
            .await
            .unwrap();
        let first = starts();
        let began = std::time::Instant::now();
        let mut appends = 1;
        // The header is read every 64 appends, so that reading it makes no
        // pause in which a background checkpoint could catch up alone.
        while (appends % 64 != 0 || starts().wrapping_sub(first) < 2)
            && began.elapsed() < std::time::Duration::from_secs(10)
        {
            appends += 1;
            store
                .append(vec![entry(appends, &key)], Commit::Durable)
                .await
                .unwrap();
        }
        let restarts = starts().wrapping_sub(first);
        assert!(
            restarts >= 2,
            "the WAL was started over {restarts} times in {appends} appends"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_key_index_chunk_is_read_behind_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        store.set_key_chunk(8);
        let key = PseudonymKey::random().unwrap();
        // One chunk is waiting, not two: the fold leaves it to the
        // background thread.
        append_each(&store, &key, 1..=10).await;
        assert_eq!(store.keys_indexed(), 0);
        let prepared = || store.inner.keys.lock().unwrap().prepared();
        let waited = std::time::Instant::now();
        while !prepared() && waited.elapsed() < std::time::Duration::from_secs(10) {
            tokio::time::sleep(FOLD_EVERY / 5).await;
        }
        assert!(prepared(), "the background thread did not read the chunk");
        // The next folds write it, a block (here, one kind of key) each.
        for i in 11..=14 {
            assert_eq!(store.keys_indexed(), 0);
            append_each(&store, &key, i..=i).await;
        }
        assert_eq!(store.keys_indexed(), 8);
        let rows = store.by_request("req-1".into()).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
    }

    /// A store with the older key index (a row per key) drops it on open
    /// and rebuilds the runs as records are appended; queries answer alike
    /// throughout.
    #[tokio::test]
    async fn an_older_key_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let key = PseudonymKey::random().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        append_each(&store, &key, 1..=12).await;
        drop(store);
        let conn = connect(&db_path(dir.path())).unwrap();
        conn.execute_batch(
            "CREATE TABLE audit_keys (chunk INTEGER NOT NULL, kind INTEGER NOT NULL, key INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (chunk, kind, key, seq)) WITHOUT ROWID;
             INSERT INTO audit_keys VALUES (8, 1, 0, 1);
             INSERT INTO audit_meta (name, value) VALUES ('keys_upto', 8);",
        )
        .unwrap();
        drop(conn);

        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        store.set_key_chunk(4);
        assert_eq!(store.keys_indexed(), 0);
        let older: i64 = connect(&db_path(dir.path()))
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_keys'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(older, 0, "the older key index is still there");
        let by_request = |store: SqliteStore| async move {
            let rows = store.by_request("req-2".into()).await.unwrap();
            rows.iter().map(|r| r.seq).collect::<Vec<_>>()
        };
        assert_eq!(by_request(store.clone()).await, [6, 7, 8]);
        append_each(&store, &key, 13..=40).await;
        assert!(store.keys_indexed() >= 8, "{}", store.keys_indexed());
        assert_eq!(by_request(store).await, [6, 7, 8]);
    }

    #[tokio::test]
    async fn the_key_index_and_the_tail_answer_alike() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        store.set_key_chunk(8);
        let key = PseudonymKey::random().unwrap();
        let all: Vec<Entry> = (1..=61).map(|i| entry(i, &key)).collect();
        // Each batch is folded into SQLite (by a read) before the next.
        for batch in all.chunks(5) {
            store.append(batch.to_vec(), Commit::Durable).await.unwrap();
            store.head().await.unwrap();
        }
        assert!(store.keys_indexed() >= 40, "{}", store.keys_indexed());
        assert!(store.keys_indexed() < 61);
        for s in 0..4u64 {
            let subject = key.pseudonym(&format!("iin:{s}"));
            let want: Vec<u64> = (1..=61u64)
                .rev()
                .filter(|i| i % 4 == s && i % 10 != 0)
                .collect();
            let mut got = Vec::new();
            let mut q = Query {
                subject: Some(subject),
                limit: 3,
                ..Query::default()
            };
            loop {
                let page = store.query(q.clone()).await.unwrap();
                got.extend(page.records.iter().map(|r| r.seq));
                match page.next {
                    Some(n) => q.before_seq = Some(n),
                    None => break,
                }
            }
            assert_eq!(got, want, "subject {s}");
        }
        let mut q = Query {
            client: Some("c1".into()),
            limit: 7,
            ..Query::default()
        };
        let mut got = Vec::new();
        loop {
            let page = store.query(q.clone()).await.unwrap();
            got.extend(page.records.iter().map(|r| r.seq));
            match page.next {
                Some(n) => q.before_seq = Some(n),
                None => break,
            }
        }
        let want: Vec<u64> = (1..=61u64).rev().filter(|i| i % 2 == 1).collect();
        assert_eq!(got, want);
        let page = store
            .query(Query {
                service: Some("s".into()),
                limit: 1000,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(page.records.len(), 61);
        for r in [0u64, 7, 13, 20] {
            let rows = store.by_request(format!("req-{r}")).await.unwrap();
            let want: Vec<u64> = (1..=61u64).filter(|i| i / 3 == r).collect();
            let got: Vec<u64> = rows.iter().map(|r| r.seq).collect();
            assert_eq!(got, want, "request {r}");
        }
        // Reopened, the index resumes where it stopped.
        let upto = store.keys_indexed();
        drop(store);
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        assert_eq!(store.keys_indexed(), upto);
    }

    /// Blocks of the key index ride in the records' transaction, under a
    /// savepoint: when they cannot be written, the records still are, and
    /// the run is written once it can be.
    #[tokio::test]
    async fn records_go_in_when_the_key_index_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        store.set_key_chunk(4);
        let key = PseudonymKey::random().unwrap();
        let other = connect(&db_path(dir.path())).unwrap();
        other.execute_batch("DROP TABLE audit_key_blocks").unwrap();
        append_each(&store, &key, 1..=12).await;
        assert_eq!(store.keys_indexed(), 0);
        let records = store.read_all_blocking().unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=12).collect::<Vec<_>>()
        );
        other.execute_batch(keys::SCHEMA).unwrap();
        append_each(&store, &key, 13..=16).await;
        assert!(store.keys_indexed() >= 4, "{}", store.keys_indexed());
        let rows = store.by_request("req-1".into()).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
    }
}
