//! A statement (what one account node owes for a period, with a subtotal per child
//! node) and its CSV and HTML renderings.
//!
//! The server builds a [`Statement`]; its JSON form is this struct serialized. The
//! renderings are deterministic: the same statement gives the same bytes.

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Currency};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One line of a statement: usage (or an adjustment) of one service, model and key at
/// one unit price, summed over the period and the node's subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    /// What it charges for.
    pub category: crate::ChargeCategory,
    /// The service.
    pub service: String,
    /// The model; empty where none.
    pub model: String,
    /// The priced key, or what an adjustment adjusts.
    pub key: String,
    /// Units.
    pub quantity: Decimal,
    /// The list price of one unit, where there is one.
    pub unit_price: Option<Decimal>,
    /// The amount billed.
    pub amount: Decimal,
    /// The currency.
    pub currency: Currency,
    /// Book and version (`list@3`); empty for lines no book priced.
    pub book: String,
}

/// What one child node (a subsidiary) contributes, per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSubtotal {
    /// The child node.
    pub account: AccountPath,
    /// Its display name, if set.
    pub display_name: Option<String>,
    /// Its subtree's amounts, one per currency, in currency order.
    pub totals: Vec<CurrencyTotal>,
}

/// A tax line: a rate the book declares, on the taxable amount of one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaxLine {
    /// The tax's name, e.g. `VAT`.
    pub name: String,
    /// The rate in percent, e.g. `6`.
    pub rate_percent: Decimal,
    /// The amount it is levied on.
    pub base: Decimal,
    /// The tax.
    pub amount: Decimal,
    /// The currency.
    pub currency: Currency,
}

/// The amounts of one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyTotal {
    /// The currency.
    pub currency: Currency,
    /// Usage and adjustments before tax.
    pub subtotal: Decimal,
    /// Taxes.
    pub tax: Decimal,
    /// `subtotal + tax`.
    pub total: Decimal,
}

/// What an account node owes for a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The node.
    pub account: AccountPath,
    /// Its display name, if set.
    pub display_name: Option<String>,
    /// The period's name when it is a calendar month (`2026-11`).
    pub period: Option<String>,
    /// First instant covered (UTC).
    pub from: Timestamp,
    /// First instant not covered (UTC).
    pub to: Timestamp,
    /// The time zone the period was computed in.
    pub time_zone: String,
    /// Usage lines, ordered by currency, service, model, key, unit price.
    pub lines: Vec<StatementLine>,
    /// Adjustments, credits and refunds, in the same order.
    pub adjustments: Vec<StatementLine>,
    /// Taxes.
    pub taxes: Vec<TaxLine>,
    /// One subtotal per child node, by path.
    pub children: Vec<ChildSubtotal>,
    /// Totals, one per currency, in currency order.
    pub totals: Vec<CurrencyTotal>,
    /// When the period was closed: the ledger entry that closed it (which holds the
    /// SHA-256 of this statement's JSON as issued).
    pub closed: Option<Closed>,
}

/// How a statement was issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    /// The `statement.closed` entry.
    pub entry: u64,
    /// When.
    pub at: Timestamp,
}

/// One CSV field as RFC 4180 writes it: quoted when it holds a comma, a quote, CR or LF,
/// quotes doubled. Text from tenants that a spreadsheet would run as a formula (a leading
/// `=`, `+`, `-`, `@`, tab or CR) is prefixed with `'` when `text` is true; amounts pass
/// `text = false` so a negative amount stays a number.
pub(crate) fn csv_field(out: &mut String, value: &str, text: bool) {
    let guard = text && value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = value.contains([',', '"', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if guard {
        out.push('\'');
    }
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

/// Fields joined into one CSV record ending in CRLF (RFC 4180). Each field is
/// `(value, is_text)`; see [`csv_field`].
pub(crate) fn csv_record<'a>(fields: impl IntoIterator<Item = (&'a str, bool)>) -> String {
    let mut out = String::new();
    for (i, (value, text)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(&mut out, value, text);
    }
    out.push_str("\r\n");
    out
}
