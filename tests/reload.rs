//! `kopir serve` as a process reloads its information systems, registries
//! and access rules when its configuration file changes and on SIGHUP, and
//! keeps the running configuration when the new file does not check.

use std::{process::Command, time::Duration};

use kopir_server::config::ServerConfig;
use kopir_testkit::federation::{BENEFITS, LocalFederation};
use tonic::Code;

mod common;
mod serve_process;

use common::until;
use serve_process::ServeProcess;

async fn get_person(
    channel: &tonic::transport::Channel,
    parent: &str,
) -> Result<(), tonic::Status> {
    common::get_person(channel, parent, "child-benefit").await
}

/// Waits (at most 10 s) until the server's log has `count` lines with `text`.
fn until_logged(log: &std::path::Path, text: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(text)
        .count()
        < count
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the log never said {count}× {text:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_running_server_reloads_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    let path = fed.stop_node("mlspp").await.unwrap();
    let good = ServerConfig::load(&path).unwrap();
    let log = dir.path().join("mlspp.log");
    let mut server = ServeProcess::start(&path, std::fs::File::create(&log).unwrap(), "info");
    let channel = server.benefits_channel(&fed).await;
    get_person(&channel, &parent).await.unwrap();

    // The file changes: the benefits system is no longer registered.
    let mut without = good.clone();
    without.clients.retain(|c| c.id.to_string() != BENEFITS);
    without.save(&path).unwrap();
    until(&channel, &parent, |r| {
        r.as_ref().is_err_and(|s| {
            s.code() == Code::Unauthenticated
                && s.metadata()
                    .get("kopir-error")
                    .is_some_and(|v| v == "client.unknown")
        })
    })
    .await;
    until_logged(&log, "configuration reloaded", 1);

    // A file that does not check is refused; the running configuration
    // (without the benefits system) stays.
    std::fs::write(&path, "this is not = a [configuration").unwrap();
    until_logged(&log, "configuration not reloaded; the running one stays", 1);
    assert!(get_person(&channel, &parent).await.is_err());

    // The good file back, and a SIGHUP reloads it once more.
    good.save(&path).unwrap();
    until(&channel, &parent, Result::is_ok).await;
    let sent = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    until_logged(&log, "SIGHUP", 1);
    get_person(&channel, &parent).await.unwrap();
    server.assert_running();
    server.stop();
    fed.shutdown().await;
}
