//! Inclusion and consistency proofs: made as RFC 6962 §2.1.1–2.1.2 define them, checked
//! with the RFC 9162 §2.1.3.2 and §2.1.4.2 algorithms.

use crate::{EMPTY_ROOT, Hash, NodeSource, node_hash};

/// Why a proof could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError<E> {
    /// The leaf index is not below the tree size.
    #[error("entry {index} is not in a tree of {size} entries")]
    IndexOutOfRange {
        /// Index asked for.
        index: u64,
        /// Tree size asked for.
        size: u64,
    },
    /// The old size exceeds the new one.
    #[error("cannot prove consistency from size {old} to the smaller size {new}")]
    SizesOutOfOrder {
        /// Old tree size.
        old: u64,
        /// New tree size.
        new: u64,
    },
    /// The node source failed.
    #[error("reading tree nodes: {0}")]
    Source(E),
}

/// Why a proof does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// An inclusion proof for an index that is not below the tree size.
    #[error("leaf index {index} is not below the tree size {size}")]
    IndexOutOfRange {
        /// Claimed leaf index.
        index: u64,
        /// Claimed tree size.
        size: u64,
    },
    /// A consistency proof whose old size exceeds its new size.
    #[error("old tree size {old} exceeds the new tree size {new}")]
    SizesOutOfOrder {
        /// Claimed old size.
        old: u64,
        /// Claimed new size.
        new: u64,
    },
    /// The proof does not have the number of hashes its sizes call for.
    #[error("the proof has {got} hashes where these sizes need {want}")]
    WrongProofLength {
        /// Hashes in the proof.
        got: usize,
        /// Hashes the sizes call for.
        want: usize,
    },
    /// The hashes do not lead to the given root (for a consistency proof: to both given
    /// roots). Either the claim is false or the proof is corrupt; a perfect old tree's
    /// root seeds the computation, so which root is wrong cannot always be told.
    #[error("the proof does not lead to the given root hash")]
    RootMismatch,
}

/// Largest power of two strictly below `n`, for `n >= 2`: RFC 6962's split point `k`.
#[inline]
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// `MTH(D[start:end])`, the RFC 6962 hash of a range of leaves; [`EMPTY_ROOT`] for an
/// empty range.
///
/// Perfect, aligned ranges are read from `src` as one node; other ranges follow the RFC's
/// split, so the ranges proofs use (a prefix, or a range starting on a multiple of a
/// power of two at least as large as its length) cost O(log n) reads.
pub fn subtree_root<S: NodeSource>(src: &S, start: u64, end: u64) -> Result<Hash, S::Error> {
    let len = end.saturating_sub(start);
    if len == 0 {
        return Ok(EMPTY_ROOT);
    }
    if len.is_power_of_two() && start & (len - 1) == 0 {
        return src.node(len.trailing_zeros(), start / len);
    }
    let k = split(len);
    let left = subtree_root(src, start, start + k)?;
    let right = subtree_root(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// Root of the tree of the first `size` leaves; [`EMPTY_ROOT`] for 0.
pub fn root<S: NodeSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    subtree_root(src, 0, size)
}

/// The audit path `PATH(index, D[size])` of RFC 6962 §2.1.1: sibling hashes from the leaf
/// up to the root.
pub fn inclusion_proof<S: NodeSource>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError<S::Error>> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::with_capacity(inclusion_len(index, size));
    // The RFC recursion, unrolled: siblings are found top-down and listed bottom-up.
    let (mut m, mut start, mut n) = (index, 0u64, size);
    while n > 1 {
        let k = split(n);
        let sibling = if m < k {
            let s = subtree_root(src, start + k, start + n);
            n = k;
            s
        } else {
            let s = subtree_root(src, start, start + k);
            m -= k;
            start += k;
            n -= k;
            s
        };
        proof.push(sibling.map_err(ProofError::Source)?);
    }
    proof.reverse();
    Ok(proof)
}

/// The consistency proof `PROOF(old, D[new])` of RFC 6962 §2.1.2. Empty when `old` is 0 or
/// equals `new`, as RFC 9162 §2.1.4.1 specifies.
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
    let mut proof = Vec::with_capacity(consistency_len(old, new));
    // SUBPROOF(m, D[start:start+n], complete), unrolled like the audit path.
    let (mut m, mut start, mut n, mut complete) = (old, 0u64, new, true);
    loop {
        if m == n {
            // While `complete`, this subtree is the whole old tree, whose root the
            // verifier already has; otherwise it must be sent.
            if !complete {
                proof.push(subtree_root(src, start, start + n).map_err(ProofError::Source)?);
            }
            break;
        }
        let k = split(n);
        let hash = if m <= k {
            let h = subtree_root(src, start + k, start + n);
            n = k;
            h
        } else {
            let h = subtree_root(src, start, start + k);
            m -= k;
            start += k;
            n -= k;
            complete = false;
            h
        };
        proof.push(hash.map_err(ProofError::Source)?);
    }
    proof.reverse();
    Ok(proof)
}

/// The RFC 9162 walk shared by both verifiers: from `(fn, sn)`, how many proof hashes
/// are consumed before `sn` reaches 0. Counting first lets the verifiers reject a proof
/// of the wrong length before hashing anything, with an error that says so.
fn walk_len(mut fn_: u64, mut sn: u64) -> usize {
    let mut n = 0;
    while sn != 0 {
        if fn_ & 1 == 1 || fn_ == sn {
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        }
        fn_ >>= 1;
        sn >>= 1;
        n += 1;
    }
    n
}

fn inclusion_len(index: u64, size: u64) -> usize {
    walk_len(index, size - 1)
}

/// Length of the consistency proof for `0 < old < new`.
fn consistency_len(old: u64, new: u64) -> usize {
    let shift = (old - 1).trailing_ones();
    let seed = usize::from(!old.is_power_of_two());
    seed + walk_len((old - 1) >> shift, (new - 1) >> shift)
}

/// Checks that `leaf` is the leaf hash at `index` in the tree of `size` leaves with
/// root `root`, per RFC 9162 §2.1.3.2.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    let want = inclusion_len(index, size);
    if proof.len() != want {
        return Err(VerifyError::WrongProofLength {
            got: proof.len(),
            want,
        });
    }
    // The length check above guarantees the walk ends exactly as the proof does.
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
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
    if &r != root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the
/// tree of `new_size` leaves with root `new_root`, per RFC 9162 §2.1.4.2.
///
/// Equal sizes need an empty proof and equal roots. Every tree extends the empty one, so
/// `old_size == 0` needs only an empty proof.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    let (old, new) = (old_size, new_size);
    if old > new {
        return Err(VerifyError::SizesOutOfOrder { old, new });
    }
    if old == 0 || old == new {
        if !proof.is_empty() {
            return Err(VerifyError::WrongProofLength {
                got: proof.len(),
                want: 0,
            });
        }
        if old == new && old_root != new_root {
            return Err(VerifyError::RootMismatch);
        }
        return Ok(());
    }
    let want = consistency_len(old, new);
    if proof.len() != want {
        return Err(VerifyError::WrongProofLength {
            got: proof.len(),
            want,
        });
    }
    // A perfect old tree is a node of the new one, so its root starts the walk and the
    // proof leaves it out.
    let (seed, path) = match proof.split_first() {
        Some((first, rest)) if !old.is_power_of_two() => (*first, rest),
        _ => (*old_root, proof),
    };
    let shift = (old - 1).trailing_ones();
    let (mut fn_, mut sn) = ((old - 1) >> shift, (new - 1) >> shift);
    let (mut fr, mut sr) = (seed, seed);
    for c in path {
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
    if &fr != old_root || &sr != new_root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}
