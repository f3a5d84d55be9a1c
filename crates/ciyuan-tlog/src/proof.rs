//! Inclusion and consistency proofs (RFC 6962 §2.1.1–2.1.2, verified as in RFC 9162).

use crate::{EMPTY_ROOT, Hash, NodeSource, node_hash};

/// Why a proof could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError<E> {
    /// The leaf index is not below the tree size.
    #[error("entry {index} is not in a tree of {size} entries")]
    IndexOutOfRange {
        /// Index asked for.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// The old size exceeds the new one.
    #[error("cannot prove consistency from size {old} to the smaller size {new}")]
    SizesOutOfOrder {
        /// Old size.
        old: u64,
        /// New size.
        new: u64,
    },
    /// The node source failed.
    #[error("reading tree nodes: {0}")]
    Source(E),
}

/// Why a proof does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Index not below size, or sizes out of order.
    #[error("the sizes or index of the proof are out of range")]
    OutOfRange,
    /// The proof has the wrong number of hashes.
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    /// The hashes lead to a different root.
    #[error("the proof leads to a different root")]
    RootMismatch,
}

/// Largest power of two strictly below `n` (n >= 2): RFC 6962's split point.
#[inline]
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start..end]): the RFC 6962 hash of a range of leaves. Aligned perfect ranges
/// come straight from `src`; others follow the RFC's split.
pub fn subtree_root<S: NodeSource>(src: &S, start: u64, end: u64) -> Result<Hash, S::Error> {
    let len = end.saturating_sub(start);
    if len == 0 {
        return Ok(EMPTY_ROOT);
    }
    if len.is_power_of_two() && start.is_multiple_of(len) {
        return src.node(len.trailing_zeros(), start / len);
    }
    let k = split(len);
    let left = subtree_root(src, start, start + k)?;
    let right = subtree_root(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// Root of the tree of the first `size` leaves.
pub fn root<S: NodeSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    subtree_root(src, 0, size)
}

/// The audit path of leaf `index` in the tree of `size` leaves, leaf end first.
pub fn inclusion_proof<S: NodeSource>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::with_capacity(64 - size.leading_zeros() as usize);
    let (mut m, mut start, mut n) = (index, 0u64, size);
    while n > 1 {
        let k = split(n);
        if m < k {
            proof.push(subtree_root(src, start + k, start + n).map_err(ProofError::Source)?);
            n = k;
        } else {
            proof.push(subtree_root(src, start, start + k).map_err(ProofError::Source)?);
            m -= k;
            start += k;
            n -= k;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The consistency proof from the tree of `old` leaves to the tree of `new` leaves.
/// Empty when `old` is 0 or equals `new`.
pub fn consistency_proof<S: NodeSource>(
    src: &S,
    old: u64,
    new: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if old > new {
        return Err(ProofError::SizesOutOfOrder { old, new });
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[start..start+n], b), unrolled: hashes are found top-down and the
    // proof lists them bottom-up.
    let mut proof = Vec::with_capacity(2 * (64 - new.leading_zeros() as usize));
    let (mut m, mut start, mut n, mut complete) = (old, 0u64, new, true);
    loop {
        if m == n {
            if !complete {
                proof.push(subtree_root(src, start, start + n).map_err(ProofError::Source)?);
            }
            break;
        }
        let k = split(n);
        if m <= k {
            proof.push(subtree_root(src, start + k, start + n).map_err(ProofError::Source)?);
            n = k;
        } else {
            proof.push(subtree_root(src, start, start + k).map_err(ProofError::Source)?);
            m -= k;
            start += k;
            n -= k;
            complete = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves with root `root`.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    if index >= size {
        return Err(VerifyError::OutOfRange);
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(VerifyError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::WrongLength);
    }
    if &r != root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old` leaves with root `old_root` is a prefix of the tree of
/// `new` leaves with root `new_root`.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    if old > new {
        return Err(VerifyError::OutOfRange);
    }
    if old == new {
        if !proof.is_empty() {
            return Err(VerifyError::WrongLength);
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(VerifyError::RootMismatch)
        };
    }
    if old == 0 {
        // Every tree extends the empty one; RFC 9162 defines no proof for it.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(VerifyError::WrongLength)
        };
    }
    if proof.is_empty() {
        return Err(VerifyError::WrongLength);
    }
    let mut path = proof;
    let first;
    if old.is_power_of_two() {
        first = *old_root;
    } else {
        first = path[0];
        path = &path[1..];
    }
    let (mut fn_, mut sn) = (old - 1, new - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in path {
        if sn == 0 {
            return Err(VerifyError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::WrongLength);
    }
    if &fr != old_root || &sr != new_root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}
