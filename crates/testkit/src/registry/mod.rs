//! The mock registries behind the demo's provider security servers: the
//! population, declared-income and real-estate registers, answering plaintext
//! gRPC from deterministic synthetic data.
//!
//! - `data`: the data model ([`Dataset`], [`Person`], [`Declaration`],
//!   [`Property`]) and its queries, including the demo citizens
//!   ([`Dataset::sample_parents`]);
//! - `synth`: [`Dataset::generate`], the seeded generator (word lists in
//!   `lexicon`);
//! - `service`: the tonic services and the conversion to protobuf messages;
//! - `kind`: [`RegistryKind`], names, default subsystem ids and gRPC names;
//! - this module: [`serve`] one registry (with health and reflection) on a
//!   bound listener, or [`RegistryHandle::spawn`] it in the background.

mod data;
mod kind;
mod lexicon;
mod service;
mod synth;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::util::MapRequestLayer;

pub use data::{
    ASKABLE_TAX_YEARS, Address, DEFAULT_FAMILIES, DEFAULT_SEED, Dataset, Declaration, INCOME_YEARS,
    IncomeKind, IncomeSource, LAST_TAX_YEAR, Ownership, Person, Property, PropertyKind,
    REFERENCE_DATE, Sex, YOUNG_CHILD_BORN_FROM,
};
pub use kind::{RegistryKind, UnknownRegistryKind};
pub use service::{IncomeRegistry, PopulationRegistry, RealtyRegistry};

use kopir_proto::FILE_DESCRIPTOR_SET;

/// Why a registry could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("registry server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("registry server task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Serves one registry on an already-bound listener until `shutdown` resolves:
/// plaintext HTTP/2 gRPC with the registry's service, the standard health
/// service (SERVING for the registry's service name and for `""`) and server
/// reflection (v1 and v1alpha). Each call of a registry method adds one to
/// `calls` (so tests can tell whether a request reached the registry).
pub async fn serve(
    kind: RegistryKind,
    dataset: Arc<Dataset>,
    listener: TcpListener,
    calls: Arc<AtomicU64>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let registry_prefix = format!("/{}/", kind.grpc_service_name());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(kind.grpc_service_name(), ServingStatus::Serving)
        .await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection = |own: &str| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(kind.grpc_service_name())
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(own)
    };
    // The descriptor sets are compiled in (and tested), so this cannot fail in
    // practice; if it did, the registry still serves, without reflection.
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .inspect_err(|e| tracing::warn!(error = %e, "registry: reflection v1 disabled"))
        .ok();
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .inspect_err(|e| tracing::warn!(error = %e, "registry: reflection v1alpha disabled"))
        .ok();

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(registry = %kind, %addr, persons = dataset.persons().len(), "registry serving");
    }
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            // Small unary calls: do not wait for Nagle.
            let _ = stream.set_nodelay(true);
        })
    });

    let count = MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
        if req.uri().path().starts_with(&registry_prefix) {
            calls.fetch_add(1, Ordering::Relaxed);
        }
        req
    });
    let mut server = Server::builder().layer(count);
    let router = server
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha);
    let router = match kind {
        RegistryKind::Population => {
            router.add_service(PopulationRegistry::new(dataset).into_server())
        }
        RegistryKind::Income => router.add_service(IncomeRegistry::new(dataset).into_server()),
        RegistryKind::Realty => router.add_service(RealtyRegistry::new(dataset).into_server()),
    };
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A registry served in the background (tests, the demo). Dropping the handle
/// stops the server too; [`RegistryHandle::shutdown`] also waits for it.
#[derive(Debug)]
pub struct RegistryHandle {
    kind: RegistryKind,
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RegistryHandle {
    /// Binds `addr` (port 0 for any free port, e.g. `127.0.0.1:0`) and serves
    /// `kind` from `dataset` on a spawned task.
    pub(crate) async fn spawn(
        kind: RegistryKind,
        dataset: Arc<Dataset>,
        addr: SocketAddr,
    ) -> Result<Self, RegistryError> {
        let bind_error = |source| RegistryError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let calls = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(kind, dataset, listener, calls.clone(), async move {
            // A send or a dropped sender both mean "stop".
            let _ = stop.await;
        }));
        Ok(Self {
            kind,
            addr: bound,
            calls,
            shutdown,
            task,
        })
    }

    /// Which registry this is.
    pub(crate) fn kind(&self) -> RegistryKind {
        self.kind
    }

    /// How many registry method calls it has received.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The address actually bound.
    #[cfg(test)]
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for a tonic client or a security server's registry address.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server gracefully and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), RegistryError> {
        let _ = self.shutdown.send(());
        self.task.await??;
        Ok(())
    }
}
