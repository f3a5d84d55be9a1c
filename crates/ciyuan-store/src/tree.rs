//! Subtree rollups: the usage and cost of everything below each node (its descendants,
//! not the node itself), by UTC hour and by UTC day, kept as entries are projected.
//!
//! A node's whole subtree is then its own hourly rows (the exact rollups every node
//! has) plus one row per hour or day and key of what lies below it: a question about a
//! node that does not split by exact account (its month, its models, its children's
//! shares) reads those instead of every row of every descendant, 1,000 times fewer for
//! a tree of 1,000 leaves. Only ancestors get rows, so a leaf's usage, the bulk of any
//! ledger, is written once (its own rollup), and an ancestor's rows sum a whole batch
//! of its descendants' entries into one write. The rules live here once; a backend
//! only writes the sums and reads the rows [`TreeFilter`] names.

use crate::StoreError;
use crate::projection::{CostKey, CostSums, RollupKey};
use ciyuan_core::{AccountPath, Currency, Direction, ExactSum, Modality};
use rustc_hash::FxHashMap;

/// Seconds in a UTC day.
pub const DAY_SECS: i64 = 86_400;

/// How long a subtree rollup row spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Span {
    /// A UTC hour.
    Hour,
    /// A UTC day.
    Day,
}

/// The key of a subtree token rollup (what lies below `node`): borrowed from the
/// entries, the node a prefix of an entry's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeKey<'a> {
    /// The subtree's node (its internal text: empty for the root).
    pub node: &'a str,
    /// Hour or day.
    pub span: Span,
    /// Start of the hour or day, in seconds since the epoch.
    pub start: i64,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// Modality.
    pub modality: Modality,
    /// Direction.
    pub direction: Direction,
}

/// The key of a subtree cost rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeCostKey<'a> {
    /// The subtree's node (its internal text: empty for the root).
    pub node: &'a str,
    /// Hour or day.
    pub span: Span,
    /// Start of the hour or day, in seconds since the epoch.
    pub start: i64,
    /// The service.
    pub service: &'a str,
    /// The model, empty where none.
    pub model: &'a str,
    /// The currency.
    pub currency: Currency,
}

/// Signed token sums to add to subtree rollups.
pub type TreeUsage<'a> = FxHashMap<TreeKey<'a>, i128>;
/// Exact amounts to add to subtree cost rollups.
pub type TreeCost<'a> = FxHashMap<TreeCostKey<'a>, ExactSum>;

/// Every strict ancestor of `path` (the root first, not `path` itself), as prefixes of
/// its internal text ([`AccountPath::as_str`]: empty for the root).
pub fn ancestors_of(path: &AccountPath) -> impl Iterator<Item = &str> {
    let s = path.as_str();
    let inner = s.match_indices('/').map(move |(i, _)| &s[..i]);
    (!path.is_root())
        .then(|| std::iter::once("").chain(inner))
        .into_iter()
        .flatten()
}

/// The start of the UTC day holding the hour starting at `hour`.
pub fn day_of(hour: i64) -> i64 {
    hour.div_euclid(DAY_SECS) * DAY_SECS
}

/// Adds each hourly token sum to the hour and the day of every strict ancestor.
///
/// Errors only on a sum that leaves 128 bits (see [`crate::project`]).
pub fn tree_usage<'a>(usage: &FxHashMap<RollupKey<'a>, i128>) -> Result<TreeUsage<'a>, StoreError> {
    let mut out = TreeUsage::default();
    for (k, n) in usage {
        for node in ancestors_of(k.account) {
            for (span, start) in [(Span::Hour, k.hour), (Span::Day, day_of(k.hour))] {
                let slot = out
                    .entry(TreeKey {
                        node,
                        span,
                        start,
                        service: k.service,
                        model: k.model,
                        modality: k.modality,
                        direction: k.direction,
                    })
                    .or_insert(0);
                *slot = slot.checked_add(*n).ok_or_else(|| {
                    StoreError::Backend(format!("subtree token sum of {node} overflows"))
                })?;
            }
        }
    }
    Ok(out)
}

/// Adds each hourly cost to the hour and the day of every strict ancestor.
pub fn tree_cost<'a>(cost: &CostSums<'a>) -> Result<TreeCost<'a>, StoreError> {
    let mut out = TreeCost::default();
    for (k, amount) in cost {
        let CostKey {
            account,
            hour,
            service,
            model,
            currency,
        } = *k;
        for node in ancestors_of(account) {
            for (span, start) in [(Span::Hour, hour), (Span::Day, day_of(hour))] {
                let slot = out
                    .entry(TreeCostKey {
                        node,
                        span,
                        start,
                        service,
                        model,
                        currency,
                    })
                    .or_insert(ExactSum::ZERO);
                *slot = slot.checked_add(*amount).ok_or_else(|| {
                    StoreError::Backend(format!("subtree cost of {node} overflows"))
                })?;
            }
        }
    }
    Ok(out)
}

/// Whose subtree rollups a question reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subtrees {
    /// The node's own subtree: rows name the node.
    Of(AccountPath),
    /// Each direct child's subtree (rows name the child), and the node's own usage,
    /// not its children's (rows name the node).
    ChildrenOf(AccountPath),
}

/// A question to the subtree rollups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFilter {
    /// Whose rollups.
    pub subtrees: Subtrees,
    /// First hour included (seconds since the epoch, inclusive).
    pub from_hour: Option<i64>,
    /// End (seconds since the epoch, exclusive).
    pub to_hour: Option<i64>,
    /// Whether the whole UTC days of the range may come as one row each, stamped with
    /// the day's start: for a question summing the range, not bucketing it.
    pub days: bool,
}

/// A stretch of a [`TreeFilter`]'s range and the span of the rows that cover it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stretch {
    /// Hours or days.
    pub span: Span,
    /// First start included, if bounded.
    pub from: Option<i64>,
    /// End (exclusive), if bounded.
    pub to: Option<i64>,
}

impl TreeFilter {
    /// The range cut into at most three stretches: the hours before the first whole
    /// UTC day, the whole days, the hours after the last. Without `days`, one stretch of
    /// hours. The stretches are disjoint and cover the range exactly, so a row is
    /// counted once.
    pub fn stretches(&self) -> Vec<Stretch> {
        stretches(self.from_hour, self.to_hour, self.days)
    }
}

/// The hours `from_hour..to_hour` (either end open) cut into the hours before the
/// first whole UTC day, the whole days and the hours after the last; without `days`,
/// one stretch of hours. Every table kept by hour and by UTC day (subtree rollups,
/// billing lines) is read by these stretches.
pub fn stretches(from_hour: Option<i64>, to_hour: Option<i64>, days: bool) -> Vec<Stretch> {
    let hours = |from, to| Stretch {
        span: Span::Hour,
        from,
        to,
    };
    if !days {
        return vec![hours(from_hour, to_hour)];
    }
    // Whole days: from the first day boundary at or after `from` to the last at or
    // before `to`.
    let first_day = from_hour.map(|f| day_of(f + DAY_SECS - 1));
    let end_day = to_hour.map(day_of);
    if let (Some(a), Some(b)) = (first_day, end_day)
        && a >= b
    {
        return vec![hours(from_hour, to_hour)];
    }
    let mut out = Vec::with_capacity(3);
    if let (Some(f), Some(a)) = (from_hour, first_day)
        && f < a
    {
        out.push(hours(Some(f), Some(a)));
    }
    out.push(Stretch {
        span: Span::Day,
        from: first_day,
        to: end_day,
    });
    if let (Some(b), Some(t)) = (end_day, to_hour)
        && b < t
    {
        out.push(hours(Some(b), Some(t)));
    }
    out
}

/// The direct children of `node` among `paths` (any order, any depth).
pub fn children_of<'p>(
    node: &AccountPath,
    paths: impl IntoIterator<Item = &'p AccountPath>,
) -> Vec<&'p AccountPath> {
    let want = node.depth() + 1;
    paths
        .into_iter()
        .filter(|p| p.depth() == want && p.is_within(node))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(s: &str) -> AccountPath {
        s.parse().expect("path")
    }

    #[test]
    fn ancestors_are_the_root_and_every_node_above() {
        let p = path("acme/cn/hr");
        assert_eq!(
            ancestors_of(&p).collect::<Vec<_>>(),
            ["", "acme", "acme/cn"]
        );
        assert_eq!(ancestors_of(&path("acme")).collect::<Vec<_>>(), [""]);
        assert_eq!(ancestors_of(&AccountPath::root()).count(), 0);
    }

    #[test]
    fn children_are_one_level_down_and_inside() {
        let all = [
            "acme",
            "acme/cn",
            "acme/cn/hr",
            "acme/us",
            "acmex/a",
            "beta",
        ]
        .map(path);
        let got: Vec<_> = children_of(&path("acme"), &all)
            .into_iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(got, ["acme/cn", "acme/us"]);
        let got: Vec<_> = children_of(&AccountPath::root(), &all)
            .into_iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(got, ["acme", "beta"]);
    }

    proptest! {
        /// The stretches cover exactly the hours of the range, each once, and each
        /// day stretch starts and ends on a UTC day.
        #[test]
        fn stretches_cover_the_range_once(
            from in proptest::option::of(0i64..2_000),
            len in 0i64..2_000,
            unbounded_end in any::<bool>(),
            days in any::<bool>(),
        ) {
            let from_hour = from.map(|h| h * 3600);
            let to_hour = if unbounded_end { None } else { Some((from.unwrap_or(0) + len) * 3600) };
            let f = TreeFilter {
                subtrees: Subtrees::Of(AccountPath::root()),
                from_hour,
                to_hour,
                days,
            };
            // Every hour in a window around the range is covered once iff inside it.
            for h in -30i64..2_100 {
                let h = h * 3600;
                let inside = from_hour.is_none_or(|a| h >= a) && to_hour.is_none_or(|b| h < b);
                let covering = f
                    .stretches()
                    .iter()
                    .filter(|s| {
                        let start = match s.span { Span::Hour => h, Span::Day => day_of(h) };
                        s.from.is_none_or(|a| start >= a) && s.to.is_none_or(|b| start < b)
                    })
                    .count();
                prop_assert_eq!(covering, usize::from(inside), "hour {}", h / 3600);
            }
            for s in f.stretches() {
                if s.span == Span::Day {
                    prop_assert!(s.from.is_none_or(|a| a % DAY_SECS == 0));
                    prop_assert!(s.to.is_none_or(|b| b % DAY_SECS == 0));
                }
            }
        }
    }
}
