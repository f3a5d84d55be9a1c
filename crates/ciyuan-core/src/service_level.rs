//! Service levels: what a contract promises about the gateway's requests to one
//! upstream (availability, time to first token, output speed, count accuracy), how a
//! month's attainment is computed from the requests' quality records, and the credit
//! its schedule owes when it is missed.
//!
//! Everything here is a pure function of the samples, so the server that evaluates a
//! month and `ciyuan audit verify`, which recomputes it from the log, cannot disagree.
//! Comparisons are exact (integers and decimals, never a float): a share is compared as
//! `good × 100 ≥ target × all`, a percentile is the nearest-rank value of the sorted
//! samples.

use crate::{Currency, Usage, exact};
use jiff::Timestamp;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most service levels in one contract.
pub const MAX_SERVICE_LEVELS: usize = 32;
/// Most credit steps of one objective.
pub const MAX_CREDIT_STEPS: usize = 16;

/// What an objective measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Percent of requests without an upstream failure (a timeout, a cut stream, or an
    /// error status of 429 or 5xx from the upstream). Higher is better.
    Availability,
    /// The 95th percentile (nearest rank) of the time to first token, in milliseconds,
    /// over the requests that had one. Lower is better.
    TtftP95Ms,
    /// The median (nearest rank) of the requests' output tokens per second, over the
    /// requests that measured one. Higher is better.
    OutputTokensPerSec,
    /// Percent of recounted requests whose recount agreed with the provider's count
    /// (not flagged). Higher is better.
    CountAccuracy,
}

impl Metric {
    /// Whether a lower figure is the better one.
    pub fn lower_is_better(self) -> bool {
        matches!(self, Metric::TtftP95Ms)
    }

    /// Whether `attained` is strictly worse than `bound`.
    pub fn worse(self, attained: Decimal, bound: Decimal) -> bool {
        if self.lower_is_better() {
            attained > bound
        } else {
            attained < bound
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Metric::Availability => "availability",
            Metric::TtftP95Ms => "ttft_p95_ms",
            Metric::OutputTokensPerSec => "output_tokens_per_sec",
            Metric::CountAccuracy => "count_accuracy",
        })
    }
}

/// One step of a credit schedule: when the figure is worse than `worse_than`, the
/// objective's credit is at least `percent` of what the covered requests billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditStep {
    /// The bound (in the metric's unit) past which the step applies.
    #[serde(with = "exact")]
    pub worse_than: Decimal,
    /// The credit, in percent of the billed amount (0 to 100).
    #[serde(with = "exact")]
    pub percent: Decimal,
}

/// One promise of a service level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// What is measured.
    pub metric: Metric,
    /// The level promised: the objective is missed when the figure is worse.
    #[serde(with = "exact")]
    pub target: Decimal,
    /// The credit schedule: the largest percent among the steps whose bound the
    /// figure is worse than. Every bound is at or past the target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credits: Vec<CreditStep>,
}

/// The period a service level is evaluated over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LevelPeriod {
    /// A calendar month in the contract node's time zone.
    #[default]
    Month,
}

/// What a contract promises about the gateway's requests to one upstream (and models
/// matching a pattern) made under it, per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceLevel {
    /// Unique in the contract; names the credit on statements.
    pub name: String,
    /// The gateway upstream (provider name in the configuration).
    pub upstream: String,
    /// The models covered, a pattern with `*` (all when absent), matched against the
    /// model the request named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The period evaluated.
    #[serde(default)]
    pub period: LevelPeriod,
    /// The promises.
    pub objectives: Vec<Objective>,
    /// The most one period's credit may be, in percent (100 when absent).
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_credit_percent: Option<Decimal>,
}

fn percent_ok(d: Decimal) -> bool {
    !d.is_sign_negative() && d <= Decimal::ONE_HUNDRED && d.scale() <= 6
}

impl ServiceLevel {
    /// Checks every field, naming the first that is wrong (`field` prefixes the names).
    pub fn check(&self, field: &str) -> Result<(), String> {
        crate::check_text(&format!("{field}.name"), &self.name, 64).map_err(|e| e.to_string())?;
        if self.name.is_empty() {
            return Err(format!("{field}.name: empty"));
        }
        if self.upstream.is_empty() || self.upstream.len() > 128 {
            return Err(format!("{field}.upstream: empty or longer than 128 bytes"));
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 256)
        {
            return Err(format!("{field}.model: empty or longer than 256 bytes"));
        }
        if self.objectives.is_empty() {
            return Err(format!(
                "{field}.objectives: none; a service level promises something"
            ));
        }
        if let Some(m) = self.max_credit_percent
            && !percent_ok(m)
        {
            return Err(format!(
                "{field}.max_credit_percent: {m} is not a percentage from 0 to 100"
            ));
        }
        let mut seen = Vec::new();
        for (i, o) in self.objectives.iter().enumerate() {
            let at = format!("{field}.objectives[{i}]");
            if seen.contains(&o.metric) {
                return Err(format!("{at}.metric: {} is promised twice", o.metric));
            }
            seen.push(o.metric);
            let bad_target = o.target.is_sign_negative()
                || o.target.scale() > 6
                || (matches!(o.metric, Metric::Availability | Metric::CountAccuracy)
                    && o.target > Decimal::ONE_HUNDRED);
            if bad_target {
                return Err(format!(
                    "{at}.target: {} is not a valid {} level",
                    o.target, o.metric
                ));
            }
            if o.credits.len() > MAX_CREDIT_STEPS {
                return Err(format!("{at}.credits: more than {MAX_CREDIT_STEPS} steps"));
            }
            for (j, s) in o.credits.iter().enumerate() {
                if !percent_ok(s.percent) {
                    return Err(format!(
                        "{at}.credits[{j}].percent: {} is not a percentage from 0 to 100",
                        s.percent
                    ));
                }
                if o.metric.worse(o.target, s.worse_than) || s.worse_than.scale() > 6 {
                    return Err(format!(
                        "{at}.credits[{j}].worse_than: {} is better than the target {}; a \
                         credit is owed only for a missed objective",
                        s.worse_than, o.target
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a request to `upstream` for `model` is covered.
    pub fn covers(&self, upstream: &str, model: Option<&str>) -> bool {
        upstream == self.upstream
            && self
                .model
                .as_deref()
                .is_none_or(|p| crate::wildcard_match(p, model.unwrap_or("")))
    }
}

/// Whether usage entry `u` is covered by `level` of the contract of `node`: a gateway
/// request priced under that contract, to the level's upstream and models.
pub fn covered(node: &crate::AccountPath, level: &ServiceLevel, u: &Usage) -> bool {
    u.rating
        .as_ref()
        .is_some_and(|r| r.contract.as_ref() == Some(node))
        && u.quality
            .as_ref()
            .is_some_and(|q| level.covers(&q.upstream, u.model.as_deref()))
}

/// The memo of a service credit's posting, `service_level:<name>:<period>`: with the
/// posting's node it names the evaluation it pays.
pub fn credit_memo(level: &str, period: &str) -> String {
    format!("service_level:{level}:{period}")
}

/// What one gateway request contributes to a service level's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The request failed on the upstream's side.
    pub failed: bool,
    /// Time to first token, µs.
    pub ttft_us: Option<u64>,
    /// Output tokens per second.
    pub tokens_per_sec: Option<u64>,
    /// Whether a recount agreed, when there was one.
    pub recount_agrees: Option<bool>,
    /// What it billed: currency, book, version, amount.
    pub billed: Option<(Currency, String, u32, Decimal)>,
}

impl Sample {
    /// The sample of a gateway usage entry (`None` for entries without a quality
    /// record: ingested events are not the gateway's requests).
    pub fn of(usage: &Usage) -> Option<Sample> {
        let q = usage.quality.as_deref()?;
        Some(Sample {
            failed: upstream_failed(q),
            ttft_us: q.ttft_us,
            tokens_per_sec: q.output_tokens_per_sec,
            recount_agrees: usage.recount.as_ref().map(|r| !r.flagged),
            billed: usage
                .rating
                .as_ref()
                .map(|r| (r.currency, r.book.clone(), r.version, r.amount)),
        })
    }
}

/// Whether a request failed on the upstream's side: it timed out, its stream was cut,
/// or the upstream answered 429 or 5xx. A client that hung up, or an upstream 4xx
/// other than 429 (the request's own fault), is not the upstream's failure.
pub fn upstream_failed(q: &crate::Quality) -> bool {
    match q.failure.as_deref() {
        Some("upstream_timeout" | "upstream_cut") => true,
        Some("upstream_error") => q.status == 429 || q.status >= 500,
        _ => false,
    }
}

/// The figures of a period, from which every objective's attainment follows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    /// Requests covered.
    pub requests: u64,
    /// Of which failed on the upstream's side.
    pub upstream_failures: u64,
    /// Requests with a time to first token.
    pub ttft_samples: u64,
    /// Their 95th percentile (nearest rank), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95_us: Option<u64>,
    /// Requests with an output speed.
    pub speed_samples: u64,
    /// Their median (nearest rank), tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_sec_p50: Option<u64>,
    /// Requests recounted.
    pub recounted: u64,
    /// Of which the recount agreed.
    pub recount_agreed: u64,
}

/// The nearest-rank `p`th percentile (`p` in 1..=100) of sorted `values`.
pub fn nearest_rank(sorted: &[u64], p: u64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    // rank = ceil(p × n / 100), at least 1.
    let rank = (p * n).div_ceil(100).max(1);
    sorted.get((rank - 1) as usize).copied()
}

impl Figures {
    /// The figures of `samples`.
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Figures {
        let mut f = Figures::default();
        let mut ttft = Vec::new();
        let mut speed = Vec::new();
        for s in samples {
            f.requests += 1;
            f.upstream_failures += u64::from(s.failed);
            if let Some(t) = s.ttft_us {
                ttft.push(t);
            }
            if let Some(t) = s.tokens_per_sec {
                speed.push(t);
            }
            if let Some(a) = s.recount_agrees {
                f.recounted += 1;
                f.recount_agreed += u64::from(a);
            }
        }
        ttft.sort_unstable();
        speed.sort_unstable();
        f.ttft_samples = ttft.len() as u64;
        f.ttft_p95_us = nearest_rank(&ttft, 95);
        f.speed_samples = speed.len() as u64;
        f.output_tokens_per_sec_p50 = nearest_rank(&speed, 50);
        f
    }

    /// What the figures say of `metric`, in its unit; `None` when nothing measured it.
    /// Shares are rounded half-even to six decimals for showing; [`Figures::worse`]
    /// compares them exactly.
    pub fn attained(&self, metric: Metric) -> Option<Decimal> {
        let share = |good: u64, all: u64| {
            (all > 0).then(|| {
                (Decimal::from(good) * Decimal::ONE_HUNDRED / Decimal::from(all))
                    .round_dp_with_strategy(6, RoundingStrategy::MidpointNearestEven)
                    .normalize()
            })
        };
        match metric {
            Metric::Availability => share(self.requests - self.upstream_failures, self.requests),
            Metric::TtftP95Ms => self
                .ttft_p95_us
                .map(|us| Decimal::new(us as i64, 3).normalize()),
            Metric::OutputTokensPerSec => self.output_tokens_per_sec_p50.map(Decimal::from),
            Metric::CountAccuracy => share(self.recount_agreed, self.recounted),
        }
    }

    /// Whether the figure of `metric` is strictly worse than `bound`, exactly (shares
    /// as `good × 100` against `bound × all`); `None` when nothing measured it.
    pub fn worse(&self, metric: Metric, bound: Decimal) -> Option<bool> {
        let share = |good: u64, all: u64| {
            (all > 0)
                .then(|| Decimal::from(good) * Decimal::ONE_HUNDRED < bound * Decimal::from(all))
        };
        match metric {
            Metric::Availability => share(self.requests - self.upstream_failures, self.requests),
            Metric::CountAccuracy => share(self.recount_agreed, self.recounted),
            Metric::TtftP95Ms | Metric::OutputTokensPerSec => {
                self.attained(metric).map(|a| metric.worse(a, bound))
            }
        }
    }
}

/// How one objective went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveResult {
    /// The metric.
    pub metric: Metric,
    /// The level promised.
    #[serde(with = "exact")]
    pub target: Decimal,
    /// The figure attained; absent when no request measured it (not missed).
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub attained: Option<Decimal>,
    /// Whether it was missed.
    pub missed: bool,
    /// The credit its schedule owes, in percent.
    #[serde(with = "exact")]
    pub credit_percent: Decimal,
}

/// A credit owed in one currency: a percent of what the covered requests billed there
/// under one book version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditLine {
    /// The currency.
    pub currency: Currency,
    /// The book.
    pub book: String,
    /// Its version.
    pub version: u32,
    /// What the covered requests billed.
    #[serde(with = "exact")]
    pub base: Decimal,
    /// The credit: `base × percent / 100`, rounded half-even to the currency's minor
    /// units (kept exact for a currency whose minor units are not known).
    #[serde(with = "exact")]
    pub amount: Decimal,
}

/// A service level evaluated for one period (entry kind `service_level.evaluated`, on
/// the contract's node): the figures, each objective's result and the credit owed.
/// A credit is billed as a statement line at the period's end and, where the node has
/// a wallet in the currency, paid into it by a `service_credit` posting that names
/// this entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceLevelEvaluated {
    /// The service level as it stood in the contract.
    pub level: ServiceLevel,
    /// The period's name (`2026-11`).
    pub period: String,
    /// Its first instant (UTC).
    pub from: Timestamp,
    /// Its end (UTC, exclusive).
    pub to: Timestamp,
    /// The time zone the period was computed in.
    pub time_zone: String,
    /// The log read: entries `scanned.0 .. scanned.1`.
    pub scanned: (u64, u64),
    /// The first and last entries covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<(u64, u64)>,
    /// The figures.
    pub figures: Figures,
    /// One result per objective, in the level's order.
    pub objectives: Vec<ObjectiveResult>,
    /// The credit owed, in percent: the objectives' credits summed, at most the
    /// level's maximum.
    #[serde(with = "exact")]
    pub credit_percent: Decimal,
    /// The credits, by currency, book and version; none when nothing is owed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credits: Vec<CreditLine>,
}

/// The result of evaluating a level over its samples (see [`evaluate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The figures.
    pub figures: Figures,
    /// One per objective.
    pub objectives: Vec<ObjectiveResult>,
    /// Percent owed.
    pub credit_percent: Decimal,
    /// Credits owed.
    pub credits: Vec<CreditLine>,
}

/// Evaluates `level` over `samples`: figures, results, the credit percent (the
/// objectives' credits summed, capped by the level's maximum) and the credit per
/// currency, book and version.
pub fn evaluate<'a>(
    level: &ServiceLevel,
    samples: impl IntoIterator<Item = &'a Sample> + Clone,
) -> Evaluation {
    let figures = Figures::of(samples.clone());
    let mut objectives = Vec::with_capacity(level.objectives.len());
    let mut total = Decimal::ZERO;
    for o in &level.objectives {
        let missed = figures.worse(o.metric, o.target).unwrap_or(false);
        let credit_percent = if missed {
            o.credits
                .iter()
                .filter(|s| figures.worse(o.metric, s.worse_than) == Some(true))
                .map(|s| s.percent)
                .max()
                .unwrap_or(Decimal::ZERO)
        } else {
            Decimal::ZERO
        };
        total += credit_percent;
        objectives.push(ObjectiveResult {
            metric: o.metric,
            target: o.target,
            attained: figures.attained(o.metric),
            missed,
            credit_percent: credit_percent.normalize(),
        });
    }
    let cap = level.max_credit_percent.unwrap_or(Decimal::ONE_HUNDRED);
    let credit_percent = total.min(cap).normalize();
    let mut credits = Vec::new();
    if !credit_percent.is_zero() {
        let mut base: BTreeMap<(Currency, String, u32), Decimal> = BTreeMap::new();
        for s in samples {
            if let Some((c, book, version, amount)) = &s.billed {
                *base.entry((*c, book.clone(), *version)).or_default() += *amount;
            }
        }
        for ((currency, book, version), base) in base {
            let raw = base * credit_percent / Decimal::ONE_HUNDRED;
            let amount = match currency.minor_units() {
                Some(dp) => raw.round_dp_with_strategy(dp, RoundingStrategy::MidpointNearestEven),
                None => raw,
            }
            .normalize();
            assert!(
                !amount.is_sign_negative() || amount.is_zero(),
                "a service credit is never negative ({amount} of {base})"
            );
            credits.push(CreditLine {
                currency,
                book,
                version,
                base: base.normalize(),
                amount,
            });
        }
    }
    Evaluation {
        figures,
        objectives,
        credit_percent,
        credits,
    }
}

impl ServiceLevelEvaluated {
    /// The node-independent key of an evaluation: level name and period.
    pub fn key(&self) -> (&str, &str) {
        (&self.level.name, &self.period)
    }

    /// Checks the entry's own arithmetic against a recomputation from `samples` (the
    /// covered requests as the log holds them), naming the first figure that differs.
    pub fn check_against(&self, samples: &[Sample]) -> Result<(), String> {
        let e = evaluate(&self.level, samples.iter());
        if e.figures != self.figures {
            return Err(format!(
                "figures: the log gives {:?}, the entry says {:?}",
                e.figures, self.figures
            ));
        }
        if e.objectives != self.objectives {
            return Err(format!(
                "objectives: the log gives {:?}, the entry says {:?}",
                e.objectives, self.objectives
            ));
        }
        if e.credit_percent != self.credit_percent {
            return Err(format!(
                "credit_percent: the log gives {}, the entry says {}",
                e.credit_percent, self.credit_percent
            ));
        }
        if e.credits != self.credits {
            return Err(format!(
                "credits: the log gives {:?}, the entry says {:?}",
                e.credits, self.credits
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn level() -> ServiceLevel {
        ServiceLevel {
            name: "gpt".into(),
            upstream: "openai".into(),
            model: Some("gpt-4o*".into()),
            period: LevelPeriod::Month,
            objectives: vec![
                Objective {
                    metric: Metric::Availability,
                    target: "99.9".parse().unwrap(),
                    credits: vec![
                        CreditStep {
                            worse_than: "99.9".parse().unwrap(),
                            percent: "10".parse().unwrap(),
                        },
                        CreditStep {
                            worse_than: "99".parse().unwrap(),
                            percent: "25".parse().unwrap(),
                        },
                    ],
                },
                Objective {
                    metric: Metric::TtftP95Ms,
                    target: "800".parse().unwrap(),
                    credits: vec![CreditStep {
                        worse_than: "800".parse().unwrap(),
                        percent: "5".parse().unwrap(),
                    }],
                },
            ],
            max_credit_percent: Some("30".parse().unwrap()),
        }
    }

    fn sample(failed: bool, ttft_ms: u64, amount: &str) -> Sample {
        Sample {
            failed,
            ttft_us: (!failed).then_some(ttft_ms * 1000),
            tokens_per_sec: None,
            recount_agrees: None,
            billed: Some((
                "USD".parse().unwrap(),
                "list".into(),
                1,
                amount.parse().unwrap(),
            )),
        }
    }

    #[test]
    fn nearest_rank_follows_its_definition() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 95), Some(19));
        assert_eq!(nearest_rank(&v, 50), Some(10));
        assert_eq!(nearest_rank(&v, 100), Some(20));
        assert_eq!(nearest_rank(&[7], 95), Some(7));
        assert_eq!(nearest_rank(&[], 95), None);
    }

    #[test]
    fn a_missed_level_owes_its_schedules_credit_capped_and_rounded() {
        // 1000 requests, 2 failed: 99.8% < 99.9 → 10%; p95 TTFT 900 ms > 800 → 5%.
        let mut s: Vec<Sample> = (0..998)
            .map(|i| sample(false, if i < 900 { 100 } else { 900 }, "0.013"))
            .collect();
        s.push(sample(true, 0, "0"));
        s.push(sample(true, 0, "0"));
        let e = evaluate(&level(), s.iter());
        assert_eq!(e.figures.requests, 1000);
        assert_eq!(e.figures.upstream_failures, 2);
        assert_eq!(e.objectives[0].attained, Some("99.8".parse().unwrap()));
        assert!(e.objectives[0].missed);
        assert_eq!(e.objectives[0].credit_percent, Decimal::from(10));
        assert_eq!(e.objectives[1].attained, Some(Decimal::from(900)));
        assert_eq!(e.objectives[1].credit_percent, Decimal::from(5));
        assert_eq!(e.credit_percent, Decimal::from(15));
        // base 998 × 0.013 = 12.974; 15% = 1.9461 → 1.95 USD.
        assert_eq!(e.credits.len(), 1);
        assert_eq!(e.credits[0].base, "12.974".parse().unwrap());
        assert_eq!(e.credits[0].amount, "1.95".parse().unwrap());
        // 30 failures of 1000: 97% → the 25% step; with TTFT's 5% capped at 30.
        let mut worse = s.clone();
        for x in worse.iter_mut().take(30) {
            x.failed = true;
        }
        let e = evaluate(&level(), worse.iter());
        assert_eq!(e.objectives[0].credit_percent, Decimal::from(25));
        assert_eq!(e.credit_percent, Decimal::from(30));
    }

    #[test]
    fn a_met_level_and_an_unmeasured_one_owe_nothing() {
        let s: Vec<Sample> = (0..1000).map(|_| sample(false, 100, "1")).collect();
        let e = evaluate(&level(), s.iter());
        assert!(e.objectives.iter().all(|o| !o.missed));
        assert!(e.credits.is_empty());
        let e = evaluate(&level(), [].iter());
        assert_eq!(e.objectives[0].attained, None);
        assert!(e.credits.is_empty());
    }

    #[test]
    fn the_boundary_is_exact() {
        // Exactly 99.9%: met (not worse than the target).
        let mut s: Vec<Sample> = (0..999).map(|_| sample(false, 1, "1")).collect();
        s.push(sample(true, 0, "0"));
        let e = evaluate(&level(), s.iter());
        assert!(!e.objectives[0].missed);
    }

    #[test]
    fn check_names_the_wrong_field() {
        let mut l = level();
        l.objectives[0].credits[0].worse_than = "99.95".parse().unwrap();
        assert!(
            l.check("service_levels[0]")
                .unwrap_err()
                .contains("objectives[0].credits[0].worse_than")
        );
        let mut l = level();
        l.objectives[1].metric = Metric::Availability;
        assert!(l.check("x").unwrap_err().contains("promised twice"));
        let mut l = level();
        l.objectives[0].target = "101".parse().unwrap();
        assert!(l.check("x").unwrap_err().contains("target"));
        let mut l = level();
        l.objectives.clear();
        assert!(l.check("x").unwrap_err().contains("objectives"));
        assert!(level().check("x").is_ok());
    }

    #[test]
    fn upstream_failures_are_the_upstreams_fault_only() {
        let q = |failure: Option<&str>, status| crate::Quality {
            failure: failure.map(str::to_string),
            status,
            ..Default::default()
        };
        assert!(upstream_failed(&q(Some("upstream_timeout"), 504)));
        assert!(upstream_failed(&q(Some("upstream_cut"), 200)));
        assert!(upstream_failed(&q(Some("upstream_error"), 502)));
        assert!(upstream_failed(&q(Some("upstream_error"), 429)));
        assert!(!upstream_failed(&q(Some("upstream_error"), 400)));
        assert!(!upstream_failed(&q(Some("client_disconnected"), 200)));
        assert!(!upstream_failed(&q(None, 200)));
    }

    proptest! {
        /// The credit never exceeds the cap's share of the base, and the entry's own
        /// figures check against the samples they came from.
        #[test]
        fn credits_stay_within_the_cap_and_check(
            fails in proptest::collection::vec(any::<bool>(), 0..300),
            ttfts in proptest::collection::vec(0u64..2_000, 0..300),
        ) {
            let s: Vec<Sample> = fails.iter().zip(ttfts.iter().chain(std::iter::repeat(&5))).map(|(f, t)| sample(*f, *t, "0.37")).collect();
            let e = evaluate(&level(), s.iter());
            prop_assert!(e.credit_percent <= Decimal::from(30));
            for c in &e.credits {
                prop_assert!(c.amount <= c.base * Decimal::from(30) / Decimal::ONE_HUNDRED + Decimal::new(5, 3));
            }
            let entry = ServiceLevelEvaluated {
                level: level(),
                period: "2026-11".into(),
                from: Timestamp::UNIX_EPOCH,
                to: Timestamp::UNIX_EPOCH,
                time_zone: "UTC".into(),
                scanned: (0, 0),
                entries: None,
                figures: e.figures.clone(),
                objectives: e.objectives.clone(),
                credit_percent: e.credit_percent,
                credits: e.credits.clone(),
            };
            prop_assert!(entry.check_against(&s).is_ok());
            if let Some(first) = s.first() {
                let mut flipped = s.clone();
                flipped[0].failed = !first.failed;
                prop_assert!(entry.check_against(&flipped).is_err());
            }
        }
    }
}
