//! Ed25519 signing keys and signature verification (ring).
//!
//! A member signs requests and responses with the key of its signing
//! certificate; the authority signs the global configuration with its own. A
//! key is named by the [`Fingerprint`] of its certificate (the `key_id` on the
//! wire), so a verifier picks the right public key among those the global
//! configuration lists.

use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::{Fingerprint, PkiError, load_certs, load_key, public_key};

/// Name of the only signature algorithm kopir signs with.
pub const ALGORITHM: &str = "Ed25519";

/// A private signing key together with its certificate's fingerprint.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: Fingerprint,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Builds a key from a PKCS#8 Ed25519 private key and its certificate (DER),
    /// checking that they belong together.
    pub fn from_pkcs8(pkcs8: &[u8], cert_der: &[u8]) -> Result<Self, PkiError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| PkiError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        if public_key(cert_der)? != pair.public_key().as_ref() {
            return Err(PkiError::Key(
                "the private key does not match the certificate".into(),
            ));
        }
        Ok(Self {
            pair,
            key_id: Fingerprint::of(cert_der),
            cert_der: cert_der.to_vec(),
        })
    }

    /// Loads a certificate PEM file and its PKCS#8 key PEM file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        Self::from_pkcs8(key.secret_der(), certs[0].as_ref())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// The fingerprint of this key's certificate.
    pub fn key_id(&self) -> Fingerprint {
        self.key_id
    }

    /// This key's certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
}

/// A public key that signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    key: Vec<u8>,
    key_id: Fingerprint,
    not_before: i64,
    not_after: i64,
}

impl VerifyingKey {
    /// The public key of a signing certificate (DER).
    pub fn from_cert(der: &[u8]) -> Result<Self, PkiError> {
        let (not_before, not_after) = super::validity(der)?;
        Ok(Self {
            key: public_key(der)?,
            key_id: Fingerprint::of(der),
            not_before,
            not_after,
        })
    }

    /// The public key of the first certificate in a PEM file.
    pub fn load(cert: &Path) -> Result<Self, PkiError> {
        Self::from_cert(super::load_certs(cert)?[0].as_ref())
    }

    /// The fingerprint of the certificate the key came from.
    pub fn key_id(&self) -> Fingerprint {
        self.key_id
    }

    /// True if `unix_secs` lies within the certificate's validity.
    pub fn valid_at(&self, unix_secs: i64) -> bool {
        (self.not_before..=self.not_after).contains(&unix_secs)
    }

    /// Checks an Ed25519 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(message, signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let (cert, key) = crate::pki::dev::signing_pair("test signer").unwrap();
        let signer = SigningKey::from_pkcs8(&key, &cert).unwrap();
        let verifier = VerifyingKey::from_cert(&cert).unwrap();
        assert_eq!(signer.key_id(), verifier.key_id());
        let sig = signer.sign(b"hello");
        assert!(verifier.verify(b"hello", &sig));
        assert!(!verifier.verify(b"hellO", &sig));
        let mut bad = sig.clone();
        bad[0] ^= 1;
        assert!(!verifier.verify(b"hello", &bad));
    }

    #[test]
    fn mismatched_key_and_cert_are_refused() {
        let (cert, _) = crate::pki::dev::signing_pair("a").unwrap();
        let (_, other_key) = crate::pki::dev::signing_pair("b").unwrap();
        assert!(SigningKey::from_pkcs8(&other_key, &cert).is_err());
    }
}
