//! Listings of notable records in a subtree: gateway requests whose recount disagreed
//! with the provider (`/api/v1/discrepancies`) and budget incidents
//! (`/api/v1/incidents`), newest first, from the projections.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Query;
use crate::{App, parse_path};
use axum::extract::State;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Incident, Scope, TokenMap, Usage};
use ciyuan_store::{Recorded, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most rows one listing answers.
const MAX_ROWS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    account: Option<String>,
    limit: Option<usize>,
}

fn scope(caller: &Caller, p: &Params) -> Result<(AccountPath, usize), ApiError> {
    caller.require(Scope::Read)?;
    let account = match &p.account {
        Some(s) => parse_path(s, "account")?,
        None => caller.key.account.clone(),
    };
    caller.require_within(&account)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_ROWS {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_ROWS}"
        )));
    }
    Ok((account, limit))
}

/// One listed record: where and when, then what.
#[derive(Serialize)]
struct Row<T> {
    entry: u64,
    ts: Timestamp,
    account: String,
    #[serde(flatten)]
    body: T,
}

/// A store listing of a subtree, newest first, at most `limit` rows.
type Fetch<T> = fn(&dyn Store, &AccountPath, usize) -> Result<Vec<Recorded<T>>, StoreError>;

/// Reads `fetch` for the caller's subtree once the projections have caught up, and
/// answers `{"rows": [...]}` with each body shaped by `shape`.
async fn listing<T: Send + 'static, U: Serialize>(
    app: Arc<App>,
    caller: Caller,
    p: Params,
    fetch: Fetch<T>,
    shape: fn(T) -> U,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (account, limit) = scope(&caller, &p)?;
    app.caught_up().await?;
    let rows = app
        .blocking(move |app| Ok(fetch(app.store.as_ref(), &account, limit)?))
        .await?;
    let rows: Vec<Row<U>> = rows
        .into_iter()
        .map(|r| Row {
            entry: r.entry,
            ts: r.ts,
            account: r.account.to_string(),
            body: shape(r.body),
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "rows": rows })))
}

#[derive(Serialize)]
struct Discrepancy {
    service: String,
    model: Option<String>,
    upstream: Option<String>,
    /// The provider's count, as recorded.
    tokens: TokenMap,
    /// Ciyuan's recount.
    recount: Option<Box<ciyuan_core::Recount>>,
}

/// `GET /api/v1/discrepancies?account=&limit=`
pub async fn discrepancies(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<Params>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    listing(
        app,
        caller,
        p,
        |store, account, limit| store.flagged(account, limit),
        |u: Usage| Discrepancy {
            service: u.service,
            model: u.model,
            upstream: u.quality.map(|q| q.upstream),
            tokens: u.tokens,
            recount: u.recount,
        },
    )
    .await
}

/// `GET /api/v1/incidents?account=&limit=`
pub async fn incidents(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<Params>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    listing(
        app,
        caller,
        p,
        |store, account, limit| store.incidents(account, limit),
        |i: Incident| i,
    )
    .await
}
