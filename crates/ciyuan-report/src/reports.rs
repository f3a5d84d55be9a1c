//! Scheduled reports: their periods (UTC hours, or days in a node's time zone) and their
//! bytes (CSV or JSON), as pure functions. The server reads the projections, delivers
//! the bytes and records the delivery; this module only decides what a period is and
//! how a report is written.
//!
//! A report's bytes depend on its inputs alone (rows are sorted here, whatever order
//! they come in), so the same period gives the same bytes and a repeated delivery is
//! recognisable by its hash.

use crate::statement::csv_record;
use ciyuan_core::jiff::civil::{Date, DateTime};
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{Timestamp, ToSpan};
use ciyuan_core::{AccountPath, Currency};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;

/// How long a report's period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Every {
    /// A UTC hour, labelled `2026-11-05T10`.
    Hour,
    /// A calendar day in the report node's time zone, labelled `2026-11-05`.
    Day,
}

impl Every {
    /// Parses `hour` or `day`.
    pub fn parse(s: &str) -> Result<Every, String> {
        match s {
            "hour" => Ok(Every::Hour),
            "day" => Ok(Every::Day),
            other => Err(format!("{other:?} is not hour or day")),
        }
    }

    /// `hour` or `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Every::Hour => "hour",
            Every::Day => "day",
        }
    }

    /// The period labelled `label`: `YYYY-MM-DDTHH` (a UTC hour; a trailing `Z` is
    /// accepted) or `YYYY-MM-DD` (a day in `zone`).
    pub fn period(self, label: &str, zone: &TimeZone) -> Result<Period, String> {
        match self {
            Every::Hour => {
                let bad = || {
                    format!(
                        "{label:?} is not an hour written YYYY-MM-DDTHH (UTC), e.g. 2026-11-05T10"
                    )
                };
                let text = label.strip_suffix('Z').unwrap_or(label);
                let (day, hour) = text.split_once('T').ok_or_else(bad)?;
                if hour.len() != 2 || !hour.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let date = parse_date(day).ok_or_else(bad)?;
                let hour: i8 = hour.parse().map_err(|_| bad())?;
                let start = DateTime::from_parts(
                    date,
                    ciyuan_core::jiff::civil::Time::new(hour, 0, 0, 0).map_err(|_| bad())?,
                )
                .to_zoned(TimeZone::UTC)
                .map_err(|e| format!("{label:?}: {e}"))?
                .timestamp();
                Period::hour_from(start)
            }
            Every::Day => {
                let date = parse_date(label).ok_or_else(|| {
                    format!("{label:?} is not a day written YYYY-MM-DD, e.g. 2026-11-05")
                })?;
                Period::day(date, zone)
            }
        }
    }

    /// The period after `p` (same length, same zone).
    pub fn next(self, p: &Period, zone: &TimeZone) -> Result<Period, String> {
        match self {
            Every::Hour => Period::hour_from(p.end),
            Every::Day => {
                let date = parse_date(&p.label)
                    .ok_or_else(|| format!("{:?} is not a day's label", p.label))?;
                let next = date
                    .checked_add(1.day())
                    .map_err(|e| format!("the day after {date}: {e}"))?;
                Period::day(next, zone)
            }
        }
    }
}

fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i16 = s.get(0..4)?.parse().ok()?;
    let m: i8 = s.get(5..7)?.parse().ok()?;
    let d: i8 = s.get(8..10)?.parse().ok()?;
    Date::new(y, m, d).ok()
}

/// One period of a report: its label and the UTC instants it covers, `start..end`,
/// both on whole UTC hours (the projections' rollups are hourly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    /// `2026-11-05T10` or `2026-11-05`: in file names, idempotency keys and entries.
    pub label: String,
    /// First instant (UTC).
    pub start: Timestamp,
    /// End (UTC, exclusive).
    pub end: Timestamp,
}

impl Period {
    fn hour_from(start: Timestamp) -> Result<Period, String> {
        let end = start
            .checked_add(1.hour())
            .map_err(|e| format!("the hour after {start}: {e}"))?;
        let utc = start.to_zoned(TimeZone::UTC);
        Ok(Period {
            label: format!("{}T{:02}", utc.date(), utc.hour()),
            start,
            end,
        })
    }

    /// The day `date` in `zone`: from its first instant to the next day's, each cut at
    /// the whole UTC hour at or before it (zones 30 or 45 minutes off UTC see their
    /// days shifted to the hour before; consecutive days still tile time exactly).
    fn day(date: Date, zone: &TimeZone) -> Result<Period, String> {
        let first = |d: Date| -> Result<Timestamp, String> {
            let t = d
                .to_zoned(zone.clone())
                .and_then(|z| z.start_of_day())
                .map_err(|e| format!("{d} in {}: {e}", zone_name(zone)))?
                .timestamp();
            Timestamp::from_second(t.as_second().div_euclid(3600) * 3600)
                .map_err(|e| format!("{d}: {e}"))
        };
        let next = date
            .checked_add(1.day())
            .map_err(|e| format!("the day after {date}: {e}"))?;
        Ok(Period {
            label: date.to_string(),
            start: first(date)?,
            end: first(next)?,
        })
    }
}

/// The zone's IANA name, `UTC` for the fixed UTC zone.
pub fn zone_name(zone: &TimeZone) -> String {
    zone.iana_name().unwrap_or("UTC").to_string()
}

/// `csv` or `json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 4180 CSV, one record per row, every record naming the report and period.
    Csv,
    /// One JSON document.
    Json,
}

impl Format {
    /// Parses `csv` or `json`.
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("{other:?} is not csv or json")),
        }
    }

    /// `csv` or `json`: also the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }

    /// The media type of the bytes.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
        }
    }
}

/// What a report names about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportHeader {
    /// The report's name.
    pub name: String,
    /// The node whose subtree it covers.
    pub account: AccountPath,
    /// Its period length.
    pub every: Every,
    /// The period.
    pub period: Period,
    /// The time zone its days are computed in.
    pub time_zone: String,
}

/// Tokens of one node, service, model and token key in the period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The node (the usage of this node itself, not of its subtree).
    pub node: AccountPath,
    /// The service.
    pub service: String,
    /// The model; empty where none.
    pub model: String,
    /// The token key, e.g. `text.input`.
    pub key: String,
    /// Signed sum of the period's tokens (corrections included), exact.
    pub tokens: i128,
}

/// What one node's usage of one service and model billed in one currency in the
/// period: the billing lines' billed amounts, adjustments (corrections made in the
/// period, the books' rounding) included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRow {
    /// The node.
    pub node: AccountPath,
    /// The service.
    pub service: String,
    /// The model; empty where none.
    pub model: String,
    /// The currency.
    pub currency: Currency,
    /// The amount billed, exact.
    pub amount: Decimal,
}

/// A report's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// What it is.
    pub header: ReportHeader,
    /// Usage rows, in any order.
    pub usage: Vec<UsageRow>,
    /// Cost rows, in any order.
    pub cost: Vec<CostRow>,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A total left the exact range.
    #[error("{0}")]
    Overflow(String),
    /// Writing failed.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
}

/// The columns of the CSV rendering, in order. Every record repeats the report and
/// period, so each row stands alone in a data warehouse. `record` is `usage`, `cost`,
/// `usage_total` (per token key), `cost_total` (per currency) or `end`, the last
/// record, whose `quantity` counts the records before it (the header excluded): a
/// receiver can tell a whole file from a cut one, and an empty period still names
/// itself.
pub const REPORT_COLUMNS: [&str; 14] = [
    "report",
    "account",
    "every",
    "period",
    "period_start",
    "period_end",
    "time_zone",
    "record",
    "node",
    "service",
    "model",
    "token_key",
    "currency",
    "quantity",
];

/// Token totals per key, cost totals per currency.
type Totals<'a> = (BTreeMap<&'a str, i128>, BTreeMap<&'a str, Decimal>);

impl Report {
    fn sorted(&self) -> (Vec<&UsageRow>, Vec<&CostRow>) {
        let mut usage: Vec<&UsageRow> = self.usage.iter().collect();
        usage.sort_by(|a, b| {
            (a.node.as_str(), &a.service, &a.model, &a.key).cmp(&(
                b.node.as_str(),
                &b.service,
                &b.model,
                &b.key,
            ))
        });
        let mut cost: Vec<&CostRow> = self.cost.iter().collect();
        cost.sort_by(|a, b| {
            (a.node.as_str(), &a.service, &a.model, a.currency.as_str()).cmp(&(
                b.node.as_str(),
                &b.service,
                &b.model,
                b.currency.as_str(),
            ))
        });
        (usage, cost)
    }

    /// Token totals per key and cost totals per currency, exact.
    fn totals(&self) -> Result<Totals<'_>, ReportError> {
        let mut tokens: BTreeMap<&str, i128> = BTreeMap::new();
        for u in &self.usage {
            let slot = tokens.entry(u.key.as_str()).or_insert(0);
            *slot = slot.checked_add(u.tokens).ok_or_else(|| {
                ReportError::Overflow(format!("the total of {} overflows", u.key))
            })?;
        }
        let mut cost: BTreeMap<&str, Decimal> = BTreeMap::new();
        for c in &self.cost {
            let slot = cost.entry(c.currency.as_str()).or_insert(Decimal::ZERO);
            *slot = slot.checked_add(c.amount).ok_or_else(|| {
                ReportError::Overflow(format!(
                    "the {} total needs more than 28 digits",
                    c.currency
                ))
            })?;
        }
        Ok((tokens, cost))
    }

    /// The report in `format`.
    pub fn render(&self, format: Format) -> Result<Vec<u8>, ReportError> {
        let mut out = Vec::new();
        match format {
            Format::Csv => self.write_csv(&mut out)?,
            Format::Json => self.write_json(&mut out)?,
        }
        Ok(out)
    }

    /// Writes the CSV rendering (see [`REPORT_COLUMNS`]).
    pub fn write_csv(&self, out: &mut impl Write) -> Result<(), ReportError> {
        let h = &self.header;
        let start = h.period.start.to_string();
        let end = h.period.end.to_string();
        let account = h.account.to_string();
        let (usage, cost) = self.sorted();
        let (token_totals, cost_totals) = self.totals()?;
        out.write_all(csv_record(REPORT_COLUMNS.iter().map(|c| (*c, false))).as_bytes())?;
        let records = usage.len() + cost.len() + token_totals.len() + cost_totals.len();
        let row = |out: &mut dyn Write, fields: [(&str, bool); 7]| -> std::io::Result<()> {
            let head = [
                (h.name.as_str(), true),
                (account.as_str(), false),
                (h.every.as_str(), false),
                (h.period.label.as_str(), false),
                (start.as_str(), false),
                (end.as_str(), false),
                (h.time_zone.as_str(), false),
            ];
            out.write_all(csv_record(head.into_iter().chain(fields)).as_bytes())
        };
        for u in usage {
            let node = u.node.to_string();
            let q = u.tokens.to_string();
            row(
                out,
                [
                    ("usage", false),
                    (node.as_str(), false),
                    (u.service.as_str(), true),
                    (u.model.as_str(), true),
                    (u.key.as_str(), false),
                    ("", false),
                    (q.as_str(), false),
                ],
            )?;
        }
        for c in cost {
            let node = c.node.to_string();
            let q = c.amount.normalize().to_string();
            row(
                out,
                [
                    ("cost", false),
                    (node.as_str(), false),
                    (c.service.as_str(), true),
                    (c.model.as_str(), true),
                    ("", false),
                    (c.currency.as_str(), false),
                    (q.as_str(), false),
                ],
            )?;
        }
        for (key, total) in &token_totals {
            let q = total.to_string();
            row(
                out,
                [
                    ("usage_total", false),
                    ("", false),
                    ("", false),
                    ("", false),
                    (key, false),
                    ("", false),
                    (q.as_str(), false),
                ],
            )?;
        }
        for (currency, total) in &cost_totals {
            let q = total.normalize().to_string();
            row(
                out,
                [
                    ("cost_total", false),
                    ("", false),
                    ("", false),
                    ("", false),
                    ("", false),
                    (currency, false),
                    (q.as_str(), false),
                ],
            )?;
        }
        let count = records.to_string();
        row(
            out,
            [
                ("end", false),
                ("", false),
                ("", false),
                ("", false),
                ("", false),
                ("", false),
                (count.as_str(), false),
            ],
        )?;
        Ok(())
    }

    /// Writes the JSON rendering: the header's fields, `usage` and `cost` rows, and
    /// `totals` (tokens per key, cost per currency). Amounts are decimal strings.
    pub fn write_json(&self, out: &mut impl Write) -> Result<(), ReportError> {
        #[derive(Serialize)]
        struct UsageOut<'a> {
            node: &'a str,
            service: &'a str,
            model: &'a str,
            token_key: &'a str,
            tokens: i128,
        }
        #[derive(Serialize)]
        struct CostOut<'a> {
            node: &'a str,
            service: &'a str,
            model: &'a str,
            currency: &'a str,
            amount: String,
        }
        #[derive(Serialize)]
        struct Totals<'a> {
            tokens: BTreeMap<&'a str, i128>,
            cost: BTreeMap<&'a str, String>,
        }
        #[derive(Serialize)]
        struct Doc<'a> {
            report: &'a str,
            account: &'a str,
            covers: String,
            every: &'a str,
            period: &'a str,
            period_start: String,
            period_end: String,
            time_zone: &'a str,
            usage: Vec<UsageOut<'a>>,
            cost: Vec<CostOut<'a>>,
            totals: Totals<'a>,
        }
        let h = &self.header;
        let (usage, cost) = self.sorted();
        let (tokens, cost_totals) = self.totals()?;
        let doc = Doc {
            report: &h.name,
            account: h.account.as_str(),
            covers: format!(
                "the subtree of {}: one row per node (its own usage), service, model and token key or currency",
                h.account
            ),
            every: h.every.as_str(),
            period: &h.period.label,
            period_start: h.period.start.to_string(),
            period_end: h.period.end.to_string(),
            time_zone: &h.time_zone,
            usage: usage
                .into_iter()
                .map(|u| UsageOut {
                    node: u.node.as_str(),
                    service: &u.service,
                    model: &u.model,
                    token_key: &u.key,
                    tokens: u.tokens,
                })
                .collect(),
            cost: cost
                .into_iter()
                .map(|c| CostOut {
                    node: c.node.as_str(),
                    service: &c.service,
                    model: &c.model,
                    currency: c.currency.as_str(),
                    amount: c.amount.normalize().to_string(),
                })
                .collect(),
            totals: Totals {
                tokens,
                cost: cost_totals
                    .into_iter()
                    .map(|(k, v)| (k, v.normalize().to_string()))
                    .collect(),
            },
        };
        serde_json::to_writer(&mut *out, &doc).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn zone(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn hours_are_utc_and_follow_each_other_across_a_dst_change() {
        let ny = zone("America/New_York");
        let p = Every::Hour.period("2026-11-01T05", &ny).unwrap();
        assert_eq!(
            (p.start, p.end),
            (ts("2026-11-01T05:00:00Z"), ts("2026-11-01T06:00:00Z"))
        );
        assert_eq!(Every::Hour.period("2026-11-01T05Z", &ny).unwrap(), p);
        // New York's clocks go back at 06:00Z: UTC hours still follow one another.
        let mut q = p.clone();
        for _ in 0..3 {
            let n = Every::Hour.next(&q, &ny).unwrap();
            assert_eq!(n.start, q.end);
            q = n;
        }
        assert_eq!(q.label, "2026-11-01T08");
        let last = Every::Hour.period("2026-12-31T23", &ny).unwrap();
        assert_eq!(Every::Hour.next(&last, &ny).unwrap().label, "2027-01-01T00");
        for bad in [
            "2026-11-01",
            "2026-11-01T5",
            "2026-11-01T24",
            "2026-13-01T00",
            "x",
        ] {
            assert!(Every::Hour.period(bad, &ny).is_err(), "{bad}");
        }
    }

    #[test]
    fn days_are_in_the_zone_and_dst_days_are_23_or_25_hours() {
        let sh = zone("Asia/Shanghai");
        let d = Every::Day.period("2026-11-05", &sh).unwrap();
        assert_eq!(
            (d.start, d.end),
            (ts("2026-11-04T16:00:00Z"), ts("2026-11-05T16:00:00Z"))
        );
        // An event at 00:30 local on the first of the month is in that day.
        let first = Every::Day.period("2026-11-01", &sh).unwrap();
        let at = ts("2026-10-31T16:30:00Z");
        assert!(first.start <= at && at < first.end);

        let ny = zone("America/New_York");
        // 2026-11-01: clocks go back, 25 hours; 2026-03-08: forward, 23 hours.
        let long = Every::Day.period("2026-11-01", &ny).unwrap();
        assert_eq!(
            (long.start, long.end),
            (ts("2026-11-01T04:00:00Z"), ts("2026-11-02T05:00:00Z"))
        );
        let short = Every::Day.period("2026-03-08", &ny).unwrap();
        assert_eq!(short.end.as_second() - short.start.as_second(), 23 * 3600);
        // Consecutive days tile time.
        let mut p = Every::Day.period("2026-10-30", &ny).unwrap();
        for _ in 0..5 {
            let n = Every::Day.next(&p, &ny).unwrap();
            assert_eq!(n.start, p.end);
            p = n;
        }
        assert_eq!(p.label, "2026-11-04");
        // A zone 30 minutes off UTC: cut at the hour before local midnight, still tiling.
        let kolkata = zone("Asia/Kolkata");
        let k = Every::Day.period("2026-11-05", &kolkata).unwrap();
        assert_eq!(
            (k.start, k.end),
            (ts("2026-11-04T18:00:00Z"), ts("2026-11-05T18:00:00Z"))
        );
        assert_eq!(Every::Day.next(&k, &kolkata).unwrap().start, k.end);
        for bad in ["2026-11-5", "2026-02-30", "2026-11-05T00", "11/05/2026"] {
            assert!(Every::Day.period(bad, &sh).is_err(), "{bad}");
        }
    }

    fn report() -> Report {
        let sh = zone("Asia/Shanghai");
        Report {
            header: ReportHeader {
                name: "daily".into(),
                account: "acme".parse().unwrap(),
                every: Every::Day,
                period: Every::Day.period("2026-11-05", &sh).unwrap(),
                time_zone: "Asia/Shanghai".into(),
            },
            usage: vec![
                UsageRow {
                    node: "acme/us".parse().unwrap(),
                    service: "llm.chat".into(),
                    model: "=gpt".into(),
                    key: "text.input".into(),
                    tokens: 5,
                },
                UsageRow {
                    node: "acme/cn".parse().unwrap(),
                    service: "llm.chat".into(),
                    model: "qwen-max".into(),
                    key: "text.input".into(),
                    tokens: 100,
                },
            ],
            cost: vec![
                CostRow {
                    node: "acme/cn".parse().unwrap(),
                    service: "llm.chat".into(),
                    model: "qwen-max".into(),
                    currency: "CNY".parse().unwrap(),
                    amount: Decimal::new(125, 2),
                },
                CostRow {
                    node: "acme/us".parse().unwrap(),
                    service: "llm.chat".into(),
                    model: "=gpt".into(),
                    currency: "CNY".parse().unwrap(),
                    amount: Decimal::new(50, 2),
                },
            ],
        }
    }

    #[test]
    fn csv_names_the_period_on_every_record_sorts_totals_and_ends_with_a_count() {
        let text = String::from_utf8(report().render(Format::Csv).unwrap()).unwrap();
        let rows: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(rows[0], REPORT_COLUMNS.join(","));
        let p = "daily,acme,day,2026-11-05,2026-11-04T16:00:00Z,2026-11-05T16:00:00Z,Asia/Shanghai";
        assert_eq!(
            &rows[1..],
            [
                format!("{p},usage,acme/cn,llm.chat,qwen-max,text.input,,100"),
                format!("{p},usage,acme/us,llm.chat,'=gpt,text.input,,5"),
                format!("{p},cost,acme/cn,llm.chat,qwen-max,,CNY,1.25"),
                format!("{p},cost,acme/us,llm.chat,'=gpt,,CNY,0.5"),
                format!("{p},usage_total,,,,text.input,,105"),
                format!("{p},cost_total,,,,,CNY,1.75"),
                format!("{p},end,,,,,,6"),
            ]
        );
    }

    #[test]
    fn the_same_period_gives_the_same_bytes_whatever_the_row_order() {
        let a = report();
        let mut b = report();
        b.usage.reverse();
        b.cost.reverse();
        for f in [Format::Csv, Format::Json] {
            assert_eq!(a.render(f).unwrap(), b.render(f).unwrap());
        }
        let mut c = report();
        c.usage[0].tokens += 1;
        assert_ne!(
            a.render(Format::Json).unwrap(),
            c.render(Format::Json).unwrap()
        );
    }

    #[test]
    fn json_has_the_header_rows_and_totals() {
        let bytes = report().render(Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["report"], "daily");
        assert_eq!(v["period_start"], "2026-11-04T16:00:00Z");
        assert_eq!(v["period_end"], "2026-11-05T16:00:00Z");
        assert_eq!(v["time_zone"], "Asia/Shanghai");
        assert_eq!(v["usage"][0]["node"], "acme/cn");
        assert_eq!(v["usage"][0]["tokens"], 100);
        assert_eq!(v["cost"][1]["amount"], "0.5");
        assert_eq!(v["totals"]["tokens"]["text.input"], 105);
        assert_eq!(v["totals"]["cost"]["CNY"], "1.75");
        // An empty period still names itself.
        let mut empty = report();
        empty.usage.clear();
        empty.cost.clear();
        let text = String::from_utf8(empty.render(Format::Csv).unwrap()).unwrap();
        assert!(text.ends_with(",end,,,,,,0\r\n"), "{text}");
    }
}
