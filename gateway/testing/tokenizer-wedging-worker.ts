/**
 * A counting thread for tokenizer.test.ts that goes wrong on cue: a count of the text "wedge" never finishes (the
 * thread spins), one of "exit" ends the thread, one of text containing "slow count" is answered after 2 s (as the first
 * count waits for the encoding to load); any count is answered with a token a character.
 */
import type { CountAnswer, CountRequest } from "../tokenizer-worker.ts";

declare const self: Worker;

self.onmessage = async ({ data }: MessageEvent<CountRequest>) => {
  if (data.texts.includes("wedge")) for (;;);
  if (data.texts.includes("exit")) process.exit(1);
  if (data.texts.some((text) => text.includes("slow count"))) await Bun.sleep(2_000);
  postMessage({ id: data.id, tokens: data.texts.join("").length } satisfies CountAnswer);
};
