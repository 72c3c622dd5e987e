import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { maxChatSpend } from "../../gateway/budget.ts";
import { loadGatewayConfig } from "../../gateway/config.ts";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { formatNanosUsd } from "../../lib/money.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually } from "../support.ts";

const root = path.resolve(import.meta.dir, "../..");
const adminToken = "e2e-admin-token-0123456789";
// Long enough that a stop which waited for open streams would be obvious.
const graceMs = 30_000;
let dataDir: string;
let mesh: Mesh;
let demo: Demo;
// The services' warnings and errors, shown when a wait on them times out.
const serviceLogs: string[] = [];

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "meshctl-e2e-"));
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    env: { SHUTDOWN_GRACE_MS: String(graceMs), LOG_LEVEL: "warn" },
    onLine: (service, line) => serviceLogs.push(`[${service}] ${line}`),
  });
  demo = await ensureDemo(mesh, { dataDir, adminToken });
}, 120_000);

afterAll(async () => {
  await mesh?.stop();
  await rm(dataDir, { recursive: true, force: true });
}, 90_000);

/** meshctl as a user runs it: its own process, configured by the environment. */
async function meshctl(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const proc = Bun.spawn([process.execPath, path.join(root, "bin/meshctl.ts"), ...args], {
    cwd: root,
    env: {
      PATH: process.env.PATH,
      BILLING_URL: mesh.urls.billing,
      ANALYTICS_URL: mesh.urls.analytics,
      ADMIN_TOKEN: adminToken,
    },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, out, err };
}


/** Budget leases the gateway has released to billing so far. */
async function leaseReleases(): Promise<number> {
  const text = await (await fetch(`${mesh.urls.gateway}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith('gateway_budget_lease_requests_total{outcome="released"'));
  return Number(line?.split(" ").at(-1) ?? 0);
}

interface UsageJson {
  requests?: string;
  costNanos?: string;
  rows?: { requests?: string; costNanos?: string }[];
}

describe("meshctl drives the mesh", () => {
  test("usage of a real request agrees between billing and analytics", async () => {
    const res = await fetch(`${demo.baseUrl}/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${demo.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "count me twice, bill me once" }] }),
    });
    expect(res.status).toBe(200);
    const cost = res.headers.get("x-gateway-cost-nanos");
    expect(Number(cost)).toBeGreaterThan(0);

    const billing = await eventually(async () => {
      const run = await meshctl("usage", "--org", demo.orgId, "--json");
      const usage = JSON.parse(run.out) as UsageJson;
      return usage.requests === "1" ? usage : undefined;
    }, { timeoutMs: 15_000, what: "the request billed" }).catch((e: Error) => {
      throw new Error(`${e.message}; service logs:\n${serviceLogs.slice(-50).join("\n")}`);
    });
    expect(billing.costNanos).toBe(cost ?? "");
    const analytics = JSON.parse((await meshctl("usage", "--org", demo.orgId, "--source", "analytics", "--json")).out);
    expect((analytics as UsageJson).rows?.[0]).toMatchObject({ requests: "1", costNanos: cost });

    const table = await meshctl("usage", "--org", demo.orgId);
    expect(table.code).toBe(0);
    expect(table.out).toContain(cost ?? "");

    // Its latency, per model, from analytics.
    const latency = JSON.parse((await meshctl("latency", "--org", demo.orgId, "--json")).out) as {
      models?: { model: string; requests: string; total?: { p50Us?: string } }[];
    };
    expect(latency.models).toHaveLength(1);
    expect(latency.models?.[0]).toMatchObject({ model: "mock", requests: "1" });
    expect(Number(latency.models?.[0]?.total?.p50Us)).toBeGreaterThan(0);
    const lines = (await meshctl("latency", "--org", demo.orgId)).out.split("\n");
    expect(lines[0]).toMatch(/^MODEL\s+REQUESTS\s+TOTAL MS\s+UPSTREAM MS\s+FIRST TOKEN MS\s+GATEWAY MS$/);
    expect(lines[1]).toMatch(/^mock\s+1\s+[0-9.]+ \/ [0-9.]+ \/ [0-9.]+\s/);
    // Its usage per model and key, from analytics' real query.
    const byKey = (await meshctl("usage", "--org", demo.orgId, "--by", "model,key")).out.split("\n");
    expect(byKey[0]).toMatch(/^MODEL\s+KEY\s+REQUESTS\s/);
    expect(byKey[1]).toMatch(new RegExp(`^mock\\s+key_\\w+\\s+1\\s+.*\\s${cost}\\s`));
    const empty = await meshctl("latency", "--org", demo.orgId, "--from", "2020-01-01", "--to", "2020-02-01", "--json");
    expect(JSON.parse(empty.out)).toEqual({ models: [] });
    expect((await meshctl("latency", "--org", "org_missing")).code).toBe(1);
    expect((await meshctl("latency")).code).toBe(2);
  }, 60_000);

  test("requests lists each request with its id and outcome, found again by --status and --id", async () => {
    const org = JSON.parse((await meshctl("orgs", "create", "Requests", "--json")).out).organization.id as string;
    const created = JSON.parse((await meshctl("keys", "create", "--org", org, "--rpm", "1", "--json")).out);
    const chat = () =>
      fetch(`${demo.baseUrl}/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${created.secret}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "list me" }] }),
      });
    const served = await chat();
    const refused = await chat();
    expect([served.status, refused.status]).toEqual([200, 429]);
    const servedId = served.headers.get("x-request-id") ?? "";
    const refusedId = refused.headers.get("x-request-id") ?? "";

    const listed = await eventually(async () => {
      const run = await meshctl("requests", "--org", org, "--json");
      const { requests } = JSON.parse(run.out) as { requests: { requestId: string; costNanos: string }[] };
      return requests.length === 2 ? requests : undefined;
    }, { timeoutMs: 15_000, what: "both requests in analytics" });
    // Newest first.
    expect(listed.map((r) => r.requestId)).toEqual([refusedId, servedId]);
    expect(listed[1]?.costNanos).toBe(served.headers.get("x-gateway-cost-nanos") ?? "");
    const lines = (await meshctl("requests", "--org", org, "--status", "rate_limited")).out.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^TIME\s+REQUEST ID\s+KEY\s+MODEL\s+ENDPOINT\s+STATUS\s+INPUT\s+OUTPUT\s+COST_NANOS\s+MS$/);
    expect(lines).toHaveLength(2);
    expect(lines[1]).toContain(`${refusedId}  ${created.apiKey.id}  mock   chat_completions  429 RATE_LIMITED rate_limit_exceeded`);
    const byId = await meshctl("requests", "--org", org, "--id", servedId, "--json");
    expect(JSON.parse(byId.out).requests.map((r: { requestId: string }) => r.requestId)).toEqual([servedId]);
    const first = await meshctl("requests", "--org", org, "--limit", "1");
    expect(first.out).toContain(refusedId);
    expect(first.out).not.toContain(servedId);
    expect(first.out).toContain("(the newest 1; more with a larger --limit)");
    const wrong = await meshctl("requests", "--org", org, "--status", "refused");
    expect({ code: wrong.code, err: wrong.err }).toMatchObject({ code: 2, err: expect.stringContaining("--status takes ok,") });
  }, 60_000);

  test("orgs, keys, discounts and an invoice rendered as HTML", async () => {
    const created = await meshctl("orgs", "create", "<script>alert(1)</script>", "--tax-bps", "2000");
    expect(created.code).toBe(0);
    const orgId = /^(org_\w+)/m.exec(created.out)?.[1] as string;
    expect((await meshctl("orgs", "list")).out).toContain(orgId);
    const key = await meshctl("keys", "create", "--org", orgId, "--budget-usd", "1");
    expect(key.out).toContain("secret (shown once");
    const discount = await meshctl("discounts", "add", "--org", orgId, "--name", "promo", "--kind", "promotional", "--percent", "10");
    expect(discount.code).toBe(0);
    const generated = await meshctl("invoices", "generate", "--org", orgId);
    expect(generated.code).toBe(0);
    const invoiceId = /\((inv_\w+)\)/.exec(generated.out)?.[1] as string;
    const html = await meshctl("invoices", "render", invoiceId, "--html");
    expect(html.code).toBe(0);
    expect(html.out).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
    expect(html.out).not.toContain("<script>");

    const missing = await meshctl("invoices", "show", "inv_missing");
    expect(missing.code).toBe(1);
    expect(missing.err).toBe("meshctl: [not_found] invoice inv_missing not found\n");
  }, 60_000);

  test("quota set keeps the limits it is not given, as in the README's example", async () => {
    const orgId = /^(org_\w+)/m.exec((await meshctl("orgs", "create", "quota")).out)?.[1] as string;
    const created = await meshctl(
      "keys",
      "create",
      "--org",
      orgId,
      "--budget-usd",
      "50",
      "--rpm",
      "60",
      "--models",
      "gpt-4o,mock",
    );
    const keyId = /^(key_\w+)/m.exec(created.out)?.[1] as string;
    const set = await meshctl("quota", "set", keyId, "--monthly-tokens", "1000000");
    expect(set).toMatchObject({ code: 0, err: "" });
    const limits = "budget $50/mo, 1000000 tok/mo, 60 rpm, models gpt-4o,mock";
    expect(set.out).toBe(`${keyId}: ${limits}\n`);
    expect((await meshctl("keys", "list", "--org", orgId)).out).toContain(limits);
    // An explicit 0 or empty list removes a limit.
    const cleared = await meshctl("quota", "set", keyId, "--rpm", "0", "--models", "");
    expect(cleared.out).toBe(`${keyId}: budget $50/mo, 1000000 tok/mo\n`);
  }, 60_000);

  test("a rotated key is refused at the same total spend as the key it replaced", async () => {
    const orgId = /^(org_\w+)/m.exec((await meshctl("orgs", "create", "rotation")).out)?.[1] as string;
    const body = { model: "mock", messages: [{ role: "user" as const, content: "rotate me" }], max_tokens: 1 };
    const chat = (secret: string) =>
      fetch(`${demo.baseUrl}/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    const created = (run: { out: string }) => ({
      id: /^(key_\w+)/m.exec(run.out)?.[1] as string,
      secret: /secret \(shown once, store it now\): (sk-mesh-\w+)/.exec(run.out)?.[1] as string,
    });

    // What one request costs, and what the gateway reserves for it before calling upstream.
    const probe = created(await meshctl("keys", "create", "--org", orgId, "--name", "probe"));
    const cost = BigInt((await chat(probe.secret)).headers.get("x-gateway-cost-nanos") ?? "0");
    expect(cost).toBeGreaterThan(0n);
    const price = loadGatewayConfig(path.join(root, "gateway/config.default.yaml")).models.get("mock")?.price;
    const reserved = maxChatSpend(body, price as NonNullable<typeof price>, 1).nanos;
    // Room for exactly four requests: the fifth cannot reserve its maximum.
    const budget = 3n * cost + reserved + cost / 2n;

    const old = created(await meshctl("keys", "create", "--org", orgId, "--budget-usd", formatNanosUsd(budget)));
    for (let i = 0; i < 2; i++) expect((await chat(old.secret)).status).toBe(200);
    const released = () => leaseReleases();
    const before = await released();
    const rotated = await meshctl("keys", "rotate", old.id);
    expect(rotated.code).toBe(0);
    const next = created(rotated);
    // The gateway hears of the revocation and gives the old key's lease back, so the new key can lease the rest.
    await eventually(async () => (await released()) > before, { what: "the old key's lease released" });

    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) statuses.push((await chat(next.secret)).status);
    expect(statuses).toEqual([200, 200, 429]);
    const refused = await chat(next.secret);
    expect(await refused.json()).toMatchObject({ error: { code: "insufficient_quota" } });
  }, 60_000);

  test("a made-up key asked for at once by many costs billing one lookup; a refused key made valid works at once", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const lookups = async () => {
      const text = await (await fetch(`${mesh.urls.billing}/metrics`)).text();
      const lines = text.split("\n").filter((l) => l.startsWith("rpc_server_handled_total{") && l.includes('rpc_method="AuthorizeKey"'));
      return lines.reduce((sum, l) => sum + Number(l.split(" ").at(-1)), 0);
    };
    const chat = (secret: string) =>
      fetch(`${mesh.urls.gateway}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "hello" }] }),
      });
    const before = await lookups();
    const madeUp = `sk-mesh-${Array.from({ length: 43 }, (_, i) => "XYZxyz789"[i % 9]).join("")}`;
    const refused = await Promise.all(Array.from({ length: 20 }, () => chat(madeUp)));
    expect(refused.map((r) => r.status)).toEqual(Array(20).fill(401));
    // Remembered as refused for a while: asking again costs billing nothing.
    expect((await chat(madeUp)).status).toBe(401);
    expect(await lookups()).toBe(before + 1);

    // A key refused as expired, then given a later expiry: billing announces the change, the refusal is forgotten.
    const { organization } = await billing.createOrganization({ name: "refused-then-valid" });
    const expiring = timestampFromMs(Date.now() + 1_000);
    const key = await billing.createApiKey({ orgId: organization?.id ?? "", limits: { expireTime: expiring } });
    await Bun.sleep(1_100);
    expect(await (await chat(key.secret)).json()).toMatchObject({ error: { code: "expired_api_key" } });
    await billing.updateApiKeyLimits({
      apiKeyId: key.apiKey?.id ?? "",
      limits: { expireTime: timestampFromMs(Date.now() + 3_600_000) },
      updateMask: { paths: ["expire_time"] },
    });
    // Within the 2 s a refusal is remembered at most.
    await eventually(async () => (await chat(key.secret)).status === 200, { timeoutMs: 2_000, intervalMs: 50 });
  }, 60_000);

  test("billing stops promptly on SIGTERM even with key change streams open", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
    const watching = new AbortController();
    const stream = (async () => {
      try {
        for await (const _ of billing.watchKeyChanges({}, { signal: watching.signal })) {
          // Only the stream's end matters.
        }
      } catch {
        // Ended by the server going away.
      }
    })();
    // Let the stream reach billing.
    await Bun.sleep(500);
    const started = Date.now();
    const code = await mesh.processes.billing.stop("SIGTERM", graceMs * 2);
    expect(code).toBe(0);
    expect(Date.now() - started).toBeLessThan(graceMs / 2);
    watching.abort();
    await stream;
  }, 90_000);

  test("with billing stopped, a key that cannot be checked is counted as unavailable under the model it named", async () => {
    // Stopped by the test above when run in order; stopping again is a no-op.
    await mesh.processes.billing.stop();
    // A key this gateway has never seen, so only billing could say whether it works.
    const secret = `sk-mesh-${Array.from({ length: 43 }, (_, i) => "ABCabc012"[i % 9]).join("")}`;
    const chat = (model: string) =>
      fetch(`${mesh.urls.gateway}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
        body: JSON.stringify({ model, messages: [{ role: "user", content: "hello" }] }),
      });
    for (const model of ["mock", "not-configured"]) {
      const res = await chat(model);
      expect(res.status).toBe(503);
      expect(await res.json()).toMatchObject({ error: { code: "auth_unavailable" } });
    }
    const text = await (await fetch(`${mesh.urls.gateway}/metrics`)).text();
    const refused = text.split("\n").filter((l) => l.startsWith("gateway_requests_total{") && l.includes('code="503"'));
    expect(refused.sort()).toEqual([
      'gateway_requests_total{endpoint="chat_completions",model="mock",provider="",status="unavailable",code="503",service="gateway"} 1',
      'gateway_requests_total{endpoint="chat_completions",model="unknown",provider="",status="unavailable",code="503",service="gateway"} 1',
    ]);
  }, 60_000);
});
