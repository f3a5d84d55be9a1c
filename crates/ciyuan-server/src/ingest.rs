//! `POST /v1/events`: the second door. Any AI service reports usage as CloudEvents 1.0
//! (structured mode, or the batch format); each accepted event becomes one usage entry.
//!
//! - Idempotent on `(source, id)`, across restarts: the index lives in the projections
//!   (rebuilt from the log) plus an in-memory map of events appended but not yet
//!   projected. A repeat answers the original entry and is never counted twice.
//! - A batch answers per event; bad events are rejected alone, and the good ones are
//!   appended together in one durable group, so nothing is half-written.
//! - Late events are accepted within `ingest_max_age` and land in their own period.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Direction, Entry, EntryBody, Modality, Scope, TokenMap, Usage};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// Longest `id`, `source`, `type` or model name accepted.
const MAX_ATTRIBUTE_BYTES: usize = 256;

/// The built-in definition of `llm.usage`: reported counts map one to one onto token
/// keys, as [`LLM_FIELDS`] lists.
const LLM_USAGE_DEFINITION: &str = "llm.usage@1";

/// Named usage fields of an `llm.usage` event and the token key each one feeds. They
/// are disjoint: their sum is the total.
const LLM_FIELDS: [(&str, Modality, Direction); 8] = [
    ("input_tokens", Modality::Text, Direction::Input),
    (
        "cached_input_tokens",
        Modality::Text,
        Direction::CachedInput,
    ),
    ("cache_write_tokens", Modality::Text, Direction::CacheWrite),
    ("output_tokens", Modality::Text, Direction::Output),
    ("reasoning_tokens", Modality::Text, Direction::Reasoning),
    ("audio_input_tokens", Modality::Audio, Direction::Input),
    ("audio_output_tokens", Modality::Audio, Direction::Output),
    ("image_input_tokens", Modality::Image, Direction::Input),
];

/// An event that passed validation.
struct Accepted {
    source: String,
    id: String,
    entry: Entry,
}

/// The answer for one event.
enum Outcome {
    Accepted {
        source: String,
        id: String,
        entry_id: u64,
    },
    Duplicate {
        source: String,
        id: String,
        entry_id: u64,
    },
    Rejected {
        source: Option<String>,
        id: Option<String>,
        error: ApiError,
    },
}

impl Outcome {
    fn json(&self) -> Value {
        match self {
            Outcome::Accepted {
                source,
                id,
                entry_id,
            } => {
                json!({"source": source, "id": id, "status": "accepted", "entry_id": entry_id})
            }
            Outcome::Duplicate {
                source,
                id,
                entry_id,
            } => {
                json!({"source": source, "id": id, "status": "duplicate", "entry_id": entry_id})
            }
            Outcome::Rejected { source, id, error } => json!({
                "source": source, "id": id, "status": "rejected",
                "error": {"status": error.status.as_u16(), "detail": error.detail},
            }),
        }
    }
}

/// Events appended but perhaps not yet in the projections' idempotency index.
#[derive(Default)]
pub struct Recent {
    map: HashMap<(String, String), u64>,
}

fn unprocessable(msg: String) -> ApiError {
    ApiError::unprocessable(msg)
}

fn string_attr<'a>(
    ev: &'a Map<String, Value>,
    name: &str,
    required: bool,
) -> Result<Option<&'a str>, ApiError> {
    match ev.get(name) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ApiError::bad_request(format!(
            "{name}: required attribute is missing"
        ))),
        Some(Value::String(s)) if s.is_empty() => {
            Err(ApiError::bad_request(format!("{name}: must not be empty")))
        }
        Some(Value::String(s)) if s.len() > MAX_ATTRIBUTE_BYTES => Err(ApiError::bad_request(
            format!("{name}: longer than {MAX_ATTRIBUTE_BYTES} bytes"),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name}: must be a string, got {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A token quantity: a non-negative integer that fits the ledger's counters.
fn quantity(v: &Value, field: &str) -> Result<i64, ApiError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return i64::try_from(u)
                    .map_err(|_| ApiError::bad_request(format!("{field}: {u} is too large")));
            }
            if n.as_i64().is_some() {
                return Err(ApiError::bad_request(format!(
                    "{field}: must not be negative, got {n}"
                )));
            }
            Err(ApiError::bad_request(format!(
                "{field}: must be a whole number of tokens, got {n}"
            )))
        }
        other => Err(ApiError::bad_request(format!(
            "{field}: must be an integer, got {}",
            kind(other)
        ))),
    }
}

/// Tokens of an `llm.usage` event's data.
fn llm_usage(data: &Map<String, Value>) -> Result<(String, TokenMap), ApiError> {
    let model = match data.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= MAX_ATTRIBUTE_BYTES => m.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(format!(
                "data.model: must be 1 to {MAX_ATTRIBUTE_BYTES} bytes"
            )));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "data.model: must be a string, got {}",
                kind(other)
            )));
        }
        None => return Err(ApiError::bad_request("data.model: required for llm.usage")),
    };
    let mut tokens = TokenMap::new();
    let overflow = |f: &str| ApiError::bad_request(format!("{f}: the token total overflows"));
    for (key, value) in data {
        if key == "model" {
            continue;
        }
        if let Some((_, m, d)) = LLM_FIELDS.iter().find(|(name, _, _)| name == key) {
            let field = format!("data.{key}");
            let n = quantity(value, &field)?;
            tokens.add(*m, *d, n).ok_or_else(|| overflow(&field))?;
        } else if key == "tokens" {
            let Value::Object(map) = value else {
                return Err(ApiError::bad_request(format!(
                    "data.tokens: must be an object, got {}",
                    kind(value)
                )));
            };
            for (k, v) in map {
                let field = format!("data.tokens.{k}");
                let (m, d) = k
                    .split_once('.')
                    .and_then(|(m, d)| {
                        Some((m.parse::<Modality>().ok()?, d.parse::<Direction>().ok()?))
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{field}: not a modality.direction key such as text.input"
                        ))
                    })?;
                let n = quantity(v, &field)?;
                tokens.add(m, d, n).ok_or_else(|| overflow(&field))?;
            }
        } else {
            return Err(ApiError::bad_request(format!(
                "data.{key}: unknown field for llm.usage (expected model, tokens or one of {})",
                LLM_FIELDS.map(|f| f.0).join(", ")
            )));
        }
    }
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "data: an llm.usage event must carry at least one token count",
        ));
    }
    Ok((model, tokens))
}

/// Validates one event into an entry (without touching the store).
fn validate(
    app: &App,
    caller: &Caller,
    v: &Value,
    now: Timestamp,
) -> Result<Accepted, (Option<String>, Option<String>, ApiError)> {
    let Value::Object(ev) = v else {
        return Err((
            None,
            None,
            ApiError::bad_request(format!("an event must be a JSON object, got {}", kind(v))),
        ));
    };
    let id = string_attr(ev, "id", true)
        .ok()
        .flatten()
        .map(str::to_string);
    let source = string_attr(ev, "source", true)
        .ok()
        .flatten()
        .map(str::to_string);
    let wrap = |e: ApiError| (source.clone(), id.clone(), e);
    let check = || -> Result<Accepted, ApiError> {
        match string_attr(ev, "specversion", true)? {
            Some("1.0") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "specversion: {other:?} is not supported (expected \"1.0\")"
                )));
            }
            None => unreachable_missing()?,
        }
        let id = string_attr(ev, "id", true)?.unwrap_or_default().to_string();
        let source = string_attr(ev, "source", true)?
            .unwrap_or_default()
            .to_string();
        let service = string_attr(ev, "type", true)?
            .unwrap_or_default()
            .to_string();
        let subject = string_attr(ev, "subject", true)?.unwrap_or_default();
        let account = AccountPath::parse(subject)
            .map_err(|e| ApiError::bad_request(format!("subject: {e}")))?;
        if account.is_root() {
            return Err(ApiError::bad_request(
                "subject: usage cannot land on the root account",
            ));
        }
        caller.require_within(&account)?;
        if let Some(ct) = string_attr(ev, "datacontenttype", false)?
            && !ct.eq_ignore_ascii_case("application/json")
        {
            return Err(ApiError::bad_request(format!(
                "datacontenttype: {ct:?} is not application/json"
            )));
        }
        let ts = match string_attr(ev, "time", false)? {
            Some(t) => t.parse::<Timestamp>().map_err(|e| {
                ApiError::bad_request(format!("time: {t:?} is not an RFC 3339 timestamp: {e}"))
            })?,
            None => now,
        };
        let age = now.duration_since(ts);
        let window = |d: std::time::Duration| {
            ciyuan_core::jiff::SignedDuration::try_from(d)
                .unwrap_or(ciyuan_core::jiff::SignedDuration::MAX)
        };
        if age > window(app.config.ingest_max_age) {
            return Err(unprocessable(format!(
                "time: {ts} is older than the accepted window of {}s",
                app.config.ingest_max_age.as_secs()
            )));
        }
        if -age > window(app.config.ingest_max_future) {
            return Err(unprocessable(format!(
                "time: {ts} is more than {}s in the future",
                app.config.ingest_max_future.as_secs()
            )));
        }
        let data = match ev.get("data") {
            Some(Value::Object(d)) => d,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "data: must be an object, got {}",
                    kind(other)
                )));
            }
            None => return Err(ApiError::bad_request("data: required attribute is missing")),
        };
        let (model, tokens, definition, measures) = match service.as_str() {
            "llm.usage" => {
                let (m, t) = llm_usage(data)?;
                (
                    Some(m),
                    t,
                    LLM_USAGE_DEFINITION.to_string(),
                    Default::default(),
                )
            }
            other => {
                use ciyuan_measure::MeasureError as M;
                let measured =
                    app.config
                        .definitions
                        .measure(other, ts, data)
                        .map_err(|e| match e {
                            M::BadMeasure(..) => ApiError::bad_request(e.to_string()),
                            M::UnknownService(_) => unprocessable(format!("type: {e}")),
                            _ => unprocessable(e.to_string()),
                        })?;
                let measures = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                (None, measured.tokens, measured.definition, measures)
            }
        };
        let entry = Entry::new(
            ts,
            account,
            EntryBody::Usage(Usage {
                service,
                model,
                tokens,
                source: Some(source.clone()),
                event_id: Some(id.clone()),
                definition: Some(definition),
                partial: false,
                measures,
            }),
        );
        Ok(Accepted { source, id, entry })
    };
    check().map_err(wrap)
}

fn unreachable_missing() -> Result<(), ApiError> {
    Err(ApiError::bad_request(
        "specversion: required attribute is missing",
    ))
}

/// What the body holds.
enum Mode {
    Single,
    Batch,
}

fn mode(headers: &HeaderMap, body: &Value) -> Result<Mode, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match (ct.as_str(), body) {
        ("application/cloudevents-batch+json", Value::Array(_)) => Ok(Mode::Batch),
        ("application/cloudevents-batch+json", _) => Err(ApiError::bad_request(
            "a CloudEvents batch must be a JSON array",
        )),
        ("application/cloudevents+json", Value::Object(_)) => Ok(Mode::Single),
        ("application/json", Value::Array(_)) => Ok(Mode::Batch),
        ("application/json", Value::Object(_)) => Ok(Mode::Single),
        ("application/cloudevents+json" | "application/json", _) => Err(ApiError::bad_request(
            "the body must be a CloudEvent object (or an array in batch mode)",
        )),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "expected Content-Type application/cloudevents+json or application/cloudevents-batch+json",
        )),
    }
}

pub async fn events(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Ingest)?;
    let body = body.map_err(crate::extract::body_error)?;
    let value: Value = crate::extract::parse_json(&body)?;
    let mode = mode(&headers, &value)?;
    let events: Vec<Value> = match value {
        Value::Array(a) => a,
        one => vec![one],
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("the batch holds no event"));
    }
    if events.len() > app.config.max_events_per_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "a batch holds at most {} events",
                app.config.max_events_per_batch
            ),
        ));
    }
    let outcomes = ingest(&app, &caller, &events).await?;
    match mode {
        Mode::Single => match outcomes.into_iter().next() {
            Some(Outcome::Rejected { error, .. }) => Err(error),
            Some(o @ Outcome::Accepted { .. }) => {
                Ok((StatusCode::CREATED, axum::Json(o.json())).into_response())
            }
            Some(o) => Ok((StatusCode::OK, axum::Json(o.json())).into_response()),
            None => Err(ApiError::internal("no outcome for the event")),
        },
        Mode::Batch => {
            let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
            let body = json!({
                "accepted": count(|o| matches!(o, Outcome::Accepted { .. })),
                "duplicates": count(|o| matches!(o, Outcome::Duplicate { .. })),
                "rejected": count(|o| matches!(o, Outcome::Rejected { .. })),
                "results": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
            });
            Ok((StatusCode::OK, axum::Json(body)).into_response())
        }
    }
}

async fn ingest(
    app: &Arc<App>,
    caller: &Caller,
    events: &[Value],
) -> Result<Vec<Outcome>, ApiError> {
    let now = Timestamp::now();
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
    let mut candidates: Vec<(usize, Accepted)> = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        match validate(app, caller, ev, now) {
            Ok(a) => {
                candidates.push((i, a));
                outcomes.push(None);
            }
            Err((source, id, error)) => {
                outcomes.push(Some(Outcome::Rejected { source, id, error }))
            }
        }
    }
    // Accounts must exist; checked once per distinct account.
    let mut accounts: Vec<AccountPath> = candidates
        .iter()
        .map(|(_, a)| a.entry.account.clone())
        .collect();
    accounts.sort();
    accounts.dedup();
    let missing = app
        .blocking(move |app| {
            let mut missing = Vec::new();
            for a in accounts {
                if app.store.account(&a)?.is_none() {
                    missing.push(a);
                }
            }
            Ok(missing)
        })
        .await?;
    // Dedupe and append under one lock, so two requests carrying the same event cannot
    // both append it. The group commit still batches each request's events together.
    let guard = app.ingest_lock.lock().await;
    let mut fresh: Vec<(usize, Accepted)> = Vec::new();
    let mut seen_here: HashMap<(String, String), usize> = HashMap::new();
    let keys: Vec<(String, String)> = candidates
        .iter()
        .map(|(_, a)| (a.source.clone(), a.id.clone()))
        .collect();
    // Events appended but not yet projected are answered from memory, under the lock;
    // only the rest are looked up in the store.
    let mut known: Vec<Option<u64>> = keys.iter().map(|k| guard.map.get(k).copied()).collect();
    let unknown: Vec<(usize, (String, String))> = known
        .iter()
        .zip(keys)
        .enumerate()
        .filter(|(_, (k, _))| k.is_none())
        .map(|(i, (_, key))| (i, key))
        .collect();
    if !unknown.is_empty() {
        let (at, keys): (Vec<usize>, Vec<(String, String)>) = unknown.into_iter().unzip();
        let stored = app
            .blocking(move |app| {
                let refs: Vec<(&str, &str)> =
                    keys.iter().map(|(s, i)| (s.as_str(), i.as_str())).collect();
                Ok(app.store.ingested_many(&refs)?)
            })
            .await?;
        for (i, e) in at.into_iter().zip(stored) {
            known[i] = e;
        }
    }
    for ((i, a), prior) in candidates.into_iter().zip(known) {
        if missing.contains(&a.entry.account) {
            let error = ApiError::unprocessable(format!(
                "subject: account {} does not exist",
                a.entry.account
            ));
            outcomes[i] = Some(Outcome::Rejected {
                source: Some(a.source),
                id: Some(a.id),
                error,
            });
            continue;
        }
        if let Some(entry_id) = prior {
            outcomes[i] = Some(Outcome::Duplicate {
                source: a.source,
                id: a.id,
                entry_id,
            });
            continue;
        }
        let key = (a.source.clone(), a.id.clone());
        if let Some(&first) = seen_here.get(&key) {
            // The same event twice in one batch: the second is a duplicate of the first.
            outcomes[i] = Some(Outcome::Rejected {
                source: Some(a.source),
                id: Some(a.id),
                error: ApiError::conflict(format!("duplicate of event {first} in the same batch")),
            });
            continue;
        }
        seen_here.insert(key, i);
        fresh.push((i, a));
    }
    if !fresh.is_empty() {
        let (slots, fresh): (Vec<usize>, Vec<Accepted>) = fresh.into_iter().unzip();
        let (heads, entries): (Vec<(String, String)>, Vec<Entry>) = fresh
            .into_iter()
            .map(|a| ((a.source, a.id), a.entry))
            .unzip();
        let range = app.append(&entries).await?;
        let mut recent = guard;
        // Forget events the projections have indexed; bounds the map.
        let projected = app.projected();
        recent.map.retain(|_, e| *e >= projected);
        for ((i, (source, id)), entry_id) in slots.into_iter().zip(heads).zip(range) {
            recent.map.insert((source.clone(), id.clone()), entry_id);
            outcomes[i] = Some(Outcome::Accepted {
                source,
                id,
                entry_id,
            });
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| {
            // Lazily: building an internal error logs it.
            o.unwrap_or_else(|| Outcome::Rejected {
                source: None,
                id: None,
                error: ApiError::internal("event without outcome"),
            })
        })
        .collect())
}
