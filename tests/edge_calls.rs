//! The call budget, unknown callers and deadlines, against a running
//! federation: callers that are nobody are refused precisely but cost no
//! audit write each; a caller holding streams gets only its share; a body
//! held back is cut off; a deadline that passes is `DEADLINE_EXCEEDED` at the
//! stage where it passed, blaming no one the request did not reach.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    assert_refused,
    edge::{Latency, get_person_request, h2_connect, h2_request, latencies, report},
};
use kopir_audit::{Side, Step, record::Entry};
use kopir_core::pki::{self, Fingerprint, load_certs, load_key, tls::pinned_client_config};
use kopir_proto::v1::{ForwardRequest, exchange_client::ExchangeClient};
use kopir_server::config::ServerConfig;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, Person, population_registry_client::PopulationRegistryClient,
    },
};
use tonic::{Code, Request, Status, transport::Channel};

const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";

async fn get_person(channel: Channel, req: Request<GetPersonRequest>) -> Result<(), Status> {
    PopulationRegistryClient::new(channel)
        .get_person(req)
        .await
        .map(|_| ())
}

/// Legitimate exchanges on one connection of the benefits system.
async fn legitimate(fed: &LocalFederation, n: usize, when: &str) -> Latency {
    let channel = fed.client_channel("mlspp", BENEFITS).await.unwrap();
    latencies(fed, Some(&channel), n, when).await
}

/// `n` calls on `channel` by the benefits system's certificate naming a
/// subsystem it is not: a known identity, refused (and audited) before the
/// body is read.
async fn refused_as_another_subsystem(fed: &LocalFederation, channel: &Channel, n: usize) {
    flood(n, || {
        let (channel, mut req) = (channel.clone(), get_person_request(fed));
        req.metadata_mut()
            .insert("kopir-client", "KZ/GOV/MLSPP/payroll".parse().unwrap());
        async move {
            let status = get_person(channel, req).await.unwrap_err();
            assert_refused(&status, Code::Unauthenticated, "client.unknown");
        }
    })
    .await;
}

fn records(fed: &LocalFederation, node: &str) -> Vec<Entry> {
    let all = fed.node(node).audit.read_all().unwrap();
    all.into_iter().map(|r| r.entry).collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The number of calls a summary record says it counts.
fn counted(record: &Entry) -> u64 {
    let message = record.message.as_deref().unwrap_or_default();
    message
        .strip_prefix("summary: ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a summary: {message}"))
}

fn summaries<'a>(records: &'a [Entry], side: Side, of: &str) -> Vec<&'a Entry> {
    records
        .iter()
        .filter(|r| {
            r.side == side && r.client.starts_with("unknown caller") && r.client.contains(of)
        })
        .collect()
}

fn self_signed() -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let (cert, key) = pki::dev::self_signed_tls("KZ/GOV/MLSPP/ss1").unwrap();
    (
        pki::certs_from_pem(cert.as_bytes(), "t").unwrap(),
        <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            key.as_bytes(),
        )
        .unwrap(),
    )
}

/// A channel to `node`'s peer port presenting `identity`.
async fn peer_channel(
    fed: &LocalFederation,
    node: &str,
    identity: (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
) -> Channel {
    let n = fed.node(node);
    let fp = Fingerprint::of(load_certs(&n.config.tls.cert).unwrap()[0].as_ref());
    let config = pinned_client_config(identity.0, identity.1, vec![fp]).unwrap();
    kopir_testkit::federation::tls_channel(n.server.peer_addr, config)
        .await
        .unwrap()
}

fn tls_identity(
    config: &ServerConfig,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    (
        load_certs(&config.tls.cert).unwrap(),
        load_key(&config.tls.key).unwrap(),
    )
}

/// A unary gRPC call over raw HTTP/2 with `extra` headers sent as they are
/// (a tonic client enforces `grpc-timeout` itself and would not let the
/// server's answer through); the status the server answered with.
async fn raw_call(
    fed: &LocalFederation,
    meta: &tonic::metadata::MetadataMap,
    extra: &[(&'static str, &str)],
    message: &[u8],
) -> Status {
    let addr = fed.node("mlspp").server.client_addr;
    let identity = fed.layout.client(&BENEFITS.parse().unwrap());
    let (mut send, _connection) = h2_connect(fed, addr, Some(identity)).await.unwrap();
    // `extra` stands in for the deadline the request carries.
    let headers: Vec<(String, Vec<u8>)> = meta
        .clone()
        .into_headers()
        .iter()
        .filter(|(k, _)| *k != "grpc-timeout")
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .chain(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        )
        .collect();
    let request = h2_request(addr, GET_PERSON, &headers);
    let (answer, mut body) = send.send_request(request, false).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    body.send_data(framed.into(), true).unwrap();
    let answer = answer.await.unwrap();
    let mut headers = answer.headers().clone();
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    if let Some(trailers) = body.trailers().await.unwrap() {
        headers.extend(trailers);
    }
    Status::from_header_map(&headers).expect("a grpc-status")
}

/// A call to the exchange that sends its headers and never its body.
async fn hold(channel: Channel) -> Result<Person, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/kopir.v1.Exchange/Forward");
    let body = futures_util::stream::pending::<ForwardRequest>();
    let codec = tonic_prost::ProstCodec::<ForwardRequest, Person>::default();
    grpc.client_streaming(Request::new(body), path, codec)
        .await
        .map(|r| r.into_inner())
}

/// Runs `n` calls, 32 at a time.
async fn flood<F, Fut>(n: usize, call: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::StreamExt;
    futures_util::stream::iter((0..n).map(|_| call()))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_callers_are_refused_precisely_and_summed_up_not_audited_each() {
    let calls: usize = std::env::var("KOPIR_UNKNOWN_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|_, config| {
        config.limits.unknown_caller_summary_secs = 1;
    })
    .await
    .unwrap();
    let (mlspp, moj) = (fed.node("mlspp"), fed.node("moj"));
    let before = legitimate(&fed, 50, "before the flood").await;

    // Before: a registered certificate naming a subsystem it is not is a
    // known identity, audited one record per refusal, as every refusal was.
    let known = fed.client_channel("mlspp", BENEFITS).await.unwrap();
    let (records0, bytes0) = (
        records(&fed, "mlspp").len(),
        dir_bytes(&mlspp.config.data_dir),
    );
    refused_as_another_subsystem(&fed, &known, calls).await;
    let audited = records(&fed, "mlspp").len() - records0;
    let audited_bytes = dir_bytes(&mlspp.config.data_dir) - bytes0;
    assert_eq!(
        audited, calls,
        "a known identity's refusals are audited each"
    );

    // After: no certificate on the client port, a self-signed one on the peer port.
    let (records1, bytes1) = (
        records(&fed, "mlspp").len() + records(&fed, "moj").len(),
        dir_bytes(&mlspp.config.data_dir) + dir_bytes(&moj.config.data_dir),
    );
    let bare = fed
        .channel_to(mlspp.server.client_addr, None)
        .await
        .unwrap();
    let impostor = ExchangeClient::new(peer_channel(&fed, "moj", self_signed()).await);
    let forward = ForwardRequest::default();
    let attack = async {
        flood(calls, || {
            let (bare, req) = (bare.clone(), get_person_request(&fed));
            async move {
                let status = get_person(bare, req).await.unwrap_err();
                assert_refused(&status, Code::Unauthenticated, "client.certificate_missing");
            }
        })
        .await;
        flood(calls, || {
            let (mut impostor, forward) = (impostor.clone(), forward.clone());
            async move {
                let status = impostor.forward(forward).await.unwrap_err();
                assert_refused(&status, Code::Unauthenticated, "peer.unknown");
            }
        })
        .await;
    };
    let (_, during) = tokio::join!(attack, legitimate(&fed, 50, "during the flood"));
    let took = Instant::now();
    // Every count reaches the log within the summary interval.
    let (mut on_client, mut on_peer) = (0, 0);
    while took.elapsed() < Duration::from_secs(10)
        && (on_client, on_peer) != (calls as u64, calls as u64)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (m, j) = (records(&fed, "mlspp"), records(&fed, "moj"));
        on_client = summaries(&m, Side::Consumer, "no TLS certificate")
            .iter()
            .map(|r| counted(r))
            .sum();
        on_peer = summaries(&j, Side::Provider, "TLS certificate")
            .iter()
            .map(|r| counted(r))
            .sum();
    }
    assert_eq!((on_client, on_peer), (calls as u64, calls as u64));
    let (m, j) = (records(&fed, "mlspp"), records(&fed, "moj"));
    let client_summaries = summaries(&m, Side::Consumer, "no TLS certificate");
    let peer_summaries = summaries(&j, Side::Provider, "TLS certificate");
    for s in client_summaries.iter().chain(&peer_summaries) {
        assert_eq!(s.step, Step::Refused);
    }
    assert_eq!(
        client_summaries[0].reason.as_deref(),
        Some("client.certificate_missing")
    );
    assert_eq!(peer_summaries[0].reason.as_deref(), Some("peer.unknown"));
    // Nothing but the summaries and the legitimate exchanges was written.
    let legit_records = 50 * 4;
    let written = m.len() + j.len() - records1;
    assert_eq!(
        written,
        legit_records + client_summaries.len() + peer_summaries.len(),
        "only summaries for the unknown callers"
    );
    let summary_bytes =
        dir_bytes(&mlspp.config.data_dir) + dir_bytes(&moj.config.data_dir) - bytes1;
    println!(
        "audit records for {calls} refused calls: known identity {audited} ({audited_bytes} bytes on disk, \
         ~{} bytes per 100,000 calls); unknown callers, client port and peer port: {} + {} summary records \
         ({summary_bytes} bytes on disk with 200 records of 50 legitimate exchanges)",
        audited_bytes as u128 * 100_000 / calls as u128,
        client_summaries.len(),
        peer_summaries.len(),
    );
    report("unknown callers' refusals", before, during);
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_streams_gets_only_its_share_and_an_unpinned_one_none() {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|name, config| {
        if name == "moj" {
            config.limits.max_concurrent_calls = 8;
            config.limits.max_calls_per_caller = Some(2);
            config.limits.body_read_timeout_ms = 30_000;
        }
    })
    .await
    .unwrap();
    let before = legitimate(&fed, 20, "before the hold").await;
    // SRC's server is pinned: two of its calls are held, a third is shed.
    let src = tls_identity(&fed.node("src").config);
    let src_client = || peer_channel(&fed, "moj", (src.0.clone(), src.1.clone_key()));
    let mut holders = Vec::new();
    for _ in 0..2 {
        holders.push(tokio::spawn(hold(src_client().await)));
    }
    let mut shed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Err(status)) =
            tokio::time::timeout(Duration::from_millis(500), hold(src_client().await)).await
        {
            shed = Some(status);
            break;
        }
    }
    let status = shed.expect("a third held call of one peer is shed");
    assert_refused(&status, Code::ResourceExhausted, "server.overloaded");
    assert!(status.message().contains("security server"), "{status:?}");
    // A self-signed certificate holds nothing: refused at once.
    let started = Instant::now();
    let status = hold(peer_channel(&fed, "moj", self_signed()).await)
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "peer.unknown");
    assert!(started.elapsed() < Duration::from_secs(2));
    // MLSPP's exchanges go on beside the held calls.
    let during = legitimate(&fed, 20, "while a peer holds its share").await;
    assert!(
        holders.iter().all(|h| !h.is_finished()),
        "held calls stay held"
    );
    report("a pinned peer holding its share", before, during);
    fed.shutdown().await;
}

#[tokio::test]
async fn a_body_held_back_is_cut_off_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|name, config| {
        if name == "mlspp" {
            config.limits.body_read_timeout_ms = 300;
        }
    })
    .await
    .unwrap();
    let channel = fed.client_channel("mlspp", BENEFITS).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = Request::new(futures_util::stream::pending::<GetPersonRequest>());
    *req.metadata_mut() = get_person_request(&fed).metadata().clone();
    let codec = tonic_prost::ProstCodec::<GetPersonRequest, Person>::default();
    let started = Instant::now();
    let status = grpc
        .client_streaming(req, http::uri::PathAndQuery::from_static(GET_PERSON), codec)
        .await
        .unwrap_err();
    assert_refused(&status, Code::DeadlineExceeded, "body.timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let refused: Vec<_> = records(&fed, "mlspp")
        .into_iter()
        .filter(|r| r.reason.as_deref() == Some("body.timeout"))
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].step, Step::Refused);
    assert!(
        records(&fed, "mlspp")
            .iter()
            .all(|r| r.step != Step::Forwarded),
        "nothing was forwarded"
    );
    legitimate(&fed, 3, "after the held body").await;
    fed.shutdown().await;
}

#[tokio::test]
async fn a_deadline_passed_on_arrival_is_deadline_exceeded_and_nothing_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    let req = get_person_request(&fed);
    let message = prost::Message::encode_to_vec(req.get_ref());
    let status = raw_call(&fed, req.metadata(), &[("grpc-timeout", "1n")], &message).await;
    assert_refused(&status, Code::DeadlineExceeded, "deadline.exceeded");
    assert!(
        status.message().contains("the call was being checked"),
        "{status:?}"
    );
    let request_id = status
        .metadata()
        .get("kopir-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mine: Vec<_> = records(&fed, "mlspp")
        .into_iter()
        .filter(|r| r.request_id == request_id)
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].step, Step::Refused);
    assert_eq!(mine[0].reason.as_deref(), Some("deadline.exceeded"));
    assert!(
        records(&fed, "moj")
            .iter()
            .all(|r| r.request_id != request_id)
    );
    fed.shutdown().await;
}

#[tokio::test]
async fn a_deadline_passing_at_the_registry_blames_no_one_it_did_not_reach() {
    // A registry that accepts connections and never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|name, config| {
        if name == "moj" {
            for s in &mut config.services {
                if s.id.to_string() == "KZ/GOV/MOJ/population" {
                    s.endpoint = endpoint.clone();
                }
            }
            config.limits.connect_timeout_ms = 10_000;
        }
    })
    .await
    .unwrap();
    let req = get_person_request(&fed);
    let message = prost::Message::encode_to_vec(req.get_ref());
    let started = Instant::now();
    let status = raw_call(&fed, req.metadata(), &[("grpc-timeout", "800m")], &message).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_refused(&status, Code::DeadlineExceeded, "deadline.exceeded");
    let failed = |rs: &[Entry]| {
        rs.iter()
            .filter(|r| r.step == Step::Failed)
            .map(|r| {
                (
                    r.reason.clone().unwrap_or_default(),
                    r.message.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    // The records are durable; the store's readable copy follows shortly.
    let (mut consumer, mut provider) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        consumer = records(&fed, "mlspp");
        provider = records(&fed, "moj");
        if !failed(&consumer).is_empty() && !failed(&provider).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (c, p) = (failed(&consumer), failed(&provider));
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(c[0].0, "deadline.exceeded", "{c:?}");
    assert_eq!(p[0].0, "deadline.exceeded", "{p:?}");
    assert!(p[0].1.contains("registry"), "{p:?}");
    assert!(provider.iter().any(|r| r.step == Step::Accepted));

    // A client that gives up first (tonic enforces its own timeout) does not
    // cut either trail short: both servers still record how it ended.
    let channel = fed.client_channel("mlspp", BENEFITS).await.unwrap();
    let mut req = get_person_request(&fed);
    req.set_timeout(Duration::from_millis(300));
    assert!(get_person(channel, req).await.is_err());
    let mut ended = (0, 0);
    for _ in 0..50 {
        ended = (
            failed(&records(&fed, "mlspp")).len(),
            failed(&records(&fed, "moj")).len(),
        );
        if ended == (2, 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ended,
        (2, 2),
        "every exchange ends with its outcome on both sides"
    );
    drop(silent);
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_do_not_wear_out_the_connection() {
    // Refused before their bodies are read, thousands of calls on one
    // connection are each answered precisely, and the connection stays up.
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    let known = fed.client_channel("mlspp", BENEFITS).await.unwrap();
    refused_as_another_subsystem(&fed, &known, 30_000).await;
    fed.shutdown().await;
}
