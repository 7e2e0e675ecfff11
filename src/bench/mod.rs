//! `kopir bench`: the whole exchange against a direct call, on loopback.
//!
//! One run starts the population registry and the two security servers
//! (MLSPP, the consumer, and MOJ, the provider) as their own processes, so
//! that each one's CPU time and peak memory come from the kernel's accounting,
//! plus the rest of the demo federation (global configuration, consent
//! authority) in this process. Then, for each number of calls in flight, it
//! drives the same unary call (`GetPerson`) for a fixed time:
//!
//! - **direct**: to the registry, plaintext HTTP/2, as a service mesh's
//!   baseline;
//! - **gateway**: through both security servers with everything on: the
//!   information system's client certificate, mutual TLS between the servers,
//!   both signatures and the three verifications, the access rule, the
//!   consent token check (the purpose rests on consent), and the four audit
//!   records made durable in the default embedded store.
//!
//! Each mode is warmed up briefly before it is measured. The audit writers'
//! commit time (read from both servers' `AuditService/Stats` on their admin
//! ports) gives the disk wait per call.
//!
//! Last comes an overload level: ten times the largest number of calls in
//! flight, each call with a deadline of one second, against servers that take
//! twice the largest level at once (`limits.max_concurrent_calls`, all of it
//! open to the one caller, `limits.max_calls_per_caller`). A
//! shed call's client waits 5 ms before its next call, as a client backing
//! off would. The level reports how many calls were shed, the slowest answer
//! of any kind (which must be within the deadline) and the servers' peak
//! memory.

pub mod audit;
pub mod measure;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tonic::{Request, metadata::MetadataMap, transport::Channel};

use kopir_core::{
    error::{Reason, Refusal},
    pki::{load_certs, load_key},
};
use kopir_proto::v1::{AuditStatsRequest, audit_service_client::AuditServiceClient};
use kopir_server::config::ServerConfig;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
    registry::RegistryKind,
};
use measure::{Figures, Outcome, closed_loop, context_switches, cpu_time, peak_rss_mib};

const POPULATION: &str = RegistryKind::Population.default_service_id();
const GET_PERSON: &str = "/kz.population.v1.PopulationRegistry/GetPerson";
/// A purpose that rests on consent, so that the token is checked on every call.
const PURPOSE: &str = "benefit-means-test";
/// Calls in flight per HTTP/2 connection of the load generator.
const CALLS_PER_CONNECTION: usize = 16;
/// The deadline of each call of the overload level.
const OVERLOAD_DEADLINE: Duration = Duration::from_secs(1);
/// How long a client whose call was shed waits before its next one.
const BACKOFF: Duration = Duration::from_millis(5);

/// Measure the whole exchange against a direct call.
#[derive(Debug, Clone, clap::Args)]
pub struct ExchangeBenchArgs {
    /// Calls in flight; a comma-separated list to sweep (e.g. 1,16,64,256).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 64])]
    pub concurrency: Vec<usize>,
    /// Seconds each mode is measured at each level.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Short run: 3 s per mode and level (about 25 s in all).
    #[arg(long)]
    pub short: bool,
    /// Print one JSON array, an object per level.
    #[arg(long)]
    pub json: bool,
    /// The overload level's calls in flight, as a multiple of the largest
    /// level (0: no overload level).
    #[arg(long, default_value_t = 10)]
    pub overload_factor: usize,
    /// Folder for the PKI, configurations, logs and audit stores (default: a
    /// temporary folder; it must be on the disk being measured).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The figures of one level, as `--json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Calls in flight.
    pub concurrency: usize,
    /// True for the overload level (calls with a deadline, servers shedding).
    pub overload: bool,
    /// The calls' deadline, for the overload level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Seconds each mode was measured.
    pub seconds: u64,
    /// Straight to the registry.
    pub direct: Figures,
    /// Through both security servers.
    pub gateway: GatewayFigures,
    /// Gateway calls/s over direct calls/s.
    pub ratio: f64,
}

/// The gateway's figures: those of a direct run, and the servers' own.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayFigures {
    /// Throughput, latency, CPU time of consumer + provider + registry.
    #[serde(flatten)]
    pub figures: Figures,
    /// CPU time of the consumer's server per call.
    pub consumer_cpu_us_per_call: f64,
    /// CPU time of the provider's server per call.
    pub provider_cpu_us_per_call: f64,
    /// The consumer server's peak resident memory so far.
    pub consumer_peak_rss_mib: f64,
    /// The provider server's peak resident memory so far.
    pub provider_peak_rss_mib: f64,
    /// Time both servers' audit writers spent committing (insert + fsync),
    /// per call: the disk wait of a call when calls are serial; shared by the
    /// calls of a group commit under load.
    pub fsync_ms_per_call: f64,
    /// Audit records per commit, both writers together: how well group
    /// commit shares each sync.
    pub records_per_commit: f64,
    /// Commits that waited for the disk, per call, both writers together (at
    /// most 2: one per server, which makes both of its records durable).
    pub syncs_per_call: f64,
    /// Context switches of both servers' threads per call: each is a thread
    /// parking and being woken (or preempted), a large part of what one call
    /// in flight costs besides cryptography and the disk.
    pub switches_per_call: f64,
    /// What the two servers add to the direct call at the median: gateway
    /// p50 minus direct p50 (of which `fsync_ms_per_call` is disk wait).
    pub added_p50_ms: f64,
    /// Calls shed with `server.overloaded` (counted in `errors` too).
    pub shed: u64,
    /// The slowest answer of any kind, shed and failed calls included.
    pub slowest_ms: f64,
}

/// CPU time of each serving process, and both audit writers' commit time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    registry: Duration,
    consumer: Duration,
    provider: Duration,
    switches: u64,
    commit_ns: u64,
    commits: u64,
    syncs: u64,
    records: u64,
}

impl Sample {
    /// What was spent between `before` and this sample.
    fn since(&self, before: &Sample) -> Sample {
        Sample {
            registry: self.registry.saturating_sub(before.registry),
            consumer: self.consumer.saturating_sub(before.consumer),
            provider: self.provider.saturating_sub(before.provider),
            switches: self.switches.saturating_sub(before.switches),
            commit_ns: self.commit_ns.saturating_sub(before.commit_ns),
            commits: self.commits.saturating_sub(before.commits),
            syncs: self.syncs.saturating_sub(before.syncs),
            records: self.records.saturating_sub(before.records),
        }
    }
}

/// A child process killed when dropped.
struct Process {
    child: Child,
    name: &'static str,
}

impl Process {
    fn spawn(name: &'static str, args: &[&std::ffi::OsStr], log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the kopir executable")?;
        let out = std::fs::File::create(log)?;
        let child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        Ok(Self { child, name })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid()).with_context(|| format!("CPU time of the {}", self.name))
    }

    fn switches(&self) -> anyhow::Result<u64> {
        context_switches(self.pid())
            .with_context(|| format!("context switches of the {}", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The servers under test and how to call them.
struct Bench {
    fed: LocalFederation,
    registry: Process,
    consumer: Process,
    provider: Process,
    direct: Vec<PopulationRegistryClient<Channel>>,
    gateway: Vec<PopulationRegistryClient<Channel>>,
    admins: Vec<AuditServiceClient<Channel>>,
    metadata: MetadataMap,
    iin: String,
}

impl ExchangeBenchArgs {
    /// Runs the benchmark and prints its figures.
    pub async fn run(mut self) -> anyhow::Result<()> {
        if self.short {
            self.seconds = 3;
        }
        let temp;
        let dir = match &self.dir {
            Some(d) => d.clone(),
            None => {
                temp = tempfile::tempdir()?;
                temp.path().to_path_buf()
            }
        };
        let largest = self.concurrency.iter().copied().max().unwrap_or(1);
        let overload = largest * self.overload_factor;
        let connections = largest.max(overload).div_ceil(CALLS_PER_CONNECTION);
        let bench = Arc::new(Bench::start(&dir, connections, largest * 2).await?);
        if !self.json {
            println!(
                "GetPerson on loopback, {} s per mode and level: direct to the registry, and through both security servers (client cert, mutual TLS, two signatures, three verifications, access rule, consent token, four audit records, durable before each answer)",
                self.seconds
            );
        }
        let mut levels = Vec::new();
        let levels_to_run = self
            .concurrency
            .iter()
            .map(|&c| (c, None))
            .chain((overload > 0).then_some((overload, Some(OVERLOAD_DEADLINE))));
        for (concurrency, deadline) in levels_to_run {
            let level = bench
                .level(concurrency, Duration::from_secs(self.seconds), deadline)
                .await?;
            if !self.json {
                print_level(&level);
            }
            levels.push(level);
        }
        if self.json {
            println!("{}", serde_json::to_string(&levels)?);
        }
        if let Ok(bench) = Arc::try_unwrap(bench) {
            bench.stop().await;
        }
        Ok(())
    }
}

impl Bench {
    async fn start(dir: &Path, connections: usize, capacity: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let registry_addr = free_loopback_port()?;
        let listen = registry_addr.to_string();
        let registry = Process::spawn(
            "registry",
            &[
                "registry",
                "mock",
                "--kind",
                "population",
                "--listen",
                &listen,
            ]
            .map(AsRef::as_ref),
            &dir.join("registry.log"),
        )?;
        let registry_uri = format!("http://{registry_addr}");
        let mut fed = LocalFederation::launch(dir, &|_, config| {
            config.limits.max_concurrent_calls = capacity;
            // The benchmark's one information system (and one peer server)
            // may take the whole budget.
            config.limits.max_calls_per_caller = Some(capacity);
            for s in &mut config.services {
                if s.id.to_string() == POPULATION {
                    s.endpoint = registry_uri.clone();
                }
            }
        })
        .await?;
        let consumer_path = fed.stop_node("mlspp").await?;
        let provider_path = fed.stop_node("moj").await?;
        let serve = |name, config: &Path, log| {
            let args = ["serve".as_ref(), "--config".as_ref(), config.as_os_str()];
            Process::spawn(name, &args, &dir.join(log))
        };
        let consumer = serve("consumer's server", &consumer_path, "mlspp.log")?;
        let provider = serve("provider's server", &provider_path, "moj.log")?;
        let consumer_config = ServerConfig::load(&consumer_path)?;
        let provider_config = ServerConfig::load(&provider_path)?;

        let iin = fed
            .dataset
            .sample_parents(1)
            .first()
            .context("the mock registers hold no parent")?
            .to_string();
        let (_, token) = fed
            .benefits_consent(&format!("iin:{iin}"), POPULATION, GET_PERSON, PURPOSE)
            .await?;
        let mut metadata = MetadataMap::new();
        for (key, value) in [
            ("kopir-client", BENEFITS),
            ("kopir-service", POPULATION),
            ("kopir-purpose", PURPOSE),
            ("kopir-subject", &format!("iin:{iin}")),
            ("kopir-user", "bench"),
            ("kopir-consent", &token),
        ] {
            metadata.insert(key, value.parse()?);
        }

        let identity = |(cert, key): (PathBuf, PathBuf)| -> anyhow::Result<_> {
            Ok(Some((load_certs(&cert)?, load_key(&key)?)))
        };
        let mut direct = Vec::new();
        let mut gateway = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        let endpoint = Channel::from_shared(registry_uri.clone())?.tcp_nodelay(true);
        for _ in 0..connections {
            // The registry process may still be starting.
            let channel = loop {
                match endpoint.connect().await {
                    Ok(channel) => break channel,
                    Err(e) if Instant::now() >= deadline => return Err(e.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            direct.push(PopulationRegistryClient::new(channel));
            let client_identity = fed.layout.client(&BENEFITS.parse()?);
            gateway.push(PopulationRegistryClient::new(
                connect(
                    &fed,
                    consumer_config.listen.client,
                    identity(client_identity)?,
                    deadline,
                )
                .await?,
            ));
        }
        let mut admins = Vec::new();
        for config in [&consumer_config, &provider_config] {
            let addr = config.listen.admin.context("no admin port")?;
            admins.push(AuditServiceClient::new(
                connect(&fed, addr, identity(fed.layout.operator())?, deadline).await?,
            ));
        }
        let bench = Self {
            fed,
            registry,
            consumer,
            provider,
            direct,
            gateway,
            admins,
            metadata,
            iin,
        };
        // The servers are up when a whole exchange goes through.
        loop {
            if bench.call(&bench.gateway, 0, None).await == Outcome::Served {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no exchange went through within 15 s; see the logs in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(bench)
    }

    fn request(&self, deadline: Option<Duration>) -> Request<GetPersonRequest> {
        let mut r = Request::new(GetPersonRequest {
            iin: self.iin.clone(),
        });
        *r.metadata_mut() = self.metadata.clone();
        if let Some(d) = deadline {
            r.set_timeout(d);
        }
        r
    }

    async fn call(
        &self,
        clients: &[PopulationRegistryClient<Channel>],
        worker: usize,
        deadline: Option<Duration>,
    ) -> Outcome {
        let mut client = clients[worker % clients.len()].clone();
        match client.get_person(self.request(deadline)).await {
            Ok(_) => Outcome::Served,
            Err(status)
                if Refusal::from_status(&status).map(|r| r.reason) == Some(Reason::Overloaded) =>
            {
                tokio::time::sleep(BACKOFF).await;
                Outcome::Shed
            }
            Err(_) => Outcome::Failed,
        }
    }

    /// The serving processes' CPU time and the audit writers' work so far.
    async fn sample(&self) -> anyhow::Result<Sample> {
        let mut sample = Sample {
            registry: self.registry.cpu()?,
            consumer: self.consumer.cpu()?,
            provider: self.provider.cpu()?,
            switches: self.consumer.switches()? + self.provider.switches()?,
            commit_ns: 0,
            commits: 0,
            syncs: 0,
            records: 0,
        };
        for admin in &self.admins {
            let stats = admin
                .clone()
                .stats(AuditStatsRequest {})
                .await?
                .into_inner();
            sample.commit_ns += stats.commit_ns;
            sample.commits += stats.commits;
            sample.syncs += stats.syncs;
            sample.records += stats.records;
        }
        Ok(sample)
    }

    async fn level(
        self: &Arc<Self>,
        concurrency: usize,
        duration: Duration,
        deadline: Option<Duration>,
    ) -> anyhow::Result<Level> {
        let warm_up = Duration::from_millis(500).min(duration);
        let caller = |gateway: bool| {
            let bench = self.clone();
            move |w| {
                let bench = bench.clone();
                async move {
                    let clients = if gateway {
                        &bench.gateway
                    } else {
                        &bench.direct
                    };
                    bench.call(clients, w, deadline).await
                }
            }
        };
        let (direct_call, gateway_call) = (caller(false), caller(true));

        closed_loop(concurrency, warm_up, direct_call.clone()).await;
        let cpu = self.registry.cpu()?;
        let mut run = closed_loop(concurrency, duration, direct_call).await;
        let direct = Figures::of(&mut run, self.registry.cpu()?.saturating_sub(cpu));

        closed_loop(concurrency, warm_up, gateway_call.clone()).await;
        let before = self.sample().await?;
        let mut run = closed_loop(concurrency, duration, gateway_call).await;
        let spent = self.sample().await?.since(&before);
        let calls = run.latencies_us.len().max(1) as f64;
        let (consumer_cpu, provider_cpu) = (spent.consumer, spent.provider);
        let figures = Figures::of(&mut run, spent.registry + consumer_cpu + provider_cpu);
        let gateway = GatewayFigures {
            consumer_cpu_us_per_call: consumer_cpu.as_secs_f64() * 1e6 / calls,
            provider_cpu_us_per_call: provider_cpu.as_secs_f64() * 1e6 / calls,
            consumer_peak_rss_mib: peak_rss_mib(self.consumer.pid())?,
            provider_peak_rss_mib: peak_rss_mib(self.provider.pid())?,
            fsync_ms_per_call: spent.commit_ns as f64 / 1e6 / calls,
            records_per_commit: spent.records as f64 / spent.commits.max(1) as f64,
            syncs_per_call: spent.syncs as f64 / calls,
            switches_per_call: spent.switches as f64 / calls,
            shed: run.shed,
            slowest_ms: run.slowest_us as f64 / 1000.0,
            added_p50_ms: figures.p50_ms - direct.p50_ms,
            figures,
        };
        Ok(Level {
            concurrency,
            overload: deadline.is_some(),
            deadline_ms: deadline.map(|d| d.as_millis() as u64),
            seconds: duration.as_secs(),
            ratio: gateway.figures.calls_per_s / direct.calls_per_s.max(1e-9),
            direct,
            gateway,
        })
    }

    async fn stop(self) {
        drop((self.consumer, self.provider, self.registry));
        self.fed.shutdown().await;
    }
}

/// A TLS channel to a port of a server process that may still be starting.
async fn connect(
    fed: &LocalFederation,
    addr: SocketAddr,
    identity: Option<kopir_consent::channel::Identity>,
    deadline: Instant,
) -> anyhow::Result<Channel> {
    loop {
        let identity = identity
            .as_ref()
            .map(|(chain, key)| (chain.clone(), key.clone_key()));
        match fed.channel_to(addr, identity).await {
            Ok(channel) => return Ok(channel),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn print_level(l: &Level) {
    let row = |name: &str, f: &Figures| {
        println!(
            "  {name:<8} {:>9.0} calls/s  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  {:>6.0} us CPU/call  {} errors",
            f.calls_per_s, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, f.cpu_us_per_call, f.errors
        );
    };
    match l.deadline_ms {
        Some(ms) => println!(
            "\n{} in flight (overload: each call with a {ms} ms deadline; the servers take twice the largest level at once):",
            l.concurrency
        ),
        None => println!("\n{} in flight:", l.concurrency),
    }
    row("direct", &l.direct);
    row("gateway", &l.gateway.figures);
    let g = &l.gateway;
    println!(
        "  gateway: consumer {:.0} us + provider {:.0} us CPU/call; adds {:.2} ms at p50, of which audit commits (disk) {:.2} ms ({:.1} records per commit, {:.2} syncs per call), the rest {:.2} ms ({:.1} context switches per call); peak RSS consumer {:.1} MiB, provider {:.1} MiB; ratio {:.2}",
        g.consumer_cpu_us_per_call,
        g.provider_cpu_us_per_call,
        g.added_p50_ms,
        g.fsync_ms_per_call,
        g.records_per_commit,
        g.syncs_per_call,
        g.added_p50_ms - g.fsync_ms_per_call,
        g.switches_per_call,
        g.consumer_peak_rss_mib,
        g.provider_peak_rss_mib,
        l.ratio
    );
    if let Some(ms) = l.deadline_ms {
        println!(
            "  overload: {} calls shed with server.overloaded; slowest answer {:.1} ms ({} the {ms} ms deadline)",
            g.shed,
            g.slowest_ms,
            if g.slowest_ms <= ms as f64 {
                "within"
            } else {
                "BEYOND"
            }
        );
    }
}
