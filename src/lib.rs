//! kopir: a once-only data-exchange gateway.
//!
//! Each member's security server ([`server`]) authenticates its information
//! systems, signs and forwards their gRPC calls over mutual TLS to the provider's
//! security server, which checks identity, signature, access rules and basis,
//! calls the registry and signs the answer ([`exchange`]). A governance authority
//! signs the global configuration that every server trusts ([`globalconf`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod id;
pub mod proto;
