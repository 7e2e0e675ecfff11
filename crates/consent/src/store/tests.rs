//! The consent store suite: each case runs against the embedded SQLite store
//! and against a throwaway PostgreSQL cluster
//! ([`kopir_pgtest::TempPostgres`]).

use std::sync::Arc;

use super::{
    ConsentStore, RevokeOutcome, StoreError, UseOutcome, postgres::PostgresConsentStore,
    sqlite::SqliteConsentStore,
};
use crate::grant::Grant;
use kopir_pgtest::TempPostgres;

/// A store under test and what keeps it alive.
struct Backend {
    store: Arc<dyn ConsentStore>,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<Arc<TempPostgres>>,
    /// Opens a second handle to the same store (another node).
    reopen: Reopen,
}

enum Reopen {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        Self {
            store: Arc::new(SqliteConsentStore::open_in(&path).await.unwrap()),
            _dir: Some(dir),
            _pg: None,
            reopen: Reopen::Sqlite(path),
        }
    }

    async fn postgres() -> Self {
        let pg = TempPostgres::shared().unwrap_or_else(|e| {
            panic!("the PostgreSQL consent store tests need PostgreSQL installed: {e}")
        });
        let url = pg.create_database().await.unwrap();
        Self {
            store: Arc::new(PostgresConsentStore::connect(&url).await.unwrap()),
            _dir: None,
            _pg: Some(pg),
            reopen: Reopen::Postgres(url),
        }
    }

    async fn another(&self) -> Arc<dyn ConsentStore> {
        match &self.reopen {
            Reopen::Sqlite(dir) => Arc::new(SqliteConsentStore::open_in(dir).await.unwrap()),
            Reopen::Postgres(url) => Arc::new(PostgresConsentStore::connect(url).await.unwrap()),
        }
    }
}

fn grant(id: &str, subject: &str, granted_at_ms: i64) -> Grant {
    Grant {
        id: id.into(),
        subject: subject.parse().unwrap(),
        client: "KZ/GOV/MLSPP/benefits".parse().unwrap(),
        service: "KZ/GOV/MOJ/population".parse().unwrap(),
        methods: vec![
            "/kz.population.v1.PopulationRegistry/GetPerson".into(),
            "kz.income.v1.IncomeRegistry/*".into(),
        ],
        purpose: "kindergarten-queue".parse().unwrap(),
        not_before: 1_000,
        not_after: 2_000,
        max_uses: Some(2),
        granted_at_ms,
        revoked_at_ms: None,
    }
}

const ALICE: &str = "iin:900101300126";
const BOB: &str = "iin:971125443866";

async fn grants_are_stored_listed_and_revoked(b: Backend) {
    let s = &b.store;
    let g1 = grant("g1", ALICE, 10);
    let g2 = Grant {
        max_uses: None,
        ..grant("g2", ALICE, 20)
    };
    s.insert(g1.clone()).await.unwrap();
    s.insert(g2.clone()).await.unwrap();
    s.insert(grant("g3", BOB, 30)).await.unwrap();
    assert_eq!(
        s.insert(g1.clone()).await,
        Err(StoreError::Duplicate("g1".into()))
    );
    assert_eq!(s.get("g1".into()).await.unwrap(), Some(g1.clone()));
    assert_eq!(s.get("nope".into()).await.unwrap(), None);
    let alice = s.of_subject(ALICE.into()).await.unwrap();
    assert_eq!(alice, vec![g2.clone(), g1.clone()], "newest first");
    assert!(s.revocations_after(0, 10).await.unwrap().is_empty());

    // Another subject cannot revoke (or learn of) Alice's consent.
    assert_eq!(
        s.revoke("g1".into(), BOB.into(), 50).await.unwrap(),
        RevokeOutcome::NotFound
    );
    assert_eq!(
        s.revoke("nope".into(), ALICE.into(), 50).await.unwrap(),
        RevokeOutcome::NotFound
    );
    let RevokeOutcome::Revoked(revoked, rev1) =
        s.revoke("g1".into(), ALICE.into(), 100).await.unwrap()
    else {
        panic!("not revoked")
    };
    assert_eq!(revoked.revoked_at_ms, Some(100));
    assert_eq!(rev1.seq, 1);
    assert_eq!(rev1.not_after, 2_000);
    // Twice: the first revocation stands.
    assert_eq!(
        s.revoke("g1".into(), ALICE.into(), 200).await.unwrap(),
        RevokeOutcome::AlreadyRevoked(revoked.clone(), rev1.clone())
    );
    // A second node of the same store sees it and continues the sequence.
    let other = b.another().await;
    assert_eq!(other.get("g1".into()).await.unwrap(), Some(revoked));
    let RevokeOutcome::Revoked(_, rev2) = other.revoke("g3".into(), BOB.into(), 300).await.unwrap()
    else {
        panic!("not revoked")
    };
    assert_eq!(rev2.seq, 2);
    assert_eq!(
        s.revocations_after(0, 10).await.unwrap(),
        vec![rev1.clone(), rev2.clone()]
    );
    assert_eq!(s.revocations_after(1, 10).await.unwrap(), vec![rev2]);
    assert_eq!(s.revocations_after(0, 1).await.unwrap(), vec![rev1]);
    assert!(s.revocations_after(2, 10).await.unwrap().is_empty());
}

async fn uses_are_counted_up_to_the_maximum(b: Backend) {
    let s = &b.store;
    assert_eq!(
        s.consume_use("g".into(), 2, 2_000).await.unwrap(),
        UseOutcome::Counted { used: 1 }
    );
    let other = b.another().await;
    assert_eq!(
        other.consume_use("g".into(), 2, 2_000).await.unwrap(),
        UseOutcome::Counted { used: 2 }
    );
    assert_eq!(
        s.consume_use("g".into(), 2, 2_000).await.unwrap(),
        UseOutcome::Exhausted { used: 2 }
    );
    assert_eq!(
        s.consume_use("zero".into(), 0, 2_000).await.unwrap(),
        UseOutcome::Exhausted { used: 0 }
    );
    // Concurrent uses never exceed the maximum.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.consume_use("many".into(), 7, 2_000).await.unwrap() })
        })
        .collect();
    let mut counted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), UseOutcome::Counted { .. }) {
            counted += 1;
        }
    }
    assert_eq!(counted, 7);
}

macro_rules! both {
    ($($case:ident),*) => {
        mod sqlite_backend {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case(Backend::sqlite().await).await })*
        }
        mod postgres_backend {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case(Backend::postgres().await).await })*
        }
    };
}

both!(
    grants_are_stored_listed_and_revoked,
    uses_are_counted_up_to_the_maximum
);
