//! The service-level subcommands: the quality report of a subtree, and contracts'
//! service levels evaluated per month.

use crate::Remote;
use crate::client::{Client, enc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::process::ExitCode;

/// `ciyuan quality [--account PATH] --period 2026-11`
#[derive(Args)]
pub struct QualityArgs {
    /// The account node whose requests are counted (the key's own by default).
    #[arg(long)]
    account: Option<String>,
    /// A calendar month in the node's time zone, e.g. 2026-11.
    #[arg(long, required_unless_present = "from")]
    period: Option<String>,
    /// Or a range: from (RFC 3339, on a whole hour)...
    #[arg(long, requires = "to", conflicts_with = "period")]
    from: Option<String>,
    /// ...to (exclusive).
    #[arg(long)]
    to: Option<String>,
    /// json, csv or html (printed as the server writes it); default: a table.
    #[arg(long)]
    format: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

/// `ciyuan service-levels ...`
#[derive(Subcommand)]
pub enum ServiceLevelsCmd {
    /// The evaluations of a subtree's contracts, month by month, with their credits.
    List {
        /// The account node.
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Evaluate a node's contract's service levels for a month that is over (once;
    /// the server also does it by itself 15 minutes after the month ends).
    Evaluate {
        /// The contract's node.
        path: String,
        /// The month, e.g. 2026-11.
        #[arg(long)]
        period: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn t(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Runs `ciyuan quality`.
pub fn quality(a: QualityArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(acc) = &a.account {
        q.push(format!("account={}", enc(acc)));
    }
    if let Some(p) = &a.period {
        q.push(format!("period={}", enc(p)));
    }
    if let (Some(f), Some(to)) = (&a.from, &a.to) {
        q.push(format!("from={}&to={}", enc(f), enc(to)));
    }
    if let Some(f) = &a.format {
        q.push(format!("format={}", enc(f)));
    }
    let bytes = Client::new(&a.remote)?.call(
        Method::GET,
        &format!("/api/v1/quality?{}", q.join("&")),
        None,
    )?;
    let mut out = std::io::stdout().lock();
    if a.format.is_some() || a.remote.json {
        out.write_all(&bytes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_slice(&bytes)?;
    writeln!(
        out,
        "quality of {} for {} ({}, {} to {})",
        t(&v["account"]),
        match &v["period"] {
            Value::Null => "the range".to_string(),
            p => t(p),
        },
        t(&v["time_zone"]),
        t(&v["from"]),
        t(&v["to"])
    )?;
    writeln!(
        out,
        "{:<12} {:<28} {:>8} {:>8} {:>9} {:>7} {:>24} {:>24} {:>7} {:>8}",
        "upstream",
        "model",
        "requests",
        "errors%",
        "upstream%",
        "cut%",
        "latency p50/p95/p99 ms",
        "ttft p50/p95/p99 ms",
        "tok/s",
        "discrep%"
    )?;
    for r in v["rows"].as_array().into_iter().flatten() {
        let p = |x: &Value| {
            if x.is_null() {
                "-".to_string()
            } else {
                format!("{}/{}/{}", t(&x["p50"]), t(&x["p95"]), t(&x["p99"]))
            }
        };
        writeln!(
            out,
            "{:<12} {:<28} {:>8} {:>8} {:>9} {:>7} {:>24} {:>24} {:>7} {:>8}",
            t(&r["upstream"]),
            t(&r["model"]),
            t(&r["requests"]),
            t(&r["error_rate_percent"]),
            t(&r["upstream_failure_rate_percent"]),
            t(&r["cut_stream_rate_percent"]),
            p(&r["latency_ms"]),
            p(&r["ttft_ms"]),
            t(&r["output_tokens_per_sec_p50"]),
            t(&r["discrepancy_rate_percent"]),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `ciyuan service-levels`.
pub fn run(cmd: ServiceLevelsCmd) -> anyhow::Result<ExitCode> {
    let (remote, method, path) = match &cmd {
        ServiceLevelsCmd::List { path, remote } => (
            remote,
            Method::GET,
            format!("/api/v1/service-levels/{path}"),
        ),
        ServiceLevelsCmd::Evaluate {
            path,
            period,
            remote,
        } => (
            remote,
            Method::POST,
            format!("/api/v1/service-levels/{path}?period={}", enc(period)),
        ),
    };
    let bytes = Client::new(remote)?.call(method, &path, None)?;
    let mut out = std::io::stdout().lock();
    if remote.json {
        out.write_all(&bytes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_slice(&bytes)?;
    let list = v["evaluations"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        writeln!(out, "no service level evaluated for {}", t(&v["account"]))?;
    }
    for e in list {
        let ev = &e["evaluation"];
        let node = match &e["account"] {
            Value::Null => t(&v["account"]),
            a => t(a),
        };
        writeln!(
            out,
            "{} {} {:<16} entry {:<8} requests {:<8} credit {}%",
            node,
            t(&ev["period"]),
            t(&ev["level"]["name"]),
            t(&e["entry"]),
            t(&ev["figures"]["requests"]),
            t(&ev["credit_percent"]),
        )?;
        for o in ev["objectives"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "    {:<22} target {:>8} attained {:>10} {}",
                t(&o["metric"]),
                t(&o["target"]),
                t(&o["attained"]),
                if o["missed"] == true {
                    format!("MISSED (credit {}%)", t(&o["credit_percent"]))
                } else {
                    "met".into()
                },
            )?;
        }
        for c in ev["credits"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "    credit {} {} of {} billed ({}@{})",
                t(&c["amount"]),
                t(&c["currency"]),
                t(&c["base"]),
                t(&c["book"]),
                t(&c["version"]),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
