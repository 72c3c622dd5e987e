import { clipped } from "../lib/text.ts";
import { invalidRequest } from "./errors.ts";
import type { ChatRequest } from "./providers/provider.ts";
import {
  absent,
  arrayOf,
  arrayTooLong,
  boolean,
  byType,
  type Check,
  decimal,
  emptyArray,
  integer,
  isObject,
  missing,
  object,
  objectWith,
  oneOf,
  parseModel,
  parseUser,
  storedFile,
  string,
  stringUpTo,
  tooLong,
  unsupported,
  wrongType,
} from "./request-checks.ts";

/** A chat request as the gateway understands it, whether it came over REST or RPC. */
export interface ChatInput {
  /** Public model name asked for. */
  model: string;
  /** The request for upstream: the client's body minus gateway-only fields; `model` is set per target. */
  upstream: ChatRequest;
  /** End-user id from `user`, else `safety_identifier`; empty when both are absent. */
  user: string;
  /** From `metadata`: recorded with the request's metrics; sent upstream too only with `store: true`. */
  tags: Record<string, string>;
  /** `stream: true`: answer with server-sent chunks. */
  stream: boolean;
  /**
   * `stream_options.include_usage`: end the stream with a usage chunk. Upstreams are always asked for usage, with the
   * client's other stream options (`upstream.stream_options`) as it sent them.
   */
  includeUsage: boolean;
}

const roles = ["system", "developer", "user", "assistant", "tool", "function"];
const roleSet = new Set(roles);
// Fields that are the gateway's, not the upstream's (metadata goes with a completion the upstream stores, too).
const gatewayOnly = new Set(["metadata", "stream", "stream_options"]);
export const maxMessages = 2048;
const maxChoices = 128;
export const maxStops = 4;
export const maxTools = 128;
/** Tokens one request may bias: far more than any sampling needs, few enough to check at once. */
const maxLogitBias = 1_024;
const maxTags = 16;
const maxTagKeyChars = 64;
const maxTagValueChars = 512;
const int32Max = 2 ** 31 - 1;

// Function, tool and schema names as the API allows them.
const namePattern = /^[a-zA-Z0-9_-]{1,64}$/;
const name: Check = (v, param) => {
  string(v, param);
  if (!namePattern.test(v as string)) {
    throw invalidRequest(
      `Invalid '${param}': string does not match pattern. Expected a string that matches the pattern '${namePattern.source}'.`,
      param,
      "invalid_value",
    );
  }
};

const textPart = objectWith({ text: string });

/** The content parts each role's message may hold, as the API types them: images, audio and files are a user's. */
const contentParts: Record<string, Check> = {
  user: byType({
    text: textPart,
    image_url: objectWith({ image_url: objectWith({ url: string }, { detail: oneOf("auto", "low", "high") }) }),
    input_audio: objectWith({ input_audio: objectWith({ data: string, format: oneOf("wav", "mp3") }) }),
    file: objectWith({
      file: (v, param) => {
        if (!isObject(v)) throw wrongType(param, "an object", v);
        if (!absent(v.file_id)) throw storedFile(`${param}.file_id`);
      },
    }),
  }),
  assistant: byType({ text: textPart, refusal: objectWith({ refusal: string }) }),
  system: byType({ text: textPart }),
  developer: byType({ text: textPart }),
  tool: byType({ text: textPart }),
  function: byType({ text: textPart }),
};

const toolCall = byType({
  function: objectWith({ id: string, function: objectWith({ name: string, arguments: string }) }),
  custom: objectWith({ id: string, custom: objectWith({ name: string, input: string }) }),
});
const toolCalls = arrayOf(toolCall);
const functionCall = objectWith({ name: string, arguments: string });

const tool = byType({
  function: objectWith({
    function: objectWith({ name }, { description: string, parameters: object, strict: boolean }),
  }),
  custom: objectWith({ custom: objectWith({ name: string }) }),
});

const toolChoiceModes = oneOf("none", "auto", "required");
const namedToolChoice = byType({
  function: objectWith({ function: objectWith({ name: string }) }),
  custom: objectWith({ custom: objectWith({ name: string }) }),
  allowed_tools: objectWith({ allowed_tools: objectWith({ mode: oneOf("auto", "required"), tools: arrayOf(object) }) }),
});

const stopSequences = arrayOf(string, { max: maxStops });
const logitBiasValue = decimal(-100, 100);
const tokenId = /^\d+$/;

/**
 * OpenAI parameters whose meaning is fixed, checked as the API checks them. Fields not listed here
 * pass through for the upstream to judge, so new API fields keep working.
 */
const fieldChecks = new Map<string, Check>([
  ["stream", boolean],
  ["temperature", decimal(0, 2)],
  ["top_p", decimal(0, 1)],
  ["presence_penalty", decimal(-2, 2)],
  ["frequency_penalty", decimal(-2, 2)],
  ["n", integer(1, maxChoices)],
  ["max_tokens", integer(1, int32Max)],
  ["max_completion_tokens", integer(1, int32Max)],
  // An int64 as far as a JSON number carries one exactly: a larger seed would be rounded into another, so it is refused.
  ["seed", integer(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER)],
  ["logprobs", boolean],
  ["top_logprobs", integer(0, 20)],
  ["parallel_tool_calls", boolean],
  ["store", boolean],
  // Which tiers a model may be asked for depends on its prices: checked with its route.
  ["service_tier", string],
  [
    "logit_bias",
    (v, param) => {
      object(v, param);
      const bias = v as Record<string, unknown>;
      if (Object.keys(bias).length > maxLogitBias) {
        throw invalidRequest(`Invalid '${param}': at most ${maxLogitBias} tokens may be biased.`, param, "invalid_value");
      }
      for (const token in bias) {
        if (!tokenId.test(token)) {
          throw invalidRequest(`Invalid key in '${param}': '${token}' is not a token id.`, `${param}.${token}`, "invalid_value");
        }
        logitBiasValue(bias[token], `${param}.${token}`);
      }
    },
  ],
  [
    "stop",
    (v, param) => {
      if (typeof v === "string") return;
      if (!Array.isArray(v)) throw wrongType(param, "a string or an array of strings", v);
      stopSequences(v, param);
    },
  ],
  [
    "web_search_options",
    (_v, param) => {
      throw invalidRequest(
        `Invalid value for '${param}': a web search its upstream charges per call, which this gateway cannot bill ` +
          "exactly; send the request without it.",
        param,
        "unsupported_value",
      );
    },
  ],
  ["tools", arrayOf(tool, { max: maxTools, nonEmpty: true })],
  // The deprecated form of tools, which OpenAI still takes (and its SDKs still type).
  ["functions", arrayOf(objectWith({ name }, { description: string, parameters: object }), { max: maxTools, nonEmpty: true })],
  [
    "tool_choice",
    (v, param) => {
      if (typeof v === "string") toolChoiceModes(v, param);
      else if (isObject(v)) namedToolChoice(v, param);
      else throw wrongType(param, "a string or an object", v);
    },
  ],
  [
    "response_format",
    byType({
      text: object,
      json_object: object,
      json_schema: objectWith({
        json_schema: objectWith({ name }, { description: string, schema: object, strict: boolean }),
      }),
    }),
  ],
]);

/**
 * Checks the fields whose meaning is fixed (model, messages, sampling ranges, tools, formats, limits,
 * user, safety_identifier, metadata) as OpenAI does, and leaves any other field for the upstream to judge. Throws a 400
 * naming the field.
 */
export function parseChatInput(body: unknown): ChatInput {
  if (!isObject(body)) throw invalidRequest("The request body must be a JSON object.");
  const model = parseModel(body);
  parseMessages(body.messages);
  const upstream: Record<string, unknown> = {};
  for (const key in body) {
    // JSON.parse keeps "__proto__" as a plain field; copied by assignment it would become the upstream request's
    // prototype, whose fields (n, max_tokens) the gateway reads unchecked.
    if (key === "__proto__") throw invalidRequest(`Unrecognized request argument supplied: ${key}`, key, "unknown_parameter");
    const value = body[key];
    if (value !== undefined && value !== null) fieldChecks.get(key)?.(value, key);
    if (!gatewayOnly.has(key)) upstream[key] = value;
  }
  if (body.top_logprobs !== undefined && body.top_logprobs !== null && body.logprobs !== true) {
    throw invalidRequest("Invalid 'top_logprobs': only allowed when 'logprobs' is true.", "top_logprobs", "invalid_value");
  }
  checkToolChoice(body.tool_choice, body.tools);
  checkFunctionCall(body.function_call, body.functions);
  const stream = body.stream === true;
  const includeUsage = parseStreamOptions(body.stream_options, stream);
  if (isObject(body.stream_options)) upstream.stream_options = body.stream_options;
  const user = parseUser(body, ["user", "safety_identifier"]);
  const tags = parseTags(body.metadata);
  // A stored completion keeps its metadata at the upstream, where the client filters stored completions by it.
  if (body.store === true && tags !== noTags) upstream.metadata = tags;
  return { model, upstream: upstream as unknown as ChatRequest, user, tags, stream, includeUsage };
}

/** A tool_choice needs tools, and one naming a tool names one of them (the shapes of both are checked already). */
function checkToolChoice(choice: unknown, tools: unknown): void {
  if (absent(choice)) return;
  if (!Array.isArray(tools) || tools.length === 0) {
    throw invalidRequest(
      "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
      "tool_choice",
    );
  }
  checkNamedTool(choice, tools, (v, type) => (v[type] as Record<string, unknown> | undefined)?.name, (type) => `${type}.name`);
}

/** The deprecated function_call: "none", "auto", or one of `functions` by name, which it needs. */
function checkFunctionCall(choice: unknown, functions: unknown): void {
  if (absent(choice)) return;
  if (typeof choice === "string") oneOf("none", "auto")(choice, "function_call");
  else if (isObject(choice)) string(choice.name, "function_call.name");
  else throw wrongType("function_call", "a string or an object", choice);
  if (!Array.isArray(functions) || functions.length === 0) {
    throw invalidRequest("Invalid value for 'function_call': 'function_call' is only allowed when 'functions' are specified.", "function_call");
  }
  const named = isObject(choice) ? choice.name : undefined;
  if (named !== undefined && !functions.some((f) => isObject(f) && f.name === named)) {
    const said = `Invalid value for 'function_call': no function named '${echoed(named as string)}' is among 'functions'.`;
    throw invalidRequest(said, "function_call.name");
  }
}

/**
 * A tool_choice naming a function or custom tool names one of `tools` of that type, the name read by `nameOf` (chat
 * nests it under the type, the Responses API does not) at `tool_choice.<param>`: the model would otherwise be made to
 * call a tool the client never declared.
 */
export function checkNamedTool(
  choice: unknown,
  tools: unknown,
  nameOf: (v: Record<string, unknown>, type: string) => unknown,
  param: (type: string) => string,
): void {
  if (!isObject(choice) || (choice.type !== "function" && choice.type !== "custom")) return;
  const type = choice.type;
  const named = nameOf(choice, type);
  const at = `tool_choice.${param(type)}`;
  if (typeof named !== "string") throw wrongType(at, "a string", named);
  const declared = Array.isArray(tools) ? tools : [];
  if (!declared.some((t) => isObject(t) && t.type === type && nameOf(t, type) === named)) {
    throw invalidRequest(`Invalid value for 'tool_choice': no ${type} tool named '${echoed(named)}' is among 'tools'.`, at);
  }
}

function parseMessages(messages: unknown): void {
  if (messages === undefined || messages === null) throw missing("messages");
  if (!Array.isArray(messages)) throw wrongType("messages", "an array", messages);
  if (messages.length === 0) throw emptyArray("messages");
  if (messages.length > maxMessages) throw arrayTooLong("messages", maxMessages, messages.length);
  for (let i = 0; i < messages.length; i++) checkMessage(messages[i], i);
}

/** A message's role, content and the fields its role requires. Its param is spelled out only when needed. */
function checkMessage(m: unknown, i: number): void {
  const at = (field: string) => `messages[${i}]${field}`;
  if (!isObject(m)) throw wrongType(at(""), "an object", m);
  const role = m.role;
  if (role === undefined || role === null) throw missing(at(".role"));
  if (typeof role !== "string") throw wrongType(at(".role"), "a string", role);
  if (!roleSet.has(role)) throw unsupported(at(".role"), role, roles);
  const content = m.content;
  if (Array.isArray(content)) {
    if (content.length === 0) throw emptyArray(at(".content"));
    const contentPart = contentParts[role] as Check;
    for (let j = 0; j < content.length; j++) contentPart(content[j], at(`.content[${j}]`));
  } else if (content !== undefined && content !== null) {
    if (typeof content !== "string") throw wrongType(at(".content"), "a string or an array of content parts", content);
  } else if (role !== "function" && !(role === "assistant" && (calls(m) || present(m.audio) || present(m.refusal)))) {
    // Only an assistant turn that calls tools, refers to its earlier audio answer by id or refuses (the SDK's own
    // message shape, pushed back as it came) or a legacy function result may go without content.
    throw missing(at(".content"));
  }
  if (role === "assistant") {
    if (present(m.audio)) assistantAudio(m.audio, at(".audio"));
    if (present(m.refusal)) string(m.refusal, at(".refusal"));
  }
  if (m.name !== undefined && m.name !== null) {
    if (typeof m.name !== "string") throw wrongType(at(".name"), "a string", m.name);
  } else if (role === "function") throw missing(at(".name"));
  if (role === "tool") {
    if (m.tool_call_id === undefined || m.tool_call_id === null) throw missing(at(".tool_call_id"));
    if (typeof m.tool_call_id !== "string") throw wrongType(at(".tool_call_id"), "a string", m.tool_call_id);
  }
  if (m.tool_calls !== undefined && m.tool_calls !== null) toolCalls(m.tool_calls, at(".tool_calls"));
  if (m.function_call !== undefined && m.function_call !== null) functionCall(m.function_call, at(".function_call"));
}

const present = (v: unknown) => v !== undefined && v !== null;
const assistantAudio = objectWith({ id: string });

const calls = (m: Record<string, unknown>) =>
  (Array.isArray(m.tool_calls) && m.tool_calls.length > 0) || (m.function_call !== undefined && m.function_call !== null);

function parseStreamOptions(options: unknown, stream: boolean): boolean {
  if (options === undefined || options === null) return false;
  if (!stream) throw invalidRequest("Invalid 'stream_options': only allowed when 'stream' is true.", "stream_options");
  object(options, "stream_options");
  const include = (options as Record<string, unknown>).include_usage;
  if (include !== undefined && include !== null) boolean(include, "stream_options.include_usage");
  return include === true;
}

const noTags: Record<string, string> = Object.freeze({}) as Record<string, string>;
const tagValue = stringUpTo(maxTagValueChars);

/** A client's text as an error echoes it: in full unless it is far longer than any name should be. */
const echoed = (text: string) => clipped(text, 256);

export function parseTags(metadata: unknown): Record<string, string> {
  if (metadata === undefined || metadata === null) return noTags;
  object(metadata, "metadata");
  const tags = metadata as Record<string, unknown>;
  let count = 0;
  for (const key in tags) {
    if (++count > maxTags) {
      throw invalidRequest(
        `Invalid 'metadata': too many properties. Expected an object with at most ${maxTags} properties, but got an object with ${Object.keys(tags).length} properties instead.`,
        "metadata",
        "object_above_max_properties",
      );
    }
    if (tooLong(key, maxTagKeyChars)) {
      throw invalidRequest(
        `Invalid property name in 'metadata': '${echoed(key)}' is too long. Expected a string with maximum length ${maxTagKeyChars}.`,
        `metadata.${echoed(key)}`,
        "string_above_max_length",
      );
    }
    tagValue(tags[key], `metadata.${key}`);
  }
  return tags as Record<string, string>;
}
