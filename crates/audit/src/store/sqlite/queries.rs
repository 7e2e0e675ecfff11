//! Reading records and checkpoints: the row mapping, and queries through the
//! key index.

use rusqlite::{
    Connection, OptionalExtension,
    types::{ToSqlOutput, Value, ValueRef},
};

use super::{keys, read_err};
use crate::{
    AuditError,
    checkpoint::Checkpoint,
    record::{Link, StoredRecord},
    store::{
        COLUMNS, Conditions, Query, RowReader, RowWriter, SqlValue, StoredCheckpoint, lossy_hash,
        read_record, seq_from_db, seq_to_db,
    },
};

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

pub(super) fn records(
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

pub(super) fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
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

/// A query through the key index when it names a request id, subject,
/// client or service: the unindexed tail first (newest), then the runs, in
/// one read transaction. Other queries go straight to the table.
pub(super) fn query_keyed(
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

pub(super) fn head_of(conn: &Connection) -> Result<Option<Link>, rusqlite::Error> {
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
