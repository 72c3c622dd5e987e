import { checkNamedTool, parseTags } from "./chat-request.ts";
import { invalidRequest } from "./errors.ts";
import type { ResponsesRequest } from "./providers/provider.ts";
import {
  absent,
  arrayTooLong,
  boolean,
  byType,
  type Check,
  decimal,
  integer,
  isObject,
  missing,
  object,
  objectWith,
  parseModel,
  parseUser,
  storedFile,
  string,
  unsupported,
  wrongType,
} from "./request-checks.ts";

/** A Responses API request as the gateway understands it. */
export interface ResponsesInput {
  /** Public model name asked for. */
  model: string;
  /** The request for upstream: the client's body without `stream`; `model` is set per target. */
  upstream: ResponsesRequest;
  /** End-user id from `user`, else `safety_identifier`; empty when both are absent. */
  user: string;
  /** From `metadata`: recorded with the request's metrics, and sent upstream as it came. */
  tags: Record<string, string>;
  /** `stream: true`: answer with server-sent events. */
  stream: boolean;
  /**
   * The request builds on state one upstream account holds (`previous_response_id`, an input item referring to a
   * stored one):
   * only the model's first target can serve it, and the gateway does not see all it reads.
   */
  chained: boolean;
  /**
   * The upstream reads into the request what the gateway does not see: a chained request's earlier turns, or what an
   * `mcp` tool brings (its server's tool definitions, the outputs of the calls the upstream makes to it).
   */
  readsUnseen: boolean;
}

/** What the model reads of a request, for token counts: texts, and parts whose size their bytes do not tell. */
export interface ResponsesPrompt {
  texts: string[];
  /** Image, file and audio parts, as chat gives them: `image_url` (with its URL and detail), `file`, `input_audio`. */
  parts: PromptPart[];
  /** Items (messages, tool calls and outputs) the input holds: each is framed. */
  items: number;
}

const maxInputItems = 2048;
const maxTools = 128;
const int32Max = 2 ** 31 - 1;

/**
 * Hosted tools an upstream charges per call (searches, containers, images, computer sessions) on top of tokens: no
 * price in the config says what they cost, so a request using one could not be billed exactly. By family, so dated
 * versions (`web_search_preview_2025_03_11`) are refused too.
 */
const feeChargingTools = /^(?:web_search|file_search|code_interpreter|image_generation|computer_use)/;

const functionTool = objectWith({ name: string }, { description: string, parameters: object, strict: boolean });

const tool: Check = (v, param) => {
  if (!isObject(v)) throw wrongType(param, "an object", v);
  const type = v.type;
  if (type === undefined || type === null) throw missing(`${param}.type`);
  if (typeof type !== "string") throw wrongType(`${param}.type`, "a string", type);
  if (feeChargingTools.test(type)) {
    throw invalidRequest(
      `Invalid value for '${param}.type': '${type}' is a hosted tool its upstream charges per call, which this ` +
        "gateway cannot bill exactly; use function or custom tools.",
      `${param}.type`,
      "unsupported_value",
    );
  }
  if (type === "function") functionTool(v, param);
  else if (type === "custom") objectWith({ name: string })(v, param);
};

/** An image or file part, or a tool's screenshot, given by `file_id` rather than by its content or URL. */
const noFileId: Check = (v, param) => {
  if (isObject(v) && !absent(v.file_id)) throw storedFile(`${param}.file_id`);
};

const inputPart = byType({
  input_text: objectWith({ text: string }),
  output_text: objectWith({ text: string }),
  refusal: objectWith({ refusal: string }),
  input_image: noFileId,
  input_file: noFileId,
  input_audio: object,
});

const roles = new Set(["user", "assistant", "system", "developer"]);

/**
 * An input item naming one the upstream account stored: `{"type": "item_reference", "id"}`, or its `id` alone, as
 * the API takes it when neither `type` nor `role` is given.
 */
const isItemReference = (v: Record<string, unknown>) =>
  v.type === "item_reference" || (absent(v.type) && absent(v.role) && !absent(v.id));

/**
 * An input item: a message (`role` and `content`, with or without `type: "message"`), a reference to a stored item,
 * or another typed item.
 */
const inputItem: Check = (v, param) => {
  if (!isObject(v)) throw wrongType(param, "an object", v);
  if (isItemReference(v)) {
    if (absent(v.id)) throw missing(`${param}.id`);
    if (typeof v.id !== "string") throw wrongType(`${param}.id`, "a string", v.id);
  } else if (v.type === undefined || v.type === null || v.type === "message") {
    if (v.role === undefined || v.role === null) throw missing(`${param}.role`);
    if (typeof v.role !== "string") throw wrongType(`${param}.role`, "a string", v.role);
    if (!roles.has(v.role)) throw unsupported(`${param}.role`, v.role, [...roles]);
    const content = v.content;
    if (content === undefined || content === null) throw missing(`${param}.content`);
    if (Array.isArray(content)) {
      for (let j = 0; j < content.length; j++) inputPart(content[j], `${param}.content[${j}]`);
    } else if (typeof content !== "string") throw wrongType(`${param}.content`, "a string or an array", content);
  } else if (typeof v.type !== "string") throw wrongType(`${param}.type`, "a string", v.type);
  else if (Array.isArray(v.output)) {
    // A tool's output given as parts (function_call_output), or as a screenshot (computer_call_output).
    for (let j = 0; j < v.output.length; j++) noFileId(v.output[j], `${param}.output[${j}]`);
  } else noFileId(v.output, `${param}.output`);
};

/** Fields whose meaning is fixed, checked as the API checks them; any other field passes through to the upstream. */
const fieldChecks = new Map<string, Check>([
  ["stream", boolean],
  ["store", boolean],
  ["background", boolean],
  ["instructions", string],
  ["max_output_tokens", integer(16, int32Max)],
  ["temperature", decimal(0, 2)],
  ["top_p", decimal(0, 1)],
  ["parallel_tool_calls", boolean],
  ["previous_response_id", string],
]);

/**
 * Checks the fields whose meaning is fixed (model, input, instructions, max_output_tokens, tools, user,
 * safety_identifier, metadata) and leaves the others for the upstream to judge. Throws a 400 naming the field.
 */
export function parseResponsesInput(body: unknown): ResponsesInput {
  if (!isObject(body)) throw invalidRequest("The request body must be a JSON object.");
  const model = parseModel(body);
  const upstream: Record<string, unknown> = {};
  for (const key in body) {
    // As for chat: "__proto__" copied by assignment would become the upstream request's prototype.
    if (key === "__proto__") {
      throw invalidRequest(`Unrecognized request argument supplied: ${key}`, key, "unknown_parameter");
    }
    const value = body[key];
    if (value !== undefined && value !== null) fieldChecks.get(key)?.(value, key);
    if (key !== "stream") upstream[key] = value;
  }
  const input = body.input;
  if (Array.isArray(input)) {
    if (input.length > maxInputItems) throw arrayTooLong("input", maxInputItems, input.length);
    for (let i = 0; i < input.length; i++) inputItem(input[i], `input[${i}]`);
  } else if (input !== undefined && input !== null && typeof input !== "string") {
    throw wrongType("input", "a string or an array of input items", input);
  }
  const tools = body.tools;
  if (tools !== undefined && tools !== null) {
    if (!Array.isArray(tools)) throw wrongType("tools", "an array", tools);
    if (tools.length > maxTools) throw arrayTooLong("tools", maxTools, tools.length);
    for (let i = 0; i < tools.length; i++) tool(tools[i], `tools[${i}]`);
  }
  // A choice that obliges the model to call a tool needs one to call.
  if (body.tool_choice === "required" && (!Array.isArray(tools) || tools.length === 0)) {
    throw invalidRequest("Invalid value for 'tool_choice': 'required' needs at least one tool in 'tools'.", "tool_choice");
  }
  checkNamedTool(body.tool_choice, tools, (v) => v.name, () => "name");
  // A background response is answered before it has run, its usage known only to whoever polls it later: unbillable.
  if (body.background === true) {
    throw invalidRequest(
      "Invalid value for 'background': background responses are not served by this gateway, which bills each " +
        "response as it is answered.",
      "background",
      "unsupported_value",
    );
  }
  // Conversations are made through the Conversations API, which the gateway does not serve: one named here would be
  // the upstream account's own, every org's, into which this request would read and write.
  const conversation = body.conversation;
  if (conversation !== undefined && conversation !== null) {
    throw invalidRequest(
      "Invalid value for 'conversation': conversations are not served by this gateway; continue a response with " +
        "previous_response_id.",
      "conversation",
      "unsupported_value",
    );
  }
  // Prompts are made in the upstream account's dashboard, for no org: one named would be the operator's, or another
  // tenant's of that account, its instructions and files read into this request.
  if (!absent(body.prompt)) {
    throw invalidRequest(
      "Invalid value for 'prompt': stored prompts are not served by this gateway; send the prompt's instructions " +
        "and input instead.",
      "prompt",
      "unsupported_value",
    );
  }
  const user = parseUser(body, ["user", "safety_identifier"]);
  const tags = parseTags(body.metadata);
  const chained =
    !absent(body.previous_response_id) ||
    (Array.isArray(input) && input.some((item) => isObject(item) && isItemReference(item)));
  const stream = body.stream === true;
  const readsUnseen = chained || (Array.isArray(tools) && tools.some((t) => isObject(t) && t.type === "mcp"));
  return { model, upstream: upstream as unknown as ResponsesRequest, user, tags, stream, chained, readsUnseen };
}

/** An image, file or audio part, as a chat request gives it. */
export interface PromptPart {
  type: string;
  image_url?: { url?: unknown; detail?: unknown };
}

const partKinds: Record<string, string> = { input_image: "image_url", input_file: "file", input_audio: "input_audio" };

/**
 * What the model reads of a request that the gateway sees: instructions, input items (message text, tool calls and
 * their outputs, other items as JSON), tool definitions and the text format. A chained request's earlier turns are
 * the upstream's, not here.
 */
export function responsesPrompt(request: ResponsesRequest): ResponsesPrompt {
  const r = request as unknown as Record<string, unknown>;
  const texts: string[] = [];
  const parts: PromptPart[] = [];
  let items = 0;
  if (typeof r.instructions === "string" && r.instructions) texts.push(r.instructions);
  const input = r.input;
  if (typeof input === "string") {
    texts.push(input);
    items = 1;
  } else if (Array.isArray(input)) {
    items = input.length;
    // Message content, and a tool's output given as parts: an image or file there is one, whatever its bytes.
    const addParts = (content: Record<string, unknown>[]) => {
      for (const part of content) {
        const kind = partKinds[part.type as string];
        if (kind === "image_url") parts.push({ type: kind, image_url: { url: part.image_url, detail: part.detail } });
        else if (kind) parts.push({ type: kind });
        else if (typeof part.text === "string") texts.push(part.text);
        else if (typeof part.refusal === "string") texts.push(part.refusal);
        else texts.push(JSON.stringify(part));
      }
    };
    for (const item of input as Record<string, unknown>[]) {
      const content = item.content;
      if (typeof content === "string") texts.push(content);
      else if (Array.isArray(content)) addParts(content);
      else if (item.type === "function_call" || item.type === "custom_tool_call") {
        for (const text of [item.name, item.arguments, item.input]) if (typeof text === "string") texts.push(text);
      } else if (item.type === "function_call_output" || item.type === "custom_tool_call_output") {
        const output = item.output;
        if (Array.isArray(output) && output.every(isObject)) addParts(output);
        else texts.push(typeof output === "string" ? output : JSON.stringify(output ?? ""));
      } else texts.push(JSON.stringify(item));
    }
  }
  if (Array.isArray(r.tools) && r.tools.length > 0) texts.push(JSON.stringify(r.tools));
  if (isObject(r.text) && r.text.format !== undefined) texts.push(JSON.stringify(r.text.format));
  return { texts, parts, items };
}
