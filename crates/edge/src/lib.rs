//! The edge of a port: how connections are admitted and served before any
//! request reaches kopir's security path.
//!
//! A port faces callers that may hold no certificate and may be hostile, so
//! nothing a single caller can open is unbounded:
//!
//! - [`accept`]: connections per port and per source address are capped, TLS
//!   handshakes run concurrently but are bounded per port and per source and
//!   must finish within a short timeout; on a full port the oldest handshake,
//!   or the oldest connection without a call in progress, gives way to a
//!   newcomer, so sockets held from many addresses cannot shut the port;
//! - [`conn`]: each connection is one HTTP/2 server with an advertised
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`, a bound on header lists and on streams
//!   reset by the client (rapid reset), keepalive pings, an idle timeout, and a
//!   bounded drain when the server stops;
//! - [`body`]: a request body answered without being read is drained in the
//!   background, so that early refusals do not use up the HTTP/2 library's
//!   per-connection budget for buffered frames;
//! - [`fds`]: the soft descriptor limit is raised to the hard one and part of it
//!   is kept in reserve for the server's own files (configuration, audit
//!   store), so a flood of sockets cannot make it unable to open them.
//!
//! The call budget that sheds calls beyond a port's capacity is applied by the
//! security path once the caller is known, not here.
//!
//! hyper serves the connections (as inside tonic's own server); kopir drives it
//! itself because tonic's server has no idle timeout, no per-source caps and
//! waits without bound for connections to close at shutdown.

pub(crate) mod accept;
pub(crate) mod body;
pub(crate) mod conn;
pub mod fds;
pub mod overload;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use accept::{serve, serve_web};

/// Limits at a port's edge (`[edge]` in a server's configuration); each
/// applies to every port of the server separately.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeLimits {
    /// Open connections a port accepts at once; lowered at start to what the
    /// descriptor limit allows after the reserve. When all are taken, a new
    /// connection takes the place of the oldest one without a call in
    /// progress.
    pub max_connections: usize,
    /// Open connections a port accepts at once from one source address.
    pub max_connections_per_source: usize,
    /// TLS handshakes a port runs at once; when all are taken, a new
    /// connection takes the place of the oldest handshake in progress.
    pub max_handshakes: usize,
    /// TLS handshakes a port runs at once for one source address.
    pub max_handshakes_per_source: usize,
    /// Time a TLS handshake may take, from the accepted TCP connection on.
    pub handshake_timeout_ms: u64,
    /// Streams one HTTP/2 connection may have open at once (advertised to the
    /// client in `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Bytes of request headers one call may send (HTTP/2
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`); CONTINUATION frames count too.
    pub max_header_list_bytes: u32,
    /// Streams the client may reset before the server has answered them, at
    /// once, before the connection is closed (CVE-2023-44487, rapid reset).
    pub max_pending_reset_streams: usize,
    /// A connection without a call in progress is closed after this long
    /// (between once and twice this long after its last call).
    pub idle_timeout_ms: u64,
    /// Interval of HTTP/2 PING frames the server sends to find connections
    /// whose other end is gone.
    pub keepalive_interval_ms: u64,
    /// A connection whose PING is not answered within this long is closed.
    pub keepalive_timeout_ms: u64,
    /// When the server stops, calls in progress get this long to finish before
    /// their connections are closed.
    pub drain_timeout_ms: u64,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 128,
            max_handshakes: 256,
            max_handshakes_per_source: 16,
            handshake_timeout_ms: 5_000,
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
            max_pending_reset_streams: 20,
            idle_timeout_ms: 60_000,
            keepalive_interval_ms: 20_000,
            keepalive_timeout_ms: 10_000,
            drain_timeout_ms: 5_000,
        }
    }
}

impl EdgeLimits {
    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.max(1))
    }
    pub(crate) fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
