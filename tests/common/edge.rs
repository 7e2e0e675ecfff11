//! Helpers of the tests against a port's edge (`tests/edge.rs`,
//! `tests/edge_h2.rs`, `tests/edge_calls.rs`): the legitimate exchange, raw
//! TLS and HTTP/2 connections, silent sockets, and the process's own
//! descriptors and memory (the servers run in the test process).

#![allow(dead_code)] // each test binary uses some of them

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use kopir_core::pki::{self, tls};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::transport::Channel;

use super::with_meta;

/// The legitimate exchange: the benefits system reads a parent from the
/// population register through MLSPP's and MOJ's servers.
pub fn get_person_request(fed: &LocalFederation) -> tonic::Request<GetPersonRequest> {
    let parent = fed.dataset.sample_parents(1)[0];
    let subject = format!("iin:{parent}");
    let mut req = with_meta(
        GetPersonRequest {
            iin: parent.to_string(),
        },
        &[
            ("kopir-client", BENEFITS),
            ("kopir-service", "KZ/GOV/MOJ/population"),
            ("kopir-purpose", "child-benefit"),
            ("kopir-subject", &subject),
        ],
    );
    req.set_timeout(Duration::from_secs(10));
    req
}

/// One legitimate exchange on a new connection (its own TLS handshake).
pub async fn get_person(fed: &LocalFederation) -> Result<(), tonic::Status> {
    let channel = fed
        .client_channel("mlspp", BENEFITS)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    get_person_on(fed, channel).await
}

/// One legitimate exchange on `channel` (the benefits system's).
pub async fn get_person_on(fed: &LocalFederation, channel: Channel) -> Result<(), tonic::Status> {
    PopulationRegistryClient::new(channel)
        .get_person(get_person_request(fed))
        .await
        .map(|_| ())
}

/// Latencies of `n` legitimate exchanges made one after another, on one
/// connection of the benefits system if `channel` is given, else each on a new
/// one. Panics, naming `when`, if one of them fails.
pub async fn latencies(
    fed: &LocalFederation,
    channel: Option<&Channel>,
    n: usize,
    when: &str,
) -> Latency {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let result = match channel {
            Some(c) => get_person_on(fed, c.clone()).await,
            None => get_person(fed).await,
        };
        if let Err(e) = result {
            panic!("legitimate exchange {i} of {n} {when} failed: {e:?}");
        }
        took.push(started.elapsed());
    }
    Latency::of(took)
}

/// Percentiles of a set of latencies.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
}

impl Latency {
    pub fn of(mut took: Vec<Duration>) -> Self {
        took.sort();
        let at = |q: f64| {
            let i = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1;
            took[i]
        };
        Self {
            n: took.len(),
            p50: at(0.50),
            p99: at(0.99),
        }
    }
}

/// Prints the legitimate exchanges' latencies without and during an attack.
pub fn report(attack: &str, before: Latency, during: Latency) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "[{attack}] legitimate exchanges: before n={} p50 {:.1} ms p99 {:.1} ms; \
         during n={} p50 {:.1} ms p99 {:.1} ms",
        before.n,
        ms(before.p50),
        ms(before.p99),
        during.n,
        ms(during.p50),
        ms(during.p99),
    );
}

/// A TLS connection to `addr` verifying the server against the federation's
/// CA and presenting `identity` (certificate, key files) if given.
pub async fn tls_connect(
    fed: &LocalFederation,
    addr: SocketAddr,
    identity: Option<(PathBuf, PathBuf)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_from(fed, None, addr, identity).await
}

/// As [`tls_connect`], from the local address `source` if given.
pub async fn tls_connect_from(
    fed: &LocalFederation,
    source: Option<IpAddr>,
    addr: SocketAddr,
    identity: Option<(PathBuf, PathBuf)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let roots = pki::load_certs(&fed.layout.ca_cert()).map_err(std::io::Error::other)?;
    let identity = match identity {
        Some((cert, key)) => Some((
            pki::load_certs(&cert).map_err(std::io::Error::other)?,
            pki::load_key(&key).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let config = tls::ca_client_config(&roots, identity).map_err(std::io::Error::other)?;
    let tcp = match source {
        Some(ip) => connect_from(ip, addr).await?,
        None => TcpStream::connect(addr).await?,
    };
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// An HTTP/2 client connection made with the `h2` crate over TLS; its
/// connection task runs until the server closes it and returns why.
pub async fn h2_connect(
    fed: &LocalFederation,
    addr: SocketAddr,
    identity: Option<(PathBuf, PathBuf)>,
) -> std::io::Result<(
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)> {
    let tls = tls_connect(fed, addr, identity).await?;
    let (send, conn) = h2::client::Builder::new()
        .handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    Ok((send, tokio::spawn(conn)))
}

/// A gRPC request of `path` with `headers`, for the `h2` client.
pub fn h2_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, Vec<u8>)],
) -> http::Request<()> {
    let mut b = http::Request::post(format!("https://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_slice());
    }
    b.body(()).expect("request")
}

/// A TCP connection to `addr` from the local address `source`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Opens `n` TCP connections to `addr` from another loopback address that
/// never send a byte.
pub async fn silent_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    silent_sockets_from([127, 0, 0, 2].into(), addr, n).await
}

/// Opens `n` TCP connections to `addr` from `source` that never send a byte.
pub async fn silent_sockets_from(source: IpAddr, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(s) = connect_from(source, addr).await {
            held.push(s);
        }
    }
    held
}

/// Descriptors open in this process (the servers run in it too).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
