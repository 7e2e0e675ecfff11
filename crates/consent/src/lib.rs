//! Consent: the consent authority where citizens grant and revoke consent
//! (through the portal in front of it), the tokens it signs, and what a
//! provider's security server needs to honour them.
//!
//! ```text
//! portal ──Grant/List/Revoke──▶ consent authority ──store──▶ grants, revocations (SQLite | PostgreSQL)
//! consumer ──IssueToken──▶ consent authority: JWS (EdDSA), kid = authority's signing cert
//! consumer ──kopir-consent: <token>──▶ … ──▶ provider: ConsentVerifier::check
//! consent authority ══WatchRevocations (push + 1 s heartbeat)══▶ provider: RevocationFeed → RevocationSet
//! ```
//!
//! - [`token`]: the token format (JWS compact, `alg: EdDSA`, `typ: JWT`), signing and strict parsing;
//! - [`grant`]: a stored consent, the checks of a grant request, method coverage;
//! - [`store`]: grants, revocations and use counts, embedded (SQLite) or PostgreSQL;
//! - [`service`] and [`server`]: the authority's gRPC service and its assembly;
//! - [`config`]: `kopir consent serve --config FILE`;
//! - [`revocations`]: a provider's revoked set and its freshness;
//! - [`feed`]: the provider's task that keeps that set fresh from the authority;
//! - [`verify`]: [`ConsentVerifier`], what the provider's exchange path calls;
//! - [`channel`]: TLS channels to the authority.

pub mod channel;
pub mod config;
pub(crate) mod feed;
pub mod grant;
pub mod revocations;
pub mod server;
pub mod service;
pub mod store;
#[cfg(test)]
mod tests;
pub mod token;
pub mod verify;

pub use feed::{FeedOptions, RevocationFeed};
pub use revocations::{DEFAULT_MAX_SILENCE, RevocationSet};
pub use verify::{Accepted, ConsentVerifier, Expected, Uses};

/// Resolves once `stop` holds `true` (or its sender is gone).
pub async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers stay `Send`.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
