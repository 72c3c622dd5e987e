import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError } from "@connectrpc/connect";
import type { AuthorizeKeyResponse, BillingService } from "../gen/billing/v1/billing_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import type { Logger } from "../lib/log.ts";
import { type GatewayError, serviceUnavailable, unauthorized } from "./errors.ts";

/** Who is calling, as billing resolved the API key. */
export interface Principal {
  apiKeyId: string;
  orgId: string;
  projectId: string;
  /** Public model names the key may use; undefined allows all. */
  allowedModels: ReadonlySet<string> | undefined;
  /** Epoch ms after which the key is rejected; undefined never expires. */
  expireMs: number | undefined;
  /** Everything billing returned (limits, spend), for budgets and quotas. */
  grant: AuthorizeKeyResponse;
}

export interface KeyAuthorizer {
  /** The principal of a presented secret, or a 401/503 GatewayError. */
  authorize(secret: string | undefined): Promise<Principal>;
  /** Drops a cached key by the SHA-256 hex of its secret (revocations, limit changes). */
  forget(secretHash: string): void;
}

export interface KeyAuthorizerOptions {
  billing: Pick<Client<typeof BillingService>, "authorizeKey">;
  /** How long a valid key is trusted without asking billing again. */
  hitTtlMs?: number;
  /** How long an unknown or revoked key is rejected without asking billing again. */
  missTtlMs?: number;
  maxEntries?: number;
  now?: () => number;
  log?: Logger;
}

interface Entry {
  principal: Principal | undefined;
  rejection: GatewayError | undefined;
  expiresAt: number;
  /** After this, a hit still answers from the cache but refreshes the entry in the background. */
  refreshAt: number;
}

/**
 * Resolves API keys through billing's AuthorizeKey, cached by the SHA-256 of the secret so a hit
 * costs no round trip. Concurrent misses for one key share one call; busy keys are refreshed
 * before they expire so their requests never wait on billing.
 */
export function createKeyAuthorizer(options: KeyAuthorizerOptions): KeyAuthorizer {
  const hitTtlMs = options.hitTtlMs ?? 30_000;
  const missTtlMs = options.missTtlMs ?? 2_000;
  const maxEntries = options.maxEntries ?? 100_000;
  const now = options.now ?? Date.now;
  const cache = new Map<string, Entry>();
  const loading = new Map<string, Promise<Entry>>();

  const store = (hash: string, entry: Entry) => {
    cache.delete(hash);
    // Maps iterate in insertion order: the first key is the least recently loaded.
    if (cache.size >= maxEntries) cache.delete(cache.keys().next().value as string);
    cache.set(hash, entry);
  };

  const load = (hash: string, secret: string): Promise<Entry> => {
    const pending = loading.get(hash);
    if (pending) return pending;
    const promise = options.billing
      .authorizeKey({ secret })
      .then(
        (grant): Entry => {
          const t = now();
          return { principal: principalOf(grant), rejection: undefined, expiresAt: t + hitTtlMs, refreshAt: t + hitTtlMs * 0.8 };
        },
        (e): Entry => {
          const err = ConnectError.from(e);
          if (err.code === Code.Unauthenticated) {
            const t = now();
            const rejection = unauthorized("Incorrect API key provided.");
            return { principal: undefined, rejection, expiresAt: t + missTtlMs, refreshAt: t + missTtlMs };
          }
          options.log?.warn("billing AuthorizeKey failed", { code: Code[err.code], err: err.rawMessage });
          throw serviceUnavailable("API keys cannot be checked right now; retry shortly.", "auth_unavailable");
        },
      )
      .then((entry) => {
        store(hash, entry);
        return entry;
      })
      .finally(() => loading.delete(hash));
    loading.set(hash, promise);
    return promise;
  };

  const admit = (entry: Entry, t: number): Principal => {
    if (entry.rejection) throw entry.rejection;
    const principal = entry.principal as Principal;
    if (principal.expireMs !== undefined && t >= principal.expireMs) {
      throw unauthorized("This API key has expired.", "expired_api_key");
    }
    return principal;
  };

  return {
    async authorize(secret) {
      if (!secret) {
        throw unauthorized("You didn't provide an API key: send `Authorization: Bearer <key>`.", "missing_api_key");
      }
      const hash = sha256Hex(secret);
      const t = now();
      const entry = cache.get(hash);
      if (entry && t < entry.expiresAt) {
        if (t >= entry.refreshAt && entry.principal && !loading.has(hash)) {
          // A failed refresh keeps the entry until it expires.
          load(hash, secret).catch(() => {});
        }
        return admit(entry, t);
      }
      return admit(await load(hash, secret), now());
    },
    forget(secretHash) {
      cache.delete(secretHash);
    },
  };
}

function principalOf(grant: AuthorizeKeyResponse): Principal {
  const key = grant.apiKey;
  const limits = key?.limits;
  return {
    apiKeyId: key?.id ?? "",
    orgId: key?.orgId || grant.organization?.id || "",
    projectId: key?.projectId ?? "",
    allowedModels: limits && limits.allowedModels.length > 0 ? new Set(limits.allowedModels) : undefined,
    expireMs: limits?.expireTime ? timestampMs(limits.expireTime) : undefined,
    grant,
  };
}
