//! A server joins the federation from nothing, with every part its own
//! process: `kopir server init` makes its keys and requests, the
//! development CA (`kopir certs issue`) issues its TLS certificate, `kopir
//! server register` submits the request signed by the member's current key
//! over TLS presenting the new certificate, the authority's operator lists
//! and approves it (`kopir authority requests`, `approve`), and the new
//! server completes an exchange within two refresh intervals of the
//! approval. Bad requests are refused precisely and change nothing; every
//! request and decision is in the authority's log, which verifies. A
//! member's signing key is rolled over the same way, under load.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    time::{Duration, Instant},
};

use kopir_authority::request::{self, Change, Request};
use kopir_core::{
    config::GlobalConfSource,
    pki::{load_certs, load_key, sign::SigningKey},
};
use kopir_proto::v1::{
    GlobalConfStatusRequest, SubmitRequest, registration_client::RegistrationClient,
    server_status_client::ServerStatusClient,
};
use kopir_testkit::federation::LocalFederation;
use tonic::Code;

mod common;
mod federation_net;
mod serve_process;

use common::assert_refused;
use federation_net::{
    Load, PATH, Process, authority_command, make_tls_for, start_and_read, write_anchor,
    write_description,
};
use serve_process::ServeProcess;

/// Runs `kopir ARGS` to completion.
fn kopir(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `kopir ARGS`, which must succeed; returns its standard output.
#[track_caller]
fn kopir_ok(args: &[&str]) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = kopir(&args);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kopir {args:?}: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn text(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The authority as a process with a management port, over the
/// federation's description, and its operator's commands.
struct Authority {
    _process: Process,
    /// Where it publishes the configuration.
    publication: SocketAddr,
    /// Its management port, `host:port`.
    management: String,
    /// Its TLS certificate (self-signed: the only root to trust for it).
    tls: PathBuf,
    /// The operator's client certificate and key.
    operator: (PathBuf, PathBuf),
}

impl Authority {
    fn start(dir: &Path, fed: &LocalFederation) -> Authority {
        write_description(dir, fed);
        make_tls_for(dir, &["127.0.0.1"]);
        let operator = fed.layout.operator();
        let state = dir.join("authority-state");
        let extra: [&std::ffi::OsStr; 6] = [
            "--management".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--state".as_ref(),
            state.as_os_str(),
            "--operator".as_ref(),
            operator.0.as_os_str(),
        ];
        let command = authority_command(&[], dir, "127.0.0.1:0", &extra);
        let management = Mutex::new(None);
        let (process, publication) = start_and_read(command, |line| {
            if let Some(addr) = line.strip_prefix("taking management requests at ") {
                *management.lock().unwrap() = addr.parse::<SocketAddr>().ok();
            }
            line.strip_prefix("publishing global configuration at https://")?
                .strip_suffix(PATH)?
                .parse()
                .ok()
        });
        let management = management.lock().unwrap().expect("a management address");
        Authority {
            _process: process,
            publication,
            management: management.to_string(),
            tls: dir.join("tls.crt"),
            operator,
        }
    }

    /// `kopir authority COMMAND EXTRA...` as its operator; its output.
    fn operator(&self, command: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "authority",
            command,
            "--management",
            &self.management,
            "--ca",
            text(&self.tls),
            "--cert",
            text(&self.operator.0),
            "--key",
            text(&self.operator.1),
        ];
        args.extend_from_slice(extra);
        kopir_ok(&args)
    }
}

/// The id in what `kopir server register` or `change` printed.
#[track_caller]
fn request_id(said: &str) -> String {
    said.strip_prefix("request ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no request id in {said:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_joins_from_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fed = LocalFederation::launch(dir, &|_, _| {}).await.unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    let authority = Authority::start(dir, &fed);
    let publication = authority.publication;
    let anchor = dir.join("anchor.json");
    write_anchor(dir, &[&format!("https://{publication}{PATH}")], &anchor);

    // The new server: its keys and CSR, and the CA's certificate.
    let ss2 = dir.join("ss2");
    let said = kopir_ok(&[
        "server",
        "init",
        "--server",
        "KZ/GOV/MLSPP/ss2",
        "--host",
        "127.0.0.1",
        "--out",
        text(&ss2),
    ]);
    assert!(said.contains("tls.csr"), "{said}");
    let again = kopir(&[
        "server".as_ref(),
        "init".as_ref(),
        "--server".as_ref(),
        "KZ/GOV/MLSPP/ss2".as_ref(),
        "--out".as_ref(),
        ss2.as_os_str(),
    ]);
    assert!(!again.status.success(), "init overwrote a key");
    kopir_ok(&[
        "certs",
        "issue",
        "--csr",
        text(&ss2.join("tls.csr")),
        "--ca-cert",
        text(&fed.layout.ca_cert()),
        "--ca-key",
        text(&fed.layout.ca_key()),
        "--out",
        text(&ss2.join("tls.crt")),
    ]);

    // Its configuration: MLSPP's, with its own identity, ports and data.
    let mut config = fed.nodes["mlspp"].config.clone();
    config.server_id = "KZ/GOV/MLSPP/ss2".parse().unwrap();
    config.data_dir = dir.join("data/ss2");
    config.tls.cert = ss2.join("tls.crt");
    config.tls.key = ss2.join("tls.key");
    let peer = free_port();
    config.listen.client = free_port();
    config.listen.peer = peer;
    config.listen.admin = Some(free_port());
    config.globalconf = GlobalConfSource {
        anchor: Some(anchor.clone()),
        refresh_secs: 1,
        connect_timeout_secs: 1,
        read_timeout_secs: 2,
        ..GlobalConfSource::default()
    };
    let config_path = ss2.join("server.toml");
    config.save(&config_path).unwrap();
    let log = std::fs::File::create(dir.join("ss2.log")).unwrap();
    let mut server = ServeProcess::start(&config_path, log, "info");
    let channel = server.benefits_channel(&fed).await;

    // Not listed yet: the provider does not know its certificate.
    let before = common::get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&before, Code::Unauthenticated, "peer.unknown");

    let (member_cert, member_key) = fed.layout.member_signing(&"KZ/GOV/MLSPP".parse().unwrap());
    let mgmt = authority.management.clone();
    let said = kopir_ok(&[
        "server",
        "register",
        "--dir",
        text(&ss2),
        "--address",
        &peer.to_string(),
        "--member-cert",
        text(&member_cert),
        "--member-key",
        text(&member_key),
        "--authority",
        &mgmt,
        "--authority-ca",
        text(&authority.tls),
    ]);
    let id = request_id(&said);
    assert!(
        said.contains("pending") && said.contains("new server KZ/GOV/MLSPP/ss2"),
        "{said}"
    );

    let operator = |command: &str, extra: &[&str]| authority.operator(command, extra);
    let listed = operator("requests", &[]);
    assert!(
        listed.contains(&id) && listed.contains("pending"),
        "{listed}"
    );

    // Bad requests change nothing and say why.
    bad_requests(&fed, &mgmt, dir, &ss2, &id).await;

    let approved_at = Instant::now();
    let said = operator("approve", &[&id, "--why", "second server of MLSPP"]);
    assert!(said.contains("approved"), "{said}");
    let served = common::until(&channel, &parent, Result::is_ok).await;
    let since = approved_at.elapsed();
    println!("approved: the new server's first exchange {since:?} after the approval");
    assert!(
        since < Duration::from_secs(3),
        "the new server took {since:?} (served after {served:?}), more than two refreshes of 1 s"
    );
    // Its operator sees where its configuration came from.
    let admin = config.listen.admin.unwrap().to_string();
    let status = kopir_ok(&[
        "server",
        "status",
        "--admin",
        &admin,
        "--ca",
        text(&fed.layout.ca_cert()),
        "--cert",
        text(&authority.operator.0),
        "--key",
        text(&authority.operator.1),
    ]);
    assert!(
        status.starts_with("usable: serial")
            && status.contains(&format!("from https://{publication}{PATH}")),
        "{status}"
    );
    let listed = operator("requests", &["--state", "approved"]);
    assert!(
        listed.contains(&id) && listed.contains("in the configuration from serial"),
        "{listed}"
    );

    // The log has every request and decision, and verifies.
    server.stop();
    drop(authority);
    let state = dir.join("authority-state");
    let query = kopir_ok(&["audit", "query", "--data-dir", text(&state)]);
    assert!(query.contains(&id), "{query}");
    let verify = kopir_ok(&["audit", "verify", "--data-dir", text(&state)]);
    // Submitted, refused (the 5 bad ones sent with a certificate of the
    // CA; the one without is only in the authority's process log), approved.
    assert!(
        verify.starts_with("ok: 7 records") && verify.contains("chain intact"),
        "{verify}"
    );
    fed.shutdown().await;
}

/// Requests the authority must refuse, each with its reason.
async fn bad_requests(fed: &LocalFederation, management: &str, dir: &Path, ss2: &Path, used: &str) {
    let roots = load_certs(&dir.join("tls.crt")).unwrap();
    let identity = (
        load_certs(&ss2.join("tls.crt")).unwrap(),
        load_key(&ss2.join("tls.key")).unwrap(),
    );
    let client = |identity| {
        let channel = kopir_consent::channel::ca_channel(
            management,
            &roots,
            identity,
            Duration::from_secs(5),
        )
        .unwrap();
        RegistrationClient::new(channel)
    };
    let (member_cert, member_key): (PathBuf, PathBuf) =
        fed.layout.member_signing(&"KZ/GOV/MLSPP".parse().unwrap());
    let member = SigningKey::load(&member_cert, &member_key).unwrap();
    let other = {
        let (c, k) = fed.layout.member_signing(&"KZ/GOV/SRC".parse().unwrap());
        SigningKey::load(&c, &k).unwrap()
    };
    let add_server = |id: &str, code: &str| Request {
        id: id.into(),
        member: "KZ/GOV/MLSPP".parse().unwrap(),
        created_at: time::OffsetDateTime::now_utc(),
        changes: vec![Change::AddServer {
            code: code.into(),
            address: "127.0.0.1:1".into(),
            tls_cert: std::fs::read_to_string(ss2.join("tls.crt")).unwrap(),
            subsystems: vec![],
        }],
    };
    let submit = |bytes: Vec<u8>, with_tls: bool| {
        let mut c = client(with_tls.then(|| (identity.0.clone(), identity.1.clone_key())));
        async move {
            c.submit(SubmitRequest {
                request: bytes.into(),
            })
            .await
        }
    };
    let cases: Vec<(Vec<u8>, bool, Code, &str)> = vec![
        (
            b"{ not a request".to_vec(),
            true,
            Code::InvalidArgument,
            "request.invalid",
        ),
        (
            vec![b' '; 70_000],
            true,
            Code::InvalidArgument,
            "request.invalid",
        ),
        (
            request::sign(&add_server("x-1", "ss3"), &[&other]),
            true,
            Code::PermissionDenied,
            "request.unauthorized",
        ),
        (
            request::sign(&add_server("x-2", "ss3"), &[&member]),
            false,
            Code::PermissionDenied,
            "request.unauthorized",
        ),
        (
            request::sign(&add_server(used, "ss3"), &[&member]),
            true,
            Code::FailedPrecondition,
            "request.decided",
        ),
        (
            request::sign(&add_server("x-3", "ss1"), &[&member]),
            true,
            Code::InvalidArgument,
            "request.invalid",
        ),
    ];
    for (bytes, with_tls, code, reason) in cases {
        let refused = submit(bytes, with_tls).await.unwrap_err();
        assert_refused(&refused, code, reason);
    }
}

/// A member's signing key rolled over under continuous load, by management
/// requests: the new certificate (its key made with openssl) is listed
/// beside the old, the consumer's server switches to it (a reload), the old
/// one is removed. No call fails; a signature by the old key is refused
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rolls_its_signing_key_over_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fed = LocalFederation::launch(dir, &|_, _| {}).await.unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    let authority = Authority::start(dir, &fed);
    let operator = |command: &str, extra: &[&str]| authority.operator(command, extra);
    // Approves the one request `change` makes; waits until the provider
    // works on a configuration that includes it.
    let approve = |said: String| {
        let id = request_id(&said);
        let approved = operator("approve", &[&id, "--why", "key rollover"]);
        assert!(approved.contains("approved"), "{approved}");
        id
    };
    let provider_has = |id: String| {
        let fed = &fed;
        let operator = &operator;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let listed = operator("requests", &["--state", "approved"]);
                let serial = listed
                    .split(&id)
                    .nth(1)
                    .and_then(|rest| rest.split("from serial ").nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|s| s.parse::<u64>().ok());
                let status = ServerStatusClient::new(fed.admin_channel("moj").await.unwrap())
                    .global_conf(GlobalConfStatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                if serial.is_some_and(|s| status.serial >= s) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the provider never took request {id}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // The next key, made and kept with the tools of a security team.
    let (next_key, next_csr, next_cert) = (
        dir.join("next.key"),
        dir.join("next.csr"),
        dir.join("next.crt"),
    );
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", text(&next_key)]);
    openssl(&[
        "req",
        "-new",
        "-key",
        text(&next_key),
        "-subj",
        "/CN=MLSPP signing 2027",
        "-out",
        text(&next_csr),
    ]);
    kopir_ok(&[
        "certs",
        "issue",
        "--signing",
        "--csr",
        text(&next_csr),
        "--ca-cert",
        text(&fed.layout.ca_cert()),
        "--ca-key",
        text(&fed.layout.ca_key()),
        "--out",
        text(&next_cert),
    ]);
    let (old_cert, old_key) = fed.layout.member_signing(&"KZ/GOV/MLSPP".parse().unwrap());
    let change = |cert: &Path, key: &Path, extra: &[&str]| {
        let mut args = vec![
            "server",
            "change",
            "--member",
            "KZ/GOV/MLSPP",
            "--member-cert",
            text(cert),
            "--member-key",
            text(key),
            "--authority",
            &authority.management,
            "--authority-ca",
            text(&authority.tls),
        ];
        args.extend_from_slice(extra);
        kopir_ok(&args)
    };

    let channel = fed
        .client_channel("mlspp", "KZ/GOV/MLSPP/benefits")
        .await
        .unwrap();
    common::until(&channel, &parent, Result::is_ok).await;
    let load = Load::on(&channel, &parent);
    // 1. Listed beside the old one.
    let id = approve(change(
        &old_cert,
        &old_key,
        &[
            "--add-signing-cert",
            text(&next_cert),
            "--new-signing-key",
            text(&next_key),
        ],
    ));
    provider_has(id).await;
    // 2. The consumer's server signs with it.
    let mlspp = fed.node("mlspp");
    let mut config = mlspp.config.clone();
    config.signing.cert = next_cert.clone();
    config.signing.key = next_key.clone();
    mlspp.server.reload(config.clone()).await.unwrap();
    // 3. The old one goes, by a request the new key signs.
    let id = approve(change(
        &next_cert,
        &next_key,
        &["--remove-signing-cert", text(&old_cert)],
    ));
    provider_has(id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish()
        .await
        .report("member signing key rollover under load");

    // The old key no longer signs for MLSPP.
    let mut old = config;
    old.signing.cert = old_cert;
    old.signing.key = old_key;
    mlspp.server.reload(old).await.unwrap();
    let refused = common::get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::Unauthenticated, "signature.unknown_key");
    fed.shutdown().await;
}
