import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { CompletionUsage } from "openai/resources/completions";
import type { Logger } from "../lib/log.ts";
import type { Price, Tokens } from "../lib/money.ts";
import type { Call } from "./core.ts";
import {
  clientGone,
  ShutdownCut,
  type GatewayError,
  toGatewayError,
  upstreamFailed,
  upstreamRejected,
  upstreamTimeout,
} from "./errors.ts";
import {
  type ChatCompletionChunk,
  type ChatRequest,
  type ChunkStream,
  type MeteredTokens,
  meteredUsage,
  UpstreamError,
  answeredUsage,
  laterUsage,
  usageOfTokens,
} from "./providers/provider.ts";
import { clientAudio } from "./response-ids.ts";
import { meteredName, meterUsage, withLostInput } from "./metering.ts";
import { countInputTokens, type Generated, generatedText } from "./tokenizer.ts";

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
 * A streamed answer as the client sees it: its events, the call's metrics recorded exactly once, when the stream ends:
 * iterated to the end, stopped early (`return()`, also before the first event), or, while nobody is reading it, when
 * the client leaves or the deadline passes.
 */
export interface MeteredStream<T> extends AsyncIterable<T> {
  /** Set once the stream has been metered. */
  readonly outcome: StreamOutcome | undefined;
  /**
   * Aborted when the stream ends while its consumer holds an event (the client left or the deadline passed): what the
   * consumer is still writing is owed to nobody, so its transport should end the response rather than finish the write.
   */
  readonly cutOff: AbortSignal;
}

/** A streamed completion: OpenAI chunks, ending with a usage chunk only when the client asked for one. */
export type ChatStream = MeteredStream<ChatCompletionChunk>;

/** What a streamed answer's meter takes of its call, whatever its events (see streamUpstream in core.ts). */
export interface StreamMetering {
  call: Call;
  /** What the request is billed at, unless the stream names the service tier that served it: */
  price: Price;
  /** the price of that tier. */
  servedPrice?: (tier: unknown) => Price;
  /** Aborted, with the GatewayError as its reason, when the request runs past its time limit. */
  deadline: AbortSignal;
  /** Records the call's metrics. */
  finish(call: Call, error?: GatewayError): void;
  /** Hears how the stream ended (completed, or the error its client was given), before the metrics are recorded. */
  upstreamEnded?(error: GatewayError | undefined): void;
  /** Hears the upstream's own account of a failure the client is told about in the gateway's words. */
  log?: Logger;
}

/** What a metered stream's frame needs of its kind of stream (chat chunks, response events). */
export interface FrameOptions extends StreamMetering {
  upstream: AsyncIterator<unknown>;
  /** Reads what is left of the upstream before an end not yet counted, for its usage; may do nothing. */
  settle(): Promise<void>;
  /** The usage the upstream reported, in chat's shape, if it has reported one. */
  usage(): unknown;
  /** Counts the request's input tokens, for an upstream that reports no usage. */
  countInput(): Promise<number>;
  /** The upstream model, in whose encoding what it generates is counted. */
  model: string | undefined;
  /** The service tier the stream says served the request, if it has named one. */
  servedTier(): unknown;
}

/**
 * The accounting every streamed answer shares, whatever its events: its generated text and first token
 * (`noteGenerated`), what it used (`count`), its failures in its client's words (`fail`), the call's metrics recorded
 * exactly once (`end`, by `close` or whichever way the stream ends first), a stream nobody is reading ended when its
 * client leaves or its deadline passes, and `cutOff` aborted when it ends while its consumer holds an event. `stream`
 * wraps the generator of its events.
 */
export function meteredFrame(options: FrameOptions) {
  const { call, deadline, upstream } = options;
  const m = call.metrics;
  let outcome: StreamOutcome | undefined;
  let ending: Promise<void> | undefined;
  const cutOff = new AbortController();
  /**
   * Who holds the stream: nobody has asked for an event yet ("idle"), the generator is running
   * ("running"), the consumer holds an event ("yielded"), or it is over ("done").
   */
  let phase: "idle" | "running" | "yielded" | "done" = "idle";
  // Generated text, as far as a count needs it, kept only to count tokens when the upstream reports no usage.
  const text = generatedText(options.model);
  let firstToken = true;

  /** Adds a delta's generated text (of its choice); the first that has any is the call's first token. */
  const noteGenerated = (delta: Generated, choice?: number) => {
    if (!text.add(delta, choice) || !firstToken) return;
    firstToken = false;
    const elapsed = performance.now() - call.startTick;
    m.firstTokenTime = timestampFromMs(Math.round(call.startMs + elapsed));
    m.ttftUs = BigInt(Math.round(elapsed * 1000));
  };

  /** Counts what the stream used: the upstream's usage, else the tokenizer's (a count never fails, see tokenizer.ts). */
  const count = () =>
    meteredUsage(options.usage(), {
      input: () => options.countInput(),
      output: () => text.tokens(),
      reasoning: () => text.reasoningTokens(),
    });

  /** Meters the stream and records the call's metrics; whichever way the stream ends first wins. */
  const end = (error: GatewayError | undefined, counted?: MeteredTokens): Promise<void> => {
    ending ??= (async () => {
      call.signal?.removeEventListener("abort", onAbort);
      deadline.removeEventListener("abort", onAbort);
      if (!counted) await options.settle();
      // Counted if the stream ended before its usage was.
      const { tokens, estimated } = counted ?? (await count());
      const tier = options.servedTier();
      const price = tier === undefined ? options.price : (options.servedPrice?.(tier) ?? options.price);
      const cost = meterUsage(m, tokens, estimated, price, call.lostInputTokens);
      // As metered: with the prompts of lost attempts.
      const metered = { tokens: m.usage ?? tokens, costNanos: cost, usageEstimated: m.usageEstimated };
      outcome = { ...metered, provider: m.provider, error };
      options.upstreamEnded?.(error);
      options.finish(call, error);
    })();
    return ending;
  };

  // While the generator runs it sees an abort itself (the upstream and the deadline fail its read);
  // a stream nobody is reading would never notice, so it is ended here.
  function onAbort() {
    if (phase !== "idle" && phase !== "yielded") return;
    cutOff.abort();
    void end(call.signal?.aborted ? clientGone(call.signal) : toGatewayError(deadline.reason));
  }
  if (call.signal?.aborted || deadline.aborted) onAbort();
  else {
    call.signal?.addEventListener("abort", onAbort, { once: true });
    deadline.addEventListener("abort", onAbort, { once: true });
  }

  /** A failure of the stream in words for its client; the upstream's own are only logged. */
  const fail = (e: unknown): GatewayError => {
    if (e instanceof UpstreamError && e.failure !== "cancelled") {
      options.log?.warn("upstream stream failed", { request_id: call.requestId, provider: m.provider, err: e.message });
    }
    return e instanceof UpstreamError ? streamError(e, m.requestedModel, call.signal) : toGatewayError(e);
  };

  /**
   * Ends the stream as its generator stops: `counted` once complete, else with the `error` it failed with, else
   * stopped by its consumer (the client left). What it used is read (settle) and counted, and the upstream let go:
   * failed, left, or past its terminal event (the provider then lets the rest of the body end in the background);
   * `readGivenUp` when a read of it is still pending.
   */
  const close = async (
    error: GatewayError | undefined,
    counted: MeteredTokens | undefined,
    readGivenUp = false,
  ): Promise<void> => {
    if (!counted && !error) error = clientGone(call.signal);
    const ending = async () => {
      if (!counted) await options.settle();
      const released = upstream.return?.().catch(() => undefined);
      // A read given up at a cut ends once the provider lets its upstream go (usageGraceMs at most): not waited for.
      if (!readGivenUp) await released;
      await end(error, counted);
    };
    // Cut by a shutdown before it was counted, its client is told at once: what it used is read and counted meanwhile
    // (the first count loads the encoding, about a second) and metered before its metrics are recorded, so the event
    // goes out in time.
    if (call.signal?.reason instanceof ShutdownCut && !counted) void ending();
    else await ending();
  };

  const stream = <T>(events: AsyncGenerator<T>): MeteredStream<T> => {
    // Made once a stream: an async `next` made a promise and a frame more for every event.
    const stepped = (step: IteratorResult<T>) => {
      phase = step.done ? "done" : "yielded";
      return step;
    };
    const failed = (e: unknown): never => {
      phase = "done";
      throw e;
    };
    const iterator: AsyncIterableIterator<T> = {
      next() {
        phase = "running";
        return events.next().then(stepped, failed);
      },
      async return() {
        const idle = phase === "idle";
        phase = "done";
        // A generator stopped before its first step never runs its finally: end the stream here.
        if (idle) {
          await upstream.return?.().catch(() => undefined);
          await end(clientGone(call.signal));
        }
        return events.return(undefined);
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return {
      [Symbol.asyncIterator]: () => iterator,
      get outcome() {
        return outcome;
      },
      cutOff: cutOff.signal,
    };
  };
  return { noteGenerated, count, fail, close, stream };
}

export interface MeterOptions extends StreamMetering {
  chunks: ChunkStream;
  /** As sent upstream: the input of token estimates. */
  request: ChatRequest;
  /** The client asked for the usage chunk (stream_options.include_usage). */
  includeUsage: boolean;
  /** The client's id of an audio answer the upstream streams (see response-ids.ts); its own when unset. */
  audioId?: (upstreamId: string) => string;
}

/**
 * Wraps an upstream's chunk stream with the gateway's accounting: time to first token, usage from
 * the upstream's last chunk or else counted with the tokenizer (also for tokens streamed before a
 * cancel or failure), exact cost, and the call's metrics when the stream ends.
 */
export function meterChatStream(options: MeterOptions): ChatStream {
  const { call, request, includeUsage, deadline } = options;
  const m = call.metrics;
  const upstream = options.chunks[Symbol.asyncIterator]();
  let usage: CompletionUsage | undefined;
  /** The service tier the upstream's chunks say served the request. */
  let servedTier: unknown;
  // Choices the upstream has finished: once all have, generation is over and only the usage is still to come.
  const finished = new Set<number>();
  const choices = typeof request.n === "number" && request.n > 1 ? request.n : 1;
  let settling: Promise<void> | undefined;
  /** What a read ends with when the answer is given and the rest of the stream is not waited for. */
  const givenUp: IteratorResult<ChatCompletionChunk> = { done: true, value: undefined };
  let cut: Promise<IteratorResult<ChatCompletionChunk>> | undefined;
  /**
   * Resolves (to `givenUp`) once the request's time limit has passed or a shutdown has cut it: after every choice has
   * finished, the usage still to come is then not waited for (the provider would read for it up to usageGraceMs).
   */
  const cutShort = () =>
    (cut ??= new Promise((resolve) => {
      const check = () => (deadline.aborted || call.signal?.reason instanceof ShutdownCut) && resolve(givenUp);
      if (check()) return;
      deadline.addEventListener("abort", check, { once: true });
      call.signal?.addEventListener("abort", check, { once: true });
    }));
  /** Whether the client left (or its own deadline passed): a client cut by a shutdown is still there to be answered. */
  const clientLeft = () => call.signal?.aborted === true && !(call.signal.reason instanceof ShutdownCut);

  /** Takes what a chunk says of the stream's accounting: the tier that served it, its usage, its finished choices. */
  const note = (chunk: ChatCompletionChunk) => {
    if (chunk.service_tier) servedTier = chunk.service_tier;
    // Groq reports a stream's usage in its last chunk's x_groq: counted as if sent on its own, never passed on.
    const groq = (chunk as { x_groq?: { usage?: CompletionUsage } }).x_groq;
    if (groq?.usage && typeof groq.usage === "object") usage = laterUsage(usage, groq.usage);
    if (groq !== undefined) delete (chunk as { x_groq?: unknown }).x_groq;
    if (chunk.usage) usage = laterUsage(usage, chunk.usage);
    // Azure's first chunk, of prompt filter results, has no id.
    if (chunk.id && !call.response) call.response = { id: chunk.id, finishReasons: [] };
    for (const choice of chunk.choices) {
      if (!choice.finish_reason || finished.has(choice.index)) continue;
      finished.add(choice.index);
      call.response?.finishReasons.push(choice.finish_reason);
    }
  };

  /**
   * Reads the rest of a stream whose choices have all finished, for the usage the upstream bills, when the client left
   * before it came: nothing is generated any more, and the provider gives it a few seconds at most (see its relay).
   */
  const settle = async () => {
    if (finished.size < choices) return;
    settling ??= (async () => {
      try {
        for (let step = await upstream.next(); !step.done; step = await upstream.next()) note(step.value);
      } catch {
        // Cut short: what never came is counted.
      }
    })();
    await settling;
  };

  const { noteGenerated, count, fail, close, stream } = meteredFrame({
    ...options,
    upstream,
    settle,
    usage: () => usage,
    countInput: () => countInputTokens(request),
    model: request.model,
    servedTier: () => servedTier,
  });

  async function* run(): AsyncGenerator<ChatCompletionChunk> {
    let last: ChatCompletionChunk | undefined;
    let usageChunk: ChatCompletionChunk | undefined;
    // Fields of chunks of no choice held for the next chunk sent (Azure's prompt_filter_results, see below).
    let annotations: Record<string, unknown> | undefined;
    let modelNamed = false;
    let error: GatewayError | undefined;
    let counted: MeteredTokens | undefined;
    let readGivenUp = false;
    try {
      for (;;) {
        // The wait for the upstream's next chunk is the call's time on the upstream. Timed here rather than by an async
        // helper, which made a promise and a frame more for every chunk.
        const waited = performance.now();
        let step: IteratorResult<ChatCompletionChunk>;
        try {
          step = finished.size < choices ? await upstream.next() : await Promise.race([upstream.next(), cutShort()]);
          readGivenUp = step === givenUp;
        } catch (e) {
          // Every choice has finished: the answer is given, and what fails now (its time limit, an error event in
          // place of the usage) ends it as an answer. The upstream's own account is logged.
          if (finished.size < choices || clientLeft()) throw e;
          fail(e);
          step = givenUp;
        } finally {
          call.upstreamMs += performance.now() - waited;
        }
        if (step.done) break;
        const chunk = step.value;
        note(chunk);
        if (chunk.usage) {
          // The usage chunk is held to go last with the metered counts.
          if (chunk.choices.length === 0) {
            if (includeUsage) usageChunk = chunk;
            continue;
          }
          // Usage some servers put on a content chunk goes in a chunk of its own, last, as OpenAI sends it.
          if (includeUsage) usageChunk = { ...usageChunkOf(chunk), usage: chunk.usage };
        }
        // Azure's first chunk holds its prompt filter results and no choice, which OpenAI never sends a client that did
        // not ask for usage and OpenAI's own examples then fail on (`chunk.choices[0].delta`): what it says goes with
        // the next chunk instead.
        if (chunk.choices.length === 0) {
          const { id: _id, object: _object, created: _created, model: _model, choices: _, usage: _u, ...rest } = chunk;
          annotations = { ...annotations, ...rest };
          continue;
        }
        if (annotations) {
          const fields = chunk as unknown as Record<string, unknown>;
          for (const [field, value] of Object.entries(annotations)) fields[field] ??= value;
          annotations = undefined;
        }
        // Azure's later annotation chunks (its asynchronous filter's results) have an empty id, object and model.
        if (last) {
          chunk.id ||= last.id;
          chunk.object ||= last.object;
          chunk.created ||= last.created;
          chunk.model ||= last.model;
        }
        // Some servers' chunks have no id at all (OpenVINO Model Server's): the SDK's stream helper then keeps nothing
        // of a later chunk but its choices, the usage neither. The stream is given one, as OpenAI's has.
        else chunk.id ||= `chatcmpl-${call.requestId}`;
        // Chunks carry a usage field only for clients that asked for usage, null on all but the last, as OpenAI sends
        // them, whether or not the upstream's chunks carried one.
        if (includeUsage) chunk.usage = null;
        else if (chunk.usage !== undefined) chunk.usage = undefined;
        // The first model named: Azure's first chunk (its prompt filter results) names none.
        if (!modelNamed && typeof chunk.model === "string" && chunk.model) {
          m.servedModel = meteredName(chunk.model);
          modelNamed = true;
        }
        last = chunk;
        for (const choice of chunk.choices) if (choice.delta) noteGenerated(choice.delta, choice.index);
        if (options.audioId) clientAudio(chunk.choices, options.audioId);
        yield chunk;
      }
      counted = await count();
      // The client left once generation was over, and the usage was read without it.
      if (clientLeft()) {
        error = clientGone(call.signal);
        return;
      }
      // A client that asked for usage gets one usage chunk: the upstream's, its counts the metered ones (normalised, or
      // counted where it had none, with the prompts of lost attempts), or else the gateway's count.
      const shown = withLostInput(counted.tokens, call.lostInputTokens);
      if (usageChunk) {
        usageChunk.usage = answeredUsage(usage, shown);
        if (last) usageChunk.id ||= last.id;
        yield usageChunk;
      } else if (includeUsage && last) {
        yield {
          ...usageChunkOf(last),
          // Groq's usage came in x_groq, on no chunk of its own.
          usage: usage ? answeredUsage(usage, shown) : usageOfTokens(shown),
        };
      }
    } catch (e) {
      error = fail(e);
      throw error;
    } finally {
      await close(error, counted, readGivenUp);
    }
  }

  return stream(run());
}

/** The usage chunk the gateway makes for a stream, from one of its chunks: OpenAI's fields of it, with no choices. */
function usageChunkOf(chunk: ChatCompletionChunk): ChatCompletionChunk {
  const { id, created, model, service_tier, system_fingerprint } = chunk;
  const made: ChatCompletionChunk = { id, object: "chat.completion.chunk", created, model, choices: [] };
  if (service_tier !== undefined) made.service_tier = service_tier;
  if (system_fingerprint !== undefined) made.system_fingerprint = system_fingerprint;
  return made;
}

/** A failure after the stream opened, in words for the client: the upstream's own are only logged. */
function streamError(e: UpstreamError, model: string, signal: AbortSignal | undefined): GatewayError {
  if (e.failure === "cancelled") return clientGone(signal);
  if (e.failure === "timeout") return upstreamTimeout(`The upstream of \`${model}\` stalled mid-stream.`);
  // An error event naming the request's fault: the upstream's refusal, in its words, and no failure of the target.
  if (e.failure === "rejected") return upstreamRejected(model, e.status ?? 400, e.error);
  return upstreamFailed(`The upstream of \`${model}\` failed mid-stream.`);
}
