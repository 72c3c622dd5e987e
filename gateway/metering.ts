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

// Billing's usage records hold a model name of at most 200 characters.
const maxMeteredName = 200;
const controlCharacters = /[\u0000-\u001f\u007f]/g;

/**
 * A model name as a client asked for it (an unknown model is metered too) or as an upstream says it served it (any
 * string it likes), made fit for the metrics row: control characters replaced and cut to billing's bound, so the
 * row is never refused downstream nor grows with what others send.
 */
export function meteredName(name: string): string {
  const clean = name.replace(controlCharacters, "\ufffd");
  return clean.length <= maxMeteredName ? clean : [...clean].slice(0, maxMeteredName).join("");
}
