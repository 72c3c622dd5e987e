import { describe, expect, test } from "bun:test";
import { hourUs, microsText, minuteUs, planSources, textMicros } from "./rollups.ts";

const t0 = textMicros("2026-03-10 00:00:00");
const span = (from: number, to: number) => ({ from: t0 + from, to: t0 + to });

describe("planSources", () => {
  test("whole clean hours from the hour rollup, whole minutes around them, partial minutes raw", () => {
    const plan = planSources({
      start: t0 + 30 * minuteUs + 5,
      end: t0 + 3 * hourUs + 90_000_000,
      rolledUntil: t0 + 10 * hourUs,
      dirtyMinutes: [],
      hourly: true,
    });
    expect(plan).toEqual({
      hours: [span(hourUs, 3 * hourUs)],
      minutes: [span(31 * minuteUs, hourUs), span(3 * hourUs, 3 * hourUs + minuteUs)],
      raw: [span(30 * minuteUs + 5, 31 * minuteUs), span(3 * hourUs + minuteUs, 3 * hourUs + 90_000_000)],
    });
  });

  test("what is not rolled up yet and minutes awaiting recomputation are read raw", () => {
    const plan = planSources({
      start: t0,
      end: t0 + 3 * hourUs,
      rolledUntil: t0 + 2 * hourUs + 10 * minuteUs + 7,
      dirtyMinutes: [t0 + 5 * minuteUs, t0 + 6 * minuteUs, t0 + 5 * minuteUs, t0 + 9 * hourUs],
      hourly: true,
    });
    expect(plan).toEqual({
      // The first hour holds dirty minutes, so only the second is whole and clean.
      hours: [span(hourUs, 2 * hourUs)],
      minutes: [span(0, 5 * minuteUs), span(7 * minuteUs, hourUs), span(2 * hourUs, 2 * hourUs + 10 * minuteUs)],
      raw: [span(5 * minuteUs, 7 * minuteUs), span(2 * hourUs + 10 * minuteUs, 3 * hourUs)],
    });
  });

  test("without the hour rollup, minutes cover the whole rolled-up part", () => {
    const plan = planSources({ start: t0, end: t0 + 2 * hourUs, rolledUntil: t0 + 2 * hourUs, dirtyMinutes: [], hourly: false });
    expect(plan).toEqual({ hours: [], minutes: [span(0, 2 * hourUs)], raw: [] });
  });

  test("nothing rolled up, a window inside one minute, or too many dirty minutes: all raw", () => {
    const all = { hours: [], minutes: [], raw: [span(0, hourUs)] };
    expect(planSources({ start: t0, end: t0 + hourUs, rolledUntil: 0, dirtyMinutes: [], hourly: true })).toEqual(all);
    const dirty = Array.from({ length: 101 }, (_, i) => t0 + i * minuteUs);
    const wide = planSources({ start: t0, end: t0 + 2 * hourUs, rolledUntil: t0 + 2 * hourUs, dirtyMinutes: dirty, hourly: true });
    expect(wide).toEqual({ hours: [], minutes: [], raw: [span(0, 2 * hourUs)] });
    const inside = planSources({ start: t0 + 1, end: t0 + 2, rolledUntil: t0 + hourUs, dirtyMinutes: [], hourly: true });
    expect(inside.raw).toEqual([span(1, 2)]);
  });

  test("timestamps keep their microseconds through text", () => {
    const us = textMicros("2026-03-10 12:34:56.123456");
    expect(microsText(us)).toBe("2026-03-10 12:34:56.123456");
    // Before 1970 the fraction counts forward from the whole second below, as the date part does.
    expect(microsText(-500_000)).toBe("1969-12-31 23:59:59.500000");
    expect(textMicros(microsText(-1_999_999))).toBe(-1_999_999);
    expect(textMicros("2026-03-10 12:34:56")).toBe(us - 123456);
  });
});
