/** The billing period containing `at`: from day `billingDay` (1..28) 00:00 UTC of a month to that day of the next. */
export function billingPeriod(at: Date, billingDay: number): { start: Date; end: Date } {
  const year = at.getUTCFullYear();
  const month = at.getUTCDate() >= billingDay ? at.getUTCMonth() : at.getUTCMonth() - 1;
  // setUTCFullYear carries month -1 and 12 into the neighbouring years and, unlike Date.UTC, keeps years 0..99.
  const dayOf = (m: number) => new Date(new Date(0).setUTCFullYear(year, m, billingDay));
  return { start: dayOf(month), end: dayOf(month + 1) };
}
