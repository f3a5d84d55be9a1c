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
    /// The node's own (shared) cost allocated to its children by the rule it declares,
    /// one per currency.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<AllocatedCost>,
}

/// A shared cost allocated: `Σ parts + unallocated = shared`, exactly; each part a
/// whole number of the currency's smallest unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatedCost {
    /// The currency.
    pub currency: Currency,
    /// The node's own cost in the period.
    pub shared: Decimal,
    /// The rule, as the node declares it (`cost`, `usage`, `equal`, `metadata:KEY`,
    /// `shares:a=60,b=40`).
    pub rule: String,
    /// What is below the smallest unit and stays with the node (half-even rounding of
    /// `shared` to the currency's minor units).
    pub unallocated: Decimal,
    /// One part per child, in path order.
    pub parts: Vec<AllocationPart>,
}

/// One child's part of a shared cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationPart {
    /// The child.
    pub account: AccountPath,
    /// Its part.
    pub amount: Decimal,
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

// ---------------------------------------------------------------------------------------
// Renderings

use std::fmt::Write as _;
use std::io::Write;

/// The CSV rendering's columns, in order. Which are filled depends on `section`: `line`
/// and `adjustment` rows fill category to book; `tax` rows fill the tax columns, amount
/// and currency; `child` rows (one per child node and currency) and the `total` rows
/// (one per currency) fill currency, subtotal, tax and total. `account` and
/// `display_name` are the statement's node, or the child's on `child` rows.
pub const CSV_COLUMNS: [&str; 18] = [
    "section",
    "account",
    "display_name",
    "category",
    "service",
    "model",
    "key",
    "quantity",
    "unit_price",
    "amount",
    "currency",
    "book",
    "tax_name",
    "tax_rate_percent",
    "tax_base",
    "subtotal",
    "tax",
    "total",
];

fn category_name(c: crate::ChargeCategory) -> &'static str {
    match c {
        crate::ChargeCategory::Usage => "usage",
        crate::ChargeCategory::Adjustment => "adjustment",
        crate::ChargeCategory::Credit => "credit",
        crate::ChargeCategory::Tax => "tax",
    }
}

/// Writes the statement as CSV (RFC 4180: CRLF line ends, fields quoted where needed,
/// UTF-8 without BOM), columns [`CSV_COLUMNS`]: the usage lines, the adjustments, the
/// taxes, one row per child node and currency, and one total row per currency, in that
/// order and in the statement's own order within each. Amounts are the exact decimals of
/// the statement; text from tenants that a spreadsheet would take for a formula is
/// prefixed with `'`.
pub fn write_csv(statement: &Statement, mut out: impl Write) -> std::io::Result<()> {
    out.write_all(csv_record(CSV_COLUMNS.iter().map(|c| (*c, false))).as_bytes())?;
    let account = statement.account.to_string();
    let name = statement.display_name.as_deref().unwrap_or("");
    let row = |cells: [&str; 18]| {
        // Columns 1–6, 11 and 12 hold text that tenants or books named.
        csv_record(
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, matches!(i, 1..=6 | 11 | 12))),
        )
    };
    for (section, lines) in [
        ("line", &statement.lines),
        ("adjustment", &statement.adjustments),
    ] {
        for l in lines {
            let quantity = l.quantity.to_string();
            let price = l.unit_price.map(|p| p.to_string()).unwrap_or_default();
            let amount = l.amount.to_string();
            out.write_all(
                row([
                    section,
                    &account,
                    name,
                    category_name(l.category),
                    &l.service,
                    &l.model,
                    &l.key,
                    &quantity,
                    &price,
                    &amount,
                    l.currency.as_str(),
                    &l.book,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ])
                .as_bytes(),
            )?;
        }
    }
    for t in &statement.taxes {
        let (rate, base, amount) = (
            t.rate_percent.to_string(),
            t.base.to_string(),
            t.amount.to_string(),
        );
        out.write_all(
            row([
                "tax",
                &account,
                name,
                "tax",
                "",
                "",
                "",
                "",
                "",
                &amount,
                t.currency.as_str(),
                "",
                &t.name,
                &rate,
                &base,
                "",
                "",
                "",
            ])
            .as_bytes(),
        )?;
    }
    let totals = |section: &str, account: &str, name: &str, t: &CurrencyTotal| {
        let (subtotal, tax, total) = (
            t.subtotal.to_string(),
            t.tax.to_string(),
            t.total.to_string(),
        );
        row([
            section,
            account,
            name,
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            t.currency.as_str(),
            "",
            "",
            "",
            "",
            &subtotal,
            &tax,
            &total,
        ])
    };
    for c in &statement.children {
        let child = c.account.to_string();
        let child_name = c.display_name.as_deref().unwrap_or("");
        for t in &c.totals {
            out.write_all(totals("child", &child, child_name, t).as_bytes())?;
        }
    }
    // One row per child's part of a shared cost (its rule in `key`), then what stayed
    // below the smallest unit (on the statement's node).
    for a in &statement.allocations {
        for p in &a.parts {
            let (child, amount) = (p.account.to_string(), p.amount.to_string());
            out.write_all(
                row([
                    "allocation",
                    &child,
                    "",
                    "",
                    "",
                    "",
                    &a.rule,
                    "",
                    "",
                    &amount,
                    a.currency.as_str(),
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ])
                .as_bytes(),
            )?;
        }
        let rest = a.unallocated.to_string();
        out.write_all(
            row([
                "allocation",
                &account,
                name,
                "",
                "",
                "",
                "unallocated",
                "",
                "",
                &rest,
                a.currency.as_str(),
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            ])
            .as_bytes(),
        )?;
    }
    for t in &statement.totals {
        out.write_all(totals("total", &account, name, t).as_bytes())?;
    }
    Ok(())
}

/// The language of the HTML rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English (`en`).
    En,
    /// Simplified Chinese (`zh-CN`).
    ZhCn,
}

/// A language tag this crate does not render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("language {0:?} is not rendered; use \"en\" or \"zh-CN\"")]
pub struct UnknownLang(pub String);

impl std::str::FromStr for Lang {
    type Err = UnknownLang;
    fn from_str(s: &str) -> Result<Lang, UnknownLang> {
        match s {
            "en" => Ok(Lang::En),
            "zh-CN" => Ok(Lang::ZhCn),
            _ => Err(UnknownLang(s.to_string())),
        }
    }
}

impl Lang {
    fn tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::ZhCn => "zh-CN",
        }
    }

    /// The page's fixed words, so both languages have the same ones.
    fn words(self) -> &'static Words {
        match self {
            Lang::En => &EN,
            Lang::ZhCn => &ZH,
        }
    }
}

struct Words {
    title: &'static str,
    account: &'static str,
    period: &'static str,
    from: &'static str,
    to: &'static str,
    time_zone: &'static str,
    status: &'static str,
    draft: &'static str,
    closed: &'static str,
    usage: &'static str,
    adjustments: &'static str,
    taxes: &'static str,
    children: &'static str,
    allocations: &'static str,
    rule: &'static str,
    unallocated: &'static str,
    totals: &'static str,
    category: &'static str,
    service: &'static str,
    model: &'static str,
    key: &'static str,
    quantity: &'static str,
    unit_price: &'static str,
    amount: &'static str,
    book: &'static str,
    tax_name: &'static str,
    rate: &'static str,
    base: &'static str,
    node: &'static str,
    name: &'static str,
    currency: &'static str,
    subtotal: &'static str,
    tax: &'static str,
    total: &'static str,
    none: &'static str,
    /// Usage, adjustment, credit, tax.
    categories: [&'static str; 4],
}

const EN: Words = Words {
    title: "Statement",
    account: "Account",
    period: "Period",
    from: "From",
    to: "Up to (not included)",
    time_zone: "Time zone",
    status: "Status",
    draft: "Draft: the period is not closed",
    closed: "Issued: closed by ledger entry",
    usage: "Usage",
    adjustments: "Adjustments, credits and refunds",
    taxes: "Taxes",
    children: "Subtotals by child node",
    allocations: "Shared cost allocated to child nodes",
    rule: "Rule",
    unallocated: "Below the smallest unit, not allocated",
    totals: "Totals",
    category: "Category",
    service: "Service",
    model: "Model",
    key: "Priced key",
    quantity: "Quantity",
    unit_price: "Unit price",
    amount: "Amount",
    book: "Price book",
    tax_name: "Tax",
    rate: "Rate",
    base: "Taxable amount",
    node: "Node",
    name: "Name",
    currency: "Currency",
    subtotal: "Before tax",
    tax: "Tax",
    total: "Total",
    none: "None",
    categories: ["Usage", "Adjustment", "Credit", "Tax"],
};

const ZH: Words = Words {
    title: "对账单",
    account: "账户",
    period: "账期",
    from: "起始",
    to: "截止（不含）",
    time_zone: "时区",
    status: "状态",
    draft: "草稿：账期尚未关闭",
    closed: "已出具：账期由账本条目关闭",
    usage: "用量",
    adjustments: "调整、抵扣与退款",
    taxes: "税费",
    children: "下级节点小计",
    allocations: "共享成本分摊至下级节点",
    rule: "分摊规则",
    unallocated: "不足最小货币单位，未分摊",
    totals: "合计",
    category: "类别",
    service: "服务",
    model: "模型",
    key: "计价项",
    quantity: "数量",
    unit_price: "单价",
    amount: "金额",
    book: "价目表",
    tax_name: "税种",
    rate: "税率",
    base: "计税金额",
    node: "节点",
    name: "名称",
    currency: "币种",
    subtotal: "税前",
    tax: "税额",
    total: "合计",
    none: "无",
    categories: ["用量", "调整", "抵扣", "税费"],
};

/// Appends `s` with `&`, `<`, `>`, `"` and `'` escaped: every statement text goes
/// through here (names come from tenants).
pub(crate) fn esc(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
}

/// An exact decimal with its integer digits grouped by thousands (`1,234.5600`), for
/// reading; every digit of the statement is kept.
fn grouped(d: Decimal) -> String {
    let text = d.to_string();
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.as_str()),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let mut out = String::from(sign);
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    out
}

/// An instant as the statement's zone reads it, or in UTC where the zone is unknown.
fn local_time(at: ciyuan_core::jiff::Timestamp, zone: &str) -> String {
    match at.in_tz(zone) {
        Ok(z) => z.strftime("%Y-%m-%d %H:%M:%S %:z").to_string(),
        Err(_) => at.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
    }
}

pub(crate) const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI','PingFang SC','Microsoft YaHei',sans-serif;\
color:#111;margin:2rem auto;max-width:64rem;padding:0 1rem;line-height:1.4}\
h1{font-size:1.6rem;margin:0 0 .5rem}h2{font-size:1.15rem;margin:1.6rem 0 .4rem}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}\
dt{color:#555}dd{margin:0}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}\
th{background:#f3f3f3;font-weight:600}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
tr.total td{font-weight:700;border-top:2px solid #111}\
.muted{color:#666}\
@media print{body{margin:0;max-width:none;font-size:10pt}\
th{background:none}h2{break-after:avoid}thead{display:table-header-group}\
tr{break-inside:avoid}}";

/// Writes the statement as one self-contained, printable HTML page in `lang`: inline CSS
/// with print rules, no scripts, no external assets. The account, period and its time
/// zone head the page; then usage, adjustments, taxes, one subtotal per child node and
/// the totals per currency; amounts are right-aligned with their currency. Every text of
/// the statement is HTML-escaped. The same statement gives the same bytes.
pub fn write_html(statement: &Statement, lang: Lang, mut out: impl Write) -> std::io::Result<()> {
    let w = lang.words();
    let mut h = String::with_capacity(8192);
    let money = |h: &mut String, amount: Decimal, currency: Currency| {
        h.push_str("<td class=\"num\">");
        esc(h, &grouped(amount));
        h.push(' ');
        esc(h, currency.as_str());
        h.push_str("</td>");
    };
    let cell = |h: &mut String, s: &str| {
        h.push_str("<td>");
        esc(h, s);
        h.push_str("</td>");
    };
    let num = |h: &mut String, s: &str| {
        h.push_str("<td class=\"num\">");
        esc(h, s);
        h.push_str("</td>");
    };
    let head = |h: &mut String, cols: &[(&str, bool)]| {
        h.push_str("<thead><tr>");
        for (c, right) in cols {
            h.push_str(if *right { "<th class=\"num\">" } else { "<th>" });
            esc(h, c);
            h.push_str("</th>");
        }
        h.push_str("</tr></thead><tbody>");
    };
    let account = statement.account.to_string();
    let period = statement.period.clone().unwrap_or_else(|| {
        format!(
            "{} – {}",
            local_time(statement.from, &statement.time_zone),
            local_time(statement.to, &statement.time_zone)
        )
    });

    h.push_str("<!DOCTYPE html>\n<html lang=\"");
    h.push_str(lang.tag());
    h.push_str("\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str("<title>");
    esc(&mut h, w.title);
    h.push_str(" · ");
    esc(
        &mut h,
        statement.display_name.as_deref().unwrap_or(&account),
    );
    h.push_str(" · ");
    esc(&mut h, &period);
    h.push_str("</title>\n<style>");
    h.push_str(STYLE);
    h.push_str("</style>\n</head>\n<body>\n<header>\n<h1>");
    esc(&mut h, w.title);
    h.push_str("</h1>\n<dl>\n<dt>");
    esc(&mut h, w.account);
    h.push_str("</dt><dd>");
    if let Some(name) = &statement.display_name {
        esc(&mut h, name);
        h.push_str(" <span class=\"muted\">(");
        esc(&mut h, &account);
        h.push_str(")</span>");
    } else {
        esc(&mut h, &account);
    }
    h.push_str("</dd>\n<dt>");
    esc(&mut h, w.period);
    h.push_str("</dt><dd>");
    esc(&mut h, &period);
    h.push_str("</dd>\n<dt>");
    esc(&mut h, w.from);
    h.push_str("</dt><dd>");
    esc(&mut h, &local_time(statement.from, &statement.time_zone));
    h.push_str("</dd>\n<dt>");
    esc(&mut h, w.to);
    h.push_str("</dt><dd>");
    esc(&mut h, &local_time(statement.to, &statement.time_zone));
    h.push_str("</dd>\n<dt>");
    esc(&mut h, w.time_zone);
    h.push_str("</dt><dd>");
    esc(&mut h, &statement.time_zone);
    h.push_str("</dd>\n<dt>");
    esc(&mut h, w.status);
    h.push_str("</dt><dd>");
    match &statement.closed {
        Some(c) => {
            esc(&mut h, w.closed);
            let _ = write!(h, " #{} (", c.entry);
            esc(&mut h, &local_time(c.at, &statement.time_zone));
            h.push(')');
        }
        None => esc(&mut h, w.draft),
    }
    h.push_str("</dd>\n</dl>\n</header>\n");

    for (title, lines, with_category) in [
        (w.usage, &statement.lines, false),
        (w.adjustments, &statement.adjustments, true),
    ] {
        if with_category && lines.is_empty() {
            continue;
        }
        h.push_str("<section>\n<h2>");
        esc(&mut h, title);
        h.push_str("</h2>\n<table>");
        let mut cols = Vec::new();
        if with_category {
            cols.push((w.category, false));
        }
        cols.extend([
            (w.service, false),
            (w.model, false),
            (w.key, false),
            (w.quantity, true),
            (w.unit_price, true),
            (w.amount, true),
            (w.book, false),
        ]);
        head(&mut h, &cols);
        if lines.is_empty() {
            let _ = write!(h, "<tr><td colspan=\"{}\" class=\"muted\">", cols.len());
            esc(&mut h, w.none);
            h.push_str("</td></tr>");
        }
        for l in lines {
            h.push_str("\n<tr>");
            if with_category {
                cell(
                    &mut h,
                    match l.category {
                        crate::ChargeCategory::Usage => w.categories[0],
                        crate::ChargeCategory::Adjustment => w.categories[1],
                        crate::ChargeCategory::Credit => w.categories[2],
                        crate::ChargeCategory::Tax => w.categories[3],
                    },
                );
            }
            cell(&mut h, &l.service);
            cell(&mut h, &l.model);
            cell(&mut h, &l.key);
            num(&mut h, &grouped(l.quantity));
            match l.unit_price {
                Some(p) => money(&mut h, p, l.currency),
                None => num(&mut h, ""),
            }
            money(&mut h, l.amount, l.currency);
            cell(&mut h, &l.book);
            h.push_str("</tr>");
        }
        h.push_str("\n</tbody></table>\n</section>\n");
    }

    if !statement.taxes.is_empty() {
        h.push_str("<section>\n<h2>");
        esc(&mut h, w.taxes);
        h.push_str("</h2>\n<table>");
        head(
            &mut h,
            &[
                (w.tax_name, false),
                (w.rate, true),
                (w.base, true),
                (w.amount, true),
            ],
        );
        for t in &statement.taxes {
            h.push_str("\n<tr>");
            cell(&mut h, &t.name);
            num(&mut h, &format!("{}%", t.rate_percent));
            money(&mut h, t.base, t.currency);
            money(&mut h, t.amount, t.currency);
            h.push_str("</tr>");
        }
        h.push_str("\n</tbody></table>\n</section>\n");
    }

    let total_cols = [(w.subtotal, true), (w.tax, true), (w.total, true)];
    if !statement.children.is_empty() {
        h.push_str("<section>\n<h2>");
        esc(&mut h, w.children);
        h.push_str("</h2>\n<table>");
        let mut cols = vec![(w.node, false), (w.name, false)];
        cols.extend(total_cols);
        head(&mut h, &cols);
        for c in &statement.children {
            let rows = c.totals.len().max(1);
            h.push_str("\n<tr>");
            let _ = write!(h, "<td rowspan=\"{rows}\">");
            esc(&mut h, &c.account.to_string());
            let _ = write!(h, "</td><td rowspan=\"{rows}\">");
            esc(&mut h, c.display_name.as_deref().unwrap_or(""));
            h.push_str("</td>");
            if c.totals.is_empty() {
                h.push_str("<td colspan=\"3\" class=\"muted\">");
                esc(&mut h, w.none);
                h.push_str("</td></tr>");
            }
            for (i, t) in c.totals.iter().enumerate() {
                if i > 0 {
                    h.push_str("\n<tr>");
                }
                money(&mut h, t.subtotal, t.currency);
                money(&mut h, t.tax, t.currency);
                money(&mut h, t.total, t.currency);
                h.push_str("</tr>");
            }
        }
        h.push_str("\n</tbody></table>\n</section>\n");
    }

    for a in &statement.allocations {
        h.push_str("<section>\n<h2>");
        esc(&mut h, w.allocations);
        h.push_str("</h2>\n<p>");
        esc(&mut h, w.rule);
        h.push_str(": <code>");
        esc(&mut h, &a.rule);
        h.push_str("</code></p>\n<table>");
        head(&mut h, &[(w.node, false), (w.amount, true)]);
        for p in &a.parts {
            h.push_str("\n<tr><td>");
            esc(&mut h, &p.account.to_string());
            h.push_str("</td>");
            money(&mut h, p.amount, a.currency);
            h.push_str("</tr>");
        }
        h.push_str("\n<tr><td class=\"muted\">");
        esc(&mut h, w.unallocated);
        h.push_str("</td>");
        money(&mut h, a.unallocated, a.currency);
        h.push_str("</tr>\n</tbody></table>\n</section>\n");
    }

    h.push_str("<section>\n<h2>");
    esc(&mut h, w.totals);
    h.push_str("</h2>\n<table>");
    let mut cols = vec![(w.currency, false)];
    cols.extend(total_cols);
    head(&mut h, &cols);
    if statement.totals.is_empty() {
        h.push_str("<tr><td colspan=\"4\" class=\"muted\">");
        esc(&mut h, w.none);
        h.push_str("</td></tr>");
    }
    for t in &statement.totals {
        h.push_str("\n<tr class=\"total\">");
        cell(&mut h, t.currency.as_str());
        money(&mut h, t.subtotal, t.currency);
        money(&mut h, t.tax, t.currency);
        money(&mut h, t.total, t.currency);
        h.push_str("</tr>");
    }
    h.push_str("\n</tbody></table>\n</section>\n</body>\n</html>\n");
    out.write_all(h.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChargeCategory;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }
    fn cur(s: &str) -> Currency {
        s.parse().unwrap()
    }
    fn p(s: &str) -> AccountPath {
        AccountPath::parse(s).unwrap()
    }
    fn total(c: &str, sub: &str, tax: &str, t: &str) -> CurrencyTotal {
        CurrencyTotal {
            currency: cur(c),
            subtotal: d(sub),
            tax: d(tax),
            total: d(t),
        }
    }
    fn sline(cat: ChargeCategory, model: &str, amount: &str, c: &str) -> StatementLine {
        StatementLine {
            category: cat,
            service: "llm.chat".into(),
            model: model.into(),
            key: "text.input".into(),
            quantity: d("1234567"),
            unit_price: Some(d("0.0000025")),
            amount: d(amount),
            currency: cur(c),
            book: "list@3".into(),
        }
    }

    /// Two currencies, two children, an adjustment, a tax, and hostile names.
    fn statement() -> Statement {
        Statement {
            account: p("acme"),
            display_name: Some("Acme <script>alert(1)</script> & \"Co\"".into()),
            period: Some("2026-11".into()),
            from: "2026-10-31T16:00:00Z".parse().unwrap(),
            to: "2026-11-30T16:00:00Z".parse().unwrap(),
            time_zone: "Asia/Shanghai".into(),
            lines: vec![
                sline(ChargeCategory::Usage, "gpt-4o", "3086.42", "CNY"),
                sline(ChargeCategory::Usage, "claude, \"sonnet\"", "12.50", "USD"),
            ],
            adjustments: vec![StatementLine {
                quantity: Decimal::ZERO,
                unit_price: None,
                key: "correction".into(),
                ..sline(ChargeCategory::Credit, "", "-10.00", "CNY")
            }],
            taxes: vec![TaxLine {
                name: "VAT".into(),
                rate_percent: d("6"),
                base: d("3076.42"),
                amount: d("184.59"),
                currency: cur("CNY"),
            }],
            children: vec![
                ChildSubtotal {
                    account: p("acme/cn"),
                    display_name: Some("中国 <b>子公司</b>".into()),
                    totals: vec![
                        total("CNY", "3076.42", "184.59", "3261.01"),
                        total("USD", "2.50", "0", "2.50"),
                    ],
                },
                ChildSubtotal {
                    account: p("acme/us"),
                    display_name: None,
                    totals: vec![total("USD", "10.00", "0", "10.00")],
                },
            ],
            totals: vec![
                total("CNY", "3076.42", "184.59", "3261.01"),
                total("USD", "12.50", "0", "12.50"),
            ],
            closed: Some(Closed {
                entry: 4242,
                at: "2026-12-01T02:00:00Z".parse().unwrap(),
            }),
            allocations: Vec::new(),
        }
    }

    fn html(lang: Lang) -> String {
        let mut out = Vec::new();
        write_html(&statement(), lang, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn csv_has_a_section_per_row_and_quotes_by_rfc_4180() {
        let mut out = Vec::new();
        write_csv(&statement(), &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = s.split_terminator("\r\n").collect();
        assert_eq!(rows[0], CSV_COLUMNS.join(","));
        let name = "\"Acme <script>alert(1)</script> & \"\"Co\"\"\"";
        assert_eq!(
            rows[1],
            format!(
                "line,acme,{name},usage,llm.chat,gpt-4o,text.input,1234567,0.0000025,3086.42,CNY,list@3,,,,,,"
            )
        );
        assert!(
            rows[2].contains(",\"claude, \"\"sonnet\"\"\","),
            "{}",
            rows[2]
        );
        assert_eq!(
            rows[3],
            format!(
                "adjustment,acme,{name},credit,llm.chat,,correction,0,,-10.00,CNY,list@3,,,,,,"
            )
        );
        assert_eq!(
            rows[4],
            format!("tax,acme,{name},tax,,,,,,184.59,CNY,,VAT,6,3076.42,,,")
        );
        assert_eq!(
            rows[5],
            "child,acme/cn,中国 <b>子公司</b>,,,,,,,,CNY,,,,,3076.42,184.59,3261.01"
        );
        assert_eq!(
            rows[6],
            "child,acme/cn,中国 <b>子公司</b>,,,,,,,,USD,,,,,2.50,0,2.50"
        );
        assert_eq!(rows[7], "child,acme/us,,,,,,,,,USD,,,,,10.00,0,10.00");
        assert_eq!(
            rows[8],
            format!("total,acme,{name},,,,,,,,CNY,,,,,3076.42,184.59,3261.01")
        );
        assert_eq!(
            rows[9],
            format!("total,acme,{name},,,,,,,,USD,,,,,12.50,0,12.50")
        );
        assert_eq!(rows.len(), 10);
        assert!(s.ends_with("\r\n"));
    }

    #[test]
    fn csv_guards_a_formula_in_a_name() {
        let mut st = statement();
        st.display_name = Some("=HYPERLINK(\"x\")".into());
        let mut out = Vec::new();
        write_csv(&st, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains(",\"'=HYPERLINK(\"\"x\"\")\","), "{s}");
    }

    #[test]
    fn html_escapes_every_text_from_the_statement() {
        let page = html(Lang::En);
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<b>"));
        assert!(page.contains("Acme &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;Co&quot;"));
        assert!(page.contains("中国 &lt;b&gt;子公司&lt;/b&gt;"));
        assert!(page.contains("claude, &quot;sonnet&quot;"));
        // Self-contained: no script, no external asset.
        for banned in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(banned), "page contains {banned}");
        }
        assert!(page.contains("@media print"));
    }

    #[test]
    fn html_in_english_has_period_zone_totals_and_one_subtotal_per_child() {
        let page = html(Lang::En);
        assert!(page.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        assert!(page.contains("<dd>2026-11</dd>"));
        assert!(page.contains("<dd>2026-11-01 00:00:00 +08:00</dd>"));
        assert!(page.contains("<dd>2026-12-01 00:00:00 +08:00</dd>"));
        assert!(page.contains("<dd>Asia/Shanghai</dd>"));
        assert!(page.contains("closed by ledger entry #4242 (2026-12-01 10:00:00 +08:00)"));
        assert!(page.contains("<td class=\"num\">1,234,567</td>"));
        assert!(page.contains("<td class=\"num\">3,086.42 CNY</td>"));
        assert!(page.contains("<tr class=\"total\"><td>CNY</td><td class=\"num\">3,076.42 CNY</td><td class=\"num\">184.59 CNY</td><td class=\"num\">3,261.01 CNY</td></tr>"));
        assert!(page.contains("<tr class=\"total\"><td>USD</td><td class=\"num\">12.50 USD</td>"));
        assert_eq!(page.matches("<tr class=\"total\">").count(), 2);
        // acme/cn spans its two currencies; acme/us has one row.
        assert!(page.contains("<td rowspan=\"2\">acme/cn</td>"));
        assert!(page.contains("<td rowspan=\"1\">acme/us</td>"));
        assert!(page.contains("<td>Credit</td>"));
        assert!(page.contains(">6%</td>"));
    }

    #[test]
    fn html_in_chinese() {
        let page = html(Lang::ZhCn);
        assert!(page.starts_with("<!DOCTYPE html>\n<html lang=\"zh-CN\">"));
        for word in [
            "<h1>对账单</h1>",
            "<h2>用量</h2>",
            "<h2>下级节点小计</h2>",
            "<h2>合计</h2>",
            "<dt>时区</dt>",
            "<td>抵扣</td>",
        ] {
            assert!(page.contains(word), "missing {word}");
        }
        assert!(!page.contains("Statement"));
        assert_eq!(Lang::from_str("zh-CN"), Ok(Lang::ZhCn));
        assert_eq!(Lang::from_str("en"), Ok(Lang::En));
        assert_eq!(Lang::from_str("fr"), Err(UnknownLang("fr".into())));
    }

    #[test]
    fn html_of_a_draft_without_lines() {
        let mut st = statement();
        st.closed = None;
        st.lines.clear();
        st.adjustments.clear();
        st.taxes.clear();
        st.children.clear();
        st.totals.clear();
        st.period = None;
        st.time_zone = "Nowhere/Unknown".into();
        let mut out = Vec::new();
        write_html(&st, Lang::En, &mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.contains("Draft: the period is not closed"));
        assert!(page.contains("<dd>2026-10-31 16:00:00 UTC – 2026-11-30 16:00:00 UTC</dd>"));
        assert!(!page.contains("<h2>Taxes</h2>"));
        assert!(page.contains(">None</td>"));
    }

    #[test]
    fn allocations_are_rendered_with_their_rule_and_remainder() {
        let mut st = statement();
        st.allocations = vec![AllocatedCost {
            currency: "CNY".parse().unwrap(),
            shared: "1.005".parse().unwrap(),
            rule: "shares:a=60,b=40".into(),
            unallocated: "0.005".parse().unwrap(),
            parts: vec![
                AllocationPart {
                    account: "acme/a".parse().unwrap(),
                    amount: "0.60".parse().unwrap(),
                },
                AllocationPart {
                    account: "acme/b".parse().unwrap(),
                    amount: "0.40".parse().unwrap(),
                },
            ],
        }];
        let mut csv = Vec::new();
        write_csv(&st, &mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert!(
            csv.contains("allocation,acme/a,,,,,\"shares:a=60,b=40\",,,0.60,CNY,"),
            "{csv}"
        );

        assert!(csv.contains(",unallocated,,,0.005,CNY,"), "{csv}");
        let mut html = Vec::new();
        write_html(&st, Lang::ZhCn, &mut html).unwrap();
        let html = String::from_utf8(html).unwrap();
        assert!(
            html.contains("共享成本分摊至下级节点") && html.contains("shares:a=60,b=40"),
            "{html}"
        );
    }

    #[test]
    fn renderings_are_deterministic() {
        let (a, b) = (html(Lang::ZhCn), html(Lang::ZhCn));
        assert_eq!(a, b);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        write_csv(&statement(), &mut x).unwrap();
        write_csv(&statement(), &mut y).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn digits_are_grouped_without_losing_any() {
        assert_eq!(grouped(d("0")), "0");
        assert_eq!(grouped(d("999")), "999");
        assert_eq!(grouped(d("1000")), "1,000");
        assert_eq!(grouped(d("-1234567.000100")), "-1,234,567.000100");
        assert_eq!(grouped(d("-0.5")), "-0.5");
    }
}
