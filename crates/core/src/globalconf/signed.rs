//! Signing and verifying the global configuration.
//!
//! The published file is a small JSON envelope around the document's exact
//! bytes, so that the signature covers what was signed, not a re-serialisation:
//!
//! ```json
//! {"format": "kopir-globalconf/1", "key_id": "<hex SHA-256 of the authority's certificate>",
//!  "signature": "<base64 Ed25519 signature over the payload bytes>", "payload": "<base64 JSON document>"}
//! ```

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use super::GlobalConf;
use crate::pki::{
    Fingerprint, sha256,
    sign::{SigningKey, VerifyingKey},
};

/// The envelope's format tag.
pub const FORMAT: &str = "kopir-globalconf/1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    key_id: String,
    signature: String,
    payload: String,
}

/// Why a published configuration is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a kopir global configuration envelope.
    #[error("not a signed global configuration: {0}")]
    Format(String),
    /// Signed by a key that is not a trust anchor of this server.
    #[error("signed by key {0}, which is not a trusted anchor")]
    UnknownKey(String),
    /// The signature does not match the payload.
    #[error("the signature does not match the content (forged or altered)")]
    BadSignature,
    /// The payload is not a valid document.
    #[error("the signed document is malformed: {0}")]
    Document(String),
}

/// Signs `conf` with the authority's key; returns the envelope as JSON text.
pub fn sign(conf: &GlobalConf, key: &SigningKey) -> String {
    let payload = serde_json::to_vec_pretty(conf).unwrap_or_default();
    let envelope = Envelope {
        format: FORMAT.into(),
        key_id: key.key_id().to_string(),
        signature: B64.encode(key.sign(&payload)),
        payload: B64.encode(&payload),
    };
    serde_json::to_string_pretty(&envelope).unwrap_or_default()
}

/// Verifies an envelope against the trust anchors and returns the document.
pub fn verify(text: &[u8], anchors: &[VerifyingKey]) -> Result<GlobalConf, VerifyError> {
    verify_with_digest(text, anchors).map(|(conf, _)| conf)
}

/// Verifies a copy the server itself accepted before (the one it kept), with
/// the `anchors` and the authority keys the copy announces: after a key
/// rotation the kept copy is signed by a key the anchor does not name, but
/// that an earlier accepted copy announced. Only for a copy the server's
/// own record of the highest version names.
pub fn verify_kept(
    text: &[u8],
    anchors: &[VerifyingKey],
) -> Result<(GlobalConf, Fingerprint), VerifyError> {
    match verify_with_digest(text, anchors) {
        Err(VerifyError::UnknownKey(_)) => {}
        other => return other,
    }
    let envelope: Envelope =
        serde_json::from_slice(text).map_err(|e| VerifyError::Format(e.to_string()))?;
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| VerifyError::Format(format!("payload: {e}")))?;
    let conf: GlobalConf =
        serde_json::from_slice(&payload).map_err(|e| VerifyError::Document(e.to_string()))?;
    let mut keys = anchors.to_vec();
    for pem in &conf.authority_keys {
        let certs = crate::pki::certs_from_pem(pem.as_bytes(), "announced authority certificate")
            .map_err(|e| VerifyError::Document(e.to_string()))?;
        keys.push(
            VerifyingKey::from_cert(certs[0].as_ref())
                .map_err(|e| VerifyError::Document(e.to_string()))?,
        );
    }
    verify_with_digest(text, &keys)
}

/// Verifies an envelope like [`verify`] and also returns the SHA-256 of the
/// signed payload: what identifies a version of the document, whatever the
/// envelope's layout.
pub fn verify_with_digest(
    text: &[u8],
    anchors: &[VerifyingKey],
) -> Result<(GlobalConf, Fingerprint), VerifyError> {
    let envelope: Envelope =
        serde_json::from_slice(text).map_err(|e| VerifyError::Format(e.to_string()))?;
    if envelope.format != FORMAT {
        return Err(VerifyError::Format(format!(
            "format {:?}, expected {FORMAT:?}",
            envelope.format
        )));
    }
    let key_id = Fingerprint::from_hex(&envelope.key_id)
        .ok_or_else(|| VerifyError::Format("key_id is not 64 hex digits".into()))?;
    let anchor = anchors
        .iter()
        .find(|a| a.key_id() == key_id)
        .ok_or_else(|| VerifyError::UnknownKey(envelope.key_id.clone()))?;
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| VerifyError::Format(format!("payload: {e}")))?;
    let signature = B64
        .decode(&envelope.signature)
        .map_err(|e| VerifyError::Format(format!("signature: {e}")))?;
    if !anchor.verify(&payload, &signature) {
        return Err(VerifyError::BadSignature);
    }
    let conf =
        serde_json::from_slice(&payload).map_err(|e| VerifyError::Document(e.to_string()))?;
    Ok((conf, Fingerprint(sha256(&payload))))
}
