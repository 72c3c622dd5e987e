import type { Client } from "@connectrpc/connect";
import { Counter, type Registry } from "prom-client";
import { ulid } from "ulid";
import type { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import type { RateLimiter } from "./rate-limits.ts";

/**
 * Keeps a key's requests_per_minute and tokens_per_minute across gateway replicas, as Kong's rate limiting does with a
 * sync rate: every `intervalMs` while the limiter tracks keys with those limits, one SyncRateUsage call sends billing
 * what this replica counts now in the seconds of their windows that changed, and learns what the other replicas count
 * in them (the whole window of a key new here, what changed since the last answer for the others). Requests never wait
 * on it; between syncs, and while billing does not answer, each replica goes on with its own counts and the others'
 * last known, which expire with the window.
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

// SyncRateUsageRequest's bounds: a replica with more new keys or counts than that makes several calls, one at a time.
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

  // Numbers the calls: billing replaces a count only with a later call's, so a call it finished after this replica gave
  // up on it cannot undo the resend that followed.
  let sequence = 0n;
  /**
   * The watermark of the first answer of the last sync whose calls were all answered: the next sync asks for what the
   * other replicas changed in every key since it, besides the whole windows of the keys no answer has covered yet.
   * Undefined until a sync is answered, when every key is asked whole.
   */
  let watermark: bigint | undefined;

  const round = async (deadlineMs: number) => {
    const { sinceSecond, usage } = limiter.takeChanges();
    const tracked = limiter.trackedKeys();
    // A replica tracking no key has nothing to report or ask, and keeps its watermark for when it tracks one again.
    if (tracked.keyIds.length + tracked.newKeyIds.length === 0) return;
    const newKeyIds = watermark === undefined ? [...tracked.keyIds, ...tracked.newKeyIds] : tracked.newKeyIds;
    const calls = Math.max(1, Math.ceil(newKeyIds.length / maxKeysPerCall), Math.ceil(usage.length / maxUsagePerCall));
    let answered: bigint | undefined;
    for (let i = 0; i < calls; i++) {
      const newKeys = newKeyIds.slice(i * maxKeysPerCall, (i + 1) * maxKeysPerCall);
      try {
        const answer = await billing.syncRateUsage(
          {
            holder,
            usage: usage.slice(i * maxUsagePerCall, (i + 1) * maxUsagePerCall).map((count) => ({
              keyId: count.keyId,
              second: BigInt(count.second),
              requests: BigInt(count.requests),
              tokens: BigInt(count.tokens),
            })),
            sinceSecond: BigInt(sinceSecond),
            // The changes since the watermark come once a sync, with its first answer.
            changesSince: i === 0 ? (watermark ?? 0n) : 0n,
            newKeyIds: newKeys,
            sequence: ++sequence,
          },
          { timeoutMs: deadlineMs },
        );
        if (i === 0) answered = answer.watermark;
        const others = answer.others.map((count) => ({
          keyId: count.keyId,
          second: Number(count.second),
          requests: Number(count.requests),
          tokens: Number(count.tokens),
        }));
        limiter.learnOthers(sinceSecond, others, newKeys);
      } catch (err) {
        // The seconds billing did not get go with the next sync, at their counts then, which replace any it did get of a
        // call whose answer was lost. The watermark stays: the next sync asks again for what this one's answers held, and
        // the others' counts already known stay until they expire.
        limiter.restoreChanges(usage.slice(i * maxUsagePerCall));
        failures?.inc();
        outage.failed({ err });
        return;
      }
    }
    // A watermark of 0 would ask for no changes: the keys are then asked whole.
    watermark = answered || undefined;
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
