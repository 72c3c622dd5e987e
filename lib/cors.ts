import { cors as connectCors } from "@connectrpc/connect";

/**
 * Which browser origins may call a service's APIs, and what they may read. Every API takes a bearer token, never a
 * cookie, so a cross-origin call carries no ambient credentials: allowing an origin only lets its pages use keys they
 * hold. The routes that take no token (see `forBrowsers`) are answered to no origin.
 */
export interface CorsPolicy {
  /**
   * Headers for the answer to a request from `origin` for `path` (without its query); no CORS headers when there is no
   * origin, it is not allowed or the path is not for browsers.
   */
  headers(origin: string | null | undefined, path: string): Record<string, string>;
  /**
   * The answer to a preflight (OPTIONS with Access-Control-Request-Method) for `path`; undefined for any other
   * request. An origin that is not allowed, or a path not for browsers, gets 204 without CORS headers, which the
   * browser refuses.
   */
  preflight(
    method: string,
    headers: Pick<Headers, "get">,
    path: string,
  ): { status: number; headers: Record<string, string> } | undefined;
}

/**
 * Whether pages of other origins may read what `path` answers: not the operations endpoints, nor the health and
 * reflection RPCs. They take no token, so with any origin allowed every site a browser opens could read a service's
 * metrics and dependency status wherever the browser reaches it (this machine, an internal network).
 */
export function forBrowsers(path: string): boolean {
  return !/^\/(healthz|readyz|metrics)$|^\/grpc\.(health|reflection)\./.test(path);
}

// Preflights are cached by the browser this long (Chromium caps it at 2 hours).
const maxAgeSeconds = 7200;
// Request header names a preflight may ask for: HTTP tokens only, so the echo cannot inject anything.
const headerList = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(\s*,\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*$/;

/**
 * A policy for `origins` (`*` allows any). Exposed headers: Connect's and gRPC-Web's status headers plus `expose`.
 * Preflights allow GET, POST and DELETE (of a stored response) with whatever request headers they ask for (the OpenAI
 * SDKs send a dozen of their own), since which headers a caller sends is no protection once its origin is allowed.
 */
export function createCorsPolicy(origins: readonly string[], expose: readonly string[] = []): CorsPolicy {
  const any = origins.includes("*");
  const allowed = new Set(origins);
  const exposed = [...connectCors.exposedHeaders, ...expose].join(", ");
  const methods = ["GET", "POST", "DELETE"].join(", ");

  const allow = (origin: string) => ({
    "access-control-allow-origin": origin,
    "access-control-expose-headers": exposed,
  });
  const headers = (origin: string | null | undefined, path: string): Record<string, string> => {
    if (!forBrowsers(path)) return {};
    // With a list, whether an answer has CORS headers, and which origin they name, depends on the request's origin:
    // caches must keep answers to different origins, and to none, apart.
    if (!any) return origin && allowed.has(origin) ? { ...allow(origin), vary: "Origin" } : { vary: "Origin" };
    return origin ? allow("*") : {};
  };

  return {
    headers,
    preflight(method, request, path) {
      if (method !== "OPTIONS") return undefined;
      const wanted = request.get("access-control-request-method");
      if (wanted === null) return undefined;
      const granted = headers(request.get("origin"), path);
      // Refused: no CORS headers, but with a list the answer still depends on the origin (see headers).
      if (granted["access-control-allow-origin"] === undefined) return { status: 204, headers: granted };
      const asked = request.get("access-control-request-headers")?.trim() ?? "";
      return {
        status: 204,
        headers: {
          ...granted,
          "access-control-allow-methods": methods,
          ...(headerList.test(asked) ? { "access-control-allow-headers": asked } : {}),
          "access-control-max-age": String(maxAgeSeconds),
          // The answer differs by what was asked.
          vary: any ? "Access-Control-Request-Headers" : "Origin, Access-Control-Request-Headers",
        },
      };
    },
  };
}
