//! Rollback of the global configuration, against real servers of the demo
//! federation on 127.0.0.1:0: an older, validly signed configuration is refused
//! (`globalconf.invalid`, naming the rollback) after a malformed file, after a
//! restart, and with the same serial but other content; a corrupt record of
//! the highest accepted version stops the server from starting.

mod common;

use std::{sync::Arc, time::Duration};

use common::{assert_refused, edge::get_person};
use kopir_core::{
    globalconf::{highest, signed, watch},
    pki::sign::{SigningKey, VerifyingKey},
};
use kopir_server::{
    config::ServerConfig,
    server::{Listeners, ServerError, start},
};
use kopir_testkit::federation::{LocalFederation, Node, write_atomically};
use tonic::{Code, Status};

struct Harness {
    fed: LocalFederation,
    _dir: tempfile::TempDir,
}

async fn launch() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    Harness { fed, _dir: dir }
}

impl Harness {
    /// One population read by the benefits system through MLSPP.
    async fn exchange(&self) -> Result<(), Status> {
        get_person(&self.fed).await
    }

    /// Waits (at most 10 s) until an exchange is refused with
    /// `globalconf.invalid` and a message containing `text`; returns it.
    async fn eventually_invalid(&self, text: &str) -> Status {
        let mut last = None;
        for _ in 0..100 {
            match self.exchange().await {
                Err(s) if s.message().contains(text) => {
                    assert_refused(&s, Code::FailedPrecondition, "globalconf.invalid");
                    return s;
                }
                other => last = Some(other),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never refused with {text:?}; last {last:?}");
    }

    /// Waits (at most 10 s) until exchanges succeed again.
    async fn eventually_served(&self) {
        let mut last = None;
        for _ in 0..100 {
            match self.exchange().await {
                Ok(()) => return,
                Err(s) => last = Some(s),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("exchanges never resumed; last {last:?}");
    }

    /// The serial of the published file.
    fn published_serial(&self) -> u64 {
        let anchors = vec![VerifyingKey::load(&self.fed.layout.authority_cert()).unwrap()];
        watch::read(&self.fed.globalconf_path, &anchors)
            .unwrap()
            .serial()
    }

    /// Signs the federation's description with `serial`, valid for an hour
    /// plus `extra_secs`, and publishes it.
    fn publish_serial(&self, serial: u64, extra_secs: i64) {
        let layout = &self.fed.layout;
        let key = SigningKey::load(&layout.authority_cert(), &layout.authority_key()).unwrap();
        let conf = self
            .fed
            .description
            .build(serial, time::Duration::seconds(3600 + extra_secs))
            .unwrap();
        write_atomically(
            &self.fed.globalconf_path,
            signed::sign(&conf, &key).as_bytes(),
        )
        .unwrap();
    }

    fn publish_malformed(&self) {
        write_atomically(
            &self.fed.globalconf_path,
            b"{\"format\": \"kopir-globalconf/1\"",
        )
        .unwrap();
    }

    /// Starts node `name` again from its saved configuration, on new ports.
    async fn start_node(&mut self, name: &str) -> Result<(), ServerError> {
        let mut config = ServerConfig::load(&self.fed.dir.join(format!("{name}.toml"))).unwrap();
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.listen.client = any;
        config.listen.peer = any;
        config.listen.admin = Some(any);
        let signer = Arc::new(SigningKey::load(&config.signing.cert, &config.signing.key).unwrap());
        let audit = kopir_audit::open(&config.audit_config(), signer)
            .await
            .unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let server = match start(config.clone(), listeners, audit.clone()).await {
            Ok(server) => server,
            Err(e) => {
                audit.shutdown().await;
                return Err(e);
            }
        };
        let config_path = self.fed.dir.join(format!("{name}.toml"));
        self.fed.nodes.insert(
            name.to_string(),
            Node {
                config,
                config_path,
                server,
                audit,
            },
        );
        Ok(())
    }
}

#[tokio::test]
async fn an_older_configuration_after_a_malformed_one_is_refused() {
    let h = launch().await;
    h.exchange().await.unwrap();
    let newest = h.published_serial();
    h.publish_malformed();
    h.eventually_invalid("not a signed global configuration")
        .await;
    h.publish_serial(newest - 1, 0);
    let refused = h
        .eventually_invalid(&format!(
            "serial {} is lower than the highest accepted {newest}",
            newest - 1
        ))
        .await;
    assert!(refused.message().contains("rollback"), "{refused:?}");
    // It stays refused at later refreshes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let again = h.exchange().await.unwrap_err();
    assert_refused(&again, Code::FailedPrecondition, "globalconf.invalid");
    assert!(again.message().contains("rollback refused"), "{again:?}");
    // A newer one restores service.
    h.publish_serial(newest + 1, 0);
    h.eventually_served().await;
    h.fed.shutdown().await;
}

#[tokio::test]
async fn an_older_configuration_is_refused_after_a_restart() {
    let mut h = launch().await;
    h.exchange().await.unwrap();
    let newest = h.published_serial();
    h.fed.stop_node("mlspp").await.unwrap();
    let record = h.fed.dir.join("data/mlspp").join(highest::FILE_NAME);
    let recorded = highest::HighestStore::in_dir(record.parent().unwrap())
        .load()
        .unwrap()
        .expect("the highest accepted version is recorded");
    assert_eq!(recorded.serial, newest);
    // The older file is in place before the server starts.
    h.publish_serial(newest - 1, 0);
    h.start_node("mlspp").await.unwrap();
    let refused = h.exchange().await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.invalid");
    assert!(
        refused.message().contains(&format!(
            "serial {} is lower than the highest accepted {newest}",
            newest - 1
        )),
        "{refused:?}"
    );
    h.publish_serial(newest + 1, 0);
    h.eventually_served().await;
    // The highest version itself is no rollback: a restart on it serves.
    h.fed.stop_node("mlspp").await.unwrap();
    h.start_node("mlspp").await.unwrap();
    h.exchange().await.unwrap();
    h.fed.shutdown().await;
}

#[tokio::test]
async fn the_same_serial_with_other_content_is_refused() {
    let h = launch().await;
    h.exchange().await.unwrap();
    let newest = h.published_serial();
    h.publish_serial(newest, 60);
    h.eventually_invalid(&format!(
        "serial {newest} was accepted before with other content"
    ))
    .await;
    h.publish_serial(newest + 1, 0);
    h.eventually_served().await;
    h.fed.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_record_of_the_highest_version_stops_the_start() {
    let mut h = launch().await;
    h.fed.stop_node("mlspp").await.unwrap();
    let record = h.fed.dir.join("data/mlspp").join(highest::FILE_NAME);
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(&record, text.replace("serial=", "serial=1")).unwrap();
    let e = h.start_node("mlspp").await.unwrap_err();
    let message = e.to_string();
    assert!(
        matches!(
            e,
            ServerError::GlobalconfHighest(highest::HighestError::Corrupt { .. })
        ),
        "{message}"
    );
    assert!(message.contains(&record.display().to_string()), "{message}");
    assert!(message.contains("corrupt"), "{message}");
    // Deleting it is the deliberate reset: the server starts and serves.
    std::fs::remove_file(&record).unwrap();
    h.start_node("mlspp").await.unwrap();
    h.exchange().await.unwrap();
    h.fed.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_record_stops_the_consent_authority() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("data/consent").join(highest::FILE_NAME);
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, "kopir-globalconf-highest/1\nserial=7\n").unwrap();
    let e = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(message.contains(&record.display().to_string()), "{message}");
    assert!(message.contains("corrupt"), "{message}");
}
