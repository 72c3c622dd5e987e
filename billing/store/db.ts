import pg from "pg";

export type BillingErrorKind =
  | "not_found"
  | "already_exists"
  | "invalid_argument"
  | "failed_precondition"
  | "resource_exhausted"
  | "unavailable";

/** A domain error of the billing store; the service turns its kind into a Connect code. */
export class BillingError extends Error {
  override name = "BillingError";
  constructor(
    readonly kind: BillingErrorKind,
    message: string,
  ) {
    super(message);
  }
}

export interface Queryable {
  query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]): Promise<R[]>;
}

export interface Db extends Queryable {
  /** Runs `fn` in one transaction: committed when it resolves, rolled back when it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
}

/** Query helpers over a pool that turn constraint violations into BillingErrors. */
export function createDb(pool: pg.Pool): Db {
  const on = (client: pg.Pool | pg.PoolClient): Queryable => ({
    async query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]) {
      try {
        return (await client.query<R>(sql, params)).rows;
      } catch (e) {
        throw fromPgError(e);
      }
    },
  });
  return {
    ...on(pool),
    async transaction(fn) {
      const client = await pool.connect();
      let broken: Error | undefined;
      try {
        await client.query("BEGIN");
        const result = await fn(on(client));
        await client.query("COMMIT");
        return result;
      } catch (e) {
        await client.query("ROLLBACK").catch((rollbackError: Error) => {
          broken = rollbackError;
        });
        throw e;
      } finally {
        // A connection that cannot roll back is discarded rather than reused.
        client.release(broken);
      }
    },
  };
}

const tableNouns: Record<string, string> = {
  organizations: "organization",
  projects: "project",
  api_keys: "api key",
  budget_leases: "budget lease",
  usage_records: "usage record",
  discount_rules: "discount rule",
  invoices: "invoice",
};

/** The one translation of Postgres errors into domain errors; anything else is returned unchanged. */
export function fromPgError(e: unknown): unknown {
  if (!(e instanceof pg.DatabaseError)) return e;
  const detail = e.detail ?? e.message;
  switch (e.code) {
    case "23505": // unique_violation
      return new BillingError("already_exists", `${tableNouns[e.table ?? ""] ?? "row"} already exists: ${detail}`);
    case "23503": {
      // foreign_key_violation: the referenced row is missing (or belongs to another organization)
      const table = /in table "(\w+)"/.exec(detail)?.[1] ?? "";
      return new BillingError("not_found", `${tableNouns[table] ?? "referenced row"} not found: ${detail}`);
    }
    case "55000": // object_not_in_prerequisite_state: the invoice guards in the schema
      return new BillingError("failed_precondition", e.message);
    case "23514": // check_violation
    case "23502": // not_null_violation
    case "22001": // string_data_right_truncation
    case "22003": // numeric_value_out_of_range
    case "22P02": // invalid_text_representation
      return new BillingError("invalid_argument", `${e.message}${e.constraint ? ` (${e.constraint})` : ""}`);
    default:
      return e;
  }
}
