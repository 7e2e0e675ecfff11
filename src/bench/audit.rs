//! `kopir bench audit`: durable appends per second for the embedded store and
//! PostgreSQL (one fsync per record against group commit), the time of a
//! query by subject and of a full `verify` on a long log.
//!
//! Reproduce with `cargo build --release && target/release/kopir bench audit`
//! (`--json` for the machine-readable figures). Every append counted is
//! durable: the embedded store syncs its journal at each durable append
//! (SQLite takes the records behind it, itself with `synchronous=FULL`), PostgreSQL with
//! `fsync=on` and `synchronous_commit=on` (a throwaway cluster started with
//! [`kopir_pgtest::TempPostgres`]). The long log is built through the same
//! store `append` the writer uses, in batches of 10,000, so its chain is
//! valid; then a checkpoint is signed over it.

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use kopir_audit::{
    AuditHandle, AuditLog, AuditRecord, Side, Step, WriterOptions,
    pseudonym::PseudonymKey,
    record::Entry,
    store::{AuditStore, Commit, Query, postgres::PostgresStore, sqlite::SqliteStore},
    verify::{VerifyOptions, verify_store},
};
use kopir_core::pki::{dev::signing_pair, sign::SigningKey};
use kopir_pgtest::TempPostgres;

/// Default size of the log that query and verify are measured on.
pub const DEFAULT_RECORDS: u64 = 1_000_000;

/// Measure the audit log's throughput and query/verify times.
#[derive(Debug, Clone, Args)]
pub struct BenchAuditArgs {
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Records in the log that query and verify are measured on.
    #[arg(long, default_value_t = DEFAULT_RECORDS)]
    pub records: u64,
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Appends measured with group commit (per store).
    #[arg(long, default_value_t = 200_000)]
    pub group_appends: u64,
    /// Appends measured with one fsync per record (per store).
    #[arg(long, default_value_t = 5_000)]
    pub single_appends: u64,
    /// Skip PostgreSQL.
    #[arg(long)]
    pub no_postgres: bool,
    /// Folder for the embedded stores (default: a temporary folder; it must
    /// be on the disk being measured).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl Default for BenchAuditArgs {
    fn default() -> Self {
        Self {
            json: false,
            records: DEFAULT_RECORDS,
            concurrency: 256,
            group_appends: 200_000,
            single_appends: 5_000,
            no_postgres: false,
            dir: None,
        }
    }
}

/// Appends per second of one store.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Throughput {
    /// One transaction (one fsync) per record.
    pub fsync_per_record_per_s: f64,
    /// Concurrent appends batched into shared transactions.
    pub group_commit_per_s: f64,
}

/// The figures `kopir bench audit --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    /// The embedded SQLite store.
    pub embedded: Throughput,
    /// PostgreSQL (`null` with `--no-postgres`).
    pub postgres: Option<Throughput>,
    /// Median time of one query by subject (pseudonym computed, first page of
    /// 50, newest first) on the long log, milliseconds.
    pub query_by_subject_ms: f64,
    /// Time of a full verification of the long log (chain, Merkle root,
    /// checkpoint), seconds.
    pub verify_seconds: f64,
    /// Records in the long log.
    pub records: u64,
}

/// Record `i` of a benchmark log, at `at_ms` (the exchange path stamps
/// records with the current time, so times grow with the log).
fn bench_record(i: u64, subjects: u64, at_ms: i64) -> AuditRecord {
    // Each citizen appears every `subjects` records, all through the log.
    let citizen = i % subjects.max(1);
    let (side, step) = if i.is_multiple_of(2) {
        (Side::Consumer, Step::Forwarded)
    } else {
        (Side::Provider, Step::Answered)
    };
    AuditRecord {
        request_id: format!("bench-{:016x}", i.wrapping_mul(0x2545_F491_4F6C_DD1D)),
        at_ms,
        client: "KZ/GOV/MLSPP/benefits".into(),
        service: "KZ/GOV/MOJ/population".into(),
        method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
        purpose: "child-benefit".into(),
        subject: Some(format!("iin:{:012}", 900_000_000_000 + citizen)),
        basis: Some("legal:social-code-art-12".into()),
        user: Some("officer-17".into()),
        peer: Some("KZ/GOV/MOJ/ss1".into()),
        body_sha256: Some(kopir_core::pki::sha256(&i.to_be_bytes())),
        request_hash: Some(kopir_core::pki::sha256(&(!i).to_be_bytes())),
        signature: Some(vec![0x5a; 64]),
        ..AuditRecord::new(side, step)
    }
}

fn bench_signer() -> anyhow::Result<Arc<SigningKey>> {
    let (cert, key) = signing_pair("kopir bench")?;
    Ok(Arc::new(SigningKey::from_pkcs8(&key, &cert)?))
}

/// Appends `total` records from `concurrency` tasks through a writer with
/// `max_batch`; returns durable appends per second.
async fn appends_per_second(
    store: Arc<dyn AuditStore>,
    max_batch: usize,
    total: u64,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let handle = AuditHandle::start(
        store,
        PseudonymKey::random()?,
        bench_signer()?,
        "bench",
        WriterOptions {
            max_batch,
            queue: 8192,
            checkpoint_interval: None,
        },
    )
    .await?;
    let tasks = concurrency.max(1) as u64;
    let start = Instant::now();
    let mut joins = Vec::new();
    for t in 0..tasks {
        let h = handle.clone();
        let count = total / tasks + u64::from(t < total % tasks);
        joins.push(tokio::spawn(async move {
            for k in 0..count {
                h.append(bench_record(
                    t * 1_000_000_000 + k,
                    100_000,
                    kopir_core::clock::now_ms(),
                ))
                .await?;
            }
            Ok::<_, kopir_audit::AuditError>(())
        }));
    }
    for j in joins {
        j.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    handle.shutdown().await;
    Ok(total as f64 / secs.max(1e-9))
}

async fn throughput(
    open: impl AsyncFn() -> anyhow::Result<Arc<dyn AuditStore>>,
    args: &BenchAuditArgs,
    label: &str,
) -> anyhow::Result<Throughput> {
    let single =
        appends_per_second(open().await?, 1, args.single_appends, args.concurrency).await?;
    if !args.json {
        eprintln!("{label}: one fsync per record: {single:.0} appends/s");
    }
    let group =
        appends_per_second(open().await?, 1024, args.group_appends, args.concurrency).await?;
    if !args.json {
        eprintln!("{label}: group commit: {group:.0} appends/s");
    }
    Ok(Throughput {
        fsync_per_record_per_s: single.round(),
        group_commit_per_s: group.round(),
    })
}

/// Builds a log of `n` records with a valid chain, in batches.
async fn build_log(
    store: &Arc<dyn AuditStore>,
    n: u64,
    key: &PseudonymKey,
    quiet: bool,
) -> anyhow::Result<()> {
    const BATCH: u64 = 10_000;
    let subjects = (n / 10).max(1);
    let start = Instant::now();
    let mut next = 1u64;
    while next <= n {
        let end = (next + BATCH - 1).min(n);
        let key2 = key.clone();
        let entries = tokio::task::spawn_blocking(move || {
            (next..=end)
                .map(|i| {
                    let at = 1_750_000_000_000 + i as i64;
                    Entry::from_record(bench_record(i, subjects, at), "bench", &key2)
                })
                .collect::<Vec<_>>()
        })
        .await?;
        store.append(entries, Commit::Durable).await?;
        next = end + 1;
    }
    if !quiet {
        eprintln!(
            "built a log of {n} records in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

impl BenchAuditArgs {
    /// Runs the benchmark and prints the figures.
    pub async fn run(self) -> anyhow::Result<()> {
        let report = self.measure().await?;
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            let t = |t: &Throughput| {
                format!(
                    "one fsync per record {:>9.0}/s   group commit {:>9.0}/s",
                    t.fsync_per_record_per_s, t.group_commit_per_s
                )
            };
            println!(
                "durable appends ({} concurrent appenders)",
                self.concurrency
            );
            println!("  embedded (SQLite)   {}", t(&report.embedded));
            match &report.postgres {
                Some(p) => println!("  PostgreSQL          {}", t(p)),
                None => println!("  PostgreSQL          skipped"),
            }
            println!(
                "query by subject on {} records: {:.2} ms",
                report.records, report.query_by_subject_ms
            );
            println!(
                "verify of {} records: {:.2} s",
                report.records, report.verify_seconds
            );
        }
        Ok(())
    }

    /// Measures everything and returns the figures.
    pub async fn measure(&self) -> anyhow::Result<BenchReport> {
        let tmp = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                tempfile::tempdir_in(d)?
            }
            None => tempfile::tempdir()?,
        };
        let counter = std::sync::atomic::AtomicU32::new(0);
        let root = tmp.path().to_path_buf();
        let embedded = throughput(
            async || {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let store: Arc<dyn AuditStore> =
                    Arc::new(SqliteStore::open_in(&root.join(format!("tp{n}"))).await?);
                Ok(store)
            },
            self,
            "embedded",
        )
        .await?;

        let postgres = if self.no_postgres {
            None
        } else {
            let pg = tokio::task::spawn_blocking(TempPostgres::start)
                .await?
                .context("starting a throwaway PostgreSQL for the benchmark")?;
            let pg = Arc::new(pg);
            let t = throughput(
                async || {
                    let url = pg.create_database().await?;
                    let store: Arc<dyn AuditStore> = Arc::new(PostgresStore::connect(&url).await?);
                    Ok(store)
                },
                self,
                "postgres",
            )
            .await?;
            let pg = Arc::try_unwrap(pg).ok();
            tokio::task::spawn_blocking(move || drop(pg)).await?;
            Some(t)
        };

        // The long log.
        let key = PseudonymKey::random()?;
        let dir = tmp.path().join("long");
        let store: Arc<dyn AuditStore> = Arc::new(SqliteStore::open_in(&dir).await?);
        build_log(&store, self.records, &key, self.json).await?;
        let handle = AuditHandle::start(
            store.clone(),
            key.clone(),
            bench_signer()?,
            "bench",
            WriterOptions {
                checkpoint_interval: None,
                ..WriterOptions::default()
            },
        )
        .await?;
        handle.checkpoint().await?;
        handle.shutdown().await;

        let subjects = (self.records / 10).max(1);
        let mut times = Vec::new();
        for k in 0..21u64 {
            let citizen = k.wrapping_mul(7919) % subjects;
            let start = Instant::now();
            let subject = key.pseudonym(&format!("iin:{:012}", 900_000_000_000 + citizen));
            let page = store
                .query(Query {
                    subject: Some(subject),
                    limit: 50,
                    ..Query::default()
                })
                .await?;
            times.push(start.elapsed());
            if page.records.is_empty() && self.records >= subjects * 2 {
                anyhow::bail!("query by subject found nothing for citizen {citizen}");
            }
        }
        times.sort();
        let query_ms = times[times.len() / 2].as_secs_f64() * 1000.0;

        let start = Instant::now();
        let report = verify_store(store.clone(), &VerifyOptions::default(), &mut |_, _| {}).await?;
        let verify_seconds = start.elapsed().as_secs_f64();
        if !report.ok() || report.records != self.records {
            anyhow::bail!("the benchmark log does not verify: {report:?}");
        }
        Ok(BenchReport {
            embedded,
            postgres,
            query_by_subject_ms: (query_ms * 100.0).round() / 100.0,
            verify_seconds: (verify_seconds * 100.0).round() / 100.0,
            records: self.records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run of the whole benchmark (embedded only), to keep it working.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_benchmark_runs() {
        let report = BenchAuditArgs {
            json: true,
            records: 2_000,
            concurrency: 16,
            group_appends: 400,
            single_appends: 40,
            no_postgres: true,
            dir: None,
        }
        .measure()
        .await
        .unwrap();
        assert_eq!(report.records, 2_000);
        assert!(report.embedded.group_commit_per_s > 0.0);
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "embedded",
            "postgres",
            "query_by_subject_ms",
            "verify_seconds",
            "records",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["embedded"].get("fsync_per_record_per_s").is_some());
    }

    /// The full benchmark; run with
    /// `cargo test --release --lib audit::bench -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "takes a minute; the benchmark proper"]
    async fn full_benchmark() {
        let report = BenchAuditArgs::default().measure().await.unwrap();
        println!("{}", serde_json::to_string(&report).unwrap());
    }
}
