//! `/api/v1/accounts`: the account tree.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, PathParam, Query};
use crate::{App, parse_path};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_core::check_text;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountInfo, AccountPath, Entry, EntryBody, Scope};
use ciyuan_store::Account;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

const MAX_DISPLAY_NAME_BYTES: usize = 256;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY_BYTES: usize = 64;
const MAX_METADATA_VALUE_BYTES: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    path: String,
    display_name: Option<String>,
    time_zone: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    display_name: Option<String>,
    time_zone: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// An account as the API shows it.
#[derive(Serialize)]
pub struct AccountDto {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_zone: Option<String>,
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_entry: Option<u64>,
}

impl From<Account> for AccountDto {
    fn from(a: Account) -> Self {
        AccountDto {
            path: a.path.to_string(),
            display_name: a.info.display_name,
            time_zone: a.info.time_zone,
            metadata: a.info.metadata,
            created_at: Some(a.created_at),
            created_entry: Some(a.created_entry),
        }
    }
}

fn root_dto() -> AccountDto {
    AccountDto {
        path: "/".into(),
        display_name: None,
        time_zone: None,
        metadata: BTreeMap::new(),
        created_at: None,
        created_entry: None,
    }
}

fn validate_info(info: &AccountInfo) -> Result<(), ApiError> {
    let text = |field: &str, s: &str, max: usize| {
        check_text(field, s, max).map_err(|e| ApiError::bad_request(e.to_string()))
    };
    if let Some(name) = &info.display_name {
        if name.trim().is_empty() {
            return Err(ApiError::bad_request("display_name: must not be blank"));
        }
        text("display_name", name, MAX_DISPLAY_NAME_BYTES)?;
    }
    if let Some(tz) = &info.time_zone {
        ciyuan_core::jiff::tz::TimeZone::get(tz).map_err(|_| {
            ApiError::bad_request(format!(
                "time_zone {tz:?} is not an IANA time zone such as Asia/Shanghai"
            ))
        })?;
    }
    if info.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "metadata has more than {MAX_METADATA_ENTRIES} entries"
        )));
    }
    if let Some(spec) = info.metadata.get(crate::statements::ALLOCATION_KEY) {
        crate::statements::Allocation::parse(spec).map_err(|e| {
            ApiError::bad_request(format!(
                "metadata.{}: {e}",
                crate::statements::ALLOCATION_KEY
            ))
        })?;
    }
    for (k, v) in &info.metadata {
        text("metadata key", k, MAX_METADATA_KEY_BYTES)?;
        if !v.is_empty() {
            text(&format!("metadata.{k}"), v, MAX_METADATA_VALUE_BYTES)?;
        }
    }
    Ok(())
}

pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(body): Json<CreateAccount>,
) -> Result<(StatusCode, axum::Json<AccountDto>), ApiError> {
    caller.require(Scope::Admin)?;
    let path = parse_path(&body.path, "path")?;
    if path.is_root() {
        return Err(ApiError::conflict("the root account / always exists"));
    }
    caller.require_within(&path)?;
    let info = AccountInfo {
        display_name: body.display_name,
        time_zone: body.time_zone,
        metadata: body.metadata,
    };
    validate_info(&info)?;

    let _guard = app.admin_lock.lock().await;
    let lineage = path.lineage();
    let check = lineage.clone();
    let existing = app
        .blocking(move |app| {
            check
                .iter()
                .map(|p| Ok(app.store.account(p)?.is_some()))
                .collect::<Result<Vec<bool>, ApiError>>()
        })
        .await?;
    if existing.last().copied().unwrap_or(false) {
        return Err(ApiError::conflict(format!("account {path} exists")));
    }
    let now = Timestamp::now();
    // Missing ancestors are created in the same append, so the tree never has a gap.
    let entries: Vec<Entry> = lineage
        .into_iter()
        .zip(existing)
        .filter(|(_, exists)| !exists)
        .map(|(p, _)| {
            let node_info = if p == path {
                info.clone()
            } else {
                AccountInfo::default()
            };
            Entry::new(now, p, EntryBody::AccountCreated(node_info))
        })
        .collect();
    app.append_visible(&entries).await?;
    let account = load(&app, path).await?;
    Ok((StatusCode::CREATED, axum::Json(account)))
}

async fn load(app: &Arc<App>, path: AccountPath) -> Result<AccountDto, ApiError> {
    if path.is_root() {
        return Ok(root_dto());
    }
    let shown = path.to_string();
    app.blocking(move |app| app.store.account(&path).map_err(ApiError::from))
        .await?
        .map(AccountDto::from)
        .ok_or_else(|| ApiError::not_found(format!("account {shown} does not exist")))
}

pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<AccountDto>, ApiError> {
    caller.require(Scope::Read)?;
    let path = parse_path(&raw, "account path")?;
    caller.require_within(&path)?;
    Ok(axum::Json(load(&app, path).await?))
}

pub async fn update(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(body): Json<UpdateAccount>,
) -> Result<axum::Json<AccountDto>, ApiError> {
    caller.require(Scope::Admin)?;
    let path = parse_path(&raw, "account path")?;
    caller.require_within(&path)?;
    if path.is_root() {
        return Err(ApiError::bad_request("the root account has no attributes"));
    }
    let _guard = app.admin_lock.lock().await;
    let p = path.clone();
    let current = app
        .blocking(move |app| app.store.account(&p).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("account {path} does not exist")))?;
    let mut info = current.info;
    // A node's time zone places the windows of the limits set on it from above, and
    // its metadata (cost center, GL account) is how the parent's finance allocates
    // it: both are the parent's controls, changed only from above. A node's own
    // admin may rename it.
    let changes_controls = body
        .time_zone
        .as_ref()
        .is_some_and(|tz| info.time_zone.as_ref() != Some(tz))
        || body.metadata.as_ref().is_some_and(|m| *m != info.metadata);
    if changes_controls && path == caller.key.account {
        return Err(ApiError::forbidden(format!(
            "time_zone and metadata of {path} are set from above: use an admin key of an ancestor of {path}"
        )));
    }
    if let Some(n) = body.display_name {
        info.display_name = Some(n);
    }
    if let Some(tz) = body.time_zone {
        info.time_zone = Some(tz);
    }
    if let Some(m) = body.metadata {
        info.metadata = m;
    }
    validate_info(&info)?;
    // A zone moves the periods of the tier counters of the nodes that inherit it: the
    // change takes its place in the log between tiered entries, under their lock.
    let tiers = app.tiers.lock().await;
    app.append_visible(&[Entry::new(
        Timestamp::now(),
        path.clone(),
        EntryBody::AccountUpdated(info),
    )])
    .await?;
    app.tiers.forget_zones();
    drop(tiers);
    Ok(axum::Json(load(&app, path).await?))
}

/// Rows a listing answers when the caller names no `limit`.
const DEFAULT_PAGE: usize = 1000;
/// Most rows a listing answers.
const MAX_PAGE: usize = 10_000;

/// A listing's `limit` parameter: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub(crate) fn page_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_PAGE);
    };
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "limit: {raw:?} is not a number of rows from 1 to {MAX_PAGE}"
        ))),
    }
}

/// Cuts a page read with one row more than `limit` back to `limit`; true when that row
/// was there, so another page follows.
pub(crate) fn more_after<T>(rows: &mut Vec<T>, limit: usize) -> bool {
    let more = rows.len() > limit;
    rows.truncate(limit);
    more
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    under: Option<String>,
    /// The `next` of the previous page: the path of its last node.
    after: Option<String>,
    limit: Option<String>,
    /// `1`: only the direct children of `under` (the console's tree, whatever the
    /// size of the subtree below them).
    depth: Option<String>,
}

/// How many of a subtree's nodes a `depth=1` listing reads from the store at a time
/// while it looks for children.
const CHILDREN_SCAN: usize = if cfg!(test) { 4 } else { 1024 };

/// `GET /api/v1/accounts?under=&after=&limit=&depth=`: a page of a subtree's nodes in
/// path order (with `depth=1`, of the node's direct children only), with `next` (the
/// `after` of the next page) unless it is the last.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let under = match q.under {
        Some(s) => parse_path(&s, "under")?,
        None => caller.key.account.clone(),
    };
    caller.require_within(&under)?;
    let limit = page_limit(q.limit.as_deref())?;
    let after = q.after.map(|a| parse_path(&a, "after")).transpose()?;
    if let Some(a) = &after
        && !a.is_within(&under)
    {
        return Err(ApiError::bad_request(format!(
            "after: {a} is not within {under}; pass the next of the previous page of this listing"
        )));
    }
    let children_only = match q.depth.as_deref() {
        None => false,
        Some("1") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "depth {other:?} is not 1 (the direct children; leave it out for the whole subtree)"
            )));
        }
    };
    let mut accounts = app
        .blocking(move |app| {
            if !children_only {
                return app
                    .store
                    .accounts_page(&under, after.as_ref(), limit + 1)
                    .map_err(ApiError::from);
            }
            // The subtree in path order, keeping its children: a child's descendants
            // follow it, so they are read and passed over.
            let want = under.depth() + 1;
            let mut out = Vec::new();
            let mut cursor = after;
            loop {
                let page = app
                    .store
                    .accounts_page(&under, cursor.as_ref(), CHILDREN_SCAN)
                    .map_err(ApiError::from)?;
                let last_page = page.len() < CHILDREN_SCAN;
                cursor = page.last().map(|a| a.path.clone());
                out.extend(page.into_iter().filter(|a| a.path.depth() == want));
                if out.len() > limit || last_page {
                    return Ok(out);
                }
            }
        })
        .await?;
    let more = more_after(&mut accounts, limit);
    let next = accounts.last().filter(|_| more).map(|a| a.path.to_string());
    let dtos: Vec<AccountDto> = accounts.into_iter().map(AccountDto::from).collect();
    let mut body = serde_json::json!({ "accounts": dtos });
    if let Some(n) = next {
        body["next"] = n.into();
    }
    Ok(axum::Json(body))
}
