/**
 * Connections past their age (CONNECTION_MAX_AGE_MS) between a gateway's clients and the services they stream from:
 * the gateway's IngestMetrics stream and key change watch are ended with their connections and opened again on new
 * ones, losing and repeating nothing.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { analyticsRoutes } from "../../analytics/routes.ts";
import { createTestStore, sampleMetrics, type TestStore } from "../../analytics/store/test-store.ts";
import { createAnalyticsWithRecordingBilling } from "../../analytics/test-helpers.ts";
import { createMetricsShipper } from "../../gateway/metrics-pipe.ts";
import { createMemorySpool } from "../../gateway/spool.ts";
import { createTestLogger } from "../../gateway/testing.ts";
import { AnalyticsService } from "../../gen/analytics/v1/analytics_pb.ts";
import { connectionKey } from "../../lib/health.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { startServer } from "../../lib/server.ts";

const adminToken = "test-admin-token-0123456789";
const log = createTestLogger();
const now = Date.now();
const window = { start: timestampFromDate(new Date(now - 86_400_000)), end: timestampFromDate(new Date(now + 60_000)) };

let store: TestStore;
beforeAll(async () => {
  store = await createTestStore();
});
afterAll(() => store.close());

test("the metrics stream to analytics outlives its connections' ages: every row once in ClickHouse and billing", async () => {
  const org = "org_aging";
  const { service, billing } = createAnalyticsWithRecordingBilling({ store, log, adminToken, ingest: { flushIntervalMs: 20 } });
  // The connection each IngestMetrics stream came in on.
  const connections = new Set<object>();
  const routes = analyticsRoutes(service, adminToken);
  const server = await startServer({
    name: "analytics",
    port: 0,
    host: "127.0.0.1",
    routes,
    log,
    connectionMaxAgeMs: 150,
    interceptors: [
      (next) => (req) => {
        if (req.method.name === "IngestMetrics") connections.add(req.contextValues.get(connectionKey) ?? {});
        return next(req);
      },
    ],
  });
  const spool = createMemorySpool({ firstSequence: 1n });
  const shipper = createMetricsShipper({
    client: createServiceClient(AnalyticsService, { baseUrl: server.url, bearerToken: adminToken }),
    spool,
    instanceId: "gw-aging",
    log,
    batchRows: 5,
    intervalMs: 5,
  });
  try {
    shipper.start();
    const rows = [];
    // Rows keep coming while streams end and open again, until four connections have carried one.
    for (let i = 0; connections.size < 4; i++) {
      const row = sampleMetrics(new Date(now - 3_600_000 + i), { orgId: org });
      rows.push(row);
      shipper.record(row);
      await Bun.sleep(5);
    }
    expect(await shipper.flush(20_000)).toBe(true);
    const expected = rows.map((m) => m.requestId).sort();
    const page = await store.listRequests({ orgId: org, window, limit: 10_000 });
    expect(page.requests.map((m) => m.requestId).sort()).toEqual(expected);
    // Each row sent once: a stream ended by its connection's age acks all it read first.
    expect(billing.calls.flat()).toHaveLength(rows.length);
    // Streams ended with their connections are routine: opened again at once, not an outage.
    expect(log.lines.filter((line) => /"level":"(warn|error)"/.test(line))).toEqual([]);
  } finally {
    await shipper.close();
    await server.close(0);
  }
}, 60_000);
