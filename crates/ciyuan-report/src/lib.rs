//! Ciyuan's finance outputs, as pure functions from billing lines to bytes.
//!
//! The server computes *what* is billed (aggregated [`CostLine`]s read from the
//! projections, and [`Statement`]s built from them); this crate decides *how* it is
//! written for the people and systems that take it:
//!
//! - [`statement`]: a statement's CSV and printable HTML renderings;
//! - [`focus`]: the FinOps Foundation's FOCUS 1.2 cost-and-usage CSV;
//! - [`journal`]: ERP journal vouchers (generic, Kingdee, Yonyou U8; UTF-8 with BOM or
//!   GBK);
//! - [`hr`]: usage and cost per person-level node per day;
//! - [`allocate`]: shared costs split exactly to the smallest currency unit;
//! - [`usage`]: every billing line as a CSV row, in Ciyuan's own columns;
//! - [`reports`]: scheduled reports' periods (UTC hours, days in a zone) and their CSV
//!   and JSON bytes.
//!
//! Every writer streams to the `std::io::Write` it is given and is deterministic: the
//! same input gives the same bytes. Money is [`Decimal`], never a float.

#![deny(missing_docs)]

pub mod allocate;
pub mod focus;
pub mod hr;
pub mod journal;
pub mod quality;
pub mod reconcile;
pub mod reports;
pub mod statement;
pub mod usage;

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Currency};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use statement::{
    AllocatedCost, AllocationPart, ChildSubtotal, Closed, CurrencyTotal, Statement, StatementLine,
    TaxLine,
};

/// What a billing line charges for (FOCUS's `ChargeCategory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeCategory {
    /// Metered usage.
    Usage,
    /// A correction, the rounding of entries' totals, a late item of a closed period.
    Adjustment,
    /// Money given back: a service credit, a refund.
    Credit,
    /// A tax the book declares.
    Tax,
}

/// One aggregated billing line: usage of one node, service, model and priced key over
/// a charge period, at one list unit price, in one currency, priced by one book
/// version. Adjustment lines (`category` not `Usage`) name what they adjust in `key`
/// (`rounding`, `correction`, ...) and may have no unit price.
///
/// Invariants the producer keeps: `billed_cost` is what is billed for the line;
/// `list_cost = quantity × list_unit_price` where there is a unit price;
/// `contracted_cost` is `list_cost` after the contract's discount and markup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostLine {
    /// The node whose usage it is.
    pub account: AccountPath,
    /// Start of the charge period (inclusive, UTC).
    pub charge_period_start: Timestamp,
    /// End of the charge period (exclusive, UTC).
    pub charge_period_end: Timestamp,
    /// What it charges for.
    pub category: ChargeCategory,
    /// The service, e.g. `llm.chat`, `doc.verify`.
    pub service: String,
    /// The model; empty where none.
    pub model: String,
    /// The priced key (`text.input`, `measure.pages`, `request`) or, for adjustments,
    /// what is adjusted.
    pub key: String,
    /// How many units (tokens, a measure's units, requests); zero for adjustments
    /// without a quantity.
    pub quantity: Decimal,
    /// The list price of one unit, where there is one.
    pub list_unit_price: Option<Decimal>,
    /// `quantity × list_unit_price`.
    pub list_cost: Decimal,
    /// After the contract's discount and markup.
    pub contracted_cost: Decimal,
    /// What is billed.
    pub billed_cost: Decimal,
    /// The currency of every amount of the line.
    pub currency: Currency,
    /// The price book.
    pub book: String,
    /// Its version.
    pub version: u32,
}

/// A [`CostLine`] whose text is borrowed: what a writer needs of a line, so a caller
/// reading lines from a store hands them over without copying their text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostLineRef<'a> {
    /// The node whose usage it is.
    pub account: &'a AccountPath,
    /// Start of the charge period (inclusive, UTC).
    pub charge_period_start: Timestamp,
    /// End of the charge period (exclusive, UTC).
    pub charge_period_end: Timestamp,
    /// What it charges for.
    pub category: ChargeCategory,
    /// The service.
    pub service: &'a str,
    /// The model; empty where none.
    pub model: &'a str,
    /// The priced key, or what an adjustment adjusts.
    pub key: &'a str,
    /// How many units.
    pub quantity: Decimal,
    /// The list price of one unit, where there is one.
    pub list_unit_price: Option<Decimal>,
    /// `quantity × list_unit_price`.
    pub list_cost: Decimal,
    /// After the contract's discount and markup.
    pub contracted_cost: Decimal,
    /// What is billed.
    pub billed_cost: Decimal,
    /// The currency of every amount of the line.
    pub currency: Currency,
    /// The price book.
    pub book: &'a str,
    /// Its version.
    pub version: u32,
}

impl CostLine {
    /// The line, borrowed.
    pub fn view(&self) -> CostLineRef<'_> {
        CostLineRef {
            account: &self.account,
            charge_period_start: self.charge_period_start,
            charge_period_end: self.charge_period_end,
            category: self.category,
            service: &self.service,
            model: &self.model,
            key: &self.key,
            quantity: self.quantity,
            list_unit_price: self.list_unit_price,
            list_cost: self.list_cost,
            contracted_cost: self.contracted_cost,
            billed_cost: self.billed_cost,
            currency: self.currency,
            book: &self.book,
            version: self.version,
        }
    }
}

impl CostLineRef<'_> {
    /// The line, owned.
    pub fn to_owned_line(&self) -> CostLine {
        CostLine {
            account: self.account.clone(),
            charge_period_start: self.charge_period_start,
            charge_period_end: self.charge_period_end,
            category: self.category,
            service: self.service.to_string(),
            model: self.model.to_string(),
            key: self.key.to_string(),
            quantity: self.quantity,
            list_unit_price: self.list_unit_price,
            list_cost: self.list_cost,
            contracted_cost: self.contracted_cost,
            billed_cost: self.billed_cost,
            currency: self.currency,
            book: self.book.to_string(),
            version: self.version,
        }
    }
}
