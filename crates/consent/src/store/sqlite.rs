//! The embedded consent store: SQLite at `<data_dir>/consent.db`, WAL mode with
//! `synchronous=FULL`. One connection serves every call, each on a blocking
//! thread; consent traffic is small (a grant or revocation is a person's
//! action, a use is one row update) and a single writer keeps revocation
//! sequence numbers in commit order.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    ConsentStore, GRANT_COLUMNS, GrantRow, Revocation, RevokeOutcome, StoreError, UseOutcome,
    seq_from_db, seq_to_db, used_from_db,
};
use crate::grant::Grant;

/// The file name of the embedded store under the data directory.
pub(crate) const DB_FILE: &str = "consent.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consent_grants (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    client TEXT NOT NULL,
    service TEXT NOT NULL,
    methods TEXT NOT NULL,
    purpose TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    max_uses INTEGER,
    granted_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS consent_grants_subject ON consent_grants(subject, granted_at_ms);
CREATE TABLE IF NOT EXISTS consent_revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    consent_id TEXT NOT NULL UNIQUE,
    revoked_at_ms INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_uses (
    consent_id TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
";

/// The embedded SQLite consent store.
#[derive(Clone)]
pub(crate) struct SqliteConsentStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteConsentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteConsentStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read_err(e: rusqlite::Error) -> StoreError {
    StoreError::Read(format!("sqlite: {e}"))
}

fn write_err(e: rusqlite::Error) -> StoreError {
    StoreError::Write(format!("sqlite: {e}"))
}

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRow> {
    Ok(GrantRow {
        id: r.get(0)?,
        subject: r.get(1)?,
        client: r.get(2)?,
        service: r.get(3)?,
        methods: r.get(4)?,
        purpose: r.get(5)?,
        not_before: r.get(6)?,
        not_after: r.get(7)?,
        max_uses: r.get(8)?,
        granted_at_ms: r.get(9)?,
        revoked_at_ms: r.get(10)?,
    })
}

fn revocation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Revocation> {
    Ok(Revocation {
        seq: seq_from_db(r.get(0)?),
        consent_id: r.get(1)?,
        revoked_at_ms: r.get(2)?,
        not_after: r.get(3)?,
    })
}

impl SqliteConsentStore {
    /// Opens (creating if needed) `<data_dir>/consent.db`.
    pub(crate) async fn open_in(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Open(format!("cannot create {}: {e}", data_dir.display())))?;
        Self::open(&data_dir.join(DB_FILE)).await
    }

    /// Opens (creating if needed) the database file at `path`.
    pub(crate) async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || {
            let open = |e: rusqlite::Error| StoreError::Open(format!("{}: {e}", p.display()));
            let conn = Connection::open(&p).map_err(open)?;
            conn.busy_timeout(std::time::Duration::from_secs(30))
                .map_err(open)?;
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(open)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Open(format!(
                    "{}: journal_mode is {mode}, not wal",
                    p.display()
                )));
            }
            conn.execute_batch("PRAGMA synchronous=FULL;")
                .map_err(open)?;
            conn.execute_batch(SCHEMA).map_err(open)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Open(format!("open task failed: {e}")))??;
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on a blocking thread.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = conn
                    .lock()
                    .map_err(|_| StoreError::Write("connection lock poisoned".into()))?;
                f(&mut conn)
            })
            .await
            .map_err(|e| StoreError::Write(format!("store task failed: {e}")))?
        })
    }
}

fn get_grant(conn: &Connection, id: &str) -> Result<Option<Grant>, StoreError> {
    conn.query_row(
        &format!("SELECT {GRANT_COLUMNS} FROM consent_grants WHERE id = ?1"),
        [id],
        grant_row,
    )
    .optional()
    .map_err(read_err)?
    .map(GrantRow::into_grant)
    .transpose()
}

impl ConsentStore for SqliteConsentStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn insert(&self, grant: Grant) -> BoxFuture<'_, Result<(), StoreError>> {
        self.run(move |conn| {
            let r = GrantRow::of(&grant);
            let inserted = conn
                .execute(
                    &format!(
                        "INSERT INTO consent_grants ({GRANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT(id) DO NOTHING"
                    ),
                    params![
                        r.id,
                        r.subject,
                        r.client,
                        r.service,
                        r.methods,
                        r.purpose,
                        r.not_before,
                        r.not_after,
                        r.max_uses,
                        r.granted_at_ms,
                        r.revoked_at_ms
                    ],
                )
                .map_err(write_err)?;
            if inserted == 0 {
                return Err(StoreError::Duplicate(r.id));
            }
            Ok(())
        })
    }

    fn get(&self, id: String) -> BoxFuture<'_, Result<Option<Grant>, StoreError>> {
        self.run(move |conn| get_grant(conn, &id))
    }

    fn of_subject(&self, subject: String) -> BoxFuture<'_, Result<Vec<Grant>, StoreError>> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {GRANT_COLUMNS} FROM consent_grants WHERE subject = ?1 ORDER BY granted_at_ms DESC, id"
                ))
                .map_err(read_err)?;
            let rows = stmt
                .query_map([subject], grant_row)
                .map_err(read_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_err)?;
            rows.into_iter().map(GrantRow::into_grant).collect()
        })
    }

    fn revoke(
        &self,
        id: String,
        subject: String,
        at_ms: i64,
    ) -> BoxFuture<'_, Result<RevokeOutcome, StoreError>> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(write_err)?;
            let Some(mut grant) = get_grant(&tx, &id)? else {
                return Ok(RevokeOutcome::NotFound);
            };
            if grant.subject.to_string() != subject {
                return Ok(RevokeOutcome::NotFound);
            }
            let existing = tx
                .query_row(
                    "SELECT seq, consent_id, revoked_at_ms, not_after FROM consent_revocations WHERE consent_id = ?1",
                    [&id],
                    revocation_row,
                )
                .optional()
                .map_err(read_err)?;
            if let Some(rev) = existing {
                return Ok(RevokeOutcome::AlreadyRevoked(grant, rev));
            }
            tx.execute(
                "UPDATE consent_grants SET revoked_at_ms = ?2 WHERE id = ?1",
                params![id, at_ms],
            )
            .map_err(write_err)?;
            tx.execute(
                "INSERT INTO consent_revocations (consent_id, revoked_at_ms, not_after) VALUES (?1, ?2, ?3)",
                params![id, at_ms, grant.not_after],
            )
            .map_err(write_err)?;
            let seq = seq_from_db(tx.last_insert_rowid());
            tx.commit().map_err(write_err)?;
            grant.revoked_at_ms = Some(at_ms);
            let rev = Revocation {
                seq,
                consent_id: id,
                revoked_at_ms: at_ms,
                not_after: grant.not_after,
            };
            Ok(RevokeOutcome::Revoked(grant, rev))
        })
    }

    fn revocations_after(
        &self,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Revocation>, StoreError>> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, consent_id, revoked_at_ms, not_after FROM consent_revocations WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(read_err)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            stmt.query_map(params![seq_to_db(since), limit], revocation_row)
                .map_err(read_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_err)
        })
    }

    fn consume_use(
        &self,
        id: String,
        max: u32,
        not_after: i64,
    ) -> BoxFuture<'_, Result<UseOutcome, StoreError>> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(write_err)?;
            let counted: Option<i64> = tx
                .query_row(
                    "INSERT INTO consent_uses (consent_id, used, not_after) SELECT ?1, 1, ?3 WHERE ?2 >= 1
                     ON CONFLICT(consent_id) DO UPDATE SET used = used + 1 WHERE used < ?2
                     RETURNING used",
                    params![id, i64::from(max), not_after],
                    |r| r.get(0),
                )
                .optional()
                .map_err(write_err)?;
            let outcome = match counted {
                Some(used) => UseOutcome::Counted {
                    used: used_from_db(used),
                },
                None => {
                    let used: Option<i64> = tx
                        .query_row(
                            "SELECT used FROM consent_uses WHERE consent_id = ?1",
                            [&id],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(read_err)?;
                    UseOutcome::Exhausted {
                        used: used_from_db(used.unwrap_or(0)),
                    }
                }
            };
            tx.commit().map_err(write_err)?;
            Ok(outcome)
        })
    }
}
