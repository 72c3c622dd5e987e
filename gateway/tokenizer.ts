import type { ChatCompletionCreateParams } from "openai/resources/chat/completions";
import type { Tokens } from "../lib/money.ts";
import { imageTokens } from "./image-tokens.ts";
import type { ResponsesPrompt } from "./responses-request.ts";
import type { CountAnswer, CountRequest, TokenEncoding } from "./tokenizer-worker.ts";

/**
 * Token counts by the encoding of the upstream model (`encodingOf`: cl100k_base for GPT-4, GPT-3.5 and OpenAI's
 * embedding models, o200k_base for GPT-4o, GPT-4.1, o-series and any other), for upstreams that
 * report no usage. They are encoded on a worker thread (tokenizer-worker.ts) started on first need, which loads each
 * encoding there: loading takes about a second and ~110 MB, which a gateway whose upstreams report usage never pays,
 * and neither loading nor encoding ever holds the event loop (loading it there held every request in flight for
 * 0.8 s; a count of 16,384 CJK characters took 18 ms, up to 120 ms).
 *
 * A count's cost is bounded whatever the text: the first `exactChars` characters of a count are encoded and the rest
 * scaled from them, so no more than those are sent to the thread, a run of whitespace or of anything but whitespace is
 * encoded in pieces of `maxRun` characters (byte-pair merging a run costs the square of its length: 20,000 CJK
 * characters took 2.2 s whole, 32,768 newlines 1.1 s), and special-token text such as `<|endoftext|>` is counted as
 * the plain text it is. At most `maxQueuedCounts` counts wait for the thread at once. A count never fails: should the
 * thread or the encoding not load, that many counts wait already, or the thread die or answer nothing for
 * `counterThread.stalledMs` (wedged: it is stopped, and the next count starts another), it falls back to
 * `estimatedTextTokens`.
 */
/** Characters of one count encoded exactly; beyond them tokens are scaled by the ratio found so far. */
export const exactChars = 16_384;
/** Longest run of whitespace, or of anything but whitespace, encoded at once. */
export const maxRun = 128;
const longRun = new RegExp(`\\S{${maxRun + 1},}|\\s{${maxRun + 1},}`, "g");
/**
 * Counts waiting for the thread at most (each at most `exactChars` characters: 120 ms of encoding at worst, 18 ms of
 * CJK text on average); a count past them is estimated, so a flood of cancelled requests queues no more than that.
 */
export const maxQueuedCounts = 256;

// As tiktoken maps them: GPT-4 (and -turbo, -32k), GPT-3.5 (Azure's gpt-35 too), their fine-tunes, and the embedding
// models. GPT-4o, GPT-4.1, GPT-4.5, GPT-5 and the o-series are o200k_base, and so is a model unknown here.
const cl100kModels = /^(?:ft:)?(?:gpt-4(?:-|$)|gpt-3\.5-turbo|gpt-35-turbo|text-embedding-(?:ada-002|3-)|davinci-002|babbage-002)/i;

/** The encoding an upstream model counts its tokens in, named as its provider names it (`openai/gpt-4` too). */
export function encodingOf(model: string | undefined): TokenEncoding {
  const name = model?.slice(model.lastIndexOf("/") + 1) ?? "";
  return cl100kModels.test(name) ? "cl100k_base" : "o200k_base";
}

/** The pieces `text` is encoded in: itself, with each long run of whitespace or of anything else cut in `maxRun`s. */
export function* encodedPieces(text: string): Generator<string> {
  if (text.length <= maxRun) {
    yield text;
    return;
  }
  let from = 0;
  for (const run of text.matchAll(longRun)) {
    if (run.index > from) yield text.slice(from, run.index);
    for (let at = 0; at < run[0].length; at += maxRun) yield run[0].slice(at, at + maxRun);
    from = run.index + run[0].length;
  }
  if (from < text.length || from === 0) yield text.slice(from);
}

/** Han, kana, Hangul, and CJK punctuation and full-width forms: written without spaces between words. */
const isCjk = (c: number) =>
  (c >= 0x2e80 && c <= 0x9fff) || (c >= 0xac00 && c <= 0xd7af) || (c >= 0xf900 && c <= 0xfaff) ||
  (c >= 0xff00 && c <= 0xffef);

/**
 * Tokens of text estimated without the encoding: four characters a token, but CJK characters at three tokens in four.
 * o200k_base encodes common ones at about that (a Chinese paragraph of 91 characters is 64 tokens, estimated 69; a
 * Japanese one of 84 is 65, estimated 63; a Korean one of 68 syllables and 22 spaces and stops 55, estimated 57), where
 * four characters a token said 21 to 23, and rarer characters (1.8 tokens each) are still taken low.
 */
export function estimatedTextTokens(text: string): number {
  // Counted in place: matching them with a regular expression made a string of each, 150 ms for a 4 MiB prompt.
  let wide = 0;
  for (let i = 0; i < text.length; i++) if (isCjk(text.charCodeAt(i))) wide++;
  return Math.ceil((text.length - wide) / 4 + (wide * 3) / 4);
}

/** A running token count over pieces of text, bounded in cost. */
interface Count {
  add(text: string): void;
  /** Counts `chars` more characters past the exactly encoded ones, by the ratio found there. */
  addScaled(chars: number): void;
  total(): Promise<number>;
}

function newCount(model: string | undefined): Count {
  const encoding = encodingOf(model);
  // The texts encoded: the first `exactChars` characters of those added, in the pieces they were added in.
  const texts: string[] = [];
  let exact = 0;
  let rest = 0;
  return {
    add(text) {
      const room = exactChars - exact;
      const part = text.length <= room ? text : text.slice(0, Math.max(room, 0));
      if (part.length > 0) texts.push(part);
      exact += part.length;
      rest += text.length - part.length;
    },
    addScaled(chars) {
      rest += chars;
    },
    async total() {
      const tokens = (await encodeOffLoop(texts, encoding)) ?? texts.reduce((sum, text) => sum + estimatedTextTokens(text), 0);
      return tokens + (rest === 0 ? 0 : Math.ceil((rest * Math.max(tokens, 1)) / Math.max(exact, 1)));
    },
  };
}

/**
 * The counting thread: the script it runs (tests give it one that wedges), and how long it may answer nothing while
 * counts wait on it before it is taken for wedged: stopped, the counts waiting estimated, and another started for the
 * next count. A count is encoded in 120 ms at most; loading the encoding takes about a second, so the thread's first
 * answer may take `loadingMs`.
 */
export const counterThread = {
  script: new URL("./tokenizer-worker.ts", import.meta.url).href,
  stalledMs: 5_000,
  loadingMs: 30_000,
};

/** The thread counts are encoded on, once started; none when it could not start or load an encoding, or is closed. */
let counter: Worker | undefined;
let counterUnavailable = false;
/** The encodings the thread has answered a count in: one not among them may still be loading. */
const counted = new Set<TokenEncoding>();
let nextCount = 0;
const waiting = new Map<number, { encoding: TokenEncoding; done: (tokens: number | undefined) => void }>();
// Runs while counts wait: fires once the thread has answered nothing for its bound (see counterThread).
let stallTimer: ReturnType<typeof setTimeout> | undefined;
/** (Re)arms stallTimer for the thread: on its answers, and when a count comes to a thread nothing waited on. */
let watchCounter = () => {};

function startCounter(): Worker | undefined {
  if (counter || counterUnavailable) return counter;
  let worker: Worker;
  try {
    worker = new Worker(counterThread.script, { smol: true });
  } catch {
    counterUnavailable = true;
    return undefined;
  }
  // Held open only while counts wait on it, so it never keeps a process from exiting.
  worker.unref();
  // A thread that dies or wedges is started anew at the next count, unless it never counted (it will not load).
  const lost = () => {
    if (counter !== worker) return;
    counter = undefined;
    clearTimeout(stallTimer);
    if (counted.size === 0) counterUnavailable = true;
    counted.clear();
    for (const { done } of waiting.values()) done(undefined);
    waiting.clear();
  };
  // A wedged thread held every count waiting on it, and the requests metered by them, for good.
  watchCounter = () => {
    clearTimeout(stallTimer);
    if (waiting.size === 0) return;
    stallTimer = setTimeout(
      () => {
        lost();
        worker.terminate();
      },
      [...waiting.values()].every(({ encoding }) => counted.has(encoding))
        ? counterThread.stalledMs
        : counterThread.loadingMs,
    );
    stallTimer.unref?.();
  };
  worker.addEventListener("message", ({ data }: MessageEvent<CountAnswer>) => {
    const count = waiting.get(data.id);
    if (data.unloaded) {
      // An encoding will not load: counts are estimated from now on, as the thread is of no more use.
      counterUnavailable = true;
      worker.terminate();
    } else if (count) counted.add(count.encoding);
    waiting.delete(data.id);
    if (waiting.size === 0) worker.unref();
    watchCounter();
    count?.done(data.tokens);
  });
  worker.addEventListener("error", () => {
    lost();
    worker.terminate();
  });
  worker.addEventListener("close", lost);
  counter = worker;
  return worker;
}

/** Tokens of `texts` summed, each encoded in its `encodedPieces`, by the thread; none when it cannot count them. */
async function encodeOffLoop(texts: string[], encoding: TokenEncoding): Promise<number | undefined> {
  if (texts.length === 0) return 0;
  if (waiting.size >= maxQueuedCounts) return undefined;
  const worker = startCounter();
  if (!worker || counterUnavailable) return undefined;
  const id = nextCount++;
  if (waiting.size === 0) worker.ref();
  const { promise, resolve } = Promise.withResolvers<number | undefined>();
  waiting.set(id, { encoding, done: resolve });
  // A count in an encoding not loaded yet may wait as long as its loading.
  if (waiting.size === 1 || !counted.has(encoding)) watchCounter();
  worker.postMessage({ id, texts, encoding } satisfies CountRequest);
  return promise;
}

/** Stops the counting thread (a gateway that closes); counts after it are estimated. */
export function closeTokenizer(): void {
  counterUnavailable = true;
  counter?.terminate();
}

// OpenAI's chat framing: tokens around each message, one more for a name, three priming the reply.
const perMessage = 3;
const perName = 1;
const replyPriming = 3;
/**
 * What a file or audio part is estimated at, as it is not decoded: what a 1024-pixel image costs gpt-4o at high
 * detail (four 170-token tiles and 85). A file or a recording may bill far more; their upstream's usage says. An
 * image is counted by its model's rules (image-tokens.ts).
 */
export const partTokensEstimate = 765;

/**
 * Prompt tokens of a chat request: messages (text, images, files, audio, tool calls), tool definitions (and legacy
 * `functions`) and the response format (a JSON schema is part of the prompt an upstream bills), in its model's encoding.
 */
export async function countInputTokens(
  request: Pick<ChatCompletionCreateParams, "messages" | "tools" | "functions" | "response_format"> & { model?: string },
): Promise<number> {
  const { messages, tools, functions, response_format } = request;
  const count = newCount(request.model);
  let tokens = replyPriming;
  for (const m of messages) {
    tokens += perMessage;
    count.add(m.role);
    if ("name" in m && m.name) {
      tokens += perName;
      count.add(m.name);
    }
    const content = m.content;
    if (typeof content === "string") count.add(content);
    else if (Array.isArray(content)) {
      for (const part of content) {
        if (part.type === "text") count.add(part.text);
        else if (part.type === "image_url") tokens += imageTokens(part.image_url ?? {}, request.model);
        else if (part.type === "file" || part.type === "input_audio") tokens += partTokensEstimate;
        else if (part.type === "refusal") count.add(part.refusal);
      }
    }
    if (m.role === "assistant" && m.refusal) count.add(m.refusal);
    // An earlier audio answer referred to by id: the model hears it again.
    if (m.role === "assistant" && m.audio) tokens += partTokensEstimate;
    if (m.role === "assistant" && m.tool_calls) {
      for (const call of m.tool_calls) {
        if (call.type === "function") {
          count.add(call.function.name);
          count.add(call.function.arguments);
        }
      }
    }
    // The legacy form of a tool call, and of tool definitions below: the model reads them as it reads tools.
    if (m.role === "assistant" && m.function_call) {
      count.add(m.function_call.name);
      count.add(m.function_call.arguments);
    }
  }
  if (tools && tools.length > 0) count.add(JSON.stringify(tools));
  if (functions && functions.length > 0) count.add(JSON.stringify(functions));
  if (response_format) count.add(JSON.stringify(response_format));
  return tokens + (await count.total());
}

/**
 * Prompt tokens of a Responses API request, as countInputTokens counts a chat request's: its texts encoded, each item
 * framed as a message, images by their model's rules, files and audio at their estimate.
 */
export async function countResponsesInputTokens(prompt: ResponsesPrompt, model?: string): Promise<number> {
  const count = newCount(model);
  for (const text of prompt.texts) count.add(text);
  let tokens = replyPriming + perMessage * prompt.items;
  for (const part of prompt.parts) {
    tokens += part.type === "image_url" ? imageTokens(part.image_url ?? {}, model) : partTokensEstimate;
  }
  return tokens + (await count.total());
}

/** What a whole answer's message or a streamed delta may hold of generated text. */
export interface Generated {
  content?: string | null;
  refusal?: string | null;
  audio?: { transcript?: unknown } | null;
  tool_calls?: readonly {
    function?: { name?: unknown; arguments?: unknown } | null;
    custom?: { name?: unknown; input?: unknown } | null;
  }[] | null;
  function_call?: { name?: unknown; arguments?: unknown } | null;
  /** Reasoning text as vLLM and DeepSeek send it. */
  reasoning_content?: unknown;
  /** Reasoning text as OpenRouter sends it. */
  reasoning?: unknown;
}

/**
 * Adds a message's or a delta's generated text to `pieces`: reasoning an upstream sends, content, refusal, the audio's
 * transcript, tool and function calls. The one rule of what output counts, so a whole answer and the same answer
 * streamed are counted alike.
 */
export function addGenerated(pieces: string[], m: Generated): void {
  addReasoning(pieces, m);
  addText(pieces, m.content);
  addText(pieces, m.refusal);
  addText(pieces, m.audio?.transcript);
  if (m.tool_calls != null) {
    for (const call of m.tool_calls) {
      addText(pieces, call.function?.name);
      addText(pieces, call.function?.arguments);
      addText(pieces, call.custom?.name);
      addText(pieces, call.custom?.input);
    }
  }
  addText(pieces, m.function_call?.name);
  addText(pieces, m.function_call?.arguments);
}

/** Adds the reasoning text of a message or a delta, which is output too, to `pieces`. */
export function addReasoning(pieces: string[], m: Generated): void {
  addText(pieces, m.reasoning_content);
  addText(pieces, m.reasoning);
}

// Called for every streamed delta: no closure or list is made for one.
function addText(pieces: string[], text: unknown): void {
  if (typeof text === "string" && text) pieces.push(text);
}

/**
 * Tokens of generated text (content, refusals, tool call arguments) in `model`'s encoding, summed over pieces, and
 * `scaledChars` characters past them (as a count scales whatever follows its first `exactChars`).
 */
export async function countTextTokens(pieces: readonly string[], model?: string, scaledChars = 0): Promise<number> {
  if (pieces.length === 0) return 0;
  const count = newCount(model);
  count.add(pieces.join(""));
  count.addScaled(scaledChars);
  return count.total();
}

/**
 * A stream's generated text as far as its count needs it: the first `exactChars` characters, which are encoded, and
 * the length of the rest, which is scaled. It counts as the whole text would, in a bounded space however long the
 * stream. The choices of a stream of several (`n`) are each counted as their own text, as a whole answer's are, not
 * as their deltas came, one choice's in between another's.
 */
export function generatedText(model?: string) {
  const output = keptText(model);
  const reasoning = keptText(model);
  // One list for the pieces of every delta: each add takes what it keeps of them.
  const pieces: string[] = [];
  return {
    /** Adds a delta's generated text, of its choice; whether it had any. */
    add(m: Generated, choice = 0): boolean {
      pieces.length = 0;
      addGenerated(pieces, m);
      output.add(pieces, choice);
      pieces.length = 0;
      addReasoning(pieces, m);
      reasoning.add(pieces, choice);
      return output.any();
    },
    /** Tokens of all the output, reasoning included. */
    tokens: () => output.tokens(),
    /** Tokens of the reasoning streamed. */
    reasoningTokens: () => reasoning.tokens(),
  };
}

/**
 * Text as far as its count needs it: its first `exactChars` characters, each choice's kept together, and the length of
 * the rest.
 */
function keptText(model: string | undefined) {
  const kept = new Map<number, string[]>();
  let room = exactChars;
  let past = 0;
  let added = 0;
  return {
    add(pieces: readonly string[], choice: number) {
      let own = kept.get(choice);
      for (const piece of pieces) {
        if (room > 0 && !own) kept.set(choice, (own = []));
        if (room >= piece.length) own?.push(piece);
        else if (room > 0) own?.push(piece.slice(0, room));
        past += Math.max(piece.length - room, 0);
        room = Math.max(room - piece.length, 0);
      }
      added = pieces.length;
    },
    /** Whether the last add had any text. */
    any: () => added > 0,
    tokens: () => countTextTokens([...kept.values()].flat(), model, past),
  };
}

/** Tokens of embedding inputs: strings are encoded in `model`'s encoding, token arrays counted as they are. */
export async function countEmbeddingTokens(
  input: string | readonly string[] | readonly number[] | readonly number[][],
  model?: string,
): Promise<number> {
  const count = newCount(model);
  let tokens = 0;
  for (const item of typeof input === "string" ? [input] : input) {
    if (typeof item === "number") tokens++;
    else if (Array.isArray(item)) tokens += item.length;
    else count.add(item as string);
  }
  return tokens + (await count.total());
}

/** Estimated usage: input and output counts, nothing cached or hidden. */
export function estimatedTokens(input: number, output: number): Tokens {
  return { inputTokens: BigInt(input), cachedInputTokens: 0n, outputTokens: BigInt(output), reasoningTokens: 0n };
}
