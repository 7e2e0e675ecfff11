//! Load shedding: each port has a budget of calls processed at once
//! (`limits.max_concurrent_calls`), and no single caller may hold more than its
//! share of it (`limits.max_calls_per_caller`). A call beyond either is
//! answered at once with `RESOURCE_EXHAUSTED` and the `kopir-error` trailer
//! `server.overloaded`, rather than queued: nothing waits for capacity, so no
//! queue grows under overload, and the caller learns within microseconds that
//! it should back off.
//!
//! A permit is taken only once the caller is known (an information system
//! authenticated by its registered certificate, a security server by its
//! pinned one, an operator, a portal): a caller that is nobody is refused
//! before it can hold anything, and one caller holding every stream it may
//! open leaves the rest of the budget to the others. Callers the port cannot
//! name (of health checks and reflection) share one share between them.
//! Within a caller's share, one connection may hold at most the HTTP/2
//! streams the edge advertises (`edge.max_concurrent_streams`).
//!
//! [`PortGate`] applies the budget to a port's plain gRPC routes, together
//! with a backstop for the call's deadline; the exchange paths take their
//! permits themselves, at the point in the security path where the caller
//! has been authenticated.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tower::{Layer, Service};

use kopir_core::{
    deadline::Deadline,
    error::{Reason, Refusal},
    pki::Fingerprint,
};

/// Who holds a permit: a known identity, or the share of callers a port
/// cannot name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A known identity (a subsystem, a security server, an operator...).
    Known(String),
    /// Anyone else, on routes open to anyone (health, reflection).
    Anonymous,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Known(who) => f.write_str(who),
            Caller::Anonymous => f.write_str("callers without a known identity"),
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_caller: HashMap<Caller, usize>,
}

/// One port's budget of calls at once, and each caller's share of it.
#[derive(Debug, Clone)]
pub struct CallBudget {
    held: Arc<Mutex<Held>>,
    limit: usize,
    per_caller: usize,
}

impl CallBudget {
    /// The budget of one port under `limits`, with each caller's share.
    pub fn for_port(limits: &kopir_core::config::Limits) -> Self {
        Self::new(limits.max_concurrent_calls, limits.per_caller_calls())
    }

    /// A budget of `limit` calls at once, at most `per_caller` for one caller.
    pub fn new(limit: usize, per_caller: usize) -> Self {
        let limit = limit.max(1);
        Self {
            held: Arc::default(),
            limit,
            per_caller: per_caller.clamp(1, limit),
        }
    }

    /// A permit for one call of `caller`, or the `server.overloaded` refusal
    /// that says which limit was reached.
    pub fn try_acquire(&self, caller: Caller) -> Result<CallPermit, Refusal> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.total >= self.limit {
            return Err(Refusal::new(
                Reason::Overloaded,
                format!(
                    "this port is processing its limit of {} calls; retry after a short backoff",
                    self.limit
                ),
            ));
        }
        let mine = held.by_caller.entry(caller.clone()).or_default();
        if *mine >= self.per_caller {
            return Err(Refusal::new(
                Reason::Overloaded,
                format!(
                    "{caller} already has {} calls in progress on this port, the most one caller may; \
                     retry after a short backoff",
                    self.per_caller
                ),
            ));
        }
        *mine += 1;
        held.total += 1;
        Ok(CallPermit {
            held: self.held.clone(),
            caller,
        })
    }

    /// Calls in progress (all callers).
    pub fn in_use(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One call's place in a [`CallBudget`]; given back when dropped.
#[derive(Debug)]
pub struct CallPermit {
    held: Arc<Mutex<Held>>,
    caller: Caller,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total -= 1;
        if let Some(n) = held.by_caller.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                held.by_caller.remove(&self.caller);
            }
        }
    }
}

/// How a port gate treats a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The route takes its permit itself once it knows the caller, and keeps
    /// its own deadlines (the exchange paths).
    SelfManaged,
    /// The gate takes a permit for this caller and bounds the call by its
    /// deadline.
    Gated(Caller),
}

/// Decides how a port treats a request, from its path and the TLS client
/// certificate (DER) it came with.
pub type Admit = Arc<dyn Fn(&str, Option<&[u8]>) -> Admission + Send + Sync>;

/// Time a gated call may take beyond its deadline before the gate answers
/// `DEADLINE_EXCEEDED` itself (the handler's own answer normally comes first).
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// The layer in front of a port's routes: see [`PortGate`].
#[derive(Clone)]
pub struct PortGateLayer {
    budget: CallBudget,
    admit: Admit,
    max_deadline: Duration,
}

impl PortGateLayer {
    /// A gate over `budget` that sorts requests with `admit`; a gated call's
    /// deadline is its `grpc-timeout`, at most `max_deadline`.
    pub fn new(budget: CallBudget, admit: Admit, max_deadline: Duration) -> Self {
        Self {
            budget,
            admit,
            max_deadline,
        }
    }
}

impl<S> Layer<S> for PortGateLayer {
    type Service = PortGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PortGate {
            inner,
            layer: self.clone(),
        }
    }
}

/// A port's routes behind its call budget: a gated call holds a permit of its
/// caller's share until its response begins, and is answered
/// `DEADLINE_EXCEEDED` if its handler outlives the deadline.
#[derive(Clone)]
pub struct PortGate<S> {
    inner: S,
    layer: PortGateLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The TLS client certificate chain a request came with.
pub(crate) fn peer_certs<B>(
    request: &http::Request<B>,
) -> Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
}

/// The fingerprint of the TLS client certificate a request came with.
pub fn peer_fingerprint<B>(request: &http::Request<B>) -> Option<Fingerprint> {
    let certs = peer_certs(request)?;
    certs.first().map(|c| Fingerprint::of(c.as_ref()))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for PortGate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let certs = peer_certs(&request);
        let cert = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        let caller = match (self.layer.admit)(request.uri().path(), cert) {
            Admission::SelfManaged => return Box::pin(self.inner.call(request)),
            Admission::Gated(caller) => caller,
        };
        let permit = match self.layer.budget.try_acquire(caller) {
            Ok(permit) => permit,
            Err(refusal) => {
                let response = refusal.to_status(None).into_http();
                return Box::pin(async move { Ok(response) });
            }
        };
        let deadline = Deadline::from_headers(request.headers(), self.layer.max_deadline);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let backstop = deadline.instant() + DEADLINE_GRACE;
            let answer = tokio::time::timeout_at(backstop, answer).await;
            drop(permit);
            match answer {
                Ok(answer) => answer,
                Err(_) => Ok(deadline
                    .exceeded("this server was answering")
                    .to_status(None)
                    .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use tower::ServiceExt;

    fn reason(response: &http::Response<String>) -> (tonic::Code, String) {
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        let reason = status.metadata().get(kopir_core::error::ERROR_KEY).unwrap();
        (status.code(), reason.to_str().unwrap().to_owned())
    }

    fn known(who: &str) -> Caller {
        Caller::Known(who.into())
    }

    #[test]
    fn one_caller_cannot_take_more_than_its_share() {
        let budget = CallBudget::new(4, 2);
        let a1 = budget.try_acquire(known("a")).unwrap();
        let _a2 = budget.try_acquire(known("a")).unwrap();
        let refused = budget.try_acquire(known("a")).unwrap_err();
        assert_eq!(refused.reason, Reason::Overloaded);
        assert!(refused.message.contains("a already has 2 calls"));
        // Others still get in, up to the port's limit.
        let _b1 = budget.try_acquire(known("b")).unwrap();
        let _n1 = budget.try_acquire(Caller::Anonymous).unwrap();
        let full = budget.try_acquire(known("c")).unwrap_err();
        assert!(full.message.contains("limit of 4 calls"));
        // A permit comes back when its call ends.
        drop(a1);
        assert_eq!(budget.in_use(), 3);
        let _c1 = budget.try_acquire(known("c")).unwrap();
    }

    #[tokio::test]
    async fn beyond_the_share_calls_are_shed_with_the_reason() {
        let (release, released) = tokio::sync::watch::channel(false);
        let slow = tower::service_fn(move |_: http::Request<()>| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(http::Response::new(String::from("ok")))
            }
        });
        let admit: Admit = Arc::new(|path, _| match path {
            "/self" => Admission::SelfManaged,
            _ => Admission::Gated(Caller::Anonymous),
        });
        let layer = PortGateLayer::new(CallBudget::new(8, 2), admit, Duration::from_secs(30));
        let svc = layer.layer(slow);
        let call = |path: &str| {
            svc.clone()
                .oneshot(http::Request::builder().uri(path).body(()).unwrap())
        };
        let held: Vec<_> = (0..2).map(|_| tokio::spawn(call("/gated"))).collect();
        tokio::task::yield_now().await;
        let shed = call("/gated").await.unwrap();
        assert_eq!(
            reason(&shed),
            (tonic::Code::ResourceExhausted, "server.overloaded".into())
        );
        // A self-managed route is not counted here.
        let own = tokio::spawn(call("/self"));
        release.send(true).unwrap();
        for h in held {
            assert_eq!(h.await.unwrap().unwrap().into_body(), "ok");
        }
        assert_eq!(own.await.unwrap().unwrap().into_body(), "ok");
        assert_eq!(layer.budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_handler_that_outlives_the_deadline_is_answered_deadline_exceeded() {
        let stuck = tower::service_fn(|_: http::Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(http::Response::new(String::new()))
        });
        let admit: Admit = Arc::new(|_, _| Admission::Gated(Caller::Anonymous));
        let layer = PortGateLayer::new(CallBudget::new(8, 2), admit, Duration::from_secs(30));
        let request = http::Request::builder()
            .uri("/x")
            .header("grpc-timeout", "1n")
            .body(())
            .unwrap();
        let answer = layer.layer(stuck).oneshot(request).await.unwrap();
        assert_eq!(
            reason(&answer),
            (tonic::Code::DeadlineExceeded, "deadline.exceeded".into())
        );
        assert_eq!(layer.budget.in_use(), 0);
    }
}
