import { afterAll, describe, expect, test } from "bun:test";
import { createOpenAIProvider } from "./openai.ts";
import type { ChatRequest } from "./provider.ts";
import { UpstreamError, type UpstreamFailure } from "./provider.ts";

// A stand-in for an OpenAI-compatible upstream: the reply depends on the requested model.
const seen: Array<{ auth: string | null; body: Record<string, unknown> }> = [];
const upstream = Bun.serve({
  port: 0,
  async fetch(req) {
    const body = (await req.json()) as Record<string, unknown>;
    seen.push({ auth: req.headers.get("authorization"), body });
    const completion = {
      id: "chatcmpl-1",
      object: "chat.completion",
      created: 1_700_000_000,
      model: `${body.model}-2024`,
      choices: [{ index: 0, message: { role: "assistant", content: "hi there", refusal: null }, finish_reason: "stop", logprobs: null }],
    };
    switch (body.model) {
      case "ok":
        return Response.json({
          ...completion,
          usage: {
            prompt_tokens: 100,
            completion_tokens: 50,
            total_tokens: 150,
            prompt_tokens_details: { cached_tokens: 40 },
            completion_tokens_details: { reasoning_tokens: 20 },
          },
        });
      case "no-usage":
        return Response.json(completion);
      case "slow":
        await Bun.sleep(300);
        return Response.json(completion);
      default:
        return Response.json({ error: { message: `status ${body.model}`, type: "x" } }, { status: Number(body.model) });
    }
  },
});
afterAll(() => upstream.stop(true));

const provider = createOpenAIProvider(
  { name: "compat", kind: "openai", base_url: `http://127.0.0.1:${upstream.port}/v1`, api_key_env: "COMPAT_KEY" },
  "sk-upstream",
);
const request = (model: string): ChatRequest => ({ model, messages: [{ role: "user", content: "hello" }] });
const failure = (p: Promise<unknown>) => p.then(() => undefined, (e: unknown) => e as UpstreamError);

describe("openai provider", () => {
  test("calls any OpenAI-compatible URL with its key and maps usage details", async () => {
    const result = await provider.chat(request("ok"), { timeoutMs: 5000 });
    expect(seen.at(-1)?.auth).toBe("Bearer sk-upstream");
    expect(seen.at(-1)?.body.model).toBe("ok");
    expect(result.completion.model).toBe("ok-2024");
    expect(result.tokens).toEqual({ inputTokens: 100n, cachedInputTokens: 40n, outputTokens: 50n, reasoningTokens: 20n });
    expect(result.usageEstimated).toBe(false);
  });

  test("counts usage with the tokenizer when the upstream reports none", async () => {
    const result = await provider.chat(request("no-usage"), { timeoutMs: 5000 });
    expect(result.usageEstimated).toBe(true);
    // o200k_base: 3 priming + (3 framing + "user" 1 + "hello" 1); "hi there" is 2 tokens
    expect(result.tokens).toMatchObject({ inputTokens: 8n, outputTokens: 2n });
  });

  test("classifies failures so routing knows whether to retry, fall back or stop", async () => {
    const cases: Array<[string, UpstreamFailure]> = [
      ["500", "transient"],
      ["503", "transient"],
      ["429", "transient"],
      ["400", "rejected"],
      ["401", "misconfigured"],
      ["404", "misconfigured"],
    ];
    for (const [status, failureClass] of cases) {
      const e = await failure(provider.chat(request(status), { timeoutMs: 5000 }));
      expect(e).toBeInstanceOf(UpstreamError);
      expect([e?.failure, e?.status]).toEqual([failureClass, Number(status)]);
    }
    expect((await failure(provider.chat(request("slow"), { timeoutMs: 50 })))?.failure).toBe("timeout");
    const gone = new AbortController();
    const pending = failure(provider.chat(request("slow"), { timeoutMs: 5000, signal: gone.signal }));
    gone.abort();
    expect((await pending)?.failure).toBe("cancelled");
  });

  test("a provider whose key variable is unset fails as misconfigured without calling out", async () => {
    const before = seen.length;
    const keyless = createOpenAIProvider({ name: "openai", kind: "openai", api_key_env: "OPENAI_API_KEY" }, undefined);
    const e = await failure(keyless.chat(request("ok"), { timeoutMs: 1000 }));
    expect(e?.failure).toBe("misconfigured");
    expect(e?.message).toContain("OPENAI_API_KEY");
    expect(seen.length).toBe(before);
  });

  test("the connection failing is transient", async () => {
    const nowhere = createOpenAIProvider({ name: "nowhere", kind: "openai", base_url: "http://127.0.0.1:9/v1" }, undefined);
    expect((await failure(nowhere.chat(request("ok"), { timeoutMs: 2000 })))?.failure).toBe("transient");
  });
});
