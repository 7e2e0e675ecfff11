//! Compact JWS (RFC 7515) signed with Ed25519 (`alg: EdDSA`, RFC 8037): the
//! one implementation behind every signed token kopir issues or accepts (the
//! consent authority's consent tokens, the portal's access-report
//! assertions).
//!
//! ```text
//! base64url(header) "." base64url(claims) "." base64url(signature)
//! header = {"alg":"EdDSA","typ":"<typ>","kid":"<hex SHA-256 of the signer's certificate>"}
//! ```
//!
//! Each kind of token has its own `typ` (explicit typing, RFC 8725 §3.11), so
//! a token of one kind is never accepted as another, and its own claims type,
//! which should be `deny_unknown_fields`.
//!
//! Parsing is strict and happens in this order, so nothing unauthenticated is
//! interpreted beyond the header: size limit; exactly three parts; canonical
//! base64url without padding; a header of exactly `alg`, `typ`, `kid` with
//! `alg = EdDSA` (never `none`) and the expected `typ`; a `kid` the caller
//! knows; the signature over the first two parts; only then the claims.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    Fingerprint,
    sign::{SigningKey, VerifyingKey},
};

/// The only `alg` signed and accepted.
pub const ALG: &str = "EdDSA";

/// The JOSE header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Why a token cannot be read or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwsError {
    /// Longer than the limit for its kind.
    #[error("the token is {0} bytes long, more than accepted")]
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
    /// `typ` is not the expected one.
    #[error("the token's type {0:?} is not the one expected here")]
    Type(String),
    /// `kid` is not 64 hex digits.
    #[error("the token's kid is not 64 hex digits")]
    KeyIdFormat,
    /// No key with that `kid`.
    #[error(
        "the token is signed with key {0}, which the global configuration does not list for its issuer"
    )]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the token's signature does not verify (forged or altered)")]
    BadSignature,
    /// The claims are not the expected JSON object.
    #[error("the token's claims are malformed: {0}")]
    Claims(String),
}

fn decode_part(part: &str, what: &'static str) -> Result<Vec<u8>, JwsError> {
    let bytes = B64.decode(part).map_err(|_| JwsError::Encoding(what))?;
    // Only the canonical encoding: no stray trailing bits, no alternative forms.
    if B64.encode(&bytes) != part {
        return Err(JwsError::Encoding(what));
    }
    Ok(bytes)
}

/// Signs `claims` as a token of type `typ` with `key`; returns the compact
/// serialisation.
pub fn sign(typ: &str, claims: &impl Serialize, key: &SigningKey) -> String {
    let header = Header {
        alg: ALG.into(),
        typ: typ.into(),
        kid: key.key_id().to_string(),
    };
    // Serialising plain structs of strings and numbers cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let claims = serde_json::to_vec(claims).unwrap_or_default();
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", B64.encode(signature))
}

fn split(token: &str, max_bytes: usize) -> Result<[&str; 3], JwsError> {
    if token.len() > max_bytes {
        return Err(JwsError::TooLarge(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let parts: [&str; 3] = parts.try_into().map_err(|_| JwsError::Shape)?;
    if parts.iter().any(|p| p.is_empty()) {
        return Err(JwsError::Shape);
    }
    Ok(parts)
}

/// Reads the `kid` of a token without verifying anything else (for messages).
pub fn key_id(token: &str, max_bytes: usize) -> Result<Fingerprint, JwsError> {
    let [header, _, _] = split(token, max_bytes)?;
    let header: Header = serde_json::from_slice(&decode_part(header, "header")?)
        .map_err(|e| JwsError::Header(e.to_string()))?;
    Fingerprint::from_hex(&header.kid).ok_or(JwsError::KeyIdFormat)
}

/// Verifies a token of type `typ`, at most `max_bytes` long, and returns its
/// claims. `key_for` finds the issuer's key by `kid`.
///
/// This checks the form and the signature only: validity windows, issuer and
/// audience are the caller's to check on the claims.
pub fn verify<'k, C: DeserializeOwned>(
    token: &str,
    max_bytes: usize,
    typ: &str,
    key_for: impl FnOnce(&Fingerprint) -> Option<&'k VerifyingKey>,
) -> Result<C, JwsError> {
    let [head, body, signature] = split(token, max_bytes)?;
    let header: Header = serde_json::from_slice(&decode_part(head, "header")?)
        .map_err(|e| JwsError::Header(e.to_string()))?;
    if header.alg != ALG {
        return Err(JwsError::Algorithm(header.alg.chars().take(32).collect()));
    }
    if header.typ != typ {
        return Err(JwsError::Type(header.typ.chars().take(32).collect()));
    }
    let kid = Fingerprint::from_hex(&header.kid).ok_or(JwsError::KeyIdFormat)?;
    let key = key_for(&kid).ok_or_else(|| JwsError::UnknownKey(kid.to_string()))?;
    let signature = decode_part(signature, "signature")?;
    let input_len = head.len() + 1 + body.len();
    if !key.verify(&token.as_bytes()[..input_len], &signature) {
        return Err(JwsError::BadSignature);
    }
    serde_json::from_slice(&decode_part(body, "claims")?)
        .map_err(|e| JwsError::Claims(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::dev::signing_pair;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Claims {
        sub: String,
    }

    fn keys() -> (SigningKey, VerifyingKey) {
        let (cert, key) = signing_pair("jws test").unwrap();
        (
            SigningKey::from_pkcs8(&key, &cert).unwrap(),
            VerifyingKey::from_cert(&cert).unwrap(),
        )
    }

    #[test]
    fn a_token_of_one_type_is_not_accepted_as_another() {
        let (sk, vk) = keys();
        let claims = Claims { sub: "s".into() };
        let token = sign("kopir-a+jwt", &claims, &sk);
        let got: Claims = verify(&token, 1024, "kopir-a+jwt", |_| Some(&vk)).unwrap();
        assert_eq!(got, claims);
        assert_eq!(
            verify::<Claims>(&token, 1024, "JWT", |_| Some(&vk)),
            Err(JwsError::Type("kopir-a+jwt".into()))
        );
        assert_eq!(key_id(&token, 1024).unwrap(), sk.key_id());
        assert_eq!(
            verify::<Claims>(&token, 10, "kopir-a+jwt", |_| Some(&vk)),
            Err(JwsError::TooLarge(token.len()))
        );
    }
}
