import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { Counter, type Registry } from "prom-client";
import { ulid } from "ulid";
import type { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import type { RateLimiter } from "./rate-limits.ts";

/**
 * Keeps a key's requests_per_minute and tokens_per_minute across gateway replicas, as Kong's rate limiting does with a
 * sync rate: every `intervalMs` while the limiter tracks keys with those limits, one SyncRateUsage call sends billing
 * what this replica changed in their windows and learns what the other replicas counted in them (the whole window of a
 * key new here, what changed since the last answer of the others). Requests never wait on it; between syncs, and
 * while billing does not answer, each replica goes on with its own counts and the others' last known, which expire
 * with the window.
 */

export interface RateSyncOptions {
  billing: Pick<Client<typeof BillingService>, "syncRateUsage">;
  limiter: RateLimiter;
  /**
   * This replica's name, to which each sync adds its own suffix: a replica restarted under the same name (a pod's
   * container after a crash) is another holder, so what its past life counted in the last minute counts as another
   * replica's, not as nothing.
   */
  holder: string;
  /** Between two syncs' starts; above 0. */
  intervalMs: number;
  /** Deadline of each call. */
  timeoutMs?: number;
  /** Deadline of the last call, made on close with what is left to report. */
  closeTimeoutMs?: number;
  log?: Logger;
  /** Where the counter of failed calls goes; none when unset. */
  registry?: Registry;
}

export interface RateSync {
  /** Syncs now, after the sync under way if there is one; never fails (a failure is logged and counted). */
  sync(): Promise<void>;
  /** Stops syncing, then reports what is left if billing answers within `closeTimeoutMs`. */
  close(): Promise<void>;
}

// SyncRateUsageRequest's bounds: a replica with more keys or changes than that makes several calls, one at a time.
const maxKeysPerCall = 10_000;
const maxUsagePerCall = 10_000;

export function startRateSync(options: RateSyncOptions): RateSync {
  const { billing, limiter } = options;
  const holder = `${options.holder}/${ulid()}`;
  const timeoutMs = options.timeoutMs ?? 2_000;
  const outage = createOutageLog(options.log, {
    failed: "rate usage sync with billing failed; per-minute limits count this replica's requests and the others' last known",
    recovered: "rate usage syncs with billing answer again",
  });
  const failures = options.registry
    ? new Counter({
        name: "gateway_rate_sync_failures_total",
        help: "SyncRateUsage calls to billing that failed: until one answers, per-minute limits count this replica's requests and the other replicas' last known counts.",
        registers: [options.registry],
      })
    : undefined;

  /**
   * Billing's clock at the first answer of the last sync whose calls were all answered: the next sync asks only for the
   * seconds the other replicas changed after it, besides the keys no answer has covered whole yet.
   */
  let changedAfter: Timestamp | undefined;

  const round = async (deadlineMs: number) => {
    const { sinceSecond, usage } = limiter.takeChanges();
    const tracked = limiter.trackedKeys();
    const keys = [...tracked.keyIds, ...tracked.newKeyIds];
    // With no answer to go on from, every key is asked whole.
    const known = changedAfter ? tracked.keyIds : [];
    const calls = Math.max(Math.ceil(keys.length / maxKeysPerCall), Math.ceil(usage.length / maxUsagePerCall));
    let asOf: Timestamp | undefined;
    for (let i = 0; i < calls; i++) {
      const [from, to] = [i * maxKeysPerCall, (i + 1) * maxKeysPerCall];
      const keyIds = known.slice(from, to);
      const newKeyIds = keys.slice(Math.max(from, known.length), to);
      try {
        const answer = await billing.syncRateUsage(
          {
            holder,
            usage: usage.slice(i * maxUsagePerCall, (i + 1) * maxUsagePerCall).map((change) => ({
              keyId: change.keyId,
              second: BigInt(change.second),
              requests: BigInt(change.requests),
              tokens: BigInt(change.tokens),
            })),
            keyIds,
            newKeyIds,
            sinceSecond: BigInt(sinceSecond),
            changedAfter,
          },
          { timeoutMs: deadlineMs },
        );
        asOf ??= answer.asOf;
        const others = answer.others.map((count) => ({
          keyId: count.keyId,
          second: Number(count.second),
          requests: Number(count.requests),
          tokens: Number(count.tokens),
        }));
        limiter.learnOthers(sinceSecond, others, newKeyIds);
      } catch (err) {
        // What billing did not get goes with the next sync; the others' counts already known stay until they expire. A
        // call whose answer was lost after billing had added its changes counts them twice for the rest of their
        // minute: stricter, never looser.
        limiter.restoreChanges(usage.slice(i * maxUsagePerCall));
        failures?.inc();
        outage.failed({ err });
        return;
      }
    }
    changedAfter = asOf;
    outage.recovered();
  };

  let running: Promise<void> | undefined;
  const sync = (deadlineMs = timeoutMs): Promise<void> => {
    const next = (running ?? Promise.resolve()).then(() => round(deadlineMs));
    running = next;
    void next.finally(() => {
      if (running === next) running = undefined;
    });
    return next;
  };
  // A tick while a sync is still under way (billing slow to answer) is skipped: never two calls at once.
  const timer = setInterval(() => {
    if (!running && limiter.size() > 0) void sync();
  }, options.intervalMs);

  return {
    sync: () => sync(),
    async close() {
      clearInterval(timer);
      await running;
      if (limiter.size() > 0) await sync(options.closeTimeoutMs ?? 1_000);
    },
  };
}
