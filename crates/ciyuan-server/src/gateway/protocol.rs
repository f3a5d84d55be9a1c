//! What the gateway must know of each provider family's wire format: the endpoints,
//! the error shape its SDKs parse, the text of a request and an answer (for the
//! recount), and the usage report (for the ledger).
//!
//! Usage is mapped to disjoint token keys, so their sum is what the provider billed:
//! - OpenAI: `prompt_tokens` includes cached and audio input, `completion_tokens`
//!   includes reasoning and audio output; the parts are split out. DeepSeek reports
//!   `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` instead of details.
//! - Anthropic: `input_tokens` excludes cache reads and writes, which come as
//!   `cache_read_input_tokens` and `cache_creation_input_tokens` (split by lifetime in
//!   `cache_creation`: five-minute writes are `cache_write`, one-hour writes
//!   `cache_write_1h`); `output_tokens` includes thinking.

use super::request::Obj;
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
        let s = self.status.as_u16();
        let body = match family {
            Family::OpenAi => {
                let kind = match s {
                    401 => "invalid_request_error",
                    403 => "permission_error",
                    404 => "invalid_request_error",
                    429 => match self.code {
                        Some("insufficient_quota") => "insufficient_quota",
                        _ => "rate_limit_error",
                    },
                    400..=499 => "invalid_request_error",
                    _ => "server_error",
                };
                serde_json::json!({"error": {
                    "message": self.message, "type": kind, "param": self.param, "code": self.code,
                }})
            }
            Family::Anthropic => {
                let kind = match s {
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    408 => "timeout_error",
                    413 => "request_too_large",
                    429 => "rate_limit_error",
                    529 => "overloaded_error",
                    400..=499 => "invalid_request_error",
                    504 => "timeout_error",
                    _ => "api_error",
                };
                serde_json::json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
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

fn text_of_content(content: &Value, media: &mut u64) -> String {
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

/// Appends the arguments text of OpenAI tool calls (`[{"function": {"arguments"}}]`):
/// the model wrote them, so they are output (or, in a prompt, input) tokens.
fn push_tool_arguments(calls: &[Value], out: &mut String) {
    for call in calls {
        if let Some(a) = call
            .get("function")
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
        {
            out.push_str(a);
        }
    }
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
    if stream && endpoint == Endpoint::Embeddings {
        return Err(bad("stream: embeddings do not stream".into()));
    }
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The Responses API names its limit otherwise (read with its other fields).
    let limit_fields: &[&str] = match endpoint {
        Endpoint::Responses => &[],
        _ => &["max_completion_tokens", "max_tokens"],
    };
    let max_tokens = limit_fields
        .iter()
        .find_map(|k| obj.get(*k))
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| bad("max_tokens: must be a non-negative integer".into()))
        })
        .transpose()?;
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
        max_tokens,
        user,
        service_tier: requested_tier(obj.get("service_tier").and_then(Value::as_str)),
        ..RequestInfo::default()
    };
    match endpoint {
        Endpoint::Chat | Endpoint::Messages => {
            if endpoint == Endpoint::Messages
                && let Some(system) = obj.get("system")
            {
                let text = text_of_content(system, &mut info.media_parts);
                info.messages.push(("system".into(), text));
            }
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
            if endpoint == Endpoint::Messages && info.max_tokens.is_none() {
                return Err(bad("max_tokens: required".into()));
            }
        }
        Endpoint::Responses => super::responses::inspect(obj, &mut info)?,
        Endpoint::Completions | Endpoint::Embeddings => {
            let field = if endpoint == Endpoint::Completions {
                "prompt"
            } else {
                "input"
            };
            match obj.get(field) {
                Some(Value::String(s)) => info.prompts.push(s.clone()),
                Some(Value::Array(items)) => {
                    for it in items {
                        match it {
                            Value::String(s) => info.prompts.push(s.clone()),
                            // Token arrays: already tokens, counted as given.
                            Value::Number(_) | Value::Array(_) => info.media_parts += 1,
                            _ => return Err(bad(format!("{field}: items must be strings"))),
                        }
                    }
                }
                _ => return Err(bad(format!("{field}: required, a string or an array"))),
            }
        }
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

#[derive(Deserialize, Default)]
#[serde(default)]
struct OpenAiDetails {
    cached_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// OpenAI's `usage` object.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    /// What the provider bills in all; Gemini's OpenAI endpoint counts thinking here
    /// and nowhere else.
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<OpenAiDetails>,
    completion_tokens_details: Option<OpenAiDetails>,
    /// DeepSeek's cache split of `prompt_tokens`.
    prompt_cache_hit_tokens: Option<u64>,
    prompt_cache_miss_tokens: Option<u64>,
    /// Moonshot's cached prompt tokens (beside, or instead of, the details).
    cached_tokens: Option<u64>,
}

/// The most tokens a provider may report for one figure of one request: the ledger's
/// bound on one count ([`ciyuan_core::MAX_TOKENS_PER_KEY`]). No real request comes
/// near (a million-token context is 2^20); a larger figure is a broken report, read as
/// no report, so it can never overflow a sum downstream. Each token key is made of
/// one figure (less others), so it stays within the ledger's bound too.
pub const MAX_REPORTED_TOKENS: u64 = ciyuan_core::MAX_TOKENS_PER_KEY as u64;

/// Adds a count known to be at most a few times [`MAX_REPORTED_TOKENS`] to a key of
/// its own.
fn add(t: &mut TokenMap, m: Modality, d: Direction, n: u64) {
    if n > 0 {
        let n = i64::try_from(n);
        assert!(
            n.is_ok_and(|n| t.add(m, d, n).is_some()),
            "bounded token counts fit a token map"
        );
    }
}

impl OpenAiUsage {
    /// A report of OpenAI's figures under other names (the Responses API's).
    pub(crate) fn from_parts(
        prompt: u64,
        completion: u64,
        total: Option<u64>,
        cached: Option<u64>,
        reasoning: Option<u64>,
    ) -> OpenAiUsage {
        OpenAiUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            prompt_tokens_details: Some(OpenAiDetails {
                cached_tokens: cached,
                ..OpenAiDetails::default()
            }),
            completion_tokens_details: Some(OpenAiDetails {
                reasoning_tokens: reasoning,
                ..OpenAiDetails::default()
            }),
            ..OpenAiUsage::default()
        }
    }

    /// Maps the report onto disjoint token keys.
    ///
    /// Shapes read: OpenAI's (`*_tokens_details`), DeepSeek's cache hit/miss split,
    /// Moonshot's top-level `cached_tokens`, and Gemini's, whose `completion_tokens`
    /// leaves thinking out and `total_tokens` keeps it in: whatever `total_tokens` holds
    /// beyond prompt and completion is billed reasoning, so the keys always add up to
    /// the total the provider bills. Counts that contradict each other (more cached than
    /// prompt tokens) are clamped to the larger figure they are part of.
    pub fn reported(&self) -> Option<Reported> {
        let pd = self.prompt_tokens_details.as_ref();
        let figures = [
            Some(self.prompt_tokens),
            Some(self.completion_tokens),
            self.total_tokens,
            self.prompt_cache_hit_tokens,
            self.prompt_cache_miss_tokens,
            self.cached_tokens,
        ];
        let details = [pd, self.completion_tokens_details.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|d| [d.cached_tokens, d.audio_tokens, d.reasoning_tokens]);
        if figures
            .into_iter()
            .chain(details)
            .flatten()
            .any(|n| n > MAX_REPORTED_TOKENS)
        {
            return None;
        }
        let cd = self.completion_tokens_details.as_ref();
        let cached = self
            .prompt_cache_hit_tokens
            .or_else(|| pd.and_then(|d| d.cached_tokens))
            .or(self.cached_tokens)
            .unwrap_or(0)
            .min(self.prompt_tokens);
        let audio_in = pd.and_then(|d| d.audio_tokens).unwrap_or(0);
        let text_in = self
            .prompt_cache_miss_tokens
            .unwrap_or(self.prompt_tokens - cached)
            .saturating_sub(audio_in);
        let shown = self.prompt_tokens.saturating_add(self.completion_tokens);
        let hidden = self.total_tokens.map_or(0, |t| t.saturating_sub(shown));
        // Reasoning counted inside `completion_tokens`, unless the total shows it was
        // left out of it.
        let inner_reasoning = if hidden > 0 {
            0
        } else {
            cd.and_then(|d| d.reasoning_tokens)
                .unwrap_or(0)
                .min(self.completion_tokens)
        };
        let audio_out = cd
            .and_then(|d| d.audio_tokens)
            .unwrap_or(0)
            .min(self.completion_tokens - inner_reasoning);
        let text_out = self.completion_tokens - inner_reasoning - audio_out;
        let reasoning = inner_reasoning.saturating_add(hidden);
        let mut tokens = TokenMap::new();
        add(&mut tokens, Modality::Text, Direction::Input, text_in);
        add(&mut tokens, Modality::Text, Direction::CachedInput, cached);
        add(&mut tokens, Modality::Audio, Direction::Input, audio_in);
        add(&mut tokens, Modality::Text, Direction::Output, text_out);
        add(&mut tokens, Modality::Text, Direction::Reasoning, reasoning);
        add(&mut tokens, Modality::Audio, Direction::Output, audio_out);
        Some(Reported {
            tokens,
            input: self.prompt_tokens,
            output: text_out,
            reasoning,
            audio_output: audio_out > 0,
            complete: true,
        })
    }
}

/// Anthropic's `usage` object (`message_start` carries the input side, `message_delta`
/// the cumulative output).
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(default)]
pub struct AnthropicUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    /// The cache writes by lifetime, when the request asked for more than one.
    cache_creation: Option<CacheCreation>,
}

/// Anthropic's `usage.cache_creation`: cache writes by lifetime, priced apart.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(default)]
pub struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Takes the fields `later` reports over this one's.
    pub fn merge(&mut self, later: &AnthropicUsage) {
        let pick = |a: &mut Option<u64>, b: Option<u64>| {
            if b.is_some() {
                *a = b;
            }
        };
        pick(&mut self.input_tokens, later.input_tokens);
        pick(&mut self.output_tokens, later.output_tokens);
        pick(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        pick(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        if later.cache_creation.is_some() {
            self.cache_creation = later.cache_creation;
        }
    }

    /// Maps the report onto disjoint token keys; `complete` says whether its output
    /// count is final. `None` when a figure is out of range.
    pub fn reported(&self, complete: bool) -> Option<Reported> {
        let input = self.input_tokens.unwrap_or(0);
        // The breakdown by lifetime, where given, is what is billed (its parts sum
        // to `cache_creation_input_tokens`); without it every write is the default
        // five-minute one.
        let (write, write_1h) = match self.cache_creation {
            Some(c) => (
                c.ephemeral_5m_input_tokens.unwrap_or(0),
                c.ephemeral_1h_input_tokens.unwrap_or(0),
            ),
            None => (self.cache_creation_input_tokens.unwrap_or(0), 0),
        };
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let output = self.output_tokens.unwrap_or(0);
        if [input, write, write_1h, read, output]
            .iter()
            .any(|n| *n > MAX_REPORTED_TOKENS)
        {
            return None;
        }
        let mut tokens = TokenMap::new();
        add(&mut tokens, Modality::Text, Direction::Input, input);
        add(&mut tokens, Modality::Text, Direction::CacheWrite, write);
        add(
            &mut tokens,
            Modality::Text,
            Direction::CacheWrite1h,
            write_1h,
        );
        add(&mut tokens, Modality::Text, Direction::CachedInput, read);
        add(&mut tokens, Modality::Text, Direction::Output, output);
        Some(Reported {
            tokens,
            // Only compared with the recount: a report past u64 is far off at u64::MAX
            // too, and must not panic (or wrap to a small, plausible count).
            input: input
                .saturating_add(write)
                .saturating_add(write_1h)
                .saturating_add(read),
            output,
            reasoning: 0,
            audio_output: false,
            complete,
        })
    }

    /// Whether any figure has been reported.
    pub fn any(&self) -> bool {
        self.input_tokens.is_some()
            || self.output_tokens.is_some()
            || self.cache_creation_input_tokens.is_some()
            || self.cache_read_input_tokens.is_some()
            || self.cache_creation.is_some()
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
}

/// What a whole (not streamed) answer holds: its usage and its text.
pub fn read_answer(endpoint: Endpoint, body: &[u8]) -> Option<Shown> {
    // Answers of the usual shape are read into borrowed, typed fields (no tree of
    // values); anything else (a field of an unexpected type, a duplicate key) is read
    // the slow, forgiving way.
    // The typed reader skips the fields it does not need without checking their
    // UTF-8, which the forgiving one refuses: such a body is left to that one.
    let fast = match (endpoint.family(), std::str::from_utf8(body).is_ok()) {
        (_, false) => None,
        // Responses are read as a tree of values only.
        _ if endpoint == Endpoint::Responses => None,
        (Family::OpenAi, true) => serde_json::from_slice::<Obj<OpenAiAnswer<'_>>>(body)
            .ok()
            .map(|a| a.0.read()),
        (Family::Anthropic, true) => serde_json::from_slice::<Obj<AnthropicAnswer<'_>>>(body)
            .ok()
            .and_then(|a| a.0.read()),
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

#[derive(Deserialize)]
struct OpenAiAnswer<'a> {
    #[serde(default, borrow)]
    choices: Vec<Obj<OpenAiAnswerChoice<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct OpenAiAnswerChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Obj<OpenAiAnswerMessage<'a>>>,
    /// Legacy completions answer here.
    #[serde(default, borrow)]
    text: Text<'a>,
}

#[derive(Deserialize)]
struct OpenAiAnswerMessage<'a> {
    #[serde(default, borrow)]
    content: Text<'a>,
    /// DeepSeek, Qwen, Moonshot, GLM and Ark send the reasoning text here.
    #[serde(default, borrow)]
    reasoning_content: Text<'a>,
    /// vLLM and OpenRouter send it here.
    #[serde(default, borrow)]
    reasoning: Text<'a>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<Obj<OpenAiToolCall<'a>>>>,
}

#[derive(Deserialize)]
struct OpenAiToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<Obj<OpenAiFunctionCall<'a>>>,
}

#[derive(Deserialize)]
struct OpenAiFunctionCall<'a> {
    #[serde(default, borrow)]
    arguments: Text<'a>,
}

/// An OpenAI-shaped `usage` value, read leniently: `null`, a missing value or one of
/// another shape is no report.
fn openai_usage(v: &Value) -> Option<Reported> {
    OpenAiUsage::deserialize(v).ok()?.reported()
}

impl OpenAiAnswer<'_> {
    fn read(self) -> Shown {
        let mut shown = Shown::default();
        for Obj(c) in &self.choices {
            match &c.message {
                Some(Obj(m)) => {
                    m.content.push_to(&mut shown.text);
                    m.reasoning_content.push_to(&mut shown.reasoning);
                    m.reasoning.push_to(&mut shown.reasoning);
                    for Obj(call) in m.tool_calls.iter().flatten() {
                        shown.tool_calls += 1;
                        if let Some(Obj(f)) = &call.function {
                            f.arguments.push_to(&mut shown.text);
                        }
                    }
                }
                None => c.text.push_to(&mut shown.text),
            }
        }
        shown.reported = self
            .usage
            .and_then(|u| serde_json::from_str::<Value>(u.get()).ok())
            .and_then(|u| openai_usage(&u));
        shown
    }
}

#[derive(Deserialize)]
struct AnthropicAnswer<'a> {
    #[serde(default, borrow)]
    content: Vec<Obj<AnthropicBlock<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct AnthropicBlock<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Text<'a>,
    #[serde(default, borrow)]
    text: Text<'a>,
    #[serde(default, borrow)]
    thinking: Text<'a>,
    #[serde(default, borrow)]
    input: Option<&'a serde_json::value::RawValue>,
}

/// Anthropic's `usage` value, read leniently.
fn anthropic_usage(v: &Value) -> Option<Reported> {
    AnthropicUsage::deserialize(v).ok()?.reported(true)
}

impl AnthropicAnswer<'_> {
    fn read(self) -> Option<Shown> {
        let mut shown = Shown::default();
        for Obj(b) in &self.content {
            match b.kind.as_str() {
                Some("text") => b.text.push_to(&mut shown.text),
                Some("thinking") => b.thinking.push_to(&mut shown.reasoning),
                Some("redacted_thinking") => shown.redacted = true,
                Some("tool_use") => {
                    shown.tool_calls += 1;
                    if let Some(i) = b.input {
                        // As the slow path writes it: compact JSON.
                        shown
                            .text
                            .push_str(&serde_json::from_str::<Value>(i.get()).ok()?.to_string());
                    }
                }
                _ => {}
            }
        }
        shown.reported = self
            .usage
            .and_then(|u| serde_json::from_str::<Value>(u.get()).ok())
            .and_then(|u| anthropic_usage(&u));
        Some(shown)
    }
}

/// [`read_answer`] for any JSON: fields of unexpected types are passed over.
pub(crate) fn read_answer_value(endpoint: Endpoint, body: &[u8]) -> Option<Shown> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let mut shown = Shown::default();
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    if endpoint == Endpoint::Responses {
        return Some(super::responses::read_answer(&v));
    }
    match endpoint.family() {
        Family::OpenAi => {
            if let Some(Value::Array(choices)) = v.get("choices") {
                for c in choices {
                    if let Some(m) = c.get("message") {
                        shown
                            .text
                            .push_str(&str_of(m, "content").unwrap_or_default());
                        for field in ["reasoning_content", "reasoning"] {
                            shown
                                .reasoning
                                .push_str(&str_of(m, field).unwrap_or_default());
                        }
                        if let Some(Value::Array(calls)) = m.get("tool_calls") {
                            shown.tool_calls += calls.len() as u64;
                            push_tool_arguments(calls, &mut shown.text);
                        }
                    } else if let Some(t) = str_of(c, "text") {
                        shown.text.push_str(&t);
                    }
                }
            }
            shown.reported = v.get("usage").and_then(openai_usage);
        }
        Family::Anthropic => {
            if let Some(Value::Array(blocks)) = v.get("content") {
                for b in blocks {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => shown.text.push_str(&str_of(b, "text").unwrap_or_default()),
                        Some("thinking") => shown
                            .reasoning
                            .push_str(&str_of(b, "thinking").unwrap_or_default()),
                        Some("redacted_thinking") => shown.redacted = true,
                        Some("tool_use") => {
                            shown.tool_calls += 1;
                            // A null input is no input, as the typed reader reads it.
                            if let Some(i) = b.get("input").filter(|i| !i.is_null()) {
                                shown.text.push_str(&i.to_string());
                            }
                        }
                        _ => {}
                    }
                }
            }
            shown.reported = v.get("usage").and_then(anthropic_usage);
        }
    }
    Some(shown)
}

/// One streamed OpenAI chunk, as much of it as metering needs.
#[derive(Deserialize)]
pub struct OpenAiChunk {
    #[serde(default)]
    choices: Vec<OpenAiChoice>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    #[serde(default)]
    delta: Option<OpenAiDelta>,
    /// Legacy completions stream text here.
    #[serde(default)]
    text: Option<Value>,
    /// Moonshot (Kimi) reports a stream's usage inside its last choice.
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct OpenAiDelta {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

impl OpenAiChunk {
    /// Folds the chunk's text, reasoning and tool calls into `shown`.
    pub fn text_into(&self, shown: &mut Shown) {
        for c in &self.choices {
            if let Some(d) = &c.delta {
                if let Some(Value::String(t)) = &d.content {
                    shown.text.push_str(t);
                }
                for r in [&d.reasoning_content, &d.reasoning] {
                    if let Some(Value::String(t)) = r {
                        shown.reasoning.push_str(t);
                    }
                }
                if let Some(calls) = &d.tool_calls {
                    // A call's first delta carries its id; later ones only more
                    // arguments.
                    shown.tool_calls +=
                        calls.iter().filter(|c| c.get("id").is_some()).count() as u64;
                    push_tool_arguments(calls, &mut shown.text);
                }
            }
            if let Some(Value::String(t)) = &c.text {
                shown.text.push_str(t);
            }
        }
    }

    /// Whether this is the extra chunk that only carries usage (`choices` empty).
    pub fn is_usage_only(&self) -> bool {
        self.choices.is_empty() && self.usage.as_ref().is_some_and(|u| !u.is_null())
    }

    /// The usage the chunk reports, if any: at the top (OpenAI, DeepSeek, Qwen, GLM,
    /// Ark, Gemini) or in a choice (Moonshot).
    pub fn usage(&self) -> Option<Reported> {
        let top = self.usage.as_ref().filter(|u| !u.is_null());
        let in_choice = || {
            self.choices
                .iter()
                .find_map(|c| c.usage.as_ref().filter(|u| !u.is_null()))
        };
        openai_usage(top.or_else(in_choice)?)
    }
}

/// One streamed Anthropic event, as much of it as metering needs.
#[derive(Deserialize)]
pub struct AnthropicEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<AnthropicStart>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default)]
    delta: Option<AnthropicDelta>,
    #[serde(default)]
    content_block: Option<AnthropicBlockStart>,
}

#[derive(Deserialize)]
struct AnthropicStart {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct AnthropicBlockStart {
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct AnthropicDelta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
}

/// A streamed Anthropic answer as it has been folded so far.
#[derive(Default)]
pub struct AnthropicStream {
    usage: AnthropicUsage,
    /// A `message_delta` brought the final output count.
    final_usage: bool,
    /// The tool input being streamed (`input_json_delta` pieces), written out compact
    /// when its block ends, as a whole answer's `input` is.
    tool_input: Option<String>,
}

impl AnthropicStream {
    /// Whether `message_delta` brought the final output count.
    pub fn is_final(&self) -> bool {
        self.final_usage
    }

    /// The usage reported so far, marked final once `message_delta` carried it.
    pub fn reported(&self) -> Option<Reported> {
        if !self.usage.any() {
            return None;
        }
        self.usage.reported(self.final_usage)
    }
}

impl AnthropicEvent {
    /// Folds the event into the stream's usage and `shown`; true at `message_stop`.
    pub fn apply(&self, stream: &mut AnthropicStream, shown: &mut Shown) -> bool {
        if let Some(u) = self.message.as_ref().and_then(|m| m.usage.as_ref()) {
            stream.usage.merge(u);
        }
        if let Some(u) = &self.usage {
            stream.usage.merge(u);
            if self.kind == "message_delta" && u.output_tokens.is_some() {
                stream.final_usage = true;
            }
        }
        match self.kind.as_str() {
            "content_block_start" => match self.content_block.as_ref().map(|b| b.kind.as_str()) {
                Some("tool_use") => {
                    shown.tool_calls += 1;
                    stream.tool_input = Some(String::new());
                }
                Some("redacted_thinking") => shown.redacted = true,
                _ => {}
            },
            "content_block_delta" => {
                if let Some(d) = &self.delta {
                    if let Some(t) = &d.text {
                        shown.text.push_str(t);
                    }
                    if let Some(t) = &d.thinking {
                        shown.reasoning.push_str(t);
                    }
                    if let Some(j) = &d.partial_json {
                        match &mut stream.tool_input {
                            Some(input) => input.push_str(j),
                            None => shown.text.push_str(j),
                        }
                    }
                }
            }
            "content_block_stop" => stream.end_tool_input(shown),
            _ => {}
        }
        self.kind == "message_stop"
    }
}

impl AnthropicStream {
    /// Writes a finished (or, at a cut, unfinished) tool input into `shown`: compact
    /// when it parses, as delivered when it does not.
    pub fn end_tool_input(&mut self, shown: &mut Shown) {
        if let Some(input) = self.tool_input.take() {
            // A tool called without arguments streams no JSON at all: its input is `{}`.
            if input.trim().is_empty() {
                shown.text.push_str("{}");
                return;
            }
            match serde_json::from_str::<Value>(&input) {
                Ok(v) => shown.text.push_str(&v.to_string()),
                Err(_) => shown.text.push_str(&input),
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
