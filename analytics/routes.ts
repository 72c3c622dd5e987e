import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { AnalyticsService } from "../gen/analytics/v1/analytics_pb.ts";

export function analyticsRoutes(impl: ServiceImpl<typeof AnalyticsService>) {
  return (router: ConnectRouter) => router.service(AnalyticsService, impl);
}
