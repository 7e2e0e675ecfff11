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
//! exactly the fields above (no duplicates, no extras).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};

use crate::pki::{
    Fingerprint,
    sign::{SigningKey, VerifyingKey},
};

/// The largest token accepted, in bytes (the `kopir-consent` header's limit).
pub const MAX_TOKEN_BYTES: usize = 8192;
/// The only `alg` signed and accepted.
pub const ALG: &str = "EdDSA";
/// The `typ` of every token.
pub const TYP: &str = "JWT";

/// The JOSE header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

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

/// Why a token cannot be read or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("the token is {0} bytes long; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge(usize),
    /// Not three non-empty dot-separated parts.
    #[error("the token is not a JWS compact serialisation (header.claims.signature)")]
    Shape,
    /// A part is not canonical base64url without padding.
    #[error("the token's {0} is not base64url without padding")]
    Encoding(&'static str),
    /// The header is not the expected JSON object.
    #[error("the token's header is malformed: {0}")]
    Header(String),
    /// `alg` is not `EdDSA`.
    #[error("the token's algorithm {0:?} is not accepted (only EdDSA)")]
    Algorithm(String),
    /// `typ` is not `JWT`.
    #[error("the token's type {0:?} is not JWT")]
    Type(String),
    /// `kid` is not 64 hex digits.
    #[error("the token's kid is not 64 hex digits")]
    KeyIdFormat,
    /// No key with that `kid`.
    #[error(
        "the token is signed with key {0}, which the global configuration does not list for the consent authority"
    )]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the token's signature does not verify (forged or altered)")]
    BadSignature,
    /// The claims are not the expected JSON object.
    #[error("the token's claims are malformed: {0}")]
    Claims(String),
}

fn decode_part(part: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::Encoding(what))?;
    // Only the canonical encoding: no stray trailing bits, no alternative forms.
    if B64.encode(&bytes) != part {
        return Err(TokenError::Encoding(what));
    }
    Ok(bytes)
}

/// Signs `claims` with the consent authority's key; returns the compact token.
pub fn sign(claims: &Claims, key: &SigningKey) -> String {
    let header = Header {
        alg: ALG.into(),
        typ: TYP.into(),
        kid: key.key_id().to_string(),
    };
    // Serialising these plain structs cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let claims = serde_json::to_vec(claims).unwrap_or_default();
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", B64.encode(signature))
}

/// Reads the `kid` of a token without verifying anything else (for messages).
pub fn key_id(token: &str) -> Result<Fingerprint, TokenError> {
    let header = header(token)?;
    Fingerprint::from_hex(&header.kid).ok_or(TokenError::KeyIdFormat)
}

fn split(token: &str) -> Result<[&str; 3], TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let parts: [&str; 3] = parts.try_into().map_err(|_| TokenError::Shape)?;
    if parts.iter().any(|p| p.is_empty()) {
        return Err(TokenError::Shape);
    }
    Ok(parts)
}

fn header(token: &str) -> Result<Header, TokenError> {
    let [header, _, _] = split(token)?;
    let bytes = decode_part(header, "header")?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Header(e.to_string()))
}

/// Verifies a token and returns its claims. `key_for` finds the consent
/// authority's key by `kid` (see [`crate::globalconf::ConfView::consent_key`]).
///
/// This checks the form and the signature only: the validity window, the
/// issuer and what the claims must match are the verifier's
/// ([`super::verify::ConsentVerifier`]).
pub fn verify<'k>(
    token: &str,
    key_for: impl FnOnce(&Fingerprint) -> Option<&'k VerifyingKey>,
) -> Result<Claims, TokenError> {
    let [head, body, signature] = split(token)?;
    let header: Header = serde_json::from_slice(&decode_part(head, "header")?)
        .map_err(|e| TokenError::Header(e.to_string()))?;
    if header.alg != ALG {
        return Err(TokenError::Algorithm(header.alg.chars().take(32).collect()));
    }
    if header.typ != TYP {
        return Err(TokenError::Type(header.typ.chars().take(32).collect()));
    }
    let kid = Fingerprint::from_hex(&header.kid).ok_or(TokenError::KeyIdFormat)?;
    let key = key_for(&kid).ok_or_else(|| TokenError::UnknownKey(kid.to_string()))?;
    let signature = decode_part(signature, "signature")?;
    let input_len = head.len() + 1 + body.len();
    if !key.verify(&token.as_bytes()[..input_len], &signature) {
        return Err(TokenError::BadSignature);
    }
    serde_json::from_slice(&decode_part(body, "claims")?)
        .map_err(|e| TokenError::Claims(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::dev::signing_pair;

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
