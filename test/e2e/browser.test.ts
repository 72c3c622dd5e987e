/**
 * Browsers as clients, in headless Chromium (Debian's package, driven by playwright-core): a page served from another
 * origin calls the mesh with fetch, as a web app would. The gateway allows any origin (the default, as OpenAI's API
 * does); billing is started allowing only the page's origin, and a page from a second origin is refused by it.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Browser, chromium, type Page } from "playwright-core";
import { ulid } from "ulid";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../../scripts/mesh.ts";
import { stopMesh } from "../support.ts";

const chromiumPath = process.env.CHROMIUM_PATH ?? Bun.which("chromium") ?? Bun.which("chromium-browser");
if (!chromiumPath && process.env.CI) throw new Error("CI must provide Chromium (Debian's chromium package)");
// Reads the text of printed pages, page by page.
const pdftotext = Bun.which("pdftotext");
if (!pdftotext && process.env.CI) throw new Error("CI must provide pdftotext (Debian's poppler-utils package)");

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
    await stopMesh(mesh, dataDir);
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

  test("no page reads the metrics or dependency status of a service, which take no token", async () => {
    const read = (url: string) =>
      fetch(url)
        .then((res) => ({ status: res.status }))
        .catch((e: Error) => ({ failed: e.name }));
    const ops = [mesh.urls.gateway, mesh.urls.billing, mesh.urls.analytics].flatMap((base) =>
      ["/metrics", "/readyz"].map((route) => `${base}${route}`),
    );
    // The gateway and analytics allow any origin, billing lists the app's.
    for (const url of ops) expect(await app.evaluate(read, url)).toEqual({ failed: "TypeError" });
    // The API with a key, on either of the gateway's ports, as before.
    const models = ({ url, apiKey }: { url: string; apiKey: string }) =>
      fetch(url, { headers: { authorization: `Bearer ${apiKey}` } }).then((res) => res.status);
    for (const base of [demo.baseUrl, `${mesh.urls.gateway}/v1`]) {
      expect(await app.evaluate(models, { url: `${base}/models`, apiKey: demo.apiKey })).toBe(200);
    }
  });

  test("an invoice with long unbroken names and many lines keeps its amounts on the printed page", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const { organization } = await billing.createOrganization({ name: `ACME_${"GLOBAL_HOLDINGS_".repeat(8)}LTD` });
    const orgId = organization?.id as string;
    const longModel = `accounts_fireworks_models_${"llama_v3p1_405b_instruct_".repeat(4)}ft`;
    const models = [longModel, ...Array.from({ length: 40 }, (_, i) => `model-${i}`)];
    await billing.recordUsage({
      records: models.map((model) => ({
        requestId: ulid(),
        orgId,
        model,
        provider: "mock",
        endpoint: Endpoint.CHAT_COMPLETIONS,
        usage: { inputTokens: 123_456_789n, outputTokens: 98_765_432n },
        costNanos: 1_234_567_890_123n,
        occurTime: timestampFromDate(new Date()),
      })),
    });
    const invoice = (await billing.generateInvoice({ orgId, periodTime: timestampFromDate(new Date()) })).invoice;

    // An A4 page's width less Chromium's default print margins, in CSS pixels.
    const page = await browser.newPage({ viewport: { width: 718, height: 1000 } });
    try {
      await page.setExtraHTTPHeaders({ authorization: `Bearer ${adminToken}` });
      await page.emulateMedia({ media: "print" });
      const res = await page.goto(`${mesh.urls.billing}/invoices/${invoice?.id}`);
      expect(res?.status()).toBe(200);
      // Run in the page, whose DOM types this project's TypeScript does not load.
      const layout = (await page.evaluate(`(() => {
        const right = (e) => Math.ceil(e.getBoundingClientRect().right);
        const title = document.querySelector("h1");
        return {
          width: document.documentElement.clientWidth,
          scrollWidth: document.documentElement.scrollWidth,
          rightmost: Math.max(...[...document.querySelectorAll("td, dd")].map(right)),
          amounts: document.querySelectorAll("table.lines td.num").length,
          titleLines: Math.round(title.getBoundingClientRect().height / parseFloat(getComputedStyle(title).lineHeight)),
        };
      })()`)) as Record<"width" | "scrollWidth" | "rightmost" | "amounts" | "titleLines", number>;
      // One line per model (no cost breakdown): its quantity and its amount.
      expect(layout.amounts).toBe(models.length * 2);
      expect(layout.scrollWidth).toBe(layout.width);
      expect(layout.rightmost).toBeLessThanOrEqual(layout.width);
      expect(layout.titleLines).toBe(1);
    } finally {
      await page.close();
    }
  });

  test.skipIf(!pdftotext)("a printed invoice keeps its totals and their notice on one page, wherever its lines end", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const { organization } = await billing.createOrganization({ name: "Printed" });
    const orgId = organization?.id as string;
    const record = (model: string) => ({
      requestId: ulid(),
      orgId,
      model,
      provider: "mock",
      endpoint: Endpoint.CHAT_COMPLETIONS,
      usage: { inputTokens: 1000n, outputTokens: 500n },
      costNanos: 123_456_789n,
      occurTime: timestampFromDate(new Date()),
    });
    await billing.recordUsage({ records: Array.from({ length: 35 }, (_, i) => record(`model-${i}`)) });
    const page = await browser.newPage();
    const pdf = path.join(dataDir, "invoice.pdf");
    const split: { lines: number; pages: number[] }[] = [];
    try {
      await page.setExtraHTTPHeaders({ authorization: `Bearer ${adminToken}` });
      // One more line each time, over more than a page's worth, so the page's end falls at every point of the totals.
      for (let lines = 36; lines <= 64; lines++) {
        await billing.recordUsage({ records: [record(`model-${lines - 1}`)] });
        const { invoice } = await billing.generateInvoice({ orgId, periodTime: timestampFromDate(new Date()) });
        await page.goto(`${mesh.urls.billing}/invoices/${invoice?.id}`);
        // Chromium's default margins when printing.
        await page.pdf({ path: pdf, format: "A4", margin: { top: "0.4in", bottom: "0.4in", left: "0.4in", right: "0.4in" } });
        const text = Bun.spawnSync([pdftotext as string, "-layout", pdf, "-"]).stdout.toString();
        const pages = text.split("\f").flatMap((printed, i) =>
          printed.split("\n").filter((l) => /^\s*(Subtotal|Discounts|Tax \(|Total)\b.*\$\d|not payable/.test(l)).map(() => i + 1),
        );
        expect(pages).toHaveLength(5);
        if (new Set(pages).size > 1) split.push({ lines, pages });
      }
    } finally {
      await page.close();
    }
    expect(split).toEqual([]);
  }, 120_000);
});
