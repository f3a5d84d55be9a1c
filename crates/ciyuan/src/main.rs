//! `ciyuan`: the ledger for AI-service tokens.
//!
//! `serve` runs the server; the admin subcommands are clients of its HTTP API, so they
//! work the same against a local server and a remote cluster; `audit verify`,
//! `rebuild` and `bench` work on files.

mod admin;
mod bench;
mod bench_admission;
mod bench_console;
mod bench_finance;
mod bench_gateway;
mod bench_ingest;
mod bench_tokens;
mod budgets;
mod client;
mod config;
mod demo;
mod finance;
mod ingest;
mod money;
mod open_loop;
mod reports;
mod serve;
mod service_levels;
mod sim;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ciyuan", version, about = "The ledger for AI-service tokens", long_about = None)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "CIYUAN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How admin subcommands reach the server.
#[derive(Args, Clone)]
pub struct Remote {
    /// Base URL of the Ciyuan server.
    #[arg(long, env = "CIYUAN_URL", default_value = "http://127.0.0.1:8787")]
    url: String,
    /// API key to authenticate with.
    #[arg(long, env = "CIYUAN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on the embedded default storage.
    Serve(serve::ServeArgs),
    /// Manage the account tree.
    #[command(subcommand)]
    Accounts(admin::AccountsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(admin::KeysCmd),
    /// Send a file of CloudEvents (one per line) to the ingest API.
    Ingest(ingest::IngestArgs),
    /// Query token usage.
    Usage(admin::UsageArgs),
    /// Limits on account nodes: set, show (live), clear.
    #[command(subcommand)]
    Budgets(budgets::BudgetsCmd),
    /// Model access rules on account nodes.
    #[command(subcommand)]
    Access(budgets::AccessCmd),
    /// Price books: import (LiteLLM or TOML), list, show, diff.
    #[command(subcommand)]
    Prices(money::PricesCmd),
    /// Price contracts of account nodes: a book, discounts, markups, overrides.
    #[command(subcommand)]
    Contracts(money::ContractsCmd),
    /// Prepaid wallets: top-ups, grants, refunds, transfers, overdraft, balances.
    #[command(subcommand)]
    Wallets(money::WalletsCmd),
    /// A node's statement for a month (or a range), with a subtotal per child node;
    /// --close issues it and closes the month.
    Statement(finance::StatementArgs),
    /// Stream a finance export of a subtree: usage, focus (FOCUS 1.2) or journal
    /// (ERP vouchers: generic, Kingdee, Yonyou U8).
    Export(finance::ExportArgs),
    /// Compare a provider's usage export with what the gateway recorded for an
    /// upstream (exit 1 when a difference is beyond tolerance).
    Reconcile(finance::ReconcileArgs),
    /// Service quality per upstream and model of a subtree's gateway requests:
    /// latency and TTFT percentiles, tokens/s, error, cut-stream and discrepancy rates.
    Quality(service_levels::QualityArgs),
    /// Contracts' service levels evaluated per month, with the credits they owe.
    #[command(subcommand)]
    ServiceLevels(service_levels::ServiceLevelsCmd),
    /// Scheduled usage and cost reports: list them, or deliver a period by hand.
    #[command(subcommand)]
    Reports(reports::ReportsCmd),
    /// Record a correction of earlier usage.
    Adjust(admin::AdjustArgs),
    /// Checkpoints, proofs, bundles and offline verification.
    #[command(subcommand)]
    Audit(admin::AuditCmd),
    /// Migrate a data directory to this build and recover its ledger (server stopped),
    /// or copy it into PostgreSQL (--from DIR --to postgres://...).
    Migrate(serve::MigrateArgs),
    /// Rebuild the projections from the ledger alone (server stopped).
    Rebuild(serve::RebuildArgs),
    /// Count the tokens of a text with a model's own tokenizer.
    Count(CountArgs),
    /// Run the simulated LLM provider (OpenAI and Anthropic shapes, real token counts).
    Sim(sim::SimArgs),
    /// Measure the ledger.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

#[derive(Args)]
struct CountArgs {
    /// The model, e.g. gpt-4o, qwen-max, deepseek-chat (picks its tokenizer).
    #[arg(long, required_unless_present = "encoding")]
    model: Option<String>,
    /// Name the encoding directly: o200k_base, cl100k_base, qwen, qwen3_6, deepseek_v4.
    #[arg(long)]
    encoding: Option<String>,
    /// Count an image of WIDTHxHEIGHT pixels with the model's image formula
    /// (repeatable; without a FILE only the images are counted).
    #[arg(long, value_name = "WxH")]
    image: Vec<String>,
    /// Image detail: low, high or auto (OpenAI models).
    #[arg(long, default_value = "auto")]
    detail: String,
    /// The text file (`-` for standard input; standard input too when no FILE and no --image).
    file: Option<PathBuf>,
}

/// `ciyuan count`: the count alone on standard output.
fn count(config: Option<&std::path::Path>, a: CountArgs) -> anyhow::Result<ExitCode> {
    if !a.image.is_empty() {
        let model = a
            .model
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--image needs --model (the formula depends on it)"))?;
        let detail = match a.detail.as_str() {
            "low" => ciyuan_measure::media::ImageDetail::Low,
            "high" => ciyuan_measure::media::ImageDetail::High,
            "auto" => ciyuan_measure::media::ImageDetail::Auto,
            other => anyhow::bail!("--detail {other:?} is not low, high or auto"),
        };
        let mut total: u64 = 0;
        for spec in &a.image {
            let (w, h) = spec
                .split_once(['x', 'X'])
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--image {spec:?} is not WIDTHxHEIGHT, e.g. 1024x768")
                })?;
            let t = ciyuan_measure::media::image_tokens_for(model, w, h, detail)
                .map_err(|e| anyhow::anyhow!("--image {spec}: {e}"))?;
            eprintln!(
                "image {spec}: {} tokens ({}, resized to {}x{})",
                t.tokens, t.formula, t.resized.0, t.resized.1
            );
            total += t.tokens;
        }
        if a.file.is_none() {
            println!("{total}");
            return Ok(ExitCode::SUCCESS);
        }
        let text_tokens = count_text(config, &a)?;
        println!("{}", total + text_tokens as u64);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", count_text(config, &a)?);
    Ok(ExitCode::SUCCESS)
}

/// The text part of `ciyuan count`.
fn count_text(config: Option<&std::path::Path>, a: &CountArgs) -> anyhow::Result<usize> {
    use ciyuan_measure::text::{Encoding, encoding_for_model};
    use std::io::Read;
    let extra = match config {
        Some(p) => config::FileConfig::load(p)?.tokenizer_rules()?,
        None => Vec::new(),
    };
    let enc = match (&a.encoding, &a.model) {
        (Some(e), _) => Encoding::from_name(e).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown encoding {e:?} (o200k_base, cl100k_base, qwen, qwen3_6, deepseek_v4)"
            )
        })?,
        (None, Some(m)) => encoding_for_model(m, &extra).ok_or_else(|| {
            anyhow::anyhow!("no tokenizer is known for model {m:?}; name one with --encoding")
        })?,
        (None, None) => anyhow::bail!("pass --model or --encoding"),
    };
    let mut bytes = Vec::new();
    match a.file.as_deref() {
        None => std::io::stdin().read_to_end(&mut bytes)?,
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_end(&mut bytes)?,
        Some(p) => {
            bytes =
                std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
            bytes.len()
        }
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            // Invalid UTF-8 cannot reach a model as text; count what the API would get.
            eprintln!("warning: input is not valid UTF-8; invalid bytes count as U+FFFD");
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    Ok(enc.count(&text)?)
}

// glibc's malloc took a sixth of the gateway's CPU at saturation (malloc, free and
// consolidation on the many small, short-lived allocations of request handling);
// jemalloc cut the gateway's CPU per request by a quarter at the same peak memory
// (mimalloc was as fast but held half again as much memory). BENCHMARKS.md has both.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIYUAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(cli.config.as_deref(), args),
        Command::Accounts(cmd) => admin::accounts(cmd),
        Command::Keys(cmd) => admin::keys(cmd),
        Command::Ingest(args) => ingest::run(args),
        Command::Usage(args) => admin::usage(args),
        Command::Budgets(cmd) => budgets::budgets(cmd),
        Command::Access(cmd) => budgets::access(cmd),
        Command::Prices(cmd) => money::prices(cmd),
        Command::Contracts(cmd) => money::contracts(cmd),
        Command::Wallets(cmd) => money::wallets(cmd),
        Command::Statement(a) => finance::statement(a),
        Command::Quality(a) => service_levels::quality(a),
        Command::ServiceLevels(c) => service_levels::run(c),
        Command::Export(a) => finance::export(a),
        Command::Reconcile(a) => finance::reconcile(a),
        Command::Reports(cmd) => reports::reports(cmd),
        Command::Adjust(args) => admin::adjust(args),
        Command::Audit(cmd) => admin::audit(cmd),
        Command::Rebuild(args) => serve::rebuild(cli.config.as_deref(), args),
        Command::Migrate(args) => serve::migrate(cli.config.as_deref(), args),
        Command::Count(args) => count(cli.config.as_deref(), args),
        Command::Sim(args) => sim::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`ciyuan ... | head`) is not an error worth a message.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
