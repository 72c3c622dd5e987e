import { afterAll, beforeAll, expect, test } from "bun:test";
import { BillingError } from "./db.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import { createTestDatabase, type TestDatabase } from "./test-db.ts";
import type { KeyChange, KeyLimits } from "./types.ts";

let db: TestDatabase;
let store: BillingStore;
beforeAll(async () => {
  db = await createTestDatabase();
  store = createBillingStore(db.pool);
}, 60_000);
afterAll(() => db.drop());

const noLimits: KeyLimits = {
  monthlyBudgetNanos: 0n,
  monthlyTokens: 0n,
  requestsPerMinute: 0,
  tokensPerMinute: 0n,
  allowedModels: [],
  expiresAt: null,
};

const newOrg = (name: string) =>
  store.createOrganization({ name, taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 });

/** Resolves once a session of the test database has finished running LISTEN. */
async function listening(): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const { rows } = await db.pool.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity
       WHERE datname = current_database() AND query LIKE 'LISTEN %' AND state = 'idle'`,
    );
    if (rows[0].n > 0) return;
    await Bun.sleep(10);
  }
  throw new Error("nobody is listening");
}

/** Collects `count` changes from a fresh watcher while `act` runs. */
async function watch(count: number, act: () => Promise<void>): Promise<KeyChange[]> {
  const stop = new AbortController();
  const changes: KeyChange[] = [];
  const iterator = store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
  const collecting = (async () => {
    // The first item says the watch is live; changes follow.
    expect((await iterator.next()).value).toBeNull();
    while (changes.length < count) {
      const next = await iterator.next();
      if (next.done) break;
      if (next.value) changes.push(next.value);
    }
    stop.abort();
    await iterator.return?.(undefined);
  })();
  await listening();
  await act();
  await collecting;
  return changes;
}

test("watchers hear committed revocations, rotations and limit changes, and nothing else", async () => {
  const org = await newOrg("watch-org");
  const a = await store.createApiKey({ orgId: org.id, projectId: null, name: "a", limits: noLimits });
  const b = await store.createApiKey({ orgId: org.id, projectId: null, name: "b", limits: noLimits });

  const changes = await watch(3, async () => {
    await store.updateApiKeyLimits(a.apiKey.id, { ...noLimits, requestsPerMinute: 5 });
    // A failed rotation rolls back and announces nothing.
    await store.rotateApiKey("key_missing").catch(() => {});
    await store.rotateApiKey(b.apiKey.id);
    await store.revokeApiKey(a.apiKey.id);
  });
  expect(changes).toEqual([
    { apiKeyId: a.apiKey.id, secretSha256: a.apiKey.secretSha256, revoked: false },
    { apiKeyId: b.apiKey.id, secretSha256: b.apiKey.secretSha256, revoked: true },
    { apiKeyId: a.apiKey.id, secretSha256: a.apiKey.secretSha256, revoked: true },
  ]);
});

test("the listening connection goes back to the pool when the last watcher leaves", async () => {
  const busy = () => db.pool.totalCount - db.pool.idleCount;
  const stop = new AbortController();
  const iterator = store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  const first = iterator.next();
  await listening();
  expect(busy()).toBe(1);
  stop.abort();
  expect((await first).done).toBe(true);
  // pool.end() at shutdown would otherwise wait forever on the LISTEN connection.
  for (let i = 0; i < 100 && busy() > 0; i++) await Bun.sleep(10);
  expect(busy()).toBe(0);
});

test("a watcher that stops pulling after a change frees the connection when aborted", async () => {
  const org = await newOrg("idle-watch-org");
  const { apiKey } = await store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: noLimits });
  const busy = () => db.pool.totalCount - db.pool.idleCount;
  const stop = new AbortController();
  const iterator = store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  await store.revokeApiKey(apiKey.id);
  expect((await iterator.next()).value).toEqual({ apiKeyId: apiKey.id, secretSha256: apiKey.secretSha256, revoked: true });
  // The generator stays suspended at its yield: neither next() nor return() is called again.
  stop.abort();
  for (let i = 0; i < 100 && busy() > 0; i++) await Bun.sleep(10);
  expect(busy()).toBe(0);
});

test("watchers fail as unavailable when the listening connection dies, and a new watcher listens afresh", async () => {
  // Settled into a value at once: the rejection may arrive before the terminating query returns.
  const iterator = store.watchKeyChanges(new AbortController().signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  const first = iterator
    .next()
    .then(
      () => undefined,
      (e: unknown) => e,
    );
  await listening();
  await db.pool.query(
    `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
     WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()`,
  );
  const error = await first;
  expect(error).toBeInstanceOf(BillingError);
  expect((error as BillingError).kind).toBe("unavailable");

  const { apiKey } = await store.createApiKey({
    orgId: (await newOrg("relisten-org")).id,
    projectId: null,
    name: "k",
    limits: noLimits,
  });
  const changes = await watch(1, async () => {
    await store.revokeApiKey(apiKey.id);
  });
  expect(changes.map((c) => c.apiKeyId)).toEqual([apiKey.id]);
});
