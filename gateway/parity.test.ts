import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import OpenAI from "openai";
import type { ChatCompletionCreateParamsNonStreaming } from "openai/resources/chat/completions";
import { ChatCompletionParamsSchema } from "../gen/gateway/v1/gateway_pb.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { startTestGateway } from "./testing/served-gateway.ts";

// The same request over REST (official SDK) and over the typed RPCs must reach the upstream as the
// same body and come back with the same content, usage and cost.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  upstream = startFakeUpstream();
  gateway = await startTestGateway(`
providers:
  - { name: fake, kind: openai, base_url: "${upstream.url}" }
models:
  - name: ok
    targets: [{ provider: fake, model: upstream-model }]
    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10" }
`);
  upstream.script("upstream-model", {
    content: "the same answer both ways",
    usage: { prompt_tokens: 321, completion_tokens: 45, total_tokens: 366, prompt_tokens_details: { cached_tokens: 100 } },
  });
});
afterAll(async () => {
  await gateway.close();
  await upstream.stop();
});

const schema = { type: "object", properties: { city: { type: "string" } }, required: ["city"] };

const rest: ChatCompletionCreateParamsNonStreaming = {
  model: "ok",
  messages: [
    { role: "system", content: "be brief" },
    { role: "user", content: [{ type: "text", text: "what is in this picture?" }, { type: "image_url", image_url: { url: "https://example.com/cat.png", detail: "high" } }] },
    { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "weather", arguments: '{"city":"Oslo"}' } }] },
    { role: "tool", tool_call_id: "call_1", content: "sunny" },
  ],
  tools: [{ type: "function", function: { name: "weather", description: "current weather", parameters: schema } }],
  tool_choice: "auto",
  response_format: { type: "json_schema", json_schema: { name: "answer", schema, strict: true } },
  temperature: 0.25,
  top_p: 0.5,
  max_tokens: 100,
  max_completion_tokens: 120,
  stop: ["END"],
  n: 1,
  seed: 7,
  user: "end-user-9",
  presence_penalty: 0.5,
  frequency_penalty: 0.25,
  metadata: { team: "parity" },
};

const rpc: MessageInitShape<typeof ChatCompletionParamsSchema> = {
  model: "ok",
  messages: [
    { role: "system", content: "be brief" },
    { role: "user", parts: [{ part: { case: "text", value: "what is in this picture?" } }, { part: { case: "imageUrl", value: { url: "https://example.com/cat.png", detail: "high" } } }] },
    { role: "assistant", toolCalls: [{ id: "call_1", type: "function", function: { name: "weather", arguments: '{"city":"Oslo"}' } }] },
    { role: "tool", toolCallId: "call_1", content: "sunny" },
  ],
  tools: [{ type: "function", function: { name: "weather", description: "current weather", parameters: schema } }],
  toolChoice: "auto",
  responseFormat: { type: "json_schema", jsonSchema: { name: "answer", schema, strict: true } },
  temperature: 0.25,
  topP: 0.5,
  maxTokens: 100,
  maxCompletionTokens: 120,
  stop: ["END"],
  n: 1,
  seed: 7n,
  user: "end-user-9",
  presencePenalty: 0.5,
  frequencyPenalty: 0.25,
  metadata: { team: "parity" },
};

const sdk = () => new OpenAI({ baseURL: `${gateway.url}/v1`, apiKey: "sk-good", maxRetries: 0 });
const lastBody = () => upstream.requests.at(-1)?.body;
// 221 input at $2.50/M + 100 cached at $1.25/M + 45 output at $10/M = $0.0011275
const cost = 1_127_500n;

describe("REST and RPC parity", () => {
  test("a whole completion: same upstream request, content, usage and cost", async () => {
    const { data, response } = await sdk().chat.completions.create(rest).withResponse();
    const restBody = lastBody();
    const viaRpc = await gateway.rpc("sk-good").createChatCompletion({ params: create(ChatCompletionParamsSchema, rpc) });
    expect(lastBody()).toEqual(restBody);

    expect(viaRpc.choices[0]?.message?.content).toBe(data.choices[0]?.message.content ?? "");
    expect(viaRpc.choices[0]?.finishReason).toBe(data.choices[0]?.finish_reason ?? "");
    expect(viaRpc.model).toBe(data.model);
    expect(viaRpc.accounting?.usage).toMatchObject({
      inputTokens: BigInt(data.usage?.prompt_tokens ?? -1),
      cachedInputTokens: BigInt(data.usage?.prompt_tokens_details?.cached_tokens ?? -1),
      outputTokens: BigInt(data.usage?.completion_tokens ?? -1),
    });
    expect(BigInt(response.headers.get("x-gateway-cost-nanos") ?? "-1")).toBe(cost);
    expect(viaRpc.accounting?.costNanos).toBe(cost);
  });

  test("a streamed completion: same content, usage and cost", async () => {
    const { data: stream, response } = await sdk()
      .chat.completions.create({ ...rest, stream: true, stream_options: { include_usage: true } })
      .withResponse();
    let restContent = "";
    let restUsage;
    for await (const chunk of stream) {
      restContent += chunk.choices[0]?.delta.content ?? "";
      restUsage = chunk.usage ?? restUsage;
    }
    const restBody = lastBody();
    const restCost = (await gateway.row(response.headers.get("x-request-id") ?? "")).costNanos;

    let rpcContent = "";
    let accounting;
    for await (const message of gateway.rpc("sk-good").streamChatCompletion({ params: create(ChatCompletionParamsSchema, rpc) })) {
      rpcContent += message.choices[0]?.content ?? "";
      accounting = message.accounting ?? accounting;
    }
    expect(lastBody()).toEqual(restBody);
    expect(restBody?.stream_options).toEqual({ include_usage: true });

    expect(rpcContent).toBe("the same answer both ways");
    expect(restContent).toBe(rpcContent);
    expect(accounting?.usage).toMatchObject({
      inputTokens: BigInt(restUsage?.prompt_tokens ?? -1),
      cachedInputTokens: BigInt(restUsage?.prompt_tokens_details?.cached_tokens ?? -1),
      outputTokens: BigInt(restUsage?.completion_tokens ?? -1),
    });
    expect(accounting?.costNanos).toBe(cost);
    expect(restCost).toBe(cost);
  });
});

describe("refusals", () => {
  const refusal = "I can't help with that.";
  const asked = [
    { role: "user" as const, content: "help me with something bad" },
    { role: "assistant" as const, content: null, refusal },
    { role: "user" as const, content: "please?" },
  ];
  const askedRpc = [
    { role: "user", content: "help me with something bad" },
    { role: "assistant", refusal },
    { role: "user", content: "please?" },
  ];

  test("a refusal in the conversation reaches the upstream alike, and the model's refusal comes back both ways", async () => {
    upstream.script("upstream-model", { refusal, usage: { prompt_tokens: 20, completion_tokens: 7, total_tokens: 27 } });
    try {
      const viaRest = await sdk().chat.completions.create({ model: "ok", messages: asked });
      const restBody = lastBody();
      expect(restBody?.messages[1]).toEqual({ role: "assistant", content: null, refusal });
      const viaRpc = await gateway
        .rpc("sk-good")
        .createChatCompletion({ params: create(ChatCompletionParamsSchema, { model: "ok", messages: askedRpc }) });
      expect(lastBody()).toEqual(restBody);

      expect(viaRest.choices[0]?.message).toMatchObject({ content: null, refusal });
      expect(viaRpc.choices[0]?.message).toMatchObject({ role: "assistant", content: "", refusal });

      let restRefusal = "";
      for await (const chunk of await sdk().chat.completions.create({ model: "ok", messages: asked, stream: true })) {
        restRefusal += chunk.choices[0]?.delta.refusal ?? "";
      }
      let rpcRefusal = "";
      for await (const message of gateway
        .rpc("sk-good")
        .streamChatCompletion({ params: create(ChatCompletionParamsSchema, { model: "ok", messages: askedRpc }) })) {
        rpcRefusal += message.choices[0]?.refusal ?? "";
      }
      expect(restRefusal).toBe(refusal);
      expect(rpcRefusal).toBe(refusal);
    } finally {
      upstream.script("upstream-model", {
        content: "the same answer both ways",
        usage: { prompt_tokens: 321, completion_tokens: 45, total_tokens: 366, prompt_tokens_details: { cached_tokens: 100 } },
      });
    }
  });
});

describe("odd but parseable upstream answers", () => {
  test("a model named with no string (a number) is answered over RPC, whole, streamed and embedded", async () => {
    upstream.script("upstream-model", { model: 4 as unknown as string });
    try {
      const params = create(ChatCompletionParamsSchema, { model: "ok", messages: [{ role: "user", content: "hi" }] });
      const whole = await gateway.rpc("sk-good").createChatCompletion({ params });
      const chunks = [];
      for await (const message of gateway.rpc("sk-good").streamChatCompletion({ params })) chunks.push(message);
      const embedded = await gateway.rpc("sk-good").createEmbedding({ model: "ok", input: ["alpha"] });
      expect([whole.model, chunks.at(-1)?.model, embedded.model]).toEqual(["4", "4", "4"]);
      expect([whole.accounting?.costNanos, chunks.at(-1)?.accounting?.costNanos]).toEqual([expect.any(BigInt), expect.any(BigInt)]);
      expect(embedded.data).toHaveLength(1);
    } finally {
      upstream.script("upstream-model", {
        content: "the same answer both ways",
        usage: { prompt_tokens: 321, completion_tokens: 45, total_tokens: 366, prompt_tokens_details: { cached_tokens: 100 } },
      });
    }
  });

  test("a fractional created and tool arguments sent as an object are answered over RPC as over REST, not failed", async () => {
    upstream.script("upstream-model", {
      toolCall: { name: "weather", arguments: "unused" },
      odd: { created: 1_700_000_000.75, toolArguments: { city: "Oslo" } },
    });
    try {
      const viaRest = await sdk().chat.completions.create({ model: "ok", messages: [{ role: "user", content: "hi" }] });
      expect(viaRest.choices[0]?.message.tool_calls?.[0]).toMatchObject({ function: { arguments: { city: "Oslo" } } });
      const viaRpc = await gateway
        .rpc("sk-good")
        .createChatCompletion({ params: create(ChatCompletionParamsSchema, { model: "ok", messages: [{ role: "user", content: "hi" }] }) });
      expect(viaRpc.created).toBe(1_700_000_000n);
      expect(viaRpc.choices[0]?.message?.toolCalls[0]?.function).toMatchObject({ name: "weather", arguments: '{"city":"Oslo"}' });
      expect(viaRpc.accounting?.costNanos).toBeGreaterThan(0n);

      const chunks = [];
      for await (const message of gateway
        .rpc("sk-good")
        .streamChatCompletion({ params: create(ChatCompletionParamsSchema, { model: "ok", messages: [{ role: "user", content: "hi" }] }) })) {
        chunks.push(message);
      }
      expect(chunks.every((m) => m.created === 1_700_000_000n)).toBe(true);
      expect(chunks.flatMap((m) => m.choices.flatMap((c) => c.toolCalls.map((t) => t.function?.arguments ?? "")))).toContain(
        '{"city":"Oslo"}',
      );
      expect(chunks.at(-1)?.accounting?.costNanos).toBeGreaterThan(0n);
    } finally {
      upstream.script("upstream-model", {
        content: "the same answer both ways",
        usage: { prompt_tokens: 321, completion_tokens: 45, total_tokens: 366, prompt_tokens_details: { cached_tokens: 100 } },
      });
    }
  });
});
