//! Fuzzing of the readers of untrusted bytes: the CloudEvents reader (driven through the
//! router, so the status code is the real one), the chat-request readers, the
//! provider-answer readers, the SSE splitter with the stream chunk readers, and the
//! gateway end to end (through the router to a fake provider on a local port).
//!
//! Each reader gets three kinds of input, mixed: raw random bytes, structural mutations
//! of the seeds in `fuzz/corpus/<reader>/` (byte flips, inserted, deleted and duplicated
//! ranges, splices of two seeds, truncation, JSON values replaced by extreme ones, members
//! removed or repeated, values nested deeply), and JSON generated from a grammar of the
//! reader's shapes. The oracles: nothing panics; a refusal is a 4xx whose message names
//! what was wrong; a fast borrowed reader answers as its forgiving `Value` reader or
//! declines; SSE events do not depend on where the chunks end; no reader is superlinear.
//!
//! `CIYUAN_FUZZ_SECS` is the time given to each reader (default 2, so `cargo test` stays
//! quick), `CIYUAN_FUZZ_SEED` the run's seed (printed with the cases run):
//!
//! ```sh
//! CIYUAN_FUZZ_SECS=150 cargo test -p ciyuan-server --lib fuzz_ -- --nocapture --test-threads=1
//! ```

use crate::gateway::protocol::{
    self, AnthropicEvent, AnthropicStream, Endpoint, Shown, StreamState, read_answer,
    read_answer_value,
};
use crate::gateway::{request, sse};
use crate::{App, ServerConfig, router};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use ciyuan_store::{Log, Store};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseResult, TestRng, TestRunner};
use serde_json::{Value, json};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------
// The driver: a time-bounded, seeded loop of proptest cases (shrunk on failure).

fn budget() -> Duration {
    let secs = std::env::var("CIYUAN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn run_seed() -> u64 {
    std::env::var("CIYUAN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6369_7975_616e)
}

/// Runs `test` on inputs of `strategy` for the time budget; panics with the shrunk
/// failing input.
fn drive<S: Strategy>(reader: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S::Value: fmt::Debug,
{
    let seed = run_seed();
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    for (i, b) in reader.bytes().enumerate() {
        key[8 + i % 24] ^= b;
    }
    let config = Config {
        failure_persistence: None,
        max_shrink_iters: 2048,
        // A case that takes this long (in a debug build) is a hang or a superlinear
        // reader: it fails, and is shrunk like any other failure.
        timeout: 5_000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let start = Instant::now();
    let limit = budget();
    let mut cases = 0u64;
    while cases == 0 || start.elapsed() < limit {
        let tree = strategy.new_tree(&mut runner).unwrap();
        if let Err(e) = runner.run_one(tree, &test) {
            panic!("fuzz {reader}: failed after {cases} cases (seed {seed}): {e}");
        }
        cases += 1;
    }
    eprintln!(
        "fuzz {reader}: {cases} cases in {:.1}s, no failure (seed {seed})",
        start.elapsed().as_secs_f64()
    );
    let tallies = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    for ((r, what), n) in tallies.iter().filter(|((r, _), _)| r == reader) {
        eprintln!("fuzz {r}:   {what}: {n}");
    }
}

/// What the cases came to, by reader: shows the inputs reach past the first check.
static TALLIES: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn tally(reader: &str, what: impl Into<String>) {
    let mut t = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    *t.entry((reader.to_string(), what.into())).or_default() += 1;
}

/// Bytes shown as text (escaped exactly when not UTF-8), so a failing input can be read
/// and copied into the corpus.
#[derive(Clone)]
struct Input {
    how: &'static str,
    bytes: Vec<u8>,
}

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes): ", self.how, self.bytes.len())?;
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => write!(f, "b\"{}\"", self.bytes.escape_ascii()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeds and their structural mutations.

/// The seed files of one reader, by name.
fn corpus(reader: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(reader);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// JSON values (raw text) that break readers: integer edges, floats out of range,
/// escapes that decode to nothing valid, control characters, invalid UTF-8, sheer size.
fn extreme(i: usize) -> Vec<u8> {
    const SMALL: &[&str] = &[
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "0",
        "-0",
        "1e308",
        "-1e308",
        "1e400",
        "1.5",
        "5.0",
        "1E2",
        "0.0000000000000000000001",
        "null",
        "true",
        "false",
        "\"\"",
        "[]",
        "{}",
        "[null]",
        "{\"\":0}",
        "\"\\u0000\\u001b[31m\\r\\n\"",
        "\"\\ud800\"",
        "\"\\udc00\\ud800x\"",
        "\"\\u202egnp.exe\"",
        "\"\\\\\"",
        "\"1.0\"",
        "\"llm.usage\"",
        "\"acme/a\"",
        "\"[DONE]\"",
        "\"text.input\"",
    ];
    match i % (SMALL.len() + 6) {
        n if n < SMALL.len() => SMALL[n].as_bytes().to_vec(),
        n => match n - SMALL.len() {
            0 => format!("\"{}\"", "a".repeat(70_000)).into_bytes(),
            1 => format!("{}{}", "[".repeat(300), "]".repeat(300)).into_bytes(),
            2 => format!("{}1{}", "{\"a\":".repeat(130), "}".repeat(130)).into_bytes(),
            3 => "9".repeat(400).into_bytes(),
            4 => b"\"\xff\xfe\xc0\xafinvalid utf-8\"".to_vec(),
            _ => b"\"raw \x00\x1b\x7f\r\n control\"".to_vec(),
        },
    }
}

/// Byte spans of a JSON text's values and object members (key through value), as far
/// as the text parses.
#[derive(Default)]
struct Spans {
    values: Vec<Range<usize>>,
    members: Vec<Range<usize>>,
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    out: Spans,
}

impl Scan<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| b" \t\r\n".contains(c)) {
            self.i += 1;
        }
    }

    fn string(&mut self) -> Option<()> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        loop {
            match self.b.get(self.i)? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                _ => self.i += 1,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > 160 {
            return None;
        }
        self.ws();
        let start = self.i;
        match *self.b.get(self.i)? {
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.b.get(self.i) == Some(&close) {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        let member = self.i;
                        if open == b'{' {
                            self.string()?;
                            self.ws();
                            if self.b.get(self.i) != Some(&b':') {
                                return None;
                            }
                            self.i += 1;
                        }
                        self.value(depth + 1)?;
                        if open == b'{' {
                            self.out.members.push(member..self.i);
                        }
                        self.ws();
                        match *self.b.get(self.i)? {
                            b',' => self.i += 1,
                            c if c == close => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
            b'"' => self.string()?,
            _ => {
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| !b",]} \t\r\n:".contains(c))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
            }
        }
        self.out.values.push(start..self.i);
        Some(())
    }
}

fn spans(b: &[u8]) -> Spans {
    let mut s = Scan {
        b,
        i: 0,
        out: Spans::default(),
    };
    // A stream (or a broken text) holds several texts: scan on from where each one ends
    // or fails, so the scan stays linear.
    while s.i < b.len() {
        let before = s.i;
        let _ = s.value(0);
        if s.i <= before {
            s.i = before + 1;
        }
    }
    s.out
}

/// One structural change to a seed.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, u16),
    Duplicate(Index, u16, Index),
    Splice(Index, Index, u16, Index),
    Truncate(Index),
    Value(Index, usize),
    Remove(Index),
    Repeat(Index),
    Nest(Index, u16, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = prop::collection::vec(
        prop_oneof![
            any::<u8>(),
            select(b"{}[]\":,\\ \n\r\t0123456789-+.eEtrufalsn\x00\xff".to_vec()),
        ],
        1..8,
    );
    prop_oneof![
        3 => (any::<Index>(), 1u8..).prop_map(|(i, m)| Mutation::Flip(i, m)),
        3 => (any::<Index>(), bytes).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1u16..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1u16..256, any::<Index>())
            .prop_map(|(i, n, at)| Mutation::Duplicate(i, n, at)),
        1 => (any::<Index>(), any::<Index>(), 1u16..512, any::<Index>())
            .prop_map(|(s, i, n, at)| Mutation::Splice(s, i, n, at)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        6 => (any::<Index>(), any::<usize>()).prop_map(|(i, e)| Mutation::Value(i, e)),
        2 => any::<Index>().prop_map(Mutation::Remove),
        2 => any::<Index>().prop_map(Mutation::Repeat),
        1 => (any::<Index>(), 1u16..200, any::<bool>()).prop_map(|(i, n, o)| Mutation::Nest(i, n, o)),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation, seeds: &[(String, Vec<u8>)]) {
    let at = |i: &Index, len: usize| i.index(len + 1);
    match m {
        Mutation::Flip(i, mask) if !b.is_empty() => {
            let i = i.index(b.len());
            b[i] ^= mask;
        }
        Mutation::Insert(i, bytes) => {
            let i = at(i, b.len());
            b.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let i = at(i, b.len());
            let end = (i + *n as usize).min(b.len());
            b.drain(i..end);
        }
        Mutation::Duplicate(i, n, to) => {
            let i = at(i, b.len());
            let part = b[i..(i + *n as usize).min(b.len())].to_vec();
            let to = at(to, b.len());
            b.splice(to..to, part);
        }
        Mutation::Splice(s, i, n, to) => {
            let other = &seeds[s.index(seeds.len())].1;
            let i = at(i, other.len());
            let part = &other[i..(i + *n as usize).min(other.len())];
            let to = at(to, b.len());
            b.splice(to..to, part.iter().copied());
        }
        Mutation::Truncate(i) => b.truncate(at(i, b.len())),
        Mutation::Value(i, e) => {
            let s = spans(b);
            if !s.values.is_empty() {
                let r = s.values[i.index(s.values.len())].clone();
                b.splice(r, extreme(*e));
            }
        }
        Mutation::Remove(i) => {
            let s = spans(b);
            if !s.members.is_empty() {
                let mut r = s.members[i.index(s.members.len())].clone();
                // Take a neighbouring comma too, so the object stays well formed.
                let mut end = r.end;
                while b.get(end).is_some_and(|c| c.is_ascii_whitespace()) {
                    end += 1;
                }
                if b.get(end) == Some(&b',') {
                    r.end = end + 1;
                } else if let Some(p) = b[..r.start].iter().rposition(|c| !c.is_ascii_whitespace())
                    && b[p] == b','
                {
                    r.start = p;
                }
                b.drain(r);
            }
        }
        Mutation::Repeat(i) => {
            let s = spans(b);
            if !s.members.is_empty() {
                let r = s.members[i.index(s.members.len())].clone();
                let mut copy = vec![b','];
                copy.extend_from_slice(&b[r.clone()]);
                b.splice(r.end..r.end, copy);
            }
        }
        Mutation::Nest(i, n, object) => {
            let s = spans(b);
            if !s.values.is_empty() {
                let r = s.values[i.index(s.values.len())].clone();
                let n = *n as usize;
                let (open, close): (&[u8], &[u8]) = if *object {
                    (b"{\"k\":", b"}")
                } else {
                    (b"[", b"]")
                };
                b.splice(r.end..r.end, close.repeat(n));
                b.splice(r.start..r.start, open.repeat(n));
            }
        }
        Mutation::Flip(..) => {}
    }
}

/// A seed of `reader` (its file name and bytes) with a few mutations applied.
fn mutated(reader: &str) -> impl Strategy<Value = (String, Input)> + use<> {
    let seeds = Arc::new(corpus(reader));
    let n = seeds.len();
    (0..n, prop::collection::vec(mutation(), 1..5)).prop_map(move |(s, ms)| {
        let (name, seed) = &seeds[s];
        let mut b = seed.clone();
        for m in &ms {
            apply(&mut b, m, &seeds);
            if b.len() > 1 << 20 {
                b.truncate(1 << 20);
            }
        }
        (
            name.clone(),
            Input {
                how: "mutated",
                bytes: b,
            },
        )
    })
}

fn raw() -> impl Strategy<Value = Input> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        // Mostly JSON punctuation, so the readers get past their first byte.
        prop::collection::vec(
            select(b"{}[]\":,\\ 019-.eEtrufalsn\n\rdata:".to_vec()),
            0..512
        ),
    ]
    .prop_map(|bytes| Input { how: "raw", bytes })
}

// ---------------------------------------------------------------------------------------
// Grammars: JSON text built from members chosen among the fields each reader reads.

fn jstr(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// An object from members (raw key and value texts; repeats kept).
fn obj(members: &[(String, String)]) -> String {
    let inner: Vec<String> = members
        .iter()
        .map(|(k, v)| format!("{}:{v}", jstr(k)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The [`extreme`] values a `Value` can hold.
fn held_extremes() -> Vec<usize> {
    (0..40)
        .filter(|&i| serde_json::from_slice::<Value>(&extreme(i)).is_ok())
        .collect()
}

fn leaf() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (0u64..2000).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
        3 => "[a-z0-9 ./_-]{0,12}".prop_map(|s| jstr(&s)),
        1 => any::<String>().prop_map(|s| jstr(&s)),
        // Only the extremes that are JSON serde_json can hold: the others (raw control
        // characters, 1e400, lone surrogates, ...) come in by mutation, and here would
        // make most generated bodies unreadable.
        2 => select(held_extremes()).prop_map(|i| String::from_utf8_lossy(&extreme(i)).into_owned()),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep.
fn any_json() -> BoxedStrategy<String> {
    leaf()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(("[a-z_]{1,8}", inner), 0..4).prop_map(|m| obj(&m)),
            ]
        })
        .boxed()
}

/// Usually one of `good`, else anything.
fn usually(good: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![8 => select(good).prop_map(String::from), 1 => any_json()].boxed()
}

/// Usually one of `good`, sometimes one of `bad`, rarely anything.
fn mostly(good: &'static [&'static str], bad: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        12 => select(good).prop_map(String::from),
        2 => select(bad).prop_map(String::from),
        1 => any_json(),
    ]
    .boxed()
}

/// Members: each named field present with some probability, with repeats and strangers.
fn members(fields: Vec<(&'static str, BoxedStrategy<String>)>) -> BoxedStrategy<String> {
    let parts: Vec<BoxedStrategy<Option<(String, String)>>> = fields
        .into_iter()
        .map(|(k, v)| prop::option::weighted(0.85, v.prop_map(move |v| (k.to_string(), v))).boxed())
        .collect();
    (
        parts,
        prop::collection::vec(("[a-z_]{1,10}", any_json()), 0..2),
        prop::bool::weighted(0.15),
        any::<Index>(),
    )
        .prop_map(|(parts, extra, repeat, which)| {
            let mut m: Vec<(String, String)> = parts.into_iter().flatten().collect();
            m.extend(extra);
            if repeat && !m.is_empty() {
                let again = m[which.index(m.len())].clone();
                m.push(again);
            }
            obj(&m)
        })
        .boxed()
}

fn quantity() -> BoxedStrategy<String> {
    prop_oneof![
        6 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => select(&[
            "9223372036854775807", "9223372036854775808", "18446744073709551616", "-1", "1.5",
            "1e3", "0", "\"5\"", "null", "-0",
        ][..]).prop_map(String::from),
        1 => leaf(),
    ]
    .boxed()
}

fn event() -> BoxedStrategy<String> {
    let token_keys = prop::collection::vec(
        (
            select(
                &[
                    "text.input",
                    "text.output",
                    "text.cached_input",
                    "image.input",
                    "audio.output",
                    "video.input",
                    "other.input",
                    "text.bogus",
                    "text",
                    ".",
                    "",
                ][..],
            ),
            quantity(),
        ),
        0..4,
    )
    .prop_map(|m| {
        obj(&m
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Vec<_>>())
    })
    .boxed();
    let llm = members(vec![
        (
            "model",
            usually(&[
                "\"gpt-4o\"",
                "\"qwen-max\"",
                "\"claude-sonnet-4-5\"",
                "\"\"",
            ]),
        ),
        ("input_tokens", quantity()),
        ("output_tokens", quantity()),
        ("cached_input_tokens", quantity()),
        ("reasoning_tokens", quantity()),
        ("image_input_tokens", quantity()),
        (
            "tokens",
            prop_oneof![4 => token_keys, 1 => any_json()].boxed(),
        ),
    ]);
    let doc = members(vec![("pages", quantity()), ("country", leaf())]);
    members(vec![
        (
            "specversion",
            usually(&["\"1.0\"", "\"1.0\"", "\"1.0\"", "\"1.0\"", "\"0.3\"", "1.0"]),
        ),
        (
            "id",
            prop_oneof![3 => "[a-z0-9-]{1,10}".prop_map(|s| jstr(&s)), 1 => leaf()].boxed(),
        ),
        (
            "source",
            mostly(
                &["\"svc://billing\""],
                &["\"gateway\"", "\"\"", "\"s\\u0000\""],
            ),
        ),
        (
            "type",
            mostly(
                &["\"llm.usage\"", "\"llm.usage\"", "\"doc.verify\""],
                &["\"face.match\"", "\"voice.clone\""],
            ),
        ),
        (
            "subject",
            mostly(
                &["\"acme/a\"", "\"acme/b\"", "\"acme/a/team\"", "\"acme\""],
                &[
                    "\"other/x\"",
                    "\"/\"",
                    "\"\"",
                    "\"acme//a\"",
                    "\"acme/../b\"",
                    "\"ACME/a\"",
                    "\"acme/a/\"",
                ],
            ),
        ),
        (
            "time",
            mostly(
                &[
                    "\"2026-12-06T03:00:00Z\"",
                    "\"2026-12-06T03:00:00.123456789+08:00\"",
                ],
                &[
                    "\"1970-01-01T00:00:00Z\"",
                    "\"9999-12-31T23:59:59Z\"",
                    "\"2026-02-30T00:00:00Z\"",
                    "\"yesterday\"",
                ],
            ),
        ),
        (
            "datacontenttype",
            usually(&[
                "\"application/json\"",
                "\"APPLICATION/JSON\"",
                "\"text/plain\"",
            ]),
        ),
        (
            "data",
            prop_oneof![4 => llm, 1 => doc, 1 => any_json()].boxed(),
        ),
    ])
}

fn content_part() -> BoxedStrategy<String> {
    members(vec![
        (
            "type",
            usually(&[
                "\"text\"",
                "\"input_text\"",
                "\"image_url\"",
                "\"tool_use\"",
                "\"tool_result\"",
                "\"input_audio\"",
                "\"document\"",
                "\"thinking\"",
            ]),
        ),
        ("text", leaf()),
        ("input", any_json()),
        (
            "content",
            prop_oneof![
                leaf(),
                prop::collection::vec(any_json(), 0..3).prop_map(|v| format!("[{}]", v.join(",")))
            ]
            .boxed(),
        ),
        (
            "image_url",
            usually(&["{\"url\":\"data:image/png;base64,iVBORw0KGgo=\"}"]),
        ),
    ])
}

fn content() -> BoxedStrategy<String> {
    prop_oneof![
        3 => leaf(),
        3 => prop::collection::vec(content_part(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
        1 => any_json(),
    ]
    .boxed()
}

fn chat_request() -> BoxedStrategy<String> {
    let tool_call = members(vec![
        ("id", leaf()),
        ("type", usually(&["\"function\""])),
        (
            "function",
            members(vec![("name", leaf()), ("arguments", leaf())]),
        ),
    ]);
    let message = members(vec![
        (
            "role",
            usually(&["\"user\"", "\"assistant\"", "\"system\"", "\"tool\""]),
        ),
        ("content", content()),
        (
            "tool_calls",
            prop::collection::vec(tool_call, 0..3)
                .prop_map(|v| format!("[{}]", v.join(",")))
                .boxed(),
        ),
    ]);
    members(vec![
        (
            "model",
            mostly(
                &[
                    "\"gpt-4o\"",
                    "\"claude-sonnet-4-5\"",
                    "\"deepseek-chat\"",
                    "\"qwen-max\"",
                    "\"kimi-k2-0905-preview\"",
                ],
                &["\"\"", "3"],
            ),
        ),
        (
            "messages",
            prop::collection::vec(message, 0..4)
                .prop_map(|v| format!("[{}]", v.join(",")))
                .boxed(),
        ),
        ("system", content()),
        ("stream", usually(&["true", "false", "null"])),
        (
            "stream_options",
            usually(&[
                "{\"include_usage\":true}",
                "{\"include_usage\":false}",
                "null",
                "[]",
            ]),
        ),
        ("max_tokens", quantity()),
        ("max_completion_tokens", quantity()),
        ("user", leaf()),
        (
            "metadata",
            usually(&["{\"user_id\":\"u\"}", "{\"user_id\":3}", "null"]),
        ),
        ("tools", any_json()),
        ("prompt", content()),
        ("input", content()),
    ])
}

fn usage_object() -> BoxedStrategy<String> {
    members(vec![
        ("prompt_tokens", quantity()),
        ("completion_tokens", quantity()),
        ("input_tokens", quantity()),
        ("output_tokens", quantity()),
        ("cache_read_input_tokens", quantity()),
        ("cache_creation_input_tokens", quantity()),
        ("prompt_cache_hit_tokens", quantity()),
        ("prompt_cache_miss_tokens", quantity()),
        (
            "prompt_tokens_details",
            members(vec![
                ("cached_tokens", quantity()),
                ("audio_tokens", quantity()),
            ]),
        ),
        (
            "completion_tokens_details",
            members(vec![
                ("reasoning_tokens", quantity()),
                ("audio_tokens", quantity()),
            ]),
        ),
    ])
}

/// Whole answers and stream chunks of both families share these members.
fn answer() -> BoxedStrategy<String> {
    let message = members(vec![
        ("content", prop_oneof![leaf(), any_json()].boxed()),
        ("tool_calls", any_json()),
    ]);
    let choice = members(vec![
        ("message", message.clone()),
        ("delta", message),
        ("text", leaf()),
        ("usage", usage_object()),
    ]);
    let block = members(vec![
        (
            "type",
            usually(&[
                "\"text\"",
                "\"tool_use\"",
                "\"thinking\"",
                "\"text_delta\"",
                "\"input_json_delta\"",
            ]),
        ),
        ("text", leaf()),
        ("input", any_json()),
        ("partial_json", leaf()),
    ]);
    members(vec![
        (
            "type",
            usually(&[
                "\"message_start\"",
                "\"content_block_delta\"",
                "\"message_delta\"",
                "\"message_stop\"",
                "\"error\"",
            ]),
        ),
        (
            "choices",
            prop::collection::vec(choice, 0..3)
                .prop_map(|v| format!("[{}]", v.join(",")))
                .boxed(),
        ),
        (
            "content",
            prop::collection::vec(block.clone(), 0..3)
                .prop_map(|v| format!("[{}]", v.join(",")))
                .boxed(),
        ),
        ("message", members(vec![("usage", usage_object())])),
        ("delta", block),
        (
            "usage",
            prop_oneof![4 => usage_object(), 1 => any_json()].boxed(),
        ),
    ])
}

/// An SSE stream of generated events, framed in the ways the standard allows.
fn stream() -> BoxedStrategy<Input> {
    let framed = (
        prop_oneof![3 => answer(), 1 => Just("[DONE]".to_string()), 1 => leaf()],
        select(&["\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\n"][..]),
        select(
            &[
                "data: ",
                "data:",
                "event: message_start\ndata: ",
                ": ping\ndata: ",
                "data: x\ndata: ",
            ][..],
        ),
    )
        .prop_map(|(data, end, head)| format!("{head}{data}{end}"));
    prop::collection::vec(framed, 0..6)
        .prop_map(|v| Input {
            how: "grammar",
            bytes: v.concat().into_bytes(),
        })
        .boxed()
}

fn grammar(s: BoxedStrategy<String>) -> BoxedStrategy<Input> {
    s.prop_map(|s| Input {
        how: "grammar",
        bytes: s.into_bytes(),
    })
    .boxed()
}

/// Raw, mutated and generated inputs, mixed.
fn inputs(reader: &str, generated: BoxedStrategy<Input>) -> BoxedStrategy<(String, Input)> {
    prop_oneof![
        1 => raw().prop_map(|i| (String::new(), i)),
        3 => mutated(reader),
        3 => generated.prop_map(|i| (String::new(), i)),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// Oracles shared by the gateway's readers.

/// The subject of a refusal's message (its field, or its first words), for the tallies.
fn what_of(detail: &str) -> String {
    // The field (member names are echoed as sent: only the first part is kept).
    if detail.contains(" is outside the subtree of ") {
        return "account outside the key's subtree".into();
    }
    let head = detail.split([':', '.', '"']).next().unwrap_or("");
    head.chars().take(40).collect()
}

/// A refusal's message starts by naming the field (`messages[2].role: ...`) or the body.
fn names_what(message: &str) -> bool {
    let field = message.split_once(": ").is_some_and(|(f, _)| {
        !f.is_empty()
            && f.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._[]-@".contains(&c))
    });
    // A member's name is echoed as sent, whatever its characters.
    let root = message
        .split(['.', '[', ':'])
        .next()
        .is_some_and(|r| ["data", "messages", "tools"].contains(&r));
    field
        || root
        || [
            "malformed JSON",
            "invalid request body",
            "invalid event",
            "an event must be a JSON object",
            "a CloudEvents batch must be",
            "the body must be a CloudEvent",
            "the batch holds no event",
            "a batch holds at most",
            "expected Content-Type",
            "request body is larger",
            "the request body must be a JSON object",
            "the request body is not valid JSON",
            "unknown service",
            "no definition of",
            "duplicate of event",
            "account ",
        ]
        .iter()
        .any(|p| message.starts_with(p))
}

/// Equal JSON values, floats within a few ulps: serde_json's default float parsing does
/// not round-trip exactly, and an edited member is parsed and written once more.
fn alike(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-14,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| alike(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| alike(v, w)))
        }
        _ => a == b,
    }
}

/// The chat-request readers on `body`: the fast one answers as the forgiving one or
/// declines; refusals are 400s naming the field; edits change only what they must.
fn check_request(body: &[u8]) -> TestCaseResult {
    let tree = serde_json::from_slice::<Value>(body);
    for ep in Endpoint::ALL {
        let fast = request::inspect(ep, body);
        let slow = match &tree {
            Ok(v) => protocol::inspect(ep, v).map_err(|e| (e.status, e.message)),
            Err(e) => Err((StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))),
        };
        tally(
            "requests",
            format!(
                "{ep:?} {}",
                match (&fast, &slow) {
                    (Some(_), Ok(_)) => "read by both readers",
                    (Some(_), Err(_)) => "read by the fast reader only (tree cannot hold it)",
                    (None, Ok(_)) => "read by the forgiving reader only",
                    (None, Err(_)) => "refused (400)",
                }
            ),
        );
        match (&fast, &slow) {
            (Some((f, _)), Ok(s)) => {
                prop_assert!(f == s, "{ep:?}: fast {f:?}\nforgiving {s:?}")
            }
            (Some(_), Err((_, e))) if tree_cannot_hold(body, e) => {}
            (Some((f, _)), Err(e)) => {
                prop_assert!(
                    false,
                    "{ep:?}: the fast reader accepts what is refused ({e:?}): {f:?}"
                )
            }
            (None, Err((status, message))) => {
                prop_assert_eq!(*status, StatusCode::BAD_REQUEST);
                prop_assert!(names_what(message), "{ep:?}: {message:?} names no field");
            }
            (None, Ok(_)) => {}
        }
        let Some((info, spans)) = fast else { continue };
        let Ok(tree) = &tree else { continue };
        let bytes = Bytes::copy_from_slice(body);
        for (usage, cap) in [(true, None), (false, Some(7)), (true, Some(0))] {
            let edited = request::edit(&bytes, &spans, usage, cap);
            prop_assert!(edited.is_some(), "{ep:?}: the edit failed");
            let edited = edited.unwrap_or_default();
            let got: Result<Value, _> = serde_json::from_slice(&edited);
            prop_assert!(
                got.is_ok(),
                "{ep:?}: the edit broke the JSON: {:?}",
                String::from_utf8_lossy(&edited)
            );
            let mut want = tree.clone();
            let Some(o) = want.as_object_mut() else {
                return Err(TestCaseError::fail(
                    "a request read as an object is not one",
                ));
            };
            if usage {
                let opts = o.entry("stream_options").or_insert_with(|| json!({}));
                if !opts.is_object() {
                    *opts = json!({});
                }
                if let Some(opts) = opts.as_object_mut() {
                    opts.insert("include_usage".into(), json!(true));
                }
            }
            if let Some(cap) = cap {
                let field = if o.contains_key("max_completion_tokens") {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                o.insert(field.into(), json!(cap));
            }
            let got = got.unwrap_or_default();
            prop_assert!(alike(&got, &want), "{ep:?}: edited {got}\nwanted {want}");
            let again = request::inspect(ep, &edited);
            prop_assert!(
                again
                    .as_ref()
                    .is_some_and(|(a, _)| a.messages == info.messages),
                "{ep:?}: the edited request reads differently"
            );
        }
    }
    Ok(())
}

/// Whether a `Value` reader refused JSON text that RFC 8259's grammar allows but
/// `serde_json`'s tree cannot hold: an escape of a lone surrogate, a number beyond
/// `f64`, nesting deeper than 128. The fast readers skip what they do not read without decoding it, so they take
/// such text where they pass over it (and forward it untouched); that is allowed. Text
/// that is not UTF-8 is not JSON at all: no reader may take it.
fn tree_cannot_hold(body: &[u8], error: &str) -> bool {
    std::str::from_utf8(body).is_ok()
        && [
            "lone leading surrogate",
            "unexpected end of hex escape",
            "invalid unicode code point",
            "number out of range",
            "recursion limit exceeded",
        ]
        .iter()
        .any(|m| error.contains(m))
}

/// The answer readers on `body`: the typed reader answers as the `Value` reader, or
/// reads what the `Value` reader cannot hold (see [`tree_cannot_hold`]).
fn check_answer(body: &[u8]) -> TestCaseResult {
    for ep in Endpoint::ALL {
        let fast = read_answer(ep, body);
        let slow = read_answer_value(ep, body);
        if slow.is_none()
            && let Err(e) = serde_json::from_slice::<Value>(body)
            && tree_cannot_hold(body, &e.to_string())
        {
            continue;
        }
        tally(
            "answers",
            format!(
                "{ep:?} {}",
                match &slow {
                    Some(s) if s.reported.is_some() => "read, with usage",
                    Some(_) => "read, no usage",
                    None => "malformed",
                }
            ),
        );
        prop_assert_eq!(fast, slow, "{:?}", ep);
    }
    Ok(())
}

/// Splits `stream` whole and at `cuts`, and meters every dialect's reader on every event.
fn check_stream(stream: &[u8], cuts: &[usize]) -> TestCaseResult {
    let whole = {
        let mut s = sse::Splitter::default();
        let mut events = s.push(&Bytes::copy_from_slice(stream));
        events.extend(s.finish());
        events
    };
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    at.push(0);
    at.push(stream.len());
    at.sort_unstable();
    let mut s = sse::Splitter::default();
    let mut pieces = Vec::new();
    for w in at.windows(2) {
        pieces.extend(s.push(&Bytes::copy_from_slice(&stream[w[0]..w[1]])));
    }
    pieces.extend(s.finish());
    prop_assert_eq!(&whole, &pieces, "events depend on where chunks end");
    prop_assert_eq!(
        whole.concat(),
        stream.to_vec(),
        "the splitter loses or adds bytes"
    );
    // Every dialect's reader, through the interface the meter uses, on every event:
    // none may panic, whatever the bytes.
    for endpoint in [Endpoint::Chat, Endpoint::Messages, Endpoint::Responses] {
        let mut state = StreamState::new(endpoint);
        let mut shown = Shown::default();
        for event in &whole {
            let Some(data) = sse::data(event) else {
                tally("streams", "event without data");
                continue;
            };
            tally("streams", "event with data");
            match state.read_event(&data, &mut shown) {
                Some(read) => tally(
                    "streams",
                    format!("{:?} event read ({:?})", endpoint.dialect(), read.step),
                ),
                None => tally(
                    "streams",
                    format!("{:?} event unreadable", endpoint.dialect()),
                ),
            }
        }
        std::hint::black_box((state.count(), state.is_final()));
        state.end(&mut shown);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The ingest door, through the router.

struct Door {
    rt: tokio::runtime::Runtime,
    app: Arc<App>,
    router: Router,
    /// (label, key): keys of several scopes and places, and none.
    keys: Vec<(&'static str, Option<String>)>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn door(config: ServerConfig) -> Door {
    door_on(runtime(), config)
}

/// A server on `rt` (whose tasks run while a request is sent).
fn door_on(rt: tokio::runtime::Runtime, config: ServerConfig) -> Door {
    let (app, router, keys) = rt.block_on(async {
        let store: Arc<dyn Store> =
            Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
        let log: Arc<dyn Log> = Arc::new(crate::tests::MemLog::new());
        let definitions: Vec<ciyuan_measure::RawDefinition> = serde_json::from_value(json!([
            {"service": "doc.verify", "version": 1, "effective_from": "2020-01-01T00:00:00Z", "tokens": {"other.input": "5 + 2 * pages"}},
            {"service": "face.match", "version": 1, "effective_from": "2020-01-01T00:00:00Z", "tokens": {"other.input": "1"}},
        ]))
        .unwrap();
        let app = App::new(
            store,
            log,
            ServerConfig {
                definitions,
                ..config
            },
        )
        .unwrap();
        let admin = app.bootstrap_admin_key(None).await.unwrap().unwrap();
        let router = router(app.clone());
        let call = |uri: &str, body: Value| {
            let req = Request::post(uri)
                .header("authorization", format!("Bearer {admin}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            router.clone().oneshot(req)
        };
        for p in ["acme/a/team", "acme/b", "other/x"] {
            let r = call("/api/v1/accounts", json!({"path": p})).await.unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
        let mut keys = vec![("none", None), ("garbage", Some("cy_000000000000_nope".into()))];
        for (label, account, scope) in [
            ("ingest@acme", "acme", "ingest"),
            ("ingest@acme", "acme", "ingest"),
            ("ingest@acme/a", "acme/a", "ingest"),
            ("read@acme", "acme", "read"),
            ("gateway@acme/a", "acme/a", "gateway"),
        ] {
            let r = call("/api/v1/keys", json!({"account": account, "scopes": [scope]}))
                .await
                .unwrap();
            let v: Value =
                serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
            keys.push((label, Some(v["key"].as_str().unwrap().to_string())));
        }
        (app, router, keys)
    });
    Door {
        rt,
        app,
        router,
        keys,
    }
}

impl Door {
    fn post(
        &self,
        key: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> (StatusCode, String, Value) {
        self.rt.block_on(async {
            let mut req = Request::post("/v1/events").header("content-type", content_type);
            if let Some(k) = key {
                req = req.header("authorization", format!("Bearer {k}"));
            }
            let resp = self
                .router
                .clone()
                .oneshot(req.body(Body::from(body.to_vec())).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                ct,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        })
    }
}

const CONTENT_TYPES: &[&str] = &[
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/json",
    "application/cloudevents+json; charset=utf-8",
    "text/plain",
    "",
];

/// The ingest door's answer to one request: never a 5xx; a refusal is problem+json
/// naming what was wrong; a batch answers each event; a single accepted event sent again
/// is a duplicate of the same entry.
fn check_ingest(door: &Door, key: usize, ct: &str, body: &[u8]) -> TestCaseResult {
    let (label, key) = &door.keys[key % door.keys.len()];
    let (status, rct, v) = door.post(key.as_deref(), ct, body);
    prop_assert!(!status.is_server_error(), "{status} ({label}, {ct}): {v}");
    tally("events", format!("status {}", status.as_u16()));
    if let Some(results) = v["results"].as_array() {
        for r in results {
            tally(
                "events",
                format!("batch event {}", r["status"].as_str().unwrap_or("?")),
            );
            if let Some(d) = r["error"]["detail"].as_str() {
                tally("events", format!("  refused: {}", what_of(d)));
            }
        }
    }
    if status.is_client_error() {
        tally(
            "events",
            format!("  refused: {}", what_of(v["detail"].as_str().unwrap_or(""))),
        );
        prop_assert_eq!(rct.as_str(), "application/problem+json", "{} {}", status, v);
        prop_assert_eq!(
            v["status"].as_u64(),
            Some(u64::from(status.as_u16())),
            "{}",
            v
        );
        let detail = v["detail"].as_str().unwrap_or("");
        // 401 and 403 are about the key, not the body.
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            prop_assert!(names_what(detail), "{status} names nothing: {detail:?}");
        }
        return Ok(());
    }
    if let Some(results) = v["results"].as_array() {
        let count = |s: &str| results.iter().filter(|r| r["status"] == s).count() as u64;
        prop_assert_eq!(v["accepted"].as_u64(), Some(count("accepted")), "{}", v);
        prop_assert_eq!(v["duplicates"].as_u64(), Some(count("duplicate")), "{}", v);
        prop_assert_eq!(v["rejected"].as_u64(), Some(count("rejected")), "{}", v);
        for r in results.iter().filter(|r| r["status"] == "rejected") {
            let s = r["error"]["status"].as_u64().unwrap_or(0);
            prop_assert!((400..500).contains(&s), "{r}");
            let detail = r["error"]["detail"].as_str().unwrap_or("");
            prop_assert!(names_what(detail), "a rejected event names nothing: {r}");
        }
        return Ok(());
    }
    prop_assert!(v["entry_id"].is_u64(), "{status}: {v}");
    if status == StatusCode::CREATED {
        let (again, _, w) = door.post(key.as_deref(), ct, body);
        prop_assert_eq!(again, StatusCode::OK, "{}", w);
        prop_assert_eq!(&w["status"], "duplicate", "{}", w);
        prop_assert_eq!(&w["entry_id"], &v["entry_id"], "{}", w);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The fuzz runs, one per reader.

#[test]
fn fuzz_ingest_cloudevents() {
    let door = door(ServerConfig {
        max_body_bytes: 128 << 10,
        ..ServerConfig::default()
    });
    let batch = prop::collection::vec(prop_oneof![6 => event(), 1 => any_json()], 0..6)
        .prop_map(|v| format!("[{}]", v.join(",")))
        .boxed();
    let body = inputs(
        "events",
        prop_oneof![grammar(event()), grammar(batch)].boxed(),
    );
    // Mostly the key that may ingest everywhere the events point.
    let key = prop_oneof![5 => Just(2usize), 1 => 0usize..8];
    let strategy = (body, key, 0usize..CONTENT_TYPES.len(), 0u8..4);
    drive("events", strategy, |((seed, input), key, ct, pick)| {
        // Mostly the content type that matches the body's shape; sometimes any.
        let first = input.bytes.iter().find(|b| !b.is_ascii_whitespace());
        let ct = match (pick, first) {
            (0, _) => CONTENT_TYPES[ct],
            (_, Some(b'[')) => "application/cloudevents-batch+json",
            _ if seed.starts_with("batch") => "application/cloudevents-batch+json",
            _ => "application/cloudevents+json",
        };
        check_ingest(&door, key, ct, &input.bytes)
    });
}

#[test]
fn fuzz_chat_requests() {
    drive(
        "requests",
        inputs("requests", grammar(chat_request())),
        |(_, input)| check_request(&input.bytes),
    );
}

#[test]
fn fuzz_provider_answers() {
    drive(
        "answers",
        inputs("answers", grammar(answer())),
        |(_, input)| check_answer(&input.bytes),
    );
}

#[test]
fn fuzz_sse_streams() {
    let strategy = (
        inputs("streams", stream()),
        prop::collection::vec(any::<usize>(), 0..12),
    );
    drive("streams", strategy, |((_, input), cuts)| {
        check_stream(&input.bytes, &cuts)
    });
}

/// Every seed passes the oracles as it is (and a seed the readers refuse is refused
/// cleanly).
#[test]
fn the_corpus_passes_every_oracle() {
    let door = door(ServerConfig::default());
    for (name, body) in corpus("events") {
        for key in 0..door.keys.len() {
            let ct = if name.starts_with("batch") {
                "application/cloudevents-batch+json"
            } else {
                "application/cloudevents+json"
            };
            check_ingest(&door, key, ct, &body).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    for (name, body) in corpus("requests") {
        check_request(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ep, fast) = match name.split('-').next() {
            Some("messages") => (Endpoint::Messages, true),
            Some("chat") => (Endpoint::Chat, true),
            Some("regression") => continue,
            _ => (Endpoint::Chat, false),
        };
        assert_eq!(
            request::inspect(ep, &body).is_some(),
            fast,
            "{name}: the fast path reads it"
        );
    }
    for (name, body) in corpus("answers") {
        check_answer(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, body) in corpus("streams") {
        let cuts: Vec<usize> = (0..8).map(|i| i * 37 + 5).collect();
        check_stream(&body, &cuts).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// No reader is superlinear: eight times the input takes about eight times as long.

/// Fastest of five runs: on a busy machine (the rest of the suite runs beside this
/// test, on two cores) most runs are slowed by waiting, the fastest rarely is.
fn time(f: &dyn Fn()) -> Duration {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn grows_linearly(what: &str, small: usize, run: impl Fn(usize)) {
    // Linear work is 8 times as long; quadratic 64. A millisecond floor keeps timer noise
    // on tiny runs from failing the check, and more tries keep a busy machine from
    // failing it (three tries failed twice in whole-suite runs under load 8-10).
    let mut tries = Vec::new();
    for _ in 0..5 {
        let a = time(&|| run(small));
        let b = time(&|| run(8 * small));
        let ratio = b.as_secs_f64() / a.as_secs_f64().max(1e-3);
        eprintln!(
            "{what}: {a:?} for {small}, {b:?} for {}: x{ratio:.1}",
            8 * small
        );
        if ratio < 24.0 {
            return;
        }
        tries.push(format!("{a:?} -> {b:?} (x{ratio:.1})"));
    }
    panic!("{what} is superlinear: {}", tries.join(", "));
}

#[test]
fn regression_sse_splitter_is_linear_when_an_event_arrives_byte_by_byte() {
    grows_linearly("one long event, one byte a chunk", 8 << 10, |n| {
        let mut stream = b"data: ".to_vec();
        stream.resize(n, b'x');
        stream.extend_from_slice(b"\n\n");
        let mut s = sse::Splitter::default();
        let mut events = 0;
        for b in &stream {
            events += s
                .push(&Bytes::copy_from_slice(std::slice::from_ref(b)))
                .len();
        }
        assert_eq!(events, 1);
    });
}

#[test]
fn readers_are_linear_on_large_inputs() {
    grows_linearly("sse: many events in one chunk", 4 << 10, |n| {
        let stream = Bytes::from("data: {\"choices\":[]}\n\n".repeat(n));
        assert_eq!(sse::Splitter::default().push(&stream).len(), n);
    });
    grows_linearly("sse: data of many lines", 16 << 10, |n| {
        let event = "data: x\n".repeat(n);
        assert!(sse::data(event.as_bytes()).is_some());
    });
    grows_linearly("chat request: many messages", 2 << 10, |n| {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"role": "user", "content": [{"type": "text", "text": format!("m{i}")}, {"type": "tool_use", "input": {"a": [i]}}]}))
            .collect();
        let body = json!({"model": "gpt-4o", "messages": messages, "max_tokens": 5}).to_string();
        let (info, spans) = request::inspect(Endpoint::Chat, body.as_bytes()).unwrap();
        assert_eq!(info.messages.len(), n);
        assert!(request::edit(&Bytes::from(body), &spans, true, Some(3)).is_some());
    });
    grows_linearly("answer: many tool calls", 2 << 10, |n| {
        let calls: Vec<Value> = (0..n)
            .map(|i| json!({"function": {"name": "f", "arguments": format!("{{\"i\":{i}}}")}}))
            .collect();
        let body = json!({"choices": [{"message": {"content": null, "tool_calls": calls}}], "usage": {"prompt_tokens": 1}}).to_string();
        assert!(read_answer(Endpoint::Chat, body.as_bytes()).is_some());
    });
    let door = door(ServerConfig {
        max_body_bytes: 64 << 20,
        max_events_per_batch: 100_000,
        ..ServerConfig::default()
    });
    let key = door
        .keys
        .iter()
        .position(|k| k.0 == "ingest@acme")
        .unwrap_or(0);
    // Nesting is skipped without recursion where the reader does not read (an
    // extension attribute, a member of `data` it does not know), and refused where it
    // would build: linear either way, never a stack overflow.
    grows_linearly("ingest: deep nesting passed over", 16 << 10, |n| {
        let deep = format!("{}{}", "[".repeat(n), "]".repeat(n));
        let body = format!(
            r#"[{{"specversion":"1.0","id":"deep","source":"s","type":"llm.usage","subject":"acme/nowhere","x":{deep},"data":{{"model":"m","input_tokens":1,"y":{deep}}}}},{deep}]"#
        );
        let (status, _, v) = door.post(
            door.keys[key].1.as_deref(),
            "application/cloudevents-batch+json",
            body.as_bytes(),
        );
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["rejected"], 2, "{v}");
    });
    grows_linearly("ingest: a batch of refused events", 256, |n| {
        let events: Vec<Value> = (0..n)
            .map(|i| json!({"specversion": "1.0", "id": format!("e{i}"), "source": "s", "type": "llm.usage", "subject": "acme/nowhere", "data": {"model": "m", "input_tokens": 1}}))
            .collect();
        let body = Value::Array(events).to_string();
        let (status, _, v) = door.post(
            door.keys[key].1.as_deref(),
            "application/cloudevents-batch+json",
            body.as_bytes(),
        );
        assert_eq!(status, StatusCode::OK, "{v}");
    });
}

// ---------------------------------------------------------------------------------------
// What the fuzzing found, pinned (the inputs are in the corpus too).

fn seed_file(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(path),
    )
    .unwrap()
}

#[test]
fn regression_fast_request_reader_declines_bodies_that_are_not_utf8() {
    // Invalid UTF-8 in a key of an object the fast reader skips (`input_audio`): it took
    // the body and would have forwarded it; the forgiving reader refuses it.
    let body = seed_file("requests/regression-not-utf8.json");
    assert!(std::str::from_utf8(&body).is_err());
    assert!(request::inspect(Endpoint::Chat, &body).is_none());
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    check_request(&body).unwrap();
}

#[test]
fn regression_answer_with_a_repeated_usage_key_is_metered_as_the_forgiving_reader_does() {
    // The typed reader dropped a usage it could not take (a repeated key) and recorded
    // the answer as having none; the forgiving reader reads it.
    for (ep, path, total) in [
        (
            Endpoint::Chat,
            "answers/regression-openai-repeated-usage-key.json",
            15,
        ),
        (
            Endpoint::Messages,
            "answers/regression-anthropic-repeated-usage-key.json",
            8,
        ),
    ] {
        let body = seed_file(path);
        let shown = read_answer(ep, &body).unwrap();
        assert_eq!(shown.text, "hi");
        assert_eq!(
            shown.reported.map(|u| u.tokens.total()),
            Some(Some(total)),
            "{path}"
        );
        check_answer(&body).unwrap();
    }
}

#[test]
fn regression_anthropic_usage_past_u64_does_not_panic() {
    // `input + cache writes + cache reads` overflowed: a panic in debug builds, a small
    // wrapped count (that the recount could match) in release builds.
    let stream = seed_file("streams/regression-anthropic-usage-overflow.sse");
    check_stream(&stream, &[]).unwrap();
    let mut folded = AnthropicStream::default();
    for event in sse::Splitter::default().push(&Bytes::from(stream)) {
        let data = sse::data(&event).unwrap();
        let ev: AnthropicEvent = serde_json::from_str(&data).unwrap();
        ev.apply(&mut folded, &mut Shown::default());
    }
    // A figure past the ledger's bound is a broken report: no report, never a sum.
    assert_eq!(folded.reported(), None);
}

#[test]
fn values_nested_past_any_limit_where_readers_skip_them_do_not_overflow_the_stack() {
    let deep = format!("{}{}", "[".repeat(1 << 20), "]".repeat(1 << 20));
    let request = format!(r#"{{"model":"m","messages":[],"x":{deep}}}"#);
    assert!(request::inspect(Endpoint::Chat, request.as_bytes()).is_some());
    assert!(serde_json::from_str::<Value>(&request).is_err());
    let answer = format!(r#"{{"choices":[{{"message":{{"content":"a","x":{deep}}}}}]}}"#);
    assert_eq!(
        read_answer(Endpoint::Chat, answer.as_bytes()).map(|a| a.text),
        Some("a".to_string())
    );
    let event = format!("data: {{\"choices\":[],\"x\":{deep}}}\n\n");
    check_stream(event.as_bytes(), &[7, 1 << 19]).unwrap();
}

#[test]
fn regression_answer_that_is_not_utf8_is_refused_by_both_readers() {
    // Invalid UTF-8 in a key the typed reader skips: it metered the answer, where the
    // forgiving reader (and the client's JSON parser) refuses it.
    let body = seed_file("answers/regression-not-utf8.json");
    assert!(std::str::from_utf8(&body).is_err());
    for ep in Endpoint::ALL {
        assert_eq!(read_answer(ep, &body), None, "{ep:?}");
    }
    check_answer(&body).unwrap();
}

#[test]
fn regression_fast_readers_take_objects_not_arrays() {
    // serde's derived readers take an array as a struct's fields by position: a message
    // `[""]` read as role "", a part `["text", "hi"]` as text. The forgiving readers look
    // members up by name and find none there.
    for path in [
        "requests/regression-message-as-array.json",
        "requests/regression-parts-as-arrays.json",
    ] {
        let body = seed_file(path);
        check_request(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    assert!(
        request::inspect(
            Endpoint::Chat,
            &seed_file("requests/regression-message-as-array.json")
        )
        .is_none()
    );
    for (ep, path) in [
        (
            Endpoint::Chat,
            "answers/regression-openai-choice-as-array.json",
        ),
        (
            Endpoint::Messages,
            "answers/regression-anthropic-block-as-array.json",
        ),
    ] {
        let body = seed_file(path);
        check_answer(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            read_answer(ep, &body).map(|a| a.text),
            Some(String::new()),
            "{path}"
        );
    }
}

#[test]
fn regression_anthropic_tool_use_with_null_input_reads_as_the_forgiving_reader_does() {
    // The typed reader took `"input": null` for no input while the forgiving one counted
    // the text `null`: the readers must agree.
    let body = seed_file("answers/regression-anthropic-tool-use-null-input.json");
    check_answer(&body).unwrap();
    // Both readers take a null input as no input (nothing was delivered to count).
    let text = read_answer(Endpoint::Messages, &body).unwrap().text;
    assert_eq!(text, "Let me check.");
}

// ---------------------------------------------------------------------------------------
// The gateway end to end: a fuzzed request through the router, to a provider on a local
// port that answers with a fuzzed answer (whole, or a stream in several chunks).

/// What the fake provider answers next, and how many requests reached it.
#[derive(Default)]
struct Upstream {
    status: u16,
    content_type: &'static str,
    chunks: Vec<Bytes>,
    hits: u64,
}

/// A body that yields its chunks one frame each.
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn gateway_door() -> (Door, Arc<std::sync::Mutex<Upstream>>) {
    let upstream = Arc::new(std::sync::Mutex::new(Upstream::default()));
    let rt = runtime();
    let port = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = upstream.clone();
        // The request is read whole before the answer, as a provider does (an answer
        // sent over an unread body ends in a reset connection).
        let fake = Router::new().fallback(move |_request: Bytes| {
            let state = state.clone();
            async move {
                let mut u = state.lock().unwrap();
                u.hits += 1;
                axum::http::Response::builder()
                    .status(u.status)
                    .header("content-type", u.content_type)
                    .body(Body::new(Chunks(u.chunks.iter().cloned().collect())))
                    .unwrap()
            }
        });
        tokio::spawn(crate::listen::serve(listener, fake, std::future::pending()));
        port
    });
    let provider = |name: &str, protocol, base_url: String| crate::gateway::Provider {
        name: name.into(),
        protocol,
        base_url,
        api_key: Some("sk-fuzz".into()),
        models: vec!["*".into()],
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
        idle_timeout: Duration::from_secs(2),
        forward_headers: vec![],
        rate_basis: Default::default(),
    };
    let config = ServerConfig {
        gateway: crate::gateway::GatewayConfig {
            providers: vec![
                provider(
                    "fake-openai",
                    crate::gateway::Protocol::OpenAi,
                    format!("http://127.0.0.1:{port}/v1"),
                ),
                provider(
                    "fake-anthropic",
                    crate::gateway::Protocol::Anthropic,
                    format!("http://127.0.0.1:{port}"),
                ),
            ],
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    (door_on(rt, config), upstream)
}

impl Door {
    /// Whether the log grows past `size` within two seconds (the gateway records a call
    /// off the request's path, grouped for a few milliseconds).
    fn recorded_after(&self, size: u64) -> bool {
        for _ in 0..400 {
            if self.app.log().size() > size {
                return true;
            }
            self.rt
                .block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
        }
        false
    }

    /// A gateway call with the gateway key: (status, body).
    fn call(&self, endpoint: Endpoint, body: &[u8]) -> (StatusCode, Bytes) {
        let key = self.keys.iter().find(|k| k.0 == "gateway@acme/a");
        let key = key.and_then(|k| k.1.clone()).unwrap_or_default();
        let path = match endpoint {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Responses => "/v1/responses",
        };
        self.rt.block_on(async {
            let req = Request::post(path)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_vec()))
                .unwrap();
            let resp = self.router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        })
    }
}

/// One call: the gateway never answers 500; what it refuses itself is a 4xx in the
/// family's error shape naming what was wrong; a provider's error is relayed as it is;
/// a whole answer is relayed byte for byte, or is a 502 exactly when it cannot be read.
fn check_gateway(
    door: &Door,
    upstream: &std::sync::Mutex<Upstream>,
    endpoint: Endpoint,
    request: &[u8],
    answer: (u16, &'static str, Vec<Bytes>),
) -> TestCaseResult {
    let hits = {
        let mut u = upstream.lock().unwrap_or_else(|e| e.into_inner());
        (u.status, u.content_type, u.chunks) = answer;
        u.hits
    };
    let entries = door.app.log().size();
    let (status, body) = door.call(endpoint, request);
    let (sent_status, sent, forwarded) = {
        let u = upstream.lock().unwrap_or_else(|e| e.into_inner());
        (u.status, u.chunks.concat(), u.hits > hits)
    };
    // A 500 of the provider's own is relayed; the gateway never makes one.
    prop_assert!(
        status != StatusCode::INTERNAL_SERVER_ERROR || (forwarded && sent_status == 500),
        "500: {body:?}"
    );
    if !forwarded {
        tally(
            "gateway",
            format!("refused by the gateway: {}", status.as_u16()),
        );
        prop_assert!(
            status.is_client_error(),
            "{status} without reaching the provider"
        );
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let message = v["error"]["message"].as_str().unwrap_or("");
        tally("gateway", format!("  refused: {}", what_of(message)));
        prop_assert!(
            names_what(message) || !status.eq(&StatusCode::BAD_REQUEST),
            "{status}: {message:?} names nothing"
        );
        prop_assert!(!message.is_empty(), "{status} without a message: {v}");
        if endpoint == Endpoint::Messages {
            prop_assert_eq!(&v["type"], "error", "{}", v);
        }
        return Ok(());
    }
    tally(
        "gateway",
        format!("forwarded, answered {}", status.as_u16()),
    );
    // Every request that reached the provider is recorded, after the answer is out.
    prop_assert!(
        door.recorded_after(entries),
        "no ledger entry for a forwarded request: its recording failed ({status})"
    );
    if !(200..300).contains(&sent_status) {
        prop_assert_eq!(
            status.as_u16(),
            sent_status,
            "the provider's error is relayed"
        );
        prop_assert_eq!(
            &body[..],
            &sent[..],
            "the provider's error is relayed as it is"
        );
        return Ok(());
    }
    let streamed = request::inspect(endpoint, request)
        .map(|(i, _)| i.stream)
        .or_else(|| {
            let v = serde_json::from_slice::<Value>(request).ok()?;
            protocol::inspect(endpoint, &v).ok().map(|i| i.stream)
        })
        .unwrap_or(false);
    if !streamed {
        match read_answer(endpoint, &sent) {
            Some(_) => {
                prop_assert_eq!(status, StatusCode::OK, "{:?}", body);
                prop_assert_eq!(&body[..], &sent[..], "a whole answer is relayed as it is");
            }
            None => prop_assert_eq!(status, StatusCode::BAD_GATEWAY),
        }
    } else {
        prop_assert!(
            status == StatusCode::OK || status == StatusCode::BAD_GATEWAY,
            "a stream answered {status}"
        );
    }
    Ok(())
}

#[test]
fn fuzz_gateway_end_to_end() {
    let (door, upstream) = gateway_door();
    let requests = prop_oneof![
        3 => grammar(chat_request()).prop_map(|i| (String::new(), i)),
        2 => mutated("requests"),
    ];
    let whole = prop_oneof![mutated("answers").prop_map(|(_, i)| i), grammar(answer()),]
        .prop_map(|i| ("application/json", vec![Bytes::from(i.bytes)]));
    let streamed = (
        prop_oneof![mutated("streams").prop_map(|(_, i)| i), stream()],
        prop::collection::vec(any::<usize>(), 0..6),
    )
        .prop_map(|(i, cuts)| {
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (i.bytes.len() + 1)).collect();
            at.push(0);
            at.push(i.bytes.len());
            at.sort_unstable();
            let chunks = at
                .windows(2)
                .filter(|w| w[0] < w[1])
                .map(|w| Bytes::copy_from_slice(&i.bytes[w[0]..w[1]]))
                .collect::<Vec<_>>();
            ("text/event-stream", chunks)
        });
    let status =
        prop_oneof![8 => Just(200u16), 1 => select(&[400u16, 401, 429, 500, 503, 529][..])];
    let strategy = (0usize..4, requests, status, prop_oneof![whole, streamed]);
    drive(
        "gateway",
        strategy,
        |(ep, (_, req), status, (ct, chunks))| {
            check_gateway(
                &door,
                &upstream,
                Endpoint::ALL[ep],
                &req.bytes,
                (status, ct, chunks),
            )
        },
    );
}

#[test]
fn regression_gateway_records_calls_whose_provider_reports_usage_near_u64_max() {
    // The recount's tolerance (count × percent), the output sum for the speed metric and
    // the metrics' counters overflowed on such counts: in debug builds the recording task
    // panicked and the call got no ledger entry; release builds wrapped.
    let (door, upstream) = gateway_door();
    let answer = seed_file("answers/regression-openai-usage-near-u64-max.json");
    let request = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..3 {
        let chunks = vec![Bytes::from(answer.clone())];
        check_gateway(
            &door,
            &upstream,
            Endpoint::Chat,
            request,
            (200, "application/json", chunks),
        )
        .unwrap();
    }
}
