//! A security server's own configuration (`kopir serve --config FILE`, TOML).
//! Relative paths are taken from the configuration file's folder.
//!
//! ```toml
//! server_id = "KZ/GOV/MOJ/ss1"
//! data_dir = "data/moj"
//!
//! [listen]
//! client = "127.0.0.1:8080"     # information systems (TLS with client certificates)
//! peer = "0.0.0.0:8443"         # other security servers (mutual TLS only)
//! admin = "127.0.0.1:8480"      # operators (mutual TLS; audit, health)
//!
//! [tls]
//! cert = "certs/tls.crt"
//! key = "certs/tls.key"
//! [signing]
//! cert = "certs/signing.crt"
//! key = "certs/signing.key"
//! [globalconf]
//! path = "globalconf.json"
//! anchors = ["certs/authority.crt"]
//!
//! [[clients]]                   # information systems that may call through this server
//! id = "KZ/GOV/MOJ/app"
//! cert = "certs/app.crt"
//!
//! [[services]]                  # registries this server provides
//! id = "KZ/GOV/MOJ/population"
//! endpoint = "http://127.0.0.1:7001"
//!
//! [[access]]                    # who may call them (deny by default)
//! service = "KZ/GOV/MOJ/population"
//! client = "KZ/GOV/MLSPP/benefits"
//! methods = ["kz.population.v1.PopulationRegistry/*"]
//! purposes = ["child-benefit"]
//!
//! operators = ["certs/operator.crt"]  # client certificates allowed on the admin port
//!
//! [audit]                       # all optional; the embedded store under data_dir by default
//! database = "postgres://kopir@db/kopir_audit"
//! pseudonym_key = "/etc/kopir/pseudonym.key"
//! checkpoint_interval = "60s"
//! node = "node1"
//! store_bodies = false
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::policy::AccessRule;
use kopir_audit::AuditConfig;
use kopir_core::{
    config::{ConfigError, GlobalConfSource, KeyFiles, Limits, LocalClient, rebase_path},
    id::{ServerId, SubsystemId},
};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This server's id, `MEMBER/CODE`; its member signs with `signing`.
    pub server_id: ServerId,
    /// Where the server keeps its state (the embedded audit store...).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Addresses to listen on.
    pub listen: Listen,
    /// The server's TLS certificate and key (client, peer and admin ports).
    pub tls: KeyFiles,
    /// The member's signing certificate and key.
    pub signing: KeyFiles,
    /// Where the global configuration comes from.
    pub globalconf: GlobalConfSource,
    /// Sizes, timeouts and windows of the security path (`[limits]`).
    #[serde(default)]
    pub limits: Limits,
    /// Limits on connections at each port's edge.
    #[serde(default)]
    pub edge: kopir_edge::EdgeLimits,
    /// Local information systems.
    #[serde(default)]
    pub clients: Vec<LocalClient>,
    /// Local registries.
    #[serde(default)]
    pub services: Vec<LocalService>,
    /// Access rules.
    #[serde(default)]
    pub access: Vec<AccessRule>,
    /// Certificates of operators allowed on the admin port.
    #[serde(default)]
    pub operators: Vec<PathBuf>,
    /// The audit log (its `data_dir` is ignored: see [`Self::audit_config`]).
    #[serde(default)]
    pub audit: AuditConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

/// Listening addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Client port, for the member's information systems.
    pub client: SocketAddr,
    /// Peer port, for other security servers.
    pub peer: SocketAddr,
    /// Admin port, for operators.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Development only: accept plaintext on the client port, without client
    /// authentication. Refused unless `client` is a loopback address.
    #[serde(default)]
    pub plaintext_client: bool,
}

/// A registry this server provides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    /// The provider subsystem id.
    pub id: SubsystemId,
    /// The registry's gRPC endpoint, e.g. `http://127.0.0.1:7001`.
    pub endpoint: String,
}

impl ServerConfig {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut config: ServerConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        config.rebase(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Writes the configuration to `path` (TOML), e.g. to run it as its own
    /// process or to point `kopir audit --config` at it.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string(self)
            .map_err(|e| ConfigError(format!("cannot write {}: {e}", path.display())))?;
        std::fs::write(path, text)
            .map_err(|e| ConfigError(format!("cannot write {}: {e}", path.display())))
    }

    /// Makes relative paths relative to `base`.
    pub(crate) fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| rebase_path(base, p);
        fix(&mut self.data_dir);
        self.tls.rebase(base);
        self.signing.rebase(base);
        self.globalconf.rebase(base);
        self.clients.iter_mut().for_each(|c| fix(&mut c.cert));
        self.operators.iter_mut().for_each(fix);
        if let Some(key) = &mut self.audit.pseudonym_key {
            fix(key);
        }
    }

    /// The audit log's configuration, with the server's data directory.
    pub fn audit_config(&self) -> AuditConfig {
        AuditConfig {
            data_dir: self.data_dir.clone(),
            ..self.audit.clone()
        }
    }
}
