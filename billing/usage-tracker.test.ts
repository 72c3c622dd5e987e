import { describe, expect, test } from "bun:test";
import { newOrg, noLimits, useTestStore } from "./store/test-db.ts";
import type { RecordedUsage, TimeRange, UsageRecord } from "./store/types.ts";
import type { PeriodUsage } from "./store/usage.ts";
import { createUsageTracker, snapshotVisibility } from "./usage-tracker.ts";

const org = { id: "org_1", billingDay: 1 };

function fakeLoad(figures: () => { spent: bigint; snapshot: string }) {
  const calls: TimeRange[] = [];
  const keysRead: (readonly string[])[] = [];
  let release: (() => void) | undefined;
  let gate: Promise<void> | undefined;
  return {
    calls,
    keysRead,
    /** Holds the next loads until the returned function is called. */
    hold() {
      gate = new Promise((resolve) => (release = resolve));
      return () => {
        gate = undefined;
        release?.();
      };
    },
    async load(_orgId: string, period: TimeRange, keyIds: readonly string[]): Promise<PeriodUsage> {
      calls.push(period);
      keysRead.push(keyIds);
      const { spent, snapshot } = figures();
      await gate;
      return { orgSpentNanos: spent, keys: new Map([["key_1", { spentNanos: spent, tokens: 10n }]]), snapshot };
    },
  };
}

const batch = (xid: number, costNanos: bigint, day = "2026-06-15"): RecordedUsage => ({
  inserted: 1,
  duplicates: 0,
  xid: String(xid),
  added: [{ orgId: "org_1", apiKeyId: "key_1", day, costNanos, tokens: 5n }],
});

describe("snapshot visibility", () => {
  test("finished before the snapshot: below xmin, or below xmax and not in progress", () => {
    const visible = snapshotVisibility("100:105:101,103");
    expect([99n, 100n, 102n, 104n].map(visible)).toEqual([true, true, true, true]);
    expect([101n, 103n, 105n, 200n].map(visible)).toEqual([false, false, false, false]);
    expect(snapshotVisibility("7:7:")(6n)).toBe(true);
    expect(snapshotVisibility("7:7:")(7n)).toBe(false);
  });
});

describe("in memory", () => {
  test("reads once, then answers from memory and adds what this replica records", async () => {
    let now = new Date("2026-06-15T12:00:00Z");
    let figures = { spent: 1_000n, snapshot: "50:50:" };
    const source = fakeLoad(() => figures);
    const tracker = createUsageTracker({ load: source.load, clock: () => now, refreshMs: 60_000 });
    expect(await tracker.spend(org, ["key_1"])).toEqual({
      orgSpentNanos: 1_000n,
      keySpentNanos: 1_000n,
      keyTokens: 10n,
    });
    tracker.record(batch(60, 25n));
    // Already part of what was read: not added again.
    tracker.record(batch(40, 999n));
    for (let i = 0; i < 100; i++) await tracker.spend(org, ["key_1"]);
    expect(await tracker.spend(org, ["key_1"])).toEqual({
      orgSpentNanos: 1_025n,
      keySpentNanos: 1_025n,
      keyTokens: 15n,
    });
    expect(source.calls).toHaveLength(1);
    expect(source.calls[0]?.start.toISOString()).toBe("2026-06-01T00:00:00.000Z");
    // Another key is read when first asked for, alone: the org's other keys are not read.
    figures = { spent: 1_025n, snapshot: "61:61:" };
    expect(await tracker.spend(org, ["key_2"])).toEqual({ orgSpentNanos: 1_025n, keySpentNanos: 0n, keyTokens: 0n });
    expect(await tracker.spend(org, ["key_2"])).toEqual({ orgSpentNanos: 1_025n, keySpentNanos: 0n, keyTokens: 0n });
    expect(source.keysRead).toEqual([["key_1"], ["key_2"]]);
    expect(await tracker.spend(org, ["key_1"])).toMatchObject({ orgSpentNanos: 1_025n, keySpentNanos: 1_025n });
    expect(source.calls).toHaveLength(2);

    // Usage of another period, or of an org nobody asked about, is ignored.
    tracker.record(batch(61, 7n, "2026-05-31"));
    tracker.record({ ...batch(62, 7n), added: [{ ...batch(62, 7n).added[0]!, orgId: "org_other" }] });
    expect((await tracker.spend(org, ["key_1"])).orgSpentNanos).toBe(1_025n);

    now = new Date("2026-07-01T00:00:00Z");
    await tracker.spend(org, ["key_1"]);
    expect(source.calls).toHaveLength(3);
    expect(source.calls[2]?.start.toISOString()).toBe("2026-07-01T00:00:00.000Z");
  });

  test("a key's spend and tokens add up the keys of its lineage", async () => {
    const keys = new Map([
      ["key_old", { spentNanos: 700n, tokens: 70n }],
      ["key_1", { spentNanos: 300n, tokens: 30n }],
      ["key_other", { spentNanos: 5n, tokens: 1n }],
    ]);
    const load = async () => ({ orgSpentNanos: 1_005n, keys, snapshot: "50:50:" });
    const tracker = createUsageTracker({ load, clock: () => new Date("2026-06-15T12:00:00Z") });
    expect(await tracker.spend(org, ["key_old", "key_1"])).toEqual({
      orgSpentNanos: 1_005n,
      keySpentNanos: 1_000n,
      keyTokens: 100n,
    });
    tracker.record(batch(60, 25n));
    expect(await tracker.spend(org, ["key_old", "key_1"])).toMatchObject({ keySpentNanos: 1_025n, keyTokens: 105n });
  });

  test("the period follows the org's billing day", async () => {
    let now = new Date("2026-06-14T23:59:59Z");
    const source = fakeLoad(() => ({ spent: 0n, snapshot: "1:1:" }));
    const tracker = createUsageTracker({ load: source.load, clock: () => now });
    await tracker.spend({ id: "org_1", billingDay: 15 }, ["key_1"]);
    now = new Date("2026-06-15T00:00:00Z");
    await tracker.spend({ id: "org_1", billingDay: 15 }, ["key_1"]);
    expect(source.calls.map((p) => p.start.toISOString())).toEqual([
      "2026-05-15T00:00:00.000Z",
      "2026-06-15T00:00:00.000Z",
    ]);
  });

  test("usage committed while a read runs counts once, whether or not the read saw it", async () => {
    const now = new Date("2026-06-15T12:00:00Z");
    let snapshot = "100:100:";
    const source = fakeLoad(() => ({ spent: 500n, snapshot }));
    const tracker = createUsageTracker({ load: source.load, clock: () => now });
    const release = source.hold();
    const first = tracker.spend(org, ["key_1"]);
    tracker.record(batch(99, 11n)); // committed before the read's snapshot: already in 500
    tracker.record(batch(100, 22n)); // after it
    release();
    expect((await first).orgSpentNanos).toBe(522n);

    // A refresh of stale figures that runs while more usage commits: callers wait for it, and share it.
    let clock = now.getTime();
    const refreshing = createUsageTracker({ load: source.load, clock: () => new Date(clock), refreshMs: 10 });
    snapshot = "200:200:";
    await refreshing.spend(org, ["key_1"]);
    clock += 10;
    snapshot = "300:302:301";
    const hold = source.hold();
    const reads = source.calls.length;
    const stale = [refreshing.spend(org, ["key_1"]), refreshing.spend(org, ["key_1"])];
    refreshing.record(batch(250, 1n)); // in the coming read
    refreshing.record(batch(301, 2n)); // in progress at the read
    hold();
    // The read counted 500 including xid 250, plus 301 which it could not see.
    expect((await Promise.all(stale)).map((s) => s.orgSpentNanos)).toEqual([502n, 502n]);
    expect(source.calls.length).toBe(reads + 1);
  });

  test("a read shared by callers is cancelled once all of them have left, and the next caller reads again", async () => {
    const now = new Date("2026-06-15T12:00:00Z");
    const signals: AbortSignal[] = [];
    let answer: (() => void) | undefined;
    const tracker = createUsageTracker({
      clock: () => now,
      load: (_orgId, _period, _keyIds, signal) => {
        signals.push(signal);
        // Behind a lock: it answers when let through, or fails once cancelled.
        return new Promise((resolve, reject) => {
          answer = () => resolve({ orgSpentNanos: 7n, keys: new Map(), snapshot: "10:10:" });
          signal.addEventListener("abort", () => reject(signal.reason), { once: true });
        });
      },
    });
    const [a, b] = [new AbortController(), new AbortController()];
    const asked = [tracker.spend(org, ["key_1"], a.signal), tracker.spend(org, ["key_1"], b.signal)];
    asked.forEach((p) => p.catch(() => {}));
    a.abort(new Error("deadline"));
    expect(signals.map((s) => s.aborted)).toEqual([false]);
    b.abort(new Error("deadline"));
    expect(signals.map((s) => s.aborted)).toEqual([true]);
    await expect(asked[1]).rejects.toThrow("deadline");

    // A caller with no signal of its own never leaves.
    const next = tracker.spend(org, ["key_1"]);
    expect(signals.length).toBe(2);
    answer?.();
    expect((await next).orgSpentNanos).toBe(7n);
  });

  test("a key lineage is read alone when first asked for; usage committed meanwhile counts once in each", async () => {
    let clock = Date.parse("2026-06-15T12:00:00Z");
    // The database: what each committed xid added, per key.
    const committed: { xid: number; key: string; cost: bigint }[] = [{ xid: 10, key: "key_a", cost: 100n }];
    const reads: (readonly string[])[] = [];
    const gates: (() => void)[] = [];
    const tracker = createUsageTracker({
      clock: () => new Date(clock),
      refreshMs: 1_000,
      load: async (_orgId, _period, keyIds) => {
        reads.push(keyIds);
        // The snapshot is taken as the read starts, and answered once the test lets it through.
        const seen = committed.filter((c) => c.xid < 1_000);
        const xmax = Math.max(...committed.map((c) => c.xid)) + 1;
        await new Promise<void>((resolve) => gates.push(resolve));
        const keys = new Map<string, { spentNanos: bigint; tokens: bigint }>();
        for (const c of seen.filter((c) => keyIds.includes(c.key))) {
          const key = keys.get(c.key) ?? { spentNanos: 0n, tokens: 0n };
          keys.set(c.key, { spentNanos: key.spentNanos + c.cost, tokens: key.tokens + 1n });
        }
        return { orgSpentNanos: seen.reduce((sum, c) => sum + c.cost, 0n), keys, snapshot: `${xmax}:${xmax}:` };
      },
    });
    const commit = (xid: number, key: string, cost: bigint) => {
      committed.push({ xid, key, cost });
      tracker.record({
        inserted: 1,
        duplicates: 0,
        xid: String(xid),
        added: [{ orgId: "org_1", apiKeyId: key, day: "2026-06-15", costNanos: cost, tokens: 1n }],
      });
    };
    const a = tracker.spend(org, ["key_a"]);
    const b = tracker.spend(org, ["key_b_old", "key_b"]);
    const b2 = tracker.spend(org, ["key_b_old", "key_b"]);
    expect(reads).toEqual([["key_a"], ["key_b_old", "key_b"]]);
    commit(11, "key_b", 20n);
    commit(12, "key_a", 3n);
    gates.shift()?.();
    expect(await a).toEqual({ orgSpentNanos: 123n, keySpentNanos: 103n, keyTokens: 2n });
    commit(13, "key_b_old", 5n);
    gates.shift()?.();
    expect(await b).toEqual({ orgSpentNanos: 128n, keySpentNanos: 25n, keyTokens: 2n });
    expect(await b2).toEqual(await b);
    // From memory until a second old, whichever key asks.
    expect(await tracker.spend(org, ["key_a"])).toEqual({ orgSpentNanos: 128n, keySpentNanos: 103n, keyTokens: 2n });
    expect(reads).toHaveLength(2);
    clock += 1_000;
    const again = tracker.spend(org, ["key_a"]);
    gates.shift()?.();
    expect(await again).toEqual({ orgSpentNanos: 128n, keySpentNanos: 103n, keyTokens: 2n });
    expect(reads).toHaveLength(3);
  });

  test("a failed read, first or of stale figures, fails the call and is retried on the next", async () => {
    let fail = true;
    let clock = Date.parse("2026-06-15T12:00:00Z");
    const tracker = createUsageTracker({
      load: async () => {
        if (fail) throw new Error("postgres is down");
        return { orgSpentNanos: 7n, keys: new Map(), snapshot: "1:1:" };
      },
      clock: () => new Date(clock),
      refreshMs: 10,
    });
    await expect(tracker.spend(org, ["key_1"])).rejects.toThrow("postgres is down");
    fail = false;
    expect((await tracker.spend(org, ["key_1"])).orgSpentNanos).toBe(7n);
    fail = true;
    clock += 9;
    expect((await tracker.spend(org, ["key_1"])).orgSpentNanos).toBe(7n);
    clock += 1;
    await expect(tracker.spend(org, ["key_1"])).rejects.toThrow("postgres is down");
    fail = false;
    expect((await tracker.spend(org, ["key_1"])).orgSpentNanos).toBe(7n);
  });
});

describe("over Postgres", () => {
  const fixture = useTestStore();

  /** A request of 3 input and 4 output tokens. */
  const usage = (
    requestId: string,
    orgId: string,
    apiKeyId: string,
    costNanos: bigint,
    occurredAt: Date,
  ): UsageRecord => ({
    requestId,
    orgId,
    projectId: null,
    apiKeyId,
    model: "mock",
    provider: "mock",
    endpoint: "chat_completions",
    inputTokens: 3n,
    cachedInputTokens: 0n,
    outputTokens: 4n,
    reasoningTokens: 0n,
    costNanos,
    occurredAt,
    costBreakdown: null,
  });

  test("matches the database while batches commit concurrently with reads", async () => {
    const { store } = fixture;
    const created = await newOrg(store, "tracked");
    const { apiKey } = await store.createApiKey({ orgId: created.id, projectId: null, name: "", limits: noLimits });
    const now = new Date("2026-06-15T12:00:00Z");
    let clock = now.getTime();
    let loads = 0;
    const tracker = createUsageTracker({
      load: (orgId, period, keyIds) => {
        loads++;
        return store.periodUsage(orgId, period, keyIds);
      },
      clock: () => new Date(clock),
      refreshMs: 5,
    });
    let n = 0;
    const record = (costNanos: bigint) => usage(`req_tracked_${++n}`, created.id, apiKey.id, costNanos, now);
    // Writers and readers interleave; the clock moves so that refreshes keep racing the writes.
    const writers = Array.from({ length: 4 }, async (_, w) => {
      for (let i = 0; i < 10; i++) {
        tracker.record(await store.recordUsage([record(BigInt(w + 1)), record(100n)]));
      }
    });
    const readers = (async () => {
      for (let i = 0; i < 40; i++) {
        clock += 5;
        await tracker.spend(created, [apiKey.id]);
        await Bun.sleep(0);
      }
    })();
    await Promise.all([...writers, readers]);
    await Bun.sleep(20);
    const june = { start: new Date("2026-06-01"), end: new Date("2026-07-01") };
    const truth = await store.periodUsage(created.id, june, [apiKey.id]);
    const spend = await tracker.spend(created, [apiKey.id]);
    expect(truth.orgSpentNanos).toBe(10n * (1n + 2n + 3n + 4n) + 40n * 100n);
    expect(spend).toEqual({ orgSpentNanos: truth.orgSpentNanos, keySpentNanos: truth.orgSpentNanos, keyTokens: 560n });
    expect(loads).toBeGreaterThan(1);
  }, 60_000);

  test("forgets the figures of keys no longer asked about, so memory follows the keys in use, not the period's", async () => {
    const { store } = fixture;
    const created = await newOrg(store, "many keys");
    const { apiKey } = await store.createApiKey({ orgId: created.id, projectId: null, name: "", limits: noLimits });
    await store.recordUsage([usage("req_many_keys", created.id, apiKey.id, 42n, new Date("2026-06-15T11:00:00Z"))]);
    let clock = Date.parse("2026-06-15T12:00:00Z");
    const tracker = createUsageTracker({
      load: (orgId, period, keyIds) => store.periodUsage(orgId, period, keyIds),
      clock: () => new Date(clock),
    });
    const figures = { orgSpentNanos: 42n, keySpentNanos: 42n, keyTokens: 7n };
    const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));
    // A platform issuing a key per end user: each of them checked once, a second apart, over half an hour.
    for (let i = 0; i < 2_000; i++) {
      clock += 1_000;
      await tracker.spend(created, [`key_end_user_${i}`]);
    }
    await nextTask();
    // Those asked within the last sweep's interval (10 s) or since.
    expect(tracker.held().keys).toBeLessThan(25);
    expect(await tracker.spend(created, [apiKey.id])).toEqual(figures);
    clock += 60_000;
    await tracker.spend({ id: "org_other", billingDay: 1 }, ["key_other"]);
    await nextTask();
    expect(tracker.held()).toEqual({ orgs: 1, keys: 1 });
    // A key forgotten is read again when next asked.
    expect(await tracker.spend(created, [apiKey.id])).toEqual(figures);
  }, 60_000);
});
