//! The global configuration over the network, with every part its own
//! process: `kopir authority serve` over HTTPS, a plain file server
//! (Python's `http.server`) as an untrusted mirror, and the consumer's and
//! provider's security servers as `kopir serve` downloading with an anchor
//! that `kopir authority anchor` wrote.
//!
//! - A mirror serving a forged, truncated, oversized or rolled-back copy is
//!   refused and the next source (the authority) used.
//! - The authority and the mirror down: exchanges go on with the copy in
//!   use; a server restarted then starts from its kept copy; past the
//!   expiry, `globalconf.stale`; the authority back: served again within a
//!   refresh (the time it took is printed).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use kopir_core::{config::GlobalConfSource, durable::write_atomically};
use kopir_proto::v1::{
    GlobalConfStatus, GlobalConfStatusRequest, server_status_client::ServerStatusClient,
};
use kopir_server::config::ServerConfig;
use kopir_testkit::federation::LocalFederation;
use tonic::{Code, transport::Channel};

mod common;
mod serve_process;

use common::{assert_refused, until};
use serve_process::ServeProcess;

const PATH: &str = "/globalconf/v1/globalconf.json";
/// How long each document the authority signs is valid.
const VALID_FOR: Duration = Duration::from_secs(12);
/// The largest copy the servers accept.
const MAX_BYTES: usize = 256 * 1024;

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and returns it with the first line of its standard
/// output that `wanted` accepts, mapped (within 30 s).
fn start_and_read<T>(mut command: Command, wanted: impl Fn(&str) -> Option<T>) -> (Process, T) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{command:?} never printed the awaited line"));
        if let Some(found) = wanted(&line) {
            return (process, found);
        }
    }
}

/// `kopir authority serve` over HTTPS on `listen`, re-signing every second
/// and writing each document to `DIR/globalconf.json` too (where the
/// in-process servers of the federation read it); returns its address.
fn authority(dir: &Path, listen: &str) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kopir"));
    command
        .args(["authority", "serve", "--every", "1s", "--listen", listen])
        .arg("--valid-for")
        .arg(format!("{}s", VALID_FOR.as_secs()))
        .arg("--federation")
        .arg(dir.join("authority.toml"))
        .arg("--tls-cert")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        .arg("--out")
        .arg(dir.join("globalconf.json"));
    start_and_read(command, |line| {
        line.strip_prefix("publishing global configuration at https://")?
            .strip_suffix(PATH)?
            .parse()
            .ok()
    })
}

/// A plain file server on `folder`; returns its port.
fn mirror(folder: &Path) -> (Process, u16) {
    let mut command = Command::new("python3");
    command
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(folder);
    start_and_read(command, |line| {
        line.split(" port ").nth(1)?.split(' ').next()?.parse().ok()
    })
}

/// The certificate the authority serves HTTPS with, for 127.0.0.1.
fn make_tls(dir: &Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

/// One security server as a process downloading with the anchor.
struct Server {
    process: ServeProcess,
    config: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Stops node `name` of `fed` and starts it again as a process whose
    /// configuration names `anchor`.
    async fn start(fed: &mut LocalFederation, name: &str, anchor: &Path) -> Server {
        let config = fed.stop_node(name).await.unwrap();
        let mut loaded = ServerConfig::load(&config).unwrap();
        loaded.globalconf = GlobalConfSource {
            anchor: Some(anchor.to_path_buf()),
            path: None,
            anchors: vec![],
            refresh_secs: 1,
            connect_timeout_secs: 1,
            read_timeout_secs: 2,
            max_bytes: MAX_BYTES,
        };
        loaded.save(&config).unwrap();
        let log = fed.dir.join(format!("{name}.log"));
        Server {
            process: Self::run(&config, &log),
            admin: loaded.listen.admin.unwrap(),
            config,
            log,
        }
    }

    fn run(config: &Path, log: &Path) -> ServeProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        ServeProcess::start(config, file, "info")
    }

    /// Kills it (no clean stop) and starts it again on the same files.
    fn restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.process.pid().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        self.process = Self::run(&self.config, &self.log);
    }

    async fn status(&self, fed: &LocalFederation) -> GlobalConfStatus {
        let (cert, key) = fed.layout.operator();
        let identity = Some((
            kopir_core::pki::load_certs(&cert).unwrap(),
            kopir_core::pki::load_key(&key).unwrap(),
        ));
        let channel: Channel = fed.channel_to(self.admin, identity).await.unwrap();
        ServerStatusClient::new(channel)
            .global_conf(GlobalConfStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits (at most 15 s) until its status holds.
    async fn until_status(
        &self,
        fed: &LocalFederation,
        what: &str,
        ok: impl Fn(&GlobalConfStatus) -> bool,
    ) -> GlobalConfStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = self.status(fed).await;
            if ok(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "never {what}; last {status:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_download_from_the_authority_and_a_plain_file_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut fed = LocalFederation::launch(dir, &|_, _| {}).await.unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    std::fs::write(
        dir.join("authority.toml"),
        toml::to_string(&fed.description).unwrap(),
    )
    .unwrap();
    make_tls(dir);
    let (auth, addr) = authority(dir, "127.0.0.1:0");
    let mut authority_process = Some(auth);
    let folder = dir.join("mirror");
    std::fs::create_dir(&folder).unwrap();
    let (_mirror, mirror_port) = mirror(&folder);
    let authority_url = format!("https://{addr}{PATH}");
    let mirror_url = format!("http://127.0.0.1:{mirror_port}/globalconf.json");

    // The anchor, as an operator gets it.
    let anchor = dir.join("anchor.json");
    let wrote = Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args([
            "authority",
            "anchor",
            "--source",
            &authority_url,
            "--source",
            &mirror_url,
        ])
        .arg("--federation")
        .arg(dir.join("authority.toml"))
        .arg("--tls-root")
        .arg(dir.join("tls.crt"))
        .arg("--out")
        .arg(&anchor)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&wrote.stdout);
    assert!(wrote.status.success() && said.contains("SHA-256"), "{said}");

    let moj = Server::start(&mut fed, "moj", &anchor).await;
    let mut mlspp = Server::start(&mut fed, "mlspp", &anchor).await;
    let channel = mlspp.process.benefits_channel(&fed).await;
    until(&channel, &parent, Result::is_ok).await;
    let status = mlspp
        .until_status(&fed, "used the authority", |s| {
            s.checked_from == authority_url
        })
        .await;
    assert!(
        status.usable && status.obtained_from == authority_url,
        "{status:#?}"
    );
    let rolled_back = std::fs::read(dir.join("globalconf.json")).unwrap();

    // A mirror is tried once the authority is down; what it serves is
    // refused when bad, and the authority, back, is used instead.
    let oversized = [b' '; MAX_BYTES + 1].to_vec();
    let truncated = {
        let good = std::fs::read(dir.join("globalconf.json")).unwrap();
        good[..good.len() / 2].to_vec()
    };
    let forged = String::from_utf8(std::fs::read(dir.join("globalconf.json")).unwrap())
        .unwrap()
        .replace("\"signature\": \"", "\"signature\": \"AAAA")
        .into_bytes();
    for (bad, why) in [
        (forged, "forged or altered"),
        (truncated, "not a signed global configuration"),
        (oversized, "larger than the limit"),
        (rolled_back, "rollback refused"),
    ] {
        let good = std::fs::read(dir.join("globalconf.json")).unwrap();
        write_atomically(&folder.join("globalconf.json"), &good).unwrap();
        drop(authority_process.take());
        mlspp
            .until_status(&fed, "used the mirror", |s| s.checked_from == mirror_url)
            .await;
        write_atomically(&folder.join("globalconf.json"), &bad).unwrap();
        authority_process = Some(authority(dir, &addr.to_string()).0);
        let status = mlspp
            .until_status(&fed, &format!("refused the mirror's copy ({why})"), |s| {
                s.sources[1].last_error.contains(why) && s.checked_from == authority_url
            })
            .await;
        assert!(status.usable, "{status:#?}");
        common::get_person(&channel, &parent, "child-benefit")
            .await
            .unwrap();
    }

    // No source at all: exchanges go on with the copy in use, and a server
    // restarted now starts from the copy it kept.
    std::fs::remove_file(folder.join("globalconf.json")).unwrap();
    drop(authority_process.take());
    mlspp
        .until_status(&fed, "found no source", |s| {
            s.sources.iter().all(|source| !source.last_error.is_empty())
                && s.sources[1].last_error.contains("HTTP 404")
        })
        .await;
    common::get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap();
    mlspp.restart();
    let channel = mlspp.process.benefits_channel(&fed).await;
    common::get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap();
    let status = mlspp.status(&fed).await;
    assert!(status.obtained_from.starts_with("kept copy"), "{status:#?}");

    // Past the expiry: refused as stale. The authority back: served again.
    until(&channel, &parent, |r| {
        r.as_ref().is_err_and(|s| {
            s.metadata()
                .get("kopir-error")
                .is_some_and(|v| v == "globalconf.stale")
        })
    })
    .await;
    let refused = common::get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.stale");
    let (_back, _) = authority(dir, &addr.to_string());
    let served_after = until(&channel, &parent, Result::is_ok).await;
    println!("the authority back: exchanges served again after {served_after:?}");
    assert!(
        served_after < Duration::from_secs(4),
        "took {served_after:?} with a refresh of 1 s"
    );
    drop(moj);
    fed.shutdown().await;
}
