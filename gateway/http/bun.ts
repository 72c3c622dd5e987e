import type { Server } from "bun";
import { ulid } from "ulid";
import type { CorsPolicy } from "../../lib/cors.ts";
import { cutAnswerMs, type WriteStalls } from "../../lib/server.ts";
import type { Logger } from "../../lib/log.ts";
import type { BodyBudget } from "../body-budget.ts";
import { errorBody, toGatewayError } from "../errors.ts";
import { pathOf, type RestApp } from "./app.ts";

export interface BunRestServer {
  readonly port: number;
  /** http://host:port */
  readonly url: string;
  /**
   * Serves on for drainMs (while the RPC port's /readyz says draining), then stops accepting, waits up to graceMs for
   * in-flight requests and streams, hands those still in flight to `cut` (which ends them with a 503 or an error event)
   * and gives them up to a second more to send it, and closes the rest.
   */
  close(graceMs: number, drainMs?: number, cut?: () => void): Promise<void>;
}

/**
 * Serves a RestApp on Bun's native HTTP server, the REST API's fast path: under Bun it carries
 * several times the requests per core of node:http, which the shared RPC port has to use.
 */
export function serveRest(
  app: RestApp,
  options: {
    port: number;
    hostname?: string;
    maxBodyBytes: number;
    log?: Logger;
    /**
     * How long a connection may sit silent while a request's head or body arrives, and idle between requests. Past
     * 60 s so a load balancer's keep-alive (AWS: 60 s) ends first, like the RPC port's.
     */
    idleTimeoutSeconds?: number;
    /**
     * How long a request's body may take to arrive, however it trickles (120 s by default, as on the service ports).
     * Bun's server applies this from the request's head; the connection is closed past it.
     */
    requestBodyTimeoutSeconds?: number;
    /** Which browser origins may call; none when unset. */
    cors?: CorsPolicy;
    /** The bound on request-body bytes in flight, shared with the gateway's other port. */
    bodies?: BodyBudget;
    /** The bound on stalled streams, shared with the gateway's other port: it may cut one as the idle limit would. */
    stalls?: WriteStalls;
  },
): BunRestServer {
  const idle = options.idleTimeoutSeconds ?? 65;
  const bodyTime = options.requestBodyTimeoutSeconds ?? 120;
  const cors = options.cors;
  let draining = false;
  const server: Server<undefined> = Bun.serve({
    port: options.port,
    hostname: options.hostname ?? "0.0.0.0",
    // The app answers 413 itself, in OpenAI's shape, without reading past its limit. Bun's own limit would answer
    // first, with a bare 413, so it is out of the way.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    idleTimeout: idle,
    async fetch(request, bun) {
      // The idle limit would cut a body still arriving after `idle` seconds, data or not: it gets its own limit.
      bun.timeout(request, bodyTime);
      const path = cors && pathOf(request.url);
      const preflight = path ? cors.preflight(request.method, request.headers, path) : undefined;
      if (preflight) return new Response(null, preflight);
      // The body's bytes are given back once the answer is all handed over, the client has left, or the app failed.
      const body = options.bodies?.hold();
      if (body) request.signal.addEventListener("abort", () => body.release(), { once: true });
      // While a stream's write waits, what takes it off the stalls; once the stall bound cut it, nothing else times it.
      let stalled: (() => void) | undefined;
      let cut = false;
      let response: Response;
      try {
        response = await app.fetch(request, {
          // Once the request is read, its answer may be silent for as long as an upstream thinks: the gateway's own
          // time limits end it. Then the connection is idle again and its limit is back.
          bodyRead: () => bun.timeout(request, 0),
          answered: () => {
            body?.release();
            stalled?.();
            stalled = undefined;
            if (!cut) bun.timeout(request, idle);
          },
          // A stream's client that takes none of it for the idle limit is gone all but in name: its connection is
          // closed, at once (Bun's timer ticks in seconds) when the stream is over already or the stall bound cuts it.
          writeWaits: (closing) => {
            if (cut) return;
            bun.timeout(request, closing ? 1 : idle);
            stalled ??= options.stalls?.waiting(() => {
              cut = true;
              stalled = undefined;
              bun.timeout(request, 1);
            });
          },
          writeDone: () => {
            stalled?.();
            stalled = undefined;
            if (!cut) bun.timeout(request, 0);
          },
          body,
        });
      } catch (e) {
        body?.release();
        throw e;
      }
      if (path) {
        for (const [name, value] of Object.entries(cors.headers(request.headers.get("origin"), path))) {
          response.headers.set(name, value);
        }
      }
      // Draining, a kept-alive connection's next request would stay here past the endpoint change and be reset when
      // the port closes: the client opens a new connection, which goes to a replica that is staying.
      if (draining) response.headers.set("connection", "close");
      return response;
    },
    // The app answers its own failures; anything that escapes still gets OpenAI's error shape.
    error(e) {
      // The id the client gets is the one logged, so a report of it finds the failure.
      const requestId = ulid();
      options.log?.error("rest handler failed", { request_id: requestId, err: e });
      const error = toGatewayError(e);
      return new Response(errorBody(error), {
        status: error.status,
        headers: { "content-type": "application/json", "x-request-id": requestId },
      });
    },
  });
  const port = server.port ?? options.port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    async close(graceMs, drainMs = 0, cut) {
      draining = true;
      if (drainMs > 0) await Bun.sleep(drainMs);
      let done = false;
      const drained = server.stop(false).finally(() => (done = true));
      const within = (ms: number) => Promise.race([drained, Bun.sleep(ms)]);
      await within(graceMs);
      if (!done && cut) {
        cut();
        await within(cutAnswerMs);
      }
      if (!done) await server.stop(true);
      await drained;
    },
  };
}
