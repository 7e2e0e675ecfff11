//! Self-contained archives of a range of the log, verifiable offline.
//!
//! An archive is one JSON document (`kopir-audit-archive/1`) holding:
//!
//! - the records `from_seq..=to_seq`, each with its fields and its canonical
//!   bytes (base64), so any tool can recompute `hash = SHA-256(canonical)`;
//! - `checkpoint`: a signed checkpoint covering `to_seq`, with its signer's
//!   certificate;
//! - `inclusion`: the Merkle inclusion proof of record `to_seq` in that
//!   checkpoint's tree. Since each record's hash covers the one before
//!   (`prev_hash`), this one proof authenticates the whole range;
//! - optionally `latest`, the newest checkpoint at export time, and
//!   `consistency`, the proof that `checkpoint`'s tree is a prefix of
//!   `latest`'s (nothing signed before was rewritten after).
//!
//! [`verify_archive`] checks all of it with no access to the store, and names
//! the first bad record like [`super::verify`] does.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    AuditError,
    checkpoint::Checkpoint,
    inspect,
    merkle::{self, leaf_hash},
    record::{Hash, StoredRecord, b64},
    store::AuditStore,
    verify::{Problem, ProblemKind, VerifyReport, Walker, check_checkpoints},
};
use kopir_core::pki::Fingerprint;

/// The format tag of an archive.
pub(crate) const ARCHIVE_FORMAT: &str = "kopir-audit-archive/1";

/// The most records one archive may hold.
pub(crate) const MAX_ARCHIVE_RECORDS: u64 = 1_000_000;

/// The highest sequence number a record can have (the stores keep them as
/// `BIGINT`).
const MAX_SEQ: u64 = i64::MAX as u64;

/// A record in an archive: its fields and its canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRecord {
    /// The record's fields, sequence number and links.
    #[serde(flatten)]
    pub record: StoredRecord,
    /// The canonical bytes its hash covers.
    #[serde(with = "b64")]
    pub canonical: Vec<u8>,
}

/// A self-contained, signed extract of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// [`ARCHIVE_FORMAT`].
    pub format: String,
    /// When it was made, ms since the epoch.
    pub created_ms: i64,
    /// First record's sequence number.
    pub from_seq: u64,
    /// Last record's sequence number.
    pub to_seq: u64,
    /// The records, in order.
    pub records: Vec<ArchivedRecord>,
    /// A signed checkpoint with `seq >= to_seq`.
    pub checkpoint: Checkpoint,
    /// Inclusion proof of record `to_seq` in `checkpoint`'s tree.
    #[serde(with = "hex_list")]
    pub inclusion: Vec<Hash>,
    /// The newest checkpoint at export time, if newer than `checkpoint`.
    pub latest: Option<Checkpoint>,
    /// Consistency proof from `checkpoint` to `latest`.
    #[serde(with = "hex_list")]
    pub consistency: Vec<Hash>,
}

impl Archive {
    /// Encodes as pretty JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, AuditError> {
        serde_json::to_vec_pretty(self).map_err(|e| AuditError::Invalid(e.to_string()))
    }

    /// Parses an archive.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AuditError> {
        serde_json::from_slice(bytes)
            .map_err(|e| AuditError::Invalid(format!("not a kopir audit archive: {e}")))
    }
}

/// Serde helpers: a list of hashes as hex strings.
pub(crate) mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeSeq};

    /// Serializes as a list of hex strings.
    pub(crate) fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    /// Parses a list of hex strings.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|t| {
                hex::decode(&t)
                    .map_err(D::Error::custom)?
                    .try_into()
                    .map_err(|_| D::Error::custom("expected 32 bytes"))
            })
            .collect()
    }
}

/// Reads records `from..=to` and checks they are contiguous and well formed.
pub(crate) async fn read_range(
    store: &dyn AuditStore,
    from: u64,
    to: u64,
) -> Result<Vec<StoredRecord>, AuditError> {
    let mut out = Vec::new();
    let mut next = from;
    while next <= to {
        let want = usize::try_from((to - next + 1).min(10_000)).unwrap_or(10_000);
        let rows = store.scan(next, want).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let r = row.map_err(|m| {
                AuditError::Read(format!("record {} is malformed: {}", m.seq, m.why))
            })?;
            if r.seq != next || r.seq > to {
                break;
            }
            next += 1;
            out.push(r);
        }
        if out.last().map(|r| r.seq) != Some(next - 1) {
            break;
        }
    }
    if next <= to {
        return Err(AuditError::Read(format!(
            "record {next} is missing; run `kopir audit verify`"
        )));
    }
    Ok(out)
}

/// Builds an archive of records `from..=to` from the store's checkpoints:
/// the smallest valid checkpoint covering `to`, and the newest one.
pub async fn export_range(
    store: &Arc<dyn AuditStore>,
    from: u64,
    to: u64,
) -> Result<Archive, AuditError> {
    if from == 0 || from > to {
        return Err(AuditError::Invalid(format!("bad range {from}..={to}")));
    }
    if to - from + 1 > MAX_ARCHIVE_RECORDS {
        return Err(AuditError::Invalid(format!(
            "at most {MAX_ARCHIVE_RECORDS} records per archive"
        )));
    }
    let (trusted, _, _) = check_checkpoints(store.checkpoints().await?, None);
    let covering = trusted
        .iter()
        .find(|c| c.seq >= to)
        .cloned()
        .ok_or_else(|| {
            AuditError::NotFound(format!(
                "no signed checkpoint covers record {to} yet (the last covers {})",
                trusted.last().map(|c| c.seq).unwrap_or(0)
            ))
        })?;
    let latest = trusted.last().filter(|c| c.seq > covering.seq).cloned();
    let records = read_range(store.as_ref(), from, to).await?;
    let size = latest.as_ref().map(|c| c.seq).unwrap_or(covering.seq);
    let all = inspect::leaves(store.as_ref(), size).await?;
    let cover_leaves = &all[..usize::try_from(covering.seq)
        .unwrap_or(usize::MAX)
        .min(all.len())];
    if merkle::root(cover_leaves) != covering.root {
        return Err(AuditError::Read(format!(
            "the log does not match the checkpoint at {}; run `kopir audit verify`",
            covering.seq
        )));
    }
    let index = usize::try_from(to - 1).unwrap_or(usize::MAX);
    let inclusion = merkle::inclusion_proof(cover_leaves, index)
        .ok_or_else(|| AuditError::Invalid(format!("record {to} is not in the tree")))?;
    let consistency = match &latest {
        Some(_) => merkle::consistency_proof(&all, cover_leaves.len()).unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(Archive {
        format: ARCHIVE_FORMAT.into(),
        created_ms: kopir_core::clock::now_ms(),
        from_seq: from,
        to_seq: to,
        records: records
            .into_iter()
            .map(|record| ArchivedRecord {
                canonical: record.canonical(),
                record,
            })
            .collect(),
        checkpoint: covering,
        inclusion,
        latest,
        consistency,
    })
}

/// Checks an archive offline. With `expected`, only checkpoints signed by
/// that certificate are accepted.
pub fn verify_archive(archive: &Archive, expected: Option<&Fingerprint>) -> VerifyReport {
    let mut report = VerifyReport {
        head_seq: archive.to_seq,
        ..VerifyReport::default()
    };
    let problem = |kind, seq, detail: String| Problem { kind, seq, detail };
    if archive.format != ARCHIVE_FORMAT {
        report.problems.push(problem(
            ProblemKind::Malformed,
            archive.from_seq,
            format!("unknown archive format {:?}", archive.format),
        ));
        return report;
    }
    // The numbers a log's records can have (the stores keep them as BIGINT):
    // every sum and difference of sequence numbers below stays in range.
    let range_ok = (1..=archive.to_seq).contains(&archive.from_seq)
        && archive.to_seq <= MAX_SEQ
        && archive.to_seq - archive.from_seq < MAX_ARCHIVE_RECORDS;
    if !range_ok {
        report.problems.push(problem(
            ProblemKind::Malformed,
            archive.from_seq,
            format!(
                "records {}..={} are not a range of a log (numbered from 1 to {MAX_SEQ}, at most {MAX_ARCHIVE_RECORDS} per archive)",
                archive.from_seq, archive.to_seq
            ),
        ));
        return report;
    }
    let mut cps = vec![archive.checkpoint.clone()];
    cps.extend(archive.latest.clone());
    let (trusted, cp_problems, signers) = check_checkpoints(cps, expected);
    report.signers = signers;
    report.checkpoints = trusted.len();
    report.problems.extend(cp_problems);
    let covering_ok = archive.checkpoint.verify(expected).is_ok();
    report.last_checkpoint = covering_ok.then_some(archive.checkpoint.seq);

    let Some(first) = archive.records.first() else {
        report.problems.push(problem(
            ProblemKind::Missing,
            archive.from_seq,
            "the archive holds no records".into(),
        ));
        return report;
    };
    if first.record.seq != archive.from_seq {
        report.problems.insert(
            0,
            problem(
                ProblemKind::Missing,
                archive.from_seq,
                format!("the archive starts at record {}", first.record.seq),
            ),
        );
        report.first_bad = Some(archive.from_seq);
        return report;
    }
    // Check the chain; the covering checkpoint's head is checked when it is
    // the range's last record (roots need the whole log: the inclusion proof
    // stands in for them).
    let cover: Vec<Checkpoint> = if covering_ok && archive.checkpoint.seq == archive.to_seq {
        vec![archive.checkpoint.clone()]
    } else {
        Vec::new()
    };
    let mut walker = Walker::starting_at(archive.from_seq, first.record.prev_hash, None, cover);
    let mut canonical_problem = None;
    for a in &archive.records {
        if canonical_problem.is_none() && a.record.canonical() != a.canonical {
            canonical_problem = Some(problem(
                ProblemKind::Altered,
                a.record.seq,
                format!(
                    "record {}'s canonical bytes do not match its fields",
                    a.record.seq
                ),
            ));
        }
        if !walker.feed(Ok(a.record.clone())) {
            break;
        }
    }
    report.records = walker.checked();
    let walked = walker.finish();
    let mut chain_problem = match walked {
        Ok(head) => {
            report.head_hash = Some(head);
            None
        }
        Err(p) => Some(p),
    };
    if let Some(p) = canonical_problem
        && chain_problem.as_ref().is_none_or(|c| p.seq < c.seq)
    {
        chain_problem = Some(p);
    }
    if chain_problem.is_none() {
        let last = archive.records.last().map(|a| &a.record);
        match last {
            Some(last) if last.seq == archive.to_seq => {
                if covering_ok
                    && !merkle::verify_inclusion(
                        &leaf_hash(&last.hash),
                        last.seq - 1,
                        archive.checkpoint.seq,
                        &archive.inclusion,
                        &archive.checkpoint.root,
                    )
                {
                    chain_problem = Some(problem(
                        ProblemKind::CheckpointMismatch,
                        archive.from_seq,
                        format!(
                            "record {} is not in the tree of the checkpoint at {}: records {}..={} are not the signed ones",
                            last.seq, archive.checkpoint.seq, archive.from_seq, last.seq
                        ),
                    ));
                }
            }
            _ => {
                let end = last.map(|r| r.seq).unwrap_or(archive.from_seq - 1);
                chain_problem = Some(problem(
                    ProblemKind::Truncated,
                    end + 1,
                    format!("the archive ends at record {end}, not {}", archive.to_seq),
                ));
            }
        }
    }
    if let Some(latest) = &archive.latest
        && covering_ok
        && latest.verify(expected).is_ok()
        && !merkle::verify_consistency(
            archive.checkpoint.seq,
            latest.seq,
            &archive.checkpoint.root,
            &latest.root,
            &archive.consistency,
        )
    {
        report.problems.push(problem(
            ProblemKind::CheckpointMismatch,
            latest.seq,
            format!(
                "the checkpoint at {} is not a prefix of the checkpoint at {}",
                archive.checkpoint.seq, latest.seq
            ),
        ));
    }
    if !covering_ok && chain_problem.is_none() {
        chain_problem = Some(problem(
            ProblemKind::CheckpointSignature,
            archive.from_seq,
            "no valid signed checkpoint vouches for these records".into(),
        ));
    }
    if let Some(p) = chain_problem {
        report.first_bad = Some(p.seq);
        report.problems.insert(0, p);
    }
    report
}
