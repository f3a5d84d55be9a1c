//! `ciyuan serve --demo`: on start, sends a few calls through the server's own gateway
//! (to the simulated provider when no provider is configured) and prints what the
//! ledger recorded, so a new user sees tokens metered at once.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::Duration;

/// Runs the demo against the server at `url` with an admin key.
pub async fn run(url: String, admin: String) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()?;
    let admin_post = |path: &str, body: Value| {
        http.post(format!("{url}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let r = admin_post("/api/v1/accounts", json!({"path": "demo/app"})).await?;
    if !(r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT) {
        bail!("creating account demo/app: {}", r.text().await?);
    }
    let key: Value = admin_post(
        "/api/v1/keys",
        json!({"account": "demo/app", "scopes": ["gateway", "read"], "name": "demo"}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    let key = key["key"]
        .as_str()
        .context("no key in the answer")?
        .to_string();
    println!("demo: account demo/app, gateway key {key}");
    let question = "How does a ledger make every token auditable? 请简要回答。";
    let calls = [
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": 60,
                   "messages": [{"role": "user", "content": question}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "qwen-max", "max_tokens": 40, "stream": true,
                   "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": question}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 50,
                   "messages": [{"role": "user", "content": question}]}),
        ),
    ];
    for (path, body) in calls {
        let model = body["model"].as_str().unwrap_or("").to_string();
        let stream = body["stream"].as_bool().unwrap_or(false);
        let resp = http
            .post(format!("{url}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        // The usage the provider reported, as the client sees it.
        let usage = if stream {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        } else {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("usage").cloned())
        };
        let n = |a: &str, b: &str| {
            let u = usage.as_ref();
            u.and_then(|u| u.get(a).or_else(|| u.get(b)))
                .and_then(Value::as_u64)
                .map_or("-".to_string(), |n| n.to_string())
        };
        println!(
            "demo: POST {path:<21} {model:<18} {:<8} -> {status}: the provider reports {} input, {} output tokens",
            if stream { "(stream)" } else { "" },
            n("prompt_tokens", "input_tokens"),
            n("completion_tokens", "output_tokens"),
        );
    }
    // Entries are appended once each answer is out; wait for queries to see all three.
    let mut rows = Value::Null;
    for _ in 0..100 {
        let v: Value = http
            .get(format!(
                "{url}/api/v1/usage?account=demo/app&group_by=model"
            ))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        if v["rows"].as_array().map_or(0, Vec::len) >= 3 {
            rows = v["rows"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("demo: usage of demo/app in the ledger, by model:");
    for r in rows.as_array().into_iter().flatten() {
        println!(
            "        {:<20} {}",
            r["model"].as_str().unwrap_or("-"),
            r["tokens"]
        );
    }
    println!(
        "demo: try it: curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' \
         -H 'content-type: application/json' \
         -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    Ok(())
}
