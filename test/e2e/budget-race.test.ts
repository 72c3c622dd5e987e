/**
 * Budgets under concurrency, with real processes: billing, analytics and two gateway replicas share one key whose
 * budget covers exactly N requests of known cost, and 10*N requests race for it (then 2*N more once leftovers can be
 * granted again). Settled spend must stay within the budget plus the documented estimation bound (zero here: the mock
 * never exceeds its reserved maximum), at most N requests may succeed, every request is billed once, and every lease
 * must be released with its spend recorded against it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { decodeTime } from "ulid";
import { eventually } from "../support.ts";
import {
  billedUsage,
  raceChat,
  raceInputTokens,
  raceMaxTokens,
  raceWaves,
  type Replicas,
  startReplicas,
  streamsConfirmed,
} from "./replicas.ts";

const N = 20;
// Input $0.01 and output $100 per million tokens: 10 and 100,000 nano-USD a token.
const costPerRequest = raceInputTokens * 10n + BigInt(raceMaxTokens) * 100_000n;
const budget = costPerRequest * BigInt(N);
// Overshoot bound of budget.ts: the sum of (actual - reserved) over requests where positive; the mock never goes over.
const estimationBound = 0n;

let replicas: Replicas;
let billing: Replicas["billing"];
let orgId: string;

beforeAll(async () => {
  const gatewayEnv = {
    // Small leases (a burst would otherwise take the whole budget in one): many grants and releases race in billing.
    GATEWAY_BUDGET_MIN_LEASE_NANOS: String(costPerRequest * 2n),
    GATEWAY_BUDGET_MAX_LEASE_NANOS: String(costPerRequest * 3n),
  };
  replicas = await startReplicas({ name: "race", pricing: { input: "0.01", output: "100" }, gatewayEnv });
  billing = replicas.billing;
  orgId = (await billing.createOrganization({ name: "race" })).organization?.id as string;
}, 120_000);

afterAll(async () => {
  await replicas?.stop();
}, 60_000);

interface LeaseRow {
  id: string;
  holder: string;
  granted_nanos: string;
  spent_nanos: string | null;
  released_at: Date | null;
}

describe("a budget raced by two gateway replicas", () => {
  test(
    `${10 * N} concurrent requests against a budget for ${N}: no overspend, every lease's spend recorded once`,
    async () => {
      const { secret, apiKey } = await billing.createApiKey({ orgId, name: "race", limits: { monthlyBudgetNanos: budget } });
      const keyId = apiKey?.id as string;
      const { db, mesh, second } = replicas;

      const responses = await raceWaves(replicas.gateways, secret, N);
      const total = responses.length;
      const statuses = responses.map((r) => r.status);
      const served = responses.filter((r) => r.status === 200);
      const costs = served.map((r) => BigInt(r.headers.get("x-gateway-cost-nanos") ?? "-1"));
      const refusals = await Promise.all(responses.filter((r) => r.status !== 200).map((r) => r.json()));
      for (const body of refusals) expect(body).toMatchObject({ error: { code: "insufficient_quota", type: "insufficient_quota" } });
      expect(new Set(statuses)).toEqual(new Set([200, 429]));
      for (const cost of costs) expect(cost).toBe(costPerRequest);
      expect(served.length).toBeLessThanOrEqual(N);
      // The reserved maximum (bytes, not characters, of the prompt) is a little above the cost, so the last request
      // may not fit, and each replica may be refused while the other still holds less than one reservation.
      expect(served.length).toBeGreaterThanOrEqual(N - 3);

      // The pipeline drains: billing has a usage record for every request, refused ones at no cost.
      const spent = (await billedUsage(billing, orgId, keyId, total)).costNanos;
      expect(spent).toBe(costPerRequest * BigInt(served.length));
      expect(spent).toBeLessThanOrEqual(budget + estimationBound);

      // Replicas hand their leases back on shutdown, reporting what they spent.
      expect(await second.stop()).toBe(0);
      expect(await mesh.processes.gateway.stop()).toBe(0);
      const { rows } = await db.pool.query<LeaseRow>(
        "SELECT id, holder, granted_nanos, spent_nanos, released_at FROM budget_leases WHERE api_key_id = $1",
        [keyId],
      );
      expect(rows.length).toBeGreaterThan(2);
      // Each replica's leases name it (and its process's life).
      expect(new Set(rows.map((r) => r.holder.split("/")[0]))).toEqual(new Set(["race-gw-1", "race-gw-2"]));
      for (const row of rows) expect(row.released_at).not.toBeNull();
      const reported = rows.reduce((sum, r) => sum + BigInt(r.spent_nanos ?? 0), 0n);
      expect(reported).toBe(spent);
      // Each request's usage named the leases it was drawn from: every lease's spend is recorded against it, so
      // billing counts none of it twice and none beyond its usage.
      const recorded = await db.pool.query<{ id: string; spent: string; recorded: string }>(
        "SELECT id, spent_nanos::text AS spent, recorded_nanos::text AS recorded FROM budget_leases WHERE api_key_id = $1",
        [keyId],
      );
      for (const lease of recorded.rows) expect(lease.recorded).toBe(lease.spent);

      // Money outstanding (granted, not yet returned) over time, replayed for the log only: lease ids are minted by the
      // gateways before they ask, and billing's timestamps are the calls' arrivals, before the scope's lock, so the
      // order grants and releases took under the lock cannot be recovered from them (a replay put the peak up to 2.5%
      // over the budget in runs where nothing was spent past it). That grants under the lock keep to the budget is
      // checked in billing/store/budget-leases.test.ts; what matters here, spend within the budget, is checked above.
      const events = rows.flatMap((r) => [
        { at: decodeTime(r.id.slice("lease_".length)), delta: BigInt(r.granted_nanos), release: false },
        { at: (r.released_at as Date).getTime(), delta: -(BigInt(r.granted_nanos) - BigInt(r.spent_nanos ?? 0)), release: true },
      ]);
      events.sort((a, b) => a.at - b.at || Number(b.release) - Number(a.release));
      let outstanding = 0n;
      let peak = 0n;
      for (const e of events) {
        outstanding += e.delta;
        if (outstanding > peak) peak = outstanding;
      }
      const granted = rows.reduce((sum, r) => sum + BigInt(r.granted_nanos), 0n);
      process.stdout.write(
        `budget race: N=${N} budget=${budget} served=${served.length} spent=${spent} overshoot=${spent - budget} ` +
          `leases=${rows.length} granted_total=${granted} peak_outstanding=${peak}\n`,
      );

      mesh.processes.gateway = await mesh.restart("gateway");
      replicas.gateways = [mesh.urls.gateway];
    },
    120_000,
  );

  test("a revoked key is refused by a gateway that had it cached within a second; a limit change too", async () => {
    const gateway = replicas.gateways[0] as string;
    await streamsConfirmed([gateway]); // the restarted gateway
    // Within a second here, though a busy machine may take longer: well before the key's 30 s in the cache ends.
    const { secret, apiKey } = await billing.createApiKey({ orgId, name: "revoked soon" });
    const keyId = apiKey?.id as string;
    expect((await raceChat(gateway, secret)).status).toBe(200);

    // Limits: this key may no longer use the model.
    const narrowed = Date.now();
    await billing.updateApiKeyLimits({ apiKeyId: keyId, limits: { allowedModels: ["something-else"] } });
    const forbidden = await eventually(async () => ((await raceChat(gateway, secret)).status === 403 ? Date.now() : undefined), { timeoutMs: 15_000 });
    expect(forbidden - narrowed).toBeLessThan(5_000);
    await billing.updateApiKeyLimits({ apiKeyId: keyId, limits: {} });
    await eventually(async () => ((await raceChat(gateway, secret)).status === 200 ? true : undefined), { timeoutMs: 5_000 });

    const revoked = Date.now();
    await billing.revokeApiKey({ apiKeyId: keyId });
    const refused = await eventually(async () => {
      const res = await raceChat(gateway, secret);
      return res.status === 401 ? Date.now() : undefined;
    }, { timeoutMs: 15_000 });
    expect(refused - revoked).toBeLessThan(5_000);
    process.stdout.write(`key changes seen: limit change ${forbidden - narrowed} ms, revocation ${refused - revoked} ms\n`);
  }, 30_000);

  test("a budget lowered below what was spent is refused within a second, though a gateway holds leases", async () => {
    const gateway = replicas.gateways[0] as string;
    const org = await billing.createOrganization({ name: "lowered", monthlyBudgetNanos: costPerRequest * 10n });
    const loweredOrgId = org.organization?.id as string;
    const { secret } = await billing.createApiKey({ orgId: loweredOrgId, name: "lowered" });
    for (let i = 0; i < 3; i++) expect((await raceChat(gateway, secret)).status).toBe(200);
    // The gateway holds room for more requests; the budget now covers fewer than it served.
    const lowered = Date.now();
    await billing.updateOrganization({ orgId: loweredOrgId, monthlyBudgetNanos: costPerRequest * 2n });
    // Within a second here, though a busy machine may take longer: well before the key's 30 s in the cache ends.
    const refused = await eventually(async () => ((await raceChat(gateway, secret)).status === 429 ? Date.now() : undefined), {
      timeoutMs: 15_000,
    });
    expect(refused - lowered).toBeLessThan(5_000);
    const statuses = [];
    for (let i = 0; i < 5; i++) statuses.push((await raceChat(gateway, secret)).status);
    expect(statuses).toEqual([429, 429, 429, 429, 429]);
  }, 30_000);
});
