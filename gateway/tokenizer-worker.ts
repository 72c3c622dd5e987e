/**
 * The thread tokenizer.ts counts on: loading the o200k_base encoding (about a second) and encoding a count's text
 * run here, never on the gateway's event loop. A message is one count's texts, at most `exactChars` characters in
 * all; the answer is their tokens summed, each text encoded in its `encodedPieces`, or none when the encoding did not
 * load (`unloaded`) or the count failed.
 */
import { encodedPieces } from "./tokenizer.ts";

declare const self: Worker;

export interface CountRequest {
  id: number;
  texts: string[];
}
export interface CountAnswer {
  id: number;
  tokens?: number;
  unloaded?: true;
}

// Special tokens are text a client wrote, not control tokens: encoded as ordinary text, never refused.
const plainText = { disallowedSpecial: new Set<string>() };
// The encoding builds its tables on its first count: done at once, as the thread starts only when a count needs it.
const encoding = import("gpt-tokenizer/encoding/o200k_base").then(
  (encoding) => (encoding.countTokens("warm", plainText), encoding),
  () => undefined,
);

self.onmessage = async ({ data }: MessageEvent<CountRequest>) => {
  const encoded = await encoding;
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
