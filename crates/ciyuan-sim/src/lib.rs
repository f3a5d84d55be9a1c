//! A simulated LLM provider: OpenAI's and Anthropic's wire formats, answered with
//! deterministic text whose usage numbers are the real tokenizer counts, with pacing
//! and faults under control. The gateway's demo, tests and benchmarks use it in place
//! of the real providers.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/embeddings`, `GET /v1/models` (OpenAI; with an `anthropic-version` header,
//! Anthropic's model list), `GET /v1/models/{id}`, `POST /v1/responses` (OpenAI's
//! Responses API, streamed and not, with cached and reasoning tokens in its usage),
//! `POST /v1/messages` and `POST /v1/messages/count_tokens` (Anthropic), and
//! `GET /sim/stats` (requests served, for tests).
//!
//! Every answer carries the account headers the real APIs send ([`ACCOUNT_HEADERS`]:
//! organisation and project ids, rate-limit figures, a cookie).
//!
//! Anthropic's `message_delta` carries cumulative usage as the API sends it today (the
//! input figures repeat `message_start`'s; `output_tokens` is final).
//!
//! Prompt tokens are counted with the model's tokenizer
//! ([`ciyuan_measure::text::encoding_for_model`], `o200k_base` for unknown models,
//! chat framing by [`ciyuan_measure::text::estimate_chat`]); output tokens are exactly
//! the tokenizer's count of the text returned, so an independent recount matches.
//! Tool definitions and non-text content parts are not counted.
//!
//! Request headers that steer one request (they override [`SimConfig`]):
//!
//! | header | effect |
//! |---|---|
//! | `x-sim-fault: 500` / `429` | answer that error, in the provider's error shape (`429` with `retry-after: 1`) |
//! | `x-sim-fault: cut` | a stream stops mid-way and the connection is closed abruptly (no final events, no `[DONE]`); a non-streaming request gets its connection closed with no response (under [`serve`]; under [`router`] alone the body is cut after the headers) |
//! | `x-sim-fault: timeout` | never answer: non-streaming requests get nothing; streams get headers and then nothing (the connection is closed after [`STALL_LIMIT`]) |
//! | `x-sim-fault: malformed` | `200` with a body that is not JSON; streams get one invalid `data:` line mid-way and otherwise complete normally |
//! | `x-sim-fault: no-usage` | no usage at all: no usage chunk even when asked, no `usage` in non-streaming answers, no `usage` in Anthropic's `message_delta` |
//! | `x-sim-cut-at: P` | the `cut` fault, after `P` percent (0 to 100) of the stream's text pieces |
//! | `x-sim-ttft-ms: N` | time to first token |
//! | `x-sim-tokens-per-sec: F` | streaming rate (`0`: as fast as possible) |
//! | `x-sim-output-tokens: N` | exactly `N` output tokens (`N` ≤ [`MAX_FORCED_OUTPUT_TOKENS`]); if the request's token limit is lower, exactly the limit, with `length` / `max_tokens` |

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod answer;
mod anthropic;
mod common;
mod openai;
mod responses;
mod sse;

use axum::Router;
use axum::routing::{get, post};
use common::{ConnKill, Sim};
use std::sync::Arc;
use std::time::Duration;

/// The largest request body accepted, in bytes (a larger one is answered 413).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// How long the `timeout` fault stalls before the connection is closed: an hour,
/// forever for any client's timeout, yet no task is held without bound.
pub const STALL_LIMIT: Duration = Duration::from_secs(3600);

/// The largest `x-sim-output-tokens` accepted.
pub const MAX_FORCED_OUTPUT_TOKENS: usize = 1 << 17;

/// How the simulated provider behaves when a request does not say otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Time to the first token (for non-streaming answers: added to the generation
    /// time before the answer is sent).
    pub ttft: Duration,
    /// Output tokens per second after the first; `0` sends as fast as possible.
    pub tokens_per_sec: f64,
    /// Fraction (0 to 1) of requests answered with an error, half `500` and half `429`.
    pub error_rate: f64,
    /// Fraction (0 to 1) of streams cut mid-way (connection closed abruptly).
    pub cut_rate: f64,
    /// Seed of the generated answers and of the random faults.
    pub seed: u64,
    /// If set, requests must carry this key (`Authorization: Bearer`, or `x-api-key`
    /// on Anthropic's endpoint); others get `401`.
    pub api_key: Option<String>,
}

impl Default for SimConfig {
    /// 200 ms to the first token, 50 tokens/s, no faults, seed 0, no key.
    fn default() -> Self {
        SimConfig {
            ttft: Duration::from_millis(200),
            tokens_per_sec: 50.0,
            error_rate: 0.0,
            cut_rate: 0.0,
            seed: 0,
            api_key: None,
        }
    }
}

/// The simulated provider's routes, ready to be served (or nested) by axum.
pub fn router(cfg: SimConfig) -> Router {
    let state = Arc::new(Sim::new(cfg));
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/responses", post(responses::responses))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route("/sim/stats", get(stats))
        .fallback(common::not_found)
        .method_not_allowed_fallback(common::not_found)
        .layer(axum::middleware::map_response(account_headers))
        .with_state(state)
}

/// What the real APIs send about the account behind a key, on every answer: a gateway
/// must not let them through to its tenants.
pub const ACCOUNT_HEADERS: [(&str, &str); 6] = [
    ("openai-organization", "org-sim0000000000000000000000"),
    ("openai-project", "proj_sim000000000000000000000"),
    (
        "anthropic-organization-id",
        "00000000-0000-4000-8000-000000000000",
    ),
    ("x-ratelimit-remaining-tokens", "149984"),
    ("set-cookie", "__cf_bm=sim; path=/; HttpOnly; Secure"),
    ("server", "ciyuan-sim"),
];

async fn account_headers(mut resp: axum::response::Response) -> axum::response::Response {
    for (name, value) in ACCOUNT_HEADERS {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_static(name),
            axum::http::HeaderValue::from_static(value),
        );
    }
    resp
}

/// `GET /sim/stats`: how many requests reached the simulated model, so tests can check
/// that a gateway refused a request before it reached the provider.
async fn stats(
    axum::extract::State(sim): axum::extract::State<Arc<Sim>>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"requests": sim.requests()}))
}

/// Serves [`router`] on `listener` over HTTP/1.1 until the task is dropped. Each
/// connection is served by its own task, so the `cut` fault can drop a connection
/// without answering. Returns only when accepting fails for a reason other than a
/// transient one (a reset connection, running out of file descriptors).
pub async fn serve(listener: tokio::net::TcpListener, cfg: SimConfig) -> std::io::Result<()> {
    let app = router(cfg);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if transient(&e) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let kill = Arc::new(tokio::sync::Notify::new());
            let handle = ConnKill(kill.clone());
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(handle.clone());
                let mut app = app.clone();
                async move { tower_service::Service::call(&mut app, req).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
            }
        });
    }
}

fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | Interrupted
            | WouldBlock
            | TimedOut
    ) || matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}
