//! `ciyuan prices`, `ciyuan contracts` and `ciyuan wallets`: clients of
//! `/api/v1/prices`, `/api/v1/contracts/{path}` and `/api/v1/wallets/{path}`.
//!
//! Amounts go to the server as the exact text the user typed: they are checked here
//! only so a typo is named before a request is sent, never converted.

use crate::Remote;
use crate::client::{Client, enc};
use anyhow::{Context, bail};
use ciyuan_core::{Currency, ExactSum, parse_amount};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The formats `prices import` reads.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriceFormat {
    /// LiteLLM's `model_prices_and_context_window.json`.
    Litellm,
    /// Ciyuan's own TOML book.
    Toml,
}

impl PriceFormat {
    fn name(self) -> &'static str {
        match self {
            PriceFormat::Litellm => "litellm",
            PriceFormat::Toml => "toml",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            PriceFormat::Litellm => "application/json",
            PriceFormat::Toml => "application/toml",
        }
    }
}

/// `ciyuan prices ...`
#[derive(Subcommand)]
pub enum PricesCmd {
    /// Record a price file as the next version of a book (root admin key).
    Import {
        /// litellm or toml.
        #[arg(long, value_enum)]
        format: PriceFormat,
        /// The file.
        file: PathBuf,
        /// The book's name (default: the file's own, else `list`, which prices
        /// every node without a contract).
        #[arg(long)]
        name: Option<String>,
        /// From when this version prices usage, RFC 3339 (default: now).
        #[arg(long)]
        effective_from: Option<String>,
        /// The version corrects prices of the past: --effective-from may be before
        /// now (at or after the latest version's). Entries keep their ratings until
        /// `prices rerate` appends their corrections.
        #[arg(long)]
        correct: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Re-rate a period's usage with the prices in force now for its time,
    /// appending a correction for each entry whose rating changes (root admin key).
    Rerate {
        /// Usage from this time, RFC 3339 (inclusive).
        #[arg(long)]
        from: String,
        /// Until this time, RFC 3339 (exclusive; default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only this node's subtree.
        #[arg(long)]
        account: Option<String>,
        /// Only entries rated by this book.
        #[arg(long)]
        book: Option<String>,
        /// Show what would change, append nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Every version of every book.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// One version of a book, rule by rule.
    Show {
        /// The book, e.g. list.
        name: String,
        /// The version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// Only the rules whose model pattern matches this model, in the order they
        /// are tried (the first one prices it).
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// What changed between two versions of a book.
    Diff {
        /// The book.
        name: String,
        /// The older version.
        #[arg(long)]
        from: u32,
        /// The newer version (default: the latest).
        #[arg(long)]
        to: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
}

/// `ciyuan contracts ...`
#[derive(Subcommand)]
pub enum ContractsCmd {
    /// Set a node's contract (whole), from a key strictly above the node; its
    /// subtree inherits it unless a nearer node has its own.
    Set {
        /// The node, e.g. acme/cn.
        path: String,
        /// The book its usage is priced with.
        #[arg(long, required_unless_present = "file")]
        book: Option<String>,
        /// Percent taken off each entry's amount, e.g. 10.
        #[arg(long)]
        discount: Option<String>,
        /// Percent added on (resale), after the discount, e.g. 5.
        #[arg(long)]
        markup: Option<String>,
        /// A contract as JSON (`book`, `discount_percent`, `markup_percent`,
        /// `overrides`, `minimum_commitment`); the flags replace its fields.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// The contract that prices a node's usage (its own or its nearest ancestor's).
    Show {
        /// The node.
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// `ciyuan wallets ...`
#[derive(Subcommand)]
pub enum WalletsCmd {
    /// Record money paid in to a node's wallet.
    Topup {
        /// The node.
        path: String,
        /// The amount, e.g. 100 or 12.50.
        #[arg(long)]
        amount: String,
        /// ISO 4217 code, e.g. CNY or USD.
        #[arg(long)]
        currency: String,
        /// A note kept with the posting (an invoice number).
        #[arg(long)]
        memo: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Give a node free credits, spent before its cash.
    Grant {
        /// The node.
        path: String,
        /// The amount.
        #[arg(long)]
        amount: String,
        /// ISO 4217 code.
        #[arg(long)]
        currency: String,
        /// The grant's id (letters, digits, '-', '_', '.').
        #[arg(long)]
        id: String,
        /// Grants of higher priority are spent first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// When the unused rest expires, RFC 3339.
        #[arg(long)]
        expires: Option<String>,
        /// A note kept with the posting.
        #[arg(long)]
        memo: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Give money back to a node's wallet.
    Refund {
        /// The node.
        path: String,
        /// The amount.
        #[arg(long)]
        amount: String,
        /// ISO 4217 code.
        #[arg(long)]
        currency: String,
        /// A note kept with the posting.
        #[arg(long)]
        memo: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Move money from one node's wallet to another's.
    Transfer {
        /// The node paying.
        from: String,
        /// The node receiving.
        #[arg(long)]
        to: String,
        /// The amount.
        #[arg(long)]
        amount: String,
        /// ISO 4217 code.
        #[arg(long)]
        currency: String,
        /// A note kept with the posting.
        #[arg(long)]
        memo: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// How far below zero a node's wallet may spend (0: it stops at zero).
    Overdraft {
        /// The node.
        path: String,
        /// ISO 4217 code.
        #[arg(long)]
        currency: String,
        /// The overdraft, e.g. 50.
        #[arg(long)]
        amount: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// A node's wallets: balance, reserved by requests in flight, available, grants.
    Show {
        /// The node.
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// A node's postings, oldest first, a page at a time.
    History {
        /// The node.
        path: String,
        /// Only postings after this entry (the `next` of the previous page).
        #[arg(long)]
        after: Option<u64>,
        /// Postings per page.
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
}

fn print_json(v: &Value) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// A field as text: strings without their quotes, `-` when absent.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// `1 rule`, `2 rules`.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Checks a typed amount so a typo is named before anything is sent; the text
/// itself is what is sent.
fn check_amount(flag: &str, text: &str) -> anyhow::Result<()> {
    parse_amount(flag, text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if text.starts_with('-') {
        bail!(
            "{flag}: {text:?} is negative; amounts are positive (a refund or transfer moves money the other way)"
        );
    }
    Ok(())
}

fn check_currency(flag: &str, text: &str) -> anyhow::Result<()> {
    text.parse::<Currency>()
        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    Ok(())
}

/// Runs a `prices` subcommand.
pub fn prices(cmd: PricesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PricesCmd::Import {
            format,
            file,
            name,
            effective_from,
            correct,
            remote,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut q = vec![format!("format={}", format.name())];
            if let Some(n) = &name {
                q.push(format!("name={}", enc(n)));
            }
            if let Some(t) = &effective_from {
                q.push(format!("effective_from={}", enc(t)));
            }
            if correct {
                q.push("correct=true".into());
            }
            let v = Client::new(&remote)?.call_raw(
                Method::POST,
                &format!("/api/v1/prices?{}", q.join("&")),
                format.content_type(),
                bytes,
            )?;
            if remote.json {
                return print_json(&v);
            }
            print_import(&v)?;
        }
        PricesCmd::Rerate {
            from,
            to,
            account,
            book,
            dry_run,
            remote,
        } => {
            let body = serde_json::json!({
                "from": from,
                "to": to,
                "account": account,
                "book": book,
                "dry_run": dry_run,
            });
            let v =
                Client::new(&remote)?.json(Method::POST, "/api/v1/prices/rerate", Some(&body))?;
            if remote.json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            let verb = if dry_run {
                "would correct"
            } else {
                "corrected"
            };
            writeln!(
                out,
                "usage from {} to {}: {} rated entries read, {verb} {}{}",
                text(&v["from"]),
                text(&v["to"]),
                text(&v["examined"]),
                text(&v["corrected"]),
                match &v["entries"] {
                    serde_json::Value::Null => String::new(),
                    e => format!(" (entries {} to {})", text(&e["first"]), text(&e["last"])),
                }
            )?;
            if v["not_rerated"].as_u64().is_some_and(|n| n > 0) {
                writeln!(
                    out,
                    "  {} left as they are: no book, or no rule prices them now",
                    text(&v["not_rerated"])
                )?;
            }
            for c in v["currencies"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "  {}: {} before, {} now, change {}",
                    text(&c["currency"]),
                    text(&c["previous"]),
                    text(&c["now"]),
                    text(&c["change"])
                )?;
            }
        }
        PricesCmd::List { remote } => {
            let v = Client::new(&remote)?.json(Method::GET, "/api/v1/prices", None)?;
            if remote.json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<16} {:>7} {:<8} {:>6} {:<28} {:>8}  SOURCE",
                "BOOK", "VERSION", "CURRENCY", "RULES", "EFFECTIVE FROM", "ENTRY"
            )?;
            for b in v["books"].as_array().into_iter().flatten() {
                let source = match b.get("source") {
                    Some(s) if !s.is_null() => format!(
                        "{} sha256:{}",
                        text(&s["format"]),
                        text(&s["sha256"]).get(..12).unwrap_or("")
                    ),
                    _ => "-".to_string(),
                };
                writeln!(
                    out,
                    "{:<16} {:>7} {:<8} {:>6} {:<28} {:>8}  {}",
                    text(&b["name"]),
                    text(&b["version"]),
                    text(&b["currency"]),
                    text(&b["rules"]),
                    text(&b["effective_from"]),
                    text(&b["entry"]),
                    source
                )?;
            }
        }
        PricesCmd::Show {
            name,
            version,
            model,
            remote,
        } => {
            let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/prices/{}{q}", enc(&name)),
                None,
            )?;
            if remote.json {
                return print_json(&v);
            }
            print_book(&v, model.as_deref())?;
        }
        PricesCmd::Diff {
            name,
            from,
            to,
            remote,
        } => {
            let mut q = format!("from={from}");
            if let Some(t) = to {
                q.push_str(&format!("&to={t}"));
            }
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/prices/{}/diff?{q}", enc(&name)),
                None,
            )?;
            if remote.json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            let changes = v["changes"].as_array().cloned().unwrap_or_default();
            writeln!(
                out,
                "book {} from version {} to {}: {}",
                text(&v["name"]),
                text(&v["from"]),
                text(&v["to"]),
                counted(changes.len(), "change")
            )?;
            for c in &changes {
                writeln!(out, "  {}", text(c))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_import(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "recorded book {} version {} ({}, {}, effective from {}) as entry {}",
        text(&v["name"]),
        text(&v["version"]),
        text(&v["currency"]),
        counted(v["rules"].as_u64().unwrap_or(0) as usize, "rule"),
        text(&v["effective_from"]),
        text(&v["entry"]),
    )?;
    let r = &v["rounding"];
    writeln!(
        out,
        "rounding: each entry's amount to {} places, {}",
        text(&r["to"]),
        text(&r["mode"])
    )?;
    let source = &v["source"];
    writeln!(
        out,
        "source: {} file, sha256 {}",
        text(&source["format"]),
        text(&source["sha256"])
    )?;
    let unmapped = source["unmapped"].as_array().cloned().unwrap_or_default();
    if unmapped.is_empty() {
        writeln!(out, "every price key of the file was mapped")?;
    } else {
        writeln!(out, "{} keys of the file not mapped:", unmapped.len())?;
        for k in &unmapped {
            writeln!(out, "  {}", text(k))?;
        }
    }
    Ok(())
}

/// One line per rule: its match, then its prices.
fn print_book(v: &Value, model: Option<&str>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "book {} version {} ({}), effective from {}, entry {}",
        text(&v["name"]),
        text(&v["version"]),
        text(&v["currency"]),
        text(&v["effective_from"]),
        text(&v["entry"]),
    )?;
    let rules = v["rules"].as_array().cloned().unwrap_or_default();
    let shown: Vec<&Value> = rules
        .iter()
        .filter(|r| match (model, r["model"].as_str()) {
            (None, _) => true,
            (Some(m), Some(pattern)) => ciyuan_core::wildcard_match(pattern, m),
            (Some(_), None) => false,
        })
        .collect();
    match model {
        Some(m) => writeln!(
            out,
            "{} of {} rules match model {m} (the first one of the entry's tier prices it); prices per unit:",
            shown.len(),
            rules.len()
        )?,
        None => writeln!(out, "{}; prices per unit:", counted(rules.len(), "rule"))?,
    }
    for r in shown {
        writeln!(out, "  {}", rule_line(r))?;
    }
    Ok(())
}

fn rule_line(r: &Value) -> String {
    let mut parts = vec![r["model"].as_str().unwrap_or("(no model)").to_string()];
    if let Some(s) = r["service"].as_str() {
        parts.push(format!("service={s}"));
    }
    if let Some(t) = r["tier"].as_str() {
        parts.push(format!("tier={t}"));
    }
    for (k, p) in r["unit_prices"].as_object().into_iter().flatten() {
        parts.push(format!("{k}={}", text(p)));
    }
    if let Some(p) = r.get("per_request").filter(|p| !p.is_null()) {
        parts.push(format!("per_request={}", text(p)));
    }
    for t in r["above_input_tokens"].as_array().into_iter().flatten() {
        let prices: Vec<String> = t["unit_prices"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, p)| format!("{k}={}", text(p)))
            .collect();
        parts.push(format!(
            "[above {} input tokens: {}]",
            text(&t["input_tokens"]),
            prices.join(" ")
        ));
    }
    if let Some(t) = r.get("tiers").filter(|t| !t.is_null()) {
        parts.push(format!(
            "[{} tiers per {}, {} bands]",
            text(&t["kind"]),
            text(&t["period"]),
            t["bands"].as_array().map_or(0, Vec::len)
        ));
    }
    if let Some(w) = r["windows"].as_array().filter(|w| !w.is_empty()) {
        parts.push(format!("[{} time windows]", w.len()));
    }
    parts.join("  ")
}

/// Runs a `contracts` subcommand.
pub fn contracts(cmd: ContractsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ContractsCmd::Set {
            path,
            book,
            discount,
            markup,
            file,
            remote,
        } => {
            let body = contract_body(book, discount, markup, file)?;
            let v = Client::new(&remote)?.json(
                Method::PUT,
                &format!("/api/v1/contracts/{}", enc(&path)),
                Some(&body),
            )?;
            if remote.json {
                return print_json(&v);
            }
            let c = &v["contract"];
            println!(
                "set the contract of {} as entry {}: {}",
                text(&v["account"]),
                text(&v["entry"]),
                contract_terms(c)
            );
        }
        ContractsCmd::Show { path, remote } => {
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/contracts/{}", enc(&path)),
                None,
            )?;
            if remote.json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            match v.get("from").filter(|f| !f.is_null()) {
                Some(from) if *from == v["account"] => writeln!(
                    out,
                    "{} is priced by its own contract: {}",
                    text(&v["account"]),
                    contract_terms(&v["contract"])
                )?,
                Some(from) => writeln!(
                    out,
                    "{} is priced by the contract of {}: {}",
                    text(&v["account"]),
                    text(from),
                    contract_terms(&v["contract"])
                )?,
                None => writeln!(
                    out,
                    "{} has no contract on its path: priced with book {} at list price",
                    text(&v["account"]),
                    text(&v["book"])
                )?,
            }
            for r in v["contract"]["overrides"].as_array().into_iter().flatten() {
                writeln!(out, "  override {}", rule_line(r))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The contract to send: the file's (if any) with the flags' fields put in.
fn contract_body(
    book: Option<String>,
    discount: Option<String>,
    markup: Option<String>,
    file: Option<PathBuf>,
) -> anyhow::Result<Value> {
    let mut body = match &file {
        Some(f) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let v: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not JSON", f.display()))?;
            if !v.is_object() {
                bail!("{}: a contract is a JSON object", f.display());
            }
            v
        }
        None => json!({}),
    };
    if let Some(b) = book {
        body["book"] = json!(b);
    }
    for (flag, field, value) in [
        ("--discount", "discount_percent", discount),
        ("--markup", "markup_percent", markup),
    ] {
        if let Some(p) = value {
            check_amount(flag, &p)?;
            body[field] = json!(p);
        }
    }
    if body.get("book").is_none() {
        bail!("a contract names its book: pass --book or put \"book\" in the file");
    }
    Ok(body)
}

fn contract_terms(c: &Value) -> String {
    let mut terms = vec![format!("book {}", text(&c["book"]))];
    if let Some(d) = c.get("discount_percent").filter(|d| !d.is_null()) {
        terms.push(format!("{}% off", text(d)));
    }
    if let Some(m) = c.get("markup_percent").filter(|m| !m.is_null()) {
        terms.push(format!("{}% markup", text(m)));
    }
    if let Some(o) = c["overrides"].as_array().filter(|o| !o.is_empty()) {
        terms.push(counted(o.len(), "overriding rule"));
    }
    if let Some(m) = c.get("minimum_commitment").filter(|m| !m.is_null()) {
        terms.push(format!(
            "minimum {} per {}",
            text(&m["amount"]),
            text(&m["period"])
        ));
    }
    terms.join(", ")
}

/// Runs a `wallets` subcommand.
pub fn wallets(cmd: WalletsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WalletsCmd::Topup {
            path,
            amount,
            currency,
            memo,
            remote,
        } => post(&remote, &path, "topup", &amount, &currency, memo, |_| {}),
        WalletsCmd::Refund {
            path,
            amount,
            currency,
            memo,
            remote,
        } => post(&remote, &path, "refund", &amount, &currency, memo, |_| {}),
        WalletsCmd::Grant {
            path,
            amount,
            currency,
            id,
            priority,
            expires,
            memo,
            remote,
        } => post(&remote, &path, "grant", &amount, &currency, memo, |b| {
            let mut grant = json!({"id": id, "priority": priority});
            if let Some(t) = expires {
                grant["expires_at"] = json!(t);
            }
            b["grant"] = grant;
        }),
        WalletsCmd::Transfer {
            from,
            to,
            amount,
            currency,
            memo,
            remote,
        } => post(&remote, &from, "transfer", &amount, &currency, memo, |b| {
            b["to"] = json!(to);
        }),
        WalletsCmd::Overdraft {
            path,
            currency,
            amount,
            remote,
        } => {
            check_amount("--amount", &amount)?;
            check_currency("--currency", &currency)?;
            let v = Client::new(&remote)?.json(
                Method::PUT,
                &format!("/api/v1/wallets/{}/settings", enc(&path)),
                Some(&json!({"currency": currency, "overdraft": amount})),
            )?;
            if remote.json {
                return print_json(&v);
            }
            println!(
                "{path} may spend {amount} {currency} below zero (entry {})",
                text(&v["entry"])
            );
            if v["wallet"].is_object() {
                println!("  {}", wallet_line(&v["wallet"]));
            }
            Ok(ExitCode::SUCCESS)
        }
        WalletsCmd::Show { path, remote } => {
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/wallets/{}?limit=1", enc(&path)),
                None,
            )?;
            if remote.json {
                return print_json(&v);
            }
            print_wallets(&v)?;
            Ok(ExitCode::SUCCESS)
        }
        WalletsCmd::History {
            path,
            after,
            limit,
            remote,
        } => {
            let mut q = Vec::new();
            if let Some(a) = after {
                q.push(format!("after={a}"));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/wallets/{}?{}", enc(&path), q.join("&")),
                None,
            )?;
            if remote.json {
                return print_json(&v);
            }
            print_history(&v)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `POST /api/v1/wallets/{path}` with one movement.
fn post(
    remote: &Remote,
    path: &str,
    kind: &str,
    amount: &str,
    currency: &str,
    memo: Option<String>,
    extra: impl FnOnce(&mut Value),
) -> anyhow::Result<ExitCode> {
    check_amount("--amount", amount)?;
    check_currency("--currency", currency)?;
    let mut body = json!({"kind": kind, "amount": amount, "currency": currency});
    if let Some(m) = memo {
        body["memo"] = json!(m);
    }
    extra(&mut body);
    let v = Client::new(remote)?.json(
        Method::POST,
        &format!("/api/v1/wallets/{}", enc(path)),
        Some(&body),
    )?;
    if remote.json {
        return print_json(&v);
    }
    println!(
        "recorded {kind} of {amount} {currency} on {path} as entry {}",
        text(&v["entry"])
    );
    let w = &v["wallet"];
    if w.is_object() {
        println!("  {}", wallet_line(w));
    }
    Ok(ExitCode::SUCCESS)
}

fn wallet_line(w: &Value) -> String {
    let mut line = format!(
        "{} {}: balance {} (cash {}), reserved {}, available {}",
        text(&w["node"]),
        text(&w["currency"]),
        text(&w["balance"]),
        text(&w["cash"]),
        text(&w["reserved"]),
        text(&w["available"]),
    );
    if let Some(o) = w.get("overdraft").filter(|o| !o.is_null()) {
        line.push_str(&format!(", overdraft {}", text(o)));
    }
    line
}

fn print_wallets(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let wallets = v["wallets"].as_array().cloned().unwrap_or_default();
    if wallets.is_empty() {
        writeln!(out, "{} has no wallet", text(&v["account"]))?;
    }
    for w in &wallets {
        writeln!(out, "{}", wallet_line(w))?;
        for g in w["grants"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "  grant {} (priority {}, {}): balance {}, reserved {}",
                text(&g["id"]),
                text(&g["priority"]),
                match g["expires_at"].as_str() {
                    Some(t) => format!("expires {t}"),
                    None => "never expires".to_string(),
                },
                text(&g["balance"]),
                text(&g["reserved"]),
            )?;
        }
    }
    Ok(())
}

/// What a movement did to `node`'s own wallet accounts (`node:cash`,
/// `node:grant:ID`): their credits less their debits, exactly.
pub fn effect_on(node: &str, movement: &Value) -> anyhow::Result<ExactSum> {
    let prefix = format!("{node}:");
    let mut sum = ExactSum::ZERO;
    for leg in movement["legs"].as_array().into_iter().flatten() {
        let account = leg["account"].as_str().unwrap_or("");
        if !account.starts_with(&prefix) {
            continue;
        }
        for (side, sign) in [("credit", false), ("debit", true)] {
            let Some(t) = leg.get(side).and_then(Value::as_str) else {
                continue;
            };
            let d = parse_amount(side, t).map_err(|e| anyhow::anyhow!("{account}: {e}"))?;
            let d = if sign { -d } else { d };
            sum = sum
                .checked_add(ExactSum::of(d))
                .with_context(|| format!("the movements of {node} sum beyond ±1.7e38"))?;
        }
    }
    Ok(sum)
}

fn print_history(v: &Value) -> anyhow::Result<()> {
    let node = text(&v["account"]);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>8}  {:<30} {:<9} {:>18} {:<4}  MEMO",
        "ENTRY", "TIME", "KIND", "ON THE WALLET", "CUR"
    )?;
    for m in v["movements"].as_array().into_iter().flatten() {
        let effect = effect_on(&node, m)?;
        writeln!(
            out,
            "{:>8}  {:<30} {:<9} {:>18} {:<4}  {}",
            text(&m["entry"]),
            text(&m["ts"]),
            text(&m["kind"]),
            effect.to_string(),
            text(&m["currency"]),
            m["memo"].as_str().unwrap_or(""),
        )?;
    }
    if let Some(n) = v.get("next").filter(|n| !n.is_null()) {
        writeln!(out, "more: --after {}", text(n))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_movement_counts_only_the_nodes_own_accounts() {
        let m = json!({"legs": [
            {"account": "acme/a:cash", "debit": "1.25"},
            {"account": "acme/a:grant:g1", "debit": "0.0000000001"},
            {"account": "acme/ab:cash", "debit": "100"},
            {"account": "@revenue", "credit": "1.2500000001"},
        ]});
        assert_eq!(
            effect_on("acme/a", &m).unwrap().to_string(),
            "-1.2500000001"
        );
        let topup = json!({"legs": [
            {"account": "@payments", "debit": "2.5e-1"},
            {"account": "acme/a:cash", "credit": "2.5e-1"},
        ]});
        assert_eq!(effect_on("acme/a", &topup).unwrap().to_string(), "0.25");
    }

    #[test]
    fn a_bad_amount_in_a_leg_is_named() {
        let m = json!({"legs": [{"account": "acme/a:cash", "credit": "1,5"}]});
        let e = effect_on("acme/a", &m).unwrap_err().to_string();
        assert!(e.contains("acme/a:cash") && e.contains("1,5"), "{e}");
    }

    #[test]
    fn typed_amounts_are_checked_and_sent_as_typed() {
        assert!(check_amount("--amount", "100").is_ok());
        assert!(check_amount("--amount", "0.000001").is_ok());
        let e = check_amount("--amount", "1O0").unwrap_err().to_string();
        assert!(e.contains("--amount") && e.contains("1O0"), "{e}");
        let e = check_amount("--amount", "-5").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        let e = check_currency("--currency", "usd").unwrap_err().to_string();
        assert!(e.contains("--currency") && e.contains("usd"), "{e}");
        let body = contract_body(Some("list".into()), Some("10.50".into()), None, None).unwrap();
        assert_eq!(body, json!({"book": "list", "discount_percent": "10.50"}));
    }

    #[test]
    fn a_contract_file_is_completed_by_the_flags() {
        let dir = std::env::temp_dir().join(format!("ciyuan-contract-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"book": "list", "markup_percent": "5", "overrides": []}"#,
        )
        .unwrap();
        let body = contract_body(None, Some("10".into()), None, Some(f.clone())).unwrap();
        assert_eq!(
            body,
            json!({"book": "list", "markup_percent": "5", "discount_percent": "10", "overrides": []})
        );
        std::fs::write(&f, r#"{"markup_percent": "5"}"#).unwrap();
        let e = contract_body(None, None, None, Some(f.clone())).unwrap_err();
        assert!(e.to_string().contains("--book"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
