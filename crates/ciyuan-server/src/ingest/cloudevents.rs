//! Reading CloudEvents: a batch's events and their attributes in the one pass that
//! checks the body (borrowed slices of it), and each event checked into a usage entry.

use super::*;

/// Longest `id`, `source`, `type` or model name accepted.
pub(super) const MAX_ATTRIBUTE_BYTES: usize = 256;

/// The built-in definition of `llm.usage`: reported counts map one to one onto token
/// keys, as [`LLM_FIELDS`] lists.
pub(super) const LLM_USAGE_DEFINITION: &str = "llm.usage@1";

/// Named usage fields of an `llm.usage` event and the token key each one feeds. They
/// are disjoint: their sum is the total.
pub(super) const LLM_FIELDS: [(&str, Modality, Direction); 9] = [
    ("input_tokens", Modality::Text, Direction::Input),
    (
        "cached_input_tokens",
        Modality::Text,
        Direction::CachedInput,
    ),
    ("cache_write_tokens", Modality::Text, Direction::CacheWrite),
    (
        "cache_write_1h_tokens",
        Modality::Text,
        Direction::CacheWrite1h,
    ),
    ("output_tokens", Modality::Text, Direction::Output),
    ("reasoning_tokens", Modality::Text, Direction::Reasoning),
    ("audio_input_tokens", Modality::Audio, Direction::Input),
    ("audio_output_tokens", Modality::Audio, Direction::Output),
    ("image_input_tokens", Modality::Image, Direction::Input),
];

/// An event that passed validation: a usage entry with its source and event id.
pub(super) struct Accepted {
    /// [`ingest_key_hash`] of the event's `(source, id)`.
    pub(super) hash: u64,
    pub(super) entry: Entry,
}

impl Accepted {
    /// The event's `(source, id)`, taken out of the entry.
    pub(super) fn into_key(self) -> (String, String) {
        match self.entry.body {
            EntryBody::Usage(Usage {
                source: Some(source),
                event_id: Some(id),
                ..
            }) => (source, id),
            other => no_key(other.kind()),
        }
    }
}

pub(super) fn unprocessable(msg: String) -> ApiError {
    ApiError::unprocessable(msg)
}

/// What a JSON value is, from its text, for messages.
pub(super) fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// A string borrowed from the request body where it has no escapes.
pub(super) struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The string a JSON value holds, borrowed where it has no escapes.
pub(super) fn text(raw: &RawValue) -> Result<Text<'_>, serde_json::Error> {
    let json = raw.get();
    // The body was checked to be JSON already, so a quoted value without a backslash is
    // a string whose text is between the quotes.
    if let Some(inner) = json.strip_prefix('"').and_then(|j| j.strip_suffix('"'))
        && !inner.contains('\\')
    {
        return Ok(Text(Cow::Borrowed(inner)));
    }
    serde_json::from_str(json)
}

/// A JSON object's members in document order, values left unparsed.
pub(super) struct Members<'a>(Vec<(Text<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<Text<'de>>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The context attributes Ciyuan reads; others (extensions) are ignored, as CloudEvents
/// requires. An attribute that is `null` counts as absent.
#[derive(Default)]
pub(super) struct Attributes<'a> {
    pub(super) specversion: Option<&'a RawValue>,
    pub(super) id: Option<&'a RawValue>,
    pub(super) source: Option<&'a RawValue>,
    pub(super) service: Option<&'a RawValue>,
    pub(super) subject: Option<&'a RawValue>,
    pub(super) time: Option<&'a RawValue>,
    pub(super) datacontenttype: Option<&'a RawValue>,
    /// Attribution tags, `key=value,key=value` (Ciyuan's extension attribute).
    pub(super) ciyuantags: Option<&'a RawValue>,
    pub(super) data: Option<&'a RawValue>,
}

/// One member of a request's events, read in the pass that checks the body is JSON:
/// an event's attributes, or why it is not one. (The body used to be split into raw
/// events first and each event read again: a second pass over every byte, ~0.2 µs an
/// event in `ciyuan bench ingest`.) Never an error for JSON that parses, so one bad
/// event is refused on its own and its neighbours go on.
pub(super) enum Slot<'a> {
    Event(Attributes<'a>),
    /// Not an object: what it is instead (`a number`, ...).
    NotObject(&'static str),
    /// An object whose attributes cannot be read: why.
    Invalid(String),
}

impl<'de> Deserialize<'de> for Slot<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

        /// An attribute's name, escapes and all, as the member's key spells it.
        struct Name<'a>(Cow<'a, str>);
        impl<'de> Deserialize<'de> for Name<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Text::deserialize(d).map(|Text(t)| Name(t))
            }
        }

        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Slot<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
                let mut a = Attributes::default();
                let mut duplicate = None;
                // Attributes met so far, one bit each (a `null` one counts as met).
                let mut seen = 0u16;
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    let (bit, field) = match name.as_ref() {
                        "specversion" => (0, &mut a.specversion),
                        "id" => (1, &mut a.id),
                        "source" => (2, &mut a.source),
                        "type" => (3, &mut a.service),
                        "subject" => (4, &mut a.subject),
                        "time" => (5, &mut a.time),
                        "datacontenttype" => (6, &mut a.datacontenttype),
                        "data" => (7, &mut a.data),
                        "ciyuantags" => (8, &mut a.ciyuantags),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *field = map.next_value::<Option<&'de RawValue>>()?;
                    if seen & (1 << bit) != 0 {
                        duplicate.get_or_insert(name.into_owned());
                    }
                    seen |= 1 << bit;
                }
                Ok(match duplicate {
                    Some(name) => Slot::Invalid(format!("duplicate attribute `{name}`")),
                    None => Slot::Event(a),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Slot::NotObject("an array"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a string"))
            }
            fn visit_unit<E>(self) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("null"))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn string_attr<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
    required: bool,
) -> Result<Option<Cow<'a, str>>, ApiError> {
    let Some(raw) = raw else {
        return match required {
            true => Err(ApiError::bad_request(format!(
                "{name}: required attribute is missing"
            ))),
            false => Ok(None),
        };
    };
    let Ok(Text(s)) = text(raw) else {
        return Err(ApiError::bad_request(format!(
            "{name}: must be a string, got {}",
            kind(raw)
        )));
    };
    if s.is_empty() {
        return Err(ApiError::bad_request(format!("{name}: must not be empty")));
    }
    if s.len() > MAX_ATTRIBUTE_BYTES {
        return Err(ApiError::bad_request(format!(
            "{name}: longer than {MAX_ATTRIBUTE_BYTES} bytes"
        )));
    }
    Ok(Some(s))
}

/// A required string attribute.
pub(super) fn required_attr<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
) -> Result<Cow<'a, str>, ApiError> {
    string_attr(raw, name, true)?
        .ok_or_else(|| ApiError::bad_request(format!("{name}: required attribute is missing")))
}

/// A required attribute that is kept and read back (in listings, exports, logs): no
/// control characters. (`subject` needs no such check: an account path admits only
/// letters, digits, `-`, `_`, `.` and `/`; `specversion` and `datacontenttype` are
/// compared with fixed values.)
pub(super) fn kept_attr<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
) -> Result<Cow<'a, str>, ApiError> {
    let s = required_attr(raw, name)?;
    ciyuan_core::check_text(name, &s, MAX_ATTRIBUTE_BYTES)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(s)
}

/// A token quantity: a non-negative integer that fits the ledger's counters. Read from
/// the number's text, so no precision is lost on the way.
pub(super) fn quantity(raw: &RawValue, field: &dyn std::fmt::Display) -> Result<i64, ApiError> {
    let text = raw.get();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if !digits.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "{field}: must be an integer, got {}",
            kind(raw)
        )));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "{field}: must be a whole number of tokens, got {text}"
        )));
    }
    if negative {
        return Err(ApiError::bad_request(format!(
            "{field}: must not be negative, got {text}"
        )));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|u| i64::try_from(u).ok())
        .filter(|&n| n <= MAX_TOKENS_PER_KEY)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{field}: {text} is more than the largest accepted count, {MAX_TOKENS_PER_KEY}"
            ))
        })
}

pub(super) fn members<'a>(raw: &'a RawValue, field: &str) -> Result<Members<'a>, ApiError> {
    if !raw.get().starts_with('{') {
        return Err(ApiError::bad_request(format!(
            "{field}: must be an object, got {}",
            kind(raw)
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

/// Tokens of an `llm.usage` event's data.
pub(super) fn llm_usage(
    data: &RawValue,
) -> Result<(String, TokenMap, Option<ServiceTier>), ApiError> {
    let data = members(data, "data")?;
    let mut model = None;
    let mut tier = None;
    let mut tokens = TokenMap::new();
    let mut seen = 0u16;
    let overflow = |f: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("{f}: the token total overflows"))
    };
    for (Text(key), value) in &data.0 {
        let key = key.as_ref();
        // Bits 0..LLM_FIELDS.len() for LLM_FIELDS, then model, tokens and
        // service_tier: a repeated member would be counted twice, so it is refused.
        const FIELDS: usize = LLM_FIELDS.len();
        const _: () = assert!(FIELDS + 3 <= u16::BITS as usize);
        let (bit, known) = match key {
            "model" => (FIELDS, None),
            "tokens" => (FIELDS + 1, None),
            "service_tier" => (FIELDS + 2, None),
            _ => match LLM_FIELDS.iter().position(|(name, _, _)| *name == key) {
                Some(i) => (i, Some(LLM_FIELDS[i])),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "data.{key}: unknown field for llm.usage (expected model, service_tier, tokens or one of {})",
                        LLM_FIELDS.map(|f| f.0).join(", ")
                    )));
                }
            },
        };
        if seen & (1 << bit) != 0 {
            return Err(ApiError::bad_request(format!(
                "data.{key}: appears more than once"
            )));
        }
        seen |= 1 << bit;
        if let Some((name, m, d)) = known {
            let field = format_args!("data.{name}");
            let n = quantity(value, &field)?;
            tokens.add(m, d, n).ok_or_else(|| overflow(&field))?;
        } else if key == "service_tier" {
            // OpenAI's names: `default` (and `auto`, resolved by the provider to what it
            // reports) are standard.
            tier = match text(value) {
                Ok(Text(t)) if t == "auto" => None,
                Ok(Text(t)) => Some(t.parse::<ServiceTier>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "data.service_tier: {t:?} is not standard, default, batch, priority or flex"
                    ))
                })?)
                .filter(|t| *t != ServiceTier::Standard),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "data.service_tier: must be a string, got {}",
                        kind(value)
                    )));
                }
            };
        } else if key == "model" {
            model = Some(match text(value) {
                Ok(Text(m)) => {
                    ciyuan_core::check_text("data.model", &m, MAX_ATTRIBUTE_BYTES)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    m.into_owned()
                }
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "data.model: must be a string, got {}",
                        kind(value)
                    )));
                }
            });
        } else {
            let map = members(value, "data.tokens")?;
            let mut keys = std::collections::HashSet::new();
            for (Text(k), v) in &map.0 {
                let field = format_args!("data.tokens.{k}");
                if !keys.insert(k.as_ref()) {
                    return Err(ApiError::bad_request(format!(
                        "{field}: appears more than once"
                    )));
                }
                let (m, d) = k
                    .split_once('.')
                    .and_then(|(m, d)| {
                        Some((m.parse::<Modality>().ok()?, d.parse::<Direction>().ok()?))
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{field}: not a modality.direction key such as text.input"
                        ))
                    })?;
                let n = quantity(v, &field)?;
                tokens.add(m, d, n).ok_or_else(|| overflow(&field))?;
            }
        }
    }
    let Some(model) = model else {
        return Err(ApiError::bad_request("data.model: required for llm.usage"));
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "data: an llm.usage event must carry at least one token count",
        ));
    }
    Ok((model, tokens, tier))
}

/// Validates one event into an entry (without touching the store).
pub(super) fn validate(
    app: &App,
    caller: &Caller,
    slot: Slot<'_>,
    now: Timestamp,
    last_account: &mut Option<AccountPath>,
) -> Result<Accepted, (Option<String>, Option<String>, ApiError)> {
    let ev = match slot {
        Slot::Event(ev) => ev,
        Slot::NotObject(kind) => {
            return Err((
                None,
                None,
                ApiError::bad_request(format!("an event must be a JSON object, got {kind}")),
            ));
        }
        Slot::Invalid(why) => {
            return Err((
                None,
                None,
                ApiError::bad_request(format!("invalid event: {why}")),
            ));
        }
    };
    let id = string_attr(ev.id, "id", true).ok().flatten();
    let source = string_attr(ev.source, "source", true).ok().flatten();
    let mut check = || -> Result<Accepted, ApiError> {
        let version = required_attr(ev.specversion, "specversion")?;
        if version != "1.0" {
            return Err(ApiError::bad_request(format!(
                "specversion: {version:?} is not supported (expected \"1.0\")"
            )));
        }
        let id = kept_attr(ev.id, "id")?;
        let source = kept_attr(ev.source, "source")?;
        if source == GATEWAY_SOURCE {
            return Err(ApiError::bad_request(format!(
                "source: {GATEWAY_SOURCE:?} is reserved for the gateway's own records"
            )));
        }
        let service = kept_attr(ev.service, "type")?;
        let subject = required_attr(ev.subject, "subject")?;
        let account = match last_account {
            // The previous event's subject passed the checks below.
            Some(last) if last.as_str() == subject => last.clone(),
            _ => {
                let account = AccountPath::parse(&subject)
                    .map_err(|e| ApiError::bad_request(format!("subject: {e}")))?;
                if account.is_root() {
                    return Err(ApiError::bad_request(
                        "subject: usage cannot land on the root account",
                    ));
                }
                caller.require_within(&account)?;
                *last_account = Some(account.clone());
                account
            }
        };
        if let Some(ct) = string_attr(ev.datacontenttype, "datacontenttype", false)?
            && !ct.eq_ignore_ascii_case("application/json")
        {
            return Err(ApiError::bad_request(format!(
                "datacontenttype: {ct:?} is not application/json"
            )));
        }
        let ts = match string_attr(ev.time, "time", false)? {
            Some(t) => t.parse::<Timestamp>().map_err(|e| {
                ApiError::bad_request(format!("time: {t:?} is not an RFC 3339 timestamp: {e}"))
            })?,
            None => now,
        };
        let age = now.duration_since(ts);
        let window = |d: std::time::Duration| {
            ciyuan_core::jiff::SignedDuration::try_from(d)
                .unwrap_or(ciyuan_core::jiff::SignedDuration::MAX)
        };
        if age > window(app.config.ingest_max_age) {
            return Err(unprocessable(format!(
                "time: {ts} is older than the accepted window of {}s",
                app.config.ingest_max_age.as_secs()
            )));
        }
        if -age > window(app.config.ingest_max_future) {
            return Err(unprocessable(format!(
                "time: {ts} is more than {}s in the future",
                app.config.ingest_max_future.as_secs()
            )));
        }
        let Some(data) = ev.data else {
            return Err(ApiError::bad_request("data: required attribute is missing"));
        };
        // Bounded by the tags' own bounds (16 of 64 + 256 bytes), not an attribute's.
        let tags = match ev.ciyuantags {
            None => Default::default(),
            Some(raw) => {
                let Ok(Text(t)) = text(raw) else {
                    return Err(ApiError::bad_request(format!(
                        "ciyuantags: must be a string of key=value pairs, got {}",
                        kind(raw)
                    )));
                };
                ciyuan_core::parse_tag_list(&t)
                    .map_err(|e| ApiError::bad_request(format!("ciyuantags: {e}")))?
            }
        };
        let mut tier = None;
        let (model, tokens, definition, measures) = match service.as_ref() {
            "llm.usage" => {
                let (m, t, served_at) = llm_usage(data)?;
                tier = served_at;
                (
                    Some(m),
                    t,
                    std::borrow::Cow::Borrowed(LLM_USAGE_DEFINITION),
                    Default::default(),
                )
            }
            other => {
                use ciyuan_measure::MeasureError as M;
                if !data.get().starts_with('{') {
                    return Err(ApiError::bad_request(format!(
                        "data: must be an object, got {}",
                        kind(data)
                    )));
                }
                let data: Map<String, Value> = serde_json::from_str(data.get())
                    .map_err(|e| ApiError::bad_request(format!("data: {e}")))?;
                let measured =
                    app.definitions()
                        .measure(other, ts, &data)
                        .map_err(|e| match e {
                            M::BadMeasure(..) => ApiError::bad_request(e.to_string()),
                            M::UnknownService(_) => unprocessable(format!("type: {e}")),
                            _ => unprocessable(e.to_string()),
                        })?;
                (
                    None,
                    measured.tokens,
                    std::borrow::Cow::Owned(measured.definition),
                    data.into_iter().collect(),
                )
            }
        };
        // Definitions compute counts from the event's own numbers: bound them as
        // the fields of llm.usage are bounded.
        if let Some(t) = tokens.out_of_bounds(false) {
            return Err(ApiError::bad_request(format!(
                "data: {definition} gives {}.{} = {}, outside 0 to {MAX_TOKENS_PER_KEY}",
                t.modality, t.direction, t.count
            )));
        }
        let hash = ingest_key_hash(&source, &id);
        let entry = Entry::new(
            ts,
            account,
            EntryBody::Usage(Usage {
                service: service.into_owned(),
                model,
                tokens,
                source: Some(source.into_owned()),
                event_id: Some(id.into_owned()),
                definition: Some(definition),
                partial: false,
                measures,
                tier,
                tags,
                ..Usage::default()
            }),
        );
        Ok(Accepted { hash, entry })
    };
    check().map_err(|e| (source.map(Cow::into_owned), id.map(Cow::into_owned), e))
}
