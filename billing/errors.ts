import { Code, ConnectError } from "@connectrpc/connect";
import pg from "pg";
import { createOutageLog, type Logger, type OutageLog } from "../lib/log.ts";
import { BillingError, type BillingErrorKind } from "./store/db.ts";

const codes: Record<BillingErrorKind, Code> = {
  not_found: Code.NotFound,
  already_exists: Code.AlreadyExists,
  invalid_argument: Code.InvalidArgument,
  failed_precondition: Code.FailedPrecondition,
  permission_denied: Code.PermissionDenied,
  resource_exhausted: Code.ResourceExhausted,
  unavailable: Code.Unavailable,
};

/** What a caller is told while Postgres cannot serve; the driver's words, which name hosts, go to the log. */
export const databaseUnavailable = "billing's database is unavailable; retry shortly";

/**
 * The log of Postgres outages that calls meet: a warning when the first call fails, and a line when a call succeeds
 * again, with how long it lasted and how many calls failed meanwhile, rather than a warning per call.
 */
export function createDatabaseOutageLog(log: Logger): OutageLog {
  return createOutageLog(log, { failed: "request failed: postgres unavailable", recovered: "postgres answers again" });
}

// SQLSTATEs of a server shutting down or starting, out of connections, or of a statement cancelled or out of time;
// 25006, a write refused by a server that is read-only (a replica, or a primary demoted by a failover); and 57P05 and
// 25P03, a connection the server closed for its idle_session_timeout or idle_in_transaction_session_timeout.
const unavailableStates = new Set([
  "57P01", "57P02", "57P03", "53000", "53300", "57014", "55P03", "25006", "57P05", "25P03",
]);
// How the socket and the driver say a connection failed, or could not be made or taken from the pool in time.
const connectionErrnos = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH", "ENETUNREACH"]);
const connectionMessages =
  /^(Connection terminated|timeout exceeded when trying to connect$|Query read timeout$|Client .* not queryable$|Cannot use a pool after calling end)/;

/** Whether `e` says Postgres could not be reached or could not run the statement now, so a retry may succeed. */
export function isDatabaseUnavailable(e: unknown): boolean {
  if (e instanceof pg.DatabaseError) {
    // 08P01, a message the server could not take (a statement given the wrong number of parameters), is a bug here.
    return (e.code?.startsWith("08") === true && e.code !== "08P01") || unavailableStates.has(e.code ?? "");
  }
  if (!(e instanceof Error)) return false;
  const { code } = e as NodeJS.ErrnoException;
  return (code !== undefined && connectionErrnos.has(code)) || connectionMessages.test(e.message);
}

/** What a caller is told when Postgres rolled its call back to resolve a conflict with another transaction. */
export const databaseConflict = "billing's database rolled the call back for a conflict with another; retry it";

// SQLSTATEs of a transaction Postgres rolled back for a conflict, whole, so that running it again may succeed.
const conflictStates = new Set(["40P01", "40001"]); // deadlock_detected, serialization_failure

/**
 * The one mapping from domain errors to Connect codes; what the database said behind a refusal is logged, never sent.
 * A database that cannot serve is Unavailable, so callers retry, as they do a call it rolled back for a conflict
 * (Aborted); other unexpected errors are logged and Internal.
 */
export function toConnectError(e: unknown, log: Logger, outage: OutageLog): ConnectError {
  if (e instanceof ConnectError) return e;
  if (e instanceof BillingError) {
    if (e.internal) log.info("request refused by the database", { refusal: e.message, ...e.internal });
    return new ConnectError(e.message, codes[e.kind]);
  }
  if (e instanceof pg.DatabaseError && conflictStates.has(e.code ?? "")) {
    log.warn("request rolled back by the database for a conflict", { err: e, code: e.code, detail: e.detail });
    return new ConnectError(databaseConflict, Code.Aborted);
  }
  if (isDatabaseUnavailable(e)) {
    outage.failed({ err: e, code: (e as { code?: string }).code });
    return new ConnectError(databaseUnavailable, Code.Unavailable);
  }
  log.error("billing request failed", { err: e });
  return new ConnectError("internal error", Code.Internal);
}
