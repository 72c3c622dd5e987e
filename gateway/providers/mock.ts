import type { ChatCompletion, ChatCompletionMessageToolCall } from "openai/resources/chat/completions";
import { ulid } from "ulid";
import type { Embedding } from "openai/resources/embeddings";
import type { MockProviderConfig } from "../config.ts";
import { responsesPrompt } from "../responses-request.ts";
import {
  approxInputTokens,
  approxTokens,
  type CallOptions,
  type ChatCompletionChunk,
  type ChatRequest,
  type ChatResult,
  type ChunkStream,
  type EmbeddingRequest,
  type EmbeddingResult,
  messageText,
  type Provider,
  type ResponseEvent,
  type ResponseEventStream,
  type ResponseObject,
  type ResponsesRequest,
  type ResponsesResult,
  answeredResponsesUsage,
  failureOfStatus,
  type StoredResponseRequest,
  type UpstreamErrorBody,
  UpstreamError,
  usageOfTokens,
} from "./provider.ts";

type MockConfig = Pick<MockProviderConfig, "name" | "latency_ms"> &
  Partial<Pick<MockProviderConfig, "chunk_latency_ms">>;

// Characters per streamed chunk: one mock token.
const chunkChars = 4;
const embeddingDimensions = 16;
// A reply's most tokens a choice, as a model's maximum output: n echoes of a long prompt stay about 2 MB at most.
const maxReplyTokens = 4096;
// The most values (inputs x dimensions) one embeddings response holds: about 20 MB of JSON floats.
const maxEmbeddingValues = 1 << 20;
// Responses kept for retrieval, as an upstream account stores them: the latest this many.
const maxStoredResponses = 1000;

/**
 * An offline upstream whose replies and usage follow from the request alone: it echoes the last
 * user message, counts one token per four characters, honours max_tokens, n, stop, JSON response
 * formats and a tool_choice that requires a tool call (see replyTo), waits latency_ms
 * before answering and chunk_latency_ms between streamed chunks (one token of every choice each).
 * Embeddings are unit vectors seeded by a hash of each input.
 */
export function createMockProvider(config: MockConfig): Provider {
  const latencyMs = config.latency_ms;
  const chunkLatencyMs = config.chunk_latency_ms ?? 0;
  // Each response made with `store` not false, with its input items, oldest first; copies, as callers change theirs.
  const stored = new Map<string, { response: ResponseObject; items: Record<string, unknown>[] }>();

  /** A response's answer as the mock makes it, kept when the request lets it be; refused when it continues none kept. */
  const respond = (request: ResponsesRequest) => {
    const previous = request.previous_response_id;
    if (typeof previous === "string" && !stored.has(previous)) {
      const message = `Previous response with id '${previous}' not found.`;
      throw refused(400, message, "previous_response_id", "previous_response_not_found");
    }
    const reply = responseTo(request);
    if (request.store !== false) {
      if (stored.size >= maxStoredResponses) stored.delete(stored.keys().next().value as string);
      stored.set(reply.response.id, { response: structuredClone(reply.response), items: inputItems(request) });
    }
    return reply;
  };

  const answer = async (options: CallOptions) => {
    if (latencyMs > 0) await wait(Math.min(latencyMs, options.timeoutMs), options.signal);
    if (latencyMs > options.timeoutMs) {
      throw new UpstreamError("timeout", `mock upstream took longer than ${options.timeoutMs} ms`);
    }
  };

  return {
    name: config.name,
    kind: "mock",
    async chat(request: ChatRequest, options: CallOptions): Promise<ChatResult> {
      await answer(options);
      const reply = replyTo(request);
      const choices: ChatCompletion["choices"] = [];
      for (let index = 0; index < reply.n; index++) {
        const message: ChatCompletion["choices"][number]["message"] = reply.toolCall
          ? { role: "assistant", content: null, refusal: null, tool_calls: [reply.toolCall] }
          : { role: "assistant", content: reply.content, refusal: null };
        choices.push({ index, message, finish_reason: reply.finishReason, logprobs: null });
      }
      const completion: ChatCompletion = {
        id: reply.id,
        object: "chat.completion",
        created: Math.floor(Date.now() / 1000),
        model: request.model,
        choices,
        usage: usageOfTokens(reply.tokens),
      };
      return { completion, tokens: reply.tokens, usageEstimated: false };
    },

    async streamChat(request: ChatRequest, options: CallOptions): Promise<ChunkStream> {
      await answer(options);
      const reply = replyTo(request);
      const created = Math.floor(Date.now() / 1000);
      const chunk = (
        choices: ChatCompletionChunk["choices"],
        usage: ChatCompletionChunk["usage"] = null,
      ): ChatCompletionChunk => ({
        id: reply.id,
        object: "chat.completion.chunk",
        created,
        model: request.model,
        choices,
        usage,
      });
      // Every choice advances in the same chunk, so a stream's length and pacing do not grow with n.
      const each = (
        delta: ChatCompletionChunk.Choice.Delta,
        finish: ChatCompletionChunk.Choice["finish_reason"] = null,
      ) => {
        const choices: ChatCompletionChunk["choices"] = [];
        for (let index = 0; index < reply.n; index++)
          choices.push({ index, delta, finish_reason: finish, logprobs: null });
        return chunk(choices);
      };
      const signal = options.signal;
      return (async function* () {
        const call = reply.toolCall;
        yield each(
          call
            ? {
                role: "assistant",
                content: null,
                tool_calls: [
                  { index: 0, id: call.id, type: "function", function: { name: call.function.name, arguments: "" } },
                ],
              }
            : { role: "assistant", content: "" },
        );
        // A tool call's arguments stream as its content would, one token a chunk.
        const text = call ? call.function.arguments : reply.content;
        for (let at = 0; at < text.length; at += chunkChars) {
          if (chunkLatencyMs > 0) await wait(chunkLatencyMs, signal);
          else if (signal?.aborted) throw new UpstreamError("cancelled", "client went away");
          const piece = text.slice(at, at + chunkChars);
          yield each(call ? { tool_calls: [{ index: 0, function: { arguments: piece } }] } : { content: piece });
        }
        yield each({}, reply.finishReason);
        yield chunk([], usageOfTokens(reply.tokens));
      })();
    },

    async responses(request: ResponsesRequest, options: CallOptions): Promise<ResponsesResult> {
      await answer(options);
      const reply = respond(request);
      return { response: reply.response, tokens: reply.tokens, usageEstimated: false };
    },

    async streamResponses(request: ResponsesRequest, options: CallOptions): Promise<ResponseEventStream> {
      await answer(options);
      const { response, item, text, tokens } = respond(request);
      const signal = options.signal;
      let sequence = 0;
      const event = (type: string, fields: Record<string, unknown>): ResponseEvent => ({
        type,
        sequence_number: sequence++,
        ...fields,
      });
      return (async function* () {
        const started = { ...response, status: "in_progress", output: [], usage: null, incomplete_details: null };
        yield event("response.created", { response: started });
        yield event("response.in_progress", { response: started });
        const at = { item_id: item.id, output_index: 0 };
        const call = item.type === "function_call";
        yield event("response.output_item.added", {
          output_index: 0,
          item: { ...item, status: "in_progress", ...(call ? { arguments: "" } : { content: [] }) },
        });
        const part = { type: "output_text", text: "", annotations: [] };
        if (!call) yield event("response.content_part.added", { ...at, content_index: 0, part });
        // A tool call's arguments stream as text would, one token an event.
        for (let from = 0; from < text.length; from += chunkChars) {
          if (chunkLatencyMs > 0) await wait(chunkLatencyMs, signal);
          else if (signal?.aborted) throw new UpstreamError("cancelled", "client went away");
          const delta = text.slice(from, from + chunkChars);
          if (call) yield event("response.function_call_arguments.delta", { ...at, delta });
          else yield event("response.output_text.delta", { ...at, content_index: 0, delta, logprobs: [] });
        }
        if (call) yield event("response.function_call_arguments.done", { ...at, arguments: text });
        else {
          yield event("response.output_text.done", { ...at, content_index: 0, text, logprobs: [] });
          yield event("response.content_part.done", { ...at, content_index: 0, part: { ...part, text } });
        }
        yield event("response.output_item.done", { output_index: 0, item });
        const done = response.status === "incomplete" ? "response.incomplete" : "response.completed";
        yield event(done, { response: { ...response, usage: answeredResponsesUsage(undefined, tokens) } });
      })();
    },

    async storedResponse(request: StoredResponseRequest, options: CallOptions): Promise<unknown> {
      await answer(options);
      const found = stored.get(request.id);
      if (!found) throw refused(404, `Response with id '${request.id}' not found.`, null, null);
      if (request.action === "retrieve") return structuredClone(found.response);
      if (request.action === "delete") {
        stored.delete(request.id);
        return { id: request.id, object: "response", deleted: true };
      }
      return itemPage(found.items, request.query);
    },

    async embed(request: EmbeddingRequest, options: CallOptions): Promise<EmbeddingResult> {
      // A string or a flat array of token ids is one input.
      const input = request.input;
      const inputs = (typeof input === "string" || typeof input[0] === "number" ? [input] : input) as Array<
        string | number[]
      >;
      const dimensions = request.dimensions ?? embeddingDimensions;
      const values = inputs.length * dimensions;
      if (values > maxEmbeddingValues) {
        const message =
          `The mock provider returns at most ${maxEmbeddingValues} embedding values (inputs x dimensions) per request; ` +
          `${inputs.length} inputs of ${dimensions} dimensions are ${values}. Ask for fewer dimensions or send fewer inputs.`;
        const param = request.dimensions == null ? "input" : "dimensions";
        throw new UpstreamError("rejected", `mock: ${message}`, 400, undefined, {
          message,
          type: "invalid_request_error",
          param,
          code: "invalid_value",
        });
      }
      await answer(options);
      let tokens = 0;
      const data: Embedding[] = [];
      inputs.forEach((item, index) => {
        const text = typeof item === "string" ? item : JSON.stringify(item);
        tokens += typeof item === "string" ? approxTokens(item) : item.length;
        const vector = unitVector(text, dimensions);
        const embedding =
          request.encoding_format === "base64" ? Buffer.from(vector.buffer).toString("base64") : Array.from(vector);
        // Base64 vectors travel as strings, as the API sends them.
        data.push({ object: "embedding", index, embedding: embedding as number[] });
      });
      const usage = { inputTokens: BigInt(tokens), cachedInputTokens: 0n, outputTokens: 0n, reasoningTokens: 0n };
      return {
        response: {
          object: "list",
          model: request.model,
          data,
          usage: { prompt_tokens: tokens, total_tokens: tokens },
        },
        tokens: usage,
        usageEstimated: false,
      };
    },
  };
}

/**
 * The mock's reply to a request: the last user message echoed (as {"reply": ...} when a JSON response format is asked
 * for), or a call of the tool that tool_choice requires, with "{}" for arguments; cut at the first stop sequence and
 * at the token limit. Ids are fresh each time, as OpenAI's are.
 */
function replyTo(request: ChatRequest) {
  let prompt = "";
  for (let i = request.messages.length - 1; i >= 0; i--) {
    const m = request.messages[i];
    if (m?.role === "user") {
      prompt = messageText(m);
      break;
    }
  }
  const echo = `mock reply: ${prompt}`;
  const format = request.response_format?.type;
  let content = format === "json_object" || format === "json_schema" ? JSON.stringify({ reply: echo }) : echo;
  let finishReason: "stop" | "length" | "tool_calls" = "stop";
  const stops = typeof request.stop === "string" ? [request.stop] : (request.stop ?? []);
  for (const stop of stops) {
    const at = stop === "" ? -1 : content.indexOf(stop);
    if (at >= 0) content = content.slice(0, at);
  }
  const tool = requiredTool(request);
  const toolCall: ChatCompletionMessageToolCall | undefined = tool
    ? { id: `call_${ulid()}`, type: "function", function: { name: tool, arguments: "{}" } }
    : undefined;
  if (toolCall) {
    content = "";
    finishReason = "tool_calls";
  }
  const limit = Math.min(request.max_completion_tokens ?? request.max_tokens ?? maxReplyTokens, maxReplyTokens);
  if (!toolCall && approxTokens(content) > limit) {
    content = content.slice(0, limit * chunkChars);
    finishReason = "length";
  }
  const n = request.n ?? 1;
  const outputTokens = toolCall
    ? approxTokens(toolCall.function.name + toolCall.function.arguments)
    : approxTokens(content);
  return {
    id: `chatcmpl-${ulid()}`,
    content,
    toolCall,
    finishReason,
    n,
    tokens: {
      inputTokens: BigInt(approxInputTokens(request.messages)),
      cachedInputTokens: 0n,
      outputTokens: BigInt(outputTokens * n),
      reasoningTokens: 0n,
    },
  };
}

/**
 * The mock's Responses API answer to a request, as replyTo answers chat: the last user input (or the input string)
 * echoed after `mock reply: `, cut at `max_output_tokens`; or a call with "{}" of the function tool `tool_choice`
 * requires. Its input is counted as the chat mock counts messages: instructions and each input item.
 */
function responseTo(request: ResponsesRequest) {
  const r = request as unknown as Record<string, unknown>;
  let prompt = "";
  if (typeof r.input === "string") prompt = r.input;
  else if (Array.isArray(r.input)) {
    for (let i = r.input.length - 1; i >= 0; i--) {
      const item = r.input[i] as Record<string, unknown>;
      if (item?.role !== "user") continue;
      const content = item.content;
      if (typeof content === "string") prompt = content;
      else if (Array.isArray(content)) {
        prompt = (content as { text?: unknown }[]).map((p) => (typeof p.text === "string" ? p.text : "")).join("");
      }
      break;
    }
  }
  const tool = requiredResponsesTool(r);
  let text = tool ? "{}" : `mock reply: ${prompt}`;
  const asked = typeof r.max_output_tokens === "number" ? r.max_output_tokens : maxReplyTokens;
  const limit = Math.min(asked, maxReplyTokens);
  const cut = !tool && approxTokens(text) > limit;
  if (cut) text = text.slice(0, limit * chunkChars);
  const item: Record<string, unknown> = tool
    ? {
        type: "function_call",
        id: `fc_${ulid()}`,
        call_id: `call_${ulid()}`,
        name: tool,
        arguments: text,
        status: "completed",
      }
    : {
        type: "message",
        id: `msg_${ulid()}`,
        status: cut ? "incomplete" : "completed",
        role: "assistant",
        content: [{ type: "output_text", text, annotations: [] }],
      };
  const { texts, items } = responsesPrompt(request);
  const tokens = {
    inputTokens: BigInt(3 + 4 * items + approxTokens(texts.join(""))),
    cachedInputTokens: 0n,
    outputTokens: BigInt(approxTokens(tool ? tool + text : text)),
    reasoningTokens: 0n,
  };
  const response = {
    id: `resp_${ulid()}`,
    object: "response",
    created_at: Math.floor(Date.now() / 1000),
    status: cut ? "incomplete" : "completed",
    error: null,
    incomplete_details: cut ? { reason: "max_output_tokens" } : null,
    instructions: r.instructions ?? null,
    max_output_tokens: r.max_output_tokens ?? null,
    model: request.model,
    output: [item],
    parallel_tool_calls: r.parallel_tool_calls ?? true,
    previous_response_id: r.previous_response_id ?? null,
    temperature: r.temperature ?? 1,
    text: r.text ?? { format: { type: "text" } },
    tool_choice: r.tool_choice ?? "auto",
    tools: r.tools ?? [],
    top_p: r.top_p ?? 1,
    metadata: r.metadata ?? {},
    usage: answeredResponsesUsage(undefined, tokens),
  } as unknown as ResponseObject;
  return { response, item: item as { id: string; type: string }, text, tokens };
}

/** A refusal in OpenAI's words, as an upstream's. */
function refused(status: number, message: string, param: string | null, code: string | null): UpstreamError {
  const error: UpstreamErrorBody = { message, type: "invalid_request_error", param, code };
  const said = `mock answered ${status}: ${message}`;
  return new UpstreamError(failureOfStatus(status, error), said, status, undefined, error);
}

/** A request's input as the items the API lists for its response: each with an id, a string as a user message. */
function inputItems(request: ResponsesRequest): Record<string, unknown>[] {
  const input = (request as unknown as { input?: unknown }).input;
  const items = typeof input === "string" ? [{ role: "user", content: input }] : Array.isArray(input) ? input : [];
  return items.map((value) => {
    const item = structuredClone(value) as Record<string, unknown>;
    if (item.type === undefined && item.role !== undefined) item.type = "message";
    if (item.type === "message") {
      item.status ??= "completed";
      if (typeof item.content === "string") item.content = [{ type: "input_text", text: item.content }];
    }
    item.id ??= `${item.type === "message" ? "msg" : "item"}_${ulid()}`;
    return item;
  });
}

/** A page of input items, as the API pages them: `order` (desc by default), after the item `after`, `limit` (20). */
function itemPage(items: Record<string, unknown>[], query: StoredResponseRequest["query"]) {
  const ordered = query.order === "asc" ? [...items] : [...items].reverse();
  const from = typeof query.after === "string" ? ordered.findIndex((item) => item.id === query.after) + 1 : 0;
  const limit = Math.min(100, Math.max(1, Number(query.limit) || 20));
  const data = ordered.slice(from, from + limit).map((item) => structuredClone(item));
  return {
    object: "list",
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: from + limit < ordered.length,
  };
}

/** The function tool a Responses API request obliges the model to call: named by tool_choice, or the first one. */
function requiredResponsesTool(request: Record<string, unknown>): string | undefined {
  const choice = request.tool_choice as { type?: unknown; name?: unknown } | string | undefined;
  if (typeof choice === "object" && choice !== null && choice.type === "function" && typeof choice.name === "string") {
    return choice.name;
  }
  if (choice !== "required") return undefined;
  for (const tool of (request.tools ?? []) as { type?: unknown; name?: unknown }[]) {
    if (tool.type === "function" && typeof tool.name === "string") return tool.name;
  }
  return undefined;
}

/** The function tool a request obliges the model to call: the one named by tool_choice, or the first when "required". */
function requiredTool(request: ChatRequest): string | undefined {
  const choice = request.tool_choice;
  if (typeof choice === "object" && choice !== null && choice.type === "function") return choice.function.name;
  if (choice !== "required") return undefined;
  for (const tool of request.tools ?? []) if (tool.type === "function") return tool.function.name;
  return undefined;
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

/** A unit vector of `dimensions` floats, the same for the same text. */
function unitVector(text: string, dimensions: number): Float32Array {
  const vector = new Float32Array(dimensions);
  let state = Number.parseInt(fnv1a(text), 16) || 1;
  let norm = 0;
  for (let i = 0; i < dimensions; i++) {
    // xorshift32: cheap, deterministic, spread over [-1, 1).
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    const value = (state >>> 0) / 2 ** 31 - 1;
    vector[i] = value;
    norm += value * value;
  }
  const scale = 1 / Math.sqrt(norm || 1);
  for (let i = 0; i < dimensions; i++) vector[i] = (vector[i] as number) * scale;
  return vector;
}

/** 32-bit FNV-1a as 8 hex digits: the seed of an input's embedding. */
function fnv1a(text: string): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0).toString(16).padStart(8, "0");
}
