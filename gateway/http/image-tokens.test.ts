import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { type FakeUpstream, startFakeUpstream } from "../testing/fake-upstream.ts";
import { imageDataUrl } from "../testing/images.ts";
import { startTestGateway } from "../testing/served-gateway.ts";

// A gateway in front of an OpenAI-compatible upstream that reports no usage: images are counted by the gateway, by
// the rules of the upstream model's family and the size their data URLs tell.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
const models = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "local-vision"];

beforeAll(async () => {
  upstream = startFakeUpstream();
  const lines = ["providers:", `  - { name: fake, kind: openai, base_url: "${upstream.url}" }`, "models:"];
  for (const model of models) {
    lines.push(`  - name: ${model}`, `    targets: [{ provider: fake, model: ${model} }]`);
    lines.push(`    pricing: { input_per_mtok: "1", output_per_mtok: "1" }`);
  }
  gateway = await startTestGateway(lines.join("\n"), { maxBodyBytes: 1 << 20 });
});

afterAll(async () => {
  await gateway?.close();
  await upstream?.stop();
});

const sdk = () => new OpenAI({ baseURL: `${gateway.restUrl}/v1`, apiKey: "sk-good", maxRetries: 0 });
type Image = { url: string; detail?: "low" | "high" | "auto" };

/** Input tokens metered for a chat request of "look" and `image` (none: "look" alone), whole or streamed. */
async function chatInput(model: string, image: Image | undefined, stream: boolean): Promise<bigint> {
  upstream.script(model, { content: "a cat", usage: false });
  const content: OpenAI.ChatCompletionContentPart[] = [{ type: "text", text: "look" }];
  if (image) content.push({ type: "image_url", image_url: image });
  const messages = [{ role: "user" as const, content }];
  const { data, response } = await sdk().chat.completions.create({ model, messages, stream }).withResponse();
  if (data instanceof Object && Symbol.asyncIterator in data) for await (const _ of data as AsyncIterable<unknown>);
  const row = await gateway.row(response.headers.get("x-request-id") ?? "");
  expect(row).toMatchObject({ usageEstimated: true, streamed: stream });
  return row.usage?.inputTokens ?? 0n;
}

/** Input tokens metered for a Responses API request of "look" and `image` (none: "look" alone), whole or streamed. */
async function responsesInput(model: string, image: Image | undefined, stream: boolean): Promise<bigint> {
  upstream.script(model, { content: "a cat", usage: false });
  const content: OpenAI.Responses.ResponseInputContent[] = [{ type: "input_text", text: "look" }];
  if (image) content.push({ type: "input_image", image_url: image.url, detail: image.detail ?? "auto" });
  const input = [{ role: "user" as const, content }];
  const { data, response } = await sdk().responses.create({ model, input, stream }).withResponse();
  if (data instanceof Object && Symbol.asyncIterator in data) for await (const _ of data as AsyncIterable<unknown>);
  const row = await gateway.row(response.headers.get("x-request-id") ?? "");
  expect(row).toMatchObject({ usageEstimated: true, streamed: stream });
  return row.usage?.inputTokens ?? 0n;
}

const png = (width: number, height: number, detail?: Image["detail"]): Image => ({
  url: imageDataUrl("png", width, height),
  ...(detail ? { detail } : {}),
});
const jpeg = (width: number, height: number): Image => ({ url: imageDataUrl("jpeg", width, height) });

// Each image, on each model, and the tokens OpenAI bills for it.
const cases: Array<[model: string, image: Image, tokens: number, what: string]> = [
  ["gpt-4o-mini", png(1024, 1024, "high"), 25_501, "gpt-4o-mini, 1024x1024: 4 tiles of 5,667 and 2,833"],
  ["gpt-4o-mini", png(1024, 1024, "low"), 2833, "gpt-4o-mini at low detail: its base"],
  ["gpt-4o-mini", { url: "https://example.com/cat.png" }, 25_501, "gpt-4o-mini, by URL: as 2048x2048"],
  ["gpt-4o", jpeg(1920, 1080), 85 + 6 * 170, "gpt-4o, a 1920x1080 JPEG: 1365x768, 6 tiles"],
  ["gpt-4o", png(4096, 4096, "low"), 85, "gpt-4o at low detail"],
  ["gpt-4.1-mini", png(1024, 1024, "low"), Math.ceil(1024 * 1.62), "gpt-4.1-mini: 1,024 patches times 1.62"],
  ["local-vision", png(512, 512), 255, "a model of no known family: by gpt-4o's rules"],
];

describe("an upstream that reports no usage: images counted by their model's rules and size", () => {
  for (const stream of [false, true]) {
    test(`chat completions${stream ? ", streamed" : ""}`, async () => {
      for (const [model, image, tokens, what] of cases) {
        const text = await chatInput(model, undefined, stream);
        expect({ what, tokens: (await chatInput(model, image, stream)) - text }).toEqual({ what, tokens: BigInt(tokens) });
      }
    });

    test(`the Responses API${stream ? ", streamed" : ""}`, async () => {
      for (const [model, image, tokens, what] of cases) {
        const text = await responsesInput(model, undefined, stream);
        const withImage = await responsesInput(model, image, stream);
        expect({ what, tokens: withImage - text }).toEqual({ what, tokens: BigInt(tokens) });
      }
    });
  }
});
