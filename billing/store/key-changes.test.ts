import { expect, setSystemTime, test } from "bun:test";
import pg from "pg";
import { BillingError } from "./db.ts";
import { createKeyChangeFeed } from "./key-changes.ts";
import { newOrg as newOrgIn, noLimits, useTestStore } from "./test-db.ts";
import type { KeyChange } from "./types.ts";

const fixture = useTestStore();
const newOrg = (name: string) => newOrgIn(fixture.store, name);

/** Resolves once a session of the test database has finished running LISTEN. */
async function listening(): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const { rows } = await fixture.db.pool.query(
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
  const iterator = fixture.store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
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
  const a = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "a", limits: noLimits });
  const b = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "b", limits: noLimits });

  const changes = await watch(3, async () => {
    await fixture.store.updateApiKeyLimits(a.apiKey.id, { ...noLimits, requestsPerMinute: 5 });
    // A failed rotation rolls back and announces nothing.
    await fixture.store.rotateApiKey("key_missing").catch(() => {});
    await fixture.store.rotateApiKey(b.apiKey.id);
    await fixture.store.revokeApiKey(a.apiKey.id);
  });
  expect(changes).toEqual([
    { apiKeyId: a.apiKey.id, secretSha256: a.apiKey.secretSha256, revoked: false },
    { apiKeyId: b.apiKey.id, secretSha256: b.apiKey.secretSha256, revoked: true },
    { apiKeyId: a.apiKey.id, secretSha256: a.apiKey.secretSha256, revoked: true },
  ]);
});

test("the listening connection goes back to the pool when the last watcher leaves", async () => {
  const busy = () => fixture.db.pool.totalCount - fixture.db.pool.idleCount;
  const stop = new AbortController();
  const iterator = fixture.store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  try {
    const first = iterator.next();
    await listening();
    // The listening connection is held; the feed's probe through the pool may hold another for a moment.
    expect(busy()).toBeGreaterThanOrEqual(1);
    stop.abort();
    expect((await first).done).toBe(true);
    // pool.end() at shutdown would otherwise wait forever on the LISTEN connection.
    for (let i = 0; i < 500 && busy() > 0; i++) await Bun.sleep(10);
    expect(busy()).toBe(0);
  } finally {
    // A failed check must not leave the watcher holding its connection for the tests after it.
    stop.abort();
  }
});

test("a watcher that stops pulling after a change frees the connection when aborted", async () => {
  const org = await newOrg("idle-watch-org");
  const { apiKey } = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: noLimits });
  const busy = () => fixture.db.pool.totalCount - fixture.db.pool.idleCount;
  const stop = new AbortController();
  const iterator = fixture.store.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  await fixture.store.revokeApiKey(apiKey.id);
  expect((await iterator.next()).value).toEqual({ apiKeyId: apiKey.id, secretSha256: apiKey.secretSha256, revoked: true });
  // The generator stays suspended at its yield: neither next() nor return() is called again.
  stop.abort();
  for (let i = 0; i < 500 && busy() > 0; i++) await Bun.sleep(10);
  expect(busy()).toBe(0);
});

test("watchers fail as unavailable when the listening connection dies, and a new watcher listens afresh", async () => {
  // Settled into a value at once: the rejection may arrive before the terminating query returns.
  const iterator = fixture.store.watchKeyChanges(new AbortController().signal)[Symbol.asyncIterator]();
  expect((await iterator.next()).value).toBeNull();
  const first = iterator
    .next()
    .then(
      () => undefined,
      (e: unknown) => e,
    );
  await listening();
  await fixture.db.pool.query(
    `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
     WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()`,
  );
  const error = await first;
  expect(error).toBeInstanceOf(BillingError);
  expect((error as BillingError).kind).toBe("unavailable");
  // The watcher is told what to do; what the driver said is for the log.
  expect((error as BillingError).message).toBe("key change feed interrupted; watch again");
  expect((error as BillingError).internal?.cause).toContain("terminat");

  const { apiKey } = await fixture.store.createApiKey({
    orgId: (await newOrg("relisten-org")).id,
    projectId: null,
    name: "k",
    limits: noLimits,
  });
  const changes = await watch(1, async () => {
    await fixture.store.revokeApiKey(apiKey.id);
  });
  expect(changes).toEqual([{ apiKeyId: apiKey.id, secretSha256: apiKey.secretSha256, revoked: true }]);
});

// The backend is stopped with a signal, which needs the embedded server on this machine.
test.skipIf(Boolean(process.env.DATABASE_URL))(
  "watchers fail as unavailable when the listening connection stops answering, rather than hear nothing for good",
  async () => {
    const feed = createKeyChangeFeed(fixture.db.pool, { checkMs: 100, checkTimeoutMs: 300 });
    const stop = new AbortController();
    const iterator = feed.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
    expect((await iterator.next()).value).toBeNull();
    const first = iterator.next().then(
      () => undefined,
      (e: unknown) => e,
    );
    await listening();
    const { rows } = await fixture.db.pool.query<{ pid: number }>(
      `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'`,
    );
    const pid = rows[0]?.pid as number;
    process.kill(pid, "SIGSTOP");
    try {
      const error = await Promise.race([first, Bun.sleep(3_000).then(() => "still watching")]);
      expect(error).toBeInstanceOf(BillingError);
      expect((error as BillingError).kind).toBe("unavailable");
      expect((error as BillingError).internal?.cause).toBe("Query read timeout");
    } finally {
      process.kill(pid, "SIGCONT");
      stop.abort();
    }
  },
);

/**
 * A pool whose connections answer every statement, LISTEN included, but are told of no notification while `deaf`:
 * what a pooler in transaction mode (PgBouncer's pool_mode = transaction) does to LISTEN, run on whichever server
 * connection is free, so that what commits elsewhere is announced to a session no longer linked to the listener.
 */
function poolHearing(hears: () => boolean): pg.Pool {
  class Client extends pg.Client {
    override emit(event: string | symbol, ...args: unknown[]): boolean {
      return event === "notification" && !hears() ? false : super.emit(event, ...args);
    }
  }
  return new pg.Pool({ connectionString: fixture.db.connectionString, Client, max: 4 });
}

test("a listening connection told of nothing committed elsewhere is never live: watchers fail as unavailable", async () => {
  const pool = poolHearing(() => false);
  const feed = createKeyChangeFeed(pool, { checkMs: 100, checkTimeoutMs: 300 });
  const stop = new AbortController();
  try {
    const iterator = feed.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
    const first = iterator.next().then(
      (step) => step,
      (e: unknown) => e,
    );
    const error = await Promise.race([first, Bun.sleep(3_000).then(() => "no answer")]);
    expect(error).toBeInstanceOf(BillingError);
    expect((error as BillingError).kind).toBe("unavailable");
    expect((error as BillingError).internal?.cause).toBe(
      "a key change notification committed through the pool was not heard within 300 ms",
    );
  } finally {
    stop.abort();
    await pool.end();
  }
});

/**
 * What a watcher of a live feed (checks every 100 ms, heard within 300 ms) gets once its connection stops hearing
 * them: `deafen` stops the hearing when and as its test wants. An error, or "still watching" after 3 s.
 */
async function watchedUntilDeaf(deafen: (stopHearing: () => void) => Promise<void>): Promise<unknown> {
  let hearing = true;
  const pool = poolHearing(() => hearing);
  const feed = createKeyChangeFeed(pool, { checkMs: 100, checkTimeoutMs: 300 });
  const stop = new AbortController();
  try {
    const iterator = feed.watchKeyChanges(stop.signal)[Symbol.asyncIterator]();
    expect((await iterator.next()).value).toBeNull();
    const next = iterator.next().then(
      (step) => step,
      (e: unknown) => e,
    );
    await deafen(() => {
      hearing = false;
    });
    return await Promise.race([next, Bun.sleep(3_000).then(() => "still watching")]);
  } finally {
    setSystemTime();
    stop.abort();
    await pool.end();
  }
}

test("a live feed whose connection stops being told of commits elsewhere fails its watchers as unavailable", async () => {
  const error = await watchedUntilDeaf(async (stopHearing) => {
    // The feed's own checks are no changes: none reaches the watcher while it hears them.
    await Bun.sleep(500);
    stopHearing();
  });
  expect(error).toBeInstanceOf(BillingError);
  expect((error as BillingError).kind).toBe("unavailable");
});

test("a feed that stops hearing its checks fails its watchers though the wall clock was stepped back meanwhile", async () => {
  const error = await watchedUntilDeaf(async (stopHearing) => {
    stopHearing();
    // A check is committed, unheard, and then NTP steps the host's clock back an hour (it ran fast): the 300 ms it
    // may take pass all the same.
    await Bun.sleep(150);
    setSystemTime(new Date(Date.now() - 3_600_000));
  });
  expect(error).toBeInstanceOf(BillingError);
  expect((error as BillingError).kind).toBe("unavailable");
});

test("a settings change of an org with more keys than a watcher queues is one change; the watch goes on", async () => {
  const org = await newOrg("many-keys-org");
  await fixture.db.pool.query(
    `INSERT INTO api_keys (id, org_id, secret_sha256, prefix)
     SELECT 'key_many_' || i, $1, encode(sha256(('many-' || i)::bytea), 'hex'), 'sk-many'
     FROM generate_series(1, 10001) AS i`,
    [org.id],
  );
  const { apiKey } = await fixture.store.createApiKey({ orgId: org.id, projectId: null, name: "k", limits: noLimits });
  const changes = await watch(2, async () => {
    await fixture.store.updateOrganization(org.id, { taxRateBps: 100 });
    await fixture.store.revokeApiKey(apiKey.id);
  });
  expect(changes).toEqual([
    { orgId: org.id },
    { apiKeyId: apiKey.id, secretSha256: apiKey.secretSha256, revoked: true },
  ]);
});

test("suspending and reinstating an org are each one change of the org", async () => {
  const org = await newOrg("suspended-watch-org");
  const changes = await watch(2, async () => {
    await fixture.store.setOrganizationSuspended(org.id, "unpaid invoices");
    await fixture.store.setOrganizationSuspended(org.id, null);
  });
  expect(changes).toEqual([{ orgId: org.id }, { orgId: org.id }]);
});
