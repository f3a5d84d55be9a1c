//! Reconciliation: a provider's usage export compared, per UTC day, model and token
//! key, with what the gateway recorded for that upstream; the result appended as a
//! `reconciliation` entry naming the file's SHA-256, and differences beyond tolerance
//! raised as incidents.
//!
//! What is compared on Ciyuan's side: the usage entries whose quality record names the
//! upstream, by the entry's time (UTC day) and the model the request named, their keys
//! mapped as providers count them (`ciyuan_report::reconcile::reconciled_key`: reasoning
//! is output). The log is read whole (an administrative request, not a hot path).

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Query;
use axum::body::Bytes;
use axum::extract::State;
use ciyuan_core::jiff::{Timestamp, ToSpan};
use ciyuan_core::{AccountPath, Entry, EntryBody, Incident, Reconciled, Scope};
use ciyuan_report::reconcile::{self, ProviderUsage, Tolerance};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most incidents one reconciliation raises (one per difference beyond tolerance);
/// the entry and the answer hold them all.
const MAX_INCIDENTS: usize = 100;

/// `POST /api/v1/reconciliations` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileQuery {
    /// `openai`, `anthropic` or `csv`.
    format: String,
    /// The upstream whose recorded usage is compared.
    upstream: String,
    /// Relative tolerance, a fraction (default 0.01: 1%).
    relative: Option<Decimal>,
    /// Absolute tolerance in tokens (default 0).
    absolute: Option<i64>,
}

/// The recorded usage of `upstream` on days `from..=to` (UTC), as reconciliation rows.
fn recorded(
    app: &App,
    upstream: &str,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<ProviderUsage>, ApiError> {
    let mut sums: BTreeMap<(ciyuan_core::jiff::civil::Date, String, &'static str), i128> =
        BTreeMap::new();
    let mut fail = None;
    let end = app.log.size();
    app.log
        .scan(0..end, &mut |index, bytes| {
            let entry = match Entry::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    fail = Some(format!("entry {index} does not decode: {e}"));
                    return Ok(());
                }
            };
            let EntryBody::Usage(u) = &entry.body else {
                return Ok(());
            };
            if entry.ts < from
                || entry.ts >= to
                || u.quality.as_ref().is_none_or(|q| q.upstream != upstream)
            {
                return Ok(());
            }
            let day = entry
                .ts
                .to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
                .date();
            let model = u.model.clone().unwrap_or_default();
            for t in u.tokens.iter() {
                if let Some(key) =
                    reconcile::reconciled_key(&format!("{}.{}", t.modality, t.direction))
                {
                    *sums.entry((day, model.clone(), key)).or_insert(0) += i128::from(t.count);
                }
            }
            Ok(())
        })
        .map_err(ApiError::internal)?;
    if let Some(why) = fail {
        return Err(ApiError::internal(why));
    }
    Ok(sums
        .into_iter()
        .map(|((day, model, key), tokens)| ProviderUsage {
            day,
            model,
            key: key.to_string(),
            tokens,
        })
        .collect())
}

/// `POST /api/v1/reconciliations?format=openai|anthropic|csv&upstream=NAME`: the
/// provider's export is the body. Answers the whole comparison; appends its entry and
/// an incident per difference beyond tolerance (root admin key).
pub async fn reconcile_export(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ReconcileQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "a provider's export covers every tenant: only a root admin key reconciles it",
        ));
    }
    let body = body.map_err(crate::extract::body_error)?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("the export is not UTF-8: {e}")))?;
    let provider = match q.format.as_str() {
        "openai" => reconcile::parse_openai(text),
        "anthropic" => reconcile::parse_anthropic(text),
        "csv" => reconcile::parse_csv(text).map(|c| c.usage),
        other => {
            return Err(ApiError::bad_request(format!(
                "format: {other:?} is not openai, anthropic or csv"
            )));
        }
    }
    .map_err(|e| ApiError::unprocessable(format!("{}: {e}", q.format)))?;
    let (Some(first), Some(last)) = (
        provider.iter().map(|r| r.day).min(),
        provider.iter().map(|r| r.day).max(),
    ) else {
        return Err(ApiError::unprocessable("the export holds no usage"));
    };
    let relative = q.relative.unwrap_or(Decimal::new(1, 2));
    let absolute = q.absolute.unwrap_or(0);
    if relative.is_sign_negative() || absolute < 0 {
        return Err(ApiError::bad_request(
            "relative, absolute: a tolerance is not negative",
        ));
    }
    let tolerance = Tolerance {
        relative,
        absolute: i128::from(absolute),
    };
    let day_start = |d: ciyuan_core::jiff::civil::Date| {
        d.to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .map_err(|e| ApiError::unprocessable(format!("day {d}: {e}")))
    };
    let from = day_start(first)?;
    let to = day_start(
        last.checked_add(1.day())
            .map_err(|e| ApiError::unprocessable(format!("day {last}: {e}")))?,
    )?;
    app.caught_up().await?;
    let upstream = q.upstream.clone();
    let ours = app
        .blocking(move |app| recorded(app, &upstream, from, to))
        .await?;
    let result = reconcile::compare(&provider, &ours, tolerance);
    let beyond: Vec<&reconcile::Finding> = result.beyond_tolerance().collect();
    // The entry keeps the summary and the findings beyond tolerance (the full list,
    // one per day, model and key, could outgrow an entry); the answer has all.
    let kept = serde_json::json!({
        "tolerance": result.tolerance,
        "summary": result.summary,
        "beyond_tolerance": beyond,
    });
    let entry = Reconciled {
        upstream: q.upstream.clone(),
        format: q.format.clone(),
        sha256: Reconciled::hash(&body),
        from: first.to_string(),
        to: last.to_string(),
        compared: result.summary.rows_compared as u64,
        beyond_tolerance: result.summary.beyond_tolerance as u64,
        result: kept,
    };
    let range = app
        .append(&[Entry::new(
            Timestamp::now(),
            AccountPath::root(),
            EntryBody::Reconciled(entry),
        )])
        .await?;
    let incidents: Vec<Entry> = beyond
        .iter()
        .take(MAX_INCIDENTS)
        .map(|f| {
            Entry::new(
                Timestamp::now(),
                AccountPath::root(),
                EntryBody::Incident(Incident {
                    kind: "reconciliation.difference".into(),
                    limit: q.upstream.clone(),
                    mode: ciyuan_core::BudgetMode::Soft,
                    window_start: None,
                    threshold: None,
                    used: 0,
                    amount: 0,
                    subject: Some(format!(
                        "{} {} {}: provider {}, recorded {}",
                        f.day,
                        f.model,
                        f.key,
                        f.provider.unwrap_or(0),
                        f.recorded.unwrap_or(0)
                    )),
                    cause: Some(range.start),
                    cost: None,
                }),
            )
        })
        .collect();
    if !incidents.is_empty() {
        app.append(&incidents).await?;
    }
    let mut answer = serde_json::to_value(&result).map_err(ApiError::internal)?;
    answer["entry"] = range.start.into();
    answer["upstream"] = q.upstream.into();
    answer["sha256"] = Reconciled::hash(&body).into();
    Ok(axum::Json(answer))
}
