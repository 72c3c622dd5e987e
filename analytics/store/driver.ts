/** Query parameters bound server-side to `{name:Type}` placeholders; never spliced into SQL. */
export type QueryParams = Record<string, string | number | boolean | readonly string[]>;

/**
 * The few operations the analytics store needs from ClickHouse. Two implementations run the same SQL:
 * the in-process engine (chdb) and a ClickHouse server (@clickhouse/client).
 */
export interface ClickHouseDriver {
  /** Runs a statement that returns no rows (DDL, small INSERT ... VALUES). */
  exec(sql: string, params?: QueryParams): Promise<void>;
  /**
   * Runs a SELECT and returns its rows as parsed JSONEachRow objects, with 64-bit integers as strings. `signal` stops
   * it where the engine can: a server cancels the query, the in-process engine runs it to its end or time limit.
   */
  query<T>(sql: string, params?: QueryParams, signal?: AbortSignal): Promise<T[]>;
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
  close(): Promise<void>;
}
