//! The projections and keys on PostgreSQL: the same tables as the embedded store,
//! written from the same [`ciyuan_store::project`] output, in one transaction with the
//! watermark.
//!
//! Amounts are `NUMERIC` (exact decimal, added by the database in one upsert), token
//! sums `NUMERIC(40)`; text keys sort by bytes (`COLLATE "C"`), as SQLite's do, so a
//! subtree is the range `[p/, p0)` and cursors page in the same order on both.
//! Each write of a kind is one statement over arrays (`unnest`), not one per row.

use crate::Pool;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Entry, ExactSum, Scopes};
use ciyuan_store::{
    Account, Change, CostAdd, CostRow, HourFilter, HourRow, KeyRecord, LineRow, OwnRows,
    RangeStart, Recorded, SessionRecord, Store, StoreError, SubtreeSeek, TierUnits, UsageAdd,
    subtree_seek, tree::TreeFilter,
};
use postgres::types::ToSql;

/// The store on PostgreSQL. Every call runs where the synchronous client may block
/// ([`crate::off_runtime`]).
pub struct PgStore {
    inner: Inner,
}

/// The store's queries, run on the calling thread.
struct Inner {
    pool: Pool,
}

fn backend(e: postgres::Error) -> StoreError {
    // Lost connections and serialization failures are worth a retry, and say so.
    crate::Fault::of(&e).store()
}

fn pool_error(e: crate::Fault) -> StoreError {
    e.store()
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("projected value: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("stored {what}: {e}")))
}

fn parse_path(s: &str) -> Result<AccountPath, StoreError> {
    if s.is_empty() {
        return Ok(AccountPath::root());
    }
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("account path {s:?}: {e}")))
}

fn parse_ts(s: &str) -> Result<Timestamp, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn entry_id(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("entry id {v}")))
}

/// A stored `NUMERIC` (read as text) as an exact sum; past 28 digits is an error, as
/// the embedded store's.
fn parse_amount(text: &str) -> Result<ExactSum, StoreError> {
    rust_decimal::Decimal::from_str_exact(text)
        .map(ExactSum::of)
        .map_err(|e| StoreError::Corrupt(format!("stored amount {text:?}: {e}")))
}

fn amount_text(sum: ExactSum, what: impl FnOnce() -> String) -> Result<String, StoreError> {
    sum.to_decimal()
        .map(|d| d.to_string())
        .ok_or_else(|| StoreError::Backend(format!("{} ({sum}) needs more than 28 digits", what())))
}

/// SQL selecting `column`'s subtree of `path`, with its bound values from `$n`.
fn subtree(column: &str, path: &AccountPath, n: usize) -> (String, Vec<String>) {
    if path.is_root() {
        ("true".to_string(), vec![])
    } else {
        // '0' is the byte after '/', so [p/, p0) is exactly the descendants of p.
        (
            format!(
                "({column} = ${n} OR ({column} >= ${} AND {column} < ${}))",
                n + 1,
                n + 2
            ),
            vec![
                path.as_str().to_string(),
                format!("{}/", path.as_str()),
                format!("{}0", path.as_str()),
            ],
        )
    }
}

/// SQL selecting the descendants' range of `seek` on `column`, with its values bound
/// from `$1`; `cursor` is the condition (`?` for each value) and the values of the rows
/// after the cursor, for a cursor standing in the range.
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
    let mut numbered = String::with_capacity(cond.len() + 8);
    let mut n = 0;
    for c in cond.chars() {
        if c == '?' {
            n += 1;
            numbered.push_str(&format!("${n}"));
        } else {
            numbered.push(c);
        }
    }
    (numbered, args)
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

fn params(v: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    v.iter().map(|s| s as &(dyn ToSql + Sync)).collect()
}

const SCHEMA: &str = r#"
CREATE TABLE meta (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('projected_through', 0);
CREATE TABLE accounts (
    path          TEXT COLLATE "C" PRIMARY KEY,
    info          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    created_entry BIGINT NOT NULL
);
CREATE TABLE keys (
    seq         BIGSERIAL PRIMARY KEY,
    key_id      TEXT COLLATE "C" NOT NULL UNIQUE,
    secret_hash BYTEA NOT NULL UNIQUE,
    account     TEXT COLLATE "C" NOT NULL,
    scopes      TEXT NOT NULL,
    name        TEXT,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX keys_account ON keys (account);
CREATE TABLE usage_hourly (
    account   TEXT COLLATE "C" NOT NULL,
    hour      BIGINT NOT NULL,
    service   TEXT COLLATE "C" NOT NULL,
    model     TEXT COLLATE "C" NOT NULL,
    modality  TEXT COLLATE "C" NOT NULL,
    direction TEXT COLLATE "C" NOT NULL,
    tokens    NUMERIC(40, 0) NOT NULL,
    PRIMARY KEY (account, hour, service, model, modality, direction)
);
CREATE TABLE ingest_index (
    entry BIGINT PRIMARY KEY,
    hash  BIGINT NOT NULL
);
CREATE TABLE budgets (
    node  TEXT COLLATE "C" NOT NULL,
    name  TEXT COLLATE "C" NOT NULL,
    spec  TEXT NOT NULL,
    entry BIGINT NOT NULL,
    PRIMARY KEY (node, name)
);
CREATE TABLE access_rules (
    node  TEXT COLLATE "C" PRIMARY KEY,
    rules TEXT NOT NULL,
    entry BIGINT NOT NULL
);
CREATE TABLE flagged (
    entry   BIGINT PRIMARY KEY,
    ts      TEXT NOT NULL,
    account TEXT COLLATE "C" NOT NULL,
    usage   TEXT NOT NULL
);
CREATE INDEX flagged_account ON flagged (account);
CREATE TABLE incidents (
    entry    BIGINT PRIMARY KEY,
    ts       TEXT NOT NULL,
    account  TEXT COLLATE "C" NOT NULL,
    incident TEXT NOT NULL
);
CREATE INDEX incidents_account ON incidents (account);
CREATE TABLE definitions (
    service    TEXT COLLATE "C" NOT NULL,
    version    BIGINT NOT NULL,
    definition TEXT NOT NULL,
    entry      BIGINT NOT NULL,
    PRIMARY KEY (service, version)
);
CREATE TABLE price_books (
    name    TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    book    TEXT NOT NULL,
    entry   BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE contracts (
    node     TEXT COLLATE "C" PRIMARY KEY,
    contract TEXT NOT NULL,
    entry    BIGINT NOT NULL
);
CREATE TABLE wallet_settings (
    node     TEXT COLLATE "C" NOT NULL,
    currency TEXT COLLATE "C" NOT NULL,
    settings TEXT NOT NULL,
    entry    BIGINT NOT NULL,
    PRIMARY KEY (node, currency)
);
CREATE TABLE postings (
    entry   BIGINT PRIMARY KEY,
    ts      TEXT NOT NULL,
    account TEXT COLLATE "C" NOT NULL,
    posting TEXT NOT NULL
);
CREATE TABLE posting_nodes (
    node  TEXT COLLATE "C" NOT NULL,
    entry BIGINT NOT NULL,
    PRIMARY KEY (node, entry)
);
CREATE TABLE cost_hourly (
    account  TEXT COLLATE "C" NOT NULL,
    hour     BIGINT NOT NULL,
    service  TEXT COLLATE "C" NOT NULL,
    model    TEXT COLLATE "C" NOT NULL,
    currency TEXT COLLATE "C" NOT NULL,
    amount   NUMERIC NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
);
CREATE TABLE tier_units (
    node   TEXT COLLATE "C" NOT NULL,
    book   TEXT COLLATE "C" NOT NULL,
    rule   TEXT COLLATE "C" NOT NULL,
    period TEXT COLLATE "C" NOT NULL,
    units  NUMERIC NOT NULL,
    PRIMARY KEY (node, book, rule, period)
);
CREATE TABLE cost_lines (
    account    TEXT COLLATE "C" NOT NULL,
    hour       BIGINT NOT NULL,
    adjustment BOOLEAN NOT NULL,
    service    TEXT COLLATE "C" NOT NULL,
    model      TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    unit_price TEXT COLLATE "C" NOT NULL,
    currency   TEXT COLLATE "C" NOT NULL,
    book       TEXT COLLATE "C" NOT NULL,
    version    BIGINT NOT NULL,
    quantity   NUMERIC NOT NULL,
    list       NUMERIC NOT NULL,
    contracted NUMERIC NOT NULL,
    billed     NUMERIC NOT NULL,
    PRIMARY KEY (account, hour, adjustment, service, model, key, unit_price, currency, book, version)
);
CREATE TABLE cost_lines_daily (LIKE cost_lines INCLUDING ALL);
CREATE TABLE statements (
    node   TEXT COLLATE "C" NOT NULL,
    period TEXT COLLATE "C" NOT NULL,
    entry  BIGINT NOT NULL,
    ts     TEXT NOT NULL,
    closed TEXT NOT NULL,
    PRIMARY KEY (node, period)
);
CREATE TABLE service_levels (
    node      TEXT COLLATE "C" NOT NULL,
    level     TEXT COLLATE "C" NOT NULL,
    period    TEXT COLLATE "C" NOT NULL,
    entry     BIGINT NOT NULL,
    ts        TEXT NOT NULL,
    evaluated TEXT NOT NULL,
    PRIMARY KEY (node, level, period)
);
CREATE TABLE quality_hours (
    hour  BIGINT PRIMARY KEY,
    first BIGINT NOT NULL,
    last  BIGINT NOT NULL
);
"#;

/// Keys listed a page at a time in (node, id) order, each page one index seek.
pub(crate) const MIGRATION_KEYS_BY_NODE: &str = r#"
DROP INDEX keys_account;
CREATE INDEX keys_account_id ON keys (account, key_id);
"#;

/// Console sessions: the SHA-256 of each id, never the id; kept by a reset, as keys
/// are. Shared by the nodes, so a session opened on one works on every one.
pub(crate) const MIGRATION_SESSIONS: &str = r#"
CREATE TABLE sessions (
    id_hash    BYTEA PRIMARY KEY,
    key_id     TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX sessions_expiry ON sessions (expires_at);
"#;

/// Subtree rollups (each node's whole subtree by UTC hour and day, see
/// `ciyuan_store::tree`), and billing lines keyed in the order pages list them (an
/// hour's adjustments beside its usage of the same service and model); rebuilt by
/// projecting the log again.
pub(crate) const MIGRATION_TREES: &str = r#"
CREATE TABLE usage_tree_hourly (
    account   TEXT COLLATE "C" NOT NULL,
    hour      BIGINT NOT NULL,
    service   TEXT COLLATE "C" NOT NULL,
    model     TEXT COLLATE "C" NOT NULL,
    modality  TEXT COLLATE "C" NOT NULL,
    direction TEXT COLLATE "C" NOT NULL,
    tokens    NUMERIC(40, 0) NOT NULL,
    PRIMARY KEY (account, hour, service, model, modality, direction)
);
CREATE TABLE usage_tree_daily (LIKE usage_tree_hourly INCLUDING ALL);
CREATE TABLE cost_tree_hourly (
    account  TEXT COLLATE "C" NOT NULL,
    hour     BIGINT NOT NULL,
    service  TEXT COLLATE "C" NOT NULL,
    model    TEXT COLLATE "C" NOT NULL,
    currency TEXT COLLATE "C" NOT NULL,
    amount   NUMERIC NOT NULL,
    PRIMARY KEY (account, hour, service, model, currency)
);
CREATE TABLE cost_tree_daily (LIKE cost_tree_hourly INCLUDING ALL);
ALTER TABLE cost_lines DROP CONSTRAINT cost_lines_pkey;
ALTER TABLE cost_lines ADD PRIMARY KEY
    (account, hour, service, model, adjustment, key, unit_price, currency, book, version);
TRUNCATE accounts, usage_hourly, ingest_index, budgets, access_rules, flagged, incidents,
    definitions, price_books, contracts, wallet_settings, postings, posting_nodes,
    cost_hourly, tier_units, cost_lines, cost_lines_daily, statements, service_levels,
    quality_hours, report_progress;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#;

/// Usage by attribution tag set (`ciyuan_store::tags`): the exact hourly rollups'
/// shape, `service` holding the tag set and the service. No earlier entry carries
/// tags, so nothing needs projecting again.
pub(crate) const MIGRATION_TAGS: &str = r#"
CREATE TABLE IF NOT EXISTS usage_tag_hourly (LIKE usage_hourly INCLUDING ALL);
CREATE TABLE IF NOT EXISTS cost_tag_hourly (LIKE cost_hourly INCLUDING ALL);
"#;

/// Usage by API key and by session (`ciyuan_store::subjects`), in the tag rollups'
/// shape. Entries written since keys and sessions were recorded carry them, so the
/// projections are rebuilt from the log.
pub(crate) const MIGRATION_SUBJECTS: &str = r#"
CREATE TABLE IF NOT EXISTS usage_subject_hourly (LIKE usage_hourly INCLUDING ALL);
CREATE TABLE IF NOT EXISTS cost_subject_hourly (LIKE cost_hourly INCLUDING ALL);
TRUNCATE accounts, usage_hourly, ingest_index, budgets, access_rules, flagged, incidents,
    definitions, price_books, contracts, wallet_settings, postings, posting_nodes,
    cost_hourly, tier_units, cost_lines, cost_lines_daily, statements, service_levels,
    quality_hours, report_progress, usage_tree_hourly, usage_tree_daily, cost_tree_hourly,
    cost_tree_daily, usage_tag_hourly, cost_tag_hourly;
UPDATE meta SET value = 0 WHERE name = 'projected_through';
"#;

/// Answers providers keep to be retrieved (`Store::response`). Only entries written
/// since carry the id, so nothing is rebuilt.
pub(crate) const MIGRATION_RESPONSES: &str = r#"
CREATE TABLE IF NOT EXISTS responses (
    id       TEXT COLLATE "C" PRIMARY KEY,
    entry    BIGINT NOT NULL,
    ts       TEXT NOT NULL,
    account  TEXT COLLATE "C" NOT NULL,
    upstream TEXT NOT NULL
);
"#;

/// The store's schema, as a migration of the crate's list.
pub(crate) const MIGRATION: &str = SCHEMA;

/// Scheduled reports' progress (the latest period each schedule delivered).
pub(crate) const MIGRATION_REPORTS: &str = r#"
CREATE TABLE report_progress (
    name         TEXT COLLATE "C" PRIMARY KEY,
    period_start BIGINT NOT NULL,
    entry        BIGINT NOT NULL,
    ts           TEXT NOT NULL,
    account      TEXT COLLATE "C" NOT NULL,
    delivered    TEXT NOT NULL
);
"#;

/// Every projection table, cleared by a reset (keys are kept).
const PROJECTIONS: &[&str] = &[
    "accounts",
    "usage_hourly",
    "ingest_index",
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
    "cost_lines",
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

/// Seconds in a UTC day.
const DAY_SECS: i64 = 86_400;

type Tx<'a> = postgres::Transaction<'a>;

fn exec(tx: &mut Tx<'_>, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
    tx.execute(sql, p).map(|_| ()).map_err(backend)
}

/// Writes the changes in order (they are few: controls, accounts, postings).
fn write_changes(tx: &mut Tx<'_>, changes: &[Change<'_>]) -> Result<(), StoreError> {
    for change in changes {
        match change {
            Change::AccountCreated {
                entry,
                at,
                path,
                info,
            } => exec(
                tx,
                "INSERT INTO accounts (path, info, created_at, created_entry) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (path) DO NOTHING",
                &[&path.as_str(), &to_json(info)?, &at.to_string(), &(*entry as i64)],
            )?,
            Change::AccountUpdated { path, info } => exec(
                tx,
                "UPDATE accounts SET info = $1 WHERE path = $2",
                &[&to_json(info)?, &path.as_str()],
            )?,
            Change::BudgetSet {
                entry,
                node,
                budget,
            } => exec(
                tx,
                "INSERT INTO budgets (node, name, spec, entry) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (node, name) DO UPDATE SET spec = excluded.spec, entry = excluded.entry",
                &[&node.as_str(), &budget.name, &to_json(budget)?, &(*entry as i64)],
            )?,
            Change::BudgetCleared { node, name } => exec(
                tx,
                "DELETE FROM budgets WHERE node = $1 AND name = $2",
                &[&node.as_str(), name],
            )?,
            Change::AccessSet { entry, node, rules } => exec(
                tx,
                "INSERT INTO access_rules (node, rules, entry) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET rules = excluded.rules, entry = excluded.entry",
                &[&node.as_str(), &to_json(rules)?, &(*entry as i64)],
            )?,
            Change::Incident {
                entry,
                at,
                node,
                incident,
            } => exec(
                tx,
                "INSERT INTO incidents (entry, ts, account, incident) VALUES ($1, $2, $3, $4)",
                &[&(*entry as i64), &at.to_string(), &node.as_str(), &to_json(incident)?],
            )?,
            Change::Flagged {
                entry,
                at,
                node,
                usage,
            } => exec(
                tx,
                "INSERT INTO flagged (entry, ts, account, usage) VALUES ($1, $2, $3, $4)",
                &[&(*entry as i64), &at.to_string(), &node.as_str(), &to_json(usage)?],
            )?,
            Change::ResponseStored {
                entry,
                at,
                node,
                id,
                upstream,
            } => exec(
                tx,
                "INSERT INTO responses (id, entry, ts, account, upstream) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO NOTHING",
                &[id, &(*entry as i64), &at.to_string(), &node.as_str(), upstream],
            )?,
            Change::StatementClosed {
                entry,
                at,
                node,
                closed,
            } => exec(
                tx,
                "INSERT INTO statements (node, period, entry, ts, closed) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (node, period) DO NOTHING",
                &[
                    &node.as_str(),
                    &closed.period,
                    &(*entry as i64),
                    &at.to_string(),
                    &to_json(closed)?,
                ],
            )?,
            Change::ServiceLevelEvaluated {
                entry,
                at,
                node,
                evaluated,
            } => exec(
                tx,
                "INSERT INTO service_levels (node, level, period, entry, ts, evaluated)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (node, level, period) DO NOTHING",
                &[
                    &node.as_str(),
                    &evaluated.level.name,
                    &evaluated.period,
                    &(*entry as i64),
                    &at.to_string(),
                    &to_json(evaluated)?,
                ],
            )?,
            // A delivery by hand never moves a schedule's progress.
            Change::ReportDelivered { delivered, .. } if delivered.manual => {}
            Change::ReportDelivered {
                entry,
                at,
                node,
                delivered,
            } => exec(
                tx,
                "INSERT INTO report_progress (name, period_start, entry, ts, account, delivered)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET period_start = excluded.period_start,
                     entry = excluded.entry, ts = excluded.ts, account = excluded.account,
                     delivered = excluded.delivered
                 WHERE excluded.period_start > report_progress.period_start",
                &[
                    &delivered.name,
                    &delivered.period_start.as_second(),
                    &(*entry as i64),
                    &at.to_string(),
                    &node.as_str(),
                    &to_json(delivered)?,
                ],
            )?,
            Change::PriceBook { entry, book } => exec(
                tx,
                "INSERT INTO price_books (name, version, book, entry) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name, version) DO NOTHING",
                &[
                    &book.name,
                    &i64::from(book.version),
                    &to_json(book)?,
                    &(*entry as i64),
                ],
            )?,
            Change::PriceContract {
                entry,
                node,
                contract,
            } => exec(
                tx,
                "INSERT INTO contracts (node, contract, entry) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET contract = excluded.contract, entry = excluded.entry",
                &[&node.as_str(), &to_json(contract)?, &(*entry as i64)],
            )?,
            Change::WalletSet {
                entry,
                node,
                settings,
            } => exec(
                tx,
                "INSERT INTO wallet_settings (node, currency, settings, entry) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (node, currency) DO UPDATE SET settings = excluded.settings, entry = excluded.entry",
                &[
                    &node.as_str(),
                    &settings.currency.as_str(),
                    &to_json(settings)?,
                    &(*entry as i64),
                ],
            )?,
            Change::Posting {
                entry,
                at,
                node,
                posting,
            } => {
                exec(
                    tx,
                    "INSERT INTO postings (entry, ts, account, posting) VALUES ($1, $2, $3, $4)",
                    &[&(*entry as i64), &at.to_string(), &node.as_str(), &to_json(posting)?],
                )?;
                for leg in &posting.legs {
                    if let Some(n) = leg.account.node() {
                        exec(
                            tx,
                            "INSERT INTO posting_nodes (node, entry) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[&n.as_str(), &(*entry as i64)],
                        )?;
                    }
                }
            }
            Change::DefinitionSet { entry, definition } => exec(
                tx,
                "INSERT INTO definitions (service, version, definition, entry) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (service, version) DO NOTHING",
                &[
                    &definition.service,
                    &i64::from(definition.version),
                    &to_json(definition)?,
                    &(*entry as i64),
                ],
            )?,
        }
    }
    Ok(())
}

/// Adds billing lines to `table` in one statement.
fn upsert_lines(
    tx: &mut Tx<'_>,
    table: &str,
    lines: &ciyuan_store::LineSums<'_>,
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    let n = lines.len();
    let (mut account, mut hour, mut adjustment, mut service, mut model, mut key) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut price, mut currency, mut book, mut version) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut sums: [Vec<String>; 4] = Default::default();
    for (k, add) in lines {
        account.push(k.account.as_str());
        hour.push(k.hour);
        adjustment.push(k.adjustment);
        service.push(k.service);
        model.push(k.model);
        key.push(k.key.text().into_owned());
        price.push(k.unit_price.map(|p| p.to_string()).unwrap_or_default());
        currency.push(k.currency.as_str().to_string());
        book.push(k.book);
        version.push(i64::from(k.version));
        for (i, s) in add.iter().enumerate() {
            sums[i].push(amount_text(*s, || {
                format!("a billing line of {}", k.account)
            })?);
        }
    }
    exec(
        tx,
        &format!(
            "INSERT INTO {table} (account, hour, adjustment, service, model, key, unit_price,
                 currency, book, version, quantity, list, contracted, billed)
             SELECT a, h, adj, s, m, k, p, c, b, v, q::numeric, l::numeric, ct::numeric, bl::numeric
             FROM unnest($1::text[], $2::bigint[], $3::bool[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[],
                         $13::text[], $14::text[])
                  AS t(a, h, adj, s, m, k, p, c, b, v, q, l, ct, bl)
             ON CONFLICT (account, hour, adjustment, service, model, key, unit_price, currency,
                          book, version)
             DO UPDATE SET quantity = {table}.quantity + excluded.quantity,
                           list = {table}.list + excluded.list,
                           contracted = {table}.contracted + excluded.contracted,
                           billed = {table}.billed + excluded.billed"
        ),
        &[
            &account, &hour, &adjustment, &service, &model, &key, &price, &currency, &book,
            &version, &sums[0], &sums[1], &sums[2], &sums[3],
        ],
    )
}

fn write_sums(tx: &mut Tx<'_>, p: &ciyuan_store::Projected<'_>) -> Result<(), StoreError> {
    if !p.ingest.is_empty() {
        let entry: Vec<i64> = p.ingest.iter().map(|(e, _)| *e as i64).collect();
        // A hash is stored as the signed integer of its bits and read back the same way.
        let hash: Vec<i64> = p.ingest.iter().map(|(_, h)| *h as i64).collect();
        exec(
            tx,
            "INSERT INTO ingest_index (entry, hash) SELECT * FROM unnest($1::bigint[], $2::bigint[])",
            &[&entry, &hash],
        )?;
    }
    upsert_usage(tx, "usage_hourly", p.usage.iter().map(|(k, n)| k.row(*n)))?;
    upsert_cost(tx, "cost_hourly", p.cost.iter().map(|(k, a)| k.row(*a)))?;
    add_trees(tx, &p.usage_tree, &p.cost_tree)?;
    if !p.tiers.is_empty() {
        let (mut n, mut b, mut r, mut per, mut u) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (k, add) in &p.tiers {
            n.push(k.node.as_str());
            b.push(k.book);
            r.push(k.rule);
            per.push(k.period.to_string());
            u.push(amount_text(*add, || {
                format!("the tier units of {}", k.node)
            })?);
        }
        exec(
            tx,
            "INSERT INTO tier_units (node, book, rule, period, units)
             SELECT n, b, r, p, u::numeric
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS t(n, b, r, p, u)
             ON CONFLICT (node, book, rule, period)
             DO UPDATE SET units = tier_units.units + excluded.units",
            &[&n, &b, &r, &per, &u],
        )?;
    }
    if !p.lines.is_empty() {
        upsert_lines(tx, "cost_lines", &p.lines)?;
        // The same lines by UTC day: a month's statement reads whole days there.
        let mut daily = ciyuan_store::LineSums::default();
        for (k, v) in &p.lines {
            let mut day = *k;
            day.hour = k.hour.div_euclid(DAY_SECS) * DAY_SECS;
            let slot = daily.entry(day).or_insert([ExactSum::ZERO; 4]);
            for (s, a) in slot.iter_mut().zip(v) {
                *s = s.checked_add(*a).ok_or_else(|| {
                    StoreError::Backend(format!("billing line of {} overflows", k.account))
                })?;
            }
        }
        upsert_lines(tx, "cost_lines_daily", &daily)?;
    }
    if !p.quality_hours.is_empty() {
        let (mut h, mut f, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for (hour, (first, last)) in &p.quality_hours {
            h.push(*hour);
            f.push(*first as i64);
            l.push(*last as i64);
        }
        exec(
            tx,
            "INSERT INTO quality_hours (hour, first, last)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
             ON CONFLICT (hour) DO UPDATE SET first = least(quality_hours.first, excluded.first),
                                              last = greatest(quality_hours.last, excluded.last)",
            &[&h, &f, &l],
        )?;
    }
    Ok(())
}

/// Adds token sums to `table` (the exact hourly rollups, or a subtree rollup) in one
/// statement.
fn upsert_usage<'k>(
    tx: &mut Tx<'_>,
    table: &str,
    rows: impl Iterator<Item = UsageAdd<'k>>,
) -> Result<(), StoreError> {
    let (mut a, mut h, mut sv, mut m, mut mo, mut d, mut t) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (node, hour, service, model, modality, direction, tokens) in rows {
        a.push(node);
        h.push(hour);
        sv.push(service);
        m.push(model);
        mo.push(modality.as_str());
        d.push(direction.as_str());
        t.push(tokens.to_string());
    }
    if a.is_empty() {
        return Ok(());
    }
    exec(
        tx,
        &format!(
            "INSERT INTO {table} (account, hour, service, model, modality, direction, tokens)
             SELECT a, h, s, m, mo, d, t::numeric
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[]) AS x(a, h, s, m, mo, d, t)
             ON CONFLICT (account, hour, service, model, modality, direction)
             DO UPDATE SET tokens = {table}.tokens + excluded.tokens"
        ),
        &[&a, &h, &sv, &m, &mo, &d, &t],
    )
}

/// Adds amounts to `table` (the exact hourly cost rollups, or a subtree rollup) in
/// one statement.
fn upsert_cost<'k>(
    tx: &mut Tx<'_>,
    table: &str,
    rows: impl Iterator<Item = CostAdd<'k>>,
) -> Result<(), StoreError> {
    let (mut a, mut h, mut s, mut m, mut c, mut amt) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (node, hour, service, model, currency, add) in rows {
        a.push(node);
        h.push(hour);
        s.push(service);
        m.push(model);
        c.push(currency.as_str().to_string());
        amt.push(amount_text(add, || {
            format!("the cost of {node} in {table}")
        })?);
    }
    if a.is_empty() {
        return Ok(());
    }
    exec(
        tx,
        &format!(
            "INSERT INTO {table} (account, hour, service, model, currency, amount)
             SELECT a, h, s, m, c, x::numeric
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::text[]) AS t(a, h, s, m, c, x)
             ON CONFLICT (account, hour, service, model, currency)
             DO UPDATE SET amount = {table}.amount + excluded.amount"
        ),
        &[&a, &h, &s, &m, &c, &amt],
    )
}

/// Adds entries `start..` to the rollups kept by a text (tags, keys and sessions).
fn add_keyed(tx: &mut Tx<'_>, start: u64, parts: &[&[Entry]]) -> Result<(), StoreError> {
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
    tx: &mut Tx<'_>,
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

/// The columns [`usage_row`] reads, in its order.
const USAGE_COLUMNS: &str = "account, hour, service, model, modality, direction, tokens::text";
/// The columns [`cost_row`] reads, in its order.
const COST_COLUMNS: &str = "hour, account, service, model, currency, amount::text";

/// A token row read with [`USAGE_COLUMNS`].
fn usage_row(r: &postgres::Row) -> Result<HourRow, StoreError> {
    let modality: &str = r.get(4);
    let direction: &str = r.get(5);
    let tokens: &str = r.get(6);
    Ok(HourRow {
        account: parse_path(r.get(0))?,
        hour: r.get(1),
        service: r.get(2),
        model: r.get(3),
        modality: modality
            .parse()
            .map_err(|e: ciyuan_core::TokenError| StoreError::Corrupt(e.to_string()))?,
        direction: direction
            .parse()
            .map_err(|e: ciyuan_core::TokenError| StoreError::Corrupt(e.to_string()))?,
        tokens: tokens
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("stored token sum {tokens:?}: {e}")))?,
    })
}

/// A cost row read with [`COST_COLUMNS`].
fn cost_row(r: &postgres::Row) -> Result<CostRow, StoreError> {
    let currency: &str = r.get(4);
    Ok(CostRow {
        hour: r.get(0),
        account: parse_path(r.get(1))?,
        service: r.get(2),
        model: r.get(3),
        currency: currency
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?,
        amount: parse_amount(r.get(5))?,
    })
}

fn key_from_row(r: &postgres::Row) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        key_id: r.get(0),
        account: parse_path(r.get(1))?,
        scopes: Scopes::parse_list(r.get(2)).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        name: r.get(3),
        created_at: parse_ts(r.get(4))?,
        revoked_at: r.get::<_, Option<&str>>(5).map(parse_ts).transpose()?,
    })
}

const KEY_COLUMNS: &str = "key_id, account, scopes, name, created_at, revoked_at";

fn account_from_row(r: &postgres::Row) -> Result<Account, StoreError> {
    let path: &str = r.get(0);
    Ok(Account {
        path: parse_path(path)?,
        info: from_json(r.get(1), &format!("account {path:?}"))?,
        created_at: parse_ts(r.get(2))?,
        created_entry: entry_id(r.get(3))?,
    })
}

fn recorded_from<T: serde::de::DeserializeOwned>(
    rows: Vec<postgres::Row>,
) -> Result<Vec<Recorded<T>>, StoreError> {
    rows.iter()
        .map(|r| {
            let entry = entry_id(r.get(0))?;
            Ok(Recorded {
                entry,
                ts: parse_ts(r.get(1))?,
                account: parse_path(r.get(2))?,
                body: from_json(r.get(3), &format!("entry {entry}"))?,
            })
        })
        .collect()
}

fn line_from(r: &postgres::Row) -> Result<LineRow, StoreError> {
    let price: &str = r.get(6);
    let currency: &str = r.get(7);
    Ok(LineRow {
        hour: r.get(0),
        account: parse_path(r.get(1))?,
        adjustment: r.get(2),
        service: r.get(3),
        model: r.get(4),
        key: r.get(5),
        unit_price: if price.is_empty() {
            None
        } else {
            Some(
                rust_decimal::Decimal::from_str_exact(price).map_err(|e| {
                    StoreError::Corrupt(format!("stored unit price {price:?}: {e}"))
                })?,
            )
        },
        currency: currency
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("stored currency: {e}")))?,
        book: r.get(8),
        version: u32::try_from(r.get::<_, i64>(9))
            .map_err(|_| StoreError::Corrupt("stored book version".into()))?,
        quantity: parse_amount(r.get(10))?,
        list: parse_amount(r.get(11))?,
        contracted: parse_amount(r.get(12))?,
        billed: parse_amount(r.get(13))?,
    })
}

const LINE_COLUMNS: &str =
    "hour, account, adjustment, service, model, key, unit_price, currency, book,
     version, quantity::text, list::text, contracted::text, billed::text";

impl PgStore {
    /// Opens the store of the database `pool` connects to, migrating it as needed.
    pub fn open(pool: Pool) -> Result<PgStore, StoreError> {
        crate::off_runtime(|| {
            let mut c = pool.get().map_err(pool_error)?;
            crate::migrate(&mut c).map_err(StoreError::Backend)?;
            drop(c);
            Ok(PgStore {
                inner: Inner { pool },
            })
        })
    }
}

impl Inner {
    fn conn(&self) -> Result<crate::Conn<'_>, StoreError> {
        self.pool.get().map_err(pool_error)
    }

    fn query(&self, sql: &str, p: &[String]) -> Result<Vec<postgres::Row>, StoreError> {
        self.conn()?.query(sql, &params(p)).map_err(backend)
    }

    /// The rows of the `what` (`usage` or `cost`) rollups `filter` names, in one
    /// statement: per node, its own hourly rows and one range of hours or days below it
    /// for each stretch of the filter's range, and with [`Subtrees::ChildrenOf`] the
    /// node's own hourly rows.
    fn tree_rows(
        &self,
        filter: &TreeFilter,
        what: &str,
        columns: &str,
    ) -> Result<Vec<postgres::Row>, StoreError> {
        use ciyuan_store::tree::{Span, Subtrees};
        /// Binds `v` as the next value; its placeholder.
        fn bind(args: &mut Vec<String>, v: String) -> String {
            args.push(v);
            format!("${}", args.len())
        }
        fn range(args: &mut Vec<String>, from: Option<i64>, to: Option<i64>) -> String {
            let mut sql = String::new();
            if let Some(from) = from {
                let p = bind(args, from.to_string());
                sql.push_str(&format!(" AND hour >= {p}::text::bigint"));
            }
            if let Some(to) = to {
                let p = bind(args, to.to_string());
                sql.push_str(&format!(" AND hour < {p}::text::bigint"));
            }
            sql
        }
        let mut args: Vec<String> = Vec::new();
        // The nodes: the one asked about, or its children (from the accounts).
        let (nodes, own) = match &filter.subtrees {
            Subtrees::Of(node) => {
                let p = bind(&mut args, node.as_str().to_string());
                (format!("SELECT {p}::text AS node"), None)
            }
            Subtrees::ChildrenOf(node) => {
                // A child is in the subtree and has one more segment than the node.
                let (cond, values) = subtree("path", node, args.len() + 1);
                args.extend(values);
                let depth = bind(&mut args, (node.depth() + 1).to_string());
                (
                    format!(
                        "SELECT path AS node FROM accounts WHERE {cond} AND path <> ''
                         AND array_length(string_to_array(path, '/'), 1) = {depth}::text::int"
                    ),
                    Some(node),
                )
            }
        };
        // The nodes' own usage, then what lies below them.
        let own_range = range(&mut args, filter.from_hour, filter.to_hour);
        let mut parts = vec![format!(
            "SELECT {columns} FROM {what}_hourly WHERE account IN (SELECT node FROM nodes){own_range}"
        )];
        for stretch in filter.stretches() {
            let table = match stretch.span {
                Span::Hour => "hourly",
                Span::Day => "daily",
            };
            let range = range(&mut args, stretch.from, stretch.to);
            parts.push(format!(
                "SELECT {columns} FROM {what}_tree_{table}
                 WHERE account IN (SELECT node FROM nodes){range}"
            ));
        }
        if let Some(node) = own {
            let p = bind(&mut args, node.as_str().to_string());
            let range = range(&mut args, filter.from_hour, filter.to_hour);
            parts.push(format!(
                "SELECT {columns} FROM {what}_hourly WHERE account = {p}{range}"
            ));
        }
        let sql = format!("WITH nodes AS ({nodes}) {}", parts.join(" UNION ALL "));
        self.query(&sql, &args)
    }

    fn hour_rows(
        &self,
        select: &str,
        table: &str,
        filter: &HourFilter,
        from: Option<i64>,
        to: Option<i64>,
        order: &str,
    ) -> Result<Vec<postgres::Row>, StoreError> {
        self.hour_rows_then(
            select,
            table,
            filter,
            from,
            to,
            &format!("ORDER BY {order}"),
        )
    }

    /// [`Inner::hour_rows`] with any `tail` after the condition (a `GROUP BY` and its
    /// order).
    fn hour_rows_then(
        &self,
        select: &str,
        table: &str,
        filter: &HourFilter,
        from: Option<i64>,
        to: Option<i64>,
        tail: &str,
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let (cond, mut args) = subtree("account", &filter.account, 1);
        let mut sql = format!("SELECT {select} FROM {table} WHERE {cond}");
        if let Some(from) = from {
            args.push(from.to_string());
            sql.push_str(&format!(" AND hour >= ${}::text::bigint", args.len()));
        }
        if let Some(to) = to {
            args.push(to.to_string());
            sql.push_str(&format!(" AND hour < ${}::text::bigint", args.len()));
        }
        sql.push(' ');
        sql.push_str(tail);
        self.query(&sql, &args)
    }
}

impl Store for Inner {
    fn projected_through(&self) -> Result<u64, StoreError> {
        let v: i64 = self
            .conn()?
            .query_one(
                "SELECT value FROM meta WHERE name = 'projected_through'",
                &[],
            )
            .map_err(backend)?
            .get(0);
        entry_id(v)
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
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(backend)?;
        // The watermark row locked: two nodes applying the same entries queue here,
        // and the second finds the watermark moved.
        let at: i64 = tx
            .query_one(
                "SELECT value FROM meta WHERE name = 'projected_through' FOR UPDATE",
                &[],
            )
            .map_err(backend)?
            .get(0);
        if at as u64 != start {
            return Err(StoreError::OutOfOrder {
                at: at as u64,
                from: start,
            });
        }
        let projected = ciyuan_store::project_parts(start, parts)?;
        write_changes(&mut tx, &projected.changes)?;
        write_sums(&mut tx, &projected)?;
        let plain: Vec<&[Entry]> = parts.iter().map(|p| p.entries).collect();
        add_keyed(&mut tx, start, &plain)?;
        exec(
            &mut tx,
            "UPDATE meta SET value = $1 WHERE name = 'projected_through'",
            &[&((start + count as u64) as i64)],
        )?;
        tx.commit().map_err(backend)
    }

    fn reset_projections(&self) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(backend)?;
        tx.batch_execute(&format!("TRUNCATE {}", PROJECTIONS.join(", ")))
            .map_err(backend)?;
        exec(
            &mut tx,
            "UPDATE meta SET value = 0 WHERE name = 'projected_through'",
            &[],
        )?;
        tx.commit().map_err(backend)
    }

    fn account(&self, path: &AccountPath) -> Result<Option<Account>, StoreError> {
        self.query(
            "SELECT path, info, created_at, created_entry FROM accounts WHERE path = $1",
            &[path.as_str().to_string()],
        )?
        .first()
        .map(account_from_row)
        .transpose()
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
        for row in self.query(
            &format!(
                "SELECT path, info, created_at, created_entry FROM accounts WHERE {cond}
                 ORDER BY path LIMIT {}",
                sql_limit(rest)
            ),
            &args,
        )? {
            out.push(account_from_row(&row)?);
        }
        Ok(out)
    }

    fn insert_key(&self, key: &KeyRecord, secret_hash: &[u8; 32]) -> Result<(), StoreError> {
        let r = self.conn()?.execute(
            "INSERT INTO keys (key_id, secret_hash, account, scopes, name, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &key.key_id,
                &secret_hash.as_slice(),
                &key.account.as_str(),
                &key.scopes.to_string(),
                &key.name,
                &key.created_at.to_string(),
                &key.revoked_at.map(|t| t.to_string()),
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::Conflict(format!("key {} exists", key.key_id)))
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        self.conn()?
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE secret_hash = $1"),
                &[&secret_hash.as_slice()],
            )
            .map_err(backend)?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.conn()?
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = $1"),
                &[&key_id],
            )
            .map_err(backend)?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    fn keys_page(
        &self,
        under: &AccountPath,
        after: Option<(&AccountPath, &str)>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let seek = subtree_seek(under, after.map(|(node, _)| node.as_str()));
        let read = |sql: String, args: Vec<String>| -> Result<Vec<KeyRecord>, StoreError> {
            self.query(&sql, &args)?.iter().map(key_from_row).collect()
        };
        let own = match (seek.own, after) {
            (OwnRows::All, _) => Some(("account = $1", vec![under.as_str().to_string()])),
            (OwnRows::AfterCursor, Some((_, id))) => Some((
                "account = $1 AND key_id > $2",
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
            .conn()?
            .query_one("SELECT count(*) FROM keys", &[])
            .map_err(backend)?
            .get(0);
        Ok(n as u64)
    }

    fn revoke_key(&self, key_id: &str, at: Timestamp) -> Result<Option<KeyRecord>, StoreError> {
        self.conn()?
            .execute(
                "UPDATE keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
                &[&at.to_string(), &key_id],
            )
            .map_err(backend)?;
        self.key(key_id)
    }

    fn insert_session(
        &self,
        id_hash: &[u8; 32],
        session: &SessionRecord,
    ) -> Result<(), StoreError> {
        let r = self.conn()?.execute(
            "INSERT INTO sessions (id_hash, key_id, created_at, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &id_hash.as_slice(),
                &session.key_id,
                &session.created_at,
                &session.expires_at,
                &session.revoked_at,
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::Conflict("the session exists".into()))
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT key_id, created_at, expires_at, revoked_at FROM sessions WHERE id_hash = $1",
                &[&id_hash.as_slice()],
            )
            .map_err(backend)?;
        Ok(row.map(|r| SessionRecord {
            key_id: r.get(0),
            created_at: r.get(1),
            expires_at: r.get(2),
            revoked_at: r.get(3),
        }))
    }

    fn revoke_session(&self, id_hash: &[u8; 32], at: i64) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute(
                "UPDATE sessions SET revoked_at = $1 WHERE id_hash = $2 AND revoked_at IS NULL",
                &[&at, &id_hash.as_slice()],
            )
            .map_err(backend)?;
        Ok(n == 1)
    }

    fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        self.conn()?
            .execute("DELETE FROM sessions WHERE expires_at < $1", &[&before])
            .map_err(backend)
    }

    fn ingest_index(&self, f: &mut dyn FnMut(u64, u64)) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        // One snapshot: the index and the watermark agree.
        let mut tx = c
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(backend)?;
        let through: i64 = tx
            .query_one(
                "SELECT value FROM meta WHERE name = 'projected_through'",
                &[],
            )
            .map_err(backend)?
            .get(0);
        let rows = tx
            .query("SELECT hash, entry FROM ingest_index ORDER BY entry", &[])
            .map_err(backend)?;
        // Ended before the rows are handed on: a session left idle in a transaction
        // is ended by the server (`IDLE_IN_TRANSACTION`), and a large index takes a
        // while to load.
        tx.commit().map_err(backend)?;
        for row in rows {
            f(row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        }
        entry_id(through)
    }

    fn budgets(&self) -> Result<Vec<(AccountPath, ciyuan_core::BudgetSet)>, StoreError> {
        self.query("SELECT node, spec FROM budgets ORDER BY node, name", &[])?
            .iter()
            .map(|r| Ok((parse_path(r.get(0))?, from_json(r.get(1), "budget")?)))
            .collect()
    }

    fn access_rules(&self) -> Result<Vec<(AccountPath, ciyuan_core::AccessSet)>, StoreError> {
        self.query("SELECT node, rules FROM access_rules ORDER BY node", &[])?
            .iter()
            .map(|r| Ok((parse_path(r.get(0))?, from_json(r.get(1), "access rules")?)))
            .collect()
    }

    fn definitions(&self) -> Result<Vec<(u64, ciyuan_core::TokenDefinition)>, StoreError> {
        self.query(
            "SELECT entry, definition FROM definitions ORDER BY service, version",
            &[],
        )?
        .iter()
        .map(|r| Ok((entry_id(r.get(0))?, from_json(r.get(1), "definition")?)))
        .collect()
    }

    fn price_books(&self) -> Result<Vec<(u64, ciyuan_core::PriceBook)>, StoreError> {
        self.query(
            "SELECT entry, book FROM price_books ORDER BY name, version",
            &[],
        )?
        .iter()
        .map(|r| Ok((entry_id(r.get(0))?, from_json(r.get(1), "price book")?)))
        .collect()
    }

    fn contracts(&self) -> Result<Vec<(AccountPath, u64, ciyuan_core::PriceContract)>, StoreError> {
        self.query(
            "SELECT node, entry, contract FROM contracts ORDER BY node",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok((
                parse_path(r.get(0))?,
                entry_id(r.get(1))?,
                from_json(r.get(2), "contract")?,
            ))
        })
        .collect()
    }

    fn wallet_settings(&self) -> Result<Vec<(AccountPath, ciyuan_core::WalletSet)>, StoreError> {
        self.query(
            "SELECT node, settings FROM wallet_settings ORDER BY node, currency",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok((
                parse_path(r.get(0))?,
                from_json(r.get(1), "wallet settings")?,
            ))
        })
        .collect()
    }

    fn postings(
        &self,
        node: Option<&AccountPath>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Posting>>, StoreError> {
        let after = after.map_or(-1, |a| a as i64);
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = match node {
            None => self.conn()?.query(
                "SELECT entry, ts, account, posting FROM postings WHERE entry > $1 ORDER BY entry LIMIT $2",
                &[&after, &limit],
            ),
            Some(n) => self.conn()?.query(
                "SELECT p.entry, p.ts, p.account, p.posting FROM posting_nodes n
                 JOIN postings p ON p.entry = n.entry
                 WHERE n.node = $1 AND n.entry > $2 ORDER BY n.entry LIMIT $3",
                &[&n.as_str(), &after, &limit],
            ),
        }
        .map_err(backend)?;
        recorded_from(rows)
    }

    fn cost_hours(&self, filter: &HourFilter) -> Result<Vec<CostRow>, StoreError> {
        self.hour_rows(
            COST_COLUMNS,
            "cost_hourly",
            filter,
            filter.from_hour,
            filter.to_hour,
            "hour, account, service, model, currency",
        )?
        .iter()
        .map(cost_row)
        .collect()
    }

    fn statements(
        &self,
        node: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::StatementClosed>>, StoreError> {
        recorded_from(self.query(
            "SELECT entry, ts, node, closed FROM statements WHERE node = $1 ORDER BY period",
            &[node.as_str().to_string()],
        )?)
    }

    fn service_levels(
        &self,
        under: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::ServiceLevelEvaluated>>, StoreError> {
        let (cond, args) = subtree("node", under, 1);
        recorded_from(self.query(
            &format!(
                "SELECT entry, ts, node, evaluated FROM service_levels WHERE {cond}
                 ORDER BY node, period, level"
            ),
            &args,
        )?)
    }

    fn quality_range(
        &self,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let row = self
            .conn()?
            .query_one(
                "SELECT min(first), max(last) FROM quality_hours WHERE hour >= $1 AND hour < $2",
                &[&from_hour, &to_hour],
            )
            .map_err(backend)?;
        match (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
            (Some(f), Some(l)) => Ok(Some((entry_id(f)?, entry_id(l)?))),
            _ => Ok(None),
        }
    }

    fn cost_lines(&self, filter: &HourFilter) -> Result<Vec<LineRow>, StoreError> {
        // An open range is read by the hour, as it always was: its rows' hours are
        // what the caller gets.
        let bounded = filter.from_hour.is_some() && filter.to_hour.is_some();
        // Whole UTC days from the daily table, the hours around them from the hourly.
        let mut out = Vec::new();
        for stretch in ciyuan_store::tree::stretches(filter.from_hour, filter.to_hour, bounded) {
            let table = match stretch.span {
                ciyuan_store::tree::Span::Hour => "cost_lines",
                ciyuan_store::tree::Span::Day => "cost_lines_daily",
            };
            for r in self.hour_rows(
                LINE_COLUMNS,
                table,
                filter,
                stretch.from,
                stretch.to,
                "hour, account",
            )? {
                out.push(line_from(&r)?);
            }
        }
        Ok(out)
    }

    fn cost_lines_page(
        &self,
        filter: &HourFilter,
        after: Option<&LineRow>,
        limit: usize,
    ) -> Result<Vec<LineRow>, StoreError> {
        let (cond, mut args) = subtree("account", &filter.account, 1);
        let mut sql = format!("SELECT {LINE_COLUMNS} FROM cost_lines WHERE {cond}");
        if let Some(from) = filter.from_hour {
            args.push(from.to_string());
            sql.push_str(&format!(" AND hour >= ${}::text::bigint", args.len()));
        }
        if let Some(to) = filter.to_hour {
            args.push(to.to_string());
            sql.push_str(&format!(" AND hour < ${}::text::bigint", args.len()));
        }
        if let Some(a) = after {
            let n = args.len();
            sql.push_str(&format!(
                " AND (account, hour, service, model, adjustment, key, unit_price, currency, book, version)
                     > (${}, ${}::text::bigint, ${}, ${}, ${}::text::bool, ${}, ${}, ${}, ${}, ${}::text::bigint)",
                n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7, n + 8, n + 9, n + 10
            ));
            args.extend([
                a.account.as_str().to_string(),
                a.hour.to_string(),
                a.service.clone(),
                a.model.clone(),
                a.adjustment.to_string(),
                a.key.clone(),
                a.unit_price.map(|p| p.to_string()).unwrap_or_default(),
                a.currency.as_str().to_string(),
                a.book.clone(),
                a.version.to_string(),
            ]);
        }
        sql.push_str(&format!(
            " ORDER BY account, hour, service, model, adjustment, key, unit_price, currency, book, version LIMIT {limit}"
        ));
        self.query(&sql, &args)?.iter().map(line_from).collect()
    }

    fn tier_units(&self) -> Result<Vec<TierUnits>, StoreError> {
        self.query(
            "SELECT node, book, rule, period, units::text FROM tier_units",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(TierUnits {
                node: parse_path(r.get(0))?,
                book: r.get(1),
                rule: r.get(2),
                period: parse_ts(r.get(3))?,
                units: parse_amount(r.get(4))?,
            })
        })
        .collect()
    }

    fn response(&self, id: &str) -> Result<Option<Recorded<String>>, StoreError> {
        // The upstream's name read as the JSON string `recorded_from` takes.
        Ok(recorded_from(self.query(
            "SELECT entry, ts, account, to_json(upstream)::text FROM responses WHERE id = $1",
            &[id.to_string()],
        )?)?
        .pop())
    }

    fn flagged(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Usage>>, StoreError> {
        let (cond, args) = subtree("account", under, 1);
        recorded_from(self.query(
            &format!(
                "SELECT entry, ts, account, usage FROM flagged WHERE {cond} ORDER BY entry DESC LIMIT {limit}"
            ),
            &args,
        )?)
    }

    fn incidents(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Incident>>, StoreError> {
        let (cond, args) = subtree("account", under, 1);
        recorded_from(self.query(
            &format!(
                "SELECT entry, ts, account, incident FROM incidents WHERE {cond} ORDER BY entry DESC LIMIT {limit}"
            ),
            &args,
        )?)
    }

    fn report_progress(&self) -> Result<Vec<Recorded<ciyuan_core::ReportDelivered>>, StoreError> {
        recorded_from(self.query(
            "SELECT entry, ts, account, delivered FROM report_progress ORDER BY name",
            &[],
        )?)
    }

    fn usage_hours(&self, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError> {
        self.hour_rows(
            USAGE_COLUMNS,
            "usage_hourly",
            filter,
            filter.from_hour,
            filter.to_hour,
            "account, hour, service, model, modality, direction",
        )?
        .iter()
        .map(usage_row)
        .collect()
    }

    fn keyed_usage_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<HourRow>, StoreError> {
        // Summed over the range in the query (exact: NUMERIC), so a month of many
        // hours travels as one row per key.
        let rows = match whole {
            true => self.hour_rows_then(
                "account, min(hour), service, model, modality, direction, sum(tokens)::text",
                which.usage_table(),
                filter,
                filter.from_hour,
                filter.to_hour,
                "GROUP BY account, service, model, modality, direction
                 ORDER BY account, service, model, modality, direction",
            )?,
            false => self.hour_rows_then(
                USAGE_COLUMNS,
                which.usage_table(),
                filter,
                filter.from_hour,
                filter.to_hour,
                "ORDER BY account, hour, service, model, modality, direction",
            )?,
        };
        rows.iter().map(usage_row).collect()
    }

    fn keyed_cost_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<CostRow>, StoreError> {
        let rows = match whole {
            true => self.hour_rows_then(
                "min(hour), account, service, model, currency, sum(amount)::text",
                which.cost_table(),
                filter,
                filter.from_hour,
                filter.to_hour,
                "GROUP BY account, service, model, currency
                 ORDER BY account, service, model, currency",
            )?,
            false => self.hour_rows_then(
                COST_COLUMNS,
                which.cost_table(),
                filter,
                filter.from_hour,
                filter.to_hour,
                "ORDER BY account, hour, service, model, currency",
            )?,
        };
        rows.iter().map(cost_row).collect()
    }

    fn usage_tree(&self, filter: &TreeFilter) -> Result<Vec<HourRow>, StoreError> {
        self.tree_rows(filter, "usage", USAGE_COLUMNS)?
            .iter()
            .map(usage_row)
            .collect()
    }

    fn cost_tree(&self, filter: &TreeFilter) -> Result<Vec<CostRow>, StoreError> {
        self.tree_rows(filter, "cost", COST_COLUMNS)?
            .iter()
            .map(cost_row)
            .collect()
    }
}

impl Store for PgStore {
    fn usage_tree(&self, filter: &TreeFilter) -> Result<Vec<HourRow>, StoreError> {
        crate::off_runtime(|| self.inner.usage_tree(filter))
    }

    fn cost_tree(&self, filter: &TreeFilter) -> Result<Vec<CostRow>, StoreError> {
        crate::off_runtime(|| self.inner.cost_tree(filter))
    }

    fn report_progress(&self) -> Result<Vec<Recorded<ciyuan_core::ReportDelivered>>, StoreError> {
        crate::off_runtime(|| self.inner.report_progress())
    }

    fn ingest_index(&self, f: &mut dyn FnMut(u64, u64)) -> Result<u64, StoreError> {
        crate::off_runtime(|| self.inner.ingest_index(f))
    }

    fn projected_through(&self) -> Result<u64, StoreError> {
        crate::off_runtime(|| self.inner.projected_through())
    }

    fn shares_holds(&self) -> bool {
        true
    }

    fn heartbeat(&self, node: &str, followed: u64) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::heartbeat(&mut *self.inner.conn()?, node, followed))
    }

    fn leave(&self, node: &str) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::leave(&mut *self.inner.conn()?, node))
    }

    fn reserve_many(
        &self,
        node: &str,
        seen: ciyuan_store::Seen,
        counted: &[i64],
        requests: &[(i64, &[ciyuan_store::HoldTerm])],
        ttl: std::time::Duration,
    ) -> Result<Vec<Option<(usize, rust_decimal::Decimal)>>, StoreError> {
        crate::off_runtime(|| {
            crate::holds::reserve_many(&mut *self.inner.conn()?, node, seen, counted, requests, ttl)
        })
    }

    fn take_lease(
        &self,
        name: &str,
        node: &str,
        term: std::time::Duration,
        share: std::time::Duration,
    ) -> Result<ciyuan_store::LeaseTaken, StoreError> {
        crate::off_runtime(|| {
            crate::holds::take_lease(&mut *self.inner.conn()?, name, node, term, share)
        })
    }

    fn drop_lease(&self, name: &str, node: &str) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::drop_lease(&mut *self.inner.conn()?, name, node))
    }

    fn reserve_slices(
        &self,
        node: &str,
        seen: ciyuan_store::Seen,
        counted: &[i64],
        asks: &[ciyuan_store::SliceAsk],
        ttl: std::time::Duration,
    ) -> Result<Vec<Option<rust_decimal::Decimal>>, StoreError> {
        crate::off_runtime(|| {
            crate::holds::reserve_slices(&mut *self.inner.conn()?, node, seen, counted, asks, ttl)
        })
    }

    fn resize_slices(&self, sizes: &[ciyuan_store::SliceSize]) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::resize_slices(&mut *self.inner.conn()?, sizes))
    }

    fn settle_holds(&self, settled: &[ciyuan_store::SettledHold]) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::settle(&mut *self.inner.conn()?, settled))
    }

    fn release_hold(&self, id: i64) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::release(&mut *self.inner.conn()?, id))
    }

    fn raise_barrier(&self, node: &str, id: i64) -> Result<bool, StoreError> {
        crate::off_runtime(|| crate::holds::raise_barrier(&mut *self.inner.conn()?, node, id))
    }

    fn unpaused(&self, node: &str, id: i64) -> Result<Vec<String>, StoreError> {
        crate::off_runtime(|| crate::holds::unpaused(&mut *self.inner.conn()?, node, id))
    }

    fn pause(&self, node: &str, id: i64) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::pause(&mut *self.inner.conn()?, node, id))
    }

    fn lower_barrier(&self, id: i64, size: Option<u64>) -> Result<(), StoreError> {
        crate::off_runtime(|| crate::holds::lower_barrier(&mut *self.inner.conn()?, id, size))
    }

    fn barrier(&self) -> Result<Option<ciyuan_store::Barrier>, StoreError> {
        crate::off_runtime(|| crate::holds::barrier(&mut *self.inner.conn()?))
    }

    fn lead(&self, node: &str, term: std::time::Duration) -> Result<bool, StoreError> {
        // Seconds as a float: a lease's length, never a sum of anything.
        let secs = term.as_secs_f64();
        crate::off_runtime(|| {
            // The database's clock decides when a lease lapsed: nodes' clocks may
            // disagree, the one they share does not.
            let held = self
                .inner
                .conn()?
                .query_opt(
                    "INSERT INTO leader (node, until)
                     VALUES ($1, now() + make_interval(secs => $2))
                     ON CONFLICT (one) DO UPDATE SET node = EXCLUDED.node, until = EXCLUDED.until
                     WHERE leader.node = EXCLUDED.node OR leader.until < now()
                     RETURNING node",
                    &[&node, &secs],
                )
                .map_err(backend)?;
            Ok(held.is_some())
        })
    }

    fn apply(&self, start: u64, entries: &[Entry]) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.apply(start, entries))
    }

    fn apply_parts(&self, start: u64, parts: &[&[Entry]]) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.apply_parts(start, parts))
    }

    fn apply_keyed(&self, start: u64, parts: &[ciyuan_store::Part<'_>]) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.apply_keyed(start, parts))
    }

    fn reset_projections(&self) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.reset_projections())
    }

    fn account(&self, path: &AccountPath) -> Result<Option<Account>, StoreError> {
        crate::off_runtime(|| self.inner.account(path))
    }

    fn accounts_page(
        &self,
        under: &AccountPath,
        after: Option<&AccountPath>,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError> {
        crate::off_runtime(|| self.inner.accounts_page(under, after, limit))
    }

    fn insert_key(&self, key: &KeyRecord, secret_hash: &[u8; 32]) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.insert_key(key, secret_hash))
    }

    fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        crate::off_runtime(|| self.inner.key_by_hash(secret_hash))
    }

    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        crate::off_runtime(|| self.inner.key(key_id))
    }

    fn keys_page(
        &self,
        under: &AccountPath,
        after: Option<(&AccountPath, &str)>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        crate::off_runtime(|| self.inner.keys_page(under, after, limit))
    }

    fn key_count(&self) -> Result<u64, StoreError> {
        crate::off_runtime(|| self.inner.key_count())
    }

    fn revoke_key(&self, key_id: &str, at: Timestamp) -> Result<Option<KeyRecord>, StoreError> {
        crate::off_runtime(|| self.inner.revoke_key(key_id, at))
    }

    fn insert_session(
        &self,
        id_hash: &[u8; 32],
        session: &SessionRecord,
    ) -> Result<(), StoreError> {
        crate::off_runtime(|| self.inner.insert_session(id_hash, session))
    }

    fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        crate::off_runtime(|| self.inner.session(id_hash))
    }

    fn revoke_session(&self, id_hash: &[u8; 32], at: i64) -> Result<bool, StoreError> {
        crate::off_runtime(|| self.inner.revoke_session(id_hash, at))
    }

    fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        crate::off_runtime(|| self.inner.purge_sessions(before))
    }

    fn budgets(&self) -> Result<Vec<(AccountPath, ciyuan_core::BudgetSet)>, StoreError> {
        crate::off_runtime(|| self.inner.budgets())
    }

    fn access_rules(&self) -> Result<Vec<(AccountPath, ciyuan_core::AccessSet)>, StoreError> {
        crate::off_runtime(|| self.inner.access_rules())
    }

    fn definitions(&self) -> Result<Vec<(u64, ciyuan_core::TokenDefinition)>, StoreError> {
        crate::off_runtime(|| self.inner.definitions())
    }

    fn price_books(&self) -> Result<Vec<(u64, ciyuan_core::PriceBook)>, StoreError> {
        crate::off_runtime(|| self.inner.price_books())
    }

    fn contracts(&self) -> Result<Vec<(AccountPath, u64, ciyuan_core::PriceContract)>, StoreError> {
        crate::off_runtime(|| self.inner.contracts())
    }

    fn wallet_settings(&self) -> Result<Vec<(AccountPath, ciyuan_core::WalletSet)>, StoreError> {
        crate::off_runtime(|| self.inner.wallet_settings())
    }

    fn postings(
        &self,
        node: Option<&AccountPath>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Posting>>, StoreError> {
        crate::off_runtime(|| self.inner.postings(node, after, limit))
    }

    fn cost_hours(&self, filter: &HourFilter) -> Result<Vec<CostRow>, StoreError> {
        crate::off_runtime(|| self.inner.cost_hours(filter))
    }

    fn statements(
        &self,
        node: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::StatementClosed>>, StoreError> {
        crate::off_runtime(|| self.inner.statements(node))
    }

    fn service_levels(
        &self,
        under: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::ServiceLevelEvaluated>>, StoreError> {
        crate::off_runtime(|| self.inner.service_levels(under))
    }

    fn quality_range(
        &self,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        crate::off_runtime(|| self.inner.quality_range(from_hour, to_hour))
    }

    fn cost_lines(&self, filter: &HourFilter) -> Result<Vec<LineRow>, StoreError> {
        crate::off_runtime(|| self.inner.cost_lines(filter))
    }

    fn cost_lines_page(
        &self,
        filter: &HourFilter,
        after: Option<&LineRow>,
        limit: usize,
    ) -> Result<Vec<LineRow>, StoreError> {
        crate::off_runtime(|| self.inner.cost_lines_page(filter, after, limit))
    }

    fn tier_units(&self) -> Result<Vec<TierUnits>, StoreError> {
        crate::off_runtime(|| self.inner.tier_units())
    }

    fn response(&self, id: &str) -> Result<Option<Recorded<String>>, StoreError> {
        crate::off_runtime(|| self.inner.response(id))
    }

    fn flagged(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Usage>>, StoreError> {
        crate::off_runtime(|| self.inner.flagged(under, limit))
    }

    fn incidents(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Incident>>, StoreError> {
        crate::off_runtime(|| self.inner.incidents(under, limit))
    }

    fn usage_hours(&self, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError> {
        crate::off_runtime(|| self.inner.usage_hours(filter))
    }

    fn keyed_usage_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<HourRow>, StoreError> {
        crate::off_runtime(|| self.inner.keyed_usage_hours(which, filter, whole))
    }

    fn keyed_cost_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<CostRow>, StoreError> {
        crate::off_runtime(|| self.inner.keyed_cost_hours(which, filter, whole))
    }
}
