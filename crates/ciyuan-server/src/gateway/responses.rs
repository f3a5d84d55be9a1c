//! OpenAI's Responses API (`POST /v1/responses`): its request, its answer, its stream
//! of typed events, and its usage.
//!
//! Usage comes as `input_tokens` (cached input included, split out in
//! `input_tokens_details.cached_tokens`) and `output_tokens` (reasoning included, split
//! out in `output_tokens_details.reasoning_tokens`): the same figures as chat's
//! `prompt_tokens` and `completion_tokens` under other names, so they are mapped by
//! chat's reader onto the same token keys.
//!
//! A stream has no `[DONE]`: it ends with `response.completed` (or
//! `response.incomplete`, its output limit reached), both carrying the whole response
//! with its usage. `response.failed` and `error` end it as a failure: what the provider
//! counted (if `response.failed` carries usage) is billed, and the request is recorded
//! as cut, as an Anthropic stream ended by an `error` event is.

use super::openai::Chat;
use super::protocol::{
    Endpoint, GatewayError, OpenAiUsage, Read, Reported, RequestInfo, Shown, Step, Wire,
    metadata_pairs, requested_tier,
};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

/// Responses' `usage` object.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: Option<u64>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// A Responses `usage` value mapped onto token keys; `None` when it is absent, null,
/// of another shape or out of range.
pub fn usage(v: &Value) -> Option<Reported> {
    let u = Usage::deserialize(v).ok()?;
    OpenAiUsage::from_parts(
        u.input_tokens,
        u.output_tokens,
        u.total_tokens,
        u.input_tokens_details.and_then(|d| d.cached_tokens),
        u.output_tokens_details.and_then(|d| d.reasoning_tokens),
    )
    .reported()
}

/// Reads what is particular to a Responses request into `info` (the fields all OpenAI
/// requests share are read by [`super::protocol::inspect`]); the error names the field.
fn read_request(
    obj: &serde_json::Map<String, Value>,
    info: &mut RequestInfo,
) -> Result<(), GatewayError> {
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m);
    info.metadata = metadata_pairs(obj.get("metadata"))?;
    // A background response is answered `queued`, without usage, and generated (and
    // billed by the provider) after the gateway's part in the request is over: it
    // could not be metered, so it is refused rather than let through unmetered.
    match obj.get("background") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(bad(
                "background: background responses are not supported by this gateway \
                 (they could not be metered); send the request without it"
                    .into(),
            ));
        }
        Some(_) => return Err(bad("background: must be a boolean".into())),
    }
    info.max_tokens = match obj.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("max_output_tokens: must be a non-negative integer".into()))?,
        ),
    };
    info.include_usage = false;
    info.service_tier = requested_tier(obj.get("service_tier").and_then(Value::as_str));
    // `safety_identifier` replaces `user` for new clients; either names the end user.
    if info.user.is_none() {
        info.user = obj
            .get("safety_identifier")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    match obj.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => info.messages.push(("developer".into(), s.clone())),
        Some(_) => return Err(bad("instructions: must be a string".into())),
    }
    match obj.get("input") {
        Some(Value::String(s)) => info.messages.push(("user".into(), s.clone())),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                read_item(item, i, info)?;
            }
        }
        // A request may continue a stored conversation without new input.
        None | Some(Value::Null) if continues(obj) => {}
        _ => return Err(bad("input: required, a string or an array of items".into())),
    }
    // Earlier turns held by the provider (`previous_response_id`, `conversation`, a
    // stored `prompt`) are input Ciyuan cannot see: reserved like a media part, and the
    // recount's input check is widened for them.
    if continues(obj) {
        info.media_parts += 1;
    }
    Ok(())
}

/// Whether the request builds on context stored at the provider.
fn continues(obj: &serde_json::Map<String, Value>) -> bool {
    ["previous_response_id", "conversation", "prompt"]
        .iter()
        .any(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
}

/// One input item: a message (`{"role", "content"}`, `type` `message` or absent), a
/// function call or its output (their text is counted), or anything else (reasoning,
/// references to stored items, built-in tool calls: reserved as media parts).
fn read_item(item: &Value, i: usize, info: &mut RequestInfo) -> Result<(), GatewayError> {
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m);
    let Value::Object(item) = item else {
        return Err(bad(format!("input[{i}]: must be an object")));
    };
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        None | Some("message") => {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("input[{i}].role: required, a string")))?;
            let text = content_text(
                item.get("content").unwrap_or(&Value::Null),
                &mut info.media_parts,
            );
            info.messages.push((role.to_string(), text));
        }
        Some("function_call" | "custom_tool_call") => {
            let field = if kind == Some("function_call") {
                "arguments"
            } else {
                "input"
            };
            let text = item.get(field).and_then(Value::as_str).unwrap_or_default();
            info.messages.push(("assistant".into(), text.to_string()));
        }
        Some("function_call_output" | "custom_tool_call_output") => {
            let text = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => content_text(other, &mut info.media_parts),
                None => String::new(),
            };
            info.messages.push(("tool".into(), text));
        }
        Some(_) => info.media_parts += 1,
    }
    Ok(())
}

/// The text of a message's content: a string, or parts of which `input_text`,
/// `output_text` (earlier answers given back) and `refusal` are text; others (images,
/// files, audio) are media parts.
fn content_text(content: &Value, media: &mut u64) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                let text = match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => p.get("text"),
                    Some("refusal") => p.get("refusal"),
                    _ => None,
                };
                match text.and_then(Value::as_str) {
                    Some(t) => out.push_str(t),
                    None => *media += 1,
                }
            }
            out
        }
        _ => String::new(),
    }
}

/// What a whole response holds: its output's text, reasoning and function calls, and
/// its usage.
fn read_answer(v: &Value) -> Shown {
    let mut shown = Shown::default();
    shown.served.note_values(v);
    read_output(v.get("output"), &mut shown);
    shown.reported = v.get("usage").and_then(usage);
    shown
}

fn read_output(output: Option<&Value>, shown: &mut Shown) {
    let Some(Value::Array(items)) = output else {
        return;
    };
    for item in items {
        let str_of = |k: &str| item.get(k).and_then(Value::as_str);
        match str_of("type") {
            Some("message") => {
                for p in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let text = match p.get("type").and_then(Value::as_str) {
                        Some("output_text") => p.get("text"),
                        Some("refusal") => p.get("refusal"),
                        _ => None,
                    };
                    if let Some(t) = text.and_then(Value::as_str) {
                        shown.text.push_str(t);
                    }
                }
            }
            Some("reasoning") => {
                // The summary (and, from open models, the reasoning text itself) is
                // shown; the rest of the reasoning only the provider counts.
                for key in ["summary", "content"] {
                    for p in item
                        .get(key)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            shown.reasoning.push_str(t);
                        }
                    }
                }
                if item.get("encrypted_content").is_some_and(|e| !e.is_null()) {
                    shown.redacted = true;
                }
            }
            Some("function_call") => {
                shown.tool_calls += 1;
                shown.text.push_str(str_of("arguments").unwrap_or_default());
            }
            Some("custom_tool_call") => {
                shown.tool_calls += 1;
                shown.text.push_str(str_of("input").unwrap_or_default());
            }
            _ => {}
        }
    }
}

/// One streamed event, as much of it as metering needs.
#[derive(Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    delta: Option<Value>,
    #[serde(default)]
    item: Option<Value>,
    #[serde(default)]
    response: Option<Value>,
}

impl Event {
    /// Folds the event into `shown`.
    pub fn apply(&self, shown: &mut Shown) -> Step {
        // `response.created` (and every later event with the response) names it.
        if let Some(r) = &self.response {
            shown.served.note_values(r);
        }
        let delta = || match &self.delta {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        };
        match self.kind.as_str() {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta" => shown.text.push_str(delta()),
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                shown.reasoning.push_str(delta())
            }
            "response.output_item.added" => {
                let kind = self
                    .item
                    .as_ref()
                    .and_then(|i| i.get("type"))
                    .and_then(Value::as_str);
                if matches!(kind, Some("function_call" | "custom_tool_call")) {
                    shown.tool_calls += 1;
                }
            }
            "response.output_item.done"
                if self
                    .item
                    .as_ref()
                    .and_then(|i| i.get("encrypted_content"))
                    .is_some_and(|e| !e.is_null()) =>
            {
                shown.redacted = true;
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(u) = self
                    .response
                    .as_ref()
                    .and_then(|r| r.get("usage"))
                    .and_then(usage)
                {
                    shown.reported = Some(u);
                }
                return if self.kind == "response.failed" {
                    Step::Failed
                } else {
                    Step::Done
                };
            }
            "error" => return Step::Failed,
            _ => {}
        }
        Step::Going
    }
}

/// The Responses dialect.
pub(crate) struct Responses;

impl Wire for Responses {
    /// Every event is folded into `shown` as it comes; a stream always ends with its
    /// usage.
    type Stream = ();

    fn output_limit_field(_: &serde_json::Map<String, Value>) -> &'static str {
        "max_output_tokens"
    }

    fn read_request(
        _: Endpoint,
        obj: &serde_json::Map<String, Value>,
        info: &mut RequestInfo,
    ) -> Result<(), GatewayError> {
        read_request(obj, info)
    }

    /// Responses are read as a tree of values only.
    fn read_answer_typed(_: &str) -> Option<Shown> {
        None
    }

    fn read_answer_value(v: &Value) -> Shown {
        read_answer(v)
    }

    fn read_event(_: &mut (), data: &str, shown: &mut Shown) -> Option<Read> {
        let ev = serde_json::from_str::<Event>(data).ok()?;
        Some(Read::at(ev.apply(shown)))
    }

    /// OpenAI's: its SDKs raise the same exceptions for both APIs.
    fn error_body(e: &GatewayError) -> Value {
        Chat::error_body(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_maps_onto_chats_keys_cached_and_reasoning_apart() {
        let r = usage(&json!({
            "input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024},
            "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 200},
            "total_tokens": 1500
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&r.tokens).unwrap(),
            json!({"text.input": 176, "text.cached_input": 1024, "text.output": 100, "text.reasoning": 200})
        );
        assert_eq!((r.input, r.output, r.reasoning), (1200, 100, 200));
        assert!(r.complete);
        assert!(usage(&Value::Null).is_none());
        assert!(usage(&json!({"input_tokens": u64::MAX, "output_tokens": 1})).is_none());
    }

    #[test]
    fn requests_are_read_with_errors_naming_the_field() {
        let read = |mut v: Value| {
            if v.get("model").is_none() {
                v["model"] = json!("gpt-5");
            }
            super::super::protocol::inspect(super::super::protocol::Endpoint::Responses, &v)
        };
        let info = read(
            json!({"model": "gpt-4o", "instructions": "Be terse.", "input": "Hi",
            "max_output_tokens": 64, "tools": [{"type": "function", "name": "f"}]}),
        )
        .unwrap();
        assert_eq!(
            info.messages,
            [
                ("developer".to_string(), "Be terse.".to_string()),
                ("user".into(), "Hi".into())
            ]
        );
        assert_eq!(info.max_tokens, Some(64));
        assert!(info.tools_text.contains("\"f\""));
        let info = read(json!({"input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": "x"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {"type": "reasoning", "id": "rs_1", "encrypted_content": "…"}
        ], "previous_response_id": "resp_1"}))
        .unwrap();
        assert_eq!(
            info.messages
                .iter()
                .map(|m| m.1.as_str())
                .collect::<Vec<_>>(),
            ["look", "ok", "{\"a\":1}", "42"]
        );
        assert_eq!(
            info.media_parts, 3,
            "the image, the reasoning item, the stored context"
        );
        assert!(read(json!({"previous_response_id": "resp_1"})).is_ok());
        // Chat's limit fields are not the Responses API's: not read, not judged.
        let info = read(json!({"input": "x", "max_tokens": "many"})).unwrap();
        assert_eq!(info.max_tokens, None);
        for (body, needle) in [
            (json!({}), "input: required"),
            (json!({"input": 3}), "input: required"),
            (json!({"input": [3]}), "input[0]: must be an object"),
            (json!({"input": [{"content": "x"}]}), "input[0].role"),
            (
                json!({"input": "x", "instructions": 1}),
                "instructions: must be",
            ),
            (
                json!({"input": "x", "max_output_tokens": -1}),
                "max_output_tokens: must be",
            ),
            (
                json!({"input": "x", "background": true}),
                "background: background responses are not supported",
            ),
            (
                json!({"input": "x", "background": "yes"}),
                "background: must be a boolean",
            ),
        ] {
            let e = read(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
    }
}
