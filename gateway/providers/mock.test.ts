import { describe, expect, test } from "bun:test";
import { createMockProvider } from "./mock.ts";
import type { ChatCompletionChunk, ChatRequest } from "./provider.ts";
import { UpstreamError } from "./provider.ts";

const request = (content: string, extra: Partial<ChatRequest> = {}): ChatRequest => ({
  model: "mock-echo-1",
  messages: [
    { role: "system", content: "be brief" },
    { role: "user", content },
  ],
  ...extra,
});

describe("mock provider", () => {
  const mock = createMockProvider({ name: "mock", latency_ms: 0 });

  test("echoes the last user message with usage derived from the input", async () => {
    const result = await mock.chat(request("hello there"), { timeoutMs: 1000 });
    const content = "mock reply: hello there";
    expect(result.completion.choices).toEqual([
      { index: 0, message: { role: "assistant", content, refusal: null }, finish_reason: "stop", logprobs: null },
    ]);
    expect(result.completion.model).toBe("mock-echo-1");
    // 3 priming + (4 + ceil(8/4)) + (4 + ceil(11/4)) = 16 input; ceil(23/4) = 6 output
    expect(result.tokens).toEqual({ inputTokens: 16n, cachedInputTokens: 0n, outputTokens: 6n, reasoningTokens: 0n });
    expect(result.completion.usage).toEqual({ prompt_tokens: 16, completion_tokens: 6, total_tokens: 22 });
    expect(result.usageEstimated).toBe(false);
  });

  test("the same input gives the same reply and usage, under a fresh id each time as OpenAI's", async () => {
    const a = await mock.chat(request("same"), { timeoutMs: 1000 });
    const b = await mock.chat(request("same"), { timeoutMs: 1000 });
    expect(b.completion.choices).toEqual(a.completion.choices);
    expect(b.tokens).toEqual(a.tokens);
    expect(a.completion.id).toMatch(/^chatcmpl-[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(b.completion.id).not.toBe(a.completion.id);
  });

  test("stops at the first stop sequence", async () => {
    const cut = await mock.chat(request("one two three", { stop: ["three", "two"] }), { timeoutMs: 1000 });
    expect(cut.completion.choices[0]).toMatchObject({
      message: { content: "mock reply: one " },
      finish_reason: "stop",
    });
    const none = await mock.chat(request("one", { stop: "zzz" }), { timeoutMs: 1000 });
    expect(none.completion.choices[0]?.message.content).toBe("mock reply: one");
  });

  test("a JSON response format gets a JSON object", async () => {
    for (const response_format of [
      { type: "json_object" as const },
      { type: "json_schema" as const, json_schema: { name: "a" } },
    ]) {
      const result = await mock.chat(request("hi", { response_format }), { timeoutMs: 1000 });
      expect(JSON.parse(result.completion.choices[0]?.message.content ?? "")).toEqual({ reply: "mock reply: hi" });
    }
  });

  const tools = [
    { type: "function" as const, function: { name: "lookup", parameters: { type: "object" } } },
    { type: "function" as const, function: { name: "book" } },
  ];

  test("calls the tool that tool_choice requires; auto answers in words", async () => {
    const required = await mock.chat(request("hi", { tools, tool_choice: "required" }), { timeoutMs: 1000 });
    const choice = required.completion.choices[0];
    expect(choice?.finish_reason).toBe("tool_calls");
    expect(choice?.message.content).toBeNull();
    expect(choice?.message.tool_calls).toEqual([
      { id: expect.stringMatching(/^call_/), type: "function", function: { name: "lookup", arguments: "{}" } },
    ]);
    // ceil("lookup{}".length / 4)
    expect(required.tokens.outputTokens).toBe(2n);
    const named = await mock.chat(
      request("hi", { tools, tool_choice: { type: "function", function: { name: "book" } } }),
      {
        timeoutMs: 1000,
      },
    );
    expect(named.completion.choices[0]?.message.tool_calls?.[0]).toMatchObject({ function: { name: "book" } });
    const auto = await mock.chat(request("hi", { tools, tool_choice: "auto" }), { timeoutMs: 1000 });
    expect(auto.completion.choices[0]).toMatchObject({ message: { content: "mock reply: hi" }, finish_reason: "stop" });
  });

  test("a tool's or a JSON schema's arguments hold about a reply's worth of text, whatever the prompt or the schema", async () => {
    // A 100 KB prompt echoed in each of 300 strings, or strings of a minLength of 10^8, came to an answer of gigabytes,
    // metered at as many tokens, from a request of a few KB.
    const properties: Record<string, unknown> = {};
    for (let i = 0; i < 300; i++) properties[`p${i}`] = i % 2 ? { type: "string" } : { type: "string", minLength: 1e8 };
    properties.fixed = { $ref: "#/$defs/big" };
    const parameters = { type: "object", properties, required: Object.keys(properties), $defs: { big: { const: "x".repeat(1e5) } } };
    const prompt = "y".repeat(100_000);
    const called = await mock.chat(
      request(prompt, { tools: [{ type: "function", function: { name: "f", parameters } }], tool_choice: "required" }),
      { timeoutMs: 1000 },
    );
    const call = called.completion.choices[0]?.message.tool_calls?.[0];
    const args = call?.type === "function" ? call.function.arguments : "";
    expect(args.length).toBeLessThan(32_768);
    expect(JSON.parse(args).p0).toStartWith("mock reply: yyy");
    expect(called.tokens.outputTokens).toBeLessThan(8192n);
    const response_format = { type: "json_schema" as const, json_schema: { name: "a", schema: parameters } };
    const answered = await mock.chat(request(prompt, { response_format }), { timeoutMs: 1000 });
    expect(answered.completion.choices[0]?.message.content?.length).toBeLessThan(32_768);
  });

  test("a schema named by thousands of $refs is read once, however long its $ref, type list or required list", async () => {
    // Read at each $ref, a 400 KB $ref path named by 4,096 required names held the event loop for 21 s, and a list of
    // 100,000 non-names in `required` or nulls in `type` named 4,000 times for 0.7 to 1 s.
    const names = Array.from({ length: 4096 }, () => "a");
    const schemas = [
      { type: "object", properties: { a: { $ref: `#${"/x".repeat(100_000)}` } }, required: names },
      {
        type: "object",
        properties: { a: { $ref: "#/$defs/b" } },
        required: names,
        $defs: { b: { type: "object", required: new Array(200_000).fill(0) } },
      },
      {
        type: "object",
        properties: { a: { $ref: "#/$defs/b" } },
        required: names,
        $defs: { b: { type: new Array(200_000).fill("null") } },
      },
    ];
    for (const parameters of schemas) {
      const started = performance.now();
      const called = await mock.chat(
        request("hi", { tools: [{ type: "function", function: { name: "f", parameters } }], tool_choice: "required" }),
        { timeoutMs: 60_000 },
      );
      const call = called.completion.choices[0]?.message.tool_calls?.[0];
      expect(call?.type === "function" && Object.keys(JSON.parse(call.function.arguments))).toEqual(["a"]);
      const response_format = { type: "json_schema" as const, json_schema: { name: "a", schema: parameters } };
      await mock.chat(request("hi", { response_format }), { timeoutMs: 60_000 });
      // Tens of ms once read once; 12 s or more before. The bound only tells the two apart, on any machine.
      expect(performance.now() - started).toBeLessThan(5_000);
    }
  });

  test("a streamed tool call: id and name first, then the arguments, then tool_calls", async () => {
    const chunks: ChatCompletionChunk[] = [];
    for await (const chunk of await mock.streamChat(request("hi", { tools, tool_choice: "required" }), {
      timeoutMs: 1000,
    })) {
      chunks.push(chunk);
    }
    const first = chunks[0]?.choices[0]?.delta.tool_calls?.[0];
    expect(first).toMatchObject({
      index: 0,
      id: expect.stringMatching(/^call_/),
      type: "function",
      function: { name: "lookup", arguments: "" },
    });
    const args = chunks.map((c) => c.choices[0]?.delta.tool_calls?.[0]?.function?.arguments ?? "").join("");
    expect(args).toBe("{}");
    expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe("tool_calls");
    expect(chunks.at(-1)?.usage?.completion_tokens).toBe(2);
  });

  test("content parts are read as text", async () => {
    const parts = await mock.chat(
      {
        model: "m",
        messages: [
          {
            role: "user",
            content: [
              { type: "text", text: "hi" },
              { type: "text", text: " you" },
            ],
          },
        ],
      },
      { timeoutMs: 1000 },
    );
    expect(parts.completion.choices[0]?.message.content).toBe("mock reply: hi you");
  });

  test("honours max_tokens and n", async () => {
    const long = "word ".repeat(100);
    const cut = await mock.chat(request(long, { max_tokens: 5 }), { timeoutMs: 1000 });
    expect(cut.completion.choices[0]?.finish_reason).toBe("length");
    expect(cut.completion.choices[0]?.message.content).toHaveLength(20);
    expect(cut.tokens.outputTokens).toBe(5n);
    const three = await mock.chat(request("x", { n: 3, max_completion_tokens: 2 }), { timeoutMs: 1000 });
    expect(three.completion.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    expect(three.tokens.outputTokens).toBe(6n);
  });

  test("writes at most 4,096 tokens a choice, so n copies of a long prompt stay small, whole or streamed", async () => {
    const long = request("x".repeat(100_000), { n: 128, max_tokens: 100_000 });
    const whole = await mock.chat(long, { timeoutMs: 1000 });
    expect(whole.completion.choices).toHaveLength(128);
    for (const choice of whole.completion.choices) {
      expect(choice.message.content).toHaveLength(4096 * 4);
      expect(choice.finish_reason).toBe("length");
    }
    expect(whole.tokens.outputTokens).toBe(4096n * 128n);
    expect(JSON.stringify(whole.completion).length).toBeLessThan(3 << 20);
    let streamed = "";
    for await (const chunk of await mock.streamChat(long, { timeoutMs: 1000 })) {
      streamed += chunk.choices[0]?.delta.content ?? "";
    }
    expect(streamed).toBe(whole.completion.choices[0]?.message.content as string);
  });

  test("waits its latency, times out past the attempt limit, and stops when the client leaves", async () => {
    const slow = createMockProvider({ name: "slow", latency_ms: 30 });
    const start = performance.now();
    await slow.chat(request("x"), { timeoutMs: 1000 });
    expect(performance.now() - start).toBeGreaterThanOrEqual(25);

    const timedOut = await slow.chat(request("x"), { timeoutMs: 5 }).catch((e) => e);
    expect(timedOut).toBeInstanceOf(UpstreamError);
    expect((timedOut as UpstreamError).failure).toBe("timeout");

    const gone = new AbortController();
    const pending = slow.chat(request("x"), { timeoutMs: 1000, signal: gone.signal }).catch((e) => e);
    gone.abort();
    expect(((await pending) as UpstreamError).failure).toBe("cancelled");
  });

  test("streams the same reply in one-token chunks, then usage", async () => {
    const whole = await mock.chat(request("hello there"), { timeoutMs: 1000 });
    const chunks = [];
    for await (const chunk of await mock.streamChat(request("hello there"), { timeoutMs: 1000 })) chunks.push(chunk);
    expect(chunks[0]?.choices[0]?.delta).toEqual({ role: "assistant", content: "" });
    const content = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
    expect(content).toBe(whole.completion.choices[0]?.message.content ?? "");
    expect(chunks.slice(1, -2).every((c) => (c.choices[0]?.delta.content ?? "").length <= 4)).toBe(true);
    expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe("stop");
    expect(chunks.at(-1)?.choices).toEqual([]);
    expect(chunks.at(-1)?.usage).toEqual(whole.completion.usage ?? null);
    // One id for the whole stream.
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    expect(chunks[0]?.id).toMatch(/^chatcmpl-/);
  });

  test("a stream of n choices advances every choice in each chunk, so n does not lengthen it", async () => {
    const one: ChatCompletionChunk[] = [];
    for await (const chunk of await mock.streamChat(request("hello there"), { timeoutMs: 1000 })) one.push(chunk);
    const many: ChatCompletionChunk[] = [];
    for await (const chunk of await mock.streamChat(request("hello there", { n: 128 }), { timeoutMs: 1000 }))
      many.push(chunk);
    expect(many).toHaveLength(one.length);
    expect(
      many
        .slice(0, -1)
        .every(
          (c) => c.choices.map((choice) => choice.index).join() === Array.from({ length: 128 }, (_, i) => i).join(),
        ),
    ).toBe(true);
    const texts = Array.from({ length: 128 }, (_, i) => many.map((c) => c.choices[i]?.delta.content ?? "").join(""));
    expect(new Set(texts)).toEqual(new Set(["mock reply: hello there"]));
    expect(many.at(-1)?.usage?.completion_tokens).toBe(128 * (one.at(-1)?.usage?.completion_tokens ?? 0));
  });

  test("a stream with chunk latency stops when the client leaves", async () => {
    const paced = createMockProvider({ name: "paced", latency_ms: 0, chunk_latency_ms: 20 });
    const gone = new AbortController();
    const stream = await paced.streamChat(request("a long enough message"), { timeoutMs: 1000, signal: gone.signal });
    const seen: string[] = [];
    const failure = await (async () => {
      for await (const chunk of stream) {
        seen.push(chunk.choices[0]?.delta.content ?? "");
        if (seen.length === 2) gone.abort();
      }
    })().catch((e) => e);
    expect((failure as UpstreamError).failure).toBe("cancelled");
    expect(seen).toHaveLength(2);
  });

  test("a flat array of token ids is one input", async () => {
    const tokens = await mock.embed({ model: "m", input: [1, 2, 3], encoding_format: "float" }, { timeoutMs: 1000 });
    expect(tokens.response.data).toHaveLength(1);
    expect(tokens.tokens.inputTokens).toBe(3n);
    const lists = await mock.embed({ model: "m", input: [[1, 2], [3]], encoding_format: "float" }, { timeoutMs: 1000 });
    expect(lists.response.data).toHaveLength(2);
  });

  test("refuses embeddings of more than 1,048,576 values (inputs x dimensions) with a 400 naming the parameter", async () => {
    const inputs = Array.from({ length: 256 }, (_, i) => `input ${i}`);
    const refused = await mock
      .embed({ model: "m", input: inputs, dimensions: 65_536, encoding_format: "float" }, { timeoutMs: 1000 })
      .then(
        () => undefined,
        (e: unknown) => e as UpstreamError,
      );
    expect(refused).toBeInstanceOf(UpstreamError);
    expect([refused?.failure, refused?.status, refused?.error?.param]).toEqual(["rejected", 400, "dimensions"]);
    expect(refused?.error?.message).toContain("1048576");
    const most = await mock.embed(
      { model: "m", input: inputs, dimensions: 4096, encoding_format: "base64" },
      { timeoutMs: 1000 },
    );
    expect(most.response.data).toHaveLength(256);
  });

  test("embeddings are deterministic unit vectors, as floats or base64", async () => {
    const floats = await mock.embed(
      { model: "m", input: ["cat", "dog"], encoding_format: "float" },
      { timeoutMs: 1000 },
    );
    const again = await mock.embed(
      { model: "m", input: "cat", encoding_format: "float", dimensions: 16 },
      { timeoutMs: 1000 },
    );
    expect(floats.response.data).toHaveLength(2);
    expect(again.response.data[0]?.embedding).toEqual(floats.response.data[0]?.embedding as number[]);
    expect(Math.hypot(...(floats.response.data[0]?.embedding as number[]))).toBeCloseTo(1, 5);
    expect(floats.tokens.inputTokens).toBe(2n);
    const packed = await mock.embed({ model: "m", input: "cat", encoding_format: "base64" }, { timeoutMs: 1000 });
    const decoded = new Float32Array(
      Uint8Array.from(Buffer.from(packed.response.data[0]?.embedding as unknown as string, "base64")).buffer,
    );
    expect(Array.from(decoded)).toEqual(floats.response.data[0]?.embedding as number[]);
  });
});

describe("mock provider's Responses API", () => {
  const mock = createMockProvider({ name: "mock", latency_ms: 0 });
  const input = [
    { role: "system" as const, content: "be brief" },
    { role: "user" as const, content: [{ type: "input_text" as const, text: "hello there" }] },
  ];

  test("echoes the last user input with usage derived from it, the same whole and streamed", async () => {
    const whole = await mock.responses({ model: "mock-echo-1", input }, { timeoutMs: 1000 });
    expect(whole.response.output).toMatchObject([
      { type: "message", role: "assistant", content: [{ type: "output_text", text: "mock reply: hello there" }] },
    ]);
    // 3 priming + 4 per item + ceil(19/4) for the texts = 16 input; ceil(23/4) = 6 output.
    expect(whole.tokens).toEqual({ inputTokens: 16n, cachedInputTokens: 0n, outputTokens: 6n, reasoningTokens: 0n });
    expect(whole.response.usage).toMatchObject({ input_tokens: 16, output_tokens: 6, total_tokens: 22 });
    const events = [];
    for await (const event of await mock.streamResponses({ model: "mock-echo-1", input }, { timeoutMs: 1000 })) {
      events.push(event);
    }
    expect(events.map((e) => e.sequence_number)).toEqual(events.map((_, i) => i));
    expect(events[0]?.type).toBe("response.created");
    const deltas = events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta);
    expect(deltas.join("")).toBe("mock reply: hello there");
    expect(events.at(-1)).toMatchObject({ type: "response.completed", response: { usage: { input_tokens: 16, output_tokens: 6 } } });
  });

  test("calls the function tool tool_choice requires, and stops at max_output_tokens as incomplete", async () => {
    const tools = [{ type: "function" as const, name: "lookup", parameters: {}, strict: false }];
    const called = await mock.responses({ model: "m", input: "x", tools, tool_choice: "required" }, { timeoutMs: 1000 });
    expect(called.response.output).toMatchObject([{ type: "function_call", name: "lookup", arguments: "{}" }]);
    const cut = await mock.responses({ model: "m", input: "a long enough prompt", max_output_tokens: 2 }, { timeoutMs: 1000 });
    expect(cut.response).toMatchObject({ status: "incomplete", incomplete_details: { reason: "max_output_tokens" } });
    expect(cut.tokens.outputTokens).toBe(2n);
  });
});

describe("mock provider's stored responses", () => {
  const options = { timeoutMs: 1000 };

  test("keeps the latest 1000, unchanged by what callers do with the answers; input items paged as the API pages them", async () => {
    const mock = createMockProvider({ name: "mock", latency_ms: 0 });
    const first = (await mock.responses({ model: "m", input: [{ role: "user", content: "one" }, { role: "user", content: "two" }] }, options)).response;
    const id = first.id;
    first.id = "changed by the caller";
    expect(await mock.storedResponse({ action: "retrieve", id, query: {} }, options)).toMatchObject({ id, object: "response" });
    const page = (await mock.storedResponse({ action: "input_items", id, query: { limit: "1" } }, options)) as {
      data: { id: string; content: unknown }[];
      has_more: boolean;
    };
    // Newest first by default.
    expect(page.data).toMatchObject([{ type: "message", content: [{ type: "input_text", text: "two" }] }]);
    expect(page.has_more).toBe(true);
    const rest = (await mock.storedResponse({ action: "input_items", id, query: { after: page.data[0]?.id as string } }, options)) as typeof page;
    expect(rest.data).toMatchObject([{ content: [{ type: "input_text", text: "one" }] }]);
    const asc = (await mock.storedResponse({ action: "input_items", id, query: { order: "asc" } }, options)) as typeof page;
    expect(asc.data.map((item) => item.content)).toEqual([[{ type: "input_text", text: "one" }], [{ type: "input_text", text: "two" }]]);
    for (let i = 0; i < 1000; i++) await mock.responses({ model: "m", input: `n${i}` }, options);
    const evicted = await mock.storedResponse({ action: "retrieve", id, query: {} }, options).catch((e: unknown) => e);
    expect(evicted).toMatchObject({ status: 404, error: { message: `Response with id '${id}' not found.` } });
  });

  test("pages input items back from `before`, as the API documents it", async () => {
    const mock = createMockProvider({ name: "mock", latency_ms: 0 });
    const input = ["1", "2", "3", "4", "5"].map((content) => ({ role: "user" as const, content }));
    const { id } = (await mock.responses({ model: "m", input }, options)).response;
    type Page = { data: { id: string; content: { text: string }[] }[]; has_more: boolean };
    const page = async (query: Record<string, string>) => {
      const got = (await mock.storedResponse({ action: "input_items", id, query }, options)) as Page;
      return { texts: got.data.map((item) => item.content[0]?.text), more: got.has_more, ids: got.data.map((i) => i.id) };
    };
    const asc = await page({ order: "asc" });
    expect(await page({ order: "asc", before: asc.ids[3] as string })).toMatchObject({ texts: ["1", "2", "3"], more: false });
    expect(await page({ order: "asc", before: asc.ids[3] as string, limit: "2" })).toMatchObject({ texts: ["2", "3"], more: true });
    expect(await page({ before: asc.ids[1] as string, limit: "2" })).toMatchObject({ texts: ["4", "3"], more: true });
    expect(await page({ order: "asc", after: asc.ids[0] as string, before: asc.ids[3] as string })).toMatchObject({
      texts: ["2", "3"],
    });
  });

  test("keeps 32 MiB of them at most: a flood of 4 MB inputs evicts the oldest, the latest kept whatever its size", async () => {
    const mock = createMockProvider({ name: "mock", latency_ms: 0 });
    const big = "x".repeat(4_000_000);
    const ids: string[] = [];
    for (let i = 0; i < 9; i++) ids.push((await mock.responses({ model: "m", input: big, max_output_tokens: 16 }, options)).response.id);
    const first = await mock.storedResponse({ action: "retrieve", id: ids[0] as string, query: {} }, options).catch((e: unknown) => e);
    expect(first).toMatchObject({ status: 404 });
    expect(await mock.storedResponse({ action: "retrieve", id: ids[8] as string, query: {} }, options)).toMatchObject({ id: ids[8] });
    const huge = (await mock.responses({ model: "m", input: "y".repeat(40_000_000), max_output_tokens: 16 }, options)).response;
    expect(await mock.storedResponse({ action: "retrieve", id: huge.id, query: {} }, options)).toMatchObject({ id: huge.id });
    const evicted = await mock.storedResponse({ action: "retrieve", id: ids[8] as string, query: {} }, options).catch((e: unknown) => e);
    expect(evicted).toMatchObject({ status: 404 });
  });

  test("continues only a response it keeps, as an upstream account does", async () => {
    const mock = createMockProvider({ name: "mock", latency_ms: 0 });
    const kept = (await mock.responses({ model: "m", input: "a" }, options)).response;
    const next = await mock.responses({ model: "m", input: "b", previous_response_id: kept.id }, options);
    expect(next.response.previous_response_id).toBe(kept.id);
    const unkept = (await mock.responses({ model: "m", input: "a", store: false }, options)).response;
    const refused = await mock.responses({ model: "m", input: "b", previous_response_id: unkept.id }, options).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(UpstreamError);
    expect(refused).toMatchObject({ failure: "rejected", status: 400, error: { param: "previous_response_id", code: "previous_response_not_found" } });
  });
});
