/**
 * A model name a client chose (an unknown model's 404 is metered too) or an upstream sent reaches billing in the
 * request's usage record: whatever it was, billing must take the record, or the row is never billed and each one
 * counts as a usage record refused for good.
 */
import { expect, test } from "bun:test";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { toUsageRecord } from "../../analytics/ingest.ts";
import { sampleMetrics } from "../../analytics/store/test-store.ts";
import { usageRecordFrom } from "../../billing/messages.ts";
import { meteredName } from "../../gateway/metering.ts";
import { RequestMetricsSchema } from "../../gen/analytics/v1/analytics_pb.ts";

test("a model name of any characters is metered as one billing records, alike in ClickHouse and billing", () => {
  const names = [
    "mock\u0000",
    "\u0001\u001f\u007f",
    // C1 controls and line or paragraph separators, which billing refuses as it does C0 ones.
    "gpt-4o\u0085",
    "a\u009fb",
    "line\u2028para\u2029",
    "\ud800lone\udfff",
    // Each takes two or three characters in NFC, where billing counts 200 at most.
    "\u0344".repeat(150),
    "\ufb2c".repeat(100),
    "\u0958".repeat(200),
    // Decomposed: billing keeps names composed.
    "mode\u0301le",
    "\u{1F600}".repeat(100_000),
  ];
  const now = new Date();
  for (const name of names) {
    const metered = meteredName(name);
    // As it travels: encoded in the spool and on IngestMetrics.
    const row = fromBinary(RequestMetricsSchema, toBinary(RequestMetricsSchema, sampleMetrics(now, { requestedModel: metered })));
    const record = usageRecordFrom(toUsageRecord(row), "records[0]", now);
    expect(record.model).toBe(row.requestedModel);
    expect([...record.model].length).toBeLessThanOrEqual(200);
  }
  expect(meteredName("mode\u0301le")).toBe("mod\u00e9le");
  expect(meteredName("gpt-4o\u0085")).toBe("gpt-4o\ufffd");
});
