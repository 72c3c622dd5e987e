import { describe, expect, test } from "bun:test";
import OpenAI, { APIError } from "openai";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { eventually } from "../../test/support.ts";
import { responsesPrompt } from "../responses-request.ts";
import type { FakeUpstream } from "../testing/fake-upstream.ts";
import { gatewayOnFakeUpstream, type TestGateway } from "../testing/gateway-on-fake-upstream.ts";
import { countResponsesInputTokens, countTextTokens } from "../tokenizer.ts";

// The Responses API through the gateway, in front of a real OpenAI-compatible upstream on a socket and the mock
// provider, called with the official SDK on both REST ports.
let upstream: FakeUpstream;
let gateway: TestGateway;

gatewayOnFakeUpstream(
  (url) =>
    [
      "providers:",
      `  - { name: fake, kind: openai, base_url: "${url}" }`,
      "  - { name: mock, kind: mock }",
      `  - { name: fake2, kind: openai, base_url: "${url}" }`,
      "models:",
      "  - name: ok",
      "    targets: [{ provider: fake, model: ok }]",
      '    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10", reasoning_per_mtok: "40" }',
      "  - name: fallback",
      "    targets: [{ provider: fake, model: primary }, { provider: fake, model: secondary }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      "  - name: pair",
      "    targets: [{ provider: fake, model: left }, { provider: fake2, model: right }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      "  - name: mock",
      "    targets: [{ provider: mock, model: mock-echo-1 }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      "  - name: dribble",
      "    targets: [{ provider: fake, model: dribble }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      "    request_timeout_ms: 300",
      "  - name: chat-only",
      "    endpoints: [chat]",
      "    targets: [{ provider: fake, model: ok }]",
      '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
    ].join("\n"),
  (served) => ({ upstream, gateway } = served),
);

const sdk = (base = gateway.restUrl, apiKey = "sk-good") => new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0 });

const usage = {
  prompt_tokens: 1000,
  completion_tokens: 500,
  total_tokens: 1500,
  prompt_tokens_details: { cached_tokens: 200 },
  completion_tokens_details: { reasoning_tokens: 100 },
};
// 800 input at $2.50, 200 cached at $1.25, 400 output at $10 and 100 reasoning at $40 per million tokens.
const costOfUsage = 800n * 2_500n + 200n * 1_250n + 400n * 10_000n + 100n * 40_000n;

for (const [port, base] of [
  ["REST port", () => gateway.restUrl],
  ["RPC port", () => gateway.url],
] as const) {
  describe(`POST /v1/responses on the ${port}`, () => {
    test("a whole response is served, its usage metered and priced to the nano, one metrics row of its endpoint", async () => {
      upstream.script("ok", { usage, content: "hello there" });
      const { data, response } = await sdk(base())
        .responses.create({ model: "ok", input: "hi", instructions: "be brief", user: "end-user-1", metadata: { team: "a" } })
        .withResponse();
      expect(data.output_text).toBe("hello there");
      expect(data.usage as unknown).toEqual({
        input_tokens: 1000,
        input_tokens_details: { cached_tokens: 200 },
        output_tokens: 500,
        output_tokens_details: { reasoning_tokens: 100 },
        total_tokens: 1500,
      });
      expect(response.headers.get("x-gateway-cost-nanos")).toBe(costOfUsage.toString());
      const [seen] = upstream.seen("ok");
      expect(seen?.path).toBe("/v1/responses");
      // Passed through as the client sent it, the upstream model in place of the public one, and no stream field.
      expect(seen?.body).toEqual({
        model: "ok",
        input: "hi",
        instructions: "be brief",
        user: "end-user-1",
        metadata: { team: "a" },
      });
      const row = await gateway.row(response.headers.get("x-request-id") as string);
      expect(row).toMatchObject({
        endpoint: Endpoint.RESPONSES,
        status: RequestStatus.OK,
        httpStatus: 200,
        streamed: false,
        requestedModel: "ok",
        servedModel: "ok-fake",
        provider: "fake",
        endUserId: "end-user-1",
        tags: { team: "a" },
        usageEstimated: false,
        costNanos: costOfUsage,
      });
      expect(row.usage).toMatchObject({ inputTokens: 1000n, cachedInputTokens: 200n, outputTokens: 500n, reasoningTokens: 100n });
      expect(row.costBreakdown).toMatchObject({
        inputNanos: 2_000_000n,
        cachedInputNanos: 250_000n,
        outputNanos: 4_000_000n,
        reasoningNanos: 4_000_000n,
      });
    });

    test("a streamed request the upstream answers with the whole response is streamed as its events and metered", async () => {
      upstream.script("ok", { usage, content: "one two three", whole: true });
      const { data: stream, response } = await sdk(base())
        .responses.create({ model: "ok", input: "hi", stream: true })
        .withResponse();
      const types: string[] = [];
      let text = "";
      for await (const event of stream) {
        types.push(event.type);
        if (event.type === "response.output_text.delta") text += event.delta;
      }
      expect(text).toBe("one two three");
      expect(types).toEqual([
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
      ]);
      // The SDK's stream helper puts the same response together from them.
      const final = await sdk(base()).responses.stream({ model: "ok", input: "hi" }).finalResponse();
      expect(final.output_text).toBe("one two three");
      expect(final.usage?.input_tokens).toBe(1000);
      const row = await gateway.row(response.headers.get("x-request-id") as string);
      const fields = { endpoint: Endpoint.RESPONSES, streamed: true, status: RequestStatus.OK, costNanos: costOfUsage };
      expect(row).toMatchObject(fields);
    });

    test("a streamed response passes the upstream's events on, named, without [DONE], and is metered from response.completed", async () => {
      upstream.script("ok", { usage, content: "one two three" });
      const { data: stream, response } = await sdk(base())
        .responses.create({ model: "ok", input: [{ role: "user", content: "hi" }], stream: true })
        .withResponse();
      const types: string[] = [];
      let text = "";
      let completed: OpenAI.Responses.Response | undefined;
      for await (const event of stream) {
        types.push(event.type);
        if (event.type === "response.output_text.delta") text += event.delta;
        if (event.type === "response.completed") completed = event.response;
      }
      expect(text).toBe("one two three");
      expect(types[0]).toBe("response.created");
      expect(types.at(-1)).toBe("response.completed");
      expect(completed?.usage?.input_tokens).toBe(1000);
      expect(completed?.usage?.output_tokens_details.reasoning_tokens).toBe(100);
      const requestId = response.headers.get("x-request-id") as string;
      const row = await gateway.row(requestId);
      // The model the upstream names, as for a whole response.
      const fields = { endpoint: Endpoint.RESPONSES, streamed: true, status: RequestStatus.OK, servedModel: "ok-fake" };
      expect(row).toMatchObject({ ...fields, costNanos: costOfUsage });
      expect(row.ttftUs).toBeGreaterThan(0n);
      expect(upstream.seen("ok")[0]?.body.stream).toBe(true);
      // The wire carries named events and nothing after the last.
      const raw = await fetch(`${base()}/v1/responses`, {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "ok", input: "hi", stream: true }),
      }).then((r) => r.text());
      expect(raw.startsWith("event: response.created\ndata: ")).toBe(true);
      expect(raw).not.toContain("[DONE]");
      expect(raw.trimEnd().split("\n\n").at(-1)?.startsWith("event: response.completed\n")).toBe(true);
    });
  });
}

describe("usage the upstream does not report", () => {
  test("a whole response is counted with the tokenizer and marked estimated", async () => {
    upstream.script("ok", { usage: false, content: "counted words" });
    const { data, response } = await sdk().responses.create({ model: "ok", input: "count me" }).withResponse();
    const input = await countResponsesInputTokens(responsesPrompt({ model: "ok", input: "count me" }));
    const output = await countTextTokens(["counted words"]);
    expect(data.usage).toMatchObject({ input_tokens: input, output_tokens: output });
    const row = await gateway.row(response.headers.get("x-request-id") as string);
    expect(row.usageEstimated).toBe(true);
    expect(row.usage).toMatchObject({ inputTokens: BigInt(input), outputTokens: BigInt(output) });
    expect(row.costNanos).toBe(BigInt(input) * 2_500n + BigInt(output) * 10_000n);
  });

  test("an image a function returned in a tool loop is counted as an image, as in a message, not as its base64", async () => {
    const image = `data:image/png;base64,${Buffer.from(crypto.getRandomValues(new Uint8Array(30_000))).toString("base64")}`;
    const screenshot = { type: "input_image" as const, image_url: image, detail: "auto" as const };
    const counted = async (input: OpenAI.Responses.ResponseInput) => {
      upstream.script("ok", { usage: false, content: "a screenshot" });
      const { response } = await sdk().responses.create({ model: "ok", input }).withResponse();
      return (await gateway.row(response.headers.get("x-request-id") as string)).usage?.inputTokens ?? 0n;
    };
    const inMessage = await counted([{ role: "user", content: [{ type: "input_text", text: "look" }, screenshot] }]);
    const fromTool = await counted([
      { role: "user", content: "look" },
      { type: "function_call", call_id: "call_1", name: "screenshot", arguments: "{}" },
      { type: "function_call_output", call_id: "call_1", output: [screenshot] },
    ]);
    // The call and its framing add a few tokens; the image's 40,000 bytes of base64 counted as text were about 27,000.
    expect(fromTool - inMessage).toBeLessThan(50n);
  });

  test("a stream is counted at what it streamed, and the client is shown the count", async () => {
    upstream.script("ok", { usage: false, content: "streamed words here" });
    const stream = await sdk().responses.create({ model: "ok", input: "count me", stream: true });
    let completed: OpenAI.Responses.Response | undefined;
    for await (const event of stream) if (event.type === "response.completed") completed = event.response;
    const output = await countTextTokens(["streamed words here"]);
    expect(completed?.usage?.output_tokens).toBe(output);
    const row = gateway.shipper.rows.at(-1);
    expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, usageEstimated: true, streamed: true });
    expect(row?.usage?.outputTokens).toBe(BigInt(output));
  });
});

describe("routing", () => {
  test("an upstream 429 then 500 falls back to the next target, metered once with the fallback", async () => {
    upstream.script("primary", { status: 429 }, { status: 500 });
    upstream.script("secondary", { usage, content: "from the second" });
    const { data, response } = await sdk().responses.create({ model: "fallback", input: "hi" }).withResponse();
    expect(data.output_text).toBe("from the second");
    expect(upstream.seen("primary")).toHaveLength(1);
    const row = await gateway.row(response.headers.get("x-request-id") as string);
    expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, fallbackUsed: true, servedModel: "secondary-fake" });
    expect(row.costNanos).toBe(1500n * 1_000n);
  });

  test("a stream whose first target fails before its first output falls back; the client sees one response", async () => {
    upstream.script("primary", { firstEvent: { type: "error", code: "server_error", message: "boom", param: null } });
    upstream.script("secondary", { usage, content: "streamed second" });
    const stream = await sdk().responses.create({ model: "fallback", input: "hi", stream: true });
    let text = "";
    let created = 0;
    for await (const event of stream) {
      if (event.type === "response.created") created++;
      if (event.type === "response.output_text.delta") text += event.delta;
    }
    expect(created).toBe(1);
    expect(text).toBe("streamed second");
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ fallbackUsed: true, status: RequestStatus.OK });
  });

  test("a response.failed before any output fails the attempt: the upstream's failure falls back, the request's fault is its 400", async () => {
    const failed = (error: Record<string, unknown>) => ({
      type: "response.failed",
      response: { id: "resp_fake", object: "response", status: "failed", model: "primary", output: [], error },
    });
    upstream.script("primary", { firstEvent: failed({ code: "server_error", message: "The model failed." }) });
    upstream.script("secondary", { usage, content: "streamed second" });
    const stream = await sdk().responses.create({ model: "fallback", input: "hi", stream: true });
    let text = "";
    for await (const event of stream) if (event.type === "response.output_text.delta") text += event.delta;
    expect(text).toBe("streamed second");
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ fallbackUsed: true, status: RequestStatus.OK });

    upstream.reset();
    upstream.script("primary", { firstEvent: failed({ code: "context_length_exceeded", message: "Input too long." }) });
    upstream.script("secondary", { content: "never" });
    const refused = await sdk()
      .responses.create({ model: "fallback", input: "hi", stream: true })
      .catch((e: unknown) => e);
    expect((refused as APIError).status).toBe(400);
    expect(upstream.seen("secondary")).toHaveLength(0);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, errorCode: "context_length_exceeded" });
  });

  test("Azure's content filter ending a stream before any output (a response.failed of no error, then its error event) is the client's refusal", async () => {
    const response = { id: "resp_fake", object: "response", model: "primary", output: [], error: null };
    const filtered = (error: Record<string, unknown>) => ({
      contentType: "text/event-stream",
      text: [
        { type: "response.created", sequence_number: 0, response: { ...response, status: "in_progress" } },
        { type: "response.failed", sequence_number: 1, response: { ...response, status: "failed" } },
        { type: "error", sequence_number: 2, error },
      ]
        .map((event) => `event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`)
        .join(""),
    });
    const message = "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.";
    for (const error of [
      { type: "invalid_request_error", code: "content_policy_violation", message, param: null },
      { code: "content_filter", message },
    ]) {
      upstream.reset();
      upstream.script("primary", { body: filtered(error) });
      upstream.script("secondary", { content: "never" });
      const refused = await sdk()
        .responses.create({ model: "fallback", input: "hi", stream: true })
        .catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(APIError);
      expect([(refused as APIError).status, (refused as APIError).code]).toEqual([400, error.code]);
      expect((refused as APIError).message).toContain("content management policy");
      expect(upstream.seen("primary")).toHaveLength(1);
      expect(upstream.seen("secondary")).toHaveLength(0);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, errorCode: error.code });
    }
    // A response.failed of no error that nothing follows is still the upstream's failure: on to the next target.
    upstream.reset();
    upstream.script("primary", { body: { ...filtered({}), text: filtered({}).text.split("event: error")[0] as string } });
    upstream.script("secondary", { content: "answered second" });
    let text = "";
    for await (const event of await sdk().responses.create({ model: "fallback", input: "hi", stream: true })) {
      if (event.type === "response.output_text.delta") text += event.delta;
    }
    expect(text).toBe("answered second");
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ fallbackUsed: true, status: RequestStatus.OK });
  });

  test("a whole response answered with status failed fails the attempt as a streamed one does, never a 200", async () => {
    const failed = (error: Record<string, unknown>) => ({
      contentType: "application/json",
      text: JSON.stringify({ id: "resp_fake", object: "response", status: "failed", model: "primary", output: [], error, usage: null }),
    });
    upstream.script("primary", { body: failed({ code: "server_error", message: "The model failed." }) });
    upstream.script("secondary", { usage, content: "answered second" });
    const data = await sdk().responses.create({ model: "fallback", input: "hi" });
    expect(data.status).toBe("completed");
    expect(data.output_text).toBe("answered second");
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ fallbackUsed: true, status: RequestStatus.OK });

    upstream.reset();
    upstream.script("primary", { body: failed({ code: "server_error", message: "The model failed." }) });
    upstream.script("secondary", { body: failed({ code: "server_error", message: "The model failed." }) });
    const broken = await sdk()
      .responses.create({ model: "fallback", input: "hi" })
      .catch((e: unknown) => e);
    expect((broken as APIError).status).toBe(502);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.UPSTREAM_ERROR, costNanos: 0n });

    upstream.reset();
    upstream.script("primary", { body: failed({ code: "context_length_exceeded", message: "Input too long." }) });
    upstream.script("secondary", { content: "never" });
    const refused = await sdk()
      .responses.create({ model: "fallback", input: "hi" })
      .catch((e: unknown) => e);
    expect((refused as APIError).status).toBe(400);
    expect(upstream.seen("secondary")).toHaveLength(0);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, errorCode: "context_length_exceeded" });
  });

  test("a request chained to an earlier response goes to the target that made it only, with no fallback", async () => {
    upstream.script("primary", { content: "first" });
    const earlier = await sdk().responses.create({ model: "fallback", input: "hi" });
    upstream.reset();
    upstream.script("primary", { status: 500 });
    upstream.script("secondary", { content: "never" });
    const error = await sdk()
      .responses.create({ model: "fallback", input: "and then?", previous_response_id: earlier.id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(APIError);
    expect((error as APIError).status).toBe(502);
    // The upstream gets its own id.
    expect(upstream.seen("primary")[0]?.body.previous_response_id).toBe("resp_fake");
    expect(upstream.seen("secondary")).toHaveLength(0);
  });

  test("a reference to a stored item, typed or by its id alone, chains the request to the first target as well", async () => {
    upstream.script("primary", { content: "first" });
    const id = (await sdk().responses.create({ model: "fallback", input: "hi" })).output[0]?.id as string;
    for (const reference of [{ type: "item_reference" as const, id }, { id }]) {
      upstream.reset();
      upstream.script("primary", { status: 500 });
      upstream.script("secondary", { status: 404, error: { message: "Item with id 'msg_fake' not found.", type: "invalid_request_error" } });
      const error = await sdk()
        .responses.create({ model: "fallback", input: [reference, { role: "user", content: "and then?" }] })
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(APIError);
      expect((error as APIError).status).toBe(502);
      // The upstream gets its own id.
      expect(upstream.seen("primary")[0]?.body.input[0]).toEqual({ ...reference, id: "msg_fake" });
      expect(upstream.seen("secondary")).toHaveLength(0);
    }
  });

  test("an error event OpenAI sends before any output, nested or flat, is the request's fault it names: no fallback", async () => {
    const error = { type: "invalid_request_error", code: "context_length_exceeded", message: "Input too long.", param: "input" };
    const { type: _, ...flat } = error;
    for (const event of [{ type: "error", error: { ...error }, sequence_number: 2 }, { type: "error", ...flat, sequence_number: 2 }]) {
      upstream.reset();
      upstream.script("primary", { firstEvent: event });
      upstream.script("secondary", { content: "never" });
      const refused = await sdk()
        .responses.create({ model: "fallback", input: "hi", stream: true })
        .catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(APIError);
      expect((refused as APIError).status).toBe(400);
      expect((refused as APIError).error).toEqual(error);
      expect(upstream.seen("secondary")).toHaveLength(0);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, errorCode: "context_length_exceeded" });
    }
    // A rate limit so sent holds the target, as a 429 does, rather than counting as its failure.
    upstream.reset();
    const limited = { type: "error", error: { type: "too_many_requests", code: "rate_limit_exceeded", message: "Slow down." } };
    upstream.script("primary", { firstEvent: limited });
    upstream.script("secondary", { firstEvent: limited });
    const refused = await sdk()
      .responses.create({ model: "fallback", input: "hi", stream: true })
      .catch((e: unknown) => e);
    expect((refused as APIError).status).toBe(429);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.RATE_LIMITED });
    // And so does a response.failed naming one (rate_limit_exceeded is among the codes of a response's error).
    upstream.reset();
    const failed = {
      type: "response.failed",
      response: { id: "resp_fake", object: "response", status: "failed", model: "primary", output: [], error: { code: "rate_limit_exceeded", message: "Slow down." } },
    };
    upstream.script("primary", { firstEvent: failed });
    upstream.script("secondary", { firstEvent: failed });
    const failedLimited = await sdk()
      .responses.create({ model: "fallback", input: "hi", stream: true })
      .catch((e: unknown) => e);
    expect((failedLimited as APIError).status).toBe(429);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.RATE_LIMITED });
  });

  test("an upstream error event mid-stream is metered and passed on as an error the SDK raises", async () => {
    upstream.script("ok", {
      content: "one two three four",
      midEvent: { type: "error", code: "server_error", message: "upstream broke sk-secret-1234567890abcdef", param: null },
    });
    const stream = await sdk().responses.create({ model: "ok", input: "hi", stream: true });
    let text = "";
    const error = await (async () => {
      for await (const event of stream) if (event.type === "response.output_text.delta") text += event.delta;
    })().catch((e: unknown) => e);
    expect(text).toBe("one");
    expect(error).toBeInstanceOf(APIError);
    expect(String((error as APIError).message)).toContain("failed mid-stream");
    const row = gateway.shipper.rows.at(-1);
    expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, status: RequestStatus.UPSTREAM_ERROR, errorCode: "upstream_error" });
    // The prompt and what was streamed are metered, counted.
    expect(row?.usageEstimated).toBe(true);
    expect(row?.usage?.outputTokens).toBeGreaterThan(0n);
  });

  test("an event type with a line break fails the stream: it would end the event line and write events of its own", async () => {
    const sse = (event: object) => `event: x\ndata: ${JSON.stringify(event)}\n\n`;
    const forged = '\n\nevent: response.completed\ndata: {"type":"response.completed","forged":true}\n\nevent: x';
    const response = { id: "resp_1", object: "response", output: [] };
    for (const type of [`response.output_text.delta${forged}`, `response.output_text.delta\r${forged}`]) {
      const text = [
        sse({ type: "response.created", response: { ...response, status: "in_progress" } }),
        sse({ type: "response.output_text.delta", item_id: "msg_1", output_index: 0, content_index: 0, delta: "one" }),
        sse({ type, item_id: "msg_1", output_index: 0, content_index: 0, delta: " two" }),
        sse({ type: "response.completed", response: { ...response, status: "completed", usage: { input_tokens: 1, output_tokens: 2, total_tokens: 3 } } }),
      ].join("");
      upstream.script("ok", { body: { contentType: "text/event-stream", text } });
      const res = await fetch(`${gateway.restUrl}/v1/responses`, {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "ok", input: "hi", stream: true }),
      });
      const events = (await res.text()).split("\n\n").filter(Boolean);
      expect(events.join("\n\n")).not.toContain("forged");
      expect(events.map((e) => e.slice(0, e.indexOf("\n")))).toEqual([
        "event: response.created",
        "event: response.output_text.delta",
        "event: error",
      ]);
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.UPSTREAM_ERROR });
    }
  });

  test("a response.failed mid-stream is passed on as it came and metered at its usage as the upstream's failure", async () => {
    const failed = {
      type: "response.failed",
      response: {
        id: "resp_fake",
        object: "response",
        status: "failed",
        model: "ok-fake",
        output: [],
        error: { code: "server_error", message: "The model failed." },
        usage: { input_tokens: 10, output_tokens: 2, total_tokens: 12 },
      },
    };
    upstream.script("ok", { content: "one two three", midEvent: failed });
    const stream = await sdk().responses.create({ model: "ok", input: "hi", stream: true });
    const types: string[] = [];
    for await (const event of stream) types.push(event.type);
    expect(types.at(-1)).toBe("response.failed");
    const row = gateway.shipper.rows.at(-1);
    expect(row).toMatchObject({ status: RequestStatus.UPSTREAM_ERROR, usageEstimated: false, costNanos: 10n * 2_500n + 2n * 10_000n });
  });
});

describe("client disconnect", () => {
  test("a client gone mid-stream aborts the upstream call and the request is metered as cancelled", async () => {
    upstream.script("ok", { content: "a b c d e f g h i j k l m n o p", chunkDelayMs: 50 });
    const controller = new AbortController();
    const stream = await sdk().responses.create(
      { model: "ok", input: "hi", stream: true },
      { signal: controller.signal },
    );
    let deltas = 0;
    await (async () => {
      for await (const event of stream) {
        if (event.type === "response.output_text.delta" && ++deltas === 2) controller.abort();
      }
    })().catch(() => undefined);
    const row = await eventually(() => gateway.shipper.rows.find((m) => m.status === RequestStatus.CANCELLED && m.endpoint === Endpoint.RESPONSES));
    expect(row.usageEstimated).toBe(true);
    expect(row.usage?.inputTokens).toBeGreaterThan(0n);
    expect(row.usage?.outputTokens).toBeGreaterThan(0n);
    expect(row.costNanos).toBeGreaterThan(0n);
    await eventually(() => upstream.seen("ok")[0]?.aborted, { what: "the upstream call aborted" });
  });
});

describe("time limits", () => {
  test("a stream past the whole-request limit ends with a request_timeout error event, metered at what it streamed", async () => {
    upstream.script("dribble", { content: "a b c d e f g h", chunkDelayMs: 100 });
    const stream = await sdk().responses.create({ model: "dribble", input: "hi", stream: true });
    let deltas = 0;
    const error = await (async () => {
      for await (const event of stream) if (event.type === "response.output_text.delta") deltas++;
    })().catch((e: unknown) => e);
    expect(deltas).toBeGreaterThan(0);
    expect(error).toBeInstanceOf(APIError);
    expect((error as APIError).error).toMatchObject({ code: "request_timeout" });
    const row = await eventually(() => gateway.shipper.rows.find((m) => m.errorCode === "request_timeout"));
    expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, status: RequestStatus.TIMEOUT, usageEstimated: true });
    expect(row.usage?.outputTokens).toBeGreaterThan(0n);
    await eventually(() => upstream.seen("dribble")[0]?.aborted, { what: "the upstream call aborted" });
  });
});

describe("refusals", () => {
  for (const type of ["web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation", "computer_use_preview"]) {
    test(`a hosted ${type} tool is refused with a 400 naming tools[i].type, before any upstream`, async () => {
      const error = (await sdk()
        .responses.create({
          model: "ok",
          input: "hi",
          tools: [{ type: "function", name: "f", parameters: {}, strict: false }, { type } as never],
        })
        .catch((e: unknown) => e)) as APIError;
      expect(error.status).toBe(400);
      expect(error.error).toMatchObject({ type: "invalid_request_error", param: "tools[1].type", code: "unsupported_value" });
      expect(upstream.requests).toHaveLength(0);
    });
  }

  test("a file or stored prompt named by id is refused with a 400 naming it, before any upstream, at no cost", async () => {
    // The gateway serves no Files or Prompts API: such an id could only name the upstream account's own, every org's.
    const file = { type: "input_file" as const, file_id: "file-of-the-upstream-account" };
    const cases: [OpenAI.Responses.ResponseCreateParamsNonStreaming, string][] = [
      [{ model: "ok", input: [{ role: "user", content: [file] }] }, "input[0].content[0].file_id"],
      [
        { model: "ok", input: [{ role: "user", content: [{ type: "input_image", file_id: "file-1", detail: "auto" }] }] },
        "input[0].content[0].file_id",
      ],
      [{ model: "ok", input: [{ type: "function_call_output", call_id: "c1", output: [file] }] }, "input[0].output[0].file_id"],
      [
        {
          model: "ok",
          input: [{ type: "computer_call_output", call_id: "c1", output: { type: "computer_screenshot", file_id: "file-1" } }],
        },
        "input[0].output.file_id",
      ],
      [{ model: "ok", prompt: { id: "pmpt_of_the_upstream_account", variables: { city: "Paris" } } }, "prompt"],
    ];
    const before = gateway.shipper.rows.length;
    for (const base of [gateway.restUrl, gateway.url]) {
      for (const [body, param] of cases) {
        for (const stream of [false, true]) {
          const error = (await sdk(base)
            .responses.create({ ...body, stream } as never)
            .catch((e: unknown) => e)) as APIError;
          expect(error.status).toBe(400);
          expect(error.error).toMatchObject({ type: "invalid_request_error", param, code: "unsupported_value" });
        }
      }
    }
    expect(upstream.requests).toHaveLength(0);
    await eventually(() => gateway.shipper.rows.length >= before + 4 * cases.length);
    for (const row of gateway.shipper.rows.slice(before)) expect(row.costNanos).toBe(0n);
  });

  test("a file given by its content or URL passes through", async () => {
    upstream.script("ok", { content: "fine" });
    const content = [
      { type: "input_file" as const, filename: "a.pdf", file_data: "data:application/pdf;base64,JVBERi0xLjQK" },
      { type: "input_file" as const, file_url: "https://example.com/a.pdf" },
      { type: "input_image" as const, image_url: "https://example.com/cat.png", detail: "auto" as const },
    ];
    await sdk().responses.create({ model: "ok", input: [{ role: "user", content }] });
    expect((upstream.seen("ok")[0]?.body.input as { content: unknown }[])[0]?.content).toEqual(content);
  });

  test("function and custom tools pass through", async () => {
    upstream.script("ok", { content: "fine" });
    const tools = [
      { type: "function" as const, name: "f", parameters: { type: "object" }, strict: true },
      { type: "custom" as const, name: "g" },
    ];
    await sdk().responses.create({ model: "ok", input: "hi", tools });
    expect(upstream.seen("ok")[0]?.body.tools).toEqual(tools);
  });

  test("a key not allowed the model gets 403 and the upstream is not called", async () => {
    const error = (await sdk(gateway.restUrl, "sk-limited").responses.create({ model: "fallback", input: "hi" }).catch((e: unknown) => e)) as APIError;
    expect(error.status).toBe(403);
    expect(error.error).toMatchObject({ code: "model_not_allowed" });
    expect(upstream.requests).toHaveLength(0);
  });

  test("bad fields are 400s in OpenAI's shape; a model that serves chat only is a 404", async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ input: 3 }, "input"],
      [{ input: [{ role: "robot", content: "x" }] }, "input[0].role"],
      [{ input: "x", max_output_tokens: 2 }, "max_output_tokens"],
      [{ input: "x", instructions: 5 }, "instructions"],
      [{ input: "x", user: "u".repeat(300) }, "user"],
      [{ input: "x", metadata: { k: 1 } }, "metadata.k"],
      [{ input: "x", background: true }, "background"],
      // A lenient upstream could take the string for true, and answer a response it bills no one for.
      [{ input: "x", background: "true" }, "background"],
      // Only the upstream account's own, every org's: the gateway serves no Conversations API to make one.
      [{ input: "x", conversation: "conv_123" }, "conversation"],
      [{ input: "x", conversation: { id: "conv_123" } }, "conversation"],
      // A call the model is made to make must be of a tool the client declared, which it can run.
      [{ input: "x", tool_choice: "required" }, "tool_choice"],
      [{ input: "x", tools: [], tool_choice: "required" }, "tool_choice"],
      [{ input: "x", tools: [{ type: "function", name: "f" }], tool_choice: { type: "function", name: "g" } }, "tool_choice.name"],
      [{ input: "x", tools: [{ type: "function", name: "f" }], tool_choice: { type: "custom", name: "f" } }, "tool_choice.name"],
      [{ input: "x", tools: [{ type: "function", name: "f" }], tool_choice: { type: "function" } }, "tool_choice.name"],
    ];
    for (const [body, param] of cases) {
      const res = await fetch(`${gateway.restUrl}/v1/responses`, {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model: "ok", ...body }),
      });
      expect(res.status).toBe(400);
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe(param);
    }
    const error = (await sdk().responses.create({ model: "chat-only", input: "hi" }).catch((e: unknown) => e)) as APIError;
    expect(error.status).toBe(404);
    expect(error.error).toMatchObject({ code: "model_not_supported" });
    expect(upstream.requests).toHaveLength(0);
  });
});

describe("the mock provider", () => {
  test("answers whole and streamed, deterministically, with usage from the input", async () => {
    const whole = await sdk().responses.create({ model: "mock", input: "echo this", max_output_tokens: 100 });
    expect(whole.output_text).toBe("mock reply: echo this");
    expect(whole.usage).toMatchObject({ input_tokens: 3 + 4 + 3, output_tokens: 6 });
    const stream = await sdk().responses.create({ model: "mock", input: [{ role: "user", content: "echo this" }], stream: true });
    let text = "";
    let completed: OpenAI.Responses.Response | undefined;
    for await (const event of stream) {
      if (event.type === "response.output_text.delta") text += event.delta;
      if (event.type === "response.completed") completed = event.response;
    }
    expect(text).toBe("mock reply: echo this");
    expect(completed?.usage).toMatchObject({ input_tokens: 3 + 4 + 3, output_tokens: 6 });
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ endpoint: Endpoint.RESPONSES, costNanos: 16_000n, usageEstimated: false });
  });
});

describe("response ids", () => {
  const raw = (path: string, init: RequestInit = {}, key = "sk-good", base = gateway.restUrl) =>
    fetch(`${base}${path}`, { ...init, headers: { authorization: `Bearer ${key}`, "content-type": "application/json" } });

  test("clients get the gateway's ids, the same for one upstream response however it is answered, never the upstream's", async () => {
    upstream.script("ok", { content: "hello" });
    const whole = await sdk().responses.create({ model: "ok", input: "hi" });
    expect(whole.id).toStartWith("resp_");
    expect(whole.id).not.toBe("resp_fake");
    const stream = await sdk().responses.create({ model: "ok", input: "hi", stream: true });
    const ids = new Set<string>();
    for await (const event of stream) if ("response" in event) ids.add(event.response.id);
    // created, in_progress and completed all carry it, as the whole answer does.
    expect([...ids]).toEqual([whole.id]);
    // Bound to the org: another org's id of the same upstream response differs.
    const other = await sdk(gateway.restUrl, "sk-limited").responses.create({ model: "ok", input: "hi" });
    expect(other.id).not.toBe(whole.id);
  });

  test("a chained response's previous_response_id is the client's id again, and the upstream is sent its own", async () => {
    upstream.script("ok", { content: "one" });
    const first = await sdk().responses.create({ model: "ok", input: "hi" });
    const second = await sdk().responses.create({ model: "ok", input: "more", previous_response_id: first.id });
    expect(upstream.seen("ok")[1]?.body.previous_response_id).toBe("resp_fake");
    expect(second.previous_response_id).toBe(first.id);
    const stream = await sdk().responses.create({ model: "ok", input: "more", previous_response_id: first.id, stream: true });
    const previous = new Set<unknown>();
    for await (const event of stream) if ("response" in event) previous.add(event.response.previous_response_id);
    expect([...previous]).toEqual([first.id]);
  });

  test("a project's responses and items are its own: its org's other projects and org-wide keys cannot name them", async () => {
    upstream.script("ok", { content: "project history" });
    const mine = await sdk().responses.create({ model: "ok", input: "hi" });
    const item = mine.output[0]?.id as string;
    // Another key of sk-good's project may.
    expect((await sdk(gateway.restUrl, "sk-proj1").responses.retrieve(mine.id)).output[0]?.id).toBe(item);
    upstream.reset();
    for (const key of ["sk-org", "sk-proj2"]) {
      const client = sdk(gateway.restUrl, key);
      const chained = (await client.responses
        .create({ model: "ok", input: "what did we say?", previous_response_id: mine.id })
        .catch((e: unknown) => e)) as APIError;
      expect(chained.status).toBe(400);
      expect((chained.error as { code?: string }).code).toBe("previous_response_not_found");
      const referenced = (await client.responses
        .create({ model: "ok", input: [{ type: "item_reference", id: item }] })
        .catch((e: unknown) => e)) as APIError;
      expect((referenced.error as { code?: string }).code).toBe("item_not_found");
      expect(((await client.responses.retrieve(mine.id).catch((e: unknown) => e)) as APIError).status).toBe(404);
    }
    expect(upstream.requests).toHaveLength(0);
    // An org-wide key's responses are likewise not a project's.
    const orgWide = await sdk(gateway.restUrl, "sk-org").responses.create({ model: "ok", input: "hi" });
    expect(((await sdk().responses.retrieve(orgWide.id).catch((e: unknown) => e)) as APIError).status).toBe(404);
  });

  test("another org's id, an altered one and an upstream's own are refused 400 alike, before any upstream call", async () => {
    upstream.script("ok", { content: "secret history" });
    const mine = await sdk().responses.create({ model: "ok", input: "hi" });
    upstream.reset();
    const flipped = `${mine.id.slice(0, -2)}${mine.id.at(-2) === "A" ? "B" : "A"}${mine.id.at(-1)}`;
    const cases: [string, string][] = [
      ["sk-limited", mine.id],
      ["sk-good", flipped],
      ["sk-good", "resp_fake"],
      ["sk-good", "not-an-id"],
    ];
    for (const [key, id] of cases) {
      const error = (await sdk(gateway.restUrl, key)
        .responses.create({ model: "ok", input: "what did we say?", previous_response_id: id })
        .catch((e: unknown) => e)) as APIError;
      expect(error.status).toBe(400);
      expect(error.error).toEqual({
        message: `Previous response with id '${id}' not found.`,
        type: "invalid_request_error",
        param: "previous_response_id",
        code: "previous_response_not_found",
      });
    }
    expect(upstream.requests).toHaveLength(0);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.INVALID_REQUEST, httpStatus: 400 });
  });

  test("a chain goes to the provider that made the response, not the model's first target; a model not there is a 400", async () => {
    upstream.script("left", { status: 500 });
    upstream.script("right", { content: "from the right" });
    const earlier = await sdk().responses.create({ model: "pair", input: "hi" });
    expect(earlier.output_text).toBe("from the right");
    upstream.reset();
    upstream.script("left", { content: "wrong account" });
    upstream.script("right", { content: "continued" });
    const next = await sdk().responses.create({ model: "pair", input: "and?", previous_response_id: earlier.id });
    expect(next.output_text).toBe("continued");
    expect(upstream.seen("left")).toHaveLength(0);
    expect(upstream.seen("right")[0]?.body.previous_response_id).toBe("resp_fake");
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ provider: "fake2", fallbackUsed: false });
    // `ok` has no target on fake2, which holds the response.
    const error = (await sdk()
      .responses.create({ model: "ok", input: "and?", previous_response_id: earlier.id })
      .catch((e: unknown) => e)) as APIError;
    expect(error.status).toBe(400);
    expect(error.error).toMatchObject({ param: "previous_response_id", type: "invalid_request_error" });
    expect(error.message).toContain("fake2");
    expect(upstream.seen("ok")).toHaveLength(0);
    // So does a request that references one of its items.
    const reference = { type: "item_reference" as const, id: earlier.output[0]?.id as string };
    await sdk().responses.create({ model: "pair", input: [reference, { role: "user", content: "and?" }] });
    expect(upstream.seen("left")).toHaveLength(0);
    expect(upstream.seen("right")[1]?.body.input[0]).toEqual({ ...reference, id: "msg_fake" });
    const elsewhere = (await sdk()
      .responses.create({ model: "ok", input: [reference] })
      .catch((e: unknown) => e)) as APIError;
    expect(elsewhere.status).toBe(400);
    expect(elsewhere.error).toMatchObject({ param: "input[0].id", type: "invalid_request_error" });
  });
});

describe("item ids", () => {
  const encrypted = "gAAAAB-reasoning-the-upstream-encrypted";
  // A turn of a reasoning model calling a tool, as OpenAI answers it.
  const toolTurn = {
    id: "resp_fake",
    object: "response",
    created_at: 1_700_000_000,
    status: "completed",
    error: null,
    incomplete_details: null,
    model: "ok-fake",
    previous_response_id: null,
    output: [
      { type: "reasoning", id: "rs_fake", summary: [], encrypted_content: encrypted },
      { type: "function_call", id: "fc_fake", call_id: "call_fake", name: "lookup", arguments: "{}", status: "completed" },
    ],
    usage: {
      input_tokens: 10,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: 5,
      output_tokens_details: { reasoning_tokens: 2 },
      total_tokens: 15,
    },
  };
  const tools = [{ type: "function" as const, name: "lookup", parameters: { type: "object", properties: {} }, strict: false }];

  test("output items have the client's ids, and the round trips of tool loops give the upstream its own", async () => {
    upstream.script("ok", { body: { contentType: "application/json", text: JSON.stringify(toolTurn) } });
    const include = ["reasoning.encrypted_content" as const];
    const turn = await sdk().responses.create({ model: "ok", input: "look it up", tools, store: false, include });
    const [reasoning, call] = turn.output as [OpenAI.Responses.ResponseReasoningItem, OpenAI.Responses.ResponseFunctionToolCall];
    expect(reasoning.id).toStartWith("rs_");
    expect(call.id).toStartWith("fc_");
    expect(JSON.stringify(turn)).not.toMatch(/rs_fake|fc_fake/);
    // A call id is not an item id: the tool's output names the call as the model did.
    expect(call.call_id).toBe("call_fake");
    expect(reasoning.encrypted_content).toBe(encrypted);

    // The whole turn given back with the tool's output, as the SDKs' tool loops do without store.
    upstream.reset();
    upstream.script("ok", { content: "42 it is" });
    const output = { type: "function_call_output" as const, call_id: call.call_id, output: "42" };
    const answer = await sdk().responses.create({
      model: "ok",
      input: [{ role: "user", content: "look it up" }, ...(turn.output as OpenAI.Responses.ResponseInputItem[]), output],
      tools,
      store: false,
      include,
    });
    expect(answer.output_text).toBe("42 it is");
    expect(upstream.seen("ok")[0]?.body.input).toEqual([{ role: "user", content: "look it up" }, ...toolTurn.output, output]);
    // A reference to the stored call, and a chain answering it by its call id alone.
    await sdk().responses.create({ model: "ok", input: [{ type: "item_reference", id: call.id as string }, output], tools });
    expect(upstream.seen("ok")[1]?.body.input).toEqual([{ type: "item_reference", id: "fc_fake" }, output]);
    await sdk().responses.create({ model: "ok", input: [output], previous_response_id: turn.id, tools });
    expect(upstream.seen("ok")[2]?.body).toMatchObject({ previous_response_id: "resp_fake", input: [output] });
  });

  test("a stateless tool loop goes first to the provider that made its items; other targets get them without ids or reasoning", async () => {
    // The first turn fell back to the second provider, another upstream account.
    upstream.script("left", { status: 500 });
    upstream.script("right", { body: { contentType: "application/json", text: JSON.stringify(toolTurn) } });
    const include = ["reasoning.encrypted_content" as const];
    const turn = await sdk().responses.create({ model: "pair", input: "look it up", tools, store: false, include });
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ provider: "fake2", fallbackUsed: true });
    const call = turn.output[1] as OpenAI.Responses.ResponseFunctionToolCall;
    const output = { type: "function_call_output" as const, call_id: call.call_id, output: "42" };
    const given = turn.output as OpenAI.Responses.ResponseInputItem[];
    const input = [{ role: "user" as const, content: "look it up" }, ...given, output];
    // The first account cannot read the second's reasoning, and says so as OpenAI does.
    const unreadable = {
      status: 400,
      error: {
        message: "The encrypted content gAAA...pted could not be verified.",
        type: "invalid_request_error",
        param: null,
        code: "invalid_encrypted_content",
      },
    };
    upstream.reset();
    upstream.script("left", unreadable);
    upstream.script("right", { content: "42 it is" }, { content: "42 it is" });
    const answer = await sdk().responses.create({ model: "pair", input, tools, store: false, include });
    expect(answer.output_text).toBe("42 it is");
    const streamed = await sdk().responses.stream({ model: "pair", input, tools, store: false, include }).finalResponse();
    expect(streamed.output_text).toBe("42 it is");
    expect(upstream.seen("left")).toHaveLength(0);
    const sent = [input[0], ...toolTurn.output, output];
    expect(upstream.seen("right").map((r) => r.body.input)).toEqual([sent, sent]);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ provider: "fake2", fallbackUsed: false });

    // That provider failing, the other account is sent the turn without what it cannot read: no item ids, no reasoning.
    upstream.reset();
    upstream.script("right", { status: 500 });
    upstream.script("left", { content: "from the left" });
    const fallen = await sdk().responses.create({ model: "pair", input, tools, store: false, include });
    expect(fallen.output_text).toBe("from the left");
    const { id: _, ...anonymous } = toolTurn.output[1] as Record<string, unknown>;
    expect(upstream.seen("left")[0]?.body.input).toEqual([input[0], anonymous, output]);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ provider: "fake", fallbackUsed: true });

    // A compaction's encrypted content holds the conversation: no other account is sent it, stripped or not.
    upstream.reset();
    const compaction = { type: "compaction", id: "cmp_fake", encrypted_content: encrypted };
    upstream.script("left", { status: 500 });
    const compactTurn = JSON.stringify({ ...toolTurn, output: [compaction] });
    upstream.script("right", { body: { contentType: "application/json", text: compactTurn } });
    const compacted = await sdk().responses.create({ model: "pair", input: "compact", store: false });
    upstream.reset();
    upstream.script("right", { status: 500 });
    upstream.script("left", { content: "never" });
    const error = (await sdk()
      .responses.create({
        model: "pair",
        input: [...(compacted.output as OpenAI.Responses.ResponseInputItem[]), { role: "user", content: "and then?" }],
        store: false,
      })
      .catch((e: unknown) => e)) as APIError;
    expect(error.status).toBe(502);
    expect(upstream.seen("left")).toHaveLength(0);
    // A model with no target on that provider is told so, asking no upstream.
    const elsewhere = (await sdk()
      .responses.create({ model: "ok", input: compacted.output as OpenAI.Responses.ResponseInputItem[], store: false })
      .catch((e: unknown) => e)) as APIError;
    expect(elsewhere.status).toBe(400);
    expect(elsewhere.error).toMatchObject({ param: "input[0].id", type: "invalid_request_error" });
    expect(elsewhere.message).toContain("fake2");
    expect(upstream.seen("ok")).toHaveLength(0);
  });

  test("a stream's events name its items by the ids a whole answer gives them, another org's ids differing", async () => {
    upstream.script("ok", { content: "hello" });
    const id = (await sdk().responses.create({ model: "ok", input: "hi" })).output[0]?.id;
    expect(id).toStartWith("msg_");
    expect(id).not.toBe("msg_fake");
    const stream = await sdk().responses.create({ model: "ok", input: "hi", stream: true });
    const ids = new Set<unknown>();
    let named = 0;
    for await (const event of stream) {
      if ("item_id" in event) ids.add(event.item_id);
      if ("item" in event) ids.add(event.item.id);
      if (event.type === "response.completed") ids.add(event.response.output[0]?.id);
      if ("item_id" in event || "item" in event) named++;
    }
    expect(named).toBeGreaterThan(3);
    expect([...ids]).toEqual([id]);
    const other = await sdk(gateway.restUrl, "sk-limited").responses.create({ model: "ok", input: "hi" });
    expect(other.output[0]?.id).not.toBe(id);
  });

  test("another org's item id, an altered one and an upstream's own are refused 400 naming the param, asking no upstream", async () => {
    upstream.script("ok", { content: "secret" });
    const made = await sdk().responses.create({ model: "ok", input: "hi" });
    const mine = made.output[0] as OpenAI.Responses.ResponseOutputMessage;
    const theirs = (await sdk(gateway.restUrl, "sk-limited").responses.create({ model: "ok", input: "hi" })).output[0]?.id as string;
    upstream.reset();
    const flipped = `${mine.id.slice(0, -2)}${mine.id.at(-2) === "A" ? "B" : "A"}${mine.id.at(-1)}`;
    const cases: [string, string][] = [
      ["sk-limited", mine.id],
      ["sk-good", flipped],
      ["sk-good", "msg_fake"],
      ["sk-good", `fc_${mine.id.slice(4)}`],
    ];
    for (const [key, id] of cases) {
      const inputs: [OpenAI.Responses.ResponseInputItem[], string][] = [
        [[{ type: "item_reference", id }], "input[0].id"],
        [[{ id } as OpenAI.Responses.ResponseInputItem.ItemReference], "input[0].id"],
        [[{ role: "user", content: "hi" }, { ...mine, id }], "input[1].id"],
        [[{ type: "mcp_approval_response", approval_request_id: id, approve: true }], "input[0].approval_request_id"],
      ];
      for (const [input, param] of inputs) {
        const error = (await sdk(gateway.restUrl, key)
          .responses.create({ model: "ok", input })
          .catch((e: unknown) => e)) as APIError;
        expect(error.status).toBe(400);
        expect(error.error).toEqual({ message: `Item with id '${id}' not found.`, type: "invalid_request_error", param, code: "item_not_found" });
      }
    }
    for (const after of [theirs, "msg_in"]) {
      const error = (await sdk().responses.inputItems.list(made.id, { after }).catch((e: unknown) => e)) as APIError;
      expect(error.status).toBe(400);
      expect(error.error).toMatchObject({ param: "after", code: "item_not_found" });
    }
    expect(upstream.requests).toHaveLength(0);
  });

  test("the mock provider's items round trip: a stream's output given back, listed by the same ids, a tool call answered", async () => {
    const first = await sdk().responses.stream({ model: "mock", input: "remember this" }).finalResponse();
    const message = first.output[0] as OpenAI.Responses.ResponseOutputMessage;
    expect(message.id).toStartWith("msg_");
    const next = await sdk().responses.create({
      model: "mock",
      input: [{ role: "user", content: "remember this" }, message, { role: "user", content: "and this" }],
    });
    expect(next.output_text).toBe("mock reply: and this");
    const items = await sdk().responses.inputItems.list(next.id, { order: "asc" });
    expect(items.data.map((item) => item.id)[1]).toBe(message.id);
    const called = await sdk().responses.create({ model: "mock", input: "look it up", tools, tool_choice: "required" });
    const call = called.output[0] as OpenAI.Responses.ResponseFunctionToolCall;
    expect(call.id).toStartWith("fc_");
    expect(call.call_id).toStartWith("call_");
    const answered = await sdk().responses.create({
      model: "mock",
      input: [{ type: "function_call_output", call_id: call.call_id, output: "42" }],
      previous_response_id: called.id,
      tools,
    });
    expect(answered.previous_response_id).toBe(called.id);
    const listed = await sdk().responses.inputItems.list(answered.id);
    expect(listed.data[0]).toMatchObject({ type: "function_call_output", call_id: call.call_id });
  });
});

for (const [port, base] of [
  ["REST port", () => gateway.restUrl],
  ["RPC port", () => gateway.url],
] as const) {
  describe(`stored responses on the ${port}`, () => {
    const raw = (path: string, method = "GET", key = "sk-good") =>
      fetch(`${base()}${path}`, { method, headers: { authorization: `Bearer ${key}` } });

    test("retrieve, delete and input items go to the provider that made it, by its id there; answered with the client's", async () => {
      upstream.script("right", { content: "stored" });
      upstream.script("left", { status: 500 });
      const made = await sdk(base()).responses.create({ model: "pair", input: "hi" });
      upstream.reset();
      const include = ["message.output_text.logprobs" as const];
      const { data: got, response } = await sdk(base()).responses.retrieve(made.id, { include }).withResponse();
      expect(got.id).toBe(made.id);
      expect(got.output_text).toBe("echo: stored");
      const [seen] = upstream.seen("response:resp_fake");
      expect(seen).toMatchObject({ method: "GET", path: "/v1/responses/resp_fake" });
      expect(decodeURIComponent(seen?.query ?? "")).toBe("?include[]=message.output_text.logprobs");
      const row = await gateway.row(response.headers.get("x-request-id") as string);
      expect(row).toMatchObject({ endpoint: Endpoint.RESPONSES, status: RequestStatus.OK, httpStatus: 200, provider: "fake2", costNanos: 0n });
      expect(row.usage).toBeUndefined();

      // Its items' ids are the client's too, and so is a page's `after`.
      const first = await sdk(base()).responses.inputItems.list(made.id);
      const itemId = first.data[0]?.id as string;
      expect(itemId).toStartWith("msg_");
      expect(itemId).not.toBe("msg_in");
      const listedWhole = await (await raw(`/v1/responses/${made.id}/input_items`)).json();
      expect(listedWhole).toMatchObject({ first_id: itemId, last_id: itemId, data: [{ id: itemId }] });
      const page = await sdk(base()).responses.inputItems.list(made.id, { limit: 5, order: "asc", after: itemId });
      expect(page.data.map((item) => item.id)).toEqual([itemId]);
      const listed = upstream.requests.at(-1);
      expect(listed?.path).toBe("/v1/responses/resp_fake/input_items");
      expect(new URLSearchParams(listed?.query)).toEqual(new URLSearchParams({ limit: "5", order: "asc", after: "msg_in" }));

      await sdk(base()).responses.delete(made.id);
      expect(upstream.requests.at(-1)).toMatchObject({ method: "DELETE", path: "/v1/responses/resp_fake" });
      const deleted = await raw(`/v1/responses/${made.id}`, "DELETE");
      expect(await deleted.json()).toEqual({ id: made.id, object: "response", deleted: true });
    });

    test("another org's id, an altered or an upstream's own is 404 in OpenAI's shape, asking no upstream", async () => {
      upstream.script("ok", { content: "mine" });
      const mine = await sdk(base()).responses.create({ model: "ok", input: "hi" });
      upstream.reset();
      for (const [key, id] of [["sk-limited", mine.id], ["sk-good", `${mine.id}x`], ["sk-good", "resp_fake"]] as const) {
        for (const path of [`/v1/responses/${id}`, `/v1/responses/${id}/input_items`]) {
          for (const method of path.endsWith("input_items") ? ["GET"] : ["GET", "DELETE"]) {
            const res = await raw(path, method, key);
            expect(res.status).toBe(404);
            expect(await res.json()).toEqual({
              error: { message: `Response with id '${id}' not found.`, type: "invalid_request_error", param: null, code: "response_not_found" },
            });
          }
        }
      }
      expect(upstream.requests).toHaveLength(0);
      expect((await raw(`/v1/responses/${mine.id}`, "GET", "sk-nope")).status).toBe(401);
    });

    test("the upstream's 404 is the id's 404, its refusal passed on, its 429 with its wait, its failure a 502; stream=true and POST are refused", async () => {
      upstream.script("ok", { content: "mine" });
      const mine = await sdk(base()).responses.create({ model: "ok", input: "hi" });
      upstream.script("response:resp_fake", { status: 404, error: { message: "Response with id 'resp_fake' not found." } });
      const gone = (await sdk(base()).responses.retrieve(mine.id).catch((e: unknown) => e)) as APIError;
      expect(gone.status).toBe(404);
      expect(gone.error).toMatchObject({ message: `Response with id '${mine.id}' not found.`, code: "response_not_found" });
      upstream.script("response:resp_fake", { status: 400, error: { message: "Invalid include.", param: "include", code: "invalid_value" } });
      const bad = (await sdk(base()).responses.inputItems.list(mine.id).catch((e: unknown) => e)) as APIError;
      expect(bad.status).toBe(400);
      expect(bad.error).toMatchObject({ message: "Invalid include.", param: "include", code: "invalid_value" });
      upstream.script("response:resp_fake", { status: 429, retryAfter: "30" }, { status: 429, retryAfterMs: "300" });
      for (const [seconds, ms] of [["30", "30000"], ["1", "300"]] as const) {
        const limited = await raw(`/v1/responses/${mine.id}`);
        expect(limited.status).toBe(429);
        expect([limited.headers.get("retry-after"), limited.headers.get("retry-after-ms")]).toEqual([seconds, ms]);
      }
      upstream.script("response:resp_fake", { status: 500 });
      const failed = await raw(`/v1/responses/${mine.id}`);
      expect(failed.status).toBe(502);
      expect(JSON.stringify(await failed.json())).not.toContain("resp_fake");
      expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.UPSTREAM_ERROR, httpStatus: 502, provider: "fake" });
      const streamed = await raw(`/v1/responses/${mine.id}?stream=true`);
      expect(streamed.status).toBe(400);
      expect(((await streamed.json()) as { error: { param: string } }).error.param).toBe("stream");
      const posted = await raw(`/v1/responses/${mine.id}`, "POST");
      expect(posted.status).toBe(405);
      expect(posted.headers.get("allow")).toBe("GET, HEAD, DELETE");
      expect((await raw(`/v1/responses/${mine.id}/cancel`, "POST")).status).toBe(404);
    });
  });
}

describe("stored responses and the key's rate limit", () => {
  test("retrieve, delete and input items count against the key's requests per minute, a 429 past it asking no upstream", async () => {
    upstream.script("ok", { content: "stored" });
    const made = await sdk().responses.create({ model: "ok", input: "hi" });
    upstream.reset();
    // sk-rpm is of sk-good's project, 3 requests a minute.
    const limited = sdk(gateway.restUrl, "sk-rpm");
    const { response } = await limited.responses.retrieve(made.id).withResponse();
    expect(response.headers.get("x-ratelimit-limit-requests")).toBe("3");
    expect(response.headers.get("x-ratelimit-remaining-requests")).toBe("2");
    await limited.responses.inputItems.list(made.id);
    await limited.responses.delete(made.id);
    expect(upstream.requests).toHaveLength(3);
    for (const call of [() => limited.responses.retrieve(made.id), () => limited.responses.create({ model: "ok", input: "hi" })]) {
      const error = (await call().catch((e: unknown) => e)) as APIError;
      expect(error.status).toBe(429);
      expect(error.error).toMatchObject({ type: "requests", code: "rate_limit_exceeded" });
      expect(Number(error.headers?.get("retry-after"))).toBeGreaterThan(0);
      expect(error.headers?.get("x-ratelimit-remaining-requests")).toBe("0");
    }
    expect(upstream.requests).toHaveLength(3);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.RATE_LIMITED, httpStatus: 429 });
  });
});

describe("the mock provider's stored responses", () => {
  test("are retrieved, listed, continued and deleted offline; one made with store: false is not kept", async () => {
    const first = await sdk().responses.create({ model: "mock", input: "remember this" });
    const got = await sdk().responses.retrieve(first.id);
    expect(got.id).toBe(first.id);
    expect(got.output_text).toBe("mock reply: remember this");
    const items = await sdk().responses.inputItems.list(first.id);
    expect(items.data).toMatchObject([{ type: "message", role: "user", content: [{ type: "input_text", text: "remember this" }] }]);
    const next = await sdk().responses.create({ model: "mock", input: "and then", previous_response_id: first.id });
    expect(next.previous_response_id).toBe(first.id);
    await sdk().responses.delete(first.id);
    expect(((await sdk().responses.retrieve(first.id).catch((e: unknown) => e)) as APIError).status).toBe(404);
    const continued = (await sdk()
      .responses.create({ model: "mock", input: "more", previous_response_id: first.id })
      .catch((e: unknown) => e)) as APIError;
    expect(continued.status).toBe(400);
    // In the client's words: its id, not the upstream's.
    expect(continued.error).toEqual({
      message: `Previous response with id '${first.id}' not found.`,
      type: "invalid_request_error",
      param: "previous_response_id",
      code: "previous_response_not_found",
    });
    const streamed = (await sdk()
      .responses.create({ model: "mock", input: "more", previous_response_id: first.id, stream: true })
      .catch((e: unknown) => e)) as APIError;
    expect(streamed.status).toBe(400);
    expect(streamed.message).toContain(first.id);
    const unkept = await sdk().responses.create({ model: "mock", input: "forget this", store: false });
    expect(((await sdk().responses.retrieve(unkept.id).catch((e: unknown) => e)) as APIError).status).toBe(404);
    // Streamed responses are kept too.
    const stream = await sdk().responses.create({ model: "mock", input: "streamed", stream: true });
    let id = "";
    for await (const event of stream) if (event.type === "response.completed") id = event.response.id;
    expect((await sdk().responses.retrieve(id)).output_text).toBe("mock reply: streamed");
  });
});
