import { afterAll, beforeAll, expect, test } from "bun:test";
import { AnalyticsService, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { analyticsRoutes } from "./routes.ts";
import { createAnalyticsService } from "./service.ts";
import { createTestStore, sampleMetrics, type TestStore } from "./store/test-store.ts";
import { createBatchQueue, createRecordingBilling } from "./test-helpers.ts";

const adminToken = "test-admin-token-0123456789";
const log = createLogger({ service: "analytics-test", level: "error", write: () => {} });
const billing = createRecordingBilling();
let store: TestStore;
let billingServer: RunningServer;
let analyticsServer: RunningServer;

beforeAll(async () => {
  store = await createTestStore();
  billingServer = await startServer({
    name: "billing-double",
    port: 0,
    routes: (router) => router.service(BillingService, billing.impl),
    log,
  });
  const service = createAnalyticsService({
    store,
    billing: createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken }),
    log,
    adminToken,
  });
  analyticsServer = await startServer({
    name: "analytics",
    port: 0,
    routes: analyticsRoutes(service, adminToken),
    readiness: async () => {
      await store.ping();
      return { ready: true, checks: { clickhouse: "ok" } };
    },
    log,
  });
});

afterAll(async () => {
  await analyticsServer.close(1000);
  await billingServer.close(1000);
  await store.close();
});

test("a gateway streams batches over gRPC, acked on the open stream; Connect JSON reads the usage", async () => {
  const org = "org_wire";
  const gateway = createServiceClient(AnalyticsService, { baseUrl: analyticsServer.url, bearerToken: adminToken });
  const queue = createBatchQueue();
  const acks = gateway.ingestMetrics(queue)[Symbol.asyncIterator]();
  const now = Date.now();
  const first = [
    sampleMetrics(new Date(now - 2000), { orgId: org }),
    sampleMetrics(new Date(now - 1000), { orgId: org }),
  ];
  const second = [sampleMetrics(new Date(now - 500), { orgId: org, costNanos: 5n })];

  queue.push({ gatewayInstanceId: "gw-wire", sequence: 1n, metrics: first });
  expect((await acks.next()).value?.ackedSequence).toBe(1n);
  queue.push({ gatewayInstanceId: "gw-wire", sequence: 2n, metrics: second });
  expect((await acks.next()).value?.ackedSequence).toBe(2n);
  queue.end();
  expect((await acks.next()).done).toBe(true);
  expect([...billing.stored.keys()].sort()).toEqual([...first, ...second].map((m) => m.requestId).sort());

  const res = await fetch(`${analyticsServer.url}/analytics.v1.AnalyticsService/QueryUsage`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
    body: JSON.stringify({
      orgId: org,
      range: { start: new Date(now - 3_600_000).toISOString(), end: new Date(now + 60_000).toISOString() },
      groupBy: ["USAGE_GROUP_BY_MODEL"],
    }),
  });
  expect(res.status).toBe(200);
  expect(await res.json()).toEqual({
    rows: [
      {
        group: ["gpt-4o-mini"],
        requests: "3",
        usage: { inputTokens: "300", cachedInputTokens: "60", outputTokens: "150", reasoningTokens: "15" },
        costNanos: String(2 * 12_345 + 5),
      },
    ],
  });

  const ready = await fetch(`${analyticsServer.url}/readyz`);
  expect(ready.status).toBe(200);
});

test("Connect JSON queries refuse fields and enum names they do not define, rather than answer without them", async () => {
  const org = "org_strict";
  const now = Date.now();
  await store.insertRequests(
    [
      sampleMetrics(new Date(now - 2000), { orgId: org }),
      sampleMetrics(new Date(now - 1000), { orgId: org, requestedModel: "m-b", status: RequestStatus.CANCELLED }),
    ],
    "strict-1",
  );
  const range = { start: new Date(now - 3_600_000).toISOString(), end: new Date(now + 60_000).toISOString() };
  const call = async (method: string, body: Record<string, unknown>) => {
    const res = await fetch(`${analyticsServer.url}/analytics.v1.AnalyticsService/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
      body: JSON.stringify({ orgId: org, range, ...body }),
    });
    return { status: res.status, body: (await res.json()) as { code?: string; message?: string; requests?: unknown[] } };
  };
  const refused = async (method: string, body: Record<string, unknown>, named: string) => {
    const { status, body: error } = await call(method, body);
    expect([status, error.code]).toEqual([400, "invalid_argument"]);
    expect(error.message).toContain(named);
  };

  // Skipped, each of these answered 200 for every request: both the OK one as cancelled, or every model as one.
  await refused("ListRequests", { status: "REQUEST_STATUS_CANCELED" }, "REQUEST_STATUS_CANCELED");
  await refused("ListRequests", { apiKey: "key_b" }, "apiKey");
  await refused("QueryTimeSeries", { bucketSeconds: 3600, requestedModel: "m-b" }, "requestedModel");
  await refused("QueryUsage", { groupBy: ["USAGE_GROUP_BY_MODLE"] }, "USAGE_GROUP_BY_MODLE");
  await refused("QueryLatency", { groupBy: ["USAGE_GROUP_BY_MODEL"] }, "groupBy");

  const cancelled = await call("ListRequests", { status: "REQUEST_STATUS_CANCELLED" });
  expect(cancelled.status).toBe(200);
  expect(cancelled.body.requests).toHaveLength(1);
  expect((await call("QueryTimeSeries", { bucketSeconds: "3600", model: "m-b" })).status).toBe(200);
});
