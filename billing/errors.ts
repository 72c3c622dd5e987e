import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "../lib/log.ts";
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

/**
 * The one mapping from domain errors to Connect codes; what the database said behind a refusal is logged, never sent,
 * and unexpected errors are logged and reported as Internal.
 */
export function toConnectError(e: unknown, log: Logger): ConnectError {
  if (e instanceof ConnectError) return e;
  if (e instanceof BillingError) {
    if (e.internal) log.info("request refused by the database", { refusal: e.message, ...e.internal });
    return new ConnectError(e.message, codes[e.kind]);
  }
  log.error("billing request failed", { err: e });
  return new ConnectError("internal error", Code.Internal);
}
