import { Code, ConnectError } from "@connectrpc/connect";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import type { UpstreamErrorBody } from "./providers/provider.ts";
import { clipped } from "../lib/text.ts";

/**
 * A failure the client sees: its HTTP status, OpenAI-style type/code/param, and the outcome class
 * recorded in the request's metrics. The one mapping from gateway failures to REST and RPC errors.
 */
export class GatewayError extends Error {
  override name = "GatewayError";
  constructor(
    readonly status: number,
    readonly type: string,
    readonly code: string,
    message: string,
    readonly outcome: RequestStatus,
    readonly param: string | null = null,
    /** Seconds the client should wait before retrying; sent as Retry-After. */
    readonly retryAfterS: number | undefined = undefined,
    /** More response headers (REST) or metadata (RPC), such as the key's rate limits. */
    readonly headers: Record<string, string> | undefined = undefined,
    /** An upstream's `innererror` (Azure's content filter results), passed on in the REST error body. */
    readonly innererror: Record<string, unknown> | undefined = undefined,
  ) {
    super(message);
  }
}

/**
 * `x-should-retry: false`, which the official OpenAI SDKs obey over their own retries of 408/409/429/5xx: sent where
 * the gateway has already retried and fallen back upstream, or a retry cannot help, so a client's retries do not
 * multiply upstream calls and charges.
 */
const noRetry = { "x-should-retry": "false" } as const;

/**
 * The SDKs wait out a Retry-After of up to 60 s and retry within seconds past that: a longer one is not retried at all.
 */
const retryAfter = (retryAfterS: number | undefined) =>
  retryAfterS !== undefined && retryAfterS > 60 ? noRetry : undefined;

export const invalidRequest = (message: string, param: string | null = null, code = "invalid_value") =>
  new GatewayError(400, "invalid_request_error", code, message, RequestStatus.INVALID_REQUEST, param);

export const unauthorized = (message: string, code = "invalid_api_key") =>
  new GatewayError(401, "invalid_request_error", code, message, RequestStatus.UNAUTHORIZED);

/** A valid key of an org its operator suspended; the same key works again once the org is reinstated. */
export const organizationSuspended = () =>
  new GatewayError(
    403,
    "permission_error",
    "organization_suspended",
    "The organization of this API key is suspended: contact the gateway's operator.",
    RequestStatus.UNAUTHORIZED,
  );

export const modelNotAllowed = (model: string) =>
  new GatewayError(
    403,
    "permission_error",
    "model_not_allowed",
    `This API key may not use the model \`${clipped(model, 256)}\`.`,
    RequestStatus.UNAUTHORIZED,
    "model",
  );

export const modelNotFound = (model: string) =>
  new GatewayError(
    404,
    "invalid_request_error",
    "model_not_found",
    `The model \`${clipped(model, 256)}\` does not exist or you do not have access to it.`,
    RequestStatus.INVALID_REQUEST,
    "model",
  );

const endpointNames = { chat: "chat completions", embeddings: "embeddings", responses: "the Responses API" };

/** A model the config says does not serve the API called, refused as OpenAI refuses a chat call to an embedding model. */
export const modelNotServed = (model: string, endpoint: "chat" | "embeddings" | "responses") =>
  new GatewayError(
    404,
    "invalid_request_error",
    "model_not_supported",
    `The model \`${clipped(model, 256)}\` does not serve ${endpointNames[endpoint]}.`,
    RequestStatus.INVALID_REQUEST,
    "model",
  );

/** A client's id as its error message shows it: cut short, as a URL may hold any length of it. */
const shownId = (id: string) => clipped(id, 200);

/**
 * A response id that names no response the gateway made for the caller's org (another org's, altered, an upstream's
 * own, deleted): in OpenAI's words, the same whichever it is.
 */
export const responseNotFound = (id: string) =>
  new GatewayError(
    404,
    "invalid_request_error",
    "response_not_found",
    `Response with id '${shownId(id)}' not found.`,
    RequestStatus.INVALID_REQUEST,
  );

/** A previous_response_id that names no response the gateway made for the caller's org, as responseNotFound. */
export const previousResponseNotFound = (id: string) =>
  new GatewayError(
    400,
    "invalid_request_error",
    "previous_response_not_found",
    `Previous response with id '${shownId(id)}' not found.`,
    RequestStatus.INVALID_REQUEST,
    "previous_response_id",
  );

/**
 * An input item's id (or a page's `after`) that names no item the gateway handed the caller's org (another org's,
 * altered, an upstream's own), refused before any upstream reads it: the same whichever it is.
 */
export const itemNotFound = (id: string, param: string) =>
  new GatewayError(
    400,
    "invalid_request_error",
    "item_not_found",
    `Item with id '${shownId(id)}' not found.`,
    RequestStatus.INVALID_REQUEST,
    param,
  );

/**
 * An assistant message's `audio.id` that names no audio answer the gateway handed the caller's org (another org's,
 * altered, an upstream's own), refused before any upstream hears it: the same whichever it is.
 */
export const audioNotFound = (id: string, param: string) =>
  new GatewayError(
    400,
    "invalid_request_error",
    "audio_not_found",
    `Audio with id '${shownId(id)}' not found.`,
    RequestStatus.INVALID_REQUEST,
    param,
  );

export const unknownUrl = (method: string, path: string) =>
  new GatewayError(
    404,
    "invalid_request_error",
    "unknown_url",
    `Unknown request URL: ${method} ${path}.`,
    RequestStatus.INVALID_REQUEST,
  );

/** A request the port's HTTP/1.1 parser refused (see unparsableAnswer in lib/server.ts), with its status. */
export const unparsableRequest = (status: number, message: string) =>
  new GatewayError(
    status,
    "invalid_request_error",
    status === 431 ? "request_header_fields_too_large" : status === 501 ? "method_not_supported" : "invalid_request",
    message,
    RequestStatus.INVALID_REQUEST,
  );

export const methodNotAllowed = (method: string, path: string, allowed: string) =>
  new GatewayError(
    405,
    "invalid_request_error",
    "method_not_allowed",
    `Method ${method} is not allowed on ${path}; use ${allowed}.`,
    RequestStatus.INVALID_REQUEST,
    null,
    undefined,
    { allow: allowed },
  );

export const bodyTooLarge = (limitBytes: number) =>
  new GatewayError(
    413,
    "invalid_request_error",
    "request_too_large",
    `The request body exceeds the limit of ${limitBytes} bytes.`,
    RequestStatus.INVALID_REQUEST,
  );

/**
 * The request bodies the replica holds at once are at their bound (GATEWAY_MAX_INFLIGHT_BODY_BYTES): this one is refused
 * before (the rest of) it is read, rather than a burst of large bodies taking the replica's memory and every request on
 * it. Retried in a second, it finds room here or another replica.
 */
export const bodiesAtCapacity = () =>
  new GatewayError(
    503,
    "api_error",
    "gateway_overloaded",
    "The gateway is holding as many request bodies as it can right now; retry shortly.",
    RequestStatus.UNAVAILABLE,
    null,
    1,
  );

/** A request body sent compressed (or in any Content-Encoding but identity), which the gateway does not decode. */
export const unsupportedContentEncoding = (encoding: string) =>
  new GatewayError(
    415,
    "invalid_request_error",
    "unsupported_content_encoding",
    `Content-Encoding '${clipped(encoding, 64)}' is not supported: send the request body uncompressed.`,
    RequestStatus.INVALID_REQUEST,
  );

/**
 * An upstream refused the request itself (400, 413, 422, or OpenAI's 429 for a prompt over the whole tokens-per-minute
 * limit): the client gets that status and, when the upstream sent its error in OpenAI's shape, its message, type, param
 * and code as they were (clients branch on codes such as context_length_exceeded); otherwise the gateway's.
 */
export const upstreamRejected = (model: string, status: number, error: UpstreamErrorBody | undefined) =>
  new GatewayError(
    status,
    error?.type ?? "invalid_request_error",
    error?.code ?? (status === 413 ? "request_too_large" : "upstream_rejected"),
    error?.message ??
      (status === 413 ? `The request is too large for the upstream of \`${model}\`.` : `The upstream of \`${model}\` rejected the request (HTTP ${status}).`),
    RequestStatus.INVALID_REQUEST,
    error?.param ?? null,
    undefined,
    noRetry,
    error?.innererror,
  );

export const upstreamFailed = (message: string) =>
  new GatewayError(502, "api_error", "upstream_error", message, RequestStatus.UPSTREAM_ERROR, null, undefined, noRetry);

/**
 * Every attempt was refused by an upstream's rate limit. The wait it asked for, when it said one, goes on as Retry-After
 * in whole seconds (at least `minRetryAfterS`) and as `retry-after-ms`, which the OpenAI SDKs read first: an upstream
 * that asks for 300 ms (OpenAI says its waits to the millisecond) is retried after 300 ms, not a second.
 */
export const upstreamRateLimited = (message: string, waitMs: number | undefined, minRetryAfterS = 0) => {
  const retryAfterS = waitMs === undefined ? undefined : Math.max(minRetryAfterS, Math.ceil(waitMs / 1000));
  return new GatewayError(
    429,
    "rate_limit_error",
    "upstream_rate_limited",
    message,
    RequestStatus.RATE_LIMITED,
    null,
    retryAfterS,
    waitMs === undefined ? undefined : { ...retryAfter(retryAfterS), "retry-after-ms": String(Math.ceil(waitMs)) },
  );
};

/** The upstream's account is out of credit: not the client's to retry, so not a 429. */
export const upstreamQuotaExceeded = (message: string) =>
  new GatewayError(
    502,
    "api_error",
    "upstream_quota_exceeded",
    message,
    RequestStatus.UPSTREAM_ERROR,
    null,
    undefined,
    noRetry,
  );

export const upstreamTimeout = (message: string) =>
  new GatewayError(504, "api_error", "upstream_timeout", message, RequestStatus.TIMEOUT, null, undefined, noRetry);

/** Every target's circuit breaker is open: failing fast until one may be probed again. */
export const upstreamUnavailable = (message: string, retryAfterS: number) =>
  new GatewayError(
    503,
    "api_error",
    "upstream_unavailable",
    message,
    RequestStatus.UPSTREAM_ERROR,
    null,
    retryAfterS,
    retryAfter(retryAfterS),
  );

/** The whole request, retries and fallbacks included, ran past its time limit. */
export const requestTimeout = (limitMs: number) =>
  new GatewayError(
    504,
    "api_error",
    "request_timeout",
    `The request did not finish within the gateway's limit of ${limitMs} ms.`,
    RequestStatus.TIMEOUT,
    null,
    undefined,
    noRetry,
  );

/**
 * A per-key requests- or tokens-per-minute limit, in OpenAI's shape (type "requests" or "tokens"). The wait goes as
 * Retry-After in whole seconds (at least 1) and, as the OpenAI SDKs read first, `retry-after-ms`: a window that frees
 * room in 200 ms is retried after 200 ms rather than a second.
 */
export const rateLimited = (kind: "requests" | "tokens", message: string, waitMs: number, headers?: Record<string, string>) =>
  new GatewayError(
    429,
    kind,
    "rate_limit_exceeded",
    message,
    RequestStatus.RATE_LIMITED,
    null,
    Math.max(1, Math.ceil(waitMs / 1000)),
    { ...headers, "retry-after-ms": String(Math.max(1, Math.ceil(waitMs))) },
  );

/** The key's or org's budget cannot cover the request; no upstream was called (nor will soon, without a Retry-After). */
export const insufficientQuota = (message: string, retryAfterS?: number) =>
  new GatewayError(
    429,
    "insufficient_quota",
    "insufficient_quota",
    message,
    RequestStatus.RATE_LIMITED,
    null,
    retryAfterS,
    retryAfterS === undefined ? noRetry : retryAfter(retryAfterS),
  );

/** A dependency of the gateway itself (billing) cannot answer; the client may retry. */
export const serviceUnavailable = (message: string, code: string) =>
  new GatewayError(503, "api_error", code, message, RequestStatus.UNAVAILABLE);

export const cancelled = () =>
  new GatewayError(499, "invalid_request_error", "client_closed_request", "The client closed the request.", RequestStatus.CANCELLED);

/**
 * Still unfinished when the gateway's shutdown grace ran out (or when it had to exit): answered so where it still can be,
 * metered as cancelled, as what it had used so far. The client may retry at once, on another replica.
 */
export const cutAtShutdown = () =>
  new GatewayError(
    503,
    "api_error",
    "gateway_shutting_down",
    "The gateway shut down before the request finished.",
    RequestStatus.CANCELLED,
    null,
    1,
  );

/** Why a call's signal aborted when the gateway cut it at the end of its shutdown grace period. */
export class ShutdownCut extends Error {
  override name = "ShutdownCut";
  constructor() {
    super("the gateway is shutting down");
  }
}

/**
 * The deadline an RPC client set (grpc-timeout, connect-timeout-ms) passed: a time limit, metered as a timeout as the
 * gateway's own limit is, so that `cancelled` keeps meaning a client that chose to leave.
 */
export const deadlineExceeded = () =>
  new GatewayError(504, "api_error", "deadline_exceeded", "The request did not finish within the client's deadline.", RequestStatus.TIMEOUT);

/**
 * Why a call whose signal aborted ended: Connect aborts it with DeadlineExceeded when the RPC's deadline passes, and the
 * gateway with ShutdownCut when its shutdown grace ran out.
 */
export const clientGone = (signal: AbortSignal | undefined) =>
  signal?.reason instanceof ShutdownCut
    ? cutAtShutdown()
    : signal?.reason instanceof ConnectError && signal.reason.code === Code.DeadlineExceeded
      ? deadlineExceeded()
      : cancelled();

export const internal = () =>
  new GatewayError(500, "server_error", "internal_error", "The gateway failed to handle the request.", RequestStatus.INTERNAL_ERROR);

/** Any thrown value as a GatewayError; anything unexpected becomes a 500 without leaking its message. */
export function toGatewayError(e: unknown): GatewayError {
  return e instanceof GatewayError ? e : internal();
}

/** The OpenAI error body: {"error": {"message", "type", "param", "code"}}, with an upstream's `innererror`. */
export function errorBody(e: GatewayError): string {
  const { message, type, param, code, innererror } = e;
  return JSON.stringify({ error: { message, type, param, code, ...(innererror ? { innererror } : {}) } });
}

/**
 * The Connect code of each outcome, which says what the caller should do (RPC retry policies retry ResourceExhausted
 * and Unavailable), whatever HTTP status carries it over REST: a client's invalid request is InvalidArgument even as
 * an upstream's 429 for a prompt over its whole tokens-per-minute limit.
 */
const connectCodes: Partial<Record<RequestStatus, Code>> = {
  [RequestStatus.INVALID_REQUEST]: Code.InvalidArgument,
  [RequestStatus.UNAUTHORIZED]: Code.Unauthenticated,
  [RequestStatus.RATE_LIMITED]: Code.ResourceExhausted,
  [RequestStatus.UPSTREAM_ERROR]: Code.Unavailable,
  [RequestStatus.UNAVAILABLE]: Code.Unavailable,
  [RequestStatus.TIMEOUT]: Code.DeadlineExceeded,
  [RequestStatus.CANCELLED]: Code.Canceled,
};

/** Statuses with a more precise code than their outcome's. */
const statusCodes: Record<number, Code> = {
  403: Code.PermissionDenied,
  404: Code.NotFound,
  // A request the gateway cut at shutdown, metered as cancelled: the client may retry elsewhere.
  503: Code.Unavailable,
};

const printable = /^[\x20-\x7e]+$/;
/** Longest param sent as a header: a field path, never a client's whole input. */
const maxParamChars = 256;

/** The RPC form of a gateway failure; the OpenAI error code, type and param travel as metadata. */
export function toConnectError(e: GatewayError): ConnectError {
  const metadata: Record<string, string> = { "x-error-code": e.code, "x-error-type": e.type };
  // A param naming a client's metadata key may hold what a header cannot, or be long; the message names it anyway.
  if (e.param !== null && e.param.length <= maxParamChars && printable.test(e.param)) metadata["x-error-param"] = e.param;
  if (e.retryAfterS !== undefined) metadata["retry-after"] = String(e.retryAfterS);
  if (e.headers) Object.assign(metadata, e.headers);
  return new ConnectError(e.message, statusCodes[e.status] ?? connectCodes[e.outcome] ?? Code.Internal, metadata);
}
