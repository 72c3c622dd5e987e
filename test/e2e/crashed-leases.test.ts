/**
 * Budget leases of a gateway killed with SIGKILL, with real processes: the restarted gateway (under the same instance
 * id, as a pod's container after a crash, or under another that adopts the dead one's spool) releases the leases the
 * dead one held once the usage it served under them is recorded, so the money they held is granted again within
 * seconds rather than after their TTL plus grace (25 minutes by default). Every request is billed once, and the
 * budget is never overspent, also when that usage waits in the spool while analytics is down.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { ServiceName } from "../../scripts/mesh.ts";
import { eventually, writeMockModelConfig } from "../support.ts";
import { type MeshWithDatabase, startMeshWithDatabase } from "./mesh-with-database.ts";

// The mock counts 4 characters a token: 3 + 4 + 80/4 = 27 input tokens, and the reply is cut at max_tokens.
const maxTokens = 20;
// Input $0.01 and output $100 per million tokens: 10 and 100,000 nano-USD a token.
const costPerRequest = 27n * 10n + BigInt(maxTokens) * 100_000n;
const N = 200;
const budget = costPerRequest * BigInt(N);

let started: MeshWithDatabase;

beforeAll(async () => {
  started = await startMeshWithDatabase({
    name: "crashed-leases",
    routes: (dir) => writeMockModelConfig(dir, "100"),
    gatewayEnv: { GATEWAY_INSTANCE_ID: "crash-gw" },
    logVariable: "LEASES_LOG",
  });
}, 120_000);

afterAll(async () => {
  await started?.stop();
}, 60_000);

async function createOrg(name: string) {
  const orgId = (await started.billing.createOrganization({ name, monthlyBudgetNanos: budget })).organization?.id as string;
  const { secret } = await started.billing.createApiKey({ orgId, name });
  return { orgId, secret };
}

/** Request id -> HTTP status of every answer. */
async function chat(secret: string, answered: Map<string, number>) {
  const res = await fetch(`${started.mesh.urls.gateway}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "m", messages: [{ role: "user", content: "x".repeat(80) }], max_tokens: maxTokens }),
  });
  await res.arrayBuffer();
  answered.set(res.headers.get("x-request-id") as string, res.status);
  return res.status;
}

/** Serves `count` requests four at a time. */
async function serve(secret: string, count: number, answered: Map<string, number>) {
  let ok = 0;
  await Promise.all(
    Array.from({ length: 4 }, async () => {
      while (ok < count) if ((await chat(secret, answered)) === 200) ok++;
    }),
  );
}

/** One request at a time until the budget refuses one; how many it served. */
async function spendTheRest(secret: string, answered: Map<string, number>) {
  let served = 0;
  while ((await chat(secret, answered)) === 200) served++;
  return served;
}

interface LeaseRow {
  id: string;
  holder: string;
  granted_nanos: string;
  recorded_nanos: string;
  spent_nanos: string | null;
  released_at: Date | null;
}

const leasesOf = async (orgId: string) =>
  (
    await started.db.pool.query<LeaseRow>(
      `SELECT id, holder, granted_nanos::text, recorded_nanos::text, spent_nanos::text, released_at
       FROM budget_leases WHERE org_id = $1 ORDER BY created_at`,
      [orgId],
    )
  ).rows;

/** Leases not released once a release the killed gateway had sent could have landed. */
const unreleasedLeases = async (orgId: string) => {
  await Bun.sleep(500);
  return (await leasesOf(orgId)).filter((l) => l.released_at === null);
};

const kill9 = async (name: ServiceName) => {
  const { proc } = started.mesh.processes[name];
  proc.kill("SIGKILL");
  await proc.exited;
};

/** Every request answered is billed once, at its cost, and the budget was not overspent. */
async function expectBilledOnce(orgId: string, answered: Map<string, number>) {
  const served = [...answered.values()].filter((status) => status === 200).length;
  const records = await eventually(
    async () => {
      const page = await started.billing.listUsageRecords({ orgId, pageSize: 1000 });
      return page.records.length === answered.size ? page.records : undefined;
    },
    { timeoutMs: 30_000, what: "every answered request billed" },
  );
  expect(new Set(records.map((r) => r.requestId))).toEqual(new Set(answered.keys()));
  for (const r of records) expect(r.costNanos).toBe(answered.get(r.requestId) === 200 ? costPerRequest : 0n);
  const summary = await started.billing.getUsageSummary({ orgId });
  expect(summary.costNanos).toBe(costPerRequest * BigInt(served));
  expect(summary.costNanos).toBeLessThanOrEqual(budget);
  return served;
}

describe("budget leases of a gateway killed with SIGKILL", () => {
  test("a gateway restarted under its instance id releases them at once: the rest of the budget is served", async () => {
    const { orgId, secret } = await createOrg("crashed-same-id");
    const answered = new Map<string, number>();
    await serve(secret, 150, answered);
    // A renewal the last requests asked for lands first.
    await Bun.sleep(300);
    await kill9("gateway");
    const dead = await unreleasedLeases(orgId);
    const held = dead.reduce((sum, l) => sum + BigInt(l.granted_nanos) - BigInt(l.recorded_nanos), 0n);
    expect(held).toBeGreaterThan(costPerRequest * 10n);
    const restart = Date.now();
    await started.mesh.restart("gateway");
    // Released at what they spent, all of it recorded as usage against them by then, which billing counts once.
    await eventually(
      async () => {
        const rows = await leasesOf(orgId);
        return dead.every((d) => rows.find((r) => r.id === d.id)?.released_at !== null);
      },
      { timeoutMs: 10_000, what: "the dead gateway's leases released" },
    );
    const releasedAfterMs = Date.now() - restart;
    for (const row of await leasesOf(orgId)) {
      if (dead.some((d) => d.id === row.id)) expect(row.spent_nanos).toBe(row.recorded_nanos);
    }

    // What is left is all there: only the last request or two may not fit (its reserved maximum counts the prompt's
    // bytes, a little above its cost). Before, the dead leases' 20 or so requests' worth was refused for 25 minutes.
    const more = await spendTheRest(secret, answered);
    const served = await expectBilledOnce(orgId, answered);
    expect(served).toBeGreaterThanOrEqual(N - 2);
    process.stdout.write(
      `crashed leases: ${dead.length} leases holding ${held} nano-USD released ${releasedAfterMs} ms after the ` +
        `restart began; served ${served} of ${N} (${more} after the restart)\n`,
    );
  }, 120_000);

  test("usage still in the spool: its leases wait for it to be recorded, then go (another instance id adopts)", async () => {
    const { orgId, secret } = await createOrg("crashed-spooled");
    const answered = new Map<string, number>();
    await serve(secret, 100, answered);
    // Analytics is gone: what the gateway serves now waits in its spool, charging leases billing has not seen spent.
    await kill9("analytics");
    await serve(secret, 50, answered);
    await kill9("gateway");
    const dead = await unreleasedLeases(orgId);
    expect(dead.length).toBeGreaterThan(0);
    // Another instance id: the restarted gateway adopts the dead one's spool, and its leases with it.
    started.gatewayEnv.GATEWAY_INSTANCE_ID = "crash-gw-next";
    await started.mesh.restart("gateway");

    // Released now, the leases would give back money spent by requests billing has not recorded, to be granted again.
    await Bun.sleep(3_000);
    for (const row of await leasesOf(orgId)) {
      if (dead.some((d) => d.id === row.id)) expect(row.released_at).toBeNull();
    }
    await started.mesh.restart("analytics");
    await eventually(
      async () => {
        const rows = await leasesOf(orgId);
        return dead.every((d) => rows.find((r) => r.id === d.id)?.released_at !== null);
      },
      { timeoutMs: 20_000, what: "the dead gateway's leases released once their usage is recorded" },
    );
    await spendTheRest(secret, answered);
    expect(await expectBilledOnce(orgId, answered)).toBeGreaterThanOrEqual(N - 2);
  }, 120_000);
});
