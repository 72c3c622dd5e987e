import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatCompletionCreateParamsNonStreaming,
  ChatCompletionMessageParam,
} from "openai/resources/chat/completions";
import type { CompletionUsage } from "openai/resources/completions";
import type { CreateEmbeddingResponse, EmbeddingCreateParams } from "openai/resources/embeddings";
import type {
  Response as ResponseObject,
  ResponseCreateParamsNonStreaming,
} from "openai/resources/responses/responses";
import { MAX_TOKENS_PER_REQUEST, type Tokens } from "../../lib/money.ts";
import { clipped } from "../../lib/text.ts";

/** A validated chat request in the OpenAI wire shape; `model` is already the upstream model. */
export type ChatRequest = ChatCompletionCreateParamsNonStreaming;
export type { ChatCompletion, ChatCompletionChunk };

/** A validated embeddings request in the OpenAI wire shape; `encoding_format` is always set. */
export type EmbeddingRequest = EmbeddingCreateParams & { encoding_format: "float" | "base64" };
export type { CreateEmbeddingResponse };

/** A validated Responses API request in the OpenAI wire shape, without `stream`; `model` is the upstream model. */
export type ResponsesRequest = ResponseCreateParamsNonStreaming & { model: string };
export type { ResponseObject };

/** One server-sent event of a streamed response, as OpenAI names them by `type` (`response.output_text.delta`, ...). */
export interface ResponseEvent {
  type: string;
  sequence_number?: number;
  [field: string]: unknown;
}

/** Events that end a streamed response; each carries the response, with its usage. */
export const terminalResponseEvents = new Set(["response.completed", "response.incomplete", "response.failed"]);

/** Events of one streamed response; iterating fails with UpstreamError. */
export type ResponseEventStream = AsyncIterable<ResponseEvent>;

export interface ResponsesResult {
  /** As the upstream returned it, its usage the metered counts. */
  response: ResponseObject;
  tokens: Tokens;
  usageEstimated: boolean;
}

/**
 * A call on a response an upstream stored: `retrieve` it, `delete` it, or list its `input_items`. `query` holds the
 * client's parameters the API defines for it (`include`; and `after`, `before`, `limit`, `order` for input items).
 */
export interface StoredResponseRequest {
  action: "retrieve" | "delete" | "input_items";
  /** The upstream's id of the response. */
  id: string;
  query: Record<string, string | string[]>;
}

export interface CallOptions {
  /** Aborted when the client goes away. */
  signal?: AbortSignal | undefined;
  /** Limit of this one attempt; for streams, the limit until the upstream answers and between two chunks. */
  timeoutMs: number;
}

export interface ChatResult {
  /** As the upstream returned it (OpenAI shape). */
  completion: ChatCompletion;
  tokens: Tokens;
  /** True when the upstream reported no usage and the gateway counted the tokens. */
  usageEstimated: boolean;
}

export interface EmbeddingResult {
  /**
   * As the upstream returned it; vectors are base64 strings when the request asked for them. For a request for floats
   * they are floats or base64 of float32s (an OpenAI-compatible upstream is asked for base64, a quarter of the size),
   * to be printed as floats.
   */
  response: CreateEmbeddingResponse;
  tokens: Tokens;
  usageEstimated: boolean;
}

/** Chunks of one streamed completion in OpenAI's chunk shape; iterating fails with UpstreamError. */
export type ChunkStream = AsyncIterable<ChatCompletionChunk>;

/** Each provider kind as the OpenTelemetry GenAI semantic conventions name it (`gen_ai.provider.name`). */
export const genAiProviderNames: Record<Provider["kind"], string> = { openai: "openai", azure: "azure.ai.openai", mock: "mock" };

/** An upstream the gateway routes to; every provider reports usage in the same `Tokens` shape. */
export interface Provider {
  readonly name: string;
  readonly kind: "openai" | "azure" | "mock";
  /** The upstream's host and port (its base URL's), as traces name it (`server.address`, `server.port`); none in-process. */
  readonly server?: { address: string; port: number };
  /** One whole completion; fails with UpstreamError. */
  chat(request: ChatRequest, options: CallOptions): Promise<ChatResult>;
  /**
   * Opens a streamed completion, asking for usage in a last chunk. Resolves once the upstream's first
   * chunk has come (so routing may still retry or fall back until then); fails with UpstreamError.
   */
  streamChat(request: ChatRequest, options: CallOptions): Promise<ChunkStream>;
  embed(request: EmbeddingRequest, options: CallOptions): Promise<EmbeddingResult>;
  /** One whole response of the Responses API; fails with UpstreamError. */
  responses(request: ResponsesRequest, options: CallOptions): Promise<ResponsesResult>;
  /**
   * Opens a streamed response. Resolves once the upstream's first event past `response.created` and
   * `response.in_progress` has come (so routing may still retry or fall back until then); fails with UpstreamError.
   */
  streamResponses(request: ResponsesRequest, options: CallOptions): Promise<ResponseEventStream>;
  /** A call on a response the upstream stored, answered with its JSON as it came; fails with UpstreamError. */
  storedResponse(request: StoredResponseRequest, options: CallOptions): Promise<unknown>;
}

/**
 * How an upstream attempt failed, which decides what the gateway does next:
 * "rejected" (the upstream refused the request itself, 400/413/422, a 404 naming the request's parameter, a 403 for an
 * input its moderation flagged or for embeddings of a chat model, or a 429 for a prompt over its whole rate limit, which the other targets are asked
 * first) fails the request as the client's fault,
 * "transient" (connection, 408/409/429/5xx, unreadable answers) and "timeout" may be retried on the same target,
 * "misconfigured" (401/403/404 and other 4xx, missing key, an account out of quota, an Azure api-version that does not
 * serve the deployment) moves on to the next target,
 * "cancelled" stops.
 */
export type UpstreamFailure = "rejected" | "transient" | "timeout" | "misconfigured" | "cancelled";

/**
 * An upstream's error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), bounded: it comes from
 * outside, and is passed on to the client when the request was at fault.
 */
export interface UpstreamErrorBody {
  message: string;
  type: string | null;
  param: string | null;
  code: string | null;
  /** Azure's details of a refusal (its content filter's `content_filter_result`), when small. */
  innererror?: Record<string, unknown>;
}

export class UpstreamError extends Error {
  override name = "UpstreamError";
  /** The message says what happened for the log; it may name the provider, its key variable or the upstream's words. */
  constructor(
    readonly failure: UpstreamFailure,
    message: string,
    /** HTTP status the upstream answered with, when it answered. */
    readonly status?: number,
    /** How long the upstream asked us to wait (Retry-After), in ms. */
    readonly retryAfterMs?: number,
    /** The upstream's own error, when it sent one in OpenAI's shape. */
    readonly error?: UpstreamErrorBody,
  ) {
    super(message);
  }
  /**
   * The upstream accepted the request (answered 200) and its answer's body then broke off: it bills the prompt, as it
   * does one a timeout cut off. A refusal, however fast, is not billed, nor a 200 that is no answer (a proxy's page).
   */
  promptTaken = false;
}

/** The failure class of an upstream HTTP status and the error it came with. */
export function failureOfStatus(status: number, error?: UpstreamErrorBody): UpstreamFailure {
  if (status === 400 && apiVersionRefused(error)) return "misconfigured";
  if (status === 400 || status === 413 || status === 422 || overRateLimit(status, error)) return "rejected";
  if (status === 404 && namesParameter(error)) return "rejected";
  if (status === 403 && (flaggedInput(error) || notAnEmbeddingModel(error))) return "rejected";
  // Out of credit is not transient: retrying the account only delays the next target.
  if (outOfQuota(status, error)) return "misconfigured";
  if (status === 408 || status === 409 || status === 429 || status >= 500) return "transient";
  return "misconfigured";
}

/**
 * OpenAI's 429 for a request larger than the tokens-per-minute limit itself ("Request too large for gpt-4o ... The
 * input or output tokens must be reduced"), and Groq's 413 for the same ("Request too large for model ... on tokens per
 * minute (TPM)", code rate_limit_exceeded): no wait lets it through, so it is the request's fault, not a rate limit.
 * The limit is the account's tier, though: another target (another account or provider) may take the request.
 */
export function overRateLimit(status: number, error: UpstreamErrorBody | undefined): boolean {
  if (status === 413) return error?.code === "rate_limit_exceeded";
  return status === 429 && /\brequest too large\b|\bmust be reduced\b/i.test(error?.message ?? "");
}

/**
 * OpenAI's 404 for a request its model cannot serve ("This is not a chat model...", param "model") names the parameter
 * at fault: the caller's mistake, which must not open the target's breaker for everyone. A 404 with no such error (a
 * wrong base path's page, Azure's DeploymentNotFound, OpenAI's model_not_found for a misnamed target) is the operator's.
 */
function namesParameter(error: UpstreamErrorBody | undefined): boolean {
  return error?.param != null && error.code !== "model_not_found";
}

/**
 * OpenRouter's 403 for a prompt its moderation flagged ("... requires moderation on Azure. Your input was flagged for
 * \"violence\"."): the request's fault, as Azure's content filter 400 is, which must not open the target's breaker for
 * everyone. Its other 403s (a key's limit or guardrail) are the operator's.
 */
function flaggedInput(error: UpstreamErrorBody | undefined): boolean {
  return /\byour input was flagged\b/i.test(error?.message ?? "");
}

/**
 * OpenAI's 403 for embeddings asked of a chat model ("You are not allowed to generate embeddings from this model", no
 * param): the caller's mistake, as its 404 for a chat call to an embedding model is, which must not open the breaker of
 * the target every chat call to that model goes to.
 */
function notAnEmbeddingModel(error: UpstreamErrorBody | undefined): boolean {
  return /\bnot allowed to generate embeddings from this model\b/i.test(error?.message ?? "");
}

/**
 * Azure's 400 for an api-version it does not serve at all ("API version not supported") or not for the model deployed
 * ("Model o4-mini is enabled only for api versions 2024-12-01-preview and later"): every request fails alike until the
 * operator changes the target's api_version, as with a bad key.
 */
function apiVersionRefused(error: UpstreamErrorBody | undefined): boolean {
  return /^(?:api version not supported\b|model \S+ is enabled only for api versions\b)/i.test(error?.message ?? "");
}

/**
 * Azure's 400 for a feature of the request its configured api-version does not offer ("response_format value as
 * json_schema is enabled only for api versions 2024-08-01-preview and later", "tool_choice value as required ..."):
 * a target on a later version, or another provider, takes it.
 */
function featureOfLaterApiVersion(status: number, error: UpstreamErrorBody | undefined): boolean {
  return status === 400 && /\bis enabled only for api versions\b/i.test(error?.message ?? "");
}

/**
 * A refusal of the request by this target alone, which another may serve: over its account's whole rate limit,
 * flagged by OpenRouter's moderation (applied for some of its providers only), or asking for a feature of a later
 * Azure api-version than the target's.
 */
export function refusedByTarget(status: number, error: UpstreamErrorBody | undefined): boolean {
  return overRateLimit(status, error) || (status === 403 && flaggedInput(error)) || featureOfLaterApiVersion(status, error);
}

/** The upstream's account is out of credit (OpenAI's 429 insufficient_quota), as opposed to a rate limit. */
export function outOfQuota(status: number | undefined, error: UpstreamErrorBody | undefined): boolean {
  // 402 Payment Required: OpenRouter's and other resellers' "Insufficient credits".
  if (status === 402) return true;
  return status === 429 && (error?.code === "insufficient_quota" || error?.type === "insufficient_quota");
}

const maxMessageLength = 2_000;
// Words in no known shape (a plain text body, TGI's {"error": "..."}) say less and may echo more of the request.
const maxTextLength = 500;
// type, param and code also travel as RPC metadata (header values): printable ASCII, short.
const identifier = /^[\x20-\x7e]{1,128}$/;
// The operator's OpenAI organization and project ids, which upstream messages name ("... in organization org-..."),
// and Groq's organization ids, which its refusals of a request too large name as `org_01htjxws48fm0rbbg5gnkgmbrh`.
// Only Groq's shape (26 lower-case letters and digits): `org_` begins words of the client's own too (a tool's name).
const accountIds = /\b(?:(?:org-|proj_)[A-Za-z0-9]{6,}|org_[0-9a-z]{26})\b/g;

/**
 * The error in a refusal's `error` member: OpenAI's shape, or a string as its message; undefined without a message.
 * Messages pass through `redact`, and lose OpenAI organization and project ids, then are cut to a bounded length; a type, param or code that is not a short
 * printable string is left out, and so is an `innererror` longer than a message may be.
 */
export function upstreamErrorBody(
  error: unknown,
  redact: (text: string) => string = (text) => text,
): UpstreamErrorBody | undefined {
  const scrub = (text: string) => redact(text).replace(accountIds, "[redacted]");
  const bounded = (text: string, max: number) => {
    const message = scrub(text.trim());
    return message.length > max ? clipped(message, max - 1, "\u2026") : message;
  };
  if (typeof error === "string") {
    if (error.trim() === "") return undefined;
    return { message: bounded(error, maxTextLength), type: null, param: null, code: null };
  }
  if (typeof error !== "object" || error === null) return undefined;
  const { message, type, param, code, detail, innererror } = error as Record<string, unknown>;
  if (message === undefined && detail !== undefined) {
    const text = validationDetail(detail);
    return text ? { message: bounded(text, maxTextLength), type: null, param: null, code: null } : undefined;
  }
  if (typeof message !== "string" || message.trim() === "") return undefined;
  const id = (value: unknown) => (typeof value === "string" && identifier.test(value) ? value : null);
  const body: UpstreamErrorBody = {
    message: bounded(message, maxMessageLength),
    type: id(type),
    param: id(param),
    code: id(code),
  };
  const inner = typeof innererror === "object" && innererror !== null ? scrub(JSON.stringify(innererror)) : "";
  if (inner.length > 0 && inner.length <= maxMessageLength) {
    try {
      body.innererror = JSON.parse(inner) as Record<string, unknown>;
    } catch {
      // A redaction that broke the JSON: left out.
    }
  }
  return body;
}

/**
 * A FastAPI-style refusal's `detail` in words: a string as it is, or each validation error's `msg` after its `loc`
 * ("body.temperature: extra fields not permitted").
 */
function validationDetail(detail: unknown): string | undefined {
  if (typeof detail === "string") return detail.trim() || undefined;
  if (!Array.isArray(detail)) return undefined;
  const words = detail.flatMap((item) => {
    const { loc, msg } = record(item);
    if (typeof msg !== "string") return [];
    const where = Array.isArray(loc) ? loc.filter((part) => ["string", "number"].includes(typeof part)).join(".") : "";
    return [where ? `${where}: ${msg}` : msg];
  });
  return words.length > 0 ? words.join("; ") : undefined;
}

/** Retry-After (seconds or HTTP date) or retry-after-ms, in ms; undefined when absent or unreadable. */
export function retryAfterMs(
  headers: { get(name: string): string | null } | undefined,
  now = Date.now(),
): number | undefined {
  const ms = headers?.get("retry-after-ms");
  if (ms) {
    const value = Number(ms);
    if (Number.isFinite(value) && value >= 0) return value;
  }
  const after = headers?.get("retry-after");
  if (!after) return undefined;
  const seconds = Number(after);
  if (Number.isFinite(seconds)) return seconds >= 0 ? seconds * 1000 : undefined;
  const date = Date.parse(after);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** How to count what an upstream left out of its usage: the prompt and, for endpoints that generate, the output. */
export interface TokenEstimates {
  input(): Promise<number>;
  /** Unset for endpoints without output (embeddings): output is then zero. */
  output?: () => Promise<number>;
  /** Of the output counted, the reasoning an upstream sent as text; none unless set. */
  reasoning?: () => Promise<number>;
}

/** Tokens as metered, and whether the gateway counted any of them itself. */
export interface MeteredTokens {
  tokens: Tokens;
  estimated: boolean;
}

/**
 * The tokens to meter for an upstream's usage object (OpenAI's shape), normalised where usage enters the gateway so
 * cost, headers, budgets, quotas and the metrics row all hold the same numbers, and billing accepts them: a fraction
 * is rounded up (a token begun is billed), cached input is at most the input and reasoning at most the output (which
 * takes in reasoning an upstream counts beside its completion tokens, see reasoningApart). A
 * prompt or completion count that is missing or no count at all (negative, not a number, past the contract's
 * 2^31), or a prompt of 0 tokens, is counted by `estimate` instead, and the tokens are then marked estimated.
 */
export async function meteredUsage(usage: unknown, estimate: TokenEstimates): Promise<MeteredTokens> {
  const reported = record(usage);
  let estimated = false;
  let inputTokens = tokenCount(reported.prompt_tokens);
  // No request has an empty prompt: 0 is a prompt the upstream did not count, as Ollama reports one it had cached.
  if (inputTokens === undefined || inputTokens === 0n) {
    inputTokens = BigInt(await estimate.input());
    estimated = true;
  }
  let outputTokens = 0n;
  if (estimate.output) {
    const count = tokenCount(reported.completion_tokens);
    estimated ||= count === undefined;
    outputTokens = count ?? BigInt(await estimate.output());
  }
  // DeepSeek reports its cache hits beside the prompt's count rather than in its details (prompt_tokens is hits and
  // misses): read where OpenAI's count is missing, else its cached input is billed at the full price.
  const cached =
    tokenCount(record(reported.prompt_tokens_details).cached_tokens) ?? tokenCount(reported.prompt_cache_hit_tokens) ?? 0n;
  // Reasoning is counted with the output it is part of, from what was streamed of it.
  const streamedReasoning = tokenCount(reported.completion_tokens) === undefined ? estimate.reasoning : undefined;
  const reasoning =
    tokenCount(record(reported.completion_tokens_details).reasoning_tokens) ??
    (streamedReasoning ? BigInt(await streamedReasoning()) : 0n);
  if (estimate.output && reasoningApart(reported)) {
    outputTokens += reasoning;
    if (outputTokens > MAX_TOKENS_PER_REQUEST) outputTokens = MAX_TOKENS_PER_REQUEST;
  }
  const tokens: Tokens = {
    inputTokens,
    cachedInputTokens: cached < inputTokens ? cached : inputTokens,
    outputTokens,
    reasoningTokens: reasoning < outputTokens ? reasoning : outputTokens,
  };
  // Priced apart where configured (costParts keeps them within their totals); not metered apart.
  const audioInput = tokenCount(record(reported.prompt_tokens_details).audio_tokens);
  const audioOutput = tokenCount(record(reported.completion_tokens_details).audio_tokens);
  if (audioInput) tokens.audioInputTokens = audioInput;
  if (audioOutput) tokens.audioOutputTokens = audioOutput;
  return { tokens, estimated };
}

/**
 * The usage a stream holds once a chunk brings `next`: each count the largest either reported, so a later empty or
 * all-zero usage (some servers end with one), or one whose details are null, takes nothing away, and a server that
 * reports its running total on every chunk (vLLM's continuous usage) is held at its last.
 */
export function laterUsage(held: CompletionUsage | undefined, next: CompletionUsage): CompletionUsage {
  if (held === undefined) return next;
  const isDetails = (value: unknown) => typeof value === "object" && value !== null;
  const merged = (a: unknown, b: unknown): Record<string, unknown> => {
    const before = record(a);
    const after = record(b);
    const both: Record<string, unknown> = { ...before, ...after };
    for (const key of Object.keys(both)) {
      if (isDetails(before[key]) || isDetails(after[key])) both[key] = merged(before[key], after[key]);
      else {
        const kept = [before[key], after[key]].filter((v) => tokenCount(v) !== undefined) as number[];
        if (kept.length > 0) both[key] = Math.max(...kept);
      }
    }
    return both;
  };
  return merged(held, next) as unknown as CompletionUsage;
}

/**
 * Whether an upstream counts reasoning beside its completion tokens rather than among them, as Gemini's and xAI's
 * OpenAI-compatible endpoints do (`total_tokens` = prompt + completion + reasoning): more reasoning than completion,
 * or a total past prompt and completion. The metered output is then the completion and the reasoning.
 */
function reasoningApart(reported: Record<string, unknown>): boolean {
  const reasoning = tokenCount(record(reported.completion_tokens_details).reasoning_tokens) ?? 0n;
  const completion = tokenCount(reported.completion_tokens);
  if (reasoning === 0n || completion === undefined) return false;
  const prompt = tokenCount(reported.prompt_tokens);
  const total = tokenCount(reported.total_tokens);
  // Rounding fractions up cannot make a total that was within prompt and completion pass them.
  return reasoning > completion || (prompt !== undefined && total !== undefined && total > prompt + completion);
}

function record(value: unknown): Record<string, unknown> {
  return typeof value === "object" && value !== null ? (value as Record<string, unknown>) : {};
}

/** A reported count as whole tokens; undefined unless it is a number from 0 to the contract's bound. */
/** A reported token count, if it is one. */
export function tokenCount(value: unknown): bigint | undefined {
  // NaN fails both comparisons; an overflowing JSON number (1e400) is Infinity and fails the second.
  if (typeof value !== "number" || !(value >= 0 && value <= maxTokens)) return undefined;
  return BigInt(Math.ceil(value));
}

const maxTokens = Number(MAX_TOKENS_PER_REQUEST);

/** The usage object of a Tokens count, as OpenAI reports it. */
export function usageOfTokens(tokens: Tokens): CompletionUsage {
  const input = Number(tokens.inputTokens);
  const output = Number(tokens.outputTokens);
  const usage: CompletionUsage = { prompt_tokens: input, completion_tokens: output, total_tokens: input + output };
  if (tokens.cachedInputTokens > 0n) usage.prompt_tokens_details = { cached_tokens: Number(tokens.cachedInputTokens) };
  if (tokens.reasoningTokens > 0n)
    usage.completion_tokens_details = { reasoning_tokens: Number(tokens.reasoningTokens) };
  return usage;
}

/**
 * The usage object to answer a chat client with: the metered counts, so the client is shown what it is charged for
 * (and REST answers what the RPCs do), with the other counts of OpenAI's usage (audio, prediction tokens) the upstream
 * reported. Nothing else an upstream puts there reaches the client: OpenRouter's `cost`, `cost_details` and `is_byok`
 * are the operator's price, not the client's, whose charge is x-gateway-cost-nanos.
 */
export function answeredUsage(usage: unknown, tokens: Tokens): CompletionUsage {
  const answered = usageOfTokens(tokens);
  const reported = record(usage);
  // Reasoning the upstream counted beside its completion is shown there too: the client's counts are the upstream's.
  if (reasoningApart(reported)) answered.completion_tokens -= Number(tokens.reasoningTokens);
  const prompt = documentedCounts(reported.prompt_tokens_details, ["audio_tokens"]);
  if (reported.prompt_tokens_details !== undefined) {
    answered.prompt_tokens_details = { cached_tokens: Number(tokens.cachedInputTokens), ...prompt };
  }
  const completion = documentedCounts(reported.completion_tokens_details, [
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
  ]);
  if (reported.completion_tokens_details !== undefined) {
    answered.completion_tokens_details = { reasoning_tokens: Number(tokens.reasoningTokens), ...completion };
  }
  return answered;
}

/** The counts named `keys` of an upstream's usage details, those that are counts. */
function documentedCounts(details: unknown, keys: string[]): Record<string, number> {
  const reported = record(details);
  const counts: Record<string, number> = {};
  for (const key of keys) {
    const count = tokenCount(reported[key]);
    if (count !== undefined) counts[key] = Number(count);
  }
  return counts;
}

/**
 * The floats of an embedding in base64, little-endian float32s as OpenAI encodes them; undefined when its bytes are not
 * whole float32s. Read value by value: copying the bytes with Uint8Array.from and the floats with Array.from took the
 * event loop a second for 2048 vectors of 3072 dimensions, this 35 ms.
 */
export function base64Floats(base64: string): number[] | undefined {
  const bytes = Buffer.from(base64, "base64");
  if (bytes.length % 4 !== 0) return undefined;
  const floats = new Array<number>(bytes.length / 4);
  for (let i = 0; i < floats.length; i++) floats[i] = bytes.readFloatLE(i * 4);
  return floats;
}

/**
 * An embeddings answer's usage as meteredUsage reads it: one that counts its input as `total_tokens` alone, as Voyage
 * AI's does (`{"total_tokens": 9}`), has that as its prompt's count, since embeddings generate nothing.
 */
export function embeddingUsage(usage: unknown): unknown {
  const reported = record(usage);
  if (tokenCount(reported.prompt_tokens) !== undefined || tokenCount(reported.total_tokens) === undefined) return usage;
  return { ...reported, prompt_tokens: reported.total_tokens };
}

/** The usage object to answer an embeddings client with: the metered input tokens, as answeredUsage does for chat. */
export function answeredEmbeddingUsage(tokens: Tokens): CreateEmbeddingResponse["usage"] {
  const input = Number(tokens.inputTokens);
  return { prompt_tokens: input, total_tokens: input };
}

/** Usage as the Responses API reports it. */
export interface ResponsesUsage {
  input_tokens: number;
  input_tokens_details: { cached_tokens: number };
  output_tokens: number;
  output_tokens_details: { reasoning_tokens: number };
  total_tokens: number;
}

/** A Responses API usage object in chat's shape, which meteredUsage and answeredUsage read. */
export function responsesUsageAsChat(usage: unknown): unknown {
  if (typeof usage !== "object" || usage === null) return undefined;
  const { input_tokens, output_tokens, total_tokens, input_tokens_details, output_tokens_details } = usage as Record<
    string,
    unknown
  >;
  return {
    prompt_tokens: input_tokens,
    completion_tokens: output_tokens,
    total_tokens,
    prompt_tokens_details: input_tokens_details,
    completion_tokens_details: output_tokens_details,
  };
}

/** The usage object to answer a Responses API client with: the metered counts, in that API's shape. */
export function answeredResponsesUsage(usage: unknown, tokens: Tokens): ResponsesUsage {
  const answered = answeredUsage(responsesUsageAsChat(usage), tokens);
  return {
    input_tokens: answered.prompt_tokens,
    input_tokens_details: { cached_tokens: Number(tokens.cachedInputTokens) },
    output_tokens: answered.completion_tokens,
    output_tokens_details: { reasoning_tokens: Number(tokens.reasoningTokens) },
    total_tokens: answered.prompt_tokens + answered.completion_tokens,
  };
}

/**
 * Adds the generated text of a response's output items to `output` (everything the model wrote: messages, refusals,
 * tool calls, reasoning) and the reasoning alone to `reasoning`.
 */
export function addResponseOutput(output: string[], reasoning: string[], items: unknown): void {
  if (!Array.isArray(items)) return;
  const add = (pieces: string[], text: unknown) => {
    if (typeof text === "string" && text) pieces.push(text);
  };
  for (const item of items) {
    const { type, content, summary, name, arguments: args, input } = record(item);
    if (type === "reasoning") {
      for (const part of [...(Array.isArray(summary) ? summary : []), ...(Array.isArray(content) ? content : [])]) {
        add(output, record(part).text);
        add(reasoning, record(part).text);
      }
      continue;
    }
    if (Array.isArray(content)) for (const part of content) add(output, record(part).text ?? record(part).refusal);
    for (const text of [name, args, input]) add(output, text);
  }
}

/** Roughly one token per four characters, as OpenAI's rule of thumb: the mock provider's deterministic tokenizer. */
export function approxTokens(text: string): number {
  return Math.ceil(text.length / 4);
}

/** Plain text of a message: its string content or the text of its parts. */
export function messageText(message: ChatCompletionMessageParam): string {
  const content = message.content;
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  let text = "";
  for (const part of content) if (part.type === "text") text += part.text;
  return text;
}

// Per-message framing tokens, as OpenAI's chat format adds them.
const tokensPerMessage = 4;

/** Input tokens of a request by approxTokens. */
export function approxInputTokens(messages: readonly ChatCompletionMessageParam[]): number {
  let tokens = 3;
  for (const m of messages) tokens += tokensPerMessage + approxTokens(messageText(m));
  return tokens;
}

/**
 * The events of a streamed response made from the response whole, in the order OpenAI streams them: created and in
 * progress, then each output item added, the text of each of its parts (or a call's arguments) as the deltas `pieces`
 * cuts it into (all of it at once by default), and done, and last the event of its status (`response.completed`,
 * `.incomplete` or `.failed`) with the whole response. The mock streams its answers so, and a server that answers a
 * streamed request whole is relayed so.
 */
export async function* responseEvents(
  response: ResponseObject,
  pieces: (text: string) => AsyncIterable<string> | Iterable<string> = (text) => (text ? [text] : []),
): ResponseEventStream {
  let sequence = 0;
  const event = (type: string, fields: Record<string, unknown>): ResponseEvent => ({
    type,
    sequence_number: sequence++,
    ...fields,
  });
  const started = { ...response, status: "in_progress", output: [], usage: null, incomplete_details: null };
  yield event("response.created", { response: started });
  yield event("response.in_progress", { response: started });
  const output: unknown[] = Array.isArray(response.output) ? response.output : [];
  for (const [output_index, item] of output.entries()) {
    const { id, type, arguments: args, content } = record(item);
    const at = { item_id: id, output_index };
    const begun = { ...record(item), status: "in_progress" };
    if (type === "function_call" && typeof args === "string") {
      yield event("response.output_item.added", { output_index, item: { ...begun, arguments: "" } });
      for await (const delta of pieces(args)) yield event("response.function_call_arguments.delta", { ...at, delta });
      yield event("response.function_call_arguments.done", { ...at, arguments: args });
    } else if (type === "message" && Array.isArray(content)) {
      yield event("response.output_item.added", { output_index, item: { ...begun, content: [] } });
      for (const [content_index, part] of content.entries()) {
        // Text (output_text) or a refusal, each with its own events; the text's carry its log probabilities, if asked.
        const refusal = record(part).type === "refusal";
        const field = refusal ? "refusal" : "text";
        const kind = refusal ? "response.refusal" : "response.output_text";
        const whole = record(part)[field];
        const text = typeof whole === "string" ? whole : "";
        const logprobs = refusal ? {} : { logprobs: [] };
        yield event("response.content_part.added", { ...at, content_index, part: { ...record(part), [field]: "" } });
        for await (const delta of pieces(text)) {
          yield event(`${kind}.delta`, { ...at, content_index, delta, ...logprobs });
        }
        yield event(`${kind}.done`, { ...at, content_index, [field]: text, ...logprobs });
        yield event("response.content_part.done", { ...at, content_index, part });
      }
    } else yield event("response.output_item.added", { output_index, item });
    yield event("response.output_item.done", { output_index, item });
  }
  const status = response.status;
  const terminal = status === "incomplete" || status === "failed" ? `response.${status}` : "response.completed";
  yield event(terminal, { response });
}
