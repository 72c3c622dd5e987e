import * as grpc from "@grpc/grpc-js";
import * as http2 from "node:http2";
import * as net from "node:net";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { AnalyticsService } from "../gen/analytics/v1/analytics_pb.ts";
import {
  BillingService,
  ListOrganizationsResponseSchema,
  ListProjectsRequestSchema,
  OrganizationSchema,
} from "../gen/billing/v1/billing_pb.ts";
import {
  Health,
  HealthCheckRequestSchema,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus as Status,
} from "../gen/grpc/health/v1/health_pb.ts";
import { bearerToken } from "./auth.ts";
import { decodeBase64 } from "./grpc-web-text.ts";
import { connectionEndingKey, connectionKey } from "./health.ts";
import { createCorsPolicy } from "./cors.ts";
import { createLogger } from "./log.ts";
import { createMetrics } from "./metrics.ts";
import { runCommand } from "./processes.ts";
import { createServiceClient } from "./rpc-client.ts";
import { maxPipelinedRequests, maxStreamsPerConnection, type RunningServer, send, startServer } from "./server.ts";
import { grpcFrame, grpcFrames } from "./grpc-frames.ts";
import { answerUntilClosed, expectDrainClosesKeptAlive, keptAliveConnection, sendRegardless } from "./testing.ts";

const metrics = createMetrics("test");
const quietLog = createLogger({ service: "test", write: () => {} });
/** IngestMetrics that acks every batch at once. */
const ackingIngest = {
  async *ingestMetrics(batches: AsyncIterable<{ sequence: bigint }>) {
    for await (const batch of batches) yield { ackedSequence: batch.sequence, duplicateRows: 0 };
  },
};
/** A server of the test's own on a free loopback port. */
const startOwn = (options: Omit<Parameters<typeof startServer>[0], "port" | "host" | "log">) =>
  startServer({ port: 0, host: "127.0.0.1", log: quietLog, ...options });
let server: RunningServer;
/** Punctuation connect's own encoding escapes, `%`, and text outside ASCII: every client must read it back as is. */
const deniedMessage = "No API key: send `Authorization: Bearer <key>`; see /docs?a=1&b=2, 100% ok, café → ✓ 🔑.";

beforeAll(async () => {
  server = await startServer({
    name: "test",
    port: 0,
    host: "127.0.0.1",
    log: createLogger({ service: "test", write: () => {} }),
    registry: metrics.registry,
    interceptors: [metrics.serverInterceptor],
    readiness: async () => ({ ready: true, checks: { self: "ok" } }),
    routes: (router) => {
      router.service(BillingService, {
        async listOrganizations(_req, ctx) {
          if (!bearerToken(ctx.requestHeader)) throw new ConnectError(deniedMessage, Code.Unauthenticated);
          return { organizations: [create(OrganizationSchema, { id: "org_1", name: "acme", monthlyBudgetNanos: 5n })] };
        },
      });
      router.service(AnalyticsService, ackingIngest);
    },
  });
});

afterAll(() => server.close(1_000));

describe("one port for every protocol", () => {
  test("gRPC over h2c", async () => {
    const client = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: "t" });
    const res = await client.listOrganizations({});
    expect(res.organizations[0]?.monthlyBudgetNanos).toBe(5n);
    const denied = await createServiceClient(BillingService, { baseUrl: server.url })
      .listOrganizations({})
      .catch((e: unknown) => ConnectError.from(e));
    expect((denied as ConnectError).rawMessage).toBe(deniedMessage);
  });

  test("Connect JSON over HTTP/1.1, as curl or a browser would send it", async () => {
    const res = await fetch(`${server.url}/billing.v1.BillingService/ListOrganizations`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer t" },
      body: "{}",
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ organizations: [{ id: "org_1", name: "acme", monthlyBudgetNanos: "5" }] });
  });

  test("gRPC-Web and Connect over HTTP/1.1 with the connect-node transports", async () => {
    for (const transport of [
      createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" }),
      createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    ]) {
      const client = createClient(BillingService, transport);
      const res = await client.listOrganizations({}, { headers: { authorization: "Bearer t" } });
      expect(res.organizations[0]?.name).toBe("acme");
      const err = await client.listOrganizations({}).catch((e) => ConnectError.from(e));
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(Code.Unauthenticated);
      expect((err as ConnectError).rawMessage).toBe(deniedMessage);
    }
  });

  test("bidi streaming over gRPC", async () => {
    const client = createServiceClient(AnalyticsService, { baseUrl: server.url });
    async function* batches() {
      for (let sequence = 1n; sequence <= 3n; sequence++) yield { gatewayInstanceId: "g", sequence, metrics: [] };
    }
    const acks: bigint[] = [];
    for await (const ack of client.ingestMetrics(batches())) acks.push(ack.ackedSequence);
    expect(acks).toEqual([1n, 2n, 3n]);
  });

  test("a grpc-js client under Node calls the Bun-served RPCs", async () => {
    const { stdout, stderr, code } = await runCommand([
      "node",
      "test/node/grpc-client.mjs",
      `127.0.0.1:${server.port}`,
    ]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const result = JSON.parse(stdout);
    expect(result.node).toStartWith("v");
    expect(result.unary.organizations[0]).toMatchObject({ id: "org_1", name: "acme", monthly_budget_nanos: "5" });
    expect(result.acks).toEqual(["1", "2", "3"]);
    expect(result.denied.code).toBe(16); // UNAUTHENTICATED
    expect(result.denied.details).toBe(deniedMessage);
  }, 20_000);

  test("stock gRPC reflection (v1, v1alpha) and health clients under Node", async () => {
    const target = `127.0.0.1:${server.port}`;
    const { stdout, stderr, code } = await runCommand([
      "node",
      "test/node/reflection-client.mjs",
      target,
      "billing.v1.BillingService",
    ]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const result = JSON.parse(stdout);
    const services = [
      "analytics.v1.AnalyticsService",
      "billing.v1.BillingService",
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (const version of ["v1", "v1alpha"]) {
      expect(result[version].services).toEqual(services);
      expect(result[version].methods).toContain("AuthorizeKey");
      expect(result[version].methods).toContain("RecordUsage");
    }
    expect(result.describedHasService).toBe(true);
    expect(result.health).toEqual({
      server: { status: "SERVING" },
      service: { status: "SERVING" },
      unknown: { code: 5 },
    });
    expect(result.watch).toBe("SERVING");
  }, 20_000);

  test("a path that is neither an RPC nor a route is a 404 in Connect's error shape, Unimplemented to gRPC", async () => {
    const res = await fetch(`${server.url}/nowhere?x=1`, { method: "POST", body: "{}" });
    expect(res.status).toBe(404);
    expect(res.headers.get("content-type")).toBe("application/json");
    expect(await res.json()).toEqual({ code: "unimplemented", message: "no procedure or route at POST /nowhere" });
    const unknownRpc = await createClient(
      BillingService,
      createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    )
      .listProjects({})
      .catch((e: unknown) => ConnectError.from(e));
    expect((unknownRpc as ConnectError).code).toBe(Code.Unimplemented);

    // A gRPC client is told in gRPC's own form, whose message it shows, not by an HTTP 404 it can only guess from.
    const client = new grpc.Client(new URL(server.url).host, grpc.credentials.createInsecure());
    const refused = await new Promise<grpc.ServiceError>((resolve) =>
      client.makeUnaryRequest(
        "/billing.v1.BillingService/NoSuchMethod",
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
        (e) => resolve(e as grpc.ServiceError),
      ),
    );
    client.close();
    expect({ code: refused.code, details: refused.details }).toEqual({
      code: grpc.status.UNIMPLEMENTED,
      details: "no procedure or route at POST /billing.v1.BillingService/NoSuchMethod",
    });
    for (const type of ["application/grpc-web+proto", "application/grpc-web-text"]) {
      const web = await fetch(`${server.url}/billing.v1.BillingService/NoSuchMethod`, {
        method: "POST",
        headers: { "content-type": type },
        body: "",
      });
      expect([type, web.status, web.headers.get("grpc-status")]).toEqual([type, 200, "12"]);
      expect(web.headers.get("content-type")).toStartWith(type);
    }
  });

  test("a request HTTP/1.1's parser refuses is answered with Connect's JSON error, then the connection closes", async () => {
    const answer = async (bytes: string) => {
      const text = await answerUntilClosed(server.url, bytes);
      const [head = "", body = ""] = text.split("\r\n\r\n");
      return { status: head.split(" ")[1], head: head.toLowerCase(), body: JSON.parse(body) as unknown };
    };
    expect(await answer("FOO /x HTTP/1.1\r\nhost: a\r\n\r\n")).toMatchObject({
      status: "501",
      body: { code: "unimplemented", message: "The request's method is not one this server implements." },
    });
    const big = await answer(`GET /healthz HTTP/1.1\r\nhost: a\r\nx-big: ${"a".repeat(64 * 1024)}\r\n\r\n`);
    expect(big).toMatchObject({ status: "431", body: { code: "resource_exhausted" } });
    expect(big.head).toContain("content-type: application/json");
    expect(big.head).toContain("connection: close");
    expect(await answer("GET /healthz HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n")).toMatchObject({
      status: "400",
      body: { code: "invalid_argument", message: "The request is not well-formed HTTP/1.1." },
    });
  });

  test("gRPC-Web text, as protoc-gen-grpc-web sends it: unary calls, an error and a server stream", async () => {
    /** The whole frames in `bytes`, and the trailers frame's fields. */
    const framesOf = (bytes: Uint8Array) => {
      const messages: Uint8Array[] = [];
      const trailers: Record<string, string> = {};
      for (const { flags, message } of grpcFrames(bytes)) {
        if (flags & 0x80) {
          for (const line of message.toString().split("\r\n").filter(Boolean)) {
            const colon = line.indexOf(":");
            trailers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
          }
        } else messages.push(message);
      }
      return { messages, trailers };
    };
    const call = (path: string, body: string, headers: Record<string, string> = {}, signal?: AbortSignal) =>
      fetch(`${server.url}${path}`, {
        method: "POST",
        headers: { "content-type": "application/grpc-web-text", accept: "application/grpc-web-text", "x-grpc-web": "1", ...headers },
        body,
        signal,
      });
    const base64 = (bytes: Uint8Array) => Buffer.from(bytes).toString("base64");

    // Sent in two base64 pieces, the first padded, as a client that encodes each write on its own does.
    const check = grpcFrame(toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: "billing.v1.BillingService" })));
    const checked = await call("/grpc.health.v1.Health/Check", base64(check.subarray(0, 5)) + base64(check.subarray(5)));
    expect(checked.status).toBe(200);
    expect(checked.headers.get("content-type")).toBe("application/grpc-web-text+proto");
    const { messages, trailers } = framesOf(decodeBase64(await checked.text()));
    expect(messages.map((m) => fromBinary(HealthCheckResponseSchema, m).status)).toEqual([Status.SERVING]);
    expect(trailers["grpc-status"]).toBe("0");

    const listed = await call("/billing.v1.BillingService/ListOrganizations", base64(grpcFrame(new Uint8Array())), {
      authorization: "Bearer t",
    });
    const organizations = framesOf(decodeBase64(await listed.text())).messages.map((m) => fromBinary(ListOrganizationsResponseSchema, m));
    expect(organizations[0]?.organizations[0]?.name).toBe("acme");

    const denied = await call("/billing.v1.BillingService/ListOrganizations", base64(grpcFrame(new Uint8Array())));
    const deniedTrailers = { ...Object.fromEntries(denied.headers), ...framesOf(decodeBase64(await denied.text())).trailers };
    expect(deniedTrailers["grpc-status"]).toBe("16");
    expect(decodeURIComponent(deniedTrailers["grpc-message"] ?? "")).toBe(deniedMessage);

    // A server stream's first message arrives while the stream stays open.
    const stop = new AbortController();
    const watch = await call("/grpc.health.v1.Health/Watch", base64(grpcFrame(new Uint8Array())), {}, stop.signal);
    expect(watch.headers.get("content-type")).toBe("application/grpc-web-text+proto");
    const reader = (watch.body as ReadableStream<Uint8Array>).getReader();
    let text = "";
    let streamed: Uint8Array[] = [];
    while (streamed.length === 0) {
      const { value, done } = await reader.read();
      expect(done).toBe(false);
      text += new TextDecoder().decode(value);
      streamed = framesOf(decodeBase64(text.slice(0, text.length - (text.length % 4)))).messages;
    }
    expect(fromBinary(HealthCheckResponseSchema, streamed[0] as Uint8Array).status).toBe(Status.SERVING);
    stop.abort();
  });

  test("/healthz, /readyz and /metrics", async () => {
    expect((await fetch(`${server.url}/healthz`)).status).toBe(200);
    const ready = await fetch(`${server.url}/readyz`);
    expect(await ready.json()).toEqual({ status: "ready", checks: { self: "ok" } });
    const text = await (await fetch(`${server.url}/metrics`)).text();
    expect(text).toMatch(/rpc_server_handled_total\{[^}]*rpc_method="ListOrganizations"[^}]*code="ok"[^}]*\} [1-9]/);
    expect(text).toContain("process_cpu_seconds_total");
    expect(text).toContain("nodejs_heap_size_used_bytes");
    // Collected by walking the whole heap, stalling the service at every scrape.
    expect(text).not.toContain("nodejs_heap_space_size");
  });
});

describe("browsers", () => {
  const origin = "https://any.example.com";

  test("with any origin allowed, the routes without a token answer none: no page reads /metrics, /readyz", async () => {
    const own = await startOwn({
      name: "open",
      registry: createMetrics("open").registry,
      readiness: async () => ({ ready: false, checks: { postgres: "unreachable" } }),
      cors: createCorsPolicy(["*"]),
      routes: (router) =>
        router.service(BillingService, {
          async listOrganizations(_req, ctx) {
            if (!bearerToken(ctx.requestHeader)) throw new ConnectError("no token", Code.Unauthenticated);
            return {};
          },
        }),
    });
    try {
      for (const route of ["/metrics", "/readyz", "/healthz"]) {
        const res = await fetch(`${own.url}${route}`, { headers: { origin } });
        expect(res.status).toBe(route === "/readyz" ? 503 : 200);
        expect(res.headers.get("access-control-allow-origin")).toBeNull();
        const preflight = await fetch(`${own.url}${route}`, {
          method: "OPTIONS",
          headers: { origin, "access-control-request-method": "GET" },
        });
        expect(preflight.status).toBe(204);
        expect(preflight.headers.get("access-control-allow-origin")).toBeNull();
      }
      const check = await fetch(`${own.url}/grpc.health.v1.Health/Check`, {
        method: "POST",
        headers: { "content-type": "application/json", origin },
        body: "{}",
      });
      expect(await check.json()).toEqual({ status: "NOT_SERVING" });
      expect(check.headers.get("access-control-allow-origin")).toBeNull();
      // An RPC that takes a token, as before.
      const rpc = await fetch(`${own.url}/billing.v1.BillingService/ListOrganizations`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer t", origin },
        body: "{}",
      });
      expect(rpc.status).toBe(200);
      expect(rpc.headers.get("access-control-allow-origin")).toBe("*");
      const preflight = await fetch(`${own.url}/billing.v1.BillingService/ListOrganizations`, {
        method: "OPTIONS",
        headers: { origin, "access-control-request-method": "POST" },
      });
      expect(preflight.headers.get("access-control-allow-origin")).toBe("*");
    } finally {
      await own.close(1_000);
    }
  });
});

describe("close", () => {
  test("lets an in-flight call finish, then refuses new connections", async () => {
    const own = await startOwn({
      name: "drain",
      routes: (router) =>
        router.service(BillingService, {
          async listProjects() {
            await Bun.sleep(300);
            return { projects: [] };
          },
        }),
    });
    const client = createServiceClient(BillingService, { baseUrl: own.url });
    const inFlight = client.listProjects({ orgId: "o" });
    await Bun.sleep(50);
    const closed = own.close(5_000);
    const outcome = await inFlight.catch((e) => ConnectError.from(e));
    expect(outcome).toMatchObject({ projects: [] });
    await closed;
    const after = await fetch(`${own.url}/healthz`).then(
      () => "answered",
      () => "refused",
    );
    expect(after).toBe("refused");
  });

  test("draining first: /readyz says so while new connections are still served, then the port closes", async () => {
    const own = await startOwn({
      name: "drain-first",
      readiness: async () => ({ ready: true, checks: {} }),
      routes: (router) => router.service(BillingService, { listProjects: async () => ({ projects: [] }) }),
    });
    expect((await fetch(`${own.url}/readyz`)).status).toBe(200);
    const closed = own.close(1_000, 600);
    await Bun.sleep(100);
    // A new connection (no keep-alive) during the drain: not ready, yet served.
    const ready = await fetch(`${own.url}/readyz`, { keepalive: false });
    expect(ready.status).toBe(503);
    expect(await ready.json()).toMatchObject({ status: "not_ready", checks: { server: "draining" } });
    const client = createServiceClient(BillingService, { baseUrl: own.url });
    expect(await client.listProjects({ orgId: "o" })).toMatchObject({ projects: [] });
    await closed;
    const after = await fetch(`${own.url}/healthz`).then(
      () => "answered",
      () => "refused",
    );
    expect(after).toBe("refused");
  });
  test("draining, a kept-alive HTTP/1.1 connection is closed after its next answer, not reset when the port closes", async () => {
    const own = await startOwn({ name: "drain-keep-alive", routes: () => {} });
    const close = (grace: number, drain: number) => own.close(grace, drain);
    await expectDrainClosesKeptAlive(own.url, "/healthz", close);
  });
});

describe("answers given before the body is all read", () => {
  test("close an HTTP/1.1 connection rather than read on whatever the client keeps sending", async () => {
    const own = await startOwn({
      name: "unread-bodies",
      readMaxBytes: 1024,
      routes: (router) => router.service(BillingService, { listProjects: async () => ({ projects: [] }) }),
    });
    const most = 256 * 1024 * 1024;
    try {
      // Over readMaxBytes, and to no procedure at all.
      for (const path of ["/billing.v1.BillingService/ListProjects", "/nowhere"]) {
        const { received, sent } = await sendRegardless(
          own.url,
          `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`,
          `{"orgId":"${"x".repeat(0x100000 - 12)}"}`,
          most,
        );
        expect(received).toMatch(/^HTTP\/1.1 (429|404)/);
        expect(received.toLowerCase()).toContain("connection: close");
        expect(sent).toBeLessThan(most);
      }
    } finally {
      await own.close(0);
    }
  }, 30_000);
});

describe("answers given before the body is all read, over HTTP/2", () => {
  /** Sends an endless body on one stream; what came back, and the stream's reset code, once it closes (or not). */
  const sendEndlessly = async (url: string, path: string) => {
    const session = http2.connect(url);
    const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/json" });
    let status = 0;
    const chunks: Buffer[] = [];
    stream.on("response", (headers) => {
      status = Number(headers[":status"]);
    });
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.on("error", () => {});
    const closed = new Promise<number>((resolve) => stream.on("close", () => resolve(stream.rstCode ?? -1)));
    const piece = Buffer.alloc(16 * 1024, 120);
    const pump = () => {
      while (!stream.destroyed && stream.write(piece)) {}
      if (!stream.destroyed) stream.once("drain", pump);
    };
    stream.write('{"orgId":"');
    pump();
    const rstCode = await Promise.race([closed, Bun.sleep(10_000).then(() => "still open")]);
    session.destroy();
    return { status, body: Buffer.concat(chunks), rstCode };
  };

  test("reset their stream with NO_ERROR behind the whole answer, so the client stops sending", async () => {
    const big = Buffer.alloc(4 * 1024 * 1024, 97);
    const own = await startOwn({
      name: "unread-h2-bodies",
      readMaxBytes: 1024,
      requestBodyTimeoutMs: 60_000,
      routes: (router) => router.service(BillingService, { listProjects: async () => ({ projects: [] }) }),
      // A route that answers at length without reading the body at all.
      http: async (req, res) => {
        if (req.url !== "/unread") return false;
        send(res, 200, { "content-type": "text/plain" }, big);
        return true;
      },
    });
    try {
      const over = await sendEndlessly(own.url, "/billing.v1.BillingService/ListProjects");
      expect(over.status).toBe(429);
      expect(JSON.parse(over.body.toString())).toEqual({
        code: "resource_exhausted",
        message: "message size is larger than configured readMaxBytes 1024",
      });
      expect(over.rstCode).toBe(http2.constants.NGHTTP2_NO_ERROR);
      const unread = await sendEndlessly(own.url, "/unread");
      expect([unread.status, unread.body.equals(big), unread.rstCode]).toEqual([200, true, http2.constants.NGHTTP2_NO_ERROR]);
      // gRPC's status, in trailers after the answer, still reaches its client.
      const client = new grpc.Client(new URL(own.url).host, grpc.credentials.createInsecure());
      const refused = await new Promise<grpc.ServiceError>((resolve) =>
        client.makeUnaryRequest(
          "/billing.v1.BillingService/ListProjects",
          (b: Buffer) => b,
          (b: Buffer) => b,
          Buffer.from(toBinary(ListProjectsRequestSchema, create(ListProjectsRequestSchema, { orgId: "x".repeat(3_000_000) }))),
          (e) => resolve(e as grpc.ServiceError),
        ),
      );
      client.close();
      expect([refused.code, refused.details]).toEqual([
        grpc.status.RESOURCE_EXHAUSTED,
        "message size 3000005 is larger than configured readMaxBytes 1024",
      ]);
    } finally {
      await own.close(0);
    }
  }, 30_000);
});

describe("request bodies must arrive in time", () => {
  test("a body that stops arriving closes its connection; a slow answer to a whole body does not", async () => {
    const own = await startOwn({
      name: "slow-bodies",
      requestBodyTimeoutMs: 1_000,
      routes: (router) =>
        router.service(BillingService, {
          async listProjects() {
            await Bun.sleep(2_000);
            return { projects: [] };
          },
        }),
    });
    try {
      const { port } = new URL(own.url);
      const socket = (await import("node:net")).connect(Number(port), "127.0.0.1");
      let received = "";
      socket.on("data", (d) => {
        received += d.toString();
      });
      socket.on("error", () => {});
      const closed = new Promise<string>((resolve) => socket.on("close", () => resolve("closed")));
      socket.write(
        "POST /billing.v1.BillingService/ListProjects HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{",
      );
      expect(await Promise.race([closed, Bun.sleep(8_000).then(() => "still open")])).toBe("closed");
      expect(received).toBe("");

      const answered = await fetch(`${own.url}/billing.v1.BillingService/ListProjects`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ orgId: "o" }),
      });
      expect(answered.status).toBe(200);
      expect(await answered.json()).toEqual({});
    } finally {
      await own.close(0);
    }
  }, 15_000);

  test("over HTTP/2 a stalled body resets its own stream only; a streamed request may pause for longer", async () => {
    const own = await startOwn({
      name: "slow-h2-bodies",
      requestBodyTimeoutMs: 1_000,
      routes: (router) => {
        router.service(BillingService, { listProjects: async () => ({ projects: [] }) });
        router.service(AnalyticsService, ackingIngest);
      },
    });
    const session = http2.connect(own.url);
    session.on("error", () => {});
    try {
      const stalled = session.request(
        { ":method": "POST", ":path": "/billing.v1.BillingService/ListProjects", "content-type": "application/grpc" },
        { endStream: false },
      );
      stalled.on("error", () => {});
      stalled.on("data", () => {});
      // A gRPC frame header announcing 10 bytes, and then nothing.
      stalled.write(Buffer.from([0, 0, 0, 0, 10]));
      const reset = new Promise<number>((resolve) => stalled.on("close", () => resolve(stalled.rstCode ?? -1)));
      expect(await Promise.race([reset, Bun.sleep(8_000).then(() => -1)])).toBe(http2.constants.NGHTTP2_CANCEL);

      // The same connection still serves a whole request.
      const whole = session.request({
        ":method": "POST",
        ":path": "/billing.v1.BillingService/ListProjects",
        "content-type": "application/json",
      });
      whole.end("{}");
      let body = "";
      whole.on("data", (d: Buffer) => {
        body += d.toString();
      });
      const status = await new Promise<unknown>((resolve) => whole.on("response", (h) => resolve(h[":status"])));
      await new Promise((resolve) => whole.on("close", resolve));
      expect([status, body]).toEqual([200, "{}"]);

      // A bidi stream whose next message comes after the limit is not cut.
      const client = createServiceClient(AnalyticsService, { baseUrl: own.url });
      async function* batches() {
        yield { gatewayInstanceId: "g", sequence: 1n, metrics: [] };
        await Bun.sleep(1_800);
        yield { gatewayInstanceId: "g", sequence: 2n, metrics: [] };
      }
      const acks: bigint[] = [];
      for await (const ack of client.ingestMetrics(batches())) acks.push(ack.ackedSequence);
      expect(acks).toEqual([1n, 2n]);
    } finally {
      session.close();
      await own.close(0);
    }
  }, 15_000);
});

describe("responses a client stops taking", () => {
  test("over HTTP/2 the stalled stream alone is reset: an IngestMetrics stream and new calls on its session go on", async () => {
    const own = await startOwn({
      name: "stalled-h2-responses",
      connectionIdleTimeoutMs: 1_000,
      routes: (router) => {
        router.service(BillingService, {
          listProjects: async () => ({ projects: [] }),
          // Far more than a stream's window, for as long as the client takes it.
          async *watchKeyChanges() {
            for (;;) {
              yield { apiKeyId: "k".repeat(1000) };
              await Bun.sleep(0);
            }
          },
        });
        router.service(AnalyticsService, ackingIngest);
      },
    });
    const session = http2.connect(own.url);
    session.on("error", () => {});
    const enveloped = (value: unknown) => grpcFrame(Buffer.from(JSON.stringify(value)));
    const call = (path: string) =>
      session.request({ ":method": "POST", ":path": path, "content-type": "application/connect+json" }, { endStream: false });
    try {
      // The gateway's long-lived stream, its acks read as they come.
      const ingest = call("/analytics.v1.AnalyticsService/IngestMetrics");
      ingest.on("error", () => {});
      let acks = "";
      ingest.on("data", (d: Buffer) => {
        acks += d.toString("latin1");
      });
      const acked = async (sequence: string) => {
        for (let i = 0; i < 100 && !acks.includes(`"ackedSequence":"${sequence}"`); i++) await Bun.sleep(20);
        return acks.includes(`"ackedSequence":"${sequence}"`);
      };
      ingest.write(enveloped({ gatewayInstanceId: "g", sequence: "1", metrics: [] }));
      expect(await acked("1")).toBe(true);

      // A server stream whose first bytes are taken, and then nothing.
      const stalled = call("/billing.v1.BillingService/WatchKeyChanges");
      stalled.on("error", () => {});
      stalled.once("data", () => stalled.pause());
      stalled.end(enveloped({}));
      const reset = new Promise<number>((resolve) => stalled.once("close", () => resolve(stalled.rstCode ?? -1)));
      expect(await Promise.race([reset, Bun.sleep(8_000).then(() => -1)])).toBe(http2.constants.NGHTTP2_CANCEL);

      // The session is still open: its stream goes on and it takes new calls.
      expect([session.closed, session.destroyed]).toEqual([false, false]);
      ingest.write(enveloped({ gatewayInstanceId: "g", sequence: "2", metrics: [] }));
      expect(await acked("2")).toBe(true);
      const unary = session.request({
        ":method": "POST",
        ":path": "/billing.v1.BillingService/ListProjects",
        "content-type": "application/json",
      });
      unary.end("{}");
      let body = "";
      unary.on("data", (d: Buffer) => {
        body += d.toString();
      });
      const status = await new Promise<unknown>((resolve) => unary.on("response", (h) => resolve(h[":status"])));
      await new Promise((resolve) => unary.on("close", resolve));
      expect([status, body]).toEqual([200, "{}"]);
      ingest.end();
      await new Promise((resolve) => ingest.on("close", resolve));
      expect(ingest.rstCode).toBe(http2.constants.NGHTTP2_NO_ERROR);
    } finally {
      session.close();
      await own.close(0);
    }
  }, 15_000);
});

describe("whole answers larger than a stream's window", () => {
  test("arrive whole over HTTP/2 and HTTP/1.1; one the client stops taking is cut at the idle limit", async () => {
    const { send } = await import("./server.ts");
    // 8 MB: more than a stream's window, and than the kernel's socket buffers take in at once.
    const answer = "x".repeat(8_000_000);
    const own = await startOwn({
      name: "whole-answers",
      connectionIdleTimeoutMs: 1_000,
      routes: (router) => router.service(AnalyticsService, ackingIngest),
      http: async (req, res) => {
        if (req.url !== "/whole") return false;
        send(res, 200, { "content-type": "text/plain" }, answer);
        return true;
      },
    });
    const session = http2.connect(own.url);
    session.on("error", () => {});
    const request = () => {
      const stream = session.request({ ":path": "/whole" });
      stream.on("error", () => {});
      const closed = new Promise<number>((resolve) => stream.once("close", () => resolve(stream.rstCode ?? -1)));
      return { stream, closed };
    };
    try {
      // Over HTTP/2 it was reset (INTERNAL_ERROR) 64 KiB in.
      const whole = request();
      let got = 0;
      whole.stream.on("data", (d: Buffer) => {
        got += d.length;
      });
      expect(await whole.closed).toBe(http2.constants.NGHTTP2_NO_ERROR);
      expect(got).toBe(answer.length);
      const res = await fetch(`${own.url}/whole`);
      expect(res.headers.get("content-length")).toBe(String(answer.length));
      expect((await res.text()).length).toBe(answer.length);

      // Its first bytes taken, then nothing: the stream is reset, its session goes on.
      const stalled = request();
      stalled.stream.once("data", () => stalled.stream.pause());
      expect(await Promise.race([stalled.closed, Bun.sleep(8_000).then(() => -1)])).toBe(http2.constants.NGHTTP2_CANCEL);
      expect(session.closed).toBe(false);
      // Over HTTP/1.1 its connection is closed, short of the answer.
      const socket = net.connect(Number(new URL(own.url).port), "127.0.0.1");
      socket.on("error", () => {});
      let taken = 0;
      const ended = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      socket.once("data", (d: Buffer) => {
        taken += d.length;
        socket.pause();
      });
      socket.write("GET /whole HTTP/1.1\r\nHost: a\r\n\r\n");
      await Bun.sleep(2_500);
      socket.on("data", (d: Buffer) => {
        taken += d.length;
      });
      socket.resume();
      expect(await Promise.race([ended.then(() => "closed"), Bun.sleep(5_000).then(() => "still open")])).toBe("closed");
      expect(taken).toBeLessThan(answer.length);
    } finally {
      session.close();
      await own.close(0);
    }
  }, 20_000);
});

describe("connections with nothing to do", () => {
  test("are closed after the idle limit: silent, a head that stops, an HTTP/2 session without streams", async () => {
    const own = await startOwn({
      name: "idle",
      connectionIdleTimeoutMs: 1_000,
      routes: (router) => router.service(AnalyticsService, ackingIngest),
    });
    const { port } = new URL(own.url);
    const open = (first?: string) => {
      const socket = net.connect(Number(port), "127.0.0.1");
      socket.on("error", () => {});
      socket.on("data", () => {});
      if (first) socket.write(first);
      return new Promise<string>((resolve) => socket.on("close", () => resolve("closed")));
    };
    try {
      const silent = open();
      const halfHead = open("GET /healthz HTTP/1.1\r\nHost: a\r\n");
      const bareSession = open("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
      // A keep-alive connection after its answer.
      const answered = open("GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
      const within = (p: Promise<string>) => Promise.race([p, Bun.sleep(8_000).then(() => "still open")]);
      expect(await Promise.all([silent, halfHead, bareSession, answered].map(within))).toEqual([
        "closed",
        "closed",
        "closed",
        "closed",
      ]);

      // A stream keeps its session busy however long it waits between messages.
      const client = createServiceClient(AnalyticsService, { baseUrl: own.url });
      async function* batches() {
        yield { gatewayInstanceId: "g", sequence: 1n, metrics: [] };
        await Bun.sleep(2_500);
        yield { gatewayInstanceId: "g", sequence: 2n, metrics: [] };
      }
      const acks: bigint[] = [];
      for await (const ack of client.ingestMetrics(batches())) acks.push(ack.ackedSequence);
      expect(acks).toEqual([1n, 2n]);
    } finally {
      await own.close(0);
    }
  }, 20_000);
});

describe("RPC metrics", () => {
  test("a stream is counted when it ends, with the code its client saw and its whole duration", async () => {
    const own = createMetrics("streams");
    const server = await startOwn({
      name: "streams",
      interceptors: [own.serverInterceptor],
      routes: (router) => {
        router.service(BillingService, {
          async *watchKeyChanges() {
            yield { apiKeyId: "key_1" };
            await Bun.sleep(250);
            throw new ConnectError("the store went away", Code.Unavailable);
          },
        });
        router.service(AnalyticsService, ackingIngest);
      },
    });
    const handled = async (method: string) => {
      const values = (await own.registry.getSingleMetric("rpc_server_handled_total")?.get())?.values ?? [];
      return Object.fromEntries(values.filter((v) => v.labels.rpc_method === method).map((v) => [v.labels.code, v.value]));
    };
    const seconds = async (method: string, code: string) => {
      const values = (await own.registry.getSingleMetric("rpc_server_handling_seconds")?.get())?.values ?? [];
      const sum = (v: (typeof values)[number]) => (v as { metricName?: string }).metricName?.endsWith("_sum");
      return values.find((v) => sum(v) && v.labels.rpc_method === method && v.labels.code === code)?.value;
    };
    try {
      const billing = createServiceClient(BillingService, { baseUrl: server.url });
      const failed = await (async () => {
        for await (const _ of billing.watchKeyChanges({}));
      })().catch((e: unknown) => ConnectError.from(e));
      expect((failed as ConnectError).code).toBe(Code.Unavailable);
      expect(await handled("WatchKeyChanges")).toEqual({ unavailable: 1 });
      expect(await seconds("WatchKeyChanges", "unavailable")).toBeGreaterThanOrEqual(0.2);

      // A bidi stream is counted once its last message is sent, not when it opens.
      const analytics = createServiceClient(AnalyticsService, { baseUrl: server.url });
      let open = -1;
      async function* batches() {
        yield { gatewayInstanceId: "g", sequence: 1n, metrics: [] };
        await Bun.sleep(250);
        open = Object.keys(await handled("IngestMetrics")).length;
        yield { gatewayInstanceId: "g", sequence: 2n, metrics: [] };
      }
      for await (const _ of analytics.ingestMetrics(batches()));
      expect(open).toBe(0);
      expect(await handled("IngestMetrics")).toEqual({ ok: 1 });
      expect(await seconds("IngestMetrics", "ok")).toBeGreaterThanOrEqual(0.2);
    } finally {
      await server.close(0);
    }
  });

  test("a call whose client left while its message arrived is counted as the client's leaving", async () => {
    const own = createMetrics("left");
    const server = await startOwn({
      name: "left",
      interceptors: [own.serverInterceptor],
      routes: (router) => {
        router.service(BillingService, {
          async *watchKeyChanges() {
            yield { apiKeyId: "key_1" };
          },
        });
        router.service(AnalyticsService, ackingIngest);
      },
    });
    const handled = async () => {
      const values = (await own.registry.getSingleMetric("rpc_server_handled_total")?.get())?.values ?? [];
      return Object.fromEntries(values.filter((v) => v.value > 0).map((v) => [String(v.labels.code), v.value])) as Record<string, number>;
    };
    const path = "/billing.v1.BillingService/WatchKeyChanges";
    try {
      // gRPC streams reset (RST_STREAM CANCEL) before their message, and part-way through it (its 5-byte prefix and
      // one byte of 10): read as a missing message (Unimplemented) and a broken envelope (InvalidArgument).
      const session = http2.connect(server.url);
      for (const sent of [[], [0, 0, 0, 0, 10, 1]]) {
        const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
        stream.on("error", () => {});
        if (sent.length > 0) stream.write(Buffer.from(sent));
        await Bun.sleep(50);
        stream.close(http2.constants.NGHTTP2_CANCEL);
      }
      // A Connect stream whose HTTP/1.1 connection drops part-way through its message: read as an unknown error.
      const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
      await new Promise((resolve) => socket.once("connect", resolve));
      socket.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/connect+proto\r\nContent-Length: 20\r\n\r\n\0\0\0\0\n\x01`);
      await Bun.sleep(50);
      socket.destroy();
      const count = async () => Object.values(await handled()).reduce((a, b) => a + b, 0);
      for (let waited = 0; (await count()) < 3 && waited < 2000; waited += 10) await Bun.sleep(10);
      expect(await handled()).toEqual({ canceled: 2, aborted: 1 });
      session.close();

      // A client that sends no message at all is still told so.
      await fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/connect+proto" } }).then((r) => r.arrayBuffer());
      expect(await handled()).toEqual({ canceled: 2, aborted: 1, unimplemented: 1 });
    } finally {
      await server.close(0);
    }
  });
});

describe("binary messages that do not decode", () => {
  test("are the caller's InvalidArgument on every protocol, unary and streamed, gated or not", async () => {
    const own = createMetrics("undecodable");
    const server = await startOwn({
      name: "undecodable",
      interceptors: [own.serverInterceptor],
      routes: (router) => {
        router.service(BillingService, {
          async createOrganization(req) {
            return { organization: create(OrganizationSchema, { id: "org_1", name: req.name }) };
          },
          // A response the handler itself could not read is its own fault.
          async listOrganizations() {
            throw new ConnectError("parse binary: premature EOF", Code.Internal);
          },
        });
        router.service(AnalyticsService, ackingIngest);
        router.rpc(BillingService.method.listProjects, async () => ({}), { requestGate: () => {} });
      },
    });
    const handled = async () => {
      const values = (await own.registry.getSingleMetric("rpc_server_handled_total")?.get())?.values ?? [];
      const counted = values.filter((v) => v.value > 0).map((v) => [`${v.labels.rpc_method} ${v.labels.code}`, v.value]);
      return Object.fromEntries(counted) as Record<string, number>;
    };
    // name = 1: a lone surrogate as a JavaScript protobuf encoder writes it (ED A0 80), not UTF-8.
    const notUtf8 = new Uint8Array([0x0a, 0x03, 0xed, 0xa0, 0x80]);
    try {
      const post = (path: string, contentType: string, body: Uint8Array) =>
        fetch(`${server.url}/billing.v1.BillingService/${path}`, { method: "POST", headers: { "content-type": contentType }, body });
      for (const [path, body] of [
        ["CreateOrganization", notUtf8],
        ["ListProjects", notUtf8],
        ["CreateOrganization", new Uint8Array([0x0a, 0x09, 0x41])],
      ] as const) {
        const res = await post(path, "application/proto", body);
        expect(res.status).toBe(400);
        expect(((await res.json()) as { code: string }).code).toBe("invalid_argument");
      }
      const web = await post("CreateOrganization", "application/grpc-web+proto", grpcFrame(notUtf8));
      expect(Buffer.from(await web.arrayBuffer()).toString()).toContain("grpc-status: 3");

      const session = http2.connect(server.url);
      const grpcStatus = (path: string, body: Uint8Array) =>
        new Promise<unknown>((resolve) => {
          const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
          stream.on("trailers", (trailers) => resolve(trailers["grpc-status"]));
          stream.on("error", () => {});
          stream.resume();
          stream.end(grpcFrame(body));
        });
      expect(await grpcStatus("/billing.v1.BillingService/CreateOrganization", notUtf8)).toBe("3");
      // gateway_instance_id = 1 of an IngestMetrics batch, read by its handler.
      expect(await grpcStatus("/analytics.v1.AnalyticsService/IngestMetrics", notUtf8)).toBe("3");
      expect(await grpcStatus("/billing.v1.BillingService/ListOrganizations", new Uint8Array())).toBe("13");
      session.close();
      expect(await handled()).toEqual({
        "CreateOrganization invalid_argument": 4,
        "ListProjects invalid_argument": 1,
        "IngestMetrics invalid_argument": 1,
        "ListOrganizations internal": 1,
      });
    } finally {
      await server.close(0);
    }
  });
});

describe("JSON messages that are not UTF-8", () => {
  test("are the caller's InvalidArgument, as binary ones are, not text with replacement characters", async () => {
    const names: string[] = [];
    const server = await startOwn({
      name: "json-not-utf8",
      routes: (router) => {
        router.service(BillingService, {
          async createOrganization(req) {
            names.push(req.name);
            return { organization: create(OrganizationSchema, { id: "org_1", name: req.name }) };
          },
        });
      },
    });
    try {
      // "Société" as a Latin-1 encoder writes it (Python's http.client does for a str body): E9 is not UTF-8.
      const latin1 = Buffer.from('{"name":"Soci\u00e9t\u00e9"}', "latin1");
      const post = (contentType: string, body: Uint8Array) =>
        fetch(`${server.url}/billing.v1.BillingService/CreateOrganization`, {
          method: "POST",
          headers: { "content-type": contentType },
          body,
        });
      const res = await post("application/json", latin1);
      expect(res.status).toBe(400);
      expect(((await res.json()) as { code: string }).code).toBe("invalid_argument");
      const web = await post("application/grpc-web+json", grpcFrame(latin1));
      expect(Buffer.from(await web.arrayBuffer()).toString()).toContain("grpc-status: 3");
      expect(names).toEqual([]);
      // The same name in UTF-8 is read as it was written.
      const utf8 = await post("application/json", Buffer.from('{"name":"Soci\u00e9t\u00e9"}'));
      expect(utf8.status).toBe(200);
      expect(names).toEqual(["Soci\u00e9t\u00e9"]);
    } finally {
      await server.close(0);
    }
  });
});

describe("connections past their age", () => {
  /** A server whose AuthorizeKey says which connection it came in on, and waits for it to age out if asked. */
  const startAging = (options: { maxAgeMs: number; graceMs?: number }) => {
    const connections: object[] = [];
    const server = startOwn({
      name: "aging",
      connectionMaxAgeMs: options.maxAgeMs,
      connectionMaxAgeGraceMs: options.graceMs,
      routes: (router) =>
        router.service(BillingService, {
          async authorizeKey(req, ctx) {
            const connection = ctx.values.get(connectionKey) ?? {};
            if (!connections.includes(connection)) connections.push(connection);
            const ending = ctx.values.get(connectionEndingKey);
            if (req.secret === "until-aged") await new Promise((resolve) => ending.addEventListener("abort", resolve));
            // Still running once its connection has been sent GOAWAY.
            if (req.secret === "until-aged") await Bun.sleep(50);
            if (req.secret === "forever") await new Promise(() => {});
            return { organization: { id: String(connections.indexOf(connection)) } };
          },
          async *watchKeyChanges(_req, ctx) {
            yield {};
            const ending = ctx.values.get(connectionEndingKey);
            await new Promise((resolve) => ending.addEventListener("abort", resolve));
          },
        }),
    });
    return { server, connections };
  };

  test("over HTTP/2 are sent GOAWAY: a call in flight finishes, the next goes on a new connection", async () => {
    const aging = startAging({ maxAgeMs: 200 });
    const server = await aging.server;
    try {
      const billing = createServiceClient(BillingService, { baseUrl: server.url, timeoutMs: 10_000 });
      expect((await billing.authorizeKey({})).organization?.id).toBe("0");
      // Answered on its connection after the GOAWAY went out.
      expect((await billing.authorizeKey({ secret: "until-aged" })).organization?.id).toBe("0");
      expect((await billing.authorizeKey({})).organization?.id).toBe("1");
      // An endless stream is ended on its connection's age, cleanly: its client opens it again.
      let messages = 0;
      for await (const _ of billing.watchKeyChanges({}, { timeoutMs: 0 })) messages++;
      expect(messages).toBe(1);
      // So is a Health/Watch stream.
      const health = createServiceClient(Health, { baseUrl: server.url });
      const statuses: Status[] = [];
      for await (const res of health.watch({}, { timeoutMs: 0 })) statuses.push(res.status);
      expect(statuses).toEqual([Status.SERVING]);
      expect(aging.connections.length).toBeGreaterThanOrEqual(2);
    } finally {
      await server.close(0);
    }
  });

  test("over HTTP/2 a call still running at the end of the grace is cut with its connection; new calls are served", async () => {
    const aging = startAging({ maxAgeMs: 100, graceMs: 100 });
    const server = await aging.server;
    try {
      const billing = createServiceClient(BillingService, { baseUrl: server.url, timeoutMs: 10_000 });
      const outcome = await billing.authorizeKey({ secret: "forever" }).then(
        () => "answered",
        (e: unknown) => Code[ConnectError.from(e).code],
      );
      expect(outcome).toBe("Unavailable");
      expect((await billing.authorizeKey({})).organization?.id).toBe("1");
    } finally {
      await server.close(0);
    }
  });

  test("over HTTP/1.1 a kept-alive connection past its age is closed after its next answer", async () => {
    const server = await startOwn({ name: "aging-h1", connectionMaxAgeMs: 100, routes: () => {} });
    try {
      const connection = keptAliveConnection(server.url);
      const first = await connection.get("/healthz");
      expect(first).not.toMatch(/^connection: close/im);
      let answer = first;
      while (!/^connection: close/im.test(answer)) {
        await Bun.sleep(20);
        answer = await connection.get("/healthz");
        expect(answer).toStartWith("HTTP/1.1 200");
      }
      await connection.closed;
    } finally {
      await server.close(0);
    }
  });
});

describe("requests one HTTP/1.1 connection may have waiting", () => {
  test("are bounded: a connection that pipelines more than the limit is closed, fewer are all answered", async () => {
    const pipeline = async (count: number) => {
      const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
      let received = "";
      let closed = false;
      socket.on("data", (d) => (received += d.toString()));
      socket.on("error", () => {});
      socket.on("close", () => (closed = true));
      socket.write("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(count));
      const answers = () => received.split("HTTP/1.1 200").length - 1;
      for (let waited = 0; !closed && answers() < count && waited < 5_000; waited += 10) await Bun.sleep(10);
      await Bun.sleep(100);
      socket.destroy();
      return { answers: answers(), closed };
    };
    // A client that sends thousands at once would otherwise have every answer held until it read them.
    const many = await pipeline(5_000);
    expect(many.closed).toBe(true);
    expect(many.answers).toBeLessThanOrEqual(maxPipelinedRequests);
    expect(await pipeline(maxPipelinedRequests)).toEqual({ answers: maxPipelinedRequests, closed: false });
  });
});

describe("streams one HTTP/2 connection may hold", () => {
  test("are bounded: past the limit a stream is refused, and the mesh's own client waits for a free one", async () => {
    const server = await startOwn({
      name: "streams",
      routes: (router) => {
        router.service(BillingService, {
          async listOrganizations() {
            await Bun.sleep(200);
            return { organizations: [] };
          },
        });
      },
    });
    try {
      // Streams that send their headers and never their body, from a client that takes no notice of the server's
      // SETTINGS, as an attacker would not: each would be held for the 120 s a body may take.
      const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
      await new Promise((resolve) => socket.once("connect", resolve));
      const frame = (type: number, flags: number, stream: number, payload: Uint8Array) => {
        const head = Buffer.alloc(9);
        head.writeUIntBE(payload.length, 0, 3);
        head[3] = type;
        head[4] = flags;
        head.writeUInt32BE(stream, 5);
        return Buffer.concat([head, payload]);
      };
      const frames: Array<{ type: number; payload: Buffer }> = [];
      let pending = Buffer.alloc(0);
      socket.on("data", (data: Buffer) => {
        pending = Buffer.concat([pending, data]);
        while (pending.length >= 9 && pending.length >= 9 + pending.readUIntBE(0, 3)) {
          const length = pending.readUIntBE(0, 3);
          frames.push({ type: pending[3] ?? 0, payload: pending.subarray(9, 9 + length) });
          pending = pending.subarray(9 + length);
        }
      });
      const path = "/billing.v1.BillingService/ListOrganizations";
      // HPACK: POST, http, :authority "x", :path and content-type as literals.
      const headers = Buffer.concat([
        Buffer.from([0x83, 0x86, 0x01, 1, 0x78, 0x04, path.length]),
        Buffer.from(path),
        Buffer.from([0x0f, 0x10, "application/proto".length]),
        Buffer.from("application/proto"),
      ]);
      socket.write("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
      socket.write(frame(4, 0, 0, new Uint8Array()));
      for (let i = 0; i < maxStreamsPerConnection + 20; i++) socket.write(frame(1, 0x4, 1 + 2 * i, headers));
      const refused = () => frames.filter((f) => f.type === 3 && f.payload.readUInt32BE(0) === 7).length;
      for (let waited = 0; refused() < 20 && waited < 5_000; waited += 10) await Bun.sleep(10);
      await Bun.sleep(100);
      expect(refused()).toBe(20);
      // SETTINGS_MAX_CONCURRENT_STREAMS (3), as the server's first SETTINGS announced it.
      const settings = frames.find((f) => f.type === 4 && f.payload.length > 0)?.payload ?? Buffer.alloc(0);
      const announced = new Map<number, number>();
      for (let at = 0; at + 6 <= settings.length; at += 6) announced.set(settings.readUInt16BE(at), settings.readUInt32BE(at + 2));
      expect(announced.get(3)).toBe(maxStreamsPerConnection);
      socket.destroy();

      // More calls at once than a connection takes streams: each waits its turn instead of being refused, which
      // soon closes the connection and fails every call on it.
      const billing = createServiceClient(BillingService, { baseUrl: server.url });
      const calls = await Promise.allSettled(
        Array.from({ length: maxStreamsPerConnection + 200 }, () => billing.listOrganizations({})),
      );
      expect(calls.filter((c) => c.status === "rejected").map((c) => String(c.reason)).slice(0, 3)).toEqual([]);
    } finally {
      await server.close(0);
    }
  }, 30_000);
});

describe("deadlines", () => {
  test("one already passed when the call arrives (0) is answered DeadlineExceeded, gated or not, never left hanging", async () => {
    for (const requestGate of [undefined, () => {}]) {
      const server = await startOwn({
        name: "deadlines",
        requestGate,
        routes: (router) => {
          router.service(BillingService, {
            async listOrganizations() {
              return { organizations: [] };
            },
          });
        },
      });
      try {
        const connect = await fetch(`${server.url}/billing.v1.BillingService/ListOrganizations`, {
          method: "POST",
          headers: { "content-type": "application/json", "connect-timeout-ms": "0" },
          body: "{}",
          signal: AbortSignal.timeout(3_000),
        });
        expect(connect.status).toBe(504);
        expect(((await connect.json()) as { code: string }).code).toBe("deadline_exceeded");
        const billing = createServiceClient(BillingService, { baseUrl: server.url });
        // The client's own deadline is what the server reads from grpc-timeout; a header of 0n is sent as is.
        const failed = await billing
          .listOrganizations({}, { headers: { "grpc-timeout": "0n" }, signal: AbortSignal.timeout(3_000) })
          .catch((e: unknown) => ConnectError.from(e));
        expect((failed as ConnectError).code).toBe(Code.DeadlineExceeded);
      } finally {
        await server.close(0);
      }
    }
  });

  test("one longer than a timer can wait (24.8 days) is held to it, not passed after 1 ms", async () => {
    const server = await startOwn({
      name: "deadlines",
      routes: (router) => {
        router.service(BillingService, {
          async listOrganizations(_req, ctx) {
            await Bun.sleep(50);
            if (ctx.signal.aborted) throw ctx.signal.reason;
            return { organizations: [create(OrganizationSchema, { id: String(ctx.timeoutMs()) })] };
          },
        });
      },
    });
    try {
      const billing = createServiceClient(BillingService, { baseUrl: server.url });
      const grpc = await billing.listOrganizations({}, { headers: { "grpc-timeout": "3000H" } });
      expect(Number(grpc.organizations[0]?.id)).toBeGreaterThan(2 ** 31 - 1000);
      const connect = await fetch(`${server.url}/billing.v1.BillingService/ListOrganizations`, {
        method: "POST",
        headers: { "content-type": "application/json", "connect-timeout-ms": "9999999999" },
        body: "{}",
      });
      expect(connect.status).toBe(200);
    } finally {
      await server.close(0);
    }
  });
});

describe("a long server stream", () => {
  test("holds none of the messages its client has taken while it goes on", async () => {
    let release = () => {};
    const goesOn = new Promise<void>((resolve) => (release = resolve));
    const count = 400;
    const server = await startOwn({
      name: "long-stream",
      routes: (router) =>
        router.service(BillingService, {
          async *watchKeyChanges() {
            for (let i = 0; i < count; i++) yield { apiKeyId: `${i}`.padEnd(64 * 1024, "x") };
            await goesOn;
          },
        }),
    });
    try {
      const billing = createServiceClient(BillingService, { baseUrl: server.url, timeoutMs: 10_000 });
      const messages = billing.watchKeyChanges({}, { timeoutMs: 0 })[Symbol.asyncIterator]();
      Bun.gc(true);
      const before = process.memoryUsage().heapUsed;
      for (let i = 0; i < count; i++) expect((await messages.next()).done).toBe(false);
      await Bun.sleep(100);
      Bun.gc(true);
      // 25 MiB were sent: the server holds a few of them at most while the stream is open.
      expect(process.memoryUsage().heapUsed - before).toBeLessThan(8 * 2 ** 20);
      release();
      expect((await messages.next()).done).toBe(true);
    } finally {
      release();
      await server.close(0);
    }
  });
});

describe("error messages that are not well-formed UTF-16", () => {
  test("are answered on every protocol, unary and streamed, a lone surrogate as U+FFFD", async () => {
    // Text cut inside a character (an emoji's first half), as an echo of a client's input or an upstream's message is.
    const cut = `too long: '${"\u{1F511}".repeat(3).slice(0, 5)}'`;
    const server = await startOwn({
      name: "lone-surrogates",
      routes: (router) => {
        router.service(BillingService, {
          async listOrganizations() {
            throw new ConnectError(cut, Code.InvalidArgument);
          },
        });
        router.service(AnalyticsService, {
          // biome-ignore lint/correctness/useYield: a stream that fails before its first ack
          async *ingestMetrics() {
            throw new ConnectError(cut, Code.InvalidArgument);
          },
        });
      },
    });
    try {
      const expected = `too long: '\u{1F511}\u{1F511}\ufffd'`;
      const transports = {
        grpc: createGrpcTransport({ baseUrl: server.url }),
        "grpc-web": createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" }),
        connect: createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
      };
      for (const [name, transport] of Object.entries(transports)) {
        const failure = (p: Promise<unknown>) =>
          p.then(
            () => `${name}: answered`,
            (e: unknown) => `${name}: ${Code[ConnectError.from(e).code]} ${ConnectError.from(e).rawMessage}`,
          );
        const unary = createClient(BillingService, transport).listOrganizations({}, { timeoutMs: 10_000 });
        expect(await failure(unary)).toBe(`${name}: InvalidArgument ${expected}`);
        if (name === "grpc-web" || name === "connect") continue;
        const stream = (async () => {
          for await (const _ of createClient(AnalyticsService, transport).ingestMetrics((async function* () {})(), { timeoutMs: 10_000 })) {
          }
        })();
        expect(await failure(stream)).toBe(`${name}: InvalidArgument ${expected}`);
      }
    } finally {
      await server.close(0);
    }
  });

  test("are answered when a JSON message fails to decode before its handler runs", async () => {
    const server = await startOwn({
      name: "lone-surrogates-json",
      routes: (router) => {
        router.service(BillingService, {
          async listOrganizations() {
            return {};
          },
        });
      },
    });
    const session = http2.connect(server.url);
    try {
      // page_size = "\ud83d": protobuf's refusal quotes the value, half of an emoji.
      const message = Buffer.from('{"pageSize":"\\ud83d"}');
      const envelope = grpcFrame(message);
      const path = "/billing.v1.BillingService/ListOrganizations";
      const grpc = await new Promise<string>((resolve) => {
        const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc+json", te: "trailers" });
        const unanswered = setTimeout(() => resolve("unanswered after 10 s"), 10_000);
        stream.on("trailers", (trailers) => {
          clearTimeout(unanswered);
          resolve(`${trailers["grpc-status"]} ${decodeURIComponent(String(trailers["grpc-message"]))}`);
        });
        stream.on("error", () => {});
        stream.resume();
        stream.end(envelope);
      });
      expect(grpc).toStartWith("3 ");
      expect(grpc).toEndWith('"\ufffd"');
      const post = (contentType: string, body: Uint8Array) =>
        fetch(`${server.url}${path}`, {
          method: "POST",
          headers: { "content-type": contentType },
          body,
          signal: AbortSignal.timeout(10_000),
        }).then((res) => res.text());
      const web = await post("application/grpc-web+json", envelope);
      expect(web).toContain("grpc-status: 3");
      expect(web).toContain(encodeURIComponent('"\ufffd"'));
      const connect = JSON.parse(await post("application/json", message)) as { code: string; message: string };
      expect(connect.code).toBe("invalid_argument");
      expect(connect.message).toEndWith('"\ufffd"');
    } finally {
      session.close();
      await server.close(0);
    }
  });
});

test("a handler that fails is logged with its request's path, not its query string, which may carry a credential", async () => {
  const lines: string[] = [];
  const own = await startServer({
    name: "failing-handler",
    port: 0,
    host: "127.0.0.1",
    log: createLogger({ service: "test", write: (line) => lines.push(line) }),
    routes: (router) => router.service(BillingService, {}),
    http: async () => {
      throw new Error("handler bug");
    },
  });
  try {
    const res = await fetch(`${own.url}/invoices/inv_1?access_token=query-credential-0123&sig=signature-0123`);
    expect(res.status).toBe(500);
    await res.text();
    const failed = lines.map((line) => JSON.parse(line)).filter((entry) => entry.msg === "http handler failed");
    // Logged whole before: the token's value went to the logs (only api-key= and Bearer were masked).
    expect(failed).toEqual([expect.objectContaining({ path: "/invoices/inv_1" })]);
    expect(lines.join("\n")).not.toContain("query-credential");
  } finally {
    await own.close(0);
  }
});
