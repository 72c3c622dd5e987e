import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { create, equals, isMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { TimestampSchema, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { Registry } from "prom-client";
import {
  AnalyticsService,
  IngestMetricsRequestSchema,
  type IngestMetricsResponse,
  type RequestMetrics,
  RequestMetricsSchema,
} from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService, RecordUsageRequestSchema, type UsageRecord, UsageRecordSchema } from "../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { createLogger, type Logger } from "../lib/log.ts";
import { dedupToken, estimatedBytes, type IngestOptions, maxBatchRows, toUsageRecord } from "./ingest.ts";
import { analyticsRoutes } from "./routes.ts";
import type { AnalyticsStore } from "./store/store.ts";
import { createTestStore, sampleMetrics, type TestStore } from "./store/test-store.ts";
import { createAnalyticsWithRecordingBilling, createBatchQueue, createRecordingBilling } from "./test-helpers.ts";

const adminToken = "test-admin-token-0123456789";
const headers = { authorization: `Bearer ${adminToken}` };
const log = createLogger({ service: "analytics-test", level: "error", write: () => {} });
const now = Date.now();
const window = { start: timestampFromDate(new Date(now - 86_400_000)), end: timestampFromDate(new Date(now + 60_000)) };

type Batch = MessageInitShape<typeof IngestMetricsRequestSchema>;

interface SetupOptions {
  billing?: ReturnType<typeof createRecordingBilling>;
  log?: Logger;
  stopSignal?: AbortSignal;
  ingest?: Partial<IngestOptions>;
  registry?: Registry;
}

function setup(store: AnalyticsStore, options: SetupOptions = {}) {
  const { service, billing } = createAnalyticsWithRecordingBilling(
    {
      store,
      log: options.log ?? log,
      adminToken,
      stopSignal: options.stopSignal,
      registry: options.registry,
      // Short intervals keep the suite fast; each test that cares sets its own.
      ingest: { flushIntervalMs: 20, ...options.ingest },
    },
    options.billing,
  );
  const client = createClient(AnalyticsService, createRouterTransport(analyticsRoutes(service, adminToken)));
  /** Sends the batches on one stream; returns the acks received and the error that ended the stream, if any. */
  const send = async (batches: Batch[]) => {
    const acks: IngestMetricsResponse[] = [];
    try {
      for await (const ack of client.ingestMetrics(
        (async function* () {
          yield* batches;
        })(),
        { headers },
      )) {
        acks.push(ack);
      }
      return { acks, error: undefined };
    } catch (e) {
      return { acks, error: ConnectError.from(e) };
    }
  };
  return { billing, client, send };
}

const rows = (n: number, init: Parameters<typeof sampleMetrics>[1] = {}): RequestMetrics[] =>
  Array.from({ length: n }, (_, i) => sampleMetrics(new Date(now - 3_600_000 + i * 10), init));

const sequences = (acks: IngestMetricsResponse[]) => acks.map((a) => a.ackedSequence);

describe("IngestMetrics", () => {
  let store: TestStore;
  beforeAll(async () => {
    store = await createTestStore();
  });
  afterAll(() => store.close());

  const totals = async (orgId: string) => {
    const [total] = await store.queryUsage({ orgId, ...window, groupBy: [], limit: 1 });
    return { requests: total?.requests, costNanos: total?.costNanos };
  };

  test("batches are combined into one flush and acked in order, only once in ClickHouse and in billing", async () => {
    const org = "org_order";
    const batches = [rows(3, { orgId: org }), rows(2, { orgId: org }), rows(4, { orgId: org })];
    const inClickHouseWhenBilled: boolean[] = [];
    const billing = createRecordingBilling({
      onRecord: async (records) => {
        const page = await store.listRequests({ orgId: org, window, limit: 1000 });
        const written = new Set(page.requests.map((r) => r.requestId));
        inClickHouseWhenBilled.push(records.every((r) => written.has(r.requestId)));
      },
    });
    const { send } = setup(store, { billing, ingest: { flushIntervalMs: 200 } });
    const { acks, error } = await send(
      batches.map((metrics, i) => ({ gatewayInstanceId: "gw-1", sequence: BigInt(i + 1), metrics })),
    );
    expect(error).toBeUndefined();
    expect(sequences(acks)).toEqual([1n, 2n, 3n]);
    expect(inClickHouseWhenBilled).toEqual([true]);
    expect(billing.calls.map((c) => c.map((r) => r.requestId))).toEqual([batches.flat().map((m) => m.requestId)]);
    expect(await totals(org)).toEqual({ requests: 9n, costNanos: 9n * 12_345n });
  });

  test("a flush starts once enough rows are buffered, before the interval", async () => {
    const org = "org_rows";
    const { billing, client } = setup(store, { ingest: { flushRows: 5, flushIntervalMs: 60_000 } });
    const queue = createBatchQueue();
    const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
    queue.push({ sequence: 1n, metrics: rows(3, { orgId: org }) });
    queue.push({ sequence: 2n, metrics: rows(3, { orgId: org }) });
    expect((await acks.next()).value?.ackedSequence).toBe(1n);
    expect((await acks.next()).value?.ackedSequence).toBe(2n);
    expect(billing.calls.map((c) => c.length)).toEqual([6]);
    queue.end();
    expect((await acks.next()).done).toBe(true);
  });

  test("batches of several gateways share a flush; each stream gets its own acks", async () => {
    const org = "org_shared";
    const { billing, client } = setup(store, { ingest: { flushIntervalMs: 300 } });
    const streams = ["gw-a", "gw-b"].map((gw) => {
      const queue = createBatchQueue();
      const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
      queue.push({ gatewayInstanceId: gw, sequence: 7n, metrics: rows(2, { orgId: org }) });
      return { queue, acks };
    });
    for (const s of streams) expect((await s.acks.next()).value?.ackedSequence).toBe(7n);
    expect(billing.calls.map((c) => c.length)).toEqual([4]);
    for (const s of streams) s.queue.end();
    expect(await totals(org)).toEqual({ requests: 4n, costNanos: 4n * 12_345n });
  });

  test("a flush whose rows span more than 100 months is written whole; the other gateways' batches in it are acked", async () => {
    const org = "org_months";
    const { billing, client } = setup(store, { ingest: { flushIntervalMs: 300 } });
    // A gateway whose clock wandered: one row in each of 120 months ahead (ClickHouse refused past 100 per insert).
    const base = new Date(now);
    const wandering = Array.from({ length: 120 }, (_, i) =>
      sampleMetrics(new Date(Date.UTC(base.getUTCFullYear(), base.getUTCMonth() + i, 2)), { orgId: org }),
    );
    const streams = [
      { gw: "gw-clock", metrics: wandering },
      { gw: "gw-fine", metrics: rows(2, { orgId: org }) },
    ].map(({ gw, metrics }) => {
      const queue = createBatchQueue();
      const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
      queue.push({ gatewayInstanceId: gw, sequence: 3n, metrics });
      return { queue, acks };
    });
    for (const s of streams) expect((await s.acks.next()).value?.ackedSequence).toBe(3n);
    for (const s of streams) s.queue.end();
    expect(billing.stored.size).toBe(122);
    const everything = { start: timestampFromDate(new Date(now - 86_400_000)), end: timestampFromDate(new Date(Date.UTC(2040, 0))) };
    const [total] = await store.queryUsage({ orgId: org, ...everything, groupBy: [], limit: 1 });
    expect(total?.requests).toBe(122n);
  });

  test("no ack when ClickHouse fails, and billing is not called", async () => {
    // A database that was never migrated: every insert fails inside ClickHouse itself.
    const broken = await createTestStore({ migrate: false });
    const { billing, send } = setup(broken);
    const { acks, error } = await send([{ gatewayInstanceId: "gw-1", sequence: 7n, metrics: rows(2) }]);
    expect(acks).toEqual([]);
    expect(error?.code).toBe(Code.Unavailable);
    expect(billing.calls).toEqual([]);
    await broken.close();
  });

  test("no ack when billing fails; the resend is acked and counted once everywhere", async () => {
    const org = "org_resend";
    const { billing, send } = setup(store);
    const batch = { gatewayInstanceId: "gw-2", sequence: 41n, metrics: rows(5, { orgId: org }) };

    billing.fail();
    const failed = await send([batch]);
    expect(failed.acks).toEqual([]);
    expect(failed.error?.code).toBe(Code.Unavailable);
    // The rows reached ClickHouse before billing failed.
    expect(await totals(org)).toEqual({ requests: 5n, costNanos: 5n * 12_345n });

    billing.fail(false);
    const resent = await send([batch]);
    expect(resent.error).toBeUndefined();
    expect(resent.acks.map((a) => [a.ackedSequence, a.duplicateRows])).toEqual([[41n, 0]]);
    const again = await send([batch]);
    expect(again.acks.map((a) => [a.ackedSequence, a.duplicateRows])).toEqual([[41n, 5]]);

    expect(await totals(org)).toEqual({ requests: 5n, costNanos: 5n * 12_345n });
    expect(billing.stored.size).toBe(5);
  });

  test("billing or ClickHouse down is logged once as it starts and once as it ends, not at every resend", async () => {
    const org = "org_outage_log";
    const lines: string[] = [];
    let insertFails = false;
    const flaky: AnalyticsStore = {
      ...store,
      insertRequests: (...args) => (insertFails ? Promise.reject(new Error("connect ECONNREFUSED")) : store.insertRequests(...args)),
    };
    const { billing, send } = setup(flaky, { log: createLogger({ service: "analytics-test", write: (l) => lines.push(l) }) });
    const batch = { gatewayInstanceId: "gw-3", sequence: 1n, metrics: rows(2, { orgId: org }) };
    const messages = () => lines.map((l) => `${JSON.parse(l).level} ${JSON.parse(l).msg}`);

    billing.fail();
    for (let i = 0; i < 5; i++) expect((await send([batch])).error?.code).toBe(Code.Unavailable);
    billing.fail(false);
    expect((await send([batch])).error).toBeUndefined();
    expect(messages()).toEqual(["error recording usage in billing failed", "info billing records usage again"]);
    expect(JSON.parse(lines[1] ?? "{}").failures).toBe(5);

    lines.length = 0;
    insertFails = true;
    for (let i = 0; i < 5; i++) expect((await send([batch])).error?.code).toBe(Code.Unavailable);
    insertFails = false;
    expect((await send([batch])).error).toBeUndefined();
    expect(messages()).toEqual(["error writing a flush to ClickHouse failed", "info ClickHouse takes flushes again"]);
  });

  test("a record billing refuses for good is set aside alone; the rest of its flush is billed and acked", async () => {
    const org = "org_poison";
    const refuse = (records: UsageRecord[]) => {
      const bad = records.findIndex((r) => r.model.length > 200);
      if (bad >= 0) throw new ConnectError(`records[${bad}].model: at most 200 characters`, Code.InvalidArgument);
    };
    const { billing, send } = setup(store, { billing: createRecordingBilling({ onRecord: refuse }), ingest: { billingBatchRows: 4 } });
    const metrics = rows(9, { orgId: org });
    const poisoned = metrics[6] as RequestMetrics;
    poisoned.requestedModel = "m".repeat(201);
    const first = await send([{ gatewayInstanceId: "gw-poison", sequence: 1n, metrics }]);
    expect(first.error).toBeUndefined();
    expect(sequences(first.acks)).toEqual([1n]);
    expect([...billing.stored.keys()].sort()).toEqual(metrics.filter((m) => m !== poisoned).map((m) => m.requestId).sort());
    // ClickHouse keeps every row, the refused one too.
    expect((await totals(org)).requests).toBe(9n);

    // Nothing is stuck: the next batch goes through as usual.
    const next = await send([{ gatewayInstanceId: "gw-poison", sequence: 2n, metrics: rows(2, { orgId: org }) }]);
    expect(sequences(next.acks)).toEqual([2n]);
    expect(billing.stored.size).toBe(10);
  });

  test("records whose cost would take billing's daily total past int64 are set aside; the rest of the flush is acked", async () => {
    const org = "org_overflow";
    // Billing's answer once a key's day would pass 2^63-1 nano-USD: no resend can change it.
    const refuse = (records: UsageRecord[]) => {
      if (records.some((r) => r.apiKeyId === "key_full")) {
        throw new ConnectError("a total would exceed the largest amount billing can hold (2^63-1)", Code.FailedPrecondition);
      }
    };
    const { billing, send } = setup(store, { billing: createRecordingBilling({ onRecord: refuse }), ingest: { billingBatchRows: 4 } });
    const full = rows(3, { orgId: org, apiKeyId: "key_full", costNanos: 10n ** 15n });
    const other = rows(5, { orgId: org, apiKeyId: "key_other" });
    const { acks, error } = await send([
      { gatewayInstanceId: "gw-full", sequence: 1n, metrics: full },
      { gatewayInstanceId: "gw-full", sequence: 2n, metrics: other },
    ]);
    expect(error).toBeUndefined();
    expect(sequences(acks)).toEqual([1n, 2n]);
    expect([...billing.stored.keys()].sort()).toEqual(other.map((m) => m.requestId).sort());
  });

  test("records of an org or key billing does not know are set aside together in a few calls, not one call each", async () => {
    const org = "org_restored_away";
    let tried = 0;
    const refuse = (records: UsageRecord[]) => {
      tried++;
      const unknown = records.find((r) => r.orgId === org);
      if (unknown) throw new ConnectError(`org_id: organization ${unknown.orgId} does not exist`, Code.NotFound);
    };
    const registry = new Registry();
    const lines: string[] = [];
    const { billing, send } = setup(store, {
      registry,
      billing: createRecordingBilling({ onRecord: refuse }),
      log: createLogger({ service: "analytics-test", level: "error", write: (line) => lines.push(line) }),
    });
    // Interleaved with rows of orgs billing knows, under two keys of the unknown org.
    const metrics = rows(2000, { orgId: org }).map((m, i) =>
      i % 3 === 0 ? { ...m, orgId: `org_known_${i % 4}` } : { ...m, apiKeyId: `key_${i % 2}` },
    ) as RequestMetrics[];
    const sent = await send([{ gatewayInstanceId: "gw-restored", sequence: 1n, metrics }]);
    expect(sent.error).toBeUndefined();
    expect(sequences(sent.acks)).toEqual([1n]);
    const known = metrics.filter((m) => m.orgId !== org);
    expect([...billing.stored.keys()].sort()).toEqual(known.map((m) => m.requestId).sort());
    // A handful of calls, where splitting down to single records took about two per record.
    expect(tried).toBeLessThan(40);
    const unbillable = await registry.getSingleMetric("analytics_ingest_unbillable_rows_total")?.get();
    expect(unbillable?.values[0]?.value).toBe(metrics.length - known.length);
    expect(lines.length).toBeLessThanOrEqual(4);
    expect(JSON.parse(lines[0] as string)).toMatchObject({ org_id: org, code: "NotFound" });
  });

  test("rows with counts out of bounds are set aside, logged and counted; the rest of their batch is stored and billed", async () => {
    const org = "org_out_of_bounds";
    const registry = new Registry();
    const lines: string[] = [];
    const { billing, send } = setup(store, {
      registry,
      log: createLogger({ service: "analytics-test", level: "error", write: (line) => lines.push(line) }),
    });
    const usage = (tokens: bigint) => ({ inputTokens: tokens, cachedInputTokens: 0n, outputTokens: 0n, reasoningTokens: 0n });
    const cases: [MessageInitShape<typeof RequestMetricsSchema>, string][] = [
      [{ costNanos: 6n * 10n ** 18n }, "cost_nanos must be in 0..1000000000000000"],
      [{ costNanos: 10n ** 15n + 1n }, "cost_nanos must be in 0..1000000000000000"],
      [{ costNanos: -1n }, "cost_nanos must be in 0..1000000000000000"],
      [{ usage: usage(2n ** 31n + 1n) }, "usage.input_tokens must be in 0..2147483648"],
      [{ usage: usage(-5n) }, "usage.input_tokens must be in 0..2147483648"],
      [{ usage: { ...usage(1n), cachedInputTokens: -1n } }, "usage.cached_input_tokens must be in 0..2147483648"],
      [{ usage: { ...usage(1n), outputTokens: 2n ** 31n + 1n } }, "usage.output_tokens must be in 0..2147483648"],
      [{ usage: { ...usage(1n), reasoningTokens: -1n } }, "usage.reasoning_tokens must be in 0..2147483648"],
      [{ totalLatencyUs: 2n ** 63n - 1n }, "total_latency_us must be in 0..86400000000"],
      [{ upstreamLatencyUs: -1n }, "upstream_latency_us must be in 0..86400000000"],
      [{ ttftUs: -1n }, "ttft_us must be in 0..86400000000"],
      [{ gatewayOverheadUs: 86_400_000_001n }, "gateway_overhead_us must be in 0..86400000000"],
      // The first field out of bounds is the one named.
      [{ usage: usage(-1n), costNanos: -1n, gatewayOverheadUs: -1n }, "usage.input_tokens must be in 0..2147483648"],
      [{ costNanos: -1n, totalLatencyUs: -1n }, "cost_nanos must be in 0..1000000000000000"],
    ];
    const odd = cases.map(([fields]) => sampleMetrics(new Date(now - 60_000), { orgId: org, ...fields }));
    // The largest values a row may hold are taken.
    const largest = sampleMetrics(new Date(now - 60_000), {
      orgId: org,
      costNanos: 10n ** 15n,
      usage: usage(2n ** 31n),
      totalLatencyUs: 86_400_000_000n,
    });
    const [first, last] = rows(2, { orgId: org }) as [RequestMetrics, RequestMetrics];
    const metrics = [first, ...odd, largest, last];
    const { acks, error } = await send([{ gatewayInstanceId: "gw-bounds", sequence: 1n, metrics }]);
    expect(error).toBeUndefined();
    expect(sequences(acks)).toEqual([1n]);
    const kept = [first, largest, last].map((m) => m.requestId).sort();
    expect([...billing.stored.keys()].sort()).toEqual(kept);
    const page = await store.listRequests({ orgId: org, window, limit: 100 });
    expect(page.requests.map((r) => r.requestId).sort()).toEqual(kept);
    expect(await totals(org)).toEqual({ requests: 3n, costNanos: 10n ** 15n + 2n * 12_345n });
    const [counted] = (await registry.getSingleMetric("analytics_ingest_out_of_bounds_rows_total")?.get())?.values ?? [];
    expect(counted?.value).toBe(odd.length);
    expect(lines.map((line) => JSON.parse(line).err.message)).toEqual(
      cases.map(([, problem], i) => `[invalid_argument] batch 1, row ${i + 1}: ${problem}`),
    );
    // Every outcome is there from zero, so the first failure is an increase to AnalyticsIngestFailing.
    const batches = (await registry.getSingleMetric("analytics_ingest_batches_total")?.get())?.values ?? [];
    expect(Object.fromEntries(batches.map((v) => [v.labels.outcome, v.value]))).toEqual({ acked: 1, rejected: 0, failed: 0 });
  });

  test("a batch that does not decode (a string not UTF-8) ends its stream with InvalidArgument; other streams go on", async () => {
    const org = "org_undecodable";
    const { billing, send } = setup(store);
    const good = rows(2, { orgId: org });
    // A row whose request_id is not UTF-8: no message can be made of it, only bytes sent as field 3 (metrics).
    const broken = toBinary(RequestMetricsSchema, sampleMetrics(new Date(now - 60_000), { orgId: org, requestId: "bad-id" }));
    const at = broken.indexOf(0x62); // the "b" of "bad-id", right after its tag and length
    broken[at] = 0xff;
    const batch = create(IngestMetricsRequestSchema, { gatewayInstanceId: "gw-utf8", sequence: 2n });
    const framed = new BinaryWriter().bytes(broken).finish();
    batch.$unknown = [{ no: 3, wireType: WireType.LengthDelimited, data: framed }];
    const { acks, error } = await send([{ gatewayInstanceId: "gw-utf8", sequence: 1n, metrics: good }, batch]);
    // Not ended as if read in full: the gateway is told why, and resends its batches in order, as after any refusal.
    expect(error?.code).toBe(Code.InvalidArgument);
    expect(error?.rawMessage).toContain("utf-8");
    expect(acks).toEqual([]);
    expect((await send([{ gatewayInstanceId: "gw-other", sequence: 1n, metrics: good }])).error).toBeUndefined();
    expect([...billing.stored.keys()].sort()).toEqual(good.map((m) => m.requestId).sort());
  });

  test("a batch of more than 10,000 rows is refused before anything is written", async () => {
    const org = "org_invalid";
    const { billing, send } = setup(store);
    const tooBig = await send([{ sequence: 1n, metrics: rows(maxBatchRows + 1, { orgId: org }) }]);
    expect(tooBig.error?.code).toBe(Code.InvalidArgument);
    expect(tooBig.error?.rawMessage).toContain("at most 10000");
    expect(billing.calls).toEqual([]);
    expect((await totals(org)).requests).toBe(0n);
  });

  test("rows without an id or time, or with a time ClickHouse cannot hold, are set aside; the rest of their batch is acked", async () => {
    const org = "org_odd_times";
    const registry = new Registry();
    const lines: string[] = [];
    const { billing, send } = setup(store, {
      registry,
      log: createLogger({ service: "analytics-test", level: "error", write: (line) => lines.push(line) }),
    });
    const at = (seconds: bigint, nanos = 0) => create(TimestampSchema, { seconds, nanos });
    const year = (y: number) => at(BigInt(Date.UTC(y, 5, 1) / 1000));
    const nowSeconds = BigInt(Math.floor(now / 1000));
    // 2106-02-07, where DateTime ends, less the longest retention.
    const lastStart = 2n ** 32n - 18_250n * 86_400n - 1n;
    const odd = [
      { requestId: "" },
      { startTime: undefined },
      { endTime: undefined },
      { firstTokenTime: at(10n ** 15n) },
      { endTime: at(nowSeconds, -5) },
      { startTime: at(nowSeconds, 1_500_000_000) },
      { startTime: year(2400) },
      // DateTime64 holds these, but the TTL (a DateTime) wrapped and dropped such rows once acked, and the rollups
      // filed them under other minutes or none.
      { startTime: year(1950) },
      { startTime: at(-1n) },
      { startTime: year(2150) },
      { startTime: at(lastStart + 1n) },
    ].map((fields) => sampleMetrics(new Date(now - 60_000), { orgId: org, ...fields }));
    // The latest start a row may have is stored, whatever the retention.
    const latest = sampleMetrics(new Date(now - 60_000), { orgId: org, startTime: at(lastStart) });
    const [first, last] = rows(2, { orgId: org }) as [RequestMetrics, RequestMetrics];
    const metrics = [first, ...odd, latest, last];
    const { acks, error } = await send([{ gatewayInstanceId: "gw-times", sequence: 1n, metrics }]);
    expect(error).toBeUndefined();
    expect(sequences(acks)).toEqual([1n]);
    const kept = [first, latest, last].map((m) => m.requestId).sort();
    expect([...billing.stored.keys()].sort()).toEqual(kept);
    const everything = { start: year(1900), end: year(2299) };
    const stored = await store.listRequests({ orgId: org, window: everything, limit: 100 });
    expect(stored.requests.map((r) => r.requestId).sort()).toEqual(kept);
    const [counted] = (await registry.getSingleMetric("analytics_ingest_out_of_bounds_rows_total")?.get())?.values ?? [];
    expect(counted?.value).toBe(odd.length);
    expect(lines.length).toBe(odd.length);
    expect(lines[0]).toContain("row 1: request_id is required");
    expect(lines[7]).toContain(`"request_id":"${odd[7]?.requestId}"`);
    expect(lines[7]).toContain("start_time must be a time from 1970-01-01 to 2056-02-19T06:28:16.000Z");
  });

  test("a full batch of 10,000 rows is written at once and billed in calls of billingBatchRows", async () => {
    const org = "org_full";
    const { billing, send } = setup(store, { ingest: { billingBatchRows: 4000 } });
    const { acks, error } = await send([{ sequence: 1n, metrics: rows(maxBatchRows, { orgId: org, costNanos: 3n }) }]);
    expect(error).toBeUndefined();
    expect(sequences(acks)).toEqual([1n]);
    expect(billing.calls.map((c) => c.length).sort()).toEqual([2000, 4000, 4000]);
    expect(await totals(org)).toEqual({ requests: 10_000n, costNanos: 30_000n });
  });

  test("requests without an org are acked, neither stored nor billed; an empty batch is acked", async () => {
    const { billing, send } = setup(store, { ingest: { flushIntervalMs: 100 } });
    const anonymous = rows(2, { orgId: "", apiKeyId: "", costNanos: 0n });
    const billed = rows(1, { orgId: "org_mixed" });
    const { acks } = await send([
      { sequence: 1n, metrics: [...anonymous, ...billed] },
      { sequence: 2n, metrics: [] },
    ]);
    expect(sequences(acks)).toEqual([1n, 2n]);
    expect(billing.calls.map((c) => c.map((r) => r.requestId))).toEqual([billed.map((m) => m.requestId)]);
    expect((await totals("")).requests ?? 0n).toBe(0n);
    expect((await totals("org_mixed")).requests).toBe(1n);
  });

  /**
   * Sends 40 batches of 10 rows on one stream while billing holds the first flush, and checks that fewer than 10
   * were pulled meanwhile (`whileHeld` looks at the rest), then that every one is acked in order and counted once.
   */
  const underPressure = async (
    org: string,
    init: Parameters<typeof sampleMetrics>[1],
    ingest: Partial<IngestOptions>,
    whileHeld: (registry: Registry) => Promise<void> = async () => {},
  ) => {
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => (release = resolve));
    const billing = createRecordingBilling({ onRecord: () => gate });
    const registry = new Registry();
    const { client } = setup(store, { billing, registry, ingest: { flushRows: 10, flushIntervalMs: 5, ...ingest } });
    const queue = createBatchQueue();
    const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
    for (let i = 1; i <= 40; i++) queue.push({ sequence: BigInt(i), metrics: rows(10, { ...init, orgId: org }) });
    const first = acks.next();
    await Bun.sleep(300);
    expect(queue.taken).toBeLessThan(10);
    await whileHeld(registry);
    release();
    expect((await first).value?.ackedSequence).toBe(1n);
    const seen = [1n];
    for (let i = 2; i <= 40; i++) seen.push((await acks.next()).value?.ackedSequence ?? -1n);
    expect(seen).toEqual(Array.from({ length: 40 }, (_, i) => BigInt(i + 1)));
    queue.end();
    expect((await acks.next()).done).toBe(true);
    expect(await totals(org)).toEqual({ requests: 400n, costNanos: 400n * 12_345n });
  };

  test("while the buffer is full the stream is not read; memory stays bounded and nothing is lost", async () => {
    // Billing holds the first flush: 30 rows fill the buffer, so only a few batches beyond are pulled.
    await underPressure("org_pressure", {}, { maxBufferedRows: 30 });
  });

  test("a gateway that does not take its acks is not read past maxUnsentAcks; once it does, each batch is acked once", async () => {
    const org = "org_unread_acks";
    const { billing, client } = setup(store, { ingest: { flushRows: 1, flushIntervalMs: 5, maxUnsentAcks: 5 } });
    const queue = createBatchQueue();
    const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
    for (let i = 1; i <= 40; i++) queue.push({ sequence: BigInt(i), metrics: rows(1, { orgId: org }) });
    expect((await acks.next()).value?.ackedSequence).toBe(1n);
    // The gateway takes no more acks for a while: only the batches it owes acks for are read, the rest wait unread.
    await Bun.sleep(300);
    expect(queue.taken).toBeLessThanOrEqual(1 + 5 + 1);
    const seen = [1n];
    for (let i = 2; i <= 40; i++) seen.push((await acks.next()).value?.ackedSequence ?? -1n);
    expect(seen).toEqual(Array.from({ length: 40 }, (_, i) => BigInt(i + 1)));
    queue.end();
    expect((await acks.next()).done).toBe(true);
    expect(billing.stored.size).toBe(40);
    expect(await totals(org)).toEqual({ requests: 40n, costNanos: 40n * 12_345n });
  });

  test("rows are held back by their size in memory too: large ones stop the reading long before the row bound", async () => {
    // As large as the gateway's request checks allow: 16 tags of 64 and 512 characters.
    const tags = Object.fromEntries(Array.from({ length: 16 }, (_, t) => [`${t}`.padStart(64, "k"), "v".repeat(512)]));
    const rowBytes = estimatedBytes(sampleMetrics(new Date(now), { tags }));
    expect(rowBytes).toBeGreaterThan(16 * 2 * (64 + 512));
    // 30 rows' worth of bytes fill the buffer, though 100,000 rows would fit.
    const bounds = { maxBufferedRows: 100_000, maxBufferedBytes: 30 * rowBytes };
    await underPressure("org_pressure_bytes", { tags }, bounds, async (registry) => {
      const buffered = await registry.getSingleMetric("analytics_ingest_buffered_bytes")?.get();
      expect(buffered?.values[0]?.value).toBeGreaterThanOrEqual(30 * rowBytes);
    });
  });

  test("a flush starts once a quarter of the byte bound is buffered, before the interval and the row count", async () => {
    const org = "org_flush_bytes";
    const big = rows(4, { orgId: org, tags: { note: "v".repeat(10_000) } });
    const bound = 4 * big.reduce((n, m) => n + estimatedBytes(m), 0);
    const { billing, client } = setup(store, {
      ingest: { flushRows: 1000, flushIntervalMs: 60_000, maxBufferedBytes: bound },
    });
    const queue = createBatchQueue();
    const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
    queue.push({ sequence: 1n, metrics: big.slice(0, 2) });
    queue.push({ sequence: 2n, metrics: big.slice(2) });
    expect((await acks.next()).value?.ackedSequence).toBe(1n);
    expect((await acks.next()).value?.ackedSequence).toBe(2n);
    expect(billing.calls.map((c) => c.length)).toEqual([4]);
    queue.end();
    expect((await acks.next()).done).toBe(true);
  });

  test("on stop, streams stop being read; what is buffered is flushed and acked, then streams end", async () => {
    const org = "org_stop";
    const stop = new AbortController();
    const { client } = setup(store, { stopSignal: stop.signal, ingest: { flushIntervalMs: 60_000 } });
    const queue = createBatchQueue();
    const acks = client.ingestMetrics(queue, { headers })[Symbol.asyncIterator]();
    queue.push({ sequence: 1n, metrics: rows(1, { orgId: org }) });
    queue.push({ sequence: 2n, metrics: rows(2, { orgId: org }) });
    await Bun.sleep(50);
    expect((await totals(org)).requests).toBe(0n);
    stop.abort();
    expect((await acks.next()).value?.ackedSequence).toBe(1n);
    expect((await acks.next()).value?.ackedSequence).toBe(2n);
    // Ends without waiting for the gateway to close its side, and without reading more.
    queue.push({ sequence: 3n, metrics: rows(1, { orgId: org }) });
    expect((await acks.next()).done).toBe(true);
    queue.end();
    expect((await totals(org)).requests).toBe(3n);
  });

  test("the stream requires the admin token", async () => {
    const { client } = setup(store);
    const attempt = async (auth?: string) => {
      try {
        for await (const _ of client.ingestMetrics(
          (async function* () {
            yield { sequence: 1n, metrics: rows(1) };
          })(),
          { headers: auth ? { authorization: auth } : {} },
        ));
      } catch (e) {
        return ConnectError.from(e).code;
      }
    };
    expect(await attempt()).toBe(Code.Unauthenticated);
    expect(await attempt("Bearer wrong-token-wrong-token")).toBe(Code.PermissionDenied);
  });
});

test("usage records carry what billing needs", () => {
  const m = sampleMetrics(new Date(now), {
    orgId: "org_x",
    projectId: "proj_x",
    apiKeyId: "key_x",
    costNanos: 99n,
    costBreakdown: { inputNanos: 50n, cachedInputNanos: 9n, outputNanos: 30n, reasoningNanos: 10n },
  });
  const record = toUsageRecord(m);
  expect(record).toMatchObject({
    requestId: m.requestId,
    orgId: "org_x",
    projectId: "proj_x",
    apiKeyId: "key_x",
    model: "gpt-4o-mini",
    provider: "mock",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    costNanos: 99n,
    occurTime: m.startTime,
  });
  expect(record.usage).toEqual(m.usage);
  expect(record.costBreakdown).toEqual(m.costBreakdown);
  expect(create(BillingService.method.recordUsage.input, { records: [record] }).records).toHaveLength(1);
});

test("a usage record is the message create() makes of its fields, with or without a row's optional ones", () => {
  const full = sampleMetrics(new Date(now), {
    costBreakdown: { inputNanos: 50n, cachedInputNanos: 9n, outputNanos: 30n, reasoningNanos: 10n },
    budgetCharges: [{ leaseId: "lease_x", nanos: 99n, tokens: 170n }],
  });
  // A row the gateway sent with no usage, cost parts, charges or times: validation sets it aside, billing never sees it.
  const bare = create(RequestMetricsSchema, { requestId: "01JB0000000000000000000001", orgId: "org_x" });
  const call = (records: UsageRecord[]) => toBinary(RecordUsageRequestSchema, create(RecordUsageRequestSchema, { records }));
  for (const m of [full, bare]) {
    const record = toUsageRecord(m);
    const { $typeName, ...fields } = record;
    const made = create(UsageRecordSchema, fields);
    expect(isMessage(record, UsageRecordSchema)).toBe(true);
    expect(equals(UsageRecordSchema, record, made)).toBe(true);
    expect(call([record])).toEqual(call([made]));
    expect(record.budgetCharges).toEqual(m.budgetCharges);
  }
});

test("a row's estimated memory counts every string and budget charge a gateway sizes, not only its models and tags", () => {
  const at = new Date(now);
  const plain = estimatedBytes(sampleMetrics(at));
  // Any string may be as long as a message holds; only a few are the sizes the base allows for.
  const long = "x".repeat(100_000);
  for (const field of ["requestId", "traceId", "spanId", "orgId", "projectId", "apiKeyId", "provider", "errorCode", "gatewayInstanceId"]) {
    expect(estimatedBytes(sampleMetrics(at, { [field]: long }))).toBeGreaterThan(plain + 2 * long.length - 1000);
  }
  const charges = Array.from({ length: 10_000 }, () => ({ leaseId: "lease_01J", nanos: 1n }));
  expect(estimatedBytes(sampleMetrics(at, { budgetCharges: charges }))).toBeGreaterThanOrEqual(plain + 100 * charges.length);
  // Short ids and codes are in the base, as before.
  expect(plain).toBe(1200 + 2 * ("user-1".length + "gpt-4o-mini".length + "mock-gpt-4o-mini".length) + 100 + 2 * "teamsearch".length);
});

describe("dedupToken", () => {
  test("depends on the set of request ids only, and keeps its format across versions", () => {
    const rows = ["01JB0000000000000000000002", "01JB0000000000000000000001", "01JB0000000000000000000003"].map((requestId) =>
      sampleMetrics(new Date(now), { requestId }),
    );
    const token = dedupToken(rows);
    expect(dedupToken([...rows].reverse())).toBe(token);
    expect(dedupToken(rows.slice(1))).not.toBe(token);
    // A retried insert matches the first one only with the same token, even when analytics was upgraded in between.
    const sorted = rows.map((m) => `${m.requestId}\n`).sort().join("");
    expect(token).toBe(`ingest-${new Bun.CryptoHasher("sha256").update(sorted).digest("hex")}`);
  });
});
