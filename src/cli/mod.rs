//! The command line: one file per command family.

pub mod audit;
pub mod authority;
pub mod certs;
pub mod consent;
pub mod demo;
pub mod registry;
pub mod report;
pub mod serve;
pub mod server;

use clap::{Parser, Subcommand};

/// kopir: a once-only data-exchange gateway between agencies.
#[derive(Debug, Parser)]
#[command(name = "kopir", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a security server.
    Serve(serve::Args),
    /// Governance authority: sign and publish the global configuration.
    #[command(subcommand)]
    Authority(authority::Command),
    /// Certificates for development.
    #[command(subcommand)]
    Certs(certs::Command),
    /// Mock registries.
    #[command(subcommand)]
    Registry(registry::Command),
    /// A security server joins the federation or changes what it says of it.
    #[command(subcommand)]
    Server(server::Command),
    /// Consent authority: serve it, or grant, list, revoke consents and obtain tokens.
    #[command(subcommand)]
    Consent(consent::Command),
    /// Run the whole federation on loopback and the child-benefit life event through it.
    Demo(demo::Args),
    /// Inspect, verify and export a server's audit log.
    Audit(Box<crate::cli::audit::AuditArgs>),
    /// Benchmark the whole exchange against a direct call (`kopir bench`),
    /// or the audit stores (`kopir bench audit`).
    Bench(BenchArgs),
}

/// `kopir bench [audit]`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another benchmark than the exchange's.
    #[command(subcommand)]
    pub other: Option<Bench>,
    /// The exchange benchmark's options.
    #[command(flatten)]
    pub exchange: crate::bench::ExchangeBenchArgs,
}

/// The benchmarks besides the exchange's.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Durable appends/s of the audit stores, query and verify times.
    Audit(crate::bench::audit::BenchAuditArgs),
}

impl Cli {
    /// Runs the chosen command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(a) => a.run().await,
            Command::Authority(c) => c.run().await,
            Command::Certs(c) => c.run(),
            Command::Registry(c) => c.run().await,
            Command::Consent(c) => c.run().await,
            Command::Server(c) => c.run().await,
            Command::Demo(a) => a.run().await,
            Command::Audit(a) => a.run().await,
            Command::Bench(BenchArgs {
                other: Some(Bench::Audit(a)),
                ..
            }) => a.run().await,
            Command::Bench(BenchArgs { exchange, .. }) => exchange.run().await,
        }
    }
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM). The
/// handlers are installed when this is called, not when the future is first
/// polled, so a SIGTERM that arrives while the command is still starting
/// stops it cleanly rather than killing it.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let interrupt = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Ok(mut term) = term {
            tokio::select! {
                _ = interrupt => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = interrupt.await;
    }
}

/// An operator's TLS identity, and the CA the port's certificate chains to:
/// how `kopir authority requests` and `kopir server status` connect.
#[derive(Debug, clap::Args)]
pub struct OperatorTls {
    /// The CA certificate the port's TLS certificate chains to.
    #[arg(long)]
    pub ca: std::path::PathBuf,
    /// The operator's client certificate.
    #[arg(long)]
    pub cert: std::path::PathBuf,
    /// Its key.
    #[arg(long)]
    pub key: std::path::PathBuf,
}

impl OperatorTls {
    /// A channel to `address` (`host:port`) as the operator.
    pub fn channel(&self, address: &str) -> anyhow::Result<tonic::transport::Channel> {
        use kopir_core::pki::{load_certs, load_key};
        let identity = (load_certs(&self.cert)?, load_key(&self.key)?);
        Ok(kopir_consent::channel::ca_channel(
            address,
            &load_certs(&self.ca)?,
            Some(identity),
            std::time::Duration::from_secs(10),
        )?)
    }
}

/// A refusal a kopir service answered, with its `kopir-error` reason.
pub(crate) fn refused(status: tonic::Status) -> anyhow::Error {
    match kopir_core::error::Refusal::from_status(&status) {
        Some(r) => anyhow::anyhow!("refused ({}): {}", r.reason, r.message),
        // No kopir-error: the call did not reach a kopir service.
        None if status.code() == tonic::Code::Unavailable => {
            anyhow::anyhow!("cannot reach the service: {}", status.message())
        }
        None => anyhow::anyhow!("{}: {}", status.code(), status.message()),
    }
}
