import { describe, expect, test } from "bun:test";
import { cors as connectCors } from "@connectrpc/connect";
import { commonEnv, parseEnv } from "./config.ts";
import { createCorsPolicy } from "./cors.ts";

const preflightFrom = (origin: string, asked = "authorization, content-type, x-stainless-os") =>
  new Headers({ origin, "access-control-request-method": "POST", "access-control-request-headers": asked });

describe("createCorsPolicy", () => {
  test("any origin: *, with Connect's status headers and the extras exposed", () => {
    const policy = createCorsPolicy(["*"], ["x-request-id"]);
    expect(policy.headers("https://app.example.com", "/v1/models")).toEqual({
      "access-control-allow-origin": "*",
      "access-control-expose-headers": [...connectCors.exposedHeaders, "x-request-id"].join(", "),
    });
    // Same-origin and non-browser requests send no Origin and need nothing.
    expect(policy.headers(null, "/v1/models")).toEqual({});
  });

  test("a list: listed origins are echoed, others get no CORS headers, and every answer varies by Origin", () => {
    const policy = createCorsPolicy(["https://app.example.com", "http://localhost:5173"]);
    expect(policy.headers("http://localhost:5173", "/v1/models")).toMatchObject({
      "access-control-allow-origin": "http://localhost:5173",
      vary: "Origin",
    });
    // A cache that kept one of these for a listed origin would hand it an answer its browser refuses.
    expect(policy.headers("https://evil.example.com", "/v1/models")).toEqual({ vary: "Origin" });
    expect(policy.headers("https://app.example.com.evil.example.com", "/v1/models")).toEqual({ vary: "Origin" });
    expect(policy.headers(null, "/v1/models")).toEqual({ vary: "Origin" });
  });

  test("preflights grant the methods and the headers asked for, cached for two hours", () => {
    const policy = createCorsPolicy(["https://app.example.com"]);
    expect(policy.preflight("OPTIONS", preflightFrom("https://app.example.com"), "/v1/chat/completions")).toEqual({
      status: 204,
      headers: {
        "access-control-allow-origin": "https://app.example.com",
        "access-control-expose-headers": connectCors.exposedHeaders.join(", "),
        "access-control-allow-methods": "GET, POST, DELETE",
        "access-control-allow-headers": "authorization, content-type, x-stainless-os",
        "access-control-max-age": "7200",
        vary: "Origin, Access-Control-Request-Headers",
      },
    });
    // Not allowed: an answer the browser refuses, which a cache keeps apart from a listed origin's.
    expect(policy.preflight("OPTIONS", preflightFrom("https://evil.example.com"), "/v1/chat/completions")).toEqual({
      status: 204,
      headers: { vary: "Origin" },
    });
    // Header names that are not HTTP tokens are not echoed.
    const odd = policy.preflight("OPTIONS", preflightFrom("https://app.example.com", "x-a, <script>"), "/v1/models");
    expect(odd?.headers["access-control-allow-headers"]).toBeUndefined();
  });

  test("the routes that take no token are for no origin, their preflights refused as an unlisted origin's", () => {
    for (const policy of [createCorsPolicy(["*"]), createCorsPolicy(["https://app.example.com"])]) {
      for (const path of ["/metrics", "/readyz", "/healthz", "/grpc.health.v1.Health/Check"]) {
        expect(policy.headers("https://app.example.com", path)).toEqual({});
        expect(policy.preflight("OPTIONS", preflightFrom("https://app.example.com"), path)).toEqual({
          status: 204,
          headers: {},
        });
      }
      expect(policy.headers("https://app.example.com", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"))
        .toEqual({});
      // The APIs, REST and RPC, as before.
      for (const path of ["/v1/models", "/billing.v1.BillingService/ListOrganizations", "/metrics/x", "/v1/metrics"]) {
        expect(policy.headers("https://app.example.com", path)["access-control-allow-origin"]).toBeDefined();
      }
    }
  });

  test("only OPTIONS with Access-Control-Request-Method is a preflight", () => {
    const policy = createCorsPolicy(["*"]);
    expect(policy.preflight("POST", preflightFrom("https://app.example.com"), "/v1/chat/completions")).toBeUndefined();
    const notAsking = new Headers({ origin: "https://app.example.com" });
    expect(policy.preflight("OPTIONS", notAsking, "/v1/models")).toBeUndefined();
  });
});

describe("CORS_ALLOWED_ORIGINS", () => {
  const shape = { CORS_ALLOWED_ORIGINS: commonEnv.CORS_ALLOWED_ORIGINS };

  test("any origin by default; a list is split and trimmed", () => {
    expect(parseEnv(shape, {}).CORS_ALLOWED_ORIGINS).toEqual(["*"]);
    expect(
      parseEnv(shape, { CORS_ALLOWED_ORIGINS: "https://a.example.com, http://localhost:5173" }).CORS_ALLOWED_ORIGINS,
    ).toEqual(["https://a.example.com", "http://localhost:5173"]);
  });

  test("entries that are not origins are refused, naming the variable", () => {
    for (const bad of ["https://a.example.com/app", "a.example.com", "ftp://a.example.com", "https://a.example.com/"]) {
      expect(() => parseEnv(shape, { CORS_ALLOWED_ORIGINS: bad })).toThrow(/CORS_ALLOWED_ORIGINS/);
    }
    // The message names the variable as set, its value, and which entry is wrong.
    expect(() => parseEnv(shape, { CORS_ALLOWED_ORIGINS: "*, https://a.example.com/" })).toThrow(
      'CORS_ALLOWED_ORIGINS ("*, https://a.example.com/", entry 2): each entry must be * or an origin',
    );
  });
});
