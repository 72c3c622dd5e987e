import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { trace } from "@opentelemetry/api";
import { ulid } from "ulid";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService, type KeyLimits } from "../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { KeyLimitsSchema } from "../gen/billing/v1/billing_pb.ts";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { sha256Hex } from "../lib/auth.ts";
import { createLogger } from "../lib/log.ts";
import { createKeyAuthorizer, type KeyAuthorizer } from "./auth.ts";
import { type BudgetKeeper, createBudgetKeeper } from "./budget.ts";
import { createCircuitBreakers } from "./circuit-breaker.ts";
import { parseGatewayConfig } from "./config.ts";
import { createGatewayCore, type GatewayCore } from "./core.ts";
import type { GatewayError } from "./errors.ts";
import { createRestApp, type RestApp } from "./http/app.ts";
import { createProviders } from "./providers/index.ts";
import type { Provider } from "./providers/provider.ts";
import { createRateLimiter } from "./rate-limits.ts";
import { createGatewayService } from "./service.ts";
import { createRecordingShipper, createTestLogger } from "./testing.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { imageDataUrl } from "./testing/images.ts";

// Real billing (Postgres) for keys, limits and leases; a real OpenAI-compatible upstream on a socket.
const adminToken = "admission-test-admin-token-01";
const auth = { headers: { authorization: `Bearer ${adminToken}` } };
let db: TestDatabase;
let billing: ReturnType<typeof createClient<typeof BillingService>>;
let upstream: FakeUpstream;
let keys: KeyAuthorizer;
let budget: BudgetKeeper | undefined;
let core: GatewayCore;
let app: RestApp;
let rpc: ReturnType<typeof createClient<typeof GatewayService>>;
let orgId: string;
const shipper = createRecordingShipper();
let mockCalls = 0;

beforeAll(async () => {
  db = await createTestDatabase();
  const billingLog = createLogger({ service: "billing-test", level: "error" });
  billing = createClient(
    BillingService,
    createRouterTransport(
      createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log: billingLog }).routes,
    ),
  );
  orgId = (await billing.createOrganization({ name: "admission" }, auth)).organization?.id as string;
  upstream = startFakeUpstream();
  const config = parseGatewayConfig(
    `
providers:
  - { name: fake, kind: openai, base_url: "${upstream.url}" }
  - { name: mock, kind: mock }
models:
  - name: mock
    targets: [{ provider: mock, model: mock-echo-1 }]
    # $1000 per million tokens: a token costs 1,000,000 nano-USD, so budgets read in tokens.
    pricing: { input_per_mtok: "1000", output_per_mtok: "1000" }
  - name: mock-small-window
    targets: [{ provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1000", output_per_mtok: "1000" }
    context_window: 500
  - name: routed
    targets: [{ provider: fake, model: flaky }, { provider: fake, model: stable }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    retries: 1
  - name: patient
    targets: [{ provider: fake, model: busy }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    retries: 1
  - name: held
    targets: [{ provider: fake, model: slowdown }, { provider: fake, model: stable }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    retries: 2
  - name: hung
    targets: [{ provider: fake, model: hang, timeout_ms: 5000 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    request_timeout_ms: 300
  - name: dribble
    targets: [{ provider: fake, model: dribble }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    request_timeout_ms: 400
  - name: late
    targets: [{ provider: fake, model: late }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: vision
    targets: [{ provider: fake, model: gpt-4o }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: vision-mini
    targets: [{ provider: fake, model: gpt-4o-mini }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`,
    "admission.yaml",
  );
  const providers = createProviders(config.providers, {});
  const mock = providers.get("mock") as Provider;
  providers.set("mock", {
    ...mock,
    chat: (req, opts) => (mockCalls++, mock.chat(req, opts)),
    responses: (req, opts) => (mockCalls++, mock.responses(req, opts)),
  });
  keys = createKeyAuthorizer({ billing: { authorizeKey: (req) => billing.authorizeKey(req, auth) }, watching: true });
  core = createGatewayCore({
    config,
    providers,
    keys,
    shipper,
    instanceId: "gw-admission",
    log: createTestLogger(),
    rateLimits: createRateLimiter(),
    budget: (budget = createBudgetKeeper({
      billing: {
        acquireBudgetLease: (req) => billing.acquireBudgetLease(req, auth),
        releaseBudgetLease: (req) => billing.releaseBudgetLease(req, auth),
      },
      holder: "gw-admission",
      leaseTtlSeconds: 3600,
      // Mid-period: a budget spent is refused without Retry-After whenever the suite runs.
      wallClock: () => Date.UTC(2026, 5, 15),
    })),
    routing: {
      breakers: createCircuitBreakers({ failureThreshold: 2, cooldownMs: 60_000 }),
      backoffBaseMs: 5,
      requestTimeoutMs: 30_000,
    },
  });
  app = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 1 << 20 });
  rpc = createClient(
    GatewayService,
    createRouterTransport((router) => router.service(GatewayService, createGatewayService(core))),
  );
}, 60_000);

afterAll(async () => {
  // Its leases go back while billing is still there; nothing keeps retrying once the database is gone.
  await budget?.close();
  await upstream?.stop();
  await db?.drop();
}, 30_000);

async function keyWith(limits: MessageInitShape<typeof KeyLimitsSchema>): Promise<string> {
  return (await billing.createApiKey({ orgId, name: "k", limits: limits as KeyLimits }, auth)).secret;
}

/** Records usage of the key in billing, as analytics does for what gateways served. */
async function recordInBilling(
  key: string,
  rows: readonly { requestId: string; usage?: { inputTokens: bigint; outputTokens: bigint } }[],
) {
  const { apiKey } = await billing.authorizeKey({ secret: key }, auth);
  const records = rows.map((m) => ({
    requestId: m.requestId,
    orgId,
    apiKeyId: apiKey?.id ?? "",
    model: "mock",
    provider: "mock",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    usage: { inputTokens: m.usage?.inputTokens ?? 0n, outputTokens: m.usage?.outputTokens ?? 0n },
    occurTime: timestampNow(),
  }));
  await billing.recordUsage({ records }, auth);
}

function post(key: string, body: Record<string, unknown>) {
  return app.fetch(
    new Request("http://gateway.test/v1/chat/completions", {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    }),
  );
}

const hi = (model: string, extra: Record<string, unknown> = {}) => ({
  model,
  messages: [{ role: "user", content: "hi" }],
  ...extra,
});
const errorOf = async (res: Response) =>
  ((await res.json()) as { error: { type: string; code: string; message: string; param: null } }).error;

describe("per-key limits", () => {
  test("requests per minute: 429 in OpenAI's shape with Retry-After, recorded as rate limited", async () => {
    const key = await keyWith({ requestsPerMinute: 2 });
    expect((await post(key, hi("mock"))).status).toBe(200);
    expect((await post(key, hi("mock"))).status).toBe(200);
    const before = mockCalls;
    const res = await post(key, hi("mock"));
    expect(res.status).toBe(429);
    expect(Number(res.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    // To the millisecond as well, which the OpenAI SDKs read before Retry-After.
    const ms = Number(res.headers.get("retry-after-ms"));
    expect(ms).toBeGreaterThan(Number(res.headers.get("retry-after")) * 1000 - 1000);
    expect(ms).toBeLessThanOrEqual(Number(res.headers.get("retry-after")) * 1000);
    expect(await errorOf(res)).toMatchObject({ type: "requests", code: "rate_limit_exceeded", param: null });
    expect(mockCalls).toBe(before);
    const requestId = res.headers.get("x-request-id");
    expect(shipper.rows.find((m) => m.requestId === requestId)).toMatchObject({
      status: RequestStatus.RATE_LIMITED,
      httpStatus: 429,
    });
  });

  test("responses carry OpenAI's x-ratelimit-* headers for the key, 429s and RPCs too", async () => {
    const key = await keyWith({ requestsPerMinute: 2, tokensPerMinute: 1000n });
    const first = await post(key, hi("mock", { max_tokens: 10 }));
    expect(first.status).toBe(200);
    // "hi" counts at 13 prompt tokens (message framing included) + 10 output while it runs, then at what it used.
    expect(Object.fromEntries([...first.headers].filter(([name]) => name.startsWith("x-ratelimit-")))).toEqual({
      "x-ratelimit-limit-requests": "2",
      "x-ratelimit-remaining-requests": "1",
      "x-ratelimit-reset-requests": expect.stringMatching(/^(\d+s|1m0s)$/),
      "x-ratelimit-limit-tokens": "1000",
      "x-ratelimit-remaining-tokens": "977",
      "x-ratelimit-reset-tokens": expect.stringMatching(/^(\d+s|1m0s)$/),
    });
    const streamed = await post(key, hi("mock", { stream: true, max_tokens: 10 }));
    expect(streamed.headers.get("x-ratelimit-remaining-requests")).toBe("0");
    await streamed.text();
    const refused = await post(key, hi("mock"));
    expect(refused.status).toBe(429);
    expect(refused.headers.get("x-ratelimit-remaining-requests")).toBe("0");
    expect(refused.headers.get("x-ratelimit-limit-tokens")).toBe("1000");

    const rpcKey = await keyWith({ requestsPerMinute: 1 });
    const bearer = { headers: { authorization: `Bearer ${rpcKey}` } };
    const rpcHi = { params: { model: "mock", messages: [{ role: "user", content: "hi" }] } };
    let headers: Headers | undefined;
    await rpc.createChatCompletion(rpcHi, { ...bearer, onHeader: (h) => (headers = h) });
    expect(headers?.get("x-ratelimit-remaining-requests")).toBe("0");
    const error = await rpc.createChatCompletion(rpcHi, bearer).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(error?.code).toBe(Code.ResourceExhausted);
    expect(error?.metadata.get("x-ratelimit-limit-requests")).toBe("1");
  });

  test("tokens per minute count the prompt and max_tokens while a request runs", async () => {
    const key = await keyWith({ tokensPerMinute: 100n });
    expect((await post(key, hi("mock", { max_tokens: 60 }))).status).toBe(200);
    // The first used about 12 tokens; 12 + 8 + 90 > 100.
    const res = await post(key, hi("mock", { max_tokens: 90 }));
    expect(res.status).toBe(429);
    expect((await errorOf(res)).type).toBe("tokens");
    expect((await post(key, hi("mock", { max_tokens: 50 }))).status).toBe(200);
  });

  test("a request without max_tokens counts at the model's output cap while it runs", async () => {
    const key = await keyWith({ tokensPerMinute: 1000n });
    // Each may produce 4096 tokens: the first goes through the empty window, and none fits beside it or its usage.
    const statuses = await Promise.all(Array.from({ length: 5 }, () => post(key, hi("mock")).then((r) => r.status)));
    expect(statuses.sort()).toEqual([200, 429, 429, 429, 429]);
  });
});

describe("monthly tokens", () => {
  // Each "hi" to mock with max_tokens 5 reserves its bound, 17 input (the prompt's bytes and framing) + 5 output = 22
  // tokens, and uses 8 input + 4 output = 12.
  const bearer = (key: string) => ({ headers: { authorization: `Bearer ${key}` } });
  const rpcHi = { params: { model: "mock", messages: [{ role: "user", content: "hi" }], maxTokens: 5 } };
  const rpcError = (p: Promise<unknown>) =>
    p.then(
      () => {
        throw new Error("expected the RPC to fail");
      },
      (e: unknown) => ConnectError.from(e),
    );

  /** Requests until the first refusal; the number served and the refusal. */
  async function serveUntilRefused(key: string) {
    for (let served = 0; served < 100; served++) {
      const before = mockCalls;
      const res = await post(key, hi("mock", { max_tokens: 5 }));
      if (res.status !== 200) {
        expect(mockCalls).toBe(before);
        return { served, res };
      }
    }
    throw new Error("never refused");
  }

  test("a key is served while monthly_tokens cover a request's most, then gets 429 insufficient_quota over REST and ResourceExhausted over RPC", async () => {
    const key = await keyWith({ monthlyTokens: 50n });
    const { served, res } = await serveUntilRefused(key);
    // 50, 38 and 26 tokens left each cover 22; 14 does not.
    expect(served).toBe(3);
    expect(res.status).toBe(429);
    const error = await errorOf(res);
    expect(error).toMatchObject({ type: "insufficient_quota", code: "insufficient_quota", param: null });
    expect(error.message).toContain("up to 22 tokens");
    expect(error.message).toContain("monthly limit of 50 tokens");
    // Nothing this month can come back: no lease holds any of it.
    expect(res.headers.get("retry-after")).toBeNull();
    expect(shipper.rows.find((m) => m.requestId === res.headers.get("x-request-id"))).toMatchObject({
      status: RequestStatus.RATE_LIMITED,
      httpStatus: 429,
      errorCode: "insufficient_quota",
    });
    const streamed = await post(key, hi("mock", { stream: true, max_tokens: 5 }));
    expect(streamed.status).toBe(429);
    expect((await errorOf(streamed)).code).toBe("insufficient_quota");
    // A key with rate limits is told where they stand on this 429 too; the refused request counts against none.
    const limited = await keyWith({ monthlyTokens: 30n, requestsPerMinute: 5 });
    expect((await post(limited, hi("mock", { max_tokens: 5 }))).status).toBe(200);
    const over = await post(limited, hi("mock", { max_tokens: 5 }));
    expect((await errorOf(over)).code).toBe("insufficient_quota");
    expect(over.headers.get("x-ratelimit-limit-requests")).toBe("5");
    expect(over.headers.get("x-ratelimit-remaining-requests")).toBe("4");

    const before = mockCalls;
    const unary = await rpcError(rpc.createChatCompletion(rpcHi, bearer(key)));
    expect(unary.code).toBe(Code.ResourceExhausted);
    expect(unary.metadata.get("x-error-code")).toBe("insufficient_quota");
    const stream = await rpcError(
      (async () => {
        for await (const _ of rpc.streamChatCompletion(rpcHi, bearer(key)));
      })(),
    );
    expect(stream.code).toBe(Code.ResourceExhausted);
    expect(mockCalls).toBe(before);
  });

  test("tokens served over RPC, streamed or not, count against the same limit, charged to the key's token lease", async () => {
    const key = await keyWith({ monthlyTokens: 50n });
    const first = shipper.rows.length;
    await rpc.createChatCompletion(rpcHi, bearer(key));
    for await (const _ of rpc.streamChatCompletion(rpcHi, bearer(key)));
    await rpc.createChatCompletion(rpcHi, bearer(key));
    expect((await rpcError(rpc.createChatCompletion(rpcHi, bearer(key)))).code).toBe(Code.ResourceExhausted);
    expect((await post(key, hi("mock", { max_tokens: 5 }))).status).toBe(429);
    // Each served request's usage record names the lease its tokens came from, in tokens.
    const charged = shipper.rows.slice(first).filter((m) => m.status === RequestStatus.OK);
    expect(charged).toHaveLength(3);
    for (const m of charged) {
      expect(m.budgetCharges).toHaveLength(1);
      expect(m.budgetCharges[0]).toMatchObject({ nanos: 0n, tokens: 12n });
    }
  });

  test("requests running at once hold their most, and one refused by a rate limit holds none", async () => {
    const key = await keyWith({ monthlyTokens: 60n });
    // Each holds its bound (17 + 10 = 27) while it runs: two fit under 60, not ten.
    const answers = await Promise.all(Array.from({ length: 10 }, () => post(key, hi("mock", { max_tokens: 10 }))));
    const refusals = answers.filter((res) => res.status === 429);
    expect(answers.length - refusals.length).toBe(2);
    // What the requests running leave unused comes back: a retry once their lease is idle may find room.
    expect(refusals[0]?.headers.get("retry-after")).toBe("30");
    expect((await errorOf(refusals[0] as Response)).message).toContain("has less than that left");

    // Refused by its RPM, a request reserves none of the key's tokens.
    const limits = { monthlyTokens: 110n, requestsPerMinute: 1 };
    const limited = await billing.createApiKey({ orgId, name: "k", limits }, auth);
    const big = hi("mock", { max_tokens: 80 });
    expect((await post(limited.secret, big)).status).toBe(200);
    expect((await errorOf(await post(limited.secret, big))).code).toBe("rate_limit_exceeded");
    const apiKeyId = limited.apiKey?.id as string;
    await billing.updateApiKeyLimits({ apiKeyId, limits: { ...limits, requestsPerMinute: 0 } }, auth);
    keys.forget(sha256Hex(limited.secret));
    // 110 - 12 = 98 left covers another 97.
    expect((await post(limited.secret, big)).status).toBe(200);
  });

  test("usage billing recorded from elsewhere counts", async () => {
    // Usage billing has from elsewhere (other replicas, before a restart) counts when the key's tokens are leased.
    const busy = await keyWith({ monthlyTokens: 70n });
    await recordInBilling(busy, [{ requestId: ulid(), usage: { inputTokens: 40n, outputTokens: 8n } }]);
    // 22 left covers one request; the 10 left after it do not.
    expect((await serveUntilRefused(busy)).served).toBe(1);
  });
});

describe("budget", () => {
  test("a key's budget stops requests before the upstream, with insufficient_quota", async () => {
    // Each request reserves 17 input (bytes bound) + 5 output tokens and costs 8 + 4 tokens.
    const key = await keyWith({ monthlyBudgetNanos: 50n * 1_000_000n });
    let served = 0;
    let res: Response;
    for (;;) {
      const before = mockCalls;
      res = await post(key, hi("mock", { max_tokens: 5 }));
      if (res.status !== 200) {
        expect(mockCalls).toBe(before);
        break;
      }
      expect(res.headers.get("x-gateway-cost-nanos")).toBe("12000000");
      served++;
    }
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatchObject({ type: "insufficient_quota", code: "insufficient_quota" });
    // No lease holds any of the budget any more: nothing comes back this month, so no Retry-After invites retries.
    expect(res.headers.get("retry-after")).toBeNull();
    // 4 x 12 = 48 of 50 spent: the last request that fits in what is left is served.
    expect(served).toBeGreaterThanOrEqual(2);
    expect(served).toBeLessThanOrEqual(4);
  });

  test("a key whose budget is spent is told so on every request, never rate limited by its own refusals", async () => {
    // The budget cannot cover one request (17 input + 5 output tokens at most): each is refused before the upstream.
    const key = await keyWith({ monthlyBudgetNanos: 10n * 1_000_000n, requestsPerMinute: 2 });
    for (let i = 0; i < 4; i++) {
      const res = await post(key, hi("mock", { max_tokens: 5 }));
      expect(res.status).toBe(429);
      expect((await errorOf(res)).code).toBe("insufficient_quota");
      expect(res.headers.get("x-ratelimit-remaining-requests")).toBe("2");
    }
    // Nor by its concurrent requests: a request its budget refuses gives its slot back at once.
    const one = await keyWith({ monthlyBudgetNanos: 10n * 1_000_000n, maxConcurrentRequests: 1 });
    for (let i = 0; i < 3; i++) {
      expect((await errorOf(await post(one, hi("mock", { max_tokens: 5 })))).code).toBe("insufficient_quota");
    }
  });
});

describe("limits and budgets on the Responses API", () => {
  const respond = (key: string, body: Record<string, unknown>) =>
    app.fetch(
      new Request("http://gateway.test/v1/responses", {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      }),
    );

  test("requests and tokens per minute hold as for chat, the prompt and max_output_tokens counted while a request runs", async () => {
    const key = await keyWith({ tokensPerMinute: 100n, requestsPerMinute: 2 });
    const first = await respond(key, { model: "mock", input: "hi", max_output_tokens: 60 });
    expect(first.status).toBe(200);
    expect(first.headers.get("x-ratelimit-limit-tokens")).toBe("100");
    // The first used 12 tokens; 12 + 12 + 90 > 100.
    const over = await respond(key, { model: "mock", input: "hi", max_output_tokens: 90 });
    expect(over.status).toBe(429);
    expect(await errorOf(over)).toMatchObject({ type: "tokens", code: "rate_limit_exceeded" });
    expect((await respond(key, { model: "mock", input: "hi", max_output_tokens: 50 })).status).toBe(200);
    const fourth = await respond(key, { model: "mock", input: "hi", max_output_tokens: 16 });
    expect(fourth.status).toBe(429);
    expect((await errorOf(fourth)).type).toBe("requests");
    expect(shipper.rows.find((m) => m.requestId === fourth.headers.get("x-request-id"))).toMatchObject({
      endpoint: Endpoint.RESPONSES,
      status: RequestStatus.RATE_LIMITED,
    });
  });

  test("a response with an MCP tool reserves the model's whole context window, as what its server brings is unseen here", async () => {
    // The upstream reads the MCP server's tool definitions and the outputs of its calls into the request: on a window of
    // 500 tokens, 500 input + 16 output tokens are reserved, more than this key's 400 tokens ($1 a token here).
    const key = await keyWith({ monthlyBudgetNanos: 400n * 1_000_000n });
    const mcp = { type: "mcp", server_label: "docs", server_url: "https://mcp.example.com/mcp", require_approval: "never" };
    const before = mockCalls;
    const res = await respond(key, { model: "mock-small-window", input: "hi", max_output_tokens: 16, tools: [mcp] });
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatchObject({ type: "insufficient_quota", code: "insufficient_quota" });
    expect(mockCalls).toBe(before);
    // Without it, the request is reserved at what it holds.
    expect((await respond(key, { model: "mock-small-window", input: "hi", max_output_tokens: 16 })).status).toBe(200);
  });

  test("a key's budget stops responses before the upstream with insufficient_quota, and billing records what was served under its endpoint", async () => {
    // Each response reserves 13 input (bytes bound) + 16 output tokens and costs 8 + 4 tokens: $1 a token here.
    const key = await keyWith({ monthlyBudgetNanos: 50n * 1_000_000n });
    const served: string[] = [];
    let res: Response;
    for (;;) {
      const before = mockCalls;
      res = await respond(key, { model: "mock", input: "hi", max_output_tokens: 16 });
      if (res.status !== 200) {
        expect(mockCalls).toBe(before);
        break;
      }
      expect(res.headers.get("x-gateway-cost-nanos")).toBe("12000000");
      served.push(res.headers.get("x-request-id") as string);
    }
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatchObject({ type: "insufficient_quota", code: "insufficient_quota" });
    expect(served.length).toBeGreaterThanOrEqual(1);
    expect(served.length).toBeLessThanOrEqual(4);

    // The row of a served response, recorded in billing as analytics records it.
    const row = shipper.rows.find((m) => m.requestId === served[0]);
    expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, costNanos: 12_000_000n, status: RequestStatus.OK });
    expect(row?.usage).toMatchObject({ inputTokens: 8n, outputTokens: 4n });
    expect(row?.budgetCharges.length).toBeGreaterThan(0);
    const record = {
      requestId: row?.requestId,
      orgId: row?.orgId,
      apiKeyId: row?.apiKeyId,
      model: row?.requestedModel,
      provider: row?.provider,
      endpoint: row?.endpoint,
      usage: row?.usage,
      costNanos: row?.costNanos,
      costBreakdown: row?.costBreakdown,
      occurTime: row?.startTime,
      budgetCharges: row?.budgetCharges,
    };
    expect(await billing.recordUsage({ records: [record] }, auth)).toMatchObject({ inserted: 1 });
    const listed = await billing.listUsageRecords({ orgId }, auth);
    expect(listed.records.find((r) => r.requestId === row?.requestId)).toMatchObject({
      endpoint: Endpoint.RESPONSES,
      costNanos: 12_000_000n,
      usage: { inputTokens: 8n, outputTokens: 4n },
    });
  });
});

describe("budget with files", () => {
  test("a file part reserves a whole context window, so a budget that covers text cannot be overrun by a PDF", async () => {
    // $1,000 per million tokens: a file part alone may cost over $1,000, far past this key's $1.
    const key = await keyWith({ monthlyBudgetNanos: 1_000_000_000n });
    expect((await post(key, hi("mock", { max_tokens: 5 }))).status).toBe(200);
    const before = mockCalls;
    const pdf = { type: "file", file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0xLjQK" } };
    const res = await post(key, { model: "mock", messages: [{ role: "user", content: [pdf] }], max_tokens: 5 });
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatchObject({ type: "insufficient_quota", code: "insufficient_quota" });
    expect(mockCalls).toBe(before);
  });

  test("on a model with a context window configured, a file part reserves no more than that window", async () => {
    // A window of 500 tokens: the file and the output reserve 505 tokens, $0.505 of this key's $1.
    const key = await keyWith({ monthlyBudgetNanos: 1_000_000_000n });
    const pdf = { type: "file", file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0xLjQK" } };
    const res = await post(key, { model: "mock-small-window", messages: [{ role: "user", content: [pdf] }], max_tokens: 5 });
    expect(res.status).toBe(200);
  });
});

describe("images", () => {
  const look = (model: string, url: string) => ({
    model,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url } }] }],
    max_tokens: 5,
  });
  // Reply priming, one user message's framing and role, and the output.
  const framing = 3 + 8 + 4 + 5;

  test("monthly tokens reserve an image at what its upstream model bills for its size, or the most it bills for any", async () => {
    // gpt-4o-mini bills a 2048x800 image 8 tiles: 2,833 + 8 x 5,667 tokens, over the 45,000 a key has.
    const key = await keyWith({ monthlyTokens: 45_000n });
    upstream.script("gpt-4o-mini", { content: "a cat", usage: false });
    for (const url of [imageDataUrl("png", 2048, 800), "https://example.com/wide.png"]) {
      const res = await post(key, look("vision-mini", url));
      expect(res.status).toBe(429);
      expect((await errorOf(res)).message).toContain(`up to ${48_169 + framing} tokens`);
    }
    // A 1024-pixel image is 4 tiles: 25,501 tokens.
    expect((await post(key, look("vision-mini", imageDataUrl("jpeg", 1024, 1024)))).status).toBe(200);
    // On gpt-4o the same image is 765 tokens: a key with 2,000 is served it.
    const small = await keyWith({ monthlyTokens: 2_000n });
    upstream.script("gpt-4o", { content: "a cat", usage: false });
    expect((await post(small, look("vision", imageDataUrl("png", 1024, 1024)))).status).toBe(200);
  });

  test("tokens per minute count an image at what its upstream model bills for it", async () => {
    // 25,501 tokens each on gpt-4o-mini: the first runs in an empty minute, the second does not fit beside it.
    const key = await keyWith({ tokensPerMinute: 30_000n });
    upstream.script("gpt-4o-mini", { content: "a cat", usage: false });
    const url = imageDataUrl("png", 1024, 1024);
    expect((await post(key, look("vision-mini", url))).status).toBe(200);
    const res = await post(key, look("vision-mini", url));
    expect(res.status).toBe(429);
    expect((await errorOf(res)).type).toBe("tokens");
  });
});

describe("routing against a real upstream", () => {
  test("a failing target is retried, then the fallback serves; once its breaker opens it is skipped", async () => {
    upstream.script("flaky", { status: 500 });
    const key = await keyWith({});
    const first = await post(key, hi("routed"));
    expect(first.status).toBe(200);
    expect(upstream.seen("flaky")).toHaveLength(2);
    expect(upstream.seen("stable").length).toBeGreaterThanOrEqual(1);
    const served = shipper.rows.find((m) => m.requestId === first.headers.get("x-request-id"));
    expect(served).toMatchObject({ servedModel: "stable-fake", fallbackUsed: true, retries: 2 });
    expect((await post(key, hi("routed"))).status).toBe(200);
    expect(upstream.seen("flaky")).toHaveLength(2);
  });

  test("Retry-After from the upstream is waited out before the retry", async () => {
    upstream.script("busy", { status: 429, retryAfter: "0.25" }, {});
    const key = await keyWith({});
    expect((await post(key, hi("patient"))).status).toBe(200);
    const [a, b] = upstream.seen("busy");
    expect((b?.at ?? 0) - (a?.at ?? 0)).toBeGreaterThanOrEqual(240);
  });

  test("a Retry-After too long to wait falls back at once; once two in a row asked it, later requests skip that target", async () => {
    upstream.script("slowdown", { status: 429, retryAfter: "30" });
    const key = await keyWith({});
    const started = performance.now();
    expect((await post(key, hi("held"))).status).toBe(200);
    expect(performance.now() - started).toBeLessThan(2_000);
    for (let i = 0; i < 2; i++) expect((await post(key, hi("held"))).status).toBe(200);
    expect(upstream.seen("slowdown")).toHaveLength(2);
  });

  test("the whole-request limit ends a hung request with 504 request_timeout", async () => {
    upstream.script("hang", { hang: true });
    const key = await keyWith({});
    const started = performance.now();
    const res = await post(key, hi("hung"));
    expect(res.status).toBe(504);
    expect((await errorOf(res)).code).toBe("request_timeout");
    expect(performance.now() - started).toBeLessThan(3_000);
    // The upstream has the prompt: it is metered, counted by the tokenizer.
    const m = shipper.rows.find((row) => row.requestId === res.headers.get("x-request-id"));
    expect(m).toMatchObject({ status: RequestStatus.TIMEOUT, usageEstimated: true });
    expect(m?.usage).toMatchObject({ inputTokens: 8n, outputTokens: 0n });
    expect(m?.costNanos).toBe(8_000n);
  });

  test("a client gone while the upstream has its prompt is charged the prompt against its budget", async () => {
    upstream.script("late", { delayMs: 2_000 });
    const key = await keyWith({ monthlyBudgetNanos: 1_000_000_000n });
    const keyId = (await billing.authorizeKey({ secret: key }, auth)).apiKey?.id;
    const gone = new AbortController();
    const pending = app.fetch(
      new Request("http://gateway.test/v1/chat/completions", {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify({
          model: "late",
          messages: [{ role: "user", content: "one two three four ".repeat(1_000) }],
        }),
        signal: gone.signal,
      }),
    );
    while (upstream.seen("late").length === 0) await Bun.sleep(5);
    await Bun.sleep(200);
    gone.abort();
    const res = await pending;
    expect(res.status).toBe(499);
    const m = shipper.rows.find((row) => row.requestId === res.headers.get("x-request-id"));
    expect(m).toMatchObject({ status: RequestStatus.CANCELLED, usageEstimated: true });
    // o200k_base: 4,000 words and a trailing space, framing and role; nothing was generated.
    expect(m?.usage).toMatchObject({ inputTokens: 4_008n, outputTokens: 0n });
    expect(m?.costNanos).toBe(4_008_000n);
    expect(budget?.snapshot().get(`api_key:${keyId}`)).toMatchObject({ spentNanos: 4_008_000n, reservedNanos: 0n });
  });

  test("a stream past the whole-request limit is cut with request_timeout", async () => {
    upstream.script("dribble", { content: "one two three four five six seven eight nine ten", chunkDelayMs: 100 });
    const key = await keyWith({});
    const call = core.begin(Endpoint.CHAT_COMPLETIONS, key);
    const stream = await core.handle(call, () => core.chatStream(call, hi("dribble", { stream: true })));
    const failed = await (async () => {
      try {
        for await (const _ of stream) {
          // drain
        }
      } catch (e) {
        return e as GatewayError;
      }
      throw new Error("expected the stream to be cut");
    })();
    expect([failed.status, failed.code]).toEqual([504, "request_timeout"]);
    expect(shipper.rows.find((m) => m.requestId === call.requestId)).toMatchObject({ status: RequestStatus.TIMEOUT });
  });
});
