//! A whole federation on one machine, for tests, the demo and the benchmark:
//! [`federation::LocalFederation`] generates a development PKI, signs a
//! global configuration, and starts mock registries ([`registry`], with
//! synthetic data and the APIs in [`proto`]), a consent authority and
//! security servers on `127.0.0.1:0`. Nothing here is used by the security
//! server itself.

pub mod federation;
pub mod proto;
pub mod registry;

pub use kopir_pgtest::TempPostgres;
