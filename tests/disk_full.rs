//! A security server whose disk fills up refuses exchanges precisely
//! (`audit.unavailable`), never with a bare `CANCELLED`, and takes them again
//! without a restart once space is freed; nothing it acknowledged is lost.
//!
//! The consumer's server runs as its own `kopir serve` process with its data
//! directory and its log on an 8 MiB tmpfs. Three rounds: a filler file takes
//! every free byte, exchanges go on until the server refuses them, the filler
//! is removed and the time until the next exchange succeeds is measured. In
//! the first round the disk fills before the journal's files have grown, so
//! the journal's first write fails; later rounds meet the full disk wherever
//! it bites first (the journal or the folds into SQLite). Then the server is
//! stopped, `kopir audit verify` must pass and every exchange the client saw
//! succeed must have both of its records.
//!
//! Mounting needs root (CAP_SYS_ADMIN); without it the test says so and
//! skips.

mod common;
mod serve_process;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::with_meta;
use kopir_audit::Step;
use kopir_core::{
    error::ERROR_KEY,
    pki::{load_certs, load_key},
};
use kopir_proto::v1::{
    AuditStatsRequest, AuditStatsResponse, audit_service_client::AuditServiceClient,
};
use kopir_server::config::ServerConfig;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use serve_process::{ServeProcess, assert_recorded, audit_verify};
use tonic::{Code, transport::Channel};

/// The tmpfs's size.
const DISK: &str = "8m";
/// Rounds of filling and freeing.
const ROUNDS: usize = 3;
/// Exchanges that must succeed after each resume.
const AFTER_RESUME: usize = 30;
/// The longest a round may take to be refused once the disk is full, and to
/// resume once it is freed.
const BOUND: Duration = Duration::from_secs(30);

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one at `dir`, or says why it cannot.
    fn mount(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DISK}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the disk is full; returns the bytes it took.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut took = 0u64;
    for size in [chunk.len(), 4096, 512, 1] {
        loop {
            match file.write(&chunk[..size]) {
                Ok(n) if n > 0 => took += n as u64,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }
    took
}

/// One exchange with a fresh request id: `Ok(id)` if it succeeded.
async fn exchange(channel: &Channel, parent: &str, n: usize) -> Result<String, tonic::Status> {
    let id = format!("disk-{n}");
    let subject = format!("iin:{parent}");
    let mut request = with_meta(
        GetPersonRequest {
            iin: parent.to_owned(),
        },
        &[
            ("kopir-client", BENEFITS),
            ("kopir-service", "KZ/GOV/MOJ/population"),
            ("kopir-purpose", "child-benefit"),
            ("kopir-subject", &subject),
            ("kopir-request-id", &id),
        ],
    );
    request.set_timeout(Duration::from_secs(10));
    PopulationRegistryClient::new(channel.clone())
        .get_person(request)
        .await
        .map(|_| id)
}

/// A refusal of a server with a full disk: `UNAVAILABLE` with
/// `audit.unavailable`, nothing else.
#[track_caller]
fn assert_audit_unavailable(status: &tonic::Status) {
    let reason = status
        .metadata()
        .get(ERROR_KEY)
        .and_then(|v| v.to_str().ok());
    assert_eq!(
        (status.code(), reason),
        (Code::Unavailable, Some("audit.unavailable")),
        "a full disk refuses precisely: {status:?}"
    );
}

/// `AuditService.Stats` from the server's admin port, as its operator.
async fn admin_stats(fed: &LocalFederation, config: &ServerConfig) -> AuditStatsResponse {
    let (cert, key) = fed.layout.operator();
    let identity = Some((load_certs(&cert).unwrap(), load_key(&key).unwrap()));
    let admin = config.listen.admin.expect("an admin port");
    let channel = fed.channel_to(admin, identity).await.unwrap();
    AuditServiceClient::new(channel)
        .stats(AuditStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_precisely_and_exchanges_resume_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match Tmpfs::mount(&dir.path().join("disk")) {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipped: cannot mount a {DISK} tmpfs to fill ({why}); needs root");
            return;
        }
    };
    let mut fed = LocalFederation::launch(&dir.path().join("fed"), &|_, _| {})
        .await
        .unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    // The consumer's server, with a fresh data directory on the small disk.
    let config_path = fed.stop_node("mlspp").await.unwrap();
    let mut config = ServerConfig::load(&config_path).unwrap();
    config.data_dir = disk.0.join("data");
    config.save(&config_path).unwrap();
    let log = std::fs::File::create(disk.0.join("serve.log")).unwrap();
    let mut server = ServeProcess::start(&config_path, log, "info");
    let channel = server.benefits_channel(&fed).await;

    let filler = disk.0.join("filler");
    let mut acknowledged = Vec::new();
    let mut n = 0;
    let mut resumes = Vec::new();
    for round in 1..=ROUNDS {
        let took = fill(&filler);
        // Until the server notices: each call succeeds or is refused
        // precisely; what succeeded is acknowledged and must be kept.
        let started = Instant::now();
        let (mut refused, mut still_ok) = (0, 0);
        while refused < 20 {
            n += 1;
            match exchange(&channel, &parent, n).await {
                Ok(id) => {
                    acknowledged.push(id);
                    still_ok += 1;
                }
                Err(status) => {
                    assert_audit_unavailable(&status);
                    refused += 1;
                }
            }
            assert!(
                started.elapsed() < BOUND,
                "round {round}: still no refusal {BOUND:?} after the disk filled"
            );
        }
        let until_refused = started.elapsed();
        std::fs::remove_file(&filler).unwrap();
        let freed = Instant::now();
        let resumed = loop {
            n += 1;
            match exchange(&channel, &parent, n).await {
                Ok(id) => {
                    acknowledged.push(id);
                    break freed.elapsed();
                }
                Err(status) => assert_audit_unavailable(&status),
            }
            assert!(
                freed.elapsed() < BOUND,
                "round {round}: still refused {BOUND:?} after the disk was freed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for _ in 0..AFTER_RESUME {
            n += 1;
            acknowledged.push(exchange(&channel, &parent, n).await.unwrap());
        }
        println!(
            "round {round}: filler took {took} bytes; {still_ok} exchanges succeeded on the full \
             disk, then 20 refusals (after {until_refused:?}); resumed {resumed:?} after the disk \
             was freed"
        );
        resumes.push(resumed);
        server.assert_running();
    }
    println!(
        "{} exchanges acknowledged in {n} calls; resumes after freeing: {resumes:?}",
        acknowledged.len()
    );
    // The log on the full disk lost lines, and nothing panicked.
    let stats = admin_stats(&fed, &config).await;
    println!(
        "log lines dropped: {}; audit writer restarts: {}",
        stats.log_lines_dropped, stats.writer_restarts
    );
    assert!(stats.log_lines_dropped > 0, "{stats:?}");
    assert_eq!(stats.writer_restarts, 0, "{stats:?}");
    server.stop();

    let (verified, report) = audit_verify(&config_path);
    assert!(verified, "kopir audit verify failed:\n{report}");
    assert_recorded(
        &config_path,
        &acknowledged,
        [Step::Forwarded, Step::Answered],
    )
    .await;
    fed.shutdown().await;
    drop(disk);
}
