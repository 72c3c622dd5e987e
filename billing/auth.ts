import { Code, ConnectError } from "@connectrpc/connect";
import { KeyRefusalReason, KeyRefusalSchema } from "../gen/billing/v1/billing_pb.ts";
import {
  bearerToken,
  keySecretPrefix,
  refusePublishedTokenFromAfar,
  requireAdmin,
  safeEqual,
  sha256Hex,
} from "../lib/auth.ts";
import type { BillingStore } from "./store/store.ts";

/** Who is calling: an admin (or another mesh service), or an org through one of its own API keys. */
export type Caller = { kind: "admin" } | { kind: "api_key"; orgId: string; apiKeyId: string };

/** Unauthenticated (or PermissionDenied), with a `KeyRefusal` detail so a gateway can tell its client why. */
const refused = (message: string, reason: KeyRefusalReason, code = Code.Unauthenticated, orgId = "") =>
  new ConnectError(message, code, undefined, [{ desc: KeyRefusalSchema, value: { reason, orgId } }]);

/**
 * Authentication of billing's callers, shared by the RPCs and the HTTP invoice pages. Failures are ConnectErrors:
 * Unauthenticated without credentials or with an unknown, revoked or expired key; PermissionDenied otherwise (a key
 * of a suspended org among them).
 */
export function createBillingAuth({
  store,
  adminToken,
  clock,
}: {
  store: Pick<BillingStore, "findApiKeyBySecretHash">;
  adminToken: string;
  clock: () => Date;
}) {
  /** The key and org of a presented secret, valid at `now`. */
  const resolveKey = async (secret: string, now: Date) => {
    const found = secret.startsWith(keySecretPrefix)
      ? await store.findApiKeyBySecretHash(sha256Hex(secret))
      : undefined;
    if (!found) throw refused("unknown api key", KeyRefusalReason.UNKNOWN);
    const { revokedAt, limits } = found.apiKey;
    if (revokedAt) throw refused("api key revoked", KeyRefusalReason.REVOKED);
    if (limits.expiresAt && limits.expiresAt <= now) throw refused("api key expired", KeyRefusalReason.EXPIRED);
    const { organization } = found;
    if (organization.suspendedAt) {
      const message = `organization ${organization.id} is suspended`;
      throw refused(message, KeyRefusalReason.ORGANIZATION_SUSPENDED, Code.PermissionDenied, organization.id);
    }
    return found;
  };

  /** `peer` is the address of an HTTP page's caller; an RPC's was checked by its route's gate. */
  const caller = async (headers: Headers, peer?: string): Promise<Caller> => {
    const token = bearerToken(headers);
    if (!token) throw new ConnectError("missing bearer token", Code.Unauthenticated);
    refusePublishedTokenFromAfar(token, adminToken, peer, headers);
    if (safeEqual(token, adminToken)) return { kind: "admin" };
    if (!token.startsWith(keySecretPrefix)) throw new ConnectError("invalid admin token", Code.PermissionDenied);
    const { apiKey } = await resolveKey(token, clock());
    return { kind: "api_key", orgId: apiKey.orgId, apiKeyId: apiKey.id };
  };

  return {
    resolveKey,
    caller,

    requireAdmin(headers: Headers): void {
      requireAdmin(headers, adminToken);
    },

    /**
     * Throws as `notFound` does for a record that does not exist unless the caller is an admin or holds a key of the
     * org owning it, so a key cannot learn which ids exist in other orgs.
     */
    requireOwnRecord(who: Caller, orgId: string, notFound: () => Error): void {
      if (who.kind === "api_key" && who.orgId !== orgId) throw notFound();
    },

    /** Throws unless the caller is an admin or holds a key of `orgId`. */
    requireOrgReader(who: Caller, orgId: string): void {
      if (who.kind === "api_key" && who.orgId !== orgId) {
        throw new ConnectError("an api key may only read its own organization", Code.PermissionDenied);
      }
    },
  };
}

export type BillingAuth = ReturnType<typeof createBillingAuth>;
