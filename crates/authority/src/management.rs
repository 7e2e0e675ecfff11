//! The authority's management port (gRPC over TLS, `proto/kopir/v1/
//! management.proto`): `Registration` for anyone (a new member has no
//! registered identity yet; a client certificate, when presented, is what
//! proves a new server's TLS key), `RequestAdmin` for the authority's
//! operators (their client certificates, pinned). The port is served by
//! `kopir-edge` like every other: whoever reaches it may be hostile.

use std::sync::Arc;

use kopir_core::{
    config::Limits,
    error::{Reason, Refusal},
    pki::{
        Fingerprint, PkiError,
        tls::{ClientAuth, server_config},
    },
};
use kopir_edge::{
    EdgeLimits,
    overload::{Admission, Admit, CallBudget, Caller, PortGateLayer},
};
use kopir_proto::v1::{
    Decide, GetManagementRequest, ListManagementRequests, ListManagementRequestsResponse,
    ManagementRequest, SubmitRequest,
    registration_server::{Registration, RegistrationServer},
    request_admin_server::{RequestAdmin, RequestAdminServer},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
};
use tokio_rustls::{TlsAcceptor, rustls};
use tonic::{Request, Response, Status, service::Routes};
use tower::Layer;

use crate::registry::{Entry, Registry, State};

fn rfc3339(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_default()
}

fn message(entry: &Entry) -> ManagementRequest {
    let (member, changes) = entry.summary();
    ManagementRequest {
        id: entry.id.clone(),
        state: entry.state.as_str().into(),
        member,
        changes,
        submitted_at: rfc3339(Some(entry.submitted_at)),
        decided_at: rfc3339(entry.decided_at),
        why: entry.why.clone(),
        in_serial: entry.in_serial.unwrap_or_default(),
    }
}

fn client_cert<T>(request: &Request<T>) -> Option<Vec<u8>> {
    request
        .peer_certs()
        .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
}

/// `kopir.v1.Registration`.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    registry: Arc<Registry>,
    changed: Arc<Notify>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<ManagementRequest>, Status> {
        let cert = client_cert(&request);
        let entry = self
            .registry
            .submit(&request.get_ref().request, cert.as_deref())
            .await
            .map_err(|e| e.0.to_status(None))?;
        if entry.state == State::Approved {
            self.changed.notify_one();
        }
        Ok(Response::new(message(&entry)))
    }

    async fn get(
        &self,
        request: Request<GetManagementRequest>,
    ) -> Result<Response<ManagementRequest>, Status> {
        let entry = self
            .registry
            .get(&request.get_ref().id)
            .map_err(|e| e.0.to_status(None))?;
        Ok(Response::new(message(&entry)))
    }
}

/// `kopir.v1.RequestAdmin`, for the operators whose certificates it pins.
#[derive(Debug, Clone)]
pub struct AdminService {
    registry: Arc<Registry>,
    operators: Arc<Vec<Fingerprint>>,
    changed: Arc<Notify>,
}

impl AdminService {
    fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let refuse = |why: String| Refusal::new(Reason::OperatorUnknown, why).to_status(None);
        let fp = client_cert(request)
            .map(|c| Fingerprint::of(&c))
            .ok_or_else(|| refuse("present an operator's TLS client certificate".into()))?;
        if self.operators.contains(&fp) {
            Ok(format!("operator {fp}"))
        } else {
            Err(refuse(format!(
                "certificate {fp} is not one of the authority's operators (--operator)"
            )))
        }
    }

    async fn decide(
        &self,
        request: Request<Decide>,
        approve: bool,
    ) -> Result<Response<ManagementRequest>, Status> {
        let by = self.operator(&request)?;
        let Decide { id, why } = request.into_inner();
        if !approve && why.trim().is_empty() {
            return Err(
                Refusal::new(Reason::RequestInvalid, "say why the request is rejected")
                    .to_status(None),
            );
        }
        let entry = self
            .registry
            .decide(&id, approve, &why, &by)
            .await
            .map_err(|e| e.0.to_status(None))?;
        if approve {
            self.changed.notify_one();
        }
        Ok(Response::new(message(&entry)))
    }
}

#[tonic::async_trait]
impl RequestAdmin for AdminService {
    async fn list(
        &self,
        request: Request<ListManagementRequests>,
    ) -> Result<Response<ListManagementRequestsResponse>, Status> {
        self.operator(&request)?;
        let state = match request.get_ref().state.as_str() {
            "" => None,
            "pending" => Some(State::Pending),
            "approved" => Some(State::Approved),
            "rejected" => Some(State::Rejected),
            other => {
                return Err(Refusal::new(
                    Reason::RequestInvalid,
                    format!("state {other:?} is none of pending, approved, rejected"),
                )
                .to_status(None));
            }
        };
        Ok(Response::new(ListManagementRequestsResponse {
            requests: self.registry.list(state).iter().map(message).collect(),
        }))
    }

    async fn approve(
        &self,
        request: Request<Decide>,
    ) -> Result<Response<ManagementRequest>, Status> {
        self.decide(request, true).await
    }

    async fn reject(
        &self,
        request: Request<Decide>,
    ) -> Result<Response<ManagementRequest>, Status> {
        self.decide(request, false).await
    }
}

/// Serves the management port on `listener` until `stop`, with the TLS
/// identity `chain`/`key`; `changed` is told when a request is approved
/// (the authority then signs a new configuration at once).
pub async fn serve(
    listener: TcpListener,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    registry: Arc<Registry>,
    operators: Vec<Fingerprint>,
    changed: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> Result<(), PkiError> {
    let tls: rustls::ServerConfig = server_config(chain, key, ClientAuth::Requested)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (_health, health_service) = tonic_health::server::health_reporter();
    let routes = Routes::new(health_service)
        .add_service(RegistrationServer::new(RegistrationService {
            registry: registry.clone(),
            changed: changed.clone(),
        }))
        .add_service(RequestAdminServer::new(AdminService {
            registry,
            operators: Arc::new(operators),
            changed,
        }));
    let limits = Limits::default();
    let admit: Admit = Arc::new(|_, cert| {
        Admission::Gated(cert.map_or(Caller::Anonymous, |c| {
            Caller::Known(format!("certificate {}", Fingerprint::of(c)))
        }))
    });
    let routes = PortGateLayer::new(CallBudget::for_port(&limits), admit, limits.timeout())
        .layer(routes.prepare());
    kopir_edge::serve(
        listener,
        Some(acceptor),
        routes,
        EdgeLimits::default(),
        stop,
    )
    .await;
    Ok(())
}
