import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { isSpanContextValid, trace } from "@opentelemetry/api";
import { Counter, Histogram, type Registry } from "prom-client";
import { ulid } from "ulid";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { Endpoint, TokenUsageSchema } from "../gen/common/v1/common_pb.ts";
import type { Logger } from "../lib/log.ts";
import { costNanos, type Tokens } from "../lib/money.ts";
import type { KeyAuthorizer, Principal } from "./auth.ts";
import { type ChatInput, parseChatInput } from "./chat-request.ts";
import type { GatewayConfig, ModelRoute, Target } from "./config.ts";
import {
  cancelled,
  type GatewayError,
  invalidRequest,
  modelNotAllowed,
  modelNotFound,
  toGatewayError,
  upstreamFailed,
  upstreamTimeout,
} from "./errors.ts";
import type { ChatCompletion, ChatResult, Provider } from "./providers/provider.ts";
import { UpstreamError } from "./providers/provider.ts";

/** One request in flight: who asked, what it cost, and its metrics as they fill in. */
export interface Call {
  /** ULID minted at arrival; the x-request-id header and the idempotency key downstream. */
  readonly requestId: string;
  readonly startMs: number;
  /** performance.now() at arrival, for latencies. */
  readonly startTick: number;
  readonly secret: string | undefined;
  /** Aborted when the client goes away. */
  readonly signal: AbortSignal | undefined;
  principal: Principal | undefined;
  /** Time spent waiting on upstream attempts, in ms. */
  upstreamMs: number;
  readonly metrics: RequestMetrics;
}

export interface ChatOutcome {
  completion: ChatCompletion;
  tokens: Tokens;
  costNanos: bigint;
  usageEstimated: boolean;
  /** Name of the provider that served. */
  provider: string;
}

/** The request pipeline REST and RPC share: auth, routing, upstream calls, cost and metrics. */
export interface GatewayCore {
  /** Starts a call at arrival. */
  begin(endpoint: Endpoint, secret: string | undefined, signal?: AbortSignal): Call;
  /** Runs one request's work, then records its metrics; failures come out as GatewayError. */
  handle<T>(call: Call, work: () => Promise<T>): Promise<T>;
  /** Resolves the caller's API key (401/503 otherwise). */
  authorize(call: Call): Promise<Principal>;
  chat(call: Call, body: unknown): Promise<ChatOutcome>;
  /** The models the authorized caller may use; `routes` itself when the key is unrestricted. */
  models(call: Call): readonly ModelRoute[];
  /** One model the authorized caller may use (404/403 otherwise). */
  model(call: Call, name: string): ModelRoute;
  /** Every configured model, in config order. */
  readonly routes: readonly ModelRoute[];
  /** Records the metrics of a finished call; `handle` calls it, streams call it when they end. */
  finish(call: Call, error?: GatewayError): void;
}

export interface CoreOptions {
  config: GatewayConfig;
  providers: ReadonlyMap<string, Provider>;
  keys: KeyAuthorizer;
  /** Where finished requests' metrics go; must not block. */
  shipper: { record(metrics: RequestMetrics): void };
  instanceId: string;
  log: Logger;
  registry?: Registry;
  random?: () => number;
}

const endpointLabels: Record<number, string> = {
  [Endpoint.UNSPECIFIED]: "unspecified",
  [Endpoint.CHAT_COMPLETIONS]: "chat_completions",
  [Endpoint.EMBEDDINGS]: "embeddings",
  [Endpoint.MODELS]: "models",
};

export function createGatewayCore(options: CoreOptions): GatewayCore {
  const { config, providers, keys, shipper, instanceId, log } = options;
  const random = options.random ?? Math.random;
  const routes = [...config.models.values()];
  for (const route of routes) {
    for (const target of route.targets) {
      if (!providers.has(target.provider)) throw new Error(`no provider "${target.provider}" for model ${route.name}`);
    }
  }
  const instruments = options.registry ? createInstruments(options.registry) : undefined;

  const authorize = async (call: Call) => {
    const principal = await keys.authorize(call.secret);
    call.principal = principal;
    const m = call.metrics;
    m.orgId = principal.orgId;
    m.projectId = principal.projectId;
    m.apiKeyId = principal.apiKeyId;
    return principal;
  };

  const admitModel = (principal: Principal, name: string): ModelRoute => {
    const route = config.models.get(name);
    if (!route) throw modelNotFound(name);
    if (principal.allowedModels && !principal.allowedModels.has(name)) throw modelNotAllowed(name);
    return route;
  };

  /** Tries targets in order (a weighted first pick when weights are set), retrying transient failures. */
  const callUpstream = async (call: Call, route: ModelRoute, input: ChatInput): Promise<ChatResult> => {
    const m = call.metrics;
    const order = attemptOrder(route.targets, random);
    let attempts = 0;
    let last: UpstreamError | undefined;
    for (let t = 0; t < order.length; t++) {
      const target = order[t] as Target;
      const provider = providers.get(target.provider) as Provider;
      m.provider = target.provider;
      m.servedModel = target.model;
      m.fallbackUsed = t > 0;
      input.upstream.model = target.model;
      for (let retry = 0; retry <= route.retries; retry++) {
        if (retry > 0) await sleep(Math.min(1000, 100 * 2 ** (retry - 1)) * (0.5 + random() / 2));
        m.retries = attempts++;
        const sent = performance.now();
        try {
          const result = await provider.chat(input.upstream, { signal: call.signal, timeoutMs: route.timeoutMs });
          call.upstreamMs += performance.now() - sent;
          if (result.completion.model) m.servedModel = result.completion.model;
          return result;
        } catch (e) {
          call.upstreamMs += performance.now() - sent;
          last = e instanceof UpstreamError ? e : new UpstreamError("transient", `${target.provider}: ${String(e)}`);
          if (last.failure === "cancelled" || call.signal?.aborted) throw cancelled();
          if (last.failure === "rejected") throw invalidRequest(last.message, null, "upstream_rejected");
          if (last.failure === "misconfigured") break;
          log.warn("upstream attempt failed", { request_id: call.requestId, provider: target.provider, err: last.message });
        }
      }
    }
    const message = `Every upstream of \`${route.name}\` failed; last: ${last?.message ?? "no target"}`;
    throw last?.failure === "timeout" ? upstreamTimeout(message) : upstreamFailed(message);
  };

  const finish = (call: Call, error?: GatewayError) => {
    const m = call.metrics;
    const totalMs = performance.now() - call.startTick;
    m.endTime = timestampFromMs(Math.round(call.startMs + totalMs));
    const totalUs = Math.round(totalMs * 1000);
    const upstreamUs = Math.round(call.upstreamMs * 1000);
    m.totalLatencyUs = BigInt(totalUs);
    m.upstreamLatencyUs = BigInt(upstreamUs);
    m.gatewayOverheadUs = BigInt(totalUs - upstreamUs);
    if (error) {
      m.status = error.outcome;
      m.httpStatus = error.status;
      m.errorCode = error.code;
    } else {
      m.status = RequestStatus.OK;
      m.httpStatus = 200;
    }
    shipper.record(m);
    if (instruments) {
      const endpoint = endpointLabels[m.endpoint] ?? "unspecified";
      instruments.requests.inc({ endpoint, code: m.httpStatus });
      instruments.duration.observe({ endpoint }, totalMs / 1000);
      instruments.overhead.observe({ endpoint }, (totalUs - upstreamUs) / 1e6);
    }
  };

  return {
    routes,
    begin(endpoint, secret, signal) {
      const startMs = Date.now();
      const span = trace.getActiveSpan()?.spanContext();
      const traced = span !== undefined && isSpanContextValid(span);
      const requestId = ulid(startMs);
      return {
        requestId,
        startMs,
        startTick: performance.now(),
        secret,
        signal,
        principal: undefined,
        upstreamMs: 0,
        metrics: create(RequestMetricsSchema, {
          requestId,
          traceId: traced ? span.traceId : "",
          spanId: traced ? span.spanId : "",
          startTime: timestampFromMs(startMs),
          endpoint,
          gatewayInstanceId: instanceId,
        }),
      };
    },
    async handle(call, work) {
      try {
        const result = await work();
        finish(call);
        return result;
      } catch (e) {
        const error = toGatewayError(e);
        if (error.status === 500) log.error("request failed", { request_id: call.requestId, err: e });
        finish(call, error);
        throw error;
      }
    },
    authorize,
    async chat(call, body) {
      const principal = call.principal ?? (await authorize(call));
      const input = parseChatInput(body);
      const m = call.metrics;
      m.requestedModel = input.model;
      m.endUserId = input.user;
      m.tags = input.tags;
      const route = admitModel(principal, input.model);
      const result = await callUpstream(call, route, input);
      const cost = costNanos(result.tokens, route.price);
      m.usage = create(TokenUsageSchema, result.tokens);
      m.usageEstimated = result.usageEstimated;
      m.costNanos = cost;
      const span = trace.getActiveSpan();
      if (span?.isRecording()) {
        span.setAttributes({
          "gen_ai.operation.name": "chat",
          "gen_ai.provider.name": providers.get(m.provider)?.kind ?? m.provider,
          "gen_ai.request.model": input.model,
          "gen_ai.response.model": m.servedModel,
          "gen_ai.response.id": result.completion.id,
          "gen_ai.usage.input_tokens": Number(result.tokens.inputTokens),
          "gen_ai.usage.output_tokens": Number(result.tokens.outputTokens),
          "gateway.request_id": call.requestId,
          "gateway.cost_nanos": cost.toString(),
        });
      }
      return {
        completion: result.completion,
        tokens: result.tokens,
        costNanos: cost,
        usageEstimated: result.usageEstimated,
        provider: m.provider,
      };
    },
    models(call) {
      const allowed = call.principal?.allowedModels;
      return allowed ? routes.filter((r) => allowed.has(r.name)) : routes;
    },
    model(call, name) {
      call.metrics.requestedModel = name;
      return admitModel(call.principal as Principal, name);
    },
    finish,
  };
}

/** Targets in the order to try them: config order, or a weighted first pick then the rest in order. */
function attemptOrder(targets: readonly Target[], random: () => number): readonly Target[] {
  if (targets.length < 2) return targets;
  let total = 0;
  for (const t of targets) total += t.weight ?? 0;
  if (total === 0) return targets;
  let pick = random() * total;
  let first = targets.length - 1;
  for (let i = 0; i < targets.length; i++) {
    pick -= targets[i]?.weight ?? 0;
    if (pick < 0) {
      first = i;
      break;
    }
  }
  if (first === 0) return targets;
  return [targets[first] as Target, ...targets.filter((_, i) => i !== first)];
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function createInstruments(registry: Registry) {
  return {
    requests: new Counter({
      name: "gateway_requests_total",
      help: "Finished API requests by endpoint and HTTP status.",
      labelNames: ["endpoint", "code"] as const,
      registers: [registry],
    }),
    duration: new Histogram({
      name: "gateway_request_duration_seconds",
      help: "Time from a request's arrival to its end.",
      labelNames: ["endpoint"] as const,
      buckets: [0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers: [registry],
    }),
    overhead: new Histogram({
      name: "gateway_overhead_seconds",
      help: "What the gateway itself added to a request: total time minus time waiting on upstreams.",
      labelNames: ["endpoint"] as const,
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05],
      registers: [registry],
    }),
  };
}
