//! The edge of a port against callers that hold no certificate: silent
//! sockets and TLS without a client certificate neither stop legitimate
//! exchanges nor hold up a server's shutdown.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use common::with_meta;
use kopir::pki::{self, tls};
use kopir::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

async fn get_person(fed: &LocalFederation) -> Result<(), tonic::Status> {
    let parent = fed.dataset.sample_parents(1)[0];
    let subject = format!("iin:{parent}");
    let req = with_meta(
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
    let channel = fed
        .client_channel("mlspp", BENEFITS)
        .await
        .expect("channel");
    PopulationRegistryClient::new(channel)
        .get_person(req)
        .await
        .map(|_| ())
}

/// A TLS connection to `addr` verifying the server against the federation's
/// CA and presenting `identity` (certificate, key files) if given.
async fn tls_connect(
    fed: &LocalFederation,
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
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// Opens `n` TCP connections to `addr` from another loopback address that
/// never send a byte.
async fn silent_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind");
        if let Ok(s) = socket.connect(addr).await {
            held.push(s);
        }
    }
    held
}

#[tokio::test]
async fn silent_sockets_neither_block_exchanges_nor_shutdown() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .expect("federation");
    get_person(&fed).await.expect("exchange before");
    let peer = fed.node("moj").server.peer_addr;
    let _held = silent_sockets(peer, 300).await;
    // The handshakes they hold are capped per source: the consumer's server
    // still gets through to the provider.
    get_person(&fed).await.expect("exchange during the flood");
    let started = Instant::now();
    fed.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown took {:?} with silent sockets open",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_peer_port_requires_a_client_certificate_in_the_handshake() {
    let dir = tempfile::tempdir().expect("dir");
    let fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .expect("federation");
    let peer = fed.node("moj").server.peer_addr;
    // In TLS 1.3 the client finishes its side of the handshake before the
    // server has judged it: the refusal arrives as an alert on the first read.
    let mut tls = tls_connect(&fed, peer, None).await.expect("handshake");
    let read = async {
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    };
    let err = read
        .await
        .expect_err("a server that reads without a certificate");
    assert!(
        err.to_string().contains("CertificateRequired"),
        "refusal without a certificate: {err}"
    );
    get_person(&fed).await.expect("exchange");
    fed.shutdown().await;
}
