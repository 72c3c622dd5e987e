/**
 * Calls a gateway was running when it was killed with SIGKILL, with real processes: the restarted gateway (under the
 * same instance id, or under another that adopts the dead one's spool) records each as interrupted (status
 * INTERNAL_ERROR, error code gateway_interrupted, no cost), so that every call admitted is one row in ClickHouse and
 * one in billing, and the cost sums agree, crash or not.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { AnalyticsService, type RequestMetrics, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually, stopMesh } from "../support.ts";

const adminToken = "crashed-calls-admin-token-0123456789";

let dataDir: string;
let mesh: Mesh;
const gatewayEnv: Record<string, string | undefined> = {};
const billing = () => createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 10_000 });
const analytics = () =>
  createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics, bearerToken: adminToken, timeoutMs: 10_000 });

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "crashed-calls-"));
  // fast answers at once; slow not for two minutes; drip streams a token a second.
  const config = path.join(dataDir, "routes.yaml");
  await writeFile(
    config,
    `providers:
  - { name: fast, kind: mock, latency_ms: 5 }
  - { name: slow, kind: mock, latency_ms: 120000 }
  - { name: drip, kind: mock, latency_ms: 5, chunk_latency_ms: 1000 }
models:
${["fast", "slow", "drip"]
  .map((name) => `  - { name: ${name}, targets: [{ provider: ${name}, model: mock-${name} }], pricing: { input_per_mtok: "1", output_per_mtok: "2" } }`)
  .join("\n")}
`,
  );
  Object.assign(gatewayEnv, { GATEWAY_CONFIG: config, GATEWAY_INSTANCE_ID: "calls-gw" });
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    env: { LOG_LEVEL: "warn", ANALYTICS_FLUSH_INTERVAL_MS: "200", GATEWAY_METRICS_INTERVAL_MS: "50" },
    serviceEnv: { gateway: gatewayEnv },
    onLine: (service, line) => {
      if (process.env.CALLS_LOG) process.stderr.write(`[${service}] ${line}\n`);
    },
  });
}, 120_000);

afterAll(() => stopMesh(mesh, dataDir), 60_000);

async function createOrg(name: string) {
  const orgId = (await billing().createOrganization({ name })).organization?.id as string;
  const { secret } = await billing().createApiKey({ orgId, name });
  return { orgId, secret };
}

const chatBody = (model: string, stream = false) =>
  JSON.stringify({ model, stream, max_tokens: 200, messages: [{ role: "user", content: "what a crash leaves behind" }] });

const post = (secret: string, body: string) =>
  fetch(`${mesh.urls.gateway}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
    body,
  });

/**
 * Serves `fast` requests to the end, then leaves three whole calls waiting on the slow upstream and two streams
 * dripping tokens to their clients; returns the served ids (with their costs) and how the cut calls end at the client.
 */
async function serveThenHang(secret: string) {
  const served = new Map<string, bigint>();
  for (let i = 0; i < 10; i++) {
    const res = await post(secret, chatBody("fast"));
    expect(res.status).toBe(200);
    await res.arrayBuffer();
    served.set(res.headers.get("x-request-id") as string, BigInt(res.headers.get("x-gateway-cost-nanos") as string));
  }
  const hanging = [1, 2, 3].map(() => post(secret, chatBody("slow")).then((r) => r.arrayBuffer()));
  const dripping = [1, 2].map(async () => {
    const res = await post(secret, chatBody("drip", true));
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    // A token has reached the client: the stream is well under way.
    const first = new TextDecoder().decode((await reader.read()).value);
    expect(first).toContain("data: ");
    return { id: res.headers.get("x-request-id") as string, rest: reader.read().then(() => reader.read()) };
  });
  const streams = await Promise.all(dripping);
  // The whole calls are past admission once the gateway waits on the slow upstream; they have no id yet.
  await Bun.sleep(500);
  const cut = Promise.allSettled([...hanging, ...streams.map((s) => s.rest)]);
  return { served, streamIds: streams.map((s) => s.id), cut };
}

async function kill9Gateway() {
  const { proc } = mesh.processes.gateway;
  proc.kill("SIGKILL");
  await proc.exited;
}

const range = () => ({ start: timestampFromMs(Date.now() - 3_600_000), end: timestampFromMs(Date.now() + 3_600_000) });

/** Every request of the org in ClickHouse and in billing, once both hold `count`. */
async function storedOnce(orgId: string, count: number) {
  return eventually(
    async () => {
      const [{ requests }, { records }] = await Promise.all([
        analytics().listRequests({ orgId, range: range(), pageSize: 1000 }),
        billing().listUsageRecords({ orgId, pageSize: 1000 }),
      ]);
      return requests.length === count && records.length === count ? { requests, records } : undefined;
    },
    { timeoutMs: 30_000, what: `${count} requests in ClickHouse and billing` },
  );
}

/** The interrupted calls are the five cut, their rows as the journal makes them; served ones kept their costs. */
async function expectRecorded(orgId: string, served: Map<string, bigint>, streamIds: string[], instance: string) {
  const { requests, records } = await storedOnce(orgId, served.size + 5);
  const byId = new Map(requests.map((r) => [r.requestId, r]));
  expect(new Set(records.map((r) => r.requestId))).toEqual(new Set(byId.keys()));
  for (const r of records) expect(r.costNanos).toBe(byId.get(r.requestId)?.costNanos as bigint);
  for (const [id, cost] of served) expect(byId.get(id)).toMatchObject({ status: RequestStatus.OK, costNanos: cost });
  const interrupted = requests.filter((r) => !served.has(r.requestId));
  const shape = (r: RequestMetrics) => [r.requestedModel, r.streamed, r.status, r.httpStatus, r.errorCode, r.costNanos];
  expect(interrupted.map(shape).sort()).toEqual([
    ["drip", true, RequestStatus.INTERNAL_ERROR, 500, "gateway_interrupted", 0n],
    ["drip", true, RequestStatus.INTERNAL_ERROR, 500, "gateway_interrupted", 0n],
    ["slow", false, RequestStatus.INTERNAL_ERROR, 500, "gateway_interrupted", 0n],
    ["slow", false, RequestStatus.INTERNAL_ERROR, 500, "gateway_interrupted", 0n],
    ["slow", false, RequestStatus.INTERNAL_ERROR, 500, "gateway_interrupted", 0n],
  ]);
  for (const id of streamIds) expect(byId.get(id)?.errorCode).toBe("gateway_interrupted");
  for (const r of interrupted) {
    expect(r.gatewayInstanceId).toBe(instance);
    const start = timestampDate(r.startTime as never).getTime();
    const end = timestampDate(r.endTime as never).getTime();
    // Ended when the dead process was last seen alive: after the calls began, within its refresh of a couple of seconds.
    expect(end).toBeGreaterThanOrEqual(start);
    expect(end - start).toBeLessThan(10_000);
  }
  const [usage] = (await analytics().queryUsage({ orgId, range: range() })).rows;
  const summary = await billing().getUsageSummary({ orgId, startTime: range().start, endTime: range().end });
  const cost = [...served.values()].reduce((a, b) => a + b, 0n);
  expect([usage?.requests, usage?.costNanos, usage?.errors]).toEqual([BigInt(served.size + 5), cost, 5n]);
  expect([summary.requests, summary.costNanos]).toEqual([BigInt(served.size + 5), cost]);
}

describe("calls in flight when the gateway is killed", () => {
  test("the gateway restarted under its instance id records them as interrupted, once", async () => {
    const { orgId, secret } = await createOrg("crashed-calls-same-id");
    const { served, streamIds, cut } = await serveThenHang(secret);
    await kill9Gateway();
    // Their clients see their connections break: no answer, no error status.
    expect((await cut).every((r) => r.status === "rejected")).toBe(true);
    await mesh.restart("gateway");
    await expectRecorded(orgId, served, streamIds, "calls-gw");
  }, 120_000);

  test("a gateway under another instance id adopts the dead one's spool and records its calls too", async () => {
    const { orgId, secret } = await createOrg("crashed-calls-adopted");
    const { served, streamIds, cut } = await serveThenHang(secret);
    await kill9Gateway();
    await cut;
    gatewayEnv.GATEWAY_INSTANCE_ID = "calls-gw-next";
    await mesh.restart("gateway");
    await expectRecorded(orgId, served, streamIds, "calls-gw");
  }, 120_000);
});
