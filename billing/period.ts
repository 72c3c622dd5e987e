import type { TimeRange } from "./store/types.ts";

/** The billing period containing `at`: from day `billingDay` (1..28) 00:00 UTC of a month to that day of the next. */
export function billingPeriod(at: Date, billingDay: number): TimeRange {
  const year = at.getUTCFullYear();
  const month = at.getUTCDate() >= billingDay ? at.getUTCMonth() : at.getUTCMonth() - 1;
  // Date.UTC carries month -1 and 12 into the neighbouring years.
  return { start: new Date(Date.UTC(year, month, billingDay)), end: new Date(Date.UTC(year, month + 1, billingDay)) };
}

/** Midnight UTC at or before `at`. */
export function startOfUtcDay(at: Date): Date {
  return new Date(Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), at.getUTCDate()));
}

/** Midnight UTC at or after `at`. */
export function endOfUtcDay(at: Date): Date {
  const start = startOfUtcDay(at);
  return start.getTime() === at.getTime() ? start : new Date(start.getTime() + 86_400_000);
}

/** "YYYY-MM-DD" of the UTC day of `at`, as Postgres `date` input. */
export function utcDate(at: Date): string {
  return at.toISOString().slice(0, 10);
}
