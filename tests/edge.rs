//! The edge of a port against callers that hold no certificate: silent
//! sockets and TLS without a client certificate neither stop legitimate
//! exchanges nor hold up a server's shutdown.

mod common;

use std::time::{Duration, Instant};

use common::with_meta;
use kopir::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use tokio::net::TcpSocket;

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
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &peer.to_string(), "-alpn", "h2"])
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("join")
    .expect("openssl");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("certificate required") || text.contains("alert"),
        "handshake without a certificate: {text}"
    );
    get_person(&fed).await.expect("exchange");
    fed.shutdown().await;
}
