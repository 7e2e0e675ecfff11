//! The global configuration document, as the authority publishes it (JSON).
//! Certificates travel inside it as PEM so that the document is self-contained.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::id::{Code, MemberId};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConf {
    /// The federation instance, e.g. `KZ`; every member id starts with it.
    pub instance: String,
    /// Increases with every publication; a server never goes back to a lower one.
    pub serial: u64,
    /// When the authority signed it.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// After this instant servers refuse to exchange on it (`globalconf.stale`).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// CA certificates (PEM) that issued the certificates listed below.
    pub trusted_cas: Vec<String>,
    /// Every member, its servers and subsystems.
    pub members: Vec<Member>,
    /// Purposes for which data may be requested, each with its basis.
    pub purposes: Vec<Purpose>,
    /// The consent authority, if the federation has one: providers accept
    /// consent tokens signed with its keys and hear of revocations from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_authority: Option<ConsentAuthority>,
    /// Who may ask security servers for a subject's access report: the
    /// citizen portal (for the citizen it authenticated) and auditors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_readers: Vec<ReportReader>,
    /// The authority's signing certificates (PEM) servers trust from this
    /// version on: the current key and, before a rotation, the next one.
    /// Empty: servers keep the keys they trust.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authority_keys: Vec<String>,
}

/// A caller allowed on the peer ports' `kopir.v1.AccessReport`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportReader {
    /// Its name (a code): the `iss` of a portal's assertions, and how report
    /// requests are recorded.
    pub name: Code,
    /// What it may ask for.
    pub role: ReaderRole,
    /// Its TLS client certificate (PEM): the only one accepted for it.
    pub tls_cert: String,
    /// A portal's assertion-signing certificates (PEM, Ed25519); several
    /// during a key rollover. An auditor has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_certs: Vec<String>,
}

/// What a report reader may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderRole {
    /// The citizen portal: the report of the one subject named in a
    /// short-lived assertion it signs, without the reads still hidden.
    Portal,
    /// An auditor (e.g. the data-protection authority): any subject's
    /// report, hidden reads included and marked.
    Auditor,
}

impl ReaderRole {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReaderRole::Portal => "portal",
            ReaderRole::Auditor => "auditor",
        }
    }
}

/// The federation's consent authority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentAuthority {
    /// The `iss` claim of its tokens.
    pub issuer: String,
    /// `host:port` of its gRPC port (`kopir.v1.ConsentService`).
    pub address: String,
    /// Its TLS certificate (PEM): the only one servers accept when they connect.
    pub tls_cert: String,
    /// Its token-signing certificates (PEM); several during a key rollover.
    pub signing_certs: Vec<String>,
}

/// An organisation of the federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// `INSTANCE/CLASS/CODE`.
    pub id: MemberId,
    /// Human-readable name.
    pub name: String,
    /// The member's signing certificates (PEM); several during a key rollover.
    pub signing_certs: Vec<String>,
    /// The member's security servers.
    pub servers: Vec<Server>,
    /// The member's subsystems (information systems and services).
    pub subsystems: Vec<Subsystem>,
}

/// One security server of a member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Server code; the server id is `MEMBER/CODE`.
    pub code: String,
    /// `host:port` of its peer port.
    pub address: String,
    /// Its TLS certificate (PEM): the only one accepted for it.
    pub tls_cert: String,
    /// Codes of the member's subsystems whose services this server provides.
    pub subsystems: Vec<String>,
    /// Announced in maintenance: consumers do not call it (they use another
    /// server of the service, or refuse with `provider.maintenance`). Written
    /// only when true, so documents without maintenance read as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
}

/// A subsystem of a member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subsystem {
    /// Subsystem code; the subsystem id is `MEMBER/CODE`.
    pub code: String,
    /// True if its services return personal data: then every request names its
    /// subject (`kopir-subject`).
    #[serde(default)]
    pub personal_data: bool,
}

/// A purpose of processing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// Code sent in `kopir-purpose`.
    pub code: Code,
    /// What the data is used for, in words a citizen understands.
    pub description: String,
    /// What allows the pull.
    pub basis: Basis,
    /// Whether reads for this purpose may be covert: hidden from the
    /// subject's access report for a while (`kopir-hide-until`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covert: Option<Covert>,
}

/// How a purpose allows covert reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Covert {
    /// The furthest a read may be hidden, in days from when it is made.
    pub max_hidden_days: u32,
}

/// What allows a pull for a purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Basis {
    /// A legal act permits the pull without the subject's consent.
    LegalAct {
        /// Citation of the act, e.g. "Social Code, art. 146".
        act: String,
    },
    /// The subject's consent is required.
    Consent,
}
