//! Looking at single records: `show` (every record of one exchange, checked),
//! inclusion proofs of one record and consistency proofs between checkpoints.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    AuditError,
    checkpoint::Checkpoint,
    merkle::{self, Levels, leaf_hash},
    record::{Hash, StoredRecord, hex32},
    signatures::{self, SignatureCheck},
    store::AuditStore,
    verify::check_checkpoints,
};
use kopir_core::{globalconf::ConfView, pki::Fingerprint};

/// A record of one exchange as `show` presents it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownRecord {
    /// The record.
    #[serde(flatten)]
    pub record: StoredRecord,
    /// The hash recomputed from its fields.
    #[serde(with = "hex32")]
    pub recomputed: Hash,
    /// True if the recomputed hash is the stored one.
    pub hash_ok: bool,
    /// The signed checkpoint whose Merkle tree includes this record (its
    /// signature and the inclusion proof both checked), if one covers it yet.
    pub checkpoint: Option<u64>,
    /// The exchange signature the record keeps, checked.
    pub signature: SignatureCheck,
}

/// A record with the proof that it is in a signed checkpoint's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InclusionProof {
    /// The record.
    pub record: StoredRecord,
    /// The checkpoint (tree size `checkpoint.seq`, root `checkpoint.root`).
    pub checkpoint: Checkpoint,
    /// The audit path of leaf `record.seq - 1`.
    #[serde(with = "super::export::hex_list")]
    pub proof: Vec<Hash>,
}

impl InclusionProof {
    /// Checks the proof, the record's own hash and the checkpoint's signature.
    #[cfg(test)]
    pub(crate) fn verify(&self, expected: Option<&Fingerprint>) -> bool {
        self.record.recompute() == self.record.hash
            && self.checkpoint.verify(expected).is_ok()
            && self.record.seq >= 1
            && merkle::verify_inclusion(
                &leaf_hash(&self.record.hash),
                self.record.seq - 1,
                self.checkpoint.seq,
                &self.proof,
                &self.checkpoint.root,
            )
    }
}

/// Proof that one checkpoint's tree is a prefix of another's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ConsistencyProof {
    /// The older checkpoint.
    pub from: Checkpoint,
    /// The newer checkpoint.
    pub to: Checkpoint,
    /// RFC 6962 `PROOF(from.seq, D[to.seq])`.
    #[serde(with = "super::export::hex_list")]
    pub proof: Vec<Hash>,
}

impl ConsistencyProof {
    /// Checks both signatures and the proof.
    #[cfg(test)]
    pub(crate) fn verify(&self, expected: Option<&Fingerprint>) -> bool {
        self.from.verify(expected).is_ok()
            && self.to.verify(expected).is_ok()
            && merkle::verify_consistency(
                self.from.seq,
                self.to.seq,
                &self.from.root,
                &self.to.root,
                &self.proof,
            )
    }
}

/// The Merkle leaf hashes of records `1..=size`, checked to be contiguous.
pub(super) async fn leaves(store: &dyn AuditStore, size: u64) -> Result<Vec<Hash>, AuditError> {
    let hashes = store.hashes(1, size).await?;
    if hashes.len() as u64 != size
        || hashes
            .iter()
            .enumerate()
            .any(|(i, (s, _))| *s != i as u64 + 1)
    {
        return Err(AuditError::Read(format!(
            "the log has holes before record {size}; run `kopir audit verify`"
        )));
    }
    Ok(hashes.iter().map(|(_, h)| leaf_hash(h)).collect())
}

/// The Merkle tree of the first `size` records, checked for holes.
async fn tree(store: &dyn AuditStore, size: u64) -> Result<Levels, AuditError> {
    let leaves = leaves(store, size).await?;
    tokio::task::spawn_blocking(move || Levels::build(leaves))
        .await
        .map_err(|e| AuditError::Read(format!("tree task: {e}")))
}

/// The valid checkpoint with the most records.
async fn latest_valid(
    store: &dyn AuditStore,
    expected: Option<&Fingerprint>,
) -> Result<Option<Checkpoint>, AuditError> {
    let (trusted, _, _) = check_checkpoints(store.checkpoints().await?, expected);
    Ok(trusted.into_iter().last())
}

/// Every record of one exchange, each with its hash recomputed, its exchange
/// signature checked against `view` and, when a valid signed checkpoint
/// covers it, its inclusion in that checkpoint's tree checked.
pub async fn show(
    store: &Arc<dyn AuditStore>,
    request_id: &str,
    expected: Option<&Fingerprint>,
    view: Option<&ConfView>,
) -> Result<Vec<ShownRecord>, AuditError> {
    let records = store.by_request(request_id.to_owned()).await?;
    let checkpoint = latest_valid(store.as_ref(), expected).await?;
    let covered = |r: &StoredRecord| checkpoint.as_ref().is_some_and(|c| r.seq <= c.seq);
    let levels = match &checkpoint {
        Some(cp) if records.iter().any(covered) => Some(tree(store.as_ref(), cp.seq).await?),
        _ => None,
    };
    Ok(records
        .into_iter()
        .map(|record| {
            let recomputed = record.recompute();
            let included = match (&checkpoint, &levels) {
                (Some(cp), Some(levels)) if record.seq <= cp.seq && levels.root() == cp.root => {
                    let index = usize::try_from(record.seq - 1).unwrap_or(usize::MAX);
                    levels.inclusion_proof(index).is_some_and(|proof| {
                        merkle::verify_inclusion(
                            &leaf_hash(&recomputed),
                            record.seq - 1,
                            cp.seq,
                            &proof,
                            &cp.root,
                        )
                    })
                }
                _ => false,
            };
            ShownRecord {
                signature: signatures::check(&record.entry, view),
                hash_ok: recomputed == record.hash,
                recomputed,
                checkpoint: checkpoint.as_ref().map(|c| c.seq).filter(|_| included),
                record,
            }
        })
        .collect())
}

/// The inclusion proof of record `seq` in the latest valid checkpoint.
pub(crate) async fn inclusion(
    store: &Arc<dyn AuditStore>,
    seq: u64,
    expected: Option<&Fingerprint>,
) -> Result<InclusionProof, AuditError> {
    let checkpoint = latest_valid(store.as_ref(), expected)
        .await?
        .filter(|c| c.seq >= seq && seq >= 1)
        .ok_or_else(|| AuditError::NotFound(format!("no signed checkpoint covers record {seq}")))?;
    let record = match store.scan(seq, 1).await?.into_iter().next() {
        Some(Ok(r)) if r.seq == seq => r,
        Some(Err(m)) if m.seq == seq as i64 => {
            return Err(AuditError::Read(format!(
                "record {seq} is malformed: {}",
                m.why
            )));
        }
        _ => return Err(AuditError::NotFound(format!("record {seq}"))),
    };
    let levels = tree(store.as_ref(), checkpoint.seq).await?;
    if levels.root() != checkpoint.root {
        return Err(AuditError::Read(format!(
            "the log does not match the checkpoint at {}; run `kopir audit verify`",
            checkpoint.seq
        )));
    }
    let proof = levels
        .inclusion_proof(usize::try_from(seq - 1).unwrap_or(usize::MAX))
        .ok_or_else(|| AuditError::NotFound(format!("record {seq}")))?;
    Ok(InclusionProof {
        record,
        checkpoint,
        proof,
    })
}

/// The consistency proof between the valid checkpoints of `from` and `to`
/// records (`to = None`: the latest).
pub(crate) async fn consistency(
    store: &Arc<dyn AuditStore>,
    from: u64,
    to: Option<u64>,
    expected: Option<&Fingerprint>,
) -> Result<ConsistencyProof, AuditError> {
    let (trusted, _, _) = check_checkpoints(store.checkpoints().await?, expected);
    let find = |size: u64| trusted.iter().rev().find(|c| c.seq == size).cloned();
    let from_cp = find(from)
        .ok_or_else(|| AuditError::NotFound(format!("no checkpoint of {from} records")))?;
    let to_cp = match to {
        Some(t) => {
            find(t).ok_or_else(|| AuditError::NotFound(format!("no checkpoint of {t} records")))?
        }
        None => trusted
            .last()
            .cloned()
            .ok_or_else(|| AuditError::NotFound("no checkpoints".into()))?,
    };
    if from_cp.seq > to_cp.seq {
        return Err(AuditError::Invalid(format!(
            "checkpoint {} is newer than {}",
            from_cp.seq, to_cp.seq
        )));
    }
    let leaves = leaves(store.as_ref(), to_cp.seq).await?;
    let m = usize::try_from(from_cp.seq).unwrap_or(usize::MAX);
    let proof = tokio::task::spawn_blocking(move || merkle::consistency_proof(&leaves, m))
        .await
        .map_err(|e| AuditError::Read(format!("proof task: {e}")))?
        .ok_or_else(|| AuditError::Invalid("empty checkpoint".into()))?;
    Ok(ConsistencyProof {
        from: from_cp,
        to: to_cp,
        proof,
    })
}
