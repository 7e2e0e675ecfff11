//! The global configuration: what every security server of the federation
//! agrees on (members, their servers and certificates, services, purposes and
//! trust anchors), signed by the governance authority.
//!
//! - [`model`]: the document itself, as published.
//! - [`describe`]: the authority's readable TOML description, turned into a document.
//! - [`signed`]: signing by the authority and verification against its anchor.
//! - [`view`]: a verified document indexed for the lookups of the security path.
//! - [`anchor`]: what a server trusts and where it downloads from.
//! - [`fetch`]: one bounded download from one source.
//! - [`watch`]: a server's copy, downloaded from its sources in turn, kept
//!   when newer, and refused when forged, expired or rolled back.
//! - [`highest`]: the highest version a server accepted, kept in its data
//!   directory, against rollbacks.
//! - [`kept`]: the last good copy, in the data directory, to start from.

pub mod anchor;
pub mod describe;
pub mod fetch;
pub mod highest;
pub mod kept;
pub mod model;
pub mod signed;
pub mod view;
pub mod watch;

pub use model::GlobalConf;
pub use view::ConfView;
pub use watch::{ConfError, GlobalConfHandle};
