import { describe, expect, test } from "bun:test";
import OpenAI, { type APIError } from "openai";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import type { FakeUpstream } from "../testing/fake-upstream.ts";
import { gatewayOnFakeUpstream, type TestGateway } from "../testing/gateway-on-fake-upstream.ts";

// Chat completions answered in audio, through the gateway in front of a real OpenAI-compatible upstream on a socket,
// called with the official SDK on both REST ports: the audio ids clients get, and give back to have the model hear
// its earlier answer again.
let upstream: FakeUpstream;
let gateway: TestGateway;

gatewayOnFakeUpstream(
  (url) =>
    [
      "providers:",
      `  - { name: fake, kind: openai, base_url: "${url}" }`,
      `  - { name: fake2, kind: openai, base_url: "${url}" }`,
      "models:",
      "  - name: ok",
      "    targets: [{ provider: fake, model: ok }]",
      '    pricing: { input_per_mtok: "2.50", output_per_mtok: "10", audio_output_per_mtok: "80" }',
      "  - name: pair",
      "    targets: [{ provider: fake, model: left }, { provider: fake2, model: right }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
    ].join("\n"),
  (served) => ({ upstream, gateway } = served),
);

const spoken = { modalities: ["text", "audio"] as ("text" | "audio")[], audio: { voice: "alloy" as const, format: "wav" as const } };
const hello: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: "is a golden retriever a good dog?" }];
/** A follow-up naming an earlier audio answer by id: its `audio.id` is `messages[1].audio.id`. */
const followUp = (id: string): OpenAI.ChatCompletionMessageParam[] => [
  ...hello,
  { role: "assistant", audio: { id } },
  { role: "user", content: "why?" },
];
const upstreamId = "audio_6750fe3f2b948190a5bca39a3dc8d9b2";

for (const [port, base] of [
  ["REST port", () => gateway.restUrl],
  ["RPC port", () => gateway.url],
] as const) {
  const sdk = (apiKey = "sk-good") => new OpenAI({ baseURL: `${base()}/v1`, apiKey, maxRetries: 0 });

  describe(`chat audio ids on the ${port}`, () => {
    test("clients get the gateway's audio id, the same whole or streamed, never the upstream's; the upstream is sent its own", async () => {
      upstream.script("ok", { audio: upstreamId, content: "yes they are" });
      const whole = await sdk().chat.completions.create({ model: "ok", messages: hello, ...spoken });
      const audio = whole.choices[0]?.message.audio;
      expect(audio).toMatchObject({ data: "UklGRiQAAABXQVZF", expires_at: 1_700_003_600, transcript: "yes they are" });
      const id = audio?.id as string;
      expect(id).toStartWith("audio_");
      expect(id).not.toBe(upstreamId);
      // Streamed, the first audio delta and the last carry it: the same id as the whole answer's.
      const stream = await sdk().chat.completions.create({ model: "ok", messages: hello, ...spoken, stream: true });
      const ids: unknown[] = [];
      let transcript = "";
      for await (const chunk of stream) {
        const delta = chunk.choices[0]?.delta as { audio?: { id?: string; transcript?: string } } | undefined;
        if (delta?.audio?.id !== undefined) ids.push(delta.audio.id);
        transcript += delta?.audio?.transcript ?? "";
      }
      expect(transcript).toBe("yes they are");
      expect(ids).toEqual([id, id]);
      // Another org's id of the same upstream audio differs.
      const other = await sdk("sk-limited").chat.completions.create({ model: "ok", messages: hello, ...spoken });
      expect(other.choices[0]?.message.audio?.id).not.toBe(id);
      // Named in a follow-up, whole or streamed, the upstream gets its own id.
      upstream.reset();
      upstream.script("ok", { content: "they are loyal" });
      const next = await sdk().chat.completions.create({ model: "ok", messages: followUp(id) });
      expect(next.choices[0]?.message.content).toBe("they are loyal");
      for await (const _ of await sdk().chat.completions.create({ model: "ok", messages: followUp(id), stream: true }));
      expect(upstream.seen("ok").map((r) => r.body.messages[1])).toEqual([
        { role: "assistant", audio: { id: upstreamId } },
        { role: "assistant", audio: { id: upstreamId } },
      ]);
    });

    test("another org's or project's audio id, an altered one and an upstream's own are refused 400 naming it, asking no upstream", async () => {
      upstream.script("ok", { audio: upstreamId, content: "private words" });
      const mine = (await sdk().chat.completions.create({ model: "ok", messages: hello, ...spoken })).choices[0]?.message
        .audio?.id as string;
      upstream.reset();
      const flipped = `${mine.slice(0, -2)}${mine.at(-2) === "A" ? "B" : "A"}${mine.at(-1)}`;
      const cases: [string, string][] = [
        ["sk-limited", mine],
        ["sk-org", mine],
        ["sk-proj2", mine],
        ["sk-good", flipped],
        ["sk-good", upstreamId],
        ["sk-good", "audio_abc"],
      ];
      for (const [key, id] of cases) {
        for (const stream of [false, true]) {
          const error = (await sdk(key)
            .chat.completions.create({ model: "ok", messages: followUp(id), stream })
            .catch((e: unknown) => e)) as APIError;
          expect(error.status).toBe(400);
          expect(error.error).toEqual({
            message: `Audio with id '${id}' not found.`,
            type: "invalid_request_error",
            param: "messages[1].audio.id",
            code: "audio_not_found",
          });
        }
      }
      expect(upstream.requests).toHaveLength(0);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 400 });
      // Another key of the same project may name it.
      upstream.script("ok", { content: "sure" });
      await sdk("sk-proj1").chat.completions.create({ model: "ok", messages: followUp(mine) });
      expect(upstream.seen("ok")[0]?.body.messages[1]).toEqual({ role: "assistant", audio: { id: upstreamId } });
    });

    test("an upstream's refusal naming the audio by its own id names the client's", async () => {
      upstream.script("ok", { audio: upstreamId, content: "soon gone" });
      const id = (await sdk().chat.completions.create({ model: "ok", messages: hello, ...spoken })).choices[0]?.message
        .audio?.id as string;
      upstream.script("ok", { status: 400, error: { message: `Audio with id '${upstreamId}' has expired.` } });
      for (const stream of [false, true]) {
        const error = (await sdk()
          .chat.completions.create({ model: "ok", messages: followUp(id), stream })
          .catch((e: unknown) => e)) as APIError;
        expect(error.status).toBe(400);
        expect(error.message).toContain(`Audio with id '${id}' has expired.`);
        expect(error.message).not.toContain(upstreamId);
      }
    });

    test("a follow-up goes to the provider that made the audio, not the model's first target; a model not there is a 400", async () => {
      upstream.script("left", { status: 500 });
      upstream.script("right", { audio: upstreamId, content: "from the right" });
      const earlier = await sdk().chat.completions.create({ model: "pair", messages: hello, ...spoken });
      const id = earlier.choices[0]?.message.audio?.id as string;
      expect(earlier.choices[0]?.message.audio?.transcript).toBe("from the right");
      upstream.reset();
      upstream.script("left", { content: "wrong account" });
      upstream.script("right", { content: "continued" });
      const next = await sdk().chat.completions.create({ model: "pair", messages: followUp(id) });
      expect(next.choices[0]?.message.content).toBe("continued");
      expect(upstream.seen("left")).toHaveLength(0);
      expect(upstream.seen("right")[0]?.body.messages[1]).toEqual({ role: "assistant", audio: { id: upstreamId } });
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ provider: "fake2", fallbackUsed: false });
      // `ok` has no target on fake2, which holds the audio.
      const error = (await sdk()
        .chat.completions.create({ model: "ok", messages: followUp(id) })
        .catch((e: unknown) => e)) as APIError;
      expect(error.status).toBe(400);
      expect(error.error).toMatchObject({ param: "messages[1].audio.id", type: "invalid_request_error" });
      expect(error.message).toContain("fake2");
      expect(upstream.seen("ok")).toHaveLength(0);
      // Audio two providers made cannot both be heard: no one account holds them.
      upstream.script("ok", { audio: "audio_from_fake", content: "from fake" });
      const fromFake = (await sdk().chat.completions.create({ model: "ok", messages: hello, ...spoken })).choices[0]
        ?.message.audio?.id as string;
      upstream.reset();
      const both: OpenAI.ChatCompletionMessageParam[] = [...followUp(id), { role: "assistant", audio: { id: fromFake } }];
      const mixed = (await sdk()
        .chat.completions.create({ model: "pair", messages: [...both, { role: "user", content: "and?" }] })
        .catch((e: unknown) => e)) as APIError;
      expect(mixed.status).toBe(400);
      expect(mixed.error).toMatchObject({ param: "messages[3].audio.id", type: "invalid_request_error" });
      expect(upstream.requests).toHaveLength(0);
    });
  });
}
