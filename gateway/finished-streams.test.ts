import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { ConnectError } from "@connectrpc/connect";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { startTestGateway } from "./testing/served-gateway.ts";
import { countTextTokens } from "./tokenizer.ts";

// A stream whose every choice has finished has given its answer: only the usage the upstream bills is still to come.
// Whatever then ends it early (the whole-request limit, an error event, a shutdown), it ends as an answer.
let upstream: FakeUpstream;
beforeAll(() => {
  upstream = startFakeUpstream();
});
afterAll(() => upstream.stop());
beforeEach(() => upstream.reset());

/** `ok` has no time limit of its own; `limited` the same upstream with a whole-request limit of 600 ms. */
const routes = (url: string) =>
  [
    "providers:",
    `  - { name: fake, kind: openai, base_url: "${url}" }`,
    "models:",
    ...["ok", "limited"].flatMap((name) => [
      `  - name: ${name}`,
      `    targets: [{ provider: fake, model: ${name} }]`,
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      ...(name === "limited" ? ["    request_timeout_ms: 600"] : []),
    ]),
  ].join("\n");

const messages = [{ role: "user", content: "hello there friend" }];
const billed = { prompt_tokens: 10, completion_tokens: 2, total_tokens: 12 };

/** An upstream's answer "forty two", finished, then an error event in place of its usage and [DONE]. */
const chunk = { id: "chatcmpl-up", object: "chat.completion.chunk", created: 1, model: "ok-up" };
const erringAfterFinish = [
  { ...chunk, choices: [{ index: 0, delta: { role: "assistant", content: "forty two" }, finish_reason: null }] },
  { ...chunk, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] },
  { error: { message: "the server had an error", type: "server_error", param: null, code: null } },
]
  .map((event) => `data: ${JSON.stringify(event)}\n\n`)
  .join("");

/** A REST stream read to its end: its events' data, the chunks parsed, and its request id. */
async function restStream(res: Response) {
  const text = await res.text();
  const data = text
    .split("\n\n")
    .filter((event) => event.startsWith("data: "))
    .map((event) => event.slice("data: ".length));
  const parsed = data.filter((d) => d !== "[DONE]").map((d) => JSON.parse(d) as Record<string, any>);
  return { data, parsed, requestId: res.headers.get("x-request-id") ?? "" };
}

describe("a stream ended early once every choice has finished is an answer", () => {
  let gateway: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    gateway = await startTestGateway(routes(upstream.url));
  });
  afterAll(() => gateway.close());

  const post = (base: string, model: string) =>
    fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
    });

  /** Over REST on both ports: the answer, a usage chunk of the counts metered, [DONE], and a row that says OK. */
  async function expectRestAnswers(model: string, content: string) {
    const output = BigInt(await countTextTokens([content]));
    for (const base of [gateway.url, gateway.restUrl]) {
      const { data, parsed, requestId } = await restStream(await post(base, model));
      expect(parsed.filter((c) => c.error)).toEqual([]);
      expect(parsed.map((c) => c.choices[0]?.delta.content ?? "").join("")).toBe(content);
      expect(data.at(-1)).toBe("[DONE]");
      const usage = parsed.at(-1)?.usage;
      expect(usage).toMatchObject({ completion_tokens: Number(output) });
      const row = await gateway.row(requestId);
      expect(row).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, usageEstimated: true });
      expect(row.usage).toMatchObject({ inputTokens: BigInt(usage.prompt_tokens), outputTokens: output });
    }
  }

  /** Over RPC: the answer, then the accounting message, no error, and a row that says OK. */
  async function expectRpcAnswers(model: string, content: string) {
    let requestId = "";
    const received = [];
    for await (const m of gateway.rpc("sk-good").streamChatCompletion(
      { params: { model, messages } },
      { onHeader: (h) => (requestId = h.get("x-request-id") ?? "") },
    )) {
      received.push(m);
    }
    expect(received.map((m) => m.choices[0]?.content ?? "").join("")).toBe(content);
    const accounting = received.at(-1)?.accounting;
    expect(accounting).toMatchObject({ requestId, usageEstimated: true });
    expect(accounting?.usage?.outputTokens).toBe(BigInt(await countTextTokens([content])));
    expect(await gateway.row(requestId)).toMatchObject({ status: RequestStatus.OK, httpStatus: 200 });
  }

  test("the whole-request limit passing while the usage is awaited: usage counted, [DONE], metered OK", async () => {
    upstream.script("limited", { content: "one two", usage: billed, usageDelayMs: 10_000 });
    await expectRestAnswers("limited", "one two");
    await expectRpcAnswers("limited", "one two");
  });

  test("an error event after every choice finished: usage counted, [DONE], metered OK", async () => {
    upstream.script("ok", { body: { contentType: "text/event-stream", text: erringAfterFinish } });
    await expectRestAnswers("ok", "forty two");
    await expectRpcAnswers("ok", "forty two");
  });
});

test("a shutdown cutting streams whose answer is complete ends them as answers, over REST and RPC alike", async () => {
  const gateway = await startTestGateway(routes(upstream.url));
  // The usage comes long after the grace: each stream is still waiting for it when the shutdown cuts.
  upstream.script("ok", { content: "one two", usage: billed, usageDelayMs: 10_000 });
  const finished = '"finish_reason":"stop"';
  const rest = await Promise.all(
    [gateway.url, gateway.restUrl].map(async (base) => {
      const res = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "ok", messages, stream: true, stream_options: { include_usage: true } }),
      });
      const reader = res.body?.getReader() as ReadableStreamDefaultReader<Uint8Array>;
      let text = "";
      while (!text.includes(finished)) text += new TextDecoder().decode((await reader.read()).value);
      return { reader, text, requestId: res.headers.get("x-request-id") ?? "" };
    }),
  );
  let rpcRequestId = "";
  const rpcMessages = gateway
    .rpc("sk-good")
    .streamChatCompletion(
      { params: { model: "ok", messages } },
      { onHeader: (h) => (rpcRequestId = h.get("x-request-id") ?? "") },
    )
    [Symbol.asyncIterator]();
  const rpcReceived = [];
  while (rpcReceived.at(-1)?.choices[0]?.finishReason !== "stop") {
    rpcReceived.push((await rpcMessages.next()).value);
  }
  const rpcEnd = (async () => {
    try {
      for (let step = await rpcMessages.next(); !step.done; step = await rpcMessages.next()) {
        rpcReceived.push(step.value);
      }
    } catch (e) {
      return ConnectError.from(e);
    }
  })();

  const cuts: number[] = [];
  await gateway.close(200, () => void cuts.push(gateway.core.cutInFlight()));
  expect(cuts[0]).toBe(3);

  const output = BigInt(await countTextTokens(["one two"]));
  for (const { reader, text: received } of rest) {
    let text = received;
    for (let step = await reader.read(); !step.done; step = await reader.read()) {
      text += new TextDecoder().decode(step.value);
    }
    const data = text.trimEnd().split("\n\n").map((event) => event.slice("data: ".length));
    expect(data.at(-1)).toBe("[DONE]");
    expect(JSON.parse(data.at(-2) as string).usage).toMatchObject({ completion_tokens: Number(output) });
  }
  expect(await rpcEnd).toBeUndefined();
  expect(rpcReceived.at(-1)?.accounting).toMatchObject({ requestId: rpcRequestId, usageEstimated: true });
  expect(await gateway.core.settled(10_000)).toBe(true);
  for (const requestId of [...rest.map((r) => r.requestId), rpcRequestId]) {
    const row = await gateway.row(requestId);
    expect(row).toMatchObject({ status: RequestStatus.OK, httpStatus: 200, usageEstimated: true });
    expect(row.usage?.outputTokens).toBe(output);
  }
}, 30_000);
