//! Load shedding at a port's edge: at most `max_concurrent_calls` calls are
//! processed at once across all of the port's connections; a call beyond
//! that is answered at once with `RESOURCE_EXHAUSTED` and the `kopir-error`
//! trailer `server.overloaded`, rather than queued. Nothing waits for
//! capacity, so no queue grows under overload and memory stays bounded; the
//! caller learns within microseconds that it should back off or retry.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::error::{Reason, Refusal};

/// The layer: one budget of calls shared by every connection of a port.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ShedLayer {
    /// A budget of `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: self.permits.clone(),
            limit: self.limit,
        }
    }
}

/// The service [`ShedLayer`] wraps around a port's routes.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Shed<S>
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
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let answer = answer.await;
                    drop(permit);
                    answer
                })
            }
            Err(_) => {
                let refusal = Refusal::new(
                    Reason::Overloaded,
                    format!(
                        "this port is processing its limit of {} calls; retry after a short backoff",
                        self.limit
                    ),
                );
                let response = refusal.to_status(None).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn beyond_the_limit_calls_are_shed_with_the_reason() {
        let (release, released) = tokio::sync::watch::channel(false);
        let slow = tower::service_fn(move |_: http::Request<()>| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(http::Response::new(String::from("ok")))
            }
        });
        let svc = ShedLayer::new(2).layer(slow);
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(http::Request::new(()))))
            .collect();
        tokio::task::yield_now().await;
        let shed = svc.clone().oneshot(http::Request::new(())).await.unwrap();
        let status = tonic::Status::from_header_map(shed.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.metadata().get(crate::error::ERROR_KEY).unwrap(),
            "server.overloaded"
        );
        release.send(true).unwrap();
        for h in held {
            assert_eq!(h.await.unwrap().unwrap().into_body(), "ok");
        }
        // Capacity comes back as calls finish.
        let again = svc.oneshot(http::Request::new(()));
        release.send(true).unwrap();
        assert_eq!(again.await.unwrap().into_body(), "ok");
    }
}
