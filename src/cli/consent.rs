//! `kopir consent ...`: run a consent authority, and call one as the portal
//! (grant, list, revoke) or as a consumer (token).

use std::{path::PathBuf, time::Duration};

use tonic::transport::Channel;

use kopir_consent::{channel::ca_channel, config::ConsentConfig, server};
use kopir_core::{
    clock::rfc3339,
    pki::{load_certs, load_key},
};
use kopir_proto::v1::{
    Consent, GrantRequest, IssueTokenRequest, ListRequest, RevokeRequest,
    consent_service_client::ConsentServiceClient,
};

/// Consent commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run a consent authority.
    Serve {
        /// Its configuration file (TOML; see docs/consent.md).
        #[arg(long, short, env = "KOPIR_CONSENT_CONFIG")]
        config: PathBuf,
    },
    /// As the portal: record a subject's consent; prints it.
    Grant(GrantArgs),
    /// As the portal: list a subject's consents.
    List {
        /// The authority and the caller's certificate.
        #[command(flatten)]
        to: Connect,
        /// The subject, e.g. `iin:900101300126`.
        #[arg(long)]
        subject: String,
    },
    /// As the portal: revoke a subject's consent.
    Revoke {
        /// The authority and the caller's certificate.
        #[command(flatten)]
        to: Connect,
        /// The subject.
        #[arg(long)]
        subject: String,
        /// The consent id.
        #[arg(long)]
        id: String,
    },
    /// As a consumer: obtain a consent token; prints it alone on stdout.
    Token {
        /// The authority and the caller's certificate.
        #[command(flatten)]
        to: Connect,
        /// The consent id.
        #[arg(long)]
        id: String,
    },
}

/// Where the consent authority is and who calls it.
#[derive(Debug, clap::Args)]
pub struct Connect {
    /// `host:port` of the consent authority.
    #[arg(long, env = "KOPIR_CONSENT_AUTHORITY")]
    pub authority: String,
    /// CA certificate that issued the authority's TLS certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// The caller's TLS client certificate (the portal's, a security server's
    /// or an information system's).
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    pub key: PathBuf,
}

/// Arguments of `kopir consent grant`.
#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// The authority and the caller's certificate.
    #[command(flatten)]
    to: Connect,
    /// The subject, e.g. `iin:900101300126`.
    #[arg(long)]
    subject: String,
    /// The consumer subsystem, e.g. `KZ/GOV/MLSPP/benefits`.
    #[arg(long)]
    client: String,
    /// The provider subsystem, e.g. `KZ/GOV/MOJ/population`.
    #[arg(long)]
    service: String,
    /// A method covered: `/pkg.Service/Method` or `pkg.Service/*` (repeatable).
    #[arg(long = "method", required = true)]
    methods: Vec<String>,
    /// The purpose code (one whose basis is consent).
    #[arg(long)]
    purpose: String,
    /// How long the consent lasts from now (or from --not-before), e.g. `30d`.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// Start of validity, RFC 3339 (default: now).
    #[arg(long)]
    not_before: Option<String>,
    /// The most uses allowed (default: unlimited).
    #[arg(long)]
    max_uses: Option<u32>,
}

impl Connect {
    async fn client(&self) -> anyhow::Result<ConsentServiceClient<Channel>> {
        let roots = load_certs(&self.ca)?;
        let identity = (load_certs(&self.cert)?, load_key(&self.key)?);
        let channel = ca_channel(
            &self.authority,
            &roots,
            Some(identity),
            Duration::from_secs(5),
        )?;
        Ok(ConsentServiceClient::new(channel))
    }
}

fn print(c: &Consent) {
    let state = if c.revoked_at_ms != 0 {
        "revoked"
    } else {
        "active"
    };
    let uses = match c.max_uses {
        0 => "unlimited uses".to_string(),
        n => format!("at most {n} uses"),
    };
    println!(
        "{}  {state}  {} -> {} {} for {}  {} .. {}  {uses}  {}",
        c.id,
        c.client,
        c.service,
        c.methods.join(","),
        c.purpose,
        rfc3339(c.not_before),
        rfc3339(c.not_after),
        c.subject
    );
}

impl Command {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Serve { config } => serve(config).await,
            Command::Grant(args) => grant(args).await,
            Command::List { to, subject } => {
                let consents = to
                    .client()
                    .await?
                    .list(ListRequest { subject })
                    .await
                    .map_err(super::refused)?
                    .into_inner()
                    .consents;
                consents.iter().for_each(print);
                Ok(())
            }
            Command::Revoke { to, subject, id } => {
                let consent = to
                    .client()
                    .await?
                    .revoke(RevokeRequest {
                        subject,
                        consent_id: id,
                    })
                    .await
                    .map_err(super::refused)?
                    .into_inner()
                    .consent;
                consent.iter().for_each(print);
                Ok(())
            }
            Command::Token { to, id } => {
                let answer = to
                    .client()
                    .await?
                    .issue_token(IssueTokenRequest { consent_id: id })
                    .await
                    .map_err(super::refused)?
                    .into_inner();
                println!("{}", answer.token);
                eprintln!("expires {}", rfc3339(answer.expires_at));
                Ok(())
            }
        }
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let stop = super::stop_signal();
    let config = ConsentConfig::load(&path)?;
    let store = server::open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let running = server::start(config, listener, store).await?;
    println!("consent authority on {}", running.addr);
    stop.await;
    tracing::info!("stopping");
    running.shutdown().await;
    Ok(())
}

async fn grant(a: GrantArgs) -> anyhow::Result<()> {
    let not_before = match &a.not_before {
        Some(t) => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)?
            .unix_timestamp(),
        None => time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let valid_for = i64::try_from(a.valid_for.as_secs())?;
    let consent =
        a.to.client()
            .await?
            .grant(GrantRequest {
                subject: a.subject,
                client: a.client,
                service: a.service,
                methods: a.methods,
                purpose: a.purpose,
                not_before,
                not_after: not_before.saturating_add(valid_for),
                max_uses: a.max_uses.unwrap_or(0),
            })
            .await
            .map_err(super::refused)?
            .into_inner()
            .consent;
    consent.iter().for_each(print);
    Ok(())
}
