//! The citizen's access report, after Estonia's Data Tracker: who read a
//! person's data, when, from which register, for what purpose, on what basis,
//! and with what outcome, with covert reads hidden until their date.
//!
//! ```text
//! portal ─┐  mutual TLS (certificate listed in `report_readers`) + assertion (portal only)
//! auditor ┴──AccessReport.Report(subject)──▶ every provider server's peer port
//!             authorize → collect from the audit store by pseudonym → AUDIT the request → answer
//! ```
//!
//! This module owns the report: its entries ([`ReportEntry`]), how they are
//! built from a server's provider-side audit records ([`collect`]), who may
//! ask and how the portal proves whom it acts for ([`assertion`], [`service`]),
//! the federation-wide report assembled from every provider's server
//! ([`mod@assemble`]), and `kopir audit subject` (in the binary). It reads what
//! the security path already records (`kopir-audit`): one entry per exchange the
//! provider accepted, never the subject in clear (the store keeps a keyed
//! pseudonym; the server computes it from the subject asked for).

pub mod assemble;
pub mod assertion;
pub mod collect;
pub(crate) mod service;

use serde::{Deserialize, Serialize};

pub use assemble::{FederationReport, Source, assemble};
pub use service::ReportService;

use kopir_proto::v1 as pb;

/// The gRPC method of a report request, as report requests are recorded in
/// a server's audit log.
pub const REPORT_METHOD: &str = "/kopir.v1.AccessReport/Report";

/// The purpose report requests are recorded under.
pub(crate) const REPORT_PURPOSE: &str = "access-report";

/// What became of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The registry answered (with `status`, 0 = OK).
    Answered,
    /// The exchange failed after the provider accepted it (`reason` says why).
    Failed,
    /// The provider refused it (`reason` says why); listed only when asked.
    Refused,
    /// Accepted, and no outcome recorded (the server stopped meanwhile).
    Accepted,
}

impl Outcome {
    /// Lower-case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
            Outcome::Accepted => "accepted",
        }
    }

    /// The outcome named by [`Outcome::as_str`].
    pub(crate) fn parse(text: &str) -> Option<Self> {
        [
            Outcome::Answered,
            Outcome::Failed,
            Outcome::Refused,
            Outcome::Accepted,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// Who a report is made for, which decides what it shows of covert reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// The subject (through the portal): reads still hidden are left out,
    /// and nothing says there are any.
    Subject,
    /// An auditor or the server's operator: every read, the hidden ones
    /// marked.
    Full,
}

/// One read of the subject's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    /// The exchange's request id (the Data Tracker's query id).
    pub query_id: String,
    /// When the provider accepted it (ms since the epoch).
    pub at_ms: i64,
    /// The consumer's member id.
    pub consumer_member: String,
    /// The consumer member's name (from the global configuration).
    pub consumer_member_name: String,
    /// The consumer's information system.
    pub consumer_subsystem: String,
    /// The provider's service (subsystem).
    pub provider_service: String,
    /// The provider member's name.
    pub provider_member_name: String,
    /// The gRPC method.
    pub method: String,
    /// The provider's security server that recorded it.
    pub server: String,
    /// The purpose code.
    pub purpose: String,
    /// What the purpose means, in words.
    pub purpose_description: String,
    /// The legal act the read rested on.
    pub legal_act: Option<String>,
    /// The consent it rested on.
    pub consent_id: Option<String>,
    /// The official acting.
    pub user: Option<String>,
    /// The procedure it belongs to.
    pub query_group: Option<String>,
    /// What became of it.
    pub outcome: Outcome,
    /// The registry's gRPC status (answered), or the refusal's code.
    pub status: i32,
    /// The `kopir-error` reason of a failure or refusal.
    pub reason: Option<String>,
    /// A covert read: until when it was or is hidden.
    pub hidden_until_ms: Option<i64>,
    /// Why it was or is hidden.
    pub hidden_reason: Option<String>,
    /// True while it is still hidden from the subject.
    pub hidden: bool,
}

/// Splits an audit record's basis (`legal:<act>` or `consent:<id>`) into a
/// legal act and a consent id.
pub(crate) fn split_basis(basis: Option<&str>) -> (Option<String>, Option<String>) {
    match basis {
        None => (None, None),
        Some(b) => match (b.strip_prefix("legal:"), b.strip_prefix("consent:")) {
            (Some(act), _) => (Some(act.to_owned()), None),
            (_, Some(id)) => (None, Some(id.to_owned())),
            _ => (Some(b.to_owned()), None),
        },
    }
}

impl ReportEntry {
    /// As a protobuf message.
    pub(crate) fn to_proto(&self) -> pb::ReportEntry {
        pb::ReportEntry {
            query_id: self.query_id.clone(),
            at_ms: self.at_ms,
            consumer_member: self.consumer_member.clone(),
            consumer_member_name: self.consumer_member_name.clone(),
            consumer_subsystem: self.consumer_subsystem.clone(),
            provider_service: self.provider_service.clone(),
            provider_member_name: self.provider_member_name.clone(),
            method: self.method.clone(),
            server: self.server.clone(),
            purpose: self.purpose.clone(),
            purpose_description: self.purpose_description.clone(),
            legal_act: self.legal_act.clone(),
            consent_id: self.consent_id.clone(),
            user: self.user.clone(),
            query_group: self.query_group.clone(),
            outcome: self.outcome.as_str().into(),
            status: self.status,
            reason: self.reason.clone(),
            hidden_until_ms: self.hidden_until_ms,
            hidden_reason: self.hidden_reason.clone(),
            hidden: self.hidden,
        }
    }

    /// From a protobuf message; `None` if its outcome is unknown.
    pub(crate) fn from_proto(e: pb::ReportEntry) -> Option<Self> {
        Some(Self {
            outcome: Outcome::parse(&e.outcome)?,
            query_id: e.query_id,
            at_ms: e.at_ms,
            consumer_member: e.consumer_member,
            consumer_member_name: e.consumer_member_name,
            consumer_subsystem: e.consumer_subsystem,
            provider_service: e.provider_service,
            provider_member_name: e.provider_member_name,
            method: e.method,
            server: e.server,
            purpose: e.purpose,
            purpose_description: e.purpose_description,
            legal_act: e.legal_act,
            consent_id: e.consent_id,
            user: e.user,
            query_group: e.query_group,
            status: e.status,
            reason: e.reason,
            hidden_until_ms: e.hidden_until_ms,
            hidden_reason: e.hidden_reason,
            hidden: e.hidden,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_split_into_act_or_consent() {
        assert_eq!(
            split_basis(Some("legal:Social Code, art. 146")),
            (Some("Social Code, art. 146".into()), None)
        );
        assert_eq!(split_basis(Some("consent:c-1")), (None, Some("c-1".into())));
        assert_eq!(split_basis(None), (None, None));
        assert_eq!(split_basis(Some("other")), (Some("other".into()), None));
    }

    #[test]
    fn outcomes_round_trip() {
        for o in [
            Outcome::Answered,
            Outcome::Failed,
            Outcome::Refused,
            Outcome::Accepted,
        ] {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(Outcome::parse("maybe"), None);
    }
}
