//! kopir: a once-only data-exchange gateway.
//!
//! Each member's security server ([`server`]) authenticates its information
//! systems, signs and forwards their gRPC calls over mutual TLS to the provider's
//! security server, which checks identity, signature, access rules and basis,
//! calls the registry and signs the answer ([`exchange`]). A governance authority
//! signs the global configuration that every server trusts ([`kopir_core::globalconf`]).
//! Citizens (through the portal) and auditors read who read a person's data
//! from every provider's server ([`report`]).

pub mod config;
pub mod exchange;
pub(crate) mod policy;
pub mod report;
pub mod server;
pub(crate) mod status;
