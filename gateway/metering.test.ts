import { expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { RequestMetricsSchema } from "../gen/analytics/v1/analytics_pb.ts";
import { MAX_COST_NANOS_PER_REQUEST, MAX_TOKENS_PER_REQUEST, parseUsdMicros } from "../lib/money.ts";
import { meterUsage } from "./metering.ts";

test("a request dearer than billing takes is metered at billing's bound, its parts adding up to it", () => {
  const usd = parseUsdMicros("1000");
  const price = { inputMicros: usd, cachedInputMicros: usd, outputMicros: usd, reasoningMicros: usd };
  const most = MAX_TOKENS_PER_REQUEST;
  const metrics = create(RequestMetricsSchema);
  const cost = meterUsage(metrics, { inputTokens: most, cachedInputTokens: 0n, outputTokens: most, reasoningTokens: 0n }, false, price);
  expect(cost).toBe(MAX_COST_NANOS_PER_REQUEST);
  expect(metrics.costNanos).toBe(MAX_COST_NANOS_PER_REQUEST);
  const parts = metrics.costBreakdown;
  expect(parts?.inputNanos).toBe(MAX_COST_NANOS_PER_REQUEST);
  expect([parts?.cachedInputNanos, parts?.outputNanos, parts?.reasoningNanos]).toEqual([0n, 0n, 0n]);
  // The tokens stay as metered.
  expect(metrics.usage?.outputTokens).toBe(most);

  // Below the bound nothing changes.
  const cheap = create(RequestMetricsSchema);
  expect(meterUsage(cheap, { inputTokens: 1000n, cachedInputTokens: 0n, outputTokens: 500n, reasoningTokens: 0n }, false, price)).toBe(
    1_500_000_000n,
  );
  expect(cheap.costBreakdown?.outputNanos).toBe(500_000_000n);
});
