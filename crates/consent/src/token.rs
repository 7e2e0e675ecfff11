//! Consent tokens: JWS compact serialisation (RFC 7515) of a JWT (RFC 7519),
//! signed with Ed25519 (`alg: EdDSA`, RFC 8037) by the consent authority.
//!
//! ```text
//! base64url(header) "." base64url(claims) "." base64url(signature)
//! header = {"alg":"EdDSA","typ":"JWT","kid":"<hex SHA-256 of the authority's signing certificate>"}
//! claims = {"iss","sub","jti","client","service","methods","purpose","nbf","exp","iat"[,"max_uses"]}
//! ```
//!
//! Any JOSE library reads them; the key is the Ed25519 public key of the
//! certificate the global configuration lists for the consent authority, and
//! `kid` names which one.
//!
//! Parsing is strict and happens in this order, so nothing unauthenticated is
//! interpreted beyond the header: size limit; exactly three parts; canonical
//! base64url without padding; a header of exactly `alg`, `typ`, `kid` with
//! `alg = EdDSA` (never `none`) and `typ = JWT`; a `kid` the caller knows; the
//! signature over the first two parts; only then the claims, which must have
//! exactly the fields above (no duplicates, no extras). The JWS mechanics are
//! shared with kopir's other tokens ([`kopir_core::pki::jws`]).

use serde::{Deserialize, Serialize};

use kopir_core::pki::{
    Fingerprint, jws,
    sign::{SigningKey, VerifyingKey},
};

/// Why a token cannot be read or does not verify (the shared JWS errors).
pub(crate) use kopir_core::pki::jws::JwsError as TokenError;

/// The largest token accepted, in bytes (the `kopir-consent` header's limit).
pub(crate) const MAX_TOKEN_BYTES: usize = 8192;
/// The `typ` of every token.
pub const TYP: &str = "JWT";

/// What a consent token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The consent authority (`issuer` in the global configuration).
    pub iss: String,
    /// The subject, `scheme:value`, e.g. `iin:900101300126`.
    pub sub: String,
    /// The consent (grant) id.
    pub jti: String,
    /// The consumer subsystem the consent is given to.
    pub client: String,
    /// The provider subsystem.
    pub service: String,
    /// Methods covered: `/pkg.Service/Method` or `pkg.Service/*`.
    pub methods: Vec<String>,
    /// The purpose code.
    pub purpose: String,
    /// Not valid before (seconds since the Unix epoch).
    pub nbf: i64,
    /// Not valid at or after (seconds since the Unix epoch).
    pub exp: i64,
    /// Issued at (seconds since the Unix epoch).
    pub iat: i64,
    /// The most uses the consent allows, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

/// Signs `claims` with the consent authority's key; returns the compact token.
pub fn sign(claims: &Claims, key: &SigningKey) -> String {
    jws::sign(TYP, claims, key)
}

/// Reads the `kid` of a token without verifying anything else (for messages).
pub fn key_id(token: &str) -> Result<Fingerprint, TokenError> {
    jws::key_id(token, MAX_TOKEN_BYTES)
}

/// Verifies a token and returns its claims. `key_for` finds the consent
/// authority's key by `kid` (see [`kopir_core::globalconf::ConfView::consent_key`]).
///
/// This checks the form and the signature only: the validity window, the
/// issuer and what the claims must match are the verifier's
/// ([`super::verify::ConsentVerifier`]).
pub fn verify<'k>(
    token: &str,
    key_for: impl FnOnce(&Fingerprint) -> Option<&'k VerifyingKey>,
) -> Result<Claims, TokenError> {
    jws::verify(token, MAX_TOKEN_BYTES, TYP, key_for)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    use kopir_core::pki::dev::signing_pair;

    fn keys() -> (SigningKey, VerifyingKey) {
        let (cert, key) = signing_pair("consent test").unwrap();
        (
            SigningKey::from_pkcs8(&key, &cert).unwrap(),
            VerifyingKey::from_cert(&cert).unwrap(),
        )
    }

    fn claims() -> Claims {
        Claims {
            iss: "KZ/consent".into(),
            sub: "iin:900101300126".into(),
            jti: "c1".into(),
            client: "KZ/GOV/MLSPP/benefits".into(),
            service: "KZ/GOV/MOJ/population".into(),
            methods: vec!["/kz.population.v1.PopulationRegistry/GetPerson".into()],
            purpose: "kindergarten-queue".into(),
            nbf: 1000,
            exp: 2000,
            iat: 1000,
            max_uses: Some(3),
        }
    }

    fn with(token: &str, part: usize, f: impl FnOnce(&str) -> String) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[part] = f(&parts[part]);
        parts.join(".")
    }

    fn json_part(value: serde_json::Value) -> String {
        B64.encode(serde_json::to_vec(&value).unwrap())
    }

    #[test]
    fn round_trip() {
        let (sk, vk) = keys();
        let token = sign(&claims(), &sk);
        assert_eq!(token.split('.').count(), 3);
        assert!(!token.contains('='));
        assert_eq!(key_id(&token).unwrap(), sk.key_id());
        let got = verify(&token, |kid| (kid == &vk.key_id()).then_some(&vk)).unwrap();
        assert_eq!(got, claims());
        let mut unlimited = claims();
        unlimited.max_uses = None;
        let token = sign(&unlimited, &sk);
        assert!(
            !String::from_utf8(B64.decode(token.split('.').nth(1).unwrap()).unwrap())
                .unwrap()
                .contains("max_uses")
        );
        assert_eq!(verify(&token, |_| Some(&vk)).unwrap(), unlimited);
    }

    #[test]
    fn bad_signature_and_altered_claims_are_refused() {
        let (sk, vk) = keys();
        let token = sign(&claims(), &sk);
        let forged = with(&token, 2, |s| {
            let mut sig = B64.decode(s).unwrap();
            sig[0] ^= 1;
            B64.encode(sig)
        });
        assert_eq!(
            verify(&forged, |_| Some(&vk)),
            Err(TokenError::BadSignature)
        );
        let mut other = claims();
        other.sub = "iin:971125443866".into();
        let altered = with(&token, 1, |_| {
            B64.encode(serde_json::to_vec(&other).unwrap())
        });
        assert_eq!(
            verify(&altered, |_| Some(&vk)),
            Err(TokenError::BadSignature)
        );
        // Signed by another key that claims the right kid.
        let (other_sk, _) = keys();
        let by_other = sign(&claims(), &other_sk);
        let relabelled = with(&by_other, 0, |_| {
            json_part(
                serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": vk.key_id().to_string()}),
            )
        });
        assert_eq!(
            verify(&relabelled, |_| Some(&vk)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn alg_none_other_algs_and_unknown_kid_are_refused() {
        let (sk, vk) = keys();
        let token = sign(&claims(), &sk);
        let kid = vk.key_id().to_string();
        for alg in ["none", "HS256", "ES256", "eddsa"] {
            let t = with(&token, 0, |_| {
                json_part(serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid}))
            });
            assert!(
                matches!(verify(&t, |_| Some(&vk)), Err(TokenError::Algorithm(_))),
                "{alg}"
            );
        }
        // alg none with an empty signature is not even a well-formed token.
        let unsigned = format!(
            "{}.{}.",
            json_part(serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid})),
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(verify(&unsigned, |_| Some(&vk)), Err(TokenError::Shape));
        assert_eq!(
            verify(&token, |_| None),
            Err(TokenError::UnknownKey(sk.key_id().to_string()))
        );
        let bad_kid = with(&token, 0, |_| {
            json_part(serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "abc"}))
        });
        assert_eq!(
            verify(&bad_kid, |_| Some(&vk)),
            Err(TokenError::KeyIdFormat)
        );
        let extra = with(&token, 0, |_| {
            json_part(
                serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid, "crit": ["exp"]}),
            )
        });
        assert!(matches!(
            verify(&extra, |_| Some(&vk)),
            Err(TokenError::Header(_))
        ));
        let typ = with(&token, 0, |_| {
            json_part(serde_json::json!({"alg": "EdDSA", "typ": "JOSE", "kid": kid}))
        });
        assert!(matches!(
            verify(&typ, |_| Some(&vk)),
            Err(TokenError::Type(_))
        ));
    }

    #[test]
    fn encoding_shape_and_size_are_strict() {
        let (sk, vk) = keys();
        let token = sign(&claims(), &sk);
        let padded = with(&token, 2, |s| format!("{s}=="));
        assert_eq!(
            verify(&padded, |_| Some(&vk)),
            Err(TokenError::Encoding("signature"))
        );
        let standard = with(&token, 1, |s| s.replace('-', "+").replace('_', "/"));
        if standard != token {
            assert!(matches!(
                verify(&standard, |_| Some(&vk)),
                Err(TokenError::Encoding(_))
            ));
        }
        // A final character with stray low bits decodes to the same bytes
        // in lenient decoders; refused here.
        let sig = token.split('.').nth(2).unwrap();
        let last = sig.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.find(last).unwrap();
        let sibling = alphabet.chars().nth(pos ^ 1).unwrap();
        let stray = with(&token, 2, |s| format!("{}{sibling}", &s[..s.len() - 1]));
        assert!(verify(&stray, |_| Some(&vk)).is_err());
        assert_eq!(
            verify(&format!("{token}.x"), |_| Some(&vk)),
            Err(TokenError::Shape)
        );
        assert_eq!(verify("a.b", |_| Some(&vk)), Err(TokenError::Shape));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            verify(&huge, |_| Some(&vk)),
            Err(TokenError::TooLarge(MAX_TOKEN_BYTES + 1))
        );
    }

    #[test]
    fn claims_must_be_exact() {
        let (sk, vk) = keys();
        let header_and_sign = |claims_json: &[u8]| {
            let header =
                serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": sk.key_id().to_string()});
            let input = format!("{}.{}", json_part(header), B64.encode(claims_json));
            let sig = sk.sign(input.as_bytes());
            format!("{input}.{}", B64.encode(sig))
        };
        let mut extra = serde_json::to_value(claims()).unwrap();
        extra["admin"] = true.into();
        let t = header_and_sign(&serde_json::to_vec(&extra).unwrap());
        assert!(matches!(
            verify(&t, |_| Some(&vk)),
            Err(TokenError::Claims(_))
        ));
        let dup = br#"{"iss":"a","iss":"b","sub":"s","jti":"j","client":"c","service":"s","methods":[],"purpose":"p","nbf":1,"exp":2,"iat":1}"#;
        let t = header_and_sign(dup);
        assert!(matches!(
            verify(&t, |_| Some(&vk)),
            Err(TokenError::Claims(_))
        ));
        let mut missing = serde_json::to_value(claims()).unwrap();
        missing.as_object_mut().unwrap().remove("exp");
        let t = header_and_sign(&serde_json::to_vec(&missing).unwrap());
        assert!(matches!(
            verify(&t, |_| Some(&vk)),
            Err(TokenError::Claims(_))
        ));
    }
}
