import { afterAll, beforeAll, expect, test } from "bun:test";
import { clone, create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import pg from "pg";
import { Registry } from "prom-client";
import {
  BillingService,
  BudgetScope,
  DiscountKind,
  type DiscountRuleSchema,
  InvoiceStatus,
  KeyRefusalReason,
  KeyRefusalSchema,
  ListApiKeysResponseSchema,
  OrganizationState,
  UpdateOrganizationRequestSchema,
  UpdateOrganizationResponseSchema,
  type UsageRecord,
  UsageRecordSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { BudgetChargeSchema, CostBreakdownSchema, Endpoint } from "../gen/common/v1/common_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { startServer } from "../lib/server.ts";
import { createBillingApp } from "./app.ts";
import { databaseConflict, databaseUnavailable } from "./errors.ts";
import { createPool } from "./store/db.ts";
import { createTestDatabase, type TestDatabase } from "./store/test-db.ts";
import { eventually } from "../test/support.ts";

const adminToken = "test-admin-token-0123456789";
const logLines: string[] = [];
const log = createLogger({ service: "billing-test", level: "debug", write: (line) => logLines.push(line) });
let now = new Date("2026-06-15T12:00:00Z");

let db: TestDatabase;
let app: ReturnType<typeof createBillingApp>;
let client: ReturnType<typeof createClient<typeof BillingService>>;

beforeAll(async () => {
  db = await createTestDatabase();
  app = createBillingApp({ pool: db.pool, adminToken, clock: () => now, leaseClock: () => now, log });
  client = createClient(BillingService, createRouterTransport(app.routes));
}, 60_000);
afterAll(async () => {
  await app.store.closePing();
  await db.drop();
});

const as = (token?: string) => ({ headers: token ? { authorization: `Bearer ${token}` } : {} });
const admin = as(adminToken);

async function code(call: Promise<unknown>): Promise<Code> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (error === undefined) throw new Error("expected the call to fail");
  return ConnectError.from(error).code;
}

let orgCount = 0;
async function newOrg(extra: { billingDay?: number; monthlyBudgetNanos?: bigint } = {}) {
  const res = await client.createOrganization({ name: `org-${++orgCount}`, ...extra }, admin);
  return res.organization?.id as string;
}

let requestCount = 0;
function usage(orgId: string, apiKeyId: string, costNanos: bigint, at = now): UsageRecord {
  return create(UsageRecordSchema, {
    requestId: `01TESTREQUEST${String(++requestCount).padStart(13, "0")}`,
    orgId,
    apiKeyId,
    model: "mock",
    provider: "mock",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    usage: { inputTokens: 100n, cachedInputTokens: 10n, outputTokens: 40n, reasoningTokens: 0n },
    costNanos,
    occurTime: timestampFromDate(at),
  });
}

test("admin RPCs need the admin token: none is Unauthenticated, a wrong one PermissionDenied", async () => {
  expect(await code(client.listOrganizations({}))).toBe(Code.Unauthenticated);
  expect(await code(client.listOrganizations({}, as("not-the-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.createOrganization({ name: "x" }, as("not-the-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.recordUsage({ records: [] }))).toBe(Code.Unauthenticated);

  const orgId = await newOrg();
  const { secret } = await client.createApiKey({ orgId }, admin);
  // An org's own key is not an admin.
  expect(await code(client.listOrganizations({}, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.authorizeKey({ secret }, as(secret)))).toBe(Code.PermissionDenied);
  // Told so, rather than that the admin token it sent is wrong.
  const denied = ConnectError.from(await client.generateInvoice({ orgId }, as(secret)).catch((e) => e));
  expect(denied.rawMessage).toBe("this method takes the admin token only, not an org's API key");
  const wrong = ConnectError.from(await client.listOrganizations({}, as("not-the-admin-token")).catch((e) => e));
  expect(wrong.rawMessage).toBe("invalid admin token");
  expect((await client.listOrganizations({}, admin)).organizations.map((o) => o.id)).toContain(orgId);
});

test("organizations: validation and error codes", async () => {
  const res = await client.createOrganization(
    { name: "  Acme Corp  ", taxRateBps: 2000, billingDay: 0, monthlyBudgetNanos: 7_000_000_000n },
    admin,
  );
  expect(res.organization).toMatchObject({
    name: "Acme Corp",
    taxRateBps: 2000,
    billingDay: 1,
    monthlyBudgetNanos: 7_000_000_000n,
  });
  expect(res.organization?.id).toStartWith("org_");
  expect(res.organization?.createTime).toBeDefined();

  expect(await code(client.createOrganization({ name: "Acme Corp" }, admin))).toBe(Code.AlreadyExists);
  expect(await code(client.createOrganization({ name: "   " }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.createOrganization({ name: "x".repeat(201) }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.createOrganization({ name: "y", billingDay: 29 }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.createOrganization({ name: "y", taxRateBps: -1 }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.createOrganization({ name: "y", monthlyBudgetNanos: -1n }, admin))).toBe(
    Code.InvalidArgument,
  );
  expect(await code(client.createOrganization({ name: "y", maxDiscountBps: 10_001 }, admin))).toBe(
    Code.InvalidArgument,
  );
  const capped = await client.createOrganization({ name: "capped", maxDiscountBps: 2500 }, admin);
  expect(capped.organization?.maxDiscountBps).toBe(2500);
  expect(await code(client.createProject({ orgId: "org_missing", name: "p" }, admin))).toBe(Code.NotFound);
  expect(await code(client.createProject({ orgId: "", name: "p" }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listApiKeys({ orgId: "org_missing" }, admin))).toBe(Code.NotFound);
  // Usage of an org nobody created is not an empty answer either, whatever the range.
  expect(await code(client.listUsageRecords({ orgId: "org_missing" }, admin))).toBe(Code.NotFound);
  const range = { startTime: timestampFromDate(new Date("2026-01-01T00:00:00Z")), endTime: timestampFromDate(now) };
  expect(await code(client.getUsageSummary({ orgId: "org_missing", ...range }, admin))).toBe(Code.NotFound);
  expect((await client.listUsageRecords({ orgId: capped.organization?.id as string }, admin)).records).toEqual([]);
  // A summary from a start past the current period names the bound it was given.
  const future = { startTime: timestampFromDate(new Date(now.getTime() + 62 * 86_400_000)) };
  const refused = await client.getUsageSummary({ orgId: capped.organization?.id as string, ...future }, admin).catch((e) => e);
  expect(ConnectError.from(refused).rawMessage).toStartWith("start_time: must be before the end of the current billing period");
});

/**
 * Follows WatchKeyChanges from the moment it is live: each change as its key id or `org <id>`, in order, until stopped.
 */
async function watchChanges() {
  const stop = new AbortController();
  const changes: string[] = [];
  let live: () => void = () => {};
  const isLive = new Promise<void>((resolve) => (live = resolve));
  const watching = (async () => {
    for await (const change of client.watchKeyChanges({}, { ...admin, signal: stop.signal })) {
      if (!change.apiKeyId && !change.orgId) live();
      else changes.push(change.apiKeyId || `org ${change.orgId}`);
    }
  })().catch(() => {});
  await isLive;
  return {
    changes,
    stop: async () => {
      stop.abort();
      await watching;
    },
  };
}

test("UpdateOrganization changes only the fields set, validates them and tells key watchers", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 5n });
  const { secret } = await client.createApiKey({ orgId }, admin);
  await client.createApiKey({ orgId }, admin);
  const { changes, stop: stopWatching } = await watchChanges();

  const res = await client.updateOrganization({ orgId, taxRateBps: 1900, maxDiscountBps: 3000 }, admin);
  expect(res.organization).toMatchObject({ id: orgId, taxRateBps: 1900, maxDiscountBps: 3000, monthlyBudgetNanos: 5n });
  const renamed = await client.updateOrganization({ orgId, name: " Renamed ", monthlyBudgetNanos: 0n }, admin);
  expect(renamed.organization).toMatchObject({ name: "Renamed", taxRateBps: 1900, monthlyBudgetNanos: 0n });
  // A gateway re-authorizing after the announcement sees the new settings.
  expect((await client.authorizeKey({ secret }, admin)).organization).toMatchObject({ taxRateBps: 1900, monthlyBudgetNanos: 0n });
  const deadline = Date.now() + 5_000;
  while (changes.length < 2 && Date.now() < deadline) await Bun.sleep(20);
  // One change of the whole org each time, however many keys it has.
  expect(changes).toEqual([`org ${orgId}`, `org ${orgId}`]);
  await stopWatching();

  expect(await code(client.updateOrganization({ orgId, taxRateBps: 10_001 }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.updateOrganization({ orgId, name: "" }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.updateOrganization({ orgId, monthlyBudgetNanos: -1n }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.updateOrganization({ orgId: "org_missing", taxRateBps: 1 }, admin))).toBe(Code.NotFound);
  const other = await client.createOrganization({ name: "taken by another org" }, admin);
  expect(other.organization).toBeDefined();
  expect(await code(client.updateOrganization({ orgId, name: "taken by another org" }, admin))).toBe(Code.AlreadyExists);
  expect(await code(client.updateOrganization({ orgId, taxRateBps: 1 }, as(secret)))).toBe(Code.PermissionDenied);
});

test("a suspended org's keys are refused (PermissionDenied) and granted no budget, its usage still recorded, until reinstated", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 10_000n });
  const { secret, apiKey } = await client.createApiKey({ orgId }, admin);
  const keyId = apiKey?.id as string;
  const { changes, stop: stopWatching } = await watchChanges();

  const res = await client.suspendOrganization({ orgId, reason: " unpaid invoices " }, admin);
  expect(res.organization).toMatchObject({ id: orgId, state: OrganizationState.SUSPENDED, suspendReason: "unpaid invoices" });
  expect(res.organization?.suspendTime).toBeDefined();
  const listed = (await client.listOrganizations({}, admin)).organizations.find((o) => o.id === orgId);
  expect(listed?.state).toBe(OrganizationState.SUSPENDED);

  const refusal = ConnectError.from(await client.authorizeKey({ secret }, admin).catch((e) => e));
  expect(refusal.code).toBe(Code.PermissionDenied);
  expect(refusal.rawMessage).toBe(`organization ${orgId} is suspended`);
  expect(refusal.findDetails(KeyRefusalSchema)).toMatchObject([{ reason: KeyRefusalReason.ORGANIZATION_SUSPENDED, orgId }]);
  // An unknown key is still Unauthenticated, suspension or not.
  expect(await code(client.authorizeKey({ secret: `${secret}0` }, admin))).toBe(Code.Unauthenticated);
  // The org's own key no longer reads its usage; an admin still does.
  expect(await code(client.listInvoices({ orgId }, as(secret)))).toBe(Code.PermissionDenied);
  const lease = { holder: "gw-1", requestedNanos: 100n, ttlSeconds: 60 };
  expect(await code(client.acquireBudgetLease({ scope: BudgetScope.ORGANIZATION, scopeId: orgId, ...lease }, admin))).toBe(
    Code.PermissionDenied,
  );
  expect(await code(client.acquireBudgetLease({ scope: BudgetScope.API_KEY, scopeId: keyId, ...lease }, admin))).toBe(
    Code.PermissionDenied,
  );
  // Requests that were in flight when it was suspended are still billed.
  expect((await client.recordUsage({ records: [usage(orgId, keyId, 700n)] }, admin)).inserted).toBe(1);
  expect((await client.getUsageSummary({ orgId }, admin)).costNanos).toBe(700n);

  expect(await code(client.suspendOrganization({ orgId, reason: "x".repeat(501) }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.suspendOrganization({ orgId: "org_missing" }, admin))).toBe(Code.NotFound);
  expect(await code(client.suspendOrganization({ orgId }, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.reinstateOrganization({ orgId }, as(secret)))).toBe(Code.PermissionDenied);

  const reinstated = await client.reinstateOrganization({ orgId }, admin);
  expect(reinstated.organization).toMatchObject({ state: OrganizationState.ACTIVE, suspendReason: "" });
  expect(reinstated.organization?.suspendTime).toBeUndefined();
  const auth = await client.authorizeKey({ secret }, admin);
  expect(auth.apiKey?.id).toBe(keyId);
  expect(auth.orgSpentNanos).toBe(700n);
  const granted = await client.acquireBudgetLease({ scope: BudgetScope.ORGANIZATION, scopeId: orgId, ...lease }, admin);
  expect(granted.grantedNanos).toBe(100n);

  const deadline = Date.now() + 5_000;
  while (changes.length < 2 && Date.now() < deadline) await Bun.sleep(20);
  expect(changes).toEqual([`org ${orgId}`, `org ${orgId}`]);
  await stopWatching();
});

test("AuthorizeKey resolves a valid key with its spend, and rejects unknown, revoked and expired keys", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 10_000n });
  const { project } = await client.createProject({ orgId, name: "web" }, admin);
  const created = await client.createApiKey(
    {
      orgId,
      projectId: project?.id,
      name: "web key",
      limits: { monthlyBudgetNanos: 5_000n, requestsPerMinute: 30, allowedModels: ["mock", "mock", "gpt-4o"] },
    },
    admin,
  );
  expect(created.secret).toMatch(/^sk-mesh-[0-9A-Za-z]{43}$/);
  expect(created.apiKey?.prefix).toBe(created.secret.slice(0, 12));
  expect(created.apiKey?.limits?.allowedModels).toEqual(["mock", "gpt-4o"]);

  const other = await client.createApiKey({ orgId }, admin);
  await client.recordUsage(
    {
      records: [
        usage(orgId, created.apiKey?.id as string, 1_000n),
        usage(orgId, other.apiKey?.id as string, 250n),
        // Last month: outside the current billing period.
        usage(orgId, created.apiKey?.id as string, 99n, new Date("2026-05-31T23:59:59Z")),
      ],
    },
    admin,
  );

  const auth = await client.authorizeKey({ secret: created.secret }, admin);
  expect(auth.apiKey?.id).toBe(created.apiKey?.id as string);
  expect(auth.apiKey?.projectId).toBe(project?.id as string);
  expect(auth.organization?.id).toBe(orgId);
  expect(auth.organization?.monthlyBudgetNanos).toBe(10_000n);
  expect(auth.keySpentNanos).toBe(1_000n);
  expect(auth.orgSpentNanos).toBe(1_250n);
  expect(auth.keyTokens).toBe(140n);

  expect(await code(client.authorizeKey({ secret: `${created.secret}0` }, admin))).toBe(Code.Unauthenticated);
  expect(await code(client.authorizeKey({ secret: "" }, admin))).toBe(Code.Unauthenticated);

  const expiring = await client.createApiKey(
    { orgId, limits: { expireTime: timestampFromDate(new Date(now.getTime() + 1000)) } },
    admin,
  );
  const stillValid = await client.authorizeKey({ secret: expiring.secret }, admin);
  expect(stillValid.apiKey?.id).toBe(expiring.apiKey?.id as string);
  const saved = now;
  now = new Date(now.getTime() + 1000);
  try {
    expect(await code(client.authorizeKey({ secret: expiring.secret }, admin))).toBe(Code.Unauthenticated);
  } finally {
    now = saved;
  }

  const revoked = await client.revokeApiKey({ apiKeyId: created.apiKey?.id as string }, admin);
  expect(revoked.apiKey?.revokeTime).toBeDefined();
  expect(await code(client.authorizeKey({ secret: created.secret }, admin))).toBe(Code.Unauthenticated);
  expect(logLines.join("\n")).not.toContain(created.secret);
});

test("RotateApiKey issues a working key with the same limits and retires the old one", async () => {
  const orgId = await newOrg();
  const first = await client.createApiKey({ orgId, name: "ci", limits: { tokensPerMinute: 1000n } }, admin);
  expect((await client.authorizeKey({ secret: first.secret }, admin)).lineageId).toBe(first.apiKey?.id as string);
  const rotated = await client.rotateApiKey({ apiKeyId: first.apiKey?.id as string }, admin);
  expect(rotated.apiKey?.limits?.tokensPerMinute).toBe(1000n);
  expect(rotated.apiKey?.name).toBe("ci");
  expect((await client.authorizeKey({ secret: rotated.secret }, admin)).apiKey?.id).toBe(rotated.apiKey?.id as string);
  // Its lineage is the key it was rotated from: gateways count per-key limits by it.
  expect((await client.authorizeKey({ secret: rotated.secret }, admin)).lineageId).toBe(first.apiKey?.id as string);
  expect(await code(client.authorizeKey({ secret: first.secret }, admin))).toBe(Code.Unauthenticated);
  expect(await code(client.rotateApiKey({ apiKeyId: first.apiKey?.id as string }, admin))).toBe(
    Code.FailedPrecondition,
  );

  const updated = await client.updateApiKeyLimits(
    { apiKeyId: rotated.apiKey?.id as string, limits: { monthlyTokens: 5n } },
    admin,
  );
  expect(updated.apiKey?.limits?.monthlyTokens).toBe(5n);
  expect(updated.apiKey?.limits?.tokensPerMinute).toBe(0n);
  const negative = { apiKeyId: rotated.apiKey?.id as string, limits: { monthlyTokens: -5n } };
  expect(await code(client.updateApiKeyLimits(negative, admin))).toBe(Code.InvalidArgument);

  // An update mask changes the limits it names and keeps the rest, a named but unset one being removed.
  const masked = await client.updateApiKeyLimits(
    {
      apiKeyId: rotated.apiKey?.id as string,
      limits: { requestsPerMinute: 30, monthlyTokens: 999n, maxConcurrentRequests: 4 },
      updateMask: { paths: ["requests_per_minute", "allowed_models", "max_concurrent_requests"] },
    },
    admin,
  );
  expect(masked.apiKey?.limits).toMatchObject({
    monthlyTokens: 5n,
    requestsPerMinute: 30,
    maxConcurrentRequests: 4,
    allowedModels: [],
  });
  const concurrency = { apiKeyId: rotated.apiKey?.id as string, limits: { maxConcurrentRequests: -1 } };
  expect(await code(client.updateApiKeyLimits(concurrency, admin))).toBe(Code.InvalidArgument);
  const unknownPath = client.updateApiKeyLimits(
    { apiKeyId: rotated.apiKey?.id as string, limits: {}, updateMask: { paths: ["monthly_tokens", "secret"] } },
    admin,
  );
  expect(await code(unknownPath)).toBe(Code.InvalidArgument);
  expect(await unknownPath.catch((e: unknown) => String(e))).toContain('update_mask: unknown path "secret"');
  // In Connect's JSON form a mask is one string of camelCase names.
  const json = createClient(BillingService, createRouterTransport(app.routes, { transport: { useBinaryFormat: false } }));
  const viaJson = await json.updateApiKeyLimits(
    { apiKeyId: rotated.apiKey?.id as string, limits: { monthlyTokens: 77n }, updateMask: { paths: ["monthly_tokens"] } },
    admin,
  );
  expect(viaJson.apiKey?.limits).toMatchObject({ monthlyTokens: 77n, requestsPerMinute: 30, maxConcurrentRequests: 4 });
  const listed = await client.listApiKeys({ orgId }, admin);
  expect(listed.apiKeys.map((k) => k.id)).toEqual([rotated.apiKey?.id as string]);
});

test("a rotated key carries on its period: it hits its budget and token limits at the same totals as the old key", async () => {
  const orgId = await newOrg();
  const limits = { monthlyBudgetNanos: 1_000n, monthlyTokens: 500n };
  const first = await client.createApiKey({ orgId, name: "leaked", limits }, admin);
  const firstId = first.apiKey?.id as string;
  const lease = (scopeId: string, requestedNanos: bigint) =>
    client.acquireBudgetLease(
      { scope: BudgetScope.API_KEY, scopeId, holder: "gw", requestedNanos, ttlSeconds: 60 },
      admin,
    );
  /** What a gateway does for a request of `costNanos`: lease, spend, release, then analytics records it. */
  const serve = async (keyId: string, costNanos: bigint) => {
    const grant = await lease(keyId, costNanos);
    expect(grant.grantedNanos).toBe(costNanos);
    await client.releaseBudgetLease({ leaseId: grant.leaseId, spentNanos: costNanos }, admin);
    const record = usage(orgId, keyId, costNanos);
    record.budgetCharges = [create(BudgetChargeSchema, { leaseId: grant.leaseId, nanos: costNanos })];
    await client.recordUsage({ records: [record] }, admin);
  };
  /** Rotates a key and checks that its successor starts from what the chain spent and used so far. */
  const rotate = async (keyId: string, spentNanos: bigint, tokens: bigint) => {
    const rotated = await client.rotateApiKey({ apiKeyId: keyId }, admin);
    expect(rotated.apiKey?.rotatedFromApiKeyId).toBe(keyId);
    expect(await client.authorizeKey({ secret: rotated.secret }, admin)).toMatchObject({
      keySpentNanos: spentNanos,
      keyTokens: tokens,
    });
    return rotated.apiKey?.id as string;
  };
  await serve(firstId, 300n);
  await serve(firstId, 300n);
  const secondId = await rotate(firstId, 600n, 280n);
  await serve(secondId, 300n);
  // Rotated again: the whole chain counts.
  const thirdId = await rotate(secondId, 900n, 420n);
  // 100 is left of the 1000 budget, as it would be had the key never been rotated.
  expect(await lease(thirdId, 300n)).toMatchObject({ grantedNanos: 100n, remainingNanos: 0n });
  // And 80 of its 500 monthly tokens, leased in tokens.
  const scope = BudgetScope.API_KEY_TOKENS;
  const tokens = { scope, scopeId: thirdId, holder: "gw", requestedNanos: 300n, ttlSeconds: 60 };
  expect(await client.acquireBudgetLease(tokens, admin)).toMatchObject({ grantedNanos: 80n, remainingNanos: 0n });

  // Usage stays with the key that served it.
  const summary = (apiKeyId: string) => client.getUsageSummary({ orgId, apiKeyId }, admin);
  expect(await summary(firstId)).toMatchObject({ requests: 2n, costNanos: 600n });
  expect(await summary(secondId)).toMatchObject({ requests: 1n, costNanos: 300n });
  expect(await summary(thirdId)).toMatchObject({ requests: 0n, costNanos: 0n });
  const listed = await client.listApiKeys({ orgId, includeRevoked: true }, admin);
  expect(listed.apiKeys.map((k) => [k.id, k.rotatedFromApiKeyId])).toEqual([
    [firstId, ""],
    [secondId, firstId],
    [thirdId, secondId],
  ]);
});

test("GetApiKey answers a key by id alone, revoked or not, as ListApiKeys lists it; admin token only", async () => {
  const orgId = await newOrg();
  await newOrg();
  const created = await client.createApiKey({ orgId, name: "ci", limits: { monthlyTokens: 9n } }, admin);
  const keyId = created.apiKey?.id as string;
  const rotated = await client.rotateApiKey({ apiKeyId: keyId }, admin);
  const listed = (await client.listApiKeys({ orgId, includeRevoked: true }, admin)).apiKeys;
  expect(listed).toHaveLength(2);
  for (const key of listed) expect((await client.getApiKey({ apiKeyId: key.id }, admin)).apiKey).toEqual(key);
  const revoked = (await client.getApiKey({ apiKeyId: keyId }, admin)).apiKey;
  expect(revoked).toMatchObject({ id: keyId, orgId, name: "ci", limits: { monthlyTokens: 9n } });
  expect(revoked?.revokeTime).toBeDefined();
  const successor = (await client.getApiKey({ apiKeyId: rotated.apiKey?.id as string }, admin)).apiKey;
  expect(successor?.rotatedFromApiKeyId).toBe(keyId);
  expect(successor?.revokeTime).toBeUndefined();

  const unknown = client.getApiKey({ apiKeyId: "key_missing" }, admin);
  expect(await code(unknown)).toBe(Code.NotFound);
  expect(await unknown.catch((e: unknown) => String(e))).toContain("api key key_missing not found");
  expect(await code(client.getApiKey({ apiKeyId: "" }, admin))).toBe(Code.InvalidArgument);
  // Not a read an org's key may make, not even of itself.
  expect(await code(client.getApiKey({ apiKeyId: rotated.apiKey?.id as string }, as(rotated.secret)))).toBe(
    Code.PermissionDenied,
  );
  expect(await code(client.getApiKey({ apiKeyId: keyId }, as("not-the-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.getApiKey({ apiKeyId: keyId }))).toBe(Code.Unauthenticated);
});

test("GetOrganization answers one org by id, as ListOrganizations lists it, to admins and to that org's own keys", async () => {
  const orgId = await newOrg({ billingDay: 12, monthlyBudgetNanos: 3_000_000_000n });
  const otherOrgId = await newOrg();
  const suspendedOrgId = await newOrg();
  await client.suspendOrganization({ orgId: suspendedOrgId, reason: "unpaid" }, admin);
  const listed = (await client.listOrganizations({ pageSize: 1000 }, admin)).organizations;
  for (const id of [orgId, suspendedOrgId]) {
    expect((await client.getOrganization({ orgId: id }, admin)).organization).toEqual(listed.find((o) => o.id === id));
  }
  expect((await client.getOrganization({ orgId: suspendedOrgId }, admin)).organization).toMatchObject({
    state: OrganizationState.SUSPENDED,
    suspendReason: "unpaid",
  });

  const { secret, apiKey } = await client.createApiKey({ orgId }, admin);
  const own = (await client.getOrganization({ orgId }, as(secret))).organization;
  expect(own).toMatchObject({ id: orgId, billingDay: 12, monthlyBudgetNanos: 3_000_000_000n });
  // Another org's id is as unknown to a key as one no org has: the answers do not tell them apart.
  const other = client.getOrganization({ orgId: otherOrgId }, as(secret));
  expect(await code(other)).toBe(Code.NotFound);
  expect(await other.catch((e: unknown) => String(e))).toContain(`organization ${otherOrgId} not found`);
  const missing = client.getOrganization({ orgId: "org_missing" }, as(secret));
  expect(await code(missing)).toBe(Code.NotFound);
  expect(await code(client.getOrganization({ orgId: "org_missing" }, admin))).toBe(Code.NotFound);
  expect(await code(client.getOrganization({ orgId: "" }, admin))).toBe(Code.InvalidArgument);

  expect(await code(client.getOrganization({ orgId }))).toBe(Code.Unauthenticated);
  expect(await code(client.getOrganization({ orgId }, as("not-the-admin-token")))).toBe(Code.PermissionDenied);
  await client.revokeApiKey({ apiKeyId: apiKey?.id as string }, admin);
  expect(await code(client.getOrganization({ orgId }, as(secret)))).toBe(Code.Unauthenticated);
});

test("usage charges a token lease in tokens, up to the request's input + output, and never nano-USD and tokens at once", async () => {
  const orgId = await newOrg();
  const { apiKey } = await client.createApiKey({ orgId, limits: { monthlyTokens: 1_000n } }, admin);
  const keyId = apiKey?.id as string;
  const grant = await client.acquireBudgetLease(
    { scope: BudgetScope.API_KEY_TOKENS, scopeId: keyId, holder: "gw", requestedNanos: 600n, ttlSeconds: 60 },
    admin,
  );
  expect(grant.grantedNanos).toBe(600n);
  const charged = (charges: { nanos?: bigint; tokens?: bigint }[]) => {
    const record = usage(orgId, keyId, 500n);
    record.budgetCharges = charges.map((c) => create(BudgetChargeSchema, { leaseId: grant.leaseId, ...c }));
    return client.recordUsage({ records: [record] }, admin);
  };
  // 100 input + 40 output tokens: at most 140 tokens, and at most its 500 nano-USD.
  expect(await code(charged([{ tokens: 141n }]))).toBe(Code.InvalidArgument);
  expect(await code(charged([{ nanos: 500n, tokens: 140n }]))).toBe(Code.InvalidArgument);
  expect(await code(charged(Array.from({ length: 13 }, () => ({ tokens: 1n }))))).toBe(Code.InvalidArgument);
  expect((await charged(Array.from({ length: 12 }, () => ({ tokens: 1n })))).inserted).toBe(1);
  expect((await charged([{ tokens: 140n }])).inserted).toBe(1);
  const { rows } = await db.pool.query<{ recorded: string }>(
    "SELECT recorded_nanos::text AS recorded FROM budget_leases WHERE id = $1",
    [grant.leaseId],
  );
  expect(rows[0]?.recorded).toBe("152");
  // Released at what was drawn from it: the two requests' 280 tokens count once, the rest of the lease is back.
  await client.releaseBudgetLease({ leaseId: grant.leaseId, spentNanos: 152n }, admin);
  expect(
    await client.acquireBudgetLease(
      { scope: BudgetScope.API_KEY_TOKENS, scopeId: keyId, holder: "gw", requestedNanos: 10_000n, ttlSeconds: 60 },
      admin,
    ),
  ).toMatchObject({ grantedNanos: 720n, remainingNanos: 0n });
});

test("RecordUsage is idempotent: resending a batch changes neither rows nor summaries", async () => {
  const orgId = await newOrg();
  const { apiKey } = await client.createApiKey({ orgId }, admin);
  const keyId = apiKey?.id as string;
  const batch = [usage(orgId, keyId, 1_000_000_001n), usage(orgId, keyId, 2n), usage(orgId, keyId, 3n)];

  expect(await client.recordUsage({ records: batch }, admin)).toMatchObject({ inserted: 3, duplicates: 0 });
  const summary = await client.getUsageSummary({ orgId }, admin);
  expect(summary.requests).toBe(3n);
  expect(summary.costNanos).toBe(1_000_000_006n);
  expect(summary.usage).toMatchObject({
    inputTokens: 300n,
    cachedInputTokens: 30n,
    outputTokens: 120n,
    reasoningTokens: 0n,
  });

  expect(await client.recordUsage({ records: batch }, admin)).toMatchObject({ inserted: 0, duplicates: 3 });
  expect(await client.getUsageSummary({ orgId }, admin)).toEqual(summary);
  const rows = await db.pool.query("SELECT count(*)::int AS n FROM usage_records WHERE org_id = $1", [orgId]);
  expect(rows.rows[0].n).toBe(3);
});

test("usage of the Responses API is recorded and listed under its endpoint", async () => {
  const orgId = await newOrg();
  const { apiKey } = await client.createApiKey({ orgId }, admin);
  const record = { ...usage(orgId, apiKey?.id as string, 1_234n), endpoint: Endpoint.RESPONSES };
  expect(await client.recordUsage({ records: [record] }, admin)).toMatchObject({ inserted: 1, duplicates: 0 });
  const [listed] = (await client.listUsageRecords({ orgId }, admin)).records;
  expect(listed).toMatchObject({ requestId: record.requestId, endpoint: Endpoint.RESPONSES, costNanos: 1_234n });
  const rows = await db.pool.query("SELECT endpoint FROM usage_records WHERE request_id = $1", [record.requestId]);
  expect(rows.rows).toEqual([{ endpoint: "responses" }]);
});

test("RecordUsage validates every record and the batch size", async () => {
  const orgId = await newOrg();
  const good = usage(orgId, "", 1n);
  const bad = (edit: (r: UsageRecord) => void) => {
    const record = clone(UsageRecordSchema, good);
    edit(record);
    return client.recordUsage({ records: [good, record] }, admin);
  };
  expect(await code(bad((r) => (r.requestId = "")))).toBe(Code.InvalidArgument);
  expect(await code(bad((r) => (r.costNanos = -1n)))).toBe(Code.InvalidArgument);
  expect(await code(bad((r) => (r.occurTime = undefined)))).toBe(Code.InvalidArgument);
  expect(await code(bad((r) => (r.occurTime = { $typeName: "google.protobuf.Timestamp", seconds: 10n ** 15n, nanos: 0 }))))
    .toBe(Code.InvalidArgument);
  // Nanos outside 0..999,999,999 would move the record by seconds, across a period's edge: refused, not carried over.
  for (const nanos of [1_000_000_000, -1]) {
    const moved = ConnectError.from(await bad((r) => r.occurTime && (r.occurTime.nanos = nanos)).catch((e) => e));
    expect([moved.code, moved.rawMessage]).toEqual([Code.InvalidArgument, "records[1].occur_time.nanos: must be 0..999999999"]);
  }
  expect(await code(bad((r) => r.usage && (r.usage.cachedInputTokens = 101n)))).toBe(Code.InvalidArgument);
  expect(await code(bad((r) => r.usage && (r.usage.outputTokens = -1n)))).toBe(Code.InvalidArgument);
  const error = ConnectError.from(await bad((r) => (r.requestId = "")).catch((e) => e));
  expect(error.rawMessage).toBe("records[1].request_id: required");

  const tooMany = Array.from({ length: 10_001 }, () => good);
  expect(await code(client.recordUsage({ records: tooMany }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.recordUsage({ records: [usage("org_missing", "", 1n)] }, admin))).toBe(Code.NotFound);
  // Nothing of a rejected batch was stored.
  expect((await client.getUsageSummary({ orgId }, admin)).requests).toBe(0n);
});

test("RecordUsage dates usage more than 10 minutes past billing's clock at billing's clock, and bills it", async () => {
  const orgId = await newOrg();
  const skewed = usage(orgId, "", 1n, new Date(now.getTime() + 10 * 60_000));
  // Dated years ahead it would lie outside every current period: missing from summaries, budgets and invoices; refused,
  // its gateway would never send it again.
  const ahead = usage(orgId, "", 2n, new Date("2035-01-01T00:00:00Z"));
  const justPast = usage(orgId, "", 4n, new Date(now.getTime() + 10 * 60_000 + 1));
  expect(await client.recordUsage({ records: [skewed, usage(orgId, "", 3n), ahead, justPast] }, admin)).toMatchObject({
    inserted: 4,
  });
  const rows = await db.pool.query<{ request_id: string; occurred_at: Date }>(
    "SELECT request_id, occurred_at FROM usage_records WHERE org_id = $1",
    [orgId],
  );
  const at = new Map(rows.rows.map((r) => [r.request_id, r.occurred_at.getTime()]));
  expect(at.get(skewed.requestId)).toBe(now.getTime() + 10 * 60_000);
  expect(at.get(ahead.requestId)).toBe(now.getTime());
  expect(at.get(justPast.requestId)).toBe(now.getTime());
  expect((await client.getUsageSummary({ orgId }, admin)).requests).toBe(4n);
});

test("an org's own key reads its org's usage and nothing else", async () => {
  const orgId = await newOrg({ billingDay: 10 });
  const otherOrgId = await newOrg();
  const { secret, apiKey } = await client.createApiKey({ orgId }, admin);
  await client.recordUsage(
    {
      records: [
        usage(orgId, apiKey?.id as string, 5n, new Date("2026-06-10T00:00:00Z")),
        // Before the period that started on June 10th.
        usage(orgId, apiKey?.id as string, 7n, new Date("2026-06-09T23:59:59Z")),
      ],
    },
    admin,
  );

  const own = await client.getUsageSummary({ orgId }, as(secret));
  expect(own.requests).toBe(1n);
  expect(own.costNanos).toBe(5n);
  const ranged = await client.getUsageSummary(
    { orgId, startTime: timestampFromDate(new Date("2026-06-01T00:00:00Z")) },
    as(secret),
  );
  expect(ranged.costNanos).toBe(12n);
  expect((await client.listUsageRecords({ orgId }, as(secret))).records).toHaveLength(2);

  expect(await code(client.getUsageSummary({ orgId: otherOrgId }, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.listUsageRecords({ orgId: otherOrgId }, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.getUsageSummary({ orgId }))).toBe(Code.Unauthenticated);
  expect(await code(client.getUsageSummary({ orgId }, as("wrong-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.getUsageSummary({ orgId }, as(`${secret}x`)))).toBe(Code.Unauthenticated);
  expect(
    await code(
      client.getUsageSummary(
        { orgId, startTime: timestampFromDate(now), endTime: timestampFromDate(new Date(now.getTime() - 1)) },
        admin,
      ),
    ),
  ).toBe(Code.InvalidArgument);

  await client.revokeApiKey({ apiKeyId: apiKey?.id as string }, admin);
  expect(await code(client.getUsageSummary({ orgId }, as(secret)))).toBe(Code.Unauthenticated);
});

test("ListUsageRecords pages newest first with opaque tokens", async () => {
  const orgId = await newOrg();
  const records = [1, 2, 3].map((hour) => usage(orgId, "", BigInt(hour), new Date(Date.UTC(2026, 5, 2, hour))));
  await client.recordUsage({ records }, admin);
  const first = await client.listUsageRecords({ orgId, pageSize: 2 }, admin);
  const ids = records.map((r) => r.requestId);
  expect(first.records.map((r) => r.requestId)).toEqual(ids.slice(1).reverse());
  expect(first.records[0]?.usage?.inputTokens).toBe(100n);
  expect(timestampDate(first.records[0]?.occurTime ?? timestampFromDate(new Date(0)))).toEqual(
    new Date(Date.UTC(2026, 5, 2, 3)),
  );
  const second = await client.listUsageRecords({ orgId, pageSize: 2, pageToken: first.nextPageToken }, admin);
  expect(second.records.map((r) => r.requestId)).toEqual(ids.slice(0, 1));
  expect(second.nextPageToken).toBe("");
  const one = await client.listUsageRecords({ orgId, requestId: ids[1] }, admin);
  expect(one.records.map((r) => r.costNanos)).toEqual([2n]);
  expect(await code(client.listUsageRecords({ orgId, pageToken: "garbage" }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listUsageRecords({ orgId, pageSize: 1001 }, admin))).toBe(Code.InvalidArgument);

  // A token goes on only with the org and request_id it came from: another org's listing from there would leave out
  // every record of that org newer than the cursor, and say nothing of it.
  const otherOrg = await newOrg();
  await client.recordUsage({ records: [usage(otherOrg, "", 5n, new Date(Date.UTC(2026, 5, 2, 4)))] }, admin);
  const elsewhere = client.listUsageRecords({ orgId: otherOrg, pageToken: first.nextPageToken }, admin);
  expect(await failure(elsewhere)).toEqual({
    code: Code.InvalidArgument,
    message: "page_token: issued for another list, org_id or filters; start from the first page",
  });
  const narrowed = client.listUsageRecords({ orgId, requestId: ids[0], pageToken: first.nextPageToken }, admin);
  expect(await code(narrowed)).toBe(Code.InvalidArgument);
  expect(await code(client.listApiKeys({ orgId, pageToken: first.nextPageToken }, admin))).toBe(Code.InvalidArgument);
  // The range may change from page to page, as ListRequests' may.
  const ranged = { startTime: timestampFromDate(new Date(Date.UTC(2026, 5, 2))), endTime: timestampFromDate(now) };
  const rest = await client.listUsageRecords({ orgId, ...ranged, pageToken: first.nextPageToken }, admin);
  expect(rest.records.map((r) => r.requestId)).toEqual(ids.slice(0, 1));
});

test("budget leases over RPC", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000n });
  const lease = await client.acquireBudgetLease(
    { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-a", requestedNanos: 800n, ttlSeconds: 60 },
    admin,
  );
  expect(lease).toMatchObject({ grantedNanos: 800n, remainingNanos: 200n });
  expect(timestampDate(lease.expireTime ?? timestampFromDate(new Date(0)))).toEqual(new Date(now.getTime() + 60_000));
  await client.releaseBudgetLease({ leaseId: lease.leaseId, spentNanos: 300n }, admin);
  const next = await client.acquireBudgetLease(
    { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-b", requestedNanos: 900n, ttlSeconds: 60 },
    admin,
  );
  expect(next).toMatchObject({ grantedNanos: 700n, remainingNanos: 0n });
  const exhausted = await client.acquireBudgetLease(
    { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-b", requestedNanos: 1n, ttlSeconds: 60 },
    admin,
  );
  expect(exhausted).toMatchObject({ leaseId: "", grantedNanos: 0n, remainingNanos: 0n });

  const { apiKey } = await client.createApiKey({ orgId }, admin);
  const unlimited = await client.acquireBudgetLease(
    { scope: BudgetScope.API_KEY, scopeId: apiKey?.id as string, holder: "gw-a", requestedNanos: 5n, ttlSeconds: 1 },
    admin,
  );
  expect(unlimited).toMatchObject({ grantedNanos: 5n, remainingNanos: -1n });

  const valid = { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw", requestedNanos: 1n, ttlSeconds: 60 };
  for (const invalid of [
    { scope: BudgetScope.UNSPECIFIED },
    { holder: "" },
    { requestedNanos: 0n },
    { neededNanos: -1n },
    { neededNanos: 2n },
    { ttlSeconds: 3601 },
    { scopeId: "" },
  ]) {
    expect(await code(client.acquireBudgetLease({ ...valid, ...invalid }, admin))).toBe(Code.InvalidArgument);
  }
  expect(await code(client.releaseBudgetLease({ leaseId: "lease_missing" }, admin))).toBe(Code.NotFound);
});

test("SyncRateUsage sets a gateway's per-minute counts and answers the other gateways', to the admin token only", async () => {
  const orgId = await newOrg();
  const { apiKey, secret } = await client.createApiKey({ orgId }, admin);
  const keyId = apiKey?.id as string;
  const since = BigInt(Math.floor(now.getTime() / 1000)) - 59n;
  let sequence = 0n;
  const sync = (holder: string, usage: { second: bigint; requests: bigint; tokens: bigint }[], changesSince = 0n) =>
    client.syncRateUsage(
      { holder, usage: usage.map((u) => ({ keyId, ...u })), newKeyIds: changesSince ? [] : [keyId], sinceSecond: since, changesSince, sequence: ++sequence },
      admin,
    );
  const counts = (answer: { others: { keyId: string; second: bigint; requests: bigint; tokens: bigint }[] }) =>
    answer.others
      .map(({ keyId, second, requests, tokens }) => ({ keyId, second, requests, tokens }))
      .toSorted((x, y) => Number(x.second - y.second));

  expect(counts(await sync("gw-a", [{ second: since + 50n, requests: 2n, tokens: 300n }]))).toEqual([]);
  const b = await sync("gw-b", [{ second: since + 51n, requests: 1n, tokens: 40n }]);
  expect(counts(b)).toEqual([{ keyId, second: since + 50n, requests: 2n, tokens: 300n }]);
  // A's request given back, its tokens with it: its count of the second is now 1 and 200.
  await sync("gw-a", [{ second: since + 50n, requests: 1n, tokens: 200n }]);
  expect(counts(await sync("gw-b", [], b.watermark))).toEqual([{ keyId, second: since + 50n, requests: 1n, tokens: 200n }]);
  expect(counts(await sync("gw-a", []))).toEqual([{ keyId, second: since + 51n, requests: 1n, tokens: 40n }]);

  const valid = { holder: "gw-a", usage: [{ keyId, second: since, requests: 1n, tokens: 1n }], newKeyIds: [keyId], sinceSecond: since, sequence: 1n };
  expect(await code(client.syncRateUsage(valid))).toBe(Code.Unauthenticated);
  expect(await code(client.syncRateUsage(valid, as("not-the-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.syncRateUsage(valid, as(secret)))).toBe(Code.PermissionDenied);

  const refusals: [Partial<typeof valid> & { changesSince?: bigint }, string][] = [
    [{ holder: "" }, "holder: required"],
    [{ holder: "g".repeat(201) }, "holder: at most 200 characters"],
    [{ sinceSecond: 0n }, "since_second: must be positive"],
    [{ sequence: 0n }, "sequence: must be positive"],
    [{ changesSince: -1n }, "changes_since: must not be negative"],
    [{ usage: [{ keyId: "", second: since, requests: 1n, tokens: 0n }] }, "usage[0].key_id: required"],
    [{ usage: [{ keyId: "k".repeat(129), second: since, requests: 1n, tokens: 0n }] }, "usage[0].key_id: at most 128 characters"],
    [{ usage: [{ keyId, second: -1n, requests: 1n, tokens: 0n }] }, "usage[0].second: must be positive"],
    [{ usage: [{ keyId, second: since, requests: -1n, tokens: 0n }] }, "usage[0].requests: must not be negative"],
    [{ usage: [{ keyId, second: since, requests: 0n, tokens: -1n }] }, "usage[0].tokens: must not be negative"],
    [{ newKeyIds: [keyId, ""] }, "new_key_ids[1]: required"],
    [{ newKeyIds: ["key_\u0000"] }, "new_key_ids[0]: must not contain control characters"],
    [{ usage: Array(10_001).fill(valid.usage[0]) }, "usage: at most 10000 per call"],
    [{ newKeyIds: Array(10_001).fill(keyId) }, "new_key_ids: at most 10000 per call"],
  ];
  for (const [change, message] of refusals) {
    expect(await failure(client.syncRateUsage({ ...valid, ...change }, admin))).toEqual({ code: Code.InvalidArgument, message });
  }

  // The largest call the contract allows is read, though it is past the 1 MiB other admin methods read.
  const longIds = Array.from({ length: 10_000 }, (_, i) => `key_${String(i).padStart(124, "0")}`);
  const largest = { holder: "gw-c", newKeyIds: longIds, sinceSecond: since, sequence: 1n };
  const usage = longIds.map((id) => ({ keyId: id, second: since + 59n, requests: 1n, tokens: 1_000_000n }));
  expect((await client.syncRateUsage({ ...largest, usage }, admin)).others).toEqual([]);
  expect((await client.syncRateUsage({ ...largest, holder: "gw-d", usage: [] }, admin)).others).toHaveLength(10_000);
});

test("a billing replica whose clock is an hour ahead leaves another's live lease alone", async () => {
  // Two replicas on the database's clock, one of them with its own an hour ahead; a billing day two weeks off keeps
  // both in one billing period.
  const replica = (ahead: number) =>
    createClient(BillingService, createRouterTransport(
      createBillingApp({ pool: db.pool, adminToken, clock: () => new Date(Date.now() + ahead), log }).routes,
    ));
  const [steady, fast] = [replica(0), replica(3_600_000)];
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000n, billingDay: ((new Date().getUTCDate() + 13) % 28) + 1 });
  const ask = { scope: BudgetScope.ORGANIZATION, scopeId: orgId, requestedNanos: 1_000n, ttlSeconds: 900 };
  const before = Date.now();
  const live = await steady.acquireBudgetLease({ ...ask, holder: "gw-a" }, admin);
  expect(live.grantedNanos).toBe(1_000n);
  // 15 minutes to live, and 10 of grace after: both over by the fast clock, not by the database's.
  expect(await fast.acquireBudgetLease({ ...ask, holder: "gw-b" }, admin)).toMatchObject({
    grantedNanos: 0n,
    leasedNanos: 1_000n,
  });
  await steady.releaseBudgetLease({ leaseId: live.leaseId, spentNanos: 400n }, admin);
  const next = await fast.acquireBudgetLease({ ...ask, holder: "gw-b" }, admin);
  expect(next).toMatchObject({ grantedNanos: 600n, remainingNanos: 0n });
  // Its expiry is the database's time plus its lifetime, not the fast clock's.
  const expires = timestampDate(next.expireTime ?? timestampFromDate(new Date(0))).getTime();
  expect(expires).toBeGreaterThanOrEqual(before + 900_000 - 1);
  expect(expires).toBeLessThanOrEqual(Date.now() + 900_000);
});

test("a budget lease asked for again under its id, its first answer lost, is the same grant", async () => {
  const registry = new Registry();
  const metered = createBillingApp({ pool: db.pool, adminToken, clock: () => now, log, registry });
  const client = createClient(BillingService, createRouterTransport(metered.routes));
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000n });
  const ask = {
    scope: BudgetScope.ORGANIZATION,
    scopeId: orgId,
    holder: "gw-a",
    requestedNanos: 600n,
    ttlSeconds: 60,
    leaseId: "lease_01JRPCRETRYRPCRETRYRPCRETRY",
  };
  const first = await client.acquireBudgetLease(ask, admin);
  expect(first).toMatchObject({ leaseId: ask.leaseId, grantedNanos: 600n, remainingNanos: 400n });
  expect(await client.acquireBudgetLease(ask, admin)).toEqual(first);
  const counted = async (name: string) => (await registry.getSingleMetric(name)?.get())?.values;
  expect(await counted("billing_budget_leased_usd_total")).toMatchObject([{ value: 600 / 1e9 }]);
  expect(await counted("billing_budget_leases_total")).toMatchObject([
    { labels: { result: "granted" }, value: 1 },
    { labels: { result: "repeated" }, value: 1 },
  ]);
  // Counted once: the rest goes to another holder, and nothing more after it.
  const { leaseId: _, ...fresh } = ask;
  expect(await client.acquireBudgetLease({ ...fresh, holder: "gw-b" }, admin)).toMatchObject({ grantedNanos: 400n });
  expect(await client.acquireBudgetLease({ ...fresh, holder: "gw-c" }, admin)).toMatchObject({ grantedNanos: 0n });
  for (const leaseId of ["01JRPCRETRY", "lease_", "lease_a-b", `lease_${"a".repeat(123)}`]) {
    expect(await code(client.acquireBudgetLease({ ...ask, leaseId }, admin))).toBe(Code.InvalidArgument);
  }
  expect(await code(client.acquireBudgetLease({ ...ask, holder: "gw-b" }, admin))).toBe(Code.InvalidArgument);
  // Giving up on an ask that was never granted: nothing to release.
  expect(await code(client.releaseBudgetLease({ leaseId: "lease_01JRPCNEVERGRANTED" }, admin))).toBe(Code.NotFound);
  // A key's tokens leased are no USD.
  const { apiKey } = await client.createApiKey({ orgId, limits: { monthlyTokens: 5_000n } }, admin);
  const tokens = { scope: BudgetScope.API_KEY_TOKENS, scopeId: apiKey?.id as string, holder: "gw-a", ttlSeconds: 60 };
  expect(await client.acquireBudgetLease({ ...tokens, requestedNanos: 5_000n }, admin)).toMatchObject({
    grantedNanos: 5_000n,
  });
  expect(await counted("billing_budget_leased_usd_total")).toMatchObject([{ value: 1_000 / 1e9 }]);
});

test("one holder is granted at most half of what is left of a budget plus a floor, less than asked rather than nothing", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000_000n });
  const acquire = (holder: string, ttlSeconds = 60) =>
    client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder, requestedNanos: 1_000_000_000n, ttlSeconds },
      admin,
    );
  // Half of 1 USD plus the 0.1 USD floor; asking again adds nothing while that is held.
  const greedy = await acquire("gw-old", 1);
  expect(greedy).toMatchObject({ grantedNanos: 600_000_000n, remainingNanos: 400_000_000n });
  expect(await acquire("gw-old")).toMatchObject({ leaseId: "", grantedNanos: 0n, remainingNanos: 400_000_000n });
  // Other holders still get their share, and the last of the budget, under the floor, goes whole.
  expect(await acquire("gw-b")).toMatchObject({ grantedNanos: 300_000_000n, remainingNanos: 100_000_000n });
  const last = await acquire("gw-c");
  expect(last).toMatchObject({ grantedNanos: 100_000_000n, remainingNanos: 0n });

  // A holder whose lease expired (a restarted replica) is not refused for it; it still reserves its grant meanwhile.
  await client.releaseBudgetLease({ leaseId: last.leaseId, spentNanos: 0n }, admin);
  const before = now;
  now = new Date(now.getTime() + 2_000);
  try {
    expect(await acquire("gw-old")).toMatchObject({ grantedNanos: 100_000_000n, remainingNanos: 0n });
  } finally {
    now = before;
  }
});

test("what the request at hand needs is granted whatever the holder's share, and only the rest is held to it", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000_000n });
  const acquire = (holder: string, requestedNanos: bigint, neededNanos: bigint) =>
    client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder, requestedNanos, neededNanos, ttlSeconds: 60 },
      admin,
    );
  // 0.7 USD needed of 1 USD left: more than half plus the floor (0.6 USD), granted; a surplus asked with it is not.
  expect(await acquire("gw-a", 900_000_000n, 700_000_000n)).toMatchObject({
    grantedNanos: 700_000_000n,
    remainingNanos: 300_000_000n,
  });
  // A need beyond what is left gets what is left, as any ask does.
  expect(await acquire("gw-b", 400_000_000n, 400_000_000n)).toMatchObject({
    grantedNanos: 300_000_000n,
    remainingNanos: 0n,
  });
});

test("a holder alone with a remainder under the floor is granted all of it", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 150_000_000n });
  const acquire = (requestedNanos: bigint) =>
    client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw", requestedNanos, ttlSeconds: 60 },
      admin,
    );
  const first = await acquire(40_000_000n);
  expect(first).toMatchObject({ grantedNanos: 40_000_000n, remainingNanos: 110_000_000n });
  await client.releaseBudgetLease({ leaseId: first.leaseId, spentNanos: 40_000_000n }, admin);
  expect(await acquire(150_000_000n)).toMatchObject({ grantedNanos: 110_000_000n, remainingNanos: 0n });
});

test("WatchKeyChanges streams revocations to gateways", async () => {
  const orgId = await newOrg();
  const { apiKey } = await client.createApiKey({ orgId }, admin);
  const stop = new AbortController();
  const stream = client.watchKeyChanges({}, { ...admin, signal: stop.signal });
  let live = false;
  const received = (async () => {
    for await (const change of stream) {
      // The first, empty message says the watch is live.
      if (!change.apiKeyId) {
        live = true;
        continue;
      }
      stop.abort();
      return change;
    }
  })();
  // Revoke until the watcher, which starts listening asynchronously, has seen it.
  const deadline = Date.now() + 5_000;
  let change: Awaited<typeof received> | undefined;
  while (!change && Date.now() < deadline) {
    await client.updateApiKeyLimits({ apiKeyId: apiKey?.id as string }, admin);
    change = await Promise.race([received, Bun.sleep(50).then(() => undefined)]);
  }
  expect(live).toBe(true);
  expect(change).toMatchObject({ apiKeyId: apiKey?.id as string, revoked: false });
  expect(change?.secretHash).toMatch(/^[0-9a-f]{64}$/);
  expect(await code((async () => { for await (const _ of client.watchKeyChanges({})) break; })())).toBe(
    Code.Unauthenticated,
  );
});

test("a billing app with a lease retention deletes leases of periods long over, at start and then periodically", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000_000n });
  const saved = now;
  const lease = async () => {
    const grant = await client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-old", requestedNanos: 1_000n, ttlSeconds: 60 },
      admin,
    );
    await client.releaseBudgetLease({ leaseId: grant.leaseId, spentNanos: 10n }, admin);
    return grant.leaseId;
  };
  const kept = async (id: string) =>
    (await db.pool.query("SELECT 1 FROM budget_leases WHERE id = $1", [id])).rows.length === 1;
  now = new Date("2026-01-10T12:00:00Z");
  const first = await lease();
  now = new Date("2026-02-10T12:00:00Z");
  const second = await lease();
  now = new Date("2026-05-10T12:00:00Z");
  const stopping = new AbortController();
  const lines = logLines.length;
  try {
    const options = { pool: db.pool, adminToken, clock: () => now, leaseClock: () => now, log, stopSignal: stopping.signal };
    createBillingApp({ ...options, leaseRetentionDays: 90, leasePruneIntervalMs: 20 });
    // At start: January's lease is 120 days old, February's 89.
    for (let i = 0; i < 200 && (await kept(first)); i++) await Bun.sleep(10);
    expect(await kept(first)).toBe(false);
    expect(await kept(second)).toBe(true);
    expect(logLines.slice(lines).some((line) => line.includes("old budget leases deleted"))).toBe(true);
    now = new Date("2026-05-20T12:00:00Z");
    for (let i = 0; i < 200 && (await kept(second)); i++) await Bun.sleep(10);
    expect(await kept(second)).toBe(false);
  } finally {
    stopping.abort();
    now = saved;
  }
});

test("a billing whose clock runs 60 days ahead of Postgres's deletes no lease a grant still counts", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000n });
  const saved = now;
  const lease = async (spentNanos: bigint) => {
    const grant = await client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-ahead", requestedNanos: 1_000n, ttlSeconds: 60 },
      admin,
    );
    await client.releaseBudgetLease({ leaseId: grant.leaseId, spentNanos }, admin);
    return grant.leaseId;
  };
  const kept = async (id: string) =>
    (await db.pool.query("SELECT 1 FROM budget_leases WHERE id = $1", [id])).rows.length === 1;
  const stopping = new AbortController();
  try {
    now = new Date("2026-03-10T12:00:00Z");
    const old = await lease(0n);
    // June's lease spent 600 whose usage is still on its way: only the lease tells grants of it.
    now = new Date("2026-06-15T12:00:00Z");
    const current = await lease(600n);
    const ahead = new Date(now.getTime() + 60 * 86_400_000);
    const options = { pool: db.pool, adminToken, clock: () => ahead, leaseClock: () => now, log };
    createBillingApp({ ...options, stopSignal: stopping.signal, leaseRetentionDays: 35, leasePruneIntervalMs: 20 });
    for (let i = 0; i < 200 && (await kept(old)); i++) await Bun.sleep(10);
    expect(await kept(old)).toBe(false);
    expect(await kept(current)).toBe(true);
    const grant = await client.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-2", requestedNanos: 1_000n, ttlSeconds: 60 },
      admin,
    );
    expect(grant.grantedNanos).toBe(400n);
  } finally {
    stopping.abort();
    now = saved;
  }
});

test("a lease prune held up behind a lock is not joined by another at each interval", async () => {
  const locker = await db.pool.connect();
  const stopping = new AbortController();
  try {
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE budget_leases IN ACCESS EXCLUSIVE MODE");
    const options = { pool: db.pool, adminToken, clock: () => now, log, stopSignal: stopping.signal };
    createBillingApp({ ...options, leaseRetentionDays: 90, leasePruneIntervalMs: 20 });
    await Bun.sleep(400);
    // Asked on the locking connection (read once in its transaction): the pool's may all be waiting.
    const waiting = await locker.query(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE '%doomed AS%' AND wait_event_type = 'Lock'",
    );
    expect(waiting.rows[0]?.n).toBe(1);
  } finally {
    stopping.abort();
    await locker.query("COMMIT");
    locker.release();
  }
});

test("WatchKeyChanges sends an empty message every heartbeat once live, so a silent stream is a stopped one", async () => {
  const beating = createBillingApp({ pool: db.pool, adminToken, clock: () => now, log, keyChangeHeartbeatMs: 40 });
  const watcher = createClient(BillingService, createRouterTransport(beating.routes));
  const stop = new AbortController();
  const arrivals: number[] = [];
  const started = performance.now();
  try {
    for await (const change of watcher.watchKeyChanges({}, { ...admin, signal: stop.signal })) {
      expect(change.apiKeyId).toBe("");
      arrivals.push(performance.now() - started);
      if (arrivals.length === 4) break;
    }
  } finally {
    stop.abort();
  }
  // The live message, then heartbeats about 40 ms apart.
  expect(arrivals).toHaveLength(4);
  for (let i = 2; i < arrivals.length; i++) expect((arrivals[i] as number) - (arrivals[i - 1] as number)).toBeGreaterThan(30);
});

test("serves Connect JSON and gRPC on one real port", async () => {
  const server = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, log });
  try {
    const orgId = await newOrg();
    const res = await fetch(`${server.url}/billing.v1.BillingService/ListProjects`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
      body: JSON.stringify({ orgId }),
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({});

    const grpc = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken });
    const { project } = await grpc.createProject({ orgId, name: "over-grpc" });
    expect((await grpc.listProjects({ orgId })).projects.map((p) => p.id)).toEqual([project?.id as string]);
  } finally {
    await server.close(1_000);
  }
});

test("Connect JSON refuses unknown fields and enum names, naming them, on writes and reads; binary skips them", async () => {
  const server = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, log });
  const post = async (method: string, body: unknown) => {
    const res = await fetch(`${server.url}/billing.v1.BillingService/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as { code?: string; message?: string } };
  };
  try {
    const orgId = await newOrg();
    const limits = { monthlyBudgetNanos: 5_000_000_000n, requestsPerMinute: 60, allowedModels: ["gpt-4o"] };
    const keyId = (await client.createApiKey({ orgId, limits }, admin)).apiKey?.id as string;
    // A misspelt limit without an update_mask would have replaced them all, removing the key's budget.
    const typo = await post("UpdateApiKeyLimits", { apiKeyId: keyId, limits: { montlyBudgetNanos: "9000000000" } });
    expect(typo.status).toBe(400);
    expect(typo.body.code).toBe("invalid_argument");
    expect(typo.body.message).toContain("montlyBudgetNanos");
    const keys = (await client.listApiKeys({ orgId }, admin)).apiKeys;
    expect(keys[0]?.limits).toMatchObject(limits);

    const misnamed = await post("UpdateOrganization", { orgId, taxRate: 800 });
    expect([misnamed.status, misnamed.body.code]).toEqual([400, "invalid_argument"]);
    expect(misnamed.body.message).toContain("taxRate");

    const record = { requestId: "01TESTJSONUNKNOWNENDPOINT1", orgId, apiKeyId: keyId, occurTime: now.toISOString() };
    const endpoint = await post("RecordUsage", { records: [{ ...record, endpoint: "ENDPOINT_CHAT_COMPLETION" }] });
    expect([endpoint.status, endpoint.body.code]).toEqual([400, "invalid_argument"]);
    expect(endpoint.body.message).toContain("ENDPOINT_CHAT_COMPLETION");
    expect((await client.listUsageRecords({ orgId }, admin)).records).toEqual([]);
    // A date the calendar does not have is refused, not rolled over into the next month (and billing period).
    for (const [occurTime, why] of [
      ["2026-11-31T10:00:00Z", "November 2026 has days 01..30"],
      ["2026-02-29T10:00:00Z", "February 2026 has days 01..28"],
      ["2026-11-30T24:00:00Z", "its time of day is not within 00:00:00..23:59:59"],
    ]) {
      const rolled = await post("RecordUsage", { records: [record, { ...record, occurTime }] });
      expect([rolled.status, rolled.body.code]).toEqual([400, "invalid_argument"]);
      expect(rolled.body.message).toBe(`records[1].occur_time: "${occurTime}" is no date-time: ${why}`);
    }
    expect((await client.listUsageRecords({ orgId }, admin)).records).toEqual([]);
    const recorded = await post("RecordUsage", { records: [{ ...record, endpoint: "ENDPOINT_CHAT_COMPLETIONS" }] });
    expect(recorded).toEqual({ status: 200, body: { inserted: 1 } as never });

    // Still only UTF-8: a Latin-1 name is refused, not stored with a replacement character.
    const latin1 = await fetch(`${server.url}/billing.v1.BillingService/CreateOrganization`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${adminToken}` },
      body: Buffer.from('{"name":"caf\xe9"}', "latin1"),
    });
    expect(latin1.status).toBe(400);

    // Reads too: a misspelt filter skipped would answer for everything, as if it had been applied.
    const listed = await post("ListApiKeys", { orgId, sortBy: "name" });
    expect([listed.status, listed.body.code]).toEqual([400, "invalid_argument"]);
    expect(listed.body.message).toContain("sortBy");
    const lookup = await post("ListUsageRecords", { orgId, requestID: record.requestId });
    expect([lookup.status, lookup.body.code]).toEqual([400, "invalid_argument"]);
    expect(lookup.body.message).toContain("requestID");
    const found = await post("ListUsageRecords", { orgId, requestId: record.requestId });
    expect([found.status, (found.body as { records?: unknown[] }).records?.length]).toEqual([200, 1]);

    // A binary message's unknown fields are a newer client's: skipped, so an older server still serves it.
    const binary = new Uint8Array([
      ...toBinary(UpdateOrganizationRequestSchema, create(UpdateOrganizationRequestSchema, { orgId, taxRateBps: 700 })),
      ...[0xb8, 0x3e, 0x01], // field 999, varint 1
    ]);
    const res = await fetch(`${server.url}/billing.v1.BillingService/UpdateOrganization`, {
      method: "POST",
      headers: { "content-type": "application/proto", authorization: `Bearer ${adminToken}` },
      body: binary,
    });
    expect(res.status).toBe(200);
    const answer = fromBinary(UpdateOrganizationResponseSchema, new Uint8Array(await res.arrayBuffer()));
    expect(answer.organization?.taxRateBps).toBe(700);
  } finally {
    await server.close(1_000);
  }
});

test("AuthorizeKey answers spend from memory, adds recorded usage and starts over in a new month", async () => {
  const orgId = await newOrg();
  const { secret, apiKey } = await client.createApiKey({ orgId }, admin);
  const keyId = apiKey?.id as string;
  await client.recordUsage({ records: [usage(orgId, keyId, 100n)] }, admin);
  expect((await client.authorizeKey({ secret }, admin)).keySpentNanos).toBe(100n);
  await client.recordUsage({ records: [usage(orgId, keyId, 20n), usage(orgId, "", 3n)] }, admin);
  expect(await client.authorizeKey({ secret }, admin)).toMatchObject({ keySpentNanos: 120n, orgSpentNanos: 123n });

  const saved = now;
  now = new Date("2026-07-01T00:00:00Z");
  try {
    expect(await client.authorizeKey({ secret }, admin)).toMatchObject({ keySpentNanos: 0n, orgSpentNanos: 0n });
    await client.recordUsage({ records: [usage(orgId, keyId, 7n, now), usage(orgId, keyId, 1_000n, saved)] }, admin);
    expect(await client.authorizeKey({ secret }, admin)).toMatchObject({ keySpentNanos: 7n, keyTokens: 140n });
  } finally {
    now = saved;
  }
});

test("AuthorizeKey on one replica counts usage recorded through another once its figures are 1 s old", async () => {
  const replica = createBillingApp({ pool: db.pool, adminToken, clock: () => now, log });
  const other = createClient(BillingService, createRouterTransport(replica.routes));
  const orgId = await newOrg();
  const { secret, apiKey } = await client.createApiKey({ orgId, limits: { monthlyTokens: 300n } }, admin);
  const keyId = apiKey?.id as string;
  expect((await other.authorizeKey({ secret }, admin)).keyTokens).toBe(0n);
  await client.recordUsage({ records: [1, 2, 3].map(() => usage(orgId, keyId, 5n)) }, admin);
  const saved = now;
  now = new Date(now.getTime() + 1_000);
  try {
    // The first answer after the usage, not only some later one, has the key over its limit.
    expect(await other.authorizeKey({ secret }, admin)).toMatchObject({ keyTokens: 420n, orgSpentNanos: 15n });
  } finally {
    now = saved;
  }
});

const promo = (orgId: string, extra: MessageInitShape<typeof DiscountRuleSchema> = {}) => ({
  rule: { orgId, name: "promo", kind: DiscountKind.PROMOTIONAL, discountBps: 1000, ...extra },
});

test("discount rules: created, listed and deleted by admins, validated against the contract", async () => {
  const orgId = await newOrg();
  const volume = await client.createDiscountRule(
    {
      rule: {
        orgId,
        name: "volume",
        kind: DiscountKind.VOLUME_ALL_UNITS,
        priority: 2,
        tiers: [
          { fromNanos: 0n, discountBps: 0 },
          { fromNanos: 1_000n, discountBps: 500 },
        ],
      },
    },
    admin,
  );
  expect(volume.rule).toMatchObject({ orgId, kind: DiscountKind.VOLUME_ALL_UNITS, stackable: false, endHour: 24 });
  expect(volume.rule?.id).toStartWith("disc_");
  const window = await client.createDiscountRule(
    promo(orgId, { kind: DiscountKind.TIME_WINDOW, startHour: 22, endHour: 24, daysOfWeek: [6, 0, 6], model: " m " }),
    admin,
  );
  expect(window.rule).toMatchObject({ daysOfWeek: [0, 6], model: "m", provider: "" });
  const listed = await client.listDiscountRules({ orgId }, admin);
  expect(listed.rules.map((r) => r.name)).toEqual(["volume", "promo"]);

  const hour = (iso: string) => timestampFromDate(new Date(iso));
  const invalid = [
    { kind: DiscountKind.UNSPECIFIED },
    { name: "" },
    { discountBps: 0 },
    { discountBps: 10_001 },
    { tiers: [{ fromNanos: 0n, discountBps: 1 }] },
    { kind: DiscountKind.VOLUME_GRADUATED, discountBps: 0, tiers: [] },
    { kind: DiscountKind.VOLUME_GRADUATED, discountBps: 5, tiers: [{ fromNanos: 0n, discountBps: 1 }] },
    {
      kind: DiscountKind.VOLUME_GRADUATED,
      discountBps: 0,
      tiers: [
        { fromNanos: 10n, discountBps: 1 },
        { fromNanos: 10n, discountBps: 2 },
      ],
    },
    {
      kind: DiscountKind.VOLUME_GRADUATED,
      discountBps: 0,
      tiers: [
        { fromNanos: 0n, discountBps: 5 },
        { fromNanos: 10n, discountBps: 2 },
      ],
    },
    { kind: DiscountKind.TIME_WINDOW, startHour: 6, endHour: 6 },
    { kind: DiscountKind.TIME_WINDOW, startHour: 0, endHour: 25 },
    { kind: DiscountKind.TIME_WINDOW, endHour: 5, daysOfWeek: [7] },
    { startHour: 3, endHour: 5 },
    { daysOfWeek: [1] },
    { validFrom: hour("2026-06-01T00:30:00Z") },
    { validFrom: hour("2026-06-02T00:00:00Z"), validUntil: hour("2026-06-01T00:00:00Z") },
    { capNanos: -1n },
    { orgId: "" },
  ];
  for (const extra of invalid) {
    const failed = await code(client.createDiscountRule(promo(orgId, extra), admin));
    if (failed !== Code.InvalidArgument) throw new Error(`${JSON.stringify(extra, (_, v) => String(v))}: ${failed}`);
  }
  expect(await code(client.createDiscountRule({}, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.createDiscountRule(promo("org_missing"), admin))).toBe(Code.NotFound);

  const { secret } = await client.createApiKey({ orgId }, admin);
  expect(await code(client.listDiscountRules({ orgId }, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.createDiscountRule(promo(orgId), as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.deleteDiscountRule({ ruleId: volume.rule?.id as string }, as(secret)))).toBe(
    Code.PermissionDenied,
  );

  await client.deleteDiscountRule({ ruleId: volume.rule?.id as string }, admin);
  expect((await client.listDiscountRules({ orgId }, admin)).rules).toHaveLength(1);
  expect(await code(client.deleteDiscountRule({ ruleId: volume.rule?.id as string }, admin))).toBe(Code.NotFound);
});

test("a time window may wrap past midnight; an empty one is refused, naming 0 to 24 for all day", async () => {
  const orgId = await newOrg();
  const nights = await client.createDiscountRule(
    promo(orgId, { kind: DiscountKind.TIME_WINDOW, startHour: 22, endHour: 6, daysOfWeek: [5] }),
    admin,
  );
  expect(nights.rule).toMatchObject({ startHour: 22, endHour: 6, daysOfWeek: [5] });
  expect((await client.listDiscountRules({ orgId }, admin)).rules).toMatchObject([{ startHour: 22, endHour: 6 }]);
  const empty = await client
    .createDiscountRule(promo(orgId, { kind: DiscountKind.TIME_WINDOW, startHour: 6, endHour: 6 }), admin)
    .catch((e: unknown) => ConnectError.from(e));
  expect(empty).toMatchObject({ code: Code.InvalidArgument });
  expect((empty as ConnectError).rawMessage).toBe(
    "rule.end_hour: must differ from start_hour (a window of all day is 0 to 24)",
  );
  for (const extra of [{ startHour: 22, endHour: 6 }, { kind: DiscountKind.TIME_WINDOW, startHour: 22, endHour: 0 }]) {
    expect(await code(client.createDiscountRule(promo(orgId, extra), admin))).toBe(Code.InvalidArgument);
  }
});

test("a discount rule created again with its request_id is the same rule: retries never stack a second copy", async () => {
  const orgId = await newOrg();
  const { apiKey } = await client.createApiKey({ orgId }, admin);
  const requestId = "01JRETRYDISCOUNT000000000A";
  const first = await client.createDiscountRule({ ...promo(orgId), requestId }, admin);
  const again = await client.createDiscountRule({ ...promo(orgId), requestId }, admin);
  expect(again.rule).toEqual(first.rule);
  // Two at once, as a client retrying a call still running would send them: one rule.
  const racing = await Promise.all(
    Array.from({ length: 4 }, () => client.createDiscountRule({ ...promo(orgId), requestId: "race-1" }, admin)),
  );
  expect(new Set(racing.map((r) => r.rule?.id)).size).toBe(1);
  expect((await client.listDiscountRules({ orgId }, admin)).rules).toHaveLength(2);
  await client.deleteDiscountRule({ ruleId: racing[0]?.rule?.id as string }, admin);

  // $100 of usage, 10% off once: 1000 cents, not the 1900 of two stacked copies.
  await client.recordUsage({ records: [usage(orgId, apiKey?.id as string, 100_000_000_000n)] }, admin);
  const { invoice } = await client.generateInvoice({ orgId }, admin);
  expect(invoice?.discountCents).toBe(1000n);
  expect(invoice?.lineItems.filter((l) => l.tokenType === "discount")).toHaveLength(1);

  const other = await client
    .createDiscountRule({ ...promo(orgId, { discountBps: 2000 }), requestId }, admin)
    .catch((e: unknown) => ConnectError.from(e));
  expect(other).toMatchObject({ code: Code.AlreadyExists });
  expect((other as ConnectError).rawMessage).toBe(
    `request_id ${requestId} was already used to create discount rule ${first.rule?.id}, which differs from this`,
  );
  // Unique per org: another org's rule of the same request_id is its own.
  const otherOrgId = await newOrg();
  const elsewhere = await client.createDiscountRule({ ...promo(otherOrgId), requestId }, admin);
  expect(elsewhere.rule?.id).not.toBe(first.rule?.id);
  for (const bad of ["has space", "x".repeat(129), "ü"]) {
    const refused = await client
      .createDiscountRule({ ...promo(orgId), requestId: bad }, admin)
      .catch((e: unknown) => ConnectError.from(e));
    expect(refused).toMatchObject({ code: Code.InvalidArgument });
    expect((refused as ConnectError).rawMessage).toBe("request_id: must be 1..128 letters, digits, _ or -");
  }
  // Without a request_id every call is a new rule, as before.
  await client.createDiscountRule(promo(orgId), admin);
  await client.createDiscountRule(promo(orgId), admin);
  expect((await client.listDiscountRules({ orgId }, admin)).rules).toHaveLength(3);
});

test("an org or project created again with its request_id is the same one, not ALREADY_EXISTS for its name", async () => {
  const ask = { name: "Retried Org", taxRateBps: 825, monthlyBudgetNanos: 7_000_000_000n };
  const first = await client.createOrganization({ ...ask, requestId: "org-retry-1" }, admin);
  const again = await client.createOrganization({ ...ask, requestId: "org-retry-1" }, admin);
  expect(again.organization).toEqual(first.organization);
  const orgId = first.organization?.id as string;
  // Without it, or with another, the name is taken.
  for (const requestId of ["", "org-retry-2"]) {
    const taken = await client.createOrganization({ ...ask, requestId }, admin).catch((e: unknown) => ConnectError.from(e));
    expect(taken).toMatchObject({ code: Code.AlreadyExists });
    expect((taken as ConnectError).rawMessage).toBe("name: an organization with this name already exists");
  }
  const other = await client
    .createOrganization({ ...ask, taxRateBps: 0, requestId: "org-retry-1" }, admin)
    .catch((e: unknown) => ConnectError.from(e));
  expect((other as ConnectError).rawMessage).toBe(
    `request_id org-retry-1 was already used to create organization ${orgId}, of another name or settings`,
  );
  // Renamed since: the repeat answers with the org as it is now.
  await client.updateOrganization({ orgId, name: "Renamed Org" }, admin);
  expect((await client.createOrganization({ ...ask, requestId: "org-retry-1" }, admin)).organization?.name).toBe(
    "Renamed Org",
  );
  const racing = await Promise.all(
    Array.from({ length: 4 }, () => client.createOrganization({ name: "Racing Org", requestId: "org-race-1" }, admin)),
  );
  expect(new Set(racing.map((r) => r.organization?.id)).size).toBe(1);

  const project = await client.createProject({ orgId, name: "web", requestId: "proj-retry-1" }, admin);
  expect((await client.createProject({ orgId, name: "web", requestId: "proj-retry-1" }, admin)).project).toEqual(
    project.project,
  );
  const renamed = await client
    .createProject({ orgId, name: "api", requestId: "proj-retry-1" }, admin)
    .catch((e: unknown) => ConnectError.from(e));
  expect((renamed as ConnectError).rawMessage).toBe(
    `request_id proj-retry-1 was already used to create project ${project.project?.id}, of another name`,
  );
  const projects = await Promise.all(
    Array.from({ length: 4 }, () => client.createProject({ orgId, name: "batch", requestId: "proj-race-1" }, admin)),
  );
  expect(new Set(projects.map((r) => r.project?.id)).size).toBe(1);
  expect((await client.listProjects({ orgId }, admin)).projects.map((p) => p.name)).toEqual(["web", "batch"]);
  // Unique per org: another org's project of the same request_id is its own.
  const elsewhere = await client.createProject({ orgId: await newOrg(), name: "web", requestId: "proj-retry-1" }, admin);
  expect(elsewhere.project?.id).not.toBe(project.project?.id);
  expect(await code(client.createProject({ orgId, name: "x", requestId: "a b" }, admin))).toBe(Code.InvalidArgument);
});

test("an api key created again with its request_id is the same key, its secret not shown twice", async () => {
  const orgId = await newOrg();
  const ask = { orgId, name: "ci", limits: { monthlyBudgetNanos: 5_000_000_000n, allowedModels: ["mock"] } };
  const first = await client.createApiKey({ ...ask, requestId: "key-retry-1" }, admin);
  expect(first.secret).toStartWith("sk-mesh-");
  const again = await client.createApiKey({ ...ask, requestId: "key-retry-1" }, admin);
  expect(again.apiKey).toEqual(first.apiKey);
  expect(again.secret).toBe("");
  const racing = await Promise.all(
    Array.from({ length: 4 }, () => client.createApiKey({ ...ask, requestId: "key-race-1" }, admin)),
  );
  expect(new Set(racing.map((r) => r.apiKey?.id)).size).toBe(1);
  expect(racing.filter((r) => r.secret !== "")).toHaveLength(1);
  expect((await client.listApiKeys({ orgId }, admin)).apiKeys).toHaveLength(2);
  // The key as it is now: revoked since, the repeat says so.
  await client.revokeApiKey({ apiKeyId: first.apiKey?.id as string }, admin);
  const revoked = await client.createApiKey({ ...ask, requestId: "key-retry-1" }, admin);
  expect(revoked.apiKey?.revokeTime).toBeDefined();

  const other = await client
    .createApiKey({ ...ask, name: "cd", requestId: "key-retry-1" }, admin)
    .catch((e: unknown) => ConnectError.from(e));
  expect(other).toMatchObject({ code: Code.AlreadyExists });
  expect((other as ConnectError).rawMessage).toBe(
    `request_id key-retry-1 was already used to create api key ${first.apiKey?.id}, of another project, name or limits`,
  );
  expect(await code(client.createApiKey({ ...ask, requestId: "a/b" }, admin))).toBe(Code.InvalidArgument);
  expect((await client.listApiKeys({ orgId, includeRevoked: true }, admin)).apiKeys).toHaveLength(2);
});

test("invoices over RPC: admins generate and move them, an org's own key reads only its own", async () => {
  const orgId = await newOrg();
  const otherOrgId = await newOrg();
  const { secret, apiKey } = await client.createApiKey({ orgId }, admin);
  const other = await client.createApiKey({ orgId: otherOrgId }, admin);
  await client.recordUsage({ records: [usage(orgId, apiKey?.id as string, 12_345_678n)] }, admin);
  await client.createDiscountRule(promo(orgId, { discountBps: 5000 }), admin);

  const { invoice } = await client.generateInvoice({ orgId }, admin);
  expect(invoice).toMatchObject({
    orgId,
    number: "",
    status: InvoiceStatus.DRAFT,
    subtotalCents: 1n,
    discountCents: 1n,
    taxCents: 0n,
    totalCents: 1n,
  });
  expect(invoice?.roundingRule).toContain("half-up");
  expect(invoice?.lineItems.map((l) => [l.tokenType, l.amountNanos])).toEqual([
    ["usage", 12_345_678n],
    ["discount", -6_172_839n],
  ]);
  const invoiceId = invoice?.id as string;

  expect((await client.listInvoices({ orgId }, as(secret))).invoices.map((i) => i.id)).toEqual([invoiceId]);
  expect((await client.getInvoice({ invoiceId }, as(secret))).invoice?.lineItems).toHaveLength(2);
  // Another org's invoice is as unknown to a key as a missing one.
  expect(await code(client.getInvoice({ invoiceId }, as(other.secret)))).toBe(Code.NotFound);
  expect(await code(client.listInvoices({ orgId }, as(other.secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.getInvoice({ invoiceId }))).toBe(Code.Unauthenticated);
  expect(await code(client.getInvoice({ invoiceId }, as("wrong-admin-token")))).toBe(Code.PermissionDenied);
  expect(await code(client.generateInvoice({ orgId }, as(secret)))).toBe(Code.PermissionDenied);
  const issue = { invoiceId, status: InvoiceStatus.ISSUED };
  expect(await code(client.updateInvoiceStatus(issue, as(secret)))).toBe(Code.PermissionDenied);
  expect(await code(client.getInvoice({ invoiceId: "inv_missing" }, admin))).toBe(Code.NotFound);
  expect(await code(client.generateInvoice({ orgId, periodTime: { seconds: -(10n ** 12n) } }, admin))).toBe(
    Code.InvalidArgument,
  );

  // June is not over yet.
  expect(await code(client.updateInvoiceStatus(issue, admin))).toBe(Code.FailedPrecondition);
  const saved = now;
  now = new Date("2026-07-01T00:00:00Z");
  try {
    const issued = await client.updateInvoiceStatus(issue, admin);
    expect(issued.invoice).toMatchObject({ status: InvoiceStatus.ISSUED, number: "INV-2026-06-0001" });
    expect(issued.invoice?.issueTime).toEqual(timestampFromDate(now));
    expect(await code(client.generateInvoice({ orgId, periodTime: timestampFromDate(saved) }, admin))).toBe(
      Code.FailedPrecondition,
    );
    expect(await code(client.updateInvoiceStatus({ invoiceId, status: InvoiceStatus.DRAFT }, admin))).toBe(
      Code.FailedPrecondition,
    );
    expect(await code(client.updateInvoiceStatus({ invoiceId, status: InvoiceStatus.UNSPECIFIED }, admin))).toBe(
      Code.InvalidArgument,
    );
    const paid = await client.updateInvoiceStatus({ invoiceId, status: InvoiceStatus.PAID }, admin);
    expect(paid.invoice?.status).toBe(InvoiceStatus.PAID);
  } finally {
    now = saved;
  }
});

test("WatchKeyChanges streams end as soon as the service is told to stop", async () => {
  const stopping = new AbortController();
  const stoppable = createBillingApp({ pool: db.pool, adminToken, clock: () => now, log, stopSignal: stopping.signal });
  const server = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: stoppable.routes, log });
  try {
    const grpc = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken });
    const ended = (async () => {
      for await (const _ of grpc.watchKeyChanges({})) {
        // Changes are irrelevant here; the stream has to end.
      }
      return "ended";
    })();
    // The stream is open once LISTEN is in effect.
    for (let i = 0; i < 500; i++) {
      const { rows } = await db.pool.query(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'",
      );
      if (rows[0].n > 0) break;
      await Bun.sleep(10);
    }
    stopping.abort();
    expect(await Promise.race([ended, Bun.sleep(5_000).then(() => "still open")])).toBe("ended");
    const closing = Date.now();
    await server.close(20_000);
    // Nothing left in flight to wait the 20 s grace for.
    expect(Date.now() - closing).toBeLessThan(10_000);
  } finally {
    await server.close(0);
  }
}, 60_000);

test("a WatchKeyChanges stream ends, without an error, once its connection is past its age", async () => {
  const server = await startServer({
    name: "billing",
    port: 0,
    host: "127.0.0.1",
    routes: app.routes,
    log,
    connectionMaxAgeMs: 300,
  });
  try {
    const grpc = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken });
    let messages = 0;
    // The gateway opens it again on a new connection, which its Service may send to another replica.
    for await (const _ of grpc.watchKeyChanges({}, { timeoutMs: 0 })) messages++;
    expect(messages).toBeGreaterThan(0);
  } finally {
    await server.close(0);
  }
}, 60_000);

test("two gateways leasing concurrently over a real server never get more than the budget", async () => {
  const budget = 1_000_000n;
  const orgId = await newOrg({ monthlyBudgetNanos: budget });
  const server = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, log });
  try {
    // One connection per gateway replica.
    const gateways = ["gw-a", "gw-b"].map((holder) => ({
      holder,
      rpc: createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken }),
    }));
    const acquire = (g: (typeof gateways)[number], requestedNanos: bigint) =>
      g.rpc.acquireBudgetLease({
        scope: BudgetScope.ORGANIZATION,
        scopeId: orgId,
        holder: g.holder,
        requestedNanos,
        ttlSeconds: 60,
      });

    // Round 1: 2 x 40 concurrent grants of 30,000 ask for 2.4x the budget; held, not released.
    const held = await Promise.all(gateways.flatMap((g) => Array.from({ length: 40 }, () => acquire(g, 30_000n))));
    const granted = held.reduce((sum, l) => sum + l.grantedNanos, 0n);
    expect(granted).toBe(budget);
    expect(held.filter((l) => l.grantedNanos > 0n).length).toBe(34);
    expect(held.every((l) => l.remainingNanos >= 0n)).toBe(true);

    // Round 2: every lease settles at a random part of its grant while both gateways keep asking for more.
    let spent = 0n;
    let regranted: bigint[] = [];
    await Promise.all(
      held.map(async (lease, i) => {
        if (!lease.leaseId) return;
        const used = (lease.grantedNanos * BigInt((i * 37) % 101)) / 100n;
        spent += used;
        const g = gateways[i % 2] as (typeof gateways)[number];
        await g.rpc.releaseBudgetLease({ leaseId: lease.leaseId, spentNanos: used });
        // Releasing twice is a no-op.
        await g.rpc.releaseBudgetLease({ leaseId: lease.leaseId, spentNanos: 0n });
        const more = await acquire(g, 10_000n);
        regranted.push(more.grantedNanos);
        if (more.leaseId) await g.rpc.releaseBudgetLease({ leaseId: more.leaseId, spentNanos: 0n });
      }),
    );
    expect(regranted.length).toBe(34);

    // Whatever is left is exactly the budget minus what was spent: nothing lost, nothing double counted.
    const rest = await acquire(gateways[0] as (typeof gateways)[number], budget);
    expect(rest.grantedNanos).toBe(budget - spent);
    expect(rest.remainingNanos).toBe(0n);
    regranted = [];
  } finally {
    await server.close(1_000);
  }
}, 60_000);

/** Code and message of a call that must fail. */
async function failure(call: Promise<unknown>): Promise<{ code: Code; message: string }> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
  if (!error) throw new Error("expected the call to fail");
  return { code: error.code, message: error.rawMessage };
}

test("RecordUsage bounds a record's cost and its parts; totals past int64 fail in the API's words", async () => {
  const orgId = await newOrg();
  const maxCost = 10n ** 15n;
  const maxInt64 = 2n ** 63n - 1n;
  const record = (costNanos: bigint, at = now, edit: (r: UsageRecord) => void = () => {}) => {
    const r = usage(orgId, "", costNanos, at);
    edit(r);
    return r;
  };
  const overflowing = [record(1n), record(maxInt64), record(maxInt64)];
  expect(await failure(client.recordUsage({ records: overflowing }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "records[1].cost_nanos: at most 1000000000000000",
  });
  const breakdown = (inputNanos: bigint, outputNanos: bigint) =>
    create(CostBreakdownSchema, { inputNanos, cachedInputNanos: 0n, outputNanos, reasoningNanos: 0n });
  const hugePart = record(maxCost, now, (r) => (r.costBreakdown = breakdown(maxInt64, maxCost - maxInt64)));
  expect(await failure(client.recordUsage({ records: [hugePart] }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "records[0].cost_breakdown.input_nanos: at most 1000000000000000",
  });
  const hugeTokens = record(1n, now, (r) => r.usage && (r.usage.outputTokens = maxInt64));
  expect(await failure(client.recordUsage({ records: [hugeTokens] }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "records[0].usage.output_tokens: at most 2147483648",
  });
  expect((await client.recordUsage({ records: [record(maxCost)] }, admin)).inserted).toBe(1);

  // Thousands of records at the bound can still outgrow one day's total: refused in the API's words.
  await db.pool.query("UPDATE usage_summaries SET cost_nanos = $2 WHERE org_id = $1", [orgId, String(maxInt64 - 1n)]);
  expect(await failure(client.recordUsage({ records: [record(maxCost)] }, admin))).toEqual({
    code: Code.FailedPrecondition,
    message: "a total would exceed the largest amount billing can hold (2^63-1)",
  });

  // Days that each fit can add up to more than an int64 field carries.
  await client.recordUsage({ records: [record(1n, new Date("2026-06-02T00:00:00Z"))] }, admin);
  await db.pool.query("UPDATE usage_summaries SET cost_nanos = $2 WHERE org_id = $1", [orgId, String(maxInt64 - 1n)]);
  await db.pool.query("UPDATE usage_org_days SET cost_nanos = $2 WHERE org_id = $1", [orgId, String(maxInt64 - 1n)]);
  expect(await failure(client.getUsageSummary({ orgId }, admin))).toMatchObject({ code: Code.FailedPrecondition });
  expect((await failure(client.getUsageSummary({ orgId }, admin))).message).toContain("ask for a shorter range");
  const { secret } = await client.createApiKey({ orgId }, admin);
  expect((await client.authorizeKey({ secret }, admin)).orgSpentNanos).toBe(maxInt64);

  // So can an invoice line: 9,224 records at the bound (as the table holds them) add up past int64.
  await db.pool.query(
    `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
       output_tokens, reasoning_tokens, cost_nanos, occurred_at)
     SELECT 'req_bound_' || i, $1, 'm', 'p', 'chat_completions', 1, 0, 1, 0, $2, $3 FROM generate_series(1, 9224) AS i`,
    [orgId, String(maxCost), now.toISOString()],
  );
  expect(await failure(client.generateInvoice({ orgId }, admin))).toEqual({
    code: Code.FailedPrecondition,
    message: "a total would exceed the largest amount billing can hold (2^63-1)",
  });
});

test("text and ids with control characters are InvalidArgument naming the field, wherever they come in", async () => {
  const orgId = await newOrg();
  const { secret } = await client.createApiKey({ orgId }, admin);
  const own = as(secret);
  const refused = (field: string) => ({
    code: Code.InvalidArgument,
    message: `${field}: must not contain control characters`,
  });
  expect(await failure(client.listUsageRecords({ orgId, requestId: "a\u0000" }, own))).toEqual(refused("request_id"));
  expect(await failure(client.getUsageSummary({ orgId, projectId: "a\u0000" }, own))).toEqual(refused("project_id"));
  expect(await failure(client.getUsageSummary({ orgId, apiKeyId: "a\u001f" }, own))).toEqual(refused("api_key_id"));
  // Checked before the listing it names: a cursor such as these is refused whichever listing it claims.
  const token = (cursor: unknown) => Buffer.from(JSON.stringify([cursor, "0".repeat(16)])).toString("base64url");
  const cursors = [
    { occurredAt: now.toISOString(), requestId: "a\u0000" },
    { occurredAt: "-100000-01-01T00:00:00Z", requestId: "x" },
  ];
  for (const cursor of cursors) {
    expect(await failure(client.listUsageRecords({ orgId, pageToken: token(cursor) }, own))).toEqual({
      code: Code.InvalidArgument,
      message: "page_token: not a token from a previous response",
    });
  }
  for (const name of ["a\u0000b", "tab\there", "new\nline", "bell\u0007", "\u001b[31mred", "del\u007f", "line\u2028sep"]) {
    expect(await failure(client.createOrganization({ name }, admin))).toEqual(refused("name"));
    expect(await failure(client.createProject({ orgId, name }, admin))).toEqual(refused("name"));
  }
  // Surrounding whitespace, newlines included, is trimmed as before.
  expect((await client.createProject({ orgId, name: "\n web \t" }, admin)).project?.name).toBe("web");
  // A name of nothing visible is no name; names that look the same are the same (composed form).
  expect(await failure(client.createProject({ orgId, name: "\u200b" }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "name: required",
  });
  const composed = await client.createProject({ orgId, name: "Cafe\u0301" }, admin);
  expect(composed.project?.name).toBe("Caf\u00e9");
  expect(await failure(client.createProject({ orgId, name: "Caf\u00e9" }, admin))).toMatchObject({ code: Code.AlreadyExists });
  const model = usage(orgId, "", 1n);
  model.model = "mock\u0000";
  expect(await failure(client.recordUsage({ records: [model] }, admin))).toEqual(refused("records[0].model"));
  const limits = { allowedModels: ["mock", "bad\u0001"] };
  expect(await failure(client.createApiKey({ orgId, limits }, admin))).toEqual(refused("limits.allowed_models[1]"));
  expect(
    await failure(
      client.acquireBudgetLease(
        { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw\u0000", requestedNanos: 1n, ttlSeconds: 60 },
        admin,
      ),
    ),
  ).toEqual(refused("holder"));
  expect(await failure(client.revokeApiKey({ apiKeyId: "key_\u0000" }, admin))).toEqual(refused("api_key_id"));
});

test("lengths count characters as the database does, not UTF-16 units", async () => {
  const emoji = "\u{1F600}";
  expect((await client.createOrganization({ name: emoji.repeat(150) }, admin)).organization?.name).toBe(
    emoji.repeat(150),
  );
  expect((await client.createOrganization({ name: `a${emoji.repeat(199)}` }, admin)).organization?.name).toHaveLength(
    399,
  );
  expect(await failure(client.createOrganization({ name: emoji.repeat(201) }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "name: at most 200 characters",
  });
  const orgId = await newOrg();
  const longId = usage(orgId, "", 1n);
  longId.requestId = emoji.repeat(128);
  expect((await client.recordUsage({ records: [longId] }, admin)).inserted).toBe(1);
  longId.requestId = emoji.repeat(129);
  expect(await failure(client.recordUsage({ records: [longId] }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: "records[0].request_id: at most 128 characters",
  });
});

test("range bounds finer than the millisecond usage is stored to select exactly the rows in [start, end)", async () => {
  const orgId = await newOrg();
  const at = (time: string) => new Date(`2026-06-15T${time}Z`);
  const times = ["10:00:00.000", "10:00:00.001", "10:30:00.000", "10:59:59.999", "11:00:00.000"];
  await client.recordUsage({ records: times.map((time, i) => usage(orgId, "", BigInt(10 ** i), at(time))) }, admin);
  const bound = (time: string, nanos: number) => create(TimestampSchema, { seconds: BigInt(at(time).getTime() / 1000), nanos });
  const selected = async (startTime: Timestamp, endTime: Timestamp) => {
    const listed = await client.listUsageRecords({ orgId, startTime, endTime }, admin);
    const summary = await client.getUsageSummary({ orgId, startTime, endTime }, admin);
    return { listed: listed.records.map((r) => r.costNanos).sort((a, b) => Number(a - b)), cost: summary.costNanos };
  };
  // [10:00:00.0005, 11:00:00.0005): not the row at 10:00:00.000, the one at 11:00:00.000.
  expect(await selected(bound("10:00:00", 500_000), bound("11:00:00", 500_000))).toEqual({
    listed: [10n, 100n, 1000n, 10000n],
    cost: 11110n,
  });
  expect(await selected(bound("10:30:00", 500_000), bound("10:31:00", 0))).toEqual({ listed: [], cost: 0n });
  expect(await selected(bound("10:00:00", 0), bound("10:00:00", 1))).toEqual({ listed: [1n], cost: 1n });
  expect(await selected(bound("10:59:59", 999_000_001), bound("11:00:00", 999_999))).toEqual({ listed: [10000n], cost: 10000n });
});

test("times in years 1..9999 are accepted, as the message says, and none before", async () => {
  const orgId = await newOrg();
  const year1 = new Date("0001-01-01T00:00:00Z");
  const year1900 = new Date("1900-06-01T12:00:00Z");
  await client.recordUsage({ records: [usage(orgId, "", 1n, year1), usage(orgId, "", 2n, year1900)] }, admin);
  const listed = await client.listUsageRecords({ orgId }, admin);
  expect(listed.records.map((r) => timestampDate(r.occurTime ?? timestampFromDate(now)))).toEqual([year1900, year1]);
  const year2 = new Date("0002-01-01T00:00:00Z");
  const firstYear = { startTime: timestampFromDate(year1), endTime: timestampFromDate(year2) };
  expect((await client.getUsageSummary({ orgId, ...firstYear }, admin)).costNanos).toBe(1n);
  expect(await failure(client.recordUsage({ records: [usage(orgId, "", 1n, new Date(year1.getTime() - 1))] }, admin)))
    .toEqual({ code: Code.InvalidArgument, message: "records[0].occur_time: must be a time in years 1..9999" });

  // A period whose start or end would leave those years is refused, not stored or failed on the way out.
  const anchored = "must be a time from 0001-02-01 to 9999-11-30, so that its billing period lies in years 1..9999";
  for (const at of ["9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z"]) {
    expect(await failure(client.generateInvoice({ orgId, periodTime: timestampFromDate(new Date(at)) }, admin))).toEqual({
      code: Code.InvalidArgument,
      message: `period_time: ${anchored}`,
    });
  }
  expect((await client.listInvoices({ orgId }, admin)).invoices).toEqual([]);
  // The largest Timestamp, which clients send for "no end": rounded up to the millisecond it ends year 9999.
  const last = create(TimestampSchema, { seconds: BigInt(Date.parse("9999-12-31T23:59:59Z") / 1000), nanos: 999_999_999 });
  for (const startTime of [timestampFromDate(year1), timestampFromDate(new Date("9999-12-30T12:00:00Z"))]) {
    const summary = await client.getUsageSummary({ orgId, startTime, endTime: last }, admin);
    expect(summary.costNanos).toBe(startTime.seconds < 0n ? 3n : 0n);
  }
  const endOnly = { endTime: timestampFromDate(new Date("0001-01-20T00:00:00Z")) };
  expect(await failure(client.getUsageSummary({ orgId, ...endOnly }, admin))).toEqual({
    code: Code.InvalidArgument,
    message: `end_time: ${anchored}`,
  });
});

test("a time is taken to the millisecond rounded down: the last instant of a day stays in that day and period", async () => {
  const orgId = await newOrg({ billingDay: 28 });
  const last = usage(orgId, "", 111n);
  last.occurTime = create(TimestampSchema, {
    seconds: BigInt(Date.parse("2026-05-28T00:00:00Z") / 1000) - 1n,
    nanos: 999_999_900,
  });
  await client.recordUsage({ records: [last] }, admin);
  const [listed] = (await client.listUsageRecords({ orgId, requestId: last.requestId }, admin)).records;
  expect(timestampDate(listed?.occurTime ?? timestampFromDate(now)).toISOString()).toBe("2026-05-27T23:59:59.999Z");
  const april = {
    startTime: timestampFromDate(new Date("2026-04-28T00:00:00Z")),
    endTime: timestampFromDate(new Date("2026-05-28T00:00:00Z")),
  };
  expect((await client.getUsageSummary({ orgId, ...april }, admin)).costNanos).toBe(111n);
});

test("an empty or reversed time range is InvalidArgument wherever one is taken", async () => {
  const orgId = await newOrg();
  const at = timestampFromDate(now);
  const before = timestampFromDate(new Date(now.getTime() - 1));
  const refused = { code: Code.InvalidArgument, message: "end_time: must be after start_time" };
  expect(await failure(client.listUsageRecords({ orgId, startTime: at, endTime: at }, admin))).toEqual(refused);
  expect(await failure(client.listUsageRecords({ orgId, startTime: at, endTime: before }, admin))).toEqual(refused);
  expect(await failure(client.getUsageSummary({ orgId, startTime: at, endTime: at }, admin))).toEqual(refused);
  // Ordered as sent, a range whose bounds round up to the same millisecond is empty, not refused.
  const within = (nanos: number) => create(TimestampSchema, { seconds: at.seconds, nanos: at.nanos + nanos });
  const sameMs = { startTime: within(500), endTime: within(900) };
  expect((await client.listUsageRecords({ orgId, ...sameMs }, admin)).records).toEqual([]);
  expect((await client.getUsageSummary({ orgId, ...sameMs }, admin)).requests).toBe(0n);
  const reversed = { startTime: within(900), endTime: within(500) };
  expect(await failure(client.listUsageRecords({ orgId, ...reversed }, admin))).toEqual(refused);
  const hour = timestampFromDate(new Date("2026-06-01T00:00:00Z"));
  expect(await failure(client.createDiscountRule(promo(orgId, { validFrom: hour, validUntil: hour }), admin))).toEqual({
    code: Code.InvalidArgument,
    message: "rule.valid_until: must be after valid_from",
  });
});

test("a discount rule of no kind is refused as missing it, one of a kind the contract does not name as that", async () => {
  const orgId = await newOrg();
  expect(await failure(client.createDiscountRule(promo(orgId, { kind: 0 }), admin))).toEqual({
    code: Code.InvalidArgument,
    message: "rule.kind: required",
  });
  expect(await failure(client.createDiscountRule(promo(orgId, { kind: 99 as DiscountKind }), admin))).toEqual({
    code: Code.InvalidArgument,
    message: "rule.kind: 99 is not a discount kind",
  });
});

test("refusals name the field and value in the API's words; what the database said stays in the log", async () => {
  const orgId = await newOrg();
  const from = logLines.length;
  expect(await failure(client.createProject({ orgId: "org_nope", name: "p" }, admin))).toEqual({
    code: Code.NotFound,
    message: "org_id: organization org_nope does not exist",
  });
  expect(await failure(client.recordUsage({ records: [usage("org_nope", "", 1n)] }, admin))).toEqual({
    code: Code.NotFound,
    message: "org_id: organization org_nope does not exist",
  });
  expect(await failure(client.recordUsage({ records: [usage(orgId, "key_nope", 1n)] }, admin))).toEqual({
    code: Code.NotFound,
    message: `api_key_id: api key key_nope does not exist in organization ${orgId}`,
  });
  expect(await failure(client.createApiKey({ orgId, projectId: "proj_nope" }, admin))).toEqual({
    code: Code.NotFound,
    message: `project_id: project proj_nope does not exist in organization ${orgId}`,
  });
  await client.createProject({ orgId, name: "web" }, admin);
  expect(await failure(client.createProject({ orgId, name: "web" }, admin))).toEqual({
    code: Code.AlreadyExists,
    message: "name: the organization already has a project with this name",
  });
  await client.createOrganization({ name: "taken" }, admin);
  expect(await failure(client.createOrganization({ name: "taken" }, admin))).toEqual({
    code: Code.AlreadyExists,
    message: "name: an organization with this name already exists",
  });
  const logged = logLines.slice(from).join("");
  expect(logged).toContain('Key (org_id)=(org_nope) is not present in table \\"organizations\\".');
  expect(logged).toContain("organizations_name_key");
});

test("readiness says a database is unreachable, not where it is: that goes to the log", async () => {
  const pool = new pg.Pool({ connectionString: "postgres://billing@127.0.0.1:1/billing" });
  try {
    const unready = createBillingApp({ pool, adminToken, clock: () => now, log });
    const from = logLines.length;
    expect(await unready.readiness()).toEqual({ ready: false, checks: { postgres: "unreachable" } });
    expect(logLines.slice(from).join("")).toContain("127.0.0.1:1");
    expect(await app.readiness()).toEqual({ ready: true, checks: { postgres: "ok" } });
  } finally {
    await pool.end();
  }
});

test("readiness stays ready while the service's own calls hold every connection of its pool: load, not an outage", async () => {
  // Statements as slow as RecordUsage or lease grants queued under a burst; Postgres itself answers at once.
  const busy = Array.from({ length: db.pool.options.max ?? 10 }, () => db.pool.query("SELECT pg_sleep(1.5)"));
  try {
    await Bun.sleep(100);
    expect(db.pool.idleCount).toBe(0);
    expect(await app.readiness()).toEqual({ ready: true, checks: { postgres: "ok" } });
  } finally {
    await Promise.all(busy);
  }
});

test("while Postgres refuses connections or has none to spare, RPCs fail Unavailable without naming it, and recover", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000n });
  const { secret } = await client.createApiKey({ orgId, name: "outage" }, admin);
  const calls = (c: typeof client) => ({
    authorizeKey: c.authorizeKey({ secret }, admin),
    acquireBudgetLease: c.acquireBudgetLease(
      { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-a", requestedNanos: 10n, ttlSeconds: 60 },
      admin,
    ),
    recordUsage: c.recordUsage({ records: [usage(orgId, "", 1n)] }, admin),
    listOrganizations: c.listOrganizations({}, admin),
    generateInvoice: c.generateInvoice({ orgId }, admin),
  });
  const expectUnavailable = async (c: typeof client) => {
    const pending = Object.entries(calls(c)).map(async ([name, call]) => [name, await failure(call)]);
    for (const [name, outcome] of await Promise.all(pending)) {
      expect([name, outcome]).toEqual([name, { code: Code.Unavailable, message: databaseUnavailable }]);
    }
  };

  const refused = new pg.Pool({ connectionString: "postgres://billing@127.0.0.1:1/billing" });
  const role = `billing_full_${process.pid}`;
  const url = new URL(db.connectionString);
  url.username = role;
  url.password = "full-role-password";
  const full = new pg.Pool({ connectionString: url.toString() });
  await db.pool.query(`CREATE ROLE ${role} LOGIN PASSWORD 'full-role-password' CONNECTION LIMIT 0`);
  try {
    const from = logLines.length;
    await expectUnavailable(createClient(BillingService, createRouterTransport(createBillingApp({ pool: refused, adminToken, clock: () => now, log }).routes)));
    // Past its connection limit Postgres answers 53300, as it does past max_connections.
    await expectUnavailable(createClient(BillingService, createRouterTransport(createBillingApp({ pool: full, adminToken, clock: () => now, log }).routes)));
    const logged = logLines.slice(from).join("");
    expect(logged).toContain("ECONNREFUSED");
    expect(logged).toContain("53300");
    expect(logged).not.toContain("internal error");
  } finally {
    await refused.end();
    await full.end();
    await db.pool.query(`DROP ROLE ${role}`);
  }
  for (const call of Object.values(calls(client))) await call;
});

test("a Postgres outage is logged once as calls start failing and once as they succeed again, not once per call", async () => {
  const orgId = await newOrg();
  const role = `billing_outage_${process.pid}`;
  const url = new URL(db.connectionString);
  url.username = role;
  url.password = "outage-role-password";
  // A role at its connection limit: every connection is refused 53300, as past max_connections, until it is raised.
  await db.pool.query(`CREATE ROLE ${role} LOGIN PASSWORD 'outage-role-password' CONNECTION LIMIT 0`);
  await db.pool.query(`GRANT ALL ON ALL TABLES IN SCHEMA public TO ${role}`);
  const pool = new pg.Pool({ connectionString: url.toString() });
  const outage = createBillingApp({ pool, adminToken, clock: () => now, log });
  const c = createClient(BillingService, createRouterTransport(outage.routes));
  const lines = () =>
    logLines
      .slice(from)
      .map((l) => JSON.parse(l) as { level: string; msg: string; failures?: number; outage_ms?: number })
      .filter((l) => l.msg.includes("postgres"));
  const from = logLines.length;
  try {
    for (let i = 0; i < 20; i++) {
      expect((await failure(c.listUsageRecords({ orgId }, admin))).code).toBe(Code.Unavailable);
    }
    await db.pool.query(`ALTER ROLE ${role} CONNECTION LIMIT -1`);
    await c.listUsageRecords({ orgId }, admin);
    await c.listUsageRecords({ orgId }, admin);
    const said = lines();
    expect(said.filter((l) => l.level === "warn" || l.level === "info").map((l) => `${l.level} ${l.msg}`)).toEqual([
      "warn request failed: postgres unavailable",
      "info postgres answers again",
    ]);
    expect(said.at(-1)?.failures).toBe(20);
    expect(said.at(-1)?.outage_ms).toBeGreaterThan(0);
  } finally {
    await pool.end();
    await db.pool.query(`REVOKE ALL ON ALL TABLES IN SCHEMA public FROM ${role}`);
    await db.pool.query(`DROP ROLE ${role}`);
  }
});

test("a RecordUsage whose connection is cut mid-transaction is Unavailable, leaves no row, and its resend records it once", async () => {
  const orgId = await newOrg();
  const record = usage(orgId, "", 7n);
  const locker = await db.pool.connect();
  try {
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE usage_records");
    const call = failure(client.recordUsage({ records: [record] }, admin));
    let pid: number | undefined;
    for (let i = 0; i < 200 && pid === undefined; i++) {
      // Not on `locker`: within its transaction pg_stat_activity stays as it first read it.
      const [row] = await db.pool.query<{ pid: number }>(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      ).then((r) => r.rows);
      pid = row?.pid;
      if (pid === undefined) await Bun.sleep(10);
    }
    expect(pid).toBeGreaterThan(0);
    await locker.query("SELECT pg_terminate_backend($1)", [pid]);
    expect(await call).toEqual({ code: Code.Unavailable, message: databaseUnavailable });
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
  }
  const rows = await db.pool.query("SELECT 1 FROM usage_records WHERE request_id = $1", [record.requestId]);
  expect(rows.rowCount).toBe(0);
  expect(await client.recordUsage({ records: [record] }, admin)).toMatchObject({ inserted: 1, duplicates: 0 });
  expect(await client.recordUsage({ records: [record] }, admin)).toMatchObject({ inserted: 0, duplicates: 1 });
});

test("a write on a connection to a read-only server (a failed-over primary) is Unavailable, and the connection is dropped", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000n });
  // Its one connection left read-only, as one still open to a primary demoted to a replica; a new one is writable.
  const pool = createPool({ connectionString: db.connectionString, max: 1 });
  const demoted = async () => {
    const stale = await pool.connect();
    await stale.query("SET default_transaction_read_only = on");
    stale.release();
  };
  const c = createClient(BillingService, createRouterTransport(createBillingApp({ pool, adminToken, clock: () => now, log }).routes));
  const ask = { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-a", requestedNanos: 10n, ttlSeconds: 60 };
  const record = usage(orgId, "", 5n);
  const from = logLines.length;
  try {
    // A lease is granted in a transaction, usage recorded in one statement.
    await demoted();
    expect(await failure(c.acquireBudgetLease(ask, admin))).toEqual({ code: Code.Unavailable, message: databaseUnavailable });
    expect((await c.acquireBudgetLease(ask, admin)).grantedNanos).toBe(10n);
    await demoted();
    expect(await failure(c.recordUsage({ records: [record] }, admin))).toEqual({
      code: Code.Unavailable,
      message: databaseUnavailable,
    });
    expect(await c.recordUsage({ records: [record] }, admin)).toMatchObject({ inserted: 1, duplicates: 0 });
    const said = logLines.slice(from).join("");
    expect(said).toContain("25006");
    expect(said).not.toContain('"level":"error"');
  } finally {
    await pool.end();
  }
});

test("a call Postgres rolls back to break a deadlock with another session is Aborted, and succeeds when retried", async () => {
  const orgId = await newOrg({ monthlyBudgetNanos: 1_000_000n });
  const operator = await db.pool.connect();
  try {
    // An operator's session holding off new leases, then wanting the org row a grant has locked meanwhile.
    await operator.query("BEGIN");
    await operator.query("LOCK TABLE budget_leases IN SHARE MODE");
    const ask = { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-a", requestedNanos: 10n, ttlSeconds: 60 };
    const call = failure(client.acquireBudgetLease(ask, admin));
    let waiting = false;
    for (let i = 0; i < 200 && !waiting; i++) {
      const rows = await db.pool.query(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      );
      waiting = rows.rowCount === 1;
      if (!waiting) await Bun.sleep(10);
    }
    expect(waiting).toBe(true);
    const from = logLines.length;
    // Waits on the grant's lock until Postgres finds the cycle and rolls the grant, which waited first, back.
    await operator.query("SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE", [orgId]);
    expect(await call).toEqual({ code: Code.Aborted, message: databaseConflict });
    expect(logLines.slice(from).join("")).toContain("40P01");
  } finally {
    await operator.query("ROLLBACK");
    operator.release();
  }
  const grant = await client.acquireBudgetLease(
    { scope: BudgetScope.ORGANIZATION, scopeId: orgId, holder: "gw-a", requestedNanos: 10n, ttlSeconds: 60 },
    admin,
  );
  expect(grant.grantedNanos).toBe(10n);
});

/**
 * Key checks of `secrets`, each given up by its caller after 200 ms behind a lock another session holds on `table`,
 * on a billing of a 3-connection pool: once they have failed, a call needing none of that table is answered without
 * waiting out the pool's 10 s for a connection, and nothing of billing's still waits on the lock.
 */
async function checksGivenUpBehindLock(table: string, secrets: string[]): Promise<void> {
  const pool = new pg.Pool({ connectionString: db.connectionString, max: 3, connectionTimeoutMillis: 10_000 });
  const small = createClient(BillingService, createRouterTransport(createBillingApp({ pool, adminToken, clock: () => now, log }).routes));
  const locker = await db.pool.connect();
  try {
    await locker.query("BEGIN");
    await locker.query(`LOCK TABLE ${table}`);
    const checks = secrets.map((secret) => failure(small.authorizeKey({ secret }, { ...admin, timeoutMs: 200 })));
    for (const outcome of await Promise.all(checks)) expect(outcome.code).toBe(Code.DeadlineExceeded);
    const started = performance.now();
    expect((await small.listOrganizations({}, admin)).organizations.length).toBeGreaterThan(0);
    expect(performance.now() - started).toBeLessThan(5_000);
    // A cancelled statement leaves its lock wait once Postgres has taken the cancel, which its connection sends apart.
    await eventually(
      async () => {
        const waiting = await locker.query(
          "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        );
        return waiting.rows[0].n === 0 || undefined;
      },
      { timeoutMs: 2_000, intervalMs: 20, what: "no statement of billing's waiting on the lock" },
    );
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
    await pool.end();
  }
}

test("calls whose callers gave up behind a lock another session holds give their connections back at once", async () => {
  const orgId = await newOrg();
  const { secret } = await client.createApiKey({ orgId, name: "locked" }, admin);
  // More key checks than the pool has connections.
  await checksGivenUpBehindLock("api_keys", Array.from({ length: 6 }, () => secret));
  expect((await client.authorizeKey({ secret }, admin)).apiKey?.orgId).toBe(orgId);
});

test("key checks whose callers gave up behind a lock on the usage figures give their connections back at once", async () => {
  const orgId = await newOrg();
  // Each key's spend is read once for the checks asking meanwhile: one read per key, more keys than connections.
  const secrets = await Promise.all(
    Array.from({ length: 4 }, async (_, i) => (await client.createApiKey({ orgId, name: `usage-locked-${i}` }, admin)).secret),
  );
  // As a migration rewriting the table would.
  await checksGivenUpBehindLock("usage_org_days", secrets);
  for (const secret of secrets) expect((await client.authorizeKey({ secret }, admin)).apiKey?.orgId).toBe(orgId);
});

test("calls whose callers gave up while waiting for a connection leave the pool's connections open", async () => {
  const orgId = await newOrg();
  const { secret } = await client.createApiKey({ orgId, name: "queued" }, admin);
  const pool = new pg.Pool({ connectionString: db.connectionString, max: 3, connectionTimeoutMillis: 1_000 });
  let opened = 0;
  pool.on("connect", () => opened++);
  const small = createClient(BillingService, createRouterTransport(createBillingApp({ pool, adminToken, clock: () => now, log }).routes));
  const locker = await db.pool.connect();
  try {
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE api_keys");
    // Three calls wait behind the lock on the pool's three connections, nine more for one of them.
    const checks = Array.from({ length: 12 }, () => failure(small.authorizeKey({ secret }, { ...admin, timeoutMs: 200 })));
    for (const outcome of await Promise.all(checks)) expect(outcome.code).toBe(Code.DeadlineExceeded);
    for (let i = 0; i < 100 && (pool.waitingCount > 0 || pool.idleCount < pool.totalCount); i++) await Bun.sleep(10);
    // The three that ran are replaced; the nine that ran nothing do not close the connections they were handed.
    expect(opened).toBe(6);
    expect(pool.totalCount).toBe(3);
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
    await pool.end();
  }
});

// The backend is stopped with a signal, which needs the embedded server on this machine.
test.skipIf(Boolean(process.env.DATABASE_URL))(
  "a call whose caller gave up on a backend that stopped answering gives its connection back at once",
  async () => {
    const orgId = await newOrg();
    const { secret } = await client.createApiKey({ orgId, name: "hung" }, admin);
    // A connection held by the stopped backend would keep a call waiting for one the full 10 s, then failing it.
    const pool = new pg.Pool({ connectionString: db.connectionString, max: 1, connectionTimeoutMillis: 10_000 });
    const small = createClient(BillingService, createRouterTransport(createBillingApp({ pool, adminToken, clock: () => now, log }).routes));
    const locker = await db.pool.connect();
    let pid: number | undefined;
    try {
      await locker.query("BEGIN");
      await locker.query("LOCK TABLE api_keys");
      // Its backend is found and stopped well within the deadline, however slowly it reaches the lock.
      const check = failure(small.authorizeKey({ secret }, { ...admin, timeoutMs: 2_000 }));
      for (let i = 0; i < 150 && pid === undefined; i++) {
        // Not on `locker`: within its transaction pg_stat_activity stays as it first read it.
        const { rows } = await db.pool.query<{ pid: number }>(
          "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        );
        pid = rows[0]?.pid;
        if (pid === undefined) await Bun.sleep(10);
      }
      expect(pid).toBeGreaterThan(0);
      // As a hung server, or one failed over without a reset, neither the statement nor its cancel is answered.
      process.kill(pid as number, "SIGSTOP");
      expect((await check).code).toBe(Code.DeadlineExceeded);
      await locker.query("ROLLBACK");
      const started = performance.now();
      expect((await small.listOrganizations({}, admin)).organizations.length).toBeGreaterThan(0);
      expect(performance.now() - started).toBeLessThan(5_000);
    } finally {
      if (pid !== undefined) process.kill(pid, "SIGCONT");
      locker.release();
      await pool.end();
    }
  },
);

test("AuthorizeKey is counted as a key rejected only when the key is refused, not when Postgres fails the call", async () => {
  const counted = async (registry: Registry) =>
    (await registry.getSingleMetric("billing_key_authorizations_total")?.get())?.values.map((v) => [v.labels.result, v.value]);
  const outage = new Registry();
  const refusing = new pg.Pool({ connectionString: "postgres://billing@127.0.0.1:1/billing" });
  try {
    const down = createBillingApp({ pool: refusing, adminToken, clock: () => now, log, registry: outage });
    const c = createClient(BillingService, createRouterTransport(down.routes));
    expect(await code(c.authorizeKey({ secret: "sk-mesh-whatever" }, admin))).toBe(Code.Unavailable);
  } finally {
    await refusing.end();
  }
  expect(await counted(outage)).toEqual([]);

  const registry = new Registry();
  const up = createBillingApp({ pool: db.pool, adminToken, clock: () => now, log, registry });
  const c = createClient(BillingService, createRouterTransport(up.routes));
  expect(await code(c.authorizeKey({ secret: "sk-mesh-unknown" }, admin))).toBe(Code.Unauthenticated);
  const { secret } = await client.createApiKey({ orgId: await newOrg() }, admin);
  await c.authorizeKey({ secret }, admin);
  expect(await counted(registry)).toEqual([
    ["rejected", 1],
    ["ok", 1],
  ]);
});

/** Every row of a list, page by page, and how many pages it took. */
async function pagesOf<R extends { nextPageToken: string }, T>(
  list: (pageToken: string) => Promise<R>,
  items: (res: R) => T[],
): Promise<{ rows: T[]; pages: number }> {
  const rows: T[] = [];
  let pages = 0;
  let token = "";
  do {
    const res = await list(token);
    rows.push(...items(res));
    pages++;
    token = res.nextPageToken;
  } while (token && pages < 1_000);
  return { rows, pages };
}

test("ListApiKeys answers a page at a time, in creation order to the microsecond, its token bound to its listing", async () => {
  const orgId = await newOrg();
  for (let i = 0; i < 250; i++) await client.createApiKey({ orgId, name: `k${i}` }, admin);
  // Keys made at once tie on created_at; others differ by less than a millisecond, which a Date would lose.
  await db.pool.query(
    `UPDATE api_keys SET created_at = '2026-06-01T00:00:00Z'::timestamptz + (hashtext(id) & 3) * interval '1 microsecond'
     WHERE org_id = $1`,
    [orgId],
  );
  const { rows: expected } = await db.pool.query<{ id: string }>(
    "SELECT id FROM api_keys WHERE org_id = $1 ORDER BY created_at, id",
    [orgId],
  );
  const first = await client.listApiKeys({ orgId }, admin);
  expect(first.apiKeys).toHaveLength(100);
  expect(first.nextPageToken).not.toBe("");
  const listed = await pagesOf((pageToken) => client.listApiKeys({ orgId, pageToken }, admin), (r) => r.apiKeys);
  expect(listed.pages).toBe(3);
  expect(listed.rows.map((k) => k.id)).toEqual(expected.map((r) => r.id));
  const big = await client.listApiKeys({ orgId, pageSize: 1000 }, admin);
  expect([big.apiKeys.length, big.nextPageToken]).toEqual([250, ""]);

  // A key revoked between pages leaves the active listing without moving the rest.
  const second = await client.listApiKeys({ orgId, pageSize: 100, pageToken: first.nextPageToken }, admin);
  await client.revokeApiKey({ apiKeyId: second.apiKeys[0]?.id ?? "" }, admin);
  const rest = await pagesOf(
    (pageToken) => client.listApiKeys({ orgId, pageSize: 7, pageToken: pageToken || first.nextPageToken }, admin),
    (r) => r.apiKeys,
  );
  expect(rest.rows.map((k) => k.id)).toEqual(expected.slice(101).map((r) => r.id));

  // A token is valid only for the listing it came from.
  const token = first.nextPageToken;
  const otherOrg = await newOrg();
  expect(await code(client.listApiKeys({ orgId, includeRevoked: true, pageToken: token }, admin))).toBe(
    Code.InvalidArgument,
  );
  expect(await code(client.listApiKeys({ orgId: otherOrg, pageToken: token }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listProjects({ orgId, pageToken: token }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listOrganizations({ pageToken: token }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listApiKeys({ orgId, pageToken: "not-a-token" }, admin))).toBe(Code.InvalidArgument);
  const forged = Buffer.from(JSON.stringify(["key_\u0000", "0".repeat(16)])).toString("base64url");
  expect(await code(client.listApiKeys({ orgId, pageToken: forged }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listApiKeys({ orgId, pageSize: 1001 }, admin))).toBe(Code.InvalidArgument);
  expect(await code(client.listApiKeys({ orgId, pageSize: -1 }, admin))).toBe(Code.InvalidArgument);
  const err = ConnectError.from(await client.listApiKeys({ orgId: otherOrg, pageToken: token }, admin).catch((e) => e));
  expect(err.rawMessage).toContain("page_token");
}, 60_000);

test("a page holds as many rows as fit in 3 MiB encoded, so no answer passes a gRPC client's 4 MB; the next goes on", async () => {
  const orgId = await newOrg();
  for (let i = 0; i < 24; i++) await client.createApiKey({ orgId, name: `k${i}` }, admin);
  // Each key allowed the most models a key may have, of the longest names: about 200 KB a key.
  await db.pool.query(
    `UPDATE api_keys SET allowed_models = ARRAY(SELECT lpad(n::text, 200, 'm') FROM generate_series(1, 1000) n)
     WHERE org_id = $1`,
    [orgId],
  );
  const { rows: expected } = await db.pool.query<{ id: string }>(
    "SELECT id FROM api_keys WHERE org_id = $1 ORDER BY created_at, id",
    [orgId],
  );
  const sizes: number[] = [];
  const listed = await pagesOf(
    async (pageToken) => {
      const res = await client.listApiKeys({ orgId, pageSize: 1000, pageToken }, admin);
      sizes.push(toBinary(ListApiKeysResponseSchema, res).byteLength);
      return res;
    },
    (r) => r.apiKeys,
  );
  expect(listed.rows.map((k) => k.id)).toEqual(expected.map((r) => r.id));
  expect(listed.rows.every((k) => k.limits?.allowedModels.length === 1000)).toBe(true);
  expect(listed.pages).toBe(2);
  expect(Math.max(...sizes)).toBeLessThanOrEqual(3 * 1024 * 1024 + 1024);
}, 60_000);

test("ListOrganizations, ListProjects, ListDiscountRules and ListInvoices answer a page at a time", async () => {
  const { rows: orgRows } = await db.pool.query<{ id: string }>("SELECT id FROM organizations ORDER BY created_at, id");
  const orgs = await pagesOf(
    (pageToken) => client.listOrganizations({ pageSize: 3, pageToken }, admin),
    (r) => r.organizations,
  );
  expect(orgs.pages).toBe(Math.ceil(orgRows.length / 3));
  expect(orgs.rows.map((o) => o.id)).toEqual(orgRows.map((r) => r.id));

  const orgId = await newOrg();
  const projects: string[] = [];
  for (let i = 0; i < 5; i++) projects.push((await client.createProject({ orgId, name: `p${i}` }, admin)).project?.id ?? "");
  const listedProjects = await pagesOf(
    (pageToken) => client.listProjects({ orgId, pageSize: 2, pageToken }, admin),
    (r) => r.projects,
  );
  expect([listedProjects.pages, listedProjects.rows.map((p) => p.id)]).toEqual([3, projects]);

  // Highest priority first, ties by id; a rule deleted where a page ended leaves the next page where it was.
  for (const priority of [1, 2, 2, 2, 3]) await client.createDiscountRule(promo(orgId, { priority }), admin);
  const all = (await client.listDiscountRules({ orgId }, admin)).rules;
  expect(all.map((r) => r.priority)).toEqual([3, 2, 2, 2, 1]);
  const firstRules = await client.listDiscountRules({ orgId, pageSize: 2 }, admin);
  expect(firstRules.rules.map((r) => r.id)).toEqual(all.slice(0, 2).map((r) => r.id));
  await client.deleteDiscountRule({ ruleId: all[1]?.id ?? "" }, admin);
  const restRules = await pagesOf(
    (pageToken) => client.listDiscountRules({ orgId, pageSize: 2, pageToken: pageToken || firstRules.nextPageToken }, admin),
    (r) => r.rules,
  );
  expect(restRules.rows.map((r) => r.id)).toEqual(all.slice(2).map((r) => r.id));

  for (const month of ["01", "02", "03", "04", "05"]) {
    await client.generateInvoice({ orgId, periodTime: timestampFromDate(new Date(`2026-${month}-15T00:00:00Z`)) }, admin);
  }
  const invoices = await pagesOf(
    (pageToken) => client.listInvoices({ orgId, pageSize: 2, pageToken }, admin),
    (r) => r.invoices,
  );
  expect(invoices.pages).toBe(3);
  expect(invoices.rows.map((i) => timestampDate(i.periodStart as Timestamp).toISOString().slice(0, 7))).toEqual([
    "2026-05",
    "2026-04",
    "2026-03",
    "2026-02",
    "2026-01",
  ]);
  const invoiceToken = (await client.listInvoices({ orgId, pageSize: 2 }, admin)).nextPageToken;
  expect(await code(client.listInvoices({ orgId: await newOrg(), pageToken: invoiceToken }, admin))).toBe(
    Code.InvalidArgument,
  );
  expect(await code(client.listDiscountRules({ orgId, pageToken: invoiceToken }, admin))).toBe(Code.InvalidArgument);
}, 60_000);

test("page tokens naming another org's project or key list what those naming none do", async () => {
  // The other org's first: a listing that went on after them would hold this org's.
  const otherOrgId = await newOrg();
  const otherProject = (await client.createProject({ orgId: otherOrgId, name: "q" }, admin)).project?.id ?? "";
  const otherKey = (await client.createApiKey({ orgId: otherOrgId }, admin)).apiKey?.id ?? "";
  const orgId = await newOrg();
  await client.createProject({ orgId, name: "p" }, admin);
  await client.createApiKey({ orgId }, admin);
  // Written as the service writes them: the cursor and a digest of the listing.
  const token = (listing: unknown[], after: string) =>
    Buffer.from(JSON.stringify([after, sha256Hex(JSON.stringify(listing)).slice(0, 16)])).toString("base64url");
  const projectsAfter = async (after: string) =>
    (await client.listProjects({ orgId, pageToken: token(["ListProjects", orgId], after) }, admin)).projects.map((p) => p.id);
  const keysAfter = async (after: string) =>
    (await client.listApiKeys({ orgId, pageToken: token(["ListApiKeys", orgId, false], after) }, admin)).apiKeys.map((k) => k.id);
  expect(await projectsAfter(otherProject)).toEqual(await projectsAfter("proj_01NOSUCHPROJECT00000000000"));
  expect(await keysAfter(otherKey)).toEqual(await keysAfter("key_01NOSUCHKEY0000000000000000"));
});

test("a page token naming another org's invoice tells an org's key no more than one naming no invoice", async () => {
  const orgId = await newOrg();
  const { secret } = await client.createApiKey({ orgId }, admin);
  await client.generateInvoice({ orgId, periodTime: timestampFromDate(new Date("2026-01-15T00:00:00Z")) }, admin);
  const otherOrgId = await newOrg();
  const periodTime = timestampFromDate(new Date("2026-05-15T00:00:00Z"));
  const otherInvoiceId = (await client.generateInvoice({ orgId: otherOrgId, periodTime }, admin)).invoice?.id ?? "";
  // A token is its cursor and a digest of its listing, which anyone can write for an org they may list.
  const scope = sha256Hex(JSON.stringify(["ListInvoices", orgId])).slice(0, 16);
  const after = async (invoiceId: string) => {
    const pageToken = Buffer.from(JSON.stringify([invoiceId, scope])).toString("base64url");
    return (await client.listInvoices({ orgId, pageToken }, as(secret))).invoices.map((i) => i.id);
  };
  expect(await after(otherInvoiceId)).toEqual(await after("inv_01NOSUCHINVOICE000000000000"));
});
