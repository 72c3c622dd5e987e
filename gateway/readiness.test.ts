import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { AnalyticsService, RequestMetricsSchema } from "../gen/analytics/v1/analytics_pb.ts";
import { createMetricsShipper, type MetricsShipper, type ShipperStatus } from "./metrics-pipe.ts";
import { createReadiness } from "./readiness.ts";
import { createMemorySpool, type Spool } from "./spool.ts";
import { openFileSpool } from "./spool-file.ts";
import { createLogger, type Logger } from "../lib/log.ts";
import { createTestLogger } from "./testing.ts";
import { pingTimeoutMs } from "../lib/health.ts";

const fine: ShipperStatus = { connected: true, rows: 0, bytes: 0, maxBytes: 1000, full: false, lastError: undefined };

function setup(billing: () => Promise<Response>, log?: Logger) {
  const status: ShipperStatus = { ...fine };
  let probes = 0;
  const readiness = createReadiness({
    billingUrl: "http://billing.test/",
    shipper: { status: () => status },
    fetch: (async (url: string) => {
      probes++;
      expect(url).toBe("http://billing.test/readyz");
      return billing();
    }) as unknown as typeof fetch,
    log,
  });
  return { readiness, status, probes: () => probes };
}

const shippers: MetricsShipper[] = [];
const roots: string[] = [];
afterEach(async () => {
  for (const shipper of shippers.splice(0)) await shipper.close();
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

/** A real shipper on `spool` to an analytics that is down; readiness over it with billing up. */
function withSpool(spool: Spool) {
  const analytics = createRouterTransport((router) =>
    router.service(AnalyticsService, {
      // biome-ignore lint/correctness/useYield: analytics is down
      async *ingestMetrics() {
        throw new ConnectError("analytics is down", Code.Unavailable);
      },
    }),
  );
  const shipper = createMetricsShipper({
    client: createClient(AnalyticsService, analytics),
    spool,
    instanceId: "gw-test",
    log: createTestLogger(),
    batchRows: 1,
    backoffBaseMs: 5,
    backoffMaxMs: 20,
  });
  shippers.push(shipper);
  shipper.start();
  const readiness = createReadiness({
    billingUrl: "http://billing.test",
    shipper,
    fetch: (async () => new Response("{}")) as unknown as typeof fetch,
  });
  return { shipper, ready: async () => (await readiness()).ready };
}

/** A billed row of 13 bytes encoded, and 2 more and `userChars` with an end user. */
const row = (i: number, userChars = 0) =>
  create(RequestMetricsSchema, {
    requestId: `req-${String(i).padStart(4, "0")}`,
    endUserId: "u".repeat(userChars),
    costNanos: 1n,
  });

describe("readiness", () => {
  test("ready with billing up and the spool under its bound, connected or not", async () => {
    const { readiness, status } = setup(async () => new Response("{}"));
    expect(await readiness()).toEqual({
      ready: true,
      checks: { billing: "ok", analytics: "ok", spool: "ok (0 rows, 0% of 1000 bytes)" },
    });
    Object.assign(status, { connected: false, rows: 12, bytes: 250, lastError: "connect ECONNREFUSED" });
    const disconnected = await readiness();
    expect(disconnected.ready).toBe(true);
    expect(disconnected.checks.analytics).toBe("disconnected (12 rows spooled)");
    expect(disconnected.checks.spool).toBe("ok (12 rows, 25% of 1000 bytes)");
    Object.assign(status, { connected: true, full: true, bytes: 999 });
    const full = await readiness();
    expect(full.ready).toBe(false);
    expect(full.checks.spool).toBe("full (12 rows, 100% of 1000 bytes): request metrics that do not fit are dropped");
  });

  test("not ready when billing is unreachable or not ready", async () => {
    expect((await setup(async () => new Response("", { status: 503 })).readiness()).checks.billing).toBe("not ready (HTTP 503)");
    const down = await setup(async () => {
      throw new Error("connection refused");
    }).readiness();
    expect(down).toMatchObject({ ready: false, checks: { billing: "unreachable" } });
  });

  test("a billing whose store ping timed out reads as not ready, not as unreachable; one that hangs as unreachable", async () => {
    // Billing answers 503 once its own Postgres ping gives up (pingTimeoutMs): the gateway waits long enough to read it.
    let hang = false;
    const billing = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      fetch: async () => {
        await Bun.sleep(hang ? 60_000 : pingTimeoutMs + 50);
        return Response.json({ ready: false, checks: { postgres: "timeout" } }, { status: 503 });
      },
    });
    try {
      const readiness = createReadiness({ billingUrl: `http://127.0.0.1:${billing.port}`, shipper: { status: () => fine } });
      expect((await readiness()).checks.billing).toBe("not ready (HTTP 503)");
      hang = true;
      const started = performance.now();
      expect((await readiness()).checks.billing).toBe("unreachable");
      expect(performance.now() - started).toBeLessThan(3_000);
    } finally {
      billing.stop(true);
    }
  });

  test("billing down for many probes is logged as that starts and as it ends, not at every probe", async () => {
    const lines: string[] = [];
    let down = true;
    const { readiness } = setup(
      async () => {
        if (down) throw new Error("connect ECONNREFUSED 10.0.0.2:8081");
        return new Response("{}");
      },
      createLogger({ service: "t", write: (line) => lines.push(line) }),
    );
    for (let i = 0; i < 30; i++) expect((await readiness()).checks.billing).toBe("unreachable");
    down = false;
    for (let i = 0; i < 3; i++) expect((await readiness()).checks.billing).toBe("ok");
    const logged = lines.map((line) => JSON.parse(line));
    expect(logged.map((l) => `${l.level} ${l.msg}`)).toEqual([
      "warn readiness: billing does not answer",
      "info readiness: billing answers again",
    ]);
    expect(logged[1].failures).toBe(30);
  });

  test("billing down leaves the gateway ready while keys it vouched for lately are still admitted", async () => {
    let vouched = true;
    const status: ShipperStatus = { connected: true, rows: 0, bytes: 0, maxBytes: 1000, full: false, lastError: undefined };
    const readiness = createReadiness({
      billingUrl: "http://billing.test",
      shipper: { status: () => status },
      keysVouchedLately: () => vouched,
      fetch: (async () => {
        throw new Error("connection refused");
      }) as unknown as typeof fetch,
    });
    expect(await readiness()).toMatchObject({
      ready: true,
      checks: { billing: "unreachable; keys it vouched for lately still admitted" },
    });
    vouched = false;
    expect(await readiness()).toMatchObject({ ready: false, checks: { billing: "unreachable" } });
    // A full spool is unready whatever billing does.
    vouched = true;
    status.full = true;
    expect((await readiness()).ready).toBe(false);
  });

  test("a spool found full at start is not ready, and a smaller row that still fits does not make it ready", async () => {
    const root = mkdtempSync(join(tmpdir(), "readiness-spool-"));
    roots.push(root);
    const open = () => openFileSpool({ root, name: "gw", maxBytes: 4096, segmentBytes: 1024, fsync: "never" });
    const spool = open();
    const before = withSpool(spool);
    for (let i = 0; i < 100; i++) before.shipper.record(row(i, 200));
    expect(spool.rows).toBeLessThan(100);
    expect(await before.ready()).toBe(false);
    await before.shipper.close();
    spool.close();

    const restarted = open();
    const after = withSpool(restarted);
    expect(after.shipper.status()).toMatchObject({ rows: restarted.rows, full: true });
    expect(await after.ready()).toBe(false);
    const rows = restarted.rows;
    after.shipper.record(row(1000));
    expect(restarted.rows).toBe(rows + 1);
    expect(await after.ready()).toBe(false);
    restarted.close();
  });

  test("a full spool is ready again only once acks bring it under 90% of its bound", async () => {
    // 20 rows of 13 bytes and 9 of overhead fill it.
    const spool = createMemorySpool({ maxBytes: 20 * 22, firstSequence: 1n });
    const { shipper, ready } = withSpool(spool);
    for (let i = 0; i < 21; i++) shipper.record(row(i));
    expect(spool.rows).toBe(20);
    expect(await ready()).toBe(false);
    // Room for a row again, but not under 90%: a new row would take it and the next be dropped.
    spool.ack(1n);
    expect(spool.bytes + 22).toBeLessThanOrEqual(spool.maxBytes);
    expect(await ready()).toBe(false);
    spool.ack(2n);
    expect(spool.bytes).toBe(spool.maxBytes * 0.9);
    expect(await ready()).toBe(true);
  });
});
