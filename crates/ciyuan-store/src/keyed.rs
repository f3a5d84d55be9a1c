//! Rollups kept by a text beside the service: usage by attribution tag set
//! ([`crate::tags`]) and by API key and session ([`crate::subjects`]).
//!
//! Each is stored in tables of the exact hourly rollups' shape, written and read by
//! the same code as those, with the `service` column holding the rollup's text, a unit
//! separator (U+001F) and the service ([`stored`], [`split`]). A service name never
//! holds U+001F, so the service is what follows the last one; the text before it
//! (escaped JSON for tags, a key's id or a session for subjects) may hold anything.
//!
//! Only entries with such a text have rows, so traffic without tags, key or session
//! costs nothing here.

use crate::projection::{CostKey, CostSums, RollupKey};
use crate::{CostRow, HourRow, StoreError, floor_hour};
use ciyuan_core::{Entry, EntryBody, ExactSum, RatingCorrection, Usage};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// Which rollup kept by a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyed {
    /// By the usage entry's whole tag set ([`crate::tags`]).
    Tags,
    /// By the API key and by the session a usage entry names ([`crate::subjects`]).
    Subjects,
}

impl Keyed {
    /// Every rollup kept by a text, as a backend projects them.
    pub const ALL: [Keyed; 2] = [Keyed::Tags, Keyed::Subjects];

    /// The table of its token sums (the shape of `usage_hourly`).
    pub fn usage_table(self) -> &'static str {
        match self {
            Keyed::Tags => "usage_tag_hourly",
            Keyed::Subjects => "usage_subject_hourly",
        }
    }

    /// The table of its costs (the shape of `cost_hourly`).
    pub fn cost_table(self) -> &'static str {
        match self {
            Keyed::Tags => "cost_tag_hourly",
            Keyed::Subjects => "cost_subject_hourly",
        }
    }

    /// What `entry` adds to this rollup: its texts (pushed onto `texts`, when given) and
    /// what is counted under each.
    fn of<'e>(self, entry: &'e Entry, mut texts: Option<&mut Vec<String>>) -> (usize, Counted<'e>) {
        match (self, &entry.body) {
            (Keyed::Tags, EntryBody::Usage(u)) if !u.tags.is_empty() => {
                if let Some(t) = texts {
                    t.push(stored_tags(&u.tags, &u.service));
                }
                (1, Counted::Usage(u))
            }
            // A re-rating carries the usage with its tags; token corrections
            // (`adjustment`) name no tags and are attributed to none.
            (Keyed::Tags, EntryBody::RatingCorrection(c)) if !c.usage.tags.is_empty() => {
                if let Some(t) = texts {
                    t.push(stored_tags(&c.usage.tags, &c.usage.service));
                }
                (1, Counted::Correction(c))
            }
            // As the budget engine counts a key's and a session's limits live: usage the
            // provider accepted, nothing else (see `crate::subjects`).
            (Keyed::Subjects, EntryBody::Usage(u)) if u.consumed() => {
                use crate::subjects::{KEY_PREFIX, SESSION_PREFIX};
                let mut n = 0;
                for (prefix, id) in [(KEY_PREFIX, &u.key), (SESSION_PREFIX, &u.session)] {
                    let Some(id) = id else { continue };
                    n += 1;
                    if let Some(t) = texts.as_deref_mut() {
                        t.push(stored(&format!("{prefix}{id}"), &u.service));
                    }
                }
                (n, Counted::Usage(u))
            }
            _ => (0, Counted::Nothing),
        }
    }
}

/// What an entry counts under each of its texts.
enum Counted<'e> {
    /// Its tokens at its hour, and its rated amount.
    Usage(&'e Usage),
    /// A re-rating's change of cost, at the usage's hour.
    Correction(&'e RatingCorrection),
    Nothing,
}

/// What a run of entries adds to one keyed rollup: keys as the exact rollups', their
/// `service` being [`stored`].
#[derive(Debug, Default)]
pub struct KeyedProjected<'a> {
    /// Signed token sums to add.
    pub usage: FxHashMap<RollupKey<'a>, i128>,
    /// Exact amounts to add.
    pub cost: CostSums<'a>,
}

/// What stands between the rollup's text and the service in a keyed row's `service`.
const SEPARATOR: &str = "\u{1f}";

/// The stored `service` of a keyed row: the rollup's text, [`SEPARATOR`], the service.
pub fn stored(text: &str, service: &str) -> String {
    [text, SEPARATOR, service].concat()
}

/// [`stored`] of a tag set's text ([`crate::tags::set_text`]) and a service, in one
/// buffer.
fn stored_tags(tags: &BTreeMap<String, String>, service: &str) -> String {
    crate::tags::text_then(tags, &[SEPARATOR, service])
}

/// A stored `service` split into the rollup's text and the service.
pub fn split(stored: &str) -> Result<(&str, &str), StoreError> {
    stored.rsplit_once(SEPARATOR).ok_or_else(|| {
        StoreError::Corrupt(format!("a keyed rollup's key {stored:?}: no separator"))
    })
}

/// A row of a rollup's shape, whose `service` a keyed rollup stores its text in.
pub trait Row {
    /// Its stored `service`.
    fn service_mut(&mut self) -> &mut String;
}

impl Row for HourRow {
    fn service_mut(&mut self) -> &mut String {
        &mut self.service
    }
}

impl Row for CostRow {
    fn service_mut(&mut self) -> &mut String {
        &mut self.service
    }
}

/// Rows of a keyed table, each split into what `parse` reads its text as and the row
/// with its own service.
pub fn split_rows<R: Row, K>(
    rows: Vec<R>,
    mut parse: impl FnMut(&str) -> Result<K, StoreError>,
) -> Result<Vec<(K, R)>, StoreError> {
    rows.into_iter()
        .map(|mut r| {
            let stored = r.service_mut();
            let (text, service) = split(stored)?;
            let key = parse(text)?;
            let service = service.to_string();
            *stored = service;
            Ok((key, r))
        })
        .collect()
}

/// The stored services ([`stored`]) of a run of entries for `which`, in order: made
/// before [`project`], whose sums borrow them.
pub fn texts(which: Keyed, parts: &[&[Entry]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // The tags and service of the last text pushed, when it was a tagged usage's: a
    // batch's entries mostly carry their predecessor's, and its text is then copied
    // rather than written again.
    let mut last: Option<(&BTreeMap<String, String>, &str)> = None;
    for e in parts.iter().flat_map(|p| p.iter()) {
        let tagged = match (which, &e.body) {
            (Keyed::Tags, EntryBody::Usage(u)) if !u.tags.is_empty() => {
                Some((&u.tags, u.service.as_str()))
            }
            _ => None,
        };
        if let (Some(now), Some(before), Some(text)) = (tagged, last, out.last())
            && now == before
        {
            let text = text.clone();
            out.push(text);
            continue;
        }
        let pushed = out.len();
        which.of(e, Some(&mut out));
        if out.len() > pushed {
            last = tagged;
        }
    }
    out
}

/// The `which` rollups of entries `start..` (`parts` in order), `texts` being
/// [`texts`] of the same parts.
pub fn project<'a>(
    which: Keyed,
    start: u64,
    parts: &[&'a [Entry]],
    texts: &'a [String],
) -> Result<KeyedProjected<'a>, StoreError> {
    let mut out = KeyedProjected::default();
    let mut next = texts.iter();
    let overflow = |i: u64| StoreError::Backend(format!("a keyed rollup overflows at entry {i}"));
    for (i, entry) in parts.iter().flat_map(|p| p.iter()).enumerate() {
        let index = start + i as u64;
        let (n, counted) = which.of(entry, None);
        for _ in 0..n {
            let service = next.next().ok_or_else(|| {
                StoreError::Backend(format!(
                    "entry {index}'s rollup text was not among the texts given for its run"
                ))
            })?;
            let node = &entry.account;
            let cost_key = |at, u: &'a Usage, currency| CostKey {
                account: node,
                hour: floor_hour(at),
                service: service.as_str(),
                model: u.model.as_deref().unwrap_or(""),
                currency,
            };
            let mut add_cost = |key, amount| -> Result<(), StoreError> {
                let slot = out.cost.entry(key).or_insert(ExactSum::ZERO);
                *slot = slot
                    .checked_add(ExactSum::of(amount))
                    .ok_or_else(|| overflow(index))?;
                Ok(())
            };
            match counted {
                Counted::Usage(u) => {
                    if let Some(r) = &u.rating {
                        add_cost(cost_key(entry.ts, u, r.currency), r.amount)?;
                    }
                    let hour = floor_hour(entry.ts);
                    for t in u.tokens.iter() {
                        let slot = out
                            .usage
                            .entry(RollupKey {
                                account: node,
                                hour,
                                service,
                                model: u.model.as_deref().unwrap_or(""),
                                modality: t.modality,
                                direction: t.direction,
                            })
                            .or_insert(0);
                        *slot = slot
                            .checked_add(i128::from(t.count))
                            .ok_or_else(|| overflow(index))?;
                    }
                }
                // At the usage's hour, as the cost rollups count a re-rating.
                Counted::Correction(c) => {
                    for (currency, amount) in c.changes() {
                        add_cost(cost_key(c.at, &c.usage, currency), amount)?;
                    }
                }
                Counted::Nothing => {}
            }
        }
    }
    if next.next().is_some() {
        return Err(StoreError::Backend(format!(
            "more rollup texts than entries {start}.. have"
        )));
    }
    Ok(out)
}

/// Projects entries `start..` (`parts` in order) into every keyed rollup, handing
/// each rollup's sums to `write` (a backend's upserts into its tables).
pub fn project_all(
    start: u64,
    parts: &[&[Entry]],
    mut write: impl FnMut(Keyed, &KeyedProjected<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for which in Keyed::ALL {
        let texts = texts(which, parts);
        if texts.is_empty() {
            continue;
        }
        write(which, &project(which, start, parts, &texts)?)?;
    }
    Ok(())
}

/// Hourly token rows summed over their range, as [`crate::Store::keyed_usage_hours`]
/// answers with `whole` (for a backend that cannot sum in its queries exactly).
pub fn whole_usage(rows: Vec<HourRow>) -> Result<Vec<HourRow>, StoreError> {
    type Key = (
        String,
        String,
        String,
        ciyuan_core::Modality,
        ciyuan_core::Direction,
    );
    let mut sums: BTreeMap<Key, HourRow> = BTreeMap::new();
    for r in rows {
        let key = (
            r.account.as_str().to_string(),
            r.service.clone(),
            r.model.clone(),
            r.modality,
            r.direction,
        );
        match sums.get_mut(&key) {
            Some(have) => {
                have.hour = have.hour.min(r.hour);
                have.tokens = have.tokens.checked_add(r.tokens).ok_or_else(|| {
                    StoreError::Backend("a keyed rollup's sum exceeds 128 bits".into())
                })?;
            }
            None => {
                sums.insert(key, r);
            }
        }
    }
    Ok(sums.into_values().collect())
}

/// [`whole_usage`] for cost rows.
pub fn whole_cost(rows: Vec<CostRow>) -> Result<Vec<CostRow>, StoreError> {
    type Key = (String, String, String, ciyuan_core::Currency);
    let mut sums: BTreeMap<Key, CostRow> = BTreeMap::new();
    for r in rows {
        let key = (
            r.account.as_str().to_string(),
            r.service.clone(),
            r.model.clone(),
            r.currency,
        );
        match sums.get_mut(&key) {
            Some(have) => {
                have.hour = have.hour.min(r.hour);
                have.amount = have
                    .amount
                    .checked_add(r.amount)
                    .ok_or_else(|| StoreError::Backend("a keyed rollup's cost overflows".into()))?;
            }
            None => {
                sums.insert(key, r);
            }
        }
    }
    Ok(sums.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{AccountPath, Rating};

    /// The tag set's text as it was written before it was written in one buffer:
    /// rows already stored must keep meeting new entries' rows under the same key.
    fn text_as_before(tags: &BTreeMap<String, String>) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in tags.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::Value::from(k.as_str()).to_string());
            out.push(':');
            out.push_str(&serde_json::Value::from(v.as_str()).to_string());
        }
        out.push('}');
        out
    }

    #[test]
    fn a_tag_sets_stored_text_is_what_it_was_byte_for_byte() {
        use proptest::prelude::*;
        let text = proptest::collection::btree_map(".{0,12}", ".{0,40}", 0..20);
        proptest!(ProptestConfig::with_cases(2000), |(tags in text, service in ".{0,10}")| {
            prop_assert_eq!(crate::tags::set_text(&tags), text_as_before(&tags));
            prop_assert_eq!(stored_tags(&tags, &service), stored(&text_as_before(&tags), &service));
        });
        let hard: BTreeMap<String, String> = [("q\"\\\u{1}\u{7f}é", "\u{1f}\n\t\u{2028}x")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(crate::tags::set_text(&hard), text_as_before(&hard));
    }

    #[test]
    fn repeated_tag_sets_get_the_texts_each_entry_would_be_given_alone() {
        let at: ciyuan_core::jiff::Timestamp = "2026-12-08T01:00:00Z".parse().unwrap();
        let node = AccountPath::parse("acme/cn").unwrap();
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let usage = |t: &BTreeMap<String, String>, service: &str| Usage {
            service: service.into(),
            tags: t.clone(),
            ..Default::default()
        };
        let entry = |body| Entry::new(at, node.clone(), body);
        let (a, b) = (
            tags(&[("team", "hr"), ("f", "search")]),
            tags(&[("team", "hr")]),
        );
        let cny: ciyuan_core::Currency = "CNY".parse().unwrap();
        let correction = |u: Usage| {
            EntryBody::RatingCorrection(RatingCorrection {
                entry: 0,
                at,
                usage: Box::new(u),
                previous: Box::new(Rating::new(rust_decimal::Decimal::ONE, cny, "list", 1)),
                rating: Box::new(Rating::new(rust_decimal::Decimal::TWO, cny, "list", 1)),
            })
        };
        let run = vec![
            entry(EntryBody::Usage(usage(&a, "chat"))),
            entry(EntryBody::Usage(usage(&a, "chat"))),
            entry(EntryBody::Usage(usage(&BTreeMap::new(), "chat"))),
            entry(EntryBody::Usage(usage(&a, "chat"))),
            entry(EntryBody::Usage(usage(&a, "embeddings"))),
            entry(EntryBody::Usage(usage(&b, "embeddings"))),
            entry(correction(usage(&a, "chat"))),
            entry(EntryBody::Usage(usage(&b, "embeddings"))),
            entry(EntryBody::Usage(usage(&b, "embeddings"))),
        ];
        let alone: Vec<String> = run
            .iter()
            .flat_map(|e| {
                let mut t = Vec::new();
                Keyed::Tags.of(e, Some(&mut t));
                t
            })
            .collect();
        assert_eq!(alone.len(), 8);
        // Split anywhere into parts: the texts follow the entries across parts too.
        for cut in 0..=run.len() {
            let (x, y) = run.split_at(cut);
            assert_eq!(texts(Keyed::Tags, &[x, y]), alone, "cut at {cut}");
        }
        assert!(texts(Keyed::Subjects, &[&run]).is_empty());
    }
}
