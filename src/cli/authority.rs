//! `kopir authority`: build the global configuration from the federation
//! description and sign it, once or at an interval (`sign`), or sign it at
//! an interval and publish it over HTTP(S) (`serve`); write the anchor
//! servers download it with (`anchor`).

use anyhow::Context;
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::Notify;

use kopir_authority::{
    publish::{self, Publication},
    registry::Registry,
    sign::{Signed, Signer},
};
use kopir_core::durable::write_atomically;
use kopir_core::{
    globalconf::{anchor, describe::Federation},
    pki::{cert_fingerprint, layout::DevLayout, load_certs, load_key, sign::SigningKey},
};
use kopir_proto::v1::{
    Decide, ListManagementRequests, ManagementRequest, request_admin_client::RequestAdminClient,
};

/// Authority commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build, sign and write the global configuration.
    Sign(SignArgs),
    /// Sign the global configuration at an interval and publish it over
    /// HTTP(S) at /globalconf/v1/globalconf.json.
    Serve(ServeArgs),
    /// List the management requests (pending ones by default).
    Requests(RequestsArgs),
    /// Approve a pending management request: it appears in the next
    /// configuration, which is signed at once.
    Approve(DecideArgs),
    /// Reject a pending management request, saying why.
    Reject(DecideArgs),
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
    /// Where to take management requests (gRPC over TLS with the
    /// --tls-cert): members join, add servers and subsystems, move.
    #[arg(long, requires_all = ["tls_cert", "state"])]
    pub management: Option<SocketAddr>,
    /// The authority's state: the requests, their log (an audit store), the
    /// certificates approved requests carry.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// A client certificate of an operator who may list, approve and reject
    /// requests; repeatable.
    #[arg(long = "operator")]
    pub operators: Vec<PathBuf>,
    /// Approve at once a new server of an existing member (signed by the
    /// member's current key, submitted with the server's new certificate).
    #[arg(long)]
    pub auto_approve_servers: bool,
}

/// Where the authority's management port is, and the operator's identity.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The management port, host:port.
    #[arg(long)]
    pub management: String,
    #[command(flatten)]
    pub tls: super::OperatorTls,
}

/// Arguments of `kopir authority requests`.
#[derive(Debug, clap::Args)]
pub struct RequestsArgs {
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// pending, approved, rejected or all.
    #[arg(long, default_value = "pending")]
    pub state: String,
}

/// Arguments of `kopir authority approve` and `reject`.
#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// The request's id.
    pub id: String,
    /// Why (required to reject).
    #[arg(long, default_value = "")]
    pub why: String,
}

impl SigningArgs {
    /// The authority's signing key these arguments name.
    fn key(&self, fed: &Federation) -> anyhow::Result<SigningKey> {
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let layout = fed.certs.as_ref().map(DevLayout::new).ok_or_else(|| {
                    anyhow::anyhow!("give --cert and --key, or `certs` in the description")
                })?;
                (layout.authority_cert(), layout.authority_key())
            }
        };
        Ok(SigningKey::load(&cert, &key)?)
    }

    /// The signer these arguments name, each document valid for `valid_for`.
    fn signer(&self, valid_for: Duration) -> anyhow::Result<Signer> {
        let fed = Federation::load(&self.federation)?;
        let key = self.key(&fed)?;
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
            Command::Requests(args) => {
                let state = if args.state == "all" {
                    String::new()
                } else {
                    args.state
                };
                let list = admin(&args.operator)
                    .await?
                    .list(ListManagementRequests { state })
                    .await
                    .map_err(super::refused)
                    .with_context(|| {
                        format!(
                            "the authority's management port at {}",
                            args.operator.management
                        )
                    })?
                    .into_inner();
                for r in &list.requests {
                    print_request(r);
                }
                if list.requests.is_empty() {
                    println!("no requests");
                }
                Ok(())
            }
            Command::Approve(args) => decide(args, true).await,
            Command::Reject(args) => decide(args, false).await,
        }
    }
}

/// A client of the authority's `RequestAdmin`, as the operator.
async fn admin(
    operator: &OperatorArgs,
) -> anyhow::Result<RequestAdminClient<tonic::transport::Channel>> {
    Ok(RequestAdminClient::new(
        operator.tls.channel(&operator.management)?,
    ))
}

fn print_request(r: &ManagementRequest) {
    println!(
        "{} {} {} submitted {}",
        r.id, r.state, r.member, r.submitted_at
    );
    for change in &r.changes {
        println!("    {change}");
    }
    if !r.decided_at.is_empty() {
        println!("    decided {}: {}", r.decided_at, r.why);
    }
    if r.in_serial != 0 {
        println!("    in the configuration from serial {}", r.in_serial);
    }
}

async fn decide(args: DecideArgs, approve: bool) -> anyhow::Result<()> {
    let mut client = admin(&args.operator).await?;
    let decision = Decide {
        id: args.id,
        why: args.why,
    };
    let answer = if approve {
        client.approve(decision).await
    } else {
        client.reject(decision).await
    };
    let answer = answer.map_err(super::refused).with_context(|| {
        format!(
            "the authority's management port at {}",
            args.operator.management
        )
    })?;
    print_request(&answer.into_inner());
    Ok(())
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
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let changed = Arc::new(Notify::new());
    let management = match &args.management {
        Some(addr) => Some(management(&args, &signer, addr, &changed, stopped.clone()).await?),
        None => None,
    };
    if let Some((registry, _, _)) = &management {
        signer.set_federation(registry.description());
    }
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
    let port = tokio::spawn(publish::serve(listener, tls, publication.clone(), stopped));
    let mut ticks = tokio::time::interval(args.every.max(Duration::from_secs(1)));
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            // An approved request is published at once.
            _ = changed.notified() => {}
            _ = &mut stop_signal => break,
        }
        if let Some((registry, _, _)) = &management {
            signer.set_federation(registry.description());
        }
        // A document that cannot be signed (a certificate expired, a file
        // unreadable) is logged; the last one stays published until it
        // expires, so servers keep working while an operator fixes it.
        match signer.sign() {
            Ok(signed) => match put(&publication, &signed, args.out.as_ref()) {
                Ok(()) => {
                    announce(&signed);
                    if let Some((registry, _, _)) = &management {
                        registry.published(signed.serial).await;
                    }
                }
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
    if let Some((_, audit, task)) = management {
        task.await??;
        audit.shutdown().await;
    }
    Ok(())
}

/// The management port: its registry of requests (kept in `--state`, logged
/// in an audit store there signed with the authority's key) and the task
/// serving it.
async fn management(
    args: &ServeArgs,
    signer: &Signer,
    addr: &SocketAddr,
    changed: &Arc<Notify>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(
    Arc<Registry>,
    Arc<kopir_audit::AuditHandle>,
    tokio::task::JoinHandle<Result<(), kopir_core::pki::PkiError>>,
)> {
    let (Some(state), Some(cert), Some(key)) = (&args.state, &args.tls_cert, &args.tls_key) else {
        anyhow::bail!("--management needs --state, --tls-cert and --tls-key");
    };
    let key_for_log = Arc::new(args.signing.key(signer.federation())?);
    let audit = kopir_audit::open(
        &kopir_audit::AuditConfig::embedded(state.clone()),
        key_for_log,
    )
    .await?;
    let opened = {
        let (state, base, audit) = (state.clone(), signer.federation().clone(), audit.clone());
        let auto = args.auto_approve_servers;
        tokio::task::spawn_blocking(move || Registry::open(&state, base, audit, auto)).await?
    };
    let registry = Arc::new(
        opened.map_err(|e| anyhow::anyhow!("the authority's state in {}: {e}", state.display()))?,
    );
    let operators = args
        .operators
        .iter()
        .map(|p| cert_fingerprint(p))
        .collect::<Result<Vec<_>, _>>()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("taking management requests at {}", listener.local_addr()?);
    let task = tokio::spawn(kopir_authority::management::serve(
        listener,
        load_certs(cert)?,
        load_key(key)?,
        registry.clone(),
        operators,
        changed.clone(),
        stopped,
    ));
    Ok((registry, audit, task))
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
