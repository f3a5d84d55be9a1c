//! Reconciliation: a provider's usage export against what the gateway recorded.
//!
//! Parsers turn each provider's export into [`ProviderUsage`] rows in the ledger's own
//! token keys, so both sides are compared key by key:
//!
//! - [`parse_openai`]: OpenAI's organization usage API for completions. Its
//!   `input_tokens` includes cached and audio input; the parts are split out the way the
//!   gateway splits a response's usage, and a part larger than the whole is an error,
//!   never clamped to zero.
//! - [`parse_anthropic`]: Anthropic's usage report for messages, whose input is already
//!   split (uncached, cache reads, cache writes by lifetime).
//! - [`parse_csv`]: a generic CSV of day × model × input/output tokens, optionally cost.
//!
//! [`compare`] then reports, per UTC day, model and key, both counts, the difference
//! and whether it is beyond a [`Tolerance`]. Everything is pure: no IO, no clock.

use ciyuan_core::Currency;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::jiff::civil::Date;
use ciyuan_core::jiff::tz::TimeZone;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Fresh (uncached) text input.
pub const TEXT_INPUT: &str = "text.input";
/// Text input read from the provider's prompt cache.
pub const TEXT_CACHED_INPUT: &str = "text.cached_input";
/// Text input written to the cache (Anthropic's five-minute lifetime).
pub const TEXT_CACHE_WRITE: &str = "text.cache_write";
/// Text input written to the cache with a one-hour lifetime.
pub const TEXT_CACHE_WRITE_1H: &str = "text.cache_write_1h";
/// Text output, reasoning included (providers' exports do not split it).
pub const TEXT_OUTPUT: &str = "text.output";
/// Audio input.
pub const AUDIO_INPUT: &str = "audio.input";
/// Audio output.
pub const AUDIO_OUTPUT: &str = "audio.output";

/// Every key a provider export is compared on.
pub const KEYS: [&str; 7] = [
    TEXT_INPUT,
    TEXT_CACHED_INPUT,
    TEXT_CACHE_WRITE,
    TEXT_CACHE_WRITE_1H,
    TEXT_OUTPUT,
    AUDIO_INPUT,
    AUDIO_OUTPUT,
];

/// The largest token count a row or a sum may hold. Chosen so that any difference of
/// two counts is still exact in a [`Decimal`] (whose mantissa holds 96 bits), which the
/// relative tolerance is computed in.
pub const MAX_TOKENS: i128 = 1_000_000_000_000_000_000_000_000_000;

/// The reconciliation key a ledger token key is compared under, or `None` for keys no
/// provider export reports (measures, requests, images). Providers count reasoning in
/// their output, so the ledger's `text.reasoning` is compared as `text.output`: the
/// lead sums recorded usage through this before calling [`compare`].
pub fn reconciled_key(ledger_key: &str) -> Option<&'static str> {
    match ledger_key {
        "text.reasoning" => Some(TEXT_OUTPUT),
        k => KEYS.iter().copied().find(|known| *known == k),
    }
}

/// Tokens of one key, model and UTC day, from a provider's export or from the ledger.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProviderUsage {
    /// The UTC day of the provider's bucket.
    pub day: Date,
    /// The model as the provider names it.
    pub model: String,
    /// One of [`KEYS`].
    pub key: String,
    /// How many tokens.
    pub tokens: i128,
}

/// The cost of one model and UTC day in one currency, from a generic CSV's `cost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCost {
    /// The UTC day of the row.
    pub day: Date,
    /// The model.
    pub model: String,
    /// The summed cost, exact as written.
    pub amount: Decimal,
    /// Its currency.
    pub currency: Currency,
}

/// What a generic CSV holds: usage rows and, where it has a `cost` column, costs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CsvUsage {
    /// Tokens per (day, model, key), summed, in that order.
    pub usage: Vec<ProviderUsage>,
    /// Costs per (day, model, currency), summed, in that order; empty without `cost`.
    pub costs: Vec<ProviderCost>,
}

/// Why an export cannot be read: where (`at`: a bucket, result or row), which field,
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: `{field}`: {problem}")]
pub struct ImportError {
    /// Where in the export: `bucket 3 (2026-11-02T00:00:00Z), result 1 (gpt-4o)`,
    /// `row 7`, `document`.
    pub at: String,
    /// The field (dotted for nested ones).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl ImportError {
    fn new(at: impl fmt::Display, field: &str, problem: impl fmt::Display) -> Self {
        ImportError {
            at: at.to_string(),
            field: field.to_owned(),
            problem: problem.to_string(),
        }
    }
}

/// Rows summed per (day, model, key); zero sums are dropped (an absent row means zero).
#[derive(Default)]
struct Sums(BTreeMap<(Date, String, &'static str), i128>);

impl Sums {
    fn add(
        &mut self,
        day: Date,
        model: &str,
        key: &'static str,
        tokens: i128,
        at: &dyn fmt::Display,
    ) -> Result<(), ImportError> {
        let sum = self.0.entry((day, model.to_owned(), key)).or_insert(0);
        *sum = sum
            .checked_add(tokens)
            .filter(|s| s.abs() <= MAX_TOKENS)
            .ok_or_else(|| {
                ImportError::new(at, key, format!("the day's sum exceeds {MAX_TOKENS}"))
            })?;
        Ok(())
    }

    fn into_rows(self) -> Vec<ProviderUsage> {
        self.0
            .into_iter()
            .filter(|(_, tokens)| *tokens != 0)
            .map(|((day, model, key), tokens)| ProviderUsage {
                day,
                model,
                key: key.to_owned(),
                tokens,
            })
            .collect()
    }
}

/// The pages of a JSON export: one page object or an array of them.
fn pages(text: &str) -> Result<Vec<Map<String, Value>>, ImportError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| ImportError::new("document", "", format!("not JSON: {e}")))?;
    let list = match doc {
        Value::Array(list) => list,
        page => vec![page],
    };
    list.into_iter()
        .enumerate()
        .map(|(i, page)| match page {
            Value::Object(map) => Ok(map),
            other => Err(ImportError::new(
                format_args!("page {i}"),
                "",
                format!("expected an object, found {}", kind(&other)),
            )),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn array<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    at: &dyn fmt::Display,
) -> Result<&'a [Value], ImportError> {
    match obj.get(field) {
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(ImportError::new(
            at,
            field,
            format!("expected an array, found {}", kind(other)),
        )),
        None => Err(ImportError::new(at, field, "missing")),
    }
}

fn object<'a>(v: &'a Value, at: &dyn fmt::Display) -> Result<&'a Map<String, Value>, ImportError> {
    match v {
        Value::Object(map) => Ok(map),
        other => Err(ImportError::new(
            at,
            "",
            format!("expected an object, found {}", kind(other)),
        )),
    }
}

/// A token count: a non-negative integer. `required` fields must be present; optional
/// ones absent or null count zero (the APIs send null for what they do not break out).
fn count(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    at: &dyn fmt::Display,
) -> Result<i128, ImportError> {
    match obj.get(field) {
        None | Some(Value::Null) if !required => Ok(0),
        None | Some(Value::Null) => Err(ImportError::new(at, field, "missing")),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(i128::from(v)),
            None => Err(ImportError::new(
                at,
                field,
                format!("{n} is not a non-negative integer"),
            )),
        },
        Some(other) => Err(ImportError::new(
            at,
            field,
            format!("expected a token count, found {}", kind(other)),
        )),
    }
}

fn model<'a>(obj: &'a Map<String, Value>, at: &dyn fmt::Display) -> Result<&'a str, ImportError> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(m),
        Some(Value::String(_)) => Err(ImportError::new(at, "model", "empty")),
        None | Some(Value::Null) => Err(ImportError::new(
            at,
            "model",
            "missing: the export must be grouped by model",
        )),
        Some(other) => Err(ImportError::new(
            at,
            "model",
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

/// The UTC day of a bucket, refusing a bucket that spans two UTC days (its tokens
/// could belong to either, and reconciliation is per day).
fn bucket_day(
    start: Timestamp,
    end: Option<Timestamp>,
    end_field: &str,
    at: &dyn fmt::Display,
) -> Result<Date, ImportError> {
    let day = start.to_zoned(TimeZone::UTC).date();
    if let Some(end) = end {
        if end <= start {
            return Err(ImportError::new(
                at,
                end_field,
                format!("{end} is not after the bucket's start {start}"),
            ));
        }
        let last = end - ciyuan_core::jiff::SignedDuration::from_nanos(1);
        if last.to_zoned(TimeZone::UTC).date() != day {
            return Err(ImportError::new(
                at,
                end_field,
                format!(
                    "the bucket {start}..{end} spans more than one UTC day: export daily or hourly buckets"
                ),
            ));
        }
    }
    Ok(day)
}

fn unix_seconds(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    at: &dyn fmt::Display,
) -> Result<Option<Timestamp>, ImportError> {
    match obj.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ImportError::new(at, field, "missing")),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|s| Timestamp::from_second(s).ok())
            .map(Some)
            .ok_or_else(|| {
                ImportError::new(at, field, format!("{n} is not a unix time in seconds"))
            }),
        Some(other) => Err(ImportError::new(
            at,
            field,
            format!("expected unix seconds, found {}", kind(other)),
        )),
    }
}

fn rfc3339(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    at: &dyn fmt::Display,
) -> Result<Option<Timestamp>, ImportError> {
    match obj.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ImportError::new(at, field, "missing")),
        Some(Value::String(s)) => s.parse::<Timestamp>().map(Some).map_err(|e| {
            ImportError::new(at, field, format!("{s:?} is not an RFC 3339 time: {e}"))
        }),
        Some(other) => Err(ImportError::new(
            at,
            field,
            format!("expected an RFC 3339 time, found {}", kind(other)),
        )),
    }
}

/// Reads OpenAI's `/v1/organization/usage/completions` export (one page, or a JSON
/// array of pages) grouped by model, into rows summed per (UTC day, model, key).
///
/// `input_tokens` includes cached and audio input, so fresh text input is
/// `input_tokens − input_cached_tokens − input_audio_tokens`; likewise text output is
/// `output_tokens − output_audio_tokens`, as the gateway splits a response's usage. A
/// negative part is an error naming the bucket and model.
pub fn parse_openai(text: &str) -> Result<Vec<ProviderUsage>, ImportError> {
    let mut sums = Sums::default();
    for (p, page) in pages(text)?.iter().enumerate() {
        let page_at = format!("page {p}");
        for (b, bucket) in array(page, "data", &page_at)?.iter().enumerate() {
            let bucket_at = format!("page {p} bucket {b}");
            let bucket = object(bucket, &bucket_at)?;
            let start = unix_seconds(bucket, "start_time", true, &bucket_at)?;
            let end = unix_seconds(bucket, "end_time", false, &bucket_at)?;
            let Some(start) = start else {
                return Err(ImportError::new(&bucket_at, "start_time", "missing"));
            };
            let bucket_at = format!("page {p} bucket {b} ({start})");
            let day = bucket_day(start, end, "end_time", &bucket_at)?;
            for (r, result) in array(bucket, "results", &bucket_at)?.iter().enumerate() {
                let at0 = format!("{bucket_at} result {r}");
                let result = object(result, &at0)?;
                let model = model(result, &at0)?;
                let at = format!("{at0} ({model})");
                let input = count(result, "input_tokens", true, &at)?;
                let cached = count(result, "input_cached_tokens", false, &at)?;
                let audio_in = count(result, "input_audio_tokens", false, &at)?;
                let output = count(result, "output_tokens", true, &at)?;
                let audio_out = count(result, "output_audio_tokens", false, &at)?;
                let fresh = input - cached - audio_in;
                if fresh < 0 {
                    return Err(ImportError::new(
                        &at,
                        "input_tokens",
                        format!(
                            "{input} is less than input_cached_tokens {cached} + input_audio_tokens {audio_in}"
                        ),
                    ));
                }
                let text_out = output - audio_out;
                if text_out < 0 {
                    return Err(ImportError::new(
                        &at,
                        "output_tokens",
                        format!("{output} is less than output_audio_tokens {audio_out}"),
                    ));
                }
                for (key, tokens) in [
                    (TEXT_INPUT, fresh),
                    (TEXT_CACHED_INPUT, cached),
                    (AUDIO_INPUT, audio_in),
                    (TEXT_OUTPUT, text_out),
                    (AUDIO_OUTPUT, audio_out),
                ] {
                    sums.add(day, model, key, tokens, &at)?;
                }
            }
        }
    }
    Ok(sums.into_rows())
}

/// Reads Anthropic's `/v1/organizations/usage_report/messages` export (one page, or a
/// JSON array of pages) grouped by model, into rows summed per (UTC day, model, key):
/// `uncached_input_tokens` is `text.input`, `cache_read_input_tokens`
/// `text.cached_input`, `cache_creation.ephemeral_5m_input_tokens` `text.cache_write`,
/// `cache_creation.ephemeral_1h_input_tokens` `text.cache_write_1h`, `output_tokens`
/// `text.output`.
pub fn parse_anthropic(text: &str) -> Result<Vec<ProviderUsage>, ImportError> {
    let mut sums = Sums::default();
    for (p, page) in pages(text)?.iter().enumerate() {
        let page_at = format!("page {p}");
        for (b, bucket) in array(page, "data", &page_at)?.iter().enumerate() {
            let bucket_at = format!("page {p} bucket {b}");
            let bucket = object(bucket, &bucket_at)?;
            let Some(start) = rfc3339(bucket, "starting_at", true, &bucket_at)? else {
                return Err(ImportError::new(&bucket_at, "starting_at", "missing"));
            };
            let end = rfc3339(bucket, "ending_at", false, &bucket_at)?;
            let bucket_at = format!("page {p} bucket {b} ({start})");
            let day = bucket_day(start, end, "ending_at", &bucket_at)?;
            for (r, result) in array(bucket, "results", &bucket_at)?.iter().enumerate() {
                let at0 = format!("{bucket_at} result {r}");
                let result = object(result, &at0)?;
                let model = model(result, &at0)?;
                let at = format!("{at0} ({model})");
                let (write_5m, write_1h) = match result.get("cache_creation") {
                    None | Some(Value::Null) => (0, 0),
                    Some(Value::Object(cc)) => (
                        count(cc, "ephemeral_5m_input_tokens", false, &at)
                            .map_err(|e| nested(e, "cache_creation"))?,
                        count(cc, "ephemeral_1h_input_tokens", false, &at)
                            .map_err(|e| nested(e, "cache_creation"))?,
                    ),
                    Some(other) => {
                        return Err(ImportError::new(
                            &at,
                            "cache_creation",
                            format!("expected an object, found {}", kind(other)),
                        ));
                    }
                };
                for (key, tokens) in [
                    (
                        TEXT_INPUT,
                        count(result, "uncached_input_tokens", true, &at)?,
                    ),
                    (
                        TEXT_CACHED_INPUT,
                        count(result, "cache_read_input_tokens", false, &at)?,
                    ),
                    (TEXT_CACHE_WRITE, write_5m),
                    (TEXT_CACHE_WRITE_1H, write_1h),
                    (TEXT_OUTPUT, count(result, "output_tokens", true, &at)?),
                ] {
                    sums.add(day, model, key, tokens, &at)?;
                }
            }
        }
    }
    Ok(sums.into_rows())
}

fn nested(mut e: ImportError, parent: &str) -> ImportError {
    e.field = format!("{parent}.{}", e.field);
    e
}

/// Splits one CSV record into fields (RFC 4180 quoting: `"a,b"`, `""` for a quote).
fn csv_fields(line: &str, at: &dyn fmt::Display) -> Result<Vec<String>, ImportError> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            (false, '"') => {
                return Err(ImportError::new(
                    at,
                    "",
                    format!("a quote inside the unquoted field {field:?}"),
                ));
            }
            (false, c) if was_quoted => {
                return Err(ImportError::new(
                    at,
                    "",
                    format!("{c:?} after a closing quote"),
                ));
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err(ImportError::new(at, "", "an unclosed quote"));
    }
    fields.push(field);
    Ok(fields)
}

const CSV_COLUMNS: [&str; 7] = [
    "day",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost",
    "currency",
];

/// Reads a generic CSV export: a header naming `day`, `model`, `input_tokens`,
/// `output_tokens` and optionally `cached_input_tokens`, `cost` and `currency`, in any
/// order; one row per UTC day (`YYYY-MM-DD`) and model. `input_tokens` is fresh
/// (uncached) input, as in Anthropic's exports: cached input goes in
/// `cached_input_tokens`. A `cost` needs a `currency` (ISO 4217) on its row. A UTF-8
/// byte-order mark, CRLF line ends and blank lines are accepted; unknown columns are
/// refused so a misnamed column is never silently read as zero.
pub fn parse_csv(text: &str) -> Result<CsvUsage, ImportError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(ImportError::new(
            "row 1",
            "",
            "no header: the file is empty",
        ));
    };
    let header = csv_fields(header, &"header")?;
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, name) in header.iter().enumerate() {
        let name = name.trim();
        let Some(known) = CSV_COLUMNS.iter().copied().find(|c| *c == name) else {
            return Err(ImportError::new(
                "header",
                name,
                format!("unknown column; the columns are {}", CSV_COLUMNS.join(", ")),
            ));
        };
        if index.insert(known, i).is_some() {
            return Err(ImportError::new("header", name, "named twice"));
        }
    }
    for required in &CSV_COLUMNS[..4] {
        if !index.contains_key(required) {
            return Err(ImportError::new("header", required, "missing column"));
        }
    }
    if index.contains_key("cost") != index.contains_key("currency") {
        return Err(ImportError::new(
            "header",
            if index.contains_key("cost") {
                "currency"
            } else {
                "cost"
            },
            "`cost` and `currency` go together",
        ));
    }

    let mut sums = Sums::default();
    let mut costs: BTreeMap<(Date, String, Currency), Decimal> = BTreeMap::new();
    for (n, line) in lines {
        let at = format!("row {n}");
        let fields = csv_fields(line, &at)?;
        if fields.len() != header.len() {
            return Err(ImportError::new(
                &at,
                "",
                format!(
                    "{} fields where the header has {}",
                    fields.len(),
                    header.len()
                ),
            ));
        }
        let get = |c: &str| index.get(c).map(|&i| fields[i].trim());
        let day_text = get("day").unwrap_or_default();
        let day: Date = day_text.parse().map_err(|e| {
            ImportError::new(
                &at,
                "day",
                format!("{day_text:?} is not a YYYY-MM-DD date: {e}"),
            )
        })?;
        if day_text.len() != 10 {
            return Err(ImportError::new(
                &at,
                "day",
                format!("{day_text:?} is not a YYYY-MM-DD date"),
            ));
        }
        let model = get("model").unwrap_or_default();
        if model.is_empty() {
            return Err(ImportError::new(&at, "model", "empty"));
        }
        let at = format!("{at} ({day}, {model})");
        let tokens = |column: &str| -> Result<i128, ImportError> {
            match get(column) {
                None | Some("") if column == "cached_input_tokens" => Ok(0),
                None | Some("") => Err(ImportError::new(&at, column, "empty")),
                Some(t) => t.parse::<u64>().map(i128::from).map_err(|_| {
                    ImportError::new(&at, column, format!("{t:?} is not a non-negative integer"))
                }),
            }
        };
        for (key, column) in [
            (TEXT_INPUT, "input_tokens"),
            (TEXT_CACHED_INPUT, "cached_input_tokens"),
            (TEXT_OUTPUT, "output_tokens"),
        ] {
            let t = tokens(column)?;
            sums.add(day, model, key, t, &at)?;
        }
        match (get("cost"), get("currency")) {
            (Some(""), Some("")) | (None, None) => {}
            (Some(cost), Some(currency)) => {
                let amount: Decimal = cost.parse().map_err(|e| {
                    ImportError::new(
                        &at,
                        "cost",
                        format!("{cost:?} is not a decimal amount: {e}"),
                    )
                })?;
                let currency: Currency = currency
                    .parse()
                    .map_err(|e| ImportError::new(&at, "currency", format!("{currency:?}: {e}")))?;
                let sum = costs
                    .entry((day, model.to_owned(), currency))
                    .or_insert(Decimal::ZERO);
                *sum = sum.checked_add(amount).ok_or_else(|| {
                    ImportError::new(&at, "cost", "the day's sum overflows a decimal")
                })?;
            }
            (Some(_), _) => {
                return Err(ImportError::new(
                    &at,
                    "currency",
                    "empty where `cost` is given",
                ));
            }
            (_, Some(_)) => {
                return Err(ImportError::new(
                    &at,
                    "cost",
                    "empty where `currency` is given",
                ));
            }
        }
    }
    Ok(CsvUsage {
        usage: sums.into_rows(),
        costs: costs
            .into_iter()
            .map(|((day, model, currency), amount)| ProviderCost {
                day,
                model,
                amount,
                currency,
            })
            .collect(),
    })
}

/// How far the provider's count may be from ours before it is a finding: a difference
/// is beyond tolerance only when it exceeds *both* the relative and the absolute bound
/// (so tiny counts do not trip the relative one, nor huge ones the absolute one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tolerance {
    /// A fraction of the recorded count: `0.01` is 1%.
    pub relative: Decimal,
    /// Tokens.
    pub absolute: i128,
}

/// One (day, model, key): both counts and how far apart they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The UTC day.
    pub day: Date,
    /// The model.
    pub model: String,
    /// The key.
    pub key: String,
    /// The provider's count; `None` where the export has no such row.
    pub provider: Option<i128>,
    /// What the gateway recorded; `None` where it recorded no such row.
    pub recorded: Option<i128>,
    /// `provider − recorded` (an absent side counts zero): positive when the provider
    /// counts more than we recorded.
    pub difference: i128,
    /// `difference / recorded`, rounded to six decimal places for reading (the
    /// tolerance decision is exact); `None` where nothing was recorded.
    pub relative_difference: Option<Decimal>,
    /// Whether the difference exceeds both bounds of the [`Tolerance`].
    pub beyond_tolerance: bool,
}

/// One key's totals over the whole comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTotal {
    /// The key.
    pub key: String,
    /// The provider's total.
    pub provider: i128,
    /// The recorded total.
    pub recorded: i128,
    /// `provider − recorded`.
    pub difference: i128,
}

/// The counts of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// How many (day, model, key) were compared.
    pub rows_compared: usize,
    /// How many of them are beyond tolerance.
    pub beyond_tolerance: usize,
    /// How many are on the provider's side only.
    pub provider_only: usize,
    /// How many are on the recorded side only.
    pub recorded_only: usize,
    /// Totals per key, in key order.
    pub totals: Vec<KeyTotal>,
}

/// The result of comparing a provider's export with what was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Every (day, model, key) present on either side, in that order.
    pub findings: Vec<Finding>,
    /// The counts.
    pub summary: Summary,
}

impl Reconciliation {
    /// The findings beyond tolerance, in (day, model, key) order.
    pub fn beyond_tolerance(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.beyond_tolerance)
    }
}

fn summed(rows: &[ProviderUsage], side: &str) -> BTreeMap<(Date, String, String), i128> {
    let mut sums: BTreeMap<(Date, String, String), i128> = BTreeMap::new();
    for row in rows {
        let sum = sums
            .entry((row.day, row.model.clone(), row.key.clone()))
            .or_insert(0);
        *sum += row.tokens;
        // The parsers bound every count; recorded sums come from the ledger. A count
        // this large is a defect upstream, and the exact tolerance test relies on it.
        assert!(
            sum.abs() <= MAX_TOKENS,
            "{side} tokens of {} {} {} exceed {MAX_TOKENS}",
            row.day,
            row.model,
            row.key
        );
    }
    sums
}

fn decimal(v: i128) -> Decimal {
    // |v| ≤ 2 × MAX_TOKENS < 2^96, asserted by `summed`.
    Decimal::from_i128_with_scale(v, 0)
}

/// Compares a provider's rows with the recorded rows per (day, model, key). Rows
/// repeating a (day, model, key) on one side are summed first; a key on one side only
/// is compared against zero.
///
/// # Panics
/// When a side's sum for one (day, model, key) exceeds [`MAX_TOKENS`] in magnitude, or
/// when the tolerance is negative: both are defects of the caller, not data to
/// reconcile.
pub fn compare(
    provider: &[ProviderUsage],
    recorded: &[ProviderUsage],
    tolerance: Tolerance,
) -> Reconciliation {
    assert!(
        tolerance.relative >= Decimal::ZERO && tolerance.absolute >= 0,
        "a tolerance is never negative: {tolerance:?}"
    );
    let ours = summed(recorded, "recorded");
    let theirs = summed(provider, "provider");
    let mut keys: Vec<&(Date, String, String)> = ours.keys().chain(theirs.keys()).collect();
    keys.sort();
    keys.dedup();

    let mut totals: BTreeMap<&str, KeyTotal> = BTreeMap::new();
    let mut findings = Vec::with_capacity(keys.len());
    for k in keys {
        let p = theirs.get(k).copied();
        let r = ours.get(k).copied();
        let (pv, rv) = (p.unwrap_or(0), r.unwrap_or(0));
        let difference = pv - rv;
        let relative_difference =
            (rv != 0).then(|| (decimal(difference) / decimal(rv)).round_dp(6));
        let beyond_absolute = difference.abs() > tolerance.absolute;
        // |d| > rel × |r|, exact; a product beyond Decimal's range is larger than any
        // difference of two bounded counts, so the relative bound then holds.
        let beyond_relative = match tolerance.relative.checked_mul(decimal(rv.abs())) {
            Some(bound) => decimal(difference.abs()) > bound,
            None => false,
        };
        let t = totals.entry(k.2.as_str()).or_insert_with(|| KeyTotal {
            key: k.2.clone(),
            provider: 0,
            recorded: 0,
            difference: 0,
        });
        t.provider += pv;
        t.recorded += rv;
        t.difference += difference;
        findings.push(Finding {
            day: k.0,
            model: k.1.clone(),
            key: k.2.clone(),
            provider: p,
            recorded: r,
            difference,
            relative_difference,
            beyond_tolerance: beyond_absolute && beyond_relative,
        });
    }
    let summary = Summary {
        rows_compared: findings.len(),
        beyond_tolerance: findings.iter().filter(|f| f.beyond_tolerance).count(),
        provider_only: findings.iter().filter(|f| f.recorded.is_none()).count(),
        recorded_only: findings.iter().filter(|f| f.provider.is_none()).count(),
        totals: totals.into_values().collect(),
    };
    Reconciliation {
        tolerance,
        findings,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn d(s: &str) -> Date {
        s.parse().unwrap()
    }

    fn row(day: &str, model: &str, key: &str, tokens: i128) -> ProviderUsage {
        ProviderUsage {
            day: d(day),
            model: model.into(),
            key: key.into(),
            tokens,
        }
    }

    fn tol(relative: &str, absolute: i128) -> Tolerance {
        Tolerance {
            relative: relative.parse().unwrap(),
            absolute,
        }
    }

    const OPENAI: &str = include_str!("../tests/fixtures/reconcile/openai_completions.json");
    const ANTHROPIC: &str = include_str!("../tests/fixtures/reconcile/anthropic_messages.json");
    const CSV: &str = include_str!("../tests/fixtures/reconcile/generic.csv");

    #[test]
    fn openai_export_splits_cached_and_audio_out_of_input_and_sums_projects() {
        let rows = parse_openai(OPENAI).unwrap();
        let (g, a, m) = (
            "gpt-4o-2024-08-06",
            "gpt-4o-audio-preview-2024-12-17",
            "gpt-4o-mini-2024-07-18",
        );
        assert_eq!(
            rows,
            vec![
                // Two projects' results of one model and day are summed.
                row("2026-11-01", g, TEXT_CACHED_INPUT, 20_000),
                row("2026-11-01", g, TEXT_INPUT, 105_000),
                row("2026-11-01", g, TEXT_OUTPUT, 35_000),
                row("2026-11-01", a, AUDIO_INPUT, 12_000),
                row("2026-11-01", a, AUDIO_OUTPUT, 7_000),
                row("2026-11-01", a, TEXT_CACHED_INPUT, 1_000),
                row("2026-11-01", a, TEXT_INPUT, 2_000),
                row("2026-11-01", a, TEXT_OUTPUT, 2_000),
                row("2026-11-01", m, TEXT_CACHED_INPUT, 640_000),
                row("2026-11-01", m, TEXT_INPUT, 160_000),
                row("2026-11-01", m, TEXT_OUTPUT, 90_000),
                row("2026-11-02", g, TEXT_INPUT, 98_000),
                row("2026-11-02", g, TEXT_OUTPUT, 21_000),
                // The second page; an empty bucket gives nothing.
                row("2026-11-04", a, AUDIO_INPUT, 3_000),
                row("2026-11-04", a, AUDIO_OUTPUT, 2_000),
                row("2026-11-04", a, TEXT_INPUT, 1_000),
                row("2026-11-04", a, TEXT_OUTPUT, 500),
            ]
        );
    }

    #[test]
    fn openai_single_page_is_read_like_a_list_of_one() {
        let pages: Value = serde_json::from_str(OPENAI).unwrap();
        let first = serde_json::to_string(&pages[0]).unwrap();
        let one = parse_openai(&first).unwrap();
        let listed = parse_openai(&format!("[{first}]")).unwrap();
        assert_eq!(one, listed);
        assert!(one.iter().all(|r| r.day < d("2026-11-03")));
        assert_eq!(one.len(), 13);
    }

    #[test]
    fn anthropic_export_maps_cache_reads_and_writes_by_lifetime() {
        let rows = parse_anthropic(ANTHROPIC).unwrap();
        let (s, h, o) = (
            "claude-sonnet-4-20250514",
            "claude-3-5-haiku-20241022",
            "claude-opus-4-1-20250805",
        );
        assert_eq!(
            rows,
            vec![
                row("2026-11-01", h, TEXT_INPUT, 120_000),
                row("2026-11-01", h, TEXT_OUTPUT, 18_000),
                row("2026-11-01", s, TEXT_CACHE_WRITE, 17_000),
                row("2026-11-01", s, TEXT_CACHE_WRITE_1H, 8_000),
                row("2026-11-01", s, TEXT_CACHED_INPUT, 319_000),
                row("2026-11-01", s, TEXT_INPUT, 59_000),
                row("2026-11-01", s, TEXT_OUTPUT, 44_000),
                row("2026-11-02", s, TEXT_CACHE_WRITE, 11_000),
                row("2026-11-02", s, TEXT_CACHED_INPUT, 270_000),
                row("2026-11-02", s, TEXT_INPUT, 61_000),
                row("2026-11-02", s, TEXT_OUTPUT, 38_000),
                row("2026-11-03", o, TEXT_INPUT, 4_000),
                row("2026-11-03", o, TEXT_OUTPUT, 900),
            ]
        );
    }

    #[test]
    fn generic_csv_sums_rows_and_costs_and_reads_quotes_bom_and_crlf() {
        let got = parse_csv(CSV).unwrap();
        let (c, r, q) = ("deepseek-chat", "deepseek-reasoner", "qwen-plus,latest");
        assert_eq!(
            got.usage,
            vec![
                row("2026-11-01", c, TEXT_CACHED_INPUT, 50_000),
                row("2026-11-01", c, TEXT_INPUT, 160_000),
                row("2026-11-01", c, TEXT_OUTPUT, 32_000),
                row("2026-11-01", r, TEXT_INPUT, 20_000),
                row("2026-11-01", r, TEXT_OUTPUT, 12_000),
                row("2026-11-02", c, TEXT_CACHED_INPUT, 30_000),
                row("2026-11-02", c, TEXT_INPUT, 90_000),
                row("2026-11-02", c, TEXT_OUTPUT, 21_000),
                row("2026-11-02", q, TEXT_INPUT, 5_000),
                row("2026-11-02", q, TEXT_OUTPUT, 1_000),
            ]
        );
        let cny: Currency = "CNY".parse().unwrap();
        let cost = |day: &str, model: &str, amount: &str| ProviderCost {
            day: d(day),
            model: model.into(),
            amount: amount.parse().unwrap(),
            currency: cny,
        };
        assert_eq!(
            got.costs,
            vec![
                cost("2026-11-01", c, "0.1590"),
                cost("2026-11-01", r, "0.0680"),
                cost("2026-11-02", c, "0.0990"),
                cost("2026-11-02", q, "0.0060"),
                cost("2026-11-03", c, "0"),
            ]
        );
        // Exact decimal text, never through a float.
        assert_eq!(got.costs[0].amount.to_string(), "0.1590");
    }

    #[test]
    fn generic_csv_without_optional_columns_in_another_order() {
        let got = parse_csv("model,output_tokens,day,input_tokens\nm,7,2026-11-05,3\n").unwrap();
        assert_eq!(
            got.usage,
            vec![
                row("2026-11-05", "m", TEXT_INPUT, 3),
                row("2026-11-05", "m", TEXT_OUTPUT, 7),
            ]
        );
        assert!(got.costs.is_empty());
    }

    fn err(result: Result<impl fmt::Debug, ImportError>) -> ImportError {
        result.unwrap_err()
    }

    #[test]
    fn openai_negative_fresh_input_is_an_error_naming_bucket_and_model() {
        let page = r#"{"data":[{"start_time":1793491200,"end_time":1793577600,"results":[
            {"model":"gpt-4o","input_tokens":100,"input_cached_tokens":80,"input_audio_tokens":30,"output_tokens":1}]}]}"#;
        let e = err(parse_openai(page));
        assert_eq!(e.field, "input_tokens");
        assert!(e.at.contains("bucket 0") && e.at.contains("gpt-4o"), "{e}");
        assert!(e.at.contains("2026-11-01T00:00:00Z"), "{e}");
        assert!(e.problem.contains("80") && e.problem.contains("30"), "{e}");

        let page = page.replace(r#""input_cached_tokens":80"#, r#""input_cached_tokens":0"#);
        let page = page.replace(
            r#""output_tokens":1"#,
            r#""output_tokens":1,"output_audio_tokens":2"#,
        );
        let e = err(parse_openai(&page));
        assert_eq!(e.field, "output_tokens");
    }

    #[test]
    fn openai_bad_inputs_name_the_field() {
        let bucket = |results: &str| {
            format!(
                r#"{{"data":[{{"start_time":1793491200,"end_time":1793577600,"results":[{results}]}}]}}"#
            )
        };
        let cases: &[(&str, String)] = &[
            ("model", bucket(r#"{"input_tokens":1,"output_tokens":1}"#)),
            (
                "model",
                bucket(r#"{"model":null,"input_tokens":1,"output_tokens":1}"#),
            ),
            (
                "model",
                bucket(r#"{"model":"","input_tokens":1,"output_tokens":1}"#),
            ),
            ("input_tokens", bucket(r#"{"model":"m","output_tokens":1}"#)),
            (
                "input_tokens",
                bucket(r#"{"model":"m","input_tokens":-1,"output_tokens":1}"#),
            ),
            (
                "input_tokens",
                bucket(r#"{"model":"m","input_tokens":1.5,"output_tokens":1}"#),
            ),
            (
                "input_tokens",
                bucket(r#"{"model":"m","input_tokens":"1","output_tokens":1}"#),
            ),
            ("output_tokens", bucket(r#"{"model":"m","input_tokens":1}"#)),
            (
                "input_cached_tokens",
                bucket(
                    r#"{"model":"m","input_tokens":1,"output_tokens":1,"input_cached_tokens":true}"#,
                ),
            ),
            ("start_time", r#"{"data":[{"results":[]}]}"#.into()),
            (
                "start_time",
                r#"{"data":[{"start_time":"2026-11-01","results":[]}]}"#.into(),
            ),
            (
                "end_time",
                r#"{"data":[{"start_time":1793491200,"end_time":1793491200,"results":[]}]}"#.into(),
            ),
            // A bucket from noon to noon belongs to two UTC days.
            (
                "end_time",
                r#"{"data":[{"start_time":1793534400,"end_time":1793620800,"results":[]}]}"#.into(),
            ),
            ("results", r#"{"data":[{"start_time":1793491200}]}"#.into()),
            ("data", r#"{"object":"page"}"#.into()),
            ("data", r#"{"data":{}}"#.into()),
            ("", r#"[1]"#.into()),
            ("", "not json".into()),
        ];
        for (field, text) in cases {
            let e = err(parse_openai(text));
            assert_eq!(&e.field, field, "{text}: {e}");
            assert!(!e.problem.is_empty());
        }
        // Hourly buckets inside one day are fine.
        let hourly = r#"{"data":[{"start_time":1793534400,"end_time":1793538000,"results":[
            {"model":"m","input_tokens":5,"output_tokens":1}]}]}"#;
        assert_eq!(
            parse_openai(hourly).unwrap()[0],
            row("2026-11-01", "m", TEXT_INPUT, 5)
        );
    }

    #[test]
    fn anthropic_bad_inputs_name_the_field() {
        let bucket = |results: &str| {
            format!(
                r#"{{"data":[{{"starting_at":"2026-11-01T00:00:00Z","ending_at":"2026-11-02T00:00:00Z","results":[{results}]}}]}}"#
            )
        };
        let cases: &[(&str, String)] = &[
            ("model", bucket(r#"{"uncached_input_tokens":1,"output_tokens":1}"#)),
            ("uncached_input_tokens", bucket(r#"{"model":"c","output_tokens":1}"#)),
            ("output_tokens", bucket(r#"{"model":"c","uncached_input_tokens":1,"output_tokens":-3}"#)),
            ("cache_creation", bucket(r#"{"model":"c","uncached_input_tokens":1,"output_tokens":1,"cache_creation":5}"#)),
            ("cache_creation.ephemeral_1h_input_tokens", bucket(r#"{"model":"c","uncached_input_tokens":1,"output_tokens":1,"cache_creation":{"ephemeral_1h_input_tokens":"x"}}"#)),
            ("cache_read_input_tokens", bucket(r#"{"model":"c","uncached_input_tokens":1,"output_tokens":1,"cache_read_input_tokens":2.5}"#)),
            ("starting_at", r#"{"data":[{"results":[]}]}"#.into()),
            ("starting_at", r#"{"data":[{"starting_at":"yesterday","results":[]}]}"#.into()),
            ("starting_at", r#"{"data":[{"starting_at":1793491200,"results":[]}]}"#.into()),
            ("ending_at", r#"{"data":[{"starting_at":"2026-11-01T00:00:00Z","ending_at":"2026-11-03T00:00:00Z","results":[]}]}"#.into()),
        ];
        for (field, text) in cases {
            let e = err(parse_anthropic(text));
            assert_eq!(&e.field, field, "{text}: {e}");
        }
        let e = err(parse_anthropic(&bucket(
            r#"{"model":"c","uncached_input_tokens":1,"output_tokens":-3}"#,
        )));
        assert!(
            e.at.contains("result 0 (c)") && e.at.contains("2026-11-01T00:00:00Z"),
            "{e}"
        );
        // An offset other than Z is the same instant: its UTC day counts.
        let shanghai = r#"{"data":[{"starting_at":"2026-11-02T08:00:00+08:00","results":[
            {"model":"c","uncached_input_tokens":1,"output_tokens":0}]}]}"#;
        assert_eq!(
            parse_anthropic(shanghai).unwrap(),
            vec![row("2026-11-02", "c", TEXT_INPUT, 1)]
        );
    }

    #[test]
    fn csv_bad_inputs_name_the_field_and_row() {
        let cases: &[(&str, &str, &str)] = &[
            ("", "row 1", ""),
            ("model,input_tokens,output_tokens\n", "header", "day"),
            (
                "day,model,input_tokens,output_tokens,tokens\n",
                "header",
                "tokens",
            ),
            (
                "day,model,input_tokens,output_tokens,day\n",
                "header",
                "day",
            ),
            (
                "day,model,input_tokens,output_tokens,cost\n",
                "header",
                "currency",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-1,m,1,1\n",
                "row 2",
                "day",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-13-01,m,1,1\n",
                "row 2",
                "day",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,,1,1\n",
                "row 2",
                "model",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,m,-1,1\n",
                "row 2",
                "input_tokens",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,m,1.0,1\n",
                "row 2",
                "input_tokens",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,m,1,\n",
                "row 2",
                "output_tokens",
            ),
            (
                "day,model,input_tokens,output_tokens\n\n2026-11-01,m,1\n",
                "row 3",
                "",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,\"m,1,1\n",
                "row 2",
                "",
            ),
            (
                "day,model,input_tokens,output_tokens\n2026-11-01,m\"x,1,1\n",
                "row 2",
                "",
            ),
            (
                "day,model,input_tokens,output_tokens,cached_input_tokens\n2026-11-01,m,1,1,x\n",
                "row 2",
                "cached_input_tokens",
            ),
            (
                "day,model,input_tokens,output_tokens,cost,currency\n2026-11-01,m,1,1,0.1x,USD\n",
                "row 2",
                "cost",
            ),
            (
                "day,model,input_tokens,output_tokens,cost,currency\n2026-11-01,m,1,1,0.1,usd\n",
                "row 2",
                "currency",
            ),
            (
                "day,model,input_tokens,output_tokens,cost,currency\n2026-11-01,m,1,1,0.1,\n",
                "row 2",
                "currency",
            ),
            (
                "day,model,input_tokens,output_tokens,cost,currency\n2026-11-01,m,1,1,,USD\n",
                "row 2",
                "cost",
            ),
        ];
        for (text, at, field) in cases {
            let e = err(parse_csv(text));
            assert!(e.at.starts_with(at), "{text:?}: {e}");
            assert_eq!(&e.field, field, "{text:?}: {e}");
        }
    }

    #[test]
    fn a_sum_beyond_the_bound_is_an_error() {
        // No single field exceeds u64, so only a sum can pass the bound: feed the sums
        // directly rather than 5 × 10^7 rows of a file.
        let mut sums = Sums::default();
        let day = d("2026-11-01");
        sums.add(day, "m", TEXT_INPUT, MAX_TOKENS, &"row 2")
            .unwrap();
        sums.add(day, "m", TEXT_OUTPUT, MAX_TOKENS, &"row 2")
            .unwrap();
        let e = sums.add(day, "m", TEXT_INPUT, 1, &"row 3").unwrap_err();
        assert_eq!((e.at.as_str(), e.field.as_str()), ("row 3", TEXT_INPUT));
        assert!(e.problem.contains("exceeds"), "{e}");
        // The largest count a field may carry is read exactly.
        let max = u64::MAX;
        let got = parse_csv(&format!(
            "day,model,input_tokens,output_tokens\n2026-11-01,m,{max},0\n"
        ))
        .unwrap();
        assert_eq!(
            got.usage,
            vec![row("2026-11-01", "m", TEXT_INPUT, i128::from(max))]
        );
        let e = err(parse_csv(
            "day,model,input_tokens,output_tokens\n2026-11-01,m,18446744073709551616,0\n",
        ));
        assert_eq!(e.field, "input_tokens");
    }

    #[test]
    fn reconciled_key_folds_reasoning_into_output_and_skips_other_keys() {
        assert_eq!(reconciled_key("text.reasoning"), Some(TEXT_OUTPUT));
        for k in KEYS {
            assert_eq!(reconciled_key(k), Some(k));
        }
        assert_eq!(reconciled_key("measure.pages"), None);
        assert_eq!(reconciled_key("request"), None);
    }

    #[test]
    fn compare_reports_both_sides_differences_and_one_sided_keys_in_order() {
        let provider = vec![
            row("2026-11-02", "a", TEXT_INPUT, 1_000),
            row("2026-11-01", "b", TEXT_OUTPUT, 500),
            row("2026-11-01", "a", TEXT_INPUT, 10_300),
            row("2026-11-01", "a", TEXT_INPUT, 200),
        ];
        let recorded = vec![
            row("2026-11-01", "a", TEXT_INPUT, 10_000),
            row("2026-11-01", "a", TEXT_OUTPUT, 3_000),
            row("2026-11-02", "a", TEXT_INPUT, 1_000),
        ];
        let r = compare(&provider, &recorded, tol("0.01", 100));
        let got: Vec<_> = r
            .findings
            .iter()
            .map(|f| {
                (
                    f.day.to_string(),
                    f.model.as_str(),
                    f.key.as_str(),
                    f.provider,
                    f.recorded,
                    f.difference,
                    f.relative_difference.map(|x| x.to_string()),
                    f.beyond_tolerance,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "2026-11-01".into(),
                    "a",
                    TEXT_INPUT,
                    Some(10_500),
                    Some(10_000),
                    500,
                    Some("0.05".into()),
                    true
                ),
                (
                    "2026-11-01".into(),
                    "a",
                    TEXT_OUTPUT,
                    None,
                    Some(3_000),
                    -3_000,
                    Some("-1".into()),
                    true
                ),
                (
                    "2026-11-01".into(),
                    "b",
                    TEXT_OUTPUT,
                    Some(500),
                    None,
                    500,
                    None,
                    true
                ),
                (
                    "2026-11-02".into(),
                    "a",
                    TEXT_INPUT,
                    Some(1_000),
                    Some(1_000),
                    0,
                    Some("0".into()),
                    false
                ),
            ]
        );
        assert_eq!(r.summary.rows_compared, 4);
        assert_eq!(r.summary.beyond_tolerance, 3);
        assert_eq!(r.summary.provider_only, 1);
        assert_eq!(r.summary.recorded_only, 1);
        assert_eq!(
            r.summary.totals,
            vec![
                KeyTotal {
                    key: TEXT_INPUT.into(),
                    provider: 11_500,
                    recorded: 11_000,
                    difference: 500
                },
                KeyTotal {
                    key: TEXT_OUTPUT.into(),
                    provider: 500,
                    recorded: 3_000,
                    difference: -2_500
                },
            ]
        );
        assert_eq!(r.beyond_tolerance().count(), 3);
    }

    #[test]
    fn tolerance_needs_both_bounds_exceeded_and_is_exact_at_the_edge() {
        let rec = [row("2026-11-01", "a", TEXT_INPUT, 10_000)];
        let at = |p: i128, t: Tolerance| {
            compare(&[row("2026-11-01", "a", TEXT_INPUT, p)], &rec, t)
                .summary
                .beyond_tolerance
        };
        // 1% of 10 000 is 100: exactly 100 is within, 101 beyond (both ways).
        assert_eq!(at(10_100, tol("0.01", 0)), 0);
        assert_eq!(at(10_101, tol("0.01", 0)), 1);
        assert_eq!(at(9_899, tol("0.01", 0)), 1);
        // Beyond the relative bound but not the absolute one: within.
        assert_eq!(at(10_500, tol("0.01", 500)), 0);
        assert_eq!(at(10_501, tol("0.01", 500)), 1);
        // Beyond the absolute bound but not the relative one: within.
        assert_eq!(at(10_500, tol("0.05", 0)), 0);
        // Zero tolerance: any difference.
        assert_eq!(at(10_001, tol("0", 0)), 1);
        assert_eq!(at(10_000, tol("0", 0)), 0);
        // A huge relative tolerance whose bound leaves Decimal's range: never beyond it.
        let big = [row("2026-11-01", "a", TEXT_INPUT, MAX_TOKENS)];
        let r = compare(&[], &big, tol("79228162514264337593543950335", 0));
        assert_eq!(r.summary.beyond_tolerance, 0);
        assert_eq!(r.findings[0].difference, -MAX_TOKENS);
    }

    #[test]
    #[should_panic(expected = "never negative")]
    fn a_negative_tolerance_is_refused() {
        compare(&[], &[], tol("-0.01", 0));
    }

    #[test]
    #[should_panic(expected = "exceed")]
    fn recorded_counts_beyond_the_bound_are_refused() {
        let r = row("2026-11-01", "a", TEXT_INPUT, MAX_TOKENS);
        compare(&[], &[r.clone(), r], tol("0", 0));
    }

    #[test]
    fn reconciliation_round_trips_through_json() {
        let provider = parse_anthropic(ANTHROPIC).unwrap();
        let mut recorded = provider.clone();
        recorded[0].tokens += 5_000;
        recorded.pop();
        let r = compare(&provider, &recorded, tol("0.01", 100));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""day":"2026-11-01""#), "{json}");
        assert!(json.contains(r#""relative":"0.01""#), "{json}");
        let back: Reconciliation = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.summary.beyond_tolerance, 2);
    }

    #[test]
    fn a_fixture_reconciles_cleanly_against_itself() {
        for rows in [
            parse_openai(OPENAI).unwrap(),
            parse_anthropic(ANTHROPIC).unwrap(),
            parse_csv(CSV).unwrap().usage,
        ] {
            let r = compare(&rows, &rows, tol("0", 0));
            assert_eq!(r.summary.beyond_tolerance, 0);
            assert_eq!(r.summary.rows_compared, rows.len());
            assert!(r.summary.totals.iter().all(|t| t.difference == 0));
        }
    }

    const DAYS: usize = 4;
    const MODELS: [&str; 3] = ["gpt-4o", "claude-sonnet-4", "gpt-4o-audio-preview"];
    const CELLS: usize = DAYS * MODELS.len() * KEYS.len();

    fn cell(i: usize) -> (Date, &'static str, &'static str) {
        let day = d("2026-11-01")
            .checked_add(
                ciyuan_core::jiff::Span::new()
                    .days(i64::try_from(i / (MODELS.len() * KEYS.len())).unwrap()),
            )
            .unwrap();
        (
            day,
            MODELS[(i / KEYS.len()) % MODELS.len()],
            KEYS[i % KEYS.len()],
        )
    }

    /// The recorded rows (each split into two parts, so summing is exercised too) and
    /// each cell's recorded total.
    fn recorded_rows(counts: &[Option<u32>]) -> (Vec<ProviderUsage>, Vec<i128>) {
        let mut rows = Vec::new();
        for (i, c) in counts.iter().enumerate() {
            if let Some(c) = c {
                let (day, model, key) = cell(i);
                let c = i128::from(*c);
                rows.push(ProviderUsage {
                    day,
                    model: model.into(),
                    key: key.into(),
                    tokens: c / 3,
                });
                rows.push(ProviderUsage {
                    day,
                    model: model.into(),
                    key: key.into(),
                    tokens: c - c / 3,
                });
            }
        }
        let totals = counts.iter().map(|c| c.map_or(0, i128::from)).collect();
        (rows, totals)
    }

    fn export(totals: &[i128]) -> Vec<ProviderUsage> {
        totals
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != 0)
            .map(|(i, t)| {
                let (day, model, key) = cell(i);
                ProviderUsage {
                    day,
                    model: model.into(),
                    key: key.into(),
                    tokens: *t,
                }
            })
            .collect()
    }

    const RELATIVE: &str = "0.01";
    const ABSOLUTE: i128 = 100;

    /// The smallest difference beyond tolerance for a recorded count `r`.
    fn just_beyond(r: i128) -> i128 {
        ABSOLUTE.max(r / 100) + 1
    }

    proptest! {
        #[test]
        fn reconciliation_finds_every_injected_difference_and_none_in_a_clean_export(
            counts in proptest::collection::vec(proptest::option::of(0u32..2_000_000_000), CELLS),
            injected in proptest::sample::subsequence((0..CELLS).collect::<Vec<_>>(), 0..=12),
            extra in proptest::collection::vec(0i128..1_000_000, CELLS),
            how in proptest::collection::vec(0u8..3, CELLS),
            noise in proptest::collection::vec(any::<u32>(), CELLS),
        ) {
            let (recorded, totals) = recorded_rows(&counts);
            let tolerance = tol(RELATIVE, ABSOLUTE);

            // A clean export, exact or with noise within tolerance, gives no finding.
            let clean = compare(&export(&totals), &recorded, tolerance);
            prop_assert_eq!(clean.summary.beyond_tolerance, 0);
            prop_assert!(clean.findings.iter().all(|f| f.difference == 0));
            let noisy: Vec<i128> = totals.iter().zip(&noise).map(|(&t, &n)| {
                let room = ABSOLUTE.max(t / 100);
                let d = i128::from(n) % (room + 1);
                if n % 2 == 0 || t < d { t + d } else { t - d }
            }).collect();
            prop_assert_eq!(compare(&export(&noisy), &recorded, tolerance).summary.beyond_tolerance, 0);

            // k differences beyond tolerance: exactly those k are found.
            let mut dirty = totals.clone();
            for &i in &injected {
                let r = totals[i];
                let step = just_beyond(r) + extra[i];
                dirty[i] = match how[i] {
                    // Missing from the export altogether (when that is beyond tolerance).
                    0 if r > ABSOLUTE => 0,
                    1 if r >= step => r - step,
                    _ => r + step,
                };
            }
            let found = compare(&export(&dirty), &recorded, tolerance);
            let got: BTreeSet<(Date, String, String)> = found
                .beyond_tolerance()
                .map(|f| (f.day, f.model.clone(), f.key.clone()))
                .collect();
            let want: BTreeSet<(Date, String, String)> = injected
                .iter()
                .map(|&i| { let (d, m, k) = cell(i); (d, m.to_owned(), k.to_owned()) })
                .collect();
            prop_assert_eq!(found.summary.beyond_tolerance, injected.len());
            prop_assert_eq!(got, want);
            for f in found.beyond_tolerance() {
                prop_assert_eq!(f.difference, f.provider.unwrap_or(0) - f.recorded.unwrap_or(0));
            }
        }
    }
}
