import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import net from "node:net";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  compressionGzip,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { Registry } from "prom-client";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { createBodyBudget } from "./body-budget.ts";
import { startTestGateway } from "./testing/served-gateway.ts";

test("a hold grows to what its body reached, is refused past the bound taking nothing, and gives back once", async () => {
  const registry = new Registry();
  const budget = createBodyBudget({ maxBytes: 100, registry });
  const a = budget.hold();
  const b = budget.hold();
  expect(a.cover(40)).toBe(true);
  expect(a.cover(30)).toBe(true);
  expect(budget.heldBytes).toBe(40);
  expect(b.cover(61)).toBe(false);
  expect(budget.heldBytes).toBe(40);
  expect(b.cover(60)).toBe(true);
  expect(a.cover(41)).toBe(false);
  // A length that is not a number takes nothing.
  expect(a.cover(Number("ten"))).toBe(true);
  expect(budget.heldBytes).toBe(100);
  a.release();
  a.release();
  expect(budget.heldBytes).toBe(60);
  // A late chunk of a request that is over takes nothing.
  expect(a.cover(90)).toBe(true);
  expect(budget.heldBytes).toBe(60);
  const text = await registry.metrics();
  expect(text).toContain("gateway_inflight_body_bytes 60");
  expect(text).toContain("gateway_inflight_body_limit_bytes 100");
  expect(text).toContain("gateway_inflight_body_refusals_total 2");
  b.release();
  expect(budget.heldBytes).toBe(0);
});

test("a body alone is never refused, though it passes the bound: retrying it could not make it fit", () => {
  const budget = createBodyBudget({ maxBytes: 100 });
  const alone = budget.hold();
  // An RPC message of the largest size allowed with its envelope, or compressed bytes and their inflated ones.
  expect(alone.cover(105)).toBe(true);
  expect(alone.cover(190)).toBe(true);
  expect(budget.heldBytes).toBe(190);
  expect(budget.hold().cover(1)).toBe(false);
  alone.release();
  const first = budget.hold();
  expect(first.cover(10)).toBe(true);
  expect(budget.hold().cover(95)).toBe(false);
});

test("a declared length is checked against what the others hold, taking nothing, so one sent slowly holds no more", () => {
  const budget = createBodyBudget({ maxBytes: 100 });
  const other = budget.hold();
  expect(other.cover(60)).toBe(true);
  const declared = budget.hold();
  expect(declared.fits(41)).toBe(false);
  expect(declared.fits(40)).toBe(true);
  expect(declared.fits(Number("ten"))).toBe(true);
  expect(budget.heldBytes).toBe(60);
  // What has arrived of it counts, and a length it declared does not.
  expect(declared.cover(5)).toBe(true);
  expect(budget.hold().fits(35)).toBe(true);
  expect(budget.hold().fits(36)).toBe(false);
  other.release();
  expect(declared.fits(500)).toBe(true);
  expect(budget.hold().fits(96)).toBe(false);
  declared.release();
  expect(budget.hold().fits(500)).toBe(true);
  expect(budget.heldBytes).toBe(0);
});

describe("request bodies in flight are bounded together, on both REST ports and the RPCs", () => {
  const bound = 100_000;
  let gateway: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    gateway = await startTestGateway(
      [
        "providers:",
        "  - { name: fast, kind: mock, latency_ms: 0 }",
        "  - { name: slow, kind: mock, latency_ms: 60000 }",
        "models:",
        "  - name: fast",
        "    targets: [{ provider: fast, model: f }]",
        '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
        "  - name: slow",
        "    targets: [{ provider: slow, model: s }]",
        '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
      ].join("\n"),
      { maxInflightBodyBytes: bound, gated: true },
    );
  });
  afterAll(() => gateway.close());

  const held = () => gateway.bodies?.heldBytes;
  const until = async (done: () => boolean) => {
    for (let i = 0; i < 250 && !done(); i++) await Bun.sleep(20);
    expect(done()).toBe(true);
  };
  const chatBody = (model: string, chars: number) =>
    JSON.stringify({ model, messages: [{ role: "user", content: "x".repeat(chars) }] });
  const post = (url: string, body: string | ReadableStream, signal?: AbortSignal) =>
    fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body,
      signal,
    });
  /** The body in pieces, sent chunked with no length declared. */
  const chunked = (body: string) => {
    let at = 0;
    return new ReadableStream<Uint8Array>({
      pull(controller) {
        if (at >= body.length) return controller.close();
        controller.enqueue(new TextEncoder().encode(body.slice(at, (at += 8192))));
      },
    });
  };
  /** What comes back to a request that declares `length` bytes of body and sends ten: the answer, unless it waits. */
  const declaredOnly = async (url: string, path: string, contentType: string, length: number) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    socket.on("error", () => {});
    let received = "";
    socket.on("data", (d) => (received += d.toString()));
    socket.write(
      `POST ${path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: ${contentType}\r\n` +
        `Content-Length: ${length}\r\n\r\n{"model":"`,
    );
    for (let i = 0; i < 50 && !received.includes("\r\n\r\n"); i++) await Bun.sleep(20);
    socket.destroy();
    return received;
  };
  /** A request to the model that answers in a minute, holding its body's bytes until `leave` (the client going). */
  const holder = async (url: string, chars: number) => {
    const abort = new AbortController();
    const body = chatBody("slow", chars);
    const answered = post(url, body, abort.signal).catch(() => undefined);
    await until(() => held() === body.length);
    return { bytes: body.length, leave: () => abort.abort(), answered };
  };
  const expectOverloaded = async (res: Response) => {
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).toBe("1");
    expect(await res.json()).toMatchObject({ error: { type: "api_error", code: "gateway_overloaded" } });
    const row = await gateway.row(res.headers.get("x-request-id") ?? "");
    expect(row).toMatchObject({ status: RequestStatus.UNAVAILABLE, httpStatus: 503, errorCode: "gateway_overloaded" });
  };

  for (const port of ["Bun's", "node:http's"]) {
    test(`on ${port} port a body that would pass the bound gets a 503, declared or as it arrives; bytes come back`, async () => {
      const url = port === "Bun's" ? gateway.restUrl : gateway.url;
      const first = await holder(url, 60_000);
      const big = chatBody("fast", 50_000);
      await expectOverloaded(await post(url, big));
      await expectOverloaded(await post(url, chunked(big)));
      // Its declared length is refused before any more of it arrives.
      expect(await declaredOnly(url, "/v1/chat/completions", "application/json", big.length)).toStartWith("HTTP/1.1 503");
      // Refused, they took nothing; one that fits is served, and gives its bytes back.
      expect(held()).toBe(first.bytes);
      expect((await post(url, chunked(chatBody("fast", 30_000)))).status).toBe(200);
      await until(() => held() === first.bytes);
      // The client that leaves gives its bytes back too.
      first.leave();
      await first.answered;
      await until(() => held() === 0);
      expect((await post(url, big)).status).toBe(200);
      await until(() => held() === 0);
    }, 20_000);
  }

  for (const port of ["Bun's", "node:http's"]) {
    test(`on ${port} port a body holds only what has arrived of it, so slow bodies declaring lengths block no one`, async () => {
      const url = port === "Bun's" ? gateway.restUrl : gateway.url;
      // Ten bodies declaring 40,000 bytes each, four times the bound, that send ten of them and wait.
      const slow = Array.from({ length: 10 }, () => {
        const body = chatBody("fast", 40_000 - chatBody("fast", 0).length);
        const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
        socket.on("error", () => {});
        let received = "";
        socket.on("data", (d) => (received += d.toString()));
        socket.write(
          `POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\n` +
            `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 10)}`,
        );
        let sent = 10;
        const send = (end: number) => socket.write(body.slice(sent, (sent = end)));
        return { socket, send, answer: () => received };
      });
      try {
        await until(() => held() === 100);
        // A request of half the bound goes on.
        expect((await post(url, chatBody("fast", 50_000))).status).toBe(200);
        await until(() => held() === 100);
        // Their bytes arriving count: three of them fit, the fourth's bytes pass the bound and it gets a 503.
        for (const [i, sender] of slow.slice(0, 3).entries()) {
          sender.send(29_000);
          await until(() => held() === 100 + (i + 1) * 28_990);
        }
        const fourth = slow[3];
        fourth?.send(29_000);
        await until(() => fourth?.answer().includes("\r\n\r\n") ?? false);
        expect(fourth?.answer()).toStartWith("HTTP/1.1 503");
        expect(held()).toBe(100 + 3 * 28_990 - 10);
        // A length that could not fit beside what has arrived is refused unread.
        expect(await declaredOnly(url, "/v1/chat/completions", "application/json", 20_000)).toStartWith("HTTP/1.1 503");
        expect((await post(url, chatBody("fast", 20_000))).status).toBe(503);
        // Those that finish are served, and give their bytes back.
        for (const sender of slow.slice(0, 3)) {
          sender.send(40_000);
          await until(() => sender.answer().startsWith("HTTP/1.1 200"));
        }
        await until(() => held() === 60);
      } finally {
        for (const sender of slow) sender.socket.destroy();
      }
      await until(() => held() === 0);
    }, 20_000);
  }

  test("an RPC declaring its length holds only what has arrived of it", async () => {
    const path = "/gateway.v1.GatewayService/CreateChatCompletion";
    // Three calls declaring 40,000 bytes each, past the bound together, that send ten of them and wait.
    const sockets = Array.from({ length: 3 }, () => {
      const socket = net.connect(Number(new URL(gateway.url).port), "127.0.0.1");
      socket.on("error", () => {});
      socket.write(
        `POST ${path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\n` +
          `Content-Length: 40000\r\n\r\n{"params":`,
      );
      return socket;
    });
    try {
      await until(() => held() === 30);
      const client = createClient(GatewayService, createConnectTransport({ baseUrl: gateway.url, httpVersion: "1.1" }));
      const params = { model: "fast", messages: [{ role: "user", content: "x".repeat(50_000) }] };
      const res = await client.createChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" } });
      expect(res.choices).toHaveLength(1);
      await until(() => held() === 30);
    } finally {
      for (const socket of sockets) socket.destroy();
    }
    await until(() => held() === 0);
  });

  test("an RPC whose message would pass the bound is Unavailable with retry info, over gRPC, gRPC-Web and Connect", async () => {
    const first = await holder(gateway.restUrl, 60_000);
    const params = { model: "fast", messages: [{ role: "user", content: "x".repeat(50_000) }] };
    const clients = {
      // gRPC declares no length: the message is counted as it arrives.
      grpc: createClient(GatewayService, createGrpcTransport({ baseUrl: gateway.url })),
      // A Connect unary call over HTTP/1.1 declares its length: refused before it is read.
      connect: createClient(GatewayService, createConnectTransport({ baseUrl: gateway.url, httpVersion: "1.1" })),
    };
    for (const client of Object.values(clients)) {
      let requestId = "";
      const refused = await client
        .createChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" }, onHeader: (h) => (requestId = h.get("x-request-id") ?? "") })
        .then(() => undefined, ConnectError.from);
      expect(refused?.code).toBe(Code.Unavailable);
      expect(refused?.metadata.get("retry-after")).toBe("1");
      expect(refused?.metadata.get("x-error-code")).toBe("gateway_overloaded");
      requestId ||= refused?.metadata.get("x-request-id") ?? "";
      expect(await gateway.row(requestId)).toMatchObject({ status: RequestStatus.UNAVAILABLE, httpStatus: 503 });
      expect(held()).toBe(first.bytes);
    }
    // A streamed chat's message is read as it arrives, with no length declared, over every transport: its refusal is
    // the gateway's, not a client that left (499) when the request it stopped reading closes.
    const streaming = {
      grpc: clients.grpc,
      "grpc-web over HTTP/1.1": createClient(GatewayService, createGrpcWebTransport({ baseUrl: gateway.url, httpVersion: "1.1" })),
      "connect over HTTP/1.1": clients.connect,
    };
    for (const [name, client] of Object.entries(streaming)) {
      let requestId = "";
      const onHeader = (h: Headers) => (requestId = h.get("x-request-id") ?? "");
      const streamed = async () => {
        for await (const _ of client.streamChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" }, onHeader }));
      };
      const refused = await streamed().then(() => undefined, ConnectError.from);
      expect([name, refused?.code, refused?.metadata.get("retry-after")]).toEqual([name, Code.Unavailable, "1"]);
      requestId ||= refused?.metadata.get("x-request-id") ?? "";
      const row = await gateway.row(requestId);
      expect([name, row.status, row.httpStatus, row.errorCode]).toEqual([name, RequestStatus.UNAVAILABLE, 503, "gateway_overloaded"]);
      expect(held()).toBe(first.bytes);
    }
    // Compressed, the same message arrives in a few hundred bytes, but is held inflated all the same.
    const compressed = {
      grpc: createClient(GatewayService, createGrpcTransport({ baseUrl: gateway.url, sendCompression: compressionGzip })),
      connect: createClient(
        GatewayService,
        createConnectTransport({ baseUrl: gateway.url, httpVersion: "1.1", sendCompression: compressionGzip }),
      ),
    };
    for (const [name, client] of Object.entries(compressed)) {
      let requestId = "";
      const onHeader = (h: Headers) => (requestId = h.get("x-request-id") ?? "");
      const refused = await client
        .createChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" }, onHeader })
        .then(() => undefined, ConnectError.from);
      expect([name, refused?.code, refused?.metadata.get("retry-after")]).toEqual([name, Code.Unavailable, "1"]);
      requestId ||= refused?.metadata.get("x-request-id") ?? "";
      const row = await gateway.row(requestId);
      expect([name, row.status, row.httpStatus, row.errorCode]).toEqual([name, RequestStatus.UNAVAILABLE, 503, "gateway_overloaded"]);
      expect(held()).toBe(first.bytes);
      const fits = { ...params, messages: [{ role: "user", content: "x".repeat(10_000) }] };
      expect((await client.createChatCompletion({ params: fits }, { headers: { authorization: "Bearer sk-good" } })).choices).toHaveLength(1);
      await until(() => held() === first.bytes);
    }
    const path = "/gateway.v1.GatewayService/CreateChatCompletion";
    expect(await declaredOnly(gateway.url, path, "application/json", 50_000)).toStartWith("HTTP/1.1 503");
    first.leave();
    await first.answered;
    await until(() => held() === 0);
    for (const client of Object.values(clients)) {
      const res = await client.createChatCompletion({ params }, { headers: { authorization: "Bearer sk-good" } });
      expect(res.choices).toHaveLength(1);
      await until(() => held() === 0);
      // A call its client gives up on gives its bytes back.
      const abort = new AbortController();
      const left = client
        .createChatCompletion({ params: { ...params, model: "slow" } }, { headers: { authorization: "Bearer sk-good" }, signal: abort.signal })
        .catch(() => undefined);
      await until(() => (held() ?? 0) > 0);
      abort.abort();
      await left;
      await until(() => held() === 0);
    }
  }, 30_000);
});
