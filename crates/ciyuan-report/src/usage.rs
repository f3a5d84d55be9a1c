//! The usage export: every billing line as a CSV row, for spreadsheets and BI tools
//! that want Ciyuan's own columns rather than FOCUS's.

use crate::statement::csv_record;
use crate::{ChargeCategory, CostLine};
use std::io::Write;

/// The columns, in order.
pub const USAGE_COLUMNS: [&str; 15] = [
    "charge_period_start",
    "charge_period_end",
    "account",
    "category",
    "service",
    "model",
    "key",
    "quantity",
    "list_unit_price",
    "list_cost",
    "contracted_cost",
    "billed_cost",
    "currency",
    "book",
    "version",
];

/// Writes lines as CSV rows under [`USAGE_COLUMNS`], streamed: call
/// [`UsageWriter::write`] per line, in any number.
pub struct UsageWriter<W: Write> {
    out: W,
}

impl<W: Write> UsageWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W) -> std::io::Result<UsageWriter<W>> {
        out.write_all(csv_record(USAGE_COLUMNS.iter().map(|c| (*c, false))).as_bytes())?;
        Ok(UsageWriter { out })
    }

    /// Writes one line.
    pub fn write(&mut self, l: &CostLine) -> std::io::Result<()> {
        let category = match l.category {
            ChargeCategory::Usage => "usage",
            ChargeCategory::Adjustment => "adjustment",
            ChargeCategory::Credit => "credit",
            ChargeCategory::Tax => "tax",
        };
        let start = l.charge_period_start.to_string();
        let end = l.charge_period_end.to_string();
        let account = l.account.to_string();
        let quantity = l.quantity.normalize().to_string();
        let price = l
            .list_unit_price
            .map(|p| p.normalize().to_string())
            .unwrap_or_default();
        let list = l.list_cost.normalize().to_string();
        let contracted = l.contracted_cost.normalize().to_string();
        let billed = l.billed_cost.normalize().to_string();
        let version = l.version.to_string();
        // Service, model, key and book come from tenants or books: guarded as text.
        let row = csv_record([
            (start.as_str(), false),
            (end.as_str(), false),
            (account.as_str(), false),
            (category, false),
            (l.service.as_str(), true),
            (l.model.as_str(), true),
            (l.key.as_str(), true),
            (quantity.as_str(), false),
            (price.as_str(), false),
            (list.as_str(), false),
            (contracted.as_str(), false),
            (billed.as_str(), false),
            (l.currency.as_str(), false),
            (l.book.as_str(), true),
            (version.as_str(), false),
        ]);
        self.out.write_all(row.as_bytes())
    }

    /// Flushes and gives the writer back.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal::Decimal;

    #[test]
    fn a_line_is_a_row_and_tenant_text_is_quoted_and_guarded() {
        let line = CostLine {
            account: "acme/cn".parse().unwrap(),
            charge_period_start: "2026-11-01T00:00:00Z".parse().unwrap(),
            charge_period_end: "2026-11-01T01:00:00Z".parse().unwrap(),
            category: ChargeCategory::Usage,
            service: "llm.chat".into(),
            model: "=cmd,\"x\"".into(),
            key: "text.input".into(),
            quantity: Decimal::new(1000, 0),
            list_unit_price: Some(Decimal::new(25, 7)),
            list_cost: Decimal::new(25, 4),
            contracted_cost: Decimal::new(2250, 7),
            billed_cost: Decimal::new(2250, 7),
            currency: "USD".parse().unwrap(),
            book: "list".into(),
            version: 2,
        };
        let mut w = UsageWriter::new(Vec::new()).unwrap();
        w.write(&line).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let mut rows = text.split("\r\n");
        assert_eq!(rows.next().unwrap(), USAGE_COLUMNS.join(","));
        assert_eq!(
            rows.next().unwrap(),
            "2026-11-01T00:00:00Z,2026-11-01T01:00:00Z,acme/cn,usage,llm.chat,\"'=cmd,\"\"x\"\"\",text.input,1000,0.0000025,0.0025,0.000225,0.000225,USD,list,2"
        );
    }
}
