import { describe, expect, test } from "bun:test";
import {
  createRateLimiter,
  estimatedChatTokens,
  estimatedEmbeddingTokens,
  rateLimitHeaders,
  unsetOutputTokens,
} from "./rate-limits.ts";
import { refused } from "./testing.ts";

function setup() {
  // 12:00:00.250 on some day: 250 ms into a second.
  const clock = { t: 1_750_000_000_250 };
  const limiter = createRateLimiter({ now: () => clock.t, maxKeys: 3 });
  return { clock, limiter };
}

describe("requests per minute", () => {
  test("admits up to the limit in a sliding minute, then 429 until the oldest requests leave the window", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 3, tokensPerMinute: 0 };
    limiter.admit("k", rpm, 0);
    clock.t += 10_000;
    limiter.admit("k", rpm, 0);
    limiter.admit("k", rpm, 0);
    const e = refused(() => limiter.admit("k", rpm, 0));
    expect([e.status, e.type, e.code]).toEqual([429, "requests", "rate_limit_exceeded"]);
    // The first request's second leaves the window 60 s after it began: 50 s from now, less the 250 ms into it.
    expect(e.retryAfterS).toBe(50);
    expect(e.headers?.["retry-after-ms"]).toBe("49750");
    expect(e.message).toContain("limit 3");
    // Other keys have their own windows.
    limiter.admit("other", rpm, 0);

    clock.t += 49_000;
    // 750 ms to go: Retry-After rounds up to a whole second, retry-after-ms (which the OpenAI SDKs read first) does not.
    const soon = refused(() => limiter.admit("k", rpm, 0));
    expect([soon.retryAfterS, soon.headers?.["retry-after-ms"]]).toEqual([1, "750"]);
    clock.t += 750;
    limiter.admit("k", rpm, 0);
    expect(refused(() => limiter.admit("k", rpm, 0)).retryAfterS).toBe(10);
  });

  test("unlimited keys are never tracked", () => {
    const { limiter } = setup();
    for (let i = 0; i < 1000; i++) limiter.admit("k", { requestsPerMinute: 0, tokensPerMinute: 0 }, 1e6);
    expect(limiter.size()).toBe(0);
  });
});

describe("tokens per minute", () => {
  test("counts in-flight requests at their estimate and finished ones at actual usage", () => {
    const { clock, limiter } = setup();
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 1000 };
    const first = limiter.admit("k", tpm, 600);
    // 600 held + 500 > 1000; the running request may end any moment and free most of it: retry soon.
    const e = refused(() => limiter.admit("k", tpm, 500));
    expect([e.status, e.type]).toEqual([429, "tokens"]);
    expect(e.retryAfterS).toBe(3);
    // Settling at the real (smaller) usage frees room.
    first.settle(300);
    first.settle(10_000); // only the first settlement counts
    const second = limiter.admit("k", tpm, 500);
    clock.t += 30_000;
    second.settle(700); // 300 + 700 = 1000 in the window
    expect(refused(() => limiter.admit("k", tpm, 1)).retryAfterS).toBe(30);
    clock.t += 30_000;
    // The first second of usage has left the window: 1000 - 300 + 1 fits.
    limiter.admit("k", tpm, 1);
  });

  test("a request larger than the whole limit goes through an empty window only", () => {
    const { clock, limiter } = setup();
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 1000 };
    const big = limiter.admit("k", tpm, 5_000);
    big.settle(4_000);
    expect(refused(() => limiter.admit("k", tpm, 5_000)).retryAfterS).toBe(60);
    clock.t += 60_000;
    limiter.admit("k", tpm, 5_000);
  });

  test("a request that set no max_tokens takes the room left, where its model's cap alone would not fit", () => {
    const { clock, limiter } = setup();
    // 100 prompt tokens and gpt-4.1's 32,768 output cap against a TPM of 20,000.
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 20_000 };
    limiter.admit("k", tpm, 32_868, 32_768).settle(300);
    clock.t += 1_000;
    // Admitted into the 19,700 left, which it holds while it runs: a request after it waits for its end.
    const second = limiter.admit("k", tpm, 32_868, 32_768);
    expect(second.state?.tokens?.remaining).toBe(0);
    expect(refused(() => limiter.admit("k", tpm, 150, 0)).retryAfterS).toBe(3);
    second.settle(400);
    clock.t += 1_000;
    expect(limiter.admit("k", tpm, 32_868, 32_768).state?.tokens?.remaining).toBe(0);
    // With room for its prompt and no output, it waits; one that set its max_tokens is counted at it.
    const small = { requestsPerMinute: 0, tokensPerMinute: 1_000 };
    limiter.admit("f", small, 900, 0).settle(900);
    expect(refused(() => limiter.admit("f", small, 4_196, 4_096)).type).toBe("tokens");
    expect(refused(() => limiter.admit("f", small, 101, 0)).type).toBe("tokens");
    expect(limiter.admit("f", small, 4_195, 4_096).state?.tokens?.remaining).toBe(0);
  });

  test("usage counts for a minute from when the request ends, however long it ran", () => {
    const { clock, limiter } = setup();
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 1000 };
    const long = limiter.admit("k", tpm, 10);
    clock.t += 61_000;
    long.settle(5_000);
    const e = refused(() => limiter.admit("k", tpm, 10));
    expect(e.message).toContain("used 5000");
    expect(e.retryAfterS).toBe(60);

    const half = limiter.admit("k2", tpm, 10);
    clock.t += 30_000;
    half.settle(5_000);
    clock.t += 31_000;
    // 31 s after it ended its usage is still in the window, though its admitting second has left it.
    expect(refused(() => limiter.admit("k2", tpm, 10)).retryAfterS).toBe(29);
    clock.t += 29_000;
    limiter.admit("k2", tpm, 10);
  });

  test("a request running longer than a minute counts at its estimate until it ends", () => {
    const { clock, limiter } = setup();
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 1000 };
    const long = limiter.admit("k", tpm, 600);
    clock.t += 90_000;
    // Its admitting second has left the window; it still runs, and may still produce all it was counted at.
    expect(limiter.state("k", tpm)?.tokens?.remaining).toBe(400);
    const e = refused(() => limiter.admit("k", tpm, 500));
    expect(e.message).toContain("used 600 (600 held by requests still running");
    expect(e.retryAfterS).toBe(3);
    // Nor is it dropped with the window of a key idle for a minute.
    for (let i = 0; i < 3; i++) limiter.admit(`other-${i}`, tpm, 0);
    expect(refused(() => limiter.admit("k", tpm, 500)).type).toBe("tokens");
    long.settle(100);
    limiter.admit("k", tpm, 500);
  });

  test("a refusal for room that running requests hold says to retry in a few seconds, and their end makes room", () => {
    const { clock, limiter } = setup();
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 1000 };
    const running = limiter.admit("k", tpm, 908);
    const e = refused(() => limiter.admit("k", tpm, 100));
    expect(e.retryAfterS).toBe(3);
    expect(e.message).toContain("908 held by requests still running");
    expect(e.message).toContain("Retry in 3s.");
    clock.t += 1_000;
    running.settle(58);
    limiter.admit("k", tpm, 100).settle(100);
    // Settled usage alone leaves no room: nothing running can help, so the wait is until it expires.
    limiter.admit("k", tpm, 800).settle(800);
    const settled = refused(() => limiter.admit("k", tpm, 100));
    expect(settled.retryAfterS).toBe(60);
    expect(settled.message).not.toContain("running");
  });

  test("a clock stepping back still counts every request", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 2, tokensPerMinute: 0 };
    limiter.admit("k", rpm, 0);
    // Back a minute: the slot of this second holds the newer one.
    clock.t -= 60_000;
    limiter.admit("k", rpm, 0);
    refused(() => limiter.admit("k", rpm, 0));
  });

  test("a wall clock stepped back a few seconds counts the seconds ahead of it, and says to retry within a minute", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    const tpm = { requestsPerMinute: 0, tokensPerMinute: 100 };
    clock.t += 10_000;
    limiter.admit("r", rpm, 0);
    limiter.admit("t", tpm, 10).settle(100);
    clock.t -= 5_000;
    // The requests of 10 s leave the window 64.75 s from now by the clock as it is: said as a minute.
    const requests = refused(() => limiter.admit("r", rpm, 0));
    expect([requests.retryAfterS, requests.headers?.["retry-after-ms"]]).toEqual([60, "60000"]);
    expect(requests.headers?.["x-ratelimit-reset-requests"]).toBe("1m0s");
    expect(refused(() => limiter.admit("t", tpm, 10)).retryAfterS).toBe(60);
    expect(limiter.state("t", tpm)?.tokens).toEqual({ limit: 100, remaining: 0, resetMs: 60_000 });
    // Their second still counts when the clock has come back to it, and leaves the window a minute after it.
    clock.t += 60_000;
    expect(refused(() => limiter.admit("r", rpm, 0)).headers?.["retry-after-ms"]).toBe("4750");
    clock.t += 4_750;
    limiter.admit("r", rpm, 0);
    limiter.admit("t", tpm, 100);
  });

  test("both limits apply together; a refused request holds nothing", () => {
    const { limiter } = setup();
    const both = { requestsPerMinute: 2, tokensPerMinute: 100 };
    limiter.admit("k", both, 90);
    refused(() => limiter.admit("k", both, 20));
    limiter.admit("k", both, 10);
    expect(refused(() => limiter.admit("k", both, 0)).type).toBe("requests");
  });

  test("a request released (refused by its budget before it was sent) gives back its request and tokens", () => {
    const { clock, limiter } = setup();
    const both = { requestsPerMinute: 2, tokensPerMinute: 100 };
    const held = limiter.admit("k", both, 90);
    expect(held.release()).toEqual({
      requests: { limit: 2, remaining: 2, resetMs: 0 },
      tokens: { limit: 100, remaining: 100, resetMs: 0 },
    });
    // Released once: a second release or a settle changes nothing.
    expect(held.release()).toBeUndefined();
    held.settle(1_000);
    limiter.admit("k", both, 90).release();
    limiter.admit("k", both, 90);
    clock.t += 1_000;
    limiter.admit("k", both, 10).settle(10);
    expect(refused(() => limiter.admit("k", both, 0)).type).toBe("requests");
    // Requests-only keys release too.
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    limiter.admit("r", rpm, 0).release();
    limiter.admit("r", rpm, 0);
    expect(refused(() => limiter.admit("r", rpm, 0)).type).toBe("requests");
  });

  test("idle keys are dropped once too many are tracked", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    limiter.admit("a", rpm, 0);
    limiter.admit("b", rpm, 0);
    limiter.admit("c", rpm, 0);
    clock.t += 60_000;
    limiter.admit("d", rpm, 0);
    expect(limiter.size()).toBe(1);
  });

  test("keys idle for a window are dropped within another, however few are tracked", () => {
    const clock = { t: 1_750_000_000_250 };
    const limiter = createRateLimiter({ now: () => clock.t });
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    // A key a second, each used once: only the last two minutes' keys are held, never all of them.
    for (let i = 0; i < 600; i++) {
      limiter.admit(`key-${i}`, rpm, 0);
      clock.t += 1_000;
    }
    expect(limiter.size()).toBeLessThanOrEqual(120);
    // A key in use keeps its window: its minute still counts.
    limiter.admit("busy", rpm, 0);
    clock.t += 59_000;
    limiter.admit("other", rpm, 0);
    expect(refused(() => limiter.admit("busy", rpm, 0)).status).toBe(429);
  });
});

describe("concurrent requests", () => {
  test("a key runs up to its limit at once; each end, settled or released, frees a slot once", () => {
    const { limiter } = setup();
    const two = { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 2 };
    const first = limiter.admit("k", two, 0);
    const second = limiter.admit("k", two, 0);
    const e = refused(() => limiter.admit("k", two, 0));
    expect([e.status, e.type, e.code, e.retryAfterS]).toEqual([429, "requests", "rate_limit_exceeded", 1]);
    expect(e.headers?.["retry-after-ms"]).toBe("1000");
    expect(e.message).toBe(
      "Rate limit reached for concurrent requests: limit 2, in flight 2. Retry once one of them has ended.",
    );
    // Other keys have their own slots; a refusal takes none.
    limiter.admit("other", two, 0);
    expect(limiter.concurrent()).toBe(3);
    first.settle(10);
    first.settle(10);
    first.release();
    expect(limiter.concurrent()).toBe(2);
    const third = limiter.admit("k", two, 0);
    refused(() => limiter.admit("k", two, 0));
    second.release();
    third.settle(0);
    expect(limiter.concurrent()).toBe(1);
    // Not counted against windows: a key with only this limit is tracked only while it has requests running.
    expect(limiter.size()).toBe(0);
  });

  test("with per-minute limits, those are checked first, and a concurrency refusal carries their headers", () => {
    const { limiter } = setup();
    const limits = { requestsPerMinute: 3, tokensPerMinute: 0, maxConcurrentRequests: 1 };
    const running = limiter.admit("k", limits, 0);
    const e = refused(() => limiter.admit("k", limits, 0));
    expect(e.message).toContain("concurrent requests: limit 1");
    // The refused request counts against no window.
    expect(e.headers?.["x-ratelimit-remaining-requests"]).toBe("2");
    running.settle(0);
    // Released (refused by its budget), a request gives back its minute's count as well as its slot.
    limiter.admit("k", limits, 0).release();
    limiter.admit("k", limits, 0).settle(0);
    limiter.admit("k", limits, 0).settle(0);
    // The minute is full: that is the wait that matters, not a slot.
    expect(refused(() => limiter.admit("k", limits, 0)).message).toContain("requests per minute");
    expect(limiter.concurrent()).toBe(0);
  });

  test("a limit lowered while requests run admits none until they are under it", () => {
    const { limiter } = setup();
    const three = { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 3 };
    const held = [1, 2, 3].map(() => limiter.admit("k", three, 0));
    const one = { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 1 };
    expect(refused(() => limiter.admit("k", one, 0)).message).toContain("limit 1, in flight 3");
    for (const ticket of held) ticket.settle(0);
    limiter.admit("k", one, 0);
    // Removed (0), the limit counts nothing more.
    limiter.admit("k", { requestsPerMinute: 0, tokensPerMinute: 0, maxConcurrentRequests: 0 }, 0);
    expect(limiter.concurrent()).toBe(1);
  });
});

describe("what a running request counts at", () => {
  const messages = [{ role: "user" as const, content: "hi" }];
  const prompt = estimatedChatTokens({ messages, max_tokens: 0 }, 4096);

  test("a chat request: all it sends, and the most output it may produce, the model's cap when it sets no max_tokens", () => {
    expect(prompt).toBeGreaterThan(0);
    expect(estimatedChatTokens({ messages }, 4096)).toBe(prompt + 4096);
    expect(estimatedChatTokens({ messages, n: 8 }, 4096)).toBe(prompt + 8 * 4096);
    expect(estimatedChatTokens({ messages, max_tokens: 10, max_completion_tokens: 20, n: 2 }, 4096)).toBe(prompt + 40);
    // Both sent upstream: one reading only max_tokens produces up to 50 a choice.
    expect(estimatedChatTokens({ messages, max_tokens: 50, max_completion_tokens: 20, n: 2 }, 4096)).toBe(prompt + 100);
    // The part no max_tokens bounds, which may shrink to the room a key's TPM has left.
    expect(unsetOutputTokens({ n: 2 }, 4096)).toBe(8192);
    expect(unsetOutputTokens({ max_completion_tokens: 20 }, 4096)).toBe(0);
    expect(unsetOutputTokens({ max_tokens: 0 }, 4096)).toBe(0);
    // 200 KB of tool definitions is about 50,000 tokens; a schema and an image count too.
    const tools = [{ type: "function" as const, function: { name: "f", description: "d".repeat(200_000) } }];
    expect(estimatedChatTokens({ messages, tools, max_tokens: 10 }, 4096)).toBeGreaterThan(prompt + 50_000);
    // So do the legacy `functions` the model reads as it reads tools.
    const functions = [{ name: "f", description: "d".repeat(200_000) }];
    expect(estimatedChatTokens({ messages, functions, max_tokens: 0 }, 4096)).toBeGreaterThan(prompt + 50_000);
    const schema = { type: "json_schema" as const, json_schema: { name: "s", schema: { description: "d".repeat(4000) } } };
    expect(estimatedChatTokens({ messages, response_format: schema, max_tokens: 0 }, 4096)).toBeGreaterThan(prompt + 1000);
    // An image counts at a typical size, not its budget bound: a key with TPM 10,000 runs several at once.
    const image = { type: "image_url" as const, image_url: { url: "https://example.com/a.png" } };
    const withImage = estimatedChatTokens({ messages: [{ role: "user", content: [image] }], max_tokens: 100 }, 4096);
    expect(withImage).toBeGreaterThan(765);
    expect(withImage).toBeLessThan(1000);
    // Chinese, Japanese and Korean text at three tokens in four characters, as o200k_base encodes it, not four
    // characters a token (a third of that): a key's TPM is not overrun three times by such prompts.
    const chinese = [{ role: "user" as const, content: "请用三句话解释一下机器学习是什么".repeat(25) }];
    expect(estimatedChatTokens({ messages: chinese, max_tokens: 0 }, 4096) - prompt).toBeGreaterThan(290);
  });

  test("an embeddings request: strings at about four characters a token (CJK ones three in four), token arrays at their length", () => {
    expect(estimatedEmbeddingTokens("abcd".repeat(100))).toBe(100);
    expect(estimatedEmbeddingTokens(["abcd", "abcdefgh"])).toBe(3);
    expect(estimatedEmbeddingTokens("機械学習".repeat(100))).toBe(300);
    expect(estimatedEmbeddingTokens(Array.from({ length: 1000 }, (_, i) => i))).toBe(1000);
    expect(estimatedEmbeddingTokens([Array(600).fill(7), Array(400).fill(7)])).toBe(1000);
  });
});

describe("where a key stands", () => {
  test("each admission says the limit, what remains, and when the oldest usage leaves the window", () => {
    const { clock, limiter } = setup();
    const limits = { requestsPerMinute: 3, tokensPerMinute: 100 };
    expect(limiter.admit("k", limits, 40).state).toEqual({
      requests: { limit: 3, remaining: 2, resetMs: 59_750 },
      tokens: { limit: 100, remaining: 60, resetMs: 59_750 },
    });
    clock.t += 20_000;
    const second = limiter.admit("k", limits, 10);
    // The first request's second still leads the window: 40 s left of it.
    expect(second.state).toEqual({
      requests: { limit: 3, remaining: 1, resetMs: 39_750 },
      tokens: { limit: 100, remaining: 50, resetMs: 39_750 },
    });
    expect(limiter.admit("k", { requestsPerMinute: 0, tokensPerMinute: 0 }, 10).state).toBeUndefined();
    expect(limiter.admit("k", { requestsPerMinute: 5, tokensPerMinute: 0 }, 10).state).toEqual({
      requests: { limit: 5, remaining: 2, resetMs: 39_750 },
    });
  });

  test("a refusal carries the headers too, with nothing remaining", () => {
    const { limiter } = setup();
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    limiter.admit("k", rpm, 0);
    expect(refused(() => limiter.admit("k", rpm, 0)).headers).toEqual({
      "x-ratelimit-limit-requests": "1",
      "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "1m0s",
      "retry-after-ms": "59750",
    });
  });

  test("a key's state can be read without counting a request, for one another limit refused first", () => {
    const { clock, limiter } = setup();
    const limits = { requestsPerMinute: 3, tokensPerMinute: 100 };
    expect(limiter.state("k", limits)).toEqual({
      requests: { limit: 3, remaining: 3, resetMs: 0 },
      tokens: { limit: 100, remaining: 100, resetMs: 0 },
    });
    expect(limiter.size()).toBe(0);
    limiter.admit("k", limits, 40);
    clock.t += 1_000;
    const state = {
      requests: { limit: 3, remaining: 2, resetMs: 58_750 },
      tokens: { limit: 100, remaining: 60, resetMs: 58_750 },
    };
    expect(limiter.state("k", limits)).toEqual(state);
    expect(limiter.state("k", limits)).toEqual(state);
    expect(limiter.state("k", { requestsPerMinute: 0, tokensPerMinute: 0 })).toBeUndefined();
  });

  test("durations are written as OpenAI writes them", () => {
    const headers = (resetMs: number) =>
      rateLimitHeaders({ tokens: { limit: 1, remaining: 0, resetMs } })["x-ratelimit-reset-tokens"];
    expect([0, 250.4, 999, 1000, 1001, 59_000, 59_750, 60_000].map(headers)).toEqual([
      "0ms",
      "251ms",
      "999ms",
      "1s",
      "2s",
      "59s",
      "1m0s",
      "1m0s",
    ]);
  });
});

describe("across replicas", () => {
  // The setup clock's second, and the first second of its window.
  const now = 1_750_000_000;
  const since = now - 59;
  const count = (keyId: string, second: number, requests: number, tokens = 0) => ({ keyId, second, requests, tokens });

  test("what the other replicas counted refuses admission, and shows in the headers and Retry-After", () => {
    const { limiter } = setup();
    const rpm = { requestsPerMinute: 5, tokensPerMinute: 0 };
    limiter.admit("k", rpm, 0);
    limiter.learnOthers(since, [count("k", now - 30, 3)], ["k"]);
    expect(limiter.state("k", rpm)?.requests).toEqual({ limit: 5, remaining: 1, resetMs: 29_750 });
    expect(limiter.admit("k", rpm, 0).state?.requests?.remaining).toBe(0);
    const e = refused(() => limiter.admit("k", rpm, 0));
    expect(e.type).toBe("requests");
    expect(e.message).toContain("used 5");
    // The others' 3 requests 30 s ago leave the window first.
    expect(e.retryAfterS).toBe(30);
    expect(e.headers).toEqual({
      "x-ratelimit-limit-requests": "5",
      "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "30s",
      "retry-after-ms": "29750",
    });

    const tpm = { requestsPerMinute: 0, tokensPerMinute: 100 };
    limiter.admit("t", tpm, 10).settle(10);
    limiter.learnOthers(since, [count("t", now - 10, 1, 80)], ["t"]);
    const tokens = refused(() => limiter.admit("t", tpm, 20));
    expect(tokens.type).toBe("tokens");
    expect(tokens.message).toContain("used 90");
    expect(tokens.retryAfterS).toBe(50);
    expect(tokens.headers?.["x-ratelimit-remaining-tokens"]).toBe("10");
    limiter.admit("t", tpm, 10);
  });

  test("an answer replaces what was known of the seconds it names, and of every second of the keys answered whole", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 10, tokensPerMinute: 0 };
    const remaining = (key = "k") => limiter.state(key, rpm)?.requests?.remaining;
    limiter.admit("k", rpm, 0);
    limiter.admit("j", rpm, 0);
    expect(limiter.trackedKeys()).toEqual({ keyIds: [], newKeyIds: ["k", "j"] });
    limiter.learnOthers(since, [count("k", now - 1, 4), count("k", now, 3), count("j", now, 2)], ["k", "j"]);
    expect([remaining("k"), remaining("j")]).toEqual([2, 7]);
    expect(limiter.trackedKeys()).toEqual({ keyIds: ["k", "j"], newKeyIds: [] });
    // Answered as what changed: the second named is replaced, not added to; the others are as they were.
    limiter.learnOthers(since, [count("k", now, 5), count("j", now, 0)], []);
    expect([remaining("k"), remaining("j")]).toEqual([0, 9]);
    // Answered whole: a second left out counted nothing.
    limiter.learnOthers(since, [count("k", now, 5)], ["k"]);
    expect(remaining("k")).toBe(4);
    limiter.learnOthers(since, [], ["k"]);
    expect(remaining("k")).toBe(9);
    // Seconds before the window, and keys this replica does not track, are not taken.
    limiter.learnOthers(since, [count("k", since - 1, 5), count("x", now, 5)], ["x"]);
    expect([remaining("k"), limiter.size()]).toEqual([9, 2]);

    // They expire with the window.
    limiter.learnOthers(since, [count("k", now, 5)], []);
    clock.t += 59_000;
    expect(limiter.state("k", rpm)?.requests).toEqual({ limit: 10, remaining: 4, resetMs: 750 });
    clock.t += 1_000;
    expect(remaining("k")).toBe(10);
    limiter.admit("k", rpm, 0);
    expect(remaining("k")).toBe(9);
    // A key dropped once idle for a minute and counted again is new again: its window is asked whole.
    clock.t += 120_000;
    limiter.admit("j", rpm, 0);
    expect(limiter.trackedKeys()).toEqual({ keyIds: [], newKeyIds: ["j"] });
  });

  test("the seconds that admissions, releases and settlements changed are taken out once, at what they count now", () => {
    const { clock, limiter } = setup();
    const both = { requestsPerMinute: 10, tokensPerMinute: 1000 };
    const bySecond = () =>
      limiter.takeChanges().usage.sort((a, b) => a.keyId.localeCompare(b.keyId) || a.second - b.second);
    expect(limiter.takeChanges()).toEqual({ sinceSecond: since, usage: [] });
    const first = limiter.admit("k", both, 100);
    limiter.admit("r", { requestsPerMinute: 1, tokensPerMinute: 0 }, 100);
    limiter.admit("u", { requestsPerMinute: 0, tokensPerMinute: 0 }, 100);
    expect(bySecond()).toEqual([count("k", now, 1, 100), count("r", now, 1, 0)]);
    expect(bySecond()).toEqual([]);

    const second = limiter.admit("k", both, 50);
    limiter.admit("k", both, 30).release();
    expect(bySecond()).toEqual([count("k", now, 2, 150)]);
    second.release();
    second.release();
    expect(bySecond()).toEqual([count("k", now, 1, 100)]);

    clock.t += 2_000;
    first.settle(70);
    first.settle(700);
    expect(bySecond()).toEqual([count("k", now, 1, 0), count("k", now + 2, 0, 70)]);

    // A request that ran past its admitting second's minute: only its usage counts, from its end.
    const long = limiter.admit("k", both, 40);
    expect(bySecond()).toEqual([count("k", now + 2, 1, 110)]);
    clock.t += 61_000;
    long.settle(25);
    expect(limiter.takeChanges()).toEqual({ sinceSecond: now + 4, usage: [count("k", now + 63, 0, 25)] });
  });

  test("seconds billing did not get are taken out again at what they count then, unless they left the window", () => {
    const { clock, limiter } = setup();
    const both = { requestsPerMinute: 10, tokensPerMinute: 1000 };
    limiter.admit("k", both, 10);
    const failed = limiter.takeChanges().usage;
    limiter.admit("k", both, 5);
    clock.t += 1_000;
    limiter.admit("k", both, 1);
    limiter.restoreChanges(failed);
    const merged = limiter.takeChanges().usage.sort((a, b) => a.second - b.second);
    expect(merged).toEqual([count("k", now, 2, 15), count("k", now + 1, 1, 1)]);
    // Unchanged since, or changed down, a second comes out again as it stands: billing replaces what it had of it.
    const released = limiter.admit("k", both, 7);
    expect(limiter.takeChanges().usage).toEqual([count("k", now + 1, 2, 8)]);
    released.release();
    limiter.restoreChanges(merged);
    expect(limiter.takeChanges().usage.sort((a, b) => a.second - b.second)).toEqual(merged);

    // Failed again, and the window moves on past the first second: that second's change goes, the next one's stays.
    clock.t += 59_000;
    limiter.restoreChanges(merged);
    expect(limiter.takeChanges()).toEqual({ sinceSecond: now + 1, usage: [count("k", now + 1, 1, 1)] });
    clock.t += 1_000;
    limiter.admit("k", both, 3);
    limiter.restoreChanges(merged);
    expect(limiter.takeChanges().usage).toEqual([count("k", now + 61, 1, 3)]);
  });

  test("keys idle for a minute are dropped by the syncs' trackedKeys and takeChanges too, once a minute", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 1, tokensPerMinute: 0 };
    limiter.admit("k", rpm, 0);
    clock.t += 59_000;
    limiter.admit("j", rpm, 0);
    clock.t += 1_000;
    // A minute after its request, with no admission since, "k" is dropped; "j" still counts.
    expect(limiter.trackedKeys()).toEqual({ keyIds: [], newKeyIds: ["j"] });
    expect(limiter.takeChanges().usage).toEqual([count("j", now + 59, 1)]);
    clock.t += 59_000;
    expect([limiter.takeChanges().usage, limiter.size()]).toEqual([[], 1]);
    // The next prune, a minute after the last, drops "j": a replica with no limited traffic has nothing left to sync.
    clock.t += 1_000;
    expect(limiter.takeChanges()).toEqual({ sinceSecond: now + 61, usage: [] });
    expect(limiter.size()).toBe(0);
  });

  test("counts waiting to be reported are at most a key's window's worth, however long no sync takes them", () => {
    const { clock, limiter } = setup();
    const rpm = { requestsPerMinute: 1_000, tokensPerMinute: 0 };
    // Three keys (the most setup's limiter tracks), each admitting every second for three minutes; every sync fails.
    let failed = limiter.takeChanges().usage;
    for (let i = 0; i < 180; i++) {
      for (const key of ["a", "b", "c"]) limiter.admit(key, rpm, 0);
      if (i % 7 === 0) {
        limiter.restoreChanges(failed);
        failed = limiter.takeChanges().usage;
      }
      clock.t += 1_000;
    }
    limiter.restoreChanges(failed);
    const { sinceSecond, usage } = limiter.takeChanges();
    expect(usage.length).toBeLessThanOrEqual(3 * 60);
    expect(usage.every((change) => change.second >= sinceSecond && change.requests === 1)).toBe(true);
    // Every second of the window still counted is there, once.
    expect(usage.length).toBe(3 * 59);
  });
});
