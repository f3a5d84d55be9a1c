//! Budgets, access rules and incidents as the ledger records them.
//!
//! Setting a limit is an entry (`budget.set`), so the limits in force at any time can
//! be proved like usage; the engine that enforces them (`ciyuan-budget`) is rebuilt
//! from these entries on start.

use crate::{AccountPath, Direction, Modality};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMeasure {
    /// Tokens (all, or those its selector names).
    Tokens,
    /// Requests (rate limits).
    Requests,
    /// Money: the rated amounts of usage, in [`BudgetSet::cost`]'s currency.
    Cost,
}

/// The window a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// A UTC minute.
    Minute,
    /// A UTC hour.
    Hour,
    /// A calendar day in the node's time zone.
    Day,
    /// A calendar month in the node's time zone.
    Month,
    /// Ever.
    Lifetime,
}

/// Whether a limit refuses or only alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// Refuses requests that would exceed it.
    Hard,
    /// Allows them and alerts.
    Soft,
}

/// Whose usage one counter of a limit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPer {
    /// The node's whole subtree.
    #[default]
    Node,
    /// Each session (a `x-ciyuan-session` header or the request's `user`).
    Session,
    /// Each API key.
    Key,
    /// Each single request.
    Request,
}

/// Which tokens a token limit counts: a modality, a direction, both, or neither (all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selector {
    /// Only this modality.
    pub modality: Option<Modality>,
    /// Only this direction.
    pub direction: Option<Direction>,
}

impl Selector {
    /// Parses `text`, `output`, `text.output`, or `all`.
    pub fn parse(s: &str) -> Option<Selector> {
        if s == "all" || s.is_empty() {
            return Some(Selector::default());
        }
        if let Some((m, d)) = s.split_once('.') {
            return Some(Selector {
                modality: Some(m.parse().ok()?),
                direction: Some(d.parse().ok()?),
            });
        }
        if let Ok(m) = s.parse::<Modality>() {
            return Some(Selector {
                modality: Some(m),
                direction: None,
            });
        }
        s.parse::<Direction>().ok().map(|d| Selector {
            modality: None,
            direction: Some(d),
        })
    }

    /// Whether a token of this modality and direction counts.
    pub fn matches(&self, modality: Modality, direction: Direction) -> bool {
        self.modality.is_none_or(|m| m == modality) && self.direction.is_none_or(|d| d == direction)
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.modality, self.direction) {
            (None, None) => f.write_str("all"),
            (Some(m), None) => write!(f, "{m}"),
            (None, Some(d)) => write!(f, "{d}"),
            (Some(m), Some(d)) => write!(f, "{m}.{d}"),
        }
    }
}

impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a token selector (all, a modality, a direction, or modality.direction)"
            ))
        })
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A limit set on the entry's account node (kind `budget.set`); replaces the node's
/// limit of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSet {
    /// The limit's name, unique on its node.
    pub name: String,
    /// What it counts.
    pub measure: BudgetMeasure,
    /// For token limits: which tokens.
    #[serde(default, skip_serializing_if = "is_default")]
    pub selector: Selector,
    /// The limit.
    pub amount: u64,
    /// Its window.
    pub period: BudgetPeriod,
    /// Hard or soft.
    pub mode: BudgetMode,
    /// Whose usage each counter holds.
    #[serde(default, skip_serializing_if = "is_default")]
    pub per: BudgetPer,
    /// Percentages of the limit at which an incident is written and webhooks called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<u8>,
    /// For per-request limits: lower the request's output cap to fit instead of
    /// refusing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clamp: bool,
    /// The account node of the key that set it. Only a key at that node or above may
    /// change or remove it, so a tenant cannot lift a control set from above. Absent
    /// in entries written before it was recorded: such a limit is treated as set at
    /// the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
    /// For cost limits: the money per window (`amount` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostAmount>,
}

/// A limit in money: an exact amount of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostAmount {
    /// The amount, exact (a decimal string in the entry).
    #[serde(with = "crate::posting::amount_serde")]
    pub amount: rust_decimal::Decimal,
    /// Its currency.
    pub currency: crate::Currency,
}

/// The money side of an incident on a money limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentCost {
    /// The limit's currency.
    pub currency: crate::Currency,
    /// Spent in the window when it happened, exact.
    #[serde(with = "crate::posting::amount_serde")]
    pub used: rust_decimal::Decimal,
    /// The limit.
    #[serde(with = "crate::posting::amount_serde")]
    pub amount: rust_decimal::Decimal,
}

/// A limit removed from the entry's node (kind `budget.cleared`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetCleared {
    /// The limit's name.
    pub name: String,
    /// The account node of the key that removed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_by: Option<AccountPath>,
}

/// Model access rules of the entry's node (kind `access.set`), inherited by its
/// subtree: a model must match every allow list on the path and no deny list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccessSet {
    /// Model patterns allowed (`*` wildcards); none = no restriction at this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Model patterns denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// The account node of the key that set them (see [`BudgetSet::set_by`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
}

/// Whether a control set by a key at `set_by` (the root when unknown) may be
/// changed or removed by a key at `caller`: only from the same node or above.
pub fn may_change_control(set_by: Option<&AccountPath>, caller: &AccountPath) -> bool {
    match set_by {
        Some(setter) => setter.is_within(caller),
        None => caller.is_root(),
    }
}

/// Something that needs attention (kind `incident`), on the node of the limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// `budget.threshold` (a threshold reached) or `budget.exceeded` (usage that had
    /// already happened, ingested, went over a hard limit).
    pub kind: String,
    /// The limit's name.
    pub limit: String,
    /// The limit's mode.
    pub mode: BudgetMode,
    /// Start of the window the usage counts in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Timestamp>,
    /// The threshold reached, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    /// Usage in the window when it happened.
    pub used: u64,
    /// The limit.
    pub amount: u64,
    /// The session or key the counter belongs to, for per-session and per-key limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The usage entry that caused it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<u64>,
    /// For money limits: the spend and the limit in money (then `used` and `amount`
    /// are 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<IncidentCost>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_print() {
        for s in ["all", "text", "output", "text.output", "audio.input"] {
            assert_eq!(Selector::parse(s).unwrap().to_string(), s);
        }
        assert!(Selector::parse("text.nothing").is_none());
        let out = Selector::parse("output").unwrap();
        assert!(out.matches(Modality::Audio, Direction::Output));
        assert!(!out.matches(Modality::Text, Direction::Input));
    }

    #[test]
    fn controls_change_only_from_their_setter_or_above() {
        let p = |s: &str| s.parse::<AccountPath>().unwrap();
        let acme = p("acme");
        assert!(may_change_control(Some(&acme), &p("acme")));
        assert!(may_change_control(Some(&acme), &AccountPath::root()));
        assert!(!may_change_control(Some(&acme), &p("acme/a")));
        assert!(!may_change_control(Some(&acme), &p("other")));
        // Unknown setter (entries before `set_by`): the root only.
        assert!(may_change_control(None, &AccountPath::root()));
        assert!(!may_change_control(None, &acme));
    }

    #[test]
    fn budget_entries_serialize_compactly() {
        let b = BudgetSet {
            name: "monthly".into(),
            measure: BudgetMeasure::Tokens,
            selector: Selector::default(),
            amount: 1_000_000,
            period: BudgetPeriod::Month,
            mode: BudgetMode::Hard,
            per: BudgetPer::Node,
            thresholds: vec![50, 80, 100],
            clamp: false,
            set_by: None,
            cost: None,
        };
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"name":"monthly","measure":"tokens","amount":1000000,"period":"month","mode":"hard","thresholds":[50,80,100]}"#
        );
        assert_eq!(serde_json::from_str::<BudgetSet>(&json).unwrap(), b);
    }

    #[test]
    fn cost_limits_serialize_beside_old_entries() {
        // An entry written before money limits still decodes.
        let old = r#"{"name":"monthly","measure":"tokens","amount":1000000,"period":"month","mode":"hard","thresholds":[50,80,100]}"#;
        let b: BudgetSet = serde_json::from_str(old).unwrap();
        assert_eq!(b.measure, BudgetMeasure::Tokens);
        let b = BudgetSet {
            name: "spend".into(),
            measure: BudgetMeasure::Cost,
            selector: Selector::default(),
            amount: 0,
            period: BudgetPeriod::Month,
            mode: BudgetMode::Hard,
            per: BudgetPer::Node,
            thresholds: vec![80],
            clamp: false,
            set_by: Some("acme".parse().unwrap()),
            cost: Some(CostAmount {
                amount: rust_decimal::Decimal::from_str_exact("500.00").unwrap(),
                currency: "CNY".parse().unwrap(),
            }),
        };
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"name":"spend","measure":"cost","amount":0,"period":"month","mode":"hard","thresholds":[80],"set_by":"acme","cost":{"amount":"500.00","currency":"CNY"}}"#
        );
        assert_eq!(serde_json::from_str::<BudgetSet>(&json).unwrap(), b);
        let bad = json.replace("\"CNY\"", "\"cny\"");
        assert!(serde_json::from_str::<BudgetSet>(&bad).is_err());
        let float = json.replace("\"500.00\"", "500.0");
        assert!(serde_json::from_str::<BudgetSet>(&float).is_err());
    }
}
