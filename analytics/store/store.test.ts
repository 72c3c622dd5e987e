import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { equals } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type ClickHouseClientConfigOptions, createClient } from "@clickhouse/client";
import { createChdbConnection } from "chdb/connection";
import { RequestMetricsSchema, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { createChdbDriver } from "./chdb-driver.ts";
import { createClientDriver } from "./client-driver.ts";
import type { ClickHouseDriver } from "./driver.ts";
import { loadMigrations, migrate } from "./migrate.ts";
import { createAnalyticsStore } from "./store.ts";
import { createTestStore, sampleMetrics, type TestStore, testDatabase, testDataDir } from "./test-store.ts";

type ChdbConnectionForClient = NonNullable<ClickHouseClientConfigOptions["connection"]>;

const hour = 3_600_000;
// Two days back, on the hour, so every row is well inside the retention whenever the suite runs.
const base = new Date(Math.floor(Date.now() / hour) * hour - 48 * hour);
const at = (offsetMs: number) => new Date(base.getTime() + offsetMs);
const window = { start: timestampFromDate(at(-hour)), end: timestampFromDate(at(72 * hour)) };

const clickhouseUrl = process.env.CLICKHOUSE_URL;
const serverReachable = clickhouseUrl
  ? await fetch(new URL("/ping", clickhouseUrl), { signal: AbortSignal.timeout(2000) }).then(
      (r) => r.ok,
      () => false,
    )
  : false;

const backends: [string, () => ClickHouseDriver, boolean][] = [
  ["chdb", () => createChdbDriver(testDataDir()), true],
  // The @clickhouse/client code path, carried in-process by chdb's Connection for that client.
  [
    "@clickhouse/client over chdb",
    () =>
      createClientDriver(
        // chdb types its Connection against @clickhouse/client-common; the client bundles its own copy of those types.
        createClient({
          connection: createChdbConnection({ path: testDataDir() }) as unknown as ChdbConnectionForClient,
        }),
      ),
    true,
  ],
  [
    `@clickhouse/client at CLICKHOUSE_URL (${serverReachable ? "reachable" : "not reachable: skipped"})`,
    () =>
      createClientDriver(
        createClient({
          url: clickhouseUrl,
          username: process.env.CLICKHOUSE_USER,
          password: process.env.CLICKHOUSE_PASSWORD,
        }),
      ),
    serverReachable,
  ],
];

for (const [name, makeDriver, enabled] of backends) {
  describe.skipIf(!enabled)(`analytics store on ${name}`, () => {
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
        expect(tables.map((t) => t.name)).toEqual(["requests", "schema_migrations"]);
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
      expect(await store.queryLatency({ orgId, ...window })).toEqual([]);
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

      const models = await store.queryLatency({ orgId: org, ...window });
      expect(models.map((m) => m.model)).toEqual(["gpt-4o-mini", "m-stream"]);
      const [plain, streamed] = models;
      expect(plain?.requests).toBe(5n);
      expect(plain?.total?.p50Us).toBe(300n);
      expect(plain?.upstream?.p50Us).toBe(250n);
      expect(plain?.gatewayOverhead?.p99Us).toBe(50n);
      expect(plain?.timeToFirstToken?.p50Us).toBe(0n);
      expect(streamed?.timeToFirstToken?.p90Us).toBe(80n);
    });
  });
}

describe("migrations", () => {
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

  test("a second chdb data directory in the process is refused with a clear error", () => {
    const driver = createChdbDriver(testDataDir());
    try {
      expect(() => createChdbDriver(join(tmpdir(), "analytics-other"))).toThrow(/one data directory per process/);
    } finally {
      void driver.close();
    }
  });
});
