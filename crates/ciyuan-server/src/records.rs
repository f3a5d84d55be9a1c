//! Listings of notable records in a subtree: gateway requests whose recount disagreed
//! with the provider (`/api/v1/discrepancies`) and budget incidents
//! (`/api/v1/incidents`), newest first, from the projections.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Query;
use crate::{App, parse_path};
use axum::extract::State;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{Incident, Scope, TokenMap};
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

fn scope(caller: &Caller, p: &Params) -> Result<(ciyuan_core::AccountPath, usize), ApiError> {
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

#[derive(Serialize)]
struct Discrepancy {
    entry: u64,
    ts: Timestamp,
    account: String,
    service: String,
    model: Option<String>,
    upstream: Option<String>,
    /// The provider's count, as recorded.
    tokens: TokenMap,
    /// Ciyuan's recount.
    recount: Option<ciyuan_core::Recount>,
}

/// `GET /api/v1/discrepancies?account=&limit=`
pub async fn discrepancies(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<Params>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (account, limit) = scope(&caller, &p)?;
    app.caught_up().await?;
    let rows = app
        .blocking(move |app| Ok(app.store.flagged(&account, limit)?))
        .await?;
    let rows: Vec<Discrepancy> = rows
        .into_iter()
        .map(|r| Discrepancy {
            entry: r.entry,
            ts: r.ts,
            account: r.account.to_string(),
            service: r.body.service,
            model: r.body.model,
            upstream: r.body.quality.map(|q| q.upstream),
            tokens: r.body.tokens,
            recount: r.body.recount,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "rows": rows })))
}

#[derive(Serialize)]
struct IncidentRow {
    entry: u64,
    ts: Timestamp,
    account: String,
    #[serde(flatten)]
    incident: Incident,
}

/// `GET /api/v1/incidents?account=&limit=`
pub async fn incidents(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<Params>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (account, limit) = scope(&caller, &p)?;
    app.caught_up().await?;
    let rows = app
        .blocking(move |app| Ok(app.store.incidents(&account, limit)?))
        .await?;
    let rows: Vec<IncidentRow> = rows
        .into_iter()
        .map(|r| IncidentRow {
            entry: r.entry,
            ts: r.ts,
            account: r.account.to_string(),
            incident: r.body,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "rows": rows })))
}
