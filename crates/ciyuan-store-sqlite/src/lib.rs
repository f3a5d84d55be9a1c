//! SQLite backend of the [`ciyuan_store::Store`] trait: the embedded default.
//!
//! One database file beside the ledger holds the projections (accounts, hourly usage
//! rollups, and the index of the last entry applied) and the API keys (hashed).
//! Projections are applied in one transaction together with the new projection
//! watermark, so after a crash they are either wholly applied or not at all, and the
//! server replays the log from the watermark.
#![deny(missing_docs)]

mod cells;

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Entry, Scopes};
use ciyuan_store::{
    Account, Change, CostAdd, HourFilter, HourRow, KeyRecord, OwnRows, RangeStart, Recorded,
    SessionRecord, Store, StoreError, SubtreeSeek, UsageAdd, subtree_seek,
    tree::{Span, Subtrees, TreeFilter},
};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('projected_through', 0);
CREATE TABLE accounts (
    path          TEXT PRIMARY KEY,
    info          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    created_entry INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE keys (
    seq         INTEGER PRIMARY KEY,
    key_id      TEXT NOT NULL UNIQUE,
    secret_hash BLOB NOT NULL UNIQUE,
    account     TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    name        TEXT,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX keys_account ON keys (account);
CREATE TABLE usage_hourly (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    tokens    INTEGER NOT NULL,
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE ingested (
    source TEXT NOT NULL,
    id     TEXT NOT NULL,
    entry  INTEGER NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE budgets (
    node  TEXT NOT NULL,
    name  TEXT NOT NULL,
    spec  TEXT NOT NULL,
    entry INTEGER NOT NULL,
    PRIMARY KEY (node, name)
) WITHOUT ROWID;
CREATE TABLE access_rules (
    node  TEXT PRIMARY KEY,
    rules TEXT NOT NULL,
    entry INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE flagged (
    entry   INTEGER PRIMARY KEY,
    ts      TEXT NOT NULL,
    account TEXT NOT NULL,
    usage   TEXT NOT NULL
);
CREATE INDEX flagged_account ON flagged (account);
CREATE TABLE incidents (
    entry    INTEGER PRIMARY KEY,
    ts       TEXT NOT NULL,
    account  TEXT NOT NULL,
    incident TEXT NOT NULL
);
CREATE INDEX incidents_account ON incidents (account);
"#,
    // The idempotency index keyed by entry, so it grows by appending whatever the ids
    // (random ids dirtied a random page of the old (source, id) B-tree per event:
    // ingest fell to ~60k events/s). It is filled by projecting the log again.
    r#"
DROP TABLE ingested;
CREATE TABLE ingest_index (
    entry INTEGER PRIMARY KEY,
    hash  INTEGER NOT NULL
);
DELETE FROM accounts;
DELETE FROM usage_hourly;
DELETE FROM budgets;
DELETE FROM access_rules;
DELETE FROM flagged;
DELETE FROM incidents;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#,
    // Token sums exact whatever the ledger holds: SQLite turns an integer sum that
    // overflows i64 into a float, which made usage answer 500 and the server refuse to
    // start. A sum is now `hi * 2^62 + lo` with `0 <= lo < 2^62`, added with carry in
    // the upsert; the CHECK turns any float into an error instead of a stored value.
    // Rebuilt by projecting the log again.
    r#"
DROP TABLE usage_hourly;
CREATE TABLE usage_hourly (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    hi        INTEGER NOT NULL CHECK (typeof(hi) = 'integer'),
    lo        INTEGER NOT NULL CHECK (typeof(lo) = 'integer' AND lo >= 0 AND lo < 4611686018427387904),
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
DELETE FROM accounts;
DELETE FROM ingest_index;
DELETE FROM budgets;
DELETE FROM access_rules;
DELETE FROM flagged;
DELETE FROM incidents;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#,
    // Token definitions are ledger entries (`definition.set`). No earlier entry can be
    // one, so nothing needs projecting again.
    r#"
CREATE TABLE definitions (
    service    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    definition TEXT NOT NULL,
    entry      INTEGER NOT NULL,
    PRIMARY KEY (service, version)
) WITHOUT ROWID;
"#,
    // Money: price books, contracts, wallet postings and settings, and hourly cost
    // rollups of rated usage. No earlier entry is of these kinds or rated.
    r#"
CREATE TABLE price_books (
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    book    TEXT NOT NULL,
    entry   INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE TABLE contracts (
    node     TEXT PRIMARY KEY,
    contract TEXT NOT NULL,
    entry    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE wallet_settings (
    node     TEXT NOT NULL,
    currency TEXT NOT NULL,
    settings TEXT NOT NULL,
    entry    INTEGER NOT NULL,
    PRIMARY KEY (node, currency)
) WITHOUT ROWID;
CREATE TABLE postings (
    entry   INTEGER PRIMARY KEY,
    ts      TEXT NOT NULL,
    account TEXT NOT NULL,
    posting TEXT NOT NULL
);
CREATE TABLE posting_nodes (
    node  TEXT NOT NULL,
    entry INTEGER NOT NULL,
    PRIMARY KEY (node, entry)
) WITHOUT ROWID;
CREATE TABLE cost_hourly (
    account  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    service  TEXT NOT NULL,
    model    TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   TEXT NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
) WITHOUT ROWID;
"#,
    // 8: tier counters (graduated and volume tiers' units per period).
    r#"
CREATE TABLE tier_units (
    node   TEXT NOT NULL,
    book   TEXT NOT NULL,
    rule   TEXT NOT NULL,
    period TEXT NOT NULL,
    units  TEXT NOT NULL,
    PRIMARY KEY (node, book, rule, period)
) WITHOUT ROWID;
CREATE TABLE cost_lines (
    account    TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    adjustment INTEGER NOT NULL,
    service    TEXT NOT NULL,
    model      TEXT NOT NULL,
    key        TEXT NOT NULL,
    unit_price TEXT NOT NULL,
    currency   TEXT NOT NULL,
    book       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    quantity   TEXT NOT NULL,
    list       TEXT NOT NULL,
    contracted TEXT NOT NULL,
    billed     TEXT NOT NULL,
    PRIMARY KEY (account, hour, adjustment, service, model, key, unit_price, currency, book, version)
) WITHOUT ROWID;
CREATE TABLE cost_lines_daily (
    account    TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    adjustment INTEGER NOT NULL,
    service    TEXT NOT NULL,
    model      TEXT NOT NULL,
    key        TEXT NOT NULL,
    unit_price TEXT NOT NULL,
    currency   TEXT NOT NULL,
    book       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    quantity   TEXT NOT NULL,
    list       TEXT NOT NULL,
    contracted TEXT NOT NULL,
    billed     TEXT NOT NULL,
    PRIMARY KEY (account, hour, adjustment, service, model, key, unit_price, currency, book, version)
) WITHOUT ROWID;
CREATE TABLE statements (
    node   TEXT NOT NULL,
    period TEXT NOT NULL,
    entry  INTEGER NOT NULL,
    ts     TEXT NOT NULL,
    closed TEXT NOT NULL,
    PRIMARY KEY (node, period)
) WITHOUT ROWID;
"#,
    // 9: service levels evaluated, and where each hour's gateway requests lie in the
    // log.
    r#"
CREATE TABLE service_levels (
    node      TEXT NOT NULL,
    level     TEXT NOT NULL,
    period    TEXT NOT NULL,
    entry     INTEGER NOT NULL,
    ts        TEXT NOT NULL,
    evaluated TEXT NOT NULL,
    PRIMARY KEY (node, level, period)
) WITHOUT ROWID;
CREATE TABLE quality_hours (
    hour  INTEGER PRIMARY KEY,
    first INTEGER NOT NULL,
    last  INTEGER NOT NULL
);
"#,
    // 10: scheduled reports' progress (the latest period each schedule delivered).
    r#"
CREATE TABLE report_progress (
    name         TEXT PRIMARY KEY,
    period_start INTEGER NOT NULL,
    entry        INTEGER NOT NULL,
    ts           TEXT NOT NULL,
    account      TEXT NOT NULL,
    delivered    TEXT NOT NULL
) WITHOUT ROWID;
"#,
    // 11: keys listed a page at a time in (node, id) order, each page one index seek.
    r#"
DROP INDEX keys_account;
CREATE INDEX keys_account_id ON keys (account, key_id);
"#,
    // 12: console sessions (the SHA-256 of each id, never the id), not projections:
    // a rebuild keeps them, as it keeps keys.
    r#"
CREATE TABLE sessions (
    id_hash    BLOB PRIMARY KEY,
    key_id     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
) WITHOUT ROWID;
CREATE INDEX sessions_expiry ON sessions (expires_at);
"#,
    // 13: subtree rollups (each node's whole subtree by UTC hour and day), so a node's
    // month is read from its own rows, not summed over every descendant's; hourly
    // billing lines as cells (see `cells`). Rebuilt by projecting the log again.
    r#"
CREATE TABLE usage_tree_hourly (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    hi        INTEGER NOT NULL CHECK (typeof(hi) = 'integer'),
    lo        INTEGER NOT NULL CHECK (typeof(lo) = 'integer' AND lo >= 0 AND lo < 4611686018427387904),
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
CREATE TABLE usage_tree_daily (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    hi        INTEGER NOT NULL CHECK (typeof(hi) = 'integer'),
    lo        INTEGER NOT NULL CHECK (typeof(lo) = 'integer' AND lo >= 0 AND lo < 4611686018427387904),
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
CREATE TABLE cost_tree_hourly (
    account  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    service  TEXT NOT NULL,
    model    TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   TEXT NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
) WITHOUT ROWID;
CREATE TABLE cost_tree_daily (
    account  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    service  TEXT NOT NULL,
    model    TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   TEXT NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
) WITHOUT ROWID;
DROP TABLE cost_lines;
CREATE TABLE cost_cells (
    account TEXT NOT NULL,
    hour    INTEGER NOT NULL,
    service TEXT NOT NULL,
    model   TEXT NOT NULL,
    lines   BLOB NOT NULL,
    PRIMARY KEY (account, hour, service, model)
) WITHOUT ROWID;
DELETE FROM accounts;
DELETE FROM usage_hourly;
DELETE FROM ingest_index;
DELETE FROM budgets;
DELETE FROM access_rules;
DELETE FROM flagged;
DELETE FROM incidents;
DELETE FROM definitions;
DELETE FROM price_books;
DELETE FROM contracts;
DELETE FROM wallet_settings;
DELETE FROM postings;
DELETE FROM posting_nodes;
DELETE FROM cost_hourly;
DELETE FROM tier_units;
DELETE FROM cost_lines_daily;
DELETE FROM statements;
DELETE FROM service_levels;
DELETE FROM quality_hours;
DELETE FROM report_progress;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#,
    // 14: the idempotency index as one row per projected batch, its events' `(entry,
    // hash)` pairs packed in a blob (see `insert_ingest_index`): a row per event cost
    // ~0.3 µs of the projector's time per ingested event. Rebuilt by projecting the
    // log again.
    r#"
DROP TABLE ingest_index;
CREATE TABLE ingest_blocks (
    first INTEGER PRIMARY KEY,
    pairs BLOB NOT NULL
);
DELETE FROM accounts;
DELETE FROM usage_hourly;
DELETE FROM budgets;
DELETE FROM access_rules;
DELETE FROM flagged;
DELETE FROM incidents;
DELETE FROM definitions;
DELETE FROM price_books;
DELETE FROM contracts;
DELETE FROM wallet_settings;
DELETE FROM postings;
DELETE FROM posting_nodes;
DELETE FROM cost_hourly;
DELETE FROM tier_units;
DELETE FROM cost_cells;
DELETE FROM cost_lines_daily;
DELETE FROM statements;
DELETE FROM service_levels;
DELETE FROM quality_hours;
DELETE FROM report_progress;
DELETE FROM usage_tree_hourly;
DELETE FROM usage_tree_daily;
DELETE FROM cost_tree_hourly;
DELETE FROM cost_tree_daily;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#,
    // 15: usage by attribution tag set (`ciyuan_store::tags`): the exact hourly
    // rollups' shape, `service` holding the tag set and the service. No earlier entry
    // carries tags, so nothing needs projecting again.
    r#"
CREATE TABLE usage_tag_hourly (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    hi        INTEGER NOT NULL CHECK (typeof(hi) = 'integer'),
    lo        INTEGER NOT NULL CHECK (typeof(lo) = 'integer' AND lo >= 0 AND lo < 4611686018427387904),
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
CREATE TABLE cost_tag_hourly (
    account  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    service  TEXT NOT NULL,
    model    TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   TEXT NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
) WITHOUT ROWID;
"#,
    // 16: usage by API key and by session (`ciyuan_store::subjects`), in the tag
    // rollups' shape. Entries written since keys and sessions were recorded carry
    // them, so the projections are rebuilt from the log (`REBUILD`).
    r#"
CREATE TABLE usage_subject_hourly (
    account   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    modality  TEXT NOT NULL,
    direction TEXT NOT NULL,
    hi        INTEGER NOT NULL CHECK (typeof(hi) = 'integer'),
    lo        INTEGER NOT NULL CHECK (typeof(lo) = 'integer' AND lo >= 0 AND lo < 4611686018427387904),
    PRIMARY KEY (account, hour, service, model, modality, direction)
) WITHOUT ROWID;
CREATE TABLE cost_subject_hourly (
    account  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    service  TEXT NOT NULL,
    model    TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount   TEXT NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
) WITHOUT ROWID;
-- REBUILD
"#,
    // 17: answers providers keep to be retrieved (`Store::response`). Only entries
    // written since carry the id, so nothing is rebuilt.
    r#"
CREATE TABLE responses (
    id       TEXT PRIMARY KEY,
    entry    INTEGER NOT NULL,
    ts       TEXT NOT NULL,
    account  TEXT NOT NULL,
    upstream TEXT NOT NULL
) WITHOUT ROWID;
"#,
];

/// The line of a migration after which the projections are rebuilt from the log:
/// every projection table is cleared in the migration's own transaction, so a crash
/// never leaves the new schema with projections made without it.
const REBUILD: &str = "-- REBUILD";

/// Clears every projection `tx` has (those of an earlier schema version too), to be
/// projected again from the log.
fn clear_projections(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    for table in PROJECTIONS {
        let exists: bool = tx
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?",
                [table],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if exists {
            tx.execute(&format!("DELETE FROM {table}"), [])
                .map_err(backend)?;
        }
    }
    tx.execute(
        "UPDATE meta SET value = 0 WHERE name = 'projected_through'",
        [],
    )
    .map_err(backend)?;
    Ok(())
}

/// Every projection table, cleared by a reset (keys and sessions are kept).
const PROJECTIONS: &[&str] = &[
    "accounts",
    "usage_hourly",
    "ingest_blocks",
    "budgets",
    "access_rules",
    "flagged",
    "incidents",
    "definitions",
    "price_books",
    "contracts",
    "wallet_settings",
    "postings",
    "posting_nodes",
    "cost_hourly",
    "tier_units",
    "cost_cells",
    "cost_lines_daily",
    "statements",
    "service_levels",
    "quality_hours",
    "report_progress",
    "usage_tree_hourly",
    "usage_tree_daily",
    "cost_tree_hourly",
    "cost_tree_daily",
    "usage_tag_hourly",
    "cost_tag_hourly",
    "usage_subject_hourly",
    "cost_subject_hourly",
    "responses",
];

/// A token sum as stored: `hi * 2^62 + lo`, `0 <= lo < 2^62`. Sums of the ledger's
/// counts fit: each entry's count is an i64 (< 2^63), so `hi` stays within i64 for
/// any log of fewer than 2^61 entries per row, far beyond any disk.
const LO_BITS: u32 = 62;

fn split_sum(v: i128) -> Result<(i64, i64), StoreError> {
    let hi = i64::try_from(v >> LO_BITS)
        .map_err(|_| StoreError::Backend(format!("token sum {v} exceeds the stored range")))?;
    // In 0..2^62 by construction of the mask.
    let lo = (v & ((1i128 << LO_BITS) - 1)) as i64;
    Ok((hi, lo))
}

fn join_sum(hi: i64, lo: i64) -> i128 {
    (i128::from(hi) << LO_BITS) + i128::from(lo)
}

/// Prepared statements kept per connection: more than the store has (each rollup
/// table's upsert counts once), so none is ever parsed twice.
const STATEMENT_CACHE: usize = 128;

/// The page cache of a database opened from a file, in KiB.
const PAGE_CACHE_KIB: u32 = 16 << 10;

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    // The file, for the exports' read connection; none in memory.
    path: Option<std::path::PathBuf>,
    // The exports' own read-only connection, opened on first use: an export reads
    // gigabytes a page at a time, and on the store's connection it would hold the lock
    // the projector and every request wait on for all that time.
    exports: Mutex<Option<Connection>>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Runs one query (its SQL and bound values).
type QueryFn<'a> = dyn FnMut(&str, Vec<String>) -> Result<(), StoreError> + 'a;

/// Takes one line of a cell.
type CellLineFn<'a> = dyn FnMut(&Cell<'_>, &cells::LineBytes<'_>) -> Result<std::ops::ControlFlow<()>, StoreError>
    + 'a;

impl SqliteStore {
    /// Runs `run` on each query that together read what `filter` asks of the `what`
    /// (`usage` or `cost`) rollups: per node, its own hourly rows and one range of
    /// hours or days below it for each stretch of the filter's range, and with
    /// [`Subtrees::ChildrenOf`] the node's own hourly rows.
    fn each_tree_query(
        &self,
        conn: &Connection,
        filter: &TreeFilter,
        what: &str,
        run: &mut QueryFn<'_>,
    ) -> Result<(), StoreError> {
        let columns = if what == "usage" {
            USAGE_COLUMNS
        } else {
            COST_COLUMNS
        };
        let (nodes, own) = match &filter.subtrees {
            Subtrees::Of(node) => (vec![node.clone()], None),
            Subtrees::ChildrenOf(node) => {
                let (cond, args) = subtree("path", node);
                let mut stmt = conn
                    .prepare_cached(&format!("SELECT path FROM accounts WHERE {cond}"))
                    .map_err(backend)?;
                let paths = stmt
                    .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))
                    .map_err(backend)?
                    .map(|p| parse_path(&p.map_err(backend)?))
                    .collect::<Result<Vec<_>, _>>()?;
                let children = ciyuan_store::tree::children_of(node, &paths)
                    .into_iter()
                    .cloned()
                    .collect();
                (children, Some(node))
            }
        };
        let stretches = filter.stretches();
        let (range, more) = hour_range(filter.from_hour, filter.to_hour);
        for node in &nodes {
            // The node's own usage, then what lies below it.
            let mut args = vec![node.as_str().to_string()];
            args.extend(more.iter().cloned());
            run(
                &format!("{columns} FROM {what}_hourly WHERE account = ?{range}"),
                args,
            )?;
            for stretch in &stretches {
                let table = match stretch.span {
                    Span::Hour => "hourly",
                    Span::Day => "daily",
                };
                let (range, mut more) = hour_range(stretch.from, stretch.to);
                let mut args = vec![node.as_str().to_string()];
                args.append(&mut more);
                run(
                    &format!("{columns} FROM {what}_tree_{table} WHERE account = ?{range}"),
                    args,
                )?;
            }
        }
        if let Some(node) = own {
            let mut args = vec![node.as_str().to_string()];
            args.extend(more.iter().cloned());
            run(
                &format!("{columns} FROM {what}_hourly WHERE account = ?{range}"),
                args,
            )?;
        }
        Ok(())
    }

    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        // WAL lets readers run beside the projector. NORMAL: the projections are
        // derived from the ledger, and a commit lost to a power failure is applied again
        // from `projected_through`, which is committed with it; not syncing the WAL on
        // every projector commit leaves the disk to the ledger's `fdatasync` (+4% ingest).
        // Keys are not derivable from the ledger (their secret hashes are not logged):
        // they are written by [`SqliteStore::durably`].
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(backend)?;
        // The rollups' insertion points (every node's newest hours in five tables)
        // outgrow SQLite's default 2 MiB page cache at a hundred busy nodes: each missed
        // page is read back from the WAL or the file. 16 MiB, taken as it is used.
        conn.execute_batch(&format!("PRAGMA cache_size = -{PAGE_CACHE_KIB}"))
            .map_err(backend)?;
        let mut store = Self::init(conn)?;
        store.path = Some(path.to_path_buf());
        Ok(store)
    }

    /// The schema version this build migrates databases to.
    pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(backend)
    }

    /// A throwaway in-memory database, for tests.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        // Every statement the projector runs stays prepared. A gateway batch uses more
        // than rusqlite's default of 16 (each rollup table's upsert is its own), so
        // the least recent were evicted and parsed again in every batch: 5 parses a
        // batch, 1.7% of the gateway's instructions (BENCHMARKS.md, issue 18).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Exact decimal addition inside SQL, so a rollup row is added to in one
        // upsert (SQLite's own arithmetic is binary floating point).
        conn.create_scalar_function(
            "dec_add",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8
                | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| {
                let a: String = ctx.get(0)?;
                let b: String = ctx.get(1)?;
                let fail = |why: String| rusqlite::Error::UserFunctionError(why.into());
                let sum = parse_amount(&a)
                    .and_then(|x| Ok(x.checked_add(parse_amount(&b)?)))
                    .map_err(|e| fail(e.to_string()))?
                    .and_then(|s| s.to_decimal())
                    .ok_or_else(|| fail(format!("{a} + {b} needs more than 28 digits")))?;
                Ok(sum.to_string())
            },
        )
        .map_err(backend)?;
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(backend)?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this build ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(backend)?;
            tx.execute_batch(sql).map_err(backend)?;
            if sql.contains(REBUILD) {
                clear_projections(&tx)?;
            }
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: None,
            exports: Mutex::new(None),
        })
    }

    /// Runs a write that the ledger cannot restore with `synchronous = FULL`, so its
    /// commit syncs the WAL (and with it every commit before it).
    fn durably<T>(
        &self,
        write: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let conn = self.conn();
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        let result = write(&conn);
        // The write's outcome is the answer: if it committed, it is durable, and a
        // connection left on FULL is only slower.
        if let Err(e) = conn.execute_batch("PRAGMA synchronous = NORMAL") {
            tracing::warn!(error = %e, "projections stay on synchronous = FULL");
        }
        result
    }

    /// Every key with the SHA-256 of its secret, in creation order: what moving the
    /// keys to another store needs (the hashes never leave a store otherwise).
    pub fn keys_with_hashes(&self) -> Result<Vec<(KeyRecord, [u8; 32])>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {KEY_COLUMNS}, secret_hash FROM keys ORDER BY seq"
            ))
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(backend)? {
            let hash: Vec<u8> = r.get(6).map_err(backend)?;
            let hash = <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| StoreError::Corrupt("a stored key hash is not 32 bytes".into()))?;
            out.push((key_from_raw(raw_key(r).map_err(backend)?)?, hash));
        }
        Ok(out)
    }

    /// Runs `read` on the exports' read connection (opened on first use), or on the
    /// store's own connection for a database in memory, which no other connection sees.
    fn export_read<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(path) = &self.path else {
            return read(&self.conn());
        };
        let mut slot = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match &mut *slot {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(backend)?;
                c.busy_timeout(std::time::Duration::from_secs(5))
                    .map_err(backend)?;
                // No `mmap_size`: reading the file through a mapping saved no measurable
                // CPU (a scan of 10.8M lines: 3.4-3.9 s either way), and the mapped pages
                // would count in the server's resident memory.
                slot.insert(c)
            }
        };
        read(conn)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions
        // roll back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SQL condition and bound values selecting a subtree of `column`.
/// JSON of a projected value. Plain data serializes without fail; if it ever did not,
/// the projection fails loudly rather than storing an empty string.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("projected value: {e}")))
}

/// Rows of (node, json) decoded.
fn by_node<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
) -> Result<Vec<(AccountPath, T)>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (node, json) = row.map_err(backend)?;
        out.push((
            AccountPath::parse(&node)
                .map_err(|e| StoreError::Backend(format!("stored node {node:?}: {e}")))?,
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Backend(format!("stored value on {node}: {e}")))?,
        ));
    }
    Ok(out)
}

/// Rows of (entry, json) decoded.
fn entries_of<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
) -> Result<Vec<(u64, T)>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (entry, json) = row.map_err(backend)?;
        out.push((
            u64::try_from(entry).map_err(|_| StoreError::Corrupt(format!("entry id {entry}")))?,
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("stored entry {entry}: {e}")))?,
        ));
    }
    Ok(out)
}

/// A node's projected value and the entry that set it.
type NodeEntry<T> = (AccountPath, (u64, T));

/// Rows of (node, entry, json) decoded.
fn by_node_entry<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
) -> Result<Vec<NodeEntry<T>>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(backend)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (node, entry, json) = row.map_err(backend)?;
        out.push((
            parse_path(&node)?,
            (
                u64::try_from(entry)
                    .map_err(|_| StoreError::Corrupt(format!("entry id {entry}")))?,
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("stored value on {node}: {e}")))?,
            ),
        ));
    }
    Ok(out)
}

/// Rows of (entry, ts, account, json) decoded into [`Recorded`] values.
fn recorded<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    args: Vec<String>,
) -> Result<Vec<Recorded<T>>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(backend)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (entry, ts, account, json) = row.map_err(backend)?;
        out.push(Recorded {
            entry: u64::try_from(entry)
                .map_err(|_| StoreError::Corrupt(format!("entry id {entry}")))?,
            ts: ts
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("stored time {ts:?}: {e}")))?,
            // The root is stored as `as_str` writes it: empty.
            account: parse_path(&account)?,
            body: serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("stored entry {entry}: {e}")))?,
        });
    }
    Ok(out)
}

fn subtree(column: &str, path: &AccountPath) -> (String, Vec<String>) {
    if path.is_root() {
        ("1 = 1".to_string(), vec![])
    } else {
        // '0' is the byte after '/', so [p/, p0) is exactly the descendants of p.
        (
            format!("({column} = ? OR ({column} >= ? AND {column} < ?))"),
            vec![
                path.as_str().to_string(),
                format!("{}/", path.as_str()),
                format!("{}0", path.as_str()),
            ],
        )
    }
}

/// SQL selecting the descendants' range of `seek` on `column`, with its values;
/// `cursor` is the condition (and its values) of the rows after the cursor, for a
/// cursor standing in the range.
fn range(column: &str, seek: &SubtreeSeek, cursor: (&str, Vec<String>)) -> (String, Vec<String>) {
    let (mut cond, mut args) = match &seek.from {
        RangeStart::From(p) => (format!("{column} >= ?"), vec![p.clone()]),
        RangeStart::After(p) => (format!("{column} > ?"), vec![p.clone()]),
        RangeStart::Cursor => (cursor.0.to_string(), cursor.1),
    };
    if let Some(to) = &seek.to {
        cond.push_str(&format!(" AND {column} < ?"));
        args.push(to.clone());
    }
    (cond, args)
}

/// What is left of a page of `limit` rows once `got` are read.
fn rest_of(limit: usize, got: usize) -> Result<usize, StoreError> {
    limit
        .checked_sub(got)
        .ok_or_else(|| StoreError::Backend(format!("{got} rows read for a page of {limit}")))
}

/// A page's size as SQL's `LIMIT` reads it: a signed 64-bit integer, so more than it
/// holds is no limit at all.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn parse_ts(s: &str) -> Result<Timestamp, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn parse_path(s: &str) -> Result<AccountPath, StoreError> {
    if s.is_empty() {
        return Ok(AccountPath::root());
    }
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("account path {s:?}: {e}")))
}

type RawKey = (
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
);

fn key_from_raw(raw: RawKey) -> Result<KeyRecord, StoreError> {
    let (key_id, account, scopes, name, created_at, revoked_at) = raw;
    Ok(KeyRecord {
        key_id,
        account: parse_path(&account)?,
        scopes: Scopes::parse_list(&scopes).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        name,
        created_at: parse_ts(&created_at)?,
        revoked_at: revoked_at.as_deref().map(parse_ts).transpose()?,
    })
}

const KEY_COLUMNS: &str = "key_id, account, scopes, name, created_at, revoked_at";

fn raw_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawKey> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

type RawAccount = (String, String, String, i64);

fn account_from_raw(raw: RawAccount) -> Result<Account, StoreError> {
    let (path, info, created_at, created_entry) = raw;
    Ok(Account {
        path: parse_path(&path)?,
        info: serde_json::from_str(&info)
            .map_err(|e| StoreError::Corrupt(format!("account {path:?}: {e}")))?,
        created_at: parse_ts(&created_at)?,
        created_entry: u64::try_from(created_entry)
            .map_err(|_| StoreError::Corrupt(format!("account {path:?}: negative entry id")))?,
    })
}

/// Writes the projection changes (decided by `ciyuan_store::project`) in order.
fn write_changes(tx: &rusqlite::Transaction<'_>, changes: &[Change<'_>]) -> Result<(), StoreError> {
    for change in changes {
        match change {
            Change::AccountCreated {
                entry,
                at,
                path,
                info,
            } => tx
                .prepare_cached(
                    "INSERT INTO accounts (path, info, created_at, created_entry) VALUES (?, ?, ?, ?)
                     ON CONFLICT (path) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![path.as_str(), to_json(info).map_err(sql)?, at.to_string(), *entry as i64])
                }),
            Change::AccountUpdated { path, info } => tx
                .prepare_cached("UPDATE accounts SET info = ? WHERE path = ?")
                .and_then(|mut st| st.execute(params![to_json(info).map_err(sql)?, path.as_str()])),
            Change::BudgetSet {
                entry,
                node,
                budget,
            } => tx
                .prepare_cached(
                    "INSERT INTO budgets (node, name, spec, entry) VALUES (?, ?, ?, ?)
                     ON CONFLICT (node, name) DO UPDATE SET spec = excluded.spec, entry = excluded.entry",
                )
                .and_then(|mut st| {
                    st.execute(params![node.as_str(), budget.name, to_json(budget).map_err(sql)?, *entry as i64])
                }),
            Change::BudgetCleared { node, name } => tx
                .prepare_cached("DELETE FROM budgets WHERE node = ? AND name = ?")
                .and_then(|mut st| st.execute(params![node.as_str(), name])),
            Change::AccessSet { entry, node, rules } => tx
                .prepare_cached(
                    "INSERT INTO access_rules (node, rules, entry) VALUES (?, ?, ?)
                     ON CONFLICT (node) DO UPDATE SET rules = excluded.rules, entry = excluded.entry",
                )
                .and_then(|mut st| st.execute(params![node.as_str(), to_json(rules).map_err(sql)?, *entry as i64])),
            Change::Incident {
                entry,
                at,
                node,
                incident,
            } => tx
                .prepare_cached("INSERT INTO incidents (entry, ts, account, incident) VALUES (?, ?, ?, ?)")
                .and_then(|mut st| {
                    st.execute(params![*entry as i64, at.to_string(), node.as_str(), to_json(incident).map_err(sql)?])
                }),
            Change::Flagged {
                entry,
                at,
                node,
                usage,
            } => tx
                .prepare_cached("INSERT INTO flagged (entry, ts, account, usage) VALUES (?, ?, ?, ?)")
                .and_then(|mut st| {
                    st.execute(params![*entry as i64, at.to_string(), node.as_str(), to_json(usage).map_err(sql)?])
                }),
            Change::ResponseStored {
                entry,
                at,
                node,
                id,
                upstream,
            } => tx
                .prepare_cached(
                    "INSERT INTO responses (id, entry, ts, account, upstream) VALUES (?, ?, ?, ?, ?)
                     ON CONFLICT (id) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![id, *entry as i64, at.to_string(), node.as_str(), upstream])
                }),
            Change::StatementClosed { entry, at, node, closed } => tx
                .prepare_cached(
                    "INSERT INTO statements (node, period, entry, ts, closed) VALUES (?, ?, ?, ?, ?)
                     ON CONFLICT (node, period) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        node.as_str(),
                        closed.period,
                        *entry as i64,
                        at.to_string(),
                        to_json(closed).map_err(sql)?
                    ])
                }),
            Change::ServiceLevelEvaluated { entry, at, node, evaluated } => tx
                .prepare_cached(
                    "INSERT INTO service_levels (node, level, period, entry, ts, evaluated)
                     VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (node, level, period) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        node.as_str(),
                        evaluated.level.name,
                        evaluated.period,
                        *entry as i64,
                        at.to_string(),
                        to_json(evaluated).map_err(sql)?
                    ])
                }),
            Change::PriceBook { entry, book } => tx
                .prepare_cached(
                    "INSERT INTO price_books (name, version, book, entry) VALUES (?, ?, ?, ?)
                     ON CONFLICT (name, version) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![book.name, book.version, to_json(book).map_err(sql)?, *entry as i64])
                }),
            Change::PriceContract { entry, node, contract } => tx
                .prepare_cached(
                    "INSERT INTO contracts (node, contract, entry) VALUES (?, ?, ?)
                     ON CONFLICT (node) DO UPDATE SET contract = excluded.contract, entry = excluded.entry",
                )
                .and_then(|mut st| st.execute(params![node.as_str(), to_json(contract).map_err(sql)?, *entry as i64])),
            Change::WalletSet { entry, node, settings } => tx
                .prepare_cached(
                    "INSERT INTO wallet_settings (node, currency, settings, entry) VALUES (?, ?, ?, ?)
                     ON CONFLICT (node, currency) DO UPDATE SET settings = excluded.settings, entry = excluded.entry",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        node.as_str(),
                        settings.currency.as_str(),
                        to_json(settings).map_err(sql)?,
                        *entry as i64
                    ])
                }),
            Change::Posting { entry, at, node, posting } => tx
                .prepare_cached("INSERT INTO postings (entry, ts, account, posting) VALUES (?, ?, ?, ?)")
                .and_then(|mut st| {
                    st.execute(params![*entry as i64, at.to_string(), node.as_str(), to_json(posting).map_err(sql)?])
                })
                .and_then(|_| {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO posting_nodes (node, entry) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    )?;
                    for leg in &posting.legs {
                        if let Some(n) = leg.account.node() {
                            st.execute(params![n.as_str(), *entry as i64])?;
                        }
                    }
                    Ok(1)
                }),
            // By hand is outside the schedule; a replayed earlier period never moves
            // the progress back.
            Change::ReportDelivered { delivered, .. } if delivered.manual => Ok(0),
            Change::ReportDelivered { entry, at, node, delivered } => tx
                .prepare_cached(
                    "INSERT INTO report_progress (name, period_start, entry, ts, account, delivered)
                     VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (name) DO UPDATE SET period_start = excluded.period_start,
                         entry = excluded.entry, ts = excluded.ts, account = excluded.account,
                         delivered = excluded.delivered
                     WHERE excluded.period_start > report_progress.period_start",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        delivered.name,
                        delivered.period_start.as_second(),
                        *entry as i64,
                        at.to_string(),
                        node.as_str(),
                        to_json(delivered).map_err(sql)?
                    ])
                }),
            Change::DefinitionSet { entry, definition } => tx
                .prepare_cached(
                    "INSERT INTO definitions (service, version, definition, entry) VALUES (?, ?, ?, ?)
                     ON CONFLICT (service, version) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        definition.service,
                        definition.version,
                        to_json(definition).map_err(sql)?,
                        *entry as i64
                    ])
                }),
        }
        .map_err(backend)?;
    }
    Ok(())
}

/// Adds token sums to `table` (the exact hourly rollups, or a subtree rollup), in the
/// table's key order, exactly (`hi * 2^62 + lo`, carried in SQL).
fn upsert_usage<'k>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    rows: impl Iterator<Item = UsageAdd<'k>>,
) -> Result<(), StoreError> {
    let mut rows: Vec<UsageAdd<'k>> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_unstable_by_key(|r| (r.0, r.1, r.2, r.3, r.4.as_str(), r.5.as_str()));
    let mut write = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (account, hour, service, model, modality, direction, hi, lo)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (account, hour, service, model, modality, direction)
             DO UPDATE SET hi = hi + excluded.hi + ((lo + excluded.lo) >> 62),
                           lo = (lo + excluded.lo) & 4611686018427387903"
        ))
        .map_err(backend)?;
    for (node, hour, service, model, modality, direction, tokens) in rows {
        let (hi, lo) = split_sum(tokens)?;
        write
            .execute(params![
                node,
                hour,
                service,
                model,
                modality.as_str(),
                direction.as_str(),
                hi,
                lo
            ])
            .map_err(backend)?;
    }
    Ok(())
}

/// Adds amounts to `table` (the exact hourly cost rollups, or a subtree rollup), in
/// the table's key order, exactly (decimal text added by `dec_add`).
fn upsert_cost<'k>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    rows: impl Iterator<Item = CostAdd<'k>>,
) -> Result<(), StoreError> {
    let mut rows: Vec<CostAdd<'k>> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2, a.3, a.4.as_str()).cmp(&(b.0, b.1, b.2, b.3, b.4.as_str()))
    });
    let mut write = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (account, hour, service, model, currency, amount)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (account, hour, service, model, currency)
             DO UPDATE SET amount = dec_add(amount, excluded.amount)"
        ))
        .map_err(backend)?;
    for (node, hour, service, model, currency, add) in rows {
        let text = amount_text(add, || format!("the cost of {node} in {table}"))?;
        write
            .execute(params![node, hour, service, model, currency.as_str(), text])
            .map_err(backend)?;
    }
    Ok(())
}

/// Adds the hourly cost rollups.
fn add_costs(
    tx: &rusqlite::Transaction<'_>,
    costs: &ciyuan_store::CostSums<'_>,
) -> Result<(), StoreError> {
    upsert_cost(tx, "cost_hourly", costs.iter().map(|(k, a)| k.row(*a)))
}

/// Adds entries `start..` to the rollups kept by a text (tags, keys and sessions).
fn add_keyed(
    tx: &rusqlite::Transaction<'_>,
    start: u64,
    parts: &[&[Entry]],
) -> Result<(), StoreError> {
    ciyuan_store::keyed::project_all(start, parts, |which, sums| {
        upsert_usage(
            tx,
            which.usage_table(),
            sums.usage.iter().map(|(k, n)| k.row(*n)),
        )?;
        upsert_cost(
            tx,
            which.cost_table(),
            sums.cost.iter().map(|(k, a)| k.row(*a)),
        )
    })
}

/// Adds to the subtree rollups, hourly and daily.
fn add_trees(
    tx: &rusqlite::Transaction<'_>,
    usage: &ciyuan_store::tree::TreeUsage<'_>,
    cost: &ciyuan_store::tree::TreeCost<'_>,
) -> Result<(), StoreError> {
    use ciyuan_store::tree::Span;
    for (span, usage_table, cost_table) in [
        (Span::Hour, "usage_tree_hourly", "cost_tree_hourly"),
        (Span::Day, "usage_tree_daily", "cost_tree_daily"),
    ] {
        upsert_usage(
            tx,
            usage_table,
            usage.iter().filter(|(k, _)| k.span == span).map(|(k, n)| {
                (
                    k.node,
                    k.start,
                    k.service,
                    k.model,
                    k.modality,
                    k.direction,
                    *n,
                )
            }),
        )?;
        upsert_cost(
            tx,
            cost_table,
            cost.iter()
                .filter(|(k, _)| k.span == span)
                .map(|(k, a)| (k.node, k.start, k.service, k.model, k.currency, *a)),
        )?;
    }
    Ok(())
}

/// A sum as the decimal text a rollup stores; a sum that needs more than 28 digits is
/// an error naming `what`, never a rounded value.
fn amount_text(
    sum: ciyuan_core::ExactSum,
    what: impl FnOnce() -> String,
) -> Result<String, StoreError> {
    sum.to_decimal()
        .map(|d| d.to_string())
        .ok_or_else(|| StoreError::Backend(format!("{} ({sum}) needs more than 28 digits", what())))
}

/// Adds billing lines, exactly (decimal text added by `dec_add`, as costs).
fn add_cost_lines(
    tx: &rusqlite::Transaction<'_>,
    lines: &ciyuan_store::LineSums<'_>,
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    upsert_cells(tx, lines)?;
    // The same lines by UTC day: a month's statement reads its whole days here and
    // only its edge hours (a zone's midnight is not UTC's) from the hourly table.
    let mut daily = ciyuan_store::LineSums::default();
    for (k, v) in lines {
        let mut day = *k;
        day.hour = k.hour.div_euclid(DAY_SECS) * DAY_SECS;
        let slot = daily.entry(day).or_insert([ciyuan_core::ExactSum::ZERO; 4]);
        for (s, a) in slot.iter_mut().zip(v) {
            *s = s.checked_add(*a).ok_or_else(|| {
                StoreError::Backend(format!("billing line of {} overflows", k.account))
            })?;
        }
    }
    upsert_lines(tx, "cost_lines_daily", &daily)
}

/// Seconds in a UTC day.
const DAY_SECS: i64 = 86_400;

/// Adds `lines` to their cells (see [`cells`]): each cell read, merged and written
/// back, in the table's key order.
fn upsert_cells(
    tx: &rusqlite::Transaction<'_>,
    lines: &ciyuan_store::LineSums<'_>,
) -> Result<(), StoreError> {
    type CellKey<'k> = (&'k str, i64, &'k str, &'k str);
    let mut by_cell: std::collections::BTreeMap<CellKey<'_>, Vec<cells::OwnedLine>> =
        Default::default();
    for (k, add) in lines {
        by_cell
            .entry((k.account.as_str(), k.hour, k.service, k.model))
            .or_default()
            .push(cells::OwnedLine {
                adjustment: k.adjustment,
                key: k.key.text().into_owned(),
                price: k.unit_price.map(|p| p.to_string()).unwrap_or_default(),
                currency: k.currency.as_str().to_string(),
                book: k.book.to_string(),
                version: k.version,
                sums: *add,
            });
    }
    let mut read = tx
        .prepare_cached(
            "SELECT lines FROM cost_cells
             WHERE account = ? AND hour = ? AND service = ? AND model = ?",
        )
        .map_err(backend)?;
    let mut write = tx
        .prepare_cached(
            "INSERT INTO cost_cells (account, hour, service, model, lines)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (account, hour, service, model)
             DO UPDATE SET lines = excluded.lines",
        )
        .map_err(backend)?;
    for ((account, hour, service, model), adds) in by_cell {
        let key = params![account, hour, service, model];
        let stored: Option<Vec<u8>> = read
            .query_row(key, |r| r.get(0))
            .optional()
            .map_err(backend)?;
        let blob = cells::merge(stored.as_deref(), adds).map_err(|e| match e {
            StoreError::Corrupt(why) => {
                StoreError::Corrupt(format!("{why} (cell of {account} at hour {hour})"))
            }
            other => other,
        })?;
        write
            .execute(params![account, hour, service, model, blob])
            .map_err(backend)?;
    }
    Ok(())
}

/// Adds `lines` to `table` (`cost_lines_daily`, whose `hour` is the
/// day's first second).
fn upsert_lines(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    lines: &ciyuan_store::LineSums<'_>,
) -> Result<(), StoreError> {
    let mut write = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (account, hour, adjustment, service, model, key,
                 unit_price, currency, book, version, quantity, list, contracted, billed)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (account, hour, adjustment, service, model, key, unit_price, currency,
                          book, version)
             DO UPDATE SET quantity = dec_add(quantity, excluded.quantity),
                           list = dec_add(list, excluded.list),
                           contracted = dec_add(contracted, excluded.contracted),
                           billed = dec_add(billed, excluded.billed)"
        ))
        .map_err(backend)?;
    // Written in the table's key order: consecutive rows land on the same B-tree pages,
    // which stay in the caches, where a hash map's order visits a random page each.
    let mut rows = Vec::with_capacity(lines.len());
    for (k, add) in lines {
        rows.push((k, k.key.text(), k.unit_price.map(|p| p.to_string()), add));
    }
    type Row<'k> = (
        &'k ciyuan_store::LineKey<'k>,
        std::borrow::Cow<'static, str>,
        Option<String>,
        &'k [ciyuan_core::ExactSum; 4],
    );
    fn order<'k>(r: &'k Row<'_>) -> impl Ord + 'k {
        let (k, key, price, _) = r;
        (
            (k.account.as_str(), k.hour, k.adjustment, k.service, k.model),
            (key.as_ref(), price.as_deref().unwrap_or("")),
            (k.currency.as_str(), k.book, k.version),
        )
    }
    let mut rows: Vec<Row<'_>> = rows;
    rows.sort_unstable_by(|a, b| order(a).cmp(&order(b)));
    for (k, key, price, add) in &rows {
        let what = || format!("a billing line of {}", k.account);
        write
            .execute(params![
                k.account.as_str(),
                k.hour,
                k.adjustment,
                k.service,
                k.model,
                key.as_ref(),
                price.as_deref().unwrap_or(""),
                k.currency.as_str(),
                k.book,
                k.version,
                amount_text(add[0], what)?,
                amount_text(add[1], what)?,
                amount_text(add[2], what)?,
                amount_text(add[3], what)?
            ])
            .map_err(backend)?;
    }
    Ok(())
}

/// Adds units to the tier counters, exactly (decimal text added in Rust, as costs).
fn add_quality_hours(
    tx: &rusqlite::Transaction<'_>,
    hours: &ciyuan_store::QualityHours,
) -> Result<(), StoreError> {
    if hours.is_empty() {
        return Ok(());
    }
    let mut write = tx
        .prepare_cached(
            "INSERT INTO quality_hours (hour, first, last) VALUES (?, ?, ?)
             ON CONFLICT (hour)
             DO UPDATE SET first = min(first, excluded.first), last = max(last, excluded.last)",
        )
        .map_err(backend)?;
    for (hour, (first, last)) in hours {
        write
            .execute(params![hour, *first as i64, *last as i64])
            .map_err(backend)?;
    }
    Ok(())
}

fn add_tier_units(
    tx: &rusqlite::Transaction<'_>,
    tiers: &ciyuan_store::TierSums<'_>,
) -> Result<(), StoreError> {
    if tiers.is_empty() {
        return Ok(());
    }
    let mut write = tx
        .prepare_cached(
            "INSERT INTO tier_units (node, book, rule, period, units) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (node, book, rule, period)
             DO UPDATE SET units = dec_add(units, excluded.units)",
        )
        .map_err(backend)?;
    for (k, add) in tiers {
        let text = amount_text(*add, || format!("the tier units of {}", k.node))?;
        write
            .execute(params![
                k.node.as_str(),
                k.book,
                k.rule,
                k.period.to_string(),
                text
            ])
            .map_err(backend)?;
    }
    Ok(())
}

fn parse_amount(text: &str) -> Result<ciyuan_core::ExactSum, StoreError> {
    rust_decimal::Decimal::from_str_exact(text)
        .map(ciyuan_core::ExactSum::of)
        .map_err(|e| StoreError::Corrupt(format!("stored amount {text:?}: {e}")))
}

/// A projection error carried through rusqlite's error type inside a statement closure.
fn sql(e: StoreError) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

impl Store for SqliteStore {
    fn projected_through(&self) -> Result<u64, StoreError> {
        let v: i64 = self
            .conn()
            .query_row(
                "SELECT value FROM meta WHERE name = 'projected_through'",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt("negative projection watermark".into()))
    }

    fn apply(&self, start: u64, entries: &[Entry]) -> Result<(), StoreError> {
        self.apply_parts(start, &[entries])
    }

    fn apply_parts(&self, start: u64, parts: &[&[Entry]]) -> Result<(), StoreError> {
        let parts: Vec<ciyuan_store::Part<'_>> = parts
            .iter()
            .map(|entries| ciyuan_store::Part {
                entries,
                ingest_hashes: None,
            })
            .collect();
        self.apply_keyed(start, &parts)
    }

    fn apply_keyed(&self, start: u64, parts: &[ciyuan_store::Part<'_>]) -> Result<(), StoreError> {
        let count: usize = parts.iter().map(|p| p.entries.len()).sum();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        // Cached like every statement of a batch: parsed (and planned) again for each
        // batch, these two were most of what SQLite spent parsing.
        let at: i64 = tx
            .prepare_cached("SELECT value FROM meta WHERE name = 'projected_through'")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(backend)?;
        if at as u64 != start {
            return Err(StoreError::OutOfOrder {
                at: at as u64,
                from: start,
            });
        }
        let projected = ciyuan_store::project_parts(start, parts)?;
        write_changes(&tx, &projected.changes)?;
        insert_ingest_index(&tx, &projected.ingest)?;
        upsert_usage(
            &tx,
            "usage_hourly",
            projected.usage.iter().map(|(k, n)| k.row(*n)),
        )?;
        add_costs(&tx, &projected.cost)?;
        add_trees(&tx, &projected.usage_tree, &projected.cost_tree)?;
        let plain: Vec<&[Entry]> = parts.iter().map(|p| p.entries).collect();
        add_keyed(&tx, start, &plain)?;
        add_tier_units(&tx, &projected.tiers)?;
        add_cost_lines(&tx, &projected.lines)?;
        add_quality_hours(&tx, &projected.quality_hours)?;
        tx.prepare_cached("UPDATE meta SET value = ? WHERE name = 'projected_through'")
            .and_then(|mut st| st.execute(params![(start + count as u64) as i64]))
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn reset_projections(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        clear_projections(&tx)?;
        tx.commit().map_err(backend)
    }

    fn account(&self, path: &AccountPath) -> Result<Option<Account>, StoreError> {
        let raw: Option<RawAccount> = self
            .conn()
            .query_row(
                "SELECT path, info, created_at, created_entry FROM accounts WHERE path = ?",
                [path.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(backend)?;
        raw.map(account_from_raw).transpose()
    }

    fn accounts_page(
        &self,
        under: &AccountPath,
        after: Option<&AccountPath>,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError> {
        let seek = subtree_seek(under, after.map(AccountPath::as_str));
        let mut out = Vec::new();
        if seek.own == OwnRows::All
            && limit > 0
            && let Some(node) = self.account(under)?
        {
            out.push(node);
        }
        let cursor = after.map(|a| a.as_str().to_string());
        let (cond, args) = range("path", &seek, ("path > ?", cursor.into_iter().collect()));
        let rest = rest_of(limit, out.len())?;
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT path, info, created_at, created_entry FROM accounts WHERE {cond}
                 ORDER BY path LIMIT {}",
                sql_limit(rest)
            ))
            .map_err(backend)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(backend)?;
        for r in rows {
            out.push(account_from_raw(r.map_err(backend)?)?);
        }
        Ok(out)
    }

    fn insert_key(&self, key: &KeyRecord, secret_hash: &[u8; 32]) -> Result<(), StoreError> {
        let result = self.durably(|conn| {
            conn.execute(
                "INSERT INTO keys (key_id, secret_hash, account, scopes, name, created_at, revoked_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
                params![
                    key.key_id,
                    secret_hash.as_slice(),
                    key.account.as_str(),
                    key.scopes.to_string(),
                    key.name,
                    key.created_at.to_string(),
                    key.revoked_at.map(|t| t.to_string()),
                ],
            )
        });
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!("key {} exists", key.key_id)))
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE secret_hash = ?"),
                [secret_hash.as_slice()],
                raw_key,
            )
            .optional()
            .map_err(backend)?;
        raw.map(key_from_raw).transpose()
    }

    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?"),
                [key_id],
                raw_key,
            )
            .optional()
            .map_err(backend)?;
        raw.map(key_from_raw).transpose()
    }

    fn keys_page(
        &self,
        under: &AccountPath,
        after: Option<(&AccountPath, &str)>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let seek = subtree_seek(under, after.map(|(node, _)| node.as_str()));
        let conn = self.conn();
        let read = |sql: String, args: Vec<String>| -> Result<Vec<KeyRecord>, StoreError> {
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), raw_key)
                .map_err(backend)?;
            rows.map(|r| key_from_raw(r.map_err(backend)?)).collect()
        };
        let own = match (seek.own, after) {
            (OwnRows::All, _) => Some(("account = ?", vec![under.as_str().to_string()])),
            (OwnRows::AfterCursor, Some((_, id))) => Some((
                "account = ? AND key_id > ?",
                vec![under.as_str().to_string(), id.to_string()],
            )),
            _ => None,
        };
        let mut out = match own {
            Some((cond, args)) => read(
                format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE {cond} ORDER BY key_id LIMIT {}",
                    sql_limit(limit)
                ),
                args,
            )?,
            None => Vec::new(),
        };
        // The row value seeks the (account, key_id) index at the cursor.
        let cursor = after.map_or_else(Vec::new, |(node, id)| {
            vec![
                node.as_str().to_string(),
                node.as_str().to_string(),
                id.to_string(),
            ]
        });
        let (cond, args) = range(
            "account",
            &seek,
            ("account >= ? AND (account, key_id) > (?, ?)", cursor),
        );
        let rest = rest_of(limit, out.len())?;
        out.extend(read(
            format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE {cond} ORDER BY account, key_id LIMIT {}",
                sql_limit(rest)
            ),
            args,
        )?);
        Ok(out)
    }

    fn key_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn revoke_key(&self, key_id: &str, at: Timestamp) -> Result<Option<KeyRecord>, StoreError> {
        self.durably(|conn| {
            conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                params![at.to_string(), key_id],
            )
        })
        .map_err(backend)?;
        self.key(key_id)
    }

    fn insert_session(
        &self,
        id_hash: &[u8; 32],
        session: &SessionRecord,
    ) -> Result<(), StoreError> {
        let result = self.durably(|conn| {
            conn.execute(
                "INSERT INTO sessions (id_hash, key_id, created_at, expires_at, revoked_at)
                 VALUES (?, ?, ?, ?, ?)",
                params![
                    id_hash.as_slice(),
                    session.key_id,
                    session.created_at,
                    session.expires_at,
                    session.revoked_at,
                ],
            )
        });
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict("the session exists".into()))
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT key_id, created_at, expires_at, revoked_at FROM sessions WHERE id_hash = ?",
                [id_hash.as_slice()],
                |r| {
                    Ok(SessionRecord {
                        key_id: r.get(0)?,
                        created_at: r.get(1)?,
                        expires_at: r.get(2)?,
                        revoked_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
    }

    fn revoke_session(&self, id_hash: &[u8; 32], at: i64) -> Result<bool, StoreError> {
        let n = self
            .durably(|conn| {
                conn.execute(
                    "UPDATE sessions SET revoked_at = ? WHERE id_hash = ? AND revoked_at IS NULL",
                    params![at, id_hash.as_slice()],
                )
            })
            .map_err(backend)?;
        Ok(n == 1)
    }

    fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sessions WHERE expires_at < ?", [before])
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn budgets(&self) -> Result<Vec<(AccountPath, ciyuan_core::BudgetSet)>, StoreError> {
        by_node(
            &self.conn(),
            "SELECT node, spec FROM budgets ORDER BY node, name",
        )
    }

    fn access_rules(&self) -> Result<Vec<(AccountPath, ciyuan_core::AccessSet)>, StoreError> {
        by_node(
            &self.conn(),
            "SELECT node, rules FROM access_rules ORDER BY node",
        )
    }

    fn definitions(&self) -> Result<Vec<(u64, ciyuan_core::TokenDefinition)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT entry, definition FROM definitions ORDER BY service, version")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (entry, json) = row.map_err(backend)?;
            out.push((
                u64::try_from(entry)
                    .map_err(|_| StoreError::Corrupt(format!("definition entry id {entry}")))?,
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("stored definition {json:?}: {e}")))?,
            ));
        }
        Ok(out)
    }

    fn price_books(&self) -> Result<Vec<(u64, ciyuan_core::PriceBook)>, StoreError> {
        entries_of(
            &self.conn(),
            "SELECT entry, book FROM price_books ORDER BY name, version",
        )
    }

    fn contracts(&self) -> Result<Vec<(AccountPath, u64, ciyuan_core::PriceContract)>, StoreError> {
        let rows: Vec<NodeEntry<ciyuan_core::PriceContract>> = by_node_entry(
            &self.conn(),
            "SELECT node, entry, contract FROM contracts ORDER BY node",
        )?;
        Ok(rows.into_iter().map(|(n, (e, c))| (n, e, c)).collect())
    }

    fn wallet_settings(&self) -> Result<Vec<(AccountPath, ciyuan_core::WalletSet)>, StoreError> {
        by_node(
            &self.conn(),
            "SELECT node, settings FROM wallet_settings ORDER BY node, currency",
        )
    }

    fn postings(
        &self,
        node: Option<&AccountPath>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Posting>>, StoreError> {
        let after = after.map_or(-1, |a| a as i64);
        let limit = limit.min(i64::MAX as usize) as i64;
        match node {
            None => recorded(
                &self.conn(),
                "SELECT entry, ts, account, posting FROM postings WHERE entry > ? ORDER BY entry LIMIT ?",
                vec![after.to_string(), limit.to_string()],
            ),
            Some(n) => recorded(
                &self.conn(),
                "SELECT p.entry, p.ts, p.account, p.posting FROM posting_nodes n
                 JOIN postings p ON p.entry = n.entry
                 WHERE n.node = ? AND n.entry > ? ORDER BY n.entry LIMIT ?",
                vec![n.as_str().to_string(), after.to_string(), limit.to_string()],
            ),
        }
    }

    fn cost_hours(&self, filter: &HourFilter) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        let (cond, args) = subtree("account", &filter.account);
        let (range, mut more) = hour_range(filter.from_hour, filter.to_hour);
        let mut args = args;
        args.append(&mut more);
        cost_rows(
            &self.conn(),
            &format!("{COST_COLUMNS} FROM cost_hourly WHERE {cond}{range}"),
            args,
        )
    }

    fn statements(
        &self,
        node: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::StatementClosed>>, StoreError> {
        recorded(
            &self.conn(),
            "SELECT entry, ts, node, closed FROM statements WHERE node = ? ORDER BY period",
            vec![node.as_str().to_string()],
        )
    }

    fn service_levels(
        &self,
        under: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::ServiceLevelEvaluated>>, StoreError> {
        let (cond, args) = subtree("node", under);
        recorded(
            &self.conn(),
            &format!(
                "SELECT entry, ts, node, evaluated FROM service_levels WHERE {cond}
                 ORDER BY node, period, level"
            ),
            args,
        )
    }

    fn quality_range(
        &self,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let conn = self.conn();
        let (first, last): (Option<i64>, Option<i64>) = conn
            .query_row(
                "SELECT min(first), max(last) FROM quality_hours WHERE hour >= ? AND hour < ?",
                params![from_hour, to_hour],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(backend)?;
        match (first, last) {
            (Some(f), Some(l)) => Ok(Some((
                u64::try_from(f).map_err(|_| StoreError::Corrupt(format!("entry id {f}")))?,
                u64::try_from(l).map_err(|_| StoreError::Corrupt(format!("entry id {l}")))?,
            ))),
            _ => Ok(None),
        }
    }

    fn cost_lines(&self, filter: &HourFilter) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
        // An open range is read by the hour, as it always was: its rows' hours are
        // what the caller gets.
        let bounded = filter.from_hour.is_some() && filter.to_hour.is_some();
        // Whole UTC days from the daily table, the hours around them from the hourly
        // one: the same sums, a twenty-fourth of the rows.
        let conn = self.conn();
        let read = |table: &str, from: Option<i64>, to: Option<i64>| {
            let (cond, mut args) = subtree("account", &filter.account);
            let columns = if table == "cost_cells" {
                CELL_COLUMNS
            } else {
                "SELECT hour, account, adjustment, service, model, key, unit_price, currency, book,
                        version, quantity, list, contracted, billed"
            };
            let mut sql = format!("{columns} FROM {table} WHERE {cond}");
            if let Some(from) = from {
                sql.push_str(" AND hour >= ?");
                args.push(from.to_string());
            }
            if let Some(to) = to {
                sql.push_str(" AND hour < ?");
                args.push(to.to_string());
            }
            sql.push_str(" ORDER BY hour, account");
            if table == "cost_cells" {
                let args = args.into_iter().map(rusqlite::types::Value::Text).collect();
                read_line_page(&conn, &sql, args, None, usize::MAX)
            } else {
                read_lines(&conn, &sql, args)
            }
        };
        let mut out = Vec::new();
        for stretch in ciyuan_store::tree::stretches(filter.from_hour, filter.to_hour, bounded) {
            let table = match stretch.span {
                Span::Hour => "cost_cells",
                Span::Day => "cost_lines_daily",
            };
            out.extend(read(table, stretch.from, stretch.to)?);
        }
        Ok(out)
    }

    fn cost_lines_page(
        &self,
        filter: &HourFilter,
        after: Option<&ciyuan_store::LineRow>,
        limit: usize,
    ) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
        let (sql, args) = line_page_query(filter, after, limit);
        read_line_page(&self.conn(), &sql, args, after, limit)
    }

    fn each_cost_line(
        &self,
        filter: &HourFilter,
        after: Option<&ciyuan_store::LineRow>,
        limit: usize,
        visit: &mut dyn FnMut(&ciyuan_store::LineRef<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<ciyuan_store::LinesVisited, StoreError> {
        let (sql, args) = line_page_query(filter, after, limit);
        self.export_read(|conn| visit_lines(conn, &sql, args, after, limit, visit))
    }

    fn tier_units(&self) -> Result<Vec<ciyuan_store::TierUnits>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT node, book, rule, period, units FROM tier_units")
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(backend)? {
            let period: String = r.get(3).map_err(backend)?;
            let units: String = r.get(4).map_err(backend)?;
            out.push(ciyuan_store::TierUnits {
                node: parse_path(&r.get::<_, String>(0).map_err(backend)?)?,
                book: r.get(1).map_err(backend)?,
                rule: r.get(2).map_err(backend)?,
                period: period
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("stored period {period:?}: {e}")))?,
                units: parse_amount(&units)?,
            });
        }
        Ok(out)
    }

    fn response(&self, id: &str) -> Result<Option<Recorded<String>>, StoreError> {
        // The upstream's name read as the JSON string `recorded` takes.
        Ok(recorded(
            &self.conn(),
            "SELECT entry, ts, account, json_quote(upstream) FROM responses WHERE id = ?",
            vec![id.to_string()],
        )?
        .pop())
    }

    fn flagged(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Usage>>, StoreError> {
        let (cond, args) = subtree("account", under);
        recorded(
            &self.conn(),
            &format!(
                "SELECT entry, ts, account, usage FROM flagged WHERE {cond} ORDER BY entry DESC LIMIT {limit}"
            ),
            args,
        )
    }

    fn incidents(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Incident>>, StoreError> {
        let (cond, args) = subtree("account", under);
        recorded(
            &self.conn(),
            &format!(
                "SELECT entry, ts, account, incident FROM incidents WHERE {cond} ORDER BY entry DESC LIMIT {limit}"
            ),
            args,
        )
    }

    fn ingest_index(&self, f: &mut dyn FnMut(u64, u64)) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        // One read transaction: the index and the watermark are of the same snapshot.
        let tx = conn.transaction().map_err(backend)?;
        let through: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE name = 'projected_through'",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        {
            let mut stmt = tx
                .prepare("SELECT first, pairs FROM ingest_blocks ORDER BY first")
                .map_err(backend)?;
            let mut rows = stmt.query([]).map_err(backend)?;
            let mut last = None;
            while let Some(row) = rows.next().map_err(backend)? {
                let first: i64 = row.get(0).map_err(backend)?;
                let pairs: &[u8] = row
                    .get_ref(1)
                    .map_err(backend)?
                    .as_blob()
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                last = Some(read_ingest_block(first as u64, pairs, last, f)?);
            }
        }
        tx.commit().map_err(backend)?;
        Ok(through as u64)
    }

    fn report_progress(&self) -> Result<Vec<Recorded<ciyuan_core::ReportDelivered>>, StoreError> {
        recorded(
            &self.conn(),
            "SELECT entry, ts, account, delivered FROM report_progress ORDER BY name",
            vec![],
        )
    }

    fn usage_hours(&self, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError> {
        let (cond, mut args) = subtree("account", &filter.account);
        let (range, mut more) = hour_range(filter.from_hour, filter.to_hour);
        args.append(&mut more);
        usage_rows(
            &self.conn(),
            &format!(
                "{USAGE_COLUMNS} FROM usage_hourly WHERE {cond}{range}
                 ORDER BY account, hour, service, model, modality, direction"
            ),
            args,
        )
    }

    fn keyed_usage_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<HourRow>, StoreError> {
        let (cond, mut args) = subtree("account", &filter.account);
        let (range, mut more) = hour_range(filter.from_hour, filter.to_hour);
        args.append(&mut more);
        let rows = usage_rows(
            &self.conn(),
            &format!(
                "{USAGE_COLUMNS} FROM {} WHERE {cond}{range}
                 ORDER BY account, hour, service, model, modality, direction",
                which.usage_table()
            ),
            args,
        )?;
        // Summed in Rust: a sum of the stored halves could pass SQLite's 64 bits.
        match whole {
            true => ciyuan_store::keyed::whole_usage(rows),
            false => Ok(rows),
        }
    }

    fn keyed_cost_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        let (cond, mut args) = subtree("account", &filter.account);
        let (range, mut more) = hour_range(filter.from_hour, filter.to_hour);
        args.append(&mut more);
        let rows = cost_rows(
            &self.conn(),
            &format!(
                "{COST_COLUMNS} FROM {} WHERE {cond}{range}
                 ORDER BY account, hour, service, model, currency",
                which.cost_table()
            ),
            args,
        )?;
        match whole {
            true => ciyuan_store::keyed::whole_cost(rows),
            false => Ok(rows),
        }
    }

    fn usage_tree(&self, filter: &TreeFilter) -> Result<Vec<HourRow>, StoreError> {
        let conn = self.conn();
        let mut out = Vec::new();
        self.each_tree_query(&conn, filter, "usage", &mut |sql, args| {
            out.extend(usage_rows(&conn, sql, args)?);
            Ok(())
        })?;
        Ok(out)
    }

    fn cost_tree(&self, filter: &TreeFilter) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        let conn = self.conn();
        let mut out = Vec::new();
        self.each_tree_query(&conn, filter, "cost", &mut |sql, args| {
            out.extend(cost_rows(&conn, sql, args)?);
            Ok(())
        })?;
        Ok(out)
    }
}

/// The columns [`usage_rows`] reads, in its order.
const USAGE_COLUMNS: &str = "SELECT account, hour, service, model, modality, direction, hi, lo";
/// The columns [`cost_rows`] reads, in its order.
const COST_COLUMNS: &str = "SELECT hour, account, service, model, currency, amount";

/// ` AND hour >= ? AND hour < ?` for the bounds given, with their values.
fn hour_range(from: Option<i64>, to: Option<i64>) -> (String, Vec<String>) {
    let mut sql = String::new();
    let mut args = Vec::new();
    if let Some(from) = from {
        sql.push_str(" AND hour >= ?");
        args.push(from.to_string());
    }
    if let Some(to) = to {
        sql.push_str(" AND hour < ?");
        args.push(to.to_string());
    }
    (sql, args)
}

/// Token rows selected by `sql` (starting with [`USAGE_COLUMNS`]).
fn usage_rows(conn: &Connection, sql: &str, args: Vec<String>) -> Result<Vec<HourRow>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args.iter()))
        .map_err(backend)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(backend)? {
        let text = |i: usize| -> Result<&str, StoreError> {
            r.get_ref(i)
                .map_err(backend)?
                .as_str()
                .map_err(|e| StoreError::Corrupt(format!("stored text: {e}")))
        };
        out.push(HourRow {
            account: parse_path(text(0)?)?,
            hour: r.get(1).map_err(backend)?,
            service: text(2)?.to_string(),
            model: text(3)?.to_string(),
            modality: text(4)?
                .parse()
                .map_err(|e: ciyuan_core::TokenError| StoreError::Corrupt(e.to_string()))?,
            direction: text(5)?
                .parse()
                .map_err(|e: ciyuan_core::TokenError| StoreError::Corrupt(e.to_string()))?,
            tokens: join_sum(r.get(6).map_err(backend)?, r.get(7).map_err(backend)?),
        });
    }
    Ok(out)
}

/// Cost rows selected by `sql` (starting with [`COST_COLUMNS`]).
fn cost_rows(
    conn: &Connection,
    sql: &str,
    args: Vec<String>,
) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(backend)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(backend)? {
        let text = |i: usize| -> Result<&str, StoreError> {
            r.get_ref(i)
                .map_err(backend)?
                .as_str()
                .map_err(|e| StoreError::Corrupt(format!("stored text: {e}")))
        };
        out.push(ciyuan_store::CostRow {
            hour: r.get(0).map_err(backend)?,
            account: parse_path(text(1)?)?,
            service: text(2)?.to_string(),
            model: text(3)?.to_string(),
            currency: text(4)?
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?,
            amount: parse_amount(text(5)?)?,
        });
    }
    Ok(out)
}

/// Bytes of one `(entry, hash)` pair in an ingest block: both little-endian u64.
const INGEST_PAIR_BYTES: usize = 16;

/// Appends ingested events `(entry, hash)` to the idempotency index, in entry order,
/// as one row keyed by the first entry: a row per event (a B-tree insert each) cost
/// ~0.3 µs of projector time per event; one blob per batch costs its copy.
fn insert_ingest_index(tx: &Connection, events: &[(u64, u64)]) -> Result<(), StoreError> {
    let Some(&(first, _)) = events.first() else {
        return Ok(());
    };
    let mut pairs = Vec::with_capacity(events.len() * INGEST_PAIR_BYTES);
    let mut last = None;
    for &(entry, hash) in events {
        assert!(
            last.is_none_or(|l| l < entry),
            "ingested events indexed out of entry order: {entry} after {last:?}"
        );
        last = Some(entry);
        pairs.extend_from_slice(&entry.to_le_bytes());
        pairs.extend_from_slice(&hash.to_le_bytes());
    }
    // Entry ids are far below 2^63: stored as SQLite's signed integers.
    tx.prepare_cached("INSERT INTO ingest_blocks (first, pairs) VALUES (?, ?)")
        .and_then(|mut st| st.execute(params![first as i64, pairs]))
        .map_err(backend)?;
    Ok(())
}

/// The pairs of an ingest block written by [`insert_ingest_index`], checked: whole
/// pairs, the first at `first`, entries rising and above `after`.
fn read_ingest_block(
    first: u64,
    pairs: &[u8],
    after: Option<u64>,
    f: &mut dyn FnMut(u64, u64),
) -> Result<u64, StoreError> {
    let damaged = |why: String| {
        StoreError::Backend(format!(
            "the ingest index block at entry {first} is damaged: {why}"
        ))
    };
    if pairs.is_empty() || !pairs.len().is_multiple_of(INGEST_PAIR_BYTES) {
        return Err(damaged(format!("{} bytes", pairs.len())));
    }
    let mut last = after;
    for (i, pair) in pairs.chunks_exact(INGEST_PAIR_BYTES).enumerate() {
        let (Some(e), Some(h)) = (pair.first_chunk::<8>(), pair.last_chunk::<8>()) else {
            return Err(damaged("a short pair".into()));
        };
        let (entry, hash) = (u64::from_le_bytes(*e), u64::from_le_bytes(*h));
        if i == 0 && entry != first {
            return Err(damaged(format!("its first pair is of entry {entry}")));
        }
        if let Some(l) = last.filter(|&l| entry <= l) {
            return Err(damaged(format!("entry {entry} follows entry {l}")));
        }
        f(hash, entry);
        last = Some(entry);
    }
    last.ok_or_else(|| damaged("no pair".into()))
}

#[cfg(test)]
mod tests;

/// The columns a cell query selects, in the order [`each_cell_line`] reads them.
const CELL_COLUMNS: &str = "SELECT hour, account, service, model, lines";

/// The query of a page of billing lines of a subtree after `after`: the cells from
/// the cursor's own on (its later lines are in it), at most `limit + 1` of them (the
/// cursor's cell may have no line left; every other has one at least).
fn line_page_query(
    filter: &HourFilter,
    after: Option<&ciyuan_store::LineRow>,
    limit: usize,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let below = format!("{}/", filter.account.as_str());
    let (cond, subtree_args) = match after {
        // A cursor among the descendants: the rows after it are the subtree's while
        // their node sorts before `p0` ('0' is the byte after '/'). One comparison a
        // row instead of the subtree's three.
        Some(a) if !filter.account.is_root() && a.account.as_str().starts_with(&below) => (
            "account < ?".to_string(),
            vec![format!("{}0", filter.account.as_str())],
        ),
        _ => subtree("account", &filter.account),
    };
    let mut args: Vec<Value> = subtree_args.into_iter().map(Value::Text).collect();
    let mut sql = format!("{CELL_COLUMNS} FROM cost_cells WHERE {cond}");
    if let Some(from) = filter.from_hour {
        sql.push_str(" AND hour >= ?");
        args.push(Value::Integer(from));
    }
    if let Some(to) = filter.to_hour {
        sql.push_str(" AND hour < ?");
        args.push(Value::Integer(to));
    }
    if let Some(a) = after {
        // Bound with their columns' types and compared as they are: an expression
        // in the row value (a CAST) keeps SQLite from seeking the primary key by
        // the whole row, and each page would scan its node's cells from the first.
        sql.push_str(" AND (account, hour, service, model) >= (?, ?, ?, ?)");
        args.extend([
            Value::Text(a.account.as_str().to_string()),
            Value::Integer(a.hour),
            Value::Text(a.service.clone()),
            Value::Text(a.model.clone()),
        ]);
    }
    sql.push_str(&format!(
        " ORDER BY account, hour, service, model LIMIT {}",
        limit.saturating_add(1)
    ));
    (sql, args)
}

/// A cell's own columns, borrowed from its row.
struct Cell<'r> {
    hour: i64,
    account: &'r [u8],
    service: &'r [u8],
    model: &'r [u8],
}

/// Hands each line of the cells the query selects ([`CELL_COLUMNS`]) to `f`, with its
/// cell, skipping the lines up to and including `after` and stopping after `limit`
/// lines or when `f` breaks. Returns how many lines `f` was given and whether it broke.
fn each_cell_line(
    conn: &Connection,
    sql: &str,
    args: Vec<rusqlite::types::Value>,
    after: Option<&ciyuan_store::LineRow>,
    limit: usize,
    f: &mut CellLineFn<'_>,
) -> Result<(usize, bool), StoreError> {
    use rusqlite::types::ValueRef;
    let cursor = after.map(|a| {
        (
            a.adjustment,
            a.key.as_str(),
            a.unit_price.map(|p| p.to_string()).unwrap_or_default(),
            a.currency.as_str(),
            a.book.as_str(),
            a.version,
        )
    });
    let cursor =
        cursor.as_ref().map(
            |(adjustment, key, price, currency, book, version)| cells::LineBytes {
                adjustment: *adjustment,
                key: key.as_bytes(),
                price: price.as_bytes(),
                currency: currency.as_bytes(),
                book: book.as_bytes(),
                version: *version,
                sums: [&[]; 4],
            },
        );
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(backend)?;
    let mut count = 0;
    while let Some(r) = rows.next().map_err(backend)? {
        let bytes = |i: usize| -> Result<&[u8], StoreError> {
            match r.get_ref(i).map_err(backend)? {
                ValueRef::Text(b) | ValueRef::Blob(b) => Ok(b),
                other => Err(StoreError::Corrupt(format!(
                    "stored billing cell column {i} is {:?}, not text",
                    other.data_type()
                ))),
            }
        };
        let cell = Cell {
            hour: r.get(0).map_err(backend)?,
            account: bytes(1)?,
            service: bytes(2)?,
            model: bytes(3)?,
        };
        // The cursor's own cell: its lines up to the cursor were on the last page.
        let skip = match (after, &cursor) {
            (Some(a), Some(c))
                if a.account.as_str().as_bytes() == cell.account
                    && a.hour == cell.hour
                    && a.service.as_bytes() == cell.service
                    && a.model.as_bytes() == cell.model =>
            {
                Some(c)
            }
            _ => None,
        };
        let mut prev: Option<cells::LineBytes<'_>> = None;
        for line in cells::lines(bytes(4)?) {
            let line = line?;
            if prev.is_some_and(|p| p.order(&line) != std::cmp::Ordering::Less) {
                return Err(StoreError::Corrupt(format!(
                    "stored billing cell of {} at hour {}: lines out of order",
                    String::from_utf8_lossy(cell.account),
                    cell.hour
                )));
            }
            prev = Some(line);
            if skip.is_some_and(|c| line.order(c) != std::cmp::Ordering::Greater) {
                continue;
            }
            if count == limit {
                return Ok((count, false));
            }
            count += 1;
            if f(&cell, &line)?.is_break() {
                return Ok((count, true));
            }
        }
    }
    Ok((count, false))
}

/// The text of the same column in the rows seen last: a page's lines repeat a handful
/// of services, models, keys, prices and books, so each distinct value is checked as
/// UTF-8 (or parsed) once and later rows only compare bytes.
struct Seen<T> {
    slots: Vec<(Vec<u8>, T)>,
    next: usize,
}

impl<T> Seen<T> {
    const SLOTS: usize = 16;

    fn new() -> Seen<T> {
        Seen {
            slots: Vec::with_capacity(Self::SLOTS),
            next: 0,
        }
    }

    /// The slot of `bytes`, its value made by `make` if it is not among the slots; it
    /// stays until [`Seen::SLOTS`] other values have been added.
    fn get(
        &mut self,
        bytes: &[u8],
        make: impl FnOnce(&[u8]) -> Result<T, StoreError>,
    ) -> Result<usize, StoreError> {
        let at = match self.slots.iter().position(|(b, _)| b.as_slice() == bytes) {
            Some(at) => at,
            None => {
                let slot = (bytes.to_vec(), make(bytes)?);
                if self.slots.len() < Self::SLOTS {
                    self.slots.push(slot);
                    self.slots.len() - 1
                } else {
                    // Round robin: more distinct values than slots is slower, not wrong.
                    let at = self.next;
                    self.next = (self.next + 1) % Self::SLOTS;
                    self.slots[at] = slot;
                    at
                }
            }
        };
        Ok(at)
    }

    fn at(&self, slot: usize) -> &T {
        &self.slots[slot].1
    }
}

fn utf8(column: &str) -> impl Fn(&[u8]) -> Result<String, StoreError> + '_ {
    move |b| {
        String::from_utf8(b.to_vec())
            .map_err(|e| StoreError::Corrupt(format!("stored billing line {column}: {e}")))
    }
}

/// Stored decimal text as `Decimal::from_str_exact` and `normalize` read it (what a
/// sum gives after `ExactSum::to_decimal`), without the general parser for the plain
/// `-123.4500` the projection writes; anything else goes to the general parser.
fn stored_decimal(text: &[u8]) -> Result<rust_decimal::Decimal, StoreError> {
    let general = || {
        let t = std::str::from_utf8(text)
            .map_err(|e| StoreError::Corrupt(format!("stored amount: {e}")))?;
        rust_decimal::Decimal::from_str_exact(t)
            .map(|d| d.normalize())
            .map_err(|e| StoreError::Corrupt(format!("stored amount {t:?}: {e}")))
    };
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(p) => (&digits[..p], &digits[p + 1..]),
        None => (digits, &[][..]),
    };
    if int.is_empty() || (frac.is_empty() && int.len() != digits.len()) {
        return general();
    }
    let frac = match frac.iter().rposition(|&c| c != b'0') {
        Some(last) => &frac[..=last],
        None => &[][..],
    };
    // 18 digits always fit a u64.
    if int.len() + frac.len() > 18 {
        return general();
    }
    let mut m: u64 = 0;
    for &c in int.iter().chain(frac) {
        if !c.is_ascii_digit() {
            return general();
        }
        m = m * 10 + u64::from(c - b'0');
    }
    if m == 0 {
        return Ok(rust_decimal::Decimal::ZERO);
    }
    let m = i64::try_from(m).map_err(|_| StoreError::Corrupt("unreachable".into()))?;
    // At most 18 fraction digits: within `Decimal`'s 28.
    Ok(rust_decimal::Decimal::new(
        if negative { -m } else { m },
        frac.len() as u32,
    ))
}

/// Hands the billing lines of the cells the query selects ([`line_page_query`]) after
/// `after`, at most `limit`, to `visit`, read in place: no `String` per line, each
/// distinct text checked once, a node's path parsed once for its run of lines.
fn visit_lines(
    conn: &Connection,
    sql: &str,
    args: Vec<rusqlite::types::Value>,
    after: Option<&ciyuan_store::LineRow>,
    limit: usize,
    visit: &mut dyn FnMut(&ciyuan_store::LineRef<'_>) -> std::ops::ControlFlow<()>,
) -> Result<ciyuan_store::LinesVisited, StoreError> {
    let mut services = Seen::<String>::new();
    let mut models = Seen::<String>::new();
    let mut keys = Seen::<String>::new();
    let mut books = Seen::<String>::new();
    let mut prices = Seen::<Option<rust_decimal::Decimal>>::new();
    let mut currencies = Seen::<ciyuan_core::Currency>::new();
    let mut account: Option<AccountPath> = None;
    let mut last: Option<LastLine> = None;
    let (count, stopped) = each_cell_line(conn, sql, args, after, limit, &mut |cell, l| {
        let node: &AccountPath = match &mut account {
            Some(a) if a.as_str().as_bytes() == cell.account => a,
            slot => slot.insert(parse_path(&utf8("account")(cell.account)?)?),
        };
        let texts = [
            services.get(cell.service, utf8("service"))?,
            models.get(cell.model, utf8("model"))?,
            keys.get(l.key, utf8("key"))?,
            books.get(l.book, utf8("book"))?,
        ];
        let price = prices.get(l.price, |b| {
            if b.is_empty() {
                return Ok(None);
            }
            let t = std::str::from_utf8(b)
                .map_err(|e| StoreError::Corrupt(format!("stored unit price: {e}")))?;
            rust_decimal::Decimal::from_str_exact(t)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("stored unit price {t:?}: {e}")))
        })?;
        let currency = currencies.get(l.currency, |b| {
            std::str::from_utf8(b)
                .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))
        })?;
        let line = ciyuan_store::LineRef {
            hour: cell.hour,
            account: node,
            adjustment: l.adjustment,
            service: services.at(texts[0]),
            model: models.at(texts[1]),
            key: keys.at(texts[2]),
            unit_price: *prices.at(price),
            currency: *currencies.at(currency),
            book: books.at(texts[3]),
            version: l.version,
            quantity: stored_decimal(l.sums[0])?,
            list: stored_decimal(l.sums[1])?,
            contracted: stored_decimal(l.sums[2])?,
            billed: stored_decimal(l.sums[3])?,
        };
        let flow = visit(&line);
        last = Some(LastLine {
            hour: line.hour,
            adjustment: line.adjustment,
            unit_price: line.unit_price,
            currency: line.currency,
            version: line.version,
            sums: [line.quantity, line.list, line.contracted, line.billed],
            texts,
        });
        Ok(flow)
    })?;
    let mut done = ciyuan_store::LinesVisited {
        count,
        stopped,
        last: None,
    };
    if let (Some(l), Some(node)) = (last, &account) {
        done.last = Some(
            ciyuan_store::LineRef {
                hour: l.hour,
                account: node,
                adjustment: l.adjustment,
                service: services.at(l.texts[0]),
                model: models.at(l.texts[1]),
                key: keys.at(l.texts[2]),
                unit_price: l.unit_price,
                currency: l.currency,
                book: books.at(l.texts[3]),
                version: l.version,
                quantity: l.sums[0],
                list: l.sums[1],
                contracted: l.sums[2],
                billed: l.sums[3],
            }
            .to_row(),
        );
    }
    Ok(done)
}

/// The last line [`visit_lines`] read, its texts as slots of its caches: the cursor
/// is made of it once, at the end of a page.
#[derive(Clone, Copy)]
struct LastLine {
    hour: i64,
    adjustment: bool,
    unit_price: Option<rust_decimal::Decimal>,
    currency: ciyuan_core::Currency,
    version: u32,
    sums: [rust_decimal::Decimal; 4],
    // Service, model, key, book.
    texts: [usize; 4],
}

/// Reads the billing lines of the cells the query selects ([`CELL_COLUMNS`]) after
/// `after`, at most `limit`, as rows.
fn read_line_page(
    conn: &Connection,
    sql: &str,
    args: Vec<rusqlite::types::Value>,
    after: Option<&ciyuan_store::LineRow>,
    limit: usize,
) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
    let mut out: Vec<ciyuan_store::LineRow> = Vec::new();
    let text = |b: &[u8], what: &str| -> Result<String, StoreError> {
        String::from_utf8(b.to_vec())
            .map_err(|e| StoreError::Corrupt(format!("stored billing line {what}: {e}")))
    };
    let sum = |b: &[u8]| -> Result<ciyuan_core::ExactSum, StoreError> {
        parse_amount(
            std::str::from_utf8(b)
                .map_err(|e| StoreError::Corrupt(format!("stored amount: {e}")))?,
        )
    };
    each_cell_line(conn, sql, args, after, limit, &mut |cell, l| {
        let account = match out.last() {
            Some(prev) if prev.account.as_str().as_bytes() == cell.account => prev.account.clone(),
            _ => parse_path(&text(cell.account, "account")?)?,
        };
        let price = text(l.price, "unit price")?;
        out.push(ciyuan_store::LineRow {
            hour: cell.hour,
            account,
            adjustment: l.adjustment,
            service: text(cell.service, "service")?,
            model: text(cell.model, "model")?,
            key: text(l.key, "key")?,
            unit_price: if price.is_empty() {
                None
            } else {
                Some(rust_decimal::Decimal::from_str_exact(&price).map_err(|e| {
                    StoreError::Corrupt(format!("stored unit price {price:?}: {e}"))
                })?)
            },
            currency: text(l.currency, "currency")?
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?,
            book: text(l.book, "book")?,
            version: l.version,
            quantity: sum(l.sums[0])?,
            list: sum(l.sums[1])?,
            contracted: sum(l.sums[2])?,
            billed: sum(l.sums[3])?,
        });
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    Ok(out)
}

/// Reads billing line rows (the columns `cost_lines` selects).
fn read_lines(
    conn: &Connection,
    sql: &str,
    args: Vec<String>,
) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(backend)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(backend)? {
        let price: String = r.get(6).map_err(backend)?;
        let currency: String = r.get(7).map_err(backend)?;
        let text = |i: usize| -> Result<String, StoreError> { r.get(i).map_err(backend) };
        out.push(ciyuan_store::LineRow {
            hour: r.get(0).map_err(backend)?,
            account: parse_path(&text(1)?)?,
            adjustment: r.get(2).map_err(backend)?,
            service: text(3)?,
            model: text(4)?,
            key: text(5)?,
            unit_price: if price.is_empty() {
                None
            } else {
                Some(rust_decimal::Decimal::from_str_exact(&price).map_err(|e| {
                    StoreError::Corrupt(format!("stored unit price {price:?}: {e}"))
                })?)
            },
            currency: currency
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?,
            book: text(8)?,
            version: r.get(9).map_err(backend)?,
            quantity: parse_amount(&text(10)?)?,
            list: parse_amount(&text(11)?)?,
            contracted: parse_amount(&text(12)?)?,
            billed: parse_amount(&text(13)?)?,
        });
    }
    Ok(out)
}
