//! Management requests: how a member asks the authority to change what the
//! global configuration says of it (X-Road's `authCertReg` and
//! `clientReg`, in one signed format).
//!
//! A request is a small JSON envelope around the exact bytes of the request
//! document, with one or more Ed25519 signatures over them:
//!
//! ```json
//! {"format": "kopir-request/1", "payload": "<base64 JSON request>",
//!  "signatures": [{"key_id": "<hex SHA-256 of the signing certificate>", "signature": "<base64>"}]}
//! ```
//!
//! The document names the member, an id, when it was made and the changes:
//! a new member (with its signing certificate), a new server (with its TLS
//! certificate and address), a server's new address, a subsystem added or
//! removed. Who must have signed is checked by the authority
//! ([`crate::registry`]): the member's current signing key for an existing
//! member, and every new signing key (proof of possession).

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use kopir_core::{
    id::MemberId,
    pki::{
        Fingerprint,
        sign::{SigningKey, VerifyingKey},
    },
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The envelope's format tag.
pub const FORMAT: &str = "kopir-request/1";

/// The largest request accepted.
pub const MAX_BYTES: usize = 64 * 1024;

/// One change a request asks for, of its member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// The member joins the federation with this signing certificate (PEM).
    JoinMember {
        /// Its name.
        name: String,
        /// Its signing certificate, issued by a trusted CA.
        signing_cert: String,
    },
    /// A new security server of the member.
    AddServer {
        /// The server's code.
        code: String,
        /// `host:port` of its peer port.
        address: String,
        /// Its TLS certificate (PEM), issued by a trusted CA.
        tls_cert: String,
        /// Codes of the member's subsystems it provides.
        #[serde(default)]
        subsystems: Vec<String>,
    },
    /// A server of the member moves.
    SetAddress {
        /// The server's code.
        code: String,
        /// Its new `host:port`.
        address: String,
    },
    /// A new subsystem of the member.
    AddSubsystem {
        /// The subsystem's code.
        code: String,
        /// True if its services return personal data.
        #[serde(default)]
        personal_data: bool,
    },
    /// A subsystem of the member goes (and from every server that provided it).
    RemoveSubsystem {
        /// The subsystem's code.
        code: String,
    },
    /// A new signing certificate of the member, listed beside the ones it
    /// has (the first step of a key rollover); the new key signs the
    /// request too.
    AddSigningCert {
        /// The certificate (PEM), issued by a trusted CA.
        signing_cert: String,
    },
    /// A signing certificate of the member is no longer listed (the last
    /// step of a rollover); the member keeps at least one.
    RemoveSigningCert {
        /// The SHA-256 of the certificate, hex.
        key_id: String,
    },
}

impl Change {
    /// One line saying what it asks for, for operators.
    pub fn describe(&self, member: &MemberId) -> String {
        match self {
            Change::JoinMember { name, .. } => format!("new member {member} ({name})"),
            Change::AddServer { code, address, .. } => {
                format!("new server {member}/{code} at {address}")
            }
            Change::SetAddress { code, address } => {
                format!("server {member}/{code} moves to {address}")
            }
            Change::AddSubsystem {
                code,
                personal_data,
            } => format!(
                "new subsystem {member}/{code}{}",
                if *personal_data {
                    " (personal data)"
                } else {
                    ""
                }
            ),
            Change::RemoveSubsystem { code } => format!("subsystem {member}/{code} removed"),
            Change::AddSigningCert { signing_cert } => format!(
                "new signing certificate of {member}{}",
                kopir_core::pki::certs_from_pem(signing_cert.as_bytes(), "request")
                    .map(|c| format!(" {}", Fingerprint::of(c[0].as_ref())))
                    .unwrap_or_default()
            ),
            Change::RemoveSigningCert { key_id } => {
                format!("signing certificate {key_id} of {member} removed")
            }
        }
    }
}

/// The request document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Its id (a UUID: letters, digits, hyphens), chosen by the member;
    /// also the name of the files the authority keeps it in.
    pub id: String,
    /// The member it concerns.
    pub member: MemberId,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// What it asks for, applied in order.
    pub changes: Vec<Change>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    payload: String,
    signatures: Vec<Signature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    key_id: String,
    signature: String,
}

/// A request read from its envelope, its signatures not yet checked.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The document.
    pub request: Request,
    payload: Vec<u8>,
    signatures: Vec<(Fingerprint, Vec<u8>)>,
}

/// Why a request cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a management request: {0}")]
pub struct FormatError(pub String);

/// Signs `request` with every key in `keys`; returns the envelope (JSON).
pub fn sign(request: &Request, keys: &[&SigningKey]) -> Vec<u8> {
    let payload = serde_json::to_vec_pretty(request).unwrap_or_default();
    let envelope = Envelope {
        format: FORMAT.into(),
        payload: B64.encode(&payload),
        signatures: keys
            .iter()
            .map(|k| Signature {
                key_id: k.key_id().to_string(),
                signature: B64.encode(k.sign(&payload)),
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&envelope).unwrap_or_default()
}

/// Reads an envelope (at most [`MAX_BYTES`]) and its document.
pub fn open(bytes: &[u8]) -> Result<Opened, FormatError> {
    if bytes.len() > MAX_BYTES {
        return Err(FormatError(format!(
            "{} bytes; a request is at most {MAX_BYTES}",
            bytes.len()
        )));
    }
    let bad = |e: &dyn std::fmt::Display| FormatError(e.to_string());
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| bad(&e))?;
    if envelope.format != FORMAT {
        return Err(FormatError(format!(
            "format {:?}, expected {FORMAT:?}",
            envelope.format
        )));
    }
    let payload = B64.decode(&envelope.payload).map_err(|e| bad(&e))?;
    let request: Request = serde_json::from_slice(&payload).map_err(|e| bad(&e))?;
    let id_ok = (1..=64).contains(&request.id.len())
        && request
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !id_ok || request.changes.is_empty() {
        return Err(FormatError(
            "a request needs an id of 1 to 64 letters, digits and hyphens (a UUID) and at least one change".into(),
        ));
    }
    let signatures = envelope
        .signatures
        .iter()
        .map(|s| {
            let key = Fingerprint::from_hex(&s.key_id)
                .ok_or_else(|| FormatError("a key_id is not 64 hex digits".into()))?;
            Ok((key, B64.decode(&s.signature).map_err(|e| bad(&e))?))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Opened {
        request,
        payload,
        signatures,
    })
}

impl Opened {
    /// True if `key` signed the document.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        self.signatures
            .iter()
            .any(|(id, sig)| *id == key.key_id() && key.verify(&self.payload, sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::pki::dev::signing_pair;

    fn key(cn: &str) -> SigningKey {
        let (cert, pkcs8) = signing_pair(cn).unwrap();
        SigningKey::from_pkcs8(&pkcs8, &cert).unwrap()
    }

    fn request() -> Request {
        Request {
            id: "7d1f".into(),
            member: "KZ/GOV/NEW".parse().unwrap(),
            created_at: OffsetDateTime::now_utc(),
            changes: vec![Change::AddSubsystem {
                code: "registry".into(),
                personal_data: true,
            }],
        }
    }

    #[test]
    fn a_signed_request_opens_and_names_its_signers() {
        let (a, b) = (key("a"), key("b"));
        let asked = request();
        let opened = open(&sign(&asked, &[&a])).unwrap();
        assert_eq!(opened.request, asked);
        let verifying = |k: &SigningKey| VerifyingKey::from_cert(k.cert_der()).unwrap();
        assert!(opened.signed_by(&verifying(&a)));
        assert!(!opened.signed_by(&verifying(&b)));
    }

    #[test]
    fn an_altered_or_malformed_request_is_refused_or_unsigned() {
        let a = key("a");
        let bytes = sign(&request(), &[&a]);
        let mut envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mut other = request();
        other.member = "KZ/GOV/OTHER".parse().unwrap();
        envelope["payload"] = B64.encode(serde_json::to_vec(&other).unwrap()).into();
        let altered = open(envelope.to_string().as_bytes()).unwrap();
        assert!(!altered.signed_by(&VerifyingKey::from_cert(a.cert_der()).unwrap()));
        for (bytes, expect) in [
            (b"{".to_vec(), "EOF"),
            (vec![b' '; MAX_BYTES + 1], "a request is at most"),
            (
                String::from_utf8(bytes.clone())
                    .unwrap()
                    .replace("request/1", "request/2")
                    .into_bytes(),
                "expected \"kopir-request/1\"",
            ),
        ] {
            let e = open(&bytes).unwrap_err();
            assert!(e.to_string().contains(expect), "{e}");
        }
        let mut empty = request();
        empty.changes.clear();
        assert!(open(&sign(&empty, &[&a])).is_err());
        for id in ["", "../x", "a/b", "a_b", &"a".repeat(65)] {
            let mut odd = request();
            odd.id = id.into();
            let e = open(&sign(&odd, &[&a])).unwrap_err();
            assert!(
                e.to_string().contains("letters, digits and hyphens"),
                "{id}: {e}"
            );
        }
    }
}
