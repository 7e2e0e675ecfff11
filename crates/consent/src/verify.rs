//! What a provider's security server checks before it releases data on the
//! strength of a consent token: [`ConsentVerifier::check`].
//!
//! In order, each step refusing with its own reason:
//!
//! 1. a token is present (`consent.missing`);
//! 2. the global configuration names a consent authority, and the token is a
//!    well-formed JWS signed by one of its keys whose certificate is valid now
//!    (`consent.invalid`), issued by it (`iss`);
//! 3. the purpose called for is in the global configuration
//!    (`purpose.unknown`);
//! 4. now lies in `[nbf, exp)` (`consent.not_yet_valid`, `consent.expired`);
//! 5. subject, client, service, method and purpose match the call
//!    (`consent.mismatch`, naming the field);
//! 6. the provider's view of revocations is fresh (`consent.unverified`) and
//!    does not list the consent (`consent.revoked`);
//! 7. for a consent with a maximum number of uses, one use is counted in the
//!    provider's own durable store (`consent.exhausted` when all are taken,
//!    `consent.unverified` when the store cannot count it).
//!
//! Uses are counted last, so a call refused for any other reason never takes
//! one, and before the registry is called, so a use is counted whether or not
//! the registry then answers (deny-by-default: an unanswered use is still a
//! use). They are counted in the provider's store
//! ([`super::store::ConsentStore::consume_use`]): several nodes of a provider
//! share the count when they share a PostgreSQL store; servers with separate
//! embedded stores count separately.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::{
    grant::covers,
    revocations::{RevocationSet, Status},
    store::{ConsentStore, UseOutcome},
    token::{self, Claims},
};
use kopir_core::{
    clock::rfc3339,
    error::{Reason, Refusal},
    globalconf::ConfView,
    id::{Code, Subject, SubsystemId},
    meta::CallMeta,
    pki::{Fingerprint, sha256},
};

/// What the call the token is presented with is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The data subject the call names (`kopir-subject`).
    pub subject: Subject,
    /// The consumer subsystem (`kopir-client`).
    pub client: SubsystemId,
    /// The provider subsystem (`kopir-service`).
    pub service: SubsystemId,
    /// The method path, `/package.Service/Method`.
    pub method: String,
    /// The purpose (`kopir-purpose`).
    pub purpose: Code,
}

impl Expected {
    /// What a call's metadata expects of its consent; a call that names no
    /// subject cannot rest on consent (`subject.required`).
    pub fn from_meta(meta: &CallMeta) -> Result<Self, Refusal> {
        let subject = meta.subject.clone().ok_or_else(|| {
            Refusal::new(
                Reason::SubjectRequired,
                format!(
                    "purpose {} rests on the subject's consent: name the person in kopir-subject (e.g. iin:...)",
                    meta.purpose
                ),
            )
        })?;
        Ok(Self {
            subject,
            client: meta.client.clone(),
            service: meta.service.clone(),
            method: meta.method.clone(),
            purpose: meta.purpose.clone(),
        })
    }
}

/// How many uses a limited consent has had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uses {
    /// Uses so far, this one included.
    pub used: u32,
    /// The most allowed.
    pub max: u32,
}

/// A consent token that allows the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The consent (grant) id, the token's `jti`.
    pub consent_id: String,
    /// The token's `exp` (seconds since the Unix epoch).
    pub expires_at: i64,
    /// The uses counted, for a consent with a maximum.
    pub uses: Option<Uses>,
}

impl Accepted {
    /// The basis to record in the audit trail: `consent:<id>`.
    pub fn basis(&self) -> String {
        format!("consent:{}", self.consent_id)
    }
}

/// Checks consent tokens for one provider security server.
#[derive(Clone)]
pub struct ConsentVerifier {
    revocations: RevocationSet,
    uses: Arc<dyn ConsentStore>,
    verified: Arc<Mutex<Verified>>,
}

/// Tokens whose signature was checked, by their SHA-256: the signing key's id
/// and the claims.
type Verified = HashMap<[u8; 32], (Fingerprint, Claims)>;

/// How many tokens whose signature was checked are remembered. A consumer
/// presents one token for many calls (as long as it lives), so its signature
/// is checked once; everything else is checked on every call.
const VERIFIED_CAPACITY: usize = 65_536;

impl std::fmt::Debug for ConsentVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentVerifier")
            .field("uses", &self.uses.describe())
            .finish_non_exhaustive()
    }
}

fn invalid(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        Reason::ConsentInvalid,
        format!("{e}; ask the consent authority for a new token"),
    )
}

fn mismatch(field: &str, token: &str, call: &str) -> Refusal {
    Refusal::new(
        Reason::ConsentMismatch,
        format!(
            "the consent token's {field} is {token:?} but this call's is {call:?}: use the token of a consent the subject gave for this {field}"
        ),
    )
}

impl ConsentVerifier {
    /// A verifier that reads revocations from `revocations` (kept fresh by a
    /// [`super::feed::RevocationFeed`]) and counts uses in `uses` (the
    /// provider's own store).
    pub fn new(revocations: RevocationSet, uses: Arc<dyn ConsentStore>) -> Self {
        Self {
            revocations,
            uses,
            verified: Arc::default(),
        }
    }

    /// The claims of a token signed by a key the global configuration lists
    /// for the consent authority, and that key's id. A token seen before is
    /// not verified again (only its key is looked up again, so a key the
    /// configuration no longer lists is refused as before); the remembered
    /// tokens are the most recent ones, expired ones first to go.
    fn signed_claims(
        &self,
        view: &ConfView,
        token: &str,
    ) -> Result<(Fingerprint, Claims), Refusal> {
        let digest = sha256(token.as_bytes());
        let remembered = self
            .verified
            .lock()
            .ok()
            .and_then(|v| v.get(&digest).cloned());
        if let Some(hit) = remembered {
            return Ok(hit);
        }
        let mut key = None;
        let claims = token::verify(token, |kid| {
            key = view.consent_key(kid);
            key
        })
        .map_err(invalid)?;
        let kid = key.map(|k| k.key_id()).ok_or_else(|| invalid("no key"))?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_CAPACITY {
                let now = kopir_core::clock::now_ms() / 1000;
                verified.retain(|_, (_, c)| c.exp > now);
                if verified.len() >= VERIFIED_CAPACITY {
                    verified.clear();
                }
            }
            verified.insert(digest, (kid, claims.clone()));
        }
        Ok((kid, claims))
    }

    /// Checks everything but the use count (steps 1-6 of the module header):
    /// no state changes.
    pub fn verify(
        &self,
        view: &ConfView,
        token: Option<&str>,
        expected: &Expected,
        now_ms: i64,
    ) -> Result<Claims, Refusal> {
        let now = now_ms.div_euclid(1000);
        // 1. A token.
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            Refusal::new(
                Reason::ConsentMissing,
                format!(
                    "purpose {} requires the subject's consent: obtain a consent token from the consent authority (IssueToken) and attach it in kopir-consent",
                    expected.purpose
                ),
            )
        })?;
        // 2. Signed by the consent authority of the global configuration.
        let authority = view.consent_authority().ok_or_else(|| {
            invalid(format!(
                "global configuration {} names no consent authority, so no consent token can be checked",
                view.serial()
            ))
        })?;
        let (kid, claims) = self.signed_claims(view, token)?;
        if !view.consent_key(&kid).is_some_and(|k| k.valid_at(now)) {
            return Err(invalid(
                "the consent authority's signing certificate for this token is not listed in the global configuration or not valid now",
            ));
        }
        if claims.iss != authority.issuer {
            return Err(invalid(format!(
                "the token is issued by {:?}, not by the federation's consent authority {:?}",
                claims.iss, authority.issuer
            )));
        }
        // 3. A known purpose.
        if view.purpose(expected.purpose.as_str()).is_none() {
            return Err(Refusal::new(
                Reason::PurposeUnknown,
                format!(
                    "purpose {:?} is not in global configuration {}",
                    expected.purpose.as_str(),
                    view.serial()
                ),
            ));
        }
        // 4. The validity window.
        if now < claims.nbf {
            return Err(Refusal::new(
                Reason::ConsentNotYetValid,
                format!(
                    "consent {} is valid from {}; call again then",
                    claims.jti,
                    rfc3339(claims.nbf)
                ),
            ));
        }
        if now >= claims.exp {
            return Err(Refusal::new(
                Reason::ConsentExpired,
                format!(
                    "the token of consent {} expired at {}: ask the consent authority for a new one, or the subject for a new consent",
                    claims.jti,
                    rfc3339(claims.exp)
                ),
            ));
        }
        // 5. The call is the one consented to.
        let subject = expected.subject.to_string();
        if claims.sub != subject {
            return Err(mismatch("subject", &claims.sub, &subject));
        }
        let client = expected.client.to_string();
        if claims.client != client {
            return Err(mismatch("client", &claims.client, &client));
        }
        let service = expected.service.to_string();
        if claims.service != service {
            return Err(mismatch("service", &claims.service, &service));
        }
        if !covers(&claims.methods, &expected.method) {
            return Err(mismatch(
                "method",
                &claims.methods.join(", "),
                &expected.method,
            ));
        }
        if claims.purpose != expected.purpose.as_str() {
            return Err(mismatch(
                "purpose",
                &claims.purpose,
                expected.purpose.as_str(),
            ));
        }
        // 6. Not revoked, as of a fresh view.
        match self.revocations.status(&claims.jti, now_ms) {
            Status::Valid => Ok(claims),
            Status::Revoked => Err(Refusal::new(
                Reason::ConsentRevoked,
                format!(
                    "the subject revoked consent {}; the subject must grant a new one",
                    claims.jti
                ),
            )),
            Status::Unknown { last_heard_ms } => Err(Refusal::new(
                Reason::ConsentUnverified,
                format!(
                    "this provider has not heard from the consent authority for {}, so it cannot tell whether consent {} was revoked; retry shortly (operators: check the connection to {})",
                    match last_heard_ms {
                        Some(at) => format!("{} ms", now_ms.saturating_sub(at)),
                        None => "its whole uptime".into(),
                    },
                    claims.jti,
                    authority.address
                ),
            )),
        }
    }

    /// Checks a consent token for a call and, for a consent with a maximum
    /// number of uses, counts this use durably. `Ok` means the call may rest
    /// on the consent; record [`Accepted::basis`] in the audit trail.
    pub async fn check(
        &self,
        view: &ConfView,
        token: Option<&str>,
        expected: &Expected,
        now_ms: i64,
    ) -> Result<Accepted, Refusal> {
        let claims = self.verify(view, token, expected, now_ms)?;
        // 7. Count the use.
        let uses = match claims.max_uses {
            None => None,
            Some(max) => {
                let outcome = self
                    .uses
                    .consume_use(claims.jti.clone(), max, claims.exp)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, consent = %claims.jti, "cannot count a consent use");
                        Refusal::new(
                            Reason::ConsentUnverified,
                            format!(
                                "consent {} allows {max} uses and this provider cannot count this one durably; retry later",
                                claims.jti
                            ),
                        )
                    })?;
                match outcome {
                    UseOutcome::Counted { used } => Some(Uses { used, max }),
                    UseOutcome::Exhausted { used } => {
                        return Err(Refusal::new(
                            Reason::ConsentExhausted,
                            format!(
                                "consent {} allows {max} uses and {used} were made; the subject must grant a new consent",
                                claims.jti
                            ),
                        ));
                    }
                }
            }
        };
        Ok(Accepted {
            consent_id: claims.jti,
            expires_at: claims.exp,
            uses,
        })
    }
}
