/**
 * Run by tokenizer.test.ts in a process of its own, counting on a thread that wedges or ends on cue
 * (tokenizer-wedging-worker.ts): counts before, during and after a wedged count and an ended thread, each timed.
 * Prints one JSON line and exits by itself.
 */
import { countTextTokens, counterThread } from "../tokenizer.ts";

counterThread.script = new URL("./tokenizer-wedging-worker.ts", import.meta.url).href;
counterThread.stalledMs = 500;
const timed = async (texts: string[]) => {
  const started = performance.now();
  const tokens = await countTextTokens(texts);
  return { tokens, ms: Math.round(performance.now() - started) };
};
const before = await timed(["abcdefgh"]);
// Counts waiting behind the wedged one, and one asked for while it spins.
const wedged = Promise.all([timed(["wedge"]), timed(["漢字漢字"]), timed(["abcdefgh"])]);
await Bun.sleep(100);
const during = timed(["abcdefgh"]);
const stuck = await wedged;
const after = await timed(["abcdefgh"]);
const ended = await timed(["exit"]);
const afterEnded = await timed(["abcdefgh"]);
console.log(JSON.stringify({ before, stuck, during: await during, after, ended, afterEnded }));
