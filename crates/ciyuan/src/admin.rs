//! Admin subcommands: clients of the HTTP API, plus the offline audit verifier.

use crate::Remote;
use crate::client::{Client, enc};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AccountsCmd {
    /// Create a node (and any missing parents).
    Create {
        /// Path such as acme/cn/hr.
        path: String,
        /// A name for people.
        #[arg(long)]
        display_name: Option<String>,
        /// IANA time zone for days and months, e.g. Asia/Shanghai.
        #[arg(long)]
        time_zone: Option<String>,
        /// Metadata KEY=VALUE (repeatable), e.g. cost_center=CC-42.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a subtree, in path order: every node, a page at a time, or one page with
    /// --limit.
    List {
        /// Subtree (default: the key's own node).
        #[arg(long)]
        under: Option<String>,
        /// Only nodes after this path (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// One page of at most this many nodes (1 to 10000), with where the next begins.
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one node.
    Show {
        /// Path of the node.
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a key; it is shown once.
    Create {
        /// Node the key belongs to (`/` for the root).
        #[arg(long)]
        account: String,
        /// Comma-separated scopes: gateway, ingest, read, admin, audit.
        #[arg(long)]
        scopes: String,
        /// A label.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the keys of a subtree, in id order: every key, a page at a time, or one
    /// page with --limit.
    List {
        /// Subtree (default: the key's own node).
        #[arg(long)]
        account: Option<String>,
        /// Only keys after this id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// One page of at most this many keys (1 to 10000), with where the next begins.
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a key, effective at once.
    Revoke {
        /// The key id (the 12 hex digits after cy_).
        key_id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Args)]
pub struct UsageArgs {
    /// Subtree (default: the key's own node).
    #[arg(long)]
    account: Option<String>,
    /// Comma-separated: account, service, model.
    #[arg(long)]
    group_by: Option<String>,
    /// hour, day, month or none.
    #[arg(long)]
    bucket: Option<String>,
    /// Start, RFC 3339.
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive), RFC 3339.
    #[arg(long)]
    to: Option<String>,
    /// Time zone of days and months (default: the account's).
    #[arg(long)]
    tz: Option<String>,
    /// `cost`: the amounts of each row beside its tokens, per currency.
    #[arg(long)]
    with: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
pub struct AdjustArgs {
    /// Account whose usage is corrected.
    #[arg(long)]
    account: String,
    /// Service, e.g. llm.chat.
    #[arg(long)]
    service: String,
    /// Model.
    #[arg(long)]
    model: Option<String>,
    /// Why.
    #[arg(long)]
    reason: String,
    /// Token deltas, e.g. text.input=-120,text.output=-40.
    #[arg(long)]
    tokens: String,
    /// Id of the entry corrected.
    #[arg(long)]
    corrects: Option<u64>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print the latest signed checkpoint and the public key.
    Checkpoint {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print an inclusion proof of one entry, checkable by a third party.
    Prove {
        /// The entry id.
        entry_id: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Write entries, checkpoints and the public key to DIR as an audit bundle.
    Export {
        /// Output directory (created; must be empty).
        dir: PathBuf,
        /// Read the log straight from this PostgreSQL database instead of the server
        /// (no key needed: the database's own access control applies).
        #[arg(long)]
        database: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Verify a data directory, a bundle or a PostgreSQL database offline; exits 0 only
    /// if everything checks.
    Verify {
        /// A data directory, a ledger directory, an exported bundle, or a database URL
        /// (postgres://...: its log is read up to its newest signed checkpoint).
        path: PathBuf,
        /// Print the report as one JSON line.
        #[arg(long)]
        json: bool,
    },
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A listing the API answers a page at a time: rows under `field`, and `next`, the
/// `after` of the following page, on every page but the last.
struct Listing {
    /// The endpoint.
    path: &'static str,
    /// Where the rows are in each page.
    field: &'static str,
    /// Its own parameter (the subtree), encoded.
    query: Option<String>,
}

/// Writes one line of a listing.
type Line<'a> = &'a dyn Fn(&mut dyn Write, &Value) -> std::io::Result<()>;

impl Listing {
    fn url(&self, after: Option<&str>, limit: Option<u32>) -> String {
        let mut q: Vec<String> = self.query.iter().cloned().collect();
        if let Some(a) = after {
            q.push(format!("after={}", enc(a)));
        }
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        format!("{}?{}", self.path, q.join("&"))
    }

    /// Prints one page (`limit` given: as the server answered it with `--json`, else
    /// its rows and where the next page begins), or every page from `after` to the
    /// end, each written as it arrives so memory holds one page; `--json` then writes
    /// one document, `{field: [rows]}`.
    fn print(
        &self,
        client: &Client,
        after: Option<String>,
        limit: Option<u32>,
        json: bool,
        header: &dyn Fn(&mut dyn Write) -> std::io::Result<()>,
        line: Line<'_>,
    ) -> anyhow::Result<()> {
        if let Some(limit) = limit {
            let page = client.json(Method::GET, &self.url(after.as_deref(), Some(limit)), None)?;
            if json {
                return print_json(&page);
            }
            let mut out = std::io::stdout().lock();
            header(&mut out)?;
            for row in page[self.field].as_array().into_iter().flatten() {
                line(&mut out, row)?;
            }
            if let Some(n) = page.get("next").and_then(Value::as_str) {
                writeln!(out, "more: --after {n}")?;
            }
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        if json {
            write!(out, "{{\"{}\": [", self.field)?;
        } else {
            header(&mut out)?;
        }
        let mut after = after;
        let mut first = true;
        loop {
            let page = client.json(Method::GET, &self.url(after.as_deref(), None), None)?;
            for row in page[self.field].as_array().into_iter().flatten() {
                if json {
                    write!(out, "{}", if first { "\n  " } else { ",\n  " })?;
                    serde_json::to_writer(&mut out, row)?;
                    first = false;
                } else {
                    line(&mut out, row)?;
                }
            }
            let Some(next) = page.get("next").and_then(Value::as_str) else {
                break;
            };
            // A cursor that does not move would list the same page forever.
            if after.as_deref() == Some(next) {
                bail!("the server answered the page after {next} with the same next");
            }
            after = Some(next.to_string());
        }
        if json {
            writeln!(out, "{}]}}", if first { "" } else { "\n" })?;
        }
        Ok(())
    }
}

pub fn accounts(cmd: AccountsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AccountsCmd::Create {
            path,
            display_name,
            time_zone,
            meta,
            remote,
        } => {
            let mut metadata = BTreeMap::new();
            for m in meta {
                let (k, v) = m
                    .split_once('=')
                    .with_context(|| format!("--meta {m:?} is not KEY=VALUE"))?;
                metadata.insert(k.to_string(), v.to_string());
            }
            let mut body = json!({ "path": path, "metadata": metadata });
            if let Some(n) = display_name {
                body["display_name"] = json!(n);
            }
            if let Some(tz) = time_zone {
                body["time_zone"] = json!(tz);
            }
            let v = Client::new(&remote)?.json(Method::POST, "/api/v1/accounts", Some(&body))?;
            if remote.json {
                print_json(&v)?;
            } else {
                println!("created {}", str_of(&v, "path"));
            }
        }
        AccountsCmd::List {
            under,
            after,
            limit,
            remote,
        } => {
            let listing = Listing {
                path: "/api/v1/accounts",
                field: "accounts",
                query: under.map(|u| format!("under={}", enc(&u))),
            };
            listing.print(
                &Client::new(&remote)?,
                after,
                limit,
                remote.json,
                &|out| writeln!(out, "{:<40} {:<24} {:<20}", "PATH", "NAME", "TIME ZONE"),
                &|out, a| {
                    writeln!(
                        out,
                        "{:<40} {:<24} {:<20}",
                        str_of(a, "path"),
                        str_of(a, "display_name"),
                        str_of(a, "time_zone")
                    )
                },
            )?;
        }
        AccountsCmd::Show { path, remote } => {
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/accounts/{}", enc(&path)),
                None,
            )?;
            print_json(&v)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keys(cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            account,
            scopes,
            name,
            remote,
        } => {
            let scopes: Vec<&str> = scopes
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let mut body = json!({ "account": account, "scopes": scopes });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let v = Client::new(&remote)?.json(Method::POST, "/api/v1/keys", Some(&body))?;
            if remote.json {
                print_json(&v)?;
            } else {
                println!("{}", str_of(&v, "key"));
                eprintln!(
                    "key {} for {} ({}); shown once, store it now",
                    str_of(&v, "key_id"),
                    str_of(&v, "account"),
                    v["scopes"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default()
                );
            }
        }
        KeysCmd::List {
            account,
            after,
            limit,
            remote,
        } => {
            let listing = Listing {
                path: "/api/v1/keys",
                field: "keys",
                query: account.map(|a| format!("account={}", enc(&a))),
            };
            listing.print(
                &Client::new(&remote)?,
                after,
                limit,
                remote.json,
                &|out| {
                    writeln!(
                        out,
                        "{:<14} {:<30} {:<28} {:<10}",
                        "KEY ID", "ACCOUNT", "SCOPES", "STATE"
                    )
                },
                &|out, k| {
                    let scopes = k["scopes"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let state = if k.get("revoked_at").is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    writeln!(
                        out,
                        "{:<14} {:<30} {:<28} {:<10}",
                        str_of(k, "key_id"),
                        str_of(k, "account"),
                        scopes,
                        state
                    )
                },
            )?;
        }
        KeysCmd::Revoke { key_id, remote } => {
            let v = Client::new(&remote)?.json(
                Method::DELETE,
                &format!("/api/v1/keys/{}", enc(&key_id)),
                None,
            )?;
            if remote.json {
                print_json(&v)?;
            } else {
                println!(
                    "revoked {} at {}",
                    str_of(&v, "key_id"),
                    str_of(&v, "revoked_at")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn usage(a: UsageArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    for (k, v) in [
        ("account", &a.account),
        ("group_by", &a.group_by),
        ("bucket", &a.bucket),
        ("from", &a.from),
        ("to", &a.to),
        ("tz", &a.tz),
        ("with", &a.with),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(v)));
        }
    }
    let path = format!("/api/v1/usage?{}", q.join("&"));
    let v = Client::new(&a.remote)?.json(Method::GET, &path, None)?;
    if a.remote.json {
        return print_json(&v).map(|_| ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "usage of {} (time zone {})",
        str_of(&v, "account"),
        str_of(&v, "tz")
    )?;
    for r in v["rows"].as_array().into_iter().flatten() {
        let mut label = Vec::new();
        for k in ["bucket_start", "account", "service", "model"] {
            if let Some(s) = r.get(k).and_then(Value::as_str) {
                label.push(if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                });
            }
        }
        let tokens: Vec<String> = r["tokens"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        writeln!(
            out,
            "{:<60} total={:<12} {}{}",
            label.join("  "),
            r["total"],
            tokens.join(" "),
            costs(&r["cost"], " cost=")
        )?;
    }
    if let Some(t) = v.get("cost_totals") {
        writeln!(out, "cost in total:{}", costs(t, " "))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Amounts by currency (`{"USD": "4.5"}`) as ` USD 4.5`, each after `lead`.
fn costs(v: &Value, lead: &str) -> String {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(cur, amount)| format!("{lead}{} {cur}", amount.as_str().unwrap_or("?")))
        .collect()
}

pub fn adjust(a: AdjustArgs) -> anyhow::Result<ExitCode> {
    let mut tokens = serde_json::Map::new();
    for part in a.tokens.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, n) = part
            .split_once('=')
            .with_context(|| format!("--tokens {part:?} is not modality.direction=COUNT"))?;
        let n: i64 = n
            .parse()
            .with_context(|| format!("--tokens {part:?}: {n:?} is not an integer"))?;
        tokens.insert(k.to_string(), json!(n));
    }
    let mut body = json!({
        "account": a.account, "service": a.service, "reason": a.reason, "tokens": tokens,
    });
    if let Some(m) = a.model {
        body["model"] = json!(m);
    }
    if let Some(c) = a.corrects {
        body["corrects"] = json!(c);
    }
    let v = Client::new(&a.remote)?.json(Method::POST, "/api/v1/adjustments", Some(&body))?;
    if a.remote.json {
        print_json(&v)?;
    } else {
        println!("recorded adjustment as entry {}", v["entry_id"]);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audit(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Checkpoint { remote } => {
            let v = Client::new(&remote)?.json(Method::GET, "/api/v1/audit/checkpoint", None)?;
            if remote.json {
                print_json(&v)?;
            } else {
                print!("{}", str_of(&v, "checkpoint"));
                println!();
                println!("public key: {}", str_of(&v, "public_key"));
            }
        }
        AuditCmd::Prove { entry_id, remote } => {
            let v = Client::new(&remote)?.json(
                Method::GET,
                &format!("/api/v1/audit/entries/{entry_id}/proof"),
                None,
            )?;
            print_json(&v)?;
        }
        AuditCmd::Export {
            dir,
            database: Some(url),
            ..
        } => {
            let summary = export_database(&url, &dir)?;
            println!(
                "exported {} entries and {} checkpoints from the database to {}",
                summary.entries,
                summary.checkpoints,
                dir.display()
            );
        }
        AuditCmd::Export {
            dir,
            database: None,
            remote,
        } => {
            let client = Client::new(&remote)?;
            export(&client, &dir)?;
        }
        AuditCmd::Verify { path, json } => return verify(path, json),
    }
    Ok(ExitCode::SUCCESS)
}

/// Entries fetched per request while exporting.
const EXPORT_PAGE_ENTRIES: u64 = 10_000;
/// Checkpoints fetched per request while exporting (the server's maximum page).
const EXPORT_PAGE_CHECKPOINTS: u64 = 1000;

/// Streams the log into a bundle, page by page: memory stays small however long the
/// log and however many its checkpoints.
fn export(client: &Client, dir: &std::path::Path) -> anyhow::Result<()> {
    // Sign a checkpoint first so the bundle covers everything written so far.
    let latest = client.json(Method::POST, "/api/v1/audit/checkpoint", None)?;
    let size = latest["size"].as_u64().context("checkpoint without size")?;
    let mut bundle = ciyuan_ledger::BundleWriter::create(dir, str_of(&latest, "public_key"))
        .with_context(|| format!("writing the bundle to {}", dir.display()))?;
    let mut start = 0;
    while start < size {
        let limit = EXPORT_PAGE_ENTRIES.min(size - start);
        let page = client.call(
            Method::GET,
            &format!("/api/v1/audit/entries?start={start}&limit={limit}"),
            None,
        )?;
        let before = bundle.entries();
        for line in page.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if bundle.entries() == size {
                break;
            }
            bundle
                .entry(line)
                .with_context(|| format!("writing the bundle to {}", dir.display()))?;
        }
        if bundle.entries() == before {
            bail!("the server returned no entries from {start} on");
        }
        start = bundle.entries();
    }
    // Checkpoints signed after `latest` cover more entries than the bundle holds and
    // are left out by the writer.
    let mut cursor = Some(0u64);
    while let Some(at) = cursor {
        let page = client.json(
            Method::GET,
            &format!("/api/v1/audit/checkpoints?cursor={at}&limit={EXPORT_PAGE_CHECKPOINTS}"),
            None,
        )?;
        for c in page["checkpoints"].as_array().into_iter().flatten() {
            bundle
                .checkpoint(str_of(c, "checkpoint"))
                .with_context(|| format!("writing the bundle to {}", dir.display()))?;
        }
        cursor = page["next"].as_u64();
    }
    let summary = bundle
        .finish()
        .with_context(|| format!("writing the bundle to {}", dir.display()))?;
    println!(
        "exported {} entries and {} checkpoints to {}",
        summary.entries,
        summary.checkpoints,
        dir.display()
    );
    Ok(())
}

// Declared here rather than in main.rs: only `audit verify` uses it.
#[path = "audit_rules.rs"]
pub mod audit_rules;

/// Writes the log of a PostgreSQL database as a bundle in `dir`, read with the
/// verifier key the log recorded (no signing key).
fn export_database(
    url: &str,
    dir: &std::path::Path,
) -> anyhow::Result<ciyuan_ledger::BundleSummary> {
    let pool = ciyuan_store_postgres::Pool::connect(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    export_pool(pool, dir)?.map_err(|e| anyhow::anyhow!(e))
}

/// Writes the log of a connected database as a bundle. The inner error is the log
/// read out of the database (a stored checkpoint that does not verify, an entry
/// missing, or the connection failing midway); the outer one writing the bundle here.
fn export_pool(
    pool: ciyuan_store_postgres::Pool,
    dir: &std::path::Path,
) -> anyhow::Result<Result<ciyuan_ledger::BundleSummary, String>> {
    let log = match ciyuan_store_postgres::PgLog::open_reader(pool) {
        Ok(log) => log,
        Err(e) => return Ok(Err(format!("the log in the database: {e}"))),
    };
    match ciyuan_ledger::export_log(&log, dir) {
        Ok(summary) => Ok(Ok(summary)),
        Err(e @ ciyuan_ledger::LedgerError::Io { .. }) => Err(anyhow::anyhow!(
            "writing the bundle in {}: {e}",
            dir.display()
        )),
        Err(e) => Ok(Err(format!("the log in the database: {e}"))),
    }
}

fn verify(path: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    // A database: its log is copied out as a bundle (entries up to the newest
    // checkpoint) and the bundle verified like any other, so the same code judges both.
    let text = path.to_string_lossy().into_owned();
    let database = text.starts_with("postgres://")
        || text.starts_with("postgresql://")
        || (text.contains("host=") && !path.exists());
    if database {
        let tmp = tempfile::tempdir()?;
        let bundle = tmp.path().join("bundle");
        // A database that cannot be reached is an error (exit 2); a log that cannot be
        // read out of it (a stored checkpoint that does not verify, an entry missing)
        // fails the verification (exit 1), as the same fault in a directory does.
        let pool =
            ciyuan_store_postgres::Pool::connect(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Err(why) = export_pool(pool, &bundle)? {
            if json {
                println!("{}", json!({ "ok": false, "error": why, "entry": null }));
            }
            eprintln!("verification FAILED: {why}");
            return Ok(ExitCode::from(1));
        }
        return verify(bundle, json);
    }
    // A data directory holds the ledger in `ledger/`.
    let target = if path.join("ledger").is_dir() {
        path.join("ledger")
    } else {
        path
    };
    match audit_rules::verify(&target) {
        Ok((report, rules)) => {
            if json {
                println!(
                    "{}",
                    json!({
                        "ok": true,
                        "entries": report.entries,
                        "checkpoints": report.checkpoints,
                        "size": report.size,
                        "root_hash": base64_hash(&report.root),
                        "postings": rules.postings,
                        "rated": rules.rated,
                        "rated_basis_as_recorded": rules.rated_basis_as_recorded,
                        "defined": rules.defined,
                        "corrections": rules.corrections,
                        "placed": rules.placed,
                    })
                );
            } else {
                println!(
                    "ok: {} entries, {} checkpoints verified; root {} at size {}",
                    report.entries,
                    report.checkpoints,
                    base64_hash(&report.root),
                    report.size
                );
                println!(
                    "rules: {} postings balanced and replayed through the wallets; {} ratings follow their books ({} with the recount basis taken as recorded; {} of them by corrections, each matching the entry it re-rates; {} placed on their tier counters in log order); {} entries name the definition in force",
                    rules.postings,
                    rules.rated,
                    rules.rated_basis_as_recorded,
                    rules.corrections,
                    rules.placed,
                    rules.defined
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            if json {
                println!(
                    "{}",
                    json!({ "ok": false, "error": failure.to_string(), "entry": failure.entry })
                );
            }
            eprintln!("verification FAILED: {failure}");
            Ok(ExitCode::from(1))
        }
    }
}

pub(crate) fn base64_hash(h: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(h)
}
