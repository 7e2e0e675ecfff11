//! `kopir authority serve` as a separate process, fetched from as a server
//! and a mirror would: plain HTTP/1.1 and HTTP/2 over TLS, conditional GETs,
//! HEAD, and a hostile client that never finishes its request.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use kopir_core::{
    globalconf::signed,
    pki::{sha256, sign::VerifyingKey},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

const PATH: &str = "/globalconf/v1/globalconf.json";

/// `kopir authority serve`, stopped when dropped.
struct Authority {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Authority {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate for 127.0.0.1, made for the test, and its PEM files.
struct Tls {
    cert: CertificateDer<'static>,
}

impl Tls {
    fn make(dir: &Path) -> Tls {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        Tls {
            cert: CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap(),
        }
    }

    fn connector(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Authority {
    fn start(tls: bool) -> (Authority, Option<Tls>) {
        let dir = tempfile::tempdir().unwrap();
        let made = tls.then(|| Tls::make(dir.path()));
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_kopir"));
        command
            .args([
                "authority",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--every",
                "1s",
            ])
            .arg("--federation")
            .arg(root.join("deploy/federation.toml"))
            .arg("--out")
            .arg(dir.path().join("globalconf.json"));
        if tls {
            command
                .arg("--tls-cert")
                .arg(dir.path().join("tls.crt"))
                .arg("--tls-key")
                .arg(dir.path().join("tls.key"));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kopir authority serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("kopir authority serve printed nothing");
        let scheme = if tls { "https://" } else { "http://" };
        let url = first
            .strip_prefix("publishing global configuration at ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        let addr = url
            .strip_prefix(scheme)
            .and_then(|u| u.strip_suffix(PATH))
            .unwrap_or_else(|| panic!("unexpected address: {url}"))
            .to_owned();
        let authority = Authority {
            child,
            addr,
            lines,
            _dir: dir,
        };
        (authority, made)
    }

    fn out(&self) -> Vec<u8> {
        std::fs::read(self._dir.path().join("globalconf.json")).unwrap()
    }
}

/// One HTTP/1.1 response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and reads the answer.
async fn http1<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    extra: &str,
) -> Answer {
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: authority\r\nConnection: close\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete header");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

async fn plain_get(addr: &str, method: &str, path: &str, extra: &str) -> Answer {
    http1(TcpStream::connect(addr).await.unwrap(), method, path, extra).await
}

fn anchors() -> Vec<VerifyingKey> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![VerifyingKey::load(&root.join("certs-dev/authority/signing.crt")).unwrap()]
}

/// The served document verifies under the authority's anchor, its `ETag` is
/// its SHA-256 and its serial header the document's; a matching
/// `If-None-Match` gets 304 without a body; a new serial comes at every
/// interval; HEAD, other paths and other methods are answered as HTTP says.
#[tokio::test]
async fn publishes_over_http_with_validators() {
    let (authority, _) = Authority::start(false);
    let addr = authority.addr.clone();
    let got = plain_get(&addr, "GET", PATH, "").await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("cache-control"), Some("no-cache"));
    let etag = got.header("etag").unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", hex::encode(sha256(&got.body))));
    let (conf, _) = signed::verify_with_digest(&got.body, &anchors()).unwrap();
    assert_eq!(
        got.header("kopir-serial"),
        Some(conf.serial.to_string().as_str())
    );

    let same = plain_get(&addr, "GET", PATH, &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!(same.status, 304, "{same:?}");
    assert!(same.body.is_empty());
    assert_eq!(same.header("etag"), Some(etag.as_str()));
    let other = plain_get(&addr, "GET", PATH, "If-None-Match: \"0000\"\r\n").await;
    assert_eq!(other.status, 200);

    let head = plain_get(&addr, "HEAD", PATH, "").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), got.header("content-length"));
    assert_eq!(plain_get(&addr, "GET", "/other", "").await.status, 404);
    let post = plain_get(&addr, "POST", PATH, "Content-Length: 0\r\n").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // Re-signed at the interval: a higher serial, another validator, and
    // the --out file holds what is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let newer = loop {
        let now = plain_get(&addr, "GET", PATH, "").await;
        let (c, _) = signed::verify_with_digest(&now.body, &anchors()).unwrap();
        if c.serial > conf.serial {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "no newer serial");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(newer.header("etag"), Some(etag.as_str()));
    let out = authority.out();
    let (from_file, _) = signed::verify_with_digest(&out, &anchors()).unwrap();
    assert!(from_file.serial >= conf.serial);
}

/// Over TLS, HTTP/1.1 and HTTP/2 (by ALPN) get the same document; a client
/// that opened a connection and never finishes its request holds up nobody.
#[tokio::test]
async fn publishes_over_https_in_both_http_versions() {
    let (authority, tls) = Authority::start(true);
    let tls = tls.unwrap();
    let addr = authority.addr.clone();
    let name = ServerName::try_from("127.0.0.1").unwrap();

    // Half a request, sent and never finished.
    let mut stuck = tls
        .connector(b"http/1.1")
        .connect(name.clone(), TcpStream::connect(&addr).await.unwrap())
        .await
        .unwrap();
    stuck.write_all(b"GET /globalconf/v1/glob").await.unwrap();

    let stream = tls
        .connector(b"http/1.1")
        .connect(name.clone(), TcpStream::connect(&addr).await.unwrap())
        .await
        .unwrap();
    let one = http1(stream, "GET", PATH, "").await;
    assert_eq!(one.status, 200);
    signed::verify_with_digest(&one.body, &anchors()).unwrap();

    let stream = tls
        .connector(b"h2")
        .connect(name, TcpStream::connect(&addr).await.unwrap())
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("https://{addr}{PATH}"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    signed::verify_with_digest(&bytes, &anchors()).unwrap();
    assert_eq!(etag, format!("\"{}\"", hex::encode(sha256(&bytes))));
    drop(stuck);
}

/// SIGTERM stops the publisher promptly, with status 0.
#[test]
fn stops_on_sigterm() {
    let (mut authority, _) = Authority::start(false);
    let pid = authority.child.id();
    let started = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = authority.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // It announced what it published until it stopped.
    assert!(
        authority
            .lines
            .try_iter()
            .all(|l| l.starts_with("published global configuration serial"))
    );
}
