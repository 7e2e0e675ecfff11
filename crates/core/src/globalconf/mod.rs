//! The global configuration: what every security server of the federation
//! agrees on (members, their servers and certificates, services, purposes and
//! trust anchors), signed by the governance authority.
//!
//! - [`model`]: the document itself, as published.
//! - [`describe`]: the authority's readable TOML description, turned into a document.
//! - [`signed`]: signing by the authority and verification against its anchor.
//! - [`view`]: a verified document indexed for the lookups of the security path.
//! - [`watch`]: a server's copy, reloaded when the file changes and refused when
//!   forged, expired or rolled back.
//! - [`highest`]: the highest version a server accepted, kept in its data
//!   directory, against rollbacks.

pub mod describe;
pub mod highest;
pub mod model;
pub mod signed;
pub mod view;
pub mod watch;

pub use model::GlobalConf;
pub use view::ConfView;
pub use watch::{ConfError, GlobalConfHandle};
