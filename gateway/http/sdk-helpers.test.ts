import { describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { zodFunction, zodResponseFormat, zodResponsesFunction, zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";
import { create } from "@bufbuild/protobuf";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { ChatCompletionParamsSchema } from "../../gen/gateway/v1/gateway_pb.ts";
import type { FakeUpstream } from "../testing/fake-upstream.ts";
import { gatewayOnFakeUpstream, type TestGateway } from "../testing/gateway-on-fake-upstream.ts";

// The official SDK's higher-level helpers (structured outputs parsed against a schema, tool arguments parsed, stream
// helpers assembling a final object, the tool loop) against the gateway's mock provider and an OpenAI-compatible
// upstream on a socket, on both REST ports.
let gateway: TestGateway;
let upstream: FakeUpstream;

gatewayOnFakeUpstream(
  (url) =>
    [
      "providers:",
      "  - { name: mock, kind: mock }",
      `  - { name: fake, kind: openai, base_url: "${url}" }`,
      "models:",
      "  - name: mock",
      "    targets: [{ provider: mock, model: mock-echo-1 }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      "  - name: ok",
      "    targets: [{ provider: fake, model: ok }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
    ].join("\n"),
  (served) => ({ upstream, gateway } = served),
);

const Plan = z.object({
  title: z.string(),
  kind: z.enum(["trip", "meeting"]),
  when: z.string().datetime(),
  guests: z.number().int().positive(),
  stops: z.array(z.object({ place: z.string() })),
  note: z.string().nullable(),
  owner: z.object({ email: z.string().email(), vip: z.boolean() }),
});
const expected = (echo: string): z.infer<typeof Plan> => ({
  title: echo,
  kind: "trip",
  when: "1970-01-01T00:00:00Z",
  guests: 1,
  stops: [],
  note: echo,
  owner: { email: "mock@example.com", vip: false },
});
const Weather = z.object({ city: z.string(), days: z.number().int().min(1).max(7) });

for (const [port, base] of [
  ["RPC port", () => gateway.url],
  ["REST port", () => gateway.restUrl],
] as const) {
  describe(`the SDK's helpers on the mock provider, ${port}`, () => {
    const sdk = () => new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 0 });
    const messages = [{ role: "user" as const, content: "plan it" }];

    test("chat structured output parses against its schema, whole and streamed", async () => {
      const response_format = zodResponseFormat(Plan, "plan");
      const whole = await sdk().chat.completions.parse({ model: "mock", messages, response_format });
      expect(whole.choices[0]?.message.parsed).toEqual(expected("mock reply: plan it"));
      const stream_options = { include_usage: true };
      const stream = sdk().chat.completions.stream({ model: "mock", messages, response_format, stream_options });
      const final = await stream.finalChatCompletion();
      expect(final.choices[0]?.message.parsed).toEqual(expected("mock reply: plan it"));
      expect(final.usage?.completion_tokens).toBeGreaterThan(0);
      // A JSON object without a schema stays the echo in JSON.
      const json = { type: "json_object" as const };
      const plain = await sdk().chat.completions.create({ model: "mock", messages, response_format: json });
      expect(JSON.parse(plain.choices[0]?.message.content ?? "")).toEqual({ reply: "mock reply: plan it" });
    });

    test("a required tool is called with arguments its parameters accept, parsed by the SDK", async () => {
      const tools = [zodFunction({ name: "weather", parameters: Weather })];
      const whole = await sdk().chat.completions.parse({ model: "mock", messages, tools, tool_choice: "required" });
      expect(whole.choices[0]?.message.tool_calls?.[0]).toMatchObject({
        function: { name: "weather", parsed_arguments: { city: "mock reply: plan it", days: 1 } },
      });
      const stream = sdk().chat.completions.stream({ model: "mock", messages, tools, tool_choice: "required" });
      const final = await stream.finalChatCompletion();
      expect(final.choices[0]?.message.tool_calls?.[0]).toMatchObject({
        function: { name: "weather", parsed_arguments: { city: "mock reply: plan it", days: 1 } },
      });
    });

    test("Responses API structured output and function calls parse, whole and streamed", async () => {
      const text = { format: zodTextFormat(Plan, "plan") };
      const whole = await sdk().responses.parse({ model: "mock", input: "plan it", text });
      expect(whole.output_parsed).toEqual(expected("mock reply: plan it"));
      const final = await sdk().responses.stream({ model: "mock", input: "plan it", text }).finalResponse();
      expect(final.output_parsed).toEqual(expected("mock reply: plan it"));
      const tools = [zodResponsesFunction({ name: "weather", parameters: Weather })];
      const called = await sdk().responses.parse({ model: "mock", input: "plan it", tools, tool_choice: "required" });
      expect(called.output[0]).toMatchObject({
        type: "function_call",
        name: "weather",
        parsed_arguments: { city: "mock reply: plan it", days: 1 },
      });
    });
  });
}

/** A streamed answer as an upstream sends it: these chunks, the usage, [DONE]. */
function events(deltas: Array<[delta: Record<string, unknown>, finish?: string]>, usage: Record<string, number>) {
  const base = { id: "chatcmpl-up", object: "chat.completion.chunk", created: 1, model: "ok-up" };
  const chunk = ([delta, finish]: (typeof deltas)[number]) => ({
    ...base,
    choices: [{ index: 0, delta, finish_reason: finish ?? null }],
  });
  const chunks = deltas.map(chunk);
  const text = [...chunks, { ...base, choices: [], usage }].map((c) => `data: ${JSON.stringify(c)}\n\n`).join("");
  return { body: { contentType: "text/event-stream", text: `${text}data: [DONE]\n\n` } };
}

for (const [port, base] of [
  ["RPC port", () => gateway.url],
  ["REST port", () => gateway.restUrl],
] as const) {
  describe(`the SDK's helpers on an OpenAI-compatible upstream, ${port}`, () => {
    const sdk = () => new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 0 });
    /** The tool calls the SDK's stream helper assembles of `deltas` that the upstream streams, asked for the weather. */
    const assembledCalls = async (deltas: Parameters<typeof events>[0]) => {
      upstream.script("ok", events(deltas, { prompt_tokens: 40, completion_tokens: 30, total_tokens: 70 }));
      const tools = [zodFunction({ name: "weather", parameters: Weather })];
      const messages = [{ role: "user" as const, content: "weather?" }];
      const final = await sdk().chat.completions.stream({ model: "ok", messages, tools }).finalChatCompletion();
      return final.choices[0]?.message.tool_calls ?? [];
    };

    test("parallel tool calls streamed in pieces are assembled, each round of the tool loop metered", async () => {
      const call = (index: number, id: string) => ({
        tool_calls: [{ index, id, type: "function", function: { name: "weather", arguments: "" } }],
      });
      const args = (index: number, text: string) => ({ tool_calls: [{ index, function: { arguments: text } }] });
      upstream.script(
        "ok",
        // Two calls in one answer, their arguments in pieces.
        events(
          [
            [{ role: "assistant", content: null }],
            [call(0, "call_a")],
            [args(0, '{"city":')],
            [args(0, '"Rome","days":1}')],
            [call(1, "call_b")],
            [args(1, '{"city":"Oslo",')],
            [args(1, '"days":2}')],
            [{}, "tool_calls"],
          ],
          { prompt_tokens: 40, completion_tokens: 30, total_tokens: 70 },
        ),
        events([[{ role: "assistant", content: "" }], [{ content: "Sunny in both." }], [{}, "stop"]], {
          prompt_tokens: 90,
          completion_tokens: 5,
          total_tokens: 95,
        }),
      );
      const asked: unknown[] = [];
      const runner = sdk().chat.completions.runTools({
        model: "ok",
        stream: true,
        stream_options: { include_usage: true },
        messages: [{ role: "user", content: "weather in Rome and Oslo?" }],
        tools: [zodFunction({ name: "weather", parameters: Weather, function: (a) => (asked.push(a), "sunny") })],
      });
      expect(await runner.finalContent()).toBe("Sunny in both.");
      expect(asked).toEqual([{ city: "Rome", days: 1 }, { city: "Oslo", days: 2 }]);
      expect(await runner.totalUsage()).toEqual({ prompt_tokens: 130, completion_tokens: 35, total_tokens: 165 });
      // The second round sent the calls and their results back, in order.
      const resent = upstream.seen("ok")[1]?.body.messages as Array<Record<string, unknown>>;
      expect(resent.map((m) => m.role)).toEqual(["user", "assistant", "tool", "tool"]);
      expect(resent.slice(2).map((m) => m.tool_call_id)).toEqual(["call_a", "call_b"]);
      const rows = gateway.shipper.rows.slice(-2);
      expect(rows.map((m) => [m.usage?.inputTokens, m.usage?.outputTokens, m.costNanos])).toEqual([
        [40n, 30n, 70_000n],
        [90n, 5n, 95_000n],
      ]);
    });

    test("a stream whose chunks never finish a choice before [DONE] ends each open choice as stopped, a success", async () => {
      // As some Gemini proxies and other compatible servers stream: no finish_reason on any chunk, then [DONE].
      const usage = { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15 };
      upstream.script("ok", events([[{ role: "assistant", content: "Hel" }], [{ content: "lo" }]], usage));
      const messages = [{ role: "user" as const, content: "hi" }];
      const stream_options = { include_usage: true };
      const final = await sdk().chat.completions.stream({ model: "ok", messages, stream_options }).finalChatCompletion();
      expect(final.choices.map((c) => [c.message.content, c.finish_reason])).toEqual([["Hello", "stop"]]);
      expect(final.usage).toMatchObject(usage);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, costNanos: 15_000n });

      // Of two choices, one finished: the other, still open at [DONE], is stopped, the finished one as it came.
      const base = { id: "chatcmpl-up", object: "chat.completion.chunk", created: 1, model: "ok-up" };
      const choice = (index: number, content: string, finish: string | null) => ({
        ...base,
        choices: [{ index, delta: { role: "assistant", content }, finish_reason: finish }],
      });
      const two = [choice(0, "one", null), choice(1, "two", null), choice(0, "", "length"), { ...base, choices: [], usage }];
      const text = `${two.map((c) => `data: ${JSON.stringify(c)}\n\n`).join("")}data: [DONE]\n\n`;
      upstream.script("ok", { body: { contentType: "text/event-stream", text } });
      const both = await sdk().chat.completions.stream({ model: "ok", messages, n: 2 }).finalChatCompletion();
      expect(both.choices.map((c) => [c.message.content, c.finish_reason])).toEqual([
        ["one", "length"],
        ["two", "stop"],
      ]);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.OK, costNanos: 15_000n });

      // Without [DONE] the same stream was cut: the client gets the upstream's failure.
      const cut = events([[{ role: "assistant", content: "Hel" }], [{ content: "lo" }]], usage);
      cut.body.text = cut.body.text.replace("data: [DONE]\n\n", "");
      upstream.script("ok", cut);
      const failed = sdk().chat.completions.stream({ model: "ok", messages }).finalChatCompletion();
      await expect(failed).rejects.toThrow("The upstream of `ok` failed mid-stream.");
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.UPSTREAM_ERROR, httpStatus: 502 });
    });

    test("tool calls streamed without their index, as Gemini's OpenAI-compatible endpoint sends them, are assembled", async () => {
      const whole = (id: string, city: string) => ({
        id,
        type: "function",
        function: { name: "weather", arguments: JSON.stringify({ city, days: 1 }) },
      });
      // Each call whole in one delta, two in the first chunk; a third's arguments continued in a delta of no id.
      const later = { id: "call_c", type: "function", function: { name: "weather", arguments: '{"city":"Lima",' } };
      const calls = await assembledCalls([
        [{ role: "assistant", tool_calls: [whole("call_a", "Rome"), whole("call_b", "Oslo")] }],
        [{ tool_calls: [later] }],
        [{ tool_calls: [{ function: { arguments: '"days":1}' } }] }],
        [{}, "tool_calls"],
      ]);
      expect(calls.map((c) => [c.id, c.type === "function" ? c.function.parsed_arguments : undefined])).toEqual([
        ["call_a", { city: "Rome", days: 1 }],
        ["call_b", { city: "Oslo", days: 1 }],
        ["call_c", { city: "Lima", days: 1 }],
      ]);
    });

    test("tool calls an upstream sends without their type (Mistral's), streamed or whole, are function calls the helpers take", async () => {
      // As Mistral's API sends them: each call whole, of no type.
      const untyped = (id: string, city: string) => ({
        id,
        function: { name: "weather", arguments: JSON.stringify({ city, days: 1 }) },
        index: 0,
      });
      const usage = { prompt_tokens: 40, completion_tokens: 30, total_tokens: 70 };
      upstream.script(
        "ok",
        events([[{ role: "assistant", content: "", tool_calls: [untyped("call_a", "Rome")] }], [{}, "tool_calls"]], usage),
      );
      const tools = [zodFunction({ name: "weather", parameters: Weather })];
      const messages = [{ role: "user" as const, content: "weather?" }];
      const streamed = await sdk().chat.completions.stream({ model: "ok", messages, tools }).finalChatCompletion();
      const calls = streamed.choices[0]?.message.tool_calls ?? [];
      expect(calls.map((c) => [c.id, c.type, c.type === "function" ? c.function.parsed_arguments : undefined])).toEqual([
        ["call_a", "function", { city: "Rome", days: 1 }],
      ]);

      const { index: _, ...call } = untyped("call_b", "Oslo");
      const message = { role: "assistant", content: null, tool_calls: [call] };
      const whole = { id: "chatcmpl-up", object: "chat.completion", created: 1, model: "ok-up", usage };
      const answer = { ...whole, choices: [{ index: 0, message, finish_reason: "tool_calls" }] };
      upstream.script("ok", { body: { contentType: "application/json", text: JSON.stringify(answer) } });
      const parsed = await sdk().chat.completions.parse({ model: "ok", messages, tools });
      expect(parsed.choices[0]?.message.tool_calls).toMatchObject([
        { id: "call_b", type: "function", function: { parsed_arguments: { city: "Oslo", days: 1 } } },
      ]);
    });

    test("a stream that never says its role (an older llama.cpp's, or MiniMax's empty one) is the assistant's to the helpers", async () => {
      const usage = { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15 };
      const messages = [{ role: "user" as const, content: "hi" }];
      for (const first of [{ content: "Hel" }, { role: "", content: "Hel" }]) {
        upstream.script("ok", events([[first], [{ content: "lo" }], [{}, "stop"]], usage));
        const said: string[] = [];
        const stream = sdk()
          .chat.completions.stream({ model: "ok", messages })
          .on("content", (delta) => void said.push(delta));
        const final = await stream.finalChatCompletion();
        expect(final.choices.map((c) => [c.message.role, c.message.content, c.finish_reason])).toEqual([
          ["assistant", "Hello", "stop"],
        ]);
        expect(said).toEqual(["Hel", "lo"]);
      }
    });

    test("parallel tool calls an upstream numbers alike (every one 0), each of its own id, are assembled apart", async () => {
      const begins = (id: string, args: string) => ({
        tool_calls: [{ index: 0, id, type: "function", function: { name: "weather", arguments: args } }],
      });
      const calls = await assembledCalls([
        [{ role: "assistant", ...begins("call_a", '{"city":"Rome","days":1}') }],
        [begins("call_b", '{"city":"Oslo",')],
        // The second call's arguments continued under the index it came with.
        [{ tool_calls: [{ index: 0, function: { arguments: '"days":2}' } }] }],
        [{}, "tool_calls"],
      ]);
      expect(calls.map((c) => [c.id, c.type === "function" ? c.function.parsed_arguments : undefined])).toEqual([
        ["call_a", { city: "Rome", days: 1 }],
        ["call_b", { city: "Oslo", days: 2 }],
      ]);
    });
  });
}

test("over RPC, an upstream's tool call of no type (Mistral's) is the function call it is, whole or streamed", async () => {
  const call = { id: "call_a", function: { name: "weather", arguments: '{"city":"Rome","days":1}' } };
  const usage = { prompt_tokens: 40, completion_tokens: 30, total_tokens: 70 };
  const message = { role: "assistant", content: null, tool_calls: [call] };
  const answer = { id: "chatcmpl-up", object: "chat.completion", created: 1, model: "ok-up", usage };
  const choices = [{ index: 0, message, finish_reason: "tool_calls" }];
  upstream.script("ok", { body: { contentType: "application/json", text: JSON.stringify({ ...answer, choices }) } });
  const tools = [{ function: { name: "weather" } }];
  const params = create(ChatCompletionParamsSchema, { model: "ok", messages: [{ role: "user", content: "hi" }], tools });
  const whole = await gateway.rpc("sk-good").createChatCompletion({ params });
  expect(whole.choices[0]?.message?.toolCalls).toMatchObject([{ id: "call_a", type: "function", function: call.function }]);

  upstream.script("ok", events([[{ role: "assistant", tool_calls: [{ ...call, index: 0 }] }], [{}, "tool_calls"]], usage));
  const streamed = [];
  for await (const m of gateway.rpc("sk-good").streamChatCompletion({ params })) streamed.push(...m.choices.flatMap((c) => c.toolCalls));
  expect(streamed).toMatchObject([{ id: "call_a", type: "function", function: call.function }]);
});

test("the RPC stream of an upstream that never finishes a choice before [DONE] ends it as stopped, metered a success", async () => {
  const usage = { prompt_tokens: 12, completion_tokens: 3, total_tokens: 15 };
  upstream.script("ok", events([[{ role: "assistant", content: "Hel" }], [{ content: "lo" }]], usage));
  const params = create(ChatCompletionParamsSchema, { model: "ok", messages: [{ role: "user", content: "hi" }] });
  const messages = [];
  for await (const message of gateway.rpc("sk-good").streamChatCompletion({ params })) messages.push(message);
  expect(messages.flatMap((m) => m.choices.map((c) => [c.content, c.finishReason]))).toEqual([
    ["Hel", ""],
    ["lo", ""],
    ["", "stop"],
  ]);
  expect(messages.at(-1)?.accounting?.usage).toMatchObject({ inputTokens: 12n, outputTokens: 3n });
  expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.OK, costNanos: 15_000n });
});
