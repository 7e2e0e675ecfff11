//! A security server whose standard error cannot be written (`/dev/full`)
//! keeps working: a log line it cannot write is dropped, never a panic, so
//! exchanges that log go on and the configuration watcher, which logs at
//! every change, still refuses a corrupted global configuration, takes a
//! short-lived one (stale once expired) and applies the next valid one.

mod common;
mod serve_process;

use common::{assert_refused, get_person, until};
use kopir_testkit::federation::{LocalFederation, write_atomically};
use serve_process::ServeProcess;
use tonic::Code;

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

    // A corrupted copy is refused (and logged): exchanges go on.
    let signed = std::fs::read(&fed.globalconf_path).unwrap();
    write_atomically(&fed.globalconf_path, &signed[..signed.len() / 2]).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap();
    // A valid copy that expires at once is taken, and then refused as
    // stale: the watcher is alive after the lines it could not write.
    fed.publish(time::Duration::seconds(3)).unwrap();
    let stale_after = until(&channel, &parent, |o| {
        o.as_ref().is_err_and(|s| {
            s.metadata()
                .get(kopir_core::error::ERROR_KEY)
                .and_then(|v| v.to_str().ok())
                == Some("globalconf.stale")
        })
    })
    .await;
    let refused = get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.stale");

    // And a newer valid one is applied.
    fed.publish(time::Duration::hours(24)).unwrap();
    let applied_after = until(&channel, &parent, Result::is_ok).await;
    println!(
        "with stderr on /dev/full: a short-lived copy stale after {stale_after:?}, \
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
