import { afterAll, beforeAll, expect, test } from "bun:test";
import net from "node:net";
import { isValid as isUlid } from "ulid";
import { RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { type FakeUpstream, startFakeUpstream } from "../testing/fake-upstream.ts";
import { oneModelRoutes, startTestGateway } from "../testing/served-gateway.ts";
import { createTestLogger } from "../testing.ts";
import { expectDrainClosesKeptAlive, sendRegardless } from "../../lib/testing.ts";
import { serveRest } from "./bun.ts";

// The REST port's connection limits: a request must arrive without long pauses, an answer may take as long as the
// gateway's own time limits allow, and an idle connection is closed.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
const idleSeconds = 1;
const bodySeconds = 10;

beforeAll(async () => {
  upstream = startFakeUpstream();
  gateway = await startTestGateway(
    oneModelRoutes(upstream.url),
    { idleTimeoutSeconds: idleSeconds, requestBodyTimeoutSeconds: bodySeconds },
  );
});
afterAll(async () => {
  await gateway.close();
  upstream.stop();
});

/** A raw connection to the REST port: what it has received, and a promise of its closing. */
function connect() {
  const { port } = new URL(gateway.restUrl);
  const socket = net.connect(Number(port), "127.0.0.1");
  const state = { received: "", closedAt: 0 };
  socket.on("data", (d) => {
    state.received += d.toString();
  });
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()));
  socket.on("error", () => {});
  return { socket, state, closed };
}

const chat = (stream = false) =>
  JSON.stringify({ model: "ok", messages: [{ role: "user", content: "hello" }], ...(stream ? { stream: true } : {}) });
const head = (length: number) =>
  `POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`;

test("a request whose body stops arriving is cut off", async () => {
  const { socket, state, closed } = connect();
  const body = chat();
  socket.write(head(body.length) + body.slice(0, 10));
  await closed;
  expect(state.received).toBe("");
  expect(upstream.requests).toHaveLength(0);
}, 15_000);

test("a client that breaks off while sending its body is metered as cancelled (499), on either port", async () => {
  for (const url of [gateway.restUrl, gateway.url]) {
    const before = gateway.shipper.rows.length;
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    socket.on("error", () => {});
    socket.write(head(1000) + chat().slice(0, 10));
    await Bun.sleep(200);
    socket.destroy();
    for (let i = 0; i < 100 && gateway.shipper.rows.length === before; i++) await Bun.sleep(20);
    const row = gateway.shipper.rows.at(-1);
    expect(gateway.shipper.rows.length).toBe(before + 1);
    expect(row).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
  }
}, 15_000);

test("a body trickling in for longer than the idle limit is read and answered, within its own limit", async () => {
  upstream.script("ok", {});
  const { socket, state, closed } = connect();
  const body = chat();
  socket.write(head(body.length));
  // A byte every 500 ms for several times the idle limit: never silent for long, but slow.
  const slow = body.slice(0, 12);
  for (const byte of slow) {
    socket.write(byte);
    await Bun.sleep(500);
  }
  socket.write(body.slice(slow.length));
  for (let i = 0; i < 40 && !state.received; i++) await Bun.sleep(50);
  expect(state.received).toStartWith("HTTP/1.1 200");
  socket.destroy();
  await closed;
}, 15_000);

test("an answer may be silent for longer than the idle limit, whole or streamed", async () => {
  upstream.script("ok", { delayMs: 2500 });
  const whole = await fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: chat(),
  });
  expect(whole.status).toBe(200);
  expect(((await whole.json()) as { choices: unknown[] }).choices).toHaveLength(1);

  upstream.script("ok", { content: "one two", chunkDelayMs: 1500 });
  const streamed = await fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: chat(true),
  });
  const text = await streamed.text();
  expect(text).toContain("two");
  expect(text.trimEnd().endsWith("data: [DONE]")).toBe(true);
}, 30_000);

test("a connection left idle after its answer is closed", async () => {
  upstream.script("ok", {});
  const { socket, state, closed } = connect();
  const body = chat();
  socket.write(head(body.length) + body);
  await closed;
  expect(state.received).toStartWith("HTTP/1.1 200");
}, 15_000);

test("a body far past the limit gets OpenAI's 413, declared or streamed", async () => {
  const huge = "x".repeat(1024 * 1024);
  const before = upstream.requests.length;
  const declared = await fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: huge,
  });
  const streamed = await fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: new Blob([huge]).stream(),
  });
  for (const res of [declared, streamed]) {
    expect(res.status).toBe(413);
    expect(res.headers.get("x-request-id")).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("request_too_large");
  }
  expect(upstream.requests).toHaveLength(before);
});

test("a body refused before it is all read closes its connection: what is still coming is not read, on either port", async () => {
  const most = 256 * 1024 * 1024;
  for (const url of [gateway.restUrl, gateway.url]) {
    // A client that sends on regardless of the answer, as one streaming a large upload does.
    const { received, sent } = await sendRegardless(
      url,
      "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\n" +
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
      "x".repeat(0x100000),
      most,
    );
    expect(received).toStartWith("HTTP/1.1 413");
    expect(received.toLowerCase()).toContain("connection: close");
    expect(sent).toBeLessThan(most);
  }
}, 30_000);

test("a request without a usable Host (HTTP/1.0, an empty Host) is routed by its whole path, on either port", async () => {
  const body = chat();
  const send = async (url: string, requestLine: string, host: string) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    let received = "";
    socket.on("data", (d) => (received += d.toString()));
    socket.on("error", () => {});
    const closed = new Promise((resolve) => socket.on("close", resolve));
    socket.write(`${requestLine}\r\n${host}Authorization: Bearer sk-good\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    await closed;
    return received;
  };
  for (const url of [gateway.restUrl, gateway.url]) {
    upstream.script("ok", {});
    expect(await send(url, "POST /v1/chat/completions HTTP/1.0", "")).toStartWith("HTTP/1.1 200");
    upstream.script("ok", {});
    expect(await send(url, "POST /v1/chat/completions HTTP/1.1", "Host:\r\n")).toStartWith("HTTP/1.1 200");
    const before = upstream.requests.length;
    // The rest of the path is not the API's, whatever comes after it.
    expect(await send(url, "POST /elsewhere/v1/chat/completions HTTP/1.0", "")).toStartWith("HTTP/1.1 404");
    expect(await send(url, "POST /x/v1/chat/completions HTTP/1.1", "Host:\r\n")).toStartWith("HTTP/1.1 404");
    expect(upstream.requests).toHaveLength(before);
  }
});

test("a failure that escapes the app is answered and logged under one request id", async () => {
  const log = createTestLogger();
  const failing = {
    handle: () => Promise.reject(new Error("boom")),
    fetch: () => Promise.reject(new Error("boom")),
  };
  const server = serveRest(failing, { port: 0, hostname: "127.0.0.1", maxBodyBytes: 1024, log });
  try {
    const res = await fetch(`${server.url}/v1/models`);
    expect(res.status).toBe(500);
    const requestId = res.headers.get("x-request-id") ?? "";
    expect(isUlid(requestId)).toBe(true);
    const lines = log.lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.filter((l) => l.msg === "rest handler failed").map((l) => l.request_id)).toEqual([requestId]);
  } finally {
    await server.close(0);
  }
});

test("draining, a kept-alive connection is closed after its next answer, not reset when the port closes", async () => {
  const app = { handle: () => Promise.reject(new Error("unused")), fetch: () => Promise.resolve(new Response("ok")) };
  const server = serveRest(app, { port: 0, hostname: "127.0.0.1", maxBodyBytes: 1024 });
  const close = (grace: number, drain: number) => server.close(grace, drain);
  await expectDrainClosesKeptAlive(server.url, "/v1/models", close);
});

/** A streamed request whose client reads nothing of the answer, keeping its connection open. */
function stalledStream(url: string, model = "ok") {
  const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
  const state = { received: "", closed: false };
  socket.on("error", () => {});
  socket.on("data", (d) => {
    state.received += d.toString();
  });
  socket.on("close", () => {
    state.closed = true;
  });
  const body = JSON.stringify({ model, messages: [{ role: "user", content: "hello" }], stream: true });
  socket.write(head(body.length) + body);
  socket.pause();
  return { socket, state };
}

// Words of a thousand characters, 8 MB in all: far more than the sockets' buffers hold.
const bigAnswer = ` ${"x".repeat(999)}`.repeat(8000);

test("a stream whose client reads nothing for the idle limit is ended and its connection closed, on either port", async () => {
  upstream.script("ok", { content: bigAnswer });
  for (const url of [gateway.restUrl, gateway.url]) {
    const before = gateway.shipper.rows.length;
    const { socket, state } = stalledStream(url);
    for (let i = 0; i < 150 && gateway.shipper.rows.length === before; i++) await Bun.sleep(50);
    expect(gateway.shipper.rows.length).toBe(before + 1);
    expect(gateway.shipper.rows.at(-1)).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499 });
    // What the sockets held arrives, then the end: never the whole answer.
    socket.resume();
    for (let i = 0; i < 100 && !state.closed; i++) await Bun.sleep(50);
    expect(state.closed).toBe(true);
    expect(state.received).not.toContain("[DONE]");
  }
}, 30_000);

test("a stream past its deadline while its client reads nothing has its connection closed, on either port", async () => {
  const routes = `${oneModelRoutes(upstream.url)}\n    request_timeout_ms: 1500`;
  const patient = await startTestGateway(routes, { idleTimeoutSeconds: 60 });
  try {
    upstream.script("ok", { content: bigAnswer });
    for (const url of [patient.restUrl, patient.url]) {
      const before = patient.shipper.rows.length;
      const { socket, state } = stalledStream(url);
      for (let i = 0; i < 100 && patient.shipper.rows.length === before; i++) await Bun.sleep(50);
      expect(patient.shipper.rows.at(-1)).toMatchObject({ errorCode: "request_timeout" });
      // Bun's timers tick in seconds: the connection is closed within a few.
      await Bun.sleep(5000);
      socket.resume();
      for (let i = 0; i < 40 && !state.closed; i++) await Bun.sleep(50);
      expect(state.closed).toBe(true);
      expect(state.received).not.toContain("[DONE]");
    }
  } finally {
    await patient.close();
  }
}, 40_000);

test("a stalled stream holds in memory no more of its answer's text than a token count needs", async () => {
  const patient = await startTestGateway(oneModelRoutes(upstream.url), { idleTimeoutSeconds: 60 });
  const streams: ReturnType<typeof stalledStream>[] = [];
  try {
    // No usage from the upstream: the gateway would count the output itself.
    upstream.script("ok", { content: bigAnswer, usage: false });
    Bun.gc(true);
    const before = process.memoryUsage().heapUsed;
    for (let i = 0; i < 8; i++) streams.push(stalledStream(patient.restUrl));
    // Each is written up to what its socket holds, a few MB, and then waits for its client.
    let settled = 0;
    for (let i = 0; i < 100 && settled < 3; i++) {
      const sent = upstream.requests.length;
      await Bun.sleep(100);
      settled = upstream.requests.length === sent ? settled + 1 : 0;
    }
    await Bun.sleep(1000);
    Bun.gc(true);
    const held = (process.memoryUsage().heapUsed - before) / streams.length;
    console.log(`heap held per stalled stream: ${(held / 2 ** 20).toFixed(2)} MB`);
    // About 2 MB of it is the fake upstream's own queue, in this process; the text streamed so far was 5.4 MB more.
    expect(held).toBeLessThan(3.5 * 2 ** 20);
  } finally {
    for (const { socket } of streams) socket.destroy();
    await patient.close();
  }
}, 30_000);
