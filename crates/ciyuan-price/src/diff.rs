//! What changed between two versions of a book: what `ciyuan prices diff` prints.

use ciyuan_core::{PriceBook, PriceRule, TierKey, TierKind, TierPeriod, UnitPrices};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::fmt;

/// One difference between two book versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A field of the book itself (currency, rounding).
    Book {
        /// The field.
        field: &'static str,
        /// Before.
        old: String,
        /// After.
        new: String,
    },
    /// A rule only the new version has.
    RuleAdded {
        /// The rule: `model=gpt-4o tier=batch`.
        rule: String,
    },
    /// A rule only the old version has.
    RuleRemoved {
        /// The rule.
        rule: String,
    },
    /// A price of a rule both have, added, removed or changed.
    Price {
        /// The rule.
        rule: String,
        /// Which price: `text.input`, `per_request`, `above 200000: text.input`,
        /// `graduated month all, up to 1000000: text.input`, `window 00:30-08:30
        /// Asia/Shanghai: text.input`.
        price: String,
        /// Before; none = not priced.
        old: Option<Decimal>,
        /// After.
        new: Option<Decimal>,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |d: &Option<Decimal>| d.map_or("-".to_string(), |d| d.to_string());
        match self {
            Change::Book { field, old, new } => write!(f, "~ {field}: {old} -> {new}"),
            Change::RuleAdded { rule } => write!(f, "+ {rule}"),
            Change::RuleRemoved { rule } => write!(f, "- {rule}"),
            Change::Price {
                rule,
                price,
                old,
                new,
            } => write!(f, "~ {rule} {price}: {} -> {}", opt(old), opt(new)),
        }
    }
}

fn rule_id(r: &PriceRule) -> String {
    let mut s = Vec::new();
    if let Some(m) = &r.model {
        s.push(format!("model={m}"));
    }
    if let Some(v) = &r.service {
        s.push(format!("service={v}"));
    }
    s.push(format!("tier={}", r.tier));
    s.join(" ")
}

/// Every price of a rule, by a label that says where it sits.
fn flatten(r: &PriceRule) -> BTreeMap<String, Decimal> {
    let mut out = BTreeMap::new();
    let mut put = |prefix: &str, p: &UnitPrices| {
        for (k, v) in p {
            out.insert(format!("{prefix}{k}"), *v);
        }
    };
    put("", &r.unit_prices);
    for t in &r.above_input_tokens {
        put(&format!("above {}: ", t.input_tokens), &t.unit_prices);
    }
    if let Some(t) = &r.tiers {
        let kind = match t.kind {
            TierKind::Graduated => "graduated",
            TierKind::Volume => "volume",
        };
        let period = match t.period {
            TierPeriod::Day => "day",
            TierPeriod::Month => "month",
        };
        let key = match &t.key {
            TierKey::All => "all".to_string(),
            TierKey::Key(k) => k.to_string(),
        };
        for b in &t.bands {
            let band = b
                .up_to
                .map_or("above".to_string(), |u| format!("up to {u}"));
            put(&format!("{kind} {period} {key}, {band}: "), &b.unit_prices);
        }
    }
    for w in &r.windows {
        let days = if w.weekdays.is_empty() {
            String::new()
        } else {
            format!(" days {:?}", w.weekdays)
        };
        put(
            &format!("window {}-{} {}{days}: ", w.from, w.to, w.time_zone),
            &w.unit_prices,
        );
    }
    if let Some(p) = r.per_request {
        out.insert("per_request".to_string(), p);
    }
    out
}

/// Rules by identity; a second rule of the same identity is `#2`, and so on.
fn index(book: &PriceBook) -> BTreeMap<String, &PriceRule> {
    let mut out = BTreeMap::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for r in &book.rules {
        let id = rule_id(r);
        let n = seen.entry(id.clone()).or_insert(0);
        *n += 1;
        let id = if *n == 1 { id } else { format!("{id} #{n}") };
        out.insert(id, r);
    }
    out
}

/// What changed from `old` to `new`: the book's currency and rounding, rules added
/// and removed (by model, service and tier), and every price added, removed or
/// changed in rules both have. Rule order is not compared.
pub fn diff(old: &PriceBook, new: &PriceBook) -> Vec<Change> {
    let mut out = Vec::new();
    if old.currency != new.currency {
        out.push(Change::Book {
            field: "currency",
            old: old.currency.to_string(),
            new: new.currency.to_string(),
        });
    }
    if old.rounding != new.rounding {
        let show = |r: &ciyuan_core::Rounding| format!("{:?} to {} places", r.mode, r.to);
        out.push(Change::Book {
            field: "rounding",
            old: show(&old.rounding),
            new: show(&new.rounding),
        });
    }
    let (a, b) = (index(old), index(new));
    for (id, r) in &a {
        match b.get(id) {
            None => out.push(Change::RuleRemoved { rule: id.clone() }),
            Some(n) => {
                let (fa, fb) = (flatten(r), flatten(n));
                let keys: std::collections::BTreeSet<&String> =
                    fa.keys().chain(fb.keys()).collect();
                for k in keys {
                    let (x, y) = (fa.get(k).copied(), fb.get(k).copied());
                    if x != y {
                        out.push(Change::Price {
                            rule: id.clone(),
                            price: k.clone(),
                            old: x,
                            new: y,
                        });
                    }
                }
            }
        }
    }
    for id in b.keys() {
        if !a.contains_key(id) {
            out.push(Change::RuleAdded { rule: id.clone() });
        }
    }
    out
}
