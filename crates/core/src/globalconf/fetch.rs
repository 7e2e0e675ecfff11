//! Reading one copy of the signed global configuration from one source.
//!
//! A web source is one HTTP/1.1 `GET` on a fresh connection, conditional on
//! the `ETag` of the last copy accepted from it (a `304` means "unchanged").
//! Every step is bounded, so that no source can hold a server's download
//! loop: the TCP and TLS handshake by the connect timeout, the whole answer
//! (headers and body) by the read timeout, the body by the size limit, which
//! is checked against `Content-Length` before reading and against the bytes
//! while reading. Redirects are not followed: a source names the copy itself.
//!
//! The client is `hyper`'s connection-level HTTP/1.1 over `tokio-rustls`:
//! the fetch needs exactly these bounds and no pool, and the crates are the
//! ones the servers already use.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::anchor::{Anchor, Location};

/// Bounds of one download.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The TCP and TLS handshake.
    pub connect_timeout: Duration,
    /// The answer, from the request sent to the last byte of the body.
    pub read_timeout: Duration,
    /// The largest copy accepted.
    pub max_bytes: usize,
}

impl Default for Bounds {
    /// X-Road's timeouts (10 s to connect, 30 s to read) and 16 MiB.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

/// What a source answered.
#[derive(Debug)]
pub enum Fetched {
    /// The copy is the one accepted from it last time (`304 Not Modified`).
    Unchanged,
    /// A copy, and its `ETag` if the source gave one.
    Copy {
        /// The bytes as served.
        bytes: Bytes,
        /// The validator to send next time.
        etag: Option<String>,
    },
}

/// Why a source gave no copy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A local file cannot be read.
    #[error("cannot read the file: {0}")]
    File(String),
    /// No connection within the connect timeout.
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The connection failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (an untrusted certificate, a wrong name).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No complete answer within the read timeout.
    #[error("no complete answer within {0:?}")]
    ReadTimeout(Duration),
    /// An answer other than `200` or `304`.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// The copy is larger than the limit.
    #[error("the copy is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
}

/// Reads copies within [`Bounds`], with the TLS trust of the anchor.
#[derive(Clone)]
pub struct Fetcher {
    bounds: Bounds,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher for the anchor's sources: an `https` one must chain to the
    /// anchor's `tls_roots` or, when it names none, to the system's trust
    /// store, which is read here (a blocking call) only if a source needs it.
    pub fn new(bounds: Bounds, anchor: &Anchor) -> Self {
        let mut store = rustls::RootCertStore::empty();
        let https = anchor
            .sources
            .iter()
            .any(|s| matches!(s, Location::Web(uri) if uri.scheme_str() == Some("https")));
        if !anchor.tls_roots.is_empty() {
            store.add_parsable_certificates(anchor.tls_roots.iter().cloned());
        } else if https {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "a system trust store entry could not be read");
            }
            store.add_parsable_certificates(native.certs);
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(store).with_no_client_auth())
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            bounds,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        }
    }

    /// The bounds every fetch keeps.
    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Reads a copy from `location`; `etag` is the validator of the copy
    /// accepted from it last time.
    pub async fn fetch(
        &self,
        location: &Location,
        etag: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        match location {
            Location::File(path) => {
                let path = path.clone();
                let max = self.bounds.max_bytes;
                tokio::task::spawn_blocking(move || read_file(&path, max))
                    .await
                    .map_err(|e| FetchError::File(e.to_string()))?
            }
            Location::Web(uri) => self.get(uri, etag).await,
        }
    }

    async fn get(&self, uri: &http::Uri, etag: Option<&str>) -> Result<Fetched, FetchError> {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let mut request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                http::header::HOST,
                uri.authority().map_or(host, |a| a.as_str()),
            )
            .header(
                http::header::USER_AGENT,
                concat!("kopir/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some(etag) = etag {
            request = request.header(http::header::IF_NONE_MATCH, etag);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Http(e.to_string()))?;

        let connect = async {
            // A bracketed IPv6 literal connects without its brackets.
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
                .await
                .map_err(|e| FetchError::Connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            if !https {
                return Ok(Stream::Plain(tcp));
            }
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| FetchError::Tls(e.to_string()))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| FetchError::Tls(e.to_string()))?;
            Ok(Stream::Tls(Box::new(tls)))
        };
        let stream = tokio::time::timeout(self.bounds.connect_timeout, connect)
            .await
            .map_err(|_| FetchError::ConnectTimeout(self.bounds.connect_timeout))??;
        let max = self.bounds.max_bytes;
        let answer = async move {
            match stream {
                Stream::Plain(s) => exchange(s, request, max).await,
                Stream::Tls(s) => exchange(*s, request, max).await,
            }
        };
        tokio::time::timeout(self.bounds.read_timeout, answer)
            .await
            .map_err(|_| FetchError::ReadTimeout(self.bounds.read_timeout))?
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Sends `request` on `io` and reads the answer, at most `max` body bytes.
async fn exchange<S>(
    io: S,
    request: http::Request<Empty<Bytes>>,
    max: usize,
) -> Result<Fetched, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| FetchError::Http(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    // The connection is driven beside the request and dropped with it.
    let connection = tokio::spawn(connection);
    let answer = async {
        let response = sender.send_request(request).await.map_err(http)?;
        match response.status() {
            http::StatusCode::NOT_MODIFIED => return Ok(Fetched::Unchanged),
            http::StatusCode::OK => {}
            other => return Err(FetchError::Status(other.as_u16())),
        }
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(FetchError::TooLarge(max));
        }
        let etag = response
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge(max)
                } else {
                    FetchError::Http(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Fetched::Copy { bytes, etag })
    }
    .await;
    connection.abort();
    answer
}

/// Reads a local copy, at most `max` bytes. Blocking.
fn read_file(path: &Path, max: usize) -> Result<Fetched, FetchError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| FetchError::File(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::File(e.to_string()))?;
    if bytes.len() > max {
        return Err(FetchError::TooLarge(max));
    }
    Ok(Fetched::Copy {
        bytes: bytes.into(),
        etag: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// An anchor without `https` sources or roots: the system's trust store
    /// is not read, and a TLS handshake trusts nothing.
    fn no_anchor() -> Anchor {
        Anchor::of_file(PathBuf::new(), vec![])
    }

    fn bounds() -> Bounds {
        Bounds {
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_millis(500),
            max_bytes: 64,
        }
    }

    /// A server that answers every connection with `answer` (after reading
    /// the request head), and hands back what it was asked.
    async fn answering(answer: &'static [u8]) -> (Location, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = vec![0; 4096];
                    let n = s.read(&mut head).await.unwrap_or(0);
                    let _ = tx
                        .send(String::from_utf8_lossy(&head[..n]).into_owned())
                        .await;
                    let _ = s.write_all(answer).await;
                    // Held open: the client must not wait for the close.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        let uri = format!("http://{addr}/globalconf/v1/globalconf.json")
            .parse()
            .unwrap();
        (Location::Web(uri), rx)
    }

    #[tokio::test]
    async fn a_copy_and_its_etag_are_read_and_the_etag_is_sent_back() {
        let (at, mut asked) =
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"abc\"\r\n\r\nhello").await;
        let fetcher = Fetcher::new(bounds(), &no_anchor());
        let Fetched::Copy { bytes, etag } = fetcher.fetch(&at, None).await.unwrap() else {
            panic!("no copy");
        };
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(etag.as_deref(), Some("\"abc\""));
        let head = asked.recv().await.unwrap();
        assert!(
            head.starts_with("GET /globalconf/v1/globalconf.json HTTP/1.1\r\n"),
            "{head}"
        );
        fetcher.fetch(&at, Some("\"abc\"")).await.unwrap();
        let head = asked.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.contains("if-none-match: \"abc\""), "{head}");
    }

    #[tokio::test]
    async fn not_modified_is_unchanged() {
        let (at, _) = answering(b"HTTP/1.1 304 Not Modified\r\n\r\n").await;
        let got = Fetcher::new(bounds(), &no_anchor())
            .fetch(&at, Some("\"x\""))
            .await
            .unwrap();
        assert!(matches!(got, Fetched::Unchanged), "{got:?}");
    }

    #[tokio::test]
    async fn every_bound_holds() {
        let fetcher = Fetcher::new(bounds(), &no_anchor());
        let (declared, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n").await;
        let (chunked, _) = answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n41\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n0\r\n\r\n",
        )
        .await;
        let (stalled, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel").await;
        let (silent, _) = answering(b"").await;
        let (missing, _) = answering(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
        let (redirect, _) = answering(
            b"HTTP/1.1 301 Moved\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let (garbage, _) = answering(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        for (at, expect) in [
            (&declared, "larger than the limit of 64 bytes"),
            (&chunked, "larger than the limit of 64 bytes"),
            (&stalled, "no complete answer within"),
            (&silent, "no complete answer within"),
            (&missing, "answered HTTP 404"),
            (&redirect, "answered HTTP 301"),
            (&garbage, "HTTP:"),
        ] {
            let started = std::time::Instant::now();
            let e = fetcher.fetch(at, None).await.unwrap_err();
            assert!(e.to_string().contains(expect), "{at}: {e}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{at} held the fetch"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_and_an_untrusted_certificate_fail() {
        let fetcher = Fetcher::new(bounds(), &no_anchor());
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let at = Location::Web(format!("http://{closed}/x").parse().unwrap());
        let e = fetcher.fetch(&at, None).await.unwrap_err();
        assert!(matches!(e, FetchError::Connect(_)), "{e}");
        // A plain-text server behind an https URL fails the handshake.
        let (plain, _) = answering(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let Location::Web(uri) = plain else {
            unreachable!()
        };
        let at = Location::Web(uri.to_string().replace("http:", "https:").parse().unwrap());
        let e = fetcher.fetch(&at, None).await.unwrap_err();
        assert!(matches!(e, FetchError::Tls(_)), "{e}");
    }

    #[tokio::test]
    async fn a_file_is_read_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        let large = dir.path().join("large");
        std::fs::write(&small, b"hello").unwrap();
        std::fs::write(&large, [b'a'; 65]).unwrap();
        let fetcher = Fetcher::new(bounds(), &no_anchor());
        let Fetched::Copy { bytes, .. } =
            fetcher.fetch(&Location::File(small), None).await.unwrap()
        else {
            panic!("no copy")
        };
        assert_eq!(&bytes[..], b"hello");
        let e = fetcher
            .fetch(&Location::File(large), None)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::TooLarge(64)), "{e}");
        let e = fetcher
            .fetch(&Location::File(PathBuf::from("/nonexistent/x")), None)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::File(_)), "{e}");
    }
}
