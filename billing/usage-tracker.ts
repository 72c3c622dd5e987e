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
  /** Reads an org's usage of a period with the snapshot it was read in (store.periodUsage). */
  load: (orgId: string, period: TimeRange) => Promise<PeriodUsage>;
  clock: () => Date;
  /**
   * Figures older than this are re-read before answering, picking up what other billing replicas recorded: no answer
   * misses another replica's usage committed more than this long before it was asked.
   */
  refreshMs?: number;
  /** Orgs kept in memory; the least recently used beyond this are forgotten. */
  maxOrgs?: number;
}

interface Entry {
  period: TimeRange;
  usage?: PeriodUsage;
  visible?: (xid: bigint) => boolean;
  /** When the read that gave `usage` began: its snapshot is no older. */
  loadedAt: number;
  loading?: Promise<void>;
  /** Usage committed while a load was running: the load's snapshot decides whether it already counts. */
  pending: { xid: bigint; delta: UsageDelta }[];
}

/**
 * "Spent so far this period" per org and key, in memory. An org's figures are read once per period, and again when
 * asked for once they are `refreshMs` old (concurrent callers share one read); usage this replica records is added as
 * it commits. Each added batch carries
 * its transaction id and each read its snapshot, so a batch is counted exactly once whichever finished first.
 * A new billing period (UTC, from the org's billing day) starts from a fresh read.
 */
export function createUsageTracker({ load, clock, refreshMs = 1_000, maxOrgs = 10_000 }: UsageTrackerOptions) {
  const entries = new Map<string, Entry>();

  const refresh = (orgId: string, entry: Entry): Promise<void> => {
    entry.loading ??= (async () => {
      try {
        const startedAt = clock().getTime();
        const usage = await load(orgId, entry.period);
        const visible = snapshotVisibility(usage.snapshot);
        for (const { xid, delta } of entry.pending) if (!visible(xid)) apply(usage, delta);
        entry.usage = usage;
        entry.visible = visible;
        entry.loadedAt = startedAt;
      } finally {
        entry.pending = [];
        entry.loading = undefined;
      }
    })();
    return entry.loading;
  };

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
        entry = { period, loadedAt: 0, pending: [] };
      }
      entries.set(org.id, entry);
      if (entries.size > maxOrgs) entries.delete(entries.keys().next().value as string);

      // Stale figures are not answered: another replica's usage since would go unseen for as long as nobody asked.
      if (!entry.usage || now.getTime() - entry.loadedAt >= refreshMs) await refresh(org.id, entry);
      const usage = entry.usage as PeriodUsage;
      const spend = { orgSpentNanos: usage.orgSpentNanos, keySpentNanos: 0n, keyTokens: 0n };
      for (const keyId of lineageKeyIds) {
        const key = usage.keys.get(keyId);
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
        if (entry.loading) entry.pending.push({ xid, delta });
        if (entry.usage && entry.visible && !entry.visible(xid)) apply(entry.usage, delta);
      }
    },
  };
}

export type UsageTracker = ReturnType<typeof createUsageTracker>;

function apply(usage: PeriodUsage, delta: UsageDelta): void {
  usage.orgSpentNanos += delta.costNanos;
  if (!delta.apiKeyId) return;
  const key = usage.keys.get(delta.apiKeyId) ?? { spentNanos: 0n, tokens: 0n };
  key.spentNanos += delta.costNanos;
  key.tokens += delta.tokens;
  usage.keys.set(delta.apiKeyId, key);
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
