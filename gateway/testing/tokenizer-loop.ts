/**
 * Run by tokenizer.test.ts in a process of its own, so the encoding is loaded afresh: counts prompts of 16,384
 * characters (prose, code, CJK), the first one loading the encoding, while a 1 ms timer measures the longest the event
 * loop was held; then closes the tokenizer and counts once more. Prints one JSON line and exits by itself: the thread
 * counts ran on must not hold the process open.
 */
import { closeTokenizer, countInputTokens, countTextTokens } from "../tokenizer.ts";

let seed = 1;
const random = (n: number) => (seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648) % n;
const texts = {
  prose: () => Array.from({ length: 3_000 }, () => `word${random(5_000)}`).join(" "),
  code: () => Array.from({ length: 600 }, () => `  const v${random(99_999)} = f(x, ${random(4_096)});\n`).join(""),
  cjk: () => Array.from({ length: 16_384 }, () => String.fromCharCode(0x4e00 + random(6_000))).join(""),
};
let held = 0;
let last = performance.now();
const probe = setInterval(() => {
  const now = performance.now();
  held = Math.max(held, now - last);
  last = now;
}, 1);
const counts: number[] = [];
for (let i = 0; i < 4; i++) {
  for (const make of Object.values(texts)) {
    counts.push(await countInputTokens({ messages: [{ role: "user", content: make().slice(0, 16_384) }] }));
    // The timer runs between counts, as other requests would: it sees each count's hold.
    await Bun.sleep(2);
  }
}
clearInterval(probe);
closeTokenizer();
const afterClose = await countTextTokens(["漢字".repeat(100)]);
console.log(JSON.stringify({ heldMs: Math.round(held), counts, afterClose }));
