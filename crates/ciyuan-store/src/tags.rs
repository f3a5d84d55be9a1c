//! Usage by attribution tag: hourly rollups keyed by each usage entry's whole tag set
//! (node, UTC hour, tag set, service, model, and token key or currency), so a question
//! filtering by some tags and grouping by another is answered from one table, exactly.
//!
//! Kept by tag set rather than by single tag: rows of one tag each could answer
//! `group_by=tag:feature` or `tag=feature:search` alone, but not the two together (how
//! much of team hr's usage was search), which needs the tags of each entry side by
//! side. Only tagged entries have rows, so untagged traffic costs nothing here; a
//! question's untagged part is its whole usage less its tagged rows.
//!
//! Stored in tables of the exact hourly rollups' shape (`usage_tag_hourly`,
//! `cost_tag_hourly`), written and read by the same code, with the `service` column
//! holding the tag set's text, a unit separator (U+001F, which neither a service name
//! nor escaped JSON can hold) and the service: [`keyed`], [`split_usage`] and
//! [`split_cost`].
//!
//! Counted: usage entries, and re-ratings' changes of their cost (`rating.correction`
//! carries the usage with its tags). Token corrections (`adjustment`) name no tags and
//! are not attributed to any.

use crate::projection::{CostKey, CostSums, RollupKey};
use crate::{CostRow, HourRow, StoreError, floor_hour};
use ciyuan_core::{Entry, EntryBody, ExactSum, Usage};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// What a run of entries adds to the tag rollups: keys as the exact rollups', their
/// `service` being [`keyed`].
#[derive(Debug, Default)]
pub struct TagProjected<'a> {
    /// Signed token sums to add.
    pub usage: FxHashMap<RollupKey<'a>, i128>,
    /// Exact amounts to add.
    pub cost: CostSums<'a>,
}

/// A tag set as stored: its JSON object, keys in order (one text per set).
pub fn set_text(tags: &BTreeMap<String, String>) -> String {
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

/// The stored `service` of a tagged row: the tag set's text, U+001F, the service.
pub fn keyed(tags: &BTreeMap<String, String>, service: &str) -> String {
    format!("{}\u{1f}{service}", set_text(tags))
}

/// A tag set read back, shared by every row of it (a month holds many rows of few
/// sets).
pub type TagSet = std::sync::Arc<BTreeMap<String, String>>;

/// Reads stored tagged `service`s back into their tag sets and services, each set's
/// text parsed once.
#[derive(Default)]
struct Splitter(FxHashMap<String, TagSet>);

impl Splitter {
    fn split(&mut self, stored: &str) -> Result<(TagSet, String), StoreError> {
        let corrupt =
            |why: String| StoreError::Corrupt(format!("a tag rollup's key {stored:?}: {why}"));
        let (set, service) = stored
            .split_once('\u{1f}')
            .ok_or_else(|| corrupt("no separator".into()))?;
        let tags = match self.0.get(set) {
            Some(t) => t.clone(),
            None => {
                let t: TagSet = std::sync::Arc::new(
                    serde_json::from_str(set).map_err(|e| corrupt(e.to_string()))?,
                );
                self.0.insert(set.to_string(), t.clone());
                t
            }
        };
        Ok((tags, service.to_string()))
    }
}

/// A tagged token row read back: its tags and the row (its own service).
pub type TagHourRow = (TagSet, HourRow);
/// A tagged cost row read back.
pub type TagCostRow = (TagSet, CostRow);

/// Rows of a tag table read as exact rollup rows, split into tags and row.
pub fn split_usage(rows: Vec<HourRow>) -> Result<Vec<TagHourRow>, StoreError> {
    let mut sets = Splitter::default();
    rows.into_iter()
        .map(|mut r| {
            let (tags, service) = sets.split(&r.service)?;
            r.service = service;
            Ok((tags, r))
        })
        .collect()
}

/// [`split_usage`] for cost rows.
pub fn split_cost(rows: Vec<CostRow>) -> Result<Vec<TagCostRow>, StoreError> {
    let mut sets = Splitter::default();
    rows.into_iter()
        .map(|mut r| {
            let (tags, service) = sets.split(&r.service)?;
            r.service = service;
            Ok((tags, r))
        })
        .collect()
}

/// The keyed services ([`keyed`]) of a run of entries' tagged usage and re-ratings,
/// in order: made before [`project_tags`], whose sums borrow them.
pub fn texts(parts: &[&[Entry]]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .filter_map(|e| match &e.body {
            EntryBody::Usage(u) if !u.tags.is_empty() => Some(keyed(&u.tags, &u.service)),
            EntryBody::RatingCorrection(c) if !c.usage.tags.is_empty() => {
                Some(keyed(&c.usage.tags, &c.usage.service))
            }
            _ => None,
        })
        .collect()
}

/// The tag rollups of entries `start..` (`parts` in order), `texts` being
/// [`texts`] of the same parts.
pub fn project_tags<'a>(
    start: u64,
    parts: &[&'a [Entry]],
    texts: &'a [String],
) -> Result<TagProjected<'a>, StoreError> {
    let mut out = TagProjected::default();
    let mut next = texts.iter();
    let overflow = |i: u64| StoreError::Backend(format!("a tag rollup overflows at entry {i}"));
    let untexted = |i: u64| {
        StoreError::Backend(format!(
            "entry {i}'s tag set was not among the texts given for its run"
        ))
    };
    let cost_key = |node, at, service: &'a str, u: &'a Usage, currency| CostKey {
        account: node,
        hour: floor_hour(at),
        service,
        model: u.model.as_deref().unwrap_or(""),
        currency,
    };
    for (i, entry) in parts.iter().flat_map(|p| p.iter()).enumerate() {
        let index = start + i as u64;
        let node = &entry.account;
        match &entry.body {
            EntryBody::Usage(u) if !u.tags.is_empty() => {
                let service = next.next().ok_or_else(|| untexted(index))?;
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
                if let Some(r) = &u.rating {
                    let slot = out
                        .cost
                        .entry(cost_key(node, entry.ts, service, u, r.currency))
                        .or_insert(ExactSum::ZERO);
                    *slot = slot
                        .checked_add(ExactSum::of(r.amount))
                        .ok_or_else(|| overflow(index))?;
                }
            }
            EntryBody::RatingCorrection(c) if !c.usage.tags.is_empty() => {
                let service = next.next().ok_or_else(|| untexted(index))?;
                // At the usage's hour, as the cost rollups count a re-rating.
                for (currency, amount) in c.changes() {
                    let slot = out
                        .cost
                        .entry(cost_key(node, c.at, service, &c.usage, currency))
                        .or_insert(ExactSum::ZERO);
                    *slot = slot
                        .checked_add(ExactSum::of(amount))
                        .ok_or_else(|| overflow(index))?;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Hourly token rows summed over their range, as [`crate::Store::tag_usage_hours`]
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
                    StoreError::Backend("a tag rollup's sum exceeds 128 bits".into())
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
                    .ok_or_else(|| StoreError::Backend("a tag rollup's cost overflows".into()))?;
            }
            None => {
                sums.insert(key, r);
            }
        }
    }
    Ok(sums.into_values().collect())
}
