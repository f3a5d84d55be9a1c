//! The auditor's recomputation: a second, naive rating straight from the book.
//!
//! Written apart from [`crate::Rater`] on purpose: it walks the book's rules in order
//! with [`PriceRule::matches`], reads prices from the book's maps, converts time with
//! a fresh zone lookup, and rounds with its own integer arithmetic. Only
//! [`Rating::adjust`] (discount then markup, one definition in core) and the reading
//! of a measure's number are shared. Property tests hold the two to the same answers.

use crate::rate::{RateError, RateInput, TierCounter, measure_quantity};
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::{
    AccountPath, PriceBook, PriceContract, PriceKey, PriceRule, RatedLine, Rating, Rounding,
    RoundingMode, ServiceTier, TierKey, TierKind,
};
use rust_decimal::Decimal;

/// Where a stored rating departs from the book it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: the book gives {expected}, the entry has {found}")]
pub struct Mismatch {
    /// The rating's field, e.g. `lines[1].unit_price` or `amount`.
    pub field: String,
    /// What the book gives.
    pub expected: String,
    /// What the entry carries.
    pub found: String,
}

fn differs(field: impl Into<String>, expected: impl ToString, found: impl ToString) -> Mismatch {
    Mismatch {
        field: field.into(),
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// Rounds by `rounding` on the decimal's integer mantissa, independently of
/// [`Rounding::apply`].
pub fn round_naive(v: Decimal, rounding: &Rounding) -> Option<Decimal> {
    let (scale, to) = (v.scale(), rounding.to);
    if scale <= to {
        return Some(v);
    }
    let m = v.mantissa();
    let div = 10i128.checked_pow(scale - to)?;
    let (q, r) = (m / div, (m % div).abs());
    let half = div / 2;
    let away = match rounding.mode {
        RoundingMode::Down => false,
        RoundingMode::Up => r != 0,
        RoundingMode::HalfUp => r >= half,
        RoundingMode::HalfEven => r > half || (r == half && q % 2 != 0),
    };
    let q = match (away, m < 0) {
        (false, _) => q,
        (true, false) => q + 1,
        (true, true) => q - 1,
    };
    Decimal::try_from_i128_with_scale(q, to).ok()
}

fn price_of(
    rule: &PriceRule,
    key: &PriceKey,
    quantity: Decimal,
    before: Decimal,
    all_tokens: Decimal,
    input_tokens: i128,
    input: &RateInput<'_>,
) -> Vec<(Decimal, Decimal)> {
    for w in &rule.windows {
        let Some(p) = w.unit_prices.get(key) else {
            continue;
        };
        let Ok(zone) = TimeZone::get(&w.time_zone) else {
            continue;
        };
        let local = input.at.to_zoned(zone);
        let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
        let weekday = i32::from(local.weekday().to_monday_one_offset());
        let on_day = w.weekdays.is_empty() || w.weekdays.iter().any(|d| i32::from(*d) == weekday);
        let (from, to) = (i32::from(w.from.minutes()), i32::from(w.to.minutes()));
        let inside = if from < to {
            minute >= from && minute < to
        } else {
            minute >= from || minute < to
        };
        if on_day && inside {
            return vec![(quantity, *p)];
        }
    }
    let best = rule
        .above_input_tokens
        .iter()
        .filter(|t| input_tokens > i128::from(t.input_tokens) && t.unit_prices.contains_key(key))
        .max_by_key(|t| t.input_tokens);
    if let Some(t) = best {
        return vec![(quantity, t.unit_prices[key])];
    }
    if let Some(t) = &rule.tiers
        && t.key.covers(key)
        && t.bands
            .first()
            .is_some_and(|b| b.unit_prices.contains_key(key))
    {
        let ptd = input.period_to_date;
        match t.kind {
            TierKind::Volume => {
                let Some(reached) = ptd.checked_add(match t.key {
                    TierKey::All => all_tokens,
                    TierKey::Key(_) => quantity,
                }) else {
                    return Vec::new();
                };
                for b in &t.bands {
                    if b.up_to.is_none_or(|u| reached <= Decimal::from(u)) {
                        return b
                            .unit_prices
                            .get(key)
                            .map(|p| vec![(quantity, *p)])
                            .unwrap_or_default();
                    }
                }
                return Vec::new();
            }
            TierKind::Graduated => {
                let (Some(start), Some(end)) = (
                    ptd.checked_add(match t.key {
                        TierKey::All => before,
                        TierKey::Key(_) => Decimal::ZERO,
                    }),
                    ptd.checked_add(quantity).and_then(|e| {
                        e.checked_add(match t.key {
                            TierKey::All => before,
                            TierKey::Key(_) => Decimal::ZERO,
                        })
                    }),
                ) else {
                    return Vec::new();
                };
                let mut out = Vec::new();
                for (i, b) in t.bands.iter().enumerate() {
                    let lo = match i {
                        0 => Decimal::ZERO,
                        _ => t.bands[i - 1].up_to.map_or(Decimal::ZERO, Decimal::from),
                    };
                    let hi = b.up_to.map(Decimal::from);
                    let a = if start > lo { start } else { lo };
                    let z = match hi {
                        Some(h) if h < end => h,
                        _ => end,
                    };
                    if z > a
                        && let Some(p) = b.unit_prices.get(key)
                    {
                        out.push((z - a, *p));
                    }
                }
                return out;
            }
        }
    }
    rule.unit_prices
        .get(key)
        .map(|p| vec![(quantity, *p)])
        .unwrap_or_default()
}

/// The rule that prices `input` and the standard rule its unnamed keys fall back to
/// (see [`PriceRule`]), found by walking every rule.
fn rules_naive<'a>(
    book: &'a PriceBook,
    contract: Option<(&AccountPath, &'a PriceContract)>,
    input: &RateInput<'_>,
) -> (Option<&'a PriceRule>, Option<&'a PriceRule>) {
    let rules = contract
        .map(|(_, c)| c.overrides.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(book.rules.iter());
    let first = |tier| {
        rules
            .clone()
            .find(|r| r.matches(input.model, input.service, tier))
    };
    let standard = first(ServiceTier::Standard);
    match input.tier {
        ServiceTier::Standard => (standard, None),
        t => match first(t) {
            Some(r) => (Some(r), standard),
            None => (standard, None),
        },
    }
}

/// The tier counter `input` advances, found the naive way: the counter name of the
/// rule that prices it, when that rule has tiers, and the entry's quantities of the
/// keys they count.
pub fn tier_counter_naive(
    book: &PriceBook,
    contract: Option<(&AccountPath, &PriceContract)>,
    input: &RateInput<'_>,
) -> Result<Option<TierCounter>, RateError> {
    let Some(rule) = rules_naive(book, contract, input).0 else {
        return Ok(None);
    };
    let Some(t) = &rule.tiers else {
        return Ok(None);
    };
    let mut units = Decimal::ZERO;
    for c in input.tokens.iter() {
        if t.key.covers(&PriceKey::Tokens(c.modality, c.direction)) {
            units += Decimal::from(c.count);
        }
    }
    match &t.key {
        TierKey::Key(PriceKey::Measure(name)) => {
            if let Some(v) = input.measures.get(name) {
                units += measure_quantity(name, v)?;
            }
        }
        TierKey::Key(PriceKey::Request) => units = Decimal::ONE,
        _ => {}
    }
    Ok(Some(TierCounter {
        period: t.period,
        rule: rule.counter_name(),
        units,
    }))
}

/// Rates `input` by `book` (and the contract of node `contract.0`) the naive way.
pub fn rate_naive(
    book: &PriceBook,
    contract: Option<(&AccountPath, &PriceContract)>,
    input: &RateInput<'_>,
) -> Result<Rating, RateError> {
    let mut rating = Rating {
        amount: Decimal::ZERO,
        currency: book.currency,
        book: book.name.clone(),
        version: book.version,
        lines: Vec::new(),
        contract: contract.map(|(p, _)| p.clone()),
        discount_percent: contract.and_then(|(_, c)| c.discount_percent),
        markup_percent: contract.and_then(|(_, c)| c.markup_percent),
        unpriced: false,
        missing: Vec::new(),
        basis: None,
        place: None,
    };
    let (primary, fallback) = rules_naive(book, contract, input);
    let Some(primary) = primary else {
        for t in input.tokens.iter() {
            if t.count < 0 {
                return Err(RateError::Negative {
                    key: format!("{}.{}", t.modality, t.direction),
                    count: t.count,
                });
            }
        }
        rating.unpriced = true;
        return Ok(rating);
    };
    let mut all_tokens = Decimal::ZERO;
    let mut input_tokens = 0i128;
    for t in input.tokens.iter() {
        if t.count < 0 {
            return Err(RateError::Negative {
                key: format!("{}.{}", t.modality, t.direction),
                count: t.count,
            });
        }
        all_tokens += Decimal::from(t.count);
        if PriceKey::Tokens(t.modality, t.direction).is_input() {
            input_tokens += i128::from(t.count);
        }
    }
    let choose = |key: &PriceKey| {
        if primary.names(key) {
            Some(primary)
        } else {
            fallback.filter(|f| f.names(key))
        }
    };
    let push = |key: &PriceKey, parts: Vec<(Decimal, Decimal)>, rating: &mut Rating| {
        if parts.is_empty() {
            rating.missing.push(key.clone());
        }
        for (q, p) in parts {
            rating.lines.push(RatedLine {
                key: key.clone(),
                quantity: q,
                unit_price: p,
                amount: q
                    .checked_mul(p)
                    .ok_or_else(|| RateError::Overflow(key.to_string()))?,
            });
        }
        Ok::<(), RateError>(())
    };
    let mut before = Decimal::ZERO;
    for t in input.tokens.iter() {
        let key = PriceKey::Tokens(t.modality, t.direction);
        let q = Decimal::from(t.count);
        if t.count > 0 {
            let parts = match choose(&key) {
                Some(r) => price_of(r, &key, q, before, all_tokens, input_tokens, input),
                None => Vec::new(),
            };
            push(&key, parts, &mut rating)?;
        }
        before += q;
    }
    for (name, value) in input.measures {
        let key = PriceKey::Measure(name.clone());
        let Some(rule) = choose(&key) else { continue };
        let q = measure_quantity(name, value)?;
        if q > Decimal::ZERO {
            let parts = price_of(
                rule,
                &key,
                q,
                Decimal::ZERO,
                all_tokens,
                input_tokens,
                input,
            );
            push(&key, parts, &mut rating)?;
        }
    }
    if let Some(p) = primary.per_request.or(fallback.and_then(|f| f.per_request)) {
        push(&PriceKey::Request, vec![(Decimal::ONE, p)], &mut rating)?;
    }
    let sum = rating
        .lines
        .iter()
        .try_fold(Decimal::ZERO, |s, l| s.checked_add(l.amount))
        .ok_or_else(|| RateError::Overflow("the entry's lines".into()))?;
    let adjusted = Rating::adjust(sum, rating.discount_percent, rating.markup_percent)
        .ok_or_else(|| RateError::Overflow("the entry's total".into()))?;
    rating.amount = round_naive(adjusted, &book.rounding)
        .ok_or_else(|| RateError::Overflow("the rounded total".into()))?;
    Ok(rating)
}

/// Checks that `rating`, as a usage entry carries it, follows `book` (the version it
/// names) and the contract of node `contract.0`: the book, version and currency it
/// names, every line, the discount and markup, and the rounded amount. `basis` is the
/// lead's record of which count was priced and is not recomputed.
pub fn verify_rating(
    book: &PriceBook,
    contract: Option<(&AccountPath, &PriceContract)>,
    input: &RateInput<'_>,
    rating: &Rating,
) -> Result<(), Mismatch> {
    if rating.book != book.name {
        return Err(differs("book", &book.name, &rating.book));
    }
    if rating.version != book.version {
        return Err(differs("version", book.version, rating.version));
    }
    if rating.currency != book.currency {
        return Err(differs("currency", book.currency, rating.currency));
    }
    let want = rate_naive(book, contract, input)
        .map_err(|e| differs("rating", format!("no rating ({e})"), "a rating"))?;
    let path = |p: &Option<AccountPath>| p.as_ref().map_or("none".into(), |p| p.to_string());
    if want.contract != rating.contract {
        return Err(differs(
            "contract",
            path(&want.contract),
            path(&rating.contract),
        ));
    }
    let opt = |d: &Option<Decimal>| d.map_or("none".into(), |d| d.to_string());
    if want.discount_percent != rating.discount_percent {
        return Err(differs(
            "discount_percent",
            opt(&want.discount_percent),
            opt(&rating.discount_percent),
        ));
    }
    if want.markup_percent != rating.markup_percent {
        return Err(differs(
            "markup_percent",
            opt(&want.markup_percent),
            opt(&rating.markup_percent),
        ));
    }
    if want.unpriced != rating.unpriced {
        return Err(differs("unpriced", want.unpriced, rating.unpriced));
    }
    if want.lines.len() != rating.lines.len() {
        return Err(differs(
            "lines",
            format!("{} lines", want.lines.len()),
            format!("{} lines", rating.lines.len()),
        ));
    }
    for (i, (w, f)) in want.lines.iter().zip(&rating.lines).enumerate() {
        if w.key != f.key {
            return Err(differs(format!("lines[{i}].key"), &w.key, &f.key));
        }
        for (name, a, b) in [
            ("quantity", w.quantity, f.quantity),
            ("unit_price", w.unit_price, f.unit_price),
            ("amount", w.amount, f.amount),
        ] {
            if a != b {
                return Err(differs(format!("lines[{i}].{name}"), a, b));
            }
        }
    }
    if want.missing != rating.missing {
        let keys = |v: &[PriceKey]| {
            v.iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        return Err(differs(
            "missing",
            keys(&want.missing),
            keys(&rating.missing),
        ));
    }
    if want.amount != rating.amount {
        return Err(differs("amount", want.amount, rating.amount));
    }
    Ok(())
}
