//! The log when PostgreSQL fails under it: a connection cut while a COMMIT is in
//! flight (through a proxy that cuts it at exactly that moment, after or before the
//! server got the COMMIT), and the server stopped and started again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_store::{Log, LogError};
use ciyuan_store_postgres::testing::TestCluster;
use ciyuan_store_postgres::{PgLog, Pool};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

fn signer() -> ciyuan_tlog::NoteSigner {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    ciyuan_tlog::NoteSigner::new("test.ciyuan/pg", key).unwrap()
}

/// The simple-query message `Transaction::commit` sends.
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

/// What the proxy does to the next COMMIT it sees.
const PASS: u8 = 0;
/// Forwards it, then cuts the connection before the answer reaches the client: the
/// transaction committed and the client cannot know.
const CUT_AFTER: u8 = 1;
/// Cuts the connection instead of forwarding it: the server rolls back.
const CUT_BEFORE: u8 = 2;

/// [`CUT_AFTER`], and from then on new connections are closed at once (the database
/// out of reach) until [`Proxy::unblock`].
const CUT_AFTER_AND_BLOCK: u8 = 3;

/// A TCP proxy in front of the cluster that cuts one connection at its next COMMIT.
struct Proxy {
    port: u16,
    arm: Arc<AtomicU8>,
    blocked: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let arm = Arc::new(AtomicU8::new(PASS));
        let armed = arm.clone();
        let blocked = Arc::new(AtomicBool::new(false));
        let block = blocked.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if block.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mute = Arc::new(AtomicBool::new(false));
                let (c2, s2, m2) = (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    mute.clone(),
                );
                // Server to client, unless muted.
                std::thread::spawn(move || pump(s2, c2, &m2, None));
                let (arm, block) = (armed.clone(), block.clone());
                std::thread::spawn(move || pump(client, server, &mute, Some((&arm, &block))));
            }
        });
        Proxy { port, arm, blocked }
    }

    fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }

    fn cut_next_commit(&self, how: u8) {
        self.arm.store(how, Ordering::SeqCst);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mute: &AtomicBool,
    arm: Option<(&AtomicU8, &AtomicBool)>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some((arm, block)) = arm
            && chunk.windows(COMMIT.len()).any(|w| w == COMMIT)
        {
            let how = arm.swap(PASS, Ordering::SeqCst);
            if how == CUT_AFTER_AND_BLOCK {
                block.store(true, Ordering::SeqCst);
            }
            match how {
                CUT_AFTER | CUT_AFTER_AND_BLOCK => {
                    mute.store(true, Ordering::SeqCst);
                    let _ = to.write_all(chunk);
                    // Long enough for the server to commit.
                    std::thread::sleep(Duration::from_millis(300));
                    break;
                }
                CUT_BEFORE => break,
                _ => {}
            }
        }
        if mute.load(Ordering::SeqCst) || to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn port_of(url: &str) -> u16 {
    url.split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .expect("the test cluster's URL names its port")
}

fn append(log: &dyn Log, entries: Vec<Vec<u8>>) -> Result<Range<u64>, LogError> {
    let (tx, rx) = mpsc::channel();
    log.append(
        entries,
        Box::new(move |r| {
            tx.send(r).unwrap();
        }),
    )?;
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the writer answers")
}

fn all_entries(log: &dyn Log) -> Vec<Vec<u8>> {
    let size = log.size();
    let mut out = Vec::new();
    log.scan(0..size, &mut |_, b| {
        out.push(b.to_vec());
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn a_commit_cut_off_is_acknowledged_when_it_happened_and_failed_when_it_did_not() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("cut").unwrap();
    let proxy = Proxy::start(port_of(&url));
    let via = url.replace(
        &format!("port={}", port_of(&url)),
        &format!("port={}", proxy.port),
    );
    let log = PgLog::open(Pool::connect(&via).unwrap(), signer()).unwrap();
    append(&log, vec![b"{\"n\":0}".to_vec()]).unwrap();

    // The server committed; the answer was lost with the connection. The writer finds
    // out and acknowledges the entries where they are.
    proxy.cut_next_commit(CUT_AFTER);
    let kept = vec![b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()];
    let range = append(&log, kept.clone()).expect("a committed append is acknowledged");
    assert_eq!(range, 1..3);
    for (i, e) in range.clone().zip(&kept) {
        assert_eq!(&log.entry(i).unwrap(), e);
    }

    // The COMMIT never reached the server: the append is reported failed, retryable,
    // and is not in the log.
    proxy.cut_next_commit(CUT_BEFORE);
    let lost = b"{\"n\":3}".to_vec();
    let err = append(&log, vec![lost.clone()]).expect_err("a rolled back append fails");
    assert!(err.is_retryable(), "{err}");
    assert!(!all_entries(&log).contains(&lost));

    // And the writer goes on: the retry lands once.
    let again = append(&log, vec![lost.clone()]).unwrap();
    assert_eq!(again, 3..4);
    let entries = all_entries(&log);
    assert_eq!(entries.len(), 4);
    assert_eq!(entries.iter().filter(|e| **e == lost).count(), 1);
    assert_eq!(proxy.arm.load(Ordering::SeqCst), PASS, "both cuts happened");
    let cp = {
        let (tx, rx) = mpsc::channel();
        log.checkpoint(Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        rx.recv().unwrap().unwrap()
    };
    assert_eq!(cp.checkpoint.size, 4);
    assert_eq!(cp.checkpoint.root, log.root_at(4).unwrap());
}

#[test]
fn the_log_fails_fast_while_postgres_is_down_and_recovers_by_itself() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("restart").unwrap();
    let log = PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap();
    append(&log, vec![b"{\"n\":0}".to_vec()]).unwrap();
    assert!(log.available().is_ok());

    cluster.halt().unwrap();
    // Every append fails at once with a retryable error, and nothing spins: the
    // follower marks the log unavailable within its backoff.
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let err = append(&log, vec![format!("{{\"down\":{i}}}").into_bytes()]).unwrap_err();
        slowest = slowest.max(t.elapsed());
        assert!(err.is_retryable(), "{err}");
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest failed append {slowest:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.available().is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = log.available().unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(log.entry(0).unwrap_err().is_retryable());

    cluster.resume().unwrap();
    // Back within the backoff, without reopening anything.
    let deadline = Instant::now() + Duration::from_secs(10);
    let range = loop {
        match append(&log, vec![b"{\"n\":1}".to_vec()]) {
            Ok(r) => break r,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                assert!(Instant::now() < deadline, "the log did not come back: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(range, 1..2, "none of the failed appends is in the log");
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.available().is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log.available().is_ok());
    assert_eq!(all_entries(&log).len(), 2);
}

#[test]
fn a_session_idle_inside_a_transaction_is_ended_by_the_server() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("idle").unwrap();
    let pool = Pool::connect(&url).unwrap();
    let mut c = pool.get().unwrap();
    let v: String = c
        .query_one("SHOW idle_in_transaction_session_timeout", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "10s");
    // A URL's own setting is kept.
    let own = Pool::connect(&format!(
        "{url} options='-c idle_in_transaction_session_timeout=3s'"
    ))
    .unwrap();
    let v: String = own
        .get()
        .unwrap()
        .query_one("SHOW idle_in_transaction_session_timeout", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "3s");
}

#[test]
fn while_a_commit_s_outcome_is_unknown_new_appends_fail_fast_and_it_is_answered_once_known() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("doubt").unwrap();
    let proxy = Proxy::start(port_of(&url));
    let via = url.replace(
        &format!("port={}", port_of(&url)),
        &format!("port={}", proxy.port),
    );
    let log = Arc::new(PgLog::open(Pool::connect(&via).unwrap(), signer()).unwrap());
    append(log.as_ref(), vec![b"{\"n\":0}".to_vec()]).unwrap();

    // The COMMIT reaches the server, its answer is lost, and the database is then out
    // of reach: the writer cannot know yet.
    proxy.cut_next_commit(CUT_AFTER_AND_BLOCK);
    let (tx, pending) = mpsc::channel();
    let doubtful = b"{\"n\":1}".to_vec();
    log.append(
        vec![doubtful.clone()],
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.available().is_ok() {
        assert!(Instant::now() < deadline, "the log never noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others are refused at once, retryable, while the first waits for its answer.
    for i in 0..5 {
        let t = Instant::now();
        let err = append(
            log.as_ref(),
            vec![format!("{{\"later\":{i}}}").into_bytes()],
        )
        .expect_err("refused while in doubt");
        assert!(err.is_retryable(), "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
    // Longer than the follower's poll: its own connection still works, but the log
    // stays unavailable while the outcome is unknown.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(1500) {
        assert!(log.available().is_err(), "available while in doubt");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        pending.try_recv().is_err(),
        "no answer before the outcome is known"
    );

    proxy.unblock();
    let range = pending
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("the append committed and is acknowledged");
    assert_eq!(range, 1..2);
    assert_eq!(log.entry(1).unwrap(), doubtful);
    let entries = all_entries(log.as_ref());
    assert_eq!(entries.len(), 2, "none of the refused appends is there");
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.available().is_err() {
        assert!(Instant::now() < deadline, "the log stays unavailable");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_claim_whose_answer_was_lost_is_given_up_once_postgres_answers_again() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("claim_lost").unwrap();
    let proxy = Proxy::start(port_of(&url));
    let via = url.replace(
        &format!("port={}", port_of(&url)),
        &format!("port={}", proxy.port),
    );
    let log = PgLog::open(Pool::connect(&via).unwrap(), signer()).unwrap();
    let keyed = |log: &PgLog| {
        let (tx, rx) = mpsc::channel();
        log.append_keyed(
            vec![b"{\"n\":0}".to_vec()],
            vec![Some([4u8; 32])],
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
        rx.recv_timeout(Duration::from_secs(60)).unwrap()
    };
    // The claim commits but its answer is lost, and PostgreSQL is then out of reach:
    // the claim stays in the database, pending, as the append fails.
    proxy.cut_next_commit(CUT_AFTER_AND_BLOCK);
    let err = keyed(&log).expect_err("the append fails");
    assert!(err.is_retryable(), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    proxy.unblock();
    // Sent again once PostgreSQL answers: the node gives its lost claim up first, so
    // the event is recorded at once, not after the claim expired (CLAIM_LIFE, 10 s).
    let t = Instant::now();
    let range = loop {
        match keyed(&log) {
            Ok(r) => break r,
            Err(e) if e.is_retryable() && t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(range, 0..1);
    assert_eq!(log.find_keys(&[[4u8; 32]]).unwrap(), vec![Some(0)]);
}
