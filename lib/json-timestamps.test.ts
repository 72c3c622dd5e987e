import { expect, test } from "bun:test";
import { create, toJsonString } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { TimeRangeSchema } from "../gen/analytics/v1/analytics_pb.ts";
import { RecordUsageRequestSchema } from "../gen/billing/v1/billing_pb.ts";
import { checkJsonTimestamps, impossibleTimestamp } from "./json-timestamps.ts";

test("a date-time the calendar has passes; a day, hour or offset it does not have is named", () => {
  for (const text of [
    "2024-02-29T00:00:00Z",
    "2000-02-29T12:00:00Z",
    "2026-12-31T23:59:59.999999999Z",
    "0001-01-01T00:00:00Z",
    "2026-06-30T08:00:00+05:30",
    // Not of Timestamp's shape at all: the decoder's to refuse, in its own words.
    "yesterday",
  ]) {
    expect(impossibleTimestamp(text)).toBeUndefined();
  }
  expect(impossibleTimestamp("1900-02-29T00:00:00Z")).toBe("February 1900 has days 01..28");
  expect(impossibleTimestamp("2026-04-31T00:00:00Z")).toBe("April 2026 has days 01..30");
  expect(impossibleTimestamp("2026-01-00T00:00:00Z")).toBe("January 2026 has days 01..31");
  expect(impossibleTimestamp("2026-13-01T00:00:00Z")).toBe("its month is not 01..12");
  expect(impossibleTimestamp("2026-01-01T23:60:00Z")).toBe("its time of day is not within 00:00:00..23:59:59");
  expect(impossibleTimestamp("2026-01-01T23:59:60Z")).toBe("its time of day is not within 00:00:00..23:59:59");
  expect(impossibleTimestamp("2026-01-01T10:00:00+24:00")).toBe("its offset is not within 00:00..23:59");
});

test("a request's Timestamps are found wherever its schema has them, and the field is named", () => {
  const bytes = (json: unknown) => new TextEncoder().encode(JSON.stringify(json));
  const range = create(TimeRangeSchema, { start: timestampFromDate(new Date("2026-11-01T00:00:00Z")) });
  expect(() => checkJsonTimestamps(TimeRangeSchema, bytes(JSON.parse(toJsonString(TimeRangeSchema, range))))).not.toThrow();
  expect(() => checkJsonTimestamps(TimeRangeSchema, bytes({ start: "2026-11-31T00:00:00Z" }))).toThrow(
    'start: "2026-11-31T00:00:00Z" is no date-time: November 2026 has days 01..30',
  );
  // Under its JSON name or its proto name, in a list: as protobuf-es reads either.
  for (const record of [{ occurTime: "2026-02-29T00:00:00Z" }, { occur_time: "2026-02-29T00:00:00Z" }]) {
    expect(() => checkJsonTimestamps(RecordUsageRequestSchema, bytes({ records: [{}, record] }))).toThrow(
      'records[1].occur_time: "2026-02-29T00:00:00Z" is no date-time: February 2026 has days 01..28',
    );
  }
  // Not JSON, or not an object: left to the decoder.
  expect(() => checkJsonTimestamps(TimeRangeSchema, bytes("x").subarray(1))).not.toThrow();
  expect(() => checkJsonTimestamps(TimeRangeSchema, bytes([1, 2]))).not.toThrow();
});
