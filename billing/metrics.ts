import { Counter, Gauge, type Registry } from "prom-client";

/** Billing's domain metrics; RPC counts and latencies come from lib/metrics.ts. */
export function createBillingMetrics(
  registry: Registry,
  sources: { openLeases(): Promise<{ active: number; abandoned: number }> },
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
        const open = await sources.openLeases();
        this.set({ state: "active" }, open.active);
        this.set({ state: "abandoned" }, open.abandoned);
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
        "AcquireBudgetLease answers: granted (some budget), exhausted (nothing left to grant), or holder_share " +
        "(the asking gateway already holds its share of what is left).",
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
      help: "AuthorizeKey answers: ok, or rejected (unknown, revoked or expired key).",
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
