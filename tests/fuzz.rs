//! The fuzz targets' inputs on stable Rust: every seed in `fuzz/corpus/` and
//! every crash input kept in `fuzz/regressions/` is run through the same
//! harness the fuzz targets use (`fuzz/src/lib.rs`), so a regression is
//! caught by `cargo test` without a nightly toolchain or cargo-fuzz.
//!
//! `cargo test --test fuzz -- --ignored write_seeds` writes the seeds anew
//! from real structures: metadata, a signed envelope and response, tokens,
//! the global configuration, certificates, audit records, a journal file and
//! an export archive of a real embedded store.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use harness::{NOW_SECS, TARGETS, fixture};
use kopir_audit::{
    AuditHandle, AuditLog, AuditRecord, Side, Step, WriterOptions,
    export::{export_range, verify_archive},
    pseudonym::PseudonymKey,
    record::{Entry, StoredRecord},
    store::{AuditStore, sqlite::SqliteStore},
};
use kopir_consent::token;
use kopir_core::{
    id::Subject,
    meta::CallMeta,
    pki::{
        batch::{self, BatchSigner},
        sign::SigningKey,
    },
};
use kopir_proto::v1::{ForwardRequest, ForwardResponse, ResponseHeader, Signature};
use kopir_server::{
    exchange::envelope::{sign_request, sign_response, verify_request},
    report::assertion,
};
use prost::Message;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `fuzz/<kind>/<target>/`, if that folder exists.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = root().join("fuzz").join(kind).join(target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn seeds_and_regressions_replay_without_a_panic() {
    let mut seeds = 0;
    for (target, run) in TARGETS {
        let corpus = inputs("corpus", target);
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} holds no seeds");
        seeds += corpus.len();
        for file in corpus.iter().chain(&inputs("regressions", target)) {
            let bytes = fs::read(file).unwrap();
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                panic!("{target}: {} makes the harness panic", file.display());
            }
        }
    }
    assert!(seeds >= TARGETS.len());
}

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let dir = root().join("fuzz/corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn dev_key(dir: &str) -> SigningKey {
    let d = root().join("certs-dev").join(dir);
    SigningKey::load(&d.join("signing.crt"), &d.join("signing.key")).unwrap()
}

const METHOD: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
const SUBJECT: &str = "iin:971125443866";

/// Metadata lines as [`harness::meta`] reads them.
fn meta_lines(values: &[&str]) -> String {
    std::iter::once(METHOD)
        .chain(values.iter().copied())
        .collect::<Vec<_>>()
        .join("\n")
}

fn consent_claims() -> token::Claims {
    token::Claims {
        iss: fixture()
            .view
            .consent_authority()
            .map(|c| c.issuer.clone())
            .unwrap(),
        sub: SUBJECT.into(),
        jti: "c-17".into(),
        client: "KZ/GOV/MLSPP/benefits".into(),
        service: "KZ/GOV/SRC/income".into(),
        methods: vec!["kz.income.v1.IncomeRegistry/*".into()],
        purpose: "benefit-means-test".into(),
        nbf: NOW_SECS - 60,
        exp: NOW_SECS + 3600,
        iat: NOW_SECS - 60,
        max_uses: Some(3),
    }
}

fn record(i: u64) -> AuditRecord {
    let body = format!("person {i}").into_bytes();
    AuditRecord {
        request_id: format!("req-{i}"),
        at_ms: NOW_SECS * 1000 + i as i64,
        client: "KZ/GOV/MLSPP/benefits".into(),
        service: "KZ/GOV/MOJ/population".into(),
        method: METHOD.into(),
        purpose: "child-benefit".into(),
        subject: Some(SUBJECT.into()),
        basis: Some("legal:Social Code, art. 146".into()),
        peer: Some("KZ/GOV/MLSPP/ss1".into()),
        body_sha256: Some(kopir_core::pki::sha256(&body)),
        request_hash: Some([3; 32]),
        signature: Some(vec![9; 64]),
        body: i.is_multiple_of(2).then_some(body),
        query_group: i.is_multiple_of(3).then(|| "claim-17".into()),
        hidden_until_ms: (i == 3).then_some(NOW_SECS * 1000 + 86_400_000),
        hidden_reason: (i == 3).then(|| "inquiry 17/2026".into()),
        ..AuditRecord::new(
            if i.is_multiple_of(2) {
                Side::Consumer
            } else {
                Side::Provider
            },
            [
                Step::Forwarded,
                Step::Accepted,
                Step::Answered,
                Step::Refused,
            ][i as usize % 4],
        )
    }
}

fn write_meta_ids_and_tokens() {
    let base = [
        "KZ/GOV/MLSPP/benefits",
        "KZ/GOV/MOJ/population",
        "child-benefit",
        SUBJECT,
    ];
    write("meta", "plain", meta_lines(&base));
    let consent = token::sign(&consent_claims(), &fixture().consent);
    let mut full = base.to_vec();
    full.extend([
        consent.as_str(),
        "Aigerim S.",
        "req-17",
        "claim-2026-17",
        "2031-02-03",
        "inquiry 17/2026, art. 12",
    ]);
    full[2] = "benefit-fraud-inquiry";
    write("meta", "tracked", meta_lines(&full));
    for (name, id) in [
        ("member", "KZ/GOV/MOJ"),
        ("subsystem", "KZ/GOV/MOJ/population"),
        ("server", "KZ/GOV/MOJ/ss1"),
        ("subject", SUBJECT),
        ("iin", "971125443866"),
        ("code", "child-benefit"),
    ] {
        write("ids", name, id);
    }
    let (portal, portal_key) = &fixture().portal;
    let subject: Subject = SUBJECT.parse().unwrap();
    let claims = assertion::Claims::new(&portal.name, &subject, NOW_SECS, 60);
    assert_eq!(
        token::verify(&consent, |kid| fixture().view.consent_key(kid)),
        Ok(consent_claims())
    );
    let assertion_token = claims.sign(portal_key);
    assert!(assertion::verify(&assertion_token, portal, NOW_SECS, 60).is_ok());
    write("jws", "consent-token", &consent);
    write(
        "jws",
        "consent-claims",
        serde_json::to_vec(&consent_claims()).unwrap(),
    );
    write("jws", "assertion", &assertion_token);
    write(
        "jws",
        "assertion-claims",
        serde_json::to_vec(&claims).unwrap(),
    );
}

async fn write_envelopes() {
    let f = fixture();
    let (member, key) = &f.consumer;
    let mut headers = http::HeaderMap::new();
    for (k, v) in harness::META_KEYS.iter().zip([
        "KZ/GOV/MLSPP/benefits",
        "KZ/GOV/MOJ/population",
        "child-benefit",
        SUBJECT,
    ]) {
        headers.insert(*k, v.parse().unwrap());
    }
    let body = b"\x0a\x0c971125443866".to_vec();
    let meta = CallMeta::from_headers(METHOD, &headers).unwrap();
    let header = meta.to_header(NOW_SECS * 1000, kopir_core::pki::sha256(&body));
    let (signature, request_hash) = sign_request(&header, member, key);
    let roots = batch::VerifiedRoots::new(4);
    let verified = verify_request(&f.view, &roots, &header, Some(&signature), member, NOW_SECS);
    assert_eq!(verified, Ok(request_hash));
    let request = ForwardRequest {
        header: Some(header.clone()),
        signature: Some(signature),
        body: body.clone().into(),
    };
    write("envelope", "request", request.encode_to_vec());
    // Two requests signed in one batch: a signature with a Merkle path.
    let other = kopir_proto::v1::RequestHeader {
        request_id: "req-18".into(),
        ..header.clone()
    };
    let digests = [request_hash, {
        let form = kopir_server::exchange::envelope::request_canonical(
            &other,
            &member.to_string(),
            &key.key_id().0,
        );
        kopir_core::pki::sha256(&form)
    }];
    let values = batch::sign_all(key, &digests);
    let batched = ForwardRequest {
        header: Some(other),
        signature: Some(Signature {
            signer: member.to_string(),
            key_id: key.key_id().0.to_vec().into(),
            algorithm: kopir_core::pki::sign::ALGORITHM.into(),
            value: values[1].clone().into(),
        }),
        body: body.into(),
    };
    write("envelope", "request-batched", batched.encode_to_vec());
    let signer = BatchSigner::start(Arc::new(dev_key("members/KZ_GOV_MOJ")));
    let answer = ResponseHeader {
        request_id: header.request_id.clone(),
        request_hash: request_hash.to_vec().into(),
        status_code: 0,
        status_message: String::new(),
        body_sha256: kopir_core::pki::sha256(b"person").to_vec().into(),
        timestamp_ms: NOW_SECS * 1000 + 5,
    };
    let (signature, _) = sign_response(&answer, &f.provider.0, &signer).await;
    let response = ForwardResponse {
        header: Some(answer),
        signature: Some(signature),
        body: Bytes::from_static(b"person"),
    };
    write("envelope", "response", response.encode_to_vec());
    write(
        "envelope",
        "frame",
        kopir_server::exchange::frame::frame(b"\x0a\x0c971125443866"),
    );
}

fn write_globalconf_and_anchors() {
    let signed = fs::read(root().join("fuzz/fixtures/globalconf.json")).unwrap();
    write("globalconf", "signed", &signed);
    let document = serde_json::to_vec_pretty(fixture().view.conf()).unwrap();
    write("globalconf", "document", document);
    let pem = fs::read(root().join("certs-dev/authority/signing.crt")).unwrap();
    write("anchor", "authority.pem", &pem);
    write(
        "anchor",
        "ca.pem",
        fs::read(root().join("certs-dev/ca.crt")).unwrap(),
    );
    write("anchor", "authority.der", fixture().authority.cert_der());
}

async fn write_audit() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn AuditStore> = Arc::new(SqliteStore::open_in(dir.path()).await.unwrap());
    let handle = AuditHandle::start(
        store.clone(),
        PseudonymKey::from_bytes(&[5; 32]),
        Arc::new(dev_key("members/KZ_GOV_MOJ")),
        "moj-ss1",
        WriterOptions {
            checkpoint_interval: None,
            ..WriterOptions::default()
        },
    )
    .await
    .unwrap();
    for i in 1..=4 {
        handle.append(record(i)).await.unwrap();
    }
    let journal = fs::read(dir.path().join("audit.journal-0")).unwrap();
    let end = journal.iter().rposition(|&b| b != 0).unwrap() + 1;
    assert_eq!(
        kopir_audit::fuzzing::journal_records(&journal[..end]).len(),
        4
    );
    write("journal", "four-records", &journal[..end]);
    handle.checkpoint().await.unwrap().unwrap();
    for i in 5..=6 {
        handle.append(record(i)).await.unwrap();
    }
    handle.checkpoint().await.unwrap().unwrap();
    let records: Vec<StoredRecord> = handle.records().await.unwrap();
    for r in &records[..3] {
        let name = if r.has_report_fields() { "v2" } else { "v1" };
        write(
            "audit_record",
            &format!("canonical-{}-{name}", r.seq),
            r.canonical(),
        );
    }
    write(
        "audit_record",
        "json",
        serde_json::to_vec(&records[2]).unwrap(),
    );
    let single: Entry = records[0].entry.clone();
    assert_eq!(
        single.canonical(1, &records[0].prev_hash),
        records[0].canonical()
    );
    let archive = export_range(&store, 2, 4).await.unwrap();
    let signer = dev_key("members/KZ_GOV_MOJ").key_id();
    let report = verify_archive(&archive, Some(&signer));
    assert!(report.ok(), "{report:#?}");
    write("archive", "two-checkpoints", archive.to_json().unwrap());
    let archive = export_range(&store, 5, 6).await.unwrap();
    write("archive", "at-checkpoint", archive.to_json().unwrap());
    handle.shutdown().await;
}

#[tokio::test]
#[ignore = "writes fuzz/corpus; run by hand when the formats change"]
async fn write_seeds() {
    write_meta_ids_and_tokens();
    write_envelopes().await;
    write_globalconf_and_anchors();
    write_audit().await;
    for (target, run) in TARGETS {
        for file in inputs("corpus", target) {
            run(&fs::read(file).unwrap());
        }
    }
}
