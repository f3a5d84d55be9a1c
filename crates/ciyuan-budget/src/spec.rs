//! What a limit says: the node it sits on, what it measures, over which window, and
//! what happens when it is reached.

use std::fmt;

use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, Currency, Direction, Modality, TokenCount, TokenMap};
use rust_decimal::Decimal;

use crate::BudgetError;

/// Most thresholds one limit may carry.
pub const MAX_THRESHOLDS: usize = 16;
/// Longest accepted limit name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Which tokens a [`Measure::Tokens`] limit counts. `None` means any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Selector {
    /// Only tokens of this modality, or any modality.
    pub modality: Option<Modality>,
    /// Only tokens of this direction, or any direction.
    pub direction: Option<Direction>,
}

impl Selector {
    /// Every token.
    pub const ALL: Selector = Selector {
        modality: None,
        direction: None,
    };

    /// Whether a token key is counted.
    pub fn matches(&self, modality: Modality, direction: Direction) -> bool {
        self.modality.is_none_or(|m| m == modality) && self.direction.is_none_or(|d| d == direction)
    }

    /// The selected tokens of `map`, net: negative counts (corrections) count
    /// negatively. Exact: a map has at most 30 keys of `i64`, so the sum's magnitude
    /// stays below 25 × 2^63 < 2^68, far inside `i128`.
    pub fn count(&self, map: &TokenMap) -> i128 {
        map.iter()
            .filter(|t| self.matches(t.modality, t.direction))
            .map(|t| i128::from(t.count))
            .sum()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.modality, self.direction) {
            (None, None) => f.write_str("tokens"),
            (Some(m), None) => write!(f, "{m} tokens"),
            (None, Some(d)) => write!(f, "{d} tokens"),
            (Some(m), Some(d)) => write!(f, "{m}.{d} tokens"),
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Tokens chosen by a [`Selector`].
    Tokens(Selector),
    /// Requests: each admitted or recorded request counts 1.
    Requests,
    /// Money in one currency: what requests cost (their maximum cost while in
    /// flight), counted exactly ([`ciyuan_core::ExactSum`]); the limit is
    /// [`LimitSpec::money`]. Amounts in other currencies are not counted by it.
    Cost(Currency),
}

impl Measure {
    /// How much of this measure a request of these tokens amounts to: the net
    /// selected tokens (see [`Selector::count`]), or 1 request.
    pub fn amount(&self, tokens: &TokenMap) -> i128 {
        match self {
            Measure::Tokens(sel) => sel.count(tokens),
            Measure::Requests => 1,
            // Tokens are not money: a cost limit's token counters stay at zero.
            Measure::Cost(_) => 0,
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Measure::Tokens(sel) => sel.fmt(f),
            Measure::Requests => f.write_str("requests"),
            Measure::Cost(c) => write!(f, "{c}"),
        }
    }
}

/// The window over which a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A UTC-aligned minute.
    Minute,
    /// A UTC-aligned hour.
    Hour,
    /// A calendar day in the limit's time zone (23 or 25 hours on DST days).
    Day,
    /// A calendar month in the limit's time zone.
    Month,
    /// Forever: the counter never resets.
    Lifetime,
}

impl Period {
    /// `per minute`, ..., `in total`.
    pub fn phrase(self) -> &'static str {
        match self {
            Period::Minute => "per minute",
            Period::Hour => "per hour",
            Period::Day => "per day",
            Period::Month => "per month",
            Period::Lifetime => "in total",
        }
    }
}

/// What reaching a limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Refuse requests that would go over.
    Hard,
    /// Never refuse; report threshold crossings (alerts) only.
    Soft,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Hard => "hard",
            Mode::Soft => "soft",
        })
    }
}

/// Whose usage one counter of a limit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    /// One counter for the whole subtree of the node.
    Node,
    /// One counter per session id; requests without a session are not limited by it.
    Session,
    /// One counter per API key id.
    Key,
    /// No counter: each single request's own size is limited.
    Request,
}

/// One limit on one account node, inherited by the node's whole subtree.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSpec {
    /// The node the limit sits on; usage anywhere below it counts.
    pub node: AccountPath,
    /// The limit's name, unique on its node (1 to 64 bytes, no control characters).
    pub name: String,
    /// What is counted.
    pub measure: Measure,
    /// The most that may be counted in one window (a request's size for
    /// [`LimitScope::Request`]); 0 for [`Measure::Cost`] limits, whose limit is
    /// [`LimitSpec::money`].
    pub amount: u64,
    /// For [`Measure::Cost`] limits: the most money that may be counted in one
    /// window (a request's maximum cost for [`LimitScope::Request`]), in the
    /// measure's currency, at most 28 significant digits; zero for other limits.
    pub money: Decimal,
    /// The window. Ignored for [`LimitScope::Request`].
    pub period: Period,
    /// Refuse, or only alert.
    pub mode: Mode,
    /// Whose usage a counter holds.
    pub scope: LimitScope,
    /// Alert thresholds in percent of `amount` (1 to 255, e.g. `[50, 80, 100]`); each
    /// is reported once per window (and per session or key) when usage reaches it.
    pub thresholds: Vec<u8>,
    /// The time zone of [`Period::Day`] and [`Period::Month`] windows.
    pub time_zone: TimeZone,
    /// Only for hard [`LimitScope::Request`] limits on tokens: when a request does not
    /// fit, grant it less output (an output cap) instead of refusing, as long as its
    /// input fits and some output is selected.
    pub clamp: bool,
}

impl LimitSpec {
    /// A hard, node-scoped limit in UTC with no thresholds and no clamp; adjust the
    /// public fields for anything else.
    pub fn new(
        node: AccountPath,
        name: impl Into<String>,
        measure: Measure,
        amount: u64,
        period: Period,
    ) -> LimitSpec {
        LimitSpec {
            node,
            name: name.into(),
            measure,
            amount,
            money: Decimal::ZERO,
            period,
            mode: Mode::Hard,
            scope: LimitScope::Node,
            thresholds: Vec::new(),
            time_zone: TimeZone::UTC,
            clamp: false,
        }
    }

    /// A hard, node-scoped limit of `money` in `currency` per `period`, in UTC, with
    /// no thresholds; adjust the public fields for anything else.
    pub fn cost(
        node: AccountPath,
        name: impl Into<String>,
        currency: Currency,
        money: Decimal,
        period: Period,
    ) -> LimitSpec {
        let mut spec = LimitSpec::new(node, name, Measure::Cost(currency), 0, period);
        spec.money = money;
        spec
    }

    /// Checks the spec as [`crate::Engine::set_limit`] does and puts its thresholds in
    /// order without duplicates, e.g. before a limit is written to the ledger.
    pub fn validate(&mut self) -> Result<(), BudgetError> {
        let bad = |why: &str| BudgetError::InvalidLimit {
            name: self.name.clone(),
            reason: why.to_string(),
        };
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(bad("the name must be 1 to 64 bytes"));
        }
        if self.name.chars().any(char::is_control) {
            return Err(bad("the name has a control character"));
        }
        if self.thresholds.contains(&0) {
            return Err(bad("thresholds are percentages from 1 to 255"));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        if self.thresholds.len() > MAX_THRESHOLDS {
            return Err(bad("more than 16 thresholds"));
        }
        if self.clamp {
            if self.scope != LimitScope::Request || self.mode != Mode::Hard {
                return Err(bad("clamp is only for hard limits of request scope"));
            }
            if !matches!(self.measure, Measure::Tokens(_)) {
                return Err(bad("clamp needs a token measure"));
            }
        }
        if let Measure::Cost(_) = self.measure {
            if self.amount != 0 {
                return Err(bad("a cost limit's amount is its money; amount must be 0"));
            }
            if (self.money.is_sign_negative() && !self.money.is_zero())
                || !ciyuan_core::fits_digits(self.money)
            {
                return Err(bad(&format!(
                    "money {} must be zero or more, with at most 28 significant digits",
                    self.money
                )));
            }
        } else if !self.money.is_zero() {
            return Err(bad("only cost limits have money"));
        }
        if self.scope == LimitScope::Request && self.measure == Measure::Requests {
            return Err(bad("a request-scope limit must measure tokens"));
        }
        Ok(())
    }

    /// The window containing `at`: `None` for [`Period::Lifetime`] and request-scope
    /// limits, else its start (inclusive) and end (exclusive).
    pub fn window(&self, at: Timestamp) -> Option<(Timestamp, Timestamp)> {
        if self.scope == LimitScope::Request {
            return None;
        }
        let w = Window::containing(self.period, &self.time_zone, at);
        w.bounded()
    }

    /// How this limit reads in a message: `1000000 tokens per month`,
    /// `60 requests per minute per key`.
    pub fn describe(&self) -> String {
        let per = match self.scope {
            LimitScope::Node => "",
            LimitScope::Session => " per session",
            LimitScope::Key => " per key",
            LimitScope::Request => {
                return format!("{} {} per request", self.limit_text(), self.measure);
            }
        };
        format!(
            "{} {} {}{per}",
            self.limit_text(),
            self.measure,
            self.period.phrase()
        )
    }

    /// The limit as written: the money of cost limits, else the amount.
    fn limit_text(&self) -> String {
        match self.measure {
            Measure::Cost(_) => self.money.to_string(),
            _ => self.amount.to_string(),
        }
    }

    /// Whether waiting and retrying can help, i.e. the kind of a refusal: minute
    /// windows and request counts are rates, everything else quotas.
    pub(crate) fn is_rate(&self) -> bool {
        self.period == Period::Minute || self.measure == Measure::Requests
    }
}

/// A window of a counter. Lifetime windows run from `Timestamp::MIN` to
/// `Timestamp::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Window {
    pub const LIFETIME: Window = Window {
        start: Timestamp::MIN,
        end: Timestamp::MAX,
    };

    pub fn contains(&self, at: Timestamp) -> bool {
        self.start <= at && at < self.end
    }

    pub fn bounded(self) -> Option<(Timestamp, Timestamp)> {
        (self != Window::LIFETIME).then_some((self.start, self.end))
    }

    pub fn start_opt(self) -> Option<Timestamp> {
        (self != Window::LIFETIME).then_some(self.start)
    }

    /// The window of `period` containing `at`. Outside jiff's range (years beyond
    /// ±9999) the window degrades to "from `at` on", which never happens in practice.
    pub fn containing(period: Period, tz: &TimeZone, at: Timestamp) -> Window {
        let w = match period {
            Period::Minute => fixed(at, 60),
            Period::Hour => fixed(at, 3600),
            Period::Day => day(tz, at),
            Period::Month => month(tz, at),
            Period::Lifetime => Some(Window::LIFETIME),
        };
        w.unwrap_or(Window {
            start: at,
            end: Timestamp::MAX,
        })
    }
}

fn fixed(at: Timestamp, secs: i64) -> Option<Window> {
    let s = at.as_second().div_euclid(secs) * secs;
    Some(Window {
        start: Timestamp::from_second(s).ok()?,
        end: Timestamp::from_second(s + secs).ok()?,
    })
}

fn day(tz: &TimeZone, at: Timestamp) -> Option<Window> {
    let date = at.to_zoned(tz.clone()).date();
    Some(Window {
        start: date.to_zoned(tz.clone()).ok()?.timestamp(),
        end: date.tomorrow().ok()?.to_zoned(tz.clone()).ok()?.timestamp(),
    })
}

fn month(tz: &TimeZone, at: Timestamp) -> Option<Window> {
    let first = at.to_zoned(tz.clone()).date().first_of_month();
    let next = first
        .checked_add(ciyuan_core::jiff::Span::new().months(1))
        .ok()?;
    Some(Window {
        start: first.to_zoned(tz.clone()).ok()?.timestamp(),
        end: next.to_zoned(tz.clone()).ok()?.timestamp(),
    })
}

/// Time from `now` to `end`, zero if already past.
pub(crate) fn until(now: Timestamp, end: Timestamp) -> std::time::Duration {
    let d: SignedDuration = end.duration_since(now);
    std::time::Duration::try_from(d).unwrap_or(std::time::Duration::ZERO)
}

/// Token keys: every modality by every direction, as the ledger names them.
const MODALITIES: usize = ciyuan_core::Modality::ALL.len();
const DIRECTIONS: usize = ciyuan_core::Direction::ALL.len();

/// Tokens of a map by modality × direction, net (negative counts count negatively),
/// with the sums by modality, by direction and in total, so that any selector is one
/// lookup and limits are measured without walking the map again (and outside the
/// engine's lock).
///
/// Every sum is exact with plain `+`: a map has at most 30 keys (5 modalities × 6
/// directions), each an `i64` (so a cell is one count), and no sum's magnitude
/// reaches 30 × 2^63 < 2^68.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amounts {
    cell: [i64; MODALITIES * DIRECTIONS],
    by_modality: [i128; MODALITIES],
    by_direction: [i128; DIRECTIONS],
    total: i128,
    /// The map's first negative count, if any: usage that happened (or may happen) is
    /// never negative; only corrections are.
    pub negative: Option<TokenCount>,
}

impl Amounts {
    pub fn of(map: &TokenMap) -> Amounts {
        let mut a = Amounts {
            cell: [0; MODALITIES * DIRECTIONS],
            by_modality: [0; MODALITIES],
            by_direction: [0; DIRECTIONS],
            total: 0,
            negative: None,
        };
        for t in map.iter() {
            let n = i128::from(t.count);
            let (m, d) = (t.modality as usize, t.direction as usize);
            a.cell[m * DIRECTIONS + d] = t.count;
            a.by_modality[m] += n;
            a.by_direction[d] += n;
            a.total += n;
            if t.count < 0 && a.negative.is_none() {
                a.negative = Some(t);
            }
        }
        a
    }

    pub fn select(&self, sel: &Selector) -> i128 {
        match (sel.modality, sel.direction) {
            (Some(m), Some(d)) => i128::from(self.cell[m as usize * DIRECTIONS + d as usize]),
            (Some(m), None) => self.by_modality[m as usize],
            (None, Some(d)) => self.by_direction[d as usize],
            (None, None) => self.total,
        }
    }

    pub fn measure(&self, m: &Measure) -> i128 {
        match m {
            Measure::Tokens(sel) => self.select(sel),
            Measure::Requests => 1,
            Measure::Cost(_) => 0,
        }
    }
}
