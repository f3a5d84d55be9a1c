//! `ciyuan bench console`: the API answers behind the console's overview and usage
//! explorer, timed against a real `ciyuan serve` holding an account tree of `nodes`
//! leaves and `events` rated usage events spread over the last 30 days.
//!
//! The overview is the eight requests its page makes at once (today's and the month's
//! usage, the month by child account, model and service, incidents, budgets, wallets);
//! the usage explorer is the week by day and model, and by hour and child account. Each is asked
//! `rounds` times; the target is 300 ms (issue 17).

use anyhow::{Context, bail};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Two models, two token keys each, so every row carries a cost.
const BOOK: &str = r#"name = "list"
currency = "CNY"
[[rules]]
model = "qwen-max"
unit_prices = { "text.input" = "0.0000024", "text.output" = "0.0000096" }
[[rules]]
model = "glm-4"
unit_prices = { "text.input" = "0.000005", "text.output" = "0.000005" }
"#;
const MODELS: [&str; 2] = ["qwen-max", "glm-4"];
/// Leaves per group node: the tree is `bench/g<i>/n<j>`.
const LEAVES_PER_GROUP: u64 = 100;

/// Seconds of each round of one view.
pub struct Timings {
    pub name: &'static str,
    pub seconds: Vec<f64>,
}

/// What one run measured.
pub struct Report {
    pub events: u64,
    pub nodes: u64,
    pub ingest_seconds: f64,
    pub views: Vec<Timings>,
}

/// Runs the benchmark.
pub fn run(events: u64, nodes: u64, rounds: u64, clients: u64) -> anyhow::Result<Report> {
    if events == 0 || nodes == 0 || rounds == 0 || clients == 0 {
        bail!("--events, --nodes, --rounds and --clients must be positive");
    }
    let batch = 1000u64;
    let now = ciyuan_core::jiff::Timestamp::now();
    let span: u64 = 30 * 86_400;
    let start = now.as_second() - span as i64;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-console-{}", hex::encode(seed)));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("ciyuan.toml");
    std::fs::write(
        &config,
        format!("[ingest]\nmax_age_secs = {}\n", span + 86_400),
    )?;
    let admin = format!("cy_{}_{}", hex::encode(&seed[..6]), "c".repeat(64));
    let (guard, url, _pid) = crate::bench_ingest::spawn_server(dir, Some(&config), &admin)?;
    let leaf = |n: u64| {
        format!(
            "bench/g{}/n{:03}",
            n / LEAVES_PER_GROUP,
            n % LEAVES_PER_GROUP
        )
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        for n in 0..nodes {
            http.post(format!("{url}/api/v1/accounts"))
                .bearer_auth(&admin)
                .json(&serde_json::json!({"path": leaf(n), "time_zone": "Asia/Shanghai"}))
                .send()
                .await?
                .error_for_status()?;
        }
        http.patch(format!("{url}/api/v1/accounts/bench"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"time_zone": "Asia/Shanghai"}))
            .send()
            .await?
            .error_for_status()
            .context("setting the tree's time zone")?;
        let from = ciyuan_core::jiff::Timestamp::from_second(start)?;
        http.post(format!(
            "{url}/api/v1/prices?format=toml&effective_from={from}"
        ))
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
                let at = ciyuan_core::jiff::Timestamp::from_second(
                    start + (i * span / events) as i64,
                )
                .unwrap_or(now);
                let model = MODELS[((i / nodes) % MODELS.len() as u64) as usize];
                // Infallible: writing to a String.
                let _ = write!(
                    b,
                    r#"{{"specversion":"1.0","id":"c-{i}","source":"svc://bench","type":"llm.usage","subject":"{}","time":"{at}","data":{{"model":"{model}","input_tokens":{},"output_tokens":{}}}}}"#,
                    leaf(i % nodes),
                    1 + i % 4093,
                    i % 1021
                );
            }
            b.push(']');
            axum::body::Bytes::from(b)
        };
        let started = Instant::now();
        crate::bench_finance::ingest_batches(&http, &url, &admin, clients, requests, body).await?;
        let ingest_seconds = started.elapsed().as_secs_f64();

        // The queries as the console's pages make them, in the node's zone.
        let tz = ciyuan_core::jiff::tz::TimeZone::get("Asia/Shanghai")?;
        let local = now.to_zoned(tz);
        let today = local.start_of_day()?;
        let month = local.first_of_month()?.start_of_day()?;
        let week = today.checked_sub(ciyuan_core::jiff::Span::new().days(6))?;
        let q = |s: &ciyuan_core::jiff::Zoned| s.timestamp().to_string();
        let usage = |extra: String| format!("/api/v1/usage?account=bench&with=cost&tz=Asia/Shanghai&{extra}");
        let overview = vec![
            usage(format!("from={}", q(&today))),
            usage(format!("from={}", q(&month))),
            usage(format!("from={}&group_by=child", q(&month))),
            usage(format!("from={}&group_by=model", q(&month))),
            usage(format!("from={}&group_by=service", q(&month))),
            "/api/v1/incidents?account=bench&limit=10".to_string(),
            "/api/v1/budgets/bench".to_string(),
            "/api/v1/wallets/bench?limit=1".to_string(),
        ];
        let explorer_day = vec![usage(format!("from={}&group_by=model&bucket=day", q(&week)))];
        let explorer_hour = vec![usage(format!("from={}&group_by=child&bucket=hour", q(&week)))];
        let mut views = Vec::new();
        for (name, paths) in [
            ("overview (8 requests at once)", overview),
            ("usage explorer: week by day and model", explorer_day),
            ("usage explorer: week by hour and child account", explorer_hour),
        ] {
            let mut seconds = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                // At once, as the page asks them.
                let asked: Vec<_> = paths
                    .iter()
                    .map(|p| {
                        let req = http.get(format!("{url}{p}")).bearer_auth(&admin);
                        tokio::spawn(async move {
                            req.send().await?.error_for_status()?.bytes().await?;
                            anyhow::Ok(())
                        })
                    })
                    .collect();
                for a in asked {
                    a.await??;
                }
                seconds.push(t.elapsed().as_secs_f64());
            }
            views.push(Timings { name, seconds });
        }
        anyhow::Ok(Report {
            events,
            nodes,
            ingest_seconds,
            views,
        })
    })?;
    drop(guard);
    Ok(report)
}
