//! `/api/v1/keys`: API keys, shown once, stored hashed.

use crate::accounts::{more_after, page_limit};
use crate::auth::{Caller, generate_key, is_key_id};
use crate::error::ApiError;
use crate::extract::{Json, PathParam, Query};
use crate::{App, parse_path};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{Entry, EntryBody, KeyRevoked, Scope, Scopes};
use ciyuan_store::KeyRecord;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const MAX_KEY_NAME_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    account: String,
    scopes: Scopes,
    name: Option<String>,
}

/// A key as the API shows it (never its secret, except `key` once at creation).
#[derive(Serialize)]
pub struct KeyDto {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    key_id: String,
    account: String,
    scopes: Scopes,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    created_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<Timestamp>,
}

impl From<KeyRecord> for KeyDto {
    fn from(k: KeyRecord) -> Self {
        KeyDto {
            key: None,
            key_id: k.key_id,
            account: k.account.to_string(),
            scopes: k.scopes,
            name: k.name,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, axum::Json<KeyDto>), ApiError> {
    caller.require(Scope::Admin)?;
    let account = parse_path(&body.account, "account")?;
    caller.require_within(&account)?;
    if body.scopes.is_empty() {
        return Err(ApiError::bad_request(
            "scopes must name at least one of gateway, ingest, read, admin, audit",
        ));
    }
    if !caller.key.scopes.grants(body.scopes) {
        return Err(ApiError::forbidden(format!(
            "a key with scopes {} cannot create a key with scopes {}",
            caller.key.scopes, body.scopes
        )));
    }
    if let Some(n) = &body.name {
        ciyuan_core::check_text("name", n, MAX_KEY_NAME_BYTES)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    app.require_account(&account).await?;
    let new = generate_key()?;
    let record = KeyRecord {
        key_id: new.key_id.clone(),
        account,
        scopes: body.scopes,
        name: body.name,
        created_at: Timestamp::now(),
        revoked_at: None,
    };
    app.create_key(&record, new.hash).await?;
    let mut dto = KeyDto::from(record);
    dto.key = Some(new.secret);
    Ok((StatusCode::CREATED, axum::Json(dto)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    account: Option<String>,
    /// The `next` of the previous page: the id of its last key.
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /api/v1/keys?account=&after=&limit=`: a page of a subtree's keys by node (in
/// path order) then id, with `next` (the `after` of the next page: the id of its last
/// key) unless it is the last.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let under = match q.account {
        Some(s) => parse_path(&s, "account")?,
        None => caller.key.account.clone(),
    };
    caller.require_within(&under)?;
    let limit = page_limit(q.limit.as_deref())?;
    if let Some(a) = &q.after
        && !is_key_id(a)
    {
        return Err(ApiError::bad_request(format!(
            "after: {a:?} is not a key id (12 hex digits); pass the next of the previous page"
        )));
    }
    let mut keys = app
        .blocking(move |app| {
            // The cursor is the last key listed; the page goes on from its node. A key
            // outside the subtree answers as one that does not exist, so ids of other
            // tenants' keys cannot be probed.
            let after = match q.after {
                Some(id) => match app.store.key(&id)? {
                    Some(k) if k.account.is_within(&under) => Some((k.account, id)),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "after: {id} is no key of {under}; pass the next of the previous page"
                        )));
                    }
                },
                None => None,
            };
            app.store
                .keys_page(
                    &under,
                    after.as_ref().map(|(n, id)| (n, id.as_str())),
                    limit + 1,
                )
                .map_err(ApiError::from)
        })
        .await?;
    let more = more_after(&mut keys, limit);
    let next = keys.last().filter(|_| more).map(|k| k.key_id.clone());
    let dtos: Vec<KeyDto> = keys.into_iter().map(KeyDto::from).collect();
    let mut body = serde_json::json!({ "keys": dtos });
    if let Some(n) = next {
        body["next"] = n.into();
    }
    Ok(axum::Json(body))
}

async fn find(app: &Arc<App>, caller: &Caller, key_id: String) -> Result<KeyRecord, ApiError> {
    let id = key_id.clone();
    let key = app
        .blocking(move |app| app.store.key(&id).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key {key_id} does not exist")))?;
    // A key outside the caller's subtree is reported as missing, not as forbidden, so
    // key ids of other tenants cannot be probed.
    if !key.account.is_within(&caller.key.account) {
        return Err(ApiError::not_found(format!("key {key_id} does not exist")));
    }
    Ok(key)
}

pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(key_id): PathParam,
) -> Result<axum::Json<KeyDto>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(axum::Json(find(&app, &caller, key_id).await?.into()))
}

pub async fn revoke(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(key_id): PathParam,
) -> Result<axum::Json<KeyDto>, ApiError> {
    caller.require(Scope::Admin)?;
    let key = find(&app, &caller, key_id).await?;
    if key.revoked_at.is_some() {
        return Ok(axum::Json(key.into()));
    }
    let now = Timestamp::now();
    let id = key.key_id.clone();
    let revoked = app
        .blocking(move |app| {
            let r = app.store.revoke_key(&id, now)?;
            // Effective at once: the next request with this key misses the cache and
            // reads the revocation.
            app.auth.revoked(&id);
            Ok(r)
        })
        .await?
        .ok_or_else(|| ApiError::not_found("key vanished while being revoked"))?;
    app.append(&[Entry::new(
        now,
        revoked.account.clone(),
        EntryBody::KeyRevoked(KeyRevoked {
            key_id: revoked.key_id.clone(),
        }),
    )])
    .await?;
    Ok(axum::Json(revoked.into()))
}
