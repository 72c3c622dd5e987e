import { create, type DescMessage, type MessageInitShape, type MessageShape, toBinary } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { Tracer } from "@opentelemetry/api";
import type { Registry } from "prom-client";
import {
  type AnalyticsService,
  QueryLatencyResponseSchema,
  QueryUsageResponseSchema,
  RequestStatus,
  type TimeRange,
  UsageGroupBy,
} from "../gen/analytics/v1/analytics_pb.ts";
import type { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import { connectionEndingKey } from "../lib/health.ts";
import { createOutageLog, type Logger, type OutageLog } from "../lib/log.ts";
import { maxAnswerBytes } from "../lib/message-limits.ts";
import { createAnalyticsAuth } from "./auth.ts";
import { createIngest, type IngestOptions } from "./ingest.ts";
import { ReportQueueFullError } from "./store/driver.ts";
import { microsText, textMicros } from "./store/rollups.ts";
import {
  type AnalyticsStore,
  type RequestCursor,
  type TimeWindow,
  TotalTooLargeError,
  type UsageDimension,
} from "./store/store.ts";

export interface AnalyticsServiceDeps {
  store: AnalyticsStore;
  billing: Client<typeof BillingService>;
  log: Logger;
  /** Bearer token required on every RPC (gateways and admin tools use it). */
  adminToken: string;
  registry?: Registry;
  tracer?: Tracer;
  /** Aborted on shutdown: ingest stops reading, flushes and acks what it holds, and ends its streams. */
  stopSignal?: AbortSignal;
  /** Flush size, interval and memory bound of ingest. */
  ingest?: Partial<IngestOptions>;
}

const maxRangeDays = 400;
const maxGroupBy = 3;
// A grouped usage answer larger than this is a mistake (e.g. hours x keys over a year); narrow the query.
const maxUsageRows = 100_000;
// An unknown model is recorded as the client sent it, so a client inventing names makes as many "models": past this
// many the answer would outgrow the 4 MiB a gRPC client takes by default.
const maxLatencyModels = 10_000;
const bucketWidths = new Set([60, 300, 3600, 86400]);
const maxBuckets = 2000;
const defaultPageSize = 100;
const maxQueriesPerOrg = 4;
// What ClickHouse's DateTime64 holds.
const nanosPerSecond = 1_000_000_000n;
const earliestNs = BigInt(Date.UTC(1900, 0, 1)) * 1_000_000n;
const endOfLatestNs = BigInt(Date.UTC(2300, 0, 1)) * 1_000_000n;

/** A timestamp's nanoseconds since 1970, exactly. */
const nanosOf = (at: Timestamp) => at.seconds * nanosPerSecond + BigInt(at.nanos);
const maxPageSize = 1000;

const dimensions: Partial<Record<UsageGroupBy, UsageDimension>> = {
  [UsageGroupBy.MODEL]: "model",
  [UsageGroupBy.API_KEY]: "api_key",
  [UsageGroupBy.PROJECT]: "project",
  [UsageGroupBy.PROVIDER]: "provider",
  [UsageGroupBy.STATUS]: "status",
  [UsageGroupBy.DAY]: "day",
  [UsageGroupBy.HOUR]: "hour",
};

export function createAnalyticsService(deps: AnalyticsServiceDeps): ServiceImpl<typeof AnalyticsService> {
  const { store } = deps;
  const ingest = createIngest({ ...deps, options: deps.ingest });
  const auth = createAnalyticsAuth({ adminToken: deps.adminToken, billing: deps.billing, log: deps.log });
  /** The org a query names, once the caller may read it. */
  const readable = async (ctx: HandlerContext, orgId: string) => {
    const org = requireOrg(orgId);
    await auth.requireOrgReader(ctx.requestHeader, org);
    return org;
  };

  // Every dashboard's queries fail alike while ClickHouse is down: that is logged as it starts and as it ends.
  const outage = createOutageLog(
    deps.log,
    {
      failed: "analytics query failed: clickhouse unavailable",
      recovered: "clickhouse answers analytics queries again",
    },
    "error",
  );
  // Report queries running per org: one key, a browser page's included, cannot tie up the engine every org shares.
  const running = new Map<string, number>();
  const report = async <T>(rpc: string, orgId: string, signal: AbortSignal, run: () => Promise<T>): Promise<T> => {
    const now = running.get(orgId) ?? 0;
    if (now >= maxQueriesPerOrg) {
      throw new ConnectError(`${maxQueriesPerOrg} queries of this organization are running; retry when one ends`, Code.ResourceExhausted);
    }
    running.set(orgId, now + 1);
    try {
      return await query(deps.log, rpc, run, signal, outage);
    } finally {
      const left = (running.get(orgId) ?? 1) - 1;
      if (left > 0) running.set(orgId, left);
      else running.delete(orgId);
    }
  };

  return {
    async *ingestMetrics(batches, ctx) {
      auth.requireAdmin(ctx.requestHeader);
      yield* ingest.handle(batches, ctx.values.get(connectionEndingKey));
    },

    async queryUsage(req, ctx) {
      const orgId = await readable(ctx, req.orgId);
      const window = parseRange(req.range);
      if (req.groupBy.length > maxGroupBy) invalid(`group_by allows at most ${maxGroupBy} dimensions`);
      if (new Set(req.groupBy).size !== req.groupBy.length) invalid("group_by repeats a dimension");
      const groupBy = req.groupBy.map((g) => dimensions[g] ?? invalid(`group_by ${g} is not a dimension`));
      const rows = await report("QueryUsage", orgId, ctx.signal, () =>
        store.queryUsage({ orgId, ...window, groupBy, limit: maxUsageRows + 1, signal: ctx.signal }),
      );
      const narrow = "narrow the range or group by fewer dimensions";
      if (rows.length > maxUsageRows) throw new ConnectError(`more than ${maxUsageRows} groups; ${narrow}`, Code.ResourceExhausted);
      return withinAnswerBytes(QueryUsageResponseSchema, { rows }, `${rows.length} groups`, narrow);
    },

    async queryTimeSeries(req, ctx) {
      const orgId = await readable(ctx, req.orgId);
      const window = parseRange(req.range);
      const bucketSeconds = Number(req.bucketSeconds);
      if (!bucketWidths.has(bucketSeconds)) invalid("bucket_seconds must be 60, 300, 3600 or 86400");
      // Buckets are aligned to the epoch: a range that starts inside one touches one more than its length holds.
      const width = bucketSeconds * 1000;
      const firstBucket = Math.floor(timestampMs(window.start) / width) * width;
      const buckets = Math.ceil((timestampMs(window.end) - firstBucket) / width);
      if (buckets > maxBuckets) invalid(`the range spans ${buckets} buckets; at most ${maxBuckets} are allowed`);
      const points = await report("QueryTimeSeries", orgId, ctx.signal, () =>
        store.queryTimeSeries({ orgId, ...window, bucketSeconds, model: req.model, signal: ctx.signal }),
      );
      return { points };
    },

    async queryLatency(req, ctx) {
      const orgId = await readable(ctx, req.orgId);
      const window = parseRange(req.range);
      const models = await report("QueryLatency", orgId, ctx.signal, () =>
        store.queryLatency({ orgId, ...window, limit: maxLatencyModels + 1, signal: ctx.signal }),
      );
      if (models.length > maxLatencyModels) {
        throw new ConnectError(`more than ${maxLatencyModels} requested models; narrow the range`, Code.ResourceExhausted);
      }
      return withinAnswerBytes(QueryLatencyResponseSchema, { models }, `${models.length} models`, "narrow the range");
    },

    async listRequests(req, ctx) {
      const orgId = await readable(ctx, req.orgId);
      // A lookup by request id may leave out the range; everything else is range-limited.
      const window = req.requestId && !req.range ? undefined : parseRange(req.range);
      const pageSize = req.pageSize === 0 ? defaultPageSize : req.pageSize;
      if (pageSize < 1 || pageSize > maxPageSize) invalid(`page_size must be 1..${maxPageSize}`);
      // A number the contract does not name matches no row: refused, as an unknown group_by is, not an empty page.
      if (!(req.status in RequestStatus)) invalid(`status ${req.status} is not a request status`);
      const scope = listingScope(orgId, req.model, req.apiKeyId, req.status, req.requestId);
      const after = req.pageToken ? decodePageToken(req.pageToken, scope) : undefined;
      const page = await report("ListRequests", orgId, ctx.signal, () =>
        store.listRequests({
          orgId,
          signal: ctx.signal,
          window,
          limit: pageSize,
          after,
          model: req.model || undefined,
          apiKeyId: req.apiKeyId || undefined,
          status: req.status || undefined,
          requestId: req.requestId || undefined,
        }),
      );
      return { requests: page.requests, nextPageToken: page.next ? encodePageToken(page.next, scope) : "" };
    },
  };
}

/**
 * A report's answer, refused (ResourceExhausted) when it takes more than maxAnswerBytes encoded: a gRPC client would
 * refuse it past 4 MiB, and a report has no pages to spread it over. `what` names its rows, `narrow` how to ask less.
 */
function withinAnswerBytes<Desc extends DescMessage>(
  schema: Desc,
  init: MessageInitShape<Desc>,
  what: string,
  narrow: string,
): MessageShape<Desc> {
  const answer = create(schema, init);
  const bytes = toBinary(schema, answer).byteLength;
  if (bytes > maxAnswerBytes) {
    const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
    throw new ConnectError(`the answer's ${what} take ${mib(bytes)}, more than ${mib(maxAnswerBytes)}; ${narrow}`, Code.ResourceExhausted);
  }
  return answer;
}

function invalid(message: string): never {
  throw new ConnectError(message, Code.InvalidArgument);
}

function requireOrg(orgId: string): string {
  return orgId || invalid("org_id is required");
}

function parseRange(range: TimeRange | undefined): TimeWindow {
  const start = range?.start;
  const end = range?.end;
  if (!start || !end) invalid("range.start and range.end are required");
  for (const [name, at] of [["start", start], ["end", end]] as const) {
    if (!(at.nanos >= 0 && at.nanos < 1_000_000_000)) invalid(`range.${name}.nanos must be 0..999999999`);
  }
  // Checked to the nanosecond as sent (timestampMs rounds to the nearest millisecond).
  for (const [name, at] of [["start", start], ["end", end]] as const) {
    const ns = nanosOf(at);
    if (!(ns >= earliestNs && ns < endOfLatestNs)) invalid(`range.${name} must be in the years 1900 to 2299`);
  }
  if (nanosOf(end) - nanosOf(start) > BigInt(maxRangeDays) * 86_400n * nanosPerSecond) {
    invalid(`range must be at most ${maxRangeDays} days`);
  }
  // Rows are stored to the microsecond: bounds rounded up to it select exactly the rows in [start, end).
  const window = { start: toMicrosecondAbove(start), end: toMicrosecondAbove(end) };
  if (nanosOf(window.end) <= nanosOf(window.start)) invalid("range.end must be after range.start (to the microsecond)");
  return window;
}

function toMicrosecondAbove(at: Timestamp): Timestamp {
  const nanos = Math.ceil(at.nanos / 1000) * 1000;
  return nanos === at.nanos
    ? at
    : create(TimestampSchema, nanos === 1_000_000_000 ? { seconds: at.seconds + 1n, nanos: 0 } : { seconds: at.seconds, nanos });
}

/**
 * Runs a store read; its failures reach the caller without ClickHouse internals: a query past the store's time or
 * memory limit as ResourceExhausted (asking less helps), as is one the engine has no room to queue (retrying later
 * helps), anything else as Unavailable. A store that cannot be reached goes to `outage`, once as it starts and once as
 * it ends; any other failure is logged each time.
 */
export async function query<T>(
  log: Logger,
  rpc: string,
  run: () => Promise<T>,
  signal?: AbortSignal,
  outage?: OutageLog,
): Promise<T> {
  try {
    const answer = await run();
    outage?.recovered({ rpc });
    return answer;
  } catch (e) {
    // The caller left, or its deadline passed, and its query was stopped: nothing failed, and nobody reads the answer.
    if (signal?.aborted) {
      if (ConnectError.from(signal.reason).code === Code.DeadlineExceeded) {
        throw new ConnectError("the query's deadline passed", Code.DeadlineExceeded);
      }
      throw new ConnectError("the caller cancelled the query", Code.Canceled);
    }
    if (e instanceof ReportQueueFullError) throw new ConnectError(e.message, Code.ResourceExhausted);
    if (e instanceof TotalTooLargeError) {
      throw new ConnectError(`${e.message}; narrow the range or group by more dimensions`, Code.OutOfRange);
    }
    if (timedOut(e)) {
      log.warn("analytics query ran out of time", { rpc });
      throw new ConnectError("the query ran out of time; narrow the range or group by fewer dimensions", Code.ResourceExhausted);
    }
    if (clickHouseError(e, "MEMORY_LIMIT_EXCEEDED", 241)) {
      log.warn("analytics query ran out of memory", { rpc });
      throw new ConnectError("the query ran out of memory; narrow the range or group by fewer dimensions", Code.ResourceExhausted);
    }
    if (outage && storeUnreachable(e)) outage.failed({ rpc, err: e });
    else log.error("analytics query failed", { rpc, err: e });
    throw new ConnectError("analytics store unavailable", Code.Unavailable);
  }
}

// How a socket says the server could not be reached or dropped the connection.
const connectionErrnos = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
]);
// ClickHouse's codes for a server that cannot serve any query now: TOO_MANY_SIMULTANEOUS_QUERIES, NETWORK_ERROR,
// ALL_CONNECTION_TRIES_FAILED (its replicas, on a cluster) and KEEPER_EXCEPTION.
const unavailableCodes = new Set(["202", "210", "279", "999"]);

/**
 * Whether `e` says ClickHouse could not be reached or serve now, as every query meets while it lasts: a connection
 * refused, reset or unresolved, no answer within @clickhouse/client's request timeout ("Timeout error."), or a server
 * out of query slots or out of reach of its replicas or Keeper.
 */
export function storeUnreachable(e: unknown): boolean {
  if (!(e instanceof Error)) return false;
  const { code } = e as { code?: unknown };
  return (
    (typeof code === "string" && (connectionErrnos.has(code) || unavailableCodes.has(code))) ||
    e.message === "Timeout error."
  );
}

/**
 * Whether ClickHouse stopped a query at its time limit (TIMEOUT_EXCEEDED), or before it as one it estimated would pass
 * the limit (TOO_SLOW: servers before max_estimated_execution_time estimate against max_execution_time once a query has
 * run 10 s).
 */
function timedOut(e: unknown): boolean {
  return clickHouseError(e, "TIMEOUT_EXCEEDED", 159) || clickHouseError(e, "TOO_SLOW", 160);
}

/**
 * Whether `e` is ClickHouse's error `name`, number `code`: chdb says the name in its message, @clickhouse/client moves
 * it into the error's `type` and the number into `code`.
 */
function clickHouseError(e: unknown, name: string, code: number): boolean {
  const fields = (typeof e === "object" && e !== null ? e : {}) as Record<string, unknown>;
  return fields.type === name || fields.code === String(code) || new RegExp(`\\b${name}\\b`).test(String(fields.message ?? e));
}

/**
 * What a ListRequests token is valid for: its org and filters. A token taken with other filters would start their
 * listing part way, leaving out their rows newer than it; the range and page size may change from page to page.
 */
export function listingScope(orgId: string, model: string, apiKeyId: string, status: number, requestId: string): string {
  return sha256Hex(JSON.stringify([orgId, model, apiKeyId, status, requestId])).slice(0, 16);
}

export function encodePageToken(cursor: RequestCursor, scope: string): string {
  return Buffer.from(JSON.stringify([cursor.startTime, cursor.requestId, scope])).toString("base64url");
}

export function decodePageToken(token: string, scope: string): RequestCursor {
  let issued: { cursor: RequestCursor; scope: string } | undefined;
  try {
    const value: unknown = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
    if (
      Array.isArray(value) &&
      value.length === 3 &&
      typeof value[0] === "string" &&
      /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$/.test(value[0]) &&
      typeof value[1] === "string" &&
      typeof value[2] === "string"
    ) {
      // A time this service wrote: it reads back as itself (no 13th month, no 25th hour) and in the years it holds.
      const us = textMicros(value[0]);
      const ns = BigInt(us) * 1000n;
      if (microsText(us) === value[0] && ns >= earliestNs && ns < endOfLatestNs) {
        issued = { cursor: { startTime: value[0], requestId: value[1] }, scope: value[2] };
      }
    }
  } catch {
    // Refused below.
  }
  if (!issued) invalid("page_token is not one this service issued");
  if (issued.scope !== scope) {
    invalid("page_token was issued for another org_id, model, api_key_id, status or request_id; start from the first page");
  }
  return issued.cursor;
}
