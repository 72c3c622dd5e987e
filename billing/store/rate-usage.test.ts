import { afterAll, beforeAll, expect, test } from "bun:test";
import { createDb } from "./db.ts";
import { createRateUsageStore, keptSeconds, lookBackSeconds } from "./rate-usage.ts";
import { createTestDatabase, type TestDatabase } from "./test-db.ts";
import type { RateUsage, RateUsageSync } from "./types.ts";

let db: TestDatabase;
let store: ReturnType<typeof createRateUsageStore>;
beforeAll(async () => {
  db = await createTestDatabase();
  // Deletes old rows on every call unless a test says otherwise.
  store = createRateUsageStore(createDb(db.pool), { pruneIntervalMs: 0 });
}, 60_000);
afterAll(() => db.drop());

// A window in 2023: seconds are the gateways' own, whatever the database's clock says.
const since = 1_700_000_000n;
const counted = (keyId: string, second: bigint, requests: bigint, tokens: bigint): RateUsage => ({
  keyId,
  second,
  requests,
  tokens,
});
/** The other holders' counts of `keyIds`' whole windows (no changedAfter), in a stable order. */
const sync = async (holder: string, usage: RateUsage[], keyIds: string[], sinceSecond = since) =>
  sorted((await store.syncRateUsage({ holder, usage, keyIds, sinceSecond, newKeyIds: [] })).others);
const sorted = (rows: RateUsage[]) =>
  rows.toSorted((a, b) => a.keyId.localeCompare(b.keyId) || Number(a.second - b.second));
const stored = async (keyId: string) =>
  (
    await db.pool.query<{ holder: string; second: string; requests: string; tokens: string }>(
      "SELECT holder, second::text, requests::text, tokens::text FROM rate_usage WHERE key_id = $1 ORDER BY holder, second",
      [keyId],
    )
  ).rows;
/** Moves a key's rows' change times back by `seconds`, as if they were changed that long ago. */
const age = (keyId: string, seconds: number) =>
  db.pool.query("UPDATE rate_usage SET updated_at = updated_at - make_interval(secs => $2) WHERE key_id = $1", [keyId, seconds]);

test("one holder's changes add up across calls; another holder is answered their sums, never its own", async () => {
  const key = "key_accumulate";
  expect(await sync("gw-a", [counted(key, since + 5n, 2n, 300n)], [key])).toEqual([]);
  expect(await sync("gw-a", [counted(key, since + 5n, 1n, 50n), counted(key, since + 6n, 1n, 10n)], [key])).toEqual([]);
  expect((await sync("gw-b", [counted(key, since + 6n, 4n, 40n)], [key]))).toEqual([
    counted(key, since + 5n, 3n, 350n),
    counted(key, since + 6n, 1n, 10n),
  ]);
  // A third holder sees both others, summed per second; A sees B's alone.
  expect((await sync("gw-c", [], [key]))).toEqual([
    counted(key, since + 5n, 3n, 350n),
    counted(key, since + 6n, 5n, 50n),
  ]);
  expect(await sync("gw-a", [], [key])).toEqual([counted(key, since + 6n, 4n, 40n)]);
});

test("changes of one key and second in one call are summed", async () => {
  const key = "key_same_second";
  const usage = [counted(key, since + 1n, 1n, 10n), counted(key, since + 1n, 1n, 20n), counted(key, since + 1n, -1n, 5n)];
  expect(await sync("gw-a", usage, [key])).toEqual([]);
  expect(await sync("gw-b", [], [key])).toEqual([counted(key, since + 1n, 1n, 35n)]);
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since + 1n}`, requests: "1", tokens: "35" }]);
});

test("counts taken back below 0 are answered as 0, and a holder's below 0 takes nothing from another's", async () => {
  const key = "key_clamped";
  await sync("gw-a", [counted(key, since + 2n, 1n, 100n)], []);
  await sync("gw-a", [counted(key, since + 2n, -2n, -150n)], []);
  // Stored as counted, so that a later change adds to the true figure; answered at 0.
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since + 2n}`, requests: "-1", tokens: "-50" }]);
  expect(await sync("gw-c", [], [key])).toEqual([counted(key, since + 2n, 0n, 0n)]);
  await sync("gw-b", [counted(key, since + 2n, 3n, 30n)], []);
  expect(await sync("gw-c", [], [key])).toEqual([counted(key, since + 2n, 3n, 30n)]);
  // Only tokens below 0: the requests are still answered, the tokens as 0.
  await sync("gw-a", [counted(key, since + 3n, 2n, -10n)], []);
  expect((await sync("gw-c", [], [key]))).toEqual([
    counted(key, since + 2n, 3n, 30n),
    counted(key, since + 3n, 2n, 0n),
  ]);
});

test("seconds before since_second are neither stored nor answered", async () => {
  const key = "key_window";
  await sync("gw-a", [counted(key, since - 1n, 5n, 50n), counted(key, since, 1n, 10n)], []);
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since}`, requests: "1", tokens: "10" }]);
  // Asked from a later second, an earlier one stored is not answered.
  await sync("gw-a", [counted(key, since + 30n, 2n, 20n)], []);
  expect(await sync("gw-b", [], [key], since + 1n)).toEqual([counted(key, since + 30n, 2n, 20n)]);
});

test("only the key ids asked about are answered, whatever the call added", async () => {
  const [asked, other, unknown] = ["key_asked", "key_not_asked", "key_nobody_counted"];
  await sync("gw-a", [counted(asked, since + 1n, 1n, 1n), counted(other, since + 1n, 1n, 1n)], []);
  expect(await sync("gw-b", [counted(other, since + 1n, 1n, 1n)], [asked, unknown, asked])).toEqual([
    counted(asked, since + 1n, 1n, 1n),
  ]);
  expect(await sync("gw-b", [], [])).toEqual([]);
});

test("a holder that asks what changed since its last answer gets the seconds others changed since, zeros included", async () => {
  const [key, fresh] = ["key_changed", "key_new"];
  const call = (holder: string, over: Partial<RateUsageSync>) =>
    store.syncRateUsage({ holder, usage: [], keyIds: [], sinceSecond: since, newKeyIds: [], ...over });
  await call("gw-a", { usage: [counted(key, since + 1n, 2n, 20n), counted(key, since + 2n, 1n, 10n)] });
  const first = await call("gw-b", { keyIds: [key] });
  expect(sorted(first.others)).toEqual([counted(key, since + 1n, 2n, 20n), counted(key, since + 2n, 1n, 10n)]);
  // Changed long enough ago to be past the look-back: answered only once changed again.
  await age(key, lookBackSeconds + 60);
  expect((await call("gw-b", { keyIds: [key], changedAfter: first.asOf })).others).toEqual([]);
  await call("gw-a", { usage: [counted(key, since + 2n, -1n, -10n), counted(fresh, since + 3n, 1n, 5n)] });
  const second = await call("gw-b", { keyIds: [key], changedAfter: first.asOf, newKeyIds: [fresh] });
  // The second taken back to nothing is answered, as 0; the one unchanged is not; a new key comes whole.
  expect(sorted(second.others)).toEqual([counted(key, since + 2n, 0n, 0n), counted(fresh, since + 3n, 1n, 5n)]);
  expect(second.asOf.getTime()).toBeGreaterThanOrEqual(first.asOf.getTime());
  // Its own changes are never answered to a holder, changed or not.
  expect((await call("gw-a", { keyIds: [key, fresh], changedAfter: first.asOf })).others).toEqual([]);
});

test("a change stamped before the asked instant, but within the look-back, is answered again", async () => {
  const key = "key_late_commit";
  await store.syncRateUsage({ holder: "gw-a", usage: [counted(key, since, 1n, 1n)], keyIds: [], sinceSecond: since, newKeyIds: [] });
  const { asOf } = await store.syncRateUsage({ holder: "gw-b", usage: [], keyIds: [], sinceSecond: since, newKeyIds: [] });
  // As a statement that began before asOf and committed after it is stamped.
  await db.pool.query("UPDATE rate_usage SET updated_at = $2::timestamptz - interval '1 second' WHERE key_id = $1", [key, asOf]);
  const answer = await store.syncRateUsage({
    holder: "gw-b",
    usage: [],
    keyIds: [key],
    sinceSecond: since,
    changedAfter: asOf,
    newKeyIds: [],
  });
  expect(answer.others).toEqual([counted(key, since, 1n, 1n)]);
});

test("rows no holder changed for minutes are deleted, by one call every prune interval", async () => {
  const [old, recent] = ["key_pruned_old", "key_pruned_recent"];
  await sync("gw-a", [counted(old, since, 1n, 1n), counted(recent, since, 1n, 1n)], []);
  await age(old, keptSeconds + 1);
  await age(recent, keptSeconds - 30);
  const lazy = createRateUsageStore(createDb(db.pool), { pruneIntervalMs: 60_000 });
  await lazy.syncRateUsage({ holder: "gw-c", usage: [], keyIds: [], sinceSecond: since, newKeyIds: [] });
  expect(await stored(old)).toEqual([]);
  expect((await stored(recent)).length).toBe(1);
  // A store that pruned lately does not again until its interval has passed.
  await age(recent, 31);
  await lazy.syncRateUsage({ holder: "gw-c", usage: [], keyIds: [], sinceSecond: since, newKeyIds: [] });
  expect((await stored(recent)).length).toBe(1);
  await sync("gw-c", [], []);
  expect(await stored(recent)).toEqual([]);
});
