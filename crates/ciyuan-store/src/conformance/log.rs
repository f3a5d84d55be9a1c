//! The behaviour every [`Log`] backend must show: the file ledger (`ciyuan-ledger`) runs
//! it against itself, and a PostgreSQL log will run the same checks.
//!
//! The tree is recomputed here from the bytes read back, with `ciyuan-tlog`'s RFC 6962
//! code, so a backend cannot pass by agreeing with itself.

use super::ok;
use crate::{Log, LogError, SignedCheckpoint};
use ciyuan_tlog::{EMPTY_ROOT, Hash, MemoryTree, NoteVerifier, leaf_hash};
use std::ops::Range;

/// Opens logs for the suite, the way a backend is opened in production.
pub trait LogBackend {
    /// A new, empty log.
    fn fresh(&mut self) -> Box<dyn Log>;
    /// Stops `log` cleanly and opens the same storage again, as a restarted server does.
    fn reopen(&mut self, log: Box<dyn Log>) -> Box<dyn Log>;
}

/// More checkpoints than fit in one page, so paging is exercised across pages (and,
/// for the file ledger, across more than one block of its checkpoint index).
const MANY_CHECKPOINTS: u64 = 600;

/// Runs every check, each against a fresh log from `backend`.
pub fn run_all(backend: &mut dyn LogBackend) {
    append_ranges_order_and_bytes(backend.fresh().as_ref());
    bad_entries_are_refused_whole(backend.fresh().as_ref());
    roots_and_proofs_follow_rfc6962(backend.fresh().as_ref());
    bounds_are_errors_not_panics(backend.fresh().as_ref());
    checkpoints_sign_durable_state_and_grow(backend.fresh().as_ref());
    let log = backend.fresh();
    reopen_keeps_everything(backend, log);
}

/// Appends and waits until the entries are durable.
fn append(log: &dyn Log, entries: Vec<Vec<u8>>) -> Result<Range<u64>, LogError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    log.append(
        entries,
        Box::new(move |r| {
            // The receiver waits below for as long as the sender lives.
            let _ = tx.send(r);
        }),
    )?;
    rx.recv()
        .map_err(|_| LogError::Unavailable("append never answered".into()))?
}

/// Signs a checkpoint and waits.
fn checkpoint(log: &dyn Log) -> SignedCheckpoint {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    ok(
        log.checkpoint(Box::new(move |r| {
            // As in `append`.
            let _ = tx.send(r);
        })),
        "checkpoint()",
    );
    ok(ok(rx.recv(), "checkpoint() answer"), "checkpoint()")
}

fn entry_bytes(i: u64) -> Vec<u8> {
    // Sizes vary, so framing is not tested at one length only.
    format!(
        r#"{{"n":{i},"pad":"{}"}}"#,
        "x".repeat((i % 7) as usize * 13)
    )
    .into_bytes()
}

/// Appends entries `from..to` in batches of varied sizes; answers the ranges.
fn fill(log: &dyn Log, from: u64, to: u64) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    let mut i = from;
    let mut batch = 1;
    while i < to {
        let end = (i + batch).min(to);
        let r = ok(append(log, (i..end).map(entry_bytes).collect()), "append()");
        ranges.push(r);
        i = end;
        batch = batch % 5 + 1;
    }
    ranges
}

/// Every entry, read back one by one and by scanning, is exactly what was appended.
fn assert_entries(log: &dyn Log, size: u64) {
    assert_eq!(log.size(), size, "size() counts the durable entries");
    for i in 0..size {
        assert_eq!(ok(log.entry(i), "entry()"), entry_bytes(i), "entry {i}");
    }
    let mut seen = Vec::new();
    ok(
        log.scan(0..size, &mut |i, b| {
            seen.push((i, b.to_vec()));
            Ok(())
        }),
        "scan()",
    );
    let want: Vec<(u64, Vec<u8>)> = (0..size).map(|i| (i, entry_bytes(i))).collect();
    assert_eq!(seen, want, "scan() yields every entry once, in order");
}

fn tree_of(log: &dyn Log, size: u64) -> MemoryTree {
    let mut tree = MemoryTree::new();
    for i in 0..size {
        tree.push(leaf_hash(&ok(log.entry(i), "entry()")));
    }
    tree
}

fn append_ranges_order_and_bytes(log: &dyn Log) {
    assert_eq!(log.size(), 0, "a fresh log is empty");
    let ranges = fill(log, 0, 40);
    let mut next = 0;
    for r in &ranges {
        assert_eq!(r.start, next, "ranges follow each other without gaps");
        assert!(r.end > r.start);
        next = r.end;
    }
    assert_eq!(next, 40);
    assert_entries(log, 40);
    // A range in the middle, and an empty one.
    let mut seen = Vec::new();
    ok(
        log.scan(17..23, &mut |i, _| {
            seen.push(i);
            Ok(())
        }),
        "scan(17..23)",
    );
    assert_eq!(seen, (17..23).collect::<Vec<_>>());
    ok(
        log.scan(5..5, &mut |i, _| {
            Err(LogError::Invalid(format!("visited {i}")))
        }),
        "scan(5..5)",
    );
    // A visitor's error stops the scan and comes back unchanged.
    let stopped = log.scan(0..40, &mut |i, _| {
        if i == 3 {
            Err(LogError::Invalid("stop at 3".into()))
        } else {
            Ok(())
        }
    });
    assert!(
        matches!(&stopped, Err(LogError::Invalid(m)) if m == "stop at 3"),
        "{stopped:?}"
    );
    // Concurrent appends each get their own range, and nothing is lost.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for _ in 0..5 {
                    let r = ok(append(log, vec![b"c".to_vec(), b"d".to_vec()]), "append()");
                    assert_eq!(r.end - r.start, 2, "thread {t}");
                }
            });
        }
    });
    assert_eq!(log.size(), 80);
    for pair in (40..80).step_by(2) {
        assert_eq!(ok(log.entry(pair), "entry()"), b"c");
        assert_eq!(
            ok(log.entry(pair + 1), "entry()"),
            b"d",
            "a request stays together"
        );
    }
}

fn bad_entries_are_refused_whole(log: &dyn Log) {
    fill(log, 0, 3);
    for (bad, what) in [
        (vec![entry_bytes(3), Vec::new()], "an empty entry"),
        (
            vec![entry_bytes(3), b"two\nlines".to_vec()],
            "a newline (bundles hold one entry a line)",
        ),
    ] {
        let r = append(log, bad);
        assert!(matches!(r, Err(LogError::Invalid(_))), "{what}: {r:?}");
        assert_eq!(log.size(), 3, "{what}: nothing of the request is appended");
    }
    // The log goes on.
    assert_eq!(ok(append(log, vec![entry_bytes(3)]), "append()"), 3..4);
    assert_entries(log, 4);
}

fn roots_and_proofs_follow_rfc6962(log: &dyn Log) {
    let size = 37;
    fill(log, 0, size);
    let tree = tree_of(log, size);
    assert_eq!(ok(log.root_at(0), "root_at(0)"), EMPTY_ROOT);
    for n in 1..=size {
        assert_eq!(
            Some(ok(log.root_at(n), "root_at()")),
            tree.root_at(n),
            "root of the first {n} entries"
        );
    }
    let wrong: Hash = [0x5a; 32];
    for n in [1, 2, 3, 8, 13, 32, size] {
        let root = ok(log.root_at(n), "root_at()");
        for i in 0..n {
            let leaf = leaf_hash(&entry_bytes(i));
            let proof = ok(log.inclusion_proof(i, n), "inclusion_proof()");
            ok(
                ciyuan_tlog::verify_inclusion(&leaf, i, n, &proof, &root),
                &format!("inclusion of {i} in {n}"),
            );
            assert!(
                ciyuan_tlog::verify_inclusion(&wrong, i, n, &proof, &root).is_err(),
                "a proof of {i} in {n} must not verify other data"
            );
            if n > 1 {
                let other = (i + 1) % n;
                assert!(
                    ciyuan_tlog::verify_inclusion(&leaf, other, n, &proof, &root).is_err(),
                    "a proof of {i} in {n} must not verify at index {other}"
                );
            }
        }
        for m in 0..=n {
            let proof = ok(log.consistency_proof(m, n), "consistency_proof()");
            let old = ok(log.root_at(m), "root_at()");
            ok(
                ciyuan_tlog::verify_consistency(m, n, &old, &root, &proof),
                &format!("consistency of {m} with {n}"),
            );
            if 0 < m && m < n {
                assert!(
                    ciyuan_tlog::verify_consistency(m, n, &wrong, &root, &proof).is_err(),
                    "consistency of {m} with {n} must not verify a wrong old root"
                );
            }
        }
    }
}

fn bounds_are_errors_not_panics(log: &dyn Log) {
    fill(log, 0, 5);
    let size = log.size();
    assert!(log.entry(size).is_err(), "reading past the end");
    assert!(log.entry(u64::MAX).is_err(), "reading far past the end");
    let mut visited = 0;
    let past = log.scan(3..size + 1, &mut |_, _| {
        visited += 1;
        Ok(())
    });
    assert!(past.is_err(), "scanning past the end");
    assert!(log.root_at(size + 1).is_err(), "a root past the end");
    assert!(
        log.inclusion_proof(size, size).is_err(),
        "an index outside the tree"
    );
    assert!(
        log.inclusion_proof(0, size + 1).is_err(),
        "a tree past the end"
    );
    assert!(
        log.inclusion_proof(0, 0).is_err(),
        "the empty tree includes nothing"
    );
    assert!(
        log.consistency_proof(3, 2).is_err(),
        "an old size above the new"
    );
    assert!(
        log.consistency_proof(1, size + 1).is_err(),
        "a new size past the end"
    );
    assert_eq!(log.size(), size, "errors change nothing");
}

fn checkpoints_sign_durable_state_and_grow(log: &dyn Log) {
    let verifier = ok(
        NoteVerifier::from_vkey(&log.verifier_key()),
        "verifier_key()",
    );
    assert!(
        log.latest_checkpoint().is_none(),
        "a fresh log has signed nothing"
    );
    assert_eq!(log.checkpoint_count(), 0);
    assert!(ok(log.checkpoints(0, 10), "checkpoints()").is_empty());

    fill(log, 0, 3);
    let first = checkpoint(log);
    let check = |c: &SignedCheckpoint| {
        let opened = ok(
            ciyuan_tlog::open_checkpoint(&verifier, &c.note, Some(verifier.name())),
            "the note verifies with verifier_key()",
        );
        assert_eq!(
            opened, c.checkpoint,
            "the parsed checkpoint is the signed one"
        );
        assert_eq!(
            ok(log.root_at(c.checkpoint.size), "root_at()"),
            c.checkpoint.root,
            "the signed root is the log's"
        );
    };
    check(&first);
    assert_eq!(first.checkpoint.size, 3, "signed over every durable entry");
    assert_eq!(log.latest_checkpoint().as_ref(), Some(&first));
    // Nothing new: the latest still covers the tree.
    let again = checkpoint(log);
    assert_eq!(again, first, "no new checkpoint of the same tree");
    assert_eq!(log.checkpoint_count(), 1);

    // Many, each after an append: sizes grow, and paging walks them all.
    for n in 1..MANY_CHECKPOINTS {
        let r = ok(append(log, vec![entry_bytes(2 + n)]), "append()");
        let c = checkpoint(log);
        assert_eq!(
            c.checkpoint.size, r.end,
            "checkpoint {n} signs the durable size"
        );
    }
    assert_eq!(log.checkpoint_count(), MANY_CHECKPOINTS);
    let all = walk(log, 97);
    assert_eq!(all.len() as u64, MANY_CHECKPOINTS);
    assert_eq!(all.first(), Some(&first), "oldest first");
    assert_eq!(all.last(), log.latest_checkpoint().as_ref(), "newest last");
    for pair in all.windows(2) {
        assert!(
            pair[1].checkpoint.size > pair[0].checkpoint.size,
            "sizes grow: {} then {}",
            pair[0].checkpoint.size,
            pair[1].checkpoint.size
        );
    }
    for c in all.iter().step_by(41) {
        check(c);
    }
    // Pages of other shapes see the same sequence.
    assert_eq!(walk(log, 1000), all);
    assert_eq!(walk(log, 256), all);
    let mid = ok(log.checkpoints(255, 3), "checkpoints(255, 3)");
    assert_eq!(mid, all[255..258]);
    assert!(ok(log.checkpoints(MANY_CHECKPOINTS, 5), "checkpoints(end)").is_empty());
    assert!(ok(log.checkpoints(u64::MAX, 5), "checkpoints(far)").is_empty());
    assert!(ok(log.checkpoints(0, 0), "checkpoints(limit 0)").is_empty());
}

/// Every checkpoint, read in pages of `limit`.
fn walk(log: &dyn Log, limit: usize) -> Vec<SignedCheckpoint> {
    let mut all: Vec<SignedCheckpoint> = Vec::new();
    loop {
        let page = ok(log.checkpoints(all.len() as u64, limit), "checkpoints()");
        assert!(page.len() <= limit, "a page holds at most `limit`");
        let done = page.len() < limit;
        all.extend(page);
        if done {
            return all;
        }
    }
}

fn reopen_keeps_everything(backend: &mut dyn LogBackend, log: Box<dyn Log>) {
    fill(log.as_ref(), 0, 300);
    for _ in 0..3 {
        checkpoint(log.as_ref());
        fill(log.as_ref(), log.size(), log.size() + 40);
    }
    let size = log.size();
    let root = ok(log.root_at(size), "root_at()");
    let latest = log.latest_checkpoint();
    let all = walk(log.as_ref(), 2);
    let vkey = log.verifier_key();

    let log = backend.reopen(log);
    assert_eq!(log.size(), size, "every durable entry survives a restart");
    assert_entries(log.as_ref(), size);
    assert_eq!(ok(log.root_at(size), "root_at()"), root);
    assert_eq!(log.latest_checkpoint(), latest);
    assert_eq!(log.checkpoint_count(), all.len() as u64);
    assert_eq!(walk(log.as_ref(), 2), all);
    assert_eq!(log.verifier_key(), vkey, "the same signer");
    // It goes on where it stopped.
    assert_eq!(
        ok(append(log.as_ref(), vec![entry_bytes(size)]), "append()"),
        size..size + 1
    );
    let c = checkpoint(log.as_ref());
    assert_eq!(c.checkpoint.size, size + 1);
    let proof = ok(
        log.consistency_proof(all[0].checkpoint.size, size + 1),
        "consistency_proof()",
    );
    ok(
        ciyuan_tlog::verify_consistency(
            all[0].checkpoint.size,
            size + 1,
            &all[0].checkpoint.root,
            &c.checkpoint.root,
            &proof,
        ),
        "the checkpoint before the restart is consistent with the one after",
    );
    let log = backend.reopen(log);
    assert_eq!(log.size(), size + 1);
    assert_eq!(log.checkpoint_count(), all.len() as u64 + 1);
}
