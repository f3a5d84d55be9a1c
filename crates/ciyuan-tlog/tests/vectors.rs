//! Published RFC 6962 test vectors.
//!
//! The leaves, roots, node hashes, compact ranges and proofs below are the Certificate
//! Transparency reference data set, as published in the Go repository
//! transparency-dev/merkle: `testonly/constants.go` (leaf inputs, node hashes, root
//! hashes, compact trees) and `proof/verify_test.go` (inclusion and consistency proofs,
//! and the table of degenerate consistency cases). The same data appears in
//! certificate-transparency-go's merkletree tests. The probes that corrupt a good proof
//! follow the list in `proof/verify_test.go`, rewritten here.

// Helpers outside #[test] functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_tlog::{
    EMPTY_ROOT, Frontier, Hash, MemoryTree, NodeSource, ProofError, VerifyError, consistency_proof,
    inclusion_proof, leaf_hash, root, verify_consistency, verify_inclusion,
};
use std::cell::RefCell;
use std::convert::Infallible;

fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

const LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Roots by tree size, from 0.
const ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// Every perfect subtree of the 8-leaf tree: `NODES[level][index]`.
const NODES: [&[&str]; 4] = [
    &[
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    &[
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    &[
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
];

/// The compact range (`CompactTrees` in constants.go) of each tree size, from 0, as
/// `(level, index)` into [`NODES`], largest subtree first.
const COMPACT: [&[(u32, u64)]; 9] = [
    &[],
    &[(0, 0)],
    &[(1, 0)],
    &[(1, 0), (0, 2)],
    &[(2, 0)],
    &[(2, 0), (0, 4)],
    &[(2, 0), (1, 2)],
    &[(2, 0), (1, 2), (0, 6)],
    &[(3, 0)],
];

/// Inclusion proofs as `(index, size, proof)`. verify_test.go numbers leaves from 1;
/// these indices are 0-based.
const INCLUSION: [(u64, u64, &[&str]); 5] = [
    (0, 1, &[]),
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

/// Consistency proofs as `(old size, new size, proof)`.
const CONSISTENCY: [(u64, u64, &[&str]); 5] = [
    (1, 1, &[]),
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
];

fn hashes(list: &[&str]) -> Vec<Hash> {
    list.iter().map(|s| h(s)).collect()
}

fn tree() -> MemoryTree {
    let mut t = MemoryTree::new();
    for l in LEAVES {
        t.push(leaf_hash(&hex::decode(l).unwrap()));
    }
    t
}

/// A node source that logs what it is asked for.
struct Recording<'a> {
    inner: &'a MemoryTree,
    asked: RefCell<Vec<(u32, u64)>>,
}

impl NodeSource for Recording<'_> {
    type Error = Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Infallible> {
        self.asked.borrow_mut().push((level, index));
        self.inner.node(level, index)
    }
}

#[test]
fn empty_root_is_sha256_of_nothing() {
    assert_eq!(EMPTY_ROOT, h(ROOTS[0]));
    assert_eq!(Frontier::new().root(), EMPTY_ROOT);
    assert_eq!(MemoryTree::new().root(), EMPTY_ROOT);
}

#[test]
fn roots_of_every_size() {
    let t = tree();
    let mut f = Frontier::new();
    for (size, want) in ROOTS.iter().enumerate() {
        let want = h(want);
        assert_eq!(root(&t, size as u64).unwrap(), want, "size {size}");
        assert_eq!(t.root_at(size as u64), Some(want), "size {size}");
        assert_eq!(f.root(), want, "frontier at size {size}");
        if let Some(l) = LEAVES.get(size) {
            f.push(leaf_hash(&hex::decode(l).unwrap()), |_, _, _| {});
        }
    }
    assert_eq!(t.root(), h(ROOTS[8]));
    assert_eq!(t.root_at(9), None);
}

#[test]
fn every_perfect_subtree() {
    let t = tree();
    let mut want = Vec::new();
    for (level, row) in NODES.iter().enumerate() {
        for (index, hash) in row.iter().enumerate() {
            assert_eq!(t.node(level as u32, index as u64).unwrap(), h(hash));
            want.push((level as u32, index as u64, h(hash)));
        }
    }
    // The frontier reports each of them exactly once, as it completes.
    let mut seen = Vec::new();
    let mut f = Frontier::new();
    for l in LEAVES {
        f.push(leaf_hash(&hex::decode(l).unwrap()), |level, index, hash| {
            seen.push((level, index, *hash));
        });
    }
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn compact_ranges() {
    let t = tree();
    let mut f = Frontier::new();
    for (size, want) in COMPACT.iter().enumerate() {
        let rec = Recording {
            inner: &t,
            asked: RefCell::new(Vec::new()),
        };
        let rebuilt = Frontier::from_source(&rec, size as u64).unwrap();
        assert_eq!(rec.asked.into_inner(), *want, "size {size}");
        assert_eq!(rebuilt, f, "size {size}");
        assert_eq!(rebuilt.root(), h(ROOTS[size]));
        if let Some(l) = LEAVES.get(size) {
            f.push(leaf_hash(&hex::decode(l).unwrap()), |_, _, _| {});
        }
    }
}

#[test]
fn inclusion_proofs() {
    let t = tree();
    for (index, size, want) in INCLUSION {
        let want = hashes(want);
        assert_eq!(
            inclusion_proof(&t, index, size).unwrap(),
            want,
            "{index} in {size}"
        );
        let leaf = t.leaf(index).unwrap();
        verify_inclusion(&leaf, index, size, &want, &h(ROOTS[size as usize])).unwrap();
    }
    // verify_test.go's first vector: no leaf is in the empty tree.
    assert_eq!(
        inclusion_proof(&t, 0, 0),
        Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
    );
}

#[test]
fn consistency_proofs() {
    let t = tree();
    for (old, new, want) in CONSISTENCY {
        let want = hashes(want);
        assert_eq!(
            consistency_proof(&t, old, new).unwrap(),
            want,
            "{old} to {new}"
        );
        let (r1, r2) = (h(ROOTS[old as usize]), h(ROOTS[new as usize]));
        verify_consistency(old, new, &r1, &r2, &want).unwrap();
    }
    for new in 0..=8 {
        assert_eq!(consistency_proof(&t, 0, new).unwrap(), Vec::<Hash>::new());
        assert_eq!(consistency_proof(&t, new, new).unwrap(), Vec::<Hash>::new());
    }
    assert_eq!(
        consistency_proof(&t, 5, 4),
        Err(ProofError::SizesOutOfOrder { old: 5, new: 4 })
    );
}

fn some_hash() -> Hash {
    h("abacaba000000000000000000000000000000000000000000060061e00123456")
}

fn with(proof: &[Hash], front: &[Hash], back: &[Hash]) -> Vec<Hash> {
    [front, proof, back].concat()
}

#[test]
fn corrupted_inclusion_proofs_fail() {
    for (index, size, proof) in INCLUSION {
        let proof = hashes(proof);
        let root = h(ROOTS[size as usize]);
        let leaf = leaf_hash(&hex::decode(LEAVES[index as usize]).unwrap());
        verify_inclusion(&leaf, index, size, &proof, &root).unwrap();

        let mut probes: Vec<(u64, u64, Hash, Hash, Vec<Hash>, String)> = vec![
            (
                index.wrapping_sub(1),
                size,
                leaf,
                root,
                proof.clone(),
                "index - 1".into(),
            ),
            (
                index + 1,
                size,
                leaf,
                root,
                proof.clone(),
                "index + 1".into(),
            ),
            (
                index ^ 2,
                size,
                leaf,
                root,
                proof.clone(),
                "index ^ 2".into(),
            ),
            (
                index,
                size * 2,
                leaf,
                root,
                proof.clone(),
                "size * 2".into(),
            ),
            (
                index,
                size / 2,
                leaf,
                root,
                proof.clone(),
                "size / 2".into(),
            ),
            (
                index,
                size,
                leaf_hash(b"WrongLeaf"),
                root,
                proof.clone(),
                "wrong leaf".into(),
            ),
            (
                index,
                size,
                leaf,
                EMPTY_ROOT,
                proof.clone(),
                "empty root".into(),
            ),
            (
                index,
                size,
                leaf,
                some_hash(),
                proof.clone(),
                "random root".into(),
            ),
            (
                index,
                size,
                leaf,
                root,
                with(&proof, &[], &[root]),
                "trailing root".into(),
            ),
            (
                index,
                size,
                leaf,
                root,
                with(&proof, &[root], &[]),
                "preceding root".into(),
            ),
        ];
        for i in 0..proof.len() {
            let mut p = proof.clone();
            p[i][0] ^= 8;
            probes.push((index, size, leaf, root, p, format!("proof[{i}] bit 3")));
        }
        if let Some((_, rest)) = proof.split_last() {
            probes.push((index, size, leaf, root, rest.to_vec(), "removed".into()));
        }
        if proof.len() > 1 {
            let p = with(&proof[1..], &[proof[0], some_hash()], &[]);
            probes.push((index, size, leaf, root, p, "inserted".into()));
        }
        for (i, n, l, r, p, what) in probes {
            assert!(
                verify_inclusion(&l, i, n, &p, &r).is_err(),
                "{what} accepted for {index} in {size}"
            );
        }
    }
}

#[test]
fn corrupted_consistency_proofs_fail() {
    for (old, new, proof) in CONSISTENCY {
        if proof.is_empty() {
            continue;
        }
        let proof = hashes(proof);
        let (r1, r2) = (h(ROOTS[old as usize]), h(ROOTS[new as usize]));
        let wrong = leaf_hash(b"WrongRoot");
        let mut probes: Vec<(u64, u64, Hash, Hash, Vec<Hash>, String)> = vec![
            (old - 1, new, r1, r2, proof.clone(), "old - 1".into()),
            (old + 1, new, r1, r2, proof.clone(), "old + 1".into()),
            (old ^ 2, new, r1, r2, proof.clone(), "old ^ 2".into()),
            (old, new * 2, r1, r2, proof.clone(), "new * 2".into()),
            (old, new / 2, r1, r2, proof.clone(), "new / 2".into()),
            (old, new, wrong, r2, proof.clone(), "wrong old root".into()),
            (old, new, r1, wrong, proof.clone(), "wrong new root".into()),
            (old, new, r2, r1, proof.clone(), "swapped roots".into()),
            (old, new, r1, r2, vec![], "empty proof".into()),
            (
                old,
                new,
                r1,
                r2,
                with(&proof, &[], &[r1]),
                "trailing old root".into(),
            ),
            (
                old,
                new,
                r1,
                r2,
                with(&proof, &[], &[r2]),
                "trailing new root".into(),
            ),
            (
                old,
                new,
                r1,
                r2,
                with(&proof, &[r1], &[]),
                "preceding old root".into(),
            ),
            (
                old,
                new,
                r1,
                r2,
                with(&proof, &[r2], &[]),
                "preceding new root".into(),
            ),
            (
                old,
                new,
                r1,
                r2,
                with(&proof, &[proof[0]], &[]),
                "preceding proof[0]".into(),
            ),
            (
                old,
                new,
                r1,
                r2,
                proof[..proof.len() - 1].to_vec(),
                "truncated".into(),
            ),
        ];
        for i in 0..proof.len() {
            let mut p = proof.clone();
            p[i][0] ^= 16;
            probes.push((old, new, r1, r2, p, format!("proof[{i}] bit 4")));
        }
        for (m, n, a, b, p, what) in probes {
            assert!(
                verify_consistency(m, n, &a, &b, &p).is_err(),
                "{what} accepted for {old} to {new}"
            );
        }
    }
}

#[test]
fn degenerate_consistency_cases() {
    // The table of TestVerifyConsistency: (old, new, old root, new root, proof, ok).
    let (r1, r2) = (leaf_hash(b"don't care 1"), leaf_hash(b"don't care 2"));
    let e = EMPTY_ROOT;
    type Case<'a> = (u64, u64, Hash, Hash, &'a [Hash], bool);
    let cases: [Case; 13] = [
        (0, 0, r1, r2, &[], false),
        (1, 1, r1, r2, &[], false),
        (0, 0, r1, r1, &[], true),
        (0, 1, r1, r2, &[], true),
        (1, 1, r2, r2, &[], true),
        (1, 0, r1, r2, &[], false),
        (2, 1, r1, r2, &[], false),
        (1, 2, r1, r2, &[], false),
        (0, 0, e, r2, &[], false),
        (1, 1, e, r2, &[], false),
        (0, 0, e, e, &[e], false),
        (0, 1, e, e, &[e], false),
        (1, 1, e, e, &[e], false),
    ];
    for (old, new, a, b, proof, ok) in cases {
        assert_eq!(
            verify_consistency(old, new, &a, &b, proof).is_ok(),
            ok,
            "{old} to {new}"
        );
    }
}

#[test]
fn degenerate_inclusion_cases() {
    // TestVerifyInclusion and TestVerifyInclusionSingleEntry.
    for (index, size) in [(0, 0), (0, 1), (1, 0), (2, 1)] {
        assert!(verify_inclusion(&some_hash(), index, size, &[], &EMPTY_ROOT).is_err());
    }
    let hash = leaf_hash(b"data");
    verify_inclusion(&hash, 0, 1, &[], &hash).unwrap();
    assert!(verify_inclusion(&hash, 0, 1, &[], &EMPTY_ROOT).is_err());
    assert!(verify_inclusion(&EMPTY_ROOT, 0, 1, &[], &hash).is_err());
}

#[test]
fn verify_errors_say_what_is_wrong() {
    let (index, size, proof) = INCLUSION[1];
    let proof = hashes(proof);
    let root = h(ROOTS[8]);
    let leaf = leaf_hash(&[]);
    let cases = [
        (
            verify_inclusion(&leaf, 8, 8, &proof, &root),
            VerifyError::IndexOutOfRange { index: 8, size: 8 },
            "leaf index 8 is not below the tree size 8",
        ),
        (
            verify_inclusion(&leaf, index, size, &proof[..2], &root),
            VerifyError::WrongProofLength { got: 2, want: 3 },
            "the proof has 2 hashes where these sizes need 3",
        ),
        (
            verify_inclusion(&leaf, index, size, &proof, &EMPTY_ROOT),
            VerifyError::RootMismatch,
            "the proof does not lead to the given root hash",
        ),
        (
            verify_consistency(3, 2, &root, &root, &[]),
            VerifyError::SizesOutOfOrder { old: 3, new: 2 },
            "old tree size 3 exceeds the new tree size 2",
        ),
        (
            verify_consistency(0, 8, &EMPTY_ROOT, &root, &proof),
            VerifyError::WrongProofLength { got: 3, want: 0 },
            "the proof has 3 hashes where these sizes need 0",
        ),
        (
            verify_consistency(1, 8, &EMPTY_ROOT, &root, &proof),
            VerifyError::RootMismatch,
            "the proof does not lead to the given root hash",
        ),
        (
            verify_consistency(6, 8, &EMPTY_ROOT, &root, &hashes(CONSISTENCY[2].2)),
            VerifyError::RootMismatch,
            "the proof does not lead to the given root hash",
        ),
    ];
    for (got, want, message) in cases {
        assert_eq!(got, Err(want));
        assert_eq!(want.to_string(), message);
    }
    assert_eq!(
        ProofError::<Infallible>::IndexOutOfRange { index: 9, size: 8 }.to_string(),
        "entry 9 is not in a tree of 8 entries"
    );
    assert_eq!(
        ProofError::<Infallible>::SizesOutOfOrder { old: 9, new: 8 }.to_string(),
        "cannot prove consistency from size 9 to the smaller size 8"
    );
    assert_eq!(
        ProofError::Source("disk on fire").to_string(),
        "reading tree nodes: disk on fire"
    );
}

#[test]
fn memory_tree_outside_its_size() {
    let t = tree();
    assert_eq!(t.size(), 8);
    assert_eq!(t.leaf(8), None);
    assert_eq!(t.root_at(9), None);
    // Breaking the NodeSource contract yields a hash no proof can verify with.
    assert_eq!(t.node(3, 1).unwrap(), [0; 32]);
    assert_eq!(t.node(40, 0).unwrap(), [0; 32]);
}
