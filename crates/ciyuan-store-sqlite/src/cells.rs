//! Hourly billing lines stored as cells: one row per node, hour, service and model,
//! holding all its lines (adjustment or not, priced key, unit price, currency, book,
//! version and four sums) in one blob, in the order the `Store` contract lists lines.
//!
//! An hour of a node and model holds a handful of lines (input, cached input, output,
//! and the rounding adjustment) sharing four of the ten key columns. As rows of their
//! own, an export of ten million lines stepped SQLite ten million times over fourteen
//! columns, most of its time; as cells it steps a third as often over five. The format is written by
//! hand because it is this module's alone: length-prefixed fields, checked on every
//! read, and a damaged blob is an error naming the cell, never a wrong line.

use ciyuan_core::ExactSum;
use ciyuan_store::StoreError;
use std::cmp::Ordering;

/// One line of a cell, borrowed from its blob: every text as the bytes stored (UTF-8
/// is checked by whoever reads it as text), the sums as decimal text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineBytes<'a> {
    /// An adjustment (a correction's, rounding, a credit), not usage.
    pub adjustment: bool,
    pub key: &'a [u8],
    /// The unit price's decimal text, empty where none.
    pub price: &'a [u8],
    pub currency: &'a [u8],
    pub book: &'a [u8],
    pub version: u32,
    /// Quantity, list, contracted and billed, as decimal text.
    pub sums: [&'a [u8]; 4],
}

impl LineBytes<'_> {
    /// The order of lines within a cell: the `Store` contract's order of the columns
    /// after the cell's (texts compared as bytes, as SQLite's BINARY collation does).
    pub fn order(&self, other: &LineBytes<'_>) -> Ordering {
        (
            self.adjustment,
            self.key,
            self.price,
            self.currency,
            self.book,
            self.version,
        )
            .cmp(&(
                other.adjustment,
                other.key,
                other.price,
                other.currency,
                other.book,
                other.version,
            ))
    }
}

/// The lines of a cell's blob, in stored order.
pub(crate) struct Lines<'a> {
    rest: &'a [u8],
}

/// Reads the lines of `blob`.
pub(crate) fn lines(blob: &[u8]) -> Lines<'_> {
    Lines { rest: blob }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("stored billing cell: {what}"))
}

impl<'a> Lines<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(corrupt(&format!("{what} cut short")));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn field(&mut self, what: &str) -> Result<&'a [u8], StoreError> {
        let len = self.take(2, what)?;
        let len = u16::from_le_bytes([len[0], len[1]]);
        self.take(usize::from(len), what)
    }

    fn line(&mut self) -> Result<LineBytes<'a>, StoreError> {
        let adjustment = match self.take(1, "adjustment")? {
            [0] => false,
            [1] => true,
            _ => return Err(corrupt("adjustment is neither 0 nor 1")),
        };
        let key = self.field("key")?;
        let price = self.field("unit price")?;
        let currency = self.field("currency")?;
        let book = self.field("book")?;
        let v = self.take(4, "version")?;
        let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        let sums = [
            self.field("quantity")?,
            self.field("list cost")?,
            self.field("contracted cost")?,
            self.field("billed cost")?,
        ];
        Ok(LineBytes {
            adjustment,
            key,
            price,
            currency,
            book,
            version,
            sums,
        })
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<LineBytes<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let line = self.line();
        if line.is_err() {
            // One error, then nothing: the rest cannot be framed.
            self.rest = &[];
        }
        Some(line)
    }
}

/// A line to write: its texts and exact sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedLine {
    pub adjustment: bool,
    pub key: String,
    pub price: String,
    pub currency: String,
    pub book: String,
    pub version: u32,
    pub sums: [ExactSum; 4],
}

impl OwnedLine {
    /// Its key fields as stored, for [`LineBytes::order`]: one order for lines being
    /// written and lines read back (two copies of it disagreed once, and the search
    /// in [`merge`] then misplaced adjustments).
    fn key(&self) -> LineBytes<'_> {
        LineBytes {
            adjustment: self.adjustment,
            key: self.key.as_bytes(),
            price: self.price.as_bytes(),
            currency: self.currency.as_bytes(),
            book: self.book.as_bytes(),
            version: self.version,
            sums: [&[]; 4],
        }
    }

    fn order(&self, other: &OwnedLine) -> Ordering {
        self.key().order(&other.key())
    }
}

fn put(out: &mut Vec<u8>, field: &[u8], what: &str) -> Result<(), StoreError> {
    let len = u16::try_from(field.len())
        .map_err(|_| StoreError::Backend(format!("a billing line's {what} is over 64 KiB")))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(field);
    Ok(())
}

/// The blob of `lines`, which must be in order and distinct.
fn encode(lines: &[OwnedLine]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(lines.len() * 80);
    for l in lines {
        out.push(u8::from(l.adjustment));
        put(&mut out, l.key.as_bytes(), "key")?;
        put(&mut out, l.price.as_bytes(), "unit price")?;
        put(&mut out, l.currency.as_bytes(), "currency")?;
        put(&mut out, l.book.as_bytes(), "book")?;
        out.extend_from_slice(&l.version.to_le_bytes());
        for (s, what) in l
            .sums
            .iter()
            .zip(["quantity", "list", "contracted", "billed"])
        {
            let text = s.to_decimal().map(|d| d.to_string()).ok_or_else(|| {
                StoreError::Backend(format!(
                    "a billing line's {what} ({s}) needs more than 28 digits"
                ))
            })?;
            put(&mut out, text.as_bytes(), what)?;
        }
    }
    Ok(out)
}

fn text(b: &[u8], what: &str) -> Result<String, StoreError> {
    String::from_utf8(b.to_vec()).map_err(|e| corrupt(&format!("{what}: {e}")))
}

fn sum(b: &[u8]) -> Result<ExactSum, StoreError> {
    let t = std::str::from_utf8(b).map_err(|e| corrupt(&format!("amount: {e}")))?;
    rust_decimal::Decimal::from_str_exact(t)
        .map(ExactSum::of)
        .map_err(|e| corrupt(&format!("amount {t:?}: {e}")))
}

/// The blob of the cell `stored` (none for a new cell) with `adds` added: a line of the
/// same key, price, currency, book and version has its sums added exactly; others are
/// put in order.
pub(crate) fn merge(stored: Option<&[u8]>, adds: Vec<OwnedLine>) -> Result<Vec<u8>, StoreError> {
    let mut all: Vec<OwnedLine> = Vec::new();
    let mut prev: Option<LineBytes<'_>> = None;
    for l in stored.map(lines).into_iter().flatten() {
        let l = l?;
        // The search below needs the stored order; a cell out of it is damaged.
        if prev.is_some_and(|p| p.order(&l) != Ordering::Less) {
            return Err(corrupt("lines out of order"));
        }
        prev = Some(l);
        all.push(OwnedLine {
            adjustment: l.adjustment,
            key: text(l.key, "key")?,
            price: text(l.price, "unit price")?,
            currency: text(l.currency, "currency")?,
            book: text(l.book, "book")?,
            version: l.version,
            sums: [
                sum(l.sums[0])?,
                sum(l.sums[1])?,
                sum(l.sums[2])?,
                sum(l.sums[3])?,
            ],
        });
    }
    for add in adds {
        match all.binary_search_by(|l| l.order(&add)) {
            Ok(at) => {
                let slot = &mut all[at].sums;
                for (s, a) in slot.iter_mut().zip(add.sums) {
                    *s = s.checked_add(a).ok_or_else(|| {
                        StoreError::Backend(format!("billing line {} overflows", add.key))
                    })?;
                }
            }
            Err(at) => all.insert(at, add),
        }
    }
    encode(&all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(key: &str, price: &str, version: u32, q: i64) -> OwnedLine {
        OwnedLine {
            adjustment: key == "rounding",
            key: key.into(),
            price: price.into(),
            currency: "CNY".into(),
            book: "list".into(),
            version,
            sums: [q, q * 2, q * 3, q * 4].map(|n| ExactSum::of(rust_decimal::Decimal::new(n, 3))),
        }
    }

    fn read(blob: &[u8]) -> Vec<(String, String, u32, Vec<String>)> {
        lines(blob)
            .map(|l| {
                let l = l.expect("line");
                (
                    String::from_utf8(l.key.to_vec()).expect("utf8"),
                    String::from_utf8(l.price.to_vec()).expect("utf8"),
                    l.version,
                    l.sums
                        .iter()
                        .map(|s| String::from_utf8(s.to_vec()).expect("utf8"))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn lines_are_kept_in_order_and_added_exactly() {
        let blob = merge(None, vec![line("text.output", "0.00001", 1, 5)]).expect("merge");
        let blob = merge(
            Some(&blob),
            vec![
                line("rounding", "", 1, 3),
                line("text.input", "0.0000025", 1, 7),
                line("text.output", "0.00001", 1, 5),
                line("text.output", "0.00001", 2, 1),
            ],
        )
        .expect("merge");
        let got = read(&blob);
        // Usage first, then adjustments.
        assert_eq!(
            got.iter().map(|l| (l.0.as_str(), l.2)).collect::<Vec<_>>(),
            [
                ("text.input", 1),
                ("text.output", 1),
                ("text.output", 2),
                ("rounding", 1)
            ]
        );
        assert_eq!(got[1].3, ["0.01", "0.02", "0.03", "0.04"]);
    }

    #[test]
    fn a_damaged_blob_is_an_error_not_a_line() {
        let blob = merge(None, vec![line("text.input", "1", 1, 1)]).expect("merge");
        for cut in 1..blob.len() {
            let results: Vec<_> = lines(&blob[..cut]).collect();
            assert!(
                results.iter().any(|r| r.is_err()),
                "cut at {cut} read as whole"
            );
        }
        let mut bad = blob.clone();
        bad[0] = 2;
        assert!(lines(&bad).any(|r| r.is_err()), "an adjustment flag of 2");
        let mut bad = blob.clone();
        bad[2] = 0xff;
        assert!(
            lines(&bad).any(|r| r.is_err()),
            "a key running past the end"
        );
        assert!(merge(Some(&[0, 1]), vec![]).is_err());
    }

    proptest! {
        /// However lines arrive, the cell holds each (key, price, version) once, in
        /// order, with the exact sum of what was added for it.
        #[test]
        fn merges_sum_exactly_in_order(
            adds in proptest::collection::vec(
                proptest::collection::vec((0usize..4, 0usize..3, 1u32..3, -1_000_000i64..1_000_000), 0..8),
                1..6,
            )
        ) {
            let keys = ["audio.input", "rounding", "text.input", "text.output"];
            let prices = ["", "0.0000025", "3"];
            let mut blob: Option<Vec<u8>> = None;
            let mut want: std::collections::BTreeMap<(bool, String, String, u32), i64> = Default::default();
            for batch in adds {
                let batch: Vec<_> = batch
                    .into_iter()
                    .map(|(k, p, v, q)| {
                        *want.entry((keys[k] == "rounding", keys[k].into(), prices[p].into(), v)).or_default() += q;
                        line(keys[k], prices[p], v, q)
                    })
                    .collect();
                // Lines of one batch come distinct, as a projection's sums are.
                let mut distinct: Vec<OwnedLine> = Vec::new();
                for l in batch {
                    match distinct.iter_mut().find(|d| d.order(&l) == Ordering::Equal) {
                        Some(d) => {
                            for (s, a) in d.sums.iter_mut().zip(l.sums) {
                                *s = s.checked_add(a).expect("sum");
                            }
                        }
                        None => distinct.push(l),
                    }
                }
                blob = Some(merge(blob.as_deref(), distinct).expect("merge"));
            }
            let blob = blob.expect("blob");
            let got = read(&blob);
            prop_assert_eq!(got.len(), want.len());
            for ((g, (k, want_q)), pair) in got.iter().zip(&want).zip(got.windows(2).map(Some).chain([None])) {
                prop_assert_eq!((&g.0, &g.1, g.2), (&k.1, &k.2, k.3));
                let q = rust_decimal::Decimal::from_str_exact(&g.3[0]).expect("decimal");
                prop_assert_eq!(q, rust_decimal::Decimal::new(*want_q, 3));
                if let Some(w) = pair {
                    let at = |l: &(String, String, u32, Vec<String>)| (l.0 == "rounding", l.0.clone(), l.1.clone(), l.2);
                    prop_assert!(at(&w[0]) < at(&w[1]));
                }
            }
        }
    }
}
