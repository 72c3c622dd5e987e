import { afterAll, beforeAll, expect, test } from "bun:test";
import type { Interceptor } from "@connectrpc/connect";
import { SpanKind, trace } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { setupTelemetry } from "../lib/telemetry.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { oneModelRoutes, startTestGateway } from "./testing/served-gateway.ts";

// A mesh whose proxies speak Zipkin's B3 headers (OTEL_PROPAGATORS=b3multi): a caller's B3 trace is continued, and
// the gateway's own calls send B3 onward, not W3C's traceparent.

const exporter = new InMemorySpanExporter();
const telemetry = setupTelemetry({ service: "gateway-test", version: "0", exporter, propagators: ["b3multi"] });
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  upstream = startFakeUpstream();
  gateway = await startTestGateway(oneModelRoutes(upstream.url), {
    interceptors: [telemetry.serverInterceptor],
    tracer: telemetry.tracer,
  });
});
afterAll(async () => {
  await gateway.close();
  await upstream.stop();
  // The propagators and tracer provider are the process's: later test files get the default propagators and set up
  // a provider of their own.
  setupTelemetry({ service: "gateway-test", version: "0" });
  trace.disable();
});

const traceId = "80f198ee56343ba864fe8b2a57d3eff7";
const callerSpanId = "e457b5a2e4d86bd1";
const serverSpan = (name: string) =>
  exporter.getFinishedSpans().find((s) => s.name === name && s.kind === SpanKind.SERVER && s.spanContext().traceId === traceId);

test("a REST request with B3 headers, multi or single, continues the caller's trace", async () => {
  const multi = { "x-b3-traceid": traceId, "x-b3-spanid": callerSpanId, "x-b3-sampled": "1" };
  for (const headers of [multi, { b3: `${traceId}-${callerSpanId}-1` }]) {
    exporter.reset();
    const res = await fetch(`${gateway.url}/v1/models`, { headers: { authorization: "Bearer sk-good", ...headers } });
    expect(res.status).toBe(200);
    const span = serverSpan("GET /v1/models");
    expect(span?.parentSpanContext?.spanId).toBe(callerSpanId);
  }
});

test("an RPC client sends its trace context as B3 headers, which the server continues", async () => {
  exporter.reset();
  let sent: Headers | undefined;
  const recorder: Interceptor = (next) => (req) => {
    sent = new Headers(req.header);
    return next(req);
  };
  const client = createServiceClient(GatewayService, {
    baseUrl: gateway.url,
    bearerToken: "sk-good",
    interceptors: [telemetry.clientInterceptor, recorder],
  });
  await telemetry.tracer.startActiveSpan("caller", async (caller) => {
    await client.listModels({});
    caller.end();
  });
  const clientSpan = exporter.getFinishedSpans().find((s) => s.kind === SpanKind.CLIENT);
  expect(sent?.get("x-b3-traceid")).toBe(clientSpan?.spanContext().traceId);
  expect(sent?.get("x-b3-spanid")).toBe(clientSpan?.spanContext().spanId);
  expect(sent?.get("traceparent")).toBeNull();
  const server = exporter.getFinishedSpans().find((s) => s.kind === SpanKind.SERVER);
  expect(server?.spanContext().traceId).toBe(clientSpan?.spanContext().traceId);
  expect(server?.parentSpanContext?.spanId).toBe(clientSpan?.spanContext().spanId);
  // Both ends say the call's code, OK included.
  expect([clientSpan?.attributes["rpc.grpc.status_code"], server?.attributes["rpc.grpc.status_code"]]).toEqual([0, 0]);
});
