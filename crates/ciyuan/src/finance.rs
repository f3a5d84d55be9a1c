//! The finance subcommands: statements (and, with them, the period close) and exports.

use crate::Remote;
use crate::client::{Client, enc};
use clap::Args;
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::process::ExitCode;

/// `ciyuan statement PATH --period 2026-11`
#[derive(Args)]
pub struct StatementArgs {
    /// The account node, e.g. acme.
    path: String,
    /// A calendar month in the node's time zone, e.g. 2026-11.
    #[arg(long, required_unless_present = "from")]
    period: Option<String>,
    /// Or a range: from (RFC 3339, on a whole hour)...
    #[arg(long, requires = "to", conflicts_with = "period")]
    from: Option<String>,
    /// ...to (exclusive).
    #[arg(long)]
    to: Option<String>,
    /// json, csv or html (printed as the server writes it); default: a readable
    /// summary of the JSON.
    #[arg(long)]
    format: Option<String>,
    /// For html: en or zh-CN.
    #[arg(long)]
    lang: Option<String>,
    /// Issue the month's statement and close the month for the node (admin key).
    #[arg(long, requires = "period")]
    close: bool,
    #[command(flatten)]
    remote: Remote,
}

/// Runs `ciyuan statement`.
pub fn statement(a: StatementArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(p) = &a.period {
        q.push(format!("period={}", enc(p)));
    }
    if let (Some(f), Some(t)) = (&a.from, &a.to) {
        q.push(format!("from={}&to={}", enc(f), enc(t)));
    }
    let raw = a.format.is_some() || a.remote.json;
    if let Some(f) = &a.format {
        q.push(format!("format={}", enc(f)));
    }
    if let Some(l) = &a.lang {
        q.push(format!("lang={}", enc(l)));
    }
    let method = if a.close { Method::POST } else { Method::GET };
    let path = format!("/api/v1/statements/{}?{}", a.path, q.join("&"));
    let bytes = Client::new(&a.remote)?.call(method, &path, None)?;
    let mut out = std::io::stdout().lock();
    if raw {
        out.write_all(&bytes)?;
        if !bytes.ends_with(b"\n") {
            writeln!(out)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_slice(&bytes)?;
    summary(&v, a.close, &mut out)?;
    Ok(ExitCode::SUCCESS)
}

fn t(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The statement as a terminal reads it.
fn summary(v: &Value, closed_now: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let period = match &v["period"] {
        Value::Null => format!("{} to {}", t(&v["from"]), t(&v["to"])),
        p => t(p),
    };
    writeln!(
        out,
        "statement of {} for {period} ({}, {} to {})",
        t(&v["account"]),
        t(&v["time_zone"]),
        t(&v["from"]),
        t(&v["to"])
    )?;
    if closed_now {
        writeln!(out, "issued: the period is closed for {}", t(&v["account"]))?;
    }
    let rows = |title: &str, list: &Value, out: &mut dyn Write| -> anyhow::Result<()> {
        let list = list.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return Ok(());
        }
        writeln!(out, "{title}")?;
        for l in list {
            let what = [t(&l["service"]), t(&l["model"]), t(&l["key"])]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let price = match &l["unit_price"] {
                Value::Null => String::new(),
                p => format!("{} x {}", t(&l["quantity"]), t(p)),
            };
            writeln!(
                out,
                "  {what:<48} {price:>28} {:>16} {}",
                t(&l["amount"]),
                t(&l["currency"])
            )?;
        }
        Ok(())
    };
    rows("lines", &v["lines"], out)?;
    rows("adjustments", &v["adjustments"], out)?;
    for tax in v["taxes"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "tax {} {}% on {}: {} {}",
            t(&tax["name"]),
            t(&tax["rate_percent"]),
            t(&tax["base"]),
            t(&tax["amount"]),
            t(&tax["currency"])
        )?;
    }
    let children = v["children"].as_array().cloned().unwrap_or_default();
    if !children.is_empty() {
        writeln!(out, "by node")?;
        for c in children {
            let totals: Vec<String> = c["totals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{} {}", t(&x["subtotal"]), t(&x["currency"])))
                .collect();
            writeln!(out, "  {:<40} {}", t(&c["account"]), totals.join(", "))?;
        }
    }
    for x in v["totals"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "total {}: subtotal {}, tax {}, total {}",
            t(&x["currency"]),
            t(&x["subtotal"]),
            t(&x["tax"]),
            t(&x["total"])
        )?;
    }
    Ok(())
}

/// `ciyuan export KIND --account PATH --period 2026-11`
#[derive(Args)]
pub struct ExportArgs {
    /// usage (every billing line in Ciyuan's columns), focus (FOCUS 1.2, the FinOps
    /// Foundation's cost-and-usage format), journal (ERP vouchers for a month) or hr
    /// (usage and cost per node and day).
    kind: String,
    /// The node whose subtree is exported.
    #[arg(long)]
    account: String,
    /// A calendar month in the node's time zone, e.g. 2026-11.
    #[arg(long, required_unless_present = "from")]
    period: Option<String>,
    /// Or a range: from (RFC 3339, on a whole hour)...
    #[arg(long, requires = "to", conflicts_with = "period")]
    from: Option<String>,
    /// ...to (exclusive).
    #[arg(long)]
    to: Option<String>,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    output: Option<std::path::PathBuf>,
    /// Journal: generic, kingdee or u8.
    #[arg(long)]
    profile: Option<String>,
    /// Journal: utf8 (with a byte-order mark) or gbk.
    #[arg(long)]
    encoding: Option<String>,
    /// Journal: the expense account debited (default 6602).
    #[arg(long)]
    expense: Option<String>,
    /// Journal: the payable or prepaid account credited (default 2202).
    #[arg(long)]
    counter: Option<String>,
    /// Journal: the book's own currency (default CNY).
    #[arg(long)]
    base_currency: Option<String>,
    /// Journal: node, service or model (how finely expenses are broken down).
    #[arg(long)]
    detail: Option<String>,
    /// Journal, Kingdee: the account book code (账簿).
    #[arg(long)]
    book: Option<String>,
    /// Journal, Kingdee: the accounting organisation code (核算组织).
    #[arg(long)]
    org: Option<String>,
    /// Journal, U8: who prepared the vouchers (制单人).
    #[arg(long)]
    preparer: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

/// Runs `ciyuan export`: streams the server's CSV to a file or standard output.
pub fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut q = vec![format!("account={}", enc(&a.account))];
    if let Some(p) = &a.period {
        q.push(format!("period={}", enc(p)));
    }
    if let (Some(f), Some(t)) = (&a.from, &a.to) {
        q.push(format!("from={}&to={}", enc(f), enc(t)));
    }
    for (name, v) in [
        ("profile", &a.profile),
        ("encoding", &a.encoding),
        ("expense", &a.expense),
        ("counter", &a.counter),
        ("base_currency", &a.base_currency),
        ("detail", &a.detail),
        ("book", &a.book),
        ("org", &a.org),
        ("preparer", &a.preparer),
    ] {
        if let Some(v) = v {
            q.push(format!("{name}={}", enc(v)));
        }
    }
    let path = format!("/api/v1/exports/{}?{}", enc(&a.kind), q.join("&"));
    let client = Client::new(&a.remote)?;
    match &a.output {
        Some(file) => {
            // Written beside and renamed when whole: a cut transfer leaves no file that
            // looks complete.
            let part = file.with_extension("part");
            let mut out = std::io::BufWriter::new(std::fs::File::create(&part)?);
            let n = client.download(&path, &mut out)?;
            drop(out);
            std::fs::rename(&part, file)?;
            eprintln!("{n} bytes written to {}", file.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            client.download(&path, &mut out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ciyuan reconcile FILE --format openai|anthropic|csv --upstream NAME`
#[derive(Args)]
pub struct ReconcileArgs {
    /// The provider's usage export.
    file: std::path::PathBuf,
    /// openai (organization usage API, completions), anthropic (usage report,
    /// messages) or csv (day,model,input_tokens,output_tokens[,cached_input_tokens]).
    #[arg(long)]
    format: String,
    /// The upstream (provider name in the gateway's configuration) it is compared with.
    #[arg(long)]
    upstream: String,
    /// Relative tolerance, a fraction (default 0.01).
    #[arg(long)]
    relative: Option<String>,
    /// Absolute tolerance in tokens (default 0).
    #[arg(long)]
    absolute: Option<u64>,
    #[command(flatten)]
    remote: Remote,
}

/// Runs `ciyuan reconcile`.
pub fn reconcile(a: ReconcileArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut q = vec![
        format!("format={}", enc(&a.format)),
        format!("upstream={}", enc(&a.upstream)),
    ];
    if let Some(r) = &a.relative {
        q.push(format!("relative={}", enc(r)));
    }
    if let Some(n) = a.absolute {
        q.push(format!("absolute={n}"));
    }
    let v = Client::new(&a.remote)?.call_raw(
        Method::POST,
        &format!("/api/v1/reconciliations?{}", q.join("&")),
        "application/octet-stream",
        bytes,
    )?;
    let mut out = std::io::stdout().lock();
    if a.remote.json {
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let s = &v["summary"];
    writeln!(
        out,
        "{} rows compared with upstream {} (entry {}): {} beyond tolerance, {} only in the export, {} only recorded",
        t(&s["rows_compared"]),
        t(&v["upstream"]),
        t(&v["entry"]),
        t(&s["beyond_tolerance"]),
        t(&s["provider_only"]),
        t(&s["recorded_only"])
    )?;
    for f in v["findings"].as_array().into_iter().flatten() {
        if f["beyond_tolerance"] == true {
            writeln!(
                out,
                "  {} {} {}: provider {}, recorded {}, difference {}",
                t(&f["day"]),
                t(&f["model"]),
                t(&f["key"]),
                t(&f["provider"]),
                t(&f["recorded"]),
                t(&f["difference"])
            )?;
        }
    }
    Ok(if s["beyond_tolerance"].as_u64().unwrap_or(0) > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
