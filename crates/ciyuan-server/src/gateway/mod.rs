//! The gateway: OpenAI- and Anthropic-compatible endpoints that forward each call to
//! the provider configured for its model, stream the answer back as it arrives, and
//! record what was consumed.
//!
//! Per request: authenticate (`gateway` scope) → read the request → route by model →
//! forward → relay the answer (streams chunk by chunk, never buffered whole) while
//! metering it → record one usage entry with the provider's counts, Ciyuan's recount
//! and the request's quality (status, time to first token, latency, upstream).
//!
//! The entry is appended after the answer has gone to the client, so the ledger's
//! fsync never adds latency; a crash in the few milliseconds between the two loses that
//! one record.
//!
//! Rooms: `config.rs` the configuration, `route.rs` routing, `protocol.rs` and one
//! module per dialect (`openai.rs`, `anthropic.rs`, `responses.rs`) the wire,
//! `forward.rs` and `upstream.rs` the call to the provider, `relay.rs` a stream on its
//! way back, `meter.rs` what a request consumed and its entry, `record.rs` the
//! recorder; this file the handlers, reading and admitting a request.

mod anthropic;
mod config;
mod forward;
mod meter;
pub mod metrics;
mod openai;
pub mod protocol;
mod record;
mod relay;
pub(crate) mod request;
pub(crate) mod responses;
mod retrieve;
mod route;
pub(crate) mod sse;
mod tags;
mod upstream;

#[cfg(test)]
mod metering_tests;

use crate::App;
use crate::auth::Caller;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    Direction, Entry, EntryBody, Modality, Quality, Recount, Scope, TokenMap, Usage,
};
use ciyuan_measure::text::{
    ChatMessage, Encoding, encoding_for_model, estimate_chat, wildcard_match,
};
use http_body_util::{BodyExt, Full};
use protocol::{Endpoint, Family, GatewayError, RequestInfo, Shown, StreamState};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::*;
pub use forward::count_tokens;
use forward::{ANTHROPIC_VERSION, error_chain, forward};
use meter::{ESTIMATOR, Finishing, Meter, add_tokens, count_input, finish, finish_failed};
use record::Record;
pub use retrieve::{cancel_response, delete_response, get_response, response_input_items};
pub use route::Gateway;
pub use upstream::close_expired_idle;

/// `POST /v1/chat/completions`
pub async fn chat(app: State<Arc<App>>, headers: TakenHeaders, req: Request) -> Response {
    handle(app.0, Endpoint::Chat, headers.0, req).await
}

/// `POST /v1/completions`
pub async fn completions(app: State<Arc<App>>, headers: TakenHeaders, req: Request) -> Response {
    handle(app.0, Endpoint::Completions, headers.0, req).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(app: State<Arc<App>>, headers: TakenHeaders, req: Request) -> Response {
    handle(app.0, Endpoint::Embeddings, headers.0, req).await
}

/// `POST /v1/responses`
pub async fn responses(app: State<Arc<App>>, headers: TakenHeaders, req: Request) -> Response {
    handle(app.0, Endpoint::Responses, headers.0, req).await
}

/// `POST /v1/messages`
pub async fn messages(app: State<Arc<App>>, headers: TakenHeaders, req: Request) -> Response {
    handle(app.0, Endpoint::Messages, headers.0, req).await
}

/// Longest model name, end-user id or session accepted, in bytes (as ingest bounds its
/// model names): each becomes a label, a budget counter's key or a ledger field.
pub const MAX_NAME_BYTES: usize = 256;

/// The session a request belongs to: `x-ciyuan-session`, else the request's `user`.
fn session_of(
    headers: &HeaderMap,
    info: &RequestInfo,
) -> Result<Option<String>, (&'static str, &'static str)> {
    match headers.get("x-ciyuan-session") {
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| ("x-ciyuan-session", "must be visible ASCII")),
        None => Ok(info.user.clone()),
    }
}

/// Checks a name the request gives: `Err((field, problem))`.
fn bounded(field: &'static str, value: &str) -> Result<(), (&'static str, &'static str)> {
    if value.len() > MAX_NAME_BYTES {
        return Err((field, "longer than 256 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err((field, "holds control characters"));
    }
    Ok(())
}

/// The request's headers, moved out of the request: axum's `HeaderMap` extractor copies
/// them all, on every call. Only the body is extracted after them.
pub struct TakenHeaders(HeaderMap);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TakenHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(TakenHeaders(std::mem::take(&mut parts.headers)))
    }
}

/// `GET /v1/models`: the models configured by exact name, in the shape of the SDK that
/// asks (Anthropic's when an `anthropic-version` header is sent).
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let family = if headers.contains_key("anthropic-version") {
        Family::Anthropic
    } else {
        Family::OpenAi
    };
    if let Err(e) = caller(&app, &headers).await {
        return e.into_response(family);
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for p in &app.gateway.config.providers {
        for m in &p.models {
            if !m.contains('*') && !names.iter().any(|(n, _)| n == m) {
                names.push((m.clone(), p.name.clone()));
            }
        }
    }
    for (m, p) in app.gateway.listed_upstream().await {
        if !names.iter().any(|(n, _)| *n == m) {
            names.push((m, p));
        }
    }
    let body = match family {
        Family::OpenAi => serde_json::json!({
            "object": "list",
            "data": names.iter().map(|(m, p)| serde_json::json!({
                "id": m, "object": "model", "created": 0, "owned_by": p,
            })).collect::<Vec<_>>(),
        }),
        Family::Anthropic => serde_json::json!({
            "data": names.iter().map(|(m, _)| serde_json::json!({
                "type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z",
            })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": names.first().map(|n| &n.0),
            "last_id": names.last().map(|n| &n.0),
        }),
    };
    axum::Json(body).into_response()
}

/// `GET /metrics`: Prometheus text format, for a key with the `read` scope at the root
/// account (the figures span every tenant). Served without a key only on the separate
/// metrics listener ([`metrics_router`]), when one is configured.
pub async fn metrics_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let caller = match app.caller(&headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = caller.require(Scope::Read) {
        return e.into_response();
    }
    if !caller.key.account.is_root() {
        return crate::error::ApiError::forbidden(format!(
            "key {} belongs to {}; /metrics spans every account and needs a read key at the root account /",
            caller.key.key_id, caller.key.account
        ))
        .into_response();
    }
    metrics_text(&app)
}

fn metrics_text(app: &App) -> Response {
    let mut text = app.gateway.metrics.render();
    if let Some(slices) = &app.slices {
        slices.render_metrics(&mut text);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// The router of the separate metrics listener (`metrics_listen`): `GET /metrics`
/// without a key, for a scraper on a private network, and nothing else.
pub fn metrics_router(app: Arc<App>) -> axum::Router {
    async fn open_metrics(State(app): State<Arc<App>>) -> Response {
        metrics_text(&app)
    }
    axum::Router::new()
        .route("/metrics", axum::routing::get(open_metrics))
        .with_state(app)
}

/// Authenticates a gateway call: a key with the gateway scope, on an account.
async fn caller(app: &Arc<App>, headers: &HeaderMap) -> Result<Caller, GatewayError> {
    let caller = app.caller(headers).await?;
    caller.require(Scope::Gateway)?;
    if caller.key.account.is_root() {
        return Err(GatewayError::new(
            StatusCode::FORBIDDEN,
            format!(
                "key {} belongs to the root account; gateway usage must land on an account: use a key made for one",
                caller.key.key_id
            ),
        ));
    }
    Ok(caller)
}

/// Everything known about a request once it is accepted for forwarding.
struct Call {
    endpoint: Endpoint,
    caller: Caller,
    info: RequestInfo,
    provider: usize,
    request_id: String,
    started: Instant,
    at: Timestamp,
    /// The budget reservation to settle or release when the request ends.
    reservation: Option<u64>,
    /// The money its wallet holds for it, to settle or release when it ends.
    hold: Option<ciyuan_budget::Hold>,
    /// Its holds in the database nodes share, if any.
    shared: Option<crate::holds::SharedHold>,
    /// The session the request belongs to (`x-ciyuan-session`, else the `user` field).
    session: Option<String>,
    /// Its attribution tags (`x-ciyuan-tags`, OpenAI's `metadata`).
    tags: std::collections::BTreeMap<String, String>,
    /// The provider's id of the request, from its answer's headers.
    upstream_request_id: Option<String>,
    /// The model's tokenizer, if Ciyuan has it.
    encoding: Option<Encoding>,
    /// The prompt as counted locally before forwarding (reused by the recount).
    input_estimate: Option<InputCount>,
}

/// The prompt as counted at admission.
#[derive(Clone, Copy)]
struct InputCount {
    encoding: Encoding,
    /// The whole prompt, tool definitions included.
    input: u64,
    /// Of which tool definitions.
    tools: u64,
}

/// Serves a gateway request to its end in a task of its own: a client that hangs up
/// drops only the wait for the answer, not the request. Once admitted, a request's
/// provider answers (and charges) whether or not the client stayed, so its usage is
/// recorded and what admission held is settled; dropped with the client, it would go
/// unmetered and hold its budget and wallet room until the reservations lapse.
async fn handle(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, req: Request) -> Response {
    let family = endpoint.family();
    let (answer, answered) = tokio::sync::oneshot::channel();
    // Boxed where it is made: the request's future is several KiB, and spawning moves
    // a future by value into its task several times over (`memmove` was 6% of the
    // gateway's CPU at 32 connections); a box moves as a pointer.
    tokio::spawn(Box::pin(async move {
        let mut after = None;
        let resp = serve_call(app, endpoint, headers, req, &mut after).await;
        // A client that hung up has no use for the answer; its usage is metered all
        // the same.
        let handed_over = answer.send(resp).is_ok();
        if let Some(after) = after {
            if handed_over {
                // Let the connection's task, woken by the answer, write it before this
                // task counts, rates and settles the request's usage.
                tokio::task::yield_now().await;
            }
            after.run().await;
        }
    }));
    match answered.await {
        Ok(resp) => resp,
        Err(_) => {
            // The task ended without an answer: it panicked.
            tracing::error!("a gateway request's task failed");
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the gateway failed while serving this request",
            )
            .into_response(family)
        }
    }
}

/// A gateway request, from its key to its answer (see [`handle`]); a whole answer's
/// metering is left in `after`, to run once the answer is handed over.
async fn serve_call(
    app: Arc<App>,
    endpoint: Endpoint,
    headers: HeaderMap,
    req: Request,
    after: &mut Option<Box<Finishing>>,
) -> Response {
    let started = Instant::now();
    let at = Timestamp::now();
    let family = endpoint.family();
    // The key is checked from the headers alone: a request without a valid key is
    // answered before a byte of its body is read.
    let caller = match caller(&app, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(family),
    };
    // A request whose usage the ledger cannot record now is refused before it reaches
    // a provider (`LedgerOutage`): served, it could go unmetered.
    if let Err(e) = app.log.available() {
        match app.gateway.config.ledger_outage {
            LedgerOutage::Refuse => {
                return GatewayError::from(crate::error::ApiError::from(e))
                    .code("ledger_unavailable")
                    .into_response(family);
            }
        }
    }
    // Within the route's body limit, and the listener's read deadline.
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(e) => return GatewayError::from(crate::extract::body_error(e)).into_response(family),
    };
    // Chat requests of the usual shape are read in one pass, and edited (if they must
    // be) by splicing; anything else goes through the value tree.
    let (mut info, mut parsed) = match request::inspect(endpoint, &body) {
        Some((info, spans)) => (info, Parsed::Spans(spans)),
        None => {
            let request: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return GatewayError::new(
                        StatusCode::BAD_REQUEST,
                        format!("the request body is not valid JSON: {e}"),
                    )
                    .into_response(family);
                }
            };
            match protocol::inspect(endpoint, &request) {
                Ok(i) => (i, Parsed::Tree(request)),
                Err(e) => return e.into_response(family),
            }
        }
    };
    let checked = session_of(&headers, &info).and_then(|session| {
        bounded("model", &info.model)?;
        if let Some(u) = &info.user {
            bounded("user", u)?;
        }
        if let Some(s) = &session {
            bounded("x-ciyuan-session", s)?;
        }
        // Reserved against budgets as it is: no model writes this much, and a larger
        // figure would overflow the sums it joins.
        if info
            .max_tokens
            .is_some_and(|m| m > protocol::MAX_REPORTED_TOKENS)
        {
            return Err(("max_tokens", "at most 1000000000000"));
        }
        Ok(session)
    });
    let session = match checked {
        Ok(s) => s,
        Err((field, problem)) => {
            return GatewayError::new(StatusCode::BAD_REQUEST, format!("{field}: {problem}"))
                .param(field)
                .into_response(family);
        }
    };
    let tags::Tags { tags, skipped } = match tags::of(&headers, &std::mem::take(&mut info.metadata))
    {
        Ok(t) => t,
        Err(e) => return e.into_response(family),
    };
    let skipped = (!skipped.is_empty())
        .then(|| HeaderValue::from_str(&tags::header_list(&skipped)).ok())
        .flatten();
    let provider = match app.gateway.route(family, &info.model) {
        Ok(p) => p,
        Err(e) => return e.into_response(family),
    };
    // Admission: reserve the prompt and the most output the request may produce on
    // the key's node and all its ancestors, before anything reaches the provider.
    let encoding = encoding_for_model(&info.model, &app.gateway.config.encodings);
    // Models without a local tokenizer are estimated with the estimator.
    let counting = encoding.unwrap_or(ESTIMATOR);
    let counted = count_input(counting, &info).map(|(input, tools)| InputCount {
        encoding: counting,
        input,
        tools,
    });
    let max_output = match endpoint {
        Endpoint::Embeddings => 0,
        _ => info
            .max_tokens
            .unwrap_or(app.gateway.config.default_max_output_tokens),
    };
    let max_cost;
    let reservation = {
        let input_n = info
            .media_parts
            .checked_mul(app.gateway.config.media_reserve_tokens)
            .and_then(|media| media.checked_add(counted.map_or(0, |c| c.input)))
            .filter(|n| *n <= protocol::MAX_REPORTED_TOKENS);
        let Some(input_n) = input_n else {
            return GatewayError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the prompt's {} media parts would reserve more than 10^12 tokens; send fewer",
                    info.media_parts
                ),
            )
            .into_response(family);
        };
        // Both are at most 10^12 (max_tokens is checked above; the default is configured).
        let mut input = TokenMap::new();
        let mut out = TokenMap::new();
        add_tokens(&mut input, Modality::Text, Direction::Input, input_n);
        add_tokens(
            &mut out,
            Modality::Text,
            Direction::Output,
            max_output.min(protocol::MAX_REPORTED_TOKENS),
        );
        // The most the request may cost at the prices that will rate it: held by
        // money limits and by the wallet that pays.
        let no_measures = std::collections::BTreeMap::new();
        max_cost = app.max_cost(
            &caller.key.account,
            &ciyuan_price::RateInput {
                model: Some(&info.model),
                service: endpoint.service(),
                tier: info.service_tier.unwrap_or_default(),
                tokens: &input,
                measures: &no_measures,
                at,
                period_to_date: rust_decimal::Decimal::ZERO,
            },
            // At most 10^12 (checked above), so it fits.
            i64::try_from(max_output.min(protocol::MAX_REPORTED_TOKENS)).unwrap_or(i64::MAX),
        );
        let admission = ciyuan_budget::Admission {
            account: &caller.key.account,
            key_id: &caller.key.key_id,
            session: session.as_deref(),
            model: &info.model,
            now: at,
            input: &input,
            max_output: &out,
            max_cost,
        };
        match app.budget.admit(&admission) {
            Ok(r) => r,
            Err(refusal) => return refused(family, refusal),
        }
    };
    // The wallet (the node's, else its nearest ancestor's in the price's currency)
    // holds the maximum cost, or the request is refused before it reaches a provider.
    let hold = match max_cost.filter(|m| m.amount > rust_decimal::Decimal::ZERO) {
        None => None,
        Some(m) => match app
            .wallets
            .reserve(&caller.key.account, m.currency, m.amount, at)
        {
            Ok(hold) => hold,
            Err(e) => {
                app.budget.release(reservation.id);
                return wallet_refused(family, e);
            }
        },
    };
    // Nodes sharing one ledger: held in the database too, beside the other nodes'.
    let shared = match app.hold_across_nodes(reservation.id, hold.as_ref()).await {
        Ok(shared) => shared,
        Err(not_held) => {
            app.budget.release(reservation.id);
            if let Some(h) = &hold {
                app.wallets.release(h);
            }
            return match not_held {
                crate::holds::NotHeld::Refused(message) => {
                    GatewayError::new(StatusCode::TOO_MANY_REQUESTS, message)
                        .code("insufficient_quota")
                        .into_response(family)
                }
                crate::holds::NotHeld::Failed(e) => GatewayError::from(e).into_response(family),
            };
        }
    };
    // A per-request limit with clamping: the request may produce only this much.
    let cap = reservation.output_cap.filter(|c| *c < max_output);
    // Ask for usage inside streams that carry it only when asked; the extra chunk is
    // taken out again on the way back when the client did not ask for it.
    let ask_usage = info.stream && endpoint.dialect().usage_on_request() && !info.include_usage;
    let body = if cap.is_some() || ask_usage {
        let edited = match &mut parsed {
            Parsed::Spans(spans) => request::edit(&body, spans, ask_usage, cap),
            Parsed::Tree(tree) => edit_tree(endpoint, tree, ask_usage, cap),
        };
        match edited {
            Some(b) => b,
            None => {
                app.budget.release(reservation.id);
                if let Some(h) = &hold {
                    app.wallets.release(h);
                }
                app.release_across_nodes(shared);
                return GatewayError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the request could not be rewritten for the provider",
                )
                .into_response(family);
            }
        }
    } else {
        body
    };
    drop(parsed);
    if counted.is_some() {
        // The prompt is counted (with the model's tokenizer, or the estimator the
        // recount would fall back to): its text need not stay in memory while the
        // answer streams (a thousand open streams with long prompts would hold them all).
        info.messages = Vec::new();
        info.prompts = Vec::new();
        info.tools_text = String::new();
    }
    let call = Call {
        endpoint,
        caller,
        info,
        provider,
        request_id: request_id(),
        started,
        at,
        reservation: Some(reservation.id),
        hold,
        shared,
        session,
        tags,
        upstream_request_id: None,
        encoding,
        input_estimate: counted,
    };
    let id = HeaderValue::from_str(&call.request_id).ok();
    // Boxed: forwarding's future (the provider call, its timeout, reading the answer)
    // is two thirds of this one's size, and this one is copied whole when it is made
    // and when its task is boxed; one allocation costs less than those copies.
    let (mut resp, finishing) = Box::pin(forward(app, call, &headers, body)).await;
    *after = finishing;
    if let Some(id) = id {
        // On every answer, errors included, so a client can name the request.
        resp.headers_mut().insert("x-ciyuan-request-id", id);
    }
    if let Some(skipped) = skipped {
        resp.headers_mut().insert(tags::SKIPPED_HEADER, skipped);
    }
    resp
}

/// A request as read: where its editable fields are, or its whole value tree.
enum Parsed {
    Spans(request::Spans),
    Tree(Value),
}

/// [`request::edit`] on a value tree (requests of unusual shapes, and every Responses
/// request).
fn edit_tree(
    endpoint: Endpoint,
    tree: &mut Value,
    include_usage: bool,
    cap: Option<u64>,
) -> Option<Bytes> {
    let obj = tree.as_object_mut()?;
    if include_usage {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !opts.is_object() {
            *opts = Value::Object(Default::default());
        }
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if let Some(cap) = cap {
        let field = endpoint.dialect().output_limit_field(obj);
        obj.insert(field.into(), Value::from(cap));
    }
    serde_json::to_vec(tree).ok().map(Bytes::from)
}

/// A request id: a random prefix drawn once per process and a counter, so ids are
/// unique and not guessable across restarts without a system call per request.
fn request_id() -> String {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            // Only an id for correlation: the start time is unique enough then.
            let t = Timestamp::now().as_nanosecond();
            b.copy_from_slice(&t.to_le_bytes()[..8]);
        }
        u64::from_le_bytes(b)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // By hand: `format!` with hex padding cost more than the rest of the id's work.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(28);
    id.push_str("req_");
    // At least 8 digits of the counter, more once it outgrows them (ids stay unique).
    let n_digits = 8.max((64 - n.leading_zeros() as usize).div_ceil(4));
    for (value, digits) in [(prefix, 16), (n, n_digits)] {
        for i in (0..digits).rev() {
            id.push(char::from(HEX[((value >> (i * 4)) & 0xf) as usize]));
        }
    }
    id
}

/// A request its wallet cannot pay for, in the family's shape: 429 with OpenAI's
/// `insufficient_quota` code (what SDKs show for an exhausted balance).
fn wallet_refused(family: Family, e: ciyuan_budget::WalletError) -> Response {
    match e {
        ciyuan_budget::WalletError::Refused(r) => GatewayError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("insufficient balance: the {r}"),
        )
        .code("insufficient_quota")
        .into_response(family),
        other => GatewayError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("wallet admission failed: {other}"),
        )
        .into_response(family),
    }
}

/// A refused request, in the family's shape: 429 for budgets and rates (with
/// `retry-after` where waiting helps), 403 for a model the node may not use.
fn refused(family: Family, r: ciyuan_budget::Refusal) -> Response {
    use ciyuan_budget::RefusalKind;
    let (status, code) = match r.kind {
        RefusalKind::Quota => (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"),
        RefusalKind::Rate => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        RefusalKind::Model => (StatusCode::FORBIDDEN, "model_not_allowed"),
    };
    let mut e = GatewayError::new(status, r.message).code(code);
    e.retry_after_secs = r
        .retry_after
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    e.into_response(family)
}

#[cfg(test)]
mod tests {
    use super::forward::{forwarded, passed_back_headers};
    use super::*;

    #[test]
    fn the_ledger_outage_setting_is_refuse_only_and_says_why() {
        assert_eq!("refuse".parse::<LedgerOutage>(), Ok(LedgerOutage::Refuse));
        assert_eq!(GatewayConfig::default().ledger_outage, LedgerOutage::Refuse);
        let allow = "allow".parse::<LedgerOutage>().unwrap_err();
        assert!(allow.contains("lost"), "{allow}");
        let other = "queue".parse::<LedgerOutage>().unwrap_err();
        assert!(other.contains("refuse"), "{other}");
    }

    #[test]
    fn the_encodings_in_use_follow_the_configured_models() {
        let with = |patterns: &[&str]| {
            let config = GatewayConfig {
                providers: vec![Provider {
                    name: "p".into(),
                    protocol: Protocol::OpenAi,
                    base_url: "http://127.0.0.1:1/v1".into(),
                    api_key: None,
                    models: patterns.iter().map(|p| p.to_string()).collect(),
                    connect_timeout: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    idle_timeout: Duration::from_secs(1),
                    forward_headers: Vec::new(),
                    rate_basis: crate::prices::Basis::default(),
                }],
                ..GatewayConfig::default()
            };
            config.encodings_in_use()
        };
        assert_eq!(with(&[]), [Encoding::O200kBase], "the estimator, always");
        assert_eq!(with(&["claude-*"]), [Encoding::O200kBase]);
        assert_eq!(
            with(&["gpt-*", "deepseek-chat"]),
            [
                Encoding::O200kBase,
                Encoding::Cl100kBase,
                Encoding::DeepSeekV4
            ]
        );
        assert_eq!(with(&["openai/gpt-4o-mini"]), [Encoding::O200kBase]);
        let all = with(&["*"]);
        for (_, e) in ciyuan_measure::text::MODEL_ENCODINGS {
            assert!(all.contains(e), "{e:?}");
        }
        let took = load_vocabularies(&GatewayConfig::default()).unwrap();
        assert!(took < Duration::from_secs(60));
    }

    #[test]
    fn regression_forward_patterns_never_pass_the_tenants_key_on() {
        let everything = vec!["x-*".to_string(), "*".to_string()];
        for name in [
            "authorization",
            "x-api-key",
            "x-ciyuan-session",
            "cookie",
            "host",
            "content-length",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(!forwarded(name, &everything), "{name} was forwarded");
        }
        assert!(forwarded("x-sim-fault", &everything));
        assert!(forwarded("anthropic-version", &[]));
        assert!(!forwarded("x-sim-fault", &[]));
    }

    #[test]
    fn regression_provider_response_headers_reach_tenants_only_from_an_allow_list() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("openai-organization", "org-secret"),
            ("openai-project", "proj_secret"),
            ("set-cookie", "__cf_bm=x"),
            ("server", "cloudflare"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("anthropic-organization-id", "0b5c"),
            ("retry-after", "1"),
            ("x-request-id", "req_123"),
        ] {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let out = passed_back_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "retry-after", "x-request-id"]);
    }

    #[test]
    fn regression_names_are_bounded_and_free_of_control_characters() {
        assert!(bounded("model", &"m".repeat(256)).is_ok());
        assert_eq!(
            bounded("model", &"m".repeat(257)),
            Err(("model", "longer than 256 bytes"))
        );
        assert!(bounded("user", "a\u{1b}[31m").is_err());
        assert!(bounded("user", "alice@example.com").is_ok());
    }

    #[test]
    fn request_ids_are_unique_lowercase_hex_after_the_prefix() {
        let a = super::request_id();
        let b = super::request_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            let hex = id.strip_prefix("req_").unwrap();
            assert_eq!(hex.len(), 24, "{id}");
            assert!(
                hex.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            );
        }
        assert_eq!(a[..20], b[..20], "one prefix per process");
    }
}
