//! The door of the peer port's `kopir.v1.Exchange`, in front of the
//! [`provider`](crate::exchange::provider): before a request's body is read, the TLS
//! peer must be a security server the global configuration pins; only then
//! does it take a permit of its share of the port's call budget, and its body
//! must arrive within the body-read timeout and the call's deadline. A caller
//! that is nobody is refused at once, counted in a summary rather than audited
//! one by one ([`crate::exchange::unknown`]), and can hold nothing.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tonic::{body::Body, server::NamedService};
use tower::Service;

use crate::exchange::{Gateway, Known, consumer::conf_refusal, record_refusal, unknown::Source};
use kopir_audit::Side;
use kopir_core::deadline;
use kopir_core::{
    error::{Reason, Refusal},
    id::ServerId,
};
use kopir_edge::overload::{CallBudget, Caller, peer_fingerprint};

/// Room for the envelope around a message of the largest body allowed.
pub(crate) const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// [`crate::exchange::provider::Provider`]'s service behind the door.
#[derive(Clone)]
pub(crate) struct PeerGate<S> {
    inner: S,
    gw: Arc<Gateway>,
    budget: CallBudget,
}

impl<S> PeerGate<S> {
    /// `inner` (the exchange service) behind the door, with the peer port's
    /// call budget.
    pub(crate) fn new(inner: S, gw: Arc<Gateway>, budget: CallBudget) -> Self {
        Self { inner, gw, budget }
    }
}

impl<S: NamedService> NamedService for PeerGate<S> {
    const NAME: &'static str = S::NAME;
}

/// The pinned security server a request came from, by its TLS certificate.
fn pinned_peer(gw: &Gateway, request: &http::Request<Body>) -> Result<ServerId, Refusal> {
    let fp = peer_fingerprint(request).ok_or_else(|| {
        Refusal::new(
            Reason::PeerCertificateMissing,
            "present this security server's TLS certificate",
        )
    })?;
    let view = gw.conf.current().map_err(conf_refusal)?;
    view.server_by_tls(&fp).cloned().ok_or_else(|| {
        Refusal::new(
            Reason::PeerUnknown,
            format!(
                "the TLS certificate {fp} is not a security server certificate in global configuration {}",
                view.serial()
            ),
        )
    })
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for PeerGate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let deadline =
            deadline::Deadline::from_headers(request.headers(), self.gw.limits.timeout());
        let gw = self.gw.clone();
        let budget = self.budget.clone();
        // The clone that was made ready goes with this call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        // The call runs as a task of its own, holding its permit: a caller that
        // resets the stream stops waiting for the answer, not the work, so an
        // accepted request always ends with its outcome in the audit log.
        let work = tokio::spawn(async move {
            let refuse = |r: Refusal| r.to_status(None).into_http();
            let peer = match pinned_peer(&gw, &request) {
                Ok(peer) => peer,
                Err(refusal) => {
                    gw.unknown
                        .refused(Side::Provider, Source::of(&request), &refusal);
                    return refuse(refusal);
                }
            };
            let _permit = match budget.try_acquire(Caller::Known(format!("security server {peer}")))
            {
                Ok(permit) => permit,
                Err(refusal) => return refuse(refusal),
            };
            let (mut parts, body) = request.into_parts();
            let limit = gw.limits.max_body_bytes + ENVELOPE_ALLOWANCE;
            let read = async {
                match Limited::new(body, limit).collect().await {
                    Ok(all) => Ok(all.to_bytes()),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::new(
                        Reason::BodyTooLarge,
                        format!("the request exceeds this server's limit of {limit} bytes"),
                    )),
                    Err(e) => Err(Refusal::new(
                        Reason::MetadataInvalid,
                        format!("the request body could not be read: {e}"),
                    )),
                }
            };
            let body: Bytes =
                match deadline::read_body(&deadline, gw.limits.body_read_timeout(), read).await {
                    Ok(body) => body,
                    Err(refusal) => {
                        // The body, and the header in it, never arrived.
                        let mut known = Known::new(
                            Side::Provider,
                            uuid::Uuid::new_v4().to_string(),
                        )
                        .unparsed("", "", parts.uri.path(), "");
                        known.learn_peer(peer.to_string());
                        record_refusal(&*gw.audit, &known, &refusal).await;
                        return refuse(refusal);
                    }
                };
            parts.extensions.insert(deadline);
            let request = http::Request::from_parts(parts, Body::new(Full::new(body)));
            match inner.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        });
        Box::pin(async move { Ok(work.await.unwrap_or_else(|e| crate::exchange::panicked(&e))) })
    }
}
