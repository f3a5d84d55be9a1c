//! OpenAI's endpoints: chat completions, legacy completions, embeddings, models.

use crate::answer::{self, Rng, Want, is_cjk};
use crate::common::{
    Ctx, Failure, Proto, Sim, answer_json, authorize, begin, cached_tokens, compute, content_text,
    encoding, json_body, json_str, model_of, now_secs, positive, request_hash, served_model,
    text_failure,
};
use crate::sse::{self, Plan};
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine;
use ciyuan_measure::text::{ChatMessage, estimate_chat};
use serde_json::{Value, json};
use std::sync::Arc;

/// The fingerprint reported as `system_fingerprint`.
const FINGERPRINT: &str = "fp_5im0c1yuan";

/// Inputs larger than this are counted off the async workers.
const HEAVY_BYTES: usize = 32 << 10;
/// Forced answers longer than this are generated off the async workers.
const HEAVY_TOKENS: usize = 4096;

/// The models `GET /v1/models` lists: (id, owner, created).
const MODELS: &[(&str, &str, u64)] = &[
    ("gpt-4o", "system", 1_715_367_049),
    ("gpt-4o-mini", "system", 1_721_172_741),
    ("gpt-4.1", "system", 1_744_316_542),
    ("gpt-4.1-mini", "system", 1_744_318_173),
    ("gpt-5", "system", 1_754_425_777),
    ("gpt-5-mini", "system", 1_754_425_928),
    ("o4-mini", "system", 1_744_225_351),
    ("gpt-3.5-turbo", "openai", 1_677_610_602),
    ("gpt-3.5-turbo-instruct", "system", 1_692_901_427),
    ("text-embedding-3-small", "system", 1_705_948_997),
    ("text-embedding-3-large", "system", 1_705_953_180),
    ("text-embedding-ada-002", "openai-internal", 1_671_217_299),
    ("deepseek-chat", "deepseek", 1_735_689_600),
    ("deepseek-reasoner", "deepseek", 1_737_331_200),
    ("qwen-plus", "qwen", 1_727_740_800),
    ("qwen3.6-plus", "qwen", 1_767_225_600),
];

/// Claude models `GET /v1/models` lists for Anthropic clients: (id, display name, created).
const CLAUDE_MODELS: &[(&str, &str, &str)] = &[
    (
        "claude-opus-4-1-20250805",
        "Claude Opus 4.1",
        "2025-08-05T00:00:00Z",
    ),
    (
        "claude-sonnet-4-5-20250929",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    (
        "claude-haiku-4-5-20251001",
        "Claude Haiku 4.5",
        "2025-10-01T00:00:00Z",
    ),
];

/// The usage object of a chat completion (with DeepSeek's cache fields for
/// `deepseek*` models).
fn chat_usage(model: &str, prompt: usize, completion: usize, cached: usize) -> Value {
    let mut u = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    });
    let bare = model.rsplit('/').next().unwrap_or(model);
    if bare.to_ascii_lowercase().starts_with("deepseek") {
        u["prompt_cache_hit_tokens"] = cached.into();
        u["prompt_cache_miss_tokens"] = (prompt - cached).into();
    }
    u
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn streams(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (ctx, body) = match begin(&sim, Proto::OpenAi, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match chat_inner(ctx, body).await {
        Ok(r) => r,
        Err(f) => f.respond(Proto::OpenAi),
    }
}

async fn chat_inner(ctx: Ctx, body: Value) -> Result<Response, Failure> {
    let model = model_of(&body)?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            Failure::BadRequest(
                "Invalid 'messages': expected a non-empty array.".into(),
                Some("messages"),
            )
        })?;
    let cap = match positive(&body, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => positive(&body, "max_tokens")?,
    };
    let mut msgs: Vec<(String, String, Option<String>)> = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Failure::BadRequest(
                    "Invalid 'messages': each message needs a 'role'.".into(),
                    Some("messages"),
                )
            })?
            .to_owned();
        let mut content = String::new();
        if let Some(c) = m.get("content") {
            content_text(c, &mut content);
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(f) = call.get("function") {
                for k in ["name", "arguments"] {
                    if let Some(s) = f.get(k).and_then(Value::as_str) {
                        content.push_str(s);
                    }
                }
            }
        }
        let name = m.get("name").and_then(Value::as_str).map(str::to_owned);
        msgs.push((role, content, name));
    }
    let bytes: usize = msgs.iter().map(|m| m.1.len()).sum();
    let heavy = bytes > HEAVY_BYTES || ctx.forced.is_some_and(|n| n > HEAVY_TOKENS);
    let (forced, seed, m2) = (ctx.forced, ctx.seed, model.clone());
    let (prompt, out, hash) = compute(heavy, move || {
        let enc = encoding(&m2);
        let chat: Vec<ChatMessage<'_>> = msgs
            .iter()
            .map(|(role, content, name)| ChatMessage {
                role,
                content,
                name: name.as_deref(),
            })
            .collect();
        let prompt = estimate_chat(enc, &chat).map_err(text_failure)?;
        let zh = msgs.iter().any(|m| m.1.chars().any(is_cjk));
        let hash = request_hash(
            seed,
            std::iter::once(m2.as_str()).chain(msgs.iter().map(|m| m.1.as_str())),
        );
        let want = Want { cap, forced, zh };
        let out = answer::generate(enc, &mut Rng::new(hash), want).map_err(text_failure)?;
        Ok((prompt, out, hash))
    })
    .await?;
    let cached = cached_tokens(prompt, hash);
    let finish = if out.hit_limit { "length" } else { "stop" };
    let id = ctx.id("chatcmpl-");
    let created = now_secs();
    let usage = chat_usage(&model, prompt, out.tokens, cached);
    if !streams(&body) {
        let mut v = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": served_model(&model),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": out.text, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": finish
            }],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT
        });
        ctx.strip_usage(&mut v);
        return Ok(answer_json(&ctx, v.to_string().into_bytes(), out.tokens).await);
    }
    let with_usage = include_usage(&body);
    let usage_null = if with_usage { ",\"usage\":null" } else { "" };
    let head_of = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"service_tier\":\"default\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage_null}}}\n\n",
            json_str(&id),
            json_str(served_model(&model)),
        )
    };
    let head = head_of(
        "{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}",
        "null",
    );
    let mut tail = head_of("{}", &json_str(finish));
    if with_usage && ctx.usage() {
        tail.push_str(&format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"service_tier\":\"default\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":[],\"usage\":{usage}}}\n\n",
            json_str(&id),
            json_str(served_model(&model)),
        ));
    }
    tail.push_str("data: [DONE]\n\n");
    let prefix = format!(
        "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"service_tier\":\"default\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":",
        json_str(&id),
        json_str(served_model(&model)),
    );
    let suffix = format!("}},\"logprobs\":null,\"finish_reason\":null}}]{usage_null}}}\n\n");
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

/// `POST /v1/completions` (legacy text completions; `max_tokens` defaults to 16 as
/// OpenAI's does). Several prompts are counted together and answered with one choice.
pub(crate) async fn completions(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (ctx, body) = match begin(&sim, Proto::OpenAi, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match completions_inner(ctx, body).await {
        Ok(r) => r,
        Err(f) => f.respond(Proto::OpenAi),
    }
}

/// Prompts: strings, or token arrays (counted by length).
fn prompts(v: Option<&Value>) -> Result<(Vec<String>, usize), Failure> {
    let bad = || {
        Failure::BadRequest(
            "Invalid 'prompt': expected a string, an array of strings, or token arrays.".into(),
            Some("prompt"),
        )
    };
    let mut texts = Vec::new();
    let mut token_count = 0;
    match v {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_u64) {
                token_count += items.len();
            } else {
                for it in items {
                    match it {
                        Value::String(s) => texts.push(s.clone()),
                        Value::Array(toks) if toks.iter().all(Value::is_u64) => {
                            token_count += toks.len()
                        }
                        _ => return Err(bad()),
                    }
                }
            }
        }
        _ => return Err(bad()),
    }
    Ok((texts, token_count))
}

async fn completions_inner(ctx: Ctx, body: Value) -> Result<Response, Failure> {
    let model = model_of(&body)?;
    let (texts, token_prompt) = prompts(body.get("prompt"))?;
    let cap = positive(&body, "max_tokens")?.or(Some(16));
    let bytes: usize = texts.iter().map(String::len).sum();
    let heavy = bytes > HEAVY_BYTES || ctx.forced.is_some_and(|n| n > HEAVY_TOKENS);
    let (forced, seed, m2) = (ctx.forced, ctx.seed, model.clone());
    let (prompt, out) = compute(heavy, move || {
        let enc = encoding(&m2);
        let mut prompt = token_prompt;
        for t in &texts {
            prompt += enc.count(t).map_err(text_failure)?;
        }
        let zh = texts.iter().any(|t| t.chars().any(is_cjk));
        let hash = request_hash(
            seed ^ 0x1E6A,
            std::iter::once(m2.as_str()).chain(texts.iter().map(String::as_str)),
        );
        let out = answer::generate(enc, &mut Rng::new(hash), Want { cap, forced, zh })
            .map_err(text_failure)?;
        Ok((prompt, out))
    })
    .await?;
    let finish = if out.hit_limit { "length" } else { "stop" };
    let id = ctx.id("cmpl-");
    let created = now_secs();
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": out.tokens,
        "total_tokens": prompt + out.tokens
    });
    if !streams(&body) {
        let mut v = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": served_model(&model),
            "choices": [{"text": out.text, "index": 0, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
            "system_fingerprint": FINGERPRINT
        });
        ctx.strip_usage(&mut v);
        return Ok(answer_json(&ctx, v.to_string().into_bytes(), out.tokens).await);
    }
    let with_usage = include_usage(&body);
    let usage_null = if with_usage { ",\"usage\":null" } else { "" };
    let (jid, jmodel) = (json_str(&id), json_str(served_model(&model)));
    let prefix = format!(
        "data: {{\"id\":{jid},\"object\":\"text_completion\",\"created\":{created},\"choices\":[{{\"text\":"
    );
    let suffix = format!(
        ",\"index\":0,\"logprobs\":null,\"finish_reason\":null}}],\"model\":{jmodel},\"system_fingerprint\":\"{FINGERPRINT}\"{usage_null}}}\n\n"
    );
    let mut tail = format!(
        "data: {{\"id\":{jid},\"object\":\"text_completion\",\"created\":{created},\"choices\":[{{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":{}}}],\"model\":{jmodel},\"system_fingerprint\":\"{FINGERPRINT}\"{usage_null}}}\n\n",
        json_str(finish)
    );
    if with_usage && ctx.usage() {
        tail.push_str(&format!(
            "data: {{\"id\":{jid},\"object\":\"text_completion\",\"created\":{created},\"choices\":[],\"model\":{jmodel},\"system_fingerprint\":\"{FINGERPRINT}\",\"usage\":{usage}}}\n\n"
        ));
    }
    tail.push_str("data: [DONE]\n\n");
    let pieces = answer::pieces(&out.text);
    let plan = Plan {
        head: Vec::new(),
        text: out.text,
        pieces,
        prefix,
        suffix,
        tail: tail.into_bytes(),
        numbered: None,
    };
    Ok(sse::respond(&ctx, plan, &id))
}

/// `POST /v1/embeddings`: unit vectors drawn from a hash of each input, so equal
/// inputs get equal vectors.
pub(crate) async fn embeddings(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (ctx, body) = match begin(&sim, Proto::OpenAi, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match embeddings_inner(ctx, body).await {
        Ok(r) => r,
        Err(f) => f.respond(Proto::OpenAi),
    }
}

async fn embeddings_inner(ctx: Ctx, body: Value) -> Result<Response, Failure> {
    let model = model_of(&body)?;
    let bad_input = || {
        Failure::BadRequest(
            "Invalid 'input': expected a non-empty string or array of non-empty strings or token arrays.".into(),
            Some("input"),
        )
    };
    // Each input: its text, or its token count if given as tokens.
    let mut inputs: Vec<Result<String, usize>> = Vec::new();
    match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => inputs.push(Ok(s.clone())),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_u64) {
                inputs.push(Err(items.len()));
            } else {
                for it in items {
                    match it {
                        Value::String(s) if !s.is_empty() => inputs.push(Ok(s.clone())),
                        Value::Array(t) if !t.is_empty() && t.iter().all(Value::is_u64) => {
                            inputs.push(Err(t.len()))
                        }
                        _ => return Err(bad_input()),
                    }
                }
            }
        }
        _ => return Err(bad_input()),
    }
    let default_dims = if model.contains("3-large") {
        3072
    } else {
        1536
    };
    let dims = match positive(&body, "dimensions")? {
        None => default_dims,
        Some(d) if d <= default_dims => d,
        Some(_) => {
            return Err(Failure::BadRequest(
                format!("Invalid 'dimensions': at most {default_dims} for this model."),
                Some("dimensions"),
            ));
        }
    };
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(Failure::BadRequest(
                "Invalid 'encoding_format': expected 'float' or 'base64'.".into(),
                Some("encoding_format"),
            ));
        }
    };
    let bytes: usize = inputs
        .iter()
        .map(|i| i.as_ref().map_or(0, String::len))
        .sum();
    let (seed, m2) = (ctx.seed, model.clone());
    let (data, prompt) = compute(bytes > HEAVY_BYTES || inputs.len() > 64, move || {
        let enc = encoding(&m2);
        let mut prompt = 0;
        let mut data = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let key = match input {
                Ok(text) => {
                    prompt += enc.count(text).map_err(text_failure)?;
                    request_hash(seed, [m2.as_str(), text.as_str()])
                }
                Err(n) => {
                    prompt += n;
                    request_hash(seed, [m2.as_str()]) ^ (*n as u64).wrapping_mul(0x9E37)
                }
            };
            let v = vector(key, dims);
            let embedding = if base64 {
                let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                Value::from(v.iter().map(|x| f64::from(*x)).collect::<Vec<f64>>())
            };
            data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
        }
        Ok((data, prompt))
    })
    .await?;
    let mut v = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}
    });
    ctx.strip_usage(&mut v);
    let mut ctx = ctx;
    ctx.interval = None;
    Ok(answer_json(&ctx, v.to_string().into_bytes(), 0).await)
}

/// A unit vector of `dims` components from `key`.
fn vector(key: u64, dims: usize) -> Vec<f32> {
    let mut rng = Rng::new(key);
    let mut v: Vec<f32> = (0..dims)
        .map(|_| (rng.unit() + rng.unit() + rng.unit() - 1.5) as f32)
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    for x in &mut v {
        *x /= norm;
    }
    v
}

/// `GET /v1/models`: OpenAI's list, or Anthropic's when `anthropic-version` is sent.
pub(crate) async fn models(State(sim): State<Arc<Sim>>, headers: HeaderMap) -> Response {
    let anthropic = headers.contains_key("anthropic-version");
    let proto = if anthropic {
        Proto::Anthropic
    } else {
        Proto::OpenAi
    };
    if let Err(f) = authorize(&sim.cfg, proto, &headers) {
        return f.respond(proto);
    }
    let v = if anthropic {
        let data: Vec<Value> = CLAUDE_MODELS
            .iter()
            .map(|(id, name, created)| {
                json!({"type": "model", "id": id, "display_name": name, "created_at": created})
            })
            .collect();
        json!({
            "data": data,
            "has_more": false,
            "first_id": CLAUDE_MODELS.first().map(|m| m.0),
            "last_id": CLAUDE_MODELS.last().map(|m| m.0)
        })
    } else {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|(id, owner, created)| {
                json!({"id": id, "object": "model", "created": created, "owned_by": owner})
            })
            .collect();
        json!({"object": "list", "data": data})
    };
    json_body(v.to_string().into_bytes())
}

/// `GET /v1/models/{id}`: any id is served (the simulator answers for every model).
pub(crate) async fn model(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(f) = authorize(&sim.cfg, Proto::OpenAi, &headers) {
        return f.respond(Proto::OpenAi);
    }
    let (owner, created) = MODELS
        .iter()
        .find(|m| m.0 == id)
        .map_or(("system", 1_700_000_000), |m| (m.1, m.2));
    json_body(
        json!({"id": id, "object": "model", "created": created, "owned_by": owner})
            .to_string()
            .into_bytes(),
    )
}
