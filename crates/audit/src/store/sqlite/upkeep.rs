//! The upkeep thread, and the fold that moves the journal's records into
//! SQLite.

use std::{
    path::Path,
    sync::{Mutex, atomic::Ordering},
};

use rusqlite::Connection;

use super::{
    Inner,
    connect::{WriteTx, connect_small_cache},
    journal, keys, lock, relock,
    schema::insert_sql,
    write_err,
};
use crate::{AuditError, store::write_row};

/// How often the upkeep thread folds the journal into SQLite: often enough
/// that each fold is small (about 250 records at 10,000 a second), and that
/// a tool reading the log beside a running server is little behind.
pub(super) const FOLD_EVERY: std::time::Duration = std::time::Duration::from_millis(25);

/// Every this many folds, the upkeep thread also folds the WAL back into the
/// database file (a page written by several folds is copied once).
pub(super) const WAL_FOLD_EVERY: u32 = 10;

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
pub(super) fn upkeep_in_background(path: &Path, store: std::sync::Weak<Inner>) {
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

/// Writes every journaled record into SQLite, one sealed file at a time,
/// each in one transaction (and one sync); the file is reused only after
/// that commit. At most two rounds, so that appends cannot keep a reader
/// waiting: the file sealed before (if a fold of it failed or is under way
/// elsewhere), then the active one, which holds every record appended before
/// this call. Notes in [`Inner::fold_failed`] whether it failed.
pub(super) fn fold(inner: &Inner) -> Result<(), AuditError> {
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
pub(super) fn insert_batch(
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
