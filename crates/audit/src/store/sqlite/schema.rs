//! The embedded store's tables, and the columns a store made before them
//! gets on open.

use rusqlite::Connection;

use crate::store::COLUMNS;

pub(super) const SCHEMA: &str = "
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

pub(super) const CHECKPOINT_COLUMNS: &str =
    "seq, head, root, at_ms, node, key_id, cert_der, signature, frontier";

/// The statement that inserts one record (built once: the writer looks it up
/// in its statement cache at every append).
pub(super) fn insert_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let marks: Vec<String> = (1..=28).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO audit_records ({COLUMNS}) VALUES ({})",
            marks.join(", ")
        )
    });
    &SQL
}

/// Columns added after the first schema, with their types: a store made
/// before them gets them on open (empty in its old records, which keep
/// their first canonical form; see `record.rs`).
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("query_group", "TEXT"),
    ("hidden_until_ms", "INTEGER"),
    ("hidden_reason", "TEXT"),
];

pub(super) fn add_missing_columns(conn: &Connection) -> Result<(), rusqlite::Error> {
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
