/** The billing period containing `at`: from day `billingDay` (1..28) 00:00 UTC of a month to that day of the next. */
export function billingPeriod(at: Date, billingDay: number): { start: Date; end: Date } {
  const year = at.getUTCFullYear();
  const month = at.getUTCDate() >= billingDay ? at.getUTCMonth() : at.getUTCMonth() - 1;
  // Date.UTC carries month -1 and 12 into the neighbouring years.
  return { start: new Date(Date.UTC(year, month, billingDay)), end: new Date(Date.UTC(year, month + 1, billingDay)) };
}
