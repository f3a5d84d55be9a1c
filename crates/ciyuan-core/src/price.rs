//! Price books, contracts and ratings as the ledger records them.
//!
//! A price book version is an entry (`price.book`): once appended it never changes, so
//! "this amount follows book `list` version 3" can be checked from the log alone. A
//! contract (`price.contract`) sits on an account node and adjusts the book for the
//! node's subtree. A [`Rating`] is what a usage entry carries once priced: the total,
//! and every line it is the sum of.
//!
//! Every amount is a [`Decimal`] written in the ledger as a string and read back
//! exactly ([`Decimal::from_str_exact`]); a JSON number is refused, so no price ever
//! passes through a float. [`decimal_from_text`] turns a number's literal text
//! (`2.5e-06`) into the exact decimal (`0.0000025`) for importers.
//!
//! The rounding rule of a book is applied in one place, [`Rating::settle`]: lines keep
//! full precision, and `amount == rounding.apply(adjust(sum(lines)))`.

use crate::{AccountPath, Currency, Direction, Modality, check_text};
use jiff::Timestamp;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Most rules one book may hold. LiteLLM's table makes about 6,000; ten times that
/// leaves room and still bounds an entry's size.
pub const MAX_RULES_PER_BOOK: usize = 100_000;
/// Most thresholds, bands or windows in one rule.
pub const MAX_PARTS_PER_RULE: usize = 64;
/// The largest unit price accepted, in the book's currency. A price above a million
/// per unit is a typo (a per-million price written as per-unit the other way round is
/// caught by the importers' tests, not here), and the bound keeps every
/// quantity × price of an entry inside [`Decimal`]'s range.
pub const MAX_UNIT_PRICE: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
/// Most decimal places a unit price or percentage may have: rust_decimal holds 28.
pub const MAX_PRICE_SCALE: u32 = 24;
/// Most decimal places a book may round its entries to.
pub const MAX_ROUNDING_PLACES: u32 = 18;
/// Longest book name, model or service pattern, measure name or time zone, in bytes.
pub const MAX_PRICE_NAME_BYTES: usize = 256;

/// Why a price book, rule, contract or number was refused: the field (a path such as
/// `rules[3].unit_prices.text.input`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct PriceError {
    /// Where: the field's path.
    pub field: String,
    /// What is wrong.
    pub why: String,
}

impl PriceError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> PriceError {
        PriceError {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// What a unit price is a price of: a token key of the ledger (`text.input`), a
/// service's own measure (`measure.pages`), or, in a [`RatedLine`] only, the request
/// itself (`request`, priced by [`PriceRule::per_request`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PriceKey {
    /// Tokens of one modality and direction, written `modality.direction`.
    Tokens(Modality, Direction),
    /// A measure the usage entry carries in `measures`, written `measure.<name>`.
    Measure(String),
    /// One request, written `request`.
    Request,
}

impl PriceKey {
    /// Whether the key counts as input for context thresholds: fresh, cached and
    /// cache-write input of every modality.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            PriceKey::Tokens(
                _,
                Direction::Input
                    | Direction::CachedInput
                    | Direction::CacheWrite
                    | Direction::CacheWrite1h
            )
        )
    }
}

impl fmt::Display for PriceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PriceKey::Tokens(m, d) => write!(f, "{m}.{d}"),
            PriceKey::Measure(name) => write!(f, "measure.{name}"),
            PriceKey::Request => f.write_str("request"),
        }
    }
}

impl FromStr for PriceKey {
    type Err = PriceError;
    fn from_str(s: &str) -> Result<PriceKey, PriceError> {
        if s == "request" {
            return Ok(PriceKey::Request);
        }
        if let Some(name) = s.strip_prefix("measure.") {
            check_text("measure", name, MAX_PRICE_NAME_BYTES)
                .map_err(|e| PriceError::new(s, e.to_string()))?;
            return Ok(PriceKey::Measure(name.to_string()));
        }
        let parsed = s
            .split_once('.')
            .and_then(|(m, d)| Some((m.parse().ok()?, d.parse().ok()?)));
        match parsed {
            Some((m, d)) => Ok(PriceKey::Tokens(m, d)),
            None => Err(PriceError::new(
                s,
                "not a price key: a token key such as text.input or text.cached_input, \
                 measure.<name>, or request",
            )),
        }
    }
}

impl Serialize for PriceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // Every rated line writes one: spelled out without the formatting machinery.
            PriceKey::Tokens(m, d) => {
                let mut buf = [0u8; 32];
                s.serialize_str(wire::token_key(*m, *d, &mut buf))
            }
            _ => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for PriceKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Unit prices by key. Sorted, so a book's bytes are deterministic.
pub type UnitPrices = BTreeMap<PriceKey, Decimal>;

/// Serde for amounts: written as strings, read only from strings (exactly) or JSON
/// integers. A JSON float would have passed through `f64`, so it is refused.
pub mod exact {
    use rust_decimal::Decimal;
    use std::fmt;

    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal amount written as a string, such as \"0.0000025\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal, E> {
            super::decimal_from_text(v).map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
            Err(E::custom(format!(
                "amount {v} is a float; write amounts as strings so they stay exact"
            )))
        }
    }

    /// Writes the amount as a string.
    pub fn serialize<S: serde::Serializer>(v: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; TEXT_BYTES];
        s.serialize_str(text(v, &mut buf))
    }

    /// The most bytes of a decimal's text: sign, 29 digits, point, leading zeros of a
    /// scale of 28.
    const TEXT_BYTES: usize = 64;

    /// `d`'s text exactly as its `Display` writes it (every digit of its scale), built
    /// in `buf` without the formatting machinery: a rated entry writes several amounts
    /// and this is on the append path of every one.
    pub fn text<'b>(d: &Decimal, buf: &'b mut [u8; TEXT_BYTES]) -> &'b str {
        match std::str::from_utf8(text_bytes(d, buf)) {
            Ok(text) => text,
            Err(_) => unreachable!("only ASCII digits, '-' and '.' are written"),
        }
    }

    /// [`text`] as bytes, for writers that need no `str`.
    pub(crate) fn text_bytes<'b>(d: &Decimal, buf: &'b mut [u8; TEXT_BYTES]) -> &'b [u8] {
        let m = d.mantissa().unsigned_abs();
        let scale = d.scale() as usize;
        let mut digits = [0u8; 40];
        let mut n = 0;
        // At most 29 digits: the mantissa is below 2^96. Prices and amounts fit 64
        // bits, whose division is a machine instruction (128-bit division is a call).
        match u64::try_from(m) {
            Ok(mut m) => loop {
                digits[n] = b'0' + (m % 10) as u8;
                m /= 10;
                n += 1;
                if m == 0 {
                    break;
                }
            },
            Err(_) => {
                let mut m = m;
                loop {
                    digits[n] = b'0' + (m % 10) as u8;
                    m /= 10;
                    n += 1;
                    if m == 0 {
                        break;
                    }
                }
            }
        }
        // Leading zeros up to one before the point.
        while n < scale + 1 {
            digits[n] = b'0';
            n += 1;
        }
        let mut len = 0;
        if d.is_sign_negative() && !d.is_zero() {
            buf[len] = b'-';
            len += 1;
        }
        for i in (0..n).rev() {
            if i + 1 == scale {
                buf[len] = b'.';
                len += 1;
            }
            buf[len] = digits[i];
            len += 1;
        }
        &buf[..len]
    }

    /// Reads an amount from a string or an integer.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        d.deserialize_any(V)
    }

    /// The same for optional amounts.
    pub mod option {
        use rust_decimal::Decimal;
        use serde::Deserialize;

        #[derive(Deserialize)]
        struct W(#[serde(with = "super")] Decimal);

        /// Writes the amount as a string, or none.
        pub fn serialize<S: serde::Serializer>(
            v: &Option<Decimal>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional amount.
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Decimal>, D::Error> {
            Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
        }
    }

    /// The same for maps of unit prices.
    pub mod map {
        use super::super::{PriceKey, UnitPrices};
        use serde::Deserialize;
        use serde::ser::SerializeMap;

        #[derive(Deserialize)]
        struct W(#[serde(with = "super")] rust_decimal::Decimal);

        /// Writes the prices with string amounts.
        pub fn serialize<S: serde::Serializer>(v: &UnitPrices, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(v.len()))?;
            for (k, d) in v {
                let mut buf = [0u8; 64];
                map.serialize_entry(k, super::text(d, &mut buf))?;
            }
            map.end()
        }

        /// Reads prices, refusing float amounts.
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<UnitPrices, D::Error> {
            let raw = std::collections::BTreeMap::<PriceKey, W>::deserialize(d)?;
            Ok(raw.into_iter().map(|(k, w)| (k, w.0)).collect())
        }
    }
}

/// Turns a number's literal text into the exact decimal it denotes: `2.5e-06` becomes
/// `0.0000025`, `1E3` becomes `1000`, `-0.50` stays `-0.50`. Importers use it on the
/// text of JSON and TOML numbers, never on a float. Refuses what a [`Decimal`] cannot
/// hold exactly (more than 28 decimal places or a mantissa beyond 96 bits), naming the
/// text.
pub fn decimal_from_text(text: &str) -> Result<Decimal, PriceError> {
    // One exact parser for every amount the ledger reads (posting amounts too).
    crate::posting::parse_amount("number", text).map_err(|e| match e {
        crate::PostingError::Amount { why, .. } => PriceError::new(
            format!("number {text:?}"),
            format!("is not an exact decimal: {why}"),
        ),
        other => PriceError::new(format!("number {text:?}"), other.to_string()),
    })
}

/// The append path's JSON, written by hand: each function appends the bytes serde_json
/// writes for the same value (the tests hold them to it), without the serializer's
/// per-field machinery. Every rated entry goes through here.
pub(crate) mod wire {
    use super::PriceKey;
    use crate::{Direction, Modality};
    use rust_decimal::Decimal;

    /// The same value at the same scale: what reading a written decimal gives back.
    pub(crate) fn same(a: &Decimal, b: &Decimal) -> bool {
        a == b && a.scale() == b.scale()
    }

    /// `d` as an `i64` where it is written as a JSON integer: whole (scale 0) and in
    /// range. Read back, an integer is a decimal of scale 0, so nothing is lost.
    pub(crate) fn whole(d: &Decimal) -> Option<i64> {
        if d.scale() == 0 {
            i64::try_from(d.mantissa()).ok()
        } else {
            None
        }
    }

    /// An integer, as serde_json writes it.
    pub(crate) fn int(out: &mut Vec<u8>, n: i64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut m = n.unsigned_abs();
        loop {
            i -= 1;
            buf[i] = b'0' + (m % 10) as u8;
            m /= 10;
            if m == 0 {
                break;
            }
        }
        if n < 0 {
            out.push(b'-');
        }
        out.extend_from_slice(&buf[i..]);
    }

    /// A decimal as [`super::exact`] writes it: a string of its exact text, spelled
    /// right to left into one buffer (point included) and copied once.
    pub(crate) fn decimal(out: &mut Vec<u8>, d: &Decimal) {
        // Quotes, a sign, 29 digits, a point and up to 28 leading zeros.
        let mut buf = [0u8; 64];
        let mut i = buf.len() - 1;
        buf[i] = b'"';
        let scale = d.scale() as usize;
        let mut written = 0;
        // Digits right to left, the point before the `scale`-th, until the mantissa is
        // spent and one digit stands before the point.
        let mut put = |digit: u8, i: &mut usize| {
            if written == scale && scale > 0 {
                *i -= 1;
                buf[*i] = b'.';
            }
            *i -= 1;
            buf[*i] = b'0' + digit;
            written += 1;
            written > scale
        };
        let m = d.mantissa().unsigned_abs();
        // Prices and amounts fit 64 bits, whose division by 10 is a multiplication.
        match u64::try_from(m) {
            Ok(mut m) => loop {
                let past_point = put((m % 10) as u8, &mut i);
                m /= 10;
                if m == 0 && past_point {
                    break;
                }
            },
            Err(_) => {
                let mut m = m;
                loop {
                    let past_point = put((m % 10) as u8, &mut i);
                    m /= 10;
                    if m == 0 && past_point {
                        break;
                    }
                }
            }
        }
        if d.is_sign_negative() && !d.is_zero() {
            i -= 1;
            buf[i] = b'-';
        }
        i -= 1;
        buf[i] = b'"';
        out.extend_from_slice(&buf[i..]);
    }

    /// A string that needs no escape (names of this crate's own: token keys,
    /// currency codes), quoted.
    pub(crate) fn plain(out: &mut Vec<u8>, parts: &[&str]) {
        out.push(b'"');
        for p in parts {
            debug_assert!(p.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'));
            out.extend_from_slice(p.as_bytes());
        }
        out.push(b'"');
    }

    /// A token key, `"modality.direction"`, quoted.
    pub(crate) fn token_key_json(out: &mut Vec<u8>, m: Modality, d: Direction) {
        plain(out, &[m.as_str(), ".", d.as_str()]);
    }

    /// A timestamp as jiff writes it in RFC 3339 (`2026-12-06T08:40:12.1234Z`: UTC,
    /// the fraction with the digits it needs, none when whole), quoted; `false`,
    /// writing nothing, outside the years 1970 to 9999, which are left to jiff.
    pub(crate) fn timestamp(out: &mut Vec<u8>, ts: &jiff::Timestamp) -> bool {
        let (secs, nanos) = (ts.as_second(), ts.subsec_nanosecond());
        // Before 1970 the fraction counts back from the second (negative): jiff's.
        if !(0..253_402_300_800).contains(&secs) || nanos < 0 {
            return false;
        }
        // Days to a civil date: H. Hinnant's `civil_from_days`, for days ≥ 0.
        let (days, tod) = (secs / 86_400, secs % 86_400);
        let z = days + 719_468;
        let (era, doe) = (z / 146_097, z % 146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut buf = *b"\"0000-00-00T00:00:00.000000000Z\"";
        let mut two = |at: usize, v: i64| {
            buf[at] = b'0' + (v / 10) as u8;
            buf[at + 1] = b'0' + (v % 10) as u8;
        };
        two(1, year / 100);
        two(3, year % 100);
        two(6, month);
        two(9, day);
        two(12, tod / 3_600);
        two(15, tod / 60 % 60);
        two(18, tod % 60);
        if nanos == 0 {
            out.extend_from_slice(&buf[..20]);
            out.extend_from_slice(b"Z\"");
            return true;
        }
        let mut n = nanos.unsigned_abs();
        for at in (21..30).rev() {
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let mut end = 30;
        while buf[end - 1] == b'0' {
            end -= 1;
        }
        out.extend_from_slice(&buf[..end]);
        out.extend_from_slice(b"Z\"");
        true
    }

    /// A JSON string with serde_json's escapes: `"`, `\\`, and control characters
    /// (`\b \t \n \f \r` short, the others `\u00xx`); nothing else.
    pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        out.push(b'"');
        let bytes = s.as_bytes();
        let mut start = 0;
        // Sixteen bytes at a time, tested without a branch per byte: nearly all text
        // has nothing to escape (an entry's tags run to kilobytes), and only a chunk
        // that has is looked at byte by byte.
        for (n, chunk) in bytes.chunks(16).enumerate() {
            if !chunk.iter().fold(false, |any, &b| any | escaped(b)) {
                continue;
            }
            for (k, &b) in chunk.iter().enumerate() {
                if !escaped(b) {
                    continue;
                }
                let at = n * 16 + k;
                out.extend_from_slice(&bytes[start..at]);
                start = at + 1;
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    0x08 => out.extend_from_slice(b"\\b"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    0x0c => out.extend_from_slice(b"\\f"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    _ => out.extend_from_slice(&[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 0xf)],
                    ]),
                }
            }
        }
        out.extend_from_slice(&bytes[start..]);
        out.push(b'"');
    }

    /// `modality.direction` spelled into `buf`.
    pub(crate) fn token_key(m: Modality, d: Direction, buf: &mut [u8; 32]) -> &str {
        let (m, d) = (m.as_str().as_bytes(), d.as_str().as_bytes());
        // The longest is `image.cached_input`, 18 bytes.
        let len = m.len() + 1 + d.len();
        buf[..m.len()].copy_from_slice(m);
        buf[m.len()] = b'.';
        buf[m.len() + 1..len].copy_from_slice(d);
        match std::str::from_utf8(&buf[..len]) {
            Ok(key) => key,
            Err(_) => unreachable!("token key names are ASCII"),
        }
    }

    /// A price key's string.
    pub(crate) fn key(out: &mut Vec<u8>, k: &PriceKey) {
        match k {
            PriceKey::Tokens(m, d) => token_key_json(out, *m, *d),
            PriceKey::Request => out.extend_from_slice(b"\"request\""),
            // Rare: a service's own measure.
            PriceKey::Measure(name) => string(out, &format!("measure.{name}")),
        }
    }

    /// Serializes a decimal as [`super::exact`] does.
    pub(crate) struct Text<'a>(pub(crate) &'a Decimal);

    impl serde::Serialize for Text<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::exact::serialize(self.0, s)
        }
    }

    /// Reads a decimal as [`super::exact`] does.
    pub(crate) struct Read(pub(crate) Decimal);

    impl<'de> serde::Deserialize<'de> for Read {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::exact::deserialize(d).map(Read)
        }
    }
}

/// Which service tier a usage entry states; absent means standard.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ServiceTier {
    /// The default tier.
    #[default]
    Standard,
    /// Asynchronous batch jobs (typically half price).
    Batch,
    /// Priority processing.
    Priority,
    /// Flex processing (cheaper, slower).
    Flex,
}

impl ServiceTier {
    /// The name used in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Standard => "standard",
            ServiceTier::Batch => "batch",
            ServiceTier::Priority => "priority",
            ServiceTier::Flex => "flex",
        }
    }

    fn is_standard(&self) -> bool {
        *self == ServiceTier::Standard
    }
}

impl fmt::Display for ServiceTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceTier {
    type Err = PriceError;
    fn from_str(s: &str) -> Result<ServiceTier, PriceError> {
        match s {
            "standard" | "default" => Ok(ServiceTier::Standard),
            "batch" => Ok(ServiceTier::Batch),
            "priority" => Ok(ServiceTier::Priority),
            "flex" => Ok(ServiceTier::Flex),
            _ => Err(PriceError::new(
                "tier",
                format!("{s:?} is not a service tier (standard, batch, priority or flex)"),
            )),
        }
    }
}

/// How a book rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingMode {
    /// To the nearest, ties to even (banker's rounding).
    HalfEven,
    /// To the nearest, ties away from zero.
    HalfUp,
    /// Toward zero (truncate).
    Down,
    /// Away from zero.
    Up,
}

/// Where a book rounds. Only one place exists today: each entry's total. Written in
/// the book anyway, so a book that rounds elsewhere later is a new variant, not a
/// silent change of meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingAt {
    /// The total of each usage entry, after discount and markup; lines keep full
    /// precision.
    #[default]
    Entry,
}

/// A book's rounding rule: where, to how many decimal places, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rounding {
    /// Where it applies.
    #[serde(rename = "where", default)]
    pub at: RoundingAt,
    /// Decimal places kept (2 for cents; 6 or more for per-entry amounts of cheap
    /// models, which would otherwise round to zero).
    pub to: u32,
    /// How.
    pub mode: RoundingMode,
}

impl Default for Rounding {
    /// Ten places, half to even: an entry's amount is off by at most 5e-11 of the
    /// currency, so a bill summing a hundred million entries is off by less than a
    /// cent, while a one-token entry of the cheapest models still costs more than
    /// zero.
    fn default() -> Rounding {
        Rounding {
            at: RoundingAt::Entry,
            to: 10,
            mode: RoundingMode::HalfEven,
        }
    }
}

impl Rounding {
    /// Rounds `amount` by this rule. The one place a book's rounding is applied.
    pub fn apply(&self, amount: Decimal) -> Decimal {
        let strategy = match self.mode {
            RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundingMode::Down => RoundingStrategy::ToZero,
            RoundingMode::Up => RoundingStrategy::AwayFromZero,
        };
        amount.round_dp_with_strategy(self.to, strategy)
    }
}

/// Where a book's prices came from: the format and the SHA-256 of the imported file,
/// and the file's keys the importer could not map (each with how many models had it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSource {
    /// `litellm` or `toml`.
    pub format: String,
    /// SHA-256 of the file's bytes, lower-case hex.
    pub sha256: String,
    /// Keys of the file that no rule carries, e.g. `output_cost_per_image (342 models)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmapped: Vec<String>,
}

/// Prices that replace the base ones of a rule for entries whose input tokens (all
/// input keys: fresh, cached and cache-write, every modality) exceed `input_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// Applies when the entry's input tokens are strictly above this.
    pub input_tokens: u64,
    /// The prices above it; keys not named keep the base price.
    #[serde(with = "exact::map")]
    pub unit_prices: UnitPrices,
}

/// Graduated or volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierKind {
    /// Each band's share of the quantity at that band's price.
    Graduated,
    /// The entry's whole quantity at the price of the band the period's quantity
    /// reaches with it.
    Volume,
}

/// The period over which tiered quantities accumulate, in the account's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierPeriod {
    /// A calendar day.
    Day,
    /// A calendar month.
    Month,
}

/// Which quantity tiers count: one key, or all the rule's token keys together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierKey {
    /// Every token key of the entry, summed, in the ledger's key order.
    All,
    /// One key.
    Key(PriceKey),
}

impl TierKey {
    /// Whether `key` is counted.
    pub fn covers(&self, key: &PriceKey) -> bool {
        match self {
            TierKey::All => matches!(key, PriceKey::Tokens(..)),
            TierKey::Key(k) => k == key,
        }
    }
}

impl Serialize for TierKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TierKey::All => s.serialize_str("all"),
            TierKey::Key(k) => s.collect_str(k),
        }
    }
}

impl<'de> Deserialize<'de> for TierKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "all" {
            return Ok(TierKey::All);
        }
        s.parse()
            .map(TierKey::Key)
            .map_err(serde::de::Error::custom)
    }
}

/// One band of a tiered price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// The band holds the period's units up to this many (exclusive of those below
    /// the previous band's bound); none = no upper bound (the last band).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<u64>,
    /// The prices in the band.
    #[serde(with = "exact::map")]
    pub unit_prices: UnitPrices,
}

/// Tiered prices over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    /// Graduated or volume.
    pub kind: TierKind,
    /// Over which period quantities accumulate.
    pub period: TierPeriod,
    /// Which quantity is tiered.
    pub key: TierKey,
    /// The bands, in increasing `up_to`; the last has none.
    pub bands: Vec<Band>,
}

/// A time of day, written `HH:MM`, kept as minutes since midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClockTime(u16);

impl ClockTime {
    /// Minutes since midnight, 0 to 1439.
    pub fn minutes(self) -> u16 {
        self.0
    }
}

impl FromStr for ClockTime {
    type Err = PriceError;
    fn from_str(s: &str) -> Result<ClockTime, PriceError> {
        let bad = || PriceError::new(s, "not a time of day written HH:MM (00:00 to 23:59)");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u16 = h.parse().map_err(|_| bad())?;
        let m: u16 = m.parse().map_err(|_| bad())?;
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(ClockTime(h * 60 + m))
    }
}

impl fmt::Display for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for ClockTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClockTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Prices by time of day in a zone (off-peak prices). The window covers `[from, to)`
/// of local time; when `to` is not after `from` it runs past midnight, and `from ==
/// to` covers the whole day. `weekdays` (1 = Monday ... 7 = Sunday, of the local
/// date of the entry's time) limits it to those days; empty = every day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// Start, inclusive.
    pub from: ClockTime,
    /// End, exclusive.
    pub to: ClockTime,
    /// IANA time zone, e.g. `Asia/Shanghai` or `UTC`.
    pub time_zone: String,
    /// Days it applies, ISO numbered; empty = every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weekdays: Vec<u8>,
    /// The prices inside the window; keys not named keep their other prices.
    #[serde(with = "exact::map")]
    pub unit_prices: UnitPrices,
}

impl TimeWindow {
    /// Whether local time `minute` (since midnight) on ISO weekday `weekday` is inside.
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        if !self.weekdays.is_empty() && !self.weekdays.contains(&weekday) {
            return false;
        }
        let (from, to) = (self.from.0, self.to.0);
        if from < to {
            from <= minute && minute < to
        } else {
            // Past midnight, or the whole day when from == to.
            minute >= from || minute < to
        }
    }
}

/// One rule of a book: what it prices and at what.
///
/// **Which rule prices an entry.** The candidates are the contract's overrides, then
/// the book's rules, in order. A rule matches when its `model` pattern matches the
/// entry's model (an entry without a model matches only rules without one), its
/// `service` pattern matches the entry's service (absent = any service), and its
/// `tier` equals the entry's tier. The first match for the entry's tier prices it;
/// for a batch, priority or flex entry, keys that rule does not name at all take the
/// price of the first matching standard rule, and with no rule of the entry's tier
/// the standard rule prices everything. No match at all: the entry is unpriced.
///
/// **Which price of the rule applies to a key**, first that names the key:
/// 1. a time window containing the entry's time (the first such window);
/// 2. the highest context threshold that the entry's input tokens (fresh, cached and
///    cache-write, every modality) exceed and that prices the key;
/// 3. the tiers, when they count this key. The caller passes the quantity the tiers
///    counted earlier in their period (`period_to_date`); this entry's units follow
///    it, token keys in the ledger's key order when the tiers count `all`. Graduated:
///    each band prices the units inside it; volume: the band holding the last unit
///    prices the entry's whole quantity;
/// 4. the base `unit_prices`.
///
/// A token key with a count but no price that applies is listed in
/// [`Rating::missing`] and costs nothing; never silently. Measures are the raw
/// inputs of token definitions (widths, durations), so only those the rule prices
/// (`measure.<name>`) are read; each must then be a non-negative number.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    /// Model pattern ([`crate::wildcard_match`]: `*` runs, ASCII case ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Service pattern, e.g. `llm.chat`, `doc.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The tier it prices; absent = standard.
    #[serde(default, skip_serializing_if = "ServiceTier::is_standard")]
    pub tier: ServiceTier,
    /// Base prices per unit.
    #[serde(
        default,
        with = "exact::map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub unit_prices: UnitPrices,
    /// A price per request (per usage entry).
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_request: Option<Decimal>,
    /// Context thresholds, in increasing `input_tokens`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub above_input_tokens: Vec<Threshold>,
    /// Graduated or volume tiers over a period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Tiers>,
    /// Time-of-day windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<TimeWindow>,
}

fn check_price(field: &str, p: &Decimal) -> Result<(), PriceError> {
    if p.is_sign_negative() && !p.is_zero() {
        return Err(PriceError::new(field, format!("price {p} is negative")));
    }
    if *p > MAX_UNIT_PRICE {
        return Err(PriceError::new(
            field,
            format!("price {p} is above the largest unit price, {MAX_UNIT_PRICE}"),
        ));
    }
    if p.scale() > MAX_PRICE_SCALE {
        return Err(PriceError::new(
            field,
            format!("price {p} has more than {MAX_PRICE_SCALE} decimal places"),
        ));
    }
    Ok(())
}

fn check_prices(field: &str, prices: &UnitPrices) -> Result<(), PriceError> {
    for (k, p) in prices {
        let f = format!("{field}.{k}");
        if *k == PriceKey::Request {
            return Err(PriceError::new(
                f,
                "a price per request is written per_request, not as a unit price",
            ));
        }
        check_price(&f, p)?;
    }
    Ok(())
}

fn check_name(field: &str, s: &str) -> Result<(), PriceError> {
    check_text(field, s, MAX_PRICE_NAME_BYTES).map_err(|e| PriceError::new(field, e.to_string()))
}

fn check_percent(field: &str, p: &Decimal, max: Decimal) -> Result<(), PriceError> {
    if p.is_sign_negative() || *p > max || p.scale() > MAX_PRICE_SCALE {
        return Err(PriceError::new(
            field,
            format!(
                "{p} is not a percentage from 0 to {max} with at most {MAX_PRICE_SCALE} places"
            ),
        ));
    }
    Ok(())
}

impl PriceRule {
    /// Checks the rule; `field` names it in errors (`rules[3]`).
    pub fn check(&self, field: &str) -> Result<(), PriceError> {
        if self.model.is_none() && self.service.is_none() {
            return Err(PriceError::new(
                field,
                "a rule names a model pattern, a service pattern, or both",
            ));
        }
        if let Some(m) = &self.model {
            check_name(&format!("{field}.model"), m)?;
        }
        if let Some(s) = &self.service {
            check_name(&format!("{field}.service"), s)?;
        }
        check_prices(&format!("{field}.unit_prices"), &self.unit_prices)?;
        if let Some(p) = &self.per_request {
            check_price(&format!("{field}.per_request"), p)?;
        }
        let parts = self.above_input_tokens.len()
            + self.windows.len()
            + self.tiers.as_ref().map_or(0, |t| t.bands.len());
        if parts > MAX_PARTS_PER_RULE {
            return Err(PriceError::new(
                field,
                format!("more than {MAX_PARTS_PER_RULE} thresholds, bands and windows"),
            ));
        }
        let mut last = None;
        for (i, t) in self.above_input_tokens.iter().enumerate() {
            let f = format!("{field}.above_input_tokens[{i}]");
            if last.is_some_and(|l| t.input_tokens <= l) {
                return Err(PriceError::new(
                    format!("{f}.input_tokens"),
                    format!(
                        "{} is not above the previous threshold: thresholds increase",
                        t.input_tokens
                    ),
                ));
            }
            last = Some(t.input_tokens);
            check_prices(&format!("{f}.unit_prices"), &t.unit_prices)?;
        }
        if let Some(tiers) = &self.tiers {
            let f = format!("{field}.tiers");
            if tiers.key == TierKey::Key(PriceKey::Request) {
                return Err(PriceError::new(
                    format!("{f}.key"),
                    "requests are not tiered",
                ));
            }
            if tiers.bands.is_empty() {
                return Err(PriceError::new(format!("{f}.bands"), "no band"));
            }
            let mut last = None;
            for (i, b) in tiers.bands.iter().enumerate() {
                let bf = format!("{f}.bands[{i}]");
                let is_last = i + 1 == tiers.bands.len();
                match (b.up_to, is_last) {
                    (None, true) => {}
                    (None, false) => {
                        return Err(PriceError::new(
                            format!("{bf}.up_to"),
                            "only the last band is unbounded",
                        ));
                    }
                    (Some(_), true) => {
                        return Err(PriceError::new(
                            format!("{bf}.up_to"),
                            "the last band has no up_to, so every quantity has a band",
                        ));
                    }
                    (Some(u), false) => {
                        if u == 0 || last.is_some_and(|l| u <= l) {
                            return Err(PriceError::new(
                                format!("{bf}.up_to"),
                                format!("{u} does not increase on the band before"),
                            ));
                        }
                        last = Some(u);
                    }
                }
                check_prices(&format!("{bf}.unit_prices"), &b.unit_prices)?;
                // A key priced in one band and not another would leave part of a
                // quantity without a price.
                if !b.unit_prices.keys().eq(tiers.bands[0].unit_prices.keys()) {
                    return Err(PriceError::new(
                        format!("{bf}.unit_prices"),
                        "every band prices the same keys as the first",
                    ));
                }
            }
        }
        for (i, w) in self.windows.iter().enumerate() {
            let f = format!("{field}.windows[{i}]");
            check_name(&format!("{f}.time_zone"), &w.time_zone)?;
            if jiff::tz::TimeZone::get(&w.time_zone).is_err() {
                return Err(PriceError::new(
                    format!("{f}.time_zone"),
                    format!("{:?} is not a known IANA time zone", w.time_zone),
                ));
            }
            if let Some(d) = w.weekdays.iter().find(|d| !(1..=7).contains(*d)) {
                return Err(PriceError::new(
                    format!("{f}.weekdays"),
                    format!("{d} is not an ISO weekday (1 = Monday to 7 = Sunday)"),
                ));
            }
            check_prices(&format!("{f}.unit_prices"), &w.unit_prices)?;
        }
        Ok(())
    }

    /// Whether the rule applies to an entry of this model, service and tier.
    pub fn matches(&self, model: Option<&str>, service: &str, tier: ServiceTier) -> bool {
        self.tier == tier
            && match (&self.model, model) {
                (Some(p), Some(m)) => crate::wildcard_match(p, m),
                (Some(_), None) => false,
                (None, _) => true,
            }
            && self
                .service
                .as_deref()
                .is_none_or(|p| crate::wildcard_match(p, service))
    }

    /// Whether the rule has a price for `key` anywhere: base, thresholds, bands or
    /// windows.
    pub fn names(&self, key: &PriceKey) -> bool {
        self.unit_prices.contains_key(key)
            || self
                .above_input_tokens
                .iter()
                .any(|t| t.unit_prices.contains_key(key))
            || self.tiers.as_ref().is_some_and(|t| {
                t.key.covers(key) && t.bands.iter().any(|b| b.unit_prices.contains_key(key))
            })
            || self.windows.iter().any(|w| w.unit_prices.contains_key(key))
    }
}

/// One version of a price book (entry kind `price.book`). Versions of a name count
/// 1, 2, ...; each applies from its `effective_from` until the next version's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceBook {
    /// The book's name, e.g. `list`.
    pub name: String,
    /// Its version, from 1.
    pub version: u32,
    /// The currency of every price in it.
    pub currency: Currency,
    /// From when this version prices usage.
    pub effective_from: Timestamp,
    /// How each entry's total is rounded.
    pub rounding: Rounding,
    /// Where the prices came from, when imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PriceSource>,
    /// The account node of the key that set it (see [`crate::BudgetSet::set_by`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
    /// The rules, in precedence order (see [`PriceRule`]).
    pub rules: Vec<PriceRule>,
    /// A tax levied on what the book prices, shown on statements (China's 6% VAT on
    /// information-technology services, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax: Option<BookTax>,
}

/// A tax a book declares: a rate on the amount billed in a statement's period,
/// rounded by its own rule (invoices show taxes in the currency's smallest unit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookTax {
    /// Its name, e.g. `VAT`.
    pub name: String,
    /// The rate in percent, e.g. `6`.
    #[serde(with = "exact")]
    pub rate_percent: Decimal,
    /// How the tax of a statement's period is rounded (default: 2 places, half up).
    #[serde(default = "BookTax::default_rounding")]
    pub rounding: Rounding,
}

impl BookTax {
    fn default_rounding() -> Rounding {
        Rounding {
            at: RoundingAt::Entry,
            to: 2,
            mode: RoundingMode::HalfUp,
        }
    }

    /// The tax on `base`, rounded by its rule; `None` on overflow.
    pub fn on(&self, base: Decimal) -> Option<Decimal> {
        let t = base
            .checked_mul(self.rate_percent)?
            .checked_div(Decimal::ONE_HUNDRED)?;
        Some(self.rounding.apply(t))
    }
}

impl PriceBook {
    /// Checks every field, naming the first that is wrong.
    pub fn check(&self) -> Result<(), PriceError> {
        check_name("name", &self.name)?;
        if self.version == 0 {
            return Err(PriceError::new("version", "versions count from 1"));
        }
        if self.rounding.to > MAX_ROUNDING_PLACES {
            return Err(PriceError::new(
                "rounding.to",
                format!(
                    "{} is more than {MAX_ROUNDING_PLACES} decimal places",
                    self.rounding.to
                ),
            ));
        }
        if self.rules.len() > MAX_RULES_PER_BOOK {
            return Err(PriceError::new(
                "rules",
                format!("more than {MAX_RULES_PER_BOOK} rules"),
            ));
        }
        if let Some(s) = &self.source {
            check_name("source.format", &s.format)?;
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PriceError::new(
                    "source.sha256",
                    "not 64 hexadecimal digits",
                ));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.check(&format!("rules[{i}]"))?;
        }
        if let Some(t) = &self.tax {
            check_name("tax.name", &t.name)?;
            check_percent("tax.rate_percent", &t.rate_percent, Decimal::ONE_HUNDRED)?;
            if t.rounding.to > MAX_ROUNDING_PLACES {
                return Err(PriceError::new(
                    "tax.rounding.to",
                    format!(
                        "{} is more than {MAX_ROUNDING_PLACES} decimal places",
                        t.rounding.to
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that `next` may follow this version: the same book, the next version
    /// number, and an `effective_from` at or after this one's, so versions order the
    /// same way by number and by time. A version starting when this one does replaces
    /// it wholly (a correction: [`book_in_force`] takes the higher version). (Whether
    /// it may start before the moment it is appended, re-pricing the past, is the
    /// caller's rule: entries keep their ratings, and the ledger's answer is
    /// `rating.correction` entries.)
    pub fn check_successor(&self, next: &PriceBook) -> Result<(), PriceError> {
        if next.name != self.name {
            return Err(PriceError::new(
                "name",
                format!("{:?} is not the book {:?}", next.name, self.name),
            ));
        }
        if Some(next.version) != self.version.checked_add(1) {
            return Err(PriceError::new(
                "version",
                format!(
                    "{} does not follow version {} of {}",
                    next.version, self.version, self.name
                ),
            ));
        }
        if next.effective_from < self.effective_from {
            return Err(PriceError::new(
                "effective_from",
                format!(
                    "{} is before {}, from when version {} applies",
                    next.effective_from, self.effective_from, self.version
                ),
            ));
        }
        Ok(())
    }
}

/// The period of a minimum commitment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitmentPeriod {
    /// A calendar month in the node's time zone.
    Month,
}

/// A minimum spend per period: a bill below it is topped up to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinimumCommitment {
    /// The minimum, in the book's currency.
    #[serde(with = "exact")]
    pub amount: Decimal,
    /// Per what.
    pub period: CommitmentPeriod,
}

/// The price terms of an account node (entry kind `price.contract`), inherited by its
/// subtree: the nearest node with a contract wins, whole (its fields are not merged
/// with an ancestor's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceContract {
    /// The book the node's usage is priced with.
    pub book: String,
    /// Rules tried before the book's (see [`PriceRule`]): negotiated prices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<PriceRule>,
    /// Taken off each entry's subtotal, in percent (0 to 100).
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub discount_percent: Option<Decimal>,
    /// Added on (resale), in percent, after the discount.
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub markup_percent: Option<Decimal>,
    /// A minimum spend per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_commitment: Option<MinimumCommitment>,
    /// What the contract promises about the gateway's requests made under it, and
    /// the credits owed when a period misses it (see [`crate::ServiceLevel`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_levels: Vec<crate::ServiceLevel>,
    /// The account node of the key that set it. Only a key strictly above the
    /// contract's node may set it (a tenant does not negotiate its own prices); the
    /// lead checks that with [`crate::may_change_control`] and the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
}

impl MinimumCommitment {
    /// What a period billed `billed` still owes to reach the minimum; zero when it
    /// reached it.
    pub fn shortfall(&self, billed: Decimal) -> Decimal {
        if billed >= self.amount {
            Decimal::ZERO
        } else {
            self.amount - billed
        }
    }
}

/// Whether a key at `caller` may set, change or remove the contract of `node`, whose
/// contract now is `current`: only from strictly above the node, since a tenant does
/// not negotiate its own prices, and for a contract already set, from its setter's
/// node or above too ([`crate::may_change_control`]).
pub fn may_set_contract(
    caller: &AccountPath,
    node: &AccountPath,
    current: Option<&PriceContract>,
) -> bool {
    node.is_within(caller)
        && node != caller
        && current.is_none_or(|c| crate::may_change_control(c.set_by.as_ref(), caller))
}

/// The contract that prices `node`'s usage: its own, else its parent's, and so on up
/// to its top-level node (the root takes no contract: nothing is above it to set
/// one). With the node whose contract it is.
pub fn nearest_contract<'a>(
    node: &AccountPath,
    lookup: impl Fn(&AccountPath) -> Option<&'a PriceContract>,
) -> Option<(AccountPath, &'a PriceContract)> {
    node.lineage()
        .into_iter()
        .rev()
        .find_map(|p| lookup(&p).map(|c| (p, c)))
}

/// The version of a book in force at `at`, among `versions` (one book's): the one
/// with the latest `effective_from` not after `at`.
pub fn book_in_force(versions: &[PriceBook], at: Timestamp) -> Option<&PriceBook> {
    versions
        .iter()
        .filter(|b| b.effective_from <= at)
        .max_by_key(|b| (b.effective_from, b.version))
}

/// The largest markup, in percent: a thousand-fold resale price is a typo.
pub const MAX_MARKUP_PERCENT: Decimal = Decimal::from_parts(100_000, 0, 0, false, 0);

impl PriceContract {
    /// Checks every field, naming the first that is wrong.
    pub fn check(&self) -> Result<(), PriceError> {
        check_name("book", &self.book)?;
        if self.overrides.len() > MAX_RULES_PER_BOOK {
            return Err(PriceError::new(
                "overrides",
                format!("more than {MAX_RULES_PER_BOOK} rules"),
            ));
        }
        for (i, r) in self.overrides.iter().enumerate() {
            r.check(&format!("overrides[{i}]"))?;
        }
        if let Some(d) = &self.discount_percent {
            check_percent("discount_percent", d, Decimal::ONE_HUNDRED)?;
        }
        if let Some(m) = &self.markup_percent {
            check_percent("markup_percent", m, MAX_MARKUP_PERCENT)?;
        }
        if let Some(c) = &self.minimum_commitment
            && (c.amount.is_sign_negative() || c.amount.scale() > MAX_PRICE_SCALE)
        {
            return Err(PriceError::new(
                "minimum_commitment.amount",
                format!("{} is not a non-negative amount", c.amount),
            ));
        }
        if self.service_levels.len() > crate::MAX_SERVICE_LEVELS {
            return Err(PriceError::new(
                "service_levels",
                format!("more than {} levels", crate::MAX_SERVICE_LEVELS),
            ));
        }
        for (i, l) in self.service_levels.iter().enumerate() {
            let field = format!("service_levels[{i}]");
            l.check(&field).map_err(|why| match why.split_once(": ") {
                Some((f, w)) => PriceError::new(f, w),
                None => PriceError::new(field.clone(), why.clone()),
            })?;
            if self.service_levels[..i].iter().any(|o| o.name == l.name) {
                return Err(PriceError::new(
                    format!("{field}.name"),
                    format!("{:?} names two levels", l.name),
                ));
            }
        }
        Ok(())
    }
}

/// Which count a rating priced, when the lead's setting chose one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatingBasis {
    /// The provider's reported count.
    Provider,
    /// Ciyuan's recount.
    Recount,
    /// The greater of the two, key by key.
    Greater,
}

/// One priced quantity of a usage entry. `amount == quantity × unit_price`, exact
/// (no rounding: the book rounds only the entry's total).
///
/// Written as an array, `[key, quantity, unit_price]`, with a fourth element, the
/// amount, only where it is not `quantity × unit_price` as [`Decimal::checked_mul`]
/// computes it (the same value at the same scale): every rated entry carries its
/// lines, and field names and a derivable amount were half of a rating's bytes. The
/// quantity is a JSON integer where it is whole (scale 0) and fits an `i64`, a string
/// otherwise; prices and amounts are always strings. Reading restores every field
/// exactly, scale included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedLine {
    /// What was priced.
    pub key: PriceKey,
    /// How many units (tokens, a measure's value, or 1 request).
    pub quantity: Decimal,
    /// The price per unit used.
    pub unit_price: Decimal,
    /// `quantity × unit_price`.
    pub amount: Decimal,
}

impl RatedLine {
    /// `quantity × unit_price` as a line's amount is defined, and as a line written
    /// without its amount is read: exactly [`Decimal::checked_mul`]'s result (value,
    /// scale and sign), computed in one machine multiplication where both mantissas
    /// fit 64 bits and the product fits a decimal unrounded (token counts times list
    /// prices), and by `checked_mul` otherwise. The rater prices every line with it.
    pub fn product(quantity: Decimal, unit_price: Decimal) -> Option<Decimal> {
        let scale = quantity.scale() + unit_price.scale();
        if scale <= 28
            && let (Ok(q), Ok(p)) = (
                i64::try_from(quantity.mantissa()),
                i64::try_from(unit_price.mantissa()),
            )
            && q != 0
            && p != 0
        {
            // `checked_mul` keeps a product below 2^96 at scale s₁ + s₂ ≤ 28 as it is
            // (it returns a zero, of scale 0, for a zero factor: not taken here).
            let m = i128::from(q) * i128::from(p);
            if m.unsigned_abs() < 1 << 96 {
                return Decimal::try_from_i128_with_scale(m, scale).ok();
            }
        }
        quantity.checked_mul(unit_price)
    }

    /// Whether `amount` is exactly what reading the line without it gives back.
    fn amount_is_derived(&self) -> bool {
        RatedLine::product(self.quantity, self.unit_price)
            .is_some_and(|p| wire::same(&p, &self.amount))
    }

    /// Appends the line's JSON: the bytes its `Serialize` gives through serde_json.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        wire::key(out, &self.key);
        out.push(b',');
        match wire::whole(&self.quantity) {
            Some(n) => wire::int(out, n),
            None => wire::decimal(out, &self.quantity),
        }
        out.push(b',');
        wire::decimal(out, &self.unit_price);
        if !self.amount_is_derived() {
            out.push(b',');
            wire::decimal(out, &self.amount);
        }
        out.push(b']');
    }
}

impl Serialize for RatedLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let derived = self.amount_is_derived();
        let mut t = s.serialize_tuple(if derived { 3 } else { 4 })?;
        t.serialize_element(&self.key)?;
        match wire::whole(&self.quantity) {
            Some(n) => t.serialize_element(&n)?,
            None => t.serialize_element(&wire::Text(&self.quantity))?,
        }
        t.serialize_element(&wire::Text(&self.unit_price))?;
        if !derived {
            t.serialize_element(&wire::Text(&self.amount))?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for RatedLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RatedLine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rated line: [key, quantity, unit_price] or [key, quantity, unit_price, amount]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<RatedLine, A::Error> {
                use serde::de::Error;
                let missing = |i| A::Error::invalid_length(i, &self);
                let key: PriceKey = a.next_element()?.ok_or_else(|| missing(0))?;
                let wire::Read(quantity) = a.next_element()?.ok_or_else(|| missing(1))?;
                let wire::Read(unit_price) = a.next_element()?.ok_or_else(|| missing(2))?;
                let amount = match a.next_element::<wire::Read>()? {
                    Some(wire::Read(amount)) => {
                        if a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                            return Err(A::Error::invalid_length(5, &self));
                        }
                        amount
                    }
                    None => RatedLine::product(quantity, unit_price).ok_or_else(|| {
                        A::Error::custom(format!(
                            "{key}: {quantity} × {unit_price} overflows; the amount must be written"
                        ))
                    })?,
                };
                Ok(RatedLine {
                    key,
                    quantity,
                    unit_price,
                    amount,
                })
            }
        }
        d.deserialize_seq(V)
    }
}

/// What a usage entry carries once priced: a bill line explained by its entry.
///
/// `amount == book.rounding.apply(adjust(Σ lines.amount))`, where `adjust` takes the
/// discount off and then adds the markup ([`Rating::adjust`]); see [`Rating::settle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rating {
    /// The total, rounded by the book's rule.
    #[serde(with = "exact")]
    pub amount: Decimal,
    /// The book's currency.
    pub currency: Currency,
    /// The book's name.
    pub book: String,
    /// The book's version.
    pub version: u32,
    /// Every priced quantity, full precision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<RatedLine>,
    /// The node whose contract applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<AccountPath>,
    /// The contract's discount, as applied.
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub discount_percent: Option<Decimal>,
    /// The contract's markup, as applied.
    #[serde(
        default,
        with = "exact::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub markup_percent: Option<Decimal>,
    /// No rule of the book priced the entry: the amount is zero and the lead raises an
    /// incident.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpriced: bool,
    /// Keys with a quantity that the matching rule has no price for: they cost
    /// nothing here, and the lead raises an incident for them as for `unpriced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<PriceKey>,
    /// Which count was priced, as the lead's setting chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<RatingBasis>,
    /// Where the entry's tiered units were placed in their period, when the rule that
    /// priced it has graduated or volume tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<TierPlace>,
}

/// A usage entry re-rated (entry kind `rating.correction`, on the usage entry's node):
/// what it was priced at, and the rating the prices in force for its time give now.
/// The entry itself is never edited; its amount in every cost figure becomes
/// `rating.amount` from here on (`previous` taken off, `rating` added, each in its
/// own currency, at the usage entry's time).
///
/// It carries a copy of the usage entry (`usage`, with the rating it was appended
/// with) so that the correction is explained by itself and `ciyuan audit verify` can
/// re-rate it without holding the log in memory; the verifier checks the copy against
/// the entry it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingCorrection {
    /// The index of the usage entry corrected.
    pub entry: u64,
    /// The usage entry's time.
    pub at: Timestamp,
    /// The usage entry's body as appended (its `rating` is the original one).
    pub usage: Box<crate::Usage>,
    /// The rating the entry stood at before this correction: the original, or the
    /// previous correction's.
    pub previous: Box<Rating>,
    /// The rating it stands at now.
    pub rating: Box<Rating>,
}

impl RatingCorrection {
    /// The change in the entry's cost: `(-previous, currency)` and `(rating, currency)`,
    /// or one signed amount when both are in one currency.
    pub fn changes(&self) -> impl Iterator<Item = (Currency, Decimal)> + '_ {
        let same = self.previous.currency == self.rating.currency;
        let first = if same {
            (
                self.rating.currency,
                self.rating.amount - self.previous.amount,
            )
        } else {
            (self.previous.currency, -self.previous.amount)
        };
        std::iter::once(first).chain((!same).then_some((self.rating.currency, self.rating.amount)))
    }
}

/// Where a tiered entry's units sit in their period: the rule's tiers priced them as
/// following `before` units counted earlier in the period on the same counter.
///
/// A counter is named by the billing node (the node whose contract priced the entry,
/// else the entry's top-level account), the book, the rule (`rule`: its model and
/// service patterns and tier, so it carries on across book versions) and the period.
/// Entries take their place in the order of the log: on each counter, an entry's
/// `before` is the sum of the `units` of the entries before it in the log, which
/// `ciyuan audit verify` checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPlace {
    /// The billing node whose usage the tiers count.
    pub node: AccountPath,
    /// The rule: `model|service|tier`, its patterns as written (empty when absent).
    pub rule: String,
    /// The start of the tiers' period (a day or month in the billing node's time
    /// zone), UTC.
    pub period: Timestamp,
    /// The units counted on the counter in the period before this entry.
    #[serde(with = "exact")]
    pub before: Decimal,
    /// The units this entry adds: its quantities of the keys the tiers count.
    #[serde(with = "exact")]
    pub units: Decimal,
}

impl TierPlace {
    /// The node whose usage a rating's tiers count: the node whose contract priced it,
    /// else the entry's top-level account.
    pub fn billing_node(contract: Option<&AccountPath>, account: &AccountPath) -> AccountPath {
        contract.cloned().unwrap_or_else(|| account.top_level())
    }
}

impl PriceRule {
    /// The name of the rule's tier counter (see [`TierPlace::rule`]).
    pub fn counter_name(&self) -> String {
        format!(
            "{}|{}|{}",
            self.model.as_deref().unwrap_or(""),
            self.service.as_deref().unwrap_or(""),
            self.tier.as_str()
        )
    }
}

impl Rating {
    /// A rating of `amount` by version `version` of `book`, without lines, contract,
    /// discount or markup: the start a rating is built from.
    pub fn new(
        amount: Decimal,
        currency: Currency,
        book: impl Into<String>,
        version: u32,
    ) -> Rating {
        Rating {
            amount,
            currency,
            book: book.into(),
            version,
            lines: Vec::new(),
            contract: None,
            discount_percent: None,
            markup_percent: None,
            unpriced: false,
            missing: Vec::new(),
            basis: None,
            place: None,
        }
    }

    /// `subtotal` less `discount_percent`, plus `markup_percent`, exact; `None` when
    /// it does not fit a [`Decimal`].
    pub fn adjust(
        subtotal: Decimal,
        discount_percent: Option<Decimal>,
        markup_percent: Option<Decimal>,
    ) -> Option<Decimal> {
        let mut v = subtotal;
        if let Some(d) = discount_percent {
            let off = v.checked_mul(d)?.checked_div(Decimal::ONE_HUNDRED)?;
            v = v.checked_sub(off)?;
        }
        if let Some(m) = markup_percent {
            let on = v.checked_mul(m)?.checked_div(Decimal::ONE_HUNDRED)?;
            v = v.checked_add(on)?;
        }
        Some(v)
    }

    /// Sets `amount` from the lines: their exact sum, adjusted, then rounded by
    /// `rounding`. The only way a rating's amount is computed; `None` on overflow.
    pub fn settle(&mut self, rounding: &Rounding) -> Option<()> {
        let sum = Rating::sum_lines(&self.lines)?;
        let adjusted = Rating::adjust(sum, self.discount_percent, self.markup_percent)?;
        self.amount = rounding.apply(adjusted);
        Some(())
    }

    /// The lines' amounts added up in order with [`Decimal::checked_add`] from zero:
    /// its exact result (value, scale and sign). Where every amount is positive and
    /// fits 64 bits, that is the sum of the mantissas aligned to the largest scale, done
    /// in one pass of integer additions (`checked_add` builds each partial sum as a
    /// decimal, a store-forwarding stall apiece, and was most of `settle`).
    fn sum_lines(lines: &[RatedLine]) -> Option<Decimal> {
        let aligned = || {
            let scale = lines.iter().map(|l| l.amount.scale()).max()?;
            let mut total: u128 = 0;
            for l in lines {
                let a = &l.amount;
                // A zero keeps the other operand's scale in `checked_add`: not here.
                if a.is_sign_negative() || a.is_zero() {
                    return None;
                }
                let m = u64::try_from(a.mantissa()).ok()?;
                let up = scale - a.scale();
                // 10^19 × a 64-bit mantissa still fits 128 bits.
                if up > 19 {
                    return None;
                }
                total = total.checked_add(u128::from(m) * 10u128.pow(up))?;
            }
            // Exact while every partial sum fits a decimal's 96 bits (they grow).
            if total >= 1 << 96 {
                return None;
            }
            Decimal::try_from_i128_with_scale(i128::try_from(total).ok()?, scale).ok()
        };
        if let Some(sum) = aligned() {
            return Some(sum);
        }
        let mut sum = Decimal::ZERO;
        for l in lines {
            sum = sum.checked_add(l.amount)?;
        }
        Some(sum)
    }

    /// Appends the rating's JSON to `out`: the bytes serde_json writes for it, built
    /// without the serializer, as a usage entry is encoded (`Entry::encode_into`).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        // Every field named: one added to `Rating` must be written here too.
        let Rating {
            amount,
            currency,
            book,
            version,
            lines,
            contract,
            discount_percent,
            markup_percent,
            unpriced,
            missing,
            basis,
            place,
        } = self;
        out.extend_from_slice(b"{\"amount\":");
        wire::decimal(out, amount);
        out.extend_from_slice(b",\"currency\":");
        wire::plain(out, &[currency.as_str()]);
        out.extend_from_slice(b",\"book\":");
        wire::string(out, book);
        out.extend_from_slice(b",\"version\":");
        wire::int(out, i64::from(*version));
        if !lines.is_empty() {
            out.extend_from_slice(b",\"lines\":[");
            for (i, line) in lines.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                line.write_json(out);
            }
            out.push(b']');
        }
        if let Some(c) = contract {
            out.extend_from_slice(b",\"contract\":");
            serde_json::to_writer(&mut *out, c)?;
        }
        if let Some(d) = discount_percent {
            out.extend_from_slice(b",\"discount_percent\":");
            wire::decimal(out, d);
        }
        if let Some(m) = markup_percent {
            out.extend_from_slice(b",\"markup_percent\":");
            wire::decimal(out, m);
        }
        if *unpriced {
            out.extend_from_slice(b",\"unpriced\":true");
        }
        if !missing.is_empty() {
            out.extend_from_slice(b",\"missing\":[");
            for (i, k) in missing.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                wire::key(out, k);
            }
            out.push(b']');
        }
        // Rare, and free to grow: written by their own serde.
        if let Some(b) = basis {
            out.extend_from_slice(b",\"basis\":");
            serde_json::to_writer(&mut *out, b)?;
        }
        if let Some(p) = place {
            out.extend_from_slice(b",\"place\":");
            serde_json::to_writer(&mut *out, p)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// Random ratings for the codec's tests (here, and the entry codec's in `reuse`).
#[cfg(test)]
pub(crate) mod arb {
    use super::*;
    use proptest::prelude::*;

    /// Any decimal, and often one shaped like a count, a price or an amount.
    pub(crate) fn decimal() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            (0i64..10_000_000).prop_map(Decimal::from),
            (1i64..1_000_000, 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s)),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<bool>(),
                0u32..=28
            )
                .prop_map(|(lo, mid, hi, neg, scale)| Decimal::from_parts(lo, mid, hi, neg, scale)),
            any::<i64>().prop_map(Decimal::from),
        ]
    }

    /// Text with quotes, backslashes, control characters and any other character.
    pub(crate) fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z.]{1,12}",
            prop::collection::vec(
                prop_oneof![
                    any::<char>(),
                    Just('"'),
                    Just('\\'),
                    (0u8..0x20).prop_map(char::from),
                    Just('\u{7f}'),
                    Just('/'),
                ],
                0..12
            )
            .prop_map(String::from_iter),
        ]
    }

    pub(crate) fn key() -> impl Strategy<Value = PriceKey> {
        prop_oneof![
            4 => (0..Modality::ALL.len(), 0..Direction::ALL.len())
                .prop_map(|(m, d)| PriceKey::Tokens(Modality::ALL[m], Direction::ALL[d])),
            1 => "[a-z_]{1,10}".prop_map(PriceKey::Measure),
            1 => Just(PriceKey::Request),
        ]
    }

    pub(crate) fn line() -> impl Strategy<Value = RatedLine> {
        (key(), decimal(), decimal(), decimal(), any::<bool>()).prop_map(
            |(key, quantity, unit_price, other, derived)| RatedLine {
                key,
                quantity,
                unit_price,
                // The rater's lines, whose amount is the product, and any others.
                amount: match RatedLine::product(quantity, unit_price) {
                    Some(p) if derived => p,
                    _ => other,
                },
            },
        )
    }

    pub(crate) fn rating() -> impl Strategy<Value = Rating> {
        let head = (
            decimal(),
            prop_oneof![Just("USD"), Just("CNY"), Just("EUR")],
            text(),
            any::<u32>(),
            prop::collection::vec(line(), 0..6),
            prop_oneof![Just(None), Just(Some("/")), Just(Some("acme/cn"))],
        );
        let tail = (
            proptest::option::of(decimal()),
            proptest::option::of(decimal()),
            any::<bool>(),
            prop::collection::vec(key(), 0..3),
            proptest::option::of(prop_oneof![
                Just(RatingBasis::Provider),
                Just(RatingBasis::Recount),
                Just(RatingBasis::Greater)
            ]),
            proptest::option::of((0i64..4_000_000_000, 0i32..1_000_000_000, decimal())),
        );
        (head, tail).prop_map(
            |(
                (amount, currency, book, version, lines, contract),
                (discount_percent, markup_percent, unpriced, missing, basis, place),
            )| Rating {
                amount,
                currency: currency.parse().unwrap(),
                book,
                version,
                lines,
                contract: contract.map(|c| {
                    if c == "/" {
                        AccountPath::root()
                    } else {
                        c.parse().unwrap()
                    }
                }),
                discount_percent,
                markup_percent,
                unpriced,
                missing,
                basis,
                place: place.map(|(secs, nanos, before)| TierPlace {
                    node: "acme".parse().unwrap(),
                    rule: "gpt-4o*||standard".into(),
                    period: Timestamp::new(secs, nanos).unwrap(),
                    before,
                    units: before,
                }),
            },
        )
    }

    /// Equal, and every decimal at the same scale: nothing was lost in the bytes.
    pub(crate) fn assert_exactly(got: &Rating, want: &Rating) {
        assert_eq!(got, want);
        let scales = |r: &Rating| {
            let mut v = vec![r.amount.scale()];
            for l in &r.lines {
                v.extend([l.quantity.scale(), l.unit_price.scale(), l.amount.scale()]);
            }
            v.extend(r.discount_percent.map(|d| d.scale()));
            v.extend(r.markup_percent.map(|d| d.scale()));
            v.extend(r.place.as_ref().map(|p| p.before.scale()));
            v
        };
        assert_eq!(scales(got), scales(want), "scales of {want:?}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_text_is_display_exactly() {
        use proptest::prelude::*;
        let mut buf = [0u8; 64];
        for d in [
            Decimal::ZERO,
            Decimal::new(0, 5),
            Decimal::new(-0, 3),
            Decimal::new(450, 2),
            Decimal::new(-25, 7),
            Decimal::MAX,
            Decimal::MIN,
            Decimal::from_i128_with_scale(1, 28),
            Decimal::from_i128_with_scale(-79228162514264337593543950335, 28),
        ] {
            assert_eq!(exact::text(&d, &mut buf), d.to_string());
        }
        proptest!(|(m in any::<i64>(), hi in any::<u32>(), neg in any::<bool>(), scale in 0u32..=28)| {
            let d = Decimal::from_parts(m as u32, (m >> 32) as u32, hi, neg, scale);
            let mut buf = [0u8; 64];
            prop_assert_eq!(exact::text(&d, &mut buf), d.to_string());
        });
    }

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }

    #[test]
    fn number_text_becomes_the_exact_decimal() {
        for (text, want) in [
            ("2.5e-06", "0.0000025"),
            ("1e-05", "0.00001"),
            ("1.25E-05", "0.0000125"),
            ("1E3", "1000"),
            ("1.5e+2", "150"),
            ("0", "0"),
            ("-0.50", "-0.50"),
            ("3e-09", "0.000000003"),
            ("1.875e-08", "0.00000001875"),
            ("256000.0", "256000.0"),
            ("0.1", "0.1"),
            ("1e-28", "0.0000000000000000000000000001"),
            ("10e-29", "0.0000000000000000000000000001"),
        ] {
            assert_eq!(decimal_from_text(text).unwrap(), d(want), "{text}");
            assert_eq!(decimal_from_text(text).unwrap().to_string(), want, "{text}");
        }
        for bad in [
            "", "-", ".", "e5", "1e", "1e+", "1.2.3", "0x10", "1_000", "inf", "NaN", "1e-29",
            "1e99999", " 1",
        ] {
            let err = decimal_from_text(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn keys_parse_and_print() {
        for k in [
            "text.input",
            "text.cached_input",
            "audio.output",
            "measure.pages",
            "request",
        ] {
            assert_eq!(k.parse::<PriceKey>().unwrap().to_string(), k);
        }
        assert!("text".parse::<PriceKey>().is_err());
        assert!("text.sideways".parse::<PriceKey>().is_err());
        assert!("measure.".parse::<PriceKey>().is_err());
        assert!("image.cache_write".parse::<PriceKey>().unwrap().is_input());
        assert!(!"text.reasoning".parse::<PriceKey>().unwrap().is_input());
    }

    #[test]
    fn rounding_modes() {
        let r = |to, mode| Rounding {
            at: RoundingAt::Entry,
            to,
            mode,
        };
        assert_eq!(r(2, RoundingMode::HalfEven).apply(d("0.125")), d("0.12"));
        assert_eq!(r(2, RoundingMode::HalfEven).apply(d("0.135")), d("0.14"));
        assert_eq!(r(2, RoundingMode::HalfUp).apply(d("0.125")), d("0.13"));
        assert_eq!(r(2, RoundingMode::Down).apply(d("0.129")), d("0.12"));
        assert_eq!(r(2, RoundingMode::Up).apply(d("0.121")), d("0.13"));
        assert_eq!(r(2, RoundingMode::Up).apply(d("0.12")), d("0.12"));
    }

    fn rule() -> PriceRule {
        PriceRule {
            model: Some("gpt-4o*".into()),
            unit_prices: [("text.input".parse().unwrap(), d("0.0000025"))].into(),
            ..PriceRule::default()
        }
    }

    fn book() -> PriceBook {
        PriceBook {
            tax: None,
            name: "list".into(),
            version: 1,
            currency: "USD".parse().unwrap(),
            effective_from: "2026-01-01T00:00:00Z".parse().unwrap(),
            rounding: Rounding::default(),
            source: None,
            set_by: None,
            rules: vec![rule()],
        }
    }

    #[test]
    fn books_serialize_with_string_amounts_and_round_trip() {
        let b = book();
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"name":"list","version":1,"currency":"USD","effective_from":"2026-01-01T00:00:00Z","rounding":{"where":"entry","to":10,"mode":"half_even"},"rules":[{"model":"gpt-4o*","unit_prices":{"text.input":"0.0000025"}}]}"#
        );
        assert_eq!(serde_json::from_str::<PriceBook>(&json).unwrap(), b);
        // A float amount would have passed through f64: refused.
        let float = json.replace(r#""0.0000025""#, "2.5e-06");
        let err = serde_json::from_str::<PriceBook>(&float).unwrap_err();
        assert!(err.to_string().contains("is a float"), "{err}");
        // A misspelt field is an error, not a rule without prices.
        let typo = json.replace("unit_prices", "unit_price");
        assert!(serde_json::from_str::<PriceBook>(&typo).is_err());
    }

    #[test]
    fn checks_name_the_field() {
        let check = |f: &dyn Fn(&mut PriceBook)| {
            let mut b = book();
            f(&mut b);
            b.check().unwrap_err().to_string()
        };
        assert!(book().check().is_ok());
        assert_eq!(check(&|b| b.version = 0), "version: versions count from 1");
        assert!(
            check(&|b| b.rules[0]
                .unit_prices
                .insert("text.output".parse().unwrap(), d("-1"))
                .map_or((), |_| ()))
            .starts_with("rules[0].unit_prices.text.output: price -1 is negative")
        );
        assert!(
            check(&|b| {
                b.rules[0].model = None;
            })
            .starts_with("rules[0]: a rule names")
        );
        assert!(
            check(&|b| b.rules[0].above_input_tokens = vec![
                Threshold {
                    input_tokens: 200_000,
                    unit_prices: UnitPrices::new()
                },
                Threshold {
                    input_tokens: 128_000,
                    unit_prices: UnitPrices::new()
                },
            ])
            .starts_with("rules[0].above_input_tokens[1].input_tokens:")
        );
        assert!(
            check(&|b| b.rules[0].windows = vec![TimeWindow {
                from: "00:00".parse().unwrap(),
                to: "08:00".parse().unwrap(),
                time_zone: "Mars/Olympus".into(),
                weekdays: vec![],
                unit_prices: UnitPrices::new(),
            }])
            .starts_with("rules[0].windows[0].time_zone:")
        );
        assert!(
            check(&|b| b.rules[0].tiers = Some(Tiers {
                kind: TierKind::Graduated,
                period: TierPeriod::Month,
                key: TierKey::All,
                bands: vec![Band {
                    up_to: Some(10),
                    unit_prices: UnitPrices::new()
                }],
            }))
            .starts_with("rules[0].tiers.bands[0].up_to: the last band")
        );
        assert!(check(&|b| b.rounding.to = 19).starts_with("rounding.to:"));
        assert!(
            check(&|b| {
                b.rules[0].unit_prices.insert(PriceKey::Request, d("1"));
            })
            .starts_with("rules[0].unit_prices.request:")
        );
    }

    #[test]
    fn contracts_check_percentages() {
        let mut c = PriceContract {
            book: "list".into(),
            overrides: vec![rule()],
            discount_percent: Some(d("12.5")),
            markup_percent: None,
            minimum_commitment: Some(MinimumCommitment {
                amount: d("1000"),
                period: CommitmentPeriod::Month,
            }),
            service_levels: Vec::new(),
            set_by: Some("acme".parse().unwrap()),
        };
        assert!(c.check().is_ok());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<PriceContract>(&json).unwrap(), c);
        c.discount_percent = Some(d("100.1"));
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("discount_percent: 100.1 is not a percentage")
        );
    }

    #[test]
    fn contracts_are_set_from_strictly_above_and_inherited_from_the_nearest() {
        let p = |s: &str| s.parse::<AccountPath>().unwrap();
        let c = |by: &str| PriceContract {
            book: "list".into(),
            overrides: vec![],
            discount_percent: None,
            markup_percent: None,
            minimum_commitment: None,
            service_levels: Vec::new(),
            set_by: Some(p(by)),
        };
        let from_root = PriceContract {
            set_by: Some(AccountPath::root()),
            ..c("acme")
        };
        assert!(may_set_contract(&p("acme"), &p("acme/cn"), None));
        assert!(!may_set_contract(&p("acme/cn"), &p("acme/cn"), None));
        assert!(!may_set_contract(&p("acme/cn/hr"), &p("acme/cn"), None));
        assert!(!may_set_contract(&p("other"), &p("acme/cn"), None));
        assert!(may_set_contract(&AccountPath::root(), &p("acme"), None));
        assert!(!may_set_contract(
            &AccountPath::root(),
            &AccountPath::root(),
            None
        ));
        // A contract set from the root is not lifted by acme's key.
        assert!(!may_set_contract(
            &p("acme"),
            &p("acme/cn"),
            Some(&from_root)
        ));
        assert!(may_set_contract(
            &p("acme"),
            &p("acme/cn"),
            Some(&c("acme"))
        ));

        let contracts: BTreeMap<AccountPath, PriceContract> =
            [(p("acme"), c("acme")), (p("acme/cn/hr"), c("acme/cn"))].into();
        let near =
            |n: &str| nearest_contract(&p(n), |q| contracts.get(q)).map(|(q, _)| q.to_string());
        assert_eq!(near("acme/cn/hr/x").as_deref(), Some("acme/cn/hr"));
        assert_eq!(near("acme/cn").as_deref(), Some("acme"));
        assert_eq!(near("other"), None);
        let m = MinimumCommitment {
            amount: d("100"),
            period: CommitmentPeriod::Month,
        };
        assert_eq!(m.shortfall(d("30.5")), d("69.5"));
        assert_eq!(m.shortfall(d("130")), Decimal::ZERO);
    }

    #[test]
    fn a_tax_rate_is_a_percentage_and_rounds_by_its_rule() {
        let mut b = book();
        b.tax = Some(BookTax {
            name: "VAT".into(),
            rate_percent: d("6"),
            rounding: BookTax::default_rounding(),
        });
        assert!(b.check().is_ok());
        let tax = b.tax.clone().unwrap();
        assert_eq!(tax.on(d("4.08")).unwrap(), d("0.24"));
        for bad in ["-1", "100.5"] {
            let mut over = b.clone();
            over.tax.as_mut().unwrap().rate_percent = d(bad);
            let e = over.check().unwrap_err().to_string();
            assert!(e.starts_with("tax.rate_percent:"), "{e}");
        }
    }

    #[test]
    fn versions_follow_in_number_and_time() {
        let v1 = book();
        let mut v2 = book();
        v2.version = 2;
        v2.effective_from = "2026-02-01T00:00:00Z".parse().unwrap();
        assert!(v1.check_successor(&v2).is_ok());
        let mut late = v2.clone();
        late.version = 3;
        assert!(
            v1.check_successor(&late)
                .unwrap_err()
                .to_string()
                .starts_with("version: 3 does not follow version 1")
        );
        let mut same = v2.clone();
        same.effective_from = v1.effective_from;
        assert!(v1.check_successor(&same).is_ok());
        let v2_same = [v1.clone(), same];
        assert_eq!(
            book_in_force(&v2_same, v1.effective_from).map(|b| b.version),
            Some(2),
            "a version starting with the one before corrects it"
        );
        let mut early = v2.clone();
        early.effective_from = "2025-12-31T00:00:00Z".parse().unwrap();
        assert!(
            v1.check_successor(&early)
                .unwrap_err()
                .to_string()
                .starts_with("effective_from:")
        );
        let versions = [v1.clone(), v2.clone()];
        let at = |t: &str| book_in_force(&versions, t.parse().unwrap()).map(|b| b.version);
        assert_eq!(at("2025-12-31T23:59:59Z"), None);
        assert_eq!(at("2026-01-15T00:00:00Z"), Some(1));
        assert_eq!(at("2026-02-01T00:00:00Z"), Some(2));
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let w = |from: &str, to: &str, days: Vec<u8>| TimeWindow {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            time_zone: "UTC".into(),
            weekdays: days,
            unit_prices: UnitPrices::new(),
        };
        let night = w("22:30", "06:00", vec![]);
        assert!(night.contains(1, 22 * 60 + 30));
        assert!(night.contains(1, 0));
        assert!(night.contains(1, 5 * 60 + 59));
        assert!(!night.contains(1, 6 * 60));
        assert!(!night.contains(1, 12 * 60));
        let day = w("08:00", "18:00", vec![1, 2, 3, 4, 5]);
        assert!(day.contains(5, 8 * 60));
        assert!(!day.contains(6, 8 * 60));
        assert!(w("00:00", "00:00", vec![6, 7]).contains(7, 1439));
        assert!("24:00".parse::<ClockTime>().is_err());
        assert!("7:00".parse::<ClockTime>().is_err());
    }

    #[test]
    fn settle_rounds_once_after_discount_and_markup() {
        let line = |q: &str, p: &str| RatedLine {
            key: "text.input".parse().unwrap(),
            quantity: d(q),
            unit_price: d(p),
            amount: d(q) * d(p),
        };
        let mut r = Rating {
            amount: Decimal::ZERO,
            currency: "CNY".parse().unwrap(),
            book: "list".into(),
            version: 1,
            lines: vec![line("3", "0.005"), line("1", "0.005")],
            contract: None,
            discount_percent: Some(d("10")),
            markup_percent: Some(d("50")),
            unpriced: false,
            missing: vec![],
            basis: None,
            place: None,
        };
        // 0.02 × 0.9 × 1.5 = 0.027: rounded once, not per line (each line would be 0.01
        // and 0.00 at two places).
        r.settle(&Rounding {
            at: RoundingAt::Entry,
            to: 2,
            mode: RoundingMode::HalfUp,
        })
        .unwrap();
        assert_eq!(r.amount, d("0.03"));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Rating>(&json).unwrap(), r);
        assert!(
            json.starts_with(r#"{"amount":"0.03","currency":"CNY""#),
            "{json}"
        );
    }

    #[test]
    fn ratings_round_trip_exactly_through_their_compact_bytes() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(2000), |(r in arb::rating())| {
            let bytes = serde_json::to_vec(&r).unwrap();
            // The append path's hand-written bytes are serde's, byte for byte.
            let mut by_hand = Vec::new();
            r.write_json(&mut by_hand).unwrap();
            prop_assert_eq!(
                String::from_utf8_lossy(&by_hand),
                String::from_utf8_lossy(&bytes)
            );
            let back: Rating = serde_json::from_slice(&bytes).unwrap();
            arb::assert_exactly(&back, &r);
            // And written again, the same bytes.
            prop_assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);
        });
    }

    #[test]
    fn decimals_are_written_as_their_exact_text() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(20_000), |(x in arb::decimal())| {
            let mut out = Vec::new();
            wire::decimal(&mut out, &x);
            prop_assert_eq!(String::from_utf8(out).unwrap(), format!("\"{x}\""));
        });
        for x in [
            Decimal::ZERO,
            Decimal::new(-0, 5),
            Decimal::MAX,
            Decimal::MIN,
            Decimal::new(5, 28),
            d("-0.001"),
        ] {
            let mut out = Vec::new();
            wire::decimal(&mut out, &x);
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{x}\""));
        }
    }

    #[test]
    fn timestamps_are_written_as_jiff_writes_them() {
        use proptest::prelude::*;
        let check = |secs: i64, nanos: i32| {
            let ts = Timestamp::new(secs, nanos).unwrap();
            let mut out = Vec::new();
            if wire::timestamp(&mut out, &ts) {
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&ts).unwrap()
                );
            } else {
                assert!(out.is_empty());
                assert!(ts < Timestamp::UNIX_EPOCH, "{ts}");
            }
        };
        proptest!(ProptestConfig::with_cases(20_000), |(
            secs in prop_oneof![0i64..253_402_207_200, -100_000i64..100_000, 1_700_000_000i64..1_900_000_000],
            nanos in prop_oneof![Just(0i32), 0i32..1_000_000_000, (0i32..1000).prop_map(|n| n * 1_000_000), (0i32..1_000_000).prop_map(|n| n * 1000)],
        )| {
            check(secs, nanos);
        });
        // jiff's last second is 253_402_207_200.
        for secs in [0, 951_782_400, 4_107_542_400, 253_402_207_199, -1] {
            check(secs, 0);
            check(secs, 1);
            check(secs, 999_999_999);
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(2000), |(t in arb::text())| {
            let mut out = Vec::new();
            wire::string(&mut out, &t);
            prop_assert_eq!(out, serde_json::to_vec(&t).unwrap());
        });
        // Long texts, mostly plain, escapes anywhere (on either side of the writer's
        // sixteen-byte chunks).
        let long = prop::collection::vec(
            prop_oneof![
                8 => "[a-z0-9=,é中]",
                1 => prop_oneof![Just("\"".to_string()), Just("\\".to_string()), Just("\u{1f}".to_string()), Just("\n".to_string())],
            ],
            0..120,
        )
        .prop_map(|parts| parts.concat());
        proptest!(ProptestConfig::with_cases(2000), |(t in long)| {
            let mut out = Vec::new();
            wire::string(&mut out, &t);
            prop_assert_eq!(out, serde_json::to_vec(&t).unwrap());
        });
        for n in [0, 7, -1, i64::MAX, i64::MIN, 1_000_000] {
            let mut out = Vec::new();
            wire::int(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn rated_lines_are_compact_arrays() {
        let line = |q: &str, p: &str, a: &str| RatedLine {
            key: "text.input".parse().unwrap(),
            quantity: d(q),
            unit_price: d(p),
            amount: d(a),
        };
        for (l, want) in [
            // The rater's lines: the amount is the product and left out.
            (
                line("1000", "0.0000025", "0.0025000"),
                r#"["text.input",1000,"0.0000025"]"#,
            ),
            // A fractional quantity (a measure) is a string.
            (line("1.5", "2", "3.0"), r#"["text.input","1.5","2"]"#),
            // Not the product (a changed amount, or another scale): written.
            (
                line("1000", "0.0000025", "0.0026"),
                r#"["text.input",1000,"0.0000025","0.0026"]"#,
            ),
            (
                line("1000", "0.0000025", "0.0025"),
                r#"["text.input",1000,"0.0000025","0.0025"]"#,
            ),
        ] {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(json, want);
            let back: RatedLine = serde_json::from_str(&json).unwrap();
            assert_eq!(
                (back.amount, back.amount.scale()),
                (l.amount, l.amount.scale())
            );
        }
        for bad in [
            r#"["text.input",1000]"#,
            r#"["text.input",1000,"1","1000","x"]"#,
            r#"["text.input",1000,1.5]"#,
            r#"{"key":"text.input","quantity":"1","unit_price":"1","amount":"1"}"#,
        ] {
            assert!(serde_json::from_str::<RatedLine>(bad).is_err(), "{bad}");
        }
        // A product that overflows cannot be left out, and is not read as if it were.
        let big = Decimal::MAX;
        let l = RatedLine {
            key: PriceKey::Request,
            quantity: big,
            unit_price: big,
            amount: Decimal::ONE,
        };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<RatedLine>(&json).unwrap(), l);
        let cut = json.rsplit_once(',').unwrap().0.to_string() + "]";
        assert!(serde_json::from_str::<RatedLine>(&cut).is_err(), "{cut}");
    }

    #[test]
    fn lines_add_up_as_checked_add_adds_them() {
        use proptest::prelude::*;
        let chain = |lines: &[RatedLine]| {
            let mut sum = Some(Decimal::ZERO);
            for l in lines {
                sum = sum.and_then(|s| s.checked_add(l.amount));
            }
            sum.map(|d| d.serialize())
        };
        let positive = prop_oneof![
            (1i64..10_000_000, 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s)),
            (1u64..u64::MAX, 0u32..=28)
                .prop_map(|(m, s)| Decimal::from_i128_with_scale(i128::from(m), s)),
            Just(Decimal::ZERO),
            Just(Decimal::new(0, 7)),
        ];
        let line = (arb::line(), positive, any::<bool>()).prop_map(|(mut l, a, keep)| {
            if !keep {
                l.amount = a;
            }
            l
        });
        proptest!(ProptestConfig::with_cases(20_000), |(lines in prop::collection::vec(line, 0..6))| {
            prop_assert_eq!(Rating::sum_lines(&lines).map(|d| d.serialize()), chain(&lines));
        });
    }

    #[test]
    fn a_lines_product_is_checked_muls_exactly() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(20_000), |(q in arb::decimal(), p in arb::decimal())| {
            let want = q.checked_mul(p);
            let got = RatedLine::product(q, p);
            prop_assert_eq!(got.map(|d| d.serialize()), want.map(|d| d.serialize()), "{} × {}", q, p);
        });
        for (q, p) in [
            (Decimal::ZERO, d("0.0000025")),
            (d("-3"), d("0.5")),
            (d("3"), d("-0.50")),
            (Decimal::from(i64::MAX), Decimal::from(i64::MAX)),
            (Decimal::from(i64::MIN), d("1.5")),
            (d("1000"), Decimal::from_i128_with_scale(25, 28)),
        ] {
            assert_eq!(
                RatedLine::product(q, p).map(|d| d.serialize()),
                q.checked_mul(p).map(|d| d.serialize()),
                "{q} × {p}"
            );
        }
    }
}
