import { afterAll, expect, test } from "bun:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient } from "@clickhouse/client";
import { Code, ConnectError } from "@connectrpc/connect";
import { createLogger } from "../../lib/log.ts";
import { eventually } from "../../test/support.ts";
import { query } from "../service.ts";
import { clickHouseLoggerClass, clientRequestTimeoutMs, createClientDriver } from "./client-driver.ts";
import { createAnalyticsStore } from "./store.ts";
import { startClickHouseHttpServer } from "./testing/clickhouse-http-server.ts";
import { createTestStore, sampleMetrics, testDataDir } from "./test-store.ts";

// A ClickHouse server that stops every query at its 1 s limit, as a real one does: a little after it, with code 159.
const limitSeconds = 1;
const server = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  async fetch() {
    await Bun.sleep(limitSeconds * 1000 + 300);
    return new Response("Code: 159. DB::Exception: Timeout exceeded: elapsed 1.3 seconds, maximum: 1. (TIMEOUT_EXCEEDED)", {
      status: 500,
      headers: { "x-clickhouse-exception-code": "159" },
    });
  },
});
afterAll(() => server.stop(true));

const silent = createLogger({ service: "t", level: "error", write: () => {} });
const slowQuery = async (requestTimeoutMs: number) => {
  const url = `http://127.0.0.1:${server.port}`;
  const log = { LoggerClass: clickHouseLoggerClass(silent) };
  const driver = createClientDriver(createClient({ url, request_timeout: requestTimeoutMs, log }));
  try {
    return await query(silent, "Slow", () => driver.query("SELECT 1")).catch((e: unknown) => ConnectError.from(e).code);
  } finally {
    await driver.close();
  }
};

test("a query the server stops at its limit is ResourceExhausted: the client waits past that limit", async () => {
  expect(await slowQuery(clientRequestTimeoutMs(limitSeconds))).toBe(Code.ResourceExhausted);
  // A client giving up at the server's limit (its default: 30 s against 30 s) answered Unavailable, which is retried.
  expect(await slowQuery(limitSeconds * 1000)).toBe(Code.Unavailable);
}, 20_000);

test("a time limit reached while a result streams is ResourceExhausted, not rows or a parse error", async () => {
  const exception = "Code: 159. DB::Exception: Timeout exceeded: elapsed 30.1 seconds, maximum: 30. (TIMEOUT_EXCEEDED)";
  // A server before 25.11: streaming, the status and some rows are sent before the limit is reached, and the
  // exception follows in the body (as a row in JSONEachRow); waiting for the query's end, it is the status.
  const streaming = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    fetch(req) {
      if (new URL(req.url).searchParams.get("wait_end_of_query") === "1") {
        return new Response(exception, { status: 500, headers: { "x-clickhouse-exception-code": "159" } });
      }
      const body = `{"n":"1"}\n${JSON.stringify({ exception })}\n`;
      return new Response(body, { headers: { "x-clickhouse-format": "JSONEachRow" } });
    },
  });
  const log = { LoggerClass: clickHouseLoggerClass(silent) };
  const driver = createClientDriver(createClient({ url: `http://127.0.0.1:${streaming.port}`, log }));
  try {
    const report = query(silent, "Report", () => driver.query("SELECT n", {}, { orgId: "org_a" }));
    expect(await report.catch((e: unknown) => ConnectError.from(e).code)).toBe(Code.ResourceExhausted);
  } finally {
    await driver.close();
    streaming.stop(true);
  }
});

test("a ping fails when the server refuses the credentials, as every insert then does", async () => {
  const clickhouse = startClickHouseHttpServer({ path: testDataDir(), user: "mesh", password: "rotated" });
  const log = { LoggerClass: clickHouseLoggerClass(silent) };
  const driver = createClientDriver(createClient({ url: clickhouse.url, username: "mesh", password: "old", log }));
  const good = createClientDriver(createClient({ url: clickhouse.url, username: "mesh", password: "rotated", log }));
  try {
    expect(await driver.insert("system.none", ["a"], [["1"]]).catch((e) => e)).toMatchObject({ code: "516" });
    expect(await driver.ping(1000).catch((e) => e)).toMatchObject({ code: "516" });
    await good.ping(1000);
  } finally {
    await driver.close();
    await good.close();
    await clickhouse.stop();
  }
});

test("report queries holding all their connections leave readiness and ingest connections of their own", async () => {
  const held: (() => void)[] = [];
  let holding = true;
  const busy = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      // A report that runs long, as on a server under dashboards' load, until it is let go or its caller leaves.
      if ((await req.text()).includes("'report'") && holding) {
        await new Promise<void>((resolve) => {
          held.push(resolve);
          req.signal.addEventListener("abort", () => resolve());
        });
      }
      return new Response("", { headers: { "x-clickhouse-format": "JSONEachRow" } });
    },
  });
  const url = `http://127.0.0.1:${busy.port}`;
  const log = { LoggerClass: clickHouseLoggerClass(silent) };
  const driver = createClientDriver(createClient({ url, log }), createClient({ url, log }));
  try {
    // More than a client's 10 connections: four orgs' dashboards, each running its four at once.
    const reports = Array.from({ length: 16 }, (_, i) => driver.query("SELECT 'report'", {}, { orgId: `org_${i % 4}` }));
    await eventually(() => held.length === 10, { what: "ten reports running" });
    await driver.ping(1000);
    await driver.insert("t", ["a"], [["1"]]);
    expect(await driver.query("SELECT 'marks'")).toEqual([]);
    holding = false;
    for (const release of held) release();
    expect(await Promise.all(reports)).toEqual(reports.map(() => []));
  } finally {
    await driver.close();
    busy.stop(true);
  }
});

test("requests and buckets read back as stored when the server's profile formats dates otherwise", async () => {
  const clickhouse = startClickHouseHttpServer({ path: testDataDir() });
  const log = { LoggerClass: clickHouseLoggerClass(silent) };
  const store = await createTestStore({ driver: createClientDriver(createClient({ url: clickhouse.url, log })) });
  // As a user's profile on the server may set it: "2026-01-02T03:04:05.123456Z", or seconds since 1970.
  const readers = (["iso", "unix_timestamp"] as const).map((format) =>
    createClientDriver(createClient({ url: clickhouse.url, log, clickhouse_settings: { date_time_output_format: format } })),
  );
  try {
    const at = Math.floor(Date.now() / 3_600_000) * 3_600_000 - 3_600_000;
    const rows = [0, 1, 2].map((i) => sampleMetrics(new Date(at + i * 1000 + 123), { orgId: "org_formats" }));
    await store.insertRequests(rows, "formats-1");
    const window = { start: timestampFromDate(new Date(at - 3_600_000)), end: timestampFromDate(new Date(at + 3_600_000)) };
    for (const driver of readers) {
      const reader = createAnalyticsStore(driver, { database: store.database, ttlDays: 400 });
      const first = await reader.listRequests({ orgId: "org_formats", window, limit: 2 });
      const second = await reader.listRequests({ orgId: "org_formats", window, limit: 2, after: first.next });
      expect([...first.requests, ...second.requests].map((r) => r.startTime)).toEqual(rows.map((r) => r.startTime).reverse());
      const points = await reader.queryTimeSeries({ orgId: "org_formats", ...window, bucketSeconds: 3600, model: "" });
      expect(points.map((p) => [p.bucketStart?.seconds, p.requests])).toEqual([[BigInt(at / 1000), 3n]]);
    }
  } finally {
    for (const driver of readers) await driver.close();
    await store.close();
    await clickhouse.stop();
  }
});
