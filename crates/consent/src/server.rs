//! Assembles a consent authority: its store, keys, global configuration, the
//! TLS listener (client certificates requested, checked per call) and the
//! gRPC service with health and reflection.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tower::Layer;

use super::{
    config::ConsentConfig,
    service::{Authority, ConsentServiceImpl},
    store::{self, ConsentStore, StoreError},
};
use kopir_core::{
    config::Limits,
    globalconf::watch::watch as watch_conf,
    pki::{
        Fingerprint, PkiError, cert_fingerprint, load_certs, load_key,
        sign::SigningKey,
        tls::{ClientAuth, server_config},
    },
};
use kopir_edge::{
    EdgeLimits,
    overload::{Admission, Admit, CallBudget, Caller, PortGateLayer},
};
use kopir_proto::{FILE_DESCRIPTOR_SET, v1::consent_service_server::ConsentServiceServer};

/// Why a consent authority could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Key material could not be loaded.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The record of the highest accepted global configuration cannot be read.
    #[error(transparent)]
    GlobalconfHighest(#[from] kopir_core::globalconf::highest::HighestError),
    /// The address could not be read.
    #[error("listener: {0}")]
    Listen(#[from] std::io::Error),
}

/// A running consent authority.
#[derive(Debug)]
pub struct RunningAuthority {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningAuthority {
    /// Ends every revocation stream, stops accepting, and waits for the port
    /// to close.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "consent port task failed");
        }
    }
}

/// Opens the store the configuration names.
pub async fn open_store(config: &ConsentConfig) -> Result<Arc<dyn ConsentStore>, StoreError> {
    store::open(&config.data_dir, config.database.as_deref()).await
}

/// The authority's call budget is shared by its callers as a security
/// server's is (see [`kopir_edge::overload`]): each portal, information system
/// and security server it knows by certificate has its own share, everyone
/// else one share together.
fn admission(authority: Arc<Authority>) -> Admit {
    Arc::new(move |_, cert| {
        let known = cert.map(Fingerprint::of).and_then(|fp| {
            if authority.portals.contains(&fp) {
                return Some(format!("portal {fp}"));
            }
            if let Some(id) = authority.consumers.get(&fp) {
                return Some(format!("information system {id}"));
            }
            let view = authority.conf.current().ok()?;
            view.server_by_tls(&fp)
                .map(|server| format!("security server {server}"))
        });
        Admission::Gated(known.map_or(Caller::Anonymous, Caller::Known))
    })
}

/// Starts a consent authority on a pre-bound listener, with `store`.
pub async fn start(
    config: ConsentConfig,
    listener: TcpListener,
    store: Arc<dyn ConsentStore>,
) -> Result<RunningAuthority, StartError> {
    let chain = load_certs(&config.tls.cert)?;
    let key = load_key(&config.tls.key)?;
    let signer = SigningKey::load(&config.signing.cert, &config.signing.key)?;
    let anchor = config
        .globalconf
        .anchor()
        .map_err(|e| StartError::Config(e.0))?;
    if config.portals.is_empty() {
        return Err(StartError::Config(
            "portals names no portal certificate: nobody could grant consent".into(),
        ));
    }
    let portals = config
        .portals
        .iter()
        .map(|p| cert_fingerprint(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut consumers = HashMap::new();
    for c in &config.consumers {
        consumers.insert(cert_fingerprint(&c.cert)?, c.id.clone());
    }
    let conf = watch_conf(anchor, config.globalconf.download(), &config.data_dir).await?;
    match conf.current() {
        Ok(view) if view.consent_key(&signer.key_id()).is_none() => tracing::warn!(
            key_id = %signer.key_id(),
            "the global configuration does not list this signing certificate for the consent authority: providers will refuse its tokens"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "no usable global configuration yet; calls are refused until one arrives")
        }
    }
    let (shutdown, stopping) = watch::channel(false);
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let authority = Arc::new(Authority {
        store,
        signer,
        conf,
        portals,
        consumers,
        token_ttl: Duration::from_secs(config.token_ttl_secs.max(1)),
        heartbeat: Duration::from_millis(config.heartbeat_ms.clamp(100, 60_000)),
        events,
        stopping: stopping.clone(),
    });
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(chain, key, ClientAuth::Requested)?));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ConsentServiceServer<ConsentServiceImpl>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
    let routes = Routes::new(health_service)
        .add_service(reflection)
        .add_service(ConsentServiceServer::new(ConsentServiceImpl::new(
            authority.clone(),
        )));
    let routes = PortGateLayer::new(
        CallBudget::for_port(&Limits::default()),
        admission(authority),
        Limits::default().timeout(),
    )
    .layer(routes.prepare());
    // Revocation feeds are long-lived streams: pings find the ones whose
    // provider is gone within seconds.
    let limits = EdgeLimits {
        keepalive_interval_ms: 5_000,
        keepalive_timeout_ms: 5_000,
        ..EdgeLimits::default()
    };
    let task = tokio::spawn(kopir_edge::serve(
        listener,
        Some(acceptor),
        routes,
        limits,
        stopping,
    ));
    tracing::info!(%addr, "consent authority started");
    Ok(RunningAuthority {
        addr,
        shutdown,
        task,
    })
}
