//! Refused copies of the global configuration, against real servers of the
//! demo federation on 127.0.0.1:0: a malformed copy, an older validly signed
//! one (a rollback) and the same serial with other content are refused and
//! logged, and exchanges go on with the copy in use, as the server's status
//! on its admin port says; a restart starts from the copy kept in the data
//! directory even with no source; a new server whose only source is forged
//! refuses exchanges (`globalconf.invalid`) until a valid copy arrives; a
//! corrupt record of the highest accepted version stops the server from
//! starting.

mod common;

use std::{sync::Arc, time::Duration};

use common::{assert_refused, edge::get_person};
use kopir_core::{
    globalconf::{highest, signed, watch},
    pki::sign::{SigningKey, VerifyingKey},
};
use kopir_proto::v1::{
    GlobalConfStatus, GlobalConfStatusRequest, server_status_client::ServerStatusClient,
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

    /// Waits (at most 10 s) until exchanges succeed.
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

    /// What node `name` says of its global configuration.
    async fn status(&self, name: &str) -> GlobalConfStatus {
        ServerStatusClient::new(self.fed.admin_channel(name).await.unwrap())
            .global_conf(GlobalConfStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits (at most 10 s) until node `name`'s status holds.
    async fn until_status(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&GlobalConfStatus) -> bool,
    ) -> GlobalConfStatus {
        let mut last = None;
        for _ in 0..100 {
            let status = self.status(name).await;
            if ok(&status) {
                return status;
            }
            last = Some(status);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} never {what}; last {last:?}");
    }

    /// Waits until node `name`'s source last failed naming `text`.
    async fn refused_by(&self, name: &str, text: &str) -> GlobalConfStatus {
        self.until_status(name, &format!("refused with {text:?}"), |s| {
            s.sources[0].last_error.contains(text)
        })
        .await
    }

    /// Waits until node `name` uses serial `serial`.
    async fn until_serial(&self, name: &str, serial: u64) -> GlobalConfStatus {
        self.until_status(name, &format!("took serial {serial}"), |s| {
            s.usable && s.serial == serial
        })
        .await
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
async fn a_malformed_or_older_configuration_is_refused_and_exchanges_go_on() {
    let h = launch().await;
    h.exchange().await.unwrap();
    let newest = h.published_serial();
    h.publish_malformed();
    h.refused_by("mlspp", "not a signed global configuration")
        .await;
    h.exchange().await.unwrap();
    h.publish_serial(newest - 1, 0);
    let status = h
        .refused_by(
            "mlspp",
            &format!(
                "rollback refused: serial {} is lower than the highest accepted {newest}",
                newest - 1
            ),
        )
        .await;
    assert!(status.usable, "{status:?}");
    assert_eq!(status.serial, newest, "the copy in use changed: {status:?}");
    // It stays refused at later refreshes, and exchanges go on.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.status("mlspp").await.serial, newest);
    h.exchange().await.unwrap();
    // A newer one is taken.
    h.publish_serial(newest + 1, 0);
    h.until_serial("mlspp", newest + 1).await;
    h.exchange().await.unwrap();
    h.fed.shutdown().await;
}

#[tokio::test]
async fn a_restart_starts_from_the_kept_copy_and_refuses_an_older_one() {
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
    h.exchange().await.unwrap();
    let status = h
        .refused_by(
            "mlspp",
            &format!(
                "serial {} is lower than the highest accepted {newest}",
                newest - 1
            ),
        )
        .await;
    assert_eq!(status.serial, newest);
    assert!(status.obtained_from.starts_with("kept copy"), "{status:?}");
    // With no source at all, a restart still starts from the kept copy.
    h.fed.stop_node("mlspp").await.unwrap();
    std::fs::remove_file(&h.fed.globalconf_path).unwrap();
    h.start_node("mlspp").await.unwrap();
    h.exchange().await.unwrap();
    h.refused_by("mlspp", "cannot read the file").await;
    h.publish_serial(newest + 1, 0);
    h.until_serial("mlspp", newest + 1).await;
    h.fed.shutdown().await;
}

#[tokio::test]
async fn a_first_start_on_a_forged_configuration_refuses_exchanges() {
    let mut h = launch().await;
    h.exchange().await.unwrap();
    h.fed.stop_node("mlspp").await.unwrap();
    // A new server: nothing kept, nothing recorded.
    std::fs::remove_dir_all(h.fed.dir.join("data/mlspp")).unwrap();
    let good = std::fs::read(&h.fed.globalconf_path).unwrap();
    let forged = String::from_utf8(good.clone())
        .unwrap()
        .replace("\"signature\": \"", "\"signature\": \"AAAA");
    write_atomically(&h.fed.globalconf_path, forged.as_bytes()).unwrap();
    h.start_node("mlspp").await.unwrap();
    let refused = h.exchange().await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.invalid");
    assert!(
        refused
            .message()
            .contains("no usable copy has been obtained")
            && refused.message().contains("signature"),
        "{refused:?}"
    );
    let status = h.status("mlspp").await;
    assert!(
        !status.usable && status.reason == "globalconf.invalid",
        "{status:?}"
    );
    write_atomically(&h.fed.globalconf_path, &good).unwrap();
    h.eventually_served().await;
    h.fed.shutdown().await;
}

#[tokio::test]
async fn the_same_serial_with_other_content_is_refused() {
    let h = launch().await;
    h.exchange().await.unwrap();
    let newest = h.published_serial();
    h.publish_serial(newest, 60);
    h.refused_by(
        "mlspp",
        &format!("serial {newest} was accepted before with other content"),
    )
    .await;
    h.exchange().await.unwrap();
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
