/**
 * Browsers as clients, in headless Chromium (Debian's package, driven by playwright-core): a page served from another
 * origin calls the mesh with fetch, as a web app would. The gateway allows any origin (the default, as OpenAI's API
 * does); billing is started allowing only the page's origin, and a page from a second origin is refused by it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { type Browser, chromium, type Page } from "playwright-core";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../../scripts/mesh.ts";

const chromiumPath = process.env.CHROMIUM_PATH ?? Bun.which("chromium") ?? Bun.which("chromium-browser");
if (!chromiumPath && process.env.CI) throw new Error("CI must provide Chromium (Debian's chromium package)");

const adminToken = "browser-admin-token-0123456789";
let dataDir: string;
let mesh: Mesh;
let demo: Demo;
let browser: Browser;
let pages: ReturnType<typeof Bun.serve>[] = [];
let app: Page;
let stranger: Page;
const logs: string[] = [];

/** A blank page at its own origin (each server is one origin: its port). */
const servePage = () =>
  Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    fetch: () =>
      new Response("<!doctype html><title>client</title><p>client", { headers: { "content-type": "text/html" } }),
  });

describe.skipIf(!chromiumPath)("browsers on other origins (needs Debian's chromium package)", () => {
  beforeAll(async () => {
    pages = [servePage(), servePage()];
    const [appOrigin, strangerOrigin] = pages.map((p) => `http://127.0.0.1:${p.port}`);
    dataDir = await mkdtemp(path.join(tmpdir(), "browser-e2e-"));
    mesh = await startMesh({
      dataDir,
      adminToken,
      ports: { gateway: 0, billing: 0, analytics: 0 },
      serviceEnv: { billing: { CORS_ALLOWED_ORIGINS: appOrigin } },
      onLine: (service, line) => logs.push(`[${service}] ${line}`),
    });
    demo = await ensureDemo(mesh, { dataDir, adminToken });
    browser = await chromium.launch({
      executablePath: chromiumPath ?? undefined,
      // Root in CI needs --no-sandbox; the rest keeps Chromium from calling out of this machine.
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    app = await browser.newPage();
    await app.goto(`${appOrigin}/`);
    stranger = await browser.newPage();
    await stranger.goto(`${strangerOrigin}/`);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    for (const p of pages) p.stop(true);
    const codes = await mesh?.stop();
    if (codes) expect(codes).toEqual({ gateway: 0, analytics: 0, billing: 0 });
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  }, 60_000);

  test("the OpenAI API: a whole completion with its headers readable, then a stream to [DONE]", async () => {
    const result = await app.evaluate(
      async ({ baseUrl, apiKey }) => {
        const post = (body: unknown) =>
          fetch(`${baseUrl}/chat/completions`, {
            method: "POST",
            headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
            body: JSON.stringify(body),
          });
        const messages = [{ role: "user", content: "hello from a browser" }];
        const whole = await post({ model: "mock", messages });
        const completion = (await whole.json()) as { choices: { message: { content: string } }[] };
        const streamed = await post({ model: "mock", messages, stream: true, stream_options: { include_usage: true } });
        const events = (await streamed.text()).split("\n\n").filter((e) => e !== "");
        return {
          status: whole.status,
          content: completion.choices[0]?.message.content,
          requestId: whole.headers.get("x-request-id"),
          cost: whole.headers.get("x-gateway-cost-nanos"),
          streamStatus: streamed.status,
          streamType: streamed.headers.get("content-type"),
          last: events.at(-1),
          usage: JSON.parse((events.at(-2) ?? "data: {}").slice(6)).usage,
        };
      },
      { baseUrl: demo.baseUrl, apiKey: demo.apiKey },
    );
    expect(result.status).toBe(200);
    expect(result.content).toContain("hello from a browser");
    expect(result.requestId).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(BigInt(result.cost ?? "-1")).toBeGreaterThan(0n);
    expect(result.streamStatus).toBe(200);
    expect(result.streamType).toStartWith("text/event-stream");
    expect(result.last).toBe("data: [DONE]");
    expect(result.usage.total_tokens).toBeGreaterThan(0);
  });

  test("an OpenAI error is readable too: status, JSON body and request id", async () => {
    const result = await app.evaluate(async (baseUrl) => {
      const res = await fetch(`${baseUrl}/models`, { headers: { authorization: "Bearer sk-not-a-key" } });
      return {
        status: res.status,
        body: (await res.json()) as { error: { code: string } },
        requestId: res.headers.get("x-request-id"),
      };
    }, demo.baseUrl);
    expect(result.status).toBe(401);
    expect(result.body.error.code).toBe("invalid_api_key");
    expect(result.requestId).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
  });

  test("the typed RPCs as Connect JSON, answers and errors", async () => {
    const result = await app.evaluate(
      async ({ gatewayUrl, apiKey }) => {
        const call = (key: string) =>
          fetch(`${gatewayUrl}/gateway.v1.GatewayService/ListModels`, {
            method: "POST",
            headers: {
              authorization: `Bearer ${key}`,
              "content-type": "application/json",
              "connect-protocol-version": "1",
            },
            body: "{}",
          });
        const ok = await call(apiKey);
        const refused = await call("sk-not-a-key");
        return {
          status: ok.status,
          models: ((await ok.json()) as { models: { id: string }[] }).models.map((m) => m.id),
          refusedStatus: refused.status,
          refused: (await refused.json()) as { code: string },
          errorCode: refused.headers.get("x-error-code"),
        };
      },
      { gatewayUrl: mesh.urls.gateway, apiKey: demo.apiKey },
    );
    expect(result.status).toBe(200);
    expect(result.models).toContain("mock");
    expect(result.refusedStatus).toBe(401);
    expect(result.refused.code).toBe("unauthenticated");
    expect(result.errorCode).toBe("invalid_api_key");
  });

  test("billing answers the origin it lists and no other", async () => {
    const listOrganizations = (billingUrl: string) =>
      fetch(`${billingUrl}/billing.v1.BillingService/ListOrganizations`, {
        method: "POST",
        // Runs in the page: the token is spelled out, not captured.
        headers: { authorization: "Bearer browser-admin-token-0123456789", "content-type": "application/json" },
        body: "{}",
      })
        .then(async (res) => ({
          status: res.status,
          orgs: ((await res.json()) as { organizations: unknown[] }).organizations.length,
        }))
        .catch((e: Error) => ({ failed: e.name }));
    expect(await app.evaluate(listOrganizations, mesh.urls.billing)).toEqual({ status: 200, orgs: 1 });
    // The browser refuses to hand over the answer (the preflight lacks Access-Control-Allow-Origin).
    expect(await stranger.evaluate(listOrganizations, mesh.urls.billing)).toEqual({ failed: "TypeError" });
  });
});
