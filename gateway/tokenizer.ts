import type { ChatCompletionMessageParam, ChatCompletionTool } from "openai/resources/chat/completions";
import type { Tokens } from "../lib/money.ts";

/**
 * Token counts by OpenAI's o200k_base encoding (GPT-4o, GPT-4.1, o-series), for upstreams that
 * report no usage. The encoding is loaded on first use: it takes about a second and ~110 MB, which
 * a gateway whose upstreams report usage never pays.
 */
type Encoding = typeof import("gpt-tokenizer/encoding/o200k_base");

let loading: Promise<Encoding> | undefined;
const encoding = () => (loading ??= import("gpt-tokenizer/encoding/o200k_base"));

// OpenAI's chat framing: tokens around each message, one more for a name, three priming the reply.
const perMessage = 3;
const perName = 1;
const replyPriming = 3;
// Image inputs are priced by size; without decoding them, count a 1024x1024 high-detail image (or a low-detail one).
const imageTokens = { low: 85, high: 765 } as const;

/** Prompt tokens of a chat request: messages (text, images, tool calls) and tool definitions. */
export async function countInputTokens(
  messages: readonly ChatCompletionMessageParam[],
  tools?: readonly ChatCompletionTool[] | null,
): Promise<number> {
  const { countTokens } = await encoding();
  let tokens = replyPriming;
  for (const m of messages) {
    tokens += perMessage + countTokens(m.role);
    if ("name" in m && m.name) tokens += perName + countTokens(m.name);
    const content = m.content;
    if (typeof content === "string") tokens += countTokens(content);
    else if (Array.isArray(content)) {
      for (const part of content) {
        if (part.type === "text") tokens += countTokens(part.text);
        else if (part.type === "image_url") tokens += part.image_url.detail === "low" ? imageTokens.low : imageTokens.high;
        else if (part.type === "refusal") tokens += countTokens(part.refusal);
      }
    }
    if (m.role === "assistant" && m.tool_calls) {
      for (const call of m.tool_calls) {
        if (call.type === "function") tokens += countTokens(call.function.name) + countTokens(call.function.arguments);
      }
    }
  }
  if (tools && tools.length > 0) tokens += countTokens(JSON.stringify(tools));
  return tokens;
}

/** Tokens of generated text (content, refusals, tool call arguments), summed over pieces. */
export async function countTextTokens(pieces: readonly string[]): Promise<number> {
  if (pieces.length === 0) return 0;
  const { countTokens } = await encoding();
  return countTokens(pieces.join(""));
}

/** Tokens of embedding inputs: strings are encoded, token arrays counted as they are. */
export async function countEmbeddingTokens(input: string | readonly string[] | readonly number[] | readonly number[][]): Promise<number> {
  if (typeof input === "string") return (await encoding()).countTokens(input);
  let tokens = 0;
  for (const item of input) {
    if (typeof item === "number") tokens++;
    else if (Array.isArray(item)) tokens += item.length;
    else tokens += (await encoding()).countTokens(item as string);
  }
  return tokens;
}

/** Estimated usage: input and output counts, nothing cached or hidden. */
export function estimatedTokens(input: number, output: number): Tokens {
  return { inputTokens: BigInt(input), cachedInputTokens: 0n, outputTokens: BigInt(output), reasoningTokens: 0n };
}
