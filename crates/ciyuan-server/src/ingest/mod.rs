//! `POST /v1/events`: the second door. Any AI service reports usage as CloudEvents 1.0
//! (structured mode, or the batch format); each accepted event becomes one usage entry.
//!
//! - Idempotent on `(source, id)`, across restarts: [`Recent`] holds, in memory, the
//!   hash of every ingested event's key with the entry that recorded it (loaded at start
//!   from the projections' index, which only appends) and the events appended but not
//!   yet projected. A repeat answers the original entry and is never counted twice.
//! - A batch answers per event; bad events are rejected alone, and the good ones are
//!   appended together in one durable group, so nothing is half-written.
//! - Late events are accepted within `ingest_max_age` and land in their own period.
//!
//! Rooms: `cloudevents.rs` reads a body's events and checks each into a usage entry;
//! `index.rs` is the idempotency index (claims in flight, the table of key hashes);
//! this file is the handler: deduplicate, rate, place, claim, append, answer.

mod cloudevents;
mod index;

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Direction, Entry, EntryBody, GATEWAY_SOURCE, MAX_TOKENS_PER_KEY, Modality, Scope,
    ServiceTier, TokenMap, Usage, ingest_key_hash,
};
use ciyuan_store::{Log, Store};
use cloudevents::*;
pub use index::Recent;
use index::*;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::collections::hash_map::Entry as HashEntry;
use std::sync::Arc;
use tokio::sync::watch;

/// The answer for one event.
enum Outcome {
    /// Appended as entry `entry_id`: the event at `pos` of `claim`.
    Accepted {
        claim: Arc<Claim>,
        pos: usize,
        entry_id: u64,
        /// The usage pushed a hard limit over its amount (it is recorded: it happened).
        over_limit: bool,
    },
    Duplicate {
        source: String,
        id: String,
        entry_id: u64,
    },
    Rejected {
        source: Option<String>,
        id: Option<String>,
        error: ApiError,
    },
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        match self {
            Outcome::Accepted {
                claim,
                pos,
                entry_id,
                over_limit,
            } => {
                let (source, id) = event_key(&claim.entries[*pos]);
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "accepted")?;
                m.serialize_entry("entry_id", entry_id)?;
                if *over_limit {
                    m.serialize_entry("over_limit", &true)?;
                }
            }
            Outcome::Duplicate {
                source,
                id,
                entry_id,
            } => {
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "duplicate")?;
                m.serialize_entry("entry_id", entry_id)?;
            }
            Outcome::Rejected { source, id, error } => {
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "rejected")?;
                m.serialize_entry(
                    "error",
                    &json!({"status": error.status.as_u16(), "detail": error.detail}),
                )?;
            }
        }
        m.end()
    }
}

/// What the body holds.
enum Mode {
    Single,
    Batch,
}

fn mode(headers: &HeaderMap, body: &[u8]) -> Result<Mode, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let array = first == Some(&b'[');
    let object = first == Some(&b'{');
    match ct.as_str() {
        "application/cloudevents-batch+json" if array => Ok(Mode::Batch),
        "application/cloudevents-batch+json" if object => Err(ApiError::bad_request(
            "a CloudEvents batch must be a JSON array",
        )),
        "application/json" if array => Ok(Mode::Batch),
        "application/cloudevents+json" | "application/json" if object => Ok(Mode::Single),
        "application/cloudevents+json"
        | "application/json"
        | "application/cloudevents-batch+json" => {
            // Not an object or array: say what is wrong with the JSON, or its shape.
            crate::extract::parse_json::<serde::de::IgnoredAny>(body)?;
            Err(ApiError::bad_request(
                "the body must be a CloudEvent object (or an array in batch mode)",
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "expected Content-Type application/cloudevents+json or application/cloudevents-batch+json",
        )),
    }
}

/// The batch answer.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    results: &'a [Outcome],
}

impl BatchAnswer<'_> {
    /// The answer as serde writes it, accepted events written by hand: through serde's
    /// map machinery each of a batch's thousand results cost ~0.14 µs
    /// (`bench ingest`), a few percent of ingesting it. The test
    /// `batch_answers_are_written_as_serde_writes_them` holds the two to the same bytes.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        use std::io::Write as _;
        let io = serde_json::Error::io;
        write!(
            out,
            r#"{{"accepted":{},"duplicates":{},"rejected":{},"results":["#,
            self.accepted, self.duplicates, self.rejected
        )
        .map_err(io)?;
        for (i, o) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match o {
                Outcome::Accepted {
                    claim,
                    pos,
                    entry_id,
                    over_limit,
                } => {
                    let (source, id) = event_key(&claim.entries[*pos]);
                    out.extend_from_slice(br#"{"source":"#);
                    serde_json::to_writer(&mut *out, source)?;
                    out.extend_from_slice(br#","id":"#);
                    serde_json::to_writer(&mut *out, id)?;
                    write!(out, r#","status":"accepted","entry_id":{entry_id}"#).map_err(io)?;
                    if *over_limit {
                        out.extend_from_slice(br#","over_limit":true"#);
                    }
                    out.push(b'}');
                }
                other => serde_json::to_writer(&mut *out, other)?,
            }
        }
        out.extend_from_slice(b"]}");
        Ok(())
    }
}

pub async fn events(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Ingest)?;
    let body = body.map_err(crate::extract::body_error)?;
    let mode = mode(&headers, &body)?;
    // One pass checks the whole body is JSON (syntax, UTF-8, depth) and reads each
    // event's attributes as slices of the body, without building a tree.
    let events: Vec<Slot<'_>> = match mode {
        Mode::Batch => crate::extract::parse_json_borrowed(&body)?,
        Mode::Single => vec![crate::extract::parse_json_borrowed(&body)?],
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("the batch holds no event"));
    }
    if events.len() > app.config.max_events_per_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "a batch holds at most {} events",
                app.config.max_events_per_batch
            ),
        ));
    }
    // Measured and rated under the rules in force until the append is submitted (see
    // `App::rules_gate`).
    let rules = app.rules_gate.clone().read_owned().await;
    let now = Timestamp::now();
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
    let mut candidates = Candidates::with_capacity(events.len());
    let mut last_account = None;
    for (i, ev) in events.into_iter().enumerate() {
        match validate(&app, &caller, ev, now, &mut last_account) {
            Ok(a) => {
                candidates.push(i, a);
                outcomes.push(None);
            }
            Err((source, id, error)) => {
                outcomes.push(Some(Outcome::Rejected { source, id, error }))
            }
        }
    }
    // Once events are checked, recording them runs to its end even if the client goes:
    // an append cut off between the ledger and the idempotency index could be counted
    // twice on a retry.
    let task = tokio::spawn(record(
        app,
        caller.key.key_id.clone(),
        candidates,
        outcomes,
        rules,
    ));
    let outcomes = task.await.map_err(ApiError::internal)??;
    match mode {
        Mode::Single => match outcomes.into_iter().next() {
            Some(Outcome::Rejected { error, .. }) => Err(error),
            Some(o @ Outcome::Accepted { .. }) => {
                Ok((StatusCode::CREATED, axum::Json(o)).into_response())
            }
            Some(o) => Ok((StatusCode::OK, axum::Json(o)).into_response()),
            None => Err(ApiError::internal("no outcome for the event")),
        },
        Mode::Batch => {
            let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
            let body = BatchAnswer {
                accepted: count(|o| matches!(o, Outcome::Accepted { .. })),
                duplicates: count(|o| matches!(o, Outcome::Duplicate { .. })),
                rejected: count(|o| matches!(o, Outcome::Rejected { .. })),
                results: &outcomes,
            };
            let mut json = Vec::with_capacity(64 + 96 * outcomes.len());
            body.write_json(&mut json).map_err(ApiError::internal)?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response())
        }
    }
}

/// Deduplicates the checked events and appends the new ones.
async fn record(
    app: Arc<App>,
    key_id: String,
    candidates: Candidates,
    mut outcomes: Vec<Option<Outcome>>,
    rules: tokio::sync::OwnedRwLockReadGuard<()>,
) -> Result<Vec<Outcome>, ApiError> {
    let mut rules = Some(rules);
    // Accounts must exist; checked once per distinct account.
    let accounts: Vec<AccountPath> = {
        let mut distinct = FxHashSet::default();
        candidates
            .entries
            .iter()
            .filter(|e| distinct.insert(&e.account))
            .map(|e| e.account.clone())
            .collect()
    };
    let missing = app
        .blocking(move |app| {
            let mut missing = Vec::new();
            for a in accounts {
                if app.store.account(&a)?.is_none() {
                    missing.push(a);
                }
            }
            Ok(missing)
        })
        .await?;
    // The same event twice in one batch: the second is a duplicate of the first.
    let first_of: Vec<Option<usize>> = {
        let mut first: FxHashMap<(&str, &str), usize> =
            FxHashMap::with_capacity_and_hasher(candidates.len(), Default::default());
        candidates
            .slots
            .iter()
            .zip(&candidates.entries)
            .map(|(&i, e)| match first.entry(event_key(e)) {
                HashEntry::Occupied(o) => Some(*o.get()),
                HashEntry::Vacant(v) => {
                    v.insert(i);
                    None
                }
            })
            .collect()
    };

    // Priced before the lock (pure work): each entry carries its amount, book and
    // unit prices into the ledger.
    let mut candidates = candidates;
    let prices = app.pricing.snapshot();
    let price_incidents = app.rate_entries(&prices, candidates.entries.iter_mut());
    app.raise_price_incidents(price_incidents).await;

    // Classify and claim under the lock, so two requests carrying the same event cannot
    // both append it; the lock is not held while appending, so concurrent requests
    // still share group commits.
    let mut tiers: Option<crate::tiers::TiersGuard> = None;
    // Tiered books place under the tier counters' lock, taken before the ingest lock:
    // with several nodes it may wait for the follower, which takes the ingest lock.
    let mut placing = if prices.tiered() {
        Some(app.lock_tiers().await?)
    } else {
        None
    };
    let slots;
    let mut waits = Vec::new();
    let pruned;
    let claim = {
        let mut recent = app.ingest_lock.lock().await;
        pruned = recent.prune(app.projected());
        recent.seen.warm(candidates.hashes.iter().copied());
        // What becomes of each candidate is decided first and the entries are moved
        // once, at the end: an entry is ~370 bytes, and with every event new (the
        // common batch) the vectors go to the ledger as they are, with no move at all.
        let mut fates: Vec<Fate> = Vec::with_capacity(candidates.len());
        let mut known = Vec::new();
        for (k, (e, first)) in candidates.entries.iter().zip(first_of).enumerate() {
            fates.push(if missing.contains(&e.account) {
                Fate::Rejected(ApiError::unprocessable(format!(
                    "subject: account {} does not exist",
                    e.account
                )))
            } else if let Some(first) = first {
                Fate::Rejected(ApiError::conflict(format!(
                    "duplicate of event {first} in the same batch"
                )))
            } else if recent.seen.claim(candidates.hashes[k]) {
                // A hash never seen: the event is new (and its hash now seen).
                Fate::Fresh
            } else {
                // The hash is known: the exact answer is in memory or in the store.
                known.push(k);
                Fate::Known
            });
        }
        let held = {
            let wanted: Vec<_> = known
                .iter()
                .map(|&k| (candidates.hashes[k], event_key(&candidates.entries[k])))
                .collect();
            recent.find_many(&wanted)
        };
        let mut unknown = Vec::new();
        for (k, held) in known.into_iter().zip(held) {
            fates[k] = match held {
                Some((claim, pos)) => match claim.state() {
                    Some(Ok(start)) => Fate::Duplicate(start + pos as u64),
                    _ => Fate::Wait(claim, pos),
                },
                None => {
                    unknown.push(k);
                    continue;
                }
            };
        }
        if !unknown.is_empty() {
            // Events whose hash is known but not held here: the entries recorded under
            // that hash are read back from the log and compared by exact key.
            let wanted: Vec<(String, String, Vec<u64>)> = unknown
                .iter()
                .map(|&k| {
                    let (s, i) = event_key(&candidates.entries[k]);
                    (
                        s.to_string(),
                        i.to_string(),
                        recent.seen.entries(candidates.hashes[k]),
                    )
                })
                .collect();
            let stored = app
                .blocking(move |app| {
                    // Each entry read once, in log order (a retried batch names many).
                    let mut reads: Vec<u64> =
                        wanted.iter().flat_map(|w| w.2.iter().copied()).collect();
                    reads.sort_unstable();
                    reads.dedup();
                    let mut keys: FxHashMap<u64, Option<(String, String)>> =
                        FxHashMap::with_capacity_and_hasher(reads.len(), Default::default());
                    for e in reads {
                        let entry = Entry::decode(&app.log.entry(e)?).map_err(|err| {
                            ApiError::internal(format!("entry {e} does not decode: {err}"))
                        })?;
                        let key = match &entry.body {
                            EntryBody::Usage(u) => {
                                u.ingest_key().map(|(s, i)| (s.to_string(), i.to_string()))
                            }
                            _ => None,
                        };
                        keys.insert(e, key);
                    }
                    Ok(wanted
                        .iter()
                        .map(|(source, id, entries)| {
                            entries.iter().copied().find(|e| {
                                keys.get(e)
                                    .and_then(Option::as_ref)
                                    .is_some_and(|(s, i)| s == source && i == id)
                            })
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            for (k, prior) in unknown.into_iter().zip(stored) {
                fates[k] = match prior {
                    Some(entry_id) => Fate::Duplicate(entry_id),
                    None => {
                        recent.seen.add_pending(candidates.hashes[k]);
                        Fate::Fresh
                    }
                };
            }
        }
        let fresh = candidates.settle(fates, &mut outcomes, &mut waits);
        slots = fresh.slots;
        if fresh.entries.is_empty() {
            None
        } else {
            // New entries only (a duplicate takes no place), in the order they go to
            // the ledger, under the counters' lock until they hold their places there.
            let (mut entries, hashes) = (fresh.entries, fresh.hashes);
            if let Some(mut counters) = placing.take() {
                for e in &mut entries {
                    app.place_tiers(&prices, &mut counters, e)?;
                }
                tiers = Some(counters);
            }
            Some(recent.claim(Claim::new(entries, hashes, None)))
        }
    };

    if let Some(claim) = claim {
        let settle = Settle(&claim);
        let keys = app.log.keeps_keys().then(|| {
            claim
                .entries
                .iter()
                .map(|e| {
                    let (s, i) = event_key(e);
                    Some(ciyuan_core::ingest_key_digest(s, i))
                })
                .collect()
        });
        // With several nodes the counters' lock is kept until the places are committed,
        // not only ordered: once it goes, another node may take the tiers lease, and it
        // catches up to the log's size in the database, which holds committed entries
        // only.
        let committed_tiers = if app.config.follow.is_some() {
            tiers.take()
        } else {
            None
        };
        // Lent to the projector, which then applies these entries without reading them
        // back from the ledger.
        let appended = crate::pipeline::append_lent_keyed_then(
            app.log.as_ref(),
            &app.projector,
            claim.clone(),
            keys,
            || {
                drop(rules.take());
                drop(tiers.take());
                // While the ledger syncs this request's group.
                free(pruned);
            },
        )
        .await
        .inspect(|_| app.projector.kick());
        drop(committed_tiers);
        claim
            .appended
            .send_replace(Some(appended.as_ref().map(|r| r.start).map_err(|_| ())));
        drop(settle);
        let range = match appended {
            Ok(range) => range,
            Err(ciyuan_store::LogError::Duplicate(held)) => {
                // Another node recorded some of these events between the check above
                // and this append, which the log refused whole: those are answered
                // with the entries holding them, the rest must be sent again.
                let mut recent = app.ingest_lock.lock().await;
                for &(pos, entry_id) in &held {
                    recent.seen.index(claim.hashes[pos], entry_id);
                }
                drop(recent);
                for (pos, &i) in slots.iter().enumerate() {
                    let (source, id) = event_key(&claim.entries[pos]);
                    let (source, id) = (source.to_string(), id.to_string());
                    outcomes[i] = Some(match held.iter().find(|(p, _)| *p == pos) {
                        Some(&(_, entry_id)) => Outcome::Duplicate {
                            source,
                            id,
                            entry_id,
                        },
                        None => Outcome::Rejected {
                            source: Some(source),
                            id: Some(id),
                            error: ApiError::unavailable(
                                "not recorded: another node recorded events of this batch at the same moment; send this event again",
                            ),
                        },
                    });
                }
                return finish(outcomes, waits).await;
            }
            Err(e) => return Err(e.into()),
        };
        // Usage that already happened counts against budgets, never refused; a hard
        // limit it pushes over is flagged on its answer and by an incident naming it.
        let mut over = Vec::new();
        for (entry, entry_id) in claim.entries.iter().zip(range.clone()) {
            if let EntryBody::Usage(u) = &entry.body {
                let cost = u.rating.as_ref().map(|r| ciyuan_core::Money {
                    amount: r.amount,
                    currency: r.currency,
                });
                let settled = app.budget.record_cost(
                    &entry.account,
                    &key_id,
                    None,
                    &u.tokens,
                    cost,
                    entry.ts,
                );
                if settled.raises_incidents() {
                    over.push((entry_id, !settled.exceeded.is_empty(), settled));
                }
            }
        }
        for ((pos, i), entry_id) in slots.into_iter().enumerate().zip(range) {
            outcomes[i] = Some(Outcome::Accepted {
                claim: claim.clone(),
                pos,
                entry_id,
                over_limit: over.iter().any(|(e, x, _)| *e == entry_id && *x),
            });
        }
        for (entry_id, _, settled) in over {
            crate::budgets::incidents(&app, settled, Some(entry_id)).await;
        }
    }

    finish(outcomes, waits).await
}

/// Events held by a concurrent request's claim: answered once that request's append
/// ends.
type Waits = Vec<(usize, Accepted, Arc<Claim>, usize)>;

/// A batch's checked events, by column: the slot each came from in the batch, the
/// [`ingest_key_hash`] of its key and its entry. By column so that a batch of new
/// events hands its entries to the ledger as they are (see [`Candidates::settle`]).
struct Candidates {
    slots: Vec<usize>,
    hashes: Vec<u64>,
    entries: Vec<Entry>,
}

/// What becomes of one candidate.
enum Fate {
    /// New: it is appended.
    Fresh,
    /// Its hash is known; which of the others it is, is not decided yet.
    Known,
    /// Recorded before as this entry.
    Duplicate(u64),
    /// Held by a concurrent request's claim, at this position.
    Wait(Arc<Claim>, usize),
    Rejected(ApiError),
}

impl Candidates {
    fn with_capacity(n: usize) -> Candidates {
        Candidates {
            slots: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            entries: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, slot: usize, a: Accepted) {
        self.slots.push(slot);
        self.hashes.push(a.hash);
        self.entries.push(a.entry);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keeps the fresh candidates, in order, and answers the others: a duplicate or a
    /// rejection in `outcomes`, an event held by another request in `waits`.
    fn settle(
        self,
        fates: Vec<Fate>,
        outcomes: &mut [Option<Outcome>],
        waits: &mut Waits,
    ) -> Candidates {
        assert_eq!(fates.len(), self.len(), "a fate for every candidate");
        if fates.iter().all(|f| matches!(f, Fate::Fresh)) {
            return self;
        }
        let mut fresh = Candidates::with_capacity(self.len());
        let columns = self.slots.into_iter().zip(self.hashes).zip(self.entries);
        for (((i, hash), entry), fate) in columns.zip(fates) {
            let a = Accepted { hash, entry };
            match fate {
                Fate::Fresh => fresh.push(i, a),
                Fate::Duplicate(entry_id) => {
                    let (source, id) = a.into_key();
                    outcomes[i] = Some(Outcome::Duplicate {
                        source,
                        id,
                        entry_id,
                    });
                }
                Fate::Wait(claim, pos) => waits.push((i, a, claim, pos)),
                Fate::Rejected(error) => {
                    let (source, id) = a.into_key();
                    outcomes[i] = Some(Outcome::Rejected {
                        source: Some(source),
                        id: Some(id),
                        error,
                    });
                }
                // Every known hash is resolved to one of the others before this.
                Fate::Known => unreachable!("a known event left undecided"),
            }
        }
        fresh
    }
}

/// Answers the events that waited on other requests' claims, then every outcome.
async fn finish(
    mut outcomes: Vec<Option<Outcome>>,
    waits: Waits,
) -> Result<Vec<Outcome>, ApiError> {
    for (i, a, claim, pos) in waits {
        let mut rx = claim.appended.subscribe();
        let start = match rx.wait_for(Option::is_some).await {
            Ok(v) => *v,
            Err(_) => None,
        };
        let (source, id) = a.into_key();
        outcomes[i] = Some(match start {
            Some(Ok(start)) => Outcome::Duplicate {
                source,
                id,
                entry_id: start + pos as u64,
            },
            _ => Outcome::Rejected {
                source: Some(source),
                id: Some(id),
                error: ApiError::unavailable(
                    "a concurrent request carrying this event failed to record it; retry",
                ),
            },
        });
    }

    Ok(outcomes
        .into_iter()
        .map(|o| {
            // Lazily: building an internal error logs it.
            o.unwrap_or_else(|| Outcome::Rejected {
                source: None,
                id: None,
                error: ApiError::internal("event without outcome"),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Seen` against a plain model (hash -> entries), through growth, with hashes that
    /// share low bits, small values, 0 (kept as 1) and repeats.
    #[test]
    fn seen_agrees_with_a_model_across_growth() {
        use std::collections::{BTreeMap, HashMap};
        let mut seen = Seen::default();
        // Hashes held (pending or indexed), with their entries.
        let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next_entry = 0u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let h = match i % 5 {
                0 => x << 20,
                1 => i % 5000,
                _ => x,
            };
            let k = h.max(1);
            match x % 4 {
                0 | 1 => {
                    let new = !model.contains_key(&k);
                    assert_eq!(seen.claim(h), new, "claim {h}");
                    if new {
                        model.insert(k, vec![]);
                    }
                }
                2 => {
                    seen.add_pending(h);
                    model.entry(k).or_default();
                }
                _ => {
                    seen.index(h, next_entry);
                    model.entry(k).or_default().push(next_entry);
                    next_entry += 1;
                }
            }
            if i % 997 == 0 {
                assert_eq!(seen.entries(h), model[&k], "entries of {h}");
            }
        }
        let sorted: BTreeMap<_, _> = model.iter().collect();
        for (k, entries) in sorted {
            assert_eq!(&seen.entries(*k), entries);
        }
        assert!(seen.shards.iter().all(|s| 4 * s.len <= 3 * s.slots.len()));
        assert!(seen.len() >= model.len());
        assert_eq!(seen.entries(0), seen.entries(1), "0 is kept as 1");
    }

    #[test]
    fn a_hash_shared_by_two_keys_keeps_both_entries() {
        let mut seen = Seen::default();
        assert!(seen.claim(42));
        // A second key with the same hash, found new by the exact checks.
        assert!(!seen.claim(42));
        seen.add_pending(42);
        // Indexed in claim order: the first fills the pending slot, the second adds one.
        seen.index(42, 7);
        seen.index(42, 9);
        assert_eq!(seen.entries(42), vec![7, 9]);
        assert!(seen.entries(43).is_empty());
    }

    fn entry(source: &str, id: &str) -> Entry {
        Entry::new(
            Timestamp::UNIX_EPOCH,
            "a".parse().unwrap(),
            EntryBody::Usage(Usage {
                source: Some(source.into()),
                event_id: Some(id.into()),
                ..Usage::default()
            }),
        )
    }

    #[test]
    fn batch_answers_are_written_as_serde_writes_them() {
        let claim = Arc::new(Claim::new(
            vec![entry("svc://a", "e-1"), entry("s\"q\\\u{1}", "词元\n")],
            vec![1, 2],
            Some(Ok(40)),
        ));
        let accepted = |pos, over_limit| Outcome::Accepted {
            claim: claim.clone(),
            pos,
            entry_id: 40 + pos as u64,
            over_limit,
        };
        let results = [
            accepted(0, false),
            accepted(1, true),
            Outcome::Duplicate {
                source: "s".into(),
                id: "d\"".into(),
                entry_id: 7,
            },
            Outcome::Rejected {
                source: None,
                id: Some("r".into()),
                error: ApiError::bad_request("bad \"x\""),
            },
        ];
        for results in [&results[..], &results[..1], &[]] {
            let answer = BatchAnswer {
                accepted: 2,
                duplicates: 1,
                rejected: 1,
                results,
            };
            let mut by_hand = Vec::new();
            answer.write_json(&mut by_hand).unwrap();
            assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }

    #[test]
    fn claims_answer_the_newest_claim_that_did_not_fail_by_exact_key() {
        let mut recent = Recent::default();
        let claim = |r: &mut Recent, ids: &[&str], hashes: &[u64], state| {
            let entries = ids.iter().map(|id| entry("s", id)).collect();
            r.claim(Claim::new(entries, hashes.to_vec(), state))
        };
        // "a" and "b" share a hash: only the exact key answers.
        let first = claim(&mut recent, &["x", "a"], &[9, 7], Some(Ok(10)));
        claim(&mut recent, &["c"], &[3], Some(Err(())));
        let retried = claim(&mut recent, &["c", "b"], &[3, 7], None);
        let found = recent.find_many(&[
            (7, ("s", "a")),
            (7, ("s", "b")),
            (3, ("s", "c")),
            (9, ("s", "x")),
            (9, ("t", "x")),
            (5, ("s", "nope")),
        ]);
        let at = |i: usize| found[i].as_ref().map(|(c, pos)| (Arc::as_ptr(c), *pos));
        assert_eq!(at(0), Some((Arc::as_ptr(&first), 1)));
        assert_eq!(at(1), Some((Arc::as_ptr(&retried), 1)));
        assert_eq!(
            at(2),
            Some((Arc::as_ptr(&retried), 0)),
            "not the failed claim"
        );
        assert_eq!(at(3), Some((Arc::as_ptr(&first), 0)));
        assert_eq!(at(4), None, "another source");
        assert_eq!(at(5), None);
        assert!(recent.find_many(&[]).is_empty());
        // Projected and failed claims go, in order; the pending one stays.
        recent.prune(12);
        assert_eq!(recent.claims.len(), 1);
        retried.appended.send_replace(Some(Ok(12)));
        recent.prune(13);
        assert_eq!(recent.claims.len(), 1);
        recent.prune(14);
        assert!(recent.claims.is_empty());
    }
}
