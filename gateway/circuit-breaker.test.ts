import { describe, expect, test } from "bun:test";
import { Registry } from "prom-client";
import { type BreakerState, breakerStateMetric, createCircuitBreakers } from "./circuit-breaker.ts";

function setup() {
  const clock = { t: 1_000_000 };
  const changes: [string, BreakerState][] = [];
  const breakers = createCircuitBreakers({
    failureThreshold: 3,
    cooldownMs: 10_000,
    maxCooldownMs: 25_000,
    now: () => clock.t,
    onChange: (target, state) => changes.push([target, state]),
  });
  return { breakers, clock, changes };
}

describe("circuit breakers", () => {
  test("open after consecutive failures; a success in between resets the count", () => {
    const { breakers, changes } = setup();
    breakers.fail("a");
    breakers.fail("a");
    breakers.succeed("a");
    breakers.fail("a");
    breakers.fail("a");
    expect(breakers.state("a")).toBe("closed");
    expect(breakers.allow("a")).toBe(true);
    breakers.fail("a");
    expect(breakers.state("a")).toBe("open");
    expect(breakers.allow("a")).toBe(false);
    expect(breakers.waitMs("a")).toBe(10_000);
    // Other targets are independent.
    expect(breakers.allow("b")).toBe(true);
    expect(changes).toEqual([["a", "open"]]);
  });

  test("the state gauge says how each breaker stands at the scrape: half-open once a cooldown is over, untried or not", async () => {
    const { breakers, clock } = setup();
    const registry = new Registry();
    breakerStateMetric(registry, breakers);
    const scrape = async () => (await registry.getSingleMetricAsString("gateway_circuit_breaker_state")).split("\n").slice(2);
    expect(await scrape()).toEqual([]);
    for (let i = 0; i < 3; i++) breakers.fail("a");
    breakers.fail("b");
    expect(await scrape()).toEqual(['gateway_circuit_breaker_state{target="a"} 2', 'gateway_circuit_breaker_state{target="b"} 0']);
    // A fallback target nothing asks for once the first target serves again: no request comes to probe it.
    clock.t += 10_000;
    expect(await scrape()).toEqual(['gateway_circuit_breaker_state{target="a"} 1', 'gateway_circuit_breaker_state{target="b"} 0']);
    breakers.allow("a");
    breakers.succeed("a");
    expect(await scrape()).toEqual(['gateway_circuit_breaker_state{target="a"} 0', 'gateway_circuit_breaker_state{target="b"} 0']);
  });

  test("after the cooldown one probe goes through; its success closes the breaker", () => {
    const { breakers, clock, changes } = setup();
    for (let i = 0; i < 3; i++) breakers.fail("a");
    clock.t += 9_999;
    expect(breakers.allow("a")).toBe(false);
    clock.t += 1;
    expect(breakers.state("a")).toBe("half-open");
    expect(breakers.allow("a")).toBe(true);
    // Only one probe at a time.
    expect(breakers.allow("a")).toBe(false);
    expect(breakers.allow("a")).toBe(false);
    breakers.succeed("a");
    expect(breakers.state("a")).toBe("closed");
    expect(breakers.allow("a")).toBe(true);
    expect(breakers.allow("a")).toBe(true);
    expect(changes).toEqual([
      ["a", "open"],
      ["a", "half-open"],
      ["a", "closed"],
    ]);
  });

  test("a failed probe reopens with a doubled cooldown, capped", () => {
    const { breakers, clock } = setup();
    for (let i = 0; i < 3; i++) breakers.fail("a");
    clock.t += 10_000;
    expect(breakers.allow("a")).toBe(true);
    breakers.fail("a");
    expect(breakers.state("a")).toBe("open");
    expect(breakers.waitMs("a")).toBe(20_000);
    clock.t += 20_000;
    expect(breakers.allow("a")).toBe(true);
    breakers.fail("a");
    expect(breakers.waitMs("a")).toBe(25_000);
    clock.t += 25_000;
    expect(breakers.allow("a")).toBe(true);
    breakers.succeed("a");
    // Closed again: the next trip starts from the base cooldown.
    for (let i = 0; i < 3; i++) breakers.fail("a");
    expect(breakers.waitMs("a")).toBe(10_000);
  });

  test("an abandoned probe frees the slot for another; late failures of old requests change nothing", () => {
    const { breakers, clock } = setup();
    for (let i = 0; i < 3; i++) breakers.fail("a");
    breakers.fail("a"); // in flight before the breaker opened
    expect(breakers.waitMs("a")).toBe(10_000);
    clock.t += 10_000;
    expect(breakers.allow("a")).toBe(true);
    breakers.abandon("a");
    expect(breakers.state("a")).toBe("half-open");
    expect(breakers.allow("a")).toBe(true);
    breakers.succeed("a");
    expect(breakers.state("a")).toBe("closed");
  });

  test("Retry-After holds a target back without tripping the breaker", () => {
    const { breakers, clock } = setup();
    breakers.holdFor("a", 3_000);
    expect(breakers.allow("a")).toBe(false);
    expect(breakers.state("a")).toBe("closed");
    expect(breakers.waitMs("a")).toBe(3_000);
    clock.t += 3_000;
    expect(breakers.allow("a")).toBe(true);
  });

  test("a hold an upstream asks for lasts no longer than the longest cooldown", () => {
    const { breakers } = setup();
    breakers.holdFor("a", 86_400_000);
    expect(breakers.waitMs("a")).toBe(25_000);
    breakers.throttle("b", 86_400_000, {});
    breakers.throttle("b", 86_400_000, {});
    expect(breakers.waitMs("b")).toBe(25_000);
  });
  test("429s in a row hold a target, longer after each probe's, capped; 429s sent before a hold and others' ends change nothing", () => {
    const { breakers, clock, changes } = setup();
    const [early, probe, other] = [{}, {}, {}];
    breakers.throttle("a", 500, early);
    expect([breakers.allow("a", other), breakers.held("a")]).toEqual([true, false]);
    breakers.throttle("a", 500, other);
    expect([breakers.allow("a"), breakers.held("a"), breakers.waitMs("a")]).toEqual([false, true, 1_000]);
    breakers.throttle("a", 4_000, early); // sent before the hold began
    expect(breakers.waitMs("a")).toBe(1_000);
    for (const holdMs of [2_000, 4_000, 8_000, 10_000, 10_000]) {
      clock.t += breakers.waitMs("a");
      expect(breakers.allow("a", probe)).toBe(true);
      expect([breakers.allow("a", other), breakers.held("a")]).toEqual([false, true]);
      breakers.abandon("a", other);
      expect(breakers.allow("a", other)).toBe(false);
      breakers.throttle("a", undefined, probe);
      expect(breakers.waitMs("a")).toBe(holdMs);
    }
    clock.t += breakers.waitMs("a");
    expect(breakers.allow("a", probe)).toBe(true);
    breakers.succeed("a");
    expect([breakers.allow("a"), breakers.allow("a"), breakers.held("a")]).toEqual([true, true, false]);
    // No state change for the breaker's gauge: a rate limit is no failure.
    expect(changes).toEqual([]);
  });
});
