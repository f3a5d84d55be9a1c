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
