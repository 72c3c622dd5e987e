import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Attributes, isSpanContextValid, type Span, trace } from "@opentelemetry/api";
import { Counter, Histogram, type HistogramConfiguration, type Registry } from "prom-client";
import { monotonicFactory } from "ulid";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { BudgetChargeSchema, Endpoint } from "../gen/common/v1/common_pb.ts";
import type { Logger } from "../lib/log.ts";
import { createWaiters, unlessAborted } from "../lib/waiters.ts";
import { bySeries, createTalliedCounter } from "../lib/metrics.ts";
import { withChildSpan } from "../lib/telemetry.ts";
import { dearestPrice, type Price, type Tokens } from "../lib/money.ts";
import type { KeyAuthorizer, Principal } from "./auth.ts";
import {
  type BudgetKeeper,
  maxChatSpend,
  maxEmbeddingInputTokens,
  maxResponsesSpend,
  maxSpend,
  type Reservation,
  type Spend,
} from "./budget.ts";
import type { CallJournal } from "./call-journal.ts";
import { type ChatInput, parseChatInput } from "./chat-request.ts";
import { type ChatStream, meterChatStream } from "./chat-stream.ts";
import { createCircuitBreakers } from "./circuit-breaker.ts";
import type { GatewayConfig, ModelRoute } from "./config.ts";
import { type EmbeddingInput, parseEmbeddingInput } from "./embedding-request.ts";
import {
  audioNotFound,
  clientGone,
  cutAtShutdown,
  ShutdownCut,
  GatewayError,
  invalidRequest,
  itemNotFound,
  modelNotAllowed,
  modelNotFound,
  modelNotServed,
  previousResponseNotFound,
  requestTimeout,
  responseNotFound,
  toGatewayError,
  upstreamFailed,
  upstreamRateLimited,
  upstreamRejected,
  upstreamTimeout,
} from "./errors.ts";
import {
  answeredEmbeddingUsage,
  answeredResponsesUsage,
  answeredUsage,
  type ChatCompletion,
  type ChatRequest,
  type CreateEmbeddingResponse,
  genAiProviderNames,
  type Provider,
  type ResponseObject,
  type ResponseEventStream,
  type ResponsesRequest,
  type StoredResponseRequest,
  UpstreamError,
} from "./providers/provider.ts";
import {
  type ClientIds,
  clientAudio,
  clientEvent,
  clientItemPage,
  clientResponse,
  createResponseIds,
  itemIdFields,
  type ResponseIds,
} from "./response-ids.ts";
import { parseResponsesInput, type ResponsesInput, responsesPrompt } from "./responses-request.ts";
import { meterResponseStream, type ResponseStream } from "./responses-stream.ts";
import { meteredName, meterUsage } from "./metering.ts";
import {
  estimatedChatTokens,
  estimatedEmbeddingTokens,
  estimatedResponsesTokens,
  type RateLimiter,
  type RateTicket,
  rateLimitHeaders,
  unsetOutputTokens,
} from "./rate-limits.ts";
import { type Attempt, createUpstreamRouter, limitStream, type RouterOptions } from "./routing.ts";
import { countEmbeddingTokens, countInputTokens, countResponsesInputTokens, estimatedTokens } from "./tokenizer.ts";
import { clipped } from "../lib/text.ts";

// Request ids: ULIDs, increasing within a process; the factory finds its random source once, not per id.
const newRequestId = monotonicFactory();

/** The ids of the active span, for a call's metrics; empty outside one. */
export function activeTrace(): { traceId: string; spanId: string } {
  const span = trace.getActiveSpan()?.spanContext();
  const traced = span !== undefined && isSpanContextValid(span);
  return { traceId: traced ? span.traceId : "", spanId: traced ? span.spanId : "" };
}

/** One request in flight: who asked, what it cost, and its metrics as they fill in. */
export interface Call {
  /** ULID minted at arrival; the x-request-id header and the idempotency key downstream. */
  readonly requestId: string;
  readonly startMs: number;
  /** performance.now() at arrival, for latencies. */
  readonly startTick: number;
  readonly secret: string | undefined;
  /** Aborted when the client goes away, or when the gateway cuts the call at shutdown (see cutInFlight). */
  readonly signal: AbortSignal | undefined;
  principal: Principal | undefined;
  /** Time spent waiting on upstream attempts, in ms. */
  upstreamMs: number;
  /** Prompt tokens of attempts an upstream billed though their answer was lost (see callUpstream): metered on top. */
  lostInputTokens?: number;
  readonly metrics: RequestMetrics;
  /** OpenAI's x-ratelimit-* headers, once the call was admitted under its key's rate limits. */
  limitHeaders?: Record<string, string>;
  /** The request's span, when it is recorded: `finish` tells it how the call went, however and wherever it ends. */
  readonly span?: Span;
  /** The completion's id and each choice's finish reason, once the upstream has said them. */
  response?: { id: string; finishReasons: string[] };
}

/** How a whole answer was metered: with the prompts of lost attempts. */
export interface MeteredOutcome {
  tokens: Tokens;
  costNanos: bigint;
  usageEstimated: boolean;
  /** Name of the provider that served. */
  provider: string;
}

export interface ChatOutcome extends MeteredOutcome {
  completion: ChatCompletion;
}

export interface ResponsesOutcome extends MeteredOutcome {
  response: ResponseObject;
}

export interface EmbeddingOutcome extends MeteredOutcome {
  /** Vectors as EmbeddingResult has them: for a client that asked for floats, floats or base64 to print as floats. */
  response: CreateEmbeddingResponse;
  /** What the client asked for. */
  encodingFormat: "float" | "base64";
}

/** The request pipeline REST and RPC share: auth, routing, upstream calls, cost and metrics. */
export interface GatewayCore {
  /** Starts a call at arrival. */
  begin(endpoint: Endpoint, secret: string | undefined, signal?: AbortSignal): Call;
  /** Runs one request's work, then records its metrics (streams: when they end); failures come out as GatewayError. */
  handle<T>(call: Call, work: () => Promise<T>): Promise<T>;
  /** Resolves the caller's API key (401/503 otherwise). */
  authorize(call: Call): Promise<Principal>;
  chat(call: Call, body: unknown): Promise<ChatOutcome>;
  /**
   * Opens a streamed completion (the body must ask for `stream: true`). Failures before the stream
   * opens are thrown; once it is open the stream records the call's metrics itself when it ends.
   */
  chatStream(call: Call, body: unknown): Promise<ChatStream>;
  embed(call: Call, body: unknown): Promise<EmbeddingOutcome>;
  /** One whole response of OpenAI's Responses API (REST only). */
  responses(call: Call, body: unknown): Promise<ResponsesOutcome>;
  /** Opens a streamed response (the body must ask for `stream: true`); as chatStream. */
  responsesStream(call: Call, body: unknown): Promise<ResponseStream>;
  /**
   * A call on a response an upstream stored (REST only), by the client's id of it: 404 unless the gateway made that id
   * for the caller's org. Answered with the upstream's JSON, its response ids the client's; no usage, no cost.
   */
  storedResponse(
    call: Call,
    action: StoredResponseRequest["action"],
    id: string,
    query: StoredResponseRequest["query"],
  ): Promise<unknown>;
  /** The models the authorized caller may use; `routes` itself when the key is unrestricted. */
  models(call: Call): readonly ModelRoute[];
  /** One model the authorized caller may use (404/403 otherwise). */
  model(call: Call, name: string): ModelRoute;
  /** Records the model a body names (if it names one) for a call refused before its body was parsed. */
  namedModel(call: Call, body: unknown): void;
  /** Every configured model, in config order: a new list once the config is reloaded. */
  readonly routes: readonly ModelRoute[];
  /**
   * Serves `config` and `providers` (a reloaded config) from the next request on: its models, prices, routes, limits
   * and providers. A request already admitted keeps its model's route and price; of its later attempts, one on a
   * provider the config no longer has fails as not configured (so the next target is tried), one on a provider kept
   * by name goes to the new one. Throws, changing nothing, when a model names a provider `providers` lacks.
   */
  reconfigure(config: GatewayConfig, providers: ReadonlyMap<string, Provider>): void;
  /**
   * Records the metrics of a finished call (shipped to analytics only once its key was accepted); `handle` calls it,
   * streams call it when they end.
   */
  finish(call: Call, error?: GatewayError): void;
  /**
   * Resolves true once every call begun so far has finished (its metrics recorded), false after timeoutMs: at
   * shutdown, streams the servers cut still record what they sent before the spool is flushed.
   */
  settled(timeoutMs: number): Promise<boolean>;
  /**
   * Finishes every call still unfinished as cut by the shutdown (cancelled), recording its metrics as they stand, so
   * that none is lost with the process; returns how many. Whatever such a call does later records nothing.
   */
  cutUnfinished(): number;
  /**
   * Ends every call in flight as cut by the shutdown, when its grace period is over and before the servers close their
   * connections: one whose answer has not begun is answered 503 `gateway_shutting_down`, a stream ends with that error
   * event (Unavailable over RPC), each metered so. Returns how many.
   */
  cutInFlight(): number;
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
  /** Circuit breakers, backoff and the whole-request limit; defaults when unset. */
  routing?: Partial<Omit<RouterOptions, "providers">>;
  /** Per-key RPM, TPM and concurrent request limits; none when unset. */
  rateLimits?: RateLimiter;
  /** Budget leases; budgets are not enforced when unset. */
  budget?: BudgetKeeper;
  /** Output tokens budgeted for requests without max_tokens on models with no max_output_tokens. */
  defaultMaxOutputTokens?: number;
  /** Seals the Responses API ids clients get (see response-ids.ts); under a key of this process alone when unset. */
  responseIds?: ResponseIds;
  /** Notes the calls admitted until their metrics are recorded (see call-journal.ts); none when unset. */
  calls?: Pick<CallJournal, "begun" | "ended">;
}

/** What a call holds while it runs: its rate-limit ticket, budget reservation, and a stream's deadline and upstream. */
interface Admission {
  ticket: RateTicket | undefined;
  reservation: Reservation | undefined;
  deadlineTimer?: ReturnType<typeof setTimeout>;
  /** Aborts a stream's upstream call, which must not outlive the call's metrics. */
  upstream?: AbortController;
}

const endpointLabels: Record<number, string> = {
  [Endpoint.UNSPECIFIED]: "unspecified",
  [Endpoint.CHAT_COMPLETIONS]: "chat_completions",
  [Endpoint.EMBEDDINGS]: "embeddings",
  [Endpoint.MODELS]: "models",
  [Endpoint.RESPONSES]: "responses",
};

// Each outcome's label, written once: lower-cased for every request, it was a new string each time.
const statusLabels: Record<number, string> = Object.fromEntries(
  Object.entries(RequestStatus)
    .filter((entry): entry is [string, number] => typeof entry[1] === "number")
    .map(([name, status]) => [status, name.toLowerCase()]),
);

/** The models of `config`, in config order, once each names only providers `providers` has. */
function routesOf(config: GatewayConfig, providers: ReadonlyMap<string, Provider>): ModelRoute[] {
  const routes = [...config.models.values()];
  for (const route of routes) {
    for (const target of route.targets) {
      if (!providers.has(target.provider)) throw new Error(`no provider "${target.provider}" for model ${route.name}`);
    }
  }
  return routes;
}

export function createGatewayCore(options: CoreOptions): GatewayCore {
  const { keys, shipper, instanceId, log } = options;
  const random = options.random ?? Math.random;
  // What new requests are served by; reconfigure swaps all three at once. The map is the router's too: a provider a
  // reload removed is gone from the next attempt on, one it kept by name is the new one.
  let config = options.config;
  const providers = new Map(options.providers);
  let routes = routesOf(config, providers);
  const instruments = options.registry ? createInstruments(options.registry) : undefined;
  // Each model and tier warned about once: an upstream that serves every request at an unpriced tier would flood the log.
  const unpricedWarned = new Set<string>();
  const priceServed = (route: ModelRoute, served: unknown, requested: Price) =>
    servedPrice(route, served, requested, (answered) => {
      // The upstream's word, so a label of bounded values.
      const tier = /^[a-z_]{1,16}$/.test(answered) ? answered : "other";
      instruments?.unpricedTiers.inc({ model: route.name, tier });
      if (unpricedWarned.size < 1_000 && !unpricedWarned.has(`${route.name}\n${tier}`)) {
        unpricedWarned.add(`${route.name}\n${tier}`);
        log.warn("an upstream served a service tier the config does not price: billed at the model's dearest price", {
          model: route.name,
          service_tier: tier,
        });
      }
    });
  const router = createUpstreamRouter({
    providers,
    breakers: createCircuitBreakers(),
    requestTimeoutMs: 600_000,
    random,
    log,
    ...options.routing,
  });
  const defaultMaxOutputTokens = options.defaultMaxOutputTokens ?? 4096;
  const responseIds = options.responseIds ?? createResponseIds(randomBytes(64));
  const storedResponseTimeoutMs = options.routing?.requestTimeoutMs ?? 600_000;
  /** The client's ids of the responses and items `provider` made for the call's org and project. */
  const ownIds = (call: Call, provider: string): ClientIds => {
    const scope = idScope(call.principal as Principal);
    return {
      response: (upstreamId) => responseIds.wrap(upstreamId, scope, provider),
      item: (upstreamId) => responseIds.wrapItem(upstreamId, scope, provider),
    };
  };
  /** The client's id of an audio answer `provider` made for the call's org and project. */
  const ownAudioId = (call: Call, provider: string) => {
    const principal = call.principal as Principal;
    // Scoped when there is audio to name: most answers have none.
    return (upstreamId: string) => responseIds.wrapAudio(upstreamId, idScope(principal), provider);
  };
  const admissions = new WeakMap<Call, Admission>();
  const finished = new WeakSet<Call>();
  const journaled = new WeakSet<Call>();
  // Calls begun and not yet finished, each with what aborts its signal, and who waits for there to be none.
  const unfinished = new Map<Call, AbortController>();
  // Billing's key check of each call, and the calls that ended while it was under way, with how.
  const keyChecks = new WeakMap<Call, Promise<Principal>>();
  const awaitingKey = new Map<Call, GatewayError | undefined>();
  // The count of the prompts failed attempts took, for calls cut by a shutdown and answered before it was made, with
  // its price; and the calls that ended while it was under way, with how.
  const lostPrompts = new WeakMap<Call, { tokens: Promise<number>; price: Price }>();
  const awaitingCount = new Map<Call, GatewayError | undefined>();
  const allFinished = createWaiters();

  const admitted = (call: Call, principal: Principal) => {
    call.principal = principal;
    const m = call.metrics;
    m.orgId = principal.orgId;
    m.projectId = principal.projectId;
    m.apiKeyId = principal.apiKeyId;
    return principal;
  };

  /** A key checked lately is answered from the cache at once; billing is asked otherwise, or for a client that left. */
  const checkKey = (call: Call): Principal | Promise<Principal> =>
    (call.signal?.aborted ? undefined : keys.cached(call.secret)) ?? keys.authorize(call.secret);

  const authorize = async (call: Call) => {
    // Checked once a call: an RPC's key is checked before its message is read, then again by its handler.
    if (call.principal) return call.principal;
    const checked = withChildSpan("gateway.authorize_key", {}, () => checkKey(call));
    if (!(checked instanceof Promise)) return admitted(call, checked);
    const checking = checked.then((principal) => admitted(call, principal));
    // A call that ends while billing checks the key (the client left, the gateway cut it) is answered at once, and
    // metered under its key's org once billing has answered (see finish).
    keyChecks.set(call, checking);
    return unlessAborted(checking, call.signal, () => clientGone(call.signal));
  };

  /**
   * The key of a call whose body has been read, checked again: bodies take up to 120 s, and a key revoked meanwhile is
   * refused. The principal it was admitted with serves while still good; once a change dropped its key (or it expired)
   * the key is checked as any call's is. Billing unable to answer keeps the key as checked.
   */
  const authorizeBody = async (call: Call): Promise<Principal> => {
    const checked = call.principal;
    if (!checked) return authorize(call);
    if (keys.stillGood(checked)) return checked;
    try {
      return admitted(call, await unlessAborted(keys.authorize(call.secret), call.signal, () => clientGone(call.signal)));
    } catch (e) {
      if (e instanceof GatewayError && e.outcome === RequestStatus.UNAVAILABLE) return checked;
      throw e;
    }
  };

  const admitModel = (principal: Principal, name: string): ModelRoute => {
    const route = config.models.get(name);
    if (!route) throw modelNotFound(name);
    if (principal.allowedModels && !principal.allowedModels.has(name)) throw modelNotAllowed(name);
    return route;
  };

  /** Records who asked for which model, and resolves the route the caller's key may use. */
  const routeFor = (
    call: Call,
    principal: Principal,
    input: { model: string; user: string; tags?: Record<string, string> },
  ) => {
    const m = call.metrics;
    m.requestedModel = meteredName(input.model);
    m.endUserId = input.user;
    if (input.tags) m.tags = input.tags;
    const route = admitModel(principal, input.model);
    const endpoint =
      m.endpoint === Endpoint.EMBEDDINGS ? "embeddings" : m.endpoint === Endpoint.RESPONSES ? "responses" : "chat";
    if (route.endpoints && !route.endpoints.has(endpoint)) throw modelNotServed(input.model, endpoint);
    return route;
  };

  /**
   * Runs a request's upstream attempts. One cut off by the client leaving or a time limit, or whose accepted answer
   * was lost, has already handed the prompt to its upstream, which bills for it: each such attempt adds the request's
   * input tokens (`countInput`, by the tokenizer in its upstream model's encoding, marked estimated) to what the
   * request is metered at, whether a later
   * attempt answers or the request fails, and `finish` charges them to its budget and quota. An upstream's refusal (a
   * 429 or 5xx, however the request then ends) bills nothing and adds nothing.
   */
  const callUpstream = async <T>(
    call: Call,
    route: ModelRoute,
    price: Price,
    attempt: Attempt<T>,
    countInput: (model: string) => Promise<number>,
    signal?: AbortSignal,
    stream = false,
  ): Promise<T> => {
    // The upstream model of each attempt lost.
    const lost: string[] = [];
    const watched: Attempt<T> = async (provider, model, options) => {
      try {
        return await attempt(provider, model, options);
      } catch (e) {
        const failure = e instanceof UpstreamError ? e.failure : undefined;
        if (failure === "cancelled" || failure === "timeout" || (e as UpstreamError).promptTaken) lost.push(model);
        throw e;
      }
    };
    // Counted on the prompt the upstreams were sent (a count never fails, see tokenizer.ts).
    const lostInput = async () => {
      let tokens = 0;
      for (const model of new Set(lost)) tokens += lost.filter((m) => m === model).length * (await countInput(model));
      return tokens;
    };
    try {
      const result = await router.run(call, route, watched, signal, stream);
      // Most calls lose no attempt: nothing to count, and nothing to wait for.
      call.lostInputTokens = lost.length === 0 ? 0 : await lostInput();
      return result;
    } catch (e) {
      // Cut by a shutdown, it is answered at once: the count (the first loads the encoding, about a second) is made
      // meanwhile and metered before the call's metrics are recorded (see finish), so the answer goes out in time.
      if (lost.length > 0 && call.signal?.reason instanceof ShutdownCut) lostPrompts.set(call, { tokens: lostInput(), price });
      else {
        const input = await lostInput();
        if (input > 0) meterUsage(call.metrics, estimatedTokens(input, 0), true, price);
      }
      throw e;
    }
  };

  /** Meters a whole answer at `price`, with the prompts of lost attempts, as served by `model` (when it says). */
  const metered = (
    call: Call,
    result: { tokens: Tokens; usageEstimated: boolean },
    model: string | undefined,
    price: Price,
  ): MeteredOutcome => {
    const m = call.metrics;
    // As the upstream's JSON says it: a name that is no string (a number, say) names nothing.
    if (typeof model === "string" && model) m.servedModel = meteredName(model);
    const costNanos = meterUsage(m, result.tokens, result.usageEstimated, price, call.lostInputTokens);
    return { tokens: m.usage ?? result.tokens, costNanos, usageEstimated: m.usageEstimated, provider: m.provider };
  };

  /**
   * Checks the key's rate limits and reserves the request's maximum cost and tokens on its budgets and monthly
   * tokens, before any upstream call; `finish` settles both at what the call really used.
   */
  const admit = async (
    call: Call,
    principal: Principal,
    route: ModelRoute,
    most: Spend,
    estimatedTokens: number,
    unsetOutput = 0,
  ) => {
    const limits = principal.grant.apiKey?.limits;
    const rateLimits = {
      requestsPerMinute: limits?.requestsPerMinute ?? 0,
      tokensPerMinute: Number(limits?.tokensPerMinute ?? 0n),
      maxConcurrentRequests: limits?.maxConcurrentRequests ?? 0,
    };
    let ticket: RateTicket | undefined;
    let reservation: Reservation | undefined;
    try {
      // Counted per lineage, as billing counts the monthly figures: a rotated key carries on its windows.
      ticket = options.rateLimits?.admit(principal.lineageId, rateLimits, estimatedTokens, unsetOutput);
      if (ticket?.state) call.limitHeaders = rateLimitHeaders(ticket.state);
      const attributes = { "gateway.max_cost_nanos": Number(most.nanos), "gateway.max_tokens": Number(most.tokens) };
      reservation = await withChildSpan("gateway.reserve_budget", attributes, () =>
        options.budget?.reserve(principal, most, router.deadline(call, route) - performance.now(), call.signal),
      );
    } catch (e) {
      // Refused by its budget or monthly tokens (or billing, or the client left meanwhile): it reached no upstream, so
      // it counts against no limit, and its rate limit headers say so.
      const state = ticket?.release();
      if (state) call.limitHeaders = rateLimitHeaders(state);
      throw e;
    }
    // A request holds its key's slot until its client is gone, not while the rest of its answer is read for usage.
    if (ticket) call.signal?.addEventListener("abort", () => ticket.leave(), { once: true });
    const admission: Admission = { ticket, reservation };
    admissions.set(call, admission);
    noteInFlight(call);
    return admission;
  };

  /** Records the model a request's body names, if it names one as a string, before the body is checked. */
  const nameModel = (call: Call, body: unknown) => {
    const model = typeof body === "object" && body !== null ? (body as { model?: unknown }).model : undefined;
    if (typeof model === "string") call.metrics.requestedModel = meteredName(model);
  };

  /** Notes an admitted call in the calls journal, so that a crash before it finishes still has it recorded. */
  const noteInFlight = (call: Call) => {
    if (!options.calls) return;
    options.calls.begun(call.metrics);
    journaled.add(call);
  };

  const finish = (call: Call, error?: GatewayError) => {
    // One call, one RequestMetrics, however many ways it ends.
    if (finished.has(call)) return;
    finished.add(call);
    const endTick = performance.now();
    const lostPrompt = lostPrompts.get(call);
    if (!lostPrompt) return recordOnceKnown(call, endTick, error);
    awaitingCount.set(call, error);
    void lostPrompt.tokens.then((input) => {
      if (!awaitingCount.delete(call)) return;
      if (input > 0) meterUsage(call.metrics, estimatedTokens(input, 0), true, lostPrompt.price);
      recordOnceKnown(call, endTick, error);
    });
  };

  const recordOnceKnown = (call: Call, endTick: number, error: GatewayError | undefined) => {
    const checking = keyChecks.get(call);
    if (checking && !call.principal) {
      // Ended while billing checks its key: recorded once the key's org is known (or known not to be).
      awaitingKey.set(call, error);
      const record = () => {
        if (awaitingKey.delete(call)) recordFinished(call, endTick, error);
      };
      void checking.then(record, record);
      return;
    }
    recordFinished(call, endTick, error);
  };

  /**
   * Runs a stream's upstream attempts (see callUpstream) until one opens, and returns its stream with what its meter
   * takes of the call. A stream outlives routing: its whole-request limit aborts the upstream wherever it is, and ends
   * (and meters) a stream nobody reads; finishing the call aborts whatever is left upstream. The upstream call has one
   * signal: finishing the call, the deadline or the client leaving aborts it. Linked by listeners, which die with the
   * call, rather than AbortSignal.any (more memory kept alive, as in the provider).
   */
  const streamUpstream = async <T>(
    call: Call,
    route: ModelRoute,
    price: Price,
    admission: Admission,
    attempt: Attempt<AsyncIterable<T>>,
    countInput: (model: string) => Promise<number>,
  ) => {
    const deadline = new AbortController();
    const limitMs = router.limitMs(route);
    admission.deadlineTimer = setTimeout(
      () => deadline.abort(requestTimeout(limitMs)),
      Math.max(0, router.deadline(call, route) - performance.now()),
    );
    const upstream = new AbortController();
    admission.upstream = upstream;
    const cut = () => upstream.abort();
    deadline.signal.addEventListener("abort", cut, { once: true });
    call.signal?.addEventListener("abort", cut, { once: true });
    if (call.signal?.aborted) cut();
    const stream = await callUpstream(call, route, price, attempt, countInput, upstream.signal, true);
    return {
      stream: limitStream(stream, deadline.signal, limitMs),
      metering: {
        call,
        price,
        servedPrice: (tier: unknown) => priceServed(route, tier, price),
        upstreamEnded: (error: GatewayError | undefined) => router.streamEnded(call, error),
        deadline: deadline.signal,
        finish,
        log,
      },
    };
  };

  /** Parses and admits a chat request; a whole one must not ask for a stream. */
  const admitChat = async (call: Call, body: unknown, stream: boolean) => {
    const principal = await authorizeBody(call);
    // A body refused below is metered under the model it names all the same.
    nameModel(call, body);
    const input = parseChatInput(body);
    if (call.span?.isRecording()) call.span.setAttributes(chatRequestAttributes(input.upstream, stream));
    call.metrics.streamed = stream;
    const route = audioRoute(routeFor(call, principal, input), openAudioIds(call, principal, input));
    if (input.stream && !stream) throw invalidRequest("Streaming requests need the streaming endpoint.", "stream");
    const price = requestedPrice(route, input.upstream);
    const cap = route.maxOutputTokens ?? defaultMaxOutputTokens;
    const admission = await admit(
      call,
      principal,
      route,
      maxChatSpend(input.upstream, reservationPrice(route), cap, route.contextWindow, upstreamModels(route)),
      estimatedChatTokens(input.upstream, cap, upstreamModels(route)),
      unsetOutputTokens(input.upstream, cap),
    );
    return { input, route, price, admission };
  };

  /**
   * Opens the ids of earlier audio answers assistant messages name (`audio.id`), which are the gateway's (see
   * response-ids.ts), sealed for the caller's org: the upstream is sent its own, and has the model hear that audio
   * again. One that does not open is a 400 naming it. Returns the provider that made each, with its param.
   */
  const openAudioIds = (call: Call, principal: Principal, input: ChatInput) => {
    const made: { provider: string; param: string }[] = [];
    const messages = input.upstream.messages as unknown[];
    for (let i = 0; i < messages.length; i++) {
      const m = messages[i] as Record<string, unknown>;
      const audio = m.audio as Record<string, unknown> | null | undefined;
      // Checked by parseChatInput: an assistant's audio has a string id; other roles' pass through unread.
      if (m.role !== "assistant" || typeof audio?.id !== "string") continue;
      const param = `messages[${i}].audio.id`;
      const opened = responseIds.unwrapAudio(audio.id, idScope(principal));
      if (!opened) throw audioNotFound(audio.id, param);
      inClientWords(call, opened.upstreamId, audio.id);
      m.audio = { ...audio, id: opened.upstreamId };
      made.push({ provider: opened.provider, param });
    }
    return made;
  };

  /**
   * The route of a chat request that names earlier audio answers: the model's targets on the provider that made them,
   * whose account holds the audio (another's does not know it), in config order. A 400 naming the id when the model
   * has none there, or when the audio answers were made by different providers.
   */
  const audioRoute = (route: ModelRoute, made: { provider: string; param: string }[]): ModelRoute => {
    const first = made[0];
    if (!first) return route;
    const other = made.find((a) => a.provider !== first.provider);
    if (other) {
      throw invalidRequest(
        `The audio answer was made by provider '${other.provider}', the conversation's earlier one by ` +
          `'${first.provider}': one request can only name audio one provider made.`,
        other.param,
      );
    }
    const targets = route.targets.filter((t) => t.provider === first.provider);
    if (targets.length === 0) {
      throw invalidRequest(
        `The audio answer was made by provider '${first.provider}', where model '${route.name}' has no target: ` +
          "continue it with a model served there.",
        first.param,
      );
    }
    return targets.length === route.targets.length ? route : { ...route, targets };
  };

  /**
   * Parses and admits a Responses API request. One chained to state an upstream account holds (an earlier response, a
   * stored item) is routed to its model's first target alone: another target's account does not
   * know that state, so falling back would fail, or answer without the context the client meant.
   */
  const admitResponses = async (call: Call, body: unknown, stream: boolean) => {
    const principal = await authorizeBody(call);
    // A body refused below is metered under the model it names all the same.
    nameModel(call, body);
    const input = parseResponsesInput(body);
    if (call.span?.isRecording()) call.span.setAttributes(responsesRequestAttributes(input.upstream, stream));
    const m = call.metrics;
    m.streamed = stream;
    const routed = routeFor(call, principal, input);
    const made = openItemIds(call, principal, input);
    const route = input.chained
      ? chainedRoute(call, principal, routed, input, made.first)
      : itemsRoute(routed, input, made);
    const price = requestedPrice(route, input.upstream);
    const cap = route.maxOutputTokens ?? defaultMaxOutputTokens;
    const prompt = responsesPrompt(input.upstream);
    const maxOutput = input.upstream.max_output_tokens ?? undefined;
    const admission = await admit(
      call,
      principal,
      route,
      maxResponsesSpend(
        prompt,
        maxOutput,
        input.readsUnseen,
        reservationPrice(routed),
        cap,
        route.contextWindow,
        upstreamModels(route),
      ),
      estimatedResponsesTokens(prompt, maxOutput, cap, upstreamModels(route)),
      maxOutput === undefined ? cap : 0,
    );
    return { input, route, price, prompt, admission, upstreamFor: upstreamFor(input, made) };
  };

  /**
   * Opens the item ids of a request's input (an item given back, a reference to a stored one, the MCP approval request
   * an approval answers), which are the gateway's (see response-ids.ts), sealed for the caller's org: the upstream is
   * sent its own, and would read the item it names into the request. One that does not open is a 400 naming it.
   * Returns the provider that made the first and its param, the last's, and by item's index the providers of ids.
   */
  const openItemIds = (call: Call, principal: Principal, input: ResponsesInput): MadeItems => {
    const items = input.upstream.input;
    const made: MadeItems = { byItem: new Map() };
    if (!Array.isArray(items)) return made;
    for (let i = 0; i < items.length; i++) {
      const item = items[i] as unknown as Record<string, unknown>;
      for (const field of itemIdFields) {
        const id = item[field];
        if (typeof id !== "string") continue;
        const param = `input[${i}].${field}`;
        const opened = responseIds.unwrapItem(id, idScope(principal));
        if (!opened) throw itemNotFound(id, param);
        item[field] = opened.upstreamId;
        inClientWords(call, opened.upstreamId, id);
        made.first ??= { provider: opened.provider, param };
        made.last = { provider: opened.provider, param };
        made.byItem.set(i, { ...made.byItem.get(i), [field]: opened.provider });
      }
    }
    return made;
  };

  /**
   * The route of a request that gives items back whole, chained to nothing (a stateless tool loop: `store: false`, a
   * turn's output given back as input). Their ids and a reasoning item's `encrypted_content` are the account's that
   * made them, which another account cannot read (OpenAI refuses such reasoning: 400 `invalid_encrypted_content`): the
   * model's targets on the provider that made the last of them come first, in config order, then its others, which
   * are sent those items as upstreamFor makes them. A target they cannot be made for is left out. A request giving
   * back no such item is routed as any other.
   */
  const itemsRoute = (route: ModelRoute, input: ResponsesInput, made: MadeItems): ModelRoute => {
    const last = made.last;
    const items = input.upstream.input;
    if (!last || !Array.isArray(items)) return route;
    const servable = route.targets.filter((t) => foreignItems(items, made, t.provider) !== undefined);
    const home = servable.filter((t) => t.provider === last.provider);
    if (home.length > 0) {
      const targets = [...home, ...servable.filter((t) => t.provider !== last.provider)];
      return { ...route, targets: targets.map((t) => ({ ...t, weight: undefined })) };
    }
    if (servable.length > 0) return { ...route, targets: servable };
    // An item no target elsewhere can be sent, made where the model has no target.
    let named = last;
    for (const [i, from] of made.byItem) {
      for (const [field, provider] of Object.entries(from)) {
        if (!route.targets.some((t) => t.provider === provider)) named = { provider, param: `input[${i}].${field}` };
      }
    }
    throw invalidRequest(
      `The input's item was made by provider '${named.provider}', where model '${route.name}' has no target: ` +
        "continue it with a model served there.",
      named.param,
    );
  };

  /**
   * What each provider is sent of a request: the items another provider made as foreignItems makes them, unless the
   * request is chained (to one target, see chainedRoute), which goes as it came.
   */
  const upstreamFor = ({ upstream: request, chained }: ResponsesInput, made: MadeItems) => {
    const sent = new Map<string, ResponsesRequest>();
    return (provider: string): ResponsesRequest => {
      if (chained || made.byItem.size === 0 || !Array.isArray(request.input)) return request;
      let r = sent.get(provider);
      if (!r) sent.set(provider, (r = { ...request, input: foreignItems(request.input, made, provider) ?? [] }));
      return r;
    };
  };

  /**
   * The input items as `provider`'s account can read them: another's reasoning items are left out (their
   * `encrypted_content` is sealed for the account that made them; the model reasons again) and its other items go
   * without their ids (a message or a tool call given whole is read without one). Undefined when an item cannot go
   * without what another account holds: an approval of its MCP request, or encrypted content that is not reasoning
   * (a compaction's, which holds the conversation).
   */
  const foreignItems = <T>(items: T[], made: MadeItems, provider: string): T[] | undefined => {
    const out: T[] = [];
    for (let i = 0; i < items.length; i++) {
      const item = items[i] as T & Record<string, unknown>;
      const from = made.byItem.get(i);
      if (from?.approval_request_id !== undefined && from.approval_request_id !== provider) return undefined;
      if (from?.id === undefined || from.id === provider) out.push(item);
      else if (item.type === "reasoning") continue;
      else if (item.encrypted_content !== undefined && item.encrypted_content !== null) return undefined;
      else {
        const { id: _, ...rest } = item;
        out.push(rest as T);
      }
    }
    return out;
  };

  /**
   * The one target of a chained request: continuing an earlier response, the model's first target on the provider
   * that made it, whose account holds it; else the first on the provider of the first item it gives by id, or the
   * model's first. The client's previous_response_id is the gateway's (see response-ids.ts), sealed for its org:
   * opened, the upstream's own id goes upstream.
   */
  const chainedRoute = (
    call: Call,
    principal: Principal,
    route: ModelRoute,
    input: ResponsesInput,
    itemsFrom: { provider: string; param: string } | undefined,
  ): ModelRoute => {
    const previous = input.upstream.previous_response_id;
    let from = itemsFrom && { ...itemsFrom, what: "The input's stored item was" };
    if (typeof previous === "string") {
      const opened = responseIds.unwrap(previous, idScope(principal));
      if (!opened) throw previousResponseNotFound(previous);
      input.upstream.previous_response_id = opened.upstreamId;
      inClientWords(call, opened.upstreamId, previous);
      from = { provider: opened.provider, param: "previous_response_id", what: "The previous response was" };
    }
    if (!from) return { ...route, targets: route.targets.slice(0, 1) };
    const { provider, param, what } = from;
    const target = route.targets.find((t) => t.provider === provider);
    if (!target) {
      throw invalidRequest(
        `${what} made by provider '${provider}', where model '${route.name}' has no target: continue it with a ` +
          "model served there.",
        param,
      );
    }
    return { ...route, targets: [target] };
  };

  /**
   * An upstream's refusal of a chained request names the response, item or chat audio by its own id ("Previous response
   * with id '...' not found.", when it no longer holds it): passed on, it names the client's. The log keeps the
   * upstream's words.
   */
  const continued = new WeakMap<Call, Map<string, string>>();
  const inClientWords = (call: Call, upstreamId: string, clientId: string) => {
    const ids = continued.get(call) ?? new Map<string, string>();
    continued.set(call, ids.set(upstreamId, clientId));
  };
  /** An attempt whose refusal names what the call continues in the client's words; ids are opened before any attempt. */
  const inClientIds = <T>(call: Call, attempt: Promise<T>): Promise<T> => {
    const ids = continued.get(call);
    // Most calls continue nothing: their attempt goes on as it is, with no handler made for it.
    if (!ids) return attempt;
    return attempt.catch((e: unknown): never => {
      if (e instanceof UpstreamError && e.error) {
        for (const [upstreamId, clientId] of ids) e.error.message = e.error.message.replaceAll(upstreamId, clientId);
      }
      throw e;
    });
  };

  /** A stored response call's failure: the upstream's 404 is the client's id not found, as the gateway's own is. */
  const storedResponseError = (call: Call, e: unknown, id: string): GatewayError => {
    if (!(e instanceof UpstreamError)) return toGatewayError(e);
    if (e.failure === "cancelled") return clientGone(call.signal);
    if (e.status === 404) return responseNotFound(id);
    if (e.failure === "rejected") return upstreamRejected("the stored response", e.status ?? 400, e.error);
    log.warn("upstream attempt failed", { request_id: call.requestId, provider: call.metrics.provider, err: e.message });
    if (e.failure === "timeout") return upstreamTimeout("The upstream holding the response timed out.");
    if (e.status === 429) {
      return upstreamRateLimited("The upstream holding the response is rate limited; retry later.", e.retryAfterMs);
    }
    return upstreamFailed("The upstream holding the response failed.");
  };

  const recordFinished = (call: Call, endTick: number, error: GatewayError | undefined) => {
    unfinished.delete(call);
    if (unfinished.size === 0) allFinished.wakeAll();
    const m = call.metrics;
    const admission = admissions.get(call);
    if (admission) {
      admissions.delete(call);
      clearTimeout(admission.deadlineTimer);
      // A stream that ended well has read its upstream to the end; any other end leaves it to be cut.
      if (error) admission.upstream?.abort();
      const tokens = (m.usage?.inputTokens ?? 0n) + (m.usage?.outputTokens ?? 0n);
      const charges = admission.reservation?.settle({ nanos: m.costNanos, tokens });
      if (charges?.length) m.budgetCharges = charges.map((charge) => create(BudgetChargeSchema, charge));
      admission.ticket?.settle(Number(tokens));
    }
    const totalMs = endTick - call.startTick;
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
    // Refused before a key was accepted, a request has no org to bill or to show it to: Prometheus counts it and its
    // trace keeps it, and it takes no spool room a flood of them would take from requests that bill.
    if (call.span?.isRecording()) {
      call.span.setAttributes(outcomeAttributes(m, call.response, error, providers.get(m.provider)?.kind));
    }
    if (m.orgId !== "") withChildSpan("gateway.enqueue_metrics", {}, () => shipper.record(m));
    // Only now that its row is written (or dropped): see call-journal.ts.
    if (journaled.delete(call)) options.calls?.ended(call.requestId);
    if (instruments) {
      const endpoint = endpointLabels[m.endpoint] ?? "unspecified";
      // Clients name any model they like: the label only takes configured names, so series stay bounded.
      const model = config.models.has(m.requestedModel) ? m.requestedModel : "unknown";
      const status = statusLabels[m.status] ?? "unspecified";
      instruments.requests.inc({ endpoint, model, provider: m.provider, status, code: m.httpStatus });
      instruments.duration({ endpoint }).observe(totalMs / 1000);
      instruments.overhead({ endpoint }).observe((totalUs - upstreamUs) / 1e6);
      if (upstreamUs > 0) instruments.upstream({ endpoint, provider: m.provider }).observe(upstreamUs / 1e6);
      if (m.ttftUs > 0n) instruments.ttft({ model }).observe(Number(m.ttftUs) / 1e6);
      const usage = m.usage;
      if (usage) {
        instruments.tokens.inc({ model, type: "input" }, Number(usage.inputTokens));
        instruments.tokens.inc({ model, type: "cached_input" }, Number(usage.cachedInputTokens));
        instruments.tokens.inc({ model, type: "output" }, Number(usage.outputTokens));
        instruments.tokens.inc({ model, type: "reasoning" }, Number(usage.reasoningTokens));
      }
      if (m.costNanos > 0n) instruments.cost.inc({ model }, Number(m.costNanos) / 1e9);
      if (m.retries > 0) instruments.retries.inc({ model }, m.retries);
      if (m.fallbackUsed) instruments.fallbacks.inc({ model });
    }
  };

  return {
    get routes() {
      return routes;
    },
    reconfigure(next, nextProviders) {
      const nextRoutes = routesOf(next, nextProviders);
      for (const name of providers.keys()) if (!nextProviders.has(name)) providers.delete(name);
      for (const [name, provider] of nextProviders) providers.set(name, provider);
      config = next;
      routes = nextRoutes;
    },
    begin(endpoint, secret, signal) {
      // The call's own signal: the client leaving (with its reason), or the gateway cutting it at shutdown.
      const own = new AbortController();
      if (signal?.aborted) own.abort(signal.reason);
      else signal?.addEventListener("abort", () => own.abort(signal.reason), { once: true });
      const startMs = Date.now();
      const requestId = newRequestId(startMs);
      const span = trace.getActiveSpan();
      // Now rather than as it ends: a stream refused before its handler can end its span before its refusal is metered.
      if (span?.isRecording()) span.setAttribute("gateway.request_id", requestId);
      const call: Call = {
        requestId,
        span: span?.isRecording() ? span : undefined,
        startMs,
        startTick: performance.now(),
        secret,
        signal: own.signal,
        principal: undefined,
        upstreamMs: 0,
        metrics: create(RequestMetricsSchema, {
          requestId,
          ...activeTrace(),
          startTime: timestampFromMs(startMs),
          endpoint,
          gatewayInstanceId: instanceId,
        }),
      };
      unfinished.set(call, own);
      return call;
    },
    settled: (timeoutMs) => (unfinished.size === 0 ? Promise.resolve(true) : allFinished.wait(timeoutMs)),
    cutUnfinished() {
      const cut = [...unfinished.keys()];
      for (const call of cut) {
        // One that ended while its key was checked is recorded as it ended, under no org if billing has not answered.
        const error = awaitingKey.get(call) ?? awaitingCount.get(call);
        // One whose count of lost prompts is not made yet is recorded without them.
        if (awaitingKey.delete(call) || awaitingCount.delete(call)) recordFinished(call, performance.now(), error);
        else finish(call, cutAtShutdown());
      }
      return cut.length;
    },
    cutInFlight() {
      const cut = [...unfinished.values()];
      for (const own of cut) own.abort(new ShutdownCut());
      return cut.length;
    },
    async handle(call, work) {
      try {
        const result = await work();
        // An open stream records its metrics when it ends.
        if (!call.metrics.streamed) finish(call);
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
      const { input, route, price } = await admitChat(call, body, false);
      const result = await callUpstream(
        call,
        route,
        price,
        (provider, model, options) => inClientIds(call, provider.chat({ ...input.upstream, model }, options)),
        (model) => countInputTokens({ ...input.upstream, model }),
      );
      const { completion } = result;
      clientAudio(completion.choices, ownAudioId(call, call.metrics.provider));
      const outcome = metered(call, result, completion.model, priceServed(route, completion.service_tier, price));
      // The usage shown is what is charged, the prompts of lost attempts with it, as the RPC's accounting says.
      if (call.lostInputTokens) completion.usage = answeredUsage(completion.usage, outcome.tokens);
      call.response = { id: completion.id, finishReasons: completion.choices.map((c) => c.finish_reason ?? "") };
      return { completion, ...outcome };
    },
    async chatStream(call, body) {
      const { input, route, price, admission } = await admitChat(call, body, true);
      let request = input.upstream;
      const { stream, metering } = await streamUpstream(
        call,
        route,
        price,
        admission,
        (provider, model, options) => {
          request = { ...input.upstream, model };
          return inClientIds(call, provider.streamChat(request, options));
        },
        (model) => countInputTokens({ ...input.upstream, model }),
      );
      const audioId = ownAudioId(call, call.metrics.provider);
      return meterChatStream({ ...metering, chunks: stream, request, includeUsage: input.includeUsage, audioId });
    },
    async embed(call, body) {
      const principal = await authorizeBody(call);
      // A body refused below is metered under the model it names all the same.
      nameModel(call, body);
      const input = parseEmbeddingInput(body);
      if (call.span?.isRecording()) call.span.setAttributes(embeddingRequestAttributes(input));
      const route = routeFor(call, principal, input);
      const inputTokens = maxEmbeddingInputTokens(input.upstream.input);
      await admit(
        call,
        principal,
        route,
        maxSpend(inputTokens, 0, route.price),
        estimatedEmbeddingTokens(input.upstream.input),
      );
      const result = await callUpstream(
        call,
        route,
        route.price,
        (provider, model, options) => provider.embed({ ...input.upstream, model }, options),
        (model) => countEmbeddingTokens(input.upstream.input, model),
      );
      const outcome = metered(call, result, result.response.model, route.price);
      if (call.lostInputTokens) result.response.usage = answeredEmbeddingUsage(outcome.tokens);
      return { response: result.response, encodingFormat: input.upstream.encoding_format, ...outcome };
    },
    async responses(call, body) {
      const { input, route, price, prompt, upstreamFor } = await admitResponses(call, body, false);
      if (input.stream) throw invalidRequest("Streaming requests need the streaming endpoint.", "stream");
      const result = await callUpstream(
        call,
        route,
        price,
        (provider, model, options) =>
          inClientIds(call, provider.responses({ ...upstreamFor(provider.name), model }, options)),
        (model) => countResponsesInputTokens(prompt, model),
      );
      const response = clientResponse(result.response, ownIds(call, call.metrics.provider));
      const outcome = metered(call, result, response.model, priceServed(route, response.service_tier, price));
      // The usage shown is what is charged, the prompts of lost attempts with it, as chat's is.
      if (call.lostInputTokens) response.usage = answeredResponsesUsage(response.usage, outcome.tokens) as typeof response.usage;
      call.response = { id: response.id, finishReasons: [String(response.status ?? "")] };
      return { response, ...outcome };
    },
    async responsesStream(call, body) {
      const { route, price, prompt, admission, upstreamFor } = await admitResponses(call, body, true);
      let served: string | undefined;
      const { stream, metering } = await streamUpstream(
        call,
        route,
        price,
        admission,
        (provider, model, options) => {
          served = model;
          return inClientIds(call, provider.streamResponses({ ...upstreamFor(provider.name), model }, options));
        },
        (model) => countResponsesInputTokens(prompt, model),
      );
      const events = withClientIds(stream, ownIds(call, call.metrics.provider));
      return meterResponseStream({ ...metering, events, prompt, model: served });
    },
    async storedResponse(call, action, id, query) {
      const principal = call.principal ?? (await authorize(call));
      const opened = responseIds.unwrap(id, idScope(principal));
      const provider = opened && providers.get(opened.provider);
      if (!opened || !provider) throw responseNotFound(id);
      call.metrics.provider = opened.provider;
      // A page's bounds are the client's item ids.
      const upstreamQuery = { ...query };
      for (const param of ["after", "before"]) {
        const bound = query[param];
        if (typeof bound !== "string") continue;
        const item = responseIds.unwrapItem(bound, idScope(principal));
        if (!item) throw itemNotFound(bound, param);
        upstreamQuery[param] = item.upstreamId;
      }
      // It uses no tokens, but it is a call on the upstream account every org shares: one of the key's requests.
      const keyLimits = principal.grant.apiKey?.limits;
      const limits = {
        requestsPerMinute: keyLimits?.requestsPerMinute ?? 0,
        tokensPerMinute: 0,
        maxConcurrentRequests: keyLimits?.maxConcurrentRequests ?? 0,
      };
      const ticket = options.rateLimits?.admit(principal.lineageId, limits, 0);
      if (ticket) admissions.set(call, { ticket, reservation: undefined });
      noteInFlight(call);
      if (ticket?.state) call.limitHeaders = rateLimitHeaders(ticket.state);
      const sent = performance.now();
      try {
        const request = { action, id: opened.upstreamId, query: upstreamQuery };
        const options = { signal: call.signal, timeoutMs: storedResponseTimeoutMs };
        const answer = await provider.storedResponse(request, options);
        const ids = ownIds(call, opened.provider);
        return action === "input_items" ? clientItemPage(answer, ids) : clientResponse(answer, ids);
      } catch (e) {
        throw storedResponseError(call, e, id);
      } finally {
        call.upstreamMs += performance.now() - sent;
      }
    },
    models(call) {
      const allowed = call.principal?.allowedModels;
      return allowed ? routes.filter((r) => allowed.has(r.name)) : routes;
    },
    namedModel: nameModel,
    model(call, name) {
      call.metrics.requestedModel = meteredName(name);
      // As the list it belongs to: a model the key may not use is one it does not see, so that asking for names one by
      // one tells a restricted key nothing of the models it may not use (404 as for an unknown one, as OpenAI answers).
      const allowed = call.principal?.allowedModels;
      if (allowed && !allowed.has(name)) throw modelNotFound(name);
      return admitModel(call.principal as Principal, name);
    },
    finish,
  };
}

/**
 * Whose responses and items a key may name (see response-ids.ts): its org's and, for a key of a project, that project's
 * alone, as OpenAI scopes stored responses to a project.
 */
function idScope(principal: Principal): string {
  return principal.projectId === "" ? principal.orgId : `${principal.orgId}\u0000${principal.projectId}`;
}

/** The providers that made the items a request's input gives by id (see openItemIds). */
interface MadeItems {
  first?: { provider: string; param: string };
  last?: { provider: string; param: string };
  /** By the item's index in `input`: the provider of its own id, and of the MCP approval request it answers. */
  byItem: Map<number, { id?: string; approval_request_id?: string }>;
}

/** A streamed response's events with its response and item ids the client's (see response-ids.ts). */
async function* withClientIds(events: ResponseEventStream, ids: ClientIds): ResponseEventStream {
  // Each delta names its item: sealed once a stream, not once an event.
  const items = new Map<string, string>();
  const once: ClientIds = {
    response: ids.response,
    item(upstreamId) {
      let id = items.get(upstreamId);
      if (id === undefined) items.set(upstreamId, (id = ids.item(upstreamId)));
      return id;
    },
  };
  for await (const event of events) yield clientEvent(event, once);
}

/**
 * A histogram observed through one child a series, made once (see bySeries): observing with labels made a closure and
 * an object every time.
 */
function observedBySeries<L extends string>(config: HistogramConfiguration<L> & { labelNames: readonly [L, ...L[]] }) {
  const histogram = new Histogram(config);
  return bySeries(config.labelNames, (labels) => histogram.labels(labels));
}

function createInstruments(registry: Registry) {
  // Up to the default whole-request limit (GATEWAY_REQUEST_TIMEOUT_MS): a longer stream or a reasoning model's first
  // token past the last finite bucket would read as that bucket's bound in every quantile.
  const latencyBuckets = [0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];
  return {
    requests: createTalliedCounter({
      name: "gateway_requests_total",
      help: "Finished API requests by endpoint, requested model, serving provider, outcome and HTTP status.",
      labelNames: ["endpoint", "model", "provider", "status", "code"] as const,
      registers: [registry],
    }),
    duration: observedBySeries({
      name: "gateway_request_duration_seconds",
      help: "Time from a request's arrival to its end.",
      labelNames: ["endpoint"] as const,
      buckets: latencyBuckets,
      registers: [registry],
    }),
    upstream: observedBySeries({
      name: "gateway_upstream_duration_seconds",
      help: "Time a request spent waiting on upstream attempts, retries included.",
      labelNames: ["endpoint", "provider"] as const,
      buckets: latencyBuckets,
      registers: [registry],
    }),
    ttft: observedBySeries({
      name: "gateway_time_to_first_token_seconds",
      help: "Time from a streamed request's arrival to its first content token.",
      labelNames: ["model"] as const,
      buckets: latencyBuckets,
      registers: [registry],
    }),
    // Microseconds when keys and leases are cached; seconds when billing is slow to check a key or grant a lease.
    overhead: observedBySeries({
      name: "gateway_overhead_seconds",
      help: "What the gateway itself added to a request: total time minus time waiting on upstreams.",
      labelNames: ["endpoint"] as const,
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    }),
    tokens: createTalliedCounter({
      name: "gateway_tokens_total",
      help: "Tokens metered, by requested model and type (input includes cached input, output includes reasoning).",
      labelNames: ["model", "type"] as const,
      registers: [registry],
    }),
    cost: new Counter({
      name: "gateway_cost_usd_total",
      help: "Cost metered, in USD, by requested model (monitoring only; billing uses exact nano-USD).",
      labelNames: ["model"] as const,
      registers: [registry],
    }),
    retries: new Counter({
      name: "gateway_upstream_retries_total",
      help: "Upstream attempts after a request's first, by requested model.",
      labelNames: ["model"] as const,
      registers: [registry],
    }),
    unpricedTiers: new Counter({
      name: "gateway_unpriced_service_tier_total",
      help: "Requests an upstream said it served at a service tier the config does not price, billed at the model's dearest price.",
      labelNames: ["model", "tier"] as const,
      registers: [registry],
    }),
    fallbacks: new Counter({
      name: "gateway_fallbacks_total",
      help: "Requests served or last tried by a target other than their first choice, by requested model.",
      labelNames: ["model"] as const,
      registers: [registry],
    }),
  };
}

/** The GenAI semantic conventions' attributes of a chat request: its parameters, never its messages. */
function chatRequestAttributes(request: ChatRequest, stream: boolean): Attributes {
  const format = request.response_format?.type;
  return {
    "gen_ai.operation.name": "chat",
    "gen_ai.request.stream": stream,
    "gen_ai.request.max_tokens": request.max_completion_tokens ?? request.max_tokens ?? undefined,
    "gen_ai.request.temperature": request.temperature ?? undefined,
    "gen_ai.request.top_p": request.top_p ?? undefined,
    "gen_ai.request.frequency_penalty": request.frequency_penalty ?? undefined,
    "gen_ai.request.presence_penalty": request.presence_penalty ?? undefined,
    "gen_ai.request.seed": request.seed ?? undefined,
    "gen_ai.request.choice.count": request.n ?? undefined,
    "gen_ai.request.stop_sequences": typeof request.stop === "string" ? [request.stop] : (request.stop ?? undefined),
    "gen_ai.output.type": format === undefined ? undefined : format === "text" ? "text" : "json",
  };
}

/** The GenAI semantic conventions' attributes of a Responses API request: its parameters, never its input. */
function responsesRequestAttributes(request: ResponsesRequest, stream: boolean): Attributes {
  return {
    "gen_ai.operation.name": "chat",
    "gen_ai.request.stream": stream,
    "gen_ai.request.max_tokens": request.max_output_tokens ?? undefined,
    "gen_ai.request.temperature": request.temperature ?? undefined,
    "gen_ai.request.top_p": request.top_p ?? undefined,
  };
}

function embeddingRequestAttributes(input: EmbeddingInput): Attributes {
  return {
    "gen_ai.operation.name": "embeddings",
    "gen_ai.request.encoding_formats": [input.upstream.encoding_format],
    "gen_ai.embeddings.dimension.count": input.upstream.dimensions,
  };
}

/**
 * What a finished call's span says of it, on every outcome: its ids, the GenAI semantic conventions' response and usage
 * attributes, its cost and, when it failed, the error's code as `error.type`.
 */
function outcomeAttributes(
  m: RequestMetrics,
  response: Call["response"],
  error: GatewayError | undefined,
  kind: Provider["kind"] | undefined,
): Attributes {
  const usage = m.usage;
  const attributes: Attributes = {
    "gateway.request_id": m.requestId,
    "gateway.org_id": m.orgId || undefined,
    "gateway.api_key_id": m.apiKeyId || undefined,
    "gen_ai.provider.name": kind && genAiProviderNames[kind],
    "gateway.provider": m.provider || undefined,
    "gateway.retries": m.retries || undefined,
    "gateway.fallback": m.fallbackUsed || undefined,
    "error.type": error ? error.code || error.type : undefined,
  };
  if (m.requestedModel) attributes["gen_ai.request.model"] = m.requestedModel;
  if (response) {
    attributes["gen_ai.response.id"] = response.id;
    if (response.finishReasons.length > 0) attributes["gen_ai.response.finish_reasons"] = response.finishReasons;
  }
  // A model only answers once it served (a stream cut midway included); a failed attempt's target said nothing.
  if (response || m.ttftUs > 0n) attributes["gen_ai.response.model"] = m.servedModel;
  if (m.ttftUs > 0n) attributes["gen_ai.response.time_to_first_chunk"] = Number(m.ttftUs) / 1e6;
  if (usage) {
    attributes["gen_ai.usage.input_tokens"] = Number(usage.inputTokens);
    attributes["gen_ai.usage.output_tokens"] = Number(usage.outputTokens);
    attributes["gen_ai.usage.cache_read.input_tokens"] = Number(usage.cachedInputTokens);
    attributes["gen_ai.usage.reasoning.output_tokens"] = Number(usage.reasoningTokens);
    attributes["gateway.usage_estimated"] = m.usageEstimated;
    attributes["gateway.cost_nanos"] = m.costNanos.toString();
  }
  return attributes;
}

/**
 * The price a chat or Responses API request is reserved and, unless the upstream says otherwise, billed at: its service tier's when it
 * asks for one. Only tiers the config prices may be asked for: an upstream bills another at prices the gateway does not
 * know (priority above the default, flex below it), so it is refused.
 */
function requestedPrice(route: ModelRoute, request: { service_tier?: unknown }): Price {
  const tier = request.service_tier;
  if (tier === undefined || tier === null || tier === "auto" || tier === "default") return route.price;
  const price = typeof tier === "string" ? route.tierPrices.get(tier) : undefined;
  if (price) return price;
  const offered = ["auto", "default", ...route.tierPrices.keys()].map((t) => `'${t}'`).join(", ");
  throw invalidRequest(
    `Model '${route.name}' is not offered with service_tier '${clipped(String(tier), 40)}' here; use one of ${offered}.`,
    "service_tier",
    "invalid_value",
  );
}

/** The upstream models a route may call: what an image costs before one of them is chosen is the dearest's. */
function upstreamModels(route: ModelRoute): string[] {
  return route.targets.map((t) => t.model);
}

/**
 * What a chat request is reserved at: each kind of token at the dearest price any tier of its model bills it, as an
 * upstream may serve another tier than the one asked for (flex as default, auto as priority) and is billed at that.
 */
const reservationPrices = new WeakMap<ModelRoute, Price>();
function reservationPrice(route: ModelRoute): Price {
  let price = reservationPrices.get(route);
  if (!price) {
    price = dearestPrice([route.price, ...route.tierPrices.values()]);
    reservationPrices.set(route, price);
  }
  return price;
}

/**
 * The price of the tier an upstream says served a request (`service_tier` of its answer), else the requested one. A
 * tier the config does not price (an OpenAI project that defaults to priority answers `priority` for `auto`) costs what
 * the gateway cannot know: it is billed at the model's dearest price, what was reserved, and `unpriced` hears of it.
 */
function servedPrice(route: ModelRoute, served: unknown, requested: Price, unpriced?: (tier: string) => void): Price {
  if (served === "default") return route.price;
  if (typeof served !== "string" || served === "" || served === "auto") return requested;
  const price = route.tierPrices.get(served);
  if (price) return price;
  unpriced?.(served);
  return reservationPrice(route);
}
