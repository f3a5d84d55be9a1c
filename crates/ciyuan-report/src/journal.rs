//! ERP journal vouchers built from billing lines, written as generic journal lines or in
//! the voucher-import layouts of Kingdee K/3 Cloud (金蝶云星空 凭证引入) and Yonyou U8
//! (用友 U8 总账 凭证引入), in UTF-8 with BOM or GBK.
//!
//! # What is booked
//!
//! For each node (a cost center) and currency, one voucher for the period: debit the
//! expense account ([`JournalConfig::expense_account`], e.g. `6602` 管理费用 or `6401`
//! 主营业务成本) and credit the payable or prepaid account
//! ([`JournalConfig::counter_account`], e.g. `2202` 应付账款 or `1123` 预付账款). Tax
//! lines are debited to [`JournalConfig::tax_account`] when one is set (e.g. `22210101`
//! 进项税额), else to the expense account. Debits are one line per node, per service, or
//! per service and model ([`LineDetail`]). A node whose credits exceed its charges gets
//! negative amounts in the same columns (红字), as both ERPs take them.
//!
//! # Rounding (stated)
//!
//! Every amount is rounded to the currency's minor units by
//! [`JournalConfig::rounding`] (half up, 四舍五入, unless configured). The credit line is
//! the voucher's exact total rounded; each debit line is its exact amount rounded; the
//! difference, if any, is added to **the debit line with the largest absolute exact
//! amount (the first in line order on a tie)**, so the voucher balances after rounding.
//! Amounts in the book's base currency (`借方金额`/`贷方金额` of a foreign-currency
//! voucher) are the same computation on the exact amounts times the exchange rate, the
//! difference on the same line. Every voucher is checked to balance in both (an
//! `assert!`: an unbalanced voucher is never written).
//!
//! # Numbering
//!
//! Vouchers are ordered by node path, then currency, and numbered from
//! [`JournalConfig::first_voucher_number`] upward: the same input gives the same numbers.
//! Lines with zero in every amount column are left out (both ERPs refuse them); a voucher
//! left with no line is not written and takes no number.

use crate::statement::csv_record;
use crate::{ChargeCategory, CostLine};
use ciyuan_core::jiff::civil::Date;
use ciyuan_core::{AccountInfo, AccountPath, Currency, RoundingMode};
use rust_decimal::{Decimal, RoundingStrategy};
use std::collections::BTreeMap;
use std::io::Write;

/// How finely the debit side of a voucher is broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineDetail {
    /// One expense line per voucher (and one tax line if there is tax).
    #[default]
    Node,
    /// One expense line per service.
    Service,
    /// One expense line per service and model.
    ServiceModel,
}

/// The book's choices: accounts, voucher word, breakdown, currency and rounding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// The debited expense account code, e.g. `6602` (管理费用) or `6401` (成本).
    pub expense_account: String,
    /// The credited payable or prepaid account code, e.g. `2202` or `1123`.
    pub counter_account: String,
    /// The account debited with tax lines (input VAT); `None` books tax as expense.
    pub tax_account: Option<String>,
    /// The voucher word (凭证字 / 凭证类别字), e.g. `记`. Kingdee takes its code instead
    /// ([`KingdeeSettings::voucher_group`]).
    pub voucher_word: String,
    /// The breakdown of the debit side.
    pub detail: LineDetail,
    /// The node metadata key holding the department or cost-center code.
    pub department_key: String,
    /// The supplier code (供应商编码) of the payable line, where the counter account
    /// is kept by supplier (应付账款 usually is); `None` writes none.
    pub supplier: Option<String>,
    /// Text that starts every summary (摘要).
    pub summary_prefix: String,
    /// The book's own currency (本位币).
    pub base_currency: Currency,
    /// Units of the base currency per unit of each other currency the lines use.
    pub exchange_rates: BTreeMap<Currency, Decimal>,
    /// Decimals per currency where [`default_minor_units`] does not know it or is wrong
    /// for this book.
    pub minor_units: BTreeMap<Currency, u32>,
    /// How amounts are rounded to minor units.
    pub rounding: RoundingMode,
    /// The number of the period's first voucher.
    pub first_voucher_number: u32,
}

impl JournalConfig {
    /// A configuration with the usual defaults: voucher word `记`, one line per node,
    /// department from metadata key `cost_center`, summary prefix `AI服务费`, half-up
    /// rounding, vouchers numbered from 1.
    pub fn new(expense_account: &str, counter_account: &str, base_currency: Currency) -> Self {
        JournalConfig {
            expense_account: expense_account.to_string(),
            counter_account: counter_account.to_string(),
            tax_account: None,
            voucher_word: "记".to_string(),
            detail: LineDetail::Node,
            department_key: "cost_center".to_string(),
            supplier: None,
            summary_prefix: "AI服务费".to_string(),
            base_currency,
            exchange_rates: BTreeMap::new(),
            minor_units: BTreeMap::new(),
            rounding: RoundingMode::HalfUp,
            first_voucher_number: 1,
        }
    }

    fn minor_units_of(&self, currency: Currency) -> Result<u32, JournalError> {
        self.minor_units
            .get(&currency)
            .copied()
            .or_else(|| default_minor_units(currency))
            .ok_or(JournalError::UnknownMinorUnits(currency))
    }
}

/// The ISO 4217 minor units of common currencies; `None` for others (configure them in
/// [`JournalConfig::minor_units`]).
pub fn default_minor_units(currency: Currency) -> Option<u32> {
    currency.minor_units()
}

/// The period the vouchers are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalPeriod {
    /// The vouchers' date (制单日期), usually the period's last day.
    pub date: Date,
    /// The period's name in summaries, e.g. `2026-11`.
    pub label: String,
}

impl JournalPeriod {
    /// A calendar month: dated its last day, labelled `YYYY-MM`.
    pub fn month(year: i16, month: i8) -> Result<Self, JournalError> {
        let first = Date::new(year, month, 1).map_err(|_| JournalError::BadMonth(year, month))?;
        Ok(JournalPeriod {
            date: first.last_of_month(),
            label: format!("{year:04}-{month:02}"),
        })
    }
}

/// What a voucher line books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A debit to the expense account.
    Expense,
    /// A debit to the tax account.
    Tax,
    /// The credit to the payable or prepaid account.
    Counter,
}

/// One line of a voucher. Amounts are already rounded to minor units and carry exactly
/// that many decimals; one of `debit`/`credit` is zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoucherLine {
    /// 1-based line number within the voucher.
    pub line: u32,
    /// What it books.
    pub kind: LineKind,
    /// The summary (摘要).
    pub summary: String,
    /// The account code (科目编码).
    pub account_code: String,
    /// Debit in the voucher's currency.
    pub debit: Decimal,
    /// Credit in the voucher's currency.
    pub credit: Decimal,
    /// Debit in the base currency.
    pub debit_local: Decimal,
    /// Credit in the base currency.
    pub credit_local: Decimal,
}

/// One balanced voucher: a node's charges in one currency for the period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voucher {
    /// Its date.
    pub date: Date,
    /// The voucher word.
    pub word: String,
    /// Its number in the period.
    pub number: u32,
    /// The node (cost center).
    pub node: AccountPath,
    /// The department or cost-center code from the node's metadata, if set.
    pub department: Option<String>,
    /// The supplier code of the payable line ([`JournalConfig::supplier`]).
    pub supplier: Option<String>,
    /// The currency of `debit`/`credit`.
    pub currency: Currency,
    /// Base-currency units per unit of `currency` (1 for the base currency).
    pub exchange_rate: Decimal,
    /// Its lines: the debits, then the credit.
    pub lines: Vec<VoucherLine>,
}

/// A period's vouchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The book's own currency.
    pub base_currency: Currency,
    /// The vouchers in number order.
    pub vouchers: Vec<Voucher>,
}

/// Why a journal could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// A configured account code is empty.
    #[error("the {0} account code is empty")]
    EmptyAccount(&'static str),
    /// A currency with no exchange rate to the base currency.
    #[error("no exchange rate from {0} to the book's base currency {1}")]
    MissingRate(Currency, Currency),
    /// A rate of zero or less.
    #[error("the exchange rate for {0} is {1}; it must be more than zero")]
    BadRate(Currency, Decimal),
    /// A currency whose decimals are unknown.
    #[error("the number of decimals (minor units) of {0} is not known; configure it")]
    UnknownMinorUnits(Currency),
    /// Not a calendar month.
    #[error("{0}-{1} is not a calendar month")]
    BadMonth(i16, i8),
    /// A sum too large for exact decimals.
    #[error("the amounts of {0} in {1} overflow exact decimal arithmetic")]
    Overflow(AccountPath, Currency),
}

/// Builds the period's vouchers from billing lines. `nodes` gives each node's display
/// name and metadata (the department code under [`JournalConfig::department_key`]); a
/// node missing from it gets its path as name and no department.
pub fn build_journal(
    lines: &[CostLine],
    nodes: &BTreeMap<AccountPath, AccountInfo>,
    period: &JournalPeriod,
    config: &JournalConfig,
) -> Result<Journal, JournalError> {
    if config.expense_account.trim().is_empty() {
        return Err(JournalError::EmptyAccount("expense"));
    }
    if config.counter_account.trim().is_empty() {
        return Err(JournalError::EmptyAccount("counter (payable or prepaid)"));
    }
    if config
        .tax_account
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        return Err(JournalError::EmptyAccount("tax"));
    }
    // (node, currency) → debit group → exact amount. BTreeMaps give the stated order.
    let mut grouped: BTreeMap<(AccountPath, Currency), BTreeMap<Group, Decimal>> = BTreeMap::new();
    for line in lines {
        let is_tax = line.category == ChargeCategory::Tax && config.tax_account.is_some();
        let (service, model) = match config.detail {
            LineDetail::Node => (String::new(), String::new()),
            LineDetail::Service => (line.service.clone(), String::new()),
            LineDetail::ServiceModel => (line.service.clone(), line.model.clone()),
        };
        let key = if is_tax {
            Group {
                tax: true,
                service: String::new(),
                model: String::new(),
            }
        } else {
            Group {
                tax: false,
                service,
                model,
            }
        };
        let slot = grouped
            .entry((line.account.clone(), line.currency))
            .or_default()
            .entry(key)
            .or_insert(Decimal::ZERO);
        *slot = slot
            .checked_add(line.billed_cost)
            .ok_or_else(|| JournalError::Overflow(line.account.clone(), line.currency))?;
    }

    let base_minor = config.minor_units_of(config.base_currency)?;
    let mut vouchers = Vec::new();
    let mut number = config.first_voucher_number;
    for ((node, currency), groups) in grouped {
        let rate = if currency == config.base_currency {
            Decimal::ONE
        } else {
            let rate = *config
                .exchange_rates
                .get(&currency)
                .ok_or(JournalError::MissingRate(currency, config.base_currency))?;
            if rate <= Decimal::ZERO {
                return Err(JournalError::BadRate(currency, rate));
            }
            rate
        };
        let minor = config.minor_units_of(currency)?;
        let overflow = || JournalError::Overflow(node.clone(), currency);
        let info = nodes.get(&node);
        let name = info
            .and_then(|i| i.display_name.clone())
            .unwrap_or_else(|| node.to_string());
        let department = info.and_then(|i| i.metadata.get(&config.department_key).cloned());

        let exact: Vec<Decimal> = groups.values().copied().collect();
        let exact_local = exact
            .iter()
            .map(|a| a.checked_mul(rate))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(overflow)?;
        let debits = round_balanced(&exact, minor, config.rounding).ok_or_else(overflow)?;
        let debits_local =
            round_balanced(&exact_local, base_minor, config.rounding).ok_or_else(overflow)?;

        let head = format!("{} {} {}", config.summary_prefix, period.label, name);
        let mut voucher_lines = Vec::new();
        for (i, group) in groups.keys().enumerate() {
            let account = if group.tax {
                config.tax_account.clone().unwrap_or_default()
            } else {
                config.expense_account.clone()
            };
            let mut summary = head.clone();
            for part in [&group.service, &group.model] {
                if !part.is_empty() {
                    summary.push(' ');
                    summary.push_str(part);
                }
            }
            if group.tax {
                summary.push_str(" 税额");
            }
            voucher_lines.push(VoucherLine {
                line: 0,
                kind: if group.tax {
                    LineKind::Tax
                } else {
                    LineKind::Expense
                },
                summary,
                account_code: account,
                debit: debits.parts[i],
                credit: zero(minor),
                debit_local: debits_local.parts[i],
                credit_local: zero(base_minor),
            });
        }
        voucher_lines.push(VoucherLine {
            line: 0,
            kind: LineKind::Counter,
            summary: head,
            account_code: config.counter_account.clone(),
            debit: zero(minor),
            credit: debits.total,
            debit_local: zero(base_minor),
            credit_local: debits_local.total,
        });
        voucher_lines.retain(|l| {
            !(l.debit.is_zero()
                && l.credit.is_zero()
                && l.debit_local.is_zero()
                && l.credit_local.is_zero())
        });
        if voucher_lines.is_empty() {
            continue;
        }
        for (i, l) in voucher_lines.iter_mut().enumerate() {
            l.line = u32::try_from(i + 1).map_err(|_| overflow())?;
        }
        let voucher = Voucher {
            date: period.date,
            word: config.voucher_word.clone(),
            number,
            node: node.clone(),
            department,
            supplier: config.supplier.clone(),
            currency,
            exchange_rate: rate,
            lines: voucher_lines,
        };
        assert_balanced(&voucher);
        vouchers.push(voucher);
        number = number.checked_add(1).ok_or_else(overflow)?;
    }
    Ok(Journal {
        base_currency: config.base_currency,
        vouchers,
    })
}

/// A voucher whose debits and credits differ is never written: that would be a defect
/// of this module, not bad input.
fn assert_balanced(v: &Voucher) {
    let (mut d, mut c, mut dl, mut cl) =
        (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
    for l in &v.lines {
        d += l.debit;
        c += l.credit;
        dl += l.debit_local;
        cl += l.credit_local;
    }
    assert_eq!(d, c, "voucher {} of {} does not balance", v.number, v.node);
    assert_eq!(
        dl, cl,
        "voucher {} of {} does not balance in the base currency",
        v.number, v.node
    );
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Group {
    // Expense lines (false) before the tax line (true).
    tax: bool,
    service: String,
    model: String,
}

struct Rounded {
    parts: Vec<Decimal>,
    total: Decimal,
}

/// Rounds each amount and their exact total, then moves the difference onto the part
/// with the largest absolute exact amount (the first on a tie). `None` on overflow.
fn round_balanced(exact: &[Decimal], minor: u32, mode: RoundingMode) -> Option<Rounded> {
    let mut total_exact = Decimal::ZERO;
    for a in exact {
        total_exact = total_exact.checked_add(*a)?;
    }
    let total = round(total_exact, minor, mode);
    let mut parts: Vec<Decimal> = exact.iter().map(|a| round(*a, minor, mode)).collect();
    let mut sum = Decimal::ZERO;
    for p in &parts {
        sum = sum.checked_add(*p)?;
    }
    let difference = total.checked_sub(sum)?;
    let mut biggest: Option<usize> = None;
    for (i, a) in exact.iter().enumerate() {
        if biggest.is_none_or(|b| a.abs() > exact[b].abs()) {
            biggest = Some(i);
        }
    }
    if let Some(b) = biggest {
        parts[b] = fixed(parts[b].checked_add(difference)?, minor);
    }
    Some(Rounded { parts, total })
}

fn round(amount: Decimal, minor: u32, mode: RoundingMode) -> Decimal {
    let strategy = match mode {
        RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
        RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        RoundingMode::Down => RoundingStrategy::ToZero,
        RoundingMode::Up => RoundingStrategy::AwayFromZero,
    };
    fixed(amount.round_dp_with_strategy(minor, strategy), minor)
}

/// `amount` with exactly `minor` decimals and no negative zero, so its text is stable.
fn fixed(mut amount: Decimal, minor: u32) -> Decimal {
    amount.rescale(minor);
    if amount.is_zero() {
        amount.set_sign_positive(true);
    }
    amount
}

fn zero(minor: u32) -> Decimal {
    fixed(Decimal::ZERO, minor)
}

// ---------------------------------------------------------------------------------------
// Writing

/// The bytes a file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoding {
    /// UTF-8 preceded by a byte-order mark (what Excel needs to read UTF-8 CSV).
    Utf8Bom,
    /// GBK, as older Chinese ERP clients read. A character GBK cannot encode is an error.
    Gbk,
}

/// Why a journal could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A character the encoding has no code for.
    #[error("{character:?} (U+{code:04X}) in {text:?} cannot be written in GBK")]
    Unencodable {
        /// The character.
        character: char,
        /// Its code point.
        code: u32,
        /// The text it is in.
        text: String,
    },
    /// A setting a layout needs is empty.
    #[error("the {0} setting is empty")]
    MissingSetting(&'static str),
    /// The writer failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Writes records in one encoding: the BOM first for UTF-8, each record encoded whole.
struct Encoded<W: Write> {
    out: W,
    encoding: TextEncoding,
}

impl<W: Write> Encoded<W> {
    fn new(mut out: W, encoding: TextEncoding) -> Result<Self, WriteError> {
        if encoding == TextEncoding::Utf8Bom {
            out.write_all(b"\xEF\xBB\xBF")?;
        }
        Ok(Encoded { out, encoding })
    }

    fn record(&mut self, record: &str) -> Result<(), WriteError> {
        match self.encoding {
            TextEncoding::Utf8Bom => self.out.write_all(record.as_bytes())?,
            TextEncoding::Gbk => {
                let (bytes, _, unmappable) = encoding_rs::GBK.encode(record);
                if unmappable {
                    // encoding_rs would have written an HTML escape; find the culprit
                    // and refuse instead.
                    let mut one = [0u8; 4];
                    for character in record.chars() {
                        let (_, _, bad) = encoding_rs::GBK.encode(character.encode_utf8(&mut one));
                        if bad {
                            return Err(WriteError::Unencodable {
                                character,
                                code: u32::from(character),
                                text: record.trim_end().to_string(),
                            });
                        }
                    }
                }
                self.out.write_all(&bytes)?;
            }
        }
        Ok(())
    }
}

/// The department code where a line carries one in an ERP layout: on expense lines
/// only, since the payable and tax accounts are rarely kept by department and both ERPs
/// refuse a dimension an account does not have.
fn department_of<'a>(v: &'a Voucher, l: &VoucherLine) -> &'a str {
    match l.kind {
        LineKind::Expense => v.department.as_deref().unwrap_or(""),
        LineKind::Tax | LineKind::Counter => "",
    }
}

/// The supplier code, on the payable line only.
fn supplier_of<'a>(v: &'a Voucher, l: &VoucherLine) -> &'a str {
    match l.kind {
        LineKind::Counter => v.supplier.as_deref().unwrap_or(""),
        LineKind::Expense | LineKind::Tax => "",
    }
}

fn text(value: &str) -> (&str, bool) {
    (value, true)
}
fn num(value: &str) -> (&str, bool) {
    (value, false)
}

/// The generic layout's header, in column order.
pub const GENERIC_COLUMNS: [&str; 16] = [
    "date",
    "voucher_word",
    "voucher_number",
    "line",
    "summary",
    "account_code",
    "debit",
    "credit",
    "currency",
    "exchange_rate",
    "debit_local",
    "credit_local",
    "local_currency",
    "department",
    "supplier",
    "node",
];

/// Writes every voucher line as one generic journal line (RFC 4180 CSV, columns
/// [`GENERIC_COLUMNS`]): the department on every line of the node's voucher, the
/// supplier on the payable line.
pub fn write_generic(
    journal: &Journal,
    encoding: TextEncoding,
    out: impl Write,
) -> Result<(), WriteError> {
    let mut w = Encoded::new(out, encoding)?;
    w.record(&csv_record(GENERIC_COLUMNS.iter().map(|c| num(c))))?;
    let base = journal.base_currency.as_str();
    for v in &journal.vouchers {
        let (date, number, rate) = (
            v.date.to_string(),
            v.number.to_string(),
            v.exchange_rate.normalize().to_string(),
        );
        let node = v.node.to_string();
        for l in &v.lines {
            let (line, debit, credit) = (
                l.line.to_string(),
                l.debit.to_string(),
                l.credit.to_string(),
            );
            let (dl, cl) = (l.debit_local.to_string(), l.credit_local.to_string());
            w.record(&csv_record([
                num(&date),
                text(&v.word),
                num(&number),
                num(&line),
                text(&l.summary),
                text(&l.account_code),
                num(&debit),
                num(&credit),
                num(v.currency.as_str()),
                num(&rate),
                num(&dl),
                num(&cl),
                num(base),
                text(v.department.as_deref().unwrap_or("")),
                text(supplier_of(v, l)),
                text(&node),
            ]))?;
        }
    }
    Ok(())
}

/// The data-centre settings a Kingdee K/3 Cloud voucher import needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KingdeeSettings {
    /// The account book code (账簿编码), e.g. `001`.
    pub account_book: String,
    /// The accounting organisation code (核算组织编码), e.g. `100`.
    pub organisation: String,
    /// The voucher word's code (凭证字编码); `PRE001` is the preset 记.
    pub voucher_group: String,
    /// The exchange-rate type code; `HLTX01_SYS` is the preset fixed rate (固定汇率).
    pub exchange_rate_type: String,
    /// Currency codes (币别编码) by ISO code. [`KingdeeSettings::new`] fills the presets of
    /// a new data centre (`PRE001` CNY, `PRE002` HKD, `PRE003` EUR, `PRE004` JPY,
    /// `PRE005` TWD, `PRE006` GBP, `PRE007` USD); a currency missing here is written as
    /// its ISO code.
    pub currency_codes: BTreeMap<Currency, String>,
}

impl KingdeeSettings {
    /// Settings for a book and organisation, with the data centre's preset codes.
    pub fn new(account_book: &str, organisation: &str) -> Self {
        let mut currency_codes = BTreeMap::new();
        for (iso, code) in [
            ("CNY", "PRE001"),
            ("HKD", "PRE002"),
            ("EUR", "PRE003"),
            ("JPY", "PRE004"),
            ("TWD", "PRE005"),
            ("GBP", "PRE006"),
            ("USD", "PRE007"),
        ] {
            if let Ok(c) = iso.parse::<Currency>() {
                currency_codes.insert(c, code.to_string());
            }
        }
        KingdeeSettings {
            account_book: account_book.to_string(),
            organisation: organisation.to_string(),
            voucher_group: "PRE001".to_string(),
            exchange_rate_type: "HLTX01_SYS".to_string(),
            currency_codes,
        }
    }
}

/// The Kingdee K/3 Cloud voucher import (凭证 引入) columns used, in the order of the
/// import template exported from 总账 → 凭证 → 引入: the field key (first header row) and
/// the Chinese label (second header row); `*` marks what the importer requires.
/// Columns of the full template not listed are optional and may be absent.
pub const KINGDEE_COLUMNS: [(&str, &str); 22] = [
    ("FBillHead(GL_VOUCHER)", "*单据头(序号)"),
    ("FAccountBookID", "*(单据头)账簿#编码"),
    ("FDate", "*(单据头)日期"),
    ("FBUSDATE", "(单据头)业务日期"),
    ("FYEAR", "(单据头)会计年度"),
    ("FPERIOD", "(单据头)期间"),
    ("FVOUCHERGROUPID", "*(单据头)凭证字#编码"),
    ("FVOUCHERGROUPNO", "*(单据头)凭证号"),
    ("FATTACHMENTS", "(单据头)附件数"),
    ("FACCBOOKORGID", "*(单据头)核算组织#编码"),
    ("*Split*1", "间隔列"),
    ("FEntity", "*分录(序号)"),
    ("FEXPLANATION", "(分录)摘要"),
    ("FACCOUNTID", "*(分录)科目编码#编码"),
    ("FDetailID#FFlex5", "(分录)部门#编码"),
    ("FDetailID#FFlex4", "(分录)供应商#编码"),
    ("FCURRENCYID", "*(分录)币别#编码"),
    ("FEXCHANGERATETYPE", "*(分录)汇率类型#编码"),
    ("FEXCHANGERATE", "(分录)汇率"),
    ("FAMOUNTFOR", "(分录)原币金额"),
    ("FDEBIT", "(分录)借方金额"),
    ("FCREDIT", "(分录)贷方金额"),
];

/// Writes the journal in Kingdee K/3 Cloud's voucher import layout ([`KINGDEE_COLUMNS`]):
/// two header rows (field keys, then Chinese labels), then one row per voucher line, the
/// voucher's header fields on its first line only (as the template reads them). 借方金额
/// and 贷方金额 are in the base currency; 原币金额 is the line's amount in the voucher's
/// currency; the side not used is left empty.
pub fn write_kingdee(
    journal: &Journal,
    settings: &KingdeeSettings,
    encoding: TextEncoding,
    out: impl Write,
) -> Result<(), WriteError> {
    for (value, name) in [
        (&settings.account_book, "Kingdee account book (账簿)"),
        (&settings.organisation, "Kingdee organisation (核算组织)"),
        (&settings.voucher_group, "Kingdee voucher group (凭证字)"),
        (
            &settings.exchange_rate_type,
            "Kingdee exchange-rate type (汇率类型)",
        ),
    ] {
        if value.trim().is_empty() {
            return Err(WriteError::MissingSetting(name));
        }
    }
    let mut w = Encoded::new(out, encoding)?;
    w.record(&csv_record(KINGDEE_COLUMNS.iter().map(|c| num(c.0))))?;
    w.record(&csv_record(KINGDEE_COLUMNS.iter().map(|c| num(c.1))))?;
    for (seq, v) in journal.vouchers.iter().enumerate() {
        let seq = (seq + 1).to_string();
        let date = v.date.to_string();
        let (year, month) = (v.date.year().to_string(), v.date.month().to_string());
        let number = v.number.to_string();
        let currency = settings
            .currency_codes
            .get(&v.currency)
            .map_or(v.currency.as_str(), String::as_str);
        let rate = v.exchange_rate.normalize().to_string();
        for l in &v.lines {
            let first = l.line == 1;
            let head = |s: &str| if first { s.to_string() } else { String::new() };
            let line = l.line.to_string();
            let (amount, debit, credit) = if l.credit.is_zero() && l.credit_local.is_zero() {
                (
                    l.debit.to_string(),
                    l.debit_local.to_string(),
                    String::new(),
                )
            } else {
                (
                    l.credit.to_string(),
                    String::new(),
                    l.credit_local.to_string(),
                )
            };
            let cells = [
                head(&seq),
                head(&settings.account_book),
                head(&date),
                head(&date),
                head(&year),
                head(&month),
                head(&settings.voucher_group),
                head(&number),
                head("0"),
                head(&settings.organisation),
                String::new(),
                line,
                l.summary.clone(),
                l.account_code.clone(),
                department_of(v, l).to_string(),
                supplier_of(v, l).to_string(),
                currency.to_string(),
                settings.exchange_rate_type.clone(),
                rate.clone(),
                amount,
                debit,
                credit,
            ];
            // Summary, account, department and supplier come from tenants and books:
            // guarded as text.
            w.record(&csv_record(
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.as_str(), (12..=15).contains(&i))),
            ))?;
        }
    }
    Ok(())
}

/// The Yonyou U8 voucher import (总账工具 凭证引入) fields, in the order of its text
/// format: one row per entry, fields 1–19 (the later ones — salesman, project codes,
/// free items — are optional and omitted, as the format allows). The department is on
/// expense lines, the supplier on the payable line.
/// `[制单日期 + 凭证类别字 + 凭证号]` identifies a voucher; its lines are consecutive.
pub const U8_COLUMNS: [&str; 19] = [
    "制单日期",
    "凭证类别字",
    "凭证号",
    "附单据数",
    "摘要",
    "科目编码",
    "借方",
    "贷方",
    "数量",
    "外币金额",
    "汇率",
    "制单人",
    "结算方式",
    "票号",
    "发生日期",
    "部门编码",
    "个人编码",
    "客户编码",
    "供应商编码",
];

/// Writes the journal in Yonyou U8's voucher import layout ([`U8_COLUMNS`], with a
/// header row of their Chinese names). 借方/贷方 are in the base currency with `0` on the
/// unused side (U8 requires one side non-zero, the other zero); a foreign-currency line
/// also has 外币金额 (its amount in the voucher's currency) and 汇率.
pub fn write_u8(
    journal: &Journal,
    encoding: TextEncoding,
    preparer: &str,
    out: impl Write,
) -> Result<(), WriteError> {
    let mut w = Encoded::new(out, encoding)?;
    w.record(&csv_record(U8_COLUMNS.iter().map(|c| num(c))))?;
    for v in &journal.vouchers {
        let date = v.date.to_string();
        let number = v.number.to_string();
        let foreign = v.currency != journal.base_currency;
        let rate = if foreign {
            v.exchange_rate.normalize().to_string()
        } else {
            String::new()
        };
        for l in &v.lines {
            let amount_foreign = if !foreign {
                String::new()
            } else if l.credit.is_zero() {
                l.debit.to_string()
            } else {
                l.credit.to_string()
            };
            let (debit, credit) = (l.debit_local.to_string(), l.credit_local.to_string());
            w.record(&csv_record([
                num(&date),
                text(&v.word),
                num(&number),
                num("0"),
                text(&l.summary),
                text(&l.account_code),
                num(&debit),
                num(&credit),
                num(""),
                num(&amount_foreign),
                num(&rate),
                text(preparer),
                num(""),
                num(""),
                num(&date),
                text(department_of(v, l)),
                num(""),
                num(""),
                text(supplier_of(v, l)),
            ]))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::jiff::Timestamp;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }
    fn cur(s: &str) -> Currency {
        s.parse().unwrap()
    }
    fn line(node: &str, service: &str, model: &str, cost: &str, currency: &str) -> CostLine {
        CostLine {
            account: AccountPath::parse(node).unwrap(),
            charge_period_start: Timestamp::from_second(1_793_491_200).unwrap(),
            charge_period_end: Timestamp::from_second(1_796_083_200).unwrap(),
            category: ChargeCategory::Usage,
            service: service.to_string(),
            model: model.to_string(),
            key: "text.input".to_string(),
            quantity: d("1000"),
            list_unit_price: None,
            list_cost: d(cost),
            contracted_cost: d(cost),
            billed_cost: d(cost),
            currency: cur(currency),
            book: "list".to_string(),
            version: 1,
        }
    }
    fn nodes() -> BTreeMap<AccountPath, AccountInfo> {
        let mut m = BTreeMap::new();
        m.insert(
            AccountPath::parse("acme/cn/hr").unwrap(),
            AccountInfo {
                display_name: Some("人力资源部".to_string()),
                time_zone: None,
                metadata: [("cost_center".to_string(), "0301".to_string())].into(),
            },
        );
        m
    }
    fn period() -> JournalPeriod {
        JournalPeriod::month(2026, 11).unwrap()
    }
    fn config() -> JournalConfig {
        let mut c = JournalConfig::new("6602", "2202", cur("CNY"));
        c.exchange_rates.insert(cur("USD"), d("7.1234"));
        c.supplier = Some("S001".to_string());
        c
    }
    fn sums(v: &Voucher) -> (Decimal, Decimal, Decimal, Decimal) {
        v.lines.iter().fold(Default::default(), |(a, b, c, e), l| {
            (
                a + l.debit,
                b + l.credit,
                c + l.debit_local,
                e + l.credit_local,
            )
        })
    }

    #[test]
    fn one_voucher_per_node_and_currency_numbered_in_path_order() {
        let lines = vec![
            line("acme/cn/rd", "llm.chat", "gpt-4o", "10.001", "CNY"),
            line("acme/cn/hr", "llm.chat", "gpt-4o", "5.5", "CNY"),
            line("acme/cn/hr", "llm.chat", "gpt-4o", "1.25", "USD"),
            line("acme/cn/hr", "doc.verify", "", "2", "CNY"),
        ];
        let j = build_journal(&lines, &nodes(), &period(), &config()).unwrap();
        let heads: Vec<_> = j
            .vouchers
            .iter()
            .map(|v| (v.number, v.node.to_string(), v.currency.to_string()))
            .collect();
        assert_eq!(
            heads,
            vec![
                (1, "acme/cn/hr".into(), "CNY".into()),
                (2, "acme/cn/hr".into(), "USD".into()),
                (3, "acme/cn/rd".into(), "CNY".into())
            ]
        );
        let hr = &j.vouchers[0];
        assert_eq!(hr.department.as_deref(), Some("0301"));
        assert_eq!(hr.date.to_string(), "2026-11-30");
        assert_eq!(hr.lines.len(), 2);
        assert_eq!(hr.lines[0].account_code, "6602");
        assert_eq!(hr.lines[0].debit.to_string(), "7.50");
        assert_eq!(hr.lines[0].summary, "AI服务费 2026-11 人力资源部");
        assert_eq!(hr.lines[1].account_code, "2202");
        assert_eq!(hr.lines[1].credit.to_string(), "7.50");
        // 1.25 USD × 7.1234 = 8.90425 → 8.90 CNY (half up at the third decimal: 4).
        let usd = &j.vouchers[1];
        assert_eq!(usd.lines[0].debit.to_string(), "1.25");
        assert_eq!(usd.lines[0].debit_local.to_string(), "8.90");
        assert_eq!(usd.lines[1].credit_local.to_string(), "8.90");
        // A node with no metadata is named by its path and has no department.
        assert_eq!(j.vouchers[2].department, None);
        assert_eq!(j.vouchers[2].lines[0].debit.to_string(), "10.00");
    }

    #[test]
    fn rounding_difference_lands_on_the_largest_debit_line() {
        // Three services of 0.005 CNY each: each rounds (half up) to 0.01, the total
        // 0.015 to 0.02: the 0.01 difference comes off the first largest line.
        let lines = vec![
            line("acme/cn/hr", "a", "", "0.005", "CNY"),
            line("acme/cn/hr", "b", "", "0.005", "CNY"),
            line("acme/cn/hr", "c", "", "0.005", "CNY"),
        ];
        let mut c = config();
        c.detail = LineDetail::Service;
        let j = build_journal(&lines, &nodes(), &period(), &c).unwrap();
        let v = &j.vouchers[0];
        let debits: Vec<String> = v.lines.iter().map(|l| l.debit.to_string()).collect();
        assert_eq!(debits, vec!["0.01", "0.01", "0.00"]);
        // Line a went to 0.00 in both columns and was left out; b, c and the credit stay.
        assert_eq!(v.lines.len(), 3);
        assert_eq!(v.lines[0].summary, "AI服务费 2026-11 人力资源部 b");
        assert_eq!(v.lines[2].credit.to_string(), "0.02");
        let (dr, cr, _, _) = sums(v);
        assert_eq!(dr, cr);
    }

    #[test]
    fn tax_goes_to_the_tax_account_and_credits_make_red_entries() {
        let mut tax = line("acme/cn/hr", "", "", "0.60", "CNY");
        tax.category = ChargeCategory::Tax;
        let mut credit = line("acme/cn/hr", "llm.chat", "", "-25", "CNY");
        credit.category = ChargeCategory::Credit;
        let lines = vec![line("acme/cn/hr", "llm.chat", "", "10", "CNY"), tax, credit];
        let mut c = config();
        c.tax_account = Some("22210101".to_string());
        let j = build_journal(&lines, &nodes(), &period(), &c).unwrap();
        let v = &j.vouchers[0];
        let got: Vec<_> = v
            .lines
            .iter()
            .map(|l| {
                (
                    l.account_code.as_str(),
                    l.debit.to_string(),
                    l.credit.to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("6602", "-15.00".to_string(), "0.00".to_string()),
                ("22210101", "0.60".to_string(), "0.00".to_string()),
                ("2202", "0.00".to_string(), "-14.40".to_string()),
            ]
        );
    }

    #[test]
    fn bad_configuration_is_named() {
        let lines = vec![line("acme/cn/hr", "llm.chat", "", "1", "USD")];
        let c = JournalConfig::new("6602", "2202", cur("CNY"));
        assert_eq!(
            build_journal(&lines, &nodes(), &period(), &c),
            Err(JournalError::MissingRate(cur("USD"), cur("CNY")))
        );
        let mut c = config();
        c.exchange_rates.insert(cur("USD"), d("0"));
        assert_eq!(
            build_journal(&lines, &nodes(), &period(), &c),
            Err(JournalError::BadRate(cur("USD"), d("0")))
        );
        let c = JournalConfig::new("", "2202", cur("CNY"));
        assert_eq!(
            build_journal(&lines, &nodes(), &period(), &c),
            Err(JournalError::EmptyAccount("expense"))
        );
        let lines = vec![line("acme/cn/hr", "llm.chat", "", "1", "XAU")];
        let mut c = config();
        c.exchange_rates.insert(cur("XAU"), d("600"));
        assert_eq!(
            build_journal(&lines, &nodes(), &period(), &c),
            Err(JournalError::UnknownMinorUnits(cur("XAU")))
        );
        assert_eq!(
            JournalPeriod::month(2026, 13),
            Err(JournalError::BadMonth(2026, 13))
        );
    }

    fn sample() -> Journal {
        let lines = vec![
            line("acme/cn/hr", "llm.chat", "gpt-4o", "5.5", "CNY"),
            line("acme/cn/hr", "llm.chat", "gpt-4o", "1.25", "USD"),
        ];
        build_journal(&lines, &nodes(), &period(), &config()).unwrap()
    }

    #[test]
    fn generic_csv_has_a_bom_and_one_row_per_line() {
        let mut out = Vec::new();
        write_generic(&sample(), TextEncoding::Utf8Bom, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with('\u{feff}'));
        let rows: Vec<&str> = s.trim_start_matches('\u{feff}').split("\r\n").collect();
        assert_eq!(rows[0], GENERIC_COLUMNS.join(","));
        assert_eq!(
            rows[1],
            "2026-11-30,记,1,1,AI服务费 2026-11 人力资源部,6602,5.50,0.00,CNY,1,5.50,0.00,CNY,0301,,acme/cn/hr"
        );
        assert_eq!(
            rows[4],
            "2026-11-30,记,2,2,AI服务费 2026-11 人力资源部,2202,0.00,1.25,USD,7.1234,0.00,8.90,CNY,0301,S001,acme/cn/hr"
        );
        assert_eq!(rows.len(), 6); // header, 4 lines, and the empty tail after CRLF
    }

    #[test]
    fn kingdee_layout_has_two_header_rows_and_header_fields_once() {
        let mut out = Vec::new();
        let settings = KingdeeSettings::new("001", "100");
        write_kingdee(&sample(), &settings, TextEncoding::Utf8Bom, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = s.trim_start_matches('\u{feff}').split("\r\n").collect();
        assert!(rows[0].starts_with("FBillHead(GL_VOUCHER),FAccountBookID,FDate,"));
        assert!(rows[1].starts_with("*单据头(序号),*(单据头)账簿#编码,*(单据头)日期,"));
        assert_eq!(
            rows[2],
            "1,001,2026-11-30,2026-11-30,2026,11,PRE001,1,0,100,,1,AI服务费 2026-11 人力资源部,6602,0301,,PRE001,HLTX01_SYS,1,5.50,5.50,"
        );
        assert_eq!(
            rows[3],
            ",,,,,,,,,,,2,AI服务费 2026-11 人力资源部,2202,,S001,PRE001,HLTX01_SYS,1,5.50,,5.50"
        );
        assert_eq!(
            rows[5],
            ",,,,,,,,,,,2,AI服务费 2026-11 人力资源部,2202,,S001,PRE007,HLTX01_SYS,7.1234,1.25,,8.90"
        );
        let mut bad = settings.clone();
        bad.account_book = String::new();
        assert!(matches!(
            write_kingdee(&sample(), &bad, TextEncoding::Utf8Bom, Vec::new()),
            Err(WriteError::MissingSetting(_))
        ));
    }

    #[test]
    fn u8_layout_in_gbk() {
        let mut out = Vec::new();
        write_u8(&sample(), TextEncoding::Gbk, "张三", &mut out).unwrap();
        assert!(!out.starts_with(b"\xEF\xBB\xBF"));
        let (s, _, bad) = encoding_rs::GBK.decode(&out);
        assert!(!bad);
        let rows: Vec<&str> = s.split("\r\n").collect();
        assert_eq!(rows[0], U8_COLUMNS.join(","));
        assert_eq!(
            rows[1],
            "2026-11-30,记,1,0,AI服务费 2026-11 人力资源部,6602,5.50,0.00,,,,张三,,,2026-11-30,0301,,,"
        );
        assert_eq!(
            rows[3],
            "2026-11-30,记,2,0,AI服务费 2026-11 人力资源部,6602,8.90,0.00,,1.25,7.1234,张三,,,2026-11-30,0301,,,"
        );
        assert_eq!(
            rows[4],
            "2026-11-30,记,2,0,AI服务费 2026-11 人力资源部,2202,0.00,8.90,,1.25,7.1234,张三,,,2026-11-30,,,,S001"
        );
        // The bytes are GBK, not UTF-8: 记 is B C7 in GBK.
        assert!(out.windows(2).any(|w| w == [0xBC, 0xC7]));
    }

    #[test]
    fn gbk_refuses_a_character_it_cannot_encode_and_names_it() {
        let mut nodes = nodes();
        if let Some(info) = nodes.get_mut(&AccountPath::parse("acme/cn/hr").unwrap()) {
            info.display_name = Some("HR 😀".to_string());
        }
        let lines = vec![line("acme/cn/hr", "llm.chat", "", "1", "CNY")];
        let j = build_journal(&lines, &nodes, &period(), &config()).unwrap();
        match write_u8(&j, TextEncoding::Gbk, "", Vec::new()) {
            Err(WriteError::Unencodable {
                character, code, ..
            }) => {
                assert_eq!(character, '😀');
                assert_eq!(code, 0x1F600);
            }
            other => panic!("expected an encoding error, got {other:?}"),
        }
        // UTF-8 takes it.
        write_u8(&j, TextEncoding::Utf8Bom, "", Vec::new()).unwrap();
    }

    #[test]
    fn tenant_text_that_looks_like_a_formula_is_guarded() {
        let mut nodes = nodes();
        if let Some(info) = nodes.get_mut(&AccountPath::parse("acme/cn/hr").unwrap()) {
            info.metadata
                .insert("cost_center".to_string(), "=cmd|' /C calc'!A0".to_string());
        }
        let lines = vec![line("acme/cn/hr", "llm.chat", "", "1", "CNY")];
        let j = build_journal(&lines, &nodes, &period(), &config()).unwrap();
        let mut out = Vec::new();
        write_generic(&j, TextEncoding::Utf8Bom, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains(",'=cmd|' /C calc'!A0,"), "{s}");
    }

    proptest! {
        #[test]
        fn every_voucher_balances_after_rounding(
            raw in prop::collection::vec(
                (0usize..3, 0usize..3, 0usize..3, -1_000_000i64..10_000_000, 0u32..6),
                1..40,
            ),
            detail in 0usize..3,
            rate in 1i64..100_000,
            mode in 0usize..4,
        ) {
            let node_names = ["acme/a", "acme/b", "acme/c/d"];
            let services = ["llm.chat", "doc.verify", "embed"];
            let currencies = ["CNY", "USD", "JPY"];
            let lines: Vec<CostLine> = raw
                .iter()
                .map(|(n, s, c, m, sc)| {
                    let mut l = line(node_names[*n], services[*s], "m", "0", currencies[*c]);
                    l.billed_cost = Decimal::new(*m, *sc);
                    l
                })
                .collect();
            let mut c = config();
            c.detail = [LineDetail::Node, LineDetail::Service, LineDetail::ServiceModel][detail];
            c.exchange_rates.insert(cur("USD"), Decimal::new(rate, 4));
            c.exchange_rates.insert(cur("JPY"), Decimal::new(rate, 6));
            c.rounding = [RoundingMode::HalfUp, RoundingMode::HalfEven, RoundingMode::Down, RoundingMode::Up][mode];
            let j = build_journal(&lines, &BTreeMap::new(), &period(), &c).unwrap();
            for (i, v) in j.vouchers.iter().enumerate() {
                let (dr, cr, dl, cl) = sums(v);
                prop_assert_eq!(dr, cr);
                prop_assert_eq!(dl, cl);
                prop_assert_eq!(v.number, u32::try_from(i).unwrap() + 1);
                // The credit is the exact total rounded.
                let exact: Decimal = lines
                    .iter()
                    .filter(|l| l.account == v.node && l.currency == v.currency)
                    .map(|l| l.billed_cost)
                    .sum();
                let minor = if v.currency.as_str() == "CNY" || v.currency.as_str() == "USD" { 2 } else { 0 };
                prop_assert!((cr - exact).abs() <= Decimal::new(1, minor));
                for l in &v.lines {
                    prop_assert_eq!(l.debit.scale(), minor);
                    prop_assert!(l.debit.is_zero() || l.credit.is_zero());
                }
            }
        }
    }
}
