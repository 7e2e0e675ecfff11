use super::{
    open::IN_USE_WAIT,
    schema::SCHEMA,
    upkeep::{FOLD_EVERY, WAL_FOLD_EVERY},
    *,
};
use crate::{Side, Step, pseudonym::PseudonymKey};

/// Appends the records `seqs` one by one, each durable and then folded
/// into SQLite (by a read) in a transaction of its own.
async fn append_each(store: &SqliteStore, key: &PseudonymKey, seqs: std::ops::RangeInclusive<u64>) {
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
