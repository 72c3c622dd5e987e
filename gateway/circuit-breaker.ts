/**
 * Per-target circuit breakers. A target that fails `failureThreshold` times in a row is skipped for a
 * cooldown; after it one request probes the target (half-open): success closes the breaker, failure
 * opens it again for a doubled cooldown (up to `maxCooldownMs`). An upstream's rate limit (its 429) is no failure:
 * one 429 may be about its request alone (a large prompt over what is left of a tokens-per-minute limit), so it holds
 * back no other request; `throttleThreshold` of them in a row hold the target for as long as they asked or a backoff
 * that doubles with each hold (up to `cooldownMs`), after which one request at a time probes it until it serves.
 */

import { Gauge, type Registry } from "prom-client";

export type BreakerState = "closed" | "open" | "half-open";

const stateValues: Record<BreakerState, number> = { closed: 0, "half-open": 1, open: 2 };

/**
 * A gauge of each target's breaker (0 closed, 1 half-open, 2 open), read as it stands at each scrape: an open breaker
 * is half-open once its cooldown is over, whether or not a request has come since to probe the target (a fallback
 * target nothing asks for once the first serves again stays there, not open for good).
 */
export function breakerStateMetric(registry: Registry, breakers: Pick<CircuitBreakers, "states">): void {
  new Gauge({
    name: "gateway_circuit_breaker_state",
    help: "Circuit breaker of each upstream target: 0 closed, 1 half-open, 2 open.",
    labelNames: ["target"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const [target, state] of breakers.states()) this.set({ target }, stateValues[state]);
    },
  });
}

export interface CircuitBreakerOptions {
  /** Consecutive failures that open a breaker. */
  failureThreshold?: number;
  /** First cooldown after opening, in ms. */
  cooldownMs?: number;
  /** Longest cooldown after repeated failed probes, in ms. */
  maxCooldownMs?: number;
  /** Consecutive 429s that hold a target back from every request. */
  throttleThreshold?: number;
  /** First hold after them, in ms; doubled by each 429 of the probe after a hold, up to `cooldownMs`. */
  holdMs?: number;
  now?: () => number;
  /** Hears every state change, for logs and metrics. */
  onChange?: (target: string, state: BreakerState) => void;
}

/**
 * The outcome methods take the attempt's `holder` (whatever object `allow` was given for it): only the holder of a
 * probe ends that probe, so an attempt sent before the breaker opened or the hold began cannot let a second probe in.
 */
export interface CircuitBreakers {
  /**
   * Whether a request may go to `target` now. In half-open state, and after a hold, this grants the single probe to
   * `holder`, so the caller must report the outcome with succeed, fail, throttle or abandon.
   */
  allow(target: string, holder?: object): boolean;
  /** Any success closes the breaker and ends a hold: the target serves. */
  succeed(target: string): void;
  /**
   * A stream's attempt was answered (its first chunk came): the target serves, so a tripped breaker closes and a hold
   * for its 429s ends (and the probe after one) at once; how the stream ends is still told, a failure counting then.
   */
  served(target: string, holder?: object): void;
  fail(target: string, holder?: object): void;
  /** An upstream's 429 (not a failure); `askedMs` is its Retry-After, when it sent one. */
  throttle(target: string, askedMs: number | undefined, holder?: object): void;
  /** The attempt ended without saying anything about the target's health (client cancelled). */
  abandon(target: string, holder?: object): void;
  /**
   * Skips the target for `ms` (an upstream's long Retry-After with a 5xx), without a trip: it is unavailable meanwhile,
   * not held for its rate limit (see held).
   */
  holdFor(target: string, ms: number): void;
  state(target: string): BreakerState;
  /** Every target that has had a breaker, with its state now. */
  states(): Map<string, BreakerState>;
  /** The target is skipped now for its upstream's rate limit (a hold, or its probe after one) rather than failures. */
  held(target: string): boolean;
  /** How long until a target skipped now may be tried again, in ms; 0 when it may be tried already. */
  waitMs(target: string): number;
}

interface Breaker {
  failures: number;
  /** Epoch ms until which the breaker is open; 0 when closed. */
  openUntil: number;
  cooldownMs: number;
  halfOpen: boolean;
  /** The single attempt let through in half-open state or after a hold, by its holder; undefined when none is out. */
  probe: { holder: object | undefined } | undefined;
  /** 429s in a row since the target last served, one per request however often it retried. */
  throttles: number;
  /** The request of the last 429 counted. */
  lastThrottler: object | undefined;
  /** Length of the last hold for 429s, in ms; 0 when the target has served since (no probe needed). */
  holdMs: number;
  /** Epoch ms until which the target is held back for its rate limit, separate from trips. */
  heldUntil: number;
  /** Epoch ms until which the target is skipped as a 5xx's long Retry-After asked: unavailable, not rate limited. */
  downUntil: number;
}

export function createCircuitBreakers(options: CircuitBreakerOptions = {}): CircuitBreakers {
  const threshold = options.failureThreshold ?? 5;
  const baseCooldownMs = options.cooldownMs ?? 30_000;
  const maxCooldownMs = Math.max(baseCooldownMs, options.maxCooldownMs ?? 300_000);
  const throttleThreshold = options.throttleThreshold ?? 2;
  const firstHoldMs = Math.min(baseCooldownMs, options.holdMs ?? 1_000);
  const now = options.now ?? Date.now;
  const onChange = options.onChange ?? (() => {});
  const breakers = new Map<string, Breaker>();

  const get = (target: string): Breaker => {
    let b = breakers.get(target);
    if (!b) {
      b = {
        failures: 0,
        openUntil: 0,
        cooldownMs: baseCooldownMs,
        halfOpen: false,
        probe: undefined,
        throttles: 0,
        lastThrottler: undefined,
        holdMs: 0,
        heldUntil: 0,
        downUntil: 0,
      };
      breakers.set(target, b);
    }
    return b;
  };

  const open = (target: string, b: Breaker, cooldownMs: number) => {
    b.cooldownMs = cooldownMs;
    b.openUntil = now() + cooldownMs;
    b.halfOpen = false;
    b.probe = undefined;
    onChange(target, "open");
  };

  // The target serves: the next 429s start counting afresh.
  const endHold = (b: Breaker) => {
    b.throttles = 0;
    b.lastThrottler = undefined;
    b.holdMs = 0;
  };

  // The target serves: the breaker closes and any hold ends.
  const close = (target: string, b: Breaker) => {
    const wasTripped = b.openUntil !== 0 || b.halfOpen;
    b.failures = 0;
    b.openUntil = 0;
    b.halfOpen = false;
    b.probe = undefined;
    b.cooldownMs = baseCooldownMs;
    endHold(b);
    b.heldUntil = 0;
    b.downUntil = 0;
    if (wasTripped) onChange(target, "closed");
  };

  // Ends the probe when `holder` holds it; says whether it did.
  const endProbe = (b: Breaker, holder: object | undefined) => {
    if (b.probe === undefined || b.probe.holder !== holder) return false;
    b.probe = undefined;
    return true;
  };

  const stateOf = (b: Breaker | undefined, t: number): BreakerState => {
    if (!b || (b.openUntil === 0 && !b.halfOpen)) return "closed";
    return b.halfOpen || t >= b.openUntil ? "half-open" : "open";
  };

  return {
    allow(target, holder) {
      const b = breakers.get(target);
      if (!b) return true;
      const t = now();
      if (t < b.heldUntil || t < b.downUntil) return false;
      const state = stateOf(b, t);
      if (state === "open") return false;
      if (state === "closed" && b.holdMs === 0) return true;
      if (b.probe) return false;
      if (state === "half-open" && !b.halfOpen) {
        b.halfOpen = true;
        onChange(target, "half-open");
      }
      b.probe = { holder };
      return true;
    },
    succeed(target) {
      const b = breakers.get(target);
      if (b) close(target, b);
    },
    served(target, holder) {
      const b = breakers.get(target);
      if (!b) return;
      // A tripped breaker's probe (or a stream sent before it opened) is answered: the target serves, so it takes
      // every request again now rather than once the stream ends, which may be minutes on; a failure later in the
      // stream counts against it as any other.
      if (b.openUntil !== 0 || b.halfOpen) return close(target, b);
      if (b.holdMs > 0) endProbe(b, holder);
      endHold(b);
    },
    fail(target, holder) {
      const b = get(target);
      // Failures of requests that were already in flight when the breaker opened change nothing.
      const probe = endProbe(b, holder);
      if (b.halfOpen) {
        if (probe) open(target, b, Math.min(maxCooldownMs, b.cooldownMs * 2));
        return;
      }
      if (b.openUntil !== 0) return;
      if (++b.failures >= threshold) open(target, b, baseCooldownMs);
    },
    throttle(target, askedMs, holder) {
      const b = get(target);
      const probe = endProbe(b, holder);
      // Held already: a 429 to a request sent before the hold began says nothing new; its probe's doubles the hold.
      if (!probe && b.holdMs > 0) return;
      // One request's retries are one piece of evidence: its prompt may be what is over the limit, not the target.
      if (!probe && holder !== undefined && holder === b.lastThrottler) return;
      b.lastThrottler = holder;
      if (++b.throttles < throttleThreshold) return;
      b.holdMs = b.holdMs === 0 ? firstHoldMs : Math.min(baseCooldownMs, b.holdMs * 2);
      b.heldUntil = Math.max(b.heldUntil, now() + Math.max(b.holdMs, Math.min(askedMs ?? 0, maxCooldownMs)));
    },
    abandon(target, holder) {
      const b = breakers.get(target);
      if (b) endProbe(b, holder);
    },
    holdFor(target, ms) {
      const b = get(target);
      // An upstream may ask for a day; no longer than a failing target's longest cooldown, after which it is tried.
      b.downUntil = Math.max(b.downUntil, now() + Math.min(ms, maxCooldownMs));
    },
    state(target) {
      return stateOf(breakers.get(target), now());
    },
    states() {
      const t = now();
      return new Map([...breakers].map(([target, b]) => [target, stateOf(b, t)]));
    },
    held(target) {
      const b = breakers.get(target);
      if (!b) return false;
      const t = now();
      return t < b.heldUntil || (b.probe !== undefined && b.holdMs > 0 && stateOf(b, t) === "closed");
    },
    waitMs(target) {
      const b = breakers.get(target);
      if (!b) return 0;
      const t = now();
      let at = Math.max(t, b.heldUntil, b.downUntil);
      if (stateOf(b, t) === "open") at = Math.max(at, b.openUntil);
      // A half-open breaker frees up when its probe ends, which is usually soon.
      else if (b.probe) at = Math.max(at, t + 1000);
      return at - t;
    },
  };
}
