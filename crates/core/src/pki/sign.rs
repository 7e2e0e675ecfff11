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

/// The start of an Ed25519 private key in PKCS#8 v1 (RFC 8410, section 7):
/// a SEQUENCE of version 0, the algorithm id-Ed25519 and the 32-byte seed as
/// an OCTET STRING in an OCTET STRING.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The same start in PKCS#8 v2 (RFC 5958), as ring writes it: version 1,
/// and the public key after the seed.
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The PKCS#8 v1 DER of the Ed25519 key `pkcs8` holds in either version,
/// the form `openssl pkey` and pyca/cryptography read (they refuse ring's
/// v2); `None` if `pkcs8` is not an Ed25519 key ring accepts.
pub fn ed25519_pkcs8_v1(pkcs8: &[u8]) -> Option<Vec<u8>> {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).ok()?;
    let seed = match pkcs8.len() {
        48 if pkcs8.starts_with(&PKCS8_V1_PREFIX) => &pkcs8[16..],
        83 if pkcs8.starts_with(&PKCS8_V2_PREFIX) => &pkcs8[16..48],
        _ => return None,
    };
    Some([&PKCS8_V1_PREFIX[..], seed].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `openssl` with `args`; true if it succeeded.
    fn openssl(args: &[&std::ffi::OsStr]) -> bool {
        std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (Debian package openssl) is needed by this test")
            .success()
    }

    /// The dev PKI's signing keys are PKCS#8 v1, which openssl reads, and
    /// they still sign for their certificate.
    #[test]
    fn signing_keys_are_written_as_openssl_reads_them() {
        let (cert, key) = crate::pki::dev::signing_pair("v1").unwrap();
        assert!(key.starts_with(&PKCS8_V1_PREFIX) && key.len() == 48);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        std::fs::write(&path, crate::pki::pem_block("PRIVATE KEY", &key)).unwrap();
        assert!(openssl(&[
            "pkey".as_ref(),
            "-noout".as_ref(),
            "-in".as_ref(),
            path.as_os_str()
        ]));
        SigningKey::from_pkcs8(&key, &cert).unwrap();
        // A v2 key converts to the same key.
        let pair = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let v1 = ed25519_pkcs8_v1(pair.as_ref()).unwrap();
        let (a, b) = (
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(pair.as_ref()).unwrap(),
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1).unwrap(),
        );
        assert_eq!(a.public_key().as_ref(), b.public_key().as_ref());
        assert_eq!(ed25519_pkcs8_v1(b"not a key"), None);
    }

    /// A key and certificate an operator made with openssl sign and verify.
    #[test]
    fn keys_made_with_openssl_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let arg = |s: &'static str| std::ffi::OsStr::new(s);
        assert!(openssl(&[
            arg("genpkey"),
            arg("-algorithm"),
            arg("ed25519"),
            arg("-out"),
            key.as_os_str()
        ]));
        assert!(openssl(&[
            arg("req"),
            arg("-new"),
            arg("-x509"),
            arg("-subj"),
            arg("/CN=operator-made"),
            arg("-days"),
            arg("1"),
            arg("-key"),
            key.as_os_str(),
            arg("-out"),
            cert.as_os_str(),
        ]));
        let signer = SigningKey::load(&cert, &key).unwrap();
        let verifier = VerifyingKey::load(&cert).unwrap();
        assert!(verifier.verify(b"m", &signer.sign(b"m")));
    }

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
