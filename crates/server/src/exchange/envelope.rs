//! The signed envelope: canonical byte forms of request and response headers,
//! and their signing and verification.
//!
//! Protobuf encoding is not canonical, so signatures cover a byte string built
//! field by field, each as a 4-byte big-endian length and its UTF-8 bytes:
//!
//! - request: `"kopir-request/2"`, signer member id, key id (hex), request id,
//!   client, service, method, purpose, subject, consent, user, query group,
//!   hidden-until (decimal ms, empty if not hidden), hide reason, timestamp
//!   (decimal ms), body SHA-256 (hex);
//! - response: `"kopir-response/1"`, signer member id, key id (hex), request id,
//!   request hash (hex), status code (decimal), status message, body SHA-256
//!   (hex), timestamp (decimal ms).
//!
//! The *request hash* and *response hash* are the SHA-256 of these forms. The
//! Ed25519 signature is made over that hash (not the form itself), so an audit
//! record that keeps only the hash, the signature and the signer's key id can
//! be checked later without keeping the subject in clear. Under load a server
//! signs the hashes of concurrent messages with one signature over their
//! Merkle root, each message carrying its path (see [`kopir_core::pki::batch`]).
//! The response form includes the request hash, binding each answer to the
//! question it answers.

use kopir_core::{
    error::{Reason, Refusal},
    globalconf::ConfView,
    id::MemberId,
    pki::{
        Fingerprint,
        batch::{BatchSigner, VerifiedRoots},
        sha256,
        sign::{ALGORITHM, SigningKey},
    },
};
use kopir_proto::v1::{RequestHeader, ResponseHeader, Signature};

struct Canonical(Vec<u8>);

impl Canonical {
    fn new(tag: &str) -> Self {
        let mut c = Self(Vec::with_capacity(512));
        c.field(tag.as_bytes());
        c
    }
    /// The 4-byte big-endian length that opens each field.
    fn prefix(&mut self, len: usize) {
        self.0.extend_from_slice(&(len as u32).to_be_bytes());
    }
    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.prefix(bytes.len());
        self.0.extend_from_slice(bytes);
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.field(s.as_bytes())
    }
    /// Lowercase hex, written straight into the form (no string in
    /// between: a request and its answer take ten of these on each side).
    fn hex(&mut self, b: &[u8]) -> &mut Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.prefix(2 * b.len());
        for &x in b {
            self.0
                .extend_from_slice(&[DIGITS[usize::from(x >> 4)], DIGITS[usize::from(x & 0x0f)]]);
        }
        self
    }
}

/// The canonical form of a request header as signed by `signer` with `key_id`.
pub fn request_canonical(h: &RequestHeader, signer: &str, key_id: &[u8]) -> Vec<u8> {
    let hidden_until = match h.hidden_until_ms {
        0 => String::new(),
        ms => ms.to_string(),
    };
    let mut c = Canonical::new("kopir-request/2");
    c.text(signer)
        .hex(key_id)
        .text(&h.request_id)
        .text(&h.client)
        .text(&h.service)
        .text(&h.method)
        .text(&h.purpose)
        .text(&h.subject)
        .text(&h.consent)
        .text(&h.user)
        .text(&h.query_group)
        .text(&hidden_until)
        .text(&h.hidden_reason)
        .text(&h.timestamp_ms.to_string())
        .hex(&h.body_sha256);
    c.0
}

/// The canonical form of a response header as signed by `signer` with `key_id`.
pub fn response_canonical(h: &ResponseHeader, signer: &str, key_id: &[u8]) -> Vec<u8> {
    let mut c = Canonical::new("kopir-response/1");
    c.text(signer)
        .hex(key_id)
        .text(&h.request_id)
        .hex(&h.request_hash)
        .text(&h.status_code.to_string())
        .text(&h.status_message)
        .hex(&h.body_sha256)
        .text(&h.timestamp_ms.to_string());
    c.0
}

/// The signature header for a signature value made with the key `key_id`.
fn signature(member: &MemberId, key_id: &Fingerprint, value: Vec<u8>) -> Signature {
    Signature {
        signer: member.to_string(),
        key_id: bytes::Bytes::copy_from_slice(&key_id.0),
        algorithm: ALGORITHM.into(),
        value: value.into(),
    }
}

/// Signs a request header on its own with `key` (tools and tests; a server
/// signs through its [`BatchSigner`]); returns the signature and the request
/// hash.
pub fn sign_request(
    h: &RequestHeader,
    member: &MemberId,
    key: &SigningKey,
) -> (Signature, [u8; 32]) {
    let hash = sha256(&request_canonical(h, &member.to_string(), &key.key_id().0));
    (signature(member, &key.key_id(), key.sign(&hash)), hash)
}

/// Signs a request header in the server's next batch; returns the signature
/// and the request hash.
pub(crate) async fn sign_request_batched(
    h: &RequestHeader,
    member: &MemberId,
    signer: &BatchSigner,
) -> (Signature, [u8; 32]) {
    let key_id = signer.key().key_id();
    let hash = sha256(&request_canonical(h, &member.to_string(), &key_id.0));
    (signature(member, &key_id, signer.sign(hash).await), hash)
}

/// Signs a response header in the server's next batch; returns the signature
/// and the response hash.
pub async fn sign_response(
    h: &ResponseHeader,
    member: &MemberId,
    signer: &BatchSigner,
) -> (Signature, [u8; 32]) {
    let key_id = signer.key().key_id();
    let hash = sha256(&response_canonical(h, &member.to_string(), &key_id.0));
    (signature(member, &key_id, signer.sign(hash).await), hash)
}

/// Checks `sig` over the hash of `canonical` against the key the global
/// configuration lists for `expected_signer`, valid at `now_secs`; returns the
/// hash.
fn verify(
    view: &ConfView,
    roots: &VerifiedRoots,
    sig: Option<&Signature>,
    expected_signer: &MemberId,
    canonical: &[u8],
    now_secs: i64,
) -> Result<[u8; 32], Refusal> {
    let sig = sig.ok_or_else(|| {
        Refusal::new(Reason::SignatureInvalid, "the message carries no signature")
    })?;
    if sig.signer != expected_signer.to_string() {
        return Err(Refusal::new(
            Reason::SignatureInvalid,
            format!("signed by {:?}, expected {expected_signer}", sig.signer),
        ));
    }
    if sig.algorithm != ALGORITHM {
        return Err(Refusal::new(
            Reason::SignatureInvalid,
            format!(
                "signature algorithm {:?} is not supported; use {ALGORITHM}",
                sig.algorithm
            ),
        ));
    }
    let key_id = Fingerprint::from_slice(&sig.key_id)
        .ok_or_else(|| Refusal::new(Reason::SignatureUnknownKey, "key_id is not 32 bytes"))?;
    let key = view.signing_key(expected_signer, &key_id).ok_or_else(|| {
        Refusal::new(
            Reason::SignatureUnknownKey,
            format!(
                "key {key_id} is not a signing key of {expected_signer} in global configuration {}",
                view.serial()
            ),
        )
    })?;
    if !key.valid_at(now_secs) {
        return Err(Refusal::new(
            Reason::SignatureUnknownKey,
            format!("signing certificate {key_id} of {expected_signer} is not valid now"),
        ));
    }
    let hash = sha256(canonical);
    if !roots.verify(key, &hash, &sig.value) {
        return Err(Refusal::new(
            Reason::SignatureInvalid,
            format!(
                "the signature of {expected_signer} does not match the request (forged, or altered in transit)"
            ),
        ));
    }
    Ok(hash)
}

/// Verifies a request's signature by the client's member; returns the request hash.
pub fn verify_request(
    view: &ConfView,
    roots: &VerifiedRoots,
    h: &RequestHeader,
    sig: Option<&Signature>,
    client_member: &MemberId,
    now_secs: i64,
) -> Result<[u8; 32], Refusal> {
    let (signer, key_id) = sig
        .map(|s| (s.signer.as_str(), &s.key_id[..]))
        .unwrap_or_default();
    verify(
        view,
        roots,
        sig,
        client_member,
        &request_canonical(h, signer, key_id),
        now_secs,
    )
}

/// Verifies a response's signature by the provider's member and its binding to
/// the request hash; returns the response hash.
pub fn verify_response(
    view: &ConfView,
    roots: &VerifiedRoots,
    h: &ResponseHeader,
    sig: Option<&Signature>,
    provider_member: &MemberId,
    request_hash: &[u8; 32],
    now_secs: i64,
) -> Result<[u8; 32], Refusal> {
    let bad = |why: String| Refusal::new(Reason::ResponseSignatureInvalid, why);
    let (signer, key_id) = sig
        .map(|s| (s.signer.as_str(), &s.key_id[..]))
        .unwrap_or_default();
    let response_hash = verify(
        view,
        roots,
        sig,
        provider_member,
        &response_canonical(h, signer, key_id),
        now_secs,
    )
    .map_err(|r| {
        bad(format!(
            "the provider's response was withheld: {}",
            r.message
        ))
    })?;
    if h.request_hash[..] != request_hash[..] {
        return Err(bad("the provider's response answers another request".into()));
    }
    Ok(response_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields enter the form as lowercase hex, each prefixed with its
    /// length, as the module header documents.
    #[test]
    fn byte_fields_are_lowercase_hex() {
        let body: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        let h = RequestHeader {
            body_sha256: body.clone().into(),
            ..RequestHeader::default()
        };
        let form = request_canonical(&h, "KZ/GOV/MLSPP", &[0x00, 0xff, 0x0a]);
        let mut tail = 64u32.to_be_bytes().to_vec();
        tail.extend_from_slice(hex::encode(&body).as_bytes());
        assert!(form.ends_with(&tail));
        let mut key = 6u32.to_be_bytes().to_vec();
        key.extend_from_slice(b"00ff0a");
        assert!(form.windows(key.len()).any(|w| w == key));
    }
}
