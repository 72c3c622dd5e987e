import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
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

describe("with billing's answers made up", () => {
  type Others = MessageInitShape<typeof SyncRateUsageResponseSchema>["others"];
  /** A billing that answers each call with `others` and the next watermark, and fails the calls `failing` picks. */
  const answering = (others: () => Others = () => []) => {
    const calls: SyncRateUsageRequest[] = [];
    let watermark = 100n;
    let running = 0;
    let most = 0;
    const fake = {
      calls,
      failing: (_req: SyncRateUsageRequest) => false,
      /** The watermark of the last call answered. */
      watermark: () => watermark,
      /** The most calls under way at once. */
      most: () => most,
      billing: {
        async syncRateUsage(req) {
          const call = req as SyncRateUsageRequest;
          calls.push(call);
          most = Math.max(most, ++running);
          await Bun.sleep(1);
          running--;
          if (fake.failing(call)) throw new ConnectError("billing is unreachable", Code.Unavailable);
          watermark += 10n;
          return create(SyncRateUsageResponseSchema, { others: others(), watermark });
        },
      } satisfies RateSyncOptions["billing"],
    };
    return fake;
  };
  const shape = (req: SyncRateUsageRequest) => ({
    sequence: req.sequence,
    changesSince: req.changesSince,
    newKeyIds: req.newKeyIds,
    usage: req.usage.map((count) => [count.keyId, Number(count.requests)]),
  });

  test("calls are numbered, failed ones too; a sync asks for the changes since the last watermark, and resends a failed call's seconds at their counts then", async () => {
    const fake = answering();
    const limiter = createRateLimiter();
    const sync = started({ billing: fake.billing, limiter, holder: "gw", intervalMs: 60_000 });
    limiter.admit("k", rpm, 0);
    await sync.sync();
    limiter.admit("j", rpm, 0);
    await sync.sync();
    await sync.sync();
    fake.failing = () => true;
    limiter.admit("k", rpm, 0);
    await sync.sync();
    fake.failing = () => false;
    limiter.admit("k", rpm, 0);
    await sync.sync();
    expect(fake.calls.map(shape)).toEqual([
      // A first call asks for every key's whole window, and for no changes.
      { sequence: 1n, changesSince: 0n, newKeyIds: ["k"], usage: [["k", 1]] },
      { sequence: 2n, changesSince: 110n, newKeyIds: ["j"], usage: [["j", 1]] },
      { sequence: 3n, changesSince: 120n, newKeyIds: [], usage: [] },
      { sequence: 4n, changesSince: 130n, newKeyIds: [], usage: [["k", 2]] },
      // The failed call's second again, at what it counts now: billing replaces its 1 (or the 2 of an answer lost).
      { sequence: 5n, changesSince: 130n, newKeyIds: [], usage: [["k", 3]] },
    ]);
  });

  test("more new keys or counts than one call carries go in several, one at a time; only the first asks for the changes, and the watermark moves once all are answered", async () => {
    const fake = answering();
    const limiter = createRateLimiter();
    for (let i = 0; i < 25_000; i++) limiter.admit(`key_${i}`, rpm, 0);
    const sync = started({ billing: fake.billing, limiter, holder: "gw", intervalMs: 60_000 });
    await sync.sync();
    const sizes = (req: SyncRateUsageRequest) => [req.sequence, req.changesSince, req.newKeyIds.length, req.usage.length];
    expect(fake.calls.map(sizes)).toEqual([
      [1n, 0n, 10_000, 10_000],
      [2n, 0n, 10_000, 10_000],
      [3n, 0n, 5_000, 5_000],
    ]);
    expect(new Set(fake.calls.flatMap((req) => req.newKeyIds)).size).toBe(25_000);

    // 15,000 keys more, and the second call of their sync fails: the next asks again for the changes since the same
    // watermark, and for the whole windows of the keys that call named, with its counts.
    fake.calls.length = 0;
    for (let i = 25_000; i < 40_000; i++) limiter.admit(`key_${i}`, rpm, 0);
    limiter.admit("key_0", rpm, 0);
    fake.failing = (req) => req.sequence === 5n;
    await sync.sync();
    await sync.sync();
    expect(fake.calls.map(sizes)).toEqual([
      [4n, 110n, 10_000, 10_000],
      [5n, 0n, 5_000, 5_001],
      [6n, 110n, 5_000, 5_001],
    ]);
    expect(fake.calls[2]?.newKeyIds).toEqual(fake.calls[1]?.newKeyIds as string[]);
    expect(fake.most()).toBe(1);
  });

  test("counts of keys not tracked here are left out, and track nothing", async () => {
    const second = BigInt(Math.floor(Date.now() / 1000));
    const fake = answering(() => [
      { keyId: "k", second, requests: 4n },
      { keyId: "x", second, requests: 4n },
    ]);
    const limiter = createRateLimiter();
    limiter.admit("k", rpm, 0);
    await started({ billing: fake.billing, limiter, holder: "gw", intervalMs: 60_000 }).sync();
    expect(limiter.state("k", rpm)?.requests?.remaining).toBe(5);
    expect(limiter.trackedKeys()).toEqual({ keyIds: ["k"], newKeyIds: [] });
    expect(limiter.state("x", rpm)?.requests?.remaining).toBe(10);
  });

  test("a replica whose keys have gone idle stops calling billing, and keeps its watermark for the next key it tracks", async () => {
    const fake = answering();
    const clock = { t: Date.now() };
    const limiter = createRateLimiter({ now: () => clock.t });
    limiter.admit("k", rpm, 0);
    started({ billing: fake.billing, limiter, holder: "gw", intervalMs: 20 });
    await eventually(() => fake.calls.length >= 2, { intervalMs: 20, what: "two syncs" });
    // Two minutes on, the key has been idle for one at the first prune: the sync that drops it makes no call.
    clock.t += 120_000;
    await eventually(() => limiter.size() === 0, { intervalMs: 20, what: "the idle key dropped" });
    await Bun.sleep(50);
    const made = fake.calls.length;
    const watermark = fake.watermark();
    await Bun.sleep(200);
    expect(fake.calls.length).toBe(made);
    limiter.admit("j", rpm, 0);
    await eventually(() => fake.calls.length > made, { intervalMs: 20, what: "a sync of the new key" });
    expect(fake.calls[made]).toMatchObject({ changesSince: watermark, newKeyIds: ["j"] });
  });
});

describe("through billing", () => {
  // A real billing service (Postgres included) behind an in-memory transport.
  const adminToken = "rate-sync-test-admin-token-0123";
  let db: TestDatabase;
  let billing: RateSyncOptions["billing"];
  let billingDown = false;
  // Billing takes the call, and its answer is lost on the way back.
  let answerLost = false;
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
        const answer = await client.syncRateUsage(req, { ...options, headers: { authorization: `Bearer ${adminToken}` } });
        if (answerLost) throw new ConnectError("the answer was lost", Code.DeadlineExceeded);
        return answer;
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

  test("a call whose answer was lost after billing took it counts once: the resend's counts replace its", async () => {
    const key = `key_${ulid()}`;
    const a = replica("gw-a");
    const b = replica("gw-b");
    b.limiter.admit(key, rpm, 0);
    for (let i = 0; i < 3; i++) a.limiter.admit(key, rpm, 0);
    answerLost = true;
    try {
      await a.sync.sync();
    } finally {
      answerLost = false;
    }
    a.limiter.admit(key, rpm, 0);
    await a.sync.sync();
    await b.sync.sync();
    // The first replica's 4 and the second's 1, where adding changes counted 3 + 4.
    expect(b.limiter.state(key, rpm)?.requests?.remaining).toBe(5);
  });

  test("once answered, a sync asks for what changed since its watermark, besides the keys no answer has covered whole", async () => {
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
    expect(requests[0]?.newKeyIds).toEqual([second]);
    expect(requests[0]?.changesSince).toBeGreaterThan(0n);
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
    const failed = requests.at(-1) as SyncRateUsageRequest;
    await a.sync.sync();
    expect(requests.at(-1)).toMatchObject({ newKeyIds: [], changesSince: failed.changesSince, sequence: failed.sequence + 1n });
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
