import { Counter, Gauge, type Registry } from "prom-client";

/**
 * A bound on the request-body bytes every request in flight holds at once, on all the gateway's ports: each body
 * counts its bytes as they arrive, what memory holds of it, until its request is done. A declared length is checked
 * before the body is read, not held: a slow client declaring large bodies would otherwise hold the bound having sent
 * nothing. GATEWAY_MAX_BODY_BYTES bounds one body; this bounds a burst of them, which would otherwise exhaust a
 * replica's memory.
 */
export interface BodyBudget {
  readonly maxBytes: number;
  /** What the requests in flight hold now. */
  readonly heldBytes: number;
  /** One request's share, empty until its body is counted. */
  hold(): BodyHold;
}

export interface BodyHold {
  /**
   * The largest declared length a body may be held at in full before it is read, and read in one piece: a 1,024th of
   * the bound, 64 KiB at most. A slow sender holds at most that of the bound a connection before its bytes arrive.
   */
  readonly upfront: number;
  /**
   * Whether a body declaring `bytes` could fit beside what the others hold now, taking nothing: false refuses it
   * before it is read, as it could only be refused once its bytes arrived.
   */
  fits(bytes: number): boolean;
  /**
   * Grows the share to `bytes`, what has arrived of the body (or what it inflates to); false, taking nothing more,
   * when that would pass the bound. Once released, a late chunk of a request that is over takes nothing.
   */
  cover(bytes: number): boolean;
  /** Gives the share back; again does nothing. */
  release(): void;
}

export function createBodyBudget(options: { maxBytes: number; registry?: Registry }): BodyBudget {
  const { maxBytes } = options;
  let held = 0;
  const refusals = options.registry
    ? new Counter({
        name: "gateway_inflight_body_refusals_total",
        help: "Requests refused (503, Unavailable) because their body would pass gateway_inflight_body_limit_bytes.",
        registers: [options.registry],
      })
    : undefined;
  if (options.registry) {
    new Gauge({
      name: "gateway_inflight_body_bytes",
      help: "Request-body bytes held by the requests in flight, counted against gateway_inflight_body_limit_bytes.",
      registers: [options.registry],
      collect() {
        this.set(held);
      },
    });
    new Gauge({
      name: "gateway_inflight_body_limit_bytes",
      help: "Bound of the request-body bytes all requests in flight may hold (GATEWAY_MAX_INFLIGHT_BODY_BYTES).",
      registers: [options.registry],
      collect() {
        this.set(maxBytes);
      },
    });
  }
  const upfront = Math.min(64 * 1024, Math.floor(maxBytes / 1024));
  const hold = (): BodyHold => {
    let taken = 0;
    let released = false;
    return {
      upfront,
      fits(bytes) {
        // A length that is not a number fits: the bytes count as they come. So does a body alone, as in `cover`.
        if (released || !(bytes > taken) || held === taken || held - taken + bytes <= maxBytes) return true;
        refusals?.inc();
        return false;
      },
      cover(bytes) {
        // A length that is not a number (an HTTP/2 header says what it likes) takes nothing: the bytes count as they come.
        if (released || !(bytes > taken)) return true;
        // A body alone always goes on: its own size is bounded by GATEWAY_MAX_BODY_BYTES (an RPC's envelope, or its
        // inflated bytes beside its compressed ones, may take it past a bound set near that), and waiting for others
        // to finish could not make it fit.
        if (held + bytes - taken > maxBytes && held > taken) {
          refusals?.inc();
          return false;
        }
        held += bytes - taken;
        taken = bytes;
        return true;
      },
      release() {
        if (released) return;
        released = true;
        held -= taken;
        taken = 0;
      },
    };
  };
  return {
    maxBytes,
    get heldBytes() {
      return held;
    },
    hold,
  };
}
