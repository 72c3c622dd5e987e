import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, type Client, ConnectError } from "@connectrpc/connect";
import { type BillingService, KeyRefusalReason, KeyRefusalSchema } from "../gen/billing/v1/billing_pb.ts";
import { bearerToken, keySecretPrefix, requireAdmin, safeEqual, sha256Hex } from "../lib/auth.ts";
import { createKeyCache } from "../lib/key-cache.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";

export interface AnalyticsAuthOptions {
  adminToken: string;
  /** Billing, called with the admin token: it owns the keys. */
  billing: Pick<Client<typeof BillingService>, "authorizeKey">;
  /**
   * How long a key's org is remembered (so a revoked key, or a key of an org suspended since, may read for this long,
   * never past its expiry); 30 s by default.
   */
  ttlMs?: number;
  /**
   * How long an unknown key (or one of a suspended org) is remembered as such, so it cannot make every call a billing
   * call; 5 s by default.
   */
  rejectedTtlMs?: number;
  /** Working keys remembered at most (10,000 by default); the oldest are forgotten first. */
  maxKeys?: number;
  /** Unknown keys remembered at most (10,000 by default), apart from the working ones, which they cannot push out. */
  maxRejectedKeys?: number;
  /**
   * Milliseconds, for how long keys are remembered: a monotonic clock by default, since a wall clock stepped back would
   * keep a revoked key working for as long as the step.
   */
  now?: () => number;
  /** Wall-clock milliseconds, which keys' expire_time is compared with (Date.now by default). */
  clock?: () => number;
  /** Where a key check billing cannot answer is logged, once until billing answers again. */
  log?: Logger;
}

interface Remembered {
  orgId: string | undefined;
  /** The key is valid but its org is suspended. */
  suspended: boolean;
  /** By `now`: when billing is asked again. */
  until: number;
  /** By `clock`: when the key expires. */
  expireMs: number;
}

/**
 * Who may call analytics: the admin token for everything (ingest included), or an org's API key for its own org's
 * queries. Keys are checked with billing's AuthorizeKey and their org remembered briefly, by hash.
 */
export function createAnalyticsAuth(options: AnalyticsAuthOptions) {
  const { adminToken, billing } = options;
  const ttlMs = options.ttlMs ?? 30_000;
  const rejectedTtlMs = options.rejectedTtlMs ?? 5_000;
  const now = options.now ?? (() => performance.now());
  const clock = options.clock ?? Date.now;
  const keys = createKeyCache<Remembered>({ maxKeys: options.maxKeys ?? 10_000, maxRejected: options.maxRejectedKeys ?? 10_000 });

  // Lookups in flight, by hash: concurrent first uses of a key share one billing call.
  const checking = new Map<string, Promise<Remembered>>();
  // Callers are told only to retry: why (billing unreachable, or refusing this service's own token) is the operator's.
  const billingOutage = createOutageLog(options.log, {
    failed: "billing AuthorizeKey failed: org API keys cannot read analytics",
    recovered: "billing AuthorizeKey answers again",
  });

  const lookUp = async (secret: string, hash: string): Promise<Remembered> => {
    let orgId: string | undefined;
    let suspended = false;
    let expireMs = Number.POSITIVE_INFINITY;
    // From the ask: a slow answer (billing is given 30 s) must not keep a key revoked meanwhile working any longer.
    const askedAt = now();
    try {
      const apiKey = (await billing.authorizeKey({ secret })).apiKey;
      orgId = apiKey?.orgId;
      if (apiKey?.limits?.expireTime) expireMs = timestampMs(apiKey.limits.expireTime);
    } catch (e) {
      const err = ConnectError.from(e);
      suspended =
        err.code === Code.PermissionDenied &&
        err.findDetails(KeyRefusalSchema).some((d) => d.reason === KeyRefusalReason.ORGANIZATION_SUSPENDED);
      if (err.code !== Code.Unauthenticated && !suspended) {
        billingOutage.failed({ code: Code[err.code], err: err.rawMessage });
        throw new ConnectError("the api key cannot be checked now; retry later", Code.Unavailable);
      }
    }
    billingOutage.recovered();
    const remembered = { orgId, suspended, until: askedAt + (orgId ? ttlMs : rejectedTtlMs), expireMs };
    keys.set(hash, remembered, orgId === undefined);
    return remembered;
  };

  const orgOfKey = (secret: string): Promise<Remembered> => {
    const hash = sha256Hex(secret);
    const known = keys.get(hash);
    // A key that expires within its TTL is remembered until it expires, when billing and the gateway refuse it too.
    if (known && known.until > now() && known.expireMs > clock()) return Promise.resolve(known);
    let pending = checking.get(hash);
    if (!pending) {
      pending = lookUp(secret, hash).finally(() => checking.delete(hash));
      checking.set(hash, pending);
    }
    return pending;
  };

  return {
    requireAdmin(headers: Headers): void {
      requireAdmin(headers, adminToken);
    },

    /** Throws unless the caller holds the admin token or an API key of `orgId`. */
    async requireOrgReader(headers: Headers, orgId: string): Promise<void> {
      const token = bearerToken(headers);
      if (!token) throw new ConnectError("missing bearer token", Code.Unauthenticated);
      if (safeEqual(token, adminToken)) return;
      // No API key (a stale admin token, say): refused as billing refuses it, and never sent to billing as a key.
      if (!token.startsWith(keySecretPrefix)) throw new ConnectError("invalid admin token", Code.PermissionDenied);
      const { orgId: keyOrg, suspended } = await orgOfKey(token);
      if (suspended) throw new ConnectError("the api key's organization is suspended", Code.PermissionDenied);
      if (keyOrg === undefined) throw new ConnectError("unknown, revoked or expired api key", Code.Unauthenticated);
      if (keyOrg !== orgId) throw new ConnectError("an api key may only read its own organization", Code.PermissionDenied);
    },
  };
}

export type AnalyticsAuth = ReturnType<typeof createAnalyticsAuth>;
