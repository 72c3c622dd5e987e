import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createCorsPolicy } from "../../lib/cors.ts";
import { createMetrics } from "../../lib/metrics.ts";
import { insufficientQuota, rateLimited, upstreamFailed, upstreamRateLimited, upstreamUnavailable } from "../errors.ts";
import { rateLimitHeaders } from "../rate-limits.ts";
import { type FakeUpstream, startFakeUpstream } from "../testing/fake-upstream.ts";
import { oneModelRoutes, startTestGateway } from "../testing/served-gateway.ts";
import { errorResponse, exposedHeaders } from "./app.ts";

// Both ports that serve the REST API answer browsers the same way; the RPC port's RPCs too.
let upstream: FakeUpstream;
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
/** The default: any origin. */
let open: Awaited<ReturnType<typeof startTestGateway>>;
const app = "https://app.example.com";

beforeAll(async () => {
  upstream = startFakeUpstream();
  gateway = await startTestGateway(
    oneModelRoutes(upstream.url),
    { cors: createCorsPolicy([app], exposedHeaders), registry: createMetrics("gateway").registry },
  );
  open = await startTestGateway(oneModelRoutes(upstream.url), {
    cors: createCorsPolicy(["*"], exposedHeaders),
    registry: createMetrics("gateway").registry,
  });
});
afterAll(async () => {
  await Promise.all([gateway.close(), open.close()]);
  upstream.stop();
});

const chat = (base: string, origin?: string) =>
  fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: {
      authorization: "Bearer sk-good",
      "content-type": "application/json",
      ...(origin ? { origin } : {}),
    },
    body: JSON.stringify({ model: "ok", messages: [{ role: "user", content: "hello" }] }),
  });

describe.each([
  ["Bun's REST port", () => gateway.restUrl],
  ["the RPC port", () => gateway.url],
])("%s", (_name, base) => {
  test("a preflight from an allowed origin is granted what it asks", async () => {
    const before = upstream.requests.length;
    const res = await fetch(`${base()}/v1/chat/completions`, {
      method: "OPTIONS",
      headers: {
        origin: app,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-retry-count",
      },
    });
    expect(res.status).toBe(204);
    expect(res.headers.get("access-control-allow-origin")).toBe(app);
    expect(res.headers.get("access-control-allow-methods")).toBe("GET, POST, DELETE");
    expect(res.headers.get("access-control-allow-headers")).toBe("authorization, content-type, x-stainless-retry-count");
    expect(upstream.requests).toHaveLength(before);
  });

  test("answers to an allowed origin expose the request id and cost; others get no CORS headers", async () => {
    const allowed = await chat(base(), app);
    expect(allowed.status).toBe(200);
    expect(allowed.headers.get("access-control-allow-origin")).toBe(app);
    expect(allowed.headers.get("access-control-expose-headers")).toContain("x-gateway-cost-nanos");
    expect(allowed.headers.get("vary")).toBe("Origin");

    const other = await chat(base(), "https://elsewhere.example.com");
    expect(other.headers.get("access-control-allow-origin")).toBeNull();
    const plain = await chat(base());
    expect(plain.status).toBe(200);
    expect(plain.headers.get("access-control-allow-origin")).toBeNull();
    // Kept by a cache, either would be refused by a browser on the allowed origin: they say they vary by Origin.
    expect([other.headers.get("vary"), plain.headers.get("vary")]).toEqual(["Origin", "Origin"]);
  });
});

// /healthz, /readyz and /metrics take no token: answered to pages of any origin, any site a browser opens could read a
// gateway's metrics and dependency status wherever the browser reaches it.
describe.each([
  ["any origin, Bun's REST port", () => open.restUrl, "*"],
  ["any origin, the RPC port", () => open.url, "*"],
  ["a list, Bun's REST port", () => gateway.restUrl, app],
  ["a list, the RPC port", () => gateway.url, app],
])("%s: the routes without a token answer no origin", (_name, base, allowed) => {
  test("a cross-origin read of /metrics or /readyz gets no CORS headers; /v1/models with a key does", async () => {
    const metrics = await fetch(`${base()}/metrics`, { headers: { origin: app } });
    const ready = await fetch(`${base()}/readyz`, { headers: { origin: app } });
    if (base() === open.url) expect([metrics.status, ready.status]).toEqual([200, 200]);
    for (const res of [metrics, ready]) {
      expect(res.headers.get("access-control-allow-origin")).toBeNull();
      expect(res.headers.get("access-control-expose-headers")).toBeNull();
    }
    const models = await fetch(`${base()}/v1/models`, { headers: { authorization: "Bearer sk-good", origin: app } });
    expect(models.status).toBe(200);
    expect(models.headers.get("access-control-allow-origin")).toBe(allowed);
  });

  test("their preflights are refused as an unlisted origin's are", async () => {
    for (const route of ["/metrics", "/readyz", "/healthz"]) {
      const res = await fetch(`${base()}${route}`, {
        method: "OPTIONS",
        headers: { origin: app, "access-control-request-method": "GET" },
      });
      expect(res.status).toBe(204);
      expect(res.headers.get("access-control-allow-origin")).toBeNull();
      expect(res.headers.get("access-control-allow-methods")).toBeNull();
    }
  });
});

test("the health RPC answers no origin either", async () => {
  const res = await fetch(`${open.url}/grpc.health.v1.Health/Check`, {
    method: "POST",
    headers: { "content-type": "application/json", origin: app },
    body: "{}",
  });
  expect(await res.json()).toEqual({ status: "SERVING" });
  expect(res.headers.get("access-control-allow-origin")).toBeNull();
});

test("the RPCs answer an allowed origin too", async () => {
  const res = await fetch(`${gateway.url}/gateway.v1.GatewayService/ListModels`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json", origin: app },
    body: "{}",
  });
  expect(res.status).toBe(200);
  expect(res.headers.get("access-control-allow-origin")).toBe(app);
  expect(res.headers.get("access-control-expose-headers")).toContain("Grpc-Status");
});

test("browsers may read every header the OpenAI SDKs act on in the gateway's answers, retry-after-ms first", () => {
  const limits = rateLimitHeaders({
    requests: { limit: 60, remaining: 0, resetMs: 750 },
    tokens: { limit: 1000, remaining: 10, resetMs: 12_000 },
  });
  const answers = [
    rateLimited("requests", "slow down", 750, limits),
    insufficientQuota("no budget", 90),
    upstreamRateLimited("upstream limit", 2000),
    upstreamUnavailable("breakers open", 30),
    upstreamFailed("upstream failed"),
  ].map((e) => errorResponse(e, "01TEST", limits));
  const sent = new Set(answers.flatMap((a) => Object.keys(a.headers)).filter((name) => name !== "content-type"));
  expect(sent).toContain("retry-after-ms");
  expect([...sent].filter((name) => !exposedHeaders.includes(name))).toEqual([]);
});
