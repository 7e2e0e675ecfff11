//! `kopir audit subject`: a subject's access report.
//!
//! - From one server's own log (`--config server.toml`, or the store flags of
//!   the other `kopir audit` commands): for its operator or an auditor on its
//!   host; every read is shown, covert ones marked while still hidden.
//! - For the whole federation (`--federation --globalconf FILE --anchor CERT
//!   --cert CERT --key KEY`): as a portal or auditor, from every server that
//!   provides personal data, over mutual TLS pinned to the global
//!   configuration. A portal adds `--assertion-cert/--assertion-key`, its
//!   assertion-signing pair: a fresh assertion naming the subject is signed
//!   for the request.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::cli::audit::{StoreArgs, parse_time_ms};
use kopir_core::{
    clock::{now_ms, rfc3339_ms},
    globalconf::watch,
    id::Subject,
    pki::{
        Fingerprint, load_certs, load_key,
        sign::{SigningKey, VerifyingKey},
    },
};
use kopir_proto::v1::ReportRequest;
use kopir_server::report::{
    ReportEntry, Visibility, assemble,
    assertion::Claims,
    collect::{self, Options},
};

/// How long an assertion signed by this command lives, seconds.
const ASSERTION_SECS: i64 = 60;

/// `kopir audit subject`.
#[derive(Debug, Args)]
pub struct SubjectArgs {
    /// The subject, e.g. `iin:900101300126`.
    pub subject: String,
    /// Where one server's log is (without --federation).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Ask every security server that provides personal data instead of
    /// reading one server's log.
    #[arg(long)]
    pub federation: bool,
    /// The signed global configuration (with --federation).
    #[arg(long, value_name = "FILE")]
    pub globalconf: Option<PathBuf>,
    /// The governance authority's certificate(s) it must be signed by.
    #[arg(long, value_name = "CERT")]
    pub anchor: Vec<PathBuf>,
    /// The portal's or auditor's TLS client certificate (with --federation).
    #[arg(long, value_name = "CERT")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, value_name = "KEY")]
    pub key: Option<PathBuf>,
    /// A portal's assertion-signing certificate.
    #[arg(long, value_name = "CERT", requires = "assertion_key")]
    pub assertion_cert: Option<PathBuf>,
    /// A portal's assertion-signing key.
    #[arg(long, value_name = "KEY", requires = "assertion_cert")]
    pub assertion_key: Option<PathBuf>,
    /// Also list the attempts the providers refused.
    #[arg(long)]
    pub include_refused: bool,
    /// From this time (RFC 3339 or ms since the epoch), inclusive.
    #[arg(long, value_parser = parse_time_ms)]
    pub from: Option<i64>,
    /// Up to this time (RFC 3339 or ms since the epoch), exclusive.
    #[arg(long, value_parser = parse_time_ms)]
    pub to: Option<i64>,
    /// Seconds to wait for each server (with --federation).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A report as printed.
#[derive(Debug, Serialize)]
struct Printed<'a> {
    subject: &'a str,
    as_of_ms: i64,
    entries: &'a [ReportEntry],
    #[serde(skip_serializing_if = "Option::is_none")]
    sources: Option<&'a [assemble::Source]>,
    truncated: bool,
}

impl SubjectArgs {
    /// Prints the report; fails if a server could not give its part.
    pub async fn run(self) -> anyhow::Result<()> {
        let subject: Subject = self
            .subject
            .parse()
            .with_context(|| format!("subject {:?}", self.subject))?;
        if self.federation {
            self.federation_report(&subject).await
        } else {
            self.local_report(&subject).await
        }
    }

    async fn local_report(&self, subject: &Subject) -> anyhow::Result<()> {
        let pseudonym = self.store.pseudonyms()?.pseudonym(&subject.to_string());
        let store = self.store.open().await?;
        let view = self.store.globalconf()?;
        let server = match &self.store.config {
            Some(path) => kopir_server::config::ServerConfig::load(path)?
                .server_id
                .to_string(),
            None => "local".into(),
        };
        let now = now_ms();
        let collected = collect::collect(
            store.as_ref(),
            pseudonym,
            &server,
            view.as_deref(),
            &Options {
                include_refused: self.include_refused,
                from_ms: self.from,
                to_ms: self.to,
                visibility: Visibility::Full,
                now_ms: now,
            },
        )
        .await?;
        self.print(&Printed {
            subject: &self.subject,
            as_of_ms: now,
            entries: &collected.entries,
            sources: None,
            truncated: collected.truncated,
        })?;
        if collected.truncated {
            bail!("the report is truncated: narrow it with --from and --to");
        }
        Ok(())
    }

    async fn federation_report(&self, subject: &Subject) -> anyhow::Result<()> {
        let (Some(globalconf), Some(cert), Some(key)) = (&self.globalconf, &self.cert, &self.key)
        else {
            bail!("--federation needs --globalconf, --anchor, --cert and --key");
        };
        if self.anchor.is_empty() {
            bail!("--federation needs --anchor: the authority's certificate");
        }
        let anchors = self
            .anchor
            .iter()
            .map(|p| VerifyingKey::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        let view = watch::read(globalconf, &anchors)
            .with_context(|| format!("global configuration {}", globalconf.display()))?;
        let chain = load_certs(cert)?;
        let tls = Fingerprint::of(chain[0].as_ref());
        let identity = (chain, load_key(key)?);
        let assertion = match (&self.assertion_cert, &self.assertion_key) {
            (Some(c), Some(k)) => {
                let reader = view.report_reader(&tls).with_context(|| {
                    format!(
                        "{} is not a report reader's certificate in the global configuration",
                        cert.display()
                    )
                })?;
                let signer = SigningKey::load(c, k)?;
                Claims::new(&reader.name, subject, now_ms() / 1000, ASSERTION_SECS).sign(&signer)
            }
            _ => String::new(),
        };
        let request = ReportRequest {
            subject: subject.to_string(),
            assertion,
            include_refused: self.include_refused,
            from_ms: self.from.unwrap_or(0),
            to_ms: self.to.unwrap_or(0),
        };
        let report = assemble::assemble(
            &view,
            identity,
            &request,
            Duration::from_secs(self.timeout_secs.max(1)),
        )
        .await;
        self.print(&Printed {
            subject: &self.subject,
            as_of_ms: report.as_of_ms,
            entries: &report.entries,
            sources: Some(&report.sources),
            truncated: report.sources.iter().any(|s| s.truncated),
        })?;
        if !report.complete() {
            let missing: Vec<String> = report
                .sources
                .iter()
                .filter_map(|s| {
                    s.error
                        .as_ref()
                        .map(|e| format!("{}: {e}", s.server))
                        .or_else(|| s.truncated.then(|| format!("{}: truncated", s.server)))
                })
                .collect();
            bail!("the report is incomplete:\n  {}", missing.join("\n  "));
        }
        Ok(())
    }

    fn print(&self, report: &Printed<'_>) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        } else {
            print_table(&mut out, report)?;
        }
        Ok(())
    }
}

fn print_table(out: &mut impl Write, r: &Printed<'_>) -> std::io::Result<()> {
    writeln!(
        out,
        "access report of {} as of {}: {} read(s)",
        r.subject,
        rfc3339_ms(r.as_of_ms),
        r.entries.len()
    )?;
    for e in r.entries {
        let who = if e.consumer_member_name.is_empty() {
            e.consumer_subsystem.clone()
        } else {
            format!("{} ({})", e.consumer_member_name, e.consumer_subsystem)
        };
        let what = if e.provider_member_name.is_empty() {
            e.provider_service.clone()
        } else {
            format!("{} ({})", e.provider_member_name, e.provider_service)
        };
        writeln!(out, "\n{}  {who}", rfc3339_ms(e.at_ms))?;
        writeln!(out, "  read       {what}  {}", e.method)?;
        writeln!(
            out,
            "  purpose    {}{}",
            e.purpose,
            if e.purpose_description.is_empty() {
                String::new()
            } else {
                format!(": {}", e.purpose_description)
            }
        )?;
        match (&e.legal_act, &e.consent_id) {
            (_, Some(c)) => writeln!(out, "  basis      your consent {c}")?,
            (Some(act), None) => writeln!(out, "  basis      {act}")?,
            (None, None) => {}
        }
        if let Some(u) = &e.user {
            writeln!(out, "  official   {u}")?;
        }
        write!(out, "  query      {}", e.query_id)?;
        if let Some(g) = &e.query_group {
            write!(out, "  (group {g})")?;
        }
        writeln!(out, "  via {}", e.server)?;
        let outcome = match (&e.reason, e.status) {
            (Some(reason), _) => format!("{} ({reason})", e.outcome.as_str()),
            (None, 0) => e.outcome.as_str().to_owned(),
            (None, status) => format!("{} with status {status}", e.outcome.as_str()),
        };
        writeln!(out, "  outcome    {outcome}")?;
        if let Some(until) = e.hidden_until_ms {
            writeln!(
                out,
                "  {:<11}until {}: {}",
                if e.hidden { "HIDDEN" } else { "was hidden" },
                rfc3339_ms(until),
                e.hidden_reason.as_deref().unwrap_or("-")
            )?;
        }
    }
    if let Some(sources) = r.sources {
        writeln!(out)?;
        for s in sources {
            match &s.error {
                None => writeln!(
                    out,
                    "from {} ({}): {} entr{}{}",
                    s.server,
                    s.address,
                    s.entries,
                    if s.entries == 1 { "y" } else { "ies" },
                    if s.truncated { ", TRUNCATED" } else { "" }
                )?,
                Some(e) => writeln!(out, "from {} ({}): FAILED {e}", s.server, s.address)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cli::audit::AuditCommand;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: AuditCommand,
    }

    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from([
            "audit",
            "subject",
            "iin:900101300126",
            "--federation",
            "--globalconf",
            "gc.json",
            "--anchor",
            "a.crt",
            "--cert",
            "p.crt",
            "--key",
            "p.key",
            "--assertion-cert",
            "s.crt",
            "--assertion-key",
            "s.key",
            "--json",
        ])
        .unwrap();
        match cli.command {
            AuditCommand::Subject(a) => {
                assert!(a.federation && a.json);
                assert_eq!(a.anchor.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        // An assertion key without its certificate is refused.
        assert!(
            Cli::try_parse_from(["audit", "subject", "iin:1", "--assertion-key", "k"]).is_err()
        );
    }
}
