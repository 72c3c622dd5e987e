import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";

export function billingRoutes(impl: ServiceImpl<typeof BillingService>) {
  return (router: ConnectRouter) => router.service(BillingService, impl);
}
