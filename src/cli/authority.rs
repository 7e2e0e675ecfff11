//! `kopir authority sign`: build the global configuration from the federation
//! description and sign it, once or at an interval.

use std::{path::PathBuf, time::Duration};

use kopir_core::durable::write_atomically;
use kopir_core::{
    globalconf::{describe::Federation, signed},
    pki::{layout::DevLayout, sign::SigningKey},
};

/// Authority commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build, sign and write the global configuration.
    Sign(SignArgs),
}

/// Arguments of `kopir authority sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The federation description (TOML).
    #[arg(long)]
    pub federation: PathBuf,
    /// Where to write the signed configuration.
    #[arg(long)]
    pub out: PathBuf,
    /// The authority's signing certificate (default: the description's development PKI).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The authority's signing key.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// How long servers may use it without a newer one, e.g. `10m`, `24h`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Re-sign at this interval, forever (as the authority's publisher does).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
}

impl Command {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let Command::Sign(args) = self;
        let fed = Federation::load(&args.federation)?;
        let (cert, key) = match (&args.cert, &args.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let layout = fed.certs.as_ref().map(DevLayout::new).ok_or_else(|| {
                    anyhow::anyhow!("give --cert and --key, or `certs` in the description")
                })?;
                (layout.authority_cert(), layout.authority_key())
            }
        };
        let key = SigningKey::load(&cert, &key)?;
        loop {
            let serial = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
            let conf = fed.build(serial, time::Duration::try_from(args.valid_for)?)?;
            write_atomically(&args.out, signed::sign(&conf, &key).as_bytes())?;
            println!(
                "published global configuration serial {serial} to {}, expires {}",
                args.out.display(),
                conf.expires_at
            );
            match args.every {
                Some(every) => tokio::time::sleep(every).await,
                None => return Ok(()),
            }
        }
    }
}
