//! What several nodes on one database rely on: an entry key held once whichever node
//! appends it, and one node leading at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_store::{EntryKey, Log, LogError, Seen, Store};

const FROM_START: Seen = Seen {
    followed: 0,
    own_from: 0,
};
use ciyuan_store_postgres::testing::TestCluster;
use ciyuan_store_postgres::{PgLog, PgStore, Pool};
use std::ops::Range;
use std::time::Duration;

fn signer() -> ciyuan_tlog::NoteSigner {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    ciyuan_tlog::NoteSigner::new("test.ciyuan/pg", key).unwrap()
}

fn key(n: u8) -> EntryKey {
    [n; 32]
}

/// Appends `entries` with `keys` and waits for the outcome.
fn append(
    log: &PgLog,
    entries: &[&str],
    keys: Vec<Option<EntryKey>>,
) -> Result<Range<u64>, LogError> {
    let (tx, rx) = std::sync::mpsc::channel();
    log.append_keyed(
        entries.iter().map(|e| e.as_bytes().to_vec()).collect(),
        keys,
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    rx.recv().unwrap()
}

#[test]
fn an_entry_key_is_held_once_across_nodes() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("keys").unwrap();
    let a = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    let b = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    assert!(a.keeps_keys());
    let first = append(
        &a,
        &["a0", "a1", "a2"],
        vec![Some(key(1)), None, Some(key(2))],
    )
    .unwrap();
    assert_eq!(first, 0..3);
    // B's append holding A's key 1 is refused whole, naming A's entry; nothing of it
    // is written.
    let err = append(&b, &["b0", "b1"], vec![Some(key(3)), Some(key(1))]).unwrap_err();
    match err {
        LogError::Duplicate(held) => assert_eq!(held, vec![(1, 0)]),
        other => panic!("{other}"),
    }
    assert_eq!(b.refresh().unwrap(), 3);
    // Key 3 was not kept by the refused append: it can be appended now.
    assert_eq!(append(&b, &["b0"], vec![Some(key(3))]).unwrap(), 3..4);
    assert_eq!(
        a.find_keys(&[key(1), key(2), key(3), key(4)]).unwrap(),
        vec![Some(0), Some(2), Some(3), None]
    );
    // Unkeyed appends and the conformance of the rest are untouched.
    let (tx, rx) = std::sync::mpsc::channel();
    a.append(
        vec![b"plain".to_vec()],
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    assert_eq!(rx.recv().unwrap().unwrap(), 4..5);
    // Keys and entries must pair up.
    let err = a
        .append_keyed(vec![b"x".to_vec()], vec![], Box::new(|_| {}))
        .unwrap_err();
    assert!(err.to_string().contains("0 keys for 1 entries"), "{err}");
}

#[test]
fn nodes_racing_with_the_same_keys_record_each_once() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("race").unwrap();
    let nodes: Vec<PgLog> = (0..3)
        .map(|_| PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap())
        .collect();
    // Every node sends the same 40 keyed appends (of 2 entries each) from 4 threads.
    let won: Vec<Vec<(u8, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .flat_map(|node| (0..4).map(move |t| (node, t)))
            .map(|(node, t)| {
                s.spawn(move || {
                    let mut won = Vec::new();
                    for i in 0..40u8 {
                        let k = i.wrapping_add(t * 10) % 40;
                        match append(node, &["x", "y"], vec![Some(key(k)), Some(key(k + 100))]) {
                            Ok(r) => won.push((k, r.start)),
                            Err(LogError::Duplicate(held)) => {
                                assert!(!held.is_empty(), "a refusal names what holds the keys");
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut won: Vec<(u8, u64)> = won.into_iter().flatten().collect();
    won.sort_unstable();
    assert_eq!(
        won.iter().map(|w| w.0).collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>(),
        "each key won by exactly one append"
    );
    assert_eq!(
        nodes[0].refresh().unwrap(),
        80,
        "no refused append left an entry"
    );
    let found = nodes[1]
        .find_keys(&(0..40).map(key).collect::<Vec<_>>())
        .unwrap();
    for ((_, start), f) in won.iter().zip(found) {
        assert_eq!(f, Some(*start));
    }
}

#[test]
fn one_node_leads_at_a_time_and_another_takes_over_when_its_lease_lapses() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("lead").unwrap();
    let a = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let b = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let term = Duration::from_millis(800);
    assert!(a.lead("a", term).unwrap());
    assert!(!b.lead("b", term).unwrap(), "a holds the lease");
    std::thread::sleep(Duration::from_millis(500));
    // Renewed by its holder: still a's after the first term would have ended.
    assert!(a.lead("a", term).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(!b.lead("b", term).unwrap(), "renewed, not lapsed");
    std::thread::sleep(Duration::from_millis(900));
    assert!(b.lead("b", term).unwrap(), "lapsed: b takes it");
    assert!(!a.lead("a", term).unwrap(), "and a no longer leads");
}

#[test]
fn holds_from_racing_nodes_never_exceed_the_amount() {
    use ciyuan_store::HoldTerm;
    use rust_decimal::Decimal;
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("holds").unwrap();
    let stores: Vec<PgStore> = (0..3)
        .map(|_| PgStore::open(Pool::connect(&url).unwrap()).unwrap())
        .collect();
    for (n, s) in stores.iter().enumerate() {
        s.heartbeat(&format!("n{n}"), 0).unwrap();
    }
    // 3 nodes x 8 clients, each client holding 0.25 until refused, on an amount of
    // 10 none of which is used yet: at most 40 holds in all, whichever node and
    // client takes them.
    let held: usize = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .iter()
            .enumerate()
            .flat_map(|(n, store)| (0..8).map(move |c| (n, c, store)))
            .map(|(n, c, store)| {
                s.spawn(move || {
                    let mut won = 0;
                    for i in 0..40 {
                        let term = HoldTerm {
                            counter: "wallet".into(),
                            local: Decimal::ZERO,
                            need: Decimal::new(25, 2),
                            amount: Decimal::from(10),
                        };
                        let id = ((n * 100 + c) * 1000 + i) as i64;
                        let refused = store
                            .reserve(
                                &format!("n{n}"),
                                id,
                                FROM_START,
                                &[term],
                                Duration::from_secs(60),
                            )
                            .unwrap();
                        if refused.is_none() {
                            won += 1;
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(held, 40, "exactly what fits is held, across nodes");
}

#[test]
fn a_group_of_holds_is_judged_in_order_each_seeing_those_before_it() {
    use ciyuan_store::HoldTerm;
    use rust_decimal::Decimal;
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("group").unwrap();
    let a = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let b = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    a.heartbeat("a", 0).unwrap();
    b.heartbeat("b", 0).unwrap();
    let term = |counter: &str, need: i64, amount: i64| HoldTerm {
        counter: counter.into(),
        local: Decimal::ZERO,
        need: Decimal::from(need),
        amount: Decimal::from(amount),
    };
    // Another node holds 3 of the limit's 10.
    assert_eq!(
        b.reserve(
            "b",
            1,
            FROM_START,
            &[term("limit", 3, 10)],
            Duration::from_secs(60)
        )
        .unwrap(),
        None
    );
    let r1 = [term("limit", 4, 10), term("wallet", 1, 100)];
    let r2 = [term("wallet", 1, 100), term("limit", 4, 10)];
    let r3 = [term("limit", 1, 10)];
    let answers = a
        .reserve_many(
            "a",
            FROM_START,
            &[],
            &[(11, &r1[..]), (12, &r2[..]), (13, &r3[..])],
            Duration::from_secs(60),
        )
        .unwrap();
    // 3 + 4 fit; the second request's limit term (its second) would make 11; the
    // third fits in what the second did not take.
    assert_eq!(answers[0], None);
    assert_eq!(answers[1], Some((1, Decimal::from(7))));
    assert_eq!(answers[2], None);
    // A refused request held nothing: 2 of the 10 are left, and the wallet holds 1.
    assert_eq!(
        b.reserve(
            "b",
            2,
            FROM_START,
            &[term("limit", 3, 10)],
            Duration::from_secs(60)
        )
        .unwrap(),
        Some((0, Decimal::from(8)))
    );
    assert_eq!(
        b.reserve(
            "b",
            3,
            FROM_START,
            &[term("wallet", 99, 100)],
            Duration::from_secs(60)
        )
        .unwrap(),
        None
    );
}

/// A hold its node names as counted already (its request's usage is in the node's
/// count, its settling here not yet done) is not counted again for that node, in
/// flight or settled; another node naming it changes nothing.
#[test]
fn holds_a_node_counts_already_are_not_counted_again_for_it() {
    use ciyuan_store::{HoldTerm, Seen, SettledHold};
    use rust_decimal::Decimal;
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("counted").unwrap();
    let a = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let b = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    a.heartbeat("a", 0).unwrap();
    b.heartbeat("b", 0).unwrap();
    let ttl = Duration::from_secs(60);
    let term = |need: i64, local: i64| HoldTerm {
        counter: "limit".into(),
        local: Decimal::from(local),
        need: Decimal::from(need),
        amount: Decimal::from(15),
    };
    let ask = |s: &PgStore, node: &str, seen: Seen, counted: &[i64], id: i64, t: HoldTerm| {
        s.reserve_many(node, seen, counted, &[(id, &[t][..])], ttl)
            .unwrap()
            .pop()
            .unwrap()
    };
    assert_eq!(ask(&a, "a", FROM_START, &[], 21, term(6, 0)), None);
    // Hold 21's request ended and node a counts its 6: named, it is counted once.
    assert_eq!(
        ask(&a, "a", FROM_START, &[], 22, term(6, 6)),
        Some((0, Decimal::from(6))),
        "6 counted + 6 held + 6 asked > 15"
    );
    assert_eq!(ask(&a, "a", FROM_START, &[21], 22, term(6, 6)), None);
    // Settled by entry 5, which node a's count holds although it asks as of entry 3.
    a.settle_holds(&[SettledHold {
        id: 21,
        entry: 5,
        actual: vec![("limit".into(), Decimal::from(6))],
    }])
    .unwrap();
    let behind = Seen {
        followed: 0,
        own_from: 3,
    };
    assert_eq!(
        ask(&a, "a", behind, &[], 23, term(1, 6)),
        Some((0, Decimal::from(12)))
    );
    assert_eq!(ask(&a, "a", behind, &[21], 23, term(1, 6)), None);
    // Node b counts none of node a's usage: naming a's holds changes nothing for it.
    assert_eq!(
        ask(&b, "b", FROM_START, &[21, 22, 23], 24, term(3, 0)),
        Some((0, Decimal::from(13)))
    );
    assert_eq!(
        ask(&b, "b", FROM_START, &[21, 22, 23], 24, term(2, 0)),
        None
    );
}

#[test]
fn a_slice_takes_a_share_of_the_room_and_counts_until_resized() {
    use ciyuan_store::{HoldTerm, SliceAsk, SliceSize};
    use rust_decimal::Decimal;
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("slices").unwrap();
    let a = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let b = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    a.heartbeat("a", 0).unwrap();
    b.heartbeat("b", 0).unwrap();
    let ttl = Duration::from_secs(60);
    let term = |need: i64, local: i64| HoldTerm {
        counter: "limit".into(),
        local: Decimal::from(local),
        need: Decimal::from(need),
        amount: Decimal::from(1000),
    };
    let ask = |id: i64, want: i64, least: i64| SliceAsk {
        id,
        term: term(want, 100),
        least: Decimal::from(least),
    };
    // 900 left of 1000 as node a counts it; two live nodes: a share is 900 / 4, cut
    // to the unit's scale, and never more than asked.
    let granted = a
        .reserve_slices(
            "a",
            FROM_START,
            &[],
            &[ask(1, 500, 10), ask(2, 50, 10)],
            ttl,
        )
        .unwrap();
    assert_eq!(
        granted,
        vec![Some(Decimal::from(225)), Some(Decimal::from(50))]
    );
    // The slices count as requests in flight for everyone: 1000 - 100 - 275 = 625.
    assert_eq!(
        b.reserve("b", 3, FROM_START, &[term(626, 100)], ttl)
            .unwrap(),
        Some((0, Decimal::from(275)))
    );
    assert_eq!(
        b.reserve("b", 4, FROM_START, &[term(625, 100)], ttl)
            .unwrap(),
        None
    );
    // Nothing left to share: refused, nothing held.
    assert_eq!(
        b.reserve_slices("b", FROM_START, &[], &[ask(5, 100, 1)], ttl)
            .unwrap(),
        vec![None]
    );
    // Slice 1 trimmed to 25 and slice 2 gone: 250 back.
    a.resize_slices(&[
        SliceSize {
            id: 1,
            counter: "limit".into(),
            amount: Decimal::from(25),
            recorded: None,
        },
        SliceSize {
            id: 2,
            counter: "limit".into(),
            amount: Decimal::ZERO,
            recorded: None,
        },
    ])
    .unwrap();
    assert_eq!(
        b.reserve("b", 6, FROM_START, &[term(251, 100)], ttl)
            .unwrap(),
        Some((0, Decimal::from(650)))
    );
    // Closed with its usage recorded at entry 7: counted by a node that has not
    // followed to 7, not by one that has.
    a.resize_slices(&[SliceSize {
        id: 1,
        counter: "limit".into(),
        amount: Decimal::from(20),
        recorded: Some(7),
    }])
    .unwrap();
    let behind = Seen {
        followed: 7,
        own_from: 0,
    };
    let past = Seen {
        followed: 8,
        own_from: 0,
    };
    assert_eq!(
        b.reserve("b", 8, behind, &[term(256, 100)], ttl).unwrap(),
        Some((0, Decimal::from(645)))
    );
    assert_eq!(
        b.reserve("b", 9, past, &[term(275, 100)], ttl).unwrap(),
        None
    );
    // A node whose heartbeat is stale gets no slice.
    let quiet = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    assert!(
        quiet
            .reserve_slices("never-seen", FROM_START, &[], &[ask(10, 1, 1)], ttl)
            .unwrap_err()
            .is_retryable()
    );
}

#[test]
fn a_lease_is_one_nodes_at_a_time_and_handed_over_when_another_waits() {
    use ciyuan_store::LeaseTaken::{Busy, Kept, Taken};
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("leases").unwrap();
    let a = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let b = PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    let (term, share) = (Duration::from_secs(60), Duration::from_millis(300));
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Taken);
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Kept);
    // Another lease is another name.
    assert_eq!(b.take_lease("other", "b", term, share).unwrap(), Taken);
    // b waits: a keeps it until it has held it for `share`, then lets it go.
    assert_eq!(b.take_lease("tiers", "b", term, share).unwrap(), Busy);
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Kept);
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Busy);
    assert_eq!(b.take_lease("tiers", "b", term, share).unwrap(), Taken);
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Busy);
    // Dropped by its holder, anyone takes it; dropped by another, nothing happens.
    a.drop_lease("tiers", "a").unwrap();
    assert_eq!(b.take_lease("tiers", "b", term, share).unwrap(), Kept);
    b.drop_lease("tiers", "b").unwrap();
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Taken);
    // Let go and taken again with nobody in between: kept.
    a.drop_lease("tiers", "a").unwrap();
    assert_eq!(a.take_lease("tiers", "a", term, share).unwrap(), Kept);
    // A lapsed lease is anyone's.
    assert_eq!(
        b.take_lease("lapse", "b", Duration::from_millis(100), share)
            .unwrap(),
        Taken
    );
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(a.take_lease("lapse", "a", term, share).unwrap(), Taken);
}

/// Holds the log's head lock from outside, so every node's appends wait (their keys
/// are claimed meanwhile), until dropped.
struct HeadLocked(postgres::Client);

impl HeadLocked {
    fn take(url: &str) -> HeadLocked {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute("BEGIN; SELECT 1 FROM log_head FOR UPDATE")
            .unwrap();
        HeadLocked(c)
    }

    fn release(mut self) {
        self.0.batch_execute("COMMIT").unwrap();
    }
}

/// Sends a keyed append and returns where its outcome will arrive.
fn send(
    log: &PgLog,
    entry: &str,
    keys: Vec<Option<EntryKey>>,
) -> std::sync::mpsc::Receiver<Result<Range<u64>, LogError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    log.append_keyed(
        vec![entry.as_bytes().to_vec()],
        keys,
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    rx
}

/// Waits until `sql` (one count) answers `n`.
fn until_count(url: &str, sql: &str, n: i64) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.query_one(sql, &[]).unwrap().get::<_, i64>(0) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{sql} never came to {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_nodes_sending_one_key_at_once_record_it_once_and_the_second_is_answered_with_it() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("at_once").unwrap();
    let a = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    let b = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    let head = HeadLocked::take(&url);
    // A claims the key; its append waits for the head.
    let from_a = send(&a, "a", vec![Some(key(7))]);
    until_count(&url, "SELECT count(*) FROM log_keys", 1);
    // B finds A's claim pending: it waits for it rather than answering at once.
    let from_b = send(&b, "b", vec![Some(key(7))]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        from_b.try_recv().is_err(),
        "B waits while A's claim is pending"
    );
    head.release();
    assert_eq!(from_a.recv().unwrap().unwrap(), 0..1);
    match from_b.recv().unwrap() {
        Err(LogError::Duplicate(held)) => assert_eq!(held, vec![(0, 0)]),
        other => panic!("B should be answered with A's entry: {other:?}"),
    }
    assert_eq!(b.refresh().unwrap(), 1, "one entry");
    assert_eq!(b.find_keys(&[key(7)]).unwrap(), vec![Some(0)]);
}

#[test]
fn a_claim_that_expired_before_its_append_is_refused_once_another_node_took_its_keys() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("expired").unwrap();
    let a = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    let b = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    a.set_claim_life(Duration::from_millis(300));
    let head = HeadLocked::take(&url);
    let from_a = send(&a, "a", vec![Some(key(8))]);
    until_count(&url, "SELECT count(*) FROM log_keys", 1);
    // A's claim expires while its append waits (a slow or stalled node): B takes the
    // key from it and claims it for itself.
    std::thread::sleep(Duration::from_millis(400));
    let from_b = send(&b, "b", vec![Some(key(8))]);
    until_count(
        &url,
        "SELECT count(*) FROM log_claims WHERE id > 0 AND start IS NULL AND expires > now()",
        1,
    );
    head.release();
    // However the two writers are ordered on the head, A's append no longer holds its
    // key and is refused (retryable); B's is recorded, once.
    match from_a.recv().unwrap() {
        Err(e @ LogError::Unavailable(_)) => {
            assert!(e.to_string().contains("expired"), "{e}")
        }
        other => panic!("A's append must be refused: {other:?}"),
    }
    assert_eq!(from_b.recv().unwrap().unwrap(), 0..1);
    assert_eq!(a.refresh().unwrap(), 1, "the key's entry once");
    assert_eq!(a.find_keys(&[key(8)]).unwrap(), vec![Some(0)]);
}

#[test]
fn a_claim_left_by_a_dead_node_expires_and_frees_its_keys() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("dead").unwrap();
    let b = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    // A node claimed key 9 and died before its append: its claim stays pending.
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(
        "INSERT INTO log_claims (id, expires)
             VALUES (nextval('log_claim_ids'), now() + interval '600 milliseconds');
         INSERT INTO log_keys (key, claim, pos)
             VALUES (decode(repeat('09', 16), 'hex'), currval('log_claim_ids'), 0);",
    )
    .unwrap();
    // B waits for the claim, which never comes to an entry: once it expired B is told
    // to send again (nothing recorded), and the next try takes the key.
    let t = std::time::Instant::now();
    match send(&b, "b", vec![Some(key(9))]).recv().unwrap() {
        Err(e @ LogError::Unavailable(_)) => assert!(e.is_retryable()),
        other => panic!("B must be told to retry: {other:?}"),
    }
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        send(&b, "b", vec![Some(key(9))]).recv().unwrap().unwrap(),
        0..1
    );
    assert_eq!(b.find_keys(&[key(9)]).unwrap(), vec![Some(0)]);
}

#[test]
fn keys_recorded_before_claims_existed_keep_their_entries() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("legacy").unwrap();
    let a = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    assert_eq!(
        append(&a, &["x", "y"], vec![None, Some(key(5))]).unwrap(),
        0..2
    );
    a.close();
    drop(a);
    // The schema as it was before claims (migration 13, and those after it, which
    // are applied again as they may be: `IF NOT EXISTS`): each key with its entry's
    // index.
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(
        "ALTER TABLE log_keys ADD COLUMN idx BIGINT;
         UPDATE log_keys k SET idx = c.start + k.pos FROM log_claims c WHERE c.id = k.claim;
         ALTER TABLE log_keys DROP COLUMN claim, DROP COLUMN pos;
         ALTER TABLE log_keys ALTER COLUMN idx SET NOT NULL;
         DROP TABLE log_claims;
         DROP SEQUENCE log_claim_ids;
         DELETE FROM schema_migrations WHERE version >= 13;",
    )
    .unwrap();
    assert_eq!(
        c.query_one("SELECT idx FROM log_keys", &[])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    // Migrated on open: the old key still names its entry and still holds.
    let b = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    assert_eq!(b.find_keys(&[key(5)]).unwrap(), vec![Some(1)]);
    match append(&b, &["z"], vec![Some(key(5))]) {
        Err(LogError::Duplicate(held)) => assert_eq!(held, vec![(0, 1)]),
        other => panic!("the old key must hold: {other:?}"),
    }
    assert_eq!(append(&b, &["w"], vec![Some(key(6))]).unwrap(), 2..3);
    assert_eq!(
        b.find_keys(&[key(5), key(6)]).unwrap(),
        vec![Some(1), Some(2)]
    );
}
