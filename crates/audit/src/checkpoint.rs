//! Signed checkpoints of the log.
//!
//! A checkpoint says: "the log had `seq` records, the last of which had chain
//! hash `head`, and the Merkle tree over all of them had root `root`", signed
//! by the server's signing key at `at_ms`. The writer signs one at a
//! configurable interval, on demand and at a clean shutdown. Records behind the
//! last checkpoint cannot be edited, removed, reordered or truncated without
//! `verify` noticing; the certificate and its key id are stored with each
//! checkpoint so that a verifier needs nothing else (and may insist on an
//! expected certificate).
//!
//! The signature covers these canonical bytes (each field a 4-byte big-endian
//! length and its bytes): `"kopir-audit-checkpoint/1"`, `seq` (u64, 8 bytes
//! big-endian), `head` (32), `root` (32), `at_ms` (i64, 8 bytes big-endian),
//! `node` (UTF-8), `key_id` (32).

use serde::{Deserialize, Serialize};

use super::record::{Hash, b64, hex32};
use kopir_core::pki::{
    Fingerprint,
    sign::{SigningKey, VerifyingKey},
};

/// The tag that starts a checkpoint's signed bytes.
pub(crate) const CHECKPOINT_TAG: &str = "kopir-audit-checkpoint/1";

/// A signed statement of the log's size, head and Merkle root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Number of records covered (the sequence number of the last one).
    pub seq: u64,
    /// Chain hash of record `seq`.
    #[serde(with = "hex32")]
    pub head: Hash,
    /// Merkle root over records `1..=seq`.
    #[serde(with = "hex32")]
    pub root: Hash,
    /// When it was signed, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The node that signed it.
    pub node: String,
    /// SHA-256 of the signer's certificate.
    #[serde(with = "hex32")]
    pub key_id: Hash,
    /// The signer's certificate, DER.
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    /// Ed25519 signature over [`Checkpoint::signed_bytes`].
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
}

/// Why a checkpoint's signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CheckpointError {
    /// The stored certificate is not the one the key id names.
    #[error("the stored certificate does not match the key id")]
    CertificateMismatch,
    /// The stored certificate cannot be parsed.
    #[error("the stored certificate cannot be used: {0}")]
    BadCertificate(String),
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// Signed by another key than the verifier expects.
    #[error("signed by key {found}, not the expected {expected}")]
    UnexpectedSigner {
        /// The key id found.
        found: String,
        /// The key id expected.
        expected: String,
    },
}

fn field(out: &mut Vec<u8>, b: &[u8]) {
    // Every field here is short (at most a node name).
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
}

impl Checkpoint {
    /// The bytes the signature covers.
    pub(crate) fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        field(&mut out, CHECKPOINT_TAG.as_bytes());
        field(&mut out, &self.seq.to_be_bytes());
        field(&mut out, &self.head);
        field(&mut out, &self.root);
        field(&mut out, &self.at_ms.to_be_bytes());
        field(&mut out, self.node.as_bytes());
        field(&mut out, &self.key_id);
        out
    }

    /// Signs a checkpoint of `seq` records with chain head `head` and Merkle
    /// root `root`.
    pub fn sign(
        seq: u64,
        head: Hash,
        root: Hash,
        at_ms: i64,
        node: &str,
        signer: &SigningKey,
    ) -> Self {
        let mut cp = Self {
            seq,
            head,
            root,
            at_ms,
            node: node.to_owned(),
            key_id: signer.key_id().0,
            cert_der: signer.cert_der().to_vec(),
            signature: Vec::new(),
        };
        cp.signature = signer.sign(&cp.signed_bytes());
        cp
    }

    /// The signer's key id.
    pub(crate) fn key_id(&self) -> Fingerprint {
        Fingerprint(self.key_id)
    }

    /// Checks the signature with the stored certificate; with `expected`, also
    /// that the certificate is that one.
    pub(crate) fn verify(&self, expected: Option<&Fingerprint>) -> Result<(), CheckpointError> {
        if Fingerprint::of(&self.cert_der).0 != self.key_id {
            return Err(CheckpointError::CertificateMismatch);
        }
        if let Some(expected) = expected
            && expected.0 != self.key_id
        {
            return Err(CheckpointError::UnexpectedSigner {
                found: self.key_id().to_string(),
                expected: expected.to_string(),
            });
        }
        let key = VerifyingKey::from_cert(&self.cert_der)
            .map_err(|e| CheckpointError::BadCertificate(e.to_string()))?;
        if key.verify(&self.signed_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(CheckpointError::BadSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::pki::dev::signing_pair;

    #[test]
    fn signed_checkpoints_verify_and_any_change_fails() {
        let (cert, key) = signing_pair("audit test").unwrap();
        let signer = SigningKey::from_pkcs8(&key, &cert).unwrap();
        let cp = Checkpoint::sign(5, [1; 32], [2; 32], 1_700_000_000_000, "n1", &signer);
        cp.verify(None).unwrap();
        cp.verify(Some(&signer.key_id())).unwrap();
        let (other, _) = signing_pair("other").unwrap();
        assert!(matches!(
            cp.verify(Some(&Fingerprint::of(&other))),
            Err(CheckpointError::UnexpectedSigner { .. })
        ));
        let mut bad = cp.clone();
        bad.seq = 4;
        assert_eq!(bad.verify(None), Err(CheckpointError::BadSignature));
        let mut bad = cp.clone();
        bad.root[0] ^= 1;
        assert_eq!(bad.verify(None), Err(CheckpointError::BadSignature));
        let mut bad = cp.clone();
        bad.cert_der = other;
        assert_eq!(bad.verify(None), Err(CheckpointError::CertificateMismatch));
        let json = serde_json::to_string(&cp).unwrap();
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cp);
    }
}
