import { Code, type ConnectRouter, ConnectError, createContextKey, type HandlerContext } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.ts";
import { createOutageLog, type Logger } from "./log.ts";
import type { Readiness } from "./server.ts";

/** How often readiness is checked at most, however many probes and Watch streams ask. */
export const readinessIntervalMs = 1000;

/** Readiness shared by /readyz, Health/Check and every Health/Watch stream of one server. */
export interface ReadinessPoller {
  /** The last result while it is under an interval old (or still being checked), else a new check. */
  current(): Promise<Readiness>;
  /** Hears each interval's result while subscribed; the poller only polls while someone listens. */
  subscribe(listener: (state: Readiness) => void): () => void;
}

/**
 * One readiness check per interval at most, however many ask: /readyz answers anyone, and a probe that pinged the
 * store on every call (or every second per Watch stream) could take the service out of rotation by itself. Timed on
 * a monotonic clock: on the wall clock, a host's time stepped back (NTP) kept the last result, a failure say, for as
 * long as the step.
 */
export function createReadinessPoller(check: () => Promise<Readiness>, intervalMs = readinessIntervalMs): ReadinessPoller {
  let last: { at: number; pending: boolean; result: Promise<Readiness> } | undefined;
  const listeners = new Set<(state: Readiness) => void>();
  let timer: ReturnType<typeof setInterval> | undefined;
  const current = () => {
    if (last && (last.pending || performance.now() - last.at < intervalMs)) return last.result;
    const entry = { at: performance.now(), pending: true, result: check() };
    const settle = () => {
      entry.pending = false;
      entry.at = performance.now();
    };
    entry.result.then(settle, settle);
    last = entry;
    return entry.result;
  };
  const poll = async () => {
    const state = await current().catch((): Readiness => ({ ready: false, checks: { server: "check failed" } }));
    for (const listener of listeners) listener(state);
  };
  return {
    current,
    subscribe(listener) {
      listeners.add(listener);
      timer ??= setInterval(poll, intervalMs);
      return () => {
        listeners.delete(listener);
        if (listeners.size > 0) return;
        clearInterval(timer);
        timer = undefined;
      };
    },
  };
}

/** The connection (HTTP/1.1 socket or HTTP/2 session) an RPC came in on, set by the server for per-connection caps. */
export const connectionKey = createContextKey<object | undefined>(undefined);

/**
 * Aborted once the connection an RPC came in on is past its age (ServerOptions.connectionMaxAgeMs) and going away: a
 * stream that would never end by itself ends then, so its client opens it again on a new connection.
 */
export const connectionEndingKey = createContextKey<AbortSignal>(new AbortController().signal);

/** A health or reflection request is a name or two: nothing an unauthenticated caller needs megabytes for. */
export const probeReadMaxBytes = 64 * 1024;

/**
 * Streams a method without a key holds open at once, on one connection and on the server: past either a new one is
 * ResourceExhausted (`refusal`). Each open stream holds memory, and its connection never idles: uncapped, one caller
 * could open them without end.
 */
export function createStreamCap(perConnection: number, total: number, refusal: string) {
  const onConnections = new WeakMap<object, number>();
  let open = 0;
  return {
    /** Takes a place for the stream of `ctx`, or throws; what it returns gives the place back. */
    take(ctx: HandlerContext): () => void {
      const connection = ctx.values.get(connectionKey) ?? {};
      const onConnection = onConnections.get(connection) ?? 0;
      if (open >= total || onConnection >= perConnection) throw new ConnectError(refusal, Code.ResourceExhausted);
      open++;
      onConnections.set(connection, onConnection + 1);
      let given = false;
      return () => {
        if (given) return;
        given = true;
        open--;
        onConnections.set(connection, (onConnections.get(connection) ?? 1) - 1);
      };
    },
  };
}

export interface HealthOptions {
  /** Fully qualified names of the services this server answers for. */
  services: string[];
  readiness: ReadinessPoller;
  /** Ends Watch streams, so a draining server is not held open by probes. */
  stopSignal: AbortSignal;
  /** Watch streams open at once on one connection, and on the server; past either a new one is ResourceExhausted. */
  maxWatchesPerConnection?: number;
  maxWatches?: number;
}

/** grpc.health.v1.Health on the same readiness as /readyz; NOT_SERVING while draining. */
export function registerHealth(router: ConnectRouter, options: HealthOptions): void {
  const known = new Set(options.services);
  const watches = createStreamCap(
    options.maxWatchesPerConnection ?? 16,
    options.maxWatches ?? 1024,
    "too many Health/Watch streams; use Health/Check",
  );
  const statusOf = (service: string, state: Readiness): Status => {
    if (service !== "" && !known.has(service)) return Status.SERVICE_UNKNOWN;
    if (options.stopSignal.aborted) return Status.NOT_SERVING;
    return state.ready ? Status.SERVING : Status.NOT_SERVING;
  };
  router.service(
    Health,
    {
      async check(req) {
        const current = statusOf(req.service, await options.readiness.current());
        if (current === Status.SERVICE_UNKNOWN) throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
        return { status: current };
      },
      async *watch(req, ctx) {
        const release = watches.take(ctx);
        // Each stream hears the shared poller's results instead of checking readiness itself.
        let latest: Readiness | undefined;
        let wake: (() => void) | undefined;
        const stop = () => wake?.();
        const unsubscribe = options.readiness.subscribe((state) => {
          latest = state;
          wake?.();
        });
        // Its connection going away past its age ends it too: the client watches again on a new one.
        const ending = AbortSignal.any([options.stopSignal, ctx.values.get(connectionEndingKey)]);
        ctx.signal.addEventListener("abort", stop);
        ending.addEventListener("abort", stop);
        try {
          latest ??= await options.readiness.current();
          let last: Status | undefined;
          while (!ctx.signal.aborted) {
            const current = statusOf(req.service, latest);
            if (current !== last) yield { status: current };
            last = current;
            if (ending.aborted) return;
            const seen = latest;
            await new Promise<void>((resolve) => {
              wake = resolve;
              // A result that came while the last status was being sent is not waited past.
              if (latest !== seen || ctx.signal.aborted || ending.aborted) resolve();
            });
            wake = undefined;
          }
        } finally {
          unsubscribe();
          ctx.signal.removeEventListener("abort", stop);
          ending.removeEventListener("abort", stop);
          release();
        }
      },
    },
    { readMaxBytes: probeReadMaxBytes },
  );
}

/** How long readiness waits for a store's ping. */
export const pingTimeoutMs = 1000;

/**
 * Readiness from one store's ping: `{ [name]: "ok" }`, or "unreachable" with the error in the log only, since /readyz
 * answers anyone and a driver's error names hosts and ports, or "timeout" when the ping has not answered within
 * `timeoutMs`, which it is given to bound its own wait by (so a hung store does not hold a connection either): a probe
 * of a hung store answers rather than hangs with it.
 */
export function pingReadiness(
  name: string,
  ping: (timeoutMs: number) => Promise<unknown>,
  log: Logger,
  timeoutMs = pingTimeoutMs,
): () => Promise<Readiness> {
  // Checked every second or so for as long as the store is down: logged as that starts and as it ends.
  const outage = createOutageLog(log, {
    failed: `readiness: ${name} does not answer`,
    recovered: `readiness: ${name} answers again`,
  });
  return async () => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = Symbol("timeout");
    try {
      const expired = new Promise<typeof timedOut>((resolve) => (timer = setTimeout(() => resolve(timedOut), timeoutMs)));
      if ((await Promise.race([ping(timeoutMs), expired])) === timedOut) {
        outage.failed({ timeout_ms: timeoutMs });
        return { ready: false, checks: { [name]: "timeout" } };
      }
      outage.recovered();
      return { ready: true, checks: { [name]: "ok" } };
    } catch (e) {
      outage.failed({ err: e });
      return { ready: false, checks: { [name]: "unreachable" } };
    } finally {
      clearTimeout(timer);
    }
  };
}
