//! The quality report: per upstream and model over a period, how the gateway's
//! requests went (latency and time-to-first-token percentiles, output speed, error,
//! cut-stream and discrepancy rates), from the requests' quality records; as JSON
//! (the struct serialized), CSV and a printable HTML page.
//!
//! Percentiles are nearest-rank values of the exact microsecond figures the entries
//! hold (shown in milliseconds, exactly); rates are percentages rounded half-even to
//! four decimals, beside the counts they come from.

use crate::statement::{csv_record, esc};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, nearest_rank};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;

/// One request as the report reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualitySample<'a> {
    /// The upstream.
    pub upstream: &'a str,
    /// The model the request named.
    pub model: &'a str,
    /// The status the client got.
    pub status: u16,
    /// Why it was partial or failed (`upstream_cut`, `client_disconnected`, ...).
    pub failure: Option<&'a str>,
    /// Whether it failed on the upstream's side ([`ciyuan_core::upstream_failed`]).
    pub upstream_failed: bool,
    /// Time to first token, µs.
    pub ttft_us: Option<u64>,
    /// Latency, µs.
    pub latency_us: u64,
    /// Output tokens per second.
    pub tokens_per_sec: Option<u64>,
    /// Whether a recount agreed, when there was one.
    pub recount_agrees: Option<bool>,
    /// Whether the tokens are Ciyuan's estimate (the provider never counted).
    pub estimated: bool,
}

/// Percentiles of a duration, in milliseconds (exact: microseconds / 1000).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Values measured.
    pub samples: u64,
    /// 50th percentile (nearest rank).
    pub p50: Decimal,
    /// 90th.
    pub p90: Decimal,
    /// 95th.
    pub p95: Decimal,
    /// 99th.
    pub p99: Decimal,
    /// The largest.
    pub max: Decimal,
}

impl Percentiles {
    fn of_us(mut v: Vec<u64>) -> Option<Percentiles> {
        v.sort_unstable();
        let ms = |p| nearest_rank(&v, p).map(|us| Decimal::new(us as i64, 3).normalize());
        Some(Percentiles {
            samples: v.len() as u64,
            p50: ms(50)?,
            p90: ms(90)?,
            p95: ms(95)?,
            p99: ms(99)?,
            max: ms(100)?,
        })
    }
}

/// How one upstream's requests for one model went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityRow {
    /// The upstream.
    pub upstream: String,
    /// The model.
    pub model: String,
    /// Requests.
    pub requests: u64,
    /// Requests answered with an error status (4xx or 5xx).
    pub errors: u64,
    /// Requests failed on the upstream's side (timeout, cut stream, 429 or 5xx).
    pub upstream_failures: u64,
    /// Streams the upstream cut.
    pub cut_streams: u64,
    /// Requests the client hung up on.
    pub client_disconnects: u64,
    /// `errors / requests`, percent.
    pub error_rate_percent: Decimal,
    /// `upstream_failures / requests`, percent.
    pub upstream_failure_rate_percent: Decimal,
    /// `cut_streams / requests`, percent.
    pub cut_stream_rate_percent: Decimal,
    /// Latency, ms.
    pub latency_ms: Option<Percentiles>,
    /// Time to first token, ms.
    pub ttft_ms: Option<Percentiles>,
    /// Requests with an output speed.
    pub speed_samples: u64,
    /// Output tokens per second, median (nearest rank).
    pub output_tokens_per_sec_p50: Option<u64>,
    /// Output tokens per second, 10th percentile (the slow tail).
    pub output_tokens_per_sec_p10: Option<u64>,
    /// Requests recounted.
    pub recounted: u64,
    /// Of which the recount disagreed with the provider beyond tolerance.
    pub discrepancies: u64,
    /// `discrepancies / recounted`, percent (zero when none was recounted).
    pub discrepancy_rate_percent: Decimal,
    /// Requests whose tokens are Ciyuan's estimate.
    pub estimated: u64,
}

/// The quality report of a node's subtree over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityReport {
    /// The node whose requests are counted (with its subtree).
    pub account: AccountPath,
    /// The period's name when it is a calendar month.
    pub period: Option<String>,
    /// First instant covered (UTC).
    pub from: Timestamp,
    /// First instant not covered (UTC).
    pub to: Timestamp,
    /// The time zone the period was computed in.
    pub time_zone: String,
    /// The log entries read.
    pub scanned: (u64, u64),
    /// One row per upstream and model, in that order.
    pub rows: Vec<QualityRow>,
}

fn rate(part: u64, all: u64) -> Decimal {
    if all == 0 {
        return Decimal::ZERO;
    }
    (Decimal::from(part) * Decimal::ONE_HUNDRED / Decimal::from(all))
        .round_dp_with_strategy(4, RoundingStrategy::MidpointNearestEven)
        .normalize()
}

#[derive(Default)]
struct Acc {
    requests: u64,
    errors: u64,
    upstream_failures: u64,
    cut: u64,
    disconnects: u64,
    latency: Vec<u64>,
    ttft: Vec<u64>,
    speed: Vec<u64>,
    recounted: u64,
    discrepancies: u64,
    estimated: u64,
}

/// Rows summed one request at a time, so a period of any size is read once, keeping
/// only the durations the percentiles need (24 bytes a request at most).
#[derive(Default)]
pub struct QualityRows {
    by: BTreeMap<(String, String), Acc>,
}

impl QualityRows {
    /// Counts one request.
    pub fn add(&mut self, s: QualitySample<'_>) {
        let a = self
            .by
            .entry((s.upstream.to_string(), s.model.to_string()))
            .or_default();
        a.requests += 1;
        a.errors += u64::from(s.status >= 400);
        a.upstream_failures += u64::from(s.upstream_failed);
        a.cut += u64::from(s.failure == Some("upstream_cut"));
        a.disconnects += u64::from(s.failure == Some("client_disconnected"));
        a.latency.push(s.latency_us);
        if let Some(t) = s.ttft_us {
            a.ttft.push(t);
        }
        if let Some(t) = s.tokens_per_sec {
            a.speed.push(t);
        }
        if let Some(agrees) = s.recount_agrees {
            a.recounted += 1;
            a.discrepancies += u64::from(!agrees);
        }
        a.estimated += u64::from(s.estimated);
    }

    /// The rows, one per (upstream, model), in that order.
    pub fn finish(self) -> Vec<QualityRow> {
        self.by
            .into_iter()
            .map(|((upstream, model), mut a)| {
                a.speed.sort_unstable();
                QualityRow {
                    upstream,
                    model,
                    requests: a.requests,
                    errors: a.errors,
                    upstream_failures: a.upstream_failures,
                    cut_streams: a.cut,
                    client_disconnects: a.disconnects,
                    error_rate_percent: rate(a.errors, a.requests),
                    upstream_failure_rate_percent: rate(a.upstream_failures, a.requests),
                    cut_stream_rate_percent: rate(a.cut, a.requests),
                    latency_ms: Percentiles::of_us(a.latency),
                    ttft_ms: Percentiles::of_us(a.ttft),
                    speed_samples: a.speed.len() as u64,
                    output_tokens_per_sec_p50: nearest_rank(&a.speed, 50),
                    output_tokens_per_sec_p10: nearest_rank(&a.speed, 10),
                    recounted: a.recounted,
                    discrepancies: a.discrepancies,
                    discrepancy_rate_percent: rate(a.discrepancies, a.recounted),
                    estimated: a.estimated,
                }
            })
            .collect()
    }
}

/// The rows of `samples`, one per (upstream, model), in that order.
pub fn rows<'a>(samples: impl IntoIterator<Item = QualitySample<'a>>) -> Vec<QualityRow> {
    let mut r = QualityRows::default();
    for s in samples {
        r.add(s);
    }
    r.finish()
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 26] = [
    "upstream",
    "model",
    "requests",
    "errors",
    "error_rate_percent",
    "upstream_failures",
    "upstream_failure_rate_percent",
    "cut_streams",
    "cut_stream_rate_percent",
    "client_disconnects",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "ttft_samples",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "speed_samples",
    "output_tokens_per_sec_p50",
    "output_tokens_per_sec_p10",
    "recounted",
    "discrepancies",
    "discrepancy_rate_percent",
];

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn fields(r: &QualityRow) -> Vec<(String, bool)> {
    let l = r.latency_ms.as_ref();
    let t = r.ttft_ms.as_ref();
    vec![
        (r.upstream.clone(), true),
        (r.model.clone(), true),
        (r.requests.to_string(), false),
        (r.errors.to_string(), false),
        (r.error_rate_percent.to_string(), false),
        (r.upstream_failures.to_string(), false),
        (r.upstream_failure_rate_percent.to_string(), false),
        (r.cut_streams.to_string(), false),
        (r.cut_stream_rate_percent.to_string(), false),
        (r.client_disconnects.to_string(), false),
        (opt(l.map(|p| p.p50)), false),
        (opt(l.map(|p| p.p90)), false),
        (opt(l.map(|p| p.p95)), false),
        (opt(l.map(|p| p.p99)), false),
        (opt(l.map(|p| p.max)), false),
        (t.map_or(0, |p| p.samples).to_string(), false),
        (opt(t.map(|p| p.p50)), false),
        (opt(t.map(|p| p.p90)), false),
        (opt(t.map(|p| p.p95)), false),
        (opt(t.map(|p| p.p99)), false),
        (r.speed_samples.to_string(), false),
        (opt(r.output_tokens_per_sec_p50), false),
        (opt(r.output_tokens_per_sec_p10), false),
        (r.recounted.to_string(), false),
        (r.discrepancies.to_string(), false),
        (r.discrepancy_rate_percent.to_string(), false),
    ]
}

/// The report as CSV (RFC 4180, CRLF), one row per upstream and model.
pub fn write_csv(report: &QualityReport, mut out: impl Write) -> std::io::Result<()> {
    out.write_all(csv_record(CSV_COLUMNS.iter().map(|c| (*c, false))).as_bytes())?;
    for r in &report.rows {
        let f = fields(r);
        out.write_all(csv_record(f.iter().map(|(v, t)| (v.as_str(), *t))).as_bytes())?;
    }
    Ok(())
}

/// The report as a printable HTML page.
pub fn write_html(report: &QualityReport, mut out: impl Write) -> std::io::Result<()> {
    let mut h = String::with_capacity(4096);
    let period = report
        .period
        .clone()
        .unwrap_or_else(|| format!("{} – {}", report.from, report.to));
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Service quality ");
    esc(&mut h, report.account.as_str());
    h.push(' ');
    esc(&mut h, &period);
    h.push_str("</title>\n<style>");
    h.push_str(crate::statement::STYLE);
    h.push_str(
        "</style>\n</head>\n<body>\n<header>\n<h1>Service quality</h1>\n<dl>\n<dt>Account</dt><dd>",
    );
    esc(&mut h, report.account.as_str());
    h.push_str("</dd>\n<dt>Period</dt><dd>");
    esc(&mut h, &period);
    h.push_str(" (");
    esc(&mut h, &report.time_zone);
    h.push_str(")</dd>\n<dt>Entries read</dt><dd>");
    esc(
        &mut h,
        &format!("{} – {}", report.scanned.0, report.scanned.1),
    );
    h.push_str("</dd>\n</dl>\n</header>\n<table>\n<thead><tr>");
    let cols: [(&str, bool); 12] = [
        ("Upstream", false),
        ("Model", false),
        ("Requests", true),
        ("Errors %", true),
        ("Upstream failures %", true),
        ("Cut streams %", true),
        ("Latency p50 / p95 / p99 ms", true),
        ("TTFT p50 / p95 / p99 ms", true),
        ("Tokens/s p50", true),
        ("Tokens/s p10", true),
        ("Recounted", true),
        ("Discrepancies %", true),
    ];
    for (c, right) in cols {
        h.push_str(if right { "<th class=\"num\">" } else { "<th>" });
        esc(&mut h, c);
        h.push_str("</th>");
    }
    h.push_str("</tr></thead><tbody>\n");
    let triple = |p: &Option<Percentiles>| {
        p.as_ref()
            .map(|p| format!("{} / {} / {}", p.p50, p.p95, p.p99))
            .unwrap_or_else(|| "–".into())
    };
    for r in &report.rows {
        h.push_str("<tr>");
        for (i, v) in [
            r.upstream.clone(),
            r.model.clone(),
            r.requests.to_string(),
            r.error_rate_percent.to_string(),
            r.upstream_failure_rate_percent.to_string(),
            r.cut_stream_rate_percent.to_string(),
            triple(&r.latency_ms),
            triple(&r.ttft_ms),
            opt(r.output_tokens_per_sec_p50),
            opt(r.output_tokens_per_sec_p10),
            r.recounted.to_string(),
            r.discrepancy_rate_percent.to_string(),
        ]
        .iter()
        .enumerate()
        {
            h.push_str(if i < 2 { "<td>" } else { "<td class=\"num\">" });
            esc(&mut h, v);
            h.push_str("</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n</body>\n</html>\n");
    out.write_all(h.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(
        model: &str,
        status: u16,
        failure: Option<&'static str>,
        ttft: Option<u64>,
        latency: u64,
    ) -> QualitySample<'static> {
        let model: &'static str = Box::leak(model.to_string().into_boxed_str());
        QualitySample {
            upstream: "openai",
            model,
            status,
            failure,
            upstream_failed: failure.is_some_and(|f| f != "client_disconnected")
                && (status >= 500 || failure == Some("upstream_cut")),
            ttft_us: ttft,
            latency_us: latency,
            tokens_per_sec: ttft.map(|_| 50),
            recount_agrees: Some(status == 200),
            estimated: failure == Some("upstream_cut"),
        }
    }

    #[test]
    fn rows_count_rates_and_percentiles_exactly() {
        let mut v = Vec::new();
        for i in 1..=100u64 {
            v.push(s("gpt-4o", 200, None, Some(i * 1000), i * 10_000));
        }
        v.push(s("gpt-4o", 502, Some("upstream_error"), None, 1500));
        v.push(s("gpt-4o", 200, Some("upstream_cut"), Some(7000), 90_000));
        v.push(s("o3", 200, Some("client_disconnected"), Some(100), 200));
        let r = rows(v);
        assert_eq!(r.len(), 2);
        let g = &r[0];
        assert_eq!((g.model.as_str(), g.requests, g.errors), ("gpt-4o", 102, 1));
        assert_eq!(g.upstream_failures, 2);
        assert_eq!(g.cut_streams, 1);
        assert_eq!(g.error_rate_percent, "0.9804".parse().unwrap());
        assert_eq!(g.upstream_failure_rate_percent, "1.9608".parse().unwrap());
        let ttft = g.ttft_ms.as_ref().unwrap();
        // 101 values 1..100 ms and 7 ms: p95 is rank 96 → 95 ms.
        assert_eq!(ttft.samples, 101);
        assert_eq!(ttft.p95, Decimal::from(95));
        assert_eq!(ttft.max, Decimal::from(100));
        let lat = g.latency_ms.as_ref().unwrap();
        // 102 values: 1.5 ms, 10..=90 ms, 90 ms (the cut one), 100..=1000 ms.
        assert_eq!(lat.p50, "490".parse().unwrap());
        assert_eq!(lat.p99, "990".parse().unwrap());
        assert_eq!(g.recounted, 102);
        assert_eq!(g.discrepancies, 1);
        assert_eq!(r[1].client_disconnects, 1);
        assert_eq!(r[1].upstream_failures, 0);
    }

    #[test]
    fn renderings_are_deterministic_and_escaped() {
        let report = QualityReport {
            account: "acme".parse().unwrap(),
            period: Some("2026-11".into()),
            from: Timestamp::UNIX_EPOCH,
            to: Timestamp::UNIX_EPOCH,
            time_zone: "Asia/Shanghai".into(),
            scanned: (3, 9),
            rows: rows(vec![s("=cmd<b>", 200, None, Some(1000), 2000)]),
        };
        let mut a = Vec::new();
        write_csv(&report, &mut a).unwrap();
        let mut b = Vec::new();
        write_csv(&report, &mut b).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with("upstream,model,requests,"));
        assert!(text.contains("'=cmd<b>"), "{text}");
        assert_eq!(
            text.lines().next().unwrap().split(',').count(),
            CSV_COLUMNS.len()
        );
        let mut h = Vec::new();
        write_html(&report, &mut h).unwrap();
        let html = String::from_utf8(h).unwrap();
        assert!(html.contains("=cmd&lt;b&gt;") && !html.contains("<b>"));
    }
}
