//! PostgreSQL backend of the [`ciyuan_store`] traits: several Ciyuan nodes share one
//! log ([`PgLog`]) and one set of projections in one database.
//!
//! The schema is versioned: [`migrate`] applies what a database lacks, in one
//! transaction under an advisory lock, so nodes starting together apply each migration
//! once; a database migrated by a newer Ciyuan is refused rather than misread.
#![deny(missing_docs)]

mod holds;
mod log;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use log::PgLog;
pub use store::PgStore;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key of the advisory lock migrations take (`ciyuan` in ASCII).
const MIGRATION_LOCK: i64 = 0x6369_7975_616e;

/// The schema, one migration per entry, applied in order.
const MIGRATIONS: &[&str] = &[
    // 1: the log.
    r#"
CREATE TABLE log_head (
    one      BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    size     BIGINT NOT NULL,
    frontier BYTEA NOT NULL,
    signer   TEXT NOT NULL
);
CREATE TABLE log_entries (
    idx   BIGINT PRIMARY KEY,
    leaf  BYTEA NOT NULL,
    bytes BYTEA NOT NULL
);
CREATE TABLE log_nodes (
    level SMALLINT NOT NULL,
    idx   BIGINT NOT NULL,
    hash  BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE log_checkpoints (
    seq  BIGINT PRIMARY KEY,
    size BIGINT NOT NULL,
    note TEXT NOT NULL
);
"#,
    // 2: projections and keys.
    store::MIGRATION,
    // 3: scheduled reports' progress.
    store::MIGRATION_REPORTS,
    // 4: the log's entry keys (an ingested event once, whichever node records it).
    r#"
CREATE TABLE log_keys (
    key BYTEA PRIMARY KEY,
    idx BIGINT NOT NULL
);
"#,
    // 5: which node runs the work done once (`Store::lead`).
    r#"
CREATE TABLE leader (
    one   BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    node  TEXT NOT NULL,
    until TIMESTAMPTZ NOT NULL
);
"#,
    // 6: gateway requests held across nodes (`Store::reserve`).
    holds::MIGRATION,
    // 7: changes of the rules of measuring and pricing, one at a time across nodes
    // (`Store::raise_barrier`).
    r#"
CREATE TABLE rules_barrier (
    one      BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    id       BIGINT NOT NULL,
    node     TEXT NOT NULL,
    raised   TIMESTAMPTZ NOT NULL,
    lowered  BOOLEAN NOT NULL DEFAULT false,
    size     BIGINT
);
ALTER TABLE nodes ADD COLUMN paused BIGINT;
"#,
    // 8: keys listed a page at a time (`Store::keys_page`).
    store::MIGRATION_KEYS_BY_NODE,
    // 9: slices of a counter's room held by one node (`Store::reserve_slices`).
    holds::MIGRATION_SLICES,
    // 10: named leases handed over between nodes (`Store::take_lease`).
    holds::MIGRATION_LEASES,
    // 11: console sessions (`Store::insert_session`).
    store::MIGRATION_SESSIONS,
    // 12: subtree rollups (`Store::usage_tree`); projections rebuilt from the log.
    store::MIGRATION_TREES,
    // 13: entry keys claimed before the append, out of the head lock (`log.rs`).
    log::MIGRATION_CLAIMS,
    // 14: usage by attribution tag set (`ciyuan_store::tags`).
    store::MIGRATION_TAGS,
    // 15: usage by API key and session (`ciyuan_store::subjects`); projections
    // rebuilt from the log.
    store::MIGRATION_SUBJECTS,
    // 16: holds a node counts already, not counted again (`holds.rs`).
    holds::MIGRATION_COUNTED,
    // 17: answers providers keep to be retrieved (`Store::response`).
    store::MIGRATION_RESPONSES,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Applies the migrations `client`'s database lacks. Safe when several nodes start
/// at once: they queue on an advisory lock, and each migration is applied once.
pub fn migrate(client: &mut postgres::Client) -> Result<usize, String> {
    let mut tx = client.transaction().map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| describe(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(|e| describe(&e))?;
    let applied: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            &[],
        )
        .map_err(|e| describe(&e))?
        .get(0);
    let applied = usize::try_from(applied).map_err(|_| format!("schema version {applied}"))?;
    if applied > MIGRATIONS.len() {
        return Err(format!(
            "the database's schema is version {applied}, newer than this build's {}: run a newer ciyuan",
            MIGRATIONS.len()
        ));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(m)
            .map_err(|e| format!("migration {}: {}", i + 1, describe(&e)))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&((i + 1) as i32)],
        )
        .map_err(|e| describe(&e))?;
    }
    tx.commit().map_err(|e| describe(&e))?;
    Ok(MIGRATIONS.len() - applied)
}

/// Runs `f`, which blocks on PostgreSQL, where that is allowed: the synchronous client
/// drives its own small runtime, which cannot start on a thread already driving a
/// tokio runtime, so on a worker of the server's (multi-threaded) runtime `f` runs in
/// [`tokio::task::block_in_place`], which also lets the other tasks of that worker
/// move on. Elsewhere (plain threads, `spawn_blocking`) it runs as it is. A
/// current-thread runtime cannot host this backend.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// An error with what the server said (`postgres::Error`'s display is only "db error"
/// for errors the server reports, and leaves out the cause of a failed connection).
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// A PostgreSQL failure as the rest of Ciyuan sees it. [`Fault::of`] is the one place
/// where the driver's errors are sorted into retryable and permanent ones; the store
/// and the log turn a fault into their own error types from it.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What the server or the connection said.
    pub text: String,
    /// The same call may succeed later: the connection was lost or refused, the
    /// server is shutting down or starting, or the transaction was rolled back by a
    /// serialization failure or a deadlock.
    pub retryable: bool,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Fault {}

impl Fault {
    /// Classifies a driver error: a database error by its SQLSTATE, anything else by
    /// the state of the connection.
    pub fn of(e: &postgres::Error) -> Fault {
        let retryable = match e.as_db_error() {
            Some(db) => retryable_state(db.code().code()),
            // The driver's error kinds are private; their texts are fixed. A broken
            // or refused connection (Io, Connect, Closed) or a connect timeout may
            // heal; a protocol, type or configuration error will not.
            None => {
                e.is_closed() || {
                    let kind = e.to_string();
                    kind == "error communicating with the server"
                        || kind == "error connecting to server"
                        || kind == "timeout waiting for server"
                }
            }
        };
        Fault {
            text: describe(e),
            retryable,
        }
    }

    /// A retryable fault that did not come from the driver (the pool waiting out a
    /// refused connection).
    fn unreachable(text: String) -> Fault {
        Fault {
            text,
            retryable: true,
        }
    }

    /// As the store reports it.
    pub fn store(self) -> ciyuan_store::StoreError {
        if self.retryable {
            ciyuan_store::StoreError::Unavailable(self.text)
        } else {
            ciyuan_store::StoreError::Backend(self.text)
        }
    }
}

/// Whether a SQLSTATE names a transient condition.
fn retryable_state(code: &str) -> bool {
    matches!(
        code,
        // serialization_failure, deadlock_detected: the transaction was rolled back.
        "40001" | "40P01"
        // admin_shutdown, crash_shutdown, cannot_connect_now (starting up or shutting
        // down), idle_session_timeout.
        | "57P01" | "57P02" | "57P03" | "57P05"
        // query_canceled (a statement timeout), lock_not_available (a lock timeout).
        | "57014" | "55P03"
        // read_only_sql_transaction: a standby, before a failover completes.
        | "25006"
    ) || code.starts_with("08") // connection exceptions
        || code.starts_with("53") // insufficient resources: too many connections, memory, disk
}

/// Connections to one database, reused: each is taken by one caller at a time and
/// returned when dropped (a broken one is dropped instead).
///
/// A connection found closed (the server restarted, or it was cut) empties the pool:
/// the idle ones were opened before the same fault and would each fail a caller. A
/// refused connection makes the pool refuse at once, without trying, for a backoff
/// that doubles up to [`MAX_BACKOFF`]: during an outage requests fail fast and the
/// server is not hammered, and the first attempt after the backoff finds it back.
#[derive(Clone)]
pub struct Pool(Arc<PoolInner>);

struct PoolInner {
    config: postgres::Config,
    idle: Mutex<Idle>,
}

struct Idle {
    conns: Vec<postgres::Client>,
    /// Bumped each time the pool is emptied; a connection taken before is not kept.
    epoch: u64,
    /// The last refused connection: until when to refuse without trying, the backoff
    /// that set it, and why.
    down: Option<(Instant, Duration, String)>,
}

/// Most idle connections kept.
const MAX_IDLE: usize = 16;
/// First wait after a refused connection before the pool tries again.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between attempts while the database is out of reach.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a session may sit idle inside a transaction before the server ends it
/// (unless the URL sets `idle_in_transaction_session_timeout` itself).
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);
/// How long connecting may take unless the URL says otherwise: a request waits at
/// most this for a database that does not answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl Pool {
    /// A pool for `url` (`postgres://user@host:port/db` or `host=... dbname=...`),
    /// checked by opening one connection. Connecting gives up after
    /// [`CONNECT_TIMEOUT`], TCP keepalives (10 s idle, then 3 probes 2 s apart) and a
    /// 10 s TCP user timeout find a server that vanished without closing its
    /// connections, and the server ends sessions idle in a transaction after
    /// [`IDLE_IN_TRANSACTION`]: each unless the URL sets its own.
    pub fn connect(url: &str) -> Result<Pool, String> {
        let mut config: postgres::Config = url.parse().map_err(|e| format!("database URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A server that vanished without closing its connections (a network fault, a
        // host gone) is found in seconds, not in TCP's hours: a request waiting on it
        // fails, retryably, instead of hanging.
        if !url.contains("keepalives") {
            config
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(10))
                .keepalives_interval(Duration::from_secs(2))
                .keepalives_retries(3);
        }
        if !url.contains("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(10));
        }
        // A node cut off mid-transaction (a network fault, not a crash) leaves its
        // session holding the log's head lock until the server notices, which TCP
        // alone takes hours to do: every node's appends would wait. Ciyuan's
        // transactions never sit idle, so the server may end any session that does.
        let options = match config.get_options() {
            Some(o) => o.to_string(),
            None => String::new(),
        };
        if !options.contains("idle_in_transaction_session_timeout") {
            config.options(&format!(
                "{options} -c idle_in_transaction_session_timeout={}",
                IDLE_IN_TRANSACTION.as_millis()
            ));
        }
        let pool = Pool(Arc::new(PoolInner {
            config,
            idle: Mutex::new(Idle {
                conns: Vec::new(),
                epoch: 0,
                down: None,
            }),
        }));
        off_runtime(|| pool.get().map(drop)).map_err(|e| e.text)?;
        Ok(pool)
    }

    fn idle(&self) -> Result<std::sync::MutexGuard<'_, Idle>, Fault> {
        self.0.idle.lock().map_err(|_| Fault {
            text: "the pool's lock is poisoned".into(),
            retryable: false,
        })
    }

    /// A connection: an idle one, else a new one. While the database refuses
    /// connections, fails at once (retryable) until the backoff has passed.
    pub fn get(&self) -> Result<Conn<'_>, Fault> {
        let (idle, epoch) = {
            let mut idle = self.idle()?;
            let conn = idle.conns.pop();
            if conn.is_none()
                && let Some((until, _, why)) = &idle.down
                && Instant::now() < *until
            {
                return Err(Fault::unreachable(format!(
                    "PostgreSQL is out of reach ({why}); retrying shortly"
                )));
            }
            (conn, idle.epoch)
        };
        let client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => match self.0.config.connect(postgres::NoTls) {
                Ok(c) => {
                    self.idle()?.down = None;
                    c
                }
                Err(e) => {
                    let fault = Fault::of(&e);
                    let mut idle = self.idle()?;
                    let backoff = match &idle.down {
                        Some((_, b, _)) => (*b * 2).min(MAX_BACKOFF),
                        None => MIN_BACKOFF,
                    };
                    idle.down = Some((Instant::now() + backoff, backoff, fault.text.clone()));
                    return Err(Fault {
                        text: format!("connecting to PostgreSQL: {}", fault.text),
                        retryable: fault.retryable,
                    });
                }
            },
        };
        Ok(Conn {
            pool: &self.0,
            client: Some(client),
            epoch,
        })
    }

    /// Drops every idle connection: they were opened before a fault (a restart of
    /// the server) that the caller saw, and would each fail a caller of their own.
    pub fn flush(&self) {
        if let Ok(mut idle) = self.0.idle.lock() {
            idle.conns.clear();
            idle.epoch += 1;
        }
    }

    /// Whether the pool last failed to connect (and has not connected since).
    pub fn is_down(&self) -> bool {
        self.0.idle.lock().map_or(true, |i| i.down.is_some())
    }
}

/// A pooled connection (dereferences to [`postgres::Client`]).
pub struct Conn<'a> {
    pool: &'a PoolInner,
    client: Option<postgres::Client>,
    /// The pool's epoch when it was taken.
    epoch: u64,
}

impl std::ops::Deref for Conn<'_> {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        // Set at creation, taken only by drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        let Ok(mut idle) = self.pool.idle.lock() else {
            return;
        };
        if c.is_closed() {
            // Whatever closed this one (most often a restart) closed the idle ones too.
            idle.conns.clear();
            idle.epoch += 1;
        } else if idle.epoch == self.epoch && idle.conns.len() < MAX_IDLE {
            idle.conns.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_sorted_into_retryable_and_permanent() {
        for code in [
            "40001", "40P01", "57P01", "57P02", "57P03", "08006", "08001", "53300", "55P03",
            "25006",
        ] {
            assert!(retryable_state(code), "{code}");
        }
        // unique_violation, not_null_violation, undefined_table, syntax_error,
        // datatype_mismatch, data_corrupted, database_dropped, internal_error.
        for code in [
            "23505", "23502", "42P01", "42601", "42804", "XX001", "57P04", "XX000",
        ] {
            assert!(!retryable_state(code), "{code}");
        }
    }

    #[test]
    fn a_refused_connection_is_retryable_and_the_pool_then_fails_fast() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let url = format!("host=127.0.0.1 port={port} user=nobody dbname=none");
        let err = Pool::connect(&url).err().unwrap();
        assert!(err.contains("connecting to PostgreSQL"), "{err}");
        let config: postgres::Config = url.parse().unwrap();
        let pool = Pool(Arc::new(PoolInner {
            config,
            idle: Mutex::new(Idle {
                conns: Vec::new(),
                epoch: 0,
                down: None,
            }),
        }));
        let first = pool.get().err().unwrap();
        assert!(first.retryable, "{first}");
        assert!(pool.is_down());
        // Within the backoff the pool answers without trying.
        let second = pool.get().err().unwrap();
        assert!(second.retryable);
        assert!(second.text.contains("out of reach"), "{second}");
        std::thread::sleep(MIN_BACKOFF * 2);
        let third = pool.get().err().unwrap();
        assert!(third.text.starts_with("connecting"), "{third}");
    }
}
