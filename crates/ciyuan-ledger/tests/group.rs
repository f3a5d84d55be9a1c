//! Group commit through the asynchronous API: callbacks, refusals, checkpoints, shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_ledger::{GroupCommitter, Ledger, LedgerError, LedgerOptions, verify_path};
use std::ops::Range;
use std::sync::mpsc::channel;

fn opts() -> LedgerOptions {
    LedgerOptions {
        origin: Some("group.test".into()),
        segment_max_bytes: 4096,
        ..LedgerOptions::default()
    }
}

#[test]
fn a_bad_request_fails_alone_inside_a_group() {
    let base = tempfile::tempdir().unwrap();
    let (c, writer) = GroupCommitter::start(Ledger::open(base.path(), opts()).unwrap());
    let (tx, rx) = channel::<(usize, Result<Range<u64>, LedgerError>)>();
    let requests: Vec<Vec<Vec<u8>>> = vec![
        vec![b"a".to_vec()],
        vec![b"b".to_vec(), b"bad\nentry".to_vec()],
        vec![b"c".to_vec(), b"d".to_vec()],
        vec![Vec::new()],
        vec![vec![b'x'; (1 << 20) + 1]],
        vec![b"e".to_vec()],
    ];
    // Queued back to back, so they land in few groups.
    for (k, r) in requests.into_iter().enumerate() {
        let tx = tx.clone();
        c.append(r, Box::new(move |res| tx.send((k, res)).unwrap()))
            .unwrap();
    }
    drop(tx);
    let mut results: Vec<_> = rx.iter().collect();
    results.sort_by_key(|r| r.0);
    assert_eq!(results.len(), 6, "every request is answered exactly once");
    let mut next = 0;
    for (k, res) in &results {
        match (k, res) {
            (1 | 3 | 4, Err(LedgerError::Invalid(_))) => {}
            (0 | 2 | 5, Ok(r)) => {
                assert_eq!(r.start, next, "request {k}");
                next = r.end;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let reader = c.reader().clone();
    assert_eq!(reader.size(), 4);
    let got: Vec<Vec<u8>> = (0..4).map(|i| reader.entry(i).unwrap()).collect();
    assert_eq!(
        got,
        [b"a".to_vec(), b"c".to_vec(), b"d".to_vec(), b"e".to_vec()]
    );
    c.shutdown();
    writer.join().unwrap();
    verify_path(base.path()).unwrap();
}

#[test]
fn callbacks_acknowledge_every_entry_once_and_a_checkpoint_covers_what_came_before() {
    let base = tempfile::tempdir().unwrap();
    let (c, writer) = GroupCommitter::start(Ledger::open(base.path(), opts()).unwrap());
    let (tx, rx) = channel::<(u32, u32, Range<u64>)>();
    let (ctx, crx) = channel::<(u64, u64)>();
    std::thread::scope(|s| {
        for t in 0..6u32 {
            let c = c.clone();
            let tx = tx.clone();
            let ctx = ctx.clone();
            s.spawn(move || {
                for k in 0..50u32 {
                    let batch: Vec<Vec<u8>> = (0..(k % 5 + 1))
                        .map(|j| format!("t{t}k{k}j{j}").into_bytes())
                        .collect();
                    let tx = tx.clone();
                    c.append(
                        batch,
                        Box::new(move |r| tx.send((t, k, r.unwrap())).unwrap()),
                    )
                    .unwrap();
                }
                // Queued after this thread's appends: it must cover all of them.
                let ctx = ctx.clone();
                let reader = c.reader().clone();
                c.checkpoint_with(Box::new(move |r| {
                    let cp = r.unwrap().checkpoint;
                    assert_eq!(reader.root_at(cp.size).unwrap(), cp.root);
                    ctx.send((t as u64, cp.size)).unwrap();
                }))
                .unwrap();
            });
        }
    });
    drop((tx, ctx));
    let acks: Vec<(u32, u32, Range<u64>)> = rx.iter().collect();
    assert_eq!(acks.len(), 300);
    let mut ranges: Vec<Range<u64>> = acks.iter().map(|a| a.2.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    let mut next = 0;
    for r in &ranges {
        assert_eq!(r.start, next, "contiguous and disjoint");
        next = r.end;
    }
    let reader = c.reader().clone();
    assert_eq!(reader.size(), next);
    for (t, k, r) in &acks {
        for (j, i) in r.clone().enumerate() {
            assert_eq!(
                reader.entry(i).unwrap(),
                format!("t{t}k{k}j{j}").into_bytes()
            );
        }
    }
    let signed: Vec<(u64, u64)> = crx.iter().collect();
    assert_eq!(signed.len(), 6, "every checkpoint request is answered");
    for &(t, size) in &signed {
        let last_of_t = acks
            .iter()
            .filter(|a| a.0 as u64 == t)
            .map(|a| a.2.end)
            .max()
            .unwrap();
        assert!(
            size >= last_of_t,
            "thread {t}: checkpoint {size} < {last_of_t}"
        );
    }
    assert!(c.group_commits() < 300, "groups were shared");
    c.shutdown();
    writer.join().unwrap();
    let r = verify_path(base.path()).unwrap();
    assert_eq!(r.entries, next);
}

#[test]
fn after_shutdown_appends_fail_at_once_and_the_ledger_reopens_whole() {
    let base = tempfile::tempdir().unwrap();
    let (c, writer) = GroupCommitter::start(Ledger::open(base.path(), opts()).unwrap());
    let r = c
        .append_blocking(vec![b"one".to_vec(), b"two".to_vec()])
        .unwrap();
    assert_eq!(r, 0..2);
    let cp = c.checkpoint_blocking().unwrap();
    assert_eq!(cp.checkpoint.size, 2);
    c.shutdown();
    writer.join().unwrap();
    let e = c
        .append(vec![b"three".to_vec()], Box::new(|_| {}))
        .unwrap_err();
    assert!(matches!(e, LedgerError::ShutDown), "{e}");
    assert!(c.append_blocking(vec![b"three".to_vec()]).is_err());
    assert!(c.checkpoint_blocking().is_err());
    // The writer released the directory.
    let l = Ledger::open(base.path(), opts()).unwrap();
    assert_eq!(l.size(), 2);
    assert_eq!(l.reader().latest_checkpoint().unwrap().checkpoint.size, 2);
}

#[test]
fn a_request_larger_than_a_group_is_refused_whole() {
    // The writer never splits a request, so one over the group bounds could hold more
    // bytes unsynced than the format lets a crash tear: it is refused, alone.
    let base = tempfile::tempdir().unwrap();
    let small = LedgerOptions {
        max_batch_entries: 4,
        max_batch_bytes: 1024,
        ..opts()
    };
    let (c, writer) = GroupCommitter::start(Ledger::open(base.path(), small).unwrap());
    let too_many: Vec<Vec<u8>> = (0..5).map(|i| vec![b'a' + i; 8]).collect();
    let e = c.append_blocking(too_many).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Invalid(m) if m.contains("over the limit")),
        "{e}"
    );
    let e = c
        .append_blocking(vec![vec![b'x'; 600], vec![b'y'; 600]])
        .unwrap_err();
    assert!(matches!(e, LedgerError::Invalid(_)), "{e}");
    assert_eq!(c.append_blocking(vec![b"ok".to_vec()]).unwrap(), 0..1);
    c.shutdown();
    writer.join().unwrap();
    verify_path(base.path()).unwrap();
}
