import { hash, timingSafeEqual } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";

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
  if (!safeEqual(token, adminToken)) throw new ConnectError("invalid admin token", Code.PermissionDenied);
}
