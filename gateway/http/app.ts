import { context, propagation, type Span, SpanKind, SpanStatusCode, type TextMapGetter, type Tracer } from "@opentelemetry/api";
import { ulid } from "ulid";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { bearerToken } from "../../lib/auth.ts";
import { jsonShape } from "../../lib/message-limits.ts";
import { inContext } from "../../lib/streams.ts";
import type { ChatStream } from "../chat-stream.ts";
import type { ResponseStream } from "../responses-stream.ts";
import type { ModelRoute } from "../config.ts";
import type { Call, GatewayCore } from "../core.ts";
import { base64Floats, type CreateEmbeddingResponse, type StoredResponseRequest } from "../providers/provider.ts";
import type { BodyHold } from "../body-budget.ts";
import {
  bodiesAtCapacity,
  bodyTooLarge,
  cancelled,
  errorBody,
  GatewayError,
  invalidRequest,
  methodNotAllowed,
  toGatewayError,
  unknownUrl,
  unsupportedContentEncoding,
} from "../errors.ts";
import { maxRequestNodes } from "../request-checks.ts";

/**
 * What browsers may read of the gateway's answers, on both ports: what OpenAI's clients read (the request id, the cost,
 * errors, retry hints, retry-after-ms before Retry-After, and the key's rate limits).
 */
export const exposedHeaders = [
  "x-request-id",
  "x-gateway-cost-nanos",
  "x-error-code",
  "x-error-type",
  "x-error-param",
  "retry-after",
  "retry-after-ms",
  "x-should-retry",
  ...["limit", "remaining", "reset"].flatMap((what) => [`x-ratelimit-${what}-requests`, `x-ratelimit-${what}-tokens`]),
];

export interface RestAppOptions {
  core: GatewayCore;
  tracer: Tracer;
  /** Largest request body accepted (413 beyond). */
  maxBodyBytes: number;
}

/** What the app needs of a request; adapters build it from node:http or a Fetch Request. */
export interface RestRequest {
  readonly method: string;
  /** Path without the query string. */
  readonly path: string;
  /** The query string, without its `?`; none when the URL has none. */
  readonly query?: string;
  /** The request's headers; only `get` is used. */
  readonly headers: Pick<Headers, "get">;
  /** The body as text, read up to `limit` bytes; fails with a 413 GatewayError past it. */
  text(limit: number): Promise<string>;
  /** Aborted when the client goes away. */
  readonly signal: AbortSignal;
}

export interface RestResponse {
  status: number;
  headers: Record<string, string>;
  /** A whole body, or server-sent events to write as they come (stop iterating when the client leaves). */
  body: string | AsyncIterable<string>;
  /** Aborted when the events are over while one is still being written: end the response at once. */
  cutOff?: AbortSignal;
}

/** The OpenAI-compatible REST API. No sockets here, so tests call it in memory. */
export interface RestApp {
  handle(request: RestRequest): Promise<RestResponse>;
  /** The same app as a Fetch handler. */
  fetch(request: Request, hooks?: FetchHooks): Promise<Response>;
}

/** Told when a Fetch request's body has been read, and when its answer is all handed over (a stream's last event). */
export interface FetchHooks {
  bodyRead?(): void;
  answered?(): void;
  /**
   * Told when a stream's write waits for the client to take what it was sent, and when it went out: a client reading
   * nothing is held only so long. `closing` when the stream is over already: the connection should close at once.
   */
  writeWaits?(closing: boolean): void;
  writeDone?(): void;
  /** Counts the body's bytes against the bound on bodies in flight; the server gives them back once it is answered. */
  body?: BodyHold;
}

const serverSpan = { kind: SpanKind.SERVER };
const modelsPrefix = "/v1/models/";
const responsesPrefix = "/v1/responses/";
const json = "application/json";
const traceHeaders: TextMapGetter<Pick<Headers, "get">> = {
  keys: () => [],
  get: (headers, key) => headers.get(key) ?? undefined,
};

export function createRestApp(options: RestAppOptions): RestApp {
  const { core, tracer, maxBodyBytes } = options;
  const created = Math.floor(Date.now() / 1000);
  const renderModel = (route: ModelRoute) => ({
    id: route.name,
    object: "model",
    created,
    owned_by: route.targets[0]?.provider ?? "",
  });
  const modelList = (routes: readonly ModelRoute[]) => JSON.stringify({ object: "list", data: routes.map(renderModel) });
  // Unrestricted keys (most) all see the same list: rendered once per config (a reload makes a new list).
  let allModels = { routes: core.routes, json: modelList(core.routes) };

  // Named and described as OpenTelemetry's HTTP conventions have it: the route a request matched, `{model}` for a name.
  // Described once it is known to be recorded (no sampler of the gateway's reads them): a span nobody records (no
  // exporter, or not sampled) would have its attributes copied and checked for nothing, on every request.
  const traced = (route: string, request: RestRequest, handler: (span: Span) => Promise<RestResponse>) =>
    tracer.startActiveSpan(
      `${request.method} ${route}`,
      serverSpan,
      propagation.extract(context.active(), request.headers, traceHeaders),
      async (span) => {
        if (span.isRecording()) {
          span.setAttributes({
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
            // The gateway serves plain HTTP; TLS ends before it.
            "url.scheme": "http",
          });
        }
        let response: RestResponse | undefined;
        try {
          response = await handler(span);
          span.setAttribute("http.response.status_code", response.status);
          if (response.status >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
          return response;
        } finally {
          // A stream's span ends with the stream.
          if (typeof response?.body !== "object") span.end();
        }
      },
    );

  const begin = (endpoint: Endpoint, request: RestRequest) =>
    core.begin(endpoint, bearerToken(request.headers), request.signal);

  const ok = (call: Call, body: string, costNanos?: bigint): RestResponse => {
    const headers: Record<string, string> = { "content-type": json, "x-request-id": call.requestId };
    if (costNanos !== undefined) headers["x-gateway-cost-nanos"] = costNanos.toString();
    if (call.limitHeaders) Object.assign(headers, call.limitHeaders);
    return { status: 200, headers, body };
  };
  const failed = (call: Call, e: unknown) => {
    // A failure can cost too (the prompts upstreams were sent by attempts that timed out): it says so, as an answer does.
    const cost = call.metrics.costNanos;
    const headers = cost > 0n ? { ...call.limitHeaders, "x-gateway-cost-nanos": cost.toString() } : call.limitHeaders;
    return errorResponse(toGatewayError(e), call.requestId, headers);
  };

  /**
   * Checks the key before the body is read: a caller without one costs no more. When billing cannot check it, the
   * body is read after all for the model it names, so the refusal is counted under that model.
   */
  const authorize = async (call: Call, request: RestRequest) => {
    try {
      await core.authorize(call);
    } catch (e) {
      if (e instanceof GatewayError && e.outcome === RequestStatus.UNAVAILABLE) {
        const body = await bodyText(request, maxBodyBytes).then(parseJson, () => undefined).catch(() => undefined);
        core.namedModel(call, body);
      }
      throw e;
    }
  };

  const chatCompletions = async (request: RestRequest, span: Span): Promise<RestResponse> => {
    const call = begin(Endpoint.CHAT_COMPLETIONS, request);
    try {
      const result = await core.handle(call, async () => {
        await authorize(call, request);
        const body = parseJson(await bodyText(request, maxBodyBytes));
        return isStreamRequest(body) ? core.chatStream(call, body) : core.chat(call, body);
      });
      if (!(Symbol.asyncIterator in result)) return ok(call, JSON.stringify(result.completion), result.costNanos);
      const headers = {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        "x-request-id": call.requestId,
        ...call.limitHeaders,
      };
      // The events are made as the client reads them, after this returns: in the request's span all the same.
      const body = inContext(serverSentEvents(result, span), context.active());
      return { status: 200, headers, body, cutOff: result.cutOff };
    } catch (e) {
      return failed(call, e);
    }
  };

  const responses = async (request: RestRequest, span: Span): Promise<RestResponse> => {
    const call = begin(Endpoint.RESPONSES, request);
    try {
      const result = await core.handle(call, async () => {
        await authorize(call, request);
        const body = parseJson(await bodyText(request, maxBodyBytes));
        return isStreamRequest(body) ? core.responsesStream(call, body) : core.responses(call, body);
      });
      if (!(Symbol.asyncIterator in result)) return ok(call, JSON.stringify(result.response), result.costNanos);
      const headers = {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        "x-request-id": call.requestId,
        ...call.limitHeaders,
      };
      const body = inContext(responseEvents(result, span), context.active());
      return { status: 200, headers, body, cutOff: result.cutOff };
    } catch (e) {
      return failed(call, e);
    }
  };

  const embeddings = async (request: RestRequest, span: Span): Promise<RestResponse> => {
    const call = begin(Endpoint.EMBEDDINGS, request);
    try {
      const outcome = await core.handle(call, async () => {
        await authorize(call, request);
        return core.embed(call, parseJson(await bodyText(request, maxBodyBytes)));
      });
      // Written a piece at a time: 2048 vectors of 3072 dimensions are 130 MB of JSON floats printed in full, which as
      // one string (and its bytes) took a replica past 500 MB. An answer of one piece goes whole, with its length.
      const pieces = embeddingJson(outcome.response, outcome.encodingFormat === "float");
      const first = pieces.next();
      const second = pieces.next();
      if (second.done) return ok(call, first.done ? "" : first.value, outcome.costNanos);
      const response = ok(call, "", outcome.costNanos);
      return { ...response, body: piecesOf([first.value as string, second.value], pieces, span) };
    } catch (e) {
      return failed(call, e);
    }
  };

  /** GET or DELETE /v1/responses/{response_id}, GET its input_items: passed on to the upstream that holds it. */
  const storedResponse = async (
    request: RestRequest,
    action: StoredResponseRequest["action"],
    id: string,
  ): Promise<RestResponse> => {
    const call = begin(Endpoint.RESPONSES, request);
    try {
      const answer = await core.handle(call, async () => {
        await core.authorize(call);
        return core.storedResponse(call, action, id, storedResponseQuery(action, request.query));
      });
      return ok(call, JSON.stringify(answer));
    } catch (e) {
      return failed(call, e);
    }
  };

  const listModels = async (request: RestRequest): Promise<RestResponse> => {
    const call = begin(Endpoint.MODELS, request);
    try {
      const body = await core.handle(call, async () => {
        await core.authorize(call);
        const models = core.models(call);
        if (models !== core.routes) return modelList(models);
        if (allModels.routes !== models) allModels = { routes: models, json: modelList(models) };
        return allModels.json;
      });
      return ok(call, body);
    } catch (e) {
      return failed(call, e);
    }
  };

  const retrieveModel = async (request: RestRequest, name: string): Promise<RestResponse> => {
    const call = begin(Endpoint.MODELS, request);
    try {
      const body = await core.handle(call, async () => {
        await core.authorize(call);
        return JSON.stringify(renderModel(core.model(call, name)));
      });
      return ok(call, body);
    } catch (e) {
      return failed(call, e);
    }
  };

  /** What a URL that is read answers: GET, and HEAD, its headers alone (the server leaves out the body). */
  const reads = (method: string) => method === "GET" || method === "HEAD";

  const handle = async (request: RestRequest): Promise<RestResponse> => {
    const { path, method } = request;
    if (path === "/v1/chat/completions") {
      if (method !== "POST") return errorResponse(methodNotAllowed(method, path, "POST"), ulid());
      return traced("/v1/chat/completions", request, (span) => chatCompletions(request, span));
    }
    if (path === "/v1/responses") {
      if (method !== "POST") return errorResponse(methodNotAllowed(method, path, "POST"), ulid());
      return traced("/v1/responses", request, (span) => responses(request, span));
    }
    if (path.startsWith(responsesPrefix)) {
      const [encoded, what, ...more] = path.slice(responsesPrefix.length).split("/");
      if (!encoded || more.length > 0 || (what !== undefined && what !== "input_items")) {
        return errorResponse(unknownUrl(method, path), ulid());
      }
      const allowed = what === undefined ? "GET, HEAD, DELETE" : "GET, HEAD";
      if (!reads(method) && !(method === "DELETE" && what === undefined)) {
        return errorResponse(methodNotAllowed(method, path, allowed), ulid());
      }
      let id: string;
      try {
        id = decodeURIComponent(encoded);
      } catch {
        return errorResponse(invalidRequest("The response id in the URL is not valid percent-encoding."), ulid());
      }
      const action = what !== undefined ? "input_items" : method === "DELETE" ? "delete" : "retrieve";
      const route = what === undefined ? "/v1/responses/{response_id}" : "/v1/responses/{response_id}/input_items";
      return traced(route, request, () => storedResponse(request, action, id));
    }
    if (path === "/v1/embeddings") {
      if (method !== "POST") return errorResponse(methodNotAllowed(method, path, "POST"), ulid());
      return traced("/v1/embeddings", request, (span) => embeddings(request, span));
    }
    if (path === "/v1/models") {
      if (!reads(method)) return errorResponse(methodNotAllowed(method, path, "GET, HEAD"), ulid());
      return traced("/v1/models", request, () => listModels(request));
    }
    if (path.startsWith(modelsPrefix) && path.length > modelsPrefix.length) {
      if (!reads(method)) return errorResponse(methodNotAllowed(method, path, "GET, HEAD"), ulid());
      let name: string;
      try {
        name = decodeURIComponent(path.slice(modelsPrefix.length));
      } catch {
        return errorResponse(invalidRequest("The model name in the URL is not valid percent-encoding."), ulid());
      }
      return traced("/v1/models/{model}", request, () => retrieveModel(request, name));
    }
    return errorResponse(unknownUrl(method, path), ulid());
  };

  return {
    handle,
    async fetch(request, hooks) {
      let read = false;
      const response = await handle({
        method: request.method,
        path: pathOf(request.url),
        query: queryOf(request.url),
        headers: request.headers,
        text: (limit) =>
          readText(request, limit, hooks?.body)
            .then((text) => ((read = true), text))
            .finally(() => hooks?.bodyRead?.()),
        signal: request.signal,
      });
      const body = response.body;
      if (typeof body === "string") hooks?.answered?.();
      // A body refused before it was all read (too large, its key refused first) would be read on to its end, however
      // long, to keep the connection: the connection is closed instead.
      const unread = !read && hasBody(request.headers);
      return new Response(typeof body === "string" ? body : toReadable(body, request.signal, response.cutOff, hooks), {
        status: response.status,
        headers: unread ? { ...response.headers, connection: "close" } : response.headers,
      });
    },
  };
}

function isStreamRequest(body: unknown): boolean {
  return typeof body === "object" && body !== null && (body as { stream?: unknown }).stream === true;
}

/**
 * The stream as SSE in OpenAI's framing: one `data:` event per chunk, then `data: [DONE]`. A failure
 * after the first byte can no longer change the status, so it goes out as an error event, as OpenAI
 * sends them (the SDKs raise it); a client that left gets nothing more.
 */
async function* serverSentEvents(stream: ChatStream, span: Span): AsyncGenerator<string> {
  try {
    for await (const chunk of stream) yield `data: ${JSON.stringify(chunk)}\n\n`;
    yield "data: [DONE]\n\n";
  } catch (e) {
    const error = toGatewayError(e);
    span.setAttribute("gateway.stream_error", error.code);
    if (error.status !== 499) {
      span.setStatus({ code: SpanStatusCode.ERROR });
      yield `data: ${errorBody(error)}\n\n`;
    }
  } finally {
    span.end();
  }
}

/**
 * A streamed response as SSE in the Responses API's framing: each event named by its type, and no `[DONE]`. A failure
 * after the first byte goes out as an `error` event, as OpenAI sends them (the SDKs raise it).
 */
async function* responseEvents(stream: ResponseStream, span: Span): AsyncGenerator<string> {
  let sequence = 0;
  try {
    for await (const event of stream) {
      if (typeof event.sequence_number === "number") sequence = event.sequence_number + 1;
      yield `event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`;
    }
  } catch (e) {
    const error = toGatewayError(e);
    span.setAttribute("gateway.stream_error", error.code);
    if (error.status !== 499) {
      span.setStatus({ code: SpanStatusCode.ERROR });
      const { code, message, param } = error;
      const event = { type: "error", code, message, param, sequence_number: sequence };
      yield `event: error\ndata: ${JSON.stringify(event)}\n\n`;
    }
  } finally {
    span.end();
  }
}

/** The pieces of a whole answer written as they come, its span ended with them. */
async function* piecesOf(written: string[], rest: Iterator<string>, span: Span): AsyncGenerator<string> {
  try {
    yield* written;
    for (let next = rest.next(); !next.done; next = rest.next()) yield next.value;
  } finally {
    span.end();
  }
}

/** About how much of an embeddings answer each piece holds. */
const embeddingPieceChars = 1 << 18;

/**
 * An embeddings answer as JSON, in pieces of about 256 KB: the JSON.stringify of it, with vectors of base64 for a
 * client that asked for floats decoded and printed as floats, one vector at a time. Each float32 is printed as
 * JSON.stringify prints the number (OpenAI and vLLM print its digits in full so), which parses back to it exactly.
 */
export function* embeddingJson(response: CreateEmbeddingResponse, floats: boolean): Generator<string> {
  let out = "";
  let members = "{";
  for (const [key, value] of Object.entries(response) as [string, unknown][]) {
    if (key !== "data" || !Array.isArray(value)) {
      const text = JSON.stringify(value) as string | undefined;
      if (text === undefined) continue;
      out += `${members}${JSON.stringify(key)}:${text}`;
      members = ",";
      continue;
    }
    out += `${members}"data":[`;
    members = ",";
    for (let i = 0; i < value.length; i++) {
      const item: unknown = value[i];
      out += i > 0 ? "," : "";
      if (typeof item !== "object" || item === null || Array.isArray(item)) {
        out += JSON.stringify(item) ?? "null";
        continue;
      }
      let fields = "{";
      for (const [name, field] of Object.entries(item) as [string, unknown][]) {
        const text = name === "embedding" ? vectorJson(field, floats) : (JSON.stringify(field) as string | undefined);
        if (text === undefined) continue;
        out += `${fields}${JSON.stringify(name)}:${text}`;
        fields = ",";
      }
      out += fields === "{" ? "{}" : "}";
      if (out.length >= embeddingPieceChars) {
        yield out;
        out = "";
      }
    }
    out += "]";
  }
  yield `${out}${members === "{" ? "{}" : "}"}`;
}

/** A vector as JSON: base64 for a client that asked for floats as its float32s, anything else as it came. */
function vectorJson(vector: unknown, floats: boolean): string | undefined {
  const values = floats && typeof vector === "string" ? (base64Floats(vector) ?? vector) : vector;
  // A list of finite numbers prints as JSON.stringify prints it, without building a copy of it first.
  if (Array.isArray(values) && values.every((v) => typeof v === "number" && Number.isFinite(v))) {
    return `[${values.join(",")}]`;
  }
  return JSON.stringify(values) as string | undefined;
}

export function errorResponse(error: GatewayError, requestId: string, limitHeaders?: Record<string, string>): RestResponse {
  const headers: Record<string, string> = { "content-type": json, "x-request-id": requestId, ...limitHeaders, ...error.headers };
  if (error.retryAfterS !== undefined) headers["retry-after"] = String(error.retryAfterS);
  return { status: error.status, headers, body: errorBody(error) };
}

/**
 * The request's body, or why it could not be had: in a Content-Encoding the gateway does not decode (415, before it is
 * read), too large (413), or broken off by the client while it arrived, which is the client leaving (cancelled, 499),
 * not a failure of the gateway.
 */
async function bodyText(request: RestRequest, limit: number): Promise<string> {
  const encoding = request.headers.get("content-encoding")?.trim();
  if (encoding && encoding.toLowerCase() !== "identity") throw unsupportedContentEncoding(encoding);
  try {
    return await request.text(limit);
  } catch (e) {
    throw e instanceof GatewayError ? e : cancelled();
  }
}

/** Deepest nesting of arrays and objects a body may have, as for the RPCs' messages. */
const maxJsonDepth = 100;

function parseJson(text: string): unknown {
  if (text.trim() === "") throw invalidRequest("The request body is empty; send a JSON object.", null, "invalid_json");
  // One scan of its characters: a body nested millions deep takes half a second to parse and overflows the stack when
  // it is serialised again for an upstream.
  const shape = jsonShape(text, maxJsonDepth, maxRequestNodes);
  if (shape.depth > maxJsonDepth) {
    throw invalidRequest(`The JSON body nests deeper than ${maxJsonDepth} levels.`, null, "invalid_json");
  }
  if (shape.nodes > maxRequestNodes) {
    throw invalidRequest(
      `The JSON body holds more than ${maxRequestNodes} arrays, objects and object members.`,
      null,
      "invalid_json",
    );
  }
  try {
    return JSON.parse(text);
  } catch {
    throw invalidRequest("We could not parse the JSON body of your request.", null, "invalid_json");
  }
}

/**
 * The query parameters of a stored response call the API defines (`include[]`, and `after`, `before`, `limit` and
 * `order` for input items), passed on as they came; others are left out. A retrieval may not be streamed.
 */
function storedResponseQuery(action: StoredResponseRequest["action"], query = ""): StoredResponseRequest["query"] {
  const params = new URLSearchParams(query);
  if (action === "retrieve" && params.get("stream") === "true") {
    throw invalidRequest(
      "Invalid value for 'stream': a stored response is not streamed by this gateway; retrieve it whole.",
      "stream",
      "unsupported_value",
    );
  }
  const picked: StoredResponseRequest["query"] = {};
  const include = [...params.getAll("include[]"), ...params.getAll("include")];
  if (include.length > 0 && action !== "delete") picked.include = include;
  if (action === "input_items") {
    for (const name of ["after", "before", "limit", "order"]) {
      const value = params.get(name);
      if (value !== null) picked[name] = value;
    }
  }
  return picked;
}

/** The query string of an absolute URL, without its `?`. */
function queryOf(url: string): string | undefined {
  const query = url.indexOf("?");
  return query < 0 ? undefined : url.slice(query + 1);
}

/**
 * The path of a request's URL without parsing all of it: absolute, or the path alone, as Bun gives it for a request
 * without a usable Host (HTTP/1.0, an empty Host).
 */
export function pathOf(url: string): string {
  const start = url.startsWith("/") ? 0 : url.indexOf("/", url.indexOf("//") + 2);
  if (start < 0) return "/";
  const query = url.indexOf("?", start);
  return query < 0 ? url.slice(start) : url.slice(start, query);
}

/** Whether an HTTP/1.1 request's head says a body follows it. */
function hasBody(headers: Pick<Headers, "get">): boolean {
  return headers.get("transfer-encoding") !== null || (headers.get("content-length") ?? "0") !== "0";
}

/**
 * A Fetch body as text with a size limit: 413 past it, whether declared or streamed; 503 when its declared length
 * could not fit beside the bodies in flight, or its bytes as they arrive would pass the bound on them.
 */
async function readText(request: Request, limit: number, hold: BodyHold | undefined): Promise<string> {
  const declared = request.headers.get("content-length");
  if (declared !== null) {
    const length = Number(declared);
    if (length > limit) throw bodyTooLarge(limit);
    // A declared length is the length the server reads: a small body is held at it and read in one piece, as reading
    // it chunk by chunk cost a quarter more of the gateway's CPU per request; a larger one counts its bytes as they
    // arrive, so a slow sender holds of the bound only what it sent (and at most hold.upfront a connection otherwise).
    if (!hold) return utf8Text(await request.arrayBuffer());
    if (length <= hold.upfront) {
      if (!hold.cover(length)) throw bodiesAtCapacity();
      return utf8Text(await request.arrayBuffer());
    }
    if (!hold.fits(length)) throw bodiesAtCapacity();
  }
  if (!request.body) return "";
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw bodyTooLarge(limit);
    }
    if (hold && !hold.cover(size)) {
      await reader.cancel();
      throw bodiesAtCapacity();
    }
    chunks.push(value);
  }
  return utf8Text(Buffer.concat(chunks, size));
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * A body's bytes as text (a byte order mark left out), refused when they are not UTF-8, a Latin-1 body say, rather
 * than read with replacement characters and sent upstream so, as the RPCs refuse such a JSON message.
 */
export function utf8Text(bytes: ArrayBuffer | Uint8Array): string {
  try {
    return utf8.decode(bytes);
  } catch {
    throw invalidRequest("The request body is not valid UTF-8; send JSON encoded as UTF-8.", null, "invalid_json");
  }
}

/**
 * Server-sent events as a Bun "direct" stream: strings go to the socket as written, flushed per event. A write the
 * client takes nothing of is left to the hooks to time out, and to end at once once the events are cut off.
 */
function toReadable(
  events: AsyncIterable<string>,
  gone: AbortSignal,
  cutOff: AbortSignal | undefined,
  hooks: FetchHooks | undefined,
): ReadableStream<Uint8Array> {
  const iterator = events[Symbol.asyncIterator]();
  let waiting = false;
  const close = () => {
    if (waiting) hooks?.writeWaits?.(true);
  };
  cutOff?.addEventListener("abort", close, { once: true });
  return new ReadableStream({
    type: "direct",
    async pull(controller) {
      try {
        for (;;) {
          const { done, value } = await iterator.next();
          if (done) break;
          const written = controller.write(value);
          if (typeof written !== "number") {
            waiting = true;
            hooks?.writeWaits?.(cutOff?.aborted === true);
            try {
              await written;
            } finally {
              waiting = false;
            }
            // A connection closed while the write waited: nothing more goes out.
            if (gone.aborted || cutOff?.aborted) break;
            hooks?.writeDone?.();
          }
          // Nothing more reaches a client that left; stop the stream and its upstream.
          else if (written === 0) break;
          await controller.flush();
        }
      } finally {
        cutOff?.removeEventListener("abort", close);
        await iterator.return?.();
        try {
          controller.close();
        } catch {
          // Already closed with its connection.
        }
        hooks?.answered?.();
      }
    },
    async cancel() {
      await iterator.return?.();
    },
  }) as ReadableStream<Uint8Array>;
}
