import { afterAll, beforeAll, expect, test } from "bun:test";
import { createClient as createClickHouseClient } from "@clickhouse/client";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { AnalyticsService, UsageGroupBy } from "../gen/analytics/v1/analytics_pb.ts";
import { createLogger } from "../lib/log.ts";
import { analyticsRoutes } from "./routes.ts";
import { clickHouseLoggerClass, createClientDriver } from "./store/client-driver.ts";
import { type AnalyticsStore, createAnalyticsStore } from "./store/store.ts";
import { type ClickHouseHttpServer, startClickHouseHttpServer } from "./store/testing/clickhouse-http-server.ts";
import { sampleMetrics, testDatabase, testDataDir } from "./store/test-store.ts";
import { createAnalyticsWithRecordingBilling } from "./test-helpers.ts";

// Analytics on a ClickHouse server that goes away: between them a proxy that is stopped (connections refused) and
// started again on its port, or made to answer every query with a ClickHouse exception.

const adminToken = "test-admin-token-0123456789";
const headers = { authorization: `Bearer ${adminToken}` };
const org = "org_ch_outage";
const lines: string[] = [];
const log = createLogger({ service: "analytics-test", write: (line) => lines.push(line) });
const messages = () => lines.map((l) => `${JSON.parse(l).level} ${JSON.parse(l).msg}`);

let clickhouse: ClickHouseHttpServer;
let proxy: ReturnType<typeof Bun.serve>;
let exception: string | undefined;
const startProxy = (port = 0) =>
  Bun.serve({
    port,
    hostname: "127.0.0.1",
    async fetch(req) {
      const url = new URL(req.url);
      if (exception) {
        const code = /^Code: (\d+)/.exec(exception)?.[1] ?? "";
        return new Response(`${exception}\n`, { status: 500, headers: { "x-clickhouse-exception-code": code } });
      }
      return fetch(new URL(url.pathname + url.search, clickhouse.url), {
        method: req.method,
        headers: req.headers,
        body: await req.arrayBuffer(),
      });
    },
  });
let store: AnalyticsStore;
let client: ReturnType<typeof createClient<typeof AnalyticsService>>;

beforeAll(async () => {
  clickhouse = startClickHouseHttpServer({ path: testDataDir() });
  proxy = startProxy();
  const chClient = () =>
    createClickHouseClient({ url: `http://127.0.0.1:${proxy.port}`, log: { LoggerClass: clickHouseLoggerClass(log) } });
  store = createAnalyticsStore(createClientDriver(chClient(), chClient()), { database: testDatabase("outage"), ttlDays: 400 });
  await store.migrate();
  const { service } = createAnalyticsWithRecordingBilling({ store, log, adminToken, ingest: { flushIntervalMs: 20 } });
  client = createClient(AnalyticsService, createRouterTransport(analyticsRoutes(service, adminToken)));
});

afterAll(async () => {
  await store?.close();
  proxy?.stop(true);
  await clickhouse?.stop();
});

const range = { start: timestampFromDate(new Date(Date.now() - 3_600_000)), end: timestampFromDate(new Date(Date.now() + 60_000)) };
const codeOf = (call: Promise<unknown>) => call.then(() => undefined, (e: unknown) => ConnectError.from(e).code);
const report = (i: number) =>
  codeOf(
    i % 2
      ? client.queryUsage({ orgId: org, range, groupBy: [UsageGroupBy.MODEL] }, { headers })
      : client.queryTimeSeries({ orgId: org, range, bucketSeconds: 60n }, { headers }),
  );
let sequence = 0n;
const ingest = () =>
  codeOf(
    (async () => {
      const batches = (async function* () {
        yield { gatewayInstanceId: "gw-1", sequence: ++sequence, metrics: [sampleMetrics(new Date(), { orgId: org })] };
      })();
      for await (const _ of client.ingestMetrics(batches, { headers }));
    })(),
  );

test("ClickHouse down is logged once as it starts and once as it ends, however many reports and flushes meet it", async () => {
  expect(await report(0)).toBeUndefined();
  lines.length = 0;
  const port = proxy.port;
  proxy.stop(true);
  for (let i = 0; i < 8; i++) expect(await report(i)).toBe(Code.Unavailable);
  for (let i = 0; i < 3; i++) expect(await ingest()).toBe(Code.Unavailable);
  // Neither @clickhouse/client's own line per failed request nor one per report or flush.
  expect(messages()).toEqual([
    "error analytics query failed: clickhouse unavailable",
    "error writing a flush to ClickHouse failed",
  ]);
  proxy = startProxy(port);
  expect(await report(1)).toBeUndefined();
  expect(await ingest()).toBeUndefined();
  expect(messages().slice(2)).toEqual(["info clickhouse answers analytics queries again", "info ClickHouse takes flushes again"]);
  expect(JSON.parse(lines[2] ?? "{}")).toMatchObject({ rpc: "QueryUsage", failures: 8 });
});

test("a query ClickHouse refuses or stops at its limit while it serves others is logged each time, once", async () => {
  lines.length = 0;
  try {
    exception = "Code: 60. DB::Exception: Unknown table expression identifier 'mesh.requests'. (UNKNOWN_TABLE)";
    for (let i = 0; i < 2; i++) expect(await report(i)).toBe(Code.Unavailable);
    exception = "Code: 241. DB::Exception: Memory limit (for query) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED)";
    for (let i = 0; i < 2; i++) expect(await report(i)).toBe(Code.ResourceExhausted);
    exception = "Code: 159. DB::Exception: Timeout exceeded: elapsed 30.1 seconds, maximum: 30. (TIMEOUT_EXCEEDED)";
    for (let i = 0; i < 2; i++) expect(await report(i)).toBe(Code.ResourceExhausted);
  } finally {
    exception = undefined;
  }
  expect(messages()).toEqual([
    "error analytics query failed",
    "error analytics query failed",
    "warn analytics query ran out of memory",
    "warn analytics query ran out of memory",
    "warn analytics query ran out of time",
    "warn analytics query ran out of time",
  ]);
  expect(await report(0)).toBeUndefined();
  expect(lines).toHaveLength(6);
});
