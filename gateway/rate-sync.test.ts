import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { Registry } from "prom-client";
import { ulid } from "ulid";
import { BillingService, type SyncRateUsageRequest, SyncRateUsageResponseSchema } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../lib/log.ts";
import { freePort } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { eventually } from "../test/support.ts";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { createRateLimiter } from "./rate-limits.ts";
import { type RateSync, type RateSyncOptions, startRateSync } from "./rate-sync.ts";
import { createTestLogger, refused } from "./testing.ts";

const rpm = { requestsPerMinute: 10, tokensPerMinute: 0 };
const syncs: RateSync[] = [];
afterEach(async () => {
  await Promise.all(syncs.splice(0).map((sync) => sync.close()));
});

function started(options: RateSyncOptions): RateSync {
  const sync = startRateSync(options);
  syncs.push(sync);
  return sync;
}

const failures = async (registry: Registry) =>
  (await registry.getSingleMetric("gateway_rate_sync_failures_total")?.get())?.values[0]?.value ?? 0;

describe("while billing does not answer", () => {
  test("changes wait for the next sync, which comes at the next tick; the outage is logged once and counted", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: `http://127.0.0.1:${await freePort()}` });
    const limiter = createRateLimiter();
    const log = createTestLogger();
    const registry = new Registry();
    limiter.admit("k", rpm, 0);
    const sync = started({ billing, limiter, holder: "gw", intervalMs: 50, log, registry });
    await eventually(async () => (await failures(registry)) >= 4, { intervalMs: 20, what: "four syncs failed" });
    await sync.close();
    // Once as a warning; the failures after it only at debug level.
    const warnings = log.lines.filter((line) => JSON.parse(line).level === "warn");
    expect(warnings.map((line) => JSON.parse(line).msg)).toEqual([
      "rate usage sync with billing failed; per-minute limits count this replica's requests and the others' last known",
    ]);
    expect(limiter.takeChanges().usage).toEqual([{ keyId: "k", second: expect.any(Number), requests: 1, tokens: 0 }]);
  });

  test("a call billing never answers ends at its deadline, and no other is made meanwhile", async () => {
    const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      const client = createServiceClient(BillingService, { baseUrl: `http://127.0.0.1:${silent.port}` });
      let calls = 0;
      let running = 0;
      let most = 0;
      const billing: RateSyncOptions["billing"] = {
        async syncRateUsage(req, options) {
          calls++;
          most = Math.max(most, ++running);
          try {
            return await client.syncRateUsage(req, options);
          } finally {
            running--;
          }
        },
      };
      const limiter = createRateLimiter();
      limiter.admit("k", rpm, 0);
      const begun = performance.now();
      const sync = started({ billing, limiter, holder: "gw", intervalMs: 20, timeoutMs: 200, closeTimeoutMs: 200 });
      await eventually(() => calls >= 3, { intervalMs: 20, what: "three calls" });
      const elapsed = performance.now() - begun;
      await sync.close();
      expect(most).toBe(1);
      // Each call waited out its 200 ms before the next tick could make another.
      expect(elapsed).toBeGreaterThanOrEqual(400);
      expect(limiter.takeChanges().usage).toHaveLength(1);
    } finally {
      silent.stop(true);
    }
  });

  test("no call is made while the limiter tracks no key with per-minute limits", async () => {
    let calls = 0;
    const billing: RateSyncOptions["billing"] = {
      syncRateUsage: async () => {
        calls++;
        throw new Error("not called");
      },
    };
    const limiter = createRateLimiter();
    limiter.admit("k", { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 1 }, 0);
    started({ billing, limiter, holder: "gw", intervalMs: 10 });
    await Bun.sleep(100);
    expect(calls).toBe(0);
  });
});

test("a replica with more keys than one call may carry asks in several, one at a time", async () => {
  const calls: SyncRateUsageRequest[] = [];
  let running = 0;
  const billing: RateSyncOptions["billing"] = {
    async syncRateUsage(req) {
      expect(++running).toBe(1);
      calls.push(req as SyncRateUsageRequest);
      await Bun.sleep(1);
      running--;
      return create(SyncRateUsageResponseSchema, { asOf: timestampNow() });
    },
  };
  const limiter = createRateLimiter();
  for (let i = 0; i < 25_000; i++) limiter.admit(`key_${i}`, rpm, 0);
  const sync = started({ billing, limiter, holder: "gw", intervalMs: 60_000 });
  await sync.sync();
  expect(calls.map((req) => [req.keyIds.length, req.newKeyIds.length, req.usage.length])).toEqual([
    [0, 10_000, 10_000],
    [0, 10_000, 10_000],
    [0, 5_000, 5_000],
  ]);
  expect(new Set(calls.flatMap((req) => req.newKeyIds)).size).toBe(25_000);
  calls.length = 0;
  limiter.admit("key_0", rpm, 0);
  await sync.sync();
  expect(calls.map((req) => [req.keyIds.length, req.newKeyIds.length, req.usage.length])).toEqual([
    [10_000, 0, 1],
    [10_000, 0, 0],
    [5_000, 0, 0],
  ]);
});

describe("through billing", () => {
  // A real billing service (Postgres included) behind an in-memory transport.
  const adminToken = "rate-sync-test-admin-token-0123";
  let db: TestDatabase;
  let billing: RateSyncOptions["billing"];
  let billingDown = false;
  const requests: SyncRateUsageRequest[] = [];
  beforeAll(async () => {
    db = await createTestDatabase();
    const log = createLogger({ service: "billing-test", level: "error" });
    const client = createClient(
      BillingService,
      createRouterTransport(createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log }).routes),
    );
    billing = {
      async syncRateUsage(req, options) {
        requests.push(req as SyncRateUsageRequest);
        if (billingDown) throw new ConnectError("billing is unreachable", Code.Unavailable);
        return client.syncRateUsage(req, { ...options, headers: { authorization: `Bearer ${adminToken}` } });
      },
    };
  }, 60_000);
  afterAll(() => db?.drop(), 30_000);

  /** A replica named `name`: its limiter, and its syncs, which the test makes (none comes by itself within a test). */
  const replica = (name: string, log = createTestLogger()) => {
    const limiter = createRateLimiter();
    return { limiter, sync: started({ billing, limiter, holder: name, intervalMs: 60_000, log }), log };
  };

  test("two replicas hold a key's limit together, and one restarted under its name counts its past life's as another's", async () => {
    const key = `key_${ulid()}`;
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(key, rpm, 0);
    for (let i = 0; i < 5; i++) a.limiter.admit(key, rpm, 0);
    await a.sync.sync();
    await b.sync.sync();
    // The second replica knows of the first's 5 and its own 1: 4 are left.
    expect(b.limiter.state(key, rpm)?.requests?.remaining).toBe(4);
    for (let i = 0; i < 4; i++) b.limiter.admit(key, rpm, 0);
    expect(refused(() => b.limiter.admit(key, rpm, 0)).type).toBe("requests");
    await b.sync.sync();
    await a.sync.sync();
    expect(a.limiter.state(key, rpm)?.requests?.remaining).toBe(0);

    // Restarted, the first replica starts with no counts: its first request, before it has synced, is admitted on its
    // own; from its first sync on, what its past life counted is another replica's, and the minute is full.
    await a.sync.close();
    const restarted = replica("gw-a");
    restarted.limiter.admit(key, rpm, 0);
    await restarted.sync.sync();
    expect(restarted.limiter.state(key, rpm)?.requests?.remaining).toBe(0);
    expect(refused(() => restarted.limiter.admit(key, rpm, 0)).message).toContain("used 11");

    // A replica that does not sync (GATEWAY_RATE_SYNC_MS=0) counts alone, as every replica did before.
    const alone = createRateLimiter();
    for (let i = 0; i < rpm.requestsPerMinute; i++) alone.admit(key, rpm, 0);
    expect(refused(() => alone.admit(key, rpm, 0)).type).toBe("requests");
  });

  test("a release and a settlement reach the other replicas as they change the counts", async () => {
    const key = `key_${ulid()}`;
    const limits = { requestsPerMinute: 10, tokensPerMinute: 1_000 };
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(key, limits, 0);
    const running = a.limiter.admit(key, limits, 600);
    a.limiter.admit(key, limits, 100).release();
    await a.sync.sync();
    await b.sync.sync();
    expect(b.limiter.state(key, limits)).toMatchObject({ requests: { remaining: 8 }, tokens: { remaining: 400 } });
    running.settle(250);
    await a.sync.sync();
    await b.sync.sync();
    expect(b.limiter.state(key, limits)).toMatchObject({ requests: { remaining: 8 }, tokens: { remaining: 750 } });
  });

  test("what billing did not get while it was down reaches it at the next sync; the outage and its end are logged once", async () => {
    const key = `key_${ulid()}`;
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(key, rpm, 0);
    a.limiter.admit(key, rpm, 0);
    a.limiter.admit(key, rpm, 0);
    billingDown = true;
    try {
      await a.sync.sync();
      a.limiter.admit(key, rpm, 0);
      await a.sync.sync();
    } finally {
      billingDown = false;
    }
    await a.sync.sync();
    await b.sync.sync();
    expect(b.limiter.state(key, rpm)?.requests?.remaining).toBe(6);
    const messages = a.log.lines.map((line) => JSON.parse(line)).filter((line) => line.level !== "debug");
    expect(messages.map((line) => line.msg)).toEqual([
      "rate usage sync with billing failed; per-minute limits count this replica's requests and the others' last known",
      "rate usage syncs with billing answer again",
    ]);
    expect(messages[1]).toMatchObject({ failures: 2 });
  });

  test("once answered, a sync asks only for what changed, besides the keys no answer has covered whole", async () => {
    const [first, second] = [`key_${ulid()}`, `key_${ulid()}`];
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(first, rpm, 0);
    await b.sync.sync();
    a.limiter.admit(first, rpm, 0);
    await a.sync.sync();
    a.limiter.admit(second, rpm, 0);
    requests.length = 0;
    await a.sync.sync();
    expect(requests[0]).toMatchObject({ keyIds: [first], newKeyIds: [second], changedAfter: expect.anything() });
    // The second replica's count of the first key reached its first answer; the next ones leave that second out.
    expect(a.limiter.state(first, rpm)?.requests?.remaining).toBe(8);
    b.limiter.admit(second, rpm, 0);
    await b.sync.sync();
    await a.sync.sync();
    expect([first, second].map((key) => a.limiter.state(key, rpm)?.requests?.remaining)).toEqual([8, 8]);

    // A sync billing did not answer changes nothing of what the next asks.
    billingDown = true;
    try {
      await a.sync.sync();
    } finally {
      billingDown = false;
    }
    const failed = requests.at(-1);
    expect(failed?.changedAfter).toBeDefined();
    await a.sync.sync();
    expect(requests.at(-1)).toMatchObject({ keyIds: [first, second], newKeyIds: [], changedAfter: failed?.changedAfter });
  });

  test("closing sends what is left to billing", async () => {
    const key = `key_${ulid()}`;
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(key, rpm, 0);
    for (let i = 0; i < 3; i++) a.limiter.admit(key, rpm, 0);
    await a.sync.close();
    await b.sync.sync();
    expect(b.limiter.state(key, rpm)?.requests?.remaining).toBe(6);
  });
});
