import { create } from "@bufbuild/protobuf";
import type { RequestMetrics } from "../gen/analytics/v1/analytics_pb.ts";
import { CostBreakdownSchema, TokenUsageSchema } from "../gen/common/v1/common_pb.ts";
import { costParts, type Price, type Tokens } from "../lib/money.ts";

/** Records a request's tokens and exact cost (with its per-token-type parts) in its metrics; returns the cost. */
export function meterUsage(metrics: RequestMetrics, tokens: Tokens, estimated: boolean, price: Price): bigint {
  const { totalNanos, ...parts } = costParts(tokens, price);
  metrics.usage = create(TokenUsageSchema, tokens);
  metrics.usageEstimated = estimated;
  metrics.costNanos = totalNanos;
  metrics.costBreakdown = create(CostBreakdownSchema, parts);
  return totalNanos;
}
