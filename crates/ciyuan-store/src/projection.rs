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
}

/// Adds `amount` to the cost of `usage` (of `node`, at `at`) in `currency`.
fn add_cost<'a>(
    cost: &mut CostSums<'a>,
    index: u64,
    node: &'a AccountPath,
    at: Timestamp,
    usage: &'a ciyuan_core::Usage,
    currency: ciyuan_core::Currency,
    amount: rust_decimal::Decimal,
) -> Result<(), StoreError> {
    let slot = cost
        .entry(CostKey {
            account: node,
            hour: floor_hour(at),
            service: &usage.service,
            model: usage.model.as_deref().unwrap_or(""),
            currency,
        })
        .or_insert(ExactSum::ZERO);
    *slot = slot
        .checked_add(ExactSum::of(amount))
        .ok_or_else(|| StoreError::Backend(format!("cost sum overflows at entry {index}")))?;
    Ok(())
}

/// Projects entries `start..` (the concatenation of `parts`).
///
/// Errors only on a sum that leaves 128 bits, which no real ledger reaches (each count
/// is an i64 and a batch holds a bounded number of entries).
pub fn project<'a>(start: u64, parts: &[&'a [Entry]]) -> Result<Projected<'a>, StoreError> {
    let count: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Projected {
        changes: Vec::new(),
        ingest: Vec::with_capacity(count),
        usage: FxHashMap::default(),
        cost: FxHashMap::default(),
        tiers: FxHashMap::default(),
    };
    for (i, entry) in parts.iter().flat_map(|p| p.iter()).enumerate() {
        let index = start + i as u64;
        let node = &entry.account;
        let (service, model, tokens) = match &entry.body {
            EntryBody::Usage(u) => {
                if let Some((source, id)) = u.ingest_key() {
                    out.ingest
                        .push((index, ciyuan_core::ingest_key_hash(source, id)));
                }
                if let Some(r) = &u.rating {
                    add_cost(
                        &mut out.cost,
                        index,
                        node,
                        entry.ts,
                        u,
                        r.currency,
                        r.amount,
                    )?;
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
            // The usage entry's cost becomes the new rating's, at the usage's time.
            EntryBody::RatingCorrection(c) => {
                for (currency, amount) in c.changes() {
                    add_cost(&mut out.cost, index, node, c.at, &c.usage, currency, amount)?;
                }
                continue;
            }
        };
        let hour = floor_hour(entry.ts);
        for t in tokens.iter() {
            let slot = out
                .usage
                .entry(RollupKey {
                    account: node,
                    hour,
                    service,
                    model: model.unwrap_or(""),
                    modality: t.modality,
                    direction: t.direction,
                })
                .or_insert(0);
            *slot = slot.checked_add(i128::from(t.count)).ok_or_else(|| {
                StoreError::Backend(format!("token sum overflows at entry {index}"))
            })?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{BudgetCleared, TokenMap};

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
