//! The portal's assertion: whom it acts for when it asks for an access
//! report.
//!
//! The portal authenticates the citizen (with its own means: eID, mobile
//! ID...) and then signs, for each report it asks for, a short-lived compact
//! JWS ([`kopir_core::pki::jws`], `typ: kopir-report+jwt`) with one of the keys the
//! global configuration lists for it:
//!
//! ```json
//! {"alg": "EdDSA", "typ": "kopir-report+jwt", "kid": "<hex SHA-256 of the portal's signing certificate>"}
//! {"iss": "portal", "sub": "iin:900101300126", "aud": "kopir-access-report",
//!  "iat": 1767225600, "exp": 1767225660, "jti": "<random id>"}
//! ```
//!
//! A server accepts it only over the portal's own TLS connection (the key
//! must be that portal's, the one whose TLS certificate the caller
//! presented), so an assertion that leaks is no use without the portal's TLS
//! key either; it lives at most [`MAX_LIFETIME_SECS`].

use serde::{Deserialize, Serialize};

use kopir_core::{
    error::{Reason, Refusal},
    globalconf::view::ReportReaderEntry,
    id::Subject,
    pki::{jws, sign::SigningKey},
};

/// The `typ` of an assertion.
pub const TYP: &str = "kopir-report+jwt";
/// The `aud` of an assertion.
pub(crate) const AUDIENCE: &str = "kopir-access-report";
/// The longest an assertion may live (`exp - iat`), seconds.
pub(crate) const MAX_LIFETIME_SECS: i64 = 300;
/// The largest assertion accepted, bytes.
pub(crate) const MAX_BYTES: usize = 2048;

/// What an assertion says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The portal's name in the global configuration.
    pub iss: String,
    /// The subject the portal authenticated, `scheme:value`.
    pub sub: String,
    /// Always [`AUDIENCE`].
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Not valid at or after (seconds since the epoch).
    pub exp: i64,
    /// A unique id (recorded with the request, to match the portal's logs).
    pub jti: String,
}

impl Claims {
    /// Claims for `subject` by `portal`, valid `lifetime_secs` from `now_secs`.
    pub fn new(portal: &str, subject: &Subject, now_secs: i64, lifetime_secs: i64) -> Self {
        Self {
            iss: portal.to_owned(),
            sub: subject.to_string(),
            aud: AUDIENCE.into(),
            iat: now_secs,
            exp: now_secs.saturating_add(lifetime_secs),
            jti: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Signs the claims with the portal's key; returns the compact token.
    pub fn sign(&self, key: &SigningKey) -> String {
        jws::sign(TYP, self, key)
    }
}

fn invalid(why: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::ReportAssertionInvalid, why.to_string())
}

/// Verifies `token` as an assertion of `portal` at `now_secs` (allowing
/// `skew_secs` of clock difference); returns the subject it names.
pub fn verify(
    token: &str,
    portal: &ReportReaderEntry,
    now_secs: i64,
    skew_secs: i64,
) -> Result<(Subject, Claims), Refusal> {
    if token.is_empty() {
        return Err(invalid(format!(
            "portal {} must present an assertion naming the citizen it authenticated (a JWS of type {TYP})",
            portal.name
        )));
    }
    let claims: Claims = jws::verify(token, MAX_BYTES, TYP, |kid| portal.key(kid))
        .map_err(|e| invalid(format!("the assertion of portal {}: {e}", portal.name)))?;
    let key_valid = jws::key_id(token, MAX_BYTES)
        .ok()
        .and_then(|kid| portal.key(&kid))
        .is_some_and(|k| k.valid_at(now_secs));
    if !key_valid {
        return Err(invalid(format!(
            "the signing certificate of portal {} that signed the assertion is not valid now",
            portal.name
        )));
    }
    if claims.iss != portal.name {
        return Err(invalid(format!(
            "the assertion is issued by {:?}, not by portal {}",
            claims.iss, portal.name
        )));
    }
    if claims.aud != AUDIENCE {
        return Err(invalid(format!(
            "the assertion is for {:?}, not {AUDIENCE:?}",
            claims.aud
        )));
    }
    let lifetime = claims.exp.saturating_sub(claims.iat);
    if lifetime <= 0 || lifetime > MAX_LIFETIME_SECS {
        return Err(invalid(format!(
            "the assertion lives {lifetime} s; sign a fresh one for each request, living at most {MAX_LIFETIME_SECS} s"
        )));
    }
    if claims.iat > now_secs.saturating_add(skew_secs) {
        return Err(invalid(
            "the assertion is issued in the future (check the portal's clock)",
        ));
    }
    if now_secs >= claims.exp {
        return Err(invalid(format!(
            "the assertion expired {} s ago; sign a fresh one",
            now_secs.saturating_sub(claims.exp)
        )));
    }
    let subject = claims
        .sub
        .parse::<Subject>()
        .map_err(|e| invalid(format!("the assertion's subject: {e}")))?;
    Ok((subject, claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::{
        globalconf::model::ReaderRole,
        pki::{Fingerprint, dev::signing_pair, sign::VerifyingKey},
    };

    fn portal() -> (SigningKey, ReportReaderEntry) {
        let (cert, key) = signing_pair("portal").unwrap();
        (
            SigningKey::from_pkcs8(&key, &cert).unwrap(),
            ReportReaderEntry {
                name: "portal".into(),
                role: ReaderRole::Portal,
                tls: Fingerprint([1; 32]),
                keys: vec![VerifyingKey::from_cert(&cert).unwrap()],
            },
        )
    }

    #[test]
    fn only_a_fresh_assertion_of_that_portal_is_accepted() {
        let (key, entry) = portal();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let subject: Subject = "iin:900101300126".parse().unwrap();
        let good = Claims::new("portal", &subject, now, 60);
        let (got, _) = verify(&good.sign(&key), &entry, now, 60).unwrap();
        assert_eq!(got, subject);

        let refused = |claims: &Claims, key: &SigningKey| {
            let r = verify(&claims.sign(key), &entry, now, 60).unwrap_err();
            assert_eq!(r.reason, Reason::ReportAssertionInvalid);
            r.message
        };
        let (other_key, _) = portal();
        assert!(refused(&good, &other_key).contains("does not list"));
        let mut c = good.clone();
        c.exp = now - 1;
        c.iat = now - 61;
        assert!(refused(&c, &key).contains("expired"));
        let mut c = good.clone();
        c.exp = now + MAX_LIFETIME_SECS + 1;
        assert!(refused(&c, &key).contains("at most"));
        let mut c = good.clone();
        c.iss = "other".into();
        assert!(refused(&c, &key).contains("issued by"));
        let mut c = good.clone();
        c.aud = "elsewhere".into();
        assert!(refused(&c, &key).contains("not \"kopir-access-report\""));
        // Expired at the start of time: refused, the age saturating.
        let mut c = good.clone();
        c.iat = i64::MIN;
        c.exp = i64::MIN + 60;
        assert!(refused(&c, &key).contains("expired"));
        let r = verify("", &entry, now, 60).unwrap_err();
        assert_eq!(r.reason, Reason::ReportAssertionInvalid);
        // A consent token (typ JWT) signed with the same key is not an assertion.
        let token = jws::sign("JWT", &good, &key);
        assert!(
            verify(&token, &entry, now, 60)
                .unwrap_err()
                .message
                .contains("type")
        );
    }
}
