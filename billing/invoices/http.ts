import { Code, ConnectError } from "@connectrpc/connect";
import { callerMarkHeaders } from "../../lib/auth.ts";
import type { Logger, OutageLog } from "../../lib/log.ts";
import { type HttpRoutes, peerAddress, send } from "../../lib/server.ts";
import type { BillingAuth } from "../auth.ts";
import { createDatabaseOutageLog, databaseUnavailable, toConnectError } from "../errors.ts";
import { callSignal } from "../store/db.ts";
import { invoiceNotFound } from "../store/invoices.ts";
import type { BillingStore } from "../store/store.ts";
import { renderInvoiceHtml } from "./render-html.ts";

const invoicePath = /^\/invoices\/([A-Za-z0-9_]{1,128})\/?$/;

const statuses: Partial<Record<Code, number>> = {
  [Code.Unauthenticated]: 401,
  [Code.PermissionDenied]: 403,
  [Code.NotFound]: 404,
  [Code.Unavailable]: 503,
};

// A rendered invoice is a private document: never cached, never framed, no scripts whatever its content.
const pageHeaders = {
  "content-type": "text/html; charset=utf-8",
  "cache-control": "no-store",
  "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
};

/**
 * `GET /invoices/<id>`: the printable HTML page of an invoice, for an admin or the invoice's own org
 * (`authorization: Bearer <admin token or org API key>`); 401, 403 or 404 otherwise.
 */
export function invoicePages({
  store,
  auth,
  log,
  databaseOutage = createDatabaseOutageLog(log),
  timeoutMs = 10_000,
}: {
  store: Pick<BillingStore, "getInvoice">;
  auth: BillingAuth;
  log: Logger;
  databaseOutage?: OutageLog;
  /**
   * How long a page waits for the database, as an RPC waits its deadline at most: past it, or once its caller leaves,
   * its statement is cancelled, so pages waiting behind a lock another session holds do not take every connection.
   */
  timeoutMs?: number;
}): HttpRoutes {
  return async (req, res) => {
    const path = (req.url ?? "/").split("?")[0] ?? "/";
    if (!path.startsWith("/invoices/")) return false;
    const match = invoicePath.exec(path);
    if (req.method !== "GET" && req.method !== "HEAD") {
      send(res, 405, { allow: "GET, HEAD", "content-type": "text/plain" }, "method not allowed\n");
      return true;
    }
    const left = new AbortController();
    res.once("close", () => left.abort(new ConnectError("the caller left", Code.Canceled)));
    const signal = AbortSignal.any([left.signal, AbortSignal.timeout(timeoutMs)]);
    const headers = new Headers();
    // The token, and whether a web page or a proxy sent it (the published default admin token is refused from those).
    for (const name of ["authorization", ...callerMarkHeaders]) {
      const value = req.headers[name];
      if (typeof value === "string") headers.set(name, value);
    }
    try {
      const invoice = await callSignal.run(signal, async () => {
        const caller = await auth.caller(headers, peerAddress(req));
        if (!match?.[1]) throw new ConnectError("no such invoice", Code.NotFound);
        const found = await store.getInvoice(match[1]);
        auth.requireOwnRecord(caller, found.orgId, () => invoiceNotFound(found.id));
        return found;
      });
      const page = renderInvoiceHtml(invoice);
      databaseOutage.recovered();
      // HEAD answers with the headers GET would send, its length included, and no body.
      const length = { "content-length": String(Buffer.byteLength(page)) };
      send(res, 200, { ...pageHeaders, ...length }, req.method === "HEAD" ? "" : page);
    } catch (e) {
      // Its statement cancelled for its time: a wait, not an outage to log.
      const error = signal.aborted
        ? new ConnectError(databaseUnavailable, Code.Unavailable)
        : toConnectError(e, log, databaseOutage);
      const status = statuses[error.code] ?? 500;
      const headers: Record<string, string> = {
        "content-type": "text/plain; charset=utf-8",
        "cache-control": "no-store",
      };
      if (status === 401) headers["www-authenticate"] = 'Bearer realm="billing"';
      send(res, status, headers, `${error.rawMessage}\n`);
    }
    return true;
  };
}
