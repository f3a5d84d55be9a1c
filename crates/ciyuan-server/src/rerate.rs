//! Re-rating: a price correction reaches usage already in the ledger by appending
//! `rating.correction` entries, never by editing an entry.
//!
//! `POST /api/v1/prices/rerate` rates every rated usage entry of a period (by the
//! entry's time) again with the prices in force now for that time: the book version
//! in force at the entry's time (a version recorded with `correct=true` may start in
//! the past), and the contract on the entry's path now. Where the rating differs from
//! the one the entry stands at (its own, or its latest correction's), one correction
//! records both, with a copy of the usage it re-rates. Running it again changes
//! nothing unless the prices changed again.
//!
//! The ledger is read up to its size when the re-rating starts: everything appended
//! after was rated by the prices in force then, which are the current ones (book and
//! contract changes wait on the admin lock the re-rating holds).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Json;
use crate::prices::{Basis, Prices, Rated};
use crate::{App, parse_path};
use axum::extract::State;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Currency, Entry, EntryBody, Rating, RatingBasis, RatingCorrection, Scope,
};
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Entries read from the ledger per blocking step (the corrections they yield are
/// appended before the next step reads on: memory stays bounded by a step).
const SCAN_STEP: u64 = 65_536;

/// Most corrections appended in one group.
const APPEND_GROUP: usize = 1024;

/// `POST /api/v1/prices/rerate` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerateRequest {
    /// Usage from this time (inclusive).
    from: Timestamp,
    /// Until this time (exclusive; default: now).
    to: Option<Timestamp>,
    /// Only this node's subtree (default: every node).
    account: Option<String>,
    /// Only entries standing at a rating by this book (default: any book).
    book: Option<String>,
    /// Answer what would change without appending anything.
    #[serde(default)]
    dry_run: bool,
}

/// Which entries a re-rating reads: the request, checked.
struct Selection {
    from: Timestamp,
    to: Timestamp,
    within: Option<AccountPath>,
    book: Option<String>,
}

/// The sums of a re-rating in one currency.
#[derive(Default)]
struct Sums {
    /// What the corrected entries stood at.
    previous: Decimal,
    /// What they stand at now.
    now: Decimal,
}

/// How far a re-rating got.
#[derive(Default)]
struct Progress {
    /// Rated usage entries of the period (and subtree, and book) read.
    examined: u64,
    /// Corrections appended (or, dry, that would be).
    corrected: u64,
    /// Entries whose rating the prices now in force would not give (no book,
    /// unpriced where it was priced, or other tiers than the entry was placed on):
    /// left as they are and counted.
    not_rerated: u64,
    /// Per currency.
    sums: BTreeMap<Currency, Sums>,
    /// First and last correction entries.
    entries: Option<(u64, u64)>,
}

/// The ratings entries stand at after their corrections, by usage entry index: the
/// corrections in the log before `end` (found without decoding every entry).
fn standing(app: &App, end: u64) -> Result<FxHashMap<u64, Rating>, ApiError> {
    // The kind is written right after the account, and an account path holds no
    // quote: this byte string appears in an entry only as its kind, or inside a
    // nested object of the entry's data, which the decoding below tells apart.
    const KIND: &[u8] = b"\"kind\":\"rating.correction\"";
    let mut out = FxHashMap::default();
    app.log
        .scan(0..end, &mut |_, bytes| {
            if bytes.windows(KIND.len()).any(|w| w == KIND)
                && let Ok(Entry {
                    body: EntryBody::RatingCorrection(c),
                    ..
                }) = Entry::decode(bytes)
            {
                out.insert(c.entry, *c.rating);
            }
            Ok(())
        })
        .map_err(ApiError::internal)?;
    Ok(out)
}

/// The basis the server would use again for an entry rated with `basis`.
fn basis_of(r: &Rating) -> Option<Basis> {
    r.basis.map(|b| match b {
        RatingBasis::Provider => Basis::Provider,
        RatingBasis::Recount => Basis::Recount,
        RatingBasis::Greater => Basis::Greater,
    })
}

/// Reads entries `range` and returns the corrections the prices in force now give.
fn step(
    app: &App,
    prices: &Prices,
    range: std::ops::Range<u64>,
    sel: &Selection,
    standing: &FxHashMap<u64, Rating>,
    progress: &mut Progress,
) -> Result<Vec<Entry>, ApiError> {
    let now = Timestamp::now();
    let mut out = Vec::new();
    let mut fail = None;
    app.log
        .scan(range, &mut |index, bytes| {
            let entry = match Entry::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    fail = Some(format!("entry {index} does not decode: {e}"));
                    return Ok(());
                }
            };
            let Entry {
                ts, account, body, ..
            } = entry;
            let EntryBody::Usage(usage) = body else {
                return Ok(());
            };
            if ts < sel.from
                || ts >= sel.to
                || sel.within.as_ref().is_some_and(|w| !account.is_within(w))
            {
                return Ok(());
            }
            let Some(original) = usage.rating.as_deref() else {
                return Ok(());
            };
            let was = standing.get(&index).unwrap_or(original);
            if sel.book.as_ref().is_some_and(|b| *b != was.book) {
                return Ok(());
            }
            progress.examined += 1;
            // Tiered units keep the place they were given in their period.
            let before = original.place.as_ref().map_or(Decimal::ZERO, |p| p.before);
            let mut rating =
                match app.rate_usage(prices, &account, ts, &usage, basis_of(original), before) {
                    Rated::Priced(r) => r,
                    Rated::Off | Rated::NoBook(_) => {
                        progress.not_rerated += 1;
                        return Ok(());
                    }
                };
            rating.place.clone_from(&original.place);
            // The units keep their place only on the same counter: an entry the
            // prices now put on other tiers (or none) is left for a person, as a
            // correction could not be placed without moving every entry after it.
            let counter = prices.rater_for(&account, ts).and_then(|rater| {
                let tokens = crate::prices::priced_tokens(&usage, original.basis);
                rater
                    .tier_counter(&crate::prices::usage_input(&usage, &tokens, ts, before))
                    .ok()
                    .flatten()
            });
            let same_counter = match (&original.place, &counter) {
                (None, None) => true,
                (Some(p), Some(c)) => p.rule == c.rule && p.units == c.units,
                _ => false,
            };
            if !same_counter {
                progress.not_rerated += 1;
                return Ok(());
            }
            if *rating == *was {
                return Ok(());
            }
            if rating.unpriced && !was.unpriced {
                // A rule removed since: a correction to zero would be a price, not
                // its absence; left for a person to decide.
                progress.not_rerated += 1;
                return Ok(());
            }
            let previous = was.clone();
            let correction = RatingCorrection {
                entry: index,
                at: ts,
                usage: Box::new(usage),
                previous: Box::new(previous),
                rating,
            };
            for (currency, _) in correction.changes() {
                progress.sums.entry(currency).or_default();
            }
            let s = progress
                .sums
                .entry(correction.previous.currency)
                .or_default();
            s.previous += correction.previous.amount;
            let s = progress.sums.entry(correction.rating.currency).or_default();
            s.now += correction.rating.amount;
            progress.corrected += 1;
            out.push(Entry::new(
                now,
                account,
                EntryBody::RatingCorrection(correction),
            ));
            Ok(())
        })
        .map_err(ApiError::internal)?;
    match fail {
        Some(why) => Err(ApiError::internal(why)),
        None => Ok(out),
    }
}

/// `POST /api/v1/prices/rerate`: re-rates a period's usage with the prices in force
/// now, appending a `rating.correction` per entry whose rating changes (root admin
/// key).
pub async fn rerate(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(req): Json<RerateRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "re-rating applies the price books to every tenant: only a root admin key may run it",
        ));
    }
    let to = req.to.unwrap_or_else(Timestamp::now);
    if req.from >= to {
        return Err(ApiError::unprocessable(format!(
            "from: {} is not before to ({to})",
            req.from
        )));
    }
    let within = req
        .account
        .as_deref()
        .map(|a| parse_path(a, "account"))
        .transpose()?;
    // Books and contracts change under this lock: the prices read now stay in force
    // until the re-rating ends, and two re-ratings never correct one entry twice.
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    let end = app.log.size();
    let prices = Arc::new(app.pricing.snapshot());
    let standing = Arc::new(app.blocking(move |app| standing(app, end)).await?);
    let sel = Arc::new(Selection {
        from: req.from,
        to,
        within,
        book: req.book.clone(),
    });
    let mut progress = Progress::default();
    let mut start = 0;
    while start < end {
        let stop = end.min(start + SCAN_STEP);
        let (prices2, sel2, standing2) = (prices.clone(), sel.clone(), standing.clone());
        let mut p = std::mem::take(&mut progress);
        let (found, p) = app
            .blocking(move |app| {
                let found = step(app, &prices2, start..stop, &sel2, &standing2, &mut p)?;
                Ok((found, p))
            })
            .await?;
        progress = p;
        if !req.dry_run {
            for group in found.chunks(APPEND_GROUP) {
                let range = app.append(group).await?;
                let first = progress.entries.map_or(range.start, |(f, _)| f);
                progress.entries = Some((first, range.end - 1));
            }
        }
        start = stop;
    }
    if let Some((_, last)) = progress.entries {
        app.projector
            .wait_for(last + 1, app.config.projection_wait)
            .await?;
    }
    let sums: Vec<serde_json::Value> = progress
        .sums
        .iter()
        .map(|(c, s)| {
            serde_json::json!({
                "currency": c.as_str(),
                "previous": s.previous.normalize().to_string(),
                "now": s.now.normalize().to_string(),
                "change": (s.now - s.previous).normalize().to_string(),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "from": req.from.to_string(),
        "to": to.to_string(),
        "read_to_entry": end,
        "examined": progress.examined,
        "corrected": progress.corrected,
        "not_rerated": progress.not_rerated,
        "dry_run": req.dry_run,
        "entries": progress.entries.map(|(f, l)| serde_json::json!({"first": f, "last": l})),
        "currencies": sums,
    })))
}
