//! Prepaid wallets: balances rebuilt from the ledger's postings, and admission that
//! never lets admitted requests spend a wallet past zero (or its overdraft).
//!
//! # Which wallet pays
//!
//! A request at node N in currency C is paid from the nearest wallet in C on N's path:
//! N's own, else its parent's, and so on up to the root. A wallet exists on a node
//! once any posting has moved one of its accounts in that currency, or settings
//! ([`WalletSet`]) were applied for it. With no wallet in C anywhere on the path the
//! request is postpaid: [`Wallets::reserve`] answers `Ok(None)` and nothing is held.
//!
//! # Holds are earmarked
//!
//! A hold takes its amount from named sources at once: grants first (valid at the
//! time of the reservation; highest priority, then soonest expiry, then id), then cash
//! (down to minus the overdraft). Settling spends from the same sources, in the same
//! order, so an amount held is always there when it is spent: a grant that expires
//! while a request is in flight keeps the part held for it (that part expires when it
//! is released), and two requests never count on the same money. Hence, for every
//! wallet, at every moment: `cash + overdraft - cash held >= 0` and, for each grant,
//! `balance - held >= 0`, as long as requests cost at most what they held.
//!
//! A request that cost more than it held is still settled in full (the money was
//! spent): the excess is taken from the free rest of valid grants, then from cash,
//! which may then fall below minus the overdraft. [`Charge::beyond_hold`] reports the
//! excess; admission then refuses until the wallet is topped up.
//!
//! Postings returned by [`Wallets::settle`] and [`Wallets::expire_grants`] are already
//! applied (under the same lock, so the next admission sees them): append them to the
//! ledger, but do not apply them again. Everything else (top-ups, grants, refunds,
//! transfers, reversals, settings) is applied with [`Wallets::apply_posting`] and
//! [`Wallets::apply_settings`] after it is appended, and so is every posting when the
//! wallets are rebuilt from the log on start.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{
    AccountPath, Currency, ExactSum, LedgerAccount, Leg, Posting, PostingError, PostingKind,
    WalletSet,
};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

/// Why a call to the wallets failed (refused admissions are [`WalletError::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    /// The wallet cannot pay the request's maximum cost.
    #[error("{0}")]
    Refused(WalletRefusal),
    /// A negative amount where none can be.
    #[error("{field}: {amount} is negative")]
    Negative {
        /// The argument.
        field: &'static str,
        /// Its value.
        amount: Decimal,
    },
    /// The hold was already settled, released or expired (or never existed).
    #[error("no wallet hold {0} (already settled, released or expired)")]
    UnknownHold(u64),
    /// The posting or settings are malformed.
    #[error(transparent)]
    Posting(#[from] PostingError),
    /// A leg moves a wallet outside the subtree of the node the posting is written on.
    #[error("legs[{leg}].account: {account} is outside {node}, the posting's node")]
    Outside {
        /// The leg's index.
        leg: usize,
        /// The account.
        account: String,
        /// The posting's node.
        node: AccountPath,
    },
    /// A cost whose exact split needs more than 28 significant digits.
    #[error("{field}: {amount} cannot be split over the hold's parts within 28 significant digits")]
    Precision {
        /// The argument.
        field: &'static str,
        /// Its value.
        amount: Decimal,
    },
    /// A leg moves a grant that does not exist (or a grant posting repeats an id).
    #[error("legs[{leg}].account: {account}: {why}")]
    Grant {
        /// The leg's index.
        leg: usize,
        /// The account.
        account: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// A refused admission: which wallet, what it has, what the request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletRefusal {
    /// The node of the wallet that would pay.
    pub node: AccountPath,
    /// Its currency.
    pub currency: Currency,
    /// What it could still pay: balance (of valid grants and cash) plus overdraft
    /// minus holds; may be below zero.
    pub available: ExactSum,
    /// The request's maximum cost.
    pub needed: Decimal,
}

impl fmt::Display for WalletRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wallet of {} has {} {} available, this request may cost up to {}",
            self.node, self.available, self.currency, self.needed
        )
    }
}

/// Money held for an admitted request, to be [`Wallets::settle`]d or
/// [`Wallets::release`]d.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Names the hold in `settle` and `release`.
    pub id: u64,
    /// The node of the wallet that pays.
    pub node: AccountPath,
    /// The currency.
    pub currency: Currency,
    /// The amount held (the request's maximum cost).
    pub amount: Decimal,
}

/// What settling a hold spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The node of the wallet that paid: the node to write the posting on.
    pub node: AccountPath,
    /// The `consume` posting, already applied; set its `usage_entry` and append it.
    pub posting: Posting,
    /// How much the actual cost went beyond the hold (zero when within it).
    pub beyond_hold: Decimal,
}

/// One grant's balance as [`Wallets::balance`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantView {
    /// The grant's id.
    pub id: String,
    /// Higher is spent first.
    pub priority: i32,
    /// When its rest expires.
    pub expires_at: Option<Timestamp>,
    /// What is left of it.
    pub balance: ExactSum,
    /// Of that, what holds have earmarked.
    pub reserved: ExactSum,
}

/// A wallet as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletView {
    /// The wallet's node.
    pub node: AccountPath,
    /// Its currency.
    pub currency: Currency,
    /// Cash plus every grant's balance (credits minus debits of its accounts).
    pub balance: ExactSum,
    /// The cash account's balance.
    pub cash: ExactSum,
    /// Held by requests in flight.
    pub reserved: ExactSum,
    /// What a new request may still hold: cash + overdraft + the balances of grants
    /// valid now, minus what is reserved; below zero after spending beyond holds.
    pub available: ExactSum,
    /// How far below zero cash may be spent.
    pub overdraft: Decimal,
    /// The grants, in the order they are spent.
    pub grants: Vec<GrantView>,
}

#[derive(Debug, Clone)]
struct GrantBal {
    /// Unique among all grants in memory.
    serial: u64,
    id: String,
    priority: i32,
    expires_at: Option<Timestamp>,
    left: ExactSum,
    held: ExactSum,
}

impl GrantBal {
    fn valid_at(&self, at: Timestamp) -> bool {
        self.expires_at.is_none_or(|e| at < e)
    }

    /// Whether it still matters at `at`: valid, or holding money or holds.
    fn live_at(&self, at: Timestamp) -> bool {
        self.valid_at(at) || !self.left.is_zero() || !self.held.is_zero()
    }
}

#[derive(Debug, Clone)]
struct Wallet {
    node: AccountPath,
    currency: Currency,
    cash: ExactSum,
    cash_held: ExactSum,
    overdraft: Decimal,
    /// `overdraft`, converted once.
    overdraft_exact: ExactSum,
    /// In spending order: priority (highest first), expiry (soonest first, never
    /// last), id.
    grants: Vec<GrantBal>,
}

impl Wallet {
    fn new(node: AccountPath, currency: Currency) -> Wallet {
        Wallet {
            node,
            currency,
            cash: ExactSum::ZERO,
            cash_held: ExactSum::ZERO,
            overdraft: Decimal::ZERO,
            overdraft_exact: ExactSum::ZERO,
            grants: Vec::new(),
        }
    }

    fn sort_grants(&mut self) {
        self.grants.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| match (a.expires_at, b.expires_at) {
                    (Some(x), Some(y)) => x.cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
                .then_with(|| a.id.cmp(&b.id))
        });
    }

    fn grant_mut(&mut self, id: &str) -> Option<&mut GrantBal> {
        self.grants.iter_mut().find(|g| g.id == id)
    }

    fn grant_by_serial(&mut self, serial: u64) -> Option<&mut GrantBal> {
        self.grants.iter_mut().find(|g| g.serial == serial)
    }

    fn held(&self) -> ExactSum {
        self.grants
            .iter()
            .fold(self.cash_held, |s, g| add(s, g.held))
    }

    fn balance(&self) -> ExactSum {
        self.grants.iter().fold(self.cash, |s, g| add(s, g.left))
    }

    fn available(&self, now: Timestamp) -> ExactSum {
        let mut a = sub(add(self.cash, self.overdraft_exact), self.cash_held);
        for g in self.grants.iter().filter(|g| g.valid_at(now)) {
            a = add(a, sub(g.left, g.held));
        }
        a
    }

    /// Removes grants that are expired, empty and unheld.
    fn drop_spent_grants(&mut self, now: Timestamp) {
        self.grants.retain(|g| g.live_at(now));
    }
}

// Sums of money in a wallet stay far inside ExactSum's range (see its
// documentation); leaving it is a broken invariant, not a value to carry on with.
fn add(a: ExactSum, b: ExactSum) -> ExactSum {
    let s = a.checked_add(b);
    assert!(s.is_some(), "wallet sum {a} + {b} overflows");
    s.unwrap_or(a)
}

fn sub(a: ExactSum, b: ExactSum) -> ExactSum {
    let s = a.checked_sub(b);
    assert!(s.is_some(), "wallet sum {a} - {b} overflows");
    s.unwrap_or(a)
}

/// `a - b` as a `Decimal`, when exact.
fn dsub(a: Decimal, b: Decimal) -> Option<Decimal> {
    dadd(a, -b)
}

/// `a + b` as a `Decimal`, when exact: the mantissas added at the finer scale
/// (cheap, and what almost every sum takes), else through [`ExactSum`] (a result that
/// fits only at a coarser scale).
fn dadd(a: Decimal, b: Decimal) -> Option<Decimal> {
    let s = a.scale().max(b.scale());
    let fast = a
        .mantissa()
        .checked_mul(10i128.pow(s - a.scale()))
        .zip(b.mantissa().checked_mul(10i128.pow(s - b.scale())))
        .and_then(|(x, y)| x.checked_add(y))
        .and_then(|m| Decimal::try_from_i128_with_scale(m, s).ok());
    fast.or_else(|| ExactSum::of(a).checked_add(ExactSum::of(b))?.to_decimal())
}

/// Takes up to `amount` from the free (unheld) rest of `w`'s grants valid at `now`,
/// in spending order, pushing each take to `parts` and passing it to `apply`; returns
/// what is left to find. A take is skipped when what would be left is not exactly a
/// `Decimal` (only amounts of more than 28 significant digits together), so every
/// step is exact.
fn take_from_grants(
    w: &mut Wallet,
    amount: Decimal,
    now: Timestamp,
    parts: &mut Vec<(Source, Decimal)>,
    mut apply: impl FnMut(&mut GrantBal, Decimal),
) -> Decimal {
    let mut rest = amount;
    for gr in w.grants.iter_mut().filter(|gr| gr.valid_at(now)) {
        if rest.is_zero() {
            break;
        }
        let free = sub(gr.left, gr.held);
        if !free.is_positive() {
            continue;
        }
        let take = if ExactSum::of(rest) <= free {
            rest
        } else {
            // free < rest, so within a Decimal's range; the floor stays within free.
            match free.to_decimal_floor() {
                Some(t) => t,
                None => continue,
            }
        };
        let Some(left) = dsub(rest, take) else {
            continue;
        };
        if take.is_zero() {
            continue;
        }
        apply(gr, take);
        parts.push((Source::Grant(gr.serial), take));
        rest = left;
    }
    rest
}

/// What a hold earmarked, source by source, in spending order.
#[derive(Debug, Clone)]
enum Source {
    /// A grant, by its serial (ids are strings; serials spare a copy per hold).
    Grant(u64),
    Cash,
}

#[derive(Debug)]
struct HoldRec {
    /// The wallet's index in [`Inner::wallets`].
    wallet: u32,
    at: Timestamp,
    parts: Vec<(Source, Decimal)>,
}

#[derive(Default)]
struct Inner {
    /// Indexes into `wallets` by currency, then node (`AccountPath::as_str`).
    index: FxHashMap<Currency, FxHashMap<Box<str>, u32>>,
    /// Every wallet; never removed, so an index stays valid.
    wallets: Vec<Wallet>,
    holds: FxHashMap<u64, HoldRec>,
    next_hold: u64,
    next_grant: u64,
}

impl Inner {
    fn wallet_mut(&mut self, node: &AccountPath, currency: Currency) -> &mut Wallet {
        let by_node = self.index.entry(currency).or_default();
        let i = match by_node.get(node.as_str()) {
            Some(&i) => i as usize,
            None => {
                let i = self.wallets.len();
                // Holds name wallets by u32: 4 billion wallets is beyond any memory.
                assert!(i < u32::MAX as usize, "more than 2^32 wallets");
                self.wallets.push(Wallet::new(node.clone(), currency));
                by_node.insert(node.as_str().into(), i as u32);
                i
            }
        };
        &mut self.wallets[i]
    }

    fn wallet(&self, node: &AccountPath, currency: Currency) -> Option<&Wallet> {
        let &i = self.index.get(&currency)?.get(node.as_str())?;
        self.wallets.get(i as usize)
    }

    /// The index of the nearest wallet in `currency` on `node`'s path, the node first.
    fn paying(&self, node: &AccountPath, currency: Currency) -> Option<usize> {
        let by_node = self.index.get(&currency)?;
        let mut candidate = Some(node.as_str());
        while let Some(p) = candidate {
            if let Some(&i) = by_node.get(p) {
                return Some(i as usize);
            }
            candidate = match p.rfind('/') {
                Some(i) => Some(&p[..i]),
                None if !p.is_empty() => Some(""),
                None => None,
            };
        }
        None
    }
}

/// The wallets of every node and currency. Cheap to share (`Send + Sync`); every call
/// holds one internal lock briefly. No IO; time is passed in.
pub struct Wallets {
    inner: Mutex<Inner>,
}

impl Default for Wallets {
    fn default() -> Self {
        Wallets::new()
    }
}

impl fmt::Debug for Wallets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("Wallets")
            .field("wallets", &g.wallets.len())
            .field("holds", &g.holds.len())
            .finish()
    }
}

fn positive(field: &'static str, amount: Decimal) -> Result<(), WalletError> {
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(WalletError::Negative { field, amount });
    }
    Ok(())
}

impl Wallets {
    /// No wallets: every request is postpaid.
    pub fn new() -> Wallets {
        Wallets {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock but a broken invariant's assert, and
        // each call's changes are made after its checks: a poisoned lock is still
        // consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a posting written on `node` at `ts` (after it is appended, or when
    /// rebuilding from the log): each wallet leg moves its account by credit minus
    /// debit. Checks first, and changes nothing on an error: the posting must pass
    /// [`Posting::check`]; every wallet leg must be on `node` or below it (a transfer
    /// between two nodes is written on a common ancestor); a `grant` posting creates
    /// its grant (an id already in that wallet is an error); other legs may move only
    /// existing grants, and never below zero.
    pub fn apply_posting(
        &self,
        node: &AccountPath,
        posting: &Posting,
        ts: Timestamp,
    ) -> Result<(), WalletError> {
        self.apply(node, posting, ts, false)
    }

    /// [`Wallets::apply_posting`] for a new movement out of wallets (a transfer, a
    /// refund paid out): also refuses, under the same lock, to take any cash account
    /// below its overdraft once the money held for requests in flight is set aside.
    /// Replaying the ledger uses `apply_posting`: what was recorded happened.
    pub fn apply_funded_posting(
        &self,
        node: &AccountPath,
        posting: &Posting,
        ts: Timestamp,
    ) -> Result<(), WalletError> {
        self.apply(node, posting, ts, true)
    }

    fn apply(
        &self,
        node: &AccountPath,
        posting: &Posting,
        ts: Timestamp,
        funded: bool,
    ) -> Result<(), WalletError> {
        posting.check()?;
        let mut g = self.lock();
        let cur = posting.currency;
        // Check every leg against the state before changing anything.
        let mut grant_effect: Vec<(&AccountPath, &str, ExactSum)> = Vec::new();
        for (i, leg) in posting.legs.iter().enumerate() {
            let Some(owner) = leg.account.node() else {
                continue;
            };
            if !owner.is_within(node) {
                return Err(WalletError::Outside {
                    leg: i,
                    account: leg.account.to_string(),
                    node: node.clone(),
                });
            }
            if let LedgerAccount::Grant(p, id) = &leg.account {
                let bad = |why| WalletError::Grant {
                    leg: i,
                    account: leg.account.to_string(),
                    why,
                };
                let existing = g
                    .wallet(p, cur)
                    .and_then(|w| w.grants.iter().find(|x| x.id == *id));
                let creates = posting.kind == PostingKind::Grant;
                if creates && existing.is_some() {
                    return Err(bad("a grant of this id already exists"));
                }
                if !creates && existing.is_none() {
                    return Err(bad("no such grant"));
                }
                let before = existing.map_or(ExactSum::ZERO, |x| sub(x.left, x.held));
                let prior = grant_effect
                    .iter()
                    .filter(|(q, j, _)| *q == p && *j == id.as_str())
                    .fold(before, |s, e| add(s, e.2));
                let after = sub(prior.plus(leg.credit), ExactSum::of(leg.debit));
                if after.is_negative() {
                    return Err(bad("the grant's unheld balance would fall below zero"));
                }
                grant_effect.push((
                    p,
                    id,
                    sub(ExactSum::of(leg.credit), ExactSum::of(leg.debit)),
                ));
            }
        }
        if funded {
            for leg in &posting.legs {
                let LedgerAccount::Cash(p) = &leg.account else {
                    continue;
                };
                // Net effect of every leg of this posting on that cash account.
                let net = posting
                    .legs
                    .iter()
                    .filter(|l| l.account == leg.account)
                    .fold(ExactSum::ZERO, |s, l| s.plus(l.credit).minus(l.debit));
                if !net.is_negative() {
                    continue;
                }
                let free = g.wallet(p, cur).map_or(ExactSum::ZERO, |w| {
                    sub(w.cash.plus(w.overdraft), w.cash_held)
                });
                if add(free, net).is_negative() {
                    return Err(WalletError::Refused(WalletRefusal {
                        node: p.clone(),
                        currency: cur,
                        available: free,
                        needed: leg.debit,
                    }));
                }
            }
        }
        for leg in &posting.legs {
            match &leg.account {
                LedgerAccount::Cash(p) => {
                    let w = g.wallet_mut(p, cur);
                    w.cash = w.cash.plus(leg.credit).minus(leg.debit);
                }
                LedgerAccount::Grant(p, id) => {
                    g.next_grant += 1;
                    let serial = g.next_grant;
                    let w = g.wallet_mut(p, cur);
                    if w.grant_mut(id).is_none() {
                        let meta = posting.grant.as_ref();
                        w.grants.push(GrantBal {
                            serial,
                            id: id.clone(),
                            priority: meta.map_or(0, |m| m.priority),
                            expires_at: meta.and_then(|m| m.expires_at),
                            left: ExactSum::ZERO,
                            held: ExactSum::ZERO,
                        });
                        w.sort_grants();
                    }
                    if let Some(gr) = w.grant_mut(id) {
                        gr.left = gr.left.plus(leg.credit).minus(leg.debit);
                    }
                    w.drop_spent_grants(ts);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies a wallet's settings on `node` (creating the wallet if needed).
    pub fn apply_settings(&self, node: &AccountPath, set: &WalletSet) -> Result<(), WalletError> {
        set.check()?;
        let mut g = self.lock();
        let w = g.wallet_mut(node, set.currency);
        w.overdraft = set.overdraft;
        w.overdraft_exact = ExactSum::of(set.overdraft);
        Ok(())
    }

    /// The node whose wallet pays for requests at `node` in `currency`, if any.
    pub fn paying_node(&self, node: &AccountPath, currency: Currency) -> Option<AccountPath> {
        let g = self.lock();
        let i = g.paying(node, currency)?;
        Some(g.wallets[i].node.clone())
    }

    /// Admits a request of at most `max_cost` at `node`, at `now`: `Ok(None)` when no
    /// wallet on the path pays (postpaid); a refusal when the paying wallet's
    /// available money (see [`WalletView::available`]) is below `max_cost`; else holds
    /// `max_cost` from its sources (see the module's documentation).
    pub fn reserve(
        &self,
        node: &AccountPath,
        currency: Currency,
        max_cost: Decimal,
        now: Timestamp,
    ) -> Result<Option<Hold>, WalletError> {
        positive("max_cost", max_cost)?;
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(wi) = inner.paying(node, currency) else {
            return Ok(None);
        };
        let w = &mut inner.wallets[wi];
        let refusal = |w: &Wallet| {
            WalletError::Refused(WalletRefusal {
                node: w.node.clone(),
                currency,
                available: w.available(now),
                needed: max_cost,
            })
        };
        // A wallet spent below zero-minus-overdraft (beyond holds, or after its
        // overdraft was lowered) refuses even a request that costs nothing.
        if w.available(now) < ExactSum::of(max_cost) {
            return Err(refusal(w));
        }
        // Plan first, change nothing until the whole amount is found.
        let mut parts: Vec<(Source, Decimal)> = Vec::new();
        let rest = take_from_grants(w, max_cost, now, &mut parts, |_, _| {});
        if !rest.is_zero() {
            let cash_free = sub(add(w.cash, w.overdraft_exact), w.cash_held);
            if ExactSum::of(rest) > cash_free {
                // Only when grants held dust a Decimal cannot take exactly.
                return Err(refusal(w));
            }
            parts.push((Source::Cash, rest));
        }
        for (src, amt) in &parts {
            match src {
                Source::Cash => w.cash_held = w.cash_held.plus(*amt),
                Source::Grant(serial) => match w.grant_by_serial(*serial) {
                    Some(gr) => gr.held = gr.held.plus(*amt),
                    None => unreachable!("grant {serial} planned from is gone"),
                },
            }
        }
        let wallet_node = w.node.clone();
        inner.next_hold += 1;
        let id = inner.next_hold;
        inner.holds.insert(
            id,
            HoldRec {
                wallet: wi as u32,
                at: now,
                parts,
            },
        );
        Ok(Some(Hold {
            id,
            node: wallet_node,
            currency,
            amount: max_cost,
        }))
    }

    /// Charges `actual` to the wallet that pays for `node` without a hold (a request
    /// whose hold expired before it ended: the money was spent all the same), from
    /// the free rest of grants valid at `now`, then cash (which may go below its
    /// overdraft, as spending beyond a hold does). `None` when no wallet pays or the
    /// cost is zero.
    pub fn charge(
        &self,
        node: &AccountPath,
        currency: Currency,
        actual: Decimal,
        now: Timestamp,
    ) -> Result<Option<Charge>, WalletError> {
        positive("actual", actual)?;
        // An empty hold, settled at once: everything is spent beyond it.
        let hold = {
            let mut g = self.lock();
            let inner = &mut *g;
            let Some(wi) = inner.paying(node, currency) else {
                return Ok(None);
            };
            let wallet_node = inner.wallets[wi].node.clone();
            inner.next_hold += 1;
            let id = inner.next_hold;
            inner.holds.insert(
                id,
                HoldRec {
                    wallet: wi as u32,
                    at: now,
                    parts: Vec::new(),
                },
            );
            Hold {
                id,
                node: wallet_node,
                currency,
                amount: Decimal::ZERO,
            }
        };
        let charged = self.settle(&hold, actual, now);
        if charged.is_err() {
            self.release(&hold);
        }
        charged
    }

    /// Ends a hold with the request's actual cost at `now`: releases the hold, spends
    /// `actual` from the sources it earmarked (in their order), and anything beyond
    /// the hold from the free rest of grants valid at `now`, then cash. Returns the
    /// `consume` posting (already applied), or `None` for a zero cost.
    ///
    /// Errors leave everything as it was (the hold stays): an unknown hold, a negative
    /// cost, or ([`WalletError::Precision`]) a cost whose split over the hold's parts
    /// needs more than 28 significant digits, which no rounded rating produces.
    pub fn settle(
        &self,
        hold: &Hold,
        actual: Decimal,
        now: Timestamp,
    ) -> Result<Option<Charge>, WalletError> {
        positive("actual", actual)?;
        let mut g = self.lock();
        let inner = &mut *g;
        let rec = inner
            .holds
            .get(&hold.id)
            .ok_or(WalletError::UnknownHold(hold.id))?;
        let Some(w) = inner.wallets.get_mut(rec.wallet as usize) else {
            unreachable!(
                "hold {} on a wallet that is gone: wallets are never removed",
                hold.id
            )
        };
        let currency = w.currency;
        // Plan: what each earmarked part pays, then the excess.
        let mut spent: Vec<(Source, Decimal)> = Vec::new();
        let mut rest = actual;
        for (src, amt) in &rec.parts {
            let take = (*amt).min(rest);
            rest = dsub(rest, take).ok_or(WalletError::Precision {
                field: "actual",
                amount: actual,
            })?;
            if !take.is_zero() {
                spent.push((src.clone(), take));
            }
        }
        let beyond_hold = rest;
        // Apply: the hold is released and what it paid is spent.
        for (src, amt) in &rec.parts {
            match src {
                Source::Cash => w.cash_held = w.cash_held.minus(*amt),
                Source::Grant(serial) => match w.grant_by_serial(*serial) {
                    Some(gr) => gr.held = gr.held.minus(*amt),
                    None => unreachable!("grant {serial} dropped while held"),
                },
            }
        }
        for (src, amt) in &spent {
            match src {
                Source::Cash => w.cash = w.cash.minus(*amt),
                Source::Grant(serial) => match w.grant_by_serial(*serial) {
                    Some(gr) => gr.left = gr.left.minus(*amt),
                    None => unreachable!("grant {serial} dropped while held"),
                },
            }
        }
        inner.holds.remove(&hold.id);
        if !rest.is_zero() {
            let mut extra = Vec::new();
            rest = take_from_grants(w, rest, now, &mut extra, |gr, amt| {
                gr.left = gr.left.minus(amt);
            });
            spent.extend(extra);
            if !rest.is_zero() {
                w.cash = w.cash.minus(rest);
                spent.push((Source::Cash, rest));
            }
        }
        if actual.is_zero() {
            w.drop_spent_grants(now);
            return Ok(None);
        }
        // One leg per source where the sum is exact (always, but for amounts of more
        // than 28 significant digits together, which then stay two legs).
        let mut legs: Vec<Leg> = Vec::with_capacity(spent.len() + 1);
        for (src, amt) in spent {
            let account = match src {
                Source::Cash => LedgerAccount::Cash(w.node.clone()),
                Source::Grant(serial) => match w.grants.iter().find(|g| g.serial == serial) {
                    Some(gr) => LedgerAccount::Grant(w.node.clone(), gr.id.clone()),
                    // Spent grants are dropped only after the legs are built.
                    None => unreachable!("grant {serial} spent from is gone"),
                },
            };
            let merged = legs
                .iter_mut()
                .find(|l| l.account == account)
                .and_then(|l| Some((dadd(l.debit, amt)?, l)));
            match merged {
                Some((sum, l)) => l.debit = sum,
                None => legs.push(Leg::debit(account, amt)),
            }
        }
        legs.push(Leg::credit(LedgerAccount::Revenue, actual));
        w.drop_spent_grants(now);
        let posting = Posting {
            kind: PostingKind::Consume,
            currency,
            legs,
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: None,
        };
        // The parts sum to `actual` by construction (every step checked exact): a
        // posting that does not balance here is a bug in this function.
        let checked = posting.check();
        assert!(checked.is_ok(), "settle built a bad posting: {checked:?}");
        Ok(Some(Charge {
            node: w.node.clone(),
            posting,
            beyond_hold,
        }))
    }

    /// Drops a hold without spending (the request failed or cost nothing); whether it
    /// existed.
    pub fn release(&self, hold: &Hold) -> bool {
        let mut g = self.lock();
        release_rec(&mut g, hold.id)
    }

    /// Releases every hold taken at or before `now - ttl` (requests that died without
    /// settling); how many.
    pub fn expire_holds(&self, now: Timestamp, ttl: Duration) -> usize {
        let ttl = SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX);
        let mut g = self.lock();
        let old: Vec<u64> = g
            .holds
            .iter()
            .filter(|(_, h)| now.duration_since(h.at) >= ttl)
            .map(|(&id, _)| id)
            .collect();
        for &id in &old {
            release_rec(&mut g, id);
        }
        old.len()
    }

    /// Expires, at `now`, the unheld rest of every grant whose expiry has passed:
    /// one `expire` posting per grant (already applied), with the node to write it
    /// on. A part still held by requests in flight expires at a later call, after
    /// they settle or are released.
    pub fn expire_grants(&self, now: Timestamp) -> Vec<(AccountPath, Posting)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for w in g.wallets.iter_mut() {
            let cur = w.currency;
            for gr in w.grants.iter_mut().filter(|gr| !gr.valid_at(now)) {
                let free = sub(gr.left, gr.held);
                if !free.is_positive() {
                    continue;
                }
                let Some(amt) = free.to_decimal_floor().filter(|a| !a.is_zero()) else {
                    continue;
                };
                gr.left = gr.left.minus(amt);
                let account = LedgerAccount::Grant(w.node.clone(), gr.id.clone());
                out.push((
                    w.node.clone(),
                    Posting {
                        kind: PostingKind::Expire,
                        currency: cur,
                        legs: vec![
                            Leg::debit(account, amt),
                            Leg::credit(LedgerAccount::Promotions, amt),
                        ],
                        memo: String::new(),
                        usage_entry: None,
                        grant: None,
                        set_by: None,
                    },
                ));
            }
            w.drop_spent_grants(now);
        }
        out
    }

    /// The wallet on `node` itself in `currency` at `now`, if it exists.
    pub fn balance(
        &self,
        node: &AccountPath,
        currency: Currency,
        now: Timestamp,
    ) -> Option<WalletView> {
        let g = self.lock();
        let w = g.wallet(node, currency)?;
        Some(WalletView {
            node: w.node.clone(),
            currency,
            balance: w.balance(),
            cash: w.cash,
            reserved: w.held(),
            available: w.available(now),
            overdraft: w.overdraft,
            // Expired grants that are spent and unheld are gone (whether or not a call
            // has dropped them yet), so the view is a function of the ledger.
            grants: w
                .grants
                .iter()
                .filter(|gr| gr.live_at(now))
                .map(|gr| GrantView {
                    id: gr.id.clone(),
                    priority: gr.priority,
                    expires_at: gr.expires_at,
                    balance: gr.left,
                    reserved: gr.held,
                })
                .collect(),
        })
    }

    /// The currencies in which `node` has a wallet of its own, in code order.
    pub fn currencies(&self, node: &AccountPath) -> Vec<Currency> {
        let g = self.lock();
        let mut out: Vec<Currency> = g
            .index
            .iter()
            .filter(|(_, by_node)| by_node.contains_key(node.as_str()))
            .map(|(c, _)| *c)
            .collect();
        out.sort();
        out
    }

    /// How many holds are live.
    pub fn holds(&self) -> usize {
        self.lock().holds.len()
    }
}

fn release_rec(inner: &mut Inner, id: u64) -> bool {
    let Some(rec) = inner.holds.remove(&id) else {
        return false;
    };
    let Some(w) = inner.wallets.get_mut(rec.wallet as usize) else {
        unreachable!("hold {id} on a wallet that is gone: wallets are never removed")
    };
    for (src, amt) in rec.parts {
        match src {
            Source::Cash => w.cash_held = w.cash_held.minus(amt),
            Source::Grant(serial) => match w.grant_by_serial(serial) {
                Some(gr) => gr.held = gr.held.minus(amt),
                None => unreachable!("grant {serial} dropped while held"),
            },
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::Grant;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }
    fn p(s: &str) -> AccountPath {
        s.parse().unwrap()
    }
    fn cny() -> Currency {
        "CNY".parse().unwrap()
    }
    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }
    fn posting(kind: PostingKind, legs: Vec<Leg>) -> Posting {
        Posting {
            kind,
            currency: cny(),
            legs,
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: None,
        }
    }
    fn topup(w: &Wallets, node: &str, amount: &str) -> Posting {
        let p_ = posting(
            PostingKind::Topup,
            vec![
                Leg::debit(LedgerAccount::Payments, d(amount)),
                Leg::credit(LedgerAccount::Cash(p(node)), d(amount)),
            ],
        );
        w.apply_posting(&p(node), &p_, t(0)).unwrap();
        p_
    }
    fn grant(
        w: &Wallets,
        node: &str,
        id: &str,
        amount: &str,
        priority: i32,
        expires: Option<i64>,
    ) -> Posting {
        let mut p_ = posting(
            PostingKind::Grant,
            vec![
                Leg::debit(LedgerAccount::Promotions, d(amount)),
                Leg::credit(LedgerAccount::Grant(p(node), id.into()), d(amount)),
            ],
        );
        p_.grant = Some(Grant {
            id: id.into(),
            priority,
            expires_at: expires.map(t),
        });
        w.apply_posting(&p(node), &p_, t(0)).unwrap();
        p_
    }
    fn view(w: &Wallets, node: &str, now: i64) -> WalletView {
        w.balance(&p(node), cny(), t(now)).unwrap()
    }

    #[test]
    fn a_request_whose_hold_expired_is_charged_all_the_same() {
        let w = Wallets::new();
        topup(&w, "a", "10");
        grant(&w, "a", "g", "1", 5, None);
        let hold = w.reserve(&p("a/x"), cny(), d("3"), t(1)).unwrap().unwrap();
        assert_eq!(
            w.expire_holds(t(7200), std::time::Duration::from_secs(3600)),
            1
        );
        assert!(matches!(
            w.settle(&hold, d("2.5"), t(7201)),
            Err(WalletError::UnknownHold(_))
        ));
        let charge = w
            .charge(&p("a/x"), cny(), d("2.5"), t(7201))
            .unwrap()
            .unwrap();
        charge.posting.check().unwrap();
        assert_eq!(charge.node, p("a"));
        // The grant first, then cash; nothing left held.
        let v = view(&w, "a", 7201);
        assert_eq!(v.balance, ExactSum::of(d("8.5")));
        assert_eq!(v.cash, ExactSum::of(d("8.5")));
        assert!(v.reserved.is_zero());
        assert_eq!(w.holds(), 0);
        // No wallet on the path: nothing to charge.
        assert!(w.charge(&p("b"), cny(), d("1"), t(7202)).unwrap().is_none());
    }

    #[test]
    fn a_funded_posting_never_takes_cash_below_what_requests_hold() {
        let w = Wallets::new();
        topup(&w, "a/x", "10");
        let hold = w.reserve(&p("a/x"), cny(), d("4"), t(1)).unwrap().unwrap();
        let out = |amount: &str| {
            posting(
                PostingKind::Transfer,
                vec![
                    Leg::debit(LedgerAccount::Cash(p("a/x")), d(amount)),
                    Leg::credit(LedgerAccount::Cash(p("a/y")), d(amount)),
                ],
            )
        };
        // 10 paid in, 4 held: 6.01 would leave the hold unfunded.
        assert!(matches!(
            w.apply_funded_posting(&p("a"), &out("6.01"), t(2)),
            Err(WalletError::Refused(_))
        ));
        assert_eq!(
            view(&w, "a/x", 2).cash,
            ExactSum::of(d("10")),
            "nothing changed"
        );
        w.apply_funded_posting(&p("a"), &out("6"), t(2)).unwrap();
        assert_eq!(view(&w, "a/y", 2).cash, ExactSum::of(d("6")));
        // Released, the rest may go; replay (apply_posting) takes what happened.
        assert!(w.release(&hold));
        w.apply_funded_posting(&p("a"), &out("4"), t(3)).unwrap();
        assert!(w.apply_funded_posting(&p("a"), &out("0.01"), t(3)).is_err());
        w.apply_posting(&p("a"), &out("0.01"), t(3)).unwrap();
        assert_eq!(view(&w, "a/x", 3).cash, ExactSum::of(d("-0.01")));
    }

    #[test]
    fn reserve_settle_and_refuse() {
        let w = Wallets::new();
        topup(&w, "acme", "10.00");
        let h = w
            .reserve(&p("acme/cn/hr"), cny(), d("6"), t(1))
            .unwrap()
            .unwrap();
        assert_eq!(h.node, p("acme"));
        let err = w.reserve(&p("acme"), cny(), d("4.01"), t(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "wallet of acme has 4 CNY available, this request may cost up to 4.01"
        );
        let c = w.settle(&h, d("2.5"), t(2)).unwrap().unwrap();
        assert_eq!(c.node, p("acme"));
        assert!(c.beyond_hold.is_zero());
        assert_eq!(
            serde_json::to_string(&c.posting).unwrap(),
            r#"{"kind":"consume","currency":"CNY","legs":[{"account":"acme:cash","debit":"2.5"},{"account":"@revenue","credit":"2.5"}]}"#
        );
        let v = view(&w, "acme", 3);
        assert_eq!(v.balance.to_string(), "7.5");
        assert!(v.reserved.is_zero());
        assert_eq!(v.available.to_string(), "7.5");
        // Settled once only.
        assert_eq!(
            w.settle(&h, d("1"), t(3)),
            Err(WalletError::UnknownHold(h.id))
        );
        assert!(!w.release(&h));
        assert_eq!(
            w.settle(&h, d("-1"), t(3)).unwrap_err().to_string(),
            "actual: -1 is negative"
        );
    }

    #[test]
    fn the_nearest_wallet_pays_and_none_means_postpaid() {
        let w = Wallets::new();
        assert_eq!(w.reserve(&p("acme/cn"), cny(), d("1"), t(0)).unwrap(), None);
        topup(&w, "acme", "5");
        topup(&w, "acme/cn", "1");
        assert_eq!(w.paying_node(&p("acme/cn/hr"), cny()), Some(p("acme/cn")));
        assert_eq!(w.paying_node(&p("acme/us"), cny()), Some(p("acme")));
        assert_eq!(w.paying_node(&p("other"), cny()), None);
        assert_eq!(w.paying_node(&p("acme"), "USD".parse().unwrap()), None);
        // acme/cn's own wallet is too small: no falling back to the parent's.
        assert!(matches!(
            w.reserve(&p("acme/cn/hr"), cny(), d("2"), t(0)),
            Err(WalletError::Refused(_))
        ));
        topup(&w, "/", "1");
        assert_eq!(
            w.paying_node(&p("other/x"), cny()),
            Some(AccountPath::root())
        );
    }

    #[test]
    fn grants_are_spent_first_by_priority_then_expiry_and_never_once_expired() {
        let w = Wallets::new();
        topup(&w, "acme", "10");
        grant(&w, "acme", "late", "3", 0, Some(100));
        grant(&w, "acme", "soon", "3", 0, Some(50));
        grant(&w, "acme", "vip", "1", 5, None);
        let order: Vec<String> = view(&w, "acme", 0)
            .grants
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(order, ["vip", "soon", "late"]);
        let h = w.reserve(&p("acme"), cny(), d("5"), t(1)).unwrap().unwrap();
        let c = w.settle(&h, d("5"), t(2)).unwrap().unwrap();
        let legs: Vec<String> = c
            .posting
            .legs
            .iter()
            .map(|l| format!("{}={}{}", l.account, l.debit, l.credit))
            .collect();
        assert_eq!(
            legs,
            [
                "acme:grant:vip=10",
                "acme:grant:soon=30",
                "acme:grant:late=10",
                "@revenue=05"
            ]
        );
        // At 100 "late" has expired: it is not available and not spent.
        assert_eq!(view(&w, "acme", 100).available.to_string(), "10");
        let h = w
            .reserve(&p("acme"), cny(), d("1"), t(100))
            .unwrap()
            .unwrap();
        let c = w.settle(&h, d("1"), t(100)).unwrap().unwrap();
        assert_eq!(c.posting.legs[0].account, LedgerAccount::Cash(p("acme")));
        let exp = w.expire_grants(t(100));
        assert_eq!(exp.len(), 1);
        assert_eq!(
            serde_json::to_string(&exp[0].1).unwrap(),
            r#"{"kind":"expire","currency":"CNY","legs":[{"account":"acme:grant:late","debit":"2"},{"account":"@promotions","credit":"2"}]}"#
        );
        let v = view(&w, "acme", 100);
        assert_eq!(v.balance.to_string(), "9");
        // Spent but not expiring, "vip" stays (a refund may credit it again).
        let left: Vec<_> = v
            .grants
            .iter()
            .map(|g| (g.id.as_str(), g.balance))
            .collect();
        assert_eq!(left, [("vip", ExactSum::ZERO)]);
        assert!(w.expire_grants(t(200)).is_empty());
    }

    #[test]
    fn a_grant_expiring_under_a_hold_keeps_the_held_part_until_it_settles() {
        let w = Wallets::new();
        grant(&w, "acme", "g", "10", 0, Some(50));
        let h = w
            .reserve(&p("acme"), cny(), d("4"), t(10))
            .unwrap()
            .unwrap();
        let exp = w.expire_grants(t(60));
        assert_eq!(exp[0].1.legs[0].debit, d("6"));
        assert!(matches!(
            w.reserve(&p("acme"), cny(), d("0.01"), t(60)),
            Err(WalletError::Refused(_))
        ));
        let c = w.settle(&h, d("3"), t(70)).unwrap().unwrap();
        assert_eq!(
            c.posting.legs[0].account,
            LedgerAccount::Grant(p("acme"), "g".into())
        );
        let exp = w.expire_grants(t(80));
        assert_eq!(exp[0].1.legs[0].debit, d("1"));
        let v = view(&w, "acme", 80);
        assert!(v.balance.is_zero() && v.grants.is_empty());
    }

    #[test]
    fn spending_beyond_the_hold_is_settled_and_reported() {
        let w = Wallets::new();
        topup(&w, "acme", "5");
        let h = w.reserve(&p("acme"), cny(), d("4"), t(0)).unwrap().unwrap();
        let c = w.settle(&h, d("7"), t(1)).unwrap().unwrap();
        assert_eq!(c.beyond_hold, d("3"));
        assert_eq!(c.posting.legs[0].debit, d("7"));
        let v = view(&w, "acme", 1);
        assert_eq!(v.balance.to_string(), "-2");
        assert!(matches!(
            w.reserve(&p("acme"), cny(), d("0.01"), t(1)),
            Err(WalletError::Refused(_))
        ));
        assert!(matches!(
            w.reserve(&p("acme"), cny(), Decimal::ZERO, t(1)),
            Err(WalletError::Refused(_))
        ));
        topup(&w, "acme", "2");
        // A zero-cost request posts nothing.
        let h = w
            .reserve(&p("acme"), cny(), Decimal::ZERO, t(1))
            .unwrap()
            .unwrap();
        assert_eq!(w.settle(&h, Decimal::ZERO, t(1)).unwrap(), None);
    }

    #[test]
    fn overdraft_lets_cash_go_below_zero_that_far() {
        let w = Wallets::new();
        topup(&w, "acme", "1");
        w.apply_settings(
            &p("acme"),
            &WalletSet {
                currency: cny(),
                overdraft: d("2"),
                set_by: None,
            },
        )
        .unwrap();
        let h = w.reserve(&p("acme"), cny(), d("3"), t(0)).unwrap().unwrap();
        assert!(w.reserve(&p("acme"), cny(), d("0.0001"), t(0)).is_err());
        w.settle(&h, d("3"), t(0)).unwrap();
        assert_eq!(view(&w, "acme", 0).balance.to_string(), "-2");
        assert!(w.release(&w.reserve(&p("acme"), cny(), d("0"), t(0)).unwrap().unwrap()));
        // Lowering the overdraft below what was spent leaves the spending, refuses
        // anything new.
        let none = WalletSet {
            currency: cny(),
            overdraft: Decimal::ZERO,
            set_by: None,
        };
        w.apply_settings(&p("acme"), &none).unwrap();
        assert_eq!(view(&w, "acme", 0).available.to_string(), "-2");
        assert!(w.reserve(&p("acme"), cny(), Decimal::ZERO, t(0)).is_err());
        let bad = WalletSet {
            currency: cny(),
            overdraft: d("-1"),
            set_by: None,
        };
        assert!(w.apply_settings(&p("acme"), &bad).is_err());
    }

    #[test]
    fn postings_are_checked_before_anything_changes() {
        let w = Wallets::new();
        topup(&w, "acme/a", "5");
        let transfer = posting(
            PostingKind::Transfer,
            vec![
                Leg::debit(LedgerAccount::Cash(p("acme/a")), d("2")),
                Leg::credit(LedgerAccount::Cash(p("acme/b")), d("2")),
            ],
        );
        assert_eq!(
            w.apply_posting(&p("acme/a"), &transfer, t(0))
                .unwrap_err()
                .to_string(),
            "legs[1].account: acme/b:cash is outside acme/a, the posting's node"
        );
        w.apply_posting(&p("acme"), &transfer, t(0)).unwrap();
        assert_eq!(view(&w, "acme/b", 0).balance.to_string(), "2");
        let spend_grant = posting(
            PostingKind::Consume,
            vec![
                Leg::debit(LedgerAccount::Grant(p("acme/a"), "nope".into()), d("1")),
                Leg::credit(LedgerAccount::Revenue, d("1")),
            ],
        );
        assert_eq!(
            w.apply_posting(&p("acme/a"), &spend_grant, t(0))
                .unwrap_err()
                .to_string(),
            "legs[0].account: acme/a:grant:nope: no such grant"
        );
        grant(&w, "acme/a", "g", "1", 0, None);
        let again = grant_posting("acme/a", "g", "1");
        assert!(
            w.apply_posting(&p("acme/a"), &again, t(0))
                .unwrap_err()
                .to_string()
                .ends_with("a grant of this id already exists")
        );
        let too_much = posting(
            PostingKind::Consume,
            vec![
                Leg::debit(LedgerAccount::Grant(p("acme/a"), "g".into()), d("1.5")),
                Leg::credit(LedgerAccount::Revenue, d("1.5")),
            ],
        );
        assert!(
            w.apply_posting(&p("acme/a"), &too_much, t(0))
                .unwrap_err()
                .to_string()
                .ends_with("below zero")
        );
        assert_eq!(view(&w, "acme/a", 0).balance.to_string(), "4");
    }

    fn grant_posting(node: &str, id: &str, amount: &str) -> Posting {
        let mut p_ = posting(
            PostingKind::Grant,
            vec![
                Leg::debit(LedgerAccount::Promotions, d(amount)),
                Leg::credit(LedgerAccount::Grant(p(node), id.into()), d(amount)),
            ],
        );
        p_.grant = Some(Grant {
            id: id.into(),
            priority: 0,
            expires_at: None,
        });
        p_
    }

    #[derive(Debug, Clone)]
    enum Op {
        Topup(usize, u32),
        Grant(usize, u32, i32, Option<u8>),
        Reserve(usize, u32),
        /// Settle the i-th live hold with this share (per mille) of its amount.
        Settle(usize, u16),
        Release(usize),
        Expire,
        Overdraft(u32),
        Tick(u8),
    }

    const NODES: [&str; 4] = ["org", "org/a", "org/a/x", "org/b"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 1..10_000u32).prop_map(|(n, a)| Op::Topup(n, a)),
            (
                0..4usize,
                1..10_000u32,
                -2..3i32,
                proptest::option::of(0..50u8)
            )
                .prop_map(|(n, a, pr, e)| Op::Grant(n, a, pr, e)),
            (0..4usize, 0..5_000u32).prop_map(|(n, a)| Op::Reserve(n, a)),
            (0..8usize, 0..=1000u16).prop_map(|(i, s)| Op::Settle(i, s)),
            (0..8usize).prop_map(Op::Release),
            Just(Op::Expire),
            (0..3_000u32).prop_map(Op::Overdraft),
            (1..20u8).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Random top-ups, grants, settings, holds, settlements, releases and expiries
        /// (every cost within its hold): every posting balances, no wallet's balance
        /// goes below minus its overdraft, holds never exceed what is there, and
        /// replaying the postings from scratch gives the same balances.
        #[test]
        fn wallets_stay_exact_and_never_overspend(ops in proptest::collection::vec(op(), 1..80)) {
            let w = Wallets::new();
            let mut log: Vec<(AccountPath, Posting, Timestamp)> = Vec::new();
            let mut settings: Vec<(usize, AccountPath, WalletSet)> = Vec::new();
            let mut live: Vec<Hold> = Vec::new();
            let mut now = 0i64;
            let mut grants = 0;
            let mut overdraft = Decimal::ZERO;
            for o in ops {
                match o {
                    Op::Topup(n, a) => {
                        let pst = posting(PostingKind::Topup, vec![
                            Leg::debit(LedgerAccount::Payments, Decimal::new(a.into(), 2)),
                            Leg::credit(LedgerAccount::Cash(p(NODES[n])), Decimal::new(a.into(), 2)),
                        ]);
                        w.apply_posting(&p(NODES[n]), &pst, t(now)).unwrap();
                        log.push((p(NODES[n]), pst, t(now)));
                    }
                    Op::Grant(n, a, pr, e) => {
                        grants += 1;
                        let id = format!("g{grants}");
                        let mut pst = grant_posting(NODES[n], &id, "1");
                        pst.legs[0].debit = Decimal::new(a.into(), 3);
                        pst.legs[1].credit = Decimal::new(a.into(), 3);
                        pst.grant = Some(Grant { id, priority: pr, expires_at: e.map(|e| t(now + i64::from(e))) });
                        w.apply_posting(&p(NODES[n]), &pst, t(now)).unwrap();
                        log.push((p(NODES[n]), pst, t(now)));
                    }
                    Op::Reserve(n, a) => {
                        match w.reserve(&p(NODES[n]), cny(), Decimal::new(a.into(), 2), t(now)) {
                            Ok(Some(h)) => live.push(h),
                            Ok(None) => {}
                            Err(WalletError::Refused(r)) => {
                                prop_assert!(r.available < ExactSum::of(r.needed));
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Settle(i, share) => {
                        if live.is_empty() { continue; }
                        let h = live.remove(i % live.len());
                        // share/1000 of the hold, rounded down to the hold's cents: within it.
                        let actual = (h.amount * Decimal::from(share) / Decimal::from(1000)).round_dp_with_strategy(2, rust_decimal::RoundingStrategy::ToZero);
                        if let Some(c) = w.settle(&h, actual, t(now)).unwrap() {
                            prop_assert!(c.beyond_hold.is_zero());
                            c.posting.check().unwrap();
                            log.push((c.node, c.posting, t(now)));
                        }
                    }
                    Op::Release(i) => {
                        if live.is_empty() { continue; }
                        let h = live.remove(i % live.len());
                        prop_assert!(w.release(&h));
                    }
                    Op::Expire => {
                        for (node, pst) in w.expire_grants(t(now)) {
                            pst.check().unwrap();
                            log.push((node, pst, t(now)));
                        }
                    }
                    Op::Overdraft(a) => {
                        // Only raised: money spent under a higher overdraft stays spent
                        // when it is lowered (then admission refuses; tested apart).
                        overdraft = overdraft.max(Decimal::new(a.into(), 2));
                        let set = WalletSet { currency: cny(), overdraft, set_by: None };
                        w.apply_settings(&p("org"), &set).unwrap();
                        settings.push((log.len(), p("org"), set));
                    }
                    Op::Tick(s) => now += i64::from(s),
                }
                for n in NODES {
                    if let Some(v) = w.balance(&p(n), cny(), t(now)) {
                        let floor = ExactSum::ZERO.minus(v.overdraft);
                        prop_assert!(v.balance >= floor, "{n}: {} below -{}", v.balance, v.overdraft);
                        // Holds never count on money that is not there.
                        prop_assert!(!v.available.is_negative(), "{n}: available {}", v.available);
                        prop_assert!(v.reserved <= v.balance.checked_add(ExactSum::of(v.overdraft)).unwrap());
                        for g in &v.grants {
                            prop_assert!(g.balance >= g.reserved && !g.reserved.is_negative());
                        }
                    }
                }
            }
            // Replay the log (settings at their place) into fresh wallets.
            let r = Wallets::new();
            let mut si = 0;
            for (i, (node, pst, ts)) in log.iter().enumerate() {
                while si < settings.len() && settings[si].0 == i {
                    r.apply_settings(&settings[si].1, &settings[si].2).unwrap();
                    si += 1;
                }
                r.apply_posting(node, pst, *ts).unwrap();
            }
            for (_, node, set) in &settings[si..] {
                r.apply_settings(node, set).unwrap();
            }
            for n in NODES {
                let (a, b) = (w.balance(&p(n), cny(), t(now)), r.balance(&p(n), cny(), t(now)));
                prop_assert_eq!(a.is_some(), b.is_some());
                if let (Some(a), Some(b)) = (a, b) {
                    prop_assert_eq!(a.balance, b.balance);
                    prop_assert_eq!(a.cash, b.cash);
                    let ga: Vec<_> = a.grants.iter().map(|g| (&g.id, g.balance)).collect();
                    let gb: Vec<_> = b.grants.iter().map(|g| (&g.id, g.balance)).collect();
                    prop_assert_eq!(ga, gb);
                }
            }
        }
    }

    #[test]
    fn eight_threads_end_exact_and_never_overspend() {
        let w = Wallets::new();
        topup(&w, "org", "500.00");
        grant(&w, "org", "promo", "250.005", 1, None);
        let start = ExactSum::of(d("750.005"));
        let spent: Vec<(ExactSum, u64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|th| {
                    let w = &w;
                    s.spawn(move || {
                        let mut spent = ExactSum::ZERO;
                        let mut refused = 0;
                        for i in 0..3000u32 {
                            let node = p(["org", "org/a", "org/a/x", "org/b"][(i % 4) as usize]);
                            let max = Decimal::new(i64::from(100 + (i * 7 + th) % 400), 3);
                            match w.reserve(&node, cny(), max, t(0)) {
                                Ok(Some(h)) => {
                                    let actual =
                                        Decimal::new(i64::from((i * 13 + th) % 100), 3).min(max);
                                    if i % 10 == 0 {
                                        assert!(w.release(&h));
                                        continue;
                                    }
                                    if let Some(c) = w.settle(&h, actual, t(0)).unwrap() {
                                        c.posting.check().unwrap();
                                        spent = spent.plus(c.posting.legs.last().unwrap().credit);
                                    }
                                }
                                Ok(None) => unreachable!("org pays"),
                                Err(WalletError::Refused(_)) => refused += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                        (spent, refused)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total = spent
            .iter()
            .fold(ExactSum::ZERO, |a, (s, _)| a.checked_add(*s).unwrap());
        let v = view(&w, "org", 0);
        assert!(v.reserved.is_zero());
        assert_eq!(total, start.checked_sub(v.balance).unwrap());
        assert!(!v.balance.is_negative());
        // The run is sized to exhaust the wallet: refusals happened.
        assert!(spent.iter().map(|s| s.1).sum::<u64>() > 0);
        assert_eq!(w.holds(), 0);
    }
}
