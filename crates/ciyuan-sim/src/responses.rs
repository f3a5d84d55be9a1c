//! OpenAI's Responses API (`POST /v1/responses`), streamed and not.
//!
//! Usage as the API reports it: `input_tokens` with `input_tokens_details.cached_tokens`
//! (drawn as chat's are), `output_tokens` with `output_tokens_details.reasoning_tokens`.
//! Reasoning models (`o1`, `o3`, `o4`, `gpt-5` families) think a number of hidden
//! tokens drawn from the request's hash, counted in `output_tokens` and shown only as
//! an empty reasoning item, as the API shows them without a summary; the text's tokens
//! are the tokenizer's count of the text, so a recount of what was delivered matches
//! `output_tokens - reasoning_tokens`.

use crate::answer::{self, Rng, Want, is_cjk};
use crate::common::{
    Ctx, Failure, Proto, Sim, answer_json, authorize, begin, cached_tokens, compute, content_text,
    encoding, json_str, model_of, now_secs, positive, request_hash, served_model, text_failure,
};
use crate::sse::{self, Plan};
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use ciyuan_measure::text::{ChatMessage, estimate_chat};
use serde_json::{Value, json};
use std::sync::Arc;

/// Inputs larger than this are counted off the async workers.
const HEAVY_BYTES: usize = 32 << 10;
/// Forced answers longer than this are generated off the async workers.
const HEAVY_TOKENS: usize = 4096;

/// `POST /v1/responses`.
pub(crate) async fn responses(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (ctx, body) = match begin(&sim, Proto::OpenAi, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match respond(&sim, ctx, body).await {
        Ok(r) => r,
        Err(f) => f.respond(Proto::OpenAi),
    }
}

/// `GET /v1/responses/{id}`: a kept response, as it ended.
pub(crate) async fn retrieve(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    kept(&sim, &headers, &id, |v| Json(v.clone()).into_response())
}

/// `GET /v1/responses/{id}/input_items`: the simulator keeps no input, so an empty
/// list of a kept response.
pub(crate) async fn input_items(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    kept(&sim, &headers, &id, |_| {
        Json(json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}))
            .into_response()
    })
}

/// `POST /v1/responses/{id}/cancel`: only background responses can be cancelled, and
/// the simulator makes none.
pub(crate) async fn cancel(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    kept(&sim, &headers, &id, |_| {
        Failure::BadRequest("Only background responses can be cancelled.".into(), None)
            .respond(Proto::OpenAi)
    })
}

/// `DELETE /v1/responses/{id}`.
pub(crate) async fn delete(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(f) = authorize(&sim.cfg, Proto::OpenAi, &headers) {
        return f.respond(Proto::OpenAi);
    }
    let removed = sim
        .stored
        .lock()
        .map(|mut s| s.remove(&id))
        .unwrap_or(false);
    if removed {
        Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
    } else {
        not_kept(&id)
    }
}

/// Answers with `then` of the response kept under `id`, or as the API does when there
/// is none.
fn kept(
    sim: &Sim,
    headers: &HeaderMap,
    id: &str,
    then: impl FnOnce(&Value) -> Response,
) -> Response {
    if let Err(f) = authorize(&sim.cfg, Proto::OpenAi, headers) {
        return f.respond(Proto::OpenAi);
    }
    let Ok(stored) = sim.stored.lock() else {
        return Failure::Internal("the simulator's store is poisoned".into())
            .respond(Proto::OpenAi);
    };
    match stored.get(id) {
        Some(v) => then(v),
        None => not_kept(id),
    }
}

fn not_kept(id: &str) -> Response {
    Failure::NotFound(format!("Response with id '{id}' not found.")).respond(Proto::OpenAi)
}

/// Whether `model` thinks before it answers.
fn reasons(model: &str) -> bool {
    let bare = model.rsplit('/').next().unwrap_or(model);
    ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|p| bare.starts_with(p))
}

/// The request's messages as (role, text): `instructions` first, then `input` (a
/// string, or items whose text is counted: messages, function calls and their output).
fn messages(body: &Value) -> Result<Vec<(String, String)>, Failure> {
    let bad = |m: &str| Failure::BadRequest(m.into(), Some("input"));
    let mut msgs = Vec::new();
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => msgs.push(("developer".to_string(), s.clone())),
        Some(_) => {
            return Err(Failure::BadRequest(
                "Invalid type for 'instructions': expected a string.".into(),
                Some("instructions"),
            ));
        }
    }
    match body.get("input") {
        Some(Value::String(s)) => msgs.push(("user".into(), s.clone())),
        Some(Value::Array(items)) if !items.is_empty() => {
            for item in items {
                let mut text = String::new();
                let role = match item.get("type").and_then(Value::as_str) {
                    None | Some("message") => {
                        let role = item
                            .get("role")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad("Invalid 'input': each message needs a 'role'."))?;
                        if let Some(c) = item.get("content") {
                            content_text(c, &mut text);
                        }
                        role
                    }
                    Some("function_call") => {
                        for k in ["name", "arguments"] {
                            text.push_str(item.get(k).and_then(Value::as_str).unwrap_or(""));
                        }
                        "assistant"
                    }
                    Some("function_call_output") => {
                        text.push_str(item.get("output").and_then(Value::as_str).unwrap_or(""));
                        "tool"
                    }
                    Some(_) => continue,
                };
                msgs.push((role.to_string(), text));
            }
        }
        _ => {
            return Err(bad(
                "Invalid 'input': expected a string or a non-empty array of input items.",
            ));
        }
    }
    Ok(msgs)
}

async fn respond(sim: &Sim, ctx: Ctx, body: Value) -> Result<Response, Failure> {
    let model = model_of(&body)?;
    let msgs = messages(&body)?;
    let cap = positive(&body, "max_output_tokens")?;
    let thinks = reasons(&model);
    let bytes: usize = msgs.iter().map(|m| m.1.len()).sum();
    let heavy = bytes > HEAVY_BYTES || ctx.forced.is_some_and(|n| n > HEAVY_TOKENS);
    let (forced, seed, m2) = (ctx.forced, ctx.seed, model.clone());
    let (prompt, out, reasoning, hash) = compute(heavy, move || {
        let enc = encoding(&m2);
        let chat: Vec<ChatMessage<'_>> = msgs
            .iter()
            .map(|(role, content)| ChatMessage {
                role,
                content,
                name: None,
            })
            .collect();
        let prompt = estimate_chat(enc, &chat).map_err(text_failure)?;
        let zh = msgs.iter().any(|m| m.1.chars().any(is_cjk));
        let hash = request_hash(
            seed ^ 0x5E5,
            std::iter::once(m2.as_str()).chain(msgs.iter().map(|m| m.1.as_str())),
        );
        // Thinking comes first and takes its share of the limit; the text gets the rest.
        let mut reasoning = if thinks {
            16 + (hash >> 11) as usize % 112
        } else {
            0
        };
        if let Some(c) = cap {
            reasoning = reasoning.min(c / 2);
        }
        let want = Want {
            cap: cap.map(|c| c - reasoning),
            forced,
            zh,
        };
        let out = answer::generate(enc, &mut Rng::new(hash), want).map_err(text_failure)?;
        Ok((prompt, out, reasoning, hash))
    })
    .await?;
    let cached = cached_tokens(prompt, hash);
    let id = ctx.id("resp_");
    let msg_id = ctx.id("msg_");
    let rs_id = ctx.id("rs_");
    let created = now_secs();
    let output_tokens = out.tokens + reasoning;
    let usage = json!({
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output_tokens
    });
    let reasoning_item = json!({"id": rs_id, "type": "reasoning", "summary": []});
    let message = |status: &str, text: Option<&str>| {
        let content = match text {
            Some(t) => {
                json!([{"type": "output_text", "annotations": [], "logprobs": [], "text": t}])
            }
            None => json!([]),
        };
        json!({"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"})
    };
    // The response object, as `response.created` shows it and as it ends.
    let object = |status: &str, output: Vec<Value>, usage: Value| {
        json!({
            "id": id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": cap,
            "max_tool_calls": null,
            "model": served_model(&model),
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": body.get("previous_response_id").cloned().unwrap_or(Value::Null),
            "reasoning": {"effort": if thinks { json!("medium") } else { Value::Null }, "summary": null},
            "service_tier": "default",
            "store": body.get("store").and_then(Value::as_bool).unwrap_or(true),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": body.get("tools").cloned().unwrap_or_else(|| json!([])),
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": body.get("metadata").cloned().unwrap_or_else(|| json!({}))
        })
    };
    let status = if out.hit_limit {
        "incomplete"
    } else {
        "completed"
    };
    let mut output = Vec::with_capacity(2);
    if thinks {
        output.push(reasoning_item.clone());
    }
    output.push(message(status, Some(&out.text)));
    let last_usage = if ctx.usage() {
        usage.clone()
    } else {
        Value::Null
    };
    let whole = object(status, output.clone(), last_usage);
    // Kept as it ended, with its usage (the API shows usage on retrieval), unless the
    // request said `store: false`. A cut stream's response is kept too: the API keeps
    // what it generated whether or not the client read it.
    if body.get("store").and_then(Value::as_bool) != Some(false)
        && let Ok(mut stored) = sim.stored.lock()
    {
        stored.keep(id.clone(), object(status, output, usage));
    }
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let mut v = whole;
        ctx.strip_usage(&mut v);
        return Ok(answer_json(&ctx, v.to_string().into_bytes(), output_tokens).await);
    }
    let mut seq: u64 = 0;
    let msg_index = usize::from(thinks);
    let mut head = String::new();
    head.push_str(&event(
        &mut seq,
        "response.created",
        json!({"response": object("in_progress", vec![], Value::Null)}),
    ));
    head.push_str(&event(
        &mut seq,
        "response.in_progress",
        json!({"response": object("in_progress", vec![], Value::Null)}),
    ));
    if thinks {
        head.push_str(&event(
            &mut seq,
            "response.output_item.added",
            json!({"output_index": 0, "item": reasoning_item}),
        ));
        head.push_str(&event(
            &mut seq,
            "response.output_item.done",
            json!({"output_index": 0, "item": reasoning_item}),
        ));
    }
    head.push_str(&event(
        &mut seq,
        "response.output_item.added",
        json!({"output_index": msg_index, "item": message("in_progress", None)}),
    ));
    head.push_str(&event(
        &mut seq,
        "response.content_part.added",
        json!({"item_id": msg_id, "output_index": msg_index, "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
    ));
    let pieces = answer::pieces(&out.text);
    // The deltas take the numbers after the head's.
    let first_delta = seq;
    seq += pieces.len() as u64;
    let mut tail = String::new();
    tail.push_str(&event(
        &mut seq,
        "response.output_text.done",
        json!({"item_id": msg_id, "output_index": msg_index, "content_index": 0,
            "text": out.text, "logprobs": []}),
    ));
    tail.push_str(&event(
        &mut seq,
        "response.content_part.done",
        json!({"item_id": msg_id, "output_index": msg_index, "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": out.text}}),
    ));
    tail.push_str(&event(
        &mut seq,
        "response.output_item.done",
        json!({"output_index": msg_index, "item": message(status, Some(&out.text))}),
    ));
    let end = if out.hit_limit {
        "response.incomplete"
    } else {
        "response.completed"
    };
    tail.push_str(&event(&mut seq, end, json!({"response": whole})));
    let plan = Plan {
        head: head.into_bytes(),
        text: out.text,
        pieces,
        prefix: "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":".into(),
        suffix: ",\"logprobs\":[]}\n\n".into(),
        tail: tail.into_bytes(),
        numbered: Some((
            first_delta,
            format!(
                ",\"item_id\":{},\"output_index\":{msg_index},\"content_index\":0,\"delta\":",
                json_str(&msg_id)
            ),
        )),
    };
    Ok(sse::respond(&ctx, plan, &id))
}

/// One event of a stream: `data` with its `type` and the next `sequence_number`.
fn event(seq: &mut u64, kind: &str, mut data: Value) -> String {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(*seq);
    *seq += 1;
    format!("event: {kind}\ndata: {data}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_models_are_known_by_family() {
        for m in ["o3", "o4-mini", "gpt-5", "gpt-5-mini", "openai/o1"] {
            assert!(reasons(m), "{m}");
        }
        for m in ["gpt-4o", "gpt-4.1", "deepseek-chat", "omni"] {
            assert!(!reasons(m), "{m}");
        }
    }

    #[test]
    fn input_items_are_read_as_messages() {
        let body = json!({"instructions": "Be terse.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {"type": "reasoning", "id": "rs_1"}
        ]});
        let msgs = messages(&body).unwrap();
        assert_eq!(
            msgs,
            [
                ("developer".to_string(), "Be terse.".to_string()),
                ("user".into(), "hi".into()),
                ("assistant".into(), "f{}".into()),
                ("tool".into(), "42".into())
            ]
        );
        assert!(messages(&json!({"input": []})).is_err());
        assert!(messages(&json!({"input": [{"content": "x"}]})).is_err());
    }
}
