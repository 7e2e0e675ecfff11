//! `kopir audit query|show|verify|export|subject`: the operator's and auditor's
//! tools (`subject` lives in [`crate::cli::report`]).
//!
//! They open the store directly (`--data-dir DIR` for the embedded store,
//! `--database postgres://...` for PostgreSQL), so they work with the server
//! stopped, and read-only beside a running one. `verify --archive FILE`
//! needs no store at all.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};

use kopir_audit::{
    AuditConfig, Side, Step,
    export::{Archive, export_range, verify_archive},
    inspect::{self, ShownRecord},
    pseudonym::PseudonymKey,
    record::StoredRecord,
    store::{self, AuditStore, Query},
    verify::{VerifyOptions, VerifyReport, check_checkpoints, verify_store},
};
use kopir_core::{
    clock::rfc3339_ms,
    globalconf::ConfView,
    pki::{Fingerprint, cert_fingerprint},
};
use kopir_server::config::ServerConfig;

/// Default page size of `kopir audit query`.
pub const DEFAULT_PAGE: usize = 50;

/// Inspect and verify a security server's audit log.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// The `kopir audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List records matching filters, newest first, one page at a time.
    Query(QueryArgs),
    /// Every record of one exchange, with its hash and signed checkpoint checked.
    Show(ShowArgs),
    /// Walk the chain and checkpoints (or check an archive) and name the first bad record.
    Verify(VerifyArgs),
    /// Write a self-contained signed archive of a range, verifiable offline.
    Export(ExportArgs),
    /// A subject's access report: every read of their data, from this log or the whole federation.
    Subject(Box<crate::cli::report::SubjectArgs>),
}

impl AuditArgs {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            AuditCommand::Query(a) => a.run().await,
            AuditCommand::Show(a) => a.run().await,
            AuditCommand::Verify(a) => a.run().await,
            AuditCommand::Export(a) => a.run().await,
            AuditCommand::Subject(a) => a.run().await,
        }
    }
}

/// Where the log is: the server's configuration file, or the store named
/// directly (the flags override what the file says).
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// The server's configuration file: its data directory, `[audit]` section
    /// and global configuration (to check exchange signatures).
    #[arg(long, short, value_name = "FILE", env = "KOPIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's data directory (the embedded store is DIR/audit.db);
    /// default `data`.
    #[arg(long, value_name = "DIR", env = "KOPIR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL URL, instead of the embedded store.
    #[arg(long, value_name = "URL", env = "KOPIR_AUDIT_DATABASE")]
    pub database: Option<String>,
    /// The pseudonym key file (default DIR/pseudonym.key); needed for --subject.
    #[arg(long, value_name = "FILE")]
    pub pseudonym_key: Option<PathBuf>,
}

impl StoreArgs {
    /// The store `dir` names (the embedded store under it).
    #[cfg(test)]
    fn embedded(dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: Some(dir.into()),
            ..Self::default()
        }
    }

    fn server_config(&self) -> anyhow::Result<Option<ServerConfig>> {
        self.config
            .as_deref()
            .map(ServerConfig::load)
            .transpose()
            .map_err(Into::into)
    }

    /// The audit configuration in force: the file's, then the flags.
    pub fn resolve(&self) -> anyhow::Result<AuditConfig> {
        let mut audit = match self.server_config()? {
            Some(c) => c.audit_config(),
            None => AuditConfig::embedded("data"),
        };
        if let Some(dir) = &self.data_dir {
            audit.data_dir = dir.clone();
        }
        if let Some(url) = &self.database {
            audit.database = Some(url.clone());
        }
        if let Some(key) = &self.pseudonym_key {
            audit.pseudonym_key = Some(key.clone());
        }
        Ok(audit)
    }

    /// Opens the existing store.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn AuditStore>> {
        Ok(store::open_existing(&self.resolve()?.location()).await?)
    }

    /// Loads the pseudonym key (never creates one: a new key would match nothing).
    pub fn pseudonyms(&self) -> anyhow::Result<PseudonymKey> {
        let path = self.resolve()?.pseudonym_key_path();
        PseudonymKey::load(&path).with_context(
            || "querying by subject needs the server's pseudonym key (--pseudonym-key FILE)",
        )
    }

    /// The server's current global configuration, when `--config` names the
    /// server (it lists the keys that exchange signatures are checked with).
    pub fn globalconf(&self) -> anyhow::Result<Option<Arc<ConfView>>> {
        let Some(config) = self.server_config()? else {
            return Ok(None);
        };
        let view = config
            .globalconf
            .read_now(&config.data_dir)
            .context("the server's global configuration")?;
        Ok(Some(view))
    }
}

/// Parses a time: RFC 3339 (`2026-11-23T10:00:00Z`) or milliseconds since the epoch.
pub fn parse_time_ms(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow!("{text:?} is neither RFC 3339 nor milliseconds: {e}"))?;
    Ok(i64::try_from(t.unix_timestamp_nanos() / 1_000_000)?)
}

fn parse_step(text: &str) -> Result<Step, String> {
    Step::parse(text).ok_or_else(|| {
        let names: Vec<_> = Step::ALL.iter().map(|s| s.as_str()).collect();
        format!("one of {}", names.join(", "))
    })
}

fn parse_side(text: &str) -> Result<Side, String> {
    Side::parse(text).ok_or_else(|| "consumer or provider".into())
}

fn expected_signer(cert: Option<&Path>) -> anyhow::Result<Option<Fingerprint>> {
    Ok(cert.map(cert_fingerprint).transpose()?)
}

/// `kopir audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Exchange correlation id.
    #[arg(long)]
    request_id: Option<String>,
    /// Consumer subsystem id.
    #[arg(long)]
    client: Option<String>,
    /// Provider subsystem id.
    #[arg(long)]
    service: Option<String>,
    /// gRPC method path.
    #[arg(long)]
    method: Option<String>,
    /// Data subject (`iin:...`); looked up by its pseudonym.
    #[arg(long)]
    subject: Option<String>,
    /// Purpose code.
    #[arg(long)]
    purpose: Option<String>,
    /// Step (outcome): accepted, refused, forwarded, answered, failed.
    #[arg(long, value_parser = parse_step)]
    step: Option<Step>,
    /// Side: consumer or provider.
    #[arg(long, value_parser = parse_side)]
    side: Option<Side>,
    /// gRPC status code.
    #[arg(long)]
    status: Option<i32>,
    /// `kopir-error` reason (`access.denied`...).
    #[arg(long)]
    reason: Option<String>,
    /// Server node.
    #[arg(long)]
    node: Option<String>,
    /// From this time (RFC 3339 or ms since the epoch), inclusive.
    #[arg(long, value_parser = parse_time_ms)]
    from: Option<i64>,
    /// Up to this time (RFC 3339 or ms since the epoch), exclusive.
    #[arg(long, value_parser = parse_time_ms)]
    to: Option<i64>,
    /// Records per page (at most 1000).
    #[arg(long, default_value_t = DEFAULT_PAGE)]
    limit: usize,
    /// Continue after a previous page (the token it printed).
    #[arg(long)]
    page_token: Option<u64>,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

impl QueryArgs {
    /// Runs the query and prints one page.
    pub async fn run(self) -> anyhow::Result<()> {
        let subject = match &self.subject {
            Some(s) => Some(self.store.pseudonyms()?.pseudonym(s)),
            None => None,
        };
        let store = self.store.open().await?;
        let page = store
            .query(Query {
                request_id: self.request_id,
                client: self.client,
                service: self.service,
                method: self.method,
                subject,
                purpose: self.purpose,
                step: self.step,
                side: self.side,
                status: self.status,
                reason: self.reason,
                node: self.node,
                from_ms: self.from,
                to_ms: self.to,
                before_seq: self.page_token,
                limit: self.limit.max(1),
            })
            .await?;
        let mut out = std::io::stdout().lock();
        if self.json {
            for r in &page.records {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        } else {
            print_table(&mut out, &page.records)?;
        }
        if let Some(next) = page.next {
            eprintln!("more: --page-token {next}");
        }
        Ok(())
    }
}

fn short(h: Option<&[u8]>) -> String {
    h.map(|h| hex::encode(&h[..h.len().min(6)]))
        .unwrap_or_else(|| "-".into())
}

/// The query group and hiding of a record, in words.
fn report_fields(e: &kopir_audit::record::Entry) -> String {
    let mut parts = Vec::new();
    if let Some(g) = &e.query_group {
        parts.push(format!("query group {g}"));
    }
    if let Some(until) = e.hidden_until_ms {
        parts.push(format!(
            "hidden from the subject until {}",
            rfc3339_ms(until)
        ));
    }
    if let Some(why) = &e.hidden_reason {
        parts.push(format!("reason: {why}"));
    }
    parts.join("; ")
}

fn print_table(out: &mut impl Write, records: &[StoredRecord]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<24}  {:<8}  {:<9}  {:>3}  {:<20}  {:<26}  {:<26}  {:<12}  {:<12}  METHOD",
        "SEQ", "TIME", "SIDE", "STEP", "ST", "REQUEST", "CLIENT", "SERVICE", "PURPOSE", "SUBJECT"
    )?;
    for r in records {
        let e = &r.entry;
        writeln!(
            out,
            "{:>8}  {:<24}  {:<8}  {:<9}  {:>3}  {:<20}  {:<26}  {:<26}  {:<12}  {:<12}  {}{}",
            r.seq,
            rfc3339_ms(e.at_ms),
            e.side.as_str(),
            e.step.as_str(),
            e.status,
            e.request_id,
            e.client,
            e.service,
            e.purpose,
            short(e.subject.as_ref().map(|h| &h[..])),
            e.method,
            e.reason
                .as_deref()
                .map(|r| format!("  [{r}]"))
                .unwrap_or_default(),
        )?;
        if e.has_report_fields() {
            writeln!(out, "{:>8}  {}", "", report_fields(e))?;
        }
    }
    Ok(())
}

/// `kopir audit show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The exchange's request id.
    request_id: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Only trust checkpoints signed by this certificate (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

impl ShowArgs {
    /// Prints every record of the exchange.
    pub async fn run(self) -> anyhow::Result<()> {
        let expected = expected_signer(self.cert.as_deref())?;
        let store = self.store.open().await?;
        let view = self.store.globalconf()?;
        let shown =
            inspect::show(&store, &self.request_id, expected.as_ref(), view.as_deref()).await?;
        if shown.is_empty() {
            bail!("no records of request {}", self.request_id);
        }
        let mut out = std::io::stdout().lock();
        for s in &shown {
            if self.json {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            } else {
                print_shown(&mut out, s)?;
            }
        }
        if shown.iter().any(|s| !s.hash_ok) {
            bail!("some records do not match their hash: run `kopir audit verify`");
        }
        if let Some(bad) = shown.iter().find(|s| !s.signature.is_acceptable()) {
            bail!(
                "record {} keeps an exchange signature that does not verify: {}",
                bad.record.seq,
                bad.signature
            );
        }
        Ok(())
    }
}

fn print_shown(out: &mut impl Write, s: &ShownRecord) -> std::io::Result<()> {
    let r = &s.record;
    let e = &r.entry;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let hx = |v: Option<&[u8]>| v.map(hex::encode).unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "record {}  ({} side, node {})",
        r.seq,
        e.side.as_str(),
        e.node
    )?;
    writeln!(out, "  time        {}", rfc3339_ms(e.at_ms))?;
    writeln!(
        out,
        "  step        {}  status {}  reason {}",
        e.step.as_str(),
        e.status,
        opt(&e.reason)
    )?;
    if let Some(m) = &e.message {
        writeln!(out, "  message     {m}")?;
    }
    writeln!(out, "  client      {}", e.client)?;
    writeln!(out, "  service     {}  {}", e.service, e.method)?;
    writeln!(out, "  purpose     {}  basis {}", e.purpose, opt(&e.basis))?;
    writeln!(
        out,
        "  subject     {}",
        hx(e.subject.as_ref().map(|h| &h[..]))
    )?;
    writeln!(out, "  user        {}  peer {}", opt(&e.user), opt(&e.peer))?;
    if e.has_report_fields() {
        writeln!(out, "  report      {}", report_fields(e))?;
    }
    writeln!(
        out,
        "  body        {}",
        hx(e.body_sha256.as_ref().map(|h| &h[..]))
    )?;
    writeln!(
        out,
        "  request     {}",
        hx(e.request_hash.as_ref().map(|h| &h[..]))
    )?;
    writeln!(
        out,
        "  signature   {} over {} by key {}",
        hx(e.signature.as_deref()),
        hx(e.signed_hash.as_ref().map(|h| &h[..])),
        hx(e.signer_key.as_ref().map(|h| &h[..]))
    )?;
    writeln!(out, "              {}", s.signature)?;
    if let Some(body) = &e.body {
        writeln!(out, "  stored body {} bytes", body.len())?;
    }
    writeln!(
        out,
        "  hash        {} {}",
        hex::encode(r.hash),
        if s.hash_ok {
            "(recomputed: ok)"
        } else {
            "(recomputed: MISMATCH)"
        }
    )?;
    match s.checkpoint {
        Some(cp) => writeln!(
            out,
            "  checkpoint  included in the signed checkpoint of {cp} records (signature and proof ok)"
        )?,
        None => writeln!(
            out,
            "  checkpoint  not yet covered by a valid signed checkpoint"
        )?,
    }
    Ok(())
}

/// `kopir audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Check an exported archive instead of a store (offline).
    #[arg(long, value_name = "FILE")]
    archive: Option<PathBuf>,
    /// Only trust checkpoints signed by this certificate (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl VerifyArgs {
    /// Verifies and prints the report; fails if anything is wrong.
    pub async fn run(self) -> anyhow::Result<()> {
        let expected = expected_signer(self.cert.as_deref())?;
        let report = match &self.archive {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                verify_archive(&Archive::from_json(&bytes)?, expected.as_ref())
            }
            None => {
                let store = self.store.open().await?;
                let bar = indicatif::ProgressBar::with_draw_target(
                    Some(0),
                    indicatif::ProgressDrawTarget::stderr(),
                );
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{spinner} verifying [{bar:40}] {pos}/{len} records ({per_sec}, {eta} left)",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                let progress_bar = bar.clone();
                let mut progress = move |done: u64, total: u64| {
                    progress_bar.set_length(total);
                    progress_bar.set_position(done);
                };
                let report = verify_store(
                    store,
                    &VerifyOptions {
                        expected_signer: expected,
                    },
                    &mut progress,
                )
                .await?;
                bar.finish_and_clear();
                report
            }
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
        match report.first_bad {
            Some(seq) => bail!("verification failed: the first bad record is {seq}"),
            None if !report.ok() => bail!("verification failed"),
            None => Ok(()),
        }
    }
}

fn print_report(r: &VerifyReport) {
    if r.ok() {
        println!("ok: {} records, chain intact", r.records);
    } else {
        println!("FAILED after {} good records", r.records);
    }
    match r.last_checkpoint {
        Some(cp) => println!(
            "checkpoints: {} valid, the last covers {cp} records; {} record(s) after it are covered by the chain only",
            r.checkpoints, r.unsigned_tail
        ),
        None => println!(
            "checkpoints: none valid; all {} record(s) are covered by the chain only",
            r.head_seq
        ),
    }
    for s in &r.signers {
        println!("signed by key {s}");
    }
    if let Some(h) = r.head_hash {
        println!("head: {} at record {}", hex::encode(h), r.head_seq);
    }
    if let Some(seq) = r.first_bad {
        println!("first bad record: {seq}");
    }
    for p in &r.problems {
        println!("  {} at {}: {}", p.kind.as_str(), p.seq, p.detail);
    }
}

/// `kopir audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// First record: a sequence number, or a time (RFC 3339).
    #[arg(long)]
    from: String,
    /// Last record: a sequence number (inclusive), or a time (RFC 3339, exclusive).
    #[arg(long)]
    to: String,
    /// Where to write the archive (`-` for standard output).
    file: PathBuf,
}

fn is_seq(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

impl ExportArgs {
    /// Writes the archive.
    pub async fn run(self) -> anyhow::Result<()> {
        let store = self.store.open().await?;
        let (from, mut to) = if is_seq(&self.from) && is_seq(&self.to) {
            (self.from.parse::<u64>()?, self.to.parse::<u64>()?)
        } else {
            let (a, b) = (parse_time_ms(&self.from)?, parse_time_ms(&self.to)?);
            store
                .seq_range(a, b)
                .await?
                .ok_or_else(|| anyhow!("no records between {} and {}", self.from, self.to))?
        };
        let (trusted, _, _) = check_checkpoints(store.checkpoints().await?, None);
        let last = trusted.last().map(|c| c.seq).unwrap_or(0);
        if to > last {
            if from > last {
                bail!(
                    "no signed checkpoint covers record {from} yet (the last covers {last}); \
                     ask the server for one (AuditService.Checkpoint) or wait for the next"
                );
            }
            eprintln!("note: records after {last} are not signed yet; exporting {from}..={last}");
            to = last;
        }
        let archive = export_range(&store, from, to).await?;
        let bytes = archive.to_json()?;
        if self.file.as_os_str() == "-" {
            std::io::stdout().lock().write_all(&bytes)?;
        } else {
            std::fs::write(&self.file, &bytes)
                .with_context(|| format!("cannot write {}", self.file.display()))?;
            eprintln!(
                "wrote records {from}..={to} with the checkpoint of {} records to {}",
                archive.checkpoint.seq,
                self.file.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use kopir_audit::store::Location;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: AuditCommand,
    }

    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from([
            "audit",
            "query",
            "--data-dir",
            "/tmp/x",
            "--step",
            "refused",
            "--from",
            "2026-01-01T00:00:00Z",
            "--limit",
            "10",
            "--json",
        ])
        .unwrap();
        match cli.command {
            AuditCommand::Query(q) => {
                assert_eq!(q.step, Some(Step::Refused));
                assert_eq!(q.from, Some(1_767_225_600_000));
                assert!(q.json);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["audit", "query", "--step", "maybe"]).is_err());
        assert!(
            Cli::try_parse_from(["audit", "export", "--from", "1", "--to", "9", "out.json"])
                .is_ok()
        );
        assert!(Cli::try_parse_from(["audit", "verify", "--archive", "a.json"]).is_ok());
        assert!(Cli::try_parse_from(["audit", "show", "req-1", "--json"]).is_ok());
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_time_ms("1000").unwrap(), 1000);
        let ms = parse_time_ms("2026-11-23T10:00:00.250Z").unwrap();
        assert_eq!(rfc3339_ms(ms), "2026-11-23T10:00:00.25Z");
        assert!(parse_time_ms("yesterday").is_err());
    }

    #[tokio::test]
    async fn export_then_verify_the_archive_from_the_command_line() {
        use kopir_audit::{AuditHandle, AuditLog, WriterOptions, pseudonym::PseudonymKey};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = kopir_core::pki::dev::signing_pair("cli test").unwrap();
        let signer = Arc::new(kopir_core::pki::sign::SigningKey::from_pkcs8(&key, &cert).unwrap());
        let store = store::open(&Location::Embedded(dir.path().to_path_buf()))
            .await
            .unwrap();
        let keyfile = dir.path().join("pseudonym.key");
        let handle = AuditHandle::start(
            store,
            PseudonymKey::load_or_create(&keyfile).unwrap(),
            signer,
            "n1",
            WriterOptions::default(),
        )
        .await
        .unwrap();
        for i in 0..12 {
            handle
                .append(kopir_audit::AuditRecord {
                    request_id: format!("r{i}"),
                    at_ms: 1_000 + i,
                    client: "KZ/GOV/A/app".into(),
                    service: "KZ/GOV/B/reg".into(),
                    method: "/x.Y/Z".into(),
                    purpose: "p".into(),
                    subject: Some("iin:900101300123".into()),
                    ..kopir_audit::AuditRecord::new(Side::Consumer, Step::Forwarded)
                })
                .await
                .unwrap();
        }
        handle.shutdown().await;
        let store_args = StoreArgs::embedded(dir.path());
        let out = dir.path().join("archive.json");
        ExportArgs {
            store: store_args.clone(),
            from: "3".into(),
            to: "8".into(),
            file: out.clone(),
        }
        .run()
        .await
        .unwrap();
        VerifyArgs {
            store: store_args.clone(),
            archive: Some(out),
            cert: None,
            json: true,
        }
        .run()
        .await
        .unwrap();
        VerifyArgs {
            store: store_args.clone(),
            archive: None,
            cert: None,
            json: false,
        }
        .run()
        .await
        .unwrap();
        ShowArgs {
            request_id: "r4".into(),
            store: store_args.clone(),
            cert: None,
            json: false,
        }
        .run()
        .await
        .unwrap();
        QueryArgs {
            store: store_args,
            request_id: None,
            client: None,
            service: None,
            method: None,
            subject: Some("iin:900101300123".into()),
            purpose: None,
            step: None,
            side: None,
            status: None,
            reason: None,
            node: None,
            from: None,
            to: None,
            limit: 5,
            page_token: None,
            json: false,
        }
        .run()
        .await
        .unwrap();
        // No store at all: a clear error, not an empty new one.
        let missing = StoreArgs::embedded(dir.path().join("nope"));
        assert!(missing.open().await.is_err());
        assert!(!dir.path().join("nope").exists());
    }
}
