//! Budgets end to end: hard limits under a race of streaming requests (with provider
//! failures mixed in), access rules, rate limits, clamping, thresholds as incidents
//! and signed webhooks, and ingested usage over a hard limit.

use crate::common::{http, json};
use crate::gateway::{Gateway, gateway_with, raw, request_id};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

fn sim_requests(gw: &Gateway) -> u64 {
    let (s, b) = http(&gw.sim.url, "GET", "/sim/stats", "", None);
    assert_eq!(s, 200);
    json(&b)["requests"].as_u64().unwrap()
}

fn budget(gw: &Gateway, path: &str) -> Value {
    let (s, b) = gw
        .server
        .http("GET", &format!("/api/v1/budgets/{path}"), &gw.admin, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    json(&b)
}

fn set_budget(gw: &Gateway, path: &str, body: Value) -> Value {
    let (s, b) = gw.server.http(
        "PUT",
        &format!("/api/v1/budgets/{path}"),
        &gw.admin,
        Some(&body),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    json(&b)
}

/// The tokens the ledger has for a subtree, all kinds together.
pub fn used_in_ledger(gw: &Gateway, account: &str) -> i64 {
    let (_, b) = gw.server.http(
        "GET",
        &format!("/api/v1/usage?account={account}"),
        &gw.admin,
        None,
    );
    json(&b)["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total"].as_i64().unwrap())
        .sum()
}

/// Fires `n` streaming requests at once; answers (status, body) of each.
fn race(
    gw: &Gateway,
    key: &str,
    n: usize,
    fault: impl Fn(usize) -> Option<&'static str>,
) -> Vec<(u16, String)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", gw.server.url);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut req = client
                .post(&url)
                .bearer_auth(key)
                .header("x-sim-tokens-per-sec", "40")
                .header("x-sim-output-tokens", "20")
                .json(&json!({"model": "gpt-4o", "stream": true, "max_tokens": 20,
                    "messages": [{"role": "user", "content": "Race for the last tokens."}]}));
            if let Some(f) = fault(i) {
                req = req.header("x-sim-fault", f);
            }
            tasks.push(tokio::spawn(async move {
                match req.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_else(|e| format!("<cut: {e}>"));
                        (status, body)
                    }
                    Err(e) => (0, e.to_string()),
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// Waits until the node's limits show nothing reserved; answers the view.
fn settled(gw: &Gateway, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = budget(gw, path);
        let reserved: u64 = v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["reserved"].as_u64().unwrap())
            .sum();
        if reserved == 0 {
            return v;
        }
        assert!(Instant::now() < deadline, "reservations left behind: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hard_budget_holds_against_a_race_of_streams_with_failures_mixed_in() {
    let gw = gateway_with("", &[]);
    for (round, account) in ["acme/race", "acme/race-faults"].into_iter().enumerate() {
        let key = gw.key_for(account, &["gateway"]);
        // A prompt of ~14 tokens plus 20 of output: the limit fits five requests.
        let limit = 180;
        set_budget(
            &gw,
            account,
            json!({"tokens": limit, "period": "month", "mode": "hard"}),
        );
        let before = sim_requests(&gw);
        let answers = race(&gw, &key, 500, |i| match (round, i % 5) {
            (1, 0) => Some("cut"),
            (1, 1) => Some("500"),
            _ => None,
        });
        let refused: Vec<&(u16, String)> = answers
            .iter()
            .filter(|(s, b)| *s == 429 && b.contains("insufficient_quota"))
            .collect();
        let forwarded = answers.len() - refused.len();
        assert!(forwarded >= 1, "round {round}: nothing got through");
        assert!(
            refused.len() >= 400,
            "round {round}: only {} refused",
            refused.len()
        );
        assert!(
            refused[0]
                .1
                .contains(&format!("hard limit 'default' on {account}")),
            "the refusal names the limit and node: {}",
            refused[0].1
        );
        // Every refused request was refused before reaching the provider.
        assert_eq!(
            sim_requests(&gw) - before,
            forwarded as u64,
            "round {round}"
        );
        let view = settled(&gw, account);
        let used = view["limits"][0]["used"].as_u64().unwrap();
        assert!(
            used <= limit,
            "round {round}: used {used} of {limit}: {view}"
        );
        // The ledger agrees with the engine, and holds the limit too.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ledger = used_in_ledger(&gw, account);
            if ledger as u64 == used {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ledger {ledger} != engine {used}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn access_rules_rate_limits_and_clamping() {
    let gw = gateway_with("", &[]);
    let key = gw.key.clone();
    let url = gw.server.url.clone();
    let chat = |model: &str, max: u64| json!({"model": model, "max_tokens": max, "messages": [{"role": "user", "content": "hello"}]});
    // Models: deny on the parent reaches the child; an allow list on the child.
    let (s, _) = gw.server.http(
        "PUT",
        "/api/v1/access/acme",
        &gw.admin,
        Some(&json!({"deny": ["gpt-4o-mini*", "claude-haiku*"]})),
    );
    assert_eq!(s, 200);
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat("gpt-4o-mini", 5)),
    );
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["error"]["code"], "model_not_allowed");
    let r = raw(
        &url,
        "/v1/messages",
        &key,
        &[],
        &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        None,
    );
    assert_eq!(r.status, 403);
    assert!(r.body.contains("permission_error"), "{}", r.body);
    let (s, _) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat("gpt-4o", 5)),
    );
    assert_eq!(s, 200);

    // A per-request clamp: max_tokens 200 is lowered to what fits (30 - prompt).
    set_budget(
        &gw,
        "acme/app",
        json!({"name": "per-request", "tokens": 30, "period": "lifetime", "per": "request", "clamp": true}),
    );
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat("gpt-4o", 200)),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    let total = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(total <= 30, "clamped: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (s, _) = gw.server.http(
        "DELETE",
        "/api/v1/budgets/acme/app?name=per-request",
        &gw.admin,
        None,
    );
    assert_eq!(s, 200);

    // A rate limit per key: 2 requests per minute, then 429 with retry-after.
    set_budget(
        &gw,
        "acme/app",
        json!({"name": "rpm", "requests": 2, "period": "minute", "per": "key"}),
    );
    for _ in 0..2 {
        let (s, _) = http(
            &url,
            "POST",
            "/v1/chat/completions",
            &key,
            Some(&chat("gpt-4o", 5)),
        );
        assert_eq!(s, 200);
    }
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[],
        &chat("gpt-4o", 5),
        None,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("rate_limit_exceeded"), "{}", r.body);
    let retry: u64 = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Bad limits are refused, naming what is wrong.
    let (s, b) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &gw.admin,
        Some(&json!({"tokens": 5, "period": "fortnight"})),
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("period"));
    let (s, _) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/ghost",
        &gw.admin,
        Some(&json!({"tokens": 5, "period": "day"})),
    );
    assert_eq!(s, 404);
    let (s, b) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &key,
        Some(&json!({"tokens": 5, "period": "day"})),
    );
    assert_eq!(
        s,
        403,
        "a gateway key cannot set budgets: {}",
        String::from_utf8_lossy(&b)
    );
}

/// A local webhook receiver: answers 500 to the first request, then 200; keeps every
/// (signature header, body).
/// What the receiver got: (signature header, body) per delivery it accepted.
type Deliveries = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

fn receiver() -> (String, Deliveries) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut sig = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("x-ciyuan-signature: ") {
                    sig = line[line.len() - v.len()..].trim().to_string();
                }
                if let Some(v) = lower.strip_prefix("content-length: ") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
            if n > 0 {
                seen.lock()
                    .unwrap()
                    .push((sig, String::from_utf8_lossy(&body).to_string()));
            }
        }
    });
    (url, got)
}

#[test]
fn thresholds_write_incidents_and_call_signed_webhooks_and_ingest_over_a_hard_limit_is_flagged() {
    let (hook, got) = receiver();
    let secret = "a-test-secret-of-enough-bytes";
    let gw = gateway_with(
        &format!(
            "[[webhooks]]\nname = \"ops\"\nurl = \"{hook}\"\nsecret_env = \"CIYUAN_TEST_HOOK_SECRET\"\nevents = [\"budget.*\"]\n"
        ),
        &[("CIYUAN_TEST_HOOK_SECRET", secret)],
    );
    let ingest = gw.key_for("acme/batch", &["ingest"]);
    // Usage from before the limit counts once the limit is set.
    let early = gw.key_for("acme/batch/early", &["gateway"]);
    let (s, b) = http(
        &gw.server.url,
        "POST",
        "/v1/chat/completions",
        &early,
        Some(
            &json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "before"}]}),
        ),
    );
    assert_eq!(s, 200);
    let before = json(&b)["usage"]["total_tokens"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_in_ledger(&gw, "acme/batch") == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = set_budget(
        &gw,
        "acme/batch",
        json!({"tokens": 100 + before, "period": "lifetime", "mode": "hard", "thresholds": [50, 100]}),
    );
    assert_eq!(
        v["limits"][0]["used"], before,
        "the month so far is counted: {v}"
    );
    set_budget(
        &gw,
        "acme/batch",
        json!({"tokens": 100 + before, "period": "lifetime", "mode": "hard", "thresholds": [50, 100]}),
    );
    let event = |id: &str, n: u64| {
        json!({"specversion": "1.0", "id": id, "source": "svc://batch", "type": "llm.usage",
               "subject": "acme/batch", "data": {"model": "m", "input_tokens": n}})
    };
    let post = |ev: &Value| {
        let addr = gw.server.url.trim_start_matches("http://").to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let body = ev.to_string();
        write!(
            s,
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ingest}\r\nContent-Type: application/cloudevents+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        serde_json::from_str::<Value>(&body).unwrap_or(Value::String(out))
    };
    let a = post(&event("e1", 60));
    assert_eq!(a["status"], "accepted", "{a}");
    assert!(a.get("over_limit").is_none(), "{a}");
    // Usage that already happened is recorded even over a hard limit, and flagged.
    let b = post(&event("e2", 70));
    assert_eq!(b["status"], "accepted", "{b}");
    assert_eq!(b["over_limit"], true, "{b}");
    let over_entry = b["entry_id"].as_u64().unwrap();

    // Incidents: 50% reached by e1, 100% and exceeded by e2.
    let deadline = Instant::now() + Duration::from_secs(20);
    let incidents = loop {
        let (_, body) = gw
            .server
            .http("GET", "/api/v1/incidents?account=acme", &gw.admin, None);
        let rows = json(&body)["rows"].as_array().unwrap().clone();
        if rows.len() >= 3 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let kinds: Vec<(String, Option<u64>)> = incidents
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["threshold"].as_u64(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("budget.threshold".into(), Some(50))),
        "{incidents:?}"
    );
    assert!(
        kinds.contains(&("budget.threshold".into(), Some(100))),
        "{incidents:?}"
    );
    let exceeded = incidents
        .iter()
        .find(|r| r["kind"] == "budget.exceeded")
        .unwrap_or_else(|| panic!("{incidents:?}"));
    assert_eq!(exceeded["cause"], over_entry);
    assert_eq!(exceeded["used"], 130 + before);

    // Webhooks: each incident once (after a retry of the first), signed, with an id.
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "webhooks: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = got.lock().unwrap().clone();
    let mut ids = std::collections::BTreeSet::new();
    for (sig, body) in &got {
        assert!(
            ciyuan_notify::verify(
                secret,
                sig,
                body.as_bytes(),
                ciyuan_core::jiff::Timestamp::now(),
                Duration::from_secs(300)
            ),
            "bad signature {sig} on {body}"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(v["type"].as_str().unwrap().starts_with("budget."));
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        ids.len(),
        got.len(),
        "one delivery per incident once delivered"
    );
    // The delivery log shows the failed first attempt and every delivery.
    let (s, b) = gw.server.http(
        "GET",
        "/api/v1/webhooks/deliveries?limit=100",
        &gw.admin,
        None,
    );
    assert_eq!(s, 200);
    let log = json(&b)["rows"].as_array().unwrap().clone();
    let states: Vec<&str> = log.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert!(states.contains(&"failed"), "{log:?}");
    assert_eq!(
        states.iter().filter(|s| **s == "delivered").count(),
        3,
        "{log:?}"
    );
    // The budget view: used 130 of 100, nothing reserved.
    let view = budget(&gw, "acme/batch");
    assert_eq!(view["limits"][0]["used"], 130 + before, "{view}");
    assert_eq!(view["limits"][0]["remaining"], 0);
    let _ = request_id;
}

#[test]
fn limits_and_usage_survive_a_crash_and_reservations_of_dead_requests_are_released() {
    let mut gw = gateway_with("", &[]);
    let key = gw.key.clone();
    set_budget(
        &gw,
        "acme",
        json!({"tokens": 400, "period": "month", "mode": "hard"}),
    );
    // Per-key and per-session limits are restored too.
    for per in ["key", "session"] {
        set_budget(
            &gw,
            "acme",
            json!({"name": format!("per-{per}"), "tokens": 400, "period": "day",
                   "mode": "hard", "per": per}),
        );
    }
    // One request settles; slow streams hold reservations when the server dies.
    let r = raw(
        &gw.server.url,
        "/v1/chat/completions",
        &key,
        &[("x-ciyuan-session", "s")],
        &json!({"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Its entry is in the ledger (appended a few ms after the answer).
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_in_ledger(&gw, "acme") == 0 {
        assert!(Instant::now() < deadline, "usage never reached the ledger");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = gw.server.url.clone();
    let k = key.clone();
    let slow = std::thread::spawn(move || {
        raw(
            &url,
            "/v1/chat/completions",
            &k,
            &[
                ("x-sim-tokens-per-sec", "5"),
                ("x-sim-output-tokens", "100"),
            ],
            &json!({"model": "gpt-4o", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "slow"}]}),
            None,
        )
    });
    // Wait until the stream's reservation shows, then kill the server under it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let used_before = loop {
        let v = budget(&gw, "acme");
        if v["limits"][0]["reserved"].as_u64().unwrap() > 0 {
            break v["limits"][0]["used"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no reservation: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(used_before > 0);
    gw.restart_hard();
    let _ = slow.join();
    // The limit is back from the ledger, its usage restored from the projections,
    // and the dead request's reservation is gone.
    let v = budget(&gw, "acme");
    let l = &v["limits"][0];
    assert_eq!(
        (l["name"].as_str(), l["amount"].as_u64()),
        (Some("default"), Some(400)),
        "{v}"
    );
    assert_eq!(l["used"].as_u64(), Some(used_before), "{v}");
    assert_eq!(l["reserved"], 0, "{v}");
    // The key's and the session's counters are back with what the settled request
    // used (they started empty before the subject rollups).
    for (name, subject) in [("per-key", "key:"), ("per-session", "session:s")] {
        let rows: Vec<&Value> = v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["name"] == name)
            .collect();
        assert_eq!(rows.len(), 1, "{name}: {v}");
        assert!(
            rows[0]["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with(subject)),
            "{v}"
        );
        assert_eq!(rows[0]["used"].as_u64(), Some(used_before), "{name}: {v}");
    }
    // And it is still enforced.
    let (s, b) = http(
        &gw.server.url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(
            &json!({"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "too big"}]}),
        ),
    );
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn session_limits_soft_limits_and_the_cli() {
    let gw = gateway_with("", &[]);
    let url = gw.server.url.clone();
    let key = gw.key_for("acme/sess", &["gateway"]);
    let stdout = |args: &[&str]| {
        let o = gw.server.cli(&gw.admin, args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // The README's commands: a per-session hard cap and a soft limit, by the CLI.
    let out = stdout(&[
        "budgets",
        "set",
        "acme/sess",
        "--name",
        "per-session",
        "--tokens",
        "40",
        "--period",
        "day",
        "--per",
        "session",
        "--hard",
    ]);
    assert!(
        out.contains("per-session  hard 40 tokens per day per session"),
        "{out}"
    );
    let out = stdout(&[
        "budgets",
        "set",
        "acme",
        "--name",
        "soft",
        "--tokens",
        "10",
        "--period",
        "month",
        "--soft",
        "--thresholds",
        "100",
    ]);
    assert!(
        out.contains("soft         soft 10 tokens per month"),
        "{out}"
    );
    let chat = |user: Option<&str>| {
        let mut body = json!({"model": "gpt-4o", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hello"}]});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        body
    };
    // Session "a" by header: ~18 tokens each, the third does not fit in 40.
    for _ in 0..2 {
        let r = raw(
            &url,
            "/v1/chat/completions",
            &key,
            &[("x-ciyuan-session", "a")],
            &chat(None),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-ciyuan-session", "a")],
        &chat(None),
        None,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("per-session"), "{}", r.body);
    // Session "b" by the request's user field has its own counter; so does no session.
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat(Some("b"))),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, _) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat(None)),
    );
    assert_eq!(s, 200);
    // The soft limit was passed long ago: allowed, with one incident at 100%.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = gw
            .server
            .http("GET", "/api/v1/incidents?account=acme", &gw.admin, None);
        let rows = json(&body)["rows"].as_array().unwrap().clone();
        let soft: Vec<&Value> = rows.iter().filter(|r| r["limit"] == "soft").collect();
        if !soft.is_empty() {
            assert_eq!(soft.len(), 1, "once per window: {rows:?}");
            assert_eq!(
                (soft[0]["mode"].as_str(), soft[0]["threshold"].as_u64()),
                (Some("soft"), Some(100))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no incident for the soft limit: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Show lists the session counters; clear and access set work from the CLI too.
    let out = stdout(&["budgets", "show", "acme/sess"]);
    assert!(
        out.contains("[session:a]") && out.contains("[session:b]"),
        "{out}"
    );
    stdout(&["budgets", "clear", "acme/sess", "--name", "per-session"]);
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-ciyuan-session", "a")],
        &chat(None),
        None,
    );
    assert_eq!(r.status, 200, "cleared: {}", r.body);
    stdout(&["access", "set", "acme/sess", "--deny", "gpt-4o*"]);
    let (s, _) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat(None)),
    );
    assert_eq!(s, 403);
}
