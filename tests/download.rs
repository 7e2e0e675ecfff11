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
//! - The authority's key rotated under continuous load: announced, then
//!   used; no call fails (the calls made and failed are printed).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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
    authority_with(dir, listen, &[])
}

/// [`authority`] with more arguments (another key, keys to announce).
fn authority_with(dir: &Path, listen: &str, extra: &[&std::ffi::OsStr]) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kopir"));
    command
        .args(["authority", "serve", "--every", "1s", "--listen", listen])
        .args(extra)
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

/// The federation with the authority and the mirror as processes, and the
/// consumer's and provider's servers downloading with an anchor made before
/// anything else happened.
struct Net {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fed: LocalFederation,
    parent: String,
    addr: SocketAddr,
    authority: Option<Process>,
    _mirror: Process,
    folder: PathBuf,
    authority_url: String,
    mirror_url: String,
    moj: Server,
    mlspp: Server,
    channel: Channel,
}

impl Net {
    async fn start() -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut fed = LocalFederation::launch(&dir, &|_, _| {}).await.unwrap();
        let parent = fed.dataset.sample_parents(1)[0].to_string();
        std::fs::write(
            dir.join("authority.toml"),
            toml::to_string(&fed.description).unwrap(),
        )
        .unwrap();
        make_tls(&dir);
        let (authority, addr) = authority(&dir, "127.0.0.1:0");
        let folder = dir.join("mirror");
        std::fs::create_dir(&folder).unwrap();
        let (mirror, mirror_port) = mirror(&folder);
        let authority_url = format!("https://{addr}{PATH}");
        let mirror_url = format!("http://127.0.0.1:{mirror_port}/globalconf.json");

        // The anchor, as an operator gets it.
        let anchor = dir.join("anchor.json");
        let wrote = Command::new(env!("CARGO_BIN_EXE_kopir"))
            .args(["authority", "anchor", "--source", &authority_url])
            .args(["--source", &mirror_url])
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
        Net {
            _tmp: tmp,
            dir,
            fed,
            parent,
            addr,
            authority: Some(authority),
            _mirror: mirror,
            folder,
            authority_url,
            mirror_url,
            moj,
            mlspp,
            channel,
        }
    }

    /// The authority stopped, then started again on its address with `extra`.
    fn restart_authority(&mut self, extra: &[&std::ffi::OsStr]) {
        drop(self.authority.take());
        self.authority = Some(authority_with(&self.dir, &self.addr.to_string(), extra).0);
    }

    async fn exchange(&self) -> Result<(), tonic::Status> {
        common::get_person(&self.channel, &self.parent, "child-benefit").await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_download_from_the_authority_and_a_plain_file_mirror() {
    let mut net = Net::start().await;
    let status = net
        .mlspp
        .until_status(&net.fed, "used the authority", |s| {
            s.checked_from == net.authority_url
        })
        .await;
    assert!(
        status.usable && status.obtained_from == net.authority_url,
        "{status:#?}"
    );
    let published = net.dir.join("globalconf.json");
    let mirrored = net.folder.join("globalconf.json");
    let rolled_back = std::fs::read(&published).unwrap();

    // A mirror is tried once the authority is down; what it serves is
    // refused when bad, and the authority, back, is used instead.
    let oversized = [b' '; MAX_BYTES + 1].to_vec();
    let truncated = {
        let good = std::fs::read(&published).unwrap();
        good[..good.len() / 2].to_vec()
    };
    let forged = String::from_utf8(std::fs::read(&published).unwrap())
        .unwrap()
        .replace("\"signature\": \"", "\"signature\": \"AAAA")
        .into_bytes();
    for (bad, why) in [
        (forged, "forged or altered"),
        (truncated, "not a signed global configuration"),
        (oversized, "larger than the limit"),
        (rolled_back, "rollback refused"),
    ] {
        write_atomically(&mirrored, &std::fs::read(&published).unwrap()).unwrap();
        drop(net.authority.take());
        net.mlspp
            .until_status(&net.fed, "used the mirror", |s| {
                s.checked_from == net.mirror_url
            })
            .await;
        write_atomically(&mirrored, &bad).unwrap();
        net.restart_authority(&[]);
        let status = net
            .mlspp
            .until_status(
                &net.fed,
                &format!("refused the mirror's copy ({why})"),
                |s| s.sources[1].last_error.contains(why) && s.checked_from == net.authority_url,
            )
            .await;
        assert!(status.usable, "{status:#?}");
        net.exchange().await.unwrap();
    }

    // No source at all: exchanges go on with the copy in use, and a server
    // restarted now starts from the copy it kept.
    std::fs::remove_file(&mirrored).unwrap();
    drop(net.authority.take());
    net.mlspp
        .until_status(&net.fed, "found no source", |s| {
            s.sources.iter().all(|source| !source.last_error.is_empty())
                && s.sources[1].last_error.contains("HTTP 404")
        })
        .await;
    net.exchange().await.unwrap();
    net.mlspp.restart();
    net.channel = net.mlspp.process.benefits_channel(&net.fed).await;
    net.exchange().await.unwrap();
    let status = net.mlspp.status(&net.fed).await;
    assert!(status.obtained_from.starts_with("kept copy"), "{status:#?}");

    // Past the expiry: refused as stale. The authority back: served again.
    until(&net.channel, &net.parent, |r| {
        r.as_ref().is_err_and(|s| {
            s.metadata()
                .get("kopir-error")
                .is_some_and(|v| v == "globalconf.stale")
        })
    })
    .await;
    let refused = net.exchange().await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.stale");
    net.restart_authority(&[]);
    let served_after = until(&net.channel, &net.parent, Result::is_ok).await;
    println!("the authority back: exchanges served again after {served_after:?}");
    assert!(
        served_after < Duration::from_secs(4),
        "took {served_after:?} with a refresh of 1 s"
    );
    net.fed.shutdown().await;
}

/// Calls through the consumer's server without pause, counted, until
/// [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Calls>,
}

/// What a [`Load`] did.
#[derive(Debug, Default)]
struct Calls {
    made: u64,
    failed: u64,
    first_failure: Option<String>,
}

impl Load {
    fn start(net: &Net) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (channel, parent) = (net.channel.clone(), net.parent.clone());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut calls = Calls::default();
            while !stopped.load(Ordering::Relaxed) {
                calls.made += 1;
                if let Err(e) = common::get_person(&channel, &parent, "child-benefit").await {
                    calls.failed += 1;
                    calls.first_failure.get_or_insert_with(|| format!("{e:?}"));
                }
            }
            calls
        });
        Load { stop, task }
    }

    async fn finish(self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The authority's key rotated under continuous load with the anchor made
/// before it: the next key (made with openssl) is announced, then signs;
/// both servers follow, no call fails, and a server restarted afterwards
/// starts from its kept copy, which the anchor's key did not sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_key_rotates_under_load() {
    let mut net = Net::start().await;
    let (next_key, next_cert) = (net.dir.join("next.key"), net.dir.join("next.crt"));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "ed25519".as_ref(),
        "-out".as_ref(),
        next_key.as_os_str(),
    ]);
    openssl(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-x509".as_ref(),
        "-days".as_ref(),
        "30".as_ref(),
        "-subj".as_ref(),
        "/CN=kopir authority next".as_ref(),
        "-key".as_ref(),
        next_key.as_os_str(),
        "-out".as_ref(),
        next_cert.as_os_str(),
    ]);
    let next_id = hex::encode(kopir_core::pki::cert_fingerprint(&next_cert).unwrap().0);
    let load = Load::start(&net);

    // Announced: both servers trust both keys.
    net.restart_authority(&["--announce".as_ref(), next_cert.as_os_str()]);
    for server in [&net.mlspp, &net.moj] {
        server
            .until_status(&net.fed, "trusted the next key", |s| {
                s.authority_keys.len() == 2 && s.authority_keys.contains(&next_id)
            })
            .await;
    }
    // Used: the next key signs, and announces only itself.
    net.restart_authority(&[
        "--cert".as_ref(),
        next_cert.as_os_str(),
        "--key".as_ref(),
        next_key.as_os_str(),
    ]);
    for server in [&net.mlspp, &net.moj] {
        server
            .until_status(&net.fed, "took a copy the next key signed", |s| {
                s.usable && s.authority_keys == [next_id.clone()]
            })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = load.finish().await;
    println!(
        "authority key rotation under load: {} calls made, {} failed",
        calls.made, calls.failed
    );
    assert!(calls.made > 0 && calls.failed == 0, "{calls:?}");

    // With no source, the restarted server can only use its kept copy.
    drop(net.authority.take());
    net.mlspp.restart();
    net.channel = net.mlspp.process.benefits_channel(&net.fed).await;
    net.exchange().await.unwrap();
    let status = net.mlspp.status(&net.fed).await;
    assert!(
        status.obtained_from.starts_with("kept copy") && status.authority_keys == [next_id],
        "{status:#?}"
    );
    net.fed.shutdown().await;
}
