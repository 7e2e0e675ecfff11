//! The security path of one exchange.
//!
//! ```text
//! information system ──gRPC──▶ consumer side (client port)            provider side (peer port) ──gRPC──▶ registry
//!   authenticate client cert → check global configuration → check service, purpose, subject
//!   → sign request → AUDIT (forwarded) → forward over mutual TLS ─────▶
//!        authenticate peer cert → check global configuration → verify signature and body
//!        → timestamp window and replay → access rule → legal act or consent token
//!        → AUDIT (accepted) → call registry
//!        → sign response bound to the request hash → AUDIT (answered) ◀─────
//!   verify response signature → AUDIT (answered) → answer
//! ```
//!
//! - [`consumer`] and [`provider`] hold the two halves, each reading top to bottom.
//! - [`kopir_core::meta`] parses the request metadata; [`envelope`] signs and verifies.
//! - [`frame`] and [`upstream`] pass message bytes through untouched.
//! - [`peers`] keeps pinned mutual-TLS connections to other servers;
//!   [`replay`] refuses a request id seen before.
//! - [`gate`] is the peer port's door: the peer must be pinned before it may
//!   hold a share of the call budget or send a body; [`unknown`] counts the
//!   refusals of callers that are nobody instead of auditing each;
//!   [`kopir_core::deadline`] carries the call's deadline through every stage.

pub(crate) mod consumer;
pub mod envelope;
pub mod frame;
pub(crate) mod gate;
pub(crate) mod peers;
pub(crate) mod provider;
pub(crate) mod replay;
pub(crate) mod unknown;
pub(crate) mod upstream;

use std::{collections::HashMap, sync::Arc};

use tonic::Code;

use crate::policy::AccessPolicy;
use kopir_audit::{AuditError, AuditLog, AuditRecord, Side, Step};
use kopir_consent::ConsentVerifier;
use kopir_core::{config::Limits, meta::CallMeta};
use kopir_core::{
    error::{Reason, Refusal},
    globalconf::GlobalConfHandle,
    id::{ServerId, SubsystemId},
    pki::{
        Fingerprint,
        batch::{BatchSigner, VerifiedRoots},
    },
};
use kopir_edge::overload::CallBudget;
use kopir_proto::v1::Signature;

/// The client certificate an information system must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegisteredClient {
    /// SHA-256 of the certificate.
    pub fingerprint: Fingerprint,
    /// Its validity (Unix seconds, inclusive), read once: a certificate that
    /// matches the fingerprint is this certificate.
    pub valid: (i64, i64),
}

impl RegisteredClient {
    /// The registration of a certificate (DER).
    pub(crate) fn of(der: &[u8]) -> Result<Self, kopir_core::pki::PkiError> {
        Ok(Self {
            fingerprint: Fingerprint::of(der),
            valid: kopir_core::pki::validity(der)?,
        })
    }
}

/// Everything the security path of one server needs, shared by its ports.
pub(crate) struct Gateway {
    /// This server's id.
    pub server_id: ServerId,
    /// The global configuration.
    pub conf: GlobalConfHandle,
    /// Batch signature roots already checked.
    pub verified: VerifiedRoots,
    /// Where audit records are made durable.
    pub audit: Arc<dyn AuditLog>,
    /// Sizes, timeouts and windows the security path enforces.
    pub limits: Limits,
    /// What the member configures locally and may change without a restart:
    /// its information systems, registries and access rules.
    pub(crate) local: LocalHandle,
    /// True if the client port accepts plaintext (development, loopback only):
    /// then clients are not authenticated.
    pub plaintext_clients: bool,
    /// Checks consent tokens for purposes that rest on consent.
    pub consent: ConsentVerifier,
    /// Connections to peer servers.
    pub peers: peers::Peers,
    /// Replay protection.
    pub replay: replay::ReplayGuard,
    /// Keep message bodies in the audit log (by default only their hashes).
    pub store_bodies: bool,
    /// The client port's call budget.
    pub client_calls: CallBudget,
    /// Refusals of callers that are nobody, counted for summary records.
    pub unknown: Arc<unknown::UnknownCallers>,
}

/// The part of a server's configuration that is reloaded while it runs
/// (`RunningServer::reload`): a call takes one snapshot and uses it
/// throughout, so it never sees half of an old and half of a new one.
#[derive(Debug)]
pub(crate) struct Local {
    /// Local information systems allowed on the client port, by the client
    /// certificate registered for each.
    pub(crate) clients: HashMap<SubsystemId, RegisteredClient>,
    /// Registries this server provides.
    pub(crate) services: HashMap<SubsystemId, upstream::Registry>,
    /// Access rules for them.
    pub(crate) policy: AccessPolicy,
    /// Signs with the member's signing key, one signature per batch; a
    /// reload takes a new key (a rollover, once the configuration lists it).
    pub(crate) signer: BatchSigner,
}

impl Local {
    /// How many of each it holds, for the log of a reload.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.clients.len(), self.services.len(), self.policy.len())
    }
}

/// The current [`Local`], replaced whole by a reload.
#[derive(Debug)]
pub(crate) struct LocalHandle(std::sync::RwLock<Arc<Local>>);

impl LocalHandle {
    /// A handle holding `local`.
    pub(crate) fn new(local: Local) -> Self {
        Self(std::sync::RwLock::new(Arc::new(local)))
    }

    /// The snapshot a call uses.
    pub(crate) fn current(&self) -> Arc<Local> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `local` in place for the calls that start from now on.
    pub(crate) fn replace(&self, local: Local) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(local);
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The copy of `body` an audit record keeps: none unless bodies are stored.
    pub(crate) fn kept_body(&self, body: &[u8]) -> Option<Vec<u8>> {
        self.store_bodies.then(|| body.to_vec())
    }
}

/// What is known of one exchange on one side so far, kept as the record its
/// next step writes: the call's metadata (or, for a request refused before
/// they parsed, its raw header values), then the peer, the request hash and
/// the basis as the security path learns them. Every record of the exchange,
/// refusals and failures included, is built here, so each carries all that
/// was known when it was written.
#[derive(Debug, Clone)]
pub(crate) struct Known(AuditRecord);

/// The longest raw header value a record keeps of a request that did not parse.
const RAW_VALUE_CHARS: usize = 256;

impl Known {
    /// Nothing known yet but the side and the request id.
    pub(crate) fn new(side: Side, request_id: String) -> Self {
        Self(AuditRecord {
            request_id,
            ..AuditRecord::new(side, Step::Refused)
        })
    }

    /// The raw header values of a request whose metadata did not parse,
    /// cut to a bounded length (they are the caller's, unchecked).
    pub(crate) fn unparsed(
        mut self,
        client: &str,
        service: &str,
        method: &str,
        purpose: &str,
    ) -> Self {
        let raw = |v: &str| v.chars().take(RAW_VALUE_CHARS).collect::<String>();
        self.0.client = raw(client);
        self.0.service = raw(service);
        self.0.method = raw(method);
        self.0.purpose = raw(purpose);
        self
    }

    /// A call whose metadata parsed.
    pub(crate) fn of_call(side: Side, m: &CallMeta) -> Self {
        Self(AuditRecord {
            request_id: m.request_id.clone(),
            client: m.client.to_string(),
            service: m.service.to_string(),
            method: m.method.clone(),
            purpose: m.purpose.to_string(),
            subject: m.subject.as_ref().map(ToString::to_string),
            user: m.user.clone(),
            query_group: m.tracker.query_group.as_ref().map(ToString::to_string),
            hidden_until_ms: m.tracker.hidden.as_ref().map(|h| h.until_ms),
            hidden_reason: m.tracker.hidden.as_ref().map(|h| h.reason.clone()),
            ..AuditRecord::new(side, Step::Refused)
        })
    }

    /// The request id the records carry.
    pub(crate) fn request_id(&self) -> &str {
        &self.0.request_id
    }

    /// The other security server, once it is identified.
    pub(crate) fn learn_peer(&mut self, peer: String) {
        self.0.peer = Some(peer);
    }

    /// The hash of the signed request, once it is signed or verified.
    pub(crate) fn learn_request_hash(&mut self, hash: [u8; 32]) {
        self.0.request_hash = Some(hash);
    }

    /// What the access rests on, once it is checked.
    pub(crate) fn learn_basis(&mut self, basis: String) {
        self.0.basis = Some(basis);
    }

    /// A record of `step`, stamped now, with all that is known.
    pub(crate) fn record(&self, step: Step) -> AuditRecord {
        AuditRecord {
            step,
            at_ms: kopir_core::clock::now_ms(),
            ..self.0.clone()
        }
    }

    /// A record of `step` that carries `signature` over `signed_hash` (the
    /// request or response hash) and the hash of the body it covers.
    pub(crate) fn signed_record(
        &self,
        step: Step,
        signature: Option<&Signature>,
        signed_hash: [u8; 32],
        body_sha256: [u8; 32],
    ) -> AuditRecord {
        AuditRecord {
            signature: signature.map(|s| s.value.to_vec()),
            signer_key: signature.and_then(|s| s.key_id.as_ref().try_into().ok()),
            signed_hash: Some(signed_hash),
            body_sha256: Some(body_sha256),
            ..self.record(step)
        }
    }

    /// A record of a refusal (step `refused`) or failure (`failed`).
    pub(crate) fn refusal(&self, step: Step, refusal: &Refusal) -> AuditRecord {
        AuditRecord {
            status: refusal.code as i32,
            reason: Some(refusal.reason.as_str().into()),
            message: Some(refusal.message.clone()),
            ..self.record(step)
        }
    }
}

/// Makes `record` durable (and every record before it), or refuses with
/// `audit.unavailable`.
pub(crate) async fn durable(audit: &dyn AuditLog, record: AuditRecord) -> Result<(), Refusal> {
    audit.append(record).await.map_err(audit_unavailable)
}

/// Writes `record`, the first of an exchange whose later record is made
/// [`durable`] before the server answers ([`AuditLog::append_written`]), or
/// refuses with `audit.unavailable`.
pub(crate) async fn written(audit: &dyn AuditLog, record: AuditRecord) -> Result<(), Refusal> {
    audit
        .append_written(record)
        .await
        .map_err(audit_unavailable)
}

fn audit_unavailable(e: AuditError) -> Refusal {
    tracing::error!(error = %e, "audit record could not be written");
    Refusal::new(
        Reason::AuditUnavailable,
        "this security server cannot make its audit record durable, so nothing was sent or released; retry later",
    )
}

/// Records a refusal; the refusal stands even if the record cannot be written
/// (the error is logged), since nothing is released either way.
pub(crate) async fn record_refusal(audit: &dyn AuditLog, known: &Known, refusal: &Refusal) {
    let record = known.refusal(Step::Refused, refusal);
    tracing::info!(request_id = %record.request_id, reason = %refusal.reason, message = %refusal.message, side = record.side.as_str(), "refused");
    if let Err(e) = audit.append(record).await {
        tracing::error!(error = %e, request_id = %known.request_id(), "refusal could not be audited");
    }
}

/// The answer to a call whose task panicked: an internal error, logged.
pub(crate) fn panicked(e: &tokio::task::JoinError) -> http::Response<tonic::body::Body> {
    tracing::error!(error = %e, "a call's task failed");
    Refusal::new(
        Reason::Internal,
        "this security server failed while handling the call; its operators can find the cause in its log",
    )
    .to_status(None)
    .into_http()
}

/// A status for a registry's own (non-OK) answer, passed through as it is.
pub(crate) fn registry_status(code: i32, message: &str, request_id: &str) -> tonic::Status {
    let mut md = tonic::metadata::MetadataMap::new();
    if let Ok(v) = request_id.parse() {
        md.insert(kopir_core::error::REQUEST_ID_KEY, v);
    }
    tonic::Status::with_metadata(Code::from_i32(code), message.to_owned(), md)
}
