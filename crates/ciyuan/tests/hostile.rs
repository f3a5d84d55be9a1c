//! A hostile tenant (issue 13): every control set from above, every quantity near its
//! limit, every field with control characters. Each regression is named after the
//! defect it pins; at the end the server restarts, the ledger verifies and usage
//! answers equal those after a rebuild from the log alone.

use crate::common::{Server, json, rebuild, stdout, verify};
use crate::gateway::{Gateway, gateway_with};
use serde_json::{Value, json};

const MAX: i64 = 1_000_000_000_000;

fn call(server: &Server, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let (s, b) = server.http(method, path, key, body.as_ref());
    let v = if b.is_empty() { Value::Null } else { json(&b) };
    (s, v)
}

/// Asserts a problem+json refusal whose detail contains `needle`.
fn refused(answer: (u16, Value), status: u16, needle: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let detail = answer.1["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains(needle), "{needle:?} not in {detail:?}");
}

fn ingest(server: &Server, key: &str, events: Value) -> (u16, Value) {
    let (s, b) = crate::common::http(&server.url, "POST", "/v1/events", key, Some(&events));
    (s, json(&b))
}

fn event(id: &str, subject: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "svc://hostile", "type": "llm.usage",
           "subject": subject, "data": data})
}

fn usage(server: &Server, key: &str, account: &str) -> Value {
    let (s, v) = call(
        server,
        "GET",
        &format!("/api/v1/usage?account={account}&group_by=account,model"),
        key,
        None,
    );
    assert_eq!(s, 200, "{v}");
    v
}

struct Tenant {
    gw: Gateway,
    root: String,
    acme: String,
    a_admin: String,
    a_read: String,
    a_ingest: String,
    a_gateway: String,
    b_gateway: String,
}

fn tenant() -> Tenant {
    let gw = gateway_with("", &[]);
    let root = gw.admin.clone();
    let acme = gw.key_for("acme", &["admin", "read"]);
    let a_admin = gw.key_for("acme/a", &["admin"]);
    let a_read = gw.key_for("acme/a", &["read"]);
    let a_ingest = gw.key_for("acme/a", &["ingest"]);
    let a_gateway = gw.key_for("acme/a", &["gateway"]);
    let b_gateway = gw.key_for("acme/b", &["gateway"]);
    Tenant {
        gw,
        root,
        acme,
        a_admin,
        a_read,
        a_ingest,
        a_gateway,
        b_gateway,
    }
}

fn chat(t: &Tenant, key: &str, model: &str, user: &str) -> u16 {
    let r = crate::gateway::raw(
        &t.gw.server.url,
        "/v1/chat/completions",
        key,
        &[],
        &json!({"model": model, "max_tokens": 20, "user": user,
                "messages": [{"role": "user", "content": "hello"}]}),
        None,
    );
    r.status
}

#[test]
fn regression_token_quantities_are_bounded_and_sums_exact() {
    let t = tenant();
    let s = &t.gw.server;
    // i64::MAX and anything past the per-key maximum are refused, naming the field.
    for (data, field) in [
        (
            json!({"model": "m", "input_tokens": 9223372036854775807i64}),
            "data.input_tokens",
        ),
        (
            json!({"model": "m", "output_tokens": MAX + 1}),
            "data.output_tokens",
        ),
        (
            json!({"model": "m", "tokens": {"text.input": MAX + 1}}),
            "data.tokens.text.input",
        ),
        (
            json!({"model": "m", "input_tokens": MAX, "tokens": {"text.input": 1}}),
            "text.input",
        ),
    ] {
        let (st, v) = ingest(s, &t.a_ingest, event("big", "acme/a", data));
        assert_eq!(st, 400, "{v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{field}: {detail}");
    }
    // At the bound, accepted; the sums of many stay exact.
    for i in 0..3 {
        let (st, v) = ingest(
            s,
            &t.a_ingest,
            event(
                &format!("max-{i}"),
                "acme/a",
                json!({"model": "m", "input_tokens": MAX}),
            ),
        );
        assert_eq!(st, 201, "{v}");
    }
    let u = usage(s, &t.acme, "acme");
    assert_eq!(u["rows"][0]["total"], json!(3 * MAX), "{u}");
    // An hourly budget on the ancestor: the server still starts and counts exactly.
    let (st, v) = call(
        s,
        "PUT",
        "/api/v1/budgets/acme",
        &t.root,
        Some(
            json!({"name": "hourly", "tokens": 9_000_000_000_000_000_000u64, "period": "hour", "mode": "soft"}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let mut t = t;
    t.gw.restart_hard();
    let s = &t.gw.server;
    let (st, v) = call(s, "GET", "/api/v1/budgets/acme", &t.root, None);
    assert_eq!(st, 200, "{v}");
    let hourly = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "hourly")
        .unwrap()
        .clone();
    assert_eq!(hourly["used"], json!(3 * MAX), "{v}");
}

#[test]
fn regression_a_tenant_admin_cannot_lift_its_parents_controls() {
    let t = tenant();
    let s = &t.gw.server;
    let limit = json!({"name": "cap", "tokens": 100, "period": "month"});
    let (st, v) = call(s, "PUT", "/api/v1/budgets/acme/a", &t.acme, Some(limit));
    assert_eq!(st, 200, "{v}");
    // Raising, replacing or removing it from acme/a is refused, naming the setter.
    let raise = json!({"name": "cap", "tokens": 1_000_000, "period": "month"});
    refused(
        call(
            s,
            "PUT",
            "/api/v1/budgets/acme/a",
            &t.a_admin,
            Some(raise.clone()),
        ),
        403,
        "set by a key at acme",
    );
    refused(
        call(
            s,
            "DELETE",
            "/api/v1/budgets/acme/a?name=cap",
            &t.a_admin,
            None,
        ),
        403,
        "set by a key at acme",
    );
    // A model denied from above stays denied.
    let (st, v) = call(
        s,
        "PUT",
        "/api/v1/access/acme/a",
        &t.acme,
        Some(json!({"deny": ["gpt-4o*"]})),
    );
    assert_eq!(st, 200, "{v}");
    refused(
        call(
            s,
            "PUT",
            "/api/v1/access/acme/a",
            &t.a_admin,
            Some(json!({"deny": []})),
        ),
        403,
        "model access rules on acme/a was set by a key at acme",
    );
    assert_eq!(chat(&t, &t.a_gateway, "gpt-4o", "u"), 403);
    // The tenant may add and change its own limits, and the setter (or above) may
    // change the parent's.
    let own = json!({"name": "mine", "tokens": 50, "period": "day"});
    assert_eq!(
        call(s, "PUT", "/api/v1/budgets/acme/a", &t.a_admin, Some(own)).0,
        200
    );
    let own = json!({"name": "mine", "tokens": 60, "period": "day"});
    assert_eq!(
        call(s, "PUT", "/api/v1/budgets/acme/a", &t.a_admin, Some(own)).0,
        200
    );
    assert_eq!(
        call(s, "PUT", "/api/v1/budgets/acme/a", &t.acme, Some(raise)).0,
        200
    );
    assert_eq!(
        call(
            s,
            "DELETE",
            "/api/v1/budgets/acme/a?name=cap",
            &t.root,
            None
        )
        .0,
        200
    );
    assert_eq!(
        call(s, "PUT", "/api/v1/access/acme/a", &t.acme, Some(json!({}))).0,
        200
    );
    assert_eq!(chat(&t, &t.a_gateway, "gpt-4o", "u"), 200);
    // Rules cleared from above protect nothing: acme/a sets, then changes, its own.
    for deny in ["x*", "y*"] {
        let (st, v) = call(
            s,
            "PUT",
            "/api/v1/access/acme/a",
            &t.a_admin,
            Some(json!({"deny": [deny]})),
        );
        assert_eq!(st, 200, "{v}");
    }
}

#[test]
fn a_tenant_admin_cannot_move_its_windows_or_its_cost_center() {
    let t = tenant();
    let s = &t.gw.server;
    let set = json!({"time_zone": "Asia/Shanghai", "metadata": {"cost_center": "CC-1"}});
    assert_eq!(
        call(s, "PATCH", "/api/v1/accounts/acme/a", &t.acme, Some(set)).0,
        200
    );
    for body in [
        json!({"time_zone": "Pacific/Kiritimati"}),
        json!({"metadata": {"cost_center": "CC-9"}}),
    ] {
        refused(
            call(
                s,
                "PATCH",
                "/api/v1/accounts/acme/a",
                &t.a_admin,
                Some(body),
            ),
            403,
            "set from above",
        );
    }
    // Renaming is the node's own; repeating the values in force changes nothing.
    let same = json!({"display_name": "A", "time_zone": "Asia/Shanghai",
                      "metadata": {"cost_center": "CC-1"}});
    let (st, v) = call(
        s,
        "PATCH",
        "/api/v1/accounts/acme/a",
        &t.a_admin,
        Some(same),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["metadata"]["cost_center"], "CC-1");
}

#[test]
fn regression_a_tenant_admin_cannot_credit_itself() {
    let t = tenant();
    let s = &t.gw.server;
    for i in 0..2 {
        let (st, v) = ingest(
            s,
            &t.a_ingest,
            event(
                &format!("u-{i}"),
                "acme/a",
                json!({"model": "m", "input_tokens": 1000}),
            ),
        );
        assert_eq!(st, 201, "{v}");
    }
    let adj = |account: &str, n: i64, corrects: Option<u64>| {
        json!({"account": account, "reason": "correction", "service": "llm.usage",
               "model": "m", "tokens": {"text.input": n}, "corrects": corrects})
    };
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.a_admin,
            Some(adj("acme/a", -1000, None)),
        ),
        403,
        "made from above",
    );
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.root,
            Some(adj("/", -1, None)),
        ),
        403,
        "made from above",
    );
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.acme,
            Some(adj("acme/ghost", 5, None)),
        ),
        404,
        "does not exist",
    );
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.acme,
            Some(adj("acme/a", i64::MIN, None)),
        ),
        400,
        "tokens.text.input",
    );
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.acme,
            Some(adj("acme/a", -2001, None)),
        ),
        422,
        "below zero",
    );
    // Exactly what was recorded may be taken back, and no more.
    let (st, v) = call(
        s,
        "POST",
        "/api/v1/adjustments",
        &t.acme,
        Some(adj("acme/a", -2000, None)),
    );
    assert_eq!(st, 201, "{v}");
    refused(
        call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.acme,
            Some(adj("acme/a", -1, None)),
        ),
        422,
        "below zero",
    );
    let u = usage(s, &t.acme, "acme");
    assert_eq!(u["rows"][0]["total"], 0, "{u}");
}

#[test]
fn regression_corrects_errors_do_not_name_other_tenants() {
    let t = tenant();
    let s = &t.gw.server;
    let b_ingest = t.gw.key_for("acme/b", &["ingest"]);
    let (st, v) = ingest(
        s,
        &b_ingest,
        event("b-1", "acme/b", json!({"model": "m", "input_tokens": 10})),
    );
    assert_eq!(st, 201, "{v}");
    let b_entry = v["entry_id"].as_u64().unwrap();
    let (_, v) = ingest(
        s,
        &t.a_ingest,
        event("a-1", "acme/a", json!({"model": "m", "input_tokens": 10})),
    );
    let a_entry = v["entry_id"].as_u64().unwrap();
    t.gw.key_for("acme/a/x", &["ingest"]);
    // acme/a's admin corrects its own child: an entry of acme/b, a key entry and a
    // missing entry all get the same answer, naming neither acme/b nor a kind.
    let a_admin = &t.a_admin;
    let mut details = Vec::new();
    for id in [b_entry, 0, 1 << 40, a_entry] {
        let (st, v) = call(
            s,
            "POST",
            "/api/v1/adjustments",
            a_admin,
            Some(json!({"account": "acme/a/x", "corrects": id, "reason": "r",
                        "service": "llm.usage", "tokens": {"text.input": 1}})),
        );
        assert_eq!(st, 422, "{v}");
        let d = v["detail"].as_str().unwrap().to_string();
        assert!(!d.contains("acme/b") && !d.contains("key.created"), "{d}");
        details.push(d.replace(&id.to_string(), "N"));
    }
    assert!(details.windows(2).all(|w| w[0] == w[1]), "{details:?}");
}

#[test]
fn regression_session_subjects_do_not_leak_across_tenants() {
    let t = tenant();
    let s = &t.gw.server;
    let (st, v) = call(
        s,
        "PUT",
        "/api/v1/budgets/acme",
        &t.root,
        Some(json!({"name": "per-user", "tokens": 1_000_000, "period": "day", "per": "session"})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(chat(&t, &t.b_gateway, "gpt-4o", "bob@b.example"), 200);
    let (st, v) = call(s, "GET", "/api/v1/budgets/acme/a", &t.a_read, None);
    assert_eq!(st, 200, "{v}");
    let text = v.to_string();
    assert!(!text.contains("bob@b.example"), "{text}");
    // The limit itself is shown; the owner of the ancestor sees the sessions.
    assert!(text.contains("per-user"), "{text}");
    let (_, v) = call(s, "GET", "/api/v1/budgets/acme", &t.acme, None);
    assert!(v.to_string().contains("bob@b.example"), "{v}");
}

#[test]
fn regression_control_characters_and_unbounded_lists_are_refused() {
    let t = tenant();
    let s = &t.gw.server;
    for (method, path, body, field) in [
        (
            "POST",
            "/api/v1/accounts",
            json!({"path": "acme/c", "display_name": "\u{1b}[31mred"}),
            "display_name",
        ),
        (
            "POST",
            "/api/v1/accounts",
            json!({"path": "acme/c", "metadata": {"cc": "a\u{0}b"}}),
            "metadata.cc",
        ),
        (
            "POST",
            "/api/v1/accounts",
            json!({"path": "acme/c", "metadata": {"c\nc": "x"}}),
            "metadata key",
        ),
        (
            "POST",
            "/api/v1/keys",
            json!({"account": "acme", "scopes": ["read"], "name": "x\r\ny"}),
            "name",
        ),
        (
            "PUT",
            "/api/v1/budgets/acme",
            json!({"name": "a\u{7f}", "tokens": 1, "period": "day"}),
            "name",
        ),
    ] {
        refused(call(s, method, path, &t.acme, Some(body)), 400, field);
    }
    for (attr, value) in [("id", "ev\u{1b}1"), ("source", "svc\u{0}x")] {
        let mut e = event("ok", "acme/a", json!({"model": "m", "input_tokens": 1}));
        e[attr] = json!(value);
        let (st, v) = ingest(s, &t.a_ingest, e);
        assert_eq!(st, 400, "{v}");
        assert!(v["detail"].as_str().unwrap().contains(attr), "{v}");
    }
    let many: Vec<String> = (0..257).map(|i| format!("m{i}*")).collect();
    refused(
        call(
            s,
            "PUT",
            "/api/v1/access/acme",
            &t.acme,
            Some(json!({"deny": many})),
        ),
        400,
        "more than 256",
    );
    // An admin-only key may create a read key: admin implies read.
    let admin_only = t.gw.key_for("acme", &["admin"]);
    let (st, v) = call(
        s,
        "POST",
        "/api/v1/keys",
        &admin_only,
        Some(json!({"account": "acme/a", "scopes": ["read"]})),
    );
    assert_eq!(st, 201, "{v}");
}

/// After every bad input above the server restarts, the ledger verifies, and usage
/// answers equal those after a rebuild from the log alone.
#[test]
fn after_hostile_input_the_ledger_verifies_and_rebuilds_identically() {
    let mut t = tenant();
    let root = t.root.clone();
    {
        let s = &t.gw.server;
        let (st, _) = ingest(
            s,
            &t.a_ingest,
            event("ok-1", "acme/a", json!({"model": "m", "input_tokens": MAX})),
        );
        assert_eq!(st, 201);
        let (st, _) = ingest(
            s,
            &t.a_ingest,
            event(
                "bad",
                "acme/a",
                json!({"model": "m", "input_tokens": 9223372036854775807i64}),
            ),
        );
        assert_eq!(st, 400);
        let (st, _) = call(
            s,
            "POST",
            "/api/v1/adjustments",
            &t.a_admin,
            Some(
                json!({"account": "acme/a", "reason": "r", "service": "llm.usage",
                        "tokens": {"text.input": -9223372036854775807i64}}),
            ),
        );
        assert_eq!(st, 403);
        assert_eq!(chat(&t, &t.a_gateway, "gpt-4o", "carol"), 200);
        // A model name of 1 MB is refused before it reaches a label or the ledger.
        let long = "m".repeat(1 << 20);
        assert_eq!(chat(&t, &t.a_gateway, &long, "carol"), 400);
        let (st, _) = s.http("GET", "/metrics", "", None);
        assert_eq!(st, 401);
        let (st, page) = s.http("GET", "/metrics", &root, None);
        assert_eq!(st, 200);
        assert!(page.len() < 64 << 10, "{} bytes", page.len());
    }
    t.gw.restart_hard();
    let before = usage(&t.gw.server, &root, "/");
    let data = t.gw.server.data_dir.clone();
    t.gw.server.child.kill().unwrap();
    t.gw.server.child.wait().unwrap();
    let (code, msg) = verify(&data);
    assert_eq!(code, 0, "{msg}");
    assert!(stdout(&rebuild(&data)).contains("rebuilt projections"));
    t.gw.restart_hard();
    let after = usage(&t.gw.server, &root, "/");
    assert_eq!(before, after);
}

/// A client that hangs up while its request waits for the provider's answer: the
/// provider still answers (and charges), so the gateway records the usage and frees
/// what admission held — nothing is left to lapse an hour later, nothing goes
/// unmetered.
#[test]
fn regression_a_client_gone_before_the_answer_is_metered_and_frees_its_hold() {
    use std::io::Write;
    let gw = gateway_with("", &[]);
    // Room for one request's reservation (prompt + 200 output tokens), not two.
    let (s, body) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &gw.admin,
        Some(&json!({"name": "one-at-a-time", "tokens": 300, "period": "month"})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let body = json!({"model": "gpt-4o", "max_tokens": 200,
        "messages": [{"role": "user", "content": "Answer slowly."}]})
    .to_string();
    let addr = gw.server.url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nx-sim-ttft-ms: 1200\r\n\
         x-sim-output-tokens: 5\r\n\r\n{body}",
        gw.key,
        body.len()
    )
    .unwrap();
    // Gone while the provider thinks.
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // Its usage is in the ledger...
    let (st, entries) = gw.server.http(
        "GET",
        "/api/v1/audit/entries?start=0&limit=1000",
        &gw.admin,
        None,
    );
    assert_eq!(st, 200);
    let usage: Vec<Value> = String::from_utf8_lossy(&entries)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "usage" && e["data"]["source"] == "gateway")
        .collect();
    assert_eq!(usage.len(), 1, "the hung-up request's usage: {usage:?}");
    assert_eq!(usage[0]["data"]["tokens"]["text.output"], 5, "{}", usage[0]);
    // ...and its reservation is settled: the next request fits the limit again.
    let (st, b) = gw.server.http(
        "POST",
        "/v1/chat/completions",
        &gw.key,
        Some(&json!({"model": "gpt-4o", "max_tokens": 200,
            "messages": [{"role": "user", "content": "Answer quickly."}]})),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
}
