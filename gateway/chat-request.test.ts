import { describe, expect, test } from "bun:test";
import { parseChatInput } from "./chat-request.ts";

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

  test("accepts tool turns and content parts", () => {
    const input = parseChatInput({
      model: "m",
      messages: [
        { role: "user", content: [{ type: "text", text: "hi" }] },
        { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "f", arguments: "{}" } }] },
        { role: "tool", tool_call_id: "c1", content: "42" },
      ],
      metadata: { ["k".repeat(16)]: "é".repeat(128) },
    });
    expect(input.upstream.messages).toHaveLength(3);
    expect(() => parseChatInput({ model: "m", messages: [{ role: "user" }], metadata: { k: "é".repeat(129) } })).toThrow(
      /at most 256 bytes/,
    );
  });

  test("at most 16 tags", () => {
    const metadata = Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, "v"]));
    expect(() => parseChatInput({ model: "m", messages: [{ role: "user", content: "x" }], metadata })).toThrow(/16 entries/);
  });

  test("streaming: stream and stream_options are the gateway's, never forwarded as sent", () => {
    const input = parseChatInput({
      model: "m",
      messages: [{ role: "user", content: "x" }],
      stream: true,
      stream_options: { include_usage: true },
    });
    expect([input.stream, input.includeUsage]).toEqual([true, true]);
    expect(input.upstream as unknown).toEqual({ model: "m", messages: [{ role: "user", content: "x" }] });
    const plain = parseChatInput({ model: "m", messages: [{ role: "user", content: "x" }], stream: true });
    expect([plain.stream, plain.includeUsage]).toEqual([true, false]);
    expect(() => parseChatInput({ model: "m", messages: [{ role: "user", content: "x" }], stream_options: {} })).toThrow(/only allowed/);
  });
});
