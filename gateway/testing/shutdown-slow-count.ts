/**
 * Run by shutdown.test.ts in a process of its own, counting on a thread that takes 2 s a count (as the first count
 * waits for the encoding to load): a whole request and a stream, on the REST port, still running when a shutdown's
 * grace is over. Prints one JSON line, how long after the cut each was answered and how each was metered, and exits.
 */
import { counterThread } from "../tokenizer.ts";
import { dripAndSlowRoutes, startTestGateway } from "./served-gateway.ts";

counterThread.script = new URL("./tokenizer-wedging-worker.ts", import.meta.url).href;
const gateway = await startTestGateway(dripAndSlowRoutes);
const post = (model: string, stream: boolean) =>
  fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: JSON.stringify({ model, stream, messages: [{ role: "user", content: "a slow count of this prompt" }] }),
  });
let cutAt = 0;
const sinceCut = () => Math.round(performance.now() - cutAt);
const whole = post("slow", false).then(async (res) => ({ status: res.status, body: await res.text(), ms: sinceCut() }));
const res = await post("drip", true);
const stream = (async () => {
  const text = await res.text();
  return { last: text.trimEnd().split("\n\n").at(-1), ms: sinceCut() };
})();
await Bun.sleep(300);
await gateway.close(100, () => {
  cutAt = performance.now();
  gateway.core.cutInFlight();
});
const answers = { whole: await whole, stream: await stream };
const settled = await gateway.core.settled(10_000);
const rows = gateway.shipper.rows.map((row) => ({ status: row.httpStatus, input: Number(row.usage?.inputTokens ?? 0n) }));
console.log(JSON.stringify({ ...answers, settled, metered: sinceCut(), rows }));
process.exit(0);
