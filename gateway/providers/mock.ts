import type { ChatCompletion } from "openai/resources/chat/completions";
import type { MockProviderConfig } from "../config.ts";
import {
  approxInputTokens,
  approxTokens,
  type CallOptions,
  type ChatRequest,
  type ChatResult,
  messageText,
  type Provider,
  UpstreamError,
} from "./provider.ts";

/**
 * An offline upstream whose replies and usage follow from the request alone: it echoes the last
 * user message, counts one token per four characters, honours max_tokens, and waits latency_ms.
 */
export function createMockProvider(config: Pick<MockProviderConfig, "name" | "latency_ms">): Provider {
  const latencyMs = config.latency_ms;
  return {
    name: config.name,
    kind: "mock",
    async chat(request: ChatRequest, options: CallOptions): Promise<ChatResult> {
      if (latencyMs > 0) await wait(Math.min(latencyMs, options.timeoutMs), options.signal);
      if (latencyMs > options.timeoutMs) {
        throw new UpstreamError("timeout", `mock upstream took longer than ${options.timeoutMs} ms`);
      }
      let prompt = "";
      for (let i = request.messages.length - 1; i >= 0; i--) {
        const m = request.messages[i];
        if (m?.role === "user") {
          prompt = messageText(m);
          break;
        }
      }
      let content = `mock reply: ${prompt}`;
      let finishReason: "stop" | "length" = "stop";
      const limit = request.max_completion_tokens ?? request.max_tokens;
      if (limit != null && approxTokens(content) > limit) {
        content = content.slice(0, limit * 4);
        finishReason = "length";
      }
      const n = request.n ?? 1;
      const inputTokens = approxInputTokens(request.messages);
      const outputTokens = approxTokens(content) * n;
      const choices: ChatCompletion["choices"] = [];
      for (let index = 0; index < n; index++) {
        choices.push({
          index,
          message: { role: "assistant", content, refusal: null },
          finish_reason: finishReason,
          logprobs: null,
        });
      }
      const completion: ChatCompletion = {
        id: `chatcmpl-mock-${fnv1a(content)}`,
        object: "chat.completion",
        created: Math.floor(Date.now() / 1000),
        model: request.model,
        choices,
        usage: { prompt_tokens: inputTokens, completion_tokens: outputTokens, total_tokens: inputTokens + outputTokens },
      };
      return {
        completion,
        tokens: {
          inputTokens: BigInt(inputTokens),
          cachedInputTokens: 0n,
          outputTokens: BigInt(outputTokens),
          reasoningTokens: 0n,
        },
        usageEstimated: false,
      };
    },
  };
}

function wait(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new UpstreamError("cancelled", "client went away"));
    const onAbort = () => {
      clearTimeout(timer);
      reject(new UpstreamError("cancelled", "client went away"));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** 32-bit FNV-1a as 8 hex digits: a stable id for identical replies. */
function fnv1a(text: string): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0).toString(16).padStart(8, "0");
}
