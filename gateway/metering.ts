import { create } from "@bufbuild/protobuf";
import type { RequestMetrics } from "../gen/analytics/v1/analytics_pb.ts";
import { CostBreakdownSchema, TokenUsageSchema } from "../gen/common/v1/common_pb.ts";
import {
  type CostParts,
  costParts,
  MAX_COST_NANOS_PER_REQUEST,
  MAX_TOKENS_PER_REQUEST,
  type Price,
  type Tokens,
} from "../lib/money.ts";

/**
 * Records a request's tokens and exact cost (with its per-token-type parts) in its metrics; returns the cost.
 * `lostInputTokens` are the prompts of earlier attempts an upstream billed though their answer was lost: metered as
 * input on top, estimated.
 */
export function meterUsage(
  metrics: RequestMetrics,
  answered: Tokens,
  answeredEstimated: boolean,
  price: Price,
  lostInputTokens = 0,
): bigint {
  const tokens = withLostInput(answered, lostInputTokens);
  const estimated = answeredEstimated || lostInputTokens > 0;
  const { totalNanos, ...parts } = withinBound(costParts(tokens, price));
  metrics.usage = create(TokenUsageSchema, tokens);
  metrics.usageEstimated = estimated;
  metrics.costNanos = totalNanos;
  metrics.costBreakdown = create(CostBreakdownSchema, parts);
  return totalNanos;
}

/**
 * The tokens a request is metered at: those `answered`, and the prompts of lost attempts (see meterUsage) as input on
 * top, within the bound of a request's tokens. What its client is shown, as what it is charged.
 */
export function withLostInput(answered: Tokens, lostInputTokens = 0): Tokens {
  if (lostInputTokens <= 0) return answered;
  const input = answered.inputTokens + BigInt(lostInputTokens);
  return { ...answered, inputTokens: input < MAX_TOKENS_PER_REQUEST ? input : MAX_TOKENS_PER_REQUEST };
}

/**
 * A cost past the most billing takes for one request (tokens within their bounds at a price of over $465 per million
 * can reach it) is metered at that bound, its parts cut in order to add up to it, so the row is billed, not refused.
 */
function withinBound(cost: CostParts): CostParts {
  if (cost.totalNanos <= MAX_COST_NANOS_PER_REQUEST) return cost;
  let room = MAX_COST_NANOS_PER_REQUEST;
  const take = (part: bigint) => {
    const taken = part < room ? part : room;
    room -= taken;
    return taken;
  };
  return {
    inputNanos: take(cost.inputNanos),
    cachedInputNanos: take(cost.cachedInputNanos),
    outputNanos: take(cost.outputNanos),
    reasoningNanos: take(cost.reasoningNanos),
    totalNanos: MAX_COST_NANOS_PER_REQUEST,
  };
}

// Billing's usage records hold a model name of at most 200 characters, counted in Unicode's composed form (NFC).
const maxMeteredName = 200;
// What billing refuses in a name: control characters (C0, DEL, C1) and line or paragraph separators.
const controlCharacters = /[\p{Cc}\u2028\u2029]/gu;

const cut = (text: string) => (text.length <= maxMeteredName ? text : [...text].slice(0, maxMeteredName).join(""));

/**
 * A model name as a client asked for it (an unknown model is metered too) or as an upstream says it served it (any
 * string it likes), made fit for the metrics row as billing takes it: control characters replaced, in NFC, and cut
 * to billing's bound (once more after NFC, in which some characters take two or three), so the row is never refused
 * downstream nor grows with what others send.
 */
export function meteredName(name: string): string {
  return cut(cut(name).replace(controlCharacters, "\ufffd").normalize("NFC"));
}
