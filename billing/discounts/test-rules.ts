import type { NewDiscountRule } from "../store/types.ts";

/** A rule's fields with nothing narrowing it: any model or provider, all hours and days, always valid, no cap. */
export const unscopedRule: Omit<NewDiscountRule, "orgId" | "name" | "kind" | "discountBps"> = {
  priority: 0,
  stackable: true,
  model: null,
  provider: null,
  tiers: [],
  startHour: 0,
  endHour: 24,
  daysOfWeek: [],
  validFrom: null,
  validUntil: null,
  capNanos: 0n,
};
