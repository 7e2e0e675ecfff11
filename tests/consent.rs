//! End-to-end tests of consent: a real consent authority on 127.0.0.1:0 with
//! real mutual TLS, a real signed global configuration, grants and revocations
//! through a real tonic client holding the portal's certificate, real tokens
//! from `IssueToken`, and real revocation feeds of two provider security
//! servers, whose verifiers are asked what the exchange path will ask.
//!
//! The revocation tests run once on the embedded store and once on a
//! throwaway PostgreSQL cluster.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use kopir::{
    audit::pgtest::TempPostgres,
    config::{GlobalConfSource, KeyFiles, LocalClient},
    consent::{
        ConsentVerifier, Expected, FeedOptions, RevocationFeed, RevocationSet,
        channel::{ca_channel, pinned_channel},
        config::ConsentConfig,
        server::{RunningAuthority, start},
        store::{self, ConsentStore, postgres::PostgresConsentStore},
    },
    error::{Reason, Refusal},
    exchange::now_ms,
    globalconf::{GlobalConfHandle, describe::Federation, signed, watch::watch},
    id::{ServerId, SubsystemId},
    pki::{
        Fingerprint,
        dev::{self, DevLayout, self_signed_tls},
        load_certs, load_key, public_key,
        sign::{SigningKey, VerifyingKey},
    },
    proto::kopir::v1::{
        Consent, GrantRequest, IssueTokenRequest, ListRequest, RevokeRequest,
        WatchRevocationsRequest, consent_service_client::ConsentServiceClient,
    },
};
use tonic::transport::Channel;

const FEDERATION: &str = r#"
instance = "KZ"
certs = "certs"

[[purposes]]
code = "kindergarten-queue"
description = "Placing a child in the kindergarten queue"
consent = true

[[purposes]]
code = "child-benefit"
description = "Assessing a claim for the child-birth benefit"
legal_act = "Social Code, art. 146"

[[members]]
id = "KZ/GOV/MLSPP"
name = "Ministry of Labour"
subsystems = [{ code = "benefits" }]
servers = [{ code = "ss1", address = "127.0.0.1:1" }]

[[members]]
id = "KZ/GOV/MOJ"
name = "Ministry of Justice"
subsystems = [{ code = "population", personal_data = true }]
servers = [{ code = "ss1", address = "127.0.0.1:1", subsystems = ["population"] }]

[[members]]
id = "KZ/GOV/SRC"
name = "State Revenue Committee"
subsystems = [{ code = "income", personal_data = true }]
servers = [{ code = "ss1", address = "127.0.0.1:1", subsystems = ["income"] }]

[consent_authority]
address = "127.0.0.1:1"
"#;

const ALICE: &str = "iin:900101300126";
const BOB: &str = "iin:971125443866";
const BENEFITS: &str = "KZ/GOV/MLSPP/benefits";
const POPULATION: &str = "KZ/GOV/MOJ/population";
const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
const PURPOSE: &str = "kindergarten-queue";

/// Which store the authority keeps its consents in.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct World {
    dir: tempfile::TempDir,
    layout: DevLayout,
    globalconf: PathBuf,
    authority: Option<RunningAuthority>,
    addr: String,
    _pg: Option<Arc<TempPostgres>>,
}

fn server(id: &str) -> ServerId {
    id.parse().unwrap()
}

fn identity((cert, key): (PathBuf, PathBuf)) -> kopir::consent::channel::Identity {
    (load_certs(&cert).unwrap(), load_key(&key).unwrap())
}

fn refusal(status: tonic::Status) -> Refusal {
    Refusal::from_status(&status).unwrap_or_else(|| panic!("no kopir-error on {status:?}"))
}

impl World {
    async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("federation.toml"), FEDERATION).unwrap();
        let mut fed = Federation::load(&dir.path().join("federation.toml")).unwrap();
        let layout =
            dev::generate(&fed.dev_pki_spec().unwrap(), &dir.path().join("certs")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        if let Some(ca) = fed.consent_authority.as_mut() {
            ca.address = addr.clone();
        }
        let globalconf = dir.path().join("globalconf.json");
        let conf = fed.build(1, time::Duration::hours(1)).unwrap();
        let key = SigningKey::load(&layout.authority_cert(), &layout.authority_key()).unwrap();
        std::fs::write(&globalconf, signed::sign(&conf, &key)).unwrap();

        let (tls_cert, tls_key) = layout.consent_tls();
        let (signing_cert, signing_key) = layout.consent_signing();
        let benefits: SubsystemId = BENEFITS.parse().unwrap();
        let config = ConsentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data/consent"),
            database: None,
            tls: KeyFiles {
                cert: tls_cert,
                key: tls_key,
            },
            signing: KeyFiles {
                cert: signing_cert,
                key: signing_key,
            },
            globalconf: GlobalConfSource {
                path: globalconf.clone(),
                anchors: vec![layout.authority_cert()],
                refresh_secs: 1,
            },
            portals: vec![layout.portal().0],
            consumers: vec![LocalClient {
                id: benefits.clone(),
                cert: layout.client(&benefits).0,
            }],
            token_ttl_secs: 3600,
            heartbeat_ms: 1000,
        };
        let (store, pg): (Arc<dyn ConsentStore>, _) = match backend {
            Backend::Sqlite => (store::open(&config.data_dir, None).await.unwrap(), None),
            Backend::Postgres => {
                let pg = TempPostgres::shared().unwrap_or_else(|e| {
                    panic!("the PostgreSQL consent tests need PostgreSQL installed: {e}")
                });
                let url = pg.create_database().await.unwrap();
                (
                    Arc::new(PostgresConsentStore::connect(&url).await.unwrap()),
                    Some(pg),
                )
            }
        };
        let authority = start(config, listener, store).await.unwrap();
        Self {
            dir,
            layout,
            globalconf,
            authority: Some(authority),
            addr,
            _pg: pg,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A client holding `who`'s certificate, checking the authority against the CA.
    fn client_as(&self, who: (PathBuf, PathBuf)) -> ConsentServiceClient<Channel> {
        let roots = load_certs(&self.layout.ca_cert()).unwrap();
        let channel = ca_channel(
            &self.addr,
            &roots,
            Some(identity(who)),
            Duration::from_secs(2),
        )
        .unwrap();
        ConsentServiceClient::new(channel)
    }

    fn portal(&self) -> ConsentServiceClient<Channel> {
        self.client_as(self.layout.portal())
    }

    /// A client as a security server would make it: the authority's
    /// certificate pinned from the global configuration.
    async fn server_client(&self, id: &str) -> ConsentServiceClient<Channel> {
        let conf = self.conf();
        let view = conf.current().unwrap();
        let authority = view.consent_authority().unwrap();
        let channel = pinned_channel(
            &authority.address,
            authority.tls,
            identity(self.layout.server_tls(&server(id))),
            Duration::from_secs(2),
        )
        .unwrap();
        ConsentServiceClient::new(channel)
    }

    fn conf(&self) -> GlobalConfHandle {
        watch(
            self.globalconf.clone(),
            vec![
                VerifyingKey::from_cert(
                    load_certs(&self.layout.authority_cert()).unwrap()[0].as_ref(),
                )
                .unwrap(),
            ],
            Duration::from_secs(1),
        )
    }

    async fn grant(&self, req: GrantRequest) -> Consent {
        self.portal()
            .grant(req)
            .await
            .unwrap()
            .into_inner()
            .consent
            .unwrap()
    }

    async fn token(&self, consent_id: &str) -> String {
        self.server_client("KZ/GOV/MLSPP/ss1")
            .await
            .issue_token(IssueTokenRequest {
                consent_id: consent_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn stop_authority(&mut self) {
        if let Some(a) = self.authority.take() {
            a.shutdown().await;
        }
    }
}

fn now() -> i64 {
    now_ms() / 1000
}

fn grant_request() -> GrantRequest {
    GrantRequest {
        subject: ALICE.into(),
        client: BENEFITS.into(),
        service: POPULATION.into(),
        methods: vec![GET_PERSON.into()],
        purpose: PURPOSE.into(),
        not_before: now() - 60,
        not_after: now() + 3600,
        max_uses: 0,
    }
}

fn expected() -> Expected {
    Expected {
        subject: ALICE.parse().unwrap(),
        client: BENEFITS.parse().unwrap(),
        service: POPULATION.parse().unwrap(),
        method: GET_PERSON.into(),
        purpose: PURPOSE.parse().unwrap(),
    }
}

/// One provider security server's consent machinery: its revocation feed and
/// its verifier with its own use store.
struct Provider {
    name: &'static str,
    conf: GlobalConfHandle,
    feed: RevocationFeed,
    verifier: ConsentVerifier,
}

impl Provider {
    async fn start(world: &World, name: &'static str) -> Self {
        let conf = world.conf();
        let set = RevocationSet::new(kopir::consent::DEFAULT_MAX_SILENCE);
        let feed = RevocationFeed::spawn(
            conf.clone(),
            identity(world.layout.server_tls(&server(name))),
            set.clone(),
            FeedOptions::default(),
        );
        let uses = store::open(
            &world.path().join("data").join(name.replace('/', "_")),
            None,
        )
        .await
        .unwrap();
        let verifier = ConsentVerifier::new(set, uses);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !feed.set().is_fresh(now_ms()) {
            assert!(
                Instant::now() < deadline,
                "{name}: the feed never became fresh"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            name,
            conf,
            feed,
            verifier,
        }
    }

    async fn check(&self, token: &str, expected: &Expected) -> Result<String, Refusal> {
        let view = self.conf.current().unwrap();
        self.verifier
            .check(&view, Some(token), expected, now_ms())
            .await
            .map(|a| a.consent_id)
    }

    /// Asks every few ms until the answer is refused for `reason`; returns
    /// how long that took.
    async fn until_refused(&self, token: &str, reason: Reason, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            match self.check(token, &expected()).await {
                Err(r) if r.reason == reason => return started.elapsed(),
                Err(r)
                    if r.reason != Reason::ConsentRevoked
                        && r.reason != Reason::ConsentUnverified =>
                {
                    panic!("{}: unexpected refusal {r}", self.name)
                }
                _ => {}
            }
            assert!(
                started.elapsed() < limit,
                "{}: still not refused with {reason} after {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Grant, token, accepted by two providers; revoke; both refuse within 5 s
/// (the latency is printed); then the authority goes away and both fail
/// closed within 5 s.
async fn revocation_reaches_every_provider(backend: Backend) {
    let mut world = World::new(backend).await;
    let consent = world.grant(grant_request()).await;
    let token = world.token(&consent.id).await;
    let providers = [
        Provider::start(&world, "KZ/GOV/MOJ/ss1").await,
        Provider::start(&world, "KZ/GOV/SRC/ss1").await,
    ];
    for p in &providers {
        assert_eq!(
            p.check(&token, &expected()).await.unwrap(),
            consent.id,
            "{}",
            p.name
        );
    }

    let revoked_at = Instant::now();
    let revoked = world
        .portal()
        .revoke(RevokeRequest {
            subject: ALICE.into(),
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    let stored = revoked_at.elapsed();
    assert_ne!(revoked.revoked_at_ms, 0);
    let mut worst = Duration::ZERO;
    for p in &providers {
        let _ = p
            .until_refused(&token, Reason::ConsentRevoked, Duration::from_secs(5))
            .await;
        let latency = revoked_at.elapsed();
        println!(
            "[{backend:?}] revocation refused on {} {:.1} ms after Revoke was called (Revoke itself: {:.1} ms)",
            p.name,
            latency.as_secs_f64() * 1e3,
            stored.as_secs_f64() * 1e3
        );
        worst = worst.max(latency);
    }
    assert!(worst < Duration::from_secs(5), "revocation took {worst:?}");
    // The consumer can no longer obtain a token for it.
    let status = world
        .server_client("KZ/GOV/MLSPP/ss1")
        .await
        .issue_token(IssueTokenRequest {
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentRevoked);

    // A provider that starts later learns of the revocation from the backlog.
    let late = Provider::start(&world, "KZ/GOV/MOJ/ss1").await;
    assert_eq!(
        late.check(&token, &expected()).await.unwrap_err().reason,
        Reason::ConsentRevoked
    );

    // Without the authority, providers fail closed within 5 s.
    let other = world
        .grant(GrantRequest {
            subject: BOB.into(),
            ..grant_request()
        })
        .await;
    let other_token = world.token(&other.id).await;
    let bob = Expected {
        subject: BOB.parse().unwrap(),
        ..expected()
    };
    for p in &providers {
        p.check(&other_token, &bob).await.unwrap();
    }
    let stopped_at = Instant::now();
    world.stop_authority().await;
    for p in &providers {
        let started = Instant::now();
        loop {
            match p.check(&other_token, &bob).await {
                Err(r) if r.reason == Reason::ConsentUnverified => break,
                Err(r) => panic!("{}: unexpected {r}", p.name),
                Ok(_) => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{} did not fail closed",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "[{backend:?}] {} refuses consent-based calls {:.0} ms after the authority stopped",
            p.name,
            stopped_at.elapsed().as_secs_f64() * 1e3
        );
    }
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    for p in providers {
        p.feed.stop().await;
    }
    late.feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_reaches_every_provider_sqlite() {
    revocation_reaches_every_provider(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_reaches_every_provider_postgres() {
    revocation_reaches_every_provider(Backend::Postgres).await;
}

/// Every refusal a provider makes, with real tokens from the authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_refusal_with_real_tokens() {
    let world = World::new(Backend::Sqlite).await;
    let p = Provider::start(&world, "KZ/GOV/MOJ/ss1").await;
    let consent = world.grant(grant_request()).await;
    let token = world.token(&consent.id).await;
    let view = p.conf.current().unwrap();
    let check = |token: Option<String>, expected: Expected, at_ms: i64| {
        let (verifier, view) = (p.verifier.clone(), view.clone());
        async move {
            verifier
                .check(&view, token.as_deref(), &expected, at_ms)
                .await
                .map_err(|r| r.reason)
        }
    };
    check(Some(token.clone()), expected(), now_ms())
        .await
        .unwrap();

    // No token where consent is required.
    assert_eq!(
        check(None, expected(), now_ms()).await.unwrap_err(),
        Reason::ConsentMissing
    );
    // Bad signature.
    let mut forged: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut sig = B64.decode(&forged[2]).unwrap();
    sig[10] ^= 0x40;
    forged[2] = B64.encode(sig);
    assert_eq!(
        check(Some(forged.join(".")), expected(), now_ms())
            .await
            .unwrap_err(),
        Reason::ConsentInvalid
    );
    // Another subject, consumer, service, method or purpose.
    for other in [
        Expected {
            subject: BOB.parse().unwrap(),
            ..expected()
        },
        Expected {
            client: "KZ/GOV/SRC/income".parse().unwrap(),
            ..expected()
        },
        Expected {
            service: "KZ/GOV/SRC/income".parse().unwrap(),
            ..expected()
        },
        Expected {
            method: "/kz.population.v1.PopulationRegistry/ListChildren".into(),
            ..expected()
        },
        Expected {
            purpose: "child-benefit".parse().unwrap(),
            ..expected()
        },
    ] {
        assert_eq!(
            check(Some(token.clone()), other.clone(), now_ms())
                .await
                .unwrap_err(),
            Reason::ConsentMismatch,
            "{other:?}"
        );
    }
    // Purpose unknown.
    assert_eq!(
        check(
            Some(token.clone()),
            Expected {
                purpose: "curiosity".parse().unwrap(),
                ..expected()
            },
            now_ms()
        )
        .await
        .unwrap_err(),
        Reason::PurposeUnknown
    );
    // Not yet valid: a consent from tomorrow.
    let later = world
        .grant(GrantRequest {
            not_before: now() + 86_400,
            not_after: now() + 2 * 86_400,
            ..grant_request()
        })
        .await;
    assert_eq!(
        check(Some(world.token(&later.id).await), expected(), now_ms())
            .await
            .unwrap_err(),
        Reason::ConsentNotYetValid
    );
    // Expired: a consent for two seconds, checked when they are over.
    let short = world
        .grant(GrantRequest {
            not_after: now() + 2,
            ..grant_request()
        })
        .await;
    let short_token = world.token(&short.id).await;
    tokio::time::sleep_until(
        tokio::time::Instant::now()
            + Duration::from_millis(
                u64::try_from((short.not_after - now()) * 1000 + 1000).unwrap_or(3000),
            ),
    )
    .await;
    assert_eq!(
        check(Some(short_token), expected(), now_ms())
            .await
            .unwrap_err(),
        Reason::ConsentExpired
    );
    // Uses exhausted.
    let twice = world
        .grant(GrantRequest {
            max_uses: 2,
            ..grant_request()
        })
        .await;
    let twice_token = world.token(&twice.id).await;
    for _ in 0..2 {
        check(Some(twice_token.clone()), expected(), now_ms())
            .await
            .unwrap();
    }
    assert_eq!(
        check(Some(twice_token), expected(), now_ms())
            .await
            .unwrap_err(),
        Reason::ConsentExhausted
    );
    p.feed.stop().await;
}

/// Who may call what at the authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authority_knows_its_callers() {
    let world = World::new(Backend::Sqlite).await;
    let consent = world.grant(grant_request()).await;
    assert_eq!(consent.subject, ALICE);
    assert_eq!(consent.methods, vec![GET_PERSON.to_string()]);

    // Only the portal grants, lists and revokes.
    let benefits: SubsystemId = BENEFITS.parse().unwrap();
    let mut system = world.client_as(world.layout.client(&benefits));
    let status = system.grant(grant_request()).await.unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentCallerUnknown);
    let status = system
        .list(ListRequest {
            subject: ALICE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentCallerUnknown);

    // A stranger's certificate is refused everywhere.
    let (cert, key) = self_signed_tls("stranger").unwrap();
    let stranger_dir = world.path().join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    std::fs::write(stranger_dir.join("c.crt"), cert).unwrap();
    std::fs::write(stranger_dir.join("c.key"), key).unwrap();
    let mut stranger = world.client_as((stranger_dir.join("c.crt"), stranger_dir.join("c.key")));
    let status = stranger
        .issue_token(IssueTokenRequest {
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentCallerUnknown);

    // The information system named in the consent obtains a token itself (as
    // any gRPC client would), and the token is a standard EdDSA JWS.
    let token = system
        .issue_token(IssueTokenRequest {
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let parts: Vec<&str> = token.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    let signing_cert = load_certs(&world.layout.consent_signing().0).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(
        header["kid"],
        Fingerprint::of(signing_cert[0].as_ref()).to_string()
    );
    assert_eq!(claims["jti"], consent.id);
    assert_eq!(claims["sub"], ALICE);
    assert_eq!(claims["iss"], "KZ/consent");
    let raw_key = public_key(signing_cert[0].as_ref()).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw_key)
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &B64.decode(parts[2]).unwrap(),
        )
        .expect("any Ed25519 implementation verifies the token");

    // A server of another member gets no token for MLSPP's consent.
    let status = world
        .server_client("KZ/GOV/SRC/ss1")
        .await
        .issue_token(IssueTokenRequest {
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentNotFound);

    // Only security servers watch revocations.
    let status = world
        .portal()
        .watch_revocations(WatchRevocationsRequest { since: 0 })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentCallerUnknown);

    // Grants are checked at the edge.
    let mut portal = world.portal();
    for (req, reason) in [
        (
            GrantRequest {
                purpose: "curiosity".into(),
                ..grant_request()
            },
            Reason::PurposeUnknown,
        ),
        (
            GrantRequest {
                purpose: "child-benefit".into(),
                ..grant_request()
            },
            Reason::ConsentRequestInvalid,
        ),
        (
            GrantRequest {
                subject: "iin:900101300123".into(),
                ..grant_request()
            },
            Reason::ConsentRequestInvalid,
        ),
        (
            GrantRequest {
                methods: vec!["*".into()],
                ..grant_request()
            },
            Reason::ConsentRequestInvalid,
        ),
        (
            GrantRequest {
                methods: vec![],
                ..grant_request()
            },
            Reason::ConsentRequestInvalid,
        ),
        (
            GrantRequest {
                not_after: now() - 1,
                ..grant_request()
            },
            Reason::ConsentRequestInvalid,
        ),
        (
            GrantRequest {
                service: "KZ/GOV/XXX/nothing".into(),
                ..grant_request()
            },
            Reason::ServiceUnknown,
        ),
    ] {
        let status = portal.grant(req.clone()).await.unwrap_err();
        assert_eq!(refusal(status).reason, reason, "{req:?}");
    }

    // A subject lists their own consents and revokes only those.
    world
        .grant(GrantRequest {
            subject: BOB.into(),
            ..grant_request()
        })
        .await;
    let listed = portal
        .list(ListRequest {
            subject: ALICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .consents;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, consent.id);
    let status = portal
        .revoke(RevokeRequest {
            subject: BOB.into(),
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(status).reason, Reason::ConsentNotFound);
    let first = portal
        .revoke(RevokeRequest {
            subject: ALICE.into(),
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    let again = portal
        .revoke(RevokeRequest {
            subject: ALICE.into(),
            consent_id: consent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    assert_eq!(
        first.revoked_at_ms, again.revoked_at_ms,
        "revoking twice keeps the first"
    );
}
