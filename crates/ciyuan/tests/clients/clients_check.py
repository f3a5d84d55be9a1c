"""Drives Ciyuan's gateway with LiteLLM (as a library) and LangChain.

Usage: clients_check.py BASE_URL GATEWAY_KEY

Prints one JSON line per call: the scenario, the gateway's request id (from the
x-ciyuan-request-id header, as each library exposes the answer's headers) and the usage
the library parsed, in OpenAI's totals (input including cached, output including
reasoning), so the caller can compare them with the ledger. Anything unexpected
raises, and the exit code is non-zero.
"""

import json
import os
import subprocess
import sys
import tempfile

import litellm
from langchain_openai import ChatOpenAI

base, key = sys.argv[1], sys.argv[2]
PROMPT = "How are tokens counted for 词元 billing? Answer in one line."


def emit(scenario, request_id, input_total, output_total, cached=0, reasoning=0):
    assert request_id, f"{scenario}: no x-ciyuan-request-id"
    print(json.dumps({
        "scenario": scenario,
        "request_id": request_id,
        "usage": {"input": input_total, "output": output_total,
                  "cached": cached or 0, "reasoning": reasoning or 0},
    }), flush=True)


def litellm_header(response):
    headers = response._hidden_params.get("additional_headers") or {}
    return headers.get("llm_provider-x-ciyuan-request-id") or headers.get("x-ciyuan-request-id")


# LiteLLM, chat completions.
r = litellm.completion(model="openai/gpt-4o", api_base=base + "/v1", api_key=key,
                       messages=[{"role": "user", "content": PROMPT}], max_tokens=30)
assert r.choices[0].message.content, r
u = r.usage
emit("litellm.completion", litellm_header(r), u.prompt_tokens, u.completion_tokens,
     (u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0),
     (u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0))

# LiteLLM, the Responses API.
r = litellm.responses(model="openai/gpt-4o", api_base=base + "/v1", api_key=key,
                      input=PROMPT, max_output_tokens=30)
assert r.output, r
u = r.usage
emit("litellm.responses", litellm_header(r), u.input_tokens, u.output_tokens,
     u.input_tokens_details.cached_tokens if u.input_tokens_details else 0,
     u.output_tokens_details.reasoning_tokens if u.output_tokens_details else 0)

# An invalid key surfaces as LiteLLM's AuthenticationError (it keys on OpenAI's wording).
try:
    litellm.completion(model="openai/gpt-4o", api_base=base + "/v1", api_key="cy_bad",
                       messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    raise AssertionError("an invalid key was accepted")
except litellm.AuthenticationError:
    pass

# LangChain, chat completions and then the Responses API (`use_responses_api`).
for scenario, extra in [("langchain.chat", {}), ("langchain.responses", {"use_responses_api": True})]:
    llm = ChatOpenAI(model="gpt-4o", base_url=base + "/v1", api_key=key, max_retries=0,
                     max_tokens=30, include_response_headers=True, **extra)
    m = llm.invoke(PROMPT)
    assert m.text, m
    # The answer of the API asked for: a response's id, or a chat completion's.
    assert m.response_metadata["id"].startswith("resp_" if extra else "chatcmpl-"), m
    u = m.usage_metadata
    emit(scenario, m.response_metadata["headers"].get("x-ciyuan-request-id"),
         u["input_tokens"], u["output_tokens"],
         u.get("input_token_details", {}).get("cache_read", 0),
         u.get("output_token_details", {}).get("reasoning", 0))

# LangChain streaming through the Responses API: usage arrives on the last chunk.
llm = ChatOpenAI(model="gpt-5-mini", base_url=base + "/v1", api_key=key, max_retries=0,
                 use_responses_api=True, include_response_headers=True, streaming=True)
full = None
for chunk in llm.stream(PROMPT):
    full = chunk if full is None else full + chunk
assert full.text and full.response_metadata["id"].startswith("resp_"), full
u = full.usage_metadata
emit("langchain.responses.stream", full.response_metadata.get("headers", {}).get("x-ciyuan-request-id"),
     u["input_tokens"], u["output_tokens"],
     u.get("input_token_details", {}).get("cache_read", 0),
     u.get("output_token_details", {}).get("reasoning", 0))

# The `llm` command line, through an OpenAI-compatible model of its configuration. It
# shows no answer headers, so this call is the last one: the caller compares it with the
# gateway's latest entry.
with tempfile.TemporaryDirectory() as home:
    with open(os.path.join(home, "extra-openai-models.yaml"), "w") as f:
        f.write(f"- model_id: ciyuan-gpt-4o\n  model_name: gpt-4o\n"
                f"  api_base: \"{base}/v1\"\n  api_key_name: ciyuan\n")
    env = {**os.environ, "LLM_USER_PATH": home}
    cli = os.path.join(os.path.dirname(sys.executable), "llm")
    subprocess.run([cli, "keys", "set", "ciyuan", "--value", key], env=env, check=True)
    text = subprocess.run([cli, "-m", "ciyuan-gpt-4o", PROMPT], env=env, check=True,
                          capture_output=True, text=True).stdout
    assert text.strip(), text
    log = json.loads(subprocess.run([cli, "logs", "-n", "1", "--json"], env=env, check=True,
                                    capture_output=True, text=True).stdout)[0]
    print(json.dumps({"scenario": "llm.cli", "last": True,
                      "usage": {"input": log["input_tokens"], "output": log["output_tokens"],
                                "cached": 0, "reasoning": 0}}), flush=True)

print(json.dumps({"scenario": "done"}), flush=True)
