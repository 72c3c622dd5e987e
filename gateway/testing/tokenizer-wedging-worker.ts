/**
 * A counting thread for tokenizer.test.ts that goes wrong on cue: a count of the text "wedge" never finishes (the
 * thread spins), one of "exit" ends the thread; any other count is answered with a token a character.
 */
import type { CountAnswer, CountRequest } from "../tokenizer-worker.ts";

declare const self: Worker;

self.onmessage = ({ data }: MessageEvent<CountRequest>) => {
  if (data.texts.includes("wedge")) for (;;);
  if (data.texts.includes("exit")) process.exit(1);
  postMessage({ id: data.id, tokens: data.texts.join("").length } satisfies CountAnswer);
};
