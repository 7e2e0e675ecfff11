//! The store test suite: every case is a generic function over a
//! [`Backend`], run once against the embedded SQLite store and once against a
//! throwaway PostgreSQL cluster ([`kopir_pgtest::TempPostgres`]). Tampering is
//! done with raw SQL, as an intruder with database access would.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{
    AuditHandle, AuditLog, AuditRecord, Side, Step, WriterOptions,
    export::{Archive, export_range, verify_archive},
    inspect,
    pseudonym::PseudonymKey,
    record::{Entry, Hash, Link, StoredRecord, chain},
    store::{AuditStore, Commit, Query, postgres::PostgresStore, sqlite::SqliteStore},
    verify::{ProblemKind, VerifyOptions, VerifyReport, verify_store},
};
use kopir_core::pki::{Fingerprint, dev::signing_pair, sign::SigningKey};
use kopir_pgtest::TempPostgres;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// One store to test, and raw SQL access to it.
struct Backend {
    kind: Kind,
    _dir: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
    _pg: Option<Arc<TempPostgres>>,
    url: String,
}

impl Backend {
    async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().to_path_buf();
                Self {
                    kind,
                    _dir: Some(dir),
                    path,
                    _pg: None,
                    url: String::new(),
                }
            }
            Kind::Postgres => {
                let pg = TempPostgres::shared().unwrap_or_else(|e| {
                    panic!("the PostgreSQL store tests need PostgreSQL installed: {e}")
                });
                let url = pg.create_database().await.unwrap();
                Self {
                    kind,
                    _dir: None,
                    path: Default::default(),
                    _pg: Some(pg),
                    url,
                }
            }
        }
    }

    async fn store(&self) -> Arc<dyn AuditStore> {
        match self.kind {
            Kind::Sqlite => Arc::new(SqliteStore::open_in(&self.path).await.unwrap()),
            Kind::Postgres => Arc::new(PostgresStore::connect(&self.url).await.unwrap()),
        }
    }

    /// Runs raw SQL (several statements) against the store.
    async fn exec(&self, sql: &str) {
        match self.kind {
            Kind::Sqlite => {
                let conn =
                    rusqlite::Connection::open(super::store::sqlite::db_path(&self.path)).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Kind::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let task = tokio::spawn(conn);
                client.batch_execute(sql).await.unwrap();
                drop(client);
                let _ = task.await;
            }
        }
    }

    /// A byte-string literal in this dialect.
    fn bytes(&self, b: &[u8]) -> String {
        match self.kind {
            Kind::Sqlite => format!("X'{}'", hex::encode(b)),
            Kind::Postgres => format!("'\\x{}'::bytea", hex::encode(b)),
        }
    }

    /// Moves rows with `seq >= from` by `delta` without tripping the primary key.
    async fn shift(&self, from: u64, delta: i64) {
        self.exec(&format!(
            "UPDATE audit_records SET seq = -(seq + ({delta})) WHERE seq >= {from};
             UPDATE audit_records SET seq = -seq WHERE seq < 0;"
        ))
        .await;
    }

    /// Writes a record's links and client column as given.
    async fn rewrite(&self, r: &StoredRecord) {
        self.exec(&format!(
            "UPDATE audit_records SET client = '{}', prev_hash = {}, hash = {} WHERE seq = {}",
            r.entry.client.replace('\'', "''"),
            self.bytes(&r.prev_hash),
            self.bytes(&r.hash),
            r.seq
        ))
        .await;
    }

    /// Inserts a row as given (only the columns tests vary).
    async fn insert(&self, r: &StoredRecord) {
        let e = &r.entry;
        let opt = |b: Option<&[u8]>| b.map(|b| self.bytes(b)).unwrap_or_else(|| "NULL".into());
        let text = |s: &Option<String>| {
            s.as_ref()
                .map(|s| format!("'{}'", s.replace('\'', "''")))
                .unwrap_or_else(|| "NULL".into())
        };
        self.exec(&format!(
            "INSERT INTO audit_records (seq, prev_hash, hash, node, request_id, at_ms, side, step, client, service, method, purpose, subject, basis, user_id, peer, status, reason, message, body_sha256, request_hash, signature, signer_key, signed_hash, body)
             VALUES ({}, {}, {}, '{}', '{}', {}, '{}', '{}', '{}', '{}', '{}', '{}', {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {})",
            r.seq,
            self.bytes(&r.prev_hash),
            self.bytes(&r.hash),
            e.node,
            e.request_id,
            e.at_ms,
            e.side.as_str(),
            e.step.as_str(),
            e.client,
            e.service,
            e.method,
            e.purpose,
            opt(e.subject.as_ref().map(|h| &h[..])),
            text(&e.basis),
            text(&e.user),
            text(&e.peer),
            e.status,
            text(&e.reason),
            text(&e.message),
            opt(e.body_sha256.as_ref().map(|h| &h[..])),
            opt(e.request_hash.as_ref().map(|h| &h[..])),
            opt(e.signature.as_deref()),
            opt(e.signer_key.as_ref().map(|h| &h[..])),
            opt(e.signed_hash.as_ref().map(|h| &h[..])),
            opt(e.body.as_deref()),
        ))
        .await;
    }
}

fn signer() -> Arc<SigningKey> {
    let (cert, key) = signing_pair("audit test signer").unwrap();
    Arc::new(SigningKey::from_pkcs8(&key, &cert).unwrap())
}

fn options() -> WriterOptions {
    WriterOptions {
        checkpoint_interval: None,
        ..WriterOptions::default()
    }
}

const T0: i64 = 1_750_000_000_000;

fn record(i: u64) -> AuditRecord {
    AuditRecord {
        node: String::new(),
        request_id: format!("req-{}", i / 2),
        at_ms: T0 + i as i64 * 1000,
        side: if i.is_multiple_of(2) {
            Side::Consumer
        } else {
            Side::Provider
        },
        step: match i % 5 {
            0 => Step::Forwarded,
            1 => Step::Accepted,
            2 => Step::Answered,
            3 => Step::Refused,
            _ => Step::Failed,
        },
        client: format!("KZ/GOV/MLSPP/app{}", i % 3),
        service: "KZ/GOV/MOJ/population".into(),
        method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
        purpose: if i.is_multiple_of(4) {
            "audit"
        } else {
            "benefit"
        }
        .into(),
        subject: Some(format!("iin:9001013000{:02}", i % 7)),
        basis: Some("legal:law-1".into()),
        user: i.is_multiple_of(3).then(|| "officer-1".into()),
        peer: Some("KZ/GOV/MOJ/ss1".into()),
        status: if i % 5 == 3 { 7 } else { 0 },
        reason: (i % 5 == 3).then(|| "access.denied".into()),
        message: None,
        body_sha256: Some(kopir_core::pki::sha256(&i.to_be_bytes())),
        request_hash: Some([3; 32]),
        signature: Some(vec![9; 64]),
        signer_key: None,
        signed_hash: None,
        // Even records keep their body, as with `store_bodies`.
        body: i.is_multiple_of(2).then(|| i.to_be_bytes().to_vec()),
        // Some records are grouped or covert (the second canonical form).
        query_group: (i % 6 == 1).then(|| format!("claim-{}", i % 4)),
        hidden_until_ms: (i % 11 == 1).then_some(T0 + 86_400_000),
        hidden_reason: (i % 11 == 1).then(|| "inquiry 17".into()),
    }
}

struct Log {
    backend: Backend,
    handle: Arc<AuditHandle>,
    signer: Arc<SigningKey>,
}

impl Log {
    /// A log with `n` records and checkpoints at each size in `checkpoints`.
    async fn new(kind: Kind, n: u64, checkpoints: &[u64]) -> Self {
        let backend = Backend::new(kind).await;
        let signer = signer();
        let handle = AuditHandle::start(
            backend.store().await,
            PseudonymKey::random().unwrap(),
            signer.clone(),
            "n1",
            options(),
        )
        .await
        .unwrap();
        for i in 1..=n {
            handle.append(record(i)).await.unwrap();
            if checkpoints.contains(&i) {
                handle.checkpoint().await.unwrap().unwrap();
            }
        }
        // Every record in the database (the embedded store folds its
        // journal before a read), as an intruder with database access finds it.
        handle.store().head().await.unwrap();
        Self {
            backend,
            handle,
            signer,
        }
    }

    fn store(&self) -> Arc<dyn AuditStore> {
        self.handle.store().clone()
    }

    async fn verify(&self) -> VerifyReport {
        verify_store(self.store(), &VerifyOptions::default(), &mut |_, _| {})
            .await
            .unwrap()
    }

    async fn get(&self, seq: u64) -> StoredRecord {
        self.store().scan(seq, 1).await.unwrap()[0].clone().unwrap()
    }
}

fn assert_bad(report: &VerifyReport, kind: ProblemKind, seq: u64) {
    assert!(!report.ok(), "expected a problem: {report:#?}");
    let p = &report.problems[0];
    assert_eq!((p.kind, p.seq), (kind, seq), "{report:#?}");
    assert_eq!(report.first_bad, Some(seq), "{report:#?}");
}

// ---- the cases ----

async fn appends_chain_and_verify(kind: Kind) {
    let log = Log::new(kind, 30, &[10, 20]).await;
    let report = log.verify().await;
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.records, 30);
    assert_eq!(report.head_seq, 30);
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.last_checkpoint, Some(20));
    assert_eq!(report.unsigned_tail, 10);
    assert_eq!(report.signers, vec![log.signer.key_id().to_string()]);
    // A clean shutdown signs a final checkpoint covering everything.
    log.handle.shutdown().await;
    let report = log.verify().await;
    assert!(report.ok() && report.unsigned_tail == 0, "{report:#?}");
    assert!(log.handle.append(record(99)).await.is_err());
    // The subject is stored as its pseudonym only.
    let r = log.get(1).await;
    let want = log.handle.pseudonyms().pseudonym("iin:900101300001");
    assert_eq!(r.entry.subject, Some(want));
}

async fn concurrent_appends_are_group_committed(kind: Kind) {
    let backend = Backend::new(kind).await;
    let handle = AuditHandle::start(
        backend.store().await,
        PseudonymKey::random().unwrap(),
        signer(),
        "n1",
        WriterOptions {
            max_batch: 64,
            ..options()
        },
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (1..=300)
        .map(|i| {
            let h = handle.clone();
            tokio::spawn(async move { h.append(record(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    handle.checkpoint().await.unwrap().unwrap();
    let report = verify_store(
        handle.store().clone(),
        &VerifyOptions::default(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.ok() && report.records == 300, "{report:#?}");
}

/// An append whose caller goes away while the record is being written (a
/// cancelled call) still lands, and the log's tree stays in step with it.
async fn an_abandoned_append_still_lands(kind: Kind) {
    let log = Log::new(kind, 2, &[2]).await;
    {
        let mut abandoned = log.handle.append(record(3));
        // One poll starts the write; then the caller goes away.
        std::future::poll_fn(|cx| std::task::Poll::Ready(abandoned.as_mut().poll(cx).is_ready()))
            .await;
    }
    log.handle.append(record(4)).await.unwrap();
    let cp = log.handle.checkpoint().await.unwrap().unwrap();
    assert_eq!(cp.seq, 4);
    let report = log.verify().await;
    assert!(report.ok(), "{report:#?}");
    assert_eq!((report.records, report.unsigned_tail), (4, 0));
    assert_eq!(log.get(3).await.entry.request_id, record(3).request_id);
}

async fn written_records_become_durable_with_the_next_append(kind: Kind) {
    let log = Log::new(kind, 2, &[]).await;
    let stats = || {
        let s = log.handle.stats();
        (
            s.commits.load(Ordering::Relaxed),
            s.syncs.load(Ordering::Relaxed),
            s.pending.load(Ordering::Relaxed),
        )
    };
    assert_eq!(stats(), (2, 2, 0));
    // Written: committed, in the chain and readable, not waited for.
    log.handle.append_written(record(3)).await.unwrap();
    assert_eq!(stats(), (3, 2, 1));
    assert_eq!(log.get(3).await.entry.request_id, record(3).request_id);
    // The next durable append covers it.
    log.handle.append(record(4)).await.unwrap();
    assert_eq!(stats(), (4, 3, 0));
    // A batch that holds one durable append waits for the disk as a whole.
    let tasks: Vec<_> = (5..=20)
        .map(|i| {
            let h = log.handle.clone();
            tokio::spawn(async move {
                if i == 20 {
                    h.append(record(i)).await
                } else {
                    h.append_written(record(i)).await
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(stats().2, 0, "{:?}", stats());
    // Shutting down leaves nothing pending: the final checkpoint is durable.
    log.handle.append_written(record(21)).await.unwrap();
    log.handle.shutdown().await;
    let report = log.verify().await;
    assert!(report.ok() && report.unsigned_tail == 0, "{report:#?}");
    assert_eq!(report.records, 21);
}

/// A database that refuses inserts: PostgreSQL acknowledges none of the
/// appends meanwhile; the embedded store acknowledges those its journal took
/// before a fold met the refusal, and holds them there until SQLite takes
/// them again. Either way the log afterwards holds exactly the acknowledged
/// records.
async fn a_refused_insert_acknowledges_only_what_lands(kind: Kind) {
    let log = Log::new(kind, 5, &[]).await;
    let (create, drop) = match kind {
        Kind::Sqlite => (
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            "DROP TRIGGER refuse;",
        ),
        Kind::Postgres => (
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION refuse();",
            "DROP TRIGGER refuse ON audit_records; DROP FUNCTION refuse();",
        ),
    };
    log.backend.exec(create).await;
    let tasks: Vec<_> = (6..=40)
        .map(|i| {
            let h = log.handle.clone();
            tokio::spawn(async move { h.append(record(i)).await.map(|()| i) })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(i) => acknowledged.push(record(i).request_id),
            Err(e) => assert!(matches!(e, super::AuditError::Write(_)), "{e:?}"),
        }
    }
    match kind {
        Kind::Postgres => assert!(acknowledged.is_empty(), "{acknowledged:?}"),
        Kind::Sqlite => {
            // A checkpoint needs them in SQLite first: it fails, and from
            // then on appends are refused too, until SQLite takes them.
            assert!(log.handle.checkpoint().await.is_err());
            let refused = log.handle.append(record(50)).await;
            assert!(
                matches!(refused, Err(super::AuditError::Write(_))),
                "{refused:?}"
            );
        }
    }
    log.backend.exec(drop).await;
    log.handle.append(record(41)).await.unwrap();
    log.handle.checkpoint().await.unwrap().unwrap();
    let report = log.verify().await;
    let n = 5 + acknowledged.len() as u64 + 1;
    assert!(report.ok() && report.records == n, "{report:#?}");
    let mut landed = Vec::new();
    for seq in 6..n {
        landed.push(log.get(seq).await.entry.request_id.clone());
    }
    acknowledged.sort();
    landed.sort();
    assert_eq!(landed, acknowledged);
    assert_eq!(log.get(n).await.entry.request_id, record(41).request_id);
}

async fn queries_filter_and_page_newest_first(kind: Kind) {
    let log = Log::new(kind, 40, &[40]).await;
    let store = log.store();
    // By subject: records i with i % 7 == 3.
    let subject = log.handle.pseudonyms().pseudonym("iin:900101300003");
    let page = store
        .query(Query {
            subject: Some(subject),
            ..Query::default()
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![38, 31, 24, 17, 10, 3]);
    assert_eq!(page.next, None);
    // Paged, newest first.
    let mut q = Query {
        client: Some("KZ/GOV/MLSPP/app1".into()),
        limit: 5,
        ..Query::default()
    };
    let mut all = Vec::new();
    loop {
        let page = store.query(q.clone()).await.unwrap();
        all.extend(page.records.iter().map(|r| r.seq));
        match page.next {
            Some(n) => q.before_seq = Some(n),
            None => break,
        }
    }
    let want: Vec<u64> = (1..=40).rev().filter(|i| i % 3 == 1).collect();
    assert_eq!(all, want);
    // Step, status, purpose, time range, request id together.
    let page = store
        .query(Query {
            step: Some(Step::Refused),
            status: Some(7),
            purpose: Some("benefit".into()),
            from_ms: Some(T0 + 10_000),
            to_ms: Some(T0 + 30_000),
            ..Query::default()
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![23, 18, 13]);
    let page = store
        .query(Query {
            request_id: Some("req-7".into()),
            side: Some(Side::Provider),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].seq, 15);
    assert_eq!(
        store.seq_range(T0 + 5_000, T0 + 9_500).await.unwrap(),
        Some((5, 9))
    );
    assert_eq!(
        store.seq_range(T0 + 100_000, T0 + 200_000).await.unwrap(),
        None
    );
}

async fn show_and_proofs(kind: Kind) {
    let log = Log::new(kind, 21, &[9, 21]).await;
    log.handle.append(record(22)).await.unwrap();
    log.handle.append(record(23)).await.unwrap();
    let store = log.store();
    // req-10 is records 20 and 21 (covered), req-11 is 22 and 23 (not yet).
    let shown = inspect::show(&store, "req-10", None, None).await.unwrap();
    assert_eq!(shown.len(), 2);
    assert!(
        shown.iter().all(|s| s.hash_ok && s.checkpoint == Some(21)),
        "{shown:#?}"
    );
    let shown = inspect::show(&store, "req-11", None, None).await.unwrap();
    assert!(shown.iter().all(|s| s.hash_ok && s.checkpoint.is_none()));
    assert!(shown[0].record.entry.signature.is_some());
    for seq in [1, 9, 20, 21] {
        let p = inspect::inclusion(&store, seq, Some(&log.signer.key_id()))
            .await
            .unwrap();
        assert!(p.verify(Some(&log.signer.key_id())), "seq {seq}");
        let mut forged = p.clone();
        forged.record.entry.client = "KZ/GOV/EVIL/app".into();
        assert!(!forged.verify(None));
    }
    assert!(inspect::inclusion(&store, 22, None).await.is_err());
    let c = inspect::consistency(&store, 9, None, None).await.unwrap();
    assert_eq!((c.from.seq, c.to.seq), (9, 21));
    assert!(c.verify(Some(&log.signer.key_id())));
    // A tampered record shows as such.
    log.backend
        .exec("UPDATE audit_records SET purpose = 'curiosity' WHERE seq = 20")
        .await;
    let shown = inspect::show(&store, "req-10", None, None).await.unwrap();
    assert!(!shown[0].hash_ok && shown[1].hash_ok);
    assert_eq!(shown[0].checkpoint, None);
}

async fn restart_continues_the_chain_and_tree(kind: Kind) {
    let log = Log::new(kind, 12, &[12]).await;
    log.handle.append(record(13)).await.unwrap();
    log.handle.shutdown().await;
    drop(log.handle);
    let handle = AuditHandle::start(
        log.backend.store().await,
        PseudonymKey::random().unwrap(),
        log.signer.clone(),
        "n1",
        options(),
    )
    .await
    .unwrap();
    for i in 14..=20 {
        handle.append(record(i)).await.unwrap();
    }
    let cp = handle.checkpoint().await.unwrap().unwrap();
    assert_eq!(cp.seq, 20);
    assert!(
        handle.checkpoint().await.unwrap().is_none(),
        "nothing new to sign"
    );
    let report = verify_store(
        handle.store().clone(),
        &VerifyOptions::default(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.ok() && report.checkpoints == 3, "{report:#?}");
    let c = inspect::consistency(handle.store(), 12, Some(20), None)
        .await
        .unwrap();
    assert!(c.verify(None));
}

async fn two_nodes_share_one_store(kind: Kind) {
    let backend = Backend::new(kind).await;
    let key = PseudonymKey::random().unwrap();
    let signer = signer();
    let a = AuditHandle::start(
        backend.store().await,
        key.clone(),
        signer.clone(),
        "node-a",
        options(),
    )
    .await
    .unwrap();
    let b = AuditHandle::start(
        backend.store().await,
        key,
        signer.clone(),
        "node-b",
        options(),
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (1..=120)
        .map(|i| {
            let h = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { h.append(record(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Each node's checkpoint covers the other's records too.
    let ca = a.checkpoint().await.unwrap().unwrap();
    b.append(record(121)).await.unwrap();
    let cb = b.checkpoint().await.unwrap().unwrap();
    assert_eq!((ca.seq, cb.seq), (120, 121));
    let report = verify_store(a.store().clone(), &VerifyOptions::default(), &mut |_, _| {})
        .await
        .unwrap();
    assert!(
        report.ok() && report.records == 121 && report.checkpoints == 2,
        "{report:#?}"
    );
    let store = a.store();
    for node in ["node-a", "node-b"] {
        let page = store
            .query(Query {
                node: Some(node.into()),
                limit: 1000,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(page.records.len(), if node == "node-a" { 60 } else { 61 });
    }
}

// ---- tampering ----

async fn tamper_edit(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    log.backend
        .exec("UPDATE audit_records SET client = 'KZ/GOV/EVIL/app' WHERE seq = 7")
        .await;
    assert_bad(&log.verify().await, ProblemKind::Altered, 7);
}

async fn tamper_stored_body(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    // The body is not in the record hash; its hash is, and verify checks it.
    log.backend
        .exec("UPDATE audit_records SET body = signature WHERE seq = 8")
        .await;
    assert_bad(&log.verify().await, ProblemKind::Altered, 8);
}

async fn tamper_edit_with_fresh_hash(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    let mut r = log.get(7).await;
    r.entry.client = "KZ/GOV/EVIL/app".into();
    r.hash = r.recompute();
    log.backend.rewrite(&r).await;
    assert_bad(&log.verify().await, ProblemKind::BrokenLink, 7);
}

async fn tamper_delete(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    log.backend
        .exec("DELETE FROM audit_records WHERE seq = 8")
        .await;
    assert_bad(&log.verify().await, ProblemKind::Missing, 8);
}

async fn tamper_delete_and_renumber(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    log.backend
        .exec("DELETE FROM audit_records WHERE seq IN (8, 9)")
        .await;
    log.backend.shift(10, -2).await;
    assert_bad(&log.verify().await, ProblemKind::Moved, 8);
}

async fn tamper_insert(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    // A forged record at 6, well formed and chained after record 5; the rest
    // is shifted up.
    let before = log.get(5).await;
    let mut forged = log.get(6).await;
    forged.entry.request_id = "req-forged".into();
    forged.prev_hash = before.hash;
    forged.hash = forged.recompute();
    log.backend.shift(6, 1).await;
    log.backend.insert(&forged).await;
    assert_bad(&log.verify().await, ProblemKind::Inserted, 6);
}

async fn tamper_reorder(kind: Kind) {
    let log = Log::new(kind, 20, &[20]).await;
    log.backend
        .exec(
            "UPDATE audit_records SET seq = -11 WHERE seq = 11;
             UPDATE audit_records SET seq = 11 WHERE seq = 12;
             UPDATE audit_records SET seq = 12 WHERE seq = -11;",
        )
        .await;
    assert_bad(&log.verify().await, ProblemKind::Moved, 11);
}

async fn tamper_truncate(kind: Kind) {
    let log = Log::new(kind, 20, &[15]).await;
    log.backend
        .exec("DELETE FROM audit_records WHERE seq > 12")
        .await;
    assert_bad(&log.verify().await, ProblemKind::Truncated, 13);
    // Cutting only what no checkpoint covers yet cannot be told apart from
    // a log that never had it: the report says how much is unsigned.
    let log = Log::new(kind, 20, &[15]).await;
    log.backend
        .exec("DELETE FROM audit_records WHERE seq > 17")
        .await;
    let report = log.verify().await;
    assert!(report.ok() && report.unsigned_tail == 2, "{report:#?}");
}

async fn tamper_rewrite_consistently(kind: Kind) {
    // Rewriting record 14 and re-chaining everything after it is only caught
    // by the signed checkpoint at 20; records up to the checkpoint at 10 are
    // proven good, so the first record that may be bad is 11.
    let log = Log::new(kind, 25, &[10, 20]).await;
    let mut rows: Vec<StoredRecord> = Vec::new();
    for seq in 14..=25 {
        rows.push(log.get(seq).await);
    }
    rows[0].entry.client = "KZ/GOV/EVIL/app".into();
    let head = Link {
        seq: 13,
        hash: rows[0].prev_hash,
    };
    let entries: Vec<_> = rows.iter().map(|r| r.entry.clone()).collect();
    for (r, (seq, prev, hash)) in rows.iter_mut().zip(chain(Some(head), &entries)) {
        assert_eq!(r.seq, seq);
        r.prev_hash = prev;
        r.hash = hash;
        log.backend.rewrite(r).await;
    }
    assert_bad(&log.verify().await, ProblemKind::CheckpointMismatch, 11);
}

async fn tamper_malformed_row(kind: Kind) {
    let log = Log::new(kind, 10, &[10]).await;
    log.backend
        .exec("UPDATE audit_records SET step = 'bogus' WHERE seq = 4")
        .await;
    assert_bad(&log.verify().await, ProblemKind::Malformed, 4);
}

async fn tamper_checkpoint(kind: Kind) {
    let log = Log::new(kind, 10, &[5, 10]).await;
    // A forged checkpoint claiming more records is refused (its signature
    // fails), so it cannot fake a truncation either.
    log.backend
        .exec("UPDATE audit_checkpoints SET seq = 12 WHERE seq = 10")
        .await;
    let report = log.verify().await;
    assert_eq!(report.problems.len(), 1, "{report:#?}");
    assert_eq!(report.problems[0].kind, ProblemKind::CheckpointSignature);
    assert_eq!(report.first_bad, None);
    assert_eq!(report.last_checkpoint, Some(5));
    // Only checkpoints of the expected signer are trusted.
    let (other, _) = signing_pair("someone else").unwrap();
    let report = verify_store(
        log.store(),
        &VerifyOptions {
            expected_signer: Some(Fingerprint::of(&other)),
        },
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(report.checkpoints, 0);
    assert!(
        report
            .problems
            .iter()
            .all(|p| p.kind == ProblemKind::CheckpointSignature)
    );
}

async fn export_verifies_offline(kind: Kind) {
    let log = Log::new(kind, 30, &[10, 25]).await;
    let store = log.store();
    let archive = export_range(&store, 4, 9).await.unwrap();
    assert_eq!(archive.checkpoint.seq, 10);
    assert_eq!(archive.latest.as_ref().map(|c| c.seq), Some(25));
    let bytes = archive.to_json().unwrap();
    let back = Archive::from_json(&bytes).unwrap();
    let key = log.signer.key_id();
    let report = verify_archive(&back, Some(&key));
    assert!(report.ok() && report.records == 6, "{report:#?}");
    // Exactly at a checkpoint, and across a checkpoint.
    for (from, to) in [(1, 10), (8, 25), (25, 25)] {
        let a = export_range(&store, from, to).await.unwrap();
        assert!(verify_archive(&a, Some(&key)).ok(), "{from}..={to}");
    }
    // Not yet covered by a checkpoint.
    assert!(export_range(&store, 20, 28).await.is_err());
    // Tampered archives.
    let mut bad = back.clone();
    bad.records[2].record.entry.purpose = "curiosity".into();
    let r = verify_archive(&bad, Some(&key));
    assert_eq!(r.first_bad, Some(6), "{r:#?}");
    let mut bad = back.clone();
    bad.records.remove(3);
    assert_eq!(verify_archive(&bad, Some(&key)).first_bad, Some(7));
    let mut bad = back.clone();
    bad.inclusion[0][0] ^= 1;
    let r = verify_archive(&bad, Some(&key));
    assert_eq!(
        r.problems[0].kind,
        ProblemKind::CheckpointMismatch,
        "{r:#?}"
    );
    let mut bad = back.clone();
    bad.records.pop();
    assert_eq!(verify_archive(&bad, Some(&key)).first_bad, Some(9));
    // Numbers no log has (past the stores' BIGINT, zero, a reversed range)
    // are refused as malformed before any arithmetic on them.
    for (from, to) in [(u64::MAX, u64::MAX), (0, 9), (9, 4)] {
        let mut bad = back.clone();
        (bad.from_seq, bad.to_seq) = (from, to);
        bad.records[0].record.seq = from;
        let r = verify_archive(&bad, Some(&key));
        assert_eq!(r.problems[0].kind, ProblemKind::Malformed, "{r:#?}");
    }
    let (other, _) = signing_pair("someone else").unwrap();
    assert!(!verify_archive(&back, Some(&Fingerprint::of(&other))).ok());
    let mut bad = back.clone();
    if let Some(latest) = bad.latest.as_mut() {
        latest.root[0] ^= 1;
    }
    assert!(!verify_archive(&bad, None).ok());
    // Rewritten wholesale (every hash recomputed) still fails: the proof
    // ties the last record to the signed root.
    let mut bad = back.clone();
    bad.records[0].record.entry.client = "KZ/GOV/EVIL/app".into();
    let mut prev: Hash = bad.records[0].record.prev_hash;
    for a in &mut bad.records {
        a.record.prev_hash = prev;
        a.record.hash = a.record.recompute();
        a.canonical = a.record.canonical();
        prev = a.record.hash;
    }
    let r = verify_archive(&bad, Some(&key));
    assert_eq!(
        r.problems[0].kind,
        ProblemKind::CheckpointMismatch,
        "{r:#?}"
    );
    assert_eq!(r.first_bad, Some(4));
}

async fn periodic_checkpoints(kind: Kind) {
    let backend = Backend::new(kind).await;
    let handle = AuditHandle::start(
        backend.store().await,
        PseudonymKey::random().unwrap(),
        signer(),
        "n1",
        WriterOptions {
            checkpoint_interval: Some(Duration::from_millis(100)),
            ..WriterOptions::default()
        },
    )
    .await
    .unwrap();
    for i in 1..=5 {
        handle.append(record(i)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let latest = handle.store().latest_checkpoint().await.unwrap();
        if latest.is_some_and(|c| c.checkpoint.seq == 5) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no periodic checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every field of a record reads back from the store as it was written, by
/// every read path (a field left out of the row mapping fails here).
async fn every_field_reads_back_as_written(kind: Kind) {
    let backend = Backend::new(kind).await;
    let store = backend.store().await;
    let full = Entry::every_field_set();
    let sparse = Entry {
        request_id: full.request_id.clone(),
        ..Entry::bare("node-2", Side::Consumer, Step::Forwarded)
    };
    let links = store
        .append(vec![full.clone(), sparse.clone()], Commit::Durable)
        .await
        .unwrap();
    assert_eq!(links.len(), 2);
    let by_request = store.by_request(full.request_id.clone()).await.unwrap();
    let scanned: Vec<_> = store
        .scan(1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let page = store.query(Query::default()).await.unwrap().records;
    for read in [by_request, scanned, page.into_iter().rev().collect()] {
        let entries: Vec<_> = read.iter().map(|r| r.entry.clone()).collect();
        assert_eq!(entries, [full.clone(), sparse.clone()]);
        for (r, link) in read.iter().zip(&links) {
            assert_eq!((r.seq, r.hash), (link.seq, link.hash));
            assert_eq!(r.recompute(), r.hash);
        }
    }
}

macro_rules! for_each_store {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Kind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Kind::Postgres).await
                }
            )*
        }
    };
}

for_each_store!(
    appends_chain_and_verify,
    concurrent_appends_are_group_committed,
    an_abandoned_append_still_lands,
    written_records_become_durable_with_the_next_append,
    a_refused_insert_acknowledges_only_what_lands,
    queries_filter_and_page_newest_first,
    show_and_proofs,
    restart_continues_the_chain_and_tree,
    two_nodes_share_one_store,
    tamper_edit,
    tamper_stored_body,
    tamper_edit_with_fresh_hash,
    tamper_delete,
    tamper_delete_and_renumber,
    tamper_insert,
    tamper_reorder,
    tamper_truncate,
    tamper_rewrite_consistently,
    tamper_malformed_row,
    tamper_checkpoint,
    export_verifies_offline,
    periodic_checkpoints,
    every_field_reads_back_as_written,
);

/// A store that panics in the append it is armed for, as a writer would if a
/// bug or a library it calls failed; everything else goes to `inner`.
struct PanicsOnce {
    inner: Arc<dyn AuditStore>,
    armed: std::sync::atomic::AtomicBool,
}

impl AuditStore for PanicsOnce {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn append(
        &self,
        entries: Vec<super::record::Entry>,
        commit: super::store::Commit,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<Link>, super::AuditError>> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("injected writer failure");
        }
        self.inner.append(entries, commit)
    }
    fn head(&self) -> futures_util::future::BoxFuture<'_, Result<Option<Link>, super::AuditError>> {
        self.inner.head()
    }
    fn scan(
        &self,
        from: u64,
        limit: usize,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<super::store::Scanned>, super::AuditError>>
    {
        self.inner.scan(from, limit)
    }
    fn hashes(
        &self,
        from: u64,
        to: u64,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<(u64, Hash)>, super::AuditError>> {
        self.inner.hashes(from, to)
    }
    fn query(
        &self,
        query: Query,
    ) -> futures_util::future::BoxFuture<'_, Result<super::store::Page, super::AuditError>> {
        self.inner.query(query)
    }
    fn by_request(
        &self,
        request_id: String,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<StoredRecord>, super::AuditError>> {
        self.inner.by_request(request_id)
    }
    fn seq_range(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> futures_util::future::BoxFuture<'_, Result<Option<(u64, u64)>, super::AuditError>> {
        self.inner.seq_range(from_ms, to_ms)
    }
    fn put_checkpoint(
        &self,
        checkpoint: super::store::StoredCheckpoint,
    ) -> futures_util::future::BoxFuture<'_, Result<(), super::AuditError>> {
        self.inner.put_checkpoint(checkpoint)
    }
    fn checkpoints(
        &self,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<Vec<super::checkpoint::Checkpoint>, super::AuditError>,
    > {
        self.inner.checkpoints()
    }
    fn latest_checkpoint(
        &self,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<Option<super::store::StoredCheckpoint>, super::AuditError>,
    > {
        self.inner.latest_checkpoint()
    }
}

/// A writer that panics is started again: the appends it was writing are
/// refused with an error (never left waiting), later appends go in after the
/// records already there, and the log still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_panics_is_restarted_and_the_chain_goes_on() {
    let backend = Backend::new(Kind::Sqlite).await;
    let store = Arc::new(PanicsOnce {
        inner: backend.store().await,
        armed: false.into(),
    });
    let handle = AuditHandle::start(
        store.clone(),
        PseudonymKey::random().unwrap(),
        signer(),
        "n1",
        options(),
    )
    .await
    .unwrap();
    for i in 1..=3 {
        handle.append(record(i)).await.unwrap();
    }
    store.armed.store(true, Ordering::SeqCst);
    let err = handle.append(record(4)).await.unwrap_err();
    assert!(err.to_string().contains("restarted"), "{err}");
    for i in 5..=7 {
        handle.append(record(i)).await.unwrap();
    }
    // Counted before the new writer took the queue.
    assert_eq!(handle.stats().restarts.load(Ordering::Relaxed), 1);
    let seqs: Vec<u64> = handle
        .records()
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    // The restarted writer rebuilt its tree: it signs a checkpoint of all six.
    let cp = handle.checkpoint().await.unwrap().unwrap();
    assert_eq!(cp.seq, 6);
    let report = verify_store(
        handle.store().clone(),
        &VerifyOptions::default(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
    handle.shutdown().await;
}
