import type { DescService } from "@bufbuild/protobuf";
import { type Client, Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
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
    interceptors: [limitUnaryCalls(maxUnaryCalls), resendRefusedAfterGoaway, ...auth, ...(options.interceptors ?? [])],
    defaultTimeoutMs: options.timeoutMs,
    pingIntervalMs: 10_000,
    idleConnectionTimeoutMs: 60_000,
  });
  return createClient(service, transport);
}

/**
 * Unary calls one client has in flight at once, each an HTTP/2 stream of its one connection; the rest wait their turn,
 * their deadline running. Bun's HTTP/2 client opens streams past a server's SETTINGS_MAX_CONCURRENT_STREAMS rather than
 * wait for one to close: the server refuses them, and after a hundred refusals closes the connection (GOAWAY
 * ENHANCE_YOUR_CALM), failing every call on it, a gateway's budget leases and key change stream too. Half of the
 * services' maxStreamsPerConnection, leaving the rest to streams.
 */
export const maxUnaryCalls = 500;

function limitUnaryCalls(max: number): Interceptor {
  let running = 0;
  const waiting: Array<() => void> = [];
  // A call that ends hands its place to the one that waited longest.
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else running--;
  };
  return (next) => async (req) => {
    if (req.stream) return next(req);
    if (running < max) running++;
    else {
      await new Promise<void>((resolve, reject) => {
        const leave = () => {
          const at = waiting.indexOf(go);
          if (at >= 0) waiting.splice(at, 1);
          reject(req.signal.reason);
        };
        const go = () => {
          req.signal.removeEventListener("abort", leave);
          resolve();
        };
        if (req.signal.aborted) return reject(req.signal.reason);
        waiting.push(go);
        req.signal.addEventListener("abort", leave, { once: true });
      });
    }
    try {
      return await next(req);
    } finally {
      release();
    }
  };
}

/** The error of a stream its connection would not open because the server had sent GOAWAY: the server never saw it. */
const refusedAfterGoaway = (e: unknown) =>
  (ConnectError.from(e).cause as NodeJS.ErrnoException | undefined)?.code === "ERR_HTTP2_GOAWAY_SESSION";

/**
 * A unary call made just as its server closes the connection (a billing restarting, say) can be refused by the client's
 * HTTP/2 session before it has handled the server's GOAWAY, failing Internal: callers took it for a server error, not a
 * server gone, and a gateway refused keys it would have admitted through the outage. Never sent, the call is sent
 * once more, on a new connection; a second refusal fails Unavailable.
 */
const resendRefusedAfterGoaway: Interceptor = (next) => async (req) => {
  if (req.stream) return next(req);
  try {
    return await next(req);
  } catch (e) {
    if (!refusedAfterGoaway(e) || req.signal.aborted) throw e;
  }
  try {
    return await next(req);
  } catch (e) {
    if (!refusedAfterGoaway(e)) throw e;
    throw new ConnectError("the server closed the connection", Code.Unavailable, undefined, undefined, e);
  }
};

/**
 * Every page of a List* RPC as one answer, its next_page_token empty, so a listing is complete however many rows
 * there are: `list` is called with each token until one comes back empty, asking for the largest pages (1000).
 */
export async function allPages<R extends { nextPageToken: string }, T>(
  list: (page: { pageSize: number; pageToken: string }) => Promise<R>,
  items: (res: R) => T[],
): Promise<R> {
  const first = await list({ pageSize: 1000, pageToken: "" });
  for (let res = first; res.nextPageToken; ) {
    res = await list({ pageSize: 1000, pageToken: res.nextPageToken });
    items(first).push(...items(res));
  }
  first.nextPageToken = "";
  return first;
}
