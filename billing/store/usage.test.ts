import { afterAll, beforeAll, expect, test } from "bun:test";
import fc from "fast-check";
import { BillingError } from "./db.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import { createTestDatabase, noLimits, type TestDatabase } from "./test-db.ts";
import type { ApiKey, Organization, UsageRecord } from "./types.ts";
import { arrayLiteral, createUsageStore } from "./usage.ts";

let db: TestDatabase;
let store: BillingStore;
let org: Organization;
let key: ApiKey;
let otherKey: ApiKey;

beforeAll(async () => {
  db = await createTestDatabase();
  store = createBillingStore(db.pool);
  org = await newOrg("usage-org");
  key = (await store.createApiKey({ orgId: org.id, projectId: null, name: "a", limits: noLimits })).apiKey;
  otherKey = (await store.createApiKey({ orgId: org.id, projectId: null, name: "b", limits: noLimits })).apiKey;
}, 60_000);
afterAll(() => db.drop());

const newOrg = (name: string) =>
  store.createOrganization({ name, taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 });

let sequence = 0;
function usage(overrides: Partial<UsageRecord> = {}): UsageRecord {
  sequence++;
  return {
    requestId: `req_${String(sequence).padStart(6, "0")}`,
    orgId: org.id,
    projectId: null,
    apiKeyId: key.id,
    model: "mock",
    provider: "mock",
    endpoint: "chat_completions",
    inputTokens: 100n,
    cachedInputTokens: 20n,
    outputTokens: 50n,
    reasoningTokens: 5n,
    costNanos: 1_234_567n,
    occurredAt: new Date("2026-03-10T12:00:00Z"),
    costBreakdown: null,
    ...overrides,
  };
}

const summaries = async () =>
  (
    await db.pool.query(
      `SELECT api_key_id, day::text AS day, requests::int, input_tokens::int, cached_input_tokens::int,
         output_tokens::int, reasoning_tokens::int, cost_nanos::text
       FROM usage_summaries WHERE org_id = $1 ORDER BY api_key_id, day`,
      [org.id],
    )
  ).rows;

test("a batch is stored once: resends are duplicates and leave rows and summaries unchanged", async () => {
  const batch = [
    usage({ occurredAt: new Date("2026-03-10T01:00:00Z") }),
    usage({ occurredAt: new Date("2026-03-10T23:59:59.999Z"), costNanos: 1n }),
    usage({
      occurredAt: new Date("2026-03-11T00:00:00Z"),
      apiKeyId: otherKey.id,
      inputTokens: 7n,
      cachedInputTokens: 0n,
    }),
  ];
  const first = await store.recordUsage(batch);
  expect(first).toMatchObject({ inserted: 3, duplicates: 0 });
  expect(first.xid).toMatch(/^\d+$/);
  // What the batch added, per org, key and UTC day, for the in-memory usage tracker.
  expect(first.added.sort((a, b) => a.day.localeCompare(b.day))).toEqual([
    { orgId: org.id, apiKeyId: key.id, day: "2026-03-10", costNanos: 1_234_568n, tokens: 300n },
    { orgId: org.id, apiKeyId: otherKey.id, day: "2026-03-11", costNanos: 1_234_567n, tokens: 57n },
  ]);
  const expected = [
    {
      api_key_id: key.id,
      day: "2026-03-10",
      requests: 2,
      input_tokens: 200,
      cached_input_tokens: 40,
      output_tokens: 100,
      reasoning_tokens: 10,
      cost_nanos: "1234568",
    },
    {
      api_key_id: otherKey.id,
      day: "2026-03-11",
      requests: 1,
      input_tokens: 7,
      cached_input_tokens: 0,
      output_tokens: 50,
      reasoning_tokens: 5,
      cost_nanos: "1234567",
    },
  ].sort((a, b) => a.api_key_id.localeCompare(b.api_key_id));
  expect(await summaries()).toEqual(expected);

  expect(await store.recordUsage(batch)).toEqual({ inserted: 0, duplicates: 3, xid: "", added: [] });
  expect(await summaries()).toEqual(expected);

  // A partly new batch adds exactly its new rows; a request repeated inside one batch counts once.
  const fresh = usage({ occurredAt: new Date("2026-03-10T05:00:00Z"), costNanos: 10n });
  expect(await store.recordUsage([batch[0] as UsageRecord, fresh, fresh])).toMatchObject({ inserted: 1, duplicates: 2 });
  const count = await db.pool.query("SELECT count(*)::int AS n FROM usage_records WHERE org_id = $1", [org.id]);
  expect(count.rows[0].n).toBe(4);
  const day = (await summaries()).find((s) => s.api_key_id === key.id);
  expect(day).toMatchObject({ requests: 3, cost_nanos: "1234578" });
});

test("a batch naming an unknown key is rejected whole", async () => {
  const before = await summaries();
  const error = await store.recordUsage([usage(), usage({ apiKeyId: "key_missing" })]).catch((e: unknown) => e);
  expect(error).toBeInstanceOf(BillingError);
  expect((error as BillingError).kind).toBe("not_found");
  expect(await summaries()).toEqual(before);
});

test("totals over any range are exact, from summaries for whole days and rows at the edges", async () => {
  const totalsOrg = await newOrg("totals-org");
  const times = [
    "2026-04-01T00:00:00Z",
    "2026-04-01T06:00:00Z",
    "2026-04-02T12:00:00Z",
    "2026-04-03T18:00:00Z",
    "2026-04-30T23:59:59Z",
    "2026-05-01T00:00:00Z",
  ];
  await store.recordUsage(
    times.map((t, i) =>
      usage({ orgId: totalsOrg.id, apiKeyId: null, occurredAt: new Date(t), costNanos: 10n ** BigInt(i) }),
    ),
  );
  const cost = async (start: string, end: string) =>
    (await store.usageTotals({ orgId: totalsOrg.id }, { start: new Date(start), end: new Date(end) })).costNanos;

  expect(await cost("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z")).toBe(11_111n);
  expect(await cost("2026-04-01T03:00:00Z", "2026-04-03T18:00:00Z")).toBe(110n);
  expect(await cost("2026-04-01T03:00:00Z", "2026-04-03T18:00:01Z")).toBe(1_110n);
  expect(await cost("2026-04-02T00:00:00Z", "2026-04-02T12:00:00Z")).toBe(0n);
  expect(await cost("2026-04-02T11:00:00Z", "2026-04-02T13:00:00Z")).toBe(100n);
  expect(await cost("2026-04-30T00:00:00Z", "2026-05-01T00:00:00.001Z")).toBe(110_000n);

  const month = await store.usageTotals(
    { orgId: totalsOrg.id },
    { start: new Date("2026-04-01T00:00:00Z"), end: new Date("2026-05-01T00:00:00Z") },
  );
  expect(month).toEqual({
    requests: 5n,
    inputTokens: 500n,
    cachedInputTokens: 100n,
    outputTokens: 250n,
    reasoningTokens: 25n,
    costNanos: 11_111n,
  });
});

test("totals narrow to a key, and period usage splits org and keys", async () => {
  const march = { start: new Date("2026-03-01T00:00:00Z"), end: new Date("2026-04-01T00:00:00Z") };
  const other = await store.usageTotals({ orgId: org.id, apiKeyId: otherKey.id }, march);
  expect(other).toMatchObject({ requests: 1n, inputTokens: 7n, costNanos: 1_234_567n });
  const period = await store.periodUsage(org.id, march, [key.id, otherKey.id]);
  expect(period.orgSpentNanos).toBe(1_234_567n * 2n + 1n + 10n);
  expect(period.keys.get(otherKey.id)).toEqual({ spentNanos: 1_234_567n, tokens: 57n });
  expect(period.keys.get(key.id)).toEqual({ spentNanos: 1_234_568n + 10n, tokens: 450n });
  expect(period.snapshot).toMatch(/^\d+:\d+:[\d,]*$/);
  // Keys not asked about are not read; the org's total counts them all the same.
  const one = await store.periodUsage(org.id, march, [otherKey.id]);
  expect(one.orgSpentNanos).toBe(period.orgSpentNanos);
  expect([...one.keys.keys()]).toEqual([otherKey.id]);
  const january = { start: new Date("2027-01-01"), end: new Date("2027-02-01") };
  const empty = await store.periodUsage(org.id, january, [key.id]);
  expect(empty.orgSpentNanos).toBe(0n);
  expect(empty.keys.size).toBe(0);
  expect(empty.snapshot).toMatch(/^\d+:\d+:/);
});

test("a cost breakdown is stored with the record and must add up to its cost", async () => {
  const costBreakdown = { inputNanos: 600n, cachedInputNanos: 100n, outputNanos: 250n, reasoningNanos: 50n };
  const itemised = usage({ costNanos: 1_000n, costBreakdown });
  await store.recordUsage([itemised]);
  const listed = await store.listUsageRecords({
    orgId: org.id,
    requestId: itemised.requestId,
    start: null,
    end: null,
    after: null,
    limit: 1,
  });
  expect(listed.items).toEqual([itemised]);
  const wrong = usage({ costNanos: 999n, costBreakdown });
  expect((await store.recordUsage([wrong]).catch((e: BillingError) => e)) as BillingError).toMatchObject({
    kind: "invalid_argument",
  });
});

test("a time is stored to the millisecond and summarised on its UTC day in every year 1..9999", async () => {
  const timesOrg = await newOrg("times-org");
  const times = [
    "0001-01-01T00:00:00.000Z",
    "0001-01-01T00:00:00.999Z",
    "1969-12-31T23:59:59.999Z",
    "1970-01-01T00:00:00.000Z",
    "2026-03-10T23:59:59.001Z",
    "9999-12-31T23:59:59.999Z",
  ];
  const records = times.map((at) => usage({ orgId: timesOrg.id, apiKeyId: null, occurredAt: new Date(at) }));
  await store.recordUsage(records);
  const listed = await store.listUsageRecords({
    orgId: timesOrg.id,
    requestId: null,
    start: null,
    end: null,
    after: null,
    limit: 10,
  });
  expect(listed.items.map((r) => r.occurredAt.toISOString())).toEqual(times.toReversed());
  // To the microsecond Postgres holds: nothing rounded on the way in.
  const stored = await db.pool.query<{ at: string }>(
    "SELECT (occurred_at AT TIME ZONE 'UTC')::text AS at FROM usage_records WHERE org_id = $1 ORDER BY occurred_at",
    [timesOrg.id],
  );
  expect(stored.rows.map((r) => r.at)).toEqual(times.map((at) => at.replace("T", " ").replace(/\.?0*Z$/, "")));
  const { rows } = await db.pool.query<{ day: string; requests: number }>(
    "SELECT day::text AS day, requests::int FROM usage_summaries WHERE org_id = $1 ORDER BY day",
    [timesOrg.id],
  );
  expect(rows).toEqual([
    { day: "0001-01-01", requests: 2 },
    { day: "1969-12-31", requests: 1 },
    { day: "1970-01-01", requests: 1 },
    { day: "2026-03-10", requests: 1 },
    { day: "9999-12-31", requests: 1 },
  ]);
});

test("counts and amounts past 2^53 reach Postgres unrounded, for its checks to refuse", async () => {
  const maxInt64 = 2n ** 63n - 1n;
  for (const overrides of [
    { costNanos: maxInt64 },
    { inputTokens: maxInt64 },
    { costNanos: 1_000n, costBreakdown: { inputNanos: maxInt64, cachedInputNanos: 0n, outputNanos: 0n, reasoningNanos: 0n } },
  ]) {
    const refused = (await store.recordUsage([usage(overrides)]).catch((e: BillingError) => e)) as BillingError;
    expect(refused).toBeInstanceOf(BillingError);
    expect(refused.kind).toBe("invalid_argument");
  }
  // The largest the checks take are stored as sent, beside a record without a breakdown in the same batch.
  const largest = usage({
    inputTokens: 2n ** 31n,
    outputTokens: 2n ** 31n,
    costNanos: 10n ** 15n,
    costBreakdown: { inputNanos: 10n ** 15n - 7n, cachedInputNanos: 1n, outputNanos: 2n, reasoningNanos: 4n },
  });
  const unitemised = usage();
  await store.recordUsage([largest, unitemised]);
  for (const record of [largest, unitemised]) {
    const listed = await store.listUsageRecords({
      orgId: org.id,
      requestId: record.requestId,
      start: null,
      end: null,
      after: null,
      limit: 1,
    });
    expect(listed.items).toEqual([record]);
  }
});

test("usage records page newest first", async () => {
  const pageOrg = await newOrg("pages-org");
  const records = [0, 1, 2, 3, 4].map((i) =>
    usage({ orgId: pageOrg.id, apiKeyId: null, occurredAt: new Date(Date.UTC(2026, 5, 1, i)) }),
  );
  await store.recordUsage(records);
  const first = await store.listUsageRecords({
    orgId: pageOrg.id,
    requestId: null,
    start: null,
    end: null,
    after: null,
    limit: 2,
  });
  expect(first.items).toEqual([records[4], records[3]] as UsageRecord[]);
  expect(first.more).toBe(true);
  const last = first.items[1] as UsageRecord;
  const rest = await store.listUsageRecords({
    orgId: pageOrg.id,
    requestId: null,
    start: new Date(Date.UTC(2026, 5, 1, 1)),
    end: null,
    after: { occurredAt: last.occurredAt, requestId: last.requestId },
    limit: 10,
  });
  expect(rest).toEqual({ items: [records[2], records[1]] as UsageRecord[], more: false });
});

test("a page deep into a range starts at its cursor, not at the range's end", async () => {
  const deepOrg = await newOrg("deep-pages-org");
  const records = Array.from({ length: 20_000 }, (_, i) =>
    usage({ orgId: deepOrg.id, apiKeyId: null, occurredAt: new Date(Date.UTC(2026, 6, 1) + i * 60_000) }),
  );
  await store.recordUsage(records);
  await db.pool.query("ANALYZE usage_records");
  let statement: { sql: string; params: unknown[] } | undefined;
  const capturing = createUsageStore({
    async query(sql, params = []) {
      statement = { sql, params };
      return (await db.pool.query(sql, params)).rows;
    },
    transaction: () => Promise.reject(new Error("not used")),
  });
  const cursor = records[100] as UsageRecord;
  const page = await capturing.listUsageRecords({
    orgId: deepOrg.id,
    requestId: null,
    start: new Date(Date.UTC(2026, 6, 1)),
    end: new Date(Date.UTC(2026, 7, 1)),
    after: { occurredAt: cursor.occurredAt, requestId: cursor.requestId },
    limit: 10,
  });
  expect(page.items.map((r) => r.requestId)).toEqual(records.slice(90, 100).reverse().map((r) => r.requestId));
  const [{ "QUERY PLAN": [plan] }] = (
    await db.pool.query(`EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ${statement?.sql}`, statement?.params)
  ).rows;
  // The page's own index pages, not those of the 19,900 records between the cursor and the end.
  expect(plan.Plan["Shared Hit Blocks"] + plan.Plan["Shared Read Blocks"]).toBeLessThan(20);
}, 60_000);

test("usage must name an org, and a project and key of that org; none of them can be deleted afterwards", async () => {
  const elsewhere = await newOrg("elsewhere-org");
  const project = await store.createProject({ orgId: elsewhere.id, name: "p" });
  const kindOf = async (records: UsageRecord[]) =>
    ((await store.recordUsage(records).catch((e: unknown) => e)) as BillingError).kind;
  expect(await kindOf([usage({ orgId: "org_missing", apiKeyId: null })])).toBe("not_found");
  expect(await kindOf([usage({ projectId: project.id })])).toBe("not_found");
  expect(await kindOf([usage({ orgId: elsewhere.id })])).toBe("not_found");
  const error = (await store.recordUsage([usage({ apiKeyId: "key_nope" })]).catch((e: unknown) => e)) as BillingError;
  expect(error.message).toBe(`api_key_id: api key key_nope does not exist in organization ${org.id}`);
  await store.recordUsage([usage({ orgId: elsewhere.id, apiKeyId: null, projectId: project.id })]);

  for (const sql of [
    "DELETE FROM projects WHERE id = $1",
    "UPDATE projects SET org_id = 'org_other' WHERE id = $1",
    "DELETE FROM organizations WHERE id = (SELECT org_id FROM projects WHERE id = $1)",
  ]) {
    await expect(db.pool.query(sql, [project.id])).rejects.toThrow(/billing history/);
  }
  await expect(db.pool.query("DELETE FROM api_keys WHERE id = $1", [key.id])).rejects.toThrow(/billing history/);
});

test("array literals carry any text through Postgres unchanged", async () => {
  // Postgres text cannot hold NUL; everything else must survive quoting and escaping.
  const text = fc.string({ unit: "grapheme", maxLength: 12 }).map((t) => t.replaceAll("\u0000", ""));
  const samples = fc.sample(fc.array(fc.option(text, { nil: null }), { maxLength: 20 }), 50);
  samples.push([`"`, "\\", `a,b`, "{x}", "NULL", "", " spaced ", null, `\\"`, "é✓𝄞"]);
  // Without NULLs or anything to escape, as most columns are: quoted by one join.
  samples.push(["NULL", "", " spaced ", "a,b", "{x}", "é✓𝄞"], ["x"], []);
  const { rows } = await db.pool.query<{ value: (string | null)[] }>(
    `SELECT literal::text[] AS value FROM unnest($1::text[]) WITH ORDINALITY AS s(literal, n) ORDER BY n`,
    [samples.map(arrayLiteral)],
  );
  expect(rows.map((r) => r.value)).toEqual(samples);
});
