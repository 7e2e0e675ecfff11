//! A crash test: the consumer's and the provider's security servers run as
//! their own `kopir serve` processes under load; each is killed with SIGKILL
//! in turn and restarted on the same data. Afterwards `kopir audit verify`
//! passes on both logs, and every exchange the client saw succeed has its
//! records on both sides.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use kopir_audit::Step;
use kopir_core::pki::{load_certs, load_key};
use kopir_server::config::ServerConfig;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};
use serve_process::{assert_recorded, audit_verify};
use tokio::task::JoinSet;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

mod serve_process;

/// Calls kept in flight by the load.
const IN_FLIGHT: usize = 8;

/// One `kopir serve` process.
struct Server {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(config: PathBuf) -> Self {
        let log = config.with_extension("log");
        let mut server = Self {
            config,
            log,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kopir"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no final checkpoint, no flush.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs GetPerson calls with fresh request ids, `IN_FLIGHT` at a time, until
/// stopped; collects the ids of the calls that succeeded.
struct Load {
    ok: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<u64>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Load {
    fn start(channel: Channel, parent: String) -> Self {
        let ok = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        for worker in 0..IN_FLIGHT {
            let (channel, parent, ok, failed, stopped) = (
                channel.clone(),
                parent.clone(),
                ok.clone(),
                failed.clone(),
                stopped.clone(),
            );
            tasks.spawn(async move {
                let mut client = PopulationRegistryClient::new(channel);
                for n in 0.. {
                    if *stopped.borrow() {
                        return;
                    }
                    let id = format!("crash-{worker}-{n}");
                    match client.get_person(get_person(&parent, &id)).await {
                        Ok(_) => ok.lock().unwrap().push(id),
                        Err(_) => {
                            *failed.lock().unwrap() += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
        Self {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    fn succeeded(&self) -> usize {
        self.ok.lock().unwrap().len()
    }

    /// Waits until `more` calls beyond the current count have succeeded.
    async fn wait_for(&self, more: usize) {
        let target = self.succeeded() + more;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.succeeded() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the load stalled at {} successes",
                self.succeeded()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(mut self) -> (Vec<String>, u64) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let ok = self.ok.lock().unwrap().clone();
        let failed = *self.failed.lock().unwrap();
        (ok, failed)
    }
}

fn get_person(parent: &str, request_id: &str) -> Request<GetPersonRequest> {
    let mut r = Request::new(GetPersonRequest {
        iin: parent.to_owned(),
    });
    let subject = format!("iin:{parent}");
    for (k, v) in [
        ("kopir-client", BENEFITS),
        ("kopir-service", "KZ/GOV/MOJ/population"),
        ("kopir-purpose", "child-benefit"),
        ("kopir-subject", &subject),
        ("kopir-request-id", request_id),
    ] {
        r.metadata_mut()
            .insert(k, MetadataValue::try_from(v).unwrap());
    }
    r.set_timeout(Duration::from_secs(5));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_killed_under_load_lose_no_acknowledged_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::launch(dir.path(), &|_, _| {})
        .await
        .unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    // Run the consumer's and the provider's servers as processes of their own,
    // on the same ports and data.
    let consumer_config = fed.stop_node("mlspp").await.unwrap();
    let provider_config = fed.stop_node("moj").await.unwrap();
    let mut consumer = Server::start(consumer_config.clone());
    let mut provider = Server::start(provider_config.clone());

    let client_addr = ServerConfig::load(&consumer_config).unwrap().listen.client;
    let (cert, key) = fed.layout.client(&BENEFITS.parse().unwrap());
    let mut channel = None;
    for _ in 0..500 {
        let identity = Some((load_certs(&cert).unwrap(), load_key(&key).unwrap()));
        if let Ok(c) = fed.channel_to(client_addr, identity).await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load = Load::start(channel.expect("the consumer's server started"), parent);

    load.wait_for(200).await;
    provider.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    provider.spawn();
    load.wait_for(200).await;
    consumer.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.spawn();
    load.wait_for(200).await;
    // The last kill lands under load too; nothing is shut down cleanly.
    provider.kill();
    consumer.kill();
    let (ok, failed) = load.finish().await;
    println!(
        "{} exchanges succeeded, {failed} failed while a server was down",
        ok.len()
    );
    assert!(failed > 0, "the kills did not interrupt the load");

    for config in [&consumer_config, &provider_config] {
        let (verified, report) = audit_verify(config);
        assert!(verified, "verify of {} failed:\n{report}", config.display());
    }
    assert_recorded(&consumer_config, &ok, [Step::Forwarded, Step::Answered]).await;
    assert_recorded(&provider_config, &ok, [Step::Accepted, Step::Answered]).await;
    fed.shutdown().await;
}
