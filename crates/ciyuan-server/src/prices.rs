//! Price books and contracts (ledger entries), the raters built from them, rating of
//! usage entries as they are appended, and the prices and contracts API.
//!
//! Which book prices an entry: the contract of the entry's node or its nearest
//! ancestor that has one names the book (and its overrides, discount or markup
//! apply); with no contract on the path, the book named [`LIST_BOOK`]. The book's
//! version in force at the entry's time prices it. With no book recorded at all,
//! pricing is off and entries carry no rating. An entry no rule prices is rated zero,
//! marked `unpriced`, and raises a `price.unpriced` incident, never silently.
//!
//! A price book never changes the past, as a definition does not: a new version takes
//! effect from the moment it is recorded (or later), and entries keep the rating
//! they were appended with.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, PathParam, Query};
use crate::{App, parse_path};
use axum::body::Bytes;
use axum::extract::State;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Entry, EntryBody, Incident, PriceBook, PriceContract, Rating, RatingBasis, Scope,
    TokenMap, Usage,
};
use ciyuan_price::{RateInput, Rater};
use ciyuan_store::Store;
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use std::sync::{Arc, Mutex, RwLock};

/// The book that prices usage of nodes without a contract on their path.
pub const LIST_BOOK: &str = "list";

/// Largest price file accepted by `POST /api/v1/prices` (LiteLLM's table is ~3 MB).
pub const MAX_PRICE_FILE_BYTES: usize = 16 << 20;

/// What the request path reads: every book version and contract, and the raters
/// built from them (one per book version and contract node, built on first use).
#[derive(Default)]
struct State_ {
    /// Versions of each book, ascending by version (and so by `effective_from`).
    books: FxHashMap<String, Vec<Arc<PriceBook>>>,
    /// Contracts by node path.
    contracts: FxHashMap<String, (AccountPath, Arc<PriceContract>)>,
    /// Raters by (contract, book version), each named by the address of the `Arc`
    /// this state holds for it (stable and unique while the state lives, and the
    /// cache lives and dies with it): no allocation to look one up.
    raters: RwLock<FxHashMap<(usize, usize), Arc<Rater>>>,
    /// (node, model, service, book@version) already reported unpriced by this
    /// process: one incident each, not one per request.
    unpriced: Mutex<rustc_hash::FxHashSet<(String, String, String, String)>>,
    /// Whether a rule of any book or contract has tiers.
    tiered: bool,
}

/// Whether a rule of `books` or `contracts` has graduated or volume tiers.
fn any_tiers(
    books: &FxHashMap<String, Vec<Arc<PriceBook>>>,
    contracts: &FxHashMap<String, (AccountPath, Arc<PriceContract>)>,
) -> bool {
    books
        .values()
        .flatten()
        .flat_map(|b| &b.rules)
        .chain(contracts.values().flat_map(|(_, c)| &c.overrides))
        .any(|r| r.tiers.is_some())
}

/// The prices in force, swapped whole when a book or contract is recorded.
#[derive(Default)]
pub(crate) struct Pricing(RwLock<Arc<State_>>);

impl Pricing {
    /// Loads every book and contract from the store's projections.
    pub(crate) fn load(store: &dyn Store) -> Result<Pricing, ApiError> {
        let mut state = State_::default();
        for (_, book) in store.price_books()? {
            state
                .books
                .entry(book.name.clone())
                .or_default()
                .push(Arc::new(book));
        }
        for versions in state.books.values_mut() {
            versions.sort_by_key(|b| b.version);
        }
        for (node, _, contract) in store.contracts()? {
            state
                .contracts
                .insert(node.as_str().to_string(), (node, Arc::new(contract)));
        }
        state.tiered = any_tiers(&state.books, &state.contracts);
        Ok(Pricing(RwLock::new(Arc::new(state))))
    }

    /// Applies recorded `price.book` and `price.contract` entries, as the store's
    /// projection does (a repeated `name@version` keeps the first; a contract is
    /// replaced whole). Books and contracts not touched are shared with the previous
    /// state, and so are the raters built from them: a contract set for one node does
    /// not make every book be read and compiled again.
    pub(crate) fn apply(&self, entries: &[Entry]) {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        let old = current.clone();
        let mut books = old.books.clone();
        let mut contracts = old.contracts.clone();
        for entry in entries {
            match &entry.body {
                EntryBody::PriceBook(b) => {
                    let versions = books.entry(b.name.clone()).or_default();
                    if !versions.iter().any(|v| v.version == b.version) {
                        versions.push(Arc::new(b.clone()));
                        versions.sort_by_key(|v| v.version);
                    }
                }
                EntryBody::PriceContract(c) => {
                    contracts.insert(
                        entry.account.as_str().to_string(),
                        (entry.account.clone(), Arc::new(c.clone())),
                    );
                }
                _ => {}
            }
        }
        let live: rustc_hash::FxHashSet<usize> = books
            .values()
            .flatten()
            .map(|b| Arc::as_ptr(b) as usize)
            .chain(contracts.values().map(|(_, c)| Arc::as_ptr(c) as usize))
            .collect();
        let raters: FxHashMap<(usize, usize), Arc<Rater>> = old
            .raters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((c, b), _)| (*c == 0 || live.contains(c)) && live.contains(b))
            .map(|(k, r)| (*k, r.clone()))
            .collect();
        let unpriced = old
            .unpriced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *current = Arc::new(State_ {
            tiered: any_tiers(&books, &contracts),
            books,
            contracts,
            raters: RwLock::new(raters),
            unpriced: Mutex::new(unpriced),
        });
    }

    fn state(&self) -> Arc<State_> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The rater for usage of `node` at `at`, or why there is none. `Ok(None)`:
    /// pricing is off.
    pub(crate) fn rater(
        &self,
        node: &AccountPath,
        at: Timestamp,
    ) -> Result<Option<Arc<Rater>>, String> {
        self.state().rater(node, at)
    }

    /// The contract set on `node` itself (not inherited), if any.
    pub(crate) fn contract_at(&self, node: &AccountPath) -> Option<Arc<PriceContract>> {
        self.state()
            .contracts
            .get(node.as_str())
            .map(|(_, c)| c.clone())
    }

    /// Version `version` of book `name`, if recorded.
    pub(crate) fn book_version(&self, name: &str, version: u32) -> Option<Arc<PriceBook>> {
        self.state()
            .books
            .get(name)
            .and_then(|v| v.iter().find(|b| b.version == version))
            .cloned()
    }

    /// The newest recorded version of book `name`.
    pub(crate) fn latest(&self, name: &str) -> Option<Arc<PriceBook>> {
        self.state().books.get(name).and_then(|v| v.last()).cloned()
    }

    /// The prices in force now, for rating a batch with one look.
    pub(crate) fn snapshot(&self) -> Prices {
        Prices(self.state())
    }
}

impl State_ {
    /// The nearest contract on the path of `node` (itself first).
    fn contract(&self, node: &AccountPath) -> Option<&(AccountPath, Arc<PriceContract>)> {
        if self.contracts.is_empty() {
            return None;
        }
        // Walks the path's prefixes as slices: no allocation per lookup.
        let mut p = node.as_str();
        loop {
            if let Some(c) = self.contracts.get(p) {
                return Some(c);
            }
            if p == "/" || p.is_empty() {
                return None;
            }
            p = match p.rfind('/') {
                Some(i) => &p[..i],
                None => "/",
            };
        }
    }

    fn rater(&self, node: &AccountPath, at: Timestamp) -> Result<Option<Arc<Rater>>, String> {
        self.rater_span(node, at).map(|r| r.map(|(r, _)| r))
    }

    /// [`State_::rater`], with the times its book version is in force:
    /// `effective_from..` the next version's (`None`: no later version).
    #[allow(clippy::type_complexity)]
    fn rater_span(
        &self,
        node: &AccountPath,
        at: Timestamp,
    ) -> Result<Option<(Arc<Rater>, (Timestamp, Option<Timestamp>))>, String> {
        if self.books.is_empty() {
            return Ok(None);
        }
        let contract = self.contract(node);
        let name = contract.map_or(LIST_BOOK, |(_, c)| c.book.as_str());
        let versions = self.books.get(name).ok_or_else(|| match contract {
            Some((at_node, _)) => {
                format!("the contract of {at_node} names book {name:?}, which is not recorded")
            }
            None => format!("no contract on the path of {node} and no book named {LIST_BOOK:?}"),
        })?;
        let i = versions.partition_point(|b| b.effective_from <= at);
        let Some(book) = i.checked_sub(1).map(|i| &versions[i]) else {
            return Err(format!("book {name:?} has no version in force at {at}"));
        };
        let span = (
            book.effective_from,
            versions.get(i).map(|b| b.effective_from),
        );
        let key = (
            contract.map_or(0, |(_, c)| Arc::as_ptr(c) as usize),
            Arc::as_ptr(book) as usize,
        );
        // Read-mostly: every entry looks its rater up; one is built per book version
        // and contract node.
        if let Some(r) = self
            .raters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(Some((r.clone(), span)));
        }
        let mut raters = self.raters.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = raters.get(&key) {
            return Ok(Some((r.clone(), span)));
        }
        let rater = Rater::new(book, contract.map(|(n, c)| (n, c.as_ref())))
            .map_err(|e| format!("book {}@{}: {e}", book.name, book.version))?;
        let rater = Arc::new(rater);
        raters.insert(key, rater.clone());
        Ok(Some((rater, span)))
    }
}

/// The rater last looked up in one batch, and for which contract and times it holds:
/// a batch looks its rater up once per run of entries under one contract (or none)
/// and one book version, not once per entry (a hash lookup, a lock and two atomic
/// counts each).
#[derive(Default)]
pub(crate) struct RaterMemo {
    /// The contract (its address in the snapshot, 0 for none), the span of times its
    /// book version is in force, and the rater.
    last: Option<(usize, Timestamp, Option<Timestamp>, Arc<Rater>)>,
}

/// The prices in force at one moment (see [`Pricing::snapshot`]).
pub(crate) struct Prices(Arc<State_>);

impl Prices {
    /// Whether any book or contract has graduated or volume tiers (only then are
    /// entries placed on tier counters).
    pub(crate) fn tiered(&self) -> bool {
        self.0.tiered
    }

    /// The rater of usage of `node` at `at`, when one applies.
    pub(crate) fn rater_for(&self, node: &AccountPath, at: Timestamp) -> Option<Arc<Rater>> {
        self.0.rater(node, at).ok().flatten()
    }

    /// [`State_::rater`] through `memo`, which must only ever be used with this
    /// snapshot (it names contracts by their address in it).
    fn rater_memo<'m>(
        &self,
        memo: &'m mut RaterMemo,
        node: &AccountPath,
        at: Timestamp,
    ) -> Result<Option<&'m Arc<Rater>>, String> {
        if self.0.books.is_empty() {
            return Ok(None);
        }
        // Which rater applies depends on the nearest contract and, through the book
        // version in force, on the time; nothing else of the node.
        let contract = self
            .0
            .contract(node)
            .map_or(0, |(_, c)| Arc::as_ptr(c) as usize);
        let held = memo.last.as_ref().is_some_and(|(c, from, until, _)| {
            *c == contract && *from <= at && until.is_none_or(|u| at < u)
        });
        if !held {
            match self.0.rater_span(node, at)? {
                None => return Ok(None),
                Some((r, (from, until))) => memo.last = Some((contract, from, until, r)),
            }
        }
        Ok(memo.last.as_ref().map(|(_, _, _, r)| r))
    }
}

/// What a rater reads of `usage` at `at`, priced on `tokens` (see [`priced_tokens`]).
pub(crate) fn usage_input<'a>(
    usage: &'a Usage,
    tokens: &'a TokenMap,
    at: Timestamp,
    period_to_date: Decimal,
) -> RateInput<'a> {
    RateInput {
        model: usage.model.as_deref(),
        service: &usage.service,
        tier: usage.tier.unwrap_or_default(),
        tokens,
        measures: &usage.measures,
        at,
        period_to_date,
    }
}

/// The counts a rating with `basis` prices: the entry's own, or its recount combined
/// with them (see [`Basis`]).
pub(crate) fn priced_tokens(
    usage: &Usage,
    basis: Option<RatingBasis>,
) -> std::borrow::Cow<'_, TokenMap> {
    match (&usage.recount, basis) {
        (Some(r), Some(b @ (RatingBasis::Recount | RatingBasis::Greater))) => {
            std::borrow::Cow::Owned(recounted(&usage.tokens, r, b == RatingBasis::Greater))
        }
        _ => std::borrow::Cow::Borrowed(&usage.tokens),
    }
}

/// Which count is priced for a gateway provider (`rate_basis` in its settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The provider's count (the default: it is what the provider bills).
    #[default]
    Provider,
    /// Ciyuan's recount.
    Recount,
    /// The greater of the two, per key.
    Greater,
}

impl Basis {
    /// As a rating records it.
    pub fn recorded(self) -> RatingBasis {
        match self {
            Basis::Provider => RatingBasis::Provider,
            Basis::Recount => RatingBasis::Recount,
            Basis::Greater => RatingBasis::Greater,
        }
    }
}

/// What rating an entry came to.
pub(crate) enum Rated {
    /// Pricing is off: no book recorded.
    Off,
    /// Priced (possibly `unpriced`, amount zero); boxed as the entry holds it.
    Priced(Box<Rating>),
    /// No book applies (named in the incident); the entry carries no rating.
    NoBook(String),
}

impl App {
    /// Rates `usage` of `node` at `at`: on its own counts, or (`basis` given) on the
    /// count `basis` names, recording it (the recount covers text input and output;
    /// other keys are the provider's). `period_to_date` places tiered units (see
    /// [`RateInput::period_to_date`]).
    pub(crate) fn rate_usage(
        &self,
        prices: &Prices,
        node: &AccountPath,
        at: Timestamp,
        usage: &Usage,
        basis: Option<Basis>,
        period_to_date: Decimal,
    ) -> Rated {
        self.rate_usage_memo(
            prices,
            &mut RaterMemo::default(),
            node,
            at,
            usage,
            basis,
            period_to_date,
        )
    }

    /// [`App::rate_usage`], the rater looked up through `memo` (of `prices`).
    #[allow(clippy::too_many_arguments)]
    fn rate_usage_memo(
        &self,
        prices: &Prices,
        memo: &mut RaterMemo,
        node: &AccountPath,
        at: Timestamp,
        usage: &Usage,
        basis: Option<Basis>,
        period_to_date: Decimal,
    ) -> Rated {
        let rater = match prices.rater_memo(memo, node, at) {
            Ok(None) => return Rated::Off,
            Ok(Some(r)) => r,
            Err(why) => return Rated::NoBook(why),
        };
        let tokens = priced_tokens(usage, basis.map(Basis::recorded));
        let input = usage_input(usage, &tokens, at, period_to_date);
        match rater.rate_boxed(&input) {
            Ok(mut r) => {
                r.basis = basis.map(Basis::recorded);
                Rated::Priced(r)
            }
            Err(e) => Rated::NoBook(e.to_string()),
        }
    }

    /// Rates usage entries in place on their own counts, as one batch (their rater is
    /// looked up once per run of one node's entries), and returns the incidents to
    /// raise for those unpriced or that no book applies to.
    pub(crate) fn rate_entries<'e>(
        &self,
        prices: &Prices,
        entries: impl Iterator<Item = &'e mut Entry>,
    ) -> Vec<Entry> {
        let mut memo = RaterMemo::default();
        entries
            .filter_map(|e| self.rate_in_place(prices, &mut memo, e, None))
            .collect()
    }

    /// Rates a usage entry in place: on its own counts, or (`basis` given) on the
    /// count `basis` names and recording it (the recount covers text input and output;
    /// other keys are the provider's). Returns the incident to raise when it is
    /// unpriced or no book applies. Corrections (negative counts) are not rated.
    fn rate_in_place(
        &self,
        prices: &Prices,
        memo: &mut RaterMemo,
        entry: &mut Entry,
        basis: Option<Basis>,
    ) -> Option<Entry> {
        let EntryBody::Usage(u) = &mut entry.body else {
            return None;
        };
        if u.tokens.iter().any(|t| t.count < 0) {
            return None;
        }
        match self.rate_usage_memo(
            prices,
            memo,
            &entry.account,
            entry.ts,
            u,
            basis,
            Decimal::ZERO,
        ) {
            Rated::Off => None,
            Rated::Priced(r) => {
                let incident = (r.unpriced || !r.missing.is_empty())
                    .then(|| self.unpriced_incident(&entry.account, u, &r))
                    .flatten();
                u.rating = Some(r);
                incident
            }
            Rated::NoBook(why) => self.no_book_incident(&entry.account, u, &why),
        }
    }

    /// The most a request may cost: its prompt and maximum output (as output or as
    /// reasoning, whichever is dearer) at the prices that will rate it; `None` when
    /// pricing is off or nothing prices it (it is then held as nothing, as rating
    /// counts it as nothing).
    pub(crate) fn max_cost(
        &self,
        node: &AccountPath,
        input: &RateInput<'_>,
        max_output: i64,
    ) -> Option<ciyuan_core::Money> {
        let rater = self.pricing.rater(node, input.at).ok()??;
        let r = rater.max_cost(input, max_output).ok()??;
        Some(ciyuan_core::Money {
            amount: r.amount,
            currency: r.currency,
        })
    }

    /// Rates a gateway usage entry in place on the count the provider's `basis`
    /// names, recording the basis.
    ///
    /// A tiered entry is also placed on its tier counter; the counters' lock comes
    /// back with it, to be held until the entry holds its place in the ledger.
    pub(crate) async fn rate_gateway_entry(
        self: &Arc<Self>,
        entry: &mut Entry,
        basis: Basis,
    ) -> (Option<Entry>, Option<crate::tiers::TiersGuard>) {
        let prices = self.pricing.snapshot();
        let incident = self.rate_in_place(&prices, &mut RaterMemo::default(), entry, Some(basis));
        if !prices.tiered() {
            return (incident, None);
        }
        let mut counters = match self.lock_tiers().await {
            Ok(c) => c,
            Err(e) => {
                // The call is over and its usage must be recorded: recorded rated from
                // the first band, which `audit verify` reports.
                tracing::error!(account = %entry.account, detail = %e.detail, "tiered usage not placed");
                return (incident, None);
            }
        };
        match self.place_tiers(&prices, &mut counters, entry) {
            Ok(true) => (incident, Some(counters)),
            Ok(false) => (incident, None),
            Err(e) => {
                // The call is over and its usage must be recorded: recorded rated from
                // the first band, which `audit verify` reports.
                tracing::error!(account = %entry.account, detail = %e.detail, "tiered usage not placed");
                (incident, None)
            }
        }
    }

    /// Appends price incidents (best effort: the usage they are about is recorded
    /// already, and says `unpriced` itself).
    pub(crate) async fn raise_price_incidents(self: &Arc<Self>, incidents: Vec<Entry>) {
        if incidents.is_empty() {
            return;
        }
        for i in &incidents {
            if let EntryBody::Incident(inc) = &i.body {
                tracing::warn!(account = %i.account, subject = ?inc.subject, "usage not priced");
            }
        }
        if let Err(e) = self.append(&incidents).await {
            tracing::error!(detail = %e.detail, "price incidents not recorded");
        }
    }

    /// A `price.unpriced` incident for `usage`, once per (node, model, service, book
    /// version) per process.
    pub(crate) fn unpriced_incident(
        &self,
        node: &AccountPath,
        usage: &Usage,
        r: &Rating,
    ) -> Option<Entry> {
        let book = format!("{}@{}", r.book, r.version);
        let missing: Vec<String> = r.missing.iter().map(|k| k.to_string()).collect();
        let what = if r.unpriced {
            format!("no rule of {book} prices it")
        } else {
            format!("{book} has no price for {}", missing.join(", "))
        };
        self.price_incident(node, usage, book, what)
    }

    fn no_book_incident(&self, node: &AccountPath, usage: &Usage, why: &str) -> Option<Entry> {
        self.price_incident(node, usage, String::new(), why.to_string())
    }

    fn price_incident(
        &self,
        node: &AccountPath,
        usage: &Usage,
        book: String,
        what: String,
    ) -> Option<Entry> {
        let state = self.pricing.state();
        let key = (
            node.as_str().to_string(),
            usage.model.clone().unwrap_or_default(),
            usage.service.clone(),
            book.clone(),
        );
        if !state
            .unpriced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
        {
            return None;
        }
        let subject = match &usage.model {
            Some(m) => format!("{} {m}: {what}", usage.service),
            None => format!("{}: {what}", usage.service),
        };
        Some(Entry::new(
            Timestamp::now(),
            node.clone(),
            EntryBody::Incident(Incident {
                kind: "price.unpriced".into(),
                limit: if book.is_empty() {
                    LIST_BOOK.into()
                } else {
                    book
                },
                mode: ciyuan_core::BudgetMode::Soft,
                window_start: None,
                threshold: None,
                used: 0,
                amount: 0,
                subject: Some(subject),
                cause: None,
                cost: None,
            }),
        ))
    }
}

/// The provider's counts with the recount's text input (fresh input: the recount's
/// prompt less the provider's cached and cache-write input) and text output put in,
/// or the greater of each when `greater`.
fn recounted(provider: &TokenMap, r: &ciyuan_core::Recount, greater: bool) -> TokenMap {
    use ciyuan_core::{Direction, Modality};
    let cached: i64 = provider
        .iter()
        .filter(|t| {
            t.modality == Modality::Text
                && matches!(
                    t.direction,
                    Direction::CachedInput | Direction::CacheWrite | Direction::CacheWrite1h
                )
        })
        .map(|t| t.count)
        .sum();
    let bound = |n: u64| {
        i64::try_from(n)
            .unwrap_or(i64::MAX)
            .min(ciyuan_core::MAX_TOKENS_PER_KEY)
    };
    let fresh_input = (bound(r.input) - cached).max(0);
    let output = bound(r.output);
    let mut out = TokenMap::new();
    for t in provider.iter() {
        let ours = match (t.modality, t.direction) {
            (Modality::Text, Direction::Input) => Some(fresh_input),
            (Modality::Text, Direction::Output) => Some(output),
            _ => None,
        };
        let n = match ours {
            Some(o) if greater => o.max(t.count),
            Some(o) => o,
            None => t.count,
        };
        if n != 0 {
            // Counts within MAX_TOKENS_PER_KEY each: a fresh map cannot overflow.
            let added = out.add(t.modality, t.direction, n);
            assert!(added.is_some(), "a bounded count fits a fresh token map");
        }
    }
    for (d, o) in [(Direction::Input, fresh_input), (Direction::Output, output)] {
        let provided = provider
            .iter()
            .any(|t| t.modality == Modality::Text && t.direction == d);
        if o != 0 && !provided {
            let added = out.add(Modality::Text, d, o);
            assert!(added.is_some(), "a bounded count fits a fresh token map");
        }
    }
    out
}

/// `POST /api/v1/prices` query: how to read the body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// `litellm` or `toml`.
    format: String,
    /// The book's name (default: the file's, else `list`).
    name: Option<String>,
    /// From when the new version applies (default: now; never before now when the
    /// book has a version already, unless `correct`).
    effective_from: Option<Timestamp>,
    /// The version corrects prices of the past: `effective_from` may be before now
    /// (at or after the latest version's). Entries already rated keep their ratings;
    /// `POST /api/v1/prices/rerate` then appends their corrections.
    #[serde(default)]
    correct: bool,
}

/// `POST /api/v1/prices?format=litellm|toml[&name=][&effective_from=]`: the file is
/// the body. Records the book's next version as one `price.book` entry naming the
/// file's SHA-256, and answers its summary with the keys the import could not map.
pub async fn import(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<ImportParams>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "price books price every tenant: only a root admin key may record one (a node's prices are its contract)",
        ));
    }
    let body = body.map_err(crate::extract::body_error)?;
    let imported = match p.format.as_str() {
        "litellm" => ciyuan_price::import_litellm(&body),
        "toml" => {
            let text = std::str::from_utf8(&body)
                .map_err(|e| ApiError::bad_request(format!("the TOML file is not UTF-8: {e}")))?;
            ciyuan_price::import_toml(text)
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "format: {other:?} is not litellm or toml"
            )));
        }
    }
    .map_err(|e| ApiError::bad_request(format!("{}: {e}", p.format)))?;
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    let now = Timestamp::now();
    let name = p
        .name
        .clone()
        .or_else(|| imported.name.clone())
        .unwrap_or_else(|| LIST_BOOK.to_string());
    // The prices in force hold every version, current under the admin lock (a book
    // is applied before its append returns): no stored book is read and parsed again.
    let latest: Option<Arc<PriceBook>> = app.pricing.latest(&name);
    let from = p.effective_from.unwrap_or(now);
    if let Some(latest) = latest.as_ref().filter(|_| from < now && !p.correct) {
        return Err(ApiError::unprocessable(format!(
            "effective_from {from} is in the past: entries already rated with {}@{} keep their prices; a new version takes effect from now on, or corrects the past with correct=true (then re-rate the period: POST /api/v1/prices/rerate)",
            latest.name, latest.version
        )));
    }
    let version = latest.as_ref().map_or(1, |b| b.version + 1);
    let book = imported
        .into_book(Some(&name), version, from, Some(caller.key.account.clone()))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(latest) = &latest {
        latest.check_successor(&book).map_err(|e| {
            ApiError::unprocessable(format!("{e} ({}@{})", latest.name, latest.version))
        })?;
    }
    let summary = book_summary(&book, None);
    let range = app
        .append_visible(&[Entry::new(
            now,
            AccountPath::root(),
            EntryBody::PriceBook(book),
        )])
        .await?;
    let mut summary = summary;
    summary["entry"] = range.start.into();
    Ok(axum::Json(summary))
}

/// What `prices list` shows of a book version.
fn book_summary(b: &PriceBook, entry: Option<u64>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "name": b.name,
        "version": b.version,
        "currency": b.currency.as_str(),
        "effective_from": b.effective_from.to_string(),
        "rounding": b.rounding,
        "rules": b.rules.len(),
        "source": b.source,
        "set_by": b.set_by,
    });
    if let Some(e) = entry {
        v["entry"] = e.into();
    }
    v
}

/// `GET /api/v1/prices`: every book version, newest last (any read key: tenants see
/// the list prices their usage is rated with).
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    app.caught_up().await?;
    let books = app.blocking(|app| Ok(app.store.price_books()?)).await?;
    let list: Vec<serde_json::Value> = books
        .iter()
        .map(|(e, b)| book_summary(b, Some(*e)))
        .collect();
    Ok(axum::Json(serde_json::json!({ "books": list })))
}

/// `GET /api/v1/prices/{name}` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowParams {
    version: Option<u32>,
}

async fn book_version(
    app: &Arc<App>,
    name: String,
    version: Option<u32>,
) -> Result<(u64, PriceBook), ApiError> {
    app.caught_up().await?;
    let n = name.clone();
    let mut versions: Vec<(u64, PriceBook)> = app
        .blocking(move |app| {
            Ok(app
                .store
                .price_books()?
                .into_iter()
                .filter(|(_, b)| b.name == n)
                .collect())
        })
        .await?;
    versions.sort_by_key(|(_, b)| b.version);
    let found = match version {
        Some(v) => versions.into_iter().find(|(_, b)| b.version == v),
        None => versions.pop(),
    };
    found.ok_or_else(|| {
        ApiError::not_found(match version {
            Some(v) => format!("no version {v} of book {name:?}"),
            None => format!("no book {name:?}"),
        })
    })
}

/// `GET /api/v1/prices/{name}?version=`: one version whole (default the latest).
pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(p): Query<ShowParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let (entry, book) = book_version(&app, name, p.version).await?;
    let mut v = serde_json::to_value(&book).map_err(ApiError::internal)?;
    v["entry"] = entry.into();
    Ok(axum::Json(v))
}

/// `GET /api/v1/prices/{name}/diff` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffParams {
    from: u32,
    to: Option<u32>,
}

/// `GET /api/v1/prices/{name}/diff?from=1[&to=2]`: what changed between versions.
pub async fn diff(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(p): Query<DiffParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let (_, old) = book_version(&app, name.clone(), Some(p.from)).await?;
    let (_, new) = book_version(&app, name, p.to).await?;
    let changes: Vec<String> = ciyuan_price::diff(&old, &new)
        .iter()
        .map(|c| c.to_string())
        .collect();
    Ok(axum::Json(serde_json::json!({
        "name": new.name,
        "from": old.version,
        "to": new.version,
        "changes": changes,
    })))
}

/// `PUT /api/v1/contracts/{path}`: sets a node's contract (whole), from a key strictly
/// above the node (a tenant does not set its own prices); changing one set from
/// above needs a key at that setter's node or above.
pub async fn set_contract(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(mut contract): Json<PriceContract>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let node = parse_path(&raw, "path")?;
    caller.require_within(&node)?;
    let mine = &caller.key.account;
    if !mine.is_root() && !ciyuan_core::may_set_contract(mine, &node, None) {
        return Err(ApiError::forbidden(format!(
            "a contract on {node} prices its usage: only a key strictly above it may set it"
        )));
    }
    app.require_account(&node).await?;
    contract.set_by = Some(mine.clone());
    contract
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    // Books and contracts in force, current under the admin lock.
    let state = app.pricing.state();
    let current = state.contracts.get(node.as_str()).map(|(_, c)| c.clone());
    if !state.books.contains_key(&contract.book) {
        return Err(ApiError::unprocessable(format!(
            "book: no book named {:?} is recorded",
            contract.book
        )));
    }
    if let Some(c) = current
        && !mine.is_root()
        && !ciyuan_core::may_set_contract(mine, &node, Some(&c))
    {
        return Err(ApiError::forbidden(format!(
            "the contract on {node} was set by a key at {}: only a key at that node or above may change it",
            c.set_by.as_ref().map_or("/".to_string(), |s| s.to_string())
        )));
    }
    let range = app
        .append_visible(&[Entry::new(
            Timestamp::now(),
            node.clone(),
            EntryBody::PriceContract(contract.clone()),
        )])
        .await?;
    Ok(axum::Json(serde_json::json!({
        "account": node,
        "entry": range.start,
        "contract": contract,
    })))
}

/// `GET /api/v1/contracts/{path}`: the contract that prices the node's usage (its
/// own or its nearest ancestor's) and the book it names.
pub async fn show_contract(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    app.caught_up().await?;
    let state = app.pricing.state();
    let found = state.contract(&node);
    Ok(axum::Json(serde_json::json!({
        "account": node,
        "from": found.map(|(n, _)| n.clone()),
        "book": found.map_or(LIST_BOOK.to_string(), |(_, c)| c.book.clone()),
        "contract": found.map(|(_, c)| c.as_ref().clone()),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{Direction as D, Modality as M, Recount};

    fn map(counts: &[(M, D, i64)]) -> TokenMap {
        let mut t = TokenMap::new();
        for &(m, d, n) in counts {
            t.add(m, d, n).unwrap();
        }
        t
    }

    /// A batch's rater memo gives every entry the rater a lookup of its own gives,
    /// across nodes with and without a contract and across a new book version's
    /// effective time.
    #[test]
    fn a_batch_memo_gives_each_entry_its_own_rater() {
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let book = |name: &str, version: u32, from: &str| {
            let file = "name = \"x\"\ncurrency = \"USD\"\n[[rules]]\nmodel = \"m\"\nunit_prices = { \"text.input\" = \"0.001\" }\n";
            Arc::new(
                ciyuan_price::import_toml(file)
                    .unwrap()
                    .into_book(Some(name), version, at(from), None)
                    .unwrap(),
            )
        };
        let mut state = State_::default();
        state.books.insert(
            LIST_BOOK.into(),
            vec![
                book(LIST_BOOK, 1, "2026-01-01T00:00:00Z"),
                book(LIST_BOOK, 2, "2026-06-01T00:00:00Z"),
            ],
        );
        state
            .books
            .insert("gold".into(), vec![book("gold", 1, "2026-03-01T00:00:00Z")]);
        let vip: AccountPath = "acme/vip".parse().unwrap();
        let contract = PriceContract {
            book: "gold".into(),
            overrides: vec![],
            discount_percent: None,
            markup_percent: None,
            minimum_commitment: None,
            service_levels: Vec::new(),
            set_by: None,
        };
        state
            .contracts
            .insert(vip.as_str().into(), (vip.clone(), Arc::new(contract)));
        let prices = Prices(Arc::new(state));
        let nodes: Vec<AccountPath> = ["acme", "acme/vip/a", "acme/b", "acme/vip"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let times = [
            "2026-05-31T23:59:59Z",
            "2026-06-01T00:00:00Z",
            "2026-02-01T00:00:00Z",
            "2025-12-31T00:00:00Z",
        ];
        let mut memo = RaterMemo::default();
        let mut seen = rustc_hash::FxHashSet::default();
        for round in 0..3 {
            for (i, node) in nodes.iter().enumerate() {
                for t in times.iter().cycle().skip(i + round).take(times.len()) {
                    let alone = prices.0.rater(node, at(t));
                    let batched = prices
                        .rater_memo(&mut memo, node, at(t))
                        .map(|r| r.cloned());
                    match (&alone, &batched) {
                        (Ok(Some(a)), Ok(Some(b))) => {
                            assert!(Arc::ptr_eq(a, b), "{node} at {t}");
                            seen.insert(Arc::as_ptr(a));
                        }
                        (Err(a), Err(b)) => assert_eq!(a, b, "{node} at {t}"),
                        _ => panic!(
                            "{node} at {t}: {:?} against {:?}",
                            alone.is_ok(),
                            batched.is_ok()
                        ),
                    }
                }
            }
        }
        // list@1, list@2 and gold@1 each priced some entry.
        assert_eq!(seen.len(), 3);
    }

    /// `rate_basis`: the recount replaces the provider's text input (less its cached
    /// and cache-write input) and output; `greater` takes the larger of each; other
    /// keys stay the provider's.
    #[test]
    fn the_priced_count_follows_the_providers_basis() {
        let provider = map(&[
            (M::Text, D::Input, 100),
            (M::Text, D::CachedInput, 40),
            (M::Text, D::Output, 50),
            (M::Audio, D::Output, 7),
        ]);
        let recount = Recount {
            encoding: "o200k_base".into(),
            input: 150,
            output: 45,
            flagged: true,
        };
        let ours = recounted(&provider, &recount, false);
        assert_eq!(
            ours,
            map(&[
                (M::Text, D::Input, 110),
                (M::Text, D::CachedInput, 40),
                (M::Text, D::Output, 45),
                (M::Audio, D::Output, 7),
            ])
        );
        let greater = recounted(&provider, &recount, true);
        assert_eq!(
            greater,
            map(&[
                (M::Text, D::Input, 110),
                (M::Text, D::CachedInput, 40),
                (M::Text, D::Output, 50),
                (M::Audio, D::Output, 7),
            ])
        );
        // A key the provider did not report is added from the recount.
        let bare = recounted(&map(&[(M::Audio, D::Input, 3)]), &recount, false);
        assert_eq!(
            bare,
            map(&[
                (M::Audio, D::Input, 3),
                (M::Text, D::Input, 150),
                (M::Text, D::Output, 45)
            ])
        );
    }
}
