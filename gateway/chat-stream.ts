import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { CompletionUsage } from "openai/resources/completions";
import type { Price, Tokens } from "../lib/money.ts";
import type { Call } from "./core.ts";
import { cancelled, type GatewayError, toGatewayError, upstreamFailed, upstreamTimeout } from "./errors.ts";
import {
  type ChatCompletionChunk,
  type ChatRequest,
  type ChunkStream,
  tokensFromUsage,
  UpstreamError,
  usageOfTokens,
} from "./providers/provider.ts";
import { meterUsage } from "./metering.ts";
import { countInputTokens, countTextTokens, estimatedTokens } from "./tokenizer.ts";

/** Accounting of a stream, known once it has ended however it ended. */
export interface StreamOutcome {
  tokens: Tokens;
  costNanos: bigint;
  usageEstimated: boolean;
  provider: string;
  /** Why the stream stopped early; undefined when it completed. */
  error: GatewayError | undefined;
}

/**
 * A streamed completion as the client sees it: OpenAI chunks, ending with a usage chunk only when
 * the client asked for one. Iterating to the end (or stopping early) records the call's metrics once.
 */
export interface ChatStream extends AsyncIterable<ChatCompletionChunk> {
  /** Set when iteration has ended. */
  readonly outcome: StreamOutcome | undefined;
}

export interface MeterOptions {
  call: Call;
  chunks: ChunkStream;
  /** As sent upstream: the input of token estimates. */
  request: ChatRequest;
  price: Price;
  /** The client asked for the usage chunk (stream_options.include_usage). */
  includeUsage: boolean;
  /** Records the call's metrics. */
  finish(call: Call, error?: GatewayError): void;
}

/**
 * Wraps an upstream's chunk stream with the gateway's accounting: time to first token, usage from
 * the upstream's last chunk or else counted with the tokenizer (also for tokens streamed before a
 * cancel or failure), exact cost, and the call's metrics when the stream ends.
 */
export function meterChatStream(options: MeterOptions): ChatStream {
  const { call, request, includeUsage } = options;
  const m = call.metrics;
  let outcome: StreamOutcome | undefined;

  async function* run(): AsyncGenerator<ChatCompletionChunk> {
    const iterator = options.chunks[Symbol.asyncIterator]();
    // Generated text, kept only to count tokens when the upstream reports no usage.
    const generated: string[] = [];
    let usage: CompletionUsage | undefined;
    let last: ChatCompletionChunk | undefined;
    let firstToken = true;
    let error: GatewayError | undefined;
    let tokens: { value: Tokens; estimated: boolean } | undefined;

    const settle = async () => {
      const reported = tokensFromUsage(usage);
      if (reported) return { value: reported, estimated: false };
      const input = await countInputTokens(request.messages, request.tools);
      return { value: estimatedTokens(input, await countTextTokens(generated)), estimated: true };
    };

    try {
      for (;;) {
        const waited = performance.now();
        let step: IteratorResult<ChatCompletionChunk>;
        try {
          step = await iterator.next();
        } finally {
          call.upstreamMs += performance.now() - waited;
        }
        if (step.done) break;
        const chunk = step.value;
        if (chunk.usage) {
          usage = chunk.usage;
          if (!includeUsage && chunk.choices.length === 0) continue;
        }
        // Chunks carry a usage field only for clients that asked for usage, as OpenAI sends them.
        if (!includeUsage && chunk.usage !== undefined) chunk.usage = undefined;
        if (!last && chunk.model) m.servedModel = chunk.model;
        last = chunk;
        for (const choice of chunk.choices) {
          const delta = choice.delta;
          const before = generated.length;
          if (delta.content) generated.push(delta.content);
          if (delta.refusal) generated.push(delta.refusal);
          if (delta.tool_calls) {
            for (const tool of delta.tool_calls) {
              if (tool.function?.name) generated.push(tool.function.name);
              if (tool.function?.arguments) generated.push(tool.function.arguments);
            }
          }
          if (firstToken && generated.length > before) {
            firstToken = false;
            const elapsed = performance.now() - call.startTick;
            m.firstTokenTime = timestampFromMs(Math.round(call.startMs + elapsed));
            m.ttftUs = BigInt(Math.round(elapsed * 1000));
          }
        }
        yield chunk;
      }
      tokens = await settle();
      if (includeUsage && tokens.estimated && last) {
        yield { id: last.id, object: "chat.completion.chunk", created: last.created, model: last.model, choices: [], usage: usageOfTokens(tokens.value) };
      }
    } catch (e) {
      error = e instanceof UpstreamError ? streamError(e) : toGatewayError(e);
      throw error;
    } finally {
      // Stopped by the consumer (the client left) if neither completed nor failed.
      if (!tokens && !error) error = cancelled();
      if (error) await iterator.return?.().catch(() => undefined);
      // Metrics are recorded even if counting fails (the tokenizer cannot load): with zero tokens, marked estimated.
      tokens ??= await settle().catch(() => ({ value: estimatedTokens(0, 0), estimated: true }));
      const cost = meterUsage(m, tokens.value, tokens.estimated, options.price);
      outcome = { tokens: tokens.value, costNanos: cost, usageEstimated: tokens.estimated, provider: m.provider, error };
      options.finish(call, error);
    }
  }

  const chunks = run();
  return {
    [Symbol.asyncIterator]: () => chunks,
    get outcome() {
      return outcome;
    },
  };
}

function streamError(e: UpstreamError): GatewayError {
  if (e.failure === "cancelled") return cancelled();
  if (e.failure === "timeout") return upstreamTimeout(`The upstream stream stalled: ${e.message}`);
  return upstreamFailed(`The upstream stream failed: ${e.message}`);
}
