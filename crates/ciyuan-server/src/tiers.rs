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
//! Several nodes on one database place under one lease (`Store::take_lease`, named
//! `tiers`): a node takes it with its counters' lock, and when it took it anew (another
//! node may have placed since) it first follows the log to the size it reads then, so
//! its counters hold every place made before; the other nodes' places reach its
//! counters from the follower ([`Tiers::elsewhere`]). It keeps the lease while it
//! places, lets it go when another node waits and it has held it for
//! [`LEASE_SHARE`], and lets it go when idle (the heartbeat). Its places are in the
//! log before it lets go: the counters' lock, held until each placed entry is
//! committed (with one node, until it holds its place in the ledger's order), is held
//! while the lease is taken or dropped; another node catches up to the committed log.
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

/// A tier counter: (billing node, book, rule, period start).
pub(crate) type CounterKey = (AccountPath, String, String, Timestamp);

/// Each tier counter to the units counted on it.
pub(crate) type Counters = FxHashMap<CounterKey, Decimal>;

/// The counters' lock, held from an entry's placement until it holds its place in
/// the ledger.
pub(crate) type TiersGuard = tokio::sync::OwnedMutexGuard<Counters>;

/// How long a node placing tiered usage holds the tiers lease (renewed as it
/// places; a node that died is waited for this long).
const LEASE_TERM: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a node keeps the tiers lease while another waits for it.
const LEASE_SHARE: std::time::Duration = std::time::Duration::from_millis(300);

/// How long a node waits for the tiers lease (then answers "try again").
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A lease renewed this recently is not renewed again (one database call per
/// placement would bound tiered usage at the database's round trip).
const LEASE_FRESH: std::time::Duration = std::time::Duration::from_millis(200);

/// A node that placed nothing for this long lets the lease go.
const LEASE_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

/// The lease's name.
const LEASE: &str = "tiers";

/// The tier counters and the billing nodes' time zones.
pub(crate) struct Tiers {
    counters: Arc<tokio::sync::Mutex<Counters>>,
    /// Places other nodes made, from the follower, added to the counters when they
    /// are next locked (the follower must not wait for the counters' lock: a node
    /// taking the lease waits for the follower while holding it).
    elsewhere: Mutex<Vec<(CounterKey, Decimal)>>,
    /// When this node last took or renewed the tiers lease (several nodes only).
    leased: Mutex<Option<std::time::Instant>>,
    /// When this node last locked the counters to place.
    placed_at: Mutex<Option<std::time::Instant>>,
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
            elsewhere: Mutex::default(),
            leased: Mutex::default(),
            placed_at: Mutex::default(),
            zones: Mutex::default(),
        })
    }

    /// Takes the counters' lock (with one node, all there is to placing; with
    /// several, see [`App::lock_tiers`]).
    pub(crate) async fn lock(&self) -> TiersGuard {
        self.counters.clone().lock_owned().await
    }

    /// Notes another node's tier place (the follower): its counter holds at least
    /// the units before and in that entry.
    pub(crate) fn placed_elsewhere(&self, place: &TierPlace, book: &str) -> Result<(), String> {
        let after = place.before.checked_add(place.units).ok_or_else(|| {
            format!(
                "the tier counter of {} overflows ({} + {})",
                place.node, place.before, place.units
            )
        })?;
        self.elsewhere
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((
                (
                    place.node.clone(),
                    book.to_string(),
                    place.rule.clone(),
                    place.period,
                ),
                after,
            ));
        Ok(())
    }

    /// Adds the places other nodes made to `counters`.
    fn merge_elsewhere(&self, counters: &mut Counters) {
        let places = std::mem::take(&mut *self.elsewhere.lock().unwrap_or_else(|p| p.into_inner()));
        for (key, after) in places {
            let c = counters.entry(key).or_insert(Decimal::ZERO);
            if after > *c {
                *c = after;
            }
        }
    }

    /// Forgets the zones read so far (an account's zone changed).
    pub(crate) fn forget_zones(&self) {
        self.zones.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl App {
    /// Takes the tier counters' lock to place entries; with several nodes, also the
    /// tiers lease (see the module's documentation), having followed the log as far
    /// as it reached when the lease was taken anew.
    pub(crate) async fn lock_tiers(self: &Arc<Self>) -> Result<TiersGuard, ApiError> {
        let mut counters = self.tiers.lock().await;
        if self.config.follow.is_none() {
            return Ok(counters);
        }
        let fresh = self
            .tiers
            .leased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < LEASE_FRESH);
        if !fresh {
            let deadline = tokio::time::Instant::now() + LEASE_WAIT;
            loop {
                let taken = self
                    .blocking(|app| {
                        Ok(app
                            .store
                            .take_lease(LEASE, &app.node, LEASE_TERM, LEASE_SHARE)?)
                    })
                    .await?;
                match taken {
                    ciyuan_store::LeaseTaken::Kept => break,
                    ciyuan_store::LeaseTaken::Taken => {
                        // Others may have placed since this node last did: their
                        // places are in the log below its size now.
                        let size = self.log.size();
                        while self.followed() < size {
                            if tokio::time::Instant::now() > deadline {
                                return Err(ApiError::unavailable(format!(
                                    "this node has applied the log up to {} of {size} and \
                                     cannot place tiered usage before it has; try again",
                                    self.followed()
                                )));
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        break;
                    }
                    ciyuan_store::LeaseTaken::Busy => {
                        *self.tiers.leased.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        if tokio::time::Instant::now() > deadline {
                            return Err(ApiError::unavailable(
                                "another node is placing tiered usage; try again",
                            ));
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            }
            *self.tiers.leased.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
        }
        self.tiers.merge_elsewhere(&mut counters);
        *self
            .tiers
            .placed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        Ok(counters)
    }

    /// Lets the tiers lease go if this node holds it and places nothing now (the
    /// heartbeat, every second): another node then need not wait out its term.
    pub(crate) fn release_idle_tiers(&self) {
        let held = self
            .tiers
            .leased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let idle = self
            .tiers
            .placed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= LEASE_IDLE);
        if !held || !idle {
            return;
        }
        // Placing now: it keeps it.
        let Ok(_placing) = self.tiers.counters.clone().try_lock_owned() else {
            return;
        };
        *self.tiers.leased.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = self.store.drop_lease(LEASE, &self.node) {
            tracing::warn!(error = %e, "cannot let the tiers lease go; it lapses");
        }
    }

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
