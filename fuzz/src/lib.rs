//! The fuzz harness: one function per parser of outside bytes, each taking
//! the fuzzer's input and panicking only on a bug (a panic in kopir, or a
//! broken round-trip property). The targets in `fuzz_targets/` call these;
//! `tests/fuzz.rs` in the main crate includes this file too and replays the
//! seeds in `corpus/` and the crash inputs in `regressions/` on stable Rust.
//!
//! Parsers behind a signature are fuzzed twice: the input as it arrives
//! (checked against the fixed keys of the development PKI, where a forgery
//! must be refused), and the input as the signed content, signed here with
//! those keys, so that what lies behind the signature check is reached too.

use std::sync::OnceLock;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use kopir_audit::{
    checkpoint::Checkpoint,
    export::{Archive, verify_archive},
    record::{StoredRecord, parse_canonical},
};
use kopir_consent::{grant::covers, token};
use kopir_core::{
    globalconf::{
        ConfView, GlobalConf,
        signed::{self, VerifyError},
        view::ReportReaderEntry,
    },
    id::{Code, Iin, MemberId, ServerId, Subject, SubsystemId},
    meta::{CallMeta, check_method, keys, parse_hide_until},
    pki::{
        self,
        batch::{self, VerifiedRoots},
        jws::{self, JwsError},
        sign::{SigningKey, VerifyingKey},
    },
};
use kopir_proto::v1::{ForwardRequest, ForwardResponse};
use kopir_server::{
    exchange::{
        envelope::{
            request_canonical, response_canonical, sign_request, verify_request, verify_response,
        },
        frame::unframe,
    },
    report::assertion,
};
use prost::Message;

/// One target's harness: the fuzzer's input in, a panic only on a bug.
pub type Harness = fn(&[u8]);

/// The fuzz targets by name (as in `fuzz/Cargo.toml`, `corpus/` and
/// `regressions/`).
pub const TARGETS: &[(&str, Harness)] = &[
    ("meta", meta),
    ("ids", ids),
    ("envelope", envelope),
    ("jws", jws),
    ("globalconf", globalconf),
    ("anchor", anchor),
    ("request", management_request),
    ("audit_record", audit_record),
    ("journal", journal),
    ("archive", archive),
];

/// "Now" for every check with a clock: inside the development PKI's
/// validity, and fixed so that a crash input replays the same way.
pub const NOW_SECS: i64 = 1_800_000_000;

/// The metadata headers [`meta`] fills, one input line each, after the
/// method on the first line.
pub const META_KEYS: [&str; 10] = [
    keys::CLIENT,
    keys::SERVICE,
    keys::PURPOSE,
    keys::SUBJECT,
    keys::CONSENT,
    keys::USER,
    keys::REQUEST_ID,
    keys::QUERY_GROUP,
    keys::HIDE_UNTIL,
    keys::HIDE_REASON,
];

/// The development PKI's keys and the global configuration built from it.
pub struct Fixture {
    /// The signed global configuration (`fixtures/globalconf.json`).
    pub view: ConfView,
    /// The authority's certificate: the configuration's trust anchor.
    pub anchors: Vec<VerifyingKey>,
    /// The authority's key.
    pub authority: SigningKey,
    /// `KZ/GOV/MLSPP`, the consumer, and its signing key.
    pub consumer: (MemberId, SigningKey),
    /// `KZ/GOV/MOJ`, the provider, and its signing key (which also signs
    /// audit checkpoints here).
    pub provider: (MemberId, SigningKey),
    /// The consent authority's key.
    pub consent: SigningKey,
    /// The portal as the configuration lists it, and its key.
    pub portal: (ReportReaderEntry, SigningKey),
}

/// The DER bytes of the first PEM block of `pem`.
fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    STANDARD
        .decode(body)
        .expect("a PEM file of the development PKI")
}

fn key(cert: &str, key: &str) -> SigningKey {
    SigningKey::from_pkcs8(&pem_der(key), &pem_der(cert)).expect("a development signing key")
}

macro_rules! dev_key {
    ($dir:literal) => {
        key(
            include_str!(concat!("../../certs-dev/", $dir, "/signing.crt")),
            include_str!(concat!("../../certs-dev/", $dir, "/signing.key")),
        )
    };
}

/// The fixture, made once per process.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let authority = dev_key!("authority");
        let anchors = vec![
            VerifyingKey::from_cert(authority.cert_der()).expect("the authority's certificate"),
        ];
        let conf = signed::verify(include_bytes!("../fixtures/globalconf.json"), &anchors)
            .expect("fixtures/globalconf.json is signed by the development authority");
        let view = ConfView::new(conf).expect("the fixture's global configuration");
        let portal = view
            .report_reader_named("portal")
            .expect("the fixture lists a portal")
            .clone();
        let member = |id: &str| id.parse::<MemberId>().expect("a member id");
        Fixture {
            consumer: (member("KZ/GOV/MLSPP"), dev_key!("members/KZ_GOV_MLSPP")),
            provider: (member("KZ/GOV/MOJ"), dev_key!("members/KZ_GOV_MOJ")),
            consent: dev_key!("consent"),
            portal: (portal, dev_key!("portal")),
            view,
            anchors,
            authority,
        }
    })
}

/// A compact JWS of type `typ` over `claims` (any bytes), signed with `key`.
pub fn signed_jws(typ: &str, claims: &[u8], key: &SigningKey) -> String {
    let header = serde_json::json!({"alg": jws::ALG, "typ": typ, "kid": key.key_id().to_string()});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()));
    format!("{input}.{signature}")
}

/// A signed global configuration envelope around `payload` (any bytes).
pub fn signed_globalconf(payload: &[u8], key: &SigningKey) -> Vec<u8> {
    serde_json::json!({
        "format": signed::FORMAT,
        "key_id": key.key_id().to_string(),
        "signature": STANDARD.encode(key.sign(payload)),
        "payload": STANDARD.encode(payload),
    })
    .to_string()
    .into_bytes()
}

/// Call metadata from the client port's headers: the method on the first
/// line, then one line per header of [`META_KEYS`]. What the consumer signs
/// (the request header made from the parsed metadata) must read back on the
/// provider as the same metadata.
pub fn meta(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let method = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for (key, value) in META_KEYS.iter().zip(lines) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(*key, value);
        }
    }
    let _ = check_method(&method);
    if let Ok(meta) = CallMeta::from_headers(&method, &headers) {
        let header = meta.to_header(NOW_SECS * 1000, [7; 32]);
        match CallMeta::from_header(&header) {
            Ok(back) => assert_eq!(back, meta, "the signed header reads back as other metadata"),
            Err(r) => panic!("the provider refuses what the consumer accepted and signed: {r}"),
        }
    }
    for line in data.split(|&b| b == b'\n') {
        if let Ok(text) = std::str::from_utf8(line) {
            let _ = parse_hide_until(text);
        }
    }
}

/// Identifiers: each has one spelling, so what parses prints as it was
/// written.
pub fn ids(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    fn same<T: std::str::FromStr + std::fmt::Display>(text: &str) {
        if let Ok(id) = text.parse::<T>() {
            assert_eq!(id.to_string(), text, "an identifier with two spellings");
        }
    }
    same::<MemberId>(text);
    same::<SubsystemId>(text);
    same::<ServerId>(text);
    same::<Subject>(text);
    same::<Iin>(text);
    same::<Code>(text);
}

/// The signed envelope of the peer port: a `ForwardRequest` (and a
/// `ForwardResponse`) as protobuf bytes, its metadata, its canonical form,
/// its batch signature path and its verification with the fixed keys.
pub fn envelope(data: &[u8]) {
    let f = fixture();
    let (member, key) = &f.consumer;
    let roots = VerifiedRoots::new(16);
    if let Ok(request) = ForwardRequest::decode(data) {
        let header = request.header.unwrap_or_default();
        let sig = request.signature.as_ref();
        let (signer, key_id) = sig
            .map(|s| (s.signer.as_str(), &s.key_id[..]))
            .unwrap_or_default();
        let form = request_canonical(&header, signer, key_id);
        // What the provider acts on is what the signature covers.
        if let (Ok(meta), Ok(body)) = (
            CallMeta::from_header(&header),
            <[u8; 32]>::try_from(&header.body_sha256[..]),
        ) {
            let again = meta.to_header(header.timestamp_ms, body);
            assert_eq!(
                request_canonical(&again, signer, key_id),
                form,
                "the metadata read from a header is not what was signed"
            );
        }
        if verify_request(&f.view, &roots, &header, sig, member, NOW_SECS).is_ok() {
            // A real signature (a seed): any change to the header breaks it.
            let mut altered = header.clone();
            altered.timestamp_ms = altered.timestamp_ms.wrapping_add(1);
            assert!(
                verify_request(&f.view, &roots, &altered, sig, member, NOW_SECS).is_err(),
                "an altered header still verifies"
            );
        }
        // Signed with the consumer's key, any header verifies, and the
        // fuzzer's signature value read as a batch path must not panic.
        let (mut own, hash) = sign_request(&header, member, key);
        assert_eq!(
            verify_request(&f.view, &roots, &header, Some(&own), member, NOW_SECS),
            Ok(hash),
            "a header signed with a listed key does not verify"
        );
        if let Some(sig) = sig {
            let _ = batch::root(&hash, &sig.value);
            own.value = [&own.value[..], &sig.value[..]].concat().into();
            let _ = verify_request(&f.view, &roots, &header, Some(&own), member, NOW_SECS);
        }
    }
    if let Ok(response) = ForwardResponse::decode(data) {
        let header = response.header.unwrap_or_default();
        let sig = response.signature.as_ref();
        let (signer, key_id) = sig
            .map(|s| (s.signer.as_str(), &s.key_id[..]))
            .unwrap_or_default();
        let _ = response_canonical(&header, signer, key_id);
        let request_hash = <[u8; 32]>::try_from(&header.request_hash[..]).unwrap_or_default();
        let _ = verify_response(
            &f.view,
            &roots,
            &header,
            sig,
            &f.provider.0,
            &request_hash,
            NOW_SECS,
        );
    }
    let _ = unframe(Bytes::copy_from_slice(data), 1 << 16);
}

/// Consent tokens and portal assertions (compact JWS): the input as a token,
/// checked with the fixed keys; and the input as the claims of a token
/// signed with them.
pub fn jws(data: &[u8]) {
    let f = fixture();
    let (portal, portal_key) = &f.portal;
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = token::key_id(text);
        let _ = token::verify(text, |kid| f.view.consent_key(kid));
        let _ = assertion::verify(text, portal, NOW_SECS, 60);
    }
    match token::verify(&signed_jws(token::TYP, data, &f.consent), |kid| {
        f.view.consent_key(kid)
    }) {
        Ok(claims) => {
            let _ = covers(
                &claims.methods,
                "/kz.population.v1.PopulationRegistry/GetPerson",
            );
            let again = token::verify(&token::sign(&claims, &f.consent), |kid| {
                f.view.consent_key(kid)
            });
            assert_eq!(again.as_ref(), Ok(&claims), "claims that do not round-trip");
        }
        // Refused only for its claims, or for a size or shape the claims
        // give it (none at all, or too many bytes).
        Err(e) => assert!(
            matches!(e, JwsError::Claims(_) | JwsError::TooLarge(_))
                || (data.is_empty() && e == JwsError::Shape),
            "a well-signed token refused for its form: {e}"
        ),
    }
    let _ = assertion::verify(
        &signed_jws(assertion::TYP, data, portal_key),
        portal,
        NOW_SECS,
        60,
    );
}

/// The global configuration: the input as a published file, checked against
/// the fixed anchor; and the input as the document of a file signed with it,
/// indexed as a server would.
pub fn globalconf(data: &[u8]) {
    let f = fixture();
    if let Ok(conf) = signed::verify(data, &f.anchors) {
        let _ = ConfView::new(conf);
    }
    match signed::verify(&signed_globalconf(data, &f.authority), &f.anchors) {
        Ok(conf) => {
            let text = serde_json::to_vec(&conf).expect("a document serialises");
            let back: GlobalConf = serde_json::from_slice(&text).expect("a document reads back");
            assert_eq!(back, conf, "a document that does not round-trip");
            if let Ok(view) = ConfView::new(conf) {
                let _ = view.personal_data_servers();
            }
        }
        Err(e) => assert!(
            matches!(e, VerifyError::Document(_)),
            "a well-signed file refused for its envelope: {e}"
        ),
    }
}

/// A management request as the authority's management port takes it from
/// anyone: read, described, its signatures checked.
pub fn management_request(data: &[u8]) {
    if let Ok(opened) = kopir_authority::request::open(data) {
        for change in &opened.request.changes {
            let _ = change.describe(&opened.request.member);
        }
        let _ = opened.signed_by(
            &VerifyingKey::from_cert(fixture().authority.cert_der())
                .expect("the fixture's certificate"),
        );
    }
}

/// Certificates as the anchors and the global configuration carry them
/// (PEM, and the DER inside), and the input as an anchor file.
pub fn anchor(data: &[u8]) {
    if let Ok(anchor) =
        kopir_core::globalconf::anchor::Anchor::parse(data, std::path::Path::new("/etc/kopir"))
    {
        assert!(
            !anchor.sources.is_empty() && !anchor.keys.is_empty(),
            "an anchor without sources or keys"
        );
    }
    fn der(d: &[u8]) {
        let _ = VerifyingKey::from_cert(d);
        let _ = pki::validity(d);
        let _ = pki::public_key(d);
        let _ = pki::issued_by(d, fixture().authority.cert_der());
    }
    if let Ok(certs) = pki::certs_from_pem(data, "fuzz input") {
        certs.iter().for_each(|c| der(c.as_ref()));
    }
    der(data);
}

/// An audit record's canonical bytes (what its hash covers, and what the
/// journal stores) and its JSON form (queries, archives): each reads back
/// to the same bytes.
pub fn audit_record(data: &[u8]) {
    if let Some((seq, prev, entry)) = parse_canonical(data) {
        assert_eq!(
            entry.canonical(seq, &prev),
            data,
            "canonical bytes with two readings"
        );
    }
    if let Ok(record) = serde_json::from_slice::<StoredRecord>(data) {
        let text = serde_json::to_vec(&record).expect("a record serialises");
        let back: StoredRecord = serde_json::from_slice(&text).expect("a record reads back");
        assert_eq!(back, record, "a record whose JSON does not round-trip");
        let mut entry = record.entry.clone();
        entry.body = None;
        assert_eq!(
            parse_canonical(&record.canonical()),
            Some((record.seq, record.prev_hash, entry)),
            "a record whose canonical bytes do not read back"
        );
    }
}

/// Journal frames as recovery reads a journal file: every record read
/// hashes to what its frame says and continues the chain, and written again
/// the frames read back the same.
pub fn journal(data: &[u8]) {
    let records = kopir_audit::fuzzing::journal_records(data);
    let mut again = Vec::new();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r.recompute(),
            r.hash,
            "a recovered record with a wrong hash"
        );
        if let Some(before) = i.checked_sub(1).map(|j| &records[j]) {
            assert_eq!(
                (r.seq, r.prev_hash),
                (before.seq + 1, before.hash),
                "recovered records that do not chain"
            );
        }
        again.extend(
            kopir_audit::fuzzing::journal_frame(r).expect("a recovered record fits a frame"),
        );
    }
    assert_eq!(
        kopir_audit::fuzzing::journal_records(&again),
        records,
        "frames that do not round-trip"
    );
}

/// Export archives, verified offline: as they arrive, and with their
/// checkpoints signed anew (a checkpoint carries its signer's certificate,
/// so anyone can sign one; only `expected` tells a verifier whose to trust).
pub fn archive(data: &[u8]) {
    let Ok(mut archive) = Archive::from_json(data) else {
        return;
    };
    let json = archive.to_json().expect("an archive serialises");
    assert_eq!(
        Archive::from_json(&json).expect("an archive reads back"),
        archive,
        "an archive that does not round-trip"
    );
    let key = &fixture().provider.1;
    let _ = verify_archive(&archive, None);
    let _ = verify_archive(&archive, Some(&key.key_id()));
    let resign = |c: &Checkpoint| Checkpoint::sign(c.seq, c.head, c.root, c.at_ms, &c.node, key);
    archive.checkpoint = resign(&archive.checkpoint);
    archive.latest = archive.latest.as_ref().map(resign);
    let _ = verify_archive(&archive, Some(&key.key_id()));
    // As a forger makes one: every record chained and hashed anew, so that
    // the walk gets past the hashes to the numbers and proofs.
    let mut prev = archive
        .records
        .first()
        .map(|a| a.record.prev_hash)
        .unwrap_or_default();
    for a in &mut archive.records {
        a.record.prev_hash = prev;
        a.record.hash = a.record.recompute();
        a.canonical = a.record.canonical();
        prev = a.record.hash;
    }
    archive.checkpoint.head = prev;
    archive.checkpoint = resign(&archive.checkpoint);
    let _ = verify_archive(&archive, Some(&key.key_id()));
}
