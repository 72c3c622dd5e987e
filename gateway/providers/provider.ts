import type {
  ChatCompletion,
  ChatCompletionCreateParamsNonStreaming,
  ChatCompletionMessageParam,
} from "openai/resources/chat/completions";
import type { CompletionUsage } from "openai/resources/completions";
import type { Tokens } from "../../lib/money.ts";

/** A validated chat request in the OpenAI wire shape; `model` is already the upstream model. */
export type ChatRequest = ChatCompletionCreateParamsNonStreaming;
export type { ChatCompletion };

export interface CallOptions {
  /** Aborted when the client goes away. */
  signal?: AbortSignal | undefined;
  /** Limit of this one attempt. */
  timeoutMs: number;
}

export interface ChatResult {
  /** As the upstream returned it (OpenAI shape). */
  completion: ChatCompletion;
  tokens: Tokens;
  /** True when the upstream reported no usage and the gateway counted the tokens. */
  usageEstimated: boolean;
}

/**
 * An upstream the gateway routes to. Streaming (`streamChat`) and embeddings (`embed`) join this
 * interface as their endpoints land; every provider reports usage in the same `Tokens` shape.
 */
export interface Provider {
  readonly name: string;
  readonly kind: "openai" | "azure" | "mock";
  /** One whole completion; fails with UpstreamError. */
  chat(request: ChatRequest, options: CallOptions): Promise<ChatResult>;
}

/**
 * How an upstream attempt failed, which decides what the gateway does next:
 * "rejected" (the upstream refused the request itself, 400/422) fails the request as the client's fault,
 * "transient" (connection, 408/409/429/5xx) and "timeout" may be retried on the same target,
 * "misconfigured" (401/403/404, missing key) moves on to the next target, "cancelled" stops.
 */
export type UpstreamFailure = "rejected" | "transient" | "timeout" | "misconfigured" | "cancelled";

export class UpstreamError extends Error {
  override name = "UpstreamError";
  constructor(
    readonly failure: UpstreamFailure,
    message: string,
    /** HTTP status the upstream answered with, when it answered. */
    readonly status?: number,
  ) {
    super(message);
  }
}

/** The failure class of an upstream HTTP status. */
export function failureOfStatus(status: number): UpstreamFailure {
  if (status === 400 || status === 422) return "rejected";
  if (status === 408 || status === 409 || status === 429 || status >= 500) return "transient";
  return "misconfigured";
}

/** Tokens from an OpenAI usage object; undefined when the upstream sent none. */
export function tokensFromUsage(usage: CompletionUsage | null | undefined): Tokens | undefined {
  if (!usage) return undefined;
  return {
    inputTokens: BigInt(usage.prompt_tokens ?? 0),
    cachedInputTokens: BigInt(usage.prompt_tokens_details?.cached_tokens ?? 0),
    outputTokens: BigInt(usage.completion_tokens ?? 0),
    reasoningTokens: BigInt(usage.completion_tokens_details?.reasoning_tokens ?? 0),
  };
}

/** Roughly one token per four characters, as OpenAI's rule of thumb; the mock's tokenizer and the fallback estimate. */
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
