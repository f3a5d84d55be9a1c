//! `ciyuan bench`: measurements recorded in BENCHMARKS.md.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Durable appends of ~200-byte entries through group commit.
    Ledger(LedgerArgs),
    /// Offline verification speed.
    Verify(VerifyArgs),
    /// Durable ingest over HTTP: batches of CloudEvents against a `ciyuan serve` process.
    Ingest(IngestArgs),
    /// Token counting speed, side by side with Python tiktoken on the same text.
    Tokens(crate::bench_tokens::TokensArgs),
    /// The gateway's added latency, throughput and memory, against `ciyuan sim`; or,
    /// with `--upstream`, side by side with an external provider and a proxy.
    Gateway(GatewayArgs),
    /// Budget admission plus settlement in-process, on a five-level tree.
    Budgets(BudgetsArgs),
    /// Money in-process: rating one chat entry with LiteLLM's table, and wallet
    /// admission (reserve + settle).
    Money(MoneyArgs),
    /// A month of rated usage in a `ciyuan serve` process, then the month's statement
    /// and its FOCUS export, timed.
    Finance(FinanceArgs),
    /// The console's overview and usage explorer: their API answers timed on an
    /// account tree with millions of usage events.
    Console(ConsoleArgs),
    /// Admission across nodes: a request's hard limit and wallet held in the
    /// PostgreSQL database nodes share, then settled, from several nodes at once.
    Admission(AdmissionArgs),
}

#[derive(Args)]
pub struct AdmissionArgs {
    /// The database (a new one, or one earlier runs of this bench used).
    #[arg(long, env = "CIYUAN_DATABASE")]
    database: String,
    /// Nodes, each with its own connections.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Clients per node, each holding and settling one request after another.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Holds per second over all clients, paced (open loop); unset: each client as
    /// fast as it can (closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Group each node's waiting requests into one call, as `ciyuan serve` does.
    #[arg(long)]
    group: bool,
    /// Admit from slices of the counters' room each node holds, as `ciyuan serve`
    /// does (requests that do not fit are held one by one, grouped with `--group`).
    #[arg(long)]
    slices: bool,
}

#[derive(Args)]
pub struct ConsoleArgs {
    /// Usage events over the last 30 days.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Leaf accounts (`bench/g<i>/n<j>`, 100 per group).
    #[arg(long, default_value_t = 1000)]
    nodes: u64,
    /// Times each view is asked.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Concurrent ingest clients.
    #[arg(long, default_value_t = 8)]
    clients: u64,
}

#[derive(Args)]
pub struct FinanceArgs {
    /// Usage events of the month.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Child nodes of the billed node.
    #[arg(long, default_value_t = 100)]
    nodes: u64,
    /// The month (UTC), YYYY-MM.
    #[arg(long, default_value = "2026-11")]
    month: String,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: u64,
    /// Times the FOCUS export is streamed, one after the other.
    #[arg(long, default_value_t = 1)]
    exports: u64,
}

#[derive(Args)]
pub struct MoneyArgs {
    /// The price file rated with (LiteLLM's JSON table).
    #[arg(long, default_value = "../shared/fixtures/litellm_model_prices.json")]
    prices: PathBuf,
    /// Ratings, and wallet reserve + settle pairs per thread.
    #[arg(long, default_value_t = 1_000_000)]
    iterations: u64,
    /// Threads of the parallel wallet run.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BudgetsArgs {
    /// Admit + settle pairs per thread.
    #[arg(long, default_value_t = 1_000_000)]
    iterations: u64,
    /// Threads of the parallel run.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GatewayArgs {
    /// Requests per second of the open-loop latency measurement.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of each latency and throughput measurement.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Concurrent clients of the throughput measurement.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent streams of the memory measurement.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Import this LiteLLM price table and fund the account's wallet first: every
    /// request is then rated, held and settled.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// The hostile tenant: a key four levels down a tree with every control set from
    /// above (token limits on each level, per key, per session and per request, model
    /// rules, a money limit with `--prices`), each request with a session and the
    /// most tags recorded. Without it the key is on a bare node.
    #[arg(long)]
    controls: bool,
    /// With `CIYUAN_DATABASE` set (every `ciyuan serve` on one PostgreSQL database):
    /// this many gateway nodes, the throughput measured again with the clients spread
    /// over all of them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// An external provider's OpenAI base URL (ending in /v1) instead of `ciyuan sim`
    /// (`bench/nginx/compare.sh` starts one and runs this): it directly, `--proxy`,
    /// and the gateway in front of it, side by side, with wrk for throughput and
    /// one-connection latency and the open-loop client for p99 at `--rate`.
    #[arg(long)]
    upstream: Option<String>,
    /// With `--upstream`: the same provider behind another proxy (e.g. nginx), measured
    /// side by side as the yardstick.
    #[arg(long, requires = "upstream")]
    proxy: Option<String>,
    /// With `--proxy`: a process of the proxy (repeatable; its children count with
    /// it, so nginx's master stands for its workers), whose CPU per request is then
    /// reported beside the gateway's.
    #[arg(long, requires = "proxy")]
    proxy_pid: Vec<u32>,
    /// With `--upstream`: wrk's connections in the throughput measurement.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// With `--upstream`: wrk's threads in the throughput measurement.
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// With `--upstream`: the wrk executable.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Only prepare the tenant (`--controls`, `--prices`) on the gateway already
    /// running at this URL, with the admin key in `CIYUAN_KEY`, and print its key
    /// and the headers its requests carry as one JSON line: for measuring a gateway
    /// the bench does not start (`bench/nginx/instructions.sh --controls` runs it
    /// under callgrind).
    #[arg(long, conflicts_with = "upstream")]
    setup: Option<String>,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct IngestArgs {
    /// Events to send in all.
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Concurrent HTTP clients (requests in flight): enough that the server has work
    /// while earlier requests wait for their group's `fdatasync`.
    #[arg(long, default_value_t = 16)]
    clients: u64,
    /// Event ids as UUIDs in no order, as most producers mint them, instead of
    /// `ev-1`, `ev-2`, ... (which the idempotency index receives in key order).
    #[arg(long)]
    random_ids: bool,
    /// Import this LiteLLM price table first, so every event is rated as it is
    /// appended (the events are `gpt-4o` chat usage).
    #[arg(long)]
    prices: Option<PathBuf>,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LedgerArgs {
    /// Entries to append in all.
    #[arg(long, default_value_t = 5_000_000)]
    entries: u64,
    /// Entries per append call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Bytes per entry.
    #[arg(long, default_value_t = 200)]
    entry_bytes: usize,
    /// Directory to write in (default: a fresh temporary directory, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Entries in the ledger to build and verify.
    #[arg(long, default_value_t = 5_000_000)]
    entries: u64,
    /// Verify an existing ledger or bundle instead of building one.
    #[arg(long)]
    path: Option<PathBuf>,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Ledger(a) => {
            let tmp;
            let dir = match a.dir {
                Some(d) => d,
                None => {
                    tmp = tempdir()?;
                    tmp.path.clone()
                }
            };
            let report = ciyuan_ledger::bench::bench_append(
                &dir,
                ciyuan_ledger::bench::BenchAppendOptions {
                    total_entries: a.entries,
                    batch_entries: a.batch,
                    producers: a.producers,
                    entry_bytes: a.entry_bytes,
                },
            )?;
            println!(
                "ledger append: {} entries of {} bytes, batches of {}, {} producers",
                a.entries, a.entry_bytes, a.batch, a.producers
            );
            println!("  {:.0} durable entries/s", report.entries_per_sec);
            println!(
                "  append latency p50 {} us, p99 {} us",
                report.p50_append_us, report.p99_append_us
            );
            println!(
                "  {} fsyncs, {:.0} entries per fsync",
                report.fsyncs, report.entries_per_fsync
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "entries": a.entries,
                        "entry_bytes": a.entry_bytes,
                        "batch_entries": a.batch,
                        "producers": a.producers,
                        "entries_per_sec": report.entries_per_sec,
                        "p50_append_us": report.p50_append_us,
                        "p99_append_us": report.p99_append_us,
                        "fsyncs": report.fsyncs,
                        "entries_per_fsync": report.entries_per_fsync,
                    })
                );
            }
        }
        BenchCmd::Tokens(a) => crate::bench_tokens::run(a)?,
        BenchCmd::Ingest(a) => {
            let r = crate::bench_ingest::run(
                a.events,
                a.batch,
                a.clients,
                a.random_ids,
                a.prices.as_deref(),
            )?;
            println!(
                "ingest: {} events in batches of {} from {} clients over HTTP ({} ids, {})",
                r.events,
                a.batch,
                a.clients,
                if a.random_ids {
                    "random UUID"
                } else {
                    "sequential"
                },
                if a.prices.is_some() {
                    "rated"
                } else {
                    "unrated"
                }
            );
            println!("  {:.0} durable events/s", r.events_per_sec);
            println!(
                "  request latency p50 {} us, p99 {} us",
                r.p50_request_us, r.p99_request_us
            );
            println!(
                "  {:.0} events/s until projected; server CPU {:.2} us/event",
                r.projected_events_per_sec, r.server_cpu_us_per_event
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "events": r.events,
                        "batch": a.batch,
                        "clients": a.clients,
                        "random_ids": a.random_ids,
                        "events_per_sec": r.events_per_sec,
                        "p50_request_us": r.p50_request_us,
                        "p99_request_us": r.p99_request_us,
                        "projected_events_per_sec": r.projected_events_per_sec,
                        "server_cpu_us_per_event": r.server_cpu_us_per_event,
                    })
                );
            }
        }
        BenchCmd::Money(a) => money(a)?,
        BenchCmd::Console(a) => {
            let r = crate::bench_console::run(a.events, a.nodes, a.rounds, a.clients)?;
            println!(
                "console: {} events of {} leaf accounts over 30 days ingested and projected in {:.1} s",
                r.events, r.nodes, r.ingest_seconds
            );
            for v in &r.views {
                let mut s = v.seconds.clone();
                s.sort_by(f64::total_cmp);
                println!(
                    "{}: {} (median {:.0} ms, max {:.0} ms; target 300 ms)",
                    v.name,
                    v.seconds
                        .iter()
                        .map(|x| format!("{:.0} ms", x * 1e3))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s[s.len() / 2] * 1e3,
                    s[s.len() - 1] * 1e3
                );
            }
        }
        BenchCmd::Finance(a) => {
            let r = crate::bench_finance::run(
                a.events, a.nodes, &a.month, a.batch, a.clients, a.exports,
            )?;
            let mut st = r.statement_seconds.clone();
            st.sort_by(f64::total_cmp);
            println!(
                "finance: {} events of {} nodes over {} ingested and projected in {:.1} s ({:.0} events/s, server CPU {:.2} µs/event)",
                r.events,
                r.nodes,
                a.month,
                r.ingest_seconds,
                r.events as f64 / r.ingest_seconds,
                r.server_cpu_us_per_event
            );
            println!(
                "statement of the month from the projections: {} (median {:.3} s, {} bytes)",
                r.statement_seconds
                    .iter()
                    .map(|s| format!("{s:.3} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                st[st.len() / 2],
                r.statement_bytes
            );
            let mut fs = r.focus_seconds.clone();
            fs.sort_by(f64::total_cmp);
            let median = fs[fs.len() / 2];
            println!(
                "FOCUS export: {} rows ({} billing lines), {} bytes streamed in {} (median {:.2} s, {:.0} rows/s); server RSS {} MiB before, peak {} MiB during",
                r.focus_rows,
                r.billing_lines,
                r.focus_bytes,
                r.focus_seconds
                    .iter()
                    .map(|s| format!("{s:.2} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median,
                r.focus_rows as f64 / median,
                r.rss_before_kib / 1024,
                r.rss_peak_kib / 1024
            );
            println!(
                "CPU seconds per export, server / client: {}",
                r.focus_cpu
                    .iter()
                    .map(|(s, c)| format!("{s:.2} / {c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        BenchCmd::Admission(a) => {
            let r = crate::bench_admission::run(
                &a.database,
                a.nodes,
                a.clients,
                a.seconds,
                a.rate,
                a.group,
                a.slices,
            )?;
            println!(
                "admission across nodes: {} nodes x {} clients on one hard limit and one wallet, {} s, {}{}{}",
                a.nodes,
                a.clients,
                a.seconds,
                if a.slices { "from slices, " } else { "" },
                if a.group { "grouped per node, " } else { "" },
                a.rate
                    .map_or("closed loop".to_string(), |r| format!("{r} holds/s paced"))
            );
            println!(
                "  {} holds ({} from slices, {} slices asked for), {:.0}/s; hold p50 {} us, p99 {} us, p99.9 {} us, max {} us (target: p99 <= 2 ms); settle p50 {} us, p99 {} us; {} refused",
                r.holds,
                r.from_slices,
                r.slices_asked,
                r.per_sec,
                r.reserve_us[0],
                r.reserve_us[1],
                r.reserve_us[2],
                r.reserve_us[3],
                r.settle_us[0],
                r.settle_us[1],
                r.refused
            );
        }
        BenchCmd::Budgets(a) => {
            let r = ciyuan_budget::bench::bench(a.iterations, a.threads)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "budgets: admit + settle on a five-level tree, {} limits per request, {} per thread",
                r.limits_per_request, r.iterations
            );
            println!(
                "  1 thread:  {:.0} ns per request, {:.0} requests/s",
                r.single_ns, r.single_per_sec
            );
            println!(
                "  {} threads: {:.0} ns per request per thread, {:.0} requests/s in all ({:.2}x one thread)",
                r.threads, r.parallel_thread_ns, r.parallel_per_sec, r.scaling
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "iterations": r.iterations,
                        "threads": r.threads,
                        "limits_per_request": r.limits_per_request,
                        "single_ns": r.single_ns,
                        "single_per_sec": r.single_per_sec,
                        "parallel_thread_ns": r.parallel_thread_ns,
                        "parallel_per_sec": r.parallel_per_sec,
                        "scaling": r.scaling,
                    })
                );
            }
        }
        BenchCmd::Gateway(a) if a.setup.is_some() => return gateway_setup(a),
        BenchCmd::Gateway(a) if a.upstream.is_some() => return gateway_upstream(a),
        BenchCmd::Gateway(a) => {
            let r = crate::bench_gateway::run(crate::bench_gateway::Options {
                rate: a.rate,
                seconds: a.seconds,
                concurrency: a.concurrency,
                streams: a.streams,
                prices: a.prices.clone(),
                controls: a.controls,
                nodes: a.nodes,
            })?;
            let (d, g) = (&r.latency_direct, &r.latency_gateway);
            println!(
                "gateway: `ciyuan sim` (answers at once) directly and behind `ciyuan serve`, small chat completions"
            );
            println!("  tenant: {}", tenant(a.controls, a.prices.is_some()));
            println!(
                "  latency, open loop at {:.0} requests/s for {} s each (from scheduled send time; direct and gateway alternate in 1 s slices):",
                a.rate, a.seconds
            );
            for (name, l) in [("direct ", d), ("gateway", g)] {
                println!(
                    "    {name} p50 {} us, p99 {} us, p99.9 {} us, max {} us ({} requests, {:.0}/s sent, client late p99 {} us; CPU/request gateway {:.0} us, sim {:.0} us)",
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    l.max_us,
                    l.requests,
                    l.achieved_rate,
                    l.client_late_p99_us,
                    l.gateway_cpu_us,
                    l.sim_cpu_us
                );
            }
            println!(
                "    added   p50 {:+} us, p99 {:+} us, p99.9 {:+} us (target: p99 <= 1000 us)",
                r.added_p50_us, r.added_p99_us, r.added_p999_us
            );
            if let Some(t) = &r.throughput_nodes {
                println!(
                    "  throughput, {} clients spread over {} nodes on one PostgreSQL database:",
                    a.concurrency, a.nodes
                );
                println!(
                    "    {} nodes {:.0} requests/s ({} requests; CPU/request all nodes {:.0} us) = {:.2}x one node",
                    a.nodes,
                    t.per_sec,
                    t.requests,
                    t.gateway_cpu_us,
                    t.per_sec / r.throughput_gateway.per_sec
                );
            }
            let (d, g) = (&r.throughput_direct, &r.throughput_gateway);
            println!(
                "  throughput, closed loop, {} clients for {} s each (alternating in 1 s slices):",
                a.concurrency, a.seconds
            );
            for (name, t) in [("direct ", d), ("gateway", g)] {
                println!(
                    "    {name} {:.0} requests/s ({} requests; CPU/request gateway {:.0} us, sim {:.0} us, client {:.0} us)",
                    t.per_sec, t.requests, t.gateway_cpu_us, t.sim_cpu_us, t.client_cpu_us
                );
            }
            println!(
                "    gateway/direct {:.2} (target: >= 0.50)",
                r.throughput_ratio
            );
            let m = &r.memory;
            let mb = |kb: u64| kb as f64 / 1024.0;
            println!(
                "  memory, {} concurrent streams through the gateway (100 tokens at 20/s each):",
                m.streams
            );
            println!(
                "    gateway RSS {:.1} MiB at start, {:.1} MiB after its first second of calls (tokenizer loaded)",
                mb(m.rss_start_kb),
                mb(m.rss_warm_kb)
            );
            println!(
                "    gateway RSS {:.1} MiB before, peak {:.1} MiB = {:.1} MB with {} streams open ({:+.1} KiB per stream), {:.1} MiB after; VmHWM {:.1} MiB (target: peak <= 64 MB, read strictly as 10^6 bytes: 61.0 MiB)",
                mb(m.rss_before_kb),
                mb(m.rss_peak_kb),
                m.rss_peak_kb as f64 * 1024.0 / 1e6,
                m.open_at_peak,
                (m.rss_peak_kb as f64 - m.rss_before_kb as f64) / m.streams.max(1) as f64,
                mb(m.rss_after_kb),
                mb(m.hwm_kb)
            );
            println!(
                "    {} of {} streams ended with [DONE], at most {} open at once, {:.1} s in all",
                m.completed, m.streams, m.max_open, m.seconds
            );
            if let Some(c) = &r.controls {
                println!("  controls: {c}");
            }
            if r.problems.is_empty() {
                println!("  correctness: all {} answers 200", r.responses);
            } else {
                println!("  correctness: FAILED ({} answers checked)", r.responses);
                for p in &r.problems {
                    println!("    {p}");
                }
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "rate": a.rate,
                        "seconds": a.seconds,
                        "concurrency": a.concurrency,
                        "streams": a.streams,
                        "controls": a.controls,
                        "prices": a.prices.is_some(),
                        "direct_p50_us": r.latency_direct.p50_us,
                        "direct_p99_us": r.latency_direct.p99_us,
                        "direct_p999_us": r.latency_direct.p999_us,
                        "gateway_p50_us": r.latency_gateway.p50_us,
                        "gateway_p99_us": r.latency_gateway.p99_us,
                        "gateway_p999_us": r.latency_gateway.p999_us,
                        "added_p50_us": r.added_p50_us,
                        "added_p99_us": r.added_p99_us,
                        "added_p999_us": r.added_p999_us,
                        "gateway_cpu_us_per_request": r.latency_gateway.gateway_cpu_us,
                        "direct_requests_per_sec": r.throughput_direct.per_sec,
                        "gateway_requests_per_sec": r.throughput_gateway.per_sec,
                        "throughput_ratio": r.throughput_ratio,
                        "streams_completed": m.completed,
                        "streams_max_open": m.max_open,
                        "rss_start_kb": m.rss_start_kb,
                        "rss_warm_kb": m.rss_warm_kb,
                        "rss_before_kb": m.rss_before_kb,
                        "rss_peak_kb": m.rss_peak_kb,
                        "rss_after_kb": m.rss_after_kb,
                        "hwm_kb": m.hwm_kb,
                        "responses": r.responses,
                        "failed": !r.problems.is_empty(),
                    })
                );
            }
            if !r.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        BenchCmd::Verify(a) => {
            let tmp;
            let path = match a.path {
                Some(p) => p,
                None => {
                    tmp = tempdir()?;
                    ciyuan_ledger::bench::bench_append(
                        &tmp.path,
                        ciyuan_ledger::bench::BenchAppendOptions {
                            total_entries: a.entries,
                            batch_entries: 10_000,
                            producers: 2,
                            entry_bytes: 200,
                        },
                    )?;
                    tmp.path.clone()
                }
            };
            let report = ciyuan_ledger::bench::bench_verify(&path)?;
            println!(
                "verify: {} entries in {:.3}s: {:.0} entries/s",
                report.entries, report.seconds, report.entries_per_sec
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "entries": report.entries,
                        "seconds": report.seconds,
                        "entries_per_sec": report.entries_per_sec,
                    })
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A directory removed on drop; the CLI has no tempfile dependency outside tests.
struct TempDir {
    path: PathBuf,
}

fn tempdir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!(
        "ciyuan-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir { path })
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `ciyuan bench money`: what rating adds per entry and what wallet admission costs.
fn money(a: MoneyArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let bytes = std::fs::read(&a.prices)
        .with_context(|| format!("reading the price file {}", a.prices.display()))?;
    let book = ciyuan_price::import_litellm(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_book(
            Some("list"),
            1,
            ciyuan_core::jiff::Timestamp::UNIX_EPOCH,
            None,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rater = ciyuan_price::Rater::new(&book, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tokens = ciyuan_core::TokenMap::new();
    use ciyuan_core::{Direction as D, Modality as M};
    for (d, n) in [(D::Input, 1200), (D::CachedInput, 800), (D::Output, 350)] {
        tokens.add(M::Text, d, n).context("token map")?;
    }
    let measures = std::collections::BTreeMap::new();
    let input = ciyuan_price::RateInput {
        model: Some("gpt-4o"),
        service: "llm.chat",
        tier: ciyuan_core::ServiceTier::Standard,
        tokens: &tokens,
        measures: &measures,
        at: ciyuan_core::jiff::Timestamp::now(),
        period_to_date: rust_decimal::Decimal::ZERO,
    };
    let n = u32::try_from(a.iterations).unwrap_or(u32::MAX);
    // Once to warm the rater's model cache, as a running server has it.
    ciyuan_price::bench_rating(&rater, &input, 1000).map_err(|e| anyhow::anyhow!("{e}"))?;
    let took = ciyuan_price::bench_rating(&rater, &input, n).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rating_ns = took.as_nanos() as f64 / f64::from(n);
    let w = ciyuan_budget::bench::wallet_bench(a.iterations, a.threads)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "money: rating a gpt-4o chat entry (3 token keys) with LiteLLM's table ({} rules)",
        book.rules.len()
    );
    println!("  {rating_ns:.0} ns per entry");
    println!(
        "wallet admission (reserve + settle): 1 thread {:.0} ns; {} threads {:.0} ns per request per thread",
        w.single_ns, w.threads, w.parallel_thread_ns
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "rules": book.rules.len(),
                "rating_ns": rating_ns,
                "wallet_single_ns": w.single_ns,
                "wallet_threads": w.threads,
                "wallet_parallel_thread_ns": w.parallel_thread_ns,
            })
        );
    }
    Ok(())
}

/// `ciyuan bench gateway --setup URL`: the tenant prepared on a running gateway.
fn gateway_setup(a: GatewayArgs) -> anyhow::Result<ExitCode> {
    let Some(url) = a.setup.as_deref() else {
        anyhow::bail!("--setup URL is required here");
    };
    let admin = std::env::var("CIYUAN_KEY")
        .map_err(|_| anyhow::anyhow!("--setup needs the gateway's admin key in CIYUAN_KEY"))?;
    let tenant = crate::bench_gateway::setup(url, &admin, a.prices.as_deref(), a.controls)?;
    println!("{tenant}");
    Ok(ExitCode::SUCCESS)
}

/// Which tenant a gateway run measured, said with its figures.
fn tenant(controls: bool, prices: bool) -> String {
    let money = if prices {
        "; every request rated, held in a wallet and settled"
    } else {
        "; unpriced"
    };
    if controls {
        format!(
            "hostile (--controls): a key four levels down with every control set from above, a session and the most tags on each request{money}"
        )
    } else {
        format!("a key on a bare node, no controls{money}")
    }
}

/// `ciyuan bench gateway --upstream URL`: the figures side by side.
fn gateway_upstream(a: GatewayArgs) -> anyhow::Result<ExitCode> {
    let Some(upstream) = a.upstream.clone() else {
        anyhow::bail!("--upstream is required here");
    };
    let r = crate::bench_gateway::run_upstream(crate::bench_gateway::UpstreamOptions {
        upstream,
        proxy: a.proxy.clone(),
        proxy_pids: a.proxy_pid.clone(),
        rate: a.rate,
        seconds: a.seconds,
        connections: a.connections,
        wrk_threads: a.wrk_threads,
        wrk: a.wrk.clone(),
        prices: a.prices.clone(),
        controls: a.controls,
    })?;
    println!(
        "gateway against an external provider: small chat completions, targets alternating in 1 s slices ({} s each)",
        a.seconds
    );
    println!("  tenant: {}", tenant(a.controls, a.prices.is_some()));
    let direct = &r.sides[0];
    let proxy = r.sides.iter().find(|s| s.name == "nginx proxy");
    let Some(ciyuan) = r.sides.last() else {
        anyhow::bail!("no figures");
    };
    println!(
        "  throughput, wrk, {} connections, {} threads:",
        a.connections,
        a.wrk_threads.min(a.connections)
    );
    for s in &r.sides {
        let t = &s.throughput;
        println!(
            "    {:<11} {:>8.0} requests/s (p50 {} us, p99 {} us; {} requests{})",
            s.name,
            t.per_sec,
            t.p50_us,
            t.p99_us,
            t.requests,
            cpu_note(t.gateway_cpu_us)
        );
        print_rooms(t.gateway_cpu_us, t.gateway_cpu_rooms_us);
    }
    let split: Vec<String> = r
        .sides
        .iter()
        .filter(|s| s.throughput.cpu_user_us + s.throughput.cpu_system_us > 0.0)
        .map(|s| {
            format!(
                "{} {:.1} + {:.1}",
                s.name, s.throughput.cpu_user_us, s.throughput.cpu_system_us
            )
        })
        .collect();
    if !split.is_empty() {
        println!("    CPU us/request, user + system: {}", split.join("; "));
    }
    if let Some(p) = proxy {
        println!(
            "    ciyuan / nginx proxy {:.2} (target: >= 0.80); ciyuan / direct {:.2}",
            ciyuan.throughput.per_sec / p.throughput.per_sec,
            ciyuan.throughput.per_sec / direct.throughput.per_sec
        );
    }
    println!("  latency, wrk, one connection:");
    for s in &r.sides {
        let t = &s.one_connection;
        println!(
            "    {:<11} p50 {:>5} us (+{:>4} over direct), p99 {:>5} us (+{:>4}), p99.9 {} us; {:.0} requests/s{}",
            s.name,
            t.p50_us,
            t.p50_us as i64 - direct.one_connection.p50_us as i64,
            t.p99_us,
            t.p99_us as i64 - direct.one_connection.p99_us as i64,
            t.p999_us,
            t.per_sec,
            cpu_note(t.gateway_cpu_us)
        );
    }
    println!("    (target: ciyuan p50 at most 25 us over direct)");
    println!(
        "  latency, open loop at {:.0} requests/s (from scheduled send times):",
        a.rate
    );
    for s in &r.sides {
        let l = &s.open_loop;
        println!(
            "    {:<11} p50 {:>5} us, p99 {:>5} us (+{:>5} over direct), p99.9 {} us, max {} us ({} requests, {:.0}/s sent, client late p99 {} us{})",
            s.name,
            l.p50_us,
            l.p99_us,
            l.p99_us as i64 - direct.open_loop.p99_us as i64,
            l.p999_us,
            l.max_us,
            l.requests,
            l.achieved_rate,
            l.client_late_p99_us,
            cpu_note(l.gateway_cpu_us)
        );
        print_rooms(l.gateway_cpu_us, l.gateway_cpu_rooms_us);
    }
    println!("    (target: ciyuan p99 at most 1000 us)");
    if let Some(c) = &r.controls {
        println!("  controls: {c}");
    }
    if r.problems.is_empty() {
        println!("  correctness: all {} answers 2xx", r.responses);
    } else {
        println!("  correctness: FAILED ({} answers checked)", r.responses);
        for p in &r.problems {
            println!("    {p}");
        }
    }
    if a.json {
        let by_thread = |rooms: [f64; 5]| {
            crate::bench_gateway::THREAD_ROOMS
                .iter()
                .zip(rooms)
                .map(|(name, us)| (name.to_string(), serde_json::json!(us)))
                .collect::<serde_json::Map<_, _>>()
        };
        let side = |s: &crate::bench_gateway::Side| {
            serde_json::json!({
                "throughput_per_sec": s.throughput.per_sec,
                "throughput_p50_us": s.throughput.p50_us,
                "throughput_p99_us": s.throughput.p99_us,
                "throughput_gateway_cpu_us": s.throughput.gateway_cpu_us,
                "throughput_cpu_user_us": s.throughput.cpu_user_us,
                "throughput_cpu_system_us": s.throughput.cpu_system_us,
                "throughput_gateway_cpu_us_by_thread": by_thread(s.throughput.gateway_cpu_rooms_us),
                "one_connection_p50_us": s.one_connection.p50_us,
                "one_connection_p99_us": s.one_connection.p99_us,
                "one_connection_per_sec": s.one_connection.per_sec,
                "open_loop_p50_us": s.open_loop.p50_us,
                "open_loop_p99_us": s.open_loop.p99_us,
                "open_loop_p999_us": s.open_loop.p999_us,
                "open_loop_gateway_cpu_us": s.open_loop.gateway_cpu_us,
                "open_loop_gateway_cpu_us_by_thread": by_thread(s.open_loop.gateway_cpu_rooms_us),
            })
        };
        let sides: serde_json::Map<String, serde_json::Value> = r
            .sides
            .iter()
            .map(|s| (s.name.replace(' ', "_"), side(s)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "rate": a.rate,
                "seconds": a.seconds,
                "connections": a.connections,
                "controls": a.controls,
                "prices": a.prices.is_some(),
                "sides": sides,
                "responses": r.responses,
                "failed": !r.problems.is_empty(),
            })
        );
    }
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The gateway's CPU a request by room of its threads, under a figure that has it.
fn print_rooms(gateway_cpu_us: f64, rooms: [f64; 5]) {
    if gateway_cpu_us > 0.0 {
        let rooms: Vec<String> = crate::bench_gateway::THREAD_ROOMS
            .iter()
            .zip(rooms)
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        println!(
            "      gateway CPU us/request by thread: {}",
            rooms.join(", ")
        );
    }
}

/// `; gateway CPU N us/request` when measured.
fn cpu_note(us: f64) -> String {
    if us > 0.0 {
        format!("; gateway CPU {us:.0} us/request")
    } else {
        String::new()
    }
}
