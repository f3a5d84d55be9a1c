//! The compiled book: rating on the hot path.
//!
//! A [`Rater`] is built once per book version (and contract), then prices entries
//! without parsing a decimal or matching a pattern on the common path: the prices of
//! every rule sit in arrays indexed by token key, and which rules price a (model,
//! service, tier) is resolved once and kept in a bounded map read under a shared lock.

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::{
    AccountPath, Currency, Direction, Modality, PriceBook, PriceContract, PriceError, PriceKey,
    PriceRule, RatedLine, Rating, Rounding, ServiceTier, TierKey, TierKind, TierPeriod, TimeWindow,
    TokenMap, UnitPrices, decimal_from_text,
};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Most models whose rule resolution a rater remembers. Model names come from
/// clients; past the bound, resolutions are computed each time instead of growing
/// the map without end.
pub const MAX_CACHED_MODELS: usize = 16_384;
/// Most (service, tier) resolutions remembered per model.
pub const MAX_CACHED_PER_MODEL: usize = 64;

/// What is priced: one usage entry, as the lead reads it from the entry.
#[derive(Debug, Clone, Copy)]
pub struct RateInput<'a> {
    /// The entry's model, if any.
    pub model: Option<&'a str>,
    /// The entry's service (`llm.chat`, `doc.verify`, ...).
    pub service: &'a str,
    /// The tier the entry states (standard when it states none).
    pub tier: ServiceTier,
    /// The counts priced (the provider's, the recount or the greater: the lead's
    /// choice, recorded as [`Rating::basis`]).
    pub tokens: &'a TokenMap,
    /// The entry's measures; only those a rule prices (`measure.<name>`) are read.
    pub measures: &'a BTreeMap<String, serde_json::Value>,
    /// The entry's time: picks time windows.
    pub at: Timestamp,
    /// The quantity the rule's tiers count, in their period, before this entry (see
    /// [`Rater::tiers_for`]); zero when the rule has no tiers.
    pub period_to_date: Decimal,
}

/// The tier counter an entry advances (see [`Rater::tier_counter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierCounter {
    /// Over which period the counter runs.
    pub period: TierPeriod,
    /// The rule's counter name ([`ciyuan_core::PriceRule::counter_name`]).
    pub rule: String,
    /// What this entry adds to it.
    pub units: Decimal,
}

/// The start (UTC) of the tier period holding `at`, a day or a calendar month in
/// `zone`; `None` only where the zone's calendar leaves the supported range.
pub fn period_start(period: TierPeriod, zone: &TimeZone, at: Timestamp) -> Option<Timestamp> {
    let local = at.to_zoned(zone.clone());
    let day = match period {
        TierPeriod::Day => local,
        TierPeriod::Month => local.first_of_month().ok()?,
    };
    day.start_of_day().ok().map(|z| z.timestamp())
}

/// Why an entry could not be rated. Never for a missing price (that is
/// [`Rating::unpriced`] or [`Rating::missing`]): only for input a rating cannot
/// describe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// A negative token count: usage is rated, corrections are not.
    #[error("tokens.{key}: {count} is negative; only usage is rated")]
    Negative {
        /// The token key.
        key: String,
        /// The count.
        count: i64,
    },
    /// A priced measure that is not a non-negative number.
    #[error("measures.{name}: {why}")]
    Measure {
        /// The measure.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// An amount beyond what a decimal holds.
    #[error("amount overflow pricing {0}")]
    Overflow(String),
}

const DIRECTIONS: usize = Direction::ALL.len();
const SLOTS: usize = Modality::ALL.len() * DIRECTIONS;

fn slot(m: Modality, d: Direction) -> usize {
    m as usize * DIRECTIONS + d as usize
}

#[derive(Clone, Copy)]
enum Key<'a> {
    Slot(usize),
    Measure(&'a str),
}

/// Prices by key, token keys in an array.
#[derive(Debug, Clone, Default)]
struct Prices {
    tokens: [Option<Decimal>; SLOTS],
    measures: Vec<(String, Decimal)>,
}

impl Prices {
    fn new(p: &UnitPrices) -> Prices {
        let mut out = Prices::default();
        for (k, v) in p {
            match k {
                PriceKey::Tokens(m, d) => out.tokens[slot(*m, *d)] = Some(*v),
                PriceKey::Measure(name) => out.measures.push((name.clone(), *v)),
                // Refused by `PriceRule::check`.
                PriceKey::Request => {}
            }
        }
        out
    }

    fn get(&self, k: Key<'_>) -> Option<Decimal> {
        match k {
            Key::Slot(i) => self.tokens[i],
            Key::Measure(name) => self
                .measures
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v),
        }
    }
}

#[derive(Debug)]
struct CompiledTiers {
    kind: TierKind,
    period: TierPeriod,
    key: TierKey,
    /// (up_to, prices); the last has no bound.
    bands: Vec<(Option<Decimal>, Prices)>,
}

#[derive(Debug)]
struct CompiledWindow {
    zone: TimeZone,
    window: TimeWindow,
    prices: Prices,
}

#[derive(Debug)]
struct Compiled {
    model: Option<String>,
    service: Option<String>,
    tier: ServiceTier,
    base: Prices,
    per_request: Option<Decimal>,
    thresholds: Vec<(u64, Prices)>,
    tiers: Option<CompiledTiers>,
    windows: Vec<CompiledWindow>,
    /// Whether the rule prices a key anywhere (base, threshold, band, window).
    named: Prices,
    /// The name of its tier counter ([`PriceRule::counter_name`]).
    counter: String,
}

impl Compiled {
    fn new(r: &PriceRule, field: &str) -> Result<Compiled, PriceError> {
        let mut all = r.unit_prices.clone();
        for t in &r.above_input_tokens {
            all.extend(t.unit_prices.iter().map(|(k, v)| (k.clone(), *v)));
        }
        for w in &r.windows {
            all.extend(w.unit_prices.iter().map(|(k, v)| (k.clone(), *v)));
        }
        let tiers = match &r.tiers {
            Some(t) => {
                for b in &t.bands {
                    all.extend(
                        b.unit_prices
                            .iter()
                            .filter(|(k, _)| t.key.covers(k))
                            .map(|(k, v)| (k.clone(), *v)),
                    );
                }
                Some(CompiledTiers {
                    kind: t.kind,
                    period: t.period,
                    key: t.key.clone(),
                    bands: t
                        .bands
                        .iter()
                        .map(|b| (b.up_to.map(Decimal::from), Prices::new(&b.unit_prices)))
                        .collect(),
                })
            }
            None => None,
        };
        let mut windows = Vec::with_capacity(r.windows.len());
        for (i, w) in r.windows.iter().enumerate() {
            let zone = TimeZone::get(&w.time_zone).map_err(|_| {
                PriceError::new(
                    format!("{field}.windows[{i}].time_zone"),
                    format!("{:?} is not a known IANA time zone", w.time_zone),
                )
            })?;
            windows.push(CompiledWindow {
                zone,
                window: w.clone(),
                prices: Prices::new(&w.unit_prices),
            });
        }
        Ok(Compiled {
            counter: r.counter_name(),
            model: r.model.clone(),
            service: r.service.clone(),
            tier: r.tier,
            base: Prices::new(&r.unit_prices),
            per_request: r.per_request,
            thresholds: r
                .above_input_tokens
                .iter()
                .map(|t| (t.input_tokens, Prices::new(&t.unit_prices)))
                .collect(),
            tiers,
            windows,
            named: Prices::new(&all),
        })
    }

    fn matches(&self, model: Option<&str>, service: &str, tier: ServiceTier) -> bool {
        self.tier == tier
            && match (&self.model, model) {
                (Some(p), Some(m)) => ciyuan_core::wildcard_match(p, m),
                (Some(_), None) => false,
                (None, _) => true,
            }
            && self
                .service
                .as_deref()
                .is_none_or(|p| ciyuan_core::wildcard_match(p, service))
    }
}

/// Which rules price a (model, service, tier): the first of the entry's tier, and
/// for a non-standard tier the first standard one, by index into `Rater::rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    tiered: Option<u32>,
    standard: Option<u32>,
}

type ByService = Vec<(Box<str>, ServiceTier, Resolved)>;

/// A price book (and the contract of the entry's node, if any) compiled for rating.
///
/// Built once per book version and contract; [`Rater::rate`] is then safe to call
/// from many threads.
#[derive(Debug)]
pub struct Rater {
    book: String,
    version: u32,
    currency: Currency,
    rounding: Rounding,
    contract: Option<AccountPath>,
    discount_percent: Option<Decimal>,
    markup_percent: Option<Decimal>,
    /// The contract's overrides, then the book's rules.
    rules: Vec<Compiled>,
    /// Rules whose model pattern has no `*`, by lower-cased pattern.
    exact: FxHashMap<String, Vec<u32>>,
    /// Rules with a `*` in their model pattern or none.
    general: Vec<u32>,
    cache: RwLock<FxHashMap<Box<str>, ByService>>,
    cache_no_model: RwLock<ByService>,
}

impl Rater {
    /// Compiles `book`, with the contract of the node `contract.0` when the entry's
    /// node or an ancestor has one (the nearest; the lead finds it). Checks both and
    /// that the contract names this book.
    pub fn new(
        book: &PriceBook,
        contract: Option<(&AccountPath, &PriceContract)>,
    ) -> Result<Rater, PriceError> {
        book.check()?;
        let mut rules = Vec::new();
        let (mut path, mut discount, mut markup) = (None, None, None);
        if let Some((node, c)) = contract {
            c.check()?;
            if c.book != book.name {
                return Err(PriceError::new(
                    "book",
                    format!(
                        "the contract of {node} prices with book {:?}, not {:?}",
                        c.book, book.name
                    ),
                ));
            }
            for (i, r) in c.overrides.iter().enumerate() {
                rules.push(Compiled::new(r, &format!("overrides[{i}]"))?);
            }
            path = Some(node.clone());
            discount = c.discount_percent;
            markup = c.markup_percent;
        }
        for (i, r) in book.rules.iter().enumerate() {
            rules.push(Compiled::new(r, &format!("rules[{i}]"))?);
        }
        let mut exact: FxHashMap<String, Vec<u32>> = FxHashMap::default();
        let mut general = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            // Bounded by MAX_RULES_PER_BOOK twice over, far below u32::MAX.
            let i = u32::try_from(i)
                .map_err(|_| PriceError::new("rules", "too many rules to index"))?;
            match &r.model {
                Some(p) if !p.contains('*') => {
                    exact.entry(p.to_ascii_lowercase()).or_default().push(i)
                }
                _ => general.push(i),
            }
        }
        Ok(Rater {
            book: book.name.clone(),
            version: book.version,
            currency: book.currency,
            rounding: book.rounding,
            contract: path,
            discount_percent: discount,
            markup_percent: markup,
            rules,
            exact,
            general,
            cache: RwLock::new(FxHashMap::default()),
            cache_no_model: RwLock::new(Vec::new()),
        })
    }

    #[cfg(test)]
    fn cached_models(&self) -> usize {
        self.cache.read().map_or(0, |c| c.len())
    }

    /// The node whose contract it applies, if any.
    pub fn contract(&self) -> Option<&AccountPath> {
        self.contract.as_ref()
    }

    /// The book's name and version.
    pub fn book(&self) -> (&str, u32) {
        (&self.book, self.version)
    }

    fn first_match(&self, model: Option<&str>, service: &str, tier: ServiceTier) -> Option<u32> {
        let exact: &[u32] = match model {
            Some(m) => self
                .exact
                .get(&m.to_ascii_lowercase())
                .map_or(&[], Vec::as_slice),
            None => &[],
        };
        // Both lists ascend: the first match in rule order is the smaller of each
        // list's first match.
        let test = |i: &&u32| self.rules[**i as usize].matches(model, service, tier);
        let a = exact.iter().find(test).copied();
        let b = self.general.iter().find(test).copied();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn resolve_slow(&self, model: Option<&str>, service: &str, tier: ServiceTier) -> Resolved {
        let standard = self.first_match(model, service, ServiceTier::Standard);
        let tiered = match tier {
            ServiceTier::Standard => None,
            t => self.first_match(model, service, t),
        };
        Resolved { tiered, standard }
    }

    fn resolve(&self, model: Option<&str>, service: &str, tier: ServiceTier) -> Resolved {
        let find = |list: &ByService| {
            list.iter()
                .find(|(s, t, _)| **s == *service && *t == tier)
                .map(|(_, _, r)| *r)
        };
        // A poisoned lock only means a panic elsewhere while it was held; the map is
        // a memo of pure results and stays valid.
        let hit = match model {
            Some(m) => self
                .cache
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(m)
                .and_then(find),
            None => find(
                &self
                    .cache_no_model
                    .read()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
        };
        if let Some(r) = hit {
            return r;
        }
        let r = self.resolve_slow(model, service, tier);
        let entry = (Box::from(service), tier, r);
        match model {
            Some(m) => {
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                if cache.len() < MAX_CACHED_MODELS || cache.contains_key(m) {
                    let list = cache.entry(Box::from(m)).or_default();
                    if list.len() < MAX_CACHED_PER_MODEL && find(list).is_none() {
                        list.push(entry);
                    }
                }
            }
            None => {
                let mut list = self
                    .cache_no_model
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                if list.len() < MAX_CACHED_PER_MODEL && find(&list).is_none() {
                    list.push(entry);
                }
            }
        }
        r
    }

    /// The counter the entry advances when the rule that prices it has graduated or
    /// volume tiers: their period, the rule's counter name, and the entry's units
    /// (its quantities of the keys the tiers count). The lead places the entry on
    /// the counter and passes [`RateInput::period_to_date`]; `input.period_to_date`
    /// is not read here.
    pub fn tier_counter(&self, input: &RateInput<'_>) -> Result<Option<TierCounter>, RateError> {
        let r = self.resolve(input.model, input.service, input.tier);
        let Some(i) = r.tiered.or(r.standard) else {
            return Ok(None);
        };
        let rule = &self.rules[i as usize];
        let Some(t) = &rule.tiers else {
            return Ok(None);
        };
        let units = match &t.key {
            TierKey::All => {
                let mut sum: i128 = 0;
                for c in input.tokens.iter() {
                    sum += i128::from(c.count);
                }
                Decimal::try_from_i128_with_scale(sum, 0)
                    .map_err(|_| RateError::Overflow("tier units".into()))?
            }
            TierKey::Key(PriceKey::Tokens(m, d)) => Decimal::from(
                input
                    .tokens
                    .iter()
                    .filter(|c| c.modality == *m && c.direction == *d)
                    .map(|c| c.count)
                    .sum::<i64>(),
            ),
            TierKey::Key(PriceKey::Measure(name)) => match input.measures.get(name) {
                Some(v) => measure_quantity(name, v)?,
                None => Decimal::ZERO,
            },
            TierKey::Key(PriceKey::Request) => Decimal::ONE,
        };
        Ok(Some(TierCounter {
            period: t.period,
            rule: rule.counter.clone(),
            units,
        }))
    }

    /// The most a request can cost before it runs, for reserving money at admission:
    /// `input` holds the prompt's counts; `max_output` output tokens are added, all as
    /// `text.output` and all as `text.reasoning` in turn, and the dearer rating is
    /// returned (cost is linear in each key, so one of the two extremes is the
    /// maximum of any split; with tiers whose prices fall with volume it remains an
    /// upper bound). `None` when the request would be unpriced; the rating's
    /// `missing` keys cost nothing in it, as they will in the entry.
    pub fn max_cost(
        &self,
        input: &RateInput<'_>,
        max_output: i64,
    ) -> Result<Option<Rating>, RateError> {
        let mut best: Option<Rating> = None;
        for direction in [Direction::Output, Direction::Reasoning] {
            let mut tokens = input.tokens.clone();
            tokens
                .add(Modality::Text, direction, max_output)
                .ok_or_else(|| RateError::Overflow("max_output".into()))?;
            let r = self.rate(&RateInput {
                tokens: &tokens,
                ..*input
            })?;
            if r.unpriced {
                return Ok(None);
            }
            if best.as_ref().is_none_or(|b| r.amount > b.amount) {
                best = Some(r);
            }
        }
        Ok(best)
    }

    /// Prices one entry. See [`PriceRule`] for which rule and which of its prices
    /// apply; the total is rounded once, by the book's rule ([`Rating::settle`]).
    pub fn rate(&self, input: &RateInput<'_>) -> Result<Rating, RateError> {
        let mut rating = self.blank();
        self.rate_into(input, &mut rating)?;
        Ok(rating)
    }

    /// [`Rater::rate`], built in the box a usage entry holds it in: a rating is 200
    /// bytes, and one built on the stack is copied whole into its box.
    pub fn rate_boxed(&self, input: &RateInput<'_>) -> Result<Box<Rating>, RateError> {
        let mut rating = Box::new(self.blank());
        self.rate_into(input, &mut rating)?;
        Ok(rating)
    }

    /// A rating by this rater with nothing priced yet.
    #[inline]
    fn blank(&self) -> Rating {
        Rating {
            amount: Decimal::ZERO,
            currency: self.currency,
            book: self.book.clone(),
            version: self.version,
            lines: Vec::new(),
            contract: self.contract.clone(),
            discount_percent: self.discount_percent,
            markup_percent: self.markup_percent,
            unpriced: false,
            missing: Vec::new(),
            basis: None,
            place: None,
        }
    }

    /// Prices `input` into `rating`, fresh from [`Rater::blank`].
    fn rate_into(&self, input: &RateInput<'_>, rating: &mut Rating) -> Result<(), RateError> {
        let mut input_tokens: i128 = 0;
        // Sums of at most 25 i64 counts: below 2^69, inside a decimal's 96 bits, so
        // their conversion to `Decimal` in the tiers is exact.
        let mut all_tokens: i128 = 0;
        // Keys with a count: each is a line (or more, with tiers).
        let mut counted = 0;
        for t in input.tokens.iter() {
            counted += usize::from(t.count != 0);
            if t.count < 0 {
                return Err(RateError::Negative {
                    key: format!("{}.{}", t.modality, t.direction),
                    count: t.count,
                });
            }
            if PriceKey::Tokens(t.modality, t.direction).is_input() {
                input_tokens += i128::from(t.count);
            }
            all_tokens += i128::from(t.count);
        }
        let resolved = self.resolve(input.model, input.service, input.tier);
        let Some(primary) = resolved.tiered.or(resolved.standard) else {
            rating.unpriced = true;
            return Ok(());
        };
        let primary = &self.rules[primary as usize];
        let fallback = match resolved.tiered {
            Some(_) => resolved.standard.map(|i| &self.rules[i as usize]),
            None => None,
        };
        let pick = |k: Key<'_>| {
            if primary.named.get(k).is_some() {
                Some(primary)
            } else {
                fallback.filter(|f| f.named.get(k).is_some())
            }
        };
        let ctx = Context {
            input,
            input_tokens,
            all_tokens,
        };
        // One allocation, no larger than the lines need (a key with a count, a priced
        // measure, the request; tiers may split a key): rated entries are held in
        // memory until projected, and the memory they hold is what they cost there.
        rating.lines.reserve(counted + input.measures.len() + 1);
        let mut before: i128 = 0;
        for t in input.tokens.iter() {
            let key = PriceKey::Tokens(t.modality, t.direction);
            let quantity = Decimal::from(t.count);
            let k = Key::Slot(slot(t.modality, t.direction));
            if t.count != 0 {
                let priced = match pick(k) {
                    Some(rule) => ctx.price(rule, k, &key, quantity, before, &mut rating.lines)?,
                    None => false,
                };
                if !priced {
                    rating.missing.push(key);
                }
            }
            before += i128::from(t.count);
        }
        for (name, value) in input.measures {
            let k = Key::Measure(name);
            // Measures are the raw inputs of token definitions (widths, pages): only
            // those a rule prices are read.
            let Some(rule) = pick(k) else { continue };
            let quantity = measure_quantity(name, value)?;
            if quantity.is_zero() {
                continue;
            }
            let key = PriceKey::Measure(name.clone());
            if !ctx.price(rule, k, &key, quantity, 0, &mut rating.lines)? {
                rating.missing.push(key);
            }
        }
        if let Some(p) = primary
            .per_request
            .or_else(|| fallback.and_then(|f| f.per_request))
        {
            rating.lines.push(RatedLine {
                key: PriceKey::Request,
                quantity: Decimal::ONE,
                unit_price: p,
                amount: p,
            });
        }
        rating
            .settle(&self.rounding)
            .ok_or_else(|| RateError::Overflow("the entry's total".into()))?;
        Ok(())
    }
}

/// A priced measure's value as an exact decimal: the JSON number's text, never its
/// float.
pub fn measure_quantity(name: &str, value: &serde_json::Value) -> Result<Decimal, RateError> {
    let bad = |why: String| RateError::Measure {
        name: name.to_string(),
        why,
    };
    let serde_json::Value::Number(n) = value else {
        return Err(bad(format!("{value} is not a number")));
    };
    let q = decimal_from_text(&n.to_string()).map_err(|e| bad(e.why))?;
    if q.is_sign_negative() && !q.is_zero() {
        return Err(bad(format!("{q} is negative")));
    }
    Ok(q)
}

/// Appends `quantity × unit_price` as a line, built in place.
fn push_line(
    lines: &mut Vec<RatedLine>,
    key: &PriceKey,
    quantity: Decimal,
    unit_price: Decimal,
) -> Result<(), RateError> {
    // The product a line written without its amount is read back with.
    match RatedLine::product(quantity, unit_price) {
        Some(amount) => {
            lines.push(RatedLine {
                key: key.clone(),
                quantity,
                unit_price,
                amount,
            });
            Ok(())
        }
        None => Err(overflow(key)),
    }
}

#[cold]
fn overflow(key: &PriceKey) -> RateError {
    RateError::Overflow(key.to_string())
}

struct Context<'a, 'b> {
    input: &'a RateInput<'b>,
    input_tokens: i128,
    all_tokens: i128,
}

impl Context<'_, '_> {
    /// Prices `quantity` of `key` by `rule` into `lines`: window, threshold, tiers,
    /// base, the first that has a price. False when none applies.
    fn price(
        &self,
        rule: &Compiled,
        k: Key<'_>,
        key: &PriceKey,
        quantity: Decimal,
        before: i128,
        lines: &mut Vec<RatedLine>,
    ) -> Result<bool, RateError> {
        let mut line =
            |unit_price: Decimal, quantity: Decimal| push_line(lines, key, quantity, unit_price);
        for w in &rule.windows {
            if let Some(p) = w.prices.get(k) {
                let local = w.zone.to_datetime(self.input.at);
                let weekday = local.weekday().to_monday_one_offset().unsigned_abs();
                let minute = u16::from(local.hour().unsigned_abs()) * 60
                    + u16::from(local.minute().unsigned_abs());
                if w.window.contains(weekday, minute) {
                    line(p, quantity)?;
                    return Ok(true);
                }
            }
        }
        for (n, prices) in rule.thresholds.iter().rev() {
            if self.input_tokens > i128::from(*n)
                && let Some(p) = prices.get(k)
            {
                line(p, quantity)?;
                return Ok(true);
            }
        }
        if let Some(t) = &rule.tiers
            && t.key.covers(key)
            && t.bands.first().is_some_and(|(_, b)| b.get(k).is_some())
        {
            let ptd = self.input.period_to_date;
            match t.kind {
                TierKind::Volume => {
                    let counted = match t.key {
                        TierKey::All => Decimal::from(self.all_tokens),
                        TierKey::Key(_) => quantity,
                    };
                    let reached = ptd
                        .checked_add(counted)
                        .ok_or_else(|| RateError::Overflow("period_to_date".into()))?;
                    let band = t
                        .bands
                        .iter()
                        .find(|(up, _)| up.is_none_or(|u| reached <= u));
                    if let Some(p) = band.and_then(|(_, b)| b.get(k)) {
                        line(p, quantity)?;
                        return Ok(true);
                    }
                    return Ok(false);
                }
                TierKind::Graduated => {
                    let offset = match t.key {
                        TierKey::All => ptd.checked_add(Decimal::from(before)),
                        TierKey::Key(_) => Some(ptd),
                    }
                    .ok_or_else(|| RateError::Overflow("period_to_date".into()))?;
                    let (lo, hi) = offset
                        .checked_add(quantity)
                        .map(|hi| (offset, hi))
                        .ok_or_else(|| RateError::Overflow("period_to_date".into()))?;
                    let mut floor = Decimal::ZERO;
                    let mut any = false;
                    for (up, b) in &t.bands {
                        let start = lo.max(floor);
                        let end = up.map_or(hi, |u| hi.min(u));
                        if end > start
                            && let Some(p) = b.get(k)
                        {
                            line(p, end - start)?;
                            any = true;
                        }
                        match up {
                            Some(u) => floor = *u,
                            None => break,
                        }
                    }
                    return Ok(any);
                }
            }
        }
        if let Some(p) = rule.base.get(k) {
            line(p, quantity)?;
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{PriceRule, Rounding};

    #[test]
    fn the_resolution_cache_is_bounded() {
        let book = PriceBook {
            tax: None,
            name: "b".into(),
            version: 1,
            currency: "USD".parse().unwrap(),
            effective_from: Timestamp::UNIX_EPOCH,
            rounding: Rounding::default(),
            source: None,
            set_by: None,
            rules: vec![PriceRule {
                model: Some("m-*".into()),
                unit_prices: [("text.input".parse().unwrap(), Decimal::ONE)].into(),
                ..PriceRule::default()
            }],
        };
        let rater = Rater::new(&book, None).unwrap();
        let mut tokens = TokenMap::new();
        tokens.add(Modality::Text, Direction::Input, 2).unwrap();
        let measures = BTreeMap::new();
        for i in 0..MAX_CACHED_MODELS + 100 {
            let model = format!("m-{i}");
            let r = rater
                .rate(&RateInput {
                    model: Some(&model),
                    service: "llm.chat",
                    tier: ServiceTier::Standard,
                    tokens: &tokens,
                    measures: &measures,
                    at: Timestamp::UNIX_EPOCH,
                    period_to_date: Decimal::ZERO,
                })
                .unwrap();
            assert_eq!(r.amount, Decimal::TWO);
        }
        assert_eq!(rater.cached_models(), MAX_CACHED_MODELS);
    }
}
