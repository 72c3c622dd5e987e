import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError } from "@connectrpc/connect";
import { Counter, Gauge, type Registry } from "prom-client";
import {
  type AuthorizeKeyResponse,
  type BillingService,
  KeyRefusalReason,
  KeyRefusalSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import { createKeyCache } from "../lib/key-cache.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import { watchSilence } from "../lib/silence.ts";
import { type GatewayError, organizationSuspended, serviceUnavailable, unauthorized } from "./errors.ts";

/** The same answer whether the key expired while cached or billing already refuses it as expired. */
const keyExpired = () => unauthorized("This API key has expired.", "expired_api_key");
/** The refusal of a secret that is no key: billing knows none by it, or it has no key's shape. */
const unknownKeyMessage = "Incorrect API key provided.";

/** Who is calling, as billing resolved the API key. */
export interface Principal {
  apiKeyId: string;
  /** The first key of its lineage (itself unless rotated from another): what per-key limits are counted by. */
  lineageId: string;
  orgId: string;
  projectId: string;
  /** Public model names the key may use; undefined allows all. */
  allowedModels: ReadonlySet<string> | undefined;
  /** Epoch ms after which the key is rejected; undefined never expires. */
  expireMs: number | undefined;
  /** Everything billing returned (limits, spend), for budgets and quotas. */
  grant: AuthorizeKeyResponse;
  /** When (by the authorizer's `now`) the AuthorizeKey call that returned `grant` started: its figures are at least this recent. */
  authorizedAt: number;
}

export interface KeyAuthorizer {
  /** The principal of a presented secret, or a 401/403/503 GatewayError. */
  authorize(secret: string | undefined): Promise<Principal>;
  /**
   * As authorize, at once, when the cache can answer (a key checked lately): its principal, or its refusal thrown.
   * Undefined when billing must be asked, which authorize does.
   */
  cached(secret: string | undefined): Principal | undefined;
  /** Drops a cached key by the SHA-256 hex of its secret (revocations, limit changes). */
  forget(secretHash: string): void;
  /**
   * Whether a principal this authorizer gave is still good to serve with: not expired, and its key not dropped since
   * by a change (revoked, its limits or its org changed). No hashing, no billing call: for a key checked moments ago.
   */
  stillGood(principal: Principal): boolean;
  /** Drops every cached key of an org, and the refusals of its keys while it was suspended (its settings changed). */
  forgetOrg(orgId: string): void;
  /**
   * Tells the cache whether billing's change stream is delivering: while it is, keys loaded since it
   * started are trusted for the full TTL; otherwise every entry is trusted only for the short fallback TTL.
   */
  setWatching(healthy: boolean): void;
  /** True while some key billing vouched for is recent enough to be admitted stale, should billing not answer. */
  vouchedLately(): boolean;
  /** True while billing's last key check found it unreachable or unavailable and nothing has answered since. */
  billingDown(): boolean;
  /** Keys remembered, working and refused. */
  size(): number;
}

export interface KeyAuthorizerOptions {
  billing: Pick<Client<typeof BillingService>, "authorizeKey">;
  /** How long a valid key is trusted without asking billing again, while key changes are watched. */
  hitTtlMs?: number;
  /** How long a valid key is trusted while key changes are not being watched. */
  fallbackTtlMs?: number;
  /** How long an unknown or revoked key is rejected without asking billing again. */
  missTtlMs?: number;
  /**
   * How long after billing last vouched for a key it keeps working while billing cannot be asked (unreachable,
   * Unavailable, DeadlineExceeded), asked again in the background; 0 (the default): a 503 once its entry expires.
   * A refusal billing answers takes effect at once; a revocation billing could not tell of is the risk taken.
   */
  staleMs?: number;
  /** Working keys remembered at most (100,000 by default); the least recently loaded go first. */
  maxEntries?: number;
  /** Rejected secrets remembered at most (10,000 by default), apart from the keys that work. */
  maxRejectedEntries?: number;
  /** Start as if the change stream were healthy (callers that apply changes by other means). */
  watching?: boolean;
  /**
   * Whether a secret has the shape of the keys billing makes. One that has not is refused at once as an unknown key
   * would be, without a billing call or a place in the cache: made-up tokens cost billing nothing. Unset, every secret
   * is asked about.
   */
  keyShaped?: (secret: string) => boolean;
  /**
   * Milliseconds, for cache ages and the stale window: a monotonic clock by default, since a wall clock stepped back
   * would keep entries, a revoked key's among them, for as long as the step.
   */
  now?: () => number;
  /** Wall-clock milliseconds, which keys' expire_time is compared with (Date.now by default). */
  clock?: () => number;
  log?: Logger;
  /** Where the cache's hit and miss counts register; none when unset. */
  registry?: Registry;
  /**
   * Told of a key that worked and billing now refuses (revoked or expired while the change stream was down, so its
   * change went unheard): its budget leases can go back to billing, as for a revocation the stream reports.
   * `refusedAt` is when (by `now`) the refused check began: a key that works again (its expiry moved, its org
   * reinstated) is authorized after it.
   */
  onRefused?: (apiKeyId: string, refusedAt: number) => void;
}

interface Entry {
  principal: Principal | undefined;
  rejection: GatewayError | undefined;
  /** The org of a key refused because the org is suspended: a change of the org (reinstating it) drops the refusal. */
  suspendedOrgId?: string;
  /** When the AuthorizeKey call that produced this entry started. */
  loadedAt: number;
  /** While billing cannot be asked and the key is served stale: when it is asked about again. */
  retryAt?: number;
}

interface Load {
  promise: Promise<Entry>;
  /** Set when the key changed while this load was in flight: its answer may predate the change. */
  stale: boolean;
}

/**
 * Resolves API keys through billing's AuthorizeKey, cached by the SHA-256 of the secret so a hit
 * costs no round trip. Concurrent misses for one key share one call; busy keys are refreshed
 * before they expire so their requests never wait on billing. Changes billing announces (through
 * `watchKeyChanges`) drop entries at once; without that stream, entries live only `fallbackTtlMs`.
 */
export function createKeyAuthorizer(options: KeyAuthorizerOptions): KeyAuthorizer {
  const hitTtlMs = options.hitTtlMs ?? 30_000;
  const fallbackTtlMs = Math.min(hitTtlMs, options.fallbackTtlMs ?? 1_000);
  const missTtlMs = options.missTtlMs ?? 2_000;
  const staleMs = options.staleMs ?? 0;
  const now = options.now ?? (() => performance.timeOrigin + performance.now());
  const clock = options.clock ?? Date.now;
  /** Principals whose keys a change dropped from the cache: a call admitted with one is checked again. */
  const dropped = new WeakSet<Principal>();
  const cache = createKeyCache<Entry>({
    maxKeys: options.maxEntries ?? 100_000,
    maxRejected: options.maxRejectedEntries ?? 10_000,
    // Past its TTL and the stale window a key is asked about again: its entry (about 1.5 KB) is of no more use.
    expired: (entry) => now() - entry.loadedAt >= (entry.rejection ? missTtlMs : Math.max(hitTtlMs, staleMs)),
  });
  const loading = new Map<string, Load>();
  const lookups = options.registry
    ? new Counter({
        name: "gateway_key_cache_lookups_total",
        help:
          "API key lookups: hit (answered from the cache, no billing call), miss (AuthorizeKey called or joined) or " +
          "malformed (no key's shape, refused without either).",
        labelNames: ["result"] as const,
        registers: [options.registry],
      })
    : undefined;
  const hits = lookups?.labels({ result: "hit" });
  const misses = lookups?.labels({ result: "miss" });
  const malformed = lookups?.labels({ result: "malformed" });
  const keyShaped = options.keyShaped;
  const staleAdmissions = options.registry
    ? new Counter({
        name: "gateway_key_stale_admissions_total",
        help: "Requests admitted on a key billing vouched for lately (GATEWAY_KEY_STALE_SECONDS) while it cannot be asked.",
        registers: [options.registry],
      })
    : undefined;
  /** Billing's last AuthorizeKey call found it unreachable or unavailable, and nothing has answered since. */
  let billingDown = false;
  /** Requests admitted stale in the current outage (logged once, when it starts, and counted when it ends). */
  let servedStale = 0;
  /** When the latest AuthorizeKey call that vouched for a key started. */
  let lastVouchedAt = Number.NEGATIVE_INFINITY;
  /** Start of the current healthy period of the change stream; undefined while it is down. */
  let watchedSince: number | undefined = options.watching ? Number.NEGATIVE_INFINITY : undefined;

  const store = (hash: string, entry: Entry) => {
    const was = cache.get(hash)?.principal;
    if (entry.rejection && was) options.onRefused?.(was.apiKeyId, entry.loadedAt);
    cache.set(hash, entry, entry.rejection !== undefined);
  };

  const ttlOf = (entry: Entry) => {
    if (entry.rejection) return missTtlMs;
    // Strictly after: a load begun in the very millisecond the stream was confirmed may predate it.
    return watchedSince !== undefined && entry.loadedAt > watchedSince ? hitTtlMs : fallbackTtlMs;
  };

  const billingOutage = createOutageLog(options.log, {
    failed: "billing AuthorizeKey failed",
    recovered: "billing AuthorizeKey answers again",
  });

  const staleOutage = createOutageLog(options.log, {
    failed: "billing cannot check API keys; keys it vouched for lately keep working",
    recovered: "billing answers again; API keys are checked before they are admitted",
  });
  /** Billing answers again (a key check, or its change stream): keys past their TTL are checked before admission. */
  const billingBack = () => {
    billingDown = false;
    staleOutage.recovered({ stale_admissions: servedStale });
    servedStale = 0;
  };
  const answered = () => {
    billingOutage.recovered();
    billingBack();
  };

  /** Admits a key billing vouched for within `staleMs`, asking billing again at most every `fallbackTtlMs`. */
  const admitStale = (hash: string, secret: string, entry: Entry, t: number): Principal => {
    if (t >= (entry.retryAt ?? 0) && !loading.has(hash)) {
      entry.retryAt = t + fallbackTtlMs;
      load(hash, secret).catch(() => {});
    }
    const principal = admit(entry);
    if (servedStale++ === 0) staleOutage.failed({ stale_seconds: staleMs / 1000 });
    staleAdmissions?.inc();
    return principal;
  };

  /** The entry of a key billing vouched for within `staleMs`, usable while billing cannot be asked. */
  const staleEntry = (hash: string, t: number): Entry | undefined => {
    const entry = cache.get(hash);
    return billingDown && entry?.principal && t - entry.loadedAt < staleMs ? entry : undefined;
  };

  const load = (hash: string, secret: string): Promise<Entry> => {
    const pending = loading.get(hash);
    if (pending) return pending.promise;
    const loadedAt = now();
    const current: Load = { promise: undefined as unknown as Promise<Entry>, stale: false };
    current.promise = options.billing
      .authorizeKey({ secret })
      .then(
        (grant): Entry => {
          answered();
          if (loadedAt > lastVouchedAt) lastVouchedAt = loadedAt;
          return { principal: principalOf(grant, loadedAt), rejection: undefined, loadedAt };
        },
        (e): Entry => {
          const err = ConnectError.from(e);
          const suspended = err.findDetails(KeyRefusalSchema).find(
            (d) => d.reason === KeyRefusalReason.ORGANIZATION_SUSPENDED,
          );
          if (err.code === Code.PermissionDenied && suspended) {
            answered();
            return { principal: undefined, rejection: organizationSuspended(), suspendedOrgId: suspended.orgId, loadedAt };
          }
          if (err.code === Code.Unauthenticated) {
            answered();
            const expired = err.findDetails(KeyRefusalSchema).some((d) => d.reason === KeyRefusalReason.EXPIRED);
            const rejection = expired ? keyExpired() : unauthorized(unknownKeyMessage);
            return { principal: undefined, rejection, loadedAt };
          }
          billingOutage.failed({ code: Code[err.code], err: err.rawMessage });
          // Not a refusal: billing could not be asked (a connection error is Unavailable too), or a check in flight was
          // cut off as billing went away (Canceled as its server closed the stream, Aborted as the connection reset).
          if (unreachable.has(err.code)) billingDown = true;
          throw serviceUnavailable("API keys cannot be checked right now; retry shortly.", "auth_unavailable");
        },
      )
      .then((entry) => {
        if (!current.stale) store(hash, entry);
        return entry;
      })
      .finally(() => {
        if (loading.get(hash) === current) loading.delete(hash);
      });
    loading.set(hash, current);
    return current.promise;
  };

  const admit = (entry: Entry): Principal => {
    if (entry.rejection) throw entry.rejection;
    const principal = entry.principal as Principal;
    if (principal.expireMs !== undefined && clock() >= principal.expireMs) {
      throw keyExpired();
    }
    return principal;
  };

  const presented = (secret: string | undefined): string => {
    if (!secret) {
      throw unauthorized("You didn't provide an API key: send `Authorization: Bearer <key>`.", "missing_api_key");
    }
    return secret;
  };

  /**
   * Throws for a secret without a key's shape. Asked only once the cache has not answered: such a secret is never
   * cached, so a cached key is not tested again on every request.
   */
  const refuseMalformed = (secret: string): undefined => {
    if (keyShaped && !keyShaped(secret)) {
      malformed?.inc();
      throw unauthorized(unknownKeyMessage);
    }
    return undefined;
  };

  /** The principal of a key the cache holds, or its refusal thrown; undefined when billing must be asked. */
  const fromCache = (hash: string, secret: string): Principal | undefined => {
    const t = now();
    const entry = cache.get(hash);
    if (!entry) return undefined;
    const age = t - entry.loadedAt;
    const ttl = ttlOf(entry);
    if (age < ttl) {
      if (age >= ttl * 0.8 && entry.principal && !loading.has(hash)) {
        // A failed refresh keeps the entry until it expires.
        load(hash, secret).catch(() => {});
      }
      hits?.inc();
      return admit(entry);
    }
    if (staleEntry(hash, t)) {
      hits?.inc();
      return admitStale(hash, secret, entry, t);
    }
    return undefined;
  };

  return {
    cached(secret) {
      const key = presented(secret);
      return fromCache(sha256Hex(key), key) ?? refuseMalformed(key);
    },
    async authorize(secret) {
      const key = presented(secret);
      const hash = sha256Hex(key);
      const cached = fromCache(hash, key);
      if (cached) return cached;
      refuseMalformed(key);
      misses?.inc();
      let loaded: Entry;
      try {
        loaded = await load(hash, key);
      } catch (e) {
        const t = now();
        const kept = staleEntry(hash, t);
        if (!kept) throw e;
        // Billing was just asked.
        kept.retryAt = t + fallbackTtlMs;
        return admitStale(hash, key, kept, t);
      }
      return admit(loaded);
    },
    stillGood(principal) {
      return !dropped.has(principal) && (principal.expireMs === undefined || clock() < principal.expireMs);
    },
    forget(secretHash) {
      const principal = cache.get(secretHash)?.principal;
      if (principal) dropped.add(principal);
      cache.delete(secretHash);
      const pending = loading.get(secretHash);
      if (pending) {
        pending.stale = true;
        loading.delete(secretHash);
      }
    },
    forgetOrg(orgId) {
      for (const [hash, entry] of cache.working()) {
        if (entry.principal?.orgId !== orgId) continue;
        dropped.add(entry.principal);
        cache.delete(hash);
      }
      for (const [hash, entry] of cache.refused()) if (entry.suspendedOrgId === orgId) cache.delete(hash);
      // Whose org a load in flight is of is not known until it answers: none of them is kept.
      for (const pending of loading.values()) pending.stale = true;
      loading.clear();
    },
    setWatching(healthy) {
      if (!healthy) watchedSince = undefined;
      else {
        watchedSince ??= now();
        billingBack();
      }
    },
    vouchedLately: () => now() - lastVouchedAt < staleMs,
    billingDown: () => billingDown,
    size: () => cache.size(),
  };
}

/** Codes of a key check billing could not answer, rather than one it answered with an error. */
const unreachable = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Canceled, Code.Aborted]);

function principalOf(grant: AuthorizeKeyResponse, authorizedAt: number): Principal {
  const key = grant.apiKey;
  const limits = key?.limits;
  return {
    apiKeyId: key?.id ?? "",
    lineageId: grant.lineageId || key?.id || "",
    orgId: key?.orgId || grant.organization?.id || "",
    projectId: key?.projectId ?? "",
    allowedModels: limits && limits.allowedModels.length > 0 ? new Set(limits.allowedModels) : undefined,
    expireMs: limits?.expireTime ? timestampMs(limits.expireTime) : undefined,
    grant,
    authorizedAt,
  };
}

export interface KeyChangeWatchOptions {
  billing: Pick<Client<typeof BillingService>, "watchKeyChanges">;
  keys: Pick<KeyAuthorizer, "forget" | "forgetOrg" | "setWatching">;
  /** Told of each key revoked (a rotation revokes the old key), so its budget leases can go back to billing. */
  onRevoked?: (apiKeyId: string) => void;
  /**
   * A stream silent this long counts as failed and is reopened (3 s by default). Billing sends an empty message once
   * it listens for changes, which confirms the stream, and then one a second when nothing changes: a billing replica
   * that hangs cannot keep a stream trusted while revocations pass it by.
   */
  silenceMs?: number;
  /** First reconnect delay; doubles up to `maxBackoffMs`, with jitter. */
  backoffMs?: number;
  maxBackoffMs?: number;
  random?: () => number;
  log?: Logger;
  /** Where `gateway_key_changes_stream_up` is registered. */
  registry?: Registry;
}

export interface KeyChangeWatch {
  /** True while the stream is confirmed to deliver. */
  healthy(): boolean;
  stop(): Promise<void>;
}

/**
 * Follows billing's WatchKeyChanges stream and drops each changed key (or every key of a changed org) from the cache,
 * so revocations, limit and org settings changes apply within a round trip. When the stream fails the cache falls
 * back to its short TTL, and the stream is reopened with exponential backoff.
 */
export function watchKeyChanges(options: KeyChangeWatchOptions): KeyChangeWatch {
  const { billing, keys, log } = options;
  const silenceMs = options.silenceMs ?? 3_000;
  const baseBackoffMs = options.backoffMs ?? 100;
  const maxBackoffMs = options.maxBackoffMs ?? 10_000;
  const random = options.random ?? Math.random;
  const stopping = new AbortController();
  let healthy = false;
  const up = options.registry
    ? new Gauge({
        name: "gateway_key_changes_stream_up",
        help: "1 while billing's key change stream is confirmed to deliver; 0 while keys are cached for the fallback TTL.",
        registers: [options.registry],
      })
    : undefined;
  up?.set(0);

  // Retried with backoff for as long as billing is down: logged as that starts and as the stream delivers again.
  const outage = createOutageLog(log, {
    failed: "key change stream failed; key cache uses its short TTL until it is back",
    recovered: "key change stream delivers again",
  });
  const setHealthy = (value: boolean) => {
    if (value) outage.recovered();
    healthy = value;
    up?.set(value ? 1 : 0);
    keys.setWatching(value);
  };

  /** Whether the stream delivered, and whether it then ended without an error after a silence's length. */
  const once = async (): Promise<{ delivered: boolean; ended: boolean }> => {
    const call = new AbortController();
    const onStop = () => call.abort();
    stopping.signal.addEventListener("abort", onStop);
    // Trusted from billing's first message, not before: it comes once billing listens, so nothing after is missed.
    const silence = watchSilence(silenceMs, () => call.abort());
    let ended = false;
    const openedAt = performance.now();
    try {
      // No deadline: the stream is meant to stay open for the life of the process.
      for await (const change of billing.watchKeyChanges({}, { signal: call.signal, timeoutMs: 0 })) {
        silence.heard();
        if (!healthy) setHealthy(true);
        if (change.secretHash) keys.forget(change.secretHash);
        if (change.orgId) keys.forgetOrg(change.orgId);
        if (change.revoked && change.apiKeyId) options.onRevoked?.(change.apiKeyId);
      }
      // Billing ends it as it stops, or as its connection goes past its age: watched again at once, unless it ended
      // soon (a billing stopping ends each new stream it is sent).
      ended = performance.now() - openedAt >= silenceMs;
      if (!stopping.signal.aborted) log?.info("key change stream ended by billing; watching again");
    } catch (e) {
      if (silence.expired) outage.failed({ err: `silent for ${silenceMs} ms` });
      else if (!stopping.signal.aborted) {
        const err = ConnectError.from(e);
        outage.failed({ code: Code[err.code], err: err.rawMessage });
      }
    } finally {
      silence.stop();
      stopping.signal.removeEventListener("abort", onStop);
    }
    const delivered = healthy;
    setHealthy(false);
    return { delivered, ended };
  };

  const running = (async () => {
    let backoff = baseBackoffMs;
    while (!stopping.signal.aborted) {
      const { delivered, ended } = await once();
      if (stopping.signal.aborted) break;
      if (delivered) backoff = baseBackoffMs;
      if (delivered && ended) continue;
      const wait = backoff * (0.5 + random() / 2);
      backoff = Math.min(maxBackoffMs, backoff * 2);
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          stopping.signal.removeEventListener("abort", done);
          resolve();
        };
        const timer = setTimeout(done, wait);
        stopping.signal.addEventListener("abort", done);
      });
    }
  })();

  return {
    healthy: () => healthy,
    async stop() {
      stopping.abort();
      await running;
    },
  };
}
