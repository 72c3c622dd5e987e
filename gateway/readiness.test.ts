import { describe, expect, test } from "bun:test";
import type { ShipperStatus } from "./metrics-pipe.ts";
import { createReadiness } from "./readiness.ts";

function setup(billing: () => Promise<Response>) {
  const status: ShipperStatus = { connected: true, rows: 0, bytes: 0, maxBytes: 1000, full: false, lastError: undefined };
  let probes = 0;
  const readiness = createReadiness({
    billingUrl: "http://billing.test/",
    shipper: { status: () => status },
    cacheMs: 0,
    fetch: (async (url: string) => {
      probes++;
      expect(url).toBe("http://billing.test/readyz");
      return billing();
    }) as unknown as typeof fetch,
  });
  return { readiness, status, probes: () => probes };
}

describe("readiness", () => {
  test("ready with billing up and the spool under its bound, connected or not", async () => {
    const { readiness, status } = setup(async () => new Response("{}"));
    expect(await readiness()).toEqual({
      ready: true,
      checks: { billing: "ok", analytics: "ok", spool: "ok (0 rows, 0% of 1000 bytes)" },
    });
    Object.assign(status, { connected: false, rows: 12, bytes: 250, lastError: "connect ECONNREFUSED" });
    const disconnected = await readiness();
    expect(disconnected.ready).toBe(true);
    expect(disconnected.checks.analytics).toBe("disconnected (12 rows spooled)");
    expect(disconnected.checks.spool).toBe("ok (12 rows, 25% of 1000 bytes)");
    Object.assign(status, { connected: true, full: true, bytes: 999 });
    const full = await readiness();
    expect(full.ready).toBe(false);
    expect(full.checks.spool).toBe("full (12 rows, 100% of 1000 bytes): metrics are being dropped");
  });

  test("not ready when billing is unreachable or not ready", async () => {
    expect((await setup(async () => new Response("", { status: 503 })).readiness()).checks.billing).toBe("not ready (HTTP 503)");
    const down = await setup(async () => {
      throw new Error("connection refused");
    }).readiness();
    expect(down).toMatchObject({ ready: false, checks: { billing: "unreachable" } });
  });
});
