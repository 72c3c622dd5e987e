import { afterAll, expect, test } from "bun:test";
import { listen } from "bun";
import { createLogger } from "./log.ts";
import { setupTelemetry } from "./telemetry.ts";

// A collector that takes connections and never answers; and a port nobody listens on.
const hung = listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
const closed = listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
const closedPort = closed.port;
closed.stop(true);
let exported = 0;
const collector = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  async fetch(req) {
    exported += ((await req.json()) as { resourceSpans: unknown[] }).resourceSpans.length;
    return Response.json({});
  },
});
afterAll(() => Promise.all([hung.stop(true), collector.stop(true)]));

const stopWithCollector = async (endpoint: string) => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", write: (line) => lines.push(line) });
  const telemetry = setupTelemetry({ service: "t", version: "0", otlpEndpoint: endpoint, log, shutdownTimeoutMs: 500 });
  telemetry.tracer.startSpan("last").end();
  const start = performance.now();
  // The service's stop runs this last: a rejection would make its exit 1.
  await telemetry.shutdown();
  return { ms: performance.now() - start, log: lines.join("\n") };
};

test("shutdown with a collector that is down or hung resolves within its limit, logging the spans it lost", async () => {
  const down = await stopWithCollector(`http://127.0.0.1:${closedPort}`);
  expect(down.ms).toBeLessThan(2_000);
  expect(down.log).toContain("spans not exported at shutdown");

  const silent = await stopWithCollector(`http://127.0.0.1:${hung.port}`);
  expect(silent.ms).toBeLessThan(2_000);
  expect(silent.log).toContain("spans not exported at shutdown");
});

test("shutdown exports the last spans to a collector that answers", async () => {
  const { log } = await stopWithCollector(`http://127.0.0.1:${collector.port}`);
  expect(exported).toBe(1);
  expect(log).not.toContain("not exported");
});
