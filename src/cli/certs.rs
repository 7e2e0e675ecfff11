//! `kopir certs dev`: a development PKI for a federation description.

use anyhow::Context;
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
    /// Issue a certificate for a certificate signing request with the
    /// development CA (what the federation's CA does in production).
    Issue {
        /// The request (PEM), as `kopir server init` writes it.
        #[arg(long)]
        csr: PathBuf,
        /// The CA's certificate.
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA's key.
        #[arg(long)]
        ca_key: PathBuf,
        /// A signing certificate (default: a TLS certificate, for server and
        /// client authentication).
        #[arg(long)]
        signing: bool,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
}

impl Command {
    /// Runs the command.
    pub fn run(self) -> anyhow::Result<()> {
        let (out, federation) = match self {
            Command::Dev { out, federation } => (out, federation),
            Command::Issue {
                csr,
                ca_cert,
                ca_key,
                signing,
                out,
            } => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                };
                let cert =
                    dev::issue_from_csr(&read(&ca_cert)?, &read(&ca_key)?, &read(&csr)?, !signing)?;
                std::fs::write(&out, cert)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                println!("issued {}", out.display());
                return Ok(());
            }
        };
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
