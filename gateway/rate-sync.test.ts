import { afterEach, describe, expect, test } from "bun:test";
import { Registry } from "prom-client";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { freePort } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { eventually } from "../test/support.ts";
import { createRateLimiter } from "./rate-limits.ts";
import { type RateSync, type RateSyncOptions, startRateSync } from "./rate-sync.ts";
import { createTestLogger } from "./testing.ts";

const rpm = { requestsPerMinute: 10, tokensPerMinute: 0 };
const syncs: RateSync[] = [];
afterEach(async () => {
  await Promise.all(syncs.splice(0).map((sync) => sync.close()));
});

function started(options: RateSyncOptions): RateSync {
  const sync = startRateSync(options);
  syncs.push(sync);
  return sync;
}

const failures = async (registry: Registry) =>
  (await registry.getSingleMetric("gateway_rate_sync_failures_total")?.get())?.values[0]?.value ?? 0;

describe("while billing does not answer", () => {
  test("changes wait for the next sync, which comes at the next tick; the outage is logged once and counted", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: `http://127.0.0.1:${await freePort()}` });
    const limiter = createRateLimiter();
    const log = createTestLogger();
    const registry = new Registry();
    limiter.admit("k", rpm, 0);
    const sync = started({ billing, limiter, holder: "gw", intervalMs: 50, log, registry });
    await eventually(async () => (await failures(registry)) >= 4, { intervalMs: 20, what: "four syncs failed" });
    await sync.close();
    // Once as a warning; the failures after it only at debug level.
    const warnings = log.lines.filter((line) => JSON.parse(line).level === "warn");
    expect(warnings.map((line) => JSON.parse(line).msg)).toEqual([
      "rate usage sync with billing failed; per-minute limits count this replica's requests and the others' last known",
    ]);
    expect(limiter.takeChanges().usage).toEqual([{ keyId: "k", second: expect.any(Number), requests: 1, tokens: 0 }]);
  });

  test("a call billing never answers ends at its deadline, and no other is made meanwhile", async () => {
    const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      const client = createServiceClient(BillingService, { baseUrl: `http://127.0.0.1:${silent.port}` });
      let calls = 0;
      let running = 0;
      let most = 0;
      const billing: RateSyncOptions["billing"] = {
        async syncRateUsage(req, options) {
          calls++;
          most = Math.max(most, ++running);
          try {
            return await client.syncRateUsage(req, options);
          } finally {
            running--;
          }
        },
      };
      const limiter = createRateLimiter();
      limiter.admit("k", rpm, 0);
      const begun = performance.now();
      const sync = started({ billing, limiter, holder: "gw", intervalMs: 20, timeoutMs: 200, closeTimeoutMs: 200 });
      await eventually(() => calls >= 3, { intervalMs: 20, what: "three calls" });
      const elapsed = performance.now() - begun;
      await sync.close();
      expect(most).toBe(1);
      // Each call waited out its 200 ms before the next tick could make another.
      expect(elapsed).toBeGreaterThanOrEqual(400);
      expect(limiter.takeChanges().usage).toHaveLength(1);
    } finally {
      silent.stop(true);
    }
  });

  test("no call is made while the limiter tracks no key with per-minute limits", async () => {
    let calls = 0;
    const billing: RateSyncOptions["billing"] = {
      syncRateUsage: async () => {
        calls++;
        throw new Error("not called");
      },
    };
    const limiter = createRateLimiter();
    limiter.admit("k", { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 1 }, 0);
    started({ billing, limiter, holder: "gw", intervalMs: 10 });
    await Bun.sleep(100);
    expect(calls).toBe(0);
  });
});
