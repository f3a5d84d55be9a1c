//! Graduated and volume tiers: where each tiered usage entry's units are placed in
//! their period, so its rating follows the units counted before it.
//!
//! A counter is named by the billing node (the node whose contract priced the entry,
//! else the entry's top-level account), the book, the rule ([`PriceRule::counter_name`],
//! which carries on across book versions) and the period (a day or month in the
//! billing node's time zone). Places follow the ledger's order: an entry is placed
//! under the counters' lock, and the lock is released only once the entry holds its
//! place in the ledger (as `App::rules_gate` is), so on every counter each entry's
//! `before` is the sum of the units of the entries before it in the log. A crash loses
//! only a suffix of the log, and the counters are rebuilt from the projection of what
//! is durable: no gap and no overlap, which `ciyuan audit verify` checks.
//!
//! Only entries whose rule has tiers take the lock; with no tiered rule recorded,
//! nothing here runs.
//!
//! [`PriceRule::counter_name`]: ciyuan_core::PriceRule::counter_name

use crate::App;
use crate::error::ApiError;
use crate::prices::Prices;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::{AccountPath, Entry, EntryBody, TierPlace};
use ciyuan_store::Store;
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};

/// (billing node, book, rule, period start) to the units counted on it.
pub(crate) type Counters = FxHashMap<(AccountPath, String, String, Timestamp), Decimal>;

/// The counters' lock, held from an entry's placement until it holds its place in
/// the ledger.
pub(crate) type TiersGuard = tokio::sync::OwnedMutexGuard<Counters>;

/// The tier counters and the billing nodes' time zones.
pub(crate) struct Tiers {
    counters: Arc<tokio::sync::Mutex<Counters>>,
    /// Effective time zones of billing nodes, read from the store on first use and
    /// forgotten when an account's zone changes.
    zones: Mutex<FxHashMap<AccountPath, TimeZone>>,
}

impl Tiers {
    /// The counters as the store's projection has them.
    pub(crate) fn load(store: &dyn Store) -> Result<Tiers, ApiError> {
        let mut counters = Counters::default();
        for t in store.tier_units()? {
            let units = t.units.to_decimal().ok_or_else(|| {
                ApiError::internal(format!(
                    "the tier units of {} on {} ({}) do not fit a decimal",
                    t.node, t.rule, t.units
                ))
            })?;
            counters.insert((t.node, t.book, t.rule, t.period), units);
        }
        Ok(Tiers {
            counters: Arc::new(tokio::sync::Mutex::new(counters)),
            zones: Mutex::default(),
        })
    }

    /// Takes the counters' lock.
    pub(crate) async fn lock(&self) -> TiersGuard {
        self.counters.clone().lock_owned().await
    }

    /// Forgets the zones read so far (an account's zone changed).
    pub(crate) fn forget_zones(&self) {
        self.zones.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl App {
    /// The effective time zone of `node` (its own, or its nearest ancestor's).
    fn zone_of(&self, node: &AccountPath) -> Result<TimeZone, ApiError> {
        if let Some(z) = self
            .tiers
            .zones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            return Ok(z.clone());
        }
        let zone = ciyuan_store::effective_time_zone(self.store.as_ref(), node)?;
        self.tiers
            .zones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), zone.clone());
        Ok(zone)
    }

    /// Places a rated usage entry's units on its tier counter and rates it again from
    /// that place; nothing when the rule that prices it has no tiers. The caller
    /// holds `counters` (the lock of [`Tiers`]) until the entry holds its place in
    /// the ledger. True when the entry was placed.
    pub(crate) fn place_tiers(
        &self,
        prices: &Prices,
        counters: &mut Counters,
        entry: &mut Entry,
    ) -> Result<bool, ApiError> {
        let EntryBody::Usage(u) = &mut entry.body else {
            return Ok(false);
        };
        let Some(rating) = u.rating.as_deref() else {
            return Ok(false);
        };
        if rating.unpriced {
            return Ok(false);
        }
        let Some(rater) = prices.rater_for(&entry.account, entry.ts) else {
            return Ok(false);
        };
        let basis = rating.basis;
        let tokens = crate::prices::priced_tokens(u, basis);
        let mut input = crate::prices::usage_input(u, &tokens, entry.ts, Decimal::ZERO);
        // The entry was rated from these inputs a moment ago: a counter that cannot be
        // read from them now is a bug, and says so.
        let counter = rater
            .tier_counter(&input)
            .map_err(|e| ApiError::internal(format!("tier counter of a rated entry: {e}")))?;
        let Some(counter) = counter else {
            return Ok(false);
        };
        let node = TierPlace::billing_node(rater.contract(), &entry.account);
        let zone = self.zone_of(&node)?;
        let period =
            ciyuan_price::period_start(counter.period, &zone, entry.ts).ok_or_else(|| {
                ApiError::internal(format!(
                    "no tier period holds {} in {node}'s zone",
                    entry.ts
                ))
            })?;
        let key = (
            node.clone(),
            rater.book().0.to_string(),
            counter.rule.clone(),
            period,
        );
        let before = counters.get(&key).copied().unwrap_or(Decimal::ZERO);
        input.period_to_date = before;
        let mut placed = rater
            .rate(&input)
            .map_err(|e| ApiError::internal(format!("rating from the entry's tier place: {e}")))?;
        placed.basis = basis;
        placed.place = Some(TierPlace {
            node,
            rule: counter.rule,
            period,
            before,
            units: counter.units,
        });
        let after = before.checked_add(counter.units).ok_or_else(|| {
            ApiError::internal(format!(
                "the tier counter of {} overflows ({before} + {})",
                key.0, counter.units
            ))
        })?;
        counters.insert(key, after);
        u.rating = Some(Box::new(placed));
        Ok(true)
    }
}
