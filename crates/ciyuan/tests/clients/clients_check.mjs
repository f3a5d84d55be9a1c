// Drives Ciyuan's gateway with the official OpenAI SDK for Node and the Vercel AI SDK.
//
// Usage: node clients_check.mjs BASE_URL GATEWAY_KEY
//
// Prints one JSON line per call, as clients_check.py does: the scenario, the gateway's
// request id (the x-ciyuan-request-id header) and the usage the client parsed, in
// OpenAI's totals (input including cached, output including reasoning). Anything
// unexpected throws, and the exit code is non-zero.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";

const [base, key] = process.argv.slice(2);
const PROMPT = "How are tokens counted for 词元 billing? Answer in one line.";

function emit(scenario, requestId, input, output, cached = 0, reasoning = 0) {
  if (!requestId) throw new Error(`${scenario}: no x-ciyuan-request-id`);
  console.log(JSON.stringify({
    scenario,
    request_id: requestId,
    usage: { input, output, cached: cached ?? 0, reasoning: reasoning ?? 0 },
  }));
}

const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key, maxRetries: 0 });

// The Responses API, not streamed and streamed.
{
  const { data, response } = await client.responses
    .create({ model: "gpt-4o", input: PROMPT, max_output_tokens: 30 })
    .withResponse();
  if (!data.output_text) throw new Error(JSON.stringify(data));
  const u = data.usage;
  emit("node.responses", response.headers.get("x-ciyuan-request-id"), u.input_tokens,
    u.output_tokens, u.input_tokens_details?.cached_tokens,
    u.output_tokens_details?.reasoning_tokens);
}
{
  const { data: stream, response } = await client.responses
    .create({ model: "gpt-5-mini", input: PROMPT, stream: true })
    .withResponse();
  let usage = null;
  let text = "";
  for await (const ev of stream) {
    if (ev.type === "response.output_text.delta") text += ev.delta;
    if (ev.type === "response.completed") usage = ev.response.usage;
  }
  if (!text || !usage) throw new Error(`no text or usage: ${text} ${usage}`);
  emit("node.responses.stream", response.headers.get("x-ciyuan-request-id"),
    usage.input_tokens, usage.output_tokens, usage.input_tokens_details?.cached_tokens,
    usage.output_tokens_details?.reasoning_tokens);
}
// Chat, streamed with usage asked for.
{
  const { data: stream, response } = await client.chat.completions
    .create({
      model: "gpt-4o-mini", messages: [{ role: "user", content: PROMPT }], max_tokens: 30,
      stream: true, stream_options: { include_usage: true },
    })
    .withResponse();
  let usage = null;
  for await (const chunk of stream) if (chunk.usage) usage = chunk.usage;
  emit("node.chat.stream", response.headers.get("x-ciyuan-request-id"), usage.prompt_tokens,
    usage.completion_tokens, usage.prompt_tokens_details?.cached_tokens,
    usage.completion_tokens_details?.reasoning_tokens);
}
// An invalid key is the SDK's own AuthenticationError.
try {
  await new OpenAI({ baseURL: `${base}/v1`, apiKey: "cy_bad", maxRetries: 0 })
    .responses.create({ model: "gpt-4o", input: PROMPT });
  throw new Error("an invalid key was accepted");
} catch (e) {
  if (!(e instanceof OpenAI.AuthenticationError)) throw e;
}

// The Vercel AI SDK: `openai(model)` speaks the Responses API by default.
const openai = createOpenAI({ baseURL: `${base}/v1`, apiKey: key });
{
  const r = await generateText({ model: openai("gpt-4o"), prompt: PROMPT, maxOutputTokens: 30 });
  if (!r.text) throw new Error(JSON.stringify(r));
  // The Responses API's answer, not chat's.
  if (!r.response.id.startsWith("resp_")) throw new Error(`not a response: ${r.response.id}`);
  const u = r.usage;
  emit("vercel.generate", r.response.headers["x-ciyuan-request-id"], u.inputTokens,
    u.outputTokens, u.inputTokenDetails?.cacheReadTokens ?? u.cachedInputTokens,
    u.outputTokenDetails?.reasoningTokens ?? u.reasoningTokens);
}
{
  const r = streamText({ model: openai("gpt-5-mini"), prompt: PROMPT });
  let text = "";
  for await (const part of r.textStream) text += part;
  const u = await r.usage;
  const response = await r.response;
  if (!text) throw new Error("no text");
  if (!response.id.startsWith("resp_")) throw new Error(`not a response: ${response.id}`);
  emit("vercel.stream", response.headers["x-ciyuan-request-id"], u.inputTokens,
    u.outputTokens, u.inputTokenDetails?.cacheReadTokens ?? u.cachedInputTokens,
    u.outputTokenDetails?.reasoningTokens ?? u.reasoningTokens);
}
console.log(JSON.stringify({ scenario: "done" }));
