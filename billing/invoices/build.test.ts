import { expect, test } from "bun:test";
import fc from "fast-check";
import { unscopedRule } from "../discounts/test-rules.ts";
import type { DiscountRule } from "../store/types.ts";
import { buildInvoice, describeRule, type UsageSlice } from "./build.ts";

const hour = new Date("2026-03-02T10:00:00Z");

function slice(overrides: Partial<UsageSlice>): UsageSlice {
  const s: UsageSlice = {
    hour,
    model: "gpt-4o",
    provider: "openai",
    costNanos: 0n,
    inputTokens: 0n,
    cachedInputTokens: 0n,
    outputTokens: 0n,
    reasoningTokens: 0n,
    inputNanos: 0n,
    cachedInputNanos: 0n,
    outputNanos: 0n,
    reasoningNanos: 0n,
    unitemisedTokens: 0n,
    unitemisedNanos: 0n,
    ...overrides,
  };
  s.costNanos = s.inputNanos + s.cachedInputNanos + s.outputNanos + s.reasoningNanos + s.unitemisedNanos;
  return s;
}

const promo = (overrides: Partial<DiscountRule> = {}): DiscountRule => ({
  id: "disc_A",
  orgId: "org_1",
  name: "Launch promo",
  kind: "promotional",
  discountBps: 1000,
  ...unscopedRule,
  createdAt: hour,
  ...overrides,
});

test("one line per model and token type, unitemised usage on its own line, discounts as negative lines", () => {
  const usage = [
    slice({ inputTokens: 1000n, inputNanos: 2_500_000n, outputTokens: 200n, outputNanos: 2_000_000n }),
    slice({ hour: new Date("2026-03-02T11:00:00Z"), cachedInputTokens: 400n, cachedInputNanos: 500_000n }),
    slice({ model: "claude", provider: "anthropic", unitemisedTokens: 77n, unitemisedNanos: 3_000_000n }),
    slice({ model: "claude", provider: "anthropic", reasoningTokens: 10n, reasoningNanos: 100_000n }),
  ];
  const invoice = buildInvoice(usage, [promo({ model: "gpt-4o" })], { taxRateBps: 0, maxDiscountBps: 0 });
  expect(invoice.lines.map((l) => [l.description, l.tokenType, l.quantity, l.amountNanos])).toEqual([
    ["claude: reasoning tokens", "reasoning", 10n, 100_000n],
    ["claude: usage not itemised by token type", "usage", 77n, 3_000_000n],
    ["gpt-4o: input tokens", "input", 1000n, 2_500_000n],
    ["gpt-4o: cached input tokens", "cached_input", 400n, 500_000n],
    ["gpt-4o: output tokens", "output", 200n, 2_000_000n],
    ["Discount: Launch promo (10% off, model gpt-4o)", "discount", 0n, -500_000n],
  ]);
  expect(invoice.lines.at(-1)).toMatchObject({ discountRuleId: "disc_A", model: "gpt-4o" });
  expect(invoice).toMatchObject({ subtotalCents: 1n, discountCents: 0n, taxCents: 0n, totalCents: 1n });
});

test("late usage is discounted by what it adds to its own period's discount; the period's usage alone", () => {
  const usd = 1_000_000_000n;
  const at = (iso: string, nanos: bigint) => slice({ hour: new Date(iso), inputTokens: 1n, inputNanos: nanos });
  const capped = promo({ capNanos: usd / 5n });
  const billed = [
    // January's invoice reached the $0.20 cap; February's took $0.10 of it.
    at("2026-01-10T00:00:00Z", 2n * usd),
    at("2026-02-10T00:00:00Z", usd),
  ];
  const usage = [
    at("2026-01-31T23:00:00Z", usd),
    at("2026-02-01T00:00:00Z", 2n * usd),
    at("2026-03-01T00:00:00Z", 3n * usd),
  ];
  const granted = [
    { periodStart: new Date("2026-01-01T00:00:00Z"), ruleId: "disc_A", amountNanos: usd / 5n },
    { periodStart: new Date("2026-02-01T00:00:00Z"), ruleId: "disc_A", amountNanos: usd / 10n },
  ];
  const period = { start: new Date("2026-03-01T00:00:00Z"), billingDay: 1, billed, granted };
  const invoice = buildInvoice(usage, [capped], { taxRateBps: 0, maxDiscountBps: 0, period });
  expect(invoice.lines.map((l) => [l.description, l.amountNanos])).toEqual([
    ["gpt-4o: input tokens", 3n * usd],
    ["gpt-4o: input tokens (used before 2026-03-01, not billed on an earlier invoice)", 3n * usd],
    // March's own $0.20 cap, nothing more for January, the $0.10 left of February's cap.
    ["Discount: Launch promo (10% off, capped at $0.2)", -(3n * usd) / 10n],
  ]);
  expect(invoice).toMatchObject({ subtotalCents: 600n, discountCents: 30n, taxCents: 0n, totalCents: 570n });
  // The discount line split by the period of the usage it discounts, for later invoices of those periods.
  expect(invoice.grants).toEqual([
    { periodStart: period.start, ruleId: "disc_A", amountNanos: usd / 5n },
    { periodStart: new Date("2026-02-01T00:00:00Z"), ruleId: "disc_A", amountNanos: usd / 10n },
  ]);

  // Without late usage, the same as an invoice of the period alone.
  const march = usage.slice(2);
  expect(buildInvoice(march, [capped], { taxRateBps: 0, maxDiscountBps: 0, period })).toEqual({
    ...buildInvoice(march, [capped], { taxRateBps: 0, maxDiscountBps: 0 }),
    grants: [{ periodStart: period.start, ruleId: "disc_A", amountNanos: usd / 5n }],
  });
});

test("each total is rounded once, half-up, from exact nano-USD", () => {
  // $10.004999999 subtotal, 10% off = $1.0004999999 rounded down to the nano, 19% tax.
  const usage = [slice({ inputTokens: 1n, inputNanos: 10_004_999_999n })];
  const invoice = buildInvoice(usage, [promo()], { taxRateBps: 1900, maxDiscountBps: 0 });
  const discount = 1_000_499_999n;
  expect(invoice.lines.at(-1)?.amountNanos).toBe(-discount);
  const net = 10_004_999_999n - discount; // 9_004_500_000: $9.0045
  expect(invoice.subtotalCents).toBe(1000n); // $10.004999999 -> $10.00
  expect(invoice.discountCents).toBe(100n); // $1.000499999 -> $1.00
  expect(invoice.taxCents).toBe(171n); // 19% of $9.0045 = $1.710855 -> $1.71
  expect(invoice.totalCents).toBe(1072n); // $10.715355 -> $10.72
  // Rounded once at the total: not 1000 - 100 + 171 = 1071.
  expect(net * 11_900n).toBe(107_153_550_000_000n);

  const halfCent = buildInvoice([slice({ inputTokens: 1n, inputNanos: 5_000_000n })], [], {
    taxRateBps: 0,
    maxDiscountBps: 0,
  });
  expect(halfCent).toMatchObject({ subtotalCents: 1n, totalCents: 1n });
});

test("totals are consistent for any usage, rules and tax rate", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({
          model: fc.constantFrom("a", "b"),
          inputNanos: fc.bigInt({ min: 0n, max: 10n ** 12n }),
          unitemisedNanos: fc.bigInt({ min: 0n, max: 10n ** 12n }),
        }),
        { maxLength: 10 },
      ),
      fc.integer({ min: 0, max: 10_000 }),
      fc.integer({ min: 0, max: 10_000 }),
      fc.integer({ min: 0, max: 10_000 }),
      (slices, discountBps, taxRateBps, maxDiscountBps) => {
        const usage = slices.map((s) => slice(s));
        const invoice = buildInvoice(usage, discountBps ? [promo({ discountBps })] : [], { taxRateBps, maxDiscountBps });
        const usageLines = invoice.lines.filter((l) => l.tokenType !== "discount");
        const discountLines = invoice.lines.filter((l) => l.tokenType === "discount");
        const subtotal = usageLines.reduce((s, l) => s + l.amountNanos, 0n);
        const discount = -discountLines.reduce((s, l) => s + l.amountNanos, 0n);
        expect(subtotal).toBe(usage.reduce((s, u) => s + u.costNanos, 0n));
        expect(discount).toBeGreaterThanOrEqual(0n);
        expect(invoice.discountCents).toBeLessThanOrEqual(invoice.subtotalCents);
        expect(invoice.totalCents).toBeGreaterThanOrEqual(0n);
        // Rounded separately, the figures never drift more than the one cent the rounding rule warns of.
        const drift = invoice.totalCents - (invoice.subtotalCents - invoice.discountCents + invoice.taxCents);
        expect(drift >= -1n && drift <= 1n).toBe(true);
      },
    ),
  );
});

test("a window wrapping past midnight discounts both sides of it on one line", () => {
  const usage = ["2026-03-06T21:00:00Z", "2026-03-06T23:00:00Z", "2026-03-07T01:00:00Z", "2026-03-07T06:00:00Z"].map(
    (at) => slice({ hour: new Date(at), unitemisedTokens: 1n, unitemisedNanos: 1_000_000n }),
  );
  const nights = promo({ name: "Friday nights", kind: "time_window", discountBps: 2000, startHour: 22, endHour: 6 });
  const invoice = buildInvoice(usage, [{ ...nights, daysOfWeek: [5] }], { taxRateBps: 0, maxDiscountBps: 0 });
  expect(invoice.lines.filter((l) => l.tokenType === "discount").map((l) => [l.description, l.amountNanos])).toEqual([
    ["Discount: Friday nights (20% off 22:00-06:00 UTC on Fri)", -400_000n],
  ]);
});

test("rules are described in words on their lines", () => {
  expect(
    describeRule(
      promo({
        kind: "volume_graduated",
        discountBps: 0,
        tiers: [
          { fromNanos: 0n, discountBps: 0 },
          { fromNanos: 100_000_000_000n, discountBps: 500 },
        ],
        provider: "openai",
        capNanos: 5_000_000_000n,
      }),
    ),
  ).toBe("graduated volume tiers $0+ 0%, $100+ 5%, provider openai, capped at $5");
  expect(
    describeRule(
      promo({
        kind: "time_window",
        startHour: 0,
        endHour: 6,
        daysOfWeek: [6, 0],
        validFrom: new Date("2026-03-01T00:00:00Z"),
      }),
    ),
  ).toBe("10% off 00:00-06:00 UTC on Sun, Sat, valid 2026-03-01 00:00 UTC to open");
  const fridayNight = promo({ kind: "time_window", discountBps: 2000, startHour: 22, endHour: 6, daysOfWeek: [5] });
  expect(describeRule(fridayNight)).toBe("20% off 22:00-06:00 UTC on Fri");
});
