//! Gateway requests held across the nodes sharing one database, beside each node's own
//! budget and wallet engines (`Store::reserve`).
//!
//! A node admits a request in its engines first (they know its own holds and usage,
//! and every other node's entry it has applied); then, when the store is shared, the
//! request's hard limits (node counters) and its wallet hold are held in the database,
//! where the other nodes' requests in flight and their usage this node has not applied
//! yet are counted too. A refusal there takes back the engines' holds. When the
//! request ends, its usage is recorded on its holds with the entry that holds it
//! (after the append), or its holds are dropped (it used nothing).

use crate::App;
use crate::error::ApiError;
use ciyuan_budget::SharedTerm;
use ciyuan_core::{Money, TokenMap};
use ciyuan_store::{HoldTerm, SettledHold};
use rust_decimal::Decimal;
use std::sync::Arc;

/// A request's holds in the database: its own, or its part of this node's slices.
pub(crate) struct SharedHold {
    id: i64,
    terms: Vec<SharedTerm>,
    /// The wallet's counter and currency, where a wallet holds for the request.
    wallet: Option<(String, ciyuan_core::Currency)>,
    /// Admitted from slices (`id` is then no hold's).
    ticket: Option<crate::slices::Ticket>,
}

/// What a held request counts on each counter, once its entry is appended.
pub(crate) struct Settling {
    id: i64,
    actual: Vec<(String, Decimal)>,
    ticket: Option<crate::slices::Ticket>,
    /// Its hold named as counted by this node's engines until its settling in the
    /// database is done (or given up).
    counted: Option<Counting>,
}

/// Holds of this node's requests whose usage its engines count already, their
/// settling in the database not yet done: from the moment a request's usage is
/// counted as it ends until its entry is appended and its hold settled (the
/// recorder's linger, the append, a round trip), the database would count the hold
/// in flight beside the node's own count, and a tight limit's next request would be
/// refused on usage counted twice. Named in every admission (`Store::reserve_many`'s
/// `counted`), they are counted once.
///
/// Exact because of the order things are read and written in: a hold enters the set
/// after the engines counted its usage, and an admission reads the set before the
/// engines' counts, so every hold it names is in those counts; a hold leaves after its
/// settling is done or given up, when the database counts it by its entry (or, given
/// up, at its need until it lapses: twice, on the safe side).
#[derive(Default)]
pub(crate) struct CountedHere(std::sync::Mutex<std::collections::BTreeSet<i64>>);

impl CountedHere {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<i64>> {
        // Inserts and removes only: a panic cannot leave it half-changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The holds counted now, in order.
    pub(crate) fn snapshot(&self) -> Counted {
        Counted(self.lock().iter().copied().collect())
    }
}

/// Holds a node's engines counted at one moment, in order ([`CountedHere`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted(std::sync::Arc<[i64]>);

impl Counted {
    /// The holds in every one of `all`: a group of admissions judged in one call
    /// names only holds each of them counted (naming one another had not counted
    /// would count its usage nowhere).
    pub fn common<'a>(all: impl IntoIterator<Item = &'a Counted>) -> Vec<i64> {
        let mut all = all.into_iter();
        let Some(first) = all.next() else {
            return Vec::new();
        };
        let mut ids: Vec<i64> = first.0.to_vec();
        for other in all {
            ids.retain(|id| other.0.binary_search(id).is_ok());
        }
        ids
    }
}

/// A hold in [`CountedHere`], taken out when dropped. (It holds the set, not the
/// `App`: a settling waiting in the recorder's queue must not keep the `App` alive.)
pub(crate) struct Counting {
    set: Arc<CountedHere>,
    id: i64,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

impl SharedHold {
    /// What the request that used `tokens` and cost `cost` counts on its counters;
    /// called once `app`'s engines counted it (budgets settled, wallet charged).
    pub(crate) fn settling(
        self,
        app: &Arc<App>,
        tokens: &TokenMap,
        cost: Option<Money>,
    ) -> Settling {
        let mut actual: Vec<(String, Decimal)> = self
            .terms
            .iter()
            .map(|t| (t.counter.clone(), t.actual(tokens, cost)))
            .collect();
        if let Some((counter, currency)) = self.wallet {
            let spent = match cost {
                Some(m) if m.currency == currency => m.amount,
                _ => Decimal::ZERO,
            };
            actual.push((counter, spent));
        }
        // Held alone in the database: counted here from now on. (A request from
        // slices holds nothing of its own there.)
        let counted = self.ticket.is_none().then(|| {
            app.holder.counted.lock().insert(self.id);
            Counting {
                set: app.holder.counted.clone(),
                id: self.id,
            }
        });
        Settling {
            id: self.id,
            actual,
            ticket: self.ticket,
            counted,
        }
    }
}

/// A request waiting to be held, with where its answer goes.
pub(crate) struct Ask {
    id: i64,
    terms: Vec<HoldTerm>,
    seen: ciyuan_store::Seen,
    counted: Counted,
    answer: tokio::sync::oneshot::Sender<Result<Option<(usize, Decimal)>, ApiError>>,
}

/// Most requests held in one call.
const HOLD_GROUP: usize = 256;

/// The queue of requests waiting to be held: one task takes every request waiting
/// into one call of `Store::reserve_many` (as group commit does for appends), so a
/// hot counter's lock is taken once per group, not once per request.
#[derive(Default)]
pub(crate) struct Holder {
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Ask>>,
    counted: Arc<CountedHere>,
    /// Held while a request's usage is counted by the engines and its hold named in
    /// `counted`, and while an admission reads `counted` and the engines' counts: an
    /// admission sees both or neither, never the usage without the name (which would
    /// count it twice and refuse a request that fits).
    gate: std::sync::Mutex<()>,
}

/// Holds the groups of requests `rx` brings, one call at a time.
async fn hold_groups(app: std::sync::Weak<App>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Ask>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < HOLD_GROUP {
            match rx.try_recv() {
                Ok(a) => group.push(a),
                Err(_) => break,
            }
        }
        let Some(app) = app.upgrade() else { return };
        // The least of the group: what any of them may not hold is counted for all
        // (more, never less).
        let seen = ciyuan_store::Seen::least(group.iter().map(|a| &a.seen));
        let counted = Counted::common(group.iter().map(|a| &a.counted));
        let asked: Vec<(i64, Vec<HoldTerm>)> =
            group.iter().map(|a| (a.id, a.terms.clone())).collect();
        let ttl = app.config.reservation_ttl;
        let answers = app
            .blocking(move |app| {
                let requests: Vec<(i64, &[HoldTerm])> =
                    asked.iter().map(|(id, t)| (*id, t.as_slice())).collect();
                Ok(app
                    .store
                    .reserve_many(&app.node, seen, &counted, &requests, ttl)?)
            })
            .await;
        match answers {
            Ok(answers) => {
                for (ask, answer) in group.into_iter().zip(answers) {
                    let held = answer.is_none();
                    // The request went (its client left) while it waited: what was
                    // held for it goes too.
                    if ask.answer.send(Ok(answer)).is_err() && held {
                        let id = ask.id;
                        if let Err(e) = app
                            .blocking(move |app| Ok(app.store.release_hold(id)?))
                            .await
                        {
                            tracing::warn!(detail = %e.detail, "a gone request's hold lapses");
                        }
                    }
                }
            }
            Err(e) => {
                for ask in group {
                    let mut each = ApiError::new(e.status, e.slug, e.detail.clone());
                    each.retry_after_secs = e.retry_after_secs;
                    drop(ask.answer.send(Err(each)));
                }
            }
        }
    }
}

/// Why a request cannot be held across nodes: a limit or wallet the other nodes hold
/// too much of (the message names it), or the database failing.
pub(crate) enum NotHeld {
    Refused(String),
    Failed(ApiError),
}

/// The counter of a wallet.
fn wallet_counter(node: &ciyuan_core::AccountPath, currency: ciyuan_core::Currency) -> String {
    format!("wallet\u{1f}{node}\u{1f}{currency}")
}

impl App {
    /// The gate of [`Holder`]'s `gate` field, taken.
    pub(crate) fn counting_gate(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data: a panic while it was held leaves nothing half-changed.
        self.holder
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The holder's queue (its task started on first use).
    fn holder(self: &Arc<Self>) -> &tokio::sync::mpsc::UnboundedSender<Ask> {
        self.holder.queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(hold_groups(Arc::downgrade(self), rx));
            tx
        })
    }

    /// Holds an admitted request in the database the nodes share (nothing when the
    /// store is this node's alone, or the request holds no hard limit and no wallet).
    pub(crate) async fn hold_across_nodes(
        self: &Arc<Self>,
        reservation: u64,
        hold: Option<&ciyuan_budget::Hold>,
    ) -> Result<Option<SharedHold>, NotHeld> {
        if !self.store.shares_holds() {
            return Ok(None);
        }
        // How far this node has followed, read before what its engines count: entries
        // applied in between are then counted twice (as applied, and as other nodes'
        // recorded holds), never missed.
        // Likewise this node's own entries: those below the log's size now were
        // counted by the engines before they were appended.
        let seen = ciyuan_store::Seen {
            followed: self.followed(),
            own_from: self.log.size(),
        };
        // Then the holds the engines count already, with their counts: every hold
        // named is in the counts read below (see `CountedHere`).
        let gate = self.counting_gate();
        let counted = self.holder.counted.snapshot();
        let terms = self.budget.shared_terms(reservation);
        let mut held: Vec<HoldTerm> = terms
            .iter()
            .map(|t| HoldTerm {
                counter: t.counter.clone(),
                local: t.local,
                need: t.need,
                amount: t.amount,
            })
            .collect();
        let mut wallet = None;
        if let Some(h) = hold {
            let now = ciyuan_core::jiff::Timestamp::now();
            let view = self
                .wallets
                .balance(&h.node, h.currency, now)
                .ok_or_else(|| {
                    NotHeld::Failed(ApiError::internal(format!(
                        "the wallet of {} in {} holding a request is gone",
                        h.node, h.currency
                    )))
                })?;
            let counter = wallet_counter(&h.node, h.currency);
            let too_large = || {
                NotHeld::Failed(ApiError::internal(format!(
                    "the wallet of {} in {} holds more than a decimal carries",
                    h.node, h.currency
                )))
            };
            held.push(HoldTerm {
                counter: counter.clone(),
                // Spent is out of the balance already; holds are the database's.
                local: Decimal::ZERO,
                need: h.amount,
                amount: view
                    .balance
                    .plus(view.overdraft)
                    .to_decimal()
                    .ok_or_else(too_large)?,
            });
            wallet = Some((counter, h.currency));
        }
        drop(gate);
        if held.is_empty() {
            return Ok(None);
        }
        if let Some(slices) = &self.slices {
            let wants: Vec<crate::slices::Want<'_>> = held
                .iter()
                .enumerate()
                .map(|(i, term)| crate::slices::Want {
                    term,
                    // The limits' terms come first, the wallet's last.
                    fixed_amount: i < terms.len(),
                })
                .collect();
            if let Some(ticket) = slices.admit(seen, &counted, &wants) {
                return Ok(Some(SharedHold {
                    id: 0,
                    terms,
                    wallet,
                    ticket: Some(ticket),
                }));
            }
        }
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| NotHeld::Failed(ApiError::internal(e)))?;
        // Positive, so it reads the same as a BIGINT everywhere.
        let id = (u64::from_le_bytes(raw) >> 1) as i64;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.holder()
            .send(Ask {
                id,
                terms: held.clone(),
                seen,
                counted,
                answer: tx,
            })
            .map_err(|_| NotHeld::Failed(ApiError::unavailable("the holder stopped")))?;
        let refused = rx
            .await
            .map_err(|_| NotHeld::Failed(ApiError::unavailable("the holder stopped")))?
            .map_err(NotHeld::Failed)?;
        match refused {
            None => Ok(Some(SharedHold {
                id,
                terms,
                wallet,
                ticket: None,
            })),
            Some((i, elsewhere)) => {
                let t = &held[i];
                let what = match terms.get(i) {
                    Some(term) => term.describe.clone(),
                    None => "the wallet paying for this request".to_string(),
                };
                Err(NotHeld::Refused(format!(
                    "{what}: {} allowed, {} used as this node knows, {elsewhere} held by requests in flight on every node or used on others, this request needs {}",
                    t.amount, t.local, t.need
                )))
            }
        }
    }

    /// Records held requests' usage on their holds, now that `entries` hold it.
    pub(crate) fn settle_across_nodes(self: &Arc<Self>, settled: Vec<(Settling, u64)>) {
        let mut list: Vec<SettledHold> = Vec::with_capacity(settled.len());
        let mut counting = Vec::with_capacity(settled.len());
        for (s, entry) in settled {
            match (s.ticket, &self.slices) {
                (Some(ticket), Some(slices)) => slices.settle(ticket, &s.actual, entry),
                _ => list.push(SettledHold {
                    id: s.id,
                    entry,
                    actual: s.actual,
                }),
            }
            counting.push(s.counted);
        }
        if list.is_empty() {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let settled = app
                .blocking(move |app| Ok(app.store.settle_holds(&list)?))
                .await;
            // Settled, the database counts each hold by its entry: no longer named.
            drop(counting);
            if let Err(e) = settled {
                // The holds keep counting their requests' maximum until they lapse:
                // the limit errs on the safe side.
                tracing::warn!(detail = %e.detail, "recording held requests' usage failed");
            }
        });
    }

    /// Drops the holds of a request that recorded nothing.
    pub(crate) fn release_across_nodes(self: &Arc<Self>, held: Option<SharedHold>) {
        let Some(held) = held else { return };
        if held.ticket.is_some() {
            // Dropped, the ticket gives its needs back to the slices.
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            if let Err(e) = app
                .blocking(move |app| Ok(app.store.release_hold(held.id)?))
                .await
            {
                tracing::warn!(detail = %e.detail, "dropping a request's holds failed; they lapse");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of admissions names only the holds every one of them counted, and a
    /// hold leaves the set when its settling is done (its `Counting` dropped).
    #[test]
    fn counted_holds_are_named_while_counted_and_only_if_every_asker_counted_them() {
        let here = Arc::new(CountedHere::default());
        let counting = |id: i64| {
            here.lock().insert(id);
            Counting {
                set: here.clone(),
                id,
            }
        };
        let first = counting(7);
        let second = counting(3);
        let early = here.snapshot();
        assert_eq!(&*early.0, &[3, 7], "in order");
        drop(first);
        let third = counting(9);
        let late = here.snapshot();
        assert_eq!(&*late.0, &[3, 9]);
        // 7 is not in the late snapshot, 9 not in the early one: only 3 is common.
        assert_eq!(Counted::common([&early, &late]), vec![3]);
        assert_eq!(Counted::common([&late]), vec![3, 9]);
        assert!(Counted::common(std::iter::empty::<&Counted>()).is_empty());
        drop((second, third));
        assert!(here.snapshot().0.is_empty(), "settled: named no more");
    }
}
