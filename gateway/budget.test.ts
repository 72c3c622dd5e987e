import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import type { ChatCompletionContentPart } from "openai/resources/chat/completions";
import { BillingService, BudgetScope } from "../gen/billing/v1/billing_pb.ts";
import { billingPeriod } from "../lib/billing-period.ts";
import { createLogger } from "../lib/log.ts";
import { costNanos } from "../lib/money.ts";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { createKeyAuthorizer, type Principal, watchKeyChanges } from "./auth.ts";
import {
  type BudgetKeeperOptions,
  createBudgetKeeper,
  type LeaseCharge,
  maxChatSpend,
  maxInputTokens,
  maxOutputTokens,
} from "./budget.ts";
import { type GatewayError, ShutdownCut } from "./errors.ts";
import { openLeaseJournal } from "./lease-journal.ts";
import { approxInputTokens } from "./providers/provider.ts";
import { createTestLogger } from "./testing.ts";
import { imageDataUrl } from "./testing/images.ts";

// A real billing service (Postgres included) behind an in-memory transport.
const adminToken = "budget-test-admin-token-0123";
const auth = { headers: { authorization: `Bearer ${adminToken}` } };
let db: TestDatabase;
let client: ReturnType<typeof createClient<typeof BillingService>>;
const calls = { acquire: 0, release: 0 };
// Billing unreachable, or releasing a lease and losing its answer.
let billingFault: "down" | "answer lost" | undefined;

beforeAll(async () => {
  db = await createTestDatabase();
  const log = createLogger({ service: "billing-test", level: "error" });
  const app = createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log });
  client = createClient(BillingService, createRouterTransport(app.routes));
}, 60_000);
afterAll(() => db.drop(), 30_000);

// The keeper's view of billing: the admin token added and calls counted.
const billing: BudgetKeeperOptions["billing"] = {
  acquireBudgetLease: async (req) => {
    calls.acquire++;
    if (billingFault) throw new ConnectError("billing is unreachable", Code.Unavailable);
    return client.acquireBudgetLease(req, auth);
  },
  releaseBudgetLease: async (req) => {
    calls.release++;
    if (billingFault === "down") throw new ConnectError("billing is unreachable", Code.Unavailable);
    const res = await client.releaseBudgetLease(req, auth);
    if (billingFault === "answer lost") throw new ConnectError("billing's answer was lost", Code.Unavailable);
    return res;
  },
};

let orgs = 0;
async function principalWith(budgets: { org?: bigint; key?: bigint }): Promise<Principal> {
  const org = await client.createOrganization(
    { name: `budget-org-${++orgs}`, monthlyBudgetNanos: budgets.org ?? 0n },
    auth,
  );
  const orgId = org.organization?.id as string;
  const key = await client.createApiKey({ orgId, name: "k", limits: { monthlyBudgetNanos: budgets.key ?? 0n } }, auth);
  return authorizedAfresh(key.secret);
}

/** The key of `secret` as billing authorizes it now, by an authorizer of its own: as after billing announced a change. */
function authorizedAfresh(secret: string): Promise<Principal> {
  return createKeyAuthorizer({
    billing: { authorizeKey: (req) => client.authorizeKey(req, auth) },
    watching: true,
  }).authorize(secret);
}

function keeper(extra: Partial<BudgetKeeperOptions> = {}) {
  const clock = { t: 1_000_000 };
  const k = createBudgetKeeper({
    billing,
    holder: "gw-test",
    leaseTtlSeconds: 300,
    minLeaseNanos: 1_000n,
    exhaustedBackoffMs: 1_000,
    maintenanceIntervalMs: 60_000,
    now: () => clock.t,
    // Mid-period, so refusals are not near a billing period's end whenever the suite runs.
    wallClock: () => Date.UTC(2026, 5, 15),
    ...extra,
  });
  return { keeper: k, clock };
}

const spendingLeasesOf = async (scopeId: string) =>
  (
    await db.pool.query<{ id: string }>(
      `SELECT id FROM budget_leases
       WHERE ((scope = 'organization' AND org_id = $1) OR (scope = 'api_key' AND api_key_id = $1)) AND spent_nanos > 0`,
      [scopeId],
    )
  ).rows.map((r) => r.id);
const leasesOf = async (scopeId: string) =>
  (
    await db.pool.query<{ granted_nanos: string; spent_nanos: string | null; released_at: Date | null }>(
      `SELECT granted_nanos, spent_nanos, released_at FROM budget_leases
       WHERE (scope = 'organization' AND org_id = $1) OR (scope = 'api_key' AND api_key_id = $1) ORDER BY id`,
      [scopeId],
    )
  ).rows.map((r) => ({
    granted: BigInt(r.granted_nanos),
    spent: r.spent_nanos === null ? null : BigInt(r.spent_nanos),
  }));

/** A request's cost, for a principal whose key has no monthly tokens. */
const usd = (nanos: bigint) => ({ nanos, tokens: 0n });

/** The usage record of a chat request of the principal's that cost `cost` now, drawn from `charges`' leases. */
const usageNow = (principal: Principal, requestId: string, cost: bigint, charges: LeaseCharge[]) => ({
  requestId,
  orgId: principal.orgId,
  apiKeyId: principal.apiKeyId,
  model: "mock",
  endpoint: 1,
  costNanos: cost,
  occurTime: { seconds: BigInt(Math.floor(Date.now() / 1000)), nanos: 0 },
  budgetCharges: charges,
});

const refusal = (p: Promise<unknown>) =>
  p.then(
    () => {
      throw new Error("expected a refusal");
    },
    (e: unknown) => e as GatewayError,
  );

async function until(condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await condition())) {
    if (performance.now() > deadline) throw new Error("condition not met in time");
    await Bun.sleep(5);
  }
}

describe("budget leases", () => {
  test("reserves the maximum, settles the actual cost, and asks billing only when the lease runs low", async () => {
    const principal = await principalWith({ org: 1_000_000n });
    const { keeper: k, clock } = keeper({ minLeaseNanos: 10_000n });
    const before = calls.acquire;
    const r = await k.reserve(principal, usd(500n), 60_000);
    expect(calls.acquire - before).toBe(1);
    expect(k.snapshot().get(`organization:${principal.orgId}`)).toEqual({
      leases: 1,
      grantedNanos: 10_000n,
      spentNanos: 0n,
      reservedNanos: 500n,
    });
    r.settle(usd(120n));
    r.settle(usd(999n)); // settling twice changes nothing
    expect(k.snapshot().get(`organization:${principal.orgId}`)).toMatchObject({ spentNanos: 120n, reservedNanos: 0n });

    // More requests fit in the lease without a round trip (while it stays above its renewal mark).
    for (let i = 0; i < 8; i++) {
      (await k.reserve(principal, usd(500n), 60_000)).settle(usd(500n));
      clock.t += 1_000;
    }
    expect(calls.acquire - before).toBe(1);
    await k.close();
    expect(await leasesOf(principal.orgId)).toEqual([{ granted: 10_000n, spent: 120n + 8n * 500n }]);
  });

  test("a request that ends while billing is asked for a lease stops waiting, and reserves nothing", async () => {
    const principal = await principalWith({ org: 1_000_000n });
    let asked = 0;
    const hung = { ...billing, acquireBudgetLease: () => (asked++, new Promise<never>(() => {})) };
    const { keeper: k } = keeper({ billing: hung });
    const cut = new AbortController();
    const waiting = refusal(k.reserve(principal, usd(500n), 60_000, cut.signal));
    await until(() => asked === 1);
    cut.abort(new ShutdownCut());
    expect((await waiting).code).toBe("gateway_shutting_down");
    // One whose client has left already does not wait on the grant still being asked for.
    const left = new AbortController();
    left.abort();
    expect((await refusal(k.reserve(principal, usd(500n), 60_000, left.signal))).code).toBe("client_closed_request");
    expect(asked).toBe(1);
    expect(k.snapshot().get(`organization:${principal.orgId}`)?.reservedNanos ?? 0n).toBe(0n);
  }, 5_000);

  test("unlimited principals reserve nothing and never call billing", async () => {
    const principal = await principalWith({});
    const { keeper: k } = keeper();
    const before = calls.acquire;
    (await k.reserve(principal, usd(10n ** 12n), 60_000)).settle(usd(10n ** 12n));
    expect(calls.acquire).toBe(before);
    expect(k.snapshot().size).toBe(0);
    await k.close();
  });

  test("an exhausted budget is a 429 insufficient_quota, and billing is not asked again for a while", async () => {
    const principal = await principalWith({ key: 1_000n });
    const { keeper: k, clock } = keeper({ minLeaseNanos: 400n });
    const held = await k.reserve(principal, usd(400n), 60_000);
    const second = await k.reserve(principal, usd(400n), 60_000);
    const before = calls.acquire;
    const e = await refusal(k.reserve(principal, usd(400n), 60_000));
    // The requests running here may leave room when they settle: retry once an idle lease would have gone back.
    expect([e.status, e.type, e.code, e.retryAfterS]).toEqual([429, "insufficient_quota", "insufficient_quota", 30]);
    expect(calls.acquire - before).toBe(1);
    // Within the backoff, refusals are local.
    for (let i = 0; i < 10; i++) await refusal(k.reserve(principal, usd(400n), 60_000));
    expect(calls.acquire - before).toBe(1);
    // What is left still serves a request small enough.
    (await k.reserve(principal, usd(200n), 60_000)).settle(usd(200n));

    // Spending less than reserved returns money: after the backoff, billing is asked again.
    held.settle(usd(100n));
    second.settle(usd(100n));
    clock.t += 1_000;
    (await k.reserve(principal, usd(400n), 60_000)).settle(usd(400n));
    await k.close();
    const leases = await leasesOf(principal.apiKeyId);
    const spent = leases.reduce((sum, l) => sum + (l.spent ?? 0n), 0n);
    expect(spent).toBe(800n);
  });

  test("a budget spent to the end is refused without Retry-After; one other replicas still lease says when to retry", async () => {
    const principal = await principalWith({ key: 1_000n });
    const a = keeper({ holder: "gw-a", minLeaseNanos: 500n, idleReleaseMs: 20_000 });
    const b = keeper({ holder: "gw-b", minLeaseNanos: 500n });
    (await b.keeper.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    (await a.keeper.reserve(principal, usd(500n), 60_000)).settle(usd(500n));
    // B still holds 400 unspent, which it gives back once its lease sits idle.
    expect((await refusal(a.keeper.reserve(principal, usd(100n), 60_000))).retryAfterS).toBe(20);
    await b.keeper.close();
    a.clock.t += 1_000;
    (await a.keeper.reserve(principal, usd(400n), 60_000)).settle(usd(400n));
    a.clock.t += 1_000;
    const spent = await refusal(a.keeper.reserve(principal, usd(100n), 60_000));
    expect([spent.status, spent.code, spent.retryAfterS]).toEqual([429, "insufficient_quota", undefined]);
    await a.keeper.close();
  });

  test("a budget whose remnants held anywhere cannot cover a request refuses it without Retry-After", async () => {
    const principal = await principalWith({ key: 1_000n });
    const a = keeper({ holder: "gw-a", minLeaseNanos: 500n, idleReleaseMs: 20_000 });
    const b = keeper({ holder: "gw-b", minLeaseNanos: 500n });
    const charges = (await b.keeper.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    // Its usage recorded, billing knows B's lease holds 400 of the budget's last money.
    const record = usageNow(principal, "req_remnants", 100n, charges);
    expect((await client.recordUsage({ records: [record] }, auth)).inserted).toBe(1);
    (await a.keeper.reserve(principal, usd(500n), 60_000)).settle(usd(500n));
    // B holds the last 400 unspent: a request of 500 cannot be served this month however long it waits.
    const e = await refusal(a.keeper.reserve(principal, usd(500n), 60_000));
    expect([e.status, e.code, e.retryAfterS]).toEqual([429, "insufficient_quota", undefined]);
    // One of 400 can, once B gives its lease back.
    expect((await refusal(a.keeper.reserve(principal, usd(400n), 60_000))).retryAfterS).toBe(20);
    await b.keeper.close();
    await a.keeper.close();
  });

  test("a budget spent within the last hour of its billing period is refused with Retry-After at the period's end", async () => {
    const principal = await principalWith({ key: 1_000n });
    // The org's billing day is 1: its periods end at the start of a month.
    const periodEnd = billingPeriod(new Date(Date.UTC(2026, 5, 15)), 1).end.getTime();
    const near = keeper({ minLeaseNanos: 1_000n, wallClock: () => periodEnd - 42_500 });
    (await near.keeper.reserve(principal, usd(1_000n), 60_000)).settle(usd(1_000n));
    const spent = await refusal(near.keeper.reserve(principal, usd(100n), 60_000));
    expect([spent.status, spent.code, spent.retryAfterS]).toEqual([429, "insufficient_quota", 43]);
    await near.keeper.close();
    // Further out, nothing comes back this period: no Retry-After.
    const far = keeper({ minLeaseNanos: 1_000n, wallClock: () => periodEnd - 3_600_001 });
    expect((await refusal(far.keeper.reserve(principal, usd(100n), 60_000))).retryAfterS).toBeUndefined();
    await far.keeper.close();
  });

  test("a lease billing refuses as invalid fails its request with a 500, not as an outage: idle leases still go back", async () => {
    const other = await principalWith({ org: 1_000_000n });
    const valid = await principalWith({ org: 1_000_000n });
    // An org id longer than billing takes: it refuses the lease as InvalidArgument.
    const invalid: Principal = { ...valid, orgId: "o".repeat(200) };
    const logger = createTestLogger();
    const { keeper: k } = keeper({ log: logger });
    (await k.reserve(other, usd(100n), 60_000)).settle(usd(100n));
    const [lease] = await leasesOf(other.orgId);
    const e = await refusal(k.reserve(invalid, usd(100n), 60_000));
    expect([e.status, e.code]).toEqual([500, "internal_error"]);
    // Billing answered: its leftover lease, idle and too small for the next request, goes back before it asks again,
    // as it does while billing answers (during an outage it would stay, for the requests it covers).
    (await k.reserve(other, usd(lease!.granted * 2n), 60_000)).settle(usd(0n));
    expect((await leasesOf(other.orgId))[0]).toEqual({ granted: lease!.granted, spent: 100n });
    expect(logger.lines.some((l) => l.includes("budget lease request failed"))).toBe(false);
    expect(logger.lines.some((l) => l.includes("refused a budget lease request as invalid"))).toBe(true);
    await k.close();
  });

  test("a budget with 1 nano-USD left unleased is not asked for a zero-size lease in the background", async () => {
    const principal = await principalWith({ org: 1_001n });
    const { keeper: k } = keeper({ minLeaseNanos: 1_000n });
    const before = calls.acquire;
    // The grant leaves billing 1 nano-USD: half of it, what renewal may take, is nothing to ask for.
    const r = await k.reserve(principal, usd(1_000n), 60_000);
    r.settle(usd(500n));
    (await k.reserve(principal, usd(400n), 60_000)).settle(usd(400n));
    await Bun.sleep(20);
    expect(calls.acquire - before).toBe(1);
    await k.close();
    expect(await leasesOf(principal.orgId)).toEqual([{ granted: 1_000n, spent: 900n }]);
  });

  test("a replica that last heard billing had nothing left asks again before refusing: another may have given back", async () => {
    const principal = await principalWith({ org: 2_000n });
    const a = keeper({ holder: "gw-a" });
    const b = keeper({ holder: "gw-b" });
    (await b.keeper.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    (await a.keeper.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    // A's grant left billing nothing; B gives back the 900 it did not spend.
    await b.keeper.close();
    // All of the budget is served: 19 requests here, 1 there; then none.
    for (let i = 0; i < 18; i++) (await a.keeper.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    expect((await refusal(a.keeper.reserve(principal, usd(100n), 60_000))).status).toBe(429);
    await a.keeper.close();
  });

  test("a lease running low is renewed in the background, sized by the recent spend rate", async () => {
    const principal = await principalWith({ org: 10n ** 12n });
    const { keeper: k, clock } = keeper({ minLeaseNanos: 10_000n, leaseHorizonSeconds: 60 });
    const scope = `organization:${principal.orgId}`;
    // 100 nano-USD per 100 ms: 1,000 nano-USD a second.
    for (let i = 0; i < 95; i++) {
      (await k.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
      clock.t += 100;
    }
    // Below its low-water mark the scope asked for more in the background; no reservation waited for it.
    await until(async () => (await leasesOf(principal.orgId)).length > 1);
    const leases = await leasesOf(principal.orgId);
    const last = leases.at(-1)?.granted as bigint;
    // About 60 s of ~1,000/s spend (decayed average), far above the minimum lease.
    expect(last).toBeGreaterThan(20_000n);
    expect(last).toBeLessThan(80_000n);
    expect(k.snapshot().get(scope)?.spentNanos).toBeGreaterThan(0n);
    await k.close();
  });

  test("renewals leave other replicas half of what is left, however many follow one another", async () => {
    const cost = 1_000n;
    const budget = cost * 40n;
    const principal = await principalWith({ org: budget });
    const a = keeper({ holder: "gw-a", minLeaseNanos: cost });
    for (let i = 0; i < 10; i++) {
      (await a.keeper.reserve(principal, usd(cost), 60_000)).settle(usd(cost));
      // Ten requests a second: a few seconds of spend is more than the whole budget, so every request renews.
      a.clock.t += 100;
      await Bun.sleep(20);
    }
    const held = a.keeper.snapshot().get(`organization:${principal.orgId}`) as { grantedNanos: bigint; spentNanos: bigint };
    const left = budget - cost * 10n;
    expect(held.grantedNanos - held.spentNanos).toBeLessThanOrEqual(left / 2n + cost);
    // Were this replica to die now, another could still serve about half of what is left.
    const b = keeper({ holder: "gw-b", minLeaseNanos: cost });
    for (let i = 0; i < 13; i++) (await b.keeper.reserve(principal, usd(cost), 60_000)).settle(usd(cost));
    await Promise.all([a.keeper.close(), b.keeper.close()]);
  });

  test("a replica restarted under the same instance id is not held back by the leases of its past life", async () => {
    const cost = 10_000_000n;
    const principal = await principalWith({ key: 1_000n * cost });
    const scope = `api_key:${principal.apiKeyId}`;
    // The first life takes about half of the budget and dies (kill -9) without giving it back.
    const dead = keeper({ holder: "gw-a", minLeaseNanos: 100_000_000_000n });
    (await dead.keeper.reserve(principal, usd(cost), 60_000)).settle(usd(cost));
    const stranded = dead.keeper.snapshot().get(scope)?.grantedNanos as bigint;
    expect(stranded).toBeGreaterThan(400n * cost);
    // Its successor, the same pod, takes a lease for many requests (not one round trip to billing each)...
    const { keeper: k } = keeper({ holder: "gw-a", minLeaseNanos: 100n * cost });
    const before = calls.acquire;
    for (let i = 0; i < 10; i++) (await k.reserve(principal, usd(cost), 60_000)).settle(usd(cost));
    expect(calls.acquire - before).toBeLessThanOrEqual(2);
    // ...and once the rest is spent, its refusal says the stranded money comes back (the dead life's leases expire).
    while (true) {
      const r = await k.reserve(principal, usd(cost), 60_000).catch((e: GatewayError) => e);
      if ("settle" in r) r.settle(usd(cost));
      else {
        expect(r.code).toBe("insufficient_quota");
        expect(r.retryAfterS).toBe(30);
        break;
      }
    }
    await k.close();
  });

  test("a replica's past life's leases go back once the usage it served under them is recorded, and no sooner", async () => {
    const cost = 10_000_000n;
    const budget = 100n * cost;
    const principal = await principalWith({ key: budget });
    const journal = new Set<string>();
    const notes = { held: (id: string) => journal.add(id), settled: (id: string) => journal.delete(id) };
    // The first life holds most of the budget, serves one request, and is killed: its usage waits in the spool.
    const dead = keeper({ minLeaseNanos: 80n * cost, journal: notes });
    const charges = (await dead.keeper.reserve(principal, usd(cost), 60_000)).settle(usd(cost));
    const ids = [...journal];
    expect(ids.length).toBe(1);
    expect(charges).toEqual([{ leaseId: ids[0] as string, nanos: cost, tokens: 0n }]);
    let recorded = false;
    const { keeper: k, clock } = keeper({
      journal: notes,
      inherited: { leaseIds: ids, recorded: () => recorded },
      maintenanceIntervalMs: 5,
    });
    // Given back now, the spend not yet recorded would be granted again: the rest is what the dead life left.
    await Bun.sleep(50);
    expect((await leasesOf(principal.apiKeyId)).map((l) => l.spent)).toEqual([null]);
    expect((await refusal(k.reserve(principal, usd(50n * cost), 60_000))).code).toBe("insufficient_quota");
    // The spool's rows are acked: billing recorded the request against the lease.
    const record = usageNow(principal, "req-before-the-crash", cost, charges);
    expect((await client.recordUsage({ records: [record] }, auth)).inserted).toBe(1);
    recorded = true;
    await until(() => !journal.has(ids[0] as string));
    // Released as spending nothing beyond its recorded usage, which billing counts once.
    const leases = await db.pool.query<{ spent_nanos: string; recorded_nanos: string }>(
      "SELECT spent_nanos::text, recorded_nanos::text FROM budget_leases WHERE id = $1",
      [ids[0]],
    );
    expect(leases.rows).toEqual([{ spent_nanos: "0", recorded_nanos: String(cost) }]);
    clock.t += 2_000;
    (await k.reserve(principal, usd(budget - cost), 60_000)).settle(usd(budget - cost));
    clock.t += 2_000;
    expect((await refusal(k.reserve(principal, usd(1n), 60_000))).code).toBe("insufficient_quota");
    await k.close();
    expect(journal.size).toBe(0);
  });

  test("a past life's spend its spool dropped still counts when the next life gives its leases back", async () => {
    const cost = 10_000_000n;
    const budget = 100n * cost;
    const principal = await principalWith({ key: budget });
    const dir = mkdtempSync(join(tmpdir(), "budget-journal-"));
    try {
      // The first life serves three requests under one lease; its spool (full) dropped the rows of two of them.
      const dead = keeper({ minLeaseNanos: 80n * cost, journal: openLeaseJournal(dir) });
      const charges: LeaseCharge[] = [];
      for (let i = 0; i < 3; i++) {
        charges.push(...(await dead.keeper.reserve(principal, usd(cost), 60_000)).settle(usd(cost)));
      }
      const record = usageNow(principal, "req-kept-in-the-spool", cost, charges.slice(0, 1));
      expect((await client.recordUsage({ records: [record] }, auth)).inserted).toBe(1);
      // Killed: the next life opens the journal and gives the lease back once the spool's rows are acked.
      const journal = openLeaseJournal(dir);
      const { keeper: k, clock } = keeper({
        journal,
        inherited: { leaseIds: journal.inherited, spent: journal.inheritedSpent, recorded: () => true },
        maintenanceIntervalMs: 5,
      });
      await until(async () => (await leasesOf(principal.apiKeyId)).every((l) => l.spent !== null));
      // Released at what it spent, all three requests: billing counts the two it has no usage for.
      expect((await leasesOf(principal.apiKeyId)).map((l) => l.spent)).toEqual([3n * cost]);
      clock.t += 2_000;
      (await k.reserve(principal, usd(budget - 3n * cost), 60_000)).settle(usd(budget - 3n * cost));
      clock.t += 2_000;
      expect((await refusal(k.reserve(principal, usd(1n), 60_000))).code).toBe("insufficient_quota");
      await k.close();
      journal.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a replica that asks billing for a whole budget leaves the other replicas about half of it", async () => {
    const principal = await principalWith({ org: 1_000_000_000n });
    // An old or misbehaving replica asks for everything; billing grants half plus its 0.1 USD floor.
    const greedy = { scope: BudgetScope.ORGANIZATION, scopeId: principal.orgId, holder: "gw-old", ttlSeconds: 300 };
    expect((await client.acquireBudgetLease({ ...greedy, requestedNanos: 1_000_000_000n }, auth)).grantedNanos).toBe(
      600_000_000n,
    );
    const { keeper: k } = keeper({ holder: "gw-a" });
    (await k.reserve(principal, usd(300_000_000n), 60_000)).settle(usd(300_000_000n));
    await k.close();
  });

  test("a request dearer than billing lets one replica hold for later is served whole; only the surplus is capped", async () => {
    // $20 left and a request that may cost $12: more than half of what is left plus the $0.10 floor, within the budget.
    const principal = await principalWith({ org: 20_000_000_000n });
    const { keeper: k } = keeper({ holder: "gw-a" });
    const before = calls.acquire;
    (await k.reserve(principal, usd(12_000_000_000n), 60_000)).settle(usd(12_000_000_000n));
    expect(calls.acquire - before).toBe(1);
    await k.close();
    // Beyond what it needed, nothing more than the share: a greedy holder's ask is still held to it.
    expect((await leasesOf(principal.orgId)).map((l) => l.granted)).toEqual([12_000_000_000n]);
    const greedy = { scope: BudgetScope.ORGANIZATION, scopeId: principal.orgId, holder: "gw-old", ttlSeconds: 300 };
    const grant = await client.acquireBudgetLease({ ...greedy, requestedNanos: 8_000_000_000n, neededNanos: 1n }, auth);
    expect(grant.grantedNanos).toBe(4_100_000_000n);
    // More than is left is refused as before, with what is left.
    const { keeper: other } = keeper({ holder: "gw-b" });
    const refused = await refusal(other.reserve(principal, usd(5_000_000_000n), 60_000));
    expect(refused.code).toBe("insufficient_quota");
    expect(refused.message).toContain("has less than that left");
    await other.close();
  });

  test("both org and key budgets are charged; the tighter one decides", async () => {
    const principal = await principalWith({ org: 5_000n, key: 1_000n });
    const { keeper: k } = keeper({ minLeaseNanos: 300n });
    const a = await k.reserve(principal, usd(600n), 60_000);
    expect((await refusal(k.reserve(principal, usd(600n), 60_000))).code).toBe("insufficient_quota");
    // What each budget's lease paid, for the request's usage record; settling again charges nothing.
    const charges = a.settle(usd(600n));
    expect(charges.map((c) => c.nanos)).toEqual([600n, 600n]);
    expect(a.settle(usd(600n))).toEqual([]);
    await k.close();
    // The leases charged are the ones that report the spend.
    const ids = [...(await spendingLeasesOf(principal.orgId)), ...(await spendingLeasesOf(principal.apiKeyId))];
    expect(charges.map((c) => c.leaseId).sort()).toEqual(ids.sort());
    const spent = (leases: { spent: bigint | null }[]) => leases.reduce((sum, l) => sum + (l.spent ?? 0n), 0n);
    expect(spent(await leasesOf(principal.apiKeyId))).toBe(600n);
    expect(spent(await leasesOf(principal.orgId))).toBe(600n);
  });

  test("a cost above the reservation is charged in full, so the overshoot is visible to billing", async () => {
    const principal = await principalWith({ key: 1_000n });
    const { keeper: k } = keeper({ minLeaseNanos: 1_000n });
    (await k.reserve(principal, usd(900n), 60_000)).settle(usd(1_100n));
    await k.close();
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 1_000n, spent: 1_100n }]);
  });

  test("a reservation is drawn from few enough leases for billing to record, however fragmented they are", async () => {
    const principal = await principalWith({ org: 10n ** 12n, key: 10n ** 12n });
    const { keeper: k, clock } = keeper({ minLeaseNanos: 1_000n });
    // Requests in flight, each needing a little more than is free, so each takes a lease of its own...
    const running = [];
    for (let i = 0; i < 30; i++) {
      running.push(await k.reserve(principal, usd(1_500n + BigInt(i) * 100n), 60_000));
      clock.t += 10;
    }
    // ...and every other one settles cheaply, leaving a remnant in each of many leases.
    for (let i = 0; i < running.length; i += 2) running[i]?.settle(usd(10n));
    const key = k.snapshot().get(`api_key:${principal.apiKeyId}`);
    const room = (key?.grantedNanos ?? 0n) - (key?.spentNanos ?? 0n) - (key?.reservedNanos ?? 0n);
    expect(key?.leases).toBeGreaterThan(8);
    // One request that needs more than four of the remnants together, and costs all of it.
    const charges = (await k.reserve(principal, usd(room), 60_000)).settle(usd(room));
    expect(charges.length).toBeLessThanOrEqual(8);
    expect(charges.reduce((sum, c) => sum + c.nanos, 0n)).toBe(2n * room);
    const record = usageNow(principal, "req-fragmented-leases", room, charges);
    expect((await client.recordUsage({ records: [record] }, auth)).inserted).toBe(1);
    for (const r of running.slice(1)) r.settle(usd(0n));
    await k.close();
    // No lease paid more than billing granted it, and what the leases report spent is what the requests cost.
    for (const scopeId of [principal.apiKeyId, principal.orgId]) {
      const leases = await leasesOf(scopeId);
      for (const lease of leases) expect(lease.spent ?? 0n).toBeLessThanOrEqual(lease.granted);
      expect(leases.reduce((sum, l) => sum + (l.spent ?? 0n), 0n)).toBe(room + 15n * 10n);
    }
  });

  test("leases too close to expiry for a request's time limit are not used for it", async () => {
    const principal = await principalWith({ org: 10n ** 9n });
    const { keeper: k, clock } = keeper({ leaseTtlSeconds: 120, minLeaseNanos: 10_000n, settleMarginMs: 5_000 });
    (await k.reserve(principal, usd(100n), 10_000)).settle(usd(100n));
    const before = calls.acquire;
    clock.t += 100_000;
    // 100 s into a 120 s lease: a request that may take 10 s still fits, one that may take 30 s needs a new lease.
    (await k.reserve(principal, usd(100n), 10_000)).settle(usd(100n));
    expect(calls.acquire).toBe(before);
    (await k.reserve(principal, usd(100n), 30_000)).settle(usd(100n));
    expect(calls.acquire - before).toBe(1);
    // The old lease, idle, went back to billing before the new one was asked for.
    expect(k.snapshot().get(`organization:${principal.orgId}`)?.leases).toBe(1);
    expect((await leasesOf(principal.orgId))[0]).toEqual({ granted: 10_000n, spent: 200n });
    await k.close();
  });

  test("a wall clock stepped back an hour does not keep a lease in use past the lifetime billing granted", async () => {
    const principal = await principalWith({ org: 10n ** 9n });
    const wallClock = Date.now;
    let stepMs = 0;
    Date.now = () => wallClock.call(Date) + stepMs;
    const { keeper: k } = keeper({ now: undefined, leaseTtlSeconds: 1, settleMarginMs: 0 });
    try {
      const [first] = (await k.reserve(principal, usd(100n), 100)).settle(usd(100n));
      // The host's clock is stepped back (NTP, a restored snapshot); billing's is not.
      stepMs = -3_600_000;
      await Bun.sleep(1_100);
      // The lease has expired, and billing grants its money again after its grace: a request draws on a new one.
      const [second] = (await k.reserve(principal, usd(100n), 100)).settle(usd(100n));
      expect(second?.leaseId).toBeDefined();
      expect(second?.leaseId).not.toBe(first?.leaseId as string);
    } finally {
      Date.now = wallClock;
      await k.close();
    }
  });

  test("idle leases go back to billing with what was spent", async () => {
    const principal = await principalWith({ org: 10n ** 9n });
    const { keeper: k, clock } = keeper({ idleReleaseMs: 5_000, maintenanceIntervalMs: 10 });
    (await k.reserve(principal, usd(100n), 10_000)).settle(usd(70n));
    clock.t += 5_000;
    await until(() => k.snapshot().get(`organization:${principal.orgId}`) === undefined);
    await until(async () => (await leasesOf(principal.orgId))[0]?.spent !== null);
    expect(await leasesOf(principal.orgId)).toEqual([{ granted: 1_000n, spent: 70n }]);
    await k.close();
  });

  test("a release billing missed is sent again until it lands, so an outage does not lock the budget", async () => {
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k, clock } = keeper({
      leaseTtlSeconds: 900,
      minLeaseNanos: 10_000n,
      idleReleaseMs: 5_000,
      maintenanceIntervalMs: 10,
    });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(70n));
    // The lease holds the whole budget, and billing is down when the idle sweep gives it back.
    billingFault = "down";
    try {
      let sent = calls.release;
      clock.t += 5_000;
      await until(() => calls.release > sent);
      expect(k.snapshot().get(`api_key:${principal.apiKeyId}`)?.leases ?? 0).toBe(0);
      // Sent again, later each time, for as long as billing stays down; a request may still ask for a grant.
      for (let i = 0; i < 8; i++) {
        sent = calls.release;
        clock.t += 30_000;
        await until(() => calls.release > sent);
      }
      expect((await refusal(k.reserve(principal, usd(9_000n), 60_000))).code).toBe("budget_unavailable");
      expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: null }]);

      // Billing settles it but its answer is lost: the gateway sends it again, and billing counts it once.
      billingFault = "answer lost";
      clock.t += 30_000;
      await until(async () => (await leasesOf(principal.apiKeyId))[0]?.spent !== null);
      sent = calls.release;
      clock.t += 30_000;
      await until(() => calls.release > sent);
    } finally {
      billingFault = undefined;
    }
    // Billing is back: a request the rest of the budget covers fits.
    (await k.reserve(principal, usd(9_000n), 60_000)).settle(usd(9_000n));
    await k.close();
    expect(await leasesOf(principal.apiKeyId)).toEqual([
      { granted: 10_000n, spent: 70n },
      { granted: 9_930n, spent: 9_000n },
    ]);
    const settlements = await db.pool.query<{ spent: string }>(
      "SELECT sum(spent_nanos)::text AS spent FROM budget_leases WHERE api_key_id = $1 AND released_at IS NOT NULL",
      [principal.apiKeyId],
    );
    expect(settlements.rows[0]?.spent).toBe("9070");
  });

  /** Billing as seen through a connection that loses the answers to the first `times` grants it makes. */
  const losingGrants = (code: Code, times: number): BudgetKeeperOptions["billing"] => ({
    ...billing,
    acquireBudgetLease: async (req) => {
      const res = await billing.acquireBudgetLease(req);
      if (times-- > 0) throw new ConnectError("the connection to billing was reset", code);
      return res;
    },
  });

  test("a grant whose answer is lost is asked for again under its lease id, and adopted rather than granted twice", async () => {
    // Near its end the budget has one lease's worth left: a second grant would find none, and refuse the request.
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k } = keeper({ billing: losingGrants(Code.Unavailable, 1), minLeaseNanos: 10_000n });
    const before = calls.acquire;
    (await k.reserve(principal, usd(9_000n), 60_000)).settle(usd(9_000n));
    expect(calls.acquire - before).toBe(2);
    expect(k.snapshot().get(`api_key:${principal.apiKeyId}`)).toMatchObject({ leases: 1, grantedNanos: 10_000n });
    await k.close();
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: 9_000n }]);
  });

  test("a grant whose answer came too late is asked for again in the background, and its lease serves requests", async () => {
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k, clock } = keeper({
      billing: losingGrants(Code.DeadlineExceeded, 1),
      minLeaseNanos: 10_000n,
      maintenanceIntervalMs: 10,
    });
    // The request that asked is not held for a second deadline.
    expect((await refusal(k.reserve(principal, usd(9_000n), 60_000))).code).toBe("budget_unavailable");
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: null }]);
    clock.t += 1_000;
    await until(() => (k.snapshot().get(`api_key:${principal.apiKeyId}`)?.leases ?? 0) === 1);
    const before = calls.acquire;
    (await k.reserve(principal, usd(9_000n), 60_000)).settle(usd(8_000n));
    expect(calls.acquire).toBe(before);
    await k.close();
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: 8_000n }]);
  });

  test("a grant whose answer stays lost is given back by its lease id, so billing does not hold it to its grace", async () => {
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k, clock } = keeper({
      billing: losingGrants(Code.Unavailable, 2),
      minLeaseNanos: 10_000n,
      idleReleaseMs: 5_000,
      maintenanceIntervalMs: 10,
    });
    expect((await refusal(k.reserve(principal, usd(9_000n), 60_000))).code).toBe("budget_unavailable");
    // Billing goes down: the grant is asked for again, later each time, until asking is no longer worth it.
    billingFault = "down";
    try {
      for (const wait of [1_000, 2_000, 4_000]) {
        const sent = calls.acquire + calls.release;
        clock.t += wait;
        await until(() => calls.acquire + calls.release > sent);
      }
      const sent = calls.release;
      clock.t += 8_000;
      await until(() => calls.release > sent);
    } finally {
      billingFault = undefined;
    }
    // Billing is back: the release lands, and the whole budget is there to grant again.
    clock.t += 30_000;
    await until(async () => (await leasesOf(principal.apiKeyId))[0]?.spent === 0n);
    (await k.reserve(principal, usd(10_000n), 60_000)).settle(usd(10_000n));
    await k.close();
    expect(await leasesOf(principal.apiKeyId)).toEqual([
      { granted: 10_000n, spent: 0n },
      { granted: 10_000n, spent: 10_000n },
    ]);
  });

  test("while billing cannot grant, a request too dear for the leases held leaves them to the requests they cover", async () => {
    const principal = await principalWith({ org: 1_000_000n });
    // As the key checks find it: the gateway's requests check their key before their budget.
    const { keeper: k } = keeper({ minLeaseNanos: 10_000n, billingDown: () => billingFault === "down" });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    billingFault = "down";
    try {
      const releases = calls.release;
      // Too dear for the lease held: billing is asked for more, and cannot answer.
      expect((await refusal(k.reserve(principal, usd(50_000n), 60_000))).code).toBe("budget_unavailable");
      // The lease was kept rather than given back to a billing that could not take it: cheaper requests draw on it.
      expect(calls.release).toBe(releases);
      for (let i = 0; i < 5; i++) (await k.reserve(principal, usd(1_000n), 60_000)).settle(usd(1_000n));
      expect(k.snapshot().get(`organization:${principal.orgId}`)).toMatchObject({ leases: 1, spentNanos: 5_100n });
    } finally {
      billingFault = undefined;
    }
    // Billing is back: the dear request gets its grant, drawing on what the held lease has left too.
    (await k.reserve(principal, usd(50_000n), 60_000)).settle(usd(50_000n));
    await k.close();
    const leases = await leasesOf(principal.orgId);
    expect(leases.map((l) => l.spent).reduce((a, b) => (a ?? 0n) + (b ?? 0n), 0n)).toBe(55_100n);
  });

  test("while billing does not answer, a burst of requests waits one billing call at most, sharing the asks", async () => {
    const principal = await principalWith({ org: 1_000_000n });
    // Billing frozen: every call to it ends at the client's timeout.
    const timeoutMs = 500;
    let frozen = false;
    let asks = 0;
    let unanswered = 0;
    const timedOut = async () => {
      unanswered++;
      await Bun.sleep(timeoutMs);
      unanswered--;
      throw new ConnectError("the operation timed out", Code.DeadlineExceeded);
    };
    const freezing: BudgetKeeperOptions["billing"] = {
      acquireBudgetLease: async (req) => {
        asks++;
        return frozen ? timedOut() : billing.acquireBudgetLease(req);
      },
      releaseBudgetLease: async (req) => (frozen ? timedOut() : billing.releaseBudgetLease(req)),
    };
    const { keeper: k } = keeper({ billing: freezing, minLeaseNanos: 10_000n, billingWaitMs: timeoutMs });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    frozen = true;
    try {
      // Covered by the lease held: served at once, billing not asked.
      const before = asks;
      (await k.reserve(principal, usd(1_000n), 60_000)).settle(usd(1_000n));
      expect(asks).toBe(before);
      // Too dear for it: one request every 100 ms for 1.2 s, each refused within about one call's time (it waited for
      // one ask after another, up to 5 s), the ones that arrive while an ask is out waiting on it rather than asking.
      const answers = await Promise.all(
        Array.from({ length: 12 }, async (_, i) => {
          await Bun.sleep(i * 100);
          const start = performance.now();
          const err = await refusal(k.reserve(principal, usd(50_000n), 60_000));
          return { code: err.code, waitedMs: performance.now() - start };
        }),
      );
      expect(answers.map((a) => a.code)).toEqual(Array(12).fill("budget_unavailable"));
      expect(Math.max(...answers.map((a) => a.waitedMs))).toBeLessThan(timeoutMs * 3);
      expect(asks - before).toBeLessThanOrEqual(4);
      // The last ask out, which a request arriving now would share, fails too.
      await until(() => unanswered === 0);
    } finally {
      frozen = false;
    }
    // Billing answers again: the dear request is granted, and the budget counts exactly what was spent.
    (await k.reserve(principal, usd(50_000n), 60_000)).settle(usd(50_000n));
    await k.close();
    const leases = await leasesOf(principal.orgId);
    expect(leases.map((l) => l.spent).reduce((a, b) => (a ?? 0n) + (b ?? 0n), 0n)).toBe(51_100n);
  });

  test("while billing cannot be asked, an idle lease is kept for the requests it covers, and goes back once it can", async () => {
    const principal = await principalWith({ org: 1_000_000n });
    const { keeper: k, clock } = keeper({
      minLeaseNanos: 10_000n,
      idleReleaseMs: 5_000,
      maintenanceIntervalMs: 10,
      billingDown: () => billingFault === "down",
    });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    billingFault = "down";
    try {
      const releases = calls.release;
      // A lull longer than the idle release time while billing is down: the lease stays.
      clock.t += 6_000;
      await Bun.sleep(50);
      expect(calls.release).toBe(releases);
      for (let i = 0; i < 3; i++) (await k.reserve(principal, usd(1_000n), 60_000)).settle(usd(1_000n));
      expect(k.snapshot().get(`organization:${principal.orgId}`)).toMatchObject({ leases: 1, spentNanos: 3_100n });
    } finally {
      billingFault = undefined;
    }
    // Billing answers again: the lease, idle again, goes back with what was spent.
    clock.t += 6_000;
    await until(() => k.snapshot().get(`organization:${principal.orgId}`) === undefined);
    await until(async () => (await leasesOf(principal.orgId))[0]?.spent !== null);
    expect(await leasesOf(principal.orgId)).toEqual([{ granted: 10_000n, spent: 3_100n }]);
    await k.close();
  });

  test("a release billing missed is sent again after its lease expired, so billing does not hold it for its grace", async () => {
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k, clock } = keeper({
      leaseTtlSeconds: 60,
      minLeaseNanos: 10_000n,
      idleReleaseMs: 5_000,
      maintenanceIntervalMs: 10,
    });
    (await k.reserve(principal, usd(100n), 30_000)).settle(usd(70n));
    billingFault = "down";
    try {
      let sent = calls.release;
      clock.t += 5_000;
      await until(() => calls.release > sent);
      // The outage outlasts the lease: its release is still sent, later each time.
      for (let i = 0; i < 4; i++) {
        sent = calls.release;
        clock.t += 30_000;
        await until(() => calls.release > sent);
      }
    } finally {
      billingFault = undefined;
    }
    clock.t += 30_000;
    await until(async () => (await leasesOf(principal.apiKeyId))[0]?.spent !== null, 3_000);
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: 70n }]);
    await k.close();
  });

  test("an org's new budget reaches every key a gateway caches, through one change on billing's stream", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}`, monthlyBudgetNanos: 100_000n }, auth);
    const orgId = org.organization?.id as string;
    const secrets: string[] = [];
    for (const name of ["a", "b"]) secrets.push((await client.createApiKey({ orgId, name }, auth)).secret);
    const keys = createKeyAuthorizer({ billing: { authorizeKey: (req) => client.authorizeKey(req, auth) } });
    const watch = watchKeyChanges({
      billing: { watchKeyChanges: (req, options) => client.watchKeyChanges(req, { ...options, ...auth }) },
      keys,
    });
    const budgets = async () =>
      Promise.all(secrets.map(async (s) => (await keys.authorize(s)).grant.organization?.monthlyBudgetNanos));
    try {
      await until(() => watch.healthy());
      // Cached for the full TTL from here on, since the stream is healthy.
      expect(await budgets()).toEqual([100_000n, 100_000n]);
      await client.updateOrganization({ orgId, monthlyBudgetNanos: 5_000n }, auth);
      await until(async () => (await budgets()).every((b) => b === 5_000n), 5_000);
    } finally {
      await watch.stop();
    }
  });

  test("a budget set over spend still on its way to billing holds it: the scope's first grant waits until it is recorded", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}` }, auth);
    const orgId = org.organization?.id as string;
    const key = await client.createApiKey({ orgId, name: "k" }, auth);
    const authorize = () => authorizedAfresh(key.secret);
    // The spool as the keeper sees it: rows spooled, and how many of the first analytics acked once billing had them.
    const rows = { spooled: 0, acked: 0 };
    const ingest = { recordedRows: () => rows.spooled, ackedRows: () => rows.acked };
    const { keeper: k, clock } = keeper({ minLeaseNanos: 10_000n, billingWaitMs: 200, ingest });
    // Served with no budget anywhere: 7 requests of 100,000, their rows spooled, none recorded yet.
    const before = await authorize();
    for (let i = 0; i < 7; i++) {
      (await k.reserve(before, usd(100_000n), 60_000)).settle(usd(100_000n));
      rows.spooled++;
    }
    // A budget of 800,000 for the key and one of 750,000 for its org: 100,000 and 50,000 left of them.
    await client.updateApiKeyLimits({ apiKeyId: key.apiKey?.id as string, limits: { monthlyBudgetNanos: 800_000n } }, auth);
    await client.updateOrganization({ orgId, monthlyBudgetNanos: 750_000n }, auth);
    clock.t += 1;
    const after = await authorize();
    // Billing would grant them whole: the grant waits for the spend, then says why it cannot wait longer.
    const acquired = calls.acquire;
    const waiting = await refusal(k.reserve(after, usd(40_000n), 60_000));
    expect([waiting.status, waiting.code]).toEqual([503, "budget_unavailable"]);
    expect(waiting.message).toContain("still on its way to billing");
    expect(calls.acquire).toBe(acquired);
    // Recorded (analytics acks the rows once billing has them): the budgets count it, and hold.
    const records = Array.from({ length: 7 }, (_, i) => usageNow(before, `req_unleased_${orgId}_${i}`, 100_000n, []));
    expect((await client.recordUsage({ records }, auth)).inserted).toBe(7);
    rows.acked = 6;
    const lastRow = k.reserve(after, usd(40_000n), 60_000);
    await Bun.sleep(60);
    expect(calls.acquire).toBe(acquired);
    rows.acked = 7;
    (await lastRow).settle(usd(40_000n));
    rows.spooled++;
    clock.t += 2_000;
    // 10,000 left of the org's budget, 60,000 of the key's.
    expect((await refusal(k.reserve(after, usd(20_000n), 60_000))).code).toBe("insufficient_quota");
    await k.close();
  });

  test("a budget lowered below its spend is refused at once; running requests keep their reservations", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}`, monthlyBudgetNanos: 100_000n }, auth);
    const orgId = org.organization?.id as string;
    const key = await client.createApiKey({ orgId, name: "k", limits: { monthlyBudgetNanos: 100_000n } }, auth);
    // A fresh authorization each time, as after billing announced the key's change.
    const authorize = () => authorizedAfresh(key.secret);
    const { keeper: k, clock } = keeper({ minLeaseNanos: 50_000n });
    const before = await authorize();
    for (let i = 0; i < 10; i++) (await k.reserve(before, usd(1_000n), 60_000)).settle(usd(1_000n));
    const running = await k.reserve(before, usd(1_000n), 60_000);

    await client.updateOrganization({ orgId, monthlyBudgetNanos: 5_000n }, auth);
    clock.t += 1;
    const lowered = await authorize();
    expect((await refusal(k.reserve(lowered, usd(1_000n), 60_000))).code).toBe("insufficient_quota");
    // The request that was running settles on its lease, which then goes back with what it spent.
    expect(running.settle(usd(1_000n))).toHaveLength(2);
    await until(async () => (await leasesOf(orgId)).every((l) => l.spent !== null));

    // A key's budget, the same.
    await client.updateOrganization({ orgId, monthlyBudgetNanos: 0n }, auth);
    clock.t += 1;
    (await k.reserve(await authorize(), usd(1_000n), 60_000)).settle(usd(1_000n));
    await client.updateApiKeyLimits({ apiKeyId: key.apiKey?.id as string, limits: { monthlyBudgetNanos: 12_000n } }, auth);
    clock.t += 1;
    expect((await refusal(k.reserve(await authorize(), usd(1_000n), 60_000))).code).toBe("insufficient_quota");
    await k.close();
    const spent = (leases: { spent: bigint | null }[]) => leases.reduce((sum, l) => sum + (l.spent ?? 0n), 0n);
    expect(spent(await leasesOf(orgId))).toBe(11_000n);
    expect(spent(await leasesOf(key.apiKey?.id as string))).toBe(12_000n);
  });

  test("a budget removed gives its leases back at once, so set again it holds what was spent while it was unset", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}` }, auth);
    const orgId = org.organization?.id as string;
    const key = await client.createApiKey({ orgId, name: "k", limits: { monthlyBudgetNanos: 100_000n } }, auth);
    const apiKeyId = key.apiKey?.id as string;
    const authorize = () => authorizedAfresh(key.secret);
    const { keeper: k, clock } = keeper({ minLeaseNanos: 50_000n });
    const limited = await authorize();
    const first = await k.reserve(limited, usd(1_000n), 60_000);
    const charges = first.settle(usd(1_000n));
    expect((await client.recordUsage({ records: [usageNow(limited, "removed-1", 1_000n, charges)] }, auth)).inserted).toBe(1);

    await client.updateApiKeyLimits({ apiKeyId, limits: { monthlyBudgetNanos: 0n } }, auth);
    clock.t += 1;
    const unlimited = await authorize();
    (await k.reserve(unlimited, usd(99_000n), 60_000)).settle(usd(99_000n));
    // Served while the key had no budget, and recorded.
    expect((await client.recordUsage({ records: [usageNow(unlimited, "removed-2", 99_000n, [])] }, auth)).inserted).toBe(1);

    await client.updateApiKeyLimits({ apiKeyId, limits: { monthlyBudgetNanos: 100_000n } }, auth);
    clock.t += 1;
    // The lease of 50,000 granted before it was removed would have covered this.
    expect((await refusal(k.reserve(await authorize(), usd(1_000n), 60_000))).code).toBe("insufficient_quota");
    await k.close();
    expect(await leasesOf(apiKeyId)).toEqual([{ granted: 50_000n, spent: 1_000n }]);
  });

  test("a key's monthly tokens are leased in tokens beside its budget; lowered, they apply at once; revoked, they go back", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}` }, auth);
    const orgId = org.organization?.id as string;
    const limits = { monthlyBudgetNanos: 1_000_000n, monthlyTokens: 1_000n };
    const key = await client.createApiKey({ orgId, name: "k", limits }, auth);
    const keyId = key.apiKey?.id as string;
    const authorize = () => authorizedAfresh(key.secret);
    const { keeper: k, clock } = keeper({ minLeaseNanos: 10_000n, minLeaseTokens: 300n });
    const principal = await authorize();
    // Each budget is charged in its own unit: the cost from the money lease, the tokens from the token lease.
    const reservation = await k.reserve(principal, { nanos: 2_000n, tokens: 200n }, 60_000);
    const charges = reservation.settle({ nanos: 900n, tokens: 90n });
    expect(charges.map(({ nanos, tokens }) => ({ nanos, tokens })).sort((a, b) => Number(a.nanos - b.nanos))).toEqual([
      { nanos: 0n, tokens: 90n },
      { nanos: 900n, tokens: 0n },
    ]);
    expect(k.snapshot().get(`api_key_tokens:${keyId}`)).toEqual({
      leases: 1,
      grantedNanos: 300n,
      spentNanos: 90n,
      reservedNanos: 0n,
    });
    // The token lease's 210 left do not cover 300 tokens: billing grants more, up to the 910 unspent of the limit.
    const running = await k.reserve(principal, { nanos: 100n, tokens: 300n }, 60_000);
    const refused = await refusal(k.reserve(principal, { nanos: 100n, tokens: 700n }, 60_000));
    expect(refused).toMatchObject({ status: 429, code: "insufficient_quota", retryAfterS: 30 });
    expect(refused.message).toContain("up to 700 tokens");
    expect(refused.message).toContain("monthly limit of 1000 tokens");

    // Lowered below what was used, the limit refuses the next request; the one running settles on its lease.
    await client.updateApiKeyLimits({ apiKeyId: keyId, limits: { ...limits, monthlyTokens: 100n } }, auth);
    clock.t += 1;
    expect((await refusal(k.reserve(await authorize(), { nanos: 100n, tokens: 1n }, 60_000))).code).toBe(
      "insufficient_quota",
    );
    running.settle({ nanos: 100n, tokens: 50n });
    // Revoked, the key's token leases go back with the money ones.
    await client.updateApiKeyLimits({ apiKeyId: keyId, limits }, auth);
    clock.t += 1;
    (await k.reserve(await authorize(), { nanos: 100n, tokens: 10n }, 60_000)).settle({ nanos: 100n, tokens: 10n });
    k.releaseKey(keyId);
    await until(async () => {
      const { rows } = await db.pool.query<{ open: number }>(
        "SELECT count(*)::int AS open FROM budget_leases WHERE api_key_id = $1 AND released_at IS NULL",
        [keyId],
      );
      return rows[0]?.open === 0;
    });
    const { rows } = await db.pool.query<{ scope: string; spent: string }>(
      `SELECT scope, sum(spent_nanos)::text AS spent FROM budget_leases WHERE api_key_id = $1
       GROUP BY scope ORDER BY scope`,
      [keyId],
    );
    expect(rows).toEqual([
      { scope: "api_key", spent: "1100" },
      { scope: "api_key_tokens", spent: "150" },
    ]);
    await k.close();
  });

  test("a revoked key's budget cannot be leased: 401", async () => {
    const principal = await principalWith({ key: 1_000n });
    await client.revokeApiKey({ apiKeyId: principal.apiKeyId }, auth);
    const { keeper: k } = keeper();
    expect((await refusal(k.reserve(principal, usd(10n), 60_000))).status).toBe(401);
    await k.close();
  });

  test("a suspended org's budget cannot be leased: 403 organization_suspended", async () => {
    const principal = await principalWith({ org: 1_000n });
    await client.suspendOrganization({ orgId: principal.orgId }, auth);
    const { keeper: k } = keeper();
    expect(await refusal(k.reserve(principal, usd(10n), 60_000))).toMatchObject({ status: 403, code: "organization_suspended" });
    await k.close();
  });

  test("a revoked key's leases go back to billing at once, or when their last request settles", async () => {
    const principal = await principalWith({ key: 10_000n });
    const { keeper: k } = keeper({ minLeaseNanos: 10_000n });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(60n));
    const running = await k.reserve(principal, usd(100n), 60_000);
    // The lease holds the whole budget: a successor of this key gets nothing until it comes back.
    const rotated = await client.rotateApiKey({ apiKeyId: principal.apiKeyId }, auth);
    const successor = {
      scope: BudgetScope.API_KEY,
      scopeId: rotated.apiKey?.id as string,
      holder: "gw-other",
      ttlSeconds: 60,
    };
    expect((await client.acquireBudgetLease({ ...successor, requestedNanos: 1n }, auth)).grantedNanos).toBe(0n);

    k.releaseKey(principal.apiKeyId);
    // A request still running keeps the lease until it settles.
    expect(k.snapshot().get(`api_key:${principal.apiKeyId}`)?.leases).toBe(1);
    running.settle(usd(40n));
    await until(async () => (await leasesOf(principal.apiKeyId))[0]?.spent !== null);
    expect(await leasesOf(principal.apiKeyId)).toEqual([{ granted: 10_000n, spent: 100n }]);
    expect(await client.acquireBudgetLease({ ...successor, requestedNanos: 20_000n }, auth)).toMatchObject({
      grantedNanos: 9_900n,
    });

    // An idle lease goes back at once.
    const idle = await principalWith({ key: 10_000n });
    (await k.reserve(idle, usd(100n), 60_000)).settle(usd(30n));
    k.releaseKey(idle.apiKeyId);
    await until(async () => (await leasesOf(idle.apiKeyId))[0]?.spent !== null);
    expect(await leasesOf(idle.apiKeyId)).toEqual([{ granted: 10_000n, spent: 30n }]);
    await k.close();
  });

  test("a key billing refused that works again (its expiry moved, its org reinstated) keeps its leases as before", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}` }, auth);
    const orgId = org.organization?.id as string;
    const key = await client.createApiKey({ orgId, name: "k", limits: { monthlyBudgetNanos: 100_000n } }, auth);
    const authorize = () => authorizedAfresh(key.secret);
    const { keeper: k } = keeper({ minLeaseNanos: 10_000n });
    const before = await authorize();
    (await k.reserve(before, usd(100n), 60_000)).settle(usd(100n));
    // Refused by billing in a check begun now: its lease goes back, as a revoked key's does.
    k.releaseKey(before.apiKeyId, performance.timeOrigin + performance.now());
    await until(async () => (await leasesOf(before.apiKeyId)).every((l) => l.spent !== null));
    // A request of a principal from before the refusal still gives its lease back as it settles.
    (await k.reserve(before, usd(100n), 60_000)).settle(usd(100n));
    await until(async () => (await leasesOf(before.apiKeyId)).every((l) => l.spent !== null));

    const again = await authorize();
    const asked = calls.acquire;
    for (let i = 0; i < 5; i++) (await k.reserve(again, usd(100n), 60_000)).settle(usd(100n));
    // One grant serves them all, rather than a grant and a release each.
    expect(calls.acquire - asked).toBe(1);
    expect(k.snapshot().get(`api_key:${before.apiKeyId}`)?.leases).toBe(1);
    await k.close();
  });

  test("a revoked key's lease granted while billing was being asked goes back as it arrives", async () => {
    const principal = await principalWith({ key: 10_000n });
    let gate: Promise<unknown> | undefined;
    const gated: BudgetKeeperOptions["billing"] = {
      ...billing,
      acquireBudgetLease: async (req) => {
        await gate;
        return billing.acquireBudgetLease(req);
      },
    };
    const { keeper: k } = keeper({ billing: gated, minLeaseNanos: 1_000n });
    (await k.reserve(principal, usd(100n), 60_000)).settle(usd(100n));
    // A request that leaves its lease low has more asked for in the background; billing is slow to answer.
    const slow = Promise.withResolvers<void>();
    gate = slow.promise;
    (await k.reserve(principal, usd(600n), 60_000)).settle(usd(600n));
    k.releaseKey(principal.apiKeyId);
    slow.resolve();
    await until(async () => (await leasesOf(principal.apiKeyId)).length === 2);
    await until(async () => (await leasesOf(principal.apiKeyId)).every((l) => l.spent !== null), 2_000);
    expect(k.snapshot().get(`api_key:${principal.apiKeyId}`)?.leases).toBe(0);
    await k.close();
  });

  test("two replicas racing for one budget never hold or spend more than it", async () => {
    const cost = 700n;
    const budget = cost * 20n;
    const principal = await principalWith({ key: budget });
    const replicas = [
      keeper({ holder: "gw-a", minLeaseNanos: cost * 3n }),
      keeper({ holder: "gw-b", minLeaseNanos: cost * 3n }),
    ];
    const results = await Promise.all(
      Array.from({ length: 200 }, async (_, i) => {
        const k = (replicas[i % 2] as (typeof replicas)[number]).keeper;
        try {
          const r = await k.reserve(principal, usd(cost), 60_000);
          await Bun.sleep(1);
          r.settle(usd(cost));
          return true;
        } catch (e) {
          expect((e as GatewayError).code).toBe("insufficient_quota");
          return false;
        }
      }),
    );
    const served = results.filter(Boolean).length;
    await Promise.all(replicas.map((r) => r.keeper.close()));
    const leases = await leasesOf(principal.apiKeyId);
    const spent = leases.reduce((sum, l) => sum + (l.spent ?? 0n), 0n);
    expect(BigInt(served) * cost).toBe(spent);
    expect(spent).toBeLessThanOrEqual(budget);
    expect(served).toBeLessThanOrEqual(20);
    // Every request that fit was served once billing had the leases back: nothing is stranded for long.
    expect(served).toBeGreaterThanOrEqual(14);
  });

  test("two replicas each holding half of the last request's money do not swap the halves, refusing it both ways", async () => {
    const principal = await principalWith({ key: 1_000n });
    const a = keeper({ holder: "gw-a", minLeaseNanos: 1n });
    const b = keeper({ holder: "gw-b", minLeaseNanos: 1n });
    // Each replica holds half of the budget, idle: requests there cost less than they reserved.
    (await a.keeper.reserve(principal, usd(500n), 60_000)).settle(usd(0n));
    (await b.keeper.reserve(principal, usd(500n), 60_000)).settle(usd(0n));
    // A refused request gives back what it held and what billing had left: too little for it, it may be enough elsewhere.
    const served: string[] = [];
    for (let i = 0; i < 4; i++) {
      const r = i % 2 === 0 ? a : b;
      r.clock.t += 1_000;
      try {
        (await r.keeper.reserve(principal, usd(1_000n), 60_000)).settle(usd(1_000n));
        served.push(r === a ? "a" : "b");
      } catch (e) {
        expect((e as GatewayError).code).toBe("insufficient_quota");
      }
    }
    expect(served).toEqual(["b"]);
    await Promise.all([a.keeper.close(), b.keeper.close()]);
    expect((await leasesOf(principal.apiKeyId)).reduce((sum, l) => sum + (l.spent ?? 0n), 0n)).toBe(1_000n);
  });

  // Near a budget's end (within twice billing's holder floor) one replica may be granted the rest of a budget whole.
  // A replica refused for one of a request's budgets gives back what it holds idle of the others that request drew on,
  // or one replica's idle token lease and the others' idle money leases would refuse each other until idle release.
  test("replicas refused for a key's tokens or its money give the other back, so the key's whole budget is served", async () => {
    const org = await client.createOrganization({ name: `budget-org-${++orgs}` }, auth);
    const orgId = org.organization?.id as string;
    const most = { nanos: 2_000_950n, tokens: 115n };
    const limits = { monthlyBudgetNanos: most.nanos * 6n, monthlyTokens: 1_000n };
    const key = await client.createApiKey({ orgId, name: "k", limits }, auth);
    const principal = await authorizedAfresh(key.secret);
    const replicas = ["gw-0", "gw-1", "gw-2"].map((holder) => keeper({ holder, minLeaseNanos: 1_000_000n }));
    let served = 0;
    for (let i = 0; i < 30; i++) {
      // Round robin, a request every 400 ms: well within the 30 s after which idle leases go back anyway.
      for (const r of replicas) r.clock.t += 400;
      try {
        (await (replicas[i % 3] as (typeof replicas)[number]).keeper.reserve(principal, most, 60_000)).settle(most);
        served++;
      } catch (e) {
        expect((e as GatewayError).code).toBe("insufficient_quota");
      }
    }
    await Promise.all(replicas.map((r) => r.keeper.close()));
    const { rows } = await db.pool.query<{ scope: string; spent: string }>(
      `SELECT scope, sum(spent_nanos)::text AS spent FROM budget_leases WHERE api_key_id = $1
       GROUP BY scope ORDER BY scope`,
      [principal.apiKeyId],
    );
    expect(rows).toEqual([
      { scope: "api_key", spent: String(most.nanos * 6n) },
      { scope: "api_key_tokens", spent: String(most.tokens * 6n) },
    ]);
    expect(served).toBe(6);
  });

  test("a key refused for its own budget gives back the org lease it alone drew on, for the org's other keys", async () => {
    const cost = 2_000_000n;
    const org = await client.createOrganization({ name: `budget-org-${++orgs}`, monthlyBudgetNanos: cost * 10n }, auth);
    const orgId = org.organization?.id as string;
    const keys = createKeyAuthorizer({
      billing: { authorizeKey: (req) => client.authorizeKey(req, auth) },
      watching: true,
    });
    const cappedLimits = { monthlyBudgetNanos: cost * 3n };
    const capped = await client.createApiKey({ orgId, name: "capped", limits: cappedLimits }, auth);
    const other = await client.createApiKey({ orgId, name: "other" }, auth);
    const [a, b] = [await keys.authorize(capped.secret), await keys.authorize(other.secret)];
    const pinned = keeper({ holder: "gw-0", minLeaseNanos: 1_000_000n });
    const elsewhere = keeper({ holder: "gw-1", minLeaseNanos: 1_000_000n });
    for (let i = 0; i < 3; i++) (await pinned.keeper.reserve(a, usd(cost), 60_000)).settle(usd(cost));
    pinned.clock.t += 1_000;
    expect((await refusal(pinned.keeper.reserve(a, usd(cost), 60_000))).code).toBe("insufficient_quota");
    // The other key, served by another replica, spends the rest of the org's budget within the idle release time.
    let served = 0;
    for (let i = 0; i < 10; i++) {
      elsewhere.clock.t += 1_000;
      try {
        (await elsewhere.keeper.reserve(b, usd(cost), 60_000)).settle(usd(cost));
        served++;
      } catch (e) {
        expect((e as GatewayError).code).toBe("insufficient_quota");
      }
    }
    expect(served).toBe(7);
    await Promise.all([pinned.keeper.close(), elsewhere.keeper.close()]);
    const spent = (await leasesOf(orgId)).reduce((sum, l) => sum + (l.spent ?? 0n), 0n);
    expect(spent).toBe(cost * 10n);

    // An org lease another key drew on since stays with the replica its requests go to.
    const shared = keeper({ holder: "gw-2", minLeaseNanos: cost * 10n });
    const org2 = await client.createOrganization(
      { name: `budget-org-${++orgs}`, monthlyBudgetNanos: cost * 100n },
      auth,
    );
    const orgId2 = org2.organization?.id as string;
    const spentLimits = { monthlyBudgetNanos: cost };
    const spentKey = await client.createApiKey({ orgId: orgId2, name: "spent", limits: spentLimits }, auth);
    const busyKey = await client.createApiKey({ orgId: orgId2, name: "busy" }, auth);
    const [spender, busy] = [await keys.authorize(spentKey.secret), await keys.authorize(busyKey.secret)];
    (await shared.keeper.reserve(spender, usd(cost), 60_000)).settle(usd(cost));
    (await shared.keeper.reserve(busy, usd(cost), 60_000)).settle(usd(cost));
    const before = calls.release;
    expect((await refusal(shared.keeper.reserve(spender, usd(cost), 60_000))).code).toBe("insufficient_quota");
    expect(calls.release).toBe(before);
    (await shared.keeper.reserve(busy, usd(cost), 60_000)).settle(usd(cost));
    await shared.keeper.close();
  });
});

describe("maximum cost of a request", () => {
  const price = {
    inputMicros: 2_500_000n,
    cachedInputMicros: 1_250_000n,
    outputMicros: 10_000_000n,
    reasoningMicros: 10_000_000n,
  };

  test("input is bounded by UTF-8 bytes plus framing, never below the token count", () => {
    const messages = [
      { role: "system" as const, content: "be brief" },
      { role: "user" as const, content: "héllo wörld, 你好" },
      {
        role: "user" as const,
        content: [
          { type: "text" as const, text: "part" },
          { type: "image_url" as const, image_url: { url: "data:," } },
        ],
      },
    ];
    const bound = maxInputTokens({ messages });
    expect(bound).toBeGreaterThanOrEqual(approxInputTokens(messages));
    // The image, on a model whose image rules are not known here, at the most any of OpenAI's models bills for one.
    expect(bound).toBe(3 + (8 + 6 + 8) + (8 + 4 + 21) + (8 + 4 + 4 + 48_169));
    expect(maxInputTokens({ messages, tools: [{ type: "function", function: { name: "f" } }] })).toBe(
      bound + JSON.stringify([{ type: "function", function: { name: "f" } }]).length + 32,
    );
  });

  test("an image, a file or an audio part is reserved at its kind's bound, whatever few bytes it takes", () => {
    const withPart = (part: ChatCompletionContentPart) =>
      maxInputTokens({ messages: [{ role: "user", content: [part] }] });
    // Reply priming, then one user message's framing and role.
    const framing = 3 + 8 + 4;
    // An image on a model of no known family: the most any of OpenAI's bills for one (gpt-4o-mini's 8 tiles).
    expect(withPart({ type: "image_url", image_url: { url: "data:," } })).toBe(framing + 48_169);
    // On a route's models, the most the dearest of them bills for it: exact where its data URL tells its size.
    const image = (url: string) => ({ role: "user" as const, content: [{ type: "image_url" as const, image_url: { url } }] });
    expect(maxInputTokens({ messages: [image(imageDataUrl("png", 1024, 1024))] }, ["gpt-4o"])).toBe(framing + 765);
    expect(maxInputTokens({ messages: [image("https://example.com/a.png")] }, ["gpt-4o", "gpt-4o-mini"])).toBe(
      framing + 2833 + 8 * 5667,
    );
    // A PDF of hundreds of pages, named by id or sent inline, fills at most gpt-4.1's whole context window.
    expect(withPart({ type: "file", file: { file_id: "file-abc123" } })).toBe(framing + 1_047_576);
    expect(
      withPart({ type: "file", file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0=" } }),
    ).toBe(framing + 1_047_576);
    // Audio fills at most the 128,000-token context of OpenAI's audio models.
    expect(withPart({ type: "input_audio", input_audio: { data: "UklGRg==", format: "wav" } })).toBe(framing + 128_000);
  });

  test("legacy function definitions and an assistant's function_call are reserved as tools and tool calls are", () => {
    const messages = [{ role: "user" as const, content: "hi" }];
    const bound = maxInputTokens({ messages });
    const functions = [{ name: "weather", description: "d".repeat(40_000) }];
    expect(maxInputTokens({ messages, functions })).toBe(bound + JSON.stringify(functions).length + 32);
    const function_call = { name: "weather", arguments: JSON.stringify({ notes: "n".repeat(40_000) }) };
    const called = [...messages, { role: "assistant" as const, content: null, function_call }];
    // The assistant turn's framing and role, then the call.
    expect(maxInputTokens({ messages: called })).toBe(bound + 8 + 9 + JSON.stringify(function_call).length);
  });

  test("an assistant turn without content is reserved at its refusal's bytes, or the audio bound for audio by id", () => {
    // Reply priming, then one assistant message's framing and role.
    const framing = 3 + 8 + 9;
    expect(maxInputTokens({ messages: [{ role: "assistant", audio: { id: "audio_abc" } }] })).toBe(framing + 128_000);
    expect(maxInputTokens({ messages: [{ role: "assistant", content: null, refusal: "I can't" }] })).toBe(framing + 7);
  });

  test("output is max_completion_tokens or max_tokens, the larger of both, else the cap, times n", () => {
    // Both go upstream, and one that reads only max_tokens produces up to 99 a choice.
    expect(maxOutputTokens({ max_completion_tokens: 10, max_tokens: 99, n: 3 }, 4096)).toBe(297);
    expect(maxOutputTokens({ max_completion_tokens: 99, max_tokens: 10 }, 4096)).toBe(99);
    expect(maxOutputTokens({ max_completion_tokens: 10 }, 4096)).toBe(10);
    expect(maxOutputTokens({ max_tokens: 99 }, 4096)).toBe(99);
    expect(maxOutputTokens({}, 4096)).toBe(4096);
  });

  test("cost prices every token at the dearest rate of its kind", () => {
    const request = { messages: [{ role: "user" as const, content: "abcd" }], max_tokens: 10 };
    const bound = maxChatSpend(request, price, 4096).nanos;
    const input = maxInputTokens(request);
    expect(bound).toBe(
      costNanos({ inputTokens: BigInt(input), cachedInputTokens: 0n, outputTokens: 10n, reasoningTokens: 0n }, price),
    );
    const dearReasoning = { ...price, reasoningMicros: 40_000_000n };
    expect(maxChatSpend(request, dearReasoning, 4096).nanos).toBeGreaterThan(bound);
    const dearAudio = { ...price, audioInputMicros: 40_000_000n, audioOutputMicros: 80_000_000n };
    const allAudio = { inputTokens: BigInt(input), cachedInputTokens: 0n, outputTokens: 10n, reasoningTokens: 0n };
    expect(maxChatSpend(request, dearAudio, 4096).nanos).toBe(
      costNanos({ ...allAudio, audioInputTokens: allAudio.inputTokens, audioOutputTokens: 10n }, dearAudio),
    );
  });
});
