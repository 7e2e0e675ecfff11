//! kopir: a once-only data-exchange gateway.
//!
//! Each member's security server ([`server`]) authenticates its information
//! systems, signs and forwards their gRPC calls over mutual TLS to the provider's
//! security server, which checks identity, signature, access rules and basis,
//! calls the registry and signs the answer ([`exchange`]). A governance authority
//! signs the global configuration that every server trusts ([`globalconf`]).
//! Citizens (through the portal) and auditors read who read a person's data
//! from every provider's server ([`report`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consent;
pub mod durable;
pub mod edge;
pub mod error;
pub mod exchange;
pub mod federation;
#[doc(hidden)]
pub mod fuzzing;
pub mod globalconf;
pub mod id;
pub mod logging;
pub mod overload;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod report;
pub mod server;
