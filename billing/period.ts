export { billingPeriod } from "../lib/billing-period.ts";

/**
 * How far ahead of billing's clocks a gateway's clock may run: a usage record dated further is dated at billing's clock
 * (it would lie outside every current period), and a lease whose life ended this long before a period began still
 * counts in that period, as its gateway may have dated its spend there.
 */
export const maxUsageClockSkewMs = 10 * 60_000;

const dayMs = 86_400_000;

/** Midnight UTC at or before `at`. */
export function startOfUtcDay(at: Date): Date {
  // Floored also before 1970; Date.UTC would read years 0..99 as 1900..1999.
  return new Date(at.getTime() - (((at.getTime() % dayMs) + dayMs) % dayMs));
}

/** Midnight UTC at or after `at`. */
export function endOfUtcDay(at: Date): Date {
  const start = startOfUtcDay(at);
  return start.getTime() === at.getTime() ? start : new Date(start.getTime() + dayMs);
}

/**
 * "YYYY-MM-DD" of the UTC day of `at`, as Postgres `date` input; the end of year 9999, which a range rounded up to the
 * millisecond may reach, is "10000-01-01" (toISOString writes "+010000-01-01T...").
 */
export function utcDate(at: Date): string {
  return at.toISOString().replace(/^\+0*/, "").slice(0, -14);
}
