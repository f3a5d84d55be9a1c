//! `ciyuan bench ingest`: a real `ciyuan serve` in its own process, fed batches of
//! CloudEvents over loopback HTTP by concurrent clients; every accepted event is
//! durable in the ledger before its request is answered.

use anyhow::{Context, bail};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Figures of one run.
pub struct Report {
    pub events: u64,
    pub events_per_sec: f64,
    pub p50_request_us: u64,
    pub p99_request_us: u64,
    /// Events per second until the projections (usage queries, idempotency index) had
    /// caught up with every event.
    pub projected_events_per_sec: f64,
    /// CPU time the server process spent per event (user + system), in microseconds:
    /// steadier than wall time on a shared machine.
    pub server_cpu_us_per_event: f64,
}

/// The counts of a batch answer.
#[derive(serde::Deserialize)]
struct Counts {
    accepted: u64,
}

/// User plus system CPU seconds a process has used so far (Linux; 0 elsewhere).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; the
    // kernel counts them in USER_HZ, 100 on every Linux architecture Ciyuan targets.
    (ticks(11) + ticks(12)) / 100.0
}

/// Kills the server process when the benchmark ends, however it ends, and removes its
/// directory.
pub(crate) struct Child(std::process::Child, std::path::PathBuf);

/// A `ciyuan serve` of this binary in its own process on a loopback port, with data in
/// `dir/data` (or `dir` itself when `config` is none), `admin` as its bootstrap key and
/// large bodies allowed: the guard that stops it, its URL and its pid.
pub(crate) fn spawn_server(
    dir: std::path::PathBuf,
    config: Option<&std::path::Path>,
    admin: &str,
) -> anyhow::Result<(Child, String, u32)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve");
    match config {
        Some(c) => {
            cmd.arg("--config")
                .arg(c)
                .args(["--listen", "127.0.0.1:0", "--data"])
                .arg(dir.join("data"));
        }
        None => {
            cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(&dir);
        }
    }
    let mut child = cmd
        .env("CIYUAN_BOOTSTRAP_ADMIN_KEY", admin)
        .env("CIYUAN_LOG", "warn")
        .env("CIYUAN_MAX_BODY_BYTES", (64u64 << 20).to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting ciyuan serve")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let pid = child.id();
    let guard = Child(child, dir);
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .context("the server exited before listening")??;
        if let Some(u) = line.strip_prefix("listening on ") {
            break u.to_string();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, url, pid))
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// An event id as producers commonly mint them: a UUID (version 4 layout), here a
/// fixed function of `i` so runs are repeatable, in no order.
fn uuid_like(i: u64) -> String {
    // splitmix64: consecutive inputs give unrelated outputs.
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (mix(2 * i), mix(2 * i + 1));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

pub fn run(
    events: u64,
    batch: u64,
    clients: u64,
    random_ids: bool,
    prices: Option<&std::path::Path>,
) -> anyhow::Result<Report> {
    let prices = prices
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    if batch == 0 || clients == 0 || events == 0 {
        bail!("--events, --batch and --clients must be positive");
    }
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-ingest-{}", random_hex(6)?));
    let admin = format!("cy_{}_{}", random_hex(6)?, random_hex(32)?);
    let (guard, url, pid) = spawn_server(dir, None, &admin)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let post = |path: &str, body: serde_json::Value, key: &str| {
            http.post(format!("{url}{path}")).bearer_auth(key).json(&body).send()
        };
        post("/api/v1/accounts", serde_json::json!({"path": "bench/app"}), &admin).await?.error_for_status()?;
        if let Some(file) = prices {
            // The book named `list` rates every event as it is appended.
            http.post(format!("{url}/api/v1/prices?format=litellm"))
                .bearer_auth(&admin)
                .header("content-type", "application/json")
                .body(file)
                .send()
                .await?
                .error_for_status()?;
        }
        let key: serde_json::Value = post(
            "/api/v1/keys",
            serde_json::json!({"account": "bench", "scopes": ["ingest"]}),
            &admin,
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        let key = key["key"].as_str().context("no key")?.to_string();
        let health = || async {
            let h: serde_json::Value = http.get(format!("{url}/healthz")).send().await?.json().await?;
            anyhow::Ok((h["entries"].as_u64().unwrap_or(0), h["projected"].as_u64().unwrap_or(0)))
        };
        let (entries_before, _) = health().await?;
        let requests = events.div_ceil(batch);
        // Every request body is written before the clock starts, as load generators do:
        // the client shares the two cores with the server, and what is measured is the
        // server's rate, not how fast this process formats JSON.
        let bodies: Vec<axum::body::Bytes> = (0..requests)
            .map(|r| {
                let first = r * batch;
                let n = batch.min(events - first);
                let mut body = String::with_capacity(n as usize * 220);
                body.push('[');
                for i in first..first + n {
                    if i > first {
                        body.push(',');
                    }
                    let id = if random_ids { uuid_like(i) } else { format!("ev-{i}") };
                    let _ = write!(
                        body,
                        r#"{{"specversion":"1.0","id":"{id}","source":"svc://bench","type":"llm.usage","subject":"bench/app","data":{{"model":"gpt-4o","input_tokens":{},"output_tokens":{}}}}}"#,
                        i % 997,
                        i % 101
                    );
                }
                body.push(']');
                axum::body::Bytes::from(body)
            })
            .collect();
        let bodies = std::sync::Arc::new(bodies);
        let cpu_before = cpu_seconds(pid);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, url, key, next, bodies) =
                (http.clone(), url.clone(), key.clone(), next.clone(), bodies.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if r >= requests {
                        break;
                    }
                    let body = bodies[r as usize].clone();
                    let n = batch.min(events - r * batch);
                    let t = Instant::now();
                    let resp = http
                        .post(format!("{url}/v1/events"))
                        .bearer_auth(&key)
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body)
                        .send()
                        .await?
                        .error_for_status()?;
                    // The answer is read whole but its per-event results are not parsed
                    // (the client shares the cores): the first answer is checked here,
                    // and every event by the ledger's growth at the end.
                    let answer = resp.bytes().await?;
                    latencies.push(t.elapsed().as_micros() as u64);
                    if r == 0 {
                        let counts: Counts = serde_json::from_slice(&answer)?;
                        if counts.accepted != n {
                            bail!("only {} of the first {n} events were accepted", counts.accepted);
                        }
                    }
                }
                anyhow::Ok(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await??);
        }
        let seconds = started.elapsed().as_secs_f64();
        // Every request was answered after its events were durable: the ledger holds
        // exactly one entry per event sent.
        let (entries, _) = health().await?;
        if entries - entries_before != events {
            bail!("{} of {events} events reached the ledger", entries - entries_before);
        }
        // Wait for the projector to apply every entry.
        let projected_seconds = loop {
            let (entries, projected) = health().await?;
            if projected >= entries {
                break started.elapsed().as_secs_f64();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let cpu = cpu_seconds(pid) - cpu_before;
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        anyhow::Ok(Report {
            events,
            events_per_sec: events as f64 / seconds,
            p50_request_us: pct(0.50),
            p99_request_us: pct(0.99),
            projected_events_per_sec: events as f64 / projected_seconds,
            server_cpu_us_per_event: cpu * 1e6 / events as f64,
        })
    })?;
    drop(guard);
    Ok(report)
}
