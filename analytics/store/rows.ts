import { create } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema } from "@bufbuild/protobuf/wkt";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { CostBreakdownSchema, Endpoint, TokenUsageSchema } from "../../gen/common/v1/common_pb.ts";

/** Columns of the requests table that mirror RequestMetrics, in table order. */
export const requestColumns = [
  "request_id",
  "trace_id",
  "span_id",
  "start_time",
  "first_token_time",
  "end_time",
  "org_id",
  "project_id",
  "api_key_id",
  "end_user_id",
  "provider",
  "requested_model",
  "served_model",
  "endpoint",
  "streamed",
  "status",
  "http_status",
  "error_code",
  "input_tokens",
  "cached_input_tokens",
  "output_tokens",
  "reasoning_tokens",
  "usage_estimated",
  "cost_nanos",
  "cost_input_nanos",
  "cost_cached_input_nanos",
  "cost_output_nanos",
  "cost_reasoning_nanos",
  "total_latency_us",
  "upstream_latency_us",
  "ttft_us",
  "gateway_overhead_us",
  "retries",
  "fallback_used",
  "gateway_instance_id",
  "tags",
] as const;

/** A requests row as JSONEachRow reads it: DateTime64 as text, Int64 as decimal strings. */
export type RequestRow = {
  [K in (typeof requestColumns)[number]]: K extends "first_token_time" | `cost_${string}_nanos`
    ? string | null
    : K extends "streamed" | "usage_estimated" | "fallback_used"
      ? boolean
      : K extends "http_status" | "retries"
        ? number
        : K extends "tags"
          ? Record<string, string>
          : string;
};

/**
 * A row's values in requestColumns order, as the store inserts them (JSONCompactEachRow). 64-bit integers go as JSON
 * numbers when a double holds them exactly (every count and cost within ingest's bounds), which is much cheaper than
 * formatting a bigint as text; larger ones as decimal strings.
 */
export function toRequestValues(m: RequestMetrics): unknown[] {
  const usage = m.usage;
  const parts = m.costBreakdown;
  // Keep this list in requestColumns order.
  return [
    m.requestId,
    m.traceId,
    m.spanId,
    toDateTime64(m.startTime),
    m.firstTokenTime ? toDateTime64(m.firstTokenTime) : null,
    toDateTime64(m.endTime),
    m.orgId,
    m.projectId,
    m.apiKeyId,
    m.endUserId,
    m.provider,
    m.requestedModel,
    m.servedModel,
    Endpoint[m.endpoint] ?? String(m.endpoint),
    m.streamed,
    statusName(m.status),
    m.httpStatus,
    m.errorCode,
    int64Value(usage?.inputTokens ?? 0n),
    int64Value(usage?.cachedInputTokens ?? 0n),
    int64Value(usage?.outputTokens ?? 0n),
    int64Value(usage?.reasoningTokens ?? 0n),
    m.usageEstimated,
    int64Value(m.costNanos),
    parts ? int64Value(parts.inputNanos) : null,
    parts ? int64Value(parts.cachedInputNanos) : null,
    parts ? int64Value(parts.outputNanos) : null,
    parts ? int64Value(parts.reasoningNanos) : null,
    int64Value(m.totalLatencyUs),
    int64Value(m.upstreamLatencyUs),
    int64Value(m.ttftUs),
    int64Value(m.gatewayOverheadUs),
    m.retries,
    m.fallbackUsed,
    m.gatewayInstanceId,
    m.tags,
  ];
}

/** A 64-bit integer for JSON input: a number when exact as a double, else its decimal text. */
function int64Value(value: bigint): number | string {
  const n = Number(value);
  // Past 2^53 - 1 the double rounds to 2^53 or beyond, so a safe integer here is the exact value.
  return Number.isSafeInteger(n) ? n : String(value);
}

export function fromRequestRow(row: RequestRow): RequestMetrics {
  return create(RequestMetricsSchema, {
    requestId: row.request_id,
    traceId: row.trace_id,
    spanId: row.span_id,
    startTime: fromDateTime64(row.start_time),
    firstTokenTime: row.first_token_time === null ? undefined : fromDateTime64(row.first_token_time),
    endTime: fromDateTime64(row.end_time),
    orgId: row.org_id,
    projectId: row.project_id,
    apiKeyId: row.api_key_id,
    endUserId: row.end_user_id,
    provider: row.provider,
    requestedModel: row.requested_model,
    servedModel: row.served_model,
    endpoint: enumValue(Endpoint, row.endpoint),
    streamed: row.streamed,
    status: enumValue(RequestStatus, row.status),
    httpStatus: row.http_status,
    errorCode: row.error_code,
    usage: create(TokenUsageSchema, {
      inputTokens: BigInt(row.input_tokens),
      cachedInputTokens: BigInt(row.cached_input_tokens),
      outputTokens: BigInt(row.output_tokens),
      reasoningTokens: BigInt(row.reasoning_tokens),
    }),
    usageEstimated: row.usage_estimated,
    costNanos: BigInt(row.cost_nanos),
    costBreakdown:
      row.cost_input_nanos === null
        ? undefined
        : create(CostBreakdownSchema, {
            inputNanos: BigInt(row.cost_input_nanos),
            cachedInputNanos: BigInt(row.cost_cached_input_nanos ?? 0),
            outputNanos: BigInt(row.cost_output_nanos ?? 0),
            reasoningNanos: BigInt(row.cost_reasoning_nanos ?? 0),
          }),
    totalLatencyUs: BigInt(row.total_latency_us),
    upstreamLatencyUs: BigInt(row.upstream_latency_us),
    ttftUs: BigInt(row.ttft_us),
    gatewayOverheadUs: BigInt(row.gateway_overhead_us),
    retries: row.retries,
    fallbackUsed: row.fallback_used,
    gatewayInstanceId: row.gateway_instance_id,
    tags: row.tags,
  });
}

/** The name stored in the status column, e.g. "OK", "RATE_LIMITED". */
export function statusName(status: RequestStatus): string {
  return RequestStatus[status] ?? String(status);
}

// Formatting a date is the costly part of a row; rows of a batch share a few seconds.
const secondsText = new Map<bigint, string>();

/** "YYYY-MM-DD hh:mm:ss.ffffff" in UTC: the text form of DateTime64(6, 'UTC'), exact to the microsecond. */
export function toDateTime64(ts: Timestamp | undefined): string {
  const seconds = ts?.seconds ?? 0n;
  const micros = Math.floor((ts?.nanos ?? 0) / 1000);
  let text = secondsText.get(seconds);
  if (text === undefined) {
    const iso = new Date(Number(seconds) * 1000).toISOString();
    text = `${iso.slice(0, 10)} ${iso.slice(11, 19)}`;
    if (secondsText.size >= 4096) secondsText.clear();
    secondsText.set(seconds, text);
  }
  return `${text}.${String(micros).padStart(6, "0")}`;
}

/** Parses DateTime64 or DateTime text in UTC ("YYYY-MM-DD hh:mm:ss[.ffffff]"). */
export function fromDateTime64(text: string): Timestamp {
  const ms = Date.parse(`${text.slice(0, 10)}T${text.slice(11, 19)}Z`);
  if (Number.isNaN(ms)) throw new Error(`not a ClickHouse timestamp: ${JSON.stringify(text)}`);
  const fraction = text.slice(20, 29).padEnd(9, "0");
  return create(TimestampSchema, { seconds: BigInt(ms / 1000), nanos: Number(fraction) });
}

function enumValue<E extends Record<string, string | number>>(e: E, name: string): number {
  const value = e[name];
  if (typeof value === "number") return value;
  const n = Number(name);
  return Number.isInteger(n) ? n : 0;
}
