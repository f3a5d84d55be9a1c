//! The crate against a naive reference written straight from RFC 6962 §2.1: recursive
//! MTH, PATH and SUBPROOF, and verifiers that retrace those recursions. The reference
//! hashes with `sha2` directly, so it shares no code with the crate.

// Helpers outside #[test] functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_tlog::{
    EMPTY_ROOT, Frontier, Hash, MemoryTree, NodeSource, VerifyError, consistency_proof,
    inclusion_proof, root, subtree_root, verify_consistency, verify_inclusion,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

// ---- The reference -------------------------------------------------------------------

fn ref_leaf(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

fn ref_node(l: &Hash, r: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

/// k: the largest power of two smaller than n (n > 1).
fn ref_k(n: u64) -> u64 {
    let mut k = 1;
    while k < n - k {
        k *= 2;
    }
    k
}

/// MTH(D[n]) over leaf hashes (MTH({d}) is the leaf hash of d).
fn mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => {
            let h: Hash = Sha256::digest([]).into();
            h
        }
        1 => d[0],
        n => {
            let k = ref_k(n as u64) as usize;
            ref_node(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

/// PATH(m, D[n]).
fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    let n = d.len();
    if n <= 1 {
        return vec![];
    }
    let k = ref_k(n as u64) as usize;
    let (mut p, sibling) = if m < k {
        (path(m, &d[..k]), mth(&d[k..]))
    } else {
        (path(m - k, &d[k..]), mth(&d[..k]))
    };
    p.push(sibling);
    p
}

/// SUBPROOF(m, D[n], b).
fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { vec![] } else { vec![mth(d)] };
    }
    let k = ref_k(n as u64) as usize;
    let (mut p, sibling) = if m <= k {
        (subproof(m, &d[..k], b), mth(&d[k..]))
    } else {
        (subproof(m - k, &d[k..], false), mth(&d[..k]))
    };
    p.push(sibling);
    p
}

/// PROOF(m, D[n]), empty for m = 0 and m = n as RFC 9162 has it.
fn proof(m: usize, d: &[Hash]) -> Vec<Hash> {
    if m == 0 || m == d.len() {
        vec![]
    } else {
        subproof(m, d, true)
    }
}

/// Retraces PATH: the root that `proof` gives for leaf `m` of a tree of `n` leaves, or
/// `None` when the proof does not have PATH's shape. The last hash is the top sibling.
fn root_from_path(m: u64, n: u64, leaf: &Hash, proof: &[Hash]) -> Option<Hash> {
    if n == 1 {
        return proof.is_empty().then_some(*leaf);
    }
    let (top, rest) = proof.split_last()?;
    let k = ref_k(n);
    Some(if m < k {
        ref_node(&root_from_path(m, k, leaf, rest)?, top)
    } else {
        ref_node(top, &root_from_path(m - k, n - k, leaf, rest)?)
    })
}

fn ref_verify_inclusion(leaf: &Hash, m: u64, n: u64, proof: &[Hash], root: &Hash) -> bool {
    m < n && root_from_path(m, n, leaf, proof).as_ref() == Some(root)
}

/// Retraces SUBPROOF(m, D[n], b): the (old, new) subtree roots that `proof` gives, where
/// the old tree's root, when the proof omits it, is `old_root`.
fn roots_from_subproof(
    m: u64,
    n: u64,
    b: bool,
    old_root: &Hash,
    proof: &[Hash],
) -> Option<(Hash, Hash)> {
    if m == n {
        return match (b, proof) {
            (true, []) => Some((*old_root, *old_root)),
            (false, [x]) => Some((*x, *x)),
            _ => None,
        };
    }
    let (top, rest) = proof.split_last()?;
    let k = ref_k(n);
    if m <= k {
        let (o, nn) = roots_from_subproof(m, k, b, old_root, rest)?;
        Some((o, ref_node(&nn, top)))
    } else {
        let (o, nn) = roots_from_subproof(m - k, n - k, false, old_root, rest)?;
        Some((ref_node(top, &o), ref_node(top, &nn)))
    }
}

fn ref_verify_consistency(m: u64, n: u64, r1: &Hash, r2: &Hash, proof: &[Hash]) -> bool {
    if m > n {
        return false;
    }
    if m == 0 || m == n {
        return proof.is_empty() && (m == 0 || r1 == r2);
    }
    roots_from_subproof(m, n, true, r1, proof) == Some((*r1, *r2))
}

// ---- Helpers ---------------------------------------------------------------------------

fn build(data: &[Vec<u8>]) -> (Vec<Hash>, MemoryTree) {
    let d: Vec<Hash> = data.iter().map(|x| ref_leaf(x)).collect();
    let mut t = MemoryTree::new();
    for l in &d {
        t.push(*l);
    }
    (d, t)
}

fn leaves(max: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 1..=max)
}

fn check_pair(d: &[Hash], t: &MemoryTree, m: usize, n: usize) {
    let r = mth(&d[..n]);
    let p = consistency_proof(t, m as u64, n as u64).unwrap();
    assert_eq!(p, proof(m, &d[..n]), "consistency {m} to {n}");
    let r1 = mth(&d[..m]);
    verify_consistency(m as u64, n as u64, &r1, &r, &p).unwrap();
    assert!(ref_verify_consistency(m as u64, n as u64, &r1, &r, &p));
    if m < n {
        let p = inclusion_proof(t, m as u64, n as u64).unwrap();
        assert_eq!(p, path(m, &d[..n]), "inclusion {m} in {n}");
        verify_inclusion(&d[m], m as u64, n as u64, &p, &r).unwrap();
        assert!(ref_verify_inclusion(&d[m], m as u64, n as u64, &p, &r));
    }
}

// ---- Tests -----------------------------------------------------------------------------

#[test]
fn reference_agrees_on_the_empty_root() {
    assert_eq!(mth(&[]), EMPTY_ROOT);
}

/// Every index, every pair of sizes, for every tree of up to 40 leaves.
#[test]
fn all_small_trees_exhaustively() {
    let data: Vec<Vec<u8>> = (0..40u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let (d, t) = build(&data);
    for n in 0..=d.len() {
        assert_eq!(root(&t, n as u64).unwrap(), mth(&d[..n]));
        for m in 0..=n {
            check_pair(&d, &t, m, n);
            assert_eq!(subtree_root(&t, m as u64, n as u64).unwrap(), mth(&d[m..n]));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random trees up to 300 leaves: every prefix root, every leaf's inclusion proof
    /// and every consistency proof into the whole tree equal the reference and verify;
    /// so do proofs between random pairs of smaller sizes.
    #[test]
    fn proofs_equal_the_reference(
        data in leaves(300),
        pairs in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 8),
    ) {
        let (d, t) = build(&data);
        let n = d.len();
        let mut f = Frontier::new();
        for i in 0..=n {
            let want = mth(&d[..i]);
            prop_assert_eq!(f.root(), want);
            prop_assert_eq!(t.root_at(i as u64), Some(want));
            if i < n {
                f.push(d[i], |_, _, _| {});
            }
        }
        for m in 0..=n {
            check_pair(&d, &t, m, n);
        }
        for (a, b) in pairs {
            let (a, b) = (a.index(n + 1), b.index(n + 1));
            check_pair(&d, &t, a.min(b), a.max(b));
        }
    }

    /// Every node the frontier reports is the MTH of the perfect range it names, and a
    /// frontier rebuilt from stored nodes at any size carries on exactly like the
    /// original.
    #[test]
    fn frontier_round_trips(data in leaves(300), cut in any::<prop::sample::Index>()) {
        let (d, t) = build(&data);
        let n = d.len();
        let cut = cut.index(n + 1);
        let mut f = Frontier::new();
        let mut nodes = Vec::new();
        for (i, l) in d.iter().enumerate() {
            if i == cut {
                prop_assert_eq!(Frontier::from_source(&t, cut as u64).unwrap(), f.clone());
            }
            f.push(*l, |level, index, hash| nodes.push((level, index, *hash)));
        }
        for &(level, index, hash) in &nodes {
            let start = (index << level) as usize;
            let end = ((index + 1) << level) as usize;
            prop_assert!(end <= n);
            prop_assert_eq!(hash, mth(&d[start..end]));
            prop_assert_eq!(t.node(level, index).unwrap(), hash);
        }
        // Each leaf completes one node per trailing one bit of its index, plus itself.
        let expected: usize = (0..n as u64).map(|i| 1 + i.trailing_ones() as usize).sum();
        prop_assert_eq!(nodes.len(), expected);

        let mut g = Frontier::from_source(&t, cut as u64).unwrap();
        let mut again = Vec::new();
        for l in &d[cut..] {
            g.push(*l, |level, index, hash| again.push((level, index, *hash)));
        }
        let tail: Vec<_> = nodes.iter().filter(|(l, i, _)| (i + 1) << l > cut as u64).copied().collect();
        prop_assert_eq!(again, tail);
        prop_assert_eq!(g.root(), f.root());
        prop_assert_eq!(g, f);
    }

    /// Flipping any bit of any proof hash, or changing the index, makes an inclusion proof
    /// fail. Another size may verify only where the reference verifier, retracing PATH,
    /// also accepts: the root is what binds the size (a checkpoint signs both together).
    #[test]
    fn mutated_inclusion_proofs_fail(
        data in leaves(200),
        index in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        byte in 0usize..32,
        other in any::<u64>(),
    ) {
        let (d, t) = build(&data);
        let n = d.len() as u64;
        let m = index.index(d.len()) as u64;
        let leaf = d[m as usize];
        let r = t.root();
        let p = inclusion_proof(&t, m, n).unwrap();
        prop_assert!(verify_inclusion(&leaf, m, n, &p, &r).is_ok());

        if !p.is_empty() {
            let mut q = p.clone();
            q[at.index(p.len())][byte] ^= 1 << bit;
            prop_assert_eq!(verify_inclusion(&leaf, m, n, &q, &r), Err(VerifyError::RootMismatch));
            let short = &p[..p.len() - 1];
            let got = verify_inclusion(&leaf, m, n, short, &r);
            let want = VerifyError::WrongProofLength { got: p.len() - 1, want: p.len() };
            prop_assert_eq!(got, Err(want));
        }
        let mut long = p.clone();
        long.push(r);
        prop_assert!(verify_inclusion(&leaf, m, n, &long, &r).is_err());
        let mut wrong_leaf = leaf;
        wrong_leaf[byte] ^= 1 << bit;
        prop_assert!(verify_inclusion(&wrong_leaf, m, n, &p, &r).is_err());

        // Another index fails, except where the RFC itself accepts it (equal leaves,
        // e.g. random data with a repeated entry, make mirrored paths hash alike): the
        // reference verifier is the judge, as for sizes below.
        for m2 in [m.wrapping_sub(1), m + 1, m ^ 2, m ^ (1 << bit), other % n, other] {
            if m2 != m {
                let ours = verify_inclusion(&leaf, m2, n, &p, &r).is_ok();
                prop_assert_eq!(ours, ref_verify_inclusion(&leaf, m2, n, &p, &r), "index {} for {}", m2, m);
            }
        }
        for n2 in [n - 1, n + 1, n * 2, n / 2, n ^ (1 << bit), other % (2 * n + 2), other] {
            let ours = verify_inclusion(&leaf, m, n2, &p, &r).is_ok();
            prop_assert_eq!(ours, ref_verify_inclusion(&leaf, m, n2, &p, &r), "size {} for {}", n2, n);
        }
    }

    /// The same for consistency proofs: any flipped bit, a dropped, added or duplicated
    /// hash, or swapped roots fail; other sizes verify only where the reference verifier,
    /// retracing SUBPROOF, also accepts.
    #[test]
    fn mutated_consistency_proofs_fail(
        data in leaves(200),
        old in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        byte in 0usize..32,
        other in any::<u64>(),
    ) {
        let (d, t) = build(&data);
        let n = d.len() as u64;
        prop_assume!(n >= 2);
        let m = 1 + old.index(d.len() - 1) as u64;
        let (r1, r2) = (mth(&d[..m as usize]), t.root());
        let p = consistency_proof(&t, m, n).unwrap();
        prop_assert!(verify_consistency(m, n, &r1, &r2, &p).is_ok());
        prop_assert!(!p.is_empty());

        let mut q = p.clone();
        q[at.index(p.len())][byte] ^= 1 << bit;
        prop_assert!(verify_consistency(m, n, &r1, &r2, &q).is_err());
        prop_assert!(verify_consistency(m, n, &r1, &r2, &p[1..]).is_err());
        prop_assert!(verify_consistency(m, n, &r1, &r2, &p[..p.len() - 1]).is_err());
        prop_assert!(verify_consistency(m, n, &r2, &r1, &p).is_err());
        let mut r1x = r1;
        r1x[byte] ^= 1 << bit;
        prop_assert!(verify_consistency(m, n, &r1x, &r2, &p).is_err());
        let mut r2x = r2;
        r2x[byte] ^= 1 << bit;
        prop_assert!(verify_consistency(m, n, &r1, &r2x, &p).is_err());
        for extra in [r1, r2, p[0]] {
            prop_assert!(verify_consistency(m, n, &r1, &r2, &[&[extra], p.as_slice()].concat()).is_err());
            prop_assert!(verify_consistency(m, n, &r1, &r2, &[p.as_slice(), &[extra]].concat()).is_err());
        }

        let sizes = [m - 1, m + 1, m ^ 2, m ^ (1 << bit), other % (n + 1), other];
        for m2 in sizes {
            let ours = verify_consistency(m2, n, &r1, &r2, &p).is_ok();
            prop_assert_eq!(ours, ref_verify_consistency(m2, n, &r1, &r2, &p), "old {} for {}", m2, m);
        }
        for n2 in [n - 1, n + 1, n * 2, n / 2, n ^ (1 << bit), other % (2 * n + 2), other] {
            let ours = verify_consistency(m, n2, &r1, &r2, &p).is_ok();
            prop_assert_eq!(ours, ref_verify_consistency(m, n2, &r1, &r2, &p), "new {} for {}", n2, n);
        }
    }
}
