//! Where each file of a development PKI lives under its root folder
//! ([`DevLayout`]), and what one is made for ([`DevPkiSpec`]), so that
//! configurations can refer to the files by convention. The PKI itself is
//! made by [`super::dev`] (feature `dev-pki`).

use std::path::PathBuf;

use crate::id::{MemberId, ServerId, SubsystemId};

/// Where each file of a development PKI lives under its root folder.
#[derive(Debug, Clone)]
pub struct DevLayout {
    root: PathBuf,
}

fn file_name(id: &impl std::fmt::Display) -> String {
    id.to_string().replace('/', "_")
}

impl DevLayout {
    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The CA certificate (trust root for TLS on the client port).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    /// The CA's private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The authority's signing certificate: the global configuration's trust anchor.
    pub fn authority_cert(&self) -> PathBuf {
        self.root.join("authority/signing.crt")
    }
    /// The authority's signing key.
    pub fn authority_key(&self) -> PathBuf {
        self.root.join("authority/signing.key")
    }
    /// The consent authority's token-signing certificate and key.
    pub fn consent_signing(&self) -> (PathBuf, PathBuf) {
        let dir = self.root.join("consent");
        (dir.join("signing.crt"), dir.join("signing.key"))
    }
    /// The consent authority's TLS certificate and key.
    pub(crate) fn consent_tls(&self) -> (PathBuf, PathBuf) {
        let dir = self.root.join("consent");
        (dir.join("tls.crt"), dir.join("tls.key"))
    }
    /// The citizen portal's client certificate and key (pinned by the consent
    /// authority).
    pub fn portal(&self) -> (PathBuf, PathBuf) {
        let dir = self.root.join("portal");
        (dir.join("client.crt"), dir.join("client.key"))
    }
    /// The citizen portal's Ed25519 certificate and key for signing the
    /// assertions it presents with access-report requests.
    pub fn portal_signing(&self) -> (PathBuf, PathBuf) {
        let dir = self.root.join("portal");
        (dir.join("signing.crt"), dir.join("signing.key"))
    }
    /// An auditor's client certificate and key (access reports).
    pub fn auditor(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join("auditors").join(file_name(&name));
        (dir.join("client.crt"), dir.join("client.key"))
    }
    /// A member's signing certificate and key.
    pub fn member_signing(&self, member: &MemberId) -> (PathBuf, PathBuf) {
        let dir = self.root.join("members").join(file_name(member));
        (dir.join("signing.crt"), dir.join("signing.key"))
    }
    /// A security server's TLS certificate and key.
    pub fn server_tls(&self, server: &ServerId) -> (PathBuf, PathBuf) {
        let dir = self.root.join("servers").join(file_name(server));
        (dir.join("tls.crt"), dir.join("tls.key"))
    }
    /// An information system's client certificate and key.
    pub fn client(&self, subsystem: &SubsystemId) -> (PathBuf, PathBuf) {
        let dir = self.root.join("clients").join(file_name(subsystem));
        (dir.join("client.crt"), dir.join("client.key"))
    }
    /// The operator's client certificate and key, for the admin ports.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        let dir = self.root.join("operators");
        (dir.join("operator.crt"), dir.join("operator.key"))
    }
}

/// What a development PKI is made for.
#[derive(Debug, Clone, Default)]
pub struct DevPkiSpec {
    /// Members that get a signing certificate.
    pub members: Vec<MemberId>,
    /// Security servers that get a TLS certificate, with the host names it is
    /// valid for (`localhost` and `127.0.0.1` are always added).
    pub servers: Vec<(ServerId, Vec<String>)>,
    /// Information systems that get a client certificate.
    pub clients: Vec<SubsystemId>,
    /// Host names the consent authority's TLS certificate is made for
    /// (`localhost` and `127.0.0.1` are always added).
    pub consent_hosts: Vec<String>,
    /// Auditors (report readers) that get a client certificate, by name.
    pub auditors: Vec<String>,
}
