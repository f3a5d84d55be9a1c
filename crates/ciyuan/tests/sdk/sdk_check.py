"""Drives Ciyuan's gateway with the official OpenAI and Anthropic Python SDKs.

Usage: sdk_check.py BASE_URL GATEWAY_KEY

Prints one JSON line per call: the scenario, the gateway's request id (from the
x-ciyuan-request-id header) and the usage the SDK parsed, so the caller can compare
them with the ledger. Any unexpected behaviour raises, and the exit code is non-zero.
"""

import json
import sys

import anthropic
import openai

base, key = sys.argv[1], sys.argv[2]
oai = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
ant = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How are tokens counted for 词元 billing?"},
]


def emit(scenario, raw, usage, **extra):
    print(json.dumps({
        "scenario": scenario,
        "request_id": raw.headers.get("x-ciyuan-request-id"),
        "usage": usage,
        **extra,
    }), flush=True)


# OpenAI chat, not streamed.
raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=40)
c = raw.parse()
assert c.choices[0].message.content, c
emit("openai.chat", raw, c.usage.model_dump())

# OpenAI chat, streamed without asking for usage: the gateway asked for it upstream and
# must take the extra chunk out again.
raw = oai.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=MESSAGES, max_tokens=30, stream=True)
text, usage_chunks = "", 0
for chunk in raw.parse():
    if chunk.usage is not None:
        usage_chunks += 1
    for ch in chunk.choices:
        text += ch.delta.content or ""
assert text and usage_chunks == 0, (text, usage_chunks)
emit("openai.chat.stream", raw, None, text=text)

# Streamed with usage asked for: exactly one usage chunk, with empty choices.
raw = oai.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=MESSAGES, max_tokens=30, stream=True,
    stream_options={"include_usage": True})
usage = None
for chunk in raw.parse():
    if chunk.usage is not None:
        assert usage is None and chunk.choices == [], chunk
        usage = chunk.usage.model_dump()
assert usage is not None
emit("openai.chat.stream_usage", raw, usage)

# Legacy completions and embeddings.
raw = oai.completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=8)
emit("openai.completions", raw, raw.parse().usage.model_dump())
raw = oai.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["ledger", "词元"])
e = raw.parse()
assert len(e.data) == 2 and len(e.data[0].embedding) > 0
emit("openai.embeddings", raw, e.usage.model_dump())

# OpenAI Responses, not streamed and streamed (a reasoning model: its usage carries
# reasoning tokens the client never sees as text).
raw = oai.responses.with_raw_response.create(
    model="gpt-4o", instructions="You are terse.",
    input="How are tokens counted for 词元 billing?", max_output_tokens=40)
r = raw.parse()
assert r.output_text and r.status in ("completed", "incomplete"), r
emit("openai.responses", raw, r.usage.model_dump())
# The provider keeps it: retrieved and its input items listed through the gateway, by
# the SDK's own calls (nothing billed; the Rust side counts the entries).
again = oai.responses.retrieve(r.id)
assert again.id == r.id and again.usage == r.usage, again
assert oai.responses.input_items.list(r.id).object == "list"
print(json.dumps({"scenario": "openai.responses.retrieve", "id": r.id}), flush=True)
raw = oai.responses.with_raw_response.create(
    model="gpt-5-mini", input=[{"role": "user", "content": "Stream me something."}],
    max_output_tokens=200, stream=True)
usage, text, kinds = None, "", []
for ev in raw.parse():
    kinds.append(ev.type)
    if ev.type == "response.output_text.delta":
        text += ev.delta
    elif ev.type in ("response.completed", "response.incomplete"):
        usage = ev.response.usage.model_dump()
assert text and usage and kinds[0] == "response.created", kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert usage["output_tokens_details"]["reasoning_tokens"] > 0, usage
emit("openai.responses.stream", raw, usage, text=text)

# Anthropic, not streamed and streamed.
raw = ant.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=40, system="You are terse.",
    messages=[{"role": "user", "content": "How are tokens counted for 词元 billing?"}])
m = raw.parse()
assert m.content[0].text, m
emit("anthropic.messages", raw, m.usage.model_dump())
raw = ant.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=30, stream=True,
    messages=[{"role": "user", "content": "Stream me something."}])
usage, text = {}, ""
for ev in raw.parse():
    if ev.type == "message_start":
        usage.update({k: v for k, v in ev.message.usage.model_dump().items() if v is not None})
    elif ev.type == "content_block_delta":
        text += ev.delta.text
    elif ev.type == "message_delta":
        usage["output_tokens"] = ev.usage.output_tokens
assert text
emit("anthropic.messages.stream", raw, usage, text=text)

# The SDKs' helper for streams works through the gateway too.
with ant.messages.stream(model="claude-haiku-4-5", max_tokens=20,
                         messages=[{"role": "user", "content": "hi"}]) as s:
    final = s.get_final_message()
assert final.usage.output_tokens > 0

# Anthropic's token count: the provider's answer, never billed (the caller checks the
# ledger did not grow for it).
raw = ant.messages.with_raw_response.count_tokens(
    model="claude-sonnet-4-5", system="You are terse.",
    messages=[{"role": "user", "content": "How are tokens counted for 词元 billing?"}])
n = raw.parse().input_tokens
assert n > 0, n
print(json.dumps({"scenario": "anthropic.count_tokens", "input_tokens": n}), flush=True)

# Models: what the providers behind the wildcard patterns list, in each SDK's shape.
ids = [m.id for m in oai.models.list()]
assert "gpt-4o" in ids and "text-embedding-3-small" in ids, ids
claude = [m.id for m in ant.models.list()]
assert any(i.startswith("claude-sonnet-4-5") for i in claude), claude

# Errors arrive as the SDKs' usual exception types.
def expect(exc, fn):
    try:
        fn()
    except exc as e:
        print(json.dumps({"scenario": "error", "type": type(e).__name__,
                          "status": getattr(e, "status_code", None)}), flush=True)
        return
    raise AssertionError(f"expected {exc.__name__}")

bad_oai = openai.OpenAI(base_url=base + "/v1", api_key="cy_000000000000_" + "0" * 64, max_retries=0)
bad_ant = anthropic.Anthropic(base_url=base, api_key="cy_000000000000_" + "0" * 64, max_retries=0)
expect(openai.AuthenticationError, lambda: bad_oai.chat.completions.create(model="gpt-4o", messages=MESSAGES))
expect(anthropic.AuthenticationError, lambda: bad_ant.messages.create(
    model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]))
expect(openai.RateLimitError, lambda: oai.chat.completions.create(
    model="gpt-4o", messages=MESSAGES, extra_headers={"x-sim-fault": "429"}))
expect(openai.InternalServerError, lambda: oai.chat.completions.create(
    model="gpt-4o", messages=MESSAGES, extra_headers={"x-sim-fault": "500"}))
expect(anthropic.RateLimitError, lambda: ant.messages.create(
    model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}],
    extra_headers={"x-sim-fault": "429"}))
expect(anthropic.InternalServerError, lambda: ant.messages.create(
    model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}],
    extra_headers={"x-sim-fault": "500"}))
expect(openai.NotFoundError, lambda: oai.chat.completions.create(model="no-such-model", messages=MESSAGES))
expect(anthropic.NotFoundError, lambda: ant.messages.create(
    model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]))
expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="gpt-4o", messages="nope"))
expect(openai.BadRequestError, lambda: oai.responses.create(model="gpt-4o", input=3))
expect(openai.NotFoundError, lambda: oai.responses.create(model="no-such-model", input="x"))
expect(openai.NotFoundError, lambda: oai.responses.retrieve("resp_never_made_here"))
expect(anthropic.NotFoundError, lambda: ant.messages.count_tokens(
    model="no-such-model", messages=[{"role": "user", "content": "x"}]))

# An endpoint the gateway lacks: each SDK's not-found error, its body parsed as the
# protocol's error object (problem+json reached the SDKs as a body they could not read).
def expect_body(exc, fn, check):
    try:
        fn()
    except exc as e:
        assert check(e.body), e.body
        print(json.dumps({"scenario": "error", "type": type(e).__name__,
                          "status": getattr(e, "status_code", None)}), flush=True)
        return
    raise AssertionError(f"expected {exc.__name__}")

expect_body(openai.NotFoundError, lambda: oai.batches.list(),
            lambda b: b["type"] == "invalid_request_error"
            and "no route for /v1/batches" in b["message"])
expect_body(anthropic.NotFoundError, lambda: ant.messages.batches.list(),
            lambda b: b["error"]["type"] == "not_found_error"
            and "no route for /v1/messages/batches" in b["error"]["message"])
print(json.dumps({"scenario": "done"}), flush=True)
