//! `ciyuan bench finance`: a month of rated usage ingested into a real `ciyuan serve`,
//! then the month's statement (from the projections) and its FOCUS export (streamed),
//! timed, with the server's resident memory sampled while it exports.

use anyhow::{Context, bail};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// The book: five models, two token keys each, rounded to cents per entry (so every
/// entry also has a rounding line, as a CNY book would).
const BOOK: &str = r#"name = "list"
currency = "CNY"
[rounding]
to = 2
mode = "half_up"
[tax]
name = "VAT"
rate_percent = "6"
[[rules]]
model = "qwen-max"
unit_prices = { "text.input" = "0.0000024", "text.output" = "0.0000096" }
[[rules]]
model = "qwen-plus"
unit_prices = { "text.input" = "0.0000008", "text.output" = "0.000002" }
[[rules]]
model = "glm-4"
unit_prices = { "text.input" = "0.000005", "text.output" = "0.000005" }
[[rules]]
model = "deepseek-chat"
unit_prices = { "text.input" = "0.000002", "text.output" = "0.000008" }
[[rules]]
model = "kimi-k2"
unit_prices = { "text.input" = "0.000004", "text.output" = "0.000016" }
"#;
const MODELS: [&str; 5] = ["qwen-max", "qwen-plus", "glm-4", "deepseek-chat", "kimi-k2"];

/// What one run measured.
pub struct Report {
    pub events: u64,
    pub nodes: u64,
    pub billing_lines: u64,
    pub ingest_seconds: f64,
    /// CPU time the server spent ingesting and projecting, per event (user + system),
    /// in microseconds: steadier than wall time on a shared machine.
    pub server_cpu_us_per_event: f64,
    /// Each statement request, in seconds.
    pub statement_seconds: Vec<f64>,
    pub statement_bytes: usize,
    /// Each export, in seconds.
    pub focus_seconds: Vec<f64>,
    /// CPU seconds the server and this client spent on each export: on a shared
    /// machine, what the wall clock does not say.
    pub focus_cpu: Vec<(f64, f64)>,
    pub focus_bytes: u64,
    pub focus_rows: u64,
    /// The server's resident memory before the export and its peak during it, KiB.
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the benchmark: `events` usage events of `nodes` nodes over `month`
/// (`YYYY-MM`, UTC), `batch` per request, from `clients` concurrent clients; the FOCUS
/// export is then streamed `exports` times.
pub fn run(
    events: u64,
    nodes: u64,
    month: &str,
    batch: u64,
    clients: u64,
    exports: u64,
) -> anyhow::Result<Report> {
    if events == 0 || nodes == 0 || batch == 0 || clients == 0 || exports == 0 {
        bail!("--events, --nodes, --batch, --clients and --exports must be positive");
    }
    let start: ciyuan_core::jiff::Timestamp = format!("{month}-01T00:00:00Z")
        .parse()
        .with_context(|| format!("--month {month:?} is not YYYY-MM"))?;
    let end = start
        .to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
        .checked_add(ciyuan_core::jiff::Span::new().months(1))?
        .timestamp();
    let span = (end.as_second() - start.as_second()) as u64;
    let age = (ciyuan_core::jiff::Timestamp::now().as_second() - start.as_second()).max(0) as u64;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-finance-{}", hex::encode(seed)));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("ciyuan.toml");
    std::fs::write(
        &config,
        format!("[ingest]\nmax_age_secs = {}\n", age + 86_400),
    )?;
    let admin = format!("cy_{}_{}", hex::encode(&seed[..6]), "b".repeat(64));
    let (guard, url, pid) = crate::bench_ingest::spawn_server(dir, Some(&config), &admin)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
        let post = |path: String, body: serde_json::Value| {
            http.post(format!("{url}{path}")).bearer_auth(&admin).json(&body).send()
        };
        post("/api/v1/accounts".into(), serde_json::json!({"path": "bench"})).await?.error_for_status()?;
        for n in 0..nodes {
            post("/api/v1/accounts".into(), serde_json::json!({"path": format!("bench/n{n:04}")}))
                .await?
                .error_for_status()?;
        }
        http.post(format!("{url}/api/v1/prices?format=toml&effective_from={start}"))
            .bearer_auth(&admin)
            .body(BOOK)
            .send()
            .await?
            .error_for_status()?;
        let requests = events.div_ceil(batch);
        let body = move |r: u64| {
            let first = r * batch;
            let n = batch.min(events - first);
            let mut b = String::with_capacity(n as usize * 260);
            b.push('[');
            for i in first..first + n {
                if i > first {
                    b.push(',');
                }
                let at = ciyuan_core::jiff::Timestamp::from_second(start.as_second() + (i * span / events) as i64)
                    .unwrap_or(start);
                let model = MODELS[((i / nodes) % MODELS.len() as u64) as usize];
                // Infallible: writing to a String.
                let _ = write!(
                    b,
                    r#"{{"specversion":"1.0","id":"f-{i}","source":"svc://bench","type":"llm.usage","subject":"bench/n{:04}","time":"{at}","data":{{"model":"{model}","input_tokens":{},"output_tokens":{}}}}}"#,
                    i % nodes,
                    1 + i % 4093,
                    i % 1021
                );
            }
            b.push(']');
            axum::body::Bytes::from(b)
        };
        let cpu_before = crate::bench_ingest::cpu_seconds(pid);
        let started = Instant::now();
        ingest_batches(&http, &url, &admin, clients, requests, body).await?;
        let ingest_seconds = started.elapsed().as_secs_f64();
        let server_cpu_us_per_event =
            (crate::bench_ingest::cpu_seconds(pid) - cpu_before) * 1e6 / events as f64;

        let mut statement_seconds = Vec::new();
        let mut statement = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let r = http
                .get(format!("{url}/api/v1/statements/bench?period={month}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .error_for_status()?;
            statement = r.bytes().await?.to_vec();
            statement_seconds.push(t.elapsed().as_secs_f64());
        }
        let st: serde_json::Value = serde_json::from_slice(&statement)?;
        if st["children"].as_array().map_or(0, Vec::len) as u64 != nodes {
            bail!("the statement has {} children, not {nodes}", st["children"].as_array().map_or(0, Vec::len));
        }

        let rss_before_kib = rss_kib(pid);
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            })
        };
        let mut focus_seconds = Vec::new();
        let mut focus_cpu = Vec::new();
        let (mut focus_bytes, mut focus_rows) = (0u64, 0u64);
        for run in 0..exports {
            let cpu = (
                crate::bench_ingest::cpu_seconds(pid),
                crate::bench_ingest::cpu_seconds(std::process::id()),
            );
            let t = Instant::now();
            let mut r = http
                .get(format!("{url}/api/v1/exports/focus?account=bench&period={month}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .error_for_status()?;
            let (mut bytes, mut rows) = (0u64, 0u64);
            while let Some(chunk) = r.chunk().await? {
                bytes += chunk.len() as u64;
                rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            }
            focus_seconds.push(t.elapsed().as_secs_f64());
            focus_cpu.push((
                crate::bench_ingest::cpu_seconds(pid) - cpu.0,
                crate::bench_ingest::cpu_seconds(std::process::id()) - cpu.1,
            ));
            if run > 0 && (bytes, rows) != (focus_bytes, focus_rows) {
                bail!("export {run} gave {rows} rows of {bytes} bytes, the first {focus_rows} of {focus_bytes}");
            }
            (focus_bytes, focus_rows) = (bytes, rows);
        }
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let rss_peak_kib = sampler.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
        anyhow::Ok(Report {
            events,
            nodes,
            billing_lines: focus_rows.saturating_sub(1),
            ingest_seconds,
            server_cpu_us_per_event,
            statement_seconds,
            statement_bytes: statement.len(),
            focus_seconds,
            focus_cpu,
            focus_bytes,
            focus_rows: focus_rows.saturating_sub(1),
            rss_before_kib,
            rss_peak_kib,
        })
    })?;
    drop(guard);
    Ok(report)
}

/// Sends batch `r` of `requests` (`body(r)`, a CloudEvents batch) to the server at
/// `url` from `clients` concurrent clients, then waits until every entry is projected
/// (the finance and console benches measure what queries see).
pub(crate) async fn ingest_batches(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    clients: u64,
    requests: u64,
    body: impl Fn(u64) -> axum::body::Bytes + Copy + Send + 'static,
) -> anyhow::Result<()> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, admin, next) = (
            http.clone(),
            url.to_string(),
            admin.to_string(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r >= requests {
                    return anyhow::Ok(());
                }
                http.post(format!("{url}/v1/events"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body(r))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    loop {
        let h: serde_json::Value = http
            .get(format!("{url}/healthz"))
            .send()
            .await?
            .json()
            .await?;
        if h["projected"].as_u64() >= h["entries"].as_u64() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
