//! Decoding ledger bytes into an entry that already exists, reusing its allocations.
//!
//! The projector decodes every entry of the log, millions of usage entries in a row, and
//! consecutive entries mostly carry strings of similar size (account, service, model,
//! source, event id, definition): reading them into the previous entry's buffers spares
//! an allocation and a free per string. The result is always exactly what
//! [`Entry::decode`] returns: the fast path reads the encoding this build writes (one
//! pass, fields in the written order), and anything it does not expect (an error, an
//! unusual layout) is decoded again by [`Entry::decode`], whose answer, value or error,
//! is then the answer.

use crate::entry::{DecodeError, ENTRY_VERSION, Entry, EntryBody, Usage};
use crate::path::AccountPath;
use crate::tokens::{Direction, Modality, TokenMap};
use jiff::Timestamp;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

impl Entry {
    /// Decodes ledger bytes into `self`, reusing its allocations where it can; the same
    /// entry, or the same error, as [`Entry::decode`]. On error `self` holds some valid
    /// entry, not necessarily a meaningful one.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let fast = EntrySeed(self).deserialize(&mut de).and_then(|()| de.end());
        if fast.is_err() {
            *self = Entry::decode(bytes)?;
        }
        Ok(())
    }
}

/// Appends a usage entry's ledger bytes: exactly what [`Entry::encode`]'s serde path
/// (`EntryOut` over the derived `Serialize` of [`Usage`]) writes, built by hand.
/// Usage entries are nearly every entry the ledger appends, and serde's per-field
/// calls (a key escaped and a closure per field, a `String` per token key, the
/// formatting machinery for the account) were a measurable part of each append. The
/// rare parts (measures, quality, recount, tier) are written by their own serde.
pub(crate) fn encode_usage(e: &Entry, u: &Usage, out: &mut Vec<u8>) -> serde_json::Result<()> {
    use crate::price::wire;
    // Every field named: one added to `Usage` must be written here too.
    let Usage {
        service,
        model,
        tokens,
        source,
        event_id,
        definition,
        partial,
        measures,
        quality,
        recount,
        rating,
        tier,
        key,
        session,
        tags,
    } = u;
    out.extend_from_slice(b"{\"v\":");
    wire::int(out, i64::from(e.v));
    out.extend_from_slice(b",\"ts\":");
    if !wire::timestamp(out, &e.ts) {
        serde_json::to_writer(&mut *out, &e.ts)?;
    }
    out.extend_from_slice(b",\"account\":");
    // `AccountPath`'s written form: the root is "/", any other node its path.
    wire::string(
        out,
        if e.account.is_root() {
            "/"
        } else {
            e.account.as_str()
        },
    );
    out.extend_from_slice(b",\"kind\":\"usage\",\"data\":{\"service\":");
    wire::string(out, service);
    let opt = |out: &mut Vec<u8>, name: &[u8], v: Option<&str>| {
        if let Some(v) = v {
            out.extend_from_slice(name);
            wire::string(out, v);
        }
    };
    opt(out, b",\"model\":", model.as_deref());
    out.extend_from_slice(b",\"tokens\":{");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        wire::token_key_json(out, t.modality, t.direction);
        out.push(b':');
        wire::int(out, t.count);
    }
    out.push(b'}');
    opt(out, b",\"source\":", source.as_deref());
    opt(out, b",\"event_id\":", event_id.as_deref());
    opt(out, b",\"definition\":", definition.as_deref());
    if *partial {
        out.extend_from_slice(b",\"partial\":true");
    }
    if !measures.is_empty() {
        out.extend_from_slice(b",\"measures\":");
        serde_json::to_writer(&mut *out, measures)?;
    }
    if let Some(q) = quality {
        out.extend_from_slice(b",\"quality\":");
        serde_json::to_writer(&mut *out, q)?;
    }
    if let Some(r) = recount {
        out.extend_from_slice(b",\"recount\":");
        serde_json::to_writer(&mut *out, r)?;
    }
    if let Some(r) = rating {
        out.extend_from_slice(b",\"rating\":");
        r.write_json(out)?;
    }
    if let Some(t) = tier {
        out.extend_from_slice(b",\"tier\":");
        serde_json::to_writer(&mut *out, t)?;
    }
    opt(out, b",\"key\":", key.as_deref());
    opt(out, b",\"session\":", session.as_deref());
    if !tags.is_empty() {
        out.extend_from_slice(b",\"tags\":{");
        for (i, (k, v)) in tags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            wire::string(out, k);
            out.push(b':');
            wire::string(out, v);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"}}");
    Ok(())
}

/// A string borrowed from the input where it has no escapes.
struct Str<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Replaces the contents of `slot` with `s`, keeping its buffer.
fn set(slot: &mut String, s: &str) {
    slot.clear();
    slot.push_str(s);
}

/// [`set_opt`] for a text that may be a shared constant: an owned buffer is reused.
fn set_opt_cow(slot: &mut Option<std::borrow::Cow<'static, str>>, s: Option<Str<'_>>) {
    match (s, slot.as_mut()) {
        (None, _) => *slot = None,
        (Some(Str(s)), Some(std::borrow::Cow::Owned(buf))) => set(buf, &s),
        (Some(Str(s)), _) => *slot = Some(std::borrow::Cow::Owned(s.into_owned())),
    }
}

/// Like [`set`] for an optional string: `None` keeps nothing, `Some` reuses any buffer.
fn set_opt(slot: &mut Option<String>, s: Option<Str<'_>>) {
    match s {
        None => *slot = None,
        Some(Str(s)) => match slot {
            Some(buf) => set(buf, &s),
            None => *slot = Some(s.into_owned()),
        },
    }
}

/// Reads one entry into the target, in the order [`Entry::encode`] writes.
struct EntrySeed<'e>(&'e mut Entry);

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a ledger entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let e = self.0;
        // Anything unexpected is an error here, and `decode_into` then asks the exact
        // decoder for the answer.
        let unexpected = || A::Error::custom("not the layout this build writes");
        let (mut v, mut ts, mut account, mut kind, mut data) = (None, None, false, None, false);
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            match key.as_ref() {
                "v" if v.is_none() => {
                    let n: u16 = map.next_value()?;
                    if n != ENTRY_VERSION {
                        return Err(unexpected());
                    }
                    v = Some(n);
                }
                "ts" if ts.is_none() => ts = Some(map.next_value::<Timestamp>()?),
                "account" if !account => {
                    let Str(s) = map.next_value()?;
                    // A valid non-root internal form is its own written form, so an equal
                    // string needs no new check; the root is written "/", never "".
                    if e.account.is_root() || e.account.as_str() != s {
                        e.account = AccountPath::parse(&s).map_err(A::Error::custom)?;
                    }
                    account = true;
                }
                "kind" if kind.is_none() => kind = Some(map.next_value::<Str<'de>>()?.0),
                "data" if !data => {
                    match kind.as_deref() {
                        Some("usage") => {
                            if !matches!(e.body, EntryBody::Usage(_)) {
                                e.body = EntryBody::Usage(Usage::default());
                            }
                            let EntryBody::Usage(u) = &mut e.body else {
                                return Err(unexpected());
                            };
                            map.next_value_seed(UsageSeed(u))?;
                        }
                        Some(_) => {
                            // Rare kinds: decoded whole, as `Entry::decode` does.
                            let _: &'de RawValue = map.next_value()?;
                            return Err(unexpected());
                        }
                        None => return Err(unexpected()),
                    }
                    data = true;
                }
                "v" | "ts" | "account" | "kind" | "data" => return Err(unexpected()),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (v, ts, account, data) {
            (Some(v), Some(ts), true, true) => {
                e.v = v;
                e.ts = ts;
                Ok(())
            }
            _ => Err(unexpected()),
        }
    }
}

/// Reads a usage body into an existing [`Usage`], with the defaults of its derived
/// `Deserialize` for absent fields.
struct UsageSeed<'u>(&'u mut Usage);

impl<'de> DeserializeSeed<'de> for UsageSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UsageSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a usage entry's data")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let u = self.0;
        let unexpected = || A::Error::custom("not the layout this build writes");
        // One bit per field: a repeated field is an error for the derived decoder too.
        let mut seen = 0u16;
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            let bit = match key.as_ref() {
                "service" => 0,
                "model" => 1,
                "tokens" => 2,
                "source" => 3,
                "event_id" => 4,
                "definition" => 5,
                "partial" => 6,
                "measures" => 7,
                "quality" => 8,
                "recount" => 9,
                "rating" => 10,
                "tier" => 11,
                "key" => 12,
                "session" => 13,
                "tags" => 14,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if seen & (1 << bit) != 0 {
                return Err(unexpected());
            }
            seen |= 1 << bit;
            match bit {
                0 => set(&mut u.service, &map.next_value::<Str<'de>>()?.0),
                1 => set_opt(&mut u.model, map.next_value()?),
                2 => u.tokens = map.next_value::<Tokens>()?.0,
                3 => set_opt(&mut u.source, map.next_value()?),
                4 => set_opt(&mut u.event_id, map.next_value()?),
                5 => set_opt_cow(&mut u.definition, map.next_value()?),
                6 => u.partial = map.next_value()?,
                7 => u.measures = map.next_value()?,
                8 => u.quality = map.next_value()?,
                9 => u.recount = map.next_value()?,
                10 => u.rating = map.next_value()?,
                11 => u.tier = map.next_value()?,
                12 => set_opt(&mut u.key, map.next_value()?),
                13 => set_opt(&mut u.session, map.next_value()?),
                _ => u.tags = map.next_value()?,
            }
        }
        // `service` and `tokens` are required; the others default when absent.
        if seen & 0b101 != 0b101 {
            return Err(unexpected());
        }
        let absent = |bit: u16| seen & (1 << bit) == 0;
        if absent(1) {
            u.model = None;
        }
        if absent(3) {
            u.source = None;
        }
        if absent(4) {
            u.event_id = None;
        }
        if absent(5) {
            u.definition = None;
        }
        if absent(6) {
            u.partial = false;
        }
        if absent(7) {
            u.measures.clear();
        }
        if absent(8) {
            u.quality = None;
        }
        if absent(9) {
            u.recount = None;
        }
        if absent(10) {
            u.rating = None;
        }
        if absent(11) {
            u.tier = None;
        }
        if absent(12) {
            u.key = None;
        }
        if absent(13) {
            u.session = None;
        }
        if absent(14) {
            u.tags.clear();
        }
        Ok(())
    }
}

/// A token map read with borrowed keys (the derived path allocates one per key).
struct Tokens(TokenMap);

impl<'de> Deserialize<'de> for Tokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tokens;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("token counts")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Tokens, A::Error> {
                let unexpected = || A::Error::custom("not the layout this build writes");
                let mut m = TokenMap::new();
                let mut keys: Vec<(Modality, Direction)> = Vec::new();
                while let Some(Str(k)) = a.next_key::<Str<'de>>()? {
                    let n: i64 = a.next_value()?;
                    let key = k
                        .split_once('.')
                        .and_then(|(m, d)| Some((m.parse().ok()?, d.parse().ok()?)))
                        .ok_or_else(unexpected)?;
                    if keys.contains(&key) {
                        return Err(unexpected());
                    }
                    keys.push(key);
                    m.add(key.0, key.1, n).ok_or_else(unexpected)?;
                }
                Ok(Tokens(m))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{AccountInfo, KeyRevoked, Quality, Recount};

    fn usage(i: u32) -> Entry {
        let mut tokens = TokenMap::new();
        tokens
            .add(Modality::Text, Direction::Input, 19 + i as i64)
            .unwrap();
        if i.is_multiple_of(2) {
            tokens.add(Modality::Audio, Direction::Output, 3).unwrap();
        }
        Entry::new(
            "2026-11-25T06:00:00.123Z".parse().unwrap(),
            if i.is_multiple_of(3) {
                "acme/cn"
            } else {
                "acme/us/x"
            }
            .parse()
            .unwrap(),
            EntryBody::Usage(Usage {
                service: format!("llm.chat{}", "x".repeat(i as usize % 4)),
                model: (i % 4 != 1).then(|| "gpt-4o".into()),
                tokens,
                source: (i % 5 != 2).then(|| format!("svc://\"quoted\"/{i}")),
                event_id: Some(format!("ev-{i}-\u{4e2d}")),
                definition: (i % 2 == 1).then(|| "llm.usage@1".into()),
                partial: i % 7 == 3,
                measures: if i % 6 == 5 {
                    [("pages".to_string(), serde_json::json!(3))].into()
                } else {
                    Default::default()
                },
                quality: (i % 4 == 2).then(|| {
                    Box::new(Quality {
                        upstream: "openai".into(),
                        status: 200,
                        latency_us: 5,
                        ..Quality::default()
                    })
                }),
                recount: (i % 9 == 4).then(|| {
                    Box::new(Recount {
                        encoding: "o200k_base".into(),
                        input: 1,
                        output: 2,
                        flagged: true,
                    })
                }),
                // A rated entry must keep its rating through the fast path: a decoder
                // that skipped the field would lose the entry's cost.
                rating: (i % 3 == 1).then(|| {
                    Box::new(crate::Rating {
                        amount: rust_decimal::Decimal::new(45, 1),
                        currency: "USD".parse().unwrap(),
                        book: "list".into(),
                        version: 2,
                        lines: vec![],
                        contract: None,
                        discount_percent: None,
                        markup_percent: None,
                        unpriced: false,
                        missing: vec![],
                        basis: None,
                        place: None,
                    })
                }),
                tier: (i % 5 == 3).then_some(crate::ServiceTier::Batch),
                key: (i % 3 == 2).then(|| format!("k{i}")),
                session: (i % 4 == 3).then(|| format!("user-{i}")),
                tags: if i % 5 == 1 {
                    [("feature".to_string(), format!("search-{i}"))].into()
                } else {
                    Default::default()
                },
            }),
        )
    }

    #[test]
    fn decodes_what_decode_decodes_reusing_buffers() {
        let mut slot = usage(0);
        let others = [
            Entry::new(
                Timestamp::UNIX_EPOCH,
                AccountPath::root(),
                EntryBody::AccountCreated(AccountInfo::default()),
            ),
            Entry::new(
                Timestamp::UNIX_EPOCH,
                "a".parse().unwrap(),
                EntryBody::KeyRevoked(KeyRevoked { key_id: "k".into() }),
            ),
        ];
        for i in 0..40 {
            let e = match i % 13 {
                11 => others[0].clone(),
                12 => others[1].clone(),
                _ => usage(i),
            };
            let bytes = e.encode();
            slot.decode_into(&bytes).unwrap();
            assert_eq!(slot, e, "entry {i}");
            assert_eq!(slot, Entry::decode(&bytes).unwrap());
        }
    }

    #[test]
    fn odd_layouts_and_errors_answer_as_decode_does() {
        let cases: &[&[u8]] = &[
            // Fields in another order, unknown fields, escapes, a null option.
            br#"{"kind":"usage","data":{"tokens":{"text.input":1},"service":"s","model":null,"x":[1]},"account":"a\/b","ts":"2026-01-01T00:00:00Z","v":1,"extra":{}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{"service":"s","tokens":{"text.input":1,"text.input":2}}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{"service":"s"}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{"service":"s","service":"t","tokens":{}}}"#,
            br#"{"v":2,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"mystery","data":{}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"../x","kind":"usage","data":{"service":"s","tokens":{}}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"","kind":"usage","data":{"service":"s","tokens":{}}}"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{"service":"s","tokens":{}}} x"#,
            br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{"service":"s","tokens":{"smell.in":1}}}"#,
        ];
        for (i, bytes) in cases.iter().enumerate() {
            // From a root-account slot and from a usage slot.
            for mut slot in [
                Entry::new(
                    Timestamp::UNIX_EPOCH,
                    AccountPath::root(),
                    EntryBody::KeyRevoked(KeyRevoked { key_id: "k".into() }),
                ),
                usage(1),
            ] {
                match Entry::decode(bytes) {
                    Ok(want) => {
                        slot.decode_into(bytes).unwrap();
                        assert_eq!(slot, want, "case {i}");
                    }
                    Err(want) => assert_eq!(
                        slot.decode_into(bytes).unwrap_err().to_string(),
                        want.to_string(),
                        "case {i}"
                    ),
                }
            }
        }
    }

    /// The bytes `Entry::encode` wrote before usage entries were written by hand:
    /// serde over the derived `Serialize` of `Usage`, in `EntryOut`'s shape.
    fn by_serde(e: &Entry) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            v: u16,
            ts: &'a Timestamp,
            account: &'a AccountPath,
            kind: &'static str,
            data: &'a Usage,
        }
        let EntryBody::Usage(u) = &e.body else {
            panic!("a usage entry")
        };
        serde_json::to_vec(&Out {
            v: e.v,
            ts: &e.ts,
            account: &e.account,
            kind: "usage",
            data: u,
        })
        .unwrap()
    }

    #[test]
    fn usage_entries_are_written_as_serde_writes_them_and_read_back_exactly() {
        use crate::price::arb;
        use proptest::prelude::*;
        let opt = || proptest::option::of(arb::text());
        let usage = (
            (
                arb::text(),
                opt(),
                prop::collection::vec((0usize..25, 0i64..2_000_000_000_000), 0..6),
            ),
            (opt(), opt(), opt(), any::<bool>(), 0u8..32),
            (proptest::option::of(arb::rating()), 0u8..5),
            (
                opt(),
                opt(),
                prop::collection::btree_map(arb::text(), arb::text(), 0..4),
            ),
        );
        let entry = (
            usage,
            0i64..4_000_000_000,
            0i32..1_000_000_000,
            prop_oneof![Just("/"), Just("acme"), Just("acme/cn/x-1")],
        );
        // One slot through every case, as the projector reuses its entry.
        let slot = std::cell::RefCell::new(Entry::new(
            Timestamp::UNIX_EPOCH,
            AccountPath::root(),
            EntryBody::KeyRevoked(KeyRevoked { key_id: "k".into() }),
        ));
        proptest!(ProptestConfig::with_cases(1000), |(
            (((service, model, counts), (source, event_id, definition, partial, extras), (rating, tier), (key, session, tags)), secs, nanos, account) in entry
        )| {
            let mut tokens = TokenMap::new();
            for (k, n) in counts {
                let m = Modality::ALL[k % Modality::ALL.len()];
                let d = Direction::ALL[k / Modality::ALL.len() % Direction::ALL.len()];
                tokens.add(m, d, n).unwrap();
            }
            let u = Usage {
                service,
                model,
                tokens,
                source,
                event_id,
                definition: definition.map(Into::into),
                partial,
                measures: if extras & 1 == 1 {
                    [("pages".to_string(), serde_json::json!(3)), ("q\"".to_string(), serde_json::json!("x"))].into()
                } else {
                    Default::default()
                },
                quality: (extras & 2 == 2).then(|| Box::new(Quality {
                    upstream: "openai".into(),
                    status: 200,
                    latency_us: 5,
                    failure: Some("upstream_cut".into()),
                    served_model: (extras & 8 == 8).then(|| "gpt-4o-2024-08-06".into()),
                    system_fingerprint: (extras & 16 == 16).then(|| "fp_\"x".into()),
                    provider_request_id: (extras & 8 == 8).then(|| "req_1".into()),
                    response_id: (extras & 16 == 16).then(|| "resp_1".into()),
                    ..Quality::default()
                })),
                recount: (extras & 4 == 4).then(|| Box::new(Recount {
                    encoding: "o200k_base".into(),
                    input: 1,
                    output: 2,
                    flagged: true,
                })),
                rating: rating.map(Box::new),
                tier: [None, Some(crate::ServiceTier::Batch), Some(crate::ServiceTier::Flex), Some(crate::ServiceTier::Priority), Some(crate::ServiceTier::Standard)][usize::from(tier)],
                key,
                session,
                tags,
            };
            let e = Entry::new(
                Timestamp::new(secs, nanos).unwrap(),
                if account == "/" { AccountPath::root() } else { account.parse().unwrap() },
                EntryBody::Usage(u),
            );
            let bytes = e.encode();
            let want = by_serde(&e);
            prop_assert_eq!(String::from_utf8_lossy(&bytes), String::from_utf8_lossy(&want));
            // Read back by the serde decoder and by the fast one: the same entry,
            // the rating exactly (every decimal at its scale).
            let decoded = Entry::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &e);
            let mut slot = slot.borrow_mut();
            slot.decode_into(&bytes).unwrap();
            prop_assert_eq!(&*slot, &e);
            let (EntryBody::Usage(a), EntryBody::Usage(b), EntryBody::Usage(c)) =
                (&decoded.body, &slot.body, &e.body)
            else {
                panic!("usage entries")
            };
            if let Some(want) = &c.rating {
                arb::assert_exactly(a.rating.as_ref().unwrap(), want);
                arb::assert_exactly(b.rating.as_ref().unwrap(), want);
            }
        });
    }

    /// `cargo test -p ciyuan-core --release --lib -- --ignored --nocapture bench_encode`:
    /// the encoding of an ingested `llm.usage` entry as `ciyuan bench ingest` sends it,
    /// unrated and rated (two lines, as the LiteLLM book rates `gpt-4o`), by hand and
    /// through serde (the same bytes).
    #[test]
    #[ignore]
    fn bench_encode_usage() {
        let entry = |rated: bool| {
            let mut tokens = TokenMap::new();
            tokens.add(Modality::Text, Direction::Input, 996).unwrap();
            tokens.add(Modality::Text, Direction::Output, 87).unwrap();
            let d = |s: &str| rust_decimal::Decimal::from_str_exact(s).unwrap();
            let line = |k: &str, q: &str, p: &str| crate::RatedLine {
                key: k.parse().unwrap(),
                quantity: d(q),
                unit_price: d(p),
                amount: crate::RatedLine::product(d(q), d(p)).unwrap(),
            };
            Entry::new(
                "2026-12-06T08:40:12.123456789Z".parse().unwrap(),
                "bench/app".parse().unwrap(),
                EntryBody::Usage(Usage {
                    service: "llm.chat".into(),
                    model: Some("gpt-4o".into()),
                    tokens,
                    source: Some("svc://bench".into()),
                    event_id: Some("ev-123456".into()),
                    rating: rated.then(|| {
                        Box::new(crate::Rating {
                            amount: d("0.0033600"),
                            currency: "USD".parse().unwrap(),
                            book: "list".into(),
                            version: 1,
                            lines: vec![
                                line("text.input", "996", "0.0000025"),
                                line("text.output", "87", "0.00001"),
                            ],
                            contract: None,
                            discount_percent: None,
                            markup_percent: None,
                            unpriced: false,
                            missing: vec![],
                            basis: None,
                            place: None,
                        })
                    }),
                    ..Usage::default()
                }),
            )
        };
        let time = |f: &dyn Fn(&mut Vec<u8>)| {
            let n = 200_000u32;
            let mut out = Vec::with_capacity(1024);
            let mut rounds: Vec<f64> = (0..9)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..n {
                        out.clear();
                        f(std::hint::black_box(&mut out));
                    }
                    t.elapsed().as_nanos() as f64 / f64::from(n)
                })
                .collect();
            rounds.sort_by(f64::total_cmp);
            (rounds[0], rounds[4])
        };
        let rated = entry(true);
        let EntryBody::Usage(u) = &rated.body else {
            panic!("usage")
        };
        let r = u.rating.as_ref().unwrap();
        let (best, median) = time(&|out| r.write_json(out).unwrap());
        println!("the rating alone: {best:.0} ns best {median:.0} median");
        for rated in [false, true] {
            let e = entry(rated);
            let len = e.encode().len();
            let (hand, hand_med) = time(&|out| e.encode_into(out));
            let (serde, serde_med) = time(&|out| out.extend_from_slice(&by_serde(&e)));
            println!(
                "{} entry, {len} bytes: by hand {hand:.0} ns best {hand_med:.0} median; serde {serde:.0} best {serde_med:.0} median",
                if rated { "rated" } else { "unrated" }
            );
        }
    }
}
