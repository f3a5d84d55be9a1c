//! Drives the simulator over real HTTP and checks shapes, token counts and faults.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_measure::text::{ChatMessage, Encoding, estimate_chat};
use ciyuan_sim::{SimConfig, serve};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Fast defaults for tests: no waiting unless a test asks.
fn fast() -> SimConfig {
    SimConfig {
        ttft: Duration::ZERO,
        tokens_per_sec: 0.0,
        ..SimConfig::default()
    }
}

async fn start(cfg: SimConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, cfg));
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn o200k(s: &str) -> usize {
    Encoding::O200kBase.count(s).unwrap()
}

fn chat_body(model: &str, user: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user}
        ]
    })
}

fn chat_prompt(enc: Encoding, user: &str) -> usize {
    estimate_chat(
        enc,
        &[
            ChatMessage {
                role: "system",
                content: "You are a helpful assistant.",
                name: None,
            },
            ChatMessage {
                role: "user",
                content: user,
                name: None,
            },
        ],
    )
    .unwrap()
}

/// Server-sent events of a body: (event name, data) pairs.
fn events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data)
        })
        .collect()
}

async fn post(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Result<reqwest::Response> {
    let mut req = client().post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await
}

#[tokio::test]
async fn chat_completion_shape_and_exact_usage() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/chat/completions");
    let body = chat_body("gpt-4o-mini", "What is a token ledger?");
    let resp = post(&url, &body, &[]).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert!(
        resp.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    // Served by the alias's dated snapshot, as OpenAI answers; the provider's id of
    // the request in its header.
    assert_eq!(v["model"], "gpt-4o-mini-2024-07-18");
    assert!(v["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(text.is_ascii() && text.len() > 100, "{text}");
    let u = &v["usage"];
    let completion = o200k(text);
    let prompt = chat_prompt(Encoding::O200kBase, "What is a token ledger?");
    assert!((60..=260).contains(&completion), "{completion}");
    assert_eq!(u["completion_tokens"], completion);
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["total_tokens"], prompt + completion);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["prompt_tokens_details"]["audio_tokens"], 0);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);
    assert!(u.get("prompt_cache_hit_tokens").is_none());

    // Deterministic: the same request gets the same text.
    let again: Value = post(&url, &body, &[]).await.unwrap().json().await.unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], text);
    // Another seed, another text.
    let other = start(SimConfig { seed: 7, ..fast() }).await;
    let v2: Value = post(&format!("{other}/v1/chat/completions"), &body, &[])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(v2["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn chat_stream_with_and_without_include_usage() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/chat/completions");
    let mut body = chat_body("gpt-4.1", "Explain prompt caching.");
    let plain: Value = post(&url, &body, &[]).await.unwrap().json().await.unwrap();
    let plain_text = plain["choices"][0]["message"]["content"].as_str().unwrap();

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&url, &body, &[]).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let raw = resp.text().await.unwrap();
    let evs = events(&raw);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = evs[..evs.len() - 1]
        .iter()
        .map(|(e, d)| {
            assert!(e.is_none());
            serde_json::from_str(d).unwrap()
        })
        .collect();
    assert!(chunks.len() > 20, "about one chunk per token");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let mut text = String::new();
    for c in rest {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(
            c.get("usage").unwrap().is_null(),
            "usage: null before the end"
        );
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    let finish = rest.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(text, plain_text, "stream and non-stream give the same text");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], o200k(&text));
    assert_eq!(usage_chunk["usage"], plain["usage"]);

    // Without include_usage: no usage anywhere.
    body["stream_options"] = json!({"include_usage": false});
    let raw = post(&url, &body, &[]).await.unwrap().text().await.unwrap();
    let evs = events(&raw);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let mut text = String::new();
    for (_, d) in &evs[..evs.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("usage").is_none());
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, plain_text);
}

#[tokio::test]
async fn forced_lengths_caps_and_chinese() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/chat/completions");
    let body = chat_body("gpt-4o", "Tell me about budgets.");
    let v: Value = post(&url, &body, &[("x-sim-output-tokens", "37")])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(o200k(text), 37);
    assert_eq!(v["usage"]["completion_tokens"], 37);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Forced above max_completion_tokens: exactly the cap, finish "length".
    let mut capped = body.clone();
    capped["max_completion_tokens"] = json!(20);
    let v: Value = post(&url, &capped, &[("x-sim-output-tokens", "500")])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 20);
    assert_eq!(
        o200k(v["choices"][0]["message"]["content"].as_str().unwrap()),
        20
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // A natural answer longer than max_tokens is cut at exactly max_tokens.
    let mut capped = body.clone();
    capped["max_tokens"] = json!(9);
    let v: Value = post(&url, &capped, &[])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Chinese prompt, Qwen model: Chinese answer, Qwen counts.
    let zh = chat_body("qwen-plus", "请介绍一下词元计量。");
    let v: Value = post(&url, &zh, &[]).await.unwrap().json().await.unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)));
    assert_eq!(
        v["usage"]["completion_tokens"],
        Encoding::Qwen.count(text).unwrap()
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        chat_prompt(Encoding::Qwen, "请介绍一下词元计量。")
    );
}

#[tokio::test]
async fn deepseek_usage_and_cached_tokens_on_long_prompts() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/chat/completions");
    let mut seen_cached = false;
    for i in 0..8 {
        let long = format!("{i} ").repeat(1) + &"The ledger records every token. ".repeat(300);
        let body = chat_body("deepseek-chat", &long);
        let v: Value = post(&url, &body, &[]).await.unwrap().json().await.unwrap();
        let u = &v["usage"];
        let prompt = chat_prompt(Encoding::DeepSeekV4, &long);
        assert!(prompt > 1024);
        assert_eq!(u["prompt_tokens"], prompt);
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            u["completion_tokens"],
            Encoding::DeepSeekV4.count(text).unwrap()
        );
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(u["prompt_cache_hit_tokens"], cached);
        assert_eq!(u["prompt_cache_miss_tokens"], prompt as u64 - cached);
        assert!(cached < prompt as u64 && cached.is_multiple_of(128));
        seen_cached |= cached > 0;
    }
    assert!(seen_cached, "some long prompts report cached tokens");
}

#[tokio::test]
async fn legacy_completions() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/completions");
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 30});
    let v: Value = post(&url, &body, &[]).await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap();
    let cl = |s: &str| Encoding::Cl100kBase.count(s).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], cl(text));
    assert_eq!(v["usage"]["completion_tokens"], 30);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], cl("Say this is a test"));

    // Default max_tokens is 16, as OpenAI's.
    let v: Value = post(
        &url,
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b c"]}),
        &[],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let raw = post(&url, &sbody, &[]).await.unwrap().text().await.unwrap();
    let evs = events(&raw);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = evs[..evs.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    let streamed: String = rest
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert!(rest.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 30);
}

#[tokio::test]
async fn embeddings_and_models() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/embeddings");
    let v: Value = post(
        &url,
        &json!({"model": "text-embedding-3-small", "input": ["hello world", "词元"]}),
        &[],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let e0: Vec<f64> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(e0.len(), 1536);
    let norm: f64 = e0.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let expect = 2 + Encoding::Cl100kBase.count("词元").unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], expect);
    assert_eq!(v["usage"]["total_tokens"], expect);
    // Deterministic per input, and `dimensions`, base64.
    let one: Value = post(
        &url,
        &json!({"model": "text-embedding-3-small", "input": "hello world"}),
        &[],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(one["data"][0]["embedding"], data[0]["embedding"]);
    let b: Value = post(
        &url,
        &json!({"model": "text-embedding-3-large", "input": "x", "dimensions": 256, "encoding_format": "base64"}),
        &[],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let s = b["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(s.len(), (256 * 4usize).div_ceil(3) * 4);
    let bad = post(
        &url,
        &json!({"model": "text-embedding-3-small", "input": ""}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);

    let m: Value = client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert!(
        m["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == "gpt-4o" && x["object"] == "model")
    );
    let a: Value = client()
        .get(format!("{base}/v1/models"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(a["data"][0]["type"], "model");
    assert_eq!(a["has_more"], false);
}

fn anthropic_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "Be brief.",
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, Claude"}]}]
    })
}

fn anthropic_prompt() -> usize {
    estimate_chat(
        Encoding::O200kBase,
        &[
            ChatMessage {
                role: "system",
                content: "Be brief.",
                name: None,
            },
            ChatMessage {
                role: "user",
                content: "Hello, Claude",
                name: None,
            },
        ],
    )
    .unwrap()
}

const ANTHROPIC_HEADERS: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

#[tokio::test]
async fn anthropic_message_and_stream() {
    let base = start(fast()).await;
    let url = format!("{base}/v1/messages");
    let v: Value = post(&url, &anthropic_body(false), ANTHROPIC_HEADERS)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(v["content"][0]["type"], "text");
    let text = v["content"][0]["text"].as_str().unwrap();
    let u = &v["usage"];
    assert_eq!(u["output_tokens"], o200k(text));
    assert_eq!(u["input_tokens"], anthropic_prompt());
    assert_eq!(u["cache_creation_input_tokens"], 0);
    assert_eq!(u["cache_read_input_tokens"], 0);

    let raw = post(&url, &anthropic_body(true), ANTHROPIC_HEADERS)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evs = events(&raw);
    let names: Vec<&str> = evs.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(
        &names[..3],
        &["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        &names[names.len() - 3..],
        &["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    let datas: Vec<Value> = evs
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for ((name, _), d) in evs.iter().zip(&datas) {
        assert_eq!(d["type"].as_str(), name.as_deref());
    }
    let start_usage = &datas[0]["message"]["usage"];
    assert_eq!(start_usage["input_tokens"], anthropic_prompt());
    assert_eq!(start_usage["output_tokens"], 1);
    assert_eq!(start_usage["cache_read_input_tokens"], 0);
    assert_eq!(datas[1]["content_block"]["type"], "text");
    let streamed: String = datas[3..datas.len() - 3]
        .iter()
        .map(|d| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(streamed, text);
    let delta = &datas[datas.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], o200k(text));

    // max_tokens reached.
    let mut b = anthropic_body(false);
    b["max_tokens"] = json!(5);
    let v: Value = post(&url, &b, ANTHROPIC_HEADERS)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(o200k(v["content"][0]["text"].as_str().unwrap()), 5);

    // max_tokens is required.
    let mut b = anthropic_body(false);
    b.as_object_mut().unwrap().remove("max_tokens");
    let r = post(&url, &b, ANTHROPIC_HEADERS).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn error_faults_in_each_providers_shape() {
    let base = start(fast()).await;
    let chat = format!("{base}/v1/chat/completions");
    let msgs = format!("{base}/v1/messages");
    let body = chat_body("gpt-4o", "hi");

    let r = post(&chat, &body, &[("x-sim-fault", "429")]).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(e["error"]["message"].is_string());
    assert!(e["error"].get("param").unwrap().is_null());

    let r = post(&chat, &body, &[("x-sim-fault", "500")]).await.unwrap();
    assert_eq!(r.status(), 500);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "server_error");

    let r = post(&msgs, &anthropic_body(false), &[("x-sim-fault", "429")])
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": e["error"]["message"]}})
    );
    let r = post(&msgs, &anthropic_body(true), &[("x-sim-fault", "500")])
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "api_error");

    // Malformed requests, unknown paths, bad steering headers.
    let r = client()
        .post(&chat)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let r = post(&chat, &json!({"messages": []}), &[]).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = client()
        .post(format!("{base}/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("/v1/nope"));
    let r = client()
        .get(format!("{base}/v1/messages/batches"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "not_found_error");
    let r = post(&chat, &body, &[("x-sim-fault", "explode")])
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn random_faults_follow_the_rates() {
    let base = start(SimConfig {
        error_rate: 1.0,
        ..fast()
    })
    .await;
    let chat = format!("{base}/v1/chat/completions");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = post(&chat, &chat_body("gpt-4o", "hi"), &[]).await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.contains(&500) && statuses.contains(&429),
        "{statuses:?}"
    );
    // The header overrides the random rate.
    let r = post(
        &chat,
        &chat_body("gpt-4o", "hi"),
        &[("x-sim-fault", "none")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    let base = start(SimConfig {
        cut_rate: 1.0,
        ..fast()
    })
    .await;
    let chat = format!("{base}/v1/chat/completions");
    let mut body = chat_body("gpt-4o", "hi");
    // Non-streaming requests are not cut by cut_rate.
    assert_eq!(post(&chat, &body, &[]).await.unwrap().status(), 200);
    body["stream"] = json!(true);
    let r = post(&chat, &body, &[]).await.unwrap();
    assert!(r.text().await.is_err(), "stream cut");
}

#[tokio::test]
async fn cut_streams_and_requests() {
    let base = start(fast()).await;
    let chat = format!("{base}/v1/chat/completions");
    let mut body = chat_body("gpt-4o", "hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut r = post(&chat, &body, &[("x-sim-fault", "cut")]).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => panic!("stream ended cleanly"),
            Err(_) => break,
        }
    }
    let got = String::from_utf8(got).unwrap();
    assert!(
        got.contains("chat.completion.chunk"),
        "some chunks came first"
    );
    assert!(!got.contains("[DONE]") && !got.contains("finish_reason\":\"stop"));

    let r = post(
        &format!("{base}/v1/messages"),
        &anthropic_body(true),
        &[("x-sim-fault", "cut")],
    )
    .await
    .unwrap();
    assert!(r.text().await.is_err());

    // Non-streaming: the connection closes without a response.
    let r = post(&chat, &chat_body("gpt-4o", "hi"), &[("x-sim-fault", "cut")]).await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn timeouts_never_answer() {
    let base = start(fast()).await;
    let chat = format!("{base}/v1/chat/completions");
    let slow = tokio::time::timeout(
        Duration::from_millis(500),
        post(
            &chat,
            &chat_body("gpt-4o", "hi"),
            &[("x-sim-fault", "timeout")],
        ),
    )
    .await;
    assert!(slow.is_err(), "no answer");

    let mut body = chat_body("gpt-4o", "hi");
    body["stream"] = json!(true);
    let mut r = tokio::time::timeout(
        Duration::from_secs(5),
        post(&chat, &body, &[("x-sim-fault", "timeout")]),
    )
    .await
    .expect("headers arrive")
    .unwrap();
    assert_eq!(r.status(), 200);
    let next = tokio::time::timeout(Duration::from_millis(500), r.chunk()).await;
    assert!(next.is_err(), "then nothing");
}

#[tokio::test]
async fn malformed_and_no_usage() {
    let base = start(fast()).await;
    let chat = format!("{base}/v1/chat/completions");
    let r = post(
        &chat,
        &chat_body("gpt-4o", "hi"),
        &[("x-sim-fault", "malformed")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());
    assert!(text.starts_with('{'));

    let mut body = chat_body("gpt-4o", "hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let raw = post(&chat, &body, &[("x-sim-fault", "malformed")])
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evs = events(&raw);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let bad = evs[..evs.len() - 1]
        .iter()
        .filter(|(_, d)| serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1, "exactly one invalid data line");

    let raw = post(&chat, &body, &[("x-sim-fault", "no-usage")])
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evs = events(&raw);
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    for (_, d) in &evs[..evs.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c["usage"].is_null());
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    let v: Value = post(
        &chat,
        &chat_body("gpt-4o", "hi"),
        &[("x-sim-fault", "no-usage")],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(v.get("usage").is_none());

    let raw = post(
        &format!("{base}/v1/messages"),
        &anthropic_body(true),
        &[("x-sim-fault", "no-usage")],
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let evs = events(&raw);
    let (_, delta) = evs
        .iter()
        .find(|(e, _)| e.as_deref() == Some("message_delta"))
        .unwrap();
    let delta: Value = serde_json::from_str(delta).unwrap();
    assert!(delta.get("usage").is_none());
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(evs.last().unwrap().0.as_deref(), Some("message_stop"));
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let base = start(SimConfig {
        api_key: Some("sk-sim".into()),
        ..fast()
    })
    .await;
    let chat = format!("{base}/v1/chat/completions");
    let body = chat_body("gpt-4o", "hi");
    let r = post(&chat, &body, &[]).await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let r = post(&chat, &body, &[("authorization", "Bearer wrong")])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let r = post(&chat, &body, &[("authorization", "Bearer sk-sim")])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let msgs = format!("{base}/v1/messages");
    let r = post(&msgs, &anthropic_body(false), &[("x-api-key", "nope")])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "authentication_error");
    let r = post(
        &msgs,
        &anthropic_body(false),
        &[("x-api-key", "sk-sim"), ("anthropic-version", "2023-06-01")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn pacing_follows_the_headers() {
    let base = start(SimConfig::default()).await;
    let chat = format!("{base}/v1/chat/completions");
    let mut body = chat_body("gpt-4o", "hi");
    body["stream"] = json!(true);
    let t = Instant::now();
    let mut r = post(
        &chat,
        &body,
        &[
            ("x-sim-ttft-ms", "300"),
            ("x-sim-tokens-per-sec", "100"),
            ("x-sim-output-tokens", "20"),
        ],
    )
    .await
    .unwrap();
    let mut first_content = None;
    let mut all = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        if first_content.is_none() && String::from_utf8_lossy(&c).contains("\"content\":\"") {
            // The role chunk carries "content":"" too; look for real content.
            if !String::from_utf8_lossy(&c).contains("\"content\":\"\"") {
                first_content = Some(t.elapsed());
            }
        }
        all.extend_from_slice(&c);
    }
    let total = t.elapsed();
    let first = first_content.unwrap();
    assert!(first >= Duration::from_millis(290), "{first:?}");
    assert!(total >= Duration::from_millis(300 + 150), "{total:?}");
    assert!(total < Duration::from_secs(3), "{total:?}");

    // Non-streaming answers wait for the whole generation.
    let t = Instant::now();
    let r = post(
        &chat,
        &chat_body("gpt-4o", "hi"),
        &[("x-sim-ttft-ms", "100"), ("x-sim-tokens-per-sec", "0")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(100) && e < Duration::from_secs(2),
        "{e:?}"
    );
}

#[tokio::test]
async fn router_alone_serves_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, ciyuan_sim::router(fast())).await });
    let v: Value = post(
        &format!("http://{addr}/v1/chat/completions"),
        &chat_body("gpt-4o", "hi"),
        &[],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "chat.completion");
    // The cut fault still cuts the body.
    let r = post(
        &format!("http://{addr}/v1/chat/completions"),
        &chat_body("gpt-4o", "hi"),
        &[("x-sim-fault", "cut")],
    )
    .await;
    // Headers and half a body, then a broken connection.
    if let Ok(resp) = r {
        assert!(resp.text().await.is_err());
    }
}

#[tokio::test]
async fn stats_count_the_requests_that_reached_the_model() {
    let base = start(fast()).await;
    let stats = || async {
        let v: Value = client()
            .get(format!("{base}/sim/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["requests"].as_u64().unwrap()
    };
    assert_eq!(stats().await, 0);
    for _ in 0..3 {
        let r = post(
            &format!("{base}/v1/chat/completions"),
            &chat_body("gpt-4o", "hi"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(stats().await, 3);
}
