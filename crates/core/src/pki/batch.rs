//! Batch signatures: one Ed25519 signature over the Merkle root of the
//! digests signed at about the same time, each message carrying its path.
//!
//! X-Road's signer does the same with hash chains. Under load a server signs
//! many messages at once; signing their Merkle root once costs one signature
//! for the batch, and a receiver that gets several messages of one batch
//! checks the root's signature once and then only hashes each path.
//!
//! The signature value is the 64-byte Ed25519 signature followed by the path
//! from the message's digest up to the signed root, one 33-byte step per
//! level: a side byte (`0`: the sibling is on the left, `1`: on the right) and
//! the sibling's SHA-256. Each level hashes `0x01 || left || right`. A batch
//! of one has no path: the signature is over the digest itself, exactly a
//! plain signature. The digests signed here are SHA-256 of length-prefixed
//! canonical forms whose first byte is `0x00`, so no inner node can pass for
//! a message digest, nor the other way round.
//!
//! - [`BatchSigner`] collects the digests of concurrent callers in a task and
//!   signs each batch once. With one call at a time the batch is that call.
//! - [`verify`] folds a path and checks the root's signature;
//!   [`VerifiedRoots`] remembers roots already checked.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{mpsc, oneshot};

use super::{
    sha256,
    sign::{SigningKey, VerifyingKey},
};

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;
/// Length of one path step: side byte and sibling hash.
const STEP_LEN: usize = 33;
/// The most digests one signature covers (a path of at most 8 steps).
pub(crate) const MAX_BATCH: usize = 256;

/// The Merkle node over two children.
fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut preimage = [0u8; 65];
    preimage[0] = 0x01;
    preimage[1..33].copy_from_slice(left);
    preimage[33..].copy_from_slice(right);
    sha256(&preimage)
}

/// Splits a signature value into the Ed25519 signature and the root its path
/// leads to from `digest`; `None` if the value is not well formed.
pub fn root(digest: &[u8; 32], value: &[u8]) -> Option<([u8; 32], [u8; SIGNATURE_LEN])> {
    if value.len() < SIGNATURE_LEN || !(value.len() - SIGNATURE_LEN).is_multiple_of(STEP_LEN) {
        return None;
    }
    let (signature, path) = value.split_at(SIGNATURE_LEN);
    if path.len() / STEP_LEN > MAX_BATCH.trailing_zeros() as usize {
        return None;
    }
    let mut hash = *digest;
    for step in path.chunks_exact(STEP_LEN) {
        let sibling: [u8; 32] = step[1..].try_into().ok()?;
        hash = match step[0] {
            0 => node(&sibling, &hash),
            1 => node(&hash, &sibling),
            _ => return None,
        };
    }
    Some((hash, signature.try_into().ok()?))
}

/// Checks a (possibly batched) signature value over `digest` with `key`.
pub fn verify(key: &VerifyingKey, digest: &[u8; 32], value: &[u8]) -> bool {
    root(digest, value).is_some_and(|(root, signature)| key.verify(&root, &signature))
}

/// Signs `digests` with one signature; returns each digest's signature value.
pub fn sign_all(key: &SigningKey, digests: &[[u8; 32]]) -> Vec<Vec<u8>> {
    if let [digest] = digests {
        return vec![key.sign(digest)];
    }
    // Build the tree level by level, from the digests up to the root.
    let mut levels: Vec<Vec<[u8; 32]>> = vec![digests.to_vec()];
    while levels.last().is_some_and(|l| l.len() > 1) {
        let below = levels.last().map(Vec::as_slice).unwrap_or_default();
        let above = below
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => node(left, right),
                // An odd node out is carried up as it is.
                _ => pair[0],
            })
            .collect();
        levels.push(above);
    }
    let root = levels
        .last()
        .and_then(|l| l.first())
        .copied()
        .unwrap_or_default();
    let signature = key.sign(&root);
    (0..digests.len())
        .map(|leaf| {
            let mut value = signature.clone();
            let mut index = leaf;
            for level in &levels[..levels.len() - 1] {
                let sibling = index ^ 1;
                if let Some(hash) = level.get(sibling) {
                    value.push(u8::from(sibling > index));
                    value.extend_from_slice(hash);
                }
                index /= 2;
            }
            value
        })
        .collect()
}

type Job = ([u8; 32], oneshot::Sender<Vec<u8>>);

/// Signs digests for concurrent callers, one signature per batch.
///
/// A task takes the first waiting digest, lets the other tasks ready to run
/// go (so that callers arriving together join), takes whatever else is
/// waiting up to [`MAX_BATCH`], and signs the lot. It gives them another
/// turn, up to a few, while each turn brings more. Alone, a caller waits only
/// for one turn of the scheduler; under load, batches grow with it.
#[derive(Debug, Clone)]
pub struct BatchSigner {
    key: Arc<SigningKey>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Times the signing task failed (panicked) and was started again.
    restarts: Arc<AtomicU64>,
}

impl BatchSigner {
    /// Starts the signing task on the current runtime.
    pub fn start(key: Arc<SigningKey>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let restarts = Arc::new(AtomicU64::new(0));
        tokio::spawn(supervise(key.clone(), rx, restarts.clone()));
        Self {
            key,
            jobs,
            restarts,
        }
    }

    /// How many times the signing task failed and was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The key signatures are made with.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Signs `digest`; returns the signature value (with its path).
    pub async fn sign(&self, digest: [u8; 32]) -> Vec<u8> {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send((digest, tx)).is_ok()
            && let Ok(value) = rx.await
        {
            return value;
        }
        // The task is gone (the runtime is shutting down), or failed while
        // holding this digest (it is started again): sign alone.
        self.key.sign(&digest)
    }
}

/// How many turns of the scheduler a batch may wait for more digests, as
/// long as each turn brings some.
const GATHER_ROUNDS: usize = 4;

/// Runs the signing task until every signer is dropped. Should it panic,
/// the callers of the batch it held sign alone (their replies are dropped),
/// the failure is counted and logged, and the task starts again on the same
/// queue, so batching never stops for good.
async fn supervise(
    key: Arc<SigningKey>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    restarts: Arc<AtomicU64>,
) {
    use futures_util::FutureExt;
    loop {
        let run = std::panic::AssertUnwindSafe(run(&key, &mut rx));
        let Err(panic) = run.catch_unwind().await else {
            return;
        };
        restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = crate::logging::panic_message(&*panic),
            "the batch signer failed; starting it again"
        );
    }
}

/// The signing task: one signature per batch of waiting digests. The number
/// waiting is bounded by the calls a server admits at once.
async fn run(key: &SigningKey, rx: &mut mpsc::UnboundedReceiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        for _ in 0..GATHER_ROUNDS {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if batch.len() == before || batch.len() == MAX_BATCH {
                break;
            }
        }
        let digests: Vec<[u8; 32]> = batch.iter().map(|(d, _)| *d).collect();
        #[cfg(test)]
        assert!(
            !digests.contains(&tests::FAILS),
            "injected batch signer failure"
        );
        let values = sign_all(key, &digests);
        for ((_, reply), value) in batch.drain(..).zip(values) {
            let _ = reply.send(value);
        }
    }
}

/// Batch roots whose signature was checked, so that the other messages of a
/// batch cost one path fold each. Holds at most `capacity` roots and starts
/// afresh when full (the batches in flight are then checked once more). A
/// root is remembered with the key and the signature that covered it, so only
/// the same signature by the same key matches.
#[derive(Debug)]
pub struct VerifiedRoots {
    capacity: usize,
    seen: Mutex<HashSet<[u8; 32]>>,
}

impl VerifiedRoots {
    /// Remembers up to `capacity` roots.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Checks `value` over `digest` with `key`, once per batch root.
    pub fn verify(&self, key: &VerifyingKey, digest: &[u8; 32], value: &[u8]) -> bool {
        let Some((root, signature)) = root(digest, value) else {
            return false;
        };
        if value.len() == SIGNATURE_LEN {
            // Not batched: nothing to share with other messages.
            return key.verify(&root, &signature);
        }
        let mut id = Vec::with_capacity(32 + 32 + SIGNATURE_LEN);
        id.extend_from_slice(&key.key_id().0);
        id.extend_from_slice(&root);
        id.extend_from_slice(&signature);
        let id = sha256(&id);
        if self.lock().contains(&id) {
            return true;
        }
        if !key.verify(&root, &signature) {
            return false;
        }
        let mut seen = self.lock();
        if seen.len() >= self.capacity {
            seen.clear();
        }
        seen.insert(id);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest the signing task fails on (in tests only).
    pub(super) const FAILS: [u8; 32] = [0xEE; 32];

    /// A signing task that fails is started again: the caller it held signs
    /// alone, and later callers are batched again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_signing_task_that_fails_is_started_again() {
        let (signer, verifier) = keys();
        let batch = BatchSigner::start(Arc::new(signer));
        let alone = batch.sign(FAILS).await;
        assert_eq!(alone.len(), SIGNATURE_LEN, "signed alone");
        assert!(verify(&verifier, &FAILS, &alone));
        let counted = async {
            while batch.restarts() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), counted)
            .await
            .expect("the failure is counted");
        let ds = digests(32);
        let values = futures_util::future::join_all(ds.iter().map(|d| batch.sign(*d))).await;
        for (d, v) in ds.iter().zip(&values) {
            assert!(verify(&verifier, d, v));
        }
        assert!(
            values.iter().any(|v| v.len() > SIGNATURE_LEN),
            "callers are batched again"
        );
        assert_eq!(batch.restarts(), 1);
    }

    fn keys() -> (SigningKey, VerifyingKey) {
        let (cert, key) = crate::pki::dev::signing_pair("batch").unwrap();
        (
            SigningKey::from_pkcs8(&key, &cert).unwrap(),
            VerifyingKey::from_cert(&cert).unwrap(),
        )
    }

    fn digests(n: usize) -> Vec<[u8; 32]> {
        (0..n).map(|i| sha256(&(i as u64).to_be_bytes())).collect()
    }

    #[test]
    fn every_member_of_every_batch_size_verifies() {
        let (signer, verifier) = keys();
        for n in [1, 2, 3, 5, 8, 13, 64, MAX_BATCH] {
            let ds = digests(n);
            let values = sign_all(&signer, &ds);
            assert_eq!(values.len(), n);
            for (d, v) in ds.iter().zip(&values) {
                assert!(verify(&verifier, d, v), "batch of {n}");
            }
            // All members of a batch share one signature over one root.
            let roots: HashSet<_> = ds.iter().zip(&values).map(|(d, v)| root(d, v)).collect();
            assert_eq!(roots.len(), 1, "batch of {n}");
        }
    }

    #[test]
    fn a_batch_of_one_is_a_plain_signature() {
        let (signer, verifier) = keys();
        let d = sha256(b"one");
        let values = sign_all(&signer, &[d]);
        assert_eq!(values[0], signer.sign(&d));
        assert!(verifier.verify(&d, &values[0]));
    }

    #[test]
    fn paths_cannot_be_moved_or_altered() {
        let (signer, verifier) = keys();
        let ds = digests(4);
        let values = sign_all(&signer, &ds);
        // Another member's path does not fit this digest.
        assert!(!verify(&verifier, &ds[0], &values[1]));
        // A digest not in the batch does not verify with any path.
        let stranger = sha256(b"stranger");
        assert!(values.iter().all(|v| !verify(&verifier, &stranger, v)));
        // A flipped side byte, a changed sibling, a truncated path, a bad side.
        for (at, bit) in [(64, 1u8), (70, 0x10), (64, 2)] {
            let mut bad = values[0].clone();
            bad[at] ^= bit;
            assert!(!verify(&verifier, &ds[0], &bad), "byte {at}");
        }
        assert!(!verify(
            &verifier,
            &ds[0],
            &values[0][..values[0].len() - 1]
        ));
        assert!(!verify(&verifier, &ds[0], &values[0][..64 + 33]));
    }

    #[test]
    fn remembered_roots_still_need_the_right_path_key_and_signature() {
        let (signer, verifier) = keys();
        let (_, other) = keys();
        let roots = VerifiedRoots::new(2);
        let ds = digests(3);
        let values = sign_all(&signer, &ds);
        assert!(roots.verify(&verifier, &ds[0], &values[0]));
        assert!(roots.verify(&verifier, &ds[1], &values[1]));
        assert!(!roots.verify(&verifier, &ds[2], &values[1]));
        assert!(!roots.verify(&other, &ds[2], &values[2]));
        let mut forged = values[2].clone();
        forged[0] ^= 1;
        assert!(!roots.verify(&verifier, &ds[2], &forged));
        // Capacity bounds what is remembered.
        for n in 0..5 {
            let ds = digests(2 + n);
            let vs = sign_all(&signer, &ds);
            assert!(roots.verify(&verifier, &ds[0], &vs[0]));
        }
        assert!(roots.lock().len() <= 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_signatures() {
        let (signer, verifier) = keys();
        let batcher = BatchSigner::start(Arc::new(signer));
        let ds = digests(200);
        let handles: Vec<_> = ds
            .iter()
            .map(|d| {
                let b = batcher.clone();
                let d = *d;
                tokio::spawn(async move { b.sign(d).await })
            })
            .collect();
        let mut signatures = HashSet::new();
        for (d, h) in ds.iter().zip(handles) {
            let value = h.await.unwrap();
            assert!(verify(&verifier, d, &value));
            signatures.insert(value[..SIGNATURE_LEN].to_vec());
        }
        assert!(
            signatures.len() < ds.len(),
            "200 concurrent callers made {} signatures",
            signatures.len()
        );
    }
}
