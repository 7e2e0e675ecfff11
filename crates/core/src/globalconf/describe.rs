//! The governance authority's readable description of the federation (TOML),
//! and how it becomes a global configuration document.
//!
//! ```toml
//! instance = "KZ"
//! certs = "../certs-dev"          # a development PKI layout (optional)
//! trusted_cas = ["ca.crt"]        # relative to `certs`, or absolute
//!
//! [[purposes]]
//! code = "child-benefit"
//! description = "Assessing a claim for the child-birth benefit"
//! legal_act = "Social Code of the Republic of Kazakhstan, art. 146"   # or: consent = true
//! # covert_max_days = 365         # reads may be hidden from the subject up to a year (legal acts only)
//!
//! [[members]]
//! id = "KZ/GOV/MOJ"
//! name = "Ministry of Justice"
//! # signing_cert = "path.crt"     # default: the development layout's
//! subsystems = [{ code = "population", personal_data = true }]
//! servers = [{ code = "ss1", address = "moj-ss1:8443", hosts = ["moj-ss1"], subsystems = ["population"] }]
//!
//! [consent_authority]              # optional
//! address = "consent:8444"
//! # issuer = "KZ/consent"          # the tokens' `iss`; default: INSTANCE/consent
//! # hosts = ["consent"]            # development TLS certificate host names
//! # tls_cert = "path.crt"          # default: the development layout's
//! # signing_certs = ["path.crt"]   # default: the development layout's
//!
//! [[report_readers]]              # who may ask servers for a subject's access report
//! name = "portal"
//! role = "portal"                  # or "auditor"
//! # tls_cert = "path.crt"          # default: the development layout's
//! # signing_certs = ["path.crt"]   # a portal's assertion keys; default: the development layout's
//! ```
//!
//! Every certificate is read from disk and checked to be issued by one of the
//! trusted CAs before it is published.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::{
    model::{
        Basis, ConsentAuthority, Covert, GlobalConf, Member, Purpose, ReaderRole, ReportReader,
        Server, Subsystem,
    },
    view::ConfView,
};
use crate::{
    id::{Code, MemberId, ServerId, SubsystemId},
    pki::{
        self, certs_to_pem, issued_by,
        layout::{DevLayout, DevPkiSpec},
        load_certs,
    },
};

/// The top of the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Federation {
    /// The federation instance, e.g. `KZ`.
    pub instance: String,
    /// A development PKI folder (see [`DevLayout`]) where certificates not named
    /// explicitly are found.
    #[serde(default)]
    pub certs: Option<PathBuf>,
    /// Trusted CA certificate files; default: the development layout's CA.
    #[serde(default)]
    pub trusted_cas: Vec<PathBuf>,
    /// The purposes a request may name, each with its legal act or consent.
    #[serde(default)]
    pub purposes: Vec<PurposeDesc>,
    /// The members, with their servers and subsystems.
    #[serde(default)]
    pub members: Vec<MemberDesc>,
    /// The consent authority, if any.
    #[serde(default)]
    pub consent_authority: Option<ConsentAuthorityDesc>,
    /// Who may ask for access reports.
    #[serde(default)]
    pub report_readers: Vec<ReportReaderDesc>,
}

/// A report reader in the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportReaderDesc {
    /// Its name.
    pub name: Code,
    /// Portal or auditor.
    pub role: ReaderRole,
    /// TLS client certificate file; default: the development layout's.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// A portal's assertion-signing certificate files; default: the
    /// development layout's.
    #[serde(default)]
    pub signing_certs: Vec<PathBuf>,
}

/// The consent authority in the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentAuthorityDesc {
    /// The `iss` of its tokens; default `INSTANCE/consent`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// `host:port` of its gRPC port.
    pub address: String,
    /// Host names its development TLS certificate is made for.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS certificate file; default: the development layout's.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Token-signing certificate files; default: the development layout's.
    #[serde(default)]
    pub signing_certs: Vec<PathBuf>,
}

/// A purpose in the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeDesc {
    /// Code sent in `kopir-purpose`.
    pub code: Code,
    /// What the data is used for.
    pub description: String,
    /// The legal act that permits the pull without consent.
    #[serde(default)]
    pub legal_act: Option<String>,
    /// True if the subject's consent is required instead.
    #[serde(default)]
    pub consent: bool,
    /// If given, reads for this purpose may be hidden from the subject for
    /// up to this many days (covert work; legal acts only).
    #[serde(default)]
    pub covert_max_days: Option<u32>,
}

/// A member in the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberDesc {
    /// `INSTANCE/CLASS/CODE`.
    pub id: MemberId,
    /// Human-readable name.
    pub name: String,
    /// Signing certificate file; default: the development layout's.
    #[serde(default)]
    pub signing_cert: Option<PathBuf>,
    /// More signing certificates listed beside it, during a key rollover:
    /// providers accept a signature by any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_signing_certs: Vec<PathBuf>,
    /// The member's subsystems: its information systems and registries.
    #[serde(default)]
    pub subsystems: Vec<Subsystem>,
    /// Security servers.
    #[serde(default)]
    pub servers: Vec<ServerDesc>,
}

/// A security server in the description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerDesc {
    /// Server code.
    pub code: String,
    /// `host:port` of its peer port.
    pub address: String,
    /// Host names its development TLS certificate is made for.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS certificate file; default: the development layout's.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Codes of the subsystems it provides.
    #[serde(default)]
    pub subsystems: Vec<String>,
    /// In maintenance: consumers do not call it until the next configuration
    /// without it (announce it one publication before the work starts).
    #[serde(default)]
    pub maintenance: bool,
}

/// Why a description cannot be published.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DescribeError(pub String);

impl Federation {
    /// Reads a description; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, DescribeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DescribeError(format!("cannot read {}: {e}", path.display())))?;
        let mut fed: Federation =
            toml::from_str(&text).map_err(|e| DescribeError(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        fed.rebase(base);
        Ok(fed)
    }

    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(c) = self.certs.as_mut() {
            fix(c);
        }
        let certs_base = self.certs.clone().unwrap_or_else(|| base.to_path_buf());
        for ca in &mut self.trusted_cas {
            if ca.is_relative() {
                *ca = certs_base.join(&*ca);
            }
        }
        for m in &mut self.members {
            if let Some(p) = m.signing_cert.as_mut() {
                fix(p);
            }
            m.extra_signing_certs.iter_mut().for_each(fix);
            for s in &mut m.servers {
                if let Some(p) = s.tls_cert.as_mut() {
                    fix(p);
                }
            }
        }
        if let Some(ca) = self.consent_authority.as_mut() {
            if let Some(p) = ca.tls_cert.as_mut() {
                fix(p);
            }
            ca.signing_certs.iter_mut().for_each(fix);
        }
        for r in &mut self.report_readers {
            if let Some(p) = r.tls_cert.as_mut() {
                fix(p);
            }
            r.signing_certs.iter_mut().for_each(fix);
        }
    }

    fn layout(&self, what: &str) -> Result<DevLayout, DescribeError> {
        self.certs
            .as_ref()
            .map(DevLayout::new)
            .ok_or_else(|| DescribeError(format!("{what}: no file given and no `certs` folder")))
    }

    /// What a development PKI for this federation must contain: a signing
    /// certificate per member, a TLS certificate per server, a client
    /// certificate per subsystem.
    pub fn dev_pki_spec(&self) -> Result<DevPkiSpec, DescribeError> {
        let mut spec = DevPkiSpec::default();
        for m in &self.members {
            spec.members.push(m.id.clone());
            for s in &m.servers {
                let id: ServerId = format!("{}/{}", m.id, s.code)
                    .parse()
                    .map_err(|e| DescribeError(format!("{e}")))?;
                let mut hosts = s.hosts.clone();
                if let Some((host, _)) = s.address.rsplit_once(':') {
                    hosts.push(host.to_string());
                }
                hosts.dedup();
                spec.servers.push((id, hosts));
            }
            for sub in &m.subsystems {
                let id: SubsystemId = format!("{}/{}", m.id, sub.code)
                    .parse()
                    .map_err(|e| DescribeError(format!("{e}")))?;
                spec.clients.push(id);
            }
        }
        if let Some(ca) = &self.consent_authority {
            spec.consent_hosts = ca.hosts.clone();
            if let Some((host, _)) = ca.address.rsplit_once(':') {
                spec.consent_hosts.push(host.to_string());
            }
            spec.consent_hosts.dedup();
        }
        spec.auditors = self
            .report_readers
            .iter()
            .filter(|r| r.role == ReaderRole::Auditor)
            .map(|r| r.name.to_string())
            .collect();
        Ok(spec)
    }

    /// Builds the document: reads every certificate, checks it is issued by a
    /// trusted CA, and checks the result is consistent.
    pub fn build(&self, serial: u64, valid_for: Duration) -> Result<GlobalConf, DescribeError> {
        let ca_files = if self.trusted_cas.is_empty() {
            vec![self.layout("trusted CAs")?.ca_cert()]
        } else {
            self.trusted_cas.clone()
        };
        let mut cas = Vec::new();
        for file in &ca_files {
            cas.extend(load_certs(file).map_err(|e| DescribeError(e.to_string()))?);
        }
        let checked = |file: &Path, what: String| -> Result<String, DescribeError> {
            let chain = load_certs(file).map_err(|e| DescribeError(format!("{what}: {e}")))?;
            let leaf = chain[0].as_ref();
            if !cas.iter().any(|ca| issued_by(leaf, ca.as_ref()).is_ok()) {
                return Err(DescribeError(format!(
                    "{what} ({}) is not issued by a trusted CA",
                    file.display()
                )));
            }
            let (_, not_after) =
                pki::validity(leaf).map_err(|e| DescribeError(format!("{what}: {e}")))?;
            if not_after < OffsetDateTime::now_utc().unix_timestamp() {
                return Err(DescribeError(format!(
                    "{what} ({}) has expired",
                    file.display()
                )));
            }
            Ok(certs_to_pem(&chain[..1]))
        };

        let mut members = Vec::new();
        for m in &self.members {
            let signing = match &m.signing_cert {
                Some(p) => p.clone(),
                None => self.layout("signing certificate")?.member_signing(&m.id).0,
            };
            let mut servers = Vec::new();
            for s in &m.servers {
                let id: ServerId = format!("{}/{}", m.id, s.code)
                    .parse()
                    .map_err(|e| DescribeError(format!("{e}")))?;
                let tls = match &s.tls_cert {
                    Some(p) => p.clone(),
                    None => self.layout("TLS certificate")?.server_tls(&id).0,
                };
                servers.push(Server {
                    code: s.code.clone(),
                    address: s.address.clone(),
                    tls_cert: checked(&tls, format!("TLS certificate of {id}"))?,
                    subsystems: s.subsystems.clone(),
                    maintenance: s.maintenance,
                });
            }
            members.push(Member {
                id: m.id.clone(),
                name: m.name.clone(),
                signing_certs: std::iter::once(&signing)
                    .chain(&m.extra_signing_certs)
                    .map(|file| checked(file, format!("signing certificate of {}", m.id)))
                    .collect::<Result<_, _>>()?,
                servers,
                subsystems: m.subsystems.clone(),
            });
        }
        let mut purposes = Vec::new();
        for p in &self.purposes {
            let basis = match (&p.legal_act, p.consent) {
                (Some(act), false) => Basis::LegalAct { act: act.clone() },
                (None, true) => Basis::Consent,
                _ => {
                    return Err(DescribeError(format!(
                        "purpose {}: give exactly one of `legal_act` or `consent = true`",
                        p.code
                    )));
                }
            };
            purposes.push(Purpose {
                code: p.code.clone(),
                description: p.description.clone(),
                basis,
                covert: p
                    .covert_max_days
                    .map(|max_hidden_days| Covert { max_hidden_days }),
            });
        }
        let mut report_readers = Vec::new();
        for r in &self.report_readers {
            let what = format!("{} {}", r.role.as_str(), r.name);
            let tls = match (&r.tls_cert, r.role) {
                (Some(p), _) => p.clone(),
                (None, ReaderRole::Portal) => self.layout(&what)?.portal().0,
                (None, ReaderRole::Auditor) => self.layout(&what)?.auditor(r.name.as_str()).0,
            };
            let signing = match (r.signing_certs.is_empty(), r.role) {
                (true, ReaderRole::Portal) => vec![self.layout(&what)?.portal_signing().0],
                _ => r.signing_certs.clone(),
            };
            report_readers.push(ReportReader {
                name: r.name.clone(),
                role: r.role,
                tls_cert: checked(&tls, format!("TLS certificate of {what}"))?,
                signing_certs: signing
                    .iter()
                    .map(|f| checked(f, format!("signing certificate of {what}")))
                    .collect::<Result<_, _>>()?,
            });
        }
        let consent_authority = match &self.consent_authority {
            None => None,
            Some(ca) => {
                let tls = match &ca.tls_cert {
                    Some(p) => p.clone(),
                    None => {
                        self.layout("consent authority TLS certificate")?
                            .consent_tls()
                            .0
                    }
                };
                let signing = if ca.signing_certs.is_empty() {
                    vec![
                        self.layout("consent authority signing certificate")?
                            .consent_signing()
                            .0,
                    ]
                } else {
                    ca.signing_certs.clone()
                };
                Some(ConsentAuthority {
                    issuer: ca
                        .issuer
                        .clone()
                        .unwrap_or_else(|| format!("{}/consent", self.instance)),
                    address: ca.address.clone(),
                    tls_cert: checked(&tls, "TLS certificate of the consent authority".into())?,
                    signing_certs: signing
                        .iter()
                        .map(|f| checked(f, "signing certificate of the consent authority".into()))
                        .collect::<Result<_, _>>()?,
                })
            }
        };
        let now = OffsetDateTime::now_utc();
        let conf = GlobalConf {
            consent_authority,
            report_readers,
            instance: self.instance.clone(),
            serial,
            issued_at: now,
            expires_at: now + valid_for,
            trusted_cas: cas
                .iter()
                .map(|c| certs_to_pem(std::slice::from_ref(c)))
                .collect(),
            members,
            purposes,
            authority_keys: vec![],
        };
        ConfView::new(conf.clone()).map_err(|e| DescribeError(e.to_string()))?;
        Ok(conf)
    }
}
