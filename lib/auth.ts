import { hash, timingSafeEqual } from "node:crypto";
import { Code, ConnectError, createContextKey } from "@connectrpc/connect";
import { defaultAdminToken } from "./config.ts";

/** Every API key's secret starts with this (billing makes them); a token without it is no key. */
export const keySecretPrefix = "sk-mesh-";
/** Base62 characters after the prefix in every key secret billing makes: about 256 bits. */
export const keySecretLength = 43;
const keySecretShape = new RegExp(`^${keySecretPrefix}[0-9A-Za-z]{${keySecretLength}}$`);

/** Whether a token has the shape of every key secret billing has made: the prefix, then keySecretLength base62. */
export function isKeySecretShaped(token: string): boolean {
  return keySecretShape.test(token);
}

/** The token of an `authorization: Bearer <token>` header, or undefined. */
export function bearerToken(headers: Pick<Headers, "get">): string | undefined {
  const value = headers.get("authorization");
  if (!value) return undefined;
  const match = /^Bearer\s+(.+)$/i.exec(value.trim());
  return match?.[1]?.trim() || undefined;
}

/** Constant-time string comparison (hashes first so lengths do not leak). */
export function safeEqual(a: string, b: string): boolean {
  return timingSafeEqual(sha256(a), sha256(b));
}

// One-shot hashing: a third of createHash's cost, which every request's key lookup pays.
export function sha256(text: string): Buffer {
  return hash("sha256", text, "buffer");
}

export function sha256Hex(text: string): string {
  return hash("sha256", text, "hex");
}

/** Throws Unauthenticated unless the request carries the admin bearer token. */
export function requireAdmin(headers: Headers, adminToken: string): void {
  const token = bearerToken(headers);
  if (!token) throw new ConnectError("missing bearer token", Code.Unauthenticated);
  requireAdminToken(token, adminToken);
}

/**
 * Throws PermissionDenied unless `token` is the admin token. A key's shape is told so: its caller should hear that
 * the method is the operator's, not retype the key.
 */
export function requireAdminToken(token: string, adminToken: string): void {
  if (safeEqual(token, adminToken)) return;
  if (token.startsWith(keySecretPrefix)) {
    throw new ConnectError("this method takes the admin token only, not an org's API key", Code.PermissionDenied);
  }
  throw new ConnectError("invalid admin token", Code.PermissionDenied);
}

/** The address a request came from, set by the server; undefined for a call made in-process, without a socket. */
export const peerAddressKey = createContextKey<string | undefined>(undefined, { description: "peer address" });

/** Whether `address` is this machine's loopback: 127.0.0.0/8 or ::1, IPv4-mapped 127.x too. */
export function isLoopback(address: string): boolean {
  const lower = address.toLowerCase();
  const v4 = lower.startsWith("::ffff:") ? lower.slice("::ffff:".length) : lower;
  return lower === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(v4);
}

/**
 * Whether a request was sent by a web page: browsers mark a page's requests with `Sec-Fetch-Site`, and with `Origin`
 * every cross-origin one and every POST, which the mesh's own clients, the CLI and Node's fetch never send.
 */
function fromWebPage(headers: Pick<Headers, "get">): boolean {
  return headers.get("origin") !== null || headers.get("sec-fetch-site") !== null;
}

/**
 * Headers a proxy adds to what it forwards (nginx, Caddy, ngrok, cloudflared, Envoy): a reverse proxy or tunnel on this
 * machine connects from loopback on behalf of callers anywhere. The mesh's own clients and the CLI send none of them.
 */
const proxyHeaders = ["forwarded", "via", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"];

/** The request headers `refusePublishedTokenFromAfar` reads, besides the token's. */
export const callerMarkHeaders = ["origin", "sec-fetch-site", ...proxyHeaders] as const;

function proxied(headers: Pick<Headers, "get">): boolean {
  return proxyHeaders.some((name) => headers.get(name) !== null);
}

/**
 * Throws PermissionDenied when `token` is the admin token, that token is the published default and the request is not
 * this machine's own: from another address (`peer`; undefined for a call made in-process) or through a proxy, or from a
 * web page, since any site a browser on this machine opens could send the published token to its loopback ports. A
 * mesh started without ADMIN_TOKEN must not give anyone on its network, or any website, the admin's rights.
 */
export function refusePublishedTokenFromAfar(
  token: string,
  adminToken: string,
  peer: string | undefined,
  headers: Pick<Headers, "get">,
): void {
  if (adminToken !== defaultAdminToken) return;
  const page = fromWebPage(headers);
  if (!page && !proxied(headers) && (peer === undefined || isLoopback(peer))) return;
  if (!safeEqual(token, adminToken)) return;
  throw new ConnectError(
    page
      ? "ADMIN_TOKEN is the published development default, refused from web pages (any site could send it): " +
          "set ADMIN_TOKEN to a token of your own to call from a browser"
      : "ADMIN_TOKEN is the published development default, accepted only from this machine (loopback), " +
          "not through a proxy: set ADMIN_TOKEN to a token of your own to call from elsewhere",
    Code.PermissionDenied,
  );
}
