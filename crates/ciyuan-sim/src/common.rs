//! What both protocols share: state, authentication, the steering headers, faults,
//! errors in each provider's shape, and answering with pacing and faults applied.

use crate::answer::{Hasher, Rng};
use crate::{MAX_BODY_BYTES, MAX_FORCED_OUTPUT_TOKENS, SimConfig};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ciyuan_measure::text::{Encoding, encoding_for_model};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The shared state.
#[derive(Debug)]
pub(crate) struct Sim {
    pub cfg: SimConfig,
    /// Requests seen, numbering them for ids and random faults.
    seq: AtomicU64,
    /// Responses kept to be retrieved (`store` not false), newest last.
    pub(crate) stored: std::sync::Mutex<Stored>,
}

/// The Responses API's kept answers, by id: at most [`STORED_MAX`], the oldest
/// forgotten first (a simulator's memory stays bounded under a benchmark).
#[derive(Debug, Default)]
pub(crate) struct Stored {
    by_id: std::collections::HashMap<String, Value>,
    order: std::collections::VecDeque<String>,
}

/// Most responses the simulator keeps.
const STORED_MAX: usize = 4096;

impl Stored {
    /// Keeps `response` under its `id`.
    pub(crate) fn keep(&mut self, id: String, response: Value) {
        if self.by_id.insert(id.clone(), response).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > STORED_MAX {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    /// The response kept under `id`.
    pub(crate) fn get(&self, id: &str) -> Option<&Value> {
        self.by_id.get(id)
    }

    /// Forgets the response kept under `id`; whether there was one.
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        let had = self.by_id.remove(id).is_some();
        if had {
            self.order.retain(|o| o != id);
        }
        had
    }
}

impl Sim {
    /// Requests seen so far (those that got as far as choosing their faults).
    pub(crate) fn requests(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    pub(crate) fn new(cfg: SimConfig) -> Sim {
        Sim {
            cfg,
            seq: AtomicU64::new(0),
            stored: std::sync::Mutex::new(Stored::default()),
        }
    }
}

/// Put in each request's extensions by [`crate::serve`]: notifying it drops the
/// connection without a response.
#[derive(Debug, Clone)]
pub(crate) struct ConnKill(pub Arc<tokio::sync::Notify>);

/// Whose wire format a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    OpenAi,
    Anthropic,
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Internal,
    RateLimited,
    Cut,
    Timeout,
    Malformed,
    NoUsage,
}

/// A failure answered in the provider's error shape.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    NoKey,
    BadKey,
    RateLimited,
    Internal(String),
    BadRequest(String, Option<&'static str>),
    TooLarge,
    NotFound(String),
}

impl Failure {
    pub(crate) fn respond(&self, proto: Proto) -> Response {
        let (status, oa_type, oa_code, an_type, msg, param): (
            StatusCode,
            &str,
            Option<&str>,
            &str,
            String,
            Option<&str>,
        ) = match self {
            Failure::NoKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                "authentication_error",
                match proto {
                    Proto::OpenAi => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
                    Proto::Anthropic => "x-api-key header is required".into(),
                },
                None,
            ),
            Failure::BadKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "authentication_error",
                match proto {
                    Proto::OpenAi => "Incorrect API key provided.".into(),
                    Proto::Anthropic => "invalid x-api-key".into(),
                },
                None,
            ),
            Failure::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
                "rate_limit_error",
                "Rate limit reached for requests (simulated). Please try again in 1s.".into(),
                None,
            ),
            Failure::Internal(m) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                "api_error",
                m.clone(),
                None,
            ),
            Failure::BadRequest(m, p) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "invalid_request_error",
                m.clone(),
                *p,
            ),
            Failure::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                "request_too_large",
                format!("Request exceeds the maximum size of {MAX_BODY_BYTES} bytes."),
                None,
            ),
            Failure::NotFound(m) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "not_found_error",
                m.clone(),
                None,
            ),
        };
        let body = match proto {
            Proto::OpenAi => json!({
                "error": {"message": msg, "type": oa_type, "param": param, "code": oa_code}
            }),
            Proto::Anthropic => json!({
                "type": "error",
                "error": {"type": an_type, "message": msg}
            }),
        };
        let mut resp = (status, json_body(body.to_string().into_bytes())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A JSON body with its content type.
pub(crate) fn json_body(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

/// Unknown paths and methods, in the shape of the provider the request looks like.
pub(crate) async fn not_found(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let proto =
        if uri.path().starts_with("/v1/messages") || headers.contains_key("anthropic-version") {
            Proto::Anthropic
        } else {
            Proto::OpenAi
        };
    let msg = match proto {
        Proto::OpenAi => format!("Invalid URL ({method} {})", uri.path()),
        Proto::Anthropic => "Not found".to_string(),
    };
    Failure::NotFound(msg).respond(proto)
}

/// One request's settings after authentication and the steering headers.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub fault: Option<Fault>,
    /// A random cut, applied only if the request streams.
    pub random_cut: bool,
    pub ttft: Duration,
    /// Time between output tokens; `None`: as fast as possible.
    pub interval: Option<Duration>,
    pub forced: Option<usize>,
    /// Where a cut stream stops, in percent of its pieces (`x-sim-cut-at`).
    pub cut_at_percent: Option<usize>,
    pub seq: u64,
    pub seed: u64,
    pub kill: Option<ConnKill>,
}

impl Ctx {
    /// The fault that applies to a streaming request.
    pub(crate) fn stream_fault(&self) -> Option<Fault> {
        self.fault.or(self.random_cut.then_some(Fault::Cut))
    }

    /// Whether usage is to be reported.
    pub(crate) fn usage(&self) -> bool {
        self.fault != Some(Fault::NoUsage)
    }

    /// Removes `usage` from a complete answer under the `no-usage` fault.
    pub(crate) fn strip_usage(&self, v: &mut Value) {
        if let (false, Some(o)) = (self.usage(), v.as_object_mut()) {
            o.remove("usage");
        }
    }

    /// The generation time of `tokens` output tokens after the first.
    pub(crate) fn generation_time(&self, tokens: usize) -> Duration {
        self.interval.map_or(Duration::ZERO, |i| {
            i.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX))
        })
    }

    /// An id: `prefix` and 24 characters from the seed and the request's number.
    pub(crate) fn id(&self, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut rng = Rng::new(self.seed ^ self.seq.wrapping_mul(0xA24B_AED4_963E_E407));
        let mut id = String::with_capacity(prefix.len() + 24);
        id.push_str(prefix);
        for _ in 0..24 {
            id.push(ALPHABET[rng.below(ALPHABET.len())] as char);
        }
        id
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn bad_header(name: &str, value: &str) -> Failure {
    Failure::BadRequest(format!("invalid {name} header: {value:?}"), None)
}

/// Checks the key when one is configured: `Authorization: Bearer`, or `x-api-key` on
/// Anthropic's endpoint.
pub(crate) fn authorize(cfg: &SimConfig, proto: Proto, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(key) = &cfg.api_key else {
        return Ok(());
    };
    let bearer = header_str(headers, "authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let given = match proto {
        Proto::OpenAi => bearer,
        Proto::Anthropic => header_str(headers, "x-api-key").or(bearer),
    };
    match given {
        None => Err(Failure::NoKey),
        Some(g) if g != key => Err(Failure::BadKey),
        Some(_) => Ok(()),
    }
}

/// Authenticates, reads the steering headers, draws the random faults, answers error
/// faults, and reads and parses the body.
pub(crate) async fn begin(sim: &Sim, proto: Proto, req: Request) -> Result<(Ctx, Value), Response> {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    authorize(&sim.cfg, proto, headers).map_err(|f| f.respond(proto))?;
    let ctx = steer(sim, headers, parts.extensions.get::<ConnKill>().cloned())
        .map_err(|f| f.respond(proto))?;
    match ctx.fault {
        Some(Fault::Internal) => {
            return Err(Failure::Internal(
                "The server had an error while processing your request (simulated).".into(),
            )
            .respond(proto));
        }
        Some(Fault::RateLimited) => return Err(Failure::RateLimited.respond(proto)),
        _ => {}
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| Failure::TooLarge.respond(proto))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::BadRequest(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
        .respond(proto)
    })?;
    if !value.is_object() {
        return Err(
            Failure::BadRequest("The request body must be a JSON object.".into(), None)
                .respond(proto),
        );
    }
    Ok((ctx, value))
}

fn steer(sim: &Sim, headers: &HeaderMap, kill: Option<ConnKill>) -> Result<Ctx, Failure> {
    let cfg = &sim.cfg;
    let seq = sim.seq.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(cfg.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
    let (e, c, which) = (rng.unit(), rng.unit(), rng.next_u64());
    let rate = |r: f64| {
        if r.is_finite() {
            r.clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    let mut fault = (e < rate(cfg.error_rate)).then_some(if which & 1 == 0 {
        Fault::Internal
    } else {
        Fault::RateLimited
    });
    let mut random_cut = c < rate(cfg.cut_rate);
    if let Some(v) = header_str(headers, "x-sim-fault") {
        random_cut = false;
        fault = match v {
            "500" => Some(Fault::Internal),
            "429" => Some(Fault::RateLimited),
            "cut" => Some(Fault::Cut),
            "timeout" => Some(Fault::Timeout),
            "malformed" => Some(Fault::Malformed),
            "no-usage" => Some(Fault::NoUsage),
            "none" | "" => None,
            other => return Err(bad_header("x-sim-fault", other)),
        };
    }
    finish_steer(cfg, headers, fault, random_cut, seq, kill)
}

fn finish_steer(
    cfg: &SimConfig,
    headers: &HeaderMap,
    fault: Option<Fault>,
    random_cut: bool,
    seq: u64,
    kill: Option<ConnKill>,
) -> Result<Ctx, Failure> {
    let mut ttft = cfg.ttft;
    if let Some(v) = header_str(headers, "x-sim-ttft-ms") {
        ttft = Duration::from_millis(v.parse().map_err(|_| bad_header("x-sim-ttft-ms", v))?);
    }
    let mut tps = cfg.tokens_per_sec;
    if let Some(v) = header_str(headers, "x-sim-tokens-per-sec") {
        tps = v
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| bad_header("x-sim-tokens-per-sec", v))?;
    }
    let interval = (tps.is_finite() && tps > 0.0).then(|| Duration::from_secs_f64(1.0 / tps));
    let forced = match header_str(headers, "x-sim-output-tokens") {
        None => None,
        Some(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_FORCED_OUTPUT_TOKENS)
                .ok_or_else(|| bad_header("x-sim-output-tokens", v))?,
        ),
    };
    let cut_at_percent = match header_str(headers, "x-sim-cut-at") {
        None => None,
        Some(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| bad_header("x-sim-cut-at", v))?,
        ),
    };
    // A cut point asks for a cut.
    let fault = match (fault, cut_at_percent) {
        (None, Some(_)) => Some(Fault::Cut),
        (f, _) => f,
    };
    Ok(Ctx {
        fault,
        random_cut,
        cut_at_percent,
        ttft,
        interval,
        forced,
        seq,
        seed: cfg.seed,
        kill,
    })
}

/// The encoding of a model: its family's, or `o200k_base`.
pub(crate) fn encoding(model: &str) -> Encoding {
    encoding_for_model(model, &[]).unwrap_or(Encoding::O200kBase)
}

/// A stable hash of the parts of a request that decide its answer.
pub(crate) fn request_hash<'a>(seed: u64, parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = Hasher::new(seed);
    for p in parts {
        h.bytes(p.as_bytes());
    }
    h.finish()
}

/// Cached prompt tokens, deterministic per request: for prompts of 1024 tokens or
/// more, 0, ¼, ½ or ¾ of the prompt (by the request's hash), in 128-token steps as
/// OpenAI caches.
pub(crate) fn cached_tokens(prompt: usize, hash: u64) -> usize {
    if prompt < 1024 {
        return 0;
    }
    let quarters = (hash >> 7) as usize % 4;
    (prompt * quarters / 4) / 128 * 128
}

/// The time now in Unix seconds.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs CPU-heavy work (large prompts, long forced answers) off the async workers.
pub(crate) async fn compute<T: Send + 'static>(
    heavy: bool,
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    if !heavy {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Internal(format!("worker failed: {e}")))?
}

/// A tokenizer failure (a shipped vocabulary that did not load).
pub(crate) fn text_failure(e: ciyuan_measure::text::TextError) -> Failure {
    Failure::Internal(format!("tokenizer unavailable: {e}"))
}

/// Answers a complete (non-streaming) JSON body after the simulated latency, with the
/// request's fault applied.
pub(crate) async fn answer_json(ctx: &Ctx, body: Vec<u8>, output_tokens: usize) -> Response {
    let wait = ctx.ttft + ctx.generation_time(output_tokens.saturating_sub(1));
    // A zero sleep still waits for the timer's next 1 ms tick: skip it, so an
    // unpaced sim answers at once (the gateway benchmark's direct baseline).
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    match ctx.fault {
        Some(Fault::Timeout) => {
            tokio::time::sleep(crate::STALL_LIMIT).await;
            cut(ctx, body).await
        }
        Some(Fault::Cut) => cut(ctx, body).await,
        Some(Fault::Malformed) => {
            let mut b = body;
            b.truncate(b.len() / 2);
            b.extend_from_slice(b"<!-- upstream error -->");
            json_body(b)
        }
        _ => {
            let mut resp = json_body(body);
            // The provider's id of the request, apart from the answer's own `id`.
            if let Ok(v) = HeaderValue::from_str(&ctx.id("req_")) {
                resp.headers_mut().insert("x-request-id", v.clone());
                resp.headers_mut().insert("request-id", v);
            }
            resp
        }
    }
}

/// Breaks the connection without a response (under [`crate::serve`]), or sends the
/// headers and half the body and then breaks it.
async fn cut(ctx: &Ctx, body: Vec<u8>) -> Response {
    if let Some(kill) = &ctx.kill {
        kill.0.notify_one();
        return std::future::pending().await;
    }
    let half = Bytes::from(body[..body.len() / 2].to_vec());
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        vec![Ok(half), Err(std::io::Error::other("simulated cut"))];
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

/// Text parts of a content value: a string, or an array of parts with `text` (OpenAI
/// `{"type":"text","text":..}`, Anthropic text blocks, and `tool_result` blocks'
/// nested content).
pub(crate) fn content_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                } else if let Some(c) = p.get("content") {
                    content_text(c, out);
                }
            }
        }
        _ => {}
    }
}

/// A positive integer field, or a 400.
pub(crate) fn positive(body: &Value, field: &'static str) -> Result<Option<usize>, Failure> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                Failure::BadRequest(
                    format!("Invalid '{field}': expected an integer of at least 1."),
                    Some(field),
                )
            }),
    }
}

/// The `model` field, or a 400.
pub(crate) fn model_of(body: &Value) -> Result<String, Failure> {
    body.get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            Failure::BadRequest("you must provide a model parameter".into(), Some("model"))
        })
}

/// The model an answer says served the request: an alias's dated snapshot, as the
/// providers answer (`gpt-4o` is served by `gpt-4o-2024-08-06`), so the gateway's
/// record of the served model can be told from the requested one; any other model as
/// asked.
pub(crate) fn served_model(model: &str) -> &str {
    const SNAPSHOTS: &[(&str, &str)] = &[
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("gpt-4.1", "gpt-4.1-2025-04-14"),
        ("o3-mini", "o3-mini-2025-01-31"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
        ("claude-haiku-4-5", "claude-haiku-4-5-20251001"),
    ];
    SNAPSHOTS
        .iter()
        .find(|(alias, _)| *alias == model)
        .map_or(model, |(_, dated)| dated)
}

/// A JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}
