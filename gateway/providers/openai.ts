import OpenAI, { APIConnectionTimeoutError, APIError, AzureOpenAI } from "openai";
import { createParser, type EventSourceMessage } from "eventsource-parser";
import { redactSecrets } from "../../lib/log.ts";
import { watchSilence } from "../../lib/silence.ts";
import { outgoingTraceHeaders } from "../../lib/telemetry.ts";
import { clipped } from "../../lib/text.ts";
import { type AzureProviderConfig, azureV1Path, type OpenAIProviderConfig } from "../config.ts";
import { tokenFailure } from "./entra.ts";
import { responsesPrompt } from "../responses-request.ts";
import {
  addGenerated,
  addReasoning,
  countEmbeddingTokens,
  countInputTokens,
  countResponsesInputTokens,
  countTextTokens,
} from "../tokenizer.ts";
import {
  addResponseOutput,
  answeredEmbeddingUsage,
  answeredResponsesUsage,
  answeredUsage,
  type CallOptions,
  type ChatCompletion,
  type ChatCompletionChunk,
  type ChatRequest,
  type ChatResult,
  type ChunkStream,
  type CreateEmbeddingResponse,
  type EmbeddingRequest,
  type EmbeddingResult,
  embeddingUsage,
  failureOfStatus,
  meteredUsage,
  type Provider,
  type ResponseEvent,
  type ResponseEventStream,
  type ResponseObject,
  type ResponsesRequest,
  type ResponsesResult,
  responseEvents,
  responsesUsageAsChat,
  type StoredResponseRequest,
  terminalResponseEvents,
  retryAfterMs,
  UpstreamError,
  upstreamErrorBody,
} from "./provider.ts";

/**
 * OpenAI, Azure OpenAI or any OpenAI-compatible URL through the official SDK. The SDK builds each request (URL, auth,
 * Azure's deployment path and api-version, configured headers) and its error classes describe a refusal; the gateway
 * sends it with fetch, since it owns retries and timeouts. `apiKey` is the provider's key, or what gets each call its
 * Entra ID token (`auth: entra_id`); undefined when the variable holding the key (or the service principal's secret)
 * is unset: every call then fails as misconfigured and routing moves on. The upstream's words in its errors are passed
 * on with `secrets` (the gateway's keys and tokens, this provider's key among them) redacted, as upstreams quote the
 * key they refused.
 */
export function createOpenAIProvider(
  config: OpenAIProviderConfig | AzureProviderConfig,
  apiKey: string | (() => Promise<string>) | undefined,
  secrets: readonly string[] = typeof apiKey === "string" ? [apiKey] : [],
  maxAnswerBytes = defaultMaxAnswerBytes,
): Provider {
  const keyVariable = config.api_key_env ?? (config.kind === "azure" ? config.client_secret_env : undefined);
  const missingKey = keyVariable !== undefined && !apiKey;
  const tokens = typeof apiKey === "function" ? apiKey : undefined;
  // The tokens sent lately, redacted from the upstream's words as keys are (any JWT is, too).
  const sentTokens: string[] = [];
  const redact = (text: string) => redactSecrets(text, sentTokens.length > 0 ? [...sentTokens, ...secrets] : secrets);
  // Explicit values keep the SDK from reading OPENAI_* and AZURE_OPENAI_* variables behind the config's back (a gateway
  // run with the demo's OPENAI_BASE_URL set, say); the gateway logs for itself.
  const common = { organization: null, project: null, webhookSecret: null, logLevel: "off" } as const;
  // Azure's v1 API takes OpenAI's paths, the deployment as the model and the key as a bearer token, and wants no
  // api-version unless one is asked for; a resource endpoint takes /openai/deployments/... and an api-version.
  const azureV1 = config.kind === "azure" && azureV1Path.test(new URL(config.base_url).pathname);
  const azureDeployments = config.kind === "azure" && !azureV1;
  const client = missingKey
    ? undefined
    : azureDeployments
      ? withHeaders(
          // The base URL the SDK makes of an `endpoint`, built here: given an endpoint, it reads OPENAI_BASE_URL too.
          new AzureOpenAI({
            ...common,
            baseURL: `${config.base_url.replace(/\/+$/, "")}/openai`,
            ...(tokens ? { azureADTokenProvider: tokens } : { apiKey: apiKey as string | undefined }),
            apiVersion: config.api_version ?? "2024-10-21",
          }),
          config.headers,
        )
      : withHeaders(
          new OpenAI({
            ...common,
            adminAPIKey: null,
            baseURL: config.base_url ?? "https://api.openai.com/v1",
            // The SDK insists on a key; upstreams configured without one (local servers) ignore it.
            apiKey: apiKey ?? "unused",
            defaultQuery:
              config.kind === "azure" && config.api_version ? { "api-version": config.api_version } : undefined,
          }),
          config.headers,
        );
  const pool = idleBound(
    config.keep_alive_ms,
    /^http:\/\//i.test(config.base_url ?? ""),
  );
  const connected = (): OpenAI => {
    if (!client) throw new UpstreamError("misconfigured", `provider ${config.name}: ${keyVariable} is not set`);
    return client;
  };

  /**
   * The Entra ID token for a call, got within its time limit (a token endpoint that does not answer fails the attempt
   * as a timeout) as `authorization`; undefined for a provider with a key, which its template carries.
   */
  const bearer = async (signal: AbortSignal): Promise<string | undefined> => {
    if (!tokens) return undefined;
    let token: string;
    try {
      token = await new Promise<string>((resolve, reject) => {
        const stop = () => reject(new UpstreamError("timeout", `${config.name}: timed out waiting for an Entra ID token`));
        if (signal.aborted) stop();
        signal.addEventListener("abort", stop, { once: true });
        tokens().then(resolve, reject).finally(() => signal.removeEventListener("abort", stop));
      });
    } catch (e) {
      throw e instanceof UpstreamError ? e : tokenFailure(config.name, e, redact);
    }
    if (!sentTokens.includes(token)) {
      sentTokens.unshift(token);
      sentTokens.length = Math.min(sentTokens.length, 2);
    }
    return `Bearer ${token}`;
  };

  /**
   * What the SDK builds for a call (URL and headers; only the body differs between calls) depends on the path, the
   * model (Azure's deployment) and the whole seconds of the time limit (its X-Stainless-Timeout header), so it is built
   * once for each of those: building it every time was about an eighth of the gateway's CPU per request.
   */
  const templates = new Map<string, Promise<{ url: string; init: RequestInit }>>();
  const template = (path: string, model: string, timeoutMs: number) => {
    const timeout = Math.max(1, Math.ceil(timeoutMs));
    const key = `${path}\n${model}\n${Math.trunc(timeout / 1000)}`;
    let built = templates.get(key);
    if (!built) {
      const sdk = connected();
      // Bounded by the configured paths, models and timeouts; a remaining deadline adds a few more.
      if (templates.size >= 512) templates.clear();
      // Azure serves the Responses API at a resource endpoint from 2025-03-01-preview on, not at the deployments'
      // default version: a provider that names no api_version is sent the first version that serves it.
      const query = path === "/responses" && azureDeployments && !config.api_version ? { "api-version": azureResponsesVersion } : undefined;
      built = sdk.buildRequest({ method: "post", path, body: { model }, timeout, query }).then(({ req, url }) => {
        const { body: _, ...init } = req as RequestInit;
        return { url, init };
      });
      templates.set(key, built);
      built.catch(() => templates.delete(key));
    }
    return built;
  };

  /**
   * One attempt: POSTs `body` to `path` and hands the answer to `read`, all within the attempt's time limit; a refusal
   * (any status but 2xx) becomes the SDK's APIError for it. Sending it through the SDK's own transport (its retry
   * loop, request logging and timers) cost about 100 µs of CPU more per call than fetch. `answer` is the content type
   * of an answer: only a 2xx of that type whose body then broke off had its prompt taken by a model.
   */
  const post = async <T>(
    path: string,
    body: { model: string },
    options: CallOptions,
    answer: RegExp,
    read: (response: Response) => Promise<T>,
  ) => {
    const { signal } = options;
    const attempt = new AbortController();
    // A listener rather than AbortSignal.any, which kept about 20 MB more alive in a loop of fetches.
    const abort = () => attempt.abort();
    const timer = setTimeout(abort, options.timeoutMs);
    signal?.addEventListener("abort", abort);
    let answering = false;
    try {
      if (signal?.aborted) abort();
      // Got first: building a template asks for one too, which the credential then answers from its cache. A provider
      // with a key has none to wait for.
      const authorization = tokens ? await bearer(attempt.signal) : undefined;
      const { url, init } = await template(path, body.model, options.timeoutMs);
      // Serialised as the SDK does its JSON bodies. A redirect is not followed: fetch would send the prompt, and the
      // configured headers but Authorization, to wherever it points, and a 301 or 302 would turn the POST into a GET.
      // Bun's own idle limit (5 minutes) is off: it would cut a model that thinks longer than that before it answers,
      // within the attempt's time limit, as a failure the upstream had not billed.
      // The attempt's span is the active one: an upstream that traces continues the request's trace from it.
      // The template's headers are shared by every call: a copy carries this one's, and its current Entra ID token
      // rather than the one the template was built with.
      const traced = Object.entries(outgoingTraceHeaders());
      const headers = traced.length === 0 && !authorization ? init.headers : new Headers(init.headers);
      for (const [name, value] of traced) (headers as Headers).set(name, value);
      if (authorization) (headers as Headers).set("authorization", authorization);
      const response = await fetch(url, {
        ...init,
        headers,
        body: JSON.stringify(body),
        signal: attempt.signal,
        redirect: "manual",
        timeout: false,
        session: pool?.(),
      });
      if (response.status >= 300 && response.status < 400) throw redirected(config.name, url, response, redact);
      if (!response.ok) throw await refusal(response);
      answering = answer.test(response.headers.get("content-type") ?? "");
      return await read(response);
    } catch (e) {
      if (signal?.aborted) throw new UpstreamError("cancelled", `${config.name}: request aborted`);
      if (attempt.signal.aborted) throw new UpstreamError("timeout", `${config.name}: timed out`);
      const failure = upstreamError(config.name, e, redact);
      // An answer whose body broke off (a read error, not a whole body that does not parse or is not an answer, nor a
      // failure the relay named) was being written by a model, which bills its prompt. A 2xx of another kind (a
      // proxy's HTML page, NDJSON) ran no model, however it ends.
      failure.promptTaken = answering && (e instanceof UpstreamError ? e.promptTaken : !(e instanceof SyntaxError));
      throw failure;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", abort);
    }
  };

  /** One attempt whose answer is a whole JSON body. */
  const postJson = <T>(path: string, body: { model: string }, options: CallOptions) =>
    post(path, body, options, json, async (r) => {
      const answer: unknown = JSON.parse(await bodyText(r, maxAnswerBytes, config.name));
      // OpenRouter answers 200 with its provider's failure as {"error": ...} when that provider failed after routing.
      // A Responses API object has an error member of its own (null, or why it failed), beside its output.
      const { error, choices, data, output } = (typeof answer === "object" && answer !== null ? answer : {}) as Record<string, unknown>;
      if (error && choices === undefined && data === undefined && output === undefined) {
        throw errorAfter200(config.name, error, redact, "in its answer");
      }
      return answer as T;
    });

  /**
   * An attempt asked with a field the gateway adds of its own accord, which some servers refuse: one that forbids fields
   * it does not know (422 "extra fields not permitted"), Azure before its api version took stream_options (400), one
   * that takes float embeddings alone. When the upstream model's refusal names the field (refusesOwn) and `mayRetry`
   * (what it refused was the gateway's alone: a client's bad option is its 400, and never decides what other clients'
   * calls are sent with), asked again without it (or, of encoding_format, for floats) within what is left of the
   * attempt's time, and from then on. Remembered only once the same request went through without it: a refusal of
   * anything else in it (a client's unknown field whose name merely starts the same) fails the retry too, and changes
   * nothing.
   */
  const refusable = async <T>(
    refusing: Set<string>,
    model: string,
    field: { name: string; own?: string },
    mayRetry: boolean,
    options: CallOptions,
    attempt: (withField: boolean, options: CallOptions) => Promise<T>,
  ): Promise<T> => {
    if (refusing.has(model)) return attempt(false, options);
    const started = performance.now();
    try {
      return await attempt(true, options);
    } catch (e) {
      if (!(mayRetry && e instanceof UpstreamError && e.failure === "rejected" && refusesOwn(e, field.name, field.own))) {
        throw e;
      }
      const timeoutMs = Math.max(1, options.timeoutMs - (performance.now() - started));
      const answer = await attempt(false, { ...options, timeoutMs });
      if (refusing.size >= 512) refusing.clear();
      refusing.add(model);
      return answer;
    }
  };

  /** Upstream models that refused stream_options: their streams go without. */
  const refusesStreamOptions = new Set<string>();
  /** Upstream models that refused encoding_format base64: floats are asked of them as floats. */
  const refusesBase64 = new Set<string>();

  /**
   * A streamed request's answer in JSON rather than events: the items `whole` makes of a whole answer, as a server that
   * does not stream (or a proxy that gathers streams) answers, which a model wrote and its upstream bills; otherwise a
   * failure, as some proxies answer one with a 200, its error read as a refusal's and taken as a whole answer's error
   * is.
   */
  const streamedWhole = async <T>(response: Response, whole: (answer: unknown) => AsyncIterable<T> | undefined) => {
    const text = await bodyText(response, maxAnswerBytes, config.name);
    let answer: unknown;
    try {
      answer = JSON.parse(text);
    } catch {
      answer = undefined;
    }
    const items = answer === undefined ? undefined : whole(answer);
    if (items) return items;
    const refused = refusalOf(response, text);
    if (refused.error) throw errorAfter200(config.name, refused.error, redact, "in its answer");
    throw new UpstreamError("transient", upstreamError(config.name, refused, redact).message);
  };

  /**
   * One streamed attempt, resolved with its stream once it has begun: its first items are held until one `begins` it
   * (or maxHeldChunks have come), and until then a failure (an error event, a stream that ends, what `begins` throws)
   * is the attempt's, which routing may retry or fall back from. A whole answer in JSON streams as the items `whole`
   * makes of it.
   */
  const openStream = <T>(
    path: string,
    body: { model: string; stream: true },
    options: CallOptions,
    relayed: (response: Response) => AsyncIterable<T>,
    whole: (answer: unknown) => AsyncIterable<T> | undefined,
    begins: (item: T) => boolean,
  ) =>
    post(path, body, options, eventStream, async (response) => {
      const answer = json.test(response.headers.get("content-type") ?? "")
        ? await streamedWhole(response, whole)
        : relayed(response);
      const items = answer[Symbol.asyncIterator]();
      const held: T[] = [];
      try {
        for (;;) {
          const next = await items.next();
          if (next.done) throw new UpstreamError("transient", `${config.name}: the stream ended before it began`);
          held.push(next.value);
          if (begins(next.value) || held.length >= maxHeldChunks) return resumed(held, items);
        }
      } catch (e) {
        // Failed before it began: whatever the stream was still to read is not wanted.
        await items.return?.();
        throw e;
      }
    });

  /** One streamed completion, begun with its first chunk. */
  const open = (body: Omit<ChatRequest, "stream"> & { stream: true }, options: CallOptions) => {
    const choices = typeof body.n === "number" && body.n > 1 ? body.n : 1;
    return openStream(
      "/chat/completions",
      body,
      options,
      (response) => relay(response, config.name, options, choices, redact, maxAnswerBytes),
      (answer) => completionChunks(answer, config.name),
      // Azure's first chunk holds its prompt filter's results alone, before the model has read the prompt: the answer
      // begins with the first chunk of a choice (or of usage).
      (chunk) => chunk.choices.length > 0 || Boolean(chunk.usage),
    );
  };

  /**
   * One streamed response, begun with its first event past the response's creation: a `response.failed` until then
   * fails the attempt.
   */
  const openResponse = (body: Omit<ResponsesRequest, "stream"> & { stream: true }, options: CallOptions) =>
    openStream(
      "/responses",
      body,
      options,
      (response) => relayResponse(response, config.name, options, redact, maxAnswerBytes),
      (answer) => (wholeResponse(answer) ? responseEvents(answer) : undefined),
      (event) => {
        if (event.type === "response.failed") throw failedResponse(config.name, event, redact);
        return !preliminaryEvents.has(event.type);
      },
    );

  const url = new URL(config.base_url ?? "https://api.openai.com/v1");
  return {
    name: config.name,
    kind: config.kind,
    async responses(request: ResponsesRequest, options: CallOptions): Promise<ResponsesResult> {
      const response = await postJson<ResponseObject>("/responses", request, options);
      if (!response || typeof response !== "object" || !Array.isArray(response.output)) {
        throw new UpstreamError("transient", `${config.name}: the response is not a Responses API response`);
      }
      // Answered whole, a failed response is the attempt's failure, as a streamed one is before its first output.
      if (response.status === "failed") throw failedResponse(config.name, { type: "response.failed", response }, redact);
      const output: string[] = [];
      const reasoning: string[] = [];
      addResponseOutput(output, reasoning, response.output);
      const { tokens, estimated } = await meteredUsage(responsesUsageAsChat(response.usage), {
        input: () => countResponsesInputTokens(responsesPrompt(request), request.model),
        output: () => countTextTokens(output, request.model),
        reasoning: () => countTextTokens(reasoning, request.model),
      });
      response.usage = answeredResponsesUsage(response.usage, tokens) as ResponseObject["usage"];
      return { response, tokens, usageEstimated: estimated };
    },

    streamResponses(request: ResponsesRequest, options: CallOptions): Promise<ResponseEventStream> {
      return openResponse({ ...request, stream: true }, options);
    },

    /**
     * Through the SDK's own calls (retrieve, delete, inputItems.list), its retries off (the attempt is the gateway's),
     * within the attempt's time limit, a redirect not followed and the answer read up to the same limit as others.
     */
    async storedResponse(request: StoredResponseRequest, options: CallOptions): Promise<unknown> {
      const sdk = connected();
      const { action, id } = request;
      // Azure's resource endpoints serve stored responses at the Responses API's version too (see template).
      const version = azureDeployments && !config.api_version ? { "api-version": azureResponsesVersion } : {};
      const query = { ...request.query, ...version } as never;
      // The SDK's own timeout (its 10 minutes unless given) ends with the headers: the whole call, body too, is
      // bounded by the attempt's.
      const timeout = Math.max(1, Math.ceil(options.timeoutMs));
      const limit = AbortSignal.timeout(timeout);
      const signal = options.signal ? AbortSignal.any([options.signal, limit]) : limit;
      const how = {
        signal,
        timeout,
        maxRetries: 0,
        fetchOptions: { redirect: "manual" as const },
        headers: outgoingTraceHeaders(),
      };
      try {
        // The SDK asks for the token itself, but not within the call's time: asked first, it answers from the cache.
        await bearer(signal);
        const call =
          action === "retrieve"
            ? sdk.responses.retrieve(id, query, how)
            : action === "delete"
              ? sdk.responses.delete(id, { ...how, query: version })
              : sdk.responses.inputItems.list(id, query, how);
        const text = await bodyText(await call.asResponse(), maxAnswerBytes, config.name);
        return text.trim() === "" ? {} : JSON.parse(text);
      } catch (e) {
        if (options.signal?.aborted) throw new UpstreamError("cancelled", `${config.name}: request aborted`);
        if (limit.aborted || e instanceof APIConnectionTimeoutError || (e instanceof UpstreamError && e.failure === "timeout")) {
          throw new UpstreamError("timeout", `${config.name}: timed out`);
        }
        throw upstreamError(config.name, e, redact);
      }
    },

    server: { address: url.hostname.replace(/^\[(.*)\]$/, "$1"), port: Number(url.port) || (url.protocol === "https:" ? 443 : 80) },
    async chat(request: ChatRequest, options: CallOptions): Promise<ChatResult> {
      const completion = await postJson<ChatCompletion>("/chat/completions", request, options);
      if (!completion || typeof completion !== "object" || !Array.isArray(completion.choices)) {
        throw new UpstreamError("transient", `${config.name}: the response is not a chat completion`);
      }
      for (const c of completion.choices) {
        if (c && typeof c === "object" && c.finish_reason) c.finish_reason = openAIFinishReason(c.finish_reason);
        if (Array.isArray(c?.message?.tool_calls)) c.message.tool_calls.forEach(typeFunctionCall);
      }
      const { tokens, estimated } = await meteredUsage(completion.usage, {
        input: () => countInputTokens(request),
        output: () => {
          const output: string[] = [];
          for (const c of completion.choices) if (c.message) addGenerated(output, c.message);
          return countTextTokens(output, request.model);
        },
        reasoning: () => {
          const reasoning: string[] = [];
          for (const c of completion.choices) if (c.message) addReasoning(reasoning, c.message);
          return countTextTokens(reasoning, request.model);
        },
      });
      completion.usage = answeredUsage(completion.usage, tokens);
      return { completion, tokens, usageEstimated: estimated };
    },

    async streamChat(request: ChatRequest, options: CallOptions): Promise<ChunkStream> {
      // The attempt's time limit covers the wait for the answer's headers and its first chunk: until a chunk has come,
      // a failure (a 200 with an error body, an error event first, a prefill past the limit) is the attempt's, which
      // routing may retry or fall back from. relay() then limits the silence between chunks and stops reading when
      // the client leaves. Events are read with eventsource-parser, which costs about half of what the SDK's own
      // stream decoder does per chunk.
      // The client's stream options (include_obfuscation, ...) go as it set them, with usage always asked for, unless
      // the upstream refuses stream_options: its usage is then counted.
      const { stream_options, ...rest } = request;
      const plain = { ...rest, stream: true as const };
      if (config.stream_usage === false) return open(plain, options);
      const usage = { ...plain, stream_options: { ...stream_options, include_usage: true } };
      const own = Object.keys(stream_options ?? {}).every((k) => k === "include_usage");
      const field = { name: "stream_options", own: "include_usage" };
      return refusable(refusesStreamOptions, request.model, field, own, options, (asked, attemptOptions) =>
        open(asked ? usage : plain, attemptOptions),
      );
    },

    async embed(request: EmbeddingRequest, options: CallOptions): Promise<EmbeddingResult> {
      // Vectors are asked for in base64 even when the client wants floats: a quarter of the bytes of float32s printed
      // in full, which the answer's writer decodes a vector at a time (embeddingJson). A server that takes floats
      // alone is asked again for them, and from then on, whichever the client asked for: the OpenAI SDKs ask for
      // base64 whenever their user sets nothing, and its floats are encoded for them below, as OpenAI would have.
      const field = { name: "encoding_format" };
      const response = await refusable(refusesBase64, request.model, field, true, options, (base64, attemptOptions) => {
        const body: EmbeddingRequest = { ...request, encoding_format: base64 ? "base64" : "float" };
        return postJson<CreateEmbeddingResponse>("/embeddings", body, attemptOptions);
      });
      if (!response || !Array.isArray(response.data)) {
        throw new UpstreamError("transient", `${config.name}: the embeddings response has no data`);
      }
      for (const item of request.encoding_format === "base64" ? (response.data as unknown[]) : []) {
        if (typeof item === "object" && item !== null) {
          const embedding = item as { embedding: unknown };
          embedding.embedding = base64Of(embedding.embedding);
        }
      }
      const { tokens, estimated } = await meteredUsage(embeddingUsage(response.usage), {
        input: () => countEmbeddingTokens(request.input, request.model),
      });
      response.usage = answeredEmbeddingUsage(tokens);
      return { response, tokens, usageEstimated: estimated };
    },
  };
}

/**
 * The connections of a provider whose idle ones are not reused once idle for `keepAliveMs` (4 s by default for a
 * cleartext upstream), as the session to send each call with; undefined for Bun's shared pool. Bun keeps an idle
 * connection for minutes (its session's own idle limit moves in 4 s steps, so is 8 s at best), while uvicorn (vLLM),
 * Node and gunicorn close theirs after 5 s or 2 s: a call sent as the upstream closes the connection it went on fails
 * with a reset, before any answer, although the upstream never read it. Such a call is not sent again, as nothing tells
 * it from one the upstream read before it died (same error, same moment), which may have run the model: a connection
 * is rather never reused as long as the upstream keeps it. Idle connections are closed before a call whenever the last
 * time was `keepAliveMs` ago or more: any left were parked since, so were idle for less. That closes every idle
 * connection, however briefly idle, once per bound under steady traffic too: 4 s rather than less keeps the new
 * connections that costs few, below the 5 s of uvicorn and Node (gunicorn's 2 s wants keep_alive_ms set).
 */
function idleBound(keepAliveMs: number | undefined, cleartext: boolean): (() => Bun.FetchSession) | undefined {
  const bound = keepAliveMs ?? (cleartext ? 4000 : undefined);
  if (bound === undefined) return undefined;
  const session = new Bun.FetchSession();
  let closed = Number.NEGATIVE_INFINITY;
  return () => {
    const now = performance.now();
    if (now - closed >= bound) {
      session.close();
      closed = now;
    }
    return session;
  };
}

/**
 * A vector as base64, for a client that asked for it: servers that ignore encoding_format (LM Studio, Ollama before it
 * read it) answer a request for base64, which OpenAI's .NET library always sends, with a list of floats its client
 * cannot read, and one that takes floats alone was asked again for them. Base64 is of little-endian float32s, as
 * OpenAI encodes them; anything else is left as it came. Vectors for a client that asked for floats are left as they
 * came, base64 or floats, for the answer's writer to print.
 */
function base64Of(embedding: unknown): unknown {
  if (Array.isArray(embedding) && embedding.every((v) => typeof v === "number")) {
    return Buffer.from(Float32Array.from(embedding).buffer).toString("base64");
  }
  return embedding;
}

/** The most of a whole answer the gateway reads by default: float vectors of 2048 inputs of 3072 dimensions fit. */
export const defaultMaxAnswerBytes = 128 * 1024 * 1024;

/** The most of a refusal's body read: its words are cut far shorter (upstreamErrorBody) before anyone sees them. */
const maxRefusalBytes = 64 * 1024;

/**
 * A body as text, read up to `max` bytes (decompressed). An answer past it (an upstream or a proxy gone wrong, sending
 * without end) fails the attempt as one whose body broke off, since a model was writing it, rather than grow the
 * gateway's memory until the process is killed; with `cut`, the text is cut at `max` instead.
 */
async function bodyText(response: Response, max: number, provider: string, cut = false): Promise<string> {
  const declared = Number(response.headers.get("content-length") ?? Number.NaN);
  // The common case: a length that fetch holds the body to, within the limit, and no encoding that could expand it.
  if (declared <= max && !response.headers.has("content-encoding")) return response.text();
  const reader = response.body?.getReader();
  if (!reader) return "";
  const parts: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const read = await reader.read();
    if (read.done) break;
    if (size + read.value.byteLength > max) {
      void reader.cancel().catch(() => {});
      if (cut) {
        parts.push(read.value.subarray(0, max - size));
        size = max;
        break;
      }
      const over = new UpstreamError("transient", `${provider}: an answer longer than ${max} bytes, not read`);
      throw Object.assign(over, { promptTaken: true });
    }
    parts.push(read.value);
    size += read.value.byteLength;
  }
  return Buffer.concat(parts, size).toString("utf8");
}

/** The content types of answers: whole ones in JSON, streamed ones as server-sent events. */
const json = /[/+]json\b/i;
const eventStream = /^text\/event-stream\b/i;

/**
 * The refusal names the gateway's own field `name` (stream_options, or its `own` member include_usage): as the error's
 * param, else as a word of the upstream's message (FastAPI's `"loc":["body","stream_options"]`, Azure's "Unrecognized
 * request argument supplied: stream_options") not run on into a longer name such as a client's `stream_options_x`.
 */
function refusesOwn(e: UpstreamError, name: string, own?: string): boolean {
  const param = e.error?.param;
  if (param) return param === name || (own !== undefined && param === `${name}.${own}`);
  const member = own === undefined ? "" : `(?!${own}\\b)`;
  return new RegExp(`(?<![\\w.])${name}(?!\\w|\\.${member}\\w)`).test(e.message);
}

/** Chunks of no choice (Azure's prompt filter results) held before a stream is taken to have begun. */
const maxHeldChunks = 16;

/** A stream's first chunks or events, read already, in front of the rest of it; stopping it stops the rest. */
function resumed<T>(held: T[], rest: AsyncIterator<T>): AsyncIterable<T> {
  const iterator: AsyncIterableIterator<T> = {
    next() {
      const value = held.shift();
      if (!value) return rest.next();
      return Promise.resolve({ done: false, value });
    },
    return() {
      held.length = 0;
      return rest.return?.() ?? Promise.resolve({ done: true, value: undefined });
    },
    [Symbol.asyncIterator]: () => iterator,
  };
  return iterator;
}

/** The first api-version in which an Azure resource endpoint serves the Responses API (`/openai/responses`). */
const azureResponsesVersion = "2025-03-01-preview";

/**
 * A client whose default headers are the configured ones alone: the SDK adds those of OPENAI_CUSTOM_HEADERS from the
 * environment to the ones it is given, and no option turns that off.
 */
function withHeaders<C extends OpenAI>(client: C, headers: Record<string, string> | undefined): C {
  (client as unknown as { _options: { defaultHeaders?: unknown } })._options.defaultHeaders = headers;
  return client;
}

/**
 * An upstream's chat stream as chunks, read as upstreamEvents reads every stream: an error event (a refusal when it
 * names the request's fault) or an event that is not a chunk fails the attempt, and a stream that ends before any
 * finish_reason, or with a choice unfinished, was cut; after [DONE], those choices end as stopped instead. Events after
 * [DONE] are ignored. Once every choice has finished, generation is over and only the usage the upstream bills is still
 * to come: a client leaving then is no cancellation, and the rest is read for up to `usageGraceMs` more; an upstream
 * then silent for the attempt timeout, or whose body then breaks off, has ended its stream.
 */
function relay(
  response: Response,
  provider: string,
  options: CallOptions,
  choices: number,
  redact: (text: string) => string,
  maxEventBytes: number,
): ChunkStream {
  // Choices seen unfinished and those that finished: every one of the `choices` asked for must finish.
  const open = new Set<unknown>();
  const done = new Set<unknown>();
  let sentinel = false;
  // The tool calls each choice has begun, by id, for deltas that name none by index (see indexToolCalls).
  const toolCalls = new Map<unknown, BegunCalls>();
  const events = upstreamEvents<unknown>(response, provider, options, redact, maxEventBytes, {
    item(event) {
      if (event.data === "[DONE]") {
        sentinel = true;
        return undefined;
      }
      const data = eventData(event, provider);
      const fields = typeof data === "object" && data !== null ? (data as Record<string, unknown>) : undefined;
      // Some servers send a streamed error without the {"error": ...} wrapper, as they do their refusals (vLLM's
      // {"object":"error","message"}): the event is then the error itself.
      const unwrapped =
        fields && (fields.object === "error" || (fields.message !== undefined && fields.choices === undefined));
      const error = fields?.error ?? (event.event === "error" || unwrapped ? data : undefined);
      if (error || event.event === "error") throw errorAfter200(provider, error, redact, "in its stream");
      // Anthropic's OpenAI-compatible endpoint keeps its stream alive with events of their own, as its own API does:
      // no chunk, nor its fields those of the next.
      if (fields?.type === "ping" && fields.choices === undefined) return undefined;
      return data;
    },
    done: () => sentinel,
    over: () => open.size === 0 && done.size >= choices,
  });
  async function* chunks(): ChunkStream {
    let last: ChatCompletionChunk | undefined;
    for await (const data of events) {
      const chunk = checkedChunk(data, provider);
      for (const choice of chunk.choices) {
        // A choice's first delta says whose it is: the SDKs' stream helpers take a choice of no role for no message
        // ("missing role for choice 0"), as older llama.cpp servers and MiniMax's (an empty one) stream them.
        if (!choice.delta.role && !open.has(choice.index) && !done.has(choice.index)) choice.delta.role = "assistant";
        indexToolCalls(choice.delta, choice.index, toolCalls);
        if (choice.finish_reason) {
          open.delete(choice.index);
          done.add(choice.index);
        } else if (!done.has(choice.index)) open.add(choice.index);
      }
      last = chunk;
      yield chunk;
    }
    // [DONE] says the answer is whole: a choice its chunks never finished (some Gemini proxies send no finish_reason at
    // all) stopped there, which the SDKs' stream helpers need every choice to say; one that called tools stopped to
    // have them run, as OpenAI says (agent loops go by it).
    if (sentinel && open.size > 0 && last) {
      const { id, created, model } = last;
      const stopped = [...open].map((index) => {
        const reason = toolCalls.has(index) ? "tool_calls" : "stop";
        return { index, delta: {}, finish_reason: reason, logprobs: null };
      });
      for (const index of open) done.add(index);
      open.clear();
      yield { id, object: "chat.completion.chunk", created, model, choices: stopped } as ChatCompletionChunk;
    }
    // Without [DONE], a stream that ends between choices may have lost the rest: all of them must have finished. (With
    // it the upstream says it is done: a server that ignores n answers fewer.)
    if (open.size > 0 || done.size === 0 || (!sentinel && done.size < choices)) {
      const cut = new UpstreamError("transient", `${provider}: the stream ended before it finished`);
      // A whole body of no chunk at all is no answer cut short: nothing says a model ran.
      throw Object.assign(cut, { promptTaken: open.size > 0 || done.size > 0 });
    }
  }
  return chunks();
}

/**
 * The tool calls a choice has begun: by id, the index each index the upstream numbered a delta with was given last,
 * the next index, the last one a delta named.
 */
interface BegunCalls {
  ids: Map<unknown, number>;
  given: Map<number, number>;
  next: number;
  last?: number;
}

/**
 * Gives the tool calls of a choice's delta the index OpenAI's carry (and a call's first delta its type, see
 * typeFunctionCall), where the upstream left it out or numbered a new call as one begun before: Gemini's
 * OpenAI-compatible endpoint streams each call whole without one, which the SDKs' stream helpers refuse ("invalid tool
 * call index: undefined"), and other compatible servers number every parallel call 0, which the helpers take for one
 * call, the last one's name over arguments run together. A call of an id not seen
 * before in the choice keeps the upstream's index unless a call was given that already, and is then the next; a piece
 * of no id continues the call last given its upstream's index, or, of no index, the last call.
 */
function indexToolCalls(delta: { tool_calls?: unknown }, choice: unknown, begun: Map<unknown, BegunCalls>): void {
  if (!Array.isArray(delta.tool_calls)) return;
  for (const call of delta.tool_calls as Array<ToolCallDelta>) {
    if (typeof call !== "object" || call === null) continue;
    typeFunctionCall(call);
    let calls = begun.get(choice);
    if (!calls) begun.set(choice, (calls = { ids: new Map(), given: new Map(), next: 0 }));
    const known = call.id ? calls.ids.get(call.id) : undefined;
    if (typeof call.index !== "number") call.index = (call.id ? known : calls.last) ?? calls.next;
    else {
      const numbered = call.index;
      // A new id without a name is not taken for a new call: some servers change a call's id after its first delta.
      const moved = call.id && namesCall(call) && calls.given.has(numbered);
      const given = known ?? (moved ? calls.next : (calls.given.get(numbered) ?? numbered));
      calls.given.set(numbered, given);
      call.index = given;
    }
    const index = call.index as number;
    if (call.id) calls.ids.set(call.id, index);
    calls.last = index;
    calls.next = Math.max(calls.next, index + 1);
  }
}

/** A tool call's piece of a streamed delta, as far as its index needs it. */
interface ToolCallDelta {
  index?: unknown;
  id?: unknown;
  type?: unknown;
  function?: { name?: unknown } | null;
  custom?: { name?: unknown } | null;
}

/**
 * Types a tool call (or a streamed call's first piece) that names a function but has no `type`, as Mistral's API sends
 * them, whole or streamed: OpenAI's say `"function"`, which the SDKs' helpers need (a call of none fails the stream's
 * `finalChatCompletion()`, "tool call snapshot missing `type`") and the RPCs answer function calls by.
 */
function typeFunctionCall(call: unknown): void {
  if (typeof call !== "object" || call === null) return;
  const named = call as ToolCallDelta;
  const name = named.function?.name;
  if (named.type == null && typeof name === "string" && name !== "") named.type = "function";
}

/** Whether a tool call's delta names the function or custom tool it calls, as the first of each call does. */
const namesCall = (call: ToolCallDelta) =>
  (typeof call.function?.name === "string" && call.function.name !== "") ||
  (typeof call.custom?.name === "string" && call.custom.name !== "");

/** How long a stream whose choices have all finished is still read for its usage after its client left. */
export const usageGraceMs = 3_000;

/** How much of a read of a stream is parsed into events at once. */
const parsedSliceBytes = 16 * 1024;

/** What the relay uses of a body's reader. */
interface BodyReader {
  read(): Promise<{ done: true; value?: undefined } | { done: false; value: Uint8Array }>;
  cancel(): Promise<void>;
}

/** What a stream's events are to its relay (see upstreamEvents). */
interface EventRules<T> {
  /** What an event passes on, undefined for nothing; it throws the attempt's failure that an event says. */
  item(event: EventSourceMessage): T | undefined;
  /** Whether the upstream has said its stream is done ([DONE], a terminal event): the rest is not read. */
  done(): boolean;
  /** Whether generation is over before the stream is done (chat's choices all finished): only usage is to come. */
  over?(): boolean;
}

/**
 * An upstream's server-sent events as the items `rules` makes of them, under the gateway's rules for every stream:
 * silence longer than the attempt timeout is a timeout, the client leaving is a cancellation, an event `rules` fails
 * on, unreadable JSON, an event longer than `maxEventBytes` or a body that breaks off fails the attempt. Events after
 * the stream is done are ignored, and what is left of its body is drained in the background; a stream left early
 * closes its upstream connection. Once generation is over (`rules.over`), a client leaving is no cancellation and the
 * rest is read for up to `usageGraceMs` more, and an upstream then silent for the attempt timeout, or whose body then
 * breaks off, has ended its stream.
 */
function upstreamEvents<T>(
  response: Response,
  provider: string,
  options: CallOptions,
  redact: (text: string) => string,
  maxEventBytes: number,
  rules: EventRules<T>,
): AsyncIterable<T> {
  const body = response.body;
  if (!body) throw new UpstreamError("transient", `${provider}: the stream has no body`);
  const reader: BodyReader = body.getReader();
  const leave = () => void reader.cancel().catch(() => {});
  const over = () => rules.over?.() ?? false;
  let grace: ReturnType<typeof setTimeout> | undefined;
  const left = () => {
    if (!over()) leave();
    else grace ??= setTimeout(leave, usageGraceMs);
  };
  const { timeoutMs, signal } = options;
  // Listened to from now rather than from the first read: a client gone before it still closes the upstream.
  signal?.addEventListener("abort", left, { once: true });
  if (signal?.aborted) left();

  async function* events(): AsyncGenerator<T> {
    const decoder = new TextDecoder();
    const items: T[] = [];
    let failure: UpstreamError | undefined;
    const take = (event: EventSourceMessage) => {
      if (rules.done() || failure) return;
      try {
        const item = rules.item(event);
        if (item !== undefined) items.push(item);
      } catch (e) {
        failure = e as UpstreamError;
      }
    };
    // Bytes received since an event last ended: one that never ends is bounded as a whole answer is.
    let unended = 0;
    const parser = createParser({
      onEvent(event) {
        unended = 0;
        take(event);
      },
    });
    let ended = false;
    // The last characters received: a `data: [DONE]` line at their end is that event even before its blank line.
    let tail = "\n\n";
    const silence = watchSilence(timeoutMs, leave);
    try {
      while (!rules.done() && !failure) {
        let read: Awaited<ReturnType<typeof reader.read>>;
        try {
          read = await reader.read();
        } catch (e) {
          // Cut off by the timeout or the client, or broken once generation was over (only usage was still to come):
          // said below, as when the read ends instead.
          if (silence.expired || signal?.aborted || over()) break;
          throw Object.assign(upstreamError(provider, e, redact), { promptTaken: true });
        }
        // Cut off by the timeout or the client: what arrived of an event is not one.
        if (silence.expired || (signal?.aborted && !over())) break;
        // A last event without its blank line still counts once the body ends.
        if (read.done) ended = true;
        const bytes = read.value ?? new Uint8Array(0);
        // A read after the client was slow holds all that arrived meanwhile (half a MiB from Bun's fetch): parsed a
        // slice at a time, only a slice's events wait as objects for a client that takes none of them.
        for (let at = 0; at < bytes.byteLength || (read.done && at === 0); at += parsedSliceBytes) {
          if (rules.done() || failure || silence.expired || (signal?.aborted && !over())) break;
          // Every slice but the first waits for the event loop's next turn: the events of one read go out without
          // another wait, so without it other requests, and every timer, would wait behind all of them.
          if (at > 0) await new Promise((resolve) => setImmediate(resolve));
          const slice = bytes.subarray(at, at + parsedSliceBytes);
          const last = at + parsedSliceBytes >= bytes.byteLength;
          const text = read.done && last ? `${decoder.decode(slice)}\n\n` : decoder.decode(slice, { stream: true });
          unended += slice.byteLength;
          parser.feed(text);
          if (unended > maxEventBytes && !failure) {
            const said = `${provider}: an event longer than ${maxEventBytes} bytes, not read`;
            failure = Object.assign(new UpstreamError("transient", said), { promptTaken: true });
          }
          tail = (text.length >= 32 ? text : tail + text).slice(-32);
          // Some upstreams send [DONE] without its blank line and hold the connection open: it never dispatches.
          if (tail.includes("[DONE]") && /\n\ndata: ?\[DONE\]\n$/.test(tail.replace(/\r\n?/g, "\n"))) take(doneEvent);
          for (const item of items.splice(0)) {
            // Silence is the upstream's between events: not keep-alive comments, nor the time the client takes.
            silence.pause();
            yield item;
            silence.heard();
          }
        }
        if (ended || silence.expired || (signal?.aborted && !over())) break;
      }
    } finally {
      silence.stop();
      clearTimeout(grace);
      signal?.removeEventListener("abort", left);
      // A body read to its end has given its connection back to the pool already.
      if (!ended && rules.done() && !failure) {
        // Done, but the body has not ended yet: let it end in the background (keeping the connection for the next
        // call) rather than make the client wait for it, and give up on it after a second.
        void drainBody(reader, Math.min(timeoutMs, 1000));
      } else if (!ended) {
        // Left early (the client went away, or a failure): the rest of the upstream's answer is not wanted.
        leave();
      }
    }
    if (failure) throw failure;
    // Once generation is over, an upstream silent for as long has given its answer: only its usage did not come.
    if (silence.expired && !over()) throw new UpstreamError("timeout", `${provider}: no event for ${timeoutMs} ms`);
    if (signal?.aborted && !over()) throw new UpstreamError("cancelled", `${provider}: request aborted`);
  }
  return events();
}

/** The [DONE] an upstream sent without the blank line that ends an event. */
const doneEvent: EventSourceMessage = { data: "[DONE]" };

/** An event's data as JSON: unreadable, it fails the attempt. */
function eventData(event: EventSourceMessage, provider: string): unknown {
  try {
    return JSON.parse(event.data);
  } catch {
    throw new UpstreamError("transient", `${provider}: unreadable response (malformed server-sent event JSON)`);
  }
}

/** Events a streamed response opens with, before the model has produced anything: held, as Azure's first chunk is. */
const preliminaryEvents = new Set(["response.created", "response.in_progress", "response.queued"]);

/**
 * A `response.failed` event as an attempt's failure: a refusal when its error names the request's fault, a 429 when it
 * names a rate limit, the upstream's failure otherwise.
 */
function failedResponse(provider: string, event: ResponseEvent, redact: (text: string) => string): UpstreamError {
  const error = (event.response as { error?: unknown } | undefined)?.error;
  const message = (error as { message?: unknown } | null)?.message;
  const words = redact(typeof message === "string" ? message : JSON.stringify(error ?? null));
  const said = `${provider}: the response failed: ${words}`;
  // A rate limit (rate_limit_exceeded, a code of a response's error) is a 429's, as in an error event.
  const status = refusedStatus(error) ?? (rateLimited(error) ? 429 : undefined);
  if (status === undefined) return new UpstreamError("transient", said);
  const body = upstreamErrorBody(error, redact);
  return new UpstreamError(failureOfStatus(status, body), said, status, undefined, body);
}

/**
 * An upstream's streamed response as events, read as upstreamEvents reads every stream: an `error` event (a refusal
 * when it names the request's fault) or an event that is not a response event fails the stream, and one that ends
 * before a terminal event (`response.completed`, `.incomplete`, `.failed`, which is passed on, its error's words
 * redacted) was cut.
 */
function relayResponse(
  response: Response,
  provider: string,
  options: CallOptions,
  redact: (text: string) => string,
  maxEventBytes: number,
): ResponseEventStream {
  let terminal = false;
  // Past the events a response opens with: output has begun.
  let begun = false;
  // A response.failed that says nothing of why, before any output, held for the error event that may follow it.
  let unexplained: ResponseEvent | undefined;
  const events = upstreamEvents<ResponseEvent>(response, provider, options, redact, maxEventBytes, {
    item(event) {
      if (event.data === "[DONE]") return undefined;
      const data = eventData(event, provider);
      const fields = typeof data === "object" && data !== null ? (data as Record<string, unknown>) : {};
      const error =
        fields.type === "error" ? eventError(fields) : (fields.error ?? (event.event === "error" ? data : undefined));
      if (error || event.event === "error") throw errorAfter200(provider, error, redact, "in its stream");
      // The type names the client's event on a line of its own: a line break in it would end that line and write
      // events the gateway never read (nor metered, nor gave its ids).
      if (typeof fields.type !== "string" || /[\r\n]/.test(fields.type)) {
        throw new UpstreamError("transient", `${provider}: a stream event is not a response event`);
      }
      if (unexplained) {
        // Not the error it was waiting for: the failure stands as it came, and ends the stream.
        terminal = true;
        return unexplained;
      }
      // Azure ends a stream its content filter stopped with a response.failed of no error, then an error event naming
      // the filter: that event, read next, says whether the request (its prompt) or the upstream was at fault.
      const failedError = (fields.response as { error?: unknown } | undefined)?.error;
      if (fields.type === "response.failed" && !begun && !upstreamErrorBody(failedError) && !refusedStatus(failedError)) {
        unexplained = fields as ResponseEvent;
        return undefined;
      }
      if (!preliminaryEvents.has(fields.type)) begun = true;
      if (terminalResponseEvents.has(fields.type)) terminal = true;
      if (fields.type === "response.failed") {
        // Passed on to the client: its error in the upstream's words, redacted as refusals are.
        const failed = fields.response as { error?: unknown } | undefined;
        if (failed && typeof failed.error === "object" && failed.error !== null) {
          const body = upstreamErrorBody(failed.error, redact);
          failed.error = body ? { code: body.code, message: body.message } : null;
        }
      }
      return fields as ResponseEvent;
    },
    done: () => terminal,
  });
  async function* checked(): ResponseEventStream {
    yield* events;
    if (unexplained && !terminal) {
      terminal = true;
      yield unexplained;
    }
    if (!terminal) {
      const cut = new UpstreamError("transient", `${provider}: the stream ended before it finished`);
      throw Object.assign(cut, { promptTaken: true });
    }
  }
  return checked();
}

/**
 * The error of a Responses API `error` event. OpenAI sends it nested (`{"type": "error", "error": {"type":
 * "invalid_request_error", "code": ...}}`), its reference shows it at the top (`{"type": "error", "code", "message",
 * "param"}`), where `type` is the event's, not the error's.
 */
function eventError(event: Record<string, unknown>): unknown {
  if (typeof event.error === "object" && event.error !== null) return event.error;
  const { type: _, sequence_number: __, ...error } = event;
  return error;
}

/** Codes of OpenAI's errors that name the request's fault whatever status they come with. */
const requestFaults = new Set([
  "context_length_exceeded",
  "string_above_max_length",
  "invalid_value",
  "invalid_type",
  "missing_required_parameter",
  "unsupported_parameter",
  "unsupported_value",
  "invalid_prompt",
  // Azure's content filter, and the code its streamed responses name it by.
  "content_filter",
  "content_policy_violation",
]);

/**
 * The HTTP status of a streamed error that names the request's fault: its own numeric code or status from 400 to 422
 * (but 408 and 429, which are the upstream's), else 400 for an invalid request's type (OpenAI's invalid_request_error,
 * vLLM's BadRequestError) or code (context_length_exceeded). Undefined for any other error: the upstream's failure.
 */
function refusedStatus(error: unknown): number | undefined {
  if (typeof error !== "object" || error === null) return undefined;
  const { code, status, type } = error as Record<string, unknown>;
  for (const value of [code, status]) {
    const number = typeof value === "string" && /^\d{3}$/.test(value) ? Number(value) : value;
    if (typeof number !== "number" || number < 400 || number > 599) continue;
    return number <= 422 && number !== 408 ? number : undefined;
  }
  if (typeof type === "string" && (type === "invalid_request_error" || /badrequest/i.test(type))) return 400;
  return typeof code === "string" && requestFaults.has(code) ? 400 : undefined;
}

/** Codes and types of OpenAI's errors of a 429: a rate limit, or an account out of quota. */
const rateLimits = new Set(["rate_limit_exceeded", "rate_limit_error", "insufficient_quota"]);

/**
 * Whether a streamed error says what a 429 says (429 as its code or status, or OpenAI's code or type of one), as
 * OpenRouter and other proxies send an upstream's rate limit once they have answered 200: a limit to wait out or fall
 * back from, which must not count as the target failing.
 */
function rateLimited(error: unknown): boolean {
  if (typeof error !== "object" || error === null) return false;
  const { code, status, type } = error as Record<string, unknown>;
  return [code, status, type].some((value) => value === 429 || value === "429" || rateLimits.has(value as string));
}

/**
 * An error an upstream sent after its 200, in a stream's event or as a whole answer: one that names the request's fault
 * (vLLM's context length as its first event) is a refusal, and one that names a rate limit (a proxy's that answered
 * 200 before its upstream did) a 429, as the same error with that HTTP status would be; anything else is the upstream's.
 */
function errorAfter200(provider: string, error: unknown, redact: (text: string) => string, where: string): UpstreamError {
  const message = (error as { message?: unknown } | null)?.message;
  const words = redact(typeof message === "string" ? message : JSON.stringify(error));
  const status = refusedStatus(error) ?? (rateLimited(error) ? 429 : undefined);
  if (status === undefined) return new UpstreamError("transient", `${provider}: ${words}`);
  const body = upstreamErrorBody(error, redact);
  return new UpstreamError(failureOfStatus(status, body), `${provider} answered ${status} ${where}: ${words}`, status, undefined, body);
}

/** A parsed event as a chunk the rest of the gateway can rely on, or a transient failure of the attempt. */
function checkedChunk(data: unknown, provider: string): ChatCompletionChunk {
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new UpstreamError("transient", `${provider}: a stream event is not a chunk object`);
  }
  const chunk = data as ChatCompletionChunk;
  // Azure's first chunk (its prompt filter results) has an empty object, and compatible servers and proxies have sent
  // chunks as "chat.completion" or "text_completion": an object that names anything else is not a chunk.
  const object: unknown = chunk.object;
  if (typeof object === "string" && object !== "" && !/^(chat\.completion|text_completion)/.test(object)) {
    throw new UpstreamError("transient", `${provider}: a stream event is not a chunk object (${clipped(object, 40)})`);
  }
  // Some compatible servers leave choices out of the usage chunk.
  chunk.choices ??= [];
  if (!Array.isArray(chunk.choices))
    throw new UpstreamError("transient", `${provider}: a chunk's choices are not a list`);
  for (const choice of chunk.choices) {
    if (typeof choice !== "object" || choice === null)
      throw new UpstreamError("transient", `${provider}: a malformed choice`);
    // As the SDK's stream does: a choice always has finish_reason, null until it finishes.
    choice.finish_reason = openAIFinishReason(choice.finish_reason) ?? null;
    // And a delta, which Azure's asynchronous filter leaves out of a choice it annotates with content_filter_results.
    choice.delta ??= {};
  }
  return chunk;
}

/**
 * A whole chat completion, answered to a streamed request, as the chunks that would have streamed it: one with each
 * choice's message as its delta (its tool calls numbered) and its finish reason, then one of the usage, if the answer
 * has it, as `stream_options.include_usage` has it come; undefined when the answer is no completion.
 */
function completionChunks(answer: unknown, provider: string): ChunkStream | undefined {
  if (typeof answer !== "object" || answer === null) return undefined;
  const fields = answer as Record<string, unknown>;
  const { id, created, model, choices, usage, system_fingerprint, service_tier } = fields;
  if (fields.object !== undefined && fields.object !== "chat.completion") return undefined;
  if (!Array.isArray(choices) || choices.length === 0) return undefined;
  const streamed: ChatCompletionChunk.Choice[] = [];
  for (const [at, choice] of choices.entries()) {
    const { index, message, finish_reason, logprobs } = (choice ?? {}) as Record<string, unknown>;
    if (typeof message !== "object" || message === null) return undefined;
    const { tool_calls, ...said } = message as Record<string, unknown>;
    const calls = Array.isArray(tool_calls) ? tool_calls : [];
    calls.forEach(typeFunctionCall);
    const delta = calls.length === 0 ? said : { ...said, tool_calls: calls.map((call, n) => ({ index: n, ...call })) };
    // A finish reason left out is said as a stream's [DONE] says it (see relay).
    const finished = finish_reason ?? (calls.length > 0 ? "tool_calls" : "stop");
    const numbered = typeof index === "number" ? index : at;
    const streamedChoice = { index: numbered, delta, finish_reason: finished, logprobs };
    streamed.push(streamedChoice as unknown as ChatCompletionChunk.Choice);
  }
  const object = "chat.completion.chunk";
  const chunk = (fields: Partial<ChatCompletionChunk>) =>
    checkedChunk({ id, object, created, model, system_fingerprint, service_tier, ...fields }, provider);
  const chunks = [chunk({ choices: streamed })];
  if (typeof usage === "object" && usage !== null) {
    chunks.push(chunk({ choices: [], usage: usage as ChatCompletionChunk["usage"] }));
  }
  return (async function* () {
    yield* chunks;
  })();
}

/** Whether an answer is a whole Responses API response, done (completed, incomplete or failed). */
function wholeResponse(answer: unknown): answer is ResponseObject {
  if (typeof answer !== "object" || answer === null) return false;
  const { object, output, status } = answer as Record<string, unknown>;
  return (
    (object === undefined || object === "response") &&
    Array.isArray(output) &&
    (status === "completed" || status === "incomplete" || status === "failed")
  );
}

/**
 * Compatible servers' own finish reasons in OpenAI's words: Together's `eos`, TGI's and watsonx's `eos_token`, TGI's
 * `stop_sequence` (a stop the client gave ended it) and Mistral's `model_length` fail clients that read OpenAI's values
 * only (the .NET SDK throws on `eos`), and the "" Ollama and SGLang have sent on chunks of a choice not yet finished is
 * null. Any other value is left as it came.
 */
const finishReasons = new Map<unknown, ChatCompletionChunk.Choice["finish_reason"]>([
  ["", null],
  ["eos", "stop"],
  ["eos_token", "stop"],
  ["stop_sequence", "stop"],
  ["model_length", "length"],
]);

function openAIFinishReason<T>(reason: T): T {
  return (finishReasons.has(reason) ? finishReasons.get(reason) : reason) as T;
}

/** Reads what is left of a body after [DONE], cancelling it if it has not ended within `limitMs`. */
async function drainBody(reader: BodyReader, limitMs: number): Promise<void> {
  const timer = setTimeout(() => void reader.cancel().catch(() => {}), limitMs);
  try {
    while (!(await reader.read()).done);
  } catch {
    // Cancelled or broken: either way nothing more is wanted from it.
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A refused call as the SDK reports it: its APIError subclass for the status, with the upstream's message. As the
 * SDK's makeStatusError does, a JSON body without an `error` member (vLLM's `{"object":"error","message"}`, a 422's
 * `{"detail"}`) is the error itself; a plain text body that is not markup (a proxy's page) is its message.
 */
async function refusal(response: Response): Promise<APIError> {
  const text = await bodyText(response, maxRefusalBytes, "", true).catch(
    (e: unknown) => (e as Error).message ?? String(e),
  );
  return refusalOf(response, text);
}

/** A refused call's APIError (see refusal), of its body's text. */
function refusalOf(response: Response, text: string): APIError {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  const plain =
    body === undefined && /^text\/plain\b/i.test(response.headers.get("content-type") ?? "") && !/^\s*</.test(text);
  const error = plain
    ? { error: text }
    : body && typeof body === "object" && (body as { error?: unknown }).error == null
      ? { error: body }
      : body;
  return APIError.generate(response.status, error as object | undefined, body ? undefined : text, response.headers);
}

/**
 * An upstream's redirect as the operator's to fix: the base_url is not where the upstream serves (http for https, a
 * missing path), named with where it points, without its query.
 */
function redirected(provider: string, url: string, response: Response, redact: (text: string) => string) {
  void response.body?.cancel().catch(() => {});
  const location = response.headers.get("location");
  let where = "nowhere it names";
  if (location) {
    try {
      const target = new URL(location, url);
      where = `${target.origin}${target.pathname}`;
    } catch {
      where = "an unreadable location";
    }
  }
  const said = `${provider} answered ${response.status}, a redirect to ${redact(where)}, which is not followed`;
  return new UpstreamError("misconfigured", `${said}: base_url must be the upstream's own address`, response.status);
}

/** A failed call as an UpstreamError, the upstream's words (in the message and its error) passed through `redact`. */
function upstreamError(provider: string, e: unknown, redact: (text: string) => string): UpstreamError {
  if (e instanceof UpstreamError) return e;
  if (e instanceof APIError && e.status !== undefined) {
    const error = upstreamErrorBody(e.error, redact);
    return new UpstreamError(
      failureOfStatus(e.status, error),
      `${provider} answered ${e.status}: ${redact(e.message)}`,
      e.status,
      retryAfterMs(e.headers),
      error,
    );
  }
  if (e instanceof SyntaxError)
    return new UpstreamError("transient", `${provider}: unreadable response (${redact(e.message)})`);
  return new UpstreamError("transient", `${provider}: ${redact((e as Error).message ?? String(e))}`);
}
