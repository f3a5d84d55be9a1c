//! The FinOps Foundation's FOCUS 1.2 cost-and-usage export, as CSV, streamed.
//!
//! [`FocusWriter`] takes [`CostLine`]s one at a time and writes one row each, so an
//! export of any size holds one row in memory. The columns are [`COLUMNS`]: every column
//! FOCUS 1.2 marks Mandatory, and the Conditional and Recommended ones that apply to
//! metered AI usage (consumed and pricing quantities and units, SKU and SKU price ids,
//! unit prices, sub accounts, service subcategory, charge frequency, region).
//!
//! How a line becomes a row, where FOCUS leaves a choice:
//! - `SkuId` is `model/key` (`gpt-4o/text.input`), or `service/key` for lines without
//!   a model; `SkuPriceId` adds the price book (`gpt-4o/text.input@list`): FOCUS wants
//!   it stable across time and contracts, so the book's version is not in it.
//! - Tokens are counted in `Tokens`, requests in `Requests`, a measure in its own name
//!   (`measure.pages` in `Pages`); the unit prices are per one such unit.
//! - `EffectiveCost` is `BilledCost`: Ciyuan amortizes nothing (a wallet top-up is a
//!   payment, not a FOCUS purchase).
//! - `ContractedUnitPrice` is `ContractedCost / PricingQuantity`; a line whose quotient
//!   is not exact is refused, because FOCUS requires the product to give the cost back
//!   (except on a correction, where it allows discrepancies). Likewise a line whose
//!   `list_cost` is not `quantity × list_unit_price`, and usage without a list price.
//! - `ChargeClass` is `Correction` for a line whose charge period starts before the
//!   billing period: a correction of a closed period lands in the next open one.
//! - `SubAccountId` is the line's node path; `SubAccountName` its display name (given to
//!   [`FocusWriter::write_named`]) or the path.
//! - Amounts are written as exact decimal text, never in exponent notation; a null is
//!   an empty field; datetimes are `YYYY-MM-DDTHH:MM:SSZ`.
//! - Quoting follows RFC 4180: a field with a comma, quote, CR or LF is quoted and its
//!   quotes doubled; rows end with CRLF.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Currency, PriceKey};
use rust_decimal::Decimal;

use crate::{ChargeCategory, CostLine, CostLineRef};

/// The FOCUS version the export follows.
pub const FOCUS_VERSION: &str = "1.2";

/// The provider, publisher and invoice issuer named when [`FocusMeta`] names none.
pub const DEFAULT_PROVIDER: &str = "Ciyuan";

/// `ServiceCategory` of every row: FOCUS 1.2's category for AI services.
pub const SERVICE_CATEGORY: &str = "AI and Machine Learning";

/// `ServiceSubcategory` of every row: the 1.2 subcategory under [`SERVICE_CATEGORY`].
pub const SERVICE_SUBCATEGORY: &str = "Generative AI";

/// The header, in the order the fields of every row are written.
pub const COLUMNS: [&str; 33] = [
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
];

/// What an export is for: the provider, the billing account and the billing period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FocusMeta {
    /// `ProviderName`, `PublisherName` and `InvoiceIssuerName`; [`DEFAULT_PROVIDER`]
    /// unless a reseller names itself.
    pub provider: String,
    /// The node the export is for: `BillingAccountId` is its path.
    pub billing_account: AccountPath,
    /// Its display name (`BillingAccountName`); the path when it has none, because
    /// FOCUS requires a name where the provider supports display names.
    pub billing_account_name: Option<String>,
    /// First instant of the billing period (inclusive, UTC, whole seconds).
    pub billing_period_start: Timestamp,
    /// First instant after it (exclusive, UTC, whole seconds).
    pub billing_period_end: Timestamp,
    /// The currency the account is billed in. When set, every line must be in it
    /// (nothing is converted); when `None`, each row's `BillingCurrency` is its line's
    /// currency, as for an account billed in several currencies.
    pub billing_currency: Option<Currency>,
}

impl FocusMeta {
    /// An export of `account` for `[start, end)`, provider [`DEFAULT_PROVIDER`], each
    /// line billed in its own currency.
    pub fn new(
        account: AccountPath,
        name: Option<String>,
        start: Timestamp,
        end: Timestamp,
    ) -> FocusMeta {
        FocusMeta {
            provider: DEFAULT_PROVIDER.to_string(),
            billing_account: account,
            billing_account_name: name,
            billing_period_start: start,
            billing_period_end: end,
            billing_currency: None,
        }
    }
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FocusError {
    /// The writer failed.
    #[error("writing the FOCUS export: {0}")]
    Io(#[from] std::io::Error),
    /// The export's description is unusable.
    #[error("FOCUS export: {0}")]
    Meta(String),
    /// A line cannot be written as FOCUS requires; nothing of it was written.
    #[error("FOCUS export, line {line} ({what}): {why}")]
    Line {
        /// The line's position among those given, from 1.
        line: u64,
        /// Which line: category, service, model, key.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// The export's total of one currency does not fit a decimal.
    #[error("FOCUS export: the total BilledCost in {0} overflows")]
    Overflow(Currency),
}

/// What an export held, returned by [`FocusWriter::finish`] so the caller can check it
/// against its own sums.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FocusSummary {
    /// Rows written, the header not counted.
    pub rows: u64,
    /// Sum of `BilledCost` per currency, exact.
    pub billed: BTreeMap<Currency, Decimal>,
}

/// Streams a FOCUS 1.2 CSV export: [`FocusWriter::new`] writes the header, each
/// [`FocusWriter::write`] one row, [`FocusWriter::finish`] flushes.
///
/// Each row goes to `out` in one `write_all`; give it a `BufWriter` over a file or a
/// socket. A line that cannot be written as FOCUS requires is refused with
/// [`FocusError::Line`] before any of its bytes are written, so the caller may skip it
/// or stop.
pub struct FocusWriter<W: Write> {
    out: W,
    meta: FocusMeta,
    // Fields common to every row, rendered once (quoted where they need it).
    // `,BillingAccountId,BillingAccountName,`
    account: Vec<u8>,
    // `,BillingPeriodEnd,BillingPeriodStart,`
    period: Vec<u8>,
    // `,InvoiceIssuerName,`
    issuer: Vec<u8>,
    // `,ProviderName,PublisherName,RegionId,ServiceCategory,`
    provider: Vec<u8>,
    charge_start: DateCache,
    charge_end: DateCache,
    // Lines come in runs of one node and of a few keys: what depends only on the node
    // (and its name) or only on the key is rendered once per run.
    sub_account: SubAccountCache,
    unit: UnitCache,
    labels: LabelCache,
    row: Vec<u8>,
    seen: u64,
    summary: FocusSummary,
    // The running `BilledCost` total of the last line's currency, not yet in `summary`.
    total: Option<(Currency, Decimal)>,
}

impl<W: Write> FocusWriter<W> {
    /// Checks `meta` and writes the header.
    pub fn new(mut out: W, meta: FocusMeta) -> Result<FocusWriter<W>, FocusError> {
        if meta.provider.trim().is_empty() {
            return Err(FocusError::Meta(
                "the provider name is empty (FOCUS ProviderName must not be null)".into(),
            ));
        }
        if meta.billing_period_end <= meta.billing_period_start {
            return Err(FocusError::Meta(format!(
                "the billing period ends ({}) before it starts ({})",
                meta.billing_period_end, meta.billing_period_start
            )));
        }
        let period_start = datetime(meta.billing_period_start)
            .map_err(|e| FocusError::Meta(format!("billing period start: {e}")))?;
        let period_end = datetime(meta.billing_period_end)
            .map_err(|e| FocusError::Meta(format!("billing period end: {e}")))?;
        let id = meta.billing_account.to_string();
        let mut account = vec![b','];
        push_field_bytes(&mut account, &id);
        account.push(b',');
        match &meta.billing_account_name {
            Some(n) if !n.trim().is_empty() => push_field_bytes(&mut account, n),
            _ => push_field_bytes(&mut account, &id),
        }
        account.push(b',');
        let period = format!(",{period_end},{period_start},").into_bytes();
        let mut issuer = vec![b','];
        push_field_bytes(&mut issuer, &meta.provider);
        issuer.push(b',');
        let mut provider = vec![b','];
        push_field_bytes(&mut provider, &meta.provider);
        provider.push(b',');
        push_field_bytes(&mut provider, &meta.provider);
        // RegionId: Ciyuan's services are not operated from distinct regions.
        provider.extend_from_slice(b",,");
        provider.extend_from_slice(SERVICE_CATEGORY.as_bytes());
        provider.push(b',');
        let mut header = String::with_capacity(512);
        for (i, c) in COLUMNS.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(c);
        }
        header.push_str("\r\n");
        out.write_all(header.as_bytes())?;
        Ok(FocusWriter {
            out,
            meta,
            account,
            period,
            issuer,
            provider,
            charge_start: DateCache::default(),
            charge_end: DateCache::default(),
            sub_account: SubAccountCache::default(),
            unit: UnitCache::default(),
            labels: LabelCache::default(),
            row: Vec::with_capacity(1024),
            seen: 0,
            summary: FocusSummary::default(),
            total: None,
        })
    }

    /// Writes one line; its node's display name is unknown, so `SubAccountName` is the
    /// path.
    pub fn write(&mut self, line: &CostLine) -> Result<(), FocusError> {
        self.write_named(line, None)
    }

    /// Writes one line whose node is called `sub_account_name` (`SubAccountName`).
    pub fn write_named(
        &mut self,
        line: &CostLine,
        sub_account_name: Option<&str>,
    ) -> Result<(), FocusError> {
        self.write_ref(&line.view(), sub_account_name)
    }

    /// Writes one borrowed line whose node is called `sub_account_name`
    /// (`SubAccountName`): [`FocusWriter::write_named`] for callers that read lines in
    /// place.
    pub fn write_ref(
        &mut self,
        line: &CostLineRef<'_>,
        sub_account_name: Option<&str>,
    ) -> Result<(), FocusError> {
        self.seen += 1;
        let seen = self.seen;
        let unit = self.unit.get(line.key);
        let row = Row::of(line, &self.meta, unit).map_err(|why| line_error(seen, line, why))?;
        // Summed before writing so an overflow leaves the output untouched. The
        // running total of the last currency is kept aside (lines come in runs of one
        // currency) and put in the summary when another currency comes, or at the end.
        let total = match self.total {
            Some((c, t)) if c == line.currency => t,
            _ => self
                .summary
                .billed
                .get(&line.currency)
                .copied()
                .unwrap_or(Decimal::ZERO),
        };
        let total = total
            .checked_add(line.billed_cost)
            .ok_or(FocusError::Overflow(line.currency))?;

        let start = self
            .charge_start
            .get(line.charge_period_start)
            .map_err(|e| line_error(seen, line, format!("charge period start: {e}")))?;
        let end = self
            .charge_end
            .get(line.charge_period_end)
            .map_err(|e| line_error(seen, line, format!("charge period end: {e}")))?;
        let sub_name = match sub_account_name {
            Some(n) if !n.trim().is_empty() => Some(n),
            _ => None,
        };
        let sub_account = self.sub_account.get(line.account, sub_name);
        let b = &mut self.row;
        b.clear();
        push_decimal(b, line.billed_cost);
        let billed = b.len();
        b.extend_from_slice(&self.account);
        b.extend_from_slice(line.currency.as_str().as_bytes());
        b.extend_from_slice(&self.period);
        b.extend_from_slice(category_name(line.category).as_bytes());
        b.push(b',');
        b.extend_from_slice(row.class.unwrap_or("").as_bytes());
        b.push(b',');
        let labels = self.labels.get(line, row.service, row.usage);
        b.extend_from_slice(&labels.description);
        b.push(b',');
        b.extend_from_slice(row.frequency.as_bytes());
        b.push(b',');
        b.extend_from_slice(end.as_bytes());
        b.push(b',');
        b.extend_from_slice(start.as_bytes());
        b.push(b',');
        // ConsumedQuantity, ConsumedUnit: usage only.
        if row.usage {
            push_decimal(b, line.quantity);
            b.push(b',');
            push_field_bytes(b, row.unit.unwrap_or(""));
        } else {
            b.push(b',');
        }
        b.push(b',');
        push_decimal(b, line.contracted_cost);
        b.push(b',');
        if let Some(p) = row.contracted_unit_price {
            push_decimal(b, p);
        }
        b.push(b',');
        // EffectiveCost: nothing is amortized, so it is BilledCost again.
        b.extend_from_within(..billed);
        b.extend_from_slice(&self.issuer);
        push_decimal(b, line.list_cost);
        b.push(b',');
        if let Some(p) = row.list_unit_price {
            push_decimal(b, p);
        }
        b.push(b',');
        if let Some(q) = row.pricing_quantity {
            push_decimal(b, q);
            b.push(b',');
            push_field_bytes(b, row.unit.unwrap_or(""));
        } else {
            b.push(b',');
        }
        b.extend_from_slice(&self.provider);
        b.extend_from_slice(&labels.service_and_sku);
        b.push(b',');
        b.extend_from_slice(sub_account);
        b.extend_from_slice(b"\r\n");
        self.out.write_all(&self.row)?;
        match &mut self.total {
            Some((c, t)) if *c == line.currency => *t = total,
            slot => {
                if let Some((c, t)) = slot.replace((line.currency, total)) {
                    self.summary.billed.insert(c, t);
                }
            }
        }
        self.summary.rows += 1;
        Ok(())
    }

    /// Flushes and returns the writer and what was written.
    pub fn finish(mut self) -> Result<(W, FocusSummary), FocusError> {
        self.out.flush()?;
        if let Some((c, t)) = self.total.take() {
            self.summary.billed.insert(c, t);
        }
        Ok((self.out, self.summary))
    }
}

/// Writes a whole export of `lines` to `out`: [`FocusWriter`] for callers that have an
/// iterator.
pub fn write_focus_csv<W: Write, I>(
    out: W,
    meta: FocusMeta,
    lines: I,
) -> Result<(W, FocusSummary), FocusError>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<CostLine>,
{
    let mut w = FocusWriter::new(out, meta)?;
    for line in lines {
        w.write(std::borrow::Borrow::borrow(&line))?;
    }
    w.finish()
}

/// The FOCUS `ChargeCategory` value of a category.
pub fn category_name(c: ChargeCategory) -> &'static str {
    match c {
        ChargeCategory::Usage => "Usage",
        ChargeCategory::Adjustment => "Adjustment",
        ChargeCategory::Credit => "Credit",
        ChargeCategory::Tax => "Tax",
    }
}

/// The FOCUS unit (`ConsumedUnit`, `PricingUnit`) a price key counts in: `Tokens`,
/// `Requests`, or a measure's name as a capitalized plural noun (`measure.pages` is
/// `Pages`, `measure.audio_seconds` is `Audio Seconds`). `None` for what is not a
/// price key.
pub fn unit_of(key: &str) -> Option<String> {
    unit(key).map(Cow::into_owned)
}

fn unit(key: &str) -> Option<Cow<'static, str>> {
    // The hot path: token keys, without parsing.
    if let Some((modality, direction)) = key.split_once('.')
        && modality.parse::<ciyuan_core::Modality>().is_ok()
        && direction.parse::<ciyuan_core::Direction>().is_ok()
    {
        return Some(Cow::Borrowed("Tokens"));
    }
    match PriceKey::from_str(key).ok()? {
        PriceKey::Tokens(..) => Some(Cow::Borrowed("Tokens")),
        PriceKey::Request => Some(Cow::Borrowed("Requests")),
        PriceKey::Measure(name) => {
            let mut unit = String::with_capacity(name.len());
            for word in name
                .split(|c: char| c == '_' || c == '-' || c == '.' || c.is_whitespace())
                .filter(|w| !w.is_empty())
            {
                if !unit.is_empty() {
                    unit.push(' ');
                }
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    unit.extend(first.to_uppercase());
                    unit.push_str(chars.as_str());
                }
            }
            (!unit.is_empty()).then_some(Cow::Owned(unit))
        }
    }
}

/// What a row holds beyond the line itself, checked.
struct Row<'a> {
    class: Option<&'static str>,
    frequency: &'static str,
    usage: bool,
    unit: Option<&'a str>,
    pricing_quantity: Option<Decimal>,
    list_unit_price: Option<Decimal>,
    contracted_unit_price: Option<Decimal>,
    service: &'a str,
}

impl<'a> Row<'a> {
    /// `unit` is [`unit`] of the line's key.
    fn of(
        line: &CostLineRef<'a>,
        meta: &'a FocusMeta,
        unit: Option<&'a str>,
    ) -> Result<Row<'a>, String> {
        if let Some(c) = meta.billing_currency
            && c != line.currency
        {
            return Err(format!(
                "its currency {} is not the export's billing currency {c} (nothing is \
                 converted)",
                line.currency
            ));
        }
        if line.charge_period_end <= line.charge_period_start {
            return Err(format!(
                "its charge period ends ({}) before it starts ({})",
                line.charge_period_end, line.charge_period_start
            ));
        }
        // A charge of an earlier period corrects a period already invoiced.
        let correction = line.charge_period_start < meta.billing_period_start;
        let usage = line.category == ChargeCategory::Usage;
        let tax = line.category == ChargeCategory::Tax;

        let service = if !line.service.trim().is_empty() {
            line.service
        } else if usage {
            return Err("it has no service (FOCUS ServiceName must not be null)".into());
        } else {
            // An adjustment, credit or tax of the whole account: the provider's service.
            meta.provider.as_str()
        };
        if usage && line.key.trim().is_empty() {
            return Err("it has no priced key".into());
        }

        // FOCUS: a tax row has no SKU, unit price or pricing quantity; a usage row has
        // them all; an adjustment or credit has what it carries.
        let pricing_quantity = if tax {
            None
        } else if usage {
            match unit {
                Some(_) => Some(line.quantity),
                None => {
                    return Err(format!(
                        "its key {:?} is not a price key (text.input, measure.<name>, \
                         request), so it has no FOCUS unit",
                        line.key
                    ));
                }
            }
        } else {
            match unit {
                Some(_) if !line.quantity.is_zero() => Some(line.quantity),
                _ => None,
            }
        };
        if usage && line.quantity.is_sign_negative() && !line.quantity.is_zero() && !correction {
            return Err(format!(
                "its quantity {} is negative outside a correction",
                line.quantity
            ));
        }

        let list_unit_price = if tax { None } else { line.list_unit_price };
        if usage && list_unit_price.is_none() {
            return Err(
                "it is usage without a list unit price (FOCUS ListUnitPrice must not be null \
                 on usage)"
                    .into(),
            );
        }
        if let Some(p) = list_unit_price
            && p.is_sign_negative()
            && !p.is_zero()
        {
            return Err(format!("its list unit price {p} is negative"));
        }
        let list_unit_price = list_unit_price.filter(|_| pricing_quantity.is_some());

        let mut contracted_unit_price = None;
        if let (Some(q), Some(p)) = (pricing_quantity, list_unit_price) {
            let product = q
                .checked_mul(p)
                .ok_or_else(|| format!("quantity {q} × list unit price {p} overflows"))?;
            if !correction && product != line.list_cost {
                return Err(format!(
                    "its list cost {} is not quantity {q} × list unit price {p} = {product} \
                     (FOCUS requires them equal)",
                    line.list_cost
                ));
            }
            contracted_unit_price = Some(contracted_price(
                q,
                p,
                product,
                line.contracted_cost,
                correction,
            )?);
        }
        if !usage && !tax && list_unit_price.is_none() {
            // FOCUS: the list and contracted cost of a charge unrelated to other charges
            // is its billed cost.
            if line.category == ChargeCategory::Credit
                && (line.list_cost != line.billed_cost || line.contracted_cost != line.billed_cost)
            {
                return Err(format!(
                    "a credit without a unit price must have list cost ({}) and contracted \
                     cost ({}) equal to its billed cost ({})",
                    line.list_cost, line.contracted_cost, line.billed_cost
                ));
            }
        }

        Ok(Row {
            class: correction.then_some("Correction"),
            frequency: match line.category {
                ChargeCategory::Usage | ChargeCategory::Tax => "Usage-Based",
                ChargeCategory::Adjustment | ChargeCategory::Credit => "One-Time",
            },
            usage,
            unit: if pricing_quantity.is_some() || usage {
                unit
            } else {
                None
            },
            pricing_quantity,
            list_unit_price,
            contracted_unit_price,
            service,
        })
    }
}

/// The contracted price of one unit: the contracted cost over the quantity, which must
/// be exact because FOCUS requires `ContractedUnitPrice × PricingQuantity =
/// ContractedCost`. A zero quantity has no quotient: its contracted price is taken to be
/// the list price (a zero cost is then consistent with either). `list_product` is
/// `quantity × list_price`.
fn contracted_price(
    quantity: Decimal,
    list_price: Decimal,
    list_product: Decimal,
    contracted_cost: Decimal,
    correction: bool,
) -> Result<Decimal, String> {
    if quantity.is_zero() {
        if !contracted_cost.is_zero() && !correction {
            return Err(format!(
                "its quantity is zero but its contracted cost is {contracted_cost}"
            ));
        }
        return Ok(list_price);
    }
    if list_product == contracted_cost {
        // No discount or markup: no division needed.
        return Ok(list_price);
    }
    let price = contracted_cost.checked_div(quantity).ok_or_else(|| {
        format!("contracted cost {contracted_cost} / quantity {quantity} overflows")
    })?;
    let exact = price.checked_mul(quantity) == Some(contracted_cost);
    if !exact && !correction {
        return Err(format!(
            "its contracted cost {contracted_cost} is not quantity {quantity} × an exact unit \
             price (FOCUS ContractedUnitPrice × PricingQuantity must equal ContractedCost)"
        ));
    }
    if price.is_sign_negative() && !price.is_zero() {
        return Err(format!(
            "its contracted unit price {price} is negative (contracted cost {contracted_cost}, \
             quantity {quantity})"
        ));
    }
    Ok(price.normalize())
}

/// `SkuId`: what is sold, whatever its price: the model (or, without one, the service)
/// and the key.
fn sku_of(line: &CostLineRef<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(
        if line.model.is_empty() {
            line.service
        } else {
            line.model
        }
        .as_bytes(),
    );
    out.push(b'/');
    out.extend_from_slice(line.key.as_bytes());
}

fn description(line: &CostLineRef<'_>, out: &mut Vec<u8>) {
    match line.category {
        ChargeCategory::Usage => {}
        ChargeCategory::Adjustment => out.extend_from_slice(b"Adjustment: "),
        ChargeCategory::Credit => out.extend_from_slice(b"Credit: "),
        ChargeCategory::Tax => out.extend_from_slice(b"Tax: "),
    }
    let parts = [line.key, line.model, line.service];
    let mut first = true;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        if !first {
            out.extend_from_slice(if line.category == ChargeCategory::Usage {
                b" of "
            } else {
                b", "
            });
        }
        out.extend_from_slice(p.as_bytes());
        first = false;
    }
    if first {
        out.extend_from_slice(category_name(line.category).as_bytes());
    }
}

fn describe(line: &CostLineRef<'_>) -> String {
    format!(
        "{} {} {} {}",
        category_name(line.category),
        if line.service.is_empty() {
            "-"
        } else {
            line.service
        },
        if line.model.is_empty() {
            "-"
        } else {
            line.model
        },
        if line.key.is_empty() { "-" } else { line.key }
    )
}

fn line_error(seen: u64, line: &CostLineRef<'_>, why: String) -> FocusError {
    FocusError::Line {
        line: seen,
        what: describe(line),
        why,
    }
}

/// The last date/time rendered: lines come in runs of one charge period (a node's
/// models and keys of one hour), so most rows repeat the previous row's periods.
#[derive(Default)]
struct DateCache {
    at: Option<Timestamp>,
    text: String,
}

impl DateCache {
    fn get(&mut self, t: Timestamp) -> Result<&str, String> {
        if self.at != Some(t) {
            self.text = datetime(t)?;
            self.at = Some(t);
        }
        Ok(&self.text)
    }
}

/// The last node's `SubAccountId,SubAccountName` fields: a page of lines is in node
/// order, so each node's fields are rendered once per run of its lines.
#[derive(Default)]
struct SubAccountCache {
    account: Option<AccountPath>,
    name: Option<String>,
    fields: Vec<u8>,
}

impl SubAccountCache {
    fn get(&mut self, account: &AccountPath, name: Option<&str>) -> &[u8] {
        if self.account.as_ref() != Some(account) || self.name.as_deref() != name {
            let path = account.to_string();
            self.fields.clear();
            push_field_bytes(&mut self.fields, &path);
            self.fields.push(b',');
            push_field_bytes(&mut self.fields, name.unwrap_or(&path));
            self.account = Some(account.clone());
            self.name = name.map(str::to_string);
        }
        &self.fields
    }
}

/// The fields of a row that depend only on what it charges for (its category,
/// service, model, key and book): `ChargeDescription`, and `ServiceName` through
/// `SkuPriceId`, rendered once per kind of line seen last (a node's lines cycle through
/// a handful) and copied after.
#[derive(Default)]
struct LabelCache {
    slots: Vec<Labels>,
    next: usize,
}

struct Labels {
    category: ChargeCategory,
    service: String,
    model: String,
    key: String,
    book: String,
    // `ChargeDescription`, as a field.
    description: Vec<u8>,
    // `ServiceName,ServiceSubcategory,SkuId,SkuMeter,SkuPriceId`.
    service_and_sku: Vec<u8>,
}

impl Labels {
    fn of(line: &CostLineRef<'_>, service: &str, usage: bool) -> Labels {
        let mut scratch = Vec::with_capacity(64);
        description(line, &mut scratch);
        let mut description = Vec::with_capacity(scratch.len() + 2);
        push_field_raw(&mut description, &scratch);
        let b = &mut Vec::with_capacity(128);
        push_field_bytes(b, service);
        b.push(b',');
        b.extend_from_slice(SERVICE_SUBCATEGORY.as_bytes());
        b.push(b',');
        // SkuId, SkuMeter, SkuPriceId: usage only.
        if usage {
            scratch.clear();
            sku_of(line, &mut scratch);
            push_field_raw(b, &scratch);
            b.push(b',');
            push_field_bytes(b, line.key);
            b.push(b',');
            if !line.book.is_empty() {
                scratch.push(b'@');
                scratch.extend_from_slice(line.book.as_bytes());
            }
            push_field_raw(b, &scratch);
        } else {
            b.push(b',');
            b.push(b',');
        }
        Labels {
            category: line.category,
            service: line.service.to_string(),
            model: line.model.to_string(),
            key: line.key.to_string(),
            book: line.book.to_string(),
            description,
            service_and_sku: std::mem::take(b),
        }
    }

    fn is_of(&self, line: &CostLineRef<'_>) -> bool {
        self.category == line.category
            && self.key == line.key
            && self.model == line.model
            && self.service == line.service
            && self.book == line.book
    }
}

impl LabelCache {
    const SLOTS: usize = 32;

    /// The labels of `line`, whose `ServiceName` is `service` and which is usage or
    /// not (both follow from the line and the export's provider).
    fn get(&mut self, line: &CostLineRef<'_>, service: &str, usage: bool) -> &Labels {
        let at = match self.slots.iter().position(|l| l.is_of(line)) {
            Some(at) => at,
            None => {
                let labels = Labels::of(line, service, usage);
                if self.slots.len() < Self::SLOTS {
                    self.slots.push(labels);
                    self.slots.len() - 1
                } else {
                    // Round robin: an export with more kinds of lines than slots stays
                    // correct, only slower.
                    let at = self.next;
                    self.next = (self.next + 1) % Self::SLOTS;
                    self.slots[at] = labels;
                    at
                }
            }
        };
        &self.slots[at]
    }
}

/// The FOCUS units of the keys seen last: a node's lines cycle through a handful of
/// keys (`text.input`, `text.output`, `rounding`), so a few slots hold them all.
#[derive(Default)]
struct UnitCache {
    slots: Vec<(String, Option<Cow<'static, str>>)>,
    next: usize,
}

impl UnitCache {
    const SLOTS: usize = 16;

    fn get(&mut self, key: &str) -> Option<&str> {
        let at = match self.slots.iter().position(|(k, _)| k == key) {
            Some(at) => at,
            None => {
                let slot = (key.to_string(), unit(key));
                if self.slots.len() < Self::SLOTS {
                    self.slots.push(slot);
                    self.slots.len() - 1
                } else {
                    // Round robin: an export with more keys than slots stays correct,
                    // only slower.
                    let at = self.next;
                    self.next = (self.next + 1) % Self::SLOTS;
                    self.slots[at] = slot;
                    at
                }
            }
        };
        self.slots[at].1.as_deref()
    }
}

/// FOCUS's date/time format: UTC, whole seconds, `Z`.
fn datetime(t: Timestamp) -> Result<String, String> {
    if t.subsec_nanosecond() != 0 {
        return Err(format!(
            "{t} has a fraction of a second (FOCUS date/times are whole seconds)"
        ));
    }
    let secs = t.as_second();
    let (days, in_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if !(1..=9999).contains(&year) {
        return Err(format!(
            "{t} is outside the years ISO 8601 writes in four digits"
        ));
    }
    // `strftime("%Y-%m-%dT%H:%M:%SZ")`, written directly: jiff's general formatter is
    // several times slower, and a year of four digits needs no padding rules.
    let mut b = [0u8; 20];
    let two = |b: &mut [u8], v: i64| {
        b[0] = b'0' + (v / 10) as u8;
        b[1] = b'0' + (v % 10) as u8;
    };
    two(&mut b[0..2], year / 100);
    two(&mut b[2..4], year % 100);
    b[4] = b'-';
    two(&mut b[5..7], month);
    b[7] = b'-';
    two(&mut b[8..10], day);
    b[10] = b'T';
    two(&mut b[11..13], in_day / 3600);
    b[13] = b':';
    two(&mut b[14..16], in_day / 60 % 60);
    b[16] = b':';
    two(&mut b[17..19], in_day % 60);
    b[19] = b'Z';
    Ok(b.iter().map(|&c| char::from(c)).collect())
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`): year, month (1–12), day (1–31).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Two ASCII digits of every number below 100.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Exact decimal text: never an exponent, never `-0`; the digits of the mantissa with
/// the point `scale` places from the right, as `Decimal`'s `Display` writes them, but
/// several times faster (this runs seven times per row).
fn push_decimal(out: &mut Vec<u8>, d: Decimal) {
    let mantissa = d.mantissa();
    let scale = d.scale() as usize;
    if mantissa < 0 {
        out.push(b'-');
    }
    // A mantissa has at most 96 bits: 29 digits, written from the right.
    let mut digits = [b'0'; 40];
    let mut i = digits.len();
    let n = mantissa.unsigned_abs();
    let mut low = match u64::try_from(n) {
        // The usual case (prices, costs, token counts): 64-bit arithmetic only.
        Ok(small) => small,
        Err(_) => {
            // Two 19-digit halves, so only one 128-bit division per amount.
            const E19: u128 = 10_000_000_000_000_000_000;
            let (high, rest) = (n / E19, (n % E19) as u64);
            let mut rest = rest;
            for _ in 0..19 {
                i -= 1;
                digits[i] = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            // At most 10 digits: 2^96 / 10^19 < 10^10.
            high as u64
        }
    };
    let wide = i < digits.len();
    while low >= 100 {
        let pair = (low % 100) as usize * 2;
        low /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if low >= 10 {
        let pair = low as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else if low > 0 || !wide {
        i -= 1;
        digits[i] = b'0' + low as u8;
    }
    let ds = &digits[i..];
    if ds.len() <= scale {
        out.extend_from_slice(b"0.");
        out.resize(out.len() + (scale - ds.len()), b'0');
        out.extend_from_slice(ds);
    } else {
        let (int, frac) = ds.split_at(ds.len() - scale);
        out.extend_from_slice(int);
        if scale > 0 {
            out.push(b'.');
            out.extend_from_slice(frac);
        }
    }
}

/// Whether a field must be quoted (RFC 4180): it holds a comma, quote, CR or LF.
fn needs_quotes(f: &[u8]) -> bool {
    // Without an early exit per byte, so the compiler compares many bytes at once;
    // fields are short and almost never need quotes.
    f.chunks(32).any(|chunk| {
        chunk.iter().fold(0u8, |seen, &c| {
            seen | u8::from(c == b',')
                | u8::from(c == b'"')
                | u8::from(c == b'\r')
                | u8::from(c == b'\n')
        }) != 0
    })
}

/// Appends the UTF-8 text `f` as one RFC 4180 field.
fn push_field_raw(out: &mut Vec<u8>, f: &[u8]) {
    if needs_quotes(f) {
        out.push(b'"');
        for &c in f {
            if c == b'"' {
                out.push(b'"');
            }
            out.push(c);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(f);
    }
}

/// Appends `f` as one RFC 4180 field.
fn push_field_bytes(out: &mut Vec<u8>, f: &str) {
    push_field_raw(out, f.as_bytes());
}

/// Appends `f` as one RFC 4180 field.
pub(crate) fn push_field(out: &mut String, f: &str) {
    if needs_quotes(f.as_bytes()) {
        out.push('"');
        for c in f.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn meta() -> FocusMeta {
        FocusMeta::new(
            AccountPath::parse("acme").unwrap(),
            Some("Acme Group".into()),
            ts("2026-11-01T00:00:00Z"),
            ts("2026-12-01T00:00:00Z"),
        )
    }

    fn usage(model: &str, key: &str, qty: i64, price: &str, currency: &str) -> CostLine {
        let price: Decimal = price.parse().unwrap();
        let cost = Decimal::from(qty) * price;
        CostLine {
            account: AccountPath::parse("acme/cn/alice").unwrap(),
            charge_period_start: ts("2026-11-03T10:00:00Z"),
            charge_period_end: ts("2026-11-03T11:00:00Z"),
            category: ChargeCategory::Usage,
            service: "llm.chat".into(),
            model: model.into(),
            key: key.into(),
            quantity: Decimal::from(qty),
            list_unit_price: Some(price),
            list_cost: cost,
            contracted_cost: cost,
            billed_cost: cost,
            currency: currency.parse().unwrap(),
            book: "list".into(),
            version: 3,
        }
    }

    fn other(category: ChargeCategory, key: &str, amount: &str) -> CostLine {
        let a: Decimal = amount.parse().unwrap();
        CostLine {
            category,
            key: key.into(),
            model: String::new(),
            quantity: Decimal::ZERO,
            list_unit_price: None,
            list_cost: a,
            contracted_cost: a,
            billed_cost: a,
            book: String::new(),
            ..usage("x", "text.input", 1, "1", "CNY")
        }
    }

    /// A minimal RFC 4180 reader, to read the output back.
    pub(crate) fn parse_csv(s: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if quoted {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        quoted = false;
                    }
                } else {
                    field.push(c);
                }
                continue;
            }
            match c {
                '"' => {
                    assert!(field.is_empty(), "quote inside an unquoted field");
                    quoted = true;
                }
                ',' => row.push(std::mem::take(&mut field)),
                '\r' => {
                    assert_eq!(chars.next(), Some('\n'), "CR without LF");
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                '\n' => panic!("bare LF ends a row"),
                c => field.push(c),
            }
        }
        assert!(!quoted, "unterminated quote");
        assert!(field.is_empty() && row.is_empty(), "last row without CRLF");
        rows
    }

    fn export(lines: &[CostLine]) -> String {
        let (out, _) = write_focus_csv(Vec::new(), meta(), lines).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn table(lines: &[CostLine]) -> Vec<BTreeMap<String, String>> {
        let rows = parse_csv(&export(lines));
        let header = &rows[0];
        rows[1..]
            .iter()
            .map(|r| header.iter().cloned().zip(r.iter().cloned()).collect())
            .collect()
    }

    #[test]
    fn header_is_the_columns_and_every_row_has_them_all() {
        let rows = parse_csv(&export(&[
            usage("gpt-4o", "text.input", 1000, "0.0000025", "USD"),
            other(ChargeCategory::Tax, "VAT", "0.6"),
        ]));
        assert_eq!(rows[0], COLUMNS.map(String::from).to_vec());
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.len() == COLUMNS.len()));
        let mut sorted = COLUMNS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), COLUMNS.len(), "a column is named twice");
    }

    #[test]
    fn a_usage_row_carries_skus_units_and_prices() {
        let t = table(&[usage("gpt-4o", "text.input", 1000, "0.0000025", "USD")]);
        let r = &t[0];
        let get = |c: &str| r[c].as_str();
        assert_eq!(get("BilledCost"), "0.0025000");
        assert_eq!(get("BillingAccountId"), "acme");
        assert_eq!(get("BillingAccountName"), "Acme Group");
        assert_eq!(get("BillingCurrency"), "USD");
        assert_eq!(get("BillingPeriodStart"), "2026-11-01T00:00:00Z");
        assert_eq!(get("BillingPeriodEnd"), "2026-12-01T00:00:00Z");
        assert_eq!(get("ChargePeriodStart"), "2026-11-03T10:00:00Z");
        assert_eq!(get("ChargePeriodEnd"), "2026-11-03T11:00:00Z");
        assert_eq!(get("ChargeCategory"), "Usage");
        assert_eq!(get("ChargeClass"), "");
        assert_eq!(get("ChargeFrequency"), "Usage-Based");
        assert_eq!(get("ConsumedQuantity"), "1000");
        assert_eq!(get("ConsumedUnit"), "Tokens");
        assert_eq!(get("PricingQuantity"), "1000");
        assert_eq!(get("PricingUnit"), "Tokens");
        assert_eq!(get("ListUnitPrice"), "0.0000025");
        assert_eq!(get("ContractedUnitPrice"), "0.0000025");
        assert_eq!(get("SkuId"), "gpt-4o/text.input");
        assert_eq!(get("SkuPriceId"), "gpt-4o/text.input@list");
        assert_eq!(get("SkuMeter"), "text.input");
        assert_eq!(get("ServiceName"), "llm.chat");
        assert_eq!(get("ServiceCategory"), "AI and Machine Learning");
        assert_eq!(get("ServiceSubcategory"), "Generative AI");
        assert_eq!(get("SubAccountId"), "acme/cn/alice");
        assert_eq!(get("SubAccountName"), "acme/cn/alice");
        assert_eq!(get("ProviderName"), "Ciyuan");
        assert_eq!(get("PublisherName"), "Ciyuan");
        assert_eq!(get("InvoiceIssuerName"), "Ciyuan");
        assert_eq!(get("RegionId"), "");
        assert_eq!(get("EffectiveCost"), get("BilledCost"));
    }

    #[test]
    fn tax_rows_have_no_sku_price_or_quantity() {
        let mut tax = other(ChargeCategory::Tax, "VAT 6%", "0.6");
        tax.list_unit_price = Some(Decimal::new(6, 2));
        tax.quantity = Decimal::from(10);
        let t = table(&[tax]);
        for c in [
            "SkuId",
            "SkuPriceId",
            "SkuMeter",
            "ListUnitPrice",
            "ContractedUnitPrice",
            "PricingQuantity",
            "PricingUnit",
            "ConsumedQuantity",
            "ConsumedUnit",
        ] {
            assert_eq!(t[0][c], "", "{c} of a tax row");
        }
        assert_eq!(t[0]["ChargeCategory"], "Tax");
        assert_eq!(t[0]["ChargeDescription"], "Tax: VAT 6%, llm.chat");
    }

    #[test]
    fn adjustments_and_credits_map_to_their_categories() {
        let t = table(&[
            other(ChargeCategory::Adjustment, "rounding", "-0.004"),
            other(ChargeCategory::Credit, "service_credit", "-5"),
        ]);
        assert_eq!(t[0]["ChargeCategory"], "Adjustment");
        assert_eq!(t[1]["ChargeCategory"], "Credit");
        for r in &t {
            assert_eq!(r["ChargeFrequency"], "One-Time");
            assert_eq!(r["ListCost"], r["BilledCost"]);
            assert_eq!(r["ConsumedQuantity"], "");
            assert_eq!(r["PricingQuantity"], "");
            assert_eq!(r["SkuId"], "");
        }
    }

    #[test]
    fn a_late_correction_is_a_correction_row() {
        let mut l = other(ChargeCategory::Adjustment, "correction", "-1.25");
        l.charge_period_start = ts("2026-10-30T00:00:00Z");
        l.charge_period_end = ts("2026-10-30T01:00:00Z");
        let t = table(&[l, other(ChargeCategory::Adjustment, "rounding", "0.01")]);
        assert_eq!(t[0]["ChargeClass"], "Correction");
        assert_eq!(t[1]["ChargeClass"], "");
    }

    #[test]
    fn text_from_clients_is_quoted() {
        let mut l = usage("evil, \"model\"\r\nx", "text.output", 3, "0.5", "CNY");
        l.service = "a,b".into();
        let csv = export(&[l.clone()]);
        assert!(
            csv.contains("\"evil, \"\"model\"\"\r\nx/text.output\""),
            "{csv}"
        );
        let t = table(&[l]);
        assert_eq!(t[0]["SkuId"], "evil, \"model\"\r\nx/text.output");
        assert_eq!(t[0]["ServiceName"], "a,b");
        assert_eq!(
            t[0]["ChargeDescription"],
            "text.output of evil, \"model\"\r\nx of a,b"
        );
    }

    #[test]
    fn same_lines_give_the_same_bytes() {
        let lines = vec![
            usage("gpt-4o", "text.input", 1000, "0.0000025", "USD"),
            usage("qwen", "measure.pages", 7, "0.1", "CNY"),
            other(ChargeCategory::Credit, "refund", "-2"),
        ];
        assert_eq!(export(&lines), export(&lines));
    }

    #[test]
    fn units_follow_the_key() {
        assert_eq!(unit_of("text.input").as_deref(), Some("Tokens"));
        assert_eq!(unit_of("audio.cache_write_1h").as_deref(), Some("Tokens"));
        assert_eq!(unit_of("request").as_deref(), Some("Requests"));
        assert_eq!(unit_of("measure.pages").as_deref(), Some("Pages"));
        assert_eq!(
            unit_of("measure.audio_seconds").as_deref(),
            Some("Audio Seconds")
        );
        assert_eq!(unit_of("rounding"), None);
        let t = table(&[usage("", "measure.pages", 4, "0.25", "CNY")]);
        assert_eq!(t[0]["PricingUnit"], "Pages");
        assert_eq!(t[0]["SkuId"], "llm.chat/measure.pages");
    }

    #[test]
    fn contracted_unit_price_is_exact_or_refused() {
        let mut l = usage("m", "text.input", 3, "0.1", "USD");
        l.contracted_cost = "0.27".parse().unwrap();
        l.billed_cost = l.contracted_cost;
        let t = table(&[l.clone()]);
        assert_eq!(t[0]["ContractedUnitPrice"], "0.09");
        l.contracted_cost = "0.2".parse().unwrap();
        let err = write_focus_csv(Vec::new(), meta(), [&l]).unwrap_err();
        assert!(err.to_string().contains("contracted cost 0.2"), "{err}");
    }

    #[test]
    fn bad_lines_are_refused_and_leave_no_bytes() {
        let mut w = FocusWriter::new(Vec::new(), meta()).unwrap();
        let good = usage("m", "text.input", 2, "0.5", "USD");
        w.write(&good).unwrap();
        let mut bad = good.clone();
        bad.list_cost = Decimal::from(7);
        let before = w.out.len();
        let err = w.write(&bad).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("list cost 7"), "{err}");
        assert_eq!(w.out.len(), before);
        let mut no_price = good.clone();
        no_price.list_unit_price = None;
        assert!(
            w.write(&no_price)
                .unwrap_err()
                .to_string()
                .contains("list unit price")
        );
        let mut bad_key = good.clone();
        bad_key.key = "tokens".into();
        assert!(
            w.write(&bad_key)
                .unwrap_err()
                .to_string()
                .contains("not a price key")
        );
        let mut frac = good.clone();
        frac.charge_period_start = ts("2026-11-03T10:00:00.5Z");
        assert!(w.write(&frac).unwrap_err().to_string().contains("fraction"));
        let (_, summary) = w.finish().unwrap();
        assert_eq!(summary.rows, 1);
    }

    #[test]
    fn a_fixed_billing_currency_refuses_others() {
        let mut m = meta();
        m.billing_currency = Some("CNY".parse().unwrap());
        let err =
            write_focus_csv(Vec::new(), m, [usage("m", "text.input", 1, "1", "USD")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("USD is not the export's billing currency CNY")
        );
    }

    #[test]
    fn bad_meta_is_refused() {
        let mut m = meta();
        m.billing_period_end = m.billing_period_start;
        assert!(FocusWriter::new(Vec::new(), m).is_err());
        let mut m = meta();
        m.provider = " ".into();
        assert!(FocusWriter::new(Vec::new(), m).is_err());
    }

    #[test]
    fn names_given_are_used() {
        let mut w = FocusWriter::new(Vec::new(), meta()).unwrap();
        w.write_named(&usage("m", "text.input", 1, "1", "USD"), Some("Alice, CN"))
            .unwrap();
        let (out, _) = w.finish().unwrap();
        let rows = parse_csv(std::str::from_utf8(&out).unwrap());
        assert_eq!(rows[1][32], "Alice, CN");
    }

    /// A deterministic, varied stream of lines (SplitMix64, so the same lines on every
    /// machine): every category, node, model and key shape, amounts of every scale and
    /// sign, hours over centuries, text that needs quoting, and lines FOCUS refuses.
    fn varied_lines(n: usize) -> Vec<(CostLine, Option<String>)> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        // SplitMix64.
        let mut next = move || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) >> 1
        };
        let models = [
            "gpt-4o",
            "qwen-max",
            "",
            "evil, \"m\"\r\nx",
            "glm-4",
            "a\"b",
        ];
        let keys = [
            "text.input",
            "text.output",
            "audio.cache_write_1h",
            "request",
            "measure.pages",
            "measure.audio_seconds",
            "text.input",
            "text.output",
            "image.input",
            "rounding",
            "tokens",
            "",
        ];
        let services = ["llm.chat", "doc.verify", "", "a,b"];
        let books = ["list", "", "vip,2"];
        let nodes = [
            "acme",
            "acme/cn",
            "acme/cn/alice",
            "acme/us/bob.b",
            "acme/x-y_z",
        ];
        let names = [None, Some("Alice, CN"), Some(" "), Some("Bob \"B\"")];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let r = next();
            let category = match r % 10 {
                0 => ChargeCategory::Adjustment,
                1 => ChargeCategory::Credit,
                2 => ChargeCategory::Tax,
                _ => ChargeCategory::Usage,
            };
            let hour = (next() % 2_000_000) as i64 - 200_000 + 490_000;
            let start =
                Timestamp::from_second(hour * 3600 + if next() % 50 == 0 { 7 } else { 0 }).unwrap();
            let end = Timestamp::from_second(
                start.as_second() + [0, 82_800, 0, 0, 0, 0, 0, -3600][(next() % 8) as usize] + 3600,
            )
            .unwrap();
            let scale = |k: u64| (k % 29) as u32;
            let small = |k: u64| -> i64 {
                match k % 4 {
                    0 => (k % 10) as i64,
                    1 => (k % 100_000) as i64,
                    2 => (k % 10_000_000_000) as i64,
                    _ => (k >> 3) as i64,
                }
            };
            let qty = Decimal::new(
                small(next()),
                if next() % 3 == 0 {
                    scale(next()) % 6
                } else {
                    0
                },
            );
            let qty = if next() % 40 == 0 { -qty } else { qty };
            let price = Decimal::new(small(next()) % 1_000_000_000 + 1, scale(next()) % 12);
            let list = qty.checked_mul(price).unwrap_or(Decimal::MAX);
            let pick = next() % 16;
            let contracted = match pick {
                0 => Decimal::new(small(next()), scale(next())),
                1 => (list / Decimal::from(2)).normalize(),
                _ => list,
            };
            let billed = match next() % 6 {
                0 => Decimal::new(-small(next()), scale(next())),
                1 => contracted.round_dp(2),
                2 => Decimal::new(0, scale(next())),
                3 => Decimal::from_i128_with_scale(
                    (i128::from(next()) << 30) * if next() % 2 == 0 { 1 } else { -1 },
                    scale(next()),
                ),
                _ => contracted,
            };
            let key = keys[(next() % keys.len() as u64) as usize];
            let line = CostLine {
                account: AccountPath::parse(nodes[(next() % nodes.len() as u64) as usize]).unwrap(),
                charge_period_start: start,
                charge_period_end: end,
                category,
                service: services[(next() % services.len() as u64) as usize].into(),
                model: models[(next() % models.len() as u64) as usize].into(),
                key: key.into(),
                quantity: qty,
                list_unit_price: if next() % 40 == 0 { None } else { Some(price) },
                list_cost: if next() % 60 == 0 {
                    list + Decimal::ONE
                } else {
                    list
                },
                contracted_cost: contracted,
                billed_cost: billed,
                currency: ["CNY", "USD", "EUR"][(next() % 3) as usize]
                    .parse()
                    .unwrap(),
                book: books[(next() % books.len() as u64) as usize].into(),
                version: (next() % 5) as u32,
            };
            let name = names[(next() % names.len() as u64) as usize].map(String::from);
            out.push((line, name));
        }
        out
    }

    /// FNV-1a, 64 bits: enough to notice any changed byte of a golden output.
    fn fnv(h: &mut u64, bytes: &[u8]) {
        for b in bytes {
            *h ^= u64::from(*b);
            *h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The bytes and refusals of a large varied export, hashed: the value was taken
    /// with the formatter as it was before it was made fast (Decimal's `Display`,
    /// jiff's `strftime`, a `String` per row), so any byte that changes fails here.
    #[test]
    fn a_large_varied_export_is_byte_identical_to_the_old_formatter() {
        let mut m = meta();
        let lines = varied_lines(200_000);
        let mut w = FocusWriter::new(Vec::new(), m.clone()).unwrap();
        let mut refused = 0u64;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (l, name) in &lines {
            if let Err(e) = w.write_named(l, name.as_deref()) {
                refused += 1;
                fnv(&mut h, e.to_string().as_bytes());
            }
        }
        let (out, summary) = w.finish().unwrap();
        fnv(&mut h, &out);
        for (c, t) in &summary.billed {
            fnv(&mut h, format!("{c}={t};").as_bytes());
        }
        // A fixed billing currency and a provider whose name needs quoting.
        m.billing_currency = Some("CNY".parse().unwrap());
        m.provider = "Re, \"seller\"".into();
        let mut w = FocusWriter::new(Vec::new(), m).unwrap();
        for (l, name) in lines.iter().take(20_000) {
            if let Err(e) = w.write_named(l, name.as_deref()) {
                refused += 1;
                fnv(&mut h, e.to_string().as_bytes());
            }
        }
        let (out2, _) = w.finish().unwrap();
        fnv(&mut h, &out2);
        println!(
            "rows {} refused {refused} bytes {} hash {h:#018x}",
            summary.rows,
            out.len()
        );
        assert!(
            summary.rows > 100_000 && refused > 5_000,
            "the lines are not varied enough"
        );
        assert_eq!(h, GOLDEN);
    }

    const GOLDEN: u64 = 0x626a_f4bf_7ca1_d2a6;

    /// Rows per second of the writer alone, on lines shaped like the benchmark's (run
    /// with `--ignored --nocapture` on a release build).
    #[test]
    #[ignore]
    fn throughput() {
        let models = ["qwen-max", "qwen-plus", "glm-4", "deepseek-chat", "kimi-k2"];
        let mut lines = Vec::new();
        for node in 0..10 {
            for hour in 0..100i64 {
                for (i, m) in models.iter().enumerate() {
                    for key in ["text.input", "text.output"] {
                        let mut l = usage(m, key, 1000 + hour * 7 + i as i64, "0.0000024", "CNY");
                        l.account = AccountPath::parse(&format!("bench/n{node:04}")).unwrap();
                        l.charge_period_start =
                            Timestamp::from_second(1_793_491_200 + hour * 3600).unwrap();
                        l.charge_period_end =
                            Timestamp::from_second(1_793_494_800 + hour * 3600).unwrap();
                        lines.push(l);
                    }
                    let mut r = other(ChargeCategory::Adjustment, "rounding", "-0.0012");
                    r.account = AccountPath::parse(&format!("bench/n{node:04}")).unwrap();
                    r.model = (*m).into();
                    r.charge_period_start =
                        Timestamp::from_second(1_793_491_200 + hour * 3600).unwrap();
                    r.charge_period_end =
                        Timestamp::from_second(1_793_494_800 + hour * 3600).unwrap();
                    lines.push(r);
                }
            }
        }
        let rounds = 100;
        // CPU time of this thread, not the wall clock: the machine is shared.
        let cpu = || -> f64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<f64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0.0))
                .collect();
            (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
        };
        let (t, c) = (std::time::Instant::now(), cpu());
        for _ in 0..rounds {
            // Into a 64 KiB buffer, as the server's channel writer gathers its chunks.
            let out = std::io::BufWriter::with_capacity(64 << 10, std::io::sink());
            let mut w = FocusWriter::new(out, meta()).unwrap();
            for l in &lines {
                w.write_named(l, None).unwrap();
            }
            w.finish().unwrap();
        }
        let n = (lines.len() * rounds) as f64;
        let s = cpu() - c;
        println!(
            "{n} rows in {s:.2} s of CPU ({:.2} s wall): {:.0} ns a row, {:.0} rows/s",
            t.elapsed().as_secs_f64(),
            s / n * 1e9,
            n / s
        );
    }

    fn amount() -> impl Strategy<Value = Decimal> {
        (any::<i64>(), 0u32..12).prop_map(|(m, s)| Decimal::new(m, s))
    }

    fn line() -> impl Strategy<Value = CostLine> {
        (
            0usize..4,
            0u64..10_000_000,
            (1i64..1_000_000, 0u32..10),
            amount(),
            prop::bool::ANY,
        )
            .prop_map(|(cat, qty, (p, ps), billed, cny)| {
                let currency = if cny { "CNY" } else { "USD" };
                let mut l = match cat {
                    0 => usage("gpt-4o", "text.input", qty as i64, "1", currency),
                    1 => other(ChargeCategory::Adjustment, "rounding", "0"),
                    2 => other(ChargeCategory::Credit, "refund", "0"),
                    _ => other(ChargeCategory::Tax, "VAT", "0"),
                };
                l.currency = currency.parse().unwrap();
                if cat == 0 {
                    let price = Decimal::new(p, ps);
                    l.list_unit_price = Some(price);
                    l.list_cost = l.quantity * price;
                    l.contracted_cost = l.list_cost;
                } else {
                    l.list_cost = billed;
                    l.contracted_cost = billed;
                }
                l.billed_cost = billed;
                l
            })
    }

    proptest! {
        /// Decimals are written as `Decimal` writes them, but never as `-0`.
        #[test]
        fn decimals_are_written_exactly(m in any::<i128>(), scale in 0u32..=28) {
            let m = m % 79_228_162_514_264_337_593_543_950_336i128; // 2^96
            let d = Decimal::from_i128_with_scale(m, scale);
            let mut s = Vec::new();
            push_decimal(&mut s, d);
            let s = String::from_utf8(s).unwrap();
            let want = if d.is_zero() { d.abs().to_string() } else { d.to_string() };
            prop_assert_eq!(&s, &want);
            prop_assert_eq!(s.parse::<Decimal>().unwrap(), d);
        }

        /// Date/times are written as jiff's `strftime` writes them, over every year
        /// FOCUS can hold, and refused outside them.
        #[test]
        fn datetimes_are_written_as_strftime_does(secs in -62_135_596_800i64 - 86_400..253_402_387_200) {
            let t = Timestamp::from_second(secs).unwrap();
            let year = t.to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC).year();
            match datetime(t) {
                Ok(s) => {
                    prop_assert!((1..=9999).contains(&year));
                    prop_assert_eq!(s, t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
                }
                Err(_) => prop_assert!(!(1..=9999).contains(&year)),
            }
        }

        /// The BilledCost column sums, per currency, to exactly the lines' billed cost.
        #[test]
        fn billed_cost_sums_exactly(lines in prop::collection::vec(line(), 0..60)) {
            let csv = export(&lines);
            let rows = parse_csv(&csv);
            let at = |name: &str| COLUMNS.iter().position(|c| *c == name).unwrap();
            let mut from_csv: BTreeMap<String, Decimal> = BTreeMap::new();
            for r in &rows[1..] {
                let v: Decimal = r[at("BilledCost")].parse().unwrap();
                prop_assert!(!r[at("BilledCost")].contains(['e', 'E']));
                *from_csv.entry(r[at("BillingCurrency")].clone()).or_default() += v;
            }
            let mut from_lines: BTreeMap<String, Decimal> = BTreeMap::new();
            for l in &lines {
                *from_lines.entry(l.currency.to_string()).or_default() += l.billed_cost;
            }
            prop_assert_eq!(&from_csv, &from_lines);
            let (_, summary) = write_focus_csv(Vec::new(), meta(), &lines).unwrap();
            prop_assert_eq!(summary.rows as usize, lines.len());
            let summed: BTreeMap<String, Decimal> =
                summary.billed.iter().map(|(c, d)| (c.to_string(), *d)).collect();
            prop_assert_eq!(summed, from_lines);
        }

        /// Any text survives quoting: the field read back is the text written.
        #[test]
        fn any_model_name_reads_back(model in "\\PC*|[,\"\r\n a-z]{0,12}") {
            let l = usage(&model, "text.input", 1, "1", "USD");
            let t = table(std::slice::from_ref(&l));
            let want = format!("{}/text.input", if model.is_empty() { "llm.chat" } else { &model });
            prop_assert_eq!(&t[0]["SkuId"], &want);
        }
    }
}
