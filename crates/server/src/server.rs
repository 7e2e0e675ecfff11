//! Assembles one security server: its listeners, the TLS in front of them, the
//! tower layers at the edge, and the services behind each port.
//!
//! - client port: the member's information systems call registry methods here;
//!   health and reflection answer too, every other path goes to
//!   [`crate::exchange::consumer`].
//! - peer port: other security servers, mutual TLS only: `kopir.v1.Exchange`
//!   ([`crate::exchange::provider`]), health, reflection; and the citizen's access
//!   report for portals and auditors, `kopir.v1.AccessReport` ([`crate::report`]).
//! - admin port (optional): operators, mutual TLS: the `AuditService` (only
//!   for the client certificates `operators` lists), health, reflection.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
};
use tower::Layer;

use crate::{
    config::ServerConfig,
    exchange::{
        Gateway, Local, LocalHandle, RegisteredClient, consumer,
        gate::{ENVELOPE_ALLOWANCE, PeerGate},
        peers::Peers,
        provider::Provider,
        replay::ReplayGuard,
        unknown::write_summaries,
        upstream::Registry,
    },
    policy::AccessPolicy,
    report::ReportService,
    status::StatusService,
};
use kopir_audit::{AuditHandle, AuditServiceImpl};
use kopir_consent::{
    ConsentVerifier, DEFAULT_MAX_SILENCE, FeedOptions, RevocationFeed, RevocationSet,
};
use kopir_core::{
    error::{Reason, Refusal},
    globalconf::{GlobalConfHandle, watch::watch as watch_conf},
    id::SubsystemId,
    pki::{
        Fingerprint, PkiError,
        batch::{BatchSigner, VerifiedRoots},
        cert_fingerprint, load_certs, load_key,
        sign::SigningKey,
        tls::{ClientAuth, server_config},
    },
};
use kopir_edge::{
    EdgeLimits,
    overload::{Admission, Admit, CallBudget, Caller, PortGate, PortGateLayer},
};
use kopir_proto::{FILE_DESCRIPTOR_SET, v1::exchange_server::ExchangeServer};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Key material could not be loaded.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The record of the highest accepted global configuration cannot be read.
    #[error(transparent)]
    GlobalconfHighest(#[from] kopir_core::globalconf::highest::HighestError),
    /// The store that counts consent uses could not be opened.
    #[error("consent use counts: {0}")]
    ConsentStore(#[from] kopir_consent::store::StoreError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// The server's listeners, bound before it starts (so that tests and the demo
/// can bind port 0 and publish the real addresses first).
#[derive(Debug)]
pub struct Listeners {
    /// Client port.
    pub client: TcpListener,
    /// Peer port.
    pub peer: TcpListener,
    /// Admin port.
    pub admin: Option<TcpListener>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

impl Listeners {
    /// Binds the addresses a configuration names.
    pub async fn bind(config: &ServerConfig) -> Result<Self, ServerError> {
        Ok(Self {
            client: bind(config.listen.client).await?,
            peer: bind(config.listen.peer).await?,
            admin: match config.listen.admin {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the client port listens.
    pub client_addr: SocketAddr,
    /// Where the peer port listens.
    pub peer_addr: SocketAddr,
    /// Where the admin port listens.
    pub admin_addr: Option<SocketAddr>,
    gw: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    revocations: RevocationFeed,
}

impl RunningServer {
    /// This server's view of consent revocations, kept fresh by the feed from
    /// the consent authority.
    pub fn revocations(&self) -> &RevocationSet {
        self.revocations.set()
    }

    /// Takes the information systems, registries and access rules of
    /// `config` for the calls that start from now on, once all of them are
    /// checked; on an error the running ones stay. Every other key takes
    /// effect at the next start.
    pub async fn reload(&self, config: ServerConfig) -> Result<(), ServerError> {
        let gw = self.gw.clone();
        // Certificate files are read: off the async runtime.
        tokio::task::spawn_blocking(move || {
            let local = local_of(&config)?;
            let (clients, services, rules) = local.counts();
            gw.local.replace(local);
            tracing::info!(clients, services, rules, "local configuration reloaded");
            Ok(())
        })
        .await
        .map_err(|e| ServerError::Config(format!("reload: {e}")))?
    }

    /// Stops accepting, closes idle connections, gives calls in flight the
    /// drain timeout (`edge.drain_timeout_ms`) to finish, and waits for the
    /// ports to close.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.revocations.stop().await;
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "port task failed");
            }
        }
    }
}

/// How many batch signature roots a server remembers as checked.
const VERIFIED_ROOTS: usize = 4096;

/// A port's service: its routes behind the port's own call budget, sorted by
/// `admit` (see [`kopir_edge::overload`]).
fn port_service(
    gw: &Gateway,
    budget: CallBudget,
    routes: Routes,
    admit: Admit,
) -> PortGate<Routes> {
    PortGateLayer::new(budget, admit, gw.limits.timeout()).layer(routes.prepare())
}

/// True for the routes every port opens to any caller.
fn open_route(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
}

/// Client port: the exchange path takes its permit once it has
/// authenticated the information system; health and reflection share the
/// anonymous share.
fn client_admission() -> Admit {
    Arc::new(|path, _| {
        if open_route(path) {
            Admission::Gated(Caller::Anonymous)
        } else {
            Admission::SelfManaged
        }
    })
}

/// Peer port: the exchange's door takes its permit once the peer is pinned;
/// other calls are charged to the security server, portal or auditor the
/// global configuration names for the certificate, or to the anonymous share.
fn peer_admission(conf: GlobalConfHandle) -> Admit {
    Arc::new(move |path, cert| {
        if path.starts_with("/kopir.v1.Exchange/") {
            return Admission::SelfManaged;
        }
        let known = cert.map(Fingerprint::of).and_then(|fp| {
            let view = conf.current().ok()?;
            if let Some(server) = view.server_by_tls(&fp) {
                return Some(format!("security server {server}"));
            }
            view.report_reader(&fp)
                .map(|r| format!("report reader {}", r.name))
        });
        Admission::Gated(known.map_or(Caller::Anonymous, Caller::Known))
    })
}

/// Admin port: every call is charged to its operator, or to the anonymous
/// share (health, and callers the operator check refuses).
fn admin_admission(operators: Arc<Vec<Fingerprint>>) -> Admit {
    Arc::new(move |_, cert| {
        let fp = cert.map(Fingerprint::of);
        Admission::Gated(match fp {
            Some(fp) if operators.contains(&fp) => Caller::Known(format!("operator {fp}")),
            _ => Caller::Anonymous,
        })
    })
}

/// Lets a call through only if its TLS client certificate is an operator's.
fn operator_check(
    operators: Arc<Vec<Fingerprint>>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request| {
        let refuse = |why: String| Refusal::new(Reason::OperatorUnknown, why).to_status(None);
        let cert = request
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| refuse("present an operator's TLS client certificate".into()))?;
        let fp = Fingerprint::of(cert.as_ref());
        if operators.contains(&fp) {
            Ok(request)
        } else if operators.is_empty() {
            Err(refuse(
                "this server lists no operators; add their certificates to `operators` in its configuration".into(),
            ))
        } else {
            Err(refuse(format!(
                "certificate {fp} is not one of this server's `operators`"
            )))
        }
    }
}

/// Starts a security server on pre-bound listeners, writing audit records to
/// `audit` (which its admin port also serves to operators).
///
/// Everything the configuration names is loaded and checked before any port
/// serves; the first failure is the error.
pub async fn start(
    config: ServerConfig,
    listeners: Listeners,
    audit: Arc<AuditHandle>,
) -> Result<RunningServer, ServerError> {
    let parts = Parts::build(&config, &listeners, audit).await?;
    serve_ports(&config, listeners, parts)
}

/// The parts of a server, built from its configuration before any port
/// serves.
struct Parts {
    /// The exchange's state, shared by the client and peer ports.
    gw: Arc<Gateway>,
    /// The audit log, which the access report and the operators'
    /// `AuditService` read.
    audit: Arc<AuditHandle>,
    /// The consent authority's revocation feed, stopped at shutdown.
    revocations: RevocationFeed,
    /// The fingerprints of the operators' client certificates.
    operators: Vec<Fingerprint>,
    /// TLS of the client port: a client certificate is asked for, and checked
    /// in the request path, which names what is wrong with it.
    client_tls: TlsAcceptor,
    /// TLS of the peer and admin ports: every caller holds a certificate.
    peer_tls: TlsAcceptor,
}

impl Parts {
    /// Loads and checks, in this order: the TLS and signing keys, the global
    /// configuration, the local clients and registries, the client port's
    /// mode, the operators and the consent store; then assembles the gateway
    /// and the ports' TLS.
    async fn build(
        config: &ServerConfig,
        listeners: &Listeners,
        audit: Arc<AuditHandle>,
    ) -> Result<Self, ServerError> {
        let identity = TlsIdentity::load(config)?;
        let conf = global_conf(config).await?;
        let local = local_of(config)?;
        let plaintext_clients = plaintext_client(config, &listeners.client)?;
        let operators = operator_fingerprints(config)?;
        let (consent, revocations) = consent(config, &conf, &identity).await?;
        let limits = &config.limits;
        let gw = Arc::new(Gateway {
            server_id: config.server_id.clone(),
            conf,
            verified: VerifiedRoots::new(VERIFIED_ROOTS),
            audit: audit.clone(),
            replay: ReplayGuard::new(limits.max_clock_skew_ms, limits.replay_capacity),
            peers: Peers::new(
                identity.chain.clone(),
                identity.key.clone_key(),
                limits.connect_timeout(),
                limits.max_body_bytes + ENVELOPE_ALLOWANCE,
            ),
            limits: limits.clone(),
            local: LocalHandle::new(local),
            plaintext_clients,
            consent,
            store_bodies: config.audit.store_bodies,
            client_calls: CallBudget::for_port(limits),
            unknown: Arc::default(),
        });
        Ok(Self {
            client_tls: identity.acceptor(ClientAuth::Requested)?,
            peer_tls: identity.acceptor(ClientAuth::Required)?,
            gw,
            audit,
            revocations,
            operators,
        })
    }
}

/// The server's TLS certificate chain and key: what it presents on its ports
/// and to the peers and consent authority it calls.
struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// Reads the certificate chain and key the `tls` section names.
    fn load(config: &ServerConfig) -> Result<Self, ServerError> {
        Ok(Self {
            chain: load_certs(&config.tls.cert)?,
            key: load_key(&config.tls.key)?,
        })
    }

    /// The TLS of a port that asks its callers for a client certificate as
    /// `auth` says.
    fn acceptor(&self, auth: ClientAuth) -> Result<TlsAcceptor, ServerError> {
        let tls = server_config(self.chain.clone(), self.key.clone_key(), auth)?;
        Ok(TlsAcceptor::from(Arc::new(tls)))
    }
}

/// The global configuration, downloaded from the sources the anchor names,
/// accepted only if the governance authority's keys verify it, and asked for
/// a new version every `refresh_secs`.
async fn global_conf(config: &ServerConfig) -> Result<GlobalConfHandle, ServerError> {
    let source = config.globalconf.clone();
    let anchor = tokio::task::spawn_blocking(move || source.anchor())
        .await
        .map_err(|e| ServerError::Config(e.to_string()))?
        .map_err(|e| ServerError::Config(e.0))?;
    let conf = watch_conf(anchor, config.globalconf.download(), &config.data_dir).await?;
    Ok(conf)
}

/// What the configuration says of the member's own systems: its
/// information systems, registries, access rules and signing key, each
/// checked (a certificate that does not load, an endpoint that is no
/// address, a key that does not match its certificate).
fn local_of(config: &ServerConfig) -> Result<Local, ServerError> {
    let signer = SigningKey::load(&config.signing.cert, &config.signing.key)?;
    Ok(Local {
        clients: registered_clients(config)?,
        services: registries(config)?,
        policy: AccessPolicy::new(config.access.clone()),
        signer: BatchSigner::start(Arc::new(signer)),
    })
}

/// The information systems allowed on the client port, by the client
/// certificate registered for each.
fn registered_clients(
    config: &ServerConfig,
) -> Result<HashMap<SubsystemId, RegisteredClient>, ServerError> {
    let mut clients = HashMap::new();
    for c in &config.clients {
        clients.insert(
            c.id.clone(),
            RegisteredClient::of(load_certs(&c.cert)?[0].as_ref())?,
        );
    }
    Ok(clients)
}

/// The registries this server provides, by service; an endpoint that is not
/// a usable address is a configuration error.
fn registries(config: &ServerConfig) -> Result<HashMap<SubsystemId, Registry>, ServerError> {
    let mut services = HashMap::new();
    for s in &config.services {
        let registry = Registry::new(
            &s.endpoint,
            config.limits.connect_timeout(),
            config.limits.max_body_bytes,
        )
        .map_err(|e| {
            ServerError::Config(format!("service {}: endpoint {:?}: {e}", s.id, s.endpoint))
        })?;
        services.insert(s.id.clone(), registry);
    }
    Ok(services)
}

/// True if the client port is plaintext. Its callers are then not
/// authenticated, so that is refused unless it listens on loopback.
fn plaintext_client(config: &ServerConfig, client: &TcpListener) -> Result<bool, ServerError> {
    let plaintext = config.listen.plaintext_client;
    if plaintext && !client.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
        return Err(ServerError::Config(
            "listen.plaintext_client is for development and needs a loopback client address".into(),
        ));
    }
    Ok(plaintext)
}

/// The fingerprints of the client certificates `operators` lists: the only
/// callers the admin port's `AuditService` answers.
fn operator_fingerprints(config: &ServerConfig) -> Result<Vec<Fingerprint>, ServerError> {
    let operators = config
        .operators
        .iter()
        .map(|p| cert_fingerprint(p))
        .collect::<Result<_, _>>()?;
    Ok(operators)
}

/// Consent: use counts in the same store family as the audit log, and
/// revocations pushed by the consent authority the global configuration
/// names (the feed waits while it names none).
async fn consent(
    config: &ServerConfig,
    conf: &GlobalConfHandle,
    identity: &TlsIdentity,
) -> Result<(ConsentVerifier, RevocationFeed), ServerError> {
    let uses =
        kopir_consent::store::open(&config.data_dir, config.audit.database.as_deref()).await?;
    let revocations = RevocationFeed::spawn(
        conf.clone(),
        (identity.chain.clone(), identity.key.clone_key()),
        RevocationSet::new(DEFAULT_MAX_SILENCE),
        FeedOptions {
            connect_timeout: config.limits.connect_timeout(),
            ..FeedOptions::default()
        },
    );
    let verifier = ConsentVerifier::new(revocations.set().clone(), uses);
    Ok((verifier, revocations))
}

/// Serves the client, peer and admin ports on their listeners, each behind
/// its TLS, the edge limits and its own call budget, with the tasks that run
/// beside them: the health status and the summaries of refused unknown
/// callers. All of them stop when the returned server shuts down.
fn serve_ports(
    config: &ServerConfig,
    listeners: Listeners,
    parts: Parts,
) -> Result<RunningServer, ServerError> {
    let Parts {
        gw,
        audit,
        revocations,
        operators,
        client_tls,
        peer_tls,
    } = parts;
    let (shutdown, _) = watch::channel(false);
    let edge = edge_limits(config, 2 + usize::from(listeners.admin.is_some()));
    let serve = |listener, tls, service| {
        tokio::spawn(kopir_edge::serve(
            listener,
            tls,
            service,
            edge.clone(),
            shutdown.subscribe(),
        ))
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut stop = shutdown.subscribe();
    tokio::spawn(report_health(health, gw.conf.clone(), async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let client_addr = local_addr(&listeners.client, config.listen.client)?;
    let peer_addr = local_addr(&listeners.peer, config.listen.peer)?;
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());

    let client_tls = (!gw.plaintext_clients).then_some(client_tls);
    let client = client_port(&gw, open_routes(&health_service)?);
    let mut tasks = vec![serve(listeners.client, client_tls, client)];
    let peer = peer_port(&gw, open_routes(&health_service)?, audit.clone());
    tasks.push(serve(listeners.peer, Some(peer_tls.clone()), peer));
    if let Some(listener) = listeners.admin {
        let admin = admin_port(&gw, open_routes(&health_service)?, audit, operators);
        tasks.push(serve(listener, Some(peer_tls), admin));
    }
    // Refused unknown callers, summed up (and written once more at shutdown).
    tasks.push(tokio::spawn(write_summaries(
        gw.unknown.clone(),
        gw.audit.clone(),
        gw.limits.unknown_caller_summary(),
        shutdown.subscribe(),
    )));
    tracing::info!(server = %gw.server_id, %client_addr, %peer_addr, ?admin_addr, "security server started");
    Ok(RunningServer {
        client_addr,
        peer_addr,
        admin_addr,
        gw,
        shutdown,
        tasks,
        revocations,
    })
}

/// The configured edge limits, with the connections per port cut to what the
/// process's open-files limit (raised to its hard limit first) allows across
/// `ports` ports.
fn edge_limits(config: &ServerConfig, ports: usize) -> EdgeLimits {
    EdgeLimits {
        max_connections: kopir_edge::fds::connections_per_port(
            kopir_edge::fds::raise_nofile_limit(),
            ports,
            config.edge.max_connections,
        ),
        ..config.edge.clone()
    }
}

/// Where `listener` listens; a failure to say is reported against the
/// configured address `addr`.
fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
    listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The routes every port opens to any caller ([`open_route`]): health and
/// reflection.
fn open_routes(health: &HealthServer<impl Health>) -> Result<Routes, ServerError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection: {e}")))?;
    Ok(Routes::new(health.clone()).add_service(reflection))
}

/// Client port: the open routes, and the pass-through to
/// [`consumer::handle`] for every other path.
fn client_port(gw: &Arc<Gateway>, open: Routes) -> PortGate<Routes> {
    let passthrough = {
        let gw = gw.clone();
        tower::service_fn(move |req| {
            // Each exchange runs as a task of its own, so that a caller that
            // gives up does not cut its audit trail short (see `consumer`).
            let work = tokio::spawn(consumer::handle(gw.clone(), req));
            async move {
                Ok::<_, Infallible>(match work.await {
                    Ok(response) => response,
                    Err(e) => crate::exchange::panicked(&e).map(axum::body::Body::new),
                })
            }
        })
    };
    let router = open.into_axum_router().fallback_service(passthrough);
    port_service(
        gw,
        gw.client_calls.clone(),
        Routes::from(router),
        client_admission(),
    )
}

/// Peer port: the open routes, the exchange protocol behind its door
/// ([`PeerGate`]), and the access report.
fn peer_port(gw: &Arc<Gateway>, open: Routes, audit: Arc<AuditHandle>) -> PortGate<Routes> {
    let peer_calls = CallBudget::for_port(&gw.limits);
    let exchange = PeerGate::new(
        ExchangeServer::new(Provider::new(gw.clone()))
            .max_decoding_message_size(gw.limits.max_body_bytes + ENVELOPE_ALLOWANCE)
            .max_encoding_message_size(gw.limits.max_body_bytes + ENVELOPE_ALLOWANCE),
        gw.clone(),
        peer_calls.clone(),
    );
    let report = ReportService::new(
        audit,
        gw.conf.clone(),
        gw.server_id.clone(),
        gw.limits.max_clock_skew_ms,
    );
    let routes = open.add_service(exchange).add_service(report.into_server());
    port_service(gw, peer_calls, routes, peer_admission(gw.conf.clone()))
}

/// Admin port: the open routes (health stays open to probes), and the audit
/// log and the server's status for operators only.
fn admin_port(
    gw: &Gateway,
    open: Routes,
    audit: Arc<AuditHandle>,
    operators: Vec<Fingerprint>,
) -> PortGate<Routes> {
    let operators = Arc::new(operators);
    let audit = tonic::service::interceptor::InterceptedService::new(
        AuditServiceImpl::new(audit)
            .with_conf(gw.conf.clone())
            .into_server(),
        operator_check(operators.clone()),
    );
    let status = tonic::service::interceptor::InterceptedService::new(
        StatusService::new(gw.conf.clone()),
        operator_check(operators.clone()),
    );
    port_service(
        gw,
        CallBudget::for_port(&gw.limits),
        open.add_service(audit).add_service(status),
        admin_admission(operators),
    )
}

/// Keeps the health status in line with the global configuration: a server
/// that would refuse every exchange reports NOT_SERVING.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    conf: kopir_core::globalconf::GlobalConfHandle,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let status = if conf.current().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for name in ["", "kopir.v1.Exchange", "kopir.v1.AccessReport"] {
                reporter.set_service_status(name, status).await;
            }
            last = Some(status);
        }
    }
}
