//! End-to-end tests of the exchange path: the demo federation on 127.0.0.1:0
//! with real mutual TLS, real signatures and real gRPC clients; each refusal is
//! checked for its status and `kopir-error` reason.

mod common;

use std::{sync::Arc, time::Duration};

use common::{assert_refused, with_meta};
use kopir_core::{
    clock::now_ms,
    error::{ERROR_KEY, REQUEST_ID_KEY},
    id::Iin,
    meta::CallMeta,
    pki::{
        self, Fingerprint, load_certs, load_key, sha256, sign::SigningKey,
        tls::pinned_client_config,
    },
};
use kopir_proto::v1::{
    ForwardRequest, GlobalConfStatusRequest, exchange_client::ExchangeClient,
    server_status_client::ServerStatusClient,
};
use kopir_server::exchange::envelope;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation, tls_channel},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
    registry::RegistryKind,
};
use prost::Message;
use tonic::{Code, Request, Status, transport::Channel};

const POPULATION: &str = "KZ/GOV/MOJ/population";
const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";

struct Harness {
    fed: LocalFederation,
    _dir: tempfile::TempDir,
    parent: Iin,
}

async fn launch(adjust: kopir_testkit::federation::Adjust<'_>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), adjust).await.unwrap();
    let parent = fed.dataset.sample_parents(1)[0];
    Harness {
        fed,
        _dir: dir,
        parent,
    }
}

impl Harness {
    async fn benefits(&self) -> Channel {
        self.fed.client_channel("mlspp", BENEFITS).await.unwrap()
    }

    fn get_person(&self) -> Request<GetPersonRequest> {
        self.get_person_with(&[])
    }

    fn get_person_with(&self, overrides: &[(&'static str, &str)]) -> Request<GetPersonRequest> {
        let subject = format!("iin:{}", self.parent);
        let mut pairs: Vec<(&'static str, String)> = vec![
            ("kopir-client", BENEFITS.into()),
            ("kopir-service", POPULATION.into()),
            ("kopir-purpose", "child-benefit".into()),
            ("kopir-subject", subject),
        ];
        for (k, v) in overrides {
            pairs.retain(|(key, _)| key != k);
            if !v.is_empty() {
                pairs.push((k, v.to_string()));
            }
        }
        let pairs: Vec<(&'static str, &str)> =
            pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        with_meta(
            GetPersonRequest {
                iin: self.parent.to_string(),
            },
            &pairs,
        )
    }

    /// A raw client of MOJ's peer port presenting `tls` (cert chain, key).
    async fn peer_client(
        &self,
        tls: (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
    ) -> ExchangeClient<Channel> {
        let moj = self.fed.node("moj");
        let moj_fp = Fingerprint::of(load_certs(&moj.config.tls.cert).unwrap()[0].as_ref());
        let config = pinned_client_config(tls.0, tls.1, vec![moj_fp]).unwrap();
        ExchangeClient::new(tls_channel(moj.server.peer_addr, config).await.unwrap())
    }

    /// MLSPP's own TLS identity, as a compromised link would have it.
    fn mlspp_tls(
        &self,
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let c = &self.fed.node("mlspp").config;
        (
            load_certs(&c.tls.cert).unwrap(),
            load_key(&c.tls.key).unwrap(),
        )
    }

    /// A correctly signed request from MLSPP for GetPerson of the parent.
    fn signed_forward(&self) -> ForwardRequest {
        let c = &self.fed.node("mlspp").config;
        let signer = SigningKey::load(&c.signing.cert, &c.signing.key).unwrap();
        let body = GetPersonRequest {
            iin: self.parent.to_string(),
        }
        .encode_to_vec();
        let meta = CallMeta::from_headers(
            GET_PERSON,
            &self.get_person().metadata().clone().into_headers(),
        )
        .unwrap();
        let header = meta.to_header(now_ms(), sha256(&body));
        let (signature, _) = envelope::sign_request(&header, c.server_id.member(), &signer);
        ForwardRequest {
            header: Some(header),
            signature: Some(signature),
            body: body.into(),
        }
    }
}

async fn get_person_status(
    _h: &Harness,
    channel: Channel,
    req: Request<GetPersonRequest>,
) -> Status {
    PopulationRegistryClient::new(channel)
        .get_person(req)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn happy_path_matches_the_registry_and_echoes_the_request_id() {
    let h = launch(&|_, _| {}).await;
    let via_gateway = PopulationRegistryClient::new(h.benefits().await)
        .get_person(h.get_person_with(&[("kopir-request-id", "demo-req-1")]))
        .await
        .unwrap();
    assert_eq!(
        via_gateway.metadata().get(REQUEST_ID_KEY).unwrap(),
        "demo-req-1"
    );
    let direct =
        PopulationRegistryClient::connect(h.fed.registries[&RegistryKind::Population].uri())
            .await
            .unwrap()
            .get_person(GetPersonRequest {
                iin: h.parent.to_string(),
            })
            .await
            .unwrap();
    assert_eq!(via_gateway.into_inner(), direct.into_inner());
    // Both sides recorded the exchange durably, under the same request id.
    let steps = |node: &str| {
        h.fed
            .node(node)
            .audit
            .read_all()
            .unwrap()
            .into_iter()
            .filter(|r| r.request_id == "demo-req-1")
            .map(|r| r.step)
            .collect::<Vec<_>>()
    };
    use kopir_audit::Step;
    assert_eq!(steps("mlspp"), [Step::Forwarded, Step::Answered]);
    assert_eq!(steps("moj"), [Step::Accepted, Step::Answered]);
    h.fed.shutdown().await;
}

#[tokio::test]
async fn registry_errors_pass_through_unchanged() {
    let h = launch(&|_, _| {}).await;
    // A valid IIN that the register does not hold.
    let stranger = Iin::from_parts(1901, 1, 1, false, 7).unwrap();
    let mut req = h.get_person();
    req.get_mut().iin = stranger.to_string();
    let status = get_person_status(&h, h.benefits().await, req).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.metadata().get(ERROR_KEY).is_none(),
        "a registry's own answer is not a kopir refusal"
    );
    h.fed.shutdown().await;
}

#[tokio::test]
async fn unknown_client_is_refused() {
    let h = launch(&|_, _| {}).await;
    let req = h.get_person_with(&[("kopir-client", "KZ/GOV/MLSPP/payroll")]);
    let status = get_person_status(&h, h.benefits().await, req).await;
    assert_refused(&status, Code::Unauthenticated, "client.unknown");
    let refusals: Vec<_> = h
        .fed
        .node("mlspp")
        .audit
        .read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.step == kopir_audit::Step::Refused)
        .collect();
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].reason.as_deref(), Some("client.unknown"));
    h.fed.shutdown().await;
}

#[tokio::test]
async fn information_system_without_a_valid_client_certificate_is_refused() {
    let h = launch(&|_, _| {}).await;
    let addr = h.fed.node("mlspp").server.client_addr;
    // No certificate at all.
    let bare = h.fed.channel_to(addr, None).await.unwrap();
    assert_refused(
        &get_person_status(&h, bare, h.get_person()).await,
        Code::Unauthenticated,
        "client.certificate_missing",
    );
    // A self-signed certificate.
    let (cert, key) = pki::dev::self_signed_tls("KZ/GOV/MLSPP/benefits").unwrap();
    let identity = (
        pki::certs_from_pem(cert.as_bytes(), "t").unwrap(),
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    );
    let forged = h.fed.channel_to(addr, Some(identity)).await.unwrap();
    assert_refused(
        &get_person_status(&h, forged, h.get_person()).await,
        Code::Unauthenticated,
        "client.certificate_mismatch",
    );
    // Another information system's real certificate.
    let other = h
        .fed
        .client_channel("mlspp", "KZ/GOV/MOJ/population")
        .await
        .unwrap();
    assert_refused(
        &get_person_status(&h, other, h.get_person()).await,
        Code::Unauthenticated,
        "client.certificate_mismatch",
    );
    h.fed.shutdown().await;
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn an_expired_registered_client_certificate_is_refused() {
    // The certificate registered for the benefits system expired yesterday.
    let mut params = rcgen::CertificateParams::new(vec!["benefits".into()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem_dir = tempfile::tempdir().unwrap();
    let cert_path = pem_dir.path().join("expired.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    let h = launch(&|node, config| {
        if node == "mlspp" {
            for client in &mut config.clients {
                if client.id.to_string() == BENEFITS {
                    client.cert = cert_path.clone();
                }
            }
        }
    })
    .await;
    let identity = (
        pki::certs_from_pem(cert.pem().as_bytes(), "t").unwrap(),
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    );
    let addr = h.fed.node("mlspp").server.client_addr;
    let expired = h.fed.channel_to(addr, Some(identity)).await.unwrap();
    let status = get_person_status(&h, expired, h.get_person()).await;
    assert_refused(
        &status,
        Code::Unauthenticated,
        "client.certificate_mismatch",
    );
    assert!(
        status.message().contains("expired or not yet valid"),
        "{}",
        status.message()
    );
    h.fed.shutdown().await;
}

#[tokio::test]
async fn access_rule_denies() {
    let h = launch(&|_, _| {}).await;
    // MOJ lets the benefits system read realty only for the means test.
    let mut req = h.get_person_with(&[("kopir-service", "KZ/GOV/MOJ/realty")]);
    req.get_mut().iin = h.parent.to_string();
    let status =
        kopir_testkit::proto::kz::realty::v1::realty_registry_client::RealtyRegistryClient::new(
            h.benefits().await,
        )
        .list_properties({
            let mut r = Request::new(
                kopir_testkit::proto::kz::realty::v1::ListPropertiesRequest {
                    iin: h.parent.to_string(),
                },
            );
            *r.metadata_mut() = req.metadata().clone();
            r
        })
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "access.denied");
    h.fed.shutdown().await;
}

#[tokio::test]
async fn unknown_purpose_and_malformed_metadata_are_refused() {
    let h = launch(&|_, _| {}).await;
    let ch = h.benefits().await;
    let s = get_person_status(
        &h,
        ch.clone(),
        h.get_person_with(&[("kopir-purpose", "curiosity")]),
    )
    .await;
    assert_refused(&s, Code::InvalidArgument, "purpose.unknown");
    let s = get_person_status(
        &h,
        ch.clone(),
        h.get_person_with(&[("kopir-subject", "iin:900101300123")]),
    )
    .await;
    assert_refused(&s, Code::InvalidArgument, "metadata.invalid");
    assert!(s.message().contains("check digit"), "{}", s.message());
    let s = get_person_status(
        &h,
        ch.clone(),
        h.get_person_with(&[("kopir-service", "KZ/GOV/MOJ")]),
    )
    .await;
    assert_refused(&s, Code::InvalidArgument, "metadata.invalid");
    let s = get_person_status(&h, ch.clone(), h.get_person_with(&[("kopir-service", "")])).await;
    assert_refused(&s, Code::InvalidArgument, "metadata.missing");
    let s = get_person_status(&h, ch.clone(), h.get_person_with(&[("kopir-subject", "")])).await;
    assert_refused(&s, Code::InvalidArgument, "subject.required");
    let s = get_person_status(
        &h,
        ch,
        h.get_person_with(&[("kopir-service", "KZ/GOV/MOJ/archive")]),
    )
    .await;
    assert_refused(&s, Code::NotFound, "service.unknown");
    h.fed.shutdown().await;
}

#[tokio::test]
async fn altered_body_or_header_between_servers_is_refused() {
    let h = launch(&|_, _| {}).await;
    let mut client = h.peer_client(h.mlspp_tls()).await;
    let mut body_altered = h.signed_forward();
    body_altered.body = GetPersonRequest {
        iin: Iin::from_parts(1980, 2, 2, true, 1).unwrap().to_string(),
    }
    .encode_to_vec()
    .into();
    let s = client.forward(body_altered).await.unwrap_err();
    assert_refused(&s, Code::Unauthenticated, "body.digest_mismatch");
    let mut header_altered = h.signed_forward();
    header_altered.header.as_mut().unwrap().purpose = "benefit-means-test".into();
    let s = client.forward(header_altered).await.unwrap_err();
    assert_refused(&s, Code::Unauthenticated, "signature.invalid");
    // The untouched request goes through.
    client.forward(h.signed_forward()).await.unwrap();
    h.fed.shutdown().await;
}

#[tokio::test]
async fn forged_signature_is_refused() {
    let h = launch(&|_, _| {}).await;
    let mut client = h.peer_client(h.mlspp_tls()).await;
    // Signed with a key of the attacker's, claiming MLSPP's key id.
    let (cert, key) = pki::dev::signing_pair("attacker").unwrap();
    let attacker = SigningKey::from_pkcs8(&key, &cert).unwrap();
    let mut forged = h.signed_forward();
    let header = forged.header.clone().unwrap();
    let real = forged.signature.clone().unwrap();
    let canonical = envelope::request_canonical(&header, &real.signer, &real.key_id);
    forged.signature.as_mut().unwrap().value = attacker.sign(&sha256(&canonical)).into();
    assert_refused(
        &client.forward(forged).await.unwrap_err(),
        Code::Unauthenticated,
        "signature.invalid",
    );
    // Signed with a key the configuration does not list.
    let mut unknown = h.signed_forward();
    let (sig, _) = envelope::sign_request(&header, &"KZ/GOV/MLSPP".parse().unwrap(), &attacker);
    unknown.signature = Some(sig);
    assert_refused(
        &client.forward(unknown).await.unwrap_err(),
        Code::Unauthenticated,
        "signature.unknown_key",
    );
    h.fed.shutdown().await;
}

#[tokio::test]
async fn impostor_peer_is_refused() {
    let h = launch(&|_, _| {}).await;
    let (cert, key) = pki::dev::self_signed_tls("KZ/GOV/MLSPP/ss1").unwrap();
    let identity = (
        pki::certs_from_pem(cert.as_bytes(), "t").unwrap(),
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    );
    let mut client = h.peer_client(identity).await;
    assert_refused(
        &client.forward(h.signed_forward()).await.unwrap_err(),
        Code::Unauthenticated,
        "peer.unknown",
    );
    // A real server of another member is not MLSPP's either.
    let src = &h.fed.node("src").config;
    let mut client = h
        .peer_client((
            load_certs(&src.tls.cert).unwrap(),
            load_key(&src.tls.key).unwrap(),
        ))
        .await;
    assert_refused(
        &client.forward(h.signed_forward()).await.unwrap_err(),
        Code::Unauthenticated,
        "peer.unknown",
    );
    h.fed.shutdown().await;
}

#[tokio::test]
async fn replayed_and_stale_requests_are_refused() {
    let h = launch(&|_, _| {}).await;
    let mut client = h.peer_client(h.mlspp_tls()).await;
    let request = h.signed_forward();
    client.forward(request.clone()).await.unwrap();
    assert_refused(
        &client.forward(request).await.unwrap_err(),
        Code::AlreadyExists,
        "request.replayed",
    );
    // Signed ten minutes ago.
    let c = &h.fed.node("mlspp").config;
    let signer = SigningKey::load(&c.signing.cert, &c.signing.key).unwrap();
    let mut old = h.signed_forward();
    let header = old.header.as_mut().unwrap();
    header.timestamp_ms -= 600_000;
    let (sig, _) = envelope::sign_request(header, c.server_id.member(), &signer);
    old.signature = Some(sig);
    assert_refused(
        &client.forward(old).await.unwrap_err(),
        Code::Unauthenticated,
        "timestamp.out_of_window",
    );
    h.fed.shutdown().await;
}

async fn eventually_refused(h: &Harness, code: Code, reason: &str) {
    let ch = h.benefits().await;
    for _ in 0..50 {
        let result = PopulationRegistryClient::new(ch.clone())
            .get_person(h.get_person())
            .await;
        if let Err(s) = &result
            && s.metadata().get(ERROR_KEY).is_some_and(|v| v == reason)
        {
            assert_refused(s, code, reason);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never refused with {reason}");
}

/// A forged copy of the global configuration is refused (the admin port's
/// status names it) and exchanges go on with the copy in use.
#[tokio::test]
async fn a_forged_global_configuration_is_refused_and_exchanges_go_on() {
    let h = launch(&|_, _| {}).await;
    PopulationRegistryClient::new(h.benefits().await)
        .get_person(h.get_person())
        .await
        .unwrap();
    // Change one byte of the signed document: add a member by editing the payload.
    let text = std::fs::read_to_string(&h.fed.globalconf_path).unwrap();
    let mut envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload =
        String::from_utf8(b64.decode(envelope["payload"].as_str().unwrap()).unwrap()).unwrap();
    let tampered = payload.replace("Ministry of Justice", "Ministry of Justise");
    assert_ne!(payload, tampered);
    envelope["payload"] = b64.encode(tampered).into();
    kopir_testkit::federation::write_atomically(
        &h.fed.globalconf_path,
        envelope.to_string().as_bytes(),
    )
    .unwrap();
    // The forged copy is refused and logged; the servers keep the one in use.
    let mut status = ServerStatusClient::new(h.fed.admin_channel("moj").await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = status
            .global_conf(GlobalConfStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if now.sources[0].last_error.contains("forged or altered") {
            assert!(now.usable, "{now:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never refused: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    PopulationRegistryClient::new(h.benefits().await)
        .get_person(h.get_person())
        .await
        .unwrap();
    h.fed.shutdown().await;
}

/// A provider's server announced in maintenance is not called: the consumer
/// refuses with `provider.maintenance` before anything is signed or sent,
/// and calls it again once a configuration without the announcement arrives.
#[tokio::test]
async fn a_server_in_maintenance_is_not_called() {
    let mut h = launch(&|_, _| {}).await;
    let set_maintenance = |h: &mut Harness, on: bool| {
        let moj = h
            .fed
            .description
            .members
            .iter_mut()
            .find(|m| m.id.to_string() == "KZ/GOV/MOJ")
            .unwrap();
        moj.servers.iter_mut().for_each(|s| s.maintenance = on);
        h.fed.publish(time::Duration::hours(1)).unwrap();
    };
    set_maintenance(&mut h, true);
    eventually_refused(&h, Code::Unavailable, "provider.maintenance").await;
    let calls = h.fed.registries[&RegistryKind::Population].calls();
    let status = get_person_status(&h, h.benefits().await, h.get_person()).await;
    assert_refused(&status, Code::Unavailable, "provider.maintenance");
    assert_eq!(
        h.fed.registries[&RegistryKind::Population].calls(),
        calls,
        "the registry was called"
    );
    assert!(
        status.message().contains("KZ/GOV/MOJ/population"),
        "{status:?}"
    );
    let id = status
        .metadata()
        .get("kopir-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    let records = h.fed.records("mlspp", id).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].step, kopir_audit::Step::Refused);
    assert_eq!(records[0].reason.as_deref(), Some("provider.maintenance"));

    set_maintenance(&mut h, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while PopulationRegistryClient::new(h.benefits().await)
        .get_person(h.get_person())
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "never called again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.fed.shutdown().await;
}

/// A reload takes the new information systems and access rules for the
/// next call, and a configuration that does not check is refused whole,
/// leaving the running one in place.
#[tokio::test]
async fn a_reload_takes_new_clients_and_rules_and_refuses_a_bad_file() {
    let h = launch(&|_, _| {}).await;
    let (consumer, provider) = (h.fed.node("mlspp"), h.fed.node("moj"));
    let ok = || async {
        PopulationRegistryClient::new(h.benefits().await)
            .get_person(h.get_person())
            .await
    };
    ok().await.unwrap();

    // A client certificate that does not load: refused, nothing changes.
    let mut broken = consumer.config.clone();
    broken.clients[0].cert = h.fed.dir.join("no-such-certificate.pem");
    let error = consumer.server.reload(broken).await.unwrap_err();
    assert!(
        error.to_string().contains("no-such-certificate.pem"),
        "{error}"
    );
    ok().await.unwrap();

    // Without the benefits system registered, it is nobody.
    let mut without = consumer.config.clone();
    without.clients.retain(|c| c.id.to_string() != BENEFITS);
    consumer.server.reload(without).await.unwrap();
    let status = get_person_status(&h, h.benefits().await, h.get_person()).await;
    assert_refused(&status, Code::Unauthenticated, "client.unknown");
    consumer
        .server
        .reload(consumer.config.clone())
        .await
        .unwrap();
    ok().await.unwrap();

    // The provider without access rules denies; with them again, allows.
    let mut closed = provider.config.clone();
    closed.access.clear();
    provider.server.reload(closed).await.unwrap();
    let status = get_person_status(&h, h.benefits().await, h.get_person()).await;
    assert_refused(&status, Code::PermissionDenied, "access.denied");
    provider
        .server
        .reload(provider.config.clone())
        .await
        .unwrap();
    ok().await.unwrap();
    h.fed.shutdown().await;
}

#[tokio::test]
async fn expired_global_configuration_is_refused() {
    let h = launch(&|_, _| {}).await;
    // A copy that is already expired is not taken; one that expires soon
    // is, and is refused as stale once it has.
    h.fed.publish(time::Duration::seconds(-1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    PopulationRegistryClient::new(h.benefits().await)
        .get_person(h.get_person())
        .await
        .unwrap();
    h.fed.publish(time::Duration::seconds(3)).unwrap();
    eventually_refused(&h, Code::FailedPrecondition, "globalconf.stale").await;
    h.fed.shutdown().await;
}

#[tokio::test]
async fn registry_down_is_unavailable_not_a_hang() {
    let mut h = launch(&|_, _| {}).await;
    h.fed
        .registries
        .remove(&RegistryKind::Population)
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let s = get_person_status(&h, h.benefits().await, h.get_person()).await;
    assert_refused(&s, Code::Unavailable, "registry.unavailable");
    assert!(started.elapsed() < Duration::from_secs(10));
    h.fed.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_is_refused() {
    let h = launch(&|name, c| {
        if name == "mlspp" {
            c.limits.max_body_bytes = 1024;
        }
    })
    .await;
    let mut req = h.get_person();
    req.get_mut().iin = "9".repeat(4096);
    let s = get_person_status(&h, h.benefits().await, req).await;
    assert_refused(&s, Code::ResourceExhausted, "body.too_large");
    h.fed.shutdown().await;
}

#[tokio::test]
async fn health_and_reflection_answer_on_the_client_port() {
    let h = launch(&|_, _| {}).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.benefits().await);
    let mut serving = false;
    for _ in 0..30 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        if r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving);
    let _ = Arc::new(());
    h.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_capacity_calls_are_shed_at_once_and_the_rest_served() {
    // The consumer's server processes at most two calls at once, both of
    // which one information system may hold.
    let h = launch(&|name, config| {
        if name == "mlspp" {
            config.limits.max_concurrent_calls = 2;
            config.limits.max_calls_per_caller = Some(2);
        }
    })
    .await;
    let channel = h.benefits().await;
    let calls = (0..64).map(|_| {
        let (mut client, req) = (
            PopulationRegistryClient::new(channel.clone()),
            h.get_person(),
        );
        async move {
            let started = std::time::Instant::now();
            (client.get_person(req).await, started.elapsed())
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let (mut served, mut shed) = (0, 0);
    for (answer, took) in answers {
        match answer {
            Ok(_) => served += 1,
            Err(status) => {
                assert_refused(&status, Code::ResourceExhausted, "server.overloaded");
                assert!(
                    took < Duration::from_secs(1),
                    "shed promptly, not queued: {took:?}"
                );
                shed += 1;
            }
        }
    }
    assert!(served >= 2 && shed >= 1, "served {served}, shed {shed}");
    // Capacity returns once the burst is over.
    PopulationRegistryClient::new(channel)
        .get_person(h.get_person())
        .await
        .unwrap();
    h.fed.shutdown().await;
}
