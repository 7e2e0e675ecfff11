//! `kopir registry mock`: serve one mock registry.

use std::{net::SocketAddr, sync::Arc};

use kopir_testkit::registry::{Dataset, RegistryKind, serve};

/// Registry commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve a mock registry with deterministic synthetic data.
    Mock {
        /// Which registry.
        #[arg(long, value_enum)]
        kind: RegistryKind,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// Seed of the synthetic data (every run with the same seed agrees).
        #[arg(long, default_value_t = kopir_testkit::registry::DEFAULT_SEED)]
        seed: u64,
        /// Number of families to generate.
        #[arg(long, default_value_t = kopir_testkit::registry::DEFAULT_FAMILIES)]
        families: usize,
    },
}

impl Command {
    /// Runs the registry until Ctrl-C or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let Command::Mock {
            kind,
            listen,
            seed,
            families,
        } = self;
        let stop = super::stop_signal();
        let dataset = Arc::new(Dataset::generate(seed, families));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!(
            "{kind} registry on {} ({} persons, seed {seed})",
            listener.local_addr()?,
            dataset.persons().len()
        );
        serve(kind, dataset, listener, Default::default(), stop).await?;
        Ok(())
    }
}
