import { afterAll, expect, test } from "bun:test";
import { context, propagation, ROOT_CONTEXT, TraceFlags, trace } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { listen } from "bun";
import type { SamplerName } from "./config.ts";
import { createLogger } from "./log.ts";
import { extractContext, setupTelemetry } from "./telemetry.ts";

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
    // One span, one export (OTLP/HTTP protobuf, an empty ExportTraceServiceResponse its answer).
    exported += (await req.arrayBuffer()).byteLength > 0 ? 1 : 0;
    return new Response(new Uint8Array(), { headers: { "content-type": "application/x-protobuf" } });
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

test("OTEL_TRACES_SAMPLER decides whether a caller's sampled traceparent is followed, and spans name their process", () => {
  const caller = trace.setSpanContext(ROOT_CONTEXT, {
    traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
    spanId: "00f067aa0ba902b7",
    traceFlags: TraceFlags.SAMPLED,
    isRemote: true,
  });
  const traced = (sampler: SamplerName | undefined, sampleRatio: number) => {
    const exporter = new InMemorySpanExporter();
    const { tracer } = setupTelemetry({ service: "t", version: "0", instanceId: "gw-7", exporter, sampler, sampleRatio });
    tracer.startSpan("called", {}, caller).end();
    tracer.startSpan("new", {}, ROOT_CONTEXT).end();
    return exporter.getFinishedSpans();
  };
  const names = (sampler: SamplerName | undefined, sampleRatio: number) => traced(sampler, sampleRatio).map((s) => s.name);
  expect(names(undefined, 0)).toEqual(["called"]);
  expect(names("parentbased_traceidratio", 1)).toEqual(["called", "new"]);
  // Not parent-based: a client's traceparent cannot have its requests traced.
  expect(names("traceidratio", 0)).toEqual([]);
  expect(names("traceidratio", 1)).toEqual(["called", "new"]);
  expect(names("always_off", 1)).toEqual([]);
  expect(names("parentbased_always_off", 1)).toEqual(["called"]);
  expect(names("always_on", 0)).toEqual(["called", "new"]);
  expect(traced("always_on", 1)[0]?.resource.attributes).toMatchObject({
    "service.name": "t",
    "service.version": "0",
    "service.instance.id": "gw-7",
  });
});

test("with nowhere to export, a caller's traceparent goes onward with its sampling decision, unless the sampler decides alone", () => {
  const onward = (flags: string | undefined, sampler?: SamplerName) => {
    const { tracer } = setupTelemetry({ service: "t", version: "0", sampler });
    const traceparent = `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-${flags}`;
    const parent = extractContext(new Headers(flags === undefined ? {} : { traceparent }));
    return tracer.startActiveSpan("called", {}, parent, (span) => {
      const sent: Record<string, string> = {};
      propagation.inject(context.active(), sent);
      span.end();
      return sent.traceparent?.replace(/-[0-9a-f]{16}-/, "-<span>-");
    });
  };
  // Billing, analytics and an upstream that traces follow the caller's decision, as they would with no gateway between.
  expect(onward("01")).toBe("00-4bf92f3577b34da6a3ce929d0e0e4736-<span>-01");
  expect(onward("00")).toBe("00-4bf92f3577b34da6a3ce929d0e0e4736-<span>-00");
  // A request of its own is traced by none: nothing would see it.
  for (const sampler of [undefined, "always_on", "parentbased_always_on"] as const) expect(onward(undefined, sampler)).toMatch(/-00$/);
  // A sampler that is not parent-based keeps callers from deciding, exporting or not.
  expect(onward("01", "traceidratio")).toBe("00-4bf92f3577b34da6a3ce929d0e0e4736-<span>-00");
});
