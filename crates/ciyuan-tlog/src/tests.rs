//! Test vectors and property tests against a naive RFC 6962 reference.

use super::*;
use proptest::prelude::*;

fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

// The Certificate Transparency reference leaves and roots (RFC 6962 test data as published
// in certificate-transparency-go and transparency-dev/merkle testonly), used as data.
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
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn reference_tree() -> MemoryTree {
    let mut t = MemoryTree::new();
    for l in LEAVES {
        t.push(leaf_hash(&hex::decode(l).unwrap()));
    }
    t
}

#[test]
fn rfc6962_roots() {
    let t = reference_tree();
    assert_eq!(root(&t, 0).unwrap(), EMPTY_ROOT);
    for (n, want) in ROOTS.iter().enumerate() {
        assert_eq!(root(&t, n as u64 + 1).unwrap(), h(want), "size {}", n + 1);
    }
    assert_eq!(t.root(), h(ROOTS[7]));
}

#[test]
fn rfc6962_inclusion_vectors() {
    let t = reference_tree();
    let cases: [(u64, u64, &[&str]); 3] = [
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
        (0, 1, &[]),
    ];
    for (index, size, want) in cases {
        let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
        let got = inclusion_proof(&t, index, size).unwrap();
        assert_eq!(got, want, "inclusion {index} in {size}");
        let leaf = t.node(0, index).unwrap();
        verify_inclusion(&leaf, index, size, &got, &root(&t, size).unwrap()).unwrap();
    }
}

#[test]
fn rfc6962_consistency_vectors() {
    let t = reference_tree();
    let cases: [(u64, u64, &[&str]); 3] = [
        (
            2,
            8,
            &[
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
    ];
    for (old, new, want) in cases {
        let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
        let got = consistency_proof(&t, old, new).unwrap();
        assert_eq!(got, want, "consistency {old} to {new}");
        verify_consistency(
            old,
            new,
            &h(ROOTS[old as usize - 1]),
            &h(ROOTS[new as usize - 1]),
            &got,
        )
        .unwrap();
    }
    assert!(consistency_proof(&t, 0, 8).unwrap().is_empty());
    assert!(consistency_proof(&t, 8, 8).unwrap().is_empty());
    assert!(matches!(
        consistency_proof(&t, 9, 8),
        Err(ProofError::SizesOutOfOrder { .. })
    ));
    assert!(matches!(
        inclusion_proof(&t, 8, 8),
        Err(ProofError::IndexOutOfRange { .. })
    ));
}

// A naive reference straight from RFC 6962 §2.1: recursive MTH, PATH and SUBPROOF over a
// slice of leaf hashes.
fn mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => EMPTY_ROOT,
        1 => d[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    let n = d.len();
    if n <= 1 {
        return vec![];
    }
    let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    if m < k {
        let mut p = path(m, &d[..k]);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = path(m - k, &d[k..]);
        p.push(mth(&d[..k]));
        p
    }
}

fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { vec![] } else { vec![mth(d)] };
    }
    let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    if m <= k {
        let mut p = subproof(m, &d[..k], b);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = subproof(m - k, &d[k..], false);
        p.push(mth(&d[..k]));
        p
    }
}

fn leaves(n: usize, salt: u8) -> Vec<Hash> {
    (0..n)
        .map(|i| leaf_hash(&[salt, (i & 0xff) as u8, (i >> 8) as u8]))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn proofs_match_the_reference(n in 1usize..300, salt in any::<u8>()) {
        let d = leaves(n, salt);
        let mut t = MemoryTree::new();
        let mut f = Frontier::new();
        for (i, l) in d.iter().enumerate() {
            t.push(*l);
            f.push(*l, |_, _, _| {});
            prop_assert_eq!(f.root(), mth(&d[..=i]));
        }
        prop_assert_eq!(Frontier::from_source(&t, n as u64).unwrap(), f.clone());
        let r = mth(&d);
        prop_assert_eq!(t.root(), r);
        for m in 0..n {
            let p = inclusion_proof(&t, m as u64, n as u64).unwrap();
            prop_assert_eq!(&p, &path(m, &d));
            prop_assert!(verify_inclusion(&d[m], m as u64, n as u64, &p, &r).is_ok());
        }
        for m in 1..=n {
            let p = consistency_proof(&t, m as u64, n as u64).unwrap();
            let want = if m == n { vec![] } else { subproof(m, &d, true) };
            prop_assert_eq!(&p, &want);
            prop_assert!(verify_consistency(m as u64, n as u64, &mth(&d[..m]), &r, &p).is_ok());
        }
    }

    #[test]
    fn tampered_proofs_fail(n in 2usize..200, pick in any::<u64>(), byte in 0usize..32) {
        let d = leaves(n, 1);
        let mut t = MemoryTree::new();
        d.iter().for_each(|l| t.push(*l));
        let r = t.root();
        let m = (pick % n as u64) as usize;
        let p = inclusion_proof(&t, m as u64, n as u64).unwrap();
        // Another index, another leaf, a shorter or longer proof, a flipped bit. (Another
        // size can legitimately share the same path shape: the root is what binds it.)
        prop_assert!(verify_inclusion(&d[m], ((m + 1) % n) as u64, n as u64, &p, &r).is_err());
        prop_assert!(verify_inclusion(&leaf_hash(b"x"), m as u64, n as u64, &p, &r).is_err());
        if !p.is_empty() {
            prop_assert!(verify_inclusion(&d[m], m as u64, n as u64, &p[1..], &r).is_err());
            let mut q = p.clone();
            q[(pick as usize) % p.len()][byte] ^= 1;
            prop_assert!(verify_inclusion(&d[m], m as u64, n as u64, &q, &r).is_err());
        }
        let mut longer = p.clone();
        longer.push(r);
        prop_assert!(verify_inclusion(&d[m], m as u64, n as u64, &longer, &r).is_err());

        let old = 1 + (pick % (n as u64 - 1));
        let c = consistency_proof(&t, old, n as u64).unwrap();
        let old_root = root(&t, old).unwrap();
        prop_assert!(verify_consistency(old, n as u64, &old_root, &r, &c).is_ok());
        prop_assert!(verify_consistency(old, n as u64, &leaf_hash(b"x"), &r, &c).is_err());
        prop_assert!(verify_consistency(old, n as u64, &old_root, &leaf_hash(b"x"), &c).is_err());
        let mut q = c.clone();
        let at = (pick as usize) % q.len();
        q[at][byte] ^= 1;
        prop_assert!(verify_consistency(old, n as u64, &old_root, &r, &q).is_err());
        prop_assert!(verify_consistency(old, n as u64, &old_root, &r, &c[1..]).is_err());
    }
}

#[test]
fn frontier_reports_every_completed_node() {
    let mut f = Frontier::new();
    let mut seen = Vec::new();
    for i in 0..8u8 {
        f.push(leaf_hash(&[i]), |level, index, _| seen.push((level, index)));
    }
    assert_eq!(
        seen,
        [
            (0, 0),
            (0, 1),
            (1, 0),
            (0, 2),
            (0, 3),
            (1, 1),
            (2, 0),
            (0, 4),
            (0, 5),
            (1, 2),
            (0, 6),
            (0, 7),
            (1, 3),
            (2, 1),
            (3, 0)
        ]
    );
}

// The signed-note example of golang.org/x/mod/sumdb/note (its package documentation and
// tests), used as data: Ed25519 is deterministic, so signing must reproduce it exactly.
const GO_SKEY_B64: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

fn go_signer() -> NoteSigner {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(GO_SKEY_B64)
        .unwrap();
    assert_eq!(raw[0], 1);
    let seed: [u8; 32] = raw[1..].try_into().unwrap();
    NoteSigner::new("PeterNeumann", ed25519_dalek::SigningKey::from_bytes(&seed)).unwrap()
}

#[test]
fn signed_note_matches_go_reference() {
    let s = go_signer();
    assert_eq!(s.verifier_key(), GO_VKEY);
    assert_eq!(s.key_id(), 0xc74f20a3);
    assert_eq!(s.sign(GO_TEXT).unwrap(), GO_NOTE);
    let v = NoteVerifier::from_vkey(GO_VKEY).unwrap();
    assert_eq!(v.verify(GO_NOTE).unwrap(), GO_TEXT);
    // A signature by an unknown key is ignored; the known one still counts.
    let extra = format!(
        "{GO_NOTE}\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
    );
    assert_eq!(v.verify(&extra).unwrap(), GO_TEXT);
}

#[test]
fn signed_note_rejects_tampering() {
    let v = NoteVerifier::from_vkey(GO_VKEY).unwrap();
    let bytes = GO_NOTE.as_bytes();
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x20, 0x80] {
            let mut b = bytes.to_vec();
            b[i] ^= bit;
            if let Ok(s) = std::str::from_utf8(&b) {
                assert!(v.verify(s).is_err(), "flip {bit:#x} at {i} accepted");
            }
        }
    }
    assert!(
        NoteVerifier::from_vkey(
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        )
        .is_err()
    );
    assert!(
        NoteVerifier::from_vkey(
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        )
        .is_err()
    );
}

#[test]
fn checkpoints_round_trip_and_parse_strictly() {
    let c = Checkpoint {
        origin: "example.com/log".into(),
        size: 8,
        root: h(ROOTS[7]),
        extensions: vec![],
    };
    let text = c.to_text();
    assert_eq!(
        text,
        "example.com/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
    );
    assert_eq!(Checkpoint::parse(&text).unwrap(), c);
    let s = go_signer();
    let note = s.sign(&text).unwrap();
    let v = NoteVerifier::from_vkey(&s.verifier_key()).unwrap();
    assert_eq!(
        open_checkpoint(&v, &note, Some("example.com/log")).unwrap(),
        c
    );
    assert!(matches!(
        open_checkpoint(&v, &note, Some("other")),
        Err(NoteError::WrongOrigin { .. })
    ));
    for (bad, why) in [
        (
            "example.com/log\n08\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
            "size is not a decimal number",
        ),
        (
            "example.com/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyh=\n",
            "root is not canonical base64",
        ),
        (
            "example.com/log\n8\nXcnaeacGWamtVZy3Ad7Zoqudgjqt\n",
            "root is not 32 bytes",
        ),
        ("example.com/log\n8\n", "no root line"),
        (
            "\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
            "empty origin",
        ),
        (
            "example.com/log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
            "must end with a newline",
        ),
    ] {
        assert_eq!(
            Checkpoint::parse(bad).unwrap_err().to_string(),
            format!("malformed checkpoint: {why}"),
            "{bad:?}"
        );
    }
    assert!(s.sign("no newline").is_err());
    assert!(s.sign("a\n\nb\n").is_err());
}
