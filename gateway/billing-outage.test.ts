import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { trace } from "@opentelemetry/api";
import { Registry } from "prom-client";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { createKeyAuthorizer, type KeyChangeWatch, watchKeyChanges } from "./auth.ts";
import { type BudgetKeeper, createBudgetKeeper } from "./budget.ts";
import { parseGatewayConfig } from "./config.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp, type RestApp } from "./http/app.ts";
import { createProviders } from "./providers/index.ts";
import { eventually } from "../test/support.ts";
import { createRecordingShipper, createTestLogger, mockRoutes } from "./testing.ts";

// A real billing (Postgres) on a real socket, which the gateway stops hearing when its server closes; the admin
// client reaches billing directly, as an operator would while the gateway cannot.
const adminToken = "outage-test-admin-token-0123";
const auth = { headers: { authorization: `Bearer ${adminToken}` } };
// Long enough that a loaded machine's slow key checks before an outage do not use it up.
const staleMs = 5_000;
let db: TestDatabase;
let billingApp: ReturnType<typeof createBillingApp>;
let admin: ReturnType<typeof createClient<typeof BillingService>>;
let billingPort: number;
let billingServer: RunningServer | undefined;
let billing: ReturnType<typeof createServiceClient<typeof BillingService>>;
let watch: KeyChangeWatch;
let budget: BudgetKeeper;
let app: RestApp;
const registry = new Registry();
const log = createTestLogger();
let orgId: string;

const startBilling = async () => {
  billingServer = await startServer({
    name: "billing",
    port: billingPort,
    host: "127.0.0.1",
    routes: billingApp.routes,
    http: billingApp.http,
    log: createLogger({ service: "billing-test", level: "error" }),
  });
};
const stopBilling = async () => {
  await billingServer?.close(0);
  billingServer = undefined;
};

beforeAll(async () => {
  db = await createTestDatabase();
  billingApp = createBillingApp({
    pool: db.pool,
    adminToken,
    clock: () => new Date(),
    log: createLogger({ service: "billing-test", level: "error" }),
  });
  admin = createClient(BillingService, createRouterTransport(billingApp.routes));
  orgId = (await admin.createOrganization({ name: "outage" }, auth)).organization?.id as string;
  billingPort = 0;
  await startBilling();
  // Started again on the same port, where the gateway's client reconnects.
  billingPort = billingServer?.port as number;
  billing = createServiceClient(BillingService, {
    baseUrl: `http://127.0.0.1:${billingPort}`,
    bearerToken: adminToken,
    timeoutMs: 10_000,
  });
  const keys = createKeyAuthorizer({ billing, fallbackTtlMs: 100, staleMs, log, registry });
  budget = createBudgetKeeper({
    billing,
    holder: "gw-outage",
    leaseTtlSeconds: 3600,
    minLeaseNanos: 1_000_000_000n,
    billingDown: keys.billingDown,
  });
  watch = watchKeyChanges({ billing, keys, backoffMs: 20, maxBackoffMs: 100, onRevoked: (id) => budget.releaseKey(id) });
  const config = parseGatewayConfig(mockRoutes, "outage.yaml");
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, {}),
    keys,
    shipper: createRecordingShipper(),
    instanceId: "gw-outage",
    log,
    budget,
  });
  app = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 1 << 20 });
}, 60_000);

afterAll(async () => {
  await watch?.stop();
  if (!billingServer) await startBilling();
  await budget?.close();
  await stopBilling();
  await db?.drop();
}, 30_000);

/**
 * Billing started again, once the gateway has heard it: a connection it began while billing was down, for its change
 * stream, fails though billing is back, and so does a key check that waited for it.
 */
const restartBilling = async () => {
  await startBilling();
  await eventually(() => watch.healthy(), { timeoutMs: 10_000, intervalMs: 10, what: "the change stream back" });
};

beforeEach(async () => {
  if (!billingServer) await restartBilling();
});

async function chat(key: string, maxTokens = 8): Promise<{ status: number; code?: string }> {
  const res = await app.fetch(
    new Request("http://gateway.test/v1/chat/completions", {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "hi" }], max_tokens: maxTokens }),
    }),
  );
  const body = (await res.json()) as { error?: { code?: string } };
  return { status: res.status, code: body.error?.code };
}

async function newKey(monthlyBudgetNanos = 0n): Promise<string> {
  const created = await admin.createApiKey({ orgId, name: "k", limits: { monthlyBudgetNanos } }, auth);
  keyIds.set(created.secret, created.apiKey?.id as string);
  return created.secret;
}
const keyIds = new Map<string, string>();

const staleAdmissions = async () =>
  (await registry.getSingleMetric("gateway_key_stale_admissions_total")?.get())?.values[0]?.value ?? 0;
const outageWarnings = () => log.lines.filter((l) => l.includes("billing cannot check API keys")).length;

/** Sends a request on each key every 20 ms until `ms` past `start` have passed, returning every answer. */
async function traffic(keys: string[], ms: number, start = performance.now()) {
  const answers: { key: string; at: number; status: number; code?: string }[] = [];
  while (performance.now() - start < ms) {
    for (const key of keys) answers.push({ key, at: performance.now() - start, ...(await chat(key)) });
    await Bun.sleep(20);
  }
  return answers;
}

describe("billing unreachable", () => {
  test("keys billing vouched for work through an outage; one it revoked meanwhile stops once it answers", async () => {
    const budgeted = await newKey(10_000_000_000n);
    const unlimited = await newKey();
    const revoked = await newKey();
    const neverSeen = await newKey();
    // Billing vouches for each key after this, so its stale window ends no sooner than staleMs later.
    const vouching = performance.now();
    for (const key of [budgeted, unlimited, revoked]) expect(await chat(key)).toEqual({ status: 200, code: undefined });
    const [warningsBefore, staleBefore] = [outageWarnings(), await staleAdmissions()];

    await stopBilling();
    const during = await traffic([budgeted, unlimited, revoked], 1_000);
    expect(during.filter((a) => a.status !== 200)).toEqual([]);
    // A key this gateway never had billing vouch for is not admitted.
    expect(await chat(neverSeen)).toEqual({ status: 503, code: "auth_unavailable" });
    expect(await staleAdmissions()).toBeGreaterThan(staleBefore);
    expect(outageWarnings()).toBe(warningsBefore + 1);
    // A request dearer than the budget's lease held cannot be granted more; the cheaper ones still draw on it.
    expect(await chat(budgeted, 2_000_000)).toEqual({ status: 503, code: "budget_unavailable" });
    expect((await chat(budgeted)).status).toBe(200);

    // Revoked while the gateway cannot hear billing: the risk taken, until billing answers again.
    await admin.revokeApiKey({ apiKeyId: keyIds.get(revoked) as string }, auth);
    expect((await chat(revoked)).status).toBe(200);

    await startBilling();
    const back = performance.now();
    const after = await traffic([budgeted, unlimited, revoked], 3_000, back);
    const refused = after.filter((a) => a.key === revoked && a.status !== 200);
    expect(refused[0]).toMatchObject({ status: 401, code: "invalid_api_key" });
    // Refused as soon as the gateway hears billing again (its change stream reconnects within 100 ms here), before
    // the key's stale window would have ended...
    expect(back + (refused[0]?.at ?? Number.POSITIVE_INFINITY)).toBeLessThan(vouching + staleMs);
    // ...and from then on; the other keys never stopped.
    const later = after.filter((a) => a.key === revoked && a.at > (refused[0]?.at ?? 0));
    expect(later.every((a) => a.status === 401)).toBe(true);
    expect(after.filter((a) => a.key !== revoked && a.status !== 200)).toEqual([]);
  }, 60_000);

  test("a key check cut off as billing goes away admits a key billing vouched for lately", async () => {
    // Without a change stream, the key is cached for 100 ms.
    const keys = createKeyAuthorizer({ billing, fallbackTtlMs: 100, staleMs, log });
    const key = await newKey();
    const apiKeyId = keyIds.get(key);
    expect((await keys.authorize(key)).apiKeyId).toBe(apiKeyId as string);
    await Bun.sleep(150); // past its TTL in the cache: the next request asks billing
    const locker = await db.pool.connect();
    try {
      await locker.query("BEGIN");
      await locker.query("LOCK TABLE api_keys");
      const pending = keys.authorize(key).then((p) => p.apiKeyId, (e: unknown) => e);
      await eventually(async () => {
        const { rows } = await db.pool.query(
          "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        );
        return rows.length > 0;
      });
      // Billing's server closes with the check in flight (as a restart or a crash cuts it).
      await stopBilling();
      expect(await pending).toBe(apiKeyId as string);
      expect(keys.billingDown()).toBe(true);
    } finally {
      await locker.query("ROLLBACK");
      locker.release();
    }
  }, 60_000);

  test("past the stale window since billing last vouched for it, a key gets 503 until billing answers", async () => {
    const key = await newKey(10_000_000_000n);
    // Billing vouches for the key at some time within this call, however long it takes.
    const vouching = performance.now();
    expect(await chat(key)).toEqual({ status: 200, code: undefined });
    const vouchedWithinMs = performance.now() - vouching;
    await stopBilling();
    const answers = await traffic([key], staleMs + 1_000, vouching);
    const firstRefused = answers.findIndex((a) => a.status !== 200);
    expect(firstRefused).toBeGreaterThan(0);
    expect(answers.slice(firstRefused).every((a) => a.status === 503 && a.code === "auth_unavailable")).toBe(true);
    // Served for the window from the check that vouched for it, then refused.
    expect(answers[firstRefused]?.at).toBeGreaterThan(staleMs - 300);
    expect(answers[firstRefused]?.at).toBeLessThan(staleMs + vouchedWithinMs + 300);

    await restartBilling();
    expect(await chat(key)).toEqual({ status: 200, code: undefined });
  }, 60_000);
});
