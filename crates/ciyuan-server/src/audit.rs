//! `/api/v1/audit/...`: checkpoints, entries and proofs for auditors.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{PathParam, Query};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciyuan_core::{Entry, Scope};
use ciyuan_store::SignedCheckpoint;
use serde::Deserialize;
use std::sync::Arc;

/// Most entries one `GET /api/v1/audit/entries` answers.
const MAX_ENTRIES_PER_PAGE: u64 = 10_000;
/// Checkpoints one `GET /api/v1/audit/checkpoints` answers unless asked for fewer.
const DEFAULT_CHECKPOINTS_PER_PAGE: usize = 100;
/// Most checkpoints one `GET /api/v1/audit/checkpoints` answers.
const MAX_CHECKPOINTS_PER_PAGE: usize = 1000;

fn checkpoint_json(app: &App, c: &SignedCheckpoint) -> serde_json::Value {
    serde_json::json!({
        "origin": c.checkpoint.origin,
        "size": c.checkpoint.size,
        "root_hash": B64.encode(c.checkpoint.root),
        "checkpoint": c.note,
        "public_key": app.log().verifier_key(),
    })
}

fn require_audit(caller: &Caller) -> Result<(), ApiError> {
    caller.require(Scope::Audit)
}

/// Whether `caller` may have a checkpoint signed on demand. A checkpoint signs the
/// whole log, every tenant's entries, and each one is an `fdatasync` and a record kept
/// forever: only an audit key at the root `/` may ask for one (admin does not imply
/// audit, as everywhere). Other keys get the checkpoints the server signs on its own,
/// every `checkpoint_interval`.
fn may_sign(caller: &Caller) -> bool {
    caller.key.account.is_root() && caller.key.scopes.allows(Scope::Audit)
}

/// The newest checkpoint covering at least `size` entries. A root audit key gets one
/// signed if needed; any other key waits for the periodic checkpoint (503 with
/// `retry-after`).
async fn covering(
    app: &Arc<App>,
    caller: &Caller,
    size: u64,
) -> Result<SignedCheckpoint, ApiError> {
    if let Some(c) = app.log().latest_checkpoint()
        && c.checkpoint.size >= size
    {
        return Ok(c);
    }
    if may_sign(caller) {
        return app.checkpoint().await;
    }
    let mut e = ApiError::unavailable(format!(
        "no signed checkpoint covers {size} entries yet; the server signs one every {} s \
         (only an audit key at the root / may have one signed on demand)",
        app.config.checkpoint_interval.as_secs()
    ));
    e.retry_after_secs = Some(app.config.checkpoint_interval.as_secs().max(1));
    Err(e)
}

pub async fn checkpoint(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    let c = covering(&app, &caller, 0).await?;
    Ok(axum::Json(checkpoint_json(&app, &c)))
}

pub async fn sign(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    if !may_sign(&caller) {
        return Err(ApiError::forbidden(format!(
            "key {} may not sign a checkpoint: that needs an audit key at the root account / \
             (others read the periodic checkpoints with GET)",
            caller.key.key_id
        )));
    }
    let c = app.checkpoint().await?;
    Ok(axum::Json(checkpoint_json(&app, &c)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPage {
    /// How many checkpoints come before the page (the `next` of the previous one).
    cursor: Option<u64>,
    limit: Option<usize>,
}

/// Signed checkpoints, oldest first, a page at a time: there are millions of them, and
/// the log reads older ones from storage rather than keeping them in memory.
pub async fn checkpoints(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(page): Query<CheckpointPage>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    let limit = page.limit.unwrap_or(DEFAULT_CHECKPOINTS_PER_PAGE);
    if limit == 0 || limit > MAX_CHECKPOINTS_PER_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_CHECKPOINTS_PER_PAGE}"
        )));
    }
    let cursor = page.cursor.unwrap_or(0);
    let count = app.log().checkpoint_count();
    if cursor > count {
        return Err(ApiError::bad_request(format!(
            "cursor {cursor} is past the end: {count} checkpoints have been signed"
        )));
    }
    let log = app.log().clone();
    let cps = app
        .blocking(move |_| Ok(log.checkpoints(cursor, limit)?))
        .await?;
    let end = cursor + cps.len() as u64;
    // A full page may have more behind it; the cursor of the end is handed out so a
    // client can also come back later for the checkpoints signed since.
    let next = (cps.len() == limit && end < app.log().checkpoint_count()).then_some(end);
    let list: Vec<serde_json::Value> = cps.iter().map(|c| checkpoint_json(&app, c)).collect();
    Ok(axum::Json(serde_json::json!({
        "checkpoints": list,
        "next": next,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    start: Option<u64>,
    limit: Option<u64>,
}

/// Raw entries, one per line, exactly the bytes that were hashed: the material of an
/// audit bundle. The whole log spans every tenant, so only root audit keys may read it.
pub async fn entries(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    require_audit(&caller)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "reading the whole log needs an audit key at the root account /",
        ));
    }
    let start = page.start.unwrap_or(0);
    let limit = page.limit.unwrap_or(MAX_ENTRIES_PER_PAGE);
    if limit == 0 || limit > MAX_ENTRIES_PER_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_ENTRIES_PER_PAGE}"
        )));
    }
    let log = app.log().clone();
    let body = app
        .blocking(move |_| {
            let end = log.size().min(start.saturating_add(limit));
            let mut out = Vec::new();
            if start < end {
                log.scan(start..end, &mut |_, bytes| {
                    out.extend_from_slice(bytes);
                    out.push(b'\n');
                    Ok(())
                })?;
            }
            Ok(out)
        })
        .await?;
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("entry id {raw:?} is not a number")))
}

/// Reads an entry the caller may see.
async fn visible_entry(app: &Arc<App>, caller: &Caller, id: u64) -> Result<Vec<u8>, ApiError> {
    let log = app.log().clone();
    let bytes = app
        .blocking(move |_| {
            if id >= log.size() {
                return Err(ApiError::not_found(format!("entry {id} does not exist")));
            }
            Ok(log.entry(id)?)
        })
        .await?;
    let entry = Entry::decode(&bytes).map_err(ApiError::internal)?;
    if !entry.account.is_within(&caller.key.account) {
        return Err(ApiError::not_found(format!("entry {id} does not exist")));
    }
    Ok(bytes)
}

pub async fn entry(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    let id = parse_id(&raw)?;
    let bytes = visible_entry(&app, &caller, id).await?;
    Ok(axum::Json(serde_json::json!({
        "entry_id": id,
        "entry": String::from_utf8_lossy(&bytes),
        "leaf_hash": B64.encode(ciyuan_tlog::leaf_hash(&bytes)),
    })))
}

/// An inclusion proof of one entry in a signed checkpoint: everything a third party
/// needs to check it with SHA-256 and Ed25519 alone.
pub async fn prove(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    let id = parse_id(&raw)?;
    let bytes = visible_entry(&app, &caller, id).await?;
    let c = covering(&app, &caller, id + 1).await?;
    let size = c.checkpoint.size;
    let log = app.log().clone();
    let proof = app
        .blocking(move |_| Ok(log.inclusion_proof(id, size)?))
        .await?;
    let leaf = ciyuan_tlog::leaf_hash(&bytes);
    // Check before answering: a proof that does not verify is a bug, never sent out.
    ciyuan_tlog::verify_inclusion(&leaf, id, size, &proof, &c.checkpoint.root)
        .map_err(|e| ApiError::internal(format!("inclusion proof of {id} does not verify: {e}")))?;
    Ok(axum::Json(serde_json::json!({
        "entry_id": id,
        "entry": String::from_utf8_lossy(&bytes),
        "leaf_hash": B64.encode(leaf),
        "tree_size": size,
        "root_hash": B64.encode(c.checkpoint.root),
        "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
        "checkpoint": c.note,
        "public_key": app.log().verifier_key(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizes {
    from: u64,
    to: Option<u64>,
}

pub async fn consistency(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<Sizes>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    require_audit(&caller)?;
    let to = match q.to {
        Some(t) => t,
        None => covering(&app, &caller, 0).await?.checkpoint.size,
    };
    if q.from > to {
        return Err(ApiError::bad_request("from must not exceed to"));
    }
    let log = app.log().clone();
    let from = q.from;
    let (proof, old_root, new_root) = app
        .blocking(move |_| {
            if to > log.size() {
                return Err(ApiError::bad_request(format!(
                    "to {to} exceeds the log size {}",
                    log.size()
                )));
            }
            Ok((
                log.consistency_proof(from, to)?,
                log.root_at(from)?,
                log.root_at(to)?,
            ))
        })
        .await?;
    Ok(axum::Json(serde_json::json!({
        "from": from,
        "to": to,
        "from_root_hash": B64.encode(old_root),
        "to_root_hash": B64.encode(new_root),
        "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
    })))
}
