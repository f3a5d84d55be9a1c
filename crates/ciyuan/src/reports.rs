//! `ciyuan reports list|run`: the scheduled reports configured on the server, and one
//! period delivered by hand.

use crate::Remote;
use crate::client::{Client, enc};
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ReportsCmd {
    /// The configured reports: last period delivered and next due.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Deliver one period of a report now (recorded as by hand; root admin key).
    Run {
        /// The report's name in the server's configuration.
        name: String,
        /// The period: 2026-11-05 (a daily report: the day in the node's time zone)
        /// or 2026-11-05T10 (an hourly report: the UTC hour).
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

/// Runs `ciyuan reports ...`.
pub fn reports(cmd: ReportsCmd) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ReportsCmd::List { remote } => {
            let v = Client::new(&remote)?.json(Method::GET, "/api/v1/reports", None)?;
            if remote.json {
                writeln!(out, "{v}")?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                out,
                "{:<20} {:<16} {:<5} {:<5} {:<16} {:<16} {:<22} DESTINATION",
                "NAME", "ACCOUNT", "EVERY", "FMT", "LAST", "NEXT", "DUE AT"
            )?;
            for r in v["reports"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                writeln!(
                    out,
                    "{:<20} {:<16} {:<5} {:<5} {:<16} {:<16} {:<22} {}",
                    t(&r["name"]),
                    t(&r["account"]),
                    t(&r["every"]),
                    t(&r["format"]),
                    t(&r["last_delivered"]["period"]),
                    t(&r["next_due"]["period"]),
                    t(&r["next_due"]["due_at"]),
                    t(&r["destination"]),
                )?;
            }
        }
        ReportsCmd::Run {
            name,
            period,
            remote,
        } => {
            let path = format!("/api/v1/reports/{}/run?period={}", enc(&name), enc(&period));
            let v = Client::new(&remote)?.json(Method::POST, &path, None)?;
            if remote.json {
                writeln!(out, "{v}")?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                out,
                "delivered {} {} ({} .. {}, {}): {} bytes, sha256 {} to {} (entry {})",
                t(&v["report"]),
                t(&v["period"]),
                t(&v["period_start"]),
                t(&v["period_end"]),
                t(&v["time_zone"]),
                t(&v["bytes"]),
                t(&v["sha256"]),
                t(&v["destination"]),
                t(&v["entry"]),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
