import { afterAll, beforeAll, expect, test } from "bun:test";
import { createDb } from "./db.ts";
import { createRateUsageStore, keptSecondsBeforeWindow } from "./rate-usage.ts";
import { createTestDatabase, type TestDatabase } from "./test-db.ts";
import type { RateUsage } from "./types.ts";

let db: TestDatabase;
let store: ReturnType<typeof createRateUsageStore>;
beforeAll(async () => {
  db = await createTestDatabase();
  // Deletes old seconds on every call unless a test says otherwise.
  store = createRateUsageStore(createDb(db.pool), { pruneIntervalMs: 0 });
}, 60_000);
afterAll(() => db.drop());

// A window in 2023: before the database's clock, which bounds what a delete may take (see the last tests).
const since = 1_700_000_000n;
const counted = (keyId: string, second: bigint, requests: bigint, tokens: bigint): RateUsage => ({
  keyId,
  second,
  requests,
  tokens,
});
const sync = (holder: string, usage: RateUsage[], keyIds: string[], sinceSecond = since) =>
  store.syncRateUsage({ holder, usage, keyIds, sinceSecond });
/** The answer in a stable order. */
const sorted = (rows: RateUsage[]) =>
  rows.toSorted((a, b) => a.keyId.localeCompare(b.keyId) || Number(a.second - b.second));
const stored = async (keyId: string) =>
  (
    await db.pool.query<{ holder: string; second: string; requests: string; tokens: string }>(
      "SELECT holder, second::text, requests::text, tokens::text FROM rate_usage WHERE key_id = $1 ORDER BY holder, second",
      [keyId],
    )
  ).rows;

test("one holder's changes add up across calls; another holder is answered their sums, never its own", async () => {
  const key = "key_accumulate";
  expect(await sync("gw-a", [counted(key, since + 5n, 2n, 300n)], [key])).toEqual([]);
  expect(await sync("gw-a", [counted(key, since + 5n, 1n, 50n), counted(key, since + 6n, 1n, 10n)], [key])).toEqual([]);
  expect(sorted(await sync("gw-b", [counted(key, since + 6n, 4n, 40n)], [key]))).toEqual([
    counted(key, since + 5n, 3n, 350n),
    counted(key, since + 6n, 1n, 10n),
  ]);
  // A third holder sees both others, summed per second; A sees B's alone.
  expect(sorted(await sync("gw-c", [], [key]))).toEqual([
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
  // Stored as counted, so that a later change adds to the true figure; answered at 0, which is no entry at all.
  expect(await stored(key)).toEqual([{ holder: "gw-a", second: `${since + 2n}`, requests: "-1", tokens: "-50" }]);
  expect(await sync("gw-c", [], [key])).toEqual([]);
  await sync("gw-b", [counted(key, since + 2n, 3n, 30n)], []);
  expect(await sync("gw-c", [], [key])).toEqual([counted(key, since + 2n, 3n, 30n)]);
  // Only tokens below 0: the requests are still answered, the tokens as 0.
  await sync("gw-a", [counted(key, since + 3n, 2n, -10n)], []);
  expect(sorted(await sync("gw-c", [], [key]))).toEqual([
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

test("seconds every window has left are deleted, by one call every prune interval", async () => {
  const key = "key_pruned";
  const later = since + 1_000n;
  const kept = BigInt(keptSecondsBeforeWindow);
  await sync("gw-a", [counted(key, since, 1n, 1n), counted(key, later - kept, 1n, 1n)], []);
  await sync("gw-b", [counted(key, later - kept - 1n, 1n, 1n)], []);
  // Kept while a window is within reach of them.
  expect((await stored(key)).length).toBe(3);
  const seconds = async () => (await stored(key)).map((row) => BigInt(row.second));
  expect(await sync("gw-c", [], [key], later)).toEqual([]);
  expect(await seconds()).toEqual([later - kept]);

  // A store that pruned lately does not again until its interval has passed.
  const lazy = createRateUsageStore(createDb(db.pool), { pruneIntervalMs: 60_000 });
  const next = later + 1_000n;
  await lazy.syncRateUsage({ holder: "gw-a", usage: [], keyIds: [], sinceSecond: next });
  expect(await seconds()).toEqual([]);
  await sync("gw-a", [counted(key, since + 2_000n, 1n, 1n)], []);
  await lazy.syncRateUsage({ holder: "gw-a", usage: [], keyIds: [], sinceSecond: next + 2_000n });
  expect(await seconds()).toEqual([since + 2_000n]);
});

test("a gateway whose clock runs ahead of the database's deletes none of the current minute's counts", async () => {
  const key = "key_fast_clock";
  const current = BigInt(Math.floor(Date.now() / 1000));
  await sync("gw-a", [counted(key, current, 1n, 1n)], [], current - 59n);
  // A window an hour ahead; it reads nothing of the current minute either.
  expect(await sync("gw-fast", [], [key], current + 3_600n)).toEqual([]);
  expect(await sync("gw-b", [], [key], current - 59n)).toEqual([counted(key, current, 1n, 1n)]);
});
