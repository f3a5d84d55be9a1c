//! `/api/v1/usage` by attribution tag: `tag=KEY:VALUE` filters and `group_by=tag:KEY`,
//! answered from the tag rollups (`ciyuan_store::tags`, kept by whole tag set) and,
//! for the usage carrying none of the grouped tags, the exact rollups less the tagged
//! ones.

use crate::error::ApiError;
use ciyuan_core::AccountPath;
use ciyuan_store::tags::{TagCostRow, TagHourRow};
use ciyuan_store::{
    CostRow, GroupBy, HourRow, RowCost, SumOverflow, UsageQuery, UsageRow, aggregate,
    aggregate_cost,
};
use std::collections::BTreeMap;

/// A row's values of the grouped tags, in the order of `group_by` (`None`: the usage
/// had no such tag); `None` when no tag is grouped by.
pub(crate) type Group = Option<Vec<Option<String>>>;

/// Rows answered by tag: tokens, each row's tag values, and costs.
pub(crate) struct ByTags {
    pub(crate) rows: Vec<UsageRow>,
    pub(crate) groups: Vec<Group>,
    pub(crate) costs: Vec<(UsageRow, Group, RowCost)>,
}

/// The node a row of `account` is named for in `q`'s answer: with `group_by=child`,
/// the child of `q.account` holding it (or `q.account` itself), as the subtree
/// rollups name theirs; otherwise `account` (the answer drops it unless grouped by).
fn named(q: &UsageQuery, account: &AccountPath) -> Result<AccountPath, ApiError> {
    if !q.group_by.contains(&GroupBy::Child) || account == &q.account {
        return Ok(account.clone());
    }
    let under = q.account.as_str();
    let rest = if q.account.is_root() {
        account.as_str()
    } else {
        account
            .as_str()
            .strip_prefix(under)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "a tag rollup row of {account} lies outside {under}"
                ))
            })?
    };
    let child = rest.split('/').next().unwrap_or(rest);
    let path = if q.account.is_root() {
        child.to_string()
    } else {
        format!("{under}/{child}")
    };
    AccountPath::parse(&path).map_err(|e| ApiError::internal(format!("{path}: {e}")))
}

/// Whether a tag set holds every filter.
fn matches(tags: &BTreeMap<String, String>, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| tags.get(k) == Some(v))
}

fn overflow(_: SumOverflow) -> ApiError {
    ApiError::unprocessable("a usage sum exceeds 128 bits")
}

type RowKey = (
    Option<ciyuan_core::jiff::Timestamp>,
    Option<AccountPath>,
    Option<String>,
    Option<String>,
);

fn key(r: &UsageRow) -> RowKey {
    (
        r.bucket_start,
        r.account.clone(),
        r.service.clone(),
        r.model.clone(),
    )
}

/// The answer's rows when tags filter or group it. `all` are the rows the answer
/// would sum without tags (read only when no tag filters: filtered, every row is
/// tagged), `tagged` the tag rollups of the same subtree and range.
pub(crate) fn by_tags(
    q: &UsageQuery,
    keys: &[String],
    filter: &BTreeMap<String, String>,
    all: (&[HourRow], &[CostRow]),
    tagged: (Vec<TagHourRow>, Vec<TagCostRow>),
) -> Result<ByTags, ApiError> {
    let group_of = |tags: &BTreeMap<String, String>| -> Group {
        (!keys.is_empty()).then(|| keys.iter().map(|k| tags.get(k).cloned()).collect())
    };
    let untagged: Group = (!keys.is_empty()).then(|| vec![None; keys.len()]);
    // Tokens: each group's rows, summed as the answer groups them.
    let mut parts: BTreeMap<Group, Vec<HourRow>> = BTreeMap::new();
    let mut every_tagged = Vec::new();
    for (tags, mut row) in tagged.0 {
        row.account = named(q, &row.account)?;
        if filter.is_empty() {
            every_tagged.push(row.clone());
        }
        if matches(&tags, filter) {
            parts.entry(group_of(&tags)).or_default().push(row);
        }
    }
    let mut sums: BTreeMap<Group, BTreeMap<RowKey, UsageRow>> = BTreeMap::new();
    for (group, rows) in &parts {
        let slot = sums.entry(group.clone()).or_default();
        for r in aggregate(rows, q).map_err(overflow)? {
            slot.insert(key(&r), r);
        }
    }
    if filter.is_empty() {
        // The usage with no tag at all: every row less the tagged ones.
        let slot = sums.entry(untagged.clone()).or_default();
        let minus: BTreeMap<RowKey, UsageRow> = aggregate(&every_tagged, q)
            .map_err(overflow)?
            .into_iter()
            .map(|r| (key(&r), r))
            .collect();
        for mut r in aggregate(all.0, q).map_err(overflow)? {
            if let Some(m) = minus.get(&key(&r)) {
                for (modality, direction, n) in m.tokens.iter() {
                    r.tokens
                        .add(
                            modality,
                            direction,
                            n.checked_neg().ok_or(SumOverflow).map_err(overflow)?,
                        )
                        .ok_or(SumOverflow)
                        .map_err(overflow)?;
                }
            }
            if r.tokens.iter().all(|(_, _, n)| n == 0) {
                continue;
            }
            match slot.get_mut(&key(&r)) {
                Some(have) => {
                    for (modality, direction, n) in r.tokens.iter() {
                        have.tokens
                            .add(modality, direction, n)
                            .ok_or(SumOverflow)
                            .map_err(overflow)?;
                    }
                }
                None => {
                    slot.insert(key(&r), r);
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    for (group, by_key) in sums {
        for (_, r) in by_key {
            rows.push(r);
            groups.push(group.clone());
        }
    }
    // Costs, the same way.
    let mut parts: BTreeMap<Group, Vec<CostRow>> = BTreeMap::new();
    let mut every_tagged = Vec::new();
    for (tags, mut row) in tagged.1 {
        row.account = named(q, &row.account)?;
        if filter.is_empty() {
            every_tagged.push(row.clone());
        }
        if matches(&tags, filter) {
            parts.entry(group_of(&tags)).or_default().push(row);
        }
    }
    let mut sums: BTreeMap<Group, BTreeMap<RowKey, (UsageRow, RowCost)>> = BTreeMap::new();
    for (group, rows) in &parts {
        let slot = sums.entry(group.clone()).or_default();
        for (r, c) in aggregate_cost(rows, q).map_err(overflow)? {
            slot.insert(key(&r), (r, c));
        }
    }
    if filter.is_empty() && !all.1.is_empty() {
        let slot = sums.entry(untagged).or_default();
        let minus: BTreeMap<RowKey, RowCost> = aggregate_cost(&every_tagged, q)
            .map_err(overflow)?
            .into_iter()
            .map(|(r, c)| (key(&r), c))
            .collect();
        for (r, mut c) in aggregate_cost(all.1, q).map_err(overflow)? {
            for (cur, a) in minus.get(&key(&r)).into_iter().flatten() {
                let slot = c.entry(*cur).or_insert(ciyuan_core::ExactSum::ZERO);
                *slot = a
                    .checked_neg()
                    .and_then(|n| slot.checked_add(n))
                    .ok_or(SumOverflow)
                    .map_err(overflow)?;
            }
            c.retain(|_, a| *a != ciyuan_core::ExactSum::ZERO);
            if c.is_empty() {
                continue;
            }
            match slot.get_mut(&key(&r)) {
                Some((_, have)) => {
                    for (cur, a) in c {
                        let s = have.entry(cur).or_insert(ciyuan_core::ExactSum::ZERO);
                        *s = s.checked_add(a).ok_or(SumOverflow).map_err(overflow)?;
                    }
                }
                None => {
                    slot.insert(key(&r), (r, c));
                }
            }
        }
    }
    let costs = sums
        .into_iter()
        .flat_map(|(g, by_key)| by_key.into_values().map(move |(r, c)| (r, g.clone(), c)))
        .collect();
    Ok(ByTags {
        rows,
        groups,
        costs,
    })
}
