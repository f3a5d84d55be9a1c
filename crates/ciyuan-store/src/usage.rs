//! Usage queries: hourly rollups turned into the rows a person or an ERP asks for.

use crate::HourRow;
use ciyuan_core::jiff::{Timestamp, tz::TimeZone};
use ciyuan_core::{AccountPath, Direction, Modality};
use std::collections::BTreeMap;

/// Token sums by modality and direction, exact: each key is an `i128`, so no sum of
/// the ledger's `i64` counts can overflow (the ledger would need more than 2^64
/// entries), and a sum is never saturated or skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSums(BTreeMap<(Modality, Direction), i128>);

impl TokenSums {
    /// Adds `n` to a key; `None` on overflow (unreachable from a real ledger, and
    /// then an error, never a wrong number).
    pub fn add(&mut self, modality: Modality, direction: Direction, n: i128) -> Option<()> {
        let slot = self.0.entry((modality, direction)).or_insert(0);
        *slot = slot.checked_add(n)?;
        Some(())
    }

    /// The sums, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (Modality, Direction, i128)> + '_ {
        self.0.iter().map(|(&(m, d), &n)| (m, d, n))
    }

    /// One key's sum (0 when absent).
    pub fn get(&self, modality: Modality, direction: Direction) -> i128 {
        self.0.get(&(modality, direction)).copied().unwrap_or(0)
    }

    /// The sum over all keys, or `None` on overflow.
    pub fn total(&self) -> Option<i128> {
        self.0
            .values()
            .try_fold(0i128, |acc, v| acc.checked_add(*v))
    }

    /// Whether no key is present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A usage sum left the range of exact arithmetic (`i128`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a usage sum overflows 128 bits")]
pub struct SumOverflow;

/// Time bucket of a usage query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// One row per hour.
    Hour,
    /// One row per calendar day in the query's time zone.
    Day,
    /// One row per calendar month in the query's time zone.
    Month,
}

/// A dimension to group usage by (tokens are always split by modality and direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupBy {
    /// The exact account node.
    Account,
    /// Each direct child of the node asked about, its whole subtree summed (rows name
    /// the child), and the node's own usage under its own name.
    Child,
    /// The service.
    Service,
    /// The model.
    Model,
}

/// A usage question.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// The subtree asked about.
    pub account: AccountPath,
    /// Dimensions to split rows by.
    pub group_by: Vec<GroupBy>,
    /// Time bucket, or one total over the range.
    pub bucket: Option<Bucket>,
    /// Zone in which days and months are computed.
    pub tz: TimeZone,
}

/// One answer row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the bucket, if bucketed.
    pub bucket_start: Option<Timestamp>,
    /// The account node, if grouped by account.
    pub account: Option<AccountPath>,
    /// The service, if grouped by service.
    pub service: Option<String>,
    /// The model, if grouped by model (empty for services without one).
    pub model: Option<String>,
    /// Tokens by modality and direction.
    pub tokens: TokenSums,
}

type Key = (
    Option<i64>,
    Option<AccountPath>,
    Option<String>,
    Option<String>,
);

/// The answer row an hourly row of this node, service and model falls in.
fn group_key(
    query: &UsageQuery,
    hour: i64,
    account: &AccountPath,
    service: &str,
    model: &str,
) -> Key {
    let by = |g| query.group_by.contains(&g);
    (
        query.bucket.map(|b| bucket_start(hour, b, &query.tz)),
        // Rows read for `Child` already name the child (or the node itself).
        (by(GroupBy::Account) || by(GroupBy::Child)).then(|| account.clone()),
        by(GroupBy::Service).then(|| service.to_string()),
        by(GroupBy::Model).then(|| model.to_string()),
    )
}

/// Groups hourly rows into the rows `query` asks for, in a deterministic order (bucket,
/// account, service, model), so the same log always gives byte-identical answers.
pub fn aggregate(rows: &[HourRow], query: &UsageQuery) -> Result<Vec<UsageRow>, SumOverflow> {
    let mut groups: BTreeMap<Key, TokenSums> = BTreeMap::new();
    for row in rows {
        let key = group_key(query, row.hour, &row.account, &row.service, &row.model);
        groups
            .entry(key)
            .or_default()
            .add(row.modality, row.direction, row.tokens)
            .ok_or(SumOverflow)?;
    }
    Ok(groups
        .into_iter()
        .map(|((bucket, account, service, model), tokens)| UsageRow {
            bucket_start: bucket.and_then(|s| Timestamp::from_second(s).ok()),
            account,
            service,
            model,
            tokens,
        })
        .collect())
}

/// Rated amounts of one answer row, by currency, exact.
pub type CostSums = BTreeMap<ciyuan_core::Currency, ciyuan_core::ExactSum>;

/// Groups hourly cost rows as [`aggregate`] groups token rows (same keys, same
/// order), so each usage row can carry its cost.
pub fn aggregate_cost(
    rows: &[crate::CostRow],
    query: &UsageQuery,
) -> Result<Vec<(UsageRow, CostSums)>, SumOverflow> {
    let mut groups: BTreeMap<Key, CostSums> = BTreeMap::new();
    for row in rows {
        let key = group_key(query, row.hour, &row.account, &row.service, &row.model);
        let slot = groups
            .entry(key)
            .or_default()
            .entry(row.currency)
            .or_insert(ciyuan_core::ExactSum::ZERO);
        *slot = slot.checked_add(row.amount).ok_or(SumOverflow)?;
    }
    Ok(groups
        .into_iter()
        .map(|((bucket, account, service, model), cost)| {
            (
                UsageRow {
                    bucket_start: bucket.and_then(|s| Timestamp::from_second(s).ok()),
                    account,
                    service,
                    model,
                    tokens: TokenSums::default(),
                },
                cost,
            )
        })
        .collect())
}

/// Start of the bucket holding the UTC hour starting at `hour` seconds.
fn bucket_start(hour: i64, bucket: Bucket, tz: &TimeZone) -> i64 {
    let Ok(ts) = Timestamp::from_second(hour) else {
        return hour;
    };
    let zoned = ts.to_zoned(tz.clone());
    let start = match bucket {
        Bucket::Hour => return hour,
        Bucket::Day => zoned.start_of_day(),
        Bucket::Month => zoned.first_of_month().and_then(|z| z.start_of_day()),
    };
    start.map(|z| z.timestamp().as_second()).unwrap_or(hour)
}

/// Rounds a timestamp down to the start of its UTC hour, in seconds.
pub fn floor_hour(ts: Timestamp) -> i64 {
    ts.as_second().div_euclid(3600) * 3600
}

/// Rounds a timestamp up to the start of the next UTC hour unless it is on one.
pub fn ceil_hour(ts: Timestamp) -> i64 {
    let floor = floor_hour(ts);
    if floor == ts.as_second() && ts.subsec_nanosecond() == 0 {
        floor
    } else {
        floor + 3600
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{Direction, Modality};

    fn row(hour: &str, account: &str, model: &str, tokens: i128) -> HourRow {
        HourRow {
            hour: hour.parse::<Timestamp>().unwrap().as_second(),
            account: account.parse().unwrap(),
            service: "llm.chat".into(),
            model: model.into(),
            modality: Modality::Text,
            direction: Direction::Input,
            tokens,
        }
    }

    #[test]
    fn days_follow_the_time_zone() {
        // 15:00Z and 17:00Z fall on different days in Shanghai (UTC+8), the same in UTC.
        let rows = [
            row("2026-11-24T15:00:00Z", "acme/cn", "gpt-4o", 5),
            row("2026-11-24T17:00:00Z", "acme/cn", "gpt-4o", 7),
        ];
        let mut q = UsageQuery {
            account: "acme".parse().unwrap(),
            group_by: vec![GroupBy::Model],
            bucket: Some(Bucket::Day),
            tz: TimeZone::UTC,
        };
        assert_eq!(aggregate(&rows, &q).unwrap().len(), 1);
        q.tz = TimeZone::get("Asia/Shanghai").unwrap();
        let out = aggregate(&rows, &q).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].bucket_start.unwrap().to_string(),
            "2026-11-23T16:00:00Z"
        );
        assert_eq!(
            out[1].bucket_start.unwrap().to_string(),
            "2026-11-24T16:00:00Z"
        );
    }

    #[test]
    fn groups_and_sums() {
        let rows = [
            row("2026-11-24T15:00:00Z", "acme/cn", "a", 5),
            row("2026-11-24T16:00:00Z", "acme/us", "a", 7),
            row("2026-11-24T16:00:00Z", "acme/us", "b", 1),
        ];
        let q = UsageQuery {
            account: "acme".parse().unwrap(),
            group_by: vec![GroupBy::Account],
            bucket: Some(Bucket::Month),
            tz: TimeZone::UTC,
        };
        let out = aggregate(&rows, &q).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].account.as_ref().unwrap().as_str(), "acme/us");
        assert_eq!(out[1].tokens.total(), Some(8));
        assert_eq!(
            out[0].bucket_start.unwrap().to_string(),
            "2026-11-01T00:00:00Z"
        );
    }

    #[test]
    fn regression_usage_totals_are_exact_past_i64() {
        // Two hourly rows of i64::MAX and one more: the total is exact, not skipped
        // or saturated.
        let rows = [
            row("2026-11-24T15:00:00Z", "acme/cn", "a", i64::MAX.into()),
            row("2026-11-24T16:00:00Z", "acme/cn", "a", i64::MAX.into()),
            row("2026-11-24T16:00:00Z", "acme/us", "a", 2),
        ];
        let q = UsageQuery {
            account: "acme".parse().unwrap(),
            group_by: vec![],
            bucket: None,
            tz: TimeZone::UTC,
        };
        let out = aggregate(&rows, &q).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tokens.total(), Some(2 * i128::from(i64::MAX) + 2));
        let huge = [
            row("2026-11-24T15:00:00Z", "acme/cn", "a", i128::MAX),
            row("2026-11-24T16:00:00Z", "acme/cn", "a", 1),
        ];
        assert_eq!(aggregate(&huge, &q), Err(SumOverflow));
    }

    #[test]
    fn hour_rounding() {
        let t: Timestamp = "2026-11-24T15:20:00Z".parse().unwrap();
        assert_eq!(
            Timestamp::from_second(floor_hour(t)).unwrap().to_string(),
            "2026-11-24T15:00:00Z"
        );
        assert_eq!(
            Timestamp::from_second(ceil_hour(t)).unwrap().to_string(),
            "2026-11-24T16:00:00Z"
        );
        let on: Timestamp = "2026-11-24T15:00:00Z".parse().unwrap();
        assert_eq!(ceil_hour(on), on.as_second());
    }
}
