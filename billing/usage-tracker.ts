import { billingPeriod } from "./period.ts";
import type { PeriodUsage } from "./store/usage.ts";
import type { RecordedUsage, TimeRange, UsageDelta } from "./store/types.ts";

export interface Spend {
  orgSpentNanos: bigint;
  /** Of the key's lineage: the key and the keys it was rotated from. */
  keySpentNanos: bigint;
  /** Input + output tokens of the key's lineage. */
  keyTokens: bigint;
}

export interface UsageTrackerOptions {
  /**
   * Reads an org's spend and that of the keys named in a period, with the snapshot it was read in
   * (store.periodUsage); `signal` aborts once every caller waiting for the read has left.
   */
  load: (orgId: string, period: TimeRange, keyIds: readonly string[], signal: AbortSignal) => Promise<PeriodUsage>;
  clock: () => Date;
  /**
   * Figures older than this are re-read before answering, picking up what other billing replicas recorded: no answer
   * misses another replica's usage committed more than this long before it was asked.
   */
  refreshMs?: number;
  /** Orgs kept in memory; the least recently used beyond this are forgotten. */
  maxOrgs?: number;
  /**
   * How often figures `refreshMs` old are forgotten (at most; looked for as callers ask). They are read again before
   * they answer, so they serve nothing: kept, every key an org had checked stayed in memory until its period ended.
   */
  sweepMs?: number;
}

/** Figures as of a read, and what this replica recorded since that the read did not see. */
interface Figures {
  spentNanos: bigint;
  tokens: bigint;
  visible: (xid: bigint) => boolean;
  /** When the read that gave them began: its snapshot is no older. */
  loadedAt: number;
}

interface Load {
  done: Promise<void>;
  /** Aborts the read once the callers waiting for it have all left. */
  abandon: AbortController;
  /** Callers waiting for it that may still leave. */
  waiting: number;
  /** Usage committed while the read runs: its snapshot decides whether it already counts. */
  pending: { xid: bigint; delta: UsageDelta }[];
}

interface Entry {
  period: TimeRange;
  org?: Figures;
  /** Of the keys asked about, each as of its own latest read. */
  keys: Map<string, Figures>;
  /** Reads running, by the keys they read. */
  loads: Map<string, Load>;
}

/**
 * "Spent so far this period" per org and key, in memory. An org's figures and a key lineage's are read together when
 * first asked for, and again when asked for once they are `refreshMs` old (concurrent callers for the same keys share
 * one read); a read takes the org's total and those keys' alone, never the org's other keys. Usage this replica
 * records is added as it commits. Each added batch carries its transaction id and each read its snapshot, so a batch
 * is counted exactly once whichever finished first. A new billing period (UTC, from the org's billing day) starts
 * from a fresh read.
 */
export function createUsageTracker(options: UsageTrackerOptions) {
  const { load, clock, refreshMs = 1_000, maxOrgs = 10_000 } = options;
  const sweepMs = options.sweepMs ?? Math.max(refreshMs, 10_000);
  const entries = new Map<string, Entry>();
  let sweptAt = Number.NEGATIVE_INFINITY;

  const refresh = (orgId: string, entry: Entry, keyIds: readonly string[], signal?: AbortSignal): Promise<void> => {
    const name = keyIds.join(",");
    const run = entry.loads.get(name) ?? start(orgId, entry, keyIds, name);
    if (!signal) return run.done;
    // A read its callers have all left (their deadlines passed behind a lock, on a hung server) is cancelled, so it
    // does not hold a connection of the pool for as long as Postgres takes; the next caller starts another.
    run.waiting++;
    const leave = () => {
      if (--run.waiting > 0) return;
      if (entry.loads.get(name) === run) entry.loads.delete(name);
      run.abandon.abort(signal.reason);
    };
    if (signal.aborted) leave();
    else signal.addEventListener("abort", leave, { once: true });
    return run.done.finally(() => signal.removeEventListener("abort", leave));
  };

  const start = (orgId: string, entry: Entry, keyIds: readonly string[], name: string): Load => {
    const run: Load = { done: Promise.resolve(), abandon: new AbortController(), waiting: 0, pending: [] };
    entry.loads.set(name, run);
    run.done = (async () => {
      try {
        const loadedAt = clock().getTime();
        const usage = await load(orgId, entry.period, keyIds, run.abandon.signal);
        // Left out of `loads` when abandoned, it missed the usage recorded since: its figures are not kept.
        run.abandon.signal.throwIfAborted();
        const visible = snapshotVisibility(usage.snapshot);
        const org: Figures = { spentNanos: usage.orgSpentNanos, tokens: 0n, visible, loadedAt };
        const keys = new Map<string, Figures>();
        for (const id of keyIds) {
          const key = usage.keys.get(id);
          keys.set(id, { spentNanos: key?.spentNanos ?? 0n, tokens: key?.tokens ?? 0n, visible, loadedAt });
        }
        for (const { xid, delta } of run.pending) {
          if (visible(xid)) continue;
          org.spentNanos += delta.costNanos;
          const key = delta.apiKeyId ? keys.get(delta.apiKeyId) : undefined;
          if (key) add(key, delta);
        }
        // A read that began before the figures held now (another caller's, for other keys) is older: kept out.
        if (!entry.org || entry.org.loadedAt <= loadedAt) entry.org = org;
        for (const [id, key] of keys) {
          const held = entry.keys.get(id);
          if (!held || held.loadedAt <= loadedAt) entry.keys.set(id, key);
        }
      } finally {
        if (entry.loads.get(name) === run) entry.loads.delete(name);
      }
    })();
    return run;
  };

  const stale = (figures: Figures | undefined, now: number) => !figures || now - figures.loadedAt >= refreshMs;

  /**
   * Forgets stale figures, and orgs left with none and no read running. In a task of its own: a read that took longer
   * than refreshMs gives stale figures that its callers, resumed in the same task, still answer from.
   */
  const sweep = () => {
    const now = clock().getTime();
    for (const [orgId, entry] of entries) {
      for (const [keyId, key] of entry.keys) if (stale(key, now)) entry.keys.delete(keyId);
      if (entry.keys.size === 0 && entry.loads.size === 0 && stale(entry.org, now)) entries.delete(orgId);
    }
  };

  return {
    /**
     * Spend of the org, and of the keys of a key's lineage together, in the org's current period; reads Postgres
     * on first use, in a new period and when the figures are `refreshMs` old, and fails when that read fails.
     * `signal` is the caller's: a read all its callers have left is cancelled (none: a caller that stays).
     */
    async spend(
      org: { id: string; billingDay: number },
      lineageKeyIds: readonly string[],
      signal?: AbortSignal,
    ): Promise<Spend> {
      const now = clock();
      if (now.getTime() - sweptAt >= sweepMs) {
        sweptAt = now.getTime();
        setTimeout(sweep, 0);
      }
      const period = billingPeriod(now, org.billingDay);
      let entry = entries.get(org.id);
      if (entry) entries.delete(org.id);
      if (!entry || entry.period.start.getTime() !== period.start.getTime()) {
        entry = { period, keys: new Map(), loads: new Map() };
      }
      entries.set(org.id, entry);
      if (entries.size > maxOrgs) entries.delete(entries.keys().next().value as string);

      // Stale figures are not answered: another replica's usage since would go unseen for as long as nobody asked.
      const at = now.getTime();
      if (stale(entry.org, at) || lineageKeyIds.some((id) => stale(entry.keys.get(id), at))) {
        await refresh(org.id, entry, lineageKeyIds, signal);
      }
      const spend = { orgSpentNanos: entry.org?.spentNanos ?? 0n, keySpentNanos: 0n, keyTokens: 0n };
      for (const keyId of lineageKeyIds) {
        const key = entry.keys.get(keyId);
        spend.keySpentNanos += key?.spentNanos ?? 0n;
        spend.keyTokens += key?.tokens ?? 0n;
      }
      return spend;
    },

    /** Adds a batch this replica just committed. */
    record(recorded: RecordedUsage): void {
      if (recorded.added.length === 0) return;
      const xid = BigInt(recorded.xid);
      for (const delta of recorded.added) {
        const entry = entries.get(delta.orgId);
        if (!entry) continue;
        const day = Date.parse(`${delta.day}T00:00:00Z`);
        if (day < entry.period.start.getTime() || day >= entry.period.end.getTime()) continue;
        for (const run of entry.loads.values()) run.pending.push({ xid, delta });
        if (entry.org && !entry.org.visible(xid)) entry.org.spentNanos += delta.costNanos;
        const key = delta.apiKeyId ? entry.keys.get(delta.apiKeyId) : undefined;
        if (key && !key.visible(xid)) add(key, delta);
      }
    },

    /** Orgs and keys whose figures are held in memory. */
    held(): { orgs: number; keys: number } {
      let keys = 0;
      for (const entry of entries.values()) keys += entry.keys.size;
      return { orgs: entries.size, keys };
    },
  };
}

export type UsageTracker = ReturnType<typeof createUsageTracker>;

function add(key: Figures, delta: UsageDelta): void {
  key.spentNanos += delta.costNanos;
  key.tokens += delta.tokens;
}

/**
 * Whether a committed transaction is visible in a Postgres snapshot "xmin:xmax:xip1,xip2,...": it is when it
 * finished before the snapshot, i.e. below xmin, or below xmax and not listed as in progress.
 */
export function snapshotVisibility(snapshot: string): (xid: bigint) => boolean {
  const [xmin = "0", xmax = "0", list = ""] = snapshot.split(":");
  const min = BigInt(xmin);
  const max = BigInt(xmax);
  const inProgress = new Set(list ? list.split(",").map((x) => BigInt(x)) : []);
  return (xid) => xid < min || (xid < max && !inProgress.has(xid));
}
