//! Wallets: prepaid balances as double-entry postings in the ledger, the engine
//! (`ciyuan_budget::Wallets`) rebuilt from them, and the wallets API.
//!
//! Every movement is a `posting` entry whose debits equal its credits, checked when
//! appended (and again offline by `ciyuan audit verify`). Top-ups, grants, refunds and
//! transfers are written by keys strictly above the wallet's node (a tenant does not
//! fund itself); consumption is written by the server when a gateway request that the
//! wallet held money for settles. The engine applies a posting before it is appended,
//! under the admin lock, so a posting the engine refuses (a transfer of more than the
//! balance) is never recorded; if the append then fails, its mirror image is applied
//! to take it back. That is done under the rules gate's write guard, and consumption
//! is settled under its read guard, so a consumption never precedes in the log the
//! posting whose money it spends.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, PathParam, Query};
use crate::{App, parse_path};
use axum::extract::State;
use ciyuan_budget::{Hold, WalletView, Wallets};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Currency, Entry, EntryBody, Grant, Money, Posting, Scope, WalletSet,
    decimal_from_text,
};
use ciyuan_store::Store;
use serde::Deserialize;
use std::sync::Arc;

/// Postings read per page when the engine is rebuilt on start.
const LOAD_PAGE: usize = 10_000;
/// Most movements one `GET /api/v1/wallets/{path}` lists.
const MAX_MOVEMENTS: usize = 1000;

/// Builds the wallet engine from the projections: settings, then every posting in
/// entry order (each applied on its entry's account, as it was when appended).
pub(crate) fn load(store: &dyn Store) -> Result<Wallets, ApiError> {
    let wallets = Wallets::new();
    for (node, settings) in store.wallet_settings()? {
        wallets
            .apply_settings(&node, &settings)
            .map_err(|e| ApiError::internal(format!("wallet settings of {node}: {e}")))?;
    }
    let mut after = None;
    loop {
        let page = store.postings(None, after, LOAD_PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.entry);
        for p in &page {
            wallets
                .apply_posting(&p.account, &p.body, p.ts)
                .map_err(|e| ApiError::internal(format!("posting at entry {}: {e}", p.entry)))?;
        }
    }
    Ok(wallets)
}

impl App {
    /// Settles a gateway request's hold with what its entry cost (nothing: released),
    /// and returns the `consume` posting to append with the node it belongs on.
    pub(crate) fn settle_hold(
        &self,
        hold: Option<Hold>,
        node: &AccountPath,
        cost: Option<Money>,
        request: Option<&str>,
    ) -> Option<(AccountPath, Posting)> {
        let hold = hold?;
        let actual = match cost {
            Some(c) if c.currency == hold.currency && !c.amount.is_zero() => c.amount,
            Some(c) if c.currency != hold.currency => {
                // The hold was made at the same book's prices: a different currency
                // means the book changed under the request. Nothing is charged from
                // this wallet; the entry keeps its rating for the statement.
                tracing::warn!(%node, held = %hold.currency, rated = %c.currency, "hold released: the rating changed currency");
                self.wallets.release(&hold);
                return None;
            }
            _ => {
                self.wallets.release(&hold);
                return None;
            }
        };
        let now = Timestamp::now();
        let charged = match self.wallets.settle(&hold, actual, now) {
            // Held longer than the reservations' expiry: the hold is gone, the money
            // was spent all the same.
            Err(ciyuan_budget::WalletError::UnknownHold(_)) => {
                tracing::warn!(%node, "a request outlived its wallet hold: charged without it");
                self.wallets.charge(node, hold.currency, actual, now)
            }
            other => other,
        };
        match charged {
            Ok(Some(charge)) => {
                if !charge.beyond_hold.is_zero() {
                    tracing::warn!(%node, beyond = %charge.beyond_hold, "request cost more than its hold: charged all the same");
                }
                let mut posting = charge.posting;
                if let Some(id) = request {
                    posting.memo = format!("gateway request {id}");
                }
                Some((charge.node, posting))
            }
            Ok(None) => None,
            Err(e) => {
                // The money was spent; the posting could not be formed (a cost of more
                // than 28 significant digits). Said loudly, never silently dropped.
                tracing::error!(%node, error = %e, amount = %actual, "wallet consumption not recorded");
                None
            }
        }
    }
}

/// A wallet's view as the API shows it (amounts as exact decimal strings).
fn view(w: &WalletView) -> serde_json::Value {
    serde_json::json!({
        "node": w.node,
        "currency": w.currency.as_str(),
        "balance": w.balance.to_string(),
        "cash": w.cash.to_string(),
        "reserved": w.reserved.to_string(),
        "available": w.available.to_string(),
        "overdraft": w.overdraft.to_string(),
        "grants": w.grants.iter().map(|g| serde_json::json!({
            "id": g.id,
            "priority": g.priority,
            "expires_at": g.expires_at,
            "balance": g.balance.to_string(),
            "reserved": g.reserved.to_string(),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /api/v1/wallets/{path}` query: the movements page.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowParams {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/v1/wallets/{path}?after=&limit=`: the node's wallets (balance, reserved,
/// available, grants) and its movements, a page at a time.
pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Query(p): Query<ShowParams>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    app.caught_up().await?;
    let limit = p.limit.unwrap_or(100).clamp(1, MAX_MOVEMENTS);
    let n = node.clone();
    let movements = app
        .blocking(move |app| Ok(app.store.postings(Some(&n), p.after, limit)?))
        .await?;
    let now = Timestamp::now();
    let wallets: Vec<serde_json::Value> = app
        .wallets
        .currencies(&node)
        .into_iter()
        .filter_map(|c| app.wallets.balance(&node, c, now))
        .map(|w| view(&w))
        .collect();
    let next = (movements.len() == limit).then(|| movements.last().map(|m| m.entry));
    Ok(axum::Json(serde_json::json!({
        "account": node,
        "wallets": wallets,
        "movements": movements.iter().map(|m| serde_json::json!({
            "entry": m.entry,
            "ts": m.ts,
            "account": m.account,
            "kind": m.body.kind,
            "currency": m.body.currency.as_str(),
            "memo": m.body.memo,
            "legs": m.body.legs.iter().map(|l| serde_json::json!({
                "account": l.account.to_string(),
                "debit": l.debit.to_string(),
                "credit": l.credit.to_string(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "next": next.flatten(),
    })))
}

/// `POST /api/v1/wallets/{path}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    kind: String,
    amount: String,
    currency: String,
    #[serde(default)]
    memo: Option<String>,
    #[serde(default)]
    grant: Option<Grant>,
    /// A transfer's destination.
    #[serde(default)]
    to: Option<String>,
}

/// `POST /api/v1/wallets/{path}`: a top-up (money paid in), a grant (free credits
/// with priority and expiry), a refund (money given back into the wallet) or a
/// transfer to another node (`to`), written as one balanced posting by a key strictly
/// above every wallet it moves.
pub async fn post(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(b): Json<MoveBody>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    let amount =
        decimal_from_text(&b.amount).map_err(|e| ApiError::bad_request(format!("amount: {e}")))?;
    if amount <= rust_decimal::Decimal::ZERO {
        return Err(ApiError::bad_request(format!(
            "amount: {} must be above zero",
            b.amount
        )));
    }
    let currency: Currency = b
        .currency
        .parse()
        .map_err(|e| ApiError::bad_request(format!("currency: {e}")))?;
    let mine = caller.key.account.clone();
    let from_above = |n: &AccountPath| -> Result<(), ApiError> {
        if ciyuan_core::may_post(Some(&mine), n) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the wallet of {n} is funded from above: only a key strictly above it may move its money"
            )))
        }
    };
    from_above(&node)?;
    // The node a posting is written on: the wallet's, or for a transfer the nearest
    // node above both wallets (the engine checks every leg is on or below it).
    let (mut posting, on) = match b.kind.as_str() {
        "topup" => (Posting::topup(&node, currency, amount), node.clone()),
        "refund" => (Posting::refund(&node, currency, amount), node.clone()),
        "grant" => {
            let g = b.grant.clone().ok_or_else(|| {
                ApiError::bad_request("grant: a grant needs {\"id\", \"priority\", \"expires_at\"}")
            })?;
            (Posting::grant(&node, currency, amount, g), node.clone())
        }
        "transfer" => {
            let to = parse_path(
                b.to.as_deref()
                    .ok_or_else(|| ApiError::bad_request("to: a transfer needs its destination"))?,
                "to",
            )?;
            caller.require_within(&to)?;
            app.require_account(&to).await?;
            from_above(&to)?;
            if to == node {
                return Err(ApiError::bad_request(
                    "to: a transfer moves money between two nodes",
                ));
            }
            let common = node
                .lineage()
                .into_iter()
                .rev()
                .find(|a| to.is_within(a))
                .unwrap_or_else(AccountPath::root);
            (Posting::transfer(&node, &to, currency, amount), common)
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "kind: {other:?} is not topup, grant, refund or transfer"
            )));
        }
    };
    posting.memo = b.memo.unwrap_or_default();
    posting.set_by = Some(mine.clone());
    posting
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let _guard = app.admin_lock.lock().await;
    // A consumption that draws on this money is settled under the rules gate's read
    // guard: holding the write guard until this posting holds its place in the ledger
    // keeps every such consumption after it (a replay meets the grant before its use).
    let _rules = app.rules_gate.write().await;
    let now = Timestamp::now();
    // Applied first, so a posting the wallet refuses (more than it holds beside what
    // requests in flight hold) is never recorded.
    app.wallets
        .apply_funded_posting(&on, &posting, now)
        .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    let entry = Entry::new(now, on.clone(), EntryBody::Posting(posting.clone()));
    let range = match app.append_visible(std::slice::from_ref(&entry)).await {
        Ok(r) => r,
        Err(e) => {
            let mirror = posting.reversal();
            if let Err(undo) = app.wallets.apply_posting(&on, &mirror, now) {
                tracing::error!(error = %undo, "a posting that was not recorded could not be taken back");
            }
            return Err(e);
        }
    };
    let wallet = app.wallets.balance(&node, currency, Timestamp::now());
    Ok(axum::Json(serde_json::json!({
        "entry": range.start,
        "posting": posting,
        "wallet": wallet.as_ref().map(view),
    })))
}

/// `PUT /api/v1/wallets/{path}/settings` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    currency: String,
    overdraft: String,
}

/// `PUT /api/v1/wallets/{path}/settings`: how far below zero the node's wallet may be
/// spent, from a key strictly above it.
pub async fn settings(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Json(b): Json<SettingsBody>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    let raw = raw
        .strip_suffix("/settings")
        .ok_or_else(|| ApiError::not_found("no such route"))?;
    let node = parse_path(raw, "path")?;
    caller.require_within(&node)?;
    app.require_account(&node).await?;
    if !ciyuan_core::may_post(Some(&caller.key.account), &node) {
        return Err(ApiError::forbidden(format!(
            "the overdraft of {node} is set from above: only a key strictly above it may set it"
        )));
    }
    let set = WalletSet {
        currency: b
            .currency
            .parse()
            .map_err(|e| ApiError::bad_request(format!("currency: {e}")))?,
        overdraft: decimal_from_text(&b.overdraft)
            .map_err(|e| ApiError::bad_request(format!("overdraft: {e}")))?,
        set_by: Some(caller.key.account.clone()),
    };
    set.check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let _guard = app.admin_lock.lock().await;
    let range = app
        .append_visible(&[Entry::new(
            Timestamp::now(),
            node.clone(),
            EntryBody::WalletSet(set.clone()),
        )])
        .await?;
    app.wallets
        .apply_settings(&node, &set)
        .map_err(|e| ApiError::internal(format!("wallet settings of {node}: {e}")))?;
    Ok(axum::Json(serde_json::json!({
        "entry": range.start,
        "settings": set,
        "wallet": app.wallets.balance(&node, set.currency, Timestamp::now()).as_ref().map(view),
    })))
}
