//! A security server whose standard error cannot be written (`/dev/full`)
//! keeps working: a log line it cannot write is dropped, never a panic, so
//! exchanges that log go on and the configuration watcher, which logs at
//! every change, still refuses a corrupted global configuration and applies
//! the next valid one.

mod common;
mod serve_process;

use std::time::{Duration, Instant};

use common::{assert_refused, with_meta};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation, write_atomically},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use serve_process::ServeProcess;
use tonic::{Code, transport::Channel};

async fn get_person(channel: &Channel, parent: &str, purpose: &str) -> Result<(), tonic::Status> {
    let subject = format!("iin:{parent}");
    let request = with_meta(
        GetPersonRequest {
            iin: parent.to_owned(),
        },
        &[
            ("kopir-client", BENEFITS),
            ("kopir-service", "KZ/GOV/MOJ/population"),
            ("kopir-purpose", purpose),
            ("kopir-subject", &subject),
        ],
    );
    PopulationRegistryClient::new(channel.clone())
        .get_person(request)
        .await
        .map(drop)
}

/// Calls until `done` says the outcome is the awaited one (within 15 s: the
/// watcher re-reads the file every second); returns how long it took.
async fn until(
    channel: &Channel,
    parent: &str,
    done: impl Fn(&Result<(), tonic::Status>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let outcome = get_person(channel, parent, "child-benefit").await;
        if done(&outcome) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {outcome:?} after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_logging_to_dev_full_keeps_exchanging_and_watching() {
    let Ok(dev_full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        println!("skipped: this system has no /dev/full to log to");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    let config = fed.stop_node("mlspp").await.unwrap();
    // Debug level: every call and every watcher round has lines to lose.
    let mut server = ServeProcess::start(&config, dev_full, "info,kopir=debug");
    let channel = server.benefits_channel(&fed).await;

    for _ in 0..20 {
        get_person(&channel, &parent, "child-benefit")
            .await
            .unwrap();
    }
    // A refusal is logged too (at info), and still answered precisely.
    let refused = get_person(&channel, &parent, "no-such-purpose")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::InvalidArgument, "purpose.unknown");

    // A corrupted configuration is refused: the watcher is alive after the
    // lines it could not write at start.
    let signed = std::fs::read(&fed.globalconf_path).unwrap();
    write_atomically(&fed.globalconf_path, &signed[..signed.len() / 2]).unwrap();
    let refused_after = until(&channel, &parent, |o| {
        o.as_ref().is_err_and(|s| {
            s.metadata()
                .get(kopir_core::error::ERROR_KEY)
                .and_then(|v| v.to_str().ok())
                == Some("globalconf.invalid")
        })
    })
    .await;
    let refused = get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.invalid");

    // And a newer valid one is applied.
    fed.publish(time::Duration::hours(24)).unwrap();
    let applied_after = until(&channel, &parent, Result::is_ok).await;
    println!(
        "with stderr on /dev/full: corrupted configuration refused after {refused_after:?}, \
         the next valid one applied after {applied_after:?}"
    );
    for _ in 0..20 {
        get_person(&channel, &parent, "child-benefit")
            .await
            .unwrap();
    }
    server.assert_running();
    server.stop();
    fed.shutdown().await;
}
