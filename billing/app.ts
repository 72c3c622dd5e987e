import type pg from "pg";
import type { Registry } from "prom-client";
import type { Logger } from "../lib/log.ts";
import { pingReadiness } from "../lib/health.ts";
import { createBillingAuth } from "./auth.ts";
import { createDatabaseOutageLog } from "./errors.ts";
import { invoicePages } from "./invoices/http.ts";
import { createBillingMetrics } from "./metrics.ts";
import { billingRoutes } from "./routes.ts";
import { createBillingService } from "./service.ts";
import { callSignal } from "./store/db.ts";
import { createBillingStore } from "./store/store.ts";
import type { TimeRange } from "./store/types.ts";
import { createUsageTracker } from "./usage-tracker.ts";

export interface BillingAppOptions {
  pool: pg.Pool;
  /** Bearer token of admins and of the other mesh services. */
  adminToken: string;
  clock: () => Date;
  /**
   * The time budget leases live by in place of the database's, for tests that move time (see
   * BudgetLeaseStoreOptions.clock); unset, every replica judges leases by Postgres's clock.
   */
  leaseClock?: () => Date;
  log: Logger;
  /** Aborted when the process is stopping. */
  stopSignal?: AbortSignal;
  /** Where billing's domain metrics register; none when unset (tests, benchmarks). */
  registry?: Registry;
  /** See BudgetLeaseStoreOptions. */
  abandonedLeaseGraceMs?: number;
  /** See BudgetLeaseStoreOptions. */
  holderFloorNanos?: bigint;
  /** See BudgetLeaseStoreOptions. */
  holderFloorTokens?: bigint;
  /** See BillingServiceOptions. */
  keyChangeHeartbeatMs?: number;
  /** Leases are deleted this many days after they stopped mattering (see pruneBudgetLeases); kept when unset. */
  leaseRetentionDays?: number;
  /** How often old leases are looked for, the first time at start. */
  leasePruneIntervalMs?: number;
}

/** Billing's parts wired together over one pool: what main.ts serves and what tests and benchmarks start. */
export function createBillingApp(options: BillingAppOptions) {
  const { pool, adminToken, clock, log, stopSignal, registry } = options;
  const { abandonedLeaseGraceMs, holderFloorNanos, holderFloorTokens } = options;
  const store = createBillingStore(pool, {
    abandonedLeaseGraceMs, holderFloorNanos, holderFloorTokens, clock: options.leaseClock,
  });
  const auth = createBillingAuth({ store, adminToken, clock });
  // A read of an org's usage is shared by the calls asking meanwhile: no one caller leaving cancels it, all of them do.
  const load = (orgId: string, period: TimeRange, keyIds: readonly string[], signal: AbortSignal) =>
    callSignal.run(signal, () => store.periodUsage(orgId, period, keyIds));
  const usage = createUsageTracker({ load, clock });
  const metrics =
    registry &&
    createBillingMetrics(registry, { openLeases: (timeoutMs) => store.openBudgetLeases(timeoutMs) }, log);
  const { keyChangeHeartbeatMs } = options;
  // One outage, whether RPCs or invoice pages meet it.
  const databaseOutage = createDatabaseOutageLog(log);
  const service = createBillingService({
    store, auth, usage, clock, log, stopSignal, metrics, keyChangeHeartbeatMs, databaseOutage,
  });
  if (options.leaseRetentionDays) pruneLeases(store, options.leaseRetentionDays, options, log);
  const readiness = pingReadiness("postgres", (timeoutMs) => store.ping(timeoutMs), log);
  stopSignal?.addEventListener("abort", () => void store.closePing(), { once: true });
  const http = invoicePages({ store, auth, log, databaseOutage });
  return { store, service, routes: billingRoutes(service, adminToken), http, readiness };
}

/** Deletes leases nothing reads again, at start and then every `leasePruneIntervalMs` until `stopSignal`. */
function pruneLeases(
  store: ReturnType<typeof createBillingStore>,
  retentionDays: number,
  options: Pick<BillingAppOptions, "stopSignal" | "leasePruneIntervalMs">,
  log: Logger,
) {
  // One run at a time: one held up (behind a lock, on a large backlog) is not joined by another every hour.
  let running = false;
  const prune = async () => {
    if (running) return;
    running = true;
    try {
      const pruned = await store.pruneBudgetLeases(retentionDays);
      if (pruned > 0) log.info("old budget leases deleted", { pruned, retention_days: retentionDays });
    } catch (e) {
      log.warn("old budget leases not deleted; trying again later", { err: e });
    } finally {
      running = false;
    }
  };
  void prune();
  const timer = setInterval(() => void prune(), options.leasePruneIntervalMs ?? 3_600_000);
  timer.unref?.();
  options.stopSignal?.addEventListener("abort", () => clearInterval(timer), { once: true });
}
