import * as http2 from "node:http2";
import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import type { Interceptor } from "@connectrpc/connect";
import type { Registry } from "prom-client";
import { type Tracer, trace } from "@opentelemetry/api";
import type { RequestMetrics } from "../../gen/analytics/v1/analytics_pb.ts";
import { GatewayService, StreamChatCompletionRequestSchema } from "../../gen/gateway/v1/gateway_pb.ts";
import type { CorsPolicy } from "../../lib/cors.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { defaultReadMaxBytes, startServer } from "../../lib/server.ts";
import { grpcFrame } from "../../lib/grpc-frames.ts";
import { createKeyAuthorizer } from "../auth.ts";
import { createBodyBudget } from "../body-budget.ts";
import { parseGatewayConfig } from "../config.ts";
import { createGatewayCore } from "../core.ts";
import { createRestApp } from "../http/app.ts";
import { serveRest } from "../http/bun.ts";
import { restRoutes } from "../http/node.ts";
import { createProviders } from "../providers/index.ts";
import { createRateLimiter } from "../rate-limits.ts";
import { createGatewayRequestGate, createGatewayService, gatewayRoutes } from "../service.ts";
import { createStalledStreams } from "../stalled-streams.ts";
import { createBillingFake, createRecordingShipper, createTestLogger } from "../testing.ts";

/**
 * A StreamChatCompletion over gRPC on HTTP/2 written by hand, its request sent, with a stream window of 1 KB that opens
 * only as its client reads: a client that reads nothing holds the stream with its window full. Destroy the session.
 */
export function grpcChatStreamByHand(url: string, params: MessageInitShape<typeof StreamChatCompletionRequestSchema>["params"]) {
  const session = http2.connect(url, { settings: { initialWindowSize: 1024 } });
  session.on("error", () => {});
  const stream = session.request({
    ":method": "POST",
    ":path": "/gateway.v1.GatewayService/StreamChatCompletion",
    "content-type": "application/grpc+proto",
    te: "trailers",
    authorization: "Bearer sk-good",
  });
  stream.on("error", () => {});
  const requestId = new Promise<string>((resolve) => stream.once("response", (h) => resolve(String(h["x-request-id"]))));
  const message = toBinary(StreamChatCompletionRequestSchema, create(StreamChatCompletionRequestSchema, { params }));
  stream.end(grpcFrame(message));
  return { session, stream, requestId };
}

/** Routes of one model, `ok`, served by the upstream at `url` (an OpenAI-compatible fake) at $1 per million tokens. */
export function oneModelRoutes(url: string): string {
  return [
    "providers:",
    `  - { name: fake, kind: openai, base_url: "${url}" }`,
    "models:",
    "  - name: ok",
    "    targets: [{ provider: fake, model: ok }]",
    '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
  ].join("\n");
}

/** Two mock models for shutdown tests: `drip` streams a chunk every 50 ms, `slow` answers after a minute. */
export const dripAndSlowRoutes = [
  "providers:",
  "  - { name: drip, kind: mock, latency_ms: 0, chunk_latency_ms: 50 }",
  "  - { name: slow, kind: mock, latency_ms: 60000 }",
  "models:",
  "  - name: drip",
  "    targets: [{ provider: drip, model: d }]",
  '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
  "  - name: slow",
  "    targets: [{ provider: slow, model: s }]",
  '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
].join("\n");

/**
 * A whole gateway (core, REST and RPC) on a real port, plus the REST API alone on Bun's server
 * (`restUrl`), configured by `routes` (gateway config YAML), with the billing fake's keys sk-good
 * (any model; org_1, proj_1), sk-limited (only "ok"; org_2), sk-rpm (sk-good's project, 3 requests a minute), sk-proj1
 * (another key of sk-good's project), sk-org (org_1, no project) and sk-proj2 (org_1, proj_2); `keys` is its key
 * cache, which a test tells of key changes as the change stream does.
 */
export async function startTestGateway(
  routes: string,
  options: {
    maxBodyBytes?: number;
    idleTimeoutSeconds?: number;
    requestBodyTimeoutSeconds?: number;
    cors?: CorsPolicy;
    /** Served at the RPC port's /metrics (nothing there by default). */
    registry?: Registry;
    /** The RPC port's interceptors and request gate, as main.ts wires them (none by default). */
    interceptors?: Interceptor[];
    gated?: boolean;
    tracer?: Tracer;
    /** The bound on request-body bytes in flight, shared by both ports and the RPCs (none by default). */
    maxInflightBodyBytes?: number;
    /** The bound on stalled streams, shared by both ports (none by default), and how long a write waits to be one. */
    maxStalledStreams?: number;
    stalledAfterMs?: number;
    /** Where providers read their keys and secrets (none by default). */
    env?: Record<string, string | undefined>;
  } = {},
) {
  const billing = createBillingFake({
    "sk-good": { id: "key_good", orgId: "org_1", projectId: "proj_1" },
    "sk-limited": { id: "key_limited", orgId: "org_2", allowedModels: ["ok"] },
    "sk-rpm": { id: "key_rpm", orgId: "org_1", projectId: "proj_1", requestsPerMinute: 3 },
    "sk-proj1": { id: "key_proj1", orgId: "org_1", projectId: "proj_1" },
    "sk-org": { id: "key_org", orgId: "org_1" },
    "sk-proj2": { id: "key_proj2", orgId: "org_1", projectId: "proj_2" },
  });
  const shipper = createRecordingShipper();
  const log = createTestLogger();
  const config = parseGatewayConfig(routes, "test-routes.yaml");
  const keys = createKeyAuthorizer({ billing: billing.client, registry: options.registry });
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, options.env ?? {}),
    keys,
    shipper,
    rateLimits: createRateLimiter(),
    instanceId: "gw-test",
    log,
  });
  const tracer = options.tracer ?? trace.getTracer("test");
  const maxBodyBytes = options.maxBodyBytes ?? 64 * 1024;
  const rest = createRestApp({ core, tracer, maxBodyBytes });
  const bodies =
    options.maxInflightBodyBytes === undefined ? undefined : createBodyBudget({ maxBytes: options.maxInflightBodyBytes });
  const stalls =
    options.maxStalledStreams === undefined
      ? undefined
      : createStalledStreams({
          max: options.maxStalledStreams,
          stalledAfterMs: options.stalledAfterMs,
          registry: options.registry,
        });
  const fast = serveRest(rest, {
    port: 0,
    hostname: "127.0.0.1",
    maxBodyBytes,
    idleTimeoutSeconds: options.idleTimeoutSeconds,
    requestBodyTimeoutSeconds: options.requestBodyTimeoutSeconds,
    cors: options.cors,
    bodies,
    stalls,
  });
  const server = await startServer({
    name: "gateway-test",
    port: 0,
    host: "127.0.0.1",
    routes: gatewayRoutes(createGatewayService(core), defaultReadMaxBytes, bodies),
    interceptors: options.interceptors,
    requestGate: options.gated ? createGatewayRequestGate(core, maxBodyBytes) : undefined,
    http: restRoutes(rest, { bodies }),
    log,
    cors: options.cors,
    registry: options.registry,
    connectionIdleTimeoutMs: options.idleTimeoutSeconds === undefined ? undefined : options.idleTimeoutSeconds * 1000,
    writeStalls: stalls,
  });

  /** The metrics row of a request, once it has been recorded. */
  const row = async (requestId: string, timeoutMs = 5000): Promise<RequestMetrics> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = shipper.rows.find((m) => m.requestId === requestId);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`no metrics for ${requestId}`);
      await Bun.sleep(10);
    }
  };

  return {
    url: server.url,
    restUrl: fast.url,
    core,
    bodies,
    stalls,
    billing,
    keys,
    shipper,
    log,
    row,
    rpc: (key?: string) => createServiceClient(GatewayService, { baseUrl: server.url, bearerToken: key }),
    /** Closes both ports as a SIGTERM does: `cut` is called for what is still in flight once graceMs is over. */
    close: (graceMs = 0, cut?: () => void) => Promise.all([server.close(graceMs, 0, cut), fast.close(graceMs, 0, cut)]),
  };
}
