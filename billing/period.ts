export { billingPeriod } from "../lib/billing-period.ts";

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
