import { invalidRequest } from "./errors.ts";
import type { ChatRequest } from "./providers/provider.ts";

/** A chat request as the gateway understands it, whether it came over REST or RPC. */
export interface ChatInput {
  /** Public model name asked for. */
  model: string;
  /** The request for upstream: the client's body minus gateway-only fields; `model` is set per target. */
  upstream: ChatRequest;
  /** End-user id from `user`; empty when absent. */
  user: string;
  /** From `metadata`: recorded with the request's metrics, never sent upstream. */
  tags: Record<string, string>;
  /** `stream: true`: answer with server-sent chunks. */
  stream: boolean;
  /** `stream_options.include_usage`: end the stream with a usage chunk. Upstreams are always asked for usage. */
  includeUsage: boolean;
}

const roles = new Set(["system", "developer", "user", "assistant", "tool", "function"]);
// Fields that are the gateway's, not the upstream's.
const gatewayOnly = new Set(["metadata", "stream", "stream_options"]);
const maxMessages = 2048;
const maxTags = 16;
const maxTagBytes = 256;

export const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * Checks what the gateway relies on (model, messages, n, stop, limits, user, metadata) and leaves
 * the rest of the OpenAI parameters for the upstream to judge. Throws a 400 naming the field.
 */
export function parseChatInput(body: unknown): ChatInput {
  if (!isObject(body)) throw invalidRequest("The request body must be a JSON object.");
  const model = body.model;
  if (typeof model !== "string" || model === "") {
    throw invalidRequest("`model` is required and must be a non-empty string.", "model", "missing_required_parameter");
  }
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== "boolean") {
    throw invalidRequest("`stream` must be a boolean.", "stream");
  }
  const stream = body.stream === true;
  const includeUsage = parseStreamOptions(body.stream_options, stream);
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) {
    throw invalidRequest("`messages` must be a non-empty array.", "messages", "missing_required_parameter");
  }
  if (messages.length > maxMessages) throw invalidRequest(`\`messages\` may hold at most ${maxMessages} messages.`, "messages");
  for (let i = 0; i < messages.length; i++) {
    const m: unknown = messages[i];
    if (!isObject(m)) throw invalidRequest("Each message must be an object.", `messages[${i}]`);
    if (typeof m.role !== "string" || !roles.has(m.role)) {
      throw invalidRequest(`\`role\` must be one of ${[...roles].join(", ")}.`, `messages[${i}].role`);
    }
    const content = m.content;
    if (content !== undefined && content !== null && typeof content !== "string" && !Array.isArray(content)) {
      throw invalidRequest("`content` must be a string or an array of content parts.", `messages[${i}].content`);
    }
    if (Array.isArray(content)) {
      for (let j = 0; j < content.length; j++) {
        const part: unknown = content[j];
        if (!isObject(part) || typeof part.type !== "string") {
          throw invalidRequest("Each content part must be an object with a `type`.", `messages[${i}].content[${j}]`);
        }
      }
    }
  }
  positiveInt(body, "n", 8);
  positiveInt(body, "max_tokens");
  positiveInt(body, "max_completion_tokens");
  const stop = body.stop;
  if (stop !== undefined && stop !== null && typeof stop !== "string") {
    if (!Array.isArray(stop) || stop.length > 4 || stop.some((s) => typeof s !== "string")) {
      throw invalidRequest("`stop` must be a string or an array of up to 4 strings.", "stop");
    }
  }
  const user = body.user ?? "";
  if (typeof user !== "string" || user.length > 256) throw invalidRequest("`user` must be a string of at most 256 characters.", "user");
  const tags = parseTags(body.metadata);

  const upstream: Record<string, unknown> = {};
  for (const key in body) if (!gatewayOnly.has(key)) upstream[key] = body[key];
  return { model, upstream: upstream as unknown as ChatRequest, user, tags, stream, includeUsage };
}

function parseStreamOptions(options: unknown, stream: boolean): boolean {
  if (options === undefined || options === null) return false;
  if (!stream) throw invalidRequest("`stream_options` is only allowed when `stream` is true.", "stream_options");
  if (!isObject(options)) throw invalidRequest("`stream_options` must be an object.", "stream_options");
  const include = options.include_usage;
  if (include !== undefined && include !== null && typeof include !== "boolean") {
    throw invalidRequest("`stream_options.include_usage` must be a boolean.", "stream_options.include_usage");
  }
  return include === true;
}

function positiveInt(body: Record<string, unknown>, field: string, max = 2 ** 31 - 1): void {
  const v = body[field];
  if (v === undefined || v === null) return;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > max) {
    throw invalidRequest(`\`${field}\` must be an integer from 1 to ${max}.`, field);
  }
}

const noTags: Record<string, string> = Object.freeze({}) as Record<string, string>;

function parseTags(metadata: unknown): Record<string, string> {
  if (metadata === undefined || metadata === null) return noTags;
  if (!isObject(metadata)) throw invalidRequest("`metadata` must be an object of string values.", "metadata");
  let count = 0;
  for (const key in metadata) {
    const value = metadata[key];
    if (++count > maxTags) throw invalidRequest(`\`metadata\` may hold at most ${maxTags} entries.`, "metadata");
    if (typeof value !== "string") throw invalidRequest("`metadata` values must be strings.", `metadata.${key}`);
    if (tooLong(key) || tooLong(value)) {
      throw invalidRequest(`\`metadata\` keys and values may be at most ${maxTagBytes} bytes.`, `metadata.${key}`);
    }
  }
  return metadata as Record<string, string>;
}

function tooLong(text: string): boolean {
  // A UTF-16 unit is at most 3 UTF-8 bytes, so short strings need no byte count.
  return text.length > maxTagBytes || (text.length > maxTagBytes / 3 && Buffer.byteLength(text) > maxTagBytes);
}
