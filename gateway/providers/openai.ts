import OpenAI, { APIConnectionError, APIConnectionTimeoutError, APIError, APIUserAbortError, AzureOpenAI } from "openai";
import type { AzureProviderConfig, OpenAIProviderConfig } from "../config.ts";
import {
  approxInputTokens,
  approxTokens,
  type CallOptions,
  type ChatRequest,
  type ChatResult,
  failureOfStatus,
  type Provider,
  tokensFromUsage,
  UpstreamError,
} from "./provider.ts";

/**
 * OpenAI, Azure OpenAI or any OpenAI-compatible URL through the official SDK. The gateway owns
 * retries and timeouts, so the SDK's own retries are off. `apiKey` is undefined when the provider's
 * key variable is unset: every call then fails as misconfigured and routing moves on.
 */
export function createOpenAIProvider(config: OpenAIProviderConfig | AzureProviderConfig, apiKey: string | undefined): Provider {
  const missingKey = config.api_key_env !== undefined && !apiKey;
  // Explicit nulls keep the SDK from reading OPENAI_* variables behind the config's back.
  const common = { maxRetries: 0, organization: null, project: null, webhookSecret: null } as const;
  const client =
    missingKey
      ? undefined
      : config.kind === "azure"
        ? new AzureOpenAI({ ...common, endpoint: config.base_url, apiKey, apiVersion: config.api_version })
        : new OpenAI({
            ...common,
            adminAPIKey: null,
            baseURL: config.base_url ?? "https://api.openai.com/v1",
            // The SDK insists on a key; upstreams configured without one (local servers) ignore it.
            apiKey: apiKey ?? "unused",
            defaultHeaders: config.headers,
          });

  return {
    name: config.name,
    kind: config.kind,
    async chat(request: ChatRequest, options: CallOptions): Promise<ChatResult> {
      if (!client) {
        throw new UpstreamError("misconfigured", `provider ${config.name}: ${config.api_key_env} is not set`);
      }
      let completion;
      try {
        completion = await client.chat.completions.create(request, {
          signal: options.signal,
          timeout: options.timeoutMs,
          maxRetries: 0,
        });
      } catch (e) {
        throw upstreamError(config.name, e);
      }
      const tokens = tokensFromUsage(completion.usage);
      if (tokens) return { completion, tokens, usageEstimated: false };
      let outputTokens = 0;
      for (const c of completion.choices) outputTokens += approxTokens(c.message.content ?? "");
      return {
        completion,
        tokens: {
          inputTokens: BigInt(approxInputTokens(request.messages)),
          cachedInputTokens: 0n,
          outputTokens: BigInt(outputTokens),
          reasoningTokens: 0n,
        },
        usageEstimated: true,
      };
    },
  };
}

function upstreamError(provider: string, e: unknown): UpstreamError {
  if (e instanceof APIUserAbortError) return new UpstreamError("cancelled", `${provider}: request aborted`);
  if (e instanceof APIConnectionTimeoutError) return new UpstreamError("timeout", `${provider}: timed out`);
  if (e instanceof APIConnectionError) return new UpstreamError("transient", `${provider}: ${e.message}`);
  if (e instanceof APIError && e.status !== undefined) {
    return new UpstreamError(failureOfStatus(e.status), `${provider} answered ${e.status}: ${e.message}`, e.status);
  }
  return new UpstreamError("transient", `${provider}: ${(e as Error).message ?? String(e)}`);
}
