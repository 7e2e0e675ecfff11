//! The verifier's refusals, one by one, with real keys, real tokens, a real
//! global configuration view, a real revocation set and a real (embedded) use
//! store.

use std::{sync::Arc, time::Duration};

use super::{
    ConsentVerifier, Expected, RevocationSet,
    store::sqlite::SqliteConsentStore,
    token::{self, Claims},
};
use kopir_core::{
    error::Reason,
    globalconf::{
        ConfView,
        model::{Basis, ConsentAuthority, GlobalConf, Purpose},
    },
    pki::{
        certs_to_pem,
        dev::{self_signed_tls, signing_pair},
        sign::SigningKey,
    },
};

const NOW_MS: i64 = 1_800_000_000_000;
const NOW: i64 = NOW_MS / 1000;
const ISSUER: &str = "KZ/consent";

struct Fixture {
    view: ConfView,
    key: SigningKey,
    verifier: ConsentVerifier,
    set: RevocationSet,
    _dir: tempfile::TempDir,
}

fn pem(der: &[u8]) -> String {
    certs_to_pem(&[der.to_vec().into()])
}

fn conf(consent: Option<ConsentAuthority>) -> ConfView {
    let now = time::OffsetDateTime::now_utc();
    ConfView::new(GlobalConf {
        instance: "KZ".into(),
        serial: 7,
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
        trusted_cas: vec![],
        members: vec![],
        purposes: vec![
            Purpose {
                code: "kindergarten-queue".parse().unwrap(),
                description: "queue".into(),
                basis: Basis::Consent,
                covert: None,
            },
            Purpose {
                code: "child-benefit".parse().unwrap(),
                description: "benefit".into(),
                basis: Basis::LegalAct { act: "law".into() },
                covert: None,
            },
        ],
        consent_authority: consent,
        report_readers: vec![],
        authority_keys: vec![],
    })
    .unwrap()
}

async fn fixture() -> Fixture {
    let (cert, pkcs8) = signing_pair("consent authority").unwrap();
    let key = SigningKey::from_pkcs8(&pkcs8, &cert).unwrap();
    let (tls, _) = self_signed_tls("consent").unwrap();
    let view = conf(Some(ConsentAuthority {
        issuer: ISSUER.into(),
        address: "127.0.0.1:1".into(),
        tls_cert: tls,
        signing_certs: vec![pem(&cert)],
    }));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteConsentStore::open_in(dir.path()).await.unwrap());
    let set = RevocationSet::new(Duration::from_secs(3));
    set.heartbeat(0, NOW_MS);
    Fixture {
        view,
        key,
        verifier: ConsentVerifier::new(set.clone(), store),
        set,
        _dir: dir,
    }
}

fn claims() -> Claims {
    Claims {
        iss: ISSUER.into(),
        sub: "iin:900101300126".into(),
        jti: "3f0c6a4e-8c1e-4d55-9d7e-1d2f3a4b5c6d".into(),
        client: "KZ/GOV/MLSPP/benefits".into(),
        service: "KZ/GOV/MOJ/population".into(),
        methods: vec!["/kz.population.v1.PopulationRegistry/GetPerson".into()],
        purpose: "kindergarten-queue".into(),
        nbf: NOW - 60,
        exp: NOW + 3600,
        iat: NOW - 60,
        max_uses: None,
    }
}

fn expected() -> Expected {
    Expected {
        subject: "iin:900101300126".parse().unwrap(),
        client: "KZ/GOV/MLSPP/benefits".parse().unwrap(),
        service: "KZ/GOV/MOJ/population".parse().unwrap(),
        method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
        purpose: "kindergarten-queue".parse().unwrap(),
    }
}

impl Fixture {
    async fn check(&self, token: &str, expected: &Expected) -> Result<super::Accepted, Reason> {
        self.verifier
            .check(&self.view, Some(token), expected, NOW_MS)
            .await
            .map_err(|r| r.reason)
    }
}

#[tokio::test]
async fn a_matching_token_is_accepted() {
    let f = fixture().await;
    let token = token::sign(&claims(), &f.key);
    let accepted = f.check(&token, &expected()).await.unwrap();
    assert_eq!(accepted.consent_id, claims().jti);
    assert_eq!(accepted.basis(), format!("consent:{}", claims().jti));
    assert_eq!(accepted.uses, None);
    // A service-wide grant covers each of its methods.
    let mut wide = claims();
    wide.methods = vec!["kz.population.v1.PopulationRegistry/*".into()];
    let token = token::sign(&wide, &f.key);
    f.check(&token, &expected()).await.unwrap();
}

#[tokio::test]
async fn no_token_is_consent_missing() {
    let f = fixture().await;
    for token in [None, Some("")] {
        let r = f
            .verifier
            .check(&f.view, token, &expected(), NOW_MS)
            .await
            .unwrap_err();
        assert_eq!(r.reason, Reason::ConsentMissing);
        assert!(r.message.contains("kopir-consent"), "{}", r.message);
    }
}

#[tokio::test]
async fn forged_unknown_key_wrong_issuer_and_no_authority_are_invalid() {
    let f = fixture().await;
    let token = token::sign(&claims(), &f.key);
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'Q' } else { 'A' });
    assert_eq!(
        f.check(&forged, &expected()).await.unwrap_err(),
        Reason::ConsentInvalid
    );
    let (cert, pkcs8) = signing_pair("impostor").unwrap();
    let impostor = SigningKey::from_pkcs8(&pkcs8, &cert).unwrap();
    let r = f
        .verifier
        .check(
            &f.view,
            Some(&token::sign(&claims(), &impostor)),
            &expected(),
            NOW_MS,
        )
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentInvalid);
    assert!(r.message.contains("does not list"), "{}", r.message);
    let mut other_iss = claims();
    other_iss.iss = "XX/consent".into();
    assert_eq!(
        f.check(&token::sign(&other_iss, &f.key), &expected())
            .await
            .unwrap_err(),
        Reason::ConsentInvalid
    );
    let bare = conf(None);
    let r = f
        .verifier
        .check(&bare, Some(&token), &expected(), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentInvalid);
}

#[tokio::test]
async fn each_field_must_match() {
    let f = fixture().await;
    let token = token::sign(&claims(), &f.key);
    let cases: Vec<(&str, Expected)> = vec![
        (
            "subject",
            Expected {
                subject: "iin:971125443866".parse().unwrap(),
                ..expected()
            },
        ),
        (
            "client",
            Expected {
                client: "KZ/GOV/MLSPP/other".parse().unwrap(),
                ..expected()
            },
        ),
        (
            "service",
            Expected {
                service: "KZ/GOV/SRC/income".parse().unwrap(),
                ..expected()
            },
        ),
        (
            "method",
            Expected {
                method: "/kz.population.v1.PopulationRegistry/ListChildren".into(),
                ..expected()
            },
        ),
        (
            "purpose",
            Expected {
                purpose: "child-benefit".parse().unwrap(),
                ..expected()
            },
        ),
    ];
    for (field, exp) in cases {
        let r = f
            .verifier
            .check(&f.view, Some(&token), &exp, NOW_MS)
            .await
            .unwrap_err();
        assert_eq!(r.reason, Reason::ConsentMismatch, "{field}");
        assert!(
            r.message.contains(&format!("token's {field}")),
            "{field}: {}",
            r.message
        );
    }
}

#[tokio::test]
async fn unknown_purpose_is_refused() {
    let f = fixture().await;
    let mut c = claims();
    c.purpose = "curiosity".into();
    let exp = Expected {
        purpose: "curiosity".parse().unwrap(),
        ..expected()
    };
    assert_eq!(
        f.check(&token::sign(&c, &f.key), &exp).await.unwrap_err(),
        Reason::PurposeUnknown
    );
}

#[tokio::test]
async fn the_validity_window_is_enforced() {
    let f = fixture().await;
    let mut early = claims();
    early.nbf = NOW + 1;
    let r = f
        .verifier
        .check(
            &f.view,
            Some(&token::sign(&early, &f.key)),
            &expected(),
            NOW_MS,
        )
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentNotYetValid);
    assert!(r.message.contains("valid from"), "{}", r.message);
    let mut late = claims();
    late.exp = NOW;
    assert_eq!(
        f.check(&token::sign(&late, &f.key), &expected())
            .await
            .unwrap_err(),
        Reason::ConsentExpired
    );
}

#[tokio::test]
async fn uses_are_limited_and_only_accepted_calls_count() {
    let f = fixture().await;
    let mut limited = claims();
    limited.max_uses = Some(2);
    let token = token::sign(&limited, &f.key);
    let first = f.check(&token, &expected()).await.unwrap();
    assert_eq!(first.uses.map(|u| (u.used, u.max)), Some((1, 2)));
    // A refused call does not take a use.
    let other = Expected {
        method: "/kz.population.v1.PopulationRegistry/ListChildren".into(),
        ..expected()
    };
    assert_eq!(
        f.check(&token, &other).await.unwrap_err(),
        Reason::ConsentMismatch
    );
    let second = f.check(&token, &expected()).await.unwrap();
    assert_eq!(second.uses.map(|u| u.used), Some(2));
    assert_eq!(
        f.check(&token, &expected()).await.unwrap_err(),
        Reason::ConsentExhausted
    );
}

#[tokio::test]
async fn revoked_and_unverified_are_refused() {
    let f = fixture().await;
    let token = token::sign(&claims(), &f.key);
    f.set.revoke(1, &claims().jti, NOW + 3600, NOW_MS);
    let r = f
        .verifier
        .check(&f.view, Some(&token), &expected(), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentRevoked);
    assert_eq!(r.code, tonic::Code::PermissionDenied);
    // Another consent, but the authority has been silent for too long.
    let mut other = claims();
    other.jti = "another".into();
    let r = f
        .verifier
        .check(
            &f.view,
            Some(&token::sign(&other, &f.key)),
            &expected(),
            NOW_MS + 3_001,
        )
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentUnverified);
    assert_eq!(r.code, tonic::Code::Unavailable);
    assert!(r.message.contains("3001 ms"), "{}", r.message);
}

#[test]
fn a_call_without_subject_cannot_rest_on_consent() {
    let meta = kopir_core::meta::CallMeta {
        request_id: "r".into(),
        client: "KZ/GOV/MLSPP/benefits".parse().unwrap(),
        service: "KZ/GOV/MOJ/population".parse().unwrap(),
        method: "/p.S/M".into(),
        purpose: "kindergarten-queue".parse().unwrap(),
        subject: None,
        consent: Some("t".into()),
        user: None,
        tracker: Default::default(),
    };
    assert_eq!(
        Expected::from_meta(&meta).unwrap_err().reason,
        Reason::SubjectRequired
    );
}

#[tokio::test]
async fn a_remembered_token_still_needs_a_listed_key() {
    let f = fixture().await;
    let token = token::sign(&claims(), &f.key);
    // Checked once, then accepted again from memory.
    for _ in 0..2 {
        f.check(&token, &expected()).await.unwrap();
    }
    // Every other check still runs on a remembered token.
    let mut bob = expected();
    bob.subject = "iin:971125443866".parse().unwrap();
    assert_eq!(
        f.check(&token, &bob).await.unwrap_err(),
        Reason::ConsentMismatch
    );
    // A global configuration that no longer lists the authority's key (a key
    // rollover) refuses the token even though its signature was checked.
    let (cert, _) = signing_pair("next consent key").unwrap();
    let (tls, _) = self_signed_tls("consent").unwrap();
    let rolled = conf(Some(ConsentAuthority {
        issuer: ISSUER.into(),
        address: "127.0.0.1:1".into(),
        tls_cert: tls,
        signing_certs: vec![pem(&cert)],
    }));
    let r = f
        .verifier
        .check(&rolled, Some(&token), &expected(), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ConsentInvalid);
}
