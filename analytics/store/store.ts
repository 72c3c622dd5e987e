import { create } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  type LatencyPercentiles,
  LatencyPercentilesSchema,
  type ModelLatency,
  ModelLatencySchema,
  type RequestMetrics,
  type RequestStatus,
  type TimeSeriesPoint,
  TimeSeriesPointSchema,
  type UsageRow,
  UsageRowSchema,
} from "../../gen/analytics/v1/analytics_pb.ts";
import { TokenUsageSchema } from "../../gen/common/v1/common_pb.ts";
import type { ClickHouseDriver, QueryParams } from "./driver.ts";
import { migrate } from "./migrate.ts";
import {
  fromDateTime64,
  fromRequestRow,
  type RequestRow,
  requestColumns,
  statusName,
  toDateTime64,
  toRequestRow,
} from "./rows.ts";

/** [start, end) of request start times. */
export interface TimeWindow {
  start: Timestamp;
  end: Timestamp;
}

export type UsageDimension = "model" | "api_key" | "project" | "provider" | "status" | "day" | "hour";

export interface UsageQuery extends TimeWindow {
  orgId: string;
  groupBy: readonly UsageDimension[];
  /** Most groups returned. */
  limit: number;
}

export interface TimeSeriesQuery extends TimeWindow {
  orgId: string;
  bucketSeconds: number;
  /** Requested model to keep; empty for all. */
  model: string;
}

export interface LatencyQuery extends TimeWindow {
  orgId: string;
}

/** Position after the last row of a page, newest first. */
export interface RequestCursor {
  /** start_time as DateTime64 text. */
  startTime: string;
  requestId: string;
}

export interface RequestsQuery {
  orgId: string;
  /** Optional only for a lookup by request id. */
  window?: TimeWindow;
  limit: number;
  after?: RequestCursor;
  model?: string;
  apiKeyId?: string;
  status?: RequestStatus;
  requestId?: string;
}

export interface RequestPage {
  requests: RequestMetrics[];
  /** Set when more rows may follow. */
  next?: RequestCursor;
}

/** ClickHouse storage of request metrics. Every read counts each request_id once, merged or not. */
export interface AnalyticsStore {
  /** Creates the database, applies pending migrations and the configured retention; returns versions applied now. */
  migrate(): Promise<string[]>;
  /** Writes rows; a retry with the same dedupToken is a no-op, and any duplicate request_id is read once. */
  insertRequests(rows: readonly RequestMetrics[], dedupToken: string): Promise<void>;
  queryUsage(query: UsageQuery): Promise<UsageRow[]>;
  queryTimeSeries(query: TimeSeriesQuery): Promise<TimeSeriesPoint[]>;
  queryLatency(query: LatencyQuery): Promise<ModelLatency[]>;
  listRequests(query: RequestsQuery): Promise<RequestPage>;
  ping(): Promise<void>;
  close(): Promise<void>;
}

export interface StoreOptions {
  /** ClickHouse database holding the tables; a plain identifier. */
  database: string;
  /** Rows older than this many days (by start_time) are dropped. */
  ttlDays: number;
}

const dimensionSql: Record<UsageDimension, string> = {
  model: "requested_model",
  api_key: "api_key_id",
  project: "project_id",
  provider: "provider",
  status: "status",
  day: "formatDateTime(toStartOfDay(start_time), '%Y-%m-%dT%H:%i:%SZ')",
  hour: "formatDateTime(toStartOfHour(start_time), '%Y-%m-%dT%H:%i:%SZ')",
};

const orgWindow =
  "org_id = {org_id:String} AND start_time >= {start:DateTime64(6, 'UTC')} AND start_time < {end:DateTime64(6, 'UTC')}";

// NaN (no values, e.g. no streamed requests) becomes 0.
const percentiles = (expr: string) =>
  `arrayMap(x -> if(isNaN(x), 0, toInt64(round(x))), quantiles(0.5, 0.9, 0.99)(${expr}))`;
const percentilesIf = (expr: string, cond: string) =>
  `arrayMap(x -> if(isNaN(x), 0, toInt64(round(x))), quantilesIf(0.5, 0.9, 0.99)(${expr}, ${cond}))`;

export function createAnalyticsStore(driver: ClickHouseDriver, options: StoreOptions): AnalyticsStore {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(options.database)) {
    throw new Error(`invalid ClickHouse database name: ${JSON.stringify(options.database)}`);
  }
  if (!Number.isInteger(options.ttlDays) || options.ttlDays < 1) {
    throw new Error(`invalid TTL: ${options.ttlDays} days`);
  }
  const db = options.database;
  const requests = `${db}.requests`;
  const windowParams = (q: { orgId: string } & TimeWindow): QueryParams => ({
    org_id: q.orgId,
    start: toDateTime64(q.start),
    end: toDateTime64(q.end),
  });

  async function applyRetention(): Promise<void> {
    const [table] = await driver.query<{ engine_full: string }>(
      "SELECT engine_full FROM system.tables WHERE database = {database:String} AND name = 'requests'",
      { database: db },
    );
    if (!table || table.engine_full.includes(`toIntervalDay(${options.ttlDays})`)) return;
    await driver.exec(`ALTER TABLE ${requests} MODIFY TTL toDateTime(start_time) + INTERVAL ${options.ttlDays} DAY`);
  }

  return {
    async migrate() {
      const applied = await migrate(driver, { database: db, vars: { ttl_days: options.ttlDays } });
      await applyRetention();
      return applied;
    },

    async insertRequests(rows, dedupToken) {
      if (rows.length === 0) return;
      const values = rows.map((m) => {
        const row = toRequestRow(m);
        return requestColumns.map((column) => row[column]);
      });
      await driver.insert(requests, requestColumns, values, { insert_deduplication_token: dedupToken });
    },

    async queryUsage(q) {
      const groups = q.groupBy.map((d, i) => `${dimensionSql[d]} AS g${i}`);
      const names = q.groupBy.map((_, i) => `g${i}`);
      const grouping = names.length > 0 ? `GROUP BY ${names.join(", ")} ORDER BY ${names.join(", ")}` : "";
      const rows = await driver.query<{
        groups: string[];
        requests: string;
        input_tokens: string;
        cached_input_tokens: string;
        output_tokens: string;
        reasoning_tokens: string;
        cost_nanos: string;
        errors: string;
      }>(
        `SELECT ${[...groups, `[${names.join(", ")}] AS groups`].join(", ")},
           count() AS requests,
           sum(input_tokens) AS input_tokens,
           sum(cached_input_tokens) AS cached_input_tokens,
           sum(output_tokens) AS output_tokens,
           sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_nanos) AS cost_nanos,
           countIf(status != 'OK') AS errors
         FROM ${requests} FINAL
         WHERE ${orgWindow}
         ${grouping}
         LIMIT {limit:UInt32}`,
        { ...windowParams(q), limit: q.limit },
      );
      return rows.map((r) =>
        create(UsageRowSchema, {
          group: r.groups,
          requests: BigInt(r.requests),
          usage: create(TokenUsageSchema, {
            inputTokens: BigInt(r.input_tokens),
            cachedInputTokens: BigInt(r.cached_input_tokens),
            outputTokens: BigInt(r.output_tokens),
            reasoningTokens: BigInt(r.reasoning_tokens),
          }),
          costNanos: BigInt(r.cost_nanos),
          errors: BigInt(r.errors),
        }),
      );
    },

    async queryTimeSeries(q) {
      const rows = await driver.query<{
        bucket_start: string;
        requests: string;
        input_tokens: string;
        output_tokens: string;
        cost_nanos: string;
        errors: string;
      }>(
        `SELECT toStartOfInterval(start_time, toIntervalSecond({bucket_seconds:UInt32})) AS bucket_start,
           count() AS requests,
           sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           sum(cost_nanos) AS cost_nanos,
           countIf(status != 'OK') AS errors
         FROM ${requests} FINAL
         WHERE ${orgWindow} AND ({model:String} = '' OR requested_model = {model:String})
         GROUP BY bucket_start
         ORDER BY bucket_start`,
        { ...windowParams(q), bucket_seconds: q.bucketSeconds, model: q.model },
      );
      return rows.map((r) =>
        create(TimeSeriesPointSchema, {
          bucketStart: fromDateTime64(r.bucket_start),
          requests: BigInt(r.requests),
          inputTokens: BigInt(r.input_tokens),
          outputTokens: BigInt(r.output_tokens),
          costNanos: BigInt(r.cost_nanos),
          errors: BigInt(r.errors),
        }),
      );
    },

    async queryLatency(q) {
      type Triple = [string, string, string];
      const rows = await driver.query<{
        model: string;
        requests: string;
        total: Triple;
        upstream: Triple;
        ttft: Triple;
        overhead: Triple;
      }>(
        `SELECT requested_model AS model,
           count() AS requests,
           ${percentiles("total_latency_us")} AS total,
           ${percentiles("upstream_latency_us")} AS upstream,
           ${percentilesIf("ttft_us", "streamed AND ttft_us > 0")} AS ttft,
           ${percentiles("gateway_overhead_us")} AS overhead
         FROM ${requests} FINAL
         WHERE ${orgWindow}
         GROUP BY model
         ORDER BY model`,
        windowParams(q),
      );
      const toPercentiles = ([p50, p90, p99]: Triple): LatencyPercentiles =>
        create(LatencyPercentilesSchema, { p50Us: BigInt(p50), p90Us: BigInt(p90), p99Us: BigInt(p99) });
      return rows.map((r) =>
        create(ModelLatencySchema, {
          model: r.model,
          requests: BigInt(r.requests),
          total: toPercentiles(r.total),
          upstream: toPercentiles(r.upstream),
          timeToFirstToken: toPercentiles(r.ttft),
          gatewayOverhead: toPercentiles(r.overhead),
        }),
      );
    },

    async listRequests(q) {
      const where = ["org_id = {org_id:String}"];
      const params: QueryParams = { org_id: q.orgId, limit: q.limit + 1 };
      if (q.window) {
        where.push("start_time >= {start:DateTime64(6, 'UTC')} AND start_time < {end:DateTime64(6, 'UTC')}");
        params.start = toDateTime64(q.window.start);
        params.end = toDateTime64(q.window.end);
      }
      if (q.model) {
        where.push("requested_model = {model:String}");
        params.model = q.model;
      }
      if (q.apiKeyId) {
        where.push("api_key_id = {api_key_id:String}");
        params.api_key_id = q.apiKeyId;
      }
      if (q.status) {
        where.push("status = {status:String}");
        params.status = statusName(q.status);
      }
      if (q.requestId) {
        where.push("request_id = {request_id:String}");
        params.request_id = q.requestId;
      }
      if (q.after) {
        where.push("(start_time, request_id) < ({after_time:DateTime64(6, 'UTC')}, {after_id:String})");
        params.after_time = q.after.startTime;
        params.after_id = q.after.requestId;
      }
      const rows = await driver.query<RequestRow>(
        `SELECT ${requestColumns.join(", ")}
         FROM ${requests} FINAL
         WHERE ${where.join(" AND ")}
         ORDER BY start_time DESC, request_id DESC
         LIMIT {limit:UInt32}`,
        params,
      );
      const page = rows.slice(0, q.limit);
      const last = page.at(-1);
      return {
        requests: page.map(fromRequestRow),
        next: rows.length > q.limit && last ? { startTime: last.start_time, requestId: last.request_id } : undefined,
      };
    },

    ping: () => driver.ping(),
    close: () => driver.close(),
  };
}
