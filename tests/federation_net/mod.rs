//! The federation with every part its own process, for the tests of the
//! global configuration over the network: `kopir authority serve` over
//! HTTPS, a plain file server (Python's `http.server`) as an untrusted
//! mirror, and the consumer's and provider's security servers as `kopir
//! serve` downloading with an anchor that `kopir authority anchor` wrote.

#![allow(dead_code)] // each test binary uses some of them

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use kopir_core::config::GlobalConfSource;
use kopir_proto::v1::{
    GlobalConfStatus, GlobalConfStatusRequest, server_status_client::ServerStatusClient,
};
use kopir_server::config::ServerConfig;
use kopir_testkit::federation::LocalFederation;
use tonic::transport::Channel;

use crate::{
    common::{self, until},
    serve_process::ServeProcess,
};

pub const PATH: &str = "/globalconf/v1/globalconf.json";
/// How long each document the authority signs is valid.
pub const VALID_FOR: Duration = Duration::from_secs(12);
/// The largest copy the servers accept.
pub const MAX_BYTES: usize = 256 * 1024;

/// A child process, killed when dropped.
pub struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and returns it with the first line of its standard
/// output that `wanted` accepts, mapped (within 30 s).
pub fn start_and_read<T>(mut command: Command, wanted: impl Fn(&str) -> Option<T>) -> (Process, T) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let process = Process(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // What it says on standard error, for when it fails (kept to 64 lines).
    let said = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = said.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut kept = keep.lock().unwrap();
            if kept.len() < 64 {
                kept.push(line);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| {
                panic!(
                    "{command:?} never printed the awaited line ({e}); it said: {}",
                    said.lock().unwrap().join("\n")
                )
            });
        if let Some(found) = wanted(&line) {
            return (process, found);
        }
    }
}

/// `kopir authority serve` over HTTPS on `listen`, re-signing every second
/// and writing each document to `DIR/globalconf.json` too (where the
/// in-process servers of the federation read it); returns its address.
pub fn authority(dir: &Path, listen: &str) -> (Process, SocketAddr) {
    authority_with(dir, listen, &[])
}

/// [`authority`] with more arguments (another key, keys to announce).
pub fn authority_with(
    dir: &Path,
    listen: &str,
    extra: &[&std::ffi::OsStr],
) -> (Process, SocketAddr) {
    authority_via(&[], dir, listen, extra)
}

/// A free loopback port below the ephemeral range (32768 and up), for a
/// process restarted on the same address: a listener bound to port 0
/// elsewhere never takes it.
pub fn restartable_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let start = (nanos ^ std::process::id()) % 12_000;
    (0..12_000)
        .map(|i| 20_000 + ((start + i) % 12_000) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port between 20000 and 32000")
}

/// Writes the federation's description where the authority process reads
/// it (`DIR/authority.toml`), with the addresses the test bound.
pub fn write_description(dir: &Path, fed: &LocalFederation) {
    std::fs::write(
        dir.join("authority.toml"),
        toml::to_string(&fed.description).unwrap(),
    )
    .unwrap();
}

/// The `kopir authority serve` command of [`authority_via`], to start with
/// [`start_and_read`] when more than its address is wanted.
pub fn authority_command(
    prefix: &[&std::ffi::OsStr],
    dir: &Path,
    listen: &str,
    extra: &[&std::ffi::OsStr],
) -> Command {
    let kopir = env!("CARGO_BIN_EXE_kopir");
    let mut command = match prefix.split_first() {
        None => Command::new(kopir),
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(kopir);
            command
        }
    };
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
    command
}

/// [`authority_with`] started through the command `prefix` names, which
/// then runs `kopir` with its arguments: `ip netns exec NS` runs the
/// authority in network namespace `NS`. The address returned is the one it
/// printed (`0.0.0.0:PORT` for `--listen 0.0.0.0:0`).
pub fn authority_via(
    prefix: &[&std::ffi::OsStr],
    dir: &Path,
    listen: &str,
    extra: &[&std::ffi::OsStr],
) -> (Process, SocketAddr) {
    let command = authority_command(prefix, dir, listen, extra);
    start_and_read(command, |line| {
        line.strip_prefix("publishing global configuration at https://")?
            .strip_suffix(PATH)?
            .parse()
            .ok()
    })
}

/// A plain file server on `folder`; returns its port.
pub fn mirror(folder: &Path) -> (Process, u16) {
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
pub fn make_tls(dir: &Path) {
    make_tls_for(dir, &["127.0.0.1"]);
}

/// The certificate the authority serves HTTPS with (`DIR/tls.crt`, its key
/// `DIR/tls.key`), self-signed, for each of `names` (IP addresses or DNS
/// names): one per address the servers reach it at.
pub fn make_tls_for(dir: &Path, names: &[&str]) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let params = rcgen::CertificateParams::new(names).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

/// Writes the anchor `out` naming `sources` in that order, as an operator
/// gets it: `kopir authority anchor` with the description in
/// `DIR/authority.toml` and `DIR/tls.crt` as the only HTTPS root.
pub fn write_anchor(dir: &Path, sources: &[&str], out: &Path) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kopir"));
    command.args(["authority", "anchor"]);
    for source in sources {
        command.args(["--source", source]);
    }
    let wrote = command
        .arg("--federation")
        .arg(dir.join("authority.toml"))
        .arg("--tls-root")
        .arg(dir.join("tls.crt"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&wrote.stdout);
    assert!(wrote.status.success() && said.contains("SHA-256"), "{said}");
}

/// One security server as a process downloading with the anchor.
pub struct Server {
    pub process: ServeProcess,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Stops node `name` of `fed` and starts it again as a process whose
    /// configuration names `anchor`.
    pub async fn start(fed: &mut LocalFederation, name: &str, anchor: &Path) -> Server {
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

    pub fn run(config: &Path, log: &Path) -> ServeProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        ServeProcess::start(config, file, "info")
    }

    /// Kills it (no clean stop) and starts it again on the same files.
    pub fn restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.process.pid().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        self.process = Self::run(&self.config, &self.log);
    }

    pub async fn status(&self, fed: &LocalFederation) -> GlobalConfStatus {
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
    pub async fn until_status(
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
pub struct Net {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub fed: LocalFederation,
    pub parent: String,
    pub addr: SocketAddr,
    pub authority: Option<Process>,
    _mirror: Process,
    pub folder: PathBuf,
    pub authority_url: String,
    pub mirror_url: String,
    pub moj: Server,
    pub mlspp: Server,
    pub channel: Channel,
}

impl Net {
    pub async fn start() -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut fed = LocalFederation::launch(&dir, &|_, _| {}).await.unwrap();
        let parent = fed.dataset.sample_parents(1)[0].to_string();
        write_description(&dir, &fed);
        make_tls(&dir);
        // Restarted on the same address: a port below the ephemeral range,
        // which no other test's `127.0.0.1:0` can take in between.
        let (authority, addr) = authority(&dir, &format!("127.0.0.1:{}", restartable_port()));
        let folder = dir.join("mirror");
        std::fs::create_dir(&folder).unwrap();
        let (mirror, mirror_port) = mirror(&folder);
        let authority_url = format!("https://{addr}{PATH}");
        let mirror_url = format!("http://127.0.0.1:{mirror_port}/globalconf.json");

        // The anchor, as an operator gets it.
        let anchor = dir.join("anchor.json");
        write_anchor(&dir, &[&authority_url, &mirror_url], &anchor);

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
    pub fn restart_authority(&mut self, extra: &[&std::ffi::OsStr]) {
        drop(self.authority.take());
        self.authority = Some(authority_with(&self.dir, &self.addr.to_string(), extra).0);
    }

    pub async fn exchange(&self) -> Result<(), tonic::Status> {
        common::get_person(&self.channel, &self.parent, "child-benefit").await
    }
}

/// Calls through the consumer's server without pause, counted, until
/// [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Calls>,
}

/// What a [`Load`] did.
#[derive(Debug, Default)]
pub struct Calls {
    pub made: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl Calls {
    /// Prints what was made and failed during `what`, and asserts that
    /// calls were made and none failed.
    #[track_caller]
    pub fn report(&self, what: &str) {
        println!("{what}: {} calls made, {} failed", self.made, self.failed);
        assert!(self.made > 0 && self.failed == 0, "{what}: {self:?}");
    }
}

impl Load {
    pub fn start(net: &Net) -> Load {
        Self::on(&net.channel, &net.parent)
    }

    /// Calls for `parent` through the server at the other end of `channel`.
    pub fn on(channel: &Channel, parent: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (channel, parent) = (channel.clone(), parent.to_owned());
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

    pub async fn finish(self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}
