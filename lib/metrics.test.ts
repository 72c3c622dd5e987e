import { afterEach, expect, spyOn, test } from "bun:test";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { Counter, Registry } from "prom-client";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createMetrics, createTalliedCounter } from "./metrics.ts";

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

test("a tallied counter reads as prom-client's own counter given the same increments, however often it is read", async () => {
  const tallied = new Registry();
  const direct = new Registry();
  const labelNames = ["endpoint", "code"] as const;
  const config = { name: "requests_total", help: "Requests.", labelNames } as const;
  const counted = createTalliedCounter({ ...config, registers: [tallied] });
  const counter = new Counter({ ...config, registers: [direct] });
  const increments: [Record<(typeof labelNames)[number], string | number>, number | undefined][] = [
    [{ endpoint: "chat", code: 200 }, undefined],
    [{ endpoint: "chat", code: 429 }, 2],
    // A series increased by 0 is shown all the same.
    [{ endpoint: "embeddings", code: 200 }, 0],
    [{ endpoint: "chat", code: 200 }, 5],
  ];
  for (const [i, [labels, by]] of increments.entries()) {
    counted.inc(labels, by);
    counter.inc(labels, by);
    // Read between increments too: what was added is added once.
    if (i === 1) expect(await tallied.metrics()).toBe(await direct.metrics());
  }
  expect(await tallied.metrics()).toBe(await direct.metrics());
  expect(await tallied.metrics()).toBe(await direct.metrics());
  expect(await tallied.metrics()).toContain('requests_total{endpoint="chat",code="200"} 6');
  expect(() => counted.inc({ endpoint: "chat", code: 200 }, -1)).toThrow(TypeError);
  expect(await tallied.metrics()).toBe(await direct.metrics());
});
