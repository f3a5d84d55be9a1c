//! `ciyuan bench gateway`: what the gateway adds on top of the provider it relays.
//!
//! One run starts `ciyuan sim` (the simulated provider, answering at once) and
//! `ciyuan serve` (fresh data directory, the sim as its only provider) as child
//! processes, and measures with the same client code against both:
//!
//! 1. added latency: open-loop load at a fixed rate of small non-streaming chat
//!    completions, directly against the sim and through the gateway; each latency
//!    counts from the request's scheduled send time, so a stall delays the requests
//!    behind it instead of hiding them (no coordinated omission);
//! 2. throughput: a closed loop of concurrent clients, directly and through the gateway;
//! 3. memory: many concurrent slow streams through the gateway while its resident
//!    memory is sampled from `/proc`.
//!
//! Direct and gateway measurements alternate in slices of about a second, so both
//! see the same background load on a shared machine.
//!
//! Every response must be `200` and every stream must end with `[DONE]`; the run
//! reports any that did not.

use anyhow::{Context, bail};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
pub struct Options {
    /// Requests per second of the open-loop latency phase.
    pub rate: f64,
    /// Seconds of each latency and throughput measurement.
    pub seconds: f64,
    /// Concurrent clients of the throughput phase.
    pub concurrency: usize,
    /// Concurrent streams of the memory phase.
    pub streams: usize,
    /// A LiteLLM price table to import first, with a wallet funded for the account:
    /// every request is then priced, held in the wallet and settled as a posting.
    pub prices: Option<std::path::PathBuf>,
    /// The hostile tenant ([`Controls`]): every control set from above, each request
    /// carrying a session and the most tags recorded.
    pub controls: bool,
    /// Gateway nodes on one PostgreSQL database (`CIYUAN_DATABASE`); more than one
    /// adds a throughput run spread over all of them.
    pub nodes: usize,
}

/// Output tokens of each small completion.
const SMALL_OUTPUT_TOKENS: &str = "16";
/// Output tokens and pacing of each stream of the memory phase: 5 s per stream.
const STREAM_OUTPUT_TOKENS: &str = "100";
const STREAM_TOKENS_PER_SEC: &str = "20";

const SMALL_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":32}"#;
const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Tell the benchmark a short story."}],"max_tokens":200,"stream":true}"#;

/// Latency of one open-loop run, in microseconds from each request's scheduled time.
#[derive(Clone, Copy, Default)]
pub struct Latency {
    pub requests: u64,
    /// Requests sent per second over the run (the schedule, if the client kept up).
    pub achieved_rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// p99 of how late a request's task started against its schedule: the client's
    /// own delay, part of every figure above.
    pub client_late_p99_us: u64,
    /// CPU (user + system) the gateway process spent per request, microseconds.
    pub gateway_cpu_us: f64,
    /// That CPU by room of the gateway ([`THREAD_ROOMS`]), per request: at a rate
    /// below saturation the threads sleep between requests, so what each wakes for
    /// shows here as it does not at full load.
    pub gateway_cpu_rooms_us: [f64; 5],
    /// CPU the sim process spent per request, microseconds.
    pub sim_cpu_us: f64,
}

/// One closed-loop run.
#[derive(Clone, Copy, Default)]
pub struct Throughput {
    pub requests: u64,
    pub per_sec: f64,
    pub gateway_cpu_us: f64,
    pub sim_cpu_us: f64,
    /// CPU the benchmark's own client spent per request, microseconds.
    pub client_cpu_us: f64,
}

/// The memory phase.
#[derive(Clone, Copy, Default)]
pub struct Memory {
    /// The gateway's resident memory once it listened, before any request, in KiB.
    pub rss_start_kb: u64,
    /// ... and after its first second of gateway calls (the model's tokenizer loaded
    /// for the recount, connections and caches warm), in KiB.
    pub rss_warm_kb: u64,
    pub streams: usize,
    /// Streams that answered 200 and ended with `[DONE]`.
    pub completed: usize,
    /// Most streams open at the same time (headers received, body not yet ended).
    pub max_open: usize,
    pub seconds: f64,
    /// The gateway's resident memory just before the streams, in KiB.
    pub rss_before_kb: u64,
    /// The highest resident memory sampled (every 10 ms) while the streams ran.
    pub rss_peak_kb: u64,
    /// Streams open when that peak was sampled.
    pub open_at_peak: usize,
    /// Resident memory once every stream had ended.
    pub rss_after_kb: u64,
    /// The kernel's high-water mark of resident memory over the process's whole life
    /// (VmHWM), after the memory phase; includes the earlier phases.
    pub hwm_kb: u64,
}

/// Figures of one run.
pub struct Report {
    pub latency_direct: Latency,
    pub latency_gateway: Latency,
    /// Gateway minus direct, microseconds.
    pub added_p50_us: i64,
    pub added_p99_us: i64,
    pub added_p999_us: i64,
    pub throughput_direct: Throughput,
    pub throughput_gateway: Throughput,
    /// Gateway requests/s over direct requests/s.
    pub throughput_ratio: f64,
    pub memory: Memory,
    /// Responses checked in all (every phase, warm-ups included).
    pub responses: u64,
    /// What went wrong: non-200 answers, transport errors, streams without `[DONE]`.
    pub problems: Vec<String>,
    /// Throughput with the clients spread over every node (more than one node).
    pub throughput_nodes: Option<Throughput>,
    /// With `--controls`: what the limits counted ([`controls_counted`]).
    pub controls: Option<String>,
}

/// User plus system CPU seconds a process has used so far (Linux; 0 elsewhere).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, in USER_HZ (100).
    (ticks(11) + ticks(12)) / 100.0
}

/// User and system CPU seconds of processes `pids` and their children, from
/// `/proc/PID/stat` (0 for one that cannot be read).
fn cpu_split(pids: &[u32]) -> (f64, f64) {
    let mut all = pids.to_vec();
    for pid in pids {
        // Each thread lists the children it started.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                all.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    let (mut user, mut system) = (0.0, 0.0);
    for pid in all {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime, in USER_HZ (100).
        user += ticks(11) / 100.0;
        system += ticks(12) / 100.0;
    }
    (user, system)
}

/// The rooms of the gateway's process whose CPU [`thread_cpu`] tells apart, by their
/// threads' names.
pub const THREAD_ROOMS: [&str; 5] = ["request threads", "runtime", "ledger", "projector", "other"];

/// CPU seconds (user + system) of each of [`THREAD_ROOMS`] in process `pid` so far, from
/// `/proc/PID/task/*/stat` (threads that have ended are not counted: the gateway's
/// live for as long as it serves).
fn thread_cpu(pid: u32) -> [f64; 5] {
    let mut rooms = [0.0; 5];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return rooms;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        // The kernel keeps 15 bytes of a thread's name.
        let name = &stat[open + 1..close];
        let room = if name.starts_with("ciyuan-http") {
            0
        } else if name.starts_with("tokio-runtime") {
            1
        } else if name.starts_with("ciyuan-ledger") {
            2
        } else if name.starts_with("ciyuan-project") {
            3
        } else {
            4
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        rooms[room] += (ticks(11) + ticks(12)) / 100.0;
    }
    rooms
}

/// Adds to `sums` the CPU seconds each room of process `pid` spent since `before`
/// (a [`thread_cpu`] reading).
fn add_thread_cpu_since(sums: &mut [f64; 5], before: [f64; 5], pid: u32) {
    for (sum, (now, before)) in sums.iter_mut().zip(thread_cpu(pid).into_iter().zip(before)) {
        *sum += now - before;
    }
}

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM); 0 when unreadable.
fn status_kb(pid: u32, field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kills a child process when the benchmark ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the benchmark's directory (data and configuration) when it ends.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `cmd` and waits for its `listening on URL` line; the rest of its standard
/// output is drained by a thread.
fn start(mut cmd: Command, what: &str) -> anyhow::Result<(Child, String)> {
    let mut child = cmd
        .env("CIYUAN_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let guard = Child(child);
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .with_context(|| format!("{what} exited before listening"))??;
        if let Some(u) = line.strip_prefix("listening on ") {
            break u.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, url))
}

pub(crate) fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// Counts answers and keeps the first few problems.
#[derive(Default)]
struct Checks {
    responses: AtomicU64,
    failed: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Checks {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.problems.lock()
            && p.len() < 10
        {
            p.push(what);
        }
    }
}

/// Where requests go, with the client and the key.
#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    auth: HeaderValue,
    /// The tenant's own headers ([`Controls::headers`]); empty without `--controls`.
    extra: reqwest::header::HeaderMap,
    http: reqwest::Client,
    checks: Arc<Checks>,
}

impl Target {
    /// One small non-streaming chat completion; whether it answered 200.
    async fn call(&self) -> bool {
        self.checks.responses.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .http
            .post(&self.url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-sim-output-tokens", SMALL_OUTPUT_TOKENS)
            .headers(self.extra.clone())
            .body(SMALL_BODY)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.checks.fail(format!("{}: {e}", self.name));
                return false;
            }
        };
        let status = resp.status();
        match resp.bytes().await {
            Ok(b) if status == reqwest::StatusCode::OK && b.starts_with(b"{") => true,
            Ok(b) => {
                let shown = String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
                self.checks
                    .fail(format!("{}: status {status}: {shown}", self.name));
                false
            }
            Err(e) => {
                self.checks
                    .fail(format!("{}: reading the answer: {e}", self.name));
                false
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank.
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Which client sends an open loop's requests.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// A thread sleeps to each due time and spawns the request on the runtime
    /// ([`spawned_run`]): any target, costly on the machine it measures.
    Spawned,
    /// One thread writes each request at its due time (`open_loop.rs`): plain-http
    /// targets (others fall back to [`Client::Spawned`]).
    Paced,
}

/// Open loop: request `i` is due at `start + i / rate`, whenever earlier ones answer;
/// the slice's latencies, and the CPU the gateway and the provider spent, added to
/// `into`.
async fn open_loop(
    t: &Target,
    rate: f64,
    seconds: f64,
    pids: (u32, u32),
    into: &mut OpenSamples,
    client: Client,
) -> anyhow::Result<()> {
    let cpu = (cpu_seconds(pids.0), cpu_seconds(pids.1));
    let rooms = thread_cpu(pids.0);
    let run = if client == Client::Paced && t.url.starts_with("http://") {
        paced_run(t, rate, seconds).await?
    } else {
        spawned_run(t, rate, seconds).await?
    };
    into.cpu.0 += cpu_seconds(pids.0) - cpu.0;
    into.cpu.1 += cpu_seconds(pids.1) - cpu.1;
    add_thread_cpu_since(&mut into.rooms, rooms, pids.0);
    into.lat.extend(run.lat);
    into.late.extend(run.late);
    into.sent_secs += run.sent_secs;
    Ok(())
}

/// [`Client::Spawned`]'s run; each request's failure is counted by [`Target::call`].
async fn spawned_run(
    t: &Target,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<crate::open_loop::Paced> {
    let n = (rate * seconds).round().max(1.0) as u64;
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(10);
    let t2 = t.clone();
    let (tasks, sent_for) = tokio::task::spawn_blocking(move || {
        let mut tasks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let t = t2.clone();
            tasks.push(handle.spawn(async move {
                let late = due.elapsed();
                let ok = t.call().await;
                (due.elapsed(), late, ok)
            }));
        }
        (tasks, start.elapsed())
    })
    .await?;
    let mut run = crate::open_loop::Paced {
        sent_secs: sent_for.as_secs_f64(),
        ..Default::default()
    };
    for task in tasks {
        let (l, s, _ok) = task.await?;
        run.lat.push(l.as_micros() as u64);
        run.late.push(s.as_micros() as u64);
    }
    Ok(run)
}

/// Connections of the paced open-loop client: enough that a request rarely waits for
/// one (at 10,000 requests/s and a few hundred microseconds each, a handful are busy).
const PACED_CONNECTIONS: usize = 64;

/// [`Client::Paced`]'s run; its failures are counted in the target's checks here.
async fn paced_run(t: &Target, rate: f64, seconds: f64) -> anyhow::Result<crate::open_loop::Paced> {
    let auth = t.auth.to_str().context("the key as a header")?.to_string();
    let request = crate::open_loop::Request::post(
        &t.url,
        &[
            ("authorization", &auth),
            ("x-sim-output-tokens", SMALL_OUTPUT_TOKENS),
        ],
        SMALL_BODY,
    )?;
    let mut run = tokio::task::spawn_blocking(move || {
        crate::open_loop::run(
            &request,
            rate,
            seconds,
            PACED_CONNECTIONS,
            Duration::from_secs(30),
        )
    })
    .await??;
    t.checks
        .responses
        .fetch_add(run.late.len() as u64, Ordering::Relaxed);
    // `fail` counts each problem it is given; the failures beyond those listed count
    // too.
    let unlisted = run.failed - run.problems.len() as u64;
    for problem in std::mem::take(&mut run.problems) {
        t.checks.fail(format!("{}: {problem}", t.name));
    }
    t.checks.failed.fetch_add(unlisted, Ordering::Relaxed);
    Ok(run)
}

/// Open-loop slices of one target, merged.
#[derive(Default)]
struct OpenSamples {
    /// Latency of each request from its scheduled time, microseconds.
    lat: Vec<u64>,
    /// How late each request's task started.
    late: Vec<u64>,
    /// Seconds spent sending.
    sent_secs: f64,
    /// CPU seconds of the gateway and the sim.
    cpu: (f64, f64),
    /// The gateway's CPU seconds by room ([`THREAD_ROOMS`]).
    rooms: [f64; 5],
}

impl OpenSamples {
    fn latency(mut self) -> Latency {
        self.lat.sort_unstable();
        self.late.sort_unstable();
        let n = self.lat.len() as u64;
        let per = |c: f64| c * 1e6 / n.max(1) as f64;
        Latency {
            requests: n,
            achieved_rate: n as f64 / self.sent_secs,
            p50_us: percentile(&self.lat, 0.50),
            p99_us: percentile(&self.lat, 0.99),
            p999_us: percentile(&self.lat, 0.999),
            max_us: self.lat.last().copied().unwrap_or(0),
            client_late_p99_us: percentile(&self.late, 0.99),
            gateway_cpu_us: per(self.cpu.0),
            gateway_cpu_rooms_us: self.rooms.map(per),
            sim_cpu_us: per(self.cpu.1),
        }
    }
}

/// Closed-loop slices of one target, merged.
#[derive(Default)]
struct ClosedSamples {
    requests: u64,
    secs: f64,
    /// CPU seconds of the gateway, the sim and this process.
    cpu: (f64, f64, f64),
}

impl ClosedSamples {
    fn throughput(&self) -> Throughput {
        let per = |c: f64| c * 1e6 / self.requests.max(1) as f64;
        Throughput {
            requests: self.requests,
            per_sec: self.requests as f64 / self.secs,
            gateway_cpu_us: per(self.cpu.0),
            sim_cpu_us: per(self.cpu.1),
            client_cpu_us: per(self.cpu.2),
        }
    }
}

/// Closed loop: `concurrency` clients each send the next request when the last one
/// answered, until `seconds` have passed.
async fn closed_loop(
    t: &Target,
    concurrency: usize,
    seconds: f64,
    pids: (u32, u32),
    into: &mut ClosedSamples,
) -> anyhow::Result<()> {
    let me = std::process::id();
    let cpu = (cpu_seconds(pids.0), cpu_seconds(pids.1), cpu_seconds(me));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                t.call().await;
                n += 1;
            }
            n
        }));
    }
    let mut requests = 0;
    for task in tasks {
        requests += task.await?;
    }
    into.requests += requests;
    into.secs += started.elapsed().as_secs_f64();
    into.cpu.0 += cpu_seconds(pids.0) - cpu.0;
    into.cpu.1 += cpu_seconds(pids.1) - cpu.1;
    into.cpu.2 += cpu_seconds(me) - cpu.2;
    Ok(())
}

/// Closed loop over several nodes: client `i` calls node `i % nodes`; the CPU is
/// every node's.
async fn closed_loop_nodes(
    targets: &[Target],
    concurrency: usize,
    seconds: f64,
    pids: &[u32],
) -> anyhow::Result<Throughput> {
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let t = targets[i % targets.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                t.call().await;
                n += 1;
            }
            n
        }));
    }
    let mut requests = 0;
    for task in tasks {
        requests += task.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
    Ok(Throughput {
        requests,
        per_sec: requests as f64 / secs,
        gateway_cpu_us: cpu * 1e6 / requests.max(1) as f64,
        sim_cpu_us: 0.0,
        client_cpu_us: 0.0,
    })
}

/// `streams` concurrent slow streams through the gateway (started over about a
/// second), the gateway's resident memory sampled every 10 ms meanwhile.
async fn memory(
    t: &Target,
    streams: usize,
    gateway_pid: u32,
    (rss_start_kb, rss_warm_kb): (u64, u64),
) -> anyhow::Result<Memory> {
    let rss_before_kb = status_kb(gateway_pid, "VmRSS");
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (open, stop) = (open.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut peak, mut open_at_peak) = (0u64, 0usize);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let rss = status_kb(gateway_pid, "VmRSS");
                if rss > peak {
                    peak = rss;
                    open_at_peak = open.load(Ordering::Relaxed);
                }
            }
            (peak, open_at_peak)
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        if i > 0 && i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (t, open, max_open) = (t.clone(), open.clone(), max_open.clone());
        tasks.push(tokio::spawn(async move {
            t.checks.responses.fetch_add(1, Ordering::Relaxed);
            let sent = t
                .http
                .post(&t.url)
                .header(AUTHORIZATION, t.auth.clone())
                .header(CONTENT_TYPE, "application/json")
                .header("x-sim-ttft-ms", "0")
                .header("x-sim-tokens-per-sec", STREAM_TOKENS_PER_SEC)
                .header("x-sim-output-tokens", STREAM_OUTPUT_TOKENS)
                .body(STREAM_BODY)
                .timeout(Duration::from_secs(120))
                .send()
                .await;
            let mut resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    t.checks.fail(format!("stream {i}: {e}"));
                    return false;
                }
            };
            let status = resp.status();
            let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
            max_open.fetch_max(now_open, Ordering::Relaxed);
            let mut body = Vec::new();
            let read = loop {
                match resp.chunk().await {
                    Ok(Some(c)) => body.extend_from_slice(&c),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            open.fetch_sub(1, Ordering::Relaxed);
            let done = body
                .windows(b"data: [DONE]".len())
                .any(|w| w == b"data: [DONE]");
            match read {
                Ok(()) if status == reqwest::StatusCode::OK && done => true,
                Ok(()) => {
                    let tail = String::from_utf8_lossy(&body[body.len().saturating_sub(200)..])
                        .into_owned();
                    t.checks.fail(format!(
                        "stream {i}: status {status}, no [DONE]; ends {tail:?}"
                    ));
                    false
                }
                Err(e) => {
                    t.checks.fail(format!("stream {i}: reading: {e}"));
                    false
                }
            }
        }));
    }
    let mut completed = 0;
    for task in tasks {
        if task.await? {
            completed += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (rss_peak_kb, open_at_peak) = sampler.await?;
    Ok(Memory {
        rss_start_kb,
        rss_warm_kb,
        streams,
        completed,
        max_open: max_open.load(Ordering::Relaxed),
        seconds,
        rss_before_kb,
        rss_peak_kb,
        open_at_peak,
        rss_after_kb: status_kb(gateway_pid, "VmRSS"),
        hwm_kb: status_kb(gateway_pid, "VmHWM"),
    })
}

/// The benches' HTTP client: pooled, without Nagle's delay, never through a proxy.
fn bench_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
}

/// The hostile tenant (`--controls`): what a platform team sets from above on a
/// subsidiary's tree, all at once, and a tenant whose requests carry everything the
/// gateway records. Measured beside the bare key, it shows what the controls cost a
/// request (each is checked on every request, on the key's node and every ancestor).
///
/// - a tree four levels deep, the key on the leaf ([`Controls::NODE`]);
/// - hard token limits on every level (month at the top, then day, hour, and a soft
///   minute limit on the leaf), a request limit per key a minute, a token limit per
///   session a day, a per-request limit that clamps `max_tokens`, and a money limit
///   a month at the top when prices are given (its wallet funded there);
/// - model rules (an allow list and a deny list) at the top;
/// - every request with a session (`x-ciyuan-session`) and [`ciyuan_core::MAX_TAGS`]
///   tags (`x-ciyuan-tags`), the most recorded, each a quarter of the longest key and
///   value allowed.
///
/// The limits are far above what a run uses: a refused request would measure the
/// refusal, not the controls. Disconnects are not part of it (wrk never hangs up);
/// the gateway's tests hold what a hang-up must leave behind.
struct Controls;

impl Controls {
    /// The key's node.
    const NODE: &'static str = "bench/bu/team/app";

    /// The tenant's headers on every request (none without controls).
    fn headers(on: bool) -> Vec<(&'static str, String)> {
        if !on {
            return Vec::new();
        }
        let key_len = ciyuan_core::MAX_TAG_KEY_BYTES / 4;
        let value_len = ciyuan_core::MAX_TAG_VALUE_BYTES / 4;
        let tags: Vec<String> = (0..ciyuan_core::MAX_TAGS)
            .map(|i| {
                let key = format!("{:k$}", format!("tag{i:02}"), k = key_len).replace(' ', "k");
                let value =
                    format!("{:v$}", format!("value{i:02}"), v = value_len).replace(' ', "v");
                format!("{key}={value}")
            })
            .collect();
        vec![
            ("x-ciyuan-session", "bench-session-0001".to_string()),
            ("x-ciyuan-tags", tags.join(",")),
        ]
    }

    /// [`Controls::headers`] as a header map (empty without controls).
    fn header_map(on: bool) -> anyhow::Result<reqwest::header::HeaderMap> {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in Controls::headers(on) {
            map.insert(name, HeaderValue::from_str(&value)?);
        }
        Ok(map)
    }

    /// Limits on each node, top first: `PUT /api/v1/budgets/{node}` bodies.
    fn limits(money: bool) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        let huge = 1_000_000_000_000u64;
        let mut limits = vec![
            (
                "bench",
                json!({"name": "tokens-month", "tokens": huge, "period": "month", "mode": "hard"}),
            ),
            (
                "bench/bu",
                json!({"name": "tokens-day", "tokens": huge, "period": "day", "mode": "hard"}),
            ),
            (
                "bench/bu",
                json!({"name": "rpm-per-key", "requests": huge, "period": "minute", "per": "key", "mode": "hard"}),
            ),
            (
                "bench/bu/team",
                json!({"name": "tokens-hour", "tokens": huge, "period": "hour", "mode": "hard"}),
            ),
            (
                "bench/bu/team",
                json!({"name": "per-session", "tokens": huge, "period": "day", "per": "session", "mode": "hard"}),
            ),
            (
                "bench/bu/team",
                json!({"name": "per-request", "tokens": 8000, "period": "lifetime", "per": "request", "clamp": true}),
            ),
            (
                "bench/bu/team/app",
                json!({"name": "tokens-minute", "tokens": huge, "period": "minute", "mode": "soft"}),
            ),
        ];
        if money {
            limits.push((
                "bench",
                json!({"name": "money-month", "amount": "1000000000", "currency": "USD", "period": "month", "mode": "hard"}),
            ));
        }
        limits
    }
}

/// After a `--controls` run: reads the key's node's live limits and says what they
/// counted, or why the run did not measure the controls (a limit missing, or one
/// that counts usage with nothing counted: the requests went around it).
///
/// A window that began in the run's last moments (a new minute, hour or day) holds
/// only the requests whose metering, which follows the answer, had not finished: one
/// more request through `gateway` is sent and the view read again for up to 2 s, so
/// a window's turn is not taken for a limit that counts nothing.
async fn controls_counted(
    http: &reqwest::Client,
    gw_url: &str,
    admin: &str,
    money: bool,
    gateway: &Target,
) -> anyhow::Result<Result<String, String>> {
    let read = || async {
        let view: serde_json::Value = http
            .get(format!("{gw_url}/api/v1/budgets/{}", Controls::NODE))
            .bearer_auth(admin)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::Ok(Controls::counted(&view, money))
    };
    let mut counted = read().await?;
    if counted.is_err() && gateway.call().await {
        let until = Instant::now() + Duration::from_secs(2);
        while counted.is_err() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            counted = read().await?;
        }
    }
    Ok(counted)
}

impl Controls {
    /// [`controls_counted`] on the live view read.
    fn counted(view: &serde_json::Value, money: bool) -> Result<String, String> {
        let shown = view["limits"].as_array().cloned().unwrap_or_default();
        let mut counted = Vec::new();
        for (node, limit) in Controls::limits(money) {
            let name = limit["name"].as_str().unwrap_or_default();
            let rows: Vec<&serde_json::Value> = shown
                .iter()
                .filter(|l| l["node"] == node && l["name"] == name)
                .collect();
            if rows.is_empty() {
                return Err(format!("limit {name} on {node} is not in force"));
            }
            if limit["per"] == "request" {
                continue;
            }
            let used: i128 = rows
                .iter()
                .map(|l| match l["cost"]["used"].as_str() {
                    // A money limit: whether it holds any cost (exact decimal text).
                    Some(u) => ciyuan_core::decimal_from_text(u)
                        .map_or(0, |d| i128::from(d.is_sign_positive() && !d.is_zero())),
                    None => l["used"].as_i64().map_or(0, i128::from),
                })
                .sum();
            if used <= 0 {
                return Err(format!("limit {name} on {node} counted nothing"));
            }
            counted.push(name.to_string());
        }
        let rules = view["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|r| r["node"] == "bench"));
        if !rules {
            return Err("the model rules on bench are not in force".into());
        }
        Ok(format!(
            "{} limits on {} and its ancestors counted the run ({}), the per-request clamp and the model rules in force",
            counted.len(),
            Controls::NODE,
            counted.join(", ")
        ))
    }
}

/// Sets up the gateway under test: the `bench` node (or, with `controls`, the tree
/// and limits of [`Controls`]), LiteLLM's table and a funded wallet when `prices` is
/// given, and a gateway key on the node, which it answers.
async fn bench_key(
    http: &reqwest::Client,
    gw_url: &str,
    admin: &str,
    prices: Option<&[u8]>,
    controls: bool,
) -> anyhow::Result<String> {
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{gw_url}{path}"))
            .bearer_auth(admin)
            .json(&body)
            .send()
    };
    let node = if controls { Controls::NODE } else { "bench" };
    let lineage = ciyuan_core::AccountPath::parse(node)
        .map_err(|e| anyhow::anyhow!("the bench's node {node}: {e}"))?
        .lineage();
    for path in lineage {
        post(
            "/api/v1/accounts",
            serde_json::json!({ "path": path.as_str() }),
        )
        .await?
        .error_for_status()?;
    }
    if let Some(file) = prices {
        http.post(format!("{gw_url}/api/v1/prices?format=litellm"))
            .bearer_auth(admin)
            .header("content-type", "application/json")
            .body(file.to_vec())
            .send()
            .await?
            .error_for_status()?;
        post(
            "/api/v1/wallets/bench",
            serde_json::json!({"kind": "topup", "amount": "1000000", "currency": "USD"}),
        )
        .await?
        .error_for_status()?;
    }
    if controls {
        for (node, limit) in Controls::limits(prices.is_some()) {
            let sent = http
                .put(format!("{gw_url}/api/v1/budgets/{node}"))
                .bearer_auth(admin)
                .json(&limit)
                .send()
                .await?;
            let status = sent.status();
            if !status.is_success() {
                bail!(
                    "setting {limit} on {node}: {status}: {}",
                    sent.text().await?
                );
            }
        }
        http.put(format!("{gw_url}/api/v1/access/bench"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"allow": ["gpt-4o*", "qwen*", "claude-*"], "deny": ["gpt-4o-audio*", "*-realtime*"]}))
            .send()
            .await?
            .error_for_status()?;
    }
    let key: serde_json::Value = post(
        "/api/v1/keys",
        serde_json::json!({"account": node, "scopes": ["gateway"]}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    Ok(key["key"]
        .as_str()
        .context("no key in the answer")?
        .to_string())
}

/// Prepares the bench's tenant on the gateway running at `url` (`admin` its admin
/// key) and returns, as JSON, the key (`key`) and the headers (`headers`, name to
/// value) its requests carry: `ciyuan bench gateway --setup`.
pub fn setup(
    url: &str,
    admin: &str,
    prices: Option<&std::path::Path>,
    controls: bool,
) -> anyhow::Result<serde_json::Value> {
    let url = url.trim_end_matches('/');
    let prices = prices
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = bench_client()?;
    let key = rt.block_on(bench_key(&http, url, admin, prices.as_deref(), controls))?;
    let headers: serde_json::Map<String, serde_json::Value> = Controls::headers(controls)
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.into()))
        .collect();
    Ok(serde_json::json!({ "key": key, "headers": headers }))
}

pub fn run(o: Options) -> anyhow::Result<Report> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(o.rate) || !positive(o.seconds) {
        bail!("--rate and --seconds must be positive");
    }
    let prices = o
        .prices
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    if o.concurrency == 0 {
        bail!("--concurrency must be positive");
    }
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-gateway-{}", random_hex(6)?));
    std::fs::create_dir_all(&dir)?;
    let dir = Dir(dir);

    // The provider: answers at once (no time to first token, no pacing) unless a
    // request's x-sim-* headers say otherwise.
    let mut sim = Command::new(&exe);
    sim.args([
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
    ]);
    let (sim_guard, sim_url) = start(sim, "ciyuan sim")?;
    let sim_pid = sim_guard.0.id();

    // The gateway, with the sim as its only provider.
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[providers]]\nname = \"sim\"\nprotocol = \"openai\"\nbase_url = \"{sim_url}/v1\"\nmodels = [\"*\"]\nforward_headers = [\"x-sim-*\"]\n"
        ),
    )?;
    let admin = format!("cy_{}_{}", random_hex(6)?, random_hex(32)?);
    let mut serve = Command::new(&exe);
    serve
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.0.join("data"))
        .env("CIYUAN_BOOTSTRAP_ADMIN_KEY", &admin);
    let (gw_guard, gw_url) = start(serve, "ciyuan serve")?;
    let gw_pid = gw_guard.0.id();
    let pids = (gw_pid, sim_pid);
    // More nodes on the same database, each with a copy of the log's signing key.
    if o.nodes > 1 && std::env::var_os("CIYUAN_DATABASE").is_none() {
        bail!("--nodes above 1 needs CIYUAN_DATABASE (the nodes share one PostgreSQL database)");
    }
    let mut more = Vec::new();
    for n in 1..o.nodes {
        let data = dir.0.join(format!("data{n}"));
        std::fs::create_dir_all(&data)?;
        for f in ["signing.key", "public.key"] {
            std::fs::copy(dir.0.join("data").join(f), data.join(f))
                .with_context(|| format!("copying the first node's {f}"))?;
        }
        let mut serve = Command::new(&exe);
        serve
            .arg("--config")
            .arg(&config)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data);
        more.push(start(serve, "another ciyuan serve")?);
    }
    let node_urls: Vec<String> = std::iter::once(gw_url.clone())
        .chain(more.iter().map(|(_, u)| u.clone()))
        .collect();
    let node_pids: Vec<u32> = std::iter::once(gw_pid)
        .chain(more.iter().map(|(g, _)| g.0.id()))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        let http = bench_client()?;
        let key = &bench_key(&http, &gw_url, &admin, prices.as_deref(), o.controls).await?;
        let rss_start_kb = status_kb(gw_pid, "VmRSS");
        let checks = Arc::new(Checks::default());
        let auth = HeaderValue::from_str(&format!("Bearer {key}"))?;
        let direct = Target {
            name: "direct",
            url: format!("{sim_url}/v1/chat/completions"),
            auth: auth.clone(),
            extra: Controls::header_map(o.controls)?,
            http: http.clone(),
            checks: checks.clone(),
        };
        let gateway = Target {
            name: "gateway",
            url: format!("{gw_url}/v1/chat/completions"),
            ..direct.clone()
        };

        // Direct and gateway runs alternate in slices of about a second (which goes
        // first alternating too), so both see the same background load on a shared
        // machine. A first slice of each warms connections, the key cache and the
        // tokenizers; it is not counted.
        let slices = o.seconds.ceil().max(1.0) as usize;
        let slice = o.seconds / slices as f64;
        let warm = o.seconds.min(1.0);

        // 1. Added latency.
        let (mut direct_open, mut gateway_open) = (OpenSamples::default(), OpenSamples::default());
        for t in [&direct, &gateway] {
            let warming = &mut OpenSamples::default();
            open_loop(t, o.rate, warm, pids, warming, Client::Spawned).await?;
        }
        let rss_warm_kb = status_kb(gw_pid, "VmRSS");
        for i in 0..slices {
            let mut runs = [(&direct, &mut direct_open), (&gateway, &mut gateway_open)];
            if i % 2 == 1 {
                runs.reverse();
            }
            for (t, into) in runs {
                open_loop(t, o.rate, slice, pids, into, Client::Spawned).await?;
            }
        }
        let (latency_direct, latency_gateway) = (direct_open.latency(), gateway_open.latency());

        // 2. Throughput.
        let (mut direct_closed, mut gateway_closed) =
            (ClosedSamples::default(), ClosedSamples::default());
        closed_loop(
            &direct,
            o.concurrency,
            warm,
            pids,
            &mut ClosedSamples::default(),
        )
        .await?;
        closed_loop(
            &gateway,
            o.concurrency,
            warm,
            pids,
            &mut ClosedSamples::default(),
        )
        .await?;
        for i in 0..slices {
            let mut runs = [
                (&direct, &mut direct_closed),
                (&gateway, &mut gateway_closed),
            ];
            if i % 2 == 1 {
                runs.reverse();
            }
            for (t, into) in runs {
                closed_loop(t, o.concurrency, slice, pids, into).await?;
            }
        }
        let (throughput_direct, throughput_gateway) =
            (direct_closed.throughput(), gateway_closed.throughput());
        // 2b. Throughput over every node (several nodes on one database).
        let throughput_nodes = if node_urls.len() > 1 {
            let targets: Vec<Target> = node_urls
                .iter()
                .map(|u| Target {
                    url: format!("{u}/v1/chat/completions"),
                    ..gateway.clone()
                })
                .collect();
            closed_loop_nodes(&targets, o.concurrency, warm, &node_pids).await?;
            Some(closed_loop_nodes(&targets, o.concurrency, o.seconds, &node_pids).await?)
        } else {
            None
        };

        // 3. Memory under many concurrent streams.
        let memory = memory(&gateway, o.streams, gw_pid, (rss_start_kb, rss_warm_kb)).await?;

        let mut problems = checks
            .problems
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let failed = checks.failed.load(Ordering::Relaxed);
        if failed > 0 {
            problems.insert(0, format!("{failed} requests failed; the first:"));
        }
        let mut controls = None;
        if o.controls {
            match controls_counted(&http, &gw_url, &admin, prices.is_some(), &gateway).await? {
                Ok(c) => controls = Some(c),
                Err(e) => problems.push(e),
            }
        }
        let added = |g: u64, d: u64| g as i64 - d as i64;
        anyhow::Ok(Report {
            added_p50_us: added(latency_gateway.p50_us, latency_direct.p50_us),
            added_p99_us: added(latency_gateway.p99_us, latency_direct.p99_us),
            added_p999_us: added(latency_gateway.p999_us, latency_direct.p999_us),
            latency_direct,
            latency_gateway,
            throughput_ratio: throughput_gateway.per_sec / throughput_direct.per_sec,
            throughput_direct,
            throughput_gateway,
            throughput_nodes,
            memory,
            responses: checks.responses.load(Ordering::Relaxed),
            problems,
            controls,
        })
    })?;
    drop(more);
    drop(gw_guard);
    drop(sim_guard);
    drop(dir);
    Ok(report)
}

// ---------------------------------------------------------------------------------
// Against an external provider (issue 18): `--upstream URL [--proxy URL]`.

/// What to run against an external provider.
pub struct UpstreamOptions {
    /// The provider's OpenAI base URL (ending in `/v1`), e.g. `bench/nginx`'s
    /// fixed-answer nginx.
    pub upstream: String,
    /// The same provider behind another proxy (`bench/nginx`'s plain nginx reverse
    /// proxy), measured side by side as the yardstick.
    pub proxy: Option<String>,
    /// The proxy's processes (their children count with them), for its CPU.
    pub proxy_pids: Vec<u32>,
    /// Requests per second of the open-loop latency phase.
    pub rate: f64,
    /// Seconds of each measurement per target, in 1 s slices.
    pub seconds: f64,
    /// Connections of the throughput phase (wrk).
    pub connections: usize,
    /// wrk's threads in the throughput phase.
    pub wrk_threads: usize,
    /// The wrk executable.
    pub wrk: std::path::PathBuf,
    /// As [`Options::prices`].
    pub prices: Option<std::path::PathBuf>,
    /// As [`Options::controls`].
    pub controls: bool,
}

/// Figures of one wrk measurement (its slices merged).
#[derive(Clone, Copy, Default)]
pub struct WrkFigures {
    pub requests: u64,
    pub per_sec: f64,
    /// Latency percentiles of wrk's own histogram (microseconds, from a request's
    /// write to its answer's end; merged exactly over the slices).
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// CPU (user + system) the gateway spent per request while this target ran
    /// (Ciyuan's only; 0 for the others).
    pub gateway_cpu_us: f64,
    /// That CPU by room of the gateway ([`THREAD_ROOMS`]), per request.
    pub gateway_cpu_rooms_us: [f64; 5],
    /// CPU per request of the process that served this target, user and system
    /// (the gateway's; the proxy's when its processes are known; else 0).
    pub cpu_user_us: f64,
    pub cpu_system_us: f64,
}

/// One target's figures, side by side with the others'.
pub struct Side {
    /// `direct`, `nginx proxy` or `ciyuan`.
    pub name: &'static str,
    /// wrk, `connections` connections: throughput.
    pub throughput: WrkFigures,
    /// wrk, one connection: latency with nothing queued.
    pub one_connection: WrkFigures,
    /// The open-loop client at `rate` requests/s.
    pub open_loop: Latency,
}

/// Figures of an upstream run: the targets in the order direct, proxy, Ciyuan.
pub struct UpstreamReport {
    pub sides: Vec<Side>,
    /// Answers checked (wrk's and the open-loop client's).
    pub responses: u64,
    /// What went wrong: wrk's socket errors and non-2xx answers, the client's failures.
    pub problems: Vec<String>,
    /// With `--controls`: what the limits counted ([`controls_counted`]).
    pub controls: Option<String>,
}

/// A wrk script posting the benchmark's chat completion with the target's key; at the
/// end it prints its counts and its latency histogram (value:count pairs, µs), which
/// the bench merges over slices.
fn wrk_script(auth: &str, extra: &[(&str, String)]) -> String {
    let extra: String = extra
        .iter()
        .map(|(name, value)| format!("wrk.headers[\"{name}\"] = [==[{value}]==]\n"))
        .collect();
    format!(
        r#"wrk.method = "POST"
wrk.body = [==[{SMALL_BODY}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = [==[{auth}]==]
{extra}done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("ciyuan-wrk requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  io.write("ciyuan-wrk-latency")
  for i = 1, #latency do
    local v, c = latency(i)
    io.write(string.format(" %d:%d", v, c))
  end
  io.write("\n")
end
"#
    )
}

/// wrk slices of one target, merged.
#[derive(Default)]
struct WrkSamples {
    requests: u64,
    micros: u64,
    /// Latency (µs) → answers.
    histogram: std::collections::BTreeMap<u64, u64>,
    gateway_cpu: f64,
    gateway_cpu_rooms: [f64; 5],
    /// User and system CPU seconds of the serving processes.
    cpu_split: (f64, f64),
}

impl WrkSamples {
    fn figures(&self) -> WrkFigures {
        let total: u64 = self.histogram.values().sum();
        let at = |p: f64| {
            let rank = ((p * total as f64).ceil() as u64).clamp(1, total.max(1));
            let mut seen = 0;
            for (v, c) in &self.histogram {
                seen += c;
                if seen >= rank {
                    return *v;
                }
            }
            0
        };
        WrkFigures {
            requests: self.requests,
            per_sec: self.requests as f64 * 1e6 / self.micros.max(1) as f64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            gateway_cpu_us: self.gateway_cpu * 1e6 / self.requests.max(1) as f64,
            gateway_cpu_rooms_us: self
                .gateway_cpu_rooms
                .map(|c| c * 1e6 / self.requests.max(1) as f64),
            cpu_user_us: self.cpu_split.0 * 1e6 / self.requests.max(1) as f64,
            cpu_system_us: self.cpu_split.1 * 1e6 / self.requests.max(1) as f64,
        }
    }
}

/// One wrk run of `seconds` (whole seconds: wrk's unit) against `url`.
fn wrk_slice(
    o: &UpstreamOptions,
    (threads, connections): (usize, usize),
    script: &std::path::Path,
    url: &str,
    into: &mut WrkSamples,
    checks: &Checks,
    name: &str,
) -> anyhow::Result<()> {
    let out = Command::new(&o.wrk)
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", "1", "--timeout", "10", "-s"])
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", o.wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut counted = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ciyuan-wrk ") {
            let field = |k: &str| -> anyhow::Result<u64> {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .with_context(|| format!("wrk's summary has no {k}: {line}"))?
                    .parse()
                    .with_context(|| format!("wrk's {k} in {line}"))
            };
            let requests = field("requests")?;
            into.requests += requests;
            into.micros += field("duration_us")?;
            checks.responses.fetch_add(requests, Ordering::Relaxed);
            let errors: Vec<String> = ["connect", "read", "write", "status", "timeout"]
                .iter()
                .map(|k| Ok((k, field(k)?)))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            if !errors.is_empty() {
                checks.fail(format!(
                    "{name}: wrk saw errors: {} (status: answers not 2xx/3xx)",
                    errors.join(", ")
                ));
            }
            counted = true;
        } else if let Some(rest) = line.strip_prefix("ciyuan-wrk-latency") {
            for pair in rest.split_whitespace() {
                let (v, c) = pair
                    .split_once(':')
                    .with_context(|| format!("wrk's histogram entry {pair:?}"))?;
                *into.histogram.entry(v.parse()?).or_default() += c.parse::<u64>()?;
            }
        }
    }
    if !counted {
        bail!("wrk printed no summary (is the script's done() run?): {text}");
    }
    Ok(())
}

/// `ciyuan bench gateway --upstream URL`: `ciyuan serve` with the external provider
/// as its only provider; the provider directly, the proxy (if given) and Ciyuan,
/// measured in 1 s slices that rotate through the targets, so all see the same
/// background load: (1) throughput, wrk with `connections` connections; (2) latency
/// at one connection, wrk; (3) p99 at `rate` requests/s, the open-loop client (from
/// scheduled send times). Streams and memory need the sim's pacing and are not run.
pub fn run_upstream(o: UpstreamOptions) -> anyhow::Result<UpstreamReport> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(o.rate) || !positive(o.seconds) {
        bail!("--rate and --seconds must be positive");
    }
    if o.connections == 0 || o.wrk_threads == 0 {
        bail!("--concurrency and --wrk-threads must be positive");
    }
    let base = |u: &str, flag: &str| -> anyhow::Result<String> {
        let u = u.trim_end_matches('/');
        match u.parse::<reqwest::Url>() {
            Ok(p) if matches!(p.scheme(), "http" | "https") => Ok(u.to_string()),
            _ => bail!("{flag} {u:?}: not an http(s) URL (an OpenAI base URL ending in /v1)"),
        }
    };
    let upstream = base(&o.upstream, "--upstream")?;
    let proxy = o.proxy.as_deref().map(|p| base(p, "--proxy")).transpose()?;
    let prices = o
        .prices
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-gateway-{}", random_hex(6)?));
    std::fs::create_dir_all(&dir)?;
    let dir = Dir(dir);
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[providers]]\nname = \"upstream\"\nprotocol = \"openai\"\nbase_url = \"{upstream}\"\nmodels = [\"*\"]\n"
        ),
    )?;
    let admin = format!("cy_{}_{}", random_hex(6)?, random_hex(32)?);
    let mut serve = Command::new(&exe);
    serve
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.0.join("data"))
        .env("CIYUAN_BOOTSTRAP_ADMIN_KEY", &admin);
    let (gw_guard, gw_url) = start(serve, "ciyuan serve")?;
    let gw_pid = gw_guard.0.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = bench_client()?;
    let key = rt.block_on(bench_key(
        &http,
        &gw_url,
        &admin,
        prices.as_deref(),
        o.controls,
    ))?;
    let auth = format!("Bearer {key}");
    let script = dir.0.join("chat.lua");
    std::fs::write(&script, wrk_script(&auth, &Controls::headers(o.controls)))?;

    let checks = Arc::new(Checks::default());
    let extra_map = Controls::header_map(o.controls)?;
    let mut names = vec![("direct", upstream.clone())];
    if let Some(p) = &proxy {
        names.push(("nginx proxy", p.clone()));
    }
    names.push(("ciyuan", format!("{gw_url}/v1")));
    let targets: Vec<Target> = names
        .iter()
        .map(|(name, base)| {
            Ok(Target {
                name,
                url: format!("{base}/chat/completions"),
                auth: HeaderValue::from_str(&auth)?,
                extra: extra_map.clone(),
                http: http.clone(),
                checks: checks.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let ciyuan = targets.len() - 1;
    let proxy_side = proxy.is_some().then_some(1);
    let slices = o.seconds.ceil().max(1.0) as usize;
    // Each slice starts with the next target, so none is always first after a switch.
    let n = targets.len();
    let order = move |slice: usize| (0..n).map(move |k| (slice + k) % n);

    // 1 and 2: wrk, whole-second slices. A first slice of each warms connections,
    // pools, the key cache; it is not counted.
    let wrk_phase = |shape: (usize, usize)| -> anyhow::Result<Vec<WrkFigures>> {
        let mut samples: Vec<WrkSamples> = targets.iter().map(|_| WrkSamples::default()).collect();
        for t in &targets {
            wrk_slice(
                &o,
                shape,
                &script,
                &t.url,
                &mut WrkSamples::default(),
                &checks,
                t.name,
            )?;
        }
        for slice in 0..slices {
            for k in order(slice) {
                let t = &targets[k];
                let (cpu, rooms) = (cpu_seconds(gw_pid), thread_cpu(gw_pid));
                let served: &[u32] = if k == ciyuan {
                    &[gw_pid]
                } else if Some(k) == proxy_side {
                    &o.proxy_pids
                } else {
                    &[]
                };
                let split = cpu_split(served);
                wrk_slice(&o, shape, &script, &t.url, &mut samples[k], &checks, t.name)?;
                let after = cpu_split(served);
                samples[k].cpu_split.0 += after.0 - split.0;
                samples[k].cpu_split.1 += after.1 - split.1;
                if k == ciyuan {
                    samples[k].gateway_cpu += cpu_seconds(gw_pid) - cpu;
                    add_thread_cpu_since(&mut samples[k].gateway_cpu_rooms, rooms, gw_pid);
                }
            }
        }
        Ok(samples.iter().map(WrkSamples::figures).collect())
    };
    let threads = o.wrk_threads.min(o.connections);
    let throughput = wrk_phase((threads, o.connections))?;
    let one_connection = wrk_phase((1, 1))?;

    // 3: open loop at `rate`, in slices of about a second.
    let slice = o.seconds / slices as f64;
    let pids = (gw_pid, 0);
    let open: Vec<Latency> = rt.block_on(async {
        let mut samples: Vec<OpenSamples> =
            targets.iter().map(|_| OpenSamples::default()).collect();
        for t in &targets {
            open_loop(
                t,
                o.rate,
                o.seconds.min(1.0),
                pids,
                &mut OpenSamples::default(),
                Client::Paced,
            )
            .await?;
        }
        for s in 0..slices {
            for k in order(s) {
                open_loop(
                    &targets[k],
                    o.rate,
                    slice,
                    pids,
                    &mut samples[k],
                    Client::Paced,
                )
                .await?;
            }
        }
        anyhow::Ok(
            samples
                .into_iter()
                .enumerate()
                .map(|(k, s)| {
                    let mut l = s.latency();
                    if k != ciyuan {
                        l.gateway_cpu_us = 0.0;
                        l.gateway_cpu_rooms_us = [0.0; 5];
                    }
                    l
                })
                .collect(),
        )
    })?;

    let mut problems = checks
        .problems
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let failed = checks.failed.load(Ordering::Relaxed);
    if failed > 0 {
        problems.insert(0, format!("{failed} runs or requests failed; the first:"));
    }
    let mut controls = None;
    if o.controls {
        match rt.block_on(controls_counted(
            &http,
            &gw_url,
            &admin,
            prices.is_some(),
            &targets[ciyuan],
        ))? {
            Ok(c) => controls = Some(c),
            Err(e) => problems.push(e),
        }
    }
    let sides = names
        .iter()
        .enumerate()
        .map(|(k, (name, _))| Side {
            name,
            throughput: throughput[k],
            one_connection: one_connection[k],
            open_loop: open[k],
        })
        .collect();
    drop(gw_guard);
    drop(dir);
    Ok(UpstreamReport {
        sides,
        responses: checks.responses.load(Ordering::Relaxed),
        problems,
        controls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_slices_merge_into_exact_percentiles_and_rates() {
        let mut s = WrkSamples::default();
        // Two slices: 100 answers at 10 µs and 2 at 500 µs, then 98 at 20 µs.
        for (v, c) in [(10, 100), (500, 2), (20, 98)] {
            *s.histogram.entry(v).or_default() += c;
        }
        s.requests = 200;
        s.micros = 2_000_000;
        s.gateway_cpu = 0.01;
        s.gateway_cpu_rooms = [0.006, 0.0, 0.002, 0.002, 0.0];
        s.cpu_split = (0.004, 0.002);
        let f = s.figures();
        assert_eq!((f.p50_us, f.p99_us, f.p999_us), (10, 20, 500));
        assert_eq!(f.per_sec, 100.0);
        assert_eq!(f.gateway_cpu_us, 50.0);
        assert_eq!(f.gateway_cpu_rooms_us, [30.0, 0.0, 10.0, 10.0, 0.0]);
        assert_eq!((f.cpu_user_us, f.cpu_system_us), (20.0, 10.0));
        assert_eq!(WrkSamples::default().figures().p99_us, 0);
    }

    #[test]
    fn open_loop_samples_give_percentiles_and_cpu_per_request_by_room() {
        let s = OpenSamples {
            lat: (1..=100).rev().collect(),
            late: vec![0; 100],
            sent_secs: 2.0,
            cpu: (0.005, 0.001),
            rooms: [0.003, 0.0, 0.001, 0.001, 0.0],
        };
        let l = s.latency();
        assert_eq!(
            (l.requests, l.p50_us, l.p99_us, l.max_us),
            (100, 50, 99, 100)
        );
        assert_eq!(l.achieved_rate, 50.0);
        assert_eq!((l.gateway_cpu_us, l.sim_cpu_us), (50.0, 10.0));
        assert_eq!(l.gateway_cpu_rooms_us, [30.0, 0.0, 10.0, 10.0, 0.0]);
    }

    #[test]
    fn cpu_is_read_for_a_process_and_its_children() {
        assert_eq!(cpu_split(&[u32::MAX]), (0.0, 0.0), "no such process");
        // A shell that only waits for a busy child of its own, as nginx's master
        // waits for its workers: its CPU is the child's.
        let mut outer = std::process::Command::new("sh")
            .args([
                "-c",
                "sh -c 'i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done' & wait",
            ])
            .spawn()
            .expect("sh runs");
        let pid = outer.id();
        let started = std::time::Instant::now();
        let mut most = 0.0f64;
        while started.elapsed() < std::time::Duration::from_secs(30) {
            let (user, system) = cpu_split(&[pid]);
            most = most.max(user + system);
            if most >= 0.05 || outer.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(most >= 0.05, "the child's CPU counts: {most} s");
        assert!(cpu_seconds(pid) < most, "the shell itself only waits");
        outer.kill().ok();
        outer.wait().expect("the shell is reaped");
    }

    #[test]
    fn the_wrk_script_posts_the_chat_body_with_the_key() {
        let script = wrk_script("Bearer cy_key", &[]);
        assert!(script.contains(SMALL_BODY));
        assert!(script.contains(r#"wrk.headers["Authorization"] = [==[Bearer cy_key]==]"#));
        assert!(script.contains("wrk.method = \"POST\""));
        assert!(
            !SMALL_BODY.contains("]==]"),
            "the body must not close the Lua string"
        );
    }

    #[test]
    fn the_hostile_run_fails_when_a_control_was_not_in_force_or_counted_nothing() {
        let view = |skip: Option<&str>, unused: Option<&str>, rules: bool| {
            let limits: Vec<serde_json::Value> = Controls::limits(true)
                .into_iter()
                .filter(|(_, l)| Some(l["name"].as_str().unwrap()) != skip)
                .map(|(node, l)| {
                    let name = l["name"].as_str().unwrap();
                    let used = if Some(name) == unused { 0 } else { 37 };
                    let mut row = serde_json::json!({"node": node, "name": name, "used": used});
                    if l.get("amount").is_some() {
                        let cost = if used == 0 { "0" } else { "0.000021" };
                        row["cost"] = serde_json::json!({"used": cost});
                    }
                    row
                })
                .collect();
            let models = if rules {
                serde_json::json!([{"node": "bench", "allow": ["gpt-4o*"], "deny": []}])
            } else {
                serde_json::json!([])
            };
            serde_json::json!({"limits": limits, "models": models})
        };
        let all = Controls::counted(&view(None, None, true), true).unwrap();
        assert!(all.starts_with("7 limits"), "{all}");
        // The per-request limit counts nothing by design; every other must.
        assert!(Controls::counted(&view(None, Some("per-request"), true), true).is_ok());
        let e = Controls::counted(&view(Some("rpm-per-key"), None, true), true).unwrap_err();
        assert!(e.contains("rpm-per-key on bench/bu is not in force"), "{e}");
        let e = Controls::counted(&view(None, Some("per-session"), true), true).unwrap_err();
        assert!(
            e.contains("per-session on bench/bu/team counted nothing"),
            "{e}"
        );
        let e = Controls::counted(&view(None, Some("money-month"), true), true).unwrap_err();
        assert!(e.contains("money-month"), "{e}");
        let e = Controls::counted(&view(None, None, false), true).unwrap_err();
        assert!(e.contains("model rules"), "{e}");
    }

    #[test]
    fn the_hostile_tenant_sends_the_most_tags_and_a_session_that_the_gateway_accepts() {
        assert!(Controls::headers(false).is_empty());
        let headers = Controls::headers(true);
        let tags = &headers
            .iter()
            .find(|(n, _)| *n == "x-ciyuan-tags")
            .expect("tags are sent")
            .1;
        // The gateway's own reader: every tag is kept, none skipped for its size.
        let parsed = ciyuan_core::parse_tag_list(tags).expect("the list parses");
        assert_eq!(parsed.len(), ciyuan_core::MAX_TAGS);
        assert!(ciyuan_core::check_tags(&parsed).is_ok());
        for (k, v) in &parsed {
            assert_eq!(k.len(), ciyuan_core::MAX_TAG_KEY_BYTES / 4, "{k}");
            assert_eq!(v.len(), ciyuan_core::MAX_TAG_VALUE_BYTES / 4, "{v}");
        }
        let script = wrk_script("Bearer cy_key", &headers);
        assert!(script.contains(&format!("wrk.headers[\"x-ciyuan-tags\"] = [==[{tags}]==]")));
        assert!(script.contains("wrk.headers[\"x-ciyuan-session\"] = [==[bench-session-0001]==]"));
        assert!(Controls::header_map(true).unwrap().len() == 2);
        assert!(Controls::header_map(false).unwrap().is_empty());
        // Every limit is on the key's node or an ancestor, so every one is checked.
        for (node, limit) in Controls::limits(true) {
            assert!(Controls::NODE.starts_with(node), "{node}");
            assert!(limit["name"].is_string(), "{limit}");
        }
    }
}
