/** How meshctl calls billing and analytics: failures that name the service, creates sent once, shared lookups. */
import { type Timestamp, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { ulid } from "ulid";
import { type ApiKey, type BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { billingPeriod } from "../../lib/billing-period.ts";
import { timestampMs } from "./format.ts";

/** A service answered with an error outside Connect (the HTML invoice page): exit code 1. */
export class ServiceError extends Error {}

/** A key by id, revoked or not, in one lookup however many orgs there are; unknown when `orgId` is not its org. */
export async function findKey(
  billing: Client<typeof BillingService>,
  keyId: string,
  orgId: string | undefined,
): Promise<ApiKey> {
  const key = await billing.getApiKey({ apiKeyId: keyId }).then(
    (res) => res.apiKey,
    (e: unknown) => {
      if (ConnectError.from(e).code === Code.NotFound) return undefined;
      throw e;
    },
  );
  if (!key || (orgId && key.orgId !== orgId)) {
    throw new ServiceError(`no key ${keyId}${orgId ? ` in org ${orgId}` : ""}`);
  }
  return key;
}

/**
 * An analytics query's range: --from and --to, either left out coming from the org's billing period, as billing's.
 * Only that period asks billing, for the one org (GetOrganization, which an org's own API key may ask of its org).
 */
export async function analyticsRange(
  billing: Client<typeof BillingService>,
  orgId: string,
  from: Timestamp | undefined,
  to: Timestamp | undefined,
): Promise<{ start: Timestamp; end: Timestamp }> {
  if (from && to) return { start: from, end: to };
  const { organization: org } = await billing.getOrganization({ orgId });
  if (!org) throw new ServiceError(`billing answered no organization ${orgId}`);
  const period = billingPeriod(new Date(to ? timestampMs(to) - 1 : Date.now()), org.billingDay);
  return { start: from ?? timestampFromDate(period.start), end: to ?? timestampFromDate(period.end) };
}

/**
 * A failure that is not the service's answer (nothing listening, another server at the address, out of time) names
 * the service and its address, as the invoice page's does: "[unimplemented] HTTP 404" alone said neither. The address
 * comes with its `user:password@` masked.
 */
export function nameService(name: string, url: string): Interceptor {
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (e) {
      const err = ConnectError.from(e);
      if (err.isWireError) throw err;
      throw new ConnectError(`${name} at ${url}: ${err.rawMessage}`, err.code, err.metadata, undefined, err.cause);
    }
  };
}

/**
 * A create sent with a fresh request_id and, when its answer was lost (billing unreachable or too slow), sent once more
 * with the same one: billing answers the second with what the first created, if it did, rather than creating twice.
 */
export async function createOnce<T>(send: (requestId: string) => Promise<T>): Promise<T> {
  const requestId = ulid();
  try {
    return await send(requestId);
  } catch (e) {
    const code = e instanceof ConnectError ? e.code : undefined;
    if (code !== Code.Unavailable && code !== Code.DeadlineExceeded) throw e;
    return send(requestId);
  }
}
