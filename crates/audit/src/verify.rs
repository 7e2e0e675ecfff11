//! Verification of a log: the chain, the Merkle tree and the signed
//! checkpoints, naming the first bad record.
//!
//! [`Walker`] is the sans-IO core: it is fed rows in sequence order and checks
//! for each one that
//!
//! 1. its sequence number is the next one (else records were **removed**);
//! 2. its stored hash is the hash of its fields (else it was **altered**, or
//!    **moved**: a record whose hash matches at a nearby position was
//!    renumbered, which is how a removal, a reordering or an insertion shows
//!    when later records were shifted);
//! 3. its `prev_hash` is the previous record's hash (else the previous record
//!    was rewritten with a fresh hash, or records were **inserted** before it:
//!    a `prev_hash` naming an earlier record than the previous one shows where
//!    the insertion starts);
//! 4. at each signed checkpoint's position, the head hash and the Merkle root
//!    over everything so far are the signed ones (else something up to there
//!    was rewritten consistently, which only the signature can reveal; the
//!    first bad record is then known to lie after the last matching
//!    checkpoint, and the first record after it is named);
//!
//! and at the end, that the log reaches the largest signed checkpoint (else it
//! was **truncated**). Checkpoints whose signature fails (or that another key
//! than the expected one signed) are reported and not trusted.
//!
//! Records after the last checkpoint are covered by the chain only: a tail
//! cut there, or rewritten wholesale, cannot be told from a log that never
//! had it; the report says how many records that is.

use std::{collections::VecDeque, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{
    AuditError,
    checkpoint::Checkpoint,
    merkle::Frontier,
    record::{GENESIS, Hash, StoredRecord},
    store::{AuditStore, Scanned},
};
use kopir_core::pki::Fingerprint;

/// How far a renumbered record is looked for.
const MOVE_SEARCH: u64 = 16;
/// How many recent hashes are remembered to locate insertions.
const RECENT: usize = 64;
/// Rows read per store round trip.
const CHUNK: usize = 20_000;

/// What kind of damage a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// A record's fields do not match its hash.
    Altered,
    /// Records are missing (removed, with or without renumbering the rest).
    Missing,
    /// Records were inserted.
    Inserted,
    /// A record sits at another position than the one it was written at
    /// (records before it were removed, or records were reordered).
    Moved,
    /// A record is not the one its successor was chained to.
    BrokenLink,
    /// A row is not even a well-formed record.
    Malformed,
    /// The log ends before a signed checkpoint.
    Truncated,
    /// The log does not match a signed checkpoint's head or root.
    CheckpointMismatch,
    /// A checkpoint's signature does not verify (or has an unexpected signer).
    CheckpointSignature,
}

impl ProblemKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Altered => "altered",
            ProblemKind::Missing => "missing",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Moved => "moved",
            ProblemKind::BrokenLink => "broken_link",
            ProblemKind::Malformed => "malformed",
            ProblemKind::Truncated => "truncated",
            ProblemKind::CheckpointMismatch => "checkpoint_mismatch",
            ProblemKind::CheckpointSignature => "checkpoint_signature",
        }
    }
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// The first bad record's sequence number (for a checkpoint problem, the
    /// checkpoint's sequence number).
    pub seq: u64,
    /// What was found, in words.
    pub detail: String,
}

/// The result of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records checked (the walk stops at the first chain problem).
    pub records: u64,
    /// The last record's sequence number in the log.
    pub head_seq: u64,
    /// The chain head's hash, when the walk reached the end.
    #[serde(with = "super::record::opt_hex32")]
    pub head_hash: Option<Hash>,
    /// Checkpoints whose signature verified.
    pub checkpoints: usize,
    /// The largest sequence number a valid checkpoint covers.
    pub last_checkpoint: Option<u64>,
    /// Records after the last valid checkpoint (covered by the chain only).
    pub unsigned_tail: u64,
    /// Key ids (hex) of the checkpoints' signers.
    pub signers: Vec<String>,
    /// The first bad record, if any.
    pub first_bad: Option<u64>,
    /// Every problem found: at most one in the chain (the walk stops there),
    /// and each bad checkpoint.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True if nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Options of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only checkpoints signed by this certificate are trusted.
    pub expected_signer: Option<Fingerprint>,
}

/// Splits checkpoints into trusted ones (sorted by sequence number) and
/// problems.
pub fn check_checkpoints(
    checkpoints: Vec<Checkpoint>,
    expected: Option<&Fingerprint>,
) -> (Vec<Checkpoint>, Vec<Problem>, Vec<String>) {
    let mut good = Vec::new();
    let mut problems = Vec::new();
    let mut signers: Vec<String> = Vec::new();
    for cp in checkpoints {
        match cp.verify(expected) {
            Ok(()) => {
                let id = cp.key_id().to_string();
                if !signers.contains(&id) {
                    signers.push(id);
                }
                good.push(cp);
            }
            Err(e) => problems.push(Problem {
                kind: ProblemKind::CheckpointSignature,
                seq: cp.seq,
                detail: format!("checkpoint at {} signed at {} ms: {e}", cp.seq, cp.at_ms),
            }),
        }
    }
    good.sort_by_key(|c| c.seq);
    (good, problems, signers)
}

/// The chain walk, fed one row at a time in sequence order.
#[derive(Debug)]
pub(crate) struct Walker {
    expected: u64,
    prev: Hash,
    tree: Option<Frontier>,
    recent: VecDeque<(Hash, u64)>,
    checkpoints: Vec<Checkpoint>,
    next_checkpoint: usize,
    last_good_checkpoint: u64,
    scratch: Vec<u8>,
    checked: u64,
    problem: Option<Problem>,
}

impl Walker {
    /// A walk from the start of a log, checking the Merkle roots of
    /// `checkpoints` (trusted, sorted by sequence number).
    pub(crate) fn new(checkpoints: Vec<Checkpoint>) -> Self {
        Self::starting_at(1, GENESIS, Some(Frontier::new()), checkpoints)
    }

    /// A walk from record `seq`, whose `prev_hash` must be `prev`; with
    /// `tree`, the Merkle frontier of the records before it, else roots are
    /// not checked (only heads).
    pub(crate) fn starting_at(
        seq: u64,
        prev: Hash,
        tree: Option<Frontier>,
        checkpoints: Vec<Checkpoint>,
    ) -> Self {
        let mut recent = VecDeque::with_capacity(RECENT);
        recent.push_back((prev, seq.saturating_sub(1)));
        let last_good_checkpoint = seq.saturating_sub(1);
        let next_checkpoint = checkpoints.partition_point(|c| c.seq < seq);
        Self {
            expected: seq,
            prev,
            tree,
            recent,
            checkpoints,
            next_checkpoint,
            last_good_checkpoint,
            scratch: Vec::with_capacity(512),
            checked: 0,
            problem: None,
        }
    }

    /// The problem found, if any (the walk ignores rows after it).
    pub(crate) fn problem(&self) -> Option<&Problem> {
        self.problem.as_ref()
    }

    /// Records checked so far.
    pub(crate) fn checked(&self) -> u64 {
        self.checked
    }

    fn fail(&mut self, kind: ProblemKind, seq: u64, detail: String) {
        self.problem = Some(Problem { kind, seq, detail });
    }

    fn seen(&self, hash: &Hash) -> Option<u64> {
        self.recent
            .iter()
            .find(|(h, _)| h == hash)
            .map(|&(_, seq)| seq)
    }

    /// Checks one row; false once a problem was found.
    pub(crate) fn feed(&mut self, row: Scanned) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let expected = self.expected;
        let r = match row {
            Ok(r) => r,
            Err(m) => {
                if m.seq > 0 && (m.seq as u64) > expected {
                    self.fail(
                        ProblemKind::Missing,
                        expected,
                        format!("records {expected}..{} are missing", m.seq - 1),
                    );
                } else {
                    // A row at the expected position, or one with an impossible
                    // (negative) number, which sorts first.
                    let seq = u64::try_from(m.seq)
                        .ok()
                        .filter(|&s| s > 0)
                        .unwrap_or(expected);
                    self.fail(
                        ProblemKind::Malformed,
                        seq,
                        format!("record {}: {}", m.seq, m.why),
                    );
                }
                return false;
            }
        };
        if r.seq > expected {
            self.fail(
                ProblemKind::Missing,
                expected,
                if r.seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected}..={} are missing", r.seq - 1)
                },
            );
            return false;
        }
        if r.seq < expected {
            self.fail(
                ProblemKind::Inserted,
                r.seq,
                format!(
                    "record {} appears again after record {}",
                    r.seq,
                    expected - 1
                ),
            );
            return false;
        }
        let own = r.recompute_with(&mut self.scratch);
        if own != r.hash {
            self.diagnose_bad_hash(&r);
            return false;
        }
        if r.prev_hash != self.prev {
            self.diagnose_bad_link(&r);
            return false;
        }
        if let Some(body) = &r.body
            && Some(kopir_core::pki::sha256(body)) != r.body_sha256
        {
            self.fail(
                ProblemKind::Altered,
                r.seq,
                format!(
                    "record {}'s stored body does not match the body hash it was written with",
                    r.seq
                ),
            );
            return false;
        }
        self.accept(&r);
        true
    }

    fn diagnose_bad_hash(&mut self, r: &StoredRecord) {
        let p = r.seq;
        if let Some(q) = self.seen(&r.prev_hash)
            && q + 1 < p
        {
            return self.fail(
                ProblemKind::Inserted,
                q + 1,
                format!(
                    "record {p} was chained after record {q}: records {}..={} were inserted and later ones renumbered",
                    q + 1,
                    p - 1
                ),
            );
        }
        for d in 1..=MOVE_SEARCH {
            if r.entry.hash(p + d, &r.prev_hash) == r.hash {
                return self.fail(
                    ProblemKind::Moved,
                    p,
                    format!(
                        "record {p} holds what was written as record {}: records from {p} were removed or reordered",
                        p + d
                    ),
                );
            }
            if d < p && r.entry.hash(p - d, &r.prev_hash) == r.hash {
                return self.fail(
                    ProblemKind::Inserted,
                    p - d,
                    format!(
                        "record {p} was record {}: records were inserted from {} on",
                        p - d,
                        p - d
                    ),
                );
            }
        }
        self.fail(
            ProblemKind::Altered,
            p,
            format!("record {p}'s fields do not match its hash (edited, or moved)"),
        );
    }

    fn diagnose_bad_link(&mut self, r: &StoredRecord) {
        let p = r.seq;
        if let Some(q) = self.seen(&r.prev_hash)
            && q + 1 < p
        {
            return self.fail(
                ProblemKind::Inserted,
                q + 1,
                format!(
                    "record {p} was chained after record {q}: records {}..={} were inserted",
                    q + 1,
                    p - 1
                ),
            );
        }
        if p <= 1 {
            return self.fail(
                ProblemKind::BrokenLink,
                p,
                "the first record does not start the chain".into(),
            );
        }
        self.fail(
            ProblemKind::BrokenLink,
            p - 1,
            format!(
                "record {p} was chained to another record {}: record {} was rewritten with a fresh hash (or records were removed before {p})",
                p - 1,
                p - 1
            ),
        );
    }

    fn accept(&mut self, r: &StoredRecord) {
        if let Some(tree) = self.tree.as_mut() {
            tree.push_record(&r.hash);
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((r.hash, r.seq));
        self.prev = r.hash;
        self.expected += 1;
        self.checked += 1;
        while let Some(cp) = self.checkpoints.get(self.next_checkpoint) {
            if cp.seq != r.seq {
                break;
            }
            self.next_checkpoint += 1;
            let root_ok = match &self.tree {
                Some(tree) => tree.root() == cp.root,
                None => true,
            };
            if cp.head != r.hash || !root_ok {
                let from = self.last_good_checkpoint + 1;
                let what = if cp.head != r.hash {
                    "head hash"
                } else {
                    "Merkle root"
                };
                self.fail(
                    ProblemKind::CheckpointMismatch,
                    from,
                    format!(
                        "the log's {what} at record {} is not the one signed in the checkpoint of {} ms: records {from}..={} were rewritten",
                        cp.seq, cp.at_ms, cp.seq
                    ),
                );
                return;
            }
            self.last_good_checkpoint = cp.seq;
        }
    }

    /// Ends the walk: a problem if the log stops before a signed checkpoint.
    pub(crate) fn finish(mut self) -> Result<Hash, Problem> {
        if let Some(p) = self.problem.take() {
            return Err(p);
        }
        if let Some(cp) = self.checkpoints.last()
            && cp.seq >= self.expected
        {
            return Err(Problem {
                kind: ProblemKind::Truncated,
                seq: self.expected,
                detail: format!(
                    "the log ends at record {} but a checkpoint signed at {} ms covers {} records",
                    self.expected - 1,
                    cp.at_ms,
                    cp.seq
                ),
            });
        }
        Ok(self.prev)
    }
}

/// Verifies a whole store, calling `progress(done, total)` after each chunk.
pub async fn verify_store(
    store: Arc<dyn AuditStore>,
    options: &VerifyOptions,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<VerifyReport, AuditError> {
    let (trusted, mut problems, signers) =
        check_checkpoints(store.checkpoints().await?, options.expected_signer.as_ref());
    let last_checkpoint = trusted.last().map(|c| c.seq);
    let head_seq = store.head().await?.map(|l| l.seq).unwrap_or(0);
    let checkpoints = trusted.len();
    let mut walker = Walker::new(trusted);

    // Read the next chunk while the current one is hashed.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<Scanned>, AuditError>>(2);
    let reader_store = store.clone();
    let reader = tokio::spawn(async move {
        let mut from = 1u64;
        loop {
            let chunk = reader_store.scan(from, CHUNK).await;
            let next = match &chunk {
                Ok(rows) if rows.len() == CHUNK => rows
                    .last()
                    .map(|r| match r {
                        Ok(r) => r.seq + 1,
                        Err(m) => u64::try_from(m.seq).unwrap_or(0) + 1,
                    })
                    .filter(|&n| n > from),
                _ => None,
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
            match next {
                Some(n) => from = n,
                None => return,
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let rows = chunk?;
        if rows.is_empty() {
            break;
        }
        let mut w = walker;
        walker = tokio::task::spawn_blocking(move || {
            for row in rows {
                if !w.feed(row) {
                    break;
                }
            }
            w
        })
        .await
        .map_err(|e| AuditError::Read(format!("verify task: {e}")))?;
        progress(walker.checked(), head_seq);
        if walker.problem().is_some() {
            break;
        }
    }
    drop(rx);
    reader.abort();
    let records = walker.checked();
    let (head_hash, chain_problem) = match walker.finish() {
        Ok(h) => (Some(h).filter(|_| records > 0), None),
        Err(p) => (None, Some(p)),
    };
    let first_bad = chain_problem.as_ref().map(|p| p.seq);
    if let Some(p) = chain_problem {
        problems.insert(0, p);
    }
    Ok(VerifyReport {
        records,
        head_seq,
        head_hash,
        checkpoints,
        last_checkpoint,
        unsigned_tail: head_seq.saturating_sub(last_checkpoint.unwrap_or(0)),
        signers,
        first_bad,
        problems,
    })
}
