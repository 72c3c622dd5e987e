import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { defaultReadMaxBytes } from "../lib/server.ts";
import { guardedRoutes } from "../lib/routes.ts";

/**
 * BillingService's routes. Callers without the admin token are turned away before their message is read, except on
 * the reads an org's own API key may make; usage batches from analytics and per-minute counts from gateways (10,000
 * counts and 10,000 new key ids of up to 128 characters each, past 1 MiB) are the only large messages.
 */
export function billingRoutes(impl: ServiceImpl<typeof BillingService>, adminToken: string): (router: ConnectRouter) => void {
  return guardedRoutes(BillingService, impl, {
    adminToken,
    orgMethods: ["getOrganization", "getUsageSummary", "listUsageRecords", "listInvoices", "getInvoice"],
    bulk: { recordUsage: defaultReadMaxBytes, syncRateUsage: defaultReadMaxBytes },
  });
}
