import { describe, expect, test } from "bun:test";
import { trace } from "@opentelemetry/api";
import { Registry } from "prom-client";
import { isValid as isUlid } from "ulid";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { createTestCore } from "../testing.ts";
import type { CreateEmbeddingResponse } from "../providers/provider.ts";
import { createRestApp, embeddingJson } from "./app.ts";

const maxBodyBytes = 4096;

function setup(registry?: Registry) {
  const gateway = createTestCore({ registry });
  const app = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes });
  const call = (path: string, init: RequestInit & { key?: string } = {}) => {
    const headers = new Headers(init.headers);
    if (init.key) headers.set("authorization", `Bearer ${init.key}`);
    return app.fetch(new Request(`http://gateway.test${path}`, { ...init, headers }));
  };
  const chat = (body: unknown, key: string | null = "sk-good") =>
    call("/v1/chat/completions", {
      method: "POST",
      key: key ?? undefined,
      headers: { "content-type": "application/json" },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  return { ...gateway, app, call, chat };
}

const hello = {
  model: "mock",
  messages: [
    { role: "system", content: "be brief" },
    { role: "user", content: "hello there" },
  ],
};

/** The OpenAI error shape, with its status and x-request-id checked. */
async function expectError(res: Response, status: number, code: string, param: string | null = null) {
  expect(res.status).toBe(status);
  expect(res.headers.get("content-type")).toBe("application/json");
  expect(isUlid(res.headers.get("x-request-id") ?? "")).toBe(true);
  const body = (await res.json()) as { error: Record<string, unknown> };
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"]);
  expect(body.error.code).toBe(code);
  expect(body.error.param).toBe(param);
  expect(typeof body.error.message).toBe("string");
  return body.error;
}

/**
 * The lengths of the texts of 10 KB or more that JSON.parse is given while `run` runs: what a request body's parse
 * would show, whatever the machine's speed.
 */
async function countParses(run: () => Promise<void>): Promise<number[]> {
  const parse = JSON.parse;
  const lengths: number[] = [];
  JSON.parse = (text: string, reviver?: Parameters<typeof parse>[1]) => {
    if (typeof text === "string" && text.length >= 10_000) lengths.push(text.length);
    return parse(text, reviver);
  };
  try {
    await run();
  } finally {
    JSON.parse = parse;
  }
  return lengths;
}

describe("REST chat completions", () => {
  test("answers in the OpenAI shape with request id and exact cost headers, and records metrics", async () => {
    const { chat, shipper } = setup();
    const res = await chat({ ...hello, user: "end-user-7", metadata: { team: "search", env: "test" } });
    expect(res.status).toBe(200);
    const requestId = res.headers.get("x-request-id") ?? "";
    expect(isUlid(requestId)).toBe(true);
    // 16 input tokens at $0.50/M + 6 output at $1.50/M = $0.000017
    expect(res.headers.get("x-gateway-cost-nanos")).toBe("17000");
    const body = (await res.json()) as Record<string, any>;
    expect(body.object).toBe("chat.completion");
    expect(body.model).toBe("mock-echo-1");
    expect(body.choices[0].message).toEqual({ role: "assistant", content: "mock reply: hello there", refusal: null });
    expect(body.usage).toEqual({ prompt_tokens: 16, completion_tokens: 6, total_tokens: 22 });

    expect(shipper.rows).toHaveLength(1);
    const m = shipper.rows[0]!;
    expect(m).toMatchObject({
      requestId,
      orgId: "org_1",
      projectId: "proj_1",
      apiKeyId: "key_good",
      endUserId: "end-user-7",
      provider: "mock",
      requestedModel: "mock",
      servedModel: "mock-echo-1",
      endpoint: Endpoint.CHAT_COMPLETIONS,
      streamed: false,
      status: RequestStatus.OK,
      httpStatus: 200,
      errorCode: "",
      costNanos: 17000n,
      retries: 0,
      fallbackUsed: false,
      gatewayInstanceId: "gw-test",
      tags: { team: "search", env: "test" },
    });
    expect(m.usage).toMatchObject({ inputTokens: 16n, cachedInputTokens: 0n, outputTokens: 6n, reasoningTokens: 0n });
    expect(m.startTime).toBeDefined();
    expect(m.endTime).toBeDefined();
    expect(m.totalLatencyUs).toBeGreaterThan(0n);
    expect(m.totalLatencyUs).toBe(m.upstreamLatencyUs + m.gatewayOverheadUs);
  });

  test("a body refused as invalid is metered under the model it names", async () => {
    const { chat, shipper } = setup();
    await expectError(await chat({ ...hello, temperature: 5 }), 400, "decimal_above_max_value", "temperature");
    await expectError(await chat({ ...hello, messages: [] }), 400, "empty_array", "messages");
    expect(shipper.rows.map((m) => [m.requestedModel, m.status])).toEqual([
      [hello.model, RequestStatus.INVALID_REQUEST],
      [hello.model, RequestStatus.INVALID_REQUEST],
    ]);
  });

  test("a model name the client makes up is metered fit for billing, and labels no new metric series", async () => {
    const registry = new Registry();
    const { chat, call, shipper } = setup(registry);
    const odd = `${"é".repeat(150)}\u0000${"x".repeat(100)}`;
    await expectError(await chat({ ...hello, model: odd }), 404, "model_not_found", "model");
    // Echoed cut short: a name of 3,000 characters is not sent back whole.
    const huge = await expectError(await chat({ ...hello, model: "m".repeat(3000) }), 404, "model_not_found", "model");
    expect(huge.message).toBe(`The model \`${"m".repeat(256)}...\` does not exist or you do not have access to it.`);
    await expectError(
      await call(`/v1/models/${encodeURIComponent("nul\u0000model")}`, { key: "sk-good" }),
      404,
      "model_not_found",
      "model",
    );
    for (let i = 0; i < 5; i++) await chat({ ...hello, model: `made-up-${i}` });
    const [long, , nul] = shipper.rows.map((m) => m.requestedModel);
    expect([...(long as string)]).toHaveLength(200);
    expect(long).toStartWith(`${"é".repeat(150)}\ufffd`);
    expect(nul).toBe("nul\ufffdmodel");
    const series = (await registry.getSingleMetric("gateway_requests_total")?.get())?.values ?? [];
    expect(new Set(series.map((v) => v.labels.model))).toEqual(new Set(["unknown"]));
  });

  test("malformed JSON and empty bodies are 400 invalid_json", async () => {
    const { chat, shipper } = setup();
    await expectError(await chat("{not json"), 400, "invalid_json");
    await expectError(await chat(""), 400, "invalid_json");
    // Nesting deeper than an RPC message may, anywhere in the body (here in a field passed upstream), is refused
    // before it is parsed; brackets inside strings do not count.
    const deep = `{"model":"mock","messages":[{"role":"user","content":"${"[".repeat(500)}"}],"x":${"[".repeat(101)}${"]".repeat(101)}}`;
    await expectError(await chat(deep), 400, "invalid_json");
    const fine = await chat(`{"model":"mock","messages":[{"role":"user","content":"${"[{".repeat(300)}"}],"x":${"[".repeat(97)}${"]".repeat(97)}}`);
    expect(fine.status).toBe(200);
    expect(shipper.rows.map((m) => [m.status, m.httpStatus, m.errorCode])).toEqual([
      [RequestStatus.INVALID_REQUEST, 400, "invalid_json"],
      [RequestStatus.INVALID_REQUEST, 400, "invalid_json"],
      [RequestStatus.INVALID_REQUEST, 400, "invalid_json"],
      [RequestStatus.OK, 200, ""],
    ]);
  });

  test("a body of more arrays and objects than any real request holds is refused before it is parsed", async () => {
    // As main.ts wires it: 4 MiB bodies, room for a million empty objects that would take ~75 MB each to parse.
    const gateway = createTestCore();
    const app = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes: 4 * 1024 * 1024 });
    const body = `{"model":"mock","messages":[${Array(1_300_000).fill("{}").join(",")}]}`;
    const post = (text = body) =>
      app.fetch(
        new Request("http://gateway.test/v1/chat/completions", {
          method: "POST",
          headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
          body: text,
        }),
      );
    const parsed = await countParses(async () => {
      Bun.gc(true);
      const before = process.memoryUsage().rss;
      let peak = before;
      const sample = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
      const answers = await Promise.all([post(), post(), post(), post()]);
      clearInterval(sample);
      peak = Math.max(peak, process.memoryUsage().rss);
      // The four bodies themselves are 16 MB.
      expect(peak - before).toBeLessThan(96 * 1024 * 1024);
      for (const res of answers) {
        const error = await expectError(res, 400, "invalid_json");
        expect(error.message).toBe("The JSON body holds more than 100000 arrays, objects and object members.");
      }
    });
    expect(parsed).toEqual([]);
    // A body within the bound is parsed where it is counted.
    const fine = JSON.stringify({ ...hello, x: Array(5000).fill({}) });
    expect(await countParses(async () => expect((await post(fine)).status).toBe(200))).toEqual([fine.length]);
  });

  test("a body of one object with more keys than any real request holds is refused before it is parsed", async () => {
    // 300,000 keys in one object fit in 4 MiB and took the event loop about half a second each to parse.
    const gateway = createTestCore();
    const app = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes: 4 * 1024 * 1024 });
    const post = (body: string) =>
      app.fetch(
        new Request("http://gateway.test/v1/chat/completions", {
          method: "POST",
          headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
          body,
        }),
      );
    const bias = (keys: number) => Array.from({ length: keys }, (_, i) => `"${i}":1`).join(",");
    const body = `{"model":"mock","messages":[{"role":"user","content":"hi"}],"logit_bias":{${bias(300_000)}}}`;
    expect(body.length).toBeLessThan(4 * 1024 * 1024);
    const parsed = await countParses(async () => {
      const error = await expectError(await post(body), 400, "invalid_json");
      expect(error.message).toBe("The JSON body holds more than 100000 arrays, objects and object members.");
    });
    expect(parsed).toEqual([]);
    // Within the bound the same object is parsed (and its logit_bias checked).
    const fine = `{"model":"mock","messages":[{"role":"user","content":"hi"}],"logit_bias":{${bias(5000)}}}`;
    expect(await countParses(async () => void (await post(fine)))).toEqual([fine.length]);
  });

  test("token arrays count as arrays, not as their numbers: 2,048 inputs of 256 tokens are embedded", async () => {
    // An RPC's JSON counts every value, each of which may decode to a message; a REST body's numbers are only numbers.
    const gateway = createTestCore();
    const app = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes: 4 * 1024 * 1024 });
    const input = Array.from({ length: 2048 }, () => Array.from({ length: 256 }, (_, i) => i));
    const res = await app.fetch(
      new Request("http://gateway.test/v1/embeddings", {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", input }),
      }),
    );
    expect(res.status).toBe(200);
    expect(((await res.json()) as { data: unknown[] }).data).toHaveLength(2048);
  });

  test("invalid fields are 400 naming the parameter, and never reach the upstream", async () => {
    const { chat, shipper } = setup();
    await expectError(await chat([1, 2]), 400, "invalid_value");
    await expectError(await chat({ messages: hello.messages }), 400, "missing_required_parameter", "model");
    await expectError(await chat({ model: "mock", messages: [] }), 400, "empty_array", "messages");
    await expectError(
      await chat({ model: "mock", messages: [{ role: "robot", content: "x" }] }),
      400,
      "invalid_value",
      "messages[0].role",
    );
    await expectError(
      await chat({ ...hello, messages: [{ role: "user", content: 5 }] }),
      400,
      "invalid_type",
      "messages[0].content",
    );
    await expectError(await chat({ ...hello, n: 0 }), 400, "integer_below_min_value", "n");
    await expectError(await chat({ ...hello, n: 129 }), 400, "integer_above_max_value", "n");
    await expectError(await chat({ ...hello, stop: ["a", "b", "c", "d", "e"] }), 400, "array_above_max_length", "stop");
    await expectError(await chat({ ...hello, metadata: { k: 1 } }), 400, "invalid_type", "metadata.k");
    await expectError(
      await chat({ ...hello, metadata: { k: "x".repeat(513) } }),
      400,
      "string_above_max_length",
      "metadata.k",
    );
    await expectError(await chat({ ...hello, stream: "yes" }), 400, "invalid_type", "stream");
    await expectError(
      await chat({ ...hello, stream_options: { include_usage: true } }),
      400,
      "invalid_value",
      "stream_options",
    );
    await expectError(
      await chat({ ...hello, stream: true, stream_options: { include_usage: 1 } }),
      400,
      "invalid_type",
      "stream_options.include_usage",
    );
    await expectError(
      await chat({ ...hello, messages: [{ role: "user", content: ["hi"] }] }),
      400,
      "invalid_type",
      "messages[0].content[0]",
    );
    const temperature = await expectError(
      await chat({ ...hello, temperature: 5 }),
      400,
      "decimal_above_max_value",
      "temperature",
    );
    expect(temperature).toMatchObject({
      type: "invalid_request_error",
      message: "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
    });
    await expectError(await chat({ ...hello, tools: "garbage" }), 400, "invalid_type", "tools");
    await expectError(
      await chat({ ...hello, response_format: { type: "bogus" } }),
      400,
      "invalid_value",
      "response_format.type",
    );
    await expectError(
      await chat({ ...hello, messages: [{ role: "user", content: [{ type: "bogus" }] }] }),
      400,
      "invalid_value",
      "messages[0].content[0].type",
    );
    await expectError(await chat({ ...hello, stream: true, top_p: 7 }), 400, "decimal_above_max_value", "top_p");
    expect(
      shipper.rows.every(
        (m) => m.status === RequestStatus.INVALID_REQUEST && m.httpStatus === 400 && m.provider === "",
      ),
    ).toBe(true);
  });

  test("n up to 128: the mock answers every choice, whole or streamed", async () => {
    const { chat } = setup();
    const whole = (await (await chat({ ...hello, n: 128 })).json()) as { choices: Array<{ index: number }> };
    expect(whole.choices.map((c) => c.index)).toEqual(Array.from({ length: 128 }, (_, i) => i));
    const streamed = await (await chat({ ...hello, n: 128, stream: true })).text();
    const finished = streamed
      .split("\n")
      .filter((line) => line.startsWith("data: {") && line.includes('"finish_reason":"stop"'));
    expect(finished).toHaveLength(1);
    expect(finished[0]?.match(/"finish_reason":"stop"/g)).toHaveLength(128);
  });

  test("embeddings the mock would answer with over a million values are a 400 naming dimensions", async () => {
    const { call, shipper } = setup();
    const input = Array.from({ length: 256 }, (_, i) => `${i}`);
    const res = await call("/v1/embeddings", {
      method: "POST",
      key: "sk-good",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "mock", input, dimensions: 65_536 }),
    });
    const error = await expectError(res, 400, "invalid_value", "dimensions");
    expect(error.type).toBe("invalid_request_error");
    expect(shipper.rows[0]).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 400 });
  });

  test("missing and unknown keys are 401; billing down is 503, under the model named; none is shipped", async () => {
    const registry = new Registry();
    const { chat, billing, shipper } = setup(registry);
    const missing = await expectError(await chat(hello, null), 401, "missing_api_key");
    expect(missing.type).toBe("invalid_request_error");
    await expectError(await chat(hello, "sk-wrong"), 401, "invalid_api_key");
    billing.setDown(true);
    await expectError(await chat(hello), 503, "auth_unavailable");
    await expectError(await chat({ ...hello, model: "made-up" }), 503, "auth_unavailable");
    await expectError(await chat("{not json"), 503, "auth_unavailable");
    // Without an accepted key there is no org to bill or show them to: Prometheus alone counts them.
    expect(shipper.rows).toEqual([]);
    const series = (await registry.getSingleMetric("gateway_requests_total")?.get())?.values ?? [];
    const refused = series.filter((v) => v.labels.code !== 200);
    expect(refused.map((v) => [v.labels.model, v.labels.status, v.labels.code, v.value])).toEqual([
      ["unknown", "unauthorized", 401, 2],
      ["mock", "unavailable", 503, 1],
      ["unknown", "unavailable", 503, 2],
    ]);
  });

  test("a model outside the key's allowed models is 403; an unknown model is 404", async () => {
    const { chat, shipper } = setup();
    await expectError(await chat({ ...hello, model: "premium" }, "sk-limited"), 403, "model_not_allowed", "model");
    expect((await chat(hello, "sk-limited")).status).toBe(200);
    await expectError(await chat({ ...hello, model: "gpt-9" }), 404, "model_not_found", "model");
    expect(shipper.rows[0]).toMatchObject({
      status: RequestStatus.UNAUTHORIZED,
      httpStatus: 403,
      apiKeyId: "key_limited",
      requestedModel: "premium",
    });
    expect(shipper.rows[2]).toMatchObject({
      status: RequestStatus.INVALID_REQUEST,
      httpStatus: 404,
      requestedModel: "gpt-9",
    });
  });

  test("bodies over the limit are 413, whether declared or streamed", async () => {
    const { chat, call, shipper } = setup();
    const big = JSON.stringify({ ...hello, user: "x".repeat(maxBodyBytes) });
    await expectError(await chat(big), 413, "request_too_large");
    const chunks = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < 10; i++) controller.enqueue(new TextEncoder().encode(" ".repeat(1000)));
        controller.close();
      },
    });
    const streamed = await call("/v1/chat/completions", { method: "POST", key: "sk-good", body: chunks });
    await expectError(streamed, 413, "request_too_large");
    expect(shipper.rows.map((m) => m.httpStatus)).toEqual([413, 413]);
  });

  test("an upstream that keeps failing is 502 after its retries; a fallback target serves instead", async () => {
    const { chat, shipper, downCalls } = setup();
    const failed = await expectError(await chat({ ...hello, model: "broken" }), 502, "upstream_error");
    expect(failed.type).toBe("api_error");
    // The upstream's own words ("boom") and the provider's name go to the log, not to the client.
    expect(failed.message).toBe("The upstream of `broken` answered HTTP 500.");
    expect(downCalls()).toBe(2);
    expect(shipper.rows[0]).toMatchObject({
      status: RequestStatus.UPSTREAM_ERROR,
      httpStatus: 502,
      provider: "down",
      retries: 1,
      costNanos: 0n,
    });

    const res = await chat({ ...hello, model: "resilient" });
    expect(res.status).toBe(200);
    expect(shipper.rows[1]).toMatchObject({
      status: RequestStatus.OK,
      provider: "mock",
      servedModel: "mock-echo-1",
      fallbackUsed: true,
      retries: 1,
    });
  });

  test("an upstream slower than the model's timeout is 504; a client that leaves is recorded as cancelled", async () => {
    const { app, chat, shipper } = setup();
    await expectError(await chat({ ...hello, model: "slow" }), 504, "upstream_timeout");
    expect(shipper.rows[0]).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504, provider: "slow" });
    expect(shipper.rows[0]!.upstreamLatencyUs).toBeGreaterThanOrEqual(25_000n);

    const gone = new AbortController();
    const pending = app.fetch(
      new Request("http://gateway.test/v1/chat/completions", {
        method: "POST",
        headers: { authorization: "Bearer sk-good" },
        body: JSON.stringify({ ...hello, model: "slow" }),
        signal: gone.signal,
      }),
    );
    setTimeout(() => gone.abort(), 5);
    expect((await pending).status).toBe(499);
    expect(shipper.rows[1]).toMatchObject({
      status: RequestStatus.CANCELLED,
      httpStatus: 499,
      errorCode: "client_closed_request",
    });
  });
});

describe("embeddings answers written in pieces", () => {
  const base64 = (values: number[]) => Buffer.from(Float32Array.from(values).buffer).toString("base64");
  const written = (response: unknown, floats: boolean) =>
    [...embeddingJson(response as CreateEmbeddingResponse, floats)].join("");

  test("print what JSON.stringify prints of the floats, fields and their order as they came", () => {
    const floats = [0.1, -0.5, 1e-7, 3.4e38, -0, 12345.678].map(Math.fround);
    const vector = (embedding: unknown, index: number) => ({ index, embedding, object: "embedding", extra: undefined });
    const answer = (embedding: (i: number) => unknown) => ({
      model: "e",
      object: "list",
      data: [vector(embedding(0), 0), vector(embedding(1), 1), null, "odd"],
      usage: { prompt_tokens: 3, total_tokens: 3 },
      skipped: undefined,
      provider: { data: [] },
    });
    const expected = JSON.stringify(answer(() => floats));
    expect(written(answer(() => base64(floats)), true)).toBe(expected);
    expect(written(answer(() => floats), true)).toBe(expected);
    // Numbers an upstream that ignores encoding_format printed, float32s or not, go as they came.
    expect(written(answer(() => [0.1, 0.2]), true)).toBe(JSON.stringify(answer(() => [0.1, 0.2])));
    // Base64 of bytes that are not whole float32s is left as it came; a float32 that is no number prints as null.
    expect(written(answer(() => "AAA="), true)).toBe(JSON.stringify(answer(() => "AAA=")));
    expect(written(answer(() => base64([Number.NaN, 1])), true)).toBe(JSON.stringify(answer(() => [null, 1])));
    // A client that asked for base64 gets it as it came.
    expect(written(answer(() => base64(floats)), false)).toBe(JSON.stringify(answer(() => base64(floats))));
    expect(written({ object: "list", data: [] }, true)).toBe('{"object":"list","data":[]}');
    expect(written({}, true)).toBe("{}");
    // A field JSON leaves out, first or alone, leaves no separator behind.
    const first = { skipped: undefined, object: "list", data: [{ extra: undefined, index: 0 }, { extra: undefined }] };
    expect(written(first, true)).toBe(JSON.stringify(first));
    expect(written({ skipped: undefined }, true)).toBe("{}");
  });

  test("a large answer comes in pieces of about a quarter of a megabyte, a vector at most more", () => {
    const vector = Array.from({ length: 3072 }, (_, i) => Math.fround(Math.sin(i) / 10));
    const data = Array.from({ length: 200 }, (_, index) => ({ object: "embedding", index, embedding: base64(vector) }));
    const answer = { object: "list", data, model: "e", usage: { prompt_tokens: 200, total_tokens: 200 } };
    const pieces = [...embeddingJson(answer as unknown as CreateEmbeddingResponse, true)];
    const whole = JSON.stringify({ ...answer, data: data.map((d) => ({ ...d, embedding: vector })) });
    expect(pieces.join("")).toBe(whole);
    expect(pieces.length).toBeGreaterThan(10);
    const vectorChars = JSON.stringify(vector).length + 50;
    for (const piece of pieces) expect(piece.length).toBeLessThan(256 * 1024 + vectorChars);
  });
});

describe("REST models and routing", () => {
  test("lists the models a key may use", async () => {
    const { call, shipper } = setup();
    const all = await call("/v1/models", { key: "sk-good" });
    expect(all.status).toBe(200);
    expect(isUlid(all.headers.get("x-request-id") ?? "")).toBe(true);
    const body = (await all.json()) as { object: string; data: Array<Record<string, unknown>> };
    expect(body.object).toBe("list");
    expect(body.data.map((m) => m.id)).toEqual(["mock", "premium", "broken", "resilient", "slow"]);
    expect(body.data[0]).toMatchObject({ id: "mock", object: "model", owned_by: "mock" });

    const limited = (await (await call("/v1/models", { key: "sk-limited" })).json()) as { data: Array<{ id: string }> };
    expect(limited.data.map((m) => m.id)).toEqual(["mock"]);
    await expectError(await call("/v1/models"), 401, "missing_api_key");
    // The 401 had no key to bill: it is not shipped.
    expect(shipper.rows.map((m) => [m.endpoint, m.httpStatus])).toEqual([
      [Endpoint.MODELS, 200],
      [Endpoint.MODELS, 200],
    ]);
  });

  test("retrieves one model", async () => {
    const { call } = setup();
    const res = await call("/v1/models/premium", { key: "sk-good" });
    expect(((await res.json()) as { id: string }).id).toBe("premium");
    await expectError(await call("/v1/models/nope", { key: "sk-good" }), 404, "model_not_found", "model");
    // A model the key may not use is as unknown to it as one that does not exist: the same 404, the same words.
    const hidden = await call("/v1/models/premium", { key: "sk-limited" });
    const missing = await call("/v1/models/premiun", { key: "sk-limited" });
    expect([hidden.status, missing.status]).toEqual([404, 404]);
    const said = async (res: Response) => ((await res.json()) as { error: Record<string, unknown> }).error;
    expect({ ...(await said(hidden)), message: "" }).toEqual({ ...(await said(missing)), message: "" });
    expect((await said(await call("/v1/models/premium", { key: "sk-limited" }))).message).toContain("premium");
  });

  test("unknown paths are 404 and wrong methods 405, in the same error shape", async () => {
    const { call, shipper } = setup();
    await expectError(await call("/v1/nothing", { key: "sk-good" }), 404, "unknown_url");
    const get = await call("/v1/chat/completions", { key: "sk-good" });
    expect(get.headers.get("allow")).toBe("POST");
    await expectError(get, 405, "method_not_allowed");
    const del = await call("/v1/models", { method: "DELETE", key: "sk-good" });
    expect(del.headers.get("allow")).toBe("GET, HEAD");
    await expectError(del, 405, "method_not_allowed");
    expect(shipper.rows).toHaveLength(0);
  });
});
