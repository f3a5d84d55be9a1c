//! The money and counting rules `ciyuan audit verify` checks from the log alone, after
//! the bytes, hashes, tree and signed checkpoints have been verified.
//!
//! The log is read once more, in order, and every entry is judged by what was recorded
//! **before** it, as the server knew it when it appended the entry:
//!
//! 1. **Postings.** Every `posting` balances (debits equal credits exactly,
//!    [`Posting::check`]) and is replayed through the wallets on its entry's node
//!    ([`Wallets::apply_posting`]), which refuses a posting that moves a wallet outside
//!    the node's subtree, spends a grant that does not exist, or takes a grant below
//!    zero. Cash may end below zero: a request that cost more than it held is settled
//!    in full (see `ciyuan_budget::wallet`).
//! 2. **Ratings.** A usage entry carrying a `rating` names the `price.book` version in
//!    force at the entry's time among those recorded earlier (the latest
//!    `effective_from` at or before it; a correction names its own); the book is the one the
//!    nearest contract on the entry's path names (else [`LIST_BOOK`]), and the rating
//!    names that contract's node; the rating is recomputed independently
//!    ([`ciyuan_price::verify_rating`]) from the entry's model, service, standard tier,
//!    tokens, measures and time, and every line, price and amount must agree.
//! 3. **Definitions.** A usage entry naming `service@version` (other than the built-in
//!    [`BUILT_IN_DEFINITIONS`]) names a `definition.set` of its own service recorded
//!    earlier, and that version is the one in force at the entry's time (the latest
//!    `effective_from` at or before it), and its tokens are what that definition gives
//!    for the entry's measures (re-measured with `ciyuan_measure`). No two
//!    `definition.set` entries give different rules for one `service@version`, and
//!    the recorded versions compile together as the server requires.
//!
//!    When the rule that prices it has graduated or volume tiers, the rating says
//!    where its units were placed (`place`): the billing node (the contract's node,
//!    else the top-level account), the rule's counter name, the period holding the
//!    entry's time in that node's time zone (as `account.*` entries set it so far),
//!    the entry's units of the keys the tiers count, and `before`, which must equal
//!    the units of the entries before it in the log on the same counter: no unit is
//!    priced twice or skipped.
//! 4. **Corrections.** A `rating.correction` names an earlier entry and starts from
//!    the rating that entry stands at (its own, or its latest correction's); its new
//!    rating is recomputed as in 2, for the usage's time and node, with the book
//!    version it names and the contract in force at the correction's place in the log.
//!    A second reading of the log, only when corrections exist, checks that each
//!    named entry is usage of that node and time whose body is the correction's copy.
//!
//! 5. **Service levels.** A `service_level.evaluated` entry evaluates a level its
//!    node's contract holds at that point of the log, for a month (in the node's time
//!    zone, as `account.*` entries set it so far) that was over when it was appended,
//!    once per node, level and month; the log range it read starts at the month's
//!    first gateway request (entry with a quality record whose time is in the month)
//!    and ends before the evaluation, where the server's projections stood: requests
//!    of the month recorded after that end are not in it, none before it is left out. A second reading of the log, only
//!    when evaluations exist, recomputes each from the requests it covers
//!    ([`ciyuan_core::covered`]): the figures, every objective's result, the credit
//!    percent and the credits must be what [`ciyuan_core::evaluate`] gives. A
//!    `service_credit` posting pays a credit of an evaluation before it on the same
//!    node (its memo names the level and month), in that credit's currency and amount,
//!    once.
//!
//! Memory holds the books, contracts, definitions, wallets, the corrections' copies
//! of the entries they re-rate, the evaluations, and per hour where its gateway
//! requests lie in the log, never the usage entries themselves.
//!
//! What is taken as recorded rather than recomputed: when a rating's `basis` is
//! `recount` or `greater` and the entry carries a recount, the counts priced are the
//! quantities of the rating's own lines (the server's combination of the provider's
//! counts with its recount is not recomputed, as [`ciyuan_price::verify_rating`]
//! documents); such entries are counted in [`RulesReport::rated_basis_as_recorded`].
//! Their unit prices, amounts and total are still checked against the book.
//!
//! What the log alone cannot excuse: the server rates and measures an entry before it
//! appends it, and applies a new contract or definition version only once that entry
//! is projected, so under load an entry priced or measured by the old terms can land
//! just after the new ones. Judged by its place in the log it fails; the failure says
//! when it follows the terms of just before the latest change ("rated before the
//! server applied that change?"). Ordering ratings with control changes in the server
//! makes such logs impossible.

use ciyuan_budget::Wallets;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::{
    AccountPath, DecodeError, Entry, EntryBody, PriceBook, PriceContract, PriceKey, Rating,
    RatingBasis, RatingCorrection, ServiceLevelEvaluated, TokenDefinition, TokenMap, Usage,
};
use ciyuan_ledger::{VerifyFailure, VerifyReport};
use ciyuan_measure::DefinitionSet;
use ciyuan_price::RateInput;
use rust_decimal::Decimal;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::rc::Rc;

pub use ciyuan_server::prices::LIST_BOOK;

/// Definitions no `definition.set` records: `llm.usage@1` (ingested events that carry
/// their own counts) and the gateway's own metering rules (`Endpoint::definition` in
/// `ciyuan-server/src/gateway/protocol.rs`). A new built-in version must be added here.
pub const BUILT_IN_DEFINITIONS: [&str; 3] =
    ["llm.usage@1", "gateway.openai@1", "gateway.anthropic@1"];

/// What the rule checks covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesReport {
    /// Entries read.
    pub entries: u64,
    /// `posting` entries found balanced and replayed through the wallets.
    pub postings: u64,
    /// Ratings recomputed from the book they name: of usage entries, and of
    /// `rating.correction` entries.
    pub rated: u64,
    /// Of `rated`, those whose counts (basis `recount` or `greater`) were taken from
    /// the rating's lines as recorded.
    pub rated_basis_as_recorded: u64,
    /// Usage entries whose recorded definition was found in force and gives their
    /// tokens from their measures.
    pub defined: u64,
    /// `price.book` versions recorded.
    pub books: u64,
    /// `price.contract` entries recorded.
    pub contracts: u64,
    /// `definition.set` entries recorded.
    pub definitions: u64,
    /// `rating.correction` entries whose new rating was recomputed and whose copy of
    /// the usage matched the entry it names.
    pub corrections: u64,
    /// Rated entries placed on a tier counter right after the units counted before
    /// them in their period.
    pub placed: u64,
    /// `service_level.evaluated` entries recomputed from the requests they cover.
    pub service_levels: u64,
}

/// The first entry that breaks a rule (or, with no entry, why the log could not be
/// read again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleFailure {
    /// The entry's index in the log.
    pub entry: Option<u64>,
    /// What is wrong, naming the field.
    pub what: String,
}

impl fmt::Display for RuleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            Some(i) => write!(f, "entry {i}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for RuleFailure {}

impl From<VerifyFailure> for RuleFailure {
    fn from(f: VerifyFailure) -> Self {
        RuleFailure {
            entry: None,
            what: f.0,
        }
    }
}

/// A recorded price book version and the entry that recorded it.
struct RecordedBook {
    book: PriceBook,
    entry: u64,
}

/// A node's contract, the entry that set it, and what it replaced (kept to explain a
/// rating made with the contract of just before a change).
struct ContractState {
    node: AccountPath,
    contract: PriceContract,
    entry: u64,
    previous: Option<PriceContract>,
}

/// Where and when usage was: a usage entry's, or the one a correction re-rates.
struct Used<'a> {
    ts: Timestamp,
    account: &'a AccountPath,
}

/// The contract that prices a node's usage: its node, the contract, and the entry that
/// set it; `None` when no node on the path has one.
type InForce<'a> = Option<(&'a AccountPath, &'a PriceContract, u64)>;

/// The state of the rules at one point of the log, and the counts so far. Feed it every
/// entry in order with [`RuleChecker::check`].
pub struct RuleChecker {
    /// Versions of each book, by name then version.
    books: HashMap<String, BTreeMap<u32, RecordedBook>>,
    /// The contract of each node, by path text (the root's empty).
    contracts: HashMap<String, ContractState>,
    /// Versions of each service's definition, in the order `in_force` searches:
    /// `effective_from`, then version.
    definitions: HashMap<String, Vec<(TokenDefinition, u64)>>,
    /// The recorded definitions compiled, rebuilt after a `definition.set` when the
    /// next defined entry needs them.
    compiled: Option<DefinitionSet>,
    wallets: Wallets,
    /// The rules of a book version that can price one (model, service): see
    /// [`RuleChecker::subset`].
    subsets: RefCell<HashMap<SubsetKey, Rc<PriceBook>>>,
    /// Entries corrected so far, by index: what their corrections say of them.
    corrected: BTreeMap<u64, Corrected>,
    /// Units counted on each tier counter so far.
    counters: HashMap<CounterKey, Decimal>,
    /// Time zones set on nodes by `account.created` / `account.updated`, by path.
    zones: HashMap<String, String>,
    /// Per UTC hour, the first and last index of the entries with a quality record.
    quality_hours: BTreeMap<i64, (u64, u64)>,
    /// Service levels evaluated so far: (entry, node, evaluation).
    evaluated: Vec<(u64, AccountPath, ServiceLevelEvaluated)>,
    /// Credits paid so far: (node, memo, currency).
    credits_paid: std::collections::HashSet<(String, String, ciyuan_core::Currency)>,
    report: RulesReport,
}

/// What corrections say of the usage entry they correct.
struct Corrected {
    /// The latest correction.
    by: u64,
    /// Their copy of the entry's time, node and usage.
    at: Timestamp,
    account: AccountPath,
    usage: Box<Usage>,
    /// The rating it stands at now.
    rating: Rating,
}

/// A tier counter: billing node, book, rule, period start.
type CounterKey = (String, String, String, Timestamp);

/// A book version and the model and service of the entries it prices.
type SubsetKey = (String, u32, Option<String>, String);

/// Most book subsets kept; past it the cache starts over (a log naming many distinct
/// models costs time, never unbounded memory).
const MAX_BOOK_SUBSETS: usize = 4096;

impl Default for RuleChecker {
    fn default() -> Self {
        RuleChecker::new()
    }
}

/// Splits `service@version`.
fn split_definition(id: &str) -> Option<(&str, u32)> {
    let (service, version) = id.rsplit_once('@')?;
    if service.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((service, version.parse().ok()?))
}

impl RuleChecker {
    /// Nothing recorded yet: the start of a log.
    pub fn new() -> RuleChecker {
        RuleChecker {
            books: HashMap::new(),
            contracts: HashMap::new(),
            definitions: HashMap::new(),
            compiled: None,
            wallets: Wallets::new(),
            subsets: RefCell::new(HashMap::new()),
            corrected: BTreeMap::new(),
            counters: HashMap::new(),
            zones: HashMap::new(),
            quality_hours: BTreeMap::new(),
            evaluated: Vec::new(),
            credits_paid: std::collections::HashSet::new(),
            report: RulesReport::default(),
        }
    }

    /// What has been checked so far.
    pub fn report(&self) -> &RulesReport {
        &self.report
    }

    /// Judges entry `index` (its ledger bytes) by what the entries before it recorded,
    /// then records what it changes. Entries must come in log order from 0. (The
    /// binary decodes on another thread and calls [`RuleChecker::check_decoded`].)
    #[cfg(test)]
    pub fn check(&mut self, index: u64, bytes: &[u8]) -> Result<(), RuleFailure> {
        self.check_decoded(index, Entry::decode(bytes))
    }

    /// [`RuleChecker::check`] for an entry already decoded (on another thread).
    pub fn check_decoded(
        &mut self,
        index: u64,
        entry: Result<Entry, DecodeError>,
    ) -> Result<(), RuleFailure> {
        let entry = entry.map_err(|e| RuleFailure {
            entry: Some(index),
            what: format!("not an entry this build reads: {e}"),
        })?;
        let kind = entry.body.kind();
        self.judge(index, &entry).map_err(|what| RuleFailure {
            entry: Some(index),
            what: format!("{kind} on {}: {what}", entry.account),
        })?;
        self.report.entries += 1;
        Ok(())
    }

    fn judge(&mut self, index: u64, entry: &Entry) -> Result<(), String> {
        match &entry.body {
            EntryBody::PriceBook(book) => self.record_book(index, book),
            EntryBody::PriceContract(contract) => {
                contract
                    .check()
                    .map_err(|e| format!("the contract is invalid: {e}"))?;
                let previous = self
                    .contracts
                    .remove(entry.account.as_str())
                    .map(|c| c.contract);
                self.contracts.insert(
                    entry.account.as_str().to_string(),
                    ContractState {
                        node: entry.account.clone(),
                        contract: contract.clone(),
                        entry: index,
                        previous,
                    },
                );
                self.report.contracts += 1;
                Ok(())
            }
            EntryBody::DefinitionSet(def) => self.record_definition(index, def),
            EntryBody::Posting(posting) => {
                posting.check().map_err(|e| format!("{e}"))?;
                if posting.kind == ciyuan_core::PostingKind::ServiceCredit {
                    self.judge_credit(&entry.account, posting)?;
                }
                self.wallets
                    .apply_posting(&entry.account, posting, entry.ts)
                    .map_err(|e| format!("replaying it through the wallets: {e}"))?;
                self.report.postings += 1;
                Ok(())
            }
            EntryBody::RatingCorrection(c) => self.check_correction(index, entry, c),
            EntryBody::AccountCreated(info) | EntryBody::AccountUpdated(info) => {
                if let Some(z) = &info.time_zone {
                    self.zones
                        .insert(entry.account.as_str().to_string(), z.clone());
                }
                Ok(())
            }
            EntryBody::ReportDelivered(d) => d.check(),
            EntryBody::WalletSet(set) => self
                .wallets
                .apply_settings(&entry.account, set)
                .map_err(|e| format!("wallet settings: {e}")),
            EntryBody::ServiceLevelEvaluated(e) => self.judge_evaluation(index, entry, e),
            EntryBody::Usage(usage) => {
                if usage.quality.is_some() {
                    let hour = entry.ts.as_second().div_euclid(3600) * 3600;
                    let slot = self.quality_hours.entry(hour).or_insert((index, index));
                    slot.1 = index;
                }
                if let Some(id) = &usage.definition {
                    self.check_definition(entry.ts, usage, id)?;
                }
                if let Some(rating) = &usage.rating {
                    let used = Used {
                        ts: entry.ts,
                        account: &entry.account,
                    };
                    self.check_rating(index, &used, usage, rating, false)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A correction names an earlier entry, starts from the rating that entry stood
    /// at (its own, or its last correction's), and its new rating follows the books
    /// and contract in force at the correction's place in the log, for the usage's
    /// time. Its copy of the usage is checked against the entry by [`check_path`]'s
    /// second reading.
    fn check_correction(
        &mut self,
        index: u64,
        entry: &Entry,
        c: &RatingCorrection,
    ) -> Result<(), String> {
        if c.entry >= index {
            return Err(format!(
                "entry: {} is not before the correction ({index})",
                c.entry
            ));
        }
        match self.corrected.get(&c.entry) {
            Some(was) => {
                if was.usage != c.usage || was.at != c.at || was.account != entry.account {
                    return Err(format!(
                        "usage: the copy of entry {} differs from the one correction entry {} carried",
                        c.entry, was.by
                    ));
                }
                if was.rating != *c.previous {
                    return Err(format!(
                        "previous: entry {} stands at the rating of correction entry {} ({} {}), not at {} {}",
                        c.entry,
                        was.by,
                        was.rating.amount,
                        was.rating.currency,
                        c.previous.amount,
                        c.previous.currency
                    ));
                }
            }
            None => {
                if c.usage.rating.as_deref() != Some(&*c.previous) {
                    return Err(format!(
                        "previous: entry {} was appended with another rating than the one the correction starts from",
                        c.entry
                    ));
                }
            }
        }
        if c.rating.place != c.previous.place {
            return Err(
                "rating.place: a correction keeps where the tiered units were placed".into(),
            );
        }
        let used = Used {
            ts: c.at,
            account: &entry.account,
        };
        self.check_rating(index, &used, &c.usage, &c.rating, true)?;
        self.corrected.insert(
            c.entry,
            Corrected {
                by: index,
                at: c.at,
                account: entry.account.clone(),
                usage: c.usage.clone(),
                rating: (*c.rating).clone(),
            },
        );
        self.report.corrections += 1;
        Ok(())
    }

    fn record_book(&mut self, index: u64, book: &PriceBook) -> Result<(), String> {
        let id = format!("{}@{}", book.name, book.version);
        book.check()
            .map_err(|e| format!("book {id} is invalid: {e}"))?;
        let versions = self.books.entry(book.name.clone()).or_default();
        if let Some(earlier) = versions.get(&book.version) {
            // A version is recorded once; the same bytes again change nothing, other
            // prices under the same name and version would make ratings ambiguous.
            if earlier.book != *book {
                return Err(format!(
                    "book {id} was recorded at entry {} with different contents",
                    earlier.entry
                ));
            }
            return Ok(());
        }
        versions.insert(
            book.version,
            RecordedBook {
                book: book.clone(),
                entry: index,
            },
        );
        self.report.books += 1;
        Ok(())
    }

    fn record_definition(&mut self, index: u64, def: &TokenDefinition) -> Result<(), String> {
        let versions = self.definitions.entry(def.service.clone()).or_default();
        if let Some((earlier, at)) = versions.iter().find(|(d, _)| d.version == def.version) {
            if !earlier.same_rule(def) {
                return Err(format!(
                    "definition {} gives rules different from those recorded at entry {at}",
                    def.id()
                ));
            }
            return Ok(());
        }
        let at = versions.partition_point(|(d, _)| {
            (d.effective_from, d.version) <= (def.effective_from, def.version)
        });
        versions.insert(at, (def.clone(), index));
        // The server admits a version only if all of them still compile together
        // (versions increase with effective_from, expressions parse).
        let all: Vec<TokenDefinition> = self
            .definitions
            .values()
            .flatten()
            .map(|(d, _)| d.clone())
            .collect();
        let compiled =
            DefinitionSet::new(all).map_err(|e| format!("definition {}: {e}", def.id()))?;
        self.compiled = Some(compiled);
        self.report.definitions += 1;
        Ok(())
    }

    fn check_definition(&mut self, ts: Timestamp, usage: &Usage, id: &str) -> Result<(), String> {
        if BUILT_IN_DEFINITIONS.contains(&id) {
            return Ok(());
        }
        let Some((service, version)) = split_definition(id) else {
            return Err(format!("definition: {id:?} is not service@version"));
        };
        if service != usage.service {
            return Err(format!(
                "definition: {id} is a definition of {service}, the entry's service is {}",
                usage.service
            ));
        }
        let versions = self.definitions.get(service).map_or(&[][..], Vec::as_slice);
        if !versions.iter().any(|(d, _)| d.version == version) {
            let known: Vec<String> = versions
                .iter()
                .map(|(d, _)| d.version.to_string())
                .collect();
            return Err(format!(
                "definition: {id} is not recorded by any definition.set before this entry{}",
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (versions recorded: {})", known.join(", "))
                }
            ));
        }
        let in_force = versions.partition_point(|(d, _)| d.effective_from <= ts);
        let Some((current, at)) = in_force.checked_sub(1).map(|i| &versions[i]) else {
            return Err(format!(
                "definition: {id} names a definition, but none of {service} was in force at {ts}"
            ));
        };
        if current.version != version {
            // The server measures an event before appending it and applies a new
            // version once its entry is projected: say so when the entry names the
            // version that was in force without the latest one recorded.
            let latest = versions.iter().map(|(_, e)| *e).max();
            let before_latest = versions
                .iter()
                .filter(|(d, e)| Some(*e) != latest && d.effective_from <= ts)
                .max_by_key(|(d, _)| (d.effective_from, d.version));
            let hint = match (before_latest, latest) {
                (Some((d, _)), Some(l)) if d.version == version => format!(
                    "; {id} was in force before entry {l} was recorded: measured before the server applied it?"
                ),
                _ => String::new(),
            };
            return Err(format!(
                "definition: {id} was not in force at {ts}; {} (from {}, entry {at}) was{hint}",
                current.id(),
                current.effective_from
            ));
        }
        let compiled = self.compiled.as_ref().ok_or_else(|| {
            format!("definition: {id} is recorded but no compiled definitions are kept")
        })?;
        let data: serde_json::Map<String, serde_json::Value> = usage
            .measures
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let measured = compiled
            .measure(service, ts, &data)
            .map_err(|e| format!("measures: re-measuring with {id}: {e}"))?;
        let nonzero = |t: &TokenMap| {
            t.iter()
                .filter(|c| c.count != 0)
                .map(|c| (c.modality, c.direction, c.count))
                .collect::<Vec<_>>()
        };
        if !nonzero(&measured.tokens)
            .into_iter()
            .eq(nonzero(&usage.tokens))
        {
            let show = |t: &TokenMap| {
                nonzero(t)
                    .iter()
                    .map(|(m, d, n)| format!("{m}.{d} = {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "tokens: {id} gives {} for the entry's measures, the entry has {}",
                show(&measured.tokens),
                show(&usage.tokens)
            ));
        }
        self.report.defined += 1;
        Ok(())
    }

    /// The nearest contract on the path of `node`, itself first.
    fn contract_of(&self, node: &AccountPath) -> InForce<'_> {
        let mut p = node.as_str();
        loop {
            if let Some(c) = self.contracts.get(p) {
                return Some((&c.node, &c.contract, c.entry));
            }
            if p.is_empty() {
                return None;
            }
            p = p.rfind('/').map_or("", |i| &p[..i]);
        }
    }

    /// The contract that priced `node`'s usage just before the latest contract entry on
    /// its path, and that entry's index; `None` when no node on the path has one.
    fn contract_before_last_change(&self, node: &AccountPath) -> Option<(InForce<'_>, u64)> {
        let mut path = Vec::new();
        let mut p = node.as_str();
        loop {
            path.push(p);
            if p.is_empty() {
                break;
            }
            p = p.rfind('/').map_or("", |i| &p[..i]);
        }
        let changed = path
            .iter()
            .filter_map(|p| self.contracts.get(*p))
            .max_by_key(|c| c.entry)?;
        for p in path {
            let Some(c) = self.contracts.get(p) else {
                continue;
            };
            if c.entry != changed.entry {
                return Some((Some((&c.node, &c.contract, c.entry)), changed.entry));
            }
            if let Some(prev) = &c.previous {
                return Some((Some((&c.node, prev, c.entry)), changed.entry));
            }
        }
        Some((None, changed.entry))
    }

    /// `book` with only the rules that match `model` and `service` at some tier, in
    /// their order. The naive verifier walks every rule of a book per entry (4,500 for
    /// LiteLLM's table); the first rule matching at each tier, which is all it uses, is
    /// the same in the subset, so its verdict is too.
    fn subset(&self, book: &PriceBook, model: Option<&str>, service: &str) -> Rc<PriceBook> {
        let key = (
            book.name.clone(),
            book.version,
            model.map(str::to_string),
            service.to_string(),
        );
        let mut cache = self.subsets.borrow_mut();
        if let Some(b) = cache.get(&key) {
            return b.clone();
        }
        if cache.len() >= MAX_BOOK_SUBSETS {
            cache.clear();
        }
        let sub = Rc::new(PriceBook {
            tax: book.tax.clone(),
            name: book.name.clone(),
            version: book.version,
            currency: book.currency,
            effective_from: book.effective_from,
            rounding: book.rounding,
            // Not read by the verifier, and long for imported books.
            source: None,
            set_by: book.set_by.clone(),
            rules: book
                .rules
                .iter()
                .filter(|r| r.matches(model, service, r.tier))
                .cloned()
                .collect(),
        });
        cache.insert(key, sub.clone());
        sub
    }

    /// Judges `rating` of `usage`; `correcting` when it is a correction's, whose
    /// tiered units keep the place the entry took (they are not counted again).
    fn check_rating(
        &mut self,
        index: u64,
        entry: &Used<'_>,
        usage: &Usage,
        rating: &Rating,
        correcting: bool,
    ) -> Result<(), String> {
        let contract = self.contract_of(entry.account);
        let (as_recorded, counter) = match self
            .judge_rating(entry, usage, rating, contract, correcting)
        {
            Ok(judged) => judged,
            Err(why) => {
                // The server rates an entry before appending it, and applies a new
                // contract once its entry is projected: say so when the rating follows
                // the contract of just before the latest change.
                let hint = self
                    .contract_before_last_change(entry.account)
                    .filter(|(before, _)| {
                        self.judge_rating(entry, usage, rating, *before, correcting)
                            .is_ok()
                    })
                    .map(|(_, changed)| {
                        format!(
                            "; it follows the contract in force before entry {changed}, {} entries earlier: rated before the server applied that change?",
                            index - changed
                        )
                    })
                    .unwrap_or_default();
                return Err(format!("{why}{hint}"));
            }
        };
        if let Some((key, after)) = counter
            && !correcting
        {
            self.report.placed += 1;
            self.counters.insert(key, after);
        }
        self.report.rated += 1;
        if as_recorded {
            self.report.rated_basis_as_recorded += 1;
        }
        Ok(())
    }

    /// A service level's evaluation: of a level the node's contract holds now, for a
    /// month that was over, once, having read exactly the month's requests so far.
    fn judge_evaluation(
        &mut self,
        index: u64,
        entry: &Entry,
        e: &ServiceLevelEvaluated,
    ) -> Result<(), String> {
        let node = &entry.account;
        let held = self
            .contracts
            .get(node.as_str())
            .is_some_and(|c| c.contract.service_levels.contains(&e.level));
        if !held {
            return Err(format!(
                "level: {:?} is not a service level of the contract of {node} at this point",
                e.level.name
            ));
        }
        if self
            .evaluated
            .iter()
            .any(|(_, n, o)| n == node && o.key() == e.key())
        {
            return Err(format!(
                "{} of {:?} was evaluated already: a credit is owed once",
                e.period, e.level.name
            ));
        }
        let zone = self.zone_of(node)?;
        let month =
            ciyuan_core::jiff::civil::Date::strptime("%Y-%m-%d", format!("{}-01", e.period))
                .map_err(|x| format!("period: {:?}: {x}", e.period))?;
        let start = |d: ciyuan_core::jiff::civil::Date| {
            zone.to_timestamp(d.to_datetime(ciyuan_core::jiff::civil::Time::midnight()))
                .map_err(|x| format!("period: {x}"))
        };
        let next = month
            .checked_add(ciyuan_core::jiff::Span::new().months(1))
            .map_err(|x| format!("period: {x}"))?;
        if (e.from, e.to) != (start(month)?, start(next)?) {
            return Err(format!(
                "from/to: {} – {} is not {} in the node's time zone",
                e.from, e.to, e.period
            ));
        }
        if e.to > entry.ts {
            return Err(format!("{} was not over at {}", e.period, entry.ts));
        }
        // The read ends where the server's projections stood (before this entry) and
        // must start at the month's first request, if one came before that end.
        let first = self
            .quality_hours
            .range(e.from.as_second()..e.to.as_second())
            .map(|(_, &(f, _))| f)
            .min();
        let (start, end) = e.scanned;
        let right = end <= index
            && match first {
                Some(f) if f < end => start == f,
                _ => start == end,
            };
        if !right {
            return Err(format!(
                "scanned: {start}..{end} does not start at the month's first request before \
                 its end (entry {first:?}), or ends after the evaluation"
            ));
        }
        self.evaluated.push((index, node.clone(), e.clone()));
        Ok(())
    }

    /// A `service_credit` posting pays one credit of an earlier evaluation, once.
    fn judge_credit(&mut self, node: &AccountPath, p: &ciyuan_core::Posting) -> Result<(), String> {
        let amount: Decimal = p
            .legs
            .iter()
            .filter(|l| l.account == ciyuan_core::LedgerAccount::Cash(node.clone()))
            .map(|l| l.credit)
            .sum();
        let owed = self.evaluated.iter().any(|(_, n, e)| {
            n == node
                && ciyuan_core::credit_memo(&e.level.name, &e.period) == p.memo
                && e.credits
                    .iter()
                    .any(|c| c.currency == p.currency && c.amount == amount)
        });
        if !owed || p.legs.len() != 2 {
            return Err(format!(
                "service credit: {amount} {} ({:?}) is not a credit an evaluation of {node} owes",
                p.currency, p.memo
            ));
        }
        if !self
            .credits_paid
            .insert((node.as_str().to_string(), p.memo.clone(), p.currency))
        {
            return Err(format!(
                "service credit: {:?} in {} was paid already",
                p.memo, p.currency
            ));
        }
        Ok(())
    }

    /// The effective time zone of `node` as the log has set it so far (its own, or
    /// its nearest ancestor's; UTC when none).
    fn zone_of(&self, node: &AccountPath) -> Result<TimeZone, String> {
        let mut p = Some(node.clone());
        while let Some(n) = p {
            if let Some(name) = self.zones.get(n.as_str()) {
                return TimeZone::get(name).map_err(|e| format!("time zone {name:?} of {n}: {e}"));
            }
            p = n.parent();
        }
        Ok(TimeZone::UTC)
    }

    /// Checks where a rating says its tiered units were placed (see
    /// [`ciyuan_core::TierPlace`]); answers the counter and its new total.
    fn judge_place(
        &self,
        entry: &Used<'_>,
        rating: &Rating,
        counter: Option<ciyuan_price::TierCounter>,
        correcting: bool,
    ) -> Result<Option<(CounterKey, Decimal)>, String> {
        let (counter, place) = match (counter, &rating.place) {
            (None, None) => return Ok(None),
            (None, Some(_)) => {
                return Err(
                    "rating.place: the rule that prices the entry has no graduated or volume tiers"
                        .into(),
                );
            }
            (Some(c), None) => {
                return Err(format!(
                    "rating.place: missing, though the rule that prices the entry ({}) has graduated or volume tiers",
                    c.rule
                ));
            }
            (Some(c), Some(p)) => (c, p),
        };
        let node = ciyuan_core::TierPlace::billing_node(rating.contract.as_ref(), entry.account);
        if place.node != node {
            return Err(format!(
                "rating.place.node: the tiers count the usage of {node}, the entry names {}",
                place.node
            ));
        }
        if place.rule != counter.rule {
            return Err(format!(
                "rating.place.rule: the rule that prices the entry is {:?}, the entry names {:?}",
                counter.rule, place.rule
            ));
        }
        if place.units != counter.units {
            return Err(format!(
                "rating.place.units: the tiers count {} units of the entry, it says {}",
                counter.units, place.units
            ));
        }
        let zone = self.zone_of(&node)?;
        let period = ciyuan_price::period_start(counter.period, &zone, entry.ts)
            .ok_or_else(|| format!("rating.place.period: no period holds {}", entry.ts))?;
        if place.period != period {
            return Err(format!(
                "rating.place.period: the entry's time {} is in the period from {period} in {node}'s time zone, the entry says {}",
                entry.ts, place.period
            ));
        }
        let key = (
            node.as_str().to_string(),
            rating.book.clone(),
            counter.rule,
            period,
        );
        let counted = self.counters.get(&key).copied().unwrap_or(Decimal::ZERO);
        if !correcting && place.before != counted {
            return Err(format!(
                "rating.place.before: {} units were counted on its tiers before it in the period, the entry says {}",
                counted, place.before
            ));
        }
        let after = counted
            .checked_add(place.units)
            .ok_or_else(|| "rating.place.units: the counter overflows".to_string())?;
        Ok(Some((key, after)))
    }

    /// Whether `rating` follows the books recorded so far under `contract`: whether
    /// its counts were taken as recorded, and the tier counter it advances.
    fn judge_rating(
        &self,
        entry: &Used<'_>,
        usage: &Usage,
        rating: &Rating,
        contract: InForce<'_>,
        correcting: bool,
    ) -> Result<(bool, Option<(CounterKey, Decimal)>), String> {
        let want_book = contract.map_or(LIST_BOOK, |(_, c, _)| c.book.as_str());
        if rating.book != want_book {
            return Err(match contract {
                Some((node, _, at)) => format!(
                    "rating.book: the contract of {node} (entry {at}) names book {want_book:?}, the entry has {:?}",
                    rating.book
                ),
                None => format!(
                    "rating.book: no contract on the path, so book {LIST_BOOK:?} prices it, the entry has {:?}",
                    rating.book
                ),
            });
        }
        if rating.contract.as_ref() != contract.map(|(node, _, _)| node) {
            let named = rating
                .contract
                .as_ref()
                .map_or("none".to_string(), |n| n.to_string());
            return Err(match contract {
                Some((node, _, at)) => format!(
                    "rating.contract: the contract in force on the path is that of {node} (entry {at}), the entry names {named}"
                ),
                None => format!(
                    "rating.contract: no contract is in force on the path, the entry names {named}"
                ),
            });
        }
        // Named only in failures: no allocation per entry on the way through.
        let id = || format!("{}@{}", rating.book, rating.version);
        let Some(recorded) = self
            .books
            .get(&rating.book)
            .and_then(|v| v.get(&rating.version))
        else {
            return Err(format!(
                "rating: book {} is not recorded by any price.book before this entry",
                id()
            ));
        };
        let book = &recorded.book;
        if book.effective_from > entry.ts {
            return Err(format!(
                "rating: book {} (entry {}) takes effect at {}, after the entry's time {}",
                id(),
                recorded.entry,
                book.effective_from,
                entry.ts
            ));
        }
        // Priced as appended: with the version in force at the entry's time among
        // those recorded before it (versions take effect in order), not an older one
        // (a correction names the version it re-rates with).
        if !correcting
            && let Some((_, latest)) = self
                .books
                .get(&rating.book)
                .and_then(|v| v.iter().rfind(|(_, b)| b.book.effective_from <= entry.ts))
            && latest.book.version != rating.version
        {
            return Err(format!(
                "rating: book {} is not the version in force at {}: {}@{} (entry {}) is; rated before the server applied it?",
                id(),
                entry.ts,
                rating.book,
                latest.book.version,
                latest.entry
            ));
        }
        let (tokens, as_recorded) = priced_tokens(usage, rating)?;
        let input = RateInput {
            model: usage.model.as_deref(),
            service: &usage.service,
            // The tier the entry says it was served at (absent: standard).
            tier: usage.tier.unwrap_or_default(),
            tokens: &tokens,
            measures: &usage.measures,
            at: entry.ts,
            // Where the server placed the entry's tiered units, checked below against
            // the units counted before it.
            period_to_date: rating.place.as_ref().map_or(Decimal::ZERO, |p| p.before),
        };
        let book = self.subset(book, usage.model.as_deref(), &usage.service);
        let contract = contract.map(|(node, c, _)| (node, c));
        ciyuan_price::verify_rating(&book, contract, &input, rating)
            .map_err(|m| format!("rating.{m} (book {}, entry {})", id(), recorded.entry))?;
        let counter = ciyuan_price::tier_counter_naive(&book, contract, &input)
            .map_err(|e| format!("rating: {e}"))?;
        let counter = self.judge_place(entry, rating, counter, correcting)?;
        Ok((as_recorded, counter))
    }
}

/// The counts a rating priced: the entry's own, unless its basis is `recount` or
/// `greater` and it carries a recount; then the quantities of the rating's token lines
/// as recorded (the second value is true). A key the rating lists as `missing` has no
/// line: it takes the entry's own count (1 when that is not positive), which only
/// matters for context thresholds and tiers.
fn priced_tokens<'a>(
    usage: &'a Usage,
    rating: &Rating,
) -> Result<(std::borrow::Cow<'a, TokenMap>, bool), String> {
    let recounted = usage.recount.is_some()
        && matches!(
            rating.basis,
            Some(RatingBasis::Recount | RatingBasis::Greater)
        );
    if !recounted {
        return Ok((std::borrow::Cow::Borrowed(&usage.tokens), false));
    }
    let mut tokens = TokenMap::new();
    for (i, line) in rating.lines.iter().enumerate() {
        let PriceKey::Tokens(m, d) = &line.key else {
            continue;
        };
        let q = line.quantity;
        let whole = (q.fract().is_zero() && !q.is_sign_negative())
            .then(|| i64::try_from(q).ok())
            .flatten();
        let Some(n) = whole else {
            return Err(format!(
                "rating.lines[{i}].quantity: {q} is not a whole, non-negative token count"
            ));
        };
        tokens.add(*m, *d, n).ok_or_else(|| {
            format!("rating.lines[{i}].quantity: {q} overflows the count of {m}.{d}")
        })?;
    }
    for key in &rating.missing {
        let PriceKey::Tokens(m, d) = key else {
            continue;
        };
        let own = usage
            .tokens
            .iter()
            .find(|t| t.modality == *m && t.direction == *d)
            .map_or(0, |t| t.count);
        tokens
            .add(*m, *d, own.max(1))
            .ok_or_else(|| format!("rating.missing: {key} overflows"))?;
    }
    Ok((std::borrow::Cow::Owned(tokens), true))
}

/// Entries decoded per message from the reading thread to the judging one.
const DECODE_CHUNK_ENTRIES: usize = 1024;
/// Chunks in flight between the two: with entries of at most 16 MiB (most are a few
/// hundred bytes) memory stays bounded.
const DECODE_CHUNKS_IN_FLIGHT: usize = 4;

type Decoded = Vec<(u64, Result<Entry, DecodeError>)>;

/// Checks the rules over the first `entries` entries of a verified ledger directory or
/// bundle, streaming them: one thread reads and decodes (most of the work), the
/// caller's judges in order.
pub fn check_path(path: &Path, entries: u64) -> Result<RulesReport, RuleFailure> {
    let mut checker = RuleChecker::new();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(DECODE_CHUNKS_IN_FLIGHT);
        let reader = scope.spawn(move || {
            let mut chunk = Vec::with_capacity(DECODE_CHUNK_ENTRIES);
            let gone = || RuleFailure {
                entry: None,
                what: "the rules stopped reading".into(),
            };
            ciyuan_ledger::for_each_entry::<RuleFailure>(path, entries, |i, b| {
                chunk.push((i, Entry::decode(b)));
                if chunk.len() == DECODE_CHUNK_ENTRIES {
                    let full =
                        std::mem::replace(&mut chunk, Vec::with_capacity(DECODE_CHUNK_ENTRIES));
                    tx.send(full).map_err(|_| gone())?;
                }
                Ok(())
            })?;
            if !chunk.is_empty() {
                tx.send(chunk).map_err(|_| gone())?;
            }
            Ok::<(), RuleFailure>(())
        });
        let judged = (|| {
            for chunk in &rx {
                for (i, e) in chunk {
                    checker.check_decoded(i, e)?;
                }
            }
            Ok::<(), RuleFailure>(())
        })();
        // On a failure here the reader must not wait on a full channel.
        drop(rx);
        let read = reader.join().map_err(|_| RuleFailure {
            entry: None,
            what: "the thread reading the entries panicked".into(),
        })?;
        // The judge's failure names an entry; the reader's, when the judge found
        // none, names a file.
        judged?;
        read
    })?;
    check_corrected(path, entries, &checker.corrected)?;
    check_evaluations(path, entries, &checker.evaluated)?;
    let mut report = checker.report().clone();
    report.service_levels = checker.evaluated.len() as u64;
    // Every entry the bytes vouched for was judged.
    assert_eq!(
        report.entries, entries,
        "the rules judged {} of {entries} entries",
        report.entries
    );
    Ok(report)
}

/// Reads the log again, only when service levels were evaluated, and recomputes each
/// evaluation from the requests in the range it read.
fn check_evaluations(
    path: &Path,
    entries: u64,
    evaluated: &[(u64, AccountPath, ServiceLevelEvaluated)],
) -> Result<(), RuleFailure> {
    let Some(end) = evaluated.iter().map(|(_, _, e)| e.scanned.1).max() else {
        return Ok(());
    };
    // Per evaluation: the requests it covers, and the first and last of their entries.
    type Covered = (Vec<ciyuan_core::Sample>, Option<(u64, u64)>);
    let mut samples: Vec<Covered> = vec![(Vec::new(), None); evaluated.len()];
    ciyuan_ledger::for_each_entry::<RuleFailure>(path, entries.min(end), |i, bytes| {
        let hit: Vec<usize> = evaluated
            .iter()
            .enumerate()
            .filter(|(_, (_, _, e))| (e.scanned.0..e.scanned.1).contains(&i))
            .map(|(k, _)| k)
            .collect();
        if hit.is_empty() {
            return Ok(());
        }
        let e = Entry::decode(bytes).map_err(|x| RuleFailure {
            entry: Some(i),
            what: format!("does not decode: {x}"),
        })?;
        let EntryBody::Usage(u) = &e.body else {
            return Ok(());
        };
        for k in hit {
            let (_, node, ev) = &evaluated[k];
            if e.ts >= ev.from
                && e.ts < ev.to
                && e.account.is_within(node)
                && ciyuan_core::covered(node, &ev.level, u)
                && let Some(s) = ciyuan_core::Sample::of(u)
            {
                samples[k].0.push(s);
                let r = samples[k].1.get_or_insert((i, i));
                r.1 = i;
            }
        }
        Ok(())
    })?;
    for ((index, node, ev), (s, range)) in evaluated.iter().zip(samples) {
        let fail = |what: String| RuleFailure {
            entry: Some(*index),
            what: format!("service_level.evaluated on {node}: {what}"),
        };
        if ev.entries != range {
            return Err(fail(format!(
                "entries: {:?} is not the range of the requests it covers ({range:?})",
                ev.entries
            )));
        }
        ev.check_against(&s).map_err(fail)?;
    }
    Ok(())
}

/// Reads the log again for the entries corrections name (only when there are any):
/// each must be a usage entry of the node and time the corrections say, whose body is
/// their copy. Held in memory are the corrections' copies, never the log.
fn check_corrected(
    path: &Path,
    entries: u64,
    corrected: &BTreeMap<u64, Corrected>,
) -> Result<(), RuleFailure> {
    let Some(last) = corrected.keys().next_back() else {
        return Ok(());
    };
    let fail = |i: u64, c: &Corrected, what: String| RuleFailure {
        entry: Some(c.by),
        what: format!("rating.correction on {}: entry {i} {what}", c.account),
    };
    ciyuan_ledger::for_each_entry::<RuleFailure>(path, entries.min(last + 1), |i, bytes| {
        let Some(c) = corrected.get(&i) else {
            return Ok(());
        };
        let e = Entry::decode(bytes).map_err(|e| fail(i, c, format!("does not decode: {e}")))?;
        let EntryBody::Usage(u) = &e.body else {
            return Err(fail(i, c, format!("is a {}, not usage", e.body.kind())));
        };
        if e.account != c.account || e.ts != c.at {
            return Err(fail(
                i,
                c,
                format!(
                    "is usage of {} at {}, not of {} at {}",
                    e.account, e.ts, c.account, c.at
                ),
            ));
        }
        if *u != *c.usage {
            return Err(fail(
                i,
                c,
                "differs from the copy the correction re-rated".into(),
            ));
        }
        Ok(())
    })
}

/// Everything `ciyuan audit verify` checks of `target` (a ledger directory or a
/// bundle): the bytes first ([`ciyuan_ledger::verify_path`]), then the rules over the
/// entries the bytes vouched for. A failure of the bytes names no entry index (its
/// text names the file, and the entry where there is one).
pub fn verify(target: &Path) -> Result<(VerifyReport, RulesReport), RuleFailure> {
    let report = ciyuan_ledger::verify_path(target)?;
    let rules = check_path(target, report.entries)?;
    Ok((report, rules))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use ciyuan_core::ServiceTier;
    use ciyuan_core::{
        AccountInfo, Currency, Direction, Grant, LedgerAccount, Leg, Modality, Posting,
        PostingKind, PriceRule, Recount, Rounding, RoundingMode, UnitPrices,
    };
    use ciyuan_ledger::{Ledger, LedgerOptions};
    use ciyuan_price::Rater;
    use proptest::prelude::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn node(s: &str) -> AccountPath {
        s.parse().unwrap()
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }

    fn usd() -> Currency {
        "USD".parse().unwrap()
    }

    fn bytes(ts: &str, account: &str, body: EntryBody) -> Vec<u8> {
        Entry::new(at(ts), node(account), body).encode()
    }

    fn prices(pairs: &[(&str, &str)]) -> UnitPrices {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), d(v)))
            .collect()
    }

    fn book(name: &str, version: u32, from: &str, input: &str, output: &str) -> PriceBook {
        PriceBook {
            tax: None,
            name: name.into(),
            version,
            currency: usd(),
            effective_from: at(from),
            rounding: Rounding::default(),
            source: None,
            set_by: Some(AccountPath::root()),
            rules: vec![
                PriceRule {
                    model: Some("gpt-4o*".into()),
                    unit_prices: prices(&[("text.input", input), ("text.output", output)]),
                    ..PriceRule::default()
                },
                PriceRule {
                    service: Some("doc.verify".into()),
                    unit_prices: prices(&[("measure.pages", "0.002")]),
                    per_request: Some(d("0.01")),
                    ..PriceRule::default()
                },
            ],
        }
    }

    fn list_v1() -> PriceBook {
        book("list", 1, "2026-01-01T00:00:00Z", "0.0000025", "0.00001")
    }

    fn tokens(input: i64, output: i64) -> TokenMap {
        let mut t = TokenMap::new();
        t.add(Modality::Text, Direction::Input, input).unwrap();
        t.add(Modality::Text, Direction::Output, output).unwrap();
        t
    }

    /// A chat usage entry rated by the real rater, as the server rates it.
    fn rated_chat(
        book: &PriceBook,
        contract: Option<(&AccountPath, &PriceContract)>,
        ts: &str,
        input: i64,
        output: i64,
    ) -> Usage {
        let mut u = Usage {
            service: "llm.chat".into(),
            model: Some("gpt-4o".into()),
            tokens: tokens(input, output),
            source: Some("gateway".into()),
            definition: Some("gateway.openai@1".into()),
            ..Usage::default()
        };
        let rating = Rater::new(book, contract)
            .unwrap()
            .rate(&RateInput {
                model: u.model.as_deref(),
                service: &u.service,
                tier: ServiceTier::Standard,
                tokens: &u.tokens,
                measures: &u.measures,
                at: at(ts),
                period_to_date: Decimal::ZERO,
            })
            .unwrap();
        u.rating = Some(Box::new(rating));
        u
    }

    fn definition(version: u32, from: &str, expr: &str) -> TokenDefinition {
        TokenDefinition {
            service: "doc.verify".into(),
            version,
            effective_from: at(from),
            description: None,
            tokens: [("other.input".to_string(), expr.to_string())].into(),
            set_by: Some(AccountPath::root()),
        }
    }

    fn doc_usage(version: u32, pages: i64) -> Usage {
        let mut t = TokenMap::new();
        t.add(Modality::Other, Direction::Input, pages * 500)
            .unwrap();
        Usage {
            service: "doc.verify".into(),
            tokens: t,
            source: Some("svc://docs".into()),
            event_id: Some(format!("ev-{version}-{pages}")),
            definition: Some(format!("doc.verify@{version}").into()),
            measures: [("pages".to_string(), serde_json::json!(pages))].into(),
            ..Usage::default()
        }
    }

    fn topup(account: &str, amount: &str) -> Posting {
        Posting {
            kind: PostingKind::Topup,
            currency: usd(),
            legs: vec![
                Leg::debit(LedgerAccount::Payments, d(amount)),
                Leg::credit(LedgerAccount::Cash(node(account)), d(amount)),
            ],
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: Some(AccountPath::root()),
        }
    }

    fn consume(account: &str, usage_entry: u64, amount: &str) -> Posting {
        Posting {
            kind: PostingKind::Consume,
            currency: usd(),
            legs: vec![
                Leg::debit(LedgerAccount::Cash(node(account)), d(amount)),
                Leg::credit(LedgerAccount::Revenue, d(amount)),
            ],
            memo: String::new(),
            usage_entry: Some(usage_entry),
            grant: None,
            set_by: None,
        }
    }

    /// A log that keeps every rule: a book, a definition, rated and defined usage,
    /// a top-up and the consumption that settles the rated entry.
    fn good_log() -> Vec<Vec<u8>> {
        let b = list_v1();
        vec![
            bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b.clone())),
            bytes(
                "2026-01-01T00:00:00Z",
                "/",
                EntryBody::DefinitionSet(definition(1, "2026-01-01T00:00:00Z", "pages * 500")),
            ),
            bytes(
                "2026-01-02T00:00:00Z",
                "acme/cn",
                EntryBody::Posting(topup("acme/cn", "100")),
            ),
            bytes(
                "2026-02-01T00:00:00Z",
                "acme/cn",
                EntryBody::Usage(rated_chat(
                    &b,
                    None,
                    "2026-02-01T00:00:00Z",
                    1_000_000,
                    200_000,
                )),
            ),
            bytes(
                "2026-02-01T00:00:01Z",
                "acme/cn",
                EntryBody::Posting(consume("acme/cn", 3, "4.5")),
            ),
            bytes(
                "2026-02-02T00:00:00Z",
                "acme/cn",
                EntryBody::Usage(doc_usage(1, 3)),
            ),
        ]
    }

    fn run(entries: &[Vec<u8>]) -> Result<RulesReport, RuleFailure> {
        let mut c = RuleChecker::new();
        for (i, e) in entries.iter().enumerate() {
            c.check(i as u64, e)?;
        }
        Ok(c.report().clone())
    }

    /// Writes `entries` with the real ledger writer (hashed, signed checkpoint).
    fn write_ledger(dir: &Path, entries: &[Vec<u8>]) {
        let mut ledger = Ledger::open(dir, LedgerOptions::default()).unwrap();
        ledger.append_batch(entries).unwrap();
        ledger.checkpoint().unwrap();
    }

    /// The entries of `log` with entry `i`'s usage rating changed by `change`.
    fn with_rating(log: &[Vec<u8>], i: usize, change: impl FnOnce(&mut Rating)) -> Vec<Vec<u8>> {
        let mut out = log.to_vec();
        let mut e = Entry::decode(&out[i]).unwrap();
        let EntryBody::Usage(u) = &mut e.body else {
            panic!("entry {i} is not usage")
        };
        change(u.rating.as_mut().unwrap());
        out[i] = e.encode();
        out
    }

    #[test]
    fn a_ledger_that_keeps_the_rules_verifies_as_a_directory_and_as_a_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let log = good_log();
        write_ledger(&dir, &log);
        let (bytes_report, rules) = verify(&dir).unwrap();
        assert_eq!(bytes_report.entries, 6);
        let want = RulesReport {
            entries: 6,
            postings: 2,
            rated: 1,
            rated_basis_as_recorded: 0,
            defined: 1,
            books: 1,
            contracts: 0,
            definitions: 1,
            corrections: 0,
            placed: 0,
            service_levels: 0,
        };
        assert_eq!(rules, want);

        let bundle = tmp.path().join("bundle");
        let ledger = Ledger::open(&dir, LedgerOptions::default()).unwrap();
        ciyuan_ledger::export_bundle(&ledger.reader(), &bundle).unwrap();
        drop(ledger);
        assert_eq!(verify(&bundle).unwrap().1, want);
    }

    #[test]
    fn a_changed_amount_or_unit_price_is_caught_though_the_bytes_verify() {
        let log = good_log();
        type Change = Box<dyn Fn(&mut Rating)>;
        let cases: [(&str, Change); 3] = [
            (
                "rating.amount: the book gives 4.50",
                Box::new(|r: &mut Rating| r.amount = d("4.49")),
            ),
            (
                "rating.lines[0].unit_price: the book gives 0.0000025, the entry has 0.0000024",
                Box::new(|r: &mut Rating| r.lines[0].unit_price = d("0.0000024")),
            ),
            (
                // The line's amount follows its (changed) price, and the total follows
                // the lines: only the price departs from the book.
                "rating.lines[1].unit_price: the book gives 0.00001, the entry has 0.00002",
                Box::new(|r: &mut Rating| {
                    r.lines[1].unit_price = d("0.00002");
                    r.lines[1].amount = d("4");
                    r.amount = d("6.5");
                }),
            ),
        ];
        for (want, change) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("ledger");
            write_ledger(&dir, &with_rating(&log, 3, change));
            ciyuan_ledger::verify_path(&dir).expect("the bytes are valid");
            let err = verify(&dir).unwrap_err();
            assert_eq!(err.entry, Some(3), "{err}");
            assert!(
                err.to_string().starts_with("entry 3: usage on acme/cn: "),
                "{err}"
            );
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn an_early_failure_in_a_long_log_stops_the_reader_and_is_the_one_reported() {
        // Far more entries than the channel holds: the reader is blocked on a full
        // channel when the judge fails, and must be released.
        let mut log = good_log();
        let spare = log[5].clone();
        log.resize(6 + 40 * DECODE_CHUNK_ENTRIES, spare);
        let mut p = topup("acme/cn", "100");
        p.legs[0].debit = d("100.5");
        log[2] = bytes("2026-01-02T00:00:00Z", "acme/cn", EntryBody::Posting(p));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        write_ledger(&dir, &log);
        let err = verify(&dir).unwrap_err();
        assert_eq!(err.entry, Some(2), "{err}");
        // And the whole log, judged, counts every defined entry.
        log[2] = bytes(
            "2026-01-02T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(topup("acme/cn", "100")),
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        write_ledger(&dir, &log);
        let (_, rules) = verify(&dir).unwrap();
        assert_eq!(rules.entries, log.len() as u64);
        assert_eq!(rules.defined, (log.len() - 5) as u64);
    }

    /// The good log, then version 2 of the list book correcting version 1 from its
    /// start (input at 0.000002), and the correction of entry 3 it gives.
    fn corrected_log() -> (Vec<Vec<u8>>, RatingCorrection) {
        let mut log = good_log();
        let v2 = book("list", 2, "2026-01-01T00:00:00Z", "0.000002", "0.00001");
        log.push(bytes(
            "2026-03-01T00:00:00Z",
            "/",
            EntryBody::PriceBook(v2.clone()),
        ));
        let EntryBody::Usage(original) = Entry::decode(&log[3]).unwrap().body else {
            unreachable!()
        };
        let now = rated_chat(&v2, None, "2026-02-01T00:00:00Z", 1_000_000, 200_000);
        let c = RatingCorrection {
            entry: 3,
            at: at("2026-02-01T00:00:00Z"),
            previous: original.rating.clone().unwrap(),
            rating: now.rating.unwrap(),
            usage: Box::new(original),
        };
        assert_eq!(c.previous.amount, d("4.5"));
        assert_eq!(c.rating.amount, d("4.0"));
        assert_eq!(c.changes().collect::<Vec<_>>(), vec![(usd(), d("-0.5"))]);
        log.push(bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(c.clone()),
        ));
        (log, c)
    }

    #[test]
    fn a_correction_follows_the_version_now_in_force_and_names_its_entry_faithfully() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, c) = corrected_log();
        let dir = tmp.path().join("ok");
        write_ledger(&dir, &log);
        let rules = verify(&dir).unwrap().1;
        assert_eq!(rules.corrections, 1);
        assert_eq!(rules.rated, 2);

        // A second correction must start from the first's rating.
        let mut again = log.clone();
        let mut c2 = c.clone();
        c2.previous = c.previous.clone();
        again.push(bytes(
            "2026-03-02T00:00:00Z",
            "acme/cn",
            EntryBody::RatingCorrection(c2),
        ));
        let e = run(&again).unwrap_err();
        assert_eq!(e.entry, Some(8));
        assert!(
            e.what
                .contains("stands at the rating of correction entry 7"),
            "{e}"
        );

        // A flipped amount in the correction's rating.
        let mut flipped = c.clone();
        flipped.rating.amount = d("3.9");
        let mut bad = log.clone();
        bad[7] = bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(flipped),
        );
        let e = run(&bad).unwrap_err();
        assert_eq!(e.entry, Some(7));
        assert!(
            e.what.starts_with("rating.correction on acme/cn: rating."),
            "{e}"
        );

        // A correction rated with the old version is not what the book says now...
        // but still follows a book version in force at the time: only a wrong amount
        // for the version it names fails. Starting from another rating fails.
        let mut wrong_previous = c.clone();
        wrong_previous.previous.amount = d("5");
        bad[7] = bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(wrong_previous),
        );
        let e = run(&bad).unwrap_err();
        assert!(e.what.contains("another rating"), "{e}");

        // A copy of the usage that is not the entry's: caught by the second reading.
        let mut forged = c.clone();
        let mut usage = (*forged.usage).clone();
        usage.tokens = tokens(10, 2);
        let rated = rated_chat(
            &book("list", 2, "2026-01-01T00:00:00Z", "0.000002", "0.00001"),
            None,
            "2026-02-01T00:00:00Z",
            10,
            2,
        );
        usage.rating = forged.usage.rating.clone();
        forged.usage = Box::new(usage);
        forged.rating = rated.rating.unwrap();
        bad[7] = bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(forged),
        );
        assert!(run(&bad).is_ok(), "alone, the correction is consistent");
        let dir = tmp.path().join("forged");
        write_ledger(&dir, &bad);
        let e = verify(&dir).unwrap_err();
        assert_eq!(e.entry, Some(7));
        assert!(
            e.what
                .contains("entry 3 differs from the copy the correction re-rated"),
            "{e}"
        );

        // Naming an entry that is not usage, or a later one.
        let mut not_usage = c.clone();
        not_usage.entry = 2;
        bad[7] = bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(not_usage),
        );
        let dir = tmp.path().join("not-usage");
        write_ledger(&dir, &bad);
        let e = verify(&dir).unwrap_err();
        assert!(e.what.contains("entry 2 is a posting, not usage"), "{e}");
        let mut later = c;
        later.entry = 9;
        bad[7] = bytes(
            "2026-03-01T00:00:01Z",
            "acme/cn",
            EntryBody::RatingCorrection(later),
        );
        assert!(run(&bad).unwrap_err().what.contains("is not before"));
    }

    /// A book whose `gpt-4o` rule prices text input in graduated monthly tiers: the
    /// first 1,000,000 input tokens of a month at 0.000002, the rest at 0.000001.
    fn tiered_book() -> PriceBook {
        let mut b = list_v1();
        b.rules[0].tiers = Some(ciyuan_core::Tiers {
            kind: ciyuan_core::TierKind::Graduated,
            period: ciyuan_core::TierPeriod::Month,
            key: ciyuan_core::TierKey::Key("text.input".parse().unwrap()),
            bands: vec![
                ciyuan_core::Band {
                    up_to: Some(1_000_000),
                    unit_prices: prices(&[("text.input", "0.000002")]),
                },
                ciyuan_core::Band {
                    up_to: None,
                    unit_prices: prices(&[("text.input", "0.000001")]),
                },
            ],
        });
        b
    }

    /// A chat entry rated by `book` placed on acme's counter after `before` units of
    /// the month starting at `period`.
    fn placed_chat(book: &PriceBook, ts: &str, input: i64, before: &str, period: &str) -> Usage {
        let mut u = rated_chat(book, None, ts, input, 0);
        let rating = Rater::new(book, None)
            .unwrap()
            .rate(&RateInput {
                model: u.model.as_deref(),
                service: &u.service,
                tier: ServiceTier::Standard,
                tokens: &u.tokens,
                measures: &u.measures,
                at: at(ts),
                period_to_date: d(before),
            })
            .unwrap();
        let mut rating = Box::new(rating);
        rating.place = Some(ciyuan_core::TierPlace {
            node: node("acme"),
            rule: "gpt-4o*||standard".into(),
            period: at(period),
            before: d(before),
            units: Decimal::from(input),
        });
        u.rating = Some(rating);
        u
    }

    #[test]
    fn tiered_entries_follow_the_units_counted_before_them_in_their_period() {
        let b = tiered_book();
        let shanghai = AccountInfo {
            time_zone: Some("Asia/Shanghai".into()),
            ..AccountInfo::default()
        };
        // November in Shanghai starts at 16:00 UTC on 31 October.
        let nov = "2026-10-31T16:00:00Z";
        let dec = "2026-11-30T16:00:00Z";
        let log = vec![
            bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b.clone())),
            bytes(
                "2026-01-01T00:00:00Z",
                "acme",
                EntryBody::AccountCreated(shanghai),
            ),
            bytes(
                "2026-11-02T00:00:00Z",
                "acme/cn",
                EntryBody::Usage(placed_chat(&b, "2026-11-02T00:00:00Z", 600_000, "0", nov)),
            ),
            // Crosses the band: 400,000 at 0.000002 and 200,000 at 0.000001.
            bytes(
                "2026-11-03T00:00:00Z",
                "acme/us",
                EntryBody::Usage(placed_chat(
                    &b,
                    "2026-11-03T00:00:00Z",
                    600_000,
                    "600000",
                    nov,
                )),
            ),
            // 1 December in Shanghai: a new period.
            bytes(
                "2026-11-30T17:00:00Z",
                "acme/cn",
                EntryBody::Usage(placed_chat(&b, "2026-11-30T17:00:00Z", 10, "0", dec)),
            ),
        ];
        let EntryBody::Usage(u) = Entry::decode(&log[3]).unwrap().body else {
            unreachable!()
        };
        assert_eq!(u.rating.unwrap().amount, d("1.0"));
        let report = run(&log).unwrap();
        assert_eq!(report.placed, 3);

        // The second entry placed as if it came first.
        let mut bad = log.clone();
        bad[3] = bytes(
            "2026-11-03T00:00:00Z",
            "acme/us",
            EntryBody::Usage(placed_chat(&b, "2026-11-03T00:00:00Z", 600_000, "0", nov)),
        );
        let e = run(&bad).unwrap_err();
        assert_eq!(e.entry, Some(3));
        assert!(
            e.what
                .contains("rating.place.before: 600000 units were counted"),
            "{e}"
        );
        // The December entry filed under November.
        let mut bad = log.clone();
        bad[4] = bytes(
            "2026-11-30T17:00:00Z",
            "acme/cn",
            EntryBody::Usage(placed_chat(&b, "2026-11-30T17:00:00Z", 10, "1200000", nov)),
        );
        let e = run(&bad).unwrap_err();
        assert!(e.what.contains("rating.place.period"), "{e}");
        // Rated from the first band with no place at all.
        let mut bad = log.clone();
        bad[3] = bytes(
            "2026-11-03T00:00:00Z",
            "acme/us",
            EntryBody::Usage(rated_chat(&b, None, "2026-11-03T00:00:00Z", 600_000, 0)),
        );
        let e = run(&bad).unwrap_err();
        assert!(e.what.contains("rating.place: missing"), "{e}");
        // A place whose price is not the band's.
        let mut bad = log;
        let mut u = placed_chat(&b, "2026-11-03T00:00:00Z", 600_000, "600000", nov);
        u.rating.as_mut().unwrap().place.as_mut().unwrap().before = d("0");
        bad[3] = bytes("2026-11-03T00:00:00Z", "acme/us", EntryBody::Usage(u));
        let e = run(&bad).unwrap_err();
        assert!(e.what.contains("rating."), "{e}");
    }

    #[test]
    fn a_report_delivery_is_accepted_and_one_with_a_bad_hash_or_period_is_not() {
        let good = ciyuan_core::ReportDelivered {
            name: "daily".into(),
            period: "2026-11-05".into(),
            period_start: "2026-11-04T16:00:00Z".parse().unwrap(),
            period_end: "2026-11-05T16:00:00Z".parse().unwrap(),
            time_zone: "Asia/Shanghai".into(),
            format: "csv".into(),
            sha256: ciyuan_core::ReportDelivered::hash(b"bytes"),
            bytes: 5,
            destination: "/srv/reports/daily_2026-11-05.csv".into(),
            secret_sha256: None,
            manual: false,
        };
        let mut log = good_log();
        log.push(bytes(
            "2026-11-05T16:01:00Z",
            "acme",
            EntryBody::ReportDelivered(good.clone()),
        ));
        assert!(run(&log).is_ok());
        let mut bad = good.clone();
        bad.sha256 = "x".into();
        let last = log.len() - 1;
        log[last] = bytes(
            "2026-11-05T16:01:00Z",
            "acme",
            EntryBody::ReportDelivered(bad),
        );
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(last as u64), "{err}");
        assert!(err.to_string().contains("sha256"), "{err}");
        let mut empty = good;
        empty.period_end = empty.period_start;
        log[last] = bytes(
            "2026-11-05T16:01:00Z",
            "acme",
            EntryBody::ReportDelivered(empty),
        );
        assert!(run(&log).unwrap_err().to_string().contains("period_start"));
    }

    #[test]
    fn an_unbalanced_posting_fails() {
        let mut log = good_log();
        let mut p = topup("acme/cn", "100");
        p.legs[1].credit = d("99.99");
        log[2] = bytes("2026-01-02T00:00:00Z", "acme/cn", EntryBody::Posting(p));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        write_ledger(&dir, &log);
        let err = verify(&dir).unwrap_err();
        assert_eq!(err.entry, Some(2), "{err}");
        assert!(err.to_string().contains("posting on acme/cn"), "{err}");
        assert!(err.to_string().contains("100"), "{err}");
        assert!(err.to_string().contains("99.99"), "{err}");
    }

    #[test]
    fn a_definition_named_before_it_was_recorded_fails() {
        let mut log = good_log();
        // doc.verify@2 is used, and only recorded after.
        log[5] = bytes(
            "2026-03-02T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(doc_usage(2, 3)),
        );
        log.push(bytes(
            "2026-03-03T00:00:00Z",
            "/",
            EntryBody::DefinitionSet(definition(2, "2026-03-01T00:00:00Z", "pages * 500")),
        ));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        write_ledger(&dir, &log);
        let err = verify(&dir).unwrap_err();
        assert_eq!(err.entry, Some(5), "{err}");
        assert!(
            err.to_string()
                .contains("doc.verify@2 is not recorded by any definition.set before this entry (versions recorded: 1)"),
            "{err}"
        );
        // Recorded first, the same log verifies.
        log.swap(5, 6);
        assert_eq!(run(&log).unwrap().defined, 1);
    }

    #[test]
    fn a_definition_not_in_force_at_the_entrys_time_fails() {
        let mut log = good_log();
        log.insert(
            1,
            bytes(
                "2026-01-01T00:00:00Z",
                "/",
                EntryBody::DefinitionSet(definition(2, "2026-02-01T00:00:00Z", "pages * 400")),
            ),
        );
        // Entry 6 (doc.verify@1, on 2026-02-02) now falls in version 2's time.
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(6), "{err}");
        assert!(
            err.what.contains("doc.verify@1 was not in force at 2026-02-02T00:00:00Z; doc.verify@2 (from 2026-02-01T00:00:00Z, entry 1) was"),
            "{err}"
        );
        // Version 2 was recorded first here, so no measurement could have missed it.
        assert!(
            !err.what.contains("measured before the server applied it"),
            "{err}"
        );
        // Before version 2 takes effect, version 1 is the one.
        let mut early = log.clone();
        early[6] = bytes(
            "2026-01-20T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(doc_usage(1, 3)),
        );
        assert_eq!(run(&early).unwrap().defined, 1);
        // Before any version, none is.
        early[6] = bytes(
            "2025-12-20T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(doc_usage(1, 3)),
        );
        assert!(
            run(&early)
                .unwrap_err()
                .what
                .contains("none of doc.verify was in force")
        );
    }

    #[test]
    fn an_entry_measured_just_before_a_new_definition_was_applied_is_refused_and_explained() {
        let mut log = good_log();
        // Version 2 (in force from noon on 2026-02-01) is recorded just before the
        // usage of 2026-02-02 that names version 1: the server measured that usage
        // before it applied version 2.
        log.insert(
            5,
            bytes(
                "2026-02-02T00:00:00Z",
                "/",
                EntryBody::DefinitionSet(definition(2, "2026-02-01T12:00:00Z", "pages * 400")),
            ),
        );
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(6));
        assert!(
            err.what.ends_with(
                "; doc.verify@1 was in force before entry 5 was recorded: measured before the server applied it?"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_definition_of_another_service_or_malformed_fails_and_built_ins_pass() {
        let log = good_log();
        let mut bad = log.clone();
        let mut u = doc_usage(1, 3);
        u.service = "face.match".into();
        bad[5] = bytes("2026-02-02T00:00:00Z", "acme/cn", EntryBody::Usage(u));
        let err = run(&bad).unwrap_err();
        assert!(
            err.what.contains(
                "doc.verify@1 is a definition of doc.verify, the entry's service is face.match"
            ),
            "{err}"
        );
        let mut u = doc_usage(1, 3);
        u.definition = Some("doc.verify".into());
        bad[5] = bytes("2026-02-02T00:00:00Z", "acme/cn", EntryBody::Usage(u));
        assert!(
            run(&bad)
                .unwrap_err()
                .what
                .contains("\"doc.verify\" is not service@version")
        );
        // The gateway's and llm.usage's definitions are built in.
        for id in BUILT_IN_DEFINITIONS {
            let mut u = doc_usage(1, 3);
            u.service = "llm.chat".into();
            u.definition = Some(id.into());
            bad[5] = bytes("2026-02-02T00:00:00Z", "acme/cn", EntryBody::Usage(u));
            assert_eq!(run(&bad).unwrap().defined, 0, "{id}");
        }
    }

    #[test]
    fn tokens_that_do_not_follow_the_definition_fail() {
        let mut log = good_log();
        let mut u = doc_usage(1, 3);
        u.tokens = TokenMap::new();
        u.tokens
            .add(Modality::Other, Direction::Input, 1501)
            .unwrap();
        log[5] = bytes("2026-02-02T00:00:00Z", "acme/cn", EntryBody::Usage(u));
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(5));
        assert!(
            err.what.contains(
                "tokens: doc.verify@1 gives other.input = 1500 for the entry's measures, the entry has other.input = 1501"
            ),
            "{err}"
        );
        // Measures the definition cannot read are named.
        let mut u = doc_usage(1, 3);
        u.measures = [("sheets".to_string(), serde_json::json!(3))].into();
        log[5] = bytes("2026-02-02T00:00:00Z", "acme/cn", EntryBody::Usage(u));
        let err = run(&log).unwrap_err();
        assert!(
            err.what
                .contains("measures: re-measuring with doc.verify@1"),
            "{err}"
        );
        assert!(err.what.contains("pages"), "{err}");
        // A version that does not compile with those recorded before is refused.
        let mut bad = good_log();
        bad.push(bytes(
            "2026-02-03T00:00:00Z",
            "/",
            EntryBody::DefinitionSet(definition(2, "2025-06-01T00:00:00Z", "pages * 400")),
        ));
        let err = run(&bad).unwrap_err();
        assert_eq!(err.entry, Some(6));
        assert!(
            err.what
                .contains("versions must increase with effective_from"),
            "{err}"
        );
    }

    #[test]
    fn two_definitions_of_one_version_must_agree() {
        let mut log = good_log();
        // The same declaration again (another key declared it) changes nothing.
        let mut again = definition(1, "2026-01-01T00:00:00Z", "pages * 500");
        again.set_by = Some(node("acme"));
        log.push(bytes(
            "2026-02-03T00:00:00Z",
            "/",
            EntryBody::DefinitionSet(again),
        ));
        assert_eq!(run(&log).unwrap().definitions, 1);
        log.push(bytes(
            "2026-02-04T00:00:00Z",
            "/",
            EntryBody::DefinitionSet(definition(1, "2026-01-01T00:00:00Z", "pages * 501")),
        ));
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(7));
        assert!(
            err.what.contains(
                "definition doc.verify@1 gives rules different from those recorded at entry 1"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_rating_naming_a_book_not_yet_recorded_or_not_in_force_fails() {
        let log = good_log();
        // The book recorded after the entry it prices.
        let mut late = log.clone();
        late.swap(0, 3);
        let err = run(&late).unwrap_err();
        assert_eq!(err.entry, Some(0));
        assert!(
            err.what.contains(
                "rating: book list@1 is not recorded by any price.book before this entry"
            ),
            "{err}"
        );
        // A version that takes effect after the entry's time.
        let b2 = book("list", 2, "2026-03-01T00:00:00Z", "0.0000025", "0.00001");
        let mut future = log.clone();
        future.insert(
            1,
            bytes(
                "2026-01-01T00:00:00Z",
                "/",
                EntryBody::PriceBook(b2.clone()),
            ),
        );
        future[4] = bytes(
            "2026-02-01T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(rated_chat(
                &b2,
                None,
                "2026-02-01T00:00:00Z",
                1_000_000,
                200_000,
            )),
        );
        let err = run(&future).unwrap_err();
        assert_eq!(err.entry, Some(4));
        assert!(err.what.contains("rating: book list@2 (entry 1) takes effect at 2026-03-01T00:00:00Z, after the entry's time 2026-02-01T00:00:00Z"), "{err}");
        // An older version, when a newer one in force was recorded before the entry
        // (rated before the server applied it).
        let b2_now = book("list", 2, "2026-01-15T00:00:00Z", "0.0000025", "0.00001");
        let mut stale = log.clone();
        stale.insert(
            1,
            bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b2_now)),
        );
        let err = run(&stale).unwrap_err();
        assert!(
            err.what
                .contains("rating: book list@1 is not the version in force at")
                && err.what.contains("list@2 (entry 1) is"),
            "{err}"
        );
        // A version recorded twice with other prices.
        let mut twice = log.clone();
        twice.push(bytes(
            "2026-03-01T00:00:00Z",
            "/",
            EntryBody::PriceBook(book(
                "list",
                1,
                "2026-01-01T00:00:00Z",
                "0.000001",
                "0.00001",
            )),
        ));
        let err = run(&twice).unwrap_err();
        assert!(
            err.what
                .contains("book list@1 was recorded at entry 0 with different contents"),
            "{err}"
        );
    }

    #[test]
    fn the_contract_in_force_on_the_path_decides_book_node_and_discount() {
        let gold = book("gold", 1, "2026-01-01T00:00:00Z", "0.000002", "0.000008");
        let contract = PriceContract {
            book: "gold".into(),
            overrides: Vec::new(),
            discount_percent: Some(d("10")),
            markup_percent: None,
            minimum_commitment: None,
            service_levels: Vec::new(),
            set_by: Some(AccountPath::root()),
        };
        let acme = node("acme");
        let mut log = good_log();
        log.insert(
            1,
            bytes(
                "2026-01-01T00:00:00Z",
                "/",
                EntryBody::PriceBook(gold.clone()),
            ),
        );
        log.insert(
            2,
            bytes(
                "2026-01-01T00:00:00Z",
                "acme",
                EntryBody::PriceContract(contract.clone()),
            ),
        );
        // The list-rated entry (now 5) is wrong: the contract of acme names gold.
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(5));
        assert!(err.what.contains("rating.book: the contract of acme (entry 2) names book \"gold\", the entry has \"list\""), "{err}");
        // Rated by gold under acme's contract, it verifies (consumption follows).
        let good = rated_chat(
            &gold,
            Some((&acme, &contract)),
            "2026-02-01T00:00:00Z",
            1_000_000,
            200_000,
        );
        assert_eq!(good.rating.as_ref().unwrap().amount, d("3.24"));
        log[5] = bytes(
            "2026-02-01T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(good.clone()),
        );
        log[6] = bytes(
            "2026-02-01T00:00:01Z",
            "acme/cn",
            EntryBody::Posting(consume("acme/cn", 5, "3.24")),
        );
        let report = run(&log).unwrap();
        assert_eq!((report.rated, report.contracts, report.books), (1, 1, 2));
        // Gold without the contract: the rating does not name acme's contract.
        let bare = rated_chat(&gold, None, "2026-02-01T00:00:00Z", 1_000_000, 200_000);
        let mut wrong = log.clone();
        wrong[5] = bytes("2026-02-01T00:00:00Z", "acme/cn", EntryBody::Usage(bare));
        let err = run(&wrong).unwrap_err();
        assert!(
            err.what.contains(
                "rating.contract: the contract in force on the path is that of acme (entry 2), the entry names none"
            ),
            "{err}"
        );
        // No hint: gold was never the book without a contract.
        assert!(!err.what.contains("before the server applied"), "{err}");
        // The discount changed in the entry.
        let wrong = with_rating(&log, 5, |r| r.discount_percent = Some(d("20")));
        let err = run(&wrong).unwrap_err();
        assert!(
            err.what
                .contains("rating.discount_percent: the book gives 10, the entry has 20"),
            "{err}"
        );
        // A contract on a node nearer the entry wins over acme's.
        let mut nearer = log.clone();
        nearer.insert(
            3,
            bytes(
                "2026-01-01T00:00:00Z",
                "acme/cn",
                EntryBody::PriceContract(PriceContract {
                    book: "list".into(),
                    discount_percent: None,
                    ..contract.clone()
                }),
            ),
        );
        let err = run(&nearer).unwrap_err();
        assert!(
            err.what
                .contains("the contract of acme/cn (entry 3) names book \"list\""),
            "{err}"
        );
    }

    #[test]
    fn a_rating_made_just_before_a_contract_change_is_refused_and_explained() {
        // The server rates before it appends and applies a contract once projected:
        // an entry rated by the old terms can follow the new contract in the log.
        let contract = |discount: &str| PriceContract {
            book: "list".into(),
            overrides: Vec::new(),
            discount_percent: Some(d(discount)),
            markup_percent: None,
            minimum_commitment: None,
            service_levels: Vec::new(),
            set_by: Some(AccountPath::root()),
        };
        let acme = node("acme");
        let b = list_v1();
        let mut log = good_log();
        log[3] = bytes(
            "2026-02-01T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(rated_chat(&b, None, "2026-02-01T00:00:00Z", 1000, 100)),
        );
        // A first contract: the entry rated without one follows it.
        log.insert(
            3,
            bytes(
                "2026-01-31T00:00:00Z",
                "acme",
                EntryBody::PriceContract(contract("10")),
            ),
        );
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(4));
        assert!(
            err.what.ends_with(
                "; it follows the contract in force before entry 3, 1 entries earlier: rated before the server applied that change?"
            ),
            "{err}"
        );
        // A changed contract: the entry rated by the old discount follows the new one.
        let c10 = contract("10");
        log[4] = bytes(
            "2026-02-01T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(rated_chat(
                &b,
                Some((&acme, &c10)),
                "2026-02-01T00:00:00Z",
                1000,
                100,
            )),
        );
        assert_eq!(run(&log).unwrap().rated, 1);
        log.insert(
            4,
            bytes(
                "2026-01-31T00:00:01Z",
                "acme",
                EntryBody::PriceContract(contract("20")),
            ),
        );
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(5));
        assert!(
            err.what
                .contains("rating.discount_percent: the book gives 20, the entry has 10"),
            "{err}"
        );
        assert!(
            err.what
                .contains("it follows the contract in force before entry 4, 1 entries earlier"),
            "{err}"
        );
    }

    #[test]
    fn a_recount_basis_is_taken_as_recorded_and_still_priced_by_the_book() {
        let b = list_v1();
        let log = good_log();
        // The server priced its recount (1,000,100 in, 200,000 out), not the
        // provider's count the entry's tokens hold.
        let mut u = rated_chat(&b, None, "2026-02-01T00:00:00Z", 1_000_100, 200_000);
        u.tokens = tokens(1_000_000, 200_000);
        u.recount = Some(Box::new(Recount {
            encoding: "o200k_base".into(),
            input: 1_000_100,
            output: 200_000,
            flagged: false,
        }));
        u.rating.as_mut().unwrap().basis = Some(RatingBasis::Recount);
        let mut recounted = log.clone();
        recounted[3] = bytes(
            "2026-02-01T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(u.clone()),
        );
        let report = run(&recounted).unwrap();
        assert_eq!((report.rated, report.rated_basis_as_recorded), (1, 1));
        // Its prices are still the book's.
        let wrong = with_rating(&recounted, 3, |r| r.lines[0].unit_price = d("0.000002"));
        assert!(
            run(&wrong)
                .unwrap_err()
                .what
                .contains("rating.lines[0].unit_price")
        );
        // Without a recount the provider's counts were priced, whatever the basis says.
        u.recount = None;
        recounted[3] = bytes("2026-02-01T00:00:00Z", "acme/cn", EntryBody::Usage(u));
        let err = run(&recounted).unwrap_err();
        assert!(
            err.what.contains(
                "rating.lines[0].quantity: the book gives 1000000, the entry has 1000100"
            ),
            "{err}"
        );
    }

    #[test]
    fn wallets_replay_refuses_spending_a_grant_below_zero() {
        let mut log = good_log();
        let grant = Posting {
            kind: PostingKind::Grant,
            currency: usd(),
            legs: vec![
                Leg::debit(LedgerAccount::Promotions, d("5")),
                Leg::credit(LedgerAccount::Grant(node("acme/cn"), "g1".into()), d("5")),
            ],
            memo: String::new(),
            usage_entry: None,
            grant: Some(Grant {
                id: "g1".into(),
                priority: 0,
                expires_at: None,
            }),
            set_by: Some(AccountPath::root()),
        };
        log.push(bytes(
            "2026-02-03T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(grant),
        ));
        let spend = |amount: &str| Posting {
            kind: PostingKind::Consume,
            currency: usd(),
            legs: vec![
                Leg::debit(
                    LedgerAccount::Grant(node("acme/cn"), "g1".into()),
                    d(amount),
                ),
                Leg::credit(LedgerAccount::Revenue, d(amount)),
            ],
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: None,
        };
        let mut ok = log.clone();
        ok.push(bytes(
            "2026-02-04T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(spend("5")),
        ));
        assert_eq!(run(&ok).unwrap().postings, 4);
        log.push(bytes(
            "2026-02-04T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(spend("5.01")),
        ));
        let err = run(&log).unwrap_err();
        assert_eq!(err.entry, Some(7));
        assert!(
            err.what.contains("replaying it through the wallets"),
            "{err}"
        );
        assert!(err.what.contains("below zero"), "{err}");
        // A posting written on a node that does not own the wallet it moves.
        let mut outside = good_log();
        outside[2] = bytes(
            "2026-01-02T00:00:00Z",
            "other",
            EntryBody::Posting(topup("acme/cn", "100")),
        );
        assert!(run(&outside).unwrap_err().what.contains("is outside other"));
    }

    #[test]
    fn bytes_that_are_not_an_entry_are_named() {
        let mut log = good_log();
        log[1] = br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"mystery","data":{}}"#
            .to_vec();
        let err = run(&log).unwrap_err();
        assert_eq!(
            err.to_string(),
            "entry 1: not an entry this build reads: unknown entry kind \"mystery\""
        );
    }

    /// Times the byte verification and the rules pass over a ledger of rated usage,
    /// defined usage and postings. Run in release:
    /// `cargo test --release -p ciyuan --bin ciyuan measure_rules -- --ignored --nocapture`
    /// (`CIYUAN_AUDIT_BENCH_ENTRIES` sets the size; a million by default).
    #[test]
    #[ignore = "a measurement, not a test"]
    fn measure_rules_throughput() {
        let n: usize = std::env::var("CIYUAN_AUDIT_BENCH_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let b = list_v1();
        let variants: Vec<Vec<u8>> = (0..100)
            .map(|i| {
                bytes(
                    "2026-02-01T00:00:00Z",
                    "acme/cn",
                    EntryBody::Usage(rated_chat(
                        &b,
                        None,
                        "2026-02-01T00:00:00Z",
                        1000 + i,
                        200 + 3 * i,
                    )),
                )
            })
            .collect();
        let defined = bytes(
            "2026-02-02T00:00:00Z",
            "acme/cn",
            EntryBody::Usage(doc_usage(1, 3)),
        );
        let spend = bytes(
            "2026-02-02T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(consume("acme/cn", 3, "0.0042")),
        );
        let mut log = good_log();
        log[2] = bytes(
            "2026-01-02T00:00:00Z",
            "acme/cn",
            EntryBody::Posting(topup("acme/cn", "1000000000")),
        );
        let (mut rated, mut postings, mut defs) = (1u64, 2u64, 1u64);
        while log.len() < n {
            let i = log.len();
            log.push(match i % 10 {
                0 => {
                    postings += 1;
                    spend.clone()
                }
                1 => {
                    defs += 1;
                    defined.clone()
                }
                _ => {
                    rated += 1;
                    variants[i % variants.len()].clone()
                }
            });
        }
        let bytes_total: usize = log.iter().map(Vec::len).sum();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ledger");
        let mut ledger = Ledger::open(&dir, LedgerOptions::default()).unwrap();
        for chunk in log.chunks(10_000) {
            ledger.append_batch(chunk).unwrap();
        }
        ledger.checkpoint().unwrap();
        drop(ledger);
        drop(log);
        let t = std::time::Instant::now();
        let report = ciyuan_ledger::verify_path(&dir).unwrap();
        let bytes_secs = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let rules = check_path(&dir, report.entries).unwrap();
        let rules_secs = t.elapsed().as_secs_f64();
        assert_eq!(
            (rules.rated, rules.postings, rules.defined),
            (rated, postings, defs)
        );
        println!(
            "{n} entries, {:.0} MB: bytes verified in {bytes_secs:.2} s ({:.0} entries/s); \
             rules in {rules_secs:.2} s ({:.0} entries/s, {:.2} µs per entry): \
             {rated} rated, {postings} postings, {defs} defined",
            bytes_total as f64 / 1e6,
            n as f64 / bytes_secs,
            n as f64 / rules_secs,
            rules_secs * 1e6 / n as f64,
        );
    }

    /// Times the rules over entries rated by LiteLLM's real table (4,500 rules), for
    /// models early and late in it. Run in release with `--ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn measure_rules_with_litellms_table() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/litellm_model_prices.json");
        let Ok(raw) = std::fs::read(&file) else {
            println!("no {}: skipped", file.display());
            return;
        };
        let b = ciyuan_price::import_litellm(&raw)
            .unwrap()
            .into_book(
                Some("list"),
                1,
                at("2026-01-01T00:00:00Z"),
                Some(AccountPath::root()),
            )
            .unwrap();
        println!("{} rules", b.rules.len());
        let book_entry = bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b.clone()));
        for model in [
            "gpt-4o",
            "claude-sonnet-4-5",
            "qwen-max",
            "zz-unknown-model",
        ] {
            let mut c = RuleChecker::new();
            c.check(0, &book_entry).unwrap();
            let mut u = rated_chat(&b, None, "2026-02-01T00:00:00Z", 1000, 100);
            u.model = Some(model.into());
            let rating = Rater::new(&b, None)
                .unwrap()
                .rate(&RateInput {
                    model: u.model.as_deref(),
                    service: &u.service,
                    tier: ServiceTier::Standard,
                    tokens: &u.tokens,
                    measures: &u.measures,
                    at: at("2026-02-01T00:00:00Z"),
                    period_to_date: Decimal::ZERO,
                })
                .unwrap();
            u.rating = Some(Box::new(rating));
            let e = bytes("2026-02-01T00:00:00Z", "acme/cn", EntryBody::Usage(u));
            let n = 20_000u64;
            let t = std::time::Instant::now();
            for i in 1..=n {
                c.check(i, &e).unwrap();
            }
            println!(
                "{model}: {:.2} µs per rated entry (decoding included)",
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Books of rules for many models and services, in any order: the verifier
        /// (over the subset of rules that can match an entry) agrees with the rater
        /// (over the whole book) for every model and service.
        #[test]
        fn ratings_by_many_rule_books_verify(
            picks in prop::collection::vec((0usize..8, 1i64..1_000_000), 1..12),
            model in prop::sample::select(vec![Some("gpt-4o"), Some("gpt-4o-mini"), Some("claude-3"), None]),
            service in prop::sample::select(vec!["llm.chat", "doc.verify", "llm.embedding"]),
        ) {
            let pool: [(Option<&str>, Option<&str>, ServiceTier); 8] = [
                (Some("gpt-4o"), None, ServiceTier::Standard),
                (Some("gpt-*"), None, ServiceTier::Standard),
                (Some("GPT-4O*"), Some("llm.*"), ServiceTier::Standard),
                (Some("gpt-4o"), None, ServiceTier::Batch),
                (Some("claude*"), None, ServiceTier::Standard),
                (None, Some("doc.verify"), ServiceTier::Standard),
                (None, Some("llm.*"), ServiceTier::Standard),
                (Some("*"), Some("llm.embedding"), ServiceTier::Flex),
            ];
            let mut b = list_v1();
            b.rules = picks
                .iter()
                .map(|(i, nanos)| {
                    let (m, sv, tier) = pool[*i];
                    PriceRule {
                        model: m.map(str::to_string),
                        service: sv.map(str::to_string),
                        tier,
                        unit_prices: prices(&[
                            ("text.input", &Decimal::new(*nanos, 9).to_string()),
                            ("text.output", &Decimal::new(*nanos * 3, 9).to_string()),
                        ]),
                        per_request: (*i % 2 == 0).then(|| Decimal::new(*nanos, 6)),
                        ..PriceRule::default()
                    }
                })
                .collect();
            let mut u = rated_chat(&list_v1(), None, "2026-02-01T00:00:00Z", 1234, 567);
            u.model = model.map(str::to_string);
            u.service = service.to_string();
            u.definition = None;
            let rating = Rater::new(&b, None).unwrap().rate(&RateInput {
                model: u.model.as_deref(),
                service: &u.service,
                tier: ServiceTier::Standard,
                tokens: &u.tokens,
                measures: &u.measures,
                at: at("2026-02-01T00:00:00Z"),
                period_to_date: Decimal::ZERO,
            }).unwrap();
            u.rating = Some(Box::new(rating));
            let log = vec![
                bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b)),
                bytes("2026-02-01T00:00:00Z", "acme/cn", EntryBody::Usage(u)),
            ];
            prop_assert_eq!(run(&log).unwrap().rated, 1);
            let more = with_rating(&log, 1, |r| r.amount += Decimal::new(1, 10));
            prop_assert!(run(&more).is_err());
        }

        /// Whatever the prices, counts and rounding, what the rater gave verifies, and
        /// the smallest change to the amount, or any change to a unit price, does not.
        #[test]
        fn rated_entries_verify_and_any_change_is_caught(
            input_micros in 0u64..100_000,
            output_micros in 0u64..100_000,
            input in 0i64..5_000_000,
            output in 1i64..5_000_000,
            to in 0u32..12,
            mode in prop::sample::select(vec![RoundingMode::HalfEven, RoundingMode::HalfUp, RoundingMode::Down, RoundingMode::Up]),
            line in 0usize..2,
        ) {
            let mut b = list_v1();
            b.rounding = Rounding { to, mode, ..Rounding::default() };
            b.rules[0].unit_prices = prices(&[
                ("text.input", &Decimal::new(input_micros as i64, 9).to_string()),
                ("text.output", &Decimal::new(output_micros as i64, 9).to_string()),
            ]);
            let u = rated_chat(&b, None, "2026-02-01T00:00:00Z", input, output);
            let log = vec![
                bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b)),
                bytes("2026-02-01T00:00:00Z", "acme/cn", EntryBody::Usage(u)),
            ];
            prop_assert_eq!(run(&log).unwrap().rated, 1);
            let ulp = Decimal::new(1, to);
            let more = with_rating(&log, 1, |r| r.amount += ulp);
            let err = run(&more).unwrap_err();
            prop_assert!(err.what.contains("rating.amount"), "{}", err);
            let lines = Entry::decode(&log[1]).map(|e| match e.body {
                EntryBody::Usage(u) => u.rating.unwrap().lines.len(),
                _ => 0,
            }).unwrap();
            if line < lines {
                let priced = with_rating(&log, 1, |r| r.lines[line].unit_price += Decimal::new(1, 9));
                let err = run(&priced).unwrap_err();
                let want = format!("rating.lines[{line}].unit_price");
                prop_assert!(err.what.contains(&want), "{}", err);
            }
        }

        /// Postings of random balanced legs replay; moving one leg by any amount
        /// unbalances them and is caught.
        #[test]
        fn balanced_postings_pass_and_any_unbalance_is_caught(
            cents in prop::collection::vec(1i64..1_000_000, 1..8),
            scale in 0u32..6,
            nudge in 1i64..1000,
            which in 0usize..8,
        ) {
            let amounts: Vec<Decimal> = cents.iter().map(|c| Decimal::new(*c, scale)).collect();
            let total: Decimal = amounts.iter().copied().sum();
            let mut legs = vec![Leg::debit(LedgerAccount::Payments, total)];
            for (i, a) in amounts.iter().enumerate() {
                legs.push(Leg::credit(LedgerAccount::Cash(node(&format!("acme/n{i}"))), *a));
            }
            let mut p = topup("acme", "1");
            p.legs = legs;
            let log = vec![bytes("2026-01-02T00:00:00Z", "acme", EntryBody::Posting(p.clone()))];
            prop_assert_eq!(run(&log).unwrap().postings, 1);
            let leg = which % p.legs.len();
            let side = if leg == 0 { &mut p.legs[leg].debit } else { &mut p.legs[leg].credit };
            *side += Decimal::new(nudge, 9);
            let log = vec![bytes("2026-01-02T00:00:00Z", "acme", EntryBody::Posting(p))];
            let err = run(&log).unwrap_err();
            prop_assert_eq!(err.entry, Some(0));
            prop_assert!(err.what.contains("debits"), "{}", err);
        }
    }

    /// A log where acme/cn's contract promises 99% availability to upstream `sim`
    /// (credit 10%), November has 10 requests of which 2 failed, and the month is
    /// evaluated (and its credit paid) in December.
    fn evaluated_log() -> (Vec<Vec<u8>>, usize) {
        let b = list_v1();
        let level: ciyuan_core::ServiceLevel = serde_json::from_value(serde_json::json!({
            "name": "sim", "upstream": "sim",
            "objectives": [{"metric": "availability", "target": "99",
                            "credits": [{"worse_than": "99", "percent": "10"}]}]
        }))
        .unwrap();
        let contract = PriceContract {
            book: "list".into(),
            overrides: vec![],
            discount_percent: None,
            markup_percent: None,
            minimum_commitment: None,
            service_levels: vec![level],
            set_by: Some(AccountPath::root()),
        };
        let cn = node("acme/cn");
        let mut log = vec![
            bytes("2026-01-01T00:00:00Z", "/", EntryBody::PriceBook(b.clone())),
            bytes(
                "2026-01-01T00:00:00Z",
                "acme/cn",
                EntryBody::PriceContract(contract.clone()),
            ),
            bytes(
                "2026-01-02T00:00:00Z",
                "acme/cn",
                EntryBody::Posting(topup("acme/cn", "100")),
            ),
        ];
        let mut samples = Vec::new();
        for i in 0..10 {
            let ts = format!("2026-11-{:02}T00:00:00Z", i + 1);
            let mut u = rated_chat(&b, Some((&cn, &contract)), &ts, 1_000_000, 200_000);
            u.quality = Some(Box::new(ciyuan_core::Quality {
                upstream: "sim".into(),
                status: if i < 2 { 502 } else { 200 },
                failure: (i < 2).then(|| "upstream_error".into()),
                latency_us: 1000,
                ..Default::default()
            }));
            samples.push(ciyuan_core::Sample::of(&u).unwrap());
            log.push(bytes(&ts, "acme/cn", EntryBody::Usage(u)));
        }
        let level = &contract.service_levels[0];
        let e = ciyuan_core::evaluate(level, samples.iter());
        assert_eq!(e.credit_percent, Decimal::from(10));
        let evaluated = ServiceLevelEvaluated {
            level: level.clone(),
            period: "2026-11".into(),
            from: at("2026-11-01T00:00:00Z"),
            to: at("2026-12-01T00:00:00Z"),
            time_zone: "UTC".into(),
            scanned: (3, 13),
            entries: Some((3, 12)),
            figures: e.figures,
            objectives: e.objectives,
            credit_percent: e.credit_percent,
            credits: e.credits.clone(),
        };
        let at_eval = log.len();
        log.push(bytes(
            "2026-12-01T00:20:00Z",
            "acme/cn",
            EntryBody::ServiceLevelEvaluated(Box::new(evaluated)),
        ));
        let mut p = Posting::service_credit(&cn, usd(), e.credits[0].amount);
        p.memo = ciyuan_core::credit_memo("sim", "2026-11");
        log.push(bytes(
            "2026-12-01T00:20:00Z",
            "acme/cn",
            EntryBody::Posting(p),
        ));
        (log, at_eval)
    }

    fn evaluation_of(log: &[Vec<u8>], i: usize) -> ServiceLevelEvaluated {
        match Entry::decode(&log[i]).unwrap().body {
            EntryBody::ServiceLevelEvaluated(e) => *e,
            other => panic!("{other:?}"),
        }
    }

    fn with_evaluation(
        log: &[Vec<u8>],
        i: usize,
        change: impl FnOnce(&mut ServiceLevelEvaluated),
    ) -> Vec<Vec<u8>> {
        let mut out = log.to_vec();
        let mut e = evaluation_of(log, i);
        change(&mut e);
        out[i] = bytes(
            "2026-12-01T00:20:00Z",
            "acme/cn",
            EntryBody::ServiceLevelEvaluated(Box::new(e)),
        );
        out
    }

    #[test]
    fn service_level_evaluations_are_recomputed_from_the_requests_they_cover() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, i) = evaluated_log();
        let good = tmp.path().join("good");
        write_ledger(&good, &log);
        let (_, rules) = verify(&good).unwrap();
        assert_eq!(rules.service_levels, 1);
        let fails = |name: &str, log: &[Vec<u8>]| {
            let dir = tmp.path().join(name);
            write_ledger(&dir, log);
            verify(&dir).unwrap_err()
        };
        // A failure left out of the figures.
        let e = fails(
            "figures",
            &with_evaluation(&log, i, |e| e.figures.upstream_failures = 1),
        );
        assert!(e.what.contains("figures"), "{e}");
        // A credit larger than the schedule's.
        // (With its posting the inflated credit is caught at the posting; without it,
        // by the recomputation.)
        let inflated = with_evaluation(&log, i, |e| e.credits[0].amount += Decimal::ONE);
        let e = fails("credit-paid", &inflated);
        assert_eq!(e.entry, Some(i as u64 + 1), "{e}");
        let e = fails("credit", &inflated[..=i]);
        assert_eq!(e.entry, Some(i as u64), "{e}");
        assert!(e.what.contains("credits"), "{e}");
        // A read that skips the month's first request.
        let e = fails("scanned", &with_evaluation(&log, i, |e| e.scanned.0 = 4));
        assert!(e.what.contains("scanned"), "{e}");
        // A month evaluated before it was over.
        let mut early = log.clone();
        early[i] = bytes(
            "2026-11-30T00:00:00Z",
            "acme/cn",
            EntryBody::ServiceLevelEvaluated(Box::new(evaluation_of(&log, i))),
        );
        let e = fails("early", &early);
        assert!(e.what.contains("not over"), "{e}");
        // Evaluated twice, or its credit paid twice.
        let mut twice = log.clone();
        twice.push(log[i].clone());
        let e = fails("twice", &twice);
        assert!(e.what.contains("evaluated already"), "{e}");
        let mut paid = log.clone();
        paid.push(log[i + 1].clone());
        let e = fails("paid", &paid);
        assert!(e.what.contains("paid already"), "{e}");
        // A credit posting no evaluation owes.
        let mut p = Posting::service_credit(&node("acme/cn"), usd(), d("5"));
        p.memo = ciyuan_core::credit_memo("sim", "2026-10");
        let mut unowed = log.clone();
        unowed[i + 1] = bytes("2026-12-01T00:20:00Z", "acme/cn", EntryBody::Posting(p));
        let e = fails("unowed", &unowed);
        assert!(e.what.contains("is not a credit"), "{e}");
    }
}
