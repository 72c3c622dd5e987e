/**
 * The thread tokenizer.ts counts on: loading an encoding (about a second, on the first count that needs it) and
 * encoding a count's text run here, never on the gateway's event loop. A message is one count's texts, at most
 * `exactChars` characters in all, and the encoding to count them in; the answer is their tokens summed, each text
 * encoded in its `encodedPieces`, or none when the encoding did not load (`unloaded`) or the count failed.
 */
import { encodedPieces } from "./tokenizer.ts";

declare const self: Worker;

/** OpenAI's encodings: o200k_base for GPT-4o, GPT-4.1, GPT-5 and the o-series, cl100k_base for GPT-4 and GPT-3.5. */
export type TokenEncoding = "o200k_base" | "cl100k_base";

export interface CountRequest {
  id: number;
  texts: string[];
  encoding: TokenEncoding;
}
export interface CountAnswer {
  id: number;
  tokens?: number;
  unloaded?: true;
}

// Special tokens are text a client wrote, not control tokens: encoded as ordinary text, never refused.
const plainText = { disallowedSpecial: new Set<string>() };
const modules = {
  o200k_base: () => import("gpt-tokenizer/encoding/o200k_base"),
  cl100k_base: () => import("gpt-tokenizer/encoding/cl100k_base"),
};
type Encoder = Awaited<ReturnType<(typeof modules)[TokenEncoding]>>;
const encoders = new Map<TokenEncoding, Promise<Encoder | undefined>>();

/** An encoding, loaded on its first count (each costs about 100 MB), which builds its tables at once. */
function encoder(name: TokenEncoding): Promise<Encoder | undefined> {
  let loading = encoders.get(name);
  if (!loading) {
    loading = modules[name]().then(
      (encoding) => (encoding.countTokens("warm", plainText), encoding),
      () => undefined,
    );
    encoders.set(name, loading);
  }
  return loading;
}

self.onmessage = async ({ data }: MessageEvent<CountRequest>) => {
  const encoded = await encoder(data.encoding);
  const answer: CountAnswer = { id: data.id };
  if (!encoded) answer.unloaded = true;
  else {
    try {
      let tokens = 0;
      for (const text of data.texts) for (const piece of encodedPieces(text)) tokens += encoded.countTokens(piece, plainText);
      answer.tokens = tokens;
    } catch {
      // Answered without tokens: the count falls back to its estimate.
    }
  }
  postMessage(answer);
};
