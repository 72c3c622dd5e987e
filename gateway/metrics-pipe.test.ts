import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Registry } from "prom-client";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, createClient, createRouterTransport } from "@connectrpc/connect";
import { trace } from "@opentelemetry/api";
import {
  AnalyticsService,
  type IngestMetricsRequest,
  RequestMetricsSchema,
} from "../gen/analytics/v1/analytics_pb.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { createRestApp } from "./http/app.ts";
import { createMetricsShipper, type MetricsShipper, type MetricsShipperOptions } from "./metrics-pipe.ts";
import { createMemorySpool, type Spool } from "./spool.ts";
import { openFileSpool } from "./spool-file.ts";
import { createFillingDisk, createTestCore, createTestLogger } from "./testing.ts";

/** A real AnalyticsService.IngestMetrics that can refuse streams, break them, or withhold acks. */
function createAnalyticsFake() {
  const fake = {
    /** Every batch received, across streams, in arrival order. */
    received: [] as IngestMetricsRequest[],
    /** Sequences received per stream. */
    streams: [] as bigint[][],
    /** Streams to refuse before accepting one. */
    refuse: 0,
    /** Break the current stream right after receiving this many batches on it (without acking the last). */
    breakAfter: undefined as number | undefined,
    acking: true,
    /** Sequences acked, before the next ack, though no stream sent them (an analytics with a bug). */
    strayAcks: [] as bigint[],
    /** Wait this long before each ack, one batch after another (an analytics behind a backlog). */
    ackDelayMs: 0,
    /** Fail every stream this long after its first batch arrives (as analytics does when billing is down). */
    failAfterMs: undefined as number | undefined,
    /** When each stream was opened, and when each failed by failAfterMs. */
    opened: [] as number[],
    failed: [] as number[],
    routes(router: ConnectRouter) {
      router.service(AnalyticsService, {
        async *ingestMetrics(requests) {
          fake.opened.push(performance.now());
          if (fake.refuse > 0) {
            fake.refuse--;
            throw new ConnectError("analytics is down", Code.Unavailable);
          }
          const sequences: bigint[] = [];
          fake.streams.push(sequences);
          for await (const req of requests) {
            fake.received.push(req);
            sequences.push(req.sequence);
            if (fake.failAfterMs !== undefined) {
              await Bun.sleep(fake.failAfterMs);
              fake.failed.push(performance.now());
              throw new ConnectError("billing is down", Code.Unavailable);
            }
            if (fake.breakAfter !== undefined && sequences.length >= fake.breakAfter) {
              fake.breakAfter = undefined;
              throw new ConnectError("analytics crashed", Code.Unavailable);
            }
            if (fake.ackDelayMs > 0) await Bun.sleep(fake.ackDelayMs);
            for (const sequence of fake.strayAcks.splice(0)) yield { ackedSequence: sequence };
            if (fake.acking) yield { ackedSequence: req.sequence };
          }
        },
      });
    },
    requestIds: () => fake.received.flatMap((b) => b.metrics.map((m) => m.requestId)),
  };
  return fake;
}

const shippers: MetricsShipper[] = [];
const servers: RunningServer[] = [];
afterEach(async () => {
  for (const s of shippers.splice(0)) await s.close();
  for (const s of servers.splice(0)) await s.close(0);
});

function setup(options: Partial<MetricsShipperOptions> & { spool?: Spool } = {}) {
  const analytics = createAnalyticsFake();
  const spool = options.spool ?? createMemorySpool({ firstSequence: 1n });
  const shipper = createMetricsShipper({
    client: createClient(AnalyticsService, createRouterTransport((router) => analytics.routes(router))),
    spool,
    instanceId: "gw-test",
    log: createTestLogger(),
    batchRows: 10,
    intervalMs: 20,
    backoffBaseMs: 5,
    backoffMaxMs: 20,
    ...options,
  });
  shippers.push(shipper);
  return { analytics, spool, shipper };
}

// Rows that bill, which the spool keeps to its bound.
const row = (i: number) =>
  create(RequestMetricsSchema, { requestId: `req-${String(i).padStart(4, "0")}`, costNanos: 1n });
/** gateway_metrics_dropped_total for one reason. */
const dropped = async (registry: Registry, reason: string) => {
  const counted = await registry.getSingleMetric("gateway_metrics_dropped_total")?.get();
  return counted?.values.find((v) => v.labels.reason === reason)?.value;
};
const ids = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => row(from + i).requestId);

/** Each stream saw strictly increasing sequences. */
function expectOrderedStreams(streams: bigint[][]) {
  for (const s of streams) for (let i = 1; i < s.length; i++) expect(s[i]! > s[i - 1]!).toBe(true);
}

describe("metrics shipper", () => {
  test("batches by size and by interval, on one stream, and acks empty the spool", async () => {
    const { analytics, spool, shipper } = setup();
    shipper.start();
    for (let i = 0; i < 25; i++) shipper.record(row(i));
    expect(await shipper.flush(2000)).toBe(true);
    expect(analytics.streams).toHaveLength(1);
    expect(analytics.received.map((b) => [b.sequence, b.metrics.length])).toEqual([
      [1n, 10],
      [2n, 10],
      [3n, 5],
    ]);
    expect(analytics.received.every((b) => b.gatewayInstanceId === "gw-test")).toBe(true);
    expect(analytics.requestIds()).toEqual(ids(0, 25));
    expect([...spool.unacked()]).toHaveLength(0);
    expect(spool.rows).toBe(0);

    // The interval alone sends a small batch.
    shipper.record(row(25));
    await Bun.sleep(60);
    expect(analytics.received.at(-1)?.metrics.map((m) => m.requestId)).toEqual(ids(25, 26));
    expect(shipper.status()).toMatchObject({ connected: true, rows: 0, full: false });
  });

  test("counts its rows spooled and, of the first of them, those analytics acked; not rows an earlier process left", async () => {
    const spool = createMemorySpool({ firstSequence: 1n });
    // Left pending by an earlier process: sealed first, with this one's first rows.
    for (let i = 0; i < 3; i++) spool.append(toBinary(RequestMetricsSchema, row(900 + i)));
    const { analytics, shipper } = setup({ spool });
    analytics.ackDelayMs = 30;
    shipper.start();
    for (let i = 0; i < 25; i++) shipper.record(row(i));
    expect(shipper.recordedRows()).toBe(25);
    const seen = [shipper.ackedRows()];
    const flushed = shipper.flush(5_000);
    let done = false;
    void flushed.then(() => (done = true));
    while (!done) {
      if (shipper.ackedRows() !== seen.at(-1)) seen.push(shipper.ackedRows());
      await Bun.sleep(2);
    }
    expect(await flushed).toBe(true);
    if (shipper.ackedRows() !== seen.at(-1)) seen.push(shipper.ackedRows());
    // Batches of 10: 3 earlier rows and 7 of this process's, then 10, then 8; each ack moves the count past its batch.
    expect(analytics.received.map((b) => b.metrics.length)).toEqual([10, 10, 8]);
    expect(seen).toEqual([0, 7, 17, 25]);
  });

  test("a batch is also sealed by the encoded size of its rows; the rest wait for the next", async () => {
    const rowBytes = toBinary(RequestMetricsSchema, row(0)).length;
    const { analytics, shipper } = setup({ batchRows: 100, batchBytes: 3 * rowBytes + 1 });
    shipper.start();
    for (let i = 0; i < 10; i++) shipper.record(row(i));
    expect(await shipper.flush(2000)).toBe(true);
    expect(analytics.received.map((b) => b.metrics.length)).toEqual([3, 3, 3, 1]);
    expect(analytics.requestIds()).toEqual(ids(0, 10));
  });

  test("a row larger than a batch may be goes without its tags; one too large even so is dropped, never sent", async () => {
    const registry = new Registry();
    const { analytics, shipper } = setup({ batchBytes: 4096, registry });
    const tagged = create(RequestMetricsSchema, { requestId: "req-tagged", tags: { note: "x".repeat(5000) } });
    const huge = create(RequestMetricsSchema, { requestId: "req-huge", provider: "p".repeat(5000) });
    shipper.start();
    shipper.record(row(0));
    shipper.record(tagged);
    shipper.record(huge);
    shipper.record(row(1));
    expect(await shipper.flush(2000)).toBe(true);
    expect(analytics.requestIds()).toEqual(["req-0000", "req-tagged", "req-0001"]);
    expect(analytics.received.flatMap((b) => b.metrics).find((m) => m.requestId === "req-tagged")?.tags).toEqual({});
    const count = async (name: string) => (await registry.getSingleMetric(name)?.get())?.values[0]?.value;
    expect(await count("gateway_metrics_trimmed_total")).toBe(1);
    expect(await dropped(registry, "too_large")).toBe(1);
    // The caller's own metrics are left as they were.
    expect(tagged.tags.note).toHaveLength(5000);
  });

  test("a broken stream loses nothing: unacked batches are resent in order, acked ones never", async () => {
    const { analytics, shipper } = setup();
    analytics.breakAfter = 3;
    shipper.start();
    for (let i = 0; i < 100; i++) shipper.record(row(i));
    expect(await shipper.flush(5000)).toBe(true);

    expect(analytics.streams.length).toBeGreaterThanOrEqual(2);
    expectOrderedStreams(analytics.streams);
    // Batches 1 and 2 were acked before the break and are not sent again; 3 was not and is.
    const [first, second] = analytics.streams;
    expect(first?.slice(0, 3)).toEqual([1n, 2n, 3n]);
    expect(second?.[0]).toBe(3n);
    const sent = analytics.received.map((b) => b.sequence);
    expect(sent.filter((s) => s === 1n || s === 2n)).toEqual([1n, 2n]);
    // Every row arrived; resends only repeat rows, never drop them.
    expect(new Set(analytics.requestIds())).toEqual(new Set(ids(0, 100)));
    expect(new Set(sent)).toEqual(new Set(Array.from({ length: 10 }, (_, i) => BigInt(i + 1))));
  });

  test("analytics down at start: rows wait in the spool, then all go once it is back", async () => {
    const { analytics, spool, shipper } = setup();
    analytics.refuse = 4;
    shipper.start();
    for (let i = 0; i < 35; i++) shipper.record(row(i));
    await Bun.sleep(5);
    expect(spool.rows).toBe(35);
    expect(await shipper.flush(5000)).toBe(true);
    expect(analytics.refuse).toBe(0);
    expect(analytics.requestIds()).toEqual(ids(0, 35));
    expectOrderedStreams(analytics.streams);
  });

  test("a stream that stops acking is replaced and its batches resent", async () => {
    const { analytics, shipper } = setup({ ackTimeoutMs: 50 });
    analytics.acking = false;
    shipper.start();
    for (let i = 0; i < 10; i++) shipper.record(row(i));
    await Bun.sleep(20);
    expect(analytics.received).toHaveLength(1);
    analytics.acking = true;
    expect(await shipper.flush(3000)).toBe(true);
    expect(analytics.streams.length).toBeGreaterThanOrEqual(2);
    expect(analytics.received.map((b) => b.sequence)).toEqual([1n, 1n]);
  });

  test("a stream acking steadily behind a backlog is kept, however long its last batch waits", async () => {
    // Each ack comes 60 ms after the last: the last of 20 batches sent at once waits over a second for its ack.
    const { analytics, shipper } = setup({ ackTimeoutMs: 300 });
    analytics.ackDelayMs = 60;
    shipper.start();
    for (let i = 0; i < 200; i++) shipper.record(row(i));
    expect(await shipper.flush(10_000)).toBe(true);
    expect(analytics.streams).toHaveLength(1);
    expect(analytics.requestIds()).toEqual(ids(0, 200));
  });

  test("a stream that takes batches and never acks them was not up: each reconnect waits longer", async () => {
    const { analytics, shipper } = setup({ backoffBaseMs: 100, backoffMaxMs: 10_000, random: () => 1 });
    analytics.acking = false;
    // Longer than a stream must last to count as up by time alone.
    analytics.failAfterMs = 600;
    shipper.start();
    for (let i = 0; i < 10; i++) shipper.record(row(i));
    while (analytics.opened.length < 4) await Bun.sleep(20);
    const delays = analytics.opened.slice(1, 4).map((at, i) => at - analytics.failed[i]!);
    // Doubling from the base (random 1 waits the whole ceiling): 100, 200, 400 ms.
    expect(delays[0]!).toBeGreaterThanOrEqual(90);
    expect(delays[1]!).toBeGreaterThanOrEqual(190);
    expect(delays[2]!).toBeGreaterThanOrEqual(390);
  }, 10_000);

  test("at most maxInFlightRows rows are unacked on the stream; the rest wait in the spool", async () => {
    const { analytics, spool, shipper } = setup({ maxInFlightRows: 20, ackTimeoutMs: 200 });
    analytics.acking = false;
    shipper.start();
    for (let i = 0; i < 55; i++) shipper.record(row(i));
    await Bun.sleep(100);
    expect(analytics.received.map((b) => b.sequence)).toEqual([1n, 2n]);
    expect(spool.rows).toBe(55);
    analytics.acking = true;
    expect(await shipper.flush(5000)).toBe(true);
    expect(new Set(analytics.requestIds())).toEqual(new Set(ids(0, 55)));
    expectOrderedStreams(analytics.streams);
  });

  test("an ack for a batch not sent on the stream is ignored: the batch stays spooled and is sent", async () => {
    const { analytics, spool, shipper } = setup({ maxInFlightRows: 10 });
    analytics.strayAcks = [2n, 3n];
    for (let i = 0; i < 30; i++) shipper.record(row(i));
    await Bun.sleep(50);
    expect([...spool.unacked()].map((b) => b.sequence)).toEqual([1n, 2n, 3n]);
    shipper.start();
    expect(await shipper.flush(3000)).toBe(true);
    expect(analytics.requestIds()).toEqual(ids(0, 30));
    expect(analytics.received.map((b) => b.sequence)).toEqual([1n, 2n, 3n]);
  });

  test("a restarted gateway resends from its file spool what analytics never acked, and counts it", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      const open = () => openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never" });
      const first = setup({ spool: open() });
      first.analytics.refuse = Number.POSITIVE_INFINITY;
      first.shipper.start();
      for (let i = 0; i < 25; i++) first.shipper.record(row(i));
      expect(await first.shipper.flush(50)).toBe(false);
      await first.shipper.close();
      first.spool.close();

      const registry = new Registry();
      const second = setup({ spool: open(), registry });
      second.shipper.start();
      expect(await second.shipper.flush(5000)).toBe(true);
      expect(second.analytics.requestIds()).toEqual(ids(0, 25));
      const resent = await registry.getSingleMetric("gateway_ingest_batches_resent_total")?.get();
      expect(resent?.values[0]?.value).toBe(3);
      second.spool.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("a batch that cannot be read for now (no file descriptors left) stays spooled and goes once it can", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      // An earlier process's sealed batches: read back from disk, since the new process has none of them in memory.
      const earlier = openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never" });
      for (let i = 0; i < 50; i++) earlier.append(toBinary(RequestMetricsSchema, row(i)));
      while (earlier.seal(10, 1 << 20));
      earlier.close();

      const fixture = join(import.meta.dir, "testing/shipper-out-of-descriptors.ts");
      const child = Bun.spawnSync(
        ["sh", "-c", 'ulimit -n 200 && exec "$0" "$@"', process.execPath, fixture, root, "300"],
        { stderr: "pipe" },
      );
      expect(child.stderr.toString()).toBe("");
      const result = JSON.parse(child.stdout.toString());
      expect(result).toMatchObject({ exhausted: "EMFILE", spooledWhileHeld: 50, flushed: true, dropped: 0 });
      expect(result.received).toEqual(ids(0, 50));
      // Logged once for the whole outage, not once per batch or retry.
      expect(result.errors).toEqual(["metrics spool: a batch cannot be read; retrying"]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("a batch damaged on disk sends the rows still whole and counts the rest dropped", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      const open = () => openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never" });
      const earlier = open();
      for (let i = 0; i < 25; i++) earlier.append(toBinary(RequestMetricsSchema, row(i)));
      while (earlier.seal(10, 1 << 20));
      earlier.close();

      const registry = new Registry();
      const spool = open();
      const { analytics, shipper } = setup({ spool, registry });
      const segment = join(spool.dir, "0000000001.seg");
      const bytes = readFileSync(segment);
      // A flipped byte in the second batch's fourth row loses that row alone...
      const flipped = bytes.indexOf("req-0013") + 7;
      bytes[flipped] = bytes[flipped]! ^ 1;
      writeFileSync(segment, bytes);
      // ...and the third batch is cut off the file (its record starts 9 header and 2 field bytes before its id).
      truncateSync(segment, bytes.indexOf("req-0020") - 11);
      shipper.start();
      expect(await shipper.flush(5000)).toBe(true);
      expect(analytics.requestIds()).toEqual([...ids(0, 13), ...ids(14, 20)]);
      expect(await dropped(registry, "damaged")).toBe(6);
      expect(spool.rows).toBe(0);
      spool.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("a full spool drops new rows, reports it, and flush gives up after its timeout", async () => {
    const maxBytes = 5 * (toBinary(RequestMetricsSchema, row(0)).length + 9);
    const { analytics, spool, shipper } = setup({ spool: createMemorySpool({ maxBytes, firstSequence: 1n }) });
    analytics.refuse = Number.POSITIVE_INFINITY;
    shipper.start();
    for (let i = 0; i < 8; i++) shipper.record(row(i));
    expect(shipper.status()).toMatchObject({ connected: false, rows: 5, full: true, maxBytes: spool.maxBytes });
    expect(await shipper.flush(50)).toBe(false);
  });

  test("a full disk under the file spool: nothing throws, refused rows are counted dropped, and it all resumes with room", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      const disk = createFillingDisk();
      const registry = new Registry();
      const spool = openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never", write: disk.write });
      const { analytics, shipper } = setup({ spool, registry });
      analytics.refuse = Number.POSITIVE_INFINITY;
      shipper.start();
      for (let i = 0; i < 5; i++) shipper.record(row(i));
      disk.room = 0;
      expect(await shipper.flush(50)).toBe(false);
      for (let i = 5; i < 15; i++) shipper.record(row(i));
      expect(await dropped(registry, "full")).toBe(10);
      expect(shipper.status()).toMatchObject({ rows: 5, full: true });

      disk.room = Number.POSITIVE_INFINITY;
      analytics.refuse = 0;
      expect(await shipper.flush(5000)).toBe(true);
      expect(analytics.requestIds()).toEqual(ids(0, 5));
      expect(shipper.status().full).toBe(false);
      spool.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("a disk that refused a row with nothing left to ack is tried again: the spool is no longer full once it has room", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      const disk = createFillingDisk();
      const spool = openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never", write: disk.write });
      const { shipper } = setup({ spool });
      shipper.start();
      shipper.record(row(0));
      expect(await shipper.flush(2000)).toBe(true);
      // Every row is acked: no ack is coming, and an unready gateway gets no requests whose rows could try the disk.
      disk.room = 0;
      shipper.record(row(1));
      expect(shipper.status().full).toBe(true);
      await Bun.sleep(100);
      expect(shipper.status().full).toBe(true);
      expect(readdirSync(spool.dir).filter((n) => !n.endsWith(".seg") && n !== "LOCK")).toEqual([]);

      disk.room = Number.POSITIVE_INFINITY;
      await Bun.sleep(100);
      expect(shipper.status()).toMatchObject({ rows: 0, full: false });
      spool.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("while the disk refuses rows, requests make no file work; a probe each second finds its room again", async () => {
    const root = mkdtempSync(join(tmpdir(), "shipper-spool-"));
    try {
      const disk = createFillingDisk();
      let writes = 0;
      const write = (fd: number, data: Uint8Array, offset: number, length: number) => {
        writes++;
        return disk.write(fd, data, offset, length);
      };
      const registry = new Registry();
      const spool = openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never", write });
      // Probes the gateway's way: from 100 ms, doubling (at the top of their jitter here).
      const { shipper } = setup({ spool, registry, backoffBaseMs: 100, backoffMaxMs: 10_000, random: () => 1 });
      shipper.record(row(0));
      await spool.idle();
      const segments = () => readdirSync(spool.dir).filter((n) => n.endsWith(".seg")).sort();
      disk.room = 0;
      const before = writes;
      shipper.record(row(1));
      expect(writes - before).toBeGreaterThan(0);
      await spool.idle();
      // The disk refused one row: the requests after it are dropped without trying it.
      const tried = writes;
      const files = segments();
      for (let i = 2; i < 200; i++) shipper.record(row(i));
      expect(writes).toBe(tried);
      await spool.idle();
      expect(segments()).toEqual(files);
      expect(await dropped(registry, "full")).toBe(199);

      // Probes at 100, 300, 700 and 1,500 ms, then a second apart (doubling, they were 3.1 and 6.3 s).
      await Bun.sleep(3_200);
      expect(shipper.status().full).toBe(true);
      disk.room = Number.POSITIVE_INFINITY;
      await Bun.sleep(1_100);
      expect(shipper.status().full).toBe(false);
      shipper.record(row(200));
      expect(spool.rows).toBe(2);
      spool.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test("over gRPC on a real server that restarts, nothing is lost", async () => {
    const analytics = createAnalyticsFake();
    const log = createTestLogger();
    let server = await startServer({ name: "analytics-fake", port: 0, routes: analytics.routes, log });
    servers.push(server);
    const port = server.port;
    const spool = createMemorySpool({ firstSequence: 1n });
    const shipper = createMetricsShipper({
      client: createServiceClient(AnalyticsService, { baseUrl: server.url }),
      spool,
      instanceId: "gw-real",
      log,
      batchRows: 10,
      intervalMs: 10,
      backoffBaseMs: 10,
      backoffMaxMs: 50,
    });
    shippers.push(shipper);
    shipper.start();
    for (let i = 0; i < 30; i++) shipper.record(row(i));
    expect(await shipper.flush(5000)).toBe(true);

    await server.close(0);
    servers.length = 0;
    for (let i = 30; i < 55; i++) shipper.record(row(i));
    await Bun.sleep(100);
    expect(spool.rows).toBe(25);
    server = await startServer({ name: "analytics-fake", port, routes: analytics.routes, log });
    servers.push(server);
    expect(await shipper.flush(5000)).toBe(true);
    expect(new Set(analytics.requestIds())).toEqual(new Set(ids(0, 55)));
    expectOrderedStreams(analytics.streams);
    expect(analytics.received.map((b) => b.sequence)).toEqual([1n, 2n, 3n, 4n, 5n, 6n]);
  });
});

describe("a flood of requests that bill nothing, while analytics is down", () => {
  /** The REST API over a real shipper and a 256 KiB file spool, its analytics down; `paid` is one billed request. */
  const gateway = (root: string) => {
    const registry = new Registry();
    const spool = openFileSpool({ root, name: "gw", maxBytes: 256 * 1024, fsync: "never" });
    const { analytics, shipper } = setup({ spool, registry, batchRows: 1000 });
    analytics.refuse = Number.POSITIVE_INFINITY;
    shipper.start();
    const { core } = createTestCore({ registry, shipper });
    const app = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 65_536 });
    const chat = (model: string, key?: string) =>
      app.fetch(
        new Request("http://gateway.test/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
          body: JSON.stringify({ model, messages: [{ role: "user", content: "paid" }] }),
        }),
      );
    const paid = async () => {
      const res = await chat("mock", "sk-good");
      expect(res.status).toBe(200);
      return res.headers.get("x-request-id") ?? "";
    };
    return { registry, spool, analytics, shipper, app, chat, paid };
  };

  const withRoot = async (fn: (root: string) => Promise<void>) => {
    const root = mkdtempSync(join(tmpdir(), "shipper-flood-"));
    try {
      await fn(root);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  };

  test("requests refused before a key was accepted take no spool room, and a paid one is delivered", () =>
    withRoot(async (root) => {
      const { registry, spool, analytics, shipper, app, paid } = gateway(root);
      // About twice what the spool holds were each refusal a row.
      for (let i = 0; i < 5000; i++) {
        expect((await app.fetch(new Request("http://gateway.test/v1/models"))).status).toBe(401);
      }
      expect(spool.rows).toBe(0);
      const requests = (await registry.getSingleMetric("gateway_requests_total")?.get())?.values ?? [];
      expect(requests.filter((v) => v.labels.code === 401).map((v) => [v.labels.status, v.value])).toEqual([
        ["unauthorized", 5000],
      ]);
      const id = await paid();
      expect(shipper.status().full).toBe(false);
      analytics.refuse = 0;
      expect(await shipper.flush(5000)).toBe(true);
      expect(analytics.requestIds()).toEqual([id]);
      expect(analytics.received[0]?.metrics[0]).toMatchObject({ orgId: "org_1" });
      expect(await dropped(registry, "full")).toBe(0);
      spool.close();
    }));

  test("a key's own requests that cost nothing stop short of the spool's bound: the room left goes to paid ones", () =>
    withRoot(async (root) => {
      const { registry, spool, analytics, shipper, chat, paid } = gateway(root);
      for (let i = 0; i < 5000; i++) expect((await chat("gpt-9", "sk-good")).status).toBe(404);
      expect(spool.rows).toBeGreaterThan(0);
      expect(spool.bytes).toBeLessThanOrEqual(spool.maxBytes * 0.8);
      expect(await dropped(registry, "shed")).toBe(5000 - spool.rows);
      expect(shipper.status().full).toBe(false);
      const ids = [await paid(), await paid()];
      expect(await dropped(registry, "full")).toBe(0);
      analytics.refuse = 0;
      expect(await shipper.flush(5000)).toBe(true);
      expect(analytics.requestIds().slice(-2)).toEqual(ids);
      spool.close();
    }));
});
