import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { isKeySecretShaped, isLoopback, keySecretLength, keySecretPrefix } from "./auth.ts";
import { defaultAdminToken } from "./config.ts";
import { createLogger } from "./log.ts";
import { guardedRoutes } from "./routes.ts";
import { type RunningServer, startServer } from "./server.ts";
import { externalAddress as external } from "./testing.ts";

test("a key secret's shape is the prefix and 43 base62 characters, nothing more or else", () => {
  const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  const body = base62.slice(0, keySecretLength);
  expect(isKeySecretShaped(`${keySecretPrefix}${body}`)).toBe(true);
  expect(isKeySecretShaped(`${keySecretPrefix}${base62.slice(-keySecretLength)}`)).toBe(true);
  const others = [
    "",
    keySecretPrefix,
    `${keySecretPrefix}${body.slice(1)}`,
    `${keySecretPrefix}${body}0`,
    `${keySecretPrefix}${body}\n`,
    ` ${keySecretPrefix}${body}`,
    `${keySecretPrefix}${body.slice(1)}-`,
    `${keySecretPrefix}${body.slice(1)}_`,
    `${keySecretPrefix}${body.slice(1)}é`,
    `sk-mash-${body}`,
    `SK-MESH-${body}`,
    "sk-good",
  ];
  for (const token of others) expect([token, isKeySecretShaped(token)]).toEqual([token, false]);
});

test("loopback is 127.0.0.0/8 and ::1, IPv4-mapped too; nothing else", () => {
  for (const address of ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "::FFFF:127.9.9.9"]) {
    expect([address, isLoopback(address)]).toEqual([address, true]);
  }
  const others = ["", "10.0.0.1", "192.0.2.2", "128.0.0.1", "::ffff:10.0.0.1", "::2", "fe80::1", "127.0.0.1.example"];
  for (const address of others) {
    expect([address, isLoopback(address)]).toEqual([address, false]);
  }
});

describe.skipIf(external === undefined)("the admin token from another machine", () => {
  const ownToken = "own-admin-token-0123456789";
  const servers: Record<string, RunningServer> = {};

  beforeAll(async () => {
    for (const adminToken of [defaultAdminToken, ownToken]) {
      servers[adminToken] = await startServer({
        name: "guarded",
        port: 0,
        log: createLogger({ service: "test", write: () => {} }),
        routes: guardedRoutes(
          BillingService,
          {
            listOrganizations: async () => ({ organizations: [] }),
            listInvoices: async () => ({ invoices: [], nextPageToken: "" }),
          },
          { adminToken, orgMethods: ["listInvoices"] },
        ),
      });
    }
  });
  afterAll(() => Promise.all(Object.values(servers).map((s) => s.close(0))));

  const protocols: Record<string, (baseUrl: string) => Transport> = {
    connect: (baseUrl) => createConnectTransport({ baseUrl, httpVersion: "1.1" }),
    grpc: (baseUrl) => createGrpcTransport({ baseUrl }),
    "grpc-web": (baseUrl) => createGrpcWebTransport({ baseUrl, httpVersion: "1.1" }),
  };

  /** What each protocol's admin call and org-method call answer, as [code or "ok", message]. */
  const answers = async (adminToken: string, host: string) => {
    const url = `http://${host}:${servers[adminToken]?.port}`;
    const headers = { authorization: `Bearer ${adminToken}` };
    const result: Record<string, unknown[]> = {};
    for (const [name, transport] of Object.entries(protocols)) {
      const client = createClient(BillingService, transport(url));
      result[name] = await Promise.all(
        [client.listOrganizations({}, { headers }), client.listInvoices({ orgId: "org_1" }, { headers })].map((call) =>
          call.then(
            () => "ok",
            (e: unknown) => [ConnectError.from(e).code, ConnectError.from(e).rawMessage],
          ),
        ),
      );
    }
    return result;
  };

  test("the published default is refused from another address on every protocol, taken from loopback", async () => {
    const refused = [Code.PermissionDenied, expect.stringContaining("set ADMIN_TOKEN")];
    expect(await answers(defaultAdminToken, external as string)).toEqual({
      connect: [refused, refused],
      grpc: [refused, refused],
      "grpc-web": [refused, refused],
    });
    const ok = ["ok", "ok"];
    expect(await answers(defaultAdminToken, "127.0.0.1")).toEqual({ connect: ok, grpc: ok, "grpc-web": ok });
  });

  test("a token of the operator's own is accepted from anywhere", async () => {
    const ok = ["ok", "ok"];
    expect(await answers(ownToken, external as string)).toEqual({ connect: ok, grpc: ok, "grpc-web": ok });
    expect(await answers(ownToken, "127.0.0.1")).toEqual({ connect: ok, grpc: ok, "grpc-web": ok });
  });
});

describe("the published default admin token on this machine, from a web page or through a proxy", () => {
  let server: RunningServer;

  beforeAll(async () => {
    server = await startServer({
      name: "guarded",
      port: 0,
      host: "127.0.0.1",
      log: createLogger({ service: "test", write: () => {} }),
      routes: guardedRoutes(
        BillingService,
        {
          listOrganizations: async () => ({ organizations: [] }),
          listInvoices: async () => ({ invoices: [], nextPageToken: "" }),
        },
        { adminToken: defaultAdminToken, orgMethods: ["listInvoices"] },
      ),
    });
  });
  afterAll(() => server.close(0));

  /** What an admin call and an org-method call answer over Connect JSON, as fetch in a browser sends them. */
  const answers = async (marks: Record<string, string>) => {
    const headers = { authorization: `Bearer ${defaultAdminToken}`, "content-type": "application/json", ...marks };
    const call = async (method: string, body: unknown) => {
      const res = await fetch(`${server.url}/billing.v1.BillingService/${method}`, {
        method: "POST",
        headers,
        body: JSON.stringify(body),
      });
      return res.ok ? "ok" : ((await res.json()) as { code: string; message: string });
    };
    return [await call("ListOrganizations", {}), await call("ListInvoices", { orgId: "org_1" })];
  };

  test("is refused when the request carries Origin or Sec-Fetch-Site, as every page's fetch does", async () => {
    const refused = { code: "permission_denied", message: expect.stringContaining("refused from web pages") };
    expect(await answers({ origin: "https://any.example" })).toEqual([refused, refused]);
    expect(await answers({ origin: "null" })).toEqual([refused, refused]);
    expect(await answers({ "sec-fetch-site": "cross-site" })).toEqual([refused, refused]);
    expect(await answers({})).toEqual(["ok", "ok"]);
    // Node's own fetch (a script on this machine, connect-web's transport on Node) sends Sec-Fetch-Mode, never these.
    expect(await answers({ "sec-fetch-mode": "cors" })).toEqual(["ok", "ok"]);
  });

  test("is refused when a proxy on this machine forwarded the request from elsewhere", async () => {
    const refused = { code: "permission_denied", message: expect.stringContaining("not through a proxy") };
    const marks: Record<string, string>[] = [
      { "x-forwarded-for": "203.0.113.7" },
      { forwarded: "for=203.0.113.7;proto=https" },
      { "x-real-ip": "203.0.113.7" },
      { "x-forwarded-proto": "https" },
      { "x-forwarded-host": "billing.example.com" },
      { via: "1.1 caddy" },
    ];
    for (const mark of marks) expect([mark, await answers(mark)]).toEqual([mark, [refused, refused]]);
  });
});
