import { describe, expect, test } from "bun:test";
import { parseChatInput } from "./chat-request.ts";
import { GatewayError } from "./errors.ts";

const hello = [{ role: "user", content: "hi" }];

/** The param and code of the 400 a body is answered with, in OpenAI's error type. */
function rejection(body: unknown): [param: string | null, code: string] {
  try {
    parseChatInput(body);
  } catch (e) {
    if (!(e instanceof GatewayError)) throw e;
    expect([e.status, e.type]).toEqual([400, "invalid_request_error"]);
    return [e.param, e.code];
  }
  throw new Error("the body was accepted");
}

const tool = (fn: Record<string, unknown>) => ({ type: "function", function: { name: "f", ...fn } });
const assistantCalls = (calls: unknown) => ({ model: "m", messages: [...hello, { role: "assistant", content: null, tool_calls: calls }] });
const call = (fn: Record<string, unknown> = {}, extra: Record<string, unknown> = {}) => ({
  id: "c1",
  type: "function",
  function: { name: "f", arguments: "{}", ...fn },
  ...extra,
});
const withMessage = (message: unknown) => ({ model: "m", messages: [message] });
const withPart = (part: unknown) => withMessage({ role: "user", content: [part] });

// Each body fails on one field: [what, the request's fields over a valid one, param, code].
const invalid: Array<[string, Record<string, unknown>, string | null, string]> = [
  ["no model", { model: undefined }, "model", "missing_required_parameter"],
  ["a model that is not a string", { model: 5 }, "model", "invalid_type"],
  ["temperature above 2", { temperature: 5 }, "temperature", "decimal_above_max_value"],
  ["temperature below 0", { temperature: -0.5 }, "temperature", "decimal_below_min_value"],
  ["temperature as a string", { temperature: "hot" }, "temperature", "invalid_type"],
  ["top_p above 1", { top_p: 7 }, "top_p", "decimal_above_max_value"],
  ["presence_penalty above 2", { presence_penalty: 99 }, "presence_penalty", "decimal_above_max_value"],
  ["frequency_penalty below -2", { frequency_penalty: -99 }, "frequency_penalty", "decimal_below_min_value"],
  ["seed as a string", { seed: "x" }, "seed", "invalid_type"],
  ["seed as a fraction", { seed: 1.5 }, "seed", "invalid_type"],
  // 2^53 + 1 reads as 2^53: passing it on would change the seed.
  ["seed past 2^53", { seed: 2 ** 53 }, "seed", "integer_above_max_value"],
  ["seed below -2^53", { seed: -(2 ** 60) }, "seed", "integer_below_min_value"],
  ["logit_bias not an object", { logit_bias: [1] }, "logit_bias", "invalid_type"],
  ["logit_bias above 100", { logit_bias: { "50256": 101 } }, "logit_bias.50256", "decimal_above_max_value"],
  ["logit_bias below -100", { logit_bias: { "50256": -101 } }, "logit_bias.50256", "decimal_below_min_value"],
  ["logit_bias keyed by a word", { logit_bias: { cat: 1 } }, "logit_bias.cat", "invalid_value"],
  ["logit_bias with a string bias", { logit_bias: { "1": "up" } }, "logit_bias.1", "invalid_type"],
  [
    "logit_bias over 1,024 tokens",
    { logit_bias: Object.fromEntries(Array.from({ length: 1_025 }, (_, i) => [String(i), 1])) },
    "logit_bias",
    "invalid_value",
  ],
  ["logprobs not a boolean", { logprobs: "yes" }, "logprobs", "invalid_type"],
  ["top_logprobs above 20", { logprobs: true, top_logprobs: 21 }, "top_logprobs", "integer_above_max_value"],
  ["top_logprobs as a fraction", { logprobs: true, top_logprobs: 1.5 }, "top_logprobs", "invalid_type"],
  ["top_logprobs without logprobs", { top_logprobs: 5 }, "top_logprobs", "invalid_value"],
  ["parallel_tool_calls not a boolean", { parallel_tool_calls: "no" }, "parallel_tool_calls", "invalid_type"],
  ["n of 0", { n: 0 }, "n", "integer_below_min_value"],
  ["n above 128", { n: 129 }, "n", "integer_above_max_value"],
  ["n as a fraction", { n: 2.5 }, "n", "invalid_type"],
  ["max_tokens of 0", { max_tokens: 0 }, "max_tokens", "integer_below_min_value"],
  ["max_completion_tokens as a string", { max_completion_tokens: "10" }, "max_completion_tokens", "invalid_type"],
  ["five stop sequences", { stop: ["a", "b", "c", "d", "e"] }, "stop", "array_above_max_length"],
  ["stop as a number", { stop: 5 }, "stop", "invalid_type"],
  ["a stop sequence that is not a string", { stop: [1] }, "stop[0]", "invalid_type"],
  ["stream not a boolean", { stream: "yes" }, "stream", "invalid_type"],
  ["stream_options without stream", { stream_options: { include_usage: true } }, "stream_options", "invalid_value"],
  ["include_usage not a boolean", { stream: true, stream_options: { include_usage: 1 } }, "stream_options.include_usage", "invalid_type"],
  ["web search, charged per call", { web_search_options: {} }, "web_search_options", "unsupported_value"],
  ["tools as a string", { tools: "garbage" }, "tools", "invalid_type"],
  ["129 tools", { tools: Array.from({ length: 129 }, () => tool({})) }, "tools", "array_above_max_length"],
  ["a tool of unknown type", { tools: [{ type: "bogus" }] }, "tools[0].type", "invalid_value"],
  ["a tool without type", { tools: [{ function: { name: "f" } }] }, "tools[0].type", "missing_required_parameter"],
  ["a function tool without function", { tools: [{ type: "function" }] }, "tools[0].function", "missing_required_parameter"],
  ["a function without a name", { tools: [{ type: "function", function: {} }] }, "tools[0].function.name", "missing_required_parameter"],
  ["a function name with a space", { tools: [tool({ name: "look up" })] }, "tools[0].function.name", "invalid_value"],
  ["a function name over 64 characters", { tools: [tool({ name: "f".repeat(65) })] }, "tools[0].function.name", "invalid_value"],
  ["function parameters not an object", { tools: [tool({ parameters: "x" })] }, "tools[0].function.parameters", "invalid_type"],
  ["a function description not a string", { tools: [tool({ description: 1 })] }, "tools[0].function.description", "invalid_type"],
  ["strict not a boolean", { tools: [tool({ strict: "yes" })] }, "tools[0].function.strict", "invalid_type"],
  ["tool_choice of unknown mode", { tool_choice: "sometimes" }, "tool_choice", "invalid_value"],
  ["tool_choice as a number", { tool_choice: 5 }, "tool_choice", "invalid_type"],
  ["tool_choice of unknown type", { tool_choice: { type: "bogus" } }, "tool_choice.type", "invalid_value"],
  ["tool_choice without the function", { tool_choice: { type: "function" } }, "tool_choice.function", "missing_required_parameter"],
  ["tool_choice without the name", { tool_choice: { type: "function", function: {} } }, "tool_choice.function.name", "missing_required_parameter"],
  ["tool_choice without tools", { tool_choice: "auto" }, "tool_choice", "invalid_value"],
  ["an empty list of tools", { tools: [] }, "tools", "empty_array"],
  ["a function of the deprecated form with a name the API does not take", { functions: [{ name: "bad name" }] }, "functions[0].name", "invalid_value"],
  ["function_call without functions", { function_call: "auto" }, "function_call", "invalid_value"],
  ["function_call naming a function not among them", { functions: [{ name: "f" }], function_call: { name: "g" } }, "function_call.name", "invalid_value"],
  ["an image in a system message", { messages: [{ role: "system", content: [{ type: "image_url", image_url: { url: "https://x/y.png" } }] }] }, "messages[0].content[0].type", "invalid_value"],
  ["a refusal part in a user message", { messages: [{ role: "user", content: [{ type: "refusal", refusal: "no" }] }] }, "messages[0].content[0].type", "invalid_value"],
  ["an image in an assistant message", { messages: [{ role: "assistant", content: [{ type: "image_url", image_url: { url: "https://x/y.png" } }] }] }, "messages[0].content[0].type", "invalid_value"],
  ["audio in a format the API does not take", { messages: [{ role: "user", content: [{ type: "input_audio", input_audio: { data: "AAAA", format: "ogg" } }] }] }, "messages[0].content[0].input_audio.format", "invalid_value"],
  ["tool_choice naming a function not among the tools", { tools: [tool({ name: "f" })], tool_choice: { type: "function", function: { name: "g" } } }, "tool_choice.function.name", "invalid_value"],
  ["tool_choice naming a custom tool as a function", { tools: [{ type: "custom", custom: { name: "f" } }], tool_choice: { type: "function", function: { name: "f" } } }, "tool_choice.function.name", "invalid_value"],
  ["response_format of unknown type", { response_format: { type: "bogus" } }, "response_format.type", "invalid_value"],
  ["response_format as a string", { response_format: "json" }, "response_format", "invalid_type"],
  ["json_schema missing", { response_format: { type: "json_schema" } }, "response_format.json_schema", "missing_required_parameter"],
  ["json_schema without a name", { response_format: { type: "json_schema", json_schema: { schema: {} } } }, "response_format.json_schema.name", "missing_required_parameter"],
  ["json_schema schema not an object", { response_format: { type: "json_schema", json_schema: { name: "a", schema: "x" } } }, "response_format.json_schema.schema", "invalid_type"],
  ["user not a string", { user: 5 }, "user", "invalid_type"],
  ["user over 256 characters", { user: "u".repeat(257) }, "user", "string_above_max_length"],
  ["safety_identifier not a string", { safety_identifier: 5 }, "safety_identifier", "invalid_type"],
  ["safety_identifier over 256 characters", { user: "u", safety_identifier: "s".repeat(257) }, "safety_identifier", "string_above_max_length"],
  ["metadata not an object", { metadata: "x" }, "metadata", "invalid_type"],
  ["17 metadata pairs", { metadata: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, "v"])) }, "metadata", "object_above_max_properties"],
  ["a metadata value that is not a string", { metadata: { k: 1 } }, "metadata.k", "invalid_type"],
  ["a metadata value over 512 characters", { metadata: { k: "x".repeat(513) } }, "metadata.k", "string_above_max_length"],
  ["a metadata key over 64 characters", { metadata: { ["k".repeat(65)]: "v" } }, `metadata.${"k".repeat(65)}`, "string_above_max_length"],
  // Messages.
  ["no messages", { messages: undefined }, "messages", "missing_required_parameter"],
  ["messages not an array", { messages: "hi" }, "messages", "invalid_type"],
  ["no message", { messages: [] }, "messages", "empty_array"],
  ["2049 messages", { messages: Array.from({ length: 2049 }, () => hello[0]) }, "messages", "array_above_max_length"],
  ["a message that is not an object", { messages: ["hi"] }, "messages[0]", "invalid_type"],
  ["a message without a role", withMessage({ content: "hi" }), "messages[0].role", "missing_required_parameter"],
  ["an unknown role", withMessage({ role: "robot", content: "hi" }), "messages[0].role", "invalid_value"],
  ["content as a number", withMessage({ role: "user", content: 5 }), "messages[0].content", "invalid_type"],
  ["content as an empty array", withMessage({ role: "user", content: [] }), "messages[0].content", "empty_array"],
  ["a user message without content", withMessage({ role: "user" }), "messages[0].content", "missing_required_parameter"],
  ["a system message without content", withMessage({ role: "system", content: null }), "messages[0].content", "missing_required_parameter"],
  ["a developer message without content", withMessage({ role: "developer" }), "messages[0].content", "missing_required_parameter"],
  ["a name that is not a string", withMessage({ role: "user", content: "hi", name: 1 }), "messages[0].name", "invalid_type"],
  ["a part of unknown type", withPart({ type: "bogus" }), "messages[0].content[0].type", "invalid_value"],
  ["a part that is not an object", withPart("hi"), "messages[0].content[0]", "invalid_type"],
  ["a part without type", withPart({ text: "hi" }), "messages[0].content[0].type", "missing_required_parameter"],
  ["a text part without text", withPart({ type: "text" }), "messages[0].content[0].text", "missing_required_parameter"],
  ["a text part with a number", withPart({ type: "text", text: 1 }), "messages[0].content[0].text", "invalid_type"],
  ["an image part without a url", withPart({ type: "image_url", image_url: {} }), "messages[0].content[0].image_url.url", "missing_required_parameter"],
  ["an image part with a url string only", withPart({ type: "image_url", image_url: "https://x" }), "messages[0].content[0].image_url", "invalid_type"],
  ["an image detail of no known level", withPart({ type: "image_url", image_url: { url: "https://x", detail: "ultra" } }), "messages[0].content[0].image_url.detail", "invalid_value"],
  ["an audio part without data", withPart({ type: "input_audio", input_audio: { format: "wav" } }), "messages[0].content[0].input_audio.data", "missing_required_parameter"],
  ["a file part without the file", withPart({ type: "file" }), "messages[0].content[0].file", "missing_required_parameter"],
  ["a file part naming a stored file", withPart({ type: "file", file: { file_id: "file-1" } }), "messages[0].content[0].file.file_id", "unsupported_value"],
  ["a tool message without tool_call_id", { messages: [...hello, { role: "tool", content: "42" }] }, "messages[1].tool_call_id", "missing_required_parameter"],
  ["a tool_call_id that is not a string", { messages: [...hello, { role: "tool", content: "42", tool_call_id: 7 }] }, "messages[1].tool_call_id", "invalid_type"],
  ["a tool message without content", { messages: [...hello, { role: "tool", tool_call_id: "c1" }] }, "messages[1].content", "missing_required_parameter"],
  ["an assistant message with neither content nor calls", { messages: [...hello, { role: "assistant", content: null }] }, "messages[1].content", "missing_required_parameter"],
  ["an assistant message with no calls and no content", assistantCalls([]), "messages[1].content", "missing_required_parameter"],
  ["an assistant's audio without its id", { messages: [...hello, { role: "assistant", audio: {} }] }, "messages[1].audio.id", "missing_required_parameter"],
  ["an assistant's audio that is not an object", { messages: [...hello, { role: "assistant", audio: "audio_abc" }] }, "messages[1].audio", "invalid_type"],
  ["an assistant's refusal that is not a string", { messages: [...hello, { role: "assistant", content: null, refusal: 5 }] }, "messages[1].refusal", "invalid_type"],
  ["tool_calls not an array", { messages: [...hello, { role: "assistant", content: "ok", tool_calls: {} }] }, "messages[1].tool_calls", "invalid_type"],
  ["a tool call without id", assistantCalls([call({}, { id: undefined })]), "messages[1].tool_calls[0].id", "missing_required_parameter"],
  ["a tool call of unknown type", assistantCalls([call({}, { type: "bogus" })]), "messages[1].tool_calls[0].type", "invalid_value"],
  ["a tool call without a name", assistantCalls([call({ name: undefined })]), "messages[1].tool_calls[0].function.name", "missing_required_parameter"],
  ["tool call arguments as an object", assistantCalls([call({ arguments: {} })]), "messages[1].tool_calls[0].function.arguments", "invalid_type"],
  ["a function message without a name", withMessage({ role: "function", content: "42" }), "messages[0].name", "missing_required_parameter"],
];

describe("chat input", () => {
  test("keeps the OpenAI parameters for upstream and takes the gateway's own fields out", () => {
    const input = parseChatInput({
      model: "mock",
      messages: [{ role: "user", content: "hi" }],
      temperature: 0.2,
      tools: [{ type: "function", function: { name: "f" } }],
      user: "u",
      metadata: { team: "a" },
      stream: false,
      stream_options: null,
    });
    expect(input.model).toBe("mock");
    expect(input.user).toBe("u");
    expect(input.tags).toEqual({ team: "a" });
    expect(input.upstream as unknown).toEqual({
      model: "mock",
      messages: [{ role: "user", content: "hi" }],
      temperature: 0.2,
      tools: [{ type: "function", function: { name: "f" } }],
      user: "u",
    });
  });

  test("the end user is `user`, else `safety_identifier` (OpenAI's successor to it); both go upstream as sent", () => {
    const both = parseChatInput({ model: "m", messages: hello, user: "u", safety_identifier: "s" });
    expect(both.user).toBe("u");
    expect(both.upstream as unknown).toEqual({ model: "m", messages: hello, user: "u", safety_identifier: "s" });
    const successor = parseChatInput({ model: "m", messages: hello, safety_identifier: "hashed-user-7" });
    expect(successor.user).toBe("hashed-user-7");
    expect(successor.upstream as unknown).toEqual({ model: "m", messages: hello, safety_identifier: "hashed-user-7" });
    expect(parseChatInput({ model: "m", messages: hello }).user).toBe("");
  });

  test("metadata goes upstream with a completion the upstream stores (store: true), and is recorded as tags either way", () => {
    const stored = parseChatInput({ model: "m", messages: hello, store: true, metadata: { team: "a" } });
    expect(stored.tags).toEqual({ team: "a" });
    expect(stored.upstream as unknown).toEqual({ model: "m", messages: hello, store: true, metadata: { team: "a" } });
    const unstored = parseChatInput({ model: "m", messages: hello, store: false, metadata: { team: "a" } });
    expect(unstored.tags).toEqual({ team: "a" });
    expect(unstored.upstream as unknown).toEqual({ model: "m", messages: hello, store: false });
    expect(rejection({ model: "m", messages: hello, store: "yes" })).toEqual(["store", "invalid_type"]);
  });

  test("accepts tool turns and content parts", () => {
    const input = parseChatInput({
      model: "m",
      messages: [
        { role: "user", content: [{ type: "text", text: "hi" }] },
        { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "f", arguments: "{}" } }] },
        { role: "tool", tool_call_id: "c1", content: "42" },
      ],
    });
    expect(input.upstream.messages).toHaveLength(3);
  });

  test("an assistant turn without content: its earlier audio answer by id, or its refusal (as the SDK's message has it)", () => {
    const messages = [
      ...hello,
      { role: "assistant", audio: { id: "audio_abc" } },
      { role: "user", content: "and again?" },
      { role: "assistant", content: null, refusal: "I can't help with that.", audio: null, tool_calls: null },
      { role: "user", content: "please" },
    ];
    expect(parseChatInput({ model: "m", messages }).upstream.messages as unknown).toEqual(messages);
  });

  test("metadata: at most 16 pairs, keys up to 64 characters and values up to 512, counted as characters", () => {
    const at = (metadata: Record<string, string>) => parseChatInput({ model: "m", messages: hello, metadata }).tags;
    const most = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`${i}`.padEnd(64, "k"), "🧪".repeat(512)]));
    expect(at(most)).toEqual(most);
    expect(at({ ["é".repeat(64)]: "é".repeat(512) })).toEqual({ ["é".repeat(64)]: "é".repeat(512) });
    expect(rejection({ model: "m", messages: hello, metadata: { k: "🧪".repeat(513) } })).toEqual(["metadata.k", "string_above_max_length"]);
    expect(rejection({ model: "m", messages: hello, metadata: { ["é".repeat(65)]: "v" } })).toEqual([`metadata.${"é".repeat(65)}`, "string_above_max_length"]);
  });

  test("an over-long metadata key is echoed cut between characters, never inside one", () => {
    // 256 UTF-16 units of "a" + emoji end inside the 128th emoji: half of it would be a lone surrogate, which JSON writes
    // as an escape and gRPC's grpc-message cannot carry.
    const key = `a${"\u{1F600}".repeat(200)}`;
    const [param] = rejection({ model: "m", messages: hello, metadata: { [key]: "v" } }) as [string, string];
    expect(param).toBe(`metadata.a${"\u{1F600}".repeat(127)}...`);
    expect(() => encodeURIComponent(param)).not.toThrow();
  });

  test.each(invalid)("400 for %s", (_, fields, param, code) => {
    expect(rejection({ model: "m", messages: hello, ...fields })).toEqual([param, code]);
  });

  test("a value echoed in an error is cut at 256 characters, however long it came", () => {
    let said = "";
    try {
      parseChatInput({ model: "m", messages: [{ role: "r".repeat(100_000), content: "x" }] });
    } catch (e) {
      said = (e as Error).message;
    }
    expect(said).toStartWith(`Invalid value for 'messages[0].role': '${"r".repeat(256)}...'. Supported values are:`);
  });

  test("errors read as OpenAI's", () => {
    const message = (body: unknown) => {
      try {
        parseChatInput(body);
      } catch (e) {
        return (e as Error).message;
      }
    };
    expect(message({ model: "m", messages: hello, temperature: 5 })).toBe(
      "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
    );
    // As the body arrived: its seed already rounded by JSON.parse, so the number read is not repeated back.
    expect(message(JSON.parse(`{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 9007199254740993}`))).toBe(
      "Invalid 'seed': integer above maximum value. Expected a value <= 9007199254740991, but got a number past 2^53, which JSON numbers do not carry exactly instead.",
    );
    expect(message({ model: "m", messages: hello, temperature: "hot" })).toBe(
      "Invalid type for 'temperature': expected a decimal, but got a string instead.",
    );
    expect(message({ model: "m", messages: [{ role: "tool", content: "x" }] })).toBe("Missing required parameter: 'messages[0].tool_call_id'.");
    expect(message(withPart({ type: "bogus" }))).toBe(
      "Invalid value for 'messages[0].content[0].type': 'bogus'. Supported values are: 'text', 'image_url', 'input_audio', 'file'.",
    );
  });

  test("a body with every checked field at its limits passes, and is sent upstream as it came", () => {
    const fields = {
      model: "m",
      messages: [
        { role: "developer", content: "be brief" },
        { role: "system", content: [{ type: "text", text: "be kind" }] },
        {
          role: "user",
          name: "ann",
          content: [
            { type: "text", text: "what is this?" },
            { type: "image_url", image_url: { url: "https://example.com/cat.png", detail: "low" } },
            { type: "input_audio", input_audio: { data: "AAAA", format: "wav" } },
            { type: "file", file: { filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0xLjQK" } },
          ],
        },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            { id: "c1", type: "function", function: { name: "look_up", arguments: "{}" } },
            { id: "c2", type: "custom", custom: { name: "sql", input: "select 1" } },
          ],
        },
        { role: "tool", tool_call_id: "c1", content: [{ type: "text", text: "a cat" }] },
        { role: "assistant", content: [{ type: "refusal", refusal: "no" }] },
        { role: "assistant", content: null, function_call: { name: "look_up", arguments: "{}" } },
        { role: "function", name: "look_up", content: null },
        { role: "user", content: "" },
      ],
      temperature: 2,
      top_p: 0,
      presence_penalty: -2,
      frequency_penalty: 2,
      seed: -7,
      logit_bias: { "50256": -100, "1": 100 },
      logprobs: true,
      top_logprobs: 20,
      parallel_tool_calls: false,
      n: 128,
      max_tokens: 1,
      max_completion_tokens: 2 ** 31 - 1,
      stop: ["a", "b", "c", "d"],
      tools: [
        ...Array.from({ length: 127 }, (_, i) => tool({ name: `f_${i}`.padEnd(64, "-") })),
        { type: "custom", custom: { name: "sql", format: { type: "text" } } },
      ],
      tool_choice: { type: "function", function: { name: "f_0".padEnd(64, "-") } },
      response_format: { type: "json_schema", json_schema: { name: "answer", schema: { type: "object" }, strict: true } },
      user: "u".repeat(256),
      // Fields the gateway does not know pass through for the upstream to judge.
      verbosity: "low",
      a_future_field: { anything: [1, "two"] },
    };
    const input = parseChatInput({ ...fields, metadata: { team: "a" }, stream: true, stream_options: { include_usage: true } });
    expect(input.upstream as unknown).toEqual({ ...fields, stream_options: { include_usage: true } });
    expect(input.tags).toEqual({ team: "a" });
    for (const choice of ["none", "auto", "required", { type: "custom", custom: { name: "sql" } }, { type: "allowed_tools", allowed_tools: { mode: "auto", tools: [] } }]) {
      expect(parseChatInput({ ...fields, tool_choice: choice }).upstream.tool_choice as unknown).toEqual(choice);
    }
    for (const format of [{ type: "text" }, { type: "json_object" }, { type: "json_schema", json_schema: { name: "a-b_c" } }]) {
      expect(parseChatInput({ ...fields, response_format: format }).upstream.response_format as unknown).toEqual(format);
    }
  });

  test("a body's own __proto__ field is refused, never made the upstream request's prototype", () => {
    // As JSON.parse leaves it: an own field, which a copy by assignment would turn into a prototype.
    const body = JSON.parse('{"model":"m","messages":[{"role":"user","content":"x"}],"__proto__":{"n":1000000,"max_tokens":-5}}');
    const error = (() => {
      try {
        parseChatInput(body);
      } catch (e) {
        return e as GatewayError;
      }
    })();
    expect(error).toMatchObject({ status: 400, param: "__proto__", code: "unknown_parameter" });
  });

  test("null stands for an absent optional field", () => {
    const nulls = { temperature: null, top_p: null, n: null, seed: null, logit_bias: null, tools: null, tool_choice: null, response_format: null, user: null, metadata: null };
    const input = parseChatInput({ model: "m", messages: hello, ...nulls });
    expect([input.user, input.tags]).toEqual(["", {}]);
  });

  test("streaming: stream is the gateway's; the client's stream_options are kept for the upstream, include_usage noted", () => {
    const input = parseChatInput({
      model: "m",
      messages: [{ role: "user", content: "x" }],
      stream: true,
      stream_options: { include_usage: true, include_obfuscation: false },
    });
    expect([input.stream, input.includeUsage]).toEqual([true, true]);
    expect(input.upstream as unknown).toEqual({
      model: "m",
      messages: [{ role: "user", content: "x" }],
      stream_options: { include_usage: true, include_obfuscation: false },
    });
    expect(rejection({ model: "m", messages: hello, stream: true, stream_options: "usage" })).toEqual(["stream_options", "invalid_type"]);
    const plain = parseChatInput({ model: "m", messages: [{ role: "user", content: "x" }], stream: true });
    expect([plain.stream, plain.includeUsage]).toEqual([true, false]);
    expect(() => parseChatInput({ model: "m", messages: [{ role: "user", content: "x" }], stream_options: {} })).toThrow(/only allowed/);
  });
});
