/**
 * An OpenAI-compatible upstream on a real socket whose behaviour tests script per model: replies
 * whole or streamed (SSE), with or without usage, errors with any status and Retry-After,
 * malformed JSON, delays, hangs and streams that stop short, for chat completions, embeddings and the Responses API
 * (`/v1/responses`, whole or as its named events; chat answers spoken as an `audio` object, whole or streamed; a stored response retrieved, deleted or its input items listed, each
 * scripted as the model `response:<id>`). It records every request it gets
 * and whether its client went away. Run as a script it serves fixed fast replies for benchmarks:
 *   bun gateway/testing/fake-upstream.ts [port]
 */
import type { Server } from "bun";

export interface FakeUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details?: { cached_tokens: number };
  completion_tokens_details?: { reasoning_tokens: number };
}

/** What the upstream does with one request. */
export interface Behaviour {
  /** Reply text; by default "echo: " and the last user message. */
  content?: string;
  /** Usage to report, or false for none; by default derived from the text lengths (4 chars a token). */
  usage?: FakeUsage | false;
  /** Answer with this status and an OpenAI error body instead. */
  status?: number;
  /** With `status`: fields of the OpenAI error body over the defaults, or a whole body that is not OpenAI's shape. */
  error?: { message?: string; type?: string | null; param?: string | null; code?: string | null; innererror?: unknown } | string;
  /** Refuse a request that has this field with 422, as servers that forbid extra fields do (FastAPI's `detail`). */
  rejectsField?: string;
  /** Refuse a request for base64 embeddings with 422, as a server that takes floats alone does (FastAPI's `detail`). */
  floatsOnly?: boolean;
  /** Retry-After header value sent with `status`. */
  retryAfter?: string;
  /** retry-after-ms header value (OpenAI's, in ms) sent with `status`. */
  retryAfterMs?: string;
  /** Wait this long before answering. */
  delayMs?: number;
  /** Wait this long between streamed chunks. */
  chunkDelayMs?: number;
  /** Send a body (or, streaming, a chunk) that is not JSON. */
  malformed?: boolean;
  /** Answer 200 with this body instead, whole or streamed: a proxy's HTML page, NDJSON. */
  body?: { contentType: string; text: string };
  /** Break the connection part way through the answer (streaming, before its first chunk), as a crashed server does. */
  breaksOff?: boolean;
  /** Never answer: wait for the client to give up. */
  hang?: boolean;
  /** Streaming: wait this long after the headers (sent at once, with a comment) before the first chunk (a prefill). */
  firstChunkDelayMs?: number;
  /** Streaming: send this event (an error, say) first, and nothing after it. */
  firstEvent?: unknown;
  /** Streaming: send this event (an error, say) after the first content chunk, and nothing after it. */
  midEvent?: unknown;
  /** Streaming: first of all a chunk as Azure sends it, of prompt filter results, with an empty object and model. */
  promptFilterChunk?: boolean;
  /**
   * Streaming: after the finish_reason chunk, one as Azure's asynchronous content filter sends it: a choice of filter
   * results and offsets without a delta, in a chunk with an empty id, object and model.
   */
  filterAnnotationChunk?: boolean;
  /** Streaming: stop after this many content chunks, without finish_reason or [DONE]. */
  cutAfterChunks?: number;
  /** Refuse with this text instead of answering (content null, or streamed as `delta.refusal`). */
  refusal?: string;
  /**
   * Answer in audio, with this upstream id: `message.audio` (the id, data, expires_at and the reply as its transcript)
   * and no content; streamed, `delta.audio` with the id and the first piece of transcript, the rest, then data and
   * expires_at with the id again.
   */
  audio?: string;
  /** Reply with this tool call instead of text. */
  toolCall?: { name: string; arguments: string };
  /** The model the reply says served it; by default the requested one with `-fake`. */
  model?: string;
  /**
   * Fields of an odd but parseable reply, set over the whole reply or every chunk: a fractional `created`, a tool
   * call's arguments as an object rather than a string, as some servers send them.
   */
  odd?: { created?: unknown; toolArguments?: unknown };
  /** The service tier the reply (every chunk) says served it; none by default. */
  serviceTier?: string;
  /** Streaming: usages sent after the usage chunk, each in a chunk of its own, as some servers end with an empty one. */
  laterUsages?: unknown[];
  /** Streaming: a usage on every content chunk, as vLLM's continuous usage stats send its running counts. */
  chunkUsages?: unknown[];
  /** Streaming: a usage in the last chunk's `x_groq`, as Groq reports it. */
  groqUsage?: unknown;
  /** Streaming: a `{"type": "ping"}` event before every other, as Anthropic's OpenAI-compatible endpoint keeps alive. */
  pings?: boolean;
  /** Streaming: end the body at once, before any chunk. */
  endsAtOnce?: boolean;
  /** Streaming: end with `data: [DONE]` and one newline (so it never dispatches) and hold the connection open. */
  doneHeldOpen?: boolean;
  /** Streaming: wait this long after the finish_reason chunk before the usage chunk. */
  usageDelayMs?: number;
  /** Streaming: reasoning text sent before the reply, word by word, in `delta[reasoningField]`. */
  reasoning?: string;
  /** The delta field reasoning goes in: `reasoning_content` (vLLM, DeepSeek) by default, or `reasoning` (OpenRouter). */
  reasoningField?: "reasoning_content" | "reasoning";
  /** Streaming asked for: answer whole, in JSON, as a server that does not stream does. */
  whole?: boolean;
  /** Embeddings: vectors in this encoding whatever the request asked, as servers that ignore encoding_format answer. */
  encoding?: "float" | "base64";
}

export interface SeenRequest {
  path: string;
  /** Of a call on a stored response: its method and query string (with its `?`). */
  method?: string;
  query?: string;
  model: string;
  body: Record<string, any>;
  headers: Record<string, string>;
  /** Arrival, performance.now() of this process. */
  at: number;
  /** The client closed the connection before the reply was complete. */
  aborted: boolean;
}

export interface FakeUpstream {
  /** Base URL for an OpenAI client: http://127.0.0.1:port/v1 */
  readonly url: string;
  readonly requests: SeenRequest[];
  /** Requests for `model` get these behaviours in turn; the last one repeats. */
  script(model: string, ...behaviours: Behaviour[]): void;
  /** Requests seen for one model. */
  seen(model: string): SeenRequest[];
  reset(): void;
  stop(): Promise<void>;
}

const encoder = new TextEncoder();

export function startFakeUpstream(options: { port?: number; record?: boolean } = {}): FakeUpstream {
  const record = options.record ?? true;
  const scripts = new Map<string, Behaviour[]>();
  const requests: SeenRequest[] = [];

  const behaviourFor = (model: string): Behaviour => {
    const queue = scripts.get(model);
    if (!queue || queue.length === 0) return {};
    return (queue.length > 1 ? queue.shift() : queue[0]) as Behaviour;
  };

  const server: Server<undefined> = Bun.serve({
    port: options.port ?? 0,
    hostname: "127.0.0.1",
    idleTimeout: 0,
    async fetch(req) {
      const path = new URL(req.url).pathname;
      if (req.method === "GET" && path === "/v1/models") return Response.json({ object: "list", data: [] });
      const storedCall = /^\/v1\/responses\/([^/]+)(\/input_items)?$/.exec(path);
      if (storedCall && (req.method === "GET" || req.method === "DELETE")) {
        const id = decodeURIComponent(storedCall[1] as string);
        const model = `response:${id}`;
        const query = new URL(req.url).search;
        if (record) requests.push({ path, method: req.method, query, model, body: {}, headers: Object.fromEntries(req.headers), at: performance.now(), aborted: false });
        const b = behaviourFor(model);
        if (b.delayMs) await Bun.sleep(b.delayMs);
        if (b.status) {
          const error = { message: `scripted ${b.status}`, type: "invalid_request_error", param: null, code: null, ...(b.error as object) };
          const headers: Record<string, string> = b.retryAfter ? { "retry-after": b.retryAfter } : {};
          if (b.retryAfterMs) headers["retry-after-ms"] = b.retryAfterMs;
          return Response.json({ error }, { status: b.status, headers });
        }
        if (storedCall[2]) {
          const item = { id: "msg_in", type: "message", role: "user", status: "completed", content: [{ type: "input_text", text: "hi" }] };
          return Response.json({ object: "list", data: [item], first_id: "msg_in", last_id: "msg_in", has_more: false });
        }
        if (req.method === "DELETE") return Response.json({ id, object: "response", deleted: true });
        return Response.json({ ...responseOf({ model: "ok" }, b, responseText({ input: "stored" }, b), "completed"), id, previous_response_id: null });
      }
      let body: Record<string, any>;
      try {
        body = (await req.json()) as Record<string, any>;
      } catch {
        return Response.json({ error: { message: "bad json", type: "invalid_request_error" } }, { status: 400 });
      }
      const model = String(body.model);
      if (record) {
        const seen: SeenRequest = { path, model, body, headers: Object.fromEntries(req.headers), at: performance.now(), aborted: false };
        requests.push(seen);
        req.signal.addEventListener("abort", () => (seen.aborted = true), { once: true });
      }
      const b = behaviourFor(model);
      if (b.delayMs) await Bun.sleep(b.delayMs);
      if (b.hang) {
        await new Promise((resolve) => req.signal.addEventListener("abort", resolve, { once: true }));
        return new Response(null, { status: 204 });
      }
      // A dotted path names a field inside another: stream_options.include_obfuscation.
      const fieldPath = b.rejectsField?.split(".") ?? [];
      let holder: any = body;
      for (const part of fieldPath.slice(0, -1)) holder = holder?.[part];
      if (b.rejectsField !== undefined && typeof holder === "object" && holder !== null && (fieldPath.at(-1) as string) in holder) {
        const detail = [{ loc: ["body", ...fieldPath], msg: "extra fields not permitted", type: "value_error.extra" }];
        return Response.json({ detail }, { status: 422 });
      }
      if (b.floatsOnly && body.encoding_format === "base64") {
        const detail = [{ loc: ["body", "encoding_format"], msg: "unexpected value; permitted: 'float'", type: "value_error.const" }];
        return Response.json({ detail }, { status: 422 });
      }
      if (b.status) {
        const headers: Record<string, string> = b.retryAfter ? { "retry-after": b.retryAfter } : {};
        if (b.retryAfterMs) headers["retry-after-ms"] = b.retryAfterMs;
        if (typeof b.error === "string") return new Response(b.error, { status: b.status, headers });
        const error = { message: `scripted ${b.status}`, type: b.status === 429 ? "rate_limit_error" : "api_error", param: null, code: null, ...b.error };
        return Response.json({ error }, { status: b.status, headers });
      }
      if (b.body) return answered(b.body.text, b.body.contentType, b.breaksOff);
      if (path === "/v1/embeddings") return embeddings(body, b);
      const streamed = body.stream === true && !b.whole;
      if (path === "/v1/responses") return streamed ? responseStream(body, b, req.signal) : response(body, b);
      if (path !== "/v1/chat/completions") return new Response("not found", { status: 404 });
      return streamed ? stream(body, b, req.signal) : completion(body, b);
    },
  });

  return {
    url: `http://127.0.0.1:${server.port}/v1`,
    requests,
    script(model, ...behaviours) {
      scripts.set(model, behaviours);
    },
    seen: (model) => requests.filter((r) => r.model === model),
    reset() {
      scripts.clear();
      requests.length = 0;
    },
    stop: () => server.stop(true),
  };
}

function replyText(body: Record<string, any>, b: Behaviour): string {
  if (b.content !== undefined) return b.content;
  const messages = Array.isArray(body.messages) ? body.messages : [];
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i];
    if (m?.role !== "user") continue;
    const text = typeof m.content === "string" ? m.content : Array.isArray(m.content) ? m.content.map((p: any) => p.text ?? "").join("") : "";
    return `echo: ${text}`;
  }
  return "echo:";
}

function usageOf(body: Record<string, any>, text: string, b: Behaviour): FakeUsage | undefined {
  if (b.usage === false) return undefined;
  if (b.usage) return b.usage;
  const prompt = Math.ceil(JSON.stringify(body.messages ?? body.input ?? "").length / 4);
  const completion = Math.ceil(text.length / 4);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

function toolCalls(b: Behaviour) {
  if (!b.toolCall) return undefined;
  const { name, arguments: args } = b.toolCall;
  return [{ id: "call_fake_1", type: "function", function: { name, arguments: b.odd?.toolArguments ?? args } }];
}

function completion(body: Record<string, any>, b: Behaviour): Response {
  if (b.malformed) return new Response('{"id": "chatcmpl-fake", "choices": [', { headers: { "content-type": "application/json" } });
  const text = b.toolCall ? "" : (b.refusal ?? replyText(body, b));
  const usage = usageOf(body, b.toolCall ? b.toolCall.arguments : text, b);
  const content = b.toolCall || b.refusal !== undefined || b.audio ? null : text;
  const audio = b.audio ? { audio: { id: b.audio, data: fakeAudioData, expires_at: 1_700_003_600, transcript: text } } : {};
  const reply = {
    id: "chatcmpl-fake",
    object: "chat.completion",
    created: b.odd?.created ?? 1_700_000_000,
    ...(b.serviceTier ? { service_tier: b.serviceTier } : {}),
    model: b.model ?? `${body.model}-fake`,
    choices: [
      {
        index: 0,
        message: { role: "assistant", content, refusal: b.refusal ?? null, tool_calls: toolCalls(b), ...audio },
        finish_reason: b.toolCall ? "tool_calls" : "stop",
        logprobs: null,
      },
    ],
    ...(usage ? { usage } : {}),
  };
  return b.breaksOff ? answered(JSON.stringify(reply), "application/json", true) : Response.json(reply);
}

/** The base64 of a few bytes of WAV header: what an audio answer's `data` holds here. */
const fakeAudioData = "UklGRiQAAABXQVZF";

/** A 200 of `text`, or, when it breaks off, of its first half and then a broken connection. */
function answered(text: string, contentType: string, breaksOff = false): Response {
  const headers = { "content-type": contentType };
  if (!breaksOff) return new Response(text, { headers });
  return new Response(
    new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(encoder.encode(text.slice(0, Math.ceil(text.length / 2))));
        await Bun.sleep(20);
        controller.error();
      },
    }),
    { headers },
  );
}

/** Text pieces as a model streams them: words with their leading space. */
function pieces(text: string): string[] {
  return text.match(/\s*\S+/g) ?? [text];
}

function stream(body: Record<string, any>, b: Behaviour, signal: AbortSignal): Response {
  const text = b.toolCall ? "" : (b.refusal ?? replyText(body, b));
  const usage = usageOf(body, b.toolCall ? b.toolCall.arguments : text, b);
  const wantsUsage = body.stream_options?.include_usage === true;
  const base = {
    id: "chatcmpl-fake",
    object: "chat.completion.chunk",
    created: b.odd?.created ?? 1_700_000_000,
    ...(b.serviceTier ? { service_tier: b.serviceTier } : {}),
    model: b.model ?? `${body.model}-fake`,
  };
  const ping = b.pings ? 'data: {"type": "ping"}\n\n' : "";
  const event = (value: unknown) => encoder.encode(`${ping}data: ${JSON.stringify(value)}\n\n`);
  const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
    event({ ...base, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...(wantsUsage ? { usage: null } : {}) });
  return new Response(
    new ReadableStream<Uint8Array>({
      async start(controller) {
        const pause = () => (b.chunkDelayMs ? Bun.sleep(b.chunkDelayMs) : undefined);
        // Sent once the prompt is filtered, before the model reads it.
        if (b.promptFilterChunk) {
          const filters = [{ prompt_index: 0, content_filter_results: {} }];
          controller.enqueue(event({ id: "", object: "", created: 0, model: "", choices: [], prompt_filter_results: filters }));
        }
        if (b.firstChunkDelayMs) {
          controller.enqueue(encoder.encode(": prefill\n\n"));
          await Bun.sleep(b.firstChunkDelayMs);
        }
        if (signal.aborted) return;
        if (b.endsAtOnce) {
          controller.close();
          return;
        }
        if (b.breaksOff) {
          controller.enqueue(encoder.encode(": prefill\n\n"));
          await Bun.sleep(20);
          controller.error();
          return;
        }
        if (b.firstEvent !== undefined) {
          controller.enqueue(event(b.firstEvent));
          controller.close();
          return;
        }
        controller.enqueue(chunk({ role: "assistant", content: "" }));
        if (b.toolCall) {
          controller.enqueue(chunk({ tool_calls: [{ index: 0, id: "call_fake_1", type: "function", function: { name: b.toolCall.name, arguments: "" } }] }));
          controller.enqueue(
            chunk({ tool_calls: [{ index: 0, function: { arguments: b.odd?.toolArguments ?? b.toolCall.arguments } }] }),
          );
        }
        for (const thought of b.reasoning === undefined ? [] : pieces(b.reasoning)) {
          await pause();
          if (signal.aborted) return;
          controller.enqueue(chunk({ [b.reasoningField ?? "reasoning_content"]: thought }));
        }
        let sent = 0;
        for (const content of b.toolCall ? [] : pieces(text)) {
          await pause();
          if (signal.aborted) return;
          if (b.malformed && sent === 1) {
            controller.enqueue(encoder.encode("data: {not json\n\n"));
            controller.close();
            return;
          }
          if (b.midEvent !== undefined && sent === 1) {
            controller.enqueue(event(b.midEvent));
            controller.close();
            return;
          }
          if (b.cutAfterChunks !== undefined && sent >= b.cutAfterChunks) {
            controller.close();
            return;
          }
          const running = b.chunkUsages?.[sent];
          const spoken = sent === 0 ? { id: b.audio, transcript: content } : { transcript: content };
          const delta = b.refusal !== undefined ? { refusal: content } : b.audio ? { audio: spoken } : { content };
          controller.enqueue(running === undefined ? chunk(delta) : event({ ...base, choices: [{ index: 0, delta, finish_reason: null }], usage: running }));
          sent++;
        }
        if (b.audio) controller.enqueue(chunk({ audio: { id: b.audio, data: fakeAudioData, expires_at: 1_700_003_600 } }));
        await pause();
        if (signal.aborted) return;
        const stop = b.toolCall ? "tool_calls" : "stop";
        if (b.groqUsage === undefined) controller.enqueue(chunk({}, stop));
        else controller.enqueue(event({ ...base, choices: [{ index: 0, delta: {}, finish_reason: stop }], x_groq: { usage: b.groqUsage } }));
        if (b.filterAnnotationChunk) {
          const results = { hate: { filtered: false, severity: "safe" } };
          const offsets = { check_offset: 0, start_offset: 0, end_offset: text.length };
          const annotation = { index: 0, finish_reason: null, content_filter_results: results, content_filter_offsets: offsets };
          controller.enqueue(event({ id: "", object: "", created: 0, model: "", choices: [annotation] }));
        }
        if (b.usageDelayMs) await Bun.sleep(b.usageDelayMs);
        if (signal.aborted) return;
        if (wantsUsage && usage) controller.enqueue(event({ ...base, choices: [], usage }));
        for (const later of b.laterUsages ?? []) controller.enqueue(event({ ...base, choices: [], usage: later }));
        if (b.doneHeldOpen) {
          controller.enqueue(encoder.encode("data: [DONE]\n"));
          await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
          return;
        }
        controller.enqueue(encoder.encode("data: [DONE]\n\n"));
        controller.close();
      },
    }),
    { headers: { "content-type": "text/event-stream" } },
  );
}

/** The Responses API's reply text: by default "echo: " and the input string or the last user item's text. */
function responseText(body: Record<string, any>, b: Behaviour): string {
  if (b.content !== undefined) return b.content;
  if (typeof body.input === "string") return `echo: ${body.input}`;
  return replyText({ messages: body.input }, b);
}

/** A usage in the Responses API's shape, from the chat-shaped one a behaviour scripts. */
function responsesUsage(usage: FakeUsage | undefined) {
  if (!usage) return undefined;
  return {
    input_tokens: usage.prompt_tokens,
    input_tokens_details: { cached_tokens: usage.prompt_tokens_details?.cached_tokens ?? 0 },
    output_tokens: usage.completion_tokens,
    output_tokens_details: { reasoning_tokens: usage.completion_tokens_details?.reasoning_tokens ?? 0 },
    total_tokens: usage.total_tokens,
  };
}

function responseOf(body: Record<string, any>, b: Behaviour, text: string, status: string) {
  const message = { type: "message", id: "msg_fake", status, role: "assistant", content: [{ type: "output_text", text, annotations: [] }] };
  const usage = status === "completed" ? responsesUsage(usageOf(body, text, b)) : undefined;
  return {
    id: "resp_fake",
    object: "response",
    created_at: 1_700_000_000,
    status,
    error: null,
    incomplete_details: null,
    model: b.model ?? `${body.model}-fake`,
    output: status === "completed" ? [message] : [],
    previous_response_id: body.previous_response_id ?? null,
    ...(b.serviceTier ? { service_tier: b.serviceTier } : {}),
    usage: usage ?? null,
  };
}

function response(body: Record<string, any>, b: Behaviour): Response {
  if (b.malformed) return new Response('{"id": "resp_fake", "output": [', { headers: { "content-type": "application/json" } });
  const reply = responseOf(body, b, responseText(body, b), "completed");
  return b.breaksOff ? answered(JSON.stringify(reply), "application/json", true) : Response.json(reply);
}

/** A streamed response: created, in progress, the message's text a word an event, done, completed with usage. */
function responseStream(body: Record<string, any>, b: Behaviour, signal: AbortSignal): Response {
  const text = responseText(body, b);
  let sequence = 0;
  const event = (value: Record<string, unknown>) =>
    encoder.encode(`event: ${value.type}\ndata: ${JSON.stringify({ ...value, sequence_number: sequence++ })}\n\n`);
  const started = responseOf(body, b, "", "in_progress");
  const at = { item_id: "msg_fake", output_index: 0, content_index: 0 };
  return new Response(
    new ReadableStream<Uint8Array>({
      async start(controller) {
        const pause = () => (b.chunkDelayMs ? Bun.sleep(b.chunkDelayMs) : undefined);
        if (b.breaksOff) {
          controller.enqueue(encoder.encode(": prefill\n\n"));
          await Bun.sleep(20);
          controller.error();
          return;
        }
        controller.enqueue(event({ type: "response.created", response: started }));
        controller.enqueue(event({ type: "response.in_progress", response: started }));
        if (b.firstEvent !== undefined) {
          controller.enqueue(event(b.firstEvent as Record<string, unknown>));
          controller.close();
          return;
        }
        const item = { type: "message", id: "msg_fake", status: "in_progress", role: "assistant", content: [] };
        controller.enqueue(event({ type: "response.output_item.added", output_index: 0, item }));
        controller.enqueue(event({ type: "response.content_part.added", ...at, part: { type: "output_text", text: "", annotations: [] } }));
        let sent = 0;
        for (const delta of pieces(text)) {
          await pause();
          if (signal.aborted) return;
          if (b.midEvent !== undefined && sent === 1) {
            controller.enqueue(event(b.midEvent as Record<string, unknown>));
            controller.close();
            return;
          }
          if (b.cutAfterChunks !== undefined && sent >= b.cutAfterChunks) {
            controller.close();
            return;
          }
          controller.enqueue(event({ type: "response.output_text.delta", ...at, delta, logprobs: [] }));
          sent++;
        }
        await pause();
        if (signal.aborted) return;
        controller.enqueue(event({ type: "response.output_text.done", ...at, text, logprobs: [] }));
        const done = responseOf(body, b, text, "completed");
        controller.enqueue(event({ type: "response.output_item.done", output_index: 0, item: done.output[0] }));
        controller.enqueue(event({ type: "response.completed", response: done }));
        controller.close();
      },
    }),
    { headers: { "content-type": "text/event-stream" } },
  );
}

function embeddings(body: Record<string, any>, b: Behaviour): Response {
  if (b.malformed) return new Response("{", { headers: { "content-type": "application/json" } });
  const inputs: unknown[] = typeof body.input === "string" ? [body.input] : body.input;
  const dimensions = typeof body.dimensions === "number" ? body.dimensions : 4;
  const data = inputs.map((input, index) => {
    const vector = new Float32Array(dimensions);
    for (let i = 0; i < dimensions; i++) vector[i] = (String(input).length + i) / 100;
    const embedding = (b.encoding ?? body.encoding_format) === "base64" ? Buffer.from(vector.buffer).toString("base64") : Array.from(vector);
    return { object: "embedding", index, embedding };
  });
  const tokens = Math.ceil(JSON.stringify(body.input).length / 4);
  const usage = b.usage === false ? undefined : { prompt_tokens: b.usage ? b.usage.prompt_tokens : tokens, total_tokens: b.usage ? b.usage.total_tokens : tokens };
  return Response.json({ object: "list", model: b.model ?? `${body.model}-fake`, data, ...(usage ? { usage } : {}) });
}

if (import.meta.main) {
  // Benchmarks run long: keep no history.
  const upstream = startFakeUpstream({ port: Number(process.argv[2] ?? 0), record: false });
  process.stdout.write(`${upstream.url}\n`);
}
