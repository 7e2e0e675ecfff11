//! A request body that is read to its end even when the service answers
//! without it.
//!
//! kopir refuses many calls before reading their body (an unknown caller, a
//! refused access): that is the point of refusing early. But the HTTP/2
//! library charges every small DATA frame it holds for a stream against a
//! per-connection budget, and a frame that arrives after the service dropped
//! the body is held and never given back; after a few thousand early refusals
//! on one connection the budget is gone and the library closes the connection
//! with `ENHANCE_YOUR_CALM`, failing every call on it with a transport error.
//! So a body dropped before its end is read on in the background (at most
//! [`DRAIN_BYTES`], for at most [`DRAIN_TIME`]) and its frames are
//! discarded, which gives them back.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The most a dropped body is read for.
pub(crate) const DRAIN_TIME: Duration = Duration::from_secs(1);
/// The most bytes read from a dropped body.
pub(crate) const DRAIN_BYTES: usize = 1 << 20;

/// A request body that drains itself if dropped before its end.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
}

impl RequestBody {
    /// Wraps a request body.
    pub fn new(inner: Incoming) -> Self {
        Self { inner: Some(inner) }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        if inner.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut read = 0;
                while let Some(Ok(frame)) = inner.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_BYTES {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}
