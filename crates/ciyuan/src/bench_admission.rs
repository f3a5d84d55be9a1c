//! `ciyuan bench admission`: the step of gateway admission that crosses nodes — a
//! request's hard limits and wallet held in the PostgreSQL database several nodes
//! share (`Store::reserve`), then settled with its entry (`Store::settle_holds`) —
//! timed from several nodes at once against the same counters (the worst case: every
//! request of every node on one hard limit and one wallet, so every hold queues on the
//! same advisory locks).
//!
//! Each node is its own `PgStore` (its own connections) with its own name and
//! heartbeat, as `ciyuan serve` nodes have; each client is a thread of a node looping
//! reserve → settle. With `--slices`, each node first admits from its slices of the
//! counters' room (`ciyuan_server::slices`, as `serve` does) and holds alone only what
//! does not fit. The in-memory engines' part of admission is `bench budgets`.

use anyhow::{Context, bail};
use ciyuan_store::{HoldTerm, SettledHold, Store};
use rust_decimal::Decimal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A request waiting in a node's group: its id, terms and where the answer goes.
struct Ask(
    i64,
    Vec<HoldTerm>,
    std::sync::mpsc::Sender<Result<Option<(usize, Decimal)>, String>>,
);

/// What was measured.
pub struct Report {
    /// Holds taken (reserve calls answered) in all.
    pub holds: u64,
    /// Holds per second over all nodes.
    pub per_sec: f64,
    /// Latency of one reserve call, in microseconds: p50, p99, p99.9, max.
    pub reserve_us: [u64; 4],
    /// Latency of one settle call, p50 and p99, in microseconds.
    pub settle_us: [u64; 2],
    /// Reserve calls refused (none expected: the limit is out of reach).
    pub refused: u64,
    /// Holds admitted from a node's slices (no database call).
    pub from_slices: u64,
    /// Slices the nodes asked for.
    pub slices_asked: u64,
}

/// A node's slices, counting the asks that reach the database.
struct Counted(Arc<dyn Store>, Arc<AtomicU64>);

impl ciyuan_server::slices::Backend for Counted {
    fn reserve_slices(
        &self,
        node: &str,
        seen: ciyuan_store::Seen,
        counted: &[i64],
        asks: &[ciyuan_store::SliceAsk],
        ttl: Duration,
    ) -> Result<Vec<Option<Decimal>>, ciyuan_store::StoreError> {
        self.1.fetch_add(asks.len() as u64, Ordering::Relaxed);
        self.0.reserve_slices(node, seen, counted, asks, ttl)
    }
    fn resize_slices(
        &self,
        sizes: &[ciyuan_store::SliceSize],
    ) -> Result<(), ciyuan_store::StoreError> {
        self.0.resize_slices(sizes)
    }
}

/// Runs `nodes` nodes of `clients` threads each for `seconds` against the database
/// at `url` (which must be new or hold only earlier runs of this bench).
/// With `rate` (holds per second over all clients), each client paces its holds
/// evenly (open loop: a late hold does not delay its schedule); without, each holds
/// again as soon as it settled (closed loop: the most the counters take).
///
/// With `group`, each node holds its clients' requests as `ciyuan serve` does: one
/// thread per node takes every request waiting into one `Store::reserve_many` call.
/// With `slices`, each node first admits from the slices of the counters it holds
/// (`ciyuan_server::slices`, as `ciyuan serve` does), and holds alone only what does
/// not fit.
pub fn run(
    url: &str,
    nodes: usize,
    clients: usize,
    seconds: f64,
    rate: Option<f64>,
    group: bool,
    slices: bool,
) -> anyhow::Result<Report> {
    if nodes == 0 || clients == 0 || !(seconds > 0.0 && seconds.is_finite()) {
        bail!("--nodes, --clients and --seconds must be positive");
    }
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be positive");
    }
    // Each client's interval between holds.
    let every = rate.map(|r| Duration::from_secs_f64((nodes * clients) as f64 / r));
    let stores: Vec<Arc<dyn Store>> = (0..nodes)
        .map(|_| -> anyhow::Result<Arc<dyn Store>> {
            let pool = ciyuan_store_postgres::Pool::connect(url)
                .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
            let store = ciyuan_store_postgres::PgStore::open(pool)
                .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
            Ok(Arc::new(store))
        })
        .collect::<anyhow::Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let next_entry = Arc::new(AtomicU64::new(0));
    // How far the nodes have followed: the entries of half a second ago (a node
    // follows within a few hundred milliseconds).
    let followed = Arc::new(AtomicU64::new(0));
    let run_tag = crate::bench_gateway::random_hex(4)?;
    // The nodes say they live, as `ciyuan serve` does every second.
    let beats: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let (s, stop, name) = (s.clone(), stop.clone(), format!("bench-{run_tag}-{n}"));
            let (followed, next_entry) = (followed.clone(), next_entry.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Acquire) {
                    s.heartbeat(&name, followed.load(Ordering::Acquire))?;
                    std::thread::sleep(Duration::from_millis(500));
                    followed.store(next_entry.load(Ordering::Acquire), Ordering::Release);
                }
                Ok(())
            })
        })
        .collect();
    // Per node, with `group`: the queue its clients' requests wait in.
    let groupers: Vec<Option<std::sync::mpsc::Sender<Ask>>> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| {
            if !group {
                return None;
            }
            let (tx, rx) = std::sync::mpsc::channel::<Ask>();
            let (s, name, followed) = (s.clone(), format!("bench-{run_tag}-{n}"), followed.clone());
            std::thread::spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut asks = vec![first];
                    while let Ok(a) = rx.try_recv() {
                        asks.push(a);
                    }
                    let requests: Vec<(i64, &[HoldTerm])> =
                        asks.iter().map(|a| (a.0, a.1.as_slice())).collect();
                    let f = followed.load(Ordering::Acquire);
                    let answers = s.reserve_many(
                        &name,
                        ciyuan_store::Seen {
                            followed: f,
                            own_from: f,
                        },
                        &[],
                        &requests,
                        Duration::from_secs(60),
                    );
                    match answers {
                        Ok(answers) => {
                            for (a, answer) in asks.into_iter().zip(answers) {
                                drop(a.2.send(Ok(answer)));
                            }
                        }
                        Err(e) => {
                            for a in asks {
                                drop(a.2.send(Err(e.to_string())));
                            }
                        }
                    }
                }
            });
            Some(tx)
        })
        .collect();
    let asked = Arc::new(AtomicU64::new(0));
    let node_slices: Vec<Option<Arc<ciyuan_server::slices::Slices>>> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| -> anyhow::Result<_> {
            if !slices {
                return Ok(None);
            }
            Ok(Some(ciyuan_server::slices::Slices::start(
                Arc::new(Counted(s.clone(), asked.clone())),
                format!("bench-{run_tag}-{n}"),
                Duration::from_secs(60),
            )?))
        })
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = stores
        .iter()
        .enumerate()
        .flat_map(|(n, s)| (0..clients).map(move |c| (n, c, s.clone())))
        .map(|(n, c, store)| {
            let grouper = groupers[n].clone();
            let slices = node_slices[n].clone();
            let (next_entry, name) = (next_entry.clone(), format!("bench-{run_tag}-{n}"));
            let followed = followed.clone();
            let run_tag = run_tag.clone();
            std::thread::spawn(move || -> anyhow::Result<(Vec<u64>, Vec<u64>, u64, u64)> {
                let mut reserve = Vec::new();
                let mut settle = Vec::new();
                let mut refused = 0;
                let mut from_slices = 0;
                let mut id = ((n * 1000 + c) as i64) << 32;
                let terms = [
                    HoldTerm {
                        counter: format!("bench-{run_tag}\u{1f}limit"),
                        local: Decimal::from(1000),
                        need: Decimal::from(500),
                        amount: Decimal::from(1_000_000_000_000i64),
                    },
                    HoldTerm {
                        counter: format!("bench-{run_tag}\u{1f}wallet"),
                        local: Decimal::ZERO,
                        need: Decimal::new(24, 5),
                        amount: Decimal::from(1_000_000),
                    },
                ];
                let mut due = Instant::now();
                while Instant::now() < deadline {
                    if let Some(every) = every {
                        due += every;
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                    id += 1;
                    let t = Instant::now();
                    let seen = ciyuan_store::Seen {
                        followed: followed.load(Ordering::Acquire),
                        own_from: followed.load(Ordering::Acquire),
                    };
                    if let Some(slices) = &slices {
                        let wants: Vec<ciyuan_server::slices::Want<'_>> = terms
                            .iter()
                            .enumerate()
                            .map(|(i, term)| ciyuan_server::slices::Want {
                                term,
                                fixed_amount: i == 0,
                            })
                            .collect();
                        if let Some(ticket) =
                            slices.admit(seen, &ciyuan_server::slices::Counted::default(), &wants)
                        {
                            reserve.push(t.elapsed().as_micros() as u64);
                            from_slices += 1;
                            let entry = next_entry.fetch_add(1, Ordering::Relaxed);
                            let t = Instant::now();
                            let actual: Vec<(String, Decimal)> =
                                terms.iter().map(|t| (t.counter.clone(), t.need)).collect();
                            slices.settle(ticket, &actual, entry);
                            settle.push(t.elapsed().as_micros() as u64);
                            continue;
                        }
                    }
                    let answer = match &grouper {
                        None => store.reserve(&name, id, seen, &terms, Duration::from_secs(60))?,
                        Some(g) => {
                            let (tx, rx) = std::sync::mpsc::channel();
                            g.send(Ask(id, terms.to_vec(), tx))
                                .map_err(|_| anyhow::anyhow!("the node's holder stopped"))?;
                            rx.recv()
                                .map_err(|_| anyhow::anyhow!("the node's holder stopped"))?
                                .map_err(|e| anyhow::anyhow!("{e}"))?
                        }
                    };
                    reserve.push(t.elapsed().as_micros() as u64);
                    if answer.is_some() {
                        refused += 1;
                        continue;
                    }
                    let entry = next_entry.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    store.settle_holds(&[SettledHold {
                        id,
                        entry,
                        actual: terms.iter().map(|t| (t.counter.clone(), t.need)).collect(),
                    }])?;
                    settle.push(t.elapsed().as_micros() as u64);
                }
                Ok((reserve, settle, refused, from_slices))
            })
        })
        .collect();
    let mut reserve = Vec::new();
    let mut settle = Vec::new();
    let mut refused = 0;
    let mut from_slices = 0;
    for w in workers {
        let (r, s, x, f) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        reserve.extend(r);
        settle.extend(s);
        refused += x;
        from_slices += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    for b in beats {
        b.join()
            .map_err(|_| anyhow::anyhow!("a heartbeat panicked"))??;
    }
    reserve.sort_unstable();
    settle.sort_unstable();
    let pct = |v: &[u64], p: f64| -> u64 {
        if v.is_empty() {
            return 0;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    Ok(Report {
        holds: reserve.len() as u64,
        per_sec: reserve.len() as f64 / elapsed,
        reserve_us: [
            pct(&reserve, 50.0),
            pct(&reserve, 99.0),
            pct(&reserve, 99.9),
            reserve.last().copied().context("no hold was taken")?,
        ],
        settle_us: [pct(&settle, 50.0), pct(&settle, 99.0)],
        refused,
        from_slices,
        slices_asked: asked.load(Ordering::Relaxed),
    })
}
