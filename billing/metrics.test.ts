import { expect, test } from "bun:test";
import { Registry } from "prom-client";
import { createLogger } from "../lib/log.ts";
import { createBillingMetrics } from "./metrics.ts";

const scrape = async (openLeases: () => Promise<{ active: number; abandoned: number }>) => {
  const lines: string[] = [];
  const log = createLogger({ service: "billing", write: (line) => lines.push(line) });
  const registry = new Registry();
  const metrics = createBillingMetrics(registry, { openLeases }, log, 200);
  metrics.usageRows.inc({ result: "inserted" }, 3);
  const start = performance.now();
  const text = await registry.metrics();
  return { text, ms: performance.now() - start, lines };
};

test("open leases are read at each scrape", async () => {
  const { text, lines } = await scrape(async () => ({ active: 2, abandoned: 1 }));
  expect(text).toContain('billing_budget_leases_open{state="active"} 2');
  expect(text).toContain('billing_budget_leases_open{state="abandoned"} 1');
  expect(lines).toEqual([]);
});

// Prometheus would mark billing down and lose its RPC errors, which say why, just when Postgres is.
test("a Postgres that refuses or hangs leaves the open leases out of a scrape that still answers", async () => {
  const down = await scrape(() => Promise.reject(new Error("connect ECONNREFUSED 10.0.0.5:5432")));
  expect(down.text).toContain('billing_usage_rows_total{result="inserted"} 3');
  expect(down.text).not.toContain("billing_budget_leases_open{");
  expect(down.lines.join("\n")).toContain("ECONNREFUSED");

  const hung = await scrape(() => new Promise(() => {}));
  expect(hung.ms).toBeLessThan(2_000);
  expect(hung.text).toContain('billing_usage_rows_total{result="inserted"} 3');
  expect(hung.text).not.toContain("billing_budget_leases_open{");
});
