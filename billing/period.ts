export { billingPeriod } from "../lib/billing-period.ts";

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

/** "YYYY-MM-DD" of the UTC day of `at`, as Postgres `date` input. */
export function utcDate(at: Date): string {
  return at.toISOString().slice(0, 10);
}
