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
  type ResponseEventStream,
  type ResponseObject,
  type ResponsesRequest,
  type ResponsesResult,
  answeredResponsesUsage,
  failureOfStatus,
  responseEvents,
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
// Responses kept for retrieval, as an upstream account stores them: the latest this many, and of so many characters
// of JSON in all, so that requests of 4 MB each (an image costs 765 tokens whatever its bytes) cannot fill the memory.
const maxStoredResponses = 1000;
const maxStoredChars = 32 * 1024 * 1024;

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
  const stored = new Map<string, { response: ResponseObject; items: Record<string, unknown>[]; chars: number }>();
  let storedChars = 0;

  /** A response's answer as the mock makes it, kept when the request lets it be; refused when it continues none kept. */
  const respond = (request: ResponsesRequest) => {
    const previous = request.previous_response_id;
    if (typeof previous === "string" && !stored.has(previous)) {
      const message = `Previous response with id '${previous}' not found.`;
      throw refused(400, message, "previous_response_id", "previous_response_not_found");
    }
    const reply = responseTo(request);
    if (request.store !== false) {
      const kept = { response: structuredClone(reply.response), items: inputItems(request), chars: 0 };
      kept.chars = JSON.stringify(kept.response).length + JSON.stringify(kept.items).length;
      // The oldest go first; the latest is kept whatever its size, bounded by the gateway's largest body.
      for (const [id, old] of stored) {
        if (stored.size < maxStoredResponses && storedChars + kept.chars <= maxStoredChars) break;
        stored.delete(id);
        storedChars -= old.chars;
      }
      stored.set(reply.response.id, kept);
      storedChars += kept.chars;
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
      const signal = options.signal;
      // A tool call's arguments stream as text would, one token an event.
      return responseEvents(respond(request).response, async function* (text) {
        for (let from = 0; from < text.length; from += chunkChars) {
          if (chunkLatencyMs > 0) await wait(chunkLatencyMs, signal);
          else if (signal?.aborted) throw new UpstreamError("cancelled", "client went away");
          yield text.slice(from, from + chunkChars);
        }
      });
    },

    async storedResponse(request: StoredResponseRequest, options: CallOptions): Promise<unknown> {
      await answer(options);
      const found = stored.get(request.id);
      if (!found) throw refused(404, `Response with id '${request.id}' not found.`, null, null);
      if (request.action === "retrieve") return structuredClone(found.response);
      if (request.action === "delete") {
        stored.delete(request.id);
        storedChars -= found.chars;
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
 * The mock's reply to a request: the last user message echoed (in JSON when a JSON response format is asked for, see
 * jsonReply), or a call of the tool that tool_choice requires, with arguments that fit its parameters (see
 * toolArguments); cut at the first stop sequence and at the token limit. Ids are fresh each time, as OpenAI's are.
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
  const format = request.response_format;
  let content = format?.type === "json_object" || format?.type === "json_schema" ? jsonReply(format, echo) : echo;
  let finishReason: "stop" | "length" | "tool_calls" = "stop";
  const stops = typeof request.stop === "string" ? [request.stop] : (request.stop ?? []);
  for (const stop of stops) {
    const at = stop === "" ? -1 : content.indexOf(stop);
    if (at >= 0) content = content.slice(0, at);
  }
  const tool = requiredTool(request);
  const toolCall: ChatCompletionMessageToolCall | undefined = tool
    ? { id: `call_${ulid()}`, type: "function", function: { name: tool.name, arguments: toolArguments(tool, echo) } }
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
 * echoed after `mock reply: ` (in JSON when `text.format` asks for it), cut at `max_output_tokens`; or a call of the
 * function tool `tool_choice` requires, with arguments that fit its parameters. Its input is counted as the chat mock
 * counts messages: instructions and each input item.
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
  const echo = `mock reply: ${prompt}`;
  const format = (r.text as { format?: { type?: unknown } } | undefined)?.format;
  const json = format?.type === "json_object" || format?.type === "json_schema";
  let text = tool ? toolArguments(tool, echo) : json ? jsonReply(format, echo) : echo;
  const asked = typeof r.max_output_tokens === "number" ? r.max_output_tokens : maxReplyTokens;
  const limit = Math.min(asked, maxReplyTokens);
  const cut = !tool && approxTokens(text) > limit;
  if (cut) text = text.slice(0, limit * chunkChars);
  const item: Record<string, unknown> = tool
    ? {
        type: "function_call",
        id: `fc_${ulid()}`,
        call_id: `call_${ulid()}`,
        name: tool.name,
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
    outputTokens: BigInt(approxTokens(tool ? tool.name + text : text)),
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
  return { response, tokens };
}

/** A function tool the model is obliged to call: its name and its parameters' JSON schema. */
interface RequiredTool {
  name: string;
  parameters: unknown;
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

/**
 * A page of input items, as the API pages them: `order` (desc by default), `limit` (20), after the item `after` or
 * the page just before the item `before` (a page back, whose `has_more` says whether more are before it).
 */
function itemPage(items: Record<string, unknown>[], query: StoredResponseRequest["query"]) {
  const ordered = query.order === "asc" ? [...items] : [...items].reverse();
  const indexOf = (id: unknown) => ordered.findIndex((item) => item.id === id);
  const limit = Math.min(100, Math.max(1, Number(query.limit) || 20));
  let to = typeof query.before === "string" ? indexOf(query.before) : -1;
  if (to < 0) to = ordered.length;
  let from = typeof query.after === "string" ? indexOf(query.after) + 1 : 0;
  if (typeof query.before === "string") from = Math.max(from, to - limit);
  const data = ordered.slice(from, Math.min(to, from + limit)).map((item) => structuredClone(item));
  return {
    object: "list",
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: typeof query.before === "string" ? from > 0 : from + limit < to,
  };
}

/** The function tool a Responses API request obliges the model to call: named by tool_choice, or the first one. */
function requiredResponsesTool(request: Record<string, unknown>): RequiredTool | undefined {
  const choice = request.tool_choice as { type?: unknown; name?: unknown } | string | undefined;
  const named = typeof choice === "object" && choice !== null && choice.type === "function" ? choice.name : undefined;
  if (named === undefined && choice !== "required") return undefined;
  for (const tool of (request.tools ?? []) as { type?: unknown; name?: unknown; parameters?: unknown }[]) {
    if (tool.type !== "function" || typeof tool.name !== "string") continue;
    if (named === undefined || tool.name === named) return { name: tool.name, parameters: tool.parameters };
  }
  return typeof named === "string" ? { name: named, parameters: undefined } : undefined;
}

/** The function tool a request obliges the model to call: the one named by tool_choice, or the first when "required". */
function requiredTool(request: ChatRequest): RequiredTool | undefined {
  const choice = request.tool_choice;
  const named = typeof choice === "object" && choice?.type === "function" ? choice.function.name : undefined;
  if (named === undefined && choice !== "required") return undefined;
  for (const tool of request.tools ?? []) {
    if (tool.type !== "function" || (named !== undefined && tool.function.name !== named)) continue;
    return { name: tool.function.name, parameters: tool.function.parameters };
  }
  return named === undefined ? undefined : { name: named, parameters: undefined };
}

/**
 * A JSON reply: an instance of the format's schema when it has one, so that clients parsing structured output against
 * it (the SDKs' `parse` helpers) run offline too, with the echo for its strings; else `{"reply": echo}`.
 */
function jsonReply(format: { type?: unknown; json_schema?: { schema?: unknown }; schema?: unknown }, echo: string) {
  // Chat's response_format holds the schema in json_schema, the Responses API's text.format in itself.
  const schema = format.type === "json_schema" ? (format.json_schema?.schema ?? format.schema) : undefined;
  if (schema === undefined) return JSON.stringify({ reply: echo });
  return JSON.stringify(schemaInstance(schema, newInstance(schema, echo), 0));
}

/** A tool call's arguments: an object its parameters' schema accepts (the echo for its strings), else `{}`. */
function toolArguments({ parameters }: RequiredTool, echo: string): string {
  const args = parameters && schemaInstance(parameters, newInstance(parameters, echo), 0);
  return JSON.stringify(typeof args === "object" && args !== null && !Array.isArray(args) ? args : {});
}

// Nesting past which a schema (a recursive one, through $ref) gets null, and the most values an instance holds (arrays
// of a least length nested, which would otherwise multiply).
const maxSchemaDepth = 16;
const maxInstanceValues = 4096;
// The most characters an instance's strings and given values (const, enum) hold in all, about a reply's token limit: a
// tool call's arguments are not cut at it, and the echo of a long prompt in each of thousands of properties, or a
// minLength of 10^8, would be an answer of gigabytes, metered at as many tokens. Values past it are null.
const maxInstanceChars = 4 * maxReplyTokens;
// The JSON length of const and enum values, measured once however many $refs name them.
const givenLengths = new WeakMap<object, number>();
// Strings of the formats OpenAI's structured outputs take, which validators (zod's) check.
const formatted: Record<string, string> = {
  "date-time": "1970-01-01T00:00:00Z",
  date: "1970-01-01",
  time: "00:00:00",
  duration: "P1D",
  email: "mock@example.com",
  hostname: "example.com",
  ipv4: "127.0.0.1",
  ipv6: "::1",
  uuid: "00000000-0000-0000-0000-000000000000",
  uri: "https://example.com/",
};

interface SchemaRead {
  ref: unknown;
  type: unknown;
  required: string[];
}

/** An instance being made of the schema `root`: its echo, and what it may still hold. */
interface Instance {
  root: unknown;
  text: string;
  values: number;
  chars: number;
  /**
   * What each schema's `$ref`, `type` list and `required` names come to, read once however many $refs name the schema:
   * read at each, a 400 KB `$ref` path named by 4,096 required names held the event loop for 21 s.
   */
  read: Map<object, SchemaRead>;
}

function newInstance(root: unknown, text: string): Instance {
  return { root, text, values: 0, chars: maxInstanceChars, read: new Map() };
}

/**
 * The least value a JSON schema accepts, as far as OpenAI's structured outputs let a schema say: its const or first
 * enum value, its first `anyOf` branch, `text` for a string (a string of its format's), the least number it allows,
 * false, its shortest array, an object of its required properties; `$ref`s resolved in `at.root`.
 */
function schemaInstance(schema: unknown, at: Instance, depth: number): unknown {
  if (depth > maxSchemaDepth || ++at.values > maxInstanceValues) return null;
  const text = at.text.slice(0, at.chars);
  if (typeof schema !== "object" || schema === null) return taken(at, text);
  const s = schema as Record<string, unknown>;
  let read = at.read.get(s);
  if (!read) at.read.set(s, (read = readSchema(s, at.root)));
  if (typeof s.$ref === "string") return schemaInstance(read.ref, at, depth + 1);
  if ("const" in s || (Array.isArray(s.enum) && s.enum.length > 0)) {
    let length = givenLengths.get(s);
    if (length === undefined) givenLengths.set(s, (length = JSON.stringify("const" in s ? s.const : s.enum)?.length ?? 0));
    if (length > at.chars) return null;
    at.chars -= length;
    return "const" in s ? s.const : (s.enum as unknown[])[0];
  }
  const branches = s.anyOf ?? s.oneOf ?? s.allOf;
  if (Array.isArray(branches) && branches.length > 0) return schemaInstance(branches[0], at, depth + 1);
  const type = read.type;
  if (type === "object" || (type === undefined && typeof s.properties === "object" && s.properties !== null)) {
    const properties = (s.properties ?? {}) as Record<string, unknown>;
    const value: Record<string, unknown> = {};
    for (const name of read.required) value[name] = schemaInstance(properties[name], at, depth + 1);
    return value;
  }
  if (type === "array") {
    const count = typeof s.minItems === "number" ? Math.min(s.minItems, 16) : 0;
    const items = Array.isArray(s.prefixItems) ? s.prefixItems : undefined;
    return Array.from({ length: Math.max(count, items?.length ?? 0) }, (_, i) =>
      schemaInstance(items?.[i] ?? s.items, at, depth + 1),
    );
  }
  if (type === "number" || type === "integer") return leastNumber(s, type === "integer");
  if (type === "boolean") return false;
  if (type === "null") return null;
  if (type === "string" && typeof s.format === "string" && s.format in formatted) return formatted[s.format];
  const longest = typeof s.maxLength === "number" ? s.maxLength : text.length;
  const least = Math.min(typeof s.minLength === "number" ? s.minLength : 0, at.chars);
  return taken(at, text.slice(0, longest).padEnd(least, "."));
}

/** A schema's resolved `$ref` (in `root`), the type its instance takes and its required property names. */
function readSchema(s: Record<string, unknown>, root: unknown): SchemaRead {
  const types = Array.isArray(s.type) ? s.type : [s.type];
  return {
    ref: typeof s.$ref === "string" ? resolveRef(root, s.$ref) : undefined,
    type: types.find((t) => t !== "null") ?? (types.includes("null") ? "null" : undefined),
    required: Array.isArray(s.required) ? s.required.filter((name): name is string => typeof name === "string") : [],
  };
}

/** A string of an instance, counted against what its strings may hold. */
function taken(at: { chars: number }, text: string): string {
  at.chars -= text.length;
  return text;
}

/** The number nearest 0 within a schema's bounds. */
function leastNumber(s: Record<string, unknown>, integer: boolean): number {
  // Just past an exclusive bound: by one for an integer, by a millionth for a float.
  const step = integer ? 1 : 1e-6;
  const below = typeof s.exclusiveMinimum === "number" ? s.exclusiveMinimum + step : undefined;
  const min = Math.max(typeof s.minimum === "number" ? s.minimum : -Infinity, below ?? -Infinity);
  const above = typeof s.exclusiveMaximum === "number" ? s.exclusiveMaximum - step : undefined;
  const max = Math.min(typeof s.maximum === "number" ? s.maximum : Infinity, above ?? Infinity);
  const value = Math.min(Math.max(0, min), max);
  return integer ? Math.ceil(value) : value;
}

/** What a local `$ref` (`#/$defs/Name`, JSON pointer escapes undone) names in the root schema; undefined for others. */
function resolveRef(root: unknown, ref: string): unknown {
  if (!ref.startsWith("#")) return undefined;
  let at: unknown = root;
  for (const part of ref.slice(1).split("/").slice(1)) {
    if (typeof at !== "object" || at === null) return undefined;
    at = (at as Record<string, unknown>)[part.replaceAll("~1", "/").replaceAll("~0", "~")];
  }
  return at;
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
