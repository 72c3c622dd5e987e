import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import OpenAI, { APIError, BadRequestError } from "openai";
import { isValid as isUlid } from "ulid";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { type Behaviour, type FakeUpstream, type FakeUsage, startFakeUpstream } from "../testing/fake-upstream.ts";
import { startTestGateway } from "../testing/served-gateway.ts";
import { countTextTokens } from "../tokenizer.ts";
import { usageGraceMs } from "../providers/openai.ts";
import { eventually } from "../../test/support.ts";
import { answerUntilClosed } from "../../lib/testing.ts";

// The gateway in front of a real OpenAI-compatible upstream on a socket, called with the official SDK.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;

/** Public models served by the fake under the same upstream name, with per-model routing knobs. */
const models: Array<[name: string, extra?: string]> = [
  ["ok"],
  ["premium"],
  ["no-usage"],
  ["gpt-4-0613"],
  ["garbled"],
  ["cut"],
  ["tools"],
  ["rate-limited"],
  ["retried-later"],
  ["failing"],
  ["slow", "timeout_ms: 300"],
  ["stalls", "timeout_ms: 300"],
  ["slow-stream"],
  ["embed"],
  ["embedder"],
  ["floats-only"],
  ["chatter"],
  ["rejecting"],
  ["too-large"],
  ["moderated"],
  ["quota", "retries: 2"],
  ["throttled"],
  ["throttled-once"],
  ["odd-usage"],
  ["azure-like"],
  ["strict-options"],
  ["poisoned"],
  ["retried", "timeout_ms: 300\n    retries: 1"],
];

function routes(url: string) {
  const lines = [
    "providers:",
    `  - { name: fake, kind: openai, base_url: "${url}" }`,
    // Its key variable is unset: every call fails before reaching the upstream.
    `  - { name: keyless, kind: openai, base_url: "${url}", api_key_env: FAKE_UPSTREAM_KEY }`,
    "  - { name: mock, kind: mock }",
    `  - { name: no-stream-usage, kind: openai, base_url: "${url}", stream_usage: false }`,
    "models:",
  ];
  for (const [name, extra] of models) {
    lines.push(`  - name: ${name}`, `    targets: [{ provider: fake, model: ${name} }]`);
    lines.push(`    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10" }`);
    if (extra) lines.push(`    ${extra}`);
  }
  lines.push(
    "  - name: reasoner",
    "    targets: [{ provider: fake, model: reasoner }]",
    `    pricing: { input_per_mtok: "1.25", output_per_mtok: "10" }`,
    "  - name: reasoner-priced",
    "    targets: [{ provider: fake, model: reasoner-priced }]",
    `    pricing: { input_per_mtok: "1.25", output_per_mtok: "10", reasoning_per_mtok: "40" }`,
    "  - name: audio",
    "    targets: [{ provider: fake, model: audio }]",
    `    pricing: { input_per_mtok: "2.50", output_per_mtok: "10", audio_input_per_mtok: "40", audio_output_per_mtok: "80" }`,
    "  - name: tiered",
    "    targets: [{ provider: fake, model: tiered }]",
    `    pricing:`,
    `      { input_per_mtok: "2", output_per_mtok: "8", service_tiers: { flex: { input_per_mtok: "1", output_per_mtok: "4" }, priority: { input_per_mtok: "4", output_per_mtok: "16" } } }`,
    "  - name: embeddings-only",
    "    endpoints: [embeddings]",
    "    targets: [{ provider: fake, model: embeddings-only }]",
    `    pricing: { input_per_mtok: "1", output_per_mtok: "0" }`,
  );
  /** A model at $1 a million tokens in and out, served by `targets` in turn: `provider/model`, or the fake's model. */
  const routed = (name: string, targets: string[], ...knobs: string[]) => {
    const listed = targets.map((target) => {
      const [provider, model] = target.includes("/") ? target.split("/") : ["fake", target];
      return `{ provider: ${provider}, model: ${model} }`;
    });
    lines.push(`  - name: ${name}`, `    targets: [${listed.join(", ")}]`, ...knobs.map((knob) => `    ${knob}`));
    lines.push(`    pricing: { input_per_mtok: "1", output_per_mtok: "1" }`);
  };
  routed("fallback", ["fallback-primary", "fallback-secondary"]);
  routed("quota-fallback", ["quota-primary", "quota-secondary"], "retries: 2");
  routed("keyless", ["keyless/keyless"]);
  routed("breaker", ["breaker-primary", "mock/mock-echo-1"]);
  routed("stream-fallback", ["stream-primary", "stream-secondary"], "timeout_ms: 300");
  routed("stream-alone", ["stream-alone"], "timeout_ms: 300");
  routed("unasked", ["no-stream-usage/unasked"]);
  routed("refused-stream", ["refused-stream-primary", "refused-stream-secondary"], "retries: 1");
  routed("tpm", ["tpm", "tpm-fallback"], "retries: 2");
  routed("briefly-throttled", ["briefly-throttled"]);
  routed("misrouted", ["misrouted-primary", "misrouted-secondary"]);
  routed("api-version", ["api-version-primary", "api-version-secondary"]);
  routed("stream-throttled", ["stream-throttled"]);
  routed("stream-breaker", ["stream-breaker-primary", "mock/mock-echo-1"]);
  // Models of their own for each case of lost attempts, so one case's failures trip no breaker for the next.
  for (let i = 0; i < lostCases.length; i++) routed(`lost-${i}`, [`lost-${i}-primary`, `lost-${i}-secondary`], "retries: 1");
  return lines.join("\n");
}

const page = { contentType: "text/html", text: "<html><body><h1>Checking your browser</h1></body></html>" };
/** A 200 an attempt got, whether it came streamed, and whether a model had its prompt (its answer broke off). */
const lostCases: Array<[what: string, behaviour: Behaviour, stream: boolean, taken: boolean]> = [
  ["a proxy's HTML page", { body: page }, false, false],
  ["a proxy's HTML page", { body: page }, true, false],
  ["NDJSON", { body: { contentType: "application/x-ndjson", text: '{"message":{"content":"hi"},"done":true}\n' } }, true, false],
  ["JSON that does not parse", { malformed: true }, false, false],
  ["a proxy's page cut short", { body: page, breaksOff: true }, false, false],
  ["an answer that broke off", { breaksOff: true }, false, true],
  ["an answer that broke off", { breaksOff: true }, true, true],
];
const lostRows = lostCases.map(([what, ...rest], i) => [`${what}${rest[1] ? ", streamed" : ""}`, ...rest, i] as const);

beforeAll(() => {
  upstream = startFakeUpstream();
});
afterAll(() => upstream.stop());
beforeEach(() => upstream.reset());

// Every test runs against the port shared with the RPCs (node:http) and the REST port (Bun.serve).
let base = () => gateway.url;
const sdk = (apiKey = "sk-good") => new OpenAI({ baseURL: `${base()}/v1`, apiKey, maxRetries: 0 });
const hello = [{ role: "user" as const, content: "hello there friend" }];
/** The prompt tokens the fake upstream reports of `hello` by default (its messages' JSON, four characters a token). */
const fakePromptTokens = Math.ceil(JSON.stringify(hello).length / 4);

/** A streamed chat of `model` that asks for usage, read to its end: its content, the usage shown, its metrics row. */
async function streamed(model: string) {
  const { data: stream, response } = await sdk()
    .chat.completions.create({ model, messages: hello, stream: true, stream_options: { include_usage: true } })
    .withResponse();
  let content = "";
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of stream) {
    content += chunk.choices[0]?.delta.content ?? "";
    usage = chunk.usage ?? usage;
  }
  return { content, usage, m: await gateway.row(response.headers.get("x-request-id") ?? "") };
}

async function apiError(p: Promise<unknown>): Promise<APIError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof APIError) return e;
    throw e;
  }
  throw new Error("expected an APIError");
}

/** OpenAI's error shape, status and headers as the SDK sees them. */
function expectShape(e: APIError, status: number, code: string, type?: string) {
  expect(e.status).toBe(status);
  expect(Object.keys(e.error as object).sort()).toEqual(["code", "message", "param", "type"]);
  expect(e.code).toBe(code);
  if (type) expect(e.type).toBe(type);
  expect(isUlid(e.headers?.get("x-request-id") ?? "")).toBe(true);
}

for (const port of ["rpc", "rest"] as const) {
  describe(`on the ${port} port`, () => {
    // A gateway of its own, so circuit breakers opened by one run do not leak into the other.
    beforeAll(async () => {
      gateway = await startTestGateway(routes(upstream.url), { maxBodyBytes: 16 * 1024 });
      base = () => (port === "rpc" ? gateway.url : gateway.restUrl);
    });
    afterAll(() => gateway.close());

    describe("chat completions through the official SDK", () => {
      test("a whole completion: upstream usage, exact cost header, request id and metrics", async () => {
        upstream.script("ok", {
          content: "hi there",
          usage: {
            prompt_tokens: 1000,
            completion_tokens: 200,
            total_tokens: 1200,
            prompt_tokens_details: { cached_tokens: 400 },
          },
        });
        const { data, response } = await sdk().chat.completions.create({ model: "ok", messages: hello }).withResponse();
        expect(data.choices[0]?.message.content).toBe("hi there");
        expect(data.usage?.prompt_tokens).toBe(1000);
        // 600 input at $2.50/M + 400 cached at $1.25/M + 200 output at $10/M = $0.004
        expect(response.headers.get("x-gateway-cost-nanos")).toBe("4000000");
        const requestId = response.headers.get("x-request-id") ?? "";
        const m = await gateway.row(requestId);
        expect(m).toMatchObject({
          status: RequestStatus.OK,
          streamed: false,
          usageEstimated: false,
          costNanos: 4_000_000n,
          servedModel: "ok-fake",
        });
        expect(m.usage).toMatchObject({ inputTokens: 1000n, cachedInputTokens: 400n, outputTokens: 200n });
      });

      test("every common request field reaches the upstream; the gateway's own fields do not", async () => {
        const tools = [
          {
            type: "function" as const,
            function: { name: "lookup", description: "find", parameters: { type: "object", properties: {} } },
          },
        ];
        const common = {
          tools,
          tool_choice: "auto" as const,
          response_format: { type: "json_object" as const },
          temperature: 0.3,
          top_p: 0.9,
          max_tokens: 50,
          max_completion_tokens: 60,
          stop: ["\n\n"],
          n: 2,
          seed: 42,
          user: "end-user-1",
        };
        await sdk().chat.completions.create({
          model: "ok",
          messages: [
            { role: "system", content: "be brief" },
            {
              role: "user",
              content: [
                { type: "text", text: "what is this?" },
                { type: "image_url", image_url: { url: "data:image/png;base64,AAAA", detail: "low" } },
              ],
            },
            {
              role: "assistant",
              content: null,
              tool_calls: [{ id: "c1", type: "function", function: { name: "lookup", arguments: "{}" } }],
            },
            { role: "tool", tool_call_id: "c1", content: "a cat" },
          ],
          ...common,
          metadata: { team: "vision" },
        });
        const sent = upstream.seen("ok")[0]?.body ?? {};
        expect(sent).toMatchObject({ model: "ok", ...common });
        expect(sent.messages[1].content[1]).toEqual({
          type: "image_url",
          image_url: { url: "data:image/png;base64,AAAA", detail: "low" },
        });
        expect(sent.messages[2].tool_calls[0].function.name).toBe("lookup");
        expect(sent.metadata).toBeUndefined();
      });

      test("metadata reaches the upstream with store: true, for the stored completion, and is recorded as tags", async () => {
        const { response } = await sdk()
          .chat.completions.create({ model: "ok", messages: hello, store: true, metadata: { team: "vision" } })
          .withResponse();
        expect(upstream.seen("ok")[0]?.body).toMatchObject({ store: true, metadata: { team: "vision" } });
        expect((await gateway.row(response.headers.get("x-request-id") ?? "")).tags).toEqual({ team: "vision" });
      });

      test("an assistant turn pushed back as the SDK gave it (a refusal), or naming its audio answer by id, reaches the upstream", async () => {
        const refusal = "I can't help with that.";
        upstream.script("ok", { refusal }, { audio: "audio_abc", content: "spoken" }, { content: "fine" });
        const first = await sdk().chat.completions.create({ model: "ok", messages: hello });
        const refused = first.choices[0]?.message;
        expect(refused).toMatchObject({ content: null, refusal });
        const modalities: ("text" | "audio")[] = ["text", "audio"];
        const audio = { voice: "alloy" as const, format: "wav" as const };
        const spoken = await sdk().chat.completions.create({ model: "ok", messages: hello, modalities, audio });
        const messages: OpenAI.ChatCompletionMessageParam[] = [
          ...hello,
          refused as OpenAI.ChatCompletionMessage,
          { role: "user", content: "say it out loud then" },
          { role: "assistant", audio: { id: spoken.choices[0]?.message.audio?.id as string } },
          { role: "user", content: "and again" },
        ];
        const second = await sdk().chat.completions.create({ model: "ok", messages });
        expect(second.choices[0]?.message.content).toBe("fine");
        const sent = upstream.seen("ok")[2]?.body ?? {};
        expect(sent.messages[1]).toMatchObject({ role: "assistant", content: null, refusal });
        // The gateway's id of the audio answer, the upstream's own again.
        expect(sent.messages[3]).toEqual({ role: "assistant", audio: { id: "audio_abc" } });
      });

      test("without upstream usage, tokens are counted with the tokenizer and marked estimated", async () => {
        upstream.script("no-usage", { content: "Hello world", usage: false });
        const { data: completion, response } = await sdk()
          .chat.completions.create({ model: "no-usage", messages: hello })
          .withResponse();
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m.usageEstimated).toBe(true);
        // o200k_base: "Hello world" is 2 tokens; the prompt is framed per message.
        expect(m.usage?.outputTokens).toBe(2n);
        expect(m.usage?.inputTokens).toBeGreaterThan(3n);
        expect(m.costNanos).toBeGreaterThan(0n);
        // The client is shown the counts it is charged for.
        const input = Number(m.usage?.inputTokens);
        expect(completion.usage).toEqual({ prompt_tokens: input, completion_tokens: 2, total_tokens: input + 2 });
      });

      test("without upstream usage, a GPT-4 or GPT-3.5 model is counted in cl100k_base, as OpenAI bills it", async () => {
        // Hindi: 35 tokens in o200k_base, 111 in cl100k_base, the encoding of gpt-4 and gpt-3.5-turbo.
        const hindi = "कृपया बोर्ड के लिए निम्नलिखित तिमाही रिपोर्ट का सारांश दें, राजस्व वृद्धि और ग्राहक मंथन पर ध्यान केंद्रित करें।";
        const messages = [{ role: "user" as const, content: hindi }];
        const metered = async (model: string) => {
          upstream.script(model, { content: hindi, usage: false });
          const { data: stream, response } = await sdk()
            .chat.completions.create({ model, messages, stream: true })
            .withResponse();
          for await (const _ of stream);
          return gateway.row(response.headers.get("x-request-id") ?? "");
        };
        const legacy = await metered("gpt-4-0613");
        expect(legacy.usageEstimated).toBe(true);
        // 3 priming, 3 framing and "user" around the text.
        expect(legacy.usage).toMatchObject({ inputTokens: 7n + 111n, outputTokens: 111n });
        const current = await metered("no-usage");
        expect(current.usage).toMatchObject({ inputTokens: 7n + 35n, outputTokens: 35n });
      });

      test("a prompt an upstream reports as 0 tokens (Ollama's for a cached prompt) is counted with the tokenizer", async () => {
        // Ollama's usage for a prompt it had cached: no prompt tokens, the completion's own.
        upstream.script("no-usage", { content: "Hello world", usage: { prompt_tokens: 0, completion_tokens: 2, total_tokens: 2 } });
        const { data: completion, response } = await sdk().chat.completions.create({ model: "no-usage", messages: hello }).withResponse();
        const whole = await gateway.row(response.headers.get("x-request-id") ?? "");
        const { data: stream, response: streamed } = await sdk()
          .chat.completions.create({ model: "no-usage", messages: hello, stream: true, stream_options: { include_usage: true } })
          .withResponse();
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        const streamedRow = await gateway.row(streamed.headers.get("x-request-id") ?? "");
        for (const m of [whole, streamedRow]) {
          expect(m.usageEstimated).toBe(true);
          expect(m.usage?.inputTokens).toBeGreaterThan(3n);
          expect(m.usage?.outputTokens).toBe(2n);
          // $2.50 a million of the counted prompt and $10 of the completion's 2 reported tokens.
          expect(m.costNanos).toBe((m.usage?.inputTokens ?? 0n) * 2_500n + 20_000n);
        }
        const input = Number(whole.usage?.inputTokens);
        expect(completion.usage).toEqual({ prompt_tokens: input, completion_tokens: 2, total_tokens: input + 2 });
        expect(chunks.at(-1)?.usage).toEqual({ prompt_tokens: input, completion_tokens: 2, total_tokens: input + 2 });
      });

      test("without upstream usage, a refusal is counted as output, whole or streamed alike", async () => {
        upstream.script("no-usage", { refusal: "I can't help with that request.", usage: false });
        const { response } = await sdk().chat.completions.create({ model: "no-usage", messages: hello }).withResponse();
        const whole = await gateway.row(response.headers.get("x-request-id") ?? "");
        const { data: stream, response: streamed } = await sdk()
          .chat.completions.create({ model: "no-usage", messages: hello, stream: true })
          .withResponse();
        for await (const _ of stream);
        const streamedRow = await gateway.row(streamed.headers.get("x-request-id") ?? "");
        expect(whole).toMatchObject({ usageEstimated: true });
        expect(whole.usage?.outputTokens).toBeGreaterThan(4n);
        expect(whole.usage?.outputTokens).toBe(streamedRow.usage?.outputTokens as bigint);
      });

      test("special-token text in a prompt or a reply is counted as text: answered and metered, never a failure", async () => {
        upstream.script("no-usage", { content: "done <|endoftext|>", usage: false });
        const special = [{ role: "user" as const, content: "summarise <|endoftext|> <|fim_prefix|> this" }];
        for (let i = 0; i < 6; i++) {
          const { data: completion, response } = await sdk()
            .chat.completions.create({ model: "no-usage", messages: special })
            .withResponse();
          expect(completion.choices[0]?.message.content).toBe("done <|endoftext|>");
          const m = await gateway.row(response.headers.get("x-request-id") ?? "");
          expect(m).toMatchObject({ status: RequestStatus.OK, usageEstimated: true });
          expect(m.usage?.inputTokens).toBeGreaterThan(10n);
          expect(m.usage?.outputTokens).toBeGreaterThan(2n);
          expect(m.costNanos).toBeGreaterThan(0n);
        }
        // Six answers in a row: none counted against the upstream, so its breaker stays closed.
        expect(upstream.seen("no-usage").length).toBeGreaterThanOrEqual(6);
      });

      test("service tiers: only priced ones may be asked for, and a request is billed at the tier that served it", async () => {
        const usage = { prompt_tokens: 1_000, completion_tokens: 500, total_tokens: 1_500 };
        // 1,000 input and 500 output tokens at $2/$8, $1/$4 and $4/$16 a million.
        const at = { default: 6_000_000n, flex: 3_000_000n, priority: 12_000_000n };
        const charged = async (request: Record<string, unknown>, served?: string) => {
          upstream.script("tiered", { usage, serviceTier: served });
          const { response } = await sdk()
            .chat.completions.create({ model: "tiered", messages: hello, ...request })
            .withResponse();
          return (await gateway.row(response.headers.get("x-request-id") ?? "")).costNanos;
        };
        expect(await charged({})).toBe(at.default);
        expect(await charged({ service_tier: "flex" }, "flex")).toBe(at.flex);
        expect(await charged({ service_tier: "priority" })).toBe(at.priority);
        // The upstream's word decides: asked for auto, served at priority; asked for flex, served at default.
        expect(await charged({ service_tier: "auto" }, "priority")).toBe(at.priority);
        expect(await charged({ service_tier: "flex" }, "default")).toBe(at.default);
        expect(upstream.seen("tiered").at(-1)?.body.service_tier).toBe("flex");
        // A tier the config does not price costs what the gateway cannot know: the dearest price, what was reserved,
        // never the default's, and the log says so, once.
        expect(await charged({}, "scale")).toBe(at.priority);
        expect(await charged({ service_tier: "auto" }, "scale")).toBe(at.priority);
        const warned = gateway.log.lines.filter((line) => line.includes("a service tier the config does not price"));
        expect(warned).toHaveLength(1);
        expect(warned[0]).toContain('"service_tier":"scale"');

        // Streamed, the chunks name the tier.
        upstream.script("tiered", { usage, serviceTier: "flex" });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "tiered", messages: hello, stream: true, service_tier: "flex" })
          .withResponse();
        for await (const _ of stream);
        expect((await gateway.row(response.headers.get("x-request-id") ?? "")).costNanos).toBe(at.flex);

        // A tier the model is not priced for is refused before the upstream is asked.
        const before = upstream.seen("ok").length;
        for (const [model, tier] of [["ok", "priority"], ["tiered", "scale"]] as const) {
          const refused = await sdk()
            .chat.completions.create({ model, messages: hello, service_tier: tier })
            .catch((e: unknown) => e);
          expect(refused).toBeInstanceOf(OpenAI.BadRequestError);
          expect((refused as InstanceType<typeof OpenAI.BadRequestError>).param).toBe("service_tier");
          expect(String((refused as Error).message)).toContain(`service_tier '${tier}'`);
        }
        expect(upstream.seen("ok").length).toBe(before);
        const wrongType = await sdk()
          .chat.completions.create({ model: "tiered", messages: hello, service_tier: 1 as never })
          .catch((e: unknown) => e);
        expect((wrongType as InstanceType<typeof OpenAI.BadRequestError>).param).toBe("service_tier");
      });

      test("a tool call comes back in OpenAI's shape", async () => {
        upstream.script("tools", { toolCall: { name: "lookup", arguments: '{"q":"cats"}' } });
        const completion = await sdk().chat.completions.create({ model: "tools", messages: hello });
        expect(completion.choices[0]?.finish_reason).toBe("tool_calls");
        expect(completion.choices[0]?.message.tool_calls?.[0]).toMatchObject({
          type: "function",
          function: { name: "lookup", arguments: '{"q":"cats"}' },
        });
      });

      test("the model an upstream says it served is metered as at most 200 characters, whichever endpoint", async () => {
        // The upstream names it as it likes; its metrics row must stay small enough to ship and bill.
        const served = `\u0007${"\u{1F600}".repeat(100_000)}`;
        upstream.script("ok", { model: served });
        upstream.script("embed", { model: served });
        const whole = await sdk().chat.completions.create({ model: "ok", messages: hello }).withResponse();
        expect(whole.data.model).toBe(served);
        const streamed = await sdk().chat.completions.create({ model: "ok", messages: hello, stream: true }).withResponse();
        for await (const _ of streamed.data);
        const embedded = await sdk().embeddings.create({ model: "embed", input: "alpha" }).withResponse();
        for (const { response } of [whole, streamed, embedded]) {
          const m = await gateway.row(response.headers.get("x-request-id") ?? "");
          expect(m.servedModel).toBe(`\ufffd${"\u{1F600}".repeat(199)}`);
        }
      });
    });

    describe("streaming through the official SDK", () => {
      test("an upstream that names its model with no string is answered, metered as served by its target's model", async () => {
        // JSON a proxy or a hand-written server may send: a number where OpenAI sends the model's name.
        const numbered = 4 as unknown as string;
        upstream.script("ok", { model: numbered });
        upstream.script("embed", { model: numbered });
        const whole = await sdk().chat.completions.create({ model: "ok", messages: hello }).withResponse();
        const streamed = await sdk().chat.completions.create({ model: "ok", messages: hello, stream: true }).withResponse();
        const contents: string[] = [];
        for await (const chunk of streamed.data) contents.push(chunk.choices[0]?.delta.content ?? "");
        const embedded = await sdk().embeddings.create({ model: "embed", input: "alpha" }).withResponse();
        expect(whole.data.choices[0]?.message.content).toBeTruthy();
        expect([contents.join(""), embedded.data.data.length]).toEqual([whole.data.choices[0]?.message.content ?? "", 1]);
        // Each model's target is the upstream's model of the same name.
        for (const [{ response }, target] of [[whole, "ok"], [streamed, "ok"], [embedded, "embed"]] as const) {
          const m = await gateway.row(response.headers.get("x-request-id") ?? "");
          expect([m.status, m.servedModel]).toEqual([RequestStatus.OK, target]);
        }
      });

      test("chunks in OpenAI's shape, usage last when asked for, TTFT and cost in the metrics", async () => {
        upstream.script("ok", {
          content: "one two three four",
          usage: { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 },
        });
        const { data: stream, response } = await sdk()
          .chat.completions.create({
            model: "ok",
            messages: hello,
            stream: true,
            stream_options: { include_usage: true },
          })
          .withResponse();
        expect(response.headers.get("content-type")).toContain("text/event-stream");
        expect(response.headers.get("x-gateway-cost-nanos")).toBeNull();
        let content = "";
        const chunks = [];
        for await (const chunk of stream) {
          chunks.push(chunk);
          content += chunk.choices[0]?.delta.content ?? "";
        }
        expect(content).toBe("one two three four");
        expect(chunks[0]?.object).toBe("chat.completion.chunk");
        expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe("stop");
        expect(chunks.at(-1)?.choices).toEqual([]);
        expect(chunks.at(-1)?.usage).toEqual({ prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 });
        // The gateway always asks upstream for usage.
        expect(upstream.seen("ok")[0]?.body.stream_options).toEqual({ include_usage: true });

        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, streamed: true, usageEstimated: false });
        // 10 input at $2.50/M + 4 output at $10/M
        expect(m.costNanos).toBe(65_000n);
        expect(m.ttftUs).toBeGreaterThan(0n);
        expect(m.ttftUs).toBeLessThanOrEqual(m.totalLatencyUs);
        expect(m.firstTokenTime).toBeDefined();
        expect(m.totalLatencyUs).toBe(m.upstreamLatencyUs + m.gatewayOverheadUs);
      });

      test("a streamed request the upstream answers whole, in JSON, is streamed to the client and metered at its usage", async () => {
        upstream.script("ok", {
          whole: true,
          content: "one two three",
          usage: { prompt_tokens: 10, completion_tokens: 3, total_tokens: 13 },
        });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "ok", messages: hello, stream: true, stream_options: { include_usage: true } })
          .withResponse();
        expect(response.status).toBe(200);
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        expect(chunks.map((c) => c.choices[0]?.delta.content ?? "").join("")).toBe("one two three");
        expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe("stop");
        expect(chunks.at(-1)?.usage).toEqual({ prompt_tokens: 10, completion_tokens: 3, total_tokens: 13 });
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, streamed: true, usageEstimated: false });
        // 10 input at $2.50/M + 3 output at $10/M
        expect(m.costNanos).toBe(55_000n);
        expect(m.usage).toMatchObject({ inputTokens: 10n, outputTokens: 3n });

        // A tool call streams with its index, which the SDK's stream helper needs to put it together.
        upstream.script("ok", { whole: true, toolCall: { name: "lookup", arguments: '{"q":"x"}' } });
        const tools = [{ type: "function" as const, function: { name: "lookup", parameters: { type: "object" } } }];
        const called = await sdk().chat.completions.stream({ model: "ok", messages: hello, tools }).finalChatCompletion();
        expect(called.choices[0]?.finish_reason).toBe("tool_calls");
        expect(called.choices[0]?.message.tool_calls?.[0]).toMatchObject({
          type: "function",
          function: { name: "lookup", arguments: '{"q":"x"}' },
        });
      });

      test("the client's stream options reach the upstream as it set them, with usage always asked for", async () => {
        const stream = await sdk().chat.completions.create({
          model: "ok",
          messages: hello,
          stream: true,
          stream_options: { include_obfuscation: false },
        });
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        expect(upstream.seen("ok")[0]?.body.stream_options).toEqual({ include_obfuscation: false, include_usage: true });
        // The client did not ask for usage: it gets no usage chunk.
        expect(chunks.every((c) => c.usage === undefined)).toBe(true);
      });

      test("an upstream that refuses stream_options is asked again without, and from then on; or is never asked", async () => {
        upstream.script("no-usage", { rejectsField: "stream_options" });
        for (const model of ["no-usage", "no-usage", "unasked"]) {
          const { content, usage, m } = await streamed(model);
          expect(content).toBe("echo: hello there friend");
          // The upstream reports no usage unless asked for it: counted with the tokenizer.
          expect(usage).toMatchObject({ prompt_tokens: 10, completion_tokens: 5 });
          expect(m).toMatchObject({ status: RequestStatus.OK, usageEstimated: true });
        }
        // Once refused, not asked again.
        expect(upstream.seen("no-usage").map((r) => "stream_options" in r.body)).toEqual([true, false, false]);
        expect(upstream.seen("unasked").map((r) => "stream_options" in r.body)).toEqual([false]);
      });

      test("a client's own stream option an upstream refuses is the client's 400, and other streams still ask for usage", async () => {
        upstream.script("strict-options", { rejectsField: "stream_options.include_obfuscation" });
        const options = { include_usage: true, include_obfuscation: false } as OpenAI.ChatCompletionStreamOptions;
        const refused = await sdk()
          .chat.completions.create({ model: "strict-options", messages: hello, stream: true, stream_options: options })
          .then(
            () => undefined,
            (e: unknown) => e as InstanceType<typeof OpenAI.APIError>,
          );
        expect(refused?.status).toBe(422);
        const stream = await sdk().chat.completions.create({
          model: "strict-options",
          messages: hello,
          stream: true,
          stream_options: { include_usage: true },
        });
        let usage: OpenAI.CompletionUsage | undefined;
        for await (const chunk of stream) usage = chunk.usage ?? usage;
        expect(usage?.completion_tokens).toBeGreaterThan(0);
        expect(upstream.seen("strict-options").map((r) => r.body.stream_options)).toEqual([
          options,
          { include_usage: true },
        ]);
      });

      test("a client's unknown field named like stream_options is its own 400, and other streams still ask for usage", async () => {
        const poison = { stream_options_poison: 1 } as object;
        const refused = async (body: object) =>
          await sdk()
            .chat.completions.create({ model: "poisoned", messages: hello, stream: true, ...body })
            .then(
              () => undefined,
              (e: unknown) => (e as InstanceType<typeof OpenAI.APIError>).status,
            );
        // A server that forbids extra fields (its 422 names the field in `loc`).
        upstream.script("poisoned", { rejectsField: "stream_options_poison" });
        expect(await refused(poison)).toBe(422);
        // OpenAI's own words for an unknown field, answered to whatever comes next.
        const unrecognized = "Unrecognized request argument supplied: stream_options_poison";
        upstream.script("poisoned", { status: 400, error: { message: unrecognized, type: "invalid_request_error" } }, {});
        expect(await refused(poison)).toBe(400);
        // A refusal that names stream_options but stands without them too (a flaky or confused upstream): not remembered.
        const named = { status: 400, error: { message: "Unrecognized request argument supplied: stream_options" } };
        upstream.script("poisoned", named, named, {});
        expect(await refused({})).toBe(400);
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "poisoned", messages: hello, stream: true })
          .withResponse();
        for await (const _ of stream);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, usageEstimated: false });
        expect(upstream.seen("poisoned").map((r) => r.body.stream_options)).toEqual([
          { include_usage: true },
          { include_usage: true },
          { include_usage: true },
          undefined,
          { include_usage: true },
        ]);
      });

      test("the served model is the first a chunk names, past Azure's first chunk that names none", async () => {
        upstream.script("azure-like", { promptFilterChunk: true, model: "gpt-4o-2024-11-20" });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "azure-like", messages: hello, stream: true })
          .withResponse();
        let content = "";
        for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? "";
        expect(content).toBe("echo: hello there friend");
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, servedModel: "gpt-4o-2024-11-20" });
      });

      test("Azure's chunks reach the client in OpenAI's shape: a choice in each, with a delta, the stream's id and model", async () => {
        upstream.script("azure-like", { promptFilterChunk: true, filterAnnotationChunk: true, model: "gpt-4o-2024-11-20" });
        for (const stream_options of [undefined, { include_usage: true }]) {
          const stream = await sdk().chat.completions.create({ model: "azure-like", messages: hello, stream: true, stream_options });
          const chunks: Array<Record<string, unknown>> = [];
          let content = "";
          for await (const chunk of stream) {
            chunks.push(chunk as unknown as Record<string, unknown>);
            // OpenAI's own streaming example, which Azure's prompt filter and annotation chunks would fail.
            if (chunk.usage) continue;
            content += chunk.choices[0]!.delta.content ?? "";
          }
          expect(content).toBe("echo: hello there friend");
          // The prompt filter's results come with the first chunk of a choice; Azure's chunk of them alone is not sent.
          expect(chunks[0]).toMatchObject({ id: "chatcmpl-fake", prompt_filter_results: [{ prompt_index: 0 }] });
          expect(chunks[0]?.choices).toHaveLength(1);
          const annotated = chunks.find((c) => (c.choices as Array<Record<string, unknown>>)[0]?.content_filter_offsets);
          expect(annotated).toMatchObject({ id: "chatcmpl-fake", object: "chat.completion.chunk", model: "gpt-4o-2024-11-20" });
          expect(annotated?.choices).toEqual([expect.objectContaining({ index: 0, delta: {}, finish_reason: null })]);
          expect(chunks.filter((c) => c.usage)).toHaveLength(stream_options ? 1 : 0);
        }
      });

      test("keep-alive pings sent as events (Anthropic's `{\"type\": \"ping\"}`) are not passed on in a chunk", async () => {
        upstream.script("ok", { pings: true, usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 } });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "ok", messages: hello, stream: true, stream_options: { include_usage: true } })
          .withResponse();
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        expect(chunks.filter((c) => "type" in c)).toEqual([]);
        expect(chunks.map((c) => c.choices[0]?.delta.content ?? "").join("")).toBe("echo: hello there friend");
        expect(chunks.at(-1)?.usage).toEqual({ prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 });
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, usageEstimated: false, costNanos: 47_500n });
      });

      test("chunks of no id (OpenVINO Model Server's) get one, so the SDK's stream helper keeps the usage", async () => {
        const up = { object: "chat.completion.chunk", created: 1, model: "ovms" };
        const chunks = [
          { ...up, choices: [{ index: 0, delta: { role: "assistant", content: "Hi" }, finish_reason: null }] },
          { ...up, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] },
          { ...up, choices: [], usage: { prompt_tokens: 7, completion_tokens: 1, total_tokens: 8 } },
        ];
        const text = `${chunks.map((c) => `data: ${JSON.stringify(c)}\n\n`).join("")}data: [DONE]\n\n`;
        upstream.script("ok", { body: { contentType: "text/event-stream", text } });
        const stream_options = { include_usage: true };
        const ids = new Set<string>();
        const runner = sdk().chat.completions.stream({ model: "ok", messages: hello, stream_options });
        runner.on("chunk", (chunk) => ids.add(chunk.id));
        const final = await runner.finalChatCompletion();
        expect(final.usage).toEqual({ prompt_tokens: 7, completion_tokens: 1, total_tokens: 8 });
        expect(final.choices[0]?.message.content).toBe("Hi");
        expect([...ids]).toEqual([expect.stringMatching(/^chatcmpl-/)]);
      });

      test("no usage chunk unless the client asks, though the gateway still meters it", async () => {
        upstream.script("ok", {
          content: "a b c",
          usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 },
        });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "ok", messages: hello, stream: true })
          .withResponse();
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        expect(chunks.every((c) => c.choices.length > 0 && !c.usage)).toBe(true);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m.usage).toMatchObject({ inputTokens: 7n, outputTokens: 3n });
        expect(m.usageEstimated).toBe(false);
      });

      test("an upstream stream without usage is counted with the tokenizer; the client still gets a usage chunk", async () => {
        upstream.script("no-usage", { content: "Hello world", usage: false });
        const { data: stream, response } = await sdk()
          .chat.completions.create({
            model: "no-usage",
            messages: hello,
            stream: true,
            stream_options: { include_usage: true },
          })
          .withResponse();
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        expect(chunks.at(-1)?.usage?.completion_tokens).toBe(2);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m.usageEstimated).toBe(true);
        expect(m.usage?.outputTokens).toBe(2n);
        expect(Number(m.usage?.inputTokens)).toBe(chunks.at(-1)?.usage?.prompt_tokens ?? -1);
      });

      test("streamed tool calls pass through", async () => {
        upstream.script("tools", { toolCall: { name: "lookup", arguments: '{"q":"cats"}' } });
        const stream = await sdk().chat.completions.create({ model: "tools", messages: hello, stream: true });
        let args = "";
        let finish: string | null = null;
        for await (const chunk of stream) {
          args += chunk.choices[0]?.delta.tool_calls?.[0]?.function?.arguments ?? "";
          finish ??= chunk.choices[0]?.finish_reason ?? null;
        }
        expect(args).toBe('{"q":"cats"}');
        expect(finish).toBe("tool_calls");
      });

      test("an upstream failing mid-stream reaches the SDK as an error event and is metered", async () => {
        upstream.script("garbled", { content: "first second third", malformed: true });
        const stream = await sdk().chat.completions.create({ model: "garbled", messages: hello, stream: true });
        let content = "";
        const e = await apiError(
          (async () => {
            for await (const chunk of stream) content += chunk.choices[0]?.delta.content ?? "";
          })(),
        );
        expect(content).toBe("first");
        expect(e.code).toBe("upstream_error");
        const m = gateway.shipper.rows.at(-1);
        expect(m).toMatchObject({
          status: RequestStatus.UPSTREAM_ERROR,
          httpStatus: 502,
          streamed: true,
          usageEstimated: true,
        });
        expect(m?.usage?.outputTokens).toBe(1n);
      });

      test("a stream the upstream cuts short is an error, not a silent success", async () => {
        upstream.script("cut", { content: "one two three four", cutAfterChunks: 2 });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "cut", messages: hello, stream: true })
          .withResponse();
        const e = await apiError(
          (async () => {
            for await (const _ of stream);
          })(),
        );
        expect(e.code).toBe("upstream_error");
        expect(e.message).toContain("The upstream of `cut` failed mid-stream.");
        // What the upstream did wrong is in the log, with the request id.
        const requestId = response.headers.get("x-request-id") ?? "";
        expect(
          gateway.log.lines.some((line) => line.includes(requestId) && line.includes("ended before it finished")),
        ).toBe(true);
      });

      test("an upstream that goes silent mid-stream times out with an error event", async () => {
        upstream.script("stalls", { content: "one two", chunkDelayMs: 2000 });
        const stream = await sdk().chat.completions.create({ model: "stalls", messages: hello, stream: true });
        const e = await apiError(
          (async () => {
            for await (const _ of stream);
          })(),
        );
        expect(e.code).toBe("upstream_timeout");
        expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
      });

      /** Streams `model` with a raw client that leaves once what it has read includes `until`; the request id. */
      const leaveAt = async (model: string, until: string) => {
        const gone = new AbortController();
        const res = await fetch(`${base()}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
          body: JSON.stringify({ model, messages: hello, stream: true }),
          signal: gone.signal,
        });
        const reader = (res.body as ReadableStream<Uint8Array>).getReader();
        let text = "";
        while (!text.includes(until)) text += new TextDecoder().decode((await reader.read()).value);
        gone.abort();
        return res.headers.get("x-request-id") ?? "";
      };

      test("a client that disconnects mid-stream aborts the upstream call and is metered as cancelled", async () => {
        upstream.script("slow-stream", {
          content: "one two three four five six seven eight",
          chunkDelayMs: 100,
          usage: false,
        });
        const m = await gateway.row(await leaveAt("slow-stream", '"content":" two"'));
        expect(m).toMatchObject({
          status: RequestStatus.CANCELLED,
          httpStatus: 499,
          errorCode: "client_closed_request",
          streamed: true,
          usageEstimated: true,
        });
        // "one two" at least, as o200k_base counts it; the input is estimated too.
        expect(m.usage?.outputTokens).toBeGreaterThanOrEqual(2n);
        expect(m.usage?.outputTokens).toBeLessThan(8n);
        expect(m.usage?.inputTokens).toBeGreaterThan(0n);
        expect(m.costNanos).toBeGreaterThan(0n);
        const deadline = Date.now() + 5000;
        while (!upstream.seen("slow-stream")[0]?.aborted && Date.now() < deadline) await Bun.sleep(10);
        expect(upstream.seen("slow-stream")[0]?.aborted).toBe(true);
      });

      test("a client that leaves once every choice has finished is metered at the usage the upstream sends after", async () => {
        const billed = {
          prompt_tokens: 1000,
          completion_tokens: 20_005,
          total_tokens: 21_005,
          completion_tokens_details: { reasoning_tokens: 20_000 },
        };
        upstream.script("reasoner", { content: "forty two", usage: billed, usageDelayMs: 300 });
        const m = await gateway.row(await leaveAt("reasoner", '"finish_reason":"stop"'));
        expect(m).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, usageEstimated: false });
        expect(m.usage).toMatchObject({ inputTokens: 1000n, outputTokens: 20_005n, reasoningTokens: 20_000n });
        // 1,000 input at $1.25/M + 20,005 output at $10/M
        expect(m.costNanos).toBe(201_300_000n);
      });

      test("a finished stream whose upstream then holds its connection open, [DONE] left without its blank line, ends as an answer", async () => {
        // At once, whatever the silence limit: a short one (300 ms) or the default one (60 s).
        for (const model of ["stalls", "ok"]) {
          const billed = { prompt_tokens: 10, completion_tokens: 2, total_tokens: 12 };
          upstream.script(model, { content: "one two", usage: billed, doneHeldOpen: true });
          const started = performance.now();
          const { content, usage, m } = await streamed(model);
          expect(performance.now() - started).toBeLessThan(1500);
          expect(content).toBe("one two");
          expect(usage).toMatchObject(billed);
          expect(m).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, usageEstimated: false });
          expect(m.usage).toMatchObject({ inputTokens: 10n, outputTokens: 2n });
          await eventually(() => upstream.seen(model).at(-1)?.aborted || undefined, { what: "the upstream closed" });
        }
      });

      test("a stream whose connection breaks once every choice has finished ends as an answer, its usage counted", async () => {
        const base = { id: "chatcmpl-up", object: "chat.completion.chunk", created: 1, model: "ok-up" };
        const events = [
          { ...base, choices: [{ index: 0, delta: { role: "assistant", content: "forty two" }, finish_reason: null }] },
          { ...base, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] },
        ]
          .map((chunk) => `data: ${JSON.stringify(chunk)}\n\n`)
          .join("");
        // Broken off halfway through: inside the comment that follows the finish_reason, before any usage or [DONE].
        const text = `${events}: ${"x".repeat(events.length * 2)}\n\n`;
        upstream.script("ok", { body: { contentType: "text/event-stream", text }, breaksOff: true });
        const { content, usage, m } = await streamed("ok");
        expect(content).toBe("forty two");
        const output = await countTextTokens(["forty two"]);
        expect(usage).toMatchObject({ prompt_tokens: 10, completion_tokens: output });
        expect(m).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, usageEstimated: true });
        expect(m.usage).toMatchObject({ inputTokens: 10n, outputTokens: BigInt(output) });
      });

      test("a finished stream waits for a usage that comes seconds after its finish_reason, and is billed at it", async () => {
        const billed = {
          prompt_tokens: 1000,
          completion_tokens: 20_005,
          total_tokens: 21_005,
          completion_tokens_details: { reasoning_tokens: 20_000 },
        };
        upstream.script("reasoner", { content: "forty two", usage: billed, usageDelayMs: usageGraceMs + 500 });
        const { usage, m } = await streamed("reasoner");
        expect(usage).toMatchObject(billed);
        expect(m).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, usageEstimated: false });
        expect(m.usage).toMatchObject({ inputTokens: 1000n, outputTokens: 20_005n, reasoningTokens: 20_000n });
        expect(m.costNanos).toBe(201_300_000n);
      });

      test("a usage that does not come within a few seconds of the client leaving is counted, and the upstream closed", async () => {
        upstream.script("slow-stream", { content: "forty two", usageDelayMs: 30_000 });
        const left = performance.now();
        const m = await gateway.row(await leaveAt("slow-stream", '"finish_reason":"stop"'));
        expect(performance.now() - left).toBeLessThan(usageGraceMs + 2000);
        expect(m).toMatchObject({ status: RequestStatus.CANCELLED, usageEstimated: true });
        expect(m.usage?.outputTokens).toBe(BigInt(await countTextTokens(["forty two"])));
        const deadline = Date.now() + 5000;
        while (!upstream.seen("slow-stream")[0]?.aborted && Date.now() < deadline) await Bun.sleep(10);
        expect(upstream.seen("slow-stream")[0]?.aborted).toBe(true);
      });

      test("a client that leaves mid-answer is metered at the reasoning streamed as well as the visible output", async () => {
        const thinking = "the user wants a count so I will count";
        const reasoning = BigInt(await countTextTokens([thinking]));
        for (const reasoningField of ["reasoning_content", "reasoning"] as const) {
          upstream.script("slow-stream", {
            reasoning: thinking,
            reasoningField,
            content: "one two three four five six seven eight",
            chunkDelayMs: 20,
          });
          const m = await gateway.row(await leaveAt("slow-stream", '"content":" two"'));
          expect(m).toMatchObject({ status: RequestStatus.CANCELLED, usageEstimated: true });
          expect(m.usage?.reasoningTokens).toBe(reasoning);
          expect(m.usage?.outputTokens).toBeGreaterThanOrEqual(reasoning + 2n);
          expect(m.usage?.outputTokens).toBeLessThan(reasoning + 8n);
        }
      });

      test("a client that disconnects before the upstream answers aborts it too", async () => {
        upstream.script("slow-stream", { hang: true });
        const gone = new AbortController();
        const pending = sdk()
          .chat.completions.create({ model: "slow-stream", messages: hello }, { signal: gone.signal })
          .catch(() => undefined);
        while (upstream.seen("slow-stream").length === 0) await Bun.sleep(5);
        gone.abort();
        await pending;
        const deadline = Date.now() + 5000;
        while (!upstream.seen("slow-stream")[0]?.aborted && Date.now() < deadline) await Bun.sleep(10);
        expect(upstream.seen("slow-stream")[0]?.aborted).toBe(true);
        const m = gateway.shipper.rows.at(-1);
        expect(m).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, requestedModel: "slow-stream" });
      });
    });

    describe("requests cut off once the upstream has the prompt", () => {
      /** The metrics row recorded after `before` rows, once it is there. */
      const rowAfter = async (before: number) => {
        const deadline = Date.now() + 5000;
        while (gateway.shipper.rows.length <= before && Date.now() < deadline) await Bun.sleep(5);
        return gateway.shipper.rows[before];
      };

      /** Sends `body` to an upstream that never answers, leaves once the upstream has it, and returns its metrics row. */
      const leftUnanswered = async (
        body: Pick<OpenAI.ChatCompletionCreateParamsNonStreaming, "messages" | "response_format">,
        stream: boolean,
      ) => {
        upstream.script("slow-stream", { hang: true });
        // Rows of calls before it, their clients gone before they were recorded, are in before it is counted from.
        expect(await gateway.core.settled(5_000)).toBe(true);
        const before = gateway.shipper.rows.length;
        const sent = upstream.seen("slow-stream").length;
        const gone = new AbortController();
        const pending = sdk()
          .chat.completions.create({ model: "slow-stream", ...body, stream }, { signal: gone.signal })
          .catch(() => undefined);
        while (upstream.seen("slow-stream").length === sent) await Bun.sleep(5);
        gone.abort();
        await pending;
        return await rowAfter(before);
      };

      test("a client that leaves before the first chunk is metered at its prompt, whole or streamed", async () => {
        for (const stream of [false, true]) {
          const m = await leftUnanswered({ messages: hello }, stream);
          expect(m).toMatchObject({ status: RequestStatus.CANCELLED, streamed: stream, usageEstimated: true });
          // o200k_base: "hello there friend" framed as a user message; 10 tokens at $2.50/M.
          expect(m?.usage).toMatchObject({ inputTokens: 10n, outputTokens: 0n });
          expect(m?.costNanos).toBe(25_000n);
        }
      });

      test("a prompt cut off is metered with its response format and its file and audio parts", async () => {
        const description = Array.from({ length: 400 }, (_, i) => `field ${i} holds a word`).join("; ");
        const response_format = {
          type: "json_schema" as const,
          json_schema: { name: "answer", schema: { type: "object", description, properties: { answer: { type: "string" } } } },
        };
        const content = [
          { type: "text" as const, text: "hello there friend" },
          { type: "file" as const, file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0xLjQK" } },
          { type: "input_audio" as const, input_audio: { data: "UklGRiQAAABXQVZF", format: "wav" as const } },
        ];
        // o200k_base: "hello there friend" framed as a user message is 10 tokens, the file and the recording 765 each
        // (the part estimate), and the schema's text thousands more.
        const schema = BigInt(await countTextTokens([JSON.stringify(response_format)]));
        expect(schema).toBeGreaterThan(2500n);
        const expected = 10n + 2n * 765n + schema;
        for (const stream of [false, true]) {
          const m = await leftUnanswered({ messages: [{ role: "user", content }], response_format }, stream);
          expect(m).toMatchObject({ status: RequestStatus.CANCELLED, streamed: stream, usageEstimated: true });
          expect(m?.usage).toMatchObject({ inputTokens: expected, outputTokens: 0n });
        }
      });

      test("an attempt timed out or cut off after its prompt was sent adds that prompt, estimated, to what is metered", async () => {
        const billed = { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 };
        const cases: Array<{ stream: boolean; first: Behaviour; input: bigint; estimated: boolean; nanos: bigint }> = [
          // Timed out, then answered: the upstream billed two prompts (10 tokens each at $2.50/M) and 4 output ($10/M).
          { stream: false, first: { hang: true }, input: 20n, estimated: true, nanos: 90_000n },
          { stream: true, first: { hang: true }, input: 20n, estimated: true, nanos: 90_000n },
          // Accepted, then its connection broke off before any chunk.
          { stream: true, first: { breaksOff: true }, input: 20n, estimated: true, nanos: 90_000n },
          // A refusal, however it ends, bills nothing; nor does a stream that ended, whole, before any chunk.
          { stream: false, first: { status: 503 }, input: 10n, estimated: false, nanos: 65_000n },
          { stream: true, first: { endsAtOnce: true }, input: 10n, estimated: false, nanos: 65_000n },
          { stream: true, first: { status: 429 }, input: 10n, estimated: false, nanos: 65_000n },
        ];
        for (const { stream, first, input, estimated, nanos } of cases) {
          upstream.script("retried", first, { content: "a b c d", usage: billed });
          const before = gateway.shipper.rows.length;
          if (stream) {
            for await (const _ of await sdk().chat.completions.create({ model: "retried", messages: hello, stream }));
          } else await sdk().chat.completions.create({ model: "retried", messages: hello });
          const m = await rowAfter(before);
          expect(m).toMatchObject({ status: RequestStatus.OK, retries: 1, usageEstimated: estimated });
          expect(m?.usage).toMatchObject({ inputTokens: input, outputTokens: 4n });
          expect(m?.costNanos).toBe(nanos);
        }
        // Every attempt timed out: both prompts.
        upstream.script("retried", { hang: true });
        const before = gateway.shipper.rows.length;
        expectShape(await apiError(sdk().chat.completions.create({ model: "retried", messages: hello })), 504, "upstream_timeout");
        const m = await rowAfter(before);
        expect(m).toMatchObject({ status: RequestStatus.TIMEOUT, usageEstimated: true });
        expect(m?.usage).toMatchObject({ inputTokens: 20n, outputTokens: 0n });
        expect(m?.costNanos).toBe(50_000n);
      });

      test("the usage a client is shown of a request that lost an attempt's prompt is what it is charged, as over RPC", async () => {
        const billed = { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 };
        // Timed out, then answered: two prompts of 10 tokens and 4 output, whole, streamed and embedded alike.
        const charged = { prompt_tokens: 20, completion_tokens: 4, total_tokens: 24 };
        upstream.script("retried", { hang: true }, { content: "a b c d", usage: billed });
        const { data: whole, response } = await sdk()
          .chat.completions.create({ model: "retried", messages: hello })
          .withResponse();
        expect(whole.usage).toEqual(charged);
        expect(response.headers.get("x-gateway-cost-nanos")).toBe("90000");

        upstream.script("retried", { hang: true }, { content: "a b c d", usage: billed });
        let usage: OpenAI.CompletionUsage | undefined;
        const stream_options = { include_usage: true };
        for await (const chunk of await sdk().chat.completions.create({ model: "retried", messages: hello, stream: true, stream_options })) {
          usage = chunk.usage ?? usage;
        }
        expect(usage).toEqual(charged);

        upstream.script("retried", { hang: true }, { usage: billed });
        const { data: embedding } = await sdk().embeddings.create({ model: "retried", input: "Hello world" }).withResponse();
        // "Hello world" counted: 2 tokens lost, then 10 billed.
        expect(embedding.usage).toEqual({ prompt_tokens: 12, total_tokens: 12 });
      });

      test("so is the usage of a Responses API request that lost an attempt's prompt, whole and streamed", async () => {
        const billed = { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 };
        const shown: Array<[OpenAI.Responses.ResponseUsage | undefined, string]> = [];
        upstream.script("retried", { hang: true }, { content: "a b c d", usage: billed });
        const { data: whole, response } = await sdk().responses.create({ model: "retried", input: "Hello world" }).withResponse();
        shown.push([whole.usage, response.headers.get("x-request-id") ?? ""]);
        upstream.script("retried", { hang: true }, { content: "a b c d", usage: billed });
        const streamed = await sdk().responses.create({ model: "retried", input: "Hello world", stream: true }).withResponse();
        let completed: OpenAI.Responses.ResponseUsage | undefined;
        for await (const event of streamed.data) if (event.type === "response.completed") completed = event.response.usage;
        shown.push([completed, streamed.response.headers.get("x-request-id") ?? ""]);
        for (const [usage, requestId] of shown) {
          const m = await gateway.row(requestId);
          // The lost attempt's prompt, counted, on top of the 10 the answering attempt was billed.
          expect(m.usage?.inputTokens).toBeGreaterThan(10n);
          expect(usage).toMatchObject({
            input_tokens: Number(m.usage?.inputTokens),
            output_tokens: 4,
            total_tokens: Number(m.usage?.inputTokens) + 4,
          });
        }
      });

      test("an embedding whose upstream times out is metered at its input", async () => {
        upstream.script("slow", { hang: true });
        const before = gateway.shipper.rows.length;
        const e = await apiError(sdk().embeddings.create({ model: "slow", input: "Hello world" }));
        expectShape(e, 504, "upstream_timeout");
        const m = await rowAfter(before);
        expect(m).toMatchObject({ status: RequestStatus.TIMEOUT, endpoint: Endpoint.EMBEDDINGS, usageEstimated: true });
        expect(m?.usage?.inputTokens).toBe(2n);
        expect(m?.costNanos).toBe(5_000n);
      });
    });

    describe("embeddings and models", () => {
      test("embeddings through the SDK (its default base64 encoding and floats), priced on input tokens", async () => {
        upstream.script("embed", { usage: { prompt_tokens: 400, completion_tokens: 0, total_tokens: 400 } });
        const { data, response } = await sdk()
          .embeddings.create({ model: "embed", input: ["alpha", "beta"] })
          .withResponse();
        expect(data.data).toHaveLength(2);
        expect(data.data[0]?.embedding).toHaveLength(4);
        expect(data.data[0]?.embedding[0]).toBeCloseTo(0.05, 5);
        expect(upstream.seen("embed")[0]?.body.encoding_format).toBe("base64");
        // 400 tokens at $2.50/M
        expect(response.headers.get("x-gateway-cost-nanos")).toBe("1000000");
        const floats = await sdk().embeddings.create({
          model: "embed",
          input: "gamma",
          encoding_format: "float",
          dimensions: 3,
        });
        expect(floats.data[0]?.embedding).toHaveLength(3);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ endpoint: Endpoint.EMBEDDINGS, status: RequestStatus.OK, costNanos: 1_000_000n });
        expect(m.usage?.inputTokens).toBe(400n);
      });

      test("vectors come back in the encoding the client asked for, whichever an upstream that ignores it answered in", async () => {
        const post = (body: Record<string, unknown>) =>
          fetch(`${base()}/v1/embeddings`, {
            method: "POST",
            headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
            body: JSON.stringify({ model: "embed", input: ["alpha", "beta"], ...body }),
          }).then((r) => r.json() as Promise<{ data: Array<{ embedding: unknown }> }>);
        const floats = [0.05, 0.06, 0.07, 0.08].map(Math.fround);
        const base64 = Buffer.from(Float32Array.from(floats).buffer).toString("base64");
        // LM Studio and older Ollama answer lists of floats to a request for base64, which OpenAI's .NET library sends.
        upstream.script("embed", { encoding: "float" });
        expect((await post({ encoding_format: "base64" })).data[0]?.embedding).toBe(base64);
        const asked = await sdk().embeddings.create({ model: "embed", input: "alpha", encoding_format: "base64" });
        expect(asked.data[0]?.embedding as unknown).toBe(base64);
        // And the other way round: floats, as the API answers a request that names no encoding.
        upstream.script("embed", { encoding: "base64" });
        expect((await post({})).data[0]?.embedding).toEqual(floats);
        expect((await post({ encoding_format: "float" })).data[1]?.embedding).toEqual([0.04, 0.05, 0.06, 0.07].map(Math.fround));
      });

      test("floats of a large batch are asked for in base64 and written in pieces, as a float upstream's answer", async () => {
        const input = Array.from({ length: 256 }, (_, i) => `input ${i}`);
        const post = () =>
          fetch(`${base()}/v1/embeddings`, {
            method: "POST",
            headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
            body: JSON.stringify({ model: "embed", input, dimensions: 1536 }),
          });
        const decoded = await post();
        expect(upstream.seen("embed").at(-1)?.body.encoding_format).toBe("base64");
        // 7 MB of JSON floats never held as one string: it goes out a piece at a time, so without a length.
        expect(decoded.headers.get("content-length")).toBeNull();
        const text = await decoded.text();
        // An upstream that answers the same float32s as JSON numbers printed in full: the client reads the same JSON.
        upstream.script("embed", { encoding: "float" });
        const relayed = await post();
        expect(await relayed.text()).toBe(text);
        expect(relayed.headers.get("x-gateway-cost-nanos")).toBe(decoded.headers.get("x-gateway-cost-nanos"));
        const answer = JSON.parse(text) as { object: string; data: Array<{ index: number; embedding: number[] }> };
        expect(answer.object).toBe("list");
        expect(answer.data.map((d) => d.index)).toEqual(input.map((_, i) => i));
        const last = Array.from({ length: 1536 }, (_, i) => Math.fround((input[255]!.length + i) / 100));
        expect(answer.data[255]?.embedding).toEqual(last);
      });

      test("an upstream that refuses base64 is asked again for floats, and from then on; a client's base64 encoded from them", async () => {
        upstream.script("floats-only", { floatsOnly: true });
        // The official SDK left at its default asks for base64 and decodes it itself.
        const { data, response } = await sdk()
          .embeddings.create({ model: "floats-only", input: ["alpha", "beta"] })
          .withResponse();
        const floats = [0.05, 0.06, 0.07, 0.08].map(Math.fround);
        expect(data.data[0]?.embedding).toEqual(floats);
        expect(data.usage).toEqual({ prompt_tokens: 4, total_tokens: 4 });
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ endpoint: Endpoint.EMBEDDINGS, status: RequestStatus.OK, costNanos: 10_000n });
        expect(response.headers.get("x-gateway-cost-nanos")).toBe("10000");
        // A plain client's floats and base64 are what an upstream answering base64 gives: the same bytes, usage, cost.
        const post = (model: string, body: Record<string, unknown>) =>
          fetch(`${base()}/v1/embeddings`, {
            method: "POST",
            headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
            body: JSON.stringify({ model, input: ["alpha", "beta"], ...body }),
          }).then(async (r) => {
            const answer = (await r.json()) as { model: string; data: Array<{ embedding: unknown }> };
            return { cost: r.headers.get("x-gateway-cost-nanos"), ...answer };
          });
        for (const body of [{}, { encoding_format: "float" }, { encoding_format: "base64" }]) {
          const { model, ...answer } = await post("floats-only", body);
          const { model: other, ...expected } = await post("embed", body);
          expect([model, other]).toEqual(["floats-only-fake", "embed-fake"]);
          expect(answer).toEqual(expected);
        }
        const base64 = await post("floats-only", { encoding_format: "base64" });
        const second = Float32Array.from([0.04, 0.05, 0.06, 0.07]);
        expect(base64.data[1]?.embedding).toBe(Buffer.from(second.buffer).toString("base64"));
        const asked = upstream.seen("floats-only").map((r) => r.body.encoding_format);
        expect(asked).toEqual(["base64", "float", "float", "float", "float", "float"]);
        expect(upstream.seen("embed").map((r) => r.body.encoding_format)).toEqual(["base64", "base64", "base64"]);
      });

      test("embeddings without upstream usage are counted", async () => {
        upstream.script("embed", { usage: false });
        const { response } = await sdk().embeddings.create({ model: "embed", input: "Hello world" }).withResponse();
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ usageEstimated: true });
        expect(m.usage?.inputTokens).toBe(2n);
      });

      test("models list only what the key may use", async () => {
        const all = await sdk().models.list();
        expect(all.data.map((m) => m.id)).toContain("premium");
        const limited = await sdk("sk-limited").models.list();
        expect(limited.data.map((m) => m.id)).toEqual(["ok"]);
        expect((await sdk("sk-limited").models.retrieve("ok")).id).toBe("ok");
        // One it may not use is as unknown to it as one that does not exist, as OpenAI answers.
        expectShape(
          await apiError(sdk("sk-limited").models.retrieve("premium")),
          404,
          "model_not_found",
          "invalid_request_error",
        );
      });

      test("HEAD of a model list or a model answers what GET does, without its body", async () => {
        for (const path of ["/v1/models", "/v1/models/ok"]) {
          const got = await fetch(`${base()}${path}`, { headers: { authorization: "Bearer sk-good" } });
          const head = await fetch(`${base()}${path}`, { method: "HEAD", headers: { authorization: "Bearer sk-good" } });
          expect([path, head.status, head.headers.get("content-type")]).toEqual([path, 200, got.headers.get("content-type")]);
          expect(await head.text()).toBe("");
          expect(isUlid(head.headers.get("x-request-id") ?? "")).toBe(true);
          await got.text();
        }
        const refused = await fetch(`${base()}/v1/models`, { method: "HEAD" });
        expect(refused.status).toBe(401);
      });

      test("a request's target in absolute form, as a proxy is sent one, is served by its path; /v1 alone is the API's 404", async () => {
        const head = "Authorization: Bearer sk-good\r\nConnection: close\r\n\r\n";
        const listed = await answerUntilClosed(base(), `GET http://elsewhere.example/v1/models?x=1 HTTP/1.1\r\nHost: x\r\n${head}`);
        expect(listed).toStartWith("HTTP/1.1 200");
        expect(listed).toContain('"object":"list"');
        const bare = await answerUntilClosed(base(), `GET /v1 HTTP/1.1\r\nHost: x\r\n${head}`);
        expect(bare).toStartWith("HTTP/1.1 404");
        expect(bare).toContain('"code":"unknown_url"');
        expect(bare.toLowerCase()).toContain("x-request-id: ");
      });
    });

    describe("error shapes for every status", () => {
      test("400 invalid field, 401 bad key, 403 model not allowed, 404 unknown model, 413 too large", async () => {
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "ok", messages: [], n: 1 })),
          400,
          "empty_array",
          "invalid_request_error",
        );
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "ok", messages: hello, n: 129 })),
          400,
          "integer_above_max_value",
        );
        expectShape(await apiError(sdk().embeddings.create({ model: "embed", input: "" })), 400, "invalid_value");
        expectShape(
          await apiError(sdk("sk-nope").chat.completions.create({ model: "ok", messages: hello })),
          401,
          "invalid_api_key",
        );
        expectShape(
          await apiError(sdk("sk-limited").chat.completions.create({ model: "premium", messages: hello })),
          403,
          "model_not_allowed",
        );
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "gpt-9", messages: hello })),
          404,
          "model_not_found",
        );
        const big = [{ role: "user" as const, content: "x".repeat(20_000) }];
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "ok", messages: big })),
          413,
          "request_too_large",
        );
        expect(upstream.requests).toHaveLength(0);
      });

      test("415 unsupported_content_encoding for a compressed body, not invalid_json; the connection serves on", async () => {
        const json = JSON.stringify({ model: "ok", messages: hello });
        const post = (path: string, encoding: string | undefined, body: Uint8Array | string) =>
          fetch(`${base()}/v1/${path}`, {
            method: "POST",
            headers: { authorization: "Bearer sk-good", "content-type": "application/json", ...(encoding ? { "content-encoding": encoding } : {}) },
            body,
          });
        for (const [path, encoding] of [["chat/completions", "gzip"], ["chat/completions", "deflate, br"], ["embeddings", "gzip"]] as const) {
          const response = await post(path, encoding, Bun.gzipSync(json));
          expect(response.status).toBe(415);
          expect(await response.json()).toEqual({
            error: {
              message: `Content-Encoding '${encoding}' is not supported: send the request body uncompressed.`,
              type: "invalid_request_error",
              param: null,
              code: "unsupported_content_encoding",
            },
          });
        }
        expect(upstream.requests).toHaveLength(0);
        expect((await post("chat/completions", "identity", json)).status).toBe(200);
        expect((await post("chat/completions", undefined, json)).status).toBe(200);
      });

      test("a body that is not UTF-8 is invalid_json, declared or streamed, not sent upstream mangled", async () => {
        const post = (body: Uint8Array, streamed: boolean) =>
          fetch(`${base()}/v1/chat/completions`, {
            method: "POST",
            headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
            body: streamed ? new Blob([body]).stream() : body,
          });
        // "Société" in Latin-1, as a client that encodes text so would send it.
        const latin1 = Buffer.from(JSON.stringify({ model: "ok", messages: [{ role: "user", content: "Société" }] }), "latin1");
        for (const streamed of [false, true]) {
          const response = await post(latin1, streamed);
          expect(response.status).toBe(400);
          expect(await response.json()).toEqual({
            error: {
              message: "The request body is not valid UTF-8; send JSON encoded as UTF-8.",
              type: "invalid_request_error",
              param: null,
              code: "invalid_json",
            },
          });
        }
        expect(upstream.requests).toHaveLength(0);
        // UTF-8 with a byte order mark is read without it, however it arrives.
        const marked = Buffer.from(`\ufeff${JSON.stringify({ model: "ok", messages: [{ role: "user", content: "Société" }] })}`);
        for (const streamed of [false, true]) expect((await post(marked, streamed)).status).toBe(200);
        expect(upstream.requests.map((r) => (r.body as { messages: Array<{ content: string }> }).messages[0]?.content)).toEqual([
          "Société",
          "Société",
        ]);
      });

      test("an invalid field is a BadRequestError naming it, and the upstream never sees the request", async () => {
        const temperature = await apiError(
          sdk().chat.completions.create({ model: "ok", messages: hello, temperature: 5 }),
        );
        expect(temperature).toBeInstanceOf(BadRequestError);
        expectShape(temperature, 400, "decimal_above_max_value", "invalid_request_error");
        expect(temperature.param).toBe("temperature");
        const tools = await apiError(
          sdk().chat.completions.create({ model: "ok", messages: hello, tools: "garbage" as never }),
        );
        expect([tools.constructor, tools.param, tools.code]).toEqual([BadRequestError, "tools", "invalid_type"]);
        const toolTurn = [...hello, { role: "tool" as const, content: "42" } as never];
        const stream = await apiError(sdk().chat.completions.create({ model: "ok", messages: toolTurn, stream: true }));
        expect([stream.constructor, stream.param, stream.code]).toEqual([
          BadRequestError,
          "messages[1].tool_call_id",
          "missing_required_parameter",
        ]);
        const dimensions = await apiError(sdk().embeddings.create({ model: "embed", input: "hi", dimensions: 0 }));
        expect([dimensions.constructor, dimensions.param, dimensions.code]).toEqual([
          BadRequestError,
          "dimensions",
          "integer_below_min_value",
        ]);
        expect(upstream.requests).toHaveLength(0);
      });

      test("a file part naming a file by id is a 400 naming it, metered at no cost: no org's file is the upstream's", async () => {
        const before = gateway.shipper.rows.length;
        const content = [{ type: "file" as const, file: { file_id: "file-of-the-upstream-account" } }];
        for (const stream of [false, true]) {
          const error = await apiError(
            sdk().chat.completions.create({ model: "ok", messages: [{ role: "user", content }], stream }),
          );
          expect([error.constructor, error.param, error.code]).toEqual([
            BadRequestError,
            "messages[0].content[0].file.file_id",
            "unsupported_value",
          ]);
        }
        expect(upstream.requests).toHaveLength(0);
        await eventually(() => gateway.shipper.rows.length >= before + 2);
        for (const row of gateway.shipper.rows.slice(before)) expect(row.costNanos).toBe(0n);
      });

      test("web_search_options is a 400 naming it, metered at no cost: the upstream's per-search fee has no price", async () => {
        const before = gateway.shipper.rows.length;
        const web_search_options = { search_context_size: "low" as const };
        for (const stream of [false, true]) {
          const error = await apiError(
            sdk().chat.completions.create({ model: "ok", messages: hello, web_search_options, stream }),
          );
          expect([error.constructor, error.param, error.code]).toEqual([BadRequestError, "web_search_options", "unsupported_value"]);
        }
        expect(upstream.requests).toHaveLength(0);
        await eventually(() => gateway.shipper.rows.length >= before + 2);
        for (const row of gateway.shipper.rows.slice(before)) expect(row.costNanos).toBe(0n);
      });

      test("429 from the upstream is passed on with its Retry-After", async () => {
        upstream.script("rate-limited", { status: 429, retryAfter: "7" });
        const e = await apiError(sdk().chat.completions.create({ model: "rate-limited", messages: hello }));
        expectShape(e, 429, "upstream_rate_limited", "rate_limit_error");
        expect(e.headers?.get("retry-after")).toBe("7");
        expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.RATE_LIMITED, httpStatus: 429 });
      });

      test("an upstream's wait in milliseconds is passed on as retry-after-ms, which the SDK waits out, not a whole second", async () => {
        upstream.script("retried-later", { status: 429, retryAfterMs: "300" }, {});
        const e = await apiError(sdk().chat.completions.create({ model: "retried-later", messages: hello }));
        expectShape(e, 429, "upstream_rate_limited", "rate_limit_error");
        expect([e.headers?.get("retry-after"), e.headers?.get("retry-after-ms")]).toEqual(["1", "300"]);
        await sdk().chat.completions.create({ model: "retried-later", messages: hello });

        upstream.script("retried-later", { status: 429, retryAfterMs: "300" }, {});
        const patient = new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 1 });
        const started = performance.now();
        const served = await patient.chat.completions.create({ model: "retried-later", messages: hello });
        const waited = performance.now() - started;
        expect(served.model).toBe("retried-later-fake");
        expect(upstream.seen("retried-later")).toHaveLength(4);
        expect(waited).toBeGreaterThanOrEqual(300);
        expect(waited).toBeLessThan(900);
      });

      test("the SDKs do not retry what the gateway has retried or a retry cannot help; a rate limit they retry after its wait", async () => {
        const retrying = new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 2 });
        upstream.script("failing", { status: 500 });
        const failed = await apiError(retrying.chat.completions.create({ model: "failing", messages: hello }));
        expectShape(failed, 502, "upstream_error");
        expect(failed.headers?.get("x-should-retry")).toBe("false");
        const tooLarge = { message: "Request too large for gpt-4o on tokens per min (TPM).", type: "tokens", code: "rate_limit_exceeded" };
        upstream.script("tpm", { status: 429, error: tooLarge });
        upstream.script("tpm-fallback", { status: 429, error: tooLarge });
        const refused = await apiError(retrying.chat.completions.create({ model: "tpm", messages: hello }));
        expectShape(refused, 429, "rate_limit_exceeded", "tokens");
        expect(refused.headers?.get("x-should-retry")).toBe("false");
        upstream.script("slow", { hang: true });
        const timedOut = await apiError(retrying.chat.completions.create({ model: "slow", messages: hello }));
        expectShape(timedOut, 504, "upstream_timeout");
        expect(timedOut.headers?.get("x-should-retry")).toBe("false");
        expect([upstream.seen("failing"), upstream.seen("tpm"), upstream.seen("slow")].map((r) => r.length)).toEqual([1, 1, 1]);

        upstream.script("retried-later", { status: 429, retryAfter: "1" }, {});
        const patient = new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 1 });
        const served = await patient.chat.completions.create({ model: "retried-later", messages: hello });
        expect(served.model).toBe("retried-later-fake");
        expect(upstream.seen("retried-later")).toHaveLength(2);
      });

      test("502 when the upstream fails or answers garbage, 503 when keys cannot be checked, 504 on timeout", async () => {
        upstream.script("failing", { status: 500 });
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "failing", messages: hello })),
          502,
          "upstream_error",
          "api_error",
        );
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "failing", messages: hello, stream: true })),
          502,
          "upstream_error",
        );
        upstream.script("garbled", { malformed: true });
        const garbled = await apiError(sdk().chat.completions.create({ model: "garbled", messages: hello }));
        expectShape(garbled, 502, "upstream_error");
        expect(garbled.message).toContain("The upstream of `garbled` gave no usable answer.");
        upstream.script("slow", { hang: true });
        expectShape(
          await apiError(sdk().chat.completions.create({ model: "slow", messages: hello })),
          504,
          "upstream_timeout",
        );
        expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
        gateway.billing.setDown(true);
        try {
          expectShape(
            await apiError(sdk("sk-unseen").chat.completions.create({ model: "ok", messages: hello })),
            503,
            "auth_unavailable",
          );
        } finally {
          gateway.billing.setDown(false);
        }
      });
    });

    describe("upstream usage as it is metered", () => {
      // An OpenAI-compatible server may report counts no token count can be; the cast lets the fake send them.
      const odd = (usage: Record<string, unknown>) => usage as unknown as FakeUsage;
      /** The row of a response, checked to hold what billing accepts and what the client was charged. */
      const meteredRow = async (response: Response) => {
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m.status).toBe(RequestStatus.OK);
        expect(m.usage?.cachedInputTokens).toBeLessThanOrEqual(m.usage?.inputTokens ?? 0n);
        expect(m.usage?.reasoningTokens).toBeLessThanOrEqual(m.usage?.outputTokens ?? 0n);
        const charged = response.headers.get("x-gateway-cost-nanos");
        if (charged !== null) expect(charged).toBe(String(m.costNanos));
        return m;
      };
      /** A chat of `model` streamed to its end: the usages its client was shown, and its response. */
      const streamedUsages = async (model: string, include_usage = true) => {
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model, messages: hello, stream: true, stream_options: { include_usage } })
          .withResponse();
        const usages: OpenAI.CompletionUsage[] = [];
        for await (const chunk of stream) if (chunk.usage) usages.push(chunk.usage);
        return { usages, response };
      };
      /** The accounting a chat of `model` streamed over RPC ends with. */
      const streamedAccounting = async (model: string) => {
        const messages = [];
        for await (const message of gateway.rpc("sk-good").streamChatCompletion({ params: { model, messages: hello } })) {
          messages.push(message);
        }
        return messages.at(-1)?.accounting;
      };
      const fractional = odd({
        prompt_tokens: 10.5,
        completion_tokens: 4,
        total_tokens: 14.5,
        prompt_tokens_details: { cached_tokens: 20 },
        completion_tokens_details: { reasoning_tokens: 9 },
      });
      // Metered: the input rounded up, the cached input within it, the reasoning beside the output added to it.
      const fractionalMetered = { inputTokens: 11n, cachedInputTokens: 11n, outputTokens: 13n, reasoningTokens: 9n };
      // 11 cached input at $1.25/M + 4 output and 9 reasoning beside it (more than the output), at $10/M
      const fractionalCost = 11n * 1_250n + 13n * 10_000n;

      // What the client is shown: the metered counts.
      const answered = {
        prompt_tokens: 11,
        completion_tokens: 4,
        total_tokens: 24,
        prompt_tokens_details: { cached_tokens: 11 },
        completion_tokens_details: { reasoning_tokens: 9 },
      };

      test("a whole completion: fractions round up, cached input stays within the input, reasoning is output", async () => {
        upstream.script("odd-usage", { content: "hi", usage: fractional });
        const { data: completion, response } = await sdk()
          .chat.completions.create({ model: "odd-usage", messages: hello })
          .withResponse();
        expect(completion.usage).toEqual(answered);
        const m = await meteredRow(response);
        expect(m.usage).toMatchObject(fractionalMetered);
        expect(m).toMatchObject({ usageEstimated: false, costNanos: fractionalCost });
        expect(upstream.seen("odd-usage")).toHaveLength(1);
      });

      test("a streamed completion is metered by the same rule", async () => {
        upstream.script("odd-usage", { content: "one two", usage: fractional });
        const { usages, response } = await streamedUsages("odd-usage");
        expect(usages).toEqual([answered]);
        const m = await meteredRow(response);
        expect(m.usage).toMatchObject(fractionalMetered);
        expect(m).toMatchObject({ usageEstimated: false, costNanos: fractionalCost });
      });

      test("reasoning counted beside the completion (Gemini's, xAI's shape) is charged as output; inside it, once", async () => {
        const usage = (completion: number, reasoning: number, total: number) => ({
          prompt_tokens: 20,
          completion_tokens: completion,
          total_tokens: total,
          completion_tokens_details: { reasoning_tokens: reasoning },
        });
        // 20 input at $1.25/M; output, reasoning included, at $10/M, or reasoning at $40/M where it is priced apart.
        const cases = [
          { model: "reasoner", usage: usage(424, 572, 1016), output: 996n, nanos: 9_985_000n }, // Gemini
          { model: "reasoner", usage: usage(600, 572, 1192), output: 1172n, nanos: 11_745_000n }, // xAI
          { model: "reasoner", usage: usage(996, 572, 1016), output: 996n, nanos: 9_985_000n }, // OpenAI: within
          { model: "reasoner-priced", usage: usage(424, 572, 1016), output: 996n, nanos: 27_145_000n },
          { model: "reasoner-priced", usage: usage(996, 572, 1016), output: 996n, nanos: 27_145_000n },
        ];
        for (const { model, usage, output, nanos } of cases) {
          const metered = { inputTokens: 20n, outputTokens: output, reasoningTokens: 572n };
          upstream.script(model, { content: "one two", usage });
          const { data: completion, response } = await sdk().chat.completions.create({ model, messages: hello }).withResponse();
          // The client is shown the upstream's counts, none shrunk.
          expect(completion.usage).toEqual(usage);
          expect((await meteredRow(response)).usage).toMatchObject(metered);
          expect(response.headers.get("x-gateway-cost-nanos")).toBe(String(nanos));

          const { usages, response: streamed } = await streamedUsages(model);
          expect(usages).toEqual([usage]);
          const m = await meteredRow(streamed);
          expect(m).toMatchObject({ usageEstimated: false, costNanos: nanos, usage: metered });

          const rpc = await gateway.rpc("sk-good").createChatCompletion({ params: { model, messages: hello } });
          expect(rpc.accounting).toMatchObject({ costNanos: nanos, usage: metered });
          expect(await streamedAccounting(model)).toMatchObject({ costNanos: nanos, usage: metered });
        }
      });

      test("audio tokens are charged at the audio prices, in the input and output parts of the cost", async () => {
        const usage = odd({
          prompt_tokens: 1000,
          completion_tokens: 600,
          total_tokens: 1600,
          prompt_tokens_details: { cached_tokens: 0, audio_tokens: 400 },
          completion_tokens_details: { reasoning_tokens: 0, audio_tokens: 500 },
        });
        // 600 text input at $2.50/M, 400 audio at $40/M; 100 text output at $10/M, 500 audio at $80/M
        const costBreakdown = { inputNanos: 1_500_000n + 16_000_000n, cachedInputNanos: 0n, outputNanos: 1_000_000n + 40_000_000n, reasoningNanos: 0n };
        const nanos = 58_500_000n;
        const metered = { inputTokens: 1000n, cachedInputTokens: 0n, outputTokens: 600n, reasoningTokens: 0n };
        upstream.script("audio", { content: "one two", usage });
        const { data: completion, response } = await sdk().chat.completions.create({ model: "audio", messages: hello }).withResponse();
        expect(completion.usage).toEqual(usage);
        expect(response.headers.get("x-gateway-cost-nanos")).toBe(String(nanos));
        expect(await meteredRow(response)).toMatchObject({ costNanos: nanos, costBreakdown, usage: metered });

        const { usages, response: streamed } = await streamedUsages("audio");
        expect(usages).toEqual([usage]);
        expect(await meteredRow(streamed)).toMatchObject({ costNanos: nanos, costBreakdown, usage: metered });

        const rpc = await gateway.rpc("sk-good").createChatCompletion({ params: { model: "audio", messages: hello } });
        expect(rpc.accounting).toMatchObject({ costNanos: nanos, usage: metered });
        expect(await streamedAccounting("audio")).toMatchObject({ costNanos: nanos, usage: metered });
      });

      test("a negative count is no count: the tokenizer's estimate stands in for it, marked estimated", async () => {
        upstream.script("odd-usage", {
          content: "Hello world",
          usage: odd({ prompt_tokens: -5, completion_tokens: 3, total_tokens: -2 }),
        });
        const whole = await meteredRow(
          (await sdk().chat.completions.create({ model: "odd-usage", messages: hello }).withResponse()).response,
        );
        // o200k_base: 3 priming + 3 framing + "user" + "hello there friend" (3 tokens)
        expect(whole.usage).toMatchObject({ inputTokens: 10n, outputTokens: 3n });
        expect(whole.usageEstimated).toBe(true);

        upstream.script("odd-usage", {
          content: "Hello world",
          usage: odd({ prompt_tokens: 12, completion_tokens: -1, total_tokens: 11 }),
        });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "odd-usage", messages: hello, stream: true })
          .withResponse();
        for await (const _ of stream);
        const streamed = await meteredRow(response);
        // "Hello world" is 2 tokens.
        expect(streamed.usage).toMatchObject({ inputTokens: 12n, outputTokens: 2n });
        expect(streamed.usageEstimated).toBe(true);
      });

      test("a stream's later usage whose details are null keeps the cached and reasoning tokens reported before", async () => {
        const real = {
          prompt_tokens: 1000,
          completion_tokens: 500,
          total_tokens: 1500,
          prompt_tokens_details: { cached_tokens: 400 },
          completion_tokens_details: { reasoning_tokens: 100 },
        };
        const nulls = { ...real, prompt_tokens_details: null, completion_tokens_details: null };
        upstream.script("odd-usage", { content: "one two three", usage: real, laterUsages: [nulls] });
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "odd-usage", messages: hello, stream: true })
          .withResponse();
        for await (const _ of stream);
        const m = await meteredRow(response);
        expect(m.usage).toMatchObject({ inputTokens: 1000n, cachedInputTokens: 400n, outputTokens: 500n, reasoningTokens: 100n });
        // 600 input at $2.50/M, 400 cached at $1.25/M and 500 output at $10/M.
        expect(m).toMatchObject({ usageEstimated: false, costNanos: 600n * 2_500n + 400n * 1_250n + 500n * 10_000n });
      });

      test("a stream's usage is each count's largest: a later empty or all-zero usage takes nothing away", async () => {
        const real = { prompt_tokens: 1000, completion_tokens: 500, total_tokens: 1500 };
        // 1000 input at $2.50/M + 500 output at $10/M
        const realCost = 1000n * 2_500n + 500n * 10_000n;
        const zero = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
        const running = [100, 300, 500].map((c) => ({ prompt_tokens: 1000, completion_tokens: c, total_tokens: 1000 + c }));
        const scripts: Behaviour[] = [
          { content: "one two three", usage: real, laterUsages: [zero] },
          { content: "one two three", usage: real, laterUsages: [{}] },
          { content: "one two three", usage: real, laterUsages: [odd({ prompt_tokens: -1, completion_tokens: null })] },
          // vLLM's continuous usage: running counts on every content chunk, none at the end.
          { content: "one two three", usage: false, chunkUsages: running },
          // Groq's: in the last chunk's x_groq, no usage chunk.
          { content: "one two three", usage: false, groqUsage: real },
        ];
        for (const behaviour of scripts) {
          for (const includeUsage of [true, false]) {
            upstream.script("odd-usage", behaviour);
            const { usages, response } = await streamedUsages("odd-usage", includeUsage);
            expect(usages).toEqual(includeUsage ? [real] : []);
            const m = await meteredRow(response);
            expect(m.usage).toMatchObject({ inputTokens: 1000n, outputTokens: 500n });
            expect(m).toMatchObject({ usageEstimated: false, costNanos: realCost });
          }
          upstream.script("odd-usage", behaviour);
          expect(await streamedAccounting("odd-usage")).toMatchObject({ costNanos: realCost, usageEstimated: false });
        }
      });

      test("the client's usage holds OpenAI's counts only: an upstream's own cost and other fields stay out", async () => {
        // OpenRouter's usage: its price to the operator beside the counts.
        const openRouter = odd({
          prompt_tokens: 100,
          completion_tokens: 40,
          total_tokens: 140,
          cost: 0.0123,
          is_byok: false,
          cost_details: { upstream_inference_cost: 0.011 },
          prompt_tokens_details: { cached_tokens: 20, audio_tokens: 0, cache_write_tokens: 7 },
          completion_tokens_details: { reasoning_tokens: 10, audio_tokens: 0, accepted_prediction_tokens: 3, image_tokens: 5 },
        });
        const answered = {
          prompt_tokens: 100,
          completion_tokens: 40,
          total_tokens: 140,
          prompt_tokens_details: { cached_tokens: 20, audio_tokens: 0 },
          completion_tokens_details: { reasoning_tokens: 10, audio_tokens: 0, accepted_prediction_tokens: 3 },
        };
        upstream.script("odd-usage", { content: "hi", usage: openRouter });
        const { data: completion, response } = await sdk()
          .chat.completions.create({ model: "odd-usage", messages: hello })
          .withResponse();
        expect(completion.usage).toEqual(answered);
        // 80 input at $2.50/M, 20 cached at $1.25/M, 40 output at $10/M
        expect(response.headers.get("x-gateway-cost-nanos")).toBe(String(80n * 2_500n + 20n * 1_250n + 40n * 10_000n));

        upstream.script("odd-usage", { content: "one two", usage: openRouter });
        expect((await streamedUsages("odd-usage")).usages).toEqual([answered]);

        upstream.script("embed", { usage: odd({ prompt_tokens: 7, total_tokens: 7, cost: 0.0000014 }) });
        const embedding = await sdk().embeddings.create({ model: "embed", input: "Hello world" });
        expect(embedding.usage).toEqual({ prompt_tokens: 7, total_tokens: 7 });
      });

      /** The usage a client is shown of "Hello world" embedded by an upstream that reports `usage`, and its metered row. */
      const embedded = async (usage: Record<string, number>) => {
        upstream.script("embed", { usage: odd(usage) });
        const { data, response } = await sdk().embeddings.create({ model: "embed", input: "Hello world" }).withResponse();
        return { shown: data.usage, m: await meteredRow(response) };
      };

      test("embeddings: a fraction rounds up, a negative count is estimated", async () => {
        const { shown, m } = await embedded({ prompt_tokens: 7.2, total_tokens: 7.2 });
        expect(shown).toEqual({ prompt_tokens: 8, total_tokens: 8 });
        expect(m.usage?.inputTokens).toBe(8n);
        expect(m).toMatchObject({ usageEstimated: false, costNanos: 8n * 2_500n });

        const { m: estimated } = await embedded({ prompt_tokens: -1, total_tokens: -1 });
        expect(estimated.usage?.inputTokens).toBe(2n);
        expect(estimated.usageEstimated).toBe(true);
      });

      test("embeddings whose upstream counts only total_tokens (Voyage AI's usage) are metered at it, not counted", async () => {
        const { shown, m } = await embedded({ total_tokens: 9 });
        expect(shown).toEqual({ prompt_tokens: 9, total_tokens: 9 });
        expect(m.usage?.inputTokens).toBe(9n);
        expect(m).toMatchObject({ usageEstimated: false, costNanos: 9n * 2_500n });
      });
    });

    describe("upstream failures seen by the client", () => {
      const contextLength = {
        message:
          "This model's maximum context length is 128000 tokens. However, your messages resulted in 130412 tokens.",
        type: "invalid_request_error",
        param: "messages",
        code: "context_length_exceeded",
      };

      const vllmContextLength = {
        message: "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens (key sk-proj-a1b2c3d4e5f6g7h8i9j0k1l2).",
        type: "BadRequestError",
        code: 400,
      };
      const streamedRefusals: Array<[string, unknown, { type: string; code: string; param: string | null }]> = [
        ["vLLM's", { error: vllmContextLength }, { type: "BadRequestError", code: "upstream_rejected", param: null }],
        ["OpenAI's", { error: contextLength }, { type: "invalid_request_error", code: "context_length_exceeded", param: "messages" }],
      ];

      test.each(streamedRefusals)(
        "a stream whose first event is an error naming the request's fault (%s) is a refusal: no retry, fallback or breaker failure",
        async (_, event, expected) => {
          upstream.script("refused-stream-primary", { firstEvent: event });
          // More than a breaker's threshold of them: each still reaches the first target.
          for (let i = 0; i < 6; i++) {
            const e = await apiError(sdk().chat.completions.create({ model: "refused-stream", messages: hello, stream: true }));
            expectShape(e, 400, expected.code, expected.type);
            expect(e.param).toBe(expected.param);
            expect(e.message).toContain("maximum context length");
            expect(e.message).not.toContain("a1b2c3d4e5f6");
            const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
            expect(m).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 400, retries: 0, fallbackUsed: false });
            expect(m.costNanos).toBe(0n);
          }
          expect(upstream.seen("refused-stream-primary")).toHaveLength(6);
          expect(upstream.seen("refused-stream-secondary")).toHaveLength(0);
        },
      );

      test("the same error event mid-stream reaches the SDK as the refusal it is and fails no target", async () => {
        upstream.script("refused-stream-primary", { content: "one two three", midEvent: { error: contextLength } });
        for (let i = 0; i < 6; i++) {
          const stream = await sdk().chat.completions.create({ model: "refused-stream", messages: hello, stream: true });
          let content = "";
          const e = await apiError(
            (async () => {
              for await (const chunk of stream) content += chunk.choices[0]?.delta.content ?? "";
            })(),
          );
          expect(content).toBe("one");
          expect(e.error).toEqual(contextLength);
          const m = gateway.shipper.rows.at(-1);
          expect(m).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 400, errorCode: "context_length_exceeded" });
        }
        expect(upstream.seen("refused-stream-primary")).toHaveLength(6);
        expect(upstream.seen("refused-stream-secondary")).toHaveLength(0);
      });

      test("an upstream's refusal reaches the SDK with the upstream's status, message, type, param and code", async () => {
        upstream.script("rejecting", { status: 400, error: contextLength });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expectShape(e, 400, "context_length_exceeded", "invalid_request_error");
        expect(e.error).toEqual(contextLength);
        expect(e.param).toBe("messages");
        const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
        expect(m).toMatchObject({
          status: RequestStatus.INVALID_REQUEST,
          httpStatus: 400,
          errorCode: "context_length_exceeded",
        });

        const temperature = {
          message: "Invalid 'temperature': decimal above maximum value.",
          type: "invalid_request_error",
          param: "temperature",
          code: "decimal_above_max_value",
        };
        upstream.script("rejecting", { status: 422, error: temperature });
        const streamed = await apiError(
          sdk().chat.completions.create({ model: "rejecting", messages: hello, temperature: 1.5, stream: true }),
        );
        expectShape(streamed, 422, "decimal_above_max_value", "invalid_request_error");
        expect(streamed.error).toEqual(temperature);
        expect(upstream.seen("rejecting")).toHaveLength(2);

        // No OpenAI error body: the gateway's code, and none of the upstream's text.
        upstream.script("rejecting", { status: 400, error: "<html><body>Bad Request</body></html>" });
        const bare = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expectShape(bare, 400, "upstream_rejected", "invalid_request_error");
        expect(bare.message).not.toContain("html");
      });

      test("an upstream's refusal in plain text passes its words on, redacted and bounded", async () => {
        const words = "context too long for this model, sent with Bearer sk-abcdefghijklmnopqrstuvwxyz0123 and more";
        upstream.script("rejecting", { status: 400, error: `${words} ${"x".repeat(1000)}` });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expectShape(e, 400, "upstream_rejected", "invalid_request_error");
        const { message } = e.error as { message: string };
        expect(message).toStartWith("context too long for this model, sent with [redacted] and more xxx");
        expect(message).toHaveLength(500);
      });

      test("Azure's content filter refusal keeps its innererror with the filter's results", async () => {
        const filtered = {
          message: "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
          type: null,
          param: "prompt",
          code: "content_filter",
          innererror: {
            code: "ResponsibleAIPolicyViolation",
            content_filter_result: { hate: { filtered: true, severity: "high" }, jailbreak: { filtered: false, detected: false } },
          },
        };
        upstream.script("rejecting", { status: 400, error: filtered });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expect([e.status, e.code, e.param]).toEqual([400, "content_filter", "prompt"]);
        expect((e.error as { innererror?: unknown }).innererror).toEqual(filtered.innererror);
      });

      test("a refusal passed on names no OpenAI organization or project of the gateway's", async () => {
        const message = (where: string) =>
          `Request too large for gpt-4o in organization ${where} on tokens per min (TPM): Limit 30000, ` +
          "Requested 50000. The input or output tokens must be reduced.";
        const ids = "org-AbC123xyzDEF456 (project proj_Q1w2E3r4T5y6)";
        upstream.script("rejecting", { status: 429, error: { message: message(ids), type: "tokens", code: "rate_limit_exceeded" } });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expectShape(e, 429, "rate_limit_exceeded", "tokens");
        expect(e.error).toMatchObject({ message: message("[redacted] (project [redacted])") });
      });

      test("a refusal passed on names no Groq organization of the gateway's", async () => {
        const message = (where: string) =>
          `Request too large for model \`llama-3.1-8b-instant\` in organization \`${where}\` service tier \`on_demand\` on ` +
          "tokens per minute (TPM): Limit 6000, Requested 9000, please reduce your message size and try again.";
        upstream.script("rejecting", {
          status: 413,
          error: { message: message("org_01htjxws48fm0rbbg5gnkgmbrh"), type: "tokens", code: "rate_limit_exceeded" },
        });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expectShape(e, 413, "rate_limit_exceeded", "tokens");
        expect(e.error).toMatchObject({ message: message("[redacted]") });
        // A word of the client's that begins the same way is the client's own.
        const tool = "Invalid schema for function 'org_lookupuser': 'object' is not valid.";
        upstream.script("rejecting", { status: 400, error: { message: tool, type: "invalid_request_error", code: null } });
        const own = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello }));
        expect(own.error).toMatchObject({ message: tool });
      });

      test("a FastAPI-style 422 passes on where and why its validation failed", async () => {
        upstream.script("rejecting", { rejectsField: "temperature" });
        const e = await apiError(sdk().chat.completions.create({ model: "rejecting", messages: hello, temperature: 0.5 }));
        expectShape(e, 422, "upstream_rejected", "invalid_request_error");
        expect(e.error).toMatchObject({ message: "body.temperature: extra fields not permitted" });
      });

      test("an upstream's 413 is the client's 413, and never opens the breaker", async () => {
        upstream.script("too-large", { status: 413, error: "<html><body>413 Request Entity Too Large</body></html>" });
        for (let i = 0; i < 6; i++) {
          const e = await apiError(sdk().chat.completions.create({ model: "too-large", messages: hello }));
          expectShape(e, 413, "request_too_large", "invalid_request_error");
        }
        upstream.script("too-large", {});
        const completion = await sdk().chat.completions.create({ model: "too-large", messages: hello });
        expect(completion.model).toBe("too-large-fake");
        expect(upstream.seen("too-large")).toHaveLength(7);
      });

      test("OpenRouter's 403 for an input its moderation flagged is the client's refusal, and never opens the breaker", async () => {
        const flagged = {
          message: 'openai/gpt-4o requires moderation on Azure. Your input was flagged for "violence". No credits were charged.',
          code: 403,
          metadata: { reasons: ["violence"], flagged_input: "...", provider_name: "Azure", model_slug: "openai/gpt-4o" },
        };
        // Without the fake's default type: OpenRouter's error has none.
        upstream.script("moderated", { status: 403, error: { ...flagged, type: undefined } as never });
        // More than the breaker's threshold of them in a row, whole and streamed.
        for (let i = 0; i < 6; i++) {
          const e = await apiError(sdk().chat.completions.create({ model: "moderated", messages: hello, stream: i % 2 === 1 }));
          expectShape(e, 403, "upstream_rejected", "invalid_request_error");
          expect(e.error).toMatchObject({ message: flagged.message, param: null });
          const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
          expect(m).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 403, retries: 0 });
        }
        upstream.script("moderated", {});
        const completion = await sdk().chat.completions.create({ model: "moderated", messages: hello });
        expect(completion.model).toBe("moderated-fake");
        expect(upstream.seen("moderated")).toHaveLength(7);
      });

      test("a 404 naming the request's model (a chat call to an embedding model) is the client's; the breaker stays closed", async () => {
        const notChat = {
          message: "This is not a chat model and thus not supported in the v1/chat/completions endpoint. Did you mean to use v1/completions?",
          type: "invalid_request_error",
          param: "model",
          code: null,
        };
        upstream.script("embedder", { status: 404, error: notChat });
        // More than the breaker's threshold of them in a row.
        for (let i = 0; i < 6; i++) {
          const e = await apiError(sdk().chat.completions.create({ model: "embedder", messages: hello }));
          expectShape(e, 404, "upstream_rejected", "invalid_request_error");
          expect(e.error).toMatchObject({ message: notChat.message, param: "model" });
        }
        expect(upstream.seen("embedder")).toHaveLength(6);
        // Embeddings calls to the same target are still served.
        upstream.script("embedder", {});
        const embedded = await sdk().embeddings.create({ model: "embedder", input: "alpha" });
        expect(embedded.data).toHaveLength(1);
      });

      test("OpenAI's 403 for embeddings of a chat model is the client's; the breaker stays closed for chat", async () => {
        const notEmbedding = {
          message: "You are not allowed to generate embeddings from this model",
          type: "invalid_request_error",
          param: null,
          code: null,
        };
        upstream.script("chatter", { status: 403, error: notEmbedding });
        // More than the breaker's threshold of them in a row.
        for (let i = 0; i < 6; i++) {
          const e = await apiError(sdk().embeddings.create({ model: "chatter", input: "alpha" }));
          expectShape(e, 403, "upstream_rejected", "invalid_request_error");
          expect(e.error).toMatchObject({ message: notEmbedding.message });
          const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
          expect(m).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 403, retries: 0 });
        }
        expect(upstream.seen("chatter")).toHaveLength(6);
        // Chat calls to the same target are still served.
        upstream.script("chatter", {});
        const completion = await sdk().chat.completions.create({ model: "chatter", messages: hello });
        expect(completion.model).toBe("chatter-fake");
      });

      test("a chat call to a model configured for embeddings only is refused without reaching the upstream", async () => {
        upstream.script("embeddings-only", {});
        const e = await apiError(sdk().chat.completions.create({ model: "embeddings-only", messages: hello }));
        expectShape(e, 404, "model_not_supported", "invalid_request_error");
        expect(e.error).toMatchObject({ message: "The model `embeddings-only` does not serve chat completions.", param: "model" });
        const stream = await apiError(sdk().chat.completions.create({ model: "embeddings-only", messages: hello, stream: true }));
        expectShape(stream, 404, "model_not_supported");
        expect(upstream.seen("embeddings-only")).toHaveLength(0);
        const embedded = await sdk().embeddings.create({ model: "embeddings-only", input: "alpha" });
        expect(embedded.data).toHaveLength(1);
      });

      test("a 404 that names no parameter (a wrong base path's page) is the target's: it falls back", async () => {
        upstream.script("misrouted-primary", { status: 404, error: "<html><body>404 Not Found</body></html>" });
        upstream.script("misrouted-secondary", {});
        const completion = await sdk().chat.completions.create({ model: "misrouted", messages: hello });
        expect(completion.model).toBe("misrouted-secondary-fake");
      });

      test("Azure's 400 for what its api-version does not offer is the target's: it falls back; alone, the gateway's or, for a feature, the client's", async () => {
        const azure = (message: string) => ({ status: 400, error: { message, type: null, code: "BadRequest" } });
        const unsupported = azure("API version not supported");
        const model = azure("Model o4-mini is enabled only for api versions 2024-12-01-preview and later");
        const feature = azure("response_format value as json_schema is enabled only for api versions 2024-08-01-preview and later");
        upstream.script("api-version-secondary", {});
        for (const refusal of [unsupported, model, feature]) {
          upstream.script("api-version-primary", refusal);
          const served = await sdk().chat.completions.create({ model: "api-version", messages: hello });
          expect(served.model).toBe("api-version-secondary-fake");
        }
        // The api-version (or the model deployed) is the operator's to change: no target left, a 502, as for a bad key.
        upstream.script("api-version-primary", model);
        upstream.script("api-version-secondary", model);
        const e = await apiError(sdk().chat.completions.create({ model: "api-version", messages: hello }));
        expectShape(e, 502, "upstream_error");
        expect(e.message).not.toContain("2024-12-01-preview");
        // A feature no target offers is the client's to do without, in the upstream's words; its refusals open no
        // target's breaker for other requests.
        upstream.reset();
        upstream.script("api-version-primary", feature);
        upstream.script("api-version-secondary", feature);
        for (let i = 0; i < 6; i++) {
          const refused = await apiError(sdk().chat.completions.create({ model: "api-version", messages: hello }));
          expectShape(refused, 400, "BadRequest");
          expect(refused.error).toMatchObject({ message: feature.error.message });
        }
        upstream.script("api-version-primary", {});
        const served = await sdk().chat.completions.create({ model: "api-version", messages: hello });
        expect(served.model).toBe("api-version-primary-fake");
      });

      test("a prompt over a target's whole TPM limit (its 429) falls back without retry, hold or breaker; alone it is the client's", async () => {
        const tooLarge = {
          message:
            "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.",
          type: "tokens",
          param: null,
          code: "rate_limit_exceeded",
        };
        upstream.script("tpm", { status: 429, error: tooLarge });
        // The limit is the account's: another target, on another account, takes the prompt, each time.
        for (let i = 0; i < 6; i++) {
          const served = await sdk().chat.completions.create({ model: "tpm", messages: hello });
          expect(served.model).toBe("tpm-fallback-fake");
        }
        expect(upstream.seen("tpm")).toHaveLength(6);
        expect(upstream.seen("tpm-fallback")).toHaveLength(6);
        // When no target takes it, the client gets the refusal as its own, once from each.
        upstream.script("tpm-fallback", { status: 429, error: tooLarge });
        for (let i = 0; i < 6; i++) {
          const e = await apiError(sdk().chat.completions.create({ model: "tpm", messages: hello }));
          expectShape(e, 429, "rate_limit_exceeded", "tokens");
          expect(e.error).toEqual(tooLarge);
          expect(e.headers?.get("retry-after")).toBeNull();
          expect(e.headers?.get("x-should-retry")).toBe("false");
        }
        expect(upstream.seen("tpm")).toHaveLength(12);
        expect(upstream.seen("tpm-fallback")).toHaveLength(12);
        expect(gateway.shipper.rows.at(-1)).toMatchObject({
          status: RequestStatus.INVALID_REQUEST,
          httpStatus: 429,
          errorCode: "rate_limit_exceeded",
        });
        // Another client's prompt that fits is served by the same target.
        upstream.script("tpm", {});
        const served = await sdk().chat.completions.create({ model: "tpm", messages: hello });
        expect(served.model).toBe("tpm-fake");
      });

      test("Groq's 413 for a prompt over its whole TPM limit falls back as OpenAI's 429 does; an upstream's other 413 does not", async () => {
        const tooLarge = {
          message:
            "Request too large for model `llama-3.1-8b-instant` in organization `[redacted]` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 9000, please reduce your message size and try again.",
          type: "tokens",
          param: null,
          code: "rate_limit_exceeded",
        };
        upstream.script("tpm", { status: 413, error: tooLarge });
        for (let i = 0; i < 6; i++) {
          const served = await sdk().chat.completions.create({ model: "tpm", messages: hello });
          expect(served.model).toBe("tpm-fallback-fake");
        }
        expect(upstream.seen("tpm")).toHaveLength(6);
        // No target takes it: the client gets the refusal with its status, metered as its own.
        upstream.script("tpm-fallback", { status: 413, error: tooLarge });
        const e = await apiError(sdk().chat.completions.create({ model: "tpm", messages: hello }));
        expectShape(e, 413, "rate_limit_exceeded", "tokens");
        expect(upstream.seen("tpm-fallback")).toHaveLength(7);
        expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 413 });
        // A body too large for the upstream itself is too large for every target: no fallback.
        upstream.script("tpm", { status: 413, error: { message: "Request Entity Too Large", type: "invalid_request_error", code: null } });
        const big = await apiError(sdk().chat.completions.create({ model: "tpm", messages: hello }));
        expect(big.status).toBe(413);
        expect(upstream.seen("tpm-fallback")).toHaveLength(7);
      });

      test("an upstream out of quota is not retried but falls back; alone the client gets 502, not a 429 to retry", async () => {
        const quota = {
          status: 429,
          retryAfter: "1",
          error: {
            message: "You exceeded your current quota, please check your plan and billing details.",
            type: "insufficient_quota",
            code: "insufficient_quota",
          },
        };
        upstream.script("quota-primary", quota);
        const served = await sdk().chat.completions.create({ model: "quota-fallback", messages: hello });
        expect(served.model).toBe("quota-secondary-fake");
        expect(upstream.seen("quota-primary")).toHaveLength(1);

        upstream.script("quota", quota);
        const e = await apiError(sdk().chat.completions.create({ model: "quota", messages: hello }));
        expectShape(e, 502, "upstream_quota_exceeded", "api_error");
        expect(e.message).not.toContain("billing details");
        expect(e.headers?.get("retry-after")).toBeNull();
        expect(upstream.seen("quota")).toHaveLength(1);
        expect(gateway.shipper.rows.at(-1)).toMatchObject({
          status: RequestStatus.UPSTREAM_ERROR,
          httpStatus: 502,
          errorCode: "upstream_quota_exceeded",
        });
      });

      test("messages of gateway-side failures say what failed; key variables, URLs and upstream text go only to the log", async () => {
        const keyless = await apiError(sdk().chat.completions.create({ model: "keyless", messages: hello }));
        expectShape(keyless, 502, "upstream_error", "api_error");
        expect(keyless.message).toContain("The upstream of `keyless` is not configured.");
        const requestId = keyless.headers?.get("x-request-id") ?? "";
        expect(gateway.log.lines.some((line) => line.includes(requestId) && line.includes("FAKE_UPSTREAM_KEY"))).toBe(
          true,
        );

        upstream.script("throttled", {
          status: 429,
          error: { message: "Rate limit reached for org-secret on requests per min." },
        });
        upstream.script("failing", { status: 503, error: { message: "upstream connect error at 10.0.0.7" } });
        upstream.script("garbled", { content: "first second third", malformed: true });
        upstream.script("slow", { hang: true });
        const failures = [
          keyless,
          await apiError(sdk().chat.completions.create({ model: "throttled", messages: hello })),
          await apiError(sdk().chat.completions.create({ model: "failing", messages: hello })),
          await apiError(sdk().chat.completions.create({ model: "failing", messages: hello, stream: true })),
          await apiError(
            (async () => {
              for await (const _ of await sdk().chat.completions.create({
                model: "garbled",
                messages: hello,
                stream: true,
              }));
            })(),
          ),
          await apiError(sdk().chat.completions.create({ model: "slow", messages: hello })),
        ];
        expect(failures.map((e) => e.code)).toEqual([
          "upstream_error",
          "upstream_rate_limited",
          "upstream_error",
          "upstream_error",
          "upstream_error",
          "upstream_timeout",
        ]);
        for (const e of failures) {
          for (const leak of [
            "FAKE_UPSTREAM_KEY",
            "fake",
            "keyless:",
            "127.0.0.1",
            "scripted",
            "org-secret",
            "10.0.0.7",
            "JSON",
          ]) {
            expect(e.message).not.toContain(leak);
          }
        }
      });
    });

    describe("routing seen from outside", () => {
      test("a failing first target falls back to the next", async () => {
        upstream.script("fallback-primary", { status: 500 });
        const { data, response } = await sdk()
          .chat.completions.create({ model: "fallback", messages: hello })
          .withResponse();
        expect(data.model).toBe("fallback-secondary-fake");
        expect(upstream.seen("fallback-primary").length).toBeGreaterThanOrEqual(1);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({
          status: RequestStatus.OK,
          fallbackUsed: true,
          servedModel: "fallback-secondary-fake",
        });
      });

      test("a target that keeps failing is skipped for a while (circuit breaker)", async () => {
        upstream.script("breaker-primary", { status: 500 });
        for (let i = 0; i < 20; i++) {
          const completion = await sdk().chat.completions.create({ model: "breaker", messages: hello });
          expect(completion.model).toBe("mock-echo-1");
        }
        expect(upstream.seen("breaker-primary").length).toBeLessThan(20);
      });

      test("a target that keeps answering 429 is held for longer each time and probed by one request at a time", async () => {
        upstream.script("briefly-throttled", { status: 429, retryAfterMs: "250", error: { message: "Rate limit reached", code: "rate_limit_exceeded" } });
        // Twenty clients retrying at once for 1.5 s: the first of them reach it; then, after a hold of a second, one.
        const stopAt = Date.now() + 1_500;
        const answers: APIError[] = [];
        const client = async () => {
          while (Date.now() < stopAt) {
            answers.push(await apiError(sdk().chat.completions.create({ model: "briefly-throttled", messages: hello })));
            await Bun.sleep(20);
          }
        };
        await Promise.all(Array.from({ length: 20 }, client));
        const seen = upstream.seen("briefly-throttled").map((r) => r.at);
        const firstHeld = (seen[0] as number) + 900;
        expect(seen.filter((at) => at < firstHeld).length).toBeLessThanOrEqual(20);
        expect(seen.filter((at) => at >= firstHeld)).toHaveLength(1);
        for (const e of answers) expectShape(e, 429, "upstream_rate_limited", "rate_limit_error");
        expect(answers.length).toBeGreaterThan(seen.length * 5);
        // Every answer says when to come back: the upstream's wait, or what is left of the hold.
        expect(new Set(answers.map((e) => e.headers?.get("retry-after")))).toEqual(new Set(["1", "2"]));
        // The probe's 429 held it for two seconds more; after them the next request is the probe that it serves.
        upstream.script("briefly-throttled", {});
        const served = await eventually(() => sdk().chat.completions.create({ model: "briefly-throttled", messages: hello }).catch(() => undefined));
        expect(served.model).toBe("briefly-throttled-fake");
        expect(upstream.seen("briefly-throttled")).toHaveLength(seen.length + 1);
        expect((upstream.seen("briefly-throttled").at(-1)?.at as number) - (seen.at(-1) as number)).toBeGreaterThan(1_900);
      });

      test("a rate limit an upstream sends in its stream after its 200 (as OpenRouter does) is its 429, not a failure", async () => {
        // OpenRouter's shape and OpenAI's codes, as proxies relay them once they have answered 200.
        const limits = [
          { error: { code: 429, message: "Rate limit exceeded: free-models-per-min." } },
          { error: { message: "Rate limit reached for gpt-4o on tokens per min (TPM).", type: "tokens", code: "rate_limit_exceeded" } },
        ];
        for (const limit of limits) {
          upstream.script("stream-throttled", { firstEvent: limit });
          // More than the breaker's five failures in a row: rate limits hold the target briefly, never open its breaker.
          for (let i = 0; i < 6; i++) {
            const e = await apiError(sdk().chat.completions.create({ model: "stream-throttled", messages: hello, stream: true }));
            expectShape(e, 429, "upstream_rate_limited", "rate_limit_error");
            expect(e.headers?.get("x-should-retry")).toBeNull();
          }
          upstream.script("stream-throttled", {});
          // Served again once the hold of a second or two is over, not after a breaker's 30 s.
          const served = await eventually(
            async () => {
              const stream = await sdk().chat.completions.create({ model: "stream-throttled", messages: hello, stream: true });
              let content = "";
              for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? "";
              return content;
            },
            { timeoutMs: 5_000, intervalMs: 250 },
          );
          expect(served).toBe("echo: hello there friend");
        }
      });

      test("one request's 429 holds no other back: the next is sent and served", async () => {
        const tpm = "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 12000, Requested 20000. Please try again in 4s.";
        upstream.script("throttled-once", { status: 429, retryAfter: "4", error: { message: tpm, type: "tokens", code: "rate_limit_exceeded" } }, {});
        const e = await apiError(sdk().chat.completions.create({ model: "throttled-once", messages: hello }));
        expectShape(e, 429, "upstream_rate_limited", "rate_limit_error");
        expect(e.headers?.get("retry-after")).toBe("4");
        const served = await sdk().chat.completions.create({ model: "throttled-once", messages: [{ role: "user", content: "hi" }] });
        expect(served.model).toBe("throttled-once-fake");
        expect(upstream.seen("throttled-once")).toHaveLength(2);
      });

      // Failures of a stream before its first chunk: a proxy's 200 with a JSON error, an error event first (as
      // OpenRouter sends them), a prefill longer than the target's timeout; after Azure's chunk of prompt filter
      // results alone, which no choice has begun.
      const overloaded = { error: { message: "provider overloaded", type: "server_error" } };
      const failedBeforeFirstChunk: Array<[string, Behaviour]> = [
        ["a 200 with an error body", { status: 200 }],
        ["an error event first", { firstEvent: overloaded }],
        ["no first chunk within the timeout", { firstChunkDelayMs: 1000 }],
        ["an error event after Azure's prompt filter results", { promptFilterChunk: true, firstEvent: overloaded }],
        ["no chunk within the timeout after Azure's prompt filter results", { promptFilterChunk: true, firstChunkDelayMs: 1000 }],
      ];

      test.each(failedBeforeFirstChunk)("a stream failing before its first chunk (%s) falls back to the next target", async (_, failure) => {
        upstream.script("stream-primary", failure);
        const { data: stream, response } = await sdk()
          .chat.completions.create({ model: "stream-fallback", messages: hello, stream: true, stream_options: { include_usage: true } })
          .withResponse();
        const served = new Set<string>();
        let usage: OpenAI.CompletionUsage | undefined;
        for await (const chunk of stream) {
          served.add(chunk.model);
          usage = chunk.usage ?? usage;
        }
        expect([...served]).toEqual(["stream-secondary-fake"]);
        expect(upstream.seen("stream-primary")).toHaveLength(1);
        const m = await gateway.row(response.headers.get("x-request-id") ?? "");
        expect(m).toMatchObject({ status: RequestStatus.OK, fallbackUsed: true, servedModel: "stream-secondary-fake" });
        // Billed for the answer the client got, at $1 per million tokens, and for the prompt the first upstream was
        // sent when the time limit cut it off ("hello there friend" framed as a user message: 10 tokens), which the
        // usage the client is shown counts too.
        const lost = failure.firstChunkDelayMs !== undefined ? 10 : 0;
        expect(usage?.prompt_tokens).toBe(fakePromptTokens + lost);
        expect(m.usage?.inputTokens).toBe(BigInt(fakePromptTokens + lost));
        expect(m.costNanos).toBe(BigInt(((usage?.prompt_tokens ?? 0) + (usage?.completion_tokens ?? 0)) * 1000));
        expect(m.usageEstimated).toBe(lost > 0);
      });

      test.each(failedBeforeFirstChunk)("a stream failing before its first chunk (%s) on its only target is an HTTP error", async (_, failure) => {
        upstream.script("stream-alone", failure);
        const e = await apiError(sdk().chat.completions.create({ model: "stream-alone", messages: hello, stream: true }));
        const timedOut = failure.firstChunkDelayMs !== undefined;
        expect([e.status, e.code]).toEqual(timedOut ? [504, "upstream_timeout"] : [502, "upstream_error"]);
        const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
        // The upstream answered nothing: only a prompt cut off by the time limit is billed, as it is for whole ones.
        expect(m.status).toBe(timedOut ? RequestStatus.TIMEOUT : RequestStatus.UPSTREAM_ERROR);
        if (timedOut) expect(m.costNanos).toBeGreaterThan(0n);
        else expect(m.costNanos).toBe(0n);
        // The error says what it cost, as an answer does; one that cost nothing carries no header.
        expect(e.headers?.get("x-gateway-cost-nanos") ?? null).toBe(timedOut ? String(m.costNanos) : null);
      });

      test.each(lostRows)(
        "a 200 of %s bills its prompt on top of a fallback's answer only if a model had it",
        async (_, behaviour, stream, taken, i) => {
          upstream.script(`lost-${i}-primary`, behaviour);
          const request = { model: `lost-${i}`, messages: hello };
          let usage: OpenAI.CompletionUsage | undefined;
          let response: Response;
          if (stream) {
            const answer = await sdk()
              .chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } })
              .withResponse();
            for await (const chunk of answer.data) usage = chunk.usage ?? usage;
            response = answer.response;
          } else {
            const answer = await sdk().chat.completions.create(request).withResponse();
            usage = answer.data.usage;
            response = answer.response;
          }
          const m = await gateway.row(response.headers.get("x-request-id") ?? "");
          expect(upstream.seen(`lost-${i}-primary`)).toHaveLength(2);
          expect(m).toMatchObject({ status: RequestStatus.OK, fallbackUsed: true, servedModel: `lost-${i}-secondary-fake` });
          // Each of the two attempts a model had adds the prompt, 10 tokens at $1 per million, to what is metered and
          // to the usage the client is shown.
          const lost = taken ? 2 * 10 : 0;
          expect(usage?.prompt_tokens).toBe(fakePromptTokens + lost);
          expect(m.usage?.inputTokens).toBe(BigInt(fakePromptTokens + lost));
          expect(m.costNanos).toBe(BigInt(((usage?.prompt_tokens ?? 0) + (usage?.completion_tokens ?? 0)) * 1000));
          expect(m.usageEstimated).toBe(taken);
        },
      );

      test.each(lostRows)(
        "a 200 of %s on every target is a 502 that bills its prompts only if a model had them",
        async (_, behaviour, stream, taken, i) => {
          upstream.script(`lost-${i}-primary`, behaviour);
          upstream.script(`lost-${i}-secondary`, behaviour);
          const e = await apiError(
            (async () => {
              const answer = await sdk().chat.completions.create({ model: `lost-${i}`, messages: hello, stream });
              if (stream) for await (const _ of answer as AsyncIterable<unknown>);
            })(),
          );
          expect([e.status, e.code]).toEqual([502, "upstream_error"]);
          expect(upstream.seen(`lost-${i}-secondary`)).toHaveLength(2);
          const m = await gateway.row(e.headers?.get("x-request-id") ?? "");
          // Four attempts, each 10 tokens of prompt at $1 per million when a model had it.
          expect(m.usage?.inputTokens ?? 0n).toBe(taken ? 40n : 0n);
          expect(m.costNanos).toBe(taken ? 40_000n : 0n);
          expect(e.headers?.get("x-gateway-cost-nanos") ?? null).toBe(taken ? "40000" : null);
        },
      );

      test("a target whose streams keep failing mid-stream is skipped for a while too", async () => {
        upstream.script("stream-breaker-primary", { content: "one two three", malformed: true });
        const served: string[] = [];
        for (let i = 0; i < 20; i++) {
          const stream = await sdk().chat.completions.create({ model: "stream-breaker", messages: hello, stream: true });
          try {
            for await (const chunk of stream) served.push(chunk.model);
          } catch {
            // The broken ones end with an error event.
          }
        }
        expect(upstream.seen("stream-breaker-primary").length).toBeLessThan(20);
        expect(served).toContain("mock-echo-1");
      });
    });
  });
}
