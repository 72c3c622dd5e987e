import type { MeteredStream, StreamMetering } from "./chat-stream.ts";
import { meteredFrame } from "./chat-stream.ts";
import { clientGone, type GatewayError, upstreamFailed } from "./errors.ts";
import { meteredName, withLostInput } from "./metering.ts";
import {
  answeredResponsesUsage,
  type MeteredTokens,
  type ResponseEvent,
  type ResponseEventStream,
  responsesUsageAsChat,
  terminalResponseEvents,
  UpstreamError,
} from "./providers/provider.ts";
import type { ResponsesPrompt } from "./responses-request.ts";
import { countResponsesInputTokens } from "./tokenizer.ts";

/** A streamed response: the upstream's events, the terminal one's usage the metered counts. */
export type ResponseStream = MeteredStream<ResponseEvent>;

export interface ResponseMeterOptions extends StreamMetering {
  events: ResponseEventStream;
  /** What the model reads of the request, for a count when the upstream reports no usage. */
  prompt: ResponsesPrompt;
  /** The upstream model, in whose encoding a count is made. */
  model: string | undefined;
}

/** Deltas of generated text, by event type: each adds to the output, reasoning ones to the reasoning too. */
const outputDeltas = new Set([
  "response.output_text.delta",
  "response.refusal.delta",
  "response.function_call_arguments.delta",
  "response.custom_tool_call_input.delta",
]);
const reasoningDeltas = new Set(["response.reasoning_text.delta", "response.reasoning_summary_text.delta"]);

/**
 * Wraps an upstream's response events with the gateway's accounting, as meterChatStream does chat chunks: time to
 * first token, usage from the terminal event (`response.completed`, `.incomplete` or `.failed`) or else counted with
 * the tokenizer (also for what was streamed before a cancel or failure), exact cost, and the call's metrics when it ends.
 * A `response.failed` is passed on as it came and metered as the upstream's failure.
 */
export function meterResponseStream(options: ResponseMeterOptions): ResponseStream {
  const { call, prompt } = options;
  const m = call.metrics;
  const upstream = options.events[Symbol.asyncIterator]();
  let usage: unknown;
  let servedTier: unknown;

  const { noteGenerated, count, fail, close, stream } = meteredFrame({
    ...options,
    upstream,
    // Nothing is read after the terminal event, which carries the usage.
    settle: async () => {},
    usage: () => responsesUsageAsChat(usage),
    countInput: () => countResponsesInputTokens(prompt, options.model),
    servedTier: () => servedTier,
  });

  async function* run(): AsyncGenerator<ResponseEvent> {
    let error: GatewayError | undefined;
    let counted: MeteredTokens | undefined;
    let modelNamed = false;
    try {
      for (;;) {
        // The wait for the upstream's next event is the call's time on the upstream (see meterChatStream).
        const waited = performance.now();
        let step: IteratorResult<ResponseEvent>;
        try {
          step = await upstream.next();
        } finally {
          call.upstreamMs += performance.now() - waited;
        }
        if (step.done) break;
        const event = step.value;
        const response = event.response as Record<string, unknown> | undefined;
        if (response && typeof response === "object") {
          if (typeof response.id === "string" && !call.response) call.response = { id: response.id, finishReasons: [] };
          // The first model the upstream names, in place of the target's configured one routing noted.
          if (typeof response.model === "string" && response.model && !modelNamed) {
            m.servedModel = meteredName(response.model);
            modelNamed = true;
          }
          if (typeof response.service_tier === "string") servedTier = response.service_tier;
        }
        const delta = typeof event.delta === "string" ? event.delta : undefined;
        if (delta && (outputDeltas.has(event.type) || reasoningDeltas.has(event.type))) {
          noteGenerated(reasoningDeltas.has(event.type) ? { reasoning: delta } : { content: delta });
        }
        if (terminalResponseEvents.has(event.type) && response) {
          usage = response.usage;
          call.response?.finishReasons.push(String(response.status ?? event.type.slice("response.".length)));
          counted = await count();
          // The client is shown what it is charged for, as chat's usage chunk shows it.
          response.usage = answeredResponsesUsage(usage, withLostInput(counted.tokens, call.lostInputTokens));
          // Once output has begun, a failed response is the upstream's failure, whatever its error says.
          if (event.type === "response.failed") {
            error = upstreamFailed(`The upstream of \`${m.requestedModel}\` failed the response.`);
          }
          yield event;
          break;
        }
        yield event;
      }
      if (!counted) {
        const cut = new UpstreamError("transient", "the stream ended before it finished");
        throw Object.assign(cut, { promptTaken: true });
      }
      if (call.signal?.aborted) error = clientGone(call.signal);
    } catch (e) {
      error = fail(e);
      throw error;
    } finally {
      await close(error, counted);
    }
  }

  return stream(run());
}
