import { expect, test } from "bun:test";
import { billingPeriod, endOfUtcDay, startOfUtcDay, utcDate } from "./period.ts";

const iso = (range: { start: Date; end: Date }) => [range.start.toISOString(), range.end.toISOString()];

test("billing day 1 is the calendar month, across the year end", () => {
  expect(iso(billingPeriod(new Date("2026-12-31T23:59:59.999Z"), 1))).toEqual([
    "2026-12-01T00:00:00.000Z",
    "2027-01-01T00:00:00.000Z",
  ]);
  expect(iso(billingPeriod(new Date("2026-03-01T00:00:00Z"), 1))).toEqual([
    "2026-03-01T00:00:00.000Z",
    "2026-04-01T00:00:00.000Z",
  ]);
});

test("a later billing day starts the period in the previous month until that day", () => {
  expect(iso(billingPeriod(new Date("2026-01-14T12:00:00Z"), 15))).toEqual([
    "2025-12-15T00:00:00.000Z",
    "2026-01-15T00:00:00.000Z",
  ]);
  expect(iso(billingPeriod(new Date("2026-01-15T00:00:00Z"), 15))).toEqual([
    "2026-01-15T00:00:00.000Z",
    "2026-02-15T00:00:00.000Z",
  ]);
});

test("UTC day boundaries", () => {
  const at = new Date("2026-05-07T13:45:00Z");
  expect(startOfUtcDay(at).toISOString()).toBe("2026-05-07T00:00:00.000Z");
  expect(endOfUtcDay(at).toISOString()).toBe("2026-05-08T00:00:00.000Z");
  expect(endOfUtcDay(new Date("2026-05-07T00:00:00Z")).toISOString()).toBe("2026-05-07T00:00:00.000Z");
  expect(utcDate(at)).toBe("2026-05-07");
});

test("years 1..99 are years 1..99, not 1901..1999", () => {
  expect(iso(billingPeriod(new Date("0001-01-20T10:00:00Z"), 15))).toEqual([
    "0001-01-15T00:00:00.000Z",
    "0001-02-15T00:00:00.000Z",
  ]);
  expect(iso(billingPeriod(new Date("0099-12-31T10:00:00Z"), 1))).toEqual([
    "0099-12-01T00:00:00.000Z",
    "0100-01-01T00:00:00.000Z",
  ]);
  const at = new Date("0001-01-01T13:45:00Z");
  expect(startOfUtcDay(at).toISOString()).toBe("0001-01-01T00:00:00.000Z");
  expect(endOfUtcDay(at).toISOString()).toBe("0001-01-02T00:00:00.000Z");
  expect(startOfUtcDay(new Date("1969-12-31T23:59:59.999Z")).toISOString()).toBe("1969-12-31T00:00:00.000Z");
});

test("the day after 9999-12-31 is written as Postgres reads it, not as toISOString's +010000-01-01", () => {
  expect(utcDate(new Date("9999-12-31T23:59:59.999Z"))).toBe("9999-12-31");
  expect(utcDate(new Date(Date.parse("9999-12-31T23:59:59.999Z") + 1))).toBe("10000-01-01");
  expect(utcDate(new Date("0001-01-01T00:00:00Z"))).toBe("0001-01-01");
});
