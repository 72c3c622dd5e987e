import { billingPeriod } from "../lib/billing-period.ts";
import type { Principal } from "./auth.ts";
import { insufficientQuota } from "./errors.ts";

/**
 * Per-key monthly token limits (KeyLimits.monthly_tokens: input + output tokens per billing period),
 * enforced with no billing round trip on the request path.
 *
 * A key's usage this period is held as a lower bound of the truth: the highest key_tokens billing
 * reported in an authorization read in this period, raised by the tokens this replica has settled
 * since. A fresh authorization raises it to billing's figure only when that is higher, so a token
 * already in billing's figure is never counted twice, and tokens of ours still on their way to
 * billing (metrics pipeline, spool) are not forgotten either.
 *
 * A request counts at its estimate (prompt + max output) while it runs. It is refused once the key is at or over
 * its limit, or once the estimates of its requests still running here would take it there (with a Retry-After: their
 * end may leave room), so concurrency does not multiply what one key can take past its limit. The limit can be
 * overshot by what the last admitted request uses beyond the room it found, and by what the lower bound misses:
 * other replicas' usage since this replica's last authorization of the key (at most the key cache TTL, plus their
 * metrics pipeline's lag) and the tokens of requests still running on other replicas.
 *
 * A new billing period (from the org's billing_day, 00:00 UTC, as billing computes it) starts from
 * zero at once; tokens count in the period their request started in, as billing records them.
 */

export interface TokenQuota {
  /**
   * Admits a request of the principal's key counted at `estimatedTokens` while it runs, or throws 429
   * insufficient_quota when the key has used its monthly tokens or its requests running here may use the rest.
   */
  admit(principal: Principal, estimatedTokens?: number): QuotaTicket;
}

/** An admitted request's share of its key's monthly tokens; settle it once with what the request used. */
export interface QuotaTicket {
  /**
   * `startMs` is when the request started (epoch ms): it decides the billing period, as in billing. A request that
   * went no further (refused by another limit) settles at 0 tokens, giving back what it held.
   */
  settle(tokens: bigint, startMs: number): void;
}

export interface TokenQuotaOptions {
  /** Epoch ms; must be the key authorizer's clock (it stamps `Principal.authorizedAt`). */
  now?: () => number;
  /**
   * Billing's figure from an authorization started this close after a period start may still be
   * the previous period's (clocks differ between hosts): it is not used, or it would stick.
   */
  periodSkewMs?: number;
  /** Keys tracked; the least recently used beyond this are forgotten (billing's figure takes over). */
  maxKeys?: number;
}

interface KeyUsage {
  /** Epoch ms at which the period these tokens belong to started. */
  periodStart: number;
  tokens: bigint;
  /** Estimates of this period's requests still running on this replica. */
  running: bigint;
}

const noTicket: QuotaTicket = { settle() {} };
// The Retry-After of a refusal that requests still running might make room for by ending, as for TPM.
const runningRetryS = 3;

export function createTokenQuota(options: TokenQuotaOptions = {}): TokenQuota {
  const now = options.now ?? Date.now;
  const periodSkewMs = options.periodSkewMs ?? 60_000;
  const maxKeys = options.maxKeys ?? 100_000;
  const keys = new Map<string, KeyUsage>();

  /** The key's usage, restarted when the period containing `at` is newer than the one it holds. */
  const usageOf = (keyId: string, billingDay: number, at: number): KeyUsage => {
    const start = periodStart(at, billingDay);
    let usage = keys.get(keyId);
    keys.delete(keyId);
    if (!usage || start > usage.periodStart) usage = { periodStart: start, tokens: 0n, running: 0n };
    // Maps iterate in insertion order: the first key is the least recently used.
    if (keys.size >= maxKeys) keys.delete(keys.keys().next().value as string);
    keys.set(keyId, usage);
    return usage;
  };

  return {
    admit(principal, estimatedTokens = 0) {
      const limit = principal.grant.apiKey?.limits?.monthlyTokens ?? 0n;
      if (limit <= 0n) return noTicket;
      // Per lineage: a rotated key's tokens so far on this replica stay counted, as billing counts them.
      const keyId = principal.lineageId;
      const billingDay = principal.grant.organization?.billingDay || 1;
      const usage = usageOf(keyId, billingDay, now());
      const readAt = principal.authorizedAt;
      if (
        periodStart(readAt, billingDay) === usage.periodStart &&
        readAt >= usage.periodStart + periodSkewMs &&
        principal.grant.keyTokens > usage.tokens
      ) {
        usage.tokens = principal.grant.keyTokens;
      }
      if (usage.tokens >= limit) {
        throw insufficientQuota(
          `This API key has used its monthly limit of ${limit} tokens (${usage.tokens} so far this billing period).`,
        );
      }
      if (usage.tokens + usage.running >= limit) {
        throw insufficientQuota(
          `This API key's requests still running may use the rest of its monthly limit of ${limit} tokens ` +
            `(${usage.tokens} used so far this billing period, ${usage.running} held by requests running). ` +
            `Retry in ${runningRetryS}s.`,
          runningRetryS,
        );
      }
      const held = BigInt(Math.max(0, Math.ceil(estimatedTokens)));
      usage.running += held;
      let settled = false;
      return {
        settle(tokens, startMs) {
          if (settled) return;
          settled = true;
          // The period's usage the hold was added to, even when a newer period or eviction replaced it since.
          usage.running -= held;
          const current = usageOf(keyId, billingDay, startMs);
          // Tokens of a request started in an earlier period belong to that one, as in billing.
          if (current.periodStart === periodStart(startMs, billingDay)) current.tokens += tokens;
        },
      };
    },
  };
}

/** Start (epoch ms) of the billing period containing `at`, as billing computes it. */
export function periodStart(at: number, billingDay: number): number {
  return billingPeriod(new Date(at), billingDay).start.getTime();
}
