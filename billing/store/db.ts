import pg from "pg";

export type BillingErrorKind =
  | "not_found"
  | "already_exists"
  | "invalid_argument"
  | "failed_precondition"
  | "permission_denied"
  | "resource_exhausted"
  | "unavailable";

/** A domain error of the billing store; the service turns its kind into a Connect code. */
export class BillingError extends Error {
  override name = "BillingError";
  constructor(
    readonly kind: BillingErrorKind,
    message: string,
    /** What the database reported, for the server log only: clients see `message`. */
    readonly internal?: Record<string, string | undefined>,
  ) {
    super(message);
  }
}

export interface Queryable {
  /** A query given `timeoutMs` fails once that passes without an answer, giving its connection up. */
  query<R extends pg.QueryResultRow>(sql: string, params?: unknown[], timeoutMs?: number): Promise<R[]>;
}

export interface Db extends Queryable {
  /** Runs `fn` in one transaction: committed when it resolves, rolled back when it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
}

/** Query helpers over a pool that turn constraint violations into BillingErrors. */
export function createDb(pool: pg.Pool): Db {
  const on = (client: pg.Pool | pg.PoolClient): Queryable => ({
    async query<R extends pg.QueryResultRow>(sql: string, params?: unknown[], timeoutMs?: number) {
      try {
        if (timeoutMs === undefined) return (await client.query<R>(sql, params)).rows;
        // pg honours query_timeout per query, though its types leave it out.
        return (await client.query<R>({ text: sql, values: params, query_timeout: timeoutMs } as pg.QueryConfig)).rows;
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

// Unique constraints a request can run into, as the field that collided.
const duplicates: Record<string, string> = {
  organizations_name_key: "name: an organization with this name already exists",
  projects_org_name_key: "name: the organization already has a project with this name",
};

/**
 * The one translation of Postgres errors into domain errors, in the API's words: which field and value, never
 * tables, constraints or the server's own text, which go to the log with the error. Anything else is returned
 * unchanged.
 */
export function fromPgError(e: unknown): unknown {
  if (!(e instanceof pg.DatabaseError)) return e;
  const refused = (kind: BillingErrorKind, message: string) =>
    new BillingError(kind, message, { message: e.message, detail: e.detail, table: e.table, constraint: e.constraint });
  const noun = tableNouns[e.table ?? ""] ?? "record";
  switch (e.code) {
    case "23505": // unique_violation
      return refused("already_exists", duplicates[e.constraint ?? ""] ?? `${noun} already exists`);
    case "23503": // foreign_key_violation: the referenced row is missing (or belongs to another organization)
      return refused("not_found", missingReference(e.detail ?? ""));
    case "55000": // object_not_in_prerequisite_state: raised by the schema's guards, in messages of our own
      return refused("failed_precondition", e.message);
    case "22003": // numeric_value_out_of_range: inputs are bounded, so only a running total gets here
      return refused("failed_precondition", "a total would exceed the largest amount billing can hold (2^63-1)");
    // Requests are validated before they get here: these are the schema's backstop.
    case "23514": // check_violation
    case "23502": // not_null_violation
    case "22001": // string_data_right_truncation
    case "22P02": // invalid_text_representation
      return refused("invalid_argument", `${e.column ?? checkedColumn(e) ?? noun}: value not accepted`);
    default:
      return e;
  }
}

/** The column of a check named as Postgres names column checks, "<table>_<column>_check". */
function checkedColumn(e: pg.DatabaseError): string | undefined {
  const prefix = `${e.table}_`;
  const name = e.constraint ?? "";
  if (!name.startsWith(prefix) || !name.endsWith("_check")) return undefined;
  return name.slice(prefix.length, -"_check".length) || undefined;
}

/** "org_id: organization org_x does not exist" from Postgres' "Key (org_id)=(org_x) is not present in table ...". */
function missingReference(detail: string): string {
  const match = /^Key \((.+)\)=\((.*)\) is not present in table "(\w+)"/.exec(detail);
  const noun = tableNouns[match?.[3] ?? ""];
  if (!match?.[1] || match[2] === undefined || !noun) return "a record this refers to does not exist";
  const columns = match[1].split(", ");
  const values = match[2].split(", ");
  // An id holding ", " makes the values ambiguous: name the field alone.
  if (values.length !== columns.length) return `${columns[0]}: ${noun} does not exist`;
  const within = columns[1] === "org_id" ? ` in organization ${values[1]}` : "";
  return `${columns[0]}: ${noun} ${values[0]} does not exist${within}`;
}
