import { afterAll, beforeAll, expect, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { trace } from "@opentelemetry/api";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { createLogger } from "../lib/log.ts";
import { createKeyAuthorizer, type KeyChangeWatch, watchKeyChanges } from "./auth.ts";
import { parseGatewayConfig } from "./config.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp } from "./http/app.ts";
import { createProviders } from "./providers/index.ts";
import { createGatewayService, gatewayRoutes } from "./service.ts";
import { createRecordingShipper, createTestLogger, mockRoutes } from "./testing.ts";

// A real billing service (Postgres included) and two gateway replicas, each following billing's key change stream.
const adminToken = "suspension-test-admin-token-0123";
const auth = { headers: { authorization: `Bearer ${adminToken}` } };
const routes = mockRoutes;

let db: TestDatabase;
let billing: ReturnType<typeof createClient<typeof BillingService>>;
const watches: KeyChangeWatch[] = [];

function replica(name: string) {
  const keys = createKeyAuthorizer({
    billing: { authorizeKey: (req) => billing.authorizeKey(req, auth) },
    // Long enough that only the change stream can explain a key refused or working again within the test.
    hitTtlMs: 60_000,
    missTtlMs: 60_000,
  });
  const watch = watchKeyChanges({
    billing: { watchKeyChanges: (req, options) => billing.watchKeyChanges(req, { ...options, ...auth }) },
    keys,
  });
  watches.push(watch);
  const config = parseGatewayConfig(routes, "test-routes.yaml");
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, {}),
    keys,
    shipper: createRecordingShipper(),
    instanceId: name,
    log: createTestLogger(),
  });
  const rest = createRestApp({ core, tracer: trace.getTracer("test"), maxBodyBytes: 4096 });
  const rpc = createClient(GatewayService, createRouterTransport(gatewayRoutes(createGatewayService(core), 4096)));
  const hello = { model: "mock", messages: [{ role: "user", content: "hello" }] };
  return {
    watch,
    chat: (key: string) =>
      rest.fetch(
        new Request("http://gateway.test/v1/chat/completions", {
          method: "POST",
          headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
          body: JSON.stringify(hello),
        }),
      ),
    rpcChat: (key: string) =>
      rpc.createChatCompletion({ params: hello }, { headers: { authorization: `Bearer ${key}` } }).then(
        () => "ok",
        (e: unknown) => Code[ConnectError.from(e).code],
      ),
  };
}

beforeAll(async () => {
  db = await createTestDatabase();
  const log = createLogger({ service: "billing-test", level: "error" });
  const app = createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(), log });
  billing = createClient(BillingService, createRouterTransport(app.routes));
}, 60_000);
afterAll(async () => {
  await Promise.all(watches.map((w) => w.stop()));
  await db.drop();
}, 30_000);

async function until(condition: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await condition())) {
    if (performance.now() > deadline) throw new Error("condition not met in time");
    await Bun.sleep(5);
  }
}

test("a suspended org's keys are refused 403 on every replica within a round trip, and work again once reinstated", async () => {
  const replicas = [replica("gw-1"), replica("gw-2")];
  const org = await billing.createOrganization({ name: "suspended-org" }, auth);
  const orgId = org.organization?.id as string;
  const { secret } = await billing.createApiKey({ orgId, name: "k" }, auth);
  const other = await billing.createOrganization({ name: "other-org" }, auth);
  const { secret: otherSecret } = await billing.createApiKey({ orgId: other.organization?.id as string }, auth);
  await until(() => replicas.every((r) => r.watch.healthy()));
  for (const r of replicas) {
    // Cached (for a minute) on every replica before the suspension.
    expect((await r.chat(secret)).status).toBe(200);
    expect(await r.rpcChat(secret)).toBe("ok");
  }

  const answeredEverywhere = (status: number) => async () =>
    (await Promise.all(replicas.map(async (r) => (await r.chat(secret)).status === status))).every(Boolean);
  const suspended = performance.now();
  await billing.suspendOrganization({ orgId, reason: "unpaid invoices" }, auth);
  await until(answeredEverywhere(403), 10_000);
  // Well within the minute the key is cached for.
  expect(performance.now() - suspended).toBeLessThan(5_000);
  for (const r of replicas) {
    const res = await r.chat(secret);
    expect(res.status).toBe(403);
    // The operator's reason is theirs: the client is told its org is suspended, not why.
    expect(await res.json()).toEqual({
      error: {
        message: "The organization of this API key is suspended: contact the gateway's operator.",
        type: "permission_error",
        param: null,
        code: "organization_suspended",
      },
    });
    expect(await r.rpcChat(secret)).toBe("PermissionDenied");
    // Other orgs' keys are untouched, and an unknown key is still a 401.
    expect((await r.chat(otherSecret)).status).toBe(200);
    expect((await r.chat(`${secret}0`)).status).toBe(401);
  }

  // The refusal is cached (for a minute here), and reinstating drops it at once.
  const reinstated = performance.now();
  await billing.reinstateOrganization({ orgId }, auth);
  await until(answeredEverywhere(200), 10_000);
  expect(performance.now() - reinstated).toBeLessThan(5_000);
  for (const r of replicas) expect(await r.rpcChat(secret)).toBe("ok");
}, 30_000);
