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
use std::time::Duration;

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
/// for errors the server reports).
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Connections to one database, reused: each is taken by one caller at a time and
/// returned when dropped (a broken one is dropped instead).
#[derive(Clone)]
pub struct Pool(Arc<PoolInner>);

struct PoolInner {
    config: postgres::Config,
    idle: Mutex<Vec<postgres::Client>>,
}

/// Most idle connections kept.
const MAX_IDLE: usize = 16;

impl Pool {
    /// A pool for `url` (`postgres://user@host:port/db` or `host=... dbname=...`),
    /// checked by opening one connection. Connecting gives up after 5 s unless the URL
    /// says otherwise.
    pub fn connect(url: &str) -> Result<Pool, String> {
        let mut config: postgres::Config = url.parse().map_err(|e| format!("database URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let pool = Pool(Arc::new(PoolInner {
            config,
            idle: Mutex::new(Vec::new()),
        }));
        off_runtime(|| pool.get().map(drop))?;
        Ok(pool)
    }

    /// A connection: an idle one, else a new one.
    pub fn get(&self) -> Result<Conn<'_>, String> {
        let idle = self
            .0
            .idle
            .lock()
            .map_err(|_| "the pool's lock is poisoned".to_string())?
            .pop();
        let client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => self
                .0
                .config
                .connect(postgres::NoTls)
                .map_err(|e| format!("connecting to PostgreSQL: {}", describe(&e)))?,
        };
        Ok(Conn {
            pool: &self.0,
            client: Some(client),
        })
    }
}

/// A pooled connection (dereferences to [`postgres::Client`]).
pub struct Conn<'a> {
    pool: &'a PoolInner,
    client: Option<postgres::Client>,
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
        if let Some(c) = self.client.take()
            && !c.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(c);
        }
    }
}
