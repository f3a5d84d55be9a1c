//! Service levels and the quality report, both read from the gateway's quality
//! records in the log.
//!
//! A contract's service levels are evaluated once per node, level and month: by a
//! background task once the month (in the contract node's time zone) is over and a
//! grace period has passed, by hand (`POST /api/v1/service-levels/{path}?period=`),
//! and when a statement closes the month. The evaluation reads the month's requests
//! (the log range the `quality_hours` projection names, so only that range is read),
//! keeps those priced under the node's contract to the level's upstream and models,
//! computes the figures and the credit with `ciyuan_core::evaluate`, and appends a
//! `service_level.evaluated` entry; when a credit is owed and the node has a wallet in
//! its currency, a `service_credit` posting follows it in the same append. The credit
//! is billed on the month's statement as a credit line (projection rule), and
//! `ciyuan audit verify` recomputes every evaluation from the log.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{PathParam, Query};
use crate::statements::{Period, month_of};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::{SignedDuration, Timestamp, ToSpan};
use ciyuan_core::{
    AccountPath, Entry, EntryBody, Posting, Sample, Scope, ServiceLevel, ServiceLevelEvaluated,
    Usage,
};
use ciyuan_report::quality::{QualityReport, QualityRows, QualitySample};
use serde::Deserialize;
use std::sync::Arc;

/// How long after a month's end the background task waits before evaluating it: a
/// request is recorded when it ends, stamped with its start, so the month's last
/// streams land after the month is over.
pub const GRACE: SignedDuration = SignedDuration::from_mins(15);
/// How many months back the background task looks for one not yet evaluated.
const MAX_MONTHS_BACK: usize = 36;

/// Reads the usage entries with a quality record whose time is in `period`, of
/// `under`'s subtree, calling `f` with each; returns the log range read: from the
/// first such entry of any node to the projection's watermark (an empty range at the
/// watermark when there is none before it).
fn scan_requests(
    app: &App,
    under: &AccountPath,
    period: &Period,
    f: &mut dyn FnMut(u64, &AccountPath, &Usage),
) -> Result<(u64, u64), ApiError> {
    // Read to the projection's watermark, taken first: the hours' ranges cover at
    // least every entry before it, and what lies after it came later than the read.
    let end = app.projected();
    let first = match app
        .store
        .quality_range(period.from.as_second(), period.to.as_second())?
    {
        Some((first, _)) if first < end => first,
        _ => return Ok((end, end)),
    };
    let mut fail = None;
    app.log
        .scan(first..end, &mut |index, bytes| {
            let entry = match Entry::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    fail.get_or_insert_with(|| format!("entry {index} does not decode: {e}"));
                    return Ok(());
                }
            };
            if entry.ts < period.from || entry.ts >= period.to || !entry.account.is_within(under) {
                return Ok(());
            }
            if let EntryBody::Usage(u) = &entry.body
                && u.quality.is_some()
            {
                f(index, &entry.account, u);
            }
            Ok(())
        })
        .map_err(ApiError::internal)?;
    match fail {
        Some(why) => Err(ApiError::internal(why)),
        None => Ok((first, end)),
    }
}

impl App {
    /// Evaluates the service levels of `node`'s contract for month `name` that are
    /// not evaluated yet, appending their entries (and credits); the caller holds the
    /// admin lock. Answers every evaluation of the node and month, old and new.
    pub(crate) async fn evaluate_service_levels(
        self: &Arc<Self>,
        node: &AccountPath,
        name: &str,
    ) -> Result<Vec<(u64, ServiceLevelEvaluated)>, ApiError> {
        self.caught_up().await?;
        let Some(contract) = self.pricing.contract_at(node) else {
            return Ok(Vec::new());
        };
        if contract.service_levels.is_empty() {
            return Ok(Vec::new());
        }
        let (n, month) = (node.clone(), name.to_string());
        let (done, fresh) = self
            .blocking(move |app| {
                let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &n)?;
                let period = Period::of_range(Some(&month), None, None, &zone)?;
                if period.to > Timestamp::now() {
                    return Err(ApiError::unprocessable(format!(
                        "period: {month} in {} is not over until {}",
                        period.zone_name, period.to
                    )));
                }
                let done: Vec<(u64, ServiceLevelEvaluated)> = app
                    .store
                    .service_levels(&n)?
                    .into_iter()
                    .filter(|r| r.account == n && r.body.period == month)
                    .map(|r| (r.entry, r.body))
                    .collect();
                let todo: Vec<&ServiceLevel> = contract
                    .service_levels
                    .iter()
                    .filter(|l| !done.iter().any(|(_, d)| d.level.name == l.name))
                    .collect();
                if todo.is_empty() {
                    return Ok((done, Vec::new()));
                }
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); todo.len()];
                let mut ranges: Vec<Option<(u64, u64)>> = vec![None; todo.len()];
                let scanned = scan_requests(app, &n, &period, &mut |index, _, u| {
                    for (i, level) in todo.iter().enumerate() {
                        if ciyuan_core::covered(&n, level, u)
                            && let Some(s) = Sample::of(u)
                        {
                            samples[i].push(s);
                            let r = ranges[i].get_or_insert((index, index));
                            r.1 = index;
                        }
                    }
                })?;
                let fresh = todo
                    .iter()
                    .zip(samples.iter().zip(ranges))
                    .map(|(level, (s, entries))| {
                        let e = ciyuan_core::evaluate(level, s.iter());
                        ServiceLevelEvaluated {
                            level: (*level).clone(),
                            period: month.clone(),
                            from: period.from,
                            to: period.to,
                            time_zone: period.zone_name.clone(),
                            scanned,
                            entries,
                            figures: e.figures,
                            objectives: e.objectives,
                            credit_percent: e.credit_percent,
                            credits: e.credits,
                        }
                    })
                    .collect::<Vec<_>>();
                Ok((done, fresh))
            })
            .await?;
        let mut out = done;
        for evaluated in fresh {
            out.push(self.record_evaluation(node, evaluated).await?);
        }
        Ok(out)
    }

    /// Appends one evaluation and, for each credit in a currency the node has a
    /// wallet in, the posting that pays it, in one append.
    async fn record_evaluation(
        self: &Arc<Self>,
        node: &AccountPath,
        evaluated: ServiceLevelEvaluated,
    ) -> Result<(u64, ServiceLevelEvaluated), ApiError> {
        let now = Timestamp::now();
        let wallets = self.wallets.currencies(node);
        let mut postings = Vec::new();
        for c in evaluated.credits.iter().filter(|c| !c.amount.is_zero()) {
            if wallets.contains(&c.currency) {
                let mut p = Posting::service_credit(node, c.currency, c.amount);
                p.memo = ciyuan_core::credit_memo(&evaluated.level.name, &evaluated.period);
                p.check()
                    .map_err(|e| ApiError::internal(format!("a service credit: {e}")))?;
                postings.push(p);
            }
        }
        let _rules = self.rules_gate.write().await;
        for p in &postings {
            self.wallets
                .apply_funded_posting(node, p, now)
                .map_err(|e| ApiError::internal(format!("a service credit: {e}")))?;
        }
        let mut entries = vec![Entry::new(
            now,
            node.clone(),
            EntryBody::ServiceLevelEvaluated(Box::new(evaluated.clone())),
        )];
        entries.extend(
            postings
                .iter()
                .map(|p| Entry::new(now, node.clone(), EntryBody::Posting(p.clone()))),
        );
        match self.append_visible(&entries).await {
            Ok(range) => {
                tracing::info!(
                    node = %node,
                    level = %evaluated.level.name,
                    period = %evaluated.period,
                    credit_percent = %evaluated.credit_percent,
                    entry = range.start,
                    "service level evaluated"
                );
                Ok((range.start, evaluated))
            }
            Err(e) => {
                for p in &postings {
                    if let Err(undo) = self.wallets.apply_posting(node, &p.reversal(), now) {
                        tracing::error!(error = %undo, "a service credit that was not recorded could not be taken back");
                    }
                }
                Err(e)
            }
        }
    }

    /// Evaluates month `name` for every contract with service levels on `under` or
    /// below it whose month (in its own node's time zone) is over; the caller holds
    /// the admin lock.
    pub(crate) async fn evaluate_service_levels_under(
        self: &Arc<Self>,
        under: &AccountPath,
        name: &str,
    ) -> Result<(), ApiError> {
        crate::statements::month(name)?;
        let (u, month) = (under.clone(), name.to_string());
        let nodes = self
            .blocking(move |app| {
                let mut nodes = Vec::new();
                for (node, _, contract) in app.store.contracts()? {
                    if contract.service_levels.is_empty() || !node.is_within(&u) {
                        continue;
                    }
                    let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &node)?;
                    if Period::of_range(Some(&month), None, None, &zone)?.to <= Timestamp::now() {
                        nodes.push(node);
                    }
                }
                Ok(nodes)
            })
            .await?;
        for node in nodes {
            self.evaluate_service_levels(&node, name).await?;
        }
        Ok(())
    }

    /// The months of each contract with service levels that are over (with the grace
    /// period) and not evaluated, evaluated in order. Returns how many were appended.
    pub(crate) async fn evaluate_due_service_levels(self: &Arc<Self>) -> Result<usize, ApiError> {
        let due = self
            .blocking(|app| {
                let now = Timestamp::now();
                let mut due = Vec::new();
                for (node, entry, contract) in app.store.contracts()? {
                    if contract.service_levels.is_empty() {
                        continue;
                    }
                    let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &node)?;
                    let since = Entry::decode(&app.log.entry(entry).map_err(ApiError::internal)?)
                        .map_err(ApiError::internal)?
                        .ts;
                    let done: Vec<(String, String)> = app
                        .store
                        .service_levels(&node)?
                        .into_iter()
                        .filter(|r| r.account == node)
                        .map(|r| (r.body.level.name, r.body.period))
                        .collect();
                    let mut months = Vec::new();
                    let mut at = now
                        .checked_sub(GRACE)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    for _ in 0..MAX_MONTHS_BACK {
                        // The month before the one `at` is in.
                        let start = crate::statements::month(&month_of(at, &zone))?;
                        let prev = start
                            .checked_sub(1.month())
                            .map_err(|e| ApiError::internal(e.to_string()))?;
                        let name = format!("{:04}-{:02}", prev.year(), prev.month());
                        let period = Period::of_range(Some(&name), None, None, &zone)?;
                        if period.to <= since {
                            break;
                        }
                        let all_done = contract
                            .service_levels
                            .iter()
                            .all(|l| done.iter().any(|(n, p)| *n == l.name && *p == name));
                        if !all_done {
                            months.push(name);
                        }
                        at = period.from;
                    }
                    months.reverse();
                    for m in months {
                        due.push((node.clone(), m));
                    }
                }
                Ok(due)
            })
            .await?;
        let mut appended = 0;
        for (node, month) in due {
            let _guard = self.admin_lock.lock().await;
            let before = self.log.size();
            self.evaluate_service_levels(&node, &month).await?;
            appended += usize::from(self.log.size() > before);
        }
        Ok(appended)
    }
}

/// Evaluates due service levels every `every` until the app is dropped.
pub async fn service_level_loop(app: Arc<App>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Once for the whole ledger: on the node that leads.
        if !app.leads().await {
            continue;
        }
        if let Err(e) = app.evaluate_due_service_levels().await {
            tracing::warn!(detail = %e.detail, "evaluating service levels failed; retried later");
        }
    }
}

/// `?period=YYYY-MM`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateQuery {
    period: String,
}

fn answer(node: &AccountPath, list: &[(u64, ServiceLevelEvaluated)]) -> serde_json::Value {
    serde_json::json!({
        "account": node,
        "evaluations": list.iter().map(|(entry, e)| serde_json::json!({
            "entry": entry,
            "evaluation": e,
        })).collect::<Vec<_>>(),
    })
}

/// `POST /api/v1/service-levels/{path}?period=YYYY-MM`: evaluates the
/// node's contract's service levels for a month that is over, once (an admin key
/// strictly above the node, or the root's: the contract is set from above).
pub async fn evaluate(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Query(q): Query<EvaluateQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    if node == caller.key.account && !node.is_root() {
        return Err(ApiError::forbidden(
            "a node's service levels are evaluated from above it, where its contract is set",
        ));
    }
    match app.pricing.contract_at(&node) {
        Some(c) if !c.service_levels.is_empty() => {}
        _ => {
            return Err(ApiError::unprocessable(format!(
                "{node} has no contract of its own with service levels"
            )));
        }
    }
    crate::statements::month(&q.period)?;
    let _guard = app.admin_lock.lock().await;
    let list = app.evaluate_service_levels(&node, &q.period).await?;
    Ok(axum::Json(answer(&node, &list)))
}

/// `GET /api/v1/service-levels/{path}`: the service levels evaluated on the node's
/// subtree, each with its figures and credit.
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    app.caught_up().await?;
    let n = node.clone();
    let rows = app
        .blocking(move |app| Ok(app.store.service_levels(&n)?))
        .await?;
    Ok(axum::Json(serde_json::json!({
        "account": node,
        "evaluations": rows.iter().map(|r| serde_json::json!({
            "entry": r.entry,
            "ts": r.ts,
            "account": r.account,
            "evaluation": r.body,
        })).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/quality` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityQuery {
    /// The node whose requests are counted (the caller's by default).
    account: Option<String>,
    /// A calendar month in the node's time zone.
    period: Option<String>,
    /// Or a range on whole hours.
    from: Option<Timestamp>,
    to: Option<Timestamp>,
    /// `json` (default), `csv` or `html`.
    format: Option<String>,
}

/// `GET /api/v1/quality?account=&period=|from=&to=&format=json|csv|html`: per
/// upstream and model, how the gateway's requests of the node's subtree went.
pub async fn quality(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<QualityQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let node = match &q.account {
        Some(raw) => crate::budgets::existing_node(&app, &caller, raw).await?,
        None => caller.key.account.clone(),
    };
    let format = q.format.clone().unwrap_or_else(|| "json".into());
    if !matches!(format.as_str(), "json" | "csv" | "html") {
        return Err(ApiError::bad_request(format!(
            "format: {format:?} is not json, csv or html"
        )));
    }
    app.caught_up().await?;
    let report = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &node)?;
            let period = Period::of_range(q.period.as_deref(), q.from, q.to, &zone)?;
            let mut rows = QualityRows::default();
            let scanned = scan_requests(app, &node, &period, &mut |_, _, u| {
                let Some(qr) = u.quality.as_deref() else {
                    return;
                };
                rows.add(QualitySample {
                    upstream: &qr.upstream,
                    model: u.model.as_deref().unwrap_or(""),
                    status: qr.status,
                    failure: qr.failure.as_deref(),
                    upstream_failed: ciyuan_core::upstream_failed(qr),
                    ttft_us: qr.ttft_us,
                    latency_us: qr.latency_us,
                    tokens_per_sec: qr.output_tokens_per_sec,
                    recount_agrees: u.recount.as_ref().map(|r| !r.flagged),
                    estimated: qr.estimated,
                });
            })?;
            Ok(QualityReport {
                account: node,
                period: period.name.clone(),
                from: period.from,
                to: period.to,
                time_zone: period.zone_name.clone(),
                scanned,
                rows: rows.finish(),
            })
        })
        .await?;
    let (ctype, body) = match format.as_str() {
        "csv" => {
            let mut out = Vec::new();
            ciyuan_report::quality::write_csv(&report, &mut out).map_err(ApiError::internal)?;
            ("text/csv; charset=utf-8", out)
        }
        "html" => {
            let mut out = Vec::new();
            ciyuan_report::quality::write_html(&report, &mut out).map_err(ApiError::internal)?;
            ("text/html; charset=utf-8", out)
        }
        _ => (
            "application/json",
            serde_json::to_vec(&report).map_err(ApiError::internal)?,
        ),
    };
    Ok(([(header::CONTENT_TYPE, ctype)], body).into_response())
}
