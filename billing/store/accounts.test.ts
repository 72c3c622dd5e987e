import { expect, test } from "bun:test";
import { isKeySecretShaped, sha256Hex } from "../../lib/auth.ts";
import { createAccountStore } from "./accounts.ts";
import { BillingError, createDb, requestSha256 } from "./db.ts";
import { allRows, newOrg as newOrgIn, noLimits, useTestStore } from "./test-db.ts";
import type { KeyLimits } from "./types.ts";

const fixture = useTestStore();
const newOrg = (name: string) => newOrgIn(fixture.store, name);

async function failure(promise: Promise<unknown>): Promise<BillingError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(error instanceof BillingError)) throw new Error(`expected a BillingError, got ${String(error)}`);
  return error;
}

test("creates and lists organizations; names are unique", async () => {
  const org = await fixture.store.createOrganization({
    name: "acme",
    taxRateBps: 1900,
    billingDay: 15,
    monthlyBudgetNanos: 12_345_000_000_000n,
    maxDiscountBps: 2500,
  });
  expect(org.id).toMatch(/^org_[0-9A-HJKMNP-TV-Z]{26}$/);
  expect(org).toMatchObject({
    name: "acme",
    taxRateBps: 1900,
    billingDay: 15,
    monthlyBudgetNanos: 12_345_000_000_000n,
    maxDiscountBps: 2500,
  });
  expect(org.createdAt).toBeInstanceOf(Date);

  expect((await failure(newOrg("acme"))).kind).toBe("already_exists");
  const badDay = fixture.store.createOrganization({
    name: "bad day",
    taxRateBps: 0,
    billingDay: 29,
    monthlyBudgetNanos: 0n,
    maxDiscountBps: 0,
  });
  expect((await failure(badDay)).kind).toBe("invalid_argument");

  const listed = (await fixture.store.listOrganizations(allRows)).items;
  expect(listed.find((o) => o.id === org.id)).toEqual(org);
  expect(await fixture.store.getOrganization(org.id)).toEqual(org);
  expect((await failure(fixture.store.getOrganization("org_missing"))).kind).toBe("not_found");
});

test("suspending an org keeps its keys and its first suspension time; reinstating clears both state and reason", async () => {
  const org = await newOrg("suspended-org");
  expect(org).toMatchObject({ suspendedAt: null, suspendReason: "" });
  const { apiKey, secret } = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: noLimits });

  const suspended = await fixture.store.setOrganizationSuspended(org.id, "unpaid invoices");
  expect(suspended.suspendedAt).toBeInstanceOf(Date);
  expect(suspended.suspendReason).toBe("unpaid invoices");
  const again = await fixture.store.setOrganizationSuspended(org.id, "abuse");
  expect(again).toMatchObject({ suspendedAt: suspended.suspendedAt, suspendReason: "abuse" });
  // The key is still there and still its own; only its org says it may not be used.
  const found = await fixture.store.findApiKeyBySecretHash(sha256Hex(secret));
  expect(found?.apiKey).toEqual(apiKey);
  expect(found?.organization).toMatchObject({ suspendedAt: suspended.suspendedAt, suspendReason: "abuse" });
  const listedNow = (await fixture.store.listOrganizations(allRows)).items;
  expect(listedNow.find((o) => o.id === org.id)?.suspendedAt).toEqual(suspended.suspendedAt);

  const reinstated = await fixture.store.setOrganizationSuspended(org.id, null);
  expect(reinstated).toMatchObject({ suspendedAt: null, suspendReason: "" });
  expect(await fixture.store.setOrganizationSuspended(org.id, null)).toEqual(reinstated);
  const keys = (await fixture.store.listApiKeys(org.id, { includeRevoked: false }, allRows)).items;
  expect(keys.map((k) => k.id)).toEqual([apiKey.id]);
  expect((await failure(fixture.store.setOrganizationSuspended("org_missing", ""))).kind).toBe("not_found");
});

test("projects belong to an existing org and are unique by name within it", async () => {
  const org = await newOrg("projects-org");
  const project = await fixture.store.createProject({ orgId: org.id, name: "web" });
  expect(project).toMatchObject({ orgId: org.id, name: "web" });
  expect(project.id).toStartWith("proj_");
  expect((await failure(fixture.store.createProject({ orgId: org.id, name: "web" }))).kind).toBe("already_exists");
  expect((await failure(fixture.store.createProject({ orgId: "org_missing", name: "web" }))).kind).toBe("not_found");
  expect((await fixture.store.listProjects(org.id, allRows)).items).toEqual([project]);
  expect((await failure(fixture.store.listProjects("org_missing", allRows))).kind).toBe("not_found");
});

/** Resolves once a session of the test database waits for a lock another holds. */
async function someoneWaitsForALock(): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const rows = await fixture.db.pool.query(
      "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    );
    if (rows.rowCount) return;
    await Bun.sleep(10);
  }
  throw new Error("nobody waited for a lock");
}

test("a create sent twice at once under one request_id makes one org or project, not a name already taken", async () => {
  // Both sends can pass ON CONFLICT's check of the request_id before either has inserted; the later then waits on the
  // earlier's row by its name. Played in that order: the earlier holds the name, uncommitted, when the later arrives.
  const race = async (
    insert: string,
    params: unknown[],
    table: string,
    id: string,
    content: object,
    create: () => Promise<{ id: string }>,
  ) => {
    const earlier = await fixture.db.pool.connect();
    try {
      await earlier.query("BEGIN");
      await earlier.query(insert, params);
      const later = create();
      await someoneWaitsForALock();
      await earlier.query(`UPDATE ${table} SET request_id = 'twice', request_sha256 = $2 WHERE id = $1`, [
        id,
        requestSha256(content),
      ]);
      await earlier.query("COMMIT");
      expect((await later).id).toBe(id);
    } finally {
      earlier.release();
    }
  };
  const org = { name: "twice-org", taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 };
  await race(
    `INSERT INTO organizations (id, name, tax_rate_bps, billing_day, monthly_budget_nanos, max_discount_bps)
     VALUES ('org_twice', $1, 0, 1, 0, 0)`,
    [org.name],
    "organizations",
    "org_twice",
    org,
    () => fixture.store.createOrganization(org, "twice"),
  );
  const project = { orgId: "org_twice", name: "twice-project" };
  await race(
    "INSERT INTO projects (id, org_id, name) VALUES ('proj_twice', $1, $2)",
    [project.orgId, project.name],
    "projects",
    "proj_twice",
    project,
    () => fixture.store.createProject(project, "twice"),
  );
  // A name taken by a create of another request_id, or of none, is still taken.
  expect((await failure(fixture.store.createOrganization(org, "other"))).message).toBe(
    "name: an organization with this name already exists",
  );
  expect((await failure(fixture.store.createProject(project, "other"))).kind).toBe("already_exists");
});

test("a key's secret is random, shown once and stored only as its SHA-256", async () => {
  const org = await newOrg("keys-org");
  const limits: KeyLimits = {
    monthlyBudgetNanos: 5_000_000_000n,
    monthlyTokens: 1_000_000n,
    requestsPerMinute: 60,
    tokensPerMinute: 90_000n,
    maxConcurrentRequests: 8,
    allowedModels: ["gpt-4o-mini", "mock"],
    expiresAt: new Date("2030-01-01T00:00:00Z"),
  };
  const { apiKey, secret } = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "ci", limits });
  const other = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "ci", limits: noLimits });

  expect(secret).toMatch(/^sk-mesh-[0-9A-Za-z]{43}$/);
  // The shape the gateway refuses other tokens by, billing not asked.
  expect(isKeySecretShaped(secret)).toBe(true);
  expect(other.secret).not.toBe(secret);
  expect(apiKey.prefix).toBe(secret.slice(0, 12));
  expect(apiKey.secretSha256).toBe(sha256Hex(secret));
  expect(apiKey).toMatchObject({ orgId: org.id, projectId: null, name: "ci", limits, revokedAt: null });

  const stored = await fixture.db.pool.query("SELECT * FROM api_keys WHERE id = $1", [apiKey.id]);
  expect(JSON.stringify(stored.rows)).not.toContain(secret);

  const found = await fixture.store.findApiKeyBySecretHash(sha256Hex(secret));
  expect(found?.apiKey).toEqual(apiKey);
  expect(found?.organization).toEqual(org);
  expect(await fixture.store.findApiKeyBySecretHash(sha256Hex(`${secret}x`))).toBeUndefined();
});

test("a key created before keys had a concurrency limit is found again by its request_id; one with the limit is another", async () => {
  const org = await newOrg("repeat-keys-org");
  const { maxConcurrentRequests: _, ...earlierLimits } = noLimits;
  const key = { orgId: org.id, projectId: null, name: "ci", limits: noLimits };
  const { apiKey } = await fixture.store.createApiKey(key, "k1");
  // As a create of that time recorded it: its limits without the field.
  const earlier = requestSha256({ ...key, limits: earlierLimits });
  const [stored] = (await fixture.db.pool.query("SELECT request_sha256 FROM api_keys WHERE id = $1", [apiKey.id])).rows;
  expect(stored.request_sha256).toBe(earlier);
  expect(await fixture.store.createApiKey(key, "k1")).toEqual({ apiKey, secret: "" });
  const other = fixture.store.createApiKey({ ...key, limits: { ...noLimits, maxConcurrentRequests: 2 } }, "k1");
  expect((await failure(other)).kind).toBe("already_exists");
});

test("a key's project must belong to the key's org", async () => {
  const org = await newOrg("project-keys-org");
  const elsewhere = await newOrg("elsewhere-org");
  const project = await fixture.store.createProject({ orgId: elsewhere.id, name: "theirs" });
  const error = await failure(
    fixture.store.createApiKey({ orgId: org.id, projectId: project.id, name: "", limits: noLimits }),
  );
  expect(error.kind).toBe("not_found");
  expect(error.message).toBe(`project_id: project ${project.id} does not exist in organization ${org.id}`);

  const own = await fixture.store.createProject({ orgId: org.id, name: "ours" });
  const { apiKey } = await fixture.store.createApiKey({ orgId: org.id, projectId: own.id, name: "", limits: noLimits });
  expect(apiKey.projectId).toBe(own.id);
});

test("revoke, rotate and update limits", async () => {
  const org = await newOrg("lifecycle-org");
  const limits = { ...noLimits, requestsPerMinute: 10, allowedModels: ["mock"] };
  const first = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "svc", limits });

  const rotated = await fixture.store.rotateApiKey(first.apiKey.id);
  expect(rotated.secret).not.toBe(first.secret);
  expect(rotated.apiKey).toMatchObject({ orgId: org.id, name: "svc", limits, revokedAt: null });
  expect((await fixture.store.findApiKeyBySecretHash(sha256Hex(first.secret)))?.apiKey.revokedAt).toBeInstanceOf(Date);
  expect((await failure(fixture.store.rotateApiKey(first.apiKey.id))).kind).toBe("failed_precondition");
  expect((await failure(fixture.store.rotateApiKey("key_missing"))).kind).toBe("not_found");

  const updated = await fixture.store.updateApiKeyLimits(rotated.apiKey.id, { ...noLimits, monthlyTokens: 42n });
  expect(updated.limits).toEqual({ ...noLimits, monthlyTokens: 42n });
  expect((await failure(fixture.store.updateApiKeyLimits("key_missing", noLimits))).kind).toBe("not_found");
  // Only the fields named change; concurrent updates of different limits both hold.
  const expires = new Date("2031-05-01T00:00:00Z");
  await Promise.all([
    fixture.store.updateApiKeyLimits(rotated.apiKey.id, { ...noLimits, requestsPerMinute: 7 }, ["requestsPerMinute"]),
    fixture.store.updateApiKeyLimits(rotated.apiKey.id, { ...noLimits, allowedModels: ["mock"] }, ["allowedModels"]),
    fixture.store.updateApiKeyLimits(rotated.apiKey.id, { ...noLimits, expiresAt: expires }, ["expiresAt"]),
    fixture.store.updateApiKeyLimits(rotated.apiKey.id, { ...noLimits, maxConcurrentRequests: 3 }, [
      "maxConcurrentRequests",
    ]),
  ]);
  const masked = await fixture.store.updateApiKeyLimits(rotated.apiKey.id, noLimits, ["monthlyBudgetNanos"]);
  expect(masked.limits).toEqual({
    ...noLimits,
    monthlyTokens: 42n,
    requestsPerMinute: 7,
    maxConcurrentRequests: 3,
    allowedModels: ["mock"],
    expiresAt: expires,
  });

  const revoked = await fixture.store.revokeApiKey(rotated.apiKey.id);
  expect(revoked.revokedAt).toBeInstanceOf(Date);
  const again = await fixture.store.revokeApiKey(rotated.apiKey.id);
  expect(again.revokedAt).toEqual(revoked.revokedAt);
  expect((await failure(fixture.store.revokeApiKey("key_missing"))).kind).toBe("not_found");

  expect((await fixture.store.listApiKeys(org.id, { includeRevoked: false }, allRows)).items).toEqual([]);
  const all = (await fixture.store.listApiKeys(org.id, { includeRevoked: true }, allRows)).items;
  expect(all.map((k) => k.id)).toEqual([first.apiKey.id, rotated.apiKey.id]);
});

test("a revoked key's limits are not changed: the change is refused, naming the key it was rotated into", async () => {
  const org = await newOrg("revoked-limits-org");
  const limits = { ...noLimits, requestsPerMinute: 100 };
  const revoked = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "", limits });
  await fixture.store.revokeApiKey(revoked.apiKey.id);
  const refused = await failure(fixture.store.updateApiKeyLimits(revoked.apiKey.id, { ...noLimits, monthlyTokens: 1n }));
  expect(refused).toMatchObject({ kind: "failed_precondition", message: `api key ${revoked.apiKey.id} is revoked` });

  // A rotation holds the old key's row lock until it commits; a change waiting on that lock must not then land on
  // the revoked key while the successor keeps the limits the rotation copied.
  const first = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "", limits });
  const db = createDb(fixture.db.pool);
  const copied = Promise.withResolvers<void>();
  const commit = Promise.withResolvers<void>();
  const rotating = createAccountStore({
    ...db,
    transaction: (fn) =>
      db.transaction(async (tx) => {
        const result = await fn(tx);
        copied.resolve();
        await commit.promise;
        return result;
      }),
  }).rotateApiKey(first.apiKey.id);
  await copied.promise;
  const updating = failure(fixture.store.updateApiKeyLimits(first.apiKey.id, { ...noLimits, requestsPerMinute: 1 }));
  const waitingOnLock = async () => {
    const [row] = await fixture.db.pool.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    ).then((r) => r.rows);
    return row?.n === 1;
  };
  for (let i = 0; i < 500 && !(await waitingOnLock()); i++) await Bun.sleep(10);
  expect(await waitingOnLock()).toBe(true);
  commit.resolve();
  const successor = (await rotating).apiKey;
  expect(await updating).toMatchObject({
    kind: "failed_precondition",
    message: `api key ${first.apiKey.id} is revoked (rotated into ${successor.id})`,
  });
  expect(successor.limits.requestsPerMinute).toBe(100);
  const stored = (await fixture.store.listApiKeys(org.id, { includeRevoked: true }, allRows)).items;
  expect(stored.find((k) => k.id === first.apiKey.id)?.limits.requestsPerMinute).toBe(100);
  expect((await failure(fixture.store.rotateApiKey(first.apiKey.id))).message).toBe(
    `api key ${first.apiKey.id} is revoked (rotated into ${successor.id})`,
  );
});

test("an expired key is not rotated: its successor would be born expired", async () => {
  const org = await newOrg("lapsed-org");
  const lapsed = await fixture.store.createApiKey({
    orgId: org.id,
    projectId: null,
    name: "lapsed",
    limits: { ...noLimits, expiresAt: new Date(Date.now() + 50) },
  });
  await Bun.sleep(60);
  const refused = await failure(fixture.store.rotateApiKey(lapsed.apiKey.id));
  expect(refused).toMatchObject({ kind: "failed_precondition", message: expect.stringContaining("has expired") });
  // The old key stays as it was, and no new key appeared.
  expect((await fixture.store.listApiKeys(org.id, { includeRevoked: true }, allRows)).items).toEqual([lapsed.apiKey]);
});
