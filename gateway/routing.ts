import { context, type Span, SpanKind, trace } from "@opentelemetry/api";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import type { Logger } from "../lib/log.ts";
import { setSpanError, startChildSpan } from "../lib/telemetry.ts";
import type { CircuitBreakers } from "./circuit-breaker.ts";
import type { ModelRoute, Target } from "./config.ts";
import type { Call } from "./core.ts";
import {
  clientGone,
  type GatewayError,
  requestTimeout,
  upstreamFailed,
  upstreamQuotaExceeded,
  upstreamRateLimited,
  upstreamRejected,
  upstreamTimeout,
  upstreamUnavailable,
} from "./errors.ts";
import type { CallOptions, Provider } from "./providers/provider.ts";
import { genAiProviderNames, outOfQuota, refusedByTarget, UpstreamError } from "./providers/provider.ts";

/** One upstream attempt: send the request to `provider` as upstream `model`. */
export type Attempt<T> = (provider: Provider, model: string, options: CallOptions) => Promise<T>;

export interface UpstreamRouter {
  /**
   * Runs `attempt` against the route's targets: a weighted first choice, then the others in config order;
   * transient failures are retried with backoff (honouring Retry-After), open circuit breakers are skipped,
   * and no attempt outlives the request's time limit. Fills the call's routing metrics. Attempts get
   * `signal` (the call's own by default).
   */
  run<T>(call: Call, route: ModelRoute, attempt: Attempt<T>, signal?: AbortSignal, stream?: boolean): Promise<T>;
  /**
   * How a stream `run` returned (with `stream`) ended, for its target's circuit breaker: a stream's headers say
   * little, its failures mid-stream count against the target like any other. Only the first call counts.
   */
  streamEnded(call: Call, error: GatewayError | undefined): void;
  /** performance.now() value after which the call is past its whole-request time limit. */
  deadline(call: Call, route: ModelRoute): number;
  /** The whole-request time limit of a route, in ms. */
  limitMs(route: ModelRoute): number;
}

export interface RouterOptions {
  providers: ReadonlyMap<string, Provider>;
  breakers: CircuitBreakers;
  /** Whole-request time limit of models that set none, in ms. */
  requestTimeoutMs: number;
  /** First retry waits about this long; each further retry twice as long. */
  backoffBaseMs?: number;
  /** Longest backoff between two attempts on one target. */
  backoffMaxMs?: number;
  /** A Retry-After longer than this moves on to the next target instead of waiting. */
  maxRetryAfterMs?: number;
  random?: () => number;
  /** Monotonic ms, as performance.now(). */
  tick?: () => number;
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  log?: Logger;
}

/** Breaker key of a target: one upstream model at one provider. */
export const targetKey = (target: Target) => `${target.provider}/${target.model}`;

export function createUpstreamRouter(options: RouterOptions): UpstreamRouter {
  const { providers, breakers, log } = options;
  const backoffBaseMs = options.backoffBaseMs ?? 100;
  const backoffMaxMs = options.backoffMaxMs ?? 2_000;
  const maxRetryAfterMs = options.maxRetryAfterMs ?? 5_000;
  const random = options.random ?? Math.random;
  const tick = options.tick ?? (() => performance.now());
  const sleep = options.sleep ?? abortableSleep;

  const limitOf = (route: ModelRoute) => route.requestTimeoutMs ?? options.requestTimeoutMs;
  const deadline = (call: Call, route: ModelRoute) => call.startTick + limitOf(route);

  // Waiting as an upstream asked (or backing off from it) is the upstream's time, not the gateway's.
  const waitUpstream = async (call: Call, ms: number) => {
    const waited = tick();
    try {
      await sleep(ms, call.signal);
    } catch {
      throw clientGone(call.signal);
    } finally {
      call.upstreamMs += tick() - waited;
    }
  };

  // Targets of streams that answered and are still running: their breaker hears the outcome when they end, and their
  // attempt's span ends then, covering the whole answer.
  const streaming = new WeakMap<Call, { key: string; span: Span | undefined }>();

  return {
    deadline,
    limitMs: limitOf,
    streamEnded(call, error) {
      const open = streaming.get(call);
      if (open === undefined) return;
      streaming.delete(call);
      const { key, span } = open;
      if (span) {
        if (error) {
          span.setAttribute("error.type", error.code);
          // A client that left (499) ended it, not the upstream.
          if (error.status !== 499) setSpanError(span, error);
        }
        span.end();
      }
      // A stream the upstream broke or stalled fails its target; one the client or the request's limit ended says
      // nothing about it.
      if (!error) breakers.succeed(key);
      else if (error.code === "upstream_error" || error.code === "upstream_timeout") breakers.fail(key, call);
      else breakers.abandon(key, call);
    },
    async run(call, route, attempt, signal = call.signal, stream = false) {
      const m = call.metrics;
      const operation = m.endpoint === Endpoint.EMBEDDINGS ? "embeddings" : "chat";
      const end = deadline(call, route);
      const limitMs = limitOf(route);
      const order = attemptOrder(route.targets, random);
      let attempts = 0;
      let last: UpstreamError | undefined;
      // A refusal by one target alone (see refusedByTarget), which the client gets only if no other target takes it.
      let refused: UpstreamError | undefined;
      let skipped = 0;
      let held = 0;
      let waitMs = Number.POSITIVE_INFINITY;
      for (let t = 0; t < order.length; t++) {
        const target = order[t] as Target;
        const key = targetKey(target);
        const retries = target.retries ?? route.retries;
        for (let retry = 0; retry <= retries; retry++) {
          // Looked up for each attempt: a reload while this request ran may have replaced the provider (its URL, its
          // key) or taken it out of the config, which leaves a target that cannot serve, so the next is tried.
          const provider = providers.get(target.provider);
          if (!provider) {
            last = new UpstreamError("misconfigured", `${target.provider}: no longer configured`);
            break;
          }
          // A retry after a 429 waits out a short hold that 429s set rather than give up.
          const heldMs = retry > 0 && breakers.held(key) ? breakers.waitMs(key) : 0;
          if (heldMs > 0 && heldMs <= maxRetryAfterMs && tick() + heldMs < end) await waitUpstream(call, heldMs);
          if (!breakers.allow(key, call)) {
            if (retry === 0) {
              skipped++;
              // Held back for its upstream's rate limit (429 with Retry-After), not for failures (503).
              if (breakers.held(key)) held++;
              waitMs = Math.min(waitMs, breakers.waitMs(key));
            }
            break;
          }
          const remaining = end - tick();
          if (remaining <= 0) {
            breakers.abandon(key, call);
            throw requestTimeout(limitMs);
          }
          // Gone already (while the request waited for its budget, say): no upstream hears of it.
          if (call.signal?.aborted || signal?.aborted) {
            breakers.abandon(key, call);
            throw call.signal?.aborted || !signal?.aborted ? clientGone(call.signal) : requestTimeout(limitMs);
          }
          m.provider = target.provider;
          m.servedModel = target.model;
          m.fallbackUsed = t > 0;
          m.retries = attempts++;
          const ownTimeoutMs = target.timeoutMs ?? route.timeoutMs;
          const timeoutMs = Math.max(1, Math.min(ownTimeoutMs, Math.ceil(remaining)));
          const sent = tick();
          // A GenAI client span, as OpenTelemetry's conventions name it (`chat gpt-4o`), for each attempt.
          const span = startChildSpan(`${operation} ${target.model}`, {
            kind: SpanKind.CLIENT,
            attributes: {
              "gen_ai.operation.name": operation,
              "gen_ai.provider.name": genAiProviderNames[provider.kind],
              "gen_ai.request.model": target.model,
              "server.address": provider.server?.address,
              "server.port": provider.server?.port,
              "gateway.provider": target.provider,
              "gateway.attempt": attempts - 1,
              "gateway.fallback": t > 0,
            },
          });
          try {
            const send = () => attempt(provider, target.model, { signal, timeoutMs });
            const result = await (span ? context.with(trace.setSpan(context.active(), span), send) : send());
            call.upstreamMs += tick() - sent;
            if (stream) {
              streaming.set(call, { key, span });
              breakers.served(key, call);
            } else {
              span?.end();
              breakers.succeed(key);
            }
            return result;
          } catch (e) {
            call.upstreamMs += tick() - sent;
            last = e instanceof UpstreamError ? e : new UpstreamError("transient", `${target.provider}: ${String(e)}`);
            if (span) {
              // The upstream's status when it answered, else how the attempt failed (`timeout`, `transient`, ...).
              span.setAttribute("error.type", last.status === undefined ? last.failure : String(last.status));
              // Cut short by a client that left (499), as a stream it leaves is: nothing failed.
              if (!call.signal?.aborted) setSpanError(span, e);
              span.end();
            }
            if (last.failure === "cancelled" || call.signal?.aborted || signal?.aborted) {
              breakers.abandon(key, call);
              throw call.signal?.aborted || !signal?.aborted ? clientGone(call.signal) : requestTimeout(limitMs);
            }
            if (last.failure === "timeout" && timeoutMs < ownTimeoutMs) {
              // Cut by the request's own limit, not by the target's. The request's first attempt had all of it: its
              // target did not answer within the longest this model's requests wait, a failure, so that a target that
              // never answers opens its breaker and later requests go on to the next one. A later attempt had only
              // what earlier ones left: nothing said about its target.
              if (attempts === 1) {
                breakers.fail(key, call);
                log?.warn("upstream attempt failed", { request_id: call.requestId, provider: target.provider, err: last.message });
              } else breakers.abandon(key, call);
              throw requestTimeout(limitMs);
            }
            if (last.failure === "rejected" && refusedByTarget(last.status ?? 0, last.error)) {
              // This target's refusal, not every target's: on to the next; nothing said about this one.
              breakers.abandon(key, call);
              refused = last;
              break;
            }
            if (last.failure === "rejected") {
              // The upstream answered sensibly: the request, not the target, is at fault.
              breakers.succeed(key);
              throw upstreamRejected(route.name, last.status ?? 400, last.error);
            }
            const hinted = last.retryAfterMs;
            const backoff = Math.min(backoffMaxMs, backoffBaseMs * 2 ** retry) * (0.5 + random() / 2);
            // A rate limit says the target works and is busy: no failure for its breaker; repeated, a hold on it.
            const rateLimited = last.status === 429 && last.failure === "transient";
            if (rateLimited) breakers.throttle(key, hinted, call);
            else breakers.fail(key, call);
            log?.warn("upstream attempt failed", { request_id: call.requestId, provider: target.provider, err: last.message });
            if (last.failure === "misconfigured") break;
            // Asked to stay away longer than a request should wait: on to the next target. A 5xx's holds the target
            // for every request; a 429's only once they repeat (its wait may be about this request alone).
            if (hinted !== undefined && hinted > maxRetryAfterMs) {
              if (!rateLimited) breakers.holdFor(key, hinted);
              break;
            }
            // Out of retries, or this failure tripped the breaker: no point waiting to try it again.
            if (retry === retries || breakers.state(key) === "open") break;
            const wait = Math.max(backoff, hinted ?? 0);
            if (tick() + wait >= end) break;
            await waitUpstream(call, wait);
          }
        }
      }
      if (refused) throw upstreamRejected(route.name, refused.status ?? 429, refused.error);
      if (!last && skipped > 0 && held === skipped) {
        throw upstreamRateLimited(`Every upstream of \`${route.name}\` asked to wait; retry later.`, waitMs, 1);
      }
      if (!last && skipped > 0) {
        throw upstreamUnavailable(`Every upstream of \`${route.name}\` is failing; retry later.`, Math.max(1, Math.ceil(waitMs / 1000)));
      }
      if (tick() >= end) throw requestTimeout(limitMs);
      // What the client reads names the model and what failed; the upstream's own words went to the log above.
      const message =
        order.length === 1
          ? `The upstream of \`${route.name}\` ${whatFailed(last)}.`
          : `Every upstream of \`${route.name}\` failed; the last one ${whatFailed(last)}.`;
      if (last?.failure === "timeout") throw upstreamTimeout(message);
      if (outOfQuota(last?.status, last?.error)) throw upstreamQuotaExceeded(message);
      if (last?.status === 429) {
        throw upstreamRateLimited(message, last.retryAfterMs);
      }
      throw upstreamFailed(message);
    },
  };
}

/** An attempt's failure in words for the client: no provider names, URLs, key variables or upstream text. */
function whatFailed(e: UpstreamError | undefined): string {
  if (!e) return "could not be tried";
  if (e.failure === "timeout") return "timed out";
  if (outOfQuota(e.status, e.error)) return "is out of quota";
  if (e.failure === "misconfigured") {
    return e.status === undefined ? "is not configured" : `refused the gateway's request (HTTP ${e.status})`;
  }
  if (e.status === 429) return "is rate limited";
  return e.status === undefined ? "gave no usable answer" : `answered HTTP ${e.status}`;
}

/**
 * A stream whose whole-request time limit is enforced by `deadline` aborting its upstream: however the
 * upstream then ends (failure or quiet end), the stream fails with 504 request_timeout.
 */
export async function* limitStream<T>(chunks: AsyncIterable<T>, deadline: AbortSignal, limitMs: number): AsyncGenerator<T> {
  try {
    for await (const chunk of chunks) {
      if (deadline.aborted) break;
      yield chunk;
    }
  } catch (e) {
    if (!deadline.aborted) throw e;
  }
  if (deadline.aborted) throw requestTimeout(limitMs);
}

/**
 * Targets in the order to try them: config order, or, when any target has a weight, a first pick
 * at random in proportion to the weights and then the rest in config order.
 */
export function attemptOrder(targets: readonly Target[], random: () => number): readonly Target[] {
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

function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
