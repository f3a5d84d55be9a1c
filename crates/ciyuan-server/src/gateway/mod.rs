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

pub mod metrics;
pub mod protocol;
mod relay;
pub(crate) mod request;
pub(crate) mod responses;
pub(crate) mod sse;
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
use protocol::{
    AnthropicEvent, AnthropicStream, Endpoint, Family, GatewayError, OpenAiChunk, RequestInfo,
    Shown,
};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI's API.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// An OpenAI-compatible API: DeepSeek, Qwen's compatible mode, Moonshot, vLLM,
    /// Ollama, ...
    OpenAiCompatible,
}

impl Protocol {
    /// Parses `openai`, `anthropic` or `openai-compatible`.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "openai" => Some(Protocol::OpenAi),
            "anthropic" => Some(Protocol::Anthropic),
            "openai-compatible" => Some(Protocol::OpenAiCompatible),
            _ => None,
        }
    }

    fn family(self) -> Family {
        match self {
            Protocol::Anthropic => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }
}

/// One upstream provider.
#[derive(Clone)]
pub struct Provider {
    /// Its name, recorded with every request it serves.
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// Base URL as its SDK takes it (OpenAI: ending in `/v1`; Anthropic: without).
    pub base_url: String,
    /// The API key sent upstream (read from the environment at start; never logged).
    pub api_key: Option<String>,
    /// Model names it serves, exact or with `*` wildcards; first matching provider wins.
    pub models: Vec<String>,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the answer's headers (and a whole non-streamed answer).
    pub timeout: Duration,
    /// Longest silence between two chunks of a stream.
    pub idle_timeout: Duration,
    /// Request headers passed on to the provider (lower case; `*` ends a prefix).
    pub forward_headers: Vec<String>,
    /// Which count is priced: the provider's (default), Ciyuan's recount, or the
    /// greater of the two per key.
    pub rate_basis: crate::prices::Basis,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

/// Request headers always passed on: tracing, and the providers' own versioning.
pub const DEFAULT_FORWARD_HEADERS: [&str; 6] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "traceparent",
    "tracestate",
    "x-request-id",
];

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Providers, in routing order.
    pub providers: Vec<Provider>,
    /// A recount differing from the provider's by more than this percentage (and
    /// more than `recount_tolerance_tokens`) is flagged.
    pub recount_tolerance_percent: u64,
    /// Differences up to this many tokens are never flagged.
    pub recount_tolerance_tokens: u64,
    /// Model → encoding rules in front of the built-in table.
    pub encodings: Vec<(String, Encoding)>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Output reserved against budgets for a request that sets no `max_tokens`.
    pub default_max_output_tokens: u64,
    /// Input reserved against budgets for each image, audio or file part of a prompt
    /// (their tokens are known only from the provider's count).
    pub media_reserve_tokens: u64,
    /// Distinct model labels `/metrics` keeps; further models count as `other`.
    pub metrics_max_models: usize,
    /// What admission does while the ledger cannot record (its database is out of
    /// reach).
    pub ledger_outage: LedgerOutage,
}

/// What admission does while the ledger cannot record usage (`[gateway]
/// ledger_outage`).
///
/// Only refusing is offered. A request admitted during an outage would have its usage
/// entry held in the node's memory until the database returns: a node that stops or
/// dies meanwhile loses it (the tenant was served and never billed, against the
/// invariant that every byte sent is metered), and budgets and wallets on other nodes
/// would not see it. Allowing "up to an amount" would bound the loss, not prevent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LedgerOutage {
    /// Answer 503 in the provider's error shape, with `retry-after`, before the
    /// request reaches a provider.
    #[default]
    Refuse,
}

impl std::str::FromStr for LedgerOutage {
    type Err = String;
    fn from_str(s: &str) -> Result<LedgerOutage, String> {
        match s {
            "refuse" => Ok(LedgerOutage::Refuse),
            "allow" => Err(
                "\"allow\" is not offered: usage served while the ledger cannot record would live only in the node's memory and be lost if the node stopped; the only setting is \"refuse\"".into(),
            ),
            other => Err(format!("{other:?} is not a setting; the only one is \"refuse\"")),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            providers: Vec::new(),
            recount_tolerance_percent: 5,
            recount_tolerance_tokens: 3,
            encodings: Vec::new(),
            max_body_bytes: 32 << 20,
            default_max_output_tokens: 4096,
            media_reserve_tokens: 2048,
            metrics_max_models: metrics::DEFAULT_MAX_MODELS,
            ledger_outage: LedgerOutage::Refuse,
        }
    }
}

/// The gateway's running state: configuration, one HTTP client per provider, metrics.
pub struct Gateway {
    config: GatewayConfig,
    clients: Vec<upstream::UpstreamClient>,
    /// Each provider's URL per endpoint (in [`Endpoint::ALL`] order), parsed once.
    urls: Vec<Vec<Uri>>,
    /// Each Anthropic provider's `/v1/messages/count_tokens`, parsed once.
    count_tokens_urls: Vec<Option<Uri>>,
    /// Each provider's credential header, made once (marked sensitive: never logged).
    auth: Vec<Option<(HeaderName, HeaderValue)>>,
    /// Models the providers listed behind wildcard patterns, and when they were asked.
    listed: tokio::sync::Mutex<Option<(Instant, ModelList)>>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The recorder task's inbox, started with the first request.
    recorder: std::sync::OnceLock<tokio::sync::mpsc::Sender<Record>>,
    /// Requests whose entry is not yet handed to the recorder.
    finishing: std::sync::atomic::AtomicUsize,
}

/// Entries wait this long for company before they are appended together: the answer
/// is already out, and one append (one fsync, one projection batch) for many requests
/// is what lets the ledger keep up with a busy gateway.
const RECORD_LINGER: Duration = Duration::from_millis(5);
/// Most entries appended at once by the recorder.
const RECORD_BATCH_MAX: usize = 1024;
/// How long the recorder keeps trying to append a group the ledger refused as
/// unavailable (its database restarting) before it gives the usage up.
const RECORD_RETRY_FOR: Duration = Duration::from_secs(300);
/// Entries queued for the recorder before `finish` appends on its own instead.
const RECORD_QUEUE: usize = 16 * 1024;

/// What the recorder task receives.
// Nearly every message is an entry; boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Record {
    /// An entry, with the rules guard it was rated under (released once the entry
    /// is durable in the ledger, or given up; see `App::rules_gate`), and the holds
    /// across nodes its usage settles once it is appended.
    Entry(
        Entry,
        Option<Entry>,
        Option<RulesGuard>,
        Option<crate::holds::Settling>,
    ),
    /// Append what is queued now and say when it is durable.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A read guard of `App::rules_gate`.
type RulesGuard = tokio::sync::OwnedRwLockReadGuard<()>;

/// A group of gateway entries as appended. They are built from strings, integers and a
/// timestamp, which decode back exactly as they are, so the projector may apply them
/// as held.
struct Recorded(Vec<Entry>);

impl crate::pipeline::Lent for Recorded {
    fn entries(&self) -> &[Entry] {
        &self.0
    }
}

/// Appends gateway entries in groups.
async fn recorder(app: std::sync::Weak<App>, mut rx: tokio::sync::mpsc::Receiver<Record>) {
    let mut batch: Vec<Entry> = Vec::with_capacity(RECORD_BATCH_MAX);
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut guards: Vec<RulesGuard> = Vec::new();
    // Holds settled by the batch's entries, by position.
    let mut settling: Vec<(usize, crate::holds::Settling)> = Vec::new();
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + RECORD_LINGER;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Record::Entry(e, posting, guard, settles) => {
                    // Side by side in one append: the payment never lands apart from
                    // its usage, and the holds settle with the last of them.
                    batch.push(e);
                    batch.extend(posting);
                    if let Some(s) = settles {
                        settling.push((batch.len() - 1, s));
                    }
                    guards.extend(guard);
                }
                Record::Flush(done) => {
                    waiting.push(done);
                    break;
                }
            }
            if batch.len() >= RECORD_BATCH_MAX {
                break;
            }
            next = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .ok()
                .flatten();
        }
        let Some(app) = app.upgrade() else { return };
        if !batch.is_empty() {
            let n = batch.len();
            // Lent to the projector, which applies them as they are instead of reading
            // them back from the ledger and decoding them.
            let lent = Arc::new(Recorded(std::mem::replace(
                &mut batch,
                Vec::with_capacity(n.next_power_of_two()),
            )));
            // The rules guards are held until the outcome, not only until the ledger
            // takes the entries: an append refused as unavailable is tried again
            // under them, so no rule can have come into force in between.
            let appended = match crate::pipeline::append_lent_then(
                app.log.as_ref(),
                &app.projector,
                lent.clone(),
                || {},
            )
            .await
            {
                Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                    record_again(&app, lent, &e.detail).await
                }
                other => other,
            };
            app.recorded(appended, std::mem::take(&mut settling), n);
            guards.clear();
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Appends again a group of gateway entries the ledger refused as unavailable (so
/// certainly not recorded: its database is restarting or out of reach), once it is
/// back, for up to [`RECORD_RETRY_FOR`]. These requests were served before the outage
/// was known; without this their usage would be lost. The caller holds the entries'
/// rules guards throughout.
async fn record_again(
    app: &Arc<App>,
    lent: Arc<Recorded>,
    first: &str,
) -> Result<std::ops::Range<u64>, crate::error::ApiError> {
    let n = lent.0.len();
    tracing::warn!(entries = n, detail = %first, "gateway usage waits for the ledger");
    let until = tokio::time::Instant::now() + RECORD_RETRY_FOR;
    let mut wait = Duration::from_millis(50);
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
        if app.log.available().is_err() && tokio::time::Instant::now() < until {
            continue;
        }
        match crate::pipeline::append_lent_then(
            app.log.as_ref(),
            &app.projector,
            lent.clone(),
            || {},
        )
        .await
        {
            Ok(range) => {
                tracing::info!(
                    entries = n,
                    "gateway usage recorded after the ledger came back"
                );
                return Ok(range);
            }
            Err(e)
                if e.status == StatusCode::SERVICE_UNAVAILABLE
                    && tokio::time::Instant::now() < until => {}
            Err(e) => return Err(e),
        }
    }
}

impl App {
    /// Waits until every gateway request that has finished has its entry durable in
    /// the ledger (for a clean stop), at most `timeout`.
    pub async fn flush_gateway(self: &Arc<Self>, timeout: Duration) {
        let until = tokio::time::Instant::now() + timeout;
        while self
            .gateway
            .finishing
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if let Some(tx) = self.gateway.recorder.get() {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Record::Flush(done)).await.is_ok() {
                let _ = tokio::time::timeout_at(until, wait).await;
            }
        }
    }

    /// Appends a gateway entry (and its wallet posting) at once, releasing the rules
    /// and tier guards once they hold their places in the ledger.
    async fn record_gateway_now(
        self: &Arc<Self>,
        entry: Entry,
        posting: Option<Entry>,
        rules: RulesGuard,
        tiers: crate::tiers::TiersGuard,
        settles: Option<crate::holds::Settling>,
    ) {
        let mut entries = vec![entry];
        entries.extend(posting);
        let n = entries.len();
        let appended = crate::pipeline::append_lent_then(
            self.log.as_ref(),
            &self.projector,
            Arc::new(Recorded(entries)),
            || {
                drop(rules);
                drop(tiers);
            },
        )
        .await;
        // Settled with the last entry (the payment, where there is one).
        self.recorded(
            appended,
            settles.map(|s| (n - 1, s)).into_iter().collect(),
            n,
        );
    }

    /// After gateway entries' append: lets the projector know, and settles the holds
    /// across nodes of the requests whose entries they are (by position); on a
    /// failure, says so (the holds lapse).
    fn recorded(
        self: &Arc<Self>,
        appended: Result<std::ops::Range<u64>, crate::error::ApiError>,
        settling: Vec<(usize, crate::holds::Settling)>,
        n: usize,
    ) {
        match appended {
            Ok(range) => {
                self.projector.kick();
                self.settle_across_nodes(
                    settling
                        .into_iter()
                        .map(|(pos, s)| (s, range.start + pos as u64))
                        .collect(),
                );
            }
            Err(e) => {
                tracing::error!(entries = n, detail = %e.detail, "gateway usage not recorded")
            }
        }
    }

    /// Hands a gateway entry to the recorder (started on first use).
    fn record_gateway(
        self: &Arc<Self>,
        entry: Entry,
        posting: Option<Entry>,
        guard: Option<RulesGuard>,
        settles: Option<crate::holds::Settling>,
    ) {
        let tx = self.gateway.recorder.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(RECORD_QUEUE);
            tokio::spawn(recorder(Arc::downgrade(self), rx));
            tx
        });
        if let Err(e) = tx.try_send(Record::Entry(entry, posting, guard, settles)) {
            // The recorder is behind: append this one alone rather than drop it.
            let (entry, posting, guard, settles) = match e {
                tokio::sync::mpsc::error::TrySendError::Full(Record::Entry(e, p, g, s))
                | tokio::sync::mpsc::error::TrySendError::Closed(Record::Entry(e, p, g, s)) => {
                    (e, p, g, s)
                }
                _ => return,
            };
            let mut entries = vec![entry];
            entries.extend(posting);
            let n = entries.len();
            let app = self.clone();
            tokio::spawn(async move {
                let mut guard = guard;
                let appended = crate::pipeline::append_lent_then(
                    app.log.as_ref(),
                    &app.projector,
                    Arc::new(Recorded(entries)),
                    || drop(guard.take()),
                )
                .await;
                app.recorded(
                    appended,
                    settles.map(|s| (n - 1, s)).into_iter().collect(),
                    n,
                );
            });
        }
    }
}

/// (model, provider) pairs.
type ModelList = Vec<(String, String)>;

/// Largest model list read from a provider.
const MAX_MODEL_LIST_BYTES: usize = 4 << 20;

/// Largest whole (not streamed) answer read from a provider: embeddings of a large
/// batch run to a hundred megabytes; a provider sending more is broken.
const MAX_ANSWER_BYTES: usize = 256 << 20;

/// How long the providers' model lists are remembered.
const MODEL_LIST_TTL: Duration = Duration::from_secs(60);
/// Longest wait for a provider's model list.
const MODEL_LIST_TIMEOUT: Duration = Duration::from_secs(3);

impl Gateway {
    /// The models each provider with wildcard patterns lists itself (`GET /models`),
    /// kept to those its patterns route here: (model, provider). Asked at most once a
    /// minute; a provider that does not answer in time lists nothing.
    async fn listed_upstream(&self) -> Vec<(String, String)> {
        let mut cached = self.listed.lock().await;
        if let Some((at, list)) = cached.as_ref()
            && at.elapsed() < MODEL_LIST_TTL
        {
            return list.clone();
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, p) in self.config.providers.iter().enumerate() {
            if !p.models.iter().any(|m| m.contains('*')) {
                continue;
            }
            let url = match p.protocol.family() {
                Family::OpenAi => format!("{}/models", p.base_url),
                Family::Anthropic => format!("{}/v1/models", p.base_url),
            };
            let Ok(uri) = url.parse::<Uri>() else {
                continue;
            };
            let mut req = hyper::Request::new(Full::new(Bytes::new()));
            *req.uri_mut() = uri;
            if p.protocol == Protocol::Anthropic {
                req.headers_mut().insert(
                    HeaderName::from_static("anthropic-version"),
                    HeaderValue::from_static(ANTHROPIC_VERSION),
                );
            }
            if let Some((name, value)) = &self.auth[i] {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            let answer = tokio::time::timeout(MODEL_LIST_TIMEOUT, async {
                let resp = self.clients[i].request(req).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = http_body_util::Limited::new(resp.into_body(), MAX_MODEL_LIST_BYTES)
                    .collect()
                    .await
                    .ok()?
                    .to_bytes();
                serde_json::from_slice::<Value>(&body).ok()
            })
            .await;
            let Ok(Some(v)) = answer else {
                tracing::warn!(provider = %p.name, "provider did not list its models");
                continue;
            };
            for id in v["data"].as_array().into_iter().flatten() {
                let Some(id) = id["id"].as_str() else {
                    continue;
                };
                if p.models.iter().any(|m| wildcard_match(m, id))
                    && !out.iter().any(|(n, _)| n == id)
                {
                    out.push((id.to_string(), p.name.clone()));
                }
            }
        }
        *cached = Some((Instant::now(), out.clone()));
        out
    }

    /// Builds the clients.
    pub fn new(config: GatewayConfig) -> Result<Gateway, String> {
        let clients = config
            .providers
            .iter()
            .map(|p| {
                upstream::client(p.connect_timeout).map_err(|e| format!("provider {}: {e}", p.name))
            })
            .collect::<Result<_, _>>()?;
        let urls = config
            .providers
            .iter()
            .map(|p| {
                let url = |e: Endpoint| {
                    let url = format!("{}{}", p.base_url, e.upstream_path());
                    match url.parse::<Uri>() {
                        Ok(u) if u.scheme().is_some() && u.host().is_some() => Ok(u),
                        Ok(_) => Err(format!(
                            "provider {}: base_url {:?} is not an absolute http(s) URL",
                            p.name, p.base_url
                        )),
                        Err(err) => Err(format!(
                            "provider {}: base_url {:?}: {err}",
                            p.name, p.base_url
                        )),
                    }
                };
                Endpoint::ALL.iter().map(|e| url(*e)).collect()
            })
            .collect::<Result<Vec<_>, String>>()?;
        let count_tokens_urls = config
            .providers
            .iter()
            .map(|p| {
                (p.protocol == Protocol::Anthropic)
                    .then(|| format!("{}/v1/messages/count_tokens", p.base_url).parse::<Uri>())
                    .transpose()
                    .map_err(|e| format!("provider {}: base_url {:?}: {e}", p.name, p.base_url))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let auth = config
            .providers
            .iter()
            .map(|p| {
                let Some(key) = &p.api_key else {
                    return Ok(None);
                };
                let (name, value) = match p.protocol {
                    Protocol::Anthropic => (HeaderName::from_static("x-api-key"), key.clone()),
                    _ => (header::AUTHORIZATION, format!("Bearer {key}")),
                };
                let mut value = HeaderValue::try_from(value).map_err(|_| {
                    format!(
                        "provider {}: the API key holds characters an HTTP header cannot carry",
                        p.name
                    )
                })?;
                value.set_sensitive(true);
                Ok(Some((name, value)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let max_models = config.metrics_max_models;
        Ok(Gateway {
            config,
            clients,
            urls,
            count_tokens_urls,
            auth,
            listed: tokio::sync::Mutex::new(None),
            metrics: metrics::Metrics::new(max_models),
            recorder: std::sync::OnceLock::new(),
            finishing: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The provider for `model` on an endpoint of `family`.
    fn route(&self, family: Family, model: &str) -> Result<usize, GatewayError> {
        let serves = |p: &Provider| p.models.iter().any(|m| wildcard_match(m, model));
        if let Some(i) = self
            .config
            .providers
            .iter()
            .position(|p| p.protocol.family() == family && serves(p))
        {
            return Ok(i);
        }
        if let Some(p) = self.config.providers.iter().find(|p| serves(p)) {
            let endpoint = match p.protocol.family() {
                Family::OpenAi => "/v1/chat/completions",
                Family::Anthropic => "/v1/messages",
            };
            return Err(GatewayError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "model {model:?} is served by provider {} over the {} protocol; call {endpoint}",
                    p.name,
                    match p.protocol.family() {
                        Family::OpenAi => "OpenAI",
                        Family::Anthropic => "Anthropic",
                    }
                ),
            ));
        }
        Err(GatewayError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found"))
    }
}

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

/// Largest answer read from `count_tokens` (a provider's is a few dozen bytes).
const MAX_COUNT_ANSWER_BYTES: usize = 1 << 20;

/// `POST /v1/messages/count_tokens`: Anthropic's count of a prompt, asked of the
/// provider that serves its model. Authenticated and held to the key's access rules
/// like a request (a model the key may not use is refused), but it consumes no tokens:
/// never admitted against budgets or wallets, never recorded.
pub async fn count_tokens(
    State(app): State<Arc<App>>,
    headers: TakenHeaders,
    req: Request,
) -> Response {
    let family = Family::Anthropic;
    let headers = headers.0;
    let caller = match caller(&app, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(family),
    };
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(e) => return GatewayError::from(crate::extract::body_error(e)).into_response(family),
    };
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m).into_response(family);
    let model = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => match o.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => return bad("model: must be a non-empty string".into()),
            None => return bad("model: required".into()),
        },
        Ok(_) => return bad("the request body must be a JSON object".into()),
        Err(e) => return bad(format!("the request body is not valid JSON: {e}")),
    };
    if let Err((field, problem)) = bounded("model", &model) {
        return bad(format!("{field}: {problem}"));
    }
    if let Err(refusal) = app.budget.check_model(&caller.key.account, &model) {
        return refused(family, refusal);
    }
    let gw = &app.gateway;
    let i = match gw.route(family, &model) {
        Ok(i) => i,
        Err(e) => return e.into_response(family),
    };
    let provider = &gw.config.providers[i];
    let Some(uri) = gw.count_tokens_urls[i].clone() else {
        return GatewayError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("provider {} has no count_tokens endpoint", provider.name),
        )
        .into_response(family);
    };
    let mut up = hyper::Request::new(Full::new(body));
    *up.method_mut() = Method::POST;
    *up.uri_mut() = uri;
    let out = up.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in &headers {
        if forwarded(name.as_str(), &provider.forward_headers) {
            out.append(name.clone(), value.clone());
        }
    }
    if !out.contains_key("anthropic-version") {
        out.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
    }
    if let Some((name, value)) = &gw.auth[i] {
        out.insert(name.clone(), value.clone());
    }
    let answered = tokio::time::timeout(provider.timeout, async {
        let resp = gw.clients[i]
            .request(up)
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, incoming) = resp.into_parts();
        let bytes = http_body_util::Limited::new(incoming, MAX_COUNT_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| error_chain(e.as_ref()))?
            .to_bytes();
        Ok::<_, String>((parts, bytes))
    })
    .await;
    match answered {
        Ok(Ok((parts, bytes))) => {
            let mut resp = (parts.status, bytes).into_response();
            *resp.headers_mut() = passed_back_headers(&parts.headers);
            resp
        }
        Ok(Err(e)) => GatewayError::new(
            StatusCode::BAD_GATEWAY,
            format!("upstream {} failed: {e}", provider.name),
        )
        .into_response(family),
        Err(_) => GatewayError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "upstream {} did not answer within {}s",
                provider.name,
                provider.timeout.as_secs_f64()
            ),
        )
        .into_response(family),
    }
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
    match tokio::spawn(serve_call(app, endpoint, headers, req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "a gateway request's task failed");
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the gateway failed while serving this request",
            )
            .into_response(family)
        }
    }
}

/// A gateway request, from its key to its answer (see [`handle`]).
async fn serve_call(
    app: Arc<App>,
    endpoint: Endpoint,
    headers: HeaderMap,
    req: Request,
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
    // Ask for usage inside OpenAI streams; the extra chunk is taken out again on the
    // way back when the client did not ask for it.
    // (A Responses stream always ends with its usage.)
    let ask_usage = info.stream
        && family == Family::OpenAi
        && endpoint != Endpoint::Responses
        && !info.include_usage;
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
        encoding,
        input_estimate: counted,
    };
    let id = HeaderValue::from_str(&call.request_id).ok();
    let mut resp = forward(app, call, &headers, body).await;
    if let Some(id) = id {
        // On every answer, errors included, so a client can name the request.
        resp.headers_mut().insert("x-ciyuan-request-id", id);
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
        let field = if endpoint == Endpoint::Responses {
            "max_output_tokens"
        } else if obj.contains_key("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
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

/// Whether a client's request header goes on to the provider: the defaults and the
/// provider's `forward_headers`, never a credential, Ciyuan's own headers, or what
/// frames the request (which the gateway sets for the body it sends).
fn forwarded(name: &str, allowed: &[String]) -> bool {
    if NEVER_FORWARDED.contains(&name)
        || name.starts_with("x-ciyuan-")
        || name.starts_with("proxy-")
    {
        return false;
    }
    DEFAULT_FORWARD_HEADERS.contains(&name)
        || allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name,
        })
}

/// Request headers no `forward_headers` pattern passes on: the tenant's key (the
/// provider gets the gateway's own), cookies, and hop-by-hop and framing headers.
const NEVER_FORWARDED: [&str; 14] = [
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Whether a provider's response header reaches the tenant. An allow-list: providers
/// answer with their organisation and project ids, cookies, server details and the
/// remaining capacity of the shared upstream account (`x-ratelimit-*`, which would
/// show one tenant the others' traffic); the client needs only the body's type, when
/// and whether to retry (the SDKs obey `x-should-retry`), and the provider's request
/// id to quote to its support.
fn passed_back(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "cache-control"
            | "retry-after"
            | "retry-after-ms"
            | "x-should-retry"
            | "x-request-id"
            | "request-id"
    )
}

/// The provider's response headers that reach the tenant.
fn passed_back_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(4);
    for (name, value) in from {
        if passed_back(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The `anthropic-version` sent when the client sent none.
const ANTHROPIC_VERSION: &str = "2023-06-01";

async fn forward(app: Arc<App>, call: Call, headers: &HeaderMap, body: Bytes) -> Response {
    let family = call.endpoint.family();
    let gw = &app.gateway;
    let provider = &gw.config.providers[call.provider];
    let mut req = hyper::Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = gw.urls[call.provider][call.endpoint.index()].clone();
    let out = req.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("ciyuan/", env!("CARGO_PKG_VERSION"))),
    );
    for (name, value) in headers {
        if forwarded(name.as_str(), &provider.forward_headers) {
            out.append(name.clone(), value.clone());
        }
    }
    if provider.protocol == Protocol::Anthropic && !out.contains_key("anthropic-version") {
        out.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
    }
    if let Some((name, value)) = &gw.auth[call.provider] {
        out.insert(name.clone(), value.clone());
    }
    let sent = tokio::time::timeout(provider.timeout, gw.clients[call.provider].request(req)).await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let msg = format!("upstream {} failed: {}", provider.name, error_chain(&e));
            let status = StatusCode::BAD_GATEWAY;
            finish_failed(&app, call, status, "upstream_error");
            return GatewayError::new(status, msg).into_response(family);
        }
        Err(_) => {
            let msg = format!(
                "upstream {} did not answer within {}s",
                provider.name,
                provider.timeout.as_secs_f64()
            );
            finish_failed(&app, call, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
            return GatewayError::new(StatusCode::GATEWAY_TIMEOUT, msg).into_response(family);
        }
    };
    let (parts, incoming) = resp.into_parts();
    let status = parts.status;
    let out_headers = passed_back_headers(&parts.headers);
    let is_stream = call.info.stream
        && status.is_success()
        && out_headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_stream {
        let idle = provider.idle_timeout;
        let relay = relay::Relay::new(app.clone(), call, incoming, status.as_u16(), idle);
        let mut r = Response::new(Body::new(relay));
        *r.status_mut() = status;
        *r.headers_mut() = out_headers;
        return r;
    }
    // A whole answer: read it (within the provider's timeout and size bound), pass it
    // on unchanged.
    let limited = http_body_util::Limited::new(incoming, MAX_ANSWER_BYTES);
    let whole = tokio::time::timeout(provider.timeout, limited.collect()).await;
    let bytes = match whole {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!(
                "upstream {} answered with more than {} MiB",
                provider.name,
                MAX_ANSWER_BYTES >> 20
            );
            finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_too_large");
            return GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family);
        }
        Ok(Err(e)) => {
            let msg = format!(
                "upstream {} broke off its answer: {}",
                provider.name,
                error_chain(e.as_ref())
            );
            finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_cut");
            return GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family);
        }
        Err(_) => {
            let msg = format!(
                "upstream {} did not finish its answer within {}s",
                provider.name,
                provider.timeout.as_secs_f64()
            );
            finish_failed(&app, call, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
            return GatewayError::new(StatusCode::GATEWAY_TIMEOUT, msg).into_response(family);
        }
    };
    if !status.is_success() {
        // The provider's own error, in its own shape, reaches the client as it is.
        finish_failed(&app, call, status, "upstream_error");
        let mut resp = (status, bytes).into_response();
        *resp.headers_mut() = out_headers;
        return resp;
    }
    let Some(shown) = protocol::read_answer(call.endpoint, &bytes) else {
        let msg = format!("upstream {} answered with malformed JSON", provider.name);
        // The tenant got no answer it can use: it is charged nothing (the entry still
        // records the failure, and the reservation is released).
        finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_malformed");
        return GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family);
    };
    let ttft = call.started.elapsed();
    let mut meter = Meter::new(None);
    meter.billable = true;
    meter.complete = true;
    if shown.reported.is_none() {
        meter.failure = Some("no_usage");
    }
    meter.shown = shown;
    finish(&app, call, meter, status.as_u16(), Some(ttft));
    let mut resp = (status, bytes).into_response();
    *resp.headers_mut() = out_headers;
    resp
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// What a relayed answer has shown so far.
struct Meter {
    shown: Shown,
    anthropic: AnthropicStream,
    /// The stream reached its proper end (`[DONE]`, `message_stop`).
    complete: bool,
    failure: Option<&'static str>,
    ttft: Option<Duration>,
    /// The provider accepted the request (2xx) and answered: it consumed tokens,
    /// whether or not its count reaches us.
    billable: bool,
}

impl Meter {
    fn new(failure: Option<&'static str>) -> Meter {
        Meter {
            shown: Shown::default(),
            anthropic: AnthropicStream::default(),
            complete: false,
            failure,
            ttft: None,
            billable: false,
        }
    }

    /// Reads one event of a stream from `endpoint`; returns whether to pass it on to the
    /// client.
    fn event(
        &mut self,
        endpoint: Endpoint,
        event: &[u8],
        strip_usage: bool,
        started: Instant,
    ) -> bool {
        let Some(data) = sse::data(event) else {
            return true;
        };
        let before = self.shown.text.len() + self.shown.reasoning.len();
        let mut forward = true;
        match endpoint.family() {
            Family::OpenAi if endpoint == Endpoint::Responses => {
                match serde_json::from_str::<responses::Event>(&data) {
                    Ok(ev) => {
                        if ev.apply(&mut self.shown) == responses::Step::Done {
                            self.complete = true;
                        }
                    }
                    Err(_) => self.unreadable(&data),
                }
            }
            Family::OpenAi => {
                if data.trim() == "[DONE]" {
                    self.complete = true;
                } else if let Ok(chunk) = serde_json::from_str::<OpenAiChunk>(&data) {
                    chunk.text_into(&mut self.shown);
                    if let Some(u) = chunk.usage() {
                        self.shown.reported = Some(u);
                    }
                    if strip_usage && chunk.is_usage_only() {
                        forward = false;
                    }
                } else {
                    self.unreadable(&data);
                }
            }
            Family::Anthropic => {
                if let Ok(ev) = serde_json::from_str::<AnthropicEvent>(&data) {
                    // The usage is read out once, when the request is measured.
                    if ev.apply(&mut self.anthropic, &mut self.shown) {
                        self.complete = true;
                    }
                } else {
                    self.unreadable(&data);
                }
            }
        }
        if self.ttft.is_none() && self.shown.text.len() + self.shown.reasoning.len() > before {
            self.ttft = Some(started.elapsed());
        }
        forward
    }

    /// An event the chunk readers cannot take (a field of an unexpected type, not
    /// JSON) still reached the client: its data is metered as delivered text, so a
    /// broken provider's output is never free when its count does not come. (When the
    /// count does come, it is what is billed; the recount then counts these bytes.)
    fn unreadable(&mut self, data: &str) {
        if !data.trim().is_empty() {
            self.shown.text.push_str(data);
        }
    }

    /// Whether the provider's final count has come.
    fn counted(&self) -> bool {
        match &self.shown.reported {
            Some(r) => r.complete,
            None => self.anthropic.is_final(),
        }
    }

    /// The provider's count so far: a whole answer's, an OpenAI stream's usage chunk,
    /// or what an Anthropic stream's events added up to.
    fn take_reported(&mut self) -> Option<protocol::Reported> {
        self.shown
            .reported
            .take()
            .or_else(|| self.anthropic.reported())
    }
}

/// Records a request that consumed nothing (refused, failed upstream before an
/// answer, or answered with nothing usable): no tokens, but its status and latency
/// count for service quality.
fn finish_failed(app: &Arc<App>, call: Call, status: StatusCode, why: &'static str) {
    let meter = Meter::new(Some(why));
    let call = Call {
        endpoint: call.endpoint,
        caller: call.caller,
        info: RequestInfo {
            model: call.info.model,
            stream: call.info.stream,
            ..RequestInfo::default()
        },
        provider: call.provider,
        request_id: call.request_id,
        started: call.started,
        at: call.at,
        reservation: call.reservation,
        hold: call.hold,
        shared: call.shared,
        session: call.session,
        encoding: call.encoding,
        input_estimate: None,
    };
    finish(app, call, meter, status.as_u16(), None);
}

/// Tokens allowed per tool call in the answer beyond its arguments: the provider also
/// counts the call's name and framing, whose format it does not publish.
const TOOL_CALL_ALLOWANCE: u64 = 24;

/// The tokens to record for a request, and how they were found.
struct Measured {
    tokens: TokenMap,
    recount: Option<Box<Recount>>,
    /// The tokens are Ciyuan's count (no final count came from the provider).
    estimated: bool,
    /// What the recount could not count exactly (its tolerance was widened for it).
    uncounted: Vec<String>,
}

/// What a request consumed: the provider's final count when it came (compared with
/// Ciyuan's own count where Ciyuan has the model's tokenizer), else Ciyuan's count of
/// the prompt and of everything delivered, with `estimator` for models whose tokenizer
/// Ciyuan does not have, and never less than what the provider reported so far.
fn measure(config: &GatewayConfig, call: &Call, meter: &mut Meter) -> Measured {
    let mut m = Measured {
        tokens: TokenMap::new(),
        recount: None,
        estimated: false,
        uncounted: Vec::new(),
    };
    if !meter.billable {
        return m;
    }
    meter.anthropic.end_tool_input(&mut meter.shown);
    let exact = call.encoding.is_some();
    let enc = call.encoding.unwrap_or(ESTIMATOR);
    let ours = recount(enc, call, &meter.shown);
    if ours.is_none() {
        tracing::error!(request = %call.request_id, encoding = enc.name(), "the recount failed: its vocabulary did not load");
    }
    let reported = meter.take_reported();
    let shown = &meter.shown;
    let thinking_in_output = call.endpoint.family() == Family::Anthropic;
    match (reported, ours) {
        (Some(r), ours) if r.complete => {
            m.tokens = r.tokens;
            let Some(ours) = ours.filter(|_| exact) else {
                return m;
            };
            // A tolerance past the count itself allows everything: saturating is exact.
            let tolerance = |provider: u64| {
                (provider.saturating_mul(config.recount_tolerance_percent) / 100)
                    .max(config.recount_tolerance_tokens)
            };
            // The provider counts reasoning inside the output unless it reports it apart.
            let our_output = if r.reasoning == 0 {
                ours.output + ours.reasoning
            } else {
                ours.output
            };
            let mut input_allowed = Some(tolerance(r.input));
            if call.info.has_media {
                m.uncounted.push("media".into());
                input_allowed = None;
            }
            if ours.tools > 0 {
                // Tool definitions reach the model in a format the provider does not
                // publish; their JSON is counted, and may differ by as much again.
                m.uncounted.push("tools".into());
                input_allowed = input_allowed.map(|a| a.saturating_add(ours.tools));
            }
            let mut output_allowed =
                (!r.audio_output && meter.complete).then(|| tolerance(r.output));
            if shown.tool_calls > 0 {
                m.uncounted.push("tool_calls".into());
                output_allowed = output_allowed.map(|a| {
                    a.saturating_add(TOOL_CALL_ALLOWANCE.saturating_mul(shown.tool_calls))
                });
            }
            if shown.redacted {
                m.uncounted.push("redacted_thinking".into());
                output_allowed = None;
            }
            let off = |provider: u64, ours: u64, allowed: Option<u64>| {
                allowed.is_some_and(|a| provider.abs_diff(ours) > a)
            };
            let flagged = off(r.input, ours.input, input_allowed)
                || off(r.output, our_output, output_allowed);
            m.recount = Some(Box::new(Recount {
                encoding: enc.name().to_string(),
                input: ours.input,
                output: our_output,
                flagged,
            }));
        }
        (interim, ours) => {
            // No final count: Ciyuan's count of what was asked and delivered stands in.
            m.estimated = true;
            let Some(ours) = ours else {
                if let Some(r) = interim {
                    m.tokens = r.tokens;
                }
                return m;
            };
            let (output, reasoning) = if thinking_in_output {
                (ours.output + ours.reasoning, 0)
            } else {
                (ours.output, ours.reasoning)
            };
            let mut output = output;
            match &interim {
                Some(r) => {
                    // The provider's input figures are exact; its output so far is a floor.
                    for t in r.tokens.iter() {
                        if t.direction != Direction::Output && t.direction != Direction::Reasoning {
                            add_tokens(
                                &mut m.tokens,
                                t.modality,
                                t.direction,
                                t.count.unsigned_abs(),
                            );
                        }
                    }
                    output = output.max(r.output);
                }
                None => add_tokens(&mut m.tokens, Modality::Text, Direction::Input, ours.input),
            }
            add_tokens(&mut m.tokens, Modality::Text, Direction::Output, output);
            add_tokens(
                &mut m.tokens,
                Modality::Text,
                Direction::Reasoning,
                reasoning,
            );
            m.recount = Some(Box::new(Recount {
                encoding: enc.name().to_string(),
                input: ours.input,
                output,
                flagged: false,
            }));
        }
    }
    m
}

/// Adds a count Ciyuan measured (bounded by the body and answer sizes) to its key.
fn add_tokens(t: &mut TokenMap, m: Modality, d: Direction, n: u64) {
    if n == 0 {
        return;
    }
    let added = i64::try_from(n).ok().map(|n| t.add(m, d, n));
    assert!(
        matches!(added, Some(Some(()))),
        "a count of delivered text fits a token map"
    );
}

/// Counts, compares and records, off the request's path.
fn finish(app: &Arc<App>, call: Call, meter: Meter, status: u16, ttft: Option<Duration>) {
    let latency = call.started.elapsed();
    // A relay dropped while the runtime shuts down has nowhere to record from.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(request = %call.request_id, "gateway usage not recorded: stopping");
        return;
    };
    let app = app.clone();
    app.gateway
        .finishing
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    rt.spawn(async move {
        let (mut call, mut meter) = (call, meter);
        let gw = &app.gateway;
        let billable = meter.billable;
        let measured = measure(&gw.config, &call, &mut meter);
        let partial = billable && (meter.failure.is_some() || measured.estimated);
        let tokens = measured.tokens;
        let flagged = measured.recount.as_ref().is_some_and(|r| r.flagged);
        let provider = &gw.config.providers[call.provider];
        // Generation speed: output over the time after the first token (for whole
        // answers, over the whole latency: the first token's time is unknown).
        let output: u64 = tokens
            .iter()
            .filter(|t| matches!(t.direction, Direction::Output | Direction::Reasoning))
            .map(|t| t.count.unsigned_abs())
            .sum();
        let generating = match (call.info.stream, ttft) {
            (true, Some(t)) => latency.saturating_sub(t),
            _ => latency,
        };
        let output_tokens_per_sec = (output > 0 && !generating.is_zero()).then(|| {
            u64::try_from(u128::from(output) * 1_000_000 / generating.as_micros().max(1))
                .unwrap_or(u64::MAX)
        });
        gw.metrics.observe(&metrics::Observation {
            upstream: &provider.name,
            model: &call.info.model,
            status,
            ttft,
            latency,
            tokens: &tokens,
            partial,
            flagged,
            output_tokens_per_sec,
        });
        let mut entry = Entry::new(
            call.at,
            call.caller.key.account.clone(),
            EntryBody::Usage(Usage {
                service: call.endpoint.service().to_string(),
                model: Some(std::mem::take(&mut call.info.model)),
                tokens,
                source: Some(ciyuan_core::GATEWAY_SOURCE.into()),
                event_id: Some(std::mem::take(&mut call.request_id)),
                definition: Some(call.endpoint.definition().to_string()),
                partial,
                quality: Some(Box::new(Quality {
                    upstream: provider.name.clone(),
                    status,
                    stream: call.info.stream,
                    ttft_us: ttft.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                    output_tokens_per_sec,
                    failure: meter.failure.map(str::to_string),
                    estimated: measured.estimated,
                    uncounted: measured.uncounted,
                })),
                recount: measured.recount,
                tier: call.info.service_tier,
                ..Usage::default()
            }),
        );
        // Priced as it is appended, on the count the provider's setting names, under
        // the rules in force until the entry holds its place in the ledger.
        let rules = app.rules_gate.clone().read_owned().await;
        let (price_incident, tiers) = app
            .rate_gateway_entry(&mut entry, provider.rate_basis)
            .await;
        let EntryBody::Usage(usage) = &entry.body else {
            unreachable!("a gateway entry is a usage entry")
        };
        let cost = usage
            .rating
            .as_ref()
            .filter(|_| billable)
            .map(|r| ciyuan_core::Money {
                amount: r.amount,
                currency: r.currency,
            });
        // Settle the reservation to what was consumed (or release it: nothing was).
        if let Some(r) = call.reservation {
            if billable {
                let tokens = &usage.tokens;
                let settled = match app.budget.settle_cost(r, tokens, cost, Timestamp::now()) {
                    Ok(settled) => settled,
                    // Expired before the request ended: count what it used anyway.
                    Err(_) => app.budget.record_cost(
                        &call.caller.key.account,
                        &call.caller.key.key_id,
                        call.session.as_deref(),
                        tokens,
                        cost,
                        call.at,
                    ),
                };
                crate::budgets::incidents(&app, settled, None).await;
            } else {
                app.budget.release(r);
            }
        }
        // The wallet pays what the entry says it cost: a `consume` posting, appended
        // beside the entry (its memo names the request).
        let charge = app.settle_hold(
            call.hold.take(),
            &call.caller.key.account,
            cost,
            usage.event_id.as_deref(),
        );
        let posting =
            charge.map(|(node, p)| Entry::new(Timestamp::now(), node, EntryBody::Posting(p)));
        // Its holds across nodes count its usage once the entry is appended (the
        // usage entry's index is what other nodes follow to).
        let settles = match call.shared.take() {
            Some(shared) if billable => Some(shared.settling(&usage.tokens, cost)),
            other => {
                app.release_across_nodes(other);
                None
            }
        };
        match tiers {
            // A tiered entry holds the tier counters' lock: appended now, not after the
            // recorder's linger, and the lock released once it holds its place.
            Some(tiers) => {
                app.record_gateway_now(entry, posting, rules, tiers, settles)
                    .await
            }
            // With its payment, in one message: both are appended together (also when
            // the recorder is behind), so they hold their places side by side when the
            // rules guard goes, and other nodes count the request's holds until they
            // have applied both.
            None => app.record_gateway(entry, posting, Some(rules), settles),
        }
        if let Some(incident) = price_incident {
            app.raise_price_incidents(vec![incident]).await;
        }
        app.gateway
            .finishing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    });
}

/// The estimator for models whose tokenizer Ciyuan does not have (admission reserves
/// with it too).
const ESTIMATOR: Encoding = Encoding::O200kBase;

/// Ciyuan's own count of a request.
struct Counted {
    /// The prompt, tool definitions included.
    input: u64,
    /// Of which tool definitions.
    tools: u64,
    /// Answer text delivered (tool call arguments included).
    output: u64,
    /// Reasoning text delivered.
    reasoning: u64,
}

/// Ciyuan's own count of the prompt and of the answer text delivered.
fn recount(enc: Encoding, call: &Call, shown: &Shown) -> Option<Counted> {
    let (input, tools) = match call.input_estimate {
        Some(e) if e.encoding == enc => (e.input, e.tools),
        _ => count_input(enc, &call.info)?,
    };
    let (output, reasoning) = if call.endpoint == Endpoint::Embeddings {
        (0, 0)
    } else {
        (
            enc.count(&shown.text).ok()? as u64,
            enc.count(&shown.reasoning).ok()? as u64,
        )
    };
    Some(Counted {
        input,
        tools,
        output,
        reasoning,
    })
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

/// The prompt's tokens as Ciyuan counts them, and how many of them are tool
/// definitions.
fn count_input(enc: Encoding, info: &RequestInfo) -> Option<(u64, u64)> {
    let input = if !info.messages.is_empty() {
        let msgs: Vec<ChatMessage<'_>> = info
            .messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role,
                content,
                name: None,
            })
            .collect();
        estimate_chat(enc, &msgs).ok()?
    } else {
        let mut n = 0;
        for p in &info.prompts {
            n += enc.count(p).ok()?;
        }
        n
    };
    let tools = if info.tools_text.is_empty() {
        0
    } else {
        enc.count(&info.tools_text).ok()?
    };
    Some(((input + tools) as u64, tools as u64))
}

#[cfg(test)]
mod tests {
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
