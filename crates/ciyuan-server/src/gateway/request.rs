//! Chat requests read in one pass into borrowed, typed fields, and edited in place.
//!
//! The forgiving reader ([`super::protocol::inspect`]) builds a tree of every value in the
//! body and, when the gateway must change the request (ask for usage in a stream, clamp
//! the output), writes the whole tree out again: for a long prompt that is most of a
//! request's cost. This reader takes the usual shapes of chat requests
//! (`/v1/chat/completions`, `/v1/messages`) and keeps where the fields it may change
//! are, so an edit splices a few bytes. It gives up (`None`) on anything unusual, and
//! the forgiving reader decides then, with its error messages: so whenever this one
//! answers, it answers what the forgiving one would.

use super::protocol::{Endpoint, RequestInfo, Text};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use std::ops::Range;

/// Where the fields an edit may touch are in the body (byte ranges of their values).
#[derive(Debug, Default, Clone)]
pub struct Spans {
    /// Just after the top-level object's `{`.
    open: usize,
    stream_options: Option<Range<usize>>,
    max_completion_tokens: Option<Range<usize>>,
    max_tokens: Option<Range<usize>>,
}

/// A field kept as its raw JSON text when present (null included), absent otherwise.
#[derive(Default)]
struct Field<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|r| Field(Some(r)))
    }
}

/// Message content: a string, a list of parts, or anything else (no text).
enum Content<'a> {
    Text(Text<'a>),
    Parts(Vec<Part<'a>>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<Content<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Content<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Content<'a>, E> {
                Ok(Content::Text(Text::borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Content<'a>, E> {
                Ok(Content::Text(Text::owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Content<'a>, E> {
                Ok(Content::Text(Text::owned(s)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Content<'a>, A::Error> {
                let mut parts = Vec::with_capacity(a.size_hint().unwrap_or(2));
                while let Some(Obj(p)) = a.next_element::<Obj<Part<'a>>>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Content<'a>, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Content::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_unit<E>(self) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_none<E>(self) -> Result<Content<'a>, E> {
                Ok(Content::Other)
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Content<'a>, D::Error> {
                Content::deserialize(d)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A JSON object read into `T`. serde's derived structs also read a JSON array (the
/// fields in order), which the forgiving reader never takes for an object: the fast
/// reader must decline such a request, not read it differently.
pub(crate) struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// One part of a message's content (text, image, tool use or result, ...).
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Text<'a>,
    #[serde(default, borrow)]
    text: Text<'a>,
    #[serde(default, borrow)]
    content: Option<Box<Content<'a>>>,
    #[serde(default, borrow)]
    input: Field<'a>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<Obj<FunctionCall<'a>>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(default, borrow)]
    arguments: Text<'a>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    role: Text<'a>,
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<Obj<ToolCall<'a>>>>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(default, borrow)]
    model: Text<'a>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow)]
    stream_options: Field<'a>,
    #[serde(default, borrow)]
    max_completion_tokens: Field<'a>,
    #[serde(default, borrow)]
    max_tokens: Field<'a>,
    #[serde(default, borrow)]
    user: Text<'a>,
    #[serde(default, borrow)]
    service_tier: Text<'a>,
    #[serde(default, borrow)]
    metadata: Field<'a>,
    #[serde(default, borrow)]
    system: Field<'a>,
    #[serde(default, borrow)]
    messages: Option<Vec<Obj<Message<'a>>>>,
    #[serde(default, borrow)]
    tools: Field<'a>,
    #[serde(default, borrow)]
    functions: Field<'a>,
}

/// The text of message content, as [`super::protocol::inspect`] reads it; parts that are not
/// text (images, audio, files) are counted into `media`.
fn text_of(content: &Content<'_>, media: &mut u64, out: &mut String) -> Option<()> {
    match content {
        Content::Text(t) => t.push_to(out),
        Content::Other => {}
        Content::Parts(parts) => {
            for p in parts {
                match p.kind.as_str() {
                    Some("text" | "input_text") => p.text.push_to(out),
                    Some("tool_result") => {
                        if let Some(c) = &p.content {
                            text_of(c, media, out)?;
                        }
                    }
                    Some("tool_use") => {
                        if let Some(i) = p.input.0 {
                            // Compact, as the forgiving reader writes it.
                            out.push_str(&serde_json::from_str::<Value>(i.get()).ok()?.to_string());
                        }
                    }
                    _ => *media += 1,
                }
            }
        }
    }
    Some(())
}

/// The byte range of `raw` within `body` (it was read from `body`, so it lies inside).
fn span(body: &[u8], raw: &RawValue) -> Option<Range<usize>> {
    let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start + raw.get().len();
    (end <= body.len()).then_some(start..end)
}

/// Reads a chat request of the usual shape; `None` when the forgiving reader must.
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Option<(RequestInfo, Spans)> {
    if !matches!(endpoint, Endpoint::Chat | Endpoint::Messages) {
        return None;
    }
    // serde_json checks UTF-8 only in the strings it reads, not in those it skips: a body
    // that is not UTF-8 is not JSON, and the forgiving reader refuses it.
    let body_text = std::str::from_utf8(body).ok()?;
    let Obj(r) = serde_json::from_str::<Obj<Request<'_>>>(body_text).ok()?;
    let model = r.model.as_str().filter(|m| !m.is_empty())?.to_string();
    let include_usage = match r.stream_options.0 {
        None => false,
        Some(o) => serde_json::from_str::<Value>(o.get())
            .ok()?
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let max_tokens = match r.max_completion_tokens.0.or(r.max_tokens.0) {
        None => None,
        Some(raw) => Some(raw.get().parse::<u64>().ok()?),
    };
    if endpoint == Endpoint::Messages && max_tokens.is_none() {
        return None;
    }
    let metadata: Option<Value> = match r.metadata.0 {
        None => None,
        Some(m) => Some(serde_json::from_str(m.get()).ok()?),
    };
    let user = match r.user.as_str() {
        Some(u) => Some(u.to_string()),
        None => metadata
            .as_ref()
            .and_then(|m| m.get("user_id"))
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    // OpenAI's metadata is recorded as tags; a malformed one is the forgiving
    // reader's to refuse, by name.
    let metadata = match endpoint {
        Endpoint::Chat => super::protocol::metadata_pairs(metadata.as_ref()).ok()?,
        _ => Vec::new(),
    };
    let mut info = RequestInfo {
        model,
        stream: r.stream.unwrap_or(false),
        include_usage,
        max_tokens,
        user,
        service_tier: super::protocol::requested_tier(r.service_tier.as_str()),
        metadata,
        ..RequestInfo::default()
    };
    if endpoint == Endpoint::Messages
        && let Some(system) = r.system.0
    {
        let content: Content<'_> = serde_json::from_str(system.get()).ok()?;
        let mut text = String::new();
        text_of(&content, &mut info.media_parts, &mut text)?;
        info.messages.push(("system".into(), text));
    }
    let messages = r.messages?;
    info.messages.reserve(messages.len());
    for Obj(m) in &messages {
        let role = m.role.as_str()?;
        let mut text = String::new();
        if let Some(c) = &m.content {
            text_of(c, &mut info.media_parts, &mut text)?;
        }
        for Obj(call) in m.tool_calls.iter().flatten() {
            if let Some(Obj(f)) = &call.function {
                f.arguments.push_to(&mut text);
            }
        }
        info.messages.push((role.to_string(), text));
    }
    for t in [r.tools.0, r.functions.0].into_iter().flatten() {
        if t.get() != "null" {
            info.tools_text
                .push_str(&serde_json::from_str::<Value>(t.get()).ok()?.to_string());
        }
    }
    info.has_media = info.media_parts > 0;
    let open = body.iter().position(|b| *b == b'{')? + 1;
    let spans = Spans {
        open,
        stream_options: match r.stream_options.0 {
            Some(raw) => Some(span(body, raw)?),
            None => None,
        },
        max_completion_tokens: match r.max_completion_tokens.0 {
            Some(raw) => Some(span(body, raw)?),
            None => None,
        },
        max_tokens: match r.max_tokens.0 {
            Some(raw) => Some(span(body, raw)?),
            None => None,
        },
    };
    Some((info, spans))
}

/// The request as forwarded: `include_usage` set in `stream_options` when asked, and the
/// output limit lowered to `cap` when given; everything else byte for byte as sent.
pub fn edit(body: &Bytes, spans: &Spans, include_usage: bool, cap: Option<u64>) -> Option<Bytes> {
    // (where, how many bytes replaced, new text), applied in order of position.
    let mut edits: Vec<(usize, usize, String)> = Vec::with_capacity(2);
    let mut inserted = String::new();
    if include_usage {
        match &spans.stream_options {
            Some(r) => {
                let mut opts: Value = serde_json::from_slice(&body[r.clone()]).ok()?;
                if !opts.is_object() {
                    opts = Value::Object(Default::default());
                }
                if let Some(o) = opts.as_object_mut() {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
                edits.push((r.start, r.len(), opts.to_string()));
            }
            None => inserted.push_str(r#""stream_options":{"include_usage":true},"#),
        }
    }
    if let Some(cap) = cap {
        match spans
            .max_completion_tokens
            .as_ref()
            .or(spans.max_tokens.as_ref())
        {
            Some(r) => edits.push((r.start, r.len(), cap.to_string())),
            None => inserted.push_str(&format!(r#""max_tokens":{cap},"#)),
        }
    }
    if !inserted.is_empty() {
        // The object holds at least `model`, so a comma always follows an insertion.
        edits.push((spans.open, 0, inserted));
    }
    edits.sort_by_key(|e| e.0);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (pos, len, text) in edits {
        out.extend_from_slice(body.get(at..pos)?);
        out.extend_from_slice(text.as_bytes());
        at = pos + len;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::protocol;
    use serde_json::json;

    /// Requests of every shape the two readers must agree on (or the fast one decline).
    fn corpus() -> Vec<(Endpoint, String)> {
        let chat = |v: Value| (Endpoint::Chat, v.to_string());
        let msgs = |v: Value| (Endpoint::Messages, v.to_string());
        vec![
            chat(
                json!({"model": "gpt-4o", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi \"there\"\n"}], "max_tokens": 32}),
            ),
            chat(
                json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
                "max_completion_tokens": 50, "user": "u1",
                "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"b": 1, "a": 2}}}]}),
            ),
            chat(
                json!({"model": "gpt-4o", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "42"}], "stream": null, "functions": null}),
            ),
            chat(
                json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "你好"}], "stream": true, "stream_options": {"include_usage": false}, "metadata": {"user_id": "m1"}}),
            ),
            chat(
                json!({"model": "m", "messages": [{"role": "user", "content": 7}], "user": 5, "metadata": {"user_id": "m2"}}),
            ),
            chat(
                json!({"model": "m", "messages": [{"role": "user"}], "stream_options": null, "stream": true}),
            ),
            msgs(
                json!({"model": "claude-x", "max_tokens": 100, "system": [{"type": "text", "text": "sys"}],
                "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "r"}, {"type": "image", "source": {}}]},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"z": [1, {"y": null}], "a": "q"}}, {"type": "document"}]}],
                "metadata": {"user_id": "mu"}}),
            ),
            msgs(
                json!({"model": "claude-x", "max_tokens": 100, "system": "plain", "messages": [{"role": "user", "content": "x"}], "stream": true}),
            ),
            msgs(
                json!({"model": "claude-x", "max_tokens": 100, "system": null, "messages": [{"role": "user", "content": [{"type": "tool_use", "input": null}, {"text": "no type"}]}]}),
            ),
            // The fast reader declines these; the forgiving one answers or refuses.
            chat(json!({"model": "", "messages": []})),
            chat(json!({"model": 3, "messages": []})),
            chat(json!({"messages": []})),
            chat(json!({"model": "m"})),
            chat(json!({"model": "m", "messages": [{}]})),
            chat(json!({"model": "m", "messages": [], "stream": "yes"})),
            chat(json!({"model": "m", "messages": [], "max_tokens": null})),
            chat(json!({"model": "m", "messages": [], "max_tokens": -1})),
            chat(json!({"model": "m", "messages": [], "max_tokens": 5.0})),
            chat(json!({"model": "m", "messages": [], "max_tokens": 1e3})),
            chat(json!({"model": "m", "messages": "hi"})),
            chat(json!({"model": "m", "messages": ["hi"]})),
            chat(json!({"model": "m", "messages": [{"role": "user", "content": ["x"]}]})),
            msgs(json!({"model": "m", "messages": []})),
            (
                Endpoint::Chat,
                r#"{"model": "a", "model": "b", "messages": []}"#.to_string(),
            ),
            (Endpoint::Chat, r#"[1]"#.to_string()),
            (
                Endpoint::Chat,
                r#"{"model": "m", "messages": [], "max_tokens": 18446744073709551616}"#.to_string(),
            ),
        ]
    }

    fn forgiving(ep: Endpoint, body: &str) -> Result<RequestInfo, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        protocol::inspect(ep, &v).map_err(|e| e.message)
    }

    #[test]
    fn answers_as_the_forgiving_reader_or_declines() {
        let mut answered = 0;
        for (ep, body) in corpus() {
            match (inspect(ep, body.as_bytes()), forgiving(ep, &body)) {
                (Some((fast, _)), Ok(slow)) => {
                    assert!(fast == slow, "{body}\n{fast:?}\n{slow:?}");
                    answered += 1;
                }
                (Some((fast, _)), Err(e)) => {
                    panic!("accepted what is refused ({e}): {body}\n{fast:?}")
                }
                (None, _) => {}
            }
        }
        assert_eq!(answered, 9, "the usual shapes take the fast path");
    }

    #[test]
    fn edits_change_only_what_they_must() {
        for (ep, body) in corpus() {
            let Some((info, spans)) = inspect(ep, body.as_bytes()) else {
                continue;
            };
            let bytes = Bytes::from(body.clone());
            for (usage, cap) in [(true, None), (false, Some(7)), (true, Some(0))] {
                let edited = edit(&bytes, &spans, usage, cap).unwrap();
                let got: Value = serde_json::from_slice(&edited).unwrap();
                // The same edit on the value tree.
                let mut want: Value = serde_json::from_str(&body).unwrap();
                let obj = want.as_object_mut().unwrap();
                if usage {
                    let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
                    if !opts.is_object() {
                        *opts = json!({});
                    }
                    opts.as_object_mut()
                        .unwrap()
                        .insert("include_usage".into(), json!(true));
                }
                if let Some(cap) = cap {
                    let field = if obj.contains_key("max_completion_tokens") {
                        "max_completion_tokens"
                    } else {
                        "max_tokens"
                    };
                    obj.insert(field.into(), json!(cap));
                }
                assert_eq!(got, want, "{body}");
                let (again, _) = inspect(ep, &edited).unwrap();
                assert_eq!(again.messages, info.messages, "the prompt is untouched");
            }
            assert_eq!(edit(&bytes, &spans, false, None).unwrap(), bytes);
        }
    }

    #[test]
    fn regression_objects_given_as_arrays_are_declined_not_read_in_field_order() {
        // serde's derived structs read `[""]` as a message whose role is "": the
        // forgiving reader refuses it (messages[0].role), so the fast one must decline.
        for (ep, body) in [
            (
                Endpoint::Messages,
                json!({"model": "claude-x", "max_tokens": 100, "messages": [[""]]}),
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [["user", "hi"]]}),
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [[{"arguments": "{}"}]]}]}),
            ),
            (
                Endpoint::Chat,
                json!([
                    "gpt-4o",
                    false,
                    null,
                    null,
                    null,
                    null,
                    null,
                    null,
                    null,
                    []
                ]),
            ),
        ] {
            let text = body.to_string();
            assert!(inspect(ep, text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn regression_invalid_utf8_in_a_skipped_field_is_declined() {
        // The forgiving reader refuses it; the fast one skips the field unchecked.
        let mut body =
            br#"{"model": "m", "x": "?", "messages": [{"role": "user", "content": "hi"}]}"#
                .to_vec();
        let at = body.iter().position(|b| *b == b'?').unwrap();
        body[at] = 0xff;
        assert!(inspect(Endpoint::Chat, &body).is_none());
        assert!(serde_json::from_slice::<Value>(&body).is_err());
    }

    mod properties {
        use super::*;
        use crate::gateway::metering_tests::replace_nth;
        use proptest::prelude::*;

        /// A corpus request with byte edits (overwrite, insert, delete) and a cut.
        fn mutated(body: &str, edits: &[(usize, u8, u8)], cut: usize) -> Vec<u8> {
            let mut b = body.as_bytes().to_vec();
            for (at, byte, how) in edits {
                let i = at % (b.len() + 1);
                match how % 3 {
                    0 if i < b.len() => b[i] = *byte,
                    1 => b.insert(i, *byte),
                    _ if i < b.len() => {
                        b.remove(i);
                    }
                    _ => {}
                }
            }
            if cut != usize::MAX {
                b.truncate(cut % (b.len() + 1));
            }
            b
        }

        /// JSON values of every type, including the awkward ones.
        fn any_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
                Just(Value::from("\u{0}\u{1b}[31m\"\\")),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(crate::gateway::metering_tests::fuzz_config(500, "request"))]

            /// Structurally mutated requests (a value anywhere replaced by one of any
            /// type): the fast reader answers only as the forgiving one does.
            #[test]
            fn structurally_mutated_requests_are_read_as_the_forgiving_reader_reads_them(
                which in any::<usize>(),
                replacements in proptest::collection::vec((any::<usize>(), any_value()), 1..4),
            ) {
                let corpus = corpus();
                let (ep, body) = &corpus[which % corpus.len()];
                let Ok(mut v) = serde_json::from_str::<Value>(body) else {
                    return Ok(());
                };
                for (k, with) in &replacements {
                    let mut k = k % 40;
                    replace_nth(&mut v, &mut k, with);
                }
                let bytes = v.to_string().into_bytes();
                // As the gateway reads it: both readers parse the same bytes.
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let slow = protocol::inspect(*ep, &v).map_err(|e| e.message);
                if let Some((fast, spans)) = inspect(*ep, &bytes) {
                    let slow = slow.map_err(|e| TestCaseError::fail(format!("fast accepted, slow refused: {e}: {v}")))?;
                    prop_assert!(fast == slow, "{}", v);
                    let edited = edit(&Bytes::from(bytes.clone()), &spans, true, Some(3))
                        .ok_or_else(|| TestCaseError::fail("edit failed"))?;
                    prop_assert!(serde_json::from_slice::<Value>(&edited).is_ok());
                }
            }

            /// Whatever a client sends, the readers answer without panicking, the fast
            /// one only as the forgiving one would, and edits keep the body JSON.
            #[test]
            fn mutated_requests_are_read_as_the_forgiving_reader_reads_them(
                which in any::<usize>(),
                edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6),
                cut in proptest::option::of(any::<usize>()),
            ) {
                let corpus = corpus();
                let (ep, body) = &corpus[which % corpus.len()];
                let bytes = mutated(body, &edits, cut.unwrap_or(usize::MAX));
                let tree = serde_json::from_slice::<Value>(&bytes);
                // A number past f64's range (`1e400`) is valid JSON that serde_json's
                // tree refuses; in a field the fast reader skips it goes on as sent (the
                // one divergence kept: it changes nothing metered). Found after 445,000
                // cases of a long run.
                if tree.as_ref().is_err_and(|e| e.to_string().starts_with("number out of range")) {
                    return Ok(());
                }
                let slow = tree
                    .map_err(|e| e.to_string())
                    .and_then(|v| protocol::inspect(*ep, &v).map_err(|e| e.message));
                if let Some((fast, spans)) = inspect(*ep, &bytes) {
                    let slow = slow.map_err(|e| TestCaseError::fail(format!("fast accepted, slow refused: {e}")))?;
                    prop_assert!(fast == slow);
                    let edited = edit(&Bytes::from(bytes.clone()), &spans, true, Some(3))
                        .ok_or_else(|| TestCaseError::fail("edit failed"))?;
                    prop_assert!(serde_json::from_slice::<Value>(&edited).is_ok());
                }
            }
        }
    }
}
