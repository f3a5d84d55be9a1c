//! Anthropic's Messages shapes, [`Messages`]' [`Wire`]: the request's text, the usage
//! report (cache reads and writes by lifetime), a whole answer's blocks, a stream's
//! events folded into its usage and text, the error shape.

use super::protocol::{
    Endpoint, GatewayError, MAX_REPORTED_TOKENS, Read, Reported, RequestInfo, Shown, Step, Text,
    Wire, add, chat_max_tokens, read_messages, text_of_content,
};
use super::request::Obj;
use axum::http::StatusCode;
use ciyuan_core::{Direction, Modality, TokenMap};
use serde::Deserialize;
use serde_json::Value;

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

#[derive(Deserialize)]
pub(crate) struct AnthropicAnswer<'a> {
    #[serde(default, borrow)]
    id: Text<'a>,
    #[serde(default, borrow)]
    model: Text<'a>,
    #[serde(default, borrow)]
    content: Vec<Obj<AnthropicBlock<'a>>>,
    /// Read typed in the same pass, as chat's is ([`super::openai::OpenAiAnswer`]).
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
pub(crate) struct AnthropicBlock<'a> {
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
pub(crate) fn anthropic_usage(v: &Value) -> Option<Reported> {
    AnthropicUsage::deserialize(v).ok()?.reported(true)
}

impl AnthropicAnswer<'_> {
    pub(crate) fn read(self) -> Option<Shown> {
        let mut shown = Shown::default();
        shown
            .served
            .note(self.model.as_str(), None, self.id.as_str());
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
        shown.reported = self.usage.and_then(|u| u.reported(true));
        Some(shown)
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
pub(crate) struct AnthropicStart {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    model: Option<Value>,
}

#[derive(Deserialize)]
pub(crate) struct AnthropicBlockStart {
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
pub(crate) struct AnthropicDelta {
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
        if let Some(m) = &self.message {
            let s = str_of;
            shown.served.note(s(&m.model), None, s(&m.id));
        }
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

/// The Messages dialect.
pub(crate) struct Messages;

impl Wire for Messages {
    /// The usage merged from `message_start` and `message_delta`, and a tool input
    /// being streamed.
    type Stream = AnthropicStream;

    /// Anthropic counts thinking as output.
    const THINKING_IN_OUTPUT: bool = true;

    fn read_request(
        _: Endpoint,
        obj: &serde_json::Map<String, Value>,
        info: &mut RequestInfo,
    ) -> Result<(), GatewayError> {
        info.max_tokens = chat_max_tokens(obj)?;
        // Anthropic's `metadata` names only the end user (read with `user`): no tags.
        if let Some(system) = obj.get("system") {
            let text = text_of_content(system, &mut info.media_parts);
            info.messages.push(("system".into(), text));
        }
        read_messages(obj, info)?;
        if info.max_tokens.is_none() {
            return Err(GatewayError::new(
                StatusCode::BAD_REQUEST,
                "max_tokens: required",
            ));
        }
        Ok(())
    }

    fn read_answer_typed(body: &str) -> Option<Shown> {
        serde_json::from_str::<Obj<AnthropicAnswer<'_>>>(body)
            .ok()
            .and_then(|a| a.0.read())
    }

    fn read_answer_value(v: &Value) -> Shown {
        let mut shown = Shown::default();
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        // Anthropic's answers name no fingerprint.
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        shown.served.note(s("model"), None, s("id"));
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
        shown
    }

    fn read_event(stream: &mut AnthropicStream, data: &str, shown: &mut Shown) -> Option<Read> {
        let ev = serde_json::from_str::<AnthropicEvent>(data).ok()?;
        // The usage is read out once, when the request is measured.
        Some(Read::at(if ev.apply(stream, shown) {
            Step::Done
        } else {
            Step::Going
        }))
    }

    fn stream_count(stream: &AnthropicStream) -> Option<Reported> {
        stream.reported()
    }

    fn stream_final(stream: &AnthropicStream) -> bool {
        stream.is_final()
    }

    fn end_stream(stream: &mut AnthropicStream, shown: &mut Shown) {
        stream.end_tool_input(shown);
    }

    fn error_body(e: &GatewayError) -> Value {
        let kind = match e.status.as_u16() {
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
        serde_json::json!({"type": "error", "error": {"type": kind, "message": e.message}})
    }
}

/// A field that may be of any JSON type, as a string if it is one.
fn str_of(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str)
}
