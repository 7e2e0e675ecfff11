//! A security server run as its own `kopir serve` process, for tests that
//! give it an environment of its own (its standard error, its disk, a
//! SIGKILL), and what is checked afterwards.

#![allow(dead_code)] // each test binary uses some of them

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use kopir_audit::{
    Step,
    store::{Location, open_existing},
};
use kopir_core::pki::{load_certs, load_key};
use kopir_server::config::ServerConfig;
use kopir_testkit::federation::{BENEFITS, LocalFederation};
use tonic::transport::Channel;

/// One `kopir serve` process, killed when dropped.
pub struct ServeProcess {
    child: Child,
    /// Where its client port listens.
    pub client_addr: SocketAddr,
}

impl ServeProcess {
    /// Starts `kopir serve --config CONFIG` with its standard output and
    /// error going to `stderr`, logging at `filter`.
    pub fn start(config: &std::path::Path, stderr: File, filter: &str) -> Self {
        let client_addr = ServerConfig::load(config).unwrap().listen.client;
        let child = Command::new(env!("CARGO_BIN_EXE_kopir"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self { child, client_addr }
    }

    /// A channel from the benefits system to its client port, once the
    /// server accepts connections (within 10 s).
    pub async fn benefits_channel(&mut self, fed: &LocalFederation) -> Channel {
        let (cert, key) = fed.layout.client(&BENEFITS.parse().unwrap());
        for _ in 0..500 {
            self.assert_running();
            let identity = Some((load_certs(&cert).unwrap(), load_key(&key).unwrap()));
            if let Ok(c) = fed.channel_to(self.client_addr, identity).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the server did not accept connections within 10 s");
    }

    /// Its process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("kopir serve exited: {status}");
        }
    }

    /// SIGTERM, then waits for a clean stop (final checkpoint written).
    pub fn stop(mut self) {
        self.assert_running();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        for _ in 0..1000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "kopir serve stopped with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("kopir serve did not stop within 10 s of SIGTERM");
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kopir audit verify --config FILE`, as an auditor would run it: its
/// output, and whether it passed.
pub fn audit_verify(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args(["audit", "verify", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The path of a configuration file saved by the federation.
pub fn data_dir(config: &std::path::Path) -> PathBuf {
    ServerConfig::load(config).unwrap().data_dir
}

/// Asserts that every exchange in `acknowledged` (request ids the client saw
/// succeed) has exactly the records `expected` in the embedded store of the
/// server configured by `config`: nothing acknowledged was lost.
pub async fn assert_recorded(
    config: &std::path::Path,
    acknowledged: &[String],
    expected: [Step; 2],
) {
    let config = ServerConfig::load(config).unwrap();
    let store = open_existing(&Location::new(&config.data_dir, None))
        .await
        .unwrap();
    for id in acknowledged {
        let steps: Vec<Step> = store
            .by_request(id.clone())
            .await
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(
            steps, expected,
            "{}: exchange {id} succeeded but its records are {steps:?}",
            config.server_id
        );
    }
}
