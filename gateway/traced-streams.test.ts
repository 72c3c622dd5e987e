import { afterAll, beforeAll, expect, test } from "bun:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { SpanKind, SpanStatusCode } from "@opentelemetry/api";
import { InMemorySpanExporter, type ReadableSpan } from "@opentelemetry/sdk-trace";
import OpenAI from "openai";
import { createMetrics } from "../lib/metrics.ts";
import { setupTelemetry } from "../lib/telemetry.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { oneModelRoutes, startTestGateway } from "./testing/served-gateway.ts";

// Streams that fail midway, over RPC and REST, on a gateway wired as main.ts wires it: tracing and metrics
// interceptors, the request gate, the request's span around everything the stream does.

const exporter = new InMemorySpanExporter();
const telemetry = setupTelemetry({ service: "gateway-test", version: "0", exporter });
const metrics = createMetrics("gateway-test");
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
/** A model priced at three service tiers. */
let tiered: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  upstream = startFakeUpstream();
  gateway = await startTestGateway(oneModelRoutes(upstream.url), {
    interceptors: [telemetry.serverInterceptor, metrics.serverInterceptor],
    gated: true,
    tracer: telemetry.tracer,
  });
  const tiers = `{ flex: { input_per_mtok: "1", output_per_mtok: "4" }, priority: { input_per_mtok: "4", output_per_mtok: "16" } }`;
  const routes = [
    "providers:",
    `  - { name: fake, kind: openai, base_url: "${upstream.url}" }`,
    "models:",
    "  - name: tiered",
    "    targets: [{ provider: fake, model: tiered }]",
    `    pricing: { input_per_mtok: "2", output_per_mtok: "8", service_tiers: ${tiers} }`,
  ].join("\n");
  tiered = await startTestGateway(routes, { tracer: telemetry.tracer });
});
afterAll(async () => {
  await gateway.close();
  await tiered.close();
  await upstream.stop();
});

const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
const clientSpanId = "00f067aa0ba902b7";
const hello = [{ role: "user" as const, content: "one two three four five" }];
const children = (span: ReadableSpan) =>
  exporter
    .getFinishedSpans()
    .filter((s) => s.parentSpanContext?.spanId === span.spanContext().spanId)
    .map((s) => s.name);
const seconds = (span: ReadableSpan) => span.duration[0] + span.duration[1] / 1e9;
/** The log lines of a request, parsed. */
const logged = (requestId: string, msg: string) =>
  gateway.log.lines
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.request_id === requestId && l.msg === msg);

test("an RPC stream failing midway is counted, traced and metered as failed, over its whole length", async () => {
  upstream.script("ok", { chunkDelayMs: 100, cutAfterChunks: 3 });
  let requestId = "";
  const started = performance.now();
  const error = await (async () => {
    const stream = gateway.rpc("sk-good").streamChatCompletion(
      { params: { model: "ok", messages: hello } },
      {
        headers: { traceparent: `00-${traceId}-${clientSpanId}-01` },
        onHeader: (h) => (requestId = h.get("x-request-id") ?? ""),
      },
    );
    for await (const _ of stream);
  })().catch((e: unknown) => ConnectError.from(e));
  const tookSeconds = (performance.now() - started) / 1000;
  expect(error).toBeInstanceOf(ConnectError);
  expect([(error as ConnectError).code, (error as ConnectError).rawMessage]).toEqual([
    Code.Unavailable,
    "The upstream of `ok` failed mid-stream.",
  ]);

  // Counted once, with the code the client saw, for the time the stream took.
  const handled = (await metrics.registry.getSingleMetric("rpc_server_handled_total")?.get())?.values ?? [];
  const streams = handled.filter((v) => v.labels.rpc_method === "StreamChatCompletion");
  expect(streams.map((v) => [v.labels.code, v.value])).toEqual([["unavailable", 1]]);
  const durations = (await metrics.registry.getSingleMetric("rpc_server_handling_seconds")?.get())?.values ?? [];
  const sum = durations.find(
    (v) => (v as { metricName?: string }).metricName?.endsWith("_sum") && v.labels.rpc_method === "StreamChatCompletion",
  );
  expect(sum?.value).toBeGreaterThanOrEqual(0.25);
  expect(sum?.value).toBeLessThanOrEqual(tookSeconds);

  // One span, continuing the client's trace, failed, around the stream's work.
  const span = exporter.getFinishedSpans().find((s) => s.name === "gateway.v1.GatewayService/StreamChatCompletion");
  expect(span).toBeDefined();
  if (!span) return;
  expect([span.spanContext().traceId, span.parentSpanContext?.spanId]).toEqual([traceId, clientSpanId]);
  expect(span.status.code).toBe(SpanStatusCode.ERROR);
  expect(seconds(span)).toBeGreaterThanOrEqual(0.25);
  const work = ["gateway.reserve_budget", "chat ok", "gateway.enqueue_metrics"];
  expect(children(span)).toEqual(expect.arrayContaining(work));
  // The upstream call is a GenAI client span over the whole answer, failed as the stream did.
  const call = exporter.getFinishedSpans().find((s) => s.name === "chat ok" && s.parentSpanContext?.spanId === span.spanContext().spanId);
  const { port } = new URL(upstream.url);
  expect([call?.kind, call?.status.code]).toEqual([SpanKind.CLIENT, SpanStatusCode.ERROR]);
  expect(call?.attributes).toMatchObject({
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "ok",
    "server.address": "127.0.0.1",
    "server.port": Number(port),
    "error.type": "upstream_error",
  });
  expect(seconds(call as ReadableSpan)).toBeGreaterThanOrEqual(0.25);

  // The request's metrics and its log lines name the span.
  const row = await gateway.row(requestId);
  expect([row.traceId, row.spanId]).toEqual([traceId, span.spanContext().spanId]);
  const [line] = logged(requestId, "upstream stream failed");
  expect(line).toMatchObject({ trace_id: traceId, span_id: span.spanContext().spanId });
});

test("a REST stream failing midway logs and meters its request's trace", async () => {
  upstream.script("ok", { chunkDelayMs: 20, cutAfterChunks: 2 });
  const restTrace = "5bf92f3577b34da6a3ce929d0e0e4737";
  const sdk = new OpenAI({
    baseURL: `${gateway.restUrl}/v1`,
    apiKey: "sk-good",
    maxRetries: 0,
    defaultHeaders: { traceparent: `00-${restTrace}-${clientSpanId}-01` },
  });
  const { data: stream, response } = await sdk.chat.completions
    .create({ model: "ok", messages: hello, stream: true })
    .withResponse();
  const error = await (async () => {
    for await (const _ of stream);
  })().catch((e: unknown) => e);
  expect(error).toBeInstanceOf(OpenAI.APIError);
  const requestId = response.headers.get("x-request-id") ?? "";
  const span = exporter
    .getFinishedSpans()
    .find((s) => s.spanContext().traceId === restTrace && s.name === "POST /v1/chat/completions");
  expect(span?.status.code).toBe(SpanStatusCode.ERROR);
  const spanId = span?.spanContext().spanId ?? "";
  const [line] = logged(requestId, "upstream stream failed");
  expect(line).toMatchObject({ trace_id: restTrace, span_id: spanId });
  expect(children(span as ReadableSpan)).toContain("gateway.enqueue_metrics");
  const row = await gateway.row(requestId);
  expect([row.traceId, row.spanId]).toEqual([restTrace, spanId]);
});

test("an upstream call the client leaves, before its answer or during it, is ended, cancelled rather than failed", async () => {
  const ended: (ReadableSpan | undefined)[] = [];
  for (const [i, behaviour] of [{ firstChunkDelayMs: 2000 }, { chunkDelayMs: 1000 }].entries()) {
    upstream.script("ok", behaviour);
    const trace = `${i}af92f3577b34da6a3ce929d0e0e4740`;
    const left = new AbortController();
    const res = fetch(`${gateway.restUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json", traceparent: `00-${trace}-${clientSpanId}-01` },
      body: JSON.stringify({ model: "ok", messages: hello, stream: true }),
      signal: left.signal,
    });
    // Read the first chunk, when one comes: the client leaves mid-stream.
    void res.then((r) => r.body?.getReader().read()).catch(() => {});
    await Bun.sleep(300);
    left.abort();
    const call = () => exporter.getFinishedSpans().find((s) => s.name === "chat ok" && s.spanContext().traceId === trace);
    for (let waited = 0; !call() && waited < 5000; waited += 50) await Bun.sleep(50);
    ended.push(call());
  }
  expect(ended.map((s) => [s?.kind, s?.status.code, s?.attributes["error.type"]])).toEqual([
    [SpanKind.CLIENT, SpanStatusCode.UNSET, "cancelled"],
    [SpanKind.CLIENT, SpanStatusCode.UNSET, "client_closed_request"],
  ]);
});

test("an RPC the key gate refuses is counted with its code and traced, its key check inside the call's span", async () => {
  const calls = [
    { key: undefined, trace: "6bf92f3577b34da6a3ce929d0e0e4738" },
    { key: "sk-unknown", trace: "7bf92f3577b34da6a3ce929d0e0e4739" },
    { key: "sk-good", trace: "8bf92f3577b34da6a3ce929d0e0e473a" },
  ];
  const codes = [];
  for (const { key, trace } of calls) {
    codes.push(
      await gateway
        .rpc(key)
        .listModels({}, { headers: { traceparent: `00-${trace}-${clientSpanId}-01` } })
        .then(
          () => "ok",
          (e: unknown) => Code[ConnectError.from(e).code],
        ),
    );
  }
  expect(codes).toEqual(["Unauthenticated", "Unauthenticated", "ok"]);

  const handled = (await metrics.registry.getSingleMetric("rpc_server_handled_total")?.get())?.values ?? [];
  const listModels = handled.filter((v) => v.labels.rpc_method === "ListModels").map((v) => [v.labels.code, v.value]);
  expect(listModels).toEqual(expect.arrayContaining([["unauthenticated", 2], ["ok", 1]]));

  const spans = calls.map(({ trace }) =>
    exporter.getFinishedSpans().find((s) => s.spanContext().traceId === trace && s.name === "gateway.v1.GatewayService/ListModels"),
  );
  // A caller's mistake leaves the span's status unset, as the REST API's 401 does: only a server's failure is an error.
  expect(spans.map((s) => s?.status.code)).toEqual([SpanStatusCode.UNSET, SpanStatusCode.UNSET, SpanStatusCode.UNSET]);
  expect(spans.map((s) => s?.attributes["rpc.grpc.status_code"])).toEqual([Code.Unauthenticated, Code.Unauthenticated, 0]);
  const restTrace = "9bf92f3577b34da6a3ce929d0e0e473b";
  const rest = await fetch(`${gateway.restUrl}/v1/models`, {
    headers: { authorization: "Bearer sk-unknown", traceparent: `00-${restTrace}-${clientSpanId}-01` },
  });
  expect(rest.status).toBe(401);
  const restSpan = exporter.getFinishedSpans().find((s) => s.spanContext().traceId === restTrace && s.kind === 1);
  expect(restSpan?.status.code).toBe(SpanStatusCode.UNSET);
  // The key checked at the gate, refused or not, is a step of the call's own span.
  expect(children(spans[1] as ReadableSpan)).toContain("gateway.authorize_key");
  expect(children(spans[2] as ReadableSpan)).toContain("gateway.authorize_key");
});

test("a streamed RPC whose message cannot be read has its request id and its error's code on its span", async () => {
  const trace = "abf92f3577b34da6a3ce929d0e0e473c";
  // An envelope that says 100 bytes and holds 10.
  const body = Buffer.concat([Buffer.from([0, 0, 0, 0, 100]), Buffer.from('{"params":')]);
  const res = await fetch(`${gateway.url}/gateway.v1.GatewayService/StreamChatCompletion`, {
    method: "POST",
    headers: {
      "content-type": "application/connect+json",
      authorization: "Bearer sk-good",
      traceparent: `00-${trace}-${clientSpanId}-01`,
    },
    body,
  });
  const requestId = res.headers.get("x-request-id") ?? "";
  await res.arrayBuffer();
  let span: ReadableSpan | undefined;
  for (let i = 0; i < 100 && !span; i++, await Bun.sleep(20)) {
    span = exporter.getFinishedSpans().find((s) => s.spanContext().traceId === trace && s.kind === SpanKind.SERVER);
  }
  expect(span?.name).toBe("gateway.v1.GatewayService/StreamChatCompletion");
  // The stream's span ends as its refusal is answered, before the key is checked and the refusal metered.
  expect(span?.attributes).toMatchObject({ "gateway.request_id": requestId, "error.type": "invalid_argument" });
});

// An upstream bills the tier that served a request, which need not be the one asked for (flex served as default, auto
// as priority): the budget reservation covers the dearest, so the overshoot bound holds whichever serves.
test("a request is reserved at the dearest tier it can be billed at, whatever tier it asks for", async () => {
  const sdk = new OpenAI({ apiKey: "sk-good", baseURL: `${tiered.restUrl}/v1`, maxRetries: 0 });
  const reserved: number[] = [];
  for (const tier of [undefined, "flex", "priority", "auto"] as const) {
    upstream.script("tiered", { usage: { prompt_tokens: 5, completion_tokens: 500, total_tokens: 505 }, serviceTier: "priority" });
    const messages = [{ role: "user" as const, content: "hello" }];
    const { response } = await sdk.chat.completions
      .create({ model: "tiered", messages, max_tokens: 500, ...(tier && { service_tier: tier }) })
      .withResponse();
    const row = await tiered.row(response.headers.get("x-request-id") ?? "");
    const span = exporter
      .getFinishedSpans()
      .find((s) => s.name === "gateway.reserve_budget" && s.spanContext().traceId === row.traceId);
    const maxCost = Number(span?.attributes["gateway.max_cost_nanos"]);
    // Served at priority: 5 input at $4 and 500 output at $16 a million.
    expect(row.costNanos).toBe(5n * 4_000n + 500n * 16_000n);
    expect(maxCost).toBeGreaterThanOrEqual(Number(row.costNanos));
    reserved.push(maxCost);
  }
  expect(new Set(reserved).size).toBe(1);
});

test("every request's span says its request id, models, parameters, usage and failure, streamed or not, REST or RPC", async () => {
  const usage = {
    prompt_tokens: 20,
    completion_tokens: 6,
    total_tokens: 26,
    prompt_tokens_details: { cached_tokens: 8 },
    completion_tokens_details: { reasoning_tokens: 2 },
  };
  upstream.script("ok", { usage, chunkDelayMs: 5 });
  const sdk = new OpenAI({ baseURL: `${gateway.restUrl}/v1`, apiKey: "sk-good", maxRetries: 0 });
  const spanOf = (requestId: string) =>
    exporter.getFinishedSpans().find((s) => s.kind === 1 && s.attributes["gateway.request_id"] === requestId);
  const answered = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gateway.provider": "fake",
    "gen_ai.request.model": "ok",
    "gen_ai.request.stream": true,
    "gen_ai.request.temperature": 0.5,
    "gen_ai.request.max_tokens": 40,
    "gen_ai.response.model": "ok-fake",
    "gen_ai.response.finish_reasons": ["stop"],
    "gen_ai.usage.input_tokens": 20,
    "gen_ai.usage.output_tokens": 6,
    "gen_ai.usage.cache_read.input_tokens": 8,
    "gen_ai.usage.reasoning.output_tokens": 2,
    "gateway.org_id": "org_1",
    "gateway.api_key_id": "key_good",
  };

  const { data: stream, response } = await sdk.chat.completions
    .create({ model: "ok", messages: hello, stream: true, temperature: 0.5, max_tokens: 40 })
    .withResponse();
  for await (const _ of stream);
  const restId = response.headers.get("x-request-id") ?? "";
  const rest = spanOf(restId);
  expect(rest?.attributes).toMatchObject({ ...answered, "gateway.request_id": restId });
  expect(rest?.name).toBe("POST /v1/chat/completions");
  expect(rest?.attributes).toMatchObject({ "http.route": "/v1/chat/completions", "url.scheme": "http" });
  expect(rest?.attributes["gen_ai.response.id"]).toBeString();
  expect(rest?.attributes["gen_ai.response.time_to_first_chunk"]).toBeGreaterThan(0);

  let rpcId = "";
  const rpcMessages = [{ role: "user", content: "one two three four five" }];
  for await (const _ of gateway.rpc("sk-good").streamChatCompletion(
    { params: { model: "ok", messages: rpcMessages, temperature: 0.5, maxTokens: 40 } },
    { onHeader: (h) => (rpcId = h.get("x-request-id") ?? "") },
  ));
  // A stream that ended well says so in its code, as a call that failed does in its own.
  expect(spanOf(rpcId)?.attributes).toMatchObject({ ...answered, "gateway.request_id": rpcId, "rpc.grpc.status_code": 0 });

  upstream.script("ok", {});
  const embedded = await sdk.embeddings.create({ model: "ok", input: "one two" }).withResponse();
  const embedId = embedded.response.headers.get("x-request-id") ?? "";
  expect(spanOf(embedId)?.attributes).toMatchObject({
    "gen_ai.operation.name": "embeddings",
    "gen_ai.request.model": "ok",
    "gen_ai.request.encoding_formats": ["base64"],
    "gen_ai.usage.input_tokens": expect.any(Number),
  });

  // The Responses API's span is named and routed as the other routes' are.
  const answer = await sdk.responses.create({ model: "ok", input: "one two" }).withResponse();
  const responsesSpan = spanOf(answer.response.headers.get("x-request-id") ?? "");
  expect(responsesSpan?.name).toBe("POST /v1/responses");
  expect(responsesSpan?.attributes).toMatchObject({ "http.route": "/v1/responses" });
  // A stored response's calls are traced by their routes, the id left out.
  const retrieved = await sdk.responses.retrieve(answer.data.id).withResponse();
  const retrieveSpan = spanOf(retrieved.response.headers.get("x-request-id") ?? "");
  expect(retrieveSpan?.name).toBe("GET /v1/responses/{response_id}");
  expect(retrieveSpan?.attributes).toMatchObject({
    "http.route": "/v1/responses/{response_id}",
    "gateway.provider": "fake",
    "gateway.org_id": "org_1",
  });
  const items = await sdk.responses.inputItems.list(answer.data.id).withResponse();
  expect(spanOf(items.response.headers.get("x-request-id") ?? "")?.name).toBe("GET /v1/responses/{response_id}/input_items");

  // Failures: the request id a client quotes finds the trace, and error.type says what went wrong.
  upstream.script("ok", { status: 500 });
  const failures: Record<string, unknown> = {};
  for (const model of ["ok", "nope"]) {
    const error = await sdk.chat.completions.create({ model, messages: hello }).catch((e: unknown) => e);
    const requestId = (error as InstanceType<typeof OpenAI.APIError>).headers?.get("x-request-id") ?? "";
    failures[model] = spanOf(requestId)?.attributes;
  }
  expect(failures.ok).toMatchObject({ "error.type": "upstream_error", "gen_ai.request.model": "ok", "gen_ai.provider.name": "openai" });
  expect(failures.ok).not.toHaveProperty("gen_ai.response.model");
  expect(failures.nope).toMatchObject({ "error.type": "model_not_found", "gen_ai.request.model": "nope" });
  const attempts = exporter.getFinishedSpans().filter((s) => s.name === "chat ok" && s.attributes["error.type"] === "500");
  expect(attempts.length).toBeGreaterThan(0);
  expect(attempts[0]?.kind).toBe(SpanKind.CLIENT);
  expect(attempts[0]?.status.code).toBe(SpanStatusCode.ERROR);
  expect(attempts[0]?.attributes).toMatchObject({ "gen_ai.provider.name": "openai", "gateway.provider": "fake" });
  // Parameters and counts, never what was said.
  const exported = JSON.stringify(exporter.getFinishedSpans().map((s) => s.attributes));
  expect(exported).not.toContain("three four");
});

test("each upstream call carries its request's trace context, so an upstream that traces continues the request's trace", async () => {
  const trace = "7bf92f3577b34da6a3ce929d0e0e4741";
  const sdk = new OpenAI({
    baseURL: `${gateway.restUrl}/v1`,
    apiKey: "sk-good",
    maxRetries: 0,
    defaultHeaders: { traceparent: `00-${trace}-${clientSpanId}-01`, baggage: "tenant.secret=s3cr3t" },
  });
  exporter.reset();
  upstream.reset();
  upstream.script("ok", {});
  await sdk.chat.completions.create({ model: "ok", messages: hello });
  for await (const _ of await sdk.chat.completions.create({ model: "ok", messages: hello, stream: true }));
  await sdk.embeddings.create({ model: "ok", input: "one two" });
  const made = await sdk.responses.create({ model: "ok", input: "one two" });
  await sdk.responses.retrieve(made.id);
  const sent = upstream.requests.map((r) => ({ path: r.path, traceparent: r.headers.traceparent }));
  // A client's baggage is for the mesh's services, not a third party's.
  for (const r of upstream.requests) expect(r.headers.baggage).toBeUndefined();
  expect(sent.map((r) => r.path)).toEqual([
    "/v1/chat/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    expect.stringMatching(/^\/v1\/responses\/./),
  ]);
  // The attempt's own span is the upstream's parent; a stored response's call, which has none, the request's.
  const spans = exporter.getFinishedSpans().filter((s) => s.spanContext().traceId === trace);
  const attempts = spans.filter((s) => s.kind === SpanKind.CLIENT).map((s) => s.spanContext().spanId);
  const retrieve = spans.find((s) => s.name === "GET /v1/responses/{response_id}")?.spanContext().spanId;
  expect(attempts).toHaveLength(4);
  expect(sent.map((r) => r.traceparent)).toEqual(
    [...attempts, retrieve].map((spanId) => `00-${trace}-${spanId}-01`),
  );
});
