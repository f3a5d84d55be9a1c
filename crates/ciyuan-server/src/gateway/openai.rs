//! OpenAI's chat, completions and embeddings shapes (and every OpenAI-compatible
//! provider's), [`Chat`]'s [`Wire`]: the request's text, the usage report in its
//! providers' variants, a whole answer's text, a stream's chunks, the error shape.

use super::protocol::{
    Endpoint, GatewayError, MAX_REPORTED_TOKENS, Read, Reported, RequestInfo, Shown, Step, Text,
    Wire, add, chat_max_tokens, metadata_pairs, read_messages,
};
use super::request::Obj;
use axum::http::StatusCode;
use ciyuan_core::{Direction, Modality, TokenMap};
use serde::Deserialize;
use serde_json::Value;

/// Appends the arguments text of OpenAI tool calls (`[{"function": {"arguments"}}]`):
/// the model wrote them, so they are output (or, in a prompt, input) tokens.
pub(crate) fn push_tool_arguments(calls: &[Value], out: &mut String) {
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

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct OpenAiDetails {
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

#[derive(Deserialize)]
pub(crate) struct OpenAiAnswer<'a> {
    #[serde(default, borrow)]
    id: Text<'a>,
    #[serde(default, borrow)]
    model: Text<'a>,
    #[serde(default, borrow)]
    system_fingerprint: Text<'a>,
    #[serde(default, borrow)]
    choices: Vec<Obj<OpenAiAnswerChoice<'a>>>,
    /// Read typed in the same pass: a usage with a field of another type (or a
    /// repeated key) fails the whole typed read, and the forgiving one reads the
    /// answer (its usage as [`openai_usage`] reads it), as it does for any other field
    /// of the wrong type. (Read as raw JSON and again typed, the usage cost a second
    /// pass over it.)
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
pub(crate) struct OpenAiAnswerChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Obj<OpenAiAnswerMessage<'a>>>,
    /// Legacy completions answer here.
    #[serde(default, borrow)]
    text: Text<'a>,
}

#[derive(Deserialize)]
pub(crate) struct OpenAiAnswerMessage<'a> {
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
pub(crate) struct OpenAiToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<Obj<OpenAiFunctionCall<'a>>>,
}

#[derive(Deserialize)]
pub(crate) struct OpenAiFunctionCall<'a> {
    #[serde(default, borrow)]
    arguments: Text<'a>,
}

/// An OpenAI-shaped `usage` value, read leniently: `null`, a missing value or one of
/// another shape is no report.
pub(crate) fn openai_usage(v: &Value) -> Option<Reported> {
    OpenAiUsage::deserialize(v).ok()?.reported()
}

impl OpenAiAnswer<'_> {
    pub(crate) fn read(self) -> Shown {
        let mut shown = Shown::default();
        shown.served.note(
            self.model.as_str(),
            self.system_fingerprint.as_str(),
            self.id.as_str(),
        );
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
        shown.reported = self.usage.and_then(|u| u.reported());
        shown
    }
}

/// Who a streamed OpenAI chunk says served it: read from a stream's chunks only until
/// one names its model, so later chunks cost no string of it.
#[derive(Deserialize)]
pub struct OpenAiServed {
    // Any JSON: a field of another type names nothing.
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    system_fingerprint: Option<Value>,
}

impl OpenAiServed {
    /// Notes what the chunk `data` names into `shown`, while its model is unknown.
    pub fn note(data: &str, shown: &mut Shown) {
        if shown.served.model.is_some() {
            return;
        }
        if let Ok(h) = serde_json::from_str::<OpenAiServed>(data) {
            shown.served.note(
                str_of(&h.model),
                str_of(&h.system_fingerprint),
                str_of(&h.id),
            );
        }
    }
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
pub(crate) struct OpenAiChoice {
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
pub(crate) struct OpenAiDelta {
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

/// The chat completions dialect (completions and embeddings too).
pub(crate) struct Chat;

impl Wire for Chat {
    /// Everything a chunk says is folded into `shown` as it comes.
    type Stream = ();

    const USAGE_ON_REQUEST: bool = true;

    /// Newer models take `max_completion_tokens` (older ones `max_tokens`): the one
    /// the request uses.
    fn output_limit_field(obj: &serde_json::Map<String, Value>) -> &'static str {
        if obj.contains_key("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        }
    }

    fn read_request(
        endpoint: Endpoint,
        obj: &serde_json::Map<String, Value>,
        info: &mut RequestInfo,
    ) -> Result<(), GatewayError> {
        let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m);
        if info.stream && endpoint == Endpoint::Embeddings {
            return Err(bad("stream: embeddings do not stream".into()));
        }
        info.max_tokens = chat_max_tokens(obj)?;
        info.metadata = metadata_pairs(obj.get("metadata"))?;
        let field = match endpoint {
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
            _ => return read_messages(obj, info),
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
        Ok(())
    }

    fn read_answer_typed(body: &str) -> Option<Shown> {
        serde_json::from_str::<Obj<OpenAiAnswer<'_>>>(body)
            .ok()
            .map(|a| a.0.read())
    }

    fn read_answer_value(v: &Value) -> Shown {
        let mut shown = Shown::default();
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        shown.served.note_values(v);
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
        shown
    }

    fn read_event(_: &mut (), data: &str, shown: &mut Shown) -> Option<Read> {
        if data.trim() == "[DONE]" {
            return Some(Read::at(Step::Done));
        }
        let chunk = serde_json::from_str::<OpenAiChunk>(data).ok()?;
        OpenAiServed::note(data, shown);
        chunk.text_into(shown);
        if let Some(u) = chunk.usage() {
            shown.reported = Some(u);
        }
        Some(Read {
            step: Step::Going,
            usage_only: chunk.is_usage_only(),
        })
    }

    fn error_body(e: &GatewayError) -> Value {
        let kind = match e.status.as_u16() {
            401 => "invalid_request_error",
            403 => "permission_error",
            404 => "invalid_request_error",
            429 => match e.code {
                Some("insufficient_quota") => "insufficient_quota",
                _ => "rate_limit_error",
            },
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        serde_json::json!({"error": {
            "message": e.message, "type": kind, "param": e.param, "code": e.code,
        }})
    }
}

/// A field that may be of any JSON type, as a string if it is one.
fn str_of(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str)
}
