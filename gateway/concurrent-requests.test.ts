import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { trace } from "@opentelemetry/api";
import { Registry } from "prom-client";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { createKeyAuthorizer, type KeyChangeWatch, watchKeyChanges } from "./auth.ts";
import { parseGatewayConfig } from "./config.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp } from "./http/app.ts";
import { serveRest } from "./http/bun.ts";
import { restRoutes } from "./http/node.ts";
import { createProviders } from "./providers/index.ts";
import { createRateLimiter, type RateLimiter } from "./rate-limits.ts";
import { createGatewayService, gatewayRoutes } from "./service.ts";
import { createRecordingShipper, createTestLogger } from "./testing.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";

// Real billing (Postgres) whose key changes the gateway follows, a real upstream on a socket, and the gateway's REST
// API on both its ports and its RPCs on a real one.
const adminToken = "concurrency-test-admin-token-01";
const auth = { headers: { authorization: `Bearer ${adminToken}` } };
let db: TestDatabase;
let billing: ReturnType<typeof createClient<typeof BillingService>>;
let upstream: FakeUpstream;
let watch: KeyChangeWatch;
let limiter: RateLimiter;
let server: RunningServer;
let fast: ReturnType<typeof serveRest>;
let orgId: string;
const registry = new Registry();
const shipper = createRecordingShipper();

beforeAll(async () => {
  db = await createTestDatabase();
  const billingLog = createLogger({ service: "billing-test", level: "error" });
  const app = createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log: billingLog });
  billing = createClient(BillingService, createRouterTransport(app.routes));
  orgId = (await billing.createOrganization({ name: "concurrency" }, auth)).organization?.id as string;
  upstream = startFakeUpstream();
  const config = parseGatewayConfig(
    `
providers:
  - { name: fake, kind: openai, base_url: "${upstream.url}" }
models:
  - name: ok
    targets: [{ provider: fake, model: ok }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: slow
    targets: [{ provider: fake, model: slow }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: failing
    targets: [{ provider: fake, model: failing }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    retries: 0
`,
    "concurrency.yaml",
  );
  // Cached for a minute: only billing's change stream explains a new limit applying within the test.
  const keys = createKeyAuthorizer({
    billing: { authorizeKey: (req) => billing.authorizeKey(req, auth) },
    hitTtlMs: 60_000,
    missTtlMs: 60_000,
  });
  watch = watchKeyChanges({
    billing: { watchKeyChanges: (req, options) => billing.watchKeyChanges(req, { ...options, ...auth }) },
    keys,
  });
  limiter = createRateLimiter({ registry });
  const log = createTestLogger();
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, {}),
    keys,
    shipper,
    instanceId: "gw-concurrency",
    log,
    registry,
    rateLimits: limiter,
    routing: { backoffBaseMs: 5, requestTimeoutMs: 30_000 },
  });
  const rest = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 1 << 20 });
  fast = serveRest(rest, { port: 0, hostname: "127.0.0.1", maxBodyBytes: 1 << 20 });
  server = await startServer({
    name: "gateway-test",
    port: 0,
    host: "127.0.0.1",
    routes: gatewayRoutes(createGatewayService(core), 1 << 20),
    http: restRoutes(rest),
    log,
    registry,
  });
  await until(() => watch.healthy());
}, 60_000);

afterAll(async () => {
  await watch?.stop();
  await Promise.all([server?.close(0, 0), fast?.close(0, 0)]);
  await upstream?.stop();
  await db?.drop();
}, 30_000);

async function until(condition: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await condition())) {
    if (performance.now() > deadline) throw new Error("condition not met in time");
    await Bun.sleep(10);
  }
}

async function keyWith(maxConcurrentRequests: number) {
  const created = await billing.createApiKey({ orgId, name: "k", limits: { maxConcurrentRequests } }, auth);
  return { secret: created.secret, id: created.apiKey?.id as string };
}

type Port = "bun" | "node";
const portUrl = (port: Port) => (port === "bun" ? fast.url : server.url);

function post(port: Port, key: string, path: string, body: Record<string, unknown>, signal?: AbortSignal) {
  return fetch(`${portUrl(port)}/v1/${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

const hi = (model: string, extra: Record<string, unknown> = {}) => ({
  model,
  messages: [{ role: "user", content: "hi" }],
  ...extra,
});
const rpcHi = (model: string) => ({ params: { model, messages: [{ role: "user", content: "hi" }] } });
const rpc = (key: string) => createServiceClient(GatewayService, { baseUrl: server.url, bearerToken: key });
// A streamed answer of twenty words, one every 300 ms: six seconds, unless it is cut.
const slowly = { content: Array.from({ length: 20 }, (_, i) => `w${i}`).join(" "), chunkDelayMs: 300 };

/** Opens a stream on a port and reads its first event; resolves to what reads the rest or leaves it. */
async function openStream(
  port: Port,
  key: string,
  path = "chat/completions",
  body: Record<string, unknown> = hi("slow", { stream: true }),
) {
  const leave = new AbortController();
  const res = await post(port, key, path, body, leave.signal);
  expect(res.status).toBe(200);
  const reader = (res.body as ReadableStream<Uint8Array>).getReader();
  await reader.read();
  return {
    requestId: res.headers.get("x-request-id") as string,
    finish: async () => {
      while (!(await reader.read()).done);
    },
    leave: () => leave.abort(),
  };
}

/** Opens a streamed RPC and takes its first message; resolves to what reads the rest or leaves it. */
async function openRpcStream(key: string) {
  const leave = new AbortController();
  const messages = rpc(key).streamChatCompletion(rpcHi("slow"), { signal: leave.signal })[Symbol.asyncIterator]();
  await messages.next();
  return {
    finish: async () => {
      while (!(await messages.next()).done);
    },
    leave: () => leave.abort(),
  };
}

const rpcCode = (call: Promise<unknown>) =>
  call.then(
    () => "ok",
    (e: unknown) => Code[ConnectError.from(e).code],
  );

const heldGauge = async () => {
  const metric = await registry.getSingleMetric("gateway_key_concurrent_requests")?.get();
  return metric?.values[0]?.value;
};

describe("max_concurrent_requests", () => {
  test("holds under concurrent streams on both REST ports and RPCs: 429 rate_limit_exceeded before any upstream call", async () => {
    upstream.script("slow", slowly);
    const key = await keyWith(3);
    const running = [
      await openStream("bun", key.secret),
      await openStream("node", key.secret),
      await openRpcStream(key.secret),
    ];
    const sent = upstream.requests.length;
    expect(limiter.concurrent()).toBe(3);
    expect(await heldGauge()).toBe(3);

    for (const port of ["bun", "node"] as const) {
      for (const [path, body] of [
        ["chat/completions", hi("ok")],
        ["chat/completions", hi("slow", { stream: true })],
        ["embeddings", { model: "ok", input: "hi" }],
        ["responses", { model: "ok", input: "hi" }],
      ] as const) {
        const res = await post(port, key.secret, path, body);
        expect(res.status).toBe(429);
        expect(res.headers.get("retry-after")).toBe("1");
        expect(res.headers.get("retry-after-ms")).toBe("1000");
        const { error } = (await res.json()) as { error: Record<string, unknown> };
        expect(error).toEqual({
          message: "Rate limit reached for concurrent requests: limit 3, in flight 3. Retry once one of them has ended.",
          type: "requests",
          param: null,
          code: "rate_limit_exceeded",
        });
        const row = shipper.rows.find((m) => m.requestId === res.headers.get("x-request-id"));
        expect(row).toMatchObject({ status: RequestStatus.RATE_LIMITED, httpStatus: 429 });
      }
    }
    const refused = await rpc(key.secret)
      .createChatCompletion(rpcHi("ok"))
      .catch((e: unknown) => ConnectError.from(e));
    expect(refused).toMatchObject({ code: Code.ResourceExhausted });
    expect((refused as ConnectError).rawMessage).toContain("concurrent requests: limit 3");
    expect(await rpcCode(rpc(key.secret).createEmbedding({ model: "ok", input: ["hi"] }))).toBe("ResourceExhausted");
    const streamed = async () => {
      for await (const _ of rpc(key.secret).streamChatCompletion(rpcHi("ok")));
    };
    expect(await rpcCode(streamed())).toBe("ResourceExhausted");
    // None reached an upstream; another key is not held back by this one's.
    expect(upstream.requests.length).toBe(sent);
    const other = await keyWith(0);
    expect((await post("bun", other.secret, "chat/completions", hi("ok"))).status).toBe(200);
    const refusals = await registry.getSingleMetric("gateway_requests_total")?.get();
    expect(
      refusals?.values.filter((v) => v.labels.status === "rate_limited").reduce((sum, v) => sum + v.value, 0),
    ).toBeGreaterThanOrEqual(11);

    for (const s of running) s.leave();
    await until(() => limiter.concurrent() === 0);
    expect((await post("node", key.secret, "chat/completions", hi("ok"))).status).toBe(200);
  }, 30_000);

  test("a slot frees however a request ends: whole, streamed to the end, an upstream error, a client leaving mid-stream", async () => {
    const quickly = { ...slowly, chunkDelayMs: 5 };
    upstream.script("slow", quickly);
    upstream.script("failing", { status: 500 });
    const key = await keyWith(1);
    /** Passes once the key's one slot is free: a request is served rather than refused. */
    const free = async () => {
      await until(() => limiter.concurrent() === 0);
      const res = await post("bun", key.secret, "chat/completions", hi("ok"));
      expect(res.status).toBe(200);
      await res.text();
    };
    for (const port of ["bun", "node"] as const) {
      expect((await post(port, key.secret, "chat/completions", hi("ok"))).status).toBe(200);
      await free();
      expect((await post(port, key.secret, "embeddings", { model: "ok", input: "hi" })).status).toBe(200);
      await free();
      expect((await post(port, key.secret, "responses", { model: "ok", input: "hi" })).status).toBe(200);
      await free();
      await (await openStream(port, key.secret)).finish();
      await free();
      const responses = await openStream(port, key.secret, "responses", { model: "slow", input: "hi", stream: true });
      await responses.finish();
      await free();
      const failed = await post(port, key.secret, "chat/completions", hi("failing"));
      expect(failed.status).toBe(502);
      await free();
      const failedStream = await post(port, key.secret, "chat/completions", hi("failing", { stream: true }));
      expect(failedStream.status).toBe(502);
      await free();
      // A client that leaves mid-stream: its stream is cut upstream and its slot freed before the answer's end (its end
      // is metered first, the output counted by the tokenizer, whose first use loads its encoding: about a second).
      upstream.script("slow", slowly);
      const left = await openStream(port, key.secret);
      expect((await post(port, key.secret, "chat/completions", hi("ok"))).status).toBe(429);
      const before = upstream.seen("slow").length;
      left.leave();
      await until(() => limiter.concurrent() === 0, 4_000);
      await until(() => upstream.seen("slow")[before - 1]?.aborted === true, 4_000);
      await until(() => shipper.rows.some((m) => m.requestId === left.requestId));
      expect(shipper.rows.find((m) => m.requestId === left.requestId)?.status).toBe(RequestStatus.CANCELLED);
      await free();
      upstream.script("slow", quickly);
      // A request the gateway refuses before admission (an unknown model) holds nothing.
      expect((await post(port, key.secret, "chat/completions", hi("nope"))).status).toBe(404);
      await free();
    }
    expect(await rpcCode(rpc(key.secret).createChatCompletion(rpcHi("ok")))).toBe("ok");
    await free();
    expect(await rpcCode(rpc(key.secret).createChatCompletion(rpcHi("failing")))).not.toBe("ok");
    await free();
    await (await openRpcStream(key.secret)).finish();
    await free();
    upstream.script("slow", slowly);
    const leaving = await openRpcStream(key.secret);
    expect(await rpcCode(rpc(key.secret).createChatCompletion(rpcHi("ok")))).toBe("ResourceExhausted");
    leaving.leave();
    await until(() => limiter.concurrent() === 0, 4_000);
    await free();
  }, 60_000);

  test("a client leaving once every choice has finished frees its slot at once, while the usage after it is read", async () => {
    const usage = { prompt_tokens: 7, completion_tokens: 2, total_tokens: 9 };
    upstream.script("slow", { content: "one two", chunkDelayMs: 5, usageDelayMs: 2_500, usage });
    const key = await keyWith(1);
    for (const port of ["bun", "node"] as const) {
      const leave = new AbortController();
      const res = await post(port, key.secret, "chat/completions", hi("slow", { stream: true }), leave.signal);
      const reader = (res.body as ReadableStream<Uint8Array>).getReader();
      let text = "";
      while (!text.includes('"finish_reason":"stop"')) text += new TextDecoder().decode((await reader.read()).value);
      leave.abort();
      // Well before the upstream's usage comes, 2.5 s after the last choice finished.
      await until(() => limiter.concurrent() === 0, 1_500);
      const requestId = res.headers.get("x-request-id");
      await until(() => shipper.rows.some((m) => m.requestId === requestId), 6_000);
      const row = shipper.rows.find((m) => m.requestId === requestId);
      expect(row?.usage).toMatchObject({ inputTokens: 7n, outputTokens: 2n });
      expect(row?.usageEstimated).toBe(false);
    }
    upstream.script("slow", slowly);
  }, 30_000);

  test("a new limit reaches a running gateway on billing's change stream; running requests keep their slots", async () => {
    // A minute long: none may end on its own while the limit's changes reach the gateway on a loaded machine.
    upstream.script("slow", { ...slowly, content: Array.from({ length: 200 }, (_, i) => `w${i}`).join(" ") });
    const key = await keyWith(1);
    // Held until the end: an answer nothing refers to may be collected, and its request closed with it.
    const open: Response[] = [];
    /** Opens a stream once the key's limit lets it, as the gateway learns of a change. */
    const admitted = async (port: Port) => {
      for (;;) {
        const leave = new AbortController();
        const res = await post(port, key.secret, "chat/completions", hi("slow", { stream: true }), leave.signal);
        if (res.status === 200) {
          open.push(res);
          return leave;
        }
        expect(res.status).toBe(429);
        await res.text();
        await Bun.sleep(20);
      }
    };
    const first = await openStream("bun", key.secret);
    expect((await post("bun", key.secret, "chat/completions", hi("ok"))).status).toBe(429);
    const mask = { paths: ["max_concurrent_requests"] };
    const raise = { apiKeyId: key.id, limits: { maxConcurrentRequests: 2 }, updateMask: mask };
    await billing.updateApiKeyLimits(raise, auth);
    const second = await admitted("node");
    expect((await post("bun", key.secret, "chat/completions", hi("ok"))).status).toBe(429);
    // Lowered below what runs, nothing more is admitted until enough have ended.
    await billing.updateApiKeyLimits({ ...raise, limits: { maxConcurrentRequests: 1 } }, auth);
    await until(async () => {
      const res = await post("bun", key.secret, "chat/completions", hi("ok"));
      expect(res.status).toBe(429);
      return ((await res.json()) as { error: { message: string } }).error.message.includes("limit 1, in flight 2");
    });
    // Removed, it limits nothing, and a request admitted without it holds no slot.
    await billing.updateApiKeyLimits({ ...raise, limits: { maxConcurrentRequests: 0 } }, auth);
    const third = await admitted("bun");
    expect(limiter.concurrent()).toBe(2);
    first.leave();
    second.abort();
    third.abort();
    // A slot frees once its request is metered: a stream left counts its output first (a first count loads the
    // tokenizer), which takes seconds on a loaded machine.
    await until(() => limiter.concurrent() === 0, 20_000);
    expect(open).toHaveLength(2);
  }, 60_000);

  test("after many requests ending every way at once, on every entry point, no slot is held and none went below zero", async () => {
    upstream.script("slow", { ...slowly, chunkDelayMs: 20 });
    upstream.script("failing", { status: 500 });
    const key = await keyWith(4);
    const outcomes = await Promise.all(
      Array.from({ length: 80 }, async (_, i) => {
        const port = i % 2 === 0 ? "bun" : "node";
        switch (i % 8) {
          case 0:
          case 1:
            return (await post(port, key.secret, "chat/completions", hi("ok"))).status;
          case 2: {
            const res = await post(port, key.secret, "chat/completions", hi("slow", { stream: true }));
            await res.text();
            return res.status;
          }
          case 3: {
            const leave = new AbortController();
            const res = await post(port, key.secret, "chat/completions", hi("slow", { stream: true }), leave.signal);
            if (res.status === 200) await (res.body as ReadableStream<Uint8Array>).getReader().read();
            leave.abort();
            return res.status;
          }
          case 4:
            return (await post(port, key.secret, "chat/completions", hi("failing"))).status;
          case 5:
            return (await post(port, key.secret, "embeddings", { model: "ok", input: "hi" })).status;
          case 6:
            return (await rpcCode(rpc(key.secret).createChatCompletion(rpcHi("ok")))) === "ok" ? 200 : 429;
          default: {
            const leave = new AbortController();
            const messages = rpc(key.secret).streamChatCompletion(rpcHi("slow"), { signal: leave.signal });
            const code = await rpcCode(
              (async () => {
                for await (const _ of messages) break;
              })(),
            );
            leave.abort();
            return code === "ok" ? 200 : 429;
          }
        }
      }),
    );
    expect(outcomes.filter((s) => s === 429).length).toBeGreaterThan(0);
    expect(outcomes.filter((s) => s === 200).length).toBeGreaterThan(0);
    await until(() => limiter.concurrent() === 0, 20_000);
    expect(await heldGauge()).toBe(0);
    // Every slot is back: the key runs four at once again, and not five.
    upstream.script("slow", slowly);
    const running = await Promise.all([1, 2, 3, 4].map(() => openStream("bun", key.secret)));
    expect((await post("node", key.secret, "chat/completions", hi("ok"))).status).toBe(429);
    expect(await heldGauge()).toBe(4);
    for (const s of running) s.leave();
    await until(() => limiter.concurrent() === 0, 20_000);
    expect(await heldGauge()).toBe(0);
  }, 60_000);
});
