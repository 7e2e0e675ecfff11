//! `kopir certs dev`: a development PKI for a federation description.

use std::path::PathBuf;

use kopir_core::{globalconf::describe::Federation, pki::dev};

/// Certificate commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a CA, the authority's signing certificate, and every member's,
    /// server's and information system's certificate (development only: the
    /// private keys are written beside them).
    Dev {
        /// Folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// The federation description (default: the demo federation, deploy/federation.toml).
        #[arg(long)]
        federation: Option<PathBuf>,
    },
}

impl Command {
    /// Runs the command.
    pub fn run(self) -> anyhow::Result<()> {
        let Command::Dev { out, federation } = self;
        let fed = match federation {
            Some(path) => Federation::load(&path)?,
            None => toml::from_str(kopir_testkit::federation::FEDERATION_TOML)?,
        };
        let spec = fed.dev_pki_spec()?;
        dev::generate(&spec, &out)?;
        println!(
            "wrote a development PKI to {}: CA, authority, {} member signing, {} server TLS, {} client certificates, an operator certificate, the consent authority's signing and TLS certificates, the portal's client and assertion-signing certificates and {} auditor certificate(s)",
            out.display(),
            spec.members.len(),
            spec.servers.len(),
            spec.clients.len(),
            spec.auditors.len()
        );
        Ok(())
    }
}
