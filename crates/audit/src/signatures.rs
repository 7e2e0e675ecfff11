//! Checking the exchange signature a record keeps.
//!
//! A record of a signed step keeps the signature, the fingerprint of the
//! signing certificate (`signer_key`) and the digest it covers
//! (`signed_hash`): the request hash when the signature is the consumer's
//! over the request, the response hash when it is the provider's over the
//! answer. Since exchange signatures are made over those digests (see
//! `exchange::envelope`), a record can be checked long after the exchange,
//! with only the signer's public key, which the global configuration lists.
//! The signer must be the member the record says: the client's member for a
//! request signature, the service's member for a response signature.

use serde::{Deserialize, Serialize};

use super::record::Entry;
use kopir_core::{
    globalconf::ConfView,
    id::{MemberId, SubsystemId},
    pki::Fingerprint,
};

/// What checking a record's exchange signature found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "detail")]
pub enum SignatureCheck {
    /// The record keeps no signature (a refusal, a failure before signing).
    Absent,
    /// The signature verifies with the named member's key.
    Valid(String),
    /// The signature does not verify, or is not the expected member's.
    Invalid(String),
    /// No global configuration was given, or it does not list the key.
    Unchecked(String),
}

impl SignatureCheck {
    /// True unless the signature was found bad.
    pub fn is_acceptable(&self) -> bool {
        !matches!(self, SignatureCheck::Invalid(_))
    }
}

impl std::fmt::Display for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureCheck::Absent => f.write_str("none"),
            SignatureCheck::Valid(who) => write!(f, "ok (signed by {who})"),
            SignatureCheck::Invalid(why) => write!(f, "INVALID: {why}"),
            SignatureCheck::Unchecked(why) => write!(f, "not checked: {why}"),
        }
    }
}

/// Which member must have signed: the client's for the request signature,
/// the service's for the response signature.
fn expected_signer(e: &Entry) -> Result<MemberId, String> {
    let (role, id) = if e.signed_hash.is_some() && e.signed_hash == e.request_hash {
        ("client", &e.client)
    } else {
        ("service", &e.service)
    };
    id.parse::<SubsystemId>()
        .map(|s| s.member().clone())
        .map_err(|err| format!("the record's {role} {id:?} is not a subsystem id: {err}"))
}

/// Checks the signature `e` keeps against the keys `view` lists.
pub fn check(e: &Entry, view: Option<&ConfView>) -> SignatureCheck {
    let Some(signature) = &e.signature else {
        return SignatureCheck::Absent;
    };
    let (Some(key_id), Some(digest)) = (e.signer_key, e.signed_hash) else {
        return SignatureCheck::Invalid("the record does not say which key signed what".into());
    };
    let Some(view) = view else {
        return SignatureCheck::Unchecked("no global configuration given".into());
    };
    let member = match expected_signer(e) {
        Ok(m) => m,
        Err(why) => return SignatureCheck::Invalid(why),
    };
    let key_id = Fingerprint(key_id);
    let Some(key) = view.signing_key(&member, &key_id) else {
        return SignatureCheck::Unchecked(format!(
            "global configuration {} lists no key {key_id} of {member}",
            view.serial()
        ));
    };
    if kopir_core::pki::batch::verify(key, &digest, signature) {
        SignatureCheck::Valid(member.to_string())
    } else {
        SignatureCheck::Invalid(format!(
            "the signature does not verify with {member}'s key {key_id}"
        ))
    }
}
