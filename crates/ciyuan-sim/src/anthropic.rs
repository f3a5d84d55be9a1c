//! Anthropic's Messages endpoint.

use crate::answer::{self, Rng, Want, is_cjk};
use crate::common::{
    Ctx, Failure, Proto, Sim, answer_json, begin, compute, content_text, encoding, json_body,
    model_of, positive, request_hash, served_model, text_failure,
};
use crate::sse::{self, Plan};
use axum::extract::{Request, State};
use axum::response::Response;
use ciyuan_measure::text::{ChatMessage, estimate_chat};
use serde_json::{Value, json};
use std::sync::Arc;

/// Inputs larger than this are counted off the async workers.
const HEAVY_BYTES: usize = 32 << 10;
/// Forced answers longer than this are generated off the async workers.
const HEAVY_TOKENS: usize = 4096;

/// `POST /v1/messages`.
pub(crate) async fn messages(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (ctx, body) = match begin(&sim, Proto::Anthropic, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match messages_inner(ctx, body).await {
        Ok(r) => r,
        Err(f) => f.respond(Proto::Anthropic),
    }
}

/// How a prompt splits into uncached input, cache writes and cache reads:
/// deterministic per request, for prompts of 1024 tokens or more.
fn cache_split(prompt: usize, hash: u64) -> (usize, usize, usize) {
    if prompt < 1024 {
        return (prompt, 0, 0);
    }
    let (mut write, mut read) = (0, 0);
    match (hash >> 7) % 4 {
        0 => {}
        1 => write = prompt * 3 / 4,
        q => read = prompt * q as usize / 4,
    }
    (prompt - write - read, write, read)
}

/// The prompt as (role, text): the system prompt, then the messages.
fn prompt(body: &Value) -> Result<Vec<(String, String)>, Failure> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            Failure::BadRequest("messages: at least one message is required".into(), None)
        })?;
    let mut msgs: Vec<(String, String)> = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = body.get("system") {
        let mut s = String::new();
        content_text(system, &mut s);
        msgs.push(("system".into(), s));
    }
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .filter(|r| matches!(*r, "user" | "assistant"))
            .ok_or_else(|| {
                Failure::BadRequest(
                    "messages: each message needs a role of 'user' or 'assistant'".into(),
                    None,
                )
            })?;
        let mut content = String::new();
        match m.get("content") {
            Some(c) => content_text(c, &mut content),
            None => {
                return Err(Failure::BadRequest(
                    "messages: each message needs content".into(),
                    None,
                ));
            }
        }
        msgs.push((role.to_owned(), content));
    }
    Ok(msgs)
}

/// The prompt's tokens, as `messages` counts them.
fn count(model: &str, msgs: &[(String, String)]) -> Result<usize, Failure> {
    let chat: Vec<ChatMessage<'_>> = msgs
        .iter()
        .map(|(role, content)| ChatMessage {
            role,
            content,
            name: None,
        })
        .collect();
    estimate_chat(encoding(model), &chat).map_err(text_failure)
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, the prompt counted as
/// `messages` would count it. Consumes nothing.
pub(crate) async fn count_tokens(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    // Faults asked for by header apply; pacing does not (the count is quick).
    let (_, body) = match begin(&sim, Proto::Anthropic, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let counted = model_of(&body).and_then(|model| {
        let msgs = prompt(&body)?;
        Ok((model, msgs))
    });
    let (model, msgs) = match counted {
        Ok(x) => x,
        Err(f) => return f.respond(Proto::Anthropic),
    };
    let bytes: usize = msgs.iter().map(|m| m.1.len()).sum();
    match compute(bytes > HEAVY_BYTES, move || count(&model, &msgs)).await {
        Ok(n) => json_body(json!({"input_tokens": n}).to_string().into_bytes()),
        Err(f) => f.respond(Proto::Anthropic),
    }
}

async fn messages_inner(ctx: Ctx, body: Value) -> Result<Response, Failure> {
    let model = model_of(&body)?;
    let cap = positive(&body, "max_tokens")?
        .ok_or_else(|| Failure::BadRequest("max_tokens: Field required".into(), None))?;
    let msgs = prompt(&body)?;
    let bytes: usize = msgs.iter().map(|m| m.1.len()).sum();
    let heavy = bytes > HEAVY_BYTES || ctx.forced.is_some_and(|n| n > HEAVY_TOKENS);
    let (forced, seed, m2) = (ctx.forced, ctx.seed, model.clone());
    let (prompt, out, hash) = compute(heavy, move || {
        let enc = encoding(&m2);
        let prompt = count(&m2, &msgs)?;
        let zh = msgs.iter().any(|m| m.1.chars().any(is_cjk));
        let hash = request_hash(
            seed ^ 0xA7,
            std::iter::once(m2.as_str()).chain(msgs.iter().map(|m| m.1.as_str())),
        );
        let want = Want {
            cap: Some(cap),
            forced,
            zh,
        };
        let out = answer::generate(enc, &mut Rng::new(hash), want).map_err(text_failure)?;
        Ok((prompt, out, hash))
    })
    .await?;
    let (input, write, read) = cache_split(prompt, hash);
    let stop = if out.hit_limit {
        "max_tokens"
    } else {
        "end_turn"
    };
    let id = ctx.id("msg_01");
    let usage = json!({
        "input_tokens": input,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": out.tokens,
        "service_tier": "standard"
    });
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let mut v = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": served_model(&model),
            "content": [{"type": "text", "text": out.text}],
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": usage
        });
        ctx.strip_usage(&mut v);
        return Ok(answer_json(&ctx, v.to_string().into_bytes(), out.tokens).await);
    }
    let start_usage = json!({
        "input_tokens": input,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
        "service_tier": "standard"
    });
    let start = json!({
        "type": "message_start",
        "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": served_model(&model),
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": start_usage
        }
    });
    let head = format!(
        "event: message_start\ndata: {start}\n\n\
         event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
         event: ping\ndata: {{\"type\":\"ping\"}}\n\n"
    );
    // message_delta's usage is cumulative, as the API sends it today: the input
    // figures repeat message_start's, output_tokens is the final count.
    let delta = if ctx.usage() {
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {
                "input_tokens": input,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read,
                "output_tokens": out.tokens
            }
        })
    } else {
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null}
        })
    };
    let tail = format!(
        "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
         event: message_delta\ndata: {delta}\n\n\
         event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
    );
    let prefix = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":".to_string();
    let suffix = "}}\n\n".to_string();
    let pieces = answer::pieces(&out.text);
    let plan = Plan {
        head: head.into_bytes(),
        text: out.text,
        pieces,
        prefix,
        suffix,
        tail: tail.into_bytes(),
        numbered: None,
    };
    Ok(sse::respond(&ctx, plan, &id))
}
