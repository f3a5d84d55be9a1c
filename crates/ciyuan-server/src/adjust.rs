//! `/api/v1/adjustments`: corrections are new entries naming the entry they correct;
//! nothing is ever changed in place.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Json;
use crate::{App, parse_path};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{Adjustment, Entry, EntryBody, Scope, TokenMap};
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

pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(body): Json<CreateAdjustment>,
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    caller.require(Scope::Admin)?;
    let account = parse_path(&body.account, "account")?;
    caller.require_within(&account)?;
    if body.reason.trim().is_empty() || body.reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad_request(format!(
            "reason must be 1 to {MAX_REASON_BYTES} bytes and not blank"
        )));
    }
    if body.service.is_empty() || body.service.len() > MAX_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "service must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if body
        .model
        .as_ref()
        .is_some_and(|m| m.is_empty() || m.len() > MAX_NAME_BYTES)
    {
        return Err(ApiError::bad_request(format!(
            "model must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if body.tokens.is_empty() || body.tokens.iter().all(|t| t.count == 0) {
        return Err(ApiError::bad_request(
            "tokens must hold at least one non-zero delta",
        ));
    }
    if let Some(id) = body.corrects {
        let log = app.log().clone();
        let bytes = app
            .blocking(move |_| {
                if id >= log.size() {
                    return Err(ApiError::unprocessable(format!(
                        "corrects: entry {id} does not exist"
                    )));
                }
                Ok(log.entry(id)?)
            })
            .await?;
        let target = Entry::decode(&bytes).map_err(ApiError::internal)?;
        if !matches!(target.body, EntryBody::Usage(_) | EntryBody::Adjustment(_)) {
            return Err(ApiError::unprocessable(format!(
                "corrects: entry {id} is a {} entry, not usage",
                target.body.kind()
            )));
        }
        if target.account != account {
            return Err(ApiError::unprocessable(format!(
                "corrects: entry {id} belongs to account {}, not {account}",
                target.account
            )));
        }
    }
    let entry = Entry::new(
        Timestamp::now(),
        account,
        EntryBody::Adjustment(Adjustment {
            corrects: body.corrects,
            reason: body.reason,
            service: body.service,
            model: body.model,
            tokens: body.tokens,
        }),
    );
    let range = app.append_visible(std::slice::from_ref(&entry)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "entry_id": range.start })),
    ))
}
