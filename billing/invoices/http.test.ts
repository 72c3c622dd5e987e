import { afterAll, beforeAll, expect, test } from "bun:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import pg from "pg";
import { BillingService, InvoiceStatus } from "../../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { defaultAdminToken } from "../../lib/config.ts";
import { createLogger } from "../../lib/log.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../../lib/server.ts";
import { externalAddress as external } from "../../lib/testing.ts";
import { createBillingApp } from "../app.ts";
import { createBillingAuth } from "../auth.ts";
import { databaseUnavailable } from "../errors.ts";
import { createBillingStore } from "../store/store.ts";
import { invoicePages } from "./http.ts";
import { createTestDatabase, type TestDatabase } from "../store/test-db.ts";

const adminToken = "test-admin-token-0123456789";
const log = createLogger({ service: "billing-test", level: "error" });
const xss = "<script>alert(1)</script>";

let db: TestDatabase;
let server: RunningServer;
let billing: ReturnType<typeof createServiceClient<typeof BillingService>>;
let invoiceId: string;
let orgSecret: string;
let otherSecret: string;

beforeAll(async () => {
  db = await createTestDatabase();
  const app = createBillingApp({ pool: db.pool, adminToken, clock: () => new Date("2026-06-15T12:00:00Z"), log });
  server = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, http: app.http, log });
  billing = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken });
  const orgId = (await billing.createOrganization({ name: xss, taxRateBps: 1000 })).organization?.id as string;
  const otherOrgId = (await billing.createOrganization({ name: "other" })).organization?.id as string;
  orgSecret = (await billing.createApiKey({ orgId })).secret;
  otherSecret = (await billing.createApiKey({ orgId: otherOrgId })).secret;
  await billing.recordUsage({
    records: [
      {
        requestId: "req_html_1",
        orgId,
        model: `<img src=x onerror=alert(2)>`,
        provider: "mock",
        endpoint: Endpoint.CHAT_COMPLETIONS,
        usage: { inputTokens: 10n, outputTokens: 5n },
        costNanos: 1_500_000_000n,
        occurTime: timestampFromDate(new Date("2026-06-02T10:00:00Z")),
      },
    ],
  });
  invoiceId = (await billing.generateInvoice({ orgId })).invoice?.id as string;
}, 60_000);
afterAll(async () => {
  await server.close(1_000);
  await db.drop();
});

const page = (path: string, token?: string, method = "GET") =>
  fetch(`${server.url}${path}`, { method, headers: token ? { authorization: `Bearer ${token}` } : {} });

test("GET /invoices/<id> serves a printable page to admins and the org's own keys, escaped", async () => {
  for (const token of [adminToken, orgSecret]) {
    const res = await page(`/invoices/${invoiceId}`, token);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/html; charset=utf-8");
    expect(res.headers.get("content-security-policy")).toContain("default-src 'none'");
    expect(res.headers.get("cache-control")).toBe("no-store");
    const html = await res.text();
    expect(html).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
    expect(html).toContain("&lt;img src=x onerror=alert(2)&gt;");
    expect(html).not.toContain("<script");
    expect(html).not.toContain("<img");
    // June is not over: a draft, without a number until it is issued.
    expect(html).toContain("<h1>Draft invoice</h1>");
    expect(html).toContain("$1.50");
  }
  const head = await page(`/invoices/${invoiceId}`, adminToken, "HEAD");
  expect(head.status).toBe(200);
  // What GET would send, without the body: its type and its length.
  const got = await page(`/invoices/${invoiceId}`, adminToken);
  const body = new Uint8Array(await got.arrayBuffer());
  expect(head.headers.get("content-type")).toBe("text/html; charset=utf-8");
  expect(head.headers.get("content-length")).toBe(String(body.length));
  expect(got.headers.get("content-length")).toBe(String(body.length));
  expect((await head.arrayBuffer()).byteLength).toBe(0);
});

test("everyone else gets 401, 403 or 404; another org's invoice is as unknown as a missing one", async () => {
  const unauthenticated = await page(`/invoices/${invoiceId}`);
  expect(unauthenticated.status).toBe(401);
  expect(unauthenticated.headers.get("www-authenticate")).toContain("Bearer");
  expect((await page(`/invoices/${invoiceId}`, `${orgSecret}x`)).status).toBe(401);
  expect((await page(`/invoices/${invoiceId}`, "not-the-admin-token")).status).toBe(403);
  // Another org's key is told what an unknown id tells it: which ids exist elsewhere stays unknown.
  const others = await page(`/invoices/${invoiceId}`, otherSecret);
  const unknown = await page(`/invoices/${invoiceId.slice(0, -1)}${invoiceId.endsWith("0") ? "1" : "0"}`, otherSecret);
  expect([others.status, unknown.status]).toEqual([404, 404]);
  expect((await others.text()).replace(invoiceId, "ID")).toBe((await unknown.text()).replace(/inv_\w+/, "ID"));
  expect((await page("/invoices/inv_missing", adminToken)).status).toBe(404);
  expect((await page("/invoices/../../etc/passwd", adminToken)).status).toBe(404);
  // Credentials are checked before existence.
  expect((await page("/invoices/inv_missing")).status).toBe(401);
  expect((await page(`/invoices/${invoiceId}`, adminToken, "POST")).status).toBe(405);
  // Other paths still reach the RPCs.
  expect((await fetch(`${server.url}/healthz`)).status).toBe(200);
});

test("an invoice that left draft stays billed to the name it was issued with when the org is renamed", async () => {
  const orgId = (await billing.createOrganization({ name: "Acme Ltd", taxRateBps: 1000 })).organization?.id as string;
  await billing.recordUsage({
    records: [
      {
        requestId: "req_html_may",
        orgId,
        model: "gpt-4o",
        provider: "mock",
        endpoint: Endpoint.CHAT_COMPLETIONS,
        usage: { inputTokens: 10n, outputTokens: 5n },
        costNanos: 2_000_000_000n,
        occurTime: timestampFromDate(new Date("2026-05-20T10:00:00Z")),
      },
    ],
  });
  const may = await billing.generateInvoice({ orgId, periodTime: timestampFromDate(new Date("2026-05-10T00:00:00Z")) });
  const invoiceId = may.invoice?.id as string;
  await billing.updateInvoiceStatus({ invoiceId, status: InvoiceStatus.ISSUED });
  await billing.updateInvoiceStatus({ invoiceId, status: InvoiceStatus.PAID });
  const june = await billing.generateInvoice({ orgId });
  expect(june.invoice?.orgName).toBe("Acme Ltd");

  await billing.updateOrganization({ orgId, name: "Acme Renamed Ltd", taxRateBps: 2000 });
  const html = await (await page(`/invoices/${invoiceId}`, adminToken)).text();
  expect(html).toContain("<title>Invoice INV-2026-05-0001: Acme Ltd</title>");
  expect(html).toContain("<dt>Billed to</dt><dd>Acme Ltd</dd>");
  expect(html).toContain("Tax (10%)");
  expect(html).not.toContain("Renamed");
  expect((await billing.getInvoice({ invoiceId })).invoice).toMatchObject({
    orgName: "Acme Ltd",
    taxRateBps: 1000,
    status: InvoiceStatus.PAID,
  });
  const listed = (await billing.listInvoices({ orgId })).invoices.map((i) => [i.number, i.orgName]);
  expect(listed).toEqual([
    ["", "Acme Ltd"],
    ["INV-2026-05-0001", "Acme Ltd"],
  ]);

  // Drafts take the org's settings each time they are built: a new one, and one generated again.
  const april = await billing.generateInvoice({
    orgId,
    periodTime: timestampFromDate(new Date("2026-04-10T00:00:00Z")),
  });
  expect(april.invoice).toMatchObject({ orgName: "Acme Renamed Ltd", taxRateBps: 2000 });
  const draft = await (await page(`/invoices/${april.invoice?.id}`, adminToken)).text();
  expect(draft).toContain("<title>Draft invoice: Acme Renamed Ltd</title>");
  expect(draft).toContain("<dt>Billed to</dt><dd>Acme Renamed Ltd</dd>");
  const regenerated = await billing.generateInvoice({ orgId });
  expect(regenerated.invoice).toMatchObject({ id: june.invoice?.id, orgName: "Acme Renamed Ltd", taxRateBps: 2000 });
});

test.skipIf(external === undefined)("on the published default admin token the page is refused from afar", async () => {
  const clock = () => new Date("2026-06-15T12:00:00Z");
  const app = createBillingApp({ pool: db.pool, adminToken: defaultAdminToken, clock, log });
  const open = await startServer({ name: "billing", port: 0, routes: app.routes, http: app.http, log });
  try {
    const get = (host: string, token: string) =>
      fetch(`http://${host}:${open.port}/invoices/${invoiceId}`, { headers: { authorization: `Bearer ${token}` } });
    const refused = await get(external as string, defaultAdminToken);
    expect([refused.status, await refused.text()]).toEqual([403, expect.stringContaining("set ADMIN_TOKEN")]);
    expect((await get("127.0.0.1", defaultAdminToken)).status).toBe(200);
    // An org's own key reads its invoice from anywhere.
    expect((await get(external as string, orgSecret)).status).toBe(200);
  } finally {
    await open.close(0);
  }
});

test("on the published default admin token the page is refused to a web page or through a proxy on this machine", async () => {
  const clock = () => new Date("2026-06-15T12:00:00Z");
  const app = createBillingApp({ pool: db.pool, adminToken: defaultAdminToken, clock, log });
  const open = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, http: app.http, log });
  try {
    const get = (token: string, marks: Record<string, string>) =>
      fetch(`${open.url}/invoices/${invoiceId}`, { headers: { authorization: `Bearer ${token}`, ...marks } });
    for (const marks of [{ origin: "https://any.example" }, { "sec-fetch-site": "cross-site" }] as Record<string, string>[]) {
      const refused = await get(defaultAdminToken, marks);
      expect([refused.status, await refused.text()]).toEqual([403, expect.stringContaining("refused from web pages")]);
      // An org's own key is the page's to use.
      expect((await get(orgSecret, marks)).status).toBe(200);
    }
    // A reverse proxy or tunnel on this machine connects from loopback for callers anywhere.
    const proxied = await get(defaultAdminToken, { "x-forwarded-for": "203.0.113.7" });
    expect([proxied.status, await proxied.text()]).toEqual([403, expect.stringContaining("not through a proxy")]);
    expect((await get(orgSecret, { "x-forwarded-for": "203.0.113.7" })).status).toBe(200);
    expect((await get(defaultAdminToken, {})).status).toBe(200);
  } finally {
    await open.close(0);
  }
});

test("pages whose callers left behind a lock another session holds on invoices give their connections back", async () => {
  const pool = new pg.Pool({ connectionString: db.connectionString, max: 3, connectionTimeoutMillis: 10_000 });
  const app = createBillingApp({ pool, adminToken, clock: () => new Date("2026-06-15T12:00:00Z"), log });
  const open = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: app.routes, http: app.http, log });
  const small = createServiceClient(BillingService, { baseUrl: open.url, bearerToken: adminToken });
  const locker = await db.pool.connect();
  const waitingOnLocks = async () =>
    (
      await db.pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      )
    ).rows[0]?.n;
  try {
    // As an operator's ALTER TABLE or VACUUM FULL in an open transaction would.
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE invoices");
    // More readers giving up on the page than the pool has connections.
    const left = Array.from({ length: 6 }, () =>
      fetch(`${open.url}/invoices/${invoiceId}`, {
        headers: { authorization: `Bearer ${adminToken}` },
        signal: AbortSignal.timeout(300),
      }).then(
        () => "answered",
        (e: Error) => e.name,
      ),
    );
    expect(await Promise.all(left)).toEqual(Array(6).fill("TimeoutError"));
    let waiting = await waitingOnLocks();
    for (let i = 0; i < 200 && waiting !== 0; i++) {
      await Bun.sleep(10);
      waiting = await waitingOnLocks();
    }
    expect(waiting).toBe(0);
    const started = performance.now();
    expect((await small.listOrganizations({}, { timeoutMs: 8_000 })).organizations.length).toBeGreaterThan(0);
    expect(performance.now() - started).toBeLessThan(5_000);
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
    await open.close(0);
    await app.store.closePing();
    await pool.end();
  }
});

test("a page waiting past its time behind a lock is answered 503 and its statement cancelled", async () => {
  const store = createBillingStore(db.pool);
  const auth = createBillingAuth({ store, adminToken, clock: () => new Date("2026-06-15T12:00:00Z") });
  const http = invoicePages({ store, auth, log, timeoutMs: 300 });
  const open = await startServer({ name: "billing", port: 0, host: "127.0.0.1", routes: () => {}, http, log });
  const locker = await db.pool.connect();
  try {
    await locker.query("BEGIN");
    await locker.query("LOCK TABLE invoices");
    const res = await fetch(`${open.url}/invoices/${invoiceId}`, { headers: { authorization: `Bearer ${adminToken}` } });
    expect([res.status, await res.text()]).toEqual([503, `${databaseUnavailable}\n`]);
    const { rows } = await db.pool.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    );
    expect(rows[0]?.n).toBe(0);
  } finally {
    await locker.query("ROLLBACK");
    locker.release();
    await open.close(0);
  }
  expect((await page(`/invoices/${invoiceId}`, adminToken)).status).toBe(200);
});
