//! Metering against recorded provider answers (`fixtures/`: one answer and one stream
//! per provider, in the shapes each documents), and the regressions of issue 13.

use super::meter::{Measured, Meter, measure};
use super::protocol::{Endpoint, RequestInfo, read_answer};
use super::sse::Splitter;
use super::{Call, GatewayConfig};
use crate::auth::Caller;
use bytes::Bytes;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{Scope, Scopes};
use ciyuan_measure::text::{Encoding, encoding_for_model};
use ciyuan_store::KeyRecord;
use serde_json::{Value, json};
use std::time::Instant;

/// Replaces the `k`-th value (in document order) of `v` with `with`; `k` counts down
/// as values are passed. Shared by the readers' property tests.
pub(crate) fn replace_nth(v: &mut Value, k: &mut usize, with: &Value) -> bool {
    if *k == 0 {
        *v = with.clone();
        return true;
    }
    *k -= 1;
    match v {
        Value::Array(items) => items.iter_mut().any(|i| replace_nth(i, k, with)),
        Value::Object(map) => map.values_mut().any(|i| replace_nth(i, k, with)),
        _ => false,
    }
}

/// The property tests' settings: `cases` by default, `CIYUAN_FUZZ_CASES` for a long
/// run; failures are kept in `fixtures/proptest-<name>.txt` and replayed first.
pub(crate) fn fuzz_config(cases: u32, name: &str) -> proptest::test_runner::Config {
    let cases = std::env::var("CIYUAN_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    let path: &'static str = Box::leak(
        format!(
            "{}/src/gateway/fixtures/proptest-{name}.txt",
            env!("CARGO_MANIFEST_DIR")
        )
        .into_boxed_str(),
    );
    proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(path),
        )),
        ..proptest::test_runner::Config::default()
    }
}

/// A fixture's bytes.
fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/gateway/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A stream fed to a meter in pieces of `piece` bytes, up to `cut` bytes if given.
fn metered_stream(endpoint: Endpoint, stream: &[u8], piece: usize, cut: Option<usize>) -> Meter {
    let mut meter = Meter::new(endpoint, None);
    meter.billable = true;
    let mut splitter = Splitter::default();
    let end = cut.unwrap_or(stream.len()).min(stream.len());
    let started = Instant::now();
    for chunk in stream[..end].chunks(piece) {
        for event in splitter.push(&Bytes::copy_from_slice(chunk)) {
            meter.event(&event, false, started);
        }
    }
    if cut.is_some() {
        meter.failure = Some("client_disconnected");
    }
    meter
}

/// A whole answer's meter.
fn metered_answer(endpoint: Endpoint, body: &[u8]) -> Meter {
    let mut meter = Meter::new(endpoint, None);
    meter.billable = true;
    meter.complete = true;
    meter.shown = read_answer(endpoint, body).expect("the fixture is JSON");
    assert!(meter.counted() == meter.shown.reported.is_some());
    meter
}

fn call(endpoint: Endpoint, model: &str, prompt: &str, tools: &str) -> Call {
    Call {
        endpoint,
        caller: Caller {
            key: KeyRecord {
                key_id: "0123456789ab".into(),
                account: "acme/app".parse().unwrap(),
                scopes: [Scope::Gateway].into_iter().collect::<Scopes>(),
                name: None,
                created_at: Timestamp::UNIX_EPOCH,
                revoked_at: None,
            },
        },
        info: RequestInfo {
            model: model.into(),
            stream: true,
            messages: vec![("user".into(), prompt.into())],
            tools_text: tools.into(),
            ..RequestInfo::default()
        },
        provider: 0,
        request_id: "req_test".into(),
        started: Instant::now(),
        at: Timestamp::UNIX_EPOCH,
        reservation: None,
        hold: None,
        shared: None,
        session: None,
        tags: Default::default(),
        upstream_request_id: None,
        encoding: encoding_for_model(model, &[]),
        input_estimate: None,
    }
}

fn tokens(m: &Measured) -> Value {
    serde_json::to_value(&m.tokens).unwrap()
}

/// Every provider's answer and stream, read into the same disjoint token keys.
#[test]
fn every_providers_usage_shape_is_read_streamed_and_not() {
    let cases = [
        // (fixture, endpoint, tokens of the answer, tokens of the stream)
        (
            "openai",
            Endpoint::Chat,
            json!({"text.input": 19, "text.output": 10}),
            json!({"text.input": 19, "text.output": 10}),
        ),
        (
            "deepseek",
            Endpoint::Chat,
            json!({"text.input": 76, "text.cached_input": 1024, "text.output": 14, "text.reasoning": 182}),
            json!({"text.input": 76, "text.cached_input": 1024, "text.output": 14, "text.reasoning": 182}),
        ),
        (
            "qwen",
            Endpoint::Chat,
            json!({"text.input": 22, "text.output": 20, "text.reasoning": 100}),
            json!({"text.input": 22, "text.output": 20, "text.reasoning": 100}),
        ),
        (
            "moonshot",
            Endpoint::Chat,
            json!({"text.input": 4, "text.cached_input": 8, "text.output": 12}),
            json!({"text.input": 4, "text.cached_input": 8, "text.output": 12}),
        ),
        (
            "glm",
            Endpoint::Chat,
            json!({"text.input": 12, "text.output": 45}),
            json!({"text.input": 12, "text.output": 45}),
        ),
        (
            "ark",
            Endpoint::Chat,
            json!({"text.input": 394, "text.cached_input": 1024, "text.output": 30, "text.reasoning": 200}),
            json!({"text.input": 394, "text.cached_input": 1024, "text.output": 30, "text.reasoning": 200}),
        ),
        (
            // Thinking appears only in `total_tokens`: billed, so recorded as reasoning.
            "gemini",
            Endpoint::Chat,
            json!({"text.input": 8, "text.output": 9, "text.reasoning": 606}),
            json!({"text.input": 8, "text.output": 9, "text.reasoning": 606}),
        ),
        (
            "anthropic",
            Endpoint::Messages,
            json!({"text.input": 12, "text.output": 12}),
            json!({"text.input": 472, "text.cached_input": 2048, "text.output": 15}),
        ),
        (
            "anthropic_tool_use",
            Endpoint::Messages,
            json!({"text.input": 472, "text.output": 89}),
            json!({"text.input": 472, "text.output": 89}),
        ),
        (
            // Cached input and reasoning split out of input and output, into chat's keys.
            "openai_responses",
            Endpoint::Responses,
            json!({"text.input": 138, "text.cached_input": 1152, "text.output": 84, "text.reasoning": 384}),
            json!({"text.input": 138, "text.cached_input": 1152, "text.output": 84, "text.reasoning": 384}),
        ),
    ];
    for (name, endpoint, answer, stream) in cases {
        let config = GatewayConfig::default();
        let model = "some-model-without-a-tokenizer";
        let mut m = metered_answer(endpoint, &fixture(&format!("{name}.json")));
        let whole = measure(&config, &call(endpoint, model, "hi", ""), &mut m);
        assert_eq!(tokens(&whole), answer, "{name}.json");
        assert!(!whole.estimated, "{name}.json: the provider's count");
        let bytes = fixture(&format!("{name}.sse"));
        for piece in [7, 64, bytes.len()] {
            let mut m = metered_stream(endpoint, &bytes, piece, None);
            assert!(m.complete, "{name}.sse ends properly");
            assert!(m.counted(), "{name}.sse brings its count");
            let streamed = measure(&config, &call(endpoint, model, "hi", ""), &mut m);
            assert_eq!(tokens(&streamed), stream, "{name}.sse in pieces of {piece}");
            assert!(!streamed.estimated, "{name}.sse: the provider's count");
        }
    }
}

#[test]
fn regression_moonshot_stream_usage_inside_the_choice_is_read() {
    let mut m = metered_stream(Endpoint::Chat, &fixture("moonshot.sse"), 4096, None);
    let measured = measure(
        &GatewayConfig::default(),
        &call(Endpoint::Chat, "kimi-k2-0905-preview", "1+1?", ""),
        &mut m,
    );
    assert_eq!(
        tokens(&measured),
        json!({"text.input": 4, "text.cached_input": 8, "text.output": 12})
    );
    assert!(!measured.estimated);
}

/// Cuts `name.sse` after `percent` of its bytes and measures it for `model`.
fn cut(name: &str, endpoint: Endpoint, model: &str, percent: usize) -> (Measured, Meter) {
    let bytes = fixture(&format!("{name}.sse"));
    let mut m = metered_stream(endpoint, &bytes, 33, Some(bytes.len() * percent / 100));
    let measured = measure(
        &GatewayConfig::default(),
        &call(endpoint, model, "What is the weather in Paris?", ""),
        &mut m,
    );
    (measured, m)
}

#[test]
fn regression_cut_anthropic_stream_is_metered_by_estimate_not_message_start() {
    // Cut before `message_delta`: only `message_start`'s output count of 1 came.
    let (measured, m) = cut(
        "anthropic_tool_use",
        Endpoint::Messages,
        "claude-sonnet-4-5",
        85,
    );
    assert!(!m.complete);
    assert!(measured.estimated, "no final count: Ciyuan's estimate");
    let t = tokens(&measured);
    assert_eq!(
        t["text.input"], 472,
        "message_start's input figures are exact"
    );
    let out = t["text.output"].as_u64().unwrap();
    let delivered = Encoding::O200kBase
        .count(
            "The user wants the weather in Paris; I should call the tool.I'll check the weather.",
        )
        .unwrap() as u64;
    assert!(
        out >= delivered,
        "thinking and text delivered are metered ({out} < {delivered}): {t}"
    );
    let recount = measured.recount.as_ref().unwrap();
    assert_eq!(recount.encoding, "o200k_base", "the declared estimator");
    assert_eq!(recount.output, out);
}

#[test]
fn regression_cut_openai_compatible_stream_without_tokenizer_is_never_zero() {
    for (name, model) in [
        ("glm", "glm-4.5"),
        ("gemini", "gemini-2.5-flash"),
        ("moonshot", "kimi-k2-0905-preview"),
    ] {
        let (measured, _) = cut(name, Endpoint::Chat, model, 80);
        let t = tokens(&measured);
        assert!(measured.estimated, "{name}: {t}");
        assert!(t["text.input"].as_u64().unwrap() > 0, "{name}: {t}");
        let delivered =
            t["text.output"].as_u64().unwrap_or(0) + t["text.reasoning"].as_u64().unwrap_or(0);
        assert!(delivered > 0, "{name}: delivered text is metered: {t}");
    }
}

#[test]
fn regression_unreadable_stream_events_are_metered_as_delivered_text() {
    // A chunk whose fields have unexpected types is refused by the chunk reader whole;
    // it reached the client all the same, so a cut stream counts its bytes.
    let good = r#"data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#;
    let odd = r#"data: {"choices":[{"index":0,"delta":{"content":"world, and more words","tool_calls":{}}}]}"#;
    assert!(serde_json::from_str::<super::protocol::OpenAiChunk>(&odd[6..]).is_err());
    let stream = format!("{good}\n\n{odd}\n\n");
    let meter = metered_stream(Endpoint::Chat, stream.as_bytes(), 7, Some(stream.len()));
    assert!(
        meter.shown.text.starts_with("Hello"),
        "{}",
        meter.shown.text
    );
    assert!(
        meter.shown.text.contains("world, and more words"),
        "{}",
        meter.shown.text
    );
    let anthropic = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":[],\"delta\":{\"type\":\"text_delta\",\"text\":\"hidden words\"}}\n\n";
    let meter = metered_stream(
        Endpoint::Messages,
        anthropic.as_bytes(),
        5,
        Some(anthropic.len()),
    );
    assert!(
        meter.shown.text.contains("hidden words"),
        "{}",
        meter.shown.text
    );
}

#[test]
fn regression_delivered_reasoning_of_a_cut_stream_is_metered() {
    // A DeepSeek reasoner cut in its reasoning: the reasoning text was delivered.
    let (measured, _) = cut("deepseek", Endpoint::Chat, "deepseek-reasoner", 50);
    let t = tokens(&measured);
    assert!(measured.estimated);
    assert!(t["text.reasoning"].as_u64().unwrap() > 0, "{t}");
}

#[test]
fn regression_anthropic_tool_use_recounts_the_same_streamed_and_not() {
    let mut whole = metered_answer(Endpoint::Messages, &fixture("anthropic_tool_use.json"));
    let mut streamed = metered_stream(
        Endpoint::Messages,
        &fixture("anthropic_tool_use.sse"),
        19,
        None,
    );
    let model = "claude-sonnet-4-5";
    let c = call(Endpoint::Messages, model, "Weather in Paris?", "");
    // The text Ciyuan recounts is the same however it arrived.
    let a = measure(&GatewayConfig::default(), &c, &mut whole);
    let b = measure(&GatewayConfig::default(), &c, &mut streamed);
    assert_eq!(whole.shown.text, streamed.shown.text);
    assert_eq!(whole.shown.reasoning, streamed.shown.reasoning);
    assert_eq!(
        whole.shown.reasoning,
        "The user wants the weather in Paris; I should call the tool."
    );
    assert_eq!((whole.shown.tool_calls, streamed.shown.tool_calls), (1, 1));
    assert_eq!(tokens(&a), tokens(&b));
}

/// A provider speaking Anthropic's protocol for a model Ciyuan can count exactly: the
/// recount compares thinking included, tool calls allowed for.
#[test]
fn regression_thinking_and_tool_calls_do_not_flag_an_honest_count() {
    let answer = |thinking: &str, text: &str, tool: bool, output: u64| {
        let mut content = vec![
            json!({"type": "thinking", "thinking": thinking}),
            json!({"type": "text", "text": text}),
        ];
        if tool {
            content.push(json!({"type": "tool_use", "id": "t", "name": "get_weather", "input": {"city": "Paris"}}));
        }
        json!({"content": content, "usage": {"input_tokens": 0, "output_tokens": output}})
            .to_string()
    };
    let enc = Encoding::O200kBase;
    let thinking = "Let me think about the weather in Paris in some detail first.";
    let text = "It is sunny.";
    let honest = (enc.count(thinking).unwrap() + enc.count(text).unwrap()) as u64;
    let config = GatewayConfig {
        recount_tolerance_percent: 0,
        recount_tolerance_tokens: 0,
        ..GatewayConfig::default()
    };
    let mut c = call(Endpoint::Messages, "gpt-4o", "", "");
    c.info.messages.clear();
    let exact_input = super::count_input(enc, &c.info).unwrap().0;
    let with_input = |body: String| {
        let mut v: Value = serde_json::from_str(&body).unwrap();
        v["usage"]["input_tokens"] = json!(exact_input);
        v.to_string()
    };
    // Thinking is output to Anthropic: recounted with it, no flag.
    let mut m = metered_answer(
        Endpoint::Messages,
        with_input(answer(thinking, text, false, honest)).as_bytes(),
    );
    let measured = measure(&config, &c, &mut m);
    assert!(
        !measured.recount.as_ref().unwrap().flagged,
        "{:?}",
        measured.recount
    );
    // A tool call's framing is the provider's: allowed for, and noted.
    let args = enc.count("{\"city\":\"Paris\"}").unwrap() as u64;
    let mut m = metered_answer(
        Endpoint::Messages,
        with_input(answer(thinking, text, true, honest + args + 12)).as_bytes(),
    );
    let measured = measure(&config, &c, &mut m);
    assert!(!measured.recount.as_ref().unwrap().flagged);
    assert_eq!(measured.uncounted, ["tool_calls"]);
    // A count far off is still flagged.
    let mut m = metered_answer(
        Endpoint::Messages,
        with_input(answer(thinking, text, false, honest * 3)).as_bytes(),
    );
    assert!(measure(&config, &c, &mut m).recount.unwrap().flagged);
}

#[test]
fn regression_tool_definitions_widen_the_input_tolerance_not_flag() {
    let config = GatewayConfig {
        recount_tolerance_percent: 0,
        recount_tolerance_tokens: 0,
        ..GatewayConfig::default()
    };
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]).to_string();
    let c = call(Endpoint::Chat, "gpt-4o", "Weather in Paris?", &tools);
    let (ours, tools_n) = super::count_input(Encoding::O200kBase, &c.info).unwrap();
    // The provider renders the definitions more compactly than their JSON.
    let provider_input = ours - tools_n / 2;
    let body = json!({"choices": [{"message": {"content": "Sunny."}}],
        "usage": {"prompt_tokens": provider_input, "completion_tokens": 2}})
    .to_string();
    let mut m = metered_answer(Endpoint::Chat, body.as_bytes());
    let measured = measure(&config, &c, &mut m);
    let r = measured.recount.as_ref().unwrap();
    assert!(!r.flagged, "{r:?}");
    assert_eq!(measured.uncounted, ["tools"]);
    // Beyond the definitions' own size, it is flagged.
    let body = json!({"choices": [{"message": {"content": "Sunny."}}],
        "usage": {"prompt_tokens": ours + tools_n + 10, "completion_tokens": 2}})
    .to_string();
    let mut m = metered_answer(Endpoint::Chat, body.as_bytes());
    assert!(measure(&config, &c, &mut m).recount.unwrap().flagged);
}

#[test]
fn regression_reported_counts_out_of_range_are_no_report() {
    let body = json!({"choices": [{"message": {"content": "hi"}}],
        "usage": {"prompt_tokens": u64::MAX, "completion_tokens": 1}})
    .to_string();
    let shown = read_answer(Endpoint::Chat, body.as_bytes()).unwrap();
    assert!(shown.reported.is_none());
    let body = json!({"content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 1, "output_tokens": 1u64 << 62}})
    .to_string();
    assert!(
        read_answer(Endpoint::Messages, body.as_bytes())
            .unwrap()
            .reported
            .is_none()
    );
}

/// An answer's usage is read in the answer's one typed pass; one with a field of
/// another type, or a repeated key, leaves the whole answer to the forgiving reader,
/// which reads the same text and the same report as before.
#[test]
fn a_usage_of_the_wrong_shape_is_read_as_the_forgiving_reader_reads_it() {
    // (serde's derived structs read an array as the fields in order, as they did when
    // the usage was read apart.)
    let chat = |usage: &str| {
        format!(
            r#"{{"model": "gpt-4o-2024-08-06", "choices": [{{"message": {{"content": "hello there"}}}}], "usage": {usage}}}"#
        )
    };
    let messages = |usage: &str| {
        format!(
            r#"{{"model": "claude-sonnet-4-5", "content": [{{"type": "text", "text": "hello there"}}], "usage": {usage}}}"#
        )
    };
    for (endpoint, body, reported) in [
        (
            Endpoint::Chat,
            chat(r#"{"prompt_tokens": "21", "completion_tokens": 16}"#),
            false,
        ),
        (
            Endpoint::Chat,
            chat(r#"{"prompt_tokens": 21, "completion_tokens": 16, "prompt_tokens_details": 3}"#),
            false,
        ),
        (Endpoint::Chat, chat("[21, 16]"), true),
        (Endpoint::Chat, chat("null"), false),
        (
            Endpoint::Chat,
            chat(r#"{"prompt_tokens": 21, "prompt_tokens": 22, "completion_tokens": 16}"#),
            true,
        ),
        (
            Endpoint::Chat,
            chat(r#"{"prompt_tokens": 21, "completion_tokens": 16, "total_tokens": 37}"#),
            true,
        ),
        (
            Endpoint::Messages,
            messages(r#"{"input_tokens": "21", "output_tokens": 16}"#),
            false,
        ),
        (
            Endpoint::Messages,
            messages(r#"{"input_tokens": 21, "input_tokens": 22, "output_tokens": 16}"#),
            true,
        ),
        (Endpoint::Messages, messages("null"), false),
        (
            Endpoint::Messages,
            messages(r#"{"input_tokens": 21, "output_tokens": 16}"#),
            true,
        ),
    ] {
        let typed = read_answer(endpoint, body.as_bytes());
        assert_eq!(
            typed,
            super::protocol::read_answer_value(endpoint, body.as_bytes()),
            "{body}"
        );
        let shown = typed.unwrap();
        assert_eq!(shown.text, "hello there", "{body}");
        assert_eq!(shown.reported.is_some(), reported, "{body}");
    }
}

#[test]
fn responses_recount_the_same_streamed_and_not_and_flag_nothing() {
    let model = "gpt-5";
    let mut whole = metered_answer(Endpoint::Responses, &fixture("openai_responses.json"));
    let mut streamed = metered_stream(
        Endpoint::Responses,
        &fixture("openai_responses.sse"),
        23,
        None,
    );
    assert!(streamed.complete && streamed.counted());
    assert_eq!(whole.shown.text, streamed.shown.text);
    assert_eq!(whole.shown.reasoning, streamed.shown.reasoning);
    assert!(whole.shown.text.starts_with("Under a silver moon"));
    assert!(whole.shown.reasoning.contains("bedtime story"));
    let c = call(Endpoint::Responses, model, "Tell me a bedtime story.", "");
    let config = GatewayConfig {
        recount_tolerance_percent: 0,
        recount_tolerance_tokens: 0,
        ..GatewayConfig::default()
    };
    for m in [&mut whole, &mut streamed] {
        let measured = measure(&config, &c, m);
        let recount = measured.recount.unwrap();
        // The output recounted is the text alone: the reasoning is reported apart.
        let text = encoding_for_model(model, &[])
            .unwrap()
            .count(&m.shown.text)
            .unwrap() as u64;
        assert_eq!(recount.output, text);
        assert!(!measured.estimated);
    }
}

#[test]
fn responses_streams_that_fail_or_break_off_are_billed_what_was_counted_or_seen() {
    let sse = String::from_utf8(fixture("openai_responses.sse")).unwrap();
    let completed = sse.rfind("event: response.completed").unwrap();
    // `response.failed` with the usage of what was generated: that count is billed, and
    // the stream did not end properly (recorded as cut).
    let failed = format!(
        "{}event: response.failed\ndata: {}\n\n",
        &sse[..completed],
        json!({"type": "response.failed", "sequence_number": 99, "response": {
            "id": "resp_1", "object": "response", "status": "failed",
            "error": {"code": "server_error", "message": "The model failed."},
            "output": [], "usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 49}}})
    );
    let mut m = metered_stream(Endpoint::Responses, failed.as_bytes(), 50, None);
    assert!(!m.complete, "a failed response is no proper end");
    assert!(m.counted(), "its count is the provider's");
    let measured = measure(
        &GatewayConfig::default(),
        &call(Endpoint::Responses, "gpt-5", "hi", ""),
        &mut m,
    );
    assert_eq!(
        tokens(&measured),
        json!({"text.input": 40, "text.output": 9})
    );
    // An `error` event, or a cut, before any usage: Ciyuan's count of what was
    // delivered, marked estimated.
    for end in [
        "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\",\"param\":null,\"sequence_number\":99}\n\n",
        "",
    ] {
        let stream = format!("{}{end}", &sse[..completed]);
        let mut m = metered_stream(Endpoint::Responses, stream.as_bytes(), 31, None);
        assert!(!m.complete && !m.counted());
        let measured = measure(
            &GatewayConfig::default(),
            &call(Endpoint::Responses, "gpt-5", "Tell me a bedtime story.", ""),
            &mut m,
        );
        assert!(measured.estimated);
        let t = tokens(&measured);
        assert!(t["text.output"].as_u64().unwrap() > 20, "{t}");
        assert!(t["text.reasoning"].as_u64().unwrap() > 10, "{t}");
        assert!(t["text.input"].as_u64().unwrap() > 5, "{t}");
    }
}

mod properties {
    use super::*;
    use crate::gateway::protocol::{self, OpenAiUsage};
    use proptest::prelude::*;

    const FIXTURES: [(&str, Endpoint); 10] = [
        ("openai", Endpoint::Chat),
        ("deepseek", Endpoint::Chat),
        ("qwen", Endpoint::Chat),
        ("moonshot", Endpoint::Chat),
        ("glm", Endpoint::Chat),
        ("ark", Endpoint::Chat),
        ("gemini", Endpoint::Chat),
        ("anthropic", Endpoint::Messages),
        ("anthropic_tool_use", Endpoint::Messages),
        ("openai_responses", Endpoint::Responses),
    ];

    /// JSON values of every type.
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..1 << 41).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("type".to_string()),
                        Just("text".to_string()),
                        Just("usage".to_string()),
                        Just("content".to_string()),
                        "[a-z_]{1,10}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A fixture with `edits` applied: (position, byte) overwrites, then a cut.
    fn mutated(bytes: &[u8], edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        let mut b = bytes.to_vec();
        for (at, byte) in edits {
            if !b.is_empty() {
                let i = at % b.len();
                b[i] = *byte;
            }
        }
        b.truncate(cut % (b.len() + 1));
        b
    }

    proptest! {
        #![proptest_config(super::fuzz_config(300, "metering"))]

        /// Whatever a provider sends, metering answers (no panic), and what it records
        /// stays within the bounds the ledger's sums rely on.
        #[test]
        fn broken_answers_and_streams_are_metered_without_panicking(
            which in 0usize..FIXTURES.len(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            piece in 1usize..200,
            model in proptest::sample::select(vec!["gpt-4o", "claude-sonnet-4-5"]),
        ) {
            let (name, endpoint) = FIXTURES[which];
            let config = GatewayConfig::default();
            for (file, stream) in [(format!("{name}.json"), false), (format!("{name}.sse"), true)] {
                let bytes = mutated(&fixture(&file), &edits, cut);
                let mut meter = if stream {
                    metered_stream(endpoint, &bytes, piece, None)
                } else {
                    match read_answer(endpoint, &bytes) {
                        Some(shown) => {
                            let mut m = Meter::new(endpoint, None);
                            m.billable = true;
                            m.shown = shown;
                            m
                        }
                        None => continue,
                    }
                };
                let measured = measure(&config, &call(endpoint, model, "hi", ""), &mut meter);
                for t in measured.tokens.iter() {
                    prop_assert!(t.count > 0 && t.count.unsigned_abs() <= 4 * protocol::MAX_REPORTED_TOKENS);
                }
            }
        }

        /// Structurally mutated answers (a value anywhere replaced by one of any type):
        /// the typed reader reads them as the forgiving one does, or leaves them to it.
        #[test]
        fn structurally_mutated_answers_are_read_as_the_forgiving_reader_reads_them(
            which in 0usize..FIXTURES.len(),
            replacements in proptest::collection::vec((any::<usize>(), any_value()), 1..4),
        ) {
            let (name, endpoint) = FIXTURES[which];
            let mut v: Value = serde_json::from_slice(&fixture(&format!("{name}.json"))).unwrap();
            for (k, with) in &replacements {
                let mut k = k % 48;
                replace_nth(&mut v, &mut k, with);
            }
            let bytes = v.to_string().into_bytes();
            prop_assert_eq!(
                read_answer(endpoint, &bytes),
                protocol::read_answer_value(endpoint, &bytes),
                "{}", v
            );
        }

        /// OpenAI-shaped usage of any figures: out-of-range reports are no report, the
        /// others add up to what the provider bills.
        #[test]
        fn openai_usage_of_any_figures_adds_up(
            prompt in 0u64..(1 << 41),
            completion in 0u64..(1 << 41),
            cached in proptest::option::of(0u64..(1 << 41)),
            reasoning in proptest::option::of(0u64..(1 << 41)),
            total in proptest::option::of(0u64..(1 << 42)),
        ) {
            let mut v = json!({"prompt_tokens": prompt, "completion_tokens": completion});
            if let Some(c) = cached {
                v["prompt_tokens_details"] = json!({"cached_tokens": c});
            }
            if let Some(r) = reasoning {
                v["completion_tokens_details"] = json!({"reasoning_tokens": r});
            }
            if let Some(t) = total {
                v["total_tokens"] = json!(t);
            }
            let u: OpenAiUsage = serde_json::from_value(v).unwrap();
            let in_range = [Some(prompt), Some(completion), cached, reasoning, total]
                .iter()
                .flatten()
                .all(|n| *n <= protocol::MAX_REPORTED_TOKENS);
            match u.reported() {
                None => prop_assert!(!in_range),
                Some(r) => {
                    prop_assert!(in_range);
                    let billed = (prompt + completion).max(total.unwrap_or(0));
                    prop_assert_eq!(r.tokens.total(), Some(i64::try_from(billed).unwrap()));
                }
            }
        }
    }
}
