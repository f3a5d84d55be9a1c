//! Budgets, access rules and thresholds: the engine (`ciyuan-budget`) wired to the
//! ledger and the API.
//!
//! Limits and access rules are ledger entries (`budget.set`, `budget.cleared`,
//! `access.set`); the engine is rebuilt from their projections on start, and its
//! counters from the usage projections (node, per-key and per-session counters of
//! hour-or-longer windows; minute windows and request counts start empty, and
//! reservations of requests that died with the process are gone, i.e. released). Threshold crossings become
//! `incident` entries and signed webhooks.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, PathParam, Query};
use crate::{App, parse_path};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_budget::{
    Crossing, Engine, LimitScope, LimitSpec, LimitStatus, Measure, Mode, Period, Selector, Settled,
    Subject,
};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccessSet, AccountPath, BudgetCleared, BudgetMeasure, BudgetMode, BudgetPer, BudgetPeriod,
    BudgetSet, Entry, EntryBody, Incident, Scope, check_text, may_change_control,
};
use ciyuan_store::{HourFilter, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The engine's limit for a `budget.set` on `node`, periods in `tz`; `None` for a
/// money limit without its amount, which this server never writes (the API refuses
/// it) and which bounds nothing it could enforce.
pub(crate) fn spec_of(
    node: &AccountPath,
    b: &BudgetSet,
    tz: ciyuan_core::jiff::tz::TimeZone,
) -> Option<LimitSpec> {
    let measure = match (b.measure, b.cost) {
        (BudgetMeasure::Tokens, _) => Measure::Tokens(Selector {
            modality: b.selector.modality,
            direction: b.selector.direction,
        }),
        (BudgetMeasure::Requests, _) => Measure::Requests,
        (BudgetMeasure::Cost, Some(c)) => Measure::Cost(c.currency),
        (BudgetMeasure::Cost, None) => return None,
    };
    let period = match b.period {
        BudgetPeriod::Minute => Period::Minute,
        BudgetPeriod::Hour => Period::Hour,
        BudgetPeriod::Day => Period::Day,
        BudgetPeriod::Month => Period::Month,
        BudgetPeriod::Lifetime => Period::Lifetime,
    };
    let mut spec = LimitSpec::new(node.clone(), b.name.clone(), measure, b.amount, period);
    if let Some(c) = b.cost {
        spec.money = c.amount;
    }
    spec.mode = match b.mode {
        BudgetMode::Hard => Mode::Hard,
        BudgetMode::Soft => Mode::Soft,
    };
    spec.scope = match b.per {
        BudgetPer::Node => LimitScope::Node,
        BudgetPer::Session => LimitScope::Session,
        BudgetPer::Key => LimitScope::Key,
        BudgetPer::Request => LimitScope::Request,
    };
    spec.thresholds = b.thresholds.clone();
    spec.time_zone = tz;
    spec.clamp = b.clamp;
    Some(spec)
}

/// Builds the engine from the projections: limits, access rules, and the node
/// counters of the current windows.
pub(crate) fn load(store: &dyn Store, now: Timestamp) -> Result<Engine, ApiError> {
    let engine = Engine::new();
    for (node, rules) in store.access_rules()? {
        engine.set_models(&node, rules.allow, rules.deny);
    }
    for (node, b) in store.budgets()? {
        let tz = ciyuan_store::effective_time_zone(store, &node)?;
        let Some(spec) = spec_of(&node, &b, tz) else {
            tracing::error!(%node, limit = %b.name, "a money limit without its amount is not enforced");
            continue;
        };
        engine
            .set_limit(spec.clone())
            .map_err(|e| ApiError::internal(format!("stored limit on {node}: {e}")))?;
        restore_used(store, &engine, &spec, now)?;
    }
    Ok(engine)
}

/// Sets a limit's counters to the usage the projections hold for its current window
/// (hour-or-longer windows): a node limit's one counter, and a per-key or
/// per-session limit's counter of every key and session with usage in the window
/// (`ciyuan_store::subjects`). Minute windows and request counts start empty. Used on
/// start and when a limit is set, so a monthly budget set on the 20th counts the month
/// so far.
pub(crate) fn restore_used(
    store: &dyn Store,
    engine: &Engine,
    spec: &LimitSpec,
    now: Timestamp,
) -> Result<(), ApiError> {
    let node = &spec.node;
    if spec.scope == LimitScope::Request || spec.period == Period::Minute {
        return Ok(());
    }
    let window = spec.window(now);
    let start = window.map(|(s, _)| s);
    let filter = HourFilter {
        account: node.clone(),
        from_hour: window.map(|(s, _)| ciyuan_store::floor_hour(s)),
        to_hour: window.map(|(_, e)| ciyuan_store::ceil_hour(e)),
    };
    let restoring = |e| ApiError::internal(format!("restoring limit on {node}: {e}"));
    match spec.measure {
        // Request counts are not projected; they restart with the process.
        Measure::Requests => Ok(()),
        Measure::Cost(currency) => {
            // Rated amounts of the window, exactly as the engine counts them live.
            let rows: Vec<(Option<String>, ciyuan_store::CostRow)> = match spec.scope {
                LimitScope::Node => store
                    .cost_hours(&filter)?
                    .into_iter()
                    .map(|r| (None, r))
                    .collect(),
                scope => counted_on(scope, store.subject_cost(&filter)?),
            };
            let mut spent: BTreeMap<Option<String>, ciyuan_core::ExactSum> = BTreeMap::new();
            if spec.scope == LimitScope::Node {
                spent.insert(None, ciyuan_core::ExactSum::ZERO);
            }
            for (who, row) in rows {
                if row.currency == currency {
                    let sum = spent.entry(who).or_insert(ciyuan_core::ExactSum::ZERO);
                    *sum = sum.checked_add(row.amount).ok_or_else(|| {
                        ApiError::internal(format!("spend of limit on {node} overflows"))
                    })?;
                }
            }
            for (who, sum) in spent {
                let sum = sum.to_decimal().ok_or_else(|| {
                    ApiError::internal(format!(
                        "spend of limit on {node} needs more than 28 digits"
                    ))
                })?;
                engine
                    .load_cost_used(node, &spec.name, who.as_deref(), start, sum)
                    .map_err(restoring)?;
            }
            Ok(())
        }
        Measure::Tokens(sel) => {
            // Net usage, corrections included, exactly as the engine counts it live.
            let rows: Vec<(Option<String>, ciyuan_store::HourRow)> = match spec.scope {
                LimitScope::Node => store
                    .usage_hours(&filter)?
                    .into_iter()
                    .map(|r| (None, r))
                    .collect(),
                scope => counted_on(scope, store.subject_usage(&filter)?),
            };
            let mut used: BTreeMap<Option<String>, i128> = BTreeMap::new();
            if spec.scope == LimitScope::Node {
                used.insert(None, 0);
            }
            for (who, row) in rows {
                if sel.matches(row.modality, row.direction) {
                    let sum = used.entry(who).or_insert(0);
                    *sum = sum.checked_add(row.tokens).ok_or_else(|| {
                        ApiError::internal(format!("usage of limit on {node} exceeds 128 bits"))
                    })?;
                }
            }
            for (who, sum) in used {
                engine
                    .load_used(node, &spec.name, who.as_deref(), start, sum)
                    .map_err(restoring)?;
            }
            Ok(())
        }
    }
}

/// The rows of the subjects a per-key (or per-session) limit counts, each with its key
/// id (or session).
fn counted_on<R>(
    scope: LimitScope,
    rows: Vec<(ciyuan_store::subjects::Subject, R)>,
) -> Vec<(Option<String>, R)> {
    use ciyuan_store::subjects::Subject;
    rows.into_iter()
        .filter_map(|(who, row)| match (scope, who) {
            (LimitScope::Key, Subject::Key(id)) | (LimitScope::Session, Subject::Session(id)) => {
                Some((Some(id), row))
            }
            _ => None,
        })
        .collect()
}

/// A counter as an incident reports it (`u64` in the entry format): a net usage below
/// zero (a credit) reports 0; one past `u64::MAX` (beyond 10^7 events at the largest
/// accepted count) reports `u64::MAX`.
fn reported(used: i128) -> u64 {
    u64::try_from(used.max(0)).unwrap_or(u64::MAX)
}

/// Turns crossings and exceeded hard limits into incident entries (and webhooks).
pub(crate) async fn incidents(app: &Arc<App>, settled: Settled, cause: Option<u64>) {
    if !settled.raises_incidents() {
        return;
    }
    let now = Timestamp::now();
    let mut entries: Vec<Entry> = settled
        .crossings
        .iter()
        .map(|c| incident_entry(c, cause, now))
        .collect();
    for (node, name) in &settled.exceeded {
        let status = app
            .budget
            .status(node, now)
            .into_iter()
            .find(|s| &s.spec.name == name);
        entries.push(Entry::new(
            now,
            node.clone(),
            EntryBody::Incident(Incident {
                kind: "budget.exceeded".into(),
                limit: name.clone(),
                mode: BudgetMode::Hard,
                window_start: status.as_ref().and_then(|s| s.window_start),
                threshold: None,
                used: status.as_ref().map_or(0, |s| reported(s.used)),
                amount: status.as_ref().map_or(0, |s| s.spec.amount),
                subject: None,
                cause,
                cost: status.as_ref().and_then(|s| s.cost.as_ref()).map(|m| {
                    ciyuan_core::IncidentCost {
                        currency: m.currency,
                        used: m
                            .used
                            .to_decimal_floor()
                            .unwrap_or(rust_decimal::Decimal::MAX),
                        amount: status
                            .as_ref()
                            .map_or(rust_decimal::Decimal::ZERO, |s| s.spec.money),
                    }
                }),
            }),
        ));
    }
    let range = match app.append(&entries).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(detail = %e.detail, "incident not recorded");
            return;
        }
    };
    if let Some(n) = &app.config.notifier {
        for (entry, index) in entries.iter().zip(range) {
            let EntryBody::Incident(i) = &entry.body else {
                continue;
            };
            let event = ciyuan_notify::Event {
                // The ledger index is unique and stable: receivers de-duplicate on it.
                id: format!("incident-{index}"),
                kind: i.kind.clone(),
                created: entry.ts,
                data: serde_json::json!({
                    "entry": index,
                    "account": entry.account.as_str(),
                    "incident": i,
                }),
            };
            if let Err(e) = n.notify(event) {
                tracing::error!(error = %e, "webhook not queued");
            }
        }
    }
}

fn incident_entry(c: &Crossing, cause: Option<u64>, now: Timestamp) -> Entry {
    Entry::new(
        now,
        c.node.clone(),
        EntryBody::Incident(Incident {
            kind: "budget.threshold".into(),
            limit: c.limit.clone(),
            mode: match c.mode {
                Mode::Hard => BudgetMode::Hard,
                Mode::Soft => BudgetMode::Soft,
            },
            window_start: c.window_start,
            threshold: Some(c.threshold),
            used: c.used,
            amount: c.amount,
            subject: subject_name(&c.subject),
            cause,
            cost: c.cost.as_ref().map(|m| ciyuan_core::IncidentCost {
                currency: m.currency,
                // Beyond 28 digits only past any real spend; floored, as `used` is.
                used: m
                    .used
                    .to_decimal_floor()
                    .unwrap_or(rust_decimal::Decimal::MAX),
                amount: m.amount,
            }),
        }),
    )
}

fn subject_name(s: &Subject) -> Option<String> {
    match s {
        Subject::Session(x) => Some(format!("session:{x}")),
        Subject::Key(x) => Some(format!("key:{x}")),
        Subject::Node | Subject::Request => None,
    }
}

/// Releases reservations and wallet holds of requests that died without settling,
/// and records the unused rest of grants that reached their expiry.
pub async fn expiry_loop(app: Arc<App>, ttl: std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = app.budget.expire(Timestamp::now(), ttl);
        if n > 0 {
            tracing::warn!(
                reservations = n,
                "expired reservations of requests that never settled"
            );
        }
        let n = app.wallets.expire_holds(Timestamp::now(), ttl);
        if n > 0 {
            tracing::warn!(
                holds = n,
                "expired wallet holds of requests that never settled"
            );
        }
        // Grants expire once for the whole ledger: on the node that leads (the
        // others follow its postings).
        if !app.leads().await {
            continue;
        }
        let expired = {
            let _guard = app.admin_lock.lock().await;
            let postings = app.wallets.expire_grants(Timestamp::now());
            let entries: Vec<Entry> = postings
                .into_iter()
                .map(|(node, p)| Entry::new(Timestamp::now(), node, EntryBody::Posting(p)))
                .collect();
            if entries.is_empty() {
                Ok(0..0)
            } else {
                app.append(&entries).await
            }
        };
        if let Err(e) = expired {
            // Applied in the engine already; a restart replays the log without these
            // postings and the grants expire again then.
            tracing::error!(detail = %e.detail, "grant expiries not recorded");
        }
    }
}

/// `PUT /api/v1/budgets/{path}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tokens: Option<u64>,
    #[serde(default)]
    requests: Option<u64>,
    #[serde(default)]
    selector: Option<ciyuan_core::Selector>,
    period: BudgetPeriod,
    #[serde(default)]
    mode: Option<BudgetMode>,
    #[serde(default)]
    per: Option<BudgetPer>,
    #[serde(default)]
    thresholds: Option<Vec<u8>>,
    #[serde(default)]
    clamp: bool,
    /// A money limit: the amount per window, an exact decimal string (`"500"`), with
    /// `currency`.
    #[serde(default, alias = "cost")]
    amount: Option<String>,
    #[serde(default)]
    currency: Option<String>,
}

/// The default name of a limit set without one.
const DEFAULT_NAME: &str = "default";
/// Thresholds of a limit set without them.
const DEFAULT_THRESHOLDS: [u8; 3] = [50, 80, 100];

#[derive(Serialize)]
struct LimitView {
    node: String,
    name: String,
    /// In words: `1000000 tokens per month`, `60 requests per minute per key`.
    limit: String,
    measure: String,
    period: &'static str,
    mode: String,
    per: &'static str,
    amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_start: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_end: Option<Timestamp>,
    /// Net usage in the window: corrections count, so a credit can make it negative.
    used: i128,
    reserved: u64,
    remaining: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    thresholds: Vec<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    clamp: bool,
    /// For money limits: the amount, used, reserved and remaining, exact decimals.
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<serde_json::Value>,
}

fn view(s: LimitStatus) -> LimitView {
    LimitView {
        node: s.spec.node.to_string(),
        name: s.spec.name.clone(),
        limit: s.spec.describe(),
        measure: s.spec.measure.to_string(),
        period: match s.spec.period {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Lifetime => "lifetime",
        },
        mode: s.spec.mode.to_string(),
        per: match s.spec.scope {
            LimitScope::Node => "node",
            LimitScope::Session => "session",
            LimitScope::Key => "key",
            LimitScope::Request => "request",
        },
        amount: s.spec.amount,
        subject: subject_name(&s.subject),
        window_start: s.window_start,
        window_end: s.window_end,
        used: s.used,
        reserved: s.reserved,
        remaining: s.remaining,
        thresholds: s.spec.thresholds.clone(),
        clamp: s.spec.clamp,
        cost: s.cost.as_ref().map(|c| {
            serde_json::json!({
                "currency": c.currency.as_str(),
                "amount": s.spec.money.to_string(),
                "used": c.used.to_string(),
                "reserved": c.reserved.to_string(),
                "remaining": c.remaining.to_string(),
            })
        }),
    }
}

/// The node a `{path}` names, within the caller's subtree and existing.
pub(crate) async fn existing_node(
    app: &Arc<App>,
    caller: &Caller,
    raw: &str,
) -> Result<AccountPath, ApiError> {
    let node = parse_path(raw, "path")?;
    caller.require_within(&node)?;
    app.require_account(&node).await?;
    Ok(node)
}

/// The live view of a node: its limits and its ancestors' (each with used, reserved
/// and remaining), and the access rules on the path.
///
/// Per-session and per-key counters of limits on nodes above the caller's key are
/// left out: a session or key counted there may belong to another tenant under the
/// same ancestor, and its subject (a `user` value, an e-mail address, a key id) and
/// usage are that tenant's.
async fn answer(
    app: &Arc<App>,
    caller: &Caller,
    node: &AccountPath,
) -> axum::Json<serde_json::Value> {
    let now = Timestamp::now();
    let mine = &caller.key.account;
    let mut limits: Vec<LimitView> = app
        .budget
        .status_path(node, now)
        .into_iter()
        .filter(|s| {
            s.subject == Subject::Node
                || s.subject == Subject::Request
                || s.spec.node.is_within(mine)
        })
        .map(view)
        .collect();
    // Per-session, per-key and per-request limits have no counter until first used:
    // show them anyway, unused.
    for p in node.lineage() {
        for spec in app.budget.limits(&p) {
            if !limits
                .iter()
                .any(|l| l.node == p.as_str() && l.name == spec.name)
            {
                let window = spec.window(now);
                limits.push(view(LimitStatus {
                    remaining: spec.amount,
                    subject: Subject::Node,
                    window_start: window.map(|w| w.0),
                    window_end: window.map(|w| w.1),
                    used: 0,
                    reserved: 0,
                    cost: match spec.measure {
                        Measure::Cost(currency) => Some(ciyuan_budget::CostStatus {
                            currency,
                            used: ciyuan_core::ExactSum::ZERO,
                            reserved: ciyuan_core::ExactSum::ZERO,
                            remaining: ciyuan_core::ExactSum::of(spec.money),
                        }),
                        _ => None,
                    },
                    spec,
                }));
            }
        }
    }
    let mut models = Vec::new();
    for p in node.lineage() {
        let (allow, deny) = app.budget.models(&p);
        if allow.is_some() || !deny.is_empty() {
            models.push(serde_json::json!({"node": p.as_str(), "allow": allow, "deny": deny}));
        }
    }
    axum::Json(serde_json::json!({
        "account": node.as_str(),
        "limits": limits,
        "models": models,
    }))
}

/// `GET /api/v1/budgets/{path}`
pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let node = existing_node(&app, &caller, &raw).await?;
    Ok(answer(&app, &caller, &node).await)
}

/// `PUT /api/v1/budgets/{path}`
pub async fn set(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(b): Json<SetBody>,
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    caller.require(Scope::Admin)?;
    let node = existing_node(&app, &caller, &raw).await?;
    let cost = match (&b.amount, &b.currency) {
        (None, None) => None,
        (Some(a), Some(c)) => Some(ciyuan_core::CostAmount {
            amount: ciyuan_core::decimal_from_text(a)
                .map_err(|e| ApiError::bad_request(format!("amount: {e}")))
                .and_then(|d| {
                    if d.is_sign_negative() && !d.is_zero() {
                        Err(ApiError::bad_request(format!(
                            "amount: {a} is negative; a money limit is zero or more"
                        )))
                    } else {
                        Ok(d)
                    }
                })?,
            currency: c
                .parse()
                .map_err(|e| ApiError::bad_request(format!("currency: {e}")))?,
        }),
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "currency: required with a money amount (CNY, USD, ...)",
            ));
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request("amount: required with a currency"));
        }
    };
    let (measure, amount) = match (b.tokens, b.requests, cost) {
        (Some(t), None, None) => (BudgetMeasure::Tokens, t),
        (None, Some(r), None) => (BudgetMeasure::Requests, r),
        (None, None, Some(_)) => (BudgetMeasure::Cost, 0),
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "tokens, requests or amount with currency: required",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "give one of tokens, requests or amount (money), not several",
            ));
        }
    };
    if measure != BudgetMeasure::Tokens && b.selector.is_some() {
        return Err(ApiError::bad_request(
            "selector: only token limits select tokens",
        ));
    }
    let budget = BudgetSet {
        name: b.name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
        measure,
        selector: b.selector.unwrap_or_default(),
        amount,
        period: b.period,
        mode: b.mode.unwrap_or(BudgetMode::Hard),
        per: b.per.unwrap_or_default(),
        thresholds: b.thresholds.unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec()),
        clamp: b.clamp,
        set_by: Some(caller.key.account.clone()),
        cost,
    };
    check_text("name", &budget.name, ciyuan_budget::MAX_NAME_BYTES)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let n = node.clone();
    let tz = app
        .blocking(move |app| Ok(ciyuan_store::effective_time_zone(app.store.as_ref(), &n)?))
        .await?;
    let mut spec = spec_of(&node, &budget, tz)
        .ok_or_else(|| ApiError::bad_request("amount: a money limit needs its amount"))?;
    // Checked by the engine's own rules before anything is recorded.
    spec.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let _guard = app.admin_lock.lock().await;
    may_change_limit(&app, &caller, &node, &budget.name).await?;
    // The engine takes the limit from the entry (`App::apply_controls`), counting
    // what its window already holds.
    app.append_visible(&[Entry::new(
        Timestamp::now(),
        node.clone(),
        EntryBody::BudgetSet(budget),
    )])
    .await?;
    Ok((StatusCode::OK, answer(&app, &caller, &node).await))
}

/// `DELETE /api/v1/budgets/{path}` query: which limit (default `default`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearParams {
    name: Option<String>,
}

/// `DELETE /api/v1/budgets/{path}?name=`
pub async fn clear(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Query(p): Query<ClearParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let node = existing_node(&app, &caller, &raw).await?;
    let name = p.name.unwrap_or_else(|| DEFAULT_NAME.to_string());
    let _guard = app.admin_lock.lock().await;
    if !app.budget.limits(&node).iter().any(|l| l.name == name) {
        return Err(ApiError::not_found(format!("no limit {name:?} on {node}")));
    }
    may_change_limit(&app, &caller, &node, &name).await?;
    app.append_visible(&[Entry::new(
        Timestamp::now(),
        node.clone(),
        EntryBody::BudgetCleared(BudgetCleared {
            name: name.clone(),
            cleared_by: Some(caller.key.account.clone()),
        }),
    )])
    .await?;
    Ok(answer(&app, &caller, &node).await)
}

/// Most model patterns in one allow or deny list.
const MAX_MODEL_PATTERNS: usize = 256;
/// Longest model pattern, as long as the longest model name the gateway accepts.
const MAX_MODEL_PATTERN_BYTES: usize = 256;

/// Refuses unless the caller's key sits at or above the node of the key that set
/// limit `name` on `node` (if the limit exists). Call under the admin lock, so the
/// projections hold every earlier change.
async fn may_change_limit(
    app: &Arc<App>,
    caller: &Caller,
    node: &AccountPath,
    name: &str,
) -> Result<(), ApiError> {
    app.caught_up().await?;
    let (n, nm) = (node.clone(), name.to_string());
    let current = app
        .blocking(move |app| {
            Ok(app
                .store
                .budgets()?
                .into_iter()
                .find(|(p, b)| *p == n && b.name == nm)
                .map(|(_, b)| b))
        })
        .await?;
    match current {
        Some(b) if !may_change_control(b.set_by.as_ref(), &caller.key.account) => Err(from_above(
            &format!("limit {name:?}"),
            node,
            b.set_by.as_ref(),
        )),
        _ => Ok(()),
    }
}

/// The refusal of a change to a control set from above the caller.
fn from_above(what: &str, node: &AccountPath, set_by: Option<&AccountPath>) -> ApiError {
    let setter = set_by.map_or_else(
        || "/ (set before setters were recorded)".to_string(),
        AccountPath::to_string,
    );
    ApiError::forbidden(format!(
        "{what} on {node} was set by a key at {setter}: only a key at that node or above may change or remove it"
    ))
}

/// `PUT /api/v1/access/{path}` body: model patterns allowed and denied.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessBody {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `PUT /api/v1/access/{path}`
pub async fn set_access(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(b): Json<AccessBody>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let node = existing_node(&app, &caller, &raw).await?;
    for (list, patterns) in [
        ("allow", b.allow.as_deref().unwrap_or(&[])),
        ("deny", &b.deny),
    ] {
        if patterns.len() > MAX_MODEL_PATTERNS {
            return Err(ApiError::bad_request(format!(
                "{list}: more than {MAX_MODEL_PATTERNS} model patterns"
            )));
        }
        for p in patterns {
            check_text(list, p, MAX_MODEL_PATTERN_BYTES)
                .map_err(|e| ApiError::bad_request(format!("model pattern {p:?}: {e}")))?;
        }
    }
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    let n = node.clone();
    let current = app
        .blocking(move |app| {
            Ok(app
                .store
                .access_rules()?
                .into_iter()
                .find(|(p, r)| *p == n && (r.allow.is_some() || !r.deny.is_empty()))
                .map(|(_, r)| r))
        })
        .await?;
    if let Some(r) = current
        && !may_change_control(r.set_by.as_ref(), &caller.key.account)
    {
        return Err(from_above(
            "the model access rules",
            &node,
            r.set_by.as_ref(),
        ));
    }
    let rules = AccessSet {
        allow: b.allow,
        deny: b.deny,
        set_by: Some(caller.key.account.clone()),
    };
    app.append_visible(&[Entry::new(
        Timestamp::now(),
        node.clone(),
        EntryBody::AccessSet(rules.clone()),
    )])
    .await?;
    Ok(answer(&app, &caller, &node).await)
}

/// `GET /api/v1/webhooks/deliveries?limit=`: the newest delivery records (queued,
/// failed with status or error, delivered, gave up), for root admins.
pub async fn deliveries(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(p): Query<DeliveriesParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "webhook deliveries are visible to admin keys at the root account / only",
        ));
    }
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let rows: Vec<serde_json::Value> = app
        .config
        .notifier
        .as_ref()
        .map(|n| n.deliveries(limit))
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "ts": d.ts,
                "event_id": d.event_id,
                "target": d.target,
                "state": d.state,
                "attempt": d.attempt,
                "status": d.status,
                "error": d.error,
                "next_retry": d.next_retry,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "rows": rows })))
}

/// `GET /api/v1/webhooks/deliveries` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesParams {
    limit: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{AccountInfo, BudgetMeasure, CostAmount, Currency, TokenMap, Usage};
    use ciyuan_store_sqlite::SqliteStore;

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    fn path(p: &str) -> AccountPath {
        AccountPath::parse(p).unwrap()
    }

    /// A gateway request's entry: `input` tokens costing `input` fen, by `key`, in
    /// `session`.
    fn request(node: &str, t: &str, input: i64, key: &str, session: Option<&str>) -> Entry {
        let mut tokens = TokenMap::new();
        tokens
            .add(
                ciyuan_core::Modality::Text,
                ciyuan_core::Direction::Input,
                input,
            )
            .unwrap();
        let cny: Currency = "CNY".parse().unwrap();
        let usage = Usage {
            service: "llm.chat".into(),
            model: Some("gpt-4o".into()),
            tokens,
            key: Some(key.into()),
            session: session.map(String::from),
            rating: Some(Box::new(ciyuan_core::Rating::new(
                rust_decimal::Decimal::new(input, 2),
                cny,
                "list",
                1,
            ))),
            ..Usage::default()
        };
        Entry::new(at(t), path(node), EntryBody::Usage(usage))
    }

    fn limit(name: &str, per: BudgetPer, cost: bool) -> BudgetSet {
        BudgetSet {
            name: name.into(),
            measure: if cost {
                BudgetMeasure::Cost
            } else {
                BudgetMeasure::Tokens
            },
            selector: Default::default(),
            amount: if cost { 0 } else { 1000 },
            period: BudgetPeriod::Day,
            mode: BudgetMode::Hard,
            per,
            thresholds: vec![],
            clamp: false,
            set_by: None,
            cost: cost.then(|| CostAmount {
                amount: rust_decimal::Decimal::new(100, 0),
                currency: "CNY".parse().unwrap(),
            }),
        }
    }

    /// A restart restores per-key and per-session counters from the projections, in
    /// tokens and in money, for the current window only and for the limit's subtree
    /// only; a session spanning two nodes below the limit is one counter.
    #[test]
    fn load_restores_key_and_session_counters_of_the_window() {
        let store = SqliteStore::open_in_memory().unwrap();
        let created = |p: &str| {
            Entry::new(
                at("2026-11-01T00:00:00Z"),
                path(p),
                EntryBody::AccountCreated(AccountInfo::default()),
            )
        };
        let set = |b: BudgetSet| {
            Entry::new(
                at("2026-11-01T00:00:00Z"),
                path("acme"),
                EntryBody::BudgetSet(b),
            )
        };
        let entries = vec![
            created("acme"),
            created("acme/a"),
            created("acme/b"),
            created("beta"),
            set(limit("tokens-per-key", BudgetPer::Key, false)),
            set(limit("tokens-per-session", BudgetPer::Session, false)),
            set(limit("money-per-key", BudgetPer::Key, true)),
            // Yesterday: another window.
            request("acme/a", "2026-11-23T23:00:00Z", 500, "k1", Some("s")),
            request("acme/a", "2026-11-24T10:00:00Z", 10, "k1", Some("s")),
            request("acme/a", "2026-11-24T11:00:00Z", 20, "k1", None),
            request("acme/b", "2026-11-24T12:00:00Z", 7, "k2", Some("s")),
            // Outside the limits' subtree.
            request("beta", "2026-11-24T12:00:00Z", 300, "k9", Some("s")),
        ];
        store.apply(0, &entries).unwrap();
        let engine = load(&store, at("2026-11-24T15:00:00Z")).unwrap();
        let mut got: Vec<(String, String, String)> = engine
            .status(&path("acme"), at("2026-11-24T15:00:00Z"))
            .into_iter()
            .map(|s| {
                let used = match &s.cost {
                    Some(c) => c.used.to_string(),
                    None => s.used.to_string(),
                };
                (s.spec.name.clone(), format!("{:?}", s.subject), used)
            })
            .collect();
        got.sort();
        let want = [
            ("money-per-key", "Key(\"k1\")", "0.3"),
            ("money-per-key", "Key(\"k2\")", "0.07"),
            ("tokens-per-key", "Key(\"k1\")", "30"),
            ("tokens-per-key", "Key(\"k2\")", "7"),
            ("tokens-per-session", "Session(\"s\")", "17"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want);
    }
}
