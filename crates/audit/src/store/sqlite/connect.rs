//! Connections to the database file, with the store's settings, and the
//! writer's transaction.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// Durability and cache settings of every connection. `synchronous=FULL`
/// makes each commit durable; a larger WAL before it is folded back into the
/// database file lets repeated writes of the same pages (the last pages of
/// the table and its indexes) be folded once. A reader's page cache is
/// 16 MiB: queries and `verify` read each page about once, so a larger one
/// would only add to the server's memory, once per reader.
const PRAGMAS: &str = "PRAGMA synchronous=FULL; PRAGMA cache_size=-16384; PRAGMA temp_store=MEMORY; PRAGMA wal_autocheckpoint=10000; PRAGMA journal_size_limit=134217728;";

/// The page cache of the writer and of the upkeep thread: 2 MiB. The writer
/// only appends, touching the last pages of the table and its indexes (a
/// large cache costs a scan of it at every commit); the upkeep thread reads
/// each chunk of the key index once. Both caches fill up with pages read or
/// written once and never again, so a larger one only costs the server
/// memory.
const SMALL_CACHE: &str = "PRAGMA cache_size=-2048;";

/// A connection with the [`SMALL_CACHE`]: the writer's and the upkeep thread's.
pub(super) fn connect_small_cache(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = connect(path)?;
    conn.execute_batch(SMALL_CACHE)?;
    Ok(conn)
}

pub(super) fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
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

/// Runs one of the writer's fixed statements (`BEGIN`, `COMMIT`, a
/// `PRAGMA`...) from the statement cache: parsing it anew at every append
/// cost the writer more than inserting the record.
fn run_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.raw_execute().map(drop)
}

/// The writer's transaction: `BEGIN IMMEDIATE` to `COMMIT`, rolled back if
/// dropped before it commits.
pub(super) struct WriteTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> WriteTx<'c> {
    pub(super) fn begin(conn: &'c Connection) -> Result<Self, rusqlite::Error> {
        run_cached(conn, "BEGIN IMMEDIATE")?;
        Ok(Self { conn, open: true })
    }

    pub(super) fn commit(mut self) -> Result<(), rusqlite::Error> {
        run_cached(self.conn, "COMMIT")?;
        self.open = false;
        Ok(())
    }

    /// Runs `f` within a savepoint: what it wrote is undone if it fails,
    /// and the transaction goes on either way.
    pub(super) fn within_savepoint(
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
