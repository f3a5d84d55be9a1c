//! The engine: limits and access rules by node, counters by window, reservations.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, Currency, ExactSum, Money, TokenMap};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use crate::BudgetError;
use crate::models::Rules;
use crate::spec::{Amounts, LimitScope, LimitSpec, Measure, Mode, Window, until};

/// Deepest chain of nodes an account can have: the root plus
/// [`ciyuan_core::AccountPath`]'s 16 segments.
const MAX_CHAIN: usize = 17;

/// One request asking to be let through.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// The account the request is made for; limits on it and on all its ancestors apply.
    pub account: &'a AccountPath,
    /// The API key's id (for [`LimitScope::Key`] limits).
    pub key_id: &'a str,
    /// The session id, if the request names one (for [`LimitScope::Session`] limits).
    pub session: Option<&'a str>,
    /// The model asked for (for the access rules).
    pub model: &'a str,
    /// When the request arrives; its windows are the windows containing this time.
    pub now: Timestamp,
    /// The prompt's tokens as counted locally, by key. Never negative: a request that
    /// has not run cannot give tokens back, so a negative count is the caller's bug
    /// and [`Engine::admit`] panics on it.
    pub input: &'a TokenMap,
    /// The most output the request may produce, by key (e.g. `text.output` =
    /// `max_tokens`). Every key the request can produce should be listed: a limit
    /// holds only while actual usage stays within `input` + `max_output`. Never
    /// negative, as `input`.
    pub max_output: &'a TokenMap,
    /// The most the request may cost (e.g. its input and maximum output at the
    /// price book's prices), for [`Measure::Cost`] limits; `None` when it is not
    /// priced, which cost limits count as nothing (as rating counts an unpriced
    /// request as zero). A hard cost limit in another currency refuses the request:
    /// it cannot bound it. Never negative (a panic, as a negative token count).
    pub max_cost: Option<Money>,
}

/// A hard limit's node counter held by a reservation, as nodes sharing one ledger
/// reserve it in the database ([`Engine::shared_terms`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedTerm {
    /// Names the counter on every node: the limit's node and name, its measure and
    /// the window's start.
    pub counter: String,
    /// What this process has counted as used on it (not its holds).
    pub local: Decimal,
    /// The reservation's hold on it.
    pub need: Decimal,
    /// The limit's amount.
    pub amount: Decimal,
    /// How usage is counted on it.
    pub measure: Measure,
    /// "hard limit 'name' on node", for a refusal.
    pub describe: String,
}

impl SharedTerm {
    /// What a request that used `tokens` and cost `cost` counts on the counter.
    pub fn actual(&self, tokens: &TokenMap, cost: Option<Money>) -> Decimal {
        match self.measure {
            Measure::Cost(cur) => match cost {
                Some(m) if m.currency == cur => m.amount,
                _ => Decimal::ZERO,
            },
            m => Decimal::from_i128_with_scale(m.amount(tokens), 0),
        }
    }
}

/// The measure's part of a counter's name.
fn measure_tag(m: &Measure) -> String {
    match m {
        Measure::Requests => "requests".into(),
        Measure::Tokens(sel) => format!("tokens:{sel:?}"),
        Measure::Cost(c) => format!("cost:{c}"),
    }
}

/// A maximum cost as a decimal (none: nothing held).
fn cost_in_decimal(cost: Option<Money>) -> Decimal {
    cost.map_or(Decimal::ZERO, |m| m.amount)
}

/// An admitted request's hold on its limits, to be [`Engine::settle`]d or
/// [`Engine::release`]d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Names the reservation in `settle` and `release`.
    pub id: u64,
    /// When set, a request-scope clamp limit admitted the request only with less
    /// output: the caller must limit the request's total output (e.g. `max_tokens`) to
    /// this many tokens.
    pub output_cap: Option<u64>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// A token budget over a period (hour, day, month, lifetime) or per request.
    Quota,
    /// A rate: a minute window, or a count of requests.
    Rate,
    /// An access rule: the model is denied or not allowed.
    Model,
}

/// A refused request: which rule on which node, in words, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The node whose limit or rule refused.
    pub node: AccountPath,
    /// The limit's name; `None` for an access rule.
    pub limit: Option<String>,
    /// Quota, rate or access rule.
    pub kind: RefusalKind,
    /// For a person: e.g. `hard limit 'monthly' on acme/cn: 1000000 tokens per month,
    /// 999990 used, 20 reserved, this request needs 300`.
    pub message: String,
    /// Time until the refusing limit's window resets, when waiting can help (never
    /// for lifetime or request-scope limits, access rules, or requests larger than
    /// the whole limit).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whose counter of a limit: the node's, one session's, one key's, or one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// The node's single counter ([`LimitScope::Node`]).
    Node,
    /// One session's counter ([`LimitScope::Session`]).
    Session(String),
    /// One API key's counter ([`LimitScope::Key`]).
    Key(String),
    /// A single request ([`LimitScope::Request`]).
    Request,
}

/// Usage reaching one of a limit's thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The limit's node.
    pub node: AccountPath,
    /// The limit's name.
    pub limit: String,
    /// Whose counter reached it.
    pub subject: Subject,
    /// The window's start; `None` for lifetime limits; the request's admission (or
    /// recording) time for request-scope limits, whose window is the request.
    pub window_start: Option<Timestamp>,
    /// The threshold reached, in percent of `amount`.
    pub threshold: u8,
    /// The counter after the usage that reached it (always above zero: a threshold
    /// is never reached by a counter at or below zero). A counter beyond `u64::MAX`
    /// is reported as `u64::MAX`, the one bound on this field: only a limit of more
    /// than about 7 × 10^18 tokens, or more than 2^64 tokens counted at once, gets there.
    pub used: u64,
    /// The limit's amount.
    pub amount: u64,
    /// The limit's mode.
    pub mode: Mode,
    /// For cost limits, the money figures (`used` and `amount` are then 0).
    pub cost: Option<CostCrossing>,
}

/// A cost limit's counter reaching a threshold, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostCrossing {
    /// The limit's currency.
    pub currency: Currency,
    /// The money counted after the usage that reached the threshold (above zero).
    pub used: ExactSum,
    /// The limit ([`LimitSpec::money`]).
    pub amount: Decimal,
}

/// A cost limit's counter as it stands, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostStatus {
    /// The limit's currency.
    pub currency: Currency,
    /// Net money counted in the window (corrections count negatively).
    pub used: ExactSum,
    /// Held by requests in flight (their maximum costs).
    pub reserved: ExactSum,
    /// `money - used - reserved`, clamped to `0..=money`.
    pub remaining: ExactSum,
}

/// What settling or recording usage did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Thresholds reached by this usage, each reported once per window and subject.
    pub crossings: Vec<Crossing>,
    /// Hard limits (node, name) that this usage added to while they are over their
    /// amount (for request-scope limits: the request alone is over). Through
    /// admit + settle this happens only when actual usage exceeded the reservation.
    pub exceeded: Vec<(AccountPath, String)>,
}

impl Settled {
    /// Whether it raises any incident: a threshold crossed or a hard limit exceeded.
    pub fn raises_incidents(&self) -> bool {
        !self.crossings.is_empty() || !self.exceeded.is_empty()
    }
}

/// One counter of a limit as it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitStatus {
    /// The limit.
    pub spec: LimitSpec,
    /// Whose counter.
    pub subject: Subject,
    /// Start of the current window; `None` for lifetime and request-scope limits.
    pub window_start: Option<Timestamp>,
    /// End (exclusive) of the current window; `None` for lifetime and request-scope.
    pub window_end: Option<Timestamp>,
    /// Net usage counted in the window: corrections count negatively, so it is below
    /// zero when a correction landed in a later window than the usage it corrects
    /// (a credit, which leaves room).
    pub used: i128,
    /// Held by requests in flight.
    pub reserved: u64,
    /// `amount - used - reserved`, exactly, clamped to `0..=amount`.
    pub remaining: u64,
    /// For cost limits, the money counters (`used`, `reserved` and `remaining` above
    /// are then 0).
    pub cost: Option<CostStatus>,
}

/// The budget engine. Cheap to share (`Send + Sync`); every call holds one internal
/// lock for a few microseconds at most.
///
/// - Limits sit on account nodes and count usage of the node's whole subtree.
/// - [`Engine::admit`] checks the access rules and every applicable limit on the
///   account and all its ancestors, and either reserves on all of them at once or
///   refuses with nothing reserved.
/// - [`Engine::settle`] turns a reservation into actual usage, in the windows the
///   request was admitted in; [`Engine::release`] and [`Engine::expire`] drop
///   reservations; [`Engine::record`] counts usage that already happened.
/// - Counters hold the current window only (the latest window any call has seen);
///   reservations live in memory only.
pub struct Engine {
    inner: Mutex<Inner>,
    /// Limits set, anywhere: with none, usage that already happened needs no lock.
    limit_count: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("Engine")
            .field("nodes", &g.nodes.len())
            .field("reservations", &g.live)
            .finish()
    }
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new()
    }
}

#[derive(Default)]
struct Inner {
    index: FxHashMap<Box<str>, u32>,
    nodes: Vec<Node>,
    /// The chain of existing nodes above each account asked about; cleared whenever a
    /// node is added.
    chains: FxHashMap<Box<str>, Chain>,
    /// Reservations, by slot; a reservation's id is its slot and the slot's generation.
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    next_limit: u64,
}

struct Node {
    path: AccountPath,
    limits: Vec<Limit>,
    rules: Rules,
}

struct Limit {
    /// Changes whenever the counters are reset, so older holds no longer apply.
    id: u64,
    spec: LimitSpec,
    /// The latest window seen; starts empty.
    window: Window,
    node: Counter,
    keyed: FxHashMap<Box<str>, Counter>,
}

/// Usage a restored counter may start from, either way: far beyond any real window
/// (the projections sum `i64` rows), and it keeps every later sum exact (see
/// [`add_usage`]).
const MAX_LOADED: i128 = 1 << 100;

#[derive(Debug, Clone, Copy)]
struct Counter {
    window_start: Timestamp,
    /// Net usage: corrections count negatively.
    used: i128,
    /// The sum of the live holds on this counter in its window.
    reserved: u64,
    /// Bit i: `spec.thresholds[i]` already reported in this window.
    crossed: u16,
    /// Cost limits: net money counted (corrections count negatively).
    cost_used: ExactSum,
    /// Cost limits: the sum of the live holds' maximum costs in this window.
    cost_reserved: ExactSum,
}

/// Why a counter cannot hold a request.
#[derive(Debug, Clone, Copy)]
enum NoRoom {
    /// A hard limit: `used + reserved + need` would exceed its amount (for a
    /// request-scope limit, `need` alone would).
    Over { used: i128, reserved: u64 },
    /// Any limit: the counter would hold more than `u64::MAX` reserved at once.
    Held { reserved: u64 },
}

/// What a restored counter starts from.
#[derive(Debug, Clone, Copy)]
enum Loaded {
    Tokens(i128),
    Cost(Decimal),
}

/// Why a cost counter cannot hold a request: `used + reserved + need` would exceed
/// the hard limit's money.
#[derive(Debug, Clone, Copy)]
struct NoMoney {
    used: ExactSum,
    reserved: ExactSum,
}

/// Sums of money in the engine stay far inside [`ExactSum`]'s ±1.7 × 10^38 (every
/// amount is a `Decimal`, below 7.9 × 10^28); leaving it is a broken invariant.
fn madd(a: ExactSum, b: ExactSum) -> ExactSum {
    let s = a.checked_add(b);
    assert!(s.is_some(), "money counter {a} + {b} overflows");
    s.unwrap_or(a)
}

fn msub(a: ExactSum, b: ExactSum) -> ExactSum {
    let s = a.checked_sub(b);
    assert!(s.is_some(), "money counter {a} - {b} overflows");
    s.unwrap_or(a)
}

/// What a request held, or counts, on a cost limit in `currency`: its amount in
/// that currency, nothing for an unpriced request or another currency.
fn cost_in(currency: Currency, cost: Option<Money>) -> ExactSum {
    match cost {
        Some(m) if m.currency == currency => ExactSum::of(m.amount),
        _ => ExactSum::ZERO,
    }
}

impl Counter {
    const EMPTY: Counter = Counter::fresh(Timestamp::MIN);

    const fn fresh(window_start: Timestamp) -> Counter {
        Counter {
            window_start,
            used: 0,
            reserved: 0,
            crossed: 0,
            cost_used: ExactSum::ZERO,
            cost_reserved: ExactSum::ZERO,
        }
    }

    /// Moves the counter to window `w` if it is older.
    fn roll(&mut self, w: &Window) {
        if self.window_start < w.start {
            *self = Counter::fresh(w.start);
        }
    }

    /// (used, reserved) in window `w`.
    fn view(&self, w: &Window) -> (i128, u64) {
        if self.window_start == w.start {
            (self.used, self.reserved)
        } else {
            (0, 0)
        }
    }

    /// Holds `need` (not negative) in window `w` and returns what it holds, unless
    /// `hard` and `used + reserved + need > limit`, or the counter would then hold
    /// more than `u64::MAX` (a bound no real traffic reaches; it refuses even for a
    /// soft limit, rather than hold less than asked).
    fn reserve(&mut self, w: &Window, need: i128, hard: bool, limit: u64) -> Result<u64, NoRoom> {
        self.roll(w);
        // `reserved` and `need` are not negative, so the sum can only overflow upwards,
        // past i128::MAX and so past any limit.
        let total = self
            .used
            .checked_add(i128::from(self.reserved))
            .and_then(|t| t.checked_add(need));
        if hard && total.is_none_or(|t| t > i128::from(limit)) {
            return Err(NoRoom::Over {
                used: self.used,
                reserved: self.reserved,
            });
        }
        let held = u64::try_from(need)
            .ok()
            .and_then(|n| Some((n, self.reserved.checked_add(n)?)));
        let Some((n, reserved)) = held else {
            return Err(NoRoom::Held {
                reserved: self.reserved,
            });
        };
        self.reserved = reserved;
        Ok(n)
    }

    /// (money used, money reserved) in window `w`.
    fn view_cost(&self, w: &Window) -> (ExactSum, ExactSum) {
        if self.window_start == w.start {
            (self.cost_used, self.cost_reserved)
        } else {
            (ExactSum::ZERO, ExactSum::ZERO)
        }
    }

    /// Holds `need` (not negative) of money in window `w`, unless `hard` and
    /// `used + reserved + need > limit`.
    fn reserve_cost(
        &mut self,
        w: &Window,
        need: ExactSum,
        hard: bool,
        limit: Decimal,
    ) -> Result<(), NoMoney> {
        self.roll(w);
        let total = madd(madd(self.cost_used, self.cost_reserved), need);
        if hard && total > ExactSum::of(limit) {
            return Err(NoMoney {
                used: self.cost_used,
                reserved: self.cost_reserved,
            });
        }
        self.cost_reserved = madd(self.cost_reserved, need);
        Ok(())
    }

    /// Gives back the money one hold on this counter, in its window, held.
    fn unhold_cost(&mut self, amount: ExactSum) {
        assert!(
            self.cost_reserved >= amount,
            "a hold of {amount} on a counter holding {} in all: reserved is the sum of its holds",
            self.cost_reserved
        );
        self.cost_reserved = msub(self.cost_reserved, amount);
    }

    /// Gives back what one hold on this counter, in its window, held.
    fn unhold(&mut self, amount: u64) {
        assert!(
            self.reserved >= amount,
            "a hold of {amount} on a counter holding {} in all: reserved is the sum of its holds",
            self.reserved
        );
        self.reserved -= amount;
    }
}

/// Whose counter of a limit a call touches, borrowed from the call, so that a
/// session's or key's name travels with it to the counter and into reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who<'a> {
    Node,
    Session(&'a str),
    Key(&'a str),
    Request,
}

impl Who<'_> {
    fn subject(self) -> Subject {
        match self {
            Who::Node => Subject::Node,
            Who::Session(s) => Subject::Session(s.to_string()),
            Who::Key(k) => Subject::Key(k.to_string()),
            Who::Request => Subject::Request,
        }
    }
}

/// Who holds on a limit of `scope` for the request of `key_id` and `session` that
/// was admitted with a hold on it.
fn holder<'a>(scope: LimitScope, key_id: &'a str, session: Option<&'a str>) -> Who<'a> {
    match (scope, session) {
        (LimitScope::Node, _) => Who::Node,
        (LimitScope::Request, _) => Who::Request,
        (LimitScope::Key, _) => Who::Key(key_id),
        (LimitScope::Session, Some(s)) => Who::Session(s),
        (LimitScope::Session, None) => {
            unreachable!("a session limit holds only for requests with a session ({key_id})")
        }
    }
}

/// One reservation's slot; its buffers are reused by later reservations.
#[derive(Default)]
struct Slot {
    generation: u32,
    live: bool,
    admitted: Timestamp,
    key_id: String,
    session: Option<String>,
    /// The admission's maximum cost: what it holds on each cost limit in its
    /// currency.
    cost: Option<Money>,
    holds: Vec<Hold>,
}

impl Slot {
    fn holder(&self, scope: LimitScope) -> Who<'_> {
        holder(scope, &self.key_id, self.session.as_deref())
    }
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    node: u32,
    /// Where the limit was in its node's list (checked against `limit`).
    index: u32,
    limit: u64,
    /// The counter's window (the admission time for request-scope limits).
    window_start: Timestamp,
    /// What the counter holds for it (0 for request-scope limits, which have none).
    amount: u64,
}

#[derive(Clone, Copy)]
struct Chain {
    ids: [u32; MAX_CHAIN],
    len: usize,
}

impl Chain {
    fn push(&mut self, id: u32) {
        // A path has at most 16 segments, so its chain at most 17 nodes.
        assert!(
            self.len < MAX_CHAIN,
            "a chain deeper than {MAX_CHAIN} nodes"
        );
        self.ids[self.len] = id;
        self.len += 1;
    }

    /// Root first, the account's own node last.
    fn top_down(&self) -> impl DoubleEndedIterator<Item = usize> + '_ {
        self.ids[..self.len].iter().map(|&i| i as usize)
    }
}

/// Most chains remembered before the cache starts over.
const MAX_CHAINS: usize = 1 << 16;

const EMPTY_WINDOW: Window = Window {
    start: Timestamp::MIN,
    end: Timestamp::MIN,
};

impl Limit {
    fn new(id: u64, spec: LimitSpec) -> Limit {
        Limit {
            id,
            spec,
            window: EMPTY_WINDOW,
            node: Counter::EMPTY,
            keyed: FxHashMap::default(),
        }
    }

    /// Advances the latest window to the one containing `at` if that is newer (and
    /// drops the keyed counters of older windows), and returns the latest window. When
    /// `at` lies in an older window, the latest window is returned unchanged.
    fn advance(&mut self, at: Timestamp) -> Window {
        if self.window.contains(at) {
            return self.window;
        }
        let w = Window::containing(self.spec.period, &self.spec.time_zone, at);
        if w.start > self.window.start || self.window == EMPTY_WINDOW {
            self.move_to(w);
        }
        self.window
    }

    fn move_to(&mut self, w: Window) {
        self.window = w;
        self.keyed.retain(|_, c| c.window_start >= w.start);
        if self.keyed.capacity() > 64 && self.keyed.capacity() > 4 * self.keyed.len() {
            self.keyed.shrink_to_fit();
        }
    }

    fn counter(&mut self, who: Who<'_>) -> Option<&mut Counter> {
        match who {
            Who::Node => Some(&mut self.node),
            Who::Session(s) | Who::Key(s) => self.keyed.get_mut(s),
            Who::Request => None,
        }
    }

    fn counter_or_insert(&mut self, who: Who<'_>) -> Option<&mut Counter> {
        match who {
            Who::Node => Some(&mut self.node),
            Who::Session(s) | Who::Key(s) => {
                if !self.keyed.contains_key(s) {
                    self.keyed.insert(s.into(), Counter::EMPTY);
                }
                self.keyed.get_mut(s)
            }
            Who::Request => None,
        }
    }

    /// Holds `need` of money on the counter of `who` in window `w` (see
    /// [`Counter::reserve_cost`]), creating the counter only if that succeeds.
    fn reserve_cost(&mut self, who: Who<'_>, w: &Window, need: ExactSum) -> Result<(), NoMoney> {
        let hard = self.spec.mode == Mode::Hard;
        let limit = self.spec.money;
        match who {
            Who::Node => self.node.reserve_cost(w, need, hard, limit),
            Who::Session(s) | Who::Key(s) => match self.keyed.get_mut(s) {
                Some(c) => c.reserve_cost(w, need, hard, limit),
                None => {
                    let mut c = Counter::fresh(w.start);
                    c.reserve_cost(w, need, hard, limit)?;
                    self.keyed.insert(s.into(), c);
                    Ok(())
                }
            },
            Who::Request => Ok(()),
        }
    }

    /// Holds `need` on the counter of `who` in window `w` (see [`Counter::reserve`]),
    /// creating the counter only if the reservation succeeds; what it holds.
    fn reserve(&mut self, who: Who<'_>, w: &Window, need: i128) -> Result<u64, NoRoom> {
        let hard = self.spec.mode == Mode::Hard;
        let limit = self.spec.amount;
        match who {
            Who::Node => self.node.reserve(w, need, hard, limit),
            Who::Session(s) | Who::Key(s) => match self.keyed.get_mut(s) {
                Some(c) => c.reserve(w, need, hard, limit),
                None => {
                    let mut c = Counter::fresh(w.start);
                    let held = c.reserve(w, need, hard, limit)?;
                    self.keyed.insert(s.into(), c);
                    Ok(held)
                }
            },
            Who::Request => Ok(0),
        }
    }

    /// Whose counter of this limit an admission or record touches; `None` when the
    /// limit does not apply (a session limit and no session).
    fn pick<'a>(&self, key_id: &'a str, session: Option<&'a str>) -> Option<Who<'a>> {
        match self.spec.scope {
            LimitScope::Node => Some(Who::Node),
            LimitScope::Request => Some(Who::Request),
            LimitScope::Session => session.map(Who::Session),
            LimitScope::Key => Some(Who::Key(key_id)),
        }
    }
}

/// The limit a hold points at, if it still exists with the same counters.
fn held<'a>(nodes: &'a mut [Node], h: &Hold) -> Option<(&'a AccountPath, &'a mut Limit)> {
    let node = nodes.get_mut(h.node as usize)?;
    let i = match node.limits.get(h.index as usize) {
        Some(l) if l.id == h.limit => h.index as usize,
        _ => node.limits.iter().position(|l| l.id == h.limit)?,
    };
    Some((&node.path, node.limits.get_mut(i)?))
}

/// Gives back what `holds` reserved (`cost` on cost limits).
fn unreserve(
    nodes: &mut [Node],
    holds: &[Hold],
    key_id: &str,
    session: Option<&str>,
    cost: Option<Money>,
) {
    for h in holds {
        let Some((_, l)) = held(nodes, h) else {
            continue;
        };
        let who = holder(l.spec.scope, key_id, session);
        let measure = l.spec.measure;
        if let Some(c) = l.counter(who)
            && c.window_start == h.window_start
        {
            match measure {
                Measure::Cost(cur) => c.unhold_cost(cost_in(cur, cost)),
                _ => c.unhold(h.amount),
            }
        }
    }
}

/// Whether `used` reaches `pct` percent of `amount` (`used × 100 ≥ amount × pct`);
/// never at or below zero.
fn reached(used: i128, amount: u64, pct: u8) -> bool {
    // amount × pct < 2^64 × 2^8 = 2^72, so any used from 2^72 on reaches it, and
    // below that used × 100 < 2^79: both products are exact in i128 (and cheap; an
    // i128 division or checked multiplication would be a library call).
    const PAST_ANY: i128 = 1 << 72;
    used > 0 && (used >= PAST_ANY || used * 100 >= i128::from(amount) * i128::from(pct))
}

/// The thresholds `used` has reached, as crossed bits.
fn reached_bits(spec: &LimitSpec, used: i128) -> u16 {
    let mut bits = 0u16;
    for (i, &t) in spec.thresholds.iter().enumerate() {
        if reached(used, spec.amount, t) {
            bits |= 1 << i;
        }
    }
    bits
}

/// [`Crossing::used`] of a counter that reached a threshold, so above zero; beyond
/// `u64::MAX` it is `u64::MAX`, as documented there.
fn crossing_used(used: i128) -> u64 {
    assert!(used > 0, "a threshold reached with {used} used");
    u64::try_from(used).unwrap_or(u64::MAX)
}

/// Adds `amount` of usage (negative for a correction) to a counter and reports what
/// that did.
fn add_usage(
    path: &AccountPath,
    l: &Limit,
    c: &mut Counter,
    who: Who<'_>,
    amount: i128,
    out: &mut Settled,
) {
    // A counter starts within ±MAX_LOADED (2^100) and each usage moves it by less
    // than 2^68 (at most 30 keys of i64), so leaving i128 takes more than 2^58
    // usages in one window: it cannot happen, and if it did, stop.
    let Some(used) = c.used.checked_add(amount) else {
        unreachable!("counter of '{}' on {path} overflows i128", l.spec.name)
    };
    c.used = used;
    let spec = &l.spec;
    for (i, &t) in spec.thresholds.iter().enumerate() {
        if c.crossed & (1 << i) == 0 && reached(c.used, spec.amount, t) {
            c.crossed |= 1 << i;
            out.crossings.push(Crossing {
                node: path.clone(),
                limit: spec.name.clone(),
                subject: who.subject(),
                window_start: (l.window != Window::LIFETIME).then_some(c.window_start),
                threshold: t,
                used: crossing_used(c.used),
                amount: spec.amount,
                mode: spec.mode,
                cost: None,
            });
        }
    }
    if spec.mode == Mode::Hard && amount > 0 && c.used > i128::from(spec.amount) {
        push_exceeded(out, path, &spec.name);
    }
}

/// Counts `amount` of usage that happened at `at` on `who`'s counter of `l`, in the
/// window containing `at` (nothing, for a window older than the limit's latest).
fn count_at(
    path: &AccountPath,
    l: &mut Limit,
    who: Who<'_>,
    amount: i128,
    at: Timestamp,
    out: &mut Settled,
) {
    let w = l.advance(at);
    if !w.contains(at) {
        return; // a past window
    }
    let Some(c) = l.counter_or_insert(who) else {
        return;
    };
    c.roll(&w);
    let mut copy = *c;
    add_usage(path, l, &mut copy, who, amount, out);
    if let Some(slot) = l.counter(who) {
        *slot = copy;
    }
}

/// A request-scope limit looking at one request's actual size.
fn request_usage(path: &AccountPath, l: &Limit, at: Timestamp, amount: i128, out: &mut Settled) {
    let spec = &l.spec;
    for &t in &spec.thresholds {
        if reached(amount, spec.amount, t) {
            out.crossings.push(Crossing {
                node: path.clone(),
                limit: spec.name.clone(),
                subject: Subject::Request,
                window_start: Some(at),
                threshold: t,
                used: crossing_used(amount),
                amount: spec.amount,
                mode: spec.mode,
                cost: None,
            });
        }
    }
    if spec.mode == Mode::Hard && amount > i128::from(spec.amount) {
        push_exceeded(out, path, &spec.name);
    }
}

/// Whether money `used` reaches `pct` percent of `limit` (`used × 100 ≥ limit ×
/// pct`, exactly); never at or below zero.
fn reached_cost(used: ExactSum, limit: Decimal, pct: u8) -> bool {
    // limit × pct < 7.9 × 10^28 × 255 fits ExactSum; used × 100 beyond it is far
    // past any limit.
    let Some(bar) = ExactSum::of(limit).checked_mul_small(u32::from(pct)) else {
        unreachable!("{limit} × {pct} within ExactSum")
    };
    used.is_positive() && used.checked_mul_small(100).is_none_or(|u| u >= bar)
}

fn cost_crossing(
    path: &AccountPath,
    spec: &LimitSpec,
    subject: Subject,
    window_start: Option<Timestamp>,
    threshold: u8,
    used: ExactSum,
    currency: Currency,
) -> Crossing {
    Crossing {
        node: path.clone(),
        limit: spec.name.clone(),
        subject,
        window_start,
        threshold,
        used: 0,
        amount: 0,
        mode: spec.mode,
        cost: Some(CostCrossing {
            currency,
            used,
            amount: spec.money,
        }),
    }
}

/// Adds `amount` of money (negative for a correction) to a cost counter and reports
/// what that did, as [`add_usage`] does for tokens.
fn add_cost_usage(
    path: &AccountPath,
    l: &Limit,
    c: &mut Counter,
    who: Who<'_>,
    currency: Currency,
    amount: ExactSum,
    out: &mut Settled,
) {
    c.cost_used = madd(c.cost_used, amount);
    let spec = &l.spec;
    for (i, &t) in spec.thresholds.iter().enumerate() {
        if c.crossed & (1 << i) == 0 && reached_cost(c.cost_used, spec.money, t) {
            c.crossed |= 1 << i;
            let ws = (l.window != Window::LIFETIME).then_some(c.window_start);
            out.crossings.push(cost_crossing(
                path,
                spec,
                who.subject(),
                ws,
                t,
                c.cost_used,
                currency,
            ));
        }
    }
    if spec.mode == Mode::Hard && amount.is_positive() && c.cost_used > ExactSum::of(spec.money) {
        push_exceeded(out, path, &spec.name);
    }
}

/// Counts `amount` of money spent at `at` on `who`'s counter of cost limit `l`, in
/// the window containing `at` (nothing, for a window older than the limit's latest).
fn count_cost_at(
    path: &AccountPath,
    l: &mut Limit,
    who: Who<'_>,
    currency: Currency,
    amount: ExactSum,
    at: Timestamp,
    out: &mut Settled,
) {
    let w = l.advance(at);
    if !w.contains(at) {
        return;
    }
    let Some(c) = l.counter_or_insert(who) else {
        return;
    };
    c.roll(&w);
    let mut copy = *c;
    add_cost_usage(path, l, &mut copy, who, currency, amount, out);
    if let Some(slot) = l.counter(who) {
        *slot = copy;
    }
}

/// A request-scope cost limit looking at one request's actual cost.
fn request_cost_usage(
    path: &AccountPath,
    l: &Limit,
    at: Timestamp,
    currency: Currency,
    amount: ExactSum,
    out: &mut Settled,
) {
    let spec = &l.spec;
    for &t in &spec.thresholds {
        if reached_cost(amount, spec.money, t) {
            out.crossings.push(cost_crossing(
                path,
                spec,
                Subject::Request,
                Some(at),
                t,
                amount,
                currency,
            ));
        }
    }
    if spec.mode == Mode::Hard && amount > ExactSum::of(spec.money) {
        push_exceeded(out, path, &spec.name);
    }
}

/// Checks and holds an admission's maximum cost on cost limit `l` (in `currency`)
/// of node `path`: the window start the hold is in, or the refusal.
fn admit_cost(
    path: &AccountPath,
    l: &mut Limit,
    who: Who<'_>,
    currency: Currency,
    a: &Admission<'_>,
) -> Result<Timestamp, Refusal> {
    let hard = l.spec.mode == Mode::Hard;
    let refusal = |l: &Limit, message: String, retry: bool| Refusal {
        node: path.clone(),
        limit: Some(l.spec.name.clone()),
        kind: kind(&l.spec),
        message,
        retry_after: (retry && l.window.end != Timestamp::MAX).then(|| until(a.now, l.window.end)),
    };
    let need = match a.max_cost {
        Some(m) if m.currency != currency && hard => {
            let msg = format!(
                "hard limit '{}' on {path}: {}, cannot bound a request priced in {}",
                l.spec.name,
                l.spec.describe(),
                m.currency
            );
            return Err(refusal(l, msg, false));
        }
        cost => cost_in(currency, cost),
    };
    if l.spec.scope == LimitScope::Request {
        if hard && need > ExactSum::of(l.spec.money) {
            let msg = format!(
                "hard limit '{}' on {path}: {}, this request may cost {need}",
                l.spec.name,
                l.spec.describe()
            );
            return Err(refusal(l, msg, false));
        }
        return Ok(a.now);
    }
    let w = l.advance(a.now);
    match l.reserve_cost(who, &w, need) {
        Ok(()) => Ok(w.start),
        Err(NoMoney { used, reserved }) => {
            let msg = format!(
                "hard limit '{}' on {path}: {}{}, {used} used, {reserved} reserved, this request may cost {need}",
                l.spec.name,
                l.spec.describe(),
                subject_phrase(who)
            );
            let fits_alone = need <= ExactSum::of(l.spec.money);
            Err(refusal(l, msg, fits_alone))
        }
    }
}

fn push_exceeded(out: &mut Settled, path: &AccountPath, name: &str) {
    if !out.exceeded.iter().any(|(p, n)| p == path && n == name) {
        out.exceeded.push((path.clone(), name.to_string()));
    }
}

fn kind(spec: &LimitSpec) -> RefusalKind {
    if spec.is_rate() {
        RefusalKind::Rate
    } else {
        RefusalKind::Quota
    }
}

fn subject_phrase(who: Who<'_>) -> String {
    match who {
        Who::Session(s) => format!(" (session {s})"),
        Who::Key(k) => format!(" (key {k})"),
        Who::Node | Who::Request => String::new(),
    }
}

impl Inner {
    /// The existing nodes from the root down to `path`.
    fn chain(&mut self, path: &str) -> Chain {
        if let Some(c) = self.chains.get(path) {
            return *c;
        }
        let mut c = Chain {
            ids: [0; MAX_CHAIN],
            len: 0,
        };
        if let Some(&i) = self.index.get("") {
            c.push(i);
        }
        if !path.is_empty() {
            for (i, b) in path.bytes().enumerate() {
                if b == b'/'
                    && let Some(&n) = self.index.get(&path[..i])
                {
                    c.push(n);
                }
            }
            if let Some(&n) = self.index.get(path) {
                c.push(n);
            }
        }
        if self.chains.len() >= MAX_CHAINS {
            self.chains.clear();
        }
        self.chains.insert(path.into(), c);
        c
    }

    fn node_mut(&mut self, path: &AccountPath) -> &mut Node {
        let idx = match self.index.get(path.as_str()) {
            Some(&i) => i as usize,
            None => {
                let i = self.nodes.len();
                // Nodes and holds name nodes by u32: 4 billion nodes with limits or
                // rules is beyond any tree (and any memory) this engine serves.
                assert!(
                    i < u32::MAX as usize,
                    "more than 2^32 nodes with limits or rules"
                );
                self.nodes.push(Node {
                    path: path.clone(),
                    limits: Vec::new(),
                    rules: Rules::default(),
                });
                self.index.insert(path.as_str().into(), i as u32);
                self.chains.clear();
                i
            }
        };
        &mut self.nodes[idx]
    }

    fn node(&self, path: &AccountPath) -> Option<&Node> {
        self.index
            .get(path.as_str())
            .map(|&i| &self.nodes[i as usize])
    }

    /// A free slot for a new reservation, its buffers emptied.
    fn new_slot(&mut self) -> usize {
        let i = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                // A reservation id is the slot in its low 32 bits.
                assert!(
                    self.slots.len() < u32::MAX as usize,
                    "more than 2^32 reservations held at once"
                );
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.holds.clear();
        s.key_id.clear();
        s.session = None;
        s.cost = None;
        i
    }

    /// The slot of a live reservation, left live.
    fn peek(&self, id: u64) -> Option<usize> {
        let i = (id & 0xffff_ffff) as usize;
        let s = self.slots.get(i)?;
        (s.live && u64::from(s.generation) == id >> 32).then_some(i)
    }

    /// The slot of a live reservation, no longer live; [`Inner::free_slot`] it after use.
    fn take(&mut self, id: u64) -> Option<usize> {
        let i = (id & 0xffff_ffff) as usize;
        let s = self.slots.get_mut(i)?;
        if !s.live || u64::from(s.generation) != id >> 32 {
            return None;
        }
        s.live = false;
        self.live -= 1;
        Some(i)
    }

    fn free_slot(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            // Wrapping is the design: an id names its slot and the slot's generation
            // (32 bits each), so a stale id could only match again after 2^32 more
            // reservations in the same slot.
            s.generation = s.generation.wrapping_add(1);
            self.free.push(i as u32);
        }
    }

    /// Releases the reservation in slot `i` (already taken) without usage.
    fn release_slot(&mut self, i: usize) {
        let Inner { nodes, slots, .. } = self;
        if let Some(s) = slots.get(i) {
            unreserve(nodes, &s.holds, &s.key_id, s.session.as_deref(), s.cost);
        }
        self.free_slot(i);
    }
}

impl Engine {
    /// An engine with no limits and no rules: everything is admitted.
    pub fn new() -> Engine {
        Engine {
            inner: Mutex::new(Inner::default()),
            limit_count: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing in the engine panics while holding the lock, and its state stays
        // consistent between statements; a poisoned lock is still usable. (Spinning
        // before sleeping, or parking_lot's mutex, measured slower in `bench`: the
        // cost under contention is the counters' cache lines moving between cores.)
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a limit, or replaces the limit of the same node and name. A replacement
    /// that keeps the measure, period, scope and time zone keeps the counters and
    /// reservations (e.g. raising the amount); any other replacement starts from zero.
    pub fn set_limit(&self, mut spec: LimitSpec) -> Result<(), BudgetError> {
        spec.validate()?;
        let mut g = self.lock();
        let inner = &mut *g;
        inner.next_limit += 1;
        let fresh_id = inner.next_limit;
        let node = inner.node_mut(&spec.node);
        match node.limits.iter_mut().find(|l| l.spec.name == spec.name) {
            Some(l)
                if l.spec.measure == spec.measure
                    && l.spec.period == spec.period
                    && l.spec.scope == spec.scope
                    && l.spec.time_zone == spec.time_zone =>
            {
                // Keep the counters; carry the reported thresholds over by value.
                let remap = |bits: u16| -> u16 {
                    let mut out = 0u16;
                    for (j, t) in spec.thresholds.iter().enumerate() {
                        if let Some(i) = l.spec.thresholds.iter().position(|o| o == t)
                            && bits & (1 << i) != 0
                        {
                            out |= 1 << j;
                        }
                    }
                    out
                };
                l.node.crossed = remap(l.node.crossed);
                for c in l.keyed.values_mut() {
                    c.crossed = remap(c.crossed);
                }
                l.spec = spec;
            }
            Some(l) => *l = Limit::new(fresh_id, spec),
            None => {
                node.limits.push(Limit::new(fresh_id, spec));
                self.limit_count
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(())
    }

    /// Removes a limit; whether it existed. Reservations on it are forgotten.
    pub fn clear_limit(&self, node: &AccountPath, name: &str) -> bool {
        let mut g = self.lock();
        let Some(&i) = g.index.get(node.as_str()) else {
            return false;
        };
        let limits = &mut g.nodes[i as usize].limits;
        let before = limits.len();
        limits.retain(|l| l.spec.name != name);
        let removed = before - limits.len();
        self.limit_count
            .fetch_sub(removed, std::sync::atomic::Ordering::Release);
        removed > 0
    }

    /// The limits set on `node` itself (not inherited ones), in the order they were
    /// first set.
    pub fn limits(&self, node: &AccountPath) -> Vec<LimitSpec> {
        let g = self.lock();
        g.node(node)
            .map(|n| n.limits.iter().map(|l| l.spec.clone()).collect())
            .unwrap_or_default()
    }

    /// Sets the model access rules of `node`, replacing its previous ones. Patterns
    /// use `*` for any run of characters and ignore ASCII case (as routing does). A model is allowed
    /// iff no node on the account's path (the node and its ancestors) denies it and
    /// every allow list on the path matches it; `None` means no allow list. An empty
    /// allow list allows nothing.
    pub fn set_models(&self, node: &AccountPath, allow: Option<Vec<String>>, deny: Vec<String>) {
        let mut g = self.lock();
        let rules = Rules { allow, deny };
        if rules.is_empty() && g.node(node).is_none() {
            return;
        }
        g.node_mut(node).rules = rules;
    }

    /// The model access rules set on `node` itself: (allow, deny).
    pub fn models(&self, node: &AccountPath) -> (Option<Vec<String>>, Vec<String>) {
        let g = self.lock();
        g.node(node)
            .map(|n| (n.rules.allow.clone(), n.rules.deny.clone()))
            .unwrap_or_default()
    }

    /// Checks only the access rules for `model` on `account`'s path.
    pub fn check_model(&self, account: &AccountPath, model: &str) -> Result<(), Refusal> {
        let mut g = self.lock();
        let chain = g.chain(account.as_str());
        check_rules(&g, &chain, model)
    }

    /// Admits a request or refuses it.
    ///
    /// In order: the access rules of every node on the path; then request-scope clamp
    /// limits, which may set an output cap; then every limit on the account's node and
    /// all its ancestors, nearest node first. A hard limit refuses when
    /// `used + reserved + need > amount`, where `need` is the request's selected input
    /// plus its selected `max_output` (lowered to the output cap, if any), or 1 for a
    /// request count; a hard request-scope limit refuses when `need > amount`. All of
    /// it is exact (in `i128`), and `used` is net: a credit (a correction below zero)
    /// leaves room. A session limit applies only when the request names a session. If
    /// nothing refuses, every applicable counter (hard and soft) holds `need`; all of
    /// this happens under one lock, so no other call interleaves, and a refusal leaves
    /// nothing reserved. Soft limits never refuse, but for one bound: no counter holds
    /// more than `u64::MAX` reserved at once, and a request that would make it do so
    /// is refused by any limit rather than held in part.
    ///
    /// Panics when `input` or `max_output` has a negative count (see [`Admission`]).
    ///
    /// Clamping: a hard request-scope limit with `clamp` that the request does not fit
    /// grants `amount - input` output tokens when the request's input alone fits and it
    /// asks for some selected output; the smallest such grant is the reservation's
    /// `output_cap`. Other limits never clamp: they refuse.
    pub fn admit(&self, a: &Admission<'_>) -> Result<Reservation, Refusal> {
        let input = Amounts::of(a.input);
        let max_output = Amounts::of(a.max_output);
        let negative = input.negative.or(max_output.negative);
        assert!(
            negative.is_none(),
            "an admission with a negative count: {negative:?}"
        );
        assert!(
            a.max_cost
                .is_none_or(|m| !m.amount.is_sign_negative() || m.amount.is_zero()),
            "an admission with a negative maximum cost: {:?}",
            a.max_cost
        );
        let mut g = self.lock();
        let inner = &mut *g;
        let chain = inner.chain(a.account.as_str());
        check_rules(inner, &chain, a.model)?;

        // Request-scope clamps first, so that the other limits see the cap.
        let mut cap: Option<u64> = None;
        for n in chain.top_down().rev() {
            let node = &inner.nodes[n];
            for l in &node.limits {
                let s = &l.spec;
                if !s.clamp {
                    continue;
                }
                let Measure::Tokens(sel) = s.measure else {
                    continue;
                };
                let i = input.select(&sel);
                let o = max_output.select(&sel);
                let amount = i128::from(s.amount);
                if i + o <= amount {
                    continue;
                }
                if o > 0 && i < amount {
                    // 0 <= i < amount: the room is in 1..=amount, a u64.
                    let Ok(room) = u64::try_from(amount - i) else {
                        unreachable!("room {} of a u64 limit", amount - i)
                    };
                    cap = Some(cap.map_or(room, |c| c.min(room)));
                } else {
                    return Err(Refusal {
                        node: node.path.clone(),
                        limit: Some(s.name.clone()),
                        kind: RefusalKind::Quota,
                        message: format!(
                            "hard limit '{}' on {}: {}, this request's input alone needs {i}",
                            s.name,
                            node.path,
                            s.describe()
                        ),
                        retry_after: None,
                    });
                }
            }
        }
        // Exact: both selections are sums of at most 25 non-negative i64 counts.
        let need = |m: &Measure| -> i128 {
            match m {
                Measure::Requests => 1,
                Measure::Tokens(sel) => {
                    let o = max_output.select(sel);
                    input.select(sel) + cap.map_or(o, |c| o.min(i128::from(c)))
                }
                // Held as money by `admit_cost`, never as tokens.
                Measure::Cost(_) => 0,
            }
        };

        // One pass, nearest node first: check and reserve; on a refusal, give back
        // what this pass reserved.
        let slot = inner.new_slot();
        let Inner { nodes, slots, .. } = &mut *inner;
        let mut holds = std::mem::take(&mut slots[slot].holds);
        let mut refusal = None;
        'nodes: for n in chain.top_down().rev() {
            let node = &mut nodes[n];
            for (index, l) in node.limits.iter_mut().enumerate() {
                let Some(who) = l.pick(a.key_id, a.session) else {
                    continue;
                };
                if let Measure::Cost(currency) = l.spec.measure {
                    match admit_cost(&node.path, l, who, currency, a) {
                        Ok(window_start) => holds.push(Hold {
                            node: n as u32,
                            index: index as u32,
                            limit: l.id,
                            window_start,
                            amount: 0,
                        }),
                        Err(r) => {
                            refusal = Some(r);
                            break 'nodes;
                        }
                    }
                    continue;
                }
                let amt = need(&l.spec.measure);
                let s = &l.spec;
                let (window_start, outcome) = if s.scope == LimitScope::Request {
                    let fits = s.mode == Mode::Soft || amt <= i128::from(s.amount);
                    let over = NoRoom::Over {
                        used: 0,
                        reserved: 0,
                    };
                    (a.now, if fits { Ok(0) } else { Err(over) })
                } else {
                    let w = l.advance(a.now);
                    (w.start, l.reserve(who, &w, amt))
                };
                match outcome {
                    Ok(held) => holds.push(Hold {
                        node: n as u32,
                        index: index as u32,
                        limit: l.id,
                        window_start,
                        amount: held,
                    }),
                    Err(why) => {
                        refusal = Some(refuse(&node.path, l, a, who, amt, why));
                        break 'nodes;
                    }
                }
            }
        }
        if let Some(refusal) = refusal {
            unreserve(nodes, &holds, a.key_id, a.session, a.max_cost);
            holds.clear();
            slots[slot].holds = holds;
            inner.free_slot(slot);
            return Err(refusal);
        }
        let s = &mut slots[slot];
        s.holds = holds;
        s.live = true;
        s.admitted = a.now;
        s.cost = a.max_cost;
        s.key_id.push_str(a.key_id);
        if let Some(session) = a.session {
            let mut buf = s.session.take().unwrap_or_default();
            buf.clear();
            buf.push_str(session);
            s.session = Some(buf);
        }
        let id = (u64::from(s.generation) << 32) | slot as u64;
        inner.live += 1;
        Ok(Reservation {
            id,
            output_cap: cap,
        })
    }

    /// Ends a reservation with the request's actual usage: the reservation is released
    /// and `actual` counted on every counter it held, in the window it was admitted
    /// in (if a counter has since moved to a newer window, that usage belongs to the
    /// past window and is not counted in memory). `now` is the settlement time; it
    /// only advances windows. Unknown ids (already settled, released or expired) are
    /// an error: the caller should [`Engine::record`] the usage instead. A negative
    /// count in `actual` is [`BudgetError::NegativeUsage`] and leaves the reservation
    /// held: what a request used is never negative.
    pub fn settle(
        &self,
        reservation: u64,
        actual: &TokenMap,
        now: Timestamp,
    ) -> Result<Settled, BudgetError> {
        self.settle_cost(reservation, actual, None, now)
    }

    /// [`Engine::settle`] with the request's actual cost, which cost limits count in
    /// place of the maximum cost they held (`None`: not priced, counted as nothing;
    /// a cost beyond the hold is counted all the same, and reported in
    /// [`Settled::exceeded`] when it takes a hard limit over). A negative cost, or one
    /// in another currency than the admission's maximum cost, is an error that leaves
    /// the reservation held.
    pub fn settle_cost(
        &self,
        reservation: u64,
        actual: &TokenMap,
        cost: Option<Money>,
        now: Timestamp,
    ) -> Result<Settled, BudgetError> {
        let actual = Amounts::of(actual);
        if let Some(t) = actual.negative {
            return Err(BudgetError::NegativeUsage {
                modality: t.modality,
                direction: t.direction,
                count: t.count,
            });
        }
        if let Some(m) = cost
            && m.amount.is_sign_negative()
            && !m.amount.is_zero()
        {
            return Err(BudgetError::NegativeCost(m));
        }
        let mut g = self.lock();
        let inner = &mut *g;
        if let (Some(m), Some(slot)) = (cost, inner.peek(reservation))
            && let Some(admitted) = inner.slots[slot].cost
            && admitted.currency != m.currency
        {
            return Err(BudgetError::CostCurrency {
                admitted: admitted.currency,
                settled: m.currency,
            });
        }
        let Some(i) = inner.take(reservation) else {
            return Err(BudgetError::UnknownReservation(reservation));
        };
        let mut out = Settled::default();
        let Inner { nodes, slots, .. } = &mut *inner;
        let res = &slots[i];
        for h in &res.holds {
            let Some((path, l)) = held(nodes, h) else {
                continue;
            };
            if let Measure::Cost(cur) = l.spec.measure {
                let spent = cost_in(cur, cost);
                if l.spec.scope == LimitScope::Request {
                    request_cost_usage(path, l, h.window_start, cur, spent, &mut out);
                    continue;
                }
                let who = res.holder(l.spec.scope);
                l.advance(now);
                let mut c = match l.counter(who) {
                    Some(c) if c.window_start == h.window_start => *c,
                    _ => continue,
                };
                c.unhold_cost(cost_in(cur, res.cost));
                add_cost_usage(path, l, &mut c, who, cur, spent, &mut out);
                if let Some(slot) = l.counter(who) {
                    *slot = c;
                }
                continue;
            }
            let amt = actual.measure(&l.spec.measure);
            if l.spec.scope == LimitScope::Request {
                request_usage(path, l, h.window_start, amt, &mut out);
                continue;
            }
            let who = res.holder(l.spec.scope);
            l.advance(now);
            let mut c = match l.counter(who) {
                Some(c) if c.window_start == h.window_start => *c,
                _ => continue,
            };
            c.unhold(h.amount);
            add_usage(path, l, &mut c, who, amt, &mut out);
            if let Some(slot) = l.counter(who) {
                *slot = c;
            }
        }
        inner.free_slot(i);
        Ok(out)
    }

    /// The node counters of hard limits that `reservation` holds, as nodes sharing one
    /// ledger reserve them in the database too: each with what this process has
    /// counted as used on it (its own settled usage and what it applied of other
    /// processes'; its holds are in the database, where every process's are), the
    /// hold and the amount, in one unit (tokens, requests, or money in the limit's
    /// currency).
    /// Per-key and per-session limits are held on the key's or session's counter
    /// (named by it: every node's requests of one key meet on one counter); a
    /// request-scope limit is each node's own. Unknown ids have none.
    pub fn shared_terms(&self, reservation: u64) -> Vec<SharedTerm> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(i) = inner.peek(reservation) else {
            return Vec::new();
        };
        let Inner { nodes, slots, .. } = inner;
        let res = &slots[i];
        let mut out = Vec::new();
        for h in &res.holds {
            let Some((path, l)) = held(nodes, h) else {
                continue;
            };
            if l.spec.mode != Mode::Hard || l.spec.scope == LimitScope::Request {
                continue;
            }
            let measure = l.spec.measure;
            let (amount, name) = (l.spec.amount, l.spec.name.clone());
            let money = l.spec.money;
            let who = res.holder(l.spec.scope);
            // Key ids and sessions hold no control characters, so the separator
            // cannot occur in them and no two subjects share a counter's name.
            let (subject, whose) = match who {
                Who::Key(k) => (format!("\u{1f}key:{k}"), format!(" for key {k}")),
                Who::Session(s) => (format!("\u{1f}session:{s}"), format!(" for session {s}")),
                Who::Node | Who::Request => (String::new(), String::new()),
            };
            let Some(c) = l.counter(who) else {
                continue;
            };
            if c.window_start != h.window_start {
                continue;
            }
            let (local, need, amount) = match measure {
                Measure::Cost(_) => {
                    let held = cost_in_decimal(res.cost);
                    let local = c.cost_used.to_decimal();
                    match local {
                        Some(local) => (local, held, money),
                        // Beyond 28 digits: counted as the whole limit, so the
                        // database refuses rather than admits on a guess.
                        None => (money, held, money),
                    }
                }
                _ => (
                    Decimal::from_i128_with_scale(c.used, 0),
                    Decimal::from(h.amount),
                    Decimal::from(amount),
                ),
            };
            out.push(SharedTerm {
                counter: format!(
                    "{path}\u{1f}{name}\u{1f}{}\u{1f}{}{subject}",
                    measure_tag(&measure),
                    h.window_start
                ),
                local,
                need,
                amount,
                measure,
                describe: format!("hard limit '{name}' on {path}{whose}"),
            });
        }
        out
    }

    /// Drops a reservation without usage (the request failed before using anything);
    /// whether it existed.
    pub fn release(&self, reservation: u64) -> bool {
        let mut g = self.lock();
        match g.take(reservation) {
            Some(i) => {
                g.release_slot(i);
                true
            }
            None => false,
        }
    }

    /// Releases, without usage, every reservation admitted at or before `now - ttl`
    /// (requests that died without settling); how many.
    pub fn expire(&self, now: Timestamp, ttl: Duration) -> usize {
        let ttl = SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX);
        let mut g = self.lock();
        let old: Vec<u64> = g
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && now.duration_since(s.admitted) >= ttl)
            .map(|(i, s)| (u64::from(s.generation) << 32) | i as u64)
            .collect();
        for &id in &old {
            if let Some(i) = g.take(id) {
                g.release_slot(i);
            }
        }
        old.len()
    }

    /// How many reservations are held.
    pub fn reservations(&self) -> usize {
        self.lock().live
    }

    /// Counts usage that already happened (e.g. an ingested event) at time `at`: never
    /// refused, counted on every applicable counter in the window containing `at`
    /// (nothing is counted in memory for a window older than a counter's current
    /// one). Counts are signed: a correction's negative counts lower the counters, as
    /// they lower the projections counters are restored from ([`Engine::load_used`]).
    /// A request-count limit counts 1. Reports the crossings and the hard limits this
    /// usage pushed or kept over their amount, so the caller can flag the entry.
    pub fn record(
        &self,
        account: &AccountPath,
        key_id: &str,
        session: Option<&str>,
        tokens: &TokenMap,
        at: Timestamp,
    ) -> Settled {
        self.count_usage(account, tokens, None, at, |l| l.pick(key_id, session))
    }

    /// [`Engine::record`] with what the usage cost, counted by cost limits in its
    /// currency (signed: a re-rating's credit counts negatively). Limits in other
    /// currencies do not count it: they cannot measure it.
    pub fn record_cost(
        &self,
        account: &AccountPath,
        key_id: &str,
        session: Option<&str>,
        tokens: &TokenMap,
        cost: Option<Money>,
        at: Timestamp,
    ) -> Settled {
        self.count_usage(account, tokens, cost, at, |l| l.pick(key_id, session))
    }

    /// [`Engine::record_correction`] with a signed cost (a correction's or
    /// re-rating's amount), counted on the node counters of cost limits in its
    /// currency.
    pub fn record_correction_cost(
        &self,
        account: &AccountPath,
        tokens: &TokenMap,
        cost: Option<Money>,
        at: Timestamp,
    ) -> Settled {
        self.count_usage(account, tokens, cost, at, |l| {
            (l.spec.scope == LimitScope::Node && l.spec.measure != Measure::Requests)
                .then_some(Who::Node)
        })
    }

    /// Counts usage another process recorded (a node sharing the ledger) on the node
    /// counters of every limit on `account`'s path, and on the counters of the key
    /// and session it names (its entry's `key` and `session`; entries without them
    /// count on no key's or session's counter), so per-key and per-session limits
    /// see every node's requests. A request-scope limit was that node's to check.
    pub fn record_elsewhere(
        &self,
        account: &AccountPath,
        key_id: Option<&str>,
        session: Option<&str>,
        tokens: &TokenMap,
        cost: Option<Money>,
        at: Timestamp,
    ) -> Settled {
        self.count_usage(account, tokens, cost, at, |l| match l.spec.scope {
            LimitScope::Node => Some(Who::Node),
            LimitScope::Key => key_id.map(Who::Key),
            LimitScope::Session => session.map(Who::Session),
            LimitScope::Request => None,
        })
    }

    /// Counts a correction (signed token deltas on `account`, made at `at`) on the
    /// node counters of token limits only: the counters a restart restores from the
    /// usage projections, which count corrections. A correction is not a request, nor
    /// any session's or key's usage, so request counts, per-session, per-key and
    /// per-request limits are left alone.
    pub fn record_correction(
        &self,
        account: &AccountPath,
        tokens: &TokenMap,
        at: Timestamp,
    ) -> Settled {
        self.count_usage(account, tokens, None, at, |l| {
            (l.spec.scope == LimitScope::Node && l.spec.measure != Measure::Requests)
                .then_some(Who::Node)
        })
    }

    /// Counts usage that happened at `at` on every limit of `account`'s path for
    /// which `who` names a counter (`None`: the limit does not count it).
    fn count_usage<'a>(
        &self,
        account: &AccountPath,
        tokens: &TokenMap,
        cost: Option<Money>,
        at: Timestamp,
        who: impl Fn(&Limit) -> Option<Who<'a>>,
    ) -> Settled {
        if self.limit_count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            // No limit anywhere: nothing to count (a limit set later starts from the
            // projections, as after a restart).
            return Settled::default();
        }
        let tokens = Amounts::of(tokens);
        let mut g = self.lock();
        let inner = &mut *g;
        let chain = inner.chain(account.as_str());
        let mut out = Settled::default();
        for n in chain.top_down() {
            let node = &mut inner.nodes[n];
            for l in node.limits.iter_mut() {
                let Some(who) = who(l) else {
                    continue;
                };
                if let Measure::Cost(cur) = l.spec.measure {
                    let Some(m) = cost.filter(|m| m.currency == cur) else {
                        continue;
                    };
                    let spent = ExactSum::of(m.amount);
                    if l.spec.scope == LimitScope::Request {
                        request_cost_usage(&node.path, l, at, cur, spent, &mut out);
                    } else {
                        count_cost_at(&node.path, l, who, cur, spent, at, &mut out);
                    }
                    continue;
                }
                let amt = tokens.measure(&l.spec.measure);
                if l.spec.scope == LimitScope::Request {
                    request_usage(&node.path, l, at, amt, &mut out);
                    continue;
                }
                count_at(&node.path, l, who, amt, at, &mut out);
            }
        }
        out
    }

    /// Restores a counter after a restart: sets `used` for the window starting at
    /// `window_start` (`None` for lifetime limits) of limit `name` on `node`, for
    /// `subject` (the session or key id for session and key limits, `None` for node
    /// limits). `used` is net, corrections included, as [`Engine::record`] counts it,
    /// and at most 2^100 either way. Thresholds already reached count as reported.
    /// A window older than the counter's current one is ignored. Request-scope limits
    /// have no counters.
    pub fn load_used(
        &self,
        node: &AccountPath,
        name: &str,
        subject: Option<&str>,
        window_start: Option<Timestamp>,
        used: i128,
    ) -> Result<(), BudgetError> {
        self.load(node, name, subject, window_start, Loaded::Tokens(used))
    }

    /// [`Engine::load_used`] for a cost limit: restores the money counted in the
    /// window (net, corrections included, in the limit's currency).
    pub fn load_cost_used(
        &self,
        node: &AccountPath,
        name: &str,
        subject: Option<&str>,
        window_start: Option<Timestamp>,
        used: Decimal,
    ) -> Result<(), BudgetError> {
        self.load(node, name, subject, window_start, Loaded::Cost(used))
    }

    fn load(
        &self,
        node: &AccountPath,
        name: &str,
        subject: Option<&str>,
        window_start: Option<Timestamp>,
        used: Loaded,
    ) -> Result<(), BudgetError> {
        let mut g = self.lock();
        let unknown = || BudgetError::UnknownLimit {
            node: node.clone(),
            name: name.to_string(),
        };
        let &i = g.index.get(node.as_str()).ok_or_else(unknown)?;
        let l = g.nodes[i as usize]
            .limits
            .iter_mut()
            .find(|l| l.spec.name == name)
            .ok_or_else(unknown)?;
        let bad = |why: &str| BudgetError::BadLoad {
            name: name.to_string(),
            reason: why.to_string(),
        };
        let who = match (l.spec.scope, subject) {
            (LimitScope::Request, _) => return Err(bad("request-scope limits have no counters")),
            (LimitScope::Node, Some(_)) => return Err(bad("a node limit takes no subject")),
            (LimitScope::Session | LimitScope::Key, None) => {
                return Err(bad("a session or key limit needs the session or key id"));
            }
            (LimitScope::Node, None) => Who::Node,
            (LimitScope::Session, Some(s)) => Who::Session(s),
            (LimitScope::Key, Some(k)) => Who::Key(k),
        };
        match (used, l.spec.measure) {
            (Loaded::Cost(_), Measure::Cost(_)) => {}
            (Loaded::Cost(_), _) => return Err(bad("only cost limits count money")),
            (Loaded::Tokens(_), Measure::Cost(_)) => {
                return Err(bad("a cost limit counts money: load_cost_used"));
            }
            (Loaded::Tokens(used), _) => {
                if used.unsigned_abs() > MAX_LOADED.unsigned_abs() {
                    return Err(bad("used is beyond ±2^100 tokens"));
                }
            }
        }
        let w = match window_start {
            None if l.spec.period == crate::Period::Lifetime => Window::LIFETIME,
            Some(ws) if l.spec.period != crate::Period::Lifetime => {
                let w = Window::containing(l.spec.period, &l.spec.time_zone, ws);
                if w.start != ws {
                    return Err(bad("not the start of one of the limit's windows"));
                }
                w
            }
            _ => return Err(bad("lifetime limits take no window start, others need one")),
        };
        if l.window != EMPTY_WINDOW && w.start < l.window.start {
            return Ok(());
        }
        if w.start > l.window.start || l.window == EMPTY_WINDOW {
            l.move_to(w);
        }
        let bits = match used {
            Loaded::Tokens(u) => reached_bits(&l.spec, u),
            Loaded::Cost(u) => {
                let mut bits = 0u16;
                for (i, &t) in l.spec.thresholds.iter().enumerate() {
                    if reached_cost(ExactSum::of(u), l.spec.money, t) {
                        bits |= 1 << i;
                    }
                }
                bits
            }
        };
        if let Some(c) = l.counter_or_insert(who) {
            c.roll(&w);
            match used {
                Loaded::Tokens(u) => c.used = u,
                Loaded::Cost(u) => c.cost_used = ExactSum::of(u),
            }
            c.crossed = bits;
        }
        Ok(())
    }

    /// The counters of `node`'s own limits at `now`: one row per node-scope and
    /// request-scope limit, and one per session or key with net usage or reservations in
    /// the current window, in limit order and then by subject.
    pub fn status(&self, node: &AccountPath, now: Timestamp) -> Vec<LimitStatus> {
        let mut g = self.lock();
        let mut out = Vec::new();
        if let Some(&i) = g.index.get(node.as_str()) {
            status_of(&mut g.nodes[i as usize], now, &mut out);
        }
        out
    }

    /// [`Engine::status`] for `account` and all its ancestors, top-most first.
    pub fn status_path(&self, account: &AccountPath, now: Timestamp) -> Vec<LimitStatus> {
        let mut g = self.lock();
        let chain = g.chain(account.as_str());
        let mut out = Vec::new();
        for n in chain.top_down() {
            status_of(&mut g.nodes[n], now, &mut out);
        }
        out
    }
}

fn check_rules(inner: &Inner, chain: &Chain, model: &str) -> Result<(), Refusal> {
    for n in chain.top_down() {
        let node = &inner.nodes[n];
        if let Err(why) = node.rules.check(model) {
            return Err(Refusal {
                node: node.path.clone(),
                limit: None,
                kind: RefusalKind::Model,
                message: format!("model '{model}' is {why} on {}", node.path),
                retry_after: None,
            });
        }
    }
    Ok(())
}

fn status_of(node: &mut Node, now: Timestamp, out: &mut Vec<LimitStatus>) {
    for l in node.limits.iter_mut() {
        let row = |spec: &LimitSpec, subject, w: Option<Window>, c: &Counter| {
            let (used, reserved) = w.map_or((0, 0), |w| c.view(&w));
            let cost = match spec.measure {
                Measure::Cost(currency) => {
                    let (used, reserved) =
                        w.map_or((ExactSum::ZERO, ExactSum::ZERO), |w| c.view_cost(&w));
                    let money = ExactSum::of(spec.money);
                    let free = msub(msub(money, used), reserved);
                    Some(CostStatus {
                        currency,
                        used,
                        reserved,
                        remaining: free.clamp(ExactSum::ZERO, money),
                    })
                }
                _ => None,
            };
            LimitStatus {
                spec: spec.clone(),
                subject,
                window_start: w.and_then(|w| w.start_opt()),
                window_end: w.and_then(|w| w.bounded().map(|b| b.1)),
                used,
                reserved,
                remaining: remaining(spec.amount, used, reserved),
                cost,
            }
        };
        match l.spec.scope {
            LimitScope::Request => {
                out.push(row(&l.spec, Subject::Request, None, &Counter::EMPTY));
            }
            LimitScope::Node => {
                let w = l.advance(now);
                out.push(row(&l.spec, Subject::Node, Some(w), &l.node));
            }
            scope @ (LimitScope::Session | LimitScope::Key) => {
                let w = l.advance(now);
                let who = |k| match scope {
                    LimitScope::Session => Who::Session(k),
                    _ => Who::Key(k),
                };
                let mut rows: Vec<LimitStatus> = l
                    .keyed
                    .iter()
                    .filter(|(_, c)| {
                        c.window_start == w.start
                            && (c.used != 0
                                || c.reserved > 0
                                || !c.cost_used.is_zero()
                                || !c.cost_reserved.is_zero())
                    })
                    .map(|(k, c)| row(&l.spec, who(k).subject(), Some(w), c))
                    .collect();
                rows.sort_by(|a, b| a.subject.cmp(&b.subject));
                out.extend(rows);
            }
        }
    }
}

/// `amount - used - reserved` clamped to `0..=amount`, exactly.
fn remaining(amount: u64, used: i128, reserved: u64) -> u64 {
    // `amount - reserved` is within ±2^64; taking `used` away overflows only when
    // `used` is hugely negative (room beyond the amount) or hugely positive (none).
    let free = match (i128::from(amount) - i128::from(reserved)).checked_sub(used) {
        Some(f) => f.clamp(0, i128::from(amount)),
        None if used < 0 => i128::from(amount),
        None => 0,
    };
    let Ok(free) = u64::try_from(free) else {
        unreachable!("{free} clamped to 0..={amount}")
    };
    free
}

/// The refusal of hard limit `l` for admission `a`.
fn refuse(
    path: &AccountPath,
    l: &Limit,
    a: &Admission<'_>,
    who: Who<'_>,
    amt: i128,
    why: NoRoom,
) -> Refusal {
    let s = &l.spec;
    let message = match why {
        _ if s.scope == LimitScope::Request => format!(
            "hard limit '{}' on {path}: {}, this request needs {amt}",
            s.name,
            s.describe()
        ),
        NoRoom::Over { used, reserved } => format!(
            "hard limit '{}' on {path}: {}{}, {used} used, {reserved} reserved, this request needs {amt}",
            s.name,
            s.describe(),
            subject_phrase(who)
        ),
        NoRoom::Held { reserved } => format!(
            "{} limit '{}' on {path}: {}{}, {reserved} reserved, this request needs {amt}: \
             no counter holds more than {} at once",
            s.mode,
            s.name,
            s.describe(),
            subject_phrase(who),
            u64::MAX
        ),
    };
    let retry_after = (s.scope != LimitScope::Request
        && amt <= i128::from(s.amount)
        && l.window.end != Timestamp::MAX)
        .then(|| until(a.now, l.window.end));
    Refusal {
        node: path.clone(),
        limit: Some(s.name.clone()),
        kind: kind(s),
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::reached;
    use crate::{Admission, BudgetError, Engine, LimitScope, LimitSpec, Mode, Period, RefusalKind};
    use ciyuan_core::jiff::Timestamp;
    use ciyuan_core::{AccountPath, Currency, ExactSum, Money, TokenMap};
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    fn p(s: &str) -> AccountPath {
        s.parse().unwrap()
    }
    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }
    fn money(a: &str, c: &str) -> Option<Money> {
        Some(Money::parse(a, c).unwrap())
    }
    fn cny() -> Currency {
        "CNY".parse().unwrap()
    }
    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn admit(
        e: &Engine,
        node: &str,
        cost: Option<Money>,
        now: Timestamp,
    ) -> Result<u64, crate::Refusal> {
        let none = TokenMap::new();
        e.admit(&Admission {
            account: &p(node),
            key_id: "k1",
            session: None,
            model: "m",
            now,
            input: &none,
            max_output: &none,
            max_cost: cost,
        })
        .map(|r| r.id)
    }
    fn cost_row(e: &Engine, node: &str, now: Timestamp) -> crate::CostStatus {
        e.status(&p(node), now)[0].cost.clone().unwrap()
    }

    #[test]
    fn usage_recorded_elsewhere_counts_on_node_key_and_session_counters() {
        let e = Engine::new();
        let tokens_spec = |name: &str, scope: LimitScope| {
            let mut s = LimitSpec::new(
                p("acme"),
                name,
                crate::Measure::Tokens(crate::Selector::ALL),
                1000,
                Period::Month,
            );
            s.scope = scope;
            s
        };
        e.set_limit(tokens_spec("node", LimitScope::Node)).unwrap();
        e.set_limit(tokens_spec("per-key", LimitScope::Key))
            .unwrap();
        let mut requests = LimitSpec::new(
            p("acme"),
            "calls",
            crate::Measure::Requests,
            10,
            Period::Month,
        );
        requests.scope = LimitScope::Node;
        e.set_limit(requests).unwrap();
        e.set_limit(LimitSpec::cost(
            p("acme"),
            "money",
            cny(),
            d("5"),
            Period::Month,
        ))
        .unwrap();
        let now = at("2026-12-06T08:00:00Z");
        let mut tokens = TokenMap::new();
        tokens
            .add(
                ciyuan_core::Modality::Text,
                ciyuan_core::Direction::Input,
                300,
            )
            .unwrap();
        let s = e.record_elsewhere(
            &p("acme/cn"),
            None,
            None,
            &tokens,
            money("1.25", "CNY"),
            now,
        );
        assert!(s.exceeded.is_empty());
        let status = e.status(&p("acme"), now);
        let used = |name: &str| {
            status
                .iter()
                .filter(|l| l.spec.name == name)
                .map(|l| l.used)
                .sum::<i128>()
        };
        assert_eq!(used("node"), 300, "the node counter counts it");
        assert_eq!(used("calls"), 1, "as one request");
        assert_eq!(used("per-key"), 0, "no key's counter: the entry named none");
        // An entry naming its key and session counts on their counters too.
        e.record_elsewhere(&p("acme/cn"), Some("k1"), Some("s1"), &tokens, None, now);
        let status = e.status(&p("acme"), now);
        let keyed = |name: &str| {
            status
                .iter()
                .filter(|l| l.spec.name == name)
                .map(|l| l.used)
                .sum::<i128>()
        };
        assert_eq!(keyed("per-key"), 300, "key k1's counter counts it");
        assert_eq!(keyed("node"), 600);
        let money_row = status.iter().find(|l| l.spec.name == "money").unwrap();
        assert_eq!(money_row.cost.as_ref().unwrap().used.to_string(), "1.25");
        // A hard limit it takes over is reported, as for usage recorded here.
        let mut more = TokenMap::new();
        more.add(
            ciyuan_core::Modality::Text,
            ciyuan_core::Direction::Input,
            800,
        )
        .unwrap();
        let s = e.record_elsewhere(&p("acme"), None, None, &more, None, now);
        assert_eq!(s.exceeded, vec![(p("acme"), "node".to_string())]);
    }

    #[test]
    fn shared_terms_name_the_key_and_session_counters_held() {
        let e = Engine::new();
        for (name, scope) in [
            ("node", LimitScope::Node),
            ("per-key", LimitScope::Key),
            ("per-session", LimitScope::Session),
            ("per-request", LimitScope::Request),
        ] {
            let mut s = LimitSpec::new(
                p("acme"),
                name,
                crate::Measure::Tokens(crate::Selector::ALL),
                1000,
                Period::Month,
            );
            s.scope = scope;
            e.set_limit(s).unwrap();
        }
        let now = at("2026-12-06T08:00:00Z");
        let mut input = TokenMap::new();
        input
            .add(
                ciyuan_core::Modality::Text,
                ciyuan_core::Direction::Input,
                10,
            )
            .unwrap();
        let none = TokenMap::new();
        // Key k1's earlier usage on another node, followed here.
        e.record_elsewhere(&p("acme/cn"), Some("k1"), Some("alice"), &input, None, now);
        let r = e
            .admit(&Admission {
                account: &p("acme/cn"),
                key_id: "k1",
                session: Some("alice"),
                model: "m",
                now,
                input: &input,
                max_output: &none,
                max_cost: None,
            })
            .unwrap();
        let terms = e.shared_terms(r.id);
        let names: Vec<(&str, &str)> = terms
            .iter()
            .map(|t| {
                (
                    t.counter.rsplit('\u{1f}').next().unwrap(),
                    t.describe.as_str(),
                )
            })
            .collect();
        assert_eq!(
            terms.len(),
            3,
            "node, key and session; not the request's: {names:?}"
        );
        assert!(names.contains(&("key:k1", "hard limit 'per-key' on acme for key k1")));
        assert!(names.contains(&(
            "session:alice",
            "hard limit 'per-session' on acme for session alice"
        )));
        for t in &terms {
            assert_eq!(
                t.local,
                Decimal::from(10),
                "{}: the followed usage",
                t.counter
            );
            assert_eq!(t.need, Decimal::from(10));
        }
        // Another key's and another session's requests hold other counters.
        let r2 = e
            .admit(&Admission {
                account: &p("acme/cn"),
                key_id: "k2",
                session: Some("bob"),
                model: "m",
                now,
                input: &input,
                max_output: &none,
                max_cost: None,
            })
            .unwrap();
        let other: Vec<String> = e
            .shared_terms(r2.id)
            .into_iter()
            .map(|t| t.counter)
            .collect();
        for t in &terms {
            assert_eq!(
                other.contains(&t.counter),
                !t.counter.contains("k1") && !t.counter.contains("alice"),
                "{}",
                t.counter
            );
        }
    }

    #[test]
    fn cost_limits_hold_the_maximum_and_count_the_actual_exactly() {
        let e = Engine::new();
        let mut spec = LimitSpec::cost(p("acme"), "monthly", cny(), d("1.00"), Period::Month);
        spec.thresholds = vec![50, 100];
        e.set_limit(spec).unwrap();
        let now = at("2026-12-06T08:00:00Z");
        let r1 = admit(&e, "acme/cn", money("0.6", "CNY"), now).unwrap();
        let refused = admit(&e, "acme/cn", money("0.4000000001", "CNY"), now).unwrap_err();
        assert_eq!(
            refused.message,
            "hard limit 'monthly' on acme: 1.00 CNY per month, 0 used, 0.6 reserved, this request may cost 0.4000000001"
        );
        assert_eq!(refused.kind, RefusalKind::Quota);
        assert!(refused.retry_after.is_some());
        let none = TokenMap::new();
        let s = e
            .settle_cost(r1, &none, money("0.3000000001", "CNY"), now)
            .unwrap();
        assert!(s.crossings.is_empty());
        let row = cost_row(&e, "acme", now);
        assert_eq!(row.used.to_string(), "0.3000000001");
        assert!(row.reserved.is_zero());
        assert_eq!(row.remaining.to_string(), "0.6999999999");
        // Exactly to the limit is allowed; a hair more is not.
        assert!(admit(&e, "acme", money("0.7", "CNY"), now).is_err());
        let r2 = admit(&e, "acme", money("0.6999999999", "CNY"), now).unwrap();
        let s = e.settle_cost(r2, &none, money("0.2", "CNY"), now).unwrap();
        let th: Vec<u8> = s.crossings.iter().map(|c| c.threshold).collect();
        assert_eq!(th, [50]);
        let c = s.crossings[0].cost.clone().unwrap();
        assert_eq!(
            (c.used.to_string(), c.amount),
            ("0.5000000001".to_string(), d("1.00"))
        );
        assert_eq!((s.crossings[0].used, s.crossings[0].amount), (0, 0));
        // A cost beyond the hold is counted, and reported over the hard limit.
        let r3 = admit(&e, "acme", money("0.1", "CNY"), now).unwrap();
        let s = e.settle_cost(r3, &none, money("0.6", "CNY"), now).unwrap();
        assert_eq!(s.exceeded, vec![(p("acme"), "monthly".to_string())]);
        assert_eq!(
            s.crossings.iter().map(|c| c.threshold).collect::<Vec<_>>(),
            [100]
        );
        assert_eq!(cost_row(&e, "acme", now).remaining, ExactSum::ZERO);
        // A new month starts from nothing.
        let next = at("2027-01-01T00:00:00Z");
        assert!(admit(&e, "acme", money("1", "CNY"), next).is_ok());
    }

    #[test]
    fn currencies_unpriced_requests_and_token_limits_stay_apart() {
        let e = Engine::new();
        e.set_limit(LimitSpec::cost(
            p("acme"),
            "usd",
            "USD".parse().unwrap(),
            d("10"),
            Period::Day,
        ))
        .unwrap();
        let mut soft = LimitSpec::cost(p("acme"), "cny", cny(), d("1"), Period::Day);
        soft.mode = Mode::Soft;
        e.set_limit(soft).unwrap();
        let now = at("2026-12-06T08:00:00Z");
        let r = admit(&e, "acme", money("5", "CNY"), now).unwrap_err();
        assert_eq!(
            r.message,
            "hard limit 'usd' on acme: 10 USD per day, cannot bound a request priced in CNY"
        );
        // Unpriced: counts nothing anywhere.
        let id = admit(&e, "acme", None, now).unwrap();
        e.settle(id, &TokenMap::new(), now).unwrap();
        let id = admit(&e, "acme", money("3", "USD"), now).unwrap();
        assert_eq!(
            e.settle_cost(id, &TokenMap::new(), money("1", "CNY"), now),
            Err(BudgetError::CostCurrency {
                admitted: "USD".parse().unwrap(),
                settled: cny()
            })
        );
        assert_eq!(
            e.settle_cost(id, &TokenMap::new(), money("-1", "USD"), now)
                .unwrap_err()
                .to_string(),
            "actual cost cannot be negative: -1 USD"
        );
        // Still held after the errors; the soft CNY limit counts nothing in USD.
        let rows = e.status(&p("acme"), now);
        assert_eq!(rows[0].cost.as_ref().unwrap().reserved.to_string(), "3");
        e.settle_cost(id, &TokenMap::new(), money("2.5", "USD"), now)
            .unwrap();
        let rows = e.status(&p("acme"), now);
        assert_eq!(rows[0].cost.as_ref().unwrap().used.to_string(), "2.5");
        assert!(rows[1].cost.as_ref().unwrap().used.is_zero());
        // Recorded usage (ingested) counts in its own currency only.
        let s = e.record_cost(
            &p("acme/x"),
            "k",
            None,
            &TokenMap::new(),
            money("1.5", "CNY"),
            now,
        );
        assert_eq!(s.crossings.len(), 0, "no thresholds set");
        let rows = e.status(&p("acme"), now);
        assert_eq!(rows[1].cost.as_ref().unwrap().used.to_string(), "1.5");
        assert_eq!(rows[0].cost.as_ref().unwrap().used.to_string(), "2.5");
        // Corrections count negatively.
        e.record_correction_cost(&p("acme"), &TokenMap::new(), money("-0.5", "USD"), now);
        assert_eq!(cost_row(&e, "acme", now).used.to_string(), "2");
    }

    #[test]
    fn cost_limits_validate_restore_and_limit_single_requests() {
        let mut bad = LimitSpec::cost(p("a"), "x", cny(), d("-1"), Period::Day);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "limit \"x\" is invalid: money -1 must be zero or more, with at most 28 significant digits"
        );
        bad.money = d("1");
        bad.amount = 5;
        assert!(bad.validate().is_err());
        let mut tok = LimitSpec::new(p("a"), "t", crate::Measure::Requests, 5, Period::Day);
        tok.money = d("1");
        assert!(tok.validate().is_err());

        let e = Engine::new();
        let mut spec = LimitSpec::cost(p("a"), "daily", cny(), d("100"), Period::Day);
        spec.thresholds = vec![50];
        e.set_limit(spec).unwrap();
        let day = at("2026-12-06T00:00:00Z");
        e.load_cost_used(&p("a"), "daily", None, Some(day), d("99.99"))
            .unwrap();
        assert_eq!(
            e.load_used(&p("a"), "daily", None, Some(day), 5)
                .unwrap_err()
                .to_string(),
            "cannot restore limit \"daily\": a cost limit counts money: load_cost_used"
        );
        let now = at("2026-12-06T12:00:00Z");
        assert!(admit(&e, "a", money("0.02", "CNY"), now).is_err());
        let id = admit(&e, "a", money("0.01", "CNY"), now).unwrap();
        // The 50% threshold was reached before the restart: not reported again.
        let s = e
            .settle_cost(id, &TokenMap::new(), money("0.01", "CNY"), now)
            .unwrap();
        assert!(s.crossings.is_empty());

        let mut per = LimitSpec::cost(p("b"), "per-request", cny(), d("0.5"), Period::Day);
        per.scope = LimitScope::Request;
        e.set_limit(per).unwrap();
        let r = admit(&e, "b", money("0.51", "CNY"), now).unwrap_err();
        assert_eq!(
            r.message,
            "hard limit 'per-request' on b: 0.5 CNY per request, this request may cost 0.51"
        );
        let id = admit(&e, "b", money("0.5", "CNY"), now).unwrap();
        let s = e
            .settle_cost(id, &TokenMap::new(), money("0.7", "CNY"), now)
            .unwrap();
        assert_eq!(s.exceeded.len(), 1);
    }

    #[test]
    fn eight_threads_never_pass_a_hard_cost_limit_and_end_exact() {
        let e = Engine::new();
        e.set_limit(LimitSpec::cost(
            p("org"),
            "cap",
            cny(),
            d("50.0001"),
            Period::Lifetime,
        ))
        .unwrap();
        let now = at("2026-12-06T08:00:00Z");
        let settled: Vec<ExactSum> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u32)
                .map(|th| {
                    let e = &e;
                    s.spawn(move || {
                        let mut sum = ExactSum::ZERO;
                        for i in 0..2000u32 {
                            let node = ["org", "org/a", "org/a/b"][(i % 3) as usize];
                            let max = Decimal::new(i64::from(10 + (i * 7 + th) % 90), 3);
                            if let Ok(id) = admit(
                                e,
                                node,
                                Some(Money {
                                    amount: max,
                                    currency: cny(),
                                }),
                                now,
                            ) {
                                let cost = Decimal::new(i64::from((i * 13 + th) % 10), 3).min(max);
                                e.settle_cost(
                                    id,
                                    &TokenMap::new(),
                                    Some(Money {
                                        amount: cost,
                                        currency: cny(),
                                    }),
                                    now,
                                )
                                .unwrap();
                                sum = sum.plus(cost);
                            }
                            let c = cost_row(e, "org", now);
                            assert!(
                                c.used.checked_add(c.reserved).unwrap()
                                    <= ExactSum::of(d("50.0001"))
                            );
                        }
                        sum
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total = settled
            .iter()
            .fold(ExactSum::ZERO, |a, s| a.checked_add(*s).unwrap());
        let c = cost_row(&e, "org", now);
        assert_eq!(c.used, total);
        assert!(c.reserved.is_zero());
        // Sized so that the limit is reached: refusals happened.
        assert!(
            admit(
                &e,
                "org",
                Some(Money {
                    amount: d("0.1"),
                    currency: cny()
                }),
                now
            )
            .is_err()
        );
    }

    proptest! {
        /// Random admissions (maximum costs of 0 to 4 decimals) on a three-level tree of
        /// hard cost limits, settled with random costs within their hold or released:
        /// no counter's used plus reserved ever passes its limit, and each counter's
        /// used is exactly the sum of the costs settled under it.
        #[test]
        fn hard_cost_limits_are_never_exceeded_by_admitted_requests(
            limits in proptest::collection::vec(1u32..5_000, 3),
            reqs in proptest::collection::vec((0usize..3, 0u32..2_000, 0u32..=100, any::<bool>(), 0u32..5), 1..60),
        ) {
            let e = Engine::new();
            let nodes = ["a", "a/b", "a/b/c"];
            for (i, &amt) in limits.iter().enumerate() {
                e.set_limit(LimitSpec::cost(p(nodes[i]), "l", cny(), Decimal::new(amt.into(), 2), Period::Lifetime)).unwrap();
            }
            let now = at("2026-12-06T08:00:00Z");
            let mut spent = [ExactSum::ZERO; 3];
            let mut live: Vec<(u64, usize, Decimal)> = Vec::new();
            for (node, max, pct, release, scale) in reqs {
                let max_cost = Decimal::new(max.into(), scale);
                if let Ok(id) = admit(&e, nodes[node], Some(Money { amount: max_cost, currency: cny() }), now) {
                    live.push((id, node, max_cost));
                }
                if !live.is_empty() && (live.len() > 3 || release) {
                    let (id, node, max_cost) = live.remove(0);
                    if release {
                        prop_assert!(e.release(id));
                    } else {
                        let actual = max_cost * Decimal::from(pct) / Decimal::from(100);
                        e.settle_cost(id, &TokenMap::new(), Some(Money { amount: actual, currency: cny() }), now).unwrap();
                        for s in spent.iter_mut().take(node + 1) {
                            *s = s.plus(actual);
                        }
                    }
                }
                for (i, n) in nodes.iter().enumerate() {
                    let c = cost_row(&e, n, now);
                    let total = c.used.checked_add(c.reserved).unwrap();
                    prop_assert!(total <= ExactSum::of(Decimal::new(limits[i].into(), 2)), "{n}: {total}");
                    prop_assert_eq!(c.used, spent[i]);
                }
            }
        }
    }

    #[test]
    fn regression_thresholds_are_exact_for_any_signed_usage() {
        assert!(reached(50, 100, 50));
        assert!(!reached(49, 100, 50));
        // 50% of 3 is 1.5: 2 reaches it, 1 does not.
        assert!(reached(2, 3, 50) && !reached(1, 3, 50));
        // Never at or below zero, even of a zero amount.
        assert!(!reached(0, 0, 1) && reached(1, 0, 1));
        assert!(!reached(-1, 0, 1) && !reached(i128::MIN, 100, 50));
        // At the top: 255% of u64::MAX, exactly.
        let point = i128::from(u64::MAX) * 255;
        let ceil = (point + 99) / 100;
        assert!(reached(ceil, u64::MAX, 255));
        assert!(!reached(ceil - 1, u64::MAX, 255));
        assert!(reached(1 << 72, u64::MAX, 255));
        assert!(reached(i128::MAX, u64::MAX, 255));
    }
}
