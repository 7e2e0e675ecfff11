//! A verified global configuration, indexed for the lookups of the security
//! path: which keys sign for a member, which TLS certificates are its servers',
//! where a service is provided, what a purpose's basis is, who may ask for
//! access reports.

use std::collections::HashMap;

use time::OffsetDateTime;

use super::model::{Basis, GlobalConf, Purpose, ReaderRole};
use crate::{
    id::{MemberId, MemberPart, ServerId, SubsystemId},
    pki::{Fingerprint, certs_from_pem, sign::VerifyingKey},
};

/// A security server that provides a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The server's id.
    pub server: ServerId,
    /// `host:port` of its peer port.
    pub address: String,
    /// Fingerprint of its TLS certificate.
    pub tls: Fingerprint,
    /// Announced in maintenance: not to be called.
    pub maintenance: bool,
}

/// A provider subsystem as the security path sees it.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// Whether requests must name a subject.
    pub personal_data: bool,
    /// The servers that provide it, in the order the configuration lists them.
    pub endpoints: Vec<Endpoint>,
}

/// The consent authority as servers see it.
#[derive(Debug, Clone)]
pub struct ConsentAuthorityEntry {
    /// The `iss` claim of its tokens.
    pub issuer: String,
    /// `host:port` of its gRPC port.
    pub address: String,
    /// Fingerprint of its TLS certificate (pinned when connecting to it).
    pub tls: Fingerprint,
    /// Its token-signing keys.
    pub keys: Vec<VerifyingKey>,
}

/// A caller allowed to ask for access reports, as servers see it.
#[derive(Debug, Clone)]
pub struct ReportReaderEntry {
    /// Its name.
    pub name: String,
    /// Portal or auditor.
    pub role: ReaderRole,
    /// Fingerprint of its TLS client certificate.
    pub tls: Fingerprint,
    /// A portal's assertion-signing keys.
    pub keys: Vec<VerifyingKey>,
}

impl ReportReaderEntry {
    /// The assertion-signing key with this certificate fingerprint.
    pub fn key(&self, key_id: &Fingerprint) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| &k.key_id() == key_id)
    }
}

/// A verified, indexed global configuration.
#[derive(Debug)]
pub struct ConfView {
    conf: GlobalConf,
    consent: Option<ConsentAuthorityEntry>,
    server_ids: HashMap<Fingerprint, ServerId>,
    signing_keys: HashMap<MemberId, Vec<VerifyingKey>>,
    server_certs: HashMap<MemberId, HashMap<Fingerprint, ServerId>>,
    servers: HashMap<ServerId, Endpoint>,
    subsystems: HashMap<SubsystemId, ServiceEntry>,
    purposes: HashMap<String, Purpose>,
    report_readers: HashMap<Fingerprint, ReportReaderEntry>,
    authority_keys: Vec<VerifyingKey>,
}

/// A document that verified but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("global configuration is inconsistent: {0}")]
pub struct ViewError(pub String);

fn one_cert(pem: &str, what: &str) -> Result<Vec<u8>, ViewError> {
    let certs = certs_from_pem(pem.as_bytes(), what).map_err(|e| ViewError(e.to_string()))?;
    Ok(certs[0].as_ref().to_vec())
}

/// The authority keys a document announces.
fn authority_keys(conf: &GlobalConf) -> Result<Vec<VerifyingKey>, ViewError> {
    conf.authority_keys
        .iter()
        .map(|pem| {
            let der = one_cert(pem, "announced authority certificate")?;
            VerifyingKey::from_cert(&der).map_err(|e| ViewError(e.to_string()))
        })
        .collect()
}

impl ConfView {
    /// Indexes `conf`, refusing it if it is inconsistent.
    pub fn new(conf: GlobalConf) -> Result<Self, ViewError> {
        let mut view = Self {
            signing_keys: HashMap::new(),
            server_certs: HashMap::new(),
            servers: HashMap::new(),
            subsystems: HashMap::new(),
            purposes: HashMap::new(),
            consent: None,
            report_readers: HashMap::new(),
            server_ids: HashMap::new(),
            authority_keys: authority_keys(&conf)?,
            conf: conf.clone(),
        };
        if let Some(ca) = &conf.consent_authority {
            let tls = one_cert(&ca.tls_cert, "TLS certificate of the consent authority")?;
            let mut keys = Vec::new();
            for pem in &ca.signing_certs {
                let der = one_cert(pem, "signing certificate of the consent authority")?;
                keys.push(VerifyingKey::from_cert(&der).map_err(|e| ViewError(e.to_string()))?);
            }
            if keys.is_empty() || ca.issuer.is_empty() {
                return Err(ViewError(
                    "the consent authority needs an issuer and at least one signing certificate"
                        .into(),
                ));
            }
            view.consent = Some(ConsentAuthorityEntry {
                issuer: ca.issuer.clone(),
                address: ca.address.clone(),
                tls: Fingerprint::of(&tls),
                keys,
            });
        }
        for member in &conf.members {
            if member.id.instance != conf.instance {
                return Err(ViewError(format!(
                    "member {} is not of instance {}",
                    member.id, conf.instance
                )));
            }
            let mut keys = Vec::new();
            for pem in &member.signing_certs {
                let der = one_cert(pem, &format!("signing certificate of {}", member.id))?;
                keys.push(VerifyingKey::from_cert(&der).map_err(|e| ViewError(e.to_string()))?);
            }
            view.signing_keys.insert(member.id.clone(), keys);
            for sub in &member.subsystems {
                let id = SubsystemId(part(&member.id, &sub.code)?);
                let entry = ServiceEntry {
                    personal_data: sub.personal_data,
                    endpoints: Vec::new(),
                };
                if view.subsystems.insert(id.clone(), entry).is_some() {
                    return Err(ViewError(format!("subsystem {id} is listed twice")));
                }
            }
            for server in &member.servers {
                let id = ServerId(part(&member.id, &server.code)?);
                let der = one_cert(&server.tls_cert, &format!("TLS certificate of {id}"))?;
                let endpoint = Endpoint {
                    server: id.clone(),
                    address: server.address.clone(),
                    tls: Fingerprint::of(&der),
                    maintenance: server.maintenance,
                };
                view.server_certs
                    .entry(member.id.clone())
                    .or_default()
                    .insert(endpoint.tls, id.clone());
                view.server_ids.insert(endpoint.tls, id.clone());
                for code in &server.subsystems {
                    let sub = SubsystemId(part(&member.id, code)?);
                    let entry = view.subsystems.get_mut(&sub).ok_or_else(|| {
                        ViewError(format!(
                            "server {id} provides {sub}, which is not a subsystem of {}",
                            member.id
                        ))
                    })?;
                    entry.endpoints.push(endpoint.clone());
                }
                if view.servers.insert(id.clone(), endpoint).is_some() {
                    return Err(ViewError(format!("server {id} is listed twice")));
                }
            }
        }
        for purpose in &conf.purposes {
            let code = purpose.code.to_string();
            if view
                .purposes
                .insert(code.clone(), purpose.clone())
                .is_some()
            {
                return Err(ViewError(format!("purpose {code} is listed twice")));
            }
            if let Some(covert) = &purpose.covert {
                if matches!(purpose.basis, Basis::Consent) {
                    return Err(ViewError(format!(
                        "purpose {code} rests on the subject's consent and cannot allow covert reads"
                    )));
                }
                if covert.max_hidden_days == 0 {
                    return Err(ViewError(format!(
                        "purpose {code}: covert reads need max_hidden_days of at least 1"
                    )));
                }
            }
        }
        view.index_report_readers()?;
        Ok(view)
    }

    /// The document.
    pub fn conf(&self) -> &GlobalConf {
        &self.conf
    }

    /// The serial number of the document.
    pub fn serial(&self) -> u64 {
        self.conf.serial
    }

    /// The authority keys servers trust from this version on; empty: the
    /// document announces none, and the keys trusted so far stay.
    pub fn authority_keys(&self) -> &[VerifyingKey] {
        &self.authority_keys
    }

    /// When the document expires.
    pub(crate) fn expires_at(&self) -> OffsetDateTime {
        self.conf.expires_at
    }

    /// The member's signing key with this certificate fingerprint.
    pub fn signing_key(&self, member: &MemberId, key_id: &Fingerprint) -> Option<&VerifyingKey> {
        self.signing_keys
            .get(member)?
            .iter()
            .find(|k| &k.key_id() == key_id)
    }

    /// The server of `member` whose TLS certificate has this fingerprint.
    pub fn server_of(&self, member: &MemberId, tls: &Fingerprint) -> Option<&ServerId> {
        self.server_certs.get(member)?.get(tls)
    }

    /// A subsystem (as a service) by id.
    pub fn service(&self, id: &SubsystemId) -> Option<&ServiceEntry> {
        self.subsystems.get(id)
    }

    /// A purpose by code.
    pub fn purpose(&self, code: &str) -> Option<&Purpose> {
        self.purposes.get(code)
    }

    /// True if `code` is a purpose whose basis is the subject's consent.
    pub fn purpose_needs_consent(&self, code: &str) -> bool {
        self.purpose(code)
            .is_some_and(|p| matches!(p.basis, Basis::Consent))
    }

    /// Every security server the configuration lists, with its address and
    /// pinned certificate.
    pub fn servers(&self) -> impl Iterator<Item = &Endpoint> {
        self.servers.values()
    }

    /// The security server (of any member) whose TLS certificate has this
    /// fingerprint.
    pub fn server_by_tls(&self, tls: &Fingerprint) -> Option<&ServerId> {
        self.server_ids.get(tls)
    }

    /// The report reader whose TLS client certificate has this fingerprint.
    pub fn report_reader(&self, tls: &Fingerprint) -> Option<&ReportReaderEntry> {
        self.report_readers.get(tls)
    }

    /// The report reader named `name`.
    pub fn report_reader_named(&self, name: &str) -> Option<&ReportReaderEntry> {
        self.report_readers.values().find(|r| r.name == name)
    }

    /// A member's name, by id.
    pub fn member_name(&self, id: &MemberId) -> Option<&str> {
        self.conf
            .members
            .iter()
            .find(|m| &m.id == id)
            .map(|m| m.name.as_str())
    }

    /// Every security server that provides a service returning personal
    /// data, once each, in the order the configuration lists them: where a
    /// subject's reads are recorded on the provider's side.
    pub fn personal_data_servers(&self) -> Vec<&Endpoint> {
        let mut out: Vec<&Endpoint> = Vec::new();
        for member in &self.conf.members {
            for server in &member.servers {
                let Ok(id) = part(&member.id, &server.code).map(ServerId) else {
                    continue;
                };
                let personal = server.subsystems.iter().any(|code| {
                    part(&member.id, code)
                        .ok()
                        .and_then(|p| self.subsystems.get(&SubsystemId(p)))
                        .is_some_and(|e| e.personal_data)
                });
                if let Some(endpoint) = self.servers.get(&id).filter(|_| personal)
                    && !out.iter().any(|e| e.server == endpoint.server)
                {
                    out.push(endpoint);
                }
            }
        }
        out
    }

    fn index_report_readers(&mut self) -> Result<(), ViewError> {
        for reader in &self.conf.report_readers {
            let name = reader.name.to_string();
            let der = one_cert(
                &reader.tls_cert,
                &format!("TLS certificate of report reader {name}"),
            )?;
            let tls = Fingerprint::of(&der);
            if let Some(server) = self.server_ids.get(&tls) {
                return Err(ViewError(format!(
                    "report reader {name} presents the TLS certificate of security server {server}"
                )));
            }
            let mut keys = Vec::new();
            for pem in &reader.signing_certs {
                let der = one_cert(pem, &format!("signing certificate of report reader {name}"))?;
                keys.push(VerifyingKey::from_cert(&der).map_err(|e| ViewError(e.to_string()))?);
            }
            match (reader.role, keys.is_empty()) {
                (ReaderRole::Portal, true) => {
                    return Err(ViewError(format!(
                        "portal {name} needs a signing certificate for its assertions"
                    )));
                }
                (ReaderRole::Auditor, false) => {
                    return Err(ViewError(format!(
                        "auditor {name} asks in its own name and signs no assertions: list no signing certificates"
                    )));
                }
                _ => {}
            }
            if self.report_readers.values().any(|r| r.name == name) {
                return Err(ViewError(format!("report reader {name} is listed twice")));
            }
            let entry = ReportReaderEntry {
                name: name.clone(),
                role: reader.role,
                tls,
                keys,
            };
            if self.report_readers.insert(tls, entry).is_some() {
                return Err(ViewError(format!(
                    "report reader {name} shares its TLS certificate with another"
                )));
            }
        }
        Ok(())
    }

    /// The consent authority, if the federation has one.
    pub fn consent_authority(&self) -> Option<&ConsentAuthorityEntry> {
        self.consent.as_ref()
    }

    /// The consent authority's token-signing key with this certificate
    /// fingerprint.
    pub fn consent_key(&self, key_id: &Fingerprint) -> Option<&VerifyingKey> {
        self.consent
            .as_ref()?
            .keys
            .iter()
            .find(|k| &k.key_id() == key_id)
    }
}

fn part(member: &MemberId, code: &str) -> Result<MemberPart, ViewError> {
    format!("{member}/{code}")
        .parse::<SubsystemId>()
        .map(|s| s.0)
        .map_err(|e| ViewError(e.to_string()))
}
