import type { ClickHouseClient, Logger as ClickHouseLogger, LogParams, WarnLogParams } from "@clickhouse/client";
import type { Logger } from "../../lib/log.ts";
import type { ClickHouseDriver, QueryParams, ReportOf } from "./driver.ts";

const querySettings = {
  // Quoted 64-bit integers keep sums of nano-USD exact through JSON.parse.
  output_format_json_quote_64bit_integers: 1,
  // Dates as the store reads and writes them ("2026-01-02 03:04:05.123456"), whatever a user's profile sets: in another
  // format every timestamp read back was NaN, failing ListRequests, and page tokens were refused.
  date_time_output_format: "simple",
  // A query whose caller went away (its signal aborted the HTTP request) stops in the server instead of running on.
  cancel_http_readonly_queries_on_client_close: 1,
  // ...which a server does for read-only queries alone: only a GET is read-only by default, and queries are POSTs.
  // 2 still lets a query set its own limits (max_execution_time).
  readonly: "2",
  // The answer (every query's is bounded: reports' by their limits) is sent once the query ends, so an exception
  // raised while it runs (a time limit reached) comes back as an error status, not inside a 200 body after rows: a
  // server before 25.11 writes it as a text line (read as a parse error) or, in JSONEachRow, as an {"exception"} row.
  wait_end_of_query: 1,
} as const;

/**
 * How @clickhouse/client's line for a failed request reads ("Query: HTTP request error.", "Insert: ...", "Ping: ...").
 * Its error is thrown to the caller, which logs it as it deserves (once per outage), so the line would say it again.
 */
const requestFailed = /^\w+: HTTP request error\.$/;

/**
 * @clickhouse/client's `log.LoggerClass` writing through `log`, so its lines are JSON like every other (its own logger
 * prints multi-line text with stacks). Its lines for failed requests are debug: their callers log those failures, a
 * request its caller's signal aborted (the caller left) failing nothing.
 */
export function clickHouseLoggerClass(log: Logger): new () => ClickHouseLogger {
  const fields = ({ module, args, err }: WarnLogParams) => ({ module, ...args, ...(err ? { err } : {}) });
  return class {
    trace() {}
    debug(p: LogParams) {
      log.debug(p.message, fields(p));
    }
    info(p: LogParams) {
      log.info(p.message, fields(p));
    }
    warn(p: WarnLogParams) {
      if (requestFailed.test(p.message)) log.debug(p.message, fields(p));
      else log.warn(p.message, fields(p));
    }
    error(p: WarnLogParams) {
      if (requestFailed.test(p.message)) log.debug(p.message, fields(p));
      else log.error(p.message, fields(p));
    }
  };
}

/**
 * How long @clickhouse/client waits for an answer, past the server's own limit on a report query: a query the server
 * stops at its limit then reaches the caller as ClickHouse's TIMEOUT_EXCEEDED (ResourceExhausted), not as the client
 * giving up at the same moment (Unavailable, which clients retry). The client's default, 30 s, equals that limit.
 */
export function clientRequestTimeoutMs(queryTimeoutSeconds: number): number {
  return (queryTimeoutSeconds + 15) * 1000;
}

/**
 * A ClickHouse server through @clickhouse/client (HTTP). Owns its clients: close() closes them. Report queries go
 * through `reports`, so that ones holding all of its connections (10 by default, each up to the report time limit)
 * leave ingest's inserts, roll-ups and readiness pings connections of their own.
 */
export function createClientDriver(client: ClickHouseClient, reports: ClickHouseClient = client): ClickHouseDriver {
  return {
    async exec(sql, params?: QueryParams) {
      await client.command({ query: sql, query_params: params });
    },
    async query<T>(sql: string, params?: QueryParams, report?: ReportOf) {
      const result = await (report ? reports : client).query({
        query: sql,
        query_params: params,
        format: "JSONEachRow",
        clickhouse_settings: querySettings,
        abort_signal: report?.signal,
        // Parameters past 4 KiB go in the body (multipart/form-data) rather than the URL: a report over a window with
        // many late minutes binds hundreds of bounds (about 18 KB), past what proxies and load balancers take in a
        // request line (AWS's 16 KB, nginx's 8 KB by default).
        use_multipart_params_auto: true,
      });
      return result.json<T>();
    },
    async insert(table, columns, rows, settings) {
      if (rows.length === 0) return;
      await client.insert({
        table,
        columns: [...columns] as [string, ...string[]],
        values: [...rows],
        format: "JSONCompactEachRow",
        clickhouse_settings: settings,
      });
    },
    async ping(timeoutMs) {
      // A query, not /ping, which a server answers without checking credentials: a password changed on the server
      // left analytics ready while every insert was refused.
      const result = await client.ping({ select: true, abort_signal: timeoutMs ? AbortSignal.timeout(timeoutMs) : undefined });
      if (!result.success) throw result.error;
    },
    async close() {
      await Promise.all([client.close(), reports === client ? undefined : reports.close()]);
    },
  };
}
