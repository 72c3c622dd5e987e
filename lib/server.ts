import * as http from "node:http";
import * as http2 from "node:http2";
import * as net from "node:net";
import {
  Code,
  type ConnectRouter,
  ConnectError,
  type ContextValues,
  createContextKey,
  createContextValues,
  type Interceptor,
} from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Registry } from "prom-client";
import { Health } from "../gen/grpc/health/v1/health_pb.ts";
import { peerAddressKey } from "./auth.ts";
import type { CorsPolicy } from "./cors.ts";
import { gatedInterceptors, type RequestGate, routerWithGates, wellFormed } from "./gates.ts";
import { sendGrpcMessageAsSpecified } from "./grpc-message.ts";
import { isGrpcWebText, transcodeGrpcWebText } from "./grpc-web-text.ts";
import { connectionEndingKey, connectionKey, createReadinessPoller, registerHealth } from "./health.ts";
import { checkJsonTimestampsOf } from "./json-timestamps.ts";
import type { Logger } from "./log.ts";
import { refusedUnread } from "./message-limits.ts";
import { registerReflection } from "./reflection.ts";
import { eachStep } from "./streams.ts";

export type NodeRequest = http.IncomingMessage | http2.Http2ServerRequest;
export type NodeResponse = http.ServerResponse | http2.Http2ServerResponse;

/** Serves plain HTTP routes next to the RPCs. Returns false when the path is not its own. */
export type HttpRoutes = (req: NodeRequest, res: NodeResponse) => boolean | Promise<boolean>;

/**
 * Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); one past it is refused
 * (REFUSED_STREAM). Without it Bun's node:http2 advertises 2^32-1 and takes every stream a client opens: 20,000 that
 * never send their body held 400 MB for the 120 s a body may take. gRPC clients, Node's and browsers wait for a free
 * stream instead; Bun's HTTP/2 client does not, which rpc-client's own limit keeps the mesh's calls under.
 */
export const maxStreamsPerConnection = 1000;

/**
 * Requests one HTTP/1.1 connection may have waiting for their answers at once (pipelined); one more closes it. Bun's
 * node:http reads on however many wait, where Node's stops reading: 4 connections that sent 490,000 requests
 * without reading an answer held 700 MB of a gateway's memory for their answers until they closed.
 */
export const maxPipelinedRequests = 64;

/** Largest RPC message a service accepts unless it sets its own (analytics: every IngestMetrics batch). */
export const defaultReadMaxBytes = 16 * 1024 * 1024;

/**
 * JSON messages as Connect reads them (fields a message does not define are skipped), but text that is not UTF-8 (a
 * Latin-1 body) is refused, as a binary message's strings are, rather than read with replacement characters and stored
 * so. Connect's JSON serialization takes the decoder beside its read options.
 */
const jsonOptions = { ignoreUnknownFields: true, textDecoder: new TextDecoder("utf-8", { fatal: true }) };

/**
 * JSON messages as jsonOptions reads them, but a field or enum name the message does not define is InvalidArgument,
 * naming it: a misspelt field skipped would be a change not made, a limit removed or a filter not applied, answered
 * OK. A method's own jsonOptions replace the server's whole, so this is the one to give it.
 */
export const strictJsonOptions = { ...jsonOptions, ignoreUnknownFields: false };

export interface Readiness {
  ready: boolean;
  /** Per dependency: "ok" or what is wrong. */
  checks: Record<string, string>;
}

export interface ServerOptions {
  name: string;
  port: number;
  host?: string;
  routes: (router: ConnectRouter) => void;
  /** Run from an RPC's request gate on (its own or this one), so a call a gate refuses is traced and counted too. */
  interceptors?: Interceptor[];
  /** Runs once an RPC's headers are in, before its body is read: throw a ConnectError to answer without reading it. */
  requestGate?: RequestGate;
  contextValues?: (req: NodeRequest) => ContextValues;
  http?: HttpRoutes;
  /** Checked once a second at most, for /readyz, Health/Check and every Health/Watch stream together. */
  readiness?: () => Promise<Readiness>;
  registry?: Registry;
  log: Logger;
  /** Largest RPC message accepted, in bytes; defaultReadMaxBytes when unset. */
  readMaxBytes?: number;
  /**
   * How long a request's body may take to arrive (120 s by default). Past it an HTTP/1.1 connection is closed and an
   * HTTP/2 stream is reset, leaving the session's other streams alone. Node's own requestTimeout does the first, but
   * Bun's node:http enforces neither. Client- and bidi-streaming RPCs are exempt: IngestMetrics sends its requests for
   * as long as the gateway runs.
   */
  requestBodyTimeoutMs?: number;
  /**
   * How long a connection may have nothing to do (65 s by default, past a load balancer's usual 60 s): silent before
   * its first byte, an HTTP/1.1 connection between requests or while a request's head arrives, an HTTP/2 connection
   * without streams. Node's own timeouts do part of this, but Bun's node:http enforces none of them. A response
   * (a streamed RPC's, say) whose client takes none of it for as long is cut: its connection or HTTP/2 stream.
   */
  connectionIdleTimeoutMs?: number;
  /** Told of each response whose write waits for its client, which it may cut as the idle limit would (the gateway's). */
  writeStalls?: WriteStalls;
  /** Which browser origins may call, answered on every route but /healthz, /readyz, /metrics, health and reflection. */
  cors?: CorsPolicy;
  /**
   * How long a connection takes new calls (defaultConnectionMaxAgeMs; 0 for as long as it lasts), each connection's
   * age drawn within ±10% of it so that a client's connections do not all end at once. Past it an HTTP/2 connection
   * is sent GOAWAY, so its client makes its next calls on a new connection, which a Kubernetes Service may send to
   * another replica (clients keep one connection to a Service for as long as it lasts, and a replica added later would
   * get none of their calls); streams that never end by themselves are told by connectionEndingKey and end, to be
   * opened again. An HTTP/1.1 connection past its age answers its next request with `Connection: close`.
   */
  connectionMaxAgeMs?: number;
  /**
   * How long the calls in flight on an HTTP/2 connection past its age may take to finish
   * (defaultConnectionMaxAgeGraceMs); those still running then are answered Unavailable and the connection closes.
   */
  connectionMaxAgeGraceMs?: number;
  /**
   * The body (and headers) of the answer to an HTTP/1.1 request the parser cannot read, given its status and what was
   * wrong (see unparsableAnswer); Connect's JSON error when unset. The connection then closes.
   */
  unparsable?: (status: number, message: string) => { headers?: Record<string, string>; body: string };
}

/** Responses whose writes wait for their clients: each may be cut before its idle limit, to bound their number. */
export interface WriteStalls {
  /**
   * A write to a response's client began waiting; `cut` ends the response as its idle limit does. Returns what to call
   * once the client took some of it or the response is over: the wait no longer counts.
   */
  waiting(cut: () => void): () => void;
}

/** A connection's age by default: a replica added to a Service gets its share of calls within about this. */
export const defaultConnectionMaxAgeMs = 5 * 60_000;
/** What a connection past its age gives its calls in flight by default, more than any unary call takes. */
export const defaultConnectionMaxAgeGraceMs = 10 * 60_000;
/** Each connection's age is the configured one give or take this share, drawn at random. */
const connectionAgeJitter = 0.1;

export interface RunningServer {
  port: number;
  /** http://host:port */
  url: string;
  /**
   * Answers /readyz with 503 `draining` while still serving for drainMs, then stops accepting, lets in-flight calls
   * finish for up to graceMs, closes what is left and waits (a few seconds at most) for the handlers it cut to return.
   * Calls still in flight when the grace is over are first handed to `cut`, which ends them with an answer of their
   * own (a 503, an error event), and given up to a second more to send it before their connections close.
   */
  close(graceMs: number, drainMs?: number, cut?: () => void): Promise<void>;
}

const h2Preface = Buffer.from("PRI * HTTP/2.0\r\n");

/** How long close() waits, after the grace period, for the handlers it cut to return. */
const cutSettleMs = 5_000;
/** How long close() waits, after the grace period, for what its `cut` ended to send its answer. */
export const cutAnswerMs = 1_000;

const alwaysReady = async (): Promise<Readiness> => ({ ready: true, checks: {} });

/**
 * One port for Connect, gRPC and gRPC-Web over HTTP/1.1 and h2c, plus /healthz, /readyz, /metrics
 * and any extra HTTP routes. The first bytes of each connection decide which server takes it.
 * Every server also answers grpc.health.v1.Health and gRPC server reflection for its services.
 */
export async function startServer(options: ServerOptions): Promise<RunningServer> {
  const shutdown = new AbortController();
  const draining = new AbortController();
  const readiness = createReadinessPoller(options.readiness ?? alwaysReady);
  // Paths whose request is a stream of messages: its body lasts as long as the call.
  const streamingRequests = new Set<string>();
  const intercepted = gatedInterceptors([
    wellFormedErrors,
    ...(options.interceptors ?? []),
    failedAsClientLeft,
    endedWithConnection,
  ]);
  const rpc = connectNodeAdapter({
    routes: (router) => {
      options.routes(routerWithGates(router, intercepted.gate));
      checkJsonTimestampsOf(router, options.readMaxBytes ?? defaultReadMaxBytes);
      for (const h of router.handlers) {
        if (h.method.methodKind === "client_streaming" || h.method.methodKind === "bidi_streaming") {
          streamingRequests.add(h.requestPath);
        }
      }
      const services = [...new Set(router.handlers.map((h) => h.service))];
      registerHealth(router, {
        services: services.map((s) => s.typeName),
        readiness,
        stopSignal: draining.signal,
      });
      registerReflection(router, [...services, Health]);
    },
    interceptors: [intercepted.interceptor],
    // Every call has a gate, if only this one: a call refused before its handler runs is answered as it should be.
    requestGate: intercepted.gate(options.requestGate ?? (() => {})),
    contextValues: (req) => {
      const connection = req.httpVersionMajor === 2 ? (req as http2.Http2ServerRequest).stream.session : req.socket;
      return (options.contextValues?.(req) ?? createContextValues())
        .set(connectionKey, connection)
        .set(connectionEndingKey, connection ? ending(connection).signal : new AbortController().signal)
        .set(connectionCutKey, connection ? cutting(connection).signal : new AbortController().signal)
        .set(peerAddressKey, peerAddress(req));
    },
    shutdownSignal: shutdown.signal,
    readMaxBytes: options.readMaxBytes ?? defaultReadMaxBytes,
    // Fields a message does not define are skipped, not kept: each would be an object of its own.
    binaryOptions: { readUnknownFields: false },
    jsonOptions,
    // Neither an RPC nor a route: a 404 that says so in Connect's error shape; to a gRPC or gRPC-Web call, its
    // Unimplemented in gRPC's own form (a trailers-only answer), whose message its client then shows.
    fallback: (req, res) => {
      const message = `no procedure or route at ${req.method} ${(req.url ?? "/").split("?")[0]}`;
      const type = req.headers["content-type"] ?? "";
      if (!/^application\/grpc(?:-web(?:-text)?)?(?:[+;]|$)/.test(type)) {
        sendJson(res as NodeResponse, 404, { code: "unimplemented", message });
        return;
      }
      const grpc = { "grpc-status": String(Code.Unimplemented), "grpc-message": encodeURIComponent(message) };
      const out = res as http.ServerResponse;
      // gRPC-Web reads the status from the headers; gRPC over HTTP/2 from trailers.
      out.writeHead(200, { "content-type": type.split(";")[0] as string, ...grpc });
      if (req.httpVersionMajor === 2) out.addTrailers(grpc);
      out.end();
    },
  });

  // Responses not yet closed, and handlers not yet returned (a cut stream's handler still meters what it sent).
  let inFlight = 0;
  let handling = 0;
  const settled = () => inFlight === 0 && handling === 0;
  const bodyTimeoutMs = options.requestBodyTimeoutMs ?? 120_000;
  // Connections (sockets, HTTP/2 sessions) with nothing to do, and what closes each once its idle time is up.
  const idleMs = options.connectionIdleTimeoutMs ?? 65_000;
  const idle = new Map<object, ReturnType<typeof setTimeout>>();
  const idleFrom = (connection: object, close: () => void) => {
    clearTimeout(idle.get(connection));
    idle.set(connection, setTimeout(() => (idle.delete(connection), close()), idleMs));
  };
  const busy = (connection: object) => {
    clearTimeout(idle.get(connection));
    idle.delete(connection);
  };
  // Connections (sockets, HTTP/2 sessions) and what is aborted once each is past its age.
  const maxAgeMs = options.connectionMaxAgeMs ?? defaultConnectionMaxAgeMs;
  const ageGraceMs = options.connectionMaxAgeGraceMs ?? defaultConnectionMaxAgeGraceMs;
  const endings = new WeakMap<object, AbortController>();
  const ending = (connection: object) => controllerOf(endings, connection);
  // And what is aborted once its grace is over, failing the calls still on it.
  const cuts = new WeakMap<object, AbortController>();
  const cutting = (connection: object) => controllerOf(cuts, connection);
  /** Calls `end` once `connection` is past its age, unless it closes first. */
  const ageOut = (connection: net.Socket | http2.ServerHttp2Session, end: () => void) => {
    if (maxAgeMs <= 0) return;
    const jitter = 1 - connectionAgeJitter + 2 * connectionAgeJitter * Math.random();
    const timer = setTimeout(() => {
      ending(connection).abort();
      end();
    }, maxAgeMs * jitter);
    timer.unref?.();
    connection.once("close", () => clearTimeout(timer));
  };

  // HTTP/1.1 requests of each connection not yet answered.
  const pipelined = new WeakMap<net.Socket, number>();
  const handle = async (req: NodeRequest, res: NodeResponse) => {
    joinAuthorizationFields(req);
    if (req.httpVersionMajor === 1) {
      const socket = req.socket;
      const waiting = (pipelined.get(socket) ?? 0) + 1;
      if (waiting > maxPipelinedRequests) {
        socket.destroy();
        return;
      }
      pipelined.set(socket, waiting);
      res.once("close", () => pipelined.set(socket, (pipelined.get(socket) ?? 1) - 1));
    }
    inFlight++;
    handling++;
    res.once("close", () => inFlight--);
    if (req.httpVersionMajor === 1) {
      // Its head has arrived; once answered, the connection waits for the next request's head.
      const socket = req.socket;
      busy(socket);
      res.once("close", () => {
        if (!socket.destroyed) idleFrom(socket, () => socket.destroy());
      });
      // Draining, a kept-alive connection's next request would stay here past the endpoint change and be reset when
      // the port closes: the client opens a new connection, which goes to a replica that is staying. So it does past
      // the connection's age, to a replica the Service picks.
      if (draining.signal.aborted || ending(socket).signal.aborted) res.setHeader("connection", "close");
    }
    const path = req.url ?? "/";
    // The path without the query string, which may carry a credential (?access_token=, ?sig=): what is logged.
    const bare = path.split("?")[0] ?? path;
    if (mayHaveBody(req) && !streamingRequests.has(bare)) {
      limitBodyTime(req, res, bodyTimeoutMs);
      if (req.httpVersionMajor === 1) closeIfUnread(req as http.IncomingMessage, res as http.ServerResponse);
      else resetIfUnread(req as http2.Http2ServerRequest, res as http2.Http2ServerResponse);
    }
    limitWriteWait(req, res, idleMs, options.writeStalls);
    try {
      if (options.cors) {
        const headers = headersOf(req.headers);
        const preflight = options.cors.preflight(req.method ?? "GET", headers, bare);
        if (preflight) return send(res, preflight.status, preflight.headers, "");
        for (const [name, value] of Object.entries(options.cors.headers(headers.get("origin"), bare))) {
          res.setHeader(name, value);
        }
      }
      if (req.method === "GET" && (await serveOps(path, res, options, readiness.current, draining.signal))) return;
      if (options.http && (await options.http(req, res))) return;
      holdDeadlineToTimer(req.headers);
      if (isGrpcWebText(req)) transcodeGrpcWebText(req, res);
      if (req.headers["content-type"]?.startsWith("application/grpc")) sendGrpcMessageAsSpecified(res);
      rpc(req, res);
    } catch (e) {
      options.log.error("http handler failed", { err: e, path: bare });
      if (!res.headersSent) sendJson(res, 500, { error: { message: "internal error", type: "server_error" } });
      else res.end();
    } finally {
      handling--;
    }
  };

  const h1 = http.createServer({ keepAliveTimeout: 65_000 }, handle);
  // Node's own answer is a bare 400 with no body, or none at all: clients get the protocol's JSON error instead.
  h1.on("clientError", (err: NodeJS.ErrnoException, socket: net.Socket) => {
    // An answer to an earlier request still going out on it (pipelining) must not be cut into: the connection just ends.
    const answering = (socket as net.Socket & { _httpMessage?: unknown })._httpMessage;
    if (err.code === "ECONNRESET" || !socket.writable || answering) return socket.destroy();
    socket.end(unparsableAnswer(err.code, options.unparsable));
  });
  const h2 = http2.createServer({ settings: { maxConcurrentStreams: maxStreamsPerConnection } }, handle);
  const sessions = new Set<http2.ServerHttp2Session>();
  h2.on("session", (s) => {
    sessions.add(s);
    // A session is idle while it has no streams; an IngestMetrics stream keeps it busy for as long as it lasts.
    const open = new Set<http2.ServerHttp2Stream>();
    // GOAWAY first, so a client that is about to open a stream opens it on a new connection instead.
    const closeIdle = () => s.close();
    idleFrom(s, closeIdle);
    s.on("stream", (stream: http2.ServerHttp2Stream) => {
      open.add(stream);
      busy(s);
      stream.once("close", () => {
        open.delete(stream);
        if (open.size === 0 && !s.destroyed) idleFrom(s, closeIdle);
      });
    });
    s.on("close", () => {
      sessions.delete(s);
      busy(s);
    });
    // GOAWAY: the client's next calls go on a new connection; those in flight have the grace to finish.
    const socket = arriving;
    ageOut(s, () => {
      s.close();
      const grace = setTimeout(() => {
        // Each call still on it is answered Unavailable (a Bun client would wait to its deadline on a stream reset or
        // taken down with its connection), and the session then closes as its GOAWAY said. One that does not is
        // destroyed, with its socket, which Bun's session leaves open.
        cutting(s).abort();
        setTimeout(() => {
          for (const stream of open) stream.close(http2.constants.NGHTTP2_CANCEL);
          s.destroy();
          socket?.destroy();
        }, cutAnswerMs).unref?.();
      }, ageGraceMs);
      grace.unref?.();
      s.once("close", () => clearTimeout(grace));
    });
  });
  const sockets = new Set<net.Socket>();
  // The socket being handed to h2, whose session begins as it is.
  let arriving: net.Socket | undefined;
  const listener = net.createServer((socket) => {
    sockets.add(socket);
    idleFrom(socket, () => socket.destroy());
    socket.on("close", () => {
      sockets.delete(socket);
      busy(socket);
    });
    socket.once("data", (first: Buffer) => {
      socket.pause();
      socket.unshift(first);
      const isH2 = first.subarray(0, h2Preface.length).equals(h2Preface);
      // An HTTP/2 connection's idle time and age are its session's; an HTTP/1.1 one waits for its first request's head.
      if (isH2) busy(socket);
      else ageOut(socket, () => {});
      arriving = socket;
      (isH2 ? h2 : h1).emit("connection", socket);
      arriving = undefined;
      socket.resume();
    });
  });

  await new Promise<void>((resolve, reject) => {
    listener.once("error", reject);
    listener.listen(options.port, options.host ?? "0.0.0.0", () => resolve());
  });
  const port = (listener.address() as net.AddressInfo).port;
  options.log.info("listening", { port, server: options.name });

  return {
    port,
    url: `http://127.0.0.1:${port}`,
    async close(graceMs, drainMs = 0, cut) {
      draining.abort();
      // Load balancers see the 503 and stop sending; until they have, new connections are still served.
      if (drainMs > 0) await Bun.sleep(drainMs);
      listener.close();
      h1.close();
      h2.close();
      for (const s of sessions) s.close();
      h1.closeIdleConnections();
      /** Until every call has settled, for `ms` at most. */
      const settling = async (ms: number) => {
        const deadline = performance.now() + ms;
        while (!settled() && performance.now() < deadline) await Bun.sleep(10);
      };
      await settling(graceMs);
      if (!settled() && cut) {
        cut();
        await settling(cutAnswerMs);
      }
      shutdown.abort();
      await Bun.sleep(20);
      for (const s of sessions) s.destroy();
      h1.closeAllConnections();
      for (const s of sockets) s.destroy();
      // What was cut still finishes its own work (a stream records its metrics) before the caller flushes and exits.
      await settling(cutSettleMs);
    },
  };
}

/** The connection's grace past its age is over (ServerOptions.connectionMaxAgeGraceMs): its calls are cut. */
const connectionCutKey = createContextKey<AbortSignal>(new AbortController().signal);

function controllerOf(controllers: WeakMap<object, AbortController>, connection: object): AbortController {
  let controller = controllers.get(connection);
  if (!controller) controllers.set(connection, (controller = new AbortController()));
  return controller;
}

/**
 * A call still running once its connection's grace past its age is over fails Unavailable, to be made again on a new
 * connection: its client hears it, where a stream reset or closed with its connection leaves a Bun client waiting.
 */
const endedWithConnection: Interceptor = (next) => async (req) => {
  const cut = req.contextValues.get(connectionCutKey);
  // Each step races a promise of its own: one promise raced by every step of a stream would hold a reaction per step,
  // and with it every message the stream has sent, until the call ends.
  const watched = <T>(step: Promise<T>) => {
    let fail = () => {};
    const cutOff = new Promise<never>((_, reject) => {
      fail = () => reject(new ConnectError("the connection closed past its age; call again", Code.Unavailable));
    });
    if (cut.aborted) fail();
    else cut.addEventListener("abort", fail, { once: true });
    return Promise.race([step, cutOff]).finally(() => cut.removeEventListener("abort", fail));
  };
  const res = await watched(next(req));
  if (!res.stream) return res;
  return { ...res, message: eachStep(res.message, (move) => watched(move())) };
};

/**
 * A failure of a call's handler or interceptors with a message that is not well-formed (see wellFormed); one answered
 * before its handler ran is made so at its gate. Outermost, so that it sees the failure as every interceptor left it.
 */
const wellFormedErrors: Interceptor = (next) => async (req) => {
  try {
    const res = await next(req);
    if (!res.stream) return res;
    return { ...res, message: eachStep(res.message, (move) => move().catch((e: unknown) => Promise.reject(wellFormed(e)))) };
  } catch (e) {
    throw wellFormed(e);
  }
};

/**
 * A call whose client left while its message was still arriving fails with what reading the cut-off body made of it:
 * Unimplemented "missing input message" for an HTTP/2 stream reset before its message, InvalidArgument "incomplete
 * envelope" for one reset part-way, a bare "aborted" error on HTTP/1.1. It fails instead with the client's leaving, as
 * its signal says (Canceled, or Aborted for a dropped HTTP/1.1 connection), so interceptors count and trace it as that.
 * Innermost, so that every interceptor sees it so. A call the server itself ended (a message over readMaxBytes) keeps
 * its own error.
 */
const failedAsClientLeft: Interceptor = (next) => async (req) => {
  try {
    const res = await next(req);
    if (!res.stream) return res;
    const message = eachStep(res.message, (move) =>
      move().catch(async (e: unknown) => Promise.reject(await leftInstead(req.signal, e))),
    );
    return { ...res, message };
  } catch (e) {
    throw await leftInstead(req.signal, e);
  }
};

/** The client's leaving in place of `error`, if it left: connect-node reads its reset stream or dropped connection so. */
async function leftInstead(signal: AbortSignal, error: unknown): Promise<unknown> {
  // A message over readMaxBytes, or past the bound on bodies in flight, is the server's own refusal: waiting would let
  // the request it stopped reading close first, a bare abort of the call's signal that the request gate would take for
  // the client leaving.
  if ((error instanceof ConnectError && error.code === Code.ResourceExhausted) || refusedUnread(error)) return error;
  // node:http2 closes a reset stream's request, which aborts the signal, just after its body ends.
  if (!signal.aborted) await new Promise((resolve) => setImmediate(resolve));
  const reason: unknown = signal.reason;
  const left = reason instanceof ConnectError && (reason.code === Code.Canceled || reason.code === Code.Aborted);
  return left ? reason : error;
}

/** node:http's lower-cased header object behind the Fetch Headers `get`. */
export function headersOf(raw: http.IncomingHttpHeaders): Pick<Headers, "get"> {
  return {
    get(name) {
      const value = raw[name.toLowerCase()];
      return value === undefined ? null : Array.isArray(value) ? value.join(", ") : value;
    },
  };
}

/**
 * node:http and node:http2 keep the first of several Authorization fields and drop the rest, so a proxy in front that
 * judged the request by another (or by all of them) would pass a call served as the first's. They are joined as Fetch
 * joins them (the gateway's REST port): a value no token matches, refused in each route's own way.
 */
function joinAuthorizationFields(req: NodeRequest): void {
  const raw = req.rawHeaders;
  let values: string[] | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string;
    if (name.length === 13 && name.toLowerCase() === "authorization") (values ??= []).push(raw[i + 1] ?? "");
  }
  if (values && values.length > 1) req.headers.authorization = values.join(", ");
}

/** The longest delay setTimeout takes: a longer one fires after 1 ms. */
const maxTimerMs = 2 ** 31 - 1;
const grpcTimeoutUnitMs: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1_000, m: 1, u: 1e-3, n: 1e-6 };

/**
 * A deadline longer than setTimeout can wait (24.8 days: `grpc-timeout: 3000H`, as clients that want none may send)
 * is held to it, which no call outlives: connect times the deadline with setTimeout, so it would pass after 1 ms and
 * fail the call DeadlineExceeded at once.
 */
function holdDeadlineToTimer(headers: http.IncomingHttpHeaders): void {
  const grpc = /^(\d{1,8})([HMSmun])$/.exec(String(headers["grpc-timeout"] ?? ""));
  if (grpc && Number(grpc[1]) * (grpcTimeoutUnitMs[grpc[2] ?? ""] ?? 0) > maxTimerMs) {
    headers["grpc-timeout"] = `${Math.floor(maxTimerMs / 1000)}S`;
  }
  const connect = /^\d{1,10}$/.exec(String(headers["connect-timeout-ms"] ?? ""));
  if (connect && Number(connect[0]) > maxTimerMs) headers["connect-timeout-ms"] = String(maxTimerMs);
}

/** The address a request came from; empty when its connection no longer knows, which no check takes for loopback. */
export function peerAddress(req: NodeRequest): string {
  const socket = req.httpVersionMajor === 2 ? (req as http2.Http2ServerRequest).stream.session?.socket : req.socket;
  return socket?.remoteAddress ?? "";
}

/** HTTP/2 requests carry no length; a stream whose headers ended it has no body to wait for. */
function mayHaveBody(req: NodeRequest): boolean {
  if (req.httpVersionMajor === 2) return !(req as http2.Http2ServerRequest).stream.endAfterHeaders;
  return req.headers["transfer-encoding"] !== undefined || (req.headers["content-length"] ?? "0") !== "0";
}

/**
 * An HTTP/1.1 answer given before its request's body is all read (a message over readMaxBytes, a caller refused
 * unread, a route that takes none) closes its connection: kept alive, the connection would read the rest of the body,
 * whatever the client keeps sending, to find the next request.
 */
function closeIfUnread(req: http.IncomingMessage, res: http.ServerResponse): void {
  const writeHead = res.writeHead.bind(res) as (...args: unknown[]) => http.ServerResponse;
  res.writeHead = ((...args: unknown[]) => {
    if (!req.complete) res.setHeader("connection", "close");
    return writeHead(...args);
  }) as typeof res.writeHead;
}

/**
 * An HTTP/2 answer given before its request's body is all read resets the stream with NO_ERROR behind it (RFC 9113
 * section 8.1): the client stops sending and keeps the answer. Bun's node:http2 ends such a stream on its side without
 * a frame, so the client would go on sending into a window nobody reads, its stream open until the body's time limit.
 * Bun sends the reset after the answer's data and trailers, so gRPC's status still reaches its client.
 */
function resetIfUnread(req: http2.Http2ServerRequest, res: http2.Http2ServerResponse): void {
  let ended = false;
  req.once("end", () => {
    ended = true;
  });
  const end = res.end.bind(res) as (...args: unknown[]) => http2.Http2ServerResponse;
  res.end = ((...args: unknown[]) => {
    const answered = end(...args);
    if (!ended && !req.stream.closed) req.stream.close(http2.constants.NGHTTP2_NO_ERROR);
    return answered;
  }) as typeof res.end;
}

/**
 * Gives up on a request whose body has not all arrived within `ms`: its HTTP/1.1 connection is closed, its HTTP/2
 * stream reset. Listening for the body's end reads nothing.
 */
function limitBodyTime(req: NodeRequest, res: NodeResponse, ms: number): void {
  const timer = setTimeout(() => cut(req), ms);
  const done = () => clearTimeout(timer);
  req.once("end", done);
  res.once("close", done);
}

/**
 * Gives up on a response whose client takes none of it for `ms` while a write waits to go out (on HTTP/2, its
 * stream's window stays full): the client is gone all but in name, and a stream's handler would wait on the write,
 * holding its upstream call, until the request's own time limit. It is cut as a late body is. A client that takes a
 * large answer slowly is not cut: the time runs from the last bytes that went out, not from the write.
 *
 * connect-node waits on each write for its callback, "drain" or "error", and Bun gets it wrong when the response
 * closes first: node:http2 sends none of them, so the handler's stream would never end, and node:http calls back with
 * ERR_SOCKET_CLOSED, which connect-node takes for a fault of the server's (Internal, logged). Either is settled here
 * as the client's leaving.
 */
function limitWriteWait(req: NodeRequest, res: NodeResponse, ms: number, stalls?: WriteStalls): void {
  type Done = (error?: Error | null) => void;
  type Write = (chunk: unknown, encoding?: unknown, callback?: Done) => boolean;
  const write = res.write.bind(res) as Write;
  // Bun calls a write back only once all of it is out, and takes what waits as one write: a large write goes out a
  // piece at a time, each called back as the client takes it.
  let writesOut = 0;
  const pieces: Array<{ bytes: Uint8Array; done?: Done }> = [];
  let ending: (() => void) | undefined;
  // node:http2 calls back a write its stream's closing cut short as if it had gone out.
  const cutShort = () => req.httpVersionMajor === 2 && (req as http2.Http2ServerRequest).stream.closed;
  const failure = (error: Error | null | undefined) => (error || cutShort() ? clientLeft(error ?? undefined) : undefined);
  const writeNext = () => {
    const next = pieces[0];
    if (next === undefined) return ending?.();
    write(next.bytes, undefined, (e) => {
      writesOut++;
      if (stalled) stall();
      const error = failure(e);
      // Once one fails, so do the rest: their writers wait on them.
      for (const piece of error ? pieces.splice(0) : pieces.splice(0, 1)) piece.done?.(error);
      if (!error) writeNext();
    });
  };
  // Writes not yet out. Not "drain": Bun emits it once the first piece of a write is out, or not at all.
  let unsent = 0;
  let owesDrain = false;
  let waiting: ReturnType<typeof setInterval> | undefined;
  // While a write waits, what takes it off the stalls: its client taking some of it starts the wait anew.
  let stalled: (() => void) | undefined;
  const stall = () => {
    stalled?.();
    stalled = stalls?.waiting(() => cut(req));
  };
  const wentOut = () => {
    clearInterval(waiting);
    waiting = undefined;
    stalled?.();
    stalled = undefined;
  };
  const watch = () => {
    stall();
    let last = writesOut;
    // On a clock the host's time being stepped (NTP) does not move, as every time limit here.
    let since = performance.now();
    return setInterval(() => {
      if (writesOut !== last) {
        last = writesOut;
        since = performance.now();
      } else if (performance.now() - since >= ms) {
        // Still waiting, as the response's close reads it.
        clearInterval(waiting);
        cut(req);
      }
    }, Math.min(ms / 4, 1000));
  };
  (res as { write: Write }).write = (chunk, encoding, callback) => {
    const then = typeof encoding === "function" ? (encoding as Done) : callback;
    const as = typeof encoding === "string" ? (encoding as BufferEncoding) : undefined;
    unsent++;
    const done: Done = (error) => {
      if (--unsent === 0) {
        wentOut();
        // connect-node waits for it, as a write that returned false tells it to.
        if (owesDrain) res.emit("drain");
        owesDrain = false;
      }
      then?.(error);
    };
    const bytes = typeof chunk === "string" ? Buffer.from(chunk, as) : chunk;
    let flushed: boolean;
    if (bytes instanceof Uint8Array && (bytes.length > writePiece || pieces.length > 0)) {
      const queued = pieces.length > 0;
      for (let at = 0; at < bytes.length; at += writePiece) {
        const last = at + writePiece >= bytes.length;
        pieces.push({ bytes: bytes.subarray(at, at + writePiece), done: last ? done : undefined });
      }
      if (!queued) writeNext();
      flushed = false;
      owesDrain = true;
    } else {
      flushed = write(chunk, as, (error) => {
        writesOut++;
        if (stalled) stall();
        done(failure(error));
      });
    }
    if (!flushed && unsent > 0) waiting ??= watch();
    return flushed;
  };
  type End = (...args: unknown[]) => NodeResponse;
  const end = res.end.bind(res) as End;
  // After the pieces still waiting to go out. A last chunk that goes out in pieces is written first, as any write:
  // node:http2's end writes its chunk and ends the stream at once, its pieces past the first then written after the
  // end, the stream reset (INTERNAL_ERROR) 64 KiB into the answer; node:http's hands all of it to the socket unwatched.
  (res as { end: End }).end = (...args) => {
    const [chunk, encoding] = args;
    const as = typeof encoding === "string" ? (encoding as BufferEncoding) : undefined;
    const size = typeof chunk === "string" ? Buffer.byteLength(chunk, as) : chunk instanceof Uint8Array ? chunk.length : 0;
    if ((size > writePiece || (size > 0 && pieces.length > 0)) && !res.writableEnded && !cutShort()) {
      (res as { write: Write }).write(chunk, as);
      args = args.slice(as === undefined ? 1 : 2);
    }
    if (pieces.length === 0) return end(...args);
    ending = () => void end(...args);
    return res;
  };
  res.once("close", () => {
    // Only connect-node listens for errors, and only while its write waits.
    if (waiting !== undefined && res.listenerCount("error") > 0) res.emit("error", clientLeft());
    wentOut();
  });
}

/** How much of a large write goes out at once, so that its going out is seen as it goes. */
const writePiece = 64 * 1024;

/** What connect-node reads as a client that hung up (Aborted, not logged), as it reads a destroyed stream on Node. */
function clientLeft(cause?: Error): Error {
  return Object.assign(new Error("the client left before the response went out", { cause }), { code: "ERR_STREAM_DESTROYED" });
}

/** Ends a request for good: its HTTP/1.1 connection closed, its HTTP/2 stream reset (the session's others go on). */
function cut(req: NodeRequest): void {
  if (req.httpVersionMajor === 2) (req as http2.Http2ServerRequest).stream.close(http2.constants.NGHTTP2_CANCEL);
  else req.socket.destroy();
}

async function serveOps(
  path: string,
  res: NodeResponse,
  options: ServerOptions,
  readiness: () => Promise<Readiness>,
  draining: AbortSignal,
): Promise<boolean> {
  const bare = path.split("?")[0];
  if (bare === "/healthz") {
    sendJson(res, 200, { status: "ok", service: options.name });
    return true;
  }
  if (bare === "/readyz") {
    // A draining server stops taking new work first, so load balancers move away before it closes.
    const state = draining.aborted ? { ready: false, checks: { server: "draining" } } : await readiness();
    sendJson(res, state.ready ? 200 : 503, { status: state.ready ? "ready" : "not_ready", checks: state.checks });
    return true;
  }
  if (bare === "/metrics" && options.registry) {
    const body = await options.registry.metrics();
    send(res, 200, { "content-type": options.registry.contentType }, body);
    return true;
  }
  return false;
}

/**
 * The whole HTTP/1.1 answer to a request its parser refused, by the parser's error code: a head past the limit is 431,
 * a method it does not know 501 (as HTTP says of a method a server does not implement), anything else 400.
 */
function unparsableAnswer(code: string | undefined, render: ServerOptions["unparsable"]): string {
  const [status, message, connectCode] =
    code === "HPE_HEADER_OVERFLOW"
      ? [431, "The request's headers are too large.", "resource_exhausted"]
      : code === "HPE_INVALID_METHOD"
        ? [501, "The request's method is not one this server implements.", "unimplemented"]
        : [400, "The request is not well-formed HTTP/1.1.", "invalid_argument"];
  const { headers = {}, body } = render?.(status, message) ?? { body: JSON.stringify({ code: connectCode, message }) };
  const lines = [`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}`, "content-type: application/json"];
  for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
  lines.push(`content-length: ${Buffer.byteLength(body)}`, "connection: close", "", body);
  return lines.join("\r\n");
}

/** Writes a whole response; one signature for HTTP/1.1 and HTTP/2 responses. */
export function send(res: NodeResponse, status: number, headers: Record<string, string>, body: string | Uint8Array): void {
  // Declared, as a whole body's is, though a large one goes out as writes (HTTP/1.1 would otherwise chunk it).
  const size = typeof body === "string" ? Buffer.byteLength(body) : body.length;
  if (size > 0 && !Object.keys(headers).some((name) => name.toLowerCase() === "content-length")) {
    headers = { ...headers, "content-length": String(size) };
  }
  (res as http.ServerResponse).writeHead(status, headers);
  res.end(body);
}

export function sendJson(res: NodeResponse, status: number, value: unknown, headers: Record<string, string> = {}): void {
  send(res, status, { "content-type": "application/json", ...headers }, JSON.stringify(value));
}
