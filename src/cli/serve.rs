//! `kopir serve --config FILE`: one security server.

use std::{path::PathBuf, sync::Arc};

use kopir_core::pki::sign::SigningKey;
use kopir_server::{
    config::ServerConfig,
    server::{Listeners, start},
};

/// Arguments of `kopir serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server's configuration file (TOML; every key is in docs/configuration.md).
    #[arg(long, short, env = "KOPIR_CONFIG")]
    pub config: PathBuf,
}

impl Args {
    /// Runs the server until Ctrl-C or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let config = ServerConfig::load(&self.config)?;
        let signer = Arc::new(SigningKey::load(&config.signing.cert, &config.signing.key)?);
        let audit = kopir_audit::open(&config.audit_config(), signer).await?;
        let listeners = Listeners::bind(&config).await?;
        let server = start(config, listeners, audit.clone()).await?;
        super::stop_signal().await;
        tracing::info!("stopping");
        server.shutdown().await;
        audit.shutdown().await;
        Ok(())
    }
}
