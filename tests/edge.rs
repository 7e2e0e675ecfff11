//! The edge of a port against callers that hold no certificate: silent
//! sockets and TLS without a client certificate neither stop legitimate
//! exchanges nor hold up a server's shutdown.

mod common;

use std::time::{Duration, Instant};

use common::edge::{get_person, silent_sockets, tls_connect};
use kopir_testkit::federation::LocalFederation;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
