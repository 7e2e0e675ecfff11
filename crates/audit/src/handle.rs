//! The server's audit log: [`AuditHandle`], its configuration and its single
//! writer task (group commit and checkpoints).
//!
//! Every [`AuditLog::append`] pseudonymises the subject in the caller's task,
//! then queues the entry on a bounded channel and waits for its own answer.
//! One writer task owns the store's write side: it takes whatever is queued
//! (up to `max_batch`), appends it in one transaction, and only after the
//! commit returns (one fsync for the whole batch) answers every waiter of the
//! batch. If the write fails, every waiter gets [`AuditError::Write`] and
//! nothing of the batch is acknowledged. The chain order is the commit order.
//! A batch of [`AuditLog::append_written`] records only is committed without
//! waiting for the disk ([`Commit::Written`]); any durable commit after it,
//! or the next checkpoint, covers it.
//!
//! The writer also keeps the Merkle [`Frontier`] of the log and signs a
//! [`Checkpoint`] every `checkpoint_interval`, on demand
//! ([`AuditHandle::checkpoint`]) and at shutdown. When several nodes share a
//! PostgreSQL store, the writer catches up with the other nodes' records
//! before it signs.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditError, AuditLog, AuditRecord,
    checkpoint::Checkpoint,
    merkle::Frontier,
    pseudonym::{self, PseudonymKey},
    record::{Entry, Hash, Link, StoredRecord},
    store::{self, AuditStore, Commit, Location, StoredCheckpoint},
};
use kopir_core::clock::now_ms;
use kopir_core::pki::sign::SigningKey;

/// Default interval between periodic checkpoints.
pub(crate) const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// Default largest number of records written in one transaction.
pub(crate) const DEFAULT_MAX_BATCH: usize = 1024;
/// Default capacity of the append queue.
pub(crate) const DEFAULT_QUEUE: usize = 8192;
/// A batch at least this large means concurrent appenders: gather a little.
const GATHER_THRESHOLD: usize = 8;
/// How many times the writer yields to gather a batch under load.
const GATHER_ROUNDS: u32 = 8;
/// How many record hashes the writer reads at once when it catches up.
const CATCH_UP_CHUNK: u64 = 100_000;

/// The `[audit]` section of a server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The server's data directory (its top-level `data_dir`, not part of the
    /// section): the embedded store is `<data_dir>/audit.db` and the default
    /// pseudonym key `<data_dir>/pseudonym.key`.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user@host/db`); when set, the log is kept
    /// there instead of the embedded store.
    pub database: Option<String>,
    /// The pseudonym key file (32 bytes, created if absent). Nodes that share
    /// a PostgreSQL store must be given the same file.
    pub pseudonym_key: Option<PathBuf>,
    /// How often the writer signs a checkpoint (`"60s"`, `"5m"`, `"500ms"`, or
    /// a number of seconds).
    #[serde(
        deserialize_with = "deserialize_duration",
        serialize_with = "serialize_duration"
    )]
    pub checkpoint_interval: Duration,
    /// This node's name, recorded in each of its records and checkpoints.
    pub node: String,
    /// The largest number of records written in one transaction (1 = one
    /// fsync per record).
    pub max_batch: usize,
    /// Keep message bodies in the log. Off by default: a record keeps only the
    /// body's SHA-256, so a copy of the store holds no registry data.
    pub store_bodies: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database: None,
            pseudonym_key: None,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            node: "node1".into(),
            max_batch: DEFAULT_MAX_BATCH,
            store_bodies: false,
        }
    }
}

impl AuditConfig {
    /// The embedded store under `data_dir`, defaults otherwise.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Where the store is.
    pub fn location(&self) -> Location {
        Location::new(&self.data_dir, self.database.as_deref())
    }

    /// The pseudonym key file in force.
    pub fn pseudonym_key_path(&self) -> PathBuf {
        self.pseudonym_key
            .clone()
            .unwrap_or_else(|| pseudonym::default_path(&self.data_dir))
    }
}

/// The units a duration may be written in, milliseconds to hours; humantime's
/// others (nanoseconds, microseconds, and days to years) are refused.
const DURATION_UNITS: [&str; 5] = ["ms", "s", "m", "min", "h"];

/// Parses a plain number of seconds (`"60"`), or a duration in humantime's
/// syntax with the units `ms`, `s`, `m` (or `min`) and `h`: `"90s"`,
/// `"250ms"`, `"5min"`, `"1h 30m"`. Other units, as in `"7 weeks"`, are
/// refused.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    // humantime wants a unit; a bare number is a number of seconds.
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    let units_known = text
        .split(|c: char| !c.is_alphabetic())
        .all(|unit| unit.is_empty() || DURATION_UNITS.contains(&unit));
    if !units_known {
        return None;
    }
    humantime::parse_duration(text).ok()
}

fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse_duration(&t).ok_or_else(|| {
            serde::de::Error::custom(format!("not a duration: {t:?} (try \"60s\" or \"5m\")"))
        }),
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if d.subsec_millis() == 0 {
        s.serialize_str(&format!("{}s", d.as_secs()))
    } else {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// How the writer task batches and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// The largest number of records in one transaction (1 = one fsync per record).
    pub max_batch: usize,
    /// Capacity of the append queue.
    pub queue: usize,
    /// Interval between periodic checkpoints (`None`: only on demand and at shutdown).
    pub checkpoint_interval: Option<Duration>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            queue: DEFAULT_QUEUE,
            checkpoint_interval: Some(DEFAULT_CHECKPOINT_INTERVAL),
        }
    }
}

type Waiter = oneshot::Sender<Result<(), AuditError>>;

enum Command {
    Append(Box<Entry>, Commit, Waiter),
    Checkpoint(oneshot::Sender<Result<Option<Checkpoint>, AuditError>>),
    Shutdown(oneshot::Sender<()>),
}

/// A running audit log: the [`AuditLog`] the exchange path appends to, and
/// the store, key and signer that queries, verification and export use.
pub struct AuditHandle {
    stats: Arc<WriterStats>,
    store: Arc<dyn AuditStore>,
    pseudonyms: PseudonymKey,
    node: String,
    tx: mpsc::Sender<Command>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("store", &self.store.describe())
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Opens the store named by `config` (creating the embedded one, its folder
/// and the pseudonym key if needed), starts the writer task and returns the
/// handle. Must be called within a Tokio runtime.
pub async fn open(
    config: &AuditConfig,
    signer: Arc<SigningKey>,
) -> Result<Arc<AuditHandle>, AuditError> {
    let store = store::open(&config.location()).await?;
    let pseudonyms = PseudonymKey::load_or_create(&config.pseudonym_key_path())?;
    let options = WriterOptions {
        max_batch: config.max_batch.max(1),
        queue: DEFAULT_QUEUE,
        checkpoint_interval: Some(config.checkpoint_interval).filter(|d| !d.is_zero()),
    };
    AuditHandle::start(store, pseudonyms, signer, &config.node, options).await
}

impl AuditHandle {
    /// Starts a writer over an opened store.
    pub async fn start(
        store: Arc<dyn AuditStore>,
        pseudonyms: PseudonymKey,
        signer: Arc<SigningKey>,
        node: &str,
        options: WriterOptions,
    ) -> Result<Arc<Self>, AuditError> {
        let stats = Arc::new(WriterStats::default());
        let seed = WriterSeed {
            stats: stats.clone(),
            store: store.clone(),
            signer,
            node: node.to_owned(),
            max_batch: options.max_batch.max(1),
        };
        let writer = seed.writer().await;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let task = tokio::spawn(supervise(seed, writer, rx, options.checkpoint_interval));
        Ok(Arc::new(Self {
            stats,
            store,
            pseudonyms,
            node: node.to_owned(),
            tx,
            writer: tokio::sync::Mutex::new(Some(task)),
        }))
    }

    /// The store (for queries, verification and export).
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// What the writer has done since it started.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The pseudonym key (to query by subject).
    pub fn pseudonyms(&self) -> &PseudonymKey {
        &self.pseudonyms
    }

    /// Every record, oldest first (reads the whole log: for tests and small
    /// logs).
    pub async fn records(&self) -> Result<Vec<StoredRecord>, AuditError> {
        let mut out = Vec::new();
        let mut next = 1u64;
        loop {
            let rows = self.store.scan(next, 10_000).await?;
            let Some(last) = rows.last() else {
                return Ok(out);
            };
            next = match last {
                Ok(r) => r.seq + 1,
                Err(m) => u64::try_from(m.seq).unwrap_or(0) + 1,
            };
            for row in rows {
                out.push(row.map_err(|m| {
                    AuditError::Read(format!("record {} is malformed: {}", m.seq, m.why))
                })?);
            }
        }
    }

    /// Every record, oldest first, read synchronously: the embedded store
    /// only (PostgreSQL answers [`AuditError::Invalid`]; use
    /// [`AuditHandle::records`]). Each record reads as its [`Entry`]
    /// (`r.request_id`, `r.step`...); the subject is its pseudonym.
    pub fn read_all(&self) -> Result<Vec<StoredRecord>, AuditError> {
        self.store.read_all_blocking()
    }

    /// Signs a checkpoint of everything durable now (also the other nodes'
    /// records in a shared store). `None` if the log is empty or nothing was
    /// added since the last checkpoint this writer signed.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Checkpoint(tx))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Writes what is queued, signs a final checkpoint and stops the writer.
    /// Later appends fail with [`AuditError::Closed`]. Idempotent.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(task) = self.writer.lock().await.take() {
            let _ = task.await;
        }
    }

    /// The latest checkpoint covering at least `seq` records, signing a fresh
    /// one first if none does yet.
    pub(crate) async fn checkpoint_covering(&self, seq: u64) -> Result<Checkpoint, AuditError> {
        if let Some(latest) = self.store.latest_checkpoint().await?
            && latest.checkpoint.seq >= seq
        {
            return Ok(latest.checkpoint);
        }
        self.checkpoint().await?;
        match self.store.latest_checkpoint().await? {
            Some(latest) if latest.checkpoint.seq >= seq => Ok(latest.checkpoint),
            _ => Err(AuditError::NotFound(format!(
                "record {seq} is not in the log"
            ))),
        }
    }
}

impl AuditHandle {
    async fn append_as(&self, record: AuditRecord, commit: Commit) -> Result<(), AuditError> {
        let entry = Entry::from_record(record, &self.node, &self.pseudonyms);
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Append(Box::new(entry), commit, tx))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| {
            AuditError::Write(
                "the audit writer failed before it confirmed the record (it is restarted)".into(),
            )
        })?
    }
}

impl AuditLog for AuditHandle {
    fn append(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(self.append_as(record, Commit::Durable))
    }

    fn append_written(&self, record: AuditRecord) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(self.append_as(record, Commit::Written))
    }
}

/// The writer's view of the Merkle tree: the frontier and the last hash.
#[derive(Debug, Clone, Default)]
struct Tree {
    frontier: Frontier,
    head: Option<Hash>,
}

impl Tree {
    fn push(&mut self, hash: Hash) {
        self.frontier.push_record(&hash);
        self.head = Some(hash);
    }
}

/// Counters of the writer since it started (read with [`AuditHandle::stats`]).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Records committed.
    pub records: AtomicU64,
    /// Commits (transactions) that wrote them.
    pub commits: AtomicU64,
    /// Those of the commits that waited for the disk ([`Commit::Durable`]).
    pub syncs: AtomicU64,
    /// Records written but not yet durable: those committed since the last
    /// durable commit (0 whenever the exchange path has answered).
    pub pending: AtomicU64,
    /// Nanoseconds spent in the commits.
    pub commit_ns: AtomicU64,
    /// Times the writer task failed (panicked) and was started again.
    pub restarts: AtomicU64,
}

/// The appends the writer takes into one transaction.
struct Batch {
    entries: Vec<(Entry, Waiter)>,
    /// Durable if any append of the batch asked for it.
    commit: Commit,
}

impl Batch {
    fn with_capacity(n: usize) -> Self {
        Self {
            entries: Vec::with_capacity(n),
            commit: Commit::Written,
        }
    }

    fn push(&mut self, entry: Entry, commit: Commit, waiter: Waiter) {
        if commit == Commit::Durable {
            self.commit = Commit::Durable;
        }
        self.entries.push((entry, waiter));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What a writer task is started from: at start, and again after it failed.
struct WriterSeed {
    stats: Arc<WriterStats>,
    store: Arc<dyn AuditStore>,
    signer: Arc<SigningKey>,
    node: String,
    max_batch: usize,
}

impl WriterSeed {
    /// A writer with its Merkle tree rebuilt from the store.
    async fn writer(&self) -> Writer {
        let mut writer = Writer {
            stats: self.stats.clone(),
            store: self.store.clone(),
            signer: self.signer.clone(),
            node: self.node.clone(),
            max_batch: self.max_batch,
            tree: Tree::default(),
            tree_ok: true,
            last_checkpoint: 0,
            last_batch: 0,
        };
        if let Err(e) = writer.load().await {
            // A log with a hole (tampering, or a store restored from a partial
            // backup) still takes appends; `verify` names the problem, and
            // checkpoints resume once the tree can be rebuilt.
            tracing::error!(error = %e, "cannot rebuild the audit Merkle tree");
            writer.tree = Tree::default();
            writer.tree_ok = false;
        }
        writer
    }
}

/// Runs the writer until the log shuts down. Should it panic, the appends
/// of the batch it was writing are answered with an error (their replies
/// are dropped: nothing of them was confirmed), the failure is counted in
/// [`WriterStats::restarts`] and logged, and a fresh writer, its tree
/// rebuilt from the store, takes over the same queue: the log never stops
/// taking appends because of one failure.
async fn supervise(
    seed: WriterSeed,
    mut writer: Writer,
    mut rx: mpsc::Receiver<Command>,
    interval: Option<Duration>,
) {
    use futures_util::FutureExt;
    loop {
        let run = std::panic::AssertUnwindSafe(writer.run(&mut rx, interval));
        let Err(panic) = run.catch_unwind().await else {
            return;
        };
        seed.stats.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = kopir_core::logging::panic_message(&*panic),
            "the audit writer failed; starting it again"
        );
        writer = seed.writer().await;
    }
}

struct Writer {
    stats: Arc<WriterStats>,
    store: Arc<dyn AuditStore>,
    signer: Arc<SigningKey>,
    node: String,
    max_batch: usize,
    tree: Tree,
    /// False while the tree could not be rebuilt from the store (a hole in
    /// the log); appends go on, checkpoints retry the rebuild.
    tree_ok: bool,
    /// The size of the last checkpoint this writer signed or found.
    last_checkpoint: u64,
    /// The size of the last batch written.
    last_batch: usize,
}

impl Writer {
    /// Rebuilds the Merkle frontier: from the latest checkpoint's stored
    /// frontier when it matches the signed root, then from the record hashes
    /// after it.
    async fn load(&mut self) -> Result<(), AuditError> {
        if let Some(latest) = self.store.latest_checkpoint().await? {
            let cp = &latest.checkpoint;
            match Frontier::decode(&latest.frontier) {
                Some(f) if f.size() == cp.seq && f.root() == cp.root => {
                    self.tree = Tree {
                        frontier: f,
                        head: Some(cp.head),
                    };
                    self.last_checkpoint = cp.seq;
                }
                _ => tracing::warn!(
                    seq = cp.seq,
                    "the latest audit checkpoint's frontier does not match its root; rebuilding"
                ),
            }
        }
        self.catch_up(None).await
    }

    /// Adds the hashes of records stored after the tree's end, up to `to`
    /// (or the store's head).
    async fn catch_up(&mut self, to: Option<u64>) -> Result<(), AuditError> {
        let to = match to {
            Some(to) => to,
            None => match self.store.head().await? {
                Some(head) => head.seq,
                None => return Ok(()),
            },
        };
        while self.tree.frontier.size() < to {
            let from = self.tree.frontier.size() + 1;
            let chunk_end = to.min(from + CATCH_UP_CHUNK - 1);
            let hashes = self.store.hashes(from, chunk_end).await?;
            if hashes.is_empty() {
                return Err(AuditError::Read(format!(
                    "record {from} is missing from the store"
                )));
            }
            for (seq, hash) in hashes {
                if seq != self.tree.frontier.size() + 1 {
                    return Err(AuditError::Read(format!(
                        "record {} is missing from the store",
                        self.tree.frontier.size() + 1
                    )));
                }
                self.tree.push(hash);
            }
        }
        Ok(())
    }

    async fn run(&mut self, rx: &mut mpsc::Receiver<Command>, interval: Option<Duration>) {
        let mut ticker = interval.map(|d| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut batch = Batch::with_capacity(self.max_batch);
        loop {
            // The timer goes first so that a steady stream of appends cannot
            // starve the periodic checkpoint.
            let command = tokio::select! {
                biased;
                _ = async {
                    match ticker.as_mut() {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    if let Err(e) = self.checkpoint().await {
                        tracing::warn!(error = %e, "periodic audit checkpoint failed");
                    }
                    continue;
                }
                command = rx.recv() => command,
            };
            let mut pending = match command {
                None => break,
                Some(c) => Some(c),
            };
            while let Some(command) = pending.take() {
                match command {
                    Command::Append(entry, commit, waiter) => {
                        batch.push(*entry, commit, waiter);
                        // Take whatever else is queued, up to a full batch.
                        // Under load (the last batch was large), give the
                        // appenders just answered a moment to come back, so
                        // that they share this commit rather than the next.
                        let mut rounds = if self.last_batch >= GATHER_THRESHOLD {
                            GATHER_ROUNDS
                        } else {
                            0
                        };
                        loop {
                            let before = batch.len();
                            while batch.len() < self.max_batch {
                                match rx.try_recv() {
                                    Ok(Command::Append(e, c, w)) => batch.push(*e, c, w),
                                    Ok(other) => {
                                        pending = Some(other);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            if rounds == 0
                                || pending.is_some()
                                || batch.len() >= self.max_batch
                                || (batch.len() == before && rounds < GATHER_ROUNDS)
                            {
                                break;
                            }
                            rounds -= 1;
                            tokio::task::yield_now().await;
                        }
                        self.last_batch = batch.len();
                        self.write(&mut batch).await;
                    }
                    Command::Checkpoint(reply) => {
                        let _ = reply.send(self.checkpoint().await);
                    }
                    Command::Shutdown(reply) => {
                        // Whatever was queued before the shutdown is written
                        // first: it is ahead of it in the channel.
                        rx.close();
                        while let Ok(command) = rx.try_recv() {
                            if let Command::Append(e, c, w) = command {
                                batch.push(*e, c, w);
                                if batch.len() >= self.max_batch {
                                    self.write(&mut batch).await;
                                }
                            }
                        }
                        self.write(&mut batch).await;
                        self.final_checkpoint().await;
                        let _ = reply.send(());
                        return;
                    }
                }
            }
        }
        self.final_checkpoint().await;
    }

    async fn final_checkpoint(&mut self) {
        if let Err(e) = self.checkpoint().await {
            tracing::warn!(error = %e, "final audit checkpoint failed");
        }
    }

    /// Appends the batch in one transaction and answers its waiters.
    async fn write(&mut self, batch: &mut Batch) {
        if batch.entries.is_empty() {
            return;
        }
        let commit = std::mem::replace(&mut batch.commit, Commit::Written);
        let (entries, waiters): (Vec<Entry>, Vec<_>) = batch.entries.drain(..).unzip();
        let started = std::time::Instant::now();
        let appended = self.store.append(entries, commit).await;
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        match appended {
            Ok(links) => {
                let n = waiters.len() as u64;
                let stats = &self.stats;
                stats.commit_ns.fetch_add(spent, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.records.fetch_add(n, Ordering::Relaxed);
                match commit {
                    Commit::Durable => {
                        stats.syncs.fetch_add(1, Ordering::Relaxed);
                        stats.pending.store(0, Ordering::Relaxed);
                    }
                    Commit::Written => {
                        stats.pending.fetch_add(n, Ordering::Relaxed);
                    }
                }
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
                if self.tree_ok
                    && let Err(e) = self.extend(&links).await
                {
                    tracing::warn!(error = %e, "audit Merkle tree out of step; will rebuild");
                    self.tree = Tree::default();
                    self.tree_ok = false;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit append failed");
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
    }

    /// Adds freshly appended records to the tree, first catching up with any
    /// records other nodes appended in between.
    async fn extend(&mut self, links: &[Link]) -> Result<(), AuditError> {
        let Some(first) = links.first() else {
            return Ok(());
        };
        if first.seq <= self.tree.frontier.size() {
            // The store went back (records removed behind our back): rebuild.
            self.tree = Tree::default();
        }
        if first.seq > self.tree.frontier.size() + 1 {
            self.catch_up(Some(first.seq - 1)).await?;
        }
        for link in links {
            self.tree.push(link.hash);
        }
        Ok(())
    }

    /// Signs and stores a checkpoint of everything durable now.
    async fn checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        if !self.tree_ok {
            self.tree = Tree::default();
        }
        if let Err(e) = self.catch_up(None).await {
            self.tree = Tree::default();
            self.tree_ok = false;
            return Err(e);
        }
        self.tree_ok = true;
        let size = self.tree.frontier.size();
        let Some(head) = self.tree.head else {
            return Ok(None);
        };
        if size == 0 || size == self.last_checkpoint {
            return Ok(None);
        }
        let cp = Checkpoint::sign(
            size,
            head,
            self.tree.frontier.root(),
            now_ms(),
            &self.node,
            &self.signer,
        );
        self.store
            .put_checkpoint(StoredCheckpoint {
                checkpoint: cp.clone(),
                frontier: self.tree.frontier.encode(),
            })
            .await?;
        self.last_checkpoint = size;
        Ok(Some(cp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_config_parse() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("7 weeks"), None);
        let mut c: AuditConfig =
            toml::from_str("checkpoint_interval = \"30s\"\nnode = \"ss1\"\n").unwrap();
        assert_eq!(c.checkpoint_interval, Duration::from_secs(30));
        assert_eq!(c.node, "ss1");
        assert_eq!(c.max_batch, DEFAULT_MAX_BATCH);
        assert!(!c.store_bodies);
        c.data_dir = PathBuf::from("/var/lib/kopir");
        assert_eq!(
            c.pseudonym_key_path(),
            PathBuf::from("/var/lib/kopir/pseudonym.key")
        );
        assert!(toml::from_str::<AuditConfig>("data_dir = \"x\"").is_err());
        let c: AuditConfig = toml::from_str("checkpoint_interval = 10").unwrap();
        assert_eq!(c.checkpoint_interval, Duration::from_secs(10));
        assert!(toml::from_str::<AuditConfig>("checkpoint_interval = \"soon\"").is_err());
        assert!(toml::from_str::<AuditConfig>("bogus = 1").is_err());
        let back: AuditConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn durations_in_humantime_syntax() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 60 "), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), None);
        assert_eq!(parse_duration("5 sec"), None);
        assert_eq!(parse_duration("-5s"), None);
        assert_eq!(parse_duration(""), None);
    }
}
