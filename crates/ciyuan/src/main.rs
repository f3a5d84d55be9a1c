//! `ciyuan`: the ledger for AI-service tokens.
//!
//! `serve` runs the server; the admin subcommands are clients of its HTTP API, so they
//! work the same against a local server and a remote cluster; `audit verify`,
//! `rebuild` and `bench` work on files.

mod admin;
mod bench;
mod bench_ingest;
mod client;
mod config;
mod ingest;
mod serve;

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
    /// Record a correction of earlier usage.
    Adjust(admin::AdjustArgs),
    /// Checkpoints, proofs, bundles and offline verification.
    #[command(subcommand)]
    Audit(admin::AuditCmd),
    /// Rebuild the projections from the ledger alone (server stopped).
    Rebuild(serve::RebuildArgs),
    /// Measure the ledger.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

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
        Command::Adjust(args) => admin::adjust(args),
        Command::Audit(cmd) => admin::audit(cmd),
        Command::Rebuild(args) => serve::rebuild(cli.config.as_deref(), args),
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
