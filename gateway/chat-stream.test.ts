import { describe, expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { trace } from "@opentelemetry/api";
import { RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { parseGatewayConfig } from "./config.ts";
import { meterChatStream } from "./chat-stream.ts";
import { type Call, createGatewayCore } from "./core.ts";
import type { GatewayError } from "./errors.ts";
import { createRestApp } from "./http/app.ts";
import { createProviders } from "./providers/index.ts";
import { type ChatCompletionChunk, type ChunkStream, UpstreamError } from "./providers/provider.ts";
import { createBillingFake, createRecordingShipper, createTestLogger, mockRoutes } from "./testing.ts";
import { countTextTokens } from "./tokenizer.ts";

// Every finished request is exactly one RequestMetrics, also when its stream is never read.
function setup() {
  const billing = createBillingFake({ "sk-good": { id: "key_good", orgId: "org_1" } });
  const shipper = createRecordingShipper();
  const config = parseGatewayConfig(
    `${mockRoutes}  - name: brief
    targets: [{ provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    request_timeout_ms: 50
`,
    "chat-stream.yaml",
  );
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, {}),
    keys: createKeyAuthorizer({ billing: billing.client }),
    shipper,
    instanceId: "gw-test",
    log: createTestLogger(),
  });
  const open = async (model = "mock", signal?: AbortSignal) => {
    const call = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good", signal);
    const stream = await core.handle(call, () =>
      core.chatStream(call, { model, messages: [{ role: "user", content: "hello there" }], stream: true }),
    );
    return { call, stream };
  };
  /**
   * The metrics row of a request, checked to be its only one after giving any late ones time to arrive. The first row
   * may wait on the tokenizer's first load, seconds on a busy machine.
   */
  const rowOf = async (requestId: string, settleMs = 150) => {
    const deadline = performance.now() + 15_000;
    while (!shipper.rows.some((m) => m.requestId === requestId) && performance.now() < deadline) await Bun.sleep(5);
    await Bun.sleep(settleMs);
    const rows = shipper.rows.filter((m) => m.requestId === requestId);
    expect(rows).toHaveLength(1);
    return rows[0];
  };
  return { core, shipper, open, rowOf };
}

/** A stream of `mock` that its client can leave, and the one metrics row of it. */
async function openMock() {
  const { open, rowOf } = setup();
  const gone = new AbortController();
  const { call, stream } = await open("mock", gone.signal);
  return { stream, leave: () => gone.abort(), row: () => rowOf(call.requestId) };
}

describe("streams that are never iterated", () => {
  test("a client that leaves before the first read is metered once, as cancelled with its input tokens", async () => {
    const { leave, row } = await openMock();
    leave();
    const metered = await row();
    expect(metered).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request", streamed: true });
    expect(metered?.usage?.inputTokens).toBeGreaterThan(0n);
    expect(metered?.usage?.outputTokens).toBe(0n);
  });

  test("a REST client that disconnects before the body is read is metered once", async () => {
    const { core, shipper, rowOf } = setup();
    const app = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 4096 });
    const gone = new AbortController();
    const res = await app.fetch(
      new Request("http://gateway.test/v1/chat/completions", {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "hello there" }], stream: true }),
        signal: gone.signal,
      }),
    );
    expect(res.status).toBe(200);
    gone.abort();
    expect(await rowOf(res.headers.get("x-request-id") ?? "")).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499 });
    expect(shipper.rows).toHaveLength(1);
  });

  test("a stream disposed without being iterated is metered once", async () => {
    const { open, rowOf } = setup();
    const { call, stream } = await open();
    await stream[Symbol.asyncIterator]().return?.();
    expect(await rowOf(call.requestId)).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499 });
    expect(stream.outcome?.error?.code).toBe("client_closed_request");
  });

  test("a stream nobody reads before its whole-request limit is metered once, as timed out", async () => {
    const { open, rowOf } = setup();
    const { call } = await open("brief");
    expect(await rowOf(call.requestId)).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504, errorCode: "request_timeout" });
  });
});

describe("streams are metered exactly once however they end", () => {
  const drain = async (stream: AsyncIterable<unknown>) => {
    try {
      for await (const _ of stream) {
        // read to the end
      }
    } catch (e) {
      return e as GatewayError;
    }
    return undefined;
  };

  test("read to the end, then the client leaves", async () => {
    const { stream, leave, row } = await openMock();
    expect(await drain(stream)).toBeUndefined();
    leave();
    const metered = await row();
    expect(metered).toMatchObject({ status: RequestStatus.OK, httpStatus: 200 });
    expect(metered?.usage?.outputTokens).toBeGreaterThan(0n);
  });

  test("the client leaves, then the stream is read anyway", async () => {
    const { stream, leave, row } = await openMock();
    leave();
    expect((await drain(stream))?.code).toBe("client_closed_request");
    expect((await row())?.status).toBe(RequestStatus.CANCELLED);
  });

  test("the client leaves while its reader holds a chunk and never comes back", async () => {
    const { stream, leave, row } = await openMock();
    const iterator = stream[Symbol.asyncIterator]();
    expect((await iterator.next()).done).toBe(false);
    leave();
    expect((await row())?.status).toBe(RequestStatus.CANCELLED);
  });

  test("the client leaves while holding a chunk, then stops reading", async () => {
    const { stream, leave, row } = await openMock();
    const iterator = stream[Symbol.asyncIterator]();
    expect((await iterator.next()).done).toBe(false);
    leave();
    await iterator.return?.();
    expect((await row())?.status).toBe(RequestStatus.CANCELLED);
  });
});

describe("the call's time on the upstream", () => {
  test("counts every wait for the upstream's next chunk, the one that failed too, and none of the client's reading", async () => {
    const call = { metrics: create(RequestMetricsSchema), upstreamMs: 0, startTick: performance.now(), startMs: Date.now(), requestId: "r" };
    const fields = { id: "c", object: "chat.completion.chunk" as const, created: 1, model: "m" };
    const chunks = async function* () {
      for (const content of ["one", " two", " three"]) {
        await Bun.sleep(40);
        yield { ...fields, choices: [{ index: 0, delta: { content }, finish_reason: null, logprobs: null }] };
      }
      await Bun.sleep(40);
      throw new UpstreamError("transient", "m: the stream broke off");
    };
    const stream = meterChatStream({
      call: call as unknown as Call,
      chunks: chunks() as ChunkStream,
      request: { model: "m", messages: [{ role: "user", content: "x" }] },
      price: { inputMicros: 1n, cachedInputMicros: 1n, outputMicros: 1n, reasoningMicros: 1n },
      includeUsage: false,
      deadline: new AbortController().signal,
      finish() {},
    });
    const started = performance.now();
    let reading = 0;
    const read = async () => {
      for await (const _ of stream) {
        const held = performance.now();
        await Bun.sleep(60);
        reading += performance.now() - held;
      }
    };
    await expect(read()).rejects.toMatchObject({ status: 502 });
    // Four waits of 40 ms on the upstream; the client's 180 ms of reading between them are the gateway's.
    expect(call.upstreamMs).toBeGreaterThanOrEqual(150);
    expect(call.upstreamMs).toBeLessThanOrEqual(performance.now() - started - reading);
  });
});

describe("the usage a client is shown", () => {
  /** Metered for a client that asked for usage, at a nano-USD a token. */
  const streamAskingUsage = (chunks: AsyncIterable<ChatCompletionChunk>) =>
    meterChatStream({
      call: { metrics: create(RequestMetricsSchema), upstreamMs: 0, startTick: performance.now(), startMs: Date.now(), requestId: "r" } as unknown as Call,
      chunks: chunks as ChunkStream,
      request: { model: "m", messages: [{ role: "user", content: "x" }] },
      price: { inputMicros: 1n, cachedInputMicros: 1n, outputMicros: 1n, reasoningMicros: 1n },
      includeUsage: true,
      deadline: new AbortController().signal,
      finish() {},
    });

  test("usage some servers put on the last content chunk comes last, in a chunk of its own, with the metered counts", async () => {
    const chunks = async function* () {
      yield {
        id: "c",
        object: "chat.completion.chunk" as const,
        created: 1,
        model: "m",
        choices: [{ index: 0, delta: { content: "hi" }, finish_reason: "stop" as const, logprobs: null }],
        usage: { prompt_tokens: 3.5, completion_tokens: 1, total_tokens: 4.5 },
      };
    };
    const stream = streamAskingUsage(chunks());
    const seen = [];
    for await (const chunk of stream) seen.push({ choices: chunk.choices.length, usage: chunk.usage });
    expect(seen).toEqual([
      { choices: 1, usage: null },
      { choices: 0, usage: { prompt_tokens: 4, completion_tokens: 1, total_tokens: 5 } },
    ]);
  });

  test("asked for usage, every chunk but the last has a null usage, and the usage chunk the stream's fingerprint and tier", async () => {
    // As vLLM and Ollama stream: no usage field on their chunks, the usage on the finish chunk.
    const fields = { id: "c", object: "chat.completion.chunk" as const, created: 1, model: "m", system_fingerprint: "fp_1", service_tier: "default" as const };
    const chunks = async function* () {
      yield { ...fields, choices: [{ index: 0, delta: { role: "assistant" as const, content: "" }, finish_reason: null, logprobs: null }] };
      yield { ...fields, choices: [{ index: 0, delta: { content: "hi" }, finish_reason: null, logprobs: null }] };
      yield {
        ...fields,
        choices: [{ index: 0, delta: {}, finish_reason: "stop" as const, logprobs: null }],
        usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
      };
    };
    const stream = streamAskingUsage(chunks());
    const seen = [];
    for await (const chunk of stream) seen.push(chunk);
    expect(seen.map((c) => c.usage)).toEqual([null, null, null, { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 }]);
    expect(seen.at(-1)).toMatchObject({ ...fields, choices: [] });
  });

  test("without upstream usage, the choices of a stream of several are counted each as its own text, as a whole answer's", async () => {
    const texts = ["hello 0", "hello 1", "hello 2"];
    const fields = { id: "c", object: "chat.completion.chunk" as const, created: 1, model: "m" };
    // As OpenAI streams n choices: a chunk a choice, their deltas in turn.
    const chunks = async function* () {
      for (const piece of [(t: string) => t.slice(0, 5), (t: string) => " ", (t: string) => t.slice(6)]) {
        for (const [index, text] of texts.entries()) {
          yield { ...fields, choices: [{ index, delta: { content: piece(text) }, finish_reason: null, logprobs: null }] };
        }
      }
      for (const index of texts.keys()) {
        yield { ...fields, choices: [{ index, delta: {}, finish_reason: "stop" as const, logprobs: null }] };
      }
    };
    const stream = meterChatStream({
      call: { metrics: create(RequestMetricsSchema), upstreamMs: 0, startTick: performance.now(), startMs: Date.now(), requestId: "r" } as unknown as Call,
      chunks: chunks() as ChunkStream,
      request: { model: "m", messages: [{ role: "user", content: "x" }], n: 3 },
      price: { inputMicros: 1n, cachedInputMicros: 1n, outputMicros: 1n, reasoningMicros: 1n },
      includeUsage: true,
      deadline: new AbortController().signal,
      finish() {},
    });
    let usage: unknown;
    for await (const chunk of stream) usage ??= chunk.usage ?? undefined;
    const whole = await countTextTokens(texts);
    expect(whole).toBe(9);
    expect(usage).toMatchObject({ completion_tokens: whole });
    expect(stream.outcome?.tokens.outputTokens).toBe(BigInt(whole));
  });
});
