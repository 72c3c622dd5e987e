import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import type { DescMethod } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { AnalyticsService } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { GatewayService } from "../../gen/gateway/v1/gateway_pb.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually, stopMesh } from "../support.ts";

// Who may do what, across the three services, with billing's real answers about each kind of key: every RPC, the
// REST API and the invoice page, called by the admin, org A's key, a key of A's project, org B's key, a revoked, an
// expired and a suspended org's key, no credential, a credential that is not a bearer token, a made-up key, and a token
// that is no key and not the admin's (an operator's stale ADMIN_TOKEN).
const adminToken = "e2e-tenancy-admin-token-0123456789";
const callers = [
  "admin", "own", "project", "other", "revoked", "expired", "suspended", "none", "basic", "unknown", "stale",
] as const;
type Caller = (typeof callers)[number];
type Expected = Partial<Record<Caller, string>>;

let dataDir: string;
let mesh: Mesh;
const auth = {} as Record<Caller, string | undefined>;
const ids = {} as Record<"orgA" | "orgB" | "reqB" | "invA" | "respA" | "respP" | "itemA" | "keyB", string>;

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "mesh-tenancy-"));
  mesh = await startMesh({ dataDir, adminToken, ports: { gateway: 0, billing: 0, analytics: 0 }, onLine: () => {} });
  const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken });
  const org = async (name: string) => (await billing.createOrganization({ name })).organization?.id ?? "";
  const [orgA, orgB, orgC] = await Promise.all([org("A"), org("B"), org("C")]);
  const projectId = (await billing.createProject({ orgId: orgA, name: "p" })).project?.id ?? "";
  const expireTime = timestampFromMs(Date.now() + 1_000);
  const [own, project, other, revoked, expired, suspended] = await Promise.all([
    billing.createApiKey({ orgId: orgA }),
    billing.createApiKey({ orgId: orgA, projectId }),
    billing.createApiKey({ orgId: orgB }),
    billing.createApiKey({ orgId: orgA }),
    billing.createApiKey({ orgId: orgA, limits: { expireTime } }),
    billing.createApiKey({ orgId: orgC }),
  ]);
  await billing.revokeApiKey({ apiKeyId: revoked.apiKey?.id ?? "" });
  await billing.suspendOrganization({ orgId: orgC });
  const bearer = (secret: string) => `Bearer ${secret}`;
  Object.assign(auth, {
    admin: bearer(adminToken),
    own: bearer(own.secret),
    project: bearer(project.secret),
    other: bearer(other.secret),
    revoked: bearer(revoked.secret),
    expired: bearer(expired.secret),
    suspended: bearer(suspended.secret),
    none: undefined,
    basic: `Basic ${Buffer.from(`user:${own.secret}`).toString("base64")}`,
    unknown: bearer(`sk-mesh-${"x".repeat(43)}`),
    stale: bearer("an-earlier-admin-token-0123456789"),
  });
  const post = async (secret: string, path: string, body: object) => {
    const res = await fetch(`${mesh.openaiUrl}/v1/${path}`, {
      method: "POST",
      headers: { authorization: bearer(secret), "content-type": "application/json" },
      body: JSON.stringify({ model: "mock", ...body }),
    });
    expect(res.status).toBe(200);
    const answer = (await res.json()) as { id: string; output: { id: string }[] };
    return { requestId: res.headers.get("x-request-id") ?? "", body: answer };
  };
  const chat = { messages: [{ role: "user", content: "hi" }] };
  const [, fromB, respA, respP] = await Promise.all([
    post(own.secret, "chat/completions", chat),
    post(other.secret, "chat/completions", chat),
    post(own.secret, "responses", { input: "hi" }),
    post(project.secret, "responses", { input: "hi" }),
  ]);
  const analytics = createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics, bearerToken: adminToken });
  // B's request is recorded in both stores, so that A's keys failing to find it means something.
  await eventually(
    async () =>
      (await billing.listUsageRecords({ orgId: orgB, requestId: fromB.requestId })).records.length === 1 &&
      (await analytics.listRequests({ orgId: orgB, requestId: fromB.requestId })).requests.length === 1,
    { what: "org B's request recorded", timeoutMs: 20_000 },
  );
  const invoice = (await billing.generateInvoice({ orgId: orgA })).invoice;
  Object.assign(ids, {
    orgA,
    orgB,
    reqB: fromB.requestId,
    invA: invoice?.id ?? "",
    respA: respA.body.id,
    respP: respP.body.id,
    itemA: respA.body.output[0]?.id ?? "",
    keyB: other.apiKey?.id ?? "",
  });
  await Bun.sleep(Math.max(0, Number(expireTime.seconds) * 1000 + expireTime.nanos / 1e6 - Date.now() + 50));
}, 120_000);

afterAll(() => stopMesh(mesh, dataDir), 60_000);

/** "ok", or the Connect code's name. */
async function rpc(call: Promise<unknown> | AsyncIterable<unknown>): Promise<string> {
  try {
    if (Symbol.asyncIterator in call) for await (const _ of call) break;
    else await call;
    return "ok";
  } catch (e) {
    return Code[ConnectError.from(e).code];
  }
}

/** "ok" and how many records or requests a list answered, or the Connect code's name. */
async function found(call: Promise<{ records: unknown[] } | { requests: unknown[] }>): Promise<string> {
  try {
    const answer = await call;
    return `ok ${"records" in answer ? answer.records.length : answer.requests.length}`;
  } catch (e) {
    return Code[ConnectError.from(e).code];
  }
}

/** The HTTP status and, for an error in OpenAI's shape, its code. */
async function rest(url: string, who: Caller, init: { method?: string; body?: object } = {}): Promise<string> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (auth[who] !== undefined) headers.authorization = auth[who];
  const res = await fetch(url, { method: init.method ?? "GET", headers, body: init.body && JSON.stringify(init.body) });
  const text = await res.text();
  const code = res.ok || !text.startsWith("{") ? "" : ` ${(JSON.parse(text) as { error: { code: string } }).error.code}`;
  return `${res.status}${code}`;
}

const callOptions = (who: Caller) => ({ headers: auth[who] === undefined ? {} : { authorization: auth[who] } });
const U = "Unauthenticated";
const D = "PermissionDenied";

// Reads of org A's data, through billing's or analytics' RPCs: its own keys, a project's too, and admins.
const orgRead: Expected = {
  admin: "ok", own: "ok", project: "ok", other: D, revoked: U, expired: U, suspended: D, none: U, basic: U, unknown: U,
  stale: D,
};
// Admin-only methods: any token but the admin's is refused before the message is read.
const adminOnly: Expected = {
  own: D, project: D, other: D, revoked: D, expired: D, suspended: D, none: U, basic: U, unknown: D, stale: D,
};
// The gateway serving a key: any valid key of a working org, whichever org.
const served: Expected = {
  admin: "401 invalid_api_key", own: "200", project: "200", other: "200", revoked: "401 invalid_api_key",
  expired: "401 expired_api_key", suspended: "403 organization_suspended", none: "401 missing_api_key",
  basic: "401 missing_api_key", unknown: "401 invalid_api_key", stale: "401 invalid_api_key",
};
const servedBut = (who: Caller): Expected => Object.fromEntries(Object.entries(served).filter(([k]) => k !== who));
const servedRpc: Expected = {
  admin: U, own: "ok", project: "ok", other: "ok", revoked: U, expired: U, suspended: D, none: U, basic: U, unknown: U,
  stale: U,
};

describe("tenant isolation across the mesh", () => {
  test("every caller gets what the README says on each org's reads, the REST API and the gateway's RPCs", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing });
    const analytics = createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics });
    const gateway = createServiceClient(GatewayService, { baseUrl: mesh.urls.gateway });
    const range = { start: timestampFromMs(Date.now() - 3_600_000), end: timestampFromMs(Date.now() + 3_600_000) };
    const v1 = `${mesh.openaiUrl}/v1`;
    const chat = { model: "mock", messages: [{ role: "user", content: "hi" }] };
    const embedding = { model: "mock", input: "x" };
    const after = { model: "mock", input: "hi", previous_response_id: ids.respA };
    const naming = { model: "mock", input: [{ type: "item_reference", id: ids.itemA }] };
    const params = { params: { model: "mock", messages: [{ role: "user", content: "hi" }] } };
    const notFound = (code: string) => ({ project: code, other: code });
    const rows: [string, (who: Caller) => Promise<string>, Expected][] = [
      // Another org is as unknown to a key as one nobody created.
      ["billing GetOrganization", (w) => rpc(billing.getOrganization({ orgId: ids.orgA }, callOptions(w))),
        { ...orgRead, other: "NotFound" }],
      ["billing GetUsageSummary", (w) => rpc(billing.getUsageSummary({ orgId: ids.orgA }, callOptions(w))), orgRead],
      ["billing ListUsageRecords", (w) => rpc(billing.listUsageRecords({ orgId: ids.orgA }, callOptions(w))), orgRead],
      // Another org's request id, asked under one's own org, is as absent as a made-up one.
      ["billing ListUsageRecords of B's request id", (w) =>
        found(billing.listUsageRecords({ orgId: ids.orgA, requestId: ids.reqB }, callOptions(w))),
        { ...orgRead, admin: "ok 0", own: "ok 0", project: "ok 0" }],
      ["billing ListInvoices", (w) => rpc(billing.listInvoices({ orgId: ids.orgA }, callOptions(w))), orgRead],
      // Another org's invoice is as unknown to a key as a missing one.
      ["billing GetInvoice", (w) => rpc(billing.getInvoice({ invoiceId: ids.invA }, callOptions(w))),
        { ...orgRead, other: "NotFound" }],
      ["billing invoice page", (w) => rest(`${mesh.urls.billing}/invoices/${ids.invA}`, w), {
        admin: "200", own: "200", project: "200", other: "404", revoked: "401", expired: "401", suspended: "403",
        none: "401", basic: "401", unknown: "401", stale: "403",
      }],
      ["analytics QueryUsage", (w) => rpc(analytics.queryUsage({ orgId: ids.orgA, range }, callOptions(w))), orgRead],
      ["analytics QueryTimeSeries", (w) =>
        rpc(analytics.queryTimeSeries({ orgId: ids.orgA, range, bucketSeconds: 3600n }, callOptions(w))), orgRead],
      ["analytics QueryLatency", (w) => rpc(analytics.queryLatency({ orgId: ids.orgA, range }, callOptions(w))),
        orgRead],
      ["analytics ListRequests of B's request id", (w) =>
        found(analytics.listRequests({ orgId: ids.orgA, requestId: ids.reqB }, callOptions(w))),
        { ...orgRead, admin: "ok 0", own: "ok 0", project: "ok 0" }],
      ["analytics ListRequests of B", (w) => rpc(analytics.listRequests({ orgId: ids.orgB, range }, callOptions(w))),
        { ...orgRead, own: D, project: D, other: "ok" }],
      ["gateway CreateChatCompletion", (w) => rpc(gateway.createChatCompletion(params, callOptions(w))), servedRpc],
      ["gateway StreamChatCompletion", (w) => rpc(gateway.streamChatCompletion(params, callOptions(w))), servedRpc],
      ["gateway CreateEmbedding", (w) => rpc(gateway.createEmbedding({ model: "mock", input: ["x"] }, callOptions(w))),
        servedRpc],
      ["gateway ListModels", (w) => rpc(gateway.listModels({}, callOptions(w))), servedRpc],
      ["POST /v1/chat/completions", (w) => rest(`${v1}/chat/completions`, w, { method: "POST", body: chat }), served],
      ["POST /v1/embeddings", (w) => rest(`${v1}/embeddings`, w, { method: "POST", body: embedding }), served],
      ["GET /v1/models", (w) => rest(`${v1}/models`, w), served],
      ["GET /v1/models/mock", (w) => rest(`${v1}/models/mock`, w), served],
      // A's org-wide responses are A's org keys' alone: neither B nor a project of A may name them.
      ["POST /v1/responses after A's response", (w) =>
        rest(`${v1}/responses`, w, { method: "POST", body: after }),
        { ...served, ...notFound("400 previous_response_not_found") }],
      ["POST /v1/responses naming A's item", (w) =>
        rest(`${v1}/responses`, w, { method: "POST", body: naming }),
        { ...served, ...notFound("400 item_not_found") }],
      ["GET /v1/responses/{A's}", (w) => rest(`${v1}/responses/${ids.respA}`, w),
        { ...served, ...notFound("404 response_not_found") }],
      ["GET /v1/responses/{A's}/input_items", (w) => rest(`${v1}/responses/${ids.respA}/input_items`, w),
        { ...served, ...notFound("404 response_not_found") }],
      // Every caller but its project's key tries to delete the project's response, which is still there after.
      ["DELETE /v1/responses/{A's project's}", (w) => rest(`${v1}/responses/${ids.respP}`, w, { method: "DELETE" }),
        { ...servedBut("project"), own: "404 response_not_found", other: "404 response_not_found" }],
      ["GET /v1/responses/{A's project's}", (w) => rest(`${v1}/responses/${ids.respP}`, w),
        { ...served, own: "404 response_not_found", other: "404 response_not_found" }],
    ];
    const got: Record<string, Expected> = {};
    const want: Record<string, Expected> = {};
    for (const [name, call, expected] of rows) {
      got[name] = {};
      want[name] = expected;
      for (const who of callers) if (who in expected) got[name][who] = await call(who);
    }
    expect(got).toEqual(want);

    // A's keys read nothing of B's through their own org, even naming B's key.
    const byKeyB = await billing.getUsageSummary({ orgId: ids.orgA, apiKeyId: ids.keyB }, callOptions("own"));
    expect(byKeyB.requests).toBe(0n);
  }, 60_000);

  test("every method only admins may call refuses any other token, and none, before reading the message", async () => {
    const orgMethods = new Set(["getOrganization", "getUsageSummary", "listUsageRecords", "listInvoices", "getInvoice",
      "queryUsage", "queryTimeSeries", "queryLatency", "listRequests"]);
    const got: Record<string, Expected> = {};
    const want: Record<string, Expected> = {};
    const services = [[BillingService, mesh.urls.billing], [AnalyticsService, mesh.urls.analytics]] as const;
    for (const [service, baseUrl] of services) {
      const client = createServiceClient(service, { baseUrl }) as unknown as Record<string, (...a: unknown[]) => unknown>;
      for (const method of service.methods as DescMethod[]) {
        if (orgMethods.has(method.localName)) continue;
        const name = `${service.name}.${method.name}`;
        got[name] = {};
        want[name] = adminOnly;
        for (const who of callers) {
          if (!(who in adminOnly)) continue;
          const input = method.methodKind === "bidi_streaming" ? (async function* () {})() : {};
          got[name][who] = await rpc(client[method.localName]?.(input, callOptions(who)) as Promise<unknown>);
        }
      }
    }
    const methods = BillingService.methods.length + AnalyticsService.methods.length;
    expect(Object.keys(want).length).toBe(methods - orgMethods.size);
    expect(got).toEqual(want);
  }, 60_000);
});
