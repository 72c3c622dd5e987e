import { afterAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { embeddingJson } from "../http/app.ts";
import { createOpenAIProvider } from "./openai.ts";
import type { ChatRequest } from "./provider.ts";
import { UpstreamError, type UpstreamFailure } from "./provider.ts";
import { eventually } from "../../test/support.ts";

// A stand-in for an OpenAI-compatible upstream: the reply depends on the requested model.
const seen: Array<{ auth: string | null; timeout: string | null; userAgent: string | null; body: Record<string, unknown> }> = [];
const upstream = Bun.serve({
  port: 0,
  async fetch(req) {
    const body = (await req.json()) as Record<string, unknown>;
    seen.push({
      auth: req.headers.get("authorization"),
      timeout: req.headers.get("x-stainless-timeout"),
      userAgent: req.headers.get("user-agent"),
      body,
    });
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
      case "deepseek":
        // DeepSeek's usage: its cache hits and misses beside prompt_tokens, no prompt_tokens_details.
        return Response.json({
          ...completion,
          usage: { prompt_tokens: 1000, completion_tokens: 10, total_tokens: 1010, prompt_cache_hit_tokens: 800, prompt_cache_miss_tokens: 200 },
        });
      case "eos":
        // Together's finish reason for a model that stopped by itself.
        return Response.json({ ...completion, choices: [{ ...completion.choices[0], finish_reason: "eos" }] });
      case "stop-sequence":
        // TGI's for an answer one of the client's stop sequences ended.
        return Response.json({ ...completion, choices: [{ ...completion.choices[0], finish_reason: "stop_sequence" }] });
      case "no-usage":
        return Response.json(completion);
      case "slow":
        await Bun.sleep(300);
        return Response.json(completion);
      case "vllm-400":
        // vLLM's and others' error shape: no `error` member.
        return Response.json(
          { object: "error", message: "This model's maximum context length is 8192 tokens", type: "BadRequestError", code: 400 },
          { status: 400 },
        );
      case "context":
        return Response.json(
          { error: { message: "This model's maximum context length is 128000 tokens.", type: "invalid_request_error", param: "messages", code: "context_length_exceeded" } },
          { status: 400 },
        );
      case "quota":
        return Response.json(
          { error: { message: "You exceeded your current quota.", type: "insufficient_quota", param: null, code: "insufficient_quota" } },
          { status: 429 },
        );
      case "unbounded":
        return Response.json(
          { error: { message: "x".repeat(10_000), type: "invalid_request_error", param: "p".repeat(500), code: "bad\ncode" } },
          { status: 400 },
        );
      case "tgi-422":
        // TGI's error shape: the message is the `error` member itself.
        return Response.json({ error: "Input validation error: `inputs` must have less than 4096 tokens", error_type: "validation" }, { status: 422 });
      case "text-400":
        return new Response("context too long", { status: 400, headers: { "content-type": "text/plain" } });
      case "routed-429":
        // OpenRouter's answer when the provider it routed to failed after it had accepted the request: a 200.
        return Response.json({ error: { message: "Provider returned error", code: 429, metadata: { provider_name: "x" } } });
      case "routed-502":
        return Response.json({ error: { message: "Provider returned error", code: 502 } });
      case "routed-402":
        return Response.json({ error: { message: "Insufficient credits", code: 402 } });
      case "proxy-413":
        return new Response("<html><body>413 Request Entity Too Large</body></html>", { status: 413 });
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
    expect(seen.at(-1)?.userAgent).toStartWith("OpenAI/JS ");
    expect(result.completion.model).toBe("ok-2024");
    expect(result.tokens).toEqual({ inputTokens: 100n, cachedInputTokens: 40n, outputTokens: 50n, reasoningTokens: 20n });
    expect(result.usageEstimated).toBe(false);
  });

  test("reads DeepSeek's cache hits as cached input, shown to the client as OpenAI's cached_tokens", async () => {
    const result = await provider.chat(request("deepseek"), { timeoutMs: 5000 });
    expect(result.tokens).toEqual({ inputTokens: 1000n, cachedInputTokens: 800n, outputTokens: 10n, reasoningTokens: 0n });
    expect(result.usageEstimated).toBe(false);
    expect(result.completion.usage).toEqual({
      prompt_tokens: 1000,
      completion_tokens: 10,
      total_tokens: 1010,
      prompt_tokens_details: { cached_tokens: 800 },
    });
  });

  test("a compatible server's own finish reason is answered as OpenAI's", async () => {
    for (const model of ["eos", "stop-sequence"]) {
      const result = await provider.chat(request(model), { timeoutMs: 5000 });
      expect(result.completion.choices[0]?.finish_reason).toBe("stop");
    }
  });

  test("each call carries its own body and the SDK's header for its own time limit", async () => {
    const before = seen.length;
    const asked = { ...request("ok"), temperature: 0.25, user: "u-1" };
    await provider.chat(asked, { timeoutMs: 5000 });
    await provider.chat(request("no-usage"), { timeoutMs: 5000 });
    await provider.chat(request("ok"), { timeoutMs: 12_500 });
    await provider.chat(request("ok"), { timeoutMs: 400 });
    expect(seen.slice(before).map((s): unknown[] => [s.body, s.timeout])).toEqual([
      [asked, "5"],
      [request("no-usage"), "5"],
      [request("ok"), "12"],
      [request("ok"), "0"],
    ]);
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
      ["413", "rejected"],
      ["422", "rejected"],
      ["401", "misconfigured"],
      ["403", "misconfigured"],
      ["404", "misconfigured"],
      ["quota", "misconfigured"],
    ];
    for (const [status, failureClass] of cases) {
      const e = await failure(provider.chat(request(status), { timeoutMs: 5000 }));
      expect(e).toBeInstanceOf(UpstreamError);
      expect([e?.failure, e?.status]).toEqual([failureClass, status === "quota" ? 429 : Number(status)]);
    }
    // A failure in a 200's body, as OpenRouter answers one of the provider it routed to: as its status would be.
    const routed = await Promise.all(["routed-429", "routed-502", "routed-402"].map((m) => failure(provider.chat(request(m), { timeoutMs: 5000 }))));
    expect(routed.map((e) => [e?.failure, e?.status])).toEqual([["transient", 429], ["transient", undefined], ["misconfigured", 402]]);
    expect(routed[0]?.message).toBe("compat answered 429 in its answer: Provider returned error");
    const vllm = await failure(provider.chat(request("vllm-400"), { timeoutMs: 5000 }));
    expect([vllm?.failure, vllm?.status]).toEqual(["rejected", 400]);
    expect(vllm?.message).toContain("maximum context length is 8192 tokens");
    expect((await failure(provider.chat(request("slow"), { timeoutMs: 50 })))?.failure).toBe("timeout");
    const gone = new AbortController();
    const pending = failure(provider.chat(request("slow"), { timeoutMs: 5000, signal: gone.signal }));
    gone.abort();
    expect((await pending)?.failure).toBe("cancelled");
  });

  test("keeps an upstream's OpenAI-shaped error, bounded, for the client", async () => {
    const context = await failure(provider.chat(request("context"), { timeoutMs: 5000 }));
    expect(context?.error).toEqual({
      message: "This model's maximum context length is 128000 tokens.",
      type: "invalid_request_error",
      param: "messages",
      code: "context_length_exceeded",
    });
    const unbounded = await failure(provider.chat(request("unbounded"), { timeoutMs: 5000 }));
    expect(unbounded?.error?.message).toHaveLength(2000);
    expect([unbounded?.error?.type, unbounded?.error?.param, unbounded?.error?.code]).toEqual(["invalid_request_error", null, null]);
    const vllm = await failure(provider.chat(request("vllm-400"), { timeoutMs: 5000 }));
    expect(vllm?.error).toEqual({ message: "This model's maximum context length is 8192 tokens", type: "BadRequestError", param: null, code: null });
    const proxy = await failure(provider.chat(request("proxy-413"), { timeoutMs: 5000 }));
    expect([proxy?.failure, proxy?.status, proxy?.error]).toEqual(["rejected", 413, undefined]);
  });

  test("keeps the words of an error in no OpenAI shape: TGI's error string, a plain text body", async () => {
    const tgi = await failure(provider.chat(request("tgi-422"), { timeoutMs: 5000 }));
    expect([tgi?.failure, tgi?.status, tgi?.error]).toEqual([
      "rejected",
      422,
      { message: "Input validation error: `inputs` must have less than 4096 tokens", type: null, param: null, code: null },
    ]);
    const text = await failure(provider.chat(request("text-400"), { timeoutMs: 5000 }));
    expect([text?.failure, text?.status, text?.error?.message]).toEqual(["rejected", 400, "context too long"]);
  });

  test("a provider whose key variable is unset fails as misconfigured without calling out", async () => {
    const before = seen.length;
    const keyless = createOpenAIProvider({ name: "openai", kind: "openai", api_key_env: "OPENAI_API_KEY" }, undefined);
    const e = await failure(keyless.chat(request("ok"), { timeoutMs: 1000 }));
    expect(e?.failure).toBe("misconfigured");
    expect(e?.message).toContain("OPENAI_API_KEY");
    expect(seen.length).toBe(before);
  });

  test("a redirect is not followed: nothing reaches where it points, and the target is the operator's to fix", async () => {
    const reached: string[] = [];
    const elsewhere = Bun.serve({ port: 0, fetch: (req) => (reached.push(req.method), Response.json({})) });
    const moved = Bun.serve({
      port: 0,
      fetch: (req) =>
        new Response(null, {
          status: new URL(req.url).pathname.endsWith("/embeddings") ? 301 : 307,
          headers: { location: `http://localhost:${elsewhere.port}/v1/chat/completions?sig=abc` },
        }),
    });
    try {
      const redirecting = createOpenAIProvider(
        { name: "moved", kind: "openai", base_url: `http://127.0.0.1:${moved.port}/v1`, headers: { "Helicone-Auth": "Bearer h" } },
        undefined,
      );
      const chat = await failure(redirecting.chat(request("ok"), { timeoutMs: 2000 }));
      expect(chat?.failure).toBe("misconfigured");
      expect(chat?.status).toBe(307);
      expect(chat?.message).toBe(
        `moved answered 307, a redirect to http://localhost:${elsewhere.port}/v1/chat/completions, which is not ` +
          "followed: base_url must be the upstream's own address",
      );
      const embedding = { model: "e", input: "x", encoding_format: "float" } as const;
      const embed = await failure(redirecting.embed(embedding, { timeoutMs: 2000 }));
      expect(embed?.failure).toBe("misconfigured");
      expect(embed?.status).toBe(301);
      const stream = await failure(redirecting.streamChat(request("ok"), { timeoutMs: 2000 }));
      expect(stream?.failure).toBe("misconfigured");
      // Neither the prompt nor the configured credential went to the other host, by POST or GET.
      expect(reached).toEqual([]);
    } finally {
      moved.stop(true);
      elsewhere.stop(true);
    }
  });

  test(
    "an upstream silent for longer than Bun's own idle limit answers within the attempt's time limit",
    async () => {
      // Bun's fetch drops a connection idle for 5 minutes by default: here, a second (checked every 8 s or so).
      const script = [
        `import { createOpenAIProvider } from ${JSON.stringify(join(import.meta.dir, "openai.ts"))};`,
        "const completion = { id: 'c', object: 'chat.completion', created: 1, model: 'm', choices: [",
        "  { index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }] };",
        "const answerLate = () => Bun.sleep(12_000).then(() => Response.json(completion));",
        "const thinking = Bun.serve({ port: 0, idleTimeout: 0, fetch: answerLate });",
        "const config = { name: 'thinker', kind: 'openai', base_url: `http://127.0.0.1:${thinking.port}/v1` };",
        "const request = { model: 'm', messages: [{ role: 'user', content: 'hello' }] };",
        "const answer = await createOpenAIProvider(config).chat(request, { timeoutMs: 30_000 }).catch((e) => e.message);",
        "console.log(JSON.stringify(answer.completion?.choices[0].message.content ?? answer));",
        "thinking.stop(true);",
      ].join("\n");
      const child = Bun.spawn([process.execPath, "--eval", script], {
        env: { ...process.env, BUN_CONFIG_HTTP_IDLE_TIMEOUT: "1" },
        stdout: "pipe",
        stderr: "pipe",
      });
      const [out, err] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text()]);
      expect({ out: out.trim(), err }).toEqual({ out: '"hi"', err: "" });
    },
    40_000,
  );

  test("a whole answer is read up to its limit: one past it fails the attempt as cut off, unread", async () => {
    const mib = 1024 * 1024;
    const completion = JSON.stringify({
      id: "c",
      object: "chat.completion",
      created: 1,
      model: "m",
      choices: [{ index: 0, message: { role: "assistant", content: "x".repeat(mib / 2) }, finish_reason: "stop" }],
    });
    let sent = 0;
    const endless = () =>
      new ReadableStream({
        async pull(controller) {
          sent += 64 * 1024;
          controller.enqueue(new TextEncoder().encode(sent === 64 * 1024 ? '{"id":"' : "x".repeat(64 * 1024)));
          await Bun.sleep(0);
        },
      });
    const answering = Bun.serve({
      port: 0,
      async fetch(req) {
        const { model } = (await req.json()) as { model: string };
        const json = { "content-type": "application/json" };
        if (model === "endless") return new Response(endless(), { headers: json });
        if (model === "endless-500") return new Response(endless(), { status: 500, headers: json });
        if (model === "declared") return new Response(`{"pad":"${"x".repeat(2 * mib)}"}`, { headers: json });
        if (model === "gzip-bomb") {
          const zipped = Bun.gzipSync(`{"pad":"${"x".repeat(8 * mib)}"}`);
          return new Response(zipped, { headers: { ...json, "content-encoding": "gzip" } });
        }
        if (model === "gzip") return new Response(Bun.gzipSync(completion), { headers: { ...json, "content-encoding": "gzip" } });
        // Chunked, of no declared length.
        return new Response(new Blob([completion]).stream(), { headers: json });
      },
    });
    try {
      const config = { name: "big", kind: "openai", base_url: `http://127.0.0.1:${answering.port}/v1` } as const;
      const bounded = createOpenAIProvider(config, undefined, [], mib);
      for (const model of ["endless", "declared", "gzip-bomb"]) {
        const e = await failure(bounded.chat(request(model), { timeoutMs: 10_000 }));
        expect({ model, failure: e?.failure, message: e?.message, promptTaken: e?.promptTaken }).toEqual({
          model,
          failure: "transient",
          message: `big: an answer longer than ${mib} bytes, not read`,
          promptTaken: true,
        });
      }
      // The endless answer was given up on near its limit, not read on until the attempt's time ran out.
      expect(sent).toBeLessThan(8 * mib);
      // A refusal's endless body is cut short: the refusal is still the upstream's 500.
      const refused = await failure(bounded.chat(request("endless-500"), { timeoutMs: 10_000 }));
      expect({ failure: refused?.failure, status: refused?.status }).toEqual({ failure: "transient", status: 500 });
      for (const model of ["chunked", "gzip"]) {
        const { completion: answer } = await bounded.chat(request(model), { timeoutMs: 10_000 });
        expect(answer.choices[0]?.message.content).toHaveLength(mib / 2);
      }
    } finally {
      answering.stop(true);
    }
  });

  test("the connection failing is transient", async () => {
    const nowhere = createOpenAIProvider({ name: "nowhere", kind: "openai", base_url: "http://127.0.0.1:9/v1" }, undefined);
    expect((await failure(nowhere.chat(request("ok"), { timeoutMs: 2000 })))?.failure).toBe("transient");
  });
});

// Streams sent as raw bytes, in the pieces given, with a pause between pieces: SSE framing as upstreams really send it.
const choiceEvent = (index: number, delta: Record<string, unknown>, finish: string | null = null) =>
  `data: ${JSON.stringify({ id: "c1", object: "chat.completion.chunk", created: 1, model: "m", choices: [{ index, delta, finish_reason: finish }] })}\n\n`;
const chunkEvent = (delta: Record<string, unknown>, finish: string | null = null) => choiceEvent(0, delta, finish);
const usageEvent = `data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n`;
/** `text` as UTF-8, cut into pieces at the given byte offsets. */
const cutBytes = (text: string, ...offsets: number[]): Uint8Array[] => {
  const bytes = new TextEncoder().encode(text);
  return [0, ...offsets].map((start, i) => bytes.subarray(start, offsets[i] ?? bytes.length));
};
const framedText = [
  ": keep-alive\r\n\r\nretry: 1000\r\n\r\n",
  chunkEvent({ role: "assistant", content: "" }).replace(/\n/g, "\r\n"),
  chunkEvent({ content: "caf\u00e9" }),
  chunkEvent({}, "stop"),
  usageEvent,
  "data: [DONE]\n\n",
  chunkEvent({ content: "after done" }),
].join("");
// The second cut falls between the two bytes of the "é".
const eAcute = new TextEncoder().encode(framedText).indexOf(0xc3);
const streams: Record<string, Array<string | Uint8Array>> = {
  // Split inside events and inside a multi-byte character, CRLF line ends, a comment and a retry field.
  framed: cutBytes(framedText, 40, eAcute + 1, eAcute + 30),
  // Finish reasons of compatible servers: Ollama's and SGLang's "" while unfinished, Together's eos, Mistral's.
  "own-finish": [chunkEvent({ content: "a" }, ""), chunkEvent({}, "eos"), usageEvent, "data: [DONE]\n\n"],
  "model-length": [chunkEvent({ content: "a" }, ""), chunkEvent({}, "model_length"), "data: [DONE]\n\n"],
  // TGI's for a stream one of the client's stop sequences ended.
  "stop-sequence": [chunkEvent({ content: "a" }), chunkEvent({}, "stop_sequence"), "data: [DONE]\n\n"],
  "error-event": [chunkEvent({ content: "partial" }), `data: {"error":{"message":"The server had an error","type":"server_error"}}\n\n`],
  "named-error": [chunkEvent({ content: "partial" }), `event: error\ndata: {"message":"overloaded"}\n\n`],
  // Failures before the first chunk: an error event first, a prefill longer than the attempt's limit.
  "error-first": [`data: {"error":{"message":"overloaded","type":"server_error"}}\n\n`],
  prefill: [": prefill\n\n", "WAIT", chunkEvent({ content: "late" }, "stop")],
  // Rate limits proxies send after their 200: OpenRouter's code, OpenAI's codes of a limit, an account out of quota
  // and a prompt over the whole limit.
  "limit-first": [`data: {"error":{"code":429,"message":"Rate limit exceeded: free-models-per-min."}}\n\n`],
  "tpm-first": [`data: {"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}\n\n`],
  "quota-first": [`data: {"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}\n\n`],
  "too-large-first": [
    `data: {"error":{"message":"Request too large for gpt-4o. The input or output tokens must be reduced","code":"rate_limit_exceeded"}}\n\n`,
  ],
  // Errors without the {"error": ...} wrapper, as vLLM and others send them.
  "bare-error": [chunkEvent({ content: "partial" }), `data: {"object":"error","message":"overloaded","code":503}\n\n`],
  "message-error": [chunkEvent({ content: "partial" }), `data: {"message":"overloaded","code":503}\n\n`],
  // An event that says it is something else than a chunk.
  "foreign-object": [
    chunkEvent({ content: "partial" }),
    `data: {"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}]}\n\n`,
    chunkEvent({}, "stop"),
  ],
  // Chunks that call themselves completions, as some compatible servers and proxies send them.
  "completion-object": [
    `data: {"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n`,
    `data: {"id":"c1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n`,
  ],
  // Azure's first chunk: prompt filter results, an empty object and model, no choices.
  "azure-first": [
    `data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n`,
    chunkEvent({ content: "partial" }, "stop"),
  ],
  unreadable: [chunkEvent({ content: "partial" }), "data: {not json\n\n"],
  cut: [chunkEvent({ content: "partial" })],
  silent: [chunkEvent({ content: "partial" }), "WAIT"],
  // The last event without its blank line, a chunk without finish_reason, a usage chunk without choices.
  unterminated: [
    `data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n`,
    chunkEvent({}, "stop"),
    `data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}`,
  ],
  // Keep-alive comments are not chunks: they do not hold off the timeout.
  "keep-alive": [chunkEvent({ content: "partial" }), ": ping\n\n", "PAUSE", ": ping\n\n", "PAUSE", chunkEvent({}, "stop")],
  "null-event": [chunkEvent({ content: "partial" }), "data: null\n\n", chunkEvent({}, "stop")],
  "bad-choices": [chunkEvent({ content: "partial" }), `data: {"choices":5}\n\n`, chunkEvent({}, "stop")],
  "null-error-event": [chunkEvent({ content: "partial" }), "event: error\ndata: null\n\n", chunkEvent({}, "stop")],
  // Done, but the body ends only a while later.
  // Ends 300 ms after [DONE]: well within the second the gateway gives a finished stream's body to end in.
  lingering: [chunkEvent({ content: "done" }, "stop"), "data: [DONE]\n\n", "PAUSE"],
  // [DONE] with a CRLF and no blank line, its bytes split, and the connection held open (three seconds here).
  "done-held": [chunkEvent({ content: "done" }, "stop"), `${usageEvent}data: [DO`, "NE]\r", "WAIT", "WAIT", "WAIT"],
  // [DONE] whose blank line comes a while after it.
  "done-later": [chunkEvent({ content: "done" }, "stop"), usageEvent, "data: [DONE]\n", "WAIT", "\n"],
  // Half an event, then nothing for a second.
  "half-event": [`data: {"id":"c1","object":"chat.comp`, "WAIT"],
  // An event that never ends (100 MiB of it here), after a chunk and before any.
  "endless-event": [chunkEvent({ content: "partial" }), 'data: {"pad":"', ...Array(400).fill("x".repeat(256 * 1024))],
  "endless-first": ['data: {"pad":"', ...Array(400).fill("x".repeat(256 * 1024))],
  // A long answer sent faster than it is read: 20,000 chunks (2.3 MB) at once.
  long: [Array.from({ length: 20_000 }, (_, i) => chunkEvent({ content: ` w${i}` })).join(""), chunkEvent({}, "stop")],
  // Two choices (n = 2): the first finishes, the second is cut off; then both finishing.
  "two-cut": [choiceEvent(0, { content: "one" }, "stop"), choiceEvent(1, { content: "tw" })],
  // Two asked for, the first finished, the connection closed before the second began.
  "two-unbegun": [choiceEvent(0, { content: "one" }, "stop")],
  // A server that ignores n: one choice, then [DONE].
  "one-of-two": [choiceEvent(0, { content: "one" }, "stop"), "data: [DONE]\n\n"],
  // Two choices, one finished, then [DONE]; one never finished, then [DONE].
  "two-open-done": [choiceEvent(0, { content: "one" }, "length"), choiceEvent(1, { content: "two" }), "data: [DONE]\n\n"],
  "unfinished-done": [chunkEvent({ content: "partial" }), usageEvent, "data: [DONE]\n\n"],
  "tools-open-done": [
    choiceEvent(0, { content: "one" }),
    choiceEvent(1, { tool_calls: [{ index: 0, id: "call_1", type: "function", function: { name: "f", arguments: "{}" } }] }),
    "data: [DONE]\n\n",
  ],
  "two-done": [
    choiceEvent(0, { content: "one" }),
    choiceEvent(1, { content: "two" }),
    choiceEvent(1, {}, "stop"),
    choiceEvent(0, {}, "stop"),
    "data: [DONE]\n\n",
  ],
};
// Models whose stream the gateway closed before it ended, and whose stream the upstream sent to its end.
const closedEarly: string[] = [];
const ended: string[] = [];
const endedCount = (model: string) => ended.filter((m) => m === model).length;
const clientPorts: number[] = [];
const streamingUpstream = Bun.serve({
  port: 0,
  async fetch(req, server) {
    clientPorts.push(server.requestIP(req)?.port ?? 0);
    const { model } = (await req.json()) as { model: string };
    // A proxy's failure as a 200 with a JSON error body.
    if (model === "json-200") return Response.json({ error: { message: "no healthy backend", type: "proxy_error" } });
    const parts = streams[model] ?? [];
    const bytes = new TextEncoder();
    return new Response(
      new ReadableStream<Uint8Array>({
        async start(controller) {
          for (const part of parts) {
            if (part === "WAIT") await Bun.sleep(1000);
            else if (part === "PAUSE") await Bun.sleep(300);
            else controller.enqueue(typeof part === "string" ? bytes.encode(part) : part);
            await Bun.sleep(5);
          }
          ended.push(model);
          controller.close();
        },
        cancel() {
          closedEarly.push(model);
        },
      }),
      { headers: { "content-type": "text/event-stream" } },
    );
  },
});
afterAll(() => streamingUpstream.stop(true));
const streaming = createOpenAIProvider(
  { name: "sse", kind: "openai", base_url: `http://127.0.0.1:${streamingUpstream.port}/v1` },
  undefined,
);
const drain = async (model: string, timeoutMs = 5000, n?: number) => {
  const contents: string[] = [];
  let usage: unknown;
  try {
    for await (const chunk of await streaming.streamChat({ ...request(model), ...(n ? { n } : {}) }, { timeoutMs })) {
      for (const choice of chunk.choices) if (choice.delta.content) contents.push(choice.delta.content);
      if (chunk.usage) usage = chunk.usage;
    }
    return { contents, usage, error: undefined };
  } catch (e) {
    return { contents, usage, error: e as UpstreamError };
  }
};

describe("openai provider streams", () => {
  test("an event longer than a whole answer may be fails the attempt as cut off, and is read no further", async () => {
    const bounded = createOpenAIProvider(
      { name: "sse", kind: "openai", base_url: `http://127.0.0.1:${streamingUpstream.port}/v1` },
      undefined,
      [],
      1024 * 1024,
    );
    const contents: string[] = [];
    const midway = await failure(
      (async () => {
        for await (const chunk of await bounded.streamChat(request("endless-event"), { timeoutMs: 5000 })) {
          for (const choice of chunk.choices) if (choice.delta.content) contents.push(choice.delta.content);
        }
      })(),
    );
    const first = await failure(bounded.streamChat(request("endless-first"), { timeoutMs: 5000 }));
    expect(contents).toEqual(["partial"]);
    for (const e of [midway, first]) {
      expect({ failure: e?.failure, message: e?.message, promptTaken: e?.promptTaken }).toEqual({
        failure: "transient",
        message: "sse: an event longer than 1048576 bytes, not read",
        promptTaken: true,
      });
    }
    const closed = () => closedEarly.includes("endless-event") && closedEarly.includes("endless-first");
    await eventually(() => closed() || undefined);
  });

  test("a long answer that arrived faster than it was read lets the event loop turn while it is read", async () => {
    // The event loop's turns: timers, other requests' I/O and callbacks all wait for the next.
    let turns = 0;
    let turning = true;
    const turn = () => {
      turns++;
      if (turning) setImmediate(turn);
    };
    setImmediate(turn);
    let count = 0;
    let inOneTurn = 0;
    let most = 0;
    let seenAt = -1;
    try {
      for await (const chunk of await streaming.streamChat(request("long"), { timeoutMs: 5000 })) {
        // The answer arrives meanwhile: the next reads hold what Bun's fetch buffered (up to half a MiB).
        if (count++ === 0) await Bun.sleep(200);
        if (chunk.choices[0]?.delta.content === undefined) continue;
        inOneTurn = turns === seenAt ? inOneTurn + 1 : 1;
        seenAt = turns;
        most = Math.max(most, inOneTurn);
      }
    } finally {
      turning = false;
    }
    expect(count).toBe(20_001);
    // A slice of a read (16 KiB) is about 140 of these chunks; a whole read was thousands.
    expect(most).toBeLessThan(500);
  });

  test("a compatible server's own finish reasons reach the client as OpenAI's", async () => {
    for (const [model, last] of [
      ["own-finish", "stop"],
      ["model-length", "length"],
      ["stop-sequence", "stop"],
    ]) {
      const reasons: unknown[] = [];
      for await (const chunk of await streaming.streamChat(request(model as string), { timeoutMs: 5000 })) {
        for (const choice of chunk.choices) reasons.push(choice.finish_reason);
      }
      expect(reasons).toEqual([null, last]);
    }
  });

  test("a consumer that takes longer than the timeout to read a chunk is not the upstream's silence", async () => {
    const contents: string[] = [];
    for await (const chunk of await streaming.streamChat(request("two-done"), { timeoutMs: 200 })) {
      for (const choice of chunk.choices) if (choice.delta.content) contents.push(choice.delta.content);
      await Bun.sleep(400);
    }
    expect(contents).toEqual(["one", "two"]);
  });

  test("reads events however the bytes are split, with CRLF, comments and nothing after [DONE]", async () => {
    const { contents, usage, error } = await drain("framed");
    expect(error).toBeUndefined();
    expect(contents).toEqual(["caf\u00e9"]);
    expect(usage).toEqual({ prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 });
  });

  test("an error event fails the attempt after the chunks before it", async () => {
    for (const model of ["error-event", "named-error"]) {
      const { contents, error } = await drain(model);
      expect(contents).toEqual(["partial"]);
      expect(error).toBeInstanceOf(UpstreamError);
      expect(error?.failure).toBe("transient");
    }
    expect((await drain("error-event")).error?.message).toContain("The server had an error");
    expect((await drain("named-error")).error?.message).toContain("overloaded");
  });

  test("an error without the error wrapper, or an event of another object, fails the attempt; Azure's first chunk does not", async () => {
    for (const model of ["bare-error", "message-error", "foreign-object"]) {
      const { contents, error } = await drain(model);
      expect(contents).toEqual(["partial"]);
      expect(error?.failure).toBe("transient");
    }
    expect((await drain("bare-error")).error?.message).toBe("sse: overloaded");
    expect((await drain("message-error")).error?.message).toBe("sse: overloaded");
    expect(await drain("azure-first")).toMatchObject({ contents: ["partial"], error: undefined });
    expect(await drain("completion-object")).toMatchObject({ contents: ["partial"], error: undefined });
  });

  test("a failure before the first chunk fails the attempt itself, within its time limit", async () => {
    const opened = (model: string, timeoutMs = 5000) =>
      streaming.streamChat(request(model), { timeoutMs }).then(
        () => undefined,
        (e: unknown) => e as UpstreamError,
      );
    expect(await opened("error-first")).toMatchObject({ failure: "transient", message: "sse: overloaded" });
    const json = await opened("json-200");
    expect(json?.failure).toBe("transient");
    expect(json?.message).toContain("no healthy backend");
    // A rate limit is the 429 it says, classed as that status is: to retry or wait out, to fall back from.
    expect(await opened("limit-first")).toMatchObject({ failure: "transient", status: 429 });
    expect(await opened("tpm-first")).toMatchObject({ failure: "transient", status: 429 });
    expect(await opened("quota-first")).toMatchObject({ failure: "misconfigured", status: 429 });
    expect(await opened("too-large-first")).toMatchObject({ failure: "rejected", status: 429 });
    // At its limit, not once the chunk that comes a second later has ended the stream.
    const before = endedCount("prefill");
    expect((await opened("prefill", 300))?.failure).toBe("timeout");
    expect(endedCount("prefill")).toBe(before);
  });

  test("with several choices the stream has finished only when every one has", async () => {
    const cut = await drain("two-cut");
    expect(cut.contents).toEqual(["one", "tw"]);
    expect(cut.error?.message).toContain("ended before it finished");
    const unbegun = await drain("two-unbegun", 5000, 2);
    expect(unbegun.error?.message).toContain("ended before it finished");
    expect((await drain("one-of-two", 5000, 2)).error).toBeUndefined();
    const done = await drain("two-done");
    expect(done.error).toBeUndefined();
    expect(done.contents).toEqual(["one", "two"]);
  });

  test("[DONE] ends the choices still open as stopped (for their tool calls if they made any); without it they were cut", async () => {
    const read = async (model: string, n?: number) => {
      const chunks: Array<{ id: string; model: string; choices: Array<{ index: number; finish_reason: unknown }> }> = [];
      for await (const chunk of await streaming.streamChat({ ...request(model), ...(n ? { n } : {}) }, { timeoutMs: 5000 })) {
        chunks.push(chunk);
      }
      const finished = chunks.flatMap((c) => c.choices.filter((choice) => choice.finish_reason));
      return { last: chunks.at(-1), finishes: finished.map((choice) => [choice.index, choice.finish_reason]) };
    };
    // After the usage chunk, with the stream's id and model, as the upstream's own last chunk would have them.
    const unfinished = await read("unfinished-done");
    expect(unfinished.finishes).toEqual([[0, "stop"]]);
    expect(unfinished.last).toMatchObject({ id: "c1", model: "m", choices: [{ index: 0, delta: {}, finish_reason: "stop" }] });
    // Of several, a finished choice keeps its reason and only the open one is stopped.
    expect((await read("two-open-done", 2)).finishes).toEqual([
      [0, "length"],
      [1, "stop"],
    ]);
    // A choice that called tools stopped for them to run.
    expect((await read("tools-open-done", 2)).finishes).toEqual([
      [0, "stop"],
      [1, "tool_calls"],
    ]);
    expect((await drain("cut")).error?.message).toContain("ended before it finished");
  });

  test("unreadable JSON, a stream cut short and silence past the timeout each fail the attempt", async () => {
    const unreadable = await drain("unreadable");
    expect(unreadable.error?.failure).toBe("transient");
    expect(unreadable.error?.message).toContain("unreadable");
    const cut = await drain("cut");
    expect(cut.contents).toEqual(["partial"]);
    expect(cut.error?.message).toContain("ended before it finished");
    const silent = await drain("silent", 200);
    expect(silent.contents).toEqual(["partial"]);
    expect(silent.error?.failure).toBe("timeout");
  });

  test("reads a last event left without its blank line, fills in finish_reason and tolerates a usage chunk without choices", async () => {
    const chunks: unknown[] = [];
    for await (const chunk of await streaming.streamChat(request("unterminated"), { timeoutMs: 5000 })) chunks.push(chunk);
    expect(chunks).toHaveLength(3);
    expect(chunks[0]).toMatchObject({ choices: [{ delta: { content: "a" }, finish_reason: null }] });
    expect(chunks[2]).toMatchObject({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 } });
  });

  test("comments do not keep a silent stream alive; events that are not chunks fail the attempt", async () => {
    const idle = await drain("keep-alive", 450);
    expect(idle.error?.failure).toBe("timeout");
    for (const model of ["null-event", "bad-choices", "null-error-event"]) {
      const { contents, error } = await drain(model);
      expect(contents).toEqual(["partial"]);
      expect(error).toBeInstanceOf(UpstreamError);
      expect(error?.failure).toBe("transient");
    }
  });

  test("a finished stream ends at [DONE] while its connection is kept for the next call", async () => {
    const ends = endedCount("lingering");
    const first = await drain("lingering");
    const port = clientPorts.at(-1);
    // Before the upstream ends the body.
    expect(endedCount("lingering")).toBe(ends);
    expect(first).toMatchObject({ contents: ["done"], error: undefined });
    await eventually(() => endedCount("lingering") > ends || undefined, { timeoutMs: 5000, intervalMs: 20, what: "the body ended" });
    // Its end is read in the background, which gives the connection back: a later call goes out on it. A call made
    // before that (a loaded machine) opens another connection, which its own lingering end keeps busy for the next.
    await eventually(
      async () => {
        await drain("lingering");
        return clientPorts.at(-1) === port || undefined;
      },
      { timeoutMs: 5000, intervalMs: 100, what: "a call on the first call's connection" },
    );
  });

  test("a finished stream ends at a [DONE] line still waiting for its blank line, and closes the held connection", async () => {
    const before = closedEarly.filter((model) => model === "done-held").length;
    const ends = endedCount("done-held");
    const { contents, usage, error } = await drain("done-held", 5000);
    // Not once the upstream has held it for its three seconds.
    expect(endedCount("done-held")).toBe(ends);
    expect(error).toBeUndefined();
    expect(contents).toEqual(["done"]);
    expect(usage).toEqual({ prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 });
    await eventually(() => closedEarly.filter((model) => model === "done-held").length > before || undefined, {
      timeoutMs: 2000,
      what: "the upstream closed",
    });
    const later = endedCount("done-later");
    expect(await drain("done-later", 5000)).toMatchObject({ contents: ["done"], usage: { prompt_tokens: 3 } });
    // Before the blank line, a second after [DONE].
    expect(endedCount("done-later")).toBe(later);
  });

  test("a client that leaves before the stream is read still closes the upstream", async () => {
    const closed = () => closedEarly.filter((model) => model === "silent").length;
    const before = closed();
    const controller = new AbortController();
    await streaming.streamChat(request("silent"), { timeoutMs: 5000, signal: controller.signal });
    controller.abort();
    await eventually(() => closed() > before || undefined, { timeoutMs: 200, what: "the upstream closed" });
  });

  test("an event cut off by the client or the timeout is a cancellation or a timeout, not unreadable", async () => {
    expect((await drain("half-event", 200)).error?.failure).toBe("timeout");
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    const left = await (async () => {
      for await (const _ of await streaming.streamChat(request("half-event"), { timeoutMs: 5000, signal: controller.signal }));
    })().then(
      () => undefined,
      (e: unknown) => e as UpstreamError,
    );
    expect(left?.failure).toBe("cancelled");
  });

  test("a client that leaves ends the attempt as cancelled", async () => {
    const controller = new AbortController();
    const stream = await streaming.streamChat(request("silent"), { timeoutMs: 5000, signal: controller.signal });
    const seenChunks: unknown[] = [];
    const done = (async () => {
      for await (const chunk of stream) {
        seenChunks.push(chunk);
        controller.abort();
      }
    })().then(
      () => undefined,
      (e: unknown) => e as UpstreamError,
    );
    expect((await done)?.failure).toBe("cancelled");
    expect(seenChunks).toHaveLength(1);
  });
});

describe("azure provider", () => {
  // Azure's routes: the deployment in the path, the API version in the query, the key in an api-key header.
  const calls: Array<{ url: string; apiKey: string | null; auth: string | null }> = [];
  const subscriptions: string[] = [];
  const azure = Bun.serve({
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      calls.push({ url: `${url.pathname}${url.search}`, apiKey: req.headers.get("api-key"), auth: req.headers.get("authorization") });
      const subscription = req.headers.get("ocp-apim-subscription-key");
      if (subscription) subscriptions.push(subscription);
      const body = (await req.json()) as { stream?: boolean; model?: string };
      if (body.model === "missing") {
        return Response.json({ error: { code: "DeploymentNotFound", message: "no such deployment" } }, { status: 404 });
      }
      if (url.pathname.endsWith("/responses")) {
        const usage = { input_tokens: 5, output_tokens: 2, total_tokens: 7 };
        const done = { id: "r", object: "response", status: "completed", model: "gpt-4o", output: [], usage };
        if (!body.stream) return Response.json(done);
        const events = [{ type: "response.created", response: { ...done, status: "in_progress", usage: null } }, { type: "response.output_text.delta", delta: "hi" }, { type: "response.completed", response: done }];
        return new Response(events.map((e) => `event: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`).join(""), {
          headers: { "content-type": "text/event-stream" },
        });
      }
      if (url.pathname.endsWith("/embeddings")) {
        return Response.json({ object: "list", data: [{ object: "embedding", index: 0, embedding: [0.5] }], model: "e", usage: { prompt_tokens: 2, total_tokens: 2 } });
      }
      if (body.stream) {
        return new Response(`${chunkEvent({ content: "hi" })}${chunkEvent({}, "stop")}${usageEvent}data: [DONE]\n\n`, {
          headers: { "content-type": "text/event-stream" },
        });
      }
      return Response.json({
        id: "c",
        object: "chat.completion",
        created: 1,
        model: "gpt-4o",
        choices: [{ index: 0, message: { role: "assistant", content: "hi", refusal: null }, finish_reason: "stop", logprobs: null }],
        usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
      });
    },
  });
  afterAll(() => azure.stop(true));
  const provider = createOpenAIProvider(
    { name: "azure", kind: "azure", base_url: `http://127.0.0.1:${azure.port}`, api_key_env: "AZURE_KEY" },
    "sk-azure",
  );

  test("chat, streamed chat and embeddings go to the model's deployment with the api-key header", async () => {
    const whole = await provider.chat(request("prod-gpt4o"), { timeoutMs: 5000 });
    expect(whole.tokens).toMatchObject({ inputTokens: 3n, outputTokens: 1n });
    const contents: unknown[] = [];
    for await (const chunk of await provider.streamChat(request("prod-gpt4o"), { timeoutMs: 5000 })) {
      contents.push(chunk.choices[0]?.delta?.content);
    }
    expect(contents).toContain("hi");
    const embedded = await provider.embed({ model: "prod-embed", input: "hello", encoding_format: "float" }, { timeoutMs: 5000 });
    expect(embedded.response.data[0]?.embedding).toEqual([0.5]);
    await provider.chat(request("prod-gpt4o-mini"), { timeoutMs: 5000 });
    expect(calls).toEqual([
      { url: "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21", apiKey: "sk-azure", auth: null },
      { url: "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21", apiKey: "sk-azure", auth: null },
      { url: "/openai/deployments/prod-embed/embeddings?api-version=2024-10-21", apiKey: "sk-azure", auth: null },
      { url: "/openai/deployments/prod-gpt4o-mini/chat/completions?api-version=2024-10-21", apiKey: "sk-azure", auth: null },
    ]);
  });

  test("Azure's v1 API takes OpenAI's paths with the deployment as the model, and an api-version only when one is set", async () => {
    calls.length = 0;
    const base = `http://127.0.0.1:${azure.port}/openai/v1`;
    const v1 = createOpenAIProvider({ name: "azure", kind: "azure", base_url: base, api_key_env: "AZURE_KEY" }, "sk-azure");
    const whole = await v1.chat(request("prod-gpt4o"), { timeoutMs: 5000 });
    expect(whole.tokens).toMatchObject({ inputTokens: 3n, outputTokens: 1n });
    const contents: unknown[] = [];
    for await (const chunk of await v1.streamChat(request("prod-gpt4o"), { timeoutMs: 5000 })) {
      contents.push(chunk.choices[0]?.delta?.content);
    }
    expect(contents).toContain("hi");
    await v1.embed({ model: "prod-embed", input: "hello", encoding_format: "float" }, { timeoutMs: 5000 });
    const preview = { name: "azure", kind: "azure", base_url: `${base}/`, api_key_env: "AZURE_KEY", api_version: "preview" } as const;
    await createOpenAIProvider(preview, "sk-azure").chat(request("prod-gpt4o"), { timeoutMs: 5000 });
    const bearer = { apiKey: null, auth: "Bearer sk-azure" };
    expect(calls).toEqual([
      { url: "/openai/v1/chat/completions", ...bearer },
      { url: "/openai/v1/chat/completions", ...bearer },
      { url: "/openai/v1/embeddings", ...bearer },
      { url: "/openai/v1/chat/completions?api-version=preview", ...bearer },
    ]);
  });

  test("configured headers go with every call, as an API Management front end in front of the resource wants", async () => {
    subscriptions.length = 0;
    const headers = { "Ocp-Apim-Subscription-Key": "apim-0123" };
    for (const base_url of [`http://127.0.0.1:${azure.port}`, `http://127.0.0.1:${azure.port}/openai/v1`]) {
      const config = { name: "apim", kind: "azure", base_url, api_key_env: "AZURE_KEY", headers, keep_alive_ms: 1000 } as const;
      const fronted = createOpenAIProvider(config, "sk-azure");
      await fronted.chat(request("prod-gpt4o"), { timeoutMs: 5000 });
      for await (const _ of await fronted.streamChat(request("prod-gpt4o"), { timeoutMs: 5000 })) {
      }
    }
    expect(subscriptions).toEqual(["apim-0123", "apim-0123", "apim-0123", "apim-0123"]);
  });

  test("Responses API calls go to the resource's /openai/responses with the deployment as the model", async () => {
    calls.length = 0;
    const whole = await provider.responses({ model: "prod-gpt4o", input: "hi" }, { timeoutMs: 5000 });
    expect(whole.tokens).toMatchObject({ inputTokens: 5n, outputTokens: 2n });
    const types: string[] = [];
    for await (const event of await provider.streamResponses({ model: "prod-gpt4o", input: "hi" }, { timeoutMs: 5000 })) {
      types.push(event.type);
    }
    expect(types).toEqual(["response.created", "response.output_text.delta", "response.completed"]);
    expect(calls).toEqual([
      { url: "/openai/responses?api-version=2025-03-01-preview", apiKey: "sk-azure", auth: null },
      { url: "/openai/responses?api-version=2025-03-01-preview", apiKey: "sk-azure", auth: null },
    ]);
    // A version the provider names is sent as it is; the v1 API takes OpenAI's path.
    calls.length = 0;
    const later = { name: "azure", kind: "azure", base_url: `http://127.0.0.1:${azure.port}`, api_key_env: "AZURE_KEY", api_version: "2025-04-01-preview" } as const;
    await createOpenAIProvider(later, "sk-azure").responses({ model: "prod-gpt4o", input: "hi" }, { timeoutMs: 5000 });
    const v1 = { name: "azure", kind: "azure", base_url: `http://127.0.0.1:${azure.port}/openai/v1`, api_key_env: "AZURE_KEY" } as const;
    await createOpenAIProvider(v1, "sk-azure").responses({ model: "prod-gpt4o", input: "hi" }, { timeoutMs: 5000 });
    expect(calls.map((c) => c.url)).toEqual(["/openai/responses?api-version=2025-04-01-preview", "/openai/v1/responses"]);
  });

  test("a missing deployment is a misconfigured target with Azure's message", async () => {
    const e = await failure(provider.chat(request("missing"), { timeoutMs: 5000 }));
    expect([e?.failure, e?.status]).toEqual(["misconfigured", 404]);
    expect(e?.message).toContain("no such deployment");
  });
});

describe("the SDK's environment variables", () => {
  // What `source .data/demo.env` and a shell's other settings put in the gateway's environment: none of it may reach
  // the SDK, which reads OPENAI_* and AZURE_OPENAI_* variables where an option is not given.
  const environment: Record<string, string> = {
    OPENAI_BASE_URL: "http://127.0.0.1:9/v1",
    OPENAI_API_KEY: "sk-from-the-environment",
    OPENAI_ORG_ID: "org-from-the-environment",
    OPENAI_PROJECT_ID: "proj-from-the-environment",
    OPENAI_CUSTOM_HEADERS: "x-team: other-app",
    OPENAI_API_VERSION: "2024-02-01",
    AZURE_OPENAI_ENDPOINT: "http://127.0.0.1:9",
    AZURE_OPENAI_API_KEY: "azure-from-the-environment",
  };
  const calls: Array<{ url: string; headers: Record<string, string> }> = [];
  const upstream = Bun.serve({
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      calls.push({ url: `${url.pathname}${url.search}`, headers: Object.fromEntries(req.headers) });
      await req.json();
      return Response.json({
        id: "c",
        object: "chat.completion",
        created: 1,
        model: "m",
        choices: [{ index: 0, message: { role: "assistant", content: "hi", refusal: null }, finish_reason: "stop", logprobs: null }],
        usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
      });
    },
  });
  afterAll(() => upstream.stop(true));

  test("are not read: base URLs, keys, versions and headers are the config's alone", async () => {
    const saved = Object.fromEntries(Object.keys(environment).map((name) => [name, process.env[name]]));
    Object.assign(process.env, environment);
    try {
      const base = `http://127.0.0.1:${upstream.port}`;
      const openai = createOpenAIProvider(
        { name: "compat", kind: "openai", base_url: `${base}/v1`, api_key_env: "COMPAT_KEY", headers: { "x-team": "gateway" } },
        "sk-configured",
      );
      const keyless = createOpenAIProvider({ name: "local", kind: "openai", base_url: `${base}/v1` }, undefined);
      const azure = createOpenAIProvider(
        { name: "azure", kind: "azure", base_url: `${base}/`, api_key_env: "AZURE_KEY", api_version: "2024-10-21" },
        "azure-configured",
      );
      for (const provider of [openai, keyless, azure]) await provider.chat(request("dep"), { timeoutMs: 5000 });
      expect(calls.map((c) => [c.url, c.headers.authorization, c.headers["api-key"], c.headers["x-team"]])).toEqual([
        ["/v1/chat/completions", "Bearer sk-configured", undefined, "gateway"],
        ["/v1/chat/completions", "Bearer unused", undefined, undefined],
        ["/openai/deployments/dep/chat/completions?api-version=2024-10-21", undefined, "azure-configured", undefined],
      ]);
      for (const { headers } of calls) {
        expect(headers["openai-organization"]).toBeUndefined();
        expect(headers["openai-project"]).toBeUndefined();
      }
    } finally {
      for (const [name, value] of Object.entries(saved)) {
        if (value === undefined) delete process.env[name];
        else process.env[name] = value;
      }
    }
  });
});

describe("idle connections to the upstream", () => {
  // An upstream that closes a connection once it has been idle for `closesAfterMs`, as uvicorn and Node do after 5 s,
  // caught at the moment a call goes out on it: the call meets the close and is never read.
  const closesAfterMs = 300;
  let connections = 0;
  let answered = 0;
  const completion = JSON.stringify({
    id: "c",
    object: "chat.completion",
    created: 1,
    model: "m",
    choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
  });
  const upstream = Bun.listen<{ received: string; idleSince?: number }>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(socket) {
        connections++;
        socket.data = { received: "" };
      },
      data(socket, bytes) {
        const { idleSince } = socket.data;
        if (idleSince !== undefined && performance.now() - idleSince >= closesAfterMs) return void socket.terminate();
        socket.data.received += bytes.toString();
        const [head = "", body = ""] = socket.data.received.split("\r\n\r\n");
        const length = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? 0);
        if (!socket.data.received.includes("\r\n\r\n") || body.length < length) return;
        socket.data = { received: "", idleSince: performance.now() };
        answered++;
        socket.write(
          `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${completion.length}\r\n\r\n${completion}`,
        );
      },
    },
  });
  afterAll(() => upstream.stop(true));
  const base_url = `http://127.0.0.1:${upstream.port}/v1`;

  test("are not reused once idle for keep_alive_ms, so a call never goes out on one the upstream is closing", async () => {
    const provider = createOpenAIProvider({ name: "local", kind: "openai", base_url, keep_alive_ms: 200 }, undefined);
    const [before, calls] = [connections, answered];
    await provider.chat(request("m"), { timeoutMs: 5000 });
    await Bun.sleep(closesAfterMs + 100);
    await provider.chat(request("m"), { timeoutMs: 5000 });
    expect([connections - before, answered - calls]).toEqual([2, 2]);
  });

  test("are reused for 4 s by default on a cleartext upstream, and not after", async () => {
    // However its scheme is written.
    const provider = createOpenAIProvider({ name: "local", kind: "openai", base_url: base_url.replace("http:", "HTTP:") }, undefined);
    const [before, calls] = [connections, answered];
    await provider.chat(request("m"), { timeoutMs: 5000 });
    await Bun.sleep(100);
    await provider.chat(request("m"), { timeoutMs: 5000 });
    expect(connections - before).toBe(1);
    // Idle past the upstream's own limit (300 ms here, 5 s for uvicorn), and past the gateway's.
    await Bun.sleep(4100);
    await provider.chat(request("m"), { timeoutMs: 5000 });
    expect([connections - before, answered - calls]).toEqual([2, 3]);
  });
});

describe("stored responses", () => {
  // An upstream's stored responses: retrieved, deleted, their input items listed, or failing by the id asked for.
  const calls: Array<{ method: string; url: string; apiKey: string | null; auth: string | null }> = [];
  const stored = Bun.serve({
    port: 0,
    async fetch(req) {
      const url = new URL(req.url);
      calls.push({ method: req.method, url: `${url.pathname}${decodeURIComponent(url.search)}`, apiKey: req.headers.get("api-key"), auth: req.headers.get("authorization") });
      const id = url.pathname.split("/")[url.pathname.endsWith("/input_items") ? url.pathname.split("/").length - 2 : url.pathname.split("/").length - 1];
      switch (id) {
        case "missing":
          return Response.json({ error: { message: "Response with id 'missing' not found.", type: "invalid_request_error", param: null, code: null } }, { status: 404 });
        case "moved":
          return new Response(null, { status: 302, headers: { location: "https://elsewhere.example/v1/responses/moved" } });
        case "busy":
          return Response.json({ error: { message: "Slow down.", type: "rate_limit_error" } }, { status: 429, headers: { "retry-after": "3" } });
        case "slow":
          await Bun.sleep(300);
          break;
        case "huge":
          return Response.json({ id, object: "response", output: [], padding: "x".repeat(2 * 1024 * 1024) });
        case "stalled": {
          // Headers at once, then a body that never ends.
          const body = new ReadableStream({ start: (c) => c.enqueue(new TextEncoder().encode('{"id":"stalled",')) });
          return new Response(body, { headers: { "content-type": "application/json" } });
        }
      }
      if (url.pathname.endsWith("/input_items")) return Response.json({ object: "list", data: [], first_id: null, last_id: null, has_more: false });
      if (req.method === "DELETE") return Response.json({ id, object: "response", deleted: true });
      return Response.json({ id, object: "response", status: "completed", output: [], previous_response_id: null });
    },
  });
  afterAll(() => stored.stop(true));
  const base = `http://127.0.0.1:${stored.port}`;
  const openai = createOpenAIProvider({ name: "up", kind: "openai", base_url: `${base}/v1`, api_key_env: "UP_KEY" }, "sk-up", ["sk-up"], 1024 * 1024);

  test("are retrieved, deleted and listed through the SDK's calls with the client's parameters", async () => {
    calls.length = 0;
    const got = await openai.storedResponse({ action: "retrieve", id: "r1", query: { include: ["message.output_text.logprobs"] } }, { timeoutMs: 5000 });
    expect(got).toMatchObject({ id: "r1", object: "response" });
    expect(await openai.storedResponse({ action: "delete", id: "r1", query: {} }, { timeoutMs: 5000 })).toEqual({ id: "r1", object: "response", deleted: true });
    const query = { after: "msg_1", before: "msg_9", limit: "2", order: "asc", include: ["a", "b"] };
    expect(await openai.storedResponse({ action: "input_items", id: "r1", query }, { timeoutMs: 5000 })).toMatchObject({ object: "list" });
    expect(calls.map(({ method, url, auth }) => ({ method, url, auth }))).toEqual([
      { method: "GET", url: "/v1/responses/r1?include[]=message.output_text.logprobs", auth: "Bearer sk-up" },
      { method: "DELETE", url: "/v1/responses/r1", auth: "Bearer sk-up" },
      { method: "GET", url: "/v1/responses/r1/input_items?after=msg_1&before=msg_9&limit=2&order=asc&include[]=a&include[]=b", auth: "Bearer sk-up" },
    ]);
  });

  test("on Azure: at a resource endpoint with the Responses API's version (or the one set) and api-key; on v1 at its path", async () => {
    calls.length = 0;
    const resource = createOpenAIProvider({ name: "az", kind: "azure", base_url: base, api_key_env: "AZ_KEY" }, "sk-az");
    await resource.storedResponse({ action: "retrieve", id: "r1", query: {} }, { timeoutMs: 5000 });
    await resource.storedResponse({ action: "delete", id: "r1", query: {} }, { timeoutMs: 5000 });
    await resource.storedResponse({ action: "input_items", id: "r1", query: { limit: "1" } }, { timeoutMs: 5000 });
    const later = { name: "az", kind: "azure", base_url: base, api_key_env: "AZ_KEY", api_version: "2025-04-01-preview" } as const;
    await createOpenAIProvider(later, "sk-az").storedResponse({ action: "retrieve", id: "r1", query: {} }, { timeoutMs: 5000 });
    const v1 = createOpenAIProvider({ name: "az", kind: "azure", base_url: `${base}/openai/v1`, api_key_env: "AZ_KEY" }, "sk-az");
    await v1.storedResponse({ action: "retrieve", id: "r1", query: {} }, { timeoutMs: 5000 });
    expect(calls.map(({ method, url }) => `${method} ${url}`)).toEqual([
      "GET /openai/responses/r1?api-version=2025-03-01-preview",
      "DELETE /openai/responses/r1?api-version=2025-03-01-preview",
      "GET /openai/responses/r1/input_items?api-version=2025-03-01-preview&limit=1",
      "GET /openai/responses/r1?api-version=2025-04-01-preview",
      "GET /openai/v1/responses/r1",
    ]);
    expect(calls[0]).toMatchObject({ apiKey: "sk-az", auth: null });
    expect(calls.at(-1)).toMatchObject({ auth: "Bearer sk-az" });
  });

  test("fail as other calls do: a 404 or 429 with its status, a redirect not followed, a timeout, a cancel, an answer too large", async () => {
    const call = (id: string, timeoutMs = 5000, signal?: AbortSignal) =>
      failure(openai.storedResponse({ action: "retrieve", id, query: {} }, { timeoutMs, signal }));
    expect(await call("missing")).toMatchObject({ failure: "misconfigured", status: 404 });
    expect(await call("busy")).toMatchObject({ failure: "transient", status: 429, retryAfterMs: 3000 });
    expect(await call("moved")).toMatchObject({ failure: "misconfigured", status: 302 });
    expect(await call("slow", 50)).toMatchObject({ failure: "timeout" });
    // The time limit holds while the body is read, not only until its headers.
    expect(await call("stalled", 100)).toMatchObject({ failure: "timeout" });
    const leaving = new AbortController();
    setTimeout(() => leaving.abort(), 30);
    expect(await call("slow", 5000, leaving.signal)).toMatchObject({ failure: "cancelled" });
    expect(await call("huge")).toBeInstanceOf(UpstreamError);
    const unset = createOpenAIProvider({ name: "up", kind: "openai", base_url: `${base}/v1`, api_key_env: "UP_KEY" }, undefined);
    expect(await failure(unset.storedResponse({ action: "delete", id: "r1", query: {} }, { timeoutMs: 5000 }))).toMatchObject({ failure: "misconfigured" });
  });
});

describe("embeddings from an upstream that ignores encoding_format", () => {
  // 2048 vectors of 3072 dimensions in base64, as a server that always answers base64 sends them.
  const vector = Float32Array.from({ length: 3072 }, (_, i) => Math.sin(i) / 10);
  const item = (index: number) => `{"object":"embedding","index":${index},"embedding":"${Buffer.from(vector.buffer).toString("base64")}"}`;
  const answer = `{"object":"list","model":"e","data":[${Array.from({ length: 2048 }, (_, i) => item(i)).join(",")}],"usage":{"prompt_tokens":2048,"total_tokens":2048}}`;
  const base64Only = Bun.serve({ port: 0, fetch: () => new Response(answer, { headers: { "content-type": "application/json" } }) });
  afterAll(() => base64Only.stop(true));

  test("a large answer in base64 is written as the floats asked for, every vector whole", async () => {
    const provider = createOpenAIProvider({ name: "b64", kind: "openai", base_url: `http://127.0.0.1:${base64Only.port}/v1` }, "sk");
    const input = Array.from({ length: 2048 }, (_, i) => `input ${i}`);
    const { response } = await provider.embed({ model: "e", input, encoding_format: "float" }, { timeoutMs: 30_000 });
    const written = JSON.parse([...embeddingJson(response, true)].join("")) as typeof response;
    expect(written.data).toHaveLength(2048);
    const expected = Array.from(vector);
    for (const item of [written.data[0], written.data[1024], written.data[2047]]) expect(item?.embedding).toEqual(expected);
  });
});
