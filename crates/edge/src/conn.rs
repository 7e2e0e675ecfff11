//! One connection: hyper's server (HTTP/2, or HTTP/1.1 and HTTP/2 on a web
//! endpoint) with the port's limits, the connection's identity added to
//! every request, an idle timeout, and a bounded drain when the server stops.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::BodyExt;
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulConnection},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tower::Service;

use super::{EdgeLimits, body::RequestBody};

/// What a port serves: a gRPC service (tonic's routes, behind kopir's layers).
pub trait PortService:
    Service<
        http::Request<RequestBody>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> PortService for S where
    S: Service<
            http::Request<RequestBody>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Calls in progress on a connection, and a count of calls begun and ended
/// that tells whether any came and went in a span of time.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    events: AtomicU64,
}

/// A call in progress; ends when dropped.
pub(crate) struct Call(Arc<Activity>);

impl Activity {
    /// Whether a call is in progress.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn begin(self: &Arc<Self>) -> Call {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        Call(self.clone())
    }

    /// Resolves once the connection has had no call in progress, and none
    /// begun or ended, for a whole span of `after`.
    async fn idle(&self, after: Duration) {
        loop {
            let seen = self.events.load(Ordering::Relaxed);
            tokio::time::sleep(after).await;
            if self.in_flight.load(Ordering::Relaxed) == 0
                && self.events.load(Ordering::Relaxed) == seen
            {
                return;
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// The port's service on one connection: adds the connection's identity
/// (`info`: the TLS peer certificates, the addresses) to each request, as
/// tonic's own server does, gives it a body that is drained if the service
/// answers without reading it ([`RequestBody`]), and counts the calls in
/// progress.
#[derive(Clone)]
struct OnConnection<S, C> {
    inner: S,
    info: C,
    activity: Arc<Activity>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, C> Service<http::Request<Incoming>> for OnConnection<S, C>
where
    S: PortService,
    C: Clone + Send + Sync + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let mut request = request.map(RequestBody::new);
        request.extensions_mut().insert(self.info.clone());
        let call = self.activity.begin();
        let answer = self.inner.call(request);
        Box::pin(async move {
            // The call lasts until its response body is done (a stream may
            // outlive the handler by hours).
            let answer = answer.await?;
            Ok(answer.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    let _ = &call;
                    frame
                }))
            }))
        })
    }
}

/// Sets the port's HTTP/2 limits on hyper's HTTP/2 builder or on the HTTP/2
/// half of its automatic one (two types with the same methods).
macro_rules! http2_limits {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams($limits.max_concurrent_streams)
            .max_header_list_size($limits.max_header_list_bytes)
            .max_pending_accept_reset_streams($limits.max_pending_reset_streams)
            .keep_alive_interval(Duration::from_millis($limits.keepalive_interval_ms.max(1)))
            .keep_alive_timeout(Duration::from_millis($limits.keepalive_timeout_ms.max(1)))
    };
}

/// The HTTP versions a port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocols {
    /// HTTP/2 only: gRPC ports.
    Http2,
    /// HTTP/1.1 and HTTP/2, told apart by the connection preface: web
    /// endpoints that plain HTTP clients and mirrors fetch from.
    Http1And2,
}

/// How a port serves each of its connections.
#[derive(Debug)]
pub(crate) struct Settings {
    /// The port's limits.
    pub(crate) limits: EdgeLimits,
    /// The HTTP versions it speaks.
    pub(crate) protocols: Protocols,
}

/// Serves one connection until the client closes it, it has been idle for the
/// idle timeout, `give_way` resolves (the port is full and a newer connection
/// takes the place of this idle one) or `stop` turns true; all but the first
/// close it gracefully (an HTTP/2 GOAWAY) and give calls in progress the drain
/// timeout to finish. `activity` counts the connection's calls.
pub(crate) async fn serve<I, C, S>(
    io: I,
    info: C,
    service: S,
    settings: &Settings,
    stop: watch::Receiver<bool>,
    activity: Arc<Activity>,
    give_way: impl std::future::Future<Output = ()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
    S: PortService,
{
    let service = TowerToHyperService::new(OnConnection {
        inner: service,
        info,
        activity: activity.clone(),
    });
    let io = TokioIo::new(io);
    let limits = &settings.limits;
    match settings.protocols {
        Protocols::Http2 => {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            http2_limits!(builder, limits);
            let connection = builder.serve_connection(io, service);
            drive(connection, limits, stop, &activity, give_way).await;
        }
        Protocols::Http1And2 => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.handshake_timeout())
                .max_buf_size(
                    usize::try_from(limits.max_header_list_bytes.max(8192)).unwrap_or(8192),
                );
            http2_limits!(builder.http2(), limits);
            let connection = builder.serve_connection(io, service);
            drive(connection, limits, stop, &activity, give_way).await;
        }
    }
}

/// Runs `connection` until it ends, or until it is idle, must give way or the
/// server stops; then closes it gracefully within the drain timeout.
async fn drive<G>(
    connection: G,
    limits: &EdgeLimits,
    mut stop: watch::Receiver<bool>,
    activity: &Activity,
    give_way: impl std::future::Future<Output = ()>,
) where
    G: GracefulConnection,
    G::Error: std::fmt::Debug + std::fmt::Display,
{
    tokio::pin!(connection);
    let why = tokio::select! {
        ended = connection.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(error = ?e, "connection ended with an error");
            }
            return;
        }
        _ = activity.idle(limits.idle_timeout()) => "idle",
        _ = give_way => "the port is full: a newer connection takes the place of this idle one",
        _ = stop.wait_for(|s| *s) => "server stopping",
    };
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.drain_timeout(), connection).await {
        Ok(Ok(())) => tracing::debug!(why, "connection closed"),
        Ok(Err(e)) => tracing::debug!(why, error = %e, "connection closed with an error"),
        Err(_) => tracing::debug!(why, "connection closed at the end of the drain timeout"),
    }
}
