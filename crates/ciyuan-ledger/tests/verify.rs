//! The offline verifier: what a crash may leave is accepted, everything else is named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciyuan_ledger::{
    Ledger, LedgerError, LedgerOptions, export_bundle, verify_path, verify_path_with_progress,
};
use ciyuan_tlog::{Checkpoint, MemoryTree, NoteSigner, leaf_hash};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const SEGMENT_HEADER: u64 = 16;
const RECORD_HEADER: u64 = 16;
const SIDECAR_ENTRY: u64 = 40;

fn opts() -> LedgerOptions {
    LedgerOptions {
        origin: Some("verify.test".into()),
        segment_max_bytes: 400,
        ..LedgerOptions::default()
    }
}

fn entry(i: usize) -> Vec<u8> {
    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "y".repeat(i % 17)).into_bytes()
}

/// A ledger of `n` entries in batches of 3, with a checkpoint after every `every`
/// batches (none when `every` is 0); closed cleanly.
fn build(dir: &Path, n: usize, every: usize) -> Vec<Vec<u8>> {
    let entries: Vec<Vec<u8>> = (0..n).map(entry).collect();
    let mut l = Ledger::open(dir, opts()).unwrap();
    for (k, chunk) in entries.chunks(3).enumerate() {
        l.append_batch(chunk).unwrap();
        if every > 0 && k % every == every - 1 {
            l.checkpoint().unwrap();
        }
    }
    entries
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut s: Vec<PathBuf> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    s.sort();
    s
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn set_len(p: &Path, n: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(n)
        .unwrap();
}

fn append_bytes(p: &Path, b: &[u8]) {
    let mut all = std::fs::read(p).unwrap();
    all.extend_from_slice(b);
    std::fs::write(p, all).unwrap();
}

fn first_index(seg: &Path) -> u64 {
    seg.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

fn root_of(entries: &[Vec<u8>]) -> ciyuan_tlog::Hash {
    let mut t = MemoryTree::new();
    for e in entries {
        t.push(leaf_hash(e));
    }
    t.root()
}

fn err(path: &Path) -> String {
    verify_path(path).expect_err("verification must fail").0
}

#[test]
fn a_clean_ledger_verifies_with_every_checkpoint_and_reports_progress() {
    let base = tempfile::tempdir().unwrap();
    let entries = build(base.path(), 100, 2);
    assert!(segments(base.path()).len() > 5);
    let mut seen = Vec::new();
    let r = verify_path_with_progress(base.path(), &mut |n| seen.push(n)).unwrap();
    assert_eq!(r.entries, 100);
    assert_eq!(r.size, 100);
    assert_eq!(r.root, root_of(&entries));
    // 34 batches, a checkpoint after every second one: the last covers everything.
    assert_eq!(r.checkpoints, 17);
    assert_eq!(r.signed_size, 100);
    assert_eq!((r.sidecar_missing, r.torn_tail_bytes), (0, 0));
    assert_eq!(seen.last(), Some(&100));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn an_empty_ledger_verifies() {
    let base = tempfile::tempdir().unwrap();
    drop(Ledger::open(base.path(), opts()).unwrap());
    let r = verify_path(base.path()).unwrap();
    assert_eq!(r.entries, 0);
    assert_eq!(r.root, ciyuan_tlog::EMPTY_ROOT);
}

#[test]
fn a_ledger_held_open_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let _l = Ledger::open(base.path(), opts()).unwrap();
    assert!(err(base.path()).contains("LOCK"));
}

#[test]
fn a_sidecar_lagging_inside_the_last_segment_is_accepted() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 40, 0);
    let last = segments(base.path()).pop().unwrap();
    let in_last = 40 - first_index(&last);
    assert!(in_last >= 2, "the last segment holds {in_last}");
    let side = base.path().join("leaves");
    let full = std::fs::read(&side).unwrap();
    // Whole entries missing, then also a partial final entry.
    set_len(&side, (40 - 2) * SIDECAR_ENTRY);
    let r = verify_path(base.path()).unwrap();
    assert_eq!(r.sidecar_missing, 2);
    std::fs::write(&side, &full[..(40 - 2) * SIDECAR_ENTRY as usize + 17]).unwrap();
    assert_eq!(verify_path(base.path()).unwrap().sidecar_missing, 2);

    // The partial entry must still match what it would be.
    let mut b = std::fs::read(&side).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x40;
    std::fs::write(&side, &b).unwrap();
    let e = err(base.path());
    assert!(e.contains("leaves entry 38"), "{e}");

    // Opening repairs it, and then nothing is missing.
    drop(Ledger::open(base.path(), opts()).unwrap());
    assert_eq!(verify_path(base.path()).unwrap().sidecar_missing, 0);
}

#[test]
fn a_sidecar_lagging_inside_a_sealed_segment_is_refused_and_one_running_ahead_is_a_leftover() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 40, 0);
    let last = segments(base.path()).pop().unwrap();
    let side = base.path().join("leaves");
    let full = std::fs::read(&side).unwrap();
    set_len(&side, (first_index(&last) - 1) * SIDECAR_ENTRY);
    let e = err(base.path());
    assert!(e.starts_with("leaves:") && e.contains("sealed"), "{e}");

    // Running past the records is what a crash leaves (a group's sidecar entries are
    // written before the group is synced): recovery drops them, the verifier accepts
    // them, and neither counts them as entries.
    let mut longer = full.clone();
    longer.extend_from_slice(&full[..SIDECAR_ENTRY as usize + 7]);
    std::fs::write(&side, &longer).unwrap();
    let r = verify_path(base.path()).unwrap();
    assert_eq!((r.entries, r.sidecar_missing), (40, 0));
    let copy = tempfile::tempdir().unwrap();
    copy_dir(base.path(), copy.path());
    drop(Ledger::open(copy.path(), opts()).unwrap());
    assert_eq!(len(&copy.path().join("leaves")), full.len() as u64);

    std::fs::write(&side, &full[..full.len() - 1]).unwrap();
    verify_path(base.path()).unwrap();
}

#[test]
fn a_torn_final_write_is_accepted_only_when_nothing_vouches_for_it() {
    let base = tempfile::tempdir().unwrap();
    let entries = build(base.path(), 30, 0);
    let seg = segments(base.path()).pop().unwrap();
    let side = base.path().join("leaves");

    // Half a record after the last one, as a crash in the middle of a write leaves it.
    let mut rec = Vec::new();
    rec.extend_from_slice(&(50u32).to_le_bytes());
    rec.extend_from_slice(&(30u64).to_le_bytes());
    rec.extend_from_slice(&[0x11; 4]);
    rec.extend_from_slice(b"{\"i\":30");
    append_bytes(&seg, &rec);
    let r = verify_path(base.path()).unwrap();
    assert_eq!(r.entries, 30);
    assert_eq!(r.torn_tail_bytes, rec.len() as u64);
    assert_eq!(r.root, root_of(&entries));

    // The same cut through entry 29, which the sidecar holds: still a torn write. The
    // sidecar is written before its group is synced, so it vouches for nothing, and
    // recovery cuts the same tail.
    let full = len(&seg) - rec.len() as u64;
    set_len(&seg, full - 3);
    let r = verify_path(base.path()).unwrap();
    assert_eq!((r.entries, r.sidecar_missing), (29, 0));
    assert!(r.torn_tail_bytes > 0);

    // Without the sidecar entry, the same.
    set_len(&side, 29 * SIDECAR_ENTRY);
    let r = verify_path(base.path()).unwrap();
    assert_eq!((r.entries, r.sidecar_missing), (29, 0));
    assert!(r.torn_tail_bytes > 0);
    // ...unless a signed checkpoint covers it.
    drop(Ledger::open(base.path(), opts()).unwrap()); // repair: 29 entries
    {
        let mut l = Ledger::open(base.path(), opts()).unwrap();
        l.append_batch(&[entries[29].clone()]).unwrap();
        l.checkpoint().unwrap();
    }
    let full = len(&seg);
    set_len(&seg, full - 3);
    set_len(&side, 29 * SIDECAR_ENTRY);
    let e = err(base.path());
    assert!(
        e.contains("entry 29") && e.contains("signed checkpoint"),
        "{e}"
    );
}

#[test]
fn damage_followed_by_valid_records_is_never_a_torn_write() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 30, 0);
    let seg = segments(base.path()).pop().unwrap();
    let first = first_index(&seg);
    // Drop the sidecar entries of the last segment so only the framing can tell.
    set_len(&base.path().join("leaves"), first * SIDECAR_ENTRY);
    let mut b = std::fs::read(&seg).unwrap();
    b[SEGMENT_HEADER as usize + RECORD_HEADER as usize + 2] ^= 0x08;
    std::fs::write(&seg, &b).unwrap();
    let e = err(base.path());
    assert!(
        e.contains(&format!("entry {first}")) && e.contains("valid record follows"),
        "{e}"
    );
}

#[test]
fn damage_in_a_sealed_segment_is_named_by_open_readers_and_verify_and_never_cut() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 40, 0);
    let segs = segments(base.path());
    let seg = &segs[1];
    let first = first_index(seg);
    let before = len(seg);
    let mut b = std::fs::read(seg).unwrap();
    b[SEGMENT_HEADER as usize + RECORD_HEADER as usize] ^= 0x01;
    std::fs::write(seg, &b).unwrap();

    let name = seg.file_name().unwrap().to_str().unwrap().to_string();
    let e = err(base.path());
    assert!(
        e.contains(&format!("entry {first}")) && e.contains(&name) && e.contains("offset 16"),
        "{e}"
    );
    // Opening does not rescan sealed segments, but never cuts them, and a read of the
    // damaged entry says where it is.
    match Ledger::open(base.path(), opts()) {
        Ok(l) => {
            let r = l.reader();
            assert_eq!(r.size(), 40);
            let e = r.entry(first).unwrap_err();
            assert!(matches!(e, LedgerError::Corrupt(_)), "{e}");
            assert!(e.to_string().contains(&name), "{e}");
        }
        Err(e) => assert!(e.to_string().contains(&name), "{e}"),
    }
    assert_eq!(len(seg), before);
}

/// Signs a checkpoint with the ledger's own key, as a thief of `signing.key` could.
fn forge(dir: &Path, size: u64, root: ciyuan_tlog::Hash) -> String {
    let text = std::fs::read_to_string(dir.join("signing.key")).unwrap();
    let rest = text.trim_end().strip_prefix("PRIVATE+KEY+").unwrap();
    let mut parts = rest.splitn(3, '+');
    let name = parts.next().unwrap();
    let _id = parts.next().unwrap();
    let raw = B64.decode(parts.next().unwrap()).unwrap();
    let seed: [u8; 32] = raw[1..].try_into().unwrap();
    let signer = NoteSigner::new(name, ed25519_dalek::SigningKey::from_bytes(&seed)).unwrap();
    let c = Checkpoint {
        origin: name.to_string(),
        size,
        root,
        extensions: Vec::new(),
    };
    signer.sign(&c.to_text()).unwrap()
}

fn frame(note: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(note.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(note.as_bytes()).to_le_bytes());
    out.extend_from_slice(note.as_bytes());
    out
}

#[test]
fn a_validly_signed_checkpoint_of_another_history_is_refused() {
    let base = tempfile::tempdir().unwrap();
    // Checkpoints at 9, 18 and 27 entries.
    let entries = build(base.path(), 30, 3);
    let cps = base.path().join("checkpoints");
    let good = std::fs::read(&cps).unwrap();

    // A root at size 30 that is not the root of these entries.
    let mut other = entries.clone();
    other[4] = b"{\"i\":4,\"forged\":true}".to_vec();
    append_bytes(&cps, &frame(&forge(base.path(), 30, root_of(&other))));
    let e = err(base.path());
    assert!(
        e.contains("checkpoints offset") && e.contains("root"),
        "{e}"
    );

    // A checkpoint that does not grow from the previous one.
    std::fs::write(&cps, &good).unwrap();
    append_bytes(&cps, &frame(&forge(base.path(), 3, root_of(&entries[..3]))));
    let e = err(base.path());
    assert!(e.contains("does not grow"), "{e}");

    // The right root signed at a new size verifies, and its consistency is proven.
    std::fs::write(&cps, &good).unwrap();
    append_bytes(
        &cps,
        &frame(&forge(base.path(), 29, root_of(&entries[..29]))),
    );
    assert_eq!(verify_path(base.path()).unwrap().signed_size, 29);
}

#[test]
fn the_key_files_must_agree_and_be_canonical() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 12, 1);
    let public = base.path().join("public.key");
    let good = std::fs::read_to_string(&public).unwrap();
    let id = good.split('+').nth(1).unwrap().to_string();
    if id.bytes().any(|b| b.is_ascii_lowercase()) {
        // The parser takes upper-case hex; the verifier does not.
        std::fs::write(&public, good.replacen(&id, &id.to_uppercase(), 1)).unwrap();
        let e = err(base.path());
        assert!(e.contains("public.key"), "{e}");
    }
    std::fs::write(&public, good.trim_end()).unwrap();
    assert!(err(base.path()).contains("public.key"));
    std::fs::write(&public, &good).unwrap();
    std::fs::remove_file(base.path().join("signing.key")).unwrap();
    // Without the secret half the ledger still verifies against its public key.
    verify_path(base.path()).unwrap();
}

#[test]
fn bundles_end_at_the_newest_checkpoint() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("l");
    let entries: Vec<Vec<u8>> = (0..20).map(entry).collect();
    let mut l = Ledger::open(&dir, opts()).unwrap();
    l.append_batch(&entries[..5]).unwrap();
    let e = export_bundle(&l.reader(), &base.path().join("none")).unwrap_err();
    assert!(matches!(e, LedgerError::Invalid(_)), "{e}");
    l.checkpoint().unwrap();
    l.append_batch(&entries[5..12]).unwrap();
    l.checkpoint().unwrap();
    l.append_batch(&entries[12..]).unwrap();
    let out = base.path().join("b");
    let s = export_bundle(&l.reader(), &out).unwrap();
    assert_eq!((s.entries, s.checkpoints), (12, 2));
    drop(l);
    let r = verify_path(&out).unwrap();
    assert_eq!((r.entries, r.checkpoints, r.signed_size), (12, 2, 12));
    assert_eq!(r.root, root_of(&entries[..12]));
    let lines = std::fs::read_to_string(out.join("entries.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    // The directory is left as it was: an existing non-empty one is refused.
    let reader = Ledger::open(&dir, opts()).unwrap().reader();
    assert!(export_bundle(&reader, &out).is_err());
}

fn bundle(base: &Path) -> PathBuf {
    let dir = base.join("l");
    build(&dir, 25, 3);
    let out = base.join("b");
    let l = Ledger::open(&dir, opts()).unwrap();
    export_bundle(&l.reader(), &out).unwrap();
    out
}

#[test]
fn a_bundle_is_exactly_what_was_exported() {
    let base = tempfile::tempdir().unwrap();
    let out = bundle(base.path());
    verify_path(&out).unwrap();

    let readme = std::fs::read_to_string(out.join("README.txt")).unwrap();
    assert!(readme.contains("SHA-256(0x00 ||") && readme.contains("RFC 6962"));
    std::fs::write(out.join("README.txt"), readme.replace("Merkle", "merkle")).unwrap();
    assert!(err(&out).contains("README.txt"));
    std::fs::write(out.join("README.txt"), &readme).unwrap();

    std::fs::write(out.join("notes.txt"), "hi").unwrap();
    assert!(err(&out).contains("notes.txt"));
    std::fs::remove_file(out.join("notes.txt")).unwrap();

    // A missing final newline, an extra empty line, a line removed.
    let entries = std::fs::read(out.join("entries.jsonl")).unwrap();
    std::fs::write(out.join("entries.jsonl"), &entries[..entries.len() - 1]).unwrap();
    let e = err(&out);
    assert!(e.contains("entries.jsonl line 25"), "{e}");
    let mut extra = entries.clone();
    extra.push(b'\n');
    std::fs::write(out.join("entries.jsonl"), &extra).unwrap();
    assert!(err(&out).contains("entries.jsonl line 26"));
    let cut = entries[..entries.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap();
    std::fs::write(out.join("entries.jsonl"), &entries[..=cut]).unwrap();
    let e = err(&out);
    assert!(
        e.contains("leaf-hashes.txt") || e.contains("checkpoint"),
        "{e}"
    );
    std::fs::write(out.join("entries.jsonl"), &entries).unwrap();

    // A checkpoint file under another size's name.
    let cps: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let moved = out.join("checkpoints").join(format!("{:020}.note", 999));
    std::fs::rename(&cps[0], &moved).unwrap();
    assert!(err(&out).contains("file name"));
    std::fs::rename(&moved, &cps[0]).unwrap();
    verify_path(&out).unwrap();
}

#[test]
fn a_changed_entry_is_named_by_line_even_with_its_leaf_hash_updated() {
    let base = tempfile::tempdir().unwrap();
    let out = bundle(base.path());
    let text = std::fs::read_to_string(out.join("entries.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[7] = lines[7].replace("\"i\":7", "\"i\":8");
    std::fs::write(out.join("entries.jsonl"), lines.join("\n") + "\n").unwrap();
    let e = err(&out);
    assert!(e.contains("entry 7") && e.contains("line 8"), "{e}");

    let mut hashes: Vec<String> = std::fs::read_to_string(out.join("leaf-hashes.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    hashes[7] = hex::encode(leaf_hash(lines[7].as_bytes()));
    std::fs::write(out.join("leaf-hashes.txt"), hashes.join("\n") + "\n").unwrap();
    let e = err(&out);
    assert!(e.contains("checkpoints/") && e.contains("root"), "{e}");
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if len(&p) > 0 {
            out.push(p);
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every byte of every non-empty file counts, the README of a bundle included.
    #[test]
    fn any_changed_byte_anywhere_fails_and_names_the_file(
        file_pick in any::<u64>(),
        at_pick in any::<u64>(),
        xor in 1u8..=255,
        is_bundle in any::<bool>(),
    ) {
        let base = tempfile::tempdir().unwrap();
        let target = if is_bundle {
            bundle(base.path())
        } else {
            let dir = base.path().join("l");
            build(&dir, 25, 3);
            dir
        };
        verify_path(&target).unwrap();
        let fs = files(&target);
        let file = &fs[(file_pick % fs.len() as u64) as usize];
        let mut b = std::fs::read(file).unwrap();
        let at = (at_pick % b.len() as u64) as usize;
        b[at] ^= xor;
        std::fs::write(file, &b).unwrap();
        let e = verify_path(&target).err();
        prop_assert!(e.is_some(), "xor {:#x} at {} of {} passed", xor, at, file.display());
        let msg = e.unwrap().0;
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        prop_assert!(msg.contains(&name), "{} does not name {}", msg, name);
    }
}

#[test]
fn a_sealed_segment_cut_or_grown_is_refused_on_open_and_named() {
    let base = tempfile::tempdir().unwrap();
    let entries = build(base.path(), 40, 0);
    let segs = segments(base.path());
    let seg = segs[2].clone();
    let name = seg.file_name().unwrap().to_str().unwrap().to_string();
    let good = std::fs::read(&seg).unwrap();
    for (what, bytes) in [
        ("cut", good[..good.len() - 1].to_vec()),
        ("grown", [good.clone(), b"x".to_vec()].concat()),
        ("swapped", std::fs::read(&segs[1]).unwrap()),
    ] {
        std::fs::write(&seg, &bytes).unwrap();
        let e = Ledger::open(base.path(), opts()).err().expect(what);
        assert!(matches!(e, LedgerError::Corrupt(_)), "{what}: {e}");
        assert!(e.to_string().contains(&name), "{what}: {e}");
        assert!(err(base.path()).contains(&name), "{what}");
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "{what}: never cut");
    }
    std::fs::write(&seg, &good).unwrap();
    let l = Ledger::open(base.path(), opts()).unwrap();
    assert_eq!(l.reader().root(), root_of(&entries));
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

/// Options a binary might recover with: far smaller groups and entries than those the
/// files were written with.
fn small_options() -> LedgerOptions {
    LedgerOptions {
        max_entry_bytes: 512,
        max_batch_bytes: 1024,
        max_batch_entries: 4,
        ..opts()
    }
}

#[test]
fn regression_recovery_and_verify_judge_torn_tails_alike() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    // One segment, so the records at its end are where this test computes them.
    let one_segment = LedgerOptions {
        segment_max_bytes: 1 << 20,
        ..opts()
    };
    let mut entries: Vec<Vec<u8>> = (0..24).map(entry).collect();
    {
        let mut l = Ledger::open(&src, one_segment).unwrap();
        for chunk in entries.chunks(5) {
            l.append_batch(chunk).unwrap();
        }
        l.checkpoint().unwrap(); // signs 24
        // A whole final entry larger than `small_options` accepts for new appends.
        let big = format!("{{\"big\":\"{}\"}}", "z".repeat(600)).into_bytes();
        l.append_batch(&[entry(24), big.clone()]).unwrap();
        entries.extend([entry(24), big]);
    }
    let seg = segments(&src).pop().unwrap();
    let seg_name = seg.file_name().unwrap().to_owned();
    let whole = std::fs::read(&seg).unwrap();
    let mut torn_record = Vec::new();
    torn_record.extend_from_slice(&(50u32).to_le_bytes());
    torn_record.extend_from_slice(&(26u64).to_le_bytes());
    torn_record.extend_from_slice(&[0x11; 4]);
    torn_record.extend_from_slice(b"{\"i\":26");
    let mut valid_later = Vec::new();
    {
        // A valid record of index 27, framed as the ledger frames one.
        let payload = b"{\"i\":27}";
        let len = payload.len() as u32;
        let mut head = Vec::new();
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&27u64.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
        valid_later.extend_from_slice(&head);
        valid_later.extend_from_slice(&crc.to_le_bytes());
        valid_later.extend_from_slice(payload);
    }
    // Where the last record starts: the 600-byte one.
    let last_start = whole.len() - (RECORD_HEADER as usize + entries[25].len());
    let covered_start = last_start
        - (RECORD_HEADER as usize + entries[24].len())
        - (RECORD_HEADER as usize + entries[23].len());

    // (name, bytes of the last segment, accepted, entries after recovery)
    let cases: Vec<(&str, Vec<u8>, bool, u64)> = vec![
        ("clean", whole.clone(), true, 26),
        (
            "half a record",
            [whole.clone(), torn_record.clone()].concat(),
            true,
            26,
        ),
        // Longer than the old bound of `small_options` (4 groups of ~1.6 KB), well
        // within what a default writer may have unsynced.
        (
            "64 KiB of garbage",
            [whole.clone(), vec![0xAB; 64 << 10]].concat(),
            true,
            26,
        ),
        (
            "garbage, then a later valid record",
            [whole.clone(), vec![0xAB; 100], valid_later.clone()].concat(),
            false,
            0,
        ),
        (
            "the big last entry cut",
            whole[..whole.len() - 5].to_vec(),
            true,
            25,
        ),
        (
            "entry 23, which a checkpoint signs, cut",
            whole[..covered_start + 20].to_vec(),
            false,
            0,
        ),
    ];
    for (name, bytes, accepted, size) in cases {
        for (label, recover_with) in [("default", opts()), ("small", small_options())] {
            let dir = base.path().join("case");
            copy_dir(&src, &dir);
            std::fs::write(dir.join("segments").join(&seg_name), &bytes).unwrap();
            let verified = verify_path(&dir);
            let opened = Ledger::open(&dir, recover_with).map(|l| l.reader().size());
            assert_eq!(
                verified.is_ok(),
                opened.is_ok(),
                "{name}, recovering with {label} options: the verifier says {verified:?}, \
                 recovery says {:?}",
                opened.as_ref().map_err(|e| e.to_string())
            );
            assert_eq!(verified.is_ok(), accepted, "{name}: {verified:?}");
            if accepted {
                assert_eq!(verified.unwrap().entries, size, "{name}");
                assert_eq!(opened.unwrap(), size, "{name}, {label}");
                // And what recovery left verifies cleanly.
                let r = verify_path(&dir).unwrap();
                assert_eq!((r.entries, r.torn_tail_bytes), (size, 0), "{name}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn options_that_could_tear_more_than_the_format_allows_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let too_big = LedgerOptions {
        max_batch_bytes: 64 << 20,
        ..opts()
    };
    let e = Ledger::open(base.path(), too_big)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("torn"), "{e}");
    let mut l = Ledger::open(base.path(), small_options()).unwrap();
    // A request over the group bound is refused whole: the writer never splits one.
    let e = l
        .append_batch(&[vec![b'a'; 400], vec![b'b'; 400], vec![b'c'; 400]])
        .unwrap_err();
    assert!(matches!(e, LedgerError::Invalid(_)), "{e}");
    assert_eq!(l.size(), 0);
}

#[test]
fn more_checkpoints_than_one_batch_are_streamed_and_each_is_checked() {
    // 1100 checkpoints, one per entry: more than the verifier reads at once (1024),
    // so the checks and the proofs between them cross a batch.
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("l");
    let n = 1100;
    let entries: Vec<Vec<u8>> = (0..n).map(entry).collect();
    {
        let mut l = Ledger::open(&dir, opts()).unwrap();
        for e in &entries {
            l.append_batch(std::slice::from_ref(e)).unwrap();
            l.checkpoint().unwrap();
        }
        assert_eq!(l.reader().checkpoint_count(), n as u64);
        assert_eq!(
            l.reader().checkpoints(1050, 3).unwrap()[0].checkpoint.size,
            1051
        );
        export_bundle(&l.reader(), &base.path().join("b")).unwrap();
    }
    let r = verify_path(&dir).unwrap();
    assert_eq!(
        (r.entries, r.checkpoints, r.signed_size),
        (n as u64, n as u64, n as u64)
    );
    assert_eq!(r.root, root_of(&entries));
    let b = base.path().join("b");
    let r = verify_path(&b).unwrap();
    assert_eq!((r.entries, r.checkpoints), (n as u64, n as u64));

    // A checkpoint in the second batch whose root is changed (and re-signed, so only
    // the tree can tell) is named.
    let mut root = root_of(&entries[..1070]);
    root[0] ^= 1;
    std::fs::write(
        b.join("checkpoints").join(format!("{:020}.note", 1070)),
        forge(&dir, 1070, root),
    )
    .unwrap();
    let e = err(&b);
    assert!(
        e.contains("00000000000000001070.note") && e.contains("root"),
        "{e}"
    );
}

#[test]
fn an_old_checkpoint_with_a_bad_signature_is_refused_when_read_and_by_verify() {
    let base = tempfile::tempdir().unwrap();
    build(base.path(), 12, 1); // a checkpoint after every batch of 3
    let cp = base.path().join("checkpoints");
    let bytes = std::fs::read(&cp).unwrap();
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let mut first = String::from_utf8(bytes[8..8 + len].to_vec()).unwrap();
    // Change a base64 digit inside the signature, and frame it with a valid checksum.
    let at = first.len() - 20;
    let digit = if &first[at..=at] == "A" { "B" } else { "A" };
    first.replace_range(at..=at, digit);
    let mut changed = frame(&first);
    changed.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(&cp, &changed).unwrap();

    // Opening checks only the newest signature (a start must not take minutes with
    // years of checkpoints); the old one is refused whenever it is read.
    let l = Ledger::open(base.path(), opts()).unwrap();
    let r = l.reader();
    assert_eq!(r.checkpoint_count(), 4);
    let e = r.checkpoints(0, 10).unwrap_err().to_string();
    assert!(e.contains("checkpoints offset 0"), "{e}");
    assert_eq!(r.checkpoints(1, 10).unwrap().len(), 3);
    drop(l);
    let e = err(base.path());
    assert!(e.contains("checkpoints offset 0"), "{e}");
}
