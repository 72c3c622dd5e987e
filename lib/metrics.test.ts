import { afterEach, expect, spyOn, test } from "bun:test";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createMetrics } from "./metrics.ts";

afterEach(() => {
  (performance.now as unknown as { mockRestore?: () => void }).mockRestore?.();
});

test("an RPC that takes minutes, as a gateway's call of a reasoning model does, falls in a bucket of its own", async () => {
  const metrics = createMetrics("test");
  let now = 0;
  spyOn(performance, "now").mockImplementation(() => now);
  const transport = createRouterTransport(
    (router) =>
      router.service(BillingService, {
        async authorizeKey() {
          now += 95_000;
          return {};
        },
      }),
    { router: { interceptors: [metrics.serverInterceptor] } },
  );
  await createClient(BillingService, transport).authorizeKey({});
  const values = (await metrics.registry.getSingleMetric("rpc_server_handling_seconds")?.get())?.values ?? [];
  const buckets = values
    .filter((v) => (v as { metricName?: string }).metricName?.endsWith("_bucket"))
    .map((v) => [v.labels.le, v.value]);
  // 95 s is told from 10 s (the bound a quantile of longer calls would read as) and from the whole-request limit.
  expect(buckets.filter(([le]) => typeof le === "number" && le >= 10)).toEqual([
    [10, 0],
    [30, 0],
    [60, 0],
    [120, 1],
    [300, 1],
    [600, 1],
  ]);
});
