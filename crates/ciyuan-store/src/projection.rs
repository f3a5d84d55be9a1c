//! The projection rules, once for every backend: ledger entries in, changes out.
//!
//! Which entry changes which projection (an `account.created` adds a node, a
//! `budget.cleared` removes a limit, a usage entry adds to an hourly rollup and to the
//! idempotency index, ...) is decided here and nowhere else. A backend turns the
//! [`Projected`] changes into its own writes, in one transaction with its watermark;
//! it never matches on entry kinds itself, so a second backend cannot drift from the
//! first by copying a rule wrongly.

use crate::{StoreError, floor_hour};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccessSet, AccountInfo, AccountPath, BudgetSet, Currency, Direction, Entry, EntryBody,
    ExactSum, Incident, Modality, Posting, PriceBook, PriceContract, TokenDefinition, Usage,
    WalletSet,
};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

/// One change to the projections (besides usage sums and the ingest index, which
/// [`Projected`] carries summed and in order).
#[derive(Debug, Clone, PartialEq)]
pub enum Change<'a> {
    /// A node was created (a second creation of the same path changes nothing).
    AccountCreated {
        /// The creating entry.
        entry: u64,
        /// Its time.
        at: Timestamp,
        /// The node.
        path: &'a AccountPath,
        /// Its attributes.
        info: &'a AccountInfo,
    },
    /// A node's attributes were replaced (whole).
    AccountUpdated {
        /// The node.
        path: &'a AccountPath,
        /// The new attributes.
        info: &'a AccountInfo,
    },
    /// A limit `(node, budget.name)` was set, replacing one of the same name.
    BudgetSet {
        /// The setting entry.
        entry: u64,
        /// The node.
        node: &'a AccountPath,
        /// The limit.
        budget: &'a BudgetSet,
    },
    /// The limit `(node, name)` was removed (if there was one).
    BudgetCleared {
        /// The node.
        node: &'a AccountPath,
        /// The limit's name.
        name: &'a str,
    },
    /// A node's model access rules were replaced (whole).
    AccessSet {
        /// The setting entry.
        entry: u64,
        /// The node.
        node: &'a AccountPath,
        /// The rules.
        rules: &'a AccessSet,
    },
    /// An incident to list.
    Incident {
        /// The entry.
        entry: u64,
        /// Its time.
        at: Timestamp,
        /// Its node.
        node: &'a AccountPath,
        /// What happened.
        incident: &'a Incident,
    },
    /// Gateway usage whose recount disagreed with the provider: listed as a
    /// discrepancy.
    Flagged {
        /// The entry.
        entry: u64,
        /// Its time.
        at: Timestamp,
        /// Its node.
        node: &'a AccountPath,
        /// The usage.
        usage: &'a Usage,
    },
    /// A token definition version was declared (a repeat of `service@version` keeps
    /// the first: the ledger's first word on a version is the one in force).
    DefinitionSet {
        /// The declaring entry.
        entry: u64,
        /// The definition.
        definition: &'a TokenDefinition,
    },
    /// A price book version was recorded (a repeat of `name@version` keeps the first).
    PriceBook {
        /// The recording entry.
        entry: u64,
        /// The book.
        book: &'a PriceBook,
    },
    /// A node's price contract was replaced (whole).
    PriceContract {
        /// The setting entry.
        entry: u64,
        /// The node.
        node: &'a AccountPath,
        /// The contract.
        contract: &'a PriceContract,
    },
    /// A wallet posting, listed under every node whose wallet it moves.
    Posting {
        /// The entry.
        entry: u64,
        /// Its time.
        at: Timestamp,
        /// The entry's node.
        node: &'a AccountPath,
        /// The posting.
        posting: &'a Posting,
    },
    /// A node's wallet settings in one currency were replaced.
    WalletSet {
        /// The setting entry.
        entry: u64,
        /// The node.
        node: &'a AccountPath,
        /// The settings.
        settings: &'a WalletSet,
    },
    /// A statement was issued and its period closed for a node.
    StatementClosed {
        /// The entry.
        entry: u64,
        /// When.
        at: Timestamp,
        /// The node.
        node: &'a AccountPath,
        /// The statement.
        closed: &'a ciyuan_core::StatementClosed,
    },
    /// A contract's service level was evaluated for a period (a repeat of the same
    /// node, level and period keeps the first: the credit is owed once).
    ServiceLevelEvaluated {
        /// The entry.
        entry: u64,
        /// When.
        at: Timestamp,
        /// The contract's node.
        node: &'a AccountPath,
        /// The evaluation.
        evaluated: &'a ciyuan_core::ServiceLevelEvaluated,
    },
    /// A gateway request's answer is kept by its provider under `id` (the Responses
    /// API's `resp_...`), to be retrieved by the account that made it; the first entry
    /// naming an id is kept.
    ResponseStored {
        /// The entry.
        entry: u64,
        /// Its time.
        at: Timestamp,
        /// The account that made the request.
        node: &'a AccountPath,
        /// The provider's id of the answer.
        id: &'a str,
        /// The upstream that made it (its configured name).
        upstream: &'a str,
    },
    /// A scheduled report was delivered; one the schedule delivered (not by hand)
    /// advances its progress if its period is later than the one recorded.
    ReportDelivered {
        /// The entry.
        entry: u64,
        /// When.
        at: Timestamp,
        /// The report's node.
        node: &'a AccountPath,
        /// The delivery.
        delivered: &'a ciyuan_core::ReportDelivered,
    },
}

/// The key of an hourly cost rollup: rated usage by node, hour, service, model and
/// currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CostKey<'a> {
    /// The node.
    pub account: &'a AccountPath,
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// The currency.
    pub currency: Currency,
}

/// What a billing line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineOf<'a> {
    /// A priced key of a rating.
    Price(&'a ciyuan_core::PriceKey),
    /// What the book's rounding of entries' totals added.
    Rounding,
    /// A service credit owed under the named service level (a credit, negative).
    ServiceCredit(&'a str),
    /// Money given back into the node's wallet by a `refund` posting (a credit,
    /// negative).
    Refund,
}

impl LineOf<'_> {
    /// As stored: the key's text, or `rounding`.
    pub fn text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            LineOf::Price(k) => std::borrow::Cow::Owned(k.to_string()),
            LineOf::Rounding => std::borrow::Cow::Borrowed("rounding"),
            LineOf::ServiceCredit(name) => {
                std::borrow::Cow::Owned(format!("service_credit:{name}"))
            }
            LineOf::Refund => std::borrow::Cow::Borrowed("refund"),
        }
    }
}

/// The key of an hourly billing line: rated usage (or a correction's adjustment) of a
/// node, service and model, one priced key at one list unit price, in one currency and
/// book version. Corrections are billed at their own time, as adjustments: a period
/// already billed never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LineKey<'a> {
    /// The node.
    pub account: &'a AccountPath,
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// An adjustment (a correction's, or rounding), not usage.
    pub adjustment: bool,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// What it bills.
    pub key: LineOf<'a>,
    /// The list price of one unit, normalized; none for rounding.
    pub unit_price: Option<Decimal>,
    /// The currency.
    pub currency: Currency,
    /// The book.
    pub book: &'a str,
    /// Its version.
    pub version: u32,
}

/// Sums of billing lines: quantity, list cost, contracted cost, billed cost.
pub type LineSums<'a> = FxHashMap<LineKey<'a>, [ExactSum; 4]>;

/// A tier counter: billing node, book, rule and period (see [`ciyuan_core::TierPlace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierCounterKey<'a> {
    /// The billing node.
    pub node: &'a AccountPath,
    /// The book.
    pub book: &'a str,
    /// The rule's counter name.
    pub rule: &'a str,
    /// The period's start.
    pub period: Timestamp,
}

/// Units added to tier counters.
pub type TierSums<'a> = FxHashMap<TierCounterKey<'a>, ExactSum>;

/// The key of an hourly usage rollup, borrowed from the entries: no allocation per
/// token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RollupKey<'a> {
    /// The node.
    pub account: &'a AccountPath,
    /// Start of the UTC hour, in seconds since the epoch.
    pub hour: i64,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// Modality.
    pub modality: Modality,
    /// Direction.
    pub direction: Direction,
}

/// Exact amounts by cost key.
pub type CostSums<'a> = FxHashMap<CostKey<'a>, ExactSum>;
/// A token rollup row to add, as every backend writes one: node, hour (or day),
/// service, model, modality, direction, signed sum.
pub type UsageAdd<'k> = (&'k str, i64, &'k str, &'k str, Modality, Direction, i128);

/// A cost rollup row to add: node, hour (or day), service, model, currency, amount.
pub type CostAdd<'k> = (&'k str, i64, &'k str, &'k str, Currency, ExactSum);

impl<'a> RollupKey<'a> {
    /// The row adding `sum` under this key.
    pub fn row(&self, sum: i128) -> UsageAdd<'a> {
        (
            self.account.as_str(),
            self.hour,
            self.service,
            self.model,
            self.modality,
            self.direction,
            sum,
        )
    }
}

impl<'a> CostKey<'a> {
    /// The row adding `amount` under this key.
    pub fn row(&self, amount: ExactSum) -> CostAdd<'a> {
        (
            self.account.as_str(),
            self.hour,
            self.service,
            self.model,
            self.currency,
            amount,
        )
    }
}

/// What a run of entries does to the projections.
#[derive(Debug, Default)]
pub struct Projected<'a> {
    /// Changes in entry order (their order matters: a limit set then cleared).
    pub changes: Vec<Change<'a>>,
    /// Ingested events to index, `(entry, ingest_key_hash)`, in entry order.
    pub ingest: Vec<(u64, u64)>,
    /// Signed token sums to add, one per rollup key (a batch of many events of one
    /// key becomes one write).
    pub usage: FxHashMap<RollupKey<'a>, i128>,
    /// Exact amounts to add, one per cost key (from rated usage entries).
    pub cost: CostSums<'a>,
    /// Units added to each tier counter (see [`ciyuan_core::TierPlace`]).
    pub tiers: TierSums<'a>,
    /// Billing lines (see [`LineKey`]).
    pub lines: LineSums<'a>,
    /// Per UTC hour (seconds since the epoch), the first and last index of the
    /// entries of that hour carrying a gateway quality record: where a period's
    /// requests lie in the log, so service levels and quality reports read only that
    /// range.
    pub quality_hours: QualityHours,
    /// `usage` added to the hour and day of every subtree holding it (see
    /// [`crate::tree`]).
    pub usage_tree: crate::tree::TreeUsage<'a>,
    /// `cost` added to the hour and day of every subtree holding it.
    pub cost_tree: crate::tree::TreeCost<'a>,
}

/// Per UTC hour, the first and last index of the entries with a quality record.
pub type QualityHours = FxHashMap<i64, (u64, u64)>;

/// How many of the slots last added to [`Sums`] compares a key with before hashing it.
const RECENT: usize = 8;

/// Sums by key while a batch is projected, fronted by the slots most recently added
/// to.
///
/// The entries of a batch mostly repeat their predecessor's node, hour, service, model
/// and book, so most additions find their slot by comparing keys with the few slots
/// last used instead of hashing a key of four strings and looking it up: the look-ups
/// of a rated entry's token, cost and billing-line sums were about a third of
/// projecting it.
struct Sums<K, V> {
    /// Where each key's sum is in `slots`.
    index: FxHashMap<K, usize>,
    slots: Vec<(K, V)>,
    /// Indices into `slots` of the keys last added to, the first `recent_len` in use.
    recent: [usize; RECENT],
    recent_len: usize,
    /// Which of `recent` a key found by hashing replaces next.
    evict: usize,
}

impl<K: Copy + Eq + std::hash::Hash, V> Sums<K, V> {
    fn new() -> Self {
        Sums {
            index: FxHashMap::default(),
            slots: Vec::new(),
            recent: [0; RECENT],
            recent_len: 0,
            evict: 0,
        }
    }

    /// The sum of `key`, `zero` where it has none yet.
    fn slot(&mut self, key: K, zero: V) -> &mut V {
        let hit = self.recent[..self.recent_len]
            .iter()
            .copied()
            .find(|&i| self.slots[i].0 == key);
        let i = match hit {
            Some(i) => i,
            None => {
                let i = match self.index.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => *e.get(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        self.slots.push((key, zero));
                        *e.insert(self.slots.len() - 1)
                    }
                };
                if self.recent_len < RECENT {
                    self.recent[self.recent_len] = i;
                    self.recent_len += 1;
                } else {
                    self.recent[self.evict] = i;
                    self.evict = (self.evict + 1) % RECENT;
                }
                i
            }
        };
        &mut self.slots[i].1
    }

    /// The sums, one per key.
    fn into_map(self) -> FxHashMap<K, V> {
        let map: FxHashMap<K, V> = self.slots.into_iter().collect();
        assert_eq!(map.len(), self.index.len(), "a key summed in two slots");
        map
    }
}

/// Adds `amount` to the cost of `usage` (of `node`, at `at`) in `currency`.
fn add_cost<'a>(
    cost: &mut Sums<CostKey<'a>, ExactSum>,
    index: u64,
    node: &'a AccountPath,
    at: Timestamp,
    usage: &'a ciyuan_core::Usage,
    currency: ciyuan_core::Currency,
    amount: rust_decimal::Decimal,
) -> Result<(), StoreError> {
    let slot = cost.slot(
        CostKey {
            account: node,
            hour: floor_hour(at),
            service: &usage.service,
            model: usage.model.as_deref().unwrap_or(""),
            currency,
        },
        ExactSum::ZERO,
    );
    *slot = slot
        .checked_add(ExactSum::of(amount))
        .ok_or_else(|| StoreError::Backend(format!("cost sum overflows at entry {index}")))?;
    Ok(())
}

/// How a rating's lines are billed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Billed {
    /// As usage.
    Usage,
    /// Taken back by a correction: an adjustment, every figure negated.
    Withdrawn,
    /// Given by a correction: an adjustment.
    Corrected,
}

/// Adds the billing lines of `rating` (of `usage` of `node`, billed at `at`): one per
/// rated line at its list price (contracted = the line after the contract's discount
/// and markup), and a `rounding` adjustment for what the book's rounding of the
/// entry's total added, so the lines of an entry sum to its amount exactly.
fn add_lines<'a>(
    lines: &mut Sums<LineKey<'a>, [ExactSum; 4]>,
    index: u64,
    node: &'a AccountPath,
    at: Timestamp,
    usage: &'a ciyuan_core::Usage,
    rating: &'a ciyuan_core::Rating,
    billed: Billed,
) -> Result<(), StoreError> {
    let overflow = || StoreError::Backend(format!("billing line sum overflows at entry {index}"));
    let sign = |s: ExactSum| {
        if billed == Billed::Withdrawn {
            s.checked_neg().ok_or_else(overflow)
        } else {
            Ok(s)
        }
    };
    // Without a discount or markup a line's contracted amount is its list amount.
    let plain = rating.discount_percent.is_none() && rating.markup_percent.is_none();
    let adjustment = billed != Billed::Usage;
    let mut key = LineKey {
        account: node,
        hour: floor_hour(at),
        adjustment,
        service: &usage.service,
        model: usage.model.as_deref().unwrap_or(""),
        key: LineOf::Rounding,
        unit_price: None,
        currency: rating.currency,
        book: &rating.book,
        version: rating.version,
    };
    let mut contracted_sum = ExactSum::ZERO;
    for l in &rating.lines {
        let list = ExactSum::of(l.amount);
        let contracted = if plain {
            list
        } else {
            ExactSum::of(
                ciyuan_core::Rating::adjust(
                    l.amount,
                    rating.discount_percent,
                    rating.markup_percent,
                )
                .ok_or_else(overflow)?,
            )
        };
        contracted_sum = contracted_sum
            .checked_add(contracted)
            .ok_or_else(overflow)?;
        key.key = LineOf::Price(&l.key);
        key.unit_price = Some(l.unit_price.normalize());
        let contracted = sign(contracted)?;
        add_line(
            lines,
            key,
            [
                sign(ExactSum::of(l.quantity))?,
                sign(list)?,
                contracted,
                contracted,
            ],
        )
        .ok_or_else(overflow)?;
    }
    let rounding = ExactSum::of(rating.amount)
        .checked_sub(contracted_sum)
        .ok_or_else(overflow)?;
    if rounding != ExactSum::ZERO {
        key.key = LineOf::Rounding;
        key.unit_price = None;
        key.adjustment = true;
        add_line(
            lines,
            key,
            [
                ExactSum::ZERO,
                ExactSum::ZERO,
                ExactSum::ZERO,
                sign(rounding)?,
            ],
        )
        .ok_or_else(overflow)?;
    }
    Ok(())
}

/// Adds a credit of `amount` (billed negative) to `node`'s lines at `hour`.
#[allow(clippy::too_many_arguments)]
fn add_credit<'a>(
    lines: &mut Sums<LineKey<'a>, [ExactSum; 4]>,
    index: u64,
    node: &'a AccountPath,
    hour: i64,
    key: LineOf<'a>,
    currency: Currency,
    book: &'a str,
    version: u32,
    amount: Decimal,
) -> Result<(), StoreError> {
    add_line(
        lines,
        LineKey {
            account: node,
            hour,
            adjustment: true,
            service: "",
            model: "",
            key,
            unit_price: None,
            currency,
            book,
            version,
        },
        [
            ExactSum::ZERO,
            ExactSum::ZERO,
            ExactSum::ZERO,
            ExactSum::of(-amount),
        ],
    )
    .ok_or_else(|| StoreError::Backend(format!("billing line sum overflows at entry {index}")))
}

fn add_line<'a>(
    lines: &mut Sums<LineKey<'a>, [ExactSum; 4]>,
    key: LineKey<'a>,
    add: [ExactSum; 4],
) -> Option<()> {
    let slot = lines.slot(key, [ExactSum::ZERO; 4]);
    for (s, a) in slot.iter_mut().zip(add) {
        *s = s.checked_add(a)?;
    }
    Some(())
}

/// Entries to project, with the [`ciyuan_core::ingest_key_hash`] of each where its
/// appender already computed them (the ingest door does, to claim the events).
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    /// The entries.
    pub entries: &'a [Entry],
    /// One hash per entry, each that of the entry's ingest key where it has one.
    pub ingest_hashes: Option<&'a [u64]>,
}

/// Projects entries `start..` (the concatenation of `parts`).
///
/// Errors only on a sum that leaves 128 bits, which no real ledger reaches (each count
/// is an i64 and a batch holds a bounded number of entries).
pub fn project<'a>(start: u64, parts: &[&'a [Entry]]) -> Result<Projected<'a>, StoreError> {
    let parts: Vec<Part<'a>> = parts
        .iter()
        .map(|entries| Part {
            entries,
            ingest_hashes: None,
        })
        .collect();
    project_parts(start, &parts)
}

/// [`project`] of parts whose ingest key hashes may be known.
pub fn project_parts<'a>(start: u64, parts: &[Part<'a>]) -> Result<Projected<'a>, StoreError> {
    for p in parts {
        if let Some(h) = p.ingest_hashes {
            assert_eq!(h.len(), p.entries.len(), "one ingest hash per entry");
        }
    }
    let count: usize = parts.iter().map(|p| p.entries.len()).sum();
    let mut out = Projected {
        changes: Vec::new(),
        ingest: Vec::with_capacity(count),
        usage: FxHashMap::default(),
        cost: FxHashMap::default(),
        tiers: FxHashMap::default(),
        lines: FxHashMap::default(),
        quality_hours: FxHashMap::default(),
        usage_tree: FxHashMap::default(),
        cost_tree: FxHashMap::default(),
    };
    let mut usage: Sums<RollupKey<'a>, i128> = Sums::new();
    let mut cost = Sums::new();
    let mut lines = Sums::new();
    let entries = parts.iter().flat_map(|p| {
        p.entries
            .iter()
            .enumerate()
            .map(|(j, e)| (e, p.ingest_hashes.and_then(|h| h.get(j).copied())))
    });
    for (i, (entry, known)) in entries.enumerate() {
        let index = start + i as u64;
        let node = &entry.account;
        let (service, model, tokens) = match &entry.body {
            EntryBody::Usage(u) => {
                if let Some((source, id)) = u.ingest_key() {
                    let hash = known.unwrap_or_else(|| ciyuan_core::ingest_key_hash(source, id));
                    debug_assert_eq!(hash, ciyuan_core::ingest_key_hash(source, id));
                    out.ingest.push((index, hash));
                }
                if let Some(r) = &u.rating {
                    add_cost(&mut cost, index, node, entry.ts, u, r.currency, r.amount)?;
                    add_lines(&mut lines, index, node, entry.ts, u, r, Billed::Usage)?;
                    if let Some(p) = &r.place {
                        let slot = out
                            .tiers
                            .entry(TierCounterKey {
                                node: &p.node,
                                book: &r.book,
                                rule: &p.rule,
                                period: p.period,
                            })
                            .or_insert(ExactSum::ZERO);
                        *slot = slot.checked_add(ExactSum::of(p.units)).ok_or_else(|| {
                            StoreError::Backend(format!("tier units overflow at entry {index}"))
                        })?;
                    }
                }
                if let Some(q) = &u.quality
                    && let Some(id) = &q.response_id
                {
                    out.changes.push(Change::ResponseStored {
                        entry: index,
                        at: entry.ts,
                        node,
                        id,
                        upstream: &q.upstream,
                    });
                }
                if u.quality.is_some() {
                    let slot = out
                        .quality_hours
                        .entry(floor_hour(entry.ts))
                        .or_insert((index, index));
                    slot.0 = slot.0.min(index);
                    slot.1 = slot.1.max(index);
                }
                if u.recount.as_ref().is_some_and(|r| r.flagged) {
                    out.changes.push(Change::Flagged {
                        entry: index,
                        at: entry.ts,
                        node,
                        usage: u,
                    });
                }
                (u.service.as_str(), u.model.as_deref(), &u.tokens)
            }
            EntryBody::Adjustment(a) => (a.service.as_str(), a.model.as_deref(), &a.tokens),
            EntryBody::AccountCreated(info) => {
                out.changes.push(Change::AccountCreated {
                    entry: index,
                    at: entry.ts,
                    path: node,
                    info,
                });
                continue;
            }
            EntryBody::AccountUpdated(info) => {
                out.changes
                    .push(Change::AccountUpdated { path: node, info });
                continue;
            }
            // Keys are authentication state kept by the store itself (their secret
            // hashes never enter the log); the entries are the audit trail.
            EntryBody::KeyCreated(_) | EntryBody::KeyRevoked(_) => continue,
            EntryBody::BudgetSet(budget) => {
                out.changes.push(Change::BudgetSet {
                    entry: index,
                    node,
                    budget,
                });
                continue;
            }
            EntryBody::BudgetCleared(b) => {
                out.changes.push(Change::BudgetCleared {
                    node,
                    name: &b.name,
                });
                continue;
            }
            EntryBody::AccessSet(rules) => {
                out.changes.push(Change::AccessSet {
                    entry: index,
                    node,
                    rules,
                });
                continue;
            }
            EntryBody::Incident(incident) => {
                out.changes.push(Change::Incident {
                    entry: index,
                    at: entry.ts,
                    node,
                    incident,
                });
                continue;
            }
            EntryBody::DefinitionSet(definition) => {
                out.changes.push(Change::DefinitionSet {
                    entry: index,
                    definition,
                });
                continue;
            }
            EntryBody::PriceBook(book) => {
                out.changes.push(Change::PriceBook { entry: index, book });
                continue;
            }
            EntryBody::PriceContract(contract) => {
                out.changes.push(Change::PriceContract {
                    entry: index,
                    node,
                    contract,
                });
                continue;
            }
            EntryBody::Posting(posting) => {
                // Money given back into a wallet is a credit on the node's statement.
                if posting.kind == ciyuan_core::PostingKind::Refund {
                    for leg in &posting.legs {
                        if let ciyuan_core::LedgerAccount::Cash(to) = &leg.account
                            && !leg.credit.is_zero()
                        {
                            add_credit(
                                &mut lines,
                                index,
                                to,
                                floor_hour(entry.ts),
                                LineOf::Refund,
                                posting.currency,
                                "",
                                0,
                                leg.credit,
                            )?;
                        }
                    }
                }
                out.changes.push(Change::Posting {
                    entry: index,
                    at: entry.ts,
                    node,
                    posting,
                });
                continue;
            }
            EntryBody::WalletSet(settings) => {
                out.changes.push(Change::WalletSet {
                    entry: index,
                    node,
                    settings,
                });
                continue;
            }
            // The result is read from the log (`ciyuan audit`); nothing is projected.
            EntryBody::Reconciled(_) => continue,
            EntryBody::ServiceLevelEvaluated(evaluated) => {
                // Billed in the period's last hour: on the period's own statement while
                // it is open, else carried to the next open one as a late item.
                let hour = floor_hour(
                    evaluated
                        .to
                        .checked_sub(ciyuan_core::jiff::SignedDuration::from_secs(1))
                        .map_err(|e| StoreError::Backend(format!("entry {index}: {e}")))?,
                );
                for c in &evaluated.credits {
                    add_credit(
                        &mut lines,
                        index,
                        node,
                        hour,
                        LineOf::ServiceCredit(&evaluated.level.name),
                        c.currency,
                        &c.book,
                        c.version,
                        c.amount,
                    )?;
                }
                out.changes.push(Change::ServiceLevelEvaluated {
                    entry: index,
                    at: entry.ts,
                    node,
                    evaluated,
                });
                continue;
            }
            EntryBody::ReportDelivered(delivered) => {
                out.changes.push(Change::ReportDelivered {
                    entry: index,
                    at: entry.ts,
                    node,
                    delivered,
                });
                continue;
            }
            EntryBody::StatementClosed(closed) => {
                out.changes.push(Change::StatementClosed {
                    entry: index,
                    at: entry.ts,
                    node,
                    closed,
                });
                continue;
            }
            // The usage entry's cost becomes the new rating's, at the usage's time.
            EntryBody::RatingCorrection(c) => {
                for (currency, amount) in c.changes() {
                    add_cost(&mut cost, index, node, c.at, &c.usage, currency, amount)?;
                }
                // Billed when it is made: a period already billed is never reopened.
                add_lines(
                    &mut lines,
                    index,
                    node,
                    entry.ts,
                    &c.usage,
                    &c.previous,
                    Billed::Withdrawn,
                )?;
                add_lines(
                    &mut lines,
                    index,
                    node,
                    entry.ts,
                    &c.usage,
                    &c.rating,
                    Billed::Corrected,
                )?;
                continue;
            }
        };
        let hour = floor_hour(entry.ts);
        for t in tokens.iter() {
            let slot = usage.slot(
                RollupKey {
                    account: node,
                    hour,
                    service,
                    model: model.unwrap_or(""),
                    modality: t.modality,
                    direction: t.direction,
                },
                0,
            );
            *slot = slot.checked_add(i128::from(t.count)).ok_or_else(|| {
                StoreError::Backend(format!("token sum overflows at entry {index}"))
            })?;
        }
    }
    out.usage = usage.into_map();
    out.cost = cost.into_map();
    out.lines = lines.into_map();
    out.usage_tree = crate::tree::tree_usage(&out.usage)?;
    out.cost_tree = crate::tree::tree_cost(&out.cost)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{BudgetCleared, TokenMap};

    #[test]
    fn sums_fronted_by_recent_slots_equal_a_plain_map() {
        use proptest::prelude::*;
        // Few keys (all recent) and many (evicted and found again by hashing).
        proptest!(|(adds in proptest::collection::vec((0u8..24, -1000i64..1000), 0..400))| {
            let mut sums: Sums<u8, i128> = Sums::new();
            let mut plain: FxHashMap<u8, i128> = FxHashMap::default();
            for (k, v) in adds {
                *sums.slot(k, 0) += i128::from(v);
                *plain.entry(k).or_insert(0) += i128::from(v);
            }
            prop_assert_eq!(sums.into_map(), plain);
        });
    }

    #[test]
    fn billing_lines_of_any_rating_sum_to_its_amount_exactly() {
        use ciyuan_core::{PriceKey, RatedLine, Rating, Rounding, RoundingAt, RoundingMode, Usage};
        use proptest::prelude::*;
        let keys = [
            "text.input",
            "text.output",
            "text.cached_input",
            "measure.pages",
        ];
        let modes = [
            RoundingMode::HalfEven,
            RoundingMode::HalfUp,
            RoundingMode::Down,
            RoundingMode::Up,
        ];
        proptest!(|(lines in proptest::collection::vec((0usize..4, 0u64..5_000_000, 1i64..100_000, 0u32..9), 0..4),
                    discount in proptest::option::of(0u32..10_000),
                    markup in proptest::option::of(0u32..5_000),
                    to in 0u32..11, mode in 0usize..4)| {
            let lines: Vec<RatedLine> = lines
                .iter()
                .map(|(k, q, mantissa, scale)| {
                    let quantity = Decimal::from(*q);
                    let unit_price = Decimal::new(*mantissa, scale + 2);
                    RatedLine {
                        key: keys[*k].parse::<PriceKey>().unwrap(),
                        quantity,
                        unit_price,
                        amount: quantity * unit_price,
                    }
                })
                .collect();
            let mut rating = Rating {
                amount: Decimal::ZERO,
                currency: "CNY".parse().unwrap(),
                book: "list".into(),
                version: 1,
                lines,
                contract: None,
                discount_percent: discount.map(|d| Decimal::new(i64::from(d), 2)),
                markup_percent: markup.map(|m| Decimal::new(i64::from(m), 2)),
                unpriced: false,
                missing: vec![],
                basis: None,
                place: None,
            };
            rating
                .settle(&Rounding { at: RoundingAt::Entry, to, mode: modes[mode] })
                .unwrap();
            let usage = Usage {
                service: "llm.chat".into(),
                model: Some("m".into()),
                rating: Some(Box::new(rating.clone())),
                ..Usage::default()
            };
            let entries = [Entry::new(at("2026-11-02T03:04:05Z"), "acme".parse().unwrap(), EntryBody::Usage(usage))];
            let p = project(0, &[&entries]).unwrap();
            let sum = |i: usize| p.lines.values().fold(ExactSum::ZERO, |a, s| a.checked_add(s[i]).unwrap());
            prop_assert_eq!(sum(3), ExactSum::of(rating.amount));
            let list = rating.lines.iter().fold(ExactSum::ZERO, |a, l| a.plus(l.amount));
            prop_assert_eq!(sum(1), list);
            prop_assert!(p.lines.keys().all(|k| k.adjustment == (k.key == LineOf::Rounding)));
        });
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn usage(account: &str, ts: &str, n: i64, id: Option<&str>) -> Entry {
        let mut tokens = TokenMap::new();
        tokens.add(Modality::Text, Direction::Input, n).unwrap();
        Entry::new(
            at(ts),
            account.parse().unwrap(),
            EntryBody::Usage(Usage {
                service: "llm.chat".into(),
                model: Some("m".into()),
                tokens,
                source: id.map(|_| "app".to_string()),
                event_id: id.map(str::to_string),
                ..Usage::default()
            }),
        )
    }

    #[test]
    fn usage_sums_per_hour_key_and_indexes_ingested_events_in_order() {
        let a = [
            usage("x", "2026-01-01T00:10:00Z", 5, Some("e1")),
            usage("x", "2026-01-01T00:50:00Z", 7, None),
        ];
        let b = [usage("x", "2026-01-01T01:00:00Z", 1, Some("e2"))];
        let p = project(10, &[&a, &b]).unwrap();
        assert_eq!(
            p.ingest,
            vec![
                (10, ciyuan_core::ingest_key_hash("app", "e1")),
                (12, ciyuan_core::ingest_key_hash("app", "e2"))
            ]
        );
        let x: AccountPath = "x".parse().unwrap();
        let key = |hour| RollupKey {
            account: &x,
            hour,
            service: "llm.chat",
            model: "m",
            modality: Modality::Text,
            direction: Direction::Input,
        };
        let h0 = floor_hour(at("2026-01-01T00:00:00Z"));
        assert_eq!(p.usage.get(&key(h0)), Some(&12));
        assert_eq!(p.usage.get(&key(h0 + 3600)), Some(&1));
        assert_eq!(p.usage.len(), 2);
        assert!(p.changes.is_empty());
    }

    #[test]
    fn controls_keep_their_entry_order() {
        let node: AccountPath = "acme".parse().unwrap();
        let set = Entry::new(
            at("2026-01-01T00:00:00Z"),
            node.clone(),
            EntryBody::BudgetSet(BudgetSet {
                name: "m".into(),
                measure: ciyuan_core::BudgetMeasure::Requests,
                selector: ciyuan_core::Selector::default(),
                amount: 1,
                period: ciyuan_core::BudgetPeriod::Day,
                mode: ciyuan_core::BudgetMode::Hard,
                per: ciyuan_core::BudgetPer::Node,
                thresholds: vec![],
                clamp: false,
                set_by: None,
                cost: None,
            }),
        );
        let cleared = Entry::new(
            at("2026-01-01T00:00:01Z"),
            node.clone(),
            EntryBody::BudgetCleared(BudgetCleared {
                name: "m".into(),
                cleared_by: None,
            }),
        );
        let entries = [set, cleared];
        let p = project(0, &[&entries]).unwrap();
        assert!(matches!(p.changes[0], Change::BudgetSet { entry: 0, .. }));
        assert!(matches!(
            p.changes[1],
            Change::BudgetCleared { name: "m", .. }
        ));
    }
}
