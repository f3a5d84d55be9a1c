//! Shared costs split among a node's children, exactly to the smallest currency unit.
//!
//! A shared cost (a platform team's, say) is divided by a declared [`AllocationRule`]:
//! proportional to weights the caller passes (the children's usage or cost), fixed
//! percentage shares, or equal parts. Every child receives a whole number of the
//! currency's minor units (`minor_units` decimals: 2 for CNY and USD, 0 for JPY) and the
//! amounts add up to the shared cost exactly.
//!
//! # The remainder rule (largest remainder, Hamilton's method)
//!
//! Children are first put in [`AccountPath`] order. With `C` the cost in minor units and
//! `W` the sum of the weights, each child first gets `floor(C × wᵢ / W)` units; the `L`
//! units left over (`0 ≤ L <` number of children) go one each to the `L` children with the
//! largest remainders `C × wᵢ mod W`, ties going to the child that comes first in path
//! order. So each share is within one minor unit of its exact proportion, and who gets
//! what does not depend on the order in which the children were passed.
//!
//! A negative cost (a credit) is split as its absolute value and every share negated, so
//! a credit and a charge of the same size fall on the children symmetrically.

use ciyuan_core::AccountPath;
use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// The largest `minor_units` accepted: a [`Decimal`] holds at most 28 decimals, and no
/// currency has more than 4.
pub const MAX_MINOR_UNITS: u32 = 18;

/// What to do when the weights of a proportional split add up to zero (no child used
/// anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnZeroTotal {
    /// Refuse: [`AllocateError::ZeroTotalWeight`].
    Error,
    /// Split equally instead.
    Equal,
}

/// A declared rule for dividing a shared cost among children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationRule {
    /// In proportion to each child's weight (its usage or cost, as the caller decides).
    /// Weights are zero or positive.
    Proportional {
        /// One weight per child.
        weights: Vec<(AccountPath, Decimal)>,
        /// What a zero total means.
        on_zero_total: OnZeroTotal,
    },
    /// Fixed percentage shares, which must add up to exactly 100.
    FixedPercent(Vec<(AccountPath, Decimal)>),
    /// Equal parts.
    Equal(Vec<AccountPath>),
}

/// One child's part of a shared cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The child.
    pub child: AccountPath,
    /// Its part: a whole number of minor units.
    pub amount: Decimal,
}

/// Why a cost could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// The rule names no child.
    #[error("the allocation rule names no child to allocate to")]
    NoChildren,
    /// A child is named twice.
    #[error("child {0} is named twice in the allocation rule")]
    DuplicateChild(AccountPath),
    /// A weight or share below zero.
    #[error("child {0} has a negative weight or share {1}; weights must be zero or more")]
    NegativeWeight(AccountPath, Decimal),
    /// The weights of a proportional split add up to zero.
    #[error(
        "the weights of the proportional allocation add up to zero (no child has usage or cost); declare an equal split for that case or pass other weights"
    )]
    ZeroTotalWeight,
    /// Fixed shares that do not add up to 100.
    #[error("the fixed shares add up to {0} percent, not 100")]
    SharesNot100(Decimal),
    /// More decimals than the currency has.
    #[error(
        "the shared cost {cost} is not a whole number of minor units ({minor_units} decimals); round it first"
    )]
    NotWholeMinorUnits {
        /// The cost.
        cost: Decimal,
        /// The currency's decimals.
        minor_units: u32,
    },
    /// `minor_units` above [`MAX_MINOR_UNITS`].
    #[error("{0} minor-unit decimals is more than the {MAX_MINOR_UNITS} accepted")]
    TooManyMinorUnits(u32),
    /// The exact arithmetic would not fit in 128 bits.
    #[error(
        "the cost and weights are too large to split exactly (cost × weight must fit in 128 bits after scaling)"
    )]
    TooLarge,
}

/// Splits `cost` among the rule's children. See the module documentation for the
/// remainder rule. The result is in child path order, one entry per child (zero amounts
/// included), and its sum is `cost` exactly.
pub fn allocate(
    cost: Decimal,
    minor_units: u32,
    rule: &AllocationRule,
) -> Result<Vec<Allocation>, AllocateError> {
    if minor_units > MAX_MINOR_UNITS {
        return Err(AllocateError::TooManyMinorUnits(minor_units));
    }
    let weighted: Vec<(AccountPath, Decimal)> = match rule {
        AllocationRule::Proportional { weights, .. } => weights.clone(),
        AllocationRule::FixedPercent(shares) => shares.clone(),
        AllocationRule::Equal(children) => {
            children.iter().map(|c| (c.clone(), Decimal::ONE)).collect()
        }
    };
    let mut children: BTreeMap<AccountPath, Decimal> = BTreeMap::new();
    for (child, weight) in weighted {
        if weight.is_sign_negative() && !weight.is_zero() {
            return Err(AllocateError::NegativeWeight(child, weight));
        }
        if children.insert(child.clone(), weight).is_some() {
            return Err(AllocateError::DuplicateChild(child));
        }
    }
    if children.is_empty() {
        return Err(AllocateError::NoChildren);
    }
    if let AllocationRule::FixedPercent(_) = rule {
        let mut total = Decimal::ZERO;
        for w in children.values() {
            total = total.checked_add(*w).ok_or(AllocateError::TooLarge)?;
        }
        if total != Decimal::ONE_HUNDRED {
            return Err(AllocateError::SharesNot100(total.normalize()));
        }
    }

    let units = to_minor_units(cost, minor_units)?;
    let mut ints = scaled_integers(children.values())?;
    let mut total: i128 = 0;
    for w in &ints {
        total = total.checked_add(*w).ok_or(AllocateError::TooLarge)?;
    }
    if total == 0 {
        match rule {
            AllocationRule::Proportional {
                on_zero_total: OnZeroTotal::Equal,
                ..
            } => {
                ints = vec![1; ints.len()];
                total = ints.len() as i128;
            }
            _ => return Err(AllocateError::ZeroTotalWeight),
        }
    }

    let parts = hamilton(units.unsigned_abs(), &ints, total)?;
    let negative = units < 0;
    let mut out = Vec::with_capacity(parts.len());
    for (child, part) in children.into_keys().zip(parts) {
        let signed = i128::try_from(part).map_err(|_| AllocateError::TooLarge)?;
        let signed = if negative { -signed } else { signed };
        let amount = Decimal::try_from_i128_with_scale(signed, minor_units)
            .map_err(|_| AllocateError::TooLarge)?;
        out.push(Allocation { child, amount });
    }
    let sum = out
        .iter()
        .try_fold(Decimal::ZERO, |acc, a| acc.checked_add(a.amount))
        .ok_or(AllocateError::TooLarge)?;
    // The whole point of this module: a split that loses or creates a unit is a defect.
    assert_eq!(sum, cost, "allocation of {cost} does not add up: {sum}");
    Ok(out)
}

/// Rounds `amount` to `minor_units` decimals, ties to even, for a caller whose cost has
/// more decimals than the currency (the rule for that rounding is the caller's to state;
/// this is the one the crate uses where none is given).
pub fn round_to_minor_units(amount: Decimal, minor_units: u32) -> Decimal {
    amount.round_dp_with_strategy(
        minor_units,
        rust_decimal::RoundingStrategy::MidpointNearestEven,
    )
}

/// `cost` as an integer count of minor units, refusing a cost with finer decimals.
fn to_minor_units(cost: Decimal, minor_units: u32) -> Result<i128, AllocateError> {
    let normal = cost.normalize();
    if normal.scale() > minor_units {
        return Err(AllocateError::NotWholeMinorUnits { cost, minor_units });
    }
    let factor = 10i128
        .checked_pow(minor_units - normal.scale())
        .ok_or(AllocateError::TooLarge)?;
    normal
        .mantissa()
        .checked_mul(factor)
        .ok_or(AllocateError::TooLarge)
}

/// The weights as integers over a common power of ten, so the split is exact.
fn scaled_integers<'a>(
    weights: impl Iterator<Item = &'a Decimal> + Clone,
) -> Result<Vec<i128>, AllocateError> {
    let scale = weights
        .clone()
        .map(|w| w.normalize().scale())
        .max()
        .unwrap_or(0);
    weights
        .map(|w| {
            let n = w.normalize();
            let factor = 10i128
                .checked_pow(scale - n.scale())
                .ok_or(AllocateError::TooLarge)?;
            n.mantissa()
                .checked_mul(factor)
                .ok_or(AllocateError::TooLarge)
        })
        .collect()
}

/// Largest-remainder split of `units` by `weights` (all ≥ 0, summing to `total` > 0),
/// ties to the lower index (the caller's path order).
fn hamilton(units: u128, weights: &[i128], total: i128) -> Result<Vec<u128>, AllocateError> {
    let total = total.unsigned_abs();
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given: u128 = 0;
    for (i, w) in weights.iter().enumerate() {
        let product = units
            .checked_mul(w.unsigned_abs())
            .ok_or(AllocateError::TooLarge)?;
        parts.push(product / total);
        remainders.push((product % total, i));
        given += product / total;
    }
    let left = units - given;
    // Largest remainder first; on equal remainders the earlier child (path order) first.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders
        .iter()
        .take(usize::try_from(left).map_err(|_| AllocateError::TooLarge)?)
    {
        parts[i] += 1;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn p(s: &str) -> AccountPath {
        AccountPath::parse(s).unwrap()
    }
    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }
    fn amounts(a: &[Allocation]) -> Vec<(String, String)> {
        a.iter()
            .map(|x| (x.child.to_string(), x.amount.to_string()))
            .collect()
    }

    #[test]
    fn thirds_give_the_extra_cent_to_the_first_path() {
        let rule = AllocationRule::Equal(vec![p("acme/c"), p("acme/a"), p("acme/b")]);
        let out = allocate(d("100.00"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![
                ("acme/a".into(), "33.34".into()),
                ("acme/b".into(), "33.33".into()),
                ("acme/c".into(), "33.33".into())
            ]
        );
    }

    #[test]
    fn largest_remainder_wins_over_path_order() {
        // 10.00 by 1:2 → 3.333.. and 6.666..: the second has the larger remainder.
        let rule = AllocationRule::Proportional {
            weights: vec![(p("a"), d("1")), (p("b"), d("2"))],
            on_zero_total: OnZeroTotal::Error,
        };
        let out = allocate(d("10"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![("a".into(), "3.33".into()), ("b".into(), "6.67".into())]
        );
    }

    #[test]
    fn yen_has_no_decimals() {
        let rule = AllocationRule::Equal(vec![p("a"), p("b"), p("c")]);
        let out = allocate(d("1000"), 0, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![
                ("a".into(), "334".into()),
                ("b".into(), "333".into()),
                ("c".into(), "333".into())
            ]
        );
        assert_eq!(
            allocate(d("1000.5"), 0, &rule),
            Err(AllocateError::NotWholeMinorUnits {
                cost: d("1000.5"),
                minor_units: 0
            })
        );
    }

    #[test]
    fn credits_split_symmetrically() {
        let rule = AllocationRule::Equal(vec![p("a"), p("b"), p("c")]);
        let out = allocate(d("-100.00"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![
                ("a".into(), "-33.34".into()),
                ("b".into(), "-33.33".into()),
                ("c".into(), "-33.33".into())
            ]
        );
    }

    #[test]
    fn fixed_shares_must_add_to_100() {
        let rule = AllocationRule::FixedPercent(vec![(p("a"), d("60")), (p("b"), d("30"))]);
        assert_eq!(
            allocate(d("1"), 2, &rule),
            Err(AllocateError::SharesNot100(d("90")))
        );
        let rule = AllocationRule::FixedPercent(vec![(p("a"), d("60.5")), (p("b"), d("39.5"))]);
        let out = allocate(d("1.00"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![("a".into(), "0.61".into()), ("b".into(), "0.39".into())]
        );
    }

    #[test]
    fn zero_total_is_an_error_or_an_equal_split_as_declared() {
        let weights = vec![(p("a"), d("0")), (p("b"), d("0.000"))];
        let rule = AllocationRule::Proportional {
            weights: weights.clone(),
            on_zero_total: OnZeroTotal::Error,
        };
        assert_eq!(
            allocate(d("5"), 2, &rule),
            Err(AllocateError::ZeroTotalWeight)
        );
        let rule = AllocationRule::Proportional {
            weights,
            on_zero_total: OnZeroTotal::Equal,
        };
        let out = allocate(d("5"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![("a".into(), "2.50".into()), ("b".into(), "2.50".into())]
        );
    }

    #[test]
    fn bad_rules_are_named() {
        assert_eq!(
            allocate(d("1"), 2, &AllocationRule::Equal(vec![])),
            Err(AllocateError::NoChildren)
        );
        assert_eq!(
            allocate(d("1"), 2, &AllocationRule::Equal(vec![p("a"), p("a")])),
            Err(AllocateError::DuplicateChild(p("a")))
        );
        let rule = AllocationRule::Proportional {
            weights: vec![(p("a"), d("-1")), (p("b"), d("2"))],
            on_zero_total: OnZeroTotal::Error,
        };
        assert_eq!(
            allocate(d("1"), 2, &rule),
            Err(AllocateError::NegativeWeight(p("a"), d("-1")))
        );
        assert_eq!(
            allocate(d("1"), 19, &AllocationRule::Equal(vec![p("a")])),
            Err(AllocateError::TooManyMinorUnits(19))
        );
    }

    #[test]
    fn a_zero_weight_child_gets_nothing() {
        let rule = AllocationRule::Proportional {
            weights: vec![(p("a"), d("0")), (p("b"), d("1")), (p("c"), d("1"))],
            on_zero_total: OnZeroTotal::Error,
        };
        let out = allocate(d("0.03"), 2, &rule).unwrap();
        assert_eq!(
            amounts(&out),
            vec![
                ("a".into(), "0.00".into()),
                ("b".into(), "0.02".into()),
                ("c".into(), "0.01".into())
            ]
        );
    }

    fn arb_case() -> impl Strategy<Value = (i64, u32, Vec<(u64, u32)>)> {
        (
            -10_000_000_000i64..10_000_000_000,
            0u32..4,
            prop::collection::vec((0u64..1_000_000_000, 0u32..6), 1..12),
        )
    }

    proptest! {
        #[test]
        fn split_is_exact_close_and_order_free(
            (cost_units, minor, raw) in arb_case(),
            seed in any::<u64>(),
        ) {
            let cost = Decimal::new(cost_units, minor);
            let weights: Vec<(AccountPath, Decimal)> = raw
                .iter()
                .enumerate()
                .map(|(i, (m, s))| (p(&format!("n{i:02}")), Decimal::new(*m as i64, *s)))
                .collect();
            let total: Decimal = weights.iter().map(|w| w.1).sum();
            let rule = AllocationRule::Proportional {
                weights: weights.clone(),
                on_zero_total: OnZeroTotal::Equal,
            };
            let out = allocate(cost, minor, &rule).unwrap();

            // The sum is exact.
            let sum: Decimal = out.iter().map(|a| a.amount).sum();
            prop_assert_eq!(sum, cost);

            // Each share is within one minor unit of its exact proportion:
            // |amount × W − cost × w| < one unit × W, checked in exact integers.
            let unit = Decimal::new(1, minor);
            for a in &out {
                let w = if total.is_zero() {
                    Decimal::ONE
                } else {
                    weights.iter().find(|x| x.0 == a.child).unwrap().1
                };
                let big_w = if total.is_zero() { Decimal::from(out.len()) } else { total };
                let lhs = (a.amount * big_w - cost * w).abs();
                prop_assert!(lhs < unit * big_w, "{} got {} of {}", a.child, a.amount, cost);
                prop_assert_eq!(a.amount.scale(), minor);
            }

            // The order of the children does not change who gets what.
            let mut shuffled = weights.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let again = allocate(cost, minor, &AllocationRule::Proportional {
                weights: shuffled,
                on_zero_total: OnZeroTotal::Equal,
            }).unwrap();
            prop_assert_eq!(&out, &again);
        }
    }
}
