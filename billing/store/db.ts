import { AsyncLocalStorage } from "node:async_hooks";
import { connect } from "node:net";
import pg from "pg";
import { sha256Hex } from "../../lib/auth.ts";
import type { Page } from "./types.ts";

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

/**
 * SHA-256 hex of what a create asked for (its validated input), kept with a request_id so that a retry is told from
 * another request reusing the id.
 */
export function requestSha256(content: object): string {
  return sha256Hex(JSON.stringify(content, (_key, value: unknown) => (typeof value === "bigint" ? `${value}` : value)));
}

export interface Queryable {
  query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]): Promise<R[]>;
}

export interface Db extends Queryable {
  /**
   * A query given `timeoutMs` is cancelled in Postgres once that passes without an answer, its connection closed: a
   * query only given up on by the driver would go on waiting in the server, behind a lock say, holding one of its
   * connections (a scrape's every 15 s, behind an hour's lock, would take a default server's 100).
   */
  query<R extends pg.QueryResultRow>(sql: string, params?: unknown[], timeoutMs?: number): Promise<R[]>;
  /** Runs `fn` in one transaction: committed when it resolves, rolled back when it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
}

/**
 * The signal of the RPC the queries run for, set around each call: once it aborts (the caller left or its deadline
 * passed) the statement running for it is cancelled, so a call nobody waits for any more does not hold a connection,
 * say behind a lock another session holds, until the pool has none left for anyone.
 */
export const callSignal = new AsyncLocalStorage<AbortSignal>();

/**
 * A pool of connections for billing. Its statements are written for READ COMMITTED, each seeing what committed before
 * it (a grant reads the leases granted while it waited for its scope's lock): a database or role whose default is
 * another level (`ALTER DATABASE ... SET default_transaction_isolation`) let concurrent grants exceed a budget several
 * times over, or failed calls with serialization errors, so each connection is set back to it before its first use.
 *
 * Its transactions run their statements back to back, so one that sits idle for `idleInTransactionTimeoutMs` (10 s by
 * default) belongs to a billing that stopped mid-call (frozen, its node gone, cut off from the database): the server
 * ends that session and its locks with it, where it would otherwise hold an org's or key's lock, and every grant on it,
 * until TCP keepalive gave up on the connection, two hours by default.
 */
export function createPool(config: pg.PoolConfig, { idleInTransactionTimeoutMs = 10_000 } = {}): pg.Pool {
  const settings =
    "SET default_transaction_isolation = 'read committed'; " +
    `SET idle_in_transaction_session_timeout = ${Math.max(1, Math.round(idleInTransactionTimeoutMs))}`;
  // Awaited by the pool before it hands the connection out; a connection that cannot run it is closed, failing the call.
  const onConnect = (client: pg.ClientBase) => client.query(settings);
  return new pg.Pool({ ...config, onConnect });
}

/** Query helpers over a pool that turn constraint violations into BillingErrors. */
export function createDb(pool: pg.Pool): Db {
  const on = (client: pg.Pool | pg.PoolClient, signal?: AbortSignal): Queryable => ({
    async query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]) {
      // A call whose caller left runs no further statement.
      signal?.throwIfAborted();
      try {
        return (await client.query<R>(sql, params)).rows;
      } catch (e) {
        throw fromPgError(e);
      }
    },
  });

  /**
   * Runs `use` on a pooled connection whose statement is cancelled once `signal` aborts. Such a connection is closed
   * then and there, and discarded, as is one `use` discards: a cancel arriving late must not reach another call's
   * statement, and a server that answers neither the statement nor the cancel (hung, or failed over without a reset)
   * must not keep the connection, and its place in the pool, until TCP gives up on it.
   */
  const withClient = async <T>(
    signal: AbortSignal | undefined,
    use: (client: pg.PoolClient, discard: (reason: Error) => void) => Promise<T>,
  ): Promise<T> => {
    signal?.throwIfAborted();
    const client = await pool.connect();
    if (signal?.aborted) {
      // Its caller left while it waited for a connection: nothing ran on it, so it goes back to the pool as it came.
      client.release();
      signal.throwIfAborted();
    }
    let broken: Error | undefined;
    const discard = (reason: Error) => {
      broken ??= reason;
    };
    const cancel = () => {
      discard(new Error("statement cancelled: its caller left or its time passed"));
      cancelStatement(client);
      // Fails the statement at once (pg drops the socket of a connection that is running one); the failure is `use`'s.
      client.end().catch(() => {});
    };
    signal?.addEventListener("abort", cancel, { once: true });
    // The server ending the session between two of its statements (its idle-in-transaction timeout, a restart) is
    // told to the connection, not to a statement: unheard, it would end the process. The next statement fails.
    client.on("error", discard);
    try {
      return await use(client, discard);
    } finally {
      signal?.removeEventListener("abort", cancel);
      client.off("error", discard);
      client.release(broken);
    }
  };

  return {
    async query<R extends pg.QueryResultRow>(sql: string, params?: unknown[], timeoutMs?: number) {
      const call = callSignal.getStore();
      const expiry = timeoutMs === undefined ? undefined : AbortSignal.timeout(timeoutMs);
      const signal = call && expiry ? AbortSignal.any([call, expiry]) : (call ?? expiry);
      if (!signal) return on(pool).query<R>(sql, params);
      // As pool.query does, a connection whose query failed is not reused.
      return withClient(signal, (client, discard) =>
        on(client, signal)
          .query<R>(sql, params)
          .catch((e: unknown) => {
            discard(e as Error);
            throw e;
          }),
      );
    },
    transaction(fn) {
      const signal = callSignal.getStore();
      return withClient(signal, async (client, discard) => {
        try {
          await client.query("BEGIN");
          const result = await fn(on(client, signal));
          await client.query("COMMIT");
          return result;
        } catch (e) {
          // A connection that cannot roll back is discarded rather than reused, as is one to a server that refused a
          // write as read-only: still open to a primary a failover demoted, it would fail every later write.
          if (e instanceof pg.DatabaseError && e.code === readOnlyTransaction) discard(e);
          await client.query("ROLLBACK").catch(discard);
          throw e;
        }
      });
    },
  };
}

// SQLSTATE of a write refused by a server that is read-only (a hot standby, default_transaction_read_only).
const readOnlyTransaction = "25006";

/** Postgres's cancel request for what `client` runs, sent on a connection of its own, which needs no login. */
function cancelStatement(client: pg.PoolClient): void {
  // Set by pg once connected, though its types leave them out.
  const { host, port, processID, secretKey } = client as unknown as {
    host: string;
    port: number;
    processID: number | null;
    secretKey: number | null;
  };
  if (processID === null || secretKey === null) return;
  const request = Buffer.alloc(16);
  request.writeInt32BE(16, 0);
  request.writeInt32BE(80_877_102, 4); // CancelRequest
  request.writeInt32BE(processID, 8);
  request.writeInt32BE(secretKey, 12);
  const socket = host.startsWith("/") ? connect(`${host}/.s.PGSQL.${port}`) : connect(port, host);
  // Not reaching the server leaves the statement to end on its own; its connection is discarded all the same.
  socket.on("error", () => {});
  socket.setTimeout(5_000, () => socket.destroy());
  socket.end(request);
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

/** A page from rows read with a limit of one more than the page's: that one, when there, only says more follow. */
export function pageOf<T>(rows: T[], page: { limit: number }): Page<T> {
  return { items: rows.slice(0, page.limit), more: rows.length > page.limit };
}
