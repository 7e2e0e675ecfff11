//! Adversarial HTTP/2 and connection tests against real servers: a caller who
//! knows only the addresses (and, for some attacks, holds a client
//! certificate) misbehaves at the connection or HTTP/2 level while the
//! benefits system keeps exchanging through the same ports.
//!
//! Each test launches the demo federation, measures the legitimate exchange
//! before and during the attack (p50 and p99, printed; `-- --nocapture` shows
//! them), and checks that the server's sockets on the attacked port stay
//! bounded and return to what they were (counted from `/proc/self/fd` and
//! `/proc/net/tcp`: the servers run in the test process, so their sockets are
//! its own, and tests running in parallel do not disturb the count).
//!
//! Raw frames are written as bytes where the `h2` crate cannot misbehave
//! (CONTINUATION floods, unanswered PINGs, oversized header blocks).

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    assert_refused,
    edge::{
        get_person_on, get_person_request, h2_connect, h2_request, latencies, report, rss_kib,
        silent_sockets_from, tls_connect, tls_connect_from,
    },
};
use kopir_audit::store::{Location, open_existing};
use kopir_core::{
    config::LocalClient,
    pki::{self, load_certs, load_key},
};
use kopir_proto::v1::{ForwardRequest, RequestHeader, exchange_client::ExchangeClient};
use kopir_server::config::ServerConfig;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::population_registry_client::PopulationRegistryClient,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::client::TlsStream;
use tonic::{Code, transport::Channel};

/// Legitimate exchanges measured before and during each attack.
const LEGIT: usize = 50;

/// The information system registered on MLSPP's server besides the benefits
/// system, which attacks its own server in [`stream_hold_by_a_registered_client`].
const INTAKE: &str = "KZ/GOV/MLSPP/intake";

// ---------------------------------------------------------------------------
// Raw HTTP/2

/// Frame types, flags and error codes of RFC 9113.
mod frame {
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

    pub const REFUSED_STREAM: u32 = 0x7;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// The largest frame payload a peer must accept (SETTINGS_MAX_FRAME_SIZE's default).
    pub const MAX_PAYLOAD: usize = 16_384;
}

/// One frame read from the server.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            frame::RST_STREAM => 0,
            frame::GOAWAY => 4,
            _ => return None,
        };
        self.payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), `flags` in the
/// first byte's high bits.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal header field without indexing, with a literal name.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// The header block of a gRPC call of `path` with `extra` headers, in HPACK
/// without indexing (the server's table stays empty).
fn request_block(path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = vec![0x83, 0x87]; // :method POST, :scheme https (static table)
    b.push(0x04); // :path, name from the static table
    hpack_string(&mut b, path.as_bytes());
    b.push(0x01); // :authority
    hpack_string(&mut b, b"127.0.0.1");
    hpack_literal(&mut b, "content-type", b"application/grpc");
    hpack_literal(&mut b, "te", b"trailers");
    for (name, value) in extra {
        hpack_literal(&mut b, name, value);
    }
    b
}

/// The kopir headers of the legitimate call, as `(name, value)` pairs.
fn kopir_headers(client: &str, subject: &str) -> Vec<(String, Vec<u8>)> {
    [
        ("kopir-client", client),
        ("kopir-service", "KZ/GOV/MOJ/population"),
        ("kopir-purpose", "child-benefit"),
        ("kopir-subject", subject),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect()
}

/// Whether a response header block holds `:status: 431`, as a plain or a
/// Huffman-coded string (`69 90 ff` is "431" in the HPACK Huffman code).
fn says_431(block: &[u8]) -> bool {
    block
        .windows(3)
        .any(|w| w == b"431" || w == [0x69, 0x90, 0xff])
}

/// What the server advertised in its first SETTINGS frame.
#[derive(Debug, Default)]
struct ServerSettings {
    max_concurrent_streams: Option<u32>,
    max_header_list_size: Option<u32>,
}

/// A TLS connection speaking HTTP/2 frame by frame.
struct RawConn {
    tls: TlsStream<TcpStream>,
}

impl RawConn {
    /// Connects, sends the preface and empty SETTINGS, reads the server's
    /// SETTINGS and acknowledges them.
    async fn open(
        fed: &LocalFederation,
        addr: SocketAddr,
        identity: Option<(PathBuf, PathBuf)>,
    ) -> std::io::Result<(Self, ServerSettings)> {
        let tls = tls_connect(fed, addr, identity).await?;
        let mut conn = Self { tls };
        conn.tls.write_all(frame::PREFACE).await?;
        conn.send(frame::SETTINGS, 0, 0, &[]).await?;
        let settings = loop {
            let f = read_frame(&mut conn.tls).await?;
            if f.kind == frame::SETTINGS && f.flags & frame::ACK == 0 {
                break parse_settings(&f.payload);
            }
        };
        conn.send(frame::SETTINGS, frame::ACK, 0, &[]).await?;
        Ok((conn, settings))
    }

    async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.tls
            .write_all(&encode_frame(kind, flags, stream, payload))
            .await?;
        self.tls.flush().await
    }

    /// Sends a header block on `stream` as HEADERS and as many CONTINUATION
    /// frames as it needs, the last with END_HEADERS.
    async fn send_headers(
        &mut self,
        stream: u32,
        block: &[u8],
        end_stream: bool,
    ) -> std::io::Result<()> {
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = block.chunks(frame::MAX_PAYLOAD).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let (kind, mut flags) = if i == 0 {
                (
                    frame::HEADERS,
                    if end_stream { frame::END_STREAM } else { 0 },
                )
            } else {
                (frame::CONTINUATION, 0)
            };
            if last {
                flags |= frame::END_HEADERS;
            }
            out.extend(encode_frame(kind, flags, stream, chunk));
        }
        self.tls.write_all(&out).await?;
        self.tls.flush().await
    }

    /// Reads frames until the server closes the connection or `within` has
    /// passed, answering PINGs if `pong`.
    async fn until_closed(&mut self, pong: bool, within: Duration) -> Closed {
        let started = Instant::now();
        let mut closed = Closed::default();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let f = match tokio::time::timeout_at(deadline, read_frame(&mut self.tls)).await {
                Err(_) => return closed,
                Ok(Err(_)) => {
                    closed.after = Some(started.elapsed());
                    return closed;
                }
                Ok(Ok(f)) => f,
            };
            match f.kind {
                frame::GOAWAY => closed.goaway = f.error_code(),
                frame::PING if f.flags & frame::ACK == 0 => {
                    closed.pings += 1;
                    closed.first_ping.get_or_insert(started.elapsed());
                    if pong
                        && self
                            .send(frame::PING, frame::ACK, 0, &f.payload)
                            .await
                            .is_err()
                    {
                        closed.after = Some(started.elapsed());
                        return closed;
                    }
                }
                _ => closed.frames.push(f),
            }
        }
    }
}

/// How a connection ended.
#[derive(Debug, Default)]
struct Closed {
    /// When the server closed it, from the start of the wait (`None`: still open).
    after: Option<Duration>,
    /// The GOAWAY's error code, if one came.
    goaway: Option<u32>,
    /// PINGs the server sent, and when the first came.
    pings: usize,
    first_ping: Option<Duration>,
    /// Other frames received.
    frames: Vec<Frame>,
}

fn parse_settings(payload: &[u8]) -> ServerSettings {
    let mut s = ServerSettings::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            frame::SETTINGS_MAX_CONCURRENT_STREAMS => s.max_concurrent_streams = Some(value),
            frame::SETTINGS_MAX_HEADER_LIST_SIZE => s.max_header_list_size = Some(value),
            _ => {}
        }
    }
    s
}

// ---------------------------------------------------------------------------
// h2 clients

/// Waits until the client has the server's SETTINGS (its limit on streams
/// replaces the client's initial guess) and returns that limit.
async fn advertised_streams(send: &h2::client::SendRequest<Bytes>, expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    while send.current_max_send_streams() != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    send.current_max_send_streams()
}

/// Opens streams on `send` (headers only, no END_STREAM) until the client
/// may open no more within `wait` or `max` are open; returns them, held.
async fn hold_streams(
    send: &mut h2::client::SendRequest<Bytes>,
    max: usize,
    wait: Duration,
    request: impl Fn(usize) -> http::Request<()>,
) -> Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    let mut held = Vec::new();
    for i in 0..max {
        match tokio::time::timeout(wait, send.clone().ready()).await {
            Ok(Ok(ready)) => *send = ready,
            _ => break,
        }
        match send.send_request(request(i), false) {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    held
}

const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
const FORWARD: &str = "/kopir.v1.Exchange/Forward";

// ---------------------------------------------------------------------------
// Sockets, federation, identities

/// Sockets this process holds whose local port is `port` and that are not
/// listening: the server's side of the connections it has accepted on that
/// port (and has not closed yet).
fn server_sockets(port: u16) -> usize {
    let mine: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let listening = f[3] == "0A";
            let inode: u64 = f[9].parse().unwrap_or(0);
            if local_port == Some(port) && !listening && mine.contains(&inode) {
                n += 1;
            }
        }
    }
    n
}

/// Waits up to `within` for the server's sockets on `port` to be at most
/// `bound`, and returns how many there are.
async fn settle_sockets(port: u16, bound: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = server_sockets(port);
        if n <= bound || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn launch(dir: &Path, adjust: &dyn Fn(&str, &mut ServerConfig)) -> LocalFederation {
    LocalFederation::launch(dir, adjust)
        .await
        .expect("federation")
}

/// The benefits system's channel to MLSPP's client port.
async fn benefits(fed: &LocalFederation) -> Channel {
    fed.client_channel("mlspp", BENEFITS)
        .await
        .expect("channel")
}

fn benefits_identity(fed: &LocalFederation) -> (PathBuf, PathBuf) {
    fed.layout.client(&BENEFITS.parse().expect("id"))
}

fn subject(fed: &LocalFederation) -> String {
    format!("iin:{}", fed.dataset.sample_parents(1)[0])
}

/// A self-signed TLS certificate and key, written under `dir`: what a
/// stranger without the federation's CA presents.
fn stranger_identity(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = pki::dev::self_signed_tls("stranger").expect("self-signed");
    let (c, k) = (dir.join("stranger.crt"), dir.join("stranger.key"));
    std::fs::write(&c, cert).expect("write");
    std::fs::write(&k, key).expect("write");
    (c, k)
}

/// Runs `attack` in a loop on its own task until the returned flag is set.
fn keep_attacking<F, Fut>(attack: F) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut rounds = 0;
        while !flag.load(Ordering::Relaxed) {
            attack().await;
            rounds += 1;
        }
        rounds
    });
    (stop, task)
}

// ---------------------------------------------------------------------------
// 1. Stream hold without a certificate

/// One connection without a client certificate opens as many streams on the
/// client port as it may, headers only, and keeps them open. The server
/// advertises its stream limit and the client sees it; a caller without a
/// certificate is refused at once with a precise reason instead of being
/// waited on for a body; the benefits system is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_hold_without_a_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|_, _| {}).await;
    let limit = fed.node("mlspp").config.edge.max_concurrent_streams as usize;
    let addr = fed.node("mlspp").server.client_addr;
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before the hold").await;
    let sockets_before = server_sockets(addr.port());

    let (mut send, conn) = h2_connect(&fed, addr, None).await.expect("h2");
    assert_eq!(
        advertised_streams(&send, limit).await,
        limit,
        "SETTINGS_MAX_CONCURRENT_STREAMS as the client sees it"
    );
    let headers = kopir_headers(BENEFITS, &subject(&fed));
    let held = hold_streams(&mut send, limit, Duration::from_millis(500), |i| {
        h2_request(
            addr,
            if i % 2 == 0 { GET_PERSON } else { FORWARD },
            &headers,
        )
    })
    .await;
    assert_eq!(held.len(), limit, "streams the client could open");
    // Refused without waiting for the body it never sends.
    let mut streams = Vec::new();
    for (response, stream) in held {
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("a prompt answer to a certificate-less call")
            .expect("response");
        let status = tonic::Status::from_header_map(response.headers()).expect("grpc-status");
        assert_refused(&status, Code::Unauthenticated, "client.certificate_missing");
        streams.push(stream);
    }
    let during = latencies(&fed, Some(&legit), LEGIT, "during the hold").await;
    let sockets_during = server_sockets(addr.port());
    report("stream hold, no certificate", before, during);
    drop((streams, send));
    conn.abort();
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[stream hold, no certificate] server sockets on the client port: \
         before {sockets_before}, during {sockets_during}, after {after}"
    );
    assert!(
        sockets_during <= sockets_before + 1,
        "one connection: {sockets_during}"
    );
    assert!(
        after <= sockets_before,
        "the attacker's connection was closed: {after}"
    );
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. Stream hold by a registered client

/// Registers the intake system on MLSPP's server (with the operator's
/// certificate, which the dev CA issued for client authentication) and
/// shrinks the client port's call budget and stream limit so that a handful
/// of connections can exceed the budget.
fn with_intake(fed_dir: &Path) -> impl Fn(&str, &mut ServerConfig) + use<> {
    let cert = fed_dir.join("certs-dev/operators/operator.crt");
    move |name: &str, config: &mut ServerConfig| {
        if name == "mlspp" {
            config.clients.push(LocalClient {
                id: INTAKE.parse().expect("id"),
                cert: cert.clone(),
            });
            config.limits.max_concurrent_calls = 64;
            config.edge.max_concurrent_streams = 16;
        }
    }
}

/// A registered information system whose calls wait for their bodies opens
/// more streams than the advertised limit on one connection, frame by frame:
/// those beyond it are refused (RST_STREAM REFUSED_STREAM) and the connection
/// stays open; the benefits system is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_advertised_limit_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &with_intake(dir.path())).await;
    let limit = fed.node("mlspp").config.edge.max_concurrent_streams as usize;
    let addr = fed.node("mlspp").server.client_addr;
    let intake = fed.layout.operator();
    let headers = kopir_headers(INTAKE, &subject(&fed));
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before").await;
    // One connection over the limit, frame by frame: the extra streams are refused.
    let (mut raw, settings) = RawConn::open(&fed, addr, Some(intake.clone()))
        .await
        .expect("raw");
    assert_eq!(settings.max_concurrent_streams, Some(limit as u32));
    let extra = 4;
    let pairs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    for i in 0..(limit + extra) as u32 {
        raw.send_headers(2 * i + 1, &request_block(GET_PERSON, &pairs), false)
            .await
            .expect("send");
    }
    let seen = raw.until_closed(true, Duration::from_millis(500)).await;
    let refused = seen
        .frames
        .iter()
        .filter(|f| f.kind == frame::RST_STREAM && f.error_code() == Some(frame::REFUSED_STREAM))
        .count();
    assert_eq!(
        refused, extra,
        "streams over the limit refused: {:?}",
        seen.frames
    );
    assert!(seen.after.is_none(), "the connection stays open");

    let during = latencies(&fed, Some(&legit), LEGIT, "with the streams held").await;
    report("streams over the limit", before, during);
    println!("[streams over the limit] {limit} held, {refused} of {extra} extra refused");
    drop(raw);
    fed.shutdown().await;
}

/// A registered information system (the intake system) opens the client
/// port's stream limit on each of many connections, headers only, and holds
/// them: more calls than the port's budget. The benefits system, another
/// client of the same server, must keep getting through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_hold_by_a_registered_client() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &with_intake(dir.path())).await;
    let node = fed.node("mlspp");
    let (limit, budget) = (
        node.config.edge.max_concurrent_streams as usize,
        node.config.limits.max_concurrent_calls,
    );
    let addr = node.server.client_addr;
    let intake = fed.layout.operator();
    let headers = kopir_headers(INTAKE, &subject(&fed));
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before the hold").await;
    let sockets_before = server_sockets(addr.port());

    // Then many connections, each holding the limit.
    let connections = budget / limit * 2;
    let mut attack = Vec::new();
    for _ in 0..connections {
        let (mut send, conn) = h2_connect(&fed, addr, Some(intake.clone()))
            .await
            .expect("h2");
        advertised_streams(&send, limit).await;
        let held = hold_streams(&mut send, limit, Duration::from_millis(500), |_| {
            h2_request(addr, GET_PERSON, &headers)
        })
        .await;
        attack.push((send, conn, held));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sockets_during = server_sockets(addr.port());
    let during = latencies(&fed, Some(&legit), LEGIT, "during the hold").await;
    report("stream hold, registered client", before, during);
    drop(attack);
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[stream hold, registered client] {connections} connections x {limit} streams; \
         server sockets before {sockets_before}, during {sockets_during}, after {after}"
    );
    assert!(sockets_during <= sockets_before + connections + 1);
    assert!(after <= sockets_before, "server sockets after: {after}");
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. The peer port

/// A ForwardRequest whose header parses, so that the provider gets as far as
/// checking the TLS peer.
fn forward_request(subject: &str) -> ForwardRequest {
    ForwardRequest {
        header: Some(RequestHeader {
            request_id: "edge-h2-peer".into(),
            client: BENEFITS.into(),
            service: "KZ/GOV/MOJ/population".into(),
            method: GET_PERSON.into(),
            purpose: "child-benefit".into(),
            subject: subject.into(),
            timestamp_ms: kopir_core::clock::now_ms(),
            ..RequestHeader::default()
        }),
        ..ForwardRequest::default()
    }
}

/// On the peer port the handshake requires a certificate but accepts any
/// one that proves its key: a certificate the global configuration does not
/// pin (an information system's, issued by the federation's CA, or a
/// self-signed one) reaches HTTP/2 and is refused in the request path with
/// `peer.unknown`; no certificate is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_unpinned_certificates_precisely() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|_, _| {}).await;
    let peer = fed.node("moj").server.peer_addr;
    let subject = subject(&fed);
    for (who, identity) in [
        ("an information system", benefits_identity(&fed)),
        ("a stranger", stranger_identity(dir.path())),
    ] {
        let (cert, key) = identity;
        let channel = fed
            .channel_to(
                peer,
                Some((
                    load_certs(&cert).expect("cert"),
                    load_key(&key).expect("key"),
                )),
            )
            .await
            .unwrap_or_else(|e| panic!("the handshake of {who} with the peer port: {e}"));
        let status = ExchangeClient::new(channel)
            .forward(forward_request(&subject))
            .await
            .expect_err("an unpinned peer is refused");
        assert_refused(&status, Code::Unauthenticated, "peer.unknown");
    }
    // Without a certificate: refused in the handshake, on the first read.
    let mut tls = tls_connect(&fed, peer, None).await.expect("handshake");
    let read = async {
        tls.write_all(frame::PREFACE).await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    };
    let err = read.await.expect_err("a certificate-less peer is refused");
    assert!(err.to_string().contains("CertificateRequired"), "{err}");
    fed.shutdown().await;
}

/// Shrinks MOJ's peer port so that a handful of connections can exceed its
/// call budget.
fn small_peer_port(name: &str, config: &mut ServerConfig) {
    if name == "moj" {
        config.limits.max_concurrent_calls = 64;
        config.edge.max_concurrent_streams = 16;
    }
}

/// A caller with a certificate the global configuration does not pin holds
/// `Forward` streams (headers only) on many connections to the provider's
/// peer port: more than its call budget. Exchanges from the consumer's
/// server, a pinned peer, must keep getting through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_hold_on_the_peer_port_with_an_unpinned_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &small_peer_port).await;
    let node = fed.node("moj");
    let (limit, budget) = (
        node.config.edge.max_concurrent_streams as usize,
        node.config.limits.max_concurrent_calls,
    );
    let peer = node.server.peer_addr;
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before the hold").await;
    let sockets_before = server_sockets(peer.port());
    let identity = benefits_identity(&fed);
    let connections = budget / limit * 2;
    let mut attack = Vec::new();
    for _ in 0..connections {
        let (mut send, conn) = h2_connect(&fed, peer, Some(identity.clone()))
            .await
            .expect("h2");
        advertised_streams(&send, limit).await;
        let held = hold_streams(&mut send, limit, Duration::from_millis(500), |_| {
            h2_request(peer, FORWARD, &[])
        })
        .await;
        attack.push((send, conn, held));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sockets_during = server_sockets(peer.port());
    let during = latencies(&fed, Some(&legit), LEGIT, "during the hold").await;
    report(
        "peer port stream hold, unpinned certificate",
        before,
        during,
    );
    drop(attack);
    let after = settle_sockets(peer.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[peer port stream hold] {connections} connections x {limit} streams; \
         server sockets before {sockets_before}, during {sockets_during}, after {after}"
    );
    assert!(after <= sockets_before, "server sockets after: {after}");
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 4. Rapid reset

/// One rapid-reset connection, frame by frame: HEADERS of a new stream and
/// its RST_STREAM (CANCEL) at once, in batches of 64, as fast as the
/// connection takes them, until the server closes it or `cap` streams were
/// reset. Returns the streams reset and the GOAWAY's error code.
async fn rapid_reset(
    fed: &LocalFederation,
    addr: SocketAddr,
    block: &[u8],
    cap: u32,
) -> (u32, Option<u32>) {
    let Ok((raw, _)) = RawConn::open(fed, addr, None).await else {
        return (0, None);
    };
    let (mut rd, mut wr) = tokio::io::split(raw.tls);
    let reader = tokio::spawn(async move {
        let mut goaway = None;
        while let Ok(f) = read_frame(&mut rd).await {
            if f.kind == frame::GOAWAY {
                goaway = f.error_code();
            }
        }
        goaway
    });
    let mut resets = 0;
    while resets < cap && !reader.is_finished() {
        let mut batch = Vec::new();
        for _ in 0..64 {
            let stream = 2 * resets + 1;
            batch.extend(encode_frame(
                frame::HEADERS,
                frame::END_HEADERS,
                stream,
                block,
            ));
            batch.extend(encode_frame(
                frame::RST_STREAM,
                0,
                stream,
                &CANCEL.to_be_bytes(),
            ));
            resets += 1;
        }
        if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    let goaway = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    (resets, goaway)
}

/// RST_STREAM's error code CANCEL.
const CANCEL: u32 = 0x8;

/// CVE-2023-44487: a client without a certificate opens streams and resets
/// them at once, thousands per second. The server closes each such
/// connection with GOAWAY (ENHANCE_YOUR_CALM) after a bounded number of
/// resets; meanwhile the benefits system's exchanges keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_closes_the_connection() {
    /// More resets than this on one connection and the server did not react.
    const CAP: u32 = 20_000;
    let dir = tempfile::tempdir().expect("dir");
    let fed = Arc::new(launch(dir.path(), &|_, _| {}).await);
    let addr = fed.node("mlspp").server.client_addr;
    let headers = kopir_headers(BENEFITS, &subject(&fed));
    let pairs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let block = Arc::new(request_block(GET_PERSON, &pairs));
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before the resets").await;
    let sockets_before = server_sockets(addr.port());

    // One connection on its own, measured.
    let started = Instant::now();
    let (resets, goaway) = rapid_reset(&fed, addr, &block, CAP).await;
    let took = started.elapsed();
    println!(
        "[rapid reset] one connection closed after {resets} resets sent in {:.1} ms, GOAWAY {goaway:?}",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        resets < CAP,
        "{resets} resets and the connection still open"
    );
    assert_eq!(goaway, Some(frame::ENHANCE_YOUR_CALM), "closed with GOAWAY");

    // Then in a loop, while the benefits system exchanges.
    let total = Arc::new(AtomicU64::new(0));
    let (stop, task) = {
        let (fed, block, total) = (fed.clone(), block.clone(), total.clone());
        keep_attacking(move || {
            let (fed, block, total) = (fed.clone(), block.clone(), total.clone());
            async move {
                let (n, _) = rapid_reset(&fed, addr, &block, CAP).await;
                total.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let during = latencies(&fed, Some(&legit), LEGIT, "during the resets").await;
    let rate = total.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let sockets_during = server_sockets(addr.port());
    stop.store(true, Ordering::Relaxed);
    let connections = task.await.expect("attack");
    report("rapid reset", before, during);
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[rapid reset] {connections} connections closed, {:.0} resets/s; server sockets \
         before {sockets_before}, during {sockets_during}, after {after}",
        rate
    );
    assert!(sockets_during <= sockets_before + 2);
    assert!(after <= sockets_before, "server sockets after: {after}");
    drop(legit);
    Arc::into_inner(fed).expect("one owner").shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. CONTINUATION flood

/// One CONTINUATION flood: after the preface, a HEADERS frame without
/// END_HEADERS and then CONTINUATION frames of literal headers without end,
/// until the server closes the connection or 64 MiB were sent. Returns the
/// header-block bytes written and the GOAWAY's error code.
async fn continuation_flood(fed: &LocalFederation, addr: SocketAddr) -> (usize, Option<u32>) {
    let Ok((raw, _)) = RawConn::open(fed, addr, None).await else {
        return (0, None);
    };
    let (mut rd, mut wr) = tokio::io::split(raw.tls);
    let reader = tokio::spawn(async move {
        let mut goaway = None;
        while let Ok(f) = read_frame(&mut rd).await {
            if f.kind == frame::GOAWAY {
                goaway = f.error_code();
            }
        }
        goaway
    });
    let first = request_block(GET_PERSON, &[]);
    let mut sent = first.len();
    if wr
        .write_all(&encode_frame(frame::HEADERS, frame::END_STREAM, 1, &first))
        .await
        .is_err()
    {
        return (sent, reader.await.ok().flatten());
    }
    let mut block = Vec::new();
    let mut n = 0;
    while block.len() < frame::MAX_PAYLOAD - 200 {
        hpack_literal(&mut block, &format!("x-flood-{n}"), &[b'a'; 100]);
        n += 1;
    }
    let continuation = encode_frame(frame::CONTINUATION, 0, 1, &block);
    while sent < 64 << 20 && !reader.is_finished() {
        if wr.write_all(&continuation).await.is_err() {
            break;
        }
        sent += block.len();
    }
    let _ = wr.shutdown().await;
    let goaway = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    (sent, goaway)
}

/// A client without a certificate sends a header block that never ends. The
/// server closes the connection with GOAWAY once the block passes its header
/// list limit (a few frames), holding at most about that much; memory stays
/// bounded and the benefits system's exchanges keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_closes_the_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = Arc::new(launch(dir.path(), &|_, _| {}).await);
    let limit = fed.node("mlspp").config.edge.max_header_list_bytes as usize;
    let addr = fed.node("mlspp").server.client_addr;
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before the flood").await;
    let sockets_before = server_sockets(addr.port());
    let rss_before = rss_kib();

    let (sent, goaway) = continuation_flood(&fed, addr).await;
    println!(
        "[continuation flood] one connection: {sent} header-block bytes sent before the close, GOAWAY {goaway:?}"
    );
    assert!(
        matches!(
            goaway,
            Some(frame::ENHANCE_YOUR_CALM | frame::COMPRESSION_ERROR)
        ),
        "GOAWAY {goaway:?}"
    );
    // What the client wrote includes what sat in socket buffers when the
    // server gave up; the server itself stops at a few frames.
    assert!(
        sent < 16 << 20,
        "{sent} bytes written before the server closed"
    );

    let floods = Arc::new(AtomicU64::new(0));
    let (stop, task) = {
        let (fed, floods) = (fed.clone(), floods.clone());
        keep_attacking(move || {
            let (fed, floods) = (fed.clone(), floods.clone());
            async move {
                let (_, goaway) = continuation_flood(&fed, addr).await;
                if goaway.is_some() {
                    floods.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let during = latencies(&fed, Some(&legit), LEGIT, "during the flood").await;
    let rss_during = rss_kib();
    stop.store(true, Ordering::Relaxed);
    let rounds = task.await.expect("attack");
    report("continuation flood", before, during);
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[continuation flood] {rounds} floods ({} closed with GOAWAY); header list limit {limit} B; \
         VmRSS before {rss_before} KiB, during {rss_during} KiB; server sockets before \
         {sockets_before}, after {after}",
        floods.load(Ordering::Relaxed)
    );
    assert_eq!(
        floods.load(Ordering::Relaxed),
        rounds,
        "every flood closed by the server"
    );
    // The process hosts other tests' federations too: a loose bound, far
    // below what buffering the floods (tens of MiB each) would take.
    assert!(
        rss_during < rss_before + 256 * 1024,
        "VmRSS grew from {rss_before} to {rss_during} KiB"
    );
    assert!(after <= sockets_before, "server sockets after: {after}");
    drop(legit);
    Arc::into_inner(fed).expect("one owner").shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. Oversized headers and bodies

/// A call whose header list exceeds the advertised limit (one 20 KiB header)
/// is refused on its stream (431 or RST_STREAM) and the connection stays
/// usable; a body beyond `limits.max_body_bytes` is refused with
/// `RESOURCE_EXHAUSTED` / `body.too_large`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_bodies_are_refused() {
    const MAX_BODY: usize = 64 * 1024;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.limits.max_body_bytes = MAX_BODY;
        }
    })
    .await;
    let addr = fed.node("mlspp").server.client_addr;
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before").await;

    let (mut raw, settings) = RawConn::open(&fed, addr, Some(benefits_identity(&fed)))
        .await
        .expect("raw");
    let limit = settings
        .max_header_list_size
        .expect("advertised header list limit");
    assert_eq!(limit, fed.node("mlspp").config.edge.max_header_list_bytes);
    let big = vec![b'a'; 20 * 1024];
    let block = request_block(GET_PERSON, &[("x-big", big.as_slice())]);
    raw.send_headers(1, &block, true).await.expect("send");
    let seen = raw.until_closed(true, Duration::from_millis(500)).await;
    let on_stream: Vec<&Frame> = seen.frames.iter().filter(|f| f.stream == 1).collect();
    let answered_431 = on_stream
        .iter()
        .any(|f| f.kind == frame::HEADERS && says_431(&f.payload));
    let reset = on_stream.iter().any(|f| f.kind == frame::RST_STREAM);
    println!(
        "[oversized headers] 20 KiB header against a {limit} B limit: 431 {answered_431}, \
         RST_STREAM {reset}, frames {:?}",
        on_stream
            .iter()
            .map(|f| (f.kind, f.error_code()))
            .collect::<Vec<_>>()
    );
    assert!(
        answered_431 || reset,
        "the oversized call was refused: {:?}",
        seen.frames
    );
    assert!(
        seen.after.is_none() && seen.goaway.is_none(),
        "the connection stays open"
    );
    // The same connection still serves a call (a PING round trip).
    raw.send(frame::PING, 0, 0, b"12345678")
        .await
        .expect("ping");
    let acked = loop {
        let f = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut raw.tls))
            .await
            .expect("an answer")
            .expect("frame");
        if f.kind == frame::PING && f.flags & frame::ACK != 0 {
            break f.payload;
        }
    };
    assert_eq!(acked, b"12345678");

    let mut req = get_person_request(&fed);
    req.get_mut().iin = "9".repeat(MAX_BODY + 1);
    let status = PopulationRegistryClient::new(legit.clone())
        .get_person(req)
        .await
        .expect_err("an oversized body");
    assert_refused(&status, Code::ResourceExhausted, "body.too_large");
    let during = latencies(&fed, Some(&legit), LEGIT, "after the oversized calls").await;
    report("oversized headers and body", before, during);
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. Idle and half-open connections

/// With `edge.idle_timeout_ms` at 500 ms, idle TLS connections (preface and
/// SETTINGS, no stream) get a GOAWAY and are closed within twice that (plus
/// scheduling); with `edge.handshake_timeout_ms` at 500 ms, TCP connections
/// that never send a ClientHello are closed at that timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed() {
    const IDLE: u64 = 500;
    const IDLE_CONNECTIONS: usize = 50;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.edge.idle_timeout_ms = IDLE;
            config.edge.handshake_timeout_ms = IDLE;
        }
    })
    .await;
    let addr = fed.node("mlspp").server.client_addr;
    // New connections for each exchange: one kept across the idle waits
    // would itself be closed between calls.
    let before = latencies(&fed, None, LEGIT, "before").await;
    let sockets_before = server_sockets(addr.port());

    // Each connection's wait starts as soon as it is open, so that what it
    // measures is the time from its last activity to its close.
    let mut idle = JoinSet::new();
    for i in 0..IDLE_CONNECTIONS {
        let identity = (i % 2 == 0).then(|| benefits_identity(&fed));
        let (mut conn, _) = RawConn::open(&fed, addr, identity).await.expect("raw");
        idle.spawn(async move { conn.until_closed(true, Duration::from_secs(5)).await });
    }
    let mut half_open = JoinSet::new();
    for s in silent_sockets_from([127, 0, 0, 3].into(), addr, IDLE_CONNECTIONS).await {
        let mut s = s;
        half_open.spawn(async move {
            let started = Instant::now();
            let mut buf = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let closed = matches!(r, Ok(Ok(0)) | Ok(Err(_)));
            (closed, started.elapsed())
        });
    }
    assert_eq!(half_open.len(), IDLE_CONNECTIONS);
    let sockets_during = server_sockets(addr.port());
    let during = latencies(&fed, None, LEGIT, "with idle connections open").await;

    let mut slowest = Duration::ZERO;
    while let Some(closed) = idle.join_next().await {
        let closed = closed.expect("wait");
        let after = closed.after.expect("an idle connection was closed");
        assert_eq!(closed.goaway, Some(0), "a graceful GOAWAY (NO_ERROR) first");
        slowest = slowest.max(after);
    }
    // Closed between once and twice the idle timeout after the last activity.
    assert!(
        slowest < Duration::from_millis(4 * IDLE),
        "slowest idle close {slowest:?}"
    );
    let mut slowest_half_open = Duration::ZERO;
    while let Some(r) = half_open.join_next().await {
        let (closed, after) = r.expect("wait");
        assert!(closed, "a half-open connection was closed");
        slowest_half_open = slowest_half_open.max(after);
    }
    assert!(
        slowest_half_open < Duration::from_millis(4 * IDLE),
        "slowest half-open close {slowest_half_open:?}"
    );
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(2)).await;
    report("idle connections", before, during);
    println!(
        "[idle connections] {IDLE_CONNECTIONS} idle TLS closed within {:.0} ms, \
         {IDLE_CONNECTIONS} half-open TCP within {:.0} ms (timeouts {IDLE} ms); \
         server sockets before {sockets_before}, during {sockets_during}, after {after}",
        slowest.as_secs_f64() * 1000.0,
        slowest_half_open.as_secs_f64() * 1000.0
    );
    // Counted while some may already have been closed: bounded, not exact.
    assert!(sockets_during <= sockets_before + 2 * IDLE_CONNECTIONS);
    assert!(after <= sockets_before, "server sockets after: {after}");
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 8. Keepalive

/// A client that never answers the server's PINGs is closed within the
/// keepalive interval and timeout; one that answers them stays connected
/// over the same span (the idle timeout is far longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_pings_close_the_connection() {
    const INTERVAL: u64 = 300;
    const TIMEOUT: u64 = 300;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.edge.keepalive_interval_ms = INTERVAL;
            config.edge.keepalive_timeout_ms = TIMEOUT;
        }
    })
    .await;
    let addr = fed.node("mlspp").server.client_addr;
    let legit = benefits(&fed).await;
    let before = latencies(&fed, Some(&legit), LEGIT, "before").await;
    let (mut silent, _) = RawConn::open(&fed, addr, None).await.expect("raw");
    let (mut answering, _) = RawConn::open(&fed, addr, None).await.expect("raw");
    let span = Duration::from_millis(4 * (INTERVAL + TIMEOUT));
    let (silent, answering, during) = tokio::join!(
        silent.until_closed(false, span),
        answering.until_closed(true, span),
        latencies(&fed, Some(&legit), LEGIT, "during"),
    );
    report("unanswered pings", before, during);
    println!(
        "[unanswered pings] first PING after {:?}, closed after {:?} (GOAWAY {:?}); \
         the answering client got {} PINGs and is open: {}",
        silent.first_ping,
        silent.after,
        silent.goaway,
        answering.pings,
        answering.after.is_none()
    );
    assert!(silent.pings >= 1, "the server pinged");
    let closed = silent.after.expect("a client that ignores PINGs is closed");
    assert!(
        closed < Duration::from_millis(2 * (INTERVAL + TIMEOUT)),
        "closed after {closed:?}"
    );
    assert!(answering.pings >= 2 && answering.after.is_none());
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. SIGTERM with idle connections

/// `kopir serve` for MLSPP's server holds an idle h2 connection of the
/// benefits system and a raw one without a certificate; on SIGTERM it
/// closes both, exits with success within the drain timeout, and the final
/// checkpoint covers the whole log (`kopir audit verify` passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_idle_connections_exits_within_the_drain_time() {
    let dir = tempfile::tempdir().expect("dir");
    let mut fed = launch(dir.path(), &|_, _| {}).await;
    let config_path = fed.stop_node("mlspp").await.expect("stop");
    let config = ServerConfig::load(&config_path).expect("config");
    let log = std::fs::File::create(dir.path().join("mlspp-serve.log")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("kopir serve");
    let addr = config.listen.client;
    let (cert, key) = benefits_identity(&fed);
    let mut channel = None;
    for _ in 0..500 {
        let identity = Some((
            load_certs(&cert).expect("cert"),
            load_key(&key).expect("key"),
        ));
        if let Ok(c) = fed.channel_to(addr, identity).await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = channel.expect("the server started");
    for _ in 0..5 {
        get_person_on(&fed, channel.clone())
            .await
            .expect("exchange with the process");
    }
    let (mut raw, _) = RawConn::open(&fed, addr, None).await.expect("raw");

    let sent_at = kopir_core::clock::now_ms();
    let started = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let raw_closed = raw.until_closed(true, Duration::from_secs(10)).await;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("kopir serve still running 15 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    println!(
        "[sigterm] exited {status} after {:.0} ms with idle connections open; the raw one \
         got GOAWAY {:?} and closed after {:?}",
        took.as_secs_f64() * 1000.0,
        raw_closed.goaway,
        raw_closed.after
    );
    assert!(status.success(), "exit status {status}");
    let drain = Duration::from_millis(config.edge.drain_timeout_ms);
    assert!(took < drain + Duration::from_secs(3), "took {took:?}");
    assert!(raw_closed.after.is_some(), "the idle connection was closed");
    drop(channel);

    let store = open_existing(&Location::new(&config.data_dir, None))
        .await
        .expect("store");
    let head = store.head().await.expect("head").expect("records");
    let checkpoint = store
        .latest_checkpoint()
        .await
        .expect("checkpoint")
        .expect("a checkpoint");
    assert_eq!(
        checkpoint.checkpoint.seq, head.seq,
        "the final checkpoint covers the log"
    );
    assert!(checkpoint.checkpoint.at_ms >= sent_at, "signed at shutdown");
    drop(store);
    let verify = Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args(["audit", "verify", "--json", "--config"])
        .arg(&config_path)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "audit verify: {}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    fed.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. Handshake flood from many sources

/// Eight source addresses (127.0.0.2 to .9) each open 40 TCP connections
/// to the client port that never send a ClientHello: each source holds at
/// most its 16 handshakes, the rest are closed at once; the benefits
/// system's new connections (each exchange on its own) keep getting through,
/// and the held ones are closed at the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_from_many_sources_is_capped_per_source() {
    const SOURCES: u8 = 8;
    const PER_SOURCE: usize = 40;
    const HANDSHAKE: u64 = 4_000;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.edge.handshake_timeout_ms = HANDSHAKE;
        }
    })
    .await;
    let edge = fed.node("mlspp").config.edge.clone();
    let addr = fed.node("mlspp").server.client_addr;
    let before = latencies(&fed, None, LEGIT / 2, "before").await;
    let sockets_before = server_sockets(addr.port());

    let started = Instant::now();
    let mut held = Vec::new();
    for source in 2..2 + SOURCES {
        held.extend(silent_sockets_from([127, 0, 0, source].into(), addr, PER_SOURCE).await);
    }
    assert_eq!(held.len(), SOURCES as usize * PER_SOURCE);
    let cap = SOURCES as usize * edge.max_handshakes_per_source.min(edge.max_handshakes);
    // The connections over each source's cap are closed at once.
    let sockets_during = settle_sockets(
        addr.port(),
        sockets_before + cap,
        Duration::from_millis(500),
    )
    .await;
    // A new TLS connection from a flooding source is refused while its
    // handshakes are held; from another source it gets through.
    let blocked = tls_connect_from(&fed, Some([127, 0, 0, 2].into()), addr, None).await;
    let other = tls_connect_from(&fed, Some([127, 0, 0, 20].into()), addr, None).await;
    let during = latencies(&fed, None, LEGIT / 2, "during the flood").await;
    let held_for = started.elapsed();
    assert!(
        held_for < Duration::from_millis(HANDSHAKE),
        "the flood ended ({held_for:?}) before the measurement did"
    );
    report("handshake flood, 8 sources", before, during);
    println!(
        "[handshake flood] {} silent sockets from {SOURCES} sources; server sockets before \
         {sockets_before}, during {sockets_during} (cap {cap}); new connection from a flooding \
         source: {}, from another: {}",
        held.len(),
        if blocked.is_ok() {
            "accepted"
        } else {
            "refused"
        },
        if other.is_ok() { "accepted" } else { "refused" },
    );
    assert!(
        sockets_during <= sockets_before + cap,
        "{sockets_during} server sockets"
    );
    if held_for < Duration::from_millis(HANDSHAKE) {
        assert!(
            blocked.is_err(),
            "a source over its handshake cap is refused"
        );
    }
    assert!(other.is_ok(), "another source gets through: {other:?}");
    drop(other);
    // The held handshakes end at the timeout.
    let after = settle_sockets(
        addr.port(),
        sockets_before,
        Duration::from_millis(HANDSHAKE * 3),
    )
    .await;
    println!("[handshake flood] server sockets after the handshake timeout: {after}");
    assert!(after <= sockets_before, "server sockets after: {after}");
    drop(held);
    fed.shutdown().await;
}

/// Enough source addresses, each within its own handshake cap, to fill the
/// port's cap (20 x 16 > 256): the benefits system's new connections must
/// still get through while the silent sockets are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_filling_the_port_cap_from_many_sources() {
    const SOURCES: u8 = 20;
    const HANDSHAKE: u64 = 4_000;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.edge.handshake_timeout_ms = HANDSHAKE;
        }
    })
    .await;
    let edge = fed.node("mlspp").config.edge.clone();
    let addr = fed.node("mlspp").server.client_addr;
    let before = latencies(&fed, None, LEGIT / 2, "before").await;
    let sockets_before = server_sockets(addr.port());
    let started = Instant::now();
    let mut held = Vec::new();
    for source in 10..10 + SOURCES {
        held.extend(
            silent_sockets_from(
                [127, 0, 0, source].into(),
                addr,
                edge.max_handshakes_per_source,
            )
            .await,
        );
    }
    let sockets_during = settle_sockets(
        addr.port(),
        sockets_before + edge.max_handshakes,
        Duration::from_millis(500),
    )
    .await;
    let during = latencies(&fed, None, LEGIT / 2, "during the flood").await;
    let held_for = started.elapsed();
    report("handshake flood, port cap", before, during);
    println!(
        "[handshake flood, port cap] {} silent sockets from {SOURCES} sources; server sockets \
         before {sockets_before}, during {sockets_during} (port cap {})",
        held.len(),
        edge.max_handshakes
    );
    assert!(
        held_for < Duration::from_millis(HANDSHAKE),
        "the flood ended ({held_for:?}) before the measurement did"
    );
    assert!(sockets_during <= sockets_before + edge.max_handshakes + 1);
    drop(held);
    fed.shutdown().await;
}

/// Idle TLS connections from many source addresses, each within its
/// source's cap, fill the port's connection cap (shrunk here to 64: 8
/// sources x 8). The benefits system's new connections must still get
/// through: an idle connection gives way to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_filling_the_port_cap_give_way() {
    const SOURCES: u8 = 8;
    let dir = tempfile::tempdir().expect("dir");
    let fed = launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.edge.max_connections = 64;
            config.edge.max_connections_per_source = 8;
        }
    })
    .await;
    let edge = fed.node("mlspp").config.edge.clone();
    let addr = fed.node("mlspp").server.client_addr;
    let before = latencies(&fed, None, LEGIT / 2, "before").await;
    let sockets_before = server_sockets(addr.port());
    let mut idle = JoinSet::new();
    for source in 30..30 + SOURCES {
        for _ in 0..edge.max_connections_per_source {
            let tls = tls_connect_from(&fed, Some([127, 0, 0, source].into()), addr, None)
                .await
                .expect("an idle connection");
            let mut conn = RawConn { tls };
            idle.spawn(async move {
                conn.tls.write_all(frame::PREFACE).await.ok();
                conn.send(frame::SETTINGS, 0, 0, &[]).await.ok();
                conn.until_closed(true, Duration::from_secs(30)).await
            });
        }
    }
    let sockets_full = server_sockets(addr.port());
    let during = latencies(&fed, None, LEGIT / 2, "with the port full").await;
    let sockets_during = server_sockets(addr.port());
    report("idle connections filling the port", before, during);
    idle.abort_all();
    let mut gave_way = 0;
    while let Some(r) = idle.join_next().await {
        if let Ok(closed) = r
            && closed.after.is_some()
        {
            gave_way += 1;
        }
    }
    let after = settle_sockets(addr.port(), sockets_before, Duration::from_secs(5)).await;
    println!(
        "[idle connections filling the port] {} idle connections from {SOURCES} sources, \
         {gave_way} gave way to new ones; server sockets before {sockets_before}, full \
         {sockets_full}, during {sockets_during}, after {after} (port cap {})",
        SOURCES as usize * edge.max_connections_per_source,
        edge.max_connections
    );
    assert!(gave_way >= 1, "idle connections gave way");
    assert!(sockets_during <= edge.max_connections + 1);
    assert!(after <= sockets_before, "server sockets after: {after}");
    fed.shutdown().await;
}
