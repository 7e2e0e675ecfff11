//! The PostgreSQL consent store, for production and for several nodes sharing
//! one store.
//!
//! A revocation takes the grant's row `FOR UPDATE` and the one-row
//! `consent_head` table's counter in the same transaction, so sequence numbers
//! are handed out in commit order whichever node revokes (the feed never
//! skips a revocation committed late). A use is counted by one
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE used < max`, atomic under
//! PostgreSQL's row lock. Commits are durable when they return
//! (`synchronous_commit` must stay `on`). One connection, reopened if it
//! closed; TLS to the database is not implemented yet, as for the audit store.

use futures_util::future::BoxFuture;
use tokio_postgres::{Client, NoTls, Row};

use super::{
    ConsentStore, GRANT_COLUMNS, GrantRow, Revocation, RevokeOutcome, StoreError, UseOutcome,
    seq_from_db, seq_to_db, used_from_db,
};
use crate::grant::Grant;
use kopir_core::config::redacted_url;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consent_grants (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    client TEXT NOT NULL,
    service TEXT NOT NULL,
    methods TEXT NOT NULL,
    purpose TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    max_uses BIGINT,
    granted_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE INDEX IF NOT EXISTS consent_grants_subject ON consent_grants(subject, granted_at_ms);
CREATE TABLE IF NOT EXISTS consent_revocations (
    seq BIGINT PRIMARY KEY,
    consent_id TEXT NOT NULL UNIQUE,
    revoked_at_ms BIGINT NOT NULL,
    not_after BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO consent_head (id, seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS consent_uses (
    consent_id TEXT PRIMARY KEY,
    used BIGINT NOT NULL,
    not_after BIGINT NOT NULL
);
";

/// Advisory lock key that serialises schema creation by several nodes.
const SCHEMA_LOCK: i64 = 0x6b6f_7069_7263_6f6e; // "kopircon"

/// The PostgreSQL consent store.
pub(crate) struct PostgresConsentStore {
    url: String,
    client: tokio::sync::Mutex<Client>,
}

impl std::fmt::Debug for PostgresConsentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConsentStore")
            .field("url", &redacted_url(&self.url))
            .finish_non_exhaustive()
    }
}

fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("postgres: {}: {}", db.code().code(), db.message()),
        None => format!("postgres: {e}"),
    }
}

fn read_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Read(describe_error(&e))
}

fn write_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Write(describe_error(&e))
}

async fn connect_client(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "consent database connection closed");
        }
    });
    Ok(client)
}

fn grant_row(r: &Row) -> Result<GrantRow, tokio_postgres::Error> {
    Ok(GrantRow {
        id: r.try_get(0)?,
        subject: r.try_get(1)?,
        client: r.try_get(2)?,
        service: r.try_get(3)?,
        methods: r.try_get(4)?,
        purpose: r.try_get(5)?,
        not_before: r.try_get(6)?,
        not_after: r.try_get(7)?,
        max_uses: r.try_get(8)?,
        granted_at_ms: r.try_get(9)?,
        revoked_at_ms: r.try_get(10)?,
    })
}

fn revocation_row(r: &Row) -> Result<Revocation, tokio_postgres::Error> {
    Ok(Revocation {
        seq: seq_from_db(r.try_get(0)?),
        consent_id: r.try_get(1)?,
        revoked_at_ms: r.try_get(2)?,
        not_after: r.try_get(3)?,
    })
}

impl PostgresConsentStore {
    /// Connects to `url` and creates the tables if they are missing.
    pub(crate) async fn connect(url: &str) -> Result<Self, StoreError> {
        let open = |e: tokio_postgres::Error| {
            StoreError::Open(format!("{}: {}", redacted_url(url), describe_error(&e)))
        };
        let mut client = connect_client(url).await.map_err(open)?;
        let tx = client.transaction().await.map_err(open)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(open)?;
        tx.batch_execute(SCHEMA).await.map_err(open)?;
        tx.commit().await.map_err(open)?;
        Ok(Self {
            url: url.to_owned(),
            client: tokio::sync::Mutex::new(client),
        })
    }

    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if guard.is_closed() {
            *guard = connect_client(&self.url).await.map_err(write_err)?;
        }
        Ok(guard)
    }
}

async fn get_grant(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
    lock: bool,
) -> Result<Option<Grant>, StoreError> {
    let sql = format!(
        "SELECT {GRANT_COLUMNS} FROM consent_grants WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    client
        .query_opt(&sql, &[&id])
        .await
        .map_err(read_err)?
        .map(|r| grant_row(&r).map_err(read_err)?.into_grant())
        .transpose()
}

impl ConsentStore for PostgresConsentStore {
    fn describe(&self) -> String {
        redacted_url(&self.url)
    }

    fn insert(&self, grant: Grant) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let r = GrantRow::of(&grant);
            let client = self.client().await?;
            let inserted = client
                .execute(
                    &format!(
                        "INSERT INTO consent_grants ({GRANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING"
                    ),
                    &[
                        &r.id,
                        &r.subject,
                        &r.client,
                        &r.service,
                        &r.methods,
                        &r.purpose,
                        &r.not_before,
                        &r.not_after,
                        &r.max_uses,
                        &r.granted_at_ms,
                        &r.revoked_at_ms,
                    ],
                )
                .await
                .map_err(write_err)?;
            if inserted == 0 {
                return Err(StoreError::Duplicate(r.id));
            }
            Ok(())
        })
    }

    fn get(&self, id: String) -> BoxFuture<'_, Result<Option<Grant>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            get_grant(&*client, &id, false).await
        })
    }

    fn of_subject(&self, subject: String) -> BoxFuture<'_, Result<Vec<Grant>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {GRANT_COLUMNS} FROM consent_grants WHERE subject = $1 ORDER BY granted_at_ms DESC, id"
                    ),
                    &[&subject],
                )
                .await
                .map_err(read_err)?;
            rows.iter()
                .map(|r| grant_row(r).map_err(read_err)?.into_grant())
                .collect()
        })
    }

    fn revoke(
        &self,
        id: String,
        subject: String,
        at_ms: i64,
    ) -> BoxFuture<'_, Result<RevokeOutcome, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(write_err)?;
            let Some(mut grant) = get_grant(&tx, &id, true).await? else {
                return Ok(RevokeOutcome::NotFound);
            };
            if grant.subject.to_string() != subject {
                return Ok(RevokeOutcome::NotFound);
            }
            if let Some(row) = tx
                .query_opt(
                    "SELECT seq, consent_id, revoked_at_ms, not_after FROM consent_revocations WHERE consent_id = $1",
                    &[&id],
                )
                .await
                .map_err(read_err)?
            {
                let rev = revocation_row(&row).map_err(read_err)?;
                return Ok(RevokeOutcome::AlreadyRevoked(grant, rev));
            }
            let seq: i64 = tx
                .query_one(
                    "UPDATE consent_head SET seq = seq + 1 WHERE id = 1 RETURNING seq",
                    &[],
                )
                .await
                .map_err(write_err)?
                .try_get(0)
                .map_err(write_err)?;
            tx.execute(
                "INSERT INTO consent_revocations (seq, consent_id, revoked_at_ms, not_after) VALUES ($1, $2, $3, $4)",
                &[&seq, &id, &at_ms, &grant.not_after],
            )
            .await
            .map_err(write_err)?;
            tx.execute(
                "UPDATE consent_grants SET revoked_at_ms = $2 WHERE id = $1",
                &[&id, &at_ms],
            )
            .await
            .map_err(write_err)?;
            tx.commit().await.map_err(write_err)?;
            grant.revoked_at_ms = Some(at_ms);
            let rev = Revocation {
                seq: seq_from_db(seq),
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
        Box::pin(async move {
            let client = self.client().await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT seq, consent_id, revoked_at_ms, not_after FROM consent_revocations WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&seq_to_db(since), &limit],
                )
                .await
                .map_err(read_err)?;
            rows.iter()
                .map(|r| revocation_row(r).map_err(read_err))
                .collect()
        })
    }

    fn consume_use(
        &self,
        id: String,
        max: u32,
        not_after: i64,
    ) -> BoxFuture<'_, Result<UseOutcome, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let max = i64::from(max);
            let counted = client
                .query_opt(
                    "INSERT INTO consent_uses (consent_id, used, not_after) SELECT $1, 1, $3 WHERE $2::BIGINT >= 1
                     ON CONFLICT (consent_id) DO UPDATE SET used = consent_uses.used + 1 WHERE consent_uses.used < $2::BIGINT
                     RETURNING used",
                    &[&id, &max, &not_after],
                )
                .await
                .map_err(write_err)?;
            if let Some(row) = counted {
                let used: i64 = row.try_get(0).map_err(read_err)?;
                return Ok(UseOutcome::Counted {
                    used: used_from_db(used),
                });
            }
            let used: Option<i64> = client
                .query_opt(
                    "SELECT used FROM consent_uses WHERE consent_id = $1",
                    &[&id],
                )
                .await
                .map_err(read_err)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(read_err)?;
            Ok(UseOutcome::Exhausted {
                used: used_from_db(used.unwrap_or(0)),
            })
        })
    }
}
