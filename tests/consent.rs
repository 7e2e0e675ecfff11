//! End-to-end tests of consent on the exchange path: the demo federation on
//! 127.0.0.1:0 (three security servers, the consent authority, the mock
//! registries) with real mutual TLS and a real signed global configuration;
//! consents granted through a real tonic client holding the portal's
//! certificate, real tokens from `IssueToken`, and real reads by the benefits
//! system through its security server, each refusal checked for its status,
//! its `kopir-error` reason, the provider's audit record and an untouched
//! registry.
//!
//! The revocation test runs once on the embedded stores and once on a
//! throwaway PostgreSQL cluster.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use common::{assert_refused, with_meta};
use kopir_audit::{Side, Step, record::StoredRecord};
use kopir_consent::revocations::Status as RevocationStatus;
use kopir_core::{
    clock::now_ms,
    error::{ERROR_KEY, REQUEST_ID_KEY, Reason},
    id::{Iin, ServerId, SubsystemId},
    pki::{Fingerprint, dev::self_signed_tls, load_certs, public_key},
};
use kopir_pgtest::TempPostgres;
use kopir_proto::v1::{
    Consent, GrantRequest, IssueTokenRequest, ListRequest, RevokeRequest, WatchRevocationsRequest,
    consent_service_client::ConsentServiceClient,
};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::{
        income::v1::{GetDeclaredIncomeRequest, income_registry_client::IncomeRegistryClient},
        population::v1::{
            GetPersonRequest, ListChildrenRequest,
            population_registry_client::PopulationRegistryClient,
        },
        realty::v1::{ListPropertiesRequest, realty_registry_client::RealtyRegistryClient},
    },
    registry::LAST_TAX_YEAR,
};
use tonic::{Code, Status, transport::Channel};

const POPULATION: &str = "KZ/GOV/MOJ/population";
const INCOME: &str = "KZ/GOV/SRC/income";
const REALTY: &str = "KZ/GOV/MOJ/realty";
const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
const LIST_CHILDREN: &str = "/kz.population.v1.PopulationRegistry/ListChildren";
const GET_INCOME: &str = "/kz.income.v1.IncomeRegistry/GetDeclaredIncome";
const LIST_PROPERTIES: &str = "/kz.realty.v1.RealtyRegistry/ListProperties";
/// The demo's purpose that rests on consent, and one that rests on law.
const MEANS_TEST: &str = "benefit-means-test";
const CHILD_BENEFIT: &str = "child-benefit";
/// A second consent-based purpose, which MOJ allows in this test.
const KINDERGARTEN: &str = "kindergarten-queue";

/// Where the authority and the servers keep their stores.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct World {
    fed: LocalFederation,
    benefits: Channel,
    alice: Iin,
    bob: Iin,
    _dir: tempfile::TempDir,
    _pg: Option<Arc<TempPostgres>>,
}

/// One read by the benefits system through its security server.
#[derive(Debug, Clone)]
struct Read {
    method: &'static str,
    purpose: &'static str,
    subject: Iin,
    token: Option<String>,
}

fn now() -> i64 {
    now_ms() / 1000
}

fn reason_of(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_KEY)
        .and_then(|v| v.to_str().ok())
}

impl World {
    async fn launch(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TempPostgres::shared().unwrap_or_else(|e| {
                panic!("the PostgreSQL consent tests need PostgreSQL installed: {e}")
            })),
        };
        let mut urls = Vec::new();
        if let Some(pg) = &pg {
            for _ in 0..4 {
                urls.push(pg.create_database().await.unwrap());
            }
        }
        let server_urls = urls.clone();
        let fed = LocalFederation::launch_with(
            dir.path(),
            &|name, config| {
                // MOJ also lets the benefits system read the population
                // register for the kindergarten queue, with consent.
                if name == "moj" {
                    for rule in &mut config.access {
                        if rule.service.to_string() == POPULATION {
                            rule.purposes.push(KINDERGARTEN.parse().unwrap());
                        }
                    }
                }
                let i = ["mlspp", "moj", "src"].iter().position(|n| *n == name);
                if let Some(url) = i.and_then(|i| server_urls.get(i)) {
                    config.audit.database = Some(url.clone());
                }
            },
            &|consent| consent.database = urls.get(3).cloned(),
        )
        .await
        .unwrap();
        let [alice, bob] = fed.dataset.sample_parents(2)[..] else {
            panic!("the mock registers have two parents")
        };
        let benefits = fed.client_channel("mlspp", BENEFITS).await.unwrap();
        Self {
            fed,
            benefits,
            alice,
            bob,
            _dir: dir,
            _pg: pg,
        }
    }

    fn consent_as(
        &self,
        identity: (std::path::PathBuf, std::path::PathBuf),
    ) -> ConsentServiceClient<Channel> {
        ConsentServiceClient::new(self.fed.consent_channel(identity).unwrap())
    }

    fn portal(&self) -> ConsentServiceClient<Channel> {
        self.consent_as(self.fed.layout.portal())
    }

    fn server_tls(&self, id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        self.fed.layout.server_tls(&id.parse::<ServerId>().unwrap())
    }

    /// A grant for `subject` to the benefits system's reads of `service`'s
    /// `method`, for the means test, valid for an hour.
    fn grant_request(&self, subject: Iin, service: &str, method: &str) -> GrantRequest {
        GrantRequest {
            subject: format!("iin:{subject}"),
            client: BENEFITS.into(),
            service: service.into(),
            methods: vec![method.into()],
            purpose: MEANS_TEST.into(),
            not_before: now() - 60,
            not_after: now() + 3600,
            max_uses: 0,
        }
    }

    async fn grant(&self, request: GrantRequest) -> Consent {
        self.portal()
            .grant(request)
            .await
            .unwrap()
            .into_inner()
            .consent
            .unwrap()
    }

    /// The token of a consent, as the benefits system obtains it.
    async fn token(&self, consent_id: &str) -> String {
        let benefits: SubsystemId = BENEFITS.parse().unwrap();
        self.consent_as(self.fed.layout.client(&benefits))
            .issue_token(IssueTokenRequest {
                consent_id: consent_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Grants a consent and returns it with its token.
    async fn consent(&self, request: GrantRequest) -> (Consent, String) {
        let consent = self.grant(request).await;
        let token = self.token(&consent.id).await;
        (consent, token)
    }

    /// Makes `read` with request id `id`; `Ok` is the id the server echoed.
    async fn read(&self, read: &Read, id: &str) -> Result<String, Status> {
        let subject = format!("iin:{}", read.subject);
        let service = match read.method {
            GET_INCOME => INCOME,
            LIST_PROPERTIES => REALTY,
            _ => POPULATION,
        };
        let mut pairs = vec![
            ("kopir-client", BENEFITS),
            ("kopir-service", service),
            ("kopir-purpose", read.purpose),
            ("kopir-subject", subject.as_str()),
            ("kopir-user", "officer-7"),
            (REQUEST_ID_KEY, id),
        ];
        if let Some(token) = &read.token {
            pairs.push(("kopir-consent", token));
        }
        let iin = read.subject.to_string();
        let ch = self.benefits.clone();
        let md = match read.method {
            GET_PERSON => PopulationRegistryClient::new(ch)
                .get_person(with_meta(GetPersonRequest { iin }, &pairs))
                .await
                .map(|r| r.metadata().clone()),
            LIST_CHILDREN => PopulationRegistryClient::new(ch)
                .list_children(with_meta(ListChildrenRequest { iin }, &pairs))
                .await
                .map(|r| r.metadata().clone()),
            GET_INCOME => IncomeRegistryClient::new(ch)
                .get_declared_income(with_meta(
                    GetDeclaredIncomeRequest {
                        iin,
                        year: LAST_TAX_YEAR,
                    },
                    &pairs,
                ))
                .await
                .map(|r| r.metadata().clone()),
            LIST_PROPERTIES => RealtyRegistryClient::new(ch)
                .list_properties(with_meta(ListPropertiesRequest { iin }, &pairs))
                .await
                .map(|r| r.metadata().clone()),
            other => panic!("no client for {other}"),
        }?;
        Ok(md
            .get(REQUEST_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned())
    }

    /// Calls the registries received, all together.
    fn registry_calls(&self) -> u64 {
        self.fed.registries.values().map(|r| r.calls()).sum()
    }

    async fn records(&self, node: &str, request_id: &str) -> Vec<StoredRecord> {
        self.fed.records(node, request_id).await.unwrap()
    }

    /// The basis the provider `node` recorded when it accepted `request_id`.
    async fn accepted_basis(&self, node: &str, request_id: &str) -> String {
        let records = self.records(node, request_id).await;
        let accepted = records
            .iter()
            .find(|r| r.entry.side == Side::Provider && r.entry.step == Step::Accepted)
            .unwrap_or_else(|| panic!("{node} accepted {request_id}: {records:#?}"));
        accepted.entry.basis.clone().unwrap()
    }

    /// Asserts that `read` is refused with `reason`, that the registry was
    /// not called, and, if the refusal is the provider's (`node`), that it
    /// recorded it.
    async fn assert_read_refused(&self, read: &Read, id: &str, reason: Reason, node: Option<&str>) {
        let calls = self.registry_calls();
        let status = self.read(read, id).await.unwrap_err();
        assert_refused(&status, reason.code(), reason.as_str());
        assert_eq!(
            self.registry_calls(),
            calls,
            "{id}: the registry was called"
        );
        if let Some(node) = node {
            let records = self.records(node, id).await;
            assert!(
                records.iter().any(|r| r.entry.side == Side::Provider
                    && r.entry.step == Step::Refused
                    && r.entry.reason.as_deref() == Some(reason.as_str())),
                "{node} recorded the refusal of {id}: {records:#?}"
            );
        }
    }

    /// Makes `read` until it is refused with `reason` or `limit` passes;
    /// returns how long after `since` the refusal came.
    async fn until_refused(
        &self,
        read: &Read,
        reason: Reason,
        since: Instant,
        limit: Duration,
    ) -> Duration {
        loop {
            let id = format!("poll-{}", POLLS.fetch_add(1, Ordering::Relaxed));
            match self.read(read, &id).await {
                Err(s) if reason_of(&s) == Some(reason.as_str()) => return since.elapsed(),
                Err(s) => panic!("unexpected refusal while waiting for {reason}: {s:?}"),
                Ok(_) => {}
            }
            assert!(
                since.elapsed() < limit,
                "{read:?} still not refused with {reason} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Request ids of polling reads, unique within the test binary.
static POLLS: AtomicU64 = AtomicU64::new(0);

/// Every refusal of a consent-based read, through real exchanges with real
/// tokens; and the legal-basis path, which needs no token and records its act.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_refusal_through_the_exchange() {
    let w = World::launch(Backend::Sqlite).await;
    let (alice, bob) = (w.alice, w.bob);

    // Legal basis: no token, and the provider records the act.
    let legal = Read {
        method: GET_PERSON,
        purpose: CHILD_BENEFIT,
        subject: alice,
        token: None,
    };
    w.read(&legal, "legal-1").await.unwrap();
    let basis = w.accepted_basis("moj", "legal-1").await;
    assert!(
        basis.starts_with("legal:Social Code of the Republic of Kazakhstan, art. 146"),
        "{basis}"
    );

    // Consent: the token allows the read, and the provider records the consent.
    let (income, token) = w.consent(w.grant_request(alice, INCOME, GET_INCOME)).await;
    let read = Read {
        method: GET_INCOME,
        purpose: MEANS_TEST,
        subject: alice,
        token: Some(token.clone()),
    };
    w.read(&read, "consent-1").await.unwrap();
    assert_eq!(
        w.accepted_basis("src", "consent-1").await,
        format!("consent:{}", income.id)
    );

    // No token where consent is required.
    let no_token = Read {
        token: None,
        ..read.clone()
    };
    w.assert_read_refused(&no_token, "missing-1", Reason::ConsentMissing, Some("src"))
        .await;

    // A bad signature.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut sig = B64.decode(&parts[2]).unwrap();
    sig[10] ^= 0x40;
    parts[2] = B64.encode(sig);
    let forged = Read {
        token: Some(parts.join(".")),
        ..read.clone()
    };
    w.assert_read_refused(&forged, "forged-1", Reason::ConsentInvalid, Some("src"))
        .await;

    // Alice's token for Bob's income.
    let other_subject = Read {
        subject: bob,
        ..read.clone()
    };
    w.assert_read_refused(
        &other_subject,
        "subject-1",
        Reason::ConsentMismatch,
        Some("src"),
    )
    .await;

    // A consent given to another consumer (SRC's own system), whose token its
    // security server obtained, presented by the benefits system.
    let for_src = w
        .grant(GrantRequest {
            client: INCOME.into(),
            ..w.grant_request(alice, INCOME, GET_INCOME)
        })
        .await;
    let src_token = w
        .consent_as(w.server_tls("KZ/GOV/SRC/ss1"))
        .issue_token(IssueTokenRequest {
            consent_id: for_src.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let other_client = Read {
        token: Some(src_token),
        ..read.clone()
    };
    w.assert_read_refused(
        &other_client,
        "client-1",
        Reason::ConsentMismatch,
        Some("src"),
    )
    .await;

    // A real-estate consent presented for income.
    let (_, realty_token) = w
        .consent(w.grant_request(alice, REALTY, LIST_PROPERTIES))
        .await;
    let other_service = Read {
        token: Some(realty_token),
        ..read.clone()
    };
    w.assert_read_refused(
        &other_service,
        "service-1",
        Reason::ConsentMismatch,
        Some("src"),
    )
    .await;

    // A consent to GetPerson presented for ListChildren, then for another
    // consent-based purpose.
    let (_, person_token) = w
        .consent(w.grant_request(alice, POPULATION, GET_PERSON))
        .await;
    let person = Read {
        method: GET_PERSON,
        purpose: MEANS_TEST,
        subject: alice,
        token: Some(person_token),
    };
    w.read(&person, "person-1").await.unwrap();
    let other_method = Read {
        method: LIST_CHILDREN,
        ..person.clone()
    };
    w.assert_read_refused(
        &other_method,
        "method-1",
        Reason::ConsentMismatch,
        Some("moj"),
    )
    .await;
    let other_purpose = Read {
        purpose: KINDERGARTEN,
        ..person.clone()
    };
    w.assert_read_refused(
        &other_purpose,
        "purpose-1",
        Reason::ConsentMismatch,
        Some("moj"),
    )
    .await;

    // A purpose the global configuration does not know (refused by the
    // consumer's server, before anything is sent).
    let unknown = Read {
        purpose: "curiosity",
        ..read.clone()
    };
    w.assert_read_refused(&unknown, "unknown-1", Reason::PurposeUnknown, None)
        .await;

    // Not yet valid: a consent from tomorrow.
    let (_, later) = w
        .consent(GrantRequest {
            not_before: now() + 86_400,
            not_after: now() + 2 * 86_400,
            ..w.grant_request(alice, INCOME, GET_INCOME)
        })
        .await;
    let not_yet = Read {
        token: Some(later),
        ..read.clone()
    };
    w.assert_read_refused(&not_yet, "later-1", Reason::ConsentNotYetValid, Some("src"))
        .await;

    // Uses exhausted: two reads, then no more.
    let (_, twice) = w
        .consent(GrantRequest {
            max_uses: 2,
            ..w.grant_request(alice, INCOME, GET_INCOME)
        })
        .await;
    let limited = Read {
        token: Some(twice),
        ..read.clone()
    };
    w.read(&limited, "twice-1").await.unwrap();
    w.read(&limited, "twice-2").await.unwrap();
    w.assert_read_refused(&limited, "twice-3", Reason::ConsentExhausted, Some("src"))
        .await;

    // Expired: a consent for two seconds, used when they are over.
    let (short, short_token) = w
        .consent(GrantRequest {
            not_after: now() + 2,
            ..w.grant_request(alice, INCOME, GET_INCOME)
        })
        .await;
    let expiring = Read {
        token: Some(short_token),
        ..read.clone()
    };
    tokio::time::sleep(Duration::from_millis(
        u64::try_from((short.not_after - now()) * 1000 + 1000).unwrap_or(3000),
    ))
    .await;
    w.assert_read_refused(&expiring, "expired-1", Reason::ConsentExpired, Some("src"))
        .await;

    // The first token still works: none of these refusals used it up.
    w.read(&read, "consent-2").await.unwrap();
    w.fed.shutdown().await;
}

/// Grants and tokens for Alice's income (SRC) and real estate (MOJ); both are
/// revoked and every provider refuses them within 5 s (the latency is
/// printed), while legal-basis reads go on; then the consent authority goes
/// away and consent-based reads fail closed within 5 s.
async fn revocation_reaches_every_provider(backend: Backend) {
    let mut w = World::launch(backend).await;
    let alice = w.alice;
    let (income, income_token) = w.consent(w.grant_request(alice, INCOME, GET_INCOME)).await;
    let (realty, realty_token) = w
        .consent(w.grant_request(alice, REALTY, LIST_PROPERTIES))
        .await;
    let reads = [
        (
            "src",
            Read {
                method: GET_INCOME,
                purpose: MEANS_TEST,
                subject: alice,
                token: Some(income_token),
            },
        ),
        (
            "moj",
            Read {
                method: LIST_PROPERTIES,
                purpose: MEANS_TEST,
                subject: alice,
                token: Some(realty_token),
            },
        ),
    ];
    for (node, read) in &reads {
        w.read(read, &format!("before-{node}")).await.unwrap();
    }

    let revoked_at = Instant::now();
    let mut portal = w.portal();
    for consent in [&income, &realty] {
        let revoked = portal
            .revoke(RevokeRequest {
                subject: format!("iin:{alice}"),
                consent_id: consent.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .consent
            .unwrap();
        assert_ne!(revoked.revoked_at_ms, 0);
    }
    let stored = revoked_at.elapsed();
    for (node, read) in &reads {
        let latency = w
            .until_refused(
                read,
                Reason::ConsentRevoked,
                revoked_at,
                Duration::from_secs(5),
            )
            .await;
        println!(
            "[{backend:?}] {node} refused the revoked consent {:.1} ms after Revoke was called (both Revokes: {:.1} ms)",
            latency.as_secs_f64() * 1e3,
            stored.as_secs_f64() * 1e3
        );
    }
    // Every server heard of both revocations, the consumer's included.
    for (name, node) in &w.fed.nodes {
        for consent in [&income, &realty] {
            assert_eq!(
                node.server.revocations().status(&consent.id, now_ms()),
                RevocationStatus::Revoked,
                "{name} knows {} is revoked",
                consent.id
            );
        }
    }
    // The consumer can no longer obtain a token for it.
    let benefits: SubsystemId = BENEFITS.parse().unwrap();
    let status = w
        .consent_as(w.fed.layout.client(&benefits))
        .issue_token(IssueTokenRequest {
            consent_id: income.id.clone(),
        })
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "consent.revoked");

    // Without the authority, providers fail closed within 5 s; reads on a
    // legal basis are not affected.
    let (_, bob_token) = w.consent(w.grant_request(w.bob, INCOME, GET_INCOME)).await;
    let bob_read = Read {
        method: GET_INCOME,
        purpose: MEANS_TEST,
        subject: w.bob,
        token: Some(bob_token),
    };
    w.read(&bob_read, "bob-1").await.unwrap();
    let stopped_at = Instant::now();
    w.fed.consent.take().unwrap().shutdown().await;
    let latency = w
        .until_refused(
            &bob_read,
            Reason::ConsentUnverified,
            stopped_at,
            Duration::from_secs(5),
        )
        .await;
    println!(
        "[{backend:?}] consent-based reads refused as unverified {:.0} ms after the authority stopped",
        latency.as_secs_f64() * 1e3
    );
    let legal = Read {
        method: GET_PERSON,
        purpose: CHILD_BENEFIT,
        subject: alice,
        token: None,
    };
    w.read(&legal, "legal-after").await.unwrap();
    w.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_reaches_every_provider_sqlite() {
    revocation_reaches_every_provider(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_reaches_every_provider_postgres() {
    revocation_reaches_every_provider(Backend::Postgres).await;
}

/// Who may call what at the authority, and what a grant must say.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authority_knows_its_callers() {
    let w = World::launch(Backend::Sqlite).await;
    let (alice, bob) = (w.alice, w.bob);
    let grant_request = || w.grant_request(alice, POPULATION, GET_PERSON);
    let consent = w.grant(grant_request()).await;
    assert_eq!(consent.subject, format!("iin:{alice}"));
    assert_eq!(consent.methods, vec![GET_PERSON.to_string()]);
    let refused = |status: Status, reason: Reason| {
        assert_refused(&status, reason.code(), reason.as_str());
    };

    // Only the portal grants, lists and revokes.
    let benefits: SubsystemId = BENEFITS.parse().unwrap();
    let mut system = w.consent_as(w.fed.layout.client(&benefits));
    refused(
        system.grant(grant_request()).await.unwrap_err(),
        Reason::ConsentCallerUnknown,
    );
    refused(
        system
            .list(ListRequest {
                subject: format!("iin:{alice}"),
            })
            .await
            .unwrap_err(),
        Reason::ConsentCallerUnknown,
    );

    // A stranger's certificate is refused.
    let (cert, key) = self_signed_tls("stranger").unwrap();
    let stranger_dir = w.fed.dir.join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    std::fs::write(stranger_dir.join("c.crt"), cert).unwrap();
    std::fs::write(stranger_dir.join("c.key"), key).unwrap();
    let mut stranger = w.consent_as((stranger_dir.join("c.crt"), stranger_dir.join("c.key")));
    refused(
        stranger
            .issue_token(IssueTokenRequest {
                consent_id: consent.id.clone(),
            })
            .await
            .unwrap_err(),
        Reason::ConsentCallerUnknown,
    );

    // The information system named in the consent obtains a token itself (as
    // any gRPC client would), and the token is a standard EdDSA JWS.
    let token = w.token(&consent.id).await;
    let parts: Vec<&str> = token.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    let signing_cert = load_certs(&w.fed.layout.consent_signing().0).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(
        header["kid"],
        Fingerprint::of(signing_cert[0].as_ref()).to_string()
    );
    assert_eq!(claims["jti"], consent.id);
    assert_eq!(claims["sub"], format!("iin:{alice}"));
    assert_eq!(claims["iss"], "KZ/consent");
    let raw_key = public_key(signing_cert[0].as_ref()).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw_key)
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &B64.decode(parts[2]).unwrap(),
        )
        .expect("any Ed25519 implementation verifies the token");

    // A server of another member gets no token for MLSPP's consent.
    refused(
        w.consent_as(w.server_tls("KZ/GOV/SRC/ss1"))
            .issue_token(IssueTokenRequest {
                consent_id: consent.id.clone(),
            })
            .await
            .unwrap_err(),
        Reason::ConsentNotFound,
    );

    // Only security servers watch revocations.
    refused(
        w.portal()
            .watch_revocations(WatchRevocationsRequest { since: 0 })
            .await
            .unwrap_err(),
        Reason::ConsentCallerUnknown,
    );

    // Grants are checked at the edge.
    let mut portal = w.portal();
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
                purpose: CHILD_BENEFIT.into(),
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
        assert_eq!(reason_of(&status), Some(reason.as_str()), "{req:?}");
    }

    // A subject lists their own consents and revokes only those.
    w.grant(w.grant_request(bob, POPULATION, GET_PERSON)).await;
    let listed = portal
        .list(ListRequest {
            subject: format!("iin:{alice}"),
        })
        .await
        .unwrap()
        .into_inner()
        .consents;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, consent.id);
    refused(
        portal
            .revoke(RevokeRequest {
                subject: format!("iin:{bob}"),
                consent_id: consent.id.clone(),
            })
            .await
            .unwrap_err(),
        Reason::ConsentNotFound,
    );
    let revoke = RevokeRequest {
        subject: format!("iin:{alice}"),
        consent_id: consent.id.clone(),
    };
    let first = portal.revoke(revoke.clone()).await.unwrap().into_inner();
    let again = portal.revoke(revoke).await.unwrap().into_inner();
    assert_eq!(
        first.consent.unwrap().revoked_at_ms,
        again.consent.unwrap().revoked_at_ms,
        "revoking twice keeps the first"
    );
    w.fed.shutdown().await;
}
