import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { AnalyticsService, RequestStatus, UsageGroupBy } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../lib/log.ts";
import { analyticsRoutes } from "./routes.ts";
import { createAnalyticsService, decodePageToken, encodePageToken, listingScope, query } from "./service.ts";
import { createChdbDriver } from "./store/chdb-driver.ts";
import { createTestStore, sampleMetrics, type TestStore, testDataDir } from "./store/test-store.ts";
import { createRecordingBilling } from "./test-helpers.ts";

const adminToken = "test-admin-token-0123456789";
const log = createLogger({ service: "analytics-test", level: "error", write: () => {} });
const hour = 3_600_000;
const base = Math.floor(Date.now() / hour) * hour - 24 * hour;
const range = (startMs: number, endMs: number) => ({
  start: timestampFromDate(new Date(startMs)),
  end: timestampFromDate(new Date(endMs)),
});
const day = range(base - hour, base + 23 * hour);

async function codeOf(call: Promise<unknown>): Promise<Code | undefined> {
  try {
    await call;
    return undefined;
  } catch (e) {
    return ConnectError.from(e).code;
  }
}

describe("AnalyticsService queries", () => {
  let store: TestStore;
  let client: Client<typeof AnalyticsService>;
  const org = "org_svc";
  const metrics = [
    ...Array.from({ length: 12 }, (_, i) =>
      sampleMetrics(new Date(base + i * 60_000), { orgId: org, requestedModel: i % 3 === 0 ? "m-a" : "m-b" }),
    ),
    sampleMetrics(new Date(base + 2 * hour), { orgId: org, requestedModel: "m-a", status: RequestStatus.TIMEOUT }),
  ];

  beforeAll(async () => {
    store = await createTestStore();
    await store.insertRequests(metrics, "svc-1");
    const billing = createClient(
      BillingService,
      createRouterTransport((r) => r.service(BillingService, createRecordingBilling().impl)),
    );
    const service = createAnalyticsService({ store, billing, log, adminToken });
    client = createClient(
      AnalyticsService,
      createRouterTransport(analyticsRoutes(service, adminToken), {
        transport: {
          interceptors: [
            (next) => (req) => {
              req.header.set("authorization", `Bearer ${adminToken}`);
              return next(req);
            },
          ],
        },
      }),
    );
  });
  afterAll(() => store.close());

  test("queries take the admin token, or an API key of the org they name; ingest only the admin token", async () => {
    let checks = 0;
    const billing = createClient(
      BillingService,
      createRouterTransport((r) =>
        r.service(BillingService, {
          async authorizeKey(req) {
            checks++;
            if (req.secret === "sk-mesh-down") throw new ConnectError("billing is down", Code.Unavailable);
            if (req.secret !== "sk-mesh-of-org") throw new ConnectError("unknown api key", Code.Unauthenticated);
            return { apiKey: { id: "key_1", orgId: org } };
          },
        }),
      ),
    );
    const service = createAnalyticsService({ store, billing, log, adminToken });
    const anonymous = createClient(AnalyticsService, createRouterTransport(analyticsRoutes(service, adminToken)));
    const as = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });
    expect(await codeOf(anonymous.queryUsage({ orgId: org, range: day }))).toBe(Code.Unauthenticated);
    expect(await codeOf(anonymous.listRequests({ orgId: org, range: day }))).toBe(Code.Unauthenticated);
    expect(await codeOf(anonymous.queryLatency({ orgId: org, range: day }, as("nope-nope-nope-nope")))).toBe(Code.PermissionDenied);

    // The org's own key reads its org, and only its org; billing is asked once for it.
    const own = await anonymous.queryUsage({ orgId: org, range: day }, as("sk-mesh-of-org"));
    expect(own.rows.length).toBeGreaterThan(0);
    expect(await codeOf(anonymous.listRequests({ orgId: org, range: day }, as("sk-mesh-of-org")))).toBeUndefined();
    expect(await codeOf(anonymous.queryLatency({ orgId: "org_other", range: day }, as("sk-mesh-of-org")))).toBe(
      Code.PermissionDenied,
    );
    expect(checks).toBe(1);
    // Concurrent first uses of a key wait for one check.
    const firstUses = Array.from({ length: 5 }, () => codeOf(anonymous.queryUsage({ orgId: org, range: day }, as("sk-mesh-new-one"))));
    expect(await Promise.all(firstUses)).toEqual(Array(5).fill(Code.Unauthenticated));
    expect(checks).toBe(2);
    // A key can only be checked while billing answers; that is not the caller's fault.
    expect(await codeOf(anonymous.queryUsage({ orgId: org, range: day }, as("sk-mesh-down")))).toBe(Code.Unavailable);

    const ingest = async (token: string) => {
      const batches = (async function* () {
        yield { gatewayInstanceId: "g", sequence: 1n, metrics: [] };
      })();
      for await (const _ of anonymous.ingestMetrics(batches, as(token)));
    };
    expect(await codeOf(ingest("sk-mesh-of-org"))).toBe(Code.PermissionDenied);
  });

  test("at most 4 report queries of one org run at once; more are refused until one ends", async () => {
    let release = () => {};
    const gate = new Promise<void>((resolve) => (release = resolve));
    const slow = { ...store, queryLatency: async (q: Parameters<typeof store.queryLatency>[0]) => (await gate, store.queryLatency(q)) };
    const service = createAnalyticsService({ store: slow, billing: createClient(BillingService, createRouterTransport(() => {})), log, adminToken });
    const admin = createClient(AnalyticsService, createRouterTransport(analyticsRoutes(service, adminToken)));
    const as = { headers: { authorization: `Bearer ${adminToken}` } };
    const first = Array.from({ length: 4 }, () => admin.queryLatency({ orgId: org, range: day }, as));
    expect(await codeOf(admin.queryLatency({ orgId: org, range: day }, as))).toBe(Code.ResourceExhausted);
    // Another org is not held back.
    expect(await codeOf(admin.queryUsage({ orgId: "org_other", range: day }, as))).toBeUndefined();
    release();
    await Promise.all(first);
    expect(await codeOf(admin.queryLatency({ orgId: org, range: day }, as))).toBeUndefined();
  });

  test("a query past the engine's time limit is ResourceExhausted, not an unavailable store", async () => {
    const driver = createChdbDriver(testDataDir());
    const endless = () => driver.query("SELECT count() FROM numbers(1000000000000) SETTINGS max_execution_time = 0.2");
    const error = await query(log, "test", endless)
      .catch((e: unknown) => ConnectError.from(e))
      .finally(() => driver.close());
    expect(error).toBeInstanceOf(ConnectError);
    expect((error as ConnectError).code).toBe(Code.ResourceExhausted);
  });

  test("a query stopped as its deadline passed is DeadlineExceeded; one its caller left is Canceled", async () => {
    // As connect's handler context aborts its signal for each.
    const reasons = [new ConnectError("the operation timed out", Code.DeadlineExceeded), new ConnectError("left", Code.Canceled)];
    const codes = [];
    for (const reason of reasons) {
      const controller = new AbortController();
      controller.abort(reason);
      const stopped = () => Promise.reject(new Error("the query was stopped"));
      codes.push(await query(log, "test", stopped, controller.signal).catch((e: unknown) => ConnectError.from(e).code));
    }
    expect(codes).toEqual([Code.DeadlineExceeded, Code.Canceled]);
  });

  test("QueryUsage groups in the order asked", async () => {
    const res = await client.queryUsage({ orgId: org, range: day, groupBy: [UsageGroupBy.MODEL, UsageGroupBy.STATUS] });
    expect(res.rows.map((r) => [r.group, r.requests, r.errors, r.costNanos])).toEqual([
      [["m-a", "OK"], 4n, 0n, 4n * 12_345n],
      [["m-a", "TIMEOUT"], 1n, 1n, 12_345n],
      [["m-b", "OK"], 8n, 0n, 8n * 12_345n],
    ]);
    const total = await client.queryUsage({ orgId: org, range: day });
    expect(total.rows.map((r) => [r.group, r.requests, r.usage?.outputTokens])).toEqual([[[], 13n, 13n * 50n]]);
  });

  test("QueryUsage validates org, range and group_by", async () => {
    expect(await codeOf(client.queryUsage({ range: day }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.queryUsage({ orgId: org }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.queryUsage({ orgId: org, range: range(base, base) }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.queryUsage({ orgId: org, range: range(base, base + 401 * 24 * hour) }))).toBe(
      Code.InvalidArgument,
    );
    expect(await codeOf(client.queryUsage({ orgId: org, range: range(base - 400 * 24 * hour, base) }))).toBe(undefined);
    // Past what ClickHouse's DateTime64 holds: refused, not retried as an unavailable store.
    const far = { start: { seconds: 1_000_000_000_000_000n, nanos: 0 }, end: { seconds: 1_000_000_000_000_001n, nanos: 0 } };
    expect(await codeOf(client.queryLatency({ orgId: org, range: far }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.queryUsage({ orgId: org, range: range(Date.UTC(1899, 11, 31), Date.UTC(1900, 0, 2)) }))).toBe(
      Code.InvalidArgument,
    );
    // Bounds are checked to the nanosecond as sent: a nanosecond past 400 days is past them, the last one of 2299 in.
    const at = (ms: number, nanos = 0) => ({ seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 + nanos });
    const justOver = { start: at(base - 400 * 24 * hour), end: at(base, 1) };
    expect(await codeOf(client.queryUsage({ orgId: org, range: justOver }))).toBe(Code.InvalidArgument);
    const lastOf2299 = { start: at(Date.UTC(2299, 11, 31)), end: at(Date.UTC(2300, 0, 1) - 1, 999_999) };
    expect(await codeOf(client.queryUsage({ orgId: org, range: lastOf2299 }))).toBe(undefined);
    expect(await codeOf(client.listRequests({ orgId: org, range: day, status: 42 as RequestStatus }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.listRequests({ orgId: org, range: day, status: RequestStatus.OK }))).toBe(undefined);
    const g = UsageGroupBy;
    for (const groupBy of [[g.MODEL, g.DAY, g.HOUR, g.STATUS], [g.MODEL, g.MODEL], [g.UNSPECIFIED]]) {
      expect(await codeOf(client.queryUsage({ orgId: org, range: day, groupBy }))).toBe(Code.InvalidArgument);
    }
  });

  test("ListRequests pages newest first with opaque tokens", async () => {
    const seen: string[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const res = await client.listRequests({ orgId: org, range: day, pageSize: 5, pageToken });
      seen.push(...res.requests.map((r) => r.requestId));
      pageToken = res.nextPageToken;
      pages++;
    } while (pageToken);
    expect(pages).toBe(3);
    expect(seen).toEqual([...metrics].reverse().map((m) => m.requestId));

    const all = await client.listRequests({ orgId: org, range: day });
    expect(all.requests).toHaveLength(13);
    expect(all.nextPageToken).toBe("");
    const timeouts = await client.listRequests({ orgId: org, range: day, status: RequestStatus.TIMEOUT, model: "m-a" });
    expect(timeouts.requests.map((r) => r.requestId)).toEqual(metrics.slice(12).map((m) => m.requestId));
    const requestId = metrics[3]?.requestId ?? "";
    const byId = await client.listRequests({ orgId: org, requestId });
    expect(byId.requests.map((r) => r.requestId)).toEqual([requestId]);
    expect((await client.listRequests({ orgId: "other", requestId })).requests).toEqual([]);
  });

  test("a ListRequests page token is refused with other filters or another org, taken with another size or range", async () => {
    const first = await client.listRequests({ orgId: org, range: day, pageSize: 2, model: "m-b" });
    const pageToken = first.nextPageToken;
    expect(pageToken).not.toBe("");
    // Another filter would start its listing part way, leaving out its rows newer than the token's.
    for (const other of [
      { model: "m-a" },
      { model: "" },
      { model: "m-b", apiKeyId: "key_a" },
      { model: "m-b", status: RequestStatus.OK },
      { model: "m-b", requestId: metrics[1]?.requestId ?? "" },
    ]) {
      const call = client.listRequests({ orgId: org, range: day, pageSize: 2, pageToken, ...other });
      expect(await codeOf(call)).toBe(Code.InvalidArgument);
    }
    expect(await codeOf(client.listRequests({ orgId: "org_other", range: day, pageToken, model: "m-b" }))).toBe(
      Code.InvalidArgument,
    );
    const next = await client.listRequests({ orgId: org, range: range(base - 2 * hour, base + hour), pageSize: 3, pageToken, model: "m-b" });
    const mB = metrics.filter((m) => m.requestedModel === "m-b").reverse();
    expect(next.requests.map((r) => r.requestId)).toEqual(mB.slice(2, 5).map((m) => m.requestId));
  });

  test("ListRequests validates page size, token and range", async () => {
    expect(await codeOf(client.listRequests({ orgId: org, range: day, pageSize: 1001 }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.listRequests({ orgId: org, range: day, pageSize: -1 }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.listRequests({ orgId: org, range: day, pageToken: "bm90LWEtdG9rZW4" }))).toBe(
      Code.InvalidArgument,
    );
    expect(await codeOf(client.listRequests({ orgId: org }))).toBe(Code.InvalidArgument);
    const cursor = { startTime: "2026-01-02 03:04:05.123456", requestId: "01J0000000000000000000000" };
    expect(decodePageToken(encodePageToken(cursor, "scope"), "scope")).toEqual(cursor);
    // Tokens this service never wrote: a 13th month, a 99th hour, a year it holds no rows for. They read as the end
    // of the listing before.
    for (const startTime of ["2026-13-45 99:99:99.000000", "2026-02-30 10:00:00.000000", "2399-01-01 00:00:00.000000"]) {
      const pageToken = encodePageToken({ startTime, requestId: "zzz" }, listingScope(org, "", "", 0, ""));
      expect(await codeOf(client.listRequests({ orgId: org, range: day, pageToken }))).toBe(Code.InvalidArgument);
    }
  });

  test("range bounds hold to the nanosecond: a row stored to the microsecond is in [start, end) or not", async () => {
    const row = metrics[3] as (typeof metrics)[number];
    const t = row.startTime as { seconds: bigint; nanos: number };
    const at = (nanos: number) => {
      const total = t.seconds * 1_000_000_000n + BigInt(t.nanos + nanos);
      return { seconds: total / 1_000_000_000n, nanos: Number(total % 1_000_000_000n) };
    };
    // Listed and counted alike.
    const ids = async (start: number, end: number) => {
      const range = { start: at(start), end: at(end) };
      const listed = (await client.listRequests({ orgId: org, range })).requests.map((r) => r.requestId);
      const [usage] = (await client.queryUsage({ orgId: org, range })).rows;
      expect(usage?.requests ?? 0n).toBe(BigInt(listed.length));
      return listed;
    };
    expect(await ids(-1_000_000, 500)).toEqual([row.requestId]);
    expect(await ids(0, 1)).toEqual([row.requestId]);
    expect(await ids(500, 1_000_000)).toEqual([]);
    expect(await ids(-1_000_000, 0)).toEqual([]);
    // Within one microsecond, [start, end) holds no instant a row can have.
    expect(await codeOf(client.listRequests({ orgId: org, range: { start: at(100), end: at(900) } }))).toBe(
      Code.InvalidArgument,
    );
    expect(await codeOf(client.listRequests({ orgId: org, range: { start: at(0), end: { ...at(0), nanos: 1e9 } } }))).toBe(
      Code.InvalidArgument,
    );
  });

  test("QueryTimeSeries buckets and validates the bucket width and count", async () => {
    const res = await client.queryTimeSeries({ orgId: org, range: day, bucketSeconds: 3600n });
    expect(res.points.map((p) => [p.bucketStart?.seconds, p.requests, p.errors])).toEqual([
      [BigInt(base / 1000), 12n, 0n],
      [BigInt((base + 2 * hour) / 1000), 1n, 1n],
    ]);
    const onlyA = await client.queryTimeSeries({ orgId: org, range: day, bucketSeconds: 86400n, model: "m-a" });
    expect(onlyA.points.reduce((n, p) => n + p.requests, 0n)).toBe(5n);
    const twoDays = range(base, base + 48 * hour);
    for (const [window, bucketSeconds] of [[day, 120n], [twoDays, 60n]] as const) {
      const call = client.queryTimeSeries({ orgId: org, range: window, bucketSeconds });
      expect(await codeOf(call)).toBe(Code.InvalidArgument);
    }
    // 2,000 minutes exactly are 2,000 buckets from a minute's start, and 2,001 from half a minute in.
    const minutes = 2_000 * 60_000;
    const aligned = client.queryTimeSeries({ orgId: org, range: range(base, base + minutes), bucketSeconds: 60n });
    expect((await aligned).points.length).toBeGreaterThan(0);
    const unaligned = client.queryTimeSeries({ orgId: org, range: range(base + 30_000, base + 30_000 + minutes), bucketSeconds: 60n });
    expect(await codeOf(unaligned)).toBe(Code.InvalidArgument);
  });

  test("QueryLatency reports percentiles per requested model", async () => {
    const res = await client.queryLatency({ orgId: org, range: day });
    expect(res.models.map((m) => [m.model, m.requests, m.total?.p50Us, m.gatewayOverhead?.p99Us])).toEqual([
      ["m-a", 5n, 1_200_000n, 50_000n],
      ["m-b", 8n, 1_200_000n, 50_000n],
    ]);
  });

  test("QueryUsage whose groups take more than a gRPC client takes is ResourceExhausted, saying how large", async () => {
    // Fewer groups than the limit on their number, but long names: 13,000 rows of about 270 bytes.
    const orgId = "org_long_models";
    const invented = Array.from({ length: 13_000 }, (_, i) =>
      sampleMetrics(new Date(base + 3 * hour + i), { orgId, requestedModel: `${"m".repeat(250)}-${i}`, status: RequestStatus.INVALID_REQUEST }),
    );
    await store.insertRequests([sampleMetrics(new Date(base), { orgId }), ...invented], "svc-long-models");
    const refused = await client.queryUsage({ orgId, range: day, groupBy: [UsageGroupBy.MODEL] }).catch((e) => ConnectError.from(e));
    expect(refused).toBeInstanceOf(ConnectError);
    expect([(refused as ConnectError).code, (refused as ConnectError).rawMessage]).toEqual([
      Code.ResourceExhausted,
      "the answer's 13001 groups take 3.4 MiB, more than 3.0 MiB; narrow the range or group by fewer dimensions",
    ]);
    const before = await client.queryUsage({ orgId, range: range(base - hour, base + hour), groupBy: [UsageGroupBy.MODEL] });
    expect(before.rows.map((r) => r.requests)).toEqual([1n]);
  });

  test("QueryLatency over more requested models than an answer may hold is ResourceExhausted", async () => {
    // A client that invents model names: each unknown one is recorded as sent.
    const orgId = "org_many_models";
    const invented = Array.from({ length: 10_001 }, (_, i) =>
      sampleMetrics(new Date(base + 3 * hour + i), { orgId, requestedModel: `gpt-4o-${i}`, status: RequestStatus.INVALID_REQUEST }),
    );
    await store.insertRequests([sampleMetrics(new Date(base), { orgId }), ...invented], "svc-many-models");
    expect(await codeOf(client.queryLatency({ orgId, range: day }))).toBe(Code.ResourceExhausted);
    const before = await client.queryLatency({ orgId, range: range(base - hour, base + hour) });
    expect(before.models.map((m) => [m.model, m.requests])).toEqual([["gpt-4o-mini", 1n]]);
  });
});
