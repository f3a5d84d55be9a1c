//! Storage traits for Ciyuan's state and projections, shared by every backend.
//!
//! The ledger is the source of truth. What lives behind [`Store`] is either derived from
//! it (accounts, usage rollups: rebuildable by replaying the log) or is authentication
//! state that must never enter a public log (key hashes). Backends: `ciyuan-store-sqlite`
//! for the embedded default; PostgreSQL implements the same trait and passes the same
//! conformance tests.
//!
//! Methods are synchronous: the embedded backend is SQLite, and the server calls them
//! from blocking threads, never from the async reactor.
#![deny(missing_docs)]

use ciyuan_core::jiff::{Timestamp, tz::TimeZone};
use ciyuan_core::{AccountInfo, AccountPath, Direction, Entry, Modality, Scopes};

pub mod keyed;
mod log;
mod projection;
pub mod subjects;
pub mod tags;
pub mod tree;
mod usage;
pub use log::{AppendDone, CheckpointDone, EntryKey, Log, LogError, ScanFn, SignedCheckpoint};
pub use projection::{
    Change, CostAdd, CostKey, CostSums, LineKey, LineOf, LineSums, Part, Projected, QualityHours,
    RollupKey, TierCounterKey, TierSums, UsageAdd, project, project_parts,
};
pub use usage::{
    Bucket, CostSums as RowCost, GroupBy, SumOverflow, TokenSums, UsageQuery, UsageRow, aggregate,
    aggregate_cost, ceil_hour, floor_hour,
};

/// An account node, as projected from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its path.
    pub path: AccountPath,
    /// Its current attributes.
    pub info: AccountInfo,
    /// When it was created (the entry's timestamp).
    pub created_at: Timestamp,
    /// The ledger entry that created it.
    pub created_entry: u64,
}

/// Something the ledger recorded, with where and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<T> {
    /// The entry's id (log index).
    pub entry: u64,
    /// The entry's time.
    pub ts: Timestamp,
    /// The entry's account.
    pub account: AccountPath,
    /// What it recorded.
    pub body: T,
}

/// An API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public id, also the first part of the key string.
    pub key_id: String,
    /// The node the key belongs to; it can act only within this subtree.
    pub account: AccountPath,
    /// What it may do.
    pub scopes: Scopes,
    /// A label.
    pub name: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
}

/// A console session as the store keeps it: the key it acts as and its lifetime. The
/// session's id is a secret (256 random bits in an HttpOnly cookie); the store holds
/// only its SHA-256, as it does for keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The key the session acts as: its scopes and subtree, and its revocation.
    pub key_id: String,
    /// When it was opened, in seconds since the Unix epoch.
    pub created_at: i64,
    /// When it ends whatever happens (an absolute expiry), in seconds since the epoch.
    pub expires_at: i64,
    /// When it was signed out, if it was, in seconds since the epoch.
    pub revoked_at: Option<i64>,
}

/// A usage rollup row as kept by a backend: one account node, service, model, UTC hour,
/// modality and direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRow {
    /// Start of the UTC hour, in seconds since the Unix epoch.
    pub hour: i64,
    /// The node.
    pub account: AccountPath,
    /// The service.
    pub service: String,
    /// The model, empty where none.
    pub model: String,
    /// Modality.
    pub modality: Modality,
    /// Direction.
    pub direction: Direction,
    /// Signed token sum, exact (the backend keeps sums wider than `i64`).
    pub tokens: i128,
}

/// A cost rollup row: rated usage of one node, service, model, UTC hour and currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRow {
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// The node.
    pub account: AccountPath,
    /// The service.
    pub service: String,
    /// The model, empty where none.
    pub model: String,
    /// The currency.
    pub currency: ciyuan_core::Currency,
    /// The amount, exact.
    pub amount: ciyuan_core::ExactSum,
}

/// An hourly billing line as stored (see [`LineKey`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRow {
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// The node.
    pub account: AccountPath,
    /// An adjustment (a correction's, or rounding), not usage.
    pub adjustment: bool,
    /// The service.
    pub service: String,
    /// The model, empty where none.
    pub model: String,
    /// The priced key's text, or `rounding`.
    pub key: String,
    /// The list price of one unit; none for rounding.
    pub unit_price: Option<rust_decimal::Decimal>,
    /// The currency.
    pub currency: ciyuan_core::Currency,
    /// The book.
    pub book: String,
    /// Its version.
    pub version: u32,
    /// Units.
    pub quantity: ciyuan_core::ExactSum,
    /// At list prices.
    pub list: ciyuan_core::ExactSum,
    /// After the contract's discount and markup.
    pub contracted: ciyuan_core::ExactSum,
    /// Billed.
    pub billed: ciyuan_core::ExactSum,
}

/// A billing line as a backend reads it, its text borrowed from the backend's row and
/// its amounts decimals: what [`Store::each_cost_line`] hands an export, which formats it
/// without copying anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRef<'a> {
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// The node.
    pub account: &'a AccountPath,
    /// An adjustment (a correction's, or rounding), not usage.
    pub adjustment: bool,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// The priced key's text, or `rounding`.
    pub key: &'a str,
    /// The list price of one unit; none for rounding.
    pub unit_price: Option<rust_decimal::Decimal>,
    /// The currency.
    pub currency: ciyuan_core::Currency,
    /// The book.
    pub book: &'a str,
    /// Its version.
    pub version: u32,
    /// Units, normalized (no trailing zeros in the fraction).
    pub quantity: rust_decimal::Decimal,
    /// At list prices, normalized.
    pub list: rust_decimal::Decimal,
    /// After the contract's discount and markup, normalized.
    pub contracted: rust_decimal::Decimal,
    /// Billed, normalized.
    pub billed: rust_decimal::Decimal,
}

impl LineRef<'_> {
    /// The line as an owned row (its sums exact, as [`LineRow`] keeps them).
    pub fn to_row(&self) -> LineRow {
        use ciyuan_core::ExactSum;
        LineRow {
            hour: self.hour,
            account: self.account.clone(),
            adjustment: self.adjustment,
            service: self.service.to_string(),
            model: self.model.to_string(),
            key: self.key.to_string(),
            unit_price: self.unit_price,
            currency: self.currency,
            book: self.book.to_string(),
            version: self.version,
            quantity: ExactSum::of(self.quantity),
            list: ExactSum::of(self.list),
            contracted: ExactSum::of(self.contracted),
            billed: ExactSum::of(self.billed),
        }
    }
}

/// What one call of [`Store::each_cost_line`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinesVisited {
    /// Lines handed to the visitor.
    pub count: usize,
    /// The last of them, the cursor for the next call.
    pub last: Option<LineRow>,
    /// The visitor asked to stop.
    pub stopped: bool,
}

/// A sum of a stored billing line as a decimal, normalized as the backends store them;
/// an error names what does not fit 28 digits.
pub fn line_decimal(
    sum: ciyuan_core::ExactSum,
    what: &str,
) -> Result<rust_decimal::Decimal, StoreError> {
    sum.to_decimal()
        .ok_or_else(|| StoreError::Corrupt(format!("{what} ({sum}) needs more than 28 digits")))
}

/// The units counted on one tier counter (see [`ciyuan_core::TierPlace`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierUnits {
    /// The billing node.
    pub node: AccountPath,
    /// The book.
    pub book: String,
    /// The rule's counter name.
    pub rule: String,
    /// The period's start.
    pub period: ciyuan_core::jiff::Timestamp,
    /// The units counted, exact.
    pub units: ciyuan_core::ExactSum,
}

/// Which hourly rows a usage query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourFilter {
    /// Only this node and its subtree.
    pub account: AccountPath,
    /// First hour included (seconds since the epoch, inclusive).
    pub from_hour: Option<i64>,
    /// End (seconds since the epoch, exclusive).
    pub to_hour: Option<i64>,
}

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing exists already.
    #[error("{0}")]
    Conflict(String),
    /// The projections are not where the caller thinks they are.
    #[error("projection is at entry {at}, cannot apply from {from}")]
    OutOfOrder {
        /// Next entry the projection expects.
        at: u64,
        /// Entry the caller offered.
        from: u64,
    },
    /// Stored data that does not parse.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The backend failed, and the same call would fail again (a constraint, a schema
    /// this build does not know, a bug).
    #[error("storage backend: {0}")]
    Backend(String),
    /// The backend cannot answer now but may in a moment: the connection was lost or
    /// refused, the database is shutting down or starting, or the transaction lost a
    /// serialization race or a deadlock and was rolled back. Nothing of the call took
    /// effect, so the caller may retry it as it was.
    #[error("storage unavailable, retry: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the same call may succeed if tried again later (and took no effect).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One counter a gateway request holds in a database several nodes share
/// ([`Store::reserve`]): a hard limit's node counter, or a wallet.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldTerm {
    /// The counter's name, the same on every node.
    pub counter: String,
    /// What the reserving node has counted as used on it: its own recorded usage and
    /// what it applied of the other nodes' (holds, its own included, are the
    /// database's to count: a node's requests race each other too).
    pub local: rust_decimal::Decimal,
    /// What this request holds on it.
    pub need: rust_decimal::Decimal,
    /// The most the counter may reach (a limit's amount; a wallet's balance and
    /// overdraft as the node knows them).
    pub amount: rust_decimal::Decimal,
}

/// How far a node's `HoldTerm::local` counts are known to reach: they hold every other
/// node's entry below `followed` and every one of the node's own below `own_from`
/// (both read before the counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Other nodes' entries below this are applied.
    pub followed: u64,
    /// The node's own entries below this were counted before they were appended.
    pub own_from: u64,
}

impl Seen {
    /// What every one of a group of admissions' counts is known to reach: the least of
    /// each bound, so what any of them may not hold is counted for all (more, never
    /// less). An empty group has seen nothing.
    pub fn least<'a>(group: impl IntoIterator<Item = &'a Seen>) -> Seen {
        group
            .into_iter()
            .copied()
            .reduce(|a, b| Seen {
                followed: a.followed.min(b.followed),
                own_from: a.own_from.min(b.own_from),
            })
            .unwrap_or(Seen {
                followed: 0,
                own_from: 0,
            })
    }
}

/// A held request's usage, recorded: what it counts on each counter it held, and the
/// entry that recorded it ([`Store::settle_holds`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SettledHold {
    /// The hold's id.
    pub id: i64,
    /// The entry recording the usage.
    pub entry: u64,
    /// (counter, what the request counts on it).
    pub actual: Vec<(String, rust_decimal::Decimal)>,
}

/// A slice of a counter's room that a node asks to hold for requests it will admit
/// itself ([`Store::reserve_slices`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceAsk {
    /// The slice's id (a hold's id: unique across nodes).
    pub id: i64,
    /// The counter, as for a request; `need` is the most the slice asks for.
    pub term: HoldTerm,
    /// The least worth holding; less is refused.
    pub least: rust_decimal::Decimal,
}

/// What a slice now holds ([`Store::resize_slices`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSize {
    /// The slice's id.
    pub id: i64,
    /// Its counter.
    pub counter: String,
    /// What it holds from now on (zero: it goes).
    pub amount: rust_decimal::Decimal,
    /// `None` while its node may still admit or finish requests under it; once every
    /// request under it ended, the last entry recording their usage (it then counts
    /// as their recorded usage, as a settled hold does).
    pub recorded: Option<u64>,
}

/// What [`Store::take_lease`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTaken {
    /// The caller holds it, and no other node held it since the caller last did
    /// (renewed, or taken again after the caller let it go).
    Kept,
    /// The caller did not hold it and now does: another node may have held it since
    /// the caller last did.
    Taken,
    /// Another node holds it (it is told the caller waits), or the caller held it
    /// long enough while another waited, and let it go.
    Busy,
}

/// A rules barrier as the store holds it ([`Store::barrier`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    /// Its id.
    pub id: i64,
    /// The node changing the rules.
    pub node: String,
    /// `None` while up; once lowered, the log size holding the change (`Some(None)`:
    /// the change was not made).
    pub lowered: Option<Option<u64>>,
}

/// Everything the server keeps beside the ledger.
pub trait Store: Send + Sync + 'static {
    /// Index of the next ledger entry the projections expect (= entries applied).
    fn projected_through(&self) -> Result<u64, StoreError>;
    /// Whether the caller, `node`, is to run the work the ledger wants done once
    /// however many nodes serve it (expiring grants, evaluating service levels,
    /// delivering scheduled reports). Where several nodes share the store, one holds a
    /// lease: each call by the holder renews it for `term`, and another node takes it
    /// once it lapsed. A store with one writer answers true.
    fn lead(&self, _node: &str, _term: std::time::Duration) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Takes or renews the lease `name` for `node` for `term`: one node at a time
    /// holds it. A node that holds it while another waits lets it go once it has held
    /// it for `share` (the waiting node takes it at its next call). A store with one
    /// writer answers `Kept`.
    fn take_lease(
        &self,
        _name: &str,
        _node: &str,
        _term: std::time::Duration,
        _share: std::time::Duration,
    ) -> Result<LeaseTaken, StoreError> {
        Ok(LeaseTaken::Kept)
    }
    /// Lets the lease `name` go if `node` holds it.
    fn drop_lease(&self, _name: &str, _node: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether nodes sharing this store hold gateway requests here too
    /// ([`Store::reserve`]); false where one process is the only writer (its own
    /// engine's holds are then all there is).
    fn shares_holds(&self) -> bool {
        false
    }
    /// Says that `node` is alive and has applied every other node's entry below
    /// `followed`; clears holds every node is past (and those of nodes gone quiet).
    fn heartbeat(&self, _node: &str, _followed: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Says that `node` stops (a clean stop): the others need not wait for it, and its
    /// holds go.
    fn leave(&self, _node: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Holds a request on `terms` in one step ordered with every node's: refused
    /// (answering the index of the term and what is held on it) when, on a term,
    /// `local` plus the holds of requests in flight (every live node's, `node`'s own
    /// included) plus the usage recorded in entries `local` may not hold (`seen`:
    /// other nodes' at or after `seen.followed`, `node`'s own at or after
    /// `seen.own_from`) plus `need` exceeds `amount`. Nothing is held on a
    /// refusal. A hold lapses after `ttl`, or when its node stops heartbeating.
    fn reserve(
        &self,
        node: &str,
        id: i64,
        seen: Seen,
        terms: &[HoldTerm],
        ttl: std::time::Duration,
    ) -> Result<Option<(usize, rust_decimal::Decimal)>, StoreError> {
        let mut answers = self.reserve_many(node, seen, &[], &[(id, terms)], ttl)?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no answer for a hold".into()))
    }
    /// [`Store::reserve`] for several requests of `node` at once (a node's concurrent
    /// requests, grouped as appends are): judged in order, each seeing the holds of
    /// those before it; one answer per request. One call takes each counter's lock
    /// once for all of them. `counted` names holds of `node` whose usage its counts
    /// (each term's `local`, a wallet's `amount`) already include: a request counted by
    /// its node's engines as it ended, its hold not yet settled here; they are not
    /// counted again.
    fn reserve_many(
        &self,
        _node: &str,
        _seen: Seen,
        _counted: &[i64],
        requests: &[(i64, &[HoldTerm])],
        _ttl: std::time::Duration,
    ) -> Result<Vec<Option<(usize, rust_decimal::Decimal)>>, StoreError> {
        Ok(vec![None; requests.len()])
    }
    /// Holds slices of counters' room for `node`, in order, each under the same
    /// accounting as [`Store::reserve_many`] (`counted` as there): a slice gets at most its `term.need` and at
    /// most the room left on its counter divided by twice the number of live nodes
    /// (so one node never takes it all); less than `least` is refused (`None`). The
    /// node admits requests under a slice without asking again, so the slice counts as
    /// a request in flight until [`Store::resize_slices`] says what it recorded. A
    /// store whose node is the only writer grants none.
    fn reserve_slices(
        &self,
        _node: &str,
        _seen: Seen,
        _counted: &[i64],
        asks: &[SliceAsk],
        _ttl: std::time::Duration,
    ) -> Result<Vec<Option<rust_decimal::Decimal>>, StoreError> {
        Ok(vec![None; asks.len()])
    }
    /// Sets what slices hold: trimmed to what their requests still need once they
    /// admit no more, and at last their recorded usage with its last entry.
    fn resize_slices(&self, _sizes: &[SliceSize]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records that held requests' usage is in the ledger: each hold now counts what
    /// the request used, until every node has applied its entry.
    fn settle_holds(&self, _settled: &[SettledHold]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Drops a hold whose request recorded nothing.
    fn release_hold(&self, _id: i64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Raises the rules barrier `id` for `node`, which is about to append a change of
    /// the rules of measuring or pricing: every other live node pauses its rating
    /// ([`Store::pause`]) until the change is in the log and it has applied it, so no
    /// node's usage lands after a change it was not rated under. False when another
    /// node's barrier is up (raised less than 30 s ago and not lowered).
    fn raise_barrier(&self, _node: &str, _id: i64) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// The live nodes other than `node` that have not paused for barrier `id`.
    fn unpaused(&self, _node: &str, _id: i64) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Says that `node` has paused its rating for barrier `id`.
    fn pause(&self, _node: &str, _id: i64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Lowers barrier `id`: the change is in the log below `size` (`None`: the change
    /// was not made).
    fn lower_barrier(&self, _id: i64, _size: Option<u64>) -> Result<(), StoreError> {
        Ok(())
    }
    /// The newest barrier: its id, its node, whether it is still up, and the log size
    /// that holds its change once lowered (`None` there: not made). `None` when no
    /// barrier was ever raised, or it is older than 30 s and was never lowered (its
    /// node died).
    fn barrier(&self) -> Result<Option<Barrier>, StoreError> {
        Ok(None)
    }

    /// Applies ledger entries `start..start + entries.len()` to the projections in one
    /// transaction. `start` must equal [`Store::projected_through`], so every entry is
    /// applied exactly once, even across crashes.
    fn apply(&self, start: u64, entries: &[Entry]) -> Result<(), StoreError>;

    /// [`Store::apply`] of the concatenation of `parts`, in one transaction: entries
    /// held in several places (lent by the writers that appended them, or read back
    /// from the log) are applied without first being copied into one slice.
    fn apply_parts(&self, start: u64, parts: &[&[Entry]]) -> Result<(), StoreError> {
        match parts {
            [] => self.apply(start, &[]),
            [one] => self.apply(start, one),
            _ => self.apply(start, &parts.concat()),
        }
    }

    /// [`Store::apply_parts`] of parts that may carry each ingested event's
    /// [`ciyuan_core::ingest_key_hash`], which the projection then takes instead of
    /// hashing the event's key again.
    fn apply_keyed(&self, start: u64, parts: &[Part<'_>]) -> Result<(), StoreError> {
        let plain: Vec<&[Entry]> = parts.iter().map(|p| p.entries).collect();
        self.apply_parts(start, &plain)
    }

    /// Forgets every projection (accounts, rollups) so they can be rebuilt from the log.
    /// Keys are authentication state, not projections, and are kept.
    fn reset_projections(&self) -> Result<(), StoreError>;

    /// One account node.
    fn account(&self, path: &AccountPath) -> Result<Option<Account>, StoreError>;

    /// At most `limit` nodes of a subtree (the node itself included) whose path sorts
    /// after `after` (all from the start when `None`), in byte order of the path: a
    /// cursor, since a tree may have any number of nodes. `after` is a position, not a
    /// row (it need not exist): a listing reads every node once, and of the nodes
    /// created meanwhile those that sort after where it stands.
    fn accounts_page(
        &self,
        under: &AccountPath,
        after: Option<&AccountPath>,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError>;

    /// Stores a new key with the SHA-256 of its secret.
    fn insert_key(&self, key: &KeyRecord, secret_hash: &[u8; 32]) -> Result<(), StoreError>;

    /// Looks a key up by the SHA-256 of its secret.
    fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError>;

    /// One key by id.
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// At most `limit` keys of a subtree after the position `after` (a key's node and
    /// id; all from the start when `None`), in byte order of the node's path, then of
    /// the id: a cursor, as [`Store::accounts_page`].
    fn keys_page(
        &self,
        under: &AccountPath,
        after: Option<(&AccountPath, &str)>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// Number of keys ever created (revoked included).
    fn key_count(&self) -> Result<u64, StoreError>;

    /// Marks a key revoked; returns the updated record, `None` if there is no such key.
    fn revoke_key(&self, key_id: &str, at: Timestamp) -> Result<Option<KeyRecord>, StoreError>;

    /// Stores a new console session under the SHA-256 of its id.
    fn insert_session(&self, id_hash: &[u8; 32], session: &SessionRecord)
    -> Result<(), StoreError>;

    /// A session by the SHA-256 of its id, revoked and expired ones included (the
    /// caller judges them).
    fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError>;

    /// Marks a session signed out at `at` (seconds since the epoch); false when there
    /// is no such session or it was signed out already.
    fn revoke_session(&self, id_hash: &[u8; 32], at: i64) -> Result<bool, StoreError>;

    /// Deletes the sessions that expired before `before` (seconds since the epoch);
    /// returns how many.
    fn purge_sessions(&self, before: i64) -> Result<u64, StoreError>;

    /// Calls `f(hash, entry)` for every ingested event the projections have indexed, in
    /// entry order, and returns the projection watermark of the same snapshot: the index
    /// holds exactly the ingested events of entries before it. `hash` is
    /// [`ciyuan_core::ingest_key_hash`] of the event's `(source, id)`; the ingest API
    /// keeps the index in memory and checks a match against the entry itself, so the
    /// store only appends to it (in entry order, whatever the ids) and reads it whole.
    fn ingest_index(&self, f: &mut dyn FnMut(u64, u64)) -> Result<u64, StoreError>;

    /// The limits in force on every node (projected from `budget.set` and
    /// `budget.cleared` entries), by node and name.
    fn budgets(&self) -> Result<Vec<(AccountPath, ciyuan_core::BudgetSet)>, StoreError>;

    /// The model access rules of every node that has some.
    fn access_rules(&self) -> Result<Vec<(AccountPath, ciyuan_core::AccessSet)>, StoreError>;

    /// Every token definition version declared in the ledger (`definition.set`), with
    /// the entry that declared it, by service and version.
    fn definitions(&self) -> Result<Vec<(u64, ciyuan_core::TokenDefinition)>, StoreError>;

    /// Every price book version recorded (`price.book`), with its entry, by name and
    /// version.
    fn price_books(&self) -> Result<Vec<(u64, ciyuan_core::PriceBook)>, StoreError>;

    /// The price contract of every node that has one, with its entry, in path order.
    fn contracts(&self) -> Result<Vec<(AccountPath, u64, ciyuan_core::PriceContract)>, StoreError>;

    /// The wallet settings of every node and currency that has some.
    fn wallet_settings(&self) -> Result<Vec<(AccountPath, ciyuan_core::WalletSet)>, StoreError>;

    /// Wallet postings in entry order, from entry `after` (exclusive; `None` from the
    /// start), at most `limit`; only those moving a wallet of `node` when given.
    fn postings(
        &self,
        node: Option<&AccountPath>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Posting>>, StoreError>;

    /// Hourly cost rollup rows of a subtree (rated usage), summed over equal keys.
    fn cost_hours(&self, filter: &HourFilter) -> Result<Vec<CostRow>, StoreError>;

    /// The statements issued for a node (`statement.closed`), by period; the first
    /// close of a period is kept.
    fn statements(
        &self,
        node: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::StatementClosed>>, StoreError>;

    /// The service levels evaluated on the nodes of a subtree
    /// (`service_level.evaluated`), by node, period and level; the first evaluation of
    /// a node's level and period is kept.
    fn service_levels(
        &self,
        under: &AccountPath,
    ) -> Result<Vec<Recorded<ciyuan_core::ServiceLevelEvaluated>>, StoreError>;

    /// The first and last index of the entries with a gateway quality record whose
    /// time falls in the UTC hours `from_hour..to_hour` (seconds since the epoch);
    /// `None` when there are none.
    fn quality_range(&self, from_hour: i64, to_hour: i64)
    -> Result<Option<(u64, u64)>, StoreError>;

    /// Hourly billing lines of a subtree, in (hour, account) order.
    fn cost_lines(&self, filter: &HourFilter) -> Result<Vec<LineRow>, StoreError>;

    /// At most `limit` hourly billing lines of a subtree after `after`, in the order
    /// of their key (account, hour, service, model, adjustment, key, unit price,
    /// currency, book, version): a cursor for exports of any size in bounded memory.
    fn cost_lines_page(
        &self,
        filter: &HourFilter,
        after: Option<&LineRow>,
        limit: usize,
    ) -> Result<Vec<LineRow>, StoreError>;

    /// Hands at most `limit` hourly billing lines of a subtree after `after` to `visit`,
    /// in the order of [`Store::cost_lines_page`]: the same lines, borrowed rather than
    /// collected, so an export copies nothing it does not write. `visit` returns
    /// [`std::ops::ControlFlow::Break`] to stop early.
    ///
    /// The default reads a page with [`Store::cost_lines_page`]; a backend overrides it
    /// to read its rows in place.
    fn each_cost_line(
        &self,
        filter: &HourFilter,
        after: Option<&LineRow>,
        limit: usize,
        visit: &mut dyn FnMut(&LineRef<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<LinesVisited, StoreError> {
        let page = self.cost_lines_page(filter, after, limit)?;
        let mut done = LinesVisited::default();
        for r in &page {
            let line = LineRef {
                hour: r.hour,
                account: &r.account,
                adjustment: r.adjustment,
                service: &r.service,
                model: &r.model,
                key: &r.key,
                unit_price: r.unit_price,
                currency: r.currency,
                book: &r.book,
                version: r.version,
                quantity: line_decimal(r.quantity, "a quantity")?,
                list: line_decimal(r.list, "a list cost")?,
                contracted: line_decimal(r.contracted, "a contracted cost")?,
                billed: line_decimal(r.billed, "a billed cost")?,
            };
            done.count += 1;
            if visit(&line).is_break() {
                done.stopped = true;
                done.last = Some(r.clone());
                return Ok(done);
            }
        }
        done.last = page.into_iter().last();
        Ok(done)
    }

    /// Every tier counter with the units counted on it (few: one per billing node,
    /// tiered rule and period).
    fn tier_units(&self) -> Result<Vec<TierUnits>, StoreError>;

    /// The gateway request whose answer its provider keeps under `id` (the Responses
    /// API's `resp_...`): its entry, time and account, and the upstream's name as the
    /// body. `None` if no projected entry names it.
    fn response(&self, id: &str) -> Result<Option<Recorded<String>>, StoreError>;

    /// Gateway usage whose recount disagreed with the provider beyond tolerance, in a
    /// subtree, newest first.
    fn flagged(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Usage>>, StoreError>;

    /// Incidents (thresholds reached, hard limits exceeded) in a subtree, newest first.
    fn incidents(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<ciyuan_core::Incident>>, StoreError>;

    /// Hourly rollup rows of a subtree, summed over equal keys.
    fn usage_hours(&self, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError>;

    /// Hourly token rows of a subtree's keyed rollup `which` (see [`keyed`]), their
    /// `service` as stored, summed over equal keys; with `whole`, summed over the whole
    /// range too (one row per node, stored service, model and token key, stamped with
    /// the first hour it has usage in): a question that is not bucketed reads those.
    fn keyed_usage_hours(
        &self,
        which: keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<HourRow>, StoreError>;

    /// Hourly cost rows of a subtree's keyed rollup, as [`Store::keyed_usage_hours`].
    fn keyed_cost_hours(
        &self,
        which: keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<CostRow>, StoreError>;

    /// Hourly token rows of a subtree's tagged usage, each with its tag set (see
    /// [`tags`]), as [`Store::keyed_usage_hours`].
    fn tag_usage_hours(
        &self,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<tags::TagHourRow>, StoreError> {
        tags::split_usage(self.keyed_usage_hours(keyed::Keyed::Tags, filter, whole)?)
    }

    /// Hourly cost rows of a subtree's tagged usage, as [`Store::tag_usage_hours`].
    fn tag_cost_hours(
        &self,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<tags::TagCostRow>, StoreError> {
        tags::split_cost(self.keyed_cost_hours(keyed::Keyed::Tags, filter, whole)?)
    }

    /// What each API key and session consumed in a subtree over the filter's hours
    /// (see [`subjects`]), summed over the range: one row per node, subject, service,
    /// model and token key.
    fn subject_usage(
        &self,
        filter: &HourFilter,
    ) -> Result<Vec<subjects::SubjectHourRow>, StoreError> {
        subjects::split_usage(self.keyed_usage_hours(keyed::Keyed::Subjects, filter, true)?)
    }

    /// The rated amounts of [`Store::subject_usage`].
    fn subject_cost(
        &self,
        filter: &HourFilter,
    ) -> Result<Vec<subjects::SubjectCostRow>, StoreError> {
        subjects::split_cost(self.keyed_cost_hours(keyed::Keyed::Subjects, filter, true)?)
    }

    /// Token rows of the subtrees `filter` names (see [`tree::TreeFilter`]), each row
    /// named for its subtree's node and summing to that whole subtree: the node's own
    /// hourly rows and the rollups of what lies below it, by hour (or, with `days`,
    /// whole UTC days stamped at their start). With [`tree::Subtrees::ChildrenOf`],
    /// also the node's own hourly rows (not its children's), under its own name.
    fn usage_tree(&self, filter: &tree::TreeFilter) -> Result<Vec<HourRow>, StoreError>;

    /// Cost rows of the subtree rollups `filter` names, as [`Store::usage_tree`].
    fn cost_tree(&self, filter: &tree::TreeFilter) -> Result<Vec<CostRow>, StoreError>;

    /// Every scheduled report's progress: per report name, the delivery of the latest
    /// period its schedule delivered (`report.delivered` entries with `manual` false;
    /// deliveries by hand never move it), by name.
    fn report_progress(&self) -> Result<Vec<Recorded<ciyuan_core::ReportDelivered>>, StoreError>;
}

/// A subtree's rows after a cursor, as index ranges: a node's path sorts before its
/// descendants', which are one range (`[p/, p0)`, as `'0'` is the byte after `'/'`),
/// so a page is the node's own rows, then that range from where the cursor stands.
/// Written as one condition (`path = p OR path in range`), a database reads the whole
/// subtree and sorts it for every page; as two seeks it reads the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubtreeSeek {
    /// Which of the node's own rows the page starts with.
    pub own: OwnRows,
    /// Where the descendants' range starts.
    pub from: RangeStart,
    /// Where it ends (exclusive); `None` under the root, which holds every path.
    pub to: Option<String>,
}

/// The node's own rows in a [`SubtreeSeek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnRows {
    /// All of them: no cursor, or one before the node.
    All,
    /// Those after the cursor, which stands on the node (for accounts: none).
    AfterCursor,
    /// None: the cursor is past the node.
    Skip,
}

/// The start of the descendants' range in a [`SubtreeSeek`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeStart {
    /// Paths from this one, included.
    From(String),
    /// Paths after this one.
    After(String),
    /// Rows after the cursor, which stands in the range.
    Cursor,
}

/// Where a page of `under`'s rows starts when the last page ended on a row of path `at`
/// (`None`: the first page). A cursor need not name a row, nor lie in the subtree.
pub fn subtree_seek(under: &AccountPath, at: Option<&str>) -> SubtreeSeek {
    let u = under.as_str();
    let (start, to) = if under.is_root() {
        (RangeStart::After(String::new()), None)
    } else {
        (RangeStart::From(format!("{u}/")), Some(format!("{u}0")))
    };
    let Some(a) = at else {
        return SubtreeSeek {
            own: OwnRows::All,
            from: start,
            to,
        };
    };
    let in_range = match &start {
        RangeStart::From(lo) => a >= lo.as_str(),
        RangeStart::After(lo) => a > lo.as_str(),
        RangeStart::Cursor => false,
    };
    let own = match a.cmp(u) {
        std::cmp::Ordering::Less => OwnRows::All,
        std::cmp::Ordering::Equal => OwnRows::AfterCursor,
        std::cmp::Ordering::Greater => OwnRows::Skip,
    };
    SubtreeSeek {
        own,
        from: if in_range { RangeStart::Cursor } else { start },
        to,
    }
}

/// Nodes read per page by [`each_account`].
const ACCOUNT_PAGE: usize = 1000;

/// Calls `f` with every node of a subtree (the node itself included), in path order,
/// read a page at a time ([`Store::accounts_page`]): memory holds one page, and what
/// `f` keeps.
pub fn each_account(
    store: &dyn Store,
    under: &AccountPath,
    f: &mut dyn FnMut(Account),
) -> Result<(), StoreError> {
    let mut after: Option<AccountPath> = None;
    loop {
        let page = store.accounts_page(under, after.as_ref(), ACCOUNT_PAGE)?;
        let full = page.len() == ACCOUNT_PAGE;
        after = page.last().map(|a| a.path.clone());
        page.into_iter().for_each(&mut *f);
        if !full {
            return Ok(());
        }
    }
}

/// The time zone a node's periods are computed in: its own, else its nearest ancestor's,
/// else UTC.
pub fn effective_time_zone(store: &dyn Store, path: &AccountPath) -> Result<TimeZone, StoreError> {
    let mut node = Some(path.clone());
    while let Some(p) = node {
        if let Some(a) = store.account(&p)?
            && let Some(name) = &a.info.time_zone
        {
            return TimeZone::get(name)
                .map_err(|e| StoreError::Corrupt(format!("time zone {name:?} of {p}: {e}")));
        }
        node = p.parent();
    }
    Ok(TimeZone::UTC)
}

#[cfg(feature = "conformance")]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    fn seek(under: &str, at: Option<&str>) -> SubtreeSeek {
        let under = AccountPath::parse(under).map_err(|e| e.to_string());
        subtree_seek(&under.unwrap_or_else(|e| unreachable!("{e}")), at)
    }

    #[test]
    fn a_group_has_seen_the_least_of_each_bound() {
        let s = |followed, own_from| Seen { followed, own_from };
        assert_eq!(Seen::least([&s(7, 3), &s(5, 9), &s(6, 4)]), s(5, 3));
        assert_eq!(Seen::least([&s(7, 3)]), s(7, 3));
        assert_eq!(Seen::least(std::iter::empty()), s(0, 0));
    }

    #[test]
    fn a_page_starts_where_the_cursor_stands() {
        let range = |own, from| SubtreeSeek {
            own,
            from,
            to: Some("acme0".into()),
        };
        let start = || RangeStart::From("acme/".into());
        assert_eq!(seek("acme", None), range(OwnRows::All, start()));
        assert_eq!(seek("acme", Some("a")), range(OwnRows::All, start()));
        assert_eq!(
            seek("acme", Some("acme")),
            range(OwnRows::AfterCursor, start())
        );
        // Between the node and its descendants: a sibling such as acme-x.
        assert_eq!(seek("acme", Some("acme-x")), range(OwnRows::Skip, start()));
        assert_eq!(
            seek("acme", Some("acme/")),
            range(OwnRows::Skip, RangeStart::Cursor)
        );
        assert_eq!(
            seek("acme", Some("acme/a")),
            range(OwnRows::Skip, RangeStart::Cursor)
        );
        assert_eq!(
            seek("acme", Some("zz")),
            range(OwnRows::Skip, RangeStart::Cursor)
        );
        let root = |own, from| SubtreeSeek {
            own,
            from,
            to: None,
        };
        assert_eq!(
            seek("/", None),
            root(OwnRows::All, RangeStart::After(String::new()))
        );
        assert_eq!(
            seek("/", Some("")),
            root(OwnRows::AfterCursor, RangeStart::After(String::new()))
        );
        assert_eq!(
            seek("/", Some("a")),
            root(OwnRows::Skip, RangeStart::Cursor)
        );
    }
}
