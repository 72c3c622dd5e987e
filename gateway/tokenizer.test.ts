import { describe, expect, test } from "bun:test";
import {
  addGenerated,
  countEmbeddingTokens,
  countInputTokens,
  countTextTokens,
  encodedPieces,
  encodingOf,
  estimatedTextTokens,
  exactChars,
  generatedText,
  maxQueuedCounts,
  maxRun,
  partTokensEstimate,
} from "./tokenizer.ts";
import { runCommand } from "../lib/processes.ts";

const user = (content: string) => [{ role: "user" as const, content }];
/** A prompt's framing: 3 priming the reply, 3 around the message, 1 for "user". */
const framing = 7;

describe("token counts", () => {
  test("ordinary text is counted as OpenAI's o200k_base counts it, with chat framing", async () => {
    expect(await countInputTokens({ messages: user("hello there friend") })).toBe(framing + 3);
    expect(await countTextTokens(["Hello", " world"])).toBe(2);
    expect(await countEmbeddingTokens(["Hello world", "Hello world"])).toBe(4);
    expect(await countEmbeddingTokens([[1, 2, 3], [4]])).toBe(4);
  });

  test("each upstream model is counted in its own encoding: cl100k_base for GPT-4, GPT-3.5 and embeddings", async () => {
    for (const model of ["gpt-4", "gpt-4-0613", "gpt-4-turbo", "gpt-3.5-turbo", "gpt-35-turbo-16k", "ft:gpt-4-0613:acme::x"]) {
      expect(encodingOf(model)).toBe("cl100k_base");
    }
    for (const model of ["text-embedding-3-small", "text-embedding-ada-002", "openai/gpt-4"]) {
      expect(encodingOf(model)).toBe("cl100k_base");
    }
    for (const model of ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.5-preview", "o3", "gpt-5", "ft:gpt-4o-mini:acme::x", "llama3"]) {
      expect(encodingOf(model)).toBe("o200k_base");
    }
    // 35 tokens in o200k_base, 111 in cl100k_base.
    const hindi = "कृपया बोर्ड के लिए निम्नलिखित तिमाही रिपोर्ट का सारांश दें, राजस्व वृद्धि और ग्राहक मंथन पर ध्यान केंद्रित करें।";
    expect(await countTextTokens([hindi], "gpt-4o")).toBe(35);
    expect(await countTextTokens([hindi], "gpt-4")).toBe(111);
    expect(await countEmbeddingTokens([hindi, "hello"], "text-embedding-3-small")).toBe(112);
    expect(await countInputTokens({ model: "gpt-3.5-turbo", messages: user(hindi) })).toBe(framing + 111);
  });

  test("an assistant's refusal in the prompt is counted as its text", async () => {
    // 3 priming, 3 around the message, 1 for "assistant", then "Hello world".
    const refused = [{ role: "assistant" as const, content: null, refusal: "Hello world" }];
    expect(await countInputTokens({ messages: refused })).toBe(7 + 2);
    // An earlier audio answer referred to by id is heard again: counted as an audio part.
    const heard = [{ role: "assistant" as const, audio: { id: "audio_abc" } }];
    expect(await countInputTokens({ messages: heard })).toBe(7 + partTokensEstimate);
  });

  test("a response format is counted as its text, and file and audio parts at the part estimate", async () => {
    const response_format = {
      type: "json_schema" as const,
      json_schema: { name: "answer", schema: { type: "object", properties: { answer: { type: "string" } } } },
    };
    const framed = await countInputTokens({ messages: user("hello there friend") });
    const schema = await countTextTokens([JSON.stringify(response_format)]);
    expect(await countInputTokens({ messages: user("hello there friend"), response_format })).toBe(framed + schema);
    const parts = [
      { type: "text" as const, text: "hello there friend" },
      { type: "file" as const, file: { filename: "a.pdf", file_data: "data:application/pdf;base64,AAAA" } },
      { type: "input_audio" as const, input_audio: { data: "AAAA", format: "wav" as const } },
    ];
    expect(await countInputTokens({ messages: [{ role: "user", content: parts }] })).toBe(framed + 2 * partTokensEstimate);
  });

  test("legacy function definitions and an assistant's function_call are counted as tools and tool calls are", async () => {
    const framed = await countInputTokens({ messages: user("hello there friend") });
    const functions = [{ name: "weather", description: "The weather in a city, in detail." }];
    const definitions = await countTextTokens([JSON.stringify(functions)]);
    expect(await countInputTokens({ messages: user("hello there friend"), functions })).toBe(framed + definitions);
    const function_call = { name: "weather", arguments: '{"city":"Paris"}' };
    const called = [...user("hello there friend"), { role: "assistant" as const, content: null, function_call }];
    // 3 around the assistant message and 1 for "assistant", then the name and arguments.
    const call = await countTextTokens(["weather", '{"city":"Paris"}']);
    expect(await countInputTokens({ messages: called })).toBe(framed + 4 + call);
  });

  test("a whole answer and the same answer streamed count the same generated text", async () => {
    const whole: string[] = [];
    addGenerated(whole, {
      content: null,
      refusal: "I can't help with that.",
      audio: { transcript: "Hello world" },
      tool_calls: [
        { function: { name: "lookup", arguments: '{"q":1}' } },
        { custom: { name: "sql", input: "select 1" } },
      ],
    });
    const streamed: string[] = [];
    for (const delta of [
      { refusal: "I can't" },
      { refusal: " help with that." },
      { audio: { transcript: "Hello" } },
      { audio: { transcript: " world" } },
      { tool_calls: [{ function: { name: "lookup", arguments: "" } }] },
      { tool_calls: [{ function: { arguments: '{"q":1}' } }] },
      { tool_calls: [{ custom: { name: "sql", input: "select 1" } }] },
    ]) {
      addGenerated(streamed, delta);
    }
    expect(streamed.join("")).toBe(whole.join(""));
    expect(whole.join("")).toBe(`I can't help with that.Hello worldlookup{"q":1}sqlselect 1`);
  });

  test("special-token text is plain text a client wrote: counted, never refused", async () => {
    for (const special of ["<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>"]) {
      const tokens = await countInputTokens({ messages: user(`hi ${special} there`) });
      expect(tokens).toBeGreaterThan(framing + 3);
      expect(await countTextTokens([special])).toBeGreaterThan(1);
      expect(await countEmbeddingTokens(special)).toBeGreaterThan(1);
    }
  });

  test("a run of whitespace, or of anything but whitespace, is encoded in pieces of maxRun characters", async () => {
    const piece = await countTextTokens(["a".repeat(maxRun)]);
    expect(await countTextTokens(["a".repeat(maxRun * 40)])).toBe(piece * 40);
    const blank = await countTextTokens(["\t\n".repeat(maxRun / 2)]);
    expect(await countTextTokens(["\t\n".repeat(maxRun * 20)])).toBe(blank * 40);
    // No piece is longer than maxRun, and together they are the text.
    for (const text of ["\n".repeat(5_000), "ab".repeat(3_000), `x ${" ".repeat(700)}y${"z".repeat(900)} end`, "short"]) {
      const pieces = [...encodedPieces(text)];
      expect(pieces.join("")).toBe(text);
      expect(Math.max(...pieces.map((p) => (/^\s+$|^\S+$/.test(p) ? p.length : 0)))).toBeLessThanOrEqual(maxRun);
    }
    const cjk = "漢字".repeat(maxRun / 2);
    expect(await countTextTokens([`${cjk.repeat(10)} ok`])).toBe((await countTextTokens([cjk])) * 10 + 1);
  });

  test("beyond exactChars characters a count is scaled from those it encoded", async () => {
    const sentence = "The quick brown fox jumps over the lazy dog. ";
    const exact = sentence.repeat(Math.floor(exactChars / sentence.length));
    const perChar = (await countTextTokens([exact])) / exact.length;
    const huge = sentence.repeat(100_000);
    const counted = await countTextTokens([huge]);
    expect(Math.abs(counted - huge.length * perChar) / counted).toBeLessThan(0.01);
    // Across the messages of a prompt the budget is shared: the later ones are scaled too.
    const prompt = await countInputTokens({ messages: [...user(huge), ...user(huge)] });
    expect(Math.abs(prompt - 2 * counted) / prompt).toBeLessThan(0.01);
  });

  test("a stream's text kept only as far as its count needs counts as the whole text", async () => {
    const deltas = Array.from({ length: 3000 }, (_, i) => ` word${i} ${"日本語".repeat(i % 5)}`);
    const kept = generatedText();
    for (const content of deltas) kept.add({ content });
    expect(await kept.tokens()).toBe(await countTextTokens(deltas));
  });

  test("a stream's reasoning counts as its output and as its reasoning, whatever each delta holds", async () => {
    const deltas = [
      { reasoning_content: "Think" },
      { reasoning_content: " twice", content: "Yes" },
      { content: ", and" },
      { reasoning: " again" },
      { tool_calls: [{ function: { name: "go", arguments: "{}" } }] },
      {},
    ];
    const kept = generatedText();
    const had = deltas.map((delta) => kept.add(delta));
    expect(had).toEqual([true, true, true, true, true, false]);
    expect(await kept.tokens()).toBe(await countTextTokens(["Think twiceYes, and againgo{}"]));
    expect(await kept.reasoningTokens()).toBe(await countTextTokens(["Think twice again"]));
  });

  test("loading the encoding and encoding counts never hold the event loop, nor keep a process from exiting", async () => {
    // A process of its own loads the encoding afresh (on the event loop, that held it 0.5 to 1.4 s).
    const { stdout, stderr, code } = await runCommand([process.execPath, `${import.meta.dir}/testing/tokenizer-loop.ts`]);
    expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
    const { heldMs, counts, afterClose } = JSON.parse(stdout) as { heldMs: number; counts: number[]; afterClose: number };
    expect(heldMs).toBeLessThan(200);
    // Encoded, not estimated at four characters a token: 16,384 CJK characters are about 30,000 tokens.
    expect(counts[2]).toBeGreaterThan(16_384);
    // Once closed, counts are estimated: 200 CJK characters at three tokens in four.
    expect(afterClose).toBe(150);
  });

  test("counts waiting on a thread that wedges are estimated once it has answered nothing for a while, and it is replaced", async () => {
    const { stdout, stderr, code } = await runCommand([process.execPath, `${import.meta.dir}/testing/tokenizer-wedged.ts`]);
    expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
    type Timed = { tokens: number; ms: number };
    const out = JSON.parse(stdout) as Record<"before" | "during" | "after" | "ended" | "afterEnded", Timed> & { stuck: Timed[] };
    // Its script answers a token a character: an estimate says four characters a token (CJK ones three in four).
    expect(out.before.tokens).toBe(8);
    // The wedged count and those behind it or asked for meanwhile: estimated once the thread was silent 500 ms.
    expect([...out.stuck, out.during].map((c) => c.tokens)).toEqual([2, 3, 2, 2]);
    for (const c of [...out.stuck, out.during]) expect(c.ms).toBeLessThan(3_000);
    // A new thread counts the next ones, and another after one that ended.
    expect([out.after.tokens, out.afterEnded.tokens]).toEqual([8, 8]);
  });

  test("counts past the most that may wait for the thread are estimated", async () => {
    const texts = Array.from({ length: maxQueuedCounts + 8 }, (_, i) => `${"漢字".repeat(50)}${i}`);
    const counted = await Promise.all(texts.map((text) => countTextTokens([text])));
    const exact = await countTextTokens([texts[0] as string]);
    expect(exact).toBeGreaterThan(30);
    expect(counted.slice(0, maxQueuedCounts).every((tokens) => tokens >= exact)).toBe(true);
    expect(counted.slice(maxQueuedCounts)).toEqual(texts.slice(maxQueuedCounts).map(estimatedTextTokens));
  });

  test("an estimate takes four characters a token, CJK ones at three tokens in four, near what the encoding counts", async () => {
    expect(estimatedTextTokens("abcdefgh")).toBe(2);
    expect(estimatedTextTokens("漢字かなカナ한글，")).toBe(7);
    const paragraphs = [
      "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。",
      "人工知能とは、人間の知的能力をコンピュータ上で実現する、様々な技術・ソフトウェア・コンピュータシステムである。",
      "인공지능은 인간의 학습능력, 추론능력, 지각능력을 인공적으로 구현하려는 컴퓨터 과학의 세부분야 중 하나이다.",
      "The quick brown fox jumps over the lazy dog. Please summarise the following report about quarterly revenue.",
    ];
    for (const text of paragraphs) {
      const exact = await countTextTokens([text]);
      // Four characters a token took the CJK ones at a third of their tokens.
      expect(estimatedTextTokens(text) / exact).toBeWithin(0.75, 1.4);
    }
  });

  test("an estimate of a prompt of 4 MiB in CJK characters is exact (its time: bench/gateway-auth.ts)", () => {
    // A 4 MiB request (GATEWAY_MAX_BODY_BYTES), estimated on the event loop for every request's rate limit.
    expect(estimatedTextTokens("漢字".repeat(700_000))).toBe(1_050_000);
  });
});
