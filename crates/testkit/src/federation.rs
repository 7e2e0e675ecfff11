//! A whole federation in one process, on loopback: the development PKI, the
//! three mock registries, the signed global configuration, the consent
//! authority and the security servers of `deploy/` (MLSPP, MOJ, SRC). `kopir demo` runs it; integration
//! tests and benchmarks start it too, adjusting the servers' configurations.
//!
//! It is built from the same files that `docker-compose.yml` uses
//! (`deploy/federation.toml`, `deploy/consent.toml` and
//! `deploy/{mlspp,moj,src}.toml`, compiled in),
//! with listen addresses, registry endpoints and folders replaced by its own.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use time::Duration;
use tonic::transport::{Channel, Endpoint};

use crate::registry::{Dataset, RegistryHandle, RegistryKind};
use kopir_audit::AuditHandle;
use kopir_consent::{
    channel::ca_channel,
    config::ConsentConfig,
    server::{RunningAuthority, open_store, start as start_consent},
};
pub use kopir_core::durable::write_atomically;
use kopir_core::{
    config::GlobalConfSource,
    globalconf::{describe::Federation, signed},
    id::SubsystemId,
    pki::{dev, layout::DevLayout, load_certs, load_key, sign::SigningKey, tls::ca_client_config},
};
use kopir_proto::v1::{
    GrantRequest, IssueTokenRequest, consent_service_client::ConsentServiceClient,
};
use kopir_server::{
    config::ServerConfig,
    server::{Listeners, RunningServer, start},
};

/// The authority's description of the demo federation.
pub const FEDERATION_TOML: &str = include_str!("../../../deploy/federation.toml");
/// The demo's security servers: (name, configuration).
pub(crate) const SERVER_TOMLS: [(&str, &str); 3] = [
    ("mlspp", include_str!("../../../deploy/mlspp.toml")),
    ("moj", include_str!("../../../deploy/moj.toml")),
    ("src", include_str!("../../../deploy/src.toml")),
];
/// The demo's consent authority.
pub(crate) const CONSENT_TOML: &str = include_str!("../../../deploy/consent.toml");
/// The information system of the demo's life event.
pub const BENEFITS: &str = "KZ/GOV/MLSPP/benefits";

/// One running security server of the federation.
#[derive(Debug)]
pub struct Node {
    /// Its configuration, as started.
    pub config: ServerConfig,
    /// The same, written to a file with the addresses it listens on
    /// (`kopir serve --config` or `kopir audit ... --config` can use it).
    pub config_path: PathBuf,
    /// The running server.
    pub server: RunningServer,
    /// Its audit log.
    pub audit: Arc<AuditHandle>,
}

/// A running federation.
#[derive(Debug)]
pub struct LocalFederation {
    /// The folder holding its PKI, configurations, global configuration and data.
    pub dir: PathBuf,
    /// The development PKI.
    pub layout: DevLayout,
    /// The authority's description, with the real addresses.
    pub description: Federation,
    /// Where the signed global configuration is published.
    pub globalconf_path: PathBuf,
    /// Servers by name (`mlspp`, `moj`, `src`).
    pub nodes: BTreeMap<String, Node>,
    /// The registries, by kind.
    pub registries: BTreeMap<RegistryKind, RegistryHandle>,
    /// The synthetic data behind the registries.
    pub dataset: Arc<Dataset>,
    /// Where the consent authority listens.
    pub consent_addr: SocketAddr,
    /// The consent authority (`None` once stopped).
    pub consent: Option<RunningAuthority>,
}

/// How to adjust a server's configuration before it starts: called with the
/// server's name and its configuration.
pub type Adjust<'a> = &'a dyn Fn(&str, &mut ServerConfig);

impl LocalFederation {
    /// Starts the federation under `dir` (made if missing).
    pub async fn launch(dir: &Path, adjust: Adjust<'_>) -> anyhow::Result<Self> {
        Self::launch_with(dir, adjust, &|_| {}).await
    }

    /// Starts the federation under `dir`, adjusting the servers' and the
    /// consent authority's configurations before they start.
    pub async fn launch_with(
        dir: &Path,
        adjust: Adjust<'_>,
        adjust_consent: &dyn Fn(&mut ConsentConfig),
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let deploy = dir.join("deploy");
        std::fs::create_dir_all(&deploy)?;
        std::fs::write(deploy.join("federation.toml"), FEDERATION_TOML)?;
        let mut description = Federation::load(&deploy.join("federation.toml"))?;
        let layout = dev::generate(&description.dev_pki_spec()?, &dir.join("certs-dev"))?;

        let dataset = Arc::new(Dataset::demo());
        let mut registries = BTreeMap::new();
        for kind in [
            RegistryKind::Population,
            RegistryKind::Income,
            RegistryKind::Realty,
        ] {
            let handle = RegistryHandle::spawn(kind, dataset.clone(), loopback()).await?;
            registries.insert(kind, handle);
        }

        let globalconf_path = dir.join("globalconf.json");
        let consent_path = deploy.join("consent.toml");
        std::fs::write(&consent_path, CONSENT_TOML)?;
        let mut consent = ConsentConfig::load(&consent_path)?;
        consent.data_dir = dir.join("data").join("consent");
        consent.globalconf = file_source(&globalconf_path, &layout);
        adjust_consent(&mut consent);
        let consent_listener = tokio::net::TcpListener::bind(loopback()).await?;
        if let Some(ca) = description.consent_authority.as_mut() {
            ca.address = consent_listener.local_addr()?.to_string();
        }
        let mut prepared = Vec::new();
        for (name, text) in SERVER_TOMLS {
            let path = deploy.join(format!("{name}.toml"));
            std::fs::write(&path, text)?;
            let mut config = ServerConfig::load(&path)?;
            config.data_dir = dir.join("data").join(name);
            config.globalconf = file_source(&globalconf_path, &layout);
            config.listen.client = loopback();
            config.listen.peer = loopback();
            config.listen.admin = Some(loopback());
            for service in &mut config.services {
                let kind = registries
                    .values()
                    .find(|r| r.kind().default_service_id() == service.id.to_string())
                    .with_context(|| format!("no mock registry for {}", service.id))?;
                service.endpoint = kind.uri();
            }
            adjust(name, &mut config);
            let listeners = Listeners::bind(&config).await?;
            let peer = listeners.peer.local_addr()?;
            let member = config.server_id.member().clone();
            let server_code = config.server_id.0.code.clone();
            for m in description.members.iter_mut().filter(|m| m.id == member) {
                for s in m.servers.iter_mut().filter(|s| s.code == server_code) {
                    s.address = peer.to_string();
                }
            }
            prepared.push((name.to_string(), config, listeners));
        }
        publish_to(&globalconf_path, &description, &layout, Duration::hours(24))?;
        let store = open_store(&consent).await?;
        let consent = start_consent(consent, consent_listener, store).await?;
        let mut fed = Self {
            dir: dir.to_path_buf(),
            layout,
            description,
            globalconf_path,
            nodes: BTreeMap::new(),
            registries,
            dataset,
            consent_addr: consent.addr,
            consent: Some(consent),
        };

        for (name, config, listeners) in prepared {
            let signer = Arc::new(SigningKey::load(&config.signing.cert, &config.signing.key)?);
            let audit = kopir_audit::open(&config.audit_config(), signer).await?;
            let server = start(config.clone(), listeners, audit.clone()).await?;
            let mut config = config;
            config.listen.client = server.client_addr;
            config.listen.peer = server.peer_addr;
            config.listen.admin = server.admin_addr;
            let config_path = fed.dir.join(format!("{name}.toml"));
            config.save(&config_path)?;
            fed.nodes.insert(
                name,
                Node {
                    config,
                    config_path,
                    server,
                    audit,
                },
            );
        }
        fed.await_revocation_feeds().await?;
        Ok(fed)
    }

    /// Waits until every server has heard from the consent authority, so that
    /// consent-based calls are not refused as unverifiable right after start.
    pub(crate) async fn await_revocation_feeds(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self
            .nodes
            .values()
            .all(|n| n.server.revocations().is_fresh(kopir_core::clock::now_ms()))
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "a security server did not hear from the consent authority within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Signs and publishes the global configuration, valid for `valid_for`
    /// from now (negative: already expired), with a new serial.
    pub fn publish(&self, valid_for: Duration) -> anyhow::Result<()> {
        publish_to(
            &self.globalconf_path,
            &self.description,
            &self.layout,
            valid_for,
        )
    }

    /// Every record a node's audit log keeps of one exchange, oldest first.
    pub async fn records(
        &self,
        node: &str,
        request_id: &str,
    ) -> anyhow::Result<Vec<kopir_audit::record::StoredRecord>> {
        Ok(self
            .node(node)
            .audit
            .store()
            .by_request(request_id.into())
            .await?)
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// A channel from an information system to the client port of its member's
    /// server, authenticated with the system's client certificate.
    pub async fn client_channel(&self, node: &str, subsystem: &str) -> anyhow::Result<Channel> {
        let id: SubsystemId = subsystem.parse()?;
        let (cert, key) = self.layout.client(&id);
        let identity = Some((load_certs(&cert)?, load_key(&key)?));
        self.channel_to(self.node(node).server.client_addr, identity)
            .await
    }

    /// A channel to a node's admin port, presenting the operator's certificate.
    pub async fn admin_channel(&self, node: &str) -> anyhow::Result<Channel> {
        let (cert, key) = self.layout.operator();
        let addr = self
            .node(node)
            .server
            .admin_addr
            .context("the node has no admin port")?;
        self.channel_to(addr, Some((load_certs(&cert)?, load_key(&key)?)))
            .await
    }

    /// A channel to the consent authority presenting `identity` (the
    /// portal's, or an information system's).
    pub fn consent_channel(&self, identity: (PathBuf, PathBuf)) -> anyhow::Result<Channel> {
        let (cert, key) = identity;
        Ok(ca_channel(
            &self.consent_addr.to_string(),
            &load_certs(&self.layout.ca_cert())?,
            Some((load_certs(&cert)?, load_key(&key)?)),
            std::time::Duration::from_secs(2),
        )?)
    }

    /// The consent round of the demo's information system: through the
    /// portal, `subject` (`iin:...`) consents to the benefits system's calls
    /// of `method` on `service` for `purpose`, for a day from now; then the
    /// benefits system obtains the token with its own client certificate.
    /// Returns the consent id and the token.
    pub async fn benefits_consent(
        &self,
        subject: &str,
        service: &str,
        method: &str,
        purpose: &str,
    ) -> anyhow::Result<(String, String)> {
        let now = kopir_core::clock::now_ms() / 1000;
        let consent = ConsentServiceClient::new(self.consent_channel(self.layout.portal())?)
            .grant(GrantRequest {
                subject: subject.into(),
                client: BENEFITS.into(),
                service: service.into(),
                methods: vec![method.into()],
                purpose: purpose.into(),
                not_before: 0,
                not_after: now + 24 * 3600,
                max_uses: 0,
            })
            .await?
            .into_inner()
            .consent
            .context("the consent authority returned no consent")?;
        let system = self.layout.client(&BENEFITS.parse()?);
        let token = ConsentServiceClient::new(self.consent_channel(system)?)
            .issue_token(IssueTokenRequest {
                consent_id: consent.id.clone(),
            })
            .await?
            .into_inner()
            .token;
        Ok((consent.id, token))
    }

    /// A channel to `addr` over TLS trusting the development CA, presenting
    /// `identity` if given.
    pub async fn channel_to(
        &self,
        addr: SocketAddr,
        identity: Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
    ) -> anyhow::Result<Channel> {
        let tls = ca_client_config(&load_certs(&self.layout.ca_cert())?, identity)?;
        tls_channel(addr, tls).await
    }

    /// Stops one server (writing its final checkpoint) and returns its
    /// configuration file, so that it can be run again as its own process.
    pub async fn stop_node(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let node = self
            .nodes
            .remove(name)
            .with_context(|| format!("no node {name}"))?;
        node.server.shutdown().await;
        node.audit.shutdown().await;
        Ok(node.config_path)
    }

    /// Stops every server (writing their final checkpoints) and registry.
    pub async fn shutdown(self) {
        for (_, node) in self.nodes {
            node.server.shutdown().await;
            node.audit.shutdown().await;
        }
        if let Some(consent) = self.consent {
            consent.shutdown().await;
        }
        for (_, registry) in self.registries {
            let _ = registry.shutdown().await;
        }
    }
}

/// Signs `description` with the authority's key of `layout` and publishes it
/// at `path`, valid for `valid_for` from now, with a new serial.
/// The test federation's source: the one file it publishes to, checked
/// every second, signed by the development PKI's authority.
fn file_source(path: &Path, layout: &DevLayout) -> GlobalConfSource {
    GlobalConfSource {
        anchor: None,
        path: Some(path.to_path_buf()),
        anchors: vec![layout.authority_cert()],
        refresh_secs: 1,
        ..GlobalConfSource::default()
    }
}

fn publish_to(
    path: &Path,
    description: &Federation,
    layout: &DevLayout,
    valid_for: Duration,
) -> anyhow::Result<()> {
    let serial = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1000;
    let conf = description.build(serial, valid_for)?;
    let key = SigningKey::load(&layout.authority_cert(), &layout.authority_key())?;
    write_atomically(path, signed::sign(&conf, &key).as_bytes())?;
    Ok(())
}

/// The citizen's access report, as the demo's portal or auditor asks for it.
impl LocalFederation {
    /// The federation-wide access report of `subject` (see [`kopir_server::report`]),
    /// asked by the demo's portal (with a fresh assertion naming the subject,
    /// signed with its key) or by its first auditor.
    pub async fn access_report(
        &self,
        subject: &kopir_core::id::Subject,
        role: kopir_core::globalconf::model::ReaderRole,
        include_refused: bool,
    ) -> anyhow::Result<kopir_server::report::FederationReport> {
        use kopir_core::{globalconf::model::ReaderRole, pki::sign::VerifyingKey};
        let anchors = vec![VerifyingKey::load(&self.layout.authority_cert())?];
        let view = kopir_core::globalconf::watch::read(&self.globalconf_path, &anchors)?;
        let reader = self
            .description
            .report_readers
            .iter()
            .find(|r| r.role == role)
            .with_context(|| format!("the federation lists no {}", role.as_str()))?;
        let ((cert, key), assertion) = match role {
            ReaderRole::Portal => {
                let (c, k) = self.layout.portal_signing();
                let signer = SigningKey::load(&c, &k)?;
                let now = kopir_core::clock::now_ms() / 1000;
                let claims = kopir_server::report::assertion::Claims::new(
                    reader.name.as_str(),
                    subject,
                    now,
                    60,
                );
                (self.layout.portal(), claims.sign(&signer))
            }
            ReaderRole::Auditor => (self.layout.auditor(reader.name.as_str()), String::new()),
        };
        let request = kopir_proto::v1::ReportRequest {
            subject: subject.to_string(),
            assertion,
            include_refused,
            ..Default::default()
        };
        let identity = (load_certs(&cert)?, load_key(&key)?);
        Ok(kopir_server::report::assemble(
            &view,
            identity,
            &request,
            std::time::Duration::from_secs(10),
        )
        .await)
    }
}

/// A channel to `addr` over TLS with the given client configuration.
pub async fn tls_channel(addr: SocketAddr, tls: rustls::ClientConfig) -> anyhow::Result<Channel> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connect)
        .await?)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
