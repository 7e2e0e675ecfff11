//! Pieces that several configuration files share: key files, where the
//! global configuration comes from, the information systems of a member,
//! a server's limits, and how paths and database URLs are handled.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    globalconf::{
        ConfView,
        anchor::Anchor,
        fetch::Bounds,
        kept::KeptCopy,
        watch::{self, Download},
    },
    id::SubsystemId,
    pki::sign::VerifyingKey,
};

/// A certificate file and its private key file (PEM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFiles {
    /// Certificate (chain) file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

/// Where the global configuration comes from: an anchor file (its sources
/// and the authority's certificates), or a single local file and the
/// authority's certificates (air-gapped setups, tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfSource {
    /// The anchor the authority wrote (`kopir authority anchor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<PathBuf>,
    /// Instead of an anchor: the signed file the authority publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// With `path`: the authority's certificates whose keys may sign it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anchors: Vec<PathBuf>,
    /// How often to ask the sources for a new version, in seconds.
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    /// How long a connection to a source may take, in seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// How long a source may take to send the whole copy, in seconds.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: u64,
    /// The largest copy accepted, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

impl Default for GlobalConfSource {
    /// No source yet, and the defaults of every bound.
    fn default() -> Self {
        Self {
            anchor: None,
            path: None,
            anchors: vec![],
            refresh_secs: default_refresh(),
            connect_timeout_secs: default_connect_timeout(),
            read_timeout_secs: default_read_timeout(),
            max_bytes: default_max_bytes(),
        }
    }
}

impl GlobalConfSource {
    /// The anchor to download with: the anchor file, or the one local file
    /// and its trust anchors. Blocking (reads the files).
    pub fn anchor(&self) -> Result<Anchor, ConfigError> {
        match (&self.anchor, &self.path) {
            (Some(anchor), None) if self.anchors.is_empty() => {
                Anchor::load(anchor).map_err(|e| ConfigError(format!("globalconf.anchor: {e}")))
            }
            (None, Some(path)) => Ok(Anchor::of_file(path.clone(), self.anchor_keys()?)),
            (Some(_), _) => Err(ConfigError(
                "globalconf names an anchor and also a path or anchors: the anchor lists the sources and the authority's certificates; remove path and anchors".into(),
            )),
            (None, None) => Err(ConfigError(
                "globalconf names neither an anchor (anchor = \"anchor.json\") nor a file (path and anchors)".into(),
            )),
        }
    }

    /// The authority's keys `anchors` names (at least one).
    fn anchor_keys(&self) -> Result<Vec<VerifyingKey>, ConfigError> {
        let keys = self
            .anchors
            .iter()
            .map(|p| VerifyingKey::load(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError(format!("globalconf.anchors: {e}")))?;
        if keys.is_empty() {
            return Err(ConfigError(
                "globalconf.anchors names no trust anchor".into(),
            ));
        }
        Ok(keys)
    }

    /// How often and within which bounds the server downloads.
    pub fn download(&self) -> Download {
        Download {
            refresh: Duration::from_secs(self.refresh_secs.max(1)),
            bounds: Bounds {
                connect_timeout: Duration::from_secs(self.connect_timeout_secs.max(1)),
                read_timeout: Duration::from_secs(self.read_timeout_secs.max(1)),
                max_bytes: self.max_bytes,
            },
        }
    }

    /// The configuration a server with this source uses, read once for a
    /// tool: the file `path` names, or the copy the server kept in
    /// `data_dir`. Blocking.
    pub fn read_now(&self, data_dir: &Path) -> Result<Arc<ConfView>, ConfigError> {
        let anchor = self.anchor()?;
        let file = match &self.path {
            Some(path) => path.clone(),
            None => KeptCopy::in_dir(data_dir).path().to_path_buf(),
        };
        watch::read(&file, &anchor.keys).map_err(|e| ConfigError(e.to_string()))
    }

    /// Makes its paths relative to `base`.
    pub fn rebase(&mut self, base: &Path) {
        self.anchor.iter_mut().for_each(|p| rebase_path(base, p));
        self.path.iter_mut().for_each(|p| rebase_path(base, p));
        self.anchors.iter_mut().for_each(|p| rebase_path(base, p));
    }
}

impl KeyFiles {
    /// Makes its paths relative to `base`.
    pub fn rebase(&mut self, base: &Path) {
        rebase_path(base, &mut self.cert);
        rebase_path(base, &mut self.key);
    }
}

/// Makes a relative `path` relative to `base`.
pub fn rebase_path(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

fn default_refresh() -> u64 {
    60
}

fn default_connect_timeout() -> u64 {
    Bounds::default().connect_timeout.as_secs()
}

fn default_read_timeout() -> u64 {
    Bounds::default().read_timeout.as_secs()
}

fn default_max_bytes() -> usize {
    Bounds::default().max_bytes
}

/// An information system allowed on the client port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalClient {
    /// Its subsystem id.
    pub id: SubsystemId,
    /// Its TLS client certificate.
    pub cert: PathBuf,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Limits of one security server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request or response message, in bytes.
    pub max_body_bytes: usize,
    /// How far a request's signed time may be from the provider's clock, in ms.
    pub max_clock_skew_ms: i64,
    /// Deadline of a call that carries none, and the longest one honoured, in ms.
    pub timeout_ms: u64,
    /// How long to wait for a TCP/TLS connection to a peer or registry, in ms.
    pub connect_timeout_ms: u64,
    /// Calls processed at once per port (across its connections); more are
    /// shed at once with `RESOURCE_EXHAUSTED` / `server.overloaded`.
    pub max_concurrent_calls: usize,
    /// Calls one caller (an information system, a peer server, an operator)
    /// may have in progress at once on a port; by default a quarter of
    /// `max_concurrent_calls`, so that no one caller can take a port's
    /// whole budget.
    pub max_calls_per_caller: Option<usize>,
    /// Time a request body may take to arrive after its headers, in ms
    /// (within the call's deadline).
    pub body_read_timeout_ms: u64,
    /// Interval of the summary records of refused unknown callers, in seconds.
    pub unknown_caller_summary_secs: u64,
    /// Request ids remembered for replay protection.
    pub replay_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_clock_skew_ms: 60_000,
            timeout_ms: 30_000,
            connect_timeout_ms: 2_000,
            max_concurrent_calls: 1024,
            max_calls_per_caller: None,
            body_read_timeout_ms: 10_000,
            unknown_caller_summary_secs: 60,
            replay_capacity: 1_000_000,
        }
    }
}

impl Limits {
    /// The default and maximum deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// The body-read timeout.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1))
    }
    /// Calls one caller may have in progress on a port.
    pub fn per_caller_calls(&self) -> usize {
        self.max_calls_per_caller
            .unwrap_or(self.max_concurrent_calls / 4)
    }
    /// The interval of unknown-caller summaries.
    pub fn unknown_caller_summary(&self) -> Duration {
        Duration::from_secs(self.unknown_caller_summary_secs.max(1))
    }
}

/// A URL with any password replaced by `***`, for messages.
pub fn redacted_url(url: &str) -> String {
    // postgres://user:password@host/db
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
        && let Some((user, _)) = auth.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    // key=value form
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted_url("postgres://kopir:secret@db:5432/audit"),
            "postgres://kopir:***@db:5432/audit"
        );
        assert_eq!(
            redacted_url("host=db user=kopir password=secret dbname=audit"),
            "host=db user=kopir password=*** dbname=audit"
        );
        assert_eq!(redacted_url("postgres://db/audit"), "postgres://db/audit");
    }
}
