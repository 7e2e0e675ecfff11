//! Publishing the signed configuration over HTTP(S): a plain `GET` of
//! [`PATH`], answered with the current document, its `ETag` (the SHA-256 of
//! its bytes) and `Cache-Control: no-cache`; a `GET` with a matching
//! `If-None-Match` gets `304 Not Modified` and no body, so a server that
//! polls every minute downloads a document only when it changed.
//!
//! The port is served by `kopir-edge` (connection caps per port and source,
//! TLS handshake and header read timeouts, idle timeout, bounded drain) over
//! HTTP/1.1 and HTTP/2: whoever may reach it may be hostile and hold no
//! certificate. Since the document is signed, plain HTTP is as safe as
//! HTTPS for its integrity; HTTPS keeps who reads what from the network.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    path::Path,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::Full;
use kopir_core::pki::{PkiError, load_certs, load_key, tls::web_server_config};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;

use crate::sign::Signed;

/// Where the current signed configuration is published. The `v1` is the
/// version of this download protocol; the document names its own format.
pub const PATH: &str = "/globalconf/v1/globalconf.json";

/// The header that names the serial of the document in an answer, for
/// operators looking with `curl -I`.
pub const SERIAL_HEADER: &str = "kopir-serial";

/// The document being published, shared by the signer and the port.
#[derive(Debug, Clone, Default)]
pub struct Publication(Arc<RwLock<Option<Arc<Document>>>>);

/// One published document with its validator.
#[derive(Debug)]
struct Document {
    bytes: Bytes,
    etag: HeaderValue,
    serial: HeaderValue,
}

impl Publication {
    /// Publishes `signed` in place of the document before.
    pub fn put(&self, signed: &Signed) {
        let digest = kopir_core::pki::sha256(&signed.bytes);
        let document = Document {
            bytes: Bytes::copy_from_slice(&signed.bytes),
            // Hex digits inside quotes are always a valid header value.
            etag: HeaderValue::from_str(&format!("\"{}\"", hex::encode(digest)))
                .unwrap_or(HeaderValue::from_static("\"\"")),
            serial: HeaderValue::from(signed.serial),
        };
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        *current = Some(Arc::new(document));
    }

    fn current(&self) -> Option<Arc<Document>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The answer to one request.
    fn answer<B>(&self, request: &http::Request<B>) -> http::Response<tonic::body::Body> {
        if request.uri().path() != PATH {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: the global configuration is at /globalconf/v1/globalconf.json\n",
            );
        }
        let head = request.method() == Method::HEAD;
        if !head && request.method() != Method::GET {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let Some(document) = self.current() else {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "no global configuration is signed yet; retry shortly\n",
            );
        };
        let unchanged = request
            .headers()
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag.as_bytes() == document.etag.as_bytes());
        let (status, body) = match (unchanged, head) {
            (true, _) => (StatusCode::NOT_MODIFIED, Bytes::new()),
            (false, true) => (StatusCode::OK, Bytes::new()),
            (false, false) => (StatusCode::OK, document.bytes.clone()),
        };
        let mut response = http::Response::new(tonic::body::Body::new(Full::new(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::ETAG, document.etag.clone());
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(SERIAL_HEADER, document.serial.clone());
        if status == StatusCode::OK {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(document.bytes.len()),
            );
        }
        response
    }
}

fn plain(status: StatusCode, text: &'static str) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The publication as a service for the edge of a port.
#[derive(Debug, Clone)]
struct Service(Publication);

impl<B> tower::Service<http::Request<B>> for Service {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        ready(Ok(self.0.answer(&request)))
    }
}

/// The TLS of the publication's port: the certificate chain and key in the
/// PEM files `cert` and `key`, no client certificate asked.
pub fn tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, PkiError> {
    let config = web_server_config(load_certs(cert)?, load_key(key)?)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `publication` on `listener` (HTTPS when `tls` is given) until
/// `stop` turns true, under the edge's default limits.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    publication: Publication,
    stop: watch::Receiver<bool>,
) {
    let limits = kopir_edge::EdgeLimits::default();
    kopir_edge::serve_web(listener, tls, Service(publication), limits, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(serial: u64, bytes: &[u8]) -> Signed {
        Signed {
            serial,
            expires_at: String::new(),
            bytes: bytes.to_vec(),
        }
    }

    fn get(
        publication: &Publication,
        if_none_match: Option<&str>,
    ) -> http::Response<tonic::body::Body> {
        let mut request = http::Request::get(PATH);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        publication.answer(&request.body(()).unwrap())
    }

    #[test]
    fn nothing_signed_yet_is_unavailable() {
        assert_eq!(
            get(&Publication::default(), None).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn if_none_match_is_read_as_rfc_9110_lists_it() {
        let publication = Publication::default();
        publication.put(&signed(7, b"{}"));
        let ok = get(&publication, None);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[SERIAL_HEADER], "7");
        let etag = ok.headers()[header::ETAG].to_str().unwrap().to_owned();
        for tag in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".to_owned(),
        ] {
            assert_eq!(
                get(&publication, Some(&tag)).status(),
                StatusCode::NOT_MODIFIED,
                "{tag}"
            );
        }
        assert_eq!(
            get(&publication, Some("\"other\"")).status(),
            StatusCode::OK
        );
        // A new document is a new validator.
        publication.put(&signed(8, b"{ }"));
        assert_eq!(get(&publication, Some(&etag)).status(), StatusCode::OK);
    }
}
