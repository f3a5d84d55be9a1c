//! What the gateway must know of each provider family's wire format: the endpoints,
//! the error shape its SDKs parse, the text of a request and an answer (for the
//! recount), and the usage report (for the ledger).
//!
//! Each dialect is one module behind one interface, [`Wire`]: `openai.rs` (chat,
//! completions, embeddings: [`Dialect::Chat`]), `anthropic.rs` (messages:
//! [`Dialect::Messages`]) and `responses.rs` (the Responses API:
//! [`Dialect::Responses`]). What they share, and the one place that picks an
//! endpoint's dialect ([`inspect`], [`read_answer`], [`StreamState`],
//! [`GatewayError::into_response`]), is here; their public types are re-exported.
//!
//! Usage is mapped to disjoint token keys, so their sum is what the provider billed:
//! - OpenAI: `prompt_tokens` includes cached and audio input, `completion_tokens`
//!   includes reasoning and audio output; the parts are split out. DeepSeek reports
//!   `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` instead of details.
//! - Anthropic: `input_tokens` excludes cache reads and writes, which come as
//!   `cache_read_input_tokens` and `cache_creation_input_tokens` (split by lifetime in
//!   `cache_creation`: five-minute writes are `cache_write`, one-hour writes
//!   `cache_write_1h`); `output_tokens` includes thinking.

use super::anthropic::Messages;
pub use super::anthropic::{AnthropicEvent, AnthropicStream, AnthropicUsage, CacheCreation};
use super::openai::{Chat, push_tool_arguments};
pub use super::openai::{OpenAiChunk, OpenAiUsage};
use super::responses::Responses;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::{Direction, Modality, TokenMap};
use serde::Deserialize;
use serde_json::Value;

/// The two API shapes the gateway speaks to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI's (and every OpenAI-compatible provider's).
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

/// A metered endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/messages`
    Messages,
    /// `POST /v1/responses`
    Responses,
}

impl Endpoint {
    /// Every endpoint, in [`Endpoint::index`] order.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Messages,
        Endpoint::Responses,
    ];

    /// The endpoint's position in [`Endpoint::ALL`].
    pub fn index(self) -> usize {
        match self {
            Endpoint::Chat => 0,
            Endpoint::Completions => 1,
            Endpoint::Embeddings => 2,
            Endpoint::Messages => 3,
            Endpoint::Responses => 4,
        }
    }

    /// The family whose shapes the endpoint speaks.
    pub fn family(self) -> Family {
        match self {
            Endpoint::Messages => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }

    /// The path appended to a provider's base URL. OpenAI base URLs end in `/v1` (as
    /// the OpenAI SDK's do); Anthropic's do not (as the Anthropic SDK's do not).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Responses => "/responses",
        }
    }

    /// The service name recorded in the ledger.
    pub fn service(self) -> &'static str {
        match self {
            // A response is a chat turn by another API: priced as one.
            Endpoint::Chat | Endpoint::Messages | Endpoint::Responses => "llm.chat",
            Endpoint::Completions => "llm.completion",
            Endpoint::Embeddings => "llm.embedding",
        }
    }

    /// The definition (usage mapping rules and their version) recorded in the ledger.
    /// Responses' usage maps onto the token keys by chat's rules (see
    /// [`super::responses`]), so it is recorded under chat's definition.
    pub fn definition(self) -> &'static str {
        match self.family() {
            Family::OpenAi => "gateway.openai@1",
            Family::Anthropic => "gateway.anthropic@1",
        }
    }
}

/// The request and answer shapes an endpoint speaks: each is one module behind [`Wire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's chat completions, completions and embeddings (`openai.rs`).
    Chat,
    /// Anthropic's Messages API (`anthropic.rs`).
    Messages,
    /// OpenAI's Responses API (`responses.rs`).
    Responses,
}

impl Endpoint {
    /// The dialect whose module reads the endpoint's requests, answers and streams.
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => Dialect::Chat,
            Endpoint::Messages => Dialect::Messages,
            Endpoint::Responses => Dialect::Responses,
        }
    }
}

impl Dialect {
    /// [`Wire::USAGE_ON_REQUEST`] of the dialect.
    pub fn usage_on_request(self) -> bool {
        match self {
            Dialect::Chat => Chat::USAGE_ON_REQUEST,
            Dialect::Messages => Messages::USAGE_ON_REQUEST,
            Dialect::Responses => Responses::USAGE_ON_REQUEST,
        }
    }

    /// [`Wire::THINKING_IN_OUTPUT`] of the dialect.
    pub fn thinking_in_output(self) -> bool {
        match self {
            Dialect::Chat => Chat::THINKING_IN_OUTPUT,
            Dialect::Messages => Messages::THINKING_IN_OUTPUT,
            Dialect::Responses => Responses::THINKING_IN_OUTPUT,
        }
    }

    /// [`Wire::output_limit_field`] of the dialect.
    pub fn output_limit_field(self, obj: &serde_json::Map<String, Value>) -> &'static str {
        match self {
            Dialect::Chat => Chat::output_limit_field(obj),
            Dialect::Messages => Messages::output_limit_field(obj),
            Dialect::Responses => Responses::output_limit_field(obj),
        }
    }
}

/// What one dialect's module provides: how its requests are read, how its answers and
/// streams show what was consumed, and how its errors are shaped. Routing, forwarding,
/// metering and recording know nothing of any dialect's fields; a new API is a new
/// implementation and a [`Dialect`] variant.
pub(crate) trait Wire {
    /// What a stream carries from one event to the next.
    type Stream: Default;

    /// Whether a stream carries the provider's count only when the request asks for
    /// it (chat's `stream_options.include_usage`): the gateway then asks, and takes
    /// the extra chunk out again when the client did not.
    const USAGE_ON_REQUEST: bool = false;

    /// Whether the provider's output count includes thinking, instead of reporting
    /// reasoning apart from it.
    const THINKING_IN_OUTPUT: bool = false;

    /// The request field that limits output, where the gateway writes a cap.
    fn output_limit_field(_obj: &serde_json::Map<String, Value>) -> &'static str {
        "max_tokens"
    }

    /// Reads what is particular to the dialect's requests into `info` (the fields all
    /// requests share are read by [`inspect`]); the error names the field.
    fn read_request(
        endpoint: Endpoint,
        obj: &serde_json::Map<String, Value>,
        info: &mut RequestInfo,
    ) -> Result<(), GatewayError>;

    /// A whole answer of the usual shape, read into borrowed, typed fields; `None`
    /// leaves it to [`Wire::read_answer_value`]. The body is UTF-8 already checked
    /// whole: read from a `str`, serde_json does not check each string again (31
    /// checks an answer of the usual size, 3.3 k instructions).
    fn read_answer_typed(body: &str) -> Option<Shown>;

    /// A whole answer read from a tree of values; fields of unexpected types are
    /// passed over.
    fn read_answer_value(v: &Value) -> Shown;

    /// Folds the data of one streamed event into `stream` and `shown`; `None` when the
    /// event cannot be read (the meter then counts its data as delivered text).
    fn read_event(stream: &mut Self::Stream, data: &str, shown: &mut Shown) -> Option<Read>;

    /// The provider's count that the stream's events added up to, where the dialect
    /// keeps it apart from `shown` until the end.
    fn stream_count(_stream: &Self::Stream) -> Option<Reported> {
        None
    }

    /// Whether the stream's events brought the provider's final count.
    fn stream_final(_stream: &Self::Stream) -> bool {
        false
    }

    /// Writes into `shown` what the stream held back at its end (whole or cut).
    fn end_stream(_stream: &mut Self::Stream, _shown: &mut Shown) {}

    /// The error's body, in the shape the dialect's SDKs parse.
    fn error_body(error: &GatewayError) -> Value;
}

/// How a stream moved on after one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More is to come.
    Going,
    /// The stream's proper end (`[DONE]`, `message_stop`, `response.completed`).
    Done,
    /// The provider gave up (`response.failed`, `error`).
    Failed,
}

/// What one streamed event was.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    /// Where the stream stands.
    pub step: Step,
    /// The event only carries usage (OpenAI's extra chunk a client may not have asked
    /// for).
    pub usage_only: bool,
}

impl Read {
    /// An event that moved the stream to `step`, carrying more than usage.
    pub fn at(step: Step) -> Read {
        Read {
            step,
            usage_only: false,
        }
    }
}

/// A stream's state in its dialect.
pub(crate) enum StreamState {
    Chat(<Chat as Wire>::Stream),
    Messages(<Messages as Wire>::Stream),
    Responses(<Responses as Wire>::Stream),
}

impl StreamState {
    /// The state of a new stream from `endpoint`.
    // Two dialects keep no state (`()`); written alike, a dialect that comes to keep
    // some needs no change here.
    #[allow(clippy::unit_arg)]
    pub(crate) fn new(endpoint: Endpoint) -> StreamState {
        match endpoint.dialect() {
            Dialect::Chat => StreamState::Chat(Default::default()),
            Dialect::Messages => StreamState::Messages(Default::default()),
            Dialect::Responses => StreamState::Responses(Default::default()),
        }
    }

    /// [`Wire::read_event`] of the stream's dialect.
    pub(crate) fn read_event(&mut self, data: &str, shown: &mut Shown) -> Option<Read> {
        match self {
            StreamState::Chat(s) => Chat::read_event(s, data, shown),
            StreamState::Messages(s) => Messages::read_event(s, data, shown),
            StreamState::Responses(s) => Responses::read_event(s, data, shown),
        }
    }

    /// [`Wire::stream_count`] of the stream's dialect.
    pub(crate) fn count(&self) -> Option<Reported> {
        match self {
            StreamState::Chat(s) => Chat::stream_count(s),
            StreamState::Messages(s) => Messages::stream_count(s),
            StreamState::Responses(s) => Responses::stream_count(s),
        }
    }

    /// [`Wire::stream_final`] of the stream's dialect.
    pub(crate) fn is_final(&self) -> bool {
        match self {
            StreamState::Chat(s) => Chat::stream_final(s),
            StreamState::Messages(s) => Messages::stream_final(s),
            StreamState::Responses(s) => Responses::stream_final(s),
        }
    }

    /// [`Wire::end_stream`] of the stream's dialect.
    pub(crate) fn end(&mut self, shown: &mut Shown) {
        match self {
            StreamState::Chat(s) => Chat::end_stream(s, shown),
            StreamState::Messages(s) => Messages::end_stream(s, shown),
            StreamState::Responses(s) => Responses::end_stream(s, shown),
        }
    }
}

/// An error answered in the family's own shape, so SDKs raise their usual exceptions.
#[derive(Debug)]
pub struct GatewayError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `code` (`model_not_found`, `invalid_api_key`, ...), if any.
    pub code: Option<&'static str>,
    /// OpenAI's `param`: the request field at fault, if one is.
    pub param: Option<&'static str>,
    /// Seconds after which a retry may succeed.
    pub retry_after_secs: Option<u64>,
}

impl GatewayError {
    /// A new error.
    pub fn new(status: StatusCode, message: impl Into<String>) -> GatewayError {
        GatewayError {
            status,
            message: message.into(),
            code: None,
            param: None,
            retry_after_secs: None,
        }
    }

    /// With OpenAI's `param`.
    pub fn param(mut self, param: &'static str) -> GatewayError {
        self.param = Some(param);
        self
    }

    /// With OpenAI's `code`.
    pub fn code(mut self, code: &'static str) -> GatewayError {
        self.code = Some(code);
        self
    }

    /// The error as `family` answers it.
    pub fn into_response(self, family: Family) -> Response {
        let body = match family {
            Family::OpenAi => Chat::error_body(&self),
            Family::Anthropic => Messages::error_body(&self),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Both families' SDKs retry a 503 by themselves; this says it outright.
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("true"));
        }
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<crate::error::ApiError> for GatewayError {
    fn from(e: crate::error::ApiError) -> GatewayError {
        let mut g = GatewayError::new(e.status, e.detail);
        g.retry_after_secs = e.retry_after_secs;
        if e.status == StatusCode::UNAUTHORIZED {
            g.code = Some("invalid_api_key");
        }
        g
    }
}

/// What the gateway reads of a request: the model, whether it streams, and its text.
#[derive(Debug, Default, PartialEq)]
pub struct RequestInfo {
    /// The requested model.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether an OpenAI client asked for usage in the stream itself.
    pub include_usage: bool,
    /// The prompt's messages as (role, text), for the recount.
    pub messages: Vec<(String, String)>,
    /// Plain prompt texts (completions, embeddings).
    pub prompts: Vec<String>,
    /// The most output tokens the request allows, if it says.
    pub max_tokens: Option<u64>,
    /// The end user or session the request names (`user`, `metadata.user_id`).
    pub user: Option<String>,
    /// Whether the prompt holds content the recount cannot count (images, audio, files).
    pub has_media: bool,
    /// How many such parts (or pre-tokenized prompts) it holds: budgets reserve a
    /// fixed allowance for each.
    pub media_parts: u64,
    /// Tool and function definitions as JSON text: providers count them as input.
    pub tools_text: String,
    /// The service tier the request asks for (OpenAI's `service_tier`: `flex`,
    /// `priority`); `None` for the default (`auto`, `default`, absent).
    pub service_tier: Option<ciyuan_core::ServiceTier>,
    /// OpenAI's `metadata` (chat, completions, responses): string pairs recorded as
    /// attribution tags. Anthropic's `metadata` names only the end user.
    pub metadata: Vec<(String, String)>,
}

/// OpenAI's `metadata` object as tag pairs; absent or null is none. Its values are
/// strings (as OpenAI requires): anything else is refused, naming the key.
pub fn metadata_pairs(value: Option<&Value>) -> Result<Vec<(String, String)>, GatewayError> {
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m).param("metadata");
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(bad(format!(
                    "metadata.{k}: must be a string (metadata is recorded as tags)"
                ))),
            })
            .collect(),
        Some(_) => Err(bad("metadata: must be an object of strings".into())),
    }
}

/// The tier a request's `service_tier` names, as both request readers map it: a tier
/// priced apart (`flex`, `priority`, `batch`) or `None` (standard, `auto`, anything
/// else: the provider judges the value).
pub fn requested_tier(value: Option<&str>) -> Option<ciyuan_core::ServiceTier> {
    match value? {
        "flex" => Some(ciyuan_core::ServiceTier::Flex),
        "priority" => Some(ciyuan_core::ServiceTier::Priority),
        "batch" => Some(ciyuan_core::ServiceTier::Batch),
        _ => None,
    }
}

/// The text of a message's content (a string, or parts of which text, tool results
/// and tool uses are text); other parts are counted in `media`.
pub(crate) fn text_of_content(content: &Value, media: &mut u64) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text" | "input_text") => {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                        }
                    }
                    Some("tool_result") => {
                        out.push_str(&text_of_content(
                            p.get("content").unwrap_or(&Value::Null),
                            media,
                        ));
                    }
                    Some("tool_use") => {
                        if let Some(i) = p.get("input") {
                            out.push_str(&i.to_string());
                        }
                    }
                    _ => *media += 1,
                }
            }
            out
        }
        _ => String::new(),
    }
}

/// The output limit of a chat-shaped request (`max_completion_tokens`, else
/// `max_tokens`: OpenAI's chat and completions, Anthropic's messages).
pub(crate) fn chat_max_tokens(
    obj: &serde_json::Map<String, Value>,
) -> Result<Option<u64>, GatewayError> {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| obj.get(*k))
        .map(|v| {
            v.as_u64().ok_or_else(|| {
                GatewayError::new(
                    StatusCode::BAD_REQUEST,
                    "max_tokens: must be a non-negative integer",
                )
            })
        })
        .transpose()
}

/// Reads a chat-shaped `messages` array (OpenAI's chat and Anthropic's messages):
/// each message's role and text, tool call arguments included.
pub(crate) fn read_messages(
    obj: &serde_json::Map<String, Value>,
    info: &mut RequestInfo,
) -> Result<(), GatewayError> {
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m);
    let Some(Value::Array(messages)) = obj.get("messages") else {
        return Err(bad("messages: required, an array".into()));
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("messages[{i}].role: required, a string")))?;
        let mut text = text_of_content(
            m.get("content").unwrap_or(&Value::Null),
            &mut info.media_parts,
        );
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            push_tool_arguments(calls, &mut text);
        }
        info.messages.push((role.to_string(), text));
    }
    Ok(())
}

/// Reads a request body as `endpoint` defines it; the error names the field.
pub fn inspect(endpoint: Endpoint, body: &Value) -> Result<RequestInfo, GatewayError> {
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m);
    let Value::Object(obj) = body else {
        return Err(bad("the request body must be a JSON object".into()));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(bad("model: must be a non-empty string".into())),
        None => return Err(bad("model: required".into())),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream: must be a boolean".into())),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let user = obj
        .get("user")
        .and_then(Value::as_str)
        .or_else(|| {
            obj.get("metadata")
                .and_then(|m| m.get("user_id"))
                .and_then(Value::as_str)
        })
        .map(str::to_string);
    let mut info = RequestInfo {
        model,
        stream,
        include_usage,
        user,
        service_tier: requested_tier(obj.get("service_tier").and_then(Value::as_str)),
        ..RequestInfo::default()
    };
    match endpoint.dialect() {
        Dialect::Chat => Chat::read_request(endpoint, obj, &mut info)?,
        Dialect::Messages => Messages::read_request(endpoint, obj, &mut info)?,
        Dialect::Responses => Responses::read_request(endpoint, obj, &mut info)?,
    }
    for key in ["tools", "functions"] {
        if let Some(t) = obj.get(key).filter(|t| !t.is_null()) {
            info.tools_text.push_str(&t.to_string());
        }
    }
    info.has_media = info.media_parts > 0;
    Ok(info)
}

/// A provider's usage report, in token keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reported {
    /// Tokens by modality and direction, disjoint.
    pub tokens: TokenMap,
    /// Input as the provider counts it (fresh + cached + cache writes), for the recount.
    pub input: u64,
    /// Text output without reasoning, for the recount.
    pub output: u64,
    /// Reasoning tokens reported apart from the output (OpenAI's shapes; Anthropic
    /// counts thinking as output).
    pub reasoning: u64,
    /// Whether output includes audio (the text recount does not apply).
    pub audio_output: bool,
    /// Whether this is the provider's final count. Anthropic's `message_start` carries
    /// an output count of a token or two that only `message_delta` makes final.
    pub complete: bool,
}

/// The most tokens a provider may report for one figure of one request: the ledger's
/// bound on one count ([`ciyuan_core::MAX_TOKENS_PER_KEY`]). No real request comes
/// near (a million-token context is 2^20); a larger figure is a broken report, read as
/// no report, so it can never overflow a sum downstream. Each token key is made of
/// one figure (less others), so it stays within the ledger's bound too.
pub const MAX_REPORTED_TOKENS: u64 = ciyuan_core::MAX_TOKENS_PER_KEY as u64;

/// Adds a count known to be at most a few times [`MAX_REPORTED_TOKENS`] to a key of
/// its own.
pub(crate) fn add(t: &mut TokenMap, m: Modality, d: Direction, n: u64) {
    if n > 0 {
        let n = i64::try_from(n);
        assert!(
            n.is_ok_and(|n| t.add(m, d, n).is_some()),
            "bounded token counts fit a token map"
        );
    }
}

/// What an answer showed: the provider's count, and what Ciyuan can recount.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Shown {
    /// The provider's usage report, if one came (and was usable).
    pub reported: Option<Reported>,
    /// The answer's text, tool call arguments included.
    pub text: String,
    /// Reasoning or thinking text delivered (`reasoning_content`, `thinking`).
    pub reasoning: String,
    /// Tool calls in the answer: their framing is counted by the provider, not here.
    pub tool_calls: u64,
    /// Thinking came redacted (encrypted): the provider counts it, nobody else can.
    pub redacted: bool,
    /// Who the answer says served it.
    pub served: Served,
}

/// What an answer says of who served it: its `model` (the dated snapshot, where the
/// provider names one), `system_fingerprint` and `id`. The first value of each a
/// stream gives is kept.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Served {
    /// The answer's `model`.
    pub model: Option<String>,
    /// OpenAI's `system_fingerprint`.
    pub fingerprint: Option<String>,
    /// The answer's `id` (`chatcmpl-...`, `msg_...`, `resp_...`).
    pub id: Option<String>,
}

impl Served {
    /// Notes what one answer or chunk names, where nothing was noted yet.
    pub fn note(&mut self, model: Option<&str>, fingerprint: Option<&str>, id: Option<&str>) {
        for (slot, v) in [
            (&mut self.model, model),
            (&mut self.fingerprint, fingerprint),
            (&mut self.id, id),
        ] {
            if slot.is_none() {
                *slot = v.and_then(recordable).map(str::to_owned);
            }
        }
    }

    /// [`Served::note`] from an answer's fields as JSON values (strings only).
    pub fn note_values(&mut self, v: &Value) {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        self.note(s("model"), s("system_fingerprint"), s("id"));
    }
}

/// A provider's name for something, as an entry may record it: at most
/// [`super::MAX_NAME_BYTES`], no control characters (ledger text is read back).
/// Anything else names nothing the ledger can keep: not recorded.
pub fn recordable(s: &str) -> Option<&str> {
    (!s.is_empty() && s.len() <= super::MAX_NAME_BYTES && !s.chars().any(char::is_control))
        .then_some(s)
}

/// What a whole (not streamed) answer holds: its usage and its text.
pub fn read_answer(endpoint: Endpoint, body: &[u8]) -> Option<Shown> {
    // Answers of the usual shape are read into borrowed, typed fields (no tree of
    // values); anything else (a field of an unexpected type, a duplicate key) is read
    // the slow, forgiving way.
    // The forgiving reader refuses a body that is not UTF-8, which the typed one
    // would skip through in the fields it does not need: such a body is left to that
    // one. Checked once here, the typed reader reads the text without checking again.
    let fast = match (endpoint.dialect(), std::str::from_utf8(body)) {
        (_, Err(_)) => None,
        (Dialect::Chat, Ok(text)) => Chat::read_answer_typed(text),
        (Dialect::Messages, Ok(text)) => Messages::read_answer_typed(text),
        (Dialect::Responses, Ok(text)) => Responses::read_answer_typed(text),
    };
    fast.or_else(|| read_answer_value(endpoint, body))
}

/// A string field that may also be absent, null or of another type (then no text).
#[derive(Default)]
pub(crate) struct Text<'a>(Option<std::borrow::Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<Text<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Some(std::borrow::Cow::Borrowed(s))))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Some(std::borrow::Cow::Owned(s.to_owned()))))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text(Some(std::borrow::Cow::Owned(s))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_none<E>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Text<'a>, D::Error> {
                Text::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Text<'a>, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Text<'a>, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'a> Text<'a> {
    pub(crate) fn borrowed(s: &'a str) -> Text<'a> {
        Text(Some(std::borrow::Cow::Borrowed(s)))
    }

    pub(crate) fn owned(s: String) -> Text<'a> {
        Text(Some(std::borrow::Cow::Owned(s)))
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }

    pub(crate) fn push_to(&self, out: &mut String) {
        if let Some(t) = &self.0 {
            out.push_str(t);
        }
    }
}

/// [`read_answer`] for any JSON: fields of unexpected types are passed over.
pub(crate) fn read_answer_value(endpoint: Endpoint, body: &[u8]) -> Option<Shown> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(match endpoint.dialect() {
        Dialect::Chat => Chat::read_answer_value(&v),
        Dialect::Messages => Messages::read_answer_value(&v),
        Dialect::Responses => Responses::read_answer_value(&v),
    })
}

#[cfg(test)]
mod tests {
    use super::super::openai::OpenAiAnswer;
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_usage_splits_into_disjoint_keys() {
        let u: OpenAiUsage = serde_json::from_value(json!({
            "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": 0}
        }))
        .unwrap();
        let r = u.reported().unwrap();
        assert_eq!(
            serde_json::to_value(&r.tokens).unwrap(),
            json!({"text.input": 176, "text.cached_input": 1024, "text.output": 100, "text.reasoning": 200})
        );
        assert_eq!(
            r.tokens.total(),
            Some(1500),
            "the parts add up to the total"
        );
        assert_eq!((r.input, r.output), (1200, 100));
        // DeepSeek's cache fields.
        let d: OpenAiUsage = serde_json::from_value(json!({
            "prompt_tokens": 50, "completion_tokens": 7,
            "prompt_cache_hit_tokens": 32, "prompt_cache_miss_tokens": 18
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(d.reported().unwrap().tokens).unwrap(),
            json!({"text.input": 18, "text.cached_input": 32, "text.output": 7})
        );
    }

    #[test]
    fn typed_answers_read_as_the_forgiving_path_does() {
        let openai = [
            include_str!("../../testdata/openai_chat.json").to_string(),
            include_str!("../../testdata/deepseek_chat.json").to_string(),
            json!({"choices": [{"message": {"content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": 30, "completion_tokens": 12}}).to_string(),
            r#"{"choices": [{"text": "legacy \u00e9 \"escaped\" text", "index": 0}], "usage": null}"#
                .to_string(),
            json!({"object": "list", "data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 5, "total_tokens": 5}}).to_string(),
            // Shapes the typed path refuses: content as parts, a duplicate key.
            json!({"choices": [{"message": {"content": [{"type": "text", "text": "x"}]}}]}).to_string(),
            r#"{"choices": [], "choices": [{"message": {"content": "later"}}]}"#.to_string(),
            json!({"choices": "none", "usage": {"prompt_tokens": "3"}}).to_string(),
            // regression: objects given as arrays are not read in field order.
            json!({"choices": [{"message": ["read as content"]}]}).to_string(),
            json!({"choices": [["x"]], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).to_string(),
        ];
        for body in &openai {
            for ep in [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings] {
                assert_eq!(
                    read_answer(ep, body.as_bytes()),
                    read_answer_value(ep, body.as_bytes()),
                    "{body}"
                );
            }
        }
        let fast = serde_json::from_str::<OpenAiAnswer<'_>>(&openai[2])
            .unwrap()
            .read();
        assert_eq!(fast.text, "{\"city\":\"Paris\"}{}");
        assert_eq!(fast.tool_calls, 2);
        assert_eq!(fast.reported.unwrap().tokens.total(), Some(42));
        let anthropic = [
            include_str!("../../testdata/anthropic_message.json").to_string(),
            json!({"content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "a"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"b": [1, 2], "a": "x"}}],
                "usage": {"input_tokens": 7, "output_tokens": 9}}).to_string(),
            r#"{"content": [{"type": "tool_use", "input": { "spaced" : true }}]}"#.to_string(),
            json!({"content": {"type": "text"}, "usage": 3}).to_string(),
            // regression: an input of null, a block given as an array.
            json!({"content": [{"type": "tool_use", "id": "t", "name": "f", "input": null}]}).to_string(),
            json!({"content": [["text", "as an array"]], "usage": {"input_tokens": 1, "output_tokens": 1}}).to_string(),
        ];
        for body in &anthropic {
            assert_eq!(
                read_answer(Endpoint::Messages, body.as_bytes()),
                read_answer_value(Endpoint::Messages, body.as_bytes()),
                "{body}"
            );
        }
        let real = read_answer(Endpoint::Messages, anthropic[0].as_bytes()).unwrap();
        assert_eq!(real.text, "Hello! How can I help you today?");
        assert_eq!(real.reported.unwrap().tokens.total(), Some(24));
        assert!(read_answer(Endpoint::Chat, b"{not json").is_none());
        // regression: invalid UTF-8 in a field the typed reader skips is malformed for
        // both readers.
        let mut bad = br#"{"id": "x\xff", "choices": [{"message": {"content": "hi"}}]}"#.to_vec();
        let at = bad.iter().position(|b| *b == b'\\').unwrap();
        bad.splice(at..at + 4, [0xff]);
        assert!(read_answer(Endpoint::Chat, &bad).is_none());
    }

    #[test]
    fn anthropic_usage_merges_start_and_delta() {
        let mut u = AnthropicStream::default();
        let mut text = Shown::default();
        for ev in [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 25, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 1}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}),
        ] {
            let e: AnthropicEvent = serde_json::from_value(ev).unwrap();
            assert!(!e.apply(&mut u, &mut text));
        }
        let stop: AnthropicEvent = serde_json::from_value(json!({"type": "message_stop"})).unwrap();
        assert!(stop.apply(&mut u, &mut text));
        assert_eq!(text.text, "Hi");
        let r = u.reported().unwrap();
        assert!(r.complete, "message_delta's count is final");
        assert_eq!(
            serde_json::to_value(&r.tokens).unwrap(),
            json!({"text.input": 25, "text.cache_write": 10, "text.cached_input": 90, "text.output": 15})
        );
        assert_eq!(r.input, 125);
    }

    #[test]
    fn anthropic_cache_writes_by_lifetime_are_priced_apart() {
        let u: AnthropicUsage = serde_json::from_value(json!({
            "input_tokens": 5, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "output_tokens": 7}))
        .unwrap();
        let r = u.reported(true).unwrap();
        assert_eq!(
            serde_json::to_value(&r.tokens).unwrap(),
            json!({"text.input": 5, "text.cache_write": 100, "text.cache_write_1h": 200, "text.output": 7})
        );
        assert_eq!(r.input, 305);
        // Without the breakdown every write is a five-minute one.
        let u: AnthropicUsage =
            serde_json::from_value(json!({"input_tokens": 5, "cache_creation_input_tokens": 300}))
                .unwrap();
        assert_eq!(
            serde_json::to_value(&u.reported(true).unwrap().tokens).unwrap(),
            json!({"text.input": 5, "text.cache_write": 300})
        );
    }

    #[test]
    fn each_endpoint_is_read_and_answered_by_its_dialect() {
        let err =
            || GatewayError::new(StatusCode::NOT_FOUND, "no such model").code("model_not_found");
        for endpoint in Endpoint::ALL {
            let dialect = endpoint.dialect();
            // The error shape follows the family the endpoint's SDKs belong to.
            let body = match endpoint.family() {
                Family::OpenAi => Chat::error_body(&err()),
                Family::Anthropic => Messages::error_body(&err()),
            };
            let dialect_body = match dialect {
                Dialect::Chat => Chat::error_body(&err()),
                Dialect::Messages => Messages::error_body(&err()),
                Dialect::Responses => Responses::error_body(&err()),
            };
            assert_eq!(body, dialect_body, "{endpoint:?}");
            // A stream's state is its dialect's: an event of another dialect is not read.
            let mut state = StreamState::new(endpoint);
            let mut shown = Shown::default();
            let stop = r#"{"type":"message_stop"}"#;
            let read = state.read_event(stop, &mut shown);
            match dialect {
                Dialect::Messages => assert_eq!(read, Some(Read::at(Step::Done))),
                // A chat chunk of no known field reads as an empty chunk, not an end.
                Dialect::Chat => assert_eq!(read.map(|r| r.step), Some(Step::Going)),
                Dialect::Responses => assert_eq!(read.map(|r| r.step), Some(Step::Going)),
            }
        }
        assert_eq!(
            Chat::error_body(&err())["error"]["type"],
            "invalid_request_error"
        );
        assert_eq!(
            Messages::error_body(&err())["error"]["type"],
            "not_found_error"
        );
        // Only chat's streams carry usage only when asked; only Anthropic's output
        // count includes thinking; each dialect names its own output limit.
        let with_completion = json!({"max_completion_tokens": 5});
        let with_completion = with_completion.as_object().unwrap();
        let empty = serde_json::Map::new();
        for (dialect, on_request, thinking, field, field_if_completion) in [
            (
                Dialect::Chat,
                true,
                false,
                "max_tokens",
                "max_completion_tokens",
            ),
            (Dialect::Messages, false, true, "max_tokens", "max_tokens"),
            (
                Dialect::Responses,
                false,
                false,
                "max_output_tokens",
                "max_output_tokens",
            ),
        ] {
            assert_eq!(dialect.usage_on_request(), on_request, "{dialect:?}");
            assert_eq!(dialect.thinking_in_output(), thinking, "{dialect:?}");
            assert_eq!(dialect.output_limit_field(&empty), field, "{dialect:?}");
            assert_eq!(
                dialect.output_limit_field(with_completion),
                field_if_completion,
                "{dialect:?}"
            );
        }
        // Only chat's dialect ends at `[DONE]`.
        for (endpoint, done) in [
            (Endpoint::Chat, true),
            (Endpoint::Messages, false),
            (Endpoint::Responses, false),
        ] {
            let read = StreamState::new(endpoint).read_event("[DONE]", &mut Shown::default());
            assert_eq!(
                read.is_some_and(|r| r.step == Step::Done),
                done,
                "{endpoint:?}"
            );
        }
    }

    #[test]
    fn requests_are_read_with_errors_naming_the_field() {
        let info = inspect(
            Endpoint::Chat,
            &json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
                    "max_completion_tokens": 50, "user": "u1",
                    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}),
        )
        .unwrap();
        assert!(info.stream && info.include_usage && info.has_media);
        assert_eq!(
            info.media_parts, 1,
            "the image part is counted for the reservation"
        );
        assert!(
            info.tools_text.contains("\"lookup\""),
            "tool definitions count as input"
        );
        assert_eq!(info.messages, vec![("user".to_string(), "hi".to_string())]);
        assert_eq!(
            (info.max_tokens, info.user.as_deref()),
            (Some(50), Some("u1"))
        );
        for (ep, body, needle) in [
            (Endpoint::Chat, json!({"messages": []}), "model: required"),
            (Endpoint::Chat, json!({"model": 3}), "model: must be"),
            (Endpoint::Chat, json!({"model": "m"}), "messages: required"),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [{}]}),
                "messages[0].role",
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [], "stream": "yes"}),
                "stream: must be a boolean",
            ),
            (
                Endpoint::Messages,
                json!({"model": "m", "messages": []}),
                "max_tokens: required",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "m"}),
                "input: required",
            ),
            (
                Endpoint::Embeddings,
                json!({"model": "m", "input": "x", "stream": true}),
                "embeddings do not stream",
            ),
            (Endpoint::Chat, json!([1]), "JSON object"),
        ] {
            let e = inspect(ep, &body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
    }
}
