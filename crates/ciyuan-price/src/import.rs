//! Imports: LiteLLM's `model_prices_and_context_window.json` and the native TOML
//! format. Both read every number from its text, never through a float.

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, ClockTime, Currency, Direction, Modality, PriceBook, PriceError, PriceKey,
    PriceRule, PriceSource, Rounding, ServiceTier, Threshold, TimeWindow, UnitPrices,
    decimal_from_text,
};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Largest file an import reads. A book is one ledger entry, and the ledger's format
/// caps an entry at 16 MiB; LiteLLM's table of 4,242 models is 3 MB and makes an
/// 0.8 MB book.
pub const MAX_IMPORT_BYTES: usize = 16 << 20;

fn check_size(len: usize) -> Result<(), PriceError> {
    if len > MAX_IMPORT_BYTES {
        return Err(PriceError::new(
            "file",
            format!("{len} bytes is more than the {MAX_IMPORT_BYTES} an import reads"),
        ));
    }
    Ok(())
}

/// What an import produced: the rules, the book's header where the file gives it,
/// and the source (format, the file's SHA-256, the keys it could not map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// The book's name, when the file names it (TOML).
    pub name: Option<String>,
    /// The currency (USD for LiteLLM).
    pub currency: Currency,
    /// The rounding rule (the default for LiteLLM, which has none).
    pub rounding: Rounding,
    /// From when, when the file says (TOML).
    pub effective_from: Option<Timestamp>,
    /// The rules, in precedence order.
    pub rules: Vec<PriceRule>,
    /// Format, SHA-256 and unmapped keys (`key (N models)`).
    pub source: PriceSource,
    /// The tax the file declares (TOML).
    pub tax: Option<ciyuan_core::BookTax>,
}

impl Import {
    /// The book version this import becomes: `name` when given, else the file's;
    /// the file's `effective_from`, else `effective_from`. Checked.
    pub fn into_book(
        self,
        name: Option<&str>,
        version: u32,
        effective_from: Timestamp,
        set_by: Option<AccountPath>,
    ) -> Result<PriceBook, PriceError> {
        let name = match (name, self.name) {
            (Some(n), _) => n.to_string(),
            (None, Some(n)) => n,
            (None, None) => {
                return Err(PriceError::new(
                    "name",
                    "the file names no book: give the book's name",
                ));
            }
        };
        let book = PriceBook {
            tax: self.tax,
            name,
            version,
            currency: self.currency,
            effective_from: self.effective_from.unwrap_or(effective_from),
            rounding: self.rounding,
            source: Some(self.source),
            set_by,
            rules: self.rules,
        };
        book.check()?;
        Ok(book)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// LiteLLM's base cost keys (without threshold or tier suffix) and the ledger key
/// each prices; `None` is the per-request price.
fn litellm_base(key: &str) -> Option<Option<PriceKey>> {
    use Direction::*;
    use Modality::*;
    let t = |m, d| Some(Some(PriceKey::Tokens(m, d)));
    match key {
        "input_cost_per_token" => t(Text, Input),
        "output_cost_per_token" => t(Text, Output),
        "cache_read_input_token_cost" | "input_cost_per_token_cache_hit" => t(Text, CachedInput),
        // LiteLLM's plain cache-creation price is the 5-minute write; `_above_1hr`
        // is the one-hour write.
        "cache_creation_input_token_cost" => t(Text, CacheWrite),
        "cache_creation_input_token_cost_above_1hr" => t(Text, CacheWrite1h),
        "output_cost_per_reasoning_token" => t(Text, Reasoning),
        "input_cost_per_audio_token" => t(Audio, Input),
        "output_cost_per_audio_token" => t(Audio, Output),
        "cache_read_input_audio_token_cost" => t(Audio, CachedInput),
        "cache_creation_input_audio_token_cost" => t(Audio, CacheWrite),
        "input_cost_per_image_token" => t(Image, Input),
        "output_cost_per_image_token" => t(Image, Output),
        "cache_read_input_image_token_cost" => t(Image, CachedInput),
        "input_cost_per_video_token" => t(Video, Input),
        "output_cost_per_video_token" => t(Video, Output),
        "input_cost_per_request" => Some(None),
        _ => None,
    }
}

/// A cost key split into base, context threshold and tier:
/// `input_cost_per_token_above_200k_tokens_priority`.
fn litellm_key(key: &str) -> Option<(Option<PriceKey>, Option<u64>, ServiceTier)> {
    let (rest, tier) = [
        ("_batches", ServiceTier::Batch),
        ("_priority", ServiceTier::Priority),
        ("_flex", ServiceTier::Flex),
    ]
    .iter()
    .find_map(|(s, t)| key.strip_suffix(s).map(|r| (r, *t)))
    .unwrap_or((key, ServiceTier::Standard));
    let (base, threshold) = match rest
        .strip_suffix("k_tokens")
        .and_then(|r| r.rsplit_once("_above_"))
    {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, Some(n.parse::<u64>().ok()?.checked_mul(1000)?))
        }
        _ => (rest, None),
    };
    Some((litellm_base(base)?, threshold, tier))
}

fn is_cost_key(key: &str) -> bool {
    key.contains("cost") || key.ends_with("_pricing")
}

#[derive(Default)]
struct Draft {
    base: UnitPrices,
    per_request: Option<Decimal>,
    thresholds: BTreeMap<u64, UnitPrices>,
    windows: Vec<TimeWindow>,
}

impl Draft {
    fn is_empty(&self) -> bool {
        self.base.is_empty()
            && self.per_request.is_none()
            && self.thresholds.is_empty()
            && self.windows.is_empty()
    }
}

/// Providers bill reasoning tokens as output; LiteLLM names a reasoning price only
/// where it differs. The ledger keeps reasoning apart from output, so a price map
/// with an output price and no reasoning price gets the output price for reasoning.
fn reasoning_as_output(p: &mut UnitPrices) {
    let out = PriceKey::Tokens(Modality::Text, Direction::Output);
    let reasoning = PriceKey::Tokens(Modality::Text, Direction::Reasoning);
    if let Some(v) = p.get(&out).copied() {
        p.entry(reasoning).or_insert(v);
    }
}

fn number(field: &str, raw: &RawValue) -> Result<Decimal, PriceError> {
    let text = raw.get().trim();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(PriceError::new(field, format!("{text} is not a number")));
    }
    let d = decimal_from_text(text).map_err(|e| PriceError::new(field, e.why))?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(PriceError::new(field, format!("{d} is negative")));
    }
    Ok(d)
}

struct Unmapped(BTreeMap<String, u32>);

impl Unmapped {
    fn note(&mut self, key: impl Into<String>) {
        *self.0.entry(key.into()).or_insert(0) += 1;
    }
}

/// Inserts a price, noting a second, different price for the same key (two LiteLLM
/// names for one thing) instead of overwriting.
fn insert(prices: &mut UnitPrices, key: PriceKey, value: Decimal, name: &str, un: &mut Unmapped) {
    match prices.get(&key) {
        Some(v) if *v != value => un.note(format!("{name} (differs from another key for {key})")),
        Some(_) => {}
        None => {
            prices.insert(key, value);
        }
    }
}

#[derive(Deserialize)]
struct OffPeakWindow<'a> {
    #[serde(borrow)]
    hours_utc: &'a RawValue,
    #[serde(default)]
    weekdays: Vec<u8>,
}

fn off_peak(
    model: &str,
    raw: &RawValue,
    draft: &mut Draft,
    un: &mut Unmapped,
) -> Result<(), PriceError> {
    let field = format!("{model}.off_peak_pricing");
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get())
        .map_err(|e| PriceError::new(&field, format!("not an object: {e}")))?;
    let mut prices = UnitPrices::new();
    let mut windows = Vec::new();
    for (k, v) in &fields {
        match k.as_str() {
            "windows" => {
                windows = serde_json::from_str::<Vec<OffPeakWindow>>(v.get())
                    .map_err(|e| PriceError::new(format!("{field}.windows"), e.to_string()))?;
            }
            // Weekdays in one zone and hours in another: a window here has one zone.
            "weekday_timezone" => {
                un.note("off_peak_pricing (weekday_timezone)");
                return Ok(());
            }
            _ => match litellm_key(k) {
                Some((Some(key), None, ServiceTier::Standard)) => {
                    let d = number(&format!("{field}.{k}"), v)?;
                    insert(&mut prices, key, d, k, un);
                }
                _ => un.note(format!("off_peak_pricing.{k}")),
            },
        }
    }
    reasoning_as_output(&mut prices);
    for (i, w) in windows.iter().enumerate() {
        let wf = format!("{field}.windows[{i}].hours_utc");
        let ranges: Vec<String> = match serde_json::from_str::<Vec<String>>(w.hours_utc.get()) {
            Ok(v) => v,
            Err(_) => vec![
                serde_json::from_str::<String>(w.hours_utc.get())
                    .map_err(|e| PriceError::new(&wf, e.to_string()))?,
            ],
        };
        for r in ranges {
            let (from, to) = r
                .split_once('-')
                .ok_or_else(|| PriceError::new(&wf, format!("{r:?} is not HH:MM-HH:MM")))?;
            draft.windows.push(TimeWindow {
                from: from
                    .parse::<ClockTime>()
                    .map_err(|e| PriceError::new(&wf, e.to_string()))?,
                to: to
                    .parse::<ClockTime>()
                    .map_err(|e| PriceError::new(&wf, e.to_string()))?,
                time_zone: "UTC".into(),
                weekdays: w.weekdays.clone(),
                unit_prices: prices.clone(),
            });
        }
    }
    Ok(())
}

fn tiered(
    model: &str,
    raw: &RawValue,
    draft: &mut Draft,
    un: &mut Unmapped,
) -> Result<(), PriceError> {
    let field = format!("{model}.tiered_pricing");
    let tiers: Vec<BTreeMap<String, &RawValue>> = serde_json::from_str(raw.get())
        .map_err(|e| PriceError::new(&field, format!("not a list of objects: {e}")))?;
    // Tiers by the request's input size are context thresholds; tiers by anything
    // else (search results) have no ledger meaning.
    if tiers.iter().any(|t| !t.contains_key("range")) {
        un.note("tiered_pricing (without range)");
        return Ok(());
    }
    for (i, t) in tiers.iter().enumerate() {
        let tf = format!("{field}[{i}]");
        let range: Vec<&RawValue> = t
            .get("range")
            .map(|r| serde_json::from_str(r.get()))
            .transpose()
            .map_err(|e| PriceError::new(format!("{tf}.range"), e.to_string()))?
            .unwrap_or_default();
        let Some(lo) = range.first() else {
            return Err(PriceError::new(format!("{tf}.range"), "empty range"));
        };
        let lo = number(&format!("{tf}.range[0]"), lo)?;
        let lo = u64::try_from(lo.normalize())
            .ok()
            .filter(|_| lo.fract().is_zero())
            .ok_or_else(|| {
                PriceError::new(
                    format!("{tf}.range[0]"),
                    format!("{lo} is not a token count"),
                )
            })?;
        for (k, v) in t {
            if k == "range" {
                continue;
            }
            match litellm_key(k) {
                Some((Some(key), None, ServiceTier::Standard)) => {
                    let d = number(&format!("{tf}.{k}"), v)?;
                    let prices = match lo {
                        0 => &mut draft.base,
                        n => draft.thresholds.entry(n).or_default(),
                    };
                    insert(prices, key, d, &format!("tiered_pricing.{k}"), un);
                }
                _ => un.note(format!("tiered_pricing.{k}")),
            }
        }
    }
    Ok(())
}

/// Imports LiteLLM's price table (`model_prices_and_context_window.json`): one rule
/// per model and tier (standard, then batch, priority, flex), model names as exact
/// patterns, in the file's sorted order, USD, the default rounding.
///
/// Mapped: per-token input, output, cache read, cache creation (the 5-minute write),
/// reasoning, audio, image and video keys; `input_cost_per_request`;
/// `*_above_<N>k_tokens` as context thresholds above N × 1000 input tokens;
/// `*_batches`, `*_priority`, `*_flex` as tier rules; `tiered_pricing` by `range`
/// as context thresholds (the range starting at 0 gives the base prices);
/// `off_peak_pricing` as UTC time windows. A text output price also prices
/// reasoning where no reasoning price is given. Every other cost key is listed in
/// `source.unmapped` with the number of models that have it.
pub fn import_litellm(bytes: &[u8]) -> Result<Import, PriceError> {
    check_size(bytes.len())?;
    let top: BTreeMap<String, &RawValue> = serde_json::from_slice(bytes)
        .map_err(|e| PriceError::new("litellm", format!("not a JSON object of models: {e}")))?;
    let mut un = Unmapped(BTreeMap::new());
    let mut rules = Vec::new();
    for (model, raw) in &top {
        // The file's own documentation of its fields, not a model.
        if model == "sample_spec" {
            continue;
        }
        let fields: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get())
            .map_err(|e| PriceError::new(model, format!("not an object: {e}")))?;
        let mut drafts: BTreeMap<ServiceTier, Draft> = BTreeMap::new();
        for (key, value) in &fields {
            if !is_cost_key(key) {
                continue;
            }
            let field = format!("{model}.{key}");
            match key.as_str() {
                "tiered_pricing" => tiered(
                    model,
                    value,
                    drafts.entry(ServiceTier::Standard).or_default(),
                    &mut un,
                )?,
                "off_peak_pricing" => off_peak(
                    model,
                    value,
                    drafts.entry(ServiceTier::Standard).or_default(),
                    &mut un,
                )?,
                _ => match litellm_key(key) {
                    Some((target, threshold, tier)) => {
                        let d = number(&field, value)?;
                        let draft = drafts.entry(tier).or_default();
                        match (target, threshold) {
                            (None, None) => draft.per_request = Some(d),
                            (None, Some(_)) => un.note(key.clone()),
                            (Some(k), None) => insert(&mut draft.base, k, d, key, &mut un),
                            (Some(k), Some(n)) => {
                                insert(draft.thresholds.entry(n).or_default(), k, d, key, &mut un)
                            }
                        }
                    }
                    None => un.note(key.clone()),
                },
            }
        }
        for (tier, mut d) in drafts {
            if d.is_empty() {
                continue;
            }
            reasoning_as_output(&mut d.base);
            for p in d.thresholds.values_mut() {
                reasoning_as_output(p);
            }
            rules.push(PriceRule {
                model: Some(model.clone()),
                service: None,
                tier,
                unit_prices: d.base,
                per_request: d.per_request,
                above_input_tokens: d
                    .thresholds
                    .into_iter()
                    .map(|(input_tokens, unit_prices)| Threshold {
                        input_tokens,
                        unit_prices,
                    })
                    .collect(),
                tiers: None,
                windows: d.windows,
            });
        }
    }
    let mut unmapped: Vec<(String, u32)> = un.0.into_iter().collect();
    unmapped.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let currency = "USD"
        .parse()
        .map_err(|_| PriceError::new("currency", "USD is not a currency code"))?;
    Ok(Import {
        name: None,
        currency,
        rounding: Rounding::default(),
        effective_from: None,
        tax: None,
        rules,
        source: PriceSource {
            format: "litellm".into(),
            sha256: sha256_hex(bytes),
            unmapped: unmapped
                .into_iter()
                .map(|(k, n)| match n {
                    1 => format!("{k} (1 model)"),
                    n => format!("{k} ({n} models)"),
                })
                .collect(),
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlBook {
    name: String,
    currency: Currency,
    #[serde(default)]
    rounding: Option<Rounding>,
    #[serde(default)]
    effective_from: Option<Timestamp>,
    #[serde(default)]
    rules: Vec<PriceRule>,
    #[serde(default)]
    tax: Option<ciyuan_core::BookTax>,
}

/// A TOML document as JSON, floats replaced by the exact decimal of their text
/// (as strings, which the ledger's amount fields read), so serde's derived readers
/// of the ledger format read the TOML format too.
fn toml_to_json(path: &str, v: &toml::de::DeValue<'_>) -> Result<serde_json::Value, PriceError> {
    use serde_json::Value as J;
    use toml::de::DeValue as T;
    Ok(match v {
        T::String(s) => J::String(s.to_string()),
        T::Integer(i) => {
            let n = i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| PriceError::new(path, format!("{i} does not fit 64 bits")))?;
            J::from(n)
        }
        T::Float(f) => J::String(
            decimal_from_text(f.as_str())
                .map_err(|e| PriceError::new(path, e.why))?
                .to_string(),
        ),
        T::Boolean(b) => J::Bool(*b),
        T::Datetime(d) => J::String(d.to_string()),
        T::Array(a) => J::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| toml_to_json(&format!("{path}[{i}]"), x.get_ref()))
                .collect::<Result<_, _>>()?,
        ),
        T::Table(t) => J::Object(
            t.iter()
                .map(|(k, x)| {
                    let key = k.get_ref().to_string();
                    let p = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    Ok((key, toml_to_json(&p, x.get_ref())?))
                })
                .collect::<Result<_, PriceError>>()?,
        ),
    })
}

/// Imports a book written in the native TOML format (see the crate documentation).
/// Unit prices may be strings or TOML numbers; either way the decimal is the text's
/// exact value. Unknown fields are errors, so a misspelt key never drops prices.
pub fn import_toml(text: &str) -> Result<Import, PriceError> {
    check_size(text.len())?;
    let doc = toml::de::DeTable::parse(text)
        .map_err(|e| PriceError::new("toml", e.to_string().trim_end().to_string()))?;
    let json = toml_to_json("", &toml::de::DeValue::Table(doc.into_inner()))?;
    let book: TomlBook =
        serde_json::from_value(json).map_err(|e| PriceError::new("toml", e.to_string()))?;
    for (i, r) in book.rules.iter().enumerate() {
        r.check(&format!("rules[{i}]"))?;
    }
    Ok(Import {
        name: Some(book.name),
        currency: book.currency,
        rounding: book.rounding.unwrap_or_default(),
        effective_from: book.effective_from,
        rules: book.rules,
        tax: book.tax,
        source: PriceSource {
            format: "toml".into(),
            sha256: sha256_hex(text.as_bytes()),
            unmapped: Vec::new(),
        },
    })
}
