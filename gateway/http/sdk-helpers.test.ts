import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { zodFunction, zodResponseFormat, zodResponsesFunction, zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";
import { mockRoutes } from "../testing.ts";
import { startTestGateway } from "../testing/served-gateway.ts";

// The official SDK's higher-level helpers (structured outputs parsed against a schema, tool arguments parsed, stream
// helpers assembling a final object) against the gateway's mock provider, on both REST ports.
let gateway: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  gateway = await startTestGateway(mockRoutes);
});
afterAll(() => gateway?.close());

const Plan = z.object({
  title: z.string(),
  kind: z.enum(["trip", "meeting"]),
  when: z.string().datetime(),
  guests: z.number().int().positive(),
  stops: z.array(z.object({ place: z.string() })),
  note: z.string().nullable(),
  owner: z.object({ email: z.string().email(), vip: z.boolean() }),
});
const expected = (echo: string): z.infer<typeof Plan> => ({
  title: echo,
  kind: "trip",
  when: "1970-01-01T00:00:00Z",
  guests: 1,
  stops: [],
  note: echo,
  owner: { email: "mock@example.com", vip: false },
});
const Weather = z.object({ city: z.string(), days: z.number().int().min(1).max(7) });

for (const [port, base] of [
  ["RPC port", () => gateway.url],
  ["REST port", () => gateway.restUrl],
] as const) {
  describe(`the SDK's helpers on the mock provider, ${port}`, () => {
    const sdk = () => new OpenAI({ baseURL: `${base()}/v1`, apiKey: "sk-good", maxRetries: 0 });
    const messages = [{ role: "user" as const, content: "plan it" }];

    test("chat structured output parses against its schema, whole and streamed", async () => {
      const response_format = zodResponseFormat(Plan, "plan");
      const whole = await sdk().chat.completions.parse({ model: "mock", messages, response_format });
      expect(whole.choices[0]?.message.parsed).toEqual(expected("mock reply: plan it"));
      const stream_options = { include_usage: true };
      const stream = sdk().chat.completions.stream({ model: "mock", messages, response_format, stream_options });
      const final = await stream.finalChatCompletion();
      expect(final.choices[0]?.message.parsed).toEqual(expected("mock reply: plan it"));
      expect(final.usage?.completion_tokens).toBeGreaterThan(0);
      // A JSON object without a schema stays the echo in JSON.
      const json = { type: "json_object" as const };
      const plain = await sdk().chat.completions.create({ model: "mock", messages, response_format: json });
      expect(JSON.parse(plain.choices[0]?.message.content ?? "")).toEqual({ reply: "mock reply: plan it" });
    });

    test("a required tool is called with arguments its parameters accept, parsed by the SDK", async () => {
      const tools = [zodFunction({ name: "weather", parameters: Weather })];
      const whole = await sdk().chat.completions.parse({ model: "mock", messages, tools, tool_choice: "required" });
      expect(whole.choices[0]?.message.tool_calls?.[0]).toMatchObject({
        function: { name: "weather", parsed_arguments: { city: "mock reply: plan it", days: 1 } },
      });
      const stream = sdk().chat.completions.stream({ model: "mock", messages, tools, tool_choice: "required" });
      const final = await stream.finalChatCompletion();
      expect(final.choices[0]?.message.tool_calls?.[0]).toMatchObject({
        function: { name: "weather", parsed_arguments: { city: "mock reply: plan it", days: 1 } },
      });
    });

    test("Responses API structured output and function calls parse, whole and streamed", async () => {
      const text = { format: zodTextFormat(Plan, "plan") };
      const whole = await sdk().responses.parse({ model: "mock", input: "plan it", text });
      expect(whole.output_parsed).toEqual(expected("mock reply: plan it"));
      const final = await sdk().responses.stream({ model: "mock", input: "plan it", text }).finalResponse();
      expect(final.output_parsed).toEqual(expected("mock reply: plan it"));
      const tools = [zodResponsesFunction({ name: "weather", parameters: Weather })];
      const called = await sdk().responses.parse({ model: "mock", input: "plan it", tools, tool_choice: "required" });
      expect(called.output[0]).toMatchObject({
        type: "function_call",
        name: "weather",
        parsed_arguments: { city: "mock reply: plan it", days: 1 },
      });
    });
  });
}
