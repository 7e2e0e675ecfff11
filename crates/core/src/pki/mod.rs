//! Keys, certificates, signatures and TLS configuration.
//!
//! - [`sign`]: the members' and the authority's Ed25519 signing keys (ring).
//! - [`batch`]: one signature over the Merkle root of many digests.
//! - [`tls`]: rustls configurations for the client, peer and admin ports, with
//!   certificates pinned to what the global configuration lists.
//! - [`layout`]: where the files of a development PKI live.
//! - [`dev`] (feature `dev-pki`): a development PKI made with rcgen
//!   (`kopir certs dev`, tests).
//! - [`jws`]: compact JWS tokens signed with Ed25519 (consent tokens, report
//!   assertions).

pub mod batch;
#[cfg(any(test, feature = "dev-pki"))]
pub mod dev;
pub mod jws;
pub mod layout;
pub mod sign;
pub mod tls;

use std::{fmt, path::Path};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// What went wrong loading or using key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or key of the expected kind.
    #[error("{what} in {path}: {why}")]
    Pem {
        /// What was expected ("certificate", "private key").
        what: &'static str,
        /// Where it was expected.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A certificate could not be parsed.
    #[error("certificate cannot be parsed: {0}")]
    Certificate(String),
    /// A key could not be used.
    #[error("key rejected: {0}")]
    Key(String),
    /// A certificate could not be generated.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// SHA-256 of a certificate's DER: how the global configuration pins the
/// certificates of security servers, signing keys and information systems.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(sha256(der))
    }
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
    /// Parses 32 raw bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// SHA-256 with ring.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what: "certificate",
            path: origin.into(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificate",
            path: origin.into(),
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Every certificate in a PEM file (a chain: the end entity first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    certs_from_pem(&read(path)?, &path.display().to_string())
}

/// The fingerprint of the first certificate in a PEM file (what pinning compares).
pub fn cert_fingerprint(path: &Path) -> Result<Fingerprint, PkiError> {
    Ok(Fingerprint::of(load_certs(path)?[0].as_ref()))
}

/// The first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| PkiError::Pem {
        what: "private key",
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Encodes DER certificates as PEM text.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem_block("CERTIFICATE", c.as_ref()))
        .collect()
}

/// One PEM block.
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The validity window of a certificate, in seconds since the Unix epoch.
pub fn validity(der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The raw subject public key of a certificate (for Ed25519, the 32-byte key).
pub fn public_key(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Checks that `cert` was signed by `issuer` (both DER), for the authority's
/// check of the certificates it publishes.
pub fn issued_by(cert: &[u8], issuer: &[u8]) -> Result<(), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|e| PkiError::Certificate(format!("not issued by the given CA: {e}")))
}
