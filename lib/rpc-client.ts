import type { DescService } from "@bufbuild/protobuf";
import { type Client, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

export interface ServiceClientOptions {
  baseUrl: string;
  interceptors?: Interceptor[];
  /** Sent as `authorization: Bearer <token>` on every call. */
  bearerToken?: string;
  /** Deadline for unary calls, in milliseconds. */
  timeoutMs?: number;
}

/** A typed client for a mesh service, over gRPC on h2c (the transport that carries bidi streams). */
export function createServiceClient<S extends DescService>(service: S, options: ServiceClientOptions): Client<S> {
  const auth: Interceptor[] = options.bearerToken
    ? [
        (next) => (req) => {
          req.header.set("authorization", `Bearer ${options.bearerToken}`);
          return next(req);
        },
      ]
    : [];
  const transport = createGrpcTransport({
    baseUrl: options.baseUrl,
    interceptors: [...auth, ...(options.interceptors ?? [])],
    defaultTimeoutMs: options.timeoutMs,
    pingIntervalMs: 10_000,
    idleConnectionTimeoutMs: 60_000,
  });
  return createClient(service, transport);
}
