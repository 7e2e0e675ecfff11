//! The governance authority: it signs the global configuration
//! ([`sign`]) and publishes it over HTTP and HTTPS ([`publish`]).
//!
//! The published document is signed, so whoever serves a copy need not be
//! trusted: a server checks the signature against its anchor, and the
//! highest serial it has accepted, whatever the source. Any static web
//! server can therefore mirror [`publish::PATH`].

pub mod publish;
pub mod sign;
