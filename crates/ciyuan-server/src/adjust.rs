//! `/api/v1/adjustments`: corrections are new entries naming the entry they correct;
//! nothing is ever changed in place.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Json;
use crate::{App, parse_path};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Adjustment, Direction, Entry, EntryBody, MAX_TOKENS_PER_KEY, Modality, Scope,
    TokenMap, Usage, check_text,
};
use ciyuan_store::{HourFilter, Store};
use serde::Deserialize;
use std::sync::Arc;

const MAX_REASON_BYTES: usize = 1024;
const MAX_NAME_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAdjustment {
    account: String,
    corrects: Option<u64>,
    reason: String,
    service: String,
    model: Option<String>,
    tokens: TokenMap,
}

/// `POST /api/v1/adjustments`. A correction is made from above: by an admin key at a
/// strict ancestor of the corrected node, so no tenant can credit itself. Each delta is
/// bounded like any count ([`MAX_TOKENS_PER_KEY`]), and a negative one may not take
/// the node's own usage of that service, model and token key below zero over its
/// lifetime, nor exceed what the corrected entry (if named) recorded for that key.
pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(body): Json<CreateAdjustment>,
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    caller.require(Scope::Admin)?;
    let account = parse_path(&body.account, "account")?;
    caller.require_within(&account)?;
    if account == caller.key.account {
        return Err(ApiError::forbidden(format!(
            "corrections of {account} are made from above: use an admin key of an ancestor of {account} (this key is at {})",
            caller.key.account
        )));
    }
    let text = |field: &str, s: &str, max: usize| {
        check_text(field, s, max).map_err(|e| ApiError::bad_request(e.to_string()))
    };
    if body.reason.trim().is_empty() {
        return Err(ApiError::bad_request("reason: must not be blank"));
    }
    text("reason", &body.reason, MAX_REASON_BYTES)?;
    text("service", &body.service, MAX_NAME_BYTES)?;
    if let Some(m) = &body.model {
        text("model", m, MAX_NAME_BYTES)?;
    }
    if body.tokens.is_empty() || body.tokens.iter().all(|t| t.count == 0) {
        return Err(ApiError::bad_request(
            "tokens must hold at least one non-zero delta",
        ));
    }
    if let Some(t) = body.tokens.out_of_bounds(true) {
        return Err(ApiError::bad_request(format!(
            "tokens.{}.{}: {} is outside -{MAX_TOKENS_PER_KEY} to {MAX_TOKENS_PER_KEY}",
            t.modality, t.direction, t.count
        )));
    }
    // One correction at a time, checked against everything before it.
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    app.require_account(&account).await?;
    let corrected = match body.corrects {
        Some(id) => Some((id, corrected_entry(&app, id, &account).await?)),
        None => None,
    };
    let (acct, service, model) = (account.clone(), body.service.clone(), body.model.clone());
    let negative: Vec<(Modality, Direction, i64)> = body
        .tokens
        .iter()
        .filter(|t| t.count < 0)
        .map(|t| (t.modality, t.direction, t.count))
        .collect();
    if !negative.is_empty() {
        let wanted = negative.clone();
        let held = app
            .blocking(move |app| {
                lifetime_usage(
                    app.store.as_ref(),
                    &acct,
                    &service,
                    model.as_deref(),
                    &wanted,
                )
            })
            .await?;
        for ((m, d, delta), have) in negative.iter().zip(held) {
            if have + i128::from(*delta) < 0 {
                return Err(ApiError::unprocessable(format!(
                    "tokens.{m}.{d}: {delta} would take the usage of {account} below zero ({have} recorded for this service and model)"
                )));
            }
            if let Some((id, target)) = &corrected {
                let recorded = target
                    .iter()
                    .find(|t| t.modality == *m && t.direction == *d)
                    .map_or(0, |t| t.count);
                if recorded + delta < 0 {
                    return Err(ApiError::unprocessable(format!(
                        "tokens.{m}.{d}: {delta} is more than entry {id} recorded ({recorded})"
                    )));
                }
            }
        }
    }
    let now = Timestamp::now();
    let entry = Entry::new(
        now,
        account.clone(),
        EntryBody::Adjustment(Adjustment {
            corrects: body.corrects,
            reason: body.reason,
            service: body.service,
            model: body.model,
            tokens: body.tokens,
        }),
    );
    let range = app.append_visible(std::slice::from_ref(&entry)).await?;
    // Budget counters count corrections as the projections do, so a limit's counter
    // is the same live as after a restart.
    if let EntryBody::Adjustment(a) = &entry.body {
        let settled = app.budget.record_correction(&account, &a.tokens, now);
        crate::budgets::incidents(&app, settled, Some(range.start)).await;
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "entry_id": range.start })),
    ))
}

/// The tokens of the usage or adjustment entry `id` on `account`. Every failure gets
/// the same answer, so the error never tells what another tenant's entry is.
async fn corrected_entry(
    app: &Arc<App>,
    id: u64,
    account: &AccountPath,
) -> Result<TokenMap, ApiError> {
    let log = app.log().clone();
    let bytes = app
        .blocking(move |_| {
            if id >= log.size() {
                return Ok(None);
            }
            Ok(Some(log.entry(id)?))
        })
        .await?;
    let target = bytes
        .map(|b| Entry::decode(&b))
        .transpose()
        .map_err(ApiError::internal)?;
    match target {
        Some(Entry {
            account: a,
            body:
                EntryBody::Usage(Usage { tokens, .. })
                | EntryBody::Adjustment(Adjustment { tokens, .. }),
            ..
        }) if a == *account => Ok(tokens),
        _ => Err(ApiError::unprocessable(format!(
            "corrects: entry {id} is not a usage or adjustment entry of {account}"
        ))),
    }
}

/// For each `(modality, direction)` wanted, the usage of `account` itself (not its
/// subtree) under `service` and `model`, over all time, corrections included.
fn lifetime_usage(
    store: &dyn Store,
    account: &AccountPath,
    service: &str,
    model: Option<&str>,
    wanted: &[(Modality, Direction, i64)],
) -> Result<Vec<i128>, ApiError> {
    let rows = store.usage_hours(&HourFilter {
        account: account.clone(),
        from_hour: None,
        to_hour: None,
    })?;
    let model = model.unwrap_or("");
    let mut out = vec![0i128; wanted.len()];
    for row in rows
        .iter()
        .filter(|r| r.account == *account && r.service == service && r.model == model)
    {
        for (slot, (m, d, _)) in out.iter_mut().zip(wanted) {
            if row.modality == *m && row.direction == *d {
                *slot = slot.checked_add(row.tokens).ok_or_else(|| {
                    ApiError::internal(format!("usage of {account} exceeds 128 bits"))
                })?;
            }
        }
    }
    Ok(out)
}
