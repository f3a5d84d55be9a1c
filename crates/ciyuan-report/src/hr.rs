//! The HR report: usage and cost per person-level node per day, as CSV.
//!
//! The server decides which nodes are people and sums their usage per day in each
//! node's time zone; this module writes the [`HrRow`]s it is given, streamed, in the
//! order given.
//!
//! Columns: `date,account,display_name,employee_id,tokens,currency,cost`. A row with
//! costs in several currencies becomes one line per currency, in currency order; its
//! tokens are written on the first of them only, so summing the `tokens` column, or
//! the `cost` column per currency, gives the exact totals. A row without any cost
//! becomes one line with empty `currency` and `cost`. Quoting follows RFC 4180 and rows
//! end with CRLF. Because this report is opened in spreadsheets, a name or employee id
//! that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, a tab
//! or a CR) is written with a leading `'`.

use std::collections::BTreeMap;
use std::io::Write;

use ciyuan_core::jiff::civil::Date;
use ciyuan_core::{AccountPath, Currency};
use rust_decimal::Decimal;

use crate::focus::push_field;

/// The header of the HR report.
pub const HR_COLUMNS: [&str; 7] = [
    "date",
    "account",
    "display_name",
    "employee_id",
    "tokens",
    "currency",
    "cost",
];

/// One person-level node's usage on one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrRow {
    /// The day, in the node's own time zone (written `YYYY-MM-DD`).
    pub day: Date,
    /// The node.
    pub account: AccountPath,
    /// Its display name, if set.
    pub display_name: Option<String>,
    /// The employee id from the node's metadata, if any.
    pub employee_id: Option<String>,
    /// Tokens used that day, every key summed (negative only if corrections took more
    /// than the day's usage).
    pub tokens: i128,
    /// What the day cost, per currency (the currencies it was billed in only).
    pub costs: BTreeMap<Currency, Decimal>,
}

/// Why the HR report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HrError {
    /// The writer failed.
    #[error("writing the HR report: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the HR report of `rows` to `out`, header first, one row at a time (give it a
/// `BufWriter`). Returns how many rows were read.
pub fn write_hr_csv<W: Write, I>(out: &mut W, rows: I) -> Result<u64, HrError>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<HrRow>,
{
    let mut buf = String::with_capacity(256);
    buf.push_str(&HR_COLUMNS.join(","));
    buf.push_str("\r\n");
    out.write_all(buf.as_bytes())?;
    let mut n = 0u64;
    for row in rows {
        let row: &HrRow = std::borrow::Borrow::borrow(&row);
        buf.clear();
        let day = row.day.to_string();
        let account = row.account.to_string();
        let name = row.display_name.as_deref().map(defuse).unwrap_or_default();
        let employee = row.employee_id.as_deref().map(defuse).unwrap_or_default();
        let tokens = row.tokens.to_string();
        let mut line = |tokens: &str, currency: &str, cost: &str| {
            for (i, f) in [
                day.as_str(),
                account.as_str(),
                &name,
                &employee,
                tokens,
                currency,
                cost,
            ]
            .iter()
            .enumerate()
            {
                if i > 0 {
                    buf.push(',');
                }
                push_field(&mut buf, f);
            }
            buf.push_str("\r\n");
        };
        if row.costs.is_empty() {
            line(&tokens, "", "");
        }
        for (i, (currency, cost)) in row.costs.iter().enumerate() {
            let cost = if cost.is_zero() { cost.abs() } else { *cost };
            line(
                if i == 0 { &tokens } else { "" },
                currency.as_str(),
                &cost.to_string(),
            );
        }
        out.write_all(buf.as_bytes())?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// Text a spreadsheet would evaluate is prefixed with `'`, which it shows as text.
fn defuse(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(tokens: i128, costs: &[(&str, &str)]) -> HrRow {
        HrRow {
            day: "2026-11-03".parse().unwrap(),
            account: AccountPath::parse("acme/cn/alice").unwrap(),
            display_name: Some("Alice, \"Ali\" Wang".into()),
            employee_id: Some("E-1001".into()),
            tokens,
            costs: costs
                .iter()
                .map(|(c, d)| (c.parse().unwrap(), d.parse().unwrap()))
                .collect(),
        }
    }

    fn render(rows: &[HrRow]) -> String {
        let mut out = Vec::new();
        let n = write_hr_csv(&mut out, rows).unwrap();
        assert_eq!(n as usize, rows.len());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn header_and_row_shape() {
        let csv = render(&[row(1500, &[("CNY", "0.75")])]);
        assert_eq!(
            csv,
            "date,account,display_name,employee_id,tokens,currency,cost\r\n\
             2026-11-03,acme/cn/alice,\"Alice, \"\"Ali\"\" Wang\",E-1001,1500,CNY,0.75\r\n"
        );
    }

    #[test]
    fn several_currencies_count_tokens_once() {
        let csv = render(&[row(10, &[("USD", "1.5"), ("CNY", "-0.00")])]);
        assert_eq!(
            csv.lines().skip(1).collect::<Vec<_>>(),
            [
                "2026-11-03,acme/cn/alice,\"Alice, \"\"Ali\"\" Wang\",E-1001,10,CNY,0.00",
                "2026-11-03,acme/cn/alice,\"Alice, \"\"Ali\"\" Wang\",E-1001,,USD,1.5",
            ]
        );
    }

    #[test]
    fn no_cost_and_no_names() {
        let mut r = row(7, &[]);
        r.display_name = None;
        r.employee_id = None;
        let csv = render(&[r]);
        assert!(
            csv.ends_with("\r\n2026-11-03,acme/cn/alice,,,7,,\r\n"),
            "{csv}"
        );
    }

    #[test]
    fn formulas_are_defused() {
        let mut r = row(1, &[]);
        r.display_name = Some("=HYPERLINK(\"x\")".into());
        r.employee_id = Some("@1".into());
        let csv = render(&[r]);
        assert!(csv.contains(",\"'=HYPERLINK(\"\"x\"\")\",'@1,"), "{csv}");
    }

    #[test]
    fn same_rows_same_bytes() {
        let rows = [
            row(1, &[("CNY", "1")]),
            row(2, &[("USD", "2"), ("CNY", "3")]),
        ];
        assert_eq!(render(&rows), render(&rows));
    }

    proptest! {
        /// The token column and the cost column per currency sum to the rows' totals.
        #[test]
        fn sums_are_kept(rows in prop::collection::vec(
            (any::<i64>(), prop::collection::btree_map(
                prop::sample::select(vec!["CNY", "USD", "EUR"]),
                (any::<i64>(), 0u32..10), 0..3)),
            0..20)) {
            let rows: Vec<HrRow> = rows.into_iter().map(|(t, costs)| HrRow {
                costs: costs.into_iter()
                    .map(|(c, (m, s))| (c.parse().unwrap(), Decimal::new(m, s)))
                    .collect(),
                ..row(i128::from(t), &[])
            }).collect();
            let csv = render(&rows);
            let mut tokens = 0i128;
            let mut costs: BTreeMap<String, Decimal> = BTreeMap::new();
            for l in csv.lines().skip(1) {
                // The name field is quoted and holds a comma: read from the right.
                let f: Vec<&str> = l.trim_end_matches('\r').rsplitn(4, ',').collect();
                if !f[2].is_empty() {
                    tokens += f[2].parse::<i128>().unwrap();
                }
                if !f[1].is_empty() {
                    *costs.entry(f[1].to_string()).or_default() += f[0].parse::<Decimal>().unwrap();
                }
            }
            prop_assert_eq!(tokens, rows.iter().map(|r| r.tokens).sum::<i128>());
            let mut want: BTreeMap<String, Decimal> = BTreeMap::new();
            for r in &rows {
                for (c, d) in &r.costs {
                    *want.entry(c.to_string()).or_default() += *d;
                }
            }
            prop_assert_eq!(costs, want);
        }
    }
}
