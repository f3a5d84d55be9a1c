//! Statements: what an account node owes for a period, with a subtotal per child node,
//! built from the hourly billing lines (`Store::cost_lines`); issuing one closes its
//! period with a `statement.closed` entry holding the statement as issued.
//!
//! What a statement covers: the billing lines of the node's subtree whose hour is in
//! the period: usage by its time, corrections by the time they were made (a period
//! is never re-billed), and the rounding of entries' totals. Its lines show list
//! prices (quantity × unit price = amount, exactly); what contracts took off or added
//! is one `contract` adjustment, the books' rounding one `rounding` adjustment, so
//! `subtotal = Σ lines + Σ adjustments` to the last digit. Taxes a book declares are
//! levied on what its versions billed. A closed month is answered as issued, byte for
//! byte; usage that reaches it later (a late event) is billed in the first open month
//! after it, as a `late:<month>` adjustment.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{PathParam, Query};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::civil::Date;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{Timestamp, ToSpan};
use ciyuan_core::{AccountPath, Currency, Entry, EntryBody, ExactSum, Scope, StatementClosed};
use ciyuan_report::{
    ChargeCategory, ChildSubtotal, CurrencyTotal, Statement, StatementLine, TaxLine,
};
use ciyuan_store::{HourFilter, LineRow};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The metadata key in which a node declares how its own (shared) cost is allocated
/// to its children.
pub(crate) const ALLOCATION_KEY: &str = "allocation";

/// An allocation rule as a node declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allocation {
    /// In proportion to each child's cost in the period.
    Cost,
    /// In proportion to each child's tokens in the period.
    Usage,
    /// Equal parts.
    Equal,
    /// In proportion to a number in each child's metadata (head count, say).
    Metadata(String),
    /// Fixed percentages per child segment, summing to 100.
    Shares(Vec<(String, Decimal)>),
}

impl Allocation {
    /// Parses `cost`, `usage`, `equal`, `metadata:KEY` or `shares:a=60,b=40`.
    pub(crate) fn parse(spec: &str) -> Result<Allocation, String> {
        match spec {
            "cost" => return Ok(Allocation::Cost),
            "usage" => return Ok(Allocation::Usage),
            "equal" => return Ok(Allocation::Equal),
            _ => {}
        }
        if let Some(key) = spec.strip_prefix("metadata:") {
            if key.is_empty() {
                return Err("metadata: names no key".into());
            }
            return Ok(Allocation::Metadata(key.to_string()));
        }
        if let Some(list) = spec.strip_prefix("shares:") {
            let mut shares = Vec::new();
            let mut total = Decimal::ZERO;
            for part in list.split(',') {
                let (child, pct) = part
                    .split_once('=')
                    .ok_or_else(|| format!("{part:?} is not child=percent"))?;
                let pct = ciyuan_core::decimal_from_text(pct.trim())
                    .map_err(|e| format!("{part:?}: {}", e.why))?;
                if pct.is_sign_negative() {
                    return Err(format!("{part:?}: a share is not negative"));
                }
                total += pct;
                shares.push((child.trim().to_string(), pct));
            }
            if total != Decimal::ONE_HUNDRED {
                return Err(format!("the shares sum to {total}, not 100"));
            }
            return Ok(Allocation::Shares(shares));
        }
        Err(format!(
            "{spec:?} is not cost, usage, equal, metadata:KEY or shares:child=percent,..."
        ))
    }
}

/// `GET`/`POST /api/v1/statements/{path}` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementQuery {
    /// A calendar month in the node's time zone, `2026-11`.
    period: Option<String>,
    /// Or a range: first instant (RFC 3339, on a whole hour).
    from: Option<Timestamp>,
    /// End (exclusive).
    to: Option<Timestamp>,
    /// `json` (default), `csv` or `html`.
    format: Option<String>,
    /// For `html`: `en` (default) or `zh-CN`.
    lang: Option<String>,
}

/// The period a statement (or an export) covers.
pub(crate) struct Period {
    /// The month's name, when it is one.
    pub(crate) name: Option<String>,
    pub(crate) from: Timestamp,
    pub(crate) to: Timestamp,
    pub(crate) zone_name: String,
}

/// Parses `2026-11`.
pub(crate) fn month(name: &str) -> Result<Date, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "period: {name:?} is not a month written YYYY-MM, e.g. 2026-11"
        ))
    };
    let (y, m) = name.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let y: i16 = y.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    Date::new(y, m, 1).map_err(|_| bad())
}

/// The instant a civil date starts in `zone`.
fn start_of(date: Date, zone: &TimeZone) -> Result<Timestamp, ApiError> {
    date.to_zoned(zone.clone())
        .and_then(|z| z.start_of_day())
        .map(|z| z.timestamp())
        .map_err(|e| ApiError::bad_request(format!("period: {date} in {zone:?}: {e}")))
}

/// The name of the month holding `at` in `zone`.
pub(crate) fn month_of(at: Timestamp, zone: &TimeZone) -> String {
    let d = at.to_zoned(zone.clone()).date();
    format!("{:04}-{:02}", d.year(), d.month())
}

impl Period {
    fn of(q: &StatementQuery, zone: &TimeZone) -> Result<Period, ApiError> {
        Period::of_range(q.period.as_deref(), q.from, q.to, zone)
    }

    /// A month (`2026-11`) in `zone`, or `from`..`to`, on whole hours.
    pub(crate) fn of_range(
        period: Option<&str>,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
        zone: &TimeZone,
    ) -> Result<Period, ApiError> {
        let zone_name = zone.iana_name().unwrap_or("UTC").to_string();
        let (name, from, to) = match (period, from, to) {
            (Some(p), None, None) => {
                let first = month(p)?;
                let next = first
                    .checked_add(1.month())
                    .map_err(|e| ApiError::bad_request(format!("period: {p}: {e}")))?;
                (
                    Some(p.to_string()),
                    start_of(first, zone)?,
                    start_of(next, zone)?,
                )
            }
            (None, Some(from), Some(to)) => (None, from, to),
            _ => {
                return Err(ApiError::bad_request(
                    "give period=YYYY-MM, or from and to (RFC 3339)",
                ));
            }
        };
        if from >= to {
            return Err(ApiError::unprocessable(format!(
                "from: {from} is not before to ({to})"
            )));
        }
        for (what, t) in [("from", from), ("to", to)] {
            if t.as_second() % 3600 != 0 || t.subsec_nanosecond() != 0 {
                return Err(ApiError::unprocessable(format!(
                    "{what}: {t} is not on a whole UTC hour: billing lines are hourly (time zones 30 or 45 minutes off UTC cannot close a month on them)"
                )));
            }
        }
        Ok(Period {
            name,
            from,
            to,
            zone_name,
        })
    }

    /// For file names: the month, or `from_to`.
    pub(crate) fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}_{}", self.from.as_second(), self.to.as_second()),
        }
    }

    /// The billing lines of `node`'s subtree in the period.
    pub(crate) fn filter(&self, node: &AccountPath) -> HourFilter {
        HourFilter {
            account: node.clone(),
            from_hour: Some(self.from.as_second()),
            to_hour: Some(self.to.as_second()),
        }
    }
}

/// The node `row` counts toward in `node`'s statement: the direct child holding it,
/// or `node` itself.
fn child_of(node: &AccountPath, account: &AccountPath) -> AccountPath {
    let depth = node.depth();
    if account.depth() <= depth {
        return node.clone();
    }
    let mut path = node.clone();
    if let Some(seg) = account.segments().nth(depth)
        && let Ok(child) = path.child(seg)
    {
        path = child;
    }
    path
}

fn exact(d: ExactSum, what: &str) -> Result<Decimal, ApiError> {
    d.to_decimal()
        .map(|d| d.normalize())
        .ok_or_else(|| ApiError::internal(format!("{what} ({d}) needs more than 28 digits")))
}

fn add(sum: &mut ExactSum, d: ExactSum) -> Result<(), ApiError> {
    *sum = sum
        .checked_add(d)
        .ok_or_else(|| ApiError::internal("a statement sum overflows"))?;
    Ok(())
}

/// A line's grouping: currency, service, model, key, unit price, book@version.
type LineGroup = (Currency, String, String, String, Option<Decimal>, String);

/// Sums of billing lines by what a statement shows of them.
#[derive(Default)]
struct Sums {
    usage: BTreeMap<LineGroup, (ExactSum, ExactSum)>,
    corrections: BTreeMap<LineGroup, (ExactSum, ExactSum)>,
    /// Service credits and refunds: (currency, key, book@version) → billed.
    credits: BTreeMap<(Currency, String, String), ExactSum>,
    contract: BTreeMap<Currency, ExactSum>,
    rounding: BTreeMap<Currency, ExactSum>,
    billed: BTreeMap<Currency, ExactSum>,
    children: BTreeMap<AccountPath, BTreeMap<Currency, ExactSum>>,
    /// Billed per (currency, book, version), for taxes.
    by_book: BTreeMap<(Currency, String, u32), ExactSum>,
}

impl Sums {
    fn of(node: &AccountPath, rows: &[LineRow]) -> Result<Sums, ApiError> {
        let mut s = Sums::default();
        for r in rows {
            let c = r.currency;
            add(s.billed.entry(c).or_insert(ExactSum::ZERO), r.billed)?;
            add(
                s.children
                    .entry(child_of(node, &r.account))
                    .or_default()
                    .entry(c)
                    .or_insert(ExactSum::ZERO),
                r.billed,
            )?;
            add(
                s.by_book
                    .entry((c, r.book.clone(), r.version))
                    .or_insert(ExactSum::ZERO),
                r.billed,
            )?;
            if r.unit_price.is_none() {
                if r.key == "rounding" {
                    add(s.rounding.entry(c).or_insert(ExactSum::ZERO), r.billed)?;
                } else {
                    // A service credit (`service_credit:<level>`) or a refund.
                    let book = if r.book.is_empty() {
                        String::new()
                    } else {
                        format!("{}@{}", r.book, r.version)
                    };
                    add(
                        s.credits
                            .entry((c, r.key.clone(), book))
                            .or_insert(ExactSum::ZERO),
                        r.billed,
                    )?;
                }
                continue;
            }
            let diff = r
                .contracted
                .checked_sub(r.list)
                .ok_or_else(|| ApiError::internal("a statement sum overflows"))?;
            add(s.contract.entry(c).or_insert(ExactSum::ZERO), diff)?;
            let group = (
                c,
                r.service.clone(),
                r.model.clone(),
                r.key.clone(),
                r.unit_price.map(|p| p.normalize()),
                format!("{}@{}", r.book, r.version),
            );
            let into = if r.adjustment {
                &mut s.corrections
            } else {
                &mut s.usage
            };
            let slot = into
                .entry(group)
                .or_insert((ExactSum::ZERO, ExactSum::ZERO));
            add(&mut slot.0, r.quantity)?;
            add(&mut slot.1, r.list)?;
        }
        Ok(s)
    }
}

fn lines(
    groups: &BTreeMap<LineGroup, (ExactSum, ExactSum)>,
    category: ChargeCategory,
) -> Result<Vec<StatementLine>, ApiError> {
    let mut out = Vec::with_capacity(groups.len());
    for ((currency, service, model, key, price, book), (q, amount)) in groups {
        let amount = exact(*amount, "a line's amount")?;
        let quantity = exact(*q, "a line's quantity")?;
        if amount.is_zero() && quantity.is_zero() {
            continue;
        }
        out.push(StatementLine {
            category,
            service: service.clone(),
            model: model.clone(),
            key: key.clone(),
            quantity,
            unit_price: *price,
            amount,
            currency: *currency,
            book: book.clone(),
        });
    }
    Ok(out)
}

fn adjustment(key: &str, amount: Decimal, currency: Currency) -> StatementLine {
    StatementLine {
        category: ChargeCategory::Adjustment,
        service: String::new(),
        model: String::new(),
        key: key.to_string(),
        quantity: Decimal::ZERO,
        unit_price: None,
        amount,
        currency,
        book: String::new(),
    }
}

impl App {
    /// The statement of `node` for `period`, from the billing lines (blocking).
    fn build_statement(&self, node: &AccountPath, period: &Period) -> Result<Statement, ApiError> {
        let rows = self.store.cost_lines(&period.filter(node))?;
        let sums = Sums::of(node, &rows)?;
        let name_of = |p: &AccountPath| -> Result<Option<String>, ApiError> {
            Ok(self.store.account(p)?.and_then(|a| a.info.display_name))
        };
        let mut adjustments = lines(&sums.corrections, ChargeCategory::Adjustment)?;
        for (c, d) in &sums.contract {
            let d = exact(*d, "the contract adjustment")?;
            if !d.is_zero() {
                adjustments.push(adjustment("contract", d, *c));
            }
        }
        for ((c, key, book), d) in &sums.credits {
            let d = exact(*d, "a credit")?;
            if !d.is_zero() {
                adjustments.push(StatementLine {
                    category: ChargeCategory::Credit,
                    book: book.clone(),
                    ..adjustment(key, d, *c)
                });
            }
        }
        for (c, d) in &sums.rounding {
            let d = exact(*d, "the rounding")?;
            if !d.is_zero() {
                adjustments.push(adjustment("rounding", d, *c));
            }
        }
        let mut billed = sums.billed.clone();
        // A minimum commitment of the node's own contract tops a month up to it, in
        // the currency of the book the contract names.
        if period.name.is_some()
            && let Some(contract) = self.pricing.contract_at(node)
            && let Some(minimum) = &contract.minimum_commitment
            && let Some(book) = self.pricing.latest(&contract.book)
        {
            let c = book.currency;
            let so_far = exact(
                billed.get(&c).copied().unwrap_or(ExactSum::ZERO),
                "the month's billed",
            )?;
            let short = minimum.shortfall(so_far);
            if !short.is_zero() {
                adjustments.push(adjustment("commitment", short.normalize(), c));
                add(
                    billed.entry(c).or_insert(ExactSum::ZERO),
                    ExactSum::of(short),
                )?;
            }
        }
        for (c, late_month, amount) in self.late_items(node, period)? {
            adjustments.push(adjustment(&format!("late:{late_month}"), amount, c));
            add(
                billed.entry(c).or_insert(ExactSum::ZERO),
                ExactSum::of(amount),
            )?;
        }
        // Taxes, per tax a book version declares, on what that version billed.
        let mut taxes: BTreeMap<(Currency, String, Decimal), (ExactSum, ciyuan_core::BookTax)> =
            BTreeMap::new();
        for ((c, book, version), amount) in &sums.by_book {
            if let Some(tax) = self
                .pricing
                .book_version(book, *version)
                .and_then(|b| b.tax.clone())
            {
                let slot = taxes
                    .entry((*c, tax.name.clone(), tax.rate_percent.normalize()))
                    .or_insert((ExactSum::ZERO, tax));
                add(&mut slot.0, *amount)?;
            }
        }
        let mut tax_lines = Vec::new();
        let mut tax_by_currency: BTreeMap<Currency, Decimal> = BTreeMap::new();
        for ((c, name, rate), (base, tax)) in &taxes {
            let base = exact(*base, "a tax base")?;
            let amount = tax
                .on(base)
                .ok_or_else(|| ApiError::internal("a tax overflows"))?
                .normalize();
            *tax_by_currency.entry(*c).or_default() += amount;
            tax_lines.push(TaxLine {
                name: name.clone(),
                rate_percent: *rate,
                base,
                amount,
                currency: *c,
            });
        }
        let mut totals = Vec::new();
        for (c, s) in &billed {
            let subtotal = exact(*s, "a subtotal")?;
            let tax = tax_by_currency.get(c).copied().unwrap_or(Decimal::ZERO);
            totals.push(CurrencyTotal {
                currency: *c,
                subtotal,
                tax,
                total: (subtotal + tax).normalize(),
            });
        }
        let usage = lines(&sums.usage, ChargeCategory::Usage)?;
        // The statement's own arithmetic, checked before anyone reads it.
        for t in &totals {
            let of = |ls: &[StatementLine]| -> Decimal {
                ls.iter()
                    .filter(|l| l.currency == t.currency)
                    .map(|l| l.amount)
                    .sum()
            };
            assert_eq!(
                of(&usage) + of(&adjustments),
                t.subtotal,
                "a statement's lines and adjustments sum to its subtotal in {}",
                t.currency
            );
        }
        let mut children = Vec::new();
        for (child, per) in &sums.children {
            let mut ts = Vec::new();
            for (c, s) in per {
                let subtotal = exact(*s, "a child's subtotal")?;
                ts.push(CurrencyTotal {
                    currency: *c,
                    subtotal,
                    tax: Decimal::ZERO,
                    total: subtotal,
                });
            }
            children.push(ChildSubtotal {
                account: child.clone(),
                display_name: name_of(child)?,
                totals: ts,
            });
        }
        for (c, s) in &sums.billed {
            let sum: Decimal = children
                .iter()
                .flat_map(|ch| &ch.totals)
                .filter(|t| t.currency == *c)
                .map(|t| t.subtotal)
                .sum();
            assert_eq!(
                sum,
                exact(*s, "a subtotal")?,
                "the children's subtotals sum to the usage billed in {c}"
            );
        }
        Ok(Statement {
            account: node.clone(),
            display_name: name_of(node)?,
            period: period.name.clone(),
            from: period.from,
            to: period.to,
            time_zone: period.zone_name.clone(),
            lines: usage,
            adjustments,
            taxes: tax_lines,
            allocations: self.allocations(node, period, &children)?,
            children,
            totals,
            closed: None,
        })
    }

    /// The node's own cost allocated to its children by the rule its `allocation`
    /// metadata declares (none without one).
    fn allocations(
        &self,
        node: &AccountPath,
        period: &Period,
        children: &[ChildSubtotal],
    ) -> Result<Vec<ciyuan_report::AllocatedCost>, ApiError> {
        use ciyuan_report::allocate::{
            AllocationRule, OnZeroTotal, allocate, round_to_minor_units,
        };
        let Some(spec) = self
            .store
            .account(node)?
            .and_then(|a| a.info.metadata.get(ALLOCATION_KEY).cloned())
        else {
            return Ok(Vec::new());
        };
        let rule = Allocation::parse(&spec).map_err(|e| {
            ApiError::unprocessable(format!("metadata.{ALLOCATION_KEY} of {node}: {e}"))
        })?;
        // The children only are kept (as many as the subtotals already held); the
        // subtree below them is read a page at a time and passed over.
        let mut kids: Vec<ciyuan_store::Account> = Vec::new();
        ciyuan_store::each_account(self.store.as_ref(), node, &mut |a| {
            if a.path.depth() == node.depth() + 1 {
                kids.push(a);
            }
        })?;
        if kids.is_empty() {
            return Ok(Vec::new());
        }
        let own = children.iter().find(|c| c.account == *node);
        let mut out = Vec::new();
        for shared in own.map(|c| c.totals.as_slice()).unwrap_or_default() {
            let c = shared.currency;
            let minor = ciyuan_report::journal::default_minor_units(c).unwrap_or(2);
            let rounded = round_to_minor_units(shared.subtotal, minor);
            let weight_of = |path: &AccountPath| -> Decimal {
                children
                    .iter()
                    .find(|ch| ch.account == *path)
                    .and_then(|ch| ch.totals.iter().find(|t| t.currency == c))
                    .map_or(Decimal::ZERO, |t| t.subtotal)
            };
            let paths = || kids.iter().map(|k| k.path.clone());
            let weights: Vec<(AccountPath, Decimal)> = match &rule {
                Allocation::Cost => paths().map(|p| (p.clone(), weight_of(&p))).collect(),
                Allocation::Usage => {
                    let mut w = Vec::new();
                    for p in paths() {
                        let tokens: i128 = self
                            .store
                            .usage_hours(&period.filter(&p))?
                            .iter()
                            .map(|r| r.tokens)
                            .sum();
                        w.push((
                            p,
                            Decimal::try_from_i128_with_scale(tokens.max(0), 0).map_err(|_| {
                                ApiError::internal("a child's tokens do not fit a decimal")
                            })?,
                        ));
                    }
                    w
                }
                Allocation::Metadata(key) => {
                    let mut w = Vec::new();
                    for k in &kids {
                        let v = k.info.metadata.get(key).map(String::as_str).unwrap_or("0");
                        let d = ciyuan_core::decimal_from_text(v).map_err(|e| {
                            ApiError::unprocessable(format!(
                                "metadata.{key} of {}: {v:?} is not a number ({})",
                                k.path, e.why
                            ))
                        })?;
                        w.push((k.path.clone(), d));
                    }
                    w
                }
                Allocation::Equal | Allocation::Shares(_) => Vec::new(),
            };
            let rule_value = match &rule {
                Allocation::Equal => AllocationRule::Equal(paths().collect()),
                Allocation::Shares(shares) => {
                    let mut fixed = Vec::new();
                    for (seg, pct) in shares {
                        let child = node.child(seg).map_err(|e| {
                            ApiError::unprocessable(format!("metadata.{ALLOCATION_KEY}: {e}"))
                        })?;
                        fixed.push((child, *pct));
                    }
                    AllocationRule::FixedPercent(fixed)
                }
                _ => AllocationRule::Proportional {
                    weights,
                    on_zero_total: OnZeroTotal::Equal,
                },
            };
            let parts = allocate(rounded, minor, &rule_value).map_err(|e| {
                ApiError::unprocessable(format!("allocating the shared cost of {node}: {e}"))
            })?;
            let unallocated = (shared.subtotal - rounded).normalize();
            let sum: Decimal = parts.iter().map(|p| p.amount).sum();
            assert_eq!(
                sum + unallocated,
                shared.subtotal,
                "an allocation's parts and remainder sum to the shared cost"
            );
            out.push(ciyuan_report::AllocatedCost {
                currency: c,
                shared: shared.subtotal,
                rule: spec.clone(),
                unallocated,
                parts: parts
                    .into_iter()
                    .map(|p| ciyuan_report::AllocationPart {
                        account: p.child,
                        amount: p.amount.normalize(),
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Usage that reached closed months of `node` after they were issued, billed in
    /// `period` when it is the first open month after them: per closed month and
    /// currency, what its billing lines say now less what was issued and what later
    /// statements already carried.
    fn late_items(
        &self,
        node: &AccountPath,
        period: &Period,
    ) -> Result<Vec<(Currency, String, Decimal)>, ApiError> {
        let Some(this) = &period.name else {
            return Ok(Vec::new());
        };
        let issued = self.store.statements(node)?;
        if issued.iter().any(|s| s.body.period == *this) {
            return Ok(Vec::new());
        }
        let mut docs = Vec::new();
        for s in &issued {
            let doc: Statement = serde_json::from_str(&s.body.document)
                .map_err(|e| ApiError::internal(format!("statement {} of {node}: {e}", s.entry)))?;
            docs.push((s, doc));
        }
        let mut out = Vec::new();
        for (s, doc) in &docs {
            let q = &s.body;
            if q.to > period.from {
                continue;
            }
            // Only the first open month after q carries it: no open month between.
            let next = docs
                .iter()
                .filter(|(o, _)| o.body.from >= q.to && o.body.to <= period.from)
                .map(|(o, _)| o.body.from)
                .collect::<Vec<_>>();
            let mut at = q.to;
            let mut gap = false;
            while at < period.from {
                if !next.contains(&at) {
                    gap = true;
                    break;
                }
                let zone = TimeZone::get(&q.time_zone).map_err(|e| {
                    ApiError::internal(format!("statement {}: zone {}: {e}", s.entry, q.time_zone))
                })?;
                let m = month(&month_of(at, &zone))?;
                at = start_of(
                    m.checked_add(1.month())
                        .map_err(|e| ApiError::internal(e.to_string()))?,
                    &zone,
                )?;
            }
            if gap {
                continue;
            }
            let now = self.store.cost_lines(&HourFilter {
                account: node.clone(),
                from_hour: Some(q.from.as_second()),
                to_hour: Some(q.to.as_second()),
            })?;
            let mut per: BTreeMap<Currency, ExactSum> = BTreeMap::new();
            for r in &now {
                add(per.entry(r.currency).or_insert(ExactSum::ZERO), r.billed)?;
            }
            // What the month's billing lines said when it was issued: its subtotal less
            // what the statement added beside them (a commitment's top-up, late items
            // of earlier months).
            for t in &doc.totals {
                add(
                    per.entry(t.currency).or_insert(ExactSum::ZERO),
                    ExactSum::of(-t.subtotal),
                )?;
            }
            for a in doc
                .adjustments
                .iter()
                .filter(|a| a.key == "commitment" || a.key.starts_with("late:"))
            {
                add(
                    per.entry(a.currency).or_insert(ExactSum::ZERO),
                    ExactSum::of(a.amount),
                )?;
            }
            let key = format!("late:{}", q.period);
            for (_, later) in &docs {
                for a in later.adjustments.iter().filter(|a| a.key == key) {
                    add(
                        per.entry(a.currency).or_insert(ExactSum::ZERO),
                        ExactSum::of(-a.amount),
                    )?;
                }
            }
            for (c, d) in per {
                let d = exact(d, "a late item")?;
                if !d.is_zero() {
                    out.push((c, q.period.clone(), d));
                }
            }
        }
        Ok(out)
    }
}

/// The statement in the format asked, with how it was issued in headers.
fn render(st: &Statement, json: Option<String>, q: &StatementQuery) -> Result<Response, ApiError> {
    let (ctype, body) = match q.format.as_deref().unwrap_or("json") {
        "json" => (
            "application/json",
            match json {
                Some(j) => j.into_bytes(),
                None => serde_json::to_vec(st).map_err(ApiError::internal)?,
            },
        ),
        "csv" => {
            let mut out = Vec::new();
            ciyuan_report::statement::write_csv(st, &mut out).map_err(ApiError::internal)?;
            ("text/csv; charset=utf-8", out)
        }
        "html" => {
            let lang: ciyuan_report::statement::Lang = q
                .lang
                .as_deref()
                .unwrap_or("en")
                .parse()
                .map_err(|e| ApiError::bad_request(format!("lang: {e}")))?;
            let mut out = Vec::new();
            ciyuan_report::statement::write_html(st, lang, &mut out).map_err(ApiError::internal)?;
            ("text/html; charset=utf-8", out)
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "format: {other:?} is not json, csv or html"
            )));
        }
    };
    let mut resp = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
        body,
    )
        .into_response();
    if let Some(c) = &st.closed {
        resp.headers_mut()
            .insert("x-ciyuan-statement-entry", HeaderValue::from(c.entry));
    }
    Ok(resp)
}

/// `GET /api/v1/statements/{path}?period=2026-11[&format=json|csv|html][&lang=]`:
/// the statement of a node (any read key of the node or above). A closed month is
/// answered as issued.
pub async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Query(q): Query<StatementQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    app.caught_up().await?;
    let (st, json, q) = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &node)?;
            let period = Period::of(&q, &zone)?;
            if let Some(name) = &period.name
                && let Some(s) = app
                    .store
                    .statements(&node)?
                    .into_iter()
                    .find(|s| s.body.period == *name)
            {
                let mut st: Statement = serde_json::from_str(&s.body.document)
                    .map_err(|e| ApiError::internal(format!("statement {}: {e}", s.entry)))?;
                st.closed = Some(ciyuan_report::Closed {
                    entry: s.entry,
                    at: s.ts,
                });
                return Ok((st, Some(s.body.document), q));
            }
            Ok((app.build_statement(&node, &period)?, None, q))
        })
        .await?;
    render(&st, json, &q)
}

/// `POST /api/v1/statements/{path}?period=2026-11`: issues the month's statement and
/// closes the month for the node, appending a `statement.closed` entry that holds the
/// statement and its SHA-256 (an admin key of the node or above; the month must be
/// over, and is closed once).
pub async fn close(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(raw): PathParam,
    Query(q): Query<StatementQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let node = crate::budgets::existing_node(&app, &caller, &raw).await?;
    if q.period.is_none() {
        return Err(ApiError::bad_request(
            "period: a statement is issued for a calendar month (period=YYYY-MM)",
        ));
    }
    let _guard = app.admin_lock.lock().await;
    // The month's service levels in the subtree are evaluated first, so their credits
    // are on the statement that closes it.
    if let Some(month) = &q.period {
        app.evaluate_service_levels_under(&node, month).await?;
    }
    app.caught_up().await?;
    let n = node.clone();
    let (closed, q) = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &n)?;
            let period = Period::of(&q, &zone)?;
            let name = period.name.clone().unwrap_or_default();
            if period.to > Timestamp::now() {
                return Err(ApiError::unprocessable(format!(
                    "period: {name} in {} is not over until {}",
                    period.zone_name, period.to
                )));
            }
            if let Some(s) = app
                .store
                .statements(&n)?
                .into_iter()
                .find(|s| s.body.period == name)
            {
                return Err(ApiError::conflict(format!(
                    "period: {name} of {n} was closed by entry {}",
                    s.entry
                )));
            }
            let st = app.build_statement(&n, &period)?;
            let document = serde_json::to_string(&st).map_err(ApiError::internal)?;
            Ok((
                StatementClosed::new(name, period.from, period.to, period.zone_name, document),
                q,
            ))
        })
        .await?;
    let document = closed.document.clone();
    let range = app
        .append_visible(&[Entry::new(
            Timestamp::now(),
            node.clone(),
            EntryBody::StatementClosed(closed),
        )])
        .await?;
    let mut st: Statement = serde_json::from_str(&document).map_err(ApiError::internal)?;
    st.closed = Some(ciyuan_report::Closed {
        entry: range.start,
        at: Timestamp::now(),
    });
    render(&st, Some(document), &q)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use ciyuan_core::{
        AccountInfo, PriceKey, RatedLine, Rating, RatingCorrection, Rounding, RoundingAt,
        RoundingMode, Usage,
    };
    use proptest::prelude::*;

    fn rating(
        lines: &[(usize, u64, i64, u32)],
        discount: Option<u32>,
        rounding: (u32, usize),
        usd: bool,
    ) -> Rating {
        let keys = ["text.input", "text.output", "measure.pages"];
        let modes = [
            RoundingMode::HalfEven,
            RoundingMode::HalfUp,
            RoundingMode::Down,
            RoundingMode::Up,
        ];
        let mut r = Rating {
            amount: Decimal::ZERO,
            currency: if usd { "USD" } else { "CNY" }.parse().unwrap(),
            book: "list".into(),
            version: 1,
            lines: lines
                .iter()
                .map(|(k, q, m, scale)| {
                    let quantity = Decimal::from(*q);
                    let unit_price = Decimal::new(*m, scale + 3);
                    RatedLine {
                        key: keys[*k].parse::<PriceKey>().unwrap(),
                        quantity,
                        unit_price,
                        amount: quantity * unit_price,
                    }
                })
                .collect(),
            contract: None,
            discount_percent: discount.map(|d| Decimal::new(i64::from(d), 1)),
            markup_percent: None,
            unpriced: false,
            missing: vec![],
            basis: None,
            place: None,
        };
        r.settle(&Rounding {
            at: RoundingAt::Entry,
            to: rounding.0,
            mode: modes[rounding.1],
        })
        .unwrap();
        r
    }

    /// For random ratings, nodes, times and corrections, a month's statement totals
    /// exactly what the ledger's entries of that month and subtree say: usage by its
    /// time, corrections by theirs.
    #[test]
    fn statement_totals_equal_the_ledgers_sums() {
        let line = (0usize..3, 0u64..3_000_000, 1i64..50_000, 0u32..6);
        let usage = (
            0usize..4,
            -900_000i64..3_600_000,
            proptest::collection::vec(line.clone(), 0..3),
            proptest::option::of(0u32..500),
            (0u32..8, 0usize..4),
            any::<bool>(),
        );
        let config = ProptestConfig {
            cases: 24,
            ..ProptestConfig::default()
        };
        proptest!(config, |(events in proptest::collection::vec(usage, 1..30),
                            corrections in proptest::collection::vec((0usize..30, 0i64..3_600_000, proptest::collection::vec(line, 0..3)), 0..5),
                            zone in 0usize..3)| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let store: Arc<dyn ciyuan_store::Store> =
                    Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
                let log: Arc<dyn ciyuan_store::Log> = Arc::new(crate::tests::MemLog::new());
                let app = App::new(store, log, crate::ServerConfig::default()).unwrap();
                let nodes = ["acme", "acme/a", "acme/b", "other"];
                let zones = ["UTC", "Asia/Shanghai", "America/New_York"];
                let mut entries = vec![Entry::new(
                    "2026-01-01T00:00:00Z".parse().unwrap(),
                    "acme".parse().unwrap(),
                    EntryBody::AccountCreated(AccountInfo {
                        time_zone: Some(zones[zone].into()),
                        ..AccountInfo::default()
                    }),
                )];
                for n in ["acme/a", "acme/b", "other"] {
                    entries.push(Entry::new(
                        "2026-01-01T00:00:00Z".parse().unwrap(),
                        n.parse().unwrap(),
                        EntryBody::AccountCreated(AccountInfo::default()),
                    ));
                }
                let base: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
                let first_usage = entries.len();
                for (node, secs, lines, discount, rounding, usd) in &events {
                    let r = rating(lines, *discount, *rounding, *usd);
                    entries.push(Entry::new(
                        base.checked_add(SignedDur::from_secs(*secs)).unwrap(),
                        nodes[*node].parse().unwrap(),
                        EntryBody::Usage(Usage {
                            service: "llm.chat".into(),
                            model: Some("m".into()),
                            rating: Some(Box::new(r)),
                            ..Usage::default()
                        }),
                    ));
                }
                for (target, secs, lines) in &corrections {
                    let i = first_usage + target % events.len();
                    let Entry { ts, account, body: EntryBody::Usage(u), .. } = entries[i].clone() else {
                        unreachable!()
                    };
                    let previous = u.rating.clone().unwrap();
                    let now = rating(lines, None, (2, 0), previous.currency.as_str() == "USD");
                    entries.push(Entry::new(
                        base.checked_add(SignedDur::from_secs(*secs)).unwrap(),
                        account,
                        EntryBody::RatingCorrection(RatingCorrection {
                            entry: i as u64,
                            at: ts,
                            usage: Box::new(u),
                            previous,
                            rating: Box::new(now),
                        }),
                    ));
                }
                app.append(&entries).await.unwrap();
                app.caught_up().await.unwrap();
                let acme: AccountPath = "acme".parse().unwrap();
                let zone = TimeZone::get(zones[zone]).unwrap();
                let period = Period::of_range(Some("2026-11"), None, None, &zone).unwrap();
                let st = app.build_statement(&acme, &period).unwrap();
                let mut want: BTreeMap<Currency, Decimal> = BTreeMap::new();
                let inside = |e: &Entry| {
                    e.ts >= period.from && e.ts < period.to && e.account.is_within(&acme)
                };
                for e in entries.iter().filter(|e| inside(e)) {
                    match &e.body {
                        EntryBody::Usage(u) => {
                            let r = u.rating.as_ref().unwrap();
                            *want.entry(r.currency).or_default() += r.amount;
                        }
                        EntryBody::RatingCorrection(c) => {
                            for (cur, d) in c.changes() {
                                *want.entry(cur).or_default() += d;
                            }
                        }
                        _ => {}
                    }
                }
                let got: BTreeMap<Currency, Decimal> =
                    st.totals.iter().map(|t| (t.currency, t.subtotal)).collect();
                let want: BTreeMap<Currency, Decimal> = want
                    .into_iter()
                    .filter(|(c, d)| !d.is_zero() || got.contains_key(c))
                    .map(|(c, d)| (c, d.normalize()))
                    .collect();
                prop_assert_eq!(got, want);
                Ok(())
            })?;
        });
    }

    use ciyuan_core::jiff::SignedDuration as SignedDur;
}
