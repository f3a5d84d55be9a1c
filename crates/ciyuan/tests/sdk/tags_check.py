"""Sends tagged requests through Ciyuan's gateway with the official OpenAI Python SDK:
OpenAI's `metadata` and the `x-ciyuan-tags` header (through `extra_headers`).

Usage: tags_check.py BASE_URL GATEWAY_KEY

Prints one JSON line per call: the scenario, the gateway's request id and the usage
the SDK parsed. A tag the gateway cannot record whole must come back as the SDK's
BadRequestError, never be cut silently.
"""

import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
oai = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
MESSAGES = [{"role": "user", "content": "What does the search feature cost?"}]


def emit(scenario, raw, usage):
    print(json.dumps({
        "scenario": scenario,
        "request_id": raw.headers.get("x-ciyuan-request-id"),
        "usage": usage,
    }), flush=True)


# Chat: the header and metadata, merged.
raw = oai.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=MESSAGES, max_tokens=30,
    metadata={"experiment": "b7"},
    extra_headers={"x-ciyuan-tags": "feature=search,team=hr"})
emit("chat.search", raw, raw.parse().usage.model_dump())

# Streamed chat, metadata only.
raw = oai.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=MESSAGES, max_tokens=30, stream=True,
    stream_options={"include_usage": True},
    metadata={"feature": "chat", "team": "hr"})
usage = None
for chunk in raw.parse():
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
emit("chat.chat", raw, usage)

# The Responses API's metadata.
raw = oai.responses.with_raw_response.create(
    model="gpt-4o", input="Summarize the ledger.", max_output_tokens=30,
    metadata={"feature": "search", "team": "ops"})
emit("responses.search", raw, raw.parse().usage.model_dump())

# Untagged.
raw = oai.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=MESSAGES, max_tokens=30)
emit("chat.untagged", raw, raw.parse().usage.model_dump())

# A tag past the bounds: the SDK's own error, naming it.
try:
    oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=5,
        extra_headers={"x-ciyuan-tags": "Feature=search"})
    raise SystemExit("an uppercase tag key was accepted")
except openai.BadRequestError as e:
    assert "lowercase" in str(e), e
    print(json.dumps({"scenario": "error", "type": type(e).__name__}), flush=True)

print(json.dumps({"scenario": "done"}), flush=True)
