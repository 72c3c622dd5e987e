import type { DiscountRule } from "../store/types.ts";

/** Usage cost of one model and provider in one UTC hour: the unit discount rules are evaluated on. */
export interface UsageHour {
  /** Start of the hour, UTC. */
  hour: Date;
  model: string;
  provider: string;
  costNanos: bigint;
}

export interface AppliedDiscount {
  rule: DiscountRule;
  /** Usage the rule matched and discounted, before any discount: not what rules that do not stack closed to it. */
  matchedNanos: bigint;
  /** The rule's volume: all the usage it matches before any discount, closed to it or not, which decides its tier. */
  volumeNanos: bigint;
  /** What the rule took off, >= 0. */
  amountNanos: bigint;
}

export interface DiscountResult {
  subtotalNanos: bigint;
  /** Rules that matched some usage, in the order they were applied. */
  applied: AppliedDiscount[];
  totalNanos: bigint;
}

const bpsScale = 10_000n;

/**
 * Discounts of one billing period. Rules apply highest priority first (ties by id), each to the usage it matches as
 * it stands after the rules before it; a rule that is not stackable closes the usage it matched to later rules, which
 * still counts towards their volume tiers (the volume is all the usage a rule matches, before any discount). Each rule is limited by its cap and by what is left of the org's maximum (`maxDiscountBps` of the subtotal, 0 = no
 * maximum). Every amount rounds down to the nano-USD, so no bound is ever crossed by rounding.
 */
export function calculateDiscounts(
  usage: readonly UsageHour[],
  rules: readonly DiscountRule[],
  options: { maxDiscountBps: number },
): DiscountResult {
  const remaining = usage.map((u) => u.costNanos);
  const open = usage.map(() => true);
  const subtotalNanos = remaining.reduce((sum, cost) => sum + cost, 0n);
  let allowance =
    options.maxDiscountBps > 0 ? (subtotalNanos * BigInt(options.maxDiscountBps)) / bpsScale : subtotalNanos;
  const applied: AppliedDiscount[] = [];

  for (const rule of [...rules].sort(byPriority)) {
    const all = usage.flatMap((u, i) => (matches(rule, u) ? [i] : []));
    const matched = all.filter((i) => open[i]);
    if (matched.length === 0) continue;
    const costs = usage.map((u) => u.costNanos);
    const gross = sumAt(costs, matched);
    const volume = sumAt(costs, all);
    const base = sumAt(remaining, matched);
    let amount = ruleAmount(rule, volume, base);
    if (rule.capNanos > 0n && amount > rule.capNanos) amount = rule.capNanos;
    if (amount > allowance) amount = allowance;
    allowance -= amount;
    takeProportionally(remaining, matched, base, amount);
    if (!rule.stackable) for (const i of matched) open[i] = false;
    applied.push({ rule, matchedNanos: gross, volumeNanos: volume, amountNanos: amount });
  }

  const totalNanos = applied.reduce((sum, a) => sum + a.amountNanos, 0n);
  return { subtotalNanos, applied, totalNanos };
}

/**
 * The discounts `late` usage of a billing period adds to what the period's issued invoices, which billed its `billed`
 * usage, already discounted (`granted`, per rule id; by default what `billed` gets invoiced as a whole): per rule, what
 * it takes off `billed` and `late` together less what it was granted, so a cap, volume tier or maximum the period's
 * invoices used is not granted again, however many there were and whatever each was bounded by. Never more than each
 * rule's rate (the tier the period's whole usage reaches) on the late usage it matched, nor in all than the late usage,
 * the period's whole discount less what `rules` were granted, the org's maximum share of the late usage, or what is
 * left of its maximum of the period's whole usage after all grants: what issued invoices billed is not discounted
 * again, so late usage that lifts its period into an all-units tier gets that tier's rate on itself, not a credit for
 * the usage billed before. What rules deleted since (ids not in `rules`) were granted counts against the org's maximum
 * only: a rule created again is a new rule, with a cap of its own. Rules that matched some of the usage, in the order
 * they were applied; `matchedNanos` is late usage, `volumeNanos` the period's.
 */
export function marginalDiscounts(
  billed: readonly UsageHour[],
  late: readonly UsageHour[],
  rules: readonly DiscountRule[],
  options: { maxDiscountBps: number },
  granted?: ReadonlyMap<string, bigint>,
): AppliedDiscount[] {
  const before = calculateDiscounts(billed, rules, options);
  const after = calculateDiscounts([...billed, ...late], rules, options);
  const was = new Map(before.applied.map((a) => [a.rule.id, a]));
  const given = granted ?? new Map(before.applied.map((a) => [a.rule.id, a.amountNanos]));
  const live = new Set(rules.map((rule) => rule.id));
  let givenNanos = 0n;
  let givenLiveNanos = 0n;
  for (const [ruleId, amount] of given) {
    givenNanos += amount;
    if (live.has(ruleId)) givenLiveNanos += amount;
  }
  const lateNanos = late.reduce((sum, u) => sum + u.costNanos, 0n);
  // The period's whole discount less what its invoices granted the rules as they are now: a deleted rule's grants are
  // no live rule's.
  let left = after.totalNanos > givenLiveNanos ? after.totalNanos - givenLiveNanos : 0n;
  if (left > lateNanos) left = lateNanos;
  if (options.maxDiscountBps > 0) {
    // The org's maximum holds over every grant of the period, deleted rules' included, and on the late usage itself.
    const maxBps = BigInt(options.maxDiscountBps);
    const ceiling = (after.subtotalNanos * maxBps) / bpsScale - givenNanos;
    const share = (lateNanos * maxBps) / bpsScale;
    if (left > share) left = share;
    if (left > ceiling) left = ceiling > 0n ? ceiling : 0n;
  }
  return after.applied.map(({ rule, matchedNanos, volumeNanos, amountNanos }) => {
    const lateMatched = matchedNanos - (was.get(rule.id)?.matchedNanos ?? 0n);
    // Never more than the rule's rate, as the period's whole usage reaches it, on the late usage it matched.
    const rateBps = rule.kind === "promotional" || rule.kind === "time_window" ? rule.discountBps : allUnitsBps(rule, volumeNanos);
    const atRate = (lateMatched * BigInt(rateBps)) / bpsScale;
    // The rule's discount over the period's whole usage is within its cap: what its invoices granted is taken out.
    let added = amountNanos - (given.get(rule.id) ?? 0n);
    if (added > atRate) added = atRate;
    // A discount never charges: a rule left less goes to 0 and the added total to rules in the order they apply.
    const amount = added <= 0n ? 0n : added < left ? added : left;
    left -= amount;
    return { rule, matchedNanos: lateMatched, volumeNanos, amountNanos: amount };
  });
}

/**
 * Whether a rule covers one hour of one model's usage: scope, validity and (time windows) hour and weekday. A window
 * with startHour > endHour wraps past midnight, and its days are the days it starts on: the hours after midnight
 * belong to the previous day's window (Fri 22-6 covers Fri 22:00-24:00 and Sat 00:00-06:00).
 */
export function matches(rule: DiscountRule, usage: UsageHour): boolean {
  if (rule.model !== null && rule.model !== usage.model) return false;
  if (rule.provider !== null && rule.provider !== usage.provider) return false;
  if (rule.validFrom && usage.hour < rule.validFrom) return false;
  if (rule.validUntil && usage.hour >= rule.validUntil) return false;
  if (rule.kind === "time_window") {
    const hour = usage.hour.getUTCHours();
    const wraps = rule.startHour > rule.endHour;
    const inside = wraps
      ? hour >= rule.startHour || hour < rule.endHour
      : hour >= rule.startHour && hour < rule.endHour;
    if (!inside) return false;
    const afterMidnight = wraps && hour < rule.endHour;
    const day = (usage.hour.getUTCDay() + (afterMidnight ? 6 : 0)) % 7;
    if (rule.daysOfWeek.length > 0 && !rule.daysOfWeek.includes(day)) return false;
  }
  return true;
}

/**
 * What a rule takes off `base` (the usage it discounts, after earlier rules), given `volume` (all the usage it matches
 * before any discount, which decides volume tiers). Never more than `base`.
 */
function ruleAmount(rule: DiscountRule, volume: bigint, base: bigint): bigint {
  if (base <= 0n) return 0n;
  switch (rule.kind) {
    case "time_window":
    case "promotional":
      return (base * BigInt(rule.discountBps)) / bpsScale;
    case "volume_all_units":
      return (base * BigInt(allUnitsBps(rule, volume))) / bpsScale;
    case "volume_graduated":
      // The graduated rate of the volume, applied to what is left of the usage it discounts.
      return (graduatedBpsNanos(rule, volume) * base) / (volume * bpsScale);
  }
}

/** Basis points of the highest tier `volume` reaches; 0 below the first tier. */
export function allUnitsBps(rule: Pick<DiscountRule, "tiers">, volume: bigint): number {
  let bps = 0;
  for (const tier of rule.tiers) if (volume >= tier.fromNanos) bps = tier.discountBps;
  return bps;
}

/** Sum over tiers of (volume inside the tier) * (its basis points): the graduated discount times 10,000. */
export function graduatedBpsNanos(rule: Pick<DiscountRule, "tiers">, volume: bigint): bigint {
  let total = 0n;
  rule.tiers.forEach((tier, i) => {
    const next = rule.tiers[i + 1]?.fromNanos;
    const top = next !== undefined && next < volume ? next : volume;
    if (top > tier.fromNanos) total += (top - tier.fromNanos) * BigInt(tier.discountBps);
  });
  return total;
}

/** The order rules apply in: highest priority first, ties by id. */
export function byPriority(a: DiscountRule, b: DiscountRule): number {
  return b.priority - a.priority || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

function sumAt(values: readonly bigint[], indexes: readonly number[]): bigint {
  let sum = 0n;
  for (const i of indexes) sum += values[i] ?? 0n;
  return sum;
}

/**
 * Takes `amount` (<= `base`, the sum of `remaining` at `indexes`) out of those entries in proportion to each,
 * rounding down and then one nano-USD at a time from the first entries that still have some, so none goes negative.
 */
function takeProportionally(remaining: bigint[], indexes: readonly number[], base: bigint, amount: bigint): void {
  if (amount === 0n) return;
  let left = amount;
  for (const i of indexes) {
    const share = (amount * (remaining[i] ?? 0n)) / base;
    remaining[i] = (remaining[i] ?? 0n) - share;
    left -= share;
  }
  for (const i of indexes) {
    if (left === 0n) break;
    if ((remaining[i] ?? 0n) > 0n) {
      remaining[i] = (remaining[i] ?? 0n) - 1n;
      left -= 1n;
    }
  }
}
