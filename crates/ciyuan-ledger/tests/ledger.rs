//! The ledger against an in-memory model, through crashes, reopenings and tampering.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_ledger::{
    GroupCommitter, Ledger, LedgerError, LedgerOptions, export_bundle, verify_path,
};
use ciyuan_tlog::{MemoryTree, leaf_hash, verify_consistency, verify_inclusion};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn opts() -> LedgerOptions {
    LedgerOptions {
        origin: Some("test.ledger".into()),
        ..LedgerOptions::default()
    }
}

fn small_segments() -> LedgerOptions {
    LedgerOptions {
        segment_max_bytes: 300,
        ..opts()
    }
}

fn entry(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 23)).into_bytes()
}

fn tree_of(entries: &[Vec<u8>]) -> MemoryTree {
    let mut t = MemoryTree::new();
    for e in entries {
        t.push(leaf_hash(e));
    }
    t
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

fn check_matches(l: &Ledger, model: &[Vec<u8>]) {
    let r = l.reader();
    assert_eq!(r.size(), model.len() as u64);
    let t = tree_of(model);
    assert_eq!(r.root(), t.root());
    for (i, e) in model.iter().enumerate() {
        assert_eq!(&r.entry(i as u64).unwrap(), e, "entry {i}");
    }
}

#[test]
fn torn_tail_at_every_byte_is_cut_and_nothing_durable_is_lost() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    let entries: Vec<Vec<u8>> = (0..8).map(entry).collect();
    let durable_len;
    {
        let mut l = Ledger::open(&src, opts()).unwrap();
        l.append_batch(&entries[..5]).unwrap();
        durable_len = std::fs::metadata(last_segment(&src)).unwrap().len();
        l.append_batch(&entries[5..]).unwrap();
    }
    let full_len = std::fs::metadata(last_segment(&src)).unwrap().len();
    let record_ends: Vec<u64> = {
        let mut at = durable_len;
        entries[5..]
            .iter()
            .map(|e| {
                at += 16 + e.len() as u64;
                at
            })
            .collect()
    };
    for cut in durable_len..=full_len {
        let dir = base.path().join(format!("cut{cut}"));
        copy_dir(&src, &dir);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(last_segment(&dir))
            .unwrap();
        f.set_len(cut).unwrap();
        let complete = 5 + record_ends.iter().filter(|&&end| end <= cut).count();
        let mut l = Ledger::open(&dir, opts()).unwrap();
        check_matches(&l, &entries[..complete]);
        // The ledger goes on appending after recovery, and reopens cleanly.
        l.append_batch(&[b"after".to_vec()]).unwrap();
        drop(l);
        let l = Ledger::open(&dir, opts()).unwrap();
        let mut model = entries[..complete].to_vec();
        model.push(b"after".to_vec());
        check_matches(&l, &model);
        drop(l);
        verify_path(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn garbage_tail_is_cut_but_damage_before_valid_records_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("l");
    let entries: Vec<Vec<u8>> = (0..6).map(entry).collect();
    drop({
        let mut l = Ledger::open(&dir, opts()).unwrap();
        l.append_batch(&entries).unwrap();
        l
    });
    let seg = last_segment(&dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&seg, &bytes).unwrap();
    check_matches(&Ledger::open(&dir, opts()).unwrap(), &entries);

    // A flipped byte in entry 1, with valid entries after it, is corruption, not a torn
    // write: opening must refuse rather than drop acknowledged entries.
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = 16 + (16 + entries[0].len()) + 20;
    bytes[at] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Ledger::open(&dir, opts()).err().unwrap();
    assert!(matches!(err, LedgerError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("(entry 1)"), "{err}");
}

#[test]
fn sidecar_is_rebuilt_where_it_may_lag() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("l");
    let entries: Vec<Vec<u8>> = (0..40).map(entry).collect();
    drop({
        let mut l = Ledger::open(&dir, small_segments()).unwrap();
        for chunk in entries.chunks(3) {
            l.append_batch(chunk).unwrap();
        }
        l
    });
    let side = dir.join("leaves");
    let full = std::fs::read(&side).unwrap();
    for damage in 0..4 {
        let d = base.path().join(format!("d{damage}"));
        copy_dir(&dir, &d);
        let p = d.join("leaves");
        match damage {
            0 => std::fs::remove_file(&p).unwrap(),
            1 => std::fs::write(&p, &full[..full.len() - 57]).unwrap(),
            2 => {
                let mut b = full.clone();
                b.extend_from_slice(&[7; 80]);
                std::fs::write(&p, b).unwrap();
            }
            _ => {
                // Garbage in the part that belongs to the last segment.
                let mut b = full.clone();
                let n = b.len();
                b[n - 40..].fill(0xEE);
                std::fs::write(&p, b).unwrap();
            }
        }
        let l = Ledger::open(&d, small_segments()).unwrap();
        check_matches(&l, &entries);
        drop(l);
        verify_path(&d).unwrap();
    }
    assert!(
        std::fs::read_dir(dir.join("segments")).unwrap().count() > 3,
        "segments rolled"
    );
}

#[test]
fn a_second_open_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let _l = Ledger::open(base.path(), opts()).unwrap();
    let err = Ledger::open(base.path(), opts()).err().unwrap();
    assert!(matches!(err, LedgerError::Locked(_)), "{err}");
}

#[test]
fn bad_entries_write_nothing() {
    let base = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(base.path(), opts()).unwrap();
    for bad in [b"".to_vec(), b"a\nb".to_vec(), vec![b'x'; (1 << 20) + 1]] {
        let err = l.append_batch(&[b"ok".to_vec(), bad]).unwrap_err();
        assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
    }
    assert_eq!(l.size(), 0);
}

#[test]
fn group_commit_acknowledges_each_entry_once() {
    let base = tempfile::tempdir().unwrap();
    let (c, writer) = GroupCommitter::start(Ledger::open(base.path(), small_segments()).unwrap());
    let results: Vec<(usize, usize, std::ops::Range<u64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|t| {
                let c = c.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    for k in 0..60 {
                        let batch: Vec<Vec<u8>> = (0..(k % 4 + 1))
                            .map(|j| format!("t{t}k{k}j{j}").into_bytes())
                            .collect();
                        out.push((t, k, c.append_blocking(batch).unwrap()));
                    }
                    // A bad entry fails its own request only.
                    assert!(c.append_blocking(vec![b"bad\n".to_vec()]).is_err());
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut ranges: Vec<std::ops::Range<u64>> = results.iter().map(|r| r.2.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    let mut next = 0;
    for r in &ranges {
        assert_eq!(r.start, next, "ranges are contiguous and disjoint");
        next = r.end;
    }
    let reader = c.reader().clone();
    assert_eq!(reader.size(), next);
    for (t, k, r) in &results {
        for (j, i) in r.clone().enumerate() {
            assert_eq!(
                reader.entry(i).unwrap(),
                format!("t{t}k{k}j{j}").into_bytes()
            );
        }
    }
    assert!(
        c.group_commits() < results.len() as u64,
        "groups were shared"
    );
    c.checkpoint_blocking().unwrap();
    c.shutdown();
    writer.join().unwrap();
    verify_path(base.path()).unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Reopen,
    Checkpoint,
    Prove(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..200, 1..12).prop_map(Op::Append),
        1 => Just(Op::Reopen),
        1 => Just(Op::Checkpoint),
        2 => any::<u64>().prop_map(Op::Prove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn ledger_agrees_with_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let base = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(base.path(), small_segments()).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut signed: Vec<(u64, ciyuan_tlog::Hash)> = Vec::new();
        for op in ops {
            match op {
                Op::Append(ns) => {
                    let batch: Vec<Vec<u8>> = ns.iter().map(|&n| entry(n)).collect();
                    let r = l.append_batch(&batch).unwrap();
                    prop_assert_eq!(r.start, model.len() as u64);
                    model.extend(batch);
                }
                Op::Reopen => {
                    drop(l);
                    l = Ledger::open(base.path(), small_segments()).unwrap();
                }
                Op::Checkpoint => {
                    let c = l.checkpoint().unwrap();
                    prop_assert_eq!(c.checkpoint.size, model.len() as u64);
                    prop_assert_eq!(c.checkpoint.root, tree_of(&model).root());
                    signed.push((c.checkpoint.size, c.checkpoint.root));
                }
                Op::Prove(pick) => {
                    if model.is_empty() { continue; }
                    let r = l.reader();
                    let n = model.len() as u64;
                    let size = 1 + pick % n;
                    let i = (pick >> 20) % size;
                    let root = tree_of(&model[..size as usize]).root();
                    prop_assert_eq!(r.root_at(size).unwrap(), root);
                    let p = r.inclusion_proof(i, size).unwrap();
                    prop_assert!(verify_inclusion(&leaf_hash(&model[i as usize]), i, size, &p, &root).is_ok());
                    let old = pick % (size + 1);
                    let c = r.consistency_proof(old, size).unwrap();
                    let old_root = tree_of(&model[..old as usize]).root();
                    prop_assert!(verify_consistency(old, size, &old_root, &root, &c).is_ok());
                }
            }
            check_matches(&l, &model);
        }
        let r = l.reader();
        prop_assert_eq!(r.checkpoint_count() as usize, signed.iter().map(|s| s.0).collect::<std::collections::BTreeSet<_>>().len());
        drop(l);
        let report = verify_path(base.path()).unwrap();
        prop_assert_eq!(report.entries, model.len() as u64);
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if std::fs::metadata(&p).unwrap().len() > 0 && !p.ends_with("README.txt") {
            out.push(p);
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_flipped_bit_fails_verification_and_names_the_file(pick in any::<u64>(), bit in 0u8..8, bundle in any::<bool>()) {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("ledger");
        {
            let mut l = Ledger::open(&dir, small_segments()).unwrap();
            for k in 0..5 {
                l.append_batch(&(k * 4..k * 4 + 4).map(entry).collect::<Vec<_>>()).unwrap();
                l.checkpoint().unwrap();
            }
            if bundle {
                export_bundle(&l.reader(), &base.path().join("bundle")).unwrap();
            }
        }
        let target = if bundle { base.path().join("bundle") } else { dir };
        verify_path(&target).unwrap();
        let fs = files(&target);
        let file = &fs[(pick % fs.len() as u64) as usize];
        let mut b = std::fs::read(file).unwrap();
        let at = ((pick >> 24) % b.len() as u64) as usize;
        b[at] ^= 1 << bit;
        std::fs::write(file, &b).unwrap();
        let err = verify_path(&target).err();
        prop_assert!(err.is_some(), "flip at {} of {} passed", at, file.display());
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let msg = err.unwrap().0;
        prop_assert!(msg.contains(&name), "{} does not name {}", msg, name);
    }
}
