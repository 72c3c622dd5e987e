import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as http2 from "node:http2";
import net from "node:net";
import * as grpc from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createHandlerContext } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { trace } from "@opentelemetry/api";
import { Registry } from "prom-client";
import { isValid as isUlid } from "ulid";
import { encodeGrpcMessage, maxGrpcMessageBytes } from "../lib/grpc-message.ts";
import { decodeBase64 } from "../lib/grpc-web-text.ts";
import { grpcFrame, grpcFrames } from "../lib/grpc-frames.ts";
import { answerToHead } from "../lib/testing.ts";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { CreateEmbeddingRequestSchema, GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { createMetrics } from "../lib/metrics.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { createRestApp } from "./http/app.ts";
import { restRoutes } from "./http/node.ts";
import { createGatewayRequestGate, createGatewayService, gatewayRoutes } from "./service.ts";
import { createTestCore } from "./testing.ts";
import { startFakeUpstream } from "./testing/fake-upstream.ts";
import { grpcChatStreamByHand, oneModelRoutes, startTestGateway } from "./testing/served-gateway.ts";

// One real server on port 0 carrying both the RPCs and the REST API, as main.ts wires them.
let server: RunningServer;
const registry = new Registry();
const gateway = createTestCore({ registry });

/** gateway_requests_total of one series, by its endpoint, model, status and code labels. */
const requestsCounted = async (endpoint: string, model: string, status: string, code: number) =>
  ((await registry.getSingleMetric("gateway_requests_total")?.get())?.values ?? [])
    .filter((v) => {
      const { labels } = v;
      return labels.endpoint === endpoint && labels.model === model && labels.status === status && labels.code === code;
    })
    .reduce((n, v) => n + v.value, 0);

beforeAll(async () => {
  const rest = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes: 4096 });
  server = await startServer({
    name: "gateway-test",
    port: 0,
    routes: gatewayRoutes(createGatewayService(gateway.core), 4096),
    requestGate: createGatewayRequestGate(gateway.core, 4096),
    readMaxBytes: 4096,
    http: restRoutes(rest),
    log: gateway.log,
  });
});
afterAll(() => server.close(0));

const client = (key?: string) => createServiceClient(GatewayService, { baseUrl: server.url, bearerToken: key });

const hello = {
  model: "mock",
  messages: [
    { role: "system", content: "be brief" },
    { role: "user", content: "hello there" },
  ],
};

async function rpcError(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (e) {
    return ConnectError.from(e);
  }
  throw new Error("expected the RPC to fail");
}

describe("GatewayService over gRPC", () => {
  test("CreateChatCompletion shares the REST core: same reply, cost and metrics", async () => {
    let requestId = "";
    const res = await client("sk-good").createChatCompletion(
      { params: { ...hello, metadata: { via: "rpc" }, user: "u1" } },
      { onHeader: (h) => (requestId = h.get("x-request-id") ?? "") },
    );
    expect(res.choices[0]?.message?.content).toBe("mock reply: hello there");
    expect(res.choices[0]?.finishReason).toBe("stop");
    expect(res.model).toBe("mock-echo-1");
    expect(isUlid(requestId)).toBe(true);
    expect(res.accounting).toMatchObject({ requestId, costNanos: 17000n, provider: "mock", usageEstimated: false });
    expect(res.accounting?.usage).toMatchObject({ inputTokens: 16n, outputTokens: 6n });
    const m = gateway.shipper.rows.find((r) => r.requestId === requestId);
    expect(m).toMatchObject({ status: RequestStatus.OK, costNanos: 17000n, endUserId: "u1", tags: { via: "rpc" }, orgId: "org_1" });
    // 16 input tokens at $0.50/M and 6 output at $1.50/M, itemised for invoices.
    expect(m?.costBreakdown).toMatchObject({ inputNanos: 8000n, cachedInputNanos: 0n, outputNanos: 9000n, reasoningNanos: 0n });
  });

  test("latency histograms have finite buckets up to the default request time limit", async () => {
    for await (const _ of client("sk-good").streamChatCompletion({ params: hello }));
    const text = await registry.metrics();
    for (const name of ["request_duration", "upstream_duration", "time_to_first_token"]) {
      const bounds = [...text.matchAll(new RegExp(`^gateway_${name}_seconds_bucket\\{le="([0-9.]+)"`, "gm"))];
      // A request may run for GATEWAY_REQUEST_TIMEOUT_MS (600 s by default); one past the last finite bucket reads, in
      // every quantile it falls in, as that bucket's bound.
      expect(Math.max(...bounds.map((m) => Number(m[1])))).toBeGreaterThanOrEqual(600);
    }
  });

  test("failures map to RPC codes and carry the request id", async () => {
    const missing = await rpcError(client().createChatCompletion({ params: hello }));
    expect(missing.code).toBe(Code.Unauthenticated);
    expect(isUlid(missing.metadata.get("x-request-id") ?? "")).toBe(true);
    expect(missing.metadata.get("x-error-code")).toBe("missing_api_key");

    expect((await rpcError(client("sk-good").createChatCompletion({ params: { ...hello, model: "" } }))).code).toBe(
      Code.InvalidArgument,
    );
    expect((await rpcError(client("sk-good").createChatCompletion({}))).code).toBe(Code.InvalidArgument);
    expect((await rpcError(client("sk-good").createChatCompletion({ params: { ...hello, model: "nope" } }))).code).toBe(
      Code.NotFound,
    );
    expect(
      (await rpcError(client("sk-limited").createChatCompletion({ params: { ...hello, model: "premium" } }))).code,
    ).toBe(Code.PermissionDenied);
    expect((await rpcError(client("sk-good").createChatCompletion({ params: { ...hello, model: "broken" } }))).code).toBe(
      Code.Unavailable,
    );
  });

  test("invalid fields are InvalidArgument naming the field, as over REST", async () => {
    const invalid = async (params: Record<string, unknown>) => {
      const e = await rpcError(client("sk-good").createChatCompletion({ params: { ...hello, ...params } }));
      expect(e.code).toBe(Code.InvalidArgument);
      return [e.metadata.get("x-error-param"), e.metadata.get("x-error-code")];
    };
    expect(await invalid({ temperature: 5 })).toEqual(["temperature", "decimal_above_max_value"]);
    expect(await invalid({ n: 129 })).toEqual(["n", "integer_above_max_value"]);
    // An int64 seed JSON numbers cannot carry exactly upstream is refused, not rounded into another seed.
    expect(await invalid({ seed: 2n ** 53n + 1n })).toEqual(["seed", "integer_above_max_value"]);
    expect(await invalid({ seed: -(2n ** 63n) })).toEqual(["seed", "integer_below_min_value"]);
    expect(await invalid({ responseFormat: { type: "bogus" } })).toEqual(["response_format.type", "invalid_value"]);
    expect(await invalid({ responseFormat: { type: "json_schema" } })).toEqual(["response_format.json_schema.name", "missing_required_parameter"]);
    expect(await invalid({ tools: [{ type: "function", function: { name: "look up" } }] })).toEqual(["tools[0].function.name", "invalid_value"]);
    // A tool_choice names a tool the request declares, as over REST.
    expect(await invalid({ toolChoice: "banana" })).toEqual(["tool_choice", "invalid_value"]);
    const lookUp = { type: "function", function: { name: "look_up" } };
    expect(await invalid({ tools: [lookUp], toolChoice: "banana" })).toEqual(["tool_choice.function.name", "invalid_value"]);
    expect(await invalid({ messages: [...hello.messages, { role: "tool", content: "42" }] })).toEqual([
      "messages[2].tool_call_id",
      "missing_required_parameter",
    ]);
    // A content part with neither text nor an image set.
    expect(await invalid({ messages: [{ role: "user", parts: [{}] }] })).toEqual(["messages[0].content[0].type", "missing_required_parameter"]);
    const stream = await rpcError(
      (async () => {
        for await (const _ of client("sk-good").streamChatCompletion({ params: { ...hello, topP: 7 } }));
      })(),
    );
    expect([stream.code, stream.metadata.get("x-error-param")]).toEqual([Code.InvalidArgument, "top_p"]);
    const embedding = await rpcError(client("sk-good").createEmbedding({ model: "mock", input: ["a"], dimensions: 0 }));
    expect([embedding.code, embedding.metadata.get("x-error-param")]).toEqual([Code.InvalidArgument, "dimensions"]);
  });

  test("ListModels returns the key's models with their configured prices", async () => {
    const all = await client("sk-good").listModels({});
    expect(all.models.map((m) => m.id)).toEqual(["mock", "premium", "broken", "resilient", "slow"]);
    expect(all.models[1]).toMatchObject({ id: "premium", ownedBy: "mock", inputPerMtok: "2.50", cachedInputPerMtok: "1.25", outputPerMtok: "10" });
    expect((await client("sk-limited").listModels({})).models.map((m) => m.id)).toEqual(["mock"]);
  });

  test("StreamChatCompletion streams deltas and ends with the accounting", async () => {
    let requestId = "";
    const messages = [];
    for await (const m of client("sk-good").streamChatCompletion(
      { params: hello },
      { onHeader: (h) => (requestId = h.get("x-request-id") ?? "") },
    )) {
      messages.push(m);
    }
    const content = messages.map((m) => m.choices[0]?.content ?? "").join("");
    expect(content).toBe("mock reply: hello there");
    expect(messages[0]?.choices[0]?.role).toBe("assistant");
    expect(messages.at(-2)?.choices[0]?.finishReason).toBe("stop");
    expect(messages.slice(0, -1).every((m) => m.accounting === undefined)).toBe(true);
    const last = messages.at(-1);
    expect(last?.choices).toEqual([]);
    expect(last?.accounting).toMatchObject({ requestId, costNanos: 17000n, provider: "mock", usageEstimated: false });
    expect(last?.accounting?.usage).toMatchObject({ inputTokens: 16n, outputTokens: 6n });
    const m = gateway.shipper.rows.find((r) => r.requestId === requestId);
    expect(m).toMatchObject({ status: RequestStatus.OK, streamed: true, costNanos: 17000n });
    expect(m?.costBreakdown).toMatchObject({ inputNanos: 8000n, outputNanos: 9000n });
  });

  test("StreamChatCompletion fails with RPC codes before the stream opens", async () => {
    const stream = async (key: string | undefined, model: string) => {
      for await (const _ of client(key).streamChatCompletion({ params: { ...hello, model } }));
    };
    expect((await rpcError(stream(undefined, "mock"))).code).toBe(Code.Unauthenticated);
    expect((await rpcError(stream("sk-good", "nope"))).code).toBe(Code.NotFound);
    expect((await rpcError(stream("sk-good", "broken"))).code).toBe(Code.Unavailable);
  });

  test("CreateEmbedding returns float vectors with the accounting", async () => {
    const res = await client("sk-good").createEmbedding({ model: "mock", input: ["a cat", "a dog"], dimensions: 8 });
    expect(res.data.map((d) => d.index)).toEqual([0, 1]);
    expect(res.data[0]?.embedding).toHaveLength(8);
    const norm = Math.hypot(...(res.data[0]?.embedding ?? []));
    expect(norm).toBeCloseTo(1, 5);
    // ceil(5/4) + ceil(5/4) = 4 input tokens at $0.50/M = $0.000002
    expect(res.accounting).toMatchObject({ costNanos: 2000n, provider: "mock", usage: { inputTokens: 4n } });
    expect((await rpcError(client("sk-good").createEmbedding({ model: "mock", input: [] }))).code).toBe(Code.InvalidArgument);
  });
});

describe("upstream failures over gRPC", () => {
  const upstream = startFakeUpstream();
  let served: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    const model = (name: string, provider = "fake") =>
      `  - { name: ${name}, targets: [{ provider: ${provider}, model: ${name} }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    served = await startTestGateway(
      [
        "providers:",
        `  - { name: fake, kind: openai, base_url: "${upstream.url}" }`,
        `  - { name: keyless, kind: openai, base_url: "${upstream.url}", api_key_env: FAKE_UPSTREAM_KEY }`,
        "models:",
        model("rejecting"),
        model("quota"),
        model("tpm"),
        model("keyless", "keyless"),
        model("embed"),
        model("floats-only"),
        model("floats-only-too"),
        `  - { name: slow, targets: [{ provider: fake, model: slow }], timeout_ms: 300, pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`,
      ].join("\n"),
    );
  });
  afterAll(() => Promise.all([served.close(), upstream.stop()]));

  test("a failure that costs (a prompt sent to an upstream that timed out) says what in its metadata, as REST's header", async () => {
    upstream.script("slow", { delayMs: 2_000, content: "late" });
    const e = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "slow" } }));
    expect(e.code).toBe(Code.DeadlineExceeded);
    const m = await served.row(e.metadata.get("x-request-id") ?? "");
    expect(m.costNanos).toBeGreaterThan(0n);
    expect(e.metadata.get("x-gateway-cost-nanos")).toBe(String(m.costNanos));
  });

  test("an upstream's refusal keeps its message, code, type and param; gateway-side failures keep internals out", async () => {
    const context = {
      message: "This model's maximum context length is 128000 tokens.",
      type: "invalid_request_error",
      param: "messages",
      code: "context_length_exceeded",
    };
    upstream.script("rejecting", { status: 400, error: context }, { status: 422, error: { ...context, param: "temperature", code: "decimal_above_max_value" } });
    const rejected = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "rejecting" } }));
    expect([rejected.code, rejected.rawMessage]).toEqual([Code.InvalidArgument, context.message]);
    expect(["x-error-code", "x-error-type", "x-error-param"].map((k) => rejected.metadata.get(k))).toEqual([context.code, context.type, context.param]);
    const streamed = await rpcError(
      (async () => {
        for await (const _ of served.rpc("sk-good").streamChatCompletion({ params: { ...hello, model: "rejecting" } }));
      })(),
    );
    expect(streamed.code).toBe(Code.InvalidArgument);
    expect([streamed.metadata.get("x-error-code"), streamed.metadata.get("x-error-param")]).toEqual(["decimal_above_max_value", "temperature"]);

    upstream.script("quota", { status: 429, error: { message: "You exceeded your current quota.", type: "insufficient_quota", code: "insufficient_quota" } });
    const quota = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "quota" } }));
    expect([quota.code, quota.metadata.get("x-error-code")]).toEqual([Code.Unavailable, "upstream_quota_exceeded"]);
    expect(quota.metadata.get("x-error-param")).toBeNull();

    const keyless = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "keyless" } }));
    expect([keyless.code, keyless.rawMessage]).toEqual([Code.Unavailable, "The upstream of `keyless` is not configured."]);
  });

  test("a long refusal in another script keeps its status within the metadata gRPC clients accept (8 KiB)", async () => {
    // 2,000 characters (as many as a refusal keeps) of 3 UTF-8 bytes each: 18 KB percent-encoded, past what grpcio and
    // grpc-java take, which fail such a call RESOURCE_EXHAUSTED without its code or message.
    const message = "上下文长度超出了模型的限制".repeat(200);
    upstream.script("rejecting", { status: 400, error: { message, code: "context_length_exceeded", param: "messages" } });
    const rejected = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "rejecting" } }));
    expect([rejected.code, rejected.metadata.get("x-error-code")]).toEqual([Code.InvalidArgument, "context_length_exceeded"]);
    expect(rejected.rawMessage.endsWith("...")).toBe(true);
    expect(message.startsWith(rejected.rawMessage.slice(0, -3))).toBe(true);
    expect(encodeGrpcMessage(rejected.rawMessage).length).toBeLessThanOrEqual(maxGrpcMessageBytes);
    expect(rejected.rawMessage.length).toBeGreaterThan(400);
    // A message of ASCII up to the same 2,000 characters goes whole.
    const english = `This model's maximum context length is 8192 tokens. ${"word ".repeat(400)}`.slice(0, 2000);
    upstream.script("rejecting", { status: 400, error: { message: english, code: "context_length_exceeded" } });
    expect((await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "rejecting" } }))).rawMessage).toBe(english);
  });

  test("CreateEmbedding asks its upstream for base64, a third of the bytes of JSON floats, and answers the floats", async () => {
    const floats = [0.05, 0.06, 0.07].map(Math.fround);
    const res = await served.rpc("sk-good").createEmbedding({ model: "embed", input: ["alpha", "beta"], dimensions: 3 });
    expect(upstream.seen("embed").at(-1)?.body.encoding_format).toBe("base64");
    expect(res.data.map((d) => d.index)).toEqual([0, 1]);
    expect(res.data[0]?.embedding).toEqual(floats);
    // An upstream that ignores encoding_format and answers JSON floats is read alike.
    upstream.script("embed", { encoding: "float" });
    const plain = await served.rpc("sk-good").createEmbedding({ model: "embed", input: ["alpha"], dimensions: 3 });
    expect(plain.data[0]?.embedding).toEqual(floats);
  });

  test("CreateEmbedding of an upstream that refuses base64 asks again for floats, and from then on", async () => {
    upstream.script("floats-only", { floatsOnly: true });
    for (let i = 0; i < 2; i++) {
      const res = await served.rpc("sk-good").createEmbedding({ model: "floats-only", input: ["alpha"], dimensions: 3 });
      expect(res.data[0]?.embedding).toEqual([0.05, 0.06, 0.07].map(Math.fround));
    }
    expect(upstream.seen("floats-only").map((r) => r.body.encoding_format)).toEqual(["base64", "float", "float"]);
  });

  test("CreateEmbedding asks for floats at once of an upstream that refused a REST client's base64", async () => {
    upstream.script("floats-only-too", { floatsOnly: true });
    const floats = [0.05, 0.06, 0.07].map(Math.fround);
    const rest = await fetch(`${served.restUrl}/v1/embeddings`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body: JSON.stringify({ model: "floats-only-too", input: ["alpha"], dimensions: 3, encoding_format: "base64" }),
    });
    const answer = (await rest.json()) as { data: Array<{ embedding: string }> };
    expect(answer.data[0]?.embedding).toBe(Buffer.from(Float32Array.from(floats).buffer).toString("base64"));
    const res = await served.rpc("sk-good").createEmbedding({ model: "floats-only-too", input: ["alpha"], dimensions: 3 });
    expect(res.data[0]?.embedding).toEqual(floats);
    expect(res.accounting?.costNanos).toBe(BigInt(rest.headers.get("x-gateway-cost-nanos") ?? ""));
    expect(upstream.seen("floats-only-too").map((r) => r.body.encoding_format)).toEqual(["base64", "float", "float"]);
  });

  test("CreateEmbedding answers an upstream's lists of floats as they came, not copied", async () => {
    upstream.script("floats-only", { floatsOnly: true });
    let vectors: unknown[] = [];
    const core = {
      ...served.core,
      embed: async (...args: Parameters<typeof served.core.embed>) => {
        const outcome = await served.core.embed(...args);
        vectors = outcome.response.data.map((d) => d.embedding);
        return outcome;
      },
    };
    const ctx = createHandlerContext({
      service: GatewayService,
      method: GatewayService.method.createEmbedding,
      protocolName: "grpc",
      requestMethod: "POST",
      url: "http://localhost/gateway.v1.GatewayService/CreateEmbedding",
      requestHeader: { authorization: "Bearer sk-good" },
    });
    const req = create(CreateEmbeddingRequestSchema, { model: "floats-only", input: ["alpha", "beta"], dimensions: 3 });
    const res = await createGatewayService(core).createEmbedding(req, ctx);
    expect(upstream.seen("floats-only").at(-1)?.body.encoding_format).toBe("float");
    expect(res.data?.map((d) => d.embedding)).toEqual([[0.05, 0.06, 0.07].map(Math.fround), [0.04, 0.05, 0.06].map(Math.fround)]);
    expect(res.data?.every((d, i) => d.embedding === vectors[i])).toBe(true);
  });

  test("an upstream's 429 for a prompt over its whole TPM limit is invalid_argument, not a rate limit to retry", async () => {
    const tooLarge = {
      message: "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.",
      type: "tokens",
      code: "rate_limit_exceeded",
    };
    upstream.script("tpm", { status: 429, error: tooLarge }, { status: 429, retryAfter: "3" });
    const refused = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "tpm" } }));
    expect([refused.code, refused.rawMessage, refused.metadata.get("x-error-code")]).toEqual([Code.InvalidArgument, tooLarge.message, "rate_limit_exceeded"]);
    // A rate limit is still ResourceExhausted, with its Retry-After.
    const limited = await rpcError(served.rpc("sk-good").createChatCompletion({ params: { ...hello, model: "tpm" } }));
    expect([limited.code, limited.metadata.get("x-error-code"), limited.metadata.get("retry-after")]).toEqual([
      Code.ResourceExhausted,
      "upstream_rate_limited",
      "3",
    ]);
  });
});

describe("the same server over plain HTTP", () => {
  test("serves the REST API through node:http with headers intact", async () => {
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body: JSON.stringify(hello),
    });
    expect(res.status).toBe(200);
    expect(isUlid(res.headers.get("x-request-id") ?? "")).toBe(true);
    expect(res.headers.get("x-gateway-cost-nanos")).toBe("17000");
    expect(((await res.json()) as { choices: unknown[] }).choices).toHaveLength(1);

    const tooBig = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good" },
      body: "x".repeat(10_000),
    });
    expect(tooBig.status).toBe(413);
    expect(((await tooBig.json()) as { error: { code: string } }).error.code).toBe("request_too_large");

    const noKey = await fetch(`${server.url}/v1/models`);
    expect(noKey.status).toBe(401);
    expect(isUlid(noKey.headers.get("x-request-id") ?? "")).toBe(true);
  });

  test("refuses an RPC body over the limit as REST does: the key first, then invalid_argument, metered", async () => {
    const big = JSON.stringify({ params: { model: "mock", messages: [{ role: "user", content: "x".repeat(5000) }] } });
    const post = (key: string) =>
      fetch(`${server.url}/gateway.v1.GatewayService/CreateChatCompletion`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: big,
      });
    const res = await post("sk-good");
    expect(res.status).toBe(400);
    expect(await res.json()).toEqual({ code: "invalid_argument", message: "The request body exceeds the limit of 4096 bytes." });
    expect(res.headers.get("x-error-code")).toBe("request_too_large");
    const requestId = res.headers.get("x-request-id") ?? "";
    expect(isUlid(requestId)).toBe(true);
    const row = gateway.shipper.rows.find((m) => m.requestId === requestId);
    expect(row).toMatchObject({ status: RequestStatus.INVALID_REQUEST, orgId: "org_1", errorCode: "request_too_large" });

    const stranger = await post("sk-unknown");
    expect(stranger.status).toBe(401);
    expect(isUlid(stranger.headers.get("x-request-id") ?? "")).toBe(true);

    // Declared within the limit, gzipped, and past it once inflated: refused alike, not as resource_exhausted (a 429).
    const zipped = await fetch(`${server.url}/gateway.v1.GatewayService/CreateChatCompletion`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json", "content-encoding": "gzip" },
      body: Bun.gzipSync(big),
    });
    expect(zipped.status).toBe(400);
    expect(await zipped.json()).toEqual({ code: "invalid_argument", message: "The request body exceeds the limit of 4096 bytes." });
    expect(zipped.headers.get("x-error-code")).toBe("request_too_large");
    const zippedId = zipped.headers.get("x-request-id");
    for (let i = 0; i < 100 && !gateway.shipper.rows.some((m) => m.requestId === zippedId); i++) await Bun.sleep(20);
    const zippedRow = gateway.shipper.rows.find((m) => m.requestId === zippedId);
    expect(zippedRow).toMatchObject({ status: RequestStatus.INVALID_REQUEST, errorCode: "request_too_large" });
  });

  test("an error naming a client's long input echoes a bounded part of it, and no header longer than a field path", async () => {
    const params = { model: "mock", messages: [{ role: "user", content: "hi" }], metadata: { ["k".repeat(3000)]: "v" } };
    const e = await rpcError(client("sk-good").createChatCompletion({ params }));
    expect(e.code).toBe(Code.InvalidArgument);
    expect(e.rawMessage.length).toBeLessThan(400);
    expect(e.rawMessage).toContain(`'${"k".repeat(256)}...'`);
    expect(e.metadata.get("x-error-param")).toBeNull();
    expect(e.metadata.get("x-error-code")).toBe("string_above_max_length");
  });

  test("an RPC without a valid key is answered before its message is read, and counted, not shipped", async () => {
    const before = await requestsCounted("chat_completions", "unknown", "unauthorized", 401);
    for (const key of ["", "sk-unknown"]) {
      // A body within the limit is declared and never sent: only an answer that does not wait for it arrives.
      const answer = await answerToHead(
        server.url,
        "POST /gateway.v1.GatewayService/CreateChatCompletion HTTP/1.1\r\nHost: gw\r\nContent-Type: application/proto\r\n" +
          `${key ? `Authorization: Bearer ${key}\r\n` : ""}Content-Length: 4000\r\n\r\n`,
      );
      expect(answer).toStartWith("HTTP/1.1 401");
      const requestId = /x-request-id: (\S+)/i.exec(answer)?.[1] ?? "";
      expect(isUlid(requestId)).toBe(true);
      expect(gateway.shipper.rows.find((m) => m.requestId === requestId)).toBeUndefined();
    }
    expect(await requestsCounted("chat_completions", "unknown", "unauthorized", 401)).toBe(before + 2);
  });

  test("an RPC whose key billing cannot check is unavailable, counted under the model its message names", async () => {
    const counted = () =>
      Promise.all([
        requestsCounted("chat_completions", "mock", "unavailable", 503),
        requestsCounted("embeddings", "mock", "unavailable", 503),
        requestsCounted("chat_completions", "unknown", "unavailable", 503),
      ]);
    const before = await counted();
    const ids: string[] = [];
    gateway.billing.setDown(true);
    try {
      const calls = [
        client("sk-down-1").createChatCompletion({ params: hello }),
        client("sk-down-2").createEmbedding({ model: "mock", input: ["hi"] }),
        (async () => {
          for await (const _ of client("sk-down-3").streamChatCompletion({ params: { ...hello, model: "made-up" } })) {
            // Refused before the stream opens.
          }
        })(),
      ];
      for (const call of calls) {
        const e = await rpcError(call);
        expect([e.code, e.metadata.get("x-error-code")]).toEqual([Code.Unavailable, "auth_unavailable"]);
        ids.push(e.metadata.get("x-request-id") ?? "");
      }
    } finally {
      gateway.billing.setDown(false);
    }
    // No key was accepted: Prometheus counts them, analytics never sees them.
    expect(gateway.shipper.rows.filter((m) => ids.includes(m.requestId))).toEqual([]);
    expect((await counted()).map((n, i) => n - (before[i] ?? 0))).toEqual([1, 1, 1]);
  });

  test("a gRPC message over the limit (no declared length) is resource_exhausted with the request id, metered", async () => {
    const params = { model: "mock", messages: [{ role: "user", content: "x".repeat(5000) }] };
    const e = await rpcError(client("sk-good").createChatCompletion({ params }));
    expect(e.code).toBe(Code.ResourceExhausted);
    const requestId = e.metadata.get("x-request-id") ?? "";
    expect(isUlid(requestId)).toBe(true);
    // Metered once the key is checked, after the answer.
    for (let i = 0; i < 100 && !gateway.shipper.rows.some((m) => m.requestId === requestId); i++) await Bun.sleep(20);
    const row = gateway.shipper.rows.find((m) => m.requestId === requestId);
    expect(row).toMatchObject({ status: RequestStatus.INVALID_REQUEST, orgId: "org_1", errorCode: "request_too_large" });
    expect(await gateway.core.settled(1000)).toBe(true);
  });

  test("a streamed chat's message over the limit is resource_exhausted and metered too large, not as a client that left", async () => {
    const params = { model: "mock", messages: [{ role: "user", content: "x".repeat(5000) }] };
    const transports = {
      grpc: client("sk-good"),
      "grpc-web over HTTP/1.1": createClient(GatewayService, createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" })),
      "connect over HTTP/2": createClient(GatewayService, createConnectTransport({ baseUrl: server.url, httpVersion: "2" })),
    };
    for (const [name, rpc] of Object.entries(transports)) {
      const streamed = async () => {
        for await (const _ of rpc.streamChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" } }));
      };
      const e = await rpcError(streamed());
      expect([name, e.code]).toEqual([name, Code.ResourceExhausted]);
      const requestId = e.metadata.get("x-request-id") ?? "";
      for (let i = 0; i < 100 && !gateway.shipper.rows.some((m) => m.requestId === requestId); i++) await Bun.sleep(20);
      const row = gateway.shipper.rows.find((m) => m.requestId === requestId);
      expect([name, row?.status, row?.httpStatus, row?.errorCode]).toEqual([name, RequestStatus.INVALID_REQUEST, 413, "request_too_large"]);
    }
  });

  test("a client that leaves while its message arrives is metered cancelled (499), as over REST, not invalid", async () => {
    const before = gateway.shipper.rows.length;
    const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
    await new Promise((resolve) => socket.once("connect", resolve));
    socket.write(
      "POST /gateway.v1.GatewayService/CreateChatCompletion HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\n" +
        'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"params":',
    );
    await Bun.sleep(200);
    socket.destroy();
    for (let i = 0; i < 100 && gateway.shipper.rows.length === before; i++) await Bun.sleep(20);
    expect(gateway.shipper.rows.slice(before)).toMatchObject([
      { status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request", orgId: "org_1" },
    ]);
  });

  test("a gRPC-Web message near the limit is served in text mode as in binary: its size is the decoded one", async () => {
    // 90% of the limit; its base64 is 120%.
    const request = create(CreateEmbeddingRequestSchema, { model: "mock", input: ["x".repeat(3680)] });
    const frame = grpcFrame(toBinary(CreateEmbeddingRequestSchema, request));
    for (const [type, body] of [
      ["application/grpc-web+proto", frame],
      ["application/grpc-web-text", frame.toString("base64")],
    ] as const) {
      const res = await fetch(`${server.url}/gateway.v1.GatewayService/CreateEmbedding`, {
        method: "POST",
        headers: { "content-type": type, "x-grpc-web": "1", authorization: "Bearer sk-good" },
        body,
      });
      const text = await res.text();
      const trailers = type.endsWith("text") ? Buffer.from(decodeBase64(text)).toString("latin1") : text;
      const status = /grpc-status:\s*(\d+)/.exec(trailers)?.[1];
      expect([type, status, res.headers.get("x-error-code")]).toEqual([type, "0", null]);
    }
    // One that decodes to more than the limit is still refused, once the limit's worth is read.
    const over = Buffer.concat([frame, frame]);
    over.writeUInt32BE(over.length - 5, 1);
    const res = await fetch(`${server.url}/gateway.v1.GatewayService/CreateEmbedding`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web-text", "x-grpc-web": "1", authorization: "Bearer sk-good" },
      body: over.toString("base64"),
    });
    // As a gRPC message is, which declares no length either.
    const trailers = Buffer.from(decodeBase64(await res.text())).toString("latin1");
    expect(/grpc-status:\s*(\d+)/.exec(trailers)?.[1]).toBe(String(Code.ResourceExhausted));
  });

  test("a gRPC-Web text body that is not base64 is INVALID_ARGUMENT, never decoded into other bytes and served", async () => {
    const message = toBinary(CreateEmbeddingRequestSchema, create(CreateEmbeddingRequestSchema, { model: "mock", input: ["hi"] }));
    const valid = grpcFrame(message).toString("base64");
    const before = gateway.shipper.rows.length;
    // Characters outside the alphabet between its groups, which Buffer skips; a body of nothing but them.
    for (const body of [valid.replace(/(.{8})/g, "$1!*~"), "!!!notbase64***", valid.replace(/=+$/, "").slice(0, -1)]) {
      const res = await fetch(`${server.url}/gateway.v1.GatewayService/CreateEmbedding`, {
        method: "POST",
        headers: { "content-type": "application/grpc-web-text", "x-grpc-web": "1", authorization: "Bearer sk-good" },
        body,
      });
      const text = await res.text();
      const said = `${text ? Buffer.from(decodeBase64(text)).toString("latin1") : ""} ${res.headers.get("grpc-status")}`;
      expect([body, /(\d+)/.exec(said.replace(/.*grpc-status:\s*/s, ""))?.[1]]).toEqual([body, String(Code.InvalidArgument)]);
    }
    const served = await fetch(`${server.url}/gateway.v1.GatewayService/CreateEmbedding`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web-text", "x-grpc-web": "1", authorization: "Bearer sk-good" },
      body: valid,
    });
    expect(Buffer.from(decodeBase64(await served.text())).toString("latin1")).toMatch(/grpc-status:\s*0/);
    for (let i = 0; i < 100 && gateway.shipper.rows.length < before + 1; i++) await Bun.sleep(20);
    expect(gateway.shipper.rows.slice(before).filter((r) => r.status === RequestStatus.OK)).toHaveLength(1);
  });

  test("a request envelope flagged as anything but compressed (an answer's end or trailers) is INVALID_ARGUMENT", async () => {
    const message = toBinary(CreateEmbeddingRequestSchema, create(CreateEmbeddingRequestSchema, { model: "mock", input: ["hi"] }));
    const statusOf = async (flags: number) => {
      const res = await fetch(`${server.url}/gateway.v1.GatewayService/CreateEmbedding`, {
        method: "POST",
        headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", authorization: "Bearer sk-good" },
        body: grpcFrame(message, flags),
      });
      const said = `${res.headers.get("grpc-status") ?? ""} ${Buffer.from(await res.arrayBuffer()).toString("latin1")}`;
      return /grpc-status:\s*(\d+)/.exec(said)?.[1] ?? res.headers.get("grpc-status");
    };
    expect([await statusOf(0x80), await statusOf(0x02), await statusOf(0)]).toEqual([String(Code.InvalidArgument), String(Code.InvalidArgument), "0"]);
  });

  test("answers Connect JSON calls, as a browser would make them", async () => {
    const res = await fetch(`${server.url}/gateway.v1.GatewayService/ListModels`, {
      method: "POST",
      headers: { authorization: "Bearer sk-limited", "content-type": "application/json" },
      body: "{}",
    });
    expect(res.status).toBe(200);
    expect(isUlid(res.headers.get("x-request-id") ?? "")).toBe(true);
    expect(((await res.json()) as { models: Array<{ id: string }> }).models.map((m) => m.id)).toEqual(["mock"]);
  });

  test("refuses a Connect JSON field the contract does not define, naming it, rather than answer without it", async () => {
    const call = (params: Record<string, unknown>) =>
      fetch(`${server.url}/gateway.v1.GatewayService/CreateChatCompletion`, {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ params: { ...hello, ...params } }),
      });
    const typo = await call({ maxCompletionTokenz: 1 });
    expect(typo.status).toBe(400);
    const error = (await typo.json()) as { code: string; message: string };
    expect(error.code).toBe("invalid_argument");
    expect(error.message).toContain("maxCompletionTokenz");
    expect((await call({ maxCompletionTokens: 1 })).status).toBe(200);
  });
});

describe("a client that takes its answer slowly, or takes nothing", () => {
  const upstream = startFakeUpstream();
  const metrics = createMetrics("gateway");
  let served: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    served = await startTestGateway(oneModelRoutes(upstream.url), {
      idleTimeoutSeconds: 1,
      gated: true,
      interceptors: [metrics.serverInterceptor],
    });
  });
  afterAll(() => Promise.all([served.close(), upstream.stop()]));

  // Words of a thousand characters, 8 MB in all: far more than a stream's window or a socket's buffers hold.
  const bigAnswer = ` ${"x".repeat(999)}`.repeat(8000);
  const params = { model: "ok", messages: [{ role: "user", content: "hello" }] };
  const cancelledStreams = async () => {
    const line = (await metrics.registry.metrics())
      .split("\n")
      .find((l) => l.startsWith('rpc_server_handled_total{rpc_service="gateway.v1.GatewayService",rpc_method="StreamChatCompletion",code="canceled"'));
    return Number(line?.split(" ").at(-1) ?? 0);
  };
  /** The handler's stream ended too: counted once it ends, with the code a client that left gets. */
  const expectOneMoreCancelled = async (before: number) => {
    for (let i = 0; i < 50 && (await cancelledStreams()) === before; i++) await Bun.sleep(50);
    expect(await cancelledStreams()).toBe(before + 1);
  };
  const within = <T>(p: Promise<T>, ms: number) => Promise.race([p, Bun.sleep(ms).then(() => "still open" as const)]);

  test("over gRPC on HTTP/2, a full window for the idle limit resets the stream and meters it as cancelled", async () => {
    upstream.script("ok", { content: bigAnswer });
    const before = await cancelledStreams();
    // A window of 1 KB, taken up by the first message, and never opened again.
    const { session, stream, requestId } = grpcChatStreamByHand(served.url, params);
    try {
      const reset = new Promise<number>((resolve) => stream.once("close", () => resolve(stream.rstCode)));
      stream.once("data", () => stream.pause());

      expect(await within(reset, 8_000)).toBe(http2.constants.NGHTTP2_CANCEL);
      const row = await served.row(await requestId, 8_000);
      expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
      // The prompt and what was streamed before the client stopped taking it.
      expect(row.usage?.inputTokens).toBeGreaterThan(0n);
      expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      await expectOneMoreCancelled(before);
    } finally {
      session.destroy();
    }
  }, 20_000);

  test("a REST stream over HTTP/2 whose client resets it is metered cancelled and its upstream call stopped", async () => {
    upstream.reset();
    upstream.script("ok", { content: "word ".repeat(400), chunkDelayMs: 5 });
    const session = http2.connect(served.url);
    session.on("error", () => {});
    try {
      const stream = session.request({
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        authorization: "Bearer sk-good",
      });
      stream.on("error", () => {});
      const requestId = new Promise<string>((resolve) => stream.once("response", (h) => resolve(String(h["x-request-id"]))));
      // A few events, then the client cancels the stream (RST_STREAM), its session going on.
      let events = 0;
      stream.on("data", (d: Buffer) => {
        events += d.toString().split("data: ").length - 1;
        if (events >= 3 && !stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      });
      stream.end(JSON.stringify({ ...params, stream: true }));

      // Within the 1 s idle limit and far short of the 400 chunks' 2 s: the reset itself ends it.
      const row = await served.row(await requestId, 1_000);
      expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
      expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      expect(row.usage?.outputTokens).toBeLessThan(400n);
      // The upstream hears its connection close soon after.
      for (let i = 0; i < 50 && !upstream.seen("ok")[0]?.aborted; i++) await Bun.sleep(20);
      expect(upstream.seen("ok")[0]?.aborted).toBe(true);
    } finally {
      session.destroy();
    }
  }, 20_000);

  test("over Connect on HTTP/1.1, a client that stops reading for the idle limit has its connection closed", async () => {
    upstream.script("ok", { content: bigAnswer });
    const before = await cancelledStreams();
    const socket = net.connect(Number(new URL(served.url).port), "127.0.0.1");
    socket.on("error", () => {});
    try {
      const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      // The response's head, then nothing more is read.
      const head = new Promise<string>((resolve) =>
        socket.once("data", (d: Buffer) => {
          socket.pause();
          resolve(d.toString("latin1"));
        }),
      );
      const body = grpcFrame(Buffer.from(JSON.stringify({ params })));
      socket.write(
        "POST /gateway.v1.GatewayService/StreamChatCompletion HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\n" +
          `Content-Type: application/connect+json\r\nContent-Length: ${body.length}\r\n\r\n`,
      );
      socket.write(body);
      const requestId = /x-request-id: (\w+)/i.exec(await head)?.[1] ?? "";

      const row = await served.row(requestId, 8_000);
      expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
      expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      // What the socket held arrives, then its end.
      socket.resume();
      expect(await within(closed, 5_000)).toBeUndefined();
      await expectOneMoreCancelled(before);
    } finally {
      socket.destroy();
    }
  }, 20_000);

  test("a client taking a large answer slowly but steadily gets all of it, over HTTP/1.1 and HTTP/2", async () => {
    // 16 MB: twice what the kernel's socket buffers take in at once, the rest going out as the client reads.
    const largeAnswer = bigAnswer.repeat(2);
    upstream.script("ok", { content: largeAnswer });
    upstream.script("ok", { content: largeAnswer });
    const body = JSON.stringify({ params });
    const path = "/gateway.v1.GatewayService/CreateChatCompletion";
    // About 4 MB/s: seconds in all, far longer than the idle limit, and never long without a byte.
    const slowly = (from: { pause(): void; resume(): void }, piece: Buffer) => {
      from.pause();
      setTimeout(() => from.resume(), piece.length / 4000);
    };
    const started = Date.now();
    const overHttp1 = new Promise<{ declared: number; got: number }>((resolve) => {
      const socket = net.connect(Number(new URL(served.url).port), "127.0.0.1");
      let answer = Buffer.alloc(0);
      const whole = () => {
        const head = answer.indexOf("\r\n\r\n");
        const declared = Number(/content-length: (\d+)/i.exec(answer.subarray(0, head).toString("latin1"))?.[1]);
        return { declared, got: answer.length - head - 4 };
      };
      socket.on("data", (d: Buffer) => {
        answer = Buffer.concat([answer, d]);
        if (whole().got === whole().declared) socket.destroy();
        slowly(socket, d);
      });
      socket.on("close", () => resolve(whole()));
      socket.write(
        `POST ${path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\n` +
          `Content-Length: ${body.length}\r\n\r\n${body}`,
      );
    });
    const session = http2.connect(served.url);
    session.on("error", () => {});
    const overHttp2 = new Promise<{ status: number; text: string }>((resolve) => {
      const stream = session.request({
        ":method": "POST",
        ":path": path,
        "content-type": "application/json",
        authorization: "Bearer sk-good",
      });
      stream.on("error", () => {});
      let status = 0;
      const chunks: Buffer[] = [];
      stream.once("response", (h) => (status = Number(h[":status"])));
      stream.on("data", (d: Buffer) => {
        chunks.push(d);
        slowly(stream, d);
      });
      stream.once("close", () => resolve({ status, text: Buffer.concat(chunks).toString() }));
      stream.end(body);
    });
    try {
      const [h1, h2] = await Promise.all([overHttp1, overHttp2]);
      expect(Date.now() - started).toBeGreaterThan(3_000);
      expect(h1.got).toBe(h1.declared);
      expect(h2.status).toBe(200);
      const answer = JSON.parse(h2.text) as { choices: Array<{ message: { content: string } }> };
      expect(answer.choices[0]?.message.content).toBe(largeAnswer);
    } finally {
      session.destroy();
    }
  }, 30_000);

  test("a client that stops taking a large answer over HTTP/1.1 has its connection closed at the idle limit", async () => {
    upstream.script("ok", { content: bigAnswer.repeat(2) });
    const socket = net.connect(Number(new URL(served.url).port), "127.0.0.1");
    socket.on("error", () => {});
    try {
      let got = 0;
      const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      const head = new Promise<string>((resolve) =>
        socket.once("data", (d: Buffer) => {
          socket.pause();
          resolve(d.toString("latin1"));
        }),
      );
      const body = JSON.stringify({ params });
      socket.write(
        "POST /gateway.v1.GatewayService/CreateChatCompletion HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\n" +
          `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
      );
      const declared = Number(/content-length: (\d+)/i.exec(await head)?.[1]);
      await Bun.sleep(2_500);
      // What the socket held arrives, then its end, short of the answer.
      socket.on("data", (d: Buffer) => (got += d.length));
      socket.resume();
      expect(await within(closed, 5_000)).toBeUndefined();
      expect(got).toBeLessThan(declared);
    } finally {
      socket.destroy();
    }
  }, 20_000);
});

describe("request messages are held to the contract's limits before they are decoded", () => {
  // As main.ts wires it: 4 MiB bodies, the limit applying after decompression.
  const maxBodyBytes = 4 * 1024 * 1024;
  let big: RunningServer;
  beforeAll(async () => {
    big = await startServer({
      name: "gateway-test",
      port: 0,
      host: "127.0.0.1",
      routes: gatewayRoutes(createGatewayService(gateway.core), maxBodyBytes),
      requestGate: createGatewayRequestGate(gateway.core, maxBodyBytes),
      readMaxBytes: maxBodyBytes,
      log: gateway.log,
    });
  });
  afterAll(() => big.close(0));

  // CreateChatCompletionRequest{params{model: "mock", messages: 2,000,000 × empty ChatMessage}}: 4 MB on the wire,
  // hundreds of megabytes once decoded.
  const emptyMessages = 2_000_000;
  const params = Buffer.concat([Buffer.from([0x0a, 0x04, ...Buffer.from("mock")]), Buffer.alloc(emptyMessages * 2)]);
  for (let i = 6; i < params.length; i += 2) params[i] = 0x12;
  const lengthPrefix = (n: number) => {
    const bytes = [];
    for (; n > 0x7f; n >>>= 7) bytes.push((n & 0x7f) | 0x80);
    return Buffer.from([...bytes, n]);
  };
  const bomb = Buffer.concat([Buffer.from([0x0a]), lengthPrefix(params.length), params]);
  const path = "/gateway.v1.GatewayService/CreateChatCompletion";

  /** What answering `send` cost: its time, and the process's resident memory at its peak. */
  async function cost<T>(send: () => Promise<T>): Promise<{ answer: T; ms: number; rssGrowth: number }> {
    Bun.gc(true);
    const before = process.memoryUsage().rss;
    let peak = before;
    const sample = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
    const started = performance.now();
    const answer = await send();
    const ms = performance.now() - started;
    clearInterval(sample);
    peak = Math.max(peak, process.memoryUsage().rss);
    return { answer, ms, rssGrowth: peak - before };
  }

  const connectPost = (body: Uint8Array, headers: Record<string, string> = {}) =>
    fetch(`${big.url}${path}`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/proto", ...headers },
      body,
    }).then(async (res) => ({ status: res.status, body: (await res.json()) as { code: string; message: string }, requestId: res.headers.get("x-request-id") }));

  /** Answered within a second and 64 MB: the message was not decoded. */
  const cheaply = async <T>(send: () => Promise<T>): Promise<T> => {
    const { answer, ms, rssGrowth } = await cost(send);
    expect(ms).toBeLessThan(1000);
    expect(rssGrowth).toBeLessThan(64 * 1024 * 1024);
    return answer;
  };
  const tooManyValues = {
    code: "invalid_argument",
    message: "The request message holds more than 100000 nested messages and list elements.",
  };

  const refusal = (length: number) =>
    `Invalid 'messages': array too long. Expected an array with maximum length 2048, but got an array with length ${length} instead.`;

  test("2,000,000 empty chat messages over Connect are refused cheaply as invalid_argument, and metered", async () => {
    const answer = await cheaply(() => connectPost(bomb));
    expect(answer.status).toBe(400);
    expect(answer.body).toEqual({ code: "invalid_argument", message: refusal(emptyMessages) });
    const row = await waitForRow(answer.requestId ?? "");
    expect(row).toMatchObject({ status: RequestStatus.INVALID_REQUEST, orgId: "org_1", errorCode: "array_above_max_length" });
  });

  test("the same message gzipped (3.9 KB) is held to the limit once decompressed", async () => {
    const gzipped = Bun.gzipSync(bomb, { level: 9 });
    expect(gzipped.length).toBeLessThan(10_000);
    const answer = await cheaply(() => connectPost(gzipped, { "content-encoding": "gzip" }));
    expect(answer.body).toEqual({ code: "invalid_argument", message: refusal(emptyMessages) });
  });

  test("over gRPC, compressed and not, the answer is InvalidArgument", async () => {
    const session = http2.connect(big.url);
    try {
      for (const compressed of [false, true]) {
        const message = compressed ? Bun.gzipSync(bomb) : bomb;
        const answer = await cheaply(
          () =>
            new Promise<Record<string, unknown>>((resolve, reject) => {
              const stream = session.request({
                ":method": "POST",
                ":path": path,
                "content-type": "application/grpc",
                te: "trailers",
                authorization: "Bearer sk-good",
                ...(compressed ? { "grpc-encoding": "gzip" } : {}),
              });
              let status: Record<string, unknown> = {};
              stream.on("response", (headers) => (status = { ...headers }));
              stream.on("trailers", (trailers) => (status = { ...status, ...trailers }));
              stream.on("error", reject);
              stream.on("close", () => resolve(status));
              stream.resume();
              stream.end(grpcFrame(message, compressed ? 1 : 0));
            }),
        );
        expect(answer["grpc-status"]).toBe(String(Code.InvalidArgument));
        expect(decodeURIComponent(String(answer["grpc-message"]))).toBe(refusal(emptyMessages));
      }
    } finally {
      session.close();
    }
  });

  test("a message of more values than any real request holds is refused whatever field holds them", async () => {
    // 2,048 messages of 60 empty content parts each: within every list limit, 124,928 values in all.
    const parts = Buffer.alloc(60 * 2, Buffer.from([0x1a, 0x00]));
    const message = Buffer.concat([Buffer.from([0x12, parts.length]), parts]);
    const many = Buffer.concat([Buffer.from([0x0a, 0x04, ...Buffer.from("mock")]), ...Array(2048).fill(message)]);
    const answer = await connectPost(Buffer.concat([Buffer.from([0x0a]), lengthPrefix(many.length), many]));
    expect(answer.body).toEqual(tooManyValues);
  });

  test("Connect JSON of 4 MB of empty objects is refused before it is parsed", async () => {
    const json = `{"params":{"model":"mock","messages":[${Array(1_300_000).fill("{}").join(",")}]}}`;
    const answer = await cheaply(() => connectPost(Buffer.from(json), { "content-type": "application/json" }));
    expect(answer.body).toEqual(tooManyValues);
  });

  test("Connect JSON of 1,900,000 numbers in a Struct is refused before it is decoded: each would be a Value message", async () => {
    const numbers = Array(1_900_000).fill("0").join(",");
    const responseFormat = `{"type":"json_schema","jsonSchema":{"a":[${numbers}]}}`;
    const json = `{"params":{"model":"mock","messages":[{"role":"user","content":"hi"}],"responseFormat":${responseFormat}}}`;
    const answer = await cheaply(() => connectPost(Buffer.from(json), { "content-type": "application/json" }));
    expect(answer.body).toEqual(tooManyValues);
  });

  test("Connect JSON of 2,048 messages of 20 parts each, and tools with their schemas, is answered", async () => {
    const parts = Array.from({ length: 20 }, (_, i) => ({ text: `part ${i}` }));
    const messages = Array.from({ length: 2048 }, () => ({ role: "user", parts }));
    const schema = { type: "object", properties: { city: { type: "string", enum: ["a", "b", "c"] } }, required: ["city"] };
    const tools = Array.from({ length: 64 }, (_, i) => ({
      type: "function",
      function: { name: `tool_${i}`, parameters: schema },
    }));
    const json = JSON.stringify({ params: { model: "mock", messages, tools } });
    const answer = await connectPost(Buffer.from(json), { "content-type": "application/json" });
    expect(answer.status).toBe(200);
  });

  test("a request of 2,048 messages, the most allowed, is answered", async () => {
    const messages = Array.from({ length: 2048 }, (_, i) => ({ role: "user", content: `turn ${i}` }));
    const res = await createServiceClient(GatewayService, { baseUrl: big.url, bearerToken: "sk-good" }).createChatCompletion({
      params: { model: "mock", messages },
    });
    expect(res.choices[0]?.message?.content).toBe("mock reply: turn 2047");
    const tooMany = await rpcError(
      createServiceClient(GatewayService, { baseUrl: big.url, bearerToken: "sk-good" }).createChatCompletion({
        params: { model: "mock", messages: [...messages, { role: "user", content: "one more" }] },
      }),
    );
    expect(tooMany.code).toBe(Code.InvalidArgument);
    expect(tooMany.rawMessage).toBe(refusal(2049));
    expect(tooMany.metadata.get("x-error-code")).toBe("array_above_max_length");
  });
});

async function waitForRow(requestId: string) {
  for (let i = 0; i < 100 && !gateway.shipper.rows.some((m) => m.requestId === requestId); i++) await Bun.sleep(20);
  return gateway.shipper.rows.find((m) => m.requestId === requestId);
}

describe("a client's deadline, and a client that leaves", () => {
  // `lazy` answers after 3 s; `drip` streams one token every 100 ms.
  const routes = [
    "providers:",
    "  - { name: lazy, kind: mock, latency_ms: 3000 }",
    "  - { name: drip, kind: mock, chunk_latency_ms: 100 }",
    "models:",
    ...["lazy", "drip"].flatMap((name) => [
      `  - name: ${name}`,
      `    targets: [{ provider: ${name}, model: ${name}-1 }]`,
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
    ]),
  ].join("\n");
  let served: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    served = await startTestGateway(routes, { gated: true });
  });
  afterAll(() => served.close());

  const params = (model: string) => ({ params: { model, messages: [{ role: "user", content: "word ".repeat(100) }] } });
  const unary = "/gateway.v1.GatewayService/CreateChatCompletion";
  const streaming = "/gateway.v1.GatewayService/StreamChatCompletion";
  const envelope = (json: unknown) => grpcFrame(Buffer.from(JSON.stringify(json)));

  /** A gRPC call made by hand, so that only the server's answer (not a client's own timer) decides its status. */
  function grpcCall(path: string, headers: Record<string, string>) {
    const session = http2.connect(served.url);
    return new Promise<{ status: string; requestId: string }>((resolve, reject) => {
      const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc+json", te: "trailers", authorization: "Bearer sk-good", ...headers });
      let requestId = "";
      let trailers: http2.IncomingHttpHeaders = {};
      stream.on("response", (h) => {
        requestId = String(h["x-request-id"] ?? "");
        // A trailers-only answer carries its status in the headers.
        trailers = h;
      });
      stream.on("trailers", (t) => (trailers = t));
      stream.on("error", reject);
      stream.on("close", () => {
        session.close();
        resolve({ status: String(trailers["grpc-status"]), requestId });
      });
      stream.resume();
      stream.end(envelope(params(path === unary ? "lazy" : "drip")));
    });
  }

  test("passing over Connect is deadline_exceeded (504), metered as a timeout, unary and streaming", async () => {
    const res = await fetch(`${served.url}${unary}`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json", "connect-timeout-ms": "300" },
      body: JSON.stringify(params("lazy")),
    });
    expect(res.status).toBe(504);
    expect(((await res.json()) as { code: string }).code).toBe("deadline_exceeded");
    expect(await served.row(res.headers.get("x-request-id") ?? "")).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });

    const stream = await fetch(`${served.url}${streaming}`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/connect+json", "connect-timeout-ms": "300" },
      body: envelope(params("drip")),
    });
    const body = Buffer.from(await stream.arrayBuffer());
    // The last envelope ends the stream with its error.
    const end = grpcFrames(body).at(-1)?.message.toString() ?? "";
    expect(JSON.parse(end)).toMatchObject({ error: { code: "deadline_exceeded" } });
    const row = await served.row(stream.headers.get("x-request-id") ?? "");
    expect(row).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
    // What streamed before the deadline is counted.
    expect(row.usage?.outputTokens).toBeGreaterThan(0n);
  });

  test("passing over gRPC is DEADLINE_EXCEEDED, metered as a timeout, unary and streaming", async () => {
    for (const path of [unary, streaming]) {
      const answer = await grpcCall(path, { "grpc-timeout": "300m" });
      expect(answer.status).toBe(String(Code.DeadlineExceeded));
      expect(await served.row(answer.requestId)).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
    }
  });

  test("a deadline of 0, passed before the call begins, is answered and metered once as a timeout", async () => {
    const before = served.shipper.rows.length;
    // grpc-js sends `0m` for a deadline that passed before the call went out.
    for (const path of [unary, streaming]) {
      const answer = await grpcCall(path, { "grpc-timeout": "0m" });
      expect(answer.status).toBe(String(Code.DeadlineExceeded));
      expect(await served.row(answer.requestId)).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504, orgId: "org_1" });
    }
    const res = await fetch(`${served.url}${unary}`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json", "connect-timeout-ms": "0" },
      body: JSON.stringify(params("lazy")),
    });
    expect(res.status).toBe(504);
    expect(await served.row(res.headers.get("x-request-id") ?? "")).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
    await Bun.sleep(100);
    expect(served.shipper.rows.length).toBe(before + 3);
  });

  /** A grpc-js client, which gives up at its deadline and resets the stream, racing the server's own timer. */
  function grpcJsClient() {
    const definition = loadSync("gateway/v1/gateway.proto", { includeDirs: ["proto", "third_party/proto"], keepCase: true, longs: String });
    type Client = grpc.Client & {
      StreamChatCompletion(req: unknown, m: grpc.Metadata, options?: grpc.CallOptions): grpc.ClientReadableStream<unknown>;
      CreateChatCompletion(req: unknown, m: grpc.Metadata, options: grpc.CallOptions, done: (e: grpc.ServiceError | null) => void): void;
    };
    const { gateway } = grpc.loadPackageDefinition(definition) as unknown as {
      gateway: { v1: { GatewayService: new (address: string, credentials: grpc.ChannelCredentials) => Client } };
    };
    return new gateway.v1.GatewayService(new URL(served.url).host, grpc.credentials.createInsecure());
  }
  const metadata = () => {
    const m = new grpc.Metadata();
    m.set("authorization", "Bearer sk-good");
    return m;
  };
  /** The request id from a stream's headers, and the status it failed with. */
  const streamFailure = (stream: grpc.ClientReadableStream<unknown>, onData = () => {}) =>
    new Promise<{ code: number; requestId: string; chunks: number }>((resolve) => {
      let requestId = "";
      let chunks = 0;
      stream.on("metadata", (m: grpc.Metadata) => (requestId = String(m.get("x-request-id")[0] ?? "")));
      stream.on("data", () => (chunks++, onData()));
      stream.on("error", (e: grpc.ServiceError) => resolve({ code: e.code, requestId, chunks }));
    });

  test("a grpc-js client's deadline is metered as a timeout, though its reset may reach the gateway first", async () => {
    const client = grpcJsClient();
    try {
      for (let i = 0; i < 3; i++) {
        const stream = client.StreamChatCompletion(params("drip"), metadata(), { deadline: Date.now() + 400 });
        const { code, requestId, chunks } = await streamFailure(stream);
        expect(code).toBe(grpc.status.DEADLINE_EXCEEDED);
        expect(chunks).toBeGreaterThan(0);
        const row = await served.row(requestId);
        expect(row).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504 });
        expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      }
      const before = served.shipper.rows.length;
      for (let i = 0; i < 3; i++) {
        const code = await new Promise((resolve) =>
          client.CreateChatCompletion(params("lazy"), metadata(), { deadline: Date.now() + 300 }, (e: grpc.ServiceError | null) => resolve(e?.code)),
        );
        expect(code).toBe(grpc.status.DEADLINE_EXCEEDED);
      }
      // The answer never reached the client, nor its request id: every row recorded since is one of these calls.
      for (let i = 0; i < 100 && served.shipper.rows.length < before + 3; i++) await Bun.sleep(20);
      expect(served.shipper.rows.slice(before).map((r) => r.status)).toEqual(Array(3).fill(RequestStatus.TIMEOUT));
    } finally {
      client.close();
    }
  });

  test("a deadline passing while billing checks the key is answered then, in the gateway's words, and metered once", async () => {
    const slow = await startTestGateway(routes, { gated: true });
    slow.billing.setDelay(3000);
    try {
      // Each key is checked once, so each call waits for billing: sk-good unary, sk-limited streaming.
      const calls = [
        { key: "sk-good", path: unary, type: "application/json", body: JSON.stringify(params("lazy")) },
        { key: "sk-limited", path: streaming, type: "application/connect+json", body: envelope(params("drip")) },
      ];
      const before = slow.shipper.rows.length;
      const answered = await Promise.all(
        calls.map(async ({ key, path, type, body }) => {
          const sent = performance.now();
          const res = await fetch(`${slow.url}${path}`, {
            method: "POST",
            headers: { authorization: `Bearer ${key}`, "content-type": type, "connect-timeout-ms": "100" },
            body,
          });
          const text = await res.text();
          return { key, res, text, ms: performance.now() - sent };
        }),
      );
      for (const { key, res, text, ms } of answered) {
        // At the deadline, not once billing has answered, three seconds later.
        expect(ms).toBeLessThan(1500);
        expect(text).toContain("The request did not finish within the client's deadline.");
        expect(text).toContain("deadline_exceeded");
        // Metered once the key is checked, after the answer.
        const row = await slow.row(res.headers.get("x-request-id") ?? "", 15_000);
        expect(row).toMatchObject({ status: RequestStatus.TIMEOUT, httpStatus: 504, orgId: key === "sk-good" ? "org_1" : "org_2" });
      }
      // A handler run after its answer would meter the call a second time, under a request id of its own.
      await Bun.sleep(300);
      expect(slow.shipper.rows.length).toBe(before + 2);
    } finally {
      await slow.close();
    }
  });

  test("a deadline passing while the message arrives is answered and metered once, its handler not run", async () => {
    const before = served.shipper.rows.length;
    const body = JSON.stringify(params("lazy"));
    const socket = net.connect(Number(new URL(served.url).port), "127.0.0.1");
    await new Promise((resolve) => socket.once("connect", resolve));
    let answer = "";
    socket.on("data", (data) => (answer += data));
    socket.write(
      `POST ${unary} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\n` +
        `Connect-Timeout-Ms: 100\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 10)}`,
    );
    await Bun.sleep(300);
    socket.write(body.slice(10));
    for (let i = 0; i < 100 && !answer.includes("deadline_exceeded"); i++) await Bun.sleep(20);
    socket.destroy();
    expect(answer).toStartWith("HTTP/1.1 504");
    // A handler run after the answer would fail into no one's hands and meter the call again under its own id.
    await Bun.sleep(300);
    expect(served.shipper.rows.slice(before)).toMatchObject([{ status: RequestStatus.TIMEOUT, httpStatus: 504 }]);
  });

  test("a grpc-js client that cancels a stream midway is metered cancelled with the tokens streamed so far", async () => {
    const client = grpcJsClient();
    try {
      const stream = client.StreamChatCompletion(params("drip"), metadata());
      let seen = 0;
      const { code, requestId } = await streamFailure(stream, () => ++seen === 5 && stream.cancel());
      expect(code).toBe(grpc.status.CANCELLED);
      const row = await served.row(requestId);
      // 100 words are 125 mock tokens at 100 ms each: the upstream was still sending when the client left.
      expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499 });
      expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      expect(row.usage?.outputTokens).toBeLessThan(20n);
    } finally {
      client.close();
    }
  });
});
