//! The log conformance suite against a throwaway PostgreSQL cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_store::Log;
use ciyuan_store::conformance::log::{LogBackend, run_all};
use ciyuan_store_postgres::testing::TestCluster;
use ciyuan_store_postgres::{PgLog, Pool};

struct Backend {
    cluster: TestCluster,
    next: u32,
    url: String,
}

fn signer() -> ciyuan_tlog::NoteSigner {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    ciyuan_tlog::NoteSigner::new("test.ciyuan/pg", key).unwrap()
}

impl LogBackend for Backend {
    fn fresh(&mut self) -> Box<dyn Log> {
        self.next += 1;
        self.url = self.cluster.database(&format!("log{}", self.next)).unwrap();
        Box::new(PgLog::open(Pool::connect(&self.url).unwrap(), signer()).unwrap())
    }
    fn reopen(&mut self, log: Box<dyn Log>) -> Box<dyn Log> {
        drop(log);
        Box::new(PgLog::open(Pool::connect(&self.url).unwrap(), signer()).unwrap())
    }
}

#[test]
fn the_log_on_postgres_keeps_the_log_contract() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let mut b = Backend {
        cluster,
        next: 0,
        url: String::new(),
    };
    run_all(&mut b);
}

#[test]
fn a_log_signed_by_another_key_is_refused() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("other").unwrap();
    drop(PgLog::open(Pool::connect(&url).unwrap(), signer()).unwrap());
    let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let other = ciyuan_tlog::NoteSigner::new("test.ciyuan/pg", key).unwrap();
    let err = PgLog::open(Pool::connect(&url).unwrap(), other)
        .err()
        .unwrap();
    assert!(err.to_string().contains("signed by"), "{err}");
}

#[test]
fn the_store_on_postgres_keeps_the_store_contract() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let next = std::cell::Cell::new(0u32);
    ciyuan_store::conformance::run_all(&|| {
        next.set(next.get() + 1);
        let url = cluster.database(&format!("store{}", next.get())).unwrap();
        Box::new(ciyuan_store_postgres::PgStore::open(Pool::connect(&url).unwrap()).unwrap())
    });
}

#[test]
fn migrations_are_applied_once_when_nodes_start_together() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("together").unwrap();
    let applied: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let pool = Pool::connect(&url).unwrap();
                    ciyuan_store_postgres::migrate(&mut pool.get().unwrap()).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        applied.iter().sum::<usize>(),
        ciyuan_store_postgres::SCHEMA_VERSION,
        "each migration applied by exactly one node: {applied:?}"
    );
}

/// `cargo test -p ciyuan-store-postgres --release --test conformance -- --ignored
/// --nocapture bench_tag_month`: see [`ciyuan_store::conformance::bench_tag_month`].
#[test]
#[ignore]
fn bench_tag_month() {
    let cluster = TestCluster::start().expect("a PostgreSQL cluster for the tests");
    let url = cluster.database("tagbench").unwrap();
    let store = ciyuan_store_postgres::PgStore::open(Pool::connect(&url).unwrap()).unwrap();
    ciyuan_store::conformance::bench_tag_month(&store);
}
