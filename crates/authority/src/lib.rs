//! The governance authority: it signs the global configuration
//! ([`sign`]), publishes it over HTTP and HTTPS ([`publish`]), and takes
//! the management requests by which members join and change
//! ([`request`], [`registry`], served by [`management`]).
//!
//! The published document is signed, so whoever serves a copy need not be
//! trusted: a server checks the signature against its anchor, and the
//! highest serial it has accepted, whatever the source. Any static web
//! server can therefore mirror [`publish::PATH`].

pub mod management;
pub mod publish;
pub mod registry;
pub mod request;
pub mod sign;
