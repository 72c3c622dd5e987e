import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import type { Server } from "bun";
import OpenAI from "openai";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../../scripts/mesh.ts";

// One trace per request across the mesh, collected over OTLP/HTTP (JSON) from all three processes.

interface OtlpValue {
  stringValue?: string;
  intValue?: string | number;
  boolValue?: boolean;
}
interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind: number;
  links?: { traceId: string; spanId: string }[];
  attributes?: { key: string; value: OtlpValue }[];
}
interface Span extends OtlpSpan {
  service: string;
}

const adminToken = "trace-admin-token-0123456789";
const spans: Span[] = [];
let collector: Server<undefined>;
let dataDir: string;
let mesh: Mesh;
let demo: Demo;

beforeAll(async () => {
  collector = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      if (new URL(req.url).pathname !== "/v1/traces") return new Response("not found", { status: 404 });
      const body = (await req.json()) as {
        resourceSpans: { resource: { attributes: { key: string; value: OtlpValue }[] }; scopeSpans: { spans: OtlpSpan[] }[] }[];
      };
      for (const rs of body.resourceSpans) {
        const service = rs.resource.attributes.find((a) => a.key === "service.name")?.value.stringValue ?? "?";
        for (const ss of rs.scopeSpans) for (const span of ss.spans) spans.push({ ...span, service });
      }
      return Response.json({});
    },
  });
  dataDir = await mkdtemp(path.join(tmpdir(), "mesh-trace-"));
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    // JSON, read here as it is; protobuf, the default, is read in lib/config.test.ts.
    env: { OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${collector.port}`, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" },
    onLine: () => {},
  });
  demo = await ensureDemo(mesh, { dataDir, adminToken });
}, 120_000);

afterAll(async () => {
  await mesh?.stop();
  collector?.stop(true);
  await rm(dataDir, { recursive: true, force: true });
}, 60_000);

function attribute(span: Span, key: string): string | number | boolean | undefined {
  const v = span.attributes?.find((a) => a.key === key)?.value;
  return v?.stringValue ?? (v?.intValue === undefined ? v?.boolValue : Number(v.intValue));
}

/** The spans of one trace as an indented tree (links shown as "~>"), for assertions and for reading. */
function renderTree(all: Span[], traceId: string): string {
  const inTrace = all.filter((s) => s.traceId === traceId);
  const ids = new Set(inTrace.map((s) => s.spanId));
  const lines: string[] = [];
  const visit = (span: Span, depth: number) => {
    lines.push(`${"  ".repeat(depth)}${span.service}: ${span.name}`);
    for (const child of all.filter((s) => s.traceId === span.traceId && s.parentSpanId === span.spanId)) {
      visit(child, depth + 1);
    }
    for (const linked of all.filter((s) => s.links?.some((l) => l.spanId === span.spanId))) {
      lines.push(`${"  ".repeat(depth + 1)}~> (linked from another trace)`);
      visit(linked, depth + 2);
    }
  };
  for (const root of inTrace.filter((s) => !s.parentSpanId || !ids.has(s.parentSpanId))) visit(root, 0);
  return lines.join("\n");
}

test("a request is one trace from the client's traceparent through gateway, billing and analytics", async () => {
  const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
  const clientSpanId = "00f067aa0ba902b7";
  const client = new OpenAI({
    baseURL: demo.baseUrl,
    apiKey: demo.apiKey,
    maxRetries: 0,
    defaultHeaders: { traceparent: `00-${traceId}-${clientSpanId}-01` },
  });
  const { response } = await client.chat.completions
    .create({ model: "mock", messages: [{ role: "user", content: "trace me" }] })
    .withResponse();
  expect(response.status).toBe(200);

  // Spans arrive in batches from three processes; wait for the analytics batch that carries this request.
  const deadline = Date.now() + 20_000;
  const gatewaySpan = () => spans.find((s) => s.traceId === traceId && s.service === "gateway" && s.parentSpanId === clientSpanId);
  const batchSpan = () =>
    spans.find((s) => s.service === "analytics" && s.links?.some((l) => l.traceId === traceId && l.spanId === gatewaySpan()?.spanId));
  // Each process exports on its own schedule: billing's server spans may come after the ones that called them.
  const billingSpan = (traceOf: string | undefined, name: string) =>
    spans.find((s) => s.traceId === traceOf && s.service === "billing" && s.name === name);
  const complete = () => {
    const batch = batchSpan();
    return (
      gatewaySpan() !== undefined &&
      batch !== undefined &&
      billingSpan(traceId, "billing.v1.BillingService/AuthorizeKey") !== undefined &&
      billingSpan(batch.traceId, "billing.v1.BillingService/RecordUsage") !== undefined
    );
  };
  while (!complete() && Date.now() < deadline) await Bun.sleep(100);

  const root = gatewaySpan();
  const batch = batchSpan();
  const tree = renderTree(spans, traceId);
  process.stdout.write(`\ntrace ${traceId}\n${tree}\n`);
  expect(root).toBeDefined();
  expect(batch).toBeDefined();
  if (!root || !batch) return;

  // The gateway's server span continues the client's trace and is followed into billing.
  expect(root.kind).toBe(2); // SERVER
  const inTrace = spans.filter((s) => s.traceId === traceId);
  const authorize = inTrace.find((s) => s.service === "billing" && s.name === "billing.v1.BillingService/AuthorizeKey");
  expect(authorize).toBeDefined();
  // Children of the request span: key authorization, budget reservation, each upstream attempt, metric enqueue.
  const children = inTrace.filter((s) => s.parentSpanId === root.spanId).map((s) => s.name);
  for (const name of ["gateway.authorize_key", "gateway.reserve_budget", "chat mock-echo-1", "gateway.enqueue_metrics"]) {
    expect(children).toContain(name);
  }
  const attempt = inTrace.find((s) => s.name === "chat mock-echo-1");
  expect(attempt?.kind).toBe(3); // CLIENT
  expect(attempt && attribute(attempt, "gen_ai.provider.name")).toBe("mock");
  expect(attribute(root, "gen_ai.request.model")).toBe("mock");
  expect(Number(attribute(root, "gen_ai.usage.input_tokens"))).toBeGreaterThan(0);
  const ancestors = (span: Span | undefined): string[] => {
    const parent = span && inTrace.find((s) => s.spanId === span.parentSpanId);
    return parent ? [parent.spanId, ...ancestors(parent)] : [];
  };
  expect(ancestors(authorize)).toContain(root.spanId);

  // The analytics batch span links the request span and has the billing RecordUsage call under it.
  const batchTrace = spans.filter((s) => s.traceId === batch.traceId);
  const recordUsage = batchTrace.find((s) => s.service === "billing" && s.name === "billing.v1.BillingService/RecordUsage");
  expect(recordUsage).toBeDefined();
  const batchAncestors = (span: Span | undefined): string[] => {
    const parent = span && batchTrace.find((s) => s.spanId === span.parentSpanId);
    return parent ? [parent.spanId, ...batchAncestors(parent)] : [];
  };
  expect(batchAncestors(recordUsage)).toContain(batch.spanId);
  const insert = batchTrace.find((s) => s.name === "clickhouse.insert");
  expect(insert?.parentSpanId).toBe(batch.spanId);
}, 60_000);
