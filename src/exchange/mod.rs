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
//! - [`meta`] parses the request metadata; [`envelope`] signs and verifies.
//! - [`frame`] and [`upstream`] pass message bytes through untouched.
//! - [`peers`] keeps pinned mutual-TLS connections to other servers;
//!   [`replay`] refuses a request id seen before.
//! - [`gate`] is the peer port's door: the peer must be pinned before it may
//!   hold a share of the call budget or send a body; [`unknown`] counts the
//!   refusals of callers that are nobody instead of auditing each;
//!   [`deadline`] carries the call's deadline through every stage.

pub mod consumer;
pub mod deadline;
pub mod envelope;
pub mod frame;
pub mod gate;
pub mod meta;
pub mod peers;
pub mod provider;
pub mod replay;
pub mod unknown;
pub mod upstream;

use std::{collections::HashMap, sync::Arc, time::Duration};

use tonic::Code;

use crate::{
    audit::{AuditError, AuditLog, AuditRecord, Side, Step},
    consent::ConsentVerifier,
    error::{Reason, Refusal},
    globalconf::GlobalConfHandle,
    id::{ServerId, SubsystemId},
    overload::CallBudget,
    pki::{
        Fingerprint,
        batch::{BatchSigner, VerifiedRoots},
    },
    policy::AccessPolicy,
    proto::kopir::v1::Signature,
};
use meta::CallMeta;

/// Limits of one security server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request or response message, in bytes.
    pub max_body_bytes: usize,
    /// How far a request's signed time may be from the provider's clock, in ms.
    pub max_clock_skew_ms: i64,
    /// Deadline of a call that carries none, and the longest one honoured, in ms.
    pub timeout_ms: u64,
    /// How long to wait for a TCP/TLS connection to a peer or registry, in ms.
    pub connect_timeout_ms: u64,
    /// Calls processed at once per port (across its connections); more are
    /// shed at once with `RESOURCE_EXHAUSTED` / `server.overloaded`.
    pub max_concurrent_calls: usize,
    /// Calls one caller (an information system, a peer server, an operator)
    /// may have in progress at once on a port; by default a quarter of
    /// `max_concurrent_calls`, so that no one caller can take a port's
    /// whole budget.
    pub max_calls_per_caller: Option<usize>,
    /// Time a request body may take to arrive after its headers, in ms
    /// (within the call's deadline).
    pub body_read_timeout_ms: u64,
    /// Interval of the summary records of refused unknown callers, in seconds.
    pub unknown_caller_summary_secs: u64,
    /// Request ids remembered for replay protection.
    pub replay_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_clock_skew_ms: 60_000,
            timeout_ms: 30_000,
            connect_timeout_ms: 2_000,
            max_concurrent_calls: 1024,
            max_calls_per_caller: None,
            body_read_timeout_ms: 10_000,
            unknown_caller_summary_secs: 60,
            replay_capacity: 1_000_000,
        }
    }
}

impl Limits {
    /// The default and maximum deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// The body-read timeout.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1))
    }
    /// One port's call budget, with each caller's share.
    pub fn call_budget(&self) -> CallBudget {
        let per_caller = self
            .max_calls_per_caller
            .unwrap_or(self.max_concurrent_calls / 4);
        CallBudget::new(self.max_concurrent_calls, per_caller)
    }
    /// The interval of unknown-caller summaries.
    pub fn unknown_caller_summary(&self) -> Duration {
        Duration::from_secs(self.unknown_caller_summary_secs.max(1))
    }
}

/// The client certificate an information system must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredClient {
    /// SHA-256 of the certificate.
    pub fingerprint: Fingerprint,
    /// Its validity (Unix seconds, inclusive), read once: a certificate that
    /// matches the fingerprint is this certificate.
    pub valid: (i64, i64),
}

impl RegisteredClient {
    /// The registration of a certificate (DER).
    pub fn of(der: &[u8]) -> Result<Self, crate::pki::PkiError> {
        Ok(Self {
            fingerprint: Fingerprint::of(der),
            valid: crate::pki::validity(der)?,
        })
    }
}

/// Everything the security path of one server needs, shared by its ports.
pub struct Gateway {
    /// This server's id.
    pub server_id: ServerId,
    /// The global configuration.
    pub conf: GlobalConfHandle,
    /// Signs with the member's signing key, one signature per batch.
    pub signer: BatchSigner,
    /// Batch signature roots already checked.
    pub verified: VerifiedRoots,
    /// Where audit records are made durable.
    pub audit: Arc<dyn AuditLog>,
    /// Limits.
    pub limits: Limits,
    /// Local information systems allowed on the client port, by the client
    /// certificate registered for each.
    pub clients: HashMap<SubsystemId, RegisteredClient>,
    /// True if the client port accepts plaintext (development, loopback only):
    /// then clients are not authenticated.
    pub plaintext_clients: bool,
    /// Registries this server provides.
    pub services: HashMap<SubsystemId, upstream::Registry>,
    /// Access rules for them.
    pub policy: AccessPolicy,
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

pub use crate::clock::now_ms;

/// What is known of a request when a record is written: parsed metadata, or the
/// raw header values of a request refused before they could be parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Known {
    request_id: String,
    client: String,
    service: String,
    method: String,
    purpose: String,
    subject: Option<String>,
    user: Option<String>,
    query_group: Option<String>,
    hidden_until_ms: Option<i64>,
    hidden_reason: Option<String>,
}

impl From<&CallMeta> for Known {
    fn from(m: &CallMeta) -> Self {
        Self {
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
        }
    }
}

impl Known {
    /// A record of `step` for this request.
    pub(crate) fn record(&self, side: Side, step: Step) -> AuditRecord {
        AuditRecord {
            request_id: self.request_id.clone(),
            client: self.client.clone(),
            service: self.service.clone(),
            method: self.method.clone(),
            purpose: self.purpose.clone(),
            subject: self.subject.clone(),
            user: self.user.clone(),
            query_group: self.query_group.clone(),
            hidden_until_ms: self.hidden_until_ms,
            hidden_reason: self.hidden_reason.clone(),
            ..AuditRecord::new(side, step)
        }
    }

    /// A record of `step` that carries `signature` over `signed_hash` (the
    /// request or response hash) and the hash of the body it covers.
    pub(crate) fn signed_record(
        &self,
        side: Side,
        step: Step,
        signature: Option<&Signature>,
        signed_hash: [u8; 32],
        body_sha256: [u8; 32],
    ) -> AuditRecord {
        let mut r = self.record(side, step);
        r.signature = signature.map(|s| s.value.to_vec());
        r.signer_key = signature.and_then(|s| s.key_id.as_ref().try_into().ok());
        r.signed_hash = Some(signed_hash);
        r.body_sha256 = Some(body_sha256);
        r
    }

    /// A record of a refusal or failure.
    pub(crate) fn refusal(&self, side: Side, step: Step, refusal: &Refusal) -> AuditRecord {
        let mut r = self.record(side, step);
        r.status = refusal.code as i32;
        r.reason = Some(refusal.reason.as_str().into());
        r.message = Some(refusal.message.clone());
        r
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
pub(crate) async fn record_refusal(
    audit: &dyn AuditLog,
    known: &Known,
    side: Side,
    step: Step,
    refusal: &Refusal,
) {
    tracing::info!(request_id = %known.request_id, reason = %refusal.reason, message = %refusal.message, side = side.as_str(), "refused");
    if let Err(e) = audit.append(known.refusal(side, step, refusal)).await {
        tracing::error!(error = %e, request_id = %known.request_id, "refusal could not be audited");
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
        md.insert(crate::error::REQUEST_ID_KEY, v);
    }
    tonic::Status::with_metadata(Code::from_i32(code), message.to_owned(), md)
}
