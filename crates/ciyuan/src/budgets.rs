//! `ciyuan budgets set|show|clear` and `ciyuan access set`: clients of
//! `/api/v1/budgets/{path}` and `/api/v1/access/{path}`.

use crate::Remote;
use crate::client::{Client, enc};
use anyhow::bail;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use std::io::Write;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum BudgetsCmd {
    /// Set (or replace) a limit on a node; it binds the node's whole subtree.
    Set {
        /// The node, e.g. acme/cn.
        path: String,
        /// Limit in tokens.
        #[arg(long, conflicts_with_all = ["requests", "amount"])]
        tokens: Option<u64>,
        /// Limit in requests (a rate limit, with --period minute).
        #[arg(long, conflicts_with = "amount")]
        requests: Option<u64>,
        /// Limit in money, e.g. 500 (with --currency): what the node's usage costs
        /// at the prices that rate it.
        #[arg(long, requires = "currency")]
        amount: Option<String>,
        /// The money limit's currency (ISO 4217), e.g. CNY.
        #[arg(long, requires = "amount")]
        currency: Option<String>,
        /// minute, hour, day, month (in the node's time zone) or lifetime.
        #[arg(long)]
        period: String,
        /// Refuse requests that would exceed it (the default).
        #[arg(long, conflicts_with = "soft")]
        hard: bool,
        /// Allow and alert only.
        #[arg(long)]
        soft: bool,
        /// Count per node (default), session, key or request.
        #[arg(long, default_value = "node")]
        per: String,
        /// Only these tokens: a modality, a direction or modality.direction.
        #[arg(long)]
        selector: Option<String>,
        /// Percentages that write an incident and call webhooks (default 50,80,100).
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<u8>>,
        /// Per-request limits: lower max_tokens to fit instead of refusing.
        #[arg(long)]
        clamp: bool,
        /// The limit's name on its node (default: default).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Limits on a node and its ancestors: limit, used, reserved, remaining, live.
    Show {
        /// The node.
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a limit from a node.
    Clear {
        /// The node.
        path: String,
        /// The limit's name (default: default).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
pub enum AccessCmd {
    /// Set a node's model rules (replacing its previous ones); inherited by its subtree.
    Set {
        /// The node.
        path: String,
        /// Comma-separated model patterns allowed (`*` wildcards).
        #[arg(long, value_delimiter = ',')]
        allow: Option<Vec<String>>,
        /// Comma-separated model patterns denied.
        #[arg(long, value_delimiter = ',')]
        deny: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

/// A figure as text: amounts are strings, shown without quotes.
fn bare(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print(v: &Value, remote: &Remote) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if remote.json {
        serde_json::to_writer_pretty(&mut out, v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "limits on {} and its ancestors",
        v["account"].as_str().unwrap_or("?")
    )?;
    for l in v["limits"].as_array().into_iter().flatten() {
        let subject = l["subject"]
            .as_str()
            .map(|s| format!(" [{s}]"))
            .unwrap_or_default();
        // A money limit's figures are in its `cost`, exact; the token fields beside
        // them count nothing for it.
        let (figures, unit) = match l.get("cost").filter(|c| c.is_object()) {
            Some(c) => (c, format!(" {}", bare(&c["currency"]))),
            None => (l, String::new()),
        };
        writeln!(
            out,
            "  {:<16} {:<12} {} {}{}: used {}{unit}, reserved {}{unit}, remaining {}{unit}",
            l["node"].as_str().unwrap_or("?"),
            l["name"].as_str().unwrap_or("?"),
            l["mode"].as_str().unwrap_or("?"),
            l["limit"].as_str().unwrap_or("?"),
            subject,
            bare(&figures["used"]),
            bare(&figures["reserved"]),
            bare(&figures["remaining"]),
        )?;
    }
    for m in v["models"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  models on {}: allow {} deny {}",
            m["node"], m["allow"], m["deny"]
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn budgets(cmd: BudgetsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BudgetsCmd::Set {
            path,
            tokens,
            requests,
            amount,
            currency,
            period,
            hard: _,
            soft,
            per,
            selector,
            thresholds,
            clamp,
            name,
            remote,
        } => {
            if tokens.is_none() && requests.is_none() && amount.is_none() {
                bail!("give --tokens, --requests or --amount with --currency");
            }
            if let (Some(a), Some(c)) = (&amount, &currency) {
                // Sent as typed; checked first so a typo is named here.
                ciyuan_core::parse_amount("--amount", a).map_err(|e| anyhow::anyhow!("{e}"))?;
                c.parse::<ciyuan_core::Currency>()
                    .map_err(|e| anyhow::anyhow!("--currency: {e}"))?;
            }
            let mut body = json!({
                "period": period,
                "mode": if soft { "soft" } else { "hard" },
                "per": per,
                "clamp": clamp,
            });
            for (k, v) in [
                ("tokens", tokens.map(Value::from)),
                ("requests", requests.map(Value::from)),
                ("cost", amount.map(Value::from)),
                ("currency", currency.map(Value::from)),
                ("selector", selector.map(Value::from)),
                ("thresholds", thresholds.map(Value::from)),
                ("name", name.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = Client::new(&remote)?.json(
                Method::PUT,
                &format!("/api/v1/budgets/{}", enc(&path)),
                Some(&body),
            )?;
            print(&v, &remote)
        }
        BudgetsCmd::Show { path, remote } => {
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/budgets/{}", enc(&path)),
                None,
            )?;
            print(&v, &remote)
        }
        BudgetsCmd::Clear { path, name, remote } => {
            let q = name
                .map(|n| format!("?name={}", enc(&n)))
                .unwrap_or_default();
            let v = Client::new(&remote)?.json(
                Method::DELETE,
                &format!("/api/v1/budgets/{}{q}", enc(&path)),
                None,
            )?;
            print(&v, &remote)
        }
    }
}

pub fn access(cmd: AccessCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AccessCmd::Set {
            path,
            allow,
            deny,
            remote,
        } => {
            let v = Client::new(&remote)?.json(
                Method::PUT,
                &format!("/api/v1/access/{}", enc(&path)),
                Some(&json!({"allow": allow, "deny": deny})),
            )?;
            print(&v, &remote)
        }
    }
}
