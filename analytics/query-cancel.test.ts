import { afterAll, beforeAll, expect, test } from "bun:test";
import { createClient as createClickHouseClient } from "@clickhouse/client";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  AnalyticsService,
  UsageGroupBy,
} from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { analyticsRoutes } from "./routes.ts";
import { createAnalyticsService } from "./service.ts";
import {
  clickHouseLoggerClass,
  createClientDriver,
} from "./store/client-driver.ts";
import { type AnalyticsStore, createAnalyticsStore } from "./store/store.ts";
import {
  type ClickHouseHttpServer,
  startClickHouseHttpServer,
} from "./store/testing/clickhouse-http-server.ts";
import { testDatabase, testDataDir } from "./store/test-store.ts";
import { eventually } from "../test/support.ts";
import { createRecordingBilling } from "./test-helpers.ts";

// A report query whose caller leaves must not run on in ClickHouse, holding one of the org's few query slots until its
// time limit. Between analytics and the (test) ClickHouse server sits a proxy that holds report queries while told to,
// as a long query on a real server would, and notes when analytics closes one.

const adminToken = "test-admin-token-0123456789";
const log = createLogger({
  service: "analytics-test",
  level: "error",
  write: () => {},
});
const org = "org_cancel";

interface Held {
  settings: URLSearchParams;
  closed: boolean;
}
const held: Held[] = [];
let holding = true;

let clickhouse: ClickHouseHttpServer;
let proxy: ReturnType<typeof Bun.serve>;
let store: AnalyticsStore;
let server: RunningServer;

beforeAll(async () => {
  clickhouse = startClickHouseHttpServer({ path: testDataDir() });
  proxy = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      const url = new URL(req.url);
      const body = await req.arrayBuffer();
      if (
        holding &&
        new TextDecoder().decode(body).includes("max_execution_time")
      ) {
        const query: Held = { settings: url.searchParams, closed: false };
        held.push(query);
        await new Promise<void>((resolve) =>
          req.signal.addEventListener("abort", () => resolve()),
        );
        query.closed = true;
        return new Response("", { status: 500 });
      }
      return fetch(new URL(url.pathname + url.search, clickhouse.url), {
        method: req.method,
        headers: req.headers,
        body,
      });
    },
  });
  store = createAnalyticsStore(
    createClientDriver(
      createClickHouseClient({
        url: `http://127.0.0.1:${proxy.port}`,
        log: { LoggerClass: clickHouseLoggerClass(log) },
      }),
    ),
    {
      database: testDatabase("cancel"),
      ttlDays: 400,
    },
  );
  await store.migrate();
  const billing = await startServer({
    name: "billing-double",
    port: 0,
    routes: (router) =>
      router.service(BillingService, createRecordingBilling().impl),
    log,
  });
  const service = createAnalyticsService({
    store,
    billing: createServiceClient(BillingService, {
      baseUrl: billing.url,
      bearerToken: adminToken,
    }),
    log,
    adminToken,
  });
  server = await startServer({
    name: "analytics",
    port: 0,
    routes: analyticsRoutes(service, adminToken),
    log,
  });
  afterAll(() => billing.close(1000));
});

afterAll(async () => {
  await server?.close(1000);
  await store?.close();
  proxy?.stop(true);
  await clickhouse?.stop();
});

const now = Date.now();
const range = {
  start: timestampFromDate(new Date(now - 3_600_000)),
  end: timestampFromDate(new Date(now)),
};

test("a report query whose caller leaves is closed in ClickHouse, which is told to stop it, and frees its slot", async () => {
  const client = createServiceClient(AnalyticsService, {
    baseUrl: server.url,
    bearerToken: adminToken,
  });
  // As many as an org may run at once: over gRPC, and over Connect JSON from a page.
  const callers = Array.from({ length: 4 }, () => new AbortController());
  const outcome = (call: Promise<unknown>) =>
    call.then(
      () => "answered",
      (e: unknown) => ConnectError.from(e).code,
    );
  const calls = callers.map((caller, i) =>
    outcome(
      i % 2 === 0
        ? client.queryUsage(
            { orgId: org, range, groupBy: [UsageGroupBy.MODEL] },
            { signal: caller.signal },
          )
        : fetch(`${server.url}/analytics.v1.AnalyticsService/QueryUsage`, {
            method: "POST",
            headers: {
              "content-type": "application/json",
              authorization: `Bearer ${adminToken}`,
            },
            body: JSON.stringify({
              orgId: org,
              range: { start: new Date(now - 3_600_000), end: new Date(now) },
            }),
            signal: caller.signal,
          }),
    ),
  );
  await eventually(() => held.length === 4, { what: "four queries held" });
  for (const caller of callers) caller.abort();
  expect(await Promise.all(calls)).toEqual(callers.map(() => Code.Canceled));

  await eventually(() => held.every((q) => q.closed), {
    timeoutMs: 5_000,
    what: "held queries closed",
  });
  // A server stops such a query only when it is read-only: a POST, as queries are, is not unless it says so.
  for (const q of held) {
    expect(q.settings.get("cancel_http_readonly_queries_on_client_close")).toBe(
      "1",
    );
    expect(Number(q.settings.get("readonly"))).toBeGreaterThan(0);
  }
  // The slots are free again: a fifth query runs, where it would be refused while the four ran on.
  holding = false;
  expect(
    (
      await client.queryUsage({
        orgId: org,
        range,
        groupBy: [UsageGroupBy.MODEL],
      })
    ).rows,
  ).toEqual([]);
}, 30_000);
