import { pingTimeoutMs } from "../lib/health.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import type { Readiness } from "../lib/server.ts";
import type { ShipperStatus } from "./metrics-pipe.ts";

export interface ReadinessOptions {
  /** Base URL of billing; its /readyz says whether keys can be authorized. */
  billingUrl: string;
  shipper: { status(): ShipperStatus };
  /**
   * True while keys billing vouched for lately are still admitted without it (GATEWAY_KEY_STALE_SECONDS): billing not
   * answering then leaves the gateway ready, as taking every replica out of rotation would refuse those keys too.
   */
  keysVouchedLately?: () => boolean;
  /** How long billing's /readyz is waited for: by default past billing's own store ping, so its 503 is read. */
  timeoutMs?: number;
  fetch?: typeof fetch;
  /** Hears why billing did not answer; /readyz answers anyone, so it says no more than "unreachable". */
  log?: Logger;
}

/**
 * Ready when billing answers and the metrics spool is under its bound (a full spool drops metrics). The server checks
 * it once a second at most (lib/health.ts createReadinessPoller), so frequent probes do not hammer billing.
 */
export function createReadiness(options: ReadinessOptions): () => Promise<Readiness> {
  const timeoutMs = options.timeoutMs ?? pingTimeoutMs + 500;
  const doFetch = options.fetch ?? fetch;
  const url = `${options.billingUrl.replace(/\/$/, "")}/readyz`;
  // Probed every second or so for as long as billing is down: logged as that starts and as it ends.
  const outage = createOutageLog(options.log, {
    failed: "readiness: billing does not answer",
    recovered: "readiness: billing answers again",
  });
  const probeBilling = async (): Promise<string> => {
    try {
      const res = await doFetch(url, { signal: AbortSignal.timeout(timeoutMs) });
      await res.body?.cancel();
      outage.recovered();
      return res.ok ? "ok" : `not ready (HTTP ${res.status})`;
    } catch (e) {
      outage.failed({ err: e });
      return "unreachable";
    }
  };

  return async () => {
    const billingCheck = await probeBilling();
    const pipe = options.shipper.status();
    // Why the stream is down (the shipper logs it) may name hosts: not for an open endpoint.
    const pipeCheck = pipe.connected ? "ok" : `disconnected (${pipe.rows} rows spooled)`;
    const fill = `${pipe.rows} rows, ${Math.round((100 * pipe.bytes) / pipe.maxBytes)}% of ${pipe.maxBytes} bytes`;
    const spoolCheck = pipe.full ? `full (${fill}): request metrics that do not fit are dropped` : `ok (${fill})`;
    const staleKeys = billingCheck !== "ok" && options.keysVouchedLately?.() === true;
    return {
      ready: (billingCheck === "ok" || staleKeys) && !pipe.full,
      checks: {
        billing: staleKeys ? `${billingCheck}; keys it vouched for lately still admitted` : billingCheck,
        analytics: pipeCheck,
        spool: spoolCheck,
      },
    };
  };
}
