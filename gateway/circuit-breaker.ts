/**
 * Per-target circuit breakers. A target that fails `failureThreshold` times in a row is skipped for a
 * cooldown; after it one request probes the target (half-open): success closes the breaker, failure
 * opens it again for a doubled cooldown (up to `maxCooldownMs`). An upstream's rate limit (its 429 and
 * Retry-After) holds a target back instead, without counting as a failure.
 */

import { Gauge, type Registry } from "prom-client";

export type BreakerState = "closed" | "open" | "half-open";

const stateValues: Record<BreakerState, number> = { closed: 0, "half-open": 1, open: 2 };

/** A gauge of each target's breaker (0 closed, 1 half-open, 2 open); returns the onChange that keeps it. */
export function breakerStateMetric(registry: Registry): (target: string, state: BreakerState) => void {
  const gauge = new Gauge({
    name: "gateway_circuit_breaker_state",
    help: "Circuit breaker of each upstream target: 0 closed, 1 half-open, 2 open.",
    labelNames: ["target"] as const,
    registers: [registry],
  });
  return (target, state) => gauge.set({ target }, stateValues[state]);
}

export interface CircuitBreakerOptions {
  /** Consecutive failures that open a breaker. */
  failureThreshold?: number;
  /** First cooldown after opening, in ms. */
  cooldownMs?: number;
  /** Longest cooldown after repeated failed probes, in ms. */
  maxCooldownMs?: number;
  now?: () => number;
  /** Hears every state change, for logs and metrics. */
  onChange?: (target: string, state: BreakerState) => void;
}

export interface CircuitBreakers {
  /**
   * Whether a request may go to `target` now. In half-open state this grants the single probe,
   * so the caller must report the outcome with succeed, fail or abandon.
   */
  allow(target: string): boolean;
  succeed(target: string): void;
  fail(target: string): void;
  /** The attempt ended without saying anything about the target's health (client cancelled). */
  abandon(target: string): void;
  /** Skips the target for `ms` (an upstream's 429 or Retry-After), without a trip. */
  holdFor(target: string, ms: number): void;
  state(target: string): BreakerState;
  /** How long until a target skipped now may be tried again, in ms; 0 when it may be tried already. */
  waitMs(target: string): number;
}

interface Breaker {
  failures: number;
  /** Epoch ms until which the breaker is open; 0 when closed. */
  openUntil: number;
  cooldownMs: number;
  halfOpen: boolean;
  probing: boolean;
  /** Retry-After hold, separate from trips. */
  heldUntil: number;
}

export function createCircuitBreakers(options: CircuitBreakerOptions = {}): CircuitBreakers {
  const threshold = options.failureThreshold ?? 5;
  const baseCooldownMs = options.cooldownMs ?? 30_000;
  const maxCooldownMs = Math.max(baseCooldownMs, options.maxCooldownMs ?? 300_000);
  const now = options.now ?? Date.now;
  const onChange = options.onChange ?? (() => {});
  const breakers = new Map<string, Breaker>();

  const get = (target: string): Breaker => {
    let b = breakers.get(target);
    if (!b) {
      b = { failures: 0, openUntil: 0, cooldownMs: baseCooldownMs, halfOpen: false, probing: false, heldUntil: 0 };
      breakers.set(target, b);
    }
    return b;
  };

  const open = (target: string, b: Breaker, cooldownMs: number) => {
    b.cooldownMs = cooldownMs;
    b.openUntil = now() + cooldownMs;
    b.halfOpen = false;
    b.probing = false;
    onChange(target, "open");
  };

  const stateOf = (b: Breaker | undefined, t: number): BreakerState => {
    if (!b || (b.openUntil === 0 && !b.halfOpen)) return "closed";
    return b.halfOpen || t >= b.openUntil ? "half-open" : "open";
  };

  return {
    allow(target) {
      const b = breakers.get(target);
      if (!b) return true;
      const t = now();
      if (t < b.heldUntil) return false;
      const state = stateOf(b, t);
      if (state === "closed") return true;
      if (state === "open") return false;
      if (b.probing) return false;
      if (!b.halfOpen) {
        b.halfOpen = true;
        onChange(target, "half-open");
      }
      b.probing = true;
      return true;
    },
    succeed(target) {
      const b = breakers.get(target);
      if (!b) return;
      const wasTripped = b.openUntil !== 0 || b.halfOpen;
      b.failures = 0;
      b.openUntil = 0;
      b.halfOpen = false;
      b.probing = false;
      b.cooldownMs = baseCooldownMs;
      if (wasTripped) onChange(target, "closed");
    },
    fail(target) {
      const b = get(target);
      if (b.halfOpen) {
        open(target, b, Math.min(maxCooldownMs, b.cooldownMs * 2));
        return;
      }
      // Failures of requests that were already in flight when the breaker opened change nothing.
      if (b.openUntil !== 0) return;
      if (++b.failures >= threshold) open(target, b, baseCooldownMs);
    },
    abandon(target) {
      const b = breakers.get(target);
      if (b) b.probing = false;
    },
    holdFor(target, ms) {
      const b = get(target);
      b.heldUntil = Math.max(b.heldUntil, now() + ms);
    },
    state(target) {
      return stateOf(breakers.get(target), now());
    },
    waitMs(target) {
      const b = breakers.get(target);
      if (!b) return 0;
      const t = now();
      let at = Math.max(t, b.heldUntil);
      if (stateOf(b, t) === "open") at = Math.max(at, b.openUntil);
      // A half-open breaker frees up when its probe ends, which is usually soon.
      else if (b.probing) at = Math.max(at, t + 1000);
      return at - t;
    },
  };
}
