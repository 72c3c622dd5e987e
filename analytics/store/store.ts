import { create, toBinary } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  type LatencyPercentiles,
  LatencyPercentilesSchema,
  type ModelLatency,
  ModelLatencySchema,
  type RequestMetrics,
  RequestMetricsSchema,
  type RequestStatus,
  type TimeSeriesPoint,
  TimeSeriesPointSchema,
  type UsageRow,
  UsageRowSchema,
} from "../../gen/analytics/v1/analytics_pb.ts";
import { TokenUsageSchema } from "../../gen/common/v1/common_pb.ts";
import { maxAnswerBytes } from "../../lib/message-limits.ts";
import type { ClickHouseDriver, QueryParams } from "./driver.ts";
import { migrate } from "./migrate.ts";
import { createRollups, micros, microsText, planSources, type RollupResult, type Span, totalsSql } from "./rollups.ts";
import {
  fromDateTime64,
  fromRequestRow,
  type RequestRow,
  requestColumns,
  statusName,
  toDateTime64,
  toRequestValues,
} from "./rows.ts";

/** [start, end) of request start times. */
export interface TimeWindow {
  start: Timestamp;
  end: Timestamp;
}

export type UsageDimension = "model" | "api_key" | "project" | "provider" | "status" | "day" | "hour";

/** A query a caller waits for; `signal` aborts when the caller leaves (see ClickHouseDriver.query). */
export interface ReportQuery {
  orgId: string;
  signal?: AbortSignal;
}

export interface UsageQuery extends TimeWindow, ReportQuery {
  groupBy: readonly UsageDimension[];
  /** Most groups returned. */
  limit: number;
}

export interface TimeSeriesQuery extends TimeWindow, ReportQuery {
  bucketSeconds: number;
  /** Requested model to keep; empty for all. */
  model: string;
}

export interface LatencyQuery extends TimeWindow, ReportQuery {
  /** Most models returned. */
  limit: number;
}

/** Position after the last row of a page, newest first. */
export interface RequestCursor {
  /** start_time as DateTime64 text. */
  startTime: string;
  requestId: string;
}

export interface RequestsQuery extends ReportQuery {
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

/**
 * Most a page of requests holds, encoded (see maxAnswerBytes): a row may carry 16 tags of up to 2 KB each, so 1,000
 * of them could be 40 MB. A page holds as many rows as fit (one at least); the rest follow it.
 */
export const maxRequestPageBytes = maxAnswerBytes;

/** ClickHouse storage of request metrics. Every read counts each request_id once, merged or not. */
export interface AnalyticsStore {
  /** Creates the database, applies pending migrations and the configured retention; returns versions applied now. */
  migrate(): Promise<string[]>;
  /**
   * Parts of the database ClickHouse set aside on its own (`system.detached_parts` with a reason: a part found damaged
   * at start, say): their rows are missing from every report, though billing recorded them. Parts an operator
   * detached (no reason) are not counted.
   */
  detachedParts(): Promise<{ table: string; name: string; reason: string }[]>;
  /** Writes rows; a retry with the same dedupToken is a no-op, and any duplicate request_id is read once. */
  insertRequests(rows: readonly RequestMetrics[], dedupToken: string): Promise<void>;
  /**
   * Rolls up closed minutes into the per-minute and per-hour tables and recomputes minutes late rows reached; stops
   * between a backlog's chunks once `signal` aborts.
   */
  rollUp(now?: Date, signal?: AbortSignal): Promise<RollupResult>;
  queryUsage(query: UsageQuery): Promise<UsageRow[]>;
  queryTimeSeries(query: TimeSeriesQuery): Promise<TimeSeriesPoint[]>;
  queryLatency(query: LatencyQuery): Promise<ModelLatency[]>;
  listRequests(query: RequestsQuery): Promise<RequestPage>;
  ping(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

export interface StoreOptions {
  /** ClickHouse database holding the tables; a plain identifier. */
  database: string;
  /** Rows older than this many days (by start_time) are dropped. */
  ttlDays: number;
  /** A ClickHouse cluster: tables are Replicated per shard, queried through Distributed tables. */
  cluster?: string;
  /** Minutes are rolled up once they are this old; rows arriving later than half of it are recomputed in. */
  rollupLagMs?: number;
  /** Raw rows one roll-up statement reads at most (defaultRollupChunkRows); smaller in tests. */
  rollupChunkRows?: number;
  /** How long one report query may run (ClickHouse's max_execution_time); the driver's need, or 30 s, by default. */
  queryTimeoutSeconds?: number;
}

export const defaultRollupLagMs = 5 * 60_000;
/**
 * Longest retention, about 50 years. A TTL is a DateTime, which ends in February 2106 and wraps past it: with a
 * retention reaching beyond that (29,000 days from 2026), every row was expired on arrival and dropped as it was
 * inserted, acked and never seen.
 */
export const maxTtlDays = 18_250;
/** How long a report query may run in ClickHouse by default (max_execution_time). */
export const defaultQueryTimeoutSeconds = 30;

// Over the union of raw rows and rollups (see usageSources), where t is a row's start or its bucket's.
const dimensionSql: Record<UsageDimension, string> = {
  model: "requested_model",
  api_key: "api_key_id",
  project: "project_id",
  provider: "provider",
  status: "status",
  day: "formatDateTime(toStartOfDay(t), '%Y-%m-%dT%H:%i:%SZ')",
  hour: "formatDateTime(toStartOfHour(t), '%Y-%m-%dT%H:%i:%SZ')",
};

const identifier = /^[A-Za-z_][A-Za-z0-9_]*$/;

const maxInt64 = 2n ** 63n - 1n;

/** A total past the int64 a reply holds. */
export class TotalTooLargeError extends Error {}

/**
 * An exact total (summed over Int128) as the int64 the reply holds. Past it only at absurd scale (over 9,000 requests
 * at the most billing takes for one): refused, never wrapped.
 */
function int64(total: string, field: string): bigint {
  const value = BigInt(total);
  if (value > maxInt64) throw new TotalTooLargeError(`the total ${field} of the range is past int64`);
  return value;
}

const orgWindow =
  "org_id = {org_id:String} AND start_time >= {start:DateTime64(6, 'UTC')} AND start_time < {end:DateTime64(6, 'UTC')}";

// NaN (no values, e.g. no streamed requests) becomes 0.
const percentiles = (expr: string) =>
  `arrayMap(x -> if(isNaN(x), 0, toInt64(round(x))), quantiles(0.5, 0.9, 0.99)(${expr}))`;
const percentilesIf = (expr: string, cond: string) =>
  `arrayMap(x -> if(isNaN(x), 0, toInt64(round(x))), quantilesIf(0.5, 0.9, 0.99)(${expr}, ${cond}))`;

export function createAnalyticsStore(driver: ClickHouseDriver, options: StoreOptions): AnalyticsStore {
  if (!identifier.test(options.database)) {
    throw new Error(`invalid ClickHouse database name: ${JSON.stringify(options.database)}`);
  }
  if (options.cluster !== undefined && !identifier.test(options.cluster)) {
    throw new Error(`invalid ClickHouse cluster name: ${JSON.stringify(options.cluster)}`);
  }
  if (!Number.isInteger(options.ttlDays) || options.ttlDays < 1 || options.ttlDays > maxTtlDays) {
    throw new Error(`invalid TTL: ${options.ttlDays} days (1 to ${maxTtlDays})`);
  }
  const queryTimeoutSeconds = options.queryTimeoutSeconds ?? driver.reportTimeoutSeconds ?? defaultQueryTimeoutSeconds;
  if (!(queryTimeoutSeconds > 0)) throw new Error(`invalid query timeout: ${queryTimeoutSeconds} s`);
  // Reports read what callers choose (ranges of up to 400 days): each gets a time limit in the engine itself.
  const reportLimits = `SETTINGS max_execution_time = ${queryTimeoutSeconds}`;
  const db = options.database;
  const { cluster } = options;
  const requests = `${db}.requests`;
  const local = (table: string) => (cluster ? `${db}.${table}_local` : `${db}.${table}`);
  const rollups = createRollups(
    driver,
    {
      requests,
      minutes: `${db}.requests_1m`,
      hours: `${db}.requests_1h`,
      dirty: `${db}.rollup_dirty`,
      state: `${db}.rollup_state`,
    },
    options.rollupLagMs ?? defaultRollupLagMs,
    options.rollupChunkRows,
    cluster !== undefined,
  );
  // A Distributed insert returns only once every shard has its rows, so an ack means they are stored. A flush may hold
  // rows of any month ingest takes (a gateway's clock astray): past ClickHouse's 100 partitions per insert it failed
  // at every resend, and with it every other gateway's batches flushed alongside.
  const insertSettings: Record<string, string> = {
    max_partitions_per_insert_block: "0",
    ...(cluster ? { distributed_foreground_insert: "1" } : {}),
  };
  const windowParams = (q: { orgId: string } & TimeWindow): QueryParams => ({
    org_id: q.orgId,
    start: toDateTime64(q.start),
    end: toDateTime64(q.end),
  });

  async function applyRetention(): Promise<void> {
    const ttlColumns: [string, string][] = [
      ["requests", "toDateTime(start_time)"],
      ["requests_1m", "minute"],
      ["requests_1h", "hour"],
    ];
    for (const [name, column] of ttlColumns) {
      const [table] = await driver.query<{ engine_full: string }>(
        "SELECT engine_full FROM system.tables WHERE database = {database:String} AND name = {name:String}",
        { database: db, name: cluster ? `${name}_local` : name },
      );
      if (!table || table.engine_full.includes(`toIntervalDay(${options.ttlDays})`)) continue;
      await driver.exec(
        `ALTER TABLE ${local(name)}${cluster ? ` ON CLUSTER ${cluster}` : ""} MODIFY TTL ${column} + INTERVAL ${options.ttlDays} DAY`,
      );
    }
  }

  /** The driver's table settings on every MergeTree table of the database, those a migration just made included. */
  async function applyTableSettings(): Promise<void> {
    const settings = driver.tableSettings;
    if (!settings) return;
    const tables = await driver.query<{ name: string; engine_full: string }>(
      "SELECT name, engine_full FROM system.tables WHERE database = {database:String} AND engine LIKE '%MergeTree'",
      { database: db },
    );
    for (const table of tables) {
      if (table.engine_full.includes(settings)) continue;
      await driver.exec(`ALTER TABLE ${db}.${table.name} MODIFY SETTING ${settings}`);
    }
  }

  /**
   * The rows of an org's window as (t, dimensions, n requests, tokens, cost): whole hours and minutes from the
   * rollups where they are complete, everything else from the raw table. `hourly` allows the hour rollup.
   */
  async function usageSources(
    q: { orgId: string } & TimeWindow,
    hourly: boolean,
    extraWhere = "",
  ): Promise<{ sql: string; params: QueryParams }> {
    const start = micros(q.start);
    const end = micros(q.end);
    const rolledUntil = (await rollups.rolledUntil()) ?? 0;
    const dirtyMinutes = rolledUntil > start ? await rollups.dirtyMinutes(q.orgId, start, Math.min(end, rolledUntil)) : [];
    const plan = planSources({ start, end, rolledUntil, dirtyMinutes, hourly });
    const params: QueryParams = { org_id: q.orgId };
    const within = (column: string, spans: Span[], prefix: string) =>
      spans
        .map((span, i) => {
          params[`${prefix}${i}_from`] = microsText(span.from);
          params[`${prefix}${i}_to`] = microsText(span.to);
          return `(${column} >= {${prefix}${i}_from:DateTime64(6, 'UTC')} AND ${column} < {${prefix}${i}_to:DateTime64(6, 'UTC')})`;
        })
        .join(" OR ");
    const columns = "project_id, api_key_id, requested_model, provider, status";
    const totals = "input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos";
    const parts: string[] = [];
    if (plan.hours.length > 0) {
      parts.push(`SELECT toDateTime64(hour, 6, 'UTC') AS t, ${columns}, requests AS n, ${totals}
        FROM ${db}.requests_1h FINAL
        WHERE org_id = {org_id:String} AND (${within("hour", plan.hours, "h")})${extraWhere}`);
    }
    if (plan.minutes.length > 0) {
      parts.push(`SELECT toDateTime64(minute, 6, 'UTC') AS t, ${columns}, requests AS n, ${totals}
        FROM ${db}.requests_1m FINAL
        WHERE org_id = {org_id:String} AND (${within("minute", plan.minutes, "m")})${extraWhere}`);
    }
    if (plan.raw.length > 0) {
      parts.push(`SELECT start_time AS t, ${columns}, toUInt64(1) AS n, ${totals}
        FROM ${requests} FINAL
        WHERE org_id = {org_id:String} AND (${within("start_time", plan.raw, "r")})${extraWhere}`);
    }
    return { sql: parts.join("\n UNION ALL \n"), params };
  }

  return {
    async migrate() {
      const applied = await migrate(driver, { database: db, cluster, vars: { ttl_days: options.ttlDays } });
      await applyRetention();
      await applyTableSettings();
      return applied;
    },

    detachedParts() {
      return driver.query<{ table: string; name: string; reason: string }>(
        `SELECT table, name, reason FROM system.detached_parts
         WHERE database = {database:String} AND reason != '' ORDER BY table, name`,
        { database: db },
      );
    },

    async insertRequests(rows, dedupToken) {
      if (rows.length === 0) return;
      await driver.insert(requests, requestColumns, rows.map(toRequestValues), {
        ...insertSettings,
        insert_deduplication_token: dedupToken,
      });
      // After the rows, so a mark that is visible always has its rows visible too.
      const marks = await rollups.lateMarks(rows);
      if (marks.length > 0) await driver.insert(`${db}.rollup_dirty`, ["org_id", "minute"], marks);
    },

    rollUp: (now, signal) => rollups.rollUp(now, signal),

    async queryUsage(q) {
      const groups = q.groupBy.map((d, i) => `${dimensionSql[d]} AS g${i}`);
      const names = q.groupBy.map((_, i) => `g${i}`);
      const grouping = names.length > 0 ? `GROUP BY ${names.join(", ")} ORDER BY ${names.join(", ")}` : "";
      const sources = await usageSources(q, true);
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
           sum(n) AS requests,
           ${totalsSql},
           sumIf(n, status != 'OK') AS errors
         FROM (${sources.sql})
         ${grouping}
         LIMIT {limit:UInt32}
         ${reportLimits}`,
        { ...sources.params, limit: q.limit },
        { orgId: q.orgId, signal: q.signal },
      );
      return rows.map((r) =>
        create(UsageRowSchema, {
          group: r.groups,
          requests: BigInt(r.requests),
          usage: create(TokenUsageSchema, {
            inputTokens: int64(r.input_tokens, "input_tokens"),
            cachedInputTokens: int64(r.cached_input_tokens, "cached_input_tokens"),
            outputTokens: int64(r.output_tokens, "output_tokens"),
            reasoningTokens: int64(r.reasoning_tokens, "reasoning_tokens"),
          }),
          costNanos: int64(r.cost_nanos, "cost_nanos"),
          errors: BigInt(r.errors),
        }),
      );
    },

    async queryTimeSeries(q) {
      // Hour rollups fit buckets that are whole hours; minute rollups fit every allowed width.
      const sources = await usageSources(
        q,
        q.bucketSeconds % 3600 === 0,
        " AND ({model:String} = '' OR requested_model = {model:String})",
      );
      const rows = await driver.query<{
        bucket_start: string;
        requests: string;
        input_tokens: string;
        output_tokens: string;
        cost_nanos: string;
        errors: string;
      }>(
        `SELECT toStartOfInterval(t, toIntervalSecond({bucket_seconds:UInt32})) AS bucket_start,
           sum(n) AS requests,
           ${totalsSql},
           sumIf(n, status != 'OK') AS errors
         FROM (${sources.sql})
         GROUP BY bucket_start
         ORDER BY bucket_start
         ${reportLimits}`,
        { ...sources.params, bucket_seconds: q.bucketSeconds, model: q.model },
        { orgId: q.orgId, signal: q.signal },
      );
      return rows.map((r) =>
        create(TimeSeriesPointSchema, {
          bucketStart: fromDateTime64(r.bucket_start),
          requests: BigInt(r.requests),
          inputTokens: int64(r.input_tokens, "input_tokens"),
          outputTokens: int64(r.output_tokens, "output_tokens"),
          costNanos: int64(r.cost_nanos, "cost_nanos"),
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
           ${percentilesIf("upstream_latency_us", "upstream_latency_us > 0")} AS upstream,
           ${percentilesIf("ttft_us", "streamed AND ttft_us > 0")} AS ttft,
           ${percentiles("gateway_overhead_us")} AS overhead
         FROM ${requests} FINAL
         WHERE ${orgWindow}
         GROUP BY model
         ORDER BY model
         LIMIT {limit:UInt32}
         ${reportLimits}`,
        { ...windowParams(q), limit: q.limit },
        { orgId: q.orgId, signal: q.signal },
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
        // The bound on start_time alone lets the sorting key skip the rows newer than the cursor, which the tuple
        // comparison does not: without it every page read the whole range, a deep one as much as the first.
        where.push(
          "start_time <= {after_time:DateTime64(6, 'UTC')}",
          "(start_time, request_id) < ({after_time:DateTime64(6, 'UTC')}, {after_id:String})",
        );
        params.after_time = q.after.startTime;
        params.after_id = q.after.requestId;
      }
      const rows = await driver.query<RequestRow>(
        `SELECT ${requestColumns.join(", ")}
         FROM ${requests} FINAL
         WHERE ${where.join(" AND ")}
         ORDER BY start_time DESC, request_id DESC
         LIMIT {limit:UInt32}
         ${reportLimits}`,
        params,
        { orgId: q.orgId, signal: q.signal },
      );
      const page: RequestMetrics[] = [];
      let bytes = 0;
      for (const row of rows.slice(0, q.limit)) {
        const request = fromRequestRow(row);
        // Each in its message's field: a tag, a length and the row.
        bytes += toBinary(RequestMetricsSchema, request).byteLength + 6;
        if (bytes > maxRequestPageBytes && page.length > 0) break;
        page.push(request);
      }
      const last = rows[page.length - 1];
      return {
        requests: page,
        next: rows.length > page.length && last ? { startTime: last.start_time, requestId: last.request_id } : undefined,
      };
    },

    ping: (timeoutMs) => driver.ping(timeoutMs),
    close: () => driver.close(),
  };
}
