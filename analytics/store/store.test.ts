import { mkdtempSync, readdirSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { create, equals, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient } from "@clickhouse/client";
import { Code, ConnectError } from "@connectrpc/connect";
import { ListRequestsResponseSchema, RequestMetricsSchema, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { createLogger } from "../../lib/log.ts";
import { runCommand } from "../../lib/processes.ts";
import { query } from "../service.ts";
import { createChdbDriver } from "./chdb-driver.ts";
import { createClientDriver } from "./client-driver.ts";
import type { ClickHouseDriver } from "./driver.ts";
import { loadMigrations, migrate } from "./migrate.ts";
import { createAnalyticsStore, maxRequestPageBytes, maxTtlDays } from "./store.ts";
import { startClickHouseHttpServer } from "./testing/clickhouse-http-server.ts";
import { createTestStore, sampleMetrics, type TestStore, testDatabase, testDataDir } from "./test-store.ts";

const hour = 3_600_000;
// Two days back, on the hour, so every row is well inside the retention whenever the suite runs.
const base = new Date(Math.floor(Date.now() / hour) * hour - 48 * hour);
const at = (offsetMs: number) => new Date(base.getTime() + offsetMs);
const window = { start: timestampFromDate(at(-hour)), end: timestampFromDate(at(72 * hour)) };

// @clickhouse/client runs against CLICKHOUSE_URL when it is set, else against the test server over this
// process's chdb session (the same engine, reached through ClickHouse's HTTP interface).
const clickhouseUrl = process.env.CLICKHOUSE_URL;
const testServer = clickhouseUrl ? undefined : startClickHouseHttpServer({ path: testDataDir() });
afterAll(() => testServer?.stop());

const backends: [string, () => ClickHouseDriver][] = [
  ["chdb", () => createChdbDriver(testDataDir())],
  [
    clickhouseUrl ? `@clickhouse/client at CLICKHOUSE_URL` : "@clickhouse/client over HTTP (test server on chdb)",
    () =>
      createClientDriver(
        createClient({
          url: clickhouseUrl ?? testServer?.url,
          username: process.env.CLICKHOUSE_USER,
          password: process.env.CLICKHOUSE_PASSWORD,
        }),
      ),
  ],
];

for (const [name, makeDriver] of backends) {
  describe(`analytics store on ${name}`, () => {
    let driver: ClickHouseDriver;
    let store: TestStore;

    beforeAll(async () => {
      driver = makeDriver();
      store = await createTestStore({ driver });
    });
    afterAll(() => store.close());

    const physicalRows = async (orgId: string) => {
      const [row] = await driver.query<{ n: string }>(
        `SELECT count() AS n FROM ${store.database}.requests WHERE org_id = {org:String}`,
        { org: orgId },
      );
      return Number(row?.n);
    };

    test("migrations apply from empty and re-running them changes nothing", async () => {
      const database = testDatabase("migrate");
      const fresh = createAnalyticsStore(driver, { database, ttlDays: 400 });
      try {
        expect(await fresh.migrate()).toEqual(loadMigrations().map((m) => m.version));
        expect(await fresh.migrate()).toEqual([]);
        const recorded = await driver.query<{ version: string }>(
          `SELECT version FROM ${database}.schema_migrations FINAL ORDER BY version`,
        );
        expect(recorded.map((r) => r.version)).toEqual(loadMigrations().map((m) => m.version));
        const tables = await driver.query<{ name: string }>(
          "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name",
          { db: database },
        );
        expect(tables.map((t) => t.name)).toEqual([
          "requests",
          "requests_1h",
          "requests_1m",
          "rollup_dirty",
          "rollup_state",
          "schema_migrations",
        ]);
      } finally {
        await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      }
    });

    test("a batch inserted twice is counted once, before any merge", async () => {
      const org = "org_dedup";
      const batch = Array.from({ length: 50 }, (_, i) =>
        sampleMetrics(at(i * 1000), { orgId: org, costNanos: 1_000n + BigInt(i) }),
      );
      await store.insertRequests(batch, "batch-1");
      await store.insertRequests(batch, "batch-1");
      // The same token drops the whole block at insert time.
      expect(await physicalRows(org)).toBe(50);
      // A resend inside a different batch writes duplicate rows; reads still count each request once.
      const extra = sampleMetrics(at(60_000), { orgId: org, costNanos: 7n });
      await store.insertRequests([...batch.slice(0, 20), extra], "batch-2");
      expect(await physicalRows(org)).toBe(71);
      const [total] = await store.queryUsage({ orgId: org, ...window, groupBy: [], limit: 10 });
      expect(total?.requests).toBe(51n);
      expect(total?.costNanos).toBe(50n * 1_000n + (49n * 50n) / 2n + 7n);
      expect(total?.usage?.inputTokens).toBe(51n * 100n);
      const page = await store.listRequests({ orgId: org, window, limit: 1000 });
      expect(page.requests).toHaveLength(51);
      expect(new Set(page.requests.map((r) => r.requestId)).size).toBe(51);
    });

    test("a page of requests stays within what a gRPC client takes, the rest on the pages after it", async () => {
      const org = "org_big_pages";
      // 16 tags of 64-character keys and 512 two-byte characters each: about 17 KB a row, as large as a gateway sends.
      const tags = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`${i}`.padStart(64, "k"), "é".repeat(512)]));
      const rows = Array.from({ length: 250 }, (_, i) => sampleMetrics(at(i * 100), { orgId: org, tags }));
      await store.insertRequests(rows, "big-pages-1");
      const seen: string[] = [];
      const sizes: number[] = [];
      let after: Awaited<ReturnType<typeof store.listRequests>>["next"];
      do {
        const page = await store.listRequests({ orgId: org, window, limit: 1000, after });
        sizes.push(toBinary(ListRequestsResponseSchema, create(ListRequestsResponseSchema, page)).byteLength);
        seen.push(...page.requests.map((r) => r.requestId));
        after = page.next;
      } while (after);
      expect(sizes.length).toBe(2);
      for (const size of sizes) expect(size).toBeLessThanOrEqual(maxRequestPageBytes);
      expect(seen.toSorted()).toEqual(rows.map((r) => r.requestId).toSorted());
    });

    test("a Responses API request is stored and read back under its endpoint", async () => {
      const org = "org_responses";
      const row = sampleMetrics(at(0), { orgId: org, endpoint: Endpoint.RESPONSES, costNanos: 321n });
      await store.insertRequests([row], "batch-responses");
      const page = await store.listRequests({ orgId: org, window, limit: 10 });
      expect(page.requests.map((r) => [r.requestId, r.endpoint, r.costNanos])).toEqual([
        [row.requestId, Endpoint.RESPONSES, 321n],
      ]);
      const [stored] = await driver.query<{ endpoint: string }>(
        `SELECT endpoint FROM ${store.database}.requests WHERE org_id = {org:String}`,
        { org },
      );
      expect(stored?.endpoint).toBe("RESPONSES");
    });

    test("usage groups by dimensions in the order asked, per org only", async () => {
      const org = "org_groups";
      await store.insertRequests(
        [
          sampleMetrics(at(0), { orgId: org, requestedModel: "m1", apiKeyId: "k1", costNanos: 10n }),
          sampleMetrics(at(1000), { orgId: org, requestedModel: "m1", apiKeyId: "k2", costNanos: 20n }),
          sampleMetrics(at(2000), {
            orgId: org,
            requestedModel: "m2",
            apiKeyId: "k1",
            costNanos: 0n,
            status: RequestStatus.RATE_LIMITED,
            httpStatus: 429,
          }),
          sampleMetrics(at(25 * hour), {
            orgId: org,
            requestedModel: "m2",
            apiKeyId: "k1",
            costNanos: 40n,
            provider: "openai",
          }),
          sampleMetrics(at(0), { orgId: "org_other", requestedModel: "m1", costNanos: 1_000_000n }),
        ],
        "groups-1",
      );
      const byModel = await store.queryUsage({ orgId: org, ...window, groupBy: ["model"], limit: 10 });
      expect(byModel.map((r) => [r.group, r.requests, r.costNanos, r.errors])).toEqual([
        [["m1"], 2n, 30n, 0n],
        [["m2"], 2n, 40n, 1n],
      ]);
      const byKeyStatus = await store.queryUsage({ orgId: org, ...window, groupBy: ["api_key", "status"], limit: 10 });
      expect(byKeyStatus.map((r) => [r.group, r.requests])).toEqual([
        [["k1", "OK"], 2n],
        [["k1", "RATE_LIMITED"], 1n],
        [["k2", "OK"], 1n],
      ]);
      const byDayProvider = await store.queryUsage({ orgId: org, ...window, groupBy: ["day", "provider"], limit: 10 });
      const day = (d: Date) => `${d.toISOString().slice(0, 10)}T00:00:00Z`;
      expect(byDayProvider.map((r) => [r.group, r.requests])).toEqual(
        day(at(0)) === day(at(25 * hour))
          ? [[[day(at(0)), "mock"], 3n], [[day(at(0)), "openai"], 1n]]
          : [[[day(at(0)), "mock"], 3n], [[day(at(25 * hour)), "openai"], 1n]],
      );
      const byHour = await store.queryUsage({ orgId: org, ...window, groupBy: ["hour", "project"], limit: 10 });
      expect(byHour.map((r) => [r.group, r.requests])).toEqual([
        [[`${at(0).toISOString().slice(0, 19)}Z`, "proj_a"], 3n],
        [[`${at(25 * hour).toISOString().slice(0, 19)}Z`, "proj_a"], 1n],
      ]);
      const narrow = { start: timestampFromDate(at(0)), end: timestampFromDate(at(2000)) };
      const [total] = await store.queryUsage({ orgId: org, ...narrow, groupBy: [], limit: 10 });
      expect(total?.requests).toBe(2n);
    });

    test("user input is bound as parameters, never spliced", async () => {
      const orgId = "x' OR 1=1 --";
      expect(await store.queryUsage({ orgId, ...window, groupBy: ["model"], limit: 10 })).toEqual([]);
      const [all] = await store.queryUsage({ orgId, ...window, groupBy: [], limit: 10 });
      expect(all?.requests).toBe(0n);
      const page = await store.listRequests({ orgId, window, limit: 10, model: "') OR ('1'='1", requestId: "\\'" });
      expect(page.requests).toEqual([]);
      expect(await store.queryTimeSeries({ orgId, ...window, bucketSeconds: 3600, model: "'" })).toEqual([]);
      expect(await store.queryLatency({ orgId, ...window, limit: 10 })).toEqual([]);
    });

    test("requests page newest first with a cursor and round-trip every field", async () => {
      const org = "org_pages";
      const rows = Array.from({ length: 25 }, (_, i) => sampleMetrics(at(i * 60_000), { orgId: org }));
      const detailed = sampleMetrics(at(30 * 60_000), {
        orgId: org,
        requestedModel: "m-detail",
        streamed: true,
        firstTokenTime: { seconds: BigInt(Math.floor(at(30 * 60_000).getTime() / 1000)), nanos: 250_123_000 },
        ttftUs: 250_123n,
        status: RequestStatus.UPSTREAM_ERROR,
        httpStatus: 502,
        errorCode: "upstream_error",
        usageEstimated: true,
        retries: 2,
        fallbackUsed: true,
        costNanos: 9_007_199_254_740_993n,
        costBreakdown: {
          inputNanos: 9_007_199_254_740_000n,
          cachedInputNanos: 900n,
          outputNanos: 90n,
          reasoningNanos: 3n,
        },
        tags: { a: "1", "quote'd": "it's" },
      });
      await store.insertRequests([...rows, detailed], "pages-1");

      const seen: string[] = [];
      let after: Awaited<ReturnType<typeof store.listRequests>>["next"];
      let pages = 0;
      do {
        const page = await store.listRequests({ orgId: org, window, limit: 10, after });
        seen.push(...page.requests.map((r) => r.requestId));
        after = page.next;
        pages++;
      } while (after);
      expect(pages).toBe(3);
      const expected = [...rows, detailed]
        .sort((a, b) => Number(b.startTime?.seconds) - Number(a.startTime?.seconds))
        .map((r) => r.requestId);
      expect(seen).toEqual(expected);

      const [found] = (await store.listRequests({ orgId: org, limit: 10, requestId: detailed.requestId })).requests;
      expect(found && equals(RequestMetricsSchema, found, detailed)).toBe(true);
      // A request whose cost was not itemised reads back without a breakdown, not with zeros.
      const [plain] = (await store.listRequests({ orgId: org, limit: 10, requestId: rows[0]?.requestId })).requests;
      expect(plain?.costBreakdown).toBeUndefined();
      expect(plain && equals(RequestMetricsSchema, plain, rows[0] as typeof plain)).toBe(true);
      const filtered = await store.listRequests({
        orgId: org,
        window,
        limit: 10,
        model: "m-detail",
        status: RequestStatus.UPSTREAM_ERROR,
        apiKeyId: "key_a",
      });
      expect(filtered.requests.map((r) => r.requestId)).toEqual([detailed.requestId]);
      expect(filtered.next).toBeUndefined();
      const [sum] = await store.queryUsage({ orgId: org, ...window, groupBy: [], limit: 1 });
      // Above 2^53: exact only if 64-bit integers never pass through a double.
      expect(sum?.costNanos).toBe(25n * 12_345n + 9_007_199_254_740_993n);
    });

    test("a page after a cursor reads only the hours up to it, not the whole range", async () => {
      const org = "org_deep_pages";
      await store.insertRequests(
        Array.from({ length: 12 }, (_, i) => sampleMetrics(at(i * hour + 60_000), { orgId: org })),
        "deep-pages-1",
      );
      let last: { sql: string; params?: Parameters<ClickHouseDriver["query"]>[1] } | undefined;
      const watched = createAnalyticsStore(
        {
          ...driver,
          query: (sql, params, report) => {
            if (report) last = { sql, params };
            return driver.query(sql, params, report);
          },
        },
        { database: store.database, ttlDays: 400 },
      );
      const first = await watched.listRequests({ orgId: org, window, limit: 9 });
      const page = await watched.listRequests({ orgId: org, window, limit: 9, after: first.next });
      expect(page.requests).toHaveLength(3);
      expect(page.next).toBeUndefined();
      // Explained on the engine in process, whichever backend ran the query (the test server runs no EXPLAIN).
      const engine = createChdbDriver(testDataDir());
      const plan = await engine.query<{ explain: string }>(`EXPLAIN indexes = 1 ${last?.sql}`, last?.params);
      await engine.close();
      const keyCondition = plan.map((r) => r.explain).find((line) => line.includes("Condition: and((toStartOfHour"));
      // The hour of the cursor (the 9th newest row, 3 hours after `base`) bounds what the sorting key selects.
      expect(keyCondition).toContain(`(-Inf, ${(base.getTime() + 3 * hour) / 1000}]`);
    });

    test("a query past ClickHouse's time limit is ResourceExhausted on this backend too", async () => {
      const slow = () =>
        driver.query("SELECT count() FROM numbers(10000000000) WHERE sipHash64(number) = 7 SETTINGS max_execution_time = 1");
      const silent = createLogger({ service: "t", level: "error", write: () => {} });
      const err = await query(silent, "Slow", slow).catch((e: unknown) => ConnectError.from(e));
      expect(err instanceof ConnectError && err.code).toBe(Code.ResourceExhausted);
    }, 30_000);

    test("a query ClickHouse estimates would outrun its time limit (TOO_SLOW) is ResourceExhausted too", async () => {
      // Servers before max_estimated_execution_time stop a report so once it has run 10 s, against max_execution_time.
      const slow = () =>
        driver.query(
          `SELECT count() FROM numbers(10000000000) WHERE sipHash64(number) = 7
           SETTINGS max_execution_time = 30, max_estimated_execution_time = 30, timeout_before_checking_execution_speed = 0.2`,
        );
      const silent = createLogger({ service: "t", level: "error", write: () => {} });
      const err = await query(silent, "Slow", slow).catch((e: unknown) => ConnectError.from(e));
      expect(err instanceof ConnectError && [err.code, err.rawMessage]).toEqual([
        Code.ResourceExhausted,
        "the query ran out of time; narrow the range or group by fewer dimensions",
      ]);
    }, 30_000);

    test("a query past ClickHouse's memory limit is ResourceExhausted, not an unavailable store", async () => {
      const large = () =>
        driver.query(
          `SELECT number % 10000000 AS k, count() FROM numbers(20000000) GROUP BY k ORDER BY k LIMIT 1
           SETTINGS max_memory_usage = 20000000`,
        );
      const silent = createLogger({ service: "t", level: "error", write: () => {} });
      const err = await query(silent, "Large", large).catch((e: unknown) => ConnectError.from(e));
      expect(err instanceof ConnectError && err.code).toBe(Code.ResourceExhausted);
    }, 30_000);

    test("upstream latency counts requests that reached an upstream only", async () => {
      const org = "org_upstream";
      const reached = [1000n, 3000n].map((us, i) =>
        sampleMetrics(at(i * 1000), { orgId: org, totalLatencyUs: us + 100n, upstreamLatencyUs: us }),
      );
      const refused = [0, 1, 2].map((i) =>
        sampleMetrics(at(5000 + i), { orgId: org, status: RequestStatus.RATE_LIMITED, upstreamLatencyUs: 0n }),
      );
      await store.insertRequests([...reached, ...refused], "upstream-1");
      const [model] = await store.queryLatency({ orgId: org, ...window, limit: 10 });
      expect(model?.requests).toBe(5n);
      expect(model?.upstream?.p50Us).toBe(2000n);
    });

    test("time series buckets and latency percentiles", async () => {
      const org = "org_series";
      const latencies = [100n, 200n, 300n, 400n, 500n];
      await store.insertRequests(
        [
          ...latencies.map((us, i) =>
            sampleMetrics(at(i * 60_000), {
              orgId: org,
              totalLatencyUs: us,
              upstreamLatencyUs: us - 50n,
              gatewayOverheadUs: 50n,
            }),
          ),
          sampleMetrics(at(hour + 5_000), {
            orgId: org,
            requestedModel: "m-stream",
            streamed: true,
            ttftUs: 80n,
            status: RequestStatus.TIMEOUT,
            usage: { inputTokens: 7n, outputTokens: 0n },
          }),
        ],
        "series-1",
      );
      const points = await store.queryTimeSeries({ orgId: org, ...window, bucketSeconds: 3600, model: "" });
      expect(points.map((p) => [p.bucketStart?.seconds, p.requests, p.inputTokens, p.errors])).toEqual([
        [BigInt(at(0).getTime() / 1000), 5n, 500n, 0n],
        [BigInt(at(hour).getTime() / 1000), 1n, 7n, 1n],
      ]);
      const onlyStream = await store.queryTimeSeries({ orgId: org, ...window, bucketSeconds: 60, model: "m-stream" });
      expect(onlyStream.map((p) => p.requests)).toEqual([1n]);

      const models = await store.queryLatency({ orgId: org, ...window, limit: 10 });
      expect(models.map((m) => m.model)).toEqual(["gpt-4o-mini", "m-stream"]);
      const [plain, streamed] = models;
      expect(plain?.requests).toBe(5n);
      expect(plain?.total?.p50Us).toBe(300n);
      expect(plain?.upstream?.p50Us).toBe(250n);
      expect(plain?.gatewayOverhead?.p99Us).toBe(50n);
      expect(plain?.timeToFirstToken?.p50Us).toBe(0n);
      expect(streamed?.timeToFirstToken?.p90Us).toBe(80n);
    });

    test("a report over every other minute late, as many as the rollups are patched for, is answered", async () => {
      const orgId = "org_late_every_other";
      const onTime = Array.from({ length: 240 }, (_, m) => sampleMetrics(at(m * 60_000), { orgId, costNanos: 2n }));
      await store.insertRequests(onTime, "every-other-1");
      await store.rollUp();
      // 100 late minutes, one in the range's partial first minute: 99 dirty ones split the rollups into ~200 spans,
      // each bound as two query parameters (about 18 KB of them).
      const late = Array.from({ length: 100 }, (_, m) => sampleMetrics(at(2 * m * 60_000 + 10_000), { orgId, costNanos: 3n }));
      await store.insertRequests(late, "every-other-2");
      const range = { start: timestampFromDate(at(15_000)), end: timestampFromDate(at(4 * hour)) };
      const [total] = await store.queryUsage({ orgId, ...range, groupBy: [], limit: 1 });
      expect([total?.requests, total?.costNanos]).toEqual([239n + 99n, 239n * 2n + 99n * 3n]);
      const series = await store.queryTimeSeries({ orgId, ...range, bucketSeconds: 3600, model: "" });
      expect(series.reduce((n, p) => n + p.requests, 0n)).toBe(239n + 99n);
    });

    test("a roll-up recomputes and clears the marks of thousands of late minutes", async () => {
      const orgId = "org_backlog";
      await store.rollUp();
      // A gateway's spool resent after an outage: rows for 1,500 minutes that are already rolled up.
      const late = Array.from({ length: 1500 }, (_, m) => sampleMetrics(at(m * 60_000 + 1_000), { orgId, costNanos: 3n }));
      await store.insertRequests(late, "backlog-1");
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(at(25 * hour)) };
      expect((await store.rollUp()).recomputedMinutes).toBeGreaterThanOrEqual(1500);
      const [marks] = await driver.query<{ n: string }>(
        `SELECT count() AS n FROM ${store.database}.rollup_dirty WHERE org_id = {org:String}`,
        { org: orgId },
      );
      expect(marks?.n).toBe("0");
      const [total] = await store.queryUsage({ orgId, ...range, groupBy: [], limit: 1 });
      expect([total?.requests, total?.costNanos]).toEqual([1500n, 4500n]);
    }, 60_000);

    test("a roll-up clears its marks through the sorting key, not by reading every mark waiting", async () => {
      const orgId = "org_mark_key";
      await store.rollUp();
      await store.insertRequests([sampleMetrics(at(5 * 60_000 + 1_000), { orgId })], "mark-key-1");
      let cleared: { sql: string; params?: Parameters<ClickHouseDriver["exec"]>[1] } | undefined;
      const watched = createAnalyticsStore(
        {
          ...driver,
          exec: (sql, params) => {
            if (/^DELETE FROM \w+\.rollup_dirty/.test(sql)) cleared = { sql, params };
            return driver.exec(sql, params);
          },
        },
        { database: store.database, ttlDays: 400 },
      );
      await watched.rollUp();
      const where = cleared?.sql.replace(/^DELETE FROM \S+/, "");
      const engine = createChdbDriver(testDataDir());
      const plan = await engine.query<{ explain: string }>(
        `EXPLAIN indexes = 1 SELECT count() FROM ${store.database}.rollup_dirty ${where}`,
        cleared?.params,
      );
      await engine.close();
      const keyCondition = plan.map((r) => r.explain).find((line) => /^\W*Condition: /.test(line) && line.includes("org_id"));
      expect(keyCondition).toContain(`(org_id in (-Inf, '${orgId}'])`);
      expect(keyCondition).toContain(`(minute in (-Inf, ${(base.getTime() + 5 * 60_000) / 1000}])`);
    });

    test("marks of orgs whose ids order differently by locale than by byte are cleared all the same", async () => {
      // By locale "org_mark_a" comes before "org_mark_B"; by byte, as ClickHouse compares, after.
      const orgs = ["org_mark_B", "org_mark_a"];
      await store.rollUp();
      await store.insertRequests(
        orgs.map((orgId) => sampleMetrics(at(6 * 60_000 + 1_000), { orgId })),
        "mark-order-1",
      );
      await store.rollUp();
      const left = await driver.query<{ n: string }>(
        `SELECT count() AS n FROM ${store.database}.rollup_dirty WHERE org_id IN {orgs:Array(String)}`,
        { orgs },
      );
      expect(Number(left[0]?.n)).toBe(0);
    });
  });
}

/** A driver that remembers every statement it ran. */
function spying(driver: ClickHouseDriver): ClickHouseDriver & { statements: string[] } {
  const statements: string[] = [];
  return {
    ...driver,
    statements,
    exec: (sql, params) => (statements.push(sql), driver.exec(sql, params)),
    query: (sql, params) => (statements.push(sql), driver.query(sql, params)),
  };
}

describe("rollups", () => {
  let store: TestStore;
  let driver: ReturnType<typeof spying>;
  const org = "org_rollup";
  const hours = 3;
  // Spread over three whole hours and the start of a fourth; a few of them errors, some on another model.
  const rows = Array.from({ length: 200 }, (_, i) =>
    sampleMetrics(at(i * 57_000), {
      orgId: org,
      requestedModel: i % 3 === 0 ? "m-b" : "m-a",
      status: i % 10 === 0 ? RequestStatus.UPSTREAM_ERROR : RequestStatus.OK,
      costNanos: BigInt(1000 + i),
    }),
  );
  const usageWindow = { start: timestampFromDate(at(-hour + 123)), end: timestampFromDate(at((hours + 1) * hour + 456)) };
  const answers = async () => ({
    usage: await store.queryUsage({ orgId: org, ...usageWindow, groupBy: ["model", "status", "hour"], limit: 1000 }),
    total: await store.queryUsage({ orgId: org, ...usageWindow, groupBy: [], limit: 1 }),
    perMinute: await store.queryTimeSeries({ orgId: org, ...usageWindow, bucketSeconds: 300, model: "m-a" }),
    perDay: await store.queryTimeSeries({ orgId: org, ...usageWindow, bucketSeconds: 86400, model: "" }),
  });

  beforeAll(async () => {
    driver = spying(createChdbDriver(testDataDir()));
    store = await createTestStore({ driver });
    await store.insertRequests(rows, "rollup-1");
    // A resend inside another batch: duplicates past the dedup token, which must not count twice.
    await store.insertRequests([...rows.slice(50, 80), sampleMetrics(at(0), { orgId: "org_other" })], "rollup-2");
  });
  afterAll(() => store.close());

  test("rolled-up minutes and hours answer exactly what the raw table does, duplicates included", async () => {
    const before = await answers();
    expect(before.total[0]?.requests).toBe(200n);
    expect(before.total[0]?.costNanos).toBe(200n * 1000n + (199n * 200n) / 2n);

    const result = await store.rollUp();
    expect(result.recomputedMinutes).toBe(0);
    const [rolled] = await driver.query<{ n: string; cost: string }>(
      `SELECT sum(requests) AS n, sum(cost_nanos) AS cost FROM ${store.database}.requests_1m FINAL WHERE org_id = {org:String}`,
      { org },
    );
    expect(rolled).toEqual({ n: "200", cost: String(200 * 1000 + (199 * 200) / 2) });

    driver.statements.length = 0;
    expect(await answers()).toEqual(before);
    const reads = driver.statements.join("\n");
    expect(reads).toContain(`${store.database}.requests_1h FINAL`);
    expect(reads).toContain(`${store.database}.requests_1m FINAL`);
    // A second run has nothing new to do and changes nothing.
    await store.rollUp();
    expect(await answers()).toEqual(before);
  });

  test("a late row is read from the raw table until its minute is recomputed, then from the rollups", async () => {
    const before = await answers();
    const late = sampleMetrics(at(hour + 30_000), { orgId: org, requestedModel: "m-a", costNanos: 7n });
    await store.insertRequests([late], "rollup-late");
    const withLate = await answers();
    expect(withLate.total[0]?.requests).toBe(201n);
    expect(withLate.total[0]?.costNanos).toBe((before.total[0]?.costNanos ?? 0n) + 7n);

    expect((await store.rollUp()).recomputedMinutes).toBe(1);
    const [marks] = await driver.query<{ n: string }>(`SELECT count() AS n FROM ${store.database}.rollup_dirty`);
    expect(marks?.n).toBe("0");
    expect(await answers()).toEqual(withLate);
  });

  test("more late minutes than the rollups are patched for, one of them in a partial edge minute, read raw", async () => {
    const orgId = "org_many_late";
    const onTime = Array.from({ length: 240 }, (_, m) => sampleMetrics(at(m * 60_000), { orgId }));
    await store.insertRequests(onTime, "many-late-1");
    await store.rollUp();
    // Late rows in the range's partial first minute and in the 101 whole minutes after it.
    const late = Array.from({ length: 102 }, (_, m) => sampleMetrics(at(m * 60_000 + (m === 0 ? 30_000 : 10_000)), { orgId }));
    await store.insertRequests(late, "many-late-2");
    const [start, end] = [at(15_000), at(3 * hour + 15_000)];
    const expected = [...onTime, ...late].filter((r) => {
      const t = Number(r.startTime?.seconds) * 1000;
      return t >= start.getTime() && t < end.getTime();
    }).length;
    const window = { start: timestampFromDate(start), end: timestampFromDate(end) };
    const [total] = await store.queryUsage({ orgId, ...window, groupBy: [], limit: 1 });
    expect(total?.requests).toBe(BigInt(expected));
  });
});

test("each org's late minutes are marked once, whichever of its rows and in whatever order they came", async () => {
  const driver = createChdbDriver(testDataDir());
  const store = await createTestStore({ driver });
  try {
    // Two orgs' late rows interleaved, several in each minute, one org's minutes out of order.
    const minutes = [2, 0, 2, 1, 0, 2];
    const rows = minutes.flatMap((m, i) => [
      sampleMetrics(at(m * 60_000 + i * 1_000), { orgId: "org_late_a" }),
      sampleMetrics(at(m * 60_000 + 59_999), { orgId: "org_late_b" }),
    ]);
    // And one row of a third org that is not late.
    await store.insertRequests([...rows, sampleMetrics(new Date(), { orgId: "org_on_time" })], "late-marks-1");
    const marks = await driver.query<{ org_id: string; minute: string }>(
      `SELECT org_id, toString(minute) AS minute FROM ${store.database}.rollup_dirty ORDER BY org_id, minute`,
    );
    const minute = (m: number) => at(m * 60_000).toISOString().replace("T", " ").slice(0, 19);
    expect(marks).toEqual(
      ["org_late_a", "org_late_b"].flatMap((org_id) => [0, 1, 2].map((m) => ({ org_id, minute: minute(m) }))),
    );
  } finally {
    await store.close();
  }
});

for (const [name, makeDriver] of backends) {
  describe(`a roll-up backlog on ${name}`, () => {
    test("is rolled up in bounded chunks, each recorded, stopping between them, answers exact throughout", async () => {
      const base = makeDriver();
      const windows: { from: string; to: string }[] = [];
      let statements = 0;
      let stopping: AbortController | undefined;
      // A roll-up statement past the client's timeout on every third chunk, as a backlog's single statement was.
      const driver: ClickHouseDriver = {
        ...base,
        exec: async (sql, params) => {
          // Statements rolling up a window (not recomputing one org's late minutes).
          if (/INSERT INTO \w+\.requests_1m .*FROM \w+\.requests FINAL/s.test(sql) && !params?.org_id) {
            if (++statements % 3 === 0) throw new Error("Timeout error.");
            windows.push(params as { from: string; to: string });
          }
          await base.exec(sql, params);
          stopping?.abort();
        },
      };
      const store = await createTestStore({ driver, rollupChunkRows: 100 });
      try {
        const org = "org_backlog";
        // Six hours of three requests a minute (1,080): 11 chunks of at most 100 rows.
        const rows = Array.from({ length: 6 * 60 * 3 }, (_, i) =>
          sampleMetrics(at(i * 20_000 + 5_000), { orgId: org, costNanos: BigInt(i + 1) }),
        );
        await store.insertRequests(rows, "backlog");
        const range = { start: timestampFromDate(at(-hour)), end: timestampFromDate(at(8 * hour)) };
        const answers = async () => ({
          total: await store.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 }),
          perHour: await store.queryUsage({ orgId: org, ...range, groupBy: ["hour"], limit: 100 }),
          perFiveMinutes: await store.queryTimeSeries({ orgId: org, ...range, bucketSeconds: 300, model: "" }),
        });
        const expected = await answers();
        expect(expected.total[0]?.requests).toBe(1080n);
        expect(expected.total[0]?.costNanos).toBe((1080n * 1081n) / 2n);
        const rolledUntil = async () => {
          const state = `${store.database}.rollup_state`;
          const [row] = await driver.query<{ t: string }>(`SELECT toString(done_until) AS t FROM ${state} FINAL WHERE name = 'rollups'`);
          return row?.t;
        };
        // The process stopping while a chunk is rolled up: the run ends after it, recorded, starting no other.
        stopping = new AbortController();
        await store.rollUp(undefined, stopping.signal);
        stopping = undefined;
        const progress = [(await rolledUntil()) ?? ""];
        expect(progress).toEqual([at(33 * 60_000).toISOString().replace("T", " ").slice(0, 19)]);
        expect(await answers()).toEqual(expected);
        for (let run = 0; run < 20; run++) {
          const done = await store.rollUp().then(
            () => true,
            () => false,
          );
          progress.push((await rolledUntil()) ?? "");
          expect(await answers()).toEqual(expected);
          if (done) break;
        }
        // Every failed run kept the chunks it finished: each run got further than the one before.
        expect(progress.length).toBeGreaterThan(4);
        expect(progress).toEqual([...new Set(progress)].sort());
        expect(windows.length).toBeGreaterThanOrEqual(11);
        for (const w of windows) {
          const [row] = await driver.query<{ n: string }>(
            `SELECT count() AS n FROM ${store.database}.requests
             WHERE start_time >= {from:DateTime64(6, 'UTC')} AND start_time < {to:DateTime64(6, 'UTC')}`,
            w,
          );
          expect(Number(row?.n)).toBeLessThanOrEqual(100);
        }
        const [rolled] = await driver.query<{ n: string }>(
          `SELECT sum(requests) AS n FROM ${store.database}.requests_1h FINAL WHERE org_id = {org:String}`,
          { org },
        );
        expect(rolled?.n).toBe("1080");
      } finally {
        await store.close();
      }
    }, 60_000);
  });
}

describe("a roll-up stopped while it recomputes late minutes", () => {
  test("starts no other org's, keeps every mark for the next run, answers exact throughout", async () => {
    const base = createChdbDriver(testDataDir());
    let stopping: AbortController | undefined;
    const recomputed: string[] = [];
    const driver: ClickHouseDriver = {
      ...base,
      exec: async (sql, params) => {
        await base.exec(sql, params);
        // The process stopping while one org's late minutes are recomputed.
        if (/INSERT INTO \w+\.requests_1m/.test(sql) && params?.org_id) {
          recomputed.push(String(params.org_id));
          stopping?.abort();
        }
      },
    };
    const store = await createTestStore({ driver });
    try {
      const orgs = ["org_stop_a", "org_stop_b", "org_stop_c"];
      await store.insertRequests(orgs.map((orgId) => sampleMetrics(at(30_000), { orgId, costNanos: 5n })), "stop-1");
      await store.rollUp();
      await store.insertRequests(orgs.map((orgId) => sampleMetrics(at(40_000), { orgId, costNanos: 7n })), "stop-2");
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(at(hour)) };
      const totals = async () =>
        Promise.all(orgs.map(async (orgId) => (await store.queryUsage({ orgId, ...range, groupBy: [], limit: 1 }))[0]));
      const marks = async () =>
        (await driver.query<{ n: string }>(`SELECT count() AS n FROM ${store.database}.rollup_dirty`))[0]?.n;
      expect(await marks()).toBe("3");
      stopping = new AbortController();
      await store.rollUp(undefined, stopping.signal);
      stopping = undefined;
      expect(recomputed.length).toBe(1);
      expect(await marks()).toBe("3");
      for (const total of await totals()) expect([total?.requests, total?.costNanos]).toEqual([2n, 12n]);
      expect((await store.rollUp()).recomputedMinutes).toBe(3);
      expect(await marks()).toBe("0");
      for (const total of await totals()) expect([total?.requests, total?.costNanos]).toEqual([2n, 12n]);
    } finally {
      await store.close();
    }
  }, 60_000);
});

describe("rollups of a new database", () => {
  test("the first run rolls up no later than its target, so rows arriving after it for earlier minutes count", async () => {
    const store = await createTestStore();
    try {
      const now = new Date();
      const org = "org_first_rollup";
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(new Date(now.getTime() + hour)) };
      const total = async () => (await store.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 }))[0]?.requests;
      await store.insertRequests([sampleMetrics(new Date(now.getTime() - 5_000), { orgId: org })], "first-1");
      await store.rollUp(now);
      // Started before the first row's minute, within the lag: an ordinary row that took a while, not a late one.
      await store.insertRequests([sampleMetrics(new Date(now.getTime() - 70_000), { orgId: org })], "first-2");
      expect(await total()).toBe(2n);
      await store.rollUp(now);
      expect(await total()).toBe(2n);
    } finally {
      await store.close();
    }
  });
});

describe("rollups of a database whose oldest row is decades old", () => {
  test("the first run skips the days without rows in a few chunks, counting rows that arrive meanwhile", async () => {
    const base = createChdbDriver(testDataDir());
    const day = 24 * hour;
    const now = Date.now();
    const org = "org_old_row";
    // The oldest row the longest retention keeps (a gateway whose clock was reset), one years later, and today's.
    const oldest = new Date(now - (maxTtlDays - 1) * day);
    const rows = [
      sampleMetrics(oldest, { orgId: org, costNanos: 1n }),
      sampleMetrics(new Date(now - 10 * 365 * day), { orgId: org, costNanos: 2n }),
      ...Array.from({ length: 30 }, (_, i) => sampleMetrics(new Date(now - 3 * hour + i * 60_000), { orgId: org, costNanos: 10n })),
    ];
    // A row of a day with none, stored while a run looks past that day: either that run or a recomputation counts it.
    const arriving = sampleMetrics(new Date(now - 20 * 365 * day), { orgId: org, costNanos: 100n });
    let store: TestStore | undefined;
    let arrived = false;
    const windows: { from: string; to: string }[] = [];
    let stopping: AbortController | undefined;
    const driver: ClickHouseDriver = {
      ...base,
      query: async (sql, params, options) => {
        const result = await base.query(sql, params, options);
        if (/min\(start_time\)/.test(sql) && params?.from && !arrived && store) {
          arrived = true;
          await store.insertRequests([arriving], "old-arriving");
        }
        return result as never;
      },
      exec: async (sql, params) => {
        if (/INSERT INTO \w+\.requests_1m .*FROM \w+\.requests FINAL/s.test(sql) && !params?.org_id) {
          windows.push(params as { from: string; to: string });
          // Bounds the walk: day by day it would take some 18,000 chunks.
          if (windows.length >= 12) stopping?.abort();
        }
        await base.exec(sql, params);
      },
    };
    store = await createTestStore({ driver, ttlDays: maxTtlDays });
    try {
      await store.insertRequests(rows, "old-1");
      const range = { start: timestampFromDate(new Date(oldest.getTime() - hour)), end: timestampFromDate(new Date(now + hour)) };
      const total = async () => {
        const [row] = (await store?.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 })) ?? [];
        return [row?.requests, row?.costNanos];
      };
      expect(await total()).toEqual([32n, 303n]);
      stopping = new AbortController();
      const first = await store.rollUp(new Date(now), stopping.signal);
      stopping = undefined;
      const target = new Date(Math.floor((now - 5 * 60_000) / 60_000) * 60_000);
      expect(first.rolledUntil).toBe(target.toISOString().replace("T", " ").slice(0, 19));
      expect(windows.length).toBeLessThan(12);
      expect(arrived).toBe(true);
      expect(await total()).toEqual([33n, 403n]);
      await store.rollUp(new Date(now));
      expect(await total()).toEqual([33n, 403n]);
      const [rolled] = await driver.query<{ n: string; cost: string }>(
        `SELECT sum(requests) AS n, sum(cost_nanos) AS cost FROM ${store.database}.requests_1h FINAL WHERE org_id = {org:String}`,
        { org },
      );
      expect(rolled).toEqual({ n: "33", cost: "403" });
    } finally {
      await store.close();
    }
  }, 60_000);
});

describe("totals at the bounds of what a row may hold", () => {
  test("sums are exact in rollups and queries; a total past int64 is OutOfRange, never wrapped", async () => {
    const driver = createChdbDriver(testDataDir());
    const store = await createTestStore({ driver });
    try {
      const org = "org_totals";
      const most = 10n ** 15n;
      // 9,300 requests of the most one may cost in one minute of one key: 9.3e18, past int64 (9.22e18).
      const rows = Array.from({ length: 9300 }, (_, i) =>
        sampleMetrics(at(hour + (i % 2) * 30 * 60_000 + i), {
          orgId: org,
          costNanos: most,
          usage: { inputTokens: 2n ** 31n, cachedInputTokens: 0n, outputTokens: 2n ** 31n, reasoningTokens: 0n },
        }),
      );
      await store.insertRequests(rows.slice(0, 5000), "totals-1");
      await store.insertRequests(rows.slice(5000), "totals-2");
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(at(3 * hour)) };
      const silent = createLogger({ service: "t", level: "error", write: () => {} });
      const check = async () => {
        // Per half hour, each total fits: exact.
        const perHalfHour = await store.queryTimeSeries({ orgId: org, ...range, bucketSeconds: 1800, model: "" });
        expect(perHalfHour.map((p) => [p.requests, p.costNanos, p.inputTokens])).toEqual([
          [4650n, 4650n * most, 4650n * 2n ** 31n],
          [4650n, 4650n * most, 4650n * 2n ** 31n],
        ]);
        const whole = query(silent, "QueryUsage", () => store.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 }));
        const err = await whole.catch((e: unknown) => ConnectError.from(e));
        expect(err instanceof ConnectError && [err.code, err.rawMessage]).toEqual([
          Code.OutOfRange,
          "the total cost_nanos of the range is past int64; narrow the range or group by more dimensions",
        ]);
      };
      await check();
      await store.rollUp();
      await check();
      // The hour's rollup holds its total past int64 exactly.
      const [hourRow] = await driver.query<{ cost_nanos: string; output_tokens: string }>(
        `SELECT cost_nanos, output_tokens FROM ${store.database}.requests_1h FINAL WHERE org_id = {org:String}`,
        { org },
      );
      expect(hourRow).toEqual({ cost_nanos: String(9300n * most), output_tokens: String(9300n * 2n ** 31n) });
    } finally {
      await store.close();
    }
  }, 60_000);
});

describe("rollups through a proxy that caps request URLs at nginx's 8 KB", () => {
  test("a roll-up clearing a hundred marks of orgs with real ids keeps its statements' URLs within it", async () => {
    const proxied = startClickHouseHttpServer({ path: testDataDir(), maxUrlBytes: 8192 });
    const store = await createTestStore({ driver: createClientDriver(createClient({ url: proxied.url })) });
    try {
      // Ids as billing makes them.
      const orgs = ["org_01KB4Z8F6Q2M9T3V7W1X5Y0A2B", "org_01KB4Z8F6Q2M9T3V7W1X5Y0A2C"];
      const onTime = orgs.flatMap((orgId) => Array.from({ length: 3 * 60 }, (_, m) => sampleMetrics(at(m * 60_000), { orgId })));
      await store.insertRequests(onTime, "proxied-1");
      await store.rollUp();
      // Late rows in 60 minutes of each org: 120 marks, past one statement's hundred.
      const late = orgs.flatMap((orgId) =>
        Array.from({ length: 60 }, (_, m) => sampleMetrics(at(2 * m * 60_000 + 10_000), { orgId, costNanos: 7n })),
      );
      await store.insertRequests(late, "proxied-2");
      expect((await store.rollUp()).recomputedMinutes).toBe(120);
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(at(3 * hour)) };
      for (const orgId of orgs) {
        const [total] = await store.queryUsage({ orgId, ...range, groupBy: [], limit: 1 });
        expect([total?.requests, total?.costNanos]).toEqual([240n, 180n * 12_345n + 60n * 7n]);
      }
      // Every mark cleared: the next run recomputes nothing.
      expect((await store.rollUp()).recomputedMinutes).toBe(0);
    } finally {
      await store.close();
      await proxied.stop();
    }
  }, 60_000);
});

describe("two replicas rolling up at once", () => {
  test("an hour rolled up by one is not cut short by the other's run that stops before its end", async () => {
    const first = await createTestStore();
    // Each replica's statements on the one engine, paused where a slow server would hold them.
    const gate = () => Promise.withResolvers<void>();
    const [behindRead, aheadHour, behindDone] = [gate(), gate(), gate()];
    type Hooks = { beforeHour?: () => Promise<void>; beforeDone?: () => Promise<void>; afterDone?: () => void };
    const replica = (hooks: Hooks) => {
      const driver = createChdbDriver(testDataDir());
      let hours = 0;
      const paused: ClickHouseDriver = {
        ...driver,
        async query(sql, params, report) {
          const rows = await driver.query(sql, params, report);
          if (/done_until FROM \w+\.rollup_state FINAL WHERE name/.test(sql)) behindRead.resolve();
          return rows as never;
        },
        async exec(sql, params) {
          if (/INSERT INTO \w+\.requests_1h/.test(sql) && hours++ === 0) await hooks.beforeHour?.();
          return driver.exec(sql, params);
        },
        async insert(table, columns, values, settings) {
          const done = table.endsWith("rollup_state") && values[0]?.[0] === "rollups";
          if (done) await hooks.beforeDone?.();
          await driver.insert(table, columns, values, settings);
          if (done) hooks.afterDone?.();
        },
      };
      return createAnalyticsStore(paused, { database: first.database, ttlDays: 400, rollupLagMs: 60_000 });
    };
    try {
      const org = "org_two_rollups";
      // A request in each minute of an hour.
      const rows = Array.from({ length: 60 }, (_, m) => sampleMetrics(at(m * 60_000 + 1_000), { orgId: org }));
      await first.insertRequests(rows, "two-1");
      // The replica behind started its run first, for minutes up to 00:59; the one ahead, for the whole hour and more.
      const behind = replica({ beforeHour: () => aheadHour.promise, afterDone: () => behindDone.resolve() });
      const ahead = replica({
        beforeDone: async () => {
          aheadHour.resolve();
          await behindDone.promise;
        },
      });
      const behindRun = behind.rollUp(at(hour));
      await behindRead.promise;
      await Promise.all([behindRun, ahead.rollUp(at(hour + 3 * 60_000))]);
      const range = { start: timestampFromDate(at(0)), end: timestampFromDate(at(hour)) };
      const total = async () => (await first.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 }))[0]?.requests;
      expect(await total()).toBe(60n);
      // Later runs start past the hour and leave its row as it is.
      await first.rollUp(at(hour + 10 * 60_000));
      expect(await total()).toBe(60n);
    } finally {
      await first.close();
    }
  });
});

describe("rollups under another lag or clock", () => {
  test("a row for a rolled-up minute counts whatever the lag or clock of the replica that stores it", async () => {
    const first = await createTestStore();
    const withLag = (rollupLagMs: number) =>
      createAnalyticsStore(createChdbDriver(testDataDir()), { database: first.database, ttlDays: 400, rollupLagMs });
    try {
      const now = Date.now();
      const minute = 60_000;
      const org = "org_lag_change";
      const range = { start: timestampFromDate(new Date(now - hour)), end: timestampFromDate(new Date(now + hour)) };
      const total = async () => (await first.queryUsage({ orgId: org, ...range, groupBy: [], limit: 1 }))[0]?.requests;
      const short = withLag(minute);
      await short.insertRequests([sampleMetrics(new Date(now - 20 * minute), { orgId: org })], "lag-1");
      await short.rollUp(new Date(now));
      // The lag raised to an hour and the process restarted: a gateway resends a row of a minute already rolled up.
      const long = withLag(hour);
      await long.insertRequests([sampleMetrics(new Date(now - 10 * minute), { orgId: org })], "lag-2");
      expect(await total()).toBe(2n);
      await long.rollUp(new Date(now + 3 * hour));
      expect(await total()).toBe(2n);
      // A replica whose clock runs half an hour ahead rolls up minutes the others still take rows for.
      await short.rollUp(new Date(now + 30 * minute));
      await withLag(5 * minute).insertRequests([sampleMetrics(new Date(now - minute), { orgId: org })], "lag-3");
      expect(await total()).toBe(3n);
      await short.rollUp(new Date(now + 31 * minute));
      expect(await total()).toBe(3n);
    } finally {
      await first.close();
    }
  });
});

describe("migrations", () => {
  test("parts the in-process engine set aside as damaged at start are named, those an operator detached are not", async () => {
    // Each step in a process of its own: the engine reads its parts once per process, when it opens its path.
    const dir = mkdtempSync(join(tmpdir(), "detached-"));
    const step = (body: string) =>
      runCommand([
        process.execPath,
        "--eval",
        [
          `import { createChdbDriver } from ${JSON.stringify(join(import.meta.dir, "chdb-driver.ts"))};`,
          `import { createAnalyticsStore } from ${JSON.stringify(join(import.meta.dir, "store.ts"))};`,
          `import { sampleMetrics } from ${JSON.stringify(join(import.meta.dir, "test-store.ts"))};`,
          `const driver = createChdbDriver(${JSON.stringify(dir)});`,
          `const store = createAnalyticsStore(driver, { database: "detached", ttlDays: 400 });`,
          body,
          "await driver.close();",
        ].join("\n"),
      ]);
    try {
      const written = await step(`await store.migrate();
        await store.insertRequests([sampleMetrics(new Date())], "detached-1");
        await store.insertRequests([sampleMetrics(new Date())], "detached-2");
        await driver.exec("SYSTEM STOP MERGES");
        const parts = await driver.query("SELECT name, path FROM system.parts WHERE database = 'detached' AND table = 'requests' AND active ORDER BY name");
        await driver.exec("ALTER TABLE detached.requests DETACH PART '" + parts[0].name + "'");
        console.log(JSON.stringify(parts[1]));`);
      expect(written.code).toBe(0);
      // The host lost the part's last writes: its column files cut short.
      const damaged = JSON.parse(written.stdout.trim().split("\n").at(-1) as string) as { name: string; path: string };
      for (const file of readdirSync(damaged.path)) if (file.endsWith(".bin")) truncateSync(join(damaged.path, file), 3);
      const read = await step("console.log(JSON.stringify(await store.detachedParts()));");
      expect(read.code).toBe(0);
      expect(JSON.parse(read.stdout.trim().split("\n").at(-1) as string)).toEqual([
        { table: "requests", name: `broken-on-start_${damaged.name}`, reason: "broken-on-start" },
      ]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  test("a changed migration that was already applied stops migrate", async () => {
    const dir = mkdtempSync(join(tmpdir(), "analytics-migrations-"));
    const file = join(dir, "0001_things.sql");
    writeFileSync(file, "CREATE TABLE IF NOT EXISTS {{database}}.things (id String) ENGINE = MergeTree ORDER BY id;\n");
    const driver = createChdbDriver(testDataDir());
    const database = testDatabase("changed");
    try {
      expect(await migrate(driver, { database, vars: {}, dir })).toEqual(["0001_things"]);
      writeFileSync(file, "CREATE TABLE IF NOT EXISTS {{database}}.things (id UInt64) ENGINE = Memory;\n");
      await expect(migrate(driver, { database, vars: {}, dir })).rejects.toThrow(/0001_things changed/);
    } finally {
      await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      await driver.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a new retention is applied to an existing table", async () => {
    const driver = createChdbDriver(testDataDir());
    const database = testDatabase("ttl");
    const ttl = async () =>
      (
        await driver.query<{ engine_full: string }>(
          "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = 'requests'",
          { db: database },
        )
      )[0]?.engine_full;
    try {
      await createAnalyticsStore(driver, { database, ttlDays: 400 }).migrate();
      expect(await ttl()).toContain("toIntervalDay(400)");
      expect(await createAnalyticsStore(driver, { database, ttlDays: 30 }).migrate()).toEqual([]);
      expect(await ttl()).toContain("toIntervalDay(30)");
    } finally {
      await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      await driver.close();
    }
  });

  test("the in-process engine syncs each part it inserts to disk, in tables made before it did too", async () => {
    const driver = createChdbDriver(testDataDir());
    const database = testDatabase("fsync");
    const unsynced = async () =>
      (
        await driver.query<{ name: string }>(
          `SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'
             AND NOT (engine_full LIKE '%fsync_after_insert = 1%' AND engine_full LIKE '%fsync_part_directory = 1%')`,
          { db: database },
        )
      ).map((t) => t.name);
    try {
      // An acked batch leaves the gateway's spool: a part lost with the page cache would be lost for good.
      await createAnalyticsStore({ ...driver, tableSettings: undefined }, { database, ttlDays: 400 }).migrate();
      expect(await unsynced()).toContain("requests");
      await createAnalyticsStore(driver, { database, ttlDays: 400 }).migrate();
      expect(await unsynced()).toEqual([]);
    } finally {
      await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      await driver.close();
    }
  });

  test("the longest retention keeps the rows it stores; one whose TTL would wrap past 2106 is refused", async () => {
    const driver = createChdbDriver(testDataDir());
    const database = testDatabase("ttl_max");
    try {
      expect(() => createAnalyticsStore(driver, { database, ttlDays: 36_500 })).toThrow(/invalid TTL/);
      const store = createAnalyticsStore(driver, { database, ttlDays: maxTtlDays });
      await store.migrate();
      const now = Date.now();
      await store.insertRequests([sampleMetrics(new Date(now - 60_000), { orgId: "org_ttl" })], "ttl-max-1");
      await driver.exec(`OPTIMIZE TABLE ${database}.requests FINAL`);
      const range = { start: timestampFromDate(new Date(now - hour)), end: timestampFromDate(new Date(now)) };
      const [total] = await store.queryUsage({ orgId: "org_ttl", ...range, groupBy: [], limit: 1 });
      expect(total?.requests).toBe(1n);
    } finally {
      await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      await driver.close();
    }
  });

  test("a second chdb data directory in the process is refused with a clear error", () => {
    const driver = createChdbDriver(testDataDir());
    try {
      expect(() => createChdbDriver(join(tmpdir(), "analytics-other"))).toThrow(/one data directory per process/);
    } finally {
      void driver.close();
    }
  });
});
