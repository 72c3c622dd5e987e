import { describe, expect, test } from "bun:test";
import { createMockProvider } from "./mock.ts";
import type { ChatRequest } from "./provider.ts";
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

  test("the same input gives the same reply, id and usage", async () => {
    const a = await mock.chat(request("same"), { timeoutMs: 1000 });
    const b = await mock.chat(request("same"), { timeoutMs: 1000 });
    const c = await mock.chat(request("different"), { timeoutMs: 1000 });
    expect(b.completion.id).toBe(a.completion.id);
    expect(b.completion.choices).toEqual(a.completion.choices);
    expect(b.tokens).toEqual(a.tokens);
    expect(c.completion.id).not.toBe(a.completion.id);
  });

  test("content parts are read as text", async () => {
    const parts = await mock.chat(
      { model: "m", messages: [{ role: "user", content: [{ type: "text", text: "hi" }, { type: "text", text: " you" }] }] },
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
});
