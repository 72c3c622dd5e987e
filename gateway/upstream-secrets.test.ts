import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { trace } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import type { Server } from "bun";
import { ConfigError } from "../lib/config.ts";
import { setupTelemetry } from "../lib/telemetry.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { parseGatewayConfig } from "./config.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp } from "./http/app.ts";
import { createProviders } from "./providers/index.ts";
import { createBillingFake, createRecordingShipper, createTestLogger } from "./testing.ts";

// Upstreams quote the key they were sent in their errors: no key the gateway holds reaches its logs, spans or clients.
const openaiKey = "sk-proj-UPSTREAMSECRET1234567890";
const azureKey = "0123456789abcdefAZURESECRETabcdef";
const adminToken = "admin-token-ADMINSECRET-0123456789";
// A key given in a provider's `headers`, as proxies such as Portkey or Helicone take theirs, and a short one.
const headerKey = "pk-HEADERSECRET-0123456789";
const shortHeaderKey = "SHORTKY9x";
const secrets = [openaiKey, azureKey, adminToken, headerKey, shortHeaderKey, "UPSTREAMSECRET", "AZURESECRET", "ADMINSECRET", "HEADERSECRET"];

/** How the upstream fails, by the model asked for; every failure quotes the key it was sent, and the admin token. */
function quotingUpstream(): Server<undefined> {
  return Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      const body = (await req.json()) as { model: string };
      const key =
        req.headers.get("x-portkey-api-key") ??
        req.headers.get("api-key") ??
        req.headers.get("authorization")?.replace(/^Bearer /, "") ??
        "";
      const extra = req.headers.get("x-short-key");
      const quoted = `${key} (admin ${adminToken})${extra ? ` (short ${extra})` : ""}`;
      if (body.model === "refuses") {
        const error = { message: `Incorrect API key provided: ${quoted}`, type: "invalid_request_error", code: "invalid_api_key" };
        return Response.json({ error }, { status: 401 });
      }
      if (body.model === "breaks") return new Response(`upstream fault; request had authorization=Bearer ${quoted}`, { status: 500 });
      if (body.model === "rejects") {
        return Response.json({ error: { message: `key ${quoted} may not ask this`, type: "invalid_request_error" } }, { status: 400 });
      }
      // "cuts": one chunk, then an error event; "cuts-bare": then an error without the {"error": ...} wrapper.
      const chunk = { id: "c", object: "chat.completion.chunk", created: 1, model: "cuts", choices: [{ index: 0, delta: { content: "hi" }, finish_reason: null }] };
      const error =
        body.model === "cuts-bare"
          ? `data: ${JSON.stringify({ object: "error", message: `Invalid key Bearer ${quoted}` })}`
          : `event: error\ndata: ${JSON.stringify({ error: { message: `key ${quoted} revoked` } })}`;
      const text = `data: ${JSON.stringify(chunk)}\n\n${error}\n\n`;
      return new Response(text, { headers: { "content-type": "text/event-stream" } });
    },
  });
}

let upstream: Server<undefined>;
const exporter = new InMemorySpanExporter();
let setup: ReturnType<typeof build>;

function build(keys: Record<string, string> = { FAKE_KEY: openaiKey, AZFAKE_KEY: azureKey }) {
  const base = `http://127.0.0.1:${upstream.port}`;
  const config = parseGatewayConfig(
    `
providers:
  - { name: fake, kind: openai, base_url: "${base}/v1", api_key_env: FAKE_KEY }
  - { name: azfake, kind: azure, base_url: "${base}", api_key_env: AZFAKE_KEY }
  - name: hdrfake
    kind: openai
    base_url: "${base}/v1"
    headers: { x-portkey-api-key: "${headerKey}", x-short-key: "${shortHeaderKey}", x-app-name: "gateway" }
models:
${["fake", "azfake", "hdrfake"]
  .flatMap((provider) =>
    ["refuses", "breaks", "rejects", "cuts", "cuts-bare"].map(
      (model) => `  - { name: ${provider}-${model}, targets: [{ provider: ${provider}, model: ${model} }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`,
    ),
  )
  .join("\n")}
`,
    "secrets.yaml",
  );
  const billing = createBillingFake({ "sk-good": { id: "key_good", orgId: "org_1" } });
  const log = createTestLogger();
  const core = createGatewayCore({
    config,
    providers: createProviders(config.providers, keys, { secrets: [adminToken] }),
    keys: createKeyAuthorizer({ billing: billing.client }),
    shipper: createRecordingShipper(),
    instanceId: "gw-test",
    log,
  });
  // The global tracer provider (withChildSpan's) is the first one set in the process unless it is reset.
  trace.disable();
  const { tracer } = setupTelemetry({ service: "gateway-test", version: "0", exporter });
  const app = createRestApp({ core, tracer, maxBodyBytes: 64 * 1024 });
  const ask = async (model: string, stream = false) => {
    const res = await app.fetch(
      new Request("http://gateway.test/v1/chat/completions", {
        method: "POST",
        headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
        body: JSON.stringify({ model, messages: [{ role: "user", content: "hello" }], stream }),
      }),
    );
    return { status: res.status, text: await res.text() };
  };
  return { log, ask };
}

beforeAll(() => {
  upstream = quotingUpstream();
  setup = build();
});

afterAll(() => upstream.stop(true));

/** Every span status message, attribute and event exported so far, as text. */
function exported(): string {
  return exporter
    .getFinishedSpans()
    .map((s) => JSON.stringify({ name: s.name, status: s.status, attributes: s.attributes, events: s.events }))
    .join("\n");
}

function expectNoSecret(text: string) {
  for (const secret of secrets) expect(text).not.toContain(secret);
}

describe.each(["fake", "azfake", "hdrfake"])("a %s upstream quoting its key", (provider) => {
  test("in a 401 and a 500: not in the logs, the upstream call's span status or the answer", async () => {
    for (const model of ["refuses", "breaks"]) {
      const before = { lines: setup.log.lines.length, spans: exporter.getFinishedSpans().length };
      const { status, text } = await setup.ask(`${provider}-${model}`);
      expect(status).toBe(502);
      expectNoSecret(text);
      const lines = setup.log.lines.slice(before.lines).join("");
      expect(lines).toContain("upstream attempt failed");
      expect(lines).toContain("[redacted]");
      expectNoSecret(lines);
      const attempt = exporter
        .getFinishedSpans()
        .slice(before.spans)
        .find((s) => s.name.startsWith("chat ") && s.attributes["error.type"] !== undefined);
      expect(attempt?.status.message).toContain(`${provider} answered ${model === "refuses" ? 401 : 500}: `);
      expect(attempt?.status.message).toContain("[redacted]");
      expectNoSecret(exported());
    }
  });

  test("in a refusal passed on to the client (400)", async () => {
    const { status, text } = await setup.ask(`${provider}-rejects`);
    expect(status).toBe(400);
    expect(text).toContain("[redacted]");
    expectNoSecret(text);
    expectNoSecret(exported());
  });

  test.each(["cuts", "cuts-bare"])("in a mid-stream error event (%s): not in the logs, the spans or the stream", async (model) => {
    const before = setup.log.lines.length;
    const { status, text } = await setup.ask(`${provider}-${model}`, true);
    expect(status).toBe(200);
    expectNoSecret(text);
    // The client hears of the failure in the gateway's words only, after the chunk that came before it.
    const events = text.split("\n\n").filter((e) => e.startsWith("data: {"));
    expect(events.map((e) => Object.keys(JSON.parse(e.slice(6))).includes("error"))).toEqual([false, true]);
    expect(text).toContain("failed mid-stream");
    expect(text).not.toContain("Invalid key");
    const lines = setup.log.lines.slice(before).join("");
    expect(lines).toContain("upstream stream failed");
    expect(lines).toContain("[redacted]");
    expectNoSecret(lines);
    expectNoSecret(exported());
  });
});

// A Secret made from a file (`kubectl create secret --from-file`, an `echo key > file`) holds the key's line break; fetch
// sends the key without it, and the upstream quotes it so.
describe.each(["fake", "azfake"])("a %s key read with whitespace around it", (provider) => {
  test("is redacted where the upstream quotes it, in the answer and the logs", async () => {
    const padded = build({ FAKE_KEY: `${openaiKey}\n`, AZFAKE_KEY: ` ${azureKey}\r\n` });
    const before = padded.log.lines.length;
    for (const model of ["refuses", "rejects"]) {
      const { status, text } = await padded.ask(`${provider}-${model}`);
      expect(status).toBe(model === "refuses" ? 502 : 400);
      expectNoSecret(text);
    }
    const lines = padded.log.lines.slice(before).join("");
    expect(lines).toContain("[redacted]");
    expectNoSecret(lines);
    expectNoSecret(exported());
  });
});

test("a key variable holding only whitespace is an unset one: heard of at start, not sent as an empty bearer", () => {
  const config = parseGatewayConfig(
    `providers: [{ name: blank, kind: openai, api_key_env: BLANK_KEY }]
models: [{ name: m, targets: [{ provider: blank, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }]`,
    "blank.yaml",
  );
  const missing: string[] = [];
  createProviders(config.providers, { BLANK_KEY: " \n" }, { onMissingKey: (provider, variable) => missing.push(`${provider} ${variable}`) });
  expect(missing).toEqual(["blank BLANK_KEY"]);
});

test("a key fetch could never send (a … or a zero-width space copied with it) stops the start, naming its variable, not the key", () => {
  const config = parseGatewayConfig(
    `providers:
  - { name: copied, kind: openai, base_url: "http://127.0.0.1:1/v1", api_key_env: COPIED_KEY }
  - { name: az, kind: azure, base_url: "https://x.openai.azure.com/", api_key_env: AZ_KEY }
models: [{ name: m, targets: [{ provider: copied, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }]`,
    "copied.yaml",
  );
  const refusal = (env: Record<string, string>) => {
    try {
      createProviders(config.providers, env);
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError);
      return (e as Error).message;
    }
    return undefined;
  };
  const message = refusal({ COPIED_KEY: "sk-proj-0123456789…", AZ_KEY: "0123456789abcdef\u200b0123456789abcdef" });
  expect(message).toStartWith("invalid environment: COPIED_KEY (provider copied), AZ_KEY (provider az): the key holds a character no HTTP header may carry");
  expect(message).not.toContain("0123456789");
  // Spaces and Latin-1 go as fetch sends them; an upstream that refuses them says so.
  expect(refusal({ COPIED_KEY: "sk-proj 0123456789", AZ_KEY: "0123456789abcdef\u00a0" })).toBeUndefined();
});
