/** Query parameters bound server-side to `{name:Type}` placeholders; never spliced into SQL. */
export type QueryParams = Record<string, string | number | boolean | readonly string[]>;

/** A query a caller waits for, reading one org's data. */
export interface ReportOf {
  orgId: string;
  /** Aborts when the caller leaves. */
  signal?: AbortSignal;
}

/** How long a report query may run on the in-process engine by default (here so config need not load the engine). */
export const defaultChdbReportTimeoutSeconds = 10;

/** Too many report queries already wait for the engine; asking again later may succeed. */
export class ReportQueueFullError extends Error {}

/**
 * The few operations the analytics store needs from ClickHouse. Two implementations run the same SQL:
 * the in-process engine (chdb) and a ClickHouse server (@clickhouse/client).
 */
export interface ClickHouseDriver {
  /** Runs a statement that returns no rows (DDL, small INSERT ... VALUES). */
  exec(sql: string, params?: QueryParams): Promise<void>;
  /**
   * Runs a SELECT and returns its rows as parsed JSONEachRow objects, with 64-bit integers as strings. A `report`'s
   * signal stops it where the engine can: a server cancels the query; the in-process engine drops it if it still
   * waits its turn (see createChdbDriver), or else runs it to its end or time limit.
   */
  query<T>(sql: string, params?: QueryParams, report?: ReportOf): Promise<T[]>;
  /**
   * Inserts rows of values in `columns` order as JSONCompactEachRow (no repeated keys: faster to write and parse).
   * `settings` apply to this insert only (e.g. insert_deduplication_token).
   */
  insert(
    table: string,
    columns: readonly string[],
    rows: readonly (readonly unknown[])[],
    settings?: Record<string, string>,
  ): Promise<void>;
  /** A round trip, for readiness; gives up after `timeoutMs` where the driver can. */
  ping(timeoutMs?: number): Promise<void>;
  /** The time limit, in seconds, report queries need on this engine when the store is given none; 30 s when unset. */
  reportTimeoutSeconds?: number;
  /**
   * MergeTree settings every table needs on this engine, set after migrations (`ALTER TABLE ... MODIFY SETTING`); the
   * in-process engine's make an insert's part reach the disk before it returns.
   */
  tableSettings?: string;
  close(): Promise<void>;
}
