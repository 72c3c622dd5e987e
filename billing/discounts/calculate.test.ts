import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import type { DiscountRule, VolumeTier } from "../store/types.ts";
import { calculateDiscounts, marginalDiscounts, matches, type UsageHour } from "./calculate.ts";
import { unscopedRule } from "./test-rules.ts";

const monthStart = Date.UTC(2026, 2, 1);
const hourMs = 3_600_000;
const usd = 1_000_000_000n;

function rule(overrides: Partial<DiscountRule> & Pick<DiscountRule, "kind">): DiscountRule {
  return {
    id: "disc_1",
    orgId: "org_1",
    name: "rule",
    discountBps: 0,
    ...unscopedRule,
    createdAt: new Date(monthStart),
    ...overrides,
  };
}

const hours = (n: number, cost: bigint, extra: Partial<UsageHour> = {}): UsageHour[] =>
  Array.from({ length: n }, (_, i) => ({
    hour: new Date(monthStart + i * hourMs),
    model: "gpt",
    provider: "openai",
    costNanos: cost,
    ...extra,
  }));

const noMax = { maxDiscountBps: 0 };
const tiers: VolumeTier[] = [
  { fromNanos: 0n, discountBps: 0 },
  { fromNanos: 100n * usd, discountBps: 1000 },
  { fromNanos: 1000n * usd, discountBps: 2000 },
];

describe("examples", () => {
  test("graduated tiers discount each slice at its own rate; all-units uses the reached rate for everything", () => {
    const usage = hours(10, 150n * usd); // $1,500
    const graduated = calculateDiscounts(usage, [rule({ kind: "volume_graduated", tiers })], noMax);
    // $0 on the first $100, 10% of $900, 20% of $500
    expect(graduated.totalNanos).toBe(190n * usd);
    const allUnits = calculateDiscounts(usage, [rule({ kind: "volume_all_units", tiers })], noMax);
    expect(allUnits.totalNanos).toBe(300n * usd);
    expect(graduated.subtotalNanos).toBe(1500n * usd);
  });

  test("time windows match UTC hours and weekdays", () => {
    // 2026-03-01 is a Sunday: hours 0..47 cover Sunday and Monday.
    const usage = hours(48, 1000n);
    const nights = rule({ kind: "time_window", discountBps: 5000, startHour: 0, endHour: 6 });
    expect(calculateDiscounts(usage, [nights], noMax).totalNanos).toBe(12n * 500n);
    const sundayNights = { ...nights, daysOfWeek: [0] };
    expect(calculateDiscounts(usage, [sundayNights], noMax).totalNanos).toBe(6n * 500n);
  });

  test("a window with start after end wraps past midnight, its boundary hours included as a non-wrapping one's", () => {
    const nights = rule({ kind: "time_window", discountBps: 5000, startHour: 22, endHour: 6 });
    const at = (iso: string) =>
      matches(nights, { hour: new Date(iso), model: "gpt", provider: "openai", costNanos: 1n });
    expect(
      ["21", "22", "23"].map((h) => at(`2026-03-02T${h}:00:00Z`)).concat(
        ["00", "05", "06"].map((h) => at(`2026-03-03T${h}:00:00Z`)),
      ),
    ).toEqual([false, true, true, true, true, false]);
    // Sunday 00:00 to Tuesday 00:00: 0-6 and 22-24 each day.
    const usage = hours(48, 1000n);
    expect(calculateDiscounts(usage, [nights], noMax).totalNanos).toBe(16n * 500n);
    // Unchanged for a window that does not wrap.
    const evenings = { ...nights, startHour: 18, endHour: 22 };
    expect(calculateDiscounts(usage, [evenings], noMax).totalNanos).toBe(8n * 500n);
  });

  test("days name the day a wrapping window starts on: Fri 22-6 is Fri 22:00 to Sat 06:00", () => {
    const fridayNight = rule({ kind: "time_window", discountBps: 10_000, startHour: 22, endHour: 6, daysOfWeek: [5] });
    // 2026-03-05 is a Thursday: Thursday 00:00 to Sunday 00:00.
    const usage = Array.from({ length: 72 }, (_, i) => ({
      hour: new Date(Date.UTC(2026, 2, 5) + i * hourMs),
      model: "gpt",
      provider: "openai",
      costNanos: 1n,
    }));
    const matched = usage.filter((u) => matches(fridayNight, u)).map((u) => u.hour.toISOString().slice(5, 13));
    expect(matched).toEqual([
      "03-06T22",
      "03-06T23",
      ...["00", "01", "02", "03", "04", "05"].map((h) => `03-07T${h}`),
    ]);
    // Thursday night's hours after midnight are Friday's by the clock, but Thursday's window: not matched.
    expect(matched).not.toContain("03-06T03");
  });

  test("a wrapping window's cap holds once across both sides of midnight, on one applied rule", () => {
    // Sunday 20:00 to Monday 08:00: 8 of the 12 hours are inside 22-6.
    const usage = hours(12, 1000n).map((u) => ({ ...u, hour: new Date(u.hour.getTime() + 20 * hourMs) }));
    const nights = rule({ kind: "time_window", discountBps: 5000, startHour: 22, endHour: 6, capNanos: 3000n });
    const result = calculateDiscounts(usage, [nights], noMax);
    expect(result.applied.map((a) => [a.rule.id, a.matchedNanos, a.amountNanos])).toEqual([["disc_1", 8000n, 3000n]]);
    // Split in two rules the cap held twice: 1000 before midnight, 3000 after.
    const split = [
      { ...nights, id: "disc_a", startHour: 22, endHour: 24 },
      { ...nights, id: "disc_b", startHour: 0, endHour: 6 },
    ];
    expect(calculateDiscounts(usage, split, noMax).totalNanos).toBe(4000n);
  });

  test("promotions apply inside their validity, up to their cap", () => {
    const usage = hours(48, 1000n);
    const promo = rule({
      kind: "promotional",
      discountBps: 10_000,
      validFrom: new Date(monthStart + 10 * hourMs),
      validUntil: new Date(monthStart + 20 * hourMs),
    });
    expect(calculateDiscounts(usage, [promo], noMax).totalNanos).toBe(10_000n);
    expect(calculateDiscounts(usage, [{ ...promo, capNanos: 2_500n }], noMax).totalNanos).toBe(2_500n);
  });

  test("scope narrows a rule to one model or provider", () => {
    const usage = [...hours(2, 1000n), ...hours(2, 3000n, { model: "claude", provider: "anthropic" })];
    const promo = (scope: Partial<DiscountRule>) => rule({ kind: "promotional", discountBps: 1000, ...scope });
    expect(calculateDiscounts(usage, [promo({ model: "claude" })], noMax).totalNanos).toBe(600n);
    expect(calculateDiscounts(usage, [promo({ provider: "openai" })], noMax).totalNanos).toBe(200n);
    expect(calculateDiscounts(usage, [promo({ model: "claude", provider: "openai" })], noMax).applied).toEqual([]);
  });

  test("stackable rules compound; a non-stackable one closes the usage it matched", () => {
    const usage = [...hours(1, 10_000n), ...hours(1, 10_000n, { model: "claude" })];
    const tenPercent = (id: string, priority: number, extra: Partial<DiscountRule> = {}) =>
      rule({ id, kind: "promotional", discountBps: 1000, priority, ...extra });
    const stacked = calculateDiscounts(usage, [tenPercent("a", 2), tenPercent("b", 1)], noMax);
    expect(stacked.applied.map((a) => a.amountNanos)).toEqual([2000n, 1800n]);

    const exclusiveOnGpt = tenPercent("a", 2, { stackable: false, model: "gpt" });
    const result = calculateDiscounts(usage, [tenPercent("b", 1), exclusiveOnGpt], noMax);
    // The lower rule still discounts claude, but not gpt.
    expect(result.applied.map((a) => [a.rule.id, a.amountNanos])).toEqual([
      ["a", 1000n],
      ["b", 1000n],
    ]);
  });

  test("usage a non-stackable rule closed still counts towards the volume tiers of the rules after it", () => {
    // $600 by day, $600 at night; the night's exclusive promotion gives 20%, capped at $3.
    const day = hours(1, 600n * usd, { hour: new Date(monthStart + 10 * hourMs) });
    const night = hours(1, 600n * usd, { hour: new Date(monthStart + 23 * hourMs) });
    const offPeak = rule({
      id: "a",
      kind: "time_window",
      discountBps: 2000,
      startHour: 22,
      endHour: 6,
      priority: 2,
      stackable: false,
      capNanos: 3n * usd,
    });
    const graduated = rule({ id: "b", kind: "volume_graduated", tiers, priority: 1 });
    const result = calculateDiscounts([...day, ...night], [offPeak, graduated], noMax);
    // A $1,200 volume: 10% of $900 and 20% of $200, $130 or 10.8333...%, taken on the $600 by day.
    expect(result.applied.map((a) => [a.rule.id, a.matchedNanos, a.volumeNanos, a.amountNanos])).toEqual([
      ["a", 600n * usd, 600n * usd, 3n * usd],
      ["b", 600n * usd, 1200n * usd, 65n * usd],
    ]);
    const allUnits = rule({ id: "b", kind: "volume_all_units", tiers, priority: 1 });
    // The $1,000 tier's 20% on the $600 by day.
    expect(calculateDiscounts([...day, ...night], [offPeak, allUnits], noMax).totalNanos).toBe(123n * usd);
    // Late usage by night is closed to the volume rule, yet lifts its tier for the late usage by day with it.
    const lateNight = hours(1, 300n * usd, { hour: new Date(monthStart + 47 * hourMs) });
    const lateDay = hours(1, 100n * usd, { hour: new Date(monthStart + 34 * hourMs) });
    const billed = [...day.map((u) => ({ ...u, costNanos: 500n * usd })), ...night];
    expect(
      marginalDiscounts(billed, [...lateDay, ...lateNight], [offPeak, allUnits], noMax).map((a) => a.amountNanos),
    ).toEqual([0n, 20n * usd]);
  });

  test("the org maximum cuts rules of lower priority first", () => {
    const usage = hours(1, 10_000n);
    const rules = [
      rule({ id: "a", kind: "promotional", discountBps: 2000, priority: 2 }),
      rule({ id: "b", kind: "promotional", discountBps: 2000, priority: 1 }),
    ];
    const result = calculateDiscounts(usage, rules, { maxDiscountBps: 2500 });
    expect(result.applied.map((a) => a.amountNanos)).toEqual([2000n, 500n]);
    expect(result.totalNanos).toBe(2500n);
  });

  test("late usage of a period gets what it adds to the period's discount: the rest of a cap, the next tiers", () => {
    const billed = hours(1, 150n * usd);
    const late = hours(1, 100n * usd, { hour: new Date(monthStart + 5 * hourMs) });
    const capped = rule({ kind: "promotional", discountBps: 1000, capNanos: 20n * usd });
    expect(marginalDiscounts(billed, late, [capped], noMax)).toEqual([
      { rule: capped, matchedNanos: 100n * usd, volumeNanos: 250n * usd, amountNanos: 5n * usd },
    ]);
    // The billed $150 already passed the 10% tier at $100, so all of the $100 more is at 10%; alone it would be 0%.
    const graduated = rule({ kind: "volume_graduated", tiers });
    expect(marginalDiscounts(billed, late, [graduated], noMax)[0]?.amountNanos).toBe(10n * usd);
    expect(marginalDiscounts([], late, [graduated], noMax)[0]?.amountNanos).toBe(0n);
    expect(marginalDiscounts(billed, [], [capped, graduated], noMax).map((a) => a.amountNanos)).toEqual([0n, 0n]);
  });

  test("what late usage adds is given to rules in the order they apply, none of them charging", () => {
    // Late usage lifts "a" to its 20% tier; the 25% maximum then leaves "b" less than it had on the billed usage. The
    // period's discount grows by 30, the maximum's share of the late usage is 25, and "a" gives the late usage its 20%
    // rate on itself: 20.
    const rules = [
      rule({ id: "a", kind: "volume_all_units", tiers: [{ fromNanos: 150n, discountBps: 2000 }], priority: 2 }),
      rule({ id: "b", kind: "promotional", discountBps: 2000, priority: 1 }),
    ];
    const billed = hours(1, 100n);
    const late = hours(1, 100n, { hour: new Date(monthStart + hourMs) });
    const options = { maxDiscountBps: 2500 };
    expect(calculateDiscounts(billed, rules, options).applied.map((a) => a.amountNanos)).toEqual([0n, 20n]);
    expect(calculateDiscounts([...billed, ...late], rules, options).applied.map((a) => a.amountNanos)).toEqual([
      40n,
      10n,
    ]);
    expect(marginalDiscounts(billed, late, rules, options).map((a) => [a.rule.id, a.amountNanos])).toEqual([
      ["a", 20n],
      ["b", 0n],
    ]);
  });

  test("late usage lifting its period into an all-units tier gets the tier's rate on itself, not on the billed", () => {
    // $99.99 was invoiced without discount; $0.02 more takes the period past $100, where all of it is 50% off.
    const tiers50 = [
      { fromNanos: 0n, discountBps: 0 },
      { fromNanos: 100n * usd, discountBps: 5000 },
    ];
    const allUnits = rule({ kind: "volume_all_units", tiers: tiers50 });
    const billed = hours(1, 9_999n * (usd / 100n));
    const late = hours(1, 2n * (usd / 100n), { hour: new Date(monthStart + 5 * hourMs) });
    expect(calculateDiscounts([...billed, ...late], [allUnits], noMax).totalNanos).toBe(50_005n * (usd / 1000n));
    expect(marginalDiscounts(billed, late, [allUnits], noMax)[0]?.amountNanos).toBe(usd / 100n);
    expect(marginalDiscounts(billed, late, [allUnits], { maxDiscountBps: 2000 })[0]?.amountNanos).toBe(usd / 250n);
    // A 10% tier gives $5 of late usage $0.50, not the whole $5 the org's maximum (none) would allow.
    const tenPercent = rule({ kind: "volume_all_units", tiers: [{ fromNanos: 100n * usd, discountBps: 1000 }] });
    const five = hours(1, 5n * usd, { hour: new Date(monthStart + 5 * hourMs) });
    expect(marginalDiscounts(billed, five, [tenPercent], noMax)[0]?.amountNanos).toBe(usd / 2n);
  });

  test("a cap holds over three invoices of a period when a stacking rule before it grows with late usage", () => {
    // 90% off all usage once the period reaches $100, then 50% off what is left, up to $20.
    const bulkTiers = [{ fromNanos: 100n * usd, discountBps: 9000 }];
    const bulk = rule({ id: "bulk", kind: "volume_all_units", tiers: bulkTiers, priority: 2 });
    const capped = rule({ id: "capped", kind: "promotional", discountBps: 5000, capNanos: 20n * usd, priority: 1 });
    const rules = [bulk, capped];
    const first = hours(1, 40n * usd);
    const second = hours(1, 80n * usd, { hour: new Date(monthStart + hourMs) });
    const third = hours(1, 200n * usd, { hour: new Date(monthStart + 2 * hourMs) });
    const amounts = (applied: { rule: DiscountRule; amountNanos: bigint }[]) =>
      applied.map((a) => [a.rule.id, a.amountNanos]);
    expect(amounts(calculateDiscounts(first, rules, noMax).applied)).toEqual([
      ["bulk", 0n],
      ["capped", 20n * usd],
    ]);
    const granted = new Map([["capped", 20n * usd]]);
    expect(amounts(marginalDiscounts(first, second, rules, noMax, granted))).toEqual([
      ["bulk", 72n * usd],
      ["capped", 0n],
    ]);
    granted.set("bulk", 72n * usd);
    // Over the first two invoices' $120 the capped rule would get $6, over all $320 $16: not $10 more than its $20.
    expect(amounts(marginalDiscounts([...first, ...second], third, rules, noMax, granted))).toEqual([
      ["bulk", 180n * usd],
      ["capped", 0n],
    ]);
  });

  test("what deleted rules granted takes nothing from live rules, and still counts against the org's maximum", () => {
    const billed = hours(1, 100n * usd);
    const late = hours(1, 100n * usd, { hour: new Date(monthStart + hourMs) });
    const b = rule({ id: "b", kind: "promotional", discountBps: 1000, priority: 1 });
    const amounts = (applied: { rule: DiscountRule; amountNanos: bigint }[]) =>
      applied.map((a) => [a.rule.id, a.amountNanos]);
    // "a" (50%, deleted since) and "b" granted $50 and $5 on the billed $100; "b" now takes $20 off the $200.
    const granted = new Map([
      ["a", 50n * usd],
      ["b", 5n * usd],
    ]);
    expect(amounts(marginalDiscounts(billed, late, [b], noMax, granted))).toEqual([["b", 10n * usd]]);
    // A 30% maximum of the $200 has $5 left after the $55 granted, $50 of it by "a".
    expect(amounts(marginalDiscounts(billed, late, [b], { maxDiscountBps: 3000 }, granted))).toEqual([["b", 5n * usd]]);
    // "a", not stacking, shut "b" out of the billed $100 (granted it nothing): "b" gets its 10% of the late usage, not
    // of the billed usage it was shut out of.
    const shutOut = new Map([["a", 50n * usd]]);
    expect(amounts(marginalDiscounts(billed, late, [b], noMax, shutOut))).toEqual([["b", 10n * usd]]);
  });

  test("a rule created again after it was deleted has a cap of its own; the rules after it keep their share", () => {
    const billed = hours(1, 20n * usd);
    const late = hours(1, 10n * usd, { hour: new Date(monthStart + hourMs) });
    const y = rule({ id: "y", kind: "promotional", discountBps: 1000, capNanos: usd, priority: 2 });
    const z = rule({ id: "z", kind: "promotional", discountBps: 500, priority: 1 });
    // "x", as "y" but deleted, reached its $1 cap on the billed $20; "z" took 5% of the $19 left.
    const granted = new Map([
      ["x", usd],
      ["z", (95n * usd) / 100n],
    ]);
    const amounts = marginalDiscounts(billed, late, [y, z], noMax, granted).map((a) => [a.rule.id, a.amountNanos]);
    expect(amounts).toEqual([
      ["y", usd],
      ["z", usd / 2n],
    ]);
  });

  test("no usage, no rules: nothing", () => {
    expect(calculateDiscounts([], [rule({ kind: "promotional", discountBps: 5000 })], noMax)).toEqual({
      subtotalNanos: 0n,
      applied: [],
      totalNanos: 0n,
    });
    expect(calculateDiscounts(hours(1, 5n), [], noMax).totalNanos).toBe(0n);
  });
});

// Generators: a month of hourly usage over a few models and providers, and rules of every kind.
const models = ["gpt", "claude", "mistral"];
const providers = ["openai", "azure"];
const wholeHour = fc.integer({ min: 0, max: 31 * 24 }).map((h) => new Date(monthStart + h * hourMs));
const usageArb = fc.array(
  fc.record({
    hour: wholeHour,
    model: fc.constantFrom(...models),
    provider: fc.constantFrom(...providers),
    costNanos: fc.bigInt({ min: 0n, max: 10n ** 13n }),
  }),
  { maxLength: 40 },
);
const bps = fc.integer({ min: 0, max: 10_000 });
const tiersArb = fc
  .uniqueArray(fc.bigInt({ min: 0n, max: 10n ** 14n }), { minLength: 1, maxLength: 5 })
  .chain((froms) =>
    fc.array(bps, { minLength: froms.length, maxLength: froms.length }).map((rates) => {
      const sortedRates = [...rates].sort((a, b) => a - b);
      return [...froms].sort((a, b) => (a < b ? -1 : 1)).map((fromNanos, i) => ({
        fromNanos,
        discountBps: sortedRates[i] ?? 0,
      }));
    }),
  );
const windowArb = fc
  .tuple(fc.integer({ min: 0, max: 23 }), fc.integer({ min: 1, max: 24 }))
  .filter(([a, b]) => a !== b);
const ruleArb = fc
  .record({
    kind: fc.constantFrom("volume_graduated", "volume_all_units", "time_window", "promotional" as const),
    priority: fc.integer({ min: 0, max: 5 }),
    stackable: fc.boolean(),
    model: fc.option(fc.constantFrom(...models)),
    provider: fc.option(fc.constantFrom(...providers)),
    discountBps: bps,
    tiers: tiersArb,
    window: windowArb,
    daysOfWeek: fc.uniqueArray(fc.integer({ min: 0, max: 6 }), { maxLength: 7 }),
    validFrom: fc.option(wholeHour),
    validHours: fc.option(fc.integer({ min: 1, max: 31 * 24 })),
    capNanos: fc.oneof(fc.constant(0n), fc.bigInt({ min: 1n, max: 10n ** 13n })),
  })
  .map((r) => {
    const volume = r.kind === "volume_graduated" || r.kind === "volume_all_units";
    const window = r.kind === "time_window";
    return rule({
      kind: r.kind,
      priority: r.priority,
      stackable: r.stackable,
      model: r.model,
      provider: r.provider,
      discountBps: volume ? 0 : r.discountBps,
      tiers: volume ? r.tiers : [],
      startHour: window ? r.window[0] : 0,
      endHour: window ? r.window[1] : 24,
      daysOfWeek: window ? r.daysOfWeek : [],
      validFrom: r.validFrom,
      validUntil: r.validFrom && r.validHours ? new Date(r.validFrom.getTime() + r.validHours * hourMs) : null,
      capNanos: r.capNanos,
    });
  });
const rulesArb = fc
  .array(ruleArb, { maxLength: 6 })
  .map((rules) => rules.map((r, i) => ({ ...r, id: `disc_${String(i).padStart(2, "0")}` })));
// A volume rule that stacks before a capped rule, which it leaves less the more the period's usage grows; and others.
const periodRulesArb = fc
  .tuple(tiersArb, fc.boolean(), ruleArb, fc.bigInt({ min: 1n, max: 10n ** 13n }), fc.array(ruleArb, { maxLength: 2 }))
  .map(([volumeTiers, graduated, capped, capNanos, others]) => [
    rule({ id: "disc_vol", kind: graduated ? "volume_graduated" : "volume_all_units", tiers: volumeTiers, priority: 9 }),
    { ...capped, id: "disc_capped", priority: 8, stackable: true, capNanos },
    ...others.map((r, i) => ({ ...r, id: `disc_${i}` })),
  ]);
const maxArb = fc.oneof(fc.constant(0), bps);

describe("properties", () => {
  test("a wrapping window matches what its hours to midnight on its days and from midnight the day after match", () => {
    const wrapping = fc
      .tuple(fc.integer({ min: 1, max: 23 }), fc.integer({ min: 1, max: 23 }))
      .filter(([a, b]) => a > b);
    const days = fc.uniqueArray(fc.integer({ min: 0, max: 6 }), { maxLength: 7 });
    fc.assert(
      fc.property(wrapping, days, wholeHour, ([startHour, endHour], daysOfWeek, hour) => {
        const usage = { hour, model: "gpt", provider: "openai", costNanos: 1n };
        const window = rule({ kind: "time_window", discountBps: 1, startHour, endHour, daysOfWeek });
        const evening = { ...window, endHour: 24 };
        const morning = { ...window, startHour: 0, daysOfWeek: daysOfWeek.map((d) => (d + 1) % 7) };
        expect(matches(window, usage)).toBe(matches(evening, usage) || matches(morning, usage));
      }),
    );
  });

  test("the discount is never negative, never above the subtotal, the org maximum or a rule's cap", () => {
    fc.assert(
      fc.property(usageArb, rulesArb, maxArb, (usage, rules, maxDiscountBps) => {
        const result = calculateDiscounts(usage, rules, { maxDiscountBps });
        const subtotal = usage.reduce((s, u) => s + u.costNanos, 0n);
        expect(result.subtotalNanos).toBe(subtotal);
        expect(result.totalNanos).toBe(result.applied.reduce((s, a) => s + a.amountNanos, 0n));
        expect(result.totalNanos).toBeGreaterThanOrEqual(0n);
        expect(result.totalNanos).toBeLessThanOrEqual(subtotal);
        if (maxDiscountBps > 0) {
          expect(result.totalNanos).toBeLessThanOrEqual((subtotal * BigInt(maxDiscountBps)) / 10_000n);
        }
        for (const a of result.applied) {
          expect(a.amountNanos).toBeGreaterThanOrEqual(0n);
          expect(a.amountNanos).toBeLessThanOrEqual(a.matchedNanos);
          if (a.rule.capNanos > 0n) expect(a.amountNanos).toBeLessThanOrEqual(a.rule.capNanos);
        }
      }),
    );
  });

  test("the discount on the usage of one model never exceeds that usage", () => {
    fc.assert(
      fc.property(usageArb, rulesArb, fc.constantFrom(...models), (usage, rules, model) => {
        const scoped = rules.map((r) => ({ ...r, model }));
        const ofModel = usage.filter((u) => u.model === model).reduce((s, u) => s + u.costNanos, 0n);
        expect(calculateDiscounts(usage, scoped, noMax).totalNanos).toBeLessThanOrEqual(ofModel);
      }),
    );
  });

  test("the order rules are given in does not matter", () => {
    fc.assert(
      fc.property(usageArb, rulesArb, maxArb, fc.integer(), (usage, rules, maxDiscountBps, seed) => {
        const shuffled = [...rules].sort(() => (seed = (seed * 1103515245 + 12345) | 0) & 1 ? 1 : -1);
        const a = calculateDiscounts(usage, rules, { maxDiscountBps });
        const b = calculateDiscounts(usage, shuffled, { maxDiscountBps });
        expect(b.applied.map((x) => [x.rule.id, x.amountNanos])).toEqual(a.applied.map((x) => [x.rule.id, x.amountNanos]));
      }),
    );
  });

  test("graduated tiers never discount more than all-units tiers over the same usage", () => {
    fc.assert(
      fc.property(usageArb, tiersArb, (usage, t) => {
        const graduated = calculateDiscounts(usage, [rule({ kind: "volume_graduated", tiers: t })], noMax);
        const allUnits = calculateDiscounts(usage, [rule({ kind: "volume_all_units", tiers: t })], noMax);
        expect(graduated.totalNanos).toBeLessThanOrEqual(allUnits.totalNanos);
      }),
    );
  });

  test("volume discounts grow with volume", () => {
    fc.assert(
      fc.property(
        usageArb,
        usageArb,
        tiersArb,
        fc.constantFrom("volume_graduated", "volume_all_units" as const),
        (usage, more, t, kind) => {
          const r = [rule({ kind, tiers: t })];
          expect(calculateDiscounts([...usage, ...more], r, noMax).totalNanos).toBeGreaterThanOrEqual(
            calculateDiscounts(usage, r, noMax).totalNanos,
          );
        },
      ),
    );
  });

  test("a higher rate, cap or maximum never lowers the discount of a single rule", () => {
    fc.assert(
      fc.property(usageArb, ruleArb, bps, bps, maxArb, (usage, r, a, b, maxDiscountBps) => {
        const [low, high] = a < b ? [a, b] : [b, a];
        const flat = { ...r, kind: "promotional" as const, tiers: [], discountBps: low };
        const at = (x: DiscountRule, max = maxDiscountBps) =>
          calculateDiscounts(usage, [x], { maxDiscountBps: max }).totalNanos;
        expect(at({ ...flat, discountBps: high })).toBeGreaterThanOrEqual(at(flat));
        if (r.capNanos > 0n) expect(at({ ...flat, capNanos: 0n })).toBeGreaterThanOrEqual(at(flat));
        if (maxDiscountBps > 0) expect(at(flat, 0)).toBeGreaterThanOrEqual(at(flat));
      }),
    );
  });

  test("adding a rule of lower priority never lowers the total or changes the rules before it", () => {
    fc.assert(
      fc.property(usageArb, rulesArb, ruleArb, maxArb, (usage, rules, extra, maxDiscountBps) => {
        const lowest = { ...extra, id: "disc_zz", priority: -1 };
        const before = calculateDiscounts(usage, rules, { maxDiscountBps });
        const after = calculateDiscounts(usage, [...rules, lowest], { maxDiscountBps });
        expect(after.totalNanos).toBeGreaterThanOrEqual(before.totalNanos);
        expect(after.applied.slice(0, before.applied.length)).toEqual(before.applied);
      }),
    );
  });

  test("late usage adds the difference it makes to its period's discount, at most the maximum share of itself", () => {
    fc.assert(
      fc.property(usageArb, usageArb, rulesArb, maxArb, (billed, late, rules, maxDiscountBps) => {
        const before = calculateDiscounts(billed, rules, { maxDiscountBps });
        const after = calculateDiscounts([...billed, ...late], rules, { maxDiscountBps });
        const added = marginalDiscounts(billed, late, rules, { maxDiscountBps });
        expect(after.totalNanos).toBeGreaterThanOrEqual(before.totalNanos);
        const lateNanos = late.reduce((s, u) => s + u.costNanos, 0n);
        const bound = maxDiscountBps > 0 ? (lateNanos * BigInt(maxDiscountBps)) / 10_000n : lateNanos;
        const difference = after.totalNanos - before.totalNanos;
        const total = added.reduce((s, a) => s + a.amountNanos, 0n);
        expect(total).toBeLessThanOrEqual(difference < bound ? difference : bound);
        // Rates without caps, tiers or a maximum, which could reach back to the billed usage: the difference, less what
        // the bound of each rule's rate on the late usage alone rounds down (under a nano-USD a rule).
        const plain = (r: (typeof rules)[number]) => (r.kind === "promotional" || r.kind === "time_window") && r.capNanos === 0n;
        if (maxDiscountBps === 0 && rules.every(plain)) {
          expect(difference - total).toBeGreaterThanOrEqual(0n);
          expect(difference - total).toBeLessThanOrEqual(BigInt(added.length));
        }
        for (const a of added) {
          expect(a.amountNanos).toBeGreaterThanOrEqual(0n);
          const earlier = before.applied.find((b) => b.rule.id === a.rule.id)?.amountNanos ?? 0n;
          if (a.rule.capNanos > 0n) expect(earlier + a.amountNanos).toBeLessThanOrEqual(a.rule.capNanos);
        }
      }),
    );
  });

  test("over all of a period's invoices, late usage on several, no rule passes its cap nor the total the maximum", () => {
    const limit = (nanos: bigint, maxDiscountBps: number) =>
      maxDiscountBps > 0 ? (nanos * BigInt(maxDiscountBps)) / 10_000n : nanos;
    fc.assert(
      fc.property(
        fc.array(usageArb, { minLength: 2, maxLength: 5 }),
        fc.oneof(periodRulesArb, rulesArb),
        maxArb,
        (invoices, rules, maxDiscountBps) => {
          const options = { maxDiscountBps };
          // The first invoice bills the period's usage so far; each later one late usage, against what was granted.
          const granted = new Map<string, bigint>();
          const billed: UsageHour[] = [];
          invoices.forEach((late, i) => {
            const discounts =
              i === 0
                ? calculateDiscounts(late, rules, options).applied
                : marginalDiscounts(billed, late, rules, options, granted);
            const lateNanos = late.reduce((s, u) => s + u.costNanos, 0n);
            const added = discounts.reduce((s, a) => s + a.amountNanos, 0n);
            expect(added).toBeLessThanOrEqual(limit(lateNanos, maxDiscountBps));
            for (const a of discounts) {
              expect(a.amountNanos).toBeGreaterThanOrEqual(0n);
              granted.set(a.rule.id, (granted.get(a.rule.id) ?? 0n) + a.amountNanos);
            }
            billed.push(...late);
          });
          const subtotal = billed.reduce((s, u) => s + u.costNanos, 0n);
          const total = [...granted.values()].reduce((s, amount) => s + amount, 0n);
          expect(total).toBeLessThanOrEqual(limit(subtotal, maxDiscountBps));
          // Nor more than the period's usage gets on one invoice.
          expect(total).toBeLessThanOrEqual(calculateDiscounts(billed, rules, options).totalNanos);
          for (const r of rules) if (r.capNanos > 0n) expect(granted.get(r.id) ?? 0n).toBeLessThanOrEqual(r.capNanos);
        },
      ),
      { numRuns: 1000 },
    );
  });

  test("a non-stackable rule matching all usage stops every rule of lower priority", () => {
    fc.assert(
      fc.property(usageArb, rulesArb, bps, (usage, rules, rate) => {
        const exclusive = rule({ id: "disc_top", kind: "promotional", discountBps: rate, priority: 99, stackable: false });
        const alone = calculateDiscounts(usage, [exclusive], noMax);
        const withOthers = calculateDiscounts(usage, [exclusive, ...rules], noMax);
        expect(withOthers.totalNanos).toBe(alone.totalNanos);
      }),
    );
  });
});
