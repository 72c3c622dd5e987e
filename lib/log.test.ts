import { expect, test } from "bun:test";
import { trace } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { createLogger, createOutageLog, redactSecrets } from "./log.ts";
import { setupTelemetry, withChildSpan } from "./telemetry.ts";

test("one JSON object per line, secrets redacted, trace ids from the active span", () => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", level: "info", write: (l) => lines.push(l) }).child({ component: "c" });
  const { tracer } = setupTelemetry({ service: "t", version: "0", exporter: new InMemorySpanExporter() });
  log.debug("hidden");
  tracer.startActiveSpan("work", (span) => {
    log.info("hello", { authorization: "Bearer sk-secret", api_key: "sk-secret", count: 3n, err: new Error("boom") });
    span.end();
  });
  expect(lines).toHaveLength(1);
  const line = lines[0] ?? "";
  expect(line.endsWith("\n")).toBe(true);
  expect(line).not.toContain("sk-secret");
  const record = JSON.parse(line);
  expect(record).toMatchObject({
    level: "info",
    service: "t",
    msg: "hello",
    component: "c",
    authorization: "[redacted]",
    api_key: "[redacted]",
    count: "3",
    err: { name: "Error", message: "boom" },
  });
  expect(record.trace_id).toMatch(/^[0-9a-f]{32}$/);
  expect(record.span_id).toMatch(/^[0-9a-f]{16}$/);
  expect(trace.getActiveSpan()).toBeUndefined();
});

test("fields named as secrets are redacted, counts of tokens are not", () => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", write: (l) => lines.push(l) });
  const secrets = { token: "a", admin_token: "b", accessToken: "c", client_secret: "d", db_password: "e", cookie: "f" };
  const counts = { input_tokens: 5, tokens: 7, token_count: 3, monthly_tokens: 9, tokens_per_minute: 60 };
  log.info("x", { ...secrets, ...counts });
  const record = JSON.parse(lines[0] ?? "");
  for (const name of Object.keys(secrets)) expect(record[name]).toBe("[redacted]");
  expect(record).toMatchObject(counts);
});

test("key-shaped words in messages and text fields are redacted", () => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", write: (l) => lines.push(l) });
  const refusal = "Incorrect API key provided: sk-proj-****************abcd. You can find your API key at https://x.";
  log.warn("upstream attempt failed", { err: new Error(refusal), detail: "sent Bearer abc123 and sk-mesh-0123456789" });
  const record = JSON.parse(lines[0] ?? "");
  expect(record.err.message).toBe("Incorrect API key provided: [redacted] You can find your API key at https://x.");
  expect(record.detail).toBe("sent [redacted] and [redacted]");
  expect(lines[0]).not.toContain("abcd");
});

test("a JWT (an Entra ID access token) is redacted wherever it stands", () => {
  const jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZSJ9.c2lnbmF0dXJlX3NpZ25hdHVyZQ";
  expect(redactSecrets(`token ${jwt} has expired; "${jwt}"`)).toBe('token [redacted] has expired; "[redacted]"');
  expect(redactSecrets("eyJ is no token, nor eyJabc.def")).toBe("eyJ is no token, nor eyJabc.def");
});

test("keys of other shapes, and known secrets of any shape, are redacted", () => {
  const text = "gsk_abcdef0123456789abcdef xai-abcdef0123456789abcdef api-key: 0123456789abcdef, api_key=hunter22hunter22";
  expect(redactSecrets(text)).toBe("[redacted] [redacted] [redacted], [redacted]");
  expect(redactSecrets("model xai-grok-2 of provider xai-eu, api_key_env: XAI_KEY")).toBe(
    "model xai-grok-2 of provider xai-eu, api_key_env: XAI_KEY",
  );
  // Longest first (as the gateway passes them), a long key goes wherever it stands, encoded too.
  expect(redactSecrets("quoted 0123456789abcdefAZURE and 0123456789abcdef", ["0123456789abcdefAZURE", "0123456789abcdef"]))
    .toBe("quoted [redacted] and [redacted]");
  const long = "0123456789abcdef0123/+=";
  const quoted = `key=${long}, sent (${long}), url ?alt=sse&key%3D${encodeURIComponent(long)}, json "\n${long}"`;
  expect(redactSecrets(quoted, [long])).toBe('key=[redacted], sent ([redacted]), url ?alt=sse&key%3D[redacted], json "\n[redacted]"');
  // A shorter key (a self-hosted server's) goes where it is a word of its own, not from inside other words.
  expect(redactSecrets("Invalid API key: vllm-key-12. Try vllm-key-123", ["vllm-key-12"])).toBe(
    "Invalid API key: [redacted]. Try vllm-key-123",
  );
  expect(redactSecrets("short keys stay: abc, ollama", ["abc", "ollama"])).toBe("short keys stay: abc, ollama");
});

test("a failed span's status message is redacted as logs are", () => {
  const exporter = new InMemorySpanExporter();
  // The global tracer provider (withChildSpan's) is the first one set in the process unless it is reset.
  trace.disable();
  const { tracer } = setupTelemetry({ service: "t", version: "0", exporter });
  tracer.startActiveSpan("request", (span) => {
    expect(() =>
      withChildSpan("attempt", {}, () => {
        throw new Error("fake answered 401: Incorrect API key provided: sk-proj-SECRET123456, Bearer abcdef");
      }),
    ).toThrow();
    span.end();
  });
  const attempt = exporter.getFinishedSpans().find((s) => s.name === "attempt");
  expect(attempt?.status.message).toBe("fake answered 401: Incorrect API key provided: [redacted], [redacted]");
});

test("an outage is logged once at its level, its repeats at debug, and its end once", () => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", level: "debug", write: (l) => lines.push(l) });
  const outage = createOutageLog(log, { failed: "store down", recovered: "store answers again" });
  outage.recovered();
  for (let i = 0; i < 3; i++) outage.failed({ attempt: i });
  outage.recovered();
  outage.recovered();
  outage.failed();
  const said = lines.map((l) => JSON.parse(l) as { level: string; msg: string });
  expect(said.map((l) => `${l.level} ${l.msg}`)).toEqual([
    "warn store down",
    "debug store down",
    "debug store down",
    "info store answers again",
    "warn store down",
  ]);
  const end = JSON.parse(lines[3] as string) as { outage_ms: number; failures: number };
  expect(end.failures).toBe(3);
  expect(end.outage_ms).toBeGreaterThanOrEqual(0);
});

test("an entry stays one line for readers that also break lines at NEL and the Unicode separators", () => {
  const lines: string[] = [];
  const log = createLogger({ service: "t", write: (l) => lines.push(l) });
  const text = "a\u0085b\u2028c\u2029d\u009be";
  log.warn("upstream said", { detail: text });
  const line = lines[0] ?? "";
  expect(line).not.toMatch(/[\u0080-\u009f\u2028\u2029]/);
  expect(line.split(/\r\n|[\n\v\f\r\x1c-\x1e\x85\u2028\u2029]/).filter(Boolean)).toHaveLength(1);
  expect(JSON.parse(line).detail).toBe(text);
});
