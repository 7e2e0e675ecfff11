//! A Merkle tree over the record hashes, as Certificate Transparency builds it
//! (RFC 6962, section 2.1; verification as in RFC 9162, sections 2.1.3.2 and
//! 2.1.4.2).
//!
//! The leaves are the records in sequence order; the leaf for a record is
//! `SHA-256(0x00 || record hash)` and an inner node is
//! `SHA-256(0x01 || left || right)`. The tree of `n` leaves splits at the
//! largest power of two below `n`. The root of the empty tree is `SHA-256("")`.
//!
//! - An *inclusion proof* shows that one record is leaf `i` of the tree whose
//!   root a signed checkpoint names, with about log2(n) hashes, so an auditor
//!   can check one citizen's record without reading the whole log.
//! - A *consistency proof* shows that the tree of an older checkpoint is a
//!   prefix of the tree of a newer one: nothing signed earlier was rewritten.
//! - A [`Frontier`] keeps the roots of the perfect subtrees of a growing tree
//!   (one per set bit of its size), so the writer extends the tree by one leaf
//!   in O(log n) and computes the root of everything so far at any moment.

use super::record::Hash;
use kopir_core::pki::sha256;

/// `SHA-256(0x00 || record_hash)`: the leaf of one record.
pub(crate) fn leaf_hash(record_hash: &Hash) -> Hash {
    let mut buf = [0u8; 33];
    buf[1..].copy_from_slice(record_hash);
    sha256(&buf)
}

/// `SHA-256(0x01 || left || right)`: an inner node.
pub(crate) fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = 1;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    sha256(&buf)
}

/// The root of the empty tree, `SHA-256("")`.
pub(crate) fn empty_root() -> Hash {
    sha256(b"")
}

/// The largest power of two strictly below `n` (for `n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root over `leaves` (leaf hashes, already passed through [`leaf_hash`]).
pub(crate) fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree over `leaves` (RFC 6962 `PATH`),
/// or `None` if `index` is outside the tree.
pub(crate) fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    path(index, leaves, &mut proof);
    Some(proof)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(root(&leaves[..k]));
    }
}

/// The consistency proof between the tree of the first `m` leaves and the tree
/// over all `leaves` (RFC 6962 `PROOF`), or `None` unless `0 < m <= n`.
pub(crate) fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m == 0 || m > leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    subproof(m, leaves, true, &mut proof);
    Some(proof)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            out.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], complete, out);
        out.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root(&leaves[..k]));
    }
}

/// Checks that `leaf` (a [`leaf_hash`]) is leaf `index` of the tree of `size`
/// leaves with root `root`.
pub(crate) fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks that the tree of `m` leaves with root `root_m` is a prefix of the
/// tree of `n` leaves with root `root_n`.
pub(crate) fn verify_consistency(
    m: u64,
    n: u64,
    root_m: &Hash,
    root_n: &Hash,
    proof: &[Hash],
) -> bool {
    if m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && root_m == root_n;
    }
    if m == 0 {
        // The empty tree is a prefix of every tree.
        return proof.is_empty() && *root_m == empty_root();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if m.is_power_of_two() {
        path.push(*root_m);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (m - 1, n - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *root_m && sr == *root_n && s == 0
}

/// Every level of a tree, bottom up, for many proofs over one tree: each
/// inclusion proof then costs O(log n). Level by level, pairs are hashed left
/// to right and a last odd node is carried up unchanged, which builds the
/// same tree as RFC 6962's split at the largest power of two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Levels {
    levels: Vec<Vec<Hash>>,
}

impl Levels {
    /// Builds every level over `leaves` (leaf hashes).
    pub(crate) fn build(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            let next = last
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    // The last, odd node (chunks are never empty).
                    _ => pair[0],
                })
                .collect();
            levels.push(next);
        }
        Self { levels }
    }

    /// Number of leaves.
    pub(crate) fn size(&self) -> u64 {
        self.levels.first().map(|l| l.len() as u64).unwrap_or(0)
    }

    /// The root.
    pub(crate) fn root(&self) -> Hash {
        match self.levels.last() {
            Some(top) if top.len() == 1 => top[0],
            _ => empty_root(),
        }
    }

    /// The inclusion proof of leaf `index` (the same as [`inclusion_proof`]).
    pub(crate) fn inclusion_proof(&self, index: usize) -> Option<Vec<Hash>> {
        if index as u64 >= self.size() {
            return None;
        }
        let mut proof = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = if i % 2 == 1 {
                Some(level[i - 1])
            } else {
                level.get(i + 1).copied()
            };
            proof.extend(sibling);
            i /= 2;
        }
        Some(proof)
    }
}

/// The right edge of a growing tree: the roots of its perfect subtrees, from
/// the largest (leftmost) to the smallest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// How many leaves the tree has.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Adds a leaf (a [`leaf_hash`]).
    pub(crate) fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            // A set low bit means a perfect subtree of that size is waiting on
            // the left: merge with it.
            if let Some(left) = self.peaks.pop() {
                h = node_hash(&left, &h);
            }
            s >>= 1;
        }
        self.peaks.push(h);
        self.size += 1;
    }

    /// Adds the leaf of a record with hash `record_hash`.
    pub(crate) fn push_record(&mut self, record_hash: &Hash) {
        self.push(leaf_hash(record_hash));
    }

    /// The root of the tree so far.
    pub(crate) fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        match iter.next() {
            None => empty_root(),
            Some(last) => iter.fold(*last, |r, p| node_hash(p, &r)),
        }
    }

    /// Serialises as the size (8 bytes, big-endian) and the peaks.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.peaks.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for p in &self.peaks {
            out.extend_from_slice(p);
        }
        out
    }

    /// Parses [`Frontier::encode`]'s output, checking the number of peaks.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (size, rest) = bytes.split_first_chunk::<8>()?;
        let size = u64::from_be_bytes(*size);
        if rest.len() % 32 != 0 || rest.len() / 32 != size.count_ones() as usize {
            return None;
        }
        let peaks = rest
            .chunks_exact(32)
            .map(|c| c.try_into().ok())
            .collect::<Option<Vec<Hash>>>()?;
        Some(Self { size, peaks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u32)
            .map(|i| leaf_hash(&sha256(&i.to_be_bytes())))
            .collect()
    }

    /// RFC 6962 MTH, written the plain way: split at the largest power of two
    /// below n, recurse.
    fn naive_root(d: &[Hash]) -> Hash {
        if d.is_empty() {
            return sha256(b"");
        }
        if d.len() == 1 {
            return d[0];
        }
        let mut k = 1;
        while k * 2 < d.len() {
            k *= 2;
        }
        node_hash(&naive_root(&d[..k]), &naive_root(&d[k..]))
    }

    #[test]
    fn roots_and_frontier_match_the_naive_definition() {
        assert_eq!(root(&[]), sha256(b""));
        let all = leaves(70);
        let mut f = Frontier::new();
        assert_eq!(f.root(), empty_root());
        for n in 1..=70 {
            f.push(all[n - 1]);
            let want = naive_root(&all[..n]);
            assert_eq!(root(&all[..n]), want, "root n={n}");
            assert_eq!(f.root(), want, "frontier n={n}");
            assert_eq!(f.size(), n as u64);
            let back = Frontier::decode(&f.encode()).unwrap();
            assert_eq!(back, f);
        }
        assert!(Frontier::decode(&[0, 0, 0, 0, 0, 0, 0, 3]).is_none());
    }

    #[test]
    fn every_inclusion_proof_verifies_and_tampering_fails() {
        let all = leaves(40);
        for n in 1..=40usize {
            let r = naive_root(&all[..n]);
            for i in 0..n {
                let proof = inclusion_proof(&all[..n], i).unwrap();
                assert!(
                    verify_inclusion(&all[i], i as u64, n as u64, &proof, &r),
                    "n={n} i={i}"
                );
                // The wrong leaf, index, size or root fails.
                let other = all[(i + 1) % n];
                if n > 1 {
                    assert!(!verify_inclusion(&other, i as u64, n as u64, &proof, &r));
                    assert!(!verify_inclusion(
                        &all[i],
                        ((i + 1) % n) as u64,
                        n as u64,
                        &proof,
                        &r
                    ));
                }
                // A size whose path has another shape fails (sizes with
                // the same shape cannot be told apart by the proof alone;
                // the signed checkpoint binds the size).
                if (n as u64).next_power_of_two() != n as u64 {
                    assert!(!verify_inclusion(
                        &all[i],
                        i as u64,
                        2 * n as u64,
                        &proof,
                        &r
                    ));
                }
                assert!(!verify_inclusion(&all[i], i as u64, n as u64, &proof, &all[0]) || n == 1);
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j][0] ^= 1;
                    assert!(!verify_inclusion(&all[i], i as u64, n as u64, &bad, &r));
                }
                let mut longer = proof.clone();
                longer.push(all[0]);
                assert!(!verify_inclusion(&all[i], i as u64, n as u64, &longer, &r));
            }
            assert!(inclusion_proof(&all[..n], n).is_none());
        }
    }

    #[test]
    fn levels_give_the_same_roots_and_proofs() {
        let all = leaves(40);
        assert_eq!(Levels::build(Vec::new()).root(), empty_root());
        for n in 1..=40usize {
            let levels = Levels::build(all[..n].to_vec());
            assert_eq!(levels.root(), naive_root(&all[..n]), "n={n}");
            for i in 0..n {
                assert_eq!(
                    levels.inclusion_proof(i),
                    inclusion_proof(&all[..n], i),
                    "n={n} i={i}"
                );
            }
            assert!(levels.inclusion_proof(n).is_none());
        }
    }

    /// RFC 6962 section 2.1.3's worked example: the tree of 7 leaves.
    #[test]
    fn proofs_have_the_shape_of_the_rfc_example() {
        let d = leaves(7);
        let (a, b, c) = (
            node_hash(&d[0], &d[1]),
            node_hash(&d[2], &d[3]),
            node_hash(&d[4], &d[5]),
        );
        let (i, j) = (node_hash(&a, &b), node_hash(&c, &d[6]));
        // PATH(d0) = [b, h, l] in RFC notation.
        assert_eq!(inclusion_proof(&d, 0).unwrap(), vec![d[1], b, j]);
        // PATH(d3) = [c, g, l].
        assert_eq!(inclusion_proof(&d, 3).unwrap(), vec![d[2], a, j]);
        // PATH(d4) = [f, j, k].
        assert_eq!(inclusion_proof(&d, 4).unwrap(), vec![d[5], d[6], i]);
        // PATH(d6) = [i, k].
        assert_eq!(inclusion_proof(&d, 6).unwrap(), vec![c, i]);
        // PROOF(3, D[7]) = [c, d, g, l].
        assert_eq!(consistency_proof(&d, 3).unwrap(), vec![d[2], d[3], a, j]);
        // PROOF(4, D[7]) = [l].
        assert_eq!(consistency_proof(&d, 4).unwrap(), vec![j]);
        // PROOF(6, D[7]) = [i, j, k].
        assert_eq!(consistency_proof(&d, 6).unwrap(), vec![c, d[6], i]);
    }

    #[test]
    fn every_consistency_proof_verifies_and_tampering_fails() {
        let all = leaves(40);
        for n in 1..=40usize {
            let rn = naive_root(&all[..n]);
            for m in 1..=n {
                let rm = naive_root(&all[..m]);
                let proof = consistency_proof(&all[..n], m).unwrap();
                assert!(
                    verify_consistency(m as u64, n as u64, &rm, &rn, &proof),
                    "m={m} n={n}"
                );
                if m < n {
                    // A different old root, new root, or proof hash fails.
                    let mut bad_m = rm;
                    bad_m[0] ^= 1;
                    assert!(!verify_consistency(m as u64, n as u64, &bad_m, &rn, &proof));
                    let mut bad_n = rn;
                    bad_n[0] ^= 1;
                    assert!(!verify_consistency(m as u64, n as u64, &rm, &bad_n, &proof));
                    for j in 0..proof.len() {
                        let mut bad = proof.clone();
                        bad[j][0] ^= 1;
                        assert!(
                            !verify_consistency(m as u64, n as u64, &rm, &rn, &bad),
                            "m={m} n={n} j={j}"
                        );
                    }
                    // A tree that rewrote leaf 0 is not consistent.
                    let mut forged = all[..n].to_vec();
                    forged[0][0] ^= 1;
                    let forged_root = naive_root(&forged);
                    let forged_proof = consistency_proof(&forged, m).unwrap();
                    assert!(!verify_consistency(
                        m as u64,
                        n as u64,
                        &rm,
                        &forged_root,
                        &forged_proof
                    ));
                    // Claiming the old tree is larger than the new fails.
                    assert!(!verify_consistency(
                        n as u64 + 1,
                        n as u64,
                        &rm,
                        &rn,
                        &proof
                    ));
                }
            }
            assert!(consistency_proof(&all[..n], 0).is_none());
            assert!(consistency_proof(&all[..n], n + 1).is_none());
        }
        assert!(verify_consistency(
            0,
            5,
            &empty_root(),
            &naive_root(&all[..5]),
            &[]
        ));
        assert!(!verify_consistency(3, 2, &all[0], &all[0], &[]));
    }
}
