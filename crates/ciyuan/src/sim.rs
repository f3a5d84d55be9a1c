//! `ciyuan sim`: the simulated provider in its own process (the gateway's tests and
//! benchmarks point at it; `ciyuan serve` runs one in-process when no provider is
//! configured).

use anyhow::{Context, bail};
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct SimArgs {
    /// HTTP listen address, HOST:PORT (port 0 picks a free one).
    #[arg(long, env = "CIYUAN_SIM_LISTEN", default_value = "127.0.0.1:8788")]
    listen: String,
    /// Milliseconds to the first token.
    #[arg(long, default_value_t = 200)]
    ttft_ms: u64,
    /// Streaming rate in tokens per second (0: as fast as possible).
    #[arg(long, default_value_t = 50.0)]
    tokens_per_sec: f64,
    /// Fraction of requests answered 500 or 429, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of streams cut mid-way, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    cut_rate: f64,
    /// Seed of the generated answers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Require this API key (Bearer or x-api-key).
    #[arg(long, env = "CIYUAN_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: SimArgs) -> anyhow::Result<ExitCode> {
    for (name, v) in [("--error-rate", a.error_rate), ("--cut-rate", a.cut_rate)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} must be between 0 and 1, got {v}");
        }
    }
    if !(a.tokens_per_sec >= 0.0 && a.tokens_per_sec.is_finite()) {
        bail!("--tokens-per-sec must be 0 or more");
    }
    let cfg = ciyuan_sim::SimConfig {
        ttft: Duration::from_millis(a.ttft_ms),
        tokens_per_sec: a.tokens_per_sec,
        error_rate: a.error_rate,
        cut_rate: a.cut_rate,
        seed: a.seed,
        api_key: a.api_key,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = a.threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "simulated provider: OpenAI at http://{addr}/v1, Anthropic at http://{addr}"
            )?;
            writeln!(out, "listening on http://{addr}")?;
            out.flush()?;
        }
        tokio::select! {
            r = ciyuan_sim::serve(listener, cfg) => r.context("serving")?,
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
