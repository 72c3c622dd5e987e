import { afterAll, beforeAll, expect, test } from "bun:test";
import { unscopedRule } from "../discounts/test-rules.ts";
import { BillingError } from "./db.ts";
import { maxDiscountRulesPerOrg } from "./discounts.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import { allRows, createTestDatabase, type TestDatabase } from "./test-db.ts";
import type { NewDiscountRule } from "./types.ts";

let db: TestDatabase;
let store: BillingStore;
let orgId: string;
beforeAll(async () => {
  db = await createTestDatabase();
  store = createBillingStore(db.pool);
  orgId = (
    await store.createOrganization({ name: "disc", taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 })
  ).id;
}, 60_000);
afterAll(() => db.drop());

const rule = (overrides: Partial<NewDiscountRule> = {}): NewDiscountRule => ({
  orgId,
  name: "rule",
  kind: "promotional",
  discountBps: 1000,
  ...unscopedRule,
  ...overrides,
});

const kind = (e: unknown) => (e as BillingError).kind;

test("rules are stored with their tiers, listed highest priority first, and deleted", async () => {
  const volume = await store.createDiscountRule(
    rule({
      name: "volume",
      kind: "volume_graduated",
      discountBps: 0,
      priority: 1,
      tiers: [
        { fromNanos: 0n, discountBps: 0 },
        { fromNanos: 10n ** 12n, discountBps: 500 },
      ],
    }),
  );
  const window = await store.createDiscountRule(
    rule({
      name: "nights",
      kind: "time_window",
      priority: 5,
      stackable: false,
      model: "gpt-4o",
      provider: "openai",
      startHour: 22,
      endHour: 24,
      daysOfWeek: [0, 6],
      validFrom: new Date("2026-03-01T00:00:00Z"),
      validUntil: new Date("2026-04-01T00:00:00Z"),
      capNanos: 123n,
    }),
  );
  expect(volume.id).toMatch(/^disc_[0-9A-HJKMNP-TV-Z]{26}$/);
  expect(volume.tiers).toEqual([
    { fromNanos: 0n, discountBps: 0 },
    { fromNanos: 10n ** 12n, discountBps: 500 },
  ]);
  expect(window).toMatchObject({
    kind: "time_window",
    stackable: false,
    model: "gpt-4o",
    daysOfWeek: [0, 6],
    validFrom: new Date("2026-03-01T00:00:00Z"),
    capNanos: 123n,
    tiers: [],
  });
  expect((await store.listDiscountRules(orgId, allRows)).items.map((r) => r.name)).toEqual(["nights", "volume"]);

  await store.deleteDiscountRule(volume.id);
  expect((await store.listDiscountRules(orgId, allRows)).items.map((r) => r.id)).toEqual([window.id]);
  const tiers = await db.pool.query("SELECT count(*)::int AS n FROM discount_tiers WHERE rule_id = $1", [volume.id]);
  expect(tiers.rows[0].n).toBe(0);
  expect(kind(await store.deleteDiscountRule(volume.id).catch((e) => e))).toBe("not_found");
});

test("the schema refuses what the contract forbids", async () => {
  expect(kind(await store.createDiscountRule(rule({ orgId: "org_missing" })).catch((e) => e))).toBe("not_found");
  expect(kind(await store.listDiscountRules("org_missing", allRows).catch((e) => e))).toBe("not_found");
  expect(kind(await store.createDiscountRule(rule({ discountBps: 10_001 })).catch((e) => e))).toBe("invalid_argument");
  expect(kind(await store.createDiscountRule(rule({ startHour: 6, endHour: 6 })).catch((e) => e))).toBe(
    "invalid_argument",
  );
  const halfHour = rule({ validFrom: new Date("2026-03-01T00:30:00Z") });
  expect(kind(await store.createDiscountRule(halfHour).catch((e) => e))).toBe("invalid_argument");
  const backwards = rule({ validFrom: new Date("2026-03-02T00:00:00Z"), validUntil: new Date("2026-03-01T00:00:00Z") });
  expect(kind(await store.createDiscountRule(backwards).catch((e) => e))).toBe("invalid_argument");
  const duplicateTier = rule({
    kind: "volume_all_units",
    discountBps: 0,
    tiers: [
      { fromNanos: 5n, discountBps: 1 },
      { fromNanos: 5n, discountBps: 2 },
    ],
  });
  expect(kind(await store.createDiscountRule(duplicateTier).catch((e) => e))).toBe("already_exists");
  // Nothing of a refused rule was kept.
  expect((await store.listDiscountRules(orgId, allRows)).items).toHaveLength(1);
});

test("an org holds at most maxDiscountRulesPerOrg rules, two creates at once taking its last place one at most", async () => {
  const full = (
    await store.createOrganization({ name: "full", taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 })
  ).id;
  const ruleOf = (i: number) => rule({ orgId: full, name: `rule ${i}` });
  const first = await store.createDiscountRule(ruleOf(0), "req-0");
  for (let i = 1; i < maxDiscountRulesPerOrg - 1; i++) await store.createDiscountRule(ruleOf(i));
  // The last place, asked for twice at once.
  const raced = await Promise.allSettled([store.createDiscountRule(ruleOf(98)), store.createDiscountRule(ruleOf(99))]);
  expect(raced.map((r) => r.status).sort()).toEqual(["fulfilled", "rejected"]);
  const refused = raced.find((r) => r.status === "rejected")?.reason;
  expect([kind(refused), (refused as Error).message]).toEqual([
    "failed_precondition",
    `organization ${full} has ${maxDiscountRulesPerOrg} discount rules, the most it may have: delete one first`,
  ]);
  expect((await store.listDiscountRules(full, allRows)).items).toHaveLength(maxDiscountRulesPerOrg);
  // A retried create is answered with its rule, full or not.
  expect((await store.createDiscountRule(ruleOf(0), "req-0")).id).toBe(first.id);
  await store.deleteDiscountRule(first.id);
  await store.createDiscountRule(ruleOf(100));
  expect(kind(await store.createDiscountRule(ruleOf(101)).catch((e) => e))).toBe("failed_precondition");
  // Other orgs' rules are their own.
  await store.deleteDiscountRule((await store.createDiscountRule(rule({ name: "elsewhere" }))).id);
});

test("the schema takes a time window that wraps past midnight, and refuses wrapping hours of other kinds", async () => {
  const nights = await store.createDiscountRule(
    rule({ kind: "time_window", startHour: 22, endHour: 6, daysOfWeek: [5] }),
  );
  expect((await store.listDiscountRules(orgId, allRows)).items.find((r) => r.id === nights.id)).toMatchObject({
    startHour: 22,
    endHour: 6,
    daysOfWeek: [5],
  });
  for (const hours of [
    { kind: "promotional" as const, startHour: 22, endHour: 6 },
    { kind: "time_window" as const, startHour: 24, endHour: 6 },
    { kind: "time_window" as const, startHour: 22, endHour: 0 },
    { kind: "time_window" as const, startHour: 6, endHour: 6 },
  ]) {
    const refused = kind(await store.createDiscountRule(rule(hours)).catch((e) => e));
    expect([hours, refused]).toEqual([hours, "invalid_argument"]);
  }
  await store.deleteDiscountRule(nights.id);
});
