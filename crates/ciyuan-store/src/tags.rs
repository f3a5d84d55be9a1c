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
//! Stored as a keyed rollup ([`crate::keyed`]): tables of the exact hourly rollups'
//! shape (`usage_tag_hourly`, `cost_tag_hourly`), `service` holding the tag set's text
//! ([`set_text`]), U+001F and the service.
//!
//! Counted: usage entries, and re-ratings' changes of their cost (`rating.correction`
//! carries the usage with its tags). Token corrections (`adjustment`) name no tags and
//! are not attributed to any.

use crate::{CostRow, HourRow, StoreError};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// A tag set as stored: its JSON object, keys in order (one text per set).
pub fn set_text(tags: &BTreeMap<String, String>) -> String {
    text_then(tags, &[])
}

/// [`set_text`] followed by the texts of `rest`, written into one buffer sized for
/// all: the projector writes one for every tagged entry, and the set made first as a
/// string of its own, each key and value through a `serde_json::Value`, was four
/// allocations a tag (with sixteen tags, 41% of the projector's time).
pub(crate) fn text_then(tags: &BTreeMap<String, String>, rest: &[&str]) -> String {
    // Each pair: two quotes each side, ':' and ','; escapes may grow it past this.
    let size = 2
        + rest.iter().map(|r| r.len()).sum::<usize>()
        + tags
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    // serde_json writes a map of strings as `{"k":"v",...}` in the map's (key)
    // order, escaping as it escapes every string it writes; into a `Vec` this
    // cannot fail, and a failure would be a bug that must not store a wrong key.
    let written = serde_json::to_writer(&mut out, tags);
    assert!(written.is_ok(), "writing a tag set failed: {written:?}");
    for r in rest {
        out.extend_from_slice(r.as_bytes());
    }
    match String::from_utf8(out) {
        Ok(text) => text,
        Err(e) => unreachable!("JSON written from strings is UTF-8: {e}"),
    }
}

/// A tag set read back, shared by every row of it (a month holds many rows of few
/// sets).
pub type TagSet = std::sync::Arc<BTreeMap<String, String>>;

/// Reads tag sets' texts, each text parsed once (a month holds many rows of few sets).
#[derive(Default)]
struct Sets(FxHashMap<String, TagSet>);

impl Sets {
    fn parse(&mut self, set: &str) -> Result<TagSet, StoreError> {
        if let Some(t) = self.0.get(set) {
            return Ok(t.clone());
        }
        let t: TagSet =
            std::sync::Arc::new(serde_json::from_str(set).map_err(|e| {
                StoreError::Corrupt(format!("a tag rollup's tag set {set:?}: {e}"))
            })?);
        self.0.insert(set.to_string(), t.clone());
        Ok(t)
    }
}

/// A tagged token row read back: its tags and the row (its own service).
pub type TagHourRow = (TagSet, HourRow);
/// A tagged cost row read back.
pub type TagCostRow = (TagSet, CostRow);

/// Rows of a tag table read as exact rollup rows, split into tags and row.
pub fn split_usage(rows: Vec<HourRow>) -> Result<Vec<TagHourRow>, StoreError> {
    let mut sets = Sets::default();
    crate::keyed::split_rows(rows, |set| sets.parse(set))
}

/// [`split_usage`] for cost rows.
pub fn split_cost(rows: Vec<CostRow>) -> Result<Vec<TagCostRow>, StoreError> {
    let mut sets = Sets::default();
    crate::keyed::split_rows(rows, |set| sets.parse(set))
}
