import { Code, type ConnectRouter, ConnectError } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.ts";
import type { Logger } from "./log.ts";
import type { Readiness } from "./server.ts";

export interface HealthOptions {
  /** Fully qualified names of the services this server answers for. */
  services: string[];
  readiness: () => Promise<Readiness>;
  /** Ends Watch streams, so a draining server is not held open by probes. */
  stopSignal: AbortSignal;
  /** How often Watch re-checks readiness. */
  pollMs?: number;
}

/** grpc.health.v1.Health on the same readiness as /readyz; NOT_SERVING while draining. */
export function registerHealth(router: ConnectRouter, options: HealthOptions): void {
  const known = new Set(options.services);
  const status = async (service: string): Promise<Status> => {
    if (service !== "" && !known.has(service)) return Status.SERVICE_UNKNOWN;
    if (options.stopSignal.aborted) return Status.NOT_SERVING;
    return (await options.readiness()).ready ? Status.SERVING : Status.NOT_SERVING;
  };
  router.service(Health, {
    async check(req) {
      const current = await status(req.service);
      if (current === Status.SERVICE_UNKNOWN) throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      return { status: current };
    },
    async *watch(req, ctx) {
      const pollMs = options.pollMs ?? 1000;
      let last: Status | undefined;
      while (!ctx.signal.aborted) {
        const current = await status(req.service);
        if (current !== last) yield { status: current };
        last = current;
        if (options.stopSignal.aborted) return;
        await abortableSleep(pollMs, ctx.signal, options.stopSignal);
      }
    },
  });
}

function abortableSleep(ms: number, ...signals: AbortSignal[]): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      for (const s of signals) s.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    for (const s of signals) s.addEventListener("abort", done, { once: true });
  });
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
  return async () => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = Symbol("timeout");
    try {
      const expired = new Promise<typeof timedOut>((resolve) => (timer = setTimeout(() => resolve(timedOut), timeoutMs)));
      if ((await Promise.race([ping(timeoutMs), expired])) === timedOut) {
        log.warn(`readiness: ${name} does not answer within ${timeoutMs} ms`);
        return { ready: false, checks: { [name]: "timeout" } };
      }
      return { ready: true, checks: { [name]: "ok" } };
    } catch (e) {
      log.warn(`readiness: ${name} does not answer`, { err: e });
      return { ready: false, checks: { [name]: "unreachable" } };
    } finally {
      clearTimeout(timer);
    }
  };
}
