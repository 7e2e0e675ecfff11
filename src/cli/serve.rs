//! `kopir serve --config FILE`: one security server. Its information
//! systems, registries and access rules are reloaded from the file on SIGHUP
//! and when the file changes; a file that does not check is refused, with
//! the reason logged, and the running configuration stays.

use std::{path::PathBuf, sync::Arc, time::Duration};

use kopir_core::pki::{sha256, sign::SigningKey};
use kopir_server::{
    config::ServerConfig,
    server::{Listeners, RunningServer, start},
};

/// How often the configuration file is checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

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
        let stop = super::stop_signal();
        tokio::pin!(stop);
        // Taken before the file is read, so that a change made meanwhile is
        // reloaded at the first check.
        let mut seen = digest(&self.config).await;
        let config = ServerConfig::load(&self.config)?;
        let signer = Arc::new(SigningKey::load(&config.signing.cert, &config.signing.key)?);
        let audit = kopir_audit::open(&config.audit_config(), signer).await?;
        let listeners = Listeners::bind(&config).await?;
        let server = start(config, listeners, audit.clone()).await?;
        let mut hangups = hangups()?;
        let mut checks = tokio::time::interval(RELOAD_CHECK);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = hangups.recv() => reload(&server, &self.config, "SIGHUP").await,
                _ = checks.tick() => {
                    let now = digest(&self.config).await;
                    if now.is_some() && now != seen {
                        seen = now;
                        reload(&server, &self.config, "the file changed").await;
                    }
                }
            }
        }
        tracing::info!("stopping");
        server.shutdown().await;
        audit.shutdown().await;
        Ok(())
    }
}

/// The SHA-256 of the configuration file, or `None` while it cannot be read
/// (an editor replacing it).
async fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    tokio::fs::read(path).await.ok().map(|bytes| sha256(&bytes))
}

/// Reloads the local part of the configuration at `path`; a file that does
/// not load or check is logged and the running configuration stays.
async fn reload(server: &RunningServer, path: &std::path::Path, why: &str) {
    let load = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || ServerConfig::load(&path)).await
    };
    let outcome = match load {
        Ok(Ok(config)) => server.reload(config).await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(()) => tracing::info!(why, file = %path.display(), "configuration reloaded"),
        Err(e) => {
            tracing::error!(why, file = %path.display(), error = %e, "configuration not reloaded; the running one stays")
        }
    }
}

/// SIGHUP, as a stream.
fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}
