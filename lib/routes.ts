import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, type ConnectRouter, ConnectError, type HandlerContext, type MethodImpl, type ServiceImpl } from "@connectrpc/connect";
import { bearerToken, peerAddressKey, refusePublishedTokenFromAfar, requireAdminToken } from "./auth.ts";
import { strictJsonOptions } from "./server.ts";

/** Largest message an admin method reads, unless it says otherwise. */
export const adminMessageBytes = 1 << 20;
/** Largest message a method an org's API key may call reads: queries and lookups, all small. */
export const orgMessageBytes = 64 << 10;

export interface GuardedRoutesOptions<S extends DescService> {
  adminToken: string;
  /** Methods an org's own API key may call too; their handlers check the key. */
  orgMethods?: readonly (keyof ServiceImpl<S>)[];
  /** Methods that carry bulk (usage batches, metrics): their own read limit, in bytes. */
  bulk?: Partial<Record<keyof ServiceImpl<S>, number>>;
}

/**
 * A service's routes, with callers turned away before their message is read: decoding is what a large message costs
 * (a 16 MB message of empty repeated elements became 3 GB of objects), so no one without a token pays it. No bearer
 * token is Unauthenticated; on a method only admins may call, another token than the admin's is PermissionDenied. A
 * method an org's API key may call passes any token for its handler to check, and reads a small message. On every
 * method the published default admin token is refused from a caller not on this machine and from web pages, so handlers
 * never see it. In JSON (Connect, gRPC-Web, gRPC+json) a field or enum name a message does not define is InvalidArgument
 * (strictJsonOptions): JSON is written by people and scripts, and a misspelt field skipped is a change not made, a
 * limit removed or a filter not applied, answered OK. Binary messages skip unknown fields, as a newer client's are.
 */
export function guardedRoutes<S extends DescService>(
  service: S,
  impl: Partial<ServiceImpl<S>>,
  options: GuardedRoutesOptions<S>,
) {
  const orgMethods = new Set<string>(options.orgMethods as readonly string[] | undefined);
  const bulk = (options.bulk ?? {}) as Record<string, number | undefined>;
  const gate = (ctx: HandlerContext) => {
    const token = bearerToken(ctx.requestHeader);
    if (!token) throw new ConnectError("missing bearer token", Code.Unauthenticated);
    refusePublishedTokenFromAfar(token, options.adminToken, ctx.values.get(peerAddressKey), ctx.requestHeader);
    if (!orgMethods.has(ctx.method.localName)) requireAdminToken(token, options.adminToken);
  };
  return (router: ConnectRouter) => {
    for (const method of service.methods as DescMethod[]) {
      const name = method.localName;
      const readMaxBytes = bulk[name] ?? (orgMethods.has(name) ? orgMessageBytes : adminMessageBytes);
      const handler = (impl as Record<string, MethodImpl<DescMethod> | undefined>)[name];
      if (handler) router.rpc(method, handler, { requestGate: gate, readMaxBytes, jsonOptions: strictJsonOptions });
    }
  };
}
