import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as http2 from "node:http2";
import net from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { trace } from "@opentelemetry/api";
import { isValid as isUlid } from "ulid";
import { answerToHead } from "../lib/testing.ts";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { GatewayService, StreamChatCompletionRequestSchema } from "../gen/gateway/v1/gateway_pb.ts";
import { createMetrics } from "../lib/metrics.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { createRestApp } from "./http/app.ts";
import { restRoutes } from "./http/node.ts";
import { createGatewayRequestGate, createGatewayService } from "./service.ts";
import { createTestCore } from "./testing.ts";
import { startFakeUpstream } from "./testing/fake-upstream.ts";
import { oneModelRoutes, startTestGateway } from "./testing/served-gateway.ts";

// One real server on port 0 carrying both the RPCs and the REST API, as main.ts wires them.
let server: RunningServer;
const gateway = createTestCore();

beforeAll(async () => {
  const rest = createRestApp({ core: gateway.core, tracer: trace.getTracer("test"), maxBodyBytes: 4096 });
  server = await startServer({
    name: "gateway-test",
    port: 0,
    routes: (router) => router.service(GatewayService, createGatewayService(gateway.core)),
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
    expect(await invalid({ responseFormat: { type: "bogus" } })).toEqual(["response_format.type", "invalid_value"]);
    expect(await invalid({ responseFormat: { type: "json_schema" } })).toEqual(["response_format.json_schema.name", "missing_required_parameter"]);
    expect(await invalid({ tools: [{ type: "function", function: { name: "look up" } }] })).toEqual(["tools[0].function.name", "invalid_value"]);
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
        model("keyless", "keyless"),
      ].join("\n"),
    );
  });
  afterAll(() => Promise.all([served.close(), upstream.stop()]));

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

  test("an RPC without a valid key is answered before its message is read, and metered", async () => {
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
      const row = gateway.shipper.rows.find((m) => m.requestId === requestId);
      expect(row).toMatchObject({ httpStatus: 401 });
    }
  });

  test("an RPC whose key billing cannot check is unavailable, counted under the model its message names", async () => {
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
    const rows = ids.map((id) => gateway.shipper.rows.find((m) => m.requestId === id));
    expect(rows.map((m) => [m?.status, m?.httpStatus, m?.requestedModel])).toEqual([
      [RequestStatus.UNAVAILABLE, 503, "mock"],
      [RequestStatus.UNAVAILABLE, 503, "mock"],
      [RequestStatus.UNAVAILABLE, 503, "made-up"],
    ]);
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
});

describe("a streamed RPC whose client takes nothing", () => {
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
  const enveloped = (message: Uint8Array) => {
    const out = Buffer.alloc(5 + message.length);
    out.writeUInt32BE(message.length, 1);
    out.set(message, 5);
    return out;
  };
  const cancelledStreams = async () => {
    const line = (await metrics.registry.metrics())
      .split("\n")
      .find((l) => l.startsWith('rpc_server_handled_total{rpc_service="gateway.v1.GatewayService",rpc_method="StreamChatCompletion",code="canceled"'));
    return Number(line?.split(" ").at(-1) ?? 0);
  };
  const within = <T>(p: Promise<T>, ms: number) => Promise.race([p, Bun.sleep(ms).then(() => "still open" as const)]);

  test("over gRPC on HTTP/2, a full window for the idle limit resets the stream and meters it as cancelled", async () => {
    upstream.script("ok", { content: bigAnswer });
    const before = await cancelledStreams();
    // A window of 1 KB, taken up by the first message, and never opened again.
    const session = http2.connect(served.url, { settings: { initialWindowSize: 1024 } });
    session.on("error", () => {});
    try {
      const stream = session.request({
        ":method": "POST",
        ":path": "/gateway.v1.GatewayService/StreamChatCompletion",
        "content-type": "application/grpc+proto",
        te: "trailers",
        authorization: "Bearer sk-good",
      });
      stream.on("error", () => {});
      const requestId = new Promise<string>((resolve) => stream.once("response", (h) => resolve(String(h["x-request-id"]))));
      const reset = new Promise<number>((resolve) => stream.once("close", () => resolve(stream.rstCode)));
      stream.once("data", () => stream.pause());
      stream.end(enveloped(toBinary(StreamChatCompletionRequestSchema, create(StreamChatCompletionRequestSchema, { params }))));

      expect(await within(reset, 8_000)).toBe(http2.constants.NGHTTP2_CANCEL);
      const row = await served.row(await requestId, 8_000);
      expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
      // The prompt and what was streamed before the client stopped taking it.
      expect(row.usage?.inputTokens).toBeGreaterThan(0n);
      expect(row.usage?.outputTokens).toBeGreaterThan(0n);
      // The handler's stream ended too: counted when it ends, with the code a client that left gets.
      for (let i = 0; i < 50 && (await cancelledStreams()) === before; i++) await Bun.sleep(50);
      expect(await cancelledStreams()).toBe(before + 1);
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
      const body = enveloped(Buffer.from(JSON.stringify({ params })));
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
      for (let i = 0; i < 50 && (await cancelledStreams()) === before; i++) await Bun.sleep(50);
      expect(await cancelledStreams()).toBe(before + 1);
    } finally {
      socket.destroy();
    }
  }, 20_000);
});
