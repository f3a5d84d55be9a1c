//! The gateway end to end: the real binary between clients (the official OpenAI and
//! Anthropic Python SDKs, and raw sockets for failures) and `ciyuan sim` in its own
//! process, with the ledger checked after every call.

use crate::budgets::used_in_ledger;
use crate::common::{Server, bin, http, json};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `ciyuan sim` in its own process.
pub struct Sim {
    child: Child,
    pub url: String,
}

impl Sim {
    fn start() -> Sim {
        let mut child = Command::new(bin())
            .args([
                "sim",
                "--listen",
                "127.0.0.1:0",
                "--ttft-ms",
                "5",
                "--tokens-per-sec",
                "0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ciyuan sim");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = loop {
            let line = lines.next().expect("sim exited").expect("read");
            if let Some(u) = line.strip_prefix("listening on ") {
                break u.to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Sim { child, url }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// That entry `e` splits a client's OpenAI totals (input including `cached`, output
/// including `reasoning`) into the ledger's keys: cached input and reasoning under
/// their own, the rest under `text.input` and `text.output`.
pub fn assert_totals_split(
    scenario: &str,
    e: &Value,
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
) {
    let n = |k: &str| e["tokens"][k].as_u64().unwrap_or(0);
    assert_eq!(n("text.cached_input"), cached, "{scenario}: {e}");
    assert_eq!(n("text.input") + cached, input, "{scenario}: {e}");
    assert_eq!(n("text.reasoning"), reasoning, "{scenario}: {e}");
    assert_eq!(n("text.output") + reasoning, output, "{scenario}: {e}");
}

/// A gateway in front of a sim, an account `acme/app` and a gateway key for it.
pub struct Gateway {
    pub sim: Sim,
    pub server: Server,
    pub admin: String,
    pub key: String,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

fn gateway() -> Gateway {
    gateway_with("", &[])
}

/// A gateway with `extra` appended to its configuration and `env` in its environment.
pub fn gateway_with(extra: &str, env: &[(&str, &str)]) -> Gateway {
    gateway_with_top("", extra, env)
}

/// [`gateway_with`], with `top` at the top of the configuration (top-level settings).
pub fn gateway_with_top(top: &str, extra: &str, env: &[(&str, &str)]) -> Gateway {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ciyuan.toml");
    std::fs::write(
        &config,
        format!(
            r#"
{top}
[gateway]
recount_tolerance_percent = 0
recount_tolerance_tokens = 0

# Ciyuan recounts this model with another family's tokenizer than the provider uses,
# so its counts disagree: a discrepancy to flag.
[[tokenizers]]
model = "gpt-4-skewed"
encoding = "qwen"

[[providers]]
name = "sim-openai"
protocol = "openai"
base_url = "{sim}/v1"
models = ["gpt-*", "text-embedding-*", "glm-*"]
forward_headers = ["x-sim-*"]
timeout_secs = 2
idle_timeout_secs = 1

[[providers]]
name = "sim-anthropic"
protocol = "anthropic"
base_url = "{sim}"
models = ["claude-*"]
forward_headers = ["x-sim-*"]
timeout_secs = 2
idle_timeout_secs = 1
{extra}
"#,
            sim = sim.url
        ),
    )
    .unwrap();
    let server = Server::spawn(serve_command(dir.path(), env));
    let admin = server.bootstrap.clone().unwrap();
    let (s, _) = server.http(
        "POST",
        "/api/v1/accounts",
        &admin,
        Some(&json!({"path": "acme/app"})),
    );
    assert_eq!(s, 201);
    let (s, b) = server.http(
        "POST",
        "/api/v1/keys",
        &admin,
        Some(&json!({"account": "acme/app", "scopes": ["gateway"]})),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let key = json(&b)["key"].as_str().unwrap().to_string();
    Gateway {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        sim,
        server,
        admin,
        key,
        _dir: dir,
    }
}

/// `ciyuan --config DIR/ciyuan.toml serve` on `DIR/data`.
fn serve_command(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(dir.join("ciyuan.toml"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .envs(env.iter().copied());
    cmd
}

impl Gateway {
    /// Kills the server (SIGKILL: whatever was in flight dies with it) and starts it
    /// again on the same data directory and configuration.
    pub fn restart_hard(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.server = Server::spawn(serve_command(self._dir.path(), &env));
    }

    /// A new key with `scopes` on `account` (created if missing).
    pub fn key_for(&self, account: &str, scopes: &[&str]) -> String {
        let (s, _) = self.server.http(
            "POST",
            "/api/v1/accounts",
            &self.admin,
            Some(&json!({"path": account})),
        );
        assert!(s == 201 || s == 409, "creating {account}: {s}");
        let (s, b) = self.server.http(
            "POST",
            "/api/v1/keys",
            &self.admin,
            Some(&json!({"account": account, "scopes": scopes})),
        );
        assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
        json(&b)["key"].as_str().unwrap().to_string()
    }

    /// The usage entry recorded for a gateway request id, waiting for it to appear.
    pub fn entry(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, body) =
                self.server
                    .http("GET", "/api/v1/audit/entries?start=0", &self.admin, None);
            assert_eq!(s, 200);
            for line in String::from_utf8_lossy(&body).lines() {
                let e: Value = serde_json::from_str(line).unwrap();
                if e["data"]["event_id"] == request_id {
                    assert_eq!(e["data"]["source"], "gateway");
                    assert!(e["account"].as_str().unwrap().starts_with("acme/"), "{e}");
                    return e["data"].clone();
                }
            }
            assert!(Instant::now() < deadline, "no entry for {request_id}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn official_sdks_through_the_gateway_and_usage_in_the_ledger() {
    let python = crate::common::venv_python("sdk-venv", "tests/sdk/requirements.txt");
    let gw = gateway();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/sdk_check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&gw.server.url)
        .arg(&gw.key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["scenario"], "done");
    let mut checked = 0;
    for l in &lines {
        let scenario = l["scenario"].as_str().unwrap();
        let Some(id) = l["request_id"].as_str() else {
            continue;
        };
        let e = gw.entry(id);
        let tokens = &e["tokens"];
        let u = &l["usage"];
        assert_eq!(e["quality"]["status"], 200, "{scenario}: {e}");
        assert!(e["partial"].is_null(), "{scenario}: {e}");
        assert!(
            e["recount"]["flagged"].is_null(),
            "{scenario}: recount disagrees: {e}"
        );
        match scenario {
            "openai.chat" | "openai.chat.stream_usage" | "openai.completions" => {
                assert_eq!(tokens["text.input"], u["prompt_tokens"], "{scenario}: {e}");
                assert_eq!(
                    tokens["text.output"], u["completion_tokens"],
                    "{scenario}: {e}"
                );
            }
            "openai.embeddings" => {
                assert_eq!(tokens, &json!({"text.input": u["prompt_tokens"]}), "{e}");
            }
            "openai.chat.stream" => {
                // The client saw no usage; the ledger has the provider's anyway, and it
                // equals Ciyuan's recount of the text the client received.
                assert_eq!(tokens["text.output"], e["recount"]["output"], "{e}");
                assert!(e["quality"]["ttft_us"].as_u64().unwrap() > 0);
                assert!(
                    e["quality"]["output_tokens_per_sec"].as_u64().unwrap() > 0,
                    "{e}"
                );
                assert_eq!(e["quality"]["stream"], true);
            }
            "openai.responses" | "openai.responses.stream" => {
                // Cached input and reasoning are split out of the two figures, into the
                // keys chat uses.
                let cached = u["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
                let reasoning = u["output_tokens_details"]["reasoning_tokens"]
                    .as_u64()
                    .unwrap();
                assert_totals_split(
                    scenario,
                    &e,
                    u["input_tokens"].as_u64().unwrap(),
                    u["output_tokens"].as_u64().unwrap(),
                    cached,
                    reasoning,
                );
                assert_eq!(e["definition"], "gateway.openai@1");
                assert_eq!(e["service"], "llm.chat");
                if scenario == "openai.responses.stream" {
                    assert!(reasoning > 0, "{e}");
                    assert_eq!(e["quality"]["stream"], true);
                    // What the client read is what Ciyuan recounted.
                    assert_eq!(tokens["text.output"], e["recount"]["output"], "{e}");
                }
            }
            "anthropic.messages" | "anthropic.messages.stream" => {
                assert_eq!(tokens["text.input"], u["input_tokens"], "{scenario}: {e}");
                assert_eq!(tokens["text.output"], u["output_tokens"], "{scenario}: {e}");
                assert_eq!(e["definition"], "gateway.anthropic@1");
            }
            other => panic!("unexpected scenario {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 9);
    // The token count is the provider's count of the same prompt `anthropic.messages`
    // sent, and no entry was recorded for it (the ledger holds exactly the metered calls).
    let counted = lines
        .iter()
        .find(|l| l["scenario"] == "anthropic.count_tokens")
        .unwrap();
    let sent = lines
        .iter()
        .find(|l| l["scenario"] == "anthropic.messages")
        .unwrap();
    assert_eq!(counted["input_tokens"], sent["usage"]["input_tokens"]);
    let errors: Vec<&str> = lines
        .iter()
        .filter(|l| l["scenario"] == "error")
        .map(|l| l["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        errors,
        [
            "AuthenticationError",
            "AuthenticationError",
            "RateLimitError",
            "InternalServerError",
            "RateLimitError",
            "InternalServerError",
            "NotFoundError",
            "NotFoundError",
            "BadRequestError",
            "BadRequestError",
            "NotFoundError",
            "NotFoundError",
            "NotFoundError",
            "NotFoundError",
            "NotFoundError"
        ]
    );
    // Usage queries see the gateway's entries; metrics count them.
    let (_, u) = gw.server.http(
        "GET",
        "/api/v1/usage?account=acme&group_by=model",
        &gw.admin,
        None,
    );
    let rows = json(&u)["rows"].as_array().unwrap().clone();
    assert!(
        rows.iter().any(|r| r["model"] == "claude-sonnet-4-5"),
        "{rows:?}"
    );
    let (s, m) = gw.server.http("GET", "/metrics", &gw.admin, None);
    assert_eq!(s, 200);
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("ciyuan_gateway_requests_total{upstream=\"sim-openai\",model=\"gpt-4o\",status=\"429\"} 1"),
        "{m}"
    );
}

/// A raw HTTP exchange that can stop reading (and hang up) after `keep` body bytes.
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// The response ended properly (chunked terminator).
    pub complete: bool,
}

pub fn raw(
    url: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &Value,
    keep: Option<usize>,
) -> Raw {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = body.to_string();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head_end = None;
    loop {
        let n: usize = s.read(&mut chunk).unwrap_or_default();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if head_end.is_none() {
            head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let (Some(h), Some(k)) = (head_end, keep)
            && buf.len() - h >= k
        {
            // Hang up mid-answer.
            drop(s);
            break;
        }
    }
    let h = head_end.expect("response headers");
    let head = String::from_utf8_lossy(&buf[..h]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let raw_body = &buf[h..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let complete = !chunked || raw_body.ends_with(b"0\r\n\r\n");
    Raw {
        status,
        head,
        body: String::from_utf8_lossy(raw_body).to_string(),
        complete,
    }
}

pub fn request_id(r: &Raw) -> String {
    r.head
        .lines()
        .find_map(|l| l.strip_prefix("x-ciyuan-request-id: "))
        .unwrap_or_else(|| panic!("no request id in {}", r.head))
        .trim()
        .to_string()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o", "stream": stream, "max_tokens": 200,
           "messages": [{"role": "user", "content": "Tell me about the ledger."}]})
}

#[test]
fn failures_are_metered_and_answered_in_the_providers_shape() {
    let gw = gateway();
    let url = gw.server.url.clone();
    let key = gw.key.clone();

    // The client hangs up mid-stream: what it was sent is metered, marked partial.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[
            ("x-sim-tokens-per-sec", "40"),
            ("x-sim-output-tokens", "200"),
        ],
        &chat(true),
        Some(600),
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["partial"], true, "{e}");
    assert_eq!(e["quality"]["failure"], "client_disconnected", "{e}");
    let out = e["tokens"]["text.output"].as_u64().unwrap();
    assert!(out > 0 && out < 200, "recounted delivered output: {e}");
    assert_eq!(e["tokens"]["text.input"], e["recount"]["input"]);

    // The provider cuts the stream: the client sees a broken stream, the ledger the
    // recounted delivered tokens.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-sim-fault", "cut")],
        &chat(true),
        None,
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete, "the client must see the stream break");
    let e = gw.entry(&request_id(&r));
    assert_eq!(
        (e["partial"].clone(), e["quality"]["failure"].clone()),
        (json!(true), json!("upstream_cut")),
        "{e}"
    );
    assert_eq!(e["tokens"]["text.output"], e["recount"]["output"], "{e}");

    // A stream that never reports usage: recounted, partial.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-sim-fault", "no-usage")],
        &chat(true),
        None,
    );
    assert!(r.complete && r.body.contains("[DONE]"), "{}", r.body);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["failure"], "no_usage", "{e}");
    assert_eq!(e["partial"], true);
    assert!(e["tokens"]["text.output"].as_u64().unwrap() > 0);
    assert_eq!(e["tokens"]["text.input"], e["recount"]["input"]);

    // The provider goes silent mid-stream: cut after the idle timeout (1 s here).
    let started = Instant::now();
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-sim-fault", "timeout")],
        &chat(true),
        None,
    );
    assert!(!r.complete);
    assert!(started.elapsed() < Duration::from_secs(10));
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["failure"], "upstream_timeout", "{e}");
    assert_eq!(e["partial"], true);

    // No answer at all within the provider's timeout (2 s here): 504 in OpenAI's shape.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-sim-fault", "timeout")],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 504, "{}", r.body);
    let b: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{b}"
    );
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["status"], 504);
    assert_eq!(e["quality"]["failure"], "upstream_timeout");
    assert!(
        e["tokens"].as_object().unwrap().is_empty(),
        "nothing consumed: {e}"
    );

    // Provider errors pass through in the provider's own shape, with retry-after.
    for (fault, status) in [("500", 500), ("429", 429)] {
        let r = raw(
            &url,
            "/v1/chat/completions",
            &key,
            &[("x-sim-fault", fault)],
            &chat(false),
            None,
        );
        assert_eq!(r.status, status);
        let b: Value = serde_json::from_str(&r.body).unwrap();
        assert!(b["error"]["message"].is_string(), "{b}");
        if status == 429 {
            assert!(
                r.head.to_ascii_lowercase().contains("retry-after: 1"),
                "{}",
                r.head
            );
        }
        let e = gw.entry(&request_id(&r));
        assert_eq!(e["quality"]["status"], status);
        assert_eq!(e["quality"]["failure"], "upstream_error");
    }
    let r = raw(
        &url,
        "/v1/messages",
        &key,
        &[("x-sim-fault", "429")],
        &json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        None,
    );
    let b: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (r.status, b["type"].as_str(), b["error"]["type"].as_str()),
        (429, Some("error"), Some("rate_limit_error"))
    );

    // Malformed JSON from the provider: a 502 in OpenAI's shape; no usable answer, so
    // nothing is charged (the failure is recorded, the reservation released).
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[("x-sim-fault", "malformed")],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 502);
    let b: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{b}"
    );
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["failure"], "upstream_malformed");
    assert_eq!(e["quality"]["status"], 502);
    assert!(
        e["tokens"].as_object().unwrap().is_empty(),
        "regression_malformed_upstream_answer_charges_nothing: {e}"
    );
    assert!(e["partial"].is_null(), "{e}");

    // Anthropic stream cut mid-way.
    let r = raw(
        &url,
        "/v1/messages",
        &key,
        &[("x-sim-fault", "cut")],
        &json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "Tell me a story."}]}),
        None,
    );
    assert_eq!(r.status, 200);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["failure"], "upstream_cut", "{e}");
    assert_eq!(e["partial"], true);

    // A recount that disagrees with the provider is flagged and listed.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &key,
        &[],
        &json!({"model": "gpt-4-skewed", "max_tokens": 30, "messages": [{"role": "user", "content": "词元是人工智能服务最小的计量单位，可以定价和交易。"}]}),
        None,
    );
    assert_eq!(r.status, 200);
    let id = request_id(&r);
    let e = gw.entry(&id);
    assert_eq!(e["recount"]["flagged"], true, "{e}");
    assert_eq!(e["recount"]["encoding"], "qwen");
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (s, b) = gw
            .server
            .http("GET", "/api/v1/discrepancies?account=acme", &gw.admin, None);
        assert_eq!(s, 200);
        let rows = json(&b)["rows"].as_array().unwrap().clone();
        if !rows.is_empty() || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["model"], "gpt-4-skewed");
    assert_eq!(listed[0]["recount"]["encoding"], "qwen");
    assert_ne!(
        listed[0]["tokens"]["text.input"],
        listed[0]["recount"]["input"]
    );

    // Ciyuan's own errors use the provider's shape too.
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&json!({"model": "gpt-4o"})),
    );
    assert_eq!(s, 400);
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages: required")
    );
    let (s, b) = http(
        &url,
        "POST",
        "/v1/messages",
        &gw.admin.replace(|c: char| c.is_ascii_digit(), "0"),
        Some(&json!({})),
    );
    assert_eq!(s, 401);
    assert_eq!(json(&b)["error"]["type"], "authentication_error");
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&json!({"model": "claude-sonnet-4-5", "messages": []})),
    );
    assert_eq!(s, 400, "a model served over the other protocol");
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/messages")
    );
    // A key without the gateway scope, and a root key (usage needs an account).
    let (_, b) = gw.server.http(
        "POST",
        "/api/v1/keys",
        &gw.admin,
        Some(&json!({"account": "acme/app", "scopes": ["read"]})),
    );
    let reader = json(&b)["key"].as_str().unwrap().to_string();
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &reader,
        Some(&chat(false)),
    );
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gateway scope")
    );
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &gw.admin,
        Some(&chat(false)),
    );
    assert_eq!(s, 403);
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("root account")
    );
}

#[test]
fn serve_demo_meters_calls_through_the_simulated_provider() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(bin());
    demo.args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path());
    let mut child = crate::common::with_backend(demo)
        .env("CIYUAN_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines {
        let line = line.unwrap();
        let done = line.starts_with("demo: try it");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("simulated provider"), "{text}");
    for model in ["gpt-4o", "qwen-max", "claude-sonnet-4-5"] {
        assert!(
            seen.iter()
                .any(|l| l.trim_start().starts_with(model) && l.contains("\"text.output\":")),
            "no ledger row for {model}:\n{text}"
        );
        assert!(
            seen.iter()
                .any(|l| l.contains(model) && l.contains("-> 200 OK")),
            "{text}"
        );
    }
}

#[test]
fn request_heads_over_8_kib_are_refused_with_431_and_serving_goes_on() {
    let g = gateway();
    let big = "x".repeat(9000);
    let r = raw(
        &g.server.url,
        "/v1/chat/completions",
        &g.key,
        &[("x-padding", &big)],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 431, "{}", r.head);
    // A head just under the limit, and then the usual, still go through.
    let fits = "x".repeat(7000);
    let r = raw(
        &g.server.url,
        "/v1/chat/completions",
        &g.key,
        &[("x-padding", &fits)],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw(
        &g.server.url,
        "/v1/chat/completions",
        &g.key,
        &[],
        &chat(true),
        None,
    );
    assert!(r.status == 200 && r.complete, "{} {}", r.head, r.body);
}

#[test]
fn regression_stream_cut_at_90_percent_is_metered_by_estimate_not_zero() {
    // Models Ciyuan has no tokenizer for, over both protocols: cut by the provider and
    // by the client after about 90% of a 300-token answer.
    let gw = gateway();
    let (s, b) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &gw.admin,
        Some(&json!({"tokens": 1_000_000, "period": "month", "mode": "hard"})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let chat = json!({"model": "glm-4.5", "stream": true, "max_tokens": 400,
        "messages": [{"role": "user", "content": "Tell me about the ledger."}]});
    let messages = json!({"model": "claude-sonnet-4-5", "stream": true, "max_tokens": 400,
        "messages": [{"role": "user", "content": "Tell me about the ledger."}]});
    let mut metered = 0;
    for (path, body) in [("/v1/chat/completions", &chat), ("/v1/messages", &messages)] {
        // Whole, for the size of the answer.
        let whole = raw(
            &gw.server.url,
            path,
            &gw.key,
            &[("x-sim-output-tokens", "300")],
            body,
            None,
        );
        assert!(whole.complete, "{}", whole.body);
        let e = gw.entry(&request_id(&whole));
        let full = e["tokens"]["text.output"].as_u64().unwrap();
        assert_eq!(full, 300, "{e}");
        // Cut by the provider.
        let cut = raw(
            &gw.server.url,
            path,
            &gw.key,
            &[("x-sim-output-tokens", "300"), ("x-sim-cut-at", "90")],
            body,
            None,
        );
        assert_eq!(cut.status, 200);
        assert!(!cut.complete, "the client sees the stream break");
        let by_provider = gw.entry(&request_id(&cut));
        // Cut by the client, after about 90% of the bytes.
        let hung_up = raw(
            &gw.server.url,
            path,
            &gw.key,
            &[
                ("x-sim-output-tokens", "300"),
                ("x-sim-tokens-per-sec", "300"),
            ],
            body,
            Some(whole.body.len() * 9 / 10),
        );
        let by_client = gw.entry(&request_id(&hung_up));
        for (e, failure) in [
            (&by_provider, "upstream_cut"),
            (&by_client, "client_disconnected"),
        ] {
            assert_eq!(e["partial"], true, "{path}: {e}");
            assert_eq!(e["quality"]["failure"], failure, "{path}: {e}");
            assert_eq!(e["quality"]["estimated"], true, "{path}: {e}");
            assert_eq!(e["recount"]["encoding"], "o200k_base", "{path}: {e}");
            let out = e["tokens"]["text.output"].as_u64().unwrap_or(0);
            assert!(
                out >= full * 7 / 10 && out <= full,
                "{path} {failure}: about 90% of {full} output tokens metered, not {out}: {e}"
            );
            assert!(e["tokens"]["text.input"].as_u64().unwrap() > 0, "{e}");
            metered += e["tokens"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_i64().unwrap())
                .sum::<i64>();
        }
    }
    // Budgets settled to what the ledger holds (estimates included), nothing reserved.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = gw
            .server
            .http("GET", "/api/v1/budgets/acme/app", &gw.admin, None);
        let view = json(&b);
        let used = view["limits"][0]["used"].as_i64().unwrap();
        let ledger = used_in_ledger(&gw, "acme/app");
        if (used == ledger && view["limits"][0]["reserved"].as_i64() == Some(0))
            || Instant::now() > deadline
        {
            assert_eq!(used, ledger, "{view}");
            assert!(ledger >= metered, "{ledger} < {metered}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `head` (and then `body` one byte every `gap`, if given) on a new connection;
/// the whole answer as text, and how long it took.
fn exchange(url: &str, head: &str, body: Option<(&[u8], Duration)>) -> (String, Duration) {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    if let Some((bytes, gap)) = body {
        s.set_nonblocking(true).unwrap();
        let mut answer = Vec::new();
        for b in bytes {
            std::thread::sleep(gap);
            if s.write_all(&[*b]).is_err() {
                break;
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = s.read(&mut buf)
                && n > 0
            {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
        }
        s.set_nonblocking(false).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        answer.extend_from_slice(&rest);
        return (
            String::from_utf8_lossy(&answer).to_string(),
            started.elapsed(),
        );
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the answer is whole: the server may keep the connection open.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some((h, b)) = text.split_once("\r\n\r\n")
            && let Some(len) = h.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            && b.len() >= len.trim().parse::<usize>().unwrap()
        {
            break;
        }
    }
    (
        String::from_utf8_lossy(&answer).to_string(),
        started.elapsed(),
    )
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn body_of(answer: &str) -> Value {
    let (_, b) = answer.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn regression_bodies_are_read_after_the_key_and_within_a_deadline() {
    let gw = gateway_with_top("body_timeout_secs = 2", "", &[]);
    let url = gw.server.url.clone();
    let bad = format!("cy_{}_{}", "0".repeat(12), "0".repeat(64));
    // A 30 MiB body announced with a wrong key, and never sent: answered 401 at once,
    // on the gateway and on the ingest and admin routes alike.
    for (path, shape) in [
        ("/v1/chat/completions", "openai"),
        ("/v1/messages", "anthropic"),
        ("/v1/events", "problem"),
        ("/api/v1/accounts", "problem"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bad}\r\nContent-Type: application/json\r\nContent-Length: 31457280\r\n\r\n"
        );
        let (answer, took) = exchange(&url, &head, None);
        assert_eq!(status_of(&answer), 401, "{path}: {answer}");
        assert!(took < Duration::from_secs(2), "{path}: {took:?}");
        let b = body_of(&answer);
        match shape {
            "openai" => assert_eq!(b["error"]["code"], "invalid_api_key", "{b}"),
            "anthropic" => assert_eq!(b["error"]["type"], "authentication_error", "{b}"),
            _ => assert_eq!(b["status"], 401, "{b}"),
        }
    }
    // A body trickled one byte at a time with a valid key: cut after the deadline (2 s
    // here), answered 408 in the client's shape.
    let trickle = vec![b' '; 64];
    for (path, key, shape) in [
        ("/v1/chat/completions", gw.key.clone(), "openai"),
        ("/v1/messages", gw.key.clone(), "anthropic"),
        ("/v1/events", gw.admin.clone(), "problem"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
        );
        let (answer, took) = exchange(&url, &head, Some((&trickle, Duration::from_millis(400))));
        assert_eq!(status_of(&answer), 408, "{path}: {answer}");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(6),
            "{path}: {took:?}"
        );
        let b = body_of(&answer);
        match shape {
            "openai" => assert_eq!(b["error"]["type"], "invalid_request_error", "{b}"),
            "anthropic" => assert_eq!(b["error"]["type"], "timeout_error", "{b}"),
            _ => assert_eq!(b["type"], "urn:ciyuan:problem:request-timeout", "{b}"),
        }
    }
    // The server serves on.
    let r = raw(
        &url,
        "/v1/chat/completions",
        &gw.key,
        &[],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn regression_the_http_layers_own_answers_carry_problem_json() {
    let gw = gateway();
    let url = gw.server.url.clone();
    for (request, status) in [
        (
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
                "x".repeat(9000)
            ),
            431,
        ),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
                .to_string(),
            400,
        ),
        ("GARBAGE\r\n\r\n".to_string(), 400),
        (
            "GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n".to_string(),
            400,
        ),
    ] {
        let (answer, _) = exchange(&url, &request, None);
        assert_eq!(status_of(&answer), status, "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{answer}"
        );
        let b = body_of(&answer);
        assert_eq!(b["status"], status, "{b}");
        assert!(b["detail"].as_str().unwrap().len() > 10, "{b}");
    }
    // A keep-alive connection whose second request is malformed: the first answer is
    // the router's, the second hyper's, completed.
    let (answer, _) = exchange(
        &url,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        None,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let r = raw(
        &url,
        "/v1/chat/completions",
        &gw.key,
        &[],
        &chat(false),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn regression_metrics_need_a_root_read_key_and_bound_their_labels() {
    // A free port for the keyless metrics listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = gateway_with(
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\nmax_models = 2\n"),
        &[],
    );
    let url = gw.server.url.clone();
    let (s, _) = gw.server.http("GET", "/metrics", "", None);
    assert_eq!(s, 401, "no key");
    let reader = gw.key_for("acme/app", &["read"]);
    let (s, b) = gw.server.http("GET", "/metrics", &reader, None);
    assert_eq!(
        s,
        403,
        "a tenant's read key: {}",
        String::from_utf8_lossy(&b)
    );
    let (s, _) = gw.server.http("GET", "/metrics", &gw.key, None);
    assert_eq!(s, 403, "a gateway key");
    // Model names are bounded as ingest bounds them.
    let long = "gpt-".to_string() + &"x".repeat(253);
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &gw.key,
        Some(&json!({"model": long, "messages": [{"role": "user", "content": "hi"}]})),
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["error"]["param"], "model");
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("model:")
    );
    // So is the output a request may ask for (reserved against budgets as it is).
    let (s, b) = http(
        &url,
        "POST",
        "/v1/chat/completions",
        &gw.key,
        Some(
            &json!({"model": "gpt-4o", "max_tokens": 1u64 << 62, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["error"]["param"], "max_tokens");
    // Past two distinct models, further ones count as `other`.
    for m in [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-a",
        "gpt-b",
        "gpt-\"quoted\"\\name",
    ] {
        let (s, b) = http(
            &url,
            "POST",
            "/v1/chat/completions",
            &gw.key,
            Some(
                &json!({"model": m, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            ),
        );
        assert_eq!(s, 200, "{m}: {}", String::from_utf8_lossy(&b));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (s, m) = gw.server.http("GET", "/metrics", &gw.admin, None);
        assert_eq!(s, 200);
        let text = String::from_utf8_lossy(&m).to_string();
        if text.contains("model=\"other\",status=\"200\"} 3") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("ciyuan_gateway_requests_total{upstream=\"sim-openai\",model=\"other\",status=\"200\"} 3"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ciyuan_gateway_requests_total{"))
            .count(),
        3,
        "{text}"
    );
    // The separate listener serves them without a key.
    let (s, m) = http(
        &format!("http://127.0.0.1:{port}"),
        "GET",
        "/metrics",
        "",
        None,
    );
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&m).contains("ciyuan_gateway_requests_total"));
}

#[test]
fn regression_provider_account_headers_never_reach_tenants() {
    // The sim answers with the organisation, project, rate-limit and cookie headers the
    // real APIs send.
    let gw = gateway();
    let anthropic = json!({"model": "claude-sonnet-4-5", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]});
    let mut anthropic_stream = anthropic.clone();
    anthropic_stream["stream"] = json!(true);
    for (path, body, headers) in [
        ("/v1/chat/completions", chat(false), vec![]),
        ("/v1/chat/completions", chat(true), vec![]),
        (
            "/v1/chat/completions",
            chat(false),
            vec![("x-sim-fault", "429")],
        ),
        ("/v1/messages", anthropic.clone(), vec![]),
        ("/v1/messages", anthropic_stream, vec![]),
        ("/v1/messages", anthropic, vec![("x-sim-fault", "500")]),
    ] {
        let r = raw(&gw.server.url, path, &gw.key, &headers, &body, None);
        let head = r.head.to_ascii_lowercase();
        for name in [
            "openai-organization",
            "openai-project",
            "anthropic-organization-id",
            "x-ratelimit-",
            "set-cookie",
            "server: ciyuan-sim",
        ] {
            assert!(
                !head.contains(name),
                "{path} {headers:?}: {name} reached the tenant:\n{}",
                r.head
            );
        }
        assert!(head.contains("content-type: "), "{}", r.head);
        if r.status == 429 {
            assert!(head.contains("retry-after: 1"), "{}", r.head);
        }
    }
}

/// An endpoint the gateway lacks, under `/v1`, answers in the protocol's own error
/// shape (SDKs show problem+json as "(no body)"); a bad key says what OpenAI says, so
/// LiteLLM maps it to `AuthenticationError`; the admin API keeps problem+json.
#[test]
fn unknown_v1_routes_and_bad_keys_answer_in_the_protocols_shape() {
    let gw = gateway();
    let (s, b) = gw
        .server
        .http("POST", "/v1/assistants", &gw.key, Some(&json!({})));
    assert_eq!(s, 404);
    let e = json(&b);
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/assistants"),
        "{e}"
    );
    let r = raw(
        &gw.server.url,
        "/v1/messages/batches",
        &gw.key,
        &[("anthropic-version", "2023-06-01")],
        &json!({}),
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let e: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "not_found_error", "{e}");
    // A method the route does not take, in the same shape.
    let (s, b) = gw.server.http("GET", "/v1/chat/completions", &gw.key, None);
    assert_eq!(s, 405);
    assert_eq!(json(&b)["error"]["type"], "invalid_request_error");
    // Ciyuan's own APIs keep problem+json.
    let (s, b) = gw
        .server
        .http("GET", "/api/v1/nothing-here", &gw.admin, None);
    assert_eq!(s, 404);
    assert_eq!(json(&b)["status"], 404);
    // A key that is not one: OpenAI's wording.
    let (s, b) = gw.server.http(
        "POST",
        "/v1/chat/completions",
        "cy_000000000000_notakey",
        Some(&chat(false)),
    );
    assert_eq!(s, 401);
    let e = json(&b);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Incorrect API key provided"),
        "{e}"
    );
}

/// Gateway entries in the ledger.
fn gateway_entries(gw: &Gateway) -> usize {
    let (s, body) = gw
        .server
        .http("GET", "/api/v1/audit/entries?start=0", &gw.admin, None);
    assert_eq!(s, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["data"]["source"] == "gateway")
        .count()
}

#[test]
fn count_tokens_is_the_providers_answer_never_billed_nor_budgeted_and_obeys_access_rules() {
    let gw = gateway();
    let url = gw.server.url.clone();
    let version = [("anthropic-version", "2023-06-01")];
    let prompt = json!({"model": "claude-sonnet-4-5", "system": "You are terse.",
        "messages": [{"role": "user", "content": "How are tokens counted for 词元 billing?"}]});
    let count = |key: &str, body: &Value| {
        let r = raw(&url, "/v1/messages/count_tokens", key, &version, body, None);
        (r.status, serde_json::from_str::<Value>(&r.body).unwrap())
    };
    let (s, b) = count(&gw.key, &prompt);
    assert_eq!(s, 200, "{b}");
    let n = b["input_tokens"].as_u64().unwrap();
    assert!(n > 10, "{b}");
    // The same prompt sent: the provider bills what it counted.
    let mut sent = prompt.clone();
    sent["max_tokens"] = json!(5);
    let r = raw(&url, "/v1/messages", &gw.key, &version, &sent, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["tokens"]["text.input"], n, "{e}");
    // Only the message was recorded.
    assert_eq!(gateway_entries(&gw), 1);
    // A budget spent to the last token refuses messages, not counts.
    let (s, b) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &gw.admin,
        Some(&json!({"tokens": 1, "period": "month", "mode": "hard"})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let r = raw(&url, "/v1/messages", &gw.key, &version, &sent, None);
    assert_eq!(r.status, 429, "{}", r.body);
    std::thread::sleep(Duration::from_millis(100));
    let recorded = gateway_entries(&gw);
    assert_eq!(count(&gw.key, &prompt).0, 200);
    let sim_requests = || {
        let (s, b) = http(&gw.sim.url, "GET", "/sim/stats", "", None);
        assert_eq!(s, 200);
        json(&b)["requests"].as_u64().unwrap()
    };
    let reached = sim_requests();
    // A model the key may not use is refused in Anthropic's shape, before the provider.
    let (s, _) = gw.server.http(
        "PUT",
        "/api/v1/access/acme",
        &gw.admin,
        Some(&json!({"deny": ["claude-haiku*"]})),
    );
    assert_eq!(s, 200);
    let mut haiku = prompt.clone();
    haiku["model"] = json!("claude-haiku-4-5");
    let (s, b) = count(&gw.key, &haiku);
    assert_eq!(s, 403, "{b}");
    assert_eq!(b["type"], "error");
    assert_eq!(b["error"]["type"], "permission_error", "{b}");
    assert_eq!(sim_requests(), reached, "refused before the provider");
    // Keys: none valid, or one without the gateway scope.
    let (s, b) = count(&format!("cy_000000000000_{}", "0".repeat(64)), &prompt);
    assert_eq!(
        (s, &b["error"]["type"]),
        (401, &json!("authentication_error"))
    );
    let reader = gw.key_for("acme/app", &["read"]);
    assert_eq!(count(&reader, &prompt).0, 403);
    // Bad requests name the field; a model on the other protocol says where it is.
    let (s, b) = count(&gw.key, &json!({"messages": []}));
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("model:"),
        "{b}"
    );
    let (s, b) = count(&gw.key, &json!({"model": "gpt-4o", "messages": []}));
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("OpenAI"),
        "{b}"
    );
    // None of it was recorded.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(gateway_entries(&gw), recorded);
    // The two counts the provider answered are in /metrics, apart from requests.
    let (s, m) = gw.server.http("GET", "/metrics", &gw.admin, None);
    assert_eq!(s, 200);
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(
            "ciyuan_gateway_count_tokens_total{upstream=\"sim-anthropic\",status=\"200\"} 2\n"
        ),
        "{m}"
    );
}

#[test]
fn responses_streams_that_break_off_are_metered_as_chat_streams_are() {
    let gw = gateway();
    let url = gw.server.url.clone();
    let key = gw.key.clone();
    let ask = |stream: bool| {
        json!({"model": "gpt-4o", "stream": stream, "max_output_tokens": 200,
               "instructions": "Be thorough.", "input": "Tell me about the ledger."})
    };
    // A whole answer: the provider's count, recounted without a flag.
    let r = raw(&url, "/v1/responses", &key, &[], &ask(false), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(answer["object"], "response");
    let e = gw.entry(&request_id(&r));
    assert!(
        e["partial"].is_null() && e["recount"]["flagged"].is_null(),
        "{e}"
    );
    assert_eq!(
        e["tokens"]["text.input"], answer["usage"]["input_tokens"],
        "{e}"
    );
    assert_eq!(e["tokens"]["text.input"], e["recount"]["input"], "{e}");
    assert_eq!(
        e["tokens"]["text.output"], answer["usage"]["output_tokens"],
        "{e}"
    );
    // The client hangs up mid-stream: what it was sent is metered, marked partial.
    let r = raw(
        &url,
        "/v1/responses",
        &key,
        &[
            ("x-sim-tokens-per-sec", "40"),
            ("x-sim-output-tokens", "150"),
        ],
        &ask(true),
        Some(3000),
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete && r.body.contains("response.output_text.delta"));
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["partial"], true, "{e}");
    assert_eq!(e["quality"]["failure"], "client_disconnected", "{e}");
    let out = e["tokens"]["text.output"].as_u64().unwrap();
    assert!(out > 0 && out < 150, "recounted delivered output: {e}");
    assert_eq!(e["tokens"]["text.input"], e["recount"]["input"]);
    // The provider cuts the stream half way: the delivered text, recounted.
    let r = raw(
        &url,
        "/v1/responses",
        &key,
        &[("x-sim-cut-at", "50")],
        &ask(true),
        None,
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete, "the client must see the stream break");
    assert!(!r.body.contains("response.completed"));
    let e = gw.entry(&request_id(&r));
    assert_eq!(
        (e["partial"].clone(), e["quality"]["failure"].clone()),
        (json!(true), json!("upstream_cut")),
        "{e}"
    );
    assert!(e["tokens"]["text.output"].as_u64().unwrap() > 0, "{e}");
    assert_eq!(e["tokens"]["text.output"], e["recount"]["output"], "{e}");
    // A stream whose end carries no usage: recounted, partial.
    let r = raw(
        &url,
        "/v1/responses",
        &key,
        &[("x-sim-fault", "no-usage")],
        &ask(true),
        None,
    );
    assert!(
        r.complete && r.body.contains("response.completed"),
        "{}",
        r.body
    );
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["failure"], "no_usage", "{e}");
    assert_eq!(e["partial"], true);
    assert!(e["tokens"]["text.output"].as_u64().unwrap() > 0);
    // A clamping per-request limit lowers `max_output_tokens` on its way.
    let (s, b) = gw.server.http(
        "PUT",
        "/api/v1/budgets/acme/app",
        &gw.admin,
        Some(&json!({"name": "per-request", "tokens": 100, "period": "lifetime", "per": "request", "clamp": true})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let r = raw(&url, "/v1/responses", &key, &[], &ask(false), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: Value = serde_json::from_str(&r.body).unwrap();
    let cap = answer["max_output_tokens"].as_u64().unwrap();
    assert!(cap < 200, "the provider was asked for less: {answer}");
}

/// A response the provider keeps is retrieved, listed, cancelled and deleted through
/// the gateway by the account that made it (or an ancestor's key), from the provider
/// that made it, at once after it was made and after a restart; to anyone else it does
/// not exist. Nothing of it is billed.
#[test]
fn stored_responses_are_served_to_the_account_that_made_them() {
    let mut gw = gateway();
    let ask = |stream: bool| json!({"model": "gpt-4o", "stream": stream, "max_output_tokens": 50, "input": "Say hello."});
    let r = raw(
        &gw.server.url,
        "/v1/responses",
        &gw.key,
        &[],
        &ask(false),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let made: Value = serde_json::from_str(&r.body).unwrap();
    let id = made["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("resp_"), "{made}");
    // Retrieved at once, before its entry need be projected.
    let get = |gw: &Gateway, key: &str, path: &str| {
        let (s, b) = gw.server.http("GET", path, key, None);
        (
            s,
            serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
        )
    };
    let (s, b) = get(&gw, &gw.key, &format!("/v1/responses/{id}"));
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["id"].as_str(), &b["usage"]),
        (Some(id.as_str()), &made["usage"])
    );
    // Its entry names it.
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["quality"]["response_id"], id.as_str(), "{e}");
    let recorded = gateway_entries(&gw);
    // A streamed response too: its id comes in `response.created`.
    let r = raw(
        &gw.server.url,
        "/v1/responses",
        &gw.key,
        &[],
        &ask(true),
        None,
    );
    assert!(r.complete, "{}", r.body);
    let streamed = r
        .body
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    assert!(streamed.starts_with("resp_"), "{}", r.body);
    gw.entry(&request_id(&r));
    assert_eq!(
        get(&gw, &gw.key, &format!("/v1/responses/{streamed}")).0,
        200
    );
    let recorded = recorded + 1;
    // An ancestor's key sees it; a sibling's and an unknown id get OpenAI's 404; a key
    // without the gateway scope is refused.
    let parent = gw.key_for("acme", &["gateway"]);
    assert_eq!(get(&gw, &parent, &format!("/v1/responses/{id}")).0, 200);
    let sibling = gw.key_for("acme/other", &["gateway"]);
    for (key, path) in [
        (&sibling, format!("/v1/responses/{id}")),
        (&sibling, format!("/v1/responses/{id}/input_items")),
        (&gw.key, "/v1/responses/resp_never_made".to_string()),
        (&gw.key, "/v1/responses/..%2Fmodels".to_string()),
    ] {
        let (s, b) = get(&gw, key, &path);
        assert_eq!(s, 404, "{path}: {b}");
        assert_eq!(b["error"]["type"], "invalid_request_error", "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not found"),
            "{b}"
        );
    }
    let reader = gw.key_for("acme/app", &["read"]);
    assert_eq!(get(&gw, &reader, &format!("/v1/responses/{id}")).0, 403);
    // Its input items (the query passed on), and a cancel the provider refuses as the
    // API does for a response that is not in the background.
    let (s, b) = get(
        &gw,
        &gw.key,
        &format!("/v1/responses/{id}/input_items?limit=5"),
    );
    assert_eq!((s, &b["object"]), (200, &json!("list")), "{b}");
    let (s, b) = gw
        .server
        .http("POST", &format!("/v1/responses/{id}/cancel"), &gw.key, None);
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    // Counted on /metrics by upstream, call and status (refusals before a provider is
    // known are not).
    let (s, m) = gw.server.http("GET", "/metrics", &gw.admin, None);
    assert_eq!(s, 200);
    let m = String::from_utf8_lossy(&m);
    for (call, status, n) in [("get", 200, 3), ("input_items", 200, 1), ("cancel", 400, 1)] {
        let line = format!(
            "ciyuan_gateway_response_retrievals_total{{upstream=\"sim-openai\",call=\"{call}\",status=\"{status}\"}} {n}\n"
        );
        assert!(m.contains(&line), "{line} in {m}");
    }
    // After a restart the ledger's projection says who made it.
    gw.restart_hard();
    let (s, b) = get(&gw, &gw.key, &format!("/v1/responses/{id}"));
    assert_eq!(s, 200, "{b}");
    assert_eq!(get(&gw, &sibling, &format!("/v1/responses/{id}")).0, 404);
    // Deleted at the provider: gone there, so gone here.
    let (s, b) = gw
        .server
        .http("DELETE", &format!("/v1/responses/{id}"), &gw.key, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["deleted"], true);
    assert_eq!(get(&gw, &gw.key, &format!("/v1/responses/{id}")).0, 404);
    // None of the retrievals was recorded: only the two responses made.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gateway_entries(&gw), recorded);
}

#[test]
fn entries_record_key_session_tags_and_the_providers_provenance() {
    let gw = gateway();
    let (s, body) = gw
        .server
        .http("GET", "/api/v1/keys?account=acme/app", &gw.admin, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let key_id = json(&body)["keys"][0]["key_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a key id in {}", String::from_utf8_lossy(&body)))
        .to_string();
    assert_ne!(gw.key, key_id, "the id, never the secret");
    let tags = ("x-ciyuan-tags", "feature=search, team=hr");
    let with_meta = |stream: bool| {
        let mut b = chat(stream);
        b["metadata"] = json!({"experiment": "b7"});
        b["user"] = json!("alice");
        b
    };
    let want_tags = json!({"experiment": "b7", "feature": "search", "team": "hr"});
    // OpenAI chat, whole and streamed: the dated model the sim serves `gpt-4o` with,
    // its fingerprint, and the provider's request id (header) or the answer's id.
    for stream in [false, true] {
        let r = raw(
            &gw.server.url,
            "/v1/chat/completions",
            &gw.key,
            &[tags],
            &with_meta(stream),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let e = gw.entry(&request_id(&r));
        assert_eq!(e["key"], key_id.as_str(), "{e}");
        assert_eq!(e["session"], "alice", "{e}");
        assert_eq!(e["tags"], want_tags, "{e}");
        assert_eq!(e["model"], "gpt-4o", "the model asked for: {e}");
        let q = &e["quality"];
        assert_eq!(q["upstream"], "sim-openai");
        assert_eq!(q["served_model"], "gpt-4o-2024-08-06", "{e}");
        assert_eq!(q["system_fingerprint"], "fp_5im0c1yuan", "{e}");
        let provider_id = r
            .head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .map(str::trim);
        let id = q["provider_request_id"].as_str().unwrap();
        match provider_id {
            // The gateway passes the provider's header back: the same id.
            Some(h) => assert_eq!(id, h, "{e}"),
            None => assert!(id.starts_with("req_") || id.starts_with("chatcmpl-"), "{e}"),
        }
        if !stream {
            assert!(
                id.starts_with("req_"),
                "the header's id, not the answer's: {e}"
            );
        }
    }
    // Anthropic: the served model and the message's request id; no fingerprint.
    let r = raw(
        &gw.server.url,
        "/v1/messages",
        &gw.key,
        &[
            ("anthropic-version", "2023-06-01"),
            ("x-ciyuan-session", "s-9"),
        ],
        &json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": true,
                "messages": [{"role": "user", "content": "Hi"}]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["session"], "s-9", "{e}");
    assert!(e["tags"].is_null(), "no tags, none recorded: {e}");
    assert_eq!(
        e["quality"]["served_model"], "claude-sonnet-4-5-20250929",
        "{e}"
    );
    assert!(e["quality"]["system_fingerprint"].is_null(), "{e}");
    assert!(
        e["quality"]["provider_request_id"].as_str().is_some(),
        "{e}"
    );
    // The Responses API: its metadata is tags too.
    let r = raw(
        &gw.server.url,
        "/v1/responses",
        &gw.key,
        &[],
        &json!({"model": "gpt-4o", "input": "Hi", "metadata": {"feature": "chat"}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["tags"], json!({"feature": "chat"}), "{e}");
    assert_eq!(e["quality"]["served_model"], "gpt-4o-2024-08-06", "{e}");
    assert!(e["session"].is_null(), "{e}");
    // OpenAI's metadata may hold what tags may not (any key, values of up to 512
    // characters): such pairs go on to the provider unrecorded, named in the answer,
    // and the header's value of a key given in both is the one recorded.
    let mut body = chat(false);
    body["metadata"] = json!({"team": "ops", "userId": "u-1", "feature": "chat"});
    let r = raw(
        &gw.server.url,
        "/v1/chat/completions",
        &gw.key,
        &[("x-ciyuan-tags", "team=hr")],
        &body,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let e = gw.entry(&request_id(&r));
    assert_eq!(e["tags"], json!({"feature": "chat", "team": "hr"}), "{e}");
    let skipped = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("x-ciyuan-tags-skipped: "))
        .map(str::trim);
    assert_eq!(skipped, Some("team,userId"), "{}", r.head);
    // Tags the header cannot record whole are refused before the provider, by name,
    // in the protocol's error shape.
    let before = gateway_entries(&gw);
    for (headers, body, param, says) in [
        (
            vec![("x-ciyuan-tags", "Feature=x")],
            chat(false),
            "tags",
            "lowercase letters",
        ),
        (
            vec![],
            {
                let mut b = chat(false);
                b["metadata"] = json!({"n": 7});
                b
            },
            "metadata",
            "must be a string",
        ),
        (
            vec![(
                "x-ciyuan-tags",
                Box::leak(
                    (0..17)
                        .map(|i| format!("k{i}=v"))
                        .collect::<Vec<_>>()
                        .join(",")
                        .into_boxed_str(),
                ) as &str,
            )],
            chat(false),
            "tags",
            "at most 16",
        ),
    ] {
        let r = raw(
            &gw.server.url,
            "/v1/chat/completions",
            &gw.key,
            &headers,
            &body,
            None,
        );
        assert_eq!(r.status, 400, "{}", r.body);
        let err: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(says),
            "{err}"
        );
    }
    assert_eq!(
        gateway_entries(&gw),
        before,
        "refused before admission: no entry"
    );
}

#[test]
fn usage_by_tag_from_the_openai_sdks_metadata_and_header_with_cost() {
    let python = crate::common::venv_python("sdk-venv", "tests/sdk/requirements.txt");
    let gw = gateway();
    let book = gw._dir.path().join("book.toml");
    std::fs::write(
        &book,
        "name = \"list\"\ncurrency = \"USD\"\n[[rules]]\nmodel = \"gpt-4o*\"\n\
         unit_prices = { \"text.input\" = \"0.0000025\", \"text.output\" = \"0.00001\" }\n",
    )
    .unwrap();
    gw.server.import_toml_book(&gw.admin, &book);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/tags_check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&gw.server.url)
        .arg(&gw.key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["scenario"], "done");
    assert!(lines.iter().any(|l| l["type"] == "BadRequestError"));
    // Each call's tokens, by scenario, from its entry (waiting for each).
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for l in &lines {
        let Some(id) = l["request_id"].as_str() else {
            continue;
        };
        let e = gw.entry(id);
        let want = match l["scenario"].as_str().unwrap() {
            "chat.search" => json!({"experiment": "b7", "feature": "search", "team": "hr"}),
            "chat.chat" => json!({"feature": "chat", "team": "hr"}),
            "responses.search" => json!({"feature": "search", "team": "ops"}),
            _ => Value::Null,
        };
        assert_eq!(e["tags"], want, "{e}");
        let n: i64 = e["tokens"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum();
        *total.entry(l["scenario"].as_str().unwrap()).or_default() += n;
    }
    assert_eq!(total.len(), 4, "{total:?}");
    // An ingested event's tags: CloudEvents' extension attribute `ciyuantags`.
    let ingest = gw.key_for("acme/app", &["ingest"]);
    let event = |id: &str, tags: &str| {
        json!({"specversion": "1.0", "id": id, "source": "svc://tags", "type": "llm.usage",
               "subject": "acme/app", "ciyuantags": tags,
               "data": {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 1}})
    };
    let (s, b) = gw.server.http(
        "POST",
        "/v1/events",
        &ingest,
        Some(&event("e1", "feature=search, team=hr")),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let (s, b) = gw.server.http(
        "POST",
        "/v1/events",
        &ingest,
        Some(&event("e2", "Feature=search")),
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("ciyuantags"));
    let usage = |query: &str| {
        let (s, b) = gw.server.http(
            "GET",
            &format!("/api/v1/usage?account=acme&{query}"),
            &gw.admin,
            None,
        );
        assert_eq!(s, 200, "{query}: {}", String::from_utf8_lossy(&b));
        json(&b)
    };
    let rows_of = |v: &Value| -> BTreeMap<String, (i64, String)> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let name = r["tags"].to_string();
                let cost = r["cost"]["USD"].as_str().unwrap_or("0").to_string();
                (name, (r["total"].as_i64().unwrap(), cost))
            })
            .collect()
    };
    // Grouped by feature: search (chat and responses), chat, and the untagged rest.
    let by_feature = usage("group_by=tag:feature&with=cost");
    let rows = rows_of(&by_feature);
    assert_eq!(
        rows.keys().cloned().collect::<Vec<_>>(),
        [
            r#"{"feature":"chat"}"#,
            r#"{"feature":"search"}"#,
            r#"{"feature":null}"#
        ],
        "{by_feature}"
    );
    assert_eq!(
        rows[r#"{"feature":"search"}"#].0,
        total["chat.search"] + total["responses.search"] + 1001
    );
    assert_eq!(rows[r#"{"feature":"chat"}"#].0, total["chat.chat"]);
    assert_eq!(rows[r#"{"feature":null}"#].0, total["chat.untagged"]);
    // The groups add up to the whole, tokens and money.
    let whole = usage("with=cost");
    let sum: i64 = rows.values().map(|(n, _)| n).sum();
    assert_eq!(sum, whole["rows"][0]["total"].as_i64().unwrap());
    let money: rust_decimal::Decimal = rows
        .values()
        .map(|(_, c)| c.parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert!(money > rust_decimal::Decimal::ZERO);
    assert_eq!(
        money,
        whole["cost_totals"]["USD"]
            .as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap(),
        "{by_feature} against {whole}"
    );
    // Filtered: team hr by feature; then two filters together.
    let hr = rows_of(&usage("tag=team:hr&group_by=tag:feature,model"));
    assert_eq!(hr.len(), 2, "{hr:?}");
    assert_eq!(hr[r#"{"feature":"search"}"#].0, total["chat.search"] + 1001);
    let both = usage("tag=team:hr&tag=feature:search&with=cost");
    assert_eq!(both["tags"], json!(["feature:search", "team:hr"]));
    let rows = both["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{both}");
    assert_eq!(
        rows[0]["total"].as_i64().unwrap(),
        total["chat.search"] + 1001
    );
    assert!(rows[0]["tags"].is_null(), "not grouped by a tag: {both}");
    let nothing = usage("tag=team:finance");
    assert_eq!(nothing["rows"], json!([]), "{nothing}");
    // Bad questions name what is wrong.
    for (query, says) in [
        ("tag=feature", "KEY:VALUE"),
        ("tag=Feature:x", "lowercase"),
        ("group_by=tag:Feature", "lowercase"),
        ("tag=team:hr&tag=team:ops", "filtered twice"),
        ("group_by=tag:team&group_by=model", "given twice"),
    ] {
        let (s, b) = gw.server.http(
            "GET",
            &format!("/api/v1/usage?account=acme&{query}"),
            &gw.admin,
            None,
        );
        assert_eq!(s, 400, "{query}");
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains(says), "{query}: {text}");
    }
}

/// `ciyuan bench gateway --controls`, the hostile tenant of issue 18's measurements:
/// every control set from above on a four-level tree, a session and the most tags on
/// every request, prices and a wallet. The run must answer every request 200 (a
/// control refusing the benchmark's own requests would measure refusals), show every
/// limit counting it, and say which tenant its figures are.
#[test]
fn the_gateway_bench_measures_the_hostile_tenant_with_every_control_counting() {
    let prices = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/litellm_model_prices.json");
    let mut cmd = Command::new(bin());
    cmd.args([
        "bench",
        "gateway",
        "--controls",
        "--seconds",
        "1",
        "--rate",
        "50",
    ])
    .args(["--concurrency", "4", "--streams", "4", "--json", "--prices"])
    .arg(&prices)
    .env_remove("CIYUAN_DATABASE");
    let out = cmd.output().expect("ciyuan bench gateway runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tenant: hostile (--controls)"), "{stdout}");
    assert!(
        stdout
            .contains("controls: 7 limits on bench/bu/team/app and its ancestors counted the run"),
        "{stdout}"
    );
    let figures = json(stdout.lines().last().expect("a JSON line").as_bytes());
    assert_eq!(figures["controls"], true, "{figures}");
    assert_eq!(figures["prices"], true, "{figures}");
    assert_eq!(figures["failed"], false, "{figures}");
    assert!(figures["responses"].as_u64().unwrap() > 50, "{figures}");
}

/// `ciyuan bench gateway --setup URL --controls` prepares the hostile tenant on a
/// gateway the bench does not start (`bench/nginx/instructions.sh --controls` runs one
/// under callgrind): the tree, every limit and the model rules in force, and a key
/// and headers that the gateway takes.
#[test]
fn the_gateway_bench_prepares_the_hostile_tenant_on_a_running_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let server = crate::common::Server::start(&tmp.path().join("data"));
    let admin = server.bootstrap.clone().expect("a bootstrap admin key");
    let out = Command::new(bin())
        .args(["bench", "gateway", "--controls", "--setup", &server.url])
        .env("CIYUAN_KEY", &admin)
        .output()
        .expect("ciyuan bench gateway --setup runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant = json(stdout.trim().as_bytes());
    let key = tenant["key"].as_str().expect("a key");
    assert!(key.starts_with("cy_"), "{tenant}");
    assert_eq!(tenant["headers"]["x-ciyuan-session"], "bench-session-0001");
    let tags = tenant["headers"]["x-ciyuan-tags"].as_str().expect("tags");
    assert_eq!(tags.split(',').count(), 16, "{tags}");
    let (status, body) = http(
        &server.url,
        "GET",
        "/api/v1/budgets/bench/bu/team/app",
        &admin,
        None,
    );
    assert_eq!(status, 200);
    let view = json(&body);
    let names: Vec<&str> = view["limits"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    for name in [
        "tokens-month",
        "tokens-day",
        "rpm-per-key",
        "tokens-hour",
        "per-session",
        "per-request",
        "tokens-minute",
    ] {
        assert!(names.contains(&name), "{name} not in {view}");
    }
    assert_eq!(view["models"][0]["node"], "bench", "{view}");
    // Without the admin key it says what it needs.
    let out = Command::new(bin())
        .args(["bench", "gateway", "--setup", &server.url])
        .env_remove("CIYUAN_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CIYUAN_KEY"));
}
