//! End-to-end tests of the audit trail on both stores: the demo federation on
//! 127.0.0.1:0 with each server's log in the embedded store or in a throwaway
//! PostgreSQL cluster. Records of both sides of an exchange are twins whose
//! signatures check; refusals are recorded; a store that refuses writes stops
//! the exchange before the registry is called; operators read the log over
//! the admin port with their certificate, and nobody else does.

mod common;

use std::sync::{Arc, atomic::Ordering};

use common::{assert_refused, with_meta};
use kopir_audit::{
    Side, Step,
    record::StoredRecord,
    signatures::{self, SignatureCheck},
    verify::{VerifyOptions, verify_store},
};
use kopir_core::{
    error::REQUEST_ID_KEY,
    globalconf::{ConfView, watch},
    id::Iin,
    pki::{load_certs, load_key, sign::VerifyingKey},
};
use kopir_pgtest::TempPostgres;
use kopir_proto::v1::{
    AuditQueryRequest, AuditShowRequest, audit_service_client::AuditServiceClient,
};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::{
        population::v1::{GetPersonRequest, population_registry_client::PopulationRegistryClient},
        realty::v1::{ListPropertiesRequest, realty_registry_client::RealtyRegistryClient},
    },
    registry::RegistryKind,
};
use tonic::{Code, Status, transport::Channel};

/// Which store the servers' logs are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Embedded,
    Postgres,
}

struct Harness {
    fed: LocalFederation,
    parent: Iin,
    _pg: Option<Arc<TempPostgres>>,
    _dir: tempfile::TempDir,
}

async fn launch(store: Store) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (fed, pg) = common::federation_with_audit_in(dir.path(), store == Store::Postgres).await;
    if store == Store::Postgres {
        assert!(
            fed.node("moj")
                .audit
                .store()
                .describe()
                .starts_with("postgres")
        );
    }
    let parent = fed.dataset.sample_parents(1)[0];
    Harness {
        fed,
        parent,
        _pg: pg,
        _dir: dir,
    }
}

impl Harness {
    fn subject(&self) -> String {
        format!("iin:{}", self.parent)
    }

    /// GetPerson through the benefits system's security server.
    async fn get_person(&self, request_id: &str) -> Result<(), Status> {
        let channel = self.fed.client_channel("mlspp", BENEFITS).await.unwrap();
        self.get_person_on(channel, request_id).await
    }

    /// GetPerson over an open connection to the benefits system's server.
    async fn get_person_on(&self, channel: Channel, request_id: &str) -> Result<(), Status> {
        let subject = self.subject();
        let req = with_meta(
            GetPersonRequest {
                iin: self.parent.to_string(),
            },
            &[
                ("kopir-client", BENEFITS),
                ("kopir-service", "KZ/GOV/MOJ/population"),
                ("kopir-purpose", "child-benefit"),
                ("kopir-subject", &subject),
                ("kopir-request-id", request_id),
            ],
        );
        let response = PopulationRegistryClient::new(channel)
            .get_person(req)
            .await?;
        assert_eq!(response.metadata().get(REQUEST_ID_KEY).unwrap(), request_id);
        Ok(())
    }

    async fn records(&self, node: &str, request_id: &str) -> Vec<StoredRecord> {
        self.fed.records(node, request_id).await.unwrap()
    }

    fn registry_calls(&self) -> u64 {
        self.fed.registries[&RegistryKind::Population].calls()
    }

    /// The global configuration the servers run on.
    fn view(&self) -> Arc<ConfView> {
        let anchor = VerifyingKey::load(&self.fed.layout.authority_cert()).unwrap();
        watch::read(&self.fed.globalconf_path, &[anchor]).unwrap()
    }

    async fn verify(&self, node: &str) {
        let store = self.fed.node(node).audit.store().clone();
        let report = verify_store(store, &VerifyOptions::default(), &mut |_, _| {})
            .await
            .unwrap();
        assert!(report.ok(), "{node}: {report:#?}");
    }
}

fn steps(records: &[StoredRecord]) -> Vec<(Side, Step)> {
    records.iter().map(|r| (r.side, r.step)).collect()
}

// ---- twins: both sides, one request id, signatures that check ----

async fn twin_records_share_the_request_id_and_their_signatures_check(store: Store) {
    let h = launch(store).await;
    h.get_person("twin-1").await.unwrap();
    let consumer = h.records("mlspp", "twin-1").await;
    let provider = h.records("moj", "twin-1").await;
    assert_eq!(
        steps(&consumer),
        [
            (Side::Consumer, Step::Forwarded),
            (Side::Consumer, Step::Answered)
        ]
    );
    assert_eq!(
        steps(&provider),
        [
            (Side::Provider, Step::Accepted),
            (Side::Provider, Step::Answered)
        ]
    );
    let view = h.view();
    let view = &*view;
    // The request: signed by the consumer's member, kept by both sides.
    let (forwarded, accepted) = (&consumer[0], &provider[0]);
    // The answer: signed by the provider's member, kept by both sides.
    let (answered_c, answered_p) = (&consumer[1], &provider[1]);
    for (c, p, signer) in [
        (forwarded, accepted, "KZ/GOV/MLSPP"),
        (answered_c, answered_p, "KZ/GOV/MOJ"),
    ] {
        assert_eq!(c.request_id, p.request_id);
        assert_eq!(c.request_hash, p.request_hash);
        assert!(c.request_hash.is_some());
        assert_eq!(c.signature, p.signature);
        assert_eq!(c.signed_hash, p.signed_hash);
        assert_eq!(c.signer_key, p.signer_key);
        assert_eq!(c.body_sha256, p.body_sha256);
        for r in [c, p] {
            assert_eq!(
                signatures::check(r, Some(view)),
                SignatureCheck::Valid(signer.into()),
                "record {} of {:?}",
                r.seq,
                r.side
            );
        }
    }
    // The response signature covers the response, not the request.
    assert_ne!(answered_c.signed_hash, answered_c.request_hash);
    // The subject is kept only as a pseudonym, and no body by default.
    assert!(accepted.subject.is_some());
    assert!(provider.iter().all(|r| r.body.is_none()));
    let serialized = serde_json::to_string(&provider).unwrap();
    assert!(!serialized.contains(&h.parent.to_string()));
    // A signature that was tampered with, or checked against another
    // member's key, does not pass.
    let mut forged = accepted.entry.clone();
    if let Some(sig) = forged.signature.as_mut() {
        sig[0] ^= 1;
    }
    assert!(matches!(
        signatures::check(&forged, Some(view)),
        SignatureCheck::Invalid(_)
    ));
    let mut swapped = answered_p.entry.clone();
    swapped.service = "KZ/GOV/SRC/income".into();
    assert!(!matches!(
        signatures::check(&swapped, Some(view)),
        SignatureCheck::Valid(_)
    ));
    h.verify("mlspp").await;
    h.verify("moj").await;
    h.fed.shutdown().await;
}

// ---- one wait for the disk per server and exchange, before the answer ----

async fn each_server_waits_for_the_disk_once_per_exchange(store: Store) {
    let h = launch(store).await;
    let stats = |node: &str| {
        let s = h.fed.node(node).audit.stats();
        (
            s.records.load(Ordering::Relaxed),
            s.syncs.load(Ordering::Relaxed),
            s.pending.load(Ordering::Relaxed),
        )
    };
    let before = [stats("mlspp"), stats("moj")];
    for i in 1..=3u64 {
        h.get_person(&format!("sync-{i}")).await.unwrap();
        for (node, (records, syncs, _)) in ["mlspp", "moj"].into_iter().zip(before) {
            // Two records per exchange, one of them written ahead of the
            // other and made durable by it: nothing is left pending once
            // the answer is out.
            assert_eq!(stats(node), (records + 2 * i, syncs + i, 0), "{node}");
        }
    }
    for node in ["mlspp", "moj"] {
        let first = h.records(node, "sync-1").await;
        assert_eq!(first.len(), 2, "{node}");
    }
    h.verify("mlspp").await;
    h.verify("moj").await;
    h.fed.shutdown().await;
}

// ---- batch signatures: shared by concurrent exchanges, checked one by one ----

async fn concurrent_exchanges_share_batch_signatures_that_check_alone(store: Store) {
    let h = launch(store).await;
    let channel = h.fed.client_channel("mlspp", BENEFITS).await.unwrap();
    let ids: Vec<String> = (0..48).map(|i| format!("batch-{i}")).collect();
    let calls = ids.iter().map(|id| h.get_person_on(channel.clone(), id));
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    let view = h.view();
    let mut signatures = std::collections::HashSet::new();
    for id in &ids {
        for node in ["mlspp", "moj"] {
            for r in h.records(node, id).await {
                // Each record's signature checks on its own, path and all.
                let expected = if r.step == Step::Forwarded || r.step == Step::Accepted {
                    "KZ/GOV/MLSPP"
                } else {
                    "KZ/GOV/MOJ"
                };
                assert_eq!(
                    signatures::check(&r, Some(&view)),
                    SignatureCheck::Valid(expected.into()),
                    "{node}: record {} of {id}",
                    r.seq
                );
                let value = r.signature.clone().unwrap();
                signatures.insert(value[..64].to_vec());
            }
        }
    }
    // 96 signed messages (48 requests, 48 answers) took fewer signatures.
    assert!(
        signatures.len() < 96,
        "{} signatures for 96 messages",
        signatures.len()
    );
    h.verify("mlspp").await;
    h.verify("moj").await;
    h.fed.shutdown().await;
}

// ---- refusals are records too ----

async fn refusals_are_recorded_on_both_sides(store: Store) {
    let h = launch(store).await;
    // The provider refuses: real estate may not be read for this purpose.
    let subject = h.subject();
    let channel = h.fed.client_channel("mlspp", BENEFITS).await.unwrap();
    let status = RealtyRegistryClient::new(channel.clone())
        .list_properties(with_meta(
            ListPropertiesRequest {
                iin: h.parent.to_string(),
            },
            &[
                ("kopir-client", BENEFITS),
                ("kopir-service", "KZ/GOV/MOJ/realty"),
                ("kopir-purpose", "child-benefit"),
                ("kopir-subject", &subject),
                ("kopir-request-id", "denied-1"),
            ],
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "access.denied");
    let provider = h.records("moj", "denied-1").await;
    assert_eq!(steps(&provider), [(Side::Provider, Step::Refused)]);
    assert_eq!(provider[0].reason.as_deref(), Some("access.denied"));
    assert_eq!(provider[0].status, Code::PermissionDenied as i32);
    assert!(
        provider[0]
            .message
            .as_deref()
            .is_some_and(|m| !m.is_empty())
    );
    let consumer = h.records("mlspp", "denied-1").await;
    assert_eq!(
        steps(&consumer),
        [
            (Side::Consumer, Step::Forwarded),
            (Side::Consumer, Step::Failed)
        ]
    );
    assert_eq!(consumer[1].reason.as_deref(), Some("access.denied"));
    // Each refusal carries what its side knew when it refused: the
    // provider had verified the signed request and its server, the
    // consumer had signed it.
    assert_eq!(provider[0].request_hash, consumer[0].request_hash);
    let consumer_server = h.fed.node("mlspp").config.server_id.to_string();
    assert_eq!(provider[0].peer, Some(consumer_server));
    assert_eq!(
        provider[0].basis, None,
        "refused before the basis was checked"
    );
    assert!(consumer[0].request_hash.is_some());
    assert_eq!(consumer[1].request_hash, consumer[0].request_hash);

    // The consumer refuses: an unknown purpose never leaves its server.
    let status = PopulationRegistryClient::new(channel)
        .get_person(with_meta(
            GetPersonRequest {
                iin: h.parent.to_string(),
            },
            &[
                ("kopir-client", BENEFITS),
                ("kopir-service", "KZ/GOV/MOJ/population"),
                ("kopir-purpose", "curiosity"),
                ("kopir-subject", &subject),
                ("kopir-request-id", "unknown-purpose-1"),
            ],
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::InvalidArgument, "purpose.unknown");
    let consumer = h.records("mlspp", "unknown-purpose-1").await;
    assert_eq!(steps(&consumer), [(Side::Consumer, Step::Refused)]);
    assert_eq!(consumer[0].reason.as_deref(), Some("purpose.unknown"));
    assert_eq!(consumer[0].purpose, "curiosity");
    assert!(h.records("moj", "unknown-purpose-1").await.is_empty());
    h.verify("mlspp").await;
    h.verify("moj").await;
    h.fed.shutdown().await;
}

// ---- no audit, no data ----

/// Makes a node's store refuse (or accept again) every new record, with a
/// trigger installed from outside the server: the store itself says no.
async fn set_refusing(h: &Harness, node: &str, refuse: bool) {
    let config = &h.fed.node(node).config;
    match &config.audit.database {
        None => {
            let path = config.data_dir.join("audit.db");
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .unwrap();
            conn.execute_batch(if refuse {
                "CREATE TRIGGER refuse_writes BEFORE INSERT ON audit_records
                 BEGIN SELECT RAISE(ABORT, 'the audit store is read-only'); END;"
            } else {
                "DROP TRIGGER refuse_writes;"
            })
            .unwrap();
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let task = tokio::spawn(connection);
            client
                .batch_execute(if refuse {
                    "CREATE FUNCTION refuse_writes() RETURNS trigger AS $$
                     BEGIN RAISE EXCEPTION 'the audit store is read-only'; END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER refuse_writes BEFORE INSERT ON audit_records
                     FOR EACH ROW EXECUTE FUNCTION refuse_writes();"
                } else {
                    "DROP TRIGGER refuse_writes ON audit_records; DROP FUNCTION refuse_writes();"
                })
                .await
                .unwrap();
            drop(client);
            let _ = task.await;
        }
    }
}

/// Calls GetPerson (`<prefix>-1`, `<prefix>-2`...) until a call is refused
/// with `audit.unavailable`, and returns the ids of the calls that succeeded
/// before it. PostgreSQL refuses the first call after a store starts
/// refusing; the embedded store's journal takes records until its next fold
/// into SQLite (every 25 ms) meets the refusal, which may come at any record
/// of an exchange (after the registry was called, the answer is withheld).
async fn call_until_refused(h: &Harness, prefix: &str) -> Vec<String> {
    let mut succeeded = Vec::new();
    for n in 1..=40 {
        let id = format!("{prefix}-{n}");
        match h.get_person(&id).await {
            Ok(()) => succeeded.push(id),
            Err(status) => {
                assert_refused(&status, Code::Unavailable, "audit.unavailable");
                return succeeded;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("no call was refused: {succeeded:?}");
}

async fn a_store_that_refuses_writes_stops_the_exchange(store: Store) {
    let h = launch(store).await;
    h.get_person("before").await.unwrap();
    assert_eq!(h.registry_calls(), 1);
    let mut acknowledged = vec!["before".to_owned()];

    // The consumer's store refuses. Once it has (the call that found out),
    // the next call is refused at its first record: nothing is sent to the
    // provider.
    set_refusing(&h, "mlspp", true).await;
    acknowledged.extend(call_until_refused(&h, "consumer-down").await);
    let calls = h.registry_calls();
    let status = h.get_person("consumer-down").await.unwrap_err();
    assert_refused(&status, Code::Unavailable, "audit.unavailable");
    assert_eq!(h.registry_calls(), calls, "the registry was called");
    assert!(h.records("moj", "consumer-down").await.is_empty());
    assert!(h.records("mlspp", "consumer-down").await.is_empty());
    set_refusing(&h, "mlspp", false).await;

    // The provider's store refuses: the registry is not called, and the
    // consumer's log says why the exchange failed.
    set_refusing(&h, "moj", true).await;
    acknowledged.extend(call_until_refused(&h, "provider-down").await);
    let calls = h.registry_calls();
    let status = h.get_person("provider-down").await.unwrap_err();
    assert_refused(&status, Code::Unavailable, "audit.unavailable");
    assert_eq!(h.registry_calls(), calls, "the registry was called");
    assert!(h.records("moj", "provider-down").await.is_empty());
    let consumer = h.records("mlspp", "provider-down").await;
    assert_eq!(
        steps(&consumer),
        [
            (Side::Consumer, Step::Forwarded),
            (Side::Consumer, Step::Failed)
        ]
    );
    assert_eq!(consumer[1].reason.as_deref(), Some("audit.unavailable"));
    // The failure's record made the `forwarded` one durable too.
    let pending = &h.fed.node("mlspp").audit.stats().pending;
    assert_eq!(pending.load(Ordering::Relaxed), 0);
    set_refusing(&h, "moj", false).await;

    // Once the stores accept writes again, exchanges resume on intact logs,
    // which hold every exchange that succeeded.
    let calls = h.registry_calls();
    h.get_person("after").await.unwrap();
    assert_eq!(h.registry_calls(), calls + 1);
    acknowledged.push("after".into());
    for id in &acknowledged {
        for node in ["mlspp", "moj"] {
            let records = h.records(node, id).await;
            assert!(
                records.iter().any(|r| r.step == Step::Answered),
                "{node} has no answer recorded for {id}: {records:?}"
            );
        }
    }
    h.verify("mlspp").await;
    h.verify("moj").await;
    h.fed.shutdown().await;
}

/// A failure after the provider accepted (here, its registry is down)
/// carries everything the acceptance recorded: the basis, the consumer's
/// server and the request hash.
#[tokio::test]
async fn a_failure_carries_what_the_acceptance_recorded() {
    let mut h = launch(Store::Embedded).await;
    h.fed
        .registries
        .remove(&RegistryKind::Population)
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let status = h.get_person("registry-down").await.unwrap_err();
    assert_refused(&status, Code::Unavailable, "registry.unavailable");
    let provider = h.records("moj", "registry-down").await;
    assert_eq!(
        steps(&provider),
        [
            (Side::Provider, Step::Accepted),
            (Side::Provider, Step::Failed)
        ]
    );
    let (accepted, failed) = (&provider[0], &provider[1]);
    assert_eq!(failed.reason.as_deref(), Some("registry.unavailable"));
    assert!(
        accepted
            .basis
            .as_deref()
            .is_some_and(|b| b.starts_with("legal:"))
    );
    let consumer_server = h.fed.node("mlspp").config.server_id.to_string();
    assert_eq!(accepted.peer, Some(consumer_server));
    assert!(accepted.request_hash.is_some());
    assert_eq!(
        (&failed.basis, &failed.peer, &failed.request_hash),
        (&accepted.basis, &accepted.peer, &accepted.request_hash)
    );
    let consumer = h.records("mlspp", "registry-down").await;
    assert_eq!(
        steps(&consumer),
        [
            (Side::Consumer, Step::Forwarded),
            (Side::Consumer, Step::Failed)
        ]
    );
    assert_eq!(consumer[1].request_hash, accepted.request_hash);
    h.fed.shutdown().await;
}

// ---- the admin port: operators only ----

async fn operators_read_the_log_over_the_admin_port(store: Store) {
    let h = launch(store).await;
    h.get_person("admin-1").await.unwrap();
    let mut audit = AuditServiceClient::new(h.fed.admin_channel("moj").await.unwrap());
    let shown = audit
        .show(AuditShowRequest {
            request_id: "admin-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(shown.len(), 2);
    for s in &shown {
        assert!(s.hash_ok);
        assert_eq!(s.signature_result, "valid", "{}", s.signature_detail);
    }
    // Query by subject: the operator names the subject, the server
    // pseudonymises it.
    let page = audit
        .query(AuditQueryRequest {
            subject: Some(h.subject()),
            ..AuditQueryRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 2);
    assert!(page.entries.iter().all(|e| e.request_id == "admin-1"));

    // An information system's certificate is not an operator's.
    let (cert, key) = h.fed.layout.client(&BENEFITS.parse().unwrap());
    let addr = h.fed.node("moj").server.admin_addr.unwrap();
    let stranger = h
        .fed
        .channel_to(
            addr,
            Some((load_certs(&cert).unwrap(), load_key(&key).unwrap())),
        )
        .await
        .unwrap();
    let status = AuditServiceClient::new(stranger)
        .show(AuditShowRequest {
            request_id: "admin-1".into(),
        })
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "operator.unknown");
    // Nor is no certificate at all: the admin port requires one in the TLS
    // handshake, so such a caller never reaches HTTP/2.
    let anonymous = h.fed.channel_to(addr, None).await;
    let refused = match anonymous {
        Err(e) => format!("{e:?}"),
        Ok(channel) => format!(
            "{:?}",
            AuditServiceClient::new(channel)
                .show(AuditShowRequest {
                    request_id: "admin-1".into(),
                })
                .await
                .unwrap_err()
        ),
    };
    assert!(refused.contains("CertificateRequired"), "{refused}");
    h.fed.shutdown().await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Store::Embedded).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Store::Postgres).await;
            })*
        }
    };
}

on_both_stores!(
    twin_records_share_the_request_id_and_their_signatures_check,
    each_server_waits_for_the_disk_once_per_exchange,
    concurrent_exchanges_share_batch_signatures_that_check_alone,
    refusals_are_recorded_on_both_sides,
    a_store_that_refuses_writes_stops_the_exchange,
    operators_read_the_log_over_the_admin_port,
);
