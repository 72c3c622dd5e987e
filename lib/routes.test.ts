import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { SpanStatusCode } from "@opentelemetry/api";
import { InMemorySpanExporter } from "@opentelemetry/sdk-trace";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "./log.ts";
import { createMetrics } from "./metrics.ts";
import { adminMessageBytes, guardedRoutes, orgMessageBytes } from "./routes.ts";
import { createServiceClient } from "./rpc-client.ts";
import { type RunningServer, startServer } from "./server.ts";
import { setupTelemetry } from "./telemetry.ts";
import { answerToHead } from "./testing.ts";

const adminToken = "routes-admin-token-0123456789";
let server: RunningServer;
let recorded = 0;
const exporter = new InMemorySpanExporter();
const telemetry = setupTelemetry({ service: "guarded", version: "0", exporter });
const metrics = createMetrics("guarded");

beforeAll(async () => {
  server = await startServer({
    name: "guarded",
    port: 0,
    host: "127.0.0.1",
    log: createLogger({ service: "test", write: () => {} }),
    interceptors: [telemetry.serverInterceptor, metrics.serverInterceptor],
    registry: metrics.registry,
    routes: guardedRoutes(
      BillingService,
      {
        async recordUsage(req) {
          recorded += req.records.length;
          return { inserted: req.records.length, duplicates: 0 };
        },
        listInvoices: async () => ({ invoices: [], nextPageToken: "" }),
        listOrganizations: async () => ({ organizations: [] }),
        createProject: async () => ({}),
      },
      { adminToken, orgMethods: ["listInvoices"], bulk: { recordUsage: 4 << 20 } },
    ),
  });
});
afterAll(() => server.close(0));

/** What a POST to `path` declaring a body it never sends gets back. */
const headOnly = (path: string, headers: string) =>
  answerToHead(
    server.url,
    `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/proto\r\nContent-Length: 16000000\r\n${headers}\r\n`,
  );

/** The code a call failed with, or "ok". */
const code = (call: Promise<unknown>) =>
  call.then(
    () => "ok" as const,
    (e: unknown) => ConnectError.from(e).code,
  );

describe("guarded routes", () => {
  test("a caller without a token, or without the admin's on an admin method, is answered before its message is read", async () => {
    const path = "/billing.v1.BillingService/RecordUsage";
    expect(await headOnly(path, "")).toStartWith("HTTP/1.1 401");
    expect(await headOnly(path, "Authorization: Bearer sk-mesh-somebody\r\n")).toStartWith("HTTP/1.1 403");
    // A method an org's key may call lets any token through to its handler, which checks it.
    const anyone = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: "sk-mesh-somebody" });
    expect(await code(anyone.listInvoices({ orgId: "org_1" }))).toBe("ok");
    expect(await code(anyone.listOrganizations({}))).toBe(Code.PermissionDenied);
    const nobody = createServiceClient(BillingService, { baseUrl: server.url });
    expect(await code(nobody.listInvoices({ orgId: "org_1" }))).toBe(Code.Unauthenticated);
    expect(recorded).toBe(0);
  });

  test("a request with two Authorization fields is refused, whichever of them holds the admin's token", async () => {
    // node:http keeps the first field and drops the rest: a front proxy judging the request by another field would
    // have let through a call served as the first's. The REST port (Fetch) joins them, which no token matches.
    const path = "/billing.v1.BillingService/ListOrganizations";
    const admin = `Authorization: Bearer ${adminToken}\r\n`;
    const other = "Authorization: Bearer sk-mesh-somebody\r\n";
    expect(await headOnly(path, admin)).not.toStartWith("HTTP/1.1 403");
    expect(await headOnly(path, admin + other)).toStartWith("HTTP/1.1 403");
    expect(await headOnly(path, other + admin)).toStartWith("HTTP/1.1 403");
    expect(await headOnly(path, admin + admin)).toStartWith("HTTP/1.1 403");
  });

  test("a call the gate refuses is counted and traced with the code its caller got", async () => {
    // As Prometheus scrapes it.
    const handled = async () => {
      const text = await (await fetch(`${server.url}/metrics`)).text();
      const counted = /^rpc_server_handled_total\{[^}]*rpc_method="ListOrganizations",code="(\w+)"[^}]*\} (\d+)$/gm;
      return [...text.matchAll(counted)].map((m) => [m[1] as string, Number(m[2])] as const);
    };
    const before = new Map(await handled());
    const call = (token: string | undefined) =>
      code(createServiceClient(BillingService, { baseUrl: server.url, bearerToken: token }).listOrganizations({}));
    expect([await call(undefined), await call("sk-mesh-somebody"), await call(adminToken)]).toEqual([
      Code.Unauthenticated,
      Code.PermissionDenied,
      "ok",
    ]);
    const added = (await handled()).map(([code, value]) => [code, value - (before.get(code) ?? 0)]);
    expect(added).toEqual(
      expect.arrayContaining([
        ["unauthenticated", 1],
        ["permission_denied", 1],
        ["ok", 1],
      ]),
    );
    const spans = exporter.getFinishedSpans().filter((s) => s.name === "billing.v1.BillingService/ListOrganizations");
    expect(spans.slice(-3).map((s) => [s.status.code, s.attributes["rpc.grpc.status_code"]])).toEqual([
      // The caller's mistake, not the server's failure: as an HTTP server's 4xx, the span's status is left unset.
      [SpanStatusCode.UNSET, Code.Unauthenticated],
      [SpanStatusCode.UNSET, Code.PermissionDenied],
      [SpanStatusCode.UNSET, 0],
    ]);
  });

  test("an RPC's spans, the caller's and the server's, name its protocol: Connect's as connect_rpc, gRPC and gRPC-Web's as grpc", async () => {
    const interceptors = [telemetry.clientInterceptor];
    const transports = {
      connect_rpc: createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", interceptors }),
      grpc: createGrpcTransport({ baseUrl: server.url, interceptors }),
      "grpc (gRPC-Web)": createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1", interceptors }),
    };
    const systems: Record<string, unknown[]> = {};
    for (const [name, transport] of Object.entries(transports)) {
      exporter.reset();
      const headers = { authorization: `Bearer ${adminToken}` };
      await createClient(BillingService, transport).listOrganizations({}, { headers });
      const spans = exporter.getFinishedSpans().filter((s) => s.name === "billing.v1.BillingService/ListOrganizations");
      systems[name] = spans.map((s) => s.attributes["rpc.system"]);
    }
    // Connect's were tagged grpc.
    expect(systems).toEqual({
      connect_rpc: ["connect_rpc", "connect_rpc"],
      grpc: ["grpc", "grpc"],
      "grpc (gRPC-Web)": ["grpc", "grpc"],
    });
  });

  test("each method reads at most its own size of message", async () => {
    const admin = createServiceClient(BillingService, { baseUrl: server.url, bearerToken: adminToken });
    // A usage batch may be large; a query or an admin change may not.
    const records = Array.from({ length: 5_000 }, (_, i) => ({ requestId: `req_${i}`.padEnd(200, "x"), orgId: "org_1" }));
    expect(await admin.recordUsage({ records })).toMatchObject({ inserted: 5_000 });
    expect(await code(admin.listInvoices({ orgId: "x".repeat(orgMessageBytes) }))).toBe(Code.ResourceExhausted);
    expect(await code(admin.createProject({ orgId: "org_1", name: "x".repeat(adminMessageBytes) }))).toBe(Code.ResourceExhausted);
  });
});
