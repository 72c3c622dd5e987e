import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { defaultReadMaxBytes } from "../lib/server.ts";
import { guardedRoutes } from "../lib/routes.ts";

/**
 * The methods that create, change or delete something. In JSON their messages may hold only the fields and enum names
 * they define: a misspelt field skipped would be a change not made, or, in UpdateApiKeyLimits without a mask, a limit
 * removed. The others (reads, lookups, the key change stream) skip what they do not know, as binary messages do.
 */
export const billingWrites = [
  "createOrganization",
  "updateOrganization",
  "suspendOrganization",
  "reinstateOrganization",
  "createProject",
  "createApiKey",
  "revokeApiKey",
  "rotateApiKey",
  "updateApiKeyLimits",
  "acquireBudgetLease",
  "releaseBudgetLease",
  "recordUsage",
  "createDiscountRule",
  "deleteDiscountRule",
  "generateInvoice",
  "updateInvoiceStatus",
] as const satisfies readonly (keyof ServiceImpl<typeof BillingService>)[];

/**
 * BillingService's routes. Callers without the admin token are turned away before their message is read, except on
 * the reads an org's own API key may make; usage batches from analytics are the only large messages.
 */
export function billingRoutes(impl: ServiceImpl<typeof BillingService>, adminToken: string): (router: ConnectRouter) => void {
  return guardedRoutes(BillingService, impl, {
    adminToken,
    orgMethods: ["getUsageSummary", "listUsageRecords", "listInvoices", "getInvoice"],
    bulk: { recordUsage: defaultReadMaxBytes },
    strictJson: billingWrites,
  });
}
