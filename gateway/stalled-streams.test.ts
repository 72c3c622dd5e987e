import { afterAll, beforeAll, expect, test } from "bun:test";
import * as http2 from "node:http2";
import net from "node:net";
import { Registry } from "prom-client";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { grpcFrame } from "../lib/grpc-frames.ts";
import { type FakeUpstream, startFakeUpstream } from "./testing/fake-upstream.ts";
import { grpcChatStreamByHand, oneModelRoutes, startTestGateway } from "./testing/served-gateway.ts";

// Streams whose clients take nothing, past the bound of those a replica holds at once: the one stalled longest is cut
// as the idle limit (65 s here, never reached) would cut it, on both ports and over the RPCs.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
const registry = new Registry();
const bound = 2;

beforeAll(async () => {
  upstream = startFakeUpstream();
  // Words of a thousand characters, 16 MB in all: far more than the sockets' buffers or a stream's window hold.
  upstream.script("ok", { content: ` ${"x".repeat(999)}`.repeat(16_000) });
  gateway = await startTestGateway(oneModelRoutes(upstream.url), { maxStalledStreams: bound, stalledAfterMs: 1000, registry });
});
afterAll(async () => {
  await gateway.close();
  await upstream.stop();
});

/** A streamed chat whose client reads its answer's head, then only as the test says. */
interface Reader {
  requestId: Promise<string>;
  /** Takes `bytes` more of the answer, then stops reading again. */
  readSome(bytes: number): Promise<void>;
  /** Takes the rest of the answer, as it comes. */
  readAll(): void;
  /** What arrived so far. */
  readonly received: string;
  /** Whether the connection (on HTTP/2, the stream) was closed or reset by the server. */
  readonly closed: boolean;
  destroy(): void;
}

const chat = { model: "ok", messages: [{ role: "user", content: "hello" }] };

/** Over HTTP/1.1: REST on either port, or StreamChatCompletion over Connect on the RPC port. */
function overHttp1(url: string, kind: "rest" | "connect"): Reader {
  const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
  socket.on("error", () => {});
  let received = "";
  let closed = false;
  let wanted = 0;
  let arrived: () => void = () => {};
  const ended = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  void ended.then(() => (closed = true));
  const requestId = new Promise<string>((resolve) => {
    socket.on("data", (d: Buffer) => {
      received += d.toString("latin1");
      resolve(/x-request-id: (\w+)/i.exec(received)?.[1] ?? "");
      if (received.length >= wanted) {
        socket.pause();
        arrived();
      }
    });
  });
  let body: Buffer;
  let head: string;
  if (kind === "rest") {
    body = Buffer.from(JSON.stringify({ ...chat, stream: true }));
    head = "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n";
  } else {
    body = grpcFrame(Buffer.from(JSON.stringify({ params: chat })));
    head = "POST /gateway.v1.GatewayService/StreamChatCompletion HTTP/1.1\r\nContent-Type: application/connect+json\r\n";
  }
  socket.write(`${head}Host: gw\r\nAuthorization: Bearer sk-good\r\nContent-Length: ${body.length}\r\n\r\n`);
  socket.write(body);
  return {
    requestId,
    readSome(bytes) {
      wanted = received.length + bytes;
      const got = new Promise<void>((resolve) => (arrived = resolve));
      socket.resume();
      return got;
    },
    readAll() {
      wanted = Number.POSITIVE_INFINITY;
      socket.resume();
    },
    get received() {
      return received;
    },
    get closed() {
      return closed;
    },
    destroy: () => socket.destroy(),
  };
}

/** StreamChatCompletion over gRPC on HTTP/2, with a stream window of 1 KB that opens only as the client reads. */
function overGrpc(url: string): Reader {
  const { session, stream, requestId } = grpcChatStreamByHand(url, chat);
  let received = 0;
  let wanted = 0;
  let arrived: () => void = () => {};
  let closed = false;
  const ended = new Promise<void>((resolve) => stream.once("close", () => resolve()));
  void ended.then(() => (closed = stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR));
  stream.on("data", (d: Buffer) => {
    received += d.length;
    if (received >= wanted) {
      stream.pause();
      arrived();
    }
  });
  return {
    requestId,
    readSome(bytes) {
      wanted = received + bytes;
      const got = new Promise<void>((resolve) => (arrived = resolve));
      stream.resume();
      return got;
    },
    readAll() {
      wanted = Number.POSITIVE_INFINITY;
      stream.resume();
    },
    get received() {
      return "";
    },
    get closed() {
      return closed;
    },
    destroy: () => session.destroy(),
  };
}

async function until(done: () => boolean, ms: number): Promise<boolean> {
  for (const end = Date.now() + ms; !done() && Date.now() < end; ) await Bun.sleep(20);
  return done();
}

async function cutsCounted(): Promise<number> {
  const line = (await registry.metrics()).split("\n").find((l) => l.startsWith("gateway_stalled_streams_cut_total"));
  return Number(line?.split(" ").at(-1) ?? 0);
}

const metered = (requestId: string) => gateway.shipper.rows.find((row) => row.requestId === requestId);

// How much a client that resumes reading takes: more than the gateway's own buffers of its stream hold.
for (const [name, open, readSome] of [
  ["REST on the Bun port", () => overHttp1(gateway.restUrl, "rest"), 2 * 1024 * 1024],
  ["REST on the RPC port", () => overHttp1(gateway.url, "rest"), 2 * 1024 * 1024],
  ["StreamChatCompletion over Connect on HTTP/1.1", () => overHttp1(gateway.url, "connect"), 2 * 1024 * 1024],
  ["StreamChatCompletion over gRPC on HTTP/2", () => overGrpc(gateway.url), 64 * 1024],
] as const) {
  test(`${name}: past the bound the longest stalled stream is cut and metered as its client's leaving`, async () => {
    const cutsBefore = await cutsCounted();
    const opened: Reader[] = [];
    try {
      // Two stalled streams, within the bound: neither is cut, however long they stay so.
      const first = open();
      opened.push(first);
      expect(await until(() => gateway.stalls?.stalled === 1, 10_000)).toBe(true);
      const second = open();
      opened.push(second);
      expect(await until(() => gateway.stalls?.stalled === 2, 10_000)).toBe(true);
      await Bun.sleep(1500);
      const [firstId, secondId] = await Promise.all([first.requestId, second.requestId]);
      expect(metered(firstId) ?? metered(secondId)).toBeUndefined();
      expect(first.closed || second.closed).toBe(false);

      // The first takes some of its answer and stops again: stalled since then, it is no longer the longest stalled.
      await first.readSome(readSome);
      expect(await until(() => gateway.stalls?.stalled === 1, 900)).toBe(true);
      expect(await until(() => gateway.stalls?.stalled === 2, 10_000)).toBe(true);

      // A third stalls: the second, stalled longest, is cut at once; the others go on.
      const third = open();
      opened.push(third);
      const thirdId = await third.requestId;
      expect(await until(() => metered(secondId) !== undefined, 10_000)).toBe(true);
      expect(metered(secondId)).toMatchObject({ status: RequestStatus.CANCELLED, httpStatus: 499, errorCode: "client_closed_request" });
      expect(metered(secondId)?.usage?.outputTokens).toBeGreaterThan(0n);
      // What the sockets held arrives, then the end: never the whole answer.
      second.readAll();
      expect(await until(() => second.closed, 5_000)).toBe(true);
      expect(second.received).not.toContain("[DONE]");
      expect(await cutsCounted()).toBe(cutsBefore + 1);
      expect(gateway.stalls?.stalled).toBe(2);
      expect(metered(firstId) ?? metered(thirdId)).toBeUndefined();

      // The first, reading again, gets all of its answer.
      // The rest of 16 MB: on a loaded machine that takes more than a few seconds.
      first.readAll();
      expect(await until(() => metered(firstId) !== undefined, 30_000)).toBe(true);
      if (name.startsWith("REST")) expect(await until(() => first.received.includes("data: [DONE]"), 10_000)).toBe(true);
      expect(metered(firstId)).toMatchObject({ status: RequestStatus.OK });
      expect(first.closed).toBe(false);
      expect(await cutsCounted()).toBe(cutsBefore + 1);
    } finally {
      for (const reader of opened) reader.destroy();
      // The rest leave; the next test starts with nothing stalled.
      await until(() => gateway.stalls?.stalled === 0, 5_000);
    }
  }, 60_000);
}

test("a client taking a large answer slowly but steadily is not stalled, and not cut past the bound", async () => {
  const cutsBefore = await cutsCounted();
  const opened: Reader[] = [];
  // A whole answer of 16 MB on the RPC port, which goes out a piece at a time, taken at about 4 MB/s for seconds.
  const socket = net.connect(Number(new URL(gateway.url).port), "127.0.0.1");
  socket.on("error", () => {});
  let answer = Buffer.alloc(0);
  socket.on("data", (d: Buffer) => {
    answer = Buffer.concat([answer, d]);
    socket.pause();
    setTimeout(() => socket.resume(), d.length / 4000);
  });
  const whole = () => {
    const head = answer.indexOf("\r\n\r\n");
    const declared = Number(/content-length: (\d+)/i.exec(answer.subarray(0, head).toString("latin1"))?.[1]);
    return head > 0 && answer.length - head - 4 === declared;
  };
  const body = JSON.stringify(chat);
  socket.write(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${body.length}\r\n\r\n${body}`,
  );
  try {
    await Bun.sleep(1000);
    // Streams stall beside it, as many as the bound holds: nothing is cut.
    for (let i = 0; i < bound; i++) opened.push(overHttp1(gateway.restUrl, "rest"));
    expect(await until(() => gateway.stalls?.stalled === bound, 10_000)).toBe(true);
    expect(await until(whole, 20_000)).toBe(true);
    expect(await cutsCounted()).toBe(cutsBefore);
    for (const reader of opened) expect(metered(await reader.requestId)).toBeUndefined();
  } finally {
    socket.destroy();
    for (const reader of opened) reader.destroy();
    await until(() => gateway.stalls?.stalled === 0, 5_000);
  }
}, 60_000);
