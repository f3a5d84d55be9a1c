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
