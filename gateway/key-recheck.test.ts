import { afterAll, beforeAll, expect, test } from "bun:test";
import * as http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { Registry } from "prom-client";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { CreateChatCompletionRequestSchema } from "../gen/gateway/v1/gateway_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import { grpcFrame } from "../lib/grpc-frames.ts";
import { eventually } from "../test/support.ts";
import { mockRoutes } from "./testing.ts";
import { startTestGateway } from "./testing/served-gateway.ts";

// A key is checked as its call begins, before its body is read; bodies may take up to 120 s. A key revoked meanwhile
// is refused once the body is read, from the key cache billing's change stream keeps.
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
const registry = new Registry();
beforeAll(async () => {
  gateway = await startTestGateway(mockRoutes, { gated: true, registry });
});
afterAll(() => gateway.close());

const messages = [{ role: "user", content: "hello there" }];

/** Billing revokes the key, and its change stream tells the gateway's cache. */
const revoke = (secret: string) => {
  gateway.billing.revoke(secret);
  gateway.keys.forget(sha256Hex(secret));
};

/**
 * A chat completion over REST whose body is sent in two parts: `meanwhile` runs once the key has been checked, then the
 * rest is sent.
 */
async function restCall(base: string, secret: string, meanwhile: () => void) {
  const body = new TextEncoder().encode(JSON.stringify({ model: "mock", messages }));
  let send: ReadableStreamDefaultController<Uint8Array> | undefined;
  const calls = gateway.billing.calls();
  const answer = fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
    body: new ReadableStream<Uint8Array>({ start: (c) => void (send = c) }),
    duplex: "half",
  } as RequestInit);
  send?.enqueue(body.subarray(0, 10));
  await eventually(() => gateway.billing.calls() > calls, { what: "the key checked", intervalMs: 5 });
  meanwhile();
  send?.enqueue(body.subarray(10));
  send?.close();
  const res = await answer;
  const requestId = res.headers.get("x-request-id") ?? "";
  return { status: res.status, body: (await res.json()) as { error?: { code: string } }, requestId };
}

/** The same over gRPC: the request message in two parts, `meanwhile` between them once the key has been checked. */
async function rpcCall(secret: string, meanwhile: () => void) {
  const request = create(CreateChatCompletionRequestSchema, { params: { model: "mock", messages } });
  const envelope = grpcFrame(toBinary(CreateChatCompletionRequestSchema, request));
  const calls = gateway.billing.calls();
  const session = http2.connect(gateway.url);
  try {
    const stream = session.request({
      ":method": "POST",
      ":path": "/gateway.v1.GatewayService/CreateChatCompletion",
      "content-type": "application/grpc+proto",
      te: "trailers",
      authorization: `Bearer ${secret}`,
    });
    const answered = new Promise<{ status: string; requestId: string }>((resolve, reject) => {
      let headers: http2.IncomingHttpHeaders = {};
      let trailers: http2.IncomingHttpHeaders = {};
      stream.on("response", (h) => (headers = h));
      stream.on("trailers", (t) => (trailers = t));
      stream.on("error", reject);
      // A trailers-only answer (a refusal) carries its status in the headers.
      const status = () => String(trailers["grpc-status"] ?? headers["grpc-status"]);
      stream.on("close", () => resolve({ status: status(), requestId: String(headers["x-request-id"]) }));
      stream.resume();
    });
    stream.write(envelope.subarray(0, 8));
    await eventually(() => gateway.billing.calls() > calls, { what: "the key checked", intervalMs: 5 });
    meanwhile();
    stream.end(envelope.subarray(8));
    return await answered;
  } finally {
    session.close();
  }
}

test("a key revoked while its REST body arrives is refused 401 once it is read, on both ports, metered so", async () => {
  for (const [base, secret] of [
    [gateway.url, "sk-good"],
    [gateway.restUrl, "sk-org"],
  ] as const) {
    const { status, body, requestId } = await restCall(base, secret, () => revoke(secret));
    expect([status, body.error?.code]).toEqual([401, "invalid_api_key"]);
    expect(await gateway.row(requestId)).toMatchObject({ status: RequestStatus.UNAUTHORIZED, httpStatus: 401 });
  }
});

test("a key revoked while its RPC message arrives is Unauthenticated once it is read, and metered so", async () => {
  const { status, requestId } = await rpcCall("sk-proj2", () => revoke("sk-proj2"));
  expect(status).toBe(String(Code.Unauthenticated));
  expect(await gateway.row(requestId)).toMatchObject({ status: RequestStatus.UNAUTHORIZED, httpStatus: 401 });
});

test("a key still good when its body has arrived is served from the cache, without asking billing again", async () => {
  const before = gateway.billing.calls();
  expect((await restCall(gateway.url, "sk-proj1", () => {})).status).toBe(200);
  expect((await rpcCall("sk-rpm", () => {})).status).toBe("0");
  // Each key checked once, as its call began.
  expect(gateway.billing.calls() - before).toBe(2);
});

test("a call whose key is cached is one cache lookup, its body's arrival adding none", async () => {
  const hits = async () =>
    (await registry.getSingleMetric("gateway_key_cache_lookups_total")?.get())?.values.find((v) => v.labels.result === "hit")
      ?.value ?? 0;
  const chat = () =>
    fetch(`${gateway.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-proj1", "content-type": "application/json" },
      body: JSON.stringify({ model: "mock", messages }),
    });
  expect((await chat()).status).toBe(200);
  const before = await hits();
  for (let i = 0; i < 3; i++) expect((await chat()).status).toBe(200);
  expect((await hits()) - before).toBe(3);
});
