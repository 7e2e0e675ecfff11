//! The PostgreSQL store, for production and for several server nodes of one
//! member sharing one log.
//!
//! Appends run in one transaction that first takes the one-row `audit_head`
//! table `FOR UPDATE`: appends from every node are serialised on that row, so
//! the chain is one sequence in commit order however many nodes write, and a
//! failed transaction leaves the head untouched. A batch is inserted with one
//! `INSERT ... SELECT FROM UNNEST(...)` statement; the commit is durable when it
//! returns (the server's `synchronous_commit` must stay `on`, its default).
//! Every record names the node that wrote it; nodes must share the pseudonym
//! key file.
//!
//! Connections are plain TCP or a Unix socket (`host=/run/postgresql`); TLS to
//! the database is not implemented yet. A connection that was closed (the
//! database restarted) is reopened on next use.

use kopir_core::config::redacted_url;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio_postgres::{Client, NoTls, Row, types::ToSql};

use super::{
    AuditStore, COLUMNS, Commit, Conditions, Page, Query, RowReader, RowWriter, Scanned, SqlValue,
    StoredCheckpoint, lossy_hash, read_record, read_row, seq_from_db, seq_to_db, write_row,
};
use crate::{
    AuditError,
    checkpoint::Checkpoint,
    record::{Entry, GENESIS, Hash, Link, StoredRecord, chain},
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_records (
    seq BIGINT PRIMARY KEY,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL,
    node TEXT NOT NULL,
    request_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    side TEXT NOT NULL,
    step TEXT NOT NULL,
    client TEXT NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    purpose TEXT NOT NULL,
    subject BYTEA,
    basis TEXT,
    user_id TEXT,
    peer TEXT,
    status INTEGER NOT NULL,
    reason TEXT,
    message TEXT,
    body_sha256 BYTEA,
    request_hash BYTEA,
    signature BYTEA,
    signer_key BYTEA,
    signed_hash BYTEA,
    body BYTEA,
    query_group TEXT,
    hidden_until_ms BIGINT,
    hidden_reason TEXT
);
ALTER TABLE audit_records ADD COLUMN IF NOT EXISTS query_group TEXT;
ALTER TABLE audit_records ADD COLUMN IF NOT EXISTS hidden_until_ms BIGINT;
ALTER TABLE audit_records ADD COLUMN IF NOT EXISTS hidden_reason TEXT;
CREATE INDEX IF NOT EXISTS audit_records_request ON audit_records(request_id);
CREATE INDEX IF NOT EXISTS audit_records_subject ON audit_records(subject, seq);
CREATE INDEX IF NOT EXISTS audit_records_client ON audit_records(client, seq);
CREATE INDEX IF NOT EXISTS audit_records_service ON audit_records(service, seq);
CREATE INDEX IF NOT EXISTS audit_records_at ON audit_records(at_ms);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id BIGSERIAL PRIMARY KEY,
    seq BIGINT NOT NULL,
    head BYTEA NOT NULL,
    root BYTEA NOT NULL,
    at_ms BIGINT NOT NULL,
    node TEXT NOT NULL,
    key_id BYTEA NOT NULL,
    cert_der BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    frontier BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_seq ON audit_checkpoints(seq);
";

/// Advisory lock key that serialises schema creation by several nodes.
const SCHEMA_LOCK: i64 = 0x6b6f_7069_7261_7564; // "kopiraud"

const INSERT: &str = "INSERT INTO audit_records (seq, prev_hash, hash, node, request_id, at_ms, side, step, client, service, method, purpose, subject, basis, user_id, peer, status, reason, message, body_sha256, request_hash, signature, signer_key, signed_hash, body, query_group, hidden_until_ms, hidden_reason)
SELECT * FROM UNNEST($1::int8[], $2::bytea[], $3::bytea[], $4::text[], $5::text[], $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[], $14::text[], $15::text[], $16::text[], $17::int4[], $18::text[], $19::text[], $20::bytea[], $21::bytea[], $22::bytea[], $23::bytea[], $24::bytea[], $25::bytea[], $26::text[], $27::int8[], $28::text[])";

const CHECKPOINT_COLUMNS: &str =
    "seq, head, root, at_ms, node, key_id, cert_der, signature, frontier";

/// The PostgreSQL store.
pub struct PostgresStore {
    url: String,
    writer: tokio::sync::Mutex<Client>,
    reader: Mutex<Arc<Client>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &redacted_url(&self.url))
            .finish_non_exhaustive()
    }
}

async fn connect_client(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "audit database connection closed");
        }
    });
    Ok(client)
}

fn read_err(e: tokio_postgres::Error) -> AuditError {
    AuditError::Read(format!("postgres: {}", describe_error(&e)))
}

fn write_err(e: tokio_postgres::Error) -> AuditError {
    AuditError::Write(format!("postgres: {}", describe_error(&e)))
}

fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db` or `host=... dbname=...`)
    /// and creates the tables if they are missing.
    pub async fn connect(url: &str) -> Result<Self, AuditError> {
        let open = |e: tokio_postgres::Error| {
            AuditError::Open(format!("{}: {}", redacted_url(url), describe_error(&e)))
        };
        let mut writer = connect_client(url).await.map_err(open)?;
        let tx = writer.transaction().await.map_err(open)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(open)?;
        tx.batch_execute(SCHEMA).await.map_err(open)?;
        tx.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING",
            &[&&GENESIS[..]],
        )
        .await
        .map_err(open)?;
        tx.commit().await.map_err(open)?;
        let reader = connect_client(url).await.map_err(open)?;
        Ok(Self {
            url: url.to_owned(),
            writer: tokio::sync::Mutex::new(writer),
            reader: Mutex::new(Arc::new(reader)),
        })
    }

    async fn reader(&self) -> Result<Arc<Client>, AuditError> {
        let current = self
            .reader
            .lock()
            .map_err(|_| AuditError::Read("reader poisoned".into()))?
            .clone();
        if !current.is_closed() {
            return Ok(current);
        }
        let fresh = Arc::new(connect_client(&self.url).await.map_err(read_err)?);
        if let Ok(mut slot) = self.reader.lock() {
            *slot = fresh.clone();
        }
        Ok(fresh)
    }

    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, AuditError> {
        let mut guard = self.writer.lock().await;
        if guard.is_closed() {
            *guard = connect_client(&self.url).await.map_err(write_err)?;
        }
        Ok(guard)
    }

    async fn append_inner(
        &self,
        entries: Vec<Entry>,
        commit: Commit,
    ) -> Result<Vec<Link>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.writer().await?;
        let tx = client.transaction().await.map_err(write_err)?;
        // A written commit is asynchronous: the next synchronous commit waits
        // for the WAL to be flushed up to itself, which covers this one. The
        // setting goes in the same round trip as the head's lock.
        let asynchronous = async {
            match commit {
                Commit::Written => tx.batch_execute("SET LOCAL synchronous_commit = off").await,
                Commit::Durable => Ok(()),
            }
        };
        let head = tx.query_one(
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        );
        let (asynchronous, head) = tokio::join!(asynchronous, head);
        asynchronous.map_err(write_err)?;
        let head = head.map_err(write_err)?;
        let head_seq: i64 = head.try_get(0).map_err(write_err)?;
        let head_hash: Vec<u8> = head.try_get(1).map_err(write_err)?;
        let head = (head_seq > 0).then(|| Link {
            seq: seq_from_db(head_seq),
            hash: lossy_hash(&head_hash),
        });
        let chained = chain(head, &entries);
        let mut columns = ColumnArrays::default();
        for ((seq, prev, hash), entry) in chained.iter().zip(&entries) {
            write_row((*seq, prev, hash), entry, &mut columns);
            columns.next_row();
        }
        tx.execute(INSERT, &columns.params())
            .await
            .map_err(write_err)?;
        let last = chained.last().map(|c| (seq_to_db(c.0), c.2));
        if let Some((seq, hash)) = last {
            tx.execute(
                "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
                &[&seq, &&hash[..]],
            )
            .await
            .map_err(write_err)?;
        }
        tx.commit().await.map_err(write_err)?;
        Ok(chained
            .into_iter()
            .map(|(seq, _, hash)| Link { seq, hash })
            .collect())
    }

    async fn records(&self, sql: &str, values: &[SqlValue]) -> Result<Vec<Row>, AuditError> {
        let boxed: Vec<Box<dyn ToSql + Sync + Send>> = values
            .iter()
            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                match v {
                    SqlValue::Text(s) => Box::new(s.clone()),
                    SqlValue::Int(i) => Box::new(*i),
                    SqlValue::Int4(i) => Box::new(*i),
                    SqlValue::Bytes(b) => Box::new(b.clone()),
                }
            })
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> = boxed
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.reader()
            .await?
            .query(sql, &params)
            .await
            .map_err(read_err)
    }
}

fn row_err(e: tokio_postgres::Error) -> AuditError {
    AuditError::Read(format!("postgres row: {e}"))
}

impl RowReader for Row {
    fn text(&self, i: usize) -> Result<String, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn int(&self, i: usize) -> Result<i64, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, AuditError> {
        self.try_get(i).map_err(row_err)
    }
    fn int4(&self, i: usize) -> Result<i32, AuditError> {
        self.try_get(i).map_err(row_err)
    }
}

/// The rows of one append as one array per column, the parameters of
/// [`INSERT`]'s `UNNEST` (one statement for the whole batch).
#[derive(Default)]
struct ColumnArrays<'a> {
    columns: Vec<Column<'a>>,
    /// The column the next value of the current row goes to.
    at: usize,
}

/// One column's values, in the type of its `UNNEST` array.
enum Column<'a> {
    Int(Vec<Option<i64>>),
    Int4(Vec<i32>),
    Text(Vec<Option<&'a str>>),
    Bytes(Vec<Option<&'a [u8]>>),
}

impl<'a> ColumnArrays<'a> {
    /// The column for the next value: made by `new` in the first row.
    fn column(&mut self, new: fn() -> Column<'a>) -> &mut Column<'a> {
        if self.at == self.columns.len() {
            self.columns.push(new());
        }
        self.at += 1;
        &mut self.columns[self.at - 1]
    }

    fn next_row(&mut self) {
        self.at = 0;
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.columns
            .iter()
            .map(|c| -> &(dyn ToSql + Sync) {
                match c {
                    Column::Int(v) => v,
                    Column::Int4(v) => v,
                    Column::Text(v) => v,
                    Column::Bytes(v) => v,
                }
            })
            .collect()
    }
}

// `write_row` writes the same kinds in the same order for every row, so a
// column of another kind than its first row's cannot happen.
impl<'a> RowWriter<'a> for ColumnArrays<'a> {
    fn int(&mut self, v: Option<i64>) {
        match self.column(|| Column::Int(Vec::new())) {
            Column::Int(c) => c.push(v),
            _ => unreachable!("column kinds follow write_row"),
        }
    }
    fn int4(&mut self, v: i32) {
        match self.column(|| Column::Int4(Vec::new())) {
            Column::Int4(c) => c.push(v),
            _ => unreachable!("column kinds follow write_row"),
        }
    }
    fn text(&mut self, v: Option<&'a str>) {
        match self.column(|| Column::Text(Vec::new())) {
            Column::Text(c) => c.push(v),
            _ => unreachable!("column kinds follow write_row"),
        }
    }
    fn bytes(&mut self, v: Option<&'a [u8]>) {
        match self.column(|| Column::Bytes(Vec::new())) {
            Column::Bytes(c) => c.push(v),
            _ => unreachable!("column kinds follow write_row"),
        }
    }
}

fn checkpoint_row(r: &Row) -> Result<StoredCheckpoint, AuditError> {
    let head: Vec<u8> = r.try_get(1).map_err(row_err)?;
    let root: Vec<u8> = r.try_get(2).map_err(row_err)?;
    let key_id: Vec<u8> = r.try_get(5).map_err(row_err)?;
    Ok(StoredCheckpoint {
        checkpoint: Checkpoint {
            seq: seq_from_db(r.try_get(0).map_err(row_err)?),
            head: lossy_hash(&head),
            root: lossy_hash(&root),
            at_ms: r.try_get(3).map_err(row_err)?,
            node: r.try_get(4).map_err(row_err)?,
            key_id: lossy_hash(&key_id),
            cert_der: r.try_get(6).map_err(row_err)?,
            signature: r.try_get(7).map_err(row_err)?,
        },
        frontier: r.try_get(8).map_err(row_err)?,
    })
}

impl AuditStore for PostgresStore {
    fn describe(&self) -> String {
        redacted_url(&self.url)
    }

    fn append(
        &self,
        entries: Vec<Entry>,
        commit: Commit,
    ) -> BoxFuture<'_, Result<Vec<Link>, AuditError>> {
        Box::pin(self.append_inner(entries, commit))
    }

    fn head(&self) -> BoxFuture<'_, Result<Option<Link>, AuditError>> {
        Box::pin(async move {
            let row = self
                .reader()
                .await?
                .query_opt(
                    "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1",
                    &[],
                )
                .await
                .map_err(read_err)?;
            row.map(|r| {
                let seq: i64 = r.try_get(0).map_err(read_err)?;
                let hash: Vec<u8> = r.try_get(1).map_err(read_err)?;
                Ok(Link {
                    seq: seq_from_db(seq),
                    hash: lossy_hash(&hash),
                })
            })
            .transpose()
        })
    }

    fn scan(&self, from: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Scanned>, AuditError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {COLUMNS} FROM audit_records WHERE seq >= $1 ORDER BY seq LIMIT {limit}"
            );
            let rows = self
                .records(&sql, &[SqlValue::Int(seq_to_db(from))])
                .await?;
            rows.iter().map(read_row).collect()
        })
    }

    fn hashes(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<(u64, Hash)>, AuditError>> {
        Box::pin(async move {
            let rows = self
                .reader()
                .await?
                .query(
                    "SELECT seq, hash FROM audit_records WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
                    &[&seq_to_db(from), &seq_to_db(to)],
                )
                .await
                .map_err(read_err)?;
            rows.iter()
                .map(|r| {
                    let seq: i64 = r.try_get(0).map_err(read_err)?;
                    let hash: Vec<u8> = r.try_get(1).map_err(read_err)?;
                    Ok((seq_from_db(seq), lossy_hash(&hash)))
                })
                .collect()
        })
    }

    fn query(&self, query: Query) -> BoxFuture<'_, Result<Page, AuditError>> {
        Box::pin(async move {
            let limit = query.page_size();
            let c = Conditions::of(&query, |n| format!("${n}"));
            let sql = format!(
                "SELECT {COLUMNS} FROM audit_records {} ORDER BY seq DESC LIMIT {limit}",
                c.where_clause()
            );
            let rows = self.records(&sql, &c.values).await?;
            let records = rows
                .iter()
                .map(read_record)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page::from_rows(records, limit))
        })
    }

    fn by_request(
        &self,
        request_id: String,
    ) -> BoxFuture<'_, Result<Vec<StoredRecord>, AuditError>> {
        Box::pin(async move {
            let sql =
                format!("SELECT {COLUMNS} FROM audit_records WHERE request_id = $1 ORDER BY seq");
            self.records(&sql, &[SqlValue::Text(request_id)])
                .await?
                .iter()
                .map(read_record)
                .collect()
        })
    }

    fn seq_range(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> BoxFuture<'_, Result<Option<(u64, u64)>, AuditError>> {
        Box::pin(async move {
            let row = self
                .reader()
                .await?
                .query_one(
                    "SELECT MIN(seq), MAX(seq) FROM audit_records WHERE at_ms >= $1 AND at_ms < $2",
                    &[&from_ms, &to_ms],
                )
                .await
                .map_err(read_err)?;
            let lo: Option<i64> = row.try_get(0).map_err(read_err)?;
            let hi: Option<i64> = row.try_get(1).map_err(read_err)?;
            Ok(lo.zip(hi).map(|(a, b)| (seq_from_db(a), seq_from_db(b))))
        })
    }

    fn put_checkpoint(&self, cp: StoredCheckpoint) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move {
            let c = &cp.checkpoint;
            let client = self.writer().await?;
            client
                .execute(
                    &format!(
                        "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    ),
                    &[
                        &seq_to_db(c.seq),
                        &&c.head[..],
                        &&c.root[..],
                        &c.at_ms,
                        &c.node,
                        &&c.key_id[..],
                        &c.cert_der,
                        &c.signature,
                        &cp.frontier,
                    ],
                )
                .await
                .map_err(write_err)?;
            Ok(())
        })
    }

    fn checkpoints(&self) -> BoxFuture<'_, Result<Vec<Checkpoint>, AuditError>> {
        Box::pin(async move {
            let rows = self
                .reader()
                .await?
                .query(
                    &format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq, id"),
                    &[],
                )
                .await
                .map_err(read_err)?;
            rows.iter()
                .map(|r| checkpoint_row(r).map(|c| c.checkpoint))
                .collect()
        })
    }

    fn latest_checkpoint(&self) -> BoxFuture<'_, Result<Option<StoredCheckpoint>, AuditError>> {
        Box::pin(async move {
            let row = self
                .reader()
                .await?
                .query_opt(
                    &format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC, id DESC LIMIT 1"
                    ),
                    &[],
                )
                .await
                .map_err(read_err)?;
            row.as_ref().map(checkpoint_row).transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    /// A store made before the report columns existed gains them on connect.
    #[tokio::test]
    async fn an_older_store_gains_the_report_columns() {
        use super::{AuditStore, Commit, PostgresStore, SCHEMA, connect_client};
        use crate::{Side, Step, record::Entry};
        use kopir_pgtest::TempPostgres;
        let pg = TempPostgres::shared().unwrap();
        let url = pg.create_database().await.unwrap();
        let old_schema: String = SCHEMA
            .replace(
                "body BYTEA,\n    query_group TEXT,\n    hidden_until_ms BIGINT,\n    hidden_reason TEXT\n",
                "body BYTEA\n",
            )
            .lines()
            .filter(|l| !l.starts_with("ALTER TABLE"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!old_schema.contains("query_group"));
        connect_client(&url)
            .await
            .unwrap()
            .batch_execute(&old_schema)
            .await
            .unwrap();
        let store = PostgresStore::connect(&url).await.unwrap();
        let entry = Entry {
            request_id: "r".into(),
            at_ms: 1,
            client: "c".into(),
            service: "s".into(),
            method: "/p.S/M".into(),
            purpose: "p".into(),
            subject: Some([1; 32]),
            query_group: Some("g".into()),
            hidden_until_ms: Some(5),
            hidden_reason: Some("why".into()),
            ..Entry::bare("n", Side::Provider, Step::Accepted)
        };
        store
            .append(vec![entry.clone()], Commit::Durable)
            .await
            .unwrap();
        let back = store.by_request("r".into()).await.unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].entry, entry);
        assert_eq!(back[0].recompute(), back[0].hash);
    }
}
