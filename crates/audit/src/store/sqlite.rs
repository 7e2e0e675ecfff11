//! The embedded store: SQLite (compiled into kopir) at `<data_dir>/audit.db`,
//! with a record journal beside it (`audit.journal-0` and `-1`).
//!
//! An append goes to the journal ([`journal`]): one write, and for a durable
//! commit one `fdatasync`, however many records the writer task's batch
//! holds. It runs in the blocking pool, or on the writer's own thread for a
//! lone record while that is quick. The upkeep thread ([`upkeep`]) folds the
//! journal into SQLite every [`FOLD_EVERY`](upkeep::FOLD_EVERY), in one
//! transaction per journal file (WAL mode, `synchronous=FULL`, synced with
//! `fdatasync`, see `.cargo/config.toml`), and every read folds first, so
//! queries, `verify` and checkpoints see every record appended. Should SQLite
//! refuse a fold, the records stay in the journal and appends are refused
//! until a fold succeeds ("no audit, no data"); a failed write or sync of the
//! journal refuses appends until the journal has repaired its file (see
//! [`journal`]). Reads use a small pool of their own connections; the same
//! thread folds the WAL back into the database file.
//!
//! One process writes a log at a time (the journal is locked). A second
//! process, such as `kopir audit verify` beside a running server, opens it
//! to read only ([`open`]): it sees what the server has folded, at most about
//! [`FOLD_EVERY`](upkeep::FOLD_EVERY) behind.
//!
//! # Indexes
//!
//! Time is indexed directly: it grows with the log, so an append touches the
//! same last pages of that index. Subject pseudonyms, request ids, clients and
//! services go into a key index of sorted runs instead ([`keys`]).
//!
//! # Parts
//!
//! - this module: the store, its reader pool and its appends;
//! - [`open`]: one store per database file in a process, and opening one;
//! - [`connect`]: connections with the store's settings, and the writer's
//!   transaction;
//! - [`schema`]: the tables, and the columns added since the first schema;
//! - [`upkeep`]: the upkeep thread and the fold into SQLite;
//! - [`queries`]: the row mapping and the queries through the key index;
//! - [`journal`] and [`keys`]: the record journal and the key index.

mod connect;
mod journal;
mod keys;
mod open;
mod queries;
mod schema;
mod upkeep;

pub(crate) use journal::{frame_of, records_in};

use self::{
    connect::connect,
    queries::{checkpoint_row, head_of, query_keyed, records},
    schema::CHECKPOINT_COLUMNS,
    upkeep::fold,
};

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AuditStore, COLUMNS, Commit, Page, Query, Scanned, StoredCheckpoint, lossy_hash, read_row,
    seq_from_db, seq_to_db,
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

impl SqliteStore {
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

#[cfg(test)]
mod tests;
