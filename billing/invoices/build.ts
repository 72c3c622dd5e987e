import { divRoundHalfUp, formatNanosUsd, NANOS_PER_CENT, nanosToCents } from "../../lib/money.ts";
import { byPriority, calculateDiscounts, marginalDiscounts, type UsageHour } from "../discounts/calculate.ts";
import { billingPeriod } from "../period.ts";
import type { DiscountRule, InvoiceLine, LineTokenType } from "../store/types.ts";

/**
 * Usage of one model and provider in one UTC hour, split into records that carry a cost breakdown by token type
 * (itemised) and records that do not.
 */
export interface UsageSlice extends UsageHour {
  /** Itemised records: input tokens not cached, cached input, output not reasoning, reasoning; and their costs. */
  inputTokens: bigint;
  cachedInputTokens: bigint;
  outputTokens: bigint;
  reasoningTokens: bigint;
  inputNanos: bigint;
  cachedInputNanos: bigint;
  outputNanos: bigint;
  reasoningNanos: bigint;
  /** Records without a breakdown: input + output tokens and cost. */
  unitemisedTokens: bigint;
  unitemisedNanos: bigint;
}

/** What an invoice discounted, by one rule, of the usage of the billing period starting `periodStart`. */
export interface DiscountGrant {
  periodStart: Date;
  ruleId: string;
  amountNanos: bigint;
}

export interface InvoiceContent {
  lines: InvoiceLine[];
  /** The discount lines split by the period of the usage they discount (with `period` only), amounts above 0. */
  grants: DiscountGrant[];
  subtotalCents: bigint;
  discountCents: bigint;
  taxCents: bigint;
  totalCents: bigint;
}

export const roundingRule =
  "Amounts are exact in nano-USD (1e-9 USD) until the totals. Subtotal, discounts, tax and total are each rounded " +
  "once to the cent, half-up, from their exact values, so a total may differ by a cent from the sum of the rounded " +
  "figures above it. Tax is charged on the subtotal less discounts. Discounts round down to the nano-USD.";

type UsageLineType = Exclude<LineTokenType, "discount">;

const usageLines: { type: UsageLineType; label: string }[] = [
  { type: "input", label: "input tokens" },
  { type: "cached_input", label: "cached input tokens" },
  { type: "output", label: "output tokens" },
  { type: "reasoning", label: "reasoning tokens" },
  { type: "usage", label: "usage not itemised by token type" },
];

/** The lines and totals of an invoice over `usage`, with `rules` applied and the org's tax rate. */
export function buildInvoice(
  usage: readonly UsageSlice[],
  rules: readonly DiscountRule[],
  org: {
    taxRateBps: number;
    maxDiscountBps: number;
    /**
     * The invoice's period: usage before its start arrived after its own period was invoiced. It gets lines of its
     * own and, per period it belongs to (see latePeriods), the discount it adds to what issued invoices granted of
     * that period (`granted`) for its usage they billed (`billed`). Unset: every slice counts as the period's.
     */
    period?: { start: Date; billingDay: number; billed: readonly UsageHour[]; granted: readonly DiscountGrant[] };
  },
): InvoiceContent {
  const period = org.period;
  type Totals = Record<UsageLineType, { quantity: bigint; amountNanos: bigint }>;
  // Per model, the period's own usage first, then late usage.
  const groups = new Map<string, { model: string; late: boolean; totals: Totals }>();
  for (const slice of usage) {
    const late = period !== undefined && slice.hour < period.start;
    const key = `${slice.model}\u0000${late ? 1 : 0}`;
    let group = groups.get(key);
    if (!group) {
      const zero = () => ({ quantity: 0n, amountNanos: 0n });
      const totals = { input: zero(), cached_input: zero(), output: zero(), reasoning: zero(), usage: zero() };
      group = { model: slice.model, late, totals };
      groups.set(key, group);
    }
    const totals = group.totals;
    add(totals.input, slice.inputTokens, slice.inputNanos);
    add(totals.cached_input, slice.cachedInputTokens, slice.cachedInputNanos);
    add(totals.output, slice.outputTokens, slice.outputNanos);
    add(totals.reasoning, slice.reasoningTokens, slice.reasoningNanos);
    add(totals.usage, slice.unitemisedTokens, slice.unitemisedNanos);
  }

  const lines: InvoiceLine[] = [];
  const ordered = [...groups.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, group]) => group);
  for (const { model, late, totals } of ordered) {
    const name = model || "(no model)";
    const suffix = late && period ? ` (used before ${utcDay(period.start)}, not billed on an earlier invoice)` : "";
    for (const { type, label } of usageLines) {
      const { quantity, amountNanos } = totals[type];
      if (quantity === 0n && amountNanos === 0n) continue;
      const description = `${name}: ${label}${suffix}`;
      lines.push({ description, model, tokenType: type, quantity, amountNanos, discountRuleId: null });
    }
  }

  // The period's own usage is discounted by what it adds to what issued invoices granted of the period for the part of
  // it they billed (a later period's invoice took it as late usage): caps, tiers and the maximum discount hold for the
  // whole period, over all of its invoices. Likewise late usage of an earlier period by what it adds to that period's.
  const current = period ? usage.filter((slice) => slice.hour >= period.start) : usage;
  const ownEnd = period && billingPeriod(period.start, period.billingDay).end;
  const ownBilled = period ? period.billed.filter((b) => b.hour >= period.start && b.hour < (ownEnd as Date)) : [];
  const grantedOf = (start: Date) =>
    new Map(
      period?.granted.filter((g) => g.periodStart.getTime() === start.getTime()).map((g) => [g.ruleId, g.amountNanos]),
    );
  const applied = [
    {
      start: period?.start,
      discounts:
        period && ownBilled.length > 0
          ? marginalDiscounts(ownBilled, current, rules, org, grantedOf(period.start))
          : calculateDiscounts(current, rules, org).applied,
    },
  ];
  if (period) {
    for (const earlier of latePeriods(usage, period.start, period.billingDay)) {
      const billed = period.billed.filter((b) => b.hour >= earlier.start && b.hour < earlier.end);
      const discounts = marginalDiscounts(billed, earlier.usage, rules, org, grantedOf(earlier.start));
      applied.push({ start: earlier.start, discounts });
    }
  }
  const discountOf = new Map<string, bigint>();
  const grants: DiscountGrant[] = [];
  for (const { start, discounts } of applied) {
    for (const { rule, amountNanos } of discounts) {
      if (amountNanos === 0n) continue;
      discountOf.set(rule.id, (discountOf.get(rule.id) ?? 0n) + amountNanos);
      if (start) grants.push({ periodStart: start, ruleId: rule.id, amountNanos });
    }
  }
  let discountNanos = 0n;
  for (const rule of [...rules].sort(byPriority)) {
    const amountNanos = discountOf.get(rule.id) ?? 0n;
    if (amountNanos === 0n) continue;
    discountNanos += amountNanos;
    lines.push({
      description: `Discount: ${rule.name} (${describeRule(rule)})`,
      model: rule.model ?? "",
      tokenType: "discount",
      quantity: 0n,
      amountNanos: -amountNanos,
      discountRuleId: rule.id,
    });
  }

  const subtotalNanos = usage.reduce((sum, slice) => sum + slice.costNanos, 0n);
  const net = subtotalNanos - discountNanos;
  const bps = BigInt(org.taxRateBps);
  return {
    lines,
    grants,
    subtotalCents: nanosToCents(subtotalNanos),
    discountCents: nanosToCents(discountNanos),
    taxCents: divRoundHalfUp(net * bps, 10_000n * NANOS_PER_CENT),
    totalCents: divRoundHalfUp(net * (10_000n + bps), 10_000n * NANOS_PER_CENT),
  };
}

/**
 * Usage before `periodStart` (late usage) by the billing period it belongs to, with the org's `billingDay`, earliest
 * first.
 */
export function latePeriods<T extends UsageHour>(
  usage: readonly T[],
  periodStart: Date,
  billingDay: number,
): { start: Date; end: Date; usage: T[] }[] {
  const periods = new Map<number, { start: Date; end: Date; usage: T[] }>();
  for (const slice of usage) {
    if (slice.hour >= periodStart) continue;
    const { start, end } = billingPeriod(slice.hour, billingDay);
    let earlier = periods.get(start.getTime());
    if (!earlier) {
      earlier = { start, end, usage: [] };
      periods.set(start.getTime(), earlier);
    }
    earlier.usage.push(slice);
  }
  return [...periods.values()].sort((a, b) => a.start.getTime() - b.start.getTime());
}

function utcDay(at: Date): string {
  return at.toISOString().slice(0, 10);
}

function add(line: { quantity: bigint; amountNanos: bigint }, quantity: bigint, amountNanos: bigint): void {
  line.quantity += quantity;
  line.amountNanos += amountNanos;
}

/** A rule in words, e.g. "20% off, model gpt-4o, 2026-03-01 00:00 to 2026-04-01 00:00 UTC, capped at $100". */
export function describeRule(rule: DiscountRule): string {
  const percent = (bps: number) => `${bps / 100}%`;
  const usd = (nanos: bigint) => `$${formatNanosUsd(nanos)}`;
  const parts: string[] = [];
  switch (rule.kind) {
    case "volume_graduated":
    case "volume_all_units":
      parts.push(
        `${rule.kind === "volume_graduated" ? "graduated" : "all-units"} volume tiers ` +
          rule.tiers.map((t) => `${usd(t.fromNanos)}+ ${percent(t.discountBps)}`).join(", "),
      );
      break;
    case "time_window": {
      const days = rule.daysOfWeek.length
        ? ` on ${[...rule.daysOfWeek].sort().map((d) => weekdays[d]).join(", ")}`
        : "";
      parts.push(`${percent(rule.discountBps)} off ${pad(rule.startHour)}:00-${pad(rule.endHour)}:00 UTC${days}`);
      break;
    }
    case "promotional":
      parts.push(`${percent(rule.discountBps)} off`);
      break;
  }
  if (rule.model) parts.push(`model ${rule.model}`);
  if (rule.provider) parts.push(`provider ${rule.provider}`);
  if (rule.validFrom || rule.validUntil) {
    const at = (d: Date | null) => (d ? `${d.toISOString().slice(0, 16).replace("T", " ")} UTC` : "open");
    parts.push(`valid ${at(rule.validFrom)} to ${at(rule.validUntil)}`);
  }
  if (rule.capNanos > 0n) parts.push(`capped at ${usd(rule.capNanos)}`);
  return parts.join(", ");
}

const weekdays = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

function pad(hour: number): string {
  return String(hour).padStart(2, "0");
}
