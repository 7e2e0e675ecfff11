//! `kopir server`: a security server joins the federation and changes what
//! the global configuration says of it, by management requests to the
//! authority (see docs/joining.md).
//!
//! - `init` makes the server's TLS key and its certificate signing request
//!   and, for a new member, the member's signing key and its request, for
//!   the federation's CA.
//! - `register`, once the CA has issued the certificates, signs the request
//!   (the new signing key proves possession; an existing member's current
//!   key authorises it) and submits it over TLS presenting the new TLS
//!   certificate (which proves possession of the TLS key).
//! - `change` asks for a new address or a subsystem added or removed,
//!   signed by the member's current key.
//! - `status` asks a running server what it says of its global
//!   configuration.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use kopir_authority::request::{self, Change, Request};
use kopir_consent::channel::ca_channel;
use kopir_core::{
    id::{MemberId, ServerId},
    pki::{dev, load_certs, load_key, sign::SigningKey},
};
use kopir_proto::v1::{
    GlobalConfStatusRequest, ManagementRequest, SubmitRequest,
    registration_client::RegistrationClient, server_status_client::ServerStatusClient,
};
use serde::{Deserialize, Serialize};

/// Server commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make the keys and certificate signing requests of a new server (and,
    /// with --new-member, of its new member).
    Init(InitArgs),
    /// Sign the registration request with the issued certificates and
    /// submit it to the authority.
    Register(RegisterArgs),
    /// Ask the authority for a change of a registered member: a server's new
    /// address, a subsystem added or removed, a signing certificate added or
    /// removed (a key rollover).
    Change(ChangeArgs),
    /// What a running server says of its global configuration (its admin
    /// port, as an operator): the copy in use, where and when it came from,
    /// when it expires, how each source last answered.
    Status(StatusArgs),
}

/// Arguments of `kopir server status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The server's admin port, host:port.
    #[arg(long)]
    pub admin: String,
    /// An operator's identity (a certificate the server's `operators` lists).
    #[command(flatten)]
    pub tls: super::OperatorTls,
}

/// Arguments of `kopir server init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The server, MEMBER/CODE, e.g. KZ/GOV/MLSPP/ss2.
    #[arg(long)]
    pub server: ServerId,
    /// A host name or address its TLS certificate is for; repeatable.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// The member is new: its name (then its signing key is made too).
    #[arg(long)]
    pub new_member: Option<String>,
    /// The folder to write the keys and requests into.
    #[arg(long)]
    pub out: PathBuf,
}

/// What `init` leaves for `register`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Joining {
    server: ServerId,
    new_member: Option<String>,
}

/// Where the authority's management port is, and whom to trust for it.
#[derive(Debug, clap::Args)]
pub struct AuthorityArgs {
    /// The authority's management port, host:port.
    #[arg(long)]
    pub authority: String,
    /// The CA certificate the authority's TLS certificate chains to.
    #[arg(long)]
    pub authority_ca: PathBuf,
}

/// Arguments of `kopir server register`.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The folder `init` wrote, with `tls.crt` (and, for a new member,
    /// `signing.crt`) issued by the CA beside the keys.
    #[arg(long)]
    pub dir: PathBuf,
    /// host:port of the server's peer port, as other servers reach it.
    #[arg(long)]
    pub address: String,
    /// Codes of the member's subsystems the server provides; repeatable.
    #[arg(long = "subsystem")]
    pub subsystems: Vec<String>,
    /// An existing member's current signing certificate and key (they
    /// authorise the request).
    #[arg(long, requires = "member_key")]
    pub member_cert: Option<PathBuf>,
    /// The member's current signing key.
    #[arg(long, requires = "member_cert")]
    pub member_key: Option<PathBuf>,
    #[command(flatten)]
    pub to: AuthorityArgs,
}

/// Arguments of `kopir server change`.
#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// The member.
    #[arg(long)]
    pub member: MemberId,
    /// Its current signing certificate.
    #[arg(long)]
    pub member_cert: PathBuf,
    /// Its current signing key.
    #[arg(long)]
    pub member_key: PathBuf,
    /// A server's new address, CODE=HOST:PORT; repeatable.
    #[arg(long = "set-address")]
    pub set_address: Vec<String>,
    /// A new subsystem, CODE or CODE:personal (its services return personal
    /// data); repeatable.
    #[arg(long = "add-subsystem")]
    pub add_subsystems: Vec<String>,
    /// A subsystem to remove; repeatable.
    #[arg(long = "remove-subsystem")]
    pub remove_subsystems: Vec<String>,
    /// A new signing certificate to list beside the current one (the first
    /// step of a key rollover); its key signs the request too.
    #[arg(long, requires = "new_signing_key")]
    pub add_signing_cert: Option<PathBuf>,
    /// The key of --add-signing-cert.
    #[arg(long, requires = "add_signing_cert")]
    pub new_signing_key: Option<PathBuf>,
    /// A signing certificate to list no more (the last step of a rollover).
    #[arg(long)]
    pub remove_signing_cert: Option<PathBuf>,
    /// The TLS client certificate and key to connect with (a server's of the
    /// member; none: server-authenticated TLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub to: AuthorityArgs,
}

impl Command {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Init(a) => init(a),
            Command::Register(a) => register(a).await,
            Command::Change(a) => change(a).await,
            Command::Status(a) => status(a).await,
        }
    }
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} exists; init never overwrites a key", path.display());
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let (csr, key) = dev::key_and_csr(&args.server.to_string(), &args.hosts, false)?;
    write_new(&args.out.join("tls.key"), &key)?;
    write_new(&args.out.join("tls.csr"), &csr)?;
    let mut made = vec!["tls.key", "tls.csr"];
    if args.new_member.is_some() {
        let member = args.server.member().to_string();
        let (csr, key) = dev::key_and_csr(&format!("{member} signing"), &[], true)?;
        write_new(&args.out.join("signing.key"), &key)?;
        write_new(&args.out.join("signing.csr"), &csr)?;
        made.extend(["signing.key", "signing.csr"]);
    }
    let joining = Joining {
        server: args.server.clone(),
        new_member: args.new_member.clone(),
    };
    std::fs::write(
        args.out.join("joining.json"),
        serde_json::to_string_pretty(&joining)?,
    )?;
    println!(
        "wrote {} to {}: have the CA issue tls.crt{} for the request(s), then run kopir server register",
        made.join(", "),
        args.out.display(),
        if args.new_member.is_some() {
            " and signing.crt"
        } else {
            ""
        }
    );
    Ok(())
}

/// Submits `bytes` over TLS presenting `identity`, and prints the answer.
async fn submit(
    to: &AuthorityArgs,
    identity: Option<(PathBuf, PathBuf)>,
    bytes: Vec<u8>,
) -> anyhow::Result<ManagementRequest> {
    let roots = load_certs(&to.authority_ca)?;
    let identity = match identity {
        Some((cert, key)) => Some((load_certs(&cert)?, load_key(&key)?)),
        None => None,
    };
    let channel = ca_channel(&to.authority, &roots, identity, Duration::from_secs(10))?;
    let answer = RegistrationClient::new(channel)
        .submit(SubmitRequest {
            request: bytes.into(),
        })
        .await
        .map_err(super::refused)
        .with_context(|| format!("the authority's management port at {}", to.authority))?
        .into_inner();
    println!(
        "request {} {}: {}",
        answer.id,
        answer.state,
        answer.changes.join("; ")
    );
    Ok(answer)
}

fn new_request(member: MemberId, changes: Vec<Change>) -> Request {
    Request {
        id: uuid::Uuid::new_v4().to_string(),
        member,
        created_at: time::OffsetDateTime::now_utc(),
        changes,
    }
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(args.dir.join("joining.json"))
        .context("the folder kopir server init wrote")?;
    let joining: Joining = serde_json::from_str(&text)?;
    let pem = |name: &str| {
        std::fs::read_to_string(args.dir.join(name))
            .with_context(|| format!("{} (issued by the CA)", args.dir.join(name).display()))
    };
    let member = joining.server.member().clone();
    let mut changes = vec![];
    let mut keys = vec![];
    if let Some(name) = &joining.new_member {
        changes.push(Change::JoinMember {
            name: name.clone(),
            signing_cert: pem("signing.crt")?,
        });
        keys.push(SigningKey::load(
            &args.dir.join("signing.crt"),
            &args.dir.join("signing.key"),
        )?);
    }
    changes.push(Change::AddServer {
        code: joining.server.0.code.to_string(),
        address: args.address.clone(),
        tls_cert: pem("tls.crt")?,
        subsystems: args.subsystems.clone(),
    });
    match (&args.member_cert, &args.member_key, &joining.new_member) {
        (Some(cert), Some(key), _) => keys.push(SigningKey::load(cert, key)?),
        (None, None, None) => bail!(
            "{member} is an existing member: give its current signing key (--member-cert, --member-key)"
        ),
        _ => {}
    }
    let request = new_request(member, changes);
    let bytes = request::sign(&request, &keys.iter().collect::<Vec<_>>());
    std::fs::write(args.dir.join("request.json"), &bytes)?;
    let identity = Some((args.dir.join("tls.crt"), args.dir.join("tls.key")));
    submit(&args.to, identity, bytes).await?;
    Ok(())
}

async fn change(args: ChangeArgs) -> anyhow::Result<()> {
    let mut changes = vec![];
    for text in &args.set_address {
        let (code, address) = text
            .split_once('=')
            .with_context(|| format!("--set-address {text:?}: CODE=HOST:PORT"))?;
        changes.push(Change::SetAddress {
            code: code.into(),
            address: address.into(),
        });
    }
    for text in &args.add_subsystems {
        let (code, personal_data) = match text.split_once(':') {
            Some((code, "personal")) => (code, true),
            Some(_) => bail!("--add-subsystem {text:?}: CODE or CODE:personal"),
            None => (text.as_str(), false),
        };
        changes.push(Change::AddSubsystem {
            code: code.into(),
            personal_data,
        });
    }
    for code in &args.remove_subsystems {
        changes.push(Change::RemoveSubsystem { code: code.clone() });
    }
    let mut keys = vec![SigningKey::load(&args.member_cert, &args.member_key)?];
    if let (Some(cert), Some(key)) = (&args.add_signing_cert, &args.new_signing_key) {
        changes.push(Change::AddSigningCert {
            signing_cert: std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?,
        });
        keys.push(SigningKey::load(cert, key)?);
    }
    if let Some(cert) = &args.remove_signing_cert {
        changes.push(Change::RemoveSigningCert {
            key_id: kopir_core::pki::cert_fingerprint(cert)?.to_string(),
        });
    }
    if changes.is_empty() {
        bail!(
            "name a change: --set-address, --add-subsystem, --remove-subsystem, --add-signing-cert or --remove-signing-cert"
        );
    }
    let bytes = request::sign(
        &new_request(args.member.clone(), changes),
        &keys.iter().collect::<Vec<_>>(),
    );
    let identity = args.tls_cert.clone().zip(args.tls_key.clone());
    submit(&args.to, identity, bytes).await?;
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let s = ServerStatusClient::new(args.tls.channel(&args.admin)?)
        .global_conf(GlobalConfStatusRequest {})
        .await
        .map_err(super::refused)
        .with_context(|| format!("the server's admin port at {}", args.admin))?
        .into_inner();
    if s.usable {
        println!("usable: serial {}, expires {}", s.serial, s.expires_at);
    } else {
        println!("NOT usable ({}): {}", s.reason, s.why);
    }
    println!("obtained from {} at {}", s.obtained_from, s.obtained_at);
    println!("last checked at {} from {}", s.checked_at, s.checked_from);
    println!("authority keys: {}", s.authority_keys.join(", "));
    for source in &s.sources {
        println!("source {}", source.location);
        println!("    last success {}", dash(&source.last_success));
        if !source.last_failure.is_empty() {
            println!(
                "    last failure {}: {}",
                source.last_failure, source.last_error
            );
        }
    }
    Ok(())
}

fn dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}
