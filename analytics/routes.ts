import type { ConnectRouter, ServiceImpl } from "@connectrpc/connect";
import { AnalyticsService } from "../gen/analytics/v1/analytics_pb.ts";
import { defaultReadMaxBytes } from "../lib/server.ts";
import { guardedRoutes } from "../lib/routes.ts";

/**
 * AnalyticsService's routes. Metrics batches come from gateways with the admin token and may be large; the queries an
 * org's own API key may make too are small messages.
 */
export function analyticsRoutes(impl: ServiceImpl<typeof AnalyticsService>, adminToken: string): (router: ConnectRouter) => void {
  return guardedRoutes(AnalyticsService, impl, {
    adminToken,
    orgMethods: ["queryUsage", "queryTimeSeries", "queryLatency", "listRequests"],
    bulk: { ingestMetrics: defaultReadMaxBytes },
  });
}
