import { Counter, Gauge, type Registry } from "prom-client";
import { pingTimeoutMs } from "../lib/health.ts";
import type { Logger } from "../lib/log.ts";

/**
 * Billing's domain metrics; RPC counts and latencies come from lib/metrics.ts. Open leases are read from Postgres at
 * each scrape, given `timeoutMs` to answer.
 */
export function createBillingMetrics(
  registry: Registry,
  sources: { openLeases(timeoutMs: number): Promise<{ active: number; abandoned: number }> },
  log: Logger,
  timeoutMs = pingTimeoutMs,
) {
  return {
    openLeases: new Gauge({
      name: "billing_budget_leases_open",
      help:
        "Unreleased budget leases of current billing periods: active, or abandoned (expired without a release, " +
        "its gateway gone; it reserves its grant for BUDGET_LEASE_GRACE_SECONDS more).",
      labelNames: ["state"] as const,
      registers: [registry],
      async collect() {
        // A Postgres that refuses or hangs leaves these series out, rather than failing or stalling the whole scrape,
        // billing's RPC errors (which say what is wrong) with it.
        let timer: ReturnType<typeof setTimeout> | undefined;
        try {
          const expired = new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
          });
          const open = await Promise.race([sources.openLeases(timeoutMs), expired]);
          this.set({ state: "active" }, open.active);
          this.set({ state: "abandoned" }, open.abandoned);
        } catch (e) {
          this.reset();
          log.warn("metrics: open budget leases not read from postgres", { err: e });
        } finally {
          clearTimeout(timer);
        }
      },
    }),
    usageRows: new Counter({
      name: "billing_usage_rows_total",
      help: "Usage records received by RecordUsage: inserted, or duplicate (already known by request_id).",
      labelNames: ["result"] as const,
      registers: [registry],
    }),
    leases: new Counter({
      name: "billing_budget_leases_total",
      help:
        "AcquireBudgetLease answers: granted (some budget), exhausted (nothing left to grant), holder_share " +
        "(the asking gateway already holds its share of what is left), or repeated (a lease granted to an earlier " +
        "ask of its lease_id, answered again; its budget counted once).",
      labelNames: ["result"] as const,
      registers: [registry],
    }),
    leasedUsd: new Counter({
      name: "billing_budget_leased_usd_total",
      help: "Budget granted in leases, in USD (monitoring only; leases are exact nano-USD).",
      registers: [registry],
    }),
    authorizations: new Counter({
      name: "billing_key_authorizations_total",
      help: "AuthorizeKey answers: ok, or rejected (unknown, revoked or expired key, or its org suspended).",
      labelNames: ["result"] as const,
      registers: [registry],
    }),
    invoices: new Counter({
      name: "billing_invoices_generated_total",
      help: "Invoices generated or regenerated as drafts.",
      registers: [registry],
    }),
  };
}

export type BillingMetrics = ReturnType<typeof createBillingMetrics>;
