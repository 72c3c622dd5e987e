/**
 * A request dated far past billing's clock (a gateway clock gone wrong) on its way from analytics to a real billing:
 * billing records it at its own clock, so it is billed in the current period with the rest of its batch, and says so.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { Registry } from "prom-client";
import { analyticsRoutes } from "../../analytics/routes.ts";
import { createAnalyticsService } from "../../analytics/service.ts";
import { createTestStore, sampleMetrics, type TestStore } from "../../analytics/store/test-store.ts";
import { createBillingApp } from "../../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../../billing/store/test-db.ts";
import { AnalyticsService, type IngestMetricsResponse } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../../lib/log.ts";

const adminToken = "test-admin-token-0123456789";
const headers = { authorization: `Bearer ${adminToken}` };

let db: TestDatabase;
let store: TestStore;
beforeAll(async () => {
  [db, store] = await Promise.all([createTestDatabase(), createTestStore()]);
}, 60_000);
afterAll(() => Promise.all([db?.drop(), store?.close()]));

test("a row dated years ahead is billed now with its batch, and the clock it came from is named in a warning", async () => {
  const logged: Record<string, unknown>[] = [];
  const log = createLogger({ service: "e2e", level: "warn", write: (line) => logged.push(JSON.parse(line)) });
  const billingApp = createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log });
  const bearer: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${adminToken}`);
    return next(req);
  };
  const billing = createClient(
    BillingService,
    createRouterTransport(billingApp.routes, { transport: { interceptors: [bearer] } }),
  );
  const registry = new Registry();
  const ingest = { flushIntervalMs: 20 };
  const analytics = createAnalyticsService({ store, billing, log, adminToken, registry, ingest });
  const client = createClient(AnalyticsService, createRouterTransport(analyticsRoutes(analytics, adminToken)));

  const { organization } = await billing.createOrganization({ name: "future-usage" });
  const orgId = organization?.id as string;
  // Of an org billing knows, with no project or key it would not.
  const owner = { orgId, projectId: "", apiKeyId: "" };
  const now = Date.now();
  const metrics = [0, 1, 2].map((i) => sampleMetrics(new Date(now - 60_000 + i), owner));
  const ahead = sampleMetrics(new Date("2035-01-01T00:00:00Z"), owner);
  metrics.splice(1, 0, ahead);

  const acks: IngestMetricsResponse[] = [];
  for await (const ack of client.ingestMetrics(
    (async function* () {
      yield { gatewayInstanceId: "gw-skewed", sequence: 1n, metrics };
    })(),
    { headers },
  )) {
    acks.push(ack);
  }
  expect(acks.map((a) => a.ackedSequence)).toEqual([1n]);

  const billed = await db.pool.query<{ request_id: string; occurred_at: Date }>(
    "SELECT request_id, occurred_at FROM usage_records WHERE org_id = $1 ORDER BY request_id",
    [orgId],
  );
  expect(billed.rows.map((r) => r.request_id)).toEqual(metrics.map((m) => m.requestId).sort());
  const aheadAt = billed.rows.find((r) => r.request_id === ahead.requestId)?.occurred_at.getTime() ?? 0;
  expect(Math.abs(aheadAt - Date.now())).toBeLessThan(60_000);
  const kept = await store.listRequests({
    orgId,
    window: { start: timestampFromDate(new Date(now - 3_600_000)), end: timestampFromDate(new Date("2036-01-01")) },
    limit: 10,
  });
  expect(kept.requests.map((m) => m.requestId).sort()).toEqual(metrics.map((m) => m.requestId).sort());
  const unbillable = await registry.getSingleMetric("analytics_ingest_unbillable_rows_total")?.get();
  expect(unbillable?.values[0]?.value ?? 0).toBe(0);
  expect(logged).toContainEqual(
    expect.objectContaining({
      level: "warn",
      records: 1,
      first: [{ request_id: ahead.requestId, occurred_at: "2035-01-01T00:00:00.000Z" }],
    }),
  );
});
