//! End-to-end tests of the citizen's access report: the demo federation on
//! 127.0.0.1:0, real reads through the security servers (some grouped, some
//! covert, one refused, some of another person), then the report as the
//! portal and an auditor get it from every provider's server over mutual
//! TLS, and as `kopir audit subject` prints it. Covert reads are hidden by
//! real time passing: one is hidden for a month, one for a few seconds that
//! the test waits out; nothing fakes the servers' clocks.

mod common;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use common::{assert_refused, with_meta};
use kopir_audit::{Side, Step};
use kopir_consent::channel::Identity;
use kopir_core::{
    clock::now_ms,
    globalconf::{ConfView, model::ReaderRole, watch},
    id::{Iin, Subject},
    meta::CallMeta,
    pki::{
        Fingerprint, load_certs, load_key, sha256,
        sign::{SigningKey, VerifyingKey},
        tls::pinned_client_config,
    },
};
use kopir_pgtest::TempPostgres;
use kopir_proto::v1::{
    ForwardRequest, ReportRequest, ReportResponse, access_report_client::AccessReportClient,
    exchange_client::ExchangeClient,
};
use kopir_server::{
    exchange::envelope,
    report::{FederationReport, Outcome, REPORT_METHOD, ReportEntry, assemble, assertion::Claims},
};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation, tls_channel},
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
use prost::Message;
use tonic::{Code, Status, transport::Channel};

const POPULATION: &str = "KZ/GOV/MOJ/population";
const REALTY: &str = "KZ/GOV/MOJ/realty";
const INCOME: &str = "KZ/GOV/SRC/income";
const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
const MOJ: &str = "KZ/GOV/MOJ/ss1";
const SRC: &str = "KZ/GOV/SRC/ss1";
const FRAUD: &str = "benefit-fraud-inquiry";
const CLAIM: &str = "claim-2026-0417";
const MEANS_TEST: &str = "benefit-means-test";

/// Who asks for a report.
#[derive(Debug, Clone, Copy)]
enum Caller {
    Portal,
    Auditor,
    Operator,
    /// MLSPP's security server.
    Server,
    /// The benefits information system.
    InformationSystem,
}

struct Harness {
    fed: LocalFederation,
    _dir: tempfile::TempDir,
    _pg: Option<Arc<TempPostgres>>,
    a: Iin,
    b: Iin,
    view: Arc<ConfView>,
}

async fn launch() -> Harness {
    launch_on(false).await
}

/// The federation, with the servers' audit logs in PostgreSQL if `postgres`.
async fn launch_on(postgres: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (fed, pg) = common::federation_with_audit_in(dir.path(), postgres).await;
    let parents = fed.dataset.sample_parents(2);
    let anchors = vec![VerifyingKey::load(&fed.layout.authority_cert()).unwrap()];
    let view = watch::read(&fed.globalconf_path, &anchors).unwrap();
    Harness {
        a: parents[0],
        b: parents[1],
        fed,
        _dir: dir,
        _pg: pg,
        view,
    }
}

fn subject(iin: &Iin) -> String {
    format!("iin:{iin}")
}

/// Today + `days`, as `YYYY-MM-DD`.
fn date_in(days: i64) -> String {
    let d = (time::OffsetDateTime::now_utc() + time::Duration::days(days)).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Midnight UTC of today + `days`, ms.
fn midnight_in(days: i64) -> i64 {
    let d = (time::OffsetDateTime::now_utc() + time::Duration::days(days)).date();
    (d.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Harness {
    async fn benefits(&self) -> Channel {
        self.fed.client_channel("mlspp", BENEFITS).await.unwrap()
    }

    /// The `kopir-*` headers of a read of `iin` for `purpose` as `id`, with more.
    fn meta<'a>(
        &self,
        service: &'a str,
        purpose: &'a str,
        iin: &'a str,
        id: &'a str,
        more: &[(&'static str, &'a str)],
    ) -> Vec<(&'static str, &'a str)> {
        let mut pairs = vec![
            ("kopir-client", BENEFITS),
            ("kopir-service", service),
            ("kopir-purpose", purpose),
            ("kopir-subject", iin),
            ("kopir-request-id", id),
        ];
        pairs.extend_from_slice(more);
        pairs
    }

    async fn get_person(
        &self,
        iin: &Iin,
        purpose: &str,
        id: &str,
        more: &[(&'static str, &str)],
    ) -> Result<(), Status> {
        let s = subject(iin);
        let req = with_meta(
            GetPersonRequest {
                iin: iin.to_string(),
            },
            &self.meta(POPULATION, purpose, &s, id, more),
        );
        PopulationRegistryClient::new(self.benefits().await)
            .get_person(req)
            .await
            .map(|_| ())
    }

    /// A consent of `iin` to the benefits system's means-test reads of
    /// `service`'s `method`, granted through the portal, and the token the
    /// benefits system obtains for it.
    async fn consent(&self, iin: &Iin, service: &str, method: &str) -> (String, String) {
        self.fed
            .benefits_consent(&subject(iin), service, method, MEANS_TEST)
            .await
            .unwrap()
    }

    /// A TLS identity of `caller`.
    fn identity(&self, caller: Caller) -> Identity {
        let l = &self.fed.layout;
        let (cert, key) = match caller {
            Caller::Portal => l.portal(),
            Caller::Auditor => l.auditor("dpa"),
            Caller::Operator => l.operator(),
            Caller::Server => {
                let c = &self.fed.node("mlspp").config;
                (c.tls.cert.clone(), c.tls.key.clone())
            }
            Caller::InformationSystem => l.client(&BENEFITS.parse().unwrap()),
        };
        (load_certs(&cert).unwrap(), load_key(&key).unwrap())
    }

    /// A fresh portal assertion naming `iin`.
    fn assertion(&self, iin: &Iin) -> String {
        let (cert, key) = self.fed.layout.portal_signing();
        let signer = SigningKey::load(&cert, &key).unwrap();
        let subject: Subject = subject(iin).parse().unwrap();
        Claims::new("portal", &subject, now_ms() / 1000, 60).sign(&signer)
    }

    fn request(&self, iin: &Iin, assertion: String, include_refused: bool) -> ReportRequest {
        ReportRequest {
            subject: subject(iin),
            assertion,
            include_refused,
            ..Default::default()
        }
    }

    /// The portal's federation-wide report of `iin`.
    async fn portal_report(&self, iin: &Iin) -> FederationReport {
        let subject = subject(iin).parse().unwrap();
        self.fed
            .access_report(&subject, ReaderRole::Portal, false)
            .await
            .unwrap()
    }

    /// The auditor's federation-wide report of `iin`.
    async fn auditor_report(&self, iin: &Iin, include_refused: bool) -> FederationReport {
        let subject = subject(iin).parse().unwrap();
        self.fed
            .access_report(&subject, ReaderRole::Auditor, include_refused)
            .await
            .unwrap()
    }

    /// One server's report, asked directly on its peer port as `caller`.
    async fn report_from(
        &self,
        node: &str,
        caller: Caller,
        req: ReportRequest,
    ) -> Result<ReportResponse, Status> {
        let n = self.fed.node(node);
        let pin = Fingerprint::of(load_certs(&n.config.tls.cert).unwrap()[0].as_ref());
        let (chain, key) = self.identity(caller);
        let tls = pinned_client_config(chain, key, vec![pin]).unwrap();
        let channel = tls_channel(n.server.peer_addr, tls).await.unwrap();
        AccessReportClient::new(channel)
            .report(req)
            .await
            .map(|r| r.into_inner())
    }

    /// A request from MLSPP signed with its key and sent straight to MOJ's
    /// peer port (so that the provider's own checks are the ones tested).
    async fn forward_to_moj(&self, pairs: &[(&'static str, &str)]) -> Result<(), Status> {
        let c = &self.fed.node("mlspp").config;
        let signer = SigningKey::load(&c.signing.cert, &c.signing.key).unwrap();
        let body = GetPersonRequest {
            iin: self.a.to_string(),
        }
        .encode_to_vec();
        let headers = with_meta((), pairs).metadata().clone().into_headers();
        let meta = CallMeta::from_headers(GET_PERSON, &headers).unwrap();
        let header = meta.to_header(now_ms(), sha256(&body));
        let (signature, _) = envelope::sign_request(&header, c.server_id.member(), &signer);
        let moj = self.fed.node("moj");
        let pin = Fingerprint::of(load_certs(&moj.config.tls.cert).unwrap()[0].as_ref());
        let tls = pinned_client_config(
            load_certs(&c.tls.cert).unwrap(),
            load_key(&c.tls.key).unwrap(),
            vec![pin],
        )
        .unwrap();
        let mut client = ExchangeClient::new(tls_channel(moj.server.peer_addr, tls).await.unwrap());
        client
            .forward(ForwardRequest {
                header: Some(header),
                signature: Some(signature),
                body: body.into(),
            })
            .await
            .map(|_| ())
    }
}

fn ids(entries: &[ReportEntry]) -> BTreeSet<&str> {
    entries.iter().map(|e| e.query_id.as_str()).collect()
}

fn entry<'a>(r: &'a FederationReport, id: &str) -> &'a ReportEntry {
    r.entries
        .iter()
        .find(|e| e.query_id == id)
        .unwrap_or_else(|| panic!("no entry {id} in {:#?}", r.entries))
}

#[track_caller]
fn assert_complete(r: &FederationReport) {
    let servers: Vec<&str> = r.sources.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(
        servers,
        vec![MOJ, SRC],
        "every provider of personal data is asked"
    );
    assert!(r.complete(), "{:#?}", r.sources);
}

/// Runs `kopir` with `args`; returns its standard output.
fn kopir(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kopir {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_ids(text: &str) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["query_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_lists_exactly_the_reads_and_discloses_covert_ones_after_their_date() {
    let h = launch().await;
    let a = subject(&h.a);
    let officer = [("kopir-user", "officer-17"), ("kopir-query-group", CLAIM)];

    // The benefit claim of A: four reads, three of one procedure; the means
    // test's two rest on A's consent.
    let (income_consent, income_token) = h
        .consent(
            &h.a,
            INCOME,
            "/kz.income.v1.IncomeRegistry/GetDeclaredIncome",
        )
        .await;
    let (realty_consent, realty_token) = h
        .consent(&h.a, REALTY, "/kz.realty.v1.RealtyRegistry/ListProperties")
        .await;
    h.get_person(&h.a, "child-benefit", "a-1", &officer)
        .await
        .unwrap();
    let channel = h.benefits().await;
    PopulationRegistryClient::new(channel.clone())
        .list_children(with_meta(
            ListChildrenRequest {
                iin: h.a.to_string(),
            },
            &h.meta(POPULATION, "child-benefit", &a, "a-2", &officer),
        ))
        .await
        .unwrap();
    IncomeRegistryClient::new(channel.clone())
        .get_declared_income(with_meta(
            GetDeclaredIncomeRequest {
                iin: h.a.to_string(),
                year: LAST_TAX_YEAR,
            },
            &h.meta(
                INCOME,
                MEANS_TEST,
                &a,
                "a-3",
                &[officer[0], officer[1], ("kopir-consent", &income_token)],
            ),
        ))
        .await
        .unwrap();
    RealtyRegistryClient::new(channel.clone())
        .list_properties(with_meta(
            ListPropertiesRequest {
                iin: h.a.to_string(),
            },
            &h.meta(
                REALTY,
                MEANS_TEST,
                &a,
                "a-4",
                &[("kopir-consent", &realty_token)],
            ),
        ))
        .await
        .unwrap();
    // A covert inquiry: one read hidden for a month, one for a few seconds.
    let month = date_in(30);
    h.get_person(
        &h.a,
        FRAUD,
        "a-5",
        &[
            ("kopir-user", "inspector-3"),
            ("kopir-query-group", "fraud-17"),
            ("kopir-hide-until", &month),
            ("kopir-hide-reason", "inquiry 17/2026 (Law on OIA, art. 11)"),
        ],
    )
    .await
    .unwrap();
    let soon_ms = now_ms() + 3000;
    let soon = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(soon_ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    h.get_person(
        &h.a,
        FRAUD,
        "a-6",
        &[
            ("kopir-user", "inspector-3"),
            ("kopir-hide-until", &soon),
            ("kopir-hide-reason", "inquiry 18/2026"),
        ],
    )
    .await
    .unwrap();
    // An attempt MOJ refuses (no rule lets realty be read for that purpose).
    let refused = RealtyRegistryClient::new(channel.clone())
        .list_properties(with_meta(
            ListPropertiesRequest {
                iin: h.a.to_string(),
            },
            &h.meta(REALTY, "child-benefit", &a, "a-r1", &[]),
        ))
        .await
        .unwrap_err();
    assert_refused(&refused, Code::PermissionDenied, "access.denied");
    // Another person's reads.
    h.get_person(&h.b, "child-benefit", "b-1", &officer)
        .await
        .unwrap();

    // Before the short hiding ends: the portal sees the four open reads only.
    let before = h.portal_report(&h.a).await;
    assert_complete(&before);
    assert_eq!(
        ids(&before.entries),
        BTreeSet::from(["a-1", "a-2", "a-3", "a-4"])
    );

    // After it: the read hidden for seconds is disclosed, with its date and reason.
    let wait = soon_ms + 50 - now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let portal = h.portal_report(&h.a).await;
    assert_complete(&portal);
    assert_eq!(
        ids(&portal.entries),
        BTreeSet::from(["a-1", "a-2", "a-3", "a-4", "a-6"]),
        "exactly A's reads, the covert one still hidden left out, nothing of B, no refused attempt"
    );
    assert!(portal.entries.iter().all(|e| !e.hidden));
    let a1 = entry(&portal, "a-1");
    assert_eq!(a1.server, MOJ);
    assert_eq!(a1.consumer_member, "KZ/GOV/MLSPP");
    assert_eq!(
        a1.consumer_member_name,
        "Ministry of Labour and Social Protection of the Population"
    );
    assert_eq!(a1.consumer_subsystem, BENEFITS);
    assert_eq!(a1.provider_service, POPULATION);
    assert_eq!(a1.provider_member_name, "Ministry of Justice");
    assert_eq!(a1.method, GET_PERSON);
    assert_eq!(a1.purpose, "child-benefit");
    assert!(a1.purpose_description.contains("child-birth benefit"));
    assert!(
        a1.legal_act
            .as_deref()
            .is_some_and(|act| act.contains("art. 146")),
        "{a1:?}"
    );
    assert_eq!(a1.consent_id, None);
    assert_eq!(a1.user.as_deref(), Some("officer-17"));
    assert_eq!(a1.query_group.as_deref(), Some(CLAIM));
    assert_eq!((a1.outcome, a1.status), (Outcome::Answered, 0));
    assert_eq!((a1.hidden_until_ms, a1.hidden), (None, false));
    let a3 = entry(&portal, "a-3");
    assert_eq!((a3.server.as_str(), a3.purpose.as_str()), (SRC, MEANS_TEST));
    assert_eq!(
        (a3.legal_act.as_deref(), a3.consent_id.as_deref()),
        (None, Some(income_consent.as_str()))
    );
    assert_eq!(a3.query_group.as_deref(), Some(CLAIM));
    let a4 = entry(&portal, "a-4");
    assert_eq!(a4.consent_id.as_deref(), Some(realty_consent.as_str()));
    assert_eq!(
        (a4.user.as_deref(), a4.query_group.as_deref()),
        (None, None)
    );
    let a6 = entry(&portal, "a-6");
    assert_eq!(a6.purpose, FRAUD);
    assert_eq!(a6.user.as_deref(), Some("inspector-3"));
    assert_eq!(a6.hidden_until_ms, Some(soon_ms));
    assert_eq!(a6.hidden_reason.as_deref(), Some("inquiry 18/2026"));
    assert!(!a6.hidden);
    let times: Vec<i64> = portal.entries.iter().map(|e| e.at_ms).collect();
    assert!(times.is_sorted(), "merged by time: {times:?}");

    // The auditor sees the hidden read too, marked, and (when asked) the refusal.
    let auditor = h.auditor_report(&h.a, false).await;
    assert_complete(&auditor);
    assert_eq!(
        ids(&auditor.entries),
        BTreeSet::from(["a-1", "a-2", "a-3", "a-4", "a-5", "a-6"])
    );
    let a5 = entry(&auditor, "a-5");
    assert!(a5.hidden);
    assert_eq!(a5.hidden_until_ms, Some(midnight_in(30)));
    assert_eq!(
        a5.hidden_reason.as_deref(),
        Some("inquiry 17/2026 (Law on OIA, art. 11)")
    );
    assert_eq!(a5.query_group.as_deref(), Some("fraud-17"));
    assert!(!entry(&auditor, "a-6").hidden);
    let with_refused = h.auditor_report(&h.a, true).await;
    assert_eq!(
        ids(&with_refused.entries),
        BTreeSet::from(["a-1", "a-2", "a-3", "a-4", "a-5", "a-6", "a-r1"])
    );
    let r1 = entry(&with_refused, "a-r1");
    assert_eq!(r1.outcome, Outcome::Refused);
    assert_eq!(r1.reason.as_deref(), Some("access.denied"));
    assert_eq!(r1.status, Code::PermissionDenied as i32);

    // B's report holds B's read only.
    let for_b = h.portal_report(&h.b).await;
    assert_eq!(ids(&for_b.entries), BTreeSet::from(["b-1"]));

    // `kopir audit subject`, from MOJ's own log (its operator: every read of
    // MOJ, the hidden one marked) and for the whole federation as the portal.
    let moj_config = h.fed.node("moj").config_path.display().to_string();
    let local = kopir(&["audit", "subject", &a, "--config", &moj_config, "--json"]);
    assert_eq!(
        json_ids(&local),
        BTreeSet::from(["a-1", "a-2", "a-4", "a-5", "a-6"].map(String::from))
    );
    let text = kopir(&["audit", "subject", &a, "--config", &moj_config]);
    assert!(
        text.contains("HIDDEN") && text.contains("inquiry 17/2026"),
        "{text}"
    );
    let l = &h.fed.layout;
    let path = |p: std::path::PathBuf| p.display().to_string();
    let (portal_cert, portal_key) = l.portal();
    let (signing_cert, signing_key) = l.portal_signing();
    let federation_args = [
        "audit",
        "subject",
        &a,
        "--federation",
        "--globalconf",
        &path(h.fed.globalconf_path.clone()),
        "--anchor",
        &path(l.authority_cert()),
        "--cert",
        &path(portal_cert),
        "--key",
        &path(portal_key),
        "--assertion-cert",
        &path(signing_cert),
        "--assertion-key",
        &path(signing_key),
    ];
    let mut json_args = federation_args.to_vec();
    json_args.push("--json");
    assert_eq!(
        json_ids(&kopir(&json_args)),
        BTreeSet::from(["a-1", "a-2", "a-3", "a-4", "a-6"].map(String::from))
    );
    let text = kopir(&federation_args);
    assert!(
        text.contains("was hidden")
            && text.contains("inquiry 18/2026")
            && !text.contains("17/2026"),
        "{text}"
    );
    h.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_portal_for_that_subject_or_an_auditor_may_ask() {
    let h = launch().await;
    h.get_person(&h.a, "child-benefit", "a-1", &[])
        .await
        .unwrap();
    h.get_person(&h.b, "child-benefit", "b-1", &[])
        .await
        .unwrap();

    // The portal asking for B with an assertion naming A: refused by every server.
    let req = h.request(&h.b, h.assertion(&h.a), false);
    let status = h
        .report_from("moj", Caller::Portal, req.clone())
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "report.not_subject");
    let r = assemble(
        &h.view,
        h.identity(Caller::Portal),
        &req,
        Duration::from_secs(10),
    )
    .await;
    assert!(r.entries.is_empty() && !r.complete());
    for s in &r.sources {
        let e = s.error.as_ref().expect("refused");
        assert_eq!(e.reason.as_deref(), Some("report.not_subject"), "{e}");
    }
    // The portal without an assertion, or with an assertion signed by another key.
    let status = h
        .report_from("moj", Caller::Portal, h.request(&h.a, String::new(), false))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "report.assertion_invalid");
    let (cert, key) = kopir_core::pki::dev::signing_pair("not the portal").unwrap();
    let stranger = SigningKey::from_pkcs8(&key, &cert).unwrap();
    let forged = Claims::new(
        "portal",
        &subject(&h.a).parse().unwrap(),
        now_ms() / 1000,
        60,
    )
    .sign(&stranger);
    let status = h
        .report_from("moj", Caller::Portal, h.request(&h.a, forged, false))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "report.assertion_invalid");
    // The portal's assertion is no use to anyone else: an operator, a security
    // server, an information system.
    for caller in [Caller::Operator, Caller::Server, Caller::InformationSystem] {
        let req = h.request(&h.a, h.assertion(&h.a), false);
        let status = h.report_from("moj", caller, req).await.unwrap_err();
        assert_refused(&status, Code::PermissionDenied, "report.caller_unknown");
        if matches!(caller, Caller::Server) {
            assert!(
                status
                    .message()
                    .contains("security server KZ/GOV/MLSPP/ss1"),
                "{status:?}"
            );
        }
    }
    // A bad subject.
    let status = h
        .report_from(
            "moj",
            Caller::Auditor,
            ReportRequest {
                subject: "iin:900101300123".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_refused(&status, Code::InvalidArgument, "report.request_invalid");

    // The portal for A gets A's read; the auditor may ask for anyone.
    let ok = h
        .report_from(
            "moj",
            Caller::Portal,
            h.request(&h.a, h.assertion(&h.a), false),
        )
        .await
        .unwrap();
    assert_eq!(ok.server, MOJ);
    let got: Vec<&str> = ok.entries.iter().map(|e| e.query_id.as_str()).collect();
    assert_eq!(got, vec!["a-1"]);
    let ok = h
        .report_from(
            "moj",
            Caller::Auditor,
            h.request(&h.b, String::new(), false),
        )
        .await
        .unwrap();
    let got: Vec<&str> = ok.entries.iter().map(|e| e.query_id.as_str()).collect();
    assert_eq!(got, vec!["b-1"]);

    // Every request is recorded on the server: who asked, for whom (pseudonymised).
    let moj = h.fed.node("moj");
    let records = moj.audit.records().await.unwrap();
    let asked: Vec<_> = records
        .iter()
        .filter(|r| r.method == REPORT_METHOD)
        .collect();
    let pseudonym = |iin: &Iin| Some(moj.audit.pseudonyms().pseudonym(&subject(iin)));
    let find = |client: &str, step: Step, reason: Option<&str>| {
        asked.iter().any(|r| {
            r.client == client
                && r.step == step
                && r.side == Side::Provider
                && r.reason.as_deref() == reason
        })
    };
    assert!(find(
        "portal:portal",
        Step::Refused,
        Some("report.not_subject")
    ));
    assert!(find(
        "portal:portal",
        Step::Refused,
        Some("report.assertion_invalid")
    ));
    assert!(find("portal:portal", Step::Answered, None));
    assert!(find("auditor:dpa", Step::Answered, None));
    assert!(find(
        "auditor:dpa",
        Step::Refused,
        Some("report.request_invalid")
    ));
    assert!(
        asked.iter().any(|r| r.client.starts_with("tls:")
            && r.reason.as_deref() == Some("report.caller_unknown"))
    );
    let refused_for_b = asked
        .iter()
        .find(|r| r.reason.as_deref() == Some("report.not_subject"))
        .unwrap();
    assert_eq!(refused_for_b.subject, pseudonym(&h.b));
    let served_to_auditor = asked
        .iter()
        .find(|r| r.client == "auditor:dpa" && r.step == Step::Answered)
        .unwrap();
    assert_eq!(served_to_auditor.subject, pseudonym(&h.b));
    h.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covert_reads_only_for_a_covert_purpose_and_not_too_long() {
    let h = launch().await;
    let reason = ("kopir-hide-reason", "inquiry 19/2026");
    let (month, too_far, yesterday) = (date_in(30), date_in(400), date_in(-1));
    // Early, on the consumer's server.
    let status = h
        .get_person(
            &h.a,
            "child-benefit",
            "x-1",
            &[("kopir-hide-until", &month), reason],
        )
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "hiding.not_allowed");
    assert!(
        status.message().contains("does not allow covert reads"),
        "{status:?}"
    );
    let status = h
        .get_person(
            &h.a,
            FRAUD,
            "x-2",
            &[("kopir-hide-until", &too_far), reason],
        )
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "hiding.not_allowed");
    assert!(status.message().contains("at most 365 days"), "{status:?}");
    let status = h
        .get_person(
            &h.a,
            FRAUD,
            "x-3",
            &[("kopir-hide-until", &yesterday), reason],
        )
        .await
        .unwrap_err();
    assert_refused(&status, Code::InvalidArgument, "metadata.invalid");
    let status = h
        .get_person(&h.a, FRAUD, "x-4", &[("kopir-hide-until", &month)])
        .await
        .unwrap_err();
    assert_refused(&status, Code::InvalidArgument, "metadata.invalid");
    assert!(status.message().contains("kopir-hide-reason"), "{status:?}");

    // And by the provider itself, for a request signed by the consumer's member.
    let a = subject(&h.a);
    let status = h
        .forward_to_moj(&h.meta(
            POPULATION,
            "child-benefit",
            &a,
            "x-5",
            &[("kopir-hide-until", &month), reason],
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "hiding.not_allowed");
    let status = h
        .forward_to_moj(&h.meta(
            POPULATION,
            FRAUD,
            &a,
            "x-6",
            &[("kopir-hide-until", &too_far), reason],
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "hiding.not_allowed");
    // The provider recorded its refusals; the consumer-side ones never reached it.
    let refused = h.auditor_report(&h.a, true).await;
    assert_complete(&refused);
    assert_eq!(ids(&refused.entries), BTreeSet::from(["x-5", "x-6"]));
    assert!(refused.entries.iter().all(
        |e| e.outcome == Outcome::Refused && e.reason.as_deref() == Some("hiding.not_allowed")
    ));
    h.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_reads_a_postgres_audit_store_alike() {
    let h = launch_on(true).await;
    assert!(
        h.fed
            .node("moj")
            .audit
            .store()
            .describe()
            .starts_with("postgres")
    );
    let group = [("kopir-query-group", CLAIM)];
    h.get_person(&h.a, "child-benefit", "a-1", &group)
        .await
        .unwrap();
    let month = date_in(30);
    h.get_person(
        &h.a,
        FRAUD,
        "a-2",
        &[
            ("kopir-hide-until", &month),
            ("kopir-hide-reason", "inquiry 20/2026"),
        ],
    )
    .await
    .unwrap();
    h.get_person(&h.b, "child-benefit", "b-1", &[])
        .await
        .unwrap();
    let portal = h.portal_report(&h.a).await;
    assert_complete(&portal);
    assert_eq!(ids(&portal.entries), BTreeSet::from(["a-1"]));
    assert_eq!(entry(&portal, "a-1").query_group.as_deref(), Some(CLAIM));
    let auditor = h.auditor_report(&h.a, false).await;
    assert_eq!(ids(&auditor.entries), BTreeSet::from(["a-1", "a-2"]));
    assert!(entry(&auditor, "a-2").hidden);
    h.fed.shutdown().await;
}
