import { afterAll, beforeAll, expect, test } from "bun:test";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import OpenAI from "openai";
import { setupTelemetry } from "../lib/telemetry.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { startTestGateway } from "./testing/served-gateway.ts";

// An upstream bills the tier that served a request, which need not be the one asked for (flex served as default, auto
// as priority): the budget reservation covers the dearest, so the overshoot bound holds whichever serves.

const exporter = new InMemorySpanExporter();
const telemetry = setupTelemetry({ service: "gateway-test", version: "0", exporter });
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  upstream = startFakeUpstream();
  const routes = [
    "providers:",
    `  - { name: fake, kind: openai, base_url: "${upstream.url}" }`,
    "models:",
    "  - name: tiered",
    "    targets: [{ provider: fake, model: tiered }]",
    `    pricing: { input_per_mtok: "2", output_per_mtok: "8", service_tiers: { flex: { input_per_mtok: "1", output_per_mtok: "4" }, priority: { input_per_mtok: "4", output_per_mtok: "16" } } }`,
  ].join("\n");
  gateway = await startTestGateway(routes, { tracer: telemetry.tracer });
});
afterAll(async () => {
  await gateway.close();
  await upstream.stop();
});

test("a request is reserved at the dearest tier it can be billed at, whatever tier it asks for", async () => {
  const sdk = new OpenAI({ apiKey: "sk-good", baseURL: `${gateway.restUrl}/v1`, maxRetries: 0 });
  const reserved: number[] = [];
  for (const tier of [undefined, "flex", "priority", "auto"] as const) {
    exporter.reset();
    upstream.script("tiered", { usage: { prompt_tokens: 5, completion_tokens: 500, total_tokens: 505 }, serviceTier: "priority" });
    const { response } = await sdk.chat.completions
      .create({ model: "tiered", messages: [{ role: "user", content: "hello" }], max_tokens: 500, ...(tier && { service_tier: tier }) })
      .withResponse();
    const charged = (await gateway.row(response.headers.get("x-request-id") ?? "")).costNanos;
    const span = exporter.getFinishedSpans().find((s) => s.name === "gateway.reserve_budget");
    const maxCost = Number(span?.attributes["gateway.max_cost_nanos"]);
    // Served at priority: 5 input at $4 and 500 output at $16 a million.
    expect(charged).toBe(5n * 4_000n + 500n * 16_000n);
    expect(maxCost).toBeGreaterThanOrEqual(Number(charged));
    reserved.push(maxCost);
  }
  expect(new Set(reserved).size).toBe(1);
});
