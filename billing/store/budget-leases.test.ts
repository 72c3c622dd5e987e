import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { billingPeriod, utcDate } from "../period.ts";
import { defaultAbandonedLeaseGraceMs } from "./budget-leases.ts";
import { isDatabaseUnavailable } from "../errors.ts";
import { BillingError, callSignal, createDb, createPool } from "./db.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import { createTestDatabase, noLimits, type TestDatabase } from "./test-db.ts";
import type { BudgetLeaseRequest, KeyLimits } from "./types.ts";

let db: TestDatabase;
let store: BillingStore;
beforeAll(async () => {
  db = await createTestDatabase();
  // The database's clock cannot be moved: these tests' leases live by the time each call is made at.
  store = createBillingStore(db.pool, { clock: () => leaseClock });
}, 60_000);
afterAll(() => db.drop());

const now = new Date("2026-06-15T12:00:00Z");
/** The time the store's leases live by, set by each call below to the `now` it is made at. */
let leaseClock = now;
const limits = (monthlyBudgetNanos: bigint): KeyLimits => ({ ...noLimits, monthlyBudgetNanos });

let orgs = 0;
const newOrg = (monthlyBudgetNanos: bigint) =>
  store.createOrganization({ name: `lease-org-${++orgs}`, taxRateBps: 0, billingDay: 1, monthlyBudgetNanos, maxDiscountBps: 0 });

let spends = 0;
/** One request of `costNanos` for the org (and key) as analytics records it; drawn from `leaseId` when given. */
const spendRecord = (orgId: string, costNanos: bigint, apiKeyId: string | null = null, leaseId?: string | null) => ({
  requestId: `req_spend_${++spends}`,
  orgId,
  projectId: null,
  apiKeyId,
  model: "mock",
  provider: "mock",
  endpoint: "chat_completions" as const,
  inputTokens: 1n,
  cachedInputTokens: 0n,
  outputTokens: 1n,
  reasoningTokens: 0n,
  costNanos,
  occurredAt: now,
  costBreakdown: null,
  budgetCharges: leaseId ? [{ leaseId, nanos: costNanos }] : [],
});
/** Records one request, as analytics would; a gateway's usage names the lease it spent from. */
const recordSpend = (...args: Parameters<typeof spendRecord>) => store.recordUsage([spendRecord(...args)]);

const acquire = (scopeId: string, requestedNanos: bigint, extra: Partial<BudgetLeaseRequest> = {}) => {
  leaseClock = extra.now ?? now;
  return store.acquireBudgetLease({
    scope: "organization",
    scopeId,
    holder: "gw-1",
    requestedNanos,
    neededNanos: 0n,
    ttlSeconds: 60,
    now,
    ...extra,
  });
};
const release = (leaseId: string, spentNanos: bigint, at = now) => {
  leaseClock = at;
  return store.releaseBudgetLease({ leaseId, spentNanos });
};
const openAt = (at: Date) => {
  leaseClock = at;
  return store.openBudgetLeases();
};

test("grants never exceed what is left, and releases return the unspent part", async () => {
  const org = await newOrg(1000n);
  const first = await acquire(org.id, 600n);
  // Other holders' live leases: none yet.
  expect(first).toMatchObject({ grantedNanos: 600n, remainingNanos: 400n, leasedNanos: 0n });
  expect(first.leaseId).toStartWith("lease_");
  expect(first.expiresAt).toEqual(new Date(now.getTime() + 60_000));

  expect(await acquire(org.id, 600n, { holder: "gw-2" })).toMatchObject({
    grantedNanos: 400n,
    remainingNanos: 0n,
    leasedNanos: 600n,
  });
  // Nothing left, all of it held by live leases: their holders give back what they do not spend.
  expect(await acquire(org.id, 1n, { holder: "gw-3" })).toEqual({
    leaseId: null,
    grantedNanos: 0n,
    expiresAt: new Date(now.getTime() + 60_000),
    remainingNanos: 0n,
    leasedNanos: 1000n,
  });

  await release(first.leaseId as string, 100n);
  // Releasing again is a no-op: the first settlement stands.
  await release(first.leaseId as string, 0n);
  expect(await acquire(org.id, 1000n, { holder: "gw-3" })).toMatchObject({
    grantedNanos: 500n,
    remainingNanos: 0n,
    leasedNanos: 400n,
  });

  const missing = await release("lease_missing", 0n).catch((e) => e);
  expect((missing as BillingError).kind).toBe("not_found");
});

test("an ask naming a lease already granted answers with that grant, and grants nothing more", async () => {
  const org = await newOrg(1000n);
  const leaseId = "lease_01JRETRYRETRYRETRYRETRY0001";
  const first = await acquire(org.id, 600n, { leaseId });
  expect(first).toMatchObject({ leaseId, grantedNanos: 600n, remainingNanos: 400n });
  // Its answer was lost; asked again, later, for what the gateway would ask now: the same lease as it was granted.
  const later = new Date(now.getTime() + 5_000);
  const again = await acquire(org.id, 900n, { leaseId, now: later, ttlSeconds: 3600, neededNanos: 900n });
  expect(again).toEqual({ ...first, repeated: true });
  const leases = await db.pool.query("SELECT granted_nanos FROM budget_leases WHERE org_id = $1", [org.id]);
  expect(leases.rows).toEqual([{ granted_nanos: "600" }]);
  // The other 400 are still there for anyone: the lease is counted once.
  expect(await acquire(org.id, 1000n, { holder: "gw-2" })).toMatchObject({ grantedNanos: 400n, leasedNanos: 600n });
  expect(await acquire(org.id, 1n, { leaseId, now: later })).toMatchObject({ grantedNanos: 600n, remainingNanos: 0n });
  // Its key's revocation or its org's suspension since does not hide it: its holder gives it back.
  await store.setOrganizationSuspended(org.id, "");
  expect(await acquire(org.id, 1n, { leaseId })).toMatchObject({ leaseId, grantedNanos: 600n });

  // An id of another scope's or holder's lease, or of a released one, is not answered with it.
  const other = await newOrg(1000n);
  const kind = (p: Promise<unknown>) => p.then(() => "granted", (e: BillingError) => e.kind);
  expect(await kind(acquire(other.id, 10n, { leaseId }))).toBe("invalid_argument");
  expect(await kind(acquire(org.id, 10n, { leaseId, holder: "gw-2" }))).toBe("invalid_argument");
  await release(leaseId, 0n);
  expect(await kind(acquire(org.id, 10n, { leaseId }))).toBe("invalid_argument");

  // An ask that got nothing leaves its id free: asked again once there is budget, it is granted.
  const spent = await newOrg(100n);
  await acquire(spent.id, 100n);
  const waiting = "lease_01JRETRYRETRYRETRYRETRY0002";
  expect(await acquire(spent.id, 50n, { leaseId: waiting, holder: "gw-2" })).toMatchObject({ leaseId: null });
});

test("asks of one new lease id at once grant it once", async () => {
  const org = await newOrg(1000n);
  const leaseId = "lease_01JRETRYRETRYRETRYRETRY0003";
  const grants = await Promise.all([1, 2, 3, 4].map(() => acquire(org.id, 300n, { leaseId })));
  for (const grant of grants) expect(grant).toMatchObject({ leaseId, grantedNanos: 300n });
  expect((await acquire(org.id, 1000n, { holder: "gw-2" })).grantedNanos).toBe(700n);
});

test("abandoned leases return to the pool after the grace window; recorded usage counts against the budget", async () => {
  const org = await newOrg(1000n);
  await acquire(org.id, 1000n, { ttlSeconds: 30 });
  expect((await acquire(org.id, 1n)).grantedNanos).toBe(0n);
  // Expired without a release: its holder may have served requests whose usage is not recorded yet.
  const expired = new Date(now.getTime() + 30_000);
  // It still reserves its grant, but no live lease holds any: nothing comes back before the grace ends.
  expect(await acquire(org.id, 1n, { now: expired })).toMatchObject({ grantedNanos: 0n, leasedNanos: 0n });
  expect(await openAt(expired)).toMatchObject({ abandoned: 1 });
  const afterGrace = new Date(expired.getTime() + defaultAbandonedLeaseGraceMs);
  expect(await acquire(org.id, 2000n, { now: afterGrace })).toMatchObject({ grantedNanos: 1000n, remainingNanos: 0n });

  const fresh = await newOrg(1000n);
  await recordSpend(fresh.id, 300n);
  expect(await acquire(fresh.id, 1000n)).toMatchObject({ grantedNanos: 700n, remainingNanos: 0n });
  // Last month's usage and leases do not count in this period.
  const nextMonth = new Date("2026-07-01T00:00:00Z");
  expect(await acquire(fresh.id, 1000n, { now: nextMonth })).toMatchObject({ grantedNanos: 1000n });
});

test("concurrent grants together never exceed the budget", async () => {
  const org = await newOrg(1000n);
  const grants = await Promise.all(Array.from({ length: 25 }, (_, i) => acquire(org.id, 70n, { holder: `gw-${i}` })));
  const total = grants.reduce((sum, g) => sum + g.grantedNanos, 0n);
  expect(total).toBe(1000n);
  expect(grants.filter((g) => g.grantedNanos === 70n)).toHaveLength(14);
});

test("rotations of one key at once make one successor, and grants racing them keep to the lineage's budget", async () => {
  const org = await newOrg(0n);
  const first = (await store.createApiKey({ orgId: org.id, projectId: null, name: "svc", limits: limits(1000n) })).apiKey;
  const ask = (apiKeyId: string, holder: string) =>
    acquire(apiKeyId, 70n, { scope: "api_key", holder }).then(
      (grant) => grant.grantedNanos,
      (e: unknown) => (e as BillingError).kind,
    );
  const before = Array.from({ length: 20 }, (_, i) => ask(first.id, `gw-${i}`));
  const rotations = await Promise.allSettled(Array.from({ length: 5 }, () => store.rotateApiKey(first.id)));
  const successor = rotations.flatMap((r) => (r.status === "fulfilled" ? [r.value.apiKey] : []));
  expect(successor).toHaveLength(1);
  const successorId = successor[0]!.id;
  for (const r of rotations.filter((r) => r.status === "rejected")) {
    expect(r.reason).toMatchObject({ kind: "failed_precondition" });
    expect((r.reason as BillingError).message).toContain(`rotated into ${successorId}`);
  }
  const after = Array.from({ length: 20 }, (_, i) => ask(successorId, `gw-${20 + i}`));
  const outcomes = await Promise.all([...before, ...after]);
  // Grants on the old key that waited for the rotation are refused; together the two keys grant the budget once.
  for (const outcome of outcomes) expect(typeof outcome === "bigint" || outcome === "failed_precondition").toBe(true);
  const granted = outcomes.reduce<bigint>((sum, o) => sum + (typeof o === "bigint" ? o : 0n), 0n);
  expect(granted).toBe(1000n);
  const lineage = await db.pool.query<{ active: number }>(
    "SELECT count(*) FILTER (WHERE revoked_at IS NULL)::int AS active FROM api_keys WHERE lineage_id = $1",
    [first.id],
  );
  expect(lineage.rows[0]?.active).toBe(1);
});

test("concurrent grants keep to the budget, and usage is recorded, whatever the database's default isolation", async () => {
  const database = new URL(db.connectionString).pathname.slice(1);
  for (const level of ["repeatable read", "serializable"]) {
    await db.pool.query(`ALTER DATABASE ${database} SET default_transaction_isolation = '${level}'`);
    // New connections take the database's default; the store's pool sets its own.
    const pool = createPool({ connectionString: db.connectionString, max: 10 });
    try {
      const isolated = createBillingStore(pool);
      const org = await newOrg(1000n);
      const grants = await Promise.all(
        Array.from({ length: 25 }, (_, i) =>
          isolated.acquireBudgetLease({ scope: "organization", scopeId: org.id, holder: `gw-${i}`, requestedNanos: 70n,
            neededNanos: 0n, ttlSeconds: 60, now }),
        ),
      );
      expect([level, grants.reduce((sum, g) => sum + g.grantedNanos, 0n)]).toEqual([level, 1000n]);
      // Batches of two analytics replicas adding to the same summaries and leases at once.
      const leaseIds = grants.flatMap((g) => (g.leaseId ? [g.leaseId] : []));
      const batches = Array.from({ length: 8 }, (_, b) =>
        leaseIds.map((leaseId, i) => ({ ...spendRecord(org.id, 1n, null, leaseId), requestId: `req_${level}${b}_${i}` })),
      );
      await Promise.all(batches.map((batch) => isolated.recordUsage(batch)));
    } finally {
      await pool.end();
      await db.pool.query(`ALTER DATABASE ${database} RESET default_transaction_isolation`);
    }
  }
});

test("key scope: per-key budget, unlimited keys, revoked keys", async () => {
  const org = await newOrg(0n);
  const { apiKey } = await store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: limits(50n) });
  const keyLease = (requestedNanos: bigint) => acquire(apiKey.id, requestedNanos, { scope: "api_key" });
  expect(await keyLease(80n)).toMatchObject({ grantedNanos: 50n, remainingNanos: 0n });

  // An org without a budget grants what is asked and reports no remaining figure.
  expect(await acquire(org.id, 5_000n)).toMatchObject({ grantedNanos: 5_000n, remainingNanos: null });

  await store.revokeApiKey(apiKey.id);
  const revoked = await keyLease(1n).catch((e) => e);
  expect((revoked as BillingError).kind).toBe("failed_precondition");
  const unknown = await acquire("key_missing", 1n, { scope: "api_key" }).catch((e) => e);
  expect((unknown as BillingError).kind).toBe("not_found");
});

test("a key's monthly tokens are leased in tokens: its lineage's input + output tokens count, and its money does not", async () => {
  const org = await newOrg(0n);
  const tokenLimits = { ...limits(1_000_000n), monthlyTokens: 1000n };
  const first = (await store.createApiKey({ orgId: org.id, projectId: null, name: "t", limits: tokenLimits })).apiKey;
  const tokenLease = (keyId: string, requested: bigint, extra: Partial<BudgetLeaseRequest> = {}) =>
    acquire(keyId, requested, { scope: "api_key_tokens", ...extra });
  /** A request of 40 input + 60 output tokens costing 5,000 nano-USD, its tokens drawn from `leaseId`. */
  const tokenRecord = (apiKeyId: string, leaseId?: string | null) => ({
    ...spendRecord(org.id, 5_000n, apiKeyId),
    inputTokens: 40n,
    outputTokens: 60n,
    budgetCharges: leaseId ? [{ leaseId, nanos: 100n }] : [],
  });

  // Usage recorded without a lease (before the limit was set) counts at its tokens, not its cost.
  await store.recordUsage([tokenRecord(first.id)]);
  const lease = await tokenLease(first.id, 400n);
  expect(lease).toMatchObject({ grantedNanos: 400n, remainingNanos: 500n });
  // The holder served three requests from it; one's usage is recorded, the release reports all three.
  await store.recordUsage([tokenRecord(first.id, lease.leaseId)]);
  await release(lease.leaseId as string, 300n);
  // 1000 - 100 before - 300 released (100 of it recorded): each token counted once.
  const second = (await store.rotateApiKey(first.id)).apiKey;
  expect(await tokenLease(second.id, 10_000n, { holder: "gw-2" })).toMatchObject({
    grantedNanos: 600n,
    remainingNanos: 0n,
  });
  // The key's money budget is another scope: its tokens' leases hold none of it, and its usage counts at its cost.
  expect(await acquire(second.id, 10n ** 7n, { scope: "api_key" })).toMatchObject({ grantedNanos: 990_000n });
  // A holder keeps at most half of what is left plus BUDGET_LEASE_HOLDER_FLOOR_TOKENS (10,000 by default).
  const bigLimits = { ...tokenLimits, monthlyTokens: 100_000n };
  const big = (await store.createApiKey({ orgId: org.id, projectId: null, name: "b", limits: bigLimits })).apiKey;
  expect(await tokenLease(big.id, 100_000n)).toMatchObject({ grantedNanos: 60_000n, remainingNanos: 40_000n });
  // A key without monthly tokens grants what is asked, and reports no remaining figure.
  const unlimited = (await store.createApiKey({ orgId: org.id, projectId: null, name: "u", limits: limits(0n) }))
    .apiKey;
  expect(await tokenLease(unlimited.id, 5n)).toMatchObject({ grantedNanos: 5n, remainingNanos: null });
});

test("a suspended org and its keys are granted nothing until it is reinstated", async () => {
  const org = await newOrg(1_000n);
  const { apiKey } = await store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: limits(500n) });
  await store.setOrganizationSuspended(org.id, "");
  // One at a time: a second ask refused while the first is awaited would be a rejection no one handles yet.
  for (const refused of [() => acquire(org.id, 10n), () => acquire(apiKey.id, 10n, { scope: "api_key" })]) {
    const e = await refused().catch((err) => err);
    expect(e).toBeInstanceOf(BillingError);
    expect(e).toMatchObject({ kind: "permission_denied", message: `organization ${org.id} is suspended` });
  }
  await store.setOrganizationSuspended(org.id, null);
  expect(await acquire(org.id, 10n)).toMatchObject({ grantedNanos: 10n });
  expect(await acquire(apiKey.id, 10n, { scope: "api_key" })).toMatchObject({ grantedNanos: 10n });
});

test("a rotated key's budget counts what the keys it replaced spent and still hold, through chains of rotations", async () => {
  const org = await newOrg(0n);
  const first = (await store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: limits(1000n) })).apiKey;
  const keyLease = (keyId: string, requestedNanos: bigint, extra: Partial<BudgetLeaseRequest> = {}) =>
    acquire(keyId, requestedNanos, { scope: "api_key", ...extra });

  // The first key spends 250 (released; its usage is still on its way, 200 recorded so far) and holds 200 more.
  const spent = await keyLease(first.id, 300n);
  await release(spent.leaseId as string, 250n);
  await recordSpend(org.id, 200n, first.id, spent.leaseId);
  const held = await keyLease(first.id, 200n);
  expect(held.grantedNanos).toBe(200n);

  const second = (await store.rotateApiKey(first.id)).apiKey;
  expect(second.rotatedFromId).toBe(first.id);
  // 1000 - 250 spent - 200 still leased to a gateway that may be spending it.
  expect(await keyLease(second.id, 100n)).toMatchObject({ grantedNanos: 100n, remainingNanos: 450n });
  await recordSpend(org.id, 100n, second.id);

  const third = (await store.rotateApiKey(second.id)).apiKey;
  expect(third.rotatedFromId).toBe(second.id);
  // 1000 - 250 and 200 of the first key - 100 spent and 100 leased of the second.
  const last = await keyLease(third.id, 10_000n);
  expect(last).toMatchObject({ grantedNanos: 350n, remainingNanos: 0n });
  // The first key's gateway gives back what it did not spend: 50 of its 200.
  await release(held.leaseId as string, 150n);
  expect(await keyLease(third.id, 10_000n)).toMatchObject({ grantedNanos: 50n, remainingNanos: 0n });

  // Other keys of the org keep their own budgets, and a new period starts afresh.
  const other = (await store.createApiKey({ orgId: org.id, projectId: null, name: "o", limits: limits(1000n) })).apiKey;
  expect(await keyLease(other.id, 10_000n)).toMatchObject({ grantedNanos: 1000n });
  const july = new Date("2026-07-01T00:00:00Z");
  expect(await keyLease(third.id, 10_000n, { now: july })).toMatchObject({ grantedNanos: 1000n });
});

test("an org's grant counts exactly its keys' usage: late, resent, at period edges, across billing days", async () => {
  const budget = 10n ** 12n;
  const org = await newOrg(budget);
  const projects = await Promise.all(["a", "b"].map((name) => store.createProject({ orgId: org.id, name })));
  const key = async (projectId: string | null) =>
    (await store.createApiKey({ orgId: org.id, projectId, name: "k", limits: limits(0n) })).apiKey;
  const keys = [await key(projects[0]!.id), await key(projects[1]!.id), await key(null)];
  keys.push((await store.rotateApiKey(keys[0]!.id)).apiKey);
  let n = 0;
  const at = (iso: string, cost: bigint, k: number | null = n % keys.length) => ({
    ...spendRecord(org.id, cost, k === null ? null : keys[k]!.id),
    projectId: k === null ? null : keys[k]!.projectId,
    occurredAt: new Date(iso),
    costNanos: cost + BigInt(++n),
  });
  const edges = ["2026-05-31T23:59:59.999Z", "2026-06-01T00:00:00Z", "2026-06-02T23:59:59Z", "2026-06-15T12:00:00Z",
    "2026-06-28T00:00:00Z", "2026-06-30T23:59:59.999Z", "2026-07-01T00:00:00Z", "2026-07-03T00:00:00Z"];
  const first = edges.flatMap((iso) => [at(iso, 1_000n), at(iso, 20_000n), at(iso, 300n, null)]);
  await store.recordUsage(first);
  // Resent, alone and within a larger batch; then late usage of earlier days, batches committing concurrently.
  await store.recordUsage(first.slice(0, 5));
  await store.recordUsage([...first.slice(3, 9), at("2026-06-15T13:00:00Z", 7n)]);
  await Promise.all(
    Array.from({ length: 6 }, (_, i) =>
      store.recordUsage(edges.map((iso, j) => at(iso.replace(/T.*/, `T0${i}:00:00Z`), BigInt(j * 100))).reverse()),
    ),
  );

  const days = await db.pool.query<{ org: string; summed: string }>(
    `SELECT d.cost_nanos::text AS org, (SELECT sum(cost_nanos) FROM usage_summaries s
       WHERE s.org_id = d.org_id AND s.day = d.day)::text AS summed
     FROM usage_org_days d WHERE org_id = $1`,
    [org.id],
  );
  expect(days.rows.length).toBe(8);
  for (const day of days.rows) expect(day.org).toBe(day.summed);
  for (const billingDay of [1, 2, 15, 28, 3]) {
    await db.pool.query("UPDATE organizations SET billing_day = $2 WHERE id = $1", [org.id, billingDay]);
    const period = billingPeriod(now, billingDay);
    const summed = await db.pool.query<{ cost: string }>(
      `SELECT coalesce(sum(cost_nanos), 0)::text AS cost FROM usage_summaries
       WHERE org_id = $1 AND day >= $2::date AND day < $3::date`,
      [org.id, utcDate(period.start), utcDate(period.end)],
    );
    const lease = await acquire(org.id, 1n, { holder: `gw-day-${billingDay}` });
    expect(lease.remainingNanos).toBe(budget - BigInt(summed.rows[0]!.cost) - 1n);
    await release(lease.leaseId as string, 0n);
  }
});

test("an org's grant reads none of its keys' daily summaries", async () => {
  const org = await newOrg(1000n);
  await recordSpend(org.id, 300n);
  const client = await db.pool.connect();
  try {
    await client.query("BEGIN");
    await client.query("LOCK TABLE usage_summaries IN ACCESS EXCLUSIVE MODE");
    const granting = acquire(org.id, 100n);
    const answer = await Promise.race([granting, Bun.sleep(2_000).then(() => "held up behind usage_summaries")]);
    await client.query("ROLLBACK");
    await granting;
    expect(answer).toMatchObject({ grantedNanos: 100n, remainingNanos: 600n });
  } finally {
    client.release();
  }
});

test("released spend counts until its usage is recorded; a late release of an expired lease still counts", async () => {
  const org = await newOrg(1000n);
  const leases = await Promise.all([100n, 200n, 300n].map((n) => acquire(org.id, n)));
  await Promise.all(
    leases.map((l, i) => release(l.leaseId as string, BigInt(i * 10))),
  );
  const expiring = await acquire(org.id, 400n, { ttlSeconds: 1 });
  const later = new Date(now.getTime() + 2_000 + defaultAbandonedLeaseGraceMs);
  // Abandoned past the grace window: its grant is back in the pool.
  expect(await acquire(org.id, 1000n, { now: later, ttlSeconds: 1 })).toMatchObject({ grantedNanos: 970n });
  // Its holder reports what it spent after all.
  await release(expiring.leaseId as string, 250n, later);
  const afterAll = new Date(later.getTime() + 2_000 + defaultAbandonedLeaseGraceMs);
  expect(await acquire(org.id, 1000n, { now: afterAll })).toMatchObject({ grantedNanos: 720n, remainingNanos: 0n });
});

test("a dead gateway's lease keeps its grant reserved until its resent usage is recorded", async () => {
  const org = await newOrg(1000n);
  const dead = await acquire(org.id, 600n, { ttlSeconds: 10, holder: "gw-dead" });
  expect(dead.grantedNanos).toBe(600n);
  // The holder spent 500 of it and died; its lease expires unreleased.
  const expired = new Date(now.getTime() + 11_000);
  // Another gateway gets only what the dead lease did not hold.
  expect(await acquire(org.id, 1000n, { now: expired, holder: "gw-2" })).toMatchObject({ grantedNanos: 400n });
  // The dead gateway comes back and resends its spool: 500 recorded.
  await recordSpend(org.id, 500n);
  // Past the grace window only the recorded 500 and gw-2's active 400 count: 100 is left, never 600.
  const afterGrace = new Date(expired.getTime() + defaultAbandonedLeaseGraceMs);
  expect(await acquire(org.id, 1000n, { now: afterGrace, holder: "gw-3", ttlSeconds: 3600 })).toMatchObject({
    grantedNanos: 100n,
  });
});

test("a lease that lives on into the next period counts against it until released, then settles there", async () => {
  const org = await newOrg(1000n);
  const lastMinute = new Date("2026-06-30T23:59:00Z");
  const early = await acquire(org.id, 300n, { now: new Date("2026-06-30T23:40:00Z"), ttlSeconds: 60 });
  await release(early.leaseId as string, 300n, lastMinute);
  // Abandoned, but over more than 10 minutes before July (as a gateway's clock may run ahead): June's alone.
  await acquire(org.id, 100n, { now: new Date("2026-06-30T23:49:00Z"), ttlSeconds: 30, holder: "gw-gone" });
  const late = await acquire(org.id, 1000n, { now: lastMinute, ttlSeconds: 900, holder: "gw-a" });
  expect(late).toMatchObject({ grantedNanos: 600n, remainingNanos: 0n });

  // A minute into July gw-a may still spend its June lease: another gateway gets only the rest of July's budget.
  const july = new Date("2026-07-01T00:01:00Z");
  expect(await acquire(org.id, 1000n, { now: july, holder: "gw-b" })).toMatchObject({
    grantedNanos: 400n,
    remainingNanos: 0n,
  });
  // Released in July with 200 spent: all of it counts in July, as the release does not say how much was June's.
  const released = new Date(july.getTime() + 60_000);
  await release(late.leaseId as string, 200n, released);
  expect(await acquire(org.id, 1000n, { now: released, holder: "gw-c" })).toMatchObject({
    grantedNanos: 400n,
    remainingNanos: 0n,
  });
  const { rows } = await db.pool.query(
    `SELECT settled_period_start AS period_start, spent_nanos::int AS spent FROM budget_leases
     WHERE org_id = $1 AND released_at IS NOT NULL ORDER BY 1`,
    [org.id],
  );
  expect(rows).toEqual([
    { period_start: new Date("2026-06-01T00:00:00Z"), spent: 300 },
    { period_start: new Date("2026-07-01T00:00:00Z"), spent: 200 },
  ]);
});

test("a June lease abandoned across the boundary reserves in July through its grace window", async () => {
  const org = await newOrg(1000n);
  await acquire(org.id, 400n, { now: new Date("2026-06-30T23:55:00Z"), ttlSeconds: 600, holder: "gw-dead" });
  const expired = new Date("2026-07-01T00:05:00Z");
  expect(await acquire(org.id, 1000n, { now: expired, ttlSeconds: 1 })).toMatchObject({ grantedNanos: 600n });
  const afterGrace = new Date(expired.getTime() + defaultAbandonedLeaseGraceMs + 2_000);
  expect(await acquire(org.id, 1000n, { now: afterGrace })).toMatchObject({ grantedNanos: 1000n });
});

test("a June lease abandoned in June's last 10 minutes reserves in July through its grace window", async () => {
  const org = await newOrg(1000n);
  // Expired a minute before July by Postgres's clock; its gateway's clock, up to 10 minutes ahead, called it July.
  await acquire(org.id, 400n, { now: new Date("2026-06-30T23:58:00Z"), ttlSeconds: 60, holder: "gw-dead" });
  const july = new Date("2026-07-01T00:02:00Z");
  const inJuly = await acquire(org.id, 1000n, { now: july });
  expect(inJuly.grantedNanos).toBe(600n);
  await release(inJuly.leaseId as string, 0n, july);
  const afterGrace = new Date(Date.parse("2026-06-30T23:59:00Z") + defaultAbandonedLeaseGraceMs + 2_000);
  expect(await acquire(org.id, 1000n, { now: afterGrace })).toMatchObject({ grantedNanos: 1000n });
});

test("a request begun in June that spent from a July lease counts in July's budget, as its lease's grant did", async () => {
  const org = await newOrg(1000n);
  // It started a tenth of a second before July and waited for a grant, which billing made for July.
  const july = new Date("2026-07-01T00:00:00.100Z");
  const lease = await acquire(org.id, 1000n, { now: july, ttlSeconds: 600 });
  expect(lease.grantedNanos).toBe(1000n);
  const begun = { ...spendRecord(org.id, 600n, null, lease.leaseId), occurredAt: new Date("2026-06-30T23:59:59.900Z") };
  await store.recordUsage([begun]);
  // Open, the lease still holds its whole grant: 600 spent from it, 400 unspent.
  expect(await acquire(org.id, 1000n, { now: july, holder: "gw-2" })).toMatchObject({ grantedNanos: 0n });
  // Released: its 600 stays spent in July, though its usage is June's (and June's invoice bills it).
  await release(lease.leaseId as string, 600n, new Date(july.getTime() + 60_000));
  expect(await acquire(org.id, 1000n, { now: new Date(july.getTime() + 60_000), holder: "gw-3" })).toMatchObject({
    grantedNanos: 400n,
  });
});

test("a billing and gateways whose clocks run ahead of Postgres's grant no more than a period's budget across its edge", async () => {
  const org = await newOrg(1000n);
  const lease = await acquire(org.id, 600n, { now: new Date("2026-06-30T23:50:00Z"), ttlSeconds: 900, holder: "gw-a" });
  expect(lease.grantedNanos).toBe(600n);
  // Billing's clock (and the gateways') runs 5 s ahead of the database's: July for them, June for Postgres.
  const skewMs = 5_000;
  const askAt = (database: Date, holder: string) => {
    leaseClock = database;
    return store.acquireBudgetLease({ scope: "organization", scopeId: org.id, holder, requestedNanos: 1000n,
      neededNanos: 0n, ttlSeconds: 900, now: new Date(database.getTime() + skewMs) });
  };
  // gw-a spent all 600 in what its clock called July, and gives the lease back 3 s after the edge by its clock.
  await release(lease.leaseId as string, 600n, new Date("2026-06-30T23:59:58Z"));
  const asked = await askAt(new Date("2026-06-30T23:59:59Z"), "gw-b");
  // Its usage is still on its way when Postgres's July has begun.
  const inJuly = await askAt(new Date("2026-07-01T00:00:01Z"), "gw-c");
  const spent = { ...spendRecord(org.id, 600n, null, lease.leaseId), occurredAt: new Date("2026-07-01T00:00:02Z") };
  await store.recordUsage([spent]);
  // July's budget is 1000, and 600 of it went to gw-a's usage dated July.
  expect(asked.grantedNanos + inJuly.grantedNanos).toBeLessThanOrEqual(400n);
  const after = await askAt(new Date("2026-07-01T00:01:00Z"), "gw-d");
  expect(after.grantedNanos).toBe(0n);
});

test("a billing replica whose clock runs behind Postgres's grants none of a period that has ended", async () => {
  const org = await newOrg(1000n);
  // A replica on Postgres's time grants July's budget whole, and its gateway spends it and gives the lease back.
  const july = new Date("2026-07-01T00:00:01Z");
  const lease = await acquire(org.id, 1000n, { now: july, ttlSeconds: 900 });
  expect(lease.grantedNanos).toBe(1000n);
  await release(lease.leaseId as string, 1000n, new Date("2026-07-01T00:00:02Z"));
  // A replica whose clock is 5 s behind still calls it June, which had nothing spent; its gateway spends in July.
  leaseClock = new Date("2026-07-01T00:00:03Z");
  const slow = await store.acquireBudgetLease({ scope: "organization", scopeId: org.id, holder: "gw-2",
    requestedNanos: 1000n, neededNanos: 0n, ttlSeconds: 900, now: new Date("2026-06-30T23:59:58Z") });
  expect(slow).toMatchObject({ grantedNanos: 0n, remainingNanos: 0n });
});

test("usage recorded without a lease still counts while released spend waits for its usage", async () => {
  // $90 spent before the org had a budget, then a $100 budget: $10 is left, however often it is leased.
  const org = await newOrg(0n);
  await recordSpend(org.id, 90n);
  await store.updateOrganization(org.id, { monthlyBudgetNanos: 100n });
  let granted = 0n;
  const leases: string[] = [];
  for (let round = 0; round < 5; round++) {
    const lease = await acquire(org.id, 10n);
    granted += lease.grantedNanos;
    if (!lease.leaseId) break;
    leases.push(lease.leaseId);
    // Spent in full and released; its usage is still on its way (a gateway's spool, analytics' buffer).
    await release(lease.leaseId, lease.grantedNanos);
  }
  expect(granted).toBe(10n);
  // The usage arrives, naming its lease; resent, it changes nothing. Still nothing left.
  await recordSpend(org.id, 10n, null, leases[0]);
  expect(await acquire(org.id, 10n)).toMatchObject({ grantedNanos: 0n, remainingNanos: 0n });
  const { rows } = await db.pool.query("SELECT recorded_nanos::int AS recorded FROM budget_leases WHERE id = $1", [
    leases[0],
  ]);
  expect(rows).toEqual([{ recorded: 10 }]);
});

test("spend is counted once whether its usage is recorded before or after the release, and resends add nothing", async () => {
  const org = await newOrg(1000n);
  // Usage recorded while the lease is open shrinks what the lease reserves.
  const open = await acquire(org.id, 400n);
  await recordSpend(org.id, 150n, null, open.leaseId);
  expect(await acquire(org.id, 10_000n, { holder: "gw-2" })).toMatchObject({ grantedNanos: 600n, remainingNanos: 0n });
  // Released with 300 spent, 150 of it recorded: 150 counts until its usage comes.
  await release(open.leaseId as string, 300n);
  // 1000 - (150 recorded + 150 unrecorded) - 600 held by gw-2 = 100.
  const check = async () => (await acquire(org.id, 10_000n, { holder: "gw-4" })).grantedNanos;
  expect(await check()).toBe(100n);
  // The rest of its usage arrives, twice (a resend): recorded once, and the lease's spend is all accounted for.
  const rest = spendRecord(org.id, 150n, null, open.leaseId);
  await store.recordUsage([rest]);
  const resent = await store.recordUsage([rest]);
  expect(resent.duplicates).toBe(1);
  const { rows } = await db.pool.query(
    "SELECT spent_nanos::int AS spent, recorded_nanos::int AS recorded FROM budget_leases WHERE id = $1",
    [open.leaseId],
  );
  expect(rows).toEqual([{ spent: 300, recorded: 300 }]);
  // Nothing more is left: 300 recorded, 600 held by gw-2 and 100 by gw-4.
  expect(await check()).toBe(0n);
});

test("a request sent twice in one batch charges its lease once", async () => {
  const org = await newOrg(1000n);
  const lease = await acquire(org.id, 1000n);
  const record = spendRecord(org.id, 300n, null, lease.leaseId);
  expect(await store.recordUsage([record, { ...record }])).toMatchObject({ inserted: 1, duplicates: 1 });
  // 600 spent: 300 recorded, another 300 on its way. 400 is left, not 700.
  await release(lease.leaseId as string, 600n);
  expect(await acquire(org.id, 1000n)).toMatchObject({ grantedNanos: 400n });
});

test("leases of periods long over are deleted; grants, usage and releases go on as before", async () => {
  const org = await newOrg(1000n);
  const january = new Date("2026-01-10T12:00:00Z");
  const released = (await acquire(org.id, 300n, { now: january })).leaseId as string;
  await release(released, 100n, january);
  const abandoned = (await acquire(org.id, 200n, { now: january, holder: "gw-dead" })).leaseId as string;
  const april = new Date("2026-04-01T12:00:00Z");
  const recent = (await acquire(org.id, 300n, { now: april })).leaseId as string;
  await release(recent, 300n, april);
  const open = (await acquire(org.id, 400n)).leaseId as string;
  const leases = async () =>
    (await db.pool.query<{ id: string }>("SELECT id FROM budget_leases WHERE org_id = $1", [org.id])).rows.map(
      (r) => r.id,
    );
  const probe = async () => {
    const grant = await acquire(org.id, 1000n, { holder: "gw-probe" });
    await release(grant.leaseId as string, 0n);
    return grant.grantedNanos;
  };
  const before = await probe();
  expect(before).toBe(600n);

  // Kept 90 days: January's two go, April's (its period started 75 days ago) stays.
  leaseClock = now;
  expect(await store.pruneBudgetLeases(90)).toBe(2);
  expect(await leases()).not.toContain(released);
  expect(await leases()).not.toContain(abandoned);
  expect(await leases()).toContain(recent);
  expect(await probe()).toBe(before);
  // Late usage naming a deleted lease is recorded; a late release of one finds nothing to settle.
  expect((await recordSpend(org.id, 10n, null, released)).inserted).toBe(1);
  const late = release(abandoned, 50n);
  expect(await late.catch((e: BillingError) => e.kind)).toBe("not_found");
  expect(await probe()).toBe(before - 10n);

  // Never less than 35 days, so the current period's leases are kept whatever is asked.
  leaseClock = now;
  expect(await store.pruneBudgetLeases(1)).toBe(1);
  expect(await leases()).not.toContain(recent);
  expect(await leases()).toContain(open);
  expect(await probe()).toBe(before - 10n);
});

describe("lease lifetimes on the database's clock, whatever a replica's own says", () => {
  // Stores on the database's real clock: a replica's clock is only the `now` it passes.
  let replicas: BillingStore;
  let shortGrace: BillingStore;
  beforeAll(() => {
    replicas = createBillingStore(db.pool);
    shortGrace = createBillingStore(db.pool, { abandonedLeaseGraceMs: 60_000 });
  });
  // A billing day two weeks off, so a clock an hour ahead stays in the same billing period.
  const farBillingDay = ((new Date().getUTCDate() + 13) % 28) + 1;
  const realOrg = (monthlyBudgetNanos: bigint) =>
    store.createOrganization({ name: `lease-org-${++orgs}`, taxRateBps: 0, billingDay: farBillingDay,
      monthlyBudgetNanos, maxDiscountBps: 0 });
  const ask = (on: BillingStore, scopeId: string, holder: string, clock: Date, ttlSeconds: number) =>
    on.acquireBudgetLease({ scope: "organization", scopeId, holder, requestedNanos: 1000n, neededNanos: 0n,
      ttlSeconds, now: clock });

  test("a replica with its clock an hour ahead counts no live lease abandoned and dates no grant ahead", async () => {
    const org = await realOrg(1000n);
    const before = Date.now();
    const live = await ask(replicas, org.id, "gw-1", new Date(), 900);
    expect(live.grantedNanos).toBe(1000n);
    const ahead = new Date(Date.now() + 3_600_000);
    // The lease has 15 minutes to live: past them and the grace by the fast clock, not by the database's.
    expect(await ask(replicas, org.id, "gw-2", ahead, 900)).toMatchObject({ grantedNanos: 0n, leasedNanos: 1000n });
    expect(await replicas.openBudgetLeases()).toMatchObject({ abandoned: 0 });
    await replicas.releaseBudgetLease({ leaseId: live.leaseId as string, spentNanos: 400n });
    const next = await ask(replicas, org.id, "gw-2", ahead, 60);
    expect(next).toMatchObject({ grantedNanos: 600n, remainingNanos: 0n });
    // Its expiry is the database's time plus its lifetime, as the gateway counts it from its ask.
    expect(next.expiresAt.getTime()).toBeGreaterThanOrEqual(before + 60_000 - 1);
    expect(next.expiresAt.getTime()).toBeLessThanOrEqual(Date.now() + 60_000);
  });

  test("two replicas whose clocks are further apart than the grace never grant the same money twice", async () => {
    const org = await realOrg(1000n);
    const slow = new Date();
    const fast = new Date(slow.getTime() + 300_000);
    // By the fast replica's clock the slow one's lease expired 4 minutes ago, 3 past a grace of one.
    expect((await ask(shortGrace, org.id, "gw-slow", slow, 60)).grantedNanos).toBe(1000n);
    expect((await ask(shortGrace, org.id, "gw-fast", fast, 60)).grantedNanos).toBe(0n);
    // The other way round: a lease granted by the fast one lives no longer than its lifetime asked.
    const other = await realOrg(1000n);
    const granted = await ask(shortGrace, other.id, "gw-fast", fast, 60);
    expect(granted.expiresAt.getTime()).toBeLessThanOrEqual(Date.now() + 60_000);
  });
});

test("a billing stopped in the middle of a grant holds its scope's lock no longer than its idle-in-transaction timeout", async () => {
  const org = await newOrg(1000n);
  const pool = createPool({ connectionString: db.connectionString, max: 2 }, { idleInTransactionTimeoutMs: 500 });
  let thaw = () => {};
  const frozen = new Promise<void>((resolve) => (thaw = resolve));
  let locked = () => {};
  const holding = new Promise<void>((resolve) => (locked = resolve));
  try {
    // What the database sees of a billing frozen, or cut off, after the grant's first statement: a session idle in
    // its transaction, holding the org's row.
    const stopped = createDb(pool).transaction(async (tx) => {
      await tx.query("SELECT 1 FROM organizations WHERE id = $1 FOR NO KEY UPDATE", [org.id]);
      locked();
      await frozen;
    });
    stopped.catch(() => {});
    await holding;
    // Another replica's grant gets the lock once the server has ended that session (bounded here, not to hang).
    const grant = await callSignal.run(AbortSignal.timeout(10_000), () => acquire(org.id, 100n));
    expect(grant.grantedNanos).toBe(100n);
    thaw();
    const failed = await stopped.then(() => undefined, (e: unknown) => e);
    expect(isDatabaseUnavailable(failed)).toBe(true);
  } finally {
    thaw();
    await pool.end();
  }
});

test("open leases read past their time behind a lock leave no statement waiting in Postgres", async () => {
  const locker = await db.pool.connect();
  try {
    // As an operator's ALTER TABLE or VACUUM FULL in an open transaction would, while metrics are scraped.
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE budget_leases");
    for (let i = 0; i < 5; i++) {
      const read = await store.openBudgetLeases(200).then(() => "answered", () => "failed");
      expect(read).toBe("failed");
    }
    let waiting: number | undefined;
    for (let i = 0; i < 200 && waiting !== 0; i++) {
      if (waiting !== undefined) await Bun.sleep(10);
      const { rows } = await db.pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      );
      waiting = rows[0]?.n;
    }
    expect(waiting).toBe(0);
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
  }
  expect(await store.openBudgetLeases(5_000)).toMatchObject({ active: expect.any(Number) });
});
