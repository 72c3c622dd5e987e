import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import OpenAI from "openai";
import { AnalyticsService } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { answerUntilClosed } from "../../lib/testing.ts";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually, stopMesh } from "../support.ts";

const adminToken = "e2e-admin-token-0123456789";
let dataDir: string;
let mesh: Mesh;
let demo: Demo;
const logs: string[] = [];

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "mesh-e2e-"));
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    onLine: (service, line) => logs.push(`[${service}] ${line}`),
  });
  demo = await ensureDemo(mesh, { dataDir, adminToken });
}, 120_000);

afterAll(() => stopMesh(mesh, dataDir), 60_000);

describe("the mesh end to end", () => {
  test("writes the demo credentials to <data dir>/demo.env, exported to what a shell that sources it starts", async () => {
    const file = path.join(dataDir, "demo.env");
    const child = Bun.spawnSync(
      ["bash", "-c", 'source "$1" && sh -c \'echo "$OPENAI_BASE_URL $OPENAI_API_KEY"\'', "-", file],
      {
        env: { PATH: process.env.PATH ?? "" },
      },
    );
    expect(child.stdout.toString()).toBe(`${demo.baseUrl} ${demo.apiKey}\n`);
  });

  test("a completion through the openai SDK lands in analytics and billing with the same id and cost", async () => {
    const client = new OpenAI({ baseURL: demo.baseUrl, apiKey: demo.apiKey, maxRetries: 0 });
    const { data: completion, response } = await client.chat.completions
      .create({ model: "mock", messages: [{ role: "user", content: "hello through the whole mesh" }] })
      .withResponse();
    expect(completion.choices[0]?.message.content).toBeTruthy();
    expect(completion.usage?.prompt_tokens).toBeGreaterThan(0);
    const requestId = response.headers.get("x-request-id");
    expect(requestId).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    const cost = BigInt(response.headers.get("x-gateway-cost-nanos") ?? "-1");
    expect(cost).toBeGreaterThan(0n);

    const range = { start: timestampFromMs(Date.now() - 3_600_000), end: timestampFromMs(Date.now() + 3_600_000) };
    const analytics = createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics, bearerToken: adminToken });
    const row = await eventually(async () => {
      const page = await analytics.listRequests({ orgId: demo.orgId, range, requestId: requestId ?? "" });
      return page.requests[0];
    });
    expect(row.requestId).toBe(requestId ?? "");
    expect(row.costNanos).toBe(cost);
    expect(row.usage?.inputTokens).toBe(BigInt(completion.usage?.prompt_tokens ?? -1));
    expect(row.usage?.outputTokens).toBe(BigInt(completion.usage?.completion_tokens ?? -1));

    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const record = await eventually(async () => {
      const page = await billing.listUsageRecords({ orgId: demo.orgId, requestId: requestId ?? "" });
      return page.records[0];
    });
    expect(record.requestId).toBe(requestId ?? "");
    expect(record.costNanos).toBe(cost);
    const summary = await billing.getUsageSummary({ orgId: demo.orgId });
    expect(summary.requests).toBe(1n);
    expect(summary.costNanos).toBe(cost);
  }, 30_000);

  test("Responses API calls on the mock, whole and streamed, land in analytics and billing under their endpoint", async () => {
    const client = new OpenAI({ baseURL: demo.baseUrl, apiKey: demo.apiKey, maxRetries: 0 });
    const { data: whole, response } = await client.responses
      .create({ model: "mock", input: "hello responses" })
      .withResponse();
    expect(whole.output_text).toBe("mock reply: hello responses");
    const stream = await client.responses.create({ model: "mock", input: "hello responses", stream: true });
    let streamed = "";
    for await (const event of stream) if (event.type === "response.output_text.delta") streamed += event.delta;
    expect(streamed).toBe(whole.output_text);
    const requestId = response.headers.get("x-request-id") ?? "";
    const cost = BigInt(response.headers.get("x-gateway-cost-nanos") ?? "-1");
    // The shipped mock's prices, $0.50 and $1.50 per million tokens.
    const usage = whole.usage;
    expect(cost).toBe(BigInt(usage?.input_tokens ?? 0) * 500n + BigInt(usage?.output_tokens ?? 0) * 1_500n);

    const range = { start: timestampFromMs(Date.now() - 3_600_000), end: timestampFromMs(Date.now() + 3_600_000) };
    const analytics = createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics, bearerToken: adminToken });
    const rows = await eventually(async () => {
      const page = await analytics.listRequests({ orgId: demo.orgId, range });
      const responses = page.requests.filter((r) => r.endpoint === Endpoint.RESPONSES);
      return responses.length === 2 && responses;
    });
    expect(rows.map((r) => [r.streamed, r.costNanos]).sort()).toEqual([
      [false, cost],
      [true, cost],
    ]);
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const record = await eventually(async () => (await billing.listUsageRecords({ orgId: demo.orgId, requestId })).records[0]);
    expect(record).toMatchObject({ endpoint: Endpoint.RESPONSES, costNanos: cost });
    expect(record.usage).toMatchObject({
      inputTokens: BigInt(usage?.input_tokens ?? -1),
      outputTokens: BigInt(usage?.output_tokens ?? -1),
    });
  }, 30_000);

  test("a bad key gets an OpenAI-style 401, the same whether billing was asked or the token has no key's shape", async () => {
    const lookups = async () => {
      const text = await (await fetch(`${mesh.urls.gateway}/metrics`)).text();
      const count = (result: string) =>
        Number(new RegExp(`^gateway_key_cache_lookups_total\\{result="${result}"[^}]*\\} (\\d+)$`, "m").exec(text)?.[1] ?? 0);
      return { malformed: count("malformed"), miss: count("miss") };
    };
    const refusal = async (secret: string) => {
      const res = await fetch(`${demo.baseUrl}/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "hi" }] }),
      });
      expect(res.headers.get("x-request-id")).toBeTruthy();
      return { status: res.status, body: await res.json() };
    };
    const before = await lookups();
    // Shaped as billing makes keys, so billing is asked; and a token of no key's shape, refused without asking.
    const unknown = await refusal(`sk-mesh-${"Z".repeat(43)}`);
    const malformed = await refusal("sk-mesh-not-a-real-key");
    expect(unknown).toEqual({
      status: 401,
      body: { error: { message: "Incorrect API key provided.", type: "invalid_request_error", param: null, code: "invalid_api_key" } },
    });
    expect(malformed).toEqual(unknown);
    expect(await lookups()).toEqual({ malformed: before.malformed + 1, miss: before.miss + 1 });
  });

  test("an expired key is 401 expired_api_key, whether the gateway met it before it expired or not", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const { organization } = await billing.createOrganization({ name: "expiring keys" });
    const expireTime = timestampFromMs(Date.now() + 1_500);
    const create = (name: string) => billing.createApiKey({ orgId: organization?.id ?? "", name, limits: { expireTime } });
    const [seen, unseen] = await Promise.all([create("seen"), create("unseen")]);
    const chat = (secret: string) =>
      fetch(`${demo.baseUrl}/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "hi" }] }),
      });
    expect((await chat(seen.secret)).status).toBe(200);
    await Bun.sleep(Math.max(0, timestampMs(expireTime) - Date.now() + 50));
    for (const secret of [seen.secret, unseen.secret]) {
      const res = await chat(secret);
      const { error } = (await res.json()) as { error: { code: string } };
      expect([res.status, error.code]).toEqual([401, "expired_api_key"]);
    }
  });

  test("a made-up model name of any length or content is metered, billed, and holds nothing back", async () => {
    const post = (model: string) =>
      fetch(`${demo.baseUrl}/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${demo.apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({ model, messages: [{ role: "user", content: "hi" }] }),
      });
    const odd = await post(`${"m".repeat(300)}\u0000`);
    expect(odd.status).toBe(404);
    const fine = await post("mock");
    expect(fine.status).toBe(200);
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    for (const res of [odd, fine]) {
      const requestId = res.headers.get("x-request-id") ?? "";
      const record = await eventually(
        async () => (await billing.listUsageRecords({ orgId: demo.orgId, requestId })).records[0],
      );
      expect(record.requestId).toBe(requestId);
    }
  }, 30_000);

  test("a request the gateway port's HTTP/1.1 parser refuses gets OpenAI's error shape and a request id", async () => {
    const text = await answerUntilClosed(mesh.urls.gateway, "FOO /v1/models HTTP/1.1\r\nhost: a\r\n\r\n");
    const [head = "", body = ""] = text.split("\r\n\r\n");
    expect(head).toStartWith("HTTP/1.1 501 ");
    expect(head).toMatch(/\r\nx-request-id: [0-9A-HJKMNP-TV-Z]{26}\r\n/);
    expect(JSON.parse(body)).toEqual({
      error: {
        message: "The request's method is not one this server implements.",
        type: "invalid_request_error",
        param: null,
        code: "method_not_supported",
      },
    });
    const big = await answerUntilClosed(mesh.urls.gateway, `GET /v1/models HTTP/1.1\r\nauthorization: Bearer ${"a".repeat(20_000)}\r\n\r\n`);
    expect(big).toStartWith("HTTP/1.1 431 ");
    expect(JSON.parse(big.split("\r\n\r\n")[1] ?? "")).toMatchObject({ error: { code: "request_header_fields_too_large" } });
  });

  test("a restart keeps the demo key and every recorded request", async () => {
    const before = await createServiceClient(BillingService, {
      baseUrl: mesh.urls.billing,
      bearerToken: adminToken,
    }).getUsageSummary({ orgId: demo.orgId });
    expect(await mesh.stop()).toEqual({ gateway: 0, analytics: 0, billing: 0 });
    mesh = await startMesh({
      dataDir,
      adminToken,
      ports: { gateway: 0, billing: 0, analytics: 0 },
      onLine: (service, line) => logs.push(`[${service}] ${line}`),
    });
    const again = await ensureDemo(mesh, { dataDir, adminToken });
    expect(again.apiKey).toBe(demo.apiKey);
    expect(again.orgId).toBe(demo.orgId);
    const after = await createServiceClient(BillingService, {
      baseUrl: mesh.urls.billing,
      bearerToken: adminToken,
    }).getUsageSummary({ orgId: demo.orgId });
    expect(after.requests).toBe(before.requests);
    expect(after.costNanos).toBe(before.costNanos);
    const client = new OpenAI({ baseURL: again.baseUrl, apiKey: again.apiKey, maxRetries: 0 });
    const completion = await client.chat.completions.create({
      model: "mock",
      messages: [{ role: "user", content: "again" }],
    });
    expect(completion.choices).toHaveLength(1);
  }, 90_000);

  test("the gateway runs with room for 4096 upstream calls at once (Bun's fetch runs 256 unless told)", async () => {
    const environ = await Bun.file(`/proc/${mesh.processes.gateway.proc.pid}/environ`).text();
    expect(environ.split("\0")).toContain("BUN_CONFIG_MAX_HTTP_REQUESTS=4096");
    expect(logs.some((line) => line.includes("BUN_CONFIG_MAX_HTTP_REQUESTS"))).toBe(false);
  });

  test("billing and analytics, not the gateway, keep the memory they free for their next batches", async () => {
    const environ = async (name: "gateway" | "billing" | "analytics") =>
      (await Bun.file(`/proc/${mesh.processes[name].proc.pid}/environ`).text()).split("\0");
    for (const name of ["billing", "analytics"] as const) expect(await environ(name)).toContain("MIMALLOC_PURGE_DELAY=-1");
    expect((await environ("gateway")).filter((entry) => entry.startsWith("MIMALLOC_PURGE_DELAY="))).toEqual([]);
  });

  test("the gateway alone marks its heap with one thread; it sizes its heap for 1 GiB, analytics for 512 MiB", async () => {
    const environ = async (name: "gateway" | "billing" | "analytics") =>
      (await Bun.file(`/proc/${mesh.processes[name].proc.pid}/environ`).text()).split("\0");
    const set = async (name: "gateway" | "billing" | "analytics") =>
      (await environ(name)).filter((entry) => /^BUN_JSC_(numberOfGCMarkers|forceRAMSize)=/.test(entry)).toSorted();
    expect(await set("gateway")).toEqual([`BUN_JSC_forceRAMSize=${2 ** 30}`, "BUN_JSC_numberOfGCMarkers=1"]);
    expect(await set("analytics")).toEqual([`BUN_JSC_forceRAMSize=${2 ** 29}`]);
    expect(await set("billing")).toEqual([]);
  });

  test("no secret appears in any service log", () => {
    expect(logs.length).toBeGreaterThan(0);
    for (const line of logs) {
      expect(line).not.toContain(demo.apiKey);
      expect(line).not.toContain(adminToken);
    }
  });
});
