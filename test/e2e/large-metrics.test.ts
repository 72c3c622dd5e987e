/**
 * Request metrics of the largest size the gateway's request checks allow, from the gateway's real file spool and
 * shipper to a real analytics server (ClickHouse in process, its default receive limit) over a socket.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Registry } from "prom-client";
import { analyticsRoutes } from "../../analytics/routes.ts";
import { createChdbDriver } from "../../analytics/store/chdb-driver.ts";
import { createTestStore, sampleMetrics, testDataDir, type TestStore } from "../../analytics/store/test-store.ts";
import { createAnalyticsWithRecordingBilling } from "../../analytics/test-helpers.ts";
import { parseChatInput } from "../../gateway/chat-request.ts";
import { meteredName } from "../../gateway/metering.ts";
import { createMetricsShipper, type MetricsShipper } from "../../gateway/metrics-pipe.ts";
import { minBatchBytes } from "../../gateway/spool.ts";
import { type FileSpool, openFileSpool } from "../../gateway/spool-file.ts";
import { createTestLogger } from "../../gateway/testing.ts";
import { AnalyticsService, type RequestMetrics, RequestMetricsSchema } from "../../gen/analytics/v1/analytics_pb.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../../lib/server.ts";

const adminToken = "test-admin-token-0123456789";
const log = createTestLogger();
const now = Date.now();
const window = { start: timestampFromDate(new Date(now - 86_400_000)), end: timestampFromDate(new Date(now + 60_000)) };

// Four UTF-8 bytes per character: the most a checked string can take per character.
const wide = (chars: number, suffix = "") => "\u{1F600}".repeat(chars - suffix.length) + suffix;

/** The metrics of a request whose `user` and `metadata` are as large as the gateway's request checks let through. */
function largestMetrics(orgId: string, i: number): RequestMetrics {
  const metadata = Object.fromEntries(
    Array.from({ length: 16 }, (_, t) => [wide(64, String(t).padStart(2, "0")), wide(512, String(i))]),
  );
  const input = parseChatInput({
    model: wide(300),
    messages: [{ role: "user", content: "hi" }],
    user: wide(256),
    metadata,
  });
  return sampleMetrics(new Date(now - 3_600_000 + i), {
    orgId,
    endUserId: input.user,
    tags: input.tags,
    requestedModel: meteredName(input.model),
    servedModel: meteredName(wide(300)),
    errorCode: "x".repeat(128),
  });
}

let store: TestStore;
const driver = () => createChdbDriver(testDataDir());
beforeAll(async () => {
  store = await createTestStore({ driver: driver() });
});
afterAll(() => store.close());

const roots: string[] = [];
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

/** A real analytics service on a real port, billing recorded in process. */
async function startAnalytics() {
  const { service, billing } = createAnalyticsWithRecordingBilling({ store, log, adminToken, ingest: { flushIntervalMs: 50 } });
  const server: RunningServer = await startServer({
    name: "analytics",
    port: 0,
    routes: analyticsRoutes(service, adminToken),
    log,
  });
  cleanups.push(() => server.close(0));
  return { billing, server };
}

function startShipper(server: RunningServer, spool: FileSpool, registry?: Registry): MetricsShipper {
  const shipper = createMetricsShipper({
    client: createServiceClient(AnalyticsService, { baseUrl: server.url, bearerToken: adminToken }),
    spool,
    instanceId: "gw-large",
    log,
    backoffBaseMs: 50,
    backoffMaxMs: 200,
    registry,
  });
  cleanups.push(() => shipper.close());
  shipper.start();
  return shipper;
}

function newRoot(): string {
  const root = mkdtempSync(join(tmpdir(), "large-metrics-"));
  roots.push(root);
  return root;
}

/** The gateway's spool under root, closed after the test. */
function openSpool(root: string): FileSpool {
  const spool = openFileSpool({ root, name: "gw", maxBytes: 256 * 1024 * 1024, fsync: "never", log });
  cleanups.push(() => spool.close());
  return spool;
}

/** Rows of the org in ClickHouse, counted as merged (FINAL, every page of them) and as stored. */
async function stored(orgId: string) {
  const ids: string[] = [];
  let after: Awaited<ReturnType<typeof store.listRequests>>["next"];
  do {
    const page = await store.listRequests({ orgId, window, limit: 5000, after });
    ids.push(...page.requests.map((m) => m.requestId));
    after = page.next;
  } while (after);
  const [raw] = await driver().query<{ rows: string }>(
    `SELECT count() AS rows FROM ${store.database}.requests WHERE org_id = {org:String}`,
    { org: orgId },
  );
  return { ids: ids.sort(), raw: Number(raw?.rows) };
}

describe("large request metrics, shipped to a real analytics server", () => {
  test("1000 of the largest rows allowed go in batches analytics accepts: all acked, once in ClickHouse and billing", async () => {
    const org = "org_largest";
    const rows = Array.from({ length: 1000 }, (_, i) => largestMetrics(org, i));
    // However small a batch is configured, a few of these fit in it.
    expect(toBinary(RequestMetricsSchema, rows[0] as RequestMetrics).length).toBeLessThan(minBatchBytes / 4);
    const { billing, server } = await startAnalytics();
    const spool = openSpool(newRoot());
    const registry = new Registry();
    const shipper = startShipper(server, spool, registry);
    for (const m of rows) shipper.record(m);

    expect(await shipper.flush(20_000)).toBe(true);
    expect(spool.rows).toBe(0);
    const acked = (await registry.getSingleMetric("gateway_ingest_batches_acked_total")?.get())?.values[0]?.value;
    expect(acked).toBeGreaterThan(1);
    const expected = rows.map((m) => m.requestId).sort();
    expect(await stored(org)).toEqual({ ids: expected, raw: 1000 });
    expect([...billing.stored.keys()].sort()).toEqual(expected);
    expect(billing.calls.flat()).toHaveLength(1000);
  }, 60_000);

  test("a row no batch could hold, past the request checks, goes without its tags; it and the rows after it are billed", async () => {
    const org = "org_oversized";
    const oversized = sampleMetrics(new Date(now - 60_000), {
      orgId: org,
      tags: { note: "x".repeat(20 * 1024 * 1024) },
    });
    const after = Array.from({ length: 5 }, (_, i) => largestMetrics(org, i));
    const { billing, server } = await startAnalytics();
    const spool = openSpool(newRoot());
    const shipper = startShipper(server, spool);
    for (const m of [oversized, ...after]) shipper.record(m);

    expect(await shipper.flush(20_000)).toBe(true);
    const expected = [oversized, ...after].map((m) => m.requestId).sort();
    expect(await stored(org)).toEqual({ ids: expected, raw: 6 });
    const [row] = (await store.listRequests({ orgId: org, window, limit: 1, requestId: oversized.requestId })).requests;
    expect(row).toMatchObject({ costNanos: oversized.costNanos, tags: {} });
    expect([...billing.stored.keys()].sort()).toEqual(expected);
  }, 60_000);

  test("a spool left with a batch analytics cannot take (sealed by rows alone, as before) drains: once everywhere", async () => {
    const org = "org_old_spool";
    const rows = Array.from({ length: 500 }, (_, i) => largestMetrics(org, i));
    const root = newRoot();
    const old = openSpool(root);
    for (const m of rows) old.append(toBinary(RequestMetricsSchema, m));
    expect(old.seal(1000, Number.POSITIVE_INFINITY)?.rows).toBe(500);
    old.close();

    const spool = openSpool(root);
    expect(spool.recovery).toMatchObject({ rows: 500, resealedBatches: 1 });
    const { billing, server } = await startAnalytics();
    const shipper = startShipper(server, spool);
    expect(await shipper.flush(20_000)).toBe(true);
    expect(spool.rows).toBe(0);
    const expected = rows.map((m) => m.requestId).sort();
    expect(await stored(org)).toEqual({ ids: expected, raw: 500 });
    expect([...billing.stored.keys()].sort()).toEqual(expected);
    expect(billing.calls.flat()).toHaveLength(500);
  }, 60_000);
});
