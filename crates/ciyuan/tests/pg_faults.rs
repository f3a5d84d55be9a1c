//! PostgreSQL restarted under load: two `ciyuan serve` nodes on one database take a
//! stream of events while the database is stopped (`pg_ctl stop -m fast`) and started
//! again. Clients retry what failed with the same event ids. Afterwards every
//! acknowledged event is in the log exactly once, the nodes serve again without being
//! restarted themselves, and the database's log verifies.

use crate::common::{Server, json, stdout, try_http};
use ciyuan_store_postgres::testing::TestCluster;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Gateway streams in flight when the database stops.
const STREAMS: usize = 4;
/// Batches each node's client sends, and events per batch (100 input tokens each).
const BATCHES: usize = 160;
const PER_BATCH: usize = 5;
const SOURCE: &str = "svc://restart";

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged events: id → entry.
    acked: BTreeMap<String, u64>,
    /// Answers 503 (retryable), and the slowest of them.
    refused: usize,
    slowest_refusal: Duration,
    /// From the first refusal to the next acknowledgement.
    outage_seen: Option<(Instant, Option<Instant>)>,
}

fn stream(node: &Server, key: &str, tag: &str, acked: &AtomicUsize) -> Seen {
    let mut seen = Seen::default();
    for i in 0..BATCHES {
        let batch: Vec<Value> = (0..PER_BATCH)
            .map(|j| {
                json!({"specversion": "1.0", "id": format!("{tag}-{i}-{j}"), "source": SOURCE,
                    "type": "llm.usage", "subject": "acme/cn",
                    "data": {"model": "m", "input_tokens": 100, "output_tokens": 1}})
            })
            .collect();
        let body = json!(batch);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "batch {tag}-{i} never acknowledged"
            );
            let t = Instant::now();
            let (status, answer) = try_http(&node.url, "POST", "/v1/events", key, Some(&body))
                .unwrap_or_else(|e| panic!("node {tag} went away: {e}"));
            let took = t.elapsed();
            match status {
                200 => {
                    let a = json(&answer);
                    assert_eq!(
                        a["accepted"].as_u64().unwrap() + a["duplicates"].as_u64().unwrap(),
                        PER_BATCH as u64,
                        "{a}"
                    );
                    for r in a["results"].as_array().unwrap() {
                        let id = r["id"].as_str().unwrap().to_string();
                        let entry = r["entry_id"].as_u64().unwrap();
                        if let Some(before) = seen.acked.insert(id.clone(), entry) {
                            panic!("{id} acknowledged twice: {before}, {entry}");
                        }
                    }
                    acked.fetch_add(PER_BATCH, Ordering::SeqCst);
                    if let Some((_, back @ None)) = &mut seen.outage_seen {
                        *back = Some(Instant::now());
                    }
                    break;
                }
                503 => {
                    let p = json(&answer);
                    assert_eq!(p["status"], 503, "{p}");
                    seen.refused += 1;
                    seen.slowest_refusal = seen.slowest_refusal.max(took);
                    seen.outage_seen.get_or_insert((Instant::now(), None));
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => panic!("{other}: {}", String::from_utf8_lossy(&answer)),
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// A gateway call in `family`'s path while the database is down: (status, body, time).
fn gateway_probe(node: &Server, key: &str, path: &str) -> (u16, Value, Duration) {
    let body = if path.ends_with("messages") {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
            "messages": [{"role": "user", "content": "are you there?"}]})
    } else {
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "are you there?"}]})
    };
    let t = Instant::now();
    let (s, b) = try_http(&node.url, "POST", path, key, Some(&body)).unwrap();
    (s, json(&b), t.elapsed())
}

#[test]
fn postgres_restarted_under_load_loses_and_doubles_no_acknowledged_event() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (tmp, a, b, root, url) = crate::postgres::two_nodes(&cluster, "restart");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    stdout(&a.cli(&root, &["accounts", "create", "acme/gw"]));
    let key = a.new_key(&root, "acme/cn", "ingest,read");
    // Gateway calls on a node of their own, so the events' sums stay apart.
    let gw = a.new_key(&root, "acme/gw", "gateway");

    let acked = AtomicUsize::new(0);
    let total = 2 * BATCHES * PER_BATCH;
    let probes = Mutex::new(Vec::new());
    let (seen_a, seen_b, outage) = std::thread::scope(|s| {
        let ta = s.spawn(|| stream(&a, &key, "a", &acked));
        let tb = s.spawn(|| stream(&b, &key, "b", &acked));
        // Mid-stream: the database stops, stays down two seconds, and starts again.
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.load(Ordering::SeqCst) < total / 10 {
            assert!(Instant::now() < deadline, "the stream did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Streams served across the outage's start: their usage is appended after
        // their answer, while the database is down, and must be recorded once it is
        // back.
        let streams: Vec<_> = (0..STREAMS)
            .map(|_| {
                let (url, gw) = (a.url.clone(), gw.clone());
                s.spawn(move || {
                    crate::gateway::raw(
                        &url,
                        "/v1/chat/completions",
                        &gw,
                        &[
                            ("x-sim-tokens-per-sec", "30"),
                            ("x-sim-output-tokens", "60"),
                        ],
                        &json!({"model": "gpt-4o", "stream": true,
                            "messages": [{"role": "user", "content": "a slow answer"}]}),
                        None,
                    )
                })
            })
            .collect();
        // Admitted well before the stop (the machine may be slow), still streaming
        // when it comes.
        std::thread::sleep(Duration::from_millis(1000));
        let down = Instant::now();
        cluster.halt().unwrap();
        let stopped_after = down.elapsed();
        std::thread::sleep(Duration::from_millis(1200));
        // Both nodes answer the gateway's callers at once, in their SDK's shape,
        // without reaching a provider.
        for node in [&a, &b] {
            for path in ["/v1/chat/completions", "/v1/messages"] {
                probes
                    .lock()
                    .unwrap()
                    .push((path, gateway_probe(node, &gw, path)));
            }
        }
        std::thread::sleep(Duration::from_millis(800));
        cluster.resume().unwrap();
        let outage = down.elapsed();
        eprintln!(
            "PostgreSQL stopped in {stopped_after:?}, back after {outage:?}, with {} of {total} events acknowledged",
            acked.load(Ordering::SeqCst)
        );
        for st in streams {
            let r = st.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.complete, "{}", r.body);
        }
        (ta.join().unwrap(), tb.join().unwrap(), outage)
    });

    for (path, (status, body, took)) in probes.into_inner().unwrap() {
        assert_eq!(status, 503, "{path}: {body}");
        assert!(took < Duration::from_secs(5), "{path} took {took:?}");
        if path.ends_with("messages") {
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], "api_error", "{body}");
        } else {
            assert_eq!(body["error"]["type"], "server_error", "{body}");
        }
        assert!(
            body.to_string().contains("unavailable") || body.to_string().contains("out of reach"),
            "{body}"
        );
    }
    for (tag, seen) in [("a", &seen_a), ("b", &seen_b)] {
        let back = seen
            .outage_seen
            .and_then(|(from, to)| to.map(|to| to - from));
        eprintln!(
            "node {tag}: {} events acknowledged, {} requests refused with 503 (slowest {:?}), first refusal to next acknowledgement {back:?}",
            seen.acked.len(),
            seen.refused,
            seen.slowest_refusal
        );
        assert_eq!(seen.acked.len(), BATCHES * PER_BATCH);
        assert!(seen.refused > 0, "node {tag} saw the outage");
        assert!(
            seen.slowest_refusal < Duration::from_secs(5),
            "refusals are fast: {:?}",
            seen.slowest_refusal
        );
    }
    assert!(outage < Duration::from_secs(10));

    // The nodes serve again by themselves: a gateway call on each.
    let mut served_after = 0;
    for node in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, body, _) = gateway_probe(node, &gw, "/v1/chat/completions");
            if s == 200 {
                served_after += 1;
                break;
            }
            assert!(Instant::now() < deadline, "{s}: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The projections caught up on both nodes: every event once in the sums.
    for node in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut input = 0;
        while Instant::now() < deadline {
            let (s, body) = node.http("GET", "/api/v1/usage?account=acme/cn", &key, None);
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
            input = json(&body)["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["tokens"]["text.input"].as_i64().unwrap_or(0))
                .sum::<i64>();
            if input == 100 * total as i64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(input, 100 * total as i64, "usage seen from {}", node.url);
    }
    let (s, _) = a.http("POST", "/api/v1/audit/checkpoint", &root, None);
    assert_eq!(s, 200);
    a.stop();
    b.stop();

    // Every acknowledged event is in the log once, at the entry it was acknowledged
    // as; no event is there that was not acknowledged.
    let bundle = tmp.path().join("bundle");
    crate::common::export_database(&url, &bundle);
    let mut in_log: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let lines = std::fs::read_to_string(bundle.join("entries.jsonl")).unwrap();
    for (i, line) in lines.lines().enumerate() {
        let e: Value = serde_json::from_str(line).unwrap();
        if e["data"]["source"] == SOURCE {
            let id = e["data"]["event_id"].as_str().unwrap().to_string();
            in_log.entry(id).or_default().push(i as u64);
        }
    }
    // The streams in flight at the stop, and the calls after it, each once; the calls
    // refused during the outage, none.
    let gateway_entries = lines
        .lines()
        .filter(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["account"] == "acme/gw" && e["kind"] == "usage"
        })
        .count();
    assert_eq!(
        gateway_entries,
        STREAMS + served_after,
        "gateway usage entries"
    );
    let mut acked_all = seen_a.acked.clone();
    acked_all.extend(seen_b.acked.clone());
    assert_eq!(acked_all.len(), total);
    for (id, entry) in &acked_all {
        assert_eq!(in_log.get(id), Some(&vec![*entry]), "event {id}");
    }
    assert_eq!(in_log.len(), total, "nothing unacknowledged is in the log");
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}
