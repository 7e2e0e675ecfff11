//! What every part of kopir shares: identifiers ([`id`]), refusal reasons
//! and their gRPC mapping ([`error`]), time ([`clock`], [`deadline`]), keys,
//! certificates, signatures and TLS ([`pki`]), the signed global
//! configuration ([`globalconf`]), the metadata of a call ([`meta`]), pieces
//! of configuration files ([`config`]), durable file writes ([`durable`]) and
//! logging ([`logging`]).

pub mod clock;
pub mod config;
pub mod deadline;
pub mod durable;
pub mod error;
pub mod globalconf;
pub mod id;
pub mod logging;
pub mod meta;
pub mod pki;
