//! The consent authority's configuration (`kopir consent serve --config FILE`,
//! TOML). Relative paths are taken from the file's folder.
//!
//! ```toml
//! listen = "0.0.0.0:8444"
//! data_dir = "data/consent"              # embedded store: data/consent/consent.db
//! # database = "postgres://kopir@db/consent"   # instead of the embedded store
//! token_ttl_secs = 3600                  # a token lives at most this long (and never past its consent)
//! portals = ["certs/portal/client.crt"]  # pinned: may grant, list and revoke for any subject
//!
//! [tls]                                  # as listed in the global configuration
//! cert = "certs/consent/tls.crt"
//! key = "certs/consent/tls.key"
//! [signing]                              # the token-signing key the global configuration lists
//! cert = "certs/consent/signing.crt"
//! key = "certs/consent/signing.key"
//! [globalconf]
//! path = "globalconf.json"
//! anchors = ["certs/authority/signing.crt"]
//!
//! [[consumers]]                          # information systems that may fetch tokens themselves
//! id = "KZ/GOV/MLSPP/benefits"
//! cert = "certs/clients/KZ_GOV_MLSPP_benefits/client.crt"
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use kopir_core::config::{ConfigError, GlobalConfSource, KeyFiles, LocalClient, rebase_path};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// Address of the gRPC port (mutual TLS).
    pub listen: SocketAddr,
    /// Where the embedded store lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A PostgreSQL URL; if given, used instead of the embedded store.
    #[serde(default)]
    pub database: Option<String>,
    /// The authority's TLS certificate (as the global configuration lists it) and key.
    pub tls: KeyFiles,
    /// The token-signing certificate (as the global configuration lists it) and key.
    pub signing: KeyFiles,
    /// Where the global configuration comes from.
    pub globalconf: GlobalConfSource,
    /// Certificates of the citizen portal(s), pinned.
    pub portals: Vec<PathBuf>,
    /// Information systems allowed to fetch tokens for their own consents.
    #[serde(default)]
    pub consumers: Vec<LocalClient>,
    /// The longest life of a token, in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// Interval of the revocation feed's heartbeat, in ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_token_ttl() -> u64 {
    3600
}

fn default_heartbeat() -> u64 {
    1000
}

impl ConsentConfig {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut config: ConsentConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        config.rebase(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub(crate) fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| rebase_path(base, p);
        fix(&mut self.data_dir);
        self.tls.rebase(base);
        self.signing.rebase(base);
        self.globalconf.rebase(base);
        self.portals.iter_mut().for_each(fix);
        self.consumers.iter_mut().for_each(|c| fix(&mut c.cert));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployed_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/consent.toml");
        let config = ConsentConfig::load(&path).unwrap();
        assert_eq!(config.portals.len(), 1);
        assert!(config.portals[0].ends_with("certs-dev/portal/client.crt"));
        assert!(config.portals[0].is_file());
        assert!(config.signing.cert.is_file());
        assert_eq!(config.consumers.len(), 1);
        assert_eq!(config.heartbeat_ms, 1000);
    }
}
