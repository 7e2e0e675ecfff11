//! `kopir authority`: build the global configuration from the federation
//! description and sign it, once or at an interval (`sign`), or sign it at
//! an interval and publish it over HTTP(S) (`serve`); write the anchor
//! servers download it with (`anchor`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kopir_authority::{
    publish::{self, Publication},
    sign::{Signed, Signer},
};
use kopir_core::durable::write_atomically;
use kopir_core::{
    globalconf::{anchor, describe::Federation},
    pki::{layout::DevLayout, load_certs, sign::SigningKey},
};

/// Authority commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build, sign and write the global configuration.
    Sign(SignArgs),
    /// Sign the global configuration at an interval and publish it over
    /// HTTP(S) at /globalconf/v1/globalconf.json.
    Serve(ServeArgs),
    /// Write the anchor servers download with: the instance, the sources and
    /// the authority's certificates. Prints its SHA-256, for operators to
    /// compare with what they install.
    Anchor(AnchorArgs),
}

/// Arguments of `kopir authority anchor`.
#[derive(Debug, clap::Args)]
pub struct AnchorArgs {
    /// The federation description (TOML): its instance, and its development
    /// PKI when no --cert is given.
    #[arg(long)]
    pub federation: PathBuf,
    /// A certificate whose key may sign the configuration; repeat it to
    /// announce the next key beside the current one (default: the
    /// description's development PKI's authority certificate).
    #[arg(long = "cert")]
    pub certs: Vec<PathBuf>,
    /// Where the signed configuration can be downloaded: an http(s) URL or
    /// file:PATH; repeat it for mirrors, which are tried in turn.
    #[arg(long = "source", required = true)]
    pub sources: Vec<String>,
    /// A CA certificate (PEM) an https source's certificate must chain to;
    /// repeatable (default: the system's trust store).
    #[arg(long = "tls-root")]
    pub tls_roots: Vec<PathBuf>,
    /// Where to write the anchor.
    #[arg(long)]
    pub out: PathBuf,
}

/// What both commands sign.
#[derive(Debug, clap::Args)]
pub struct SigningArgs {
    /// The federation description (TOML).
    #[arg(long)]
    pub federation: PathBuf,
    /// The authority's signing certificate (default: the description's development PKI).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The authority's signing key.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Also announce the key of this certificate, so that servers trust it
    /// before it signs (the next key of a rotation); repeatable. Every
    /// document announces its own signing key too.
    #[arg(long = "announce", value_name = "CERT")]
    pub announce: Vec<PathBuf>,
}

/// Arguments of `kopir authority sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    #[command(flatten)]
    pub signing: SigningArgs,
    /// Where to write the signed configuration.
    #[arg(long)]
    pub out: PathBuf,
    /// How long servers may use it without a newer one, e.g. `10m`, `24h`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Re-sign at this interval, forever (as the authority's publisher does).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
}

/// Arguments of `kopir authority serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub signing: SigningArgs,
    /// Where to listen (port 0: any free port, printed at start).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The TLS certificate chain to serve HTTPS with (without it: HTTP).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS private key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long servers may use each document without a newer one.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Re-sign at this interval (well below the validity).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Also write each document to this file (a local source, or a folder a
    /// mirror serves).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl SigningArgs {
    /// The signer these arguments name, each document valid for `valid_for`.
    fn signer(&self, valid_for: Duration) -> anyhow::Result<Signer> {
        let fed = Federation::load(&self.federation)?;
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let layout = fed.certs.as_ref().map(DevLayout::new).ok_or_else(|| {
                    anyhow::anyhow!("give --cert and --key, or `certs` in the description")
                })?;
                (layout.authority_cert(), layout.authority_key())
            }
        };
        let key = SigningKey::load(&cert, &key)?;
        let mut announced = vec![];
        for file in &self.announce {
            announced.push(load_certs(file)?.swap_remove(0));
        }
        Ok(Signer::new(fed, key, valid_for).announcing(&announced))
    }
}

impl Command {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Sign(args) => sign(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Anchor(args) => anchor(args),
        }
    }
}

fn anchor(args: AnchorArgs) -> anyhow::Result<()> {
    let fed = Federation::load(&args.federation)?;
    let mut cert_files = args.certs.clone();
    if cert_files.is_empty() {
        let layout = fed
            .certs
            .as_ref()
            .map(DevLayout::new)
            .ok_or_else(|| anyhow::anyhow!("give --cert, or `certs` in the description"))?;
        cert_files.push(layout.authority_cert());
    }
    let mut certs = vec![];
    for file in &cert_files {
        certs.push(load_certs(file)?.swap_remove(0));
    }
    let mut roots = vec![];
    for file in &args.tls_roots {
        roots.extend(load_certs(file)?);
    }
    let (text, digest) = anchor::write(
        &fed.instance,
        &args.sources,
        &certs,
        &roots,
        time::OffsetDateTime::now_utc(),
    )?;
    write_atomically(&args.out, text.as_bytes())?;
    println!(
        "wrote the anchor of instance {} to {}, SHA-256 {digest}",
        fed.instance,
        args.out.display()
    );
    Ok(())
}

async fn sign(args: SignArgs) -> anyhow::Result<()> {
    let mut signer = args.signing.signer(args.valid_for)?;
    loop {
        let signed = signer.sign()?;
        write_atomically(&args.out, &signed.bytes)?;
        println!(
            "published global configuration serial {} to {}, expires {}",
            signed.serial,
            args.out.display(),
            signed.expires_at
        );
        match args.every {
            Some(every) => tokio::time::sleep(every).await,
            None => return Ok(()),
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let stop_signal = super::stop_signal();
    tokio::pin!(stop_signal);
    let mut signer = args.signing.signer(args.valid_for)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(publish::tls(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The first document is signed before the port opens: a description that
    // does not sign is an error at start, not a port that answers 503.
    let publication = Publication::default();
    let first = signer.sign()?;
    put(&publication, &first, args.out.as_ref())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "publishing global configuration at {scheme}://{}{}",
        listener.local_addr()?,
        publish::PATH
    );
    announce(&first);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let port = tokio::spawn(publish::serve(listener, tls, publication.clone(), stopped));
    let mut ticks = tokio::time::interval(args.every.max(Duration::from_secs(1)));
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut stop_signal => break,
        }
        // A document that cannot be signed (a certificate expired, a file
        // unreadable) is logged; the last one stays published until it
        // expires, so servers keep working while an operator fixes it.
        match signer.sign() {
            Ok(signed) => match put(&publication, &signed, args.out.as_ref()) {
                Ok(()) => announce(&signed),
                Err(e) => {
                    tracing::error!(error = %e, "the signed configuration could not be written")
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "the global configuration could not be signed; the last one stays published")
            }
        }
    }
    let _ = stop.send(true);
    port.await?;
    Ok(())
}

/// Publishes `signed`, written to `out` first when given.
fn put(publication: &Publication, signed: &Signed, out: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(out) = out {
        write_atomically(out, &signed.bytes)?;
    }
    publication.put(signed);
    Ok(())
}

fn announce(signed: &Signed) {
    println!(
        "published global configuration serial {}, expires {}",
        signed.serial, signed.expires_at
    );
}
