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
   * (store.periodUsage).
   */
  load: (orgId: string, period: TimeRange, keyIds: readonly string[]) => Promise<PeriodUsage>;
  clock: () => Date;
  /**
   * Figures older than this are re-read before answering, picking up what other billing replicas recorded: no answer
   * misses another replica's usage committed more than this long before it was asked.
   */
  refreshMs?: number;
  /** Orgs kept in memory; the least recently used beyond this are forgotten. */
  maxOrgs?: number;
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
export function createUsageTracker({ load, clock, refreshMs = 1_000, maxOrgs = 10_000 }: UsageTrackerOptions) {
  const entries = new Map<string, Entry>();

  const refresh = (orgId: string, entry: Entry, keyIds: readonly string[]): Promise<void> => {
    const name = keyIds.join(",");
    const running = entry.loads.get(name);
    if (running) return running.done;
    const run: Load = { done: Promise.resolve(), pending: [] };
    entry.loads.set(name, run);
    run.done = (async () => {
      try {
        const loadedAt = clock().getTime();
        const usage = await load(orgId, entry.period, keyIds);
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
        entry.loads.delete(name);
      }
    })();
    return run.done;
  };

  const stale = (figures: Figures | undefined, now: number) => !figures || now - figures.loadedAt >= refreshMs;

  return {
    /**
     * Spend of the org, and of the keys of a key's lineage together, in the org's current period; reads Postgres
     * on first use, in a new period and when the figures are `refreshMs` old, and fails when that read fails.
     */
    async spend(org: { id: string; billingDay: number }, lineageKeyIds: readonly string[]): Promise<Spend> {
      const now = clock();
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
        await refresh(org.id, entry, lineageKeyIds);
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
