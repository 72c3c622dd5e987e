import { afterAll, beforeAll, expect, test } from "bun:test";
import { createDb } from "./db.ts";
import { createRateUsageStore, keptSeconds } from "./rate-usage.ts";
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
// Each holder's calls in order, as a gateway numbers them.
const sequences = new Map<string, bigint>();
const nextSequence = (holder: string) => {
  const next = (sequences.get(holder) ?? 0n) + 1n;
  sequences.set(holder, next);
  return next;
};
const call = (holder: string, over: Partial<RateUsageSync> = {}) =>
  store.syncRateUsage({
    holder,
    usage: [],
    sinceSecond: since,
    changesSince: 0n,
    newKeyIds: [],
    sequence: nextSequence(holder),
    ...over,
  });
/** Sets `holder`'s counts, answering the other holders' counts of `keys` whole, in a stable order. */
const sync = async (holder: string, usage: RateUsage[], keys: string[] = [], sinceSecond = since) =>
  sorted((await call(holder, { usage, newKeyIds: keys, sinceSecond })).others);
const sorted = (rows: RateUsage[]) =>
  rows.toSorted((a, b) => a.keyId.localeCompare(b.keyId) || Number(a.second - b.second));
const stored = async (keyId: string) =>
  (
    await db.pool.query<{ holder: string; second: string; requests: string; tokens: string }>(
      "SELECT holder, second::text, requests::text, tokens::text FROM rate_usage WHERE key_id = $1 ORDER BY holder, second",
      [keyId],
    )
  ).rows;
/** Moves a key's rows' times back by `seconds`, as if they were set that long ago. */
const age = (keyId: string, seconds: number) =>
  db.pool.query("UPDATE rate_usage SET updated_at = updated_at - make_interval(secs => $2) WHERE key_id = $1", [keyId, seconds]);

test("a holder's count replaces what it reported before; the others are answered the sum of theirs, never their own", async () => {
  const key = "key_replace";
  expect(await sync("gw-a", [counted(key, since + 5n, 2n, 300n)], [key])).toEqual([]);
  // A resend of the same count, then a count taken back: each replaces the last.
  await sync("gw-a", [counted(key, since + 5n, 2n, 300n)]);
  await sync("gw-a", [counted(key, since + 5n, 1n, 50n), counted(key, since + 6n, 1n, 10n)]);
  expect(await sync("gw-b", [counted(key, since + 6n, 4n, 40n)], [key])).toEqual([
    counted(key, since + 5n, 1n, 50n),
    counted(key, since + 6n, 1n, 10n),
  ]);
  expect(await sync("gw-c", [], [key])).toEqual([counted(key, since + 5n, 1n, 50n), counted(key, since + 6n, 5n, 50n)]);
  expect(await sync("gw-a", [], [key])).toEqual([counted(key, since + 6n, 4n, 40n)]);
});

test("of one key and second in one call, the last count is the holder's", async () => {
  const key = "key_same_second";
  await sync("gw-a", [counted(key, since + 1n, 1n, 10n), counted(key, since + 1n, 3n, 30n), counted(key, since + 1n, 2n, 20n)]);
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since + 1n}`, requests: "2", tokens: "20" }]);
});

test("a call its holder gave up on, finished after the next, does not undo it", async () => {
  const key = "key_late_call";
  const [early, late] = [nextSequence("gw-a"), nextSequence("gw-a")];
  await call("gw-a", { usage: [counted(key, since, 3n, 30n)], sequence: late });
  await call("gw-a", { usage: [counted(key, since, 5n, 50n)], sequence: early });
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since}`, requests: "3", tokens: "30" }]);
});

test("seconds before since_second are neither stored nor answered", async () => {
  const key = "key_window";
  await sync("gw-a", [counted(key, since - 1n, 5n, 50n), counted(key, since, 1n, 10n)]);
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since}`, requests: "1", tokens: "10" }]);
  await sync("gw-a", [counted(key, since + 30n, 2n, 20n)]);
  expect(await sync("gw-b", [], [key], since + 1n)).toEqual([counted(key, since + 30n, 2n, 20n)]);
});

test("changes since a watermark are answered for every key, zeros included; what has not changed since is not", async () => {
  const [key, other] = ["key_changed", "key_changed_other"];
  await sync("gw-a", [counted(key, since + 1n, 2n, 20n), counted(key, since + 2n, 1n, 10n)]);
  const first = await call("gw-b", { newKeyIds: [key] });
  expect(sorted(first.others)).toEqual([counted(key, since + 1n, 2n, 20n), counted(key, since + 2n, 1n, 10n)]);
  expect((await call("gw-b", { changesSince: first.watermark })).others).toEqual([]);
  await sync("gw-a", [counted(key, since + 2n, 0n, 0n), counted(other, since + 3n, 1n, 5n)]);
  const second = await call("gw-b", { changesSince: first.watermark });
  // A key not named comes too: the caller leaves out those it does not count.
  expect(sorted(second.others)).toEqual([counted(key, since + 2n, 0n, 0n), counted(other, since + 3n, 1n, 5n)]);
  expect(second.watermark).toBeGreaterThanOrEqual(first.watermark);
  expect((await call("gw-b", { changesSince: second.watermark })).others).toEqual([]);
  // Its own changes are never answered to a holder.
  expect((await call("gw-a", { changesSince: first.watermark })).others).toEqual([]);
});

test("a count set by a transaction that began before an answer and committed after it is answered at the next call", async () => {
  const key = "key_late_commit";
  const client = await db.pool.connect();
  try {
    await client.query("BEGIN");
    await client.query(
      "INSERT INTO rate_usage (key_id, second, holder, requests, tokens, sequence) VALUES ($1, $2, 'gw-a', 1, 1, 1)",
      [key, since.toString()],
    );
    const answer = await call("gw-b");
    await client.query("COMMIT");
    expect((await call("gw-b", { changesSince: answer.watermark })).others).toEqual([counted(key, since, 1n, 1n)]);
  } finally {
    client.release();
  }
});

test("rows no holder set for minutes are deleted, by one call every prune interval", async () => {
  const [old, recent] = ["key_pruned_old", "key_pruned_recent"];
  await sync("gw-a", [counted(old, since, 1n, 1n), counted(recent, since, 1n, 1n)]);
  await age(old, keptSeconds + 1);
  await age(recent, keptSeconds - 30);
  const lazy = createRateUsageStore(createDb(db.pool), { pruneIntervalMs: 60_000 });
  const lazyCall = () =>
    lazy.syncRateUsage({ holder: "gw-c", usage: [], sinceSecond: since, changesSince: 0n, newKeyIds: [], sequence: 1n });
  await lazyCall();
  expect(await stored(old)).toEqual([]);
  expect((await stored(recent)).length).toBe(1);
  // A store that pruned lately does not again until its interval has passed.
  await age(recent, 31);
  await lazyCall();
  expect((await stored(recent)).length).toBe(1);
  await sync("gw-c", []);
  expect(await stored(recent)).toEqual([]);
});
