import { describe, expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { AuthorizeKeyResponseSchema } from "../gen/billing/v1/billing_pb.ts";
import type { Principal } from "./auth.ts";
import { GatewayError } from "./errors.ts";
import { createTokenQuota, periodStart } from "./token-quota.ts";

const day = 86_400_000;
// 2025-03-15 12:00 UTC: mid-period for billing day 1.
const midMarch = Date.UTC(2025, 2, 15, 12);

/** A principal as the authorizer builds it: billing's answer read at `authorizedAt`. */
function principal(
  monthlyTokens: bigint,
  keyTokens: bigint,
  authorizedAt: number,
  billingDay = 1,
  key = { id: "key_1", lineageId: "key_1" },
): Principal {
  return {
    apiKeyId: key.id,
    lineageId: key.lineageId,
    orgId: "org_1",
    projectId: "",
    allowedModels: undefined,
    expireMs: undefined,
    grant: create(AuthorizeKeyResponseSchema, {
      apiKey: { id: key.id, orgId: "org_1", limits: { monthlyTokens } },
      organization: { id: "org_1", billingDay },
      keyTokens,
    }),
    authorizedAt,
  };
}

function refused(f: () => unknown): GatewayError {
  try {
    f();
  } catch (e) {
    if (e instanceof GatewayError) return e;
    throw e;
  }
  throw new Error("expected the request to be refused");
}

describe("monthly token quota", () => {
  test("counts settled tokens and refuses once the key is at its limit, as 429 insufficient_quota", () => {
    const clock = { t: midMarch };
    const quota = createTokenQuota({ now: () => clock.t });
    const p = principal(100n, 40n, clock.t);
    quota.admit(p).settle(30n, clock.t);
    const last = quota.admit(p);
    // Admitted while under the limit; its settle takes the key to exactly the limit.
    last.settle(30n, clock.t);
    last.settle(30n, clock.t);
    const e = refused(() => quota.admit(p));
    expect([e.status, e.type, e.code, e.param]).toEqual([429, "insufficient_quota", "insufficient_quota", null]);
    expect(e.message).toContain("100 tokens");
  });

  test("requests running count at their estimates: concurrency does not multiply the overshoot", () => {
    const quota = createTokenQuota({ now: () => midMarch });
    const p = principal(1000n, 0n, midMarch);
    // Each may use up to 240 tokens: the fifth is admitted into the last 40, the rest wait for them to end.
    const running = Array.from({ length: 5 }, () => quota.admit(p, 240));
    const e = refused(() => quota.admit(p, 240));
    expect([e.status, e.code, e.retryAfterS]).toEqual([429, "insufficient_quota", 3]);
    expect(e.message).toContain("1200 held by requests running");
    // They used less than they held: room again for what is left.
    for (const ticket of running) ticket.settle(70n, midMarch);
    const next = quota.admit(p, 240);
    // One refused by another limit gives its hold back.
    quota.admit(p, 240).settle(0n, midMarch);
    next.settle(650n, midMarch);
    // Used up: refused for good, with no Retry-After.
    expect(refused(() => quota.admit(p, 240)).retryAfterS).toBeUndefined();
  });

  test("a limit of 0 is unlimited", () => {
    const quota = createTokenQuota({ now: () => midMarch });
    const p = principal(0n, 1_000_000n, midMarch);
    for (let i = 0; i < 10; i++) quota.admit(p).settle(1_000_000n, midMarch);
  });

  test("a fresh authorization counts billing's figure without counting this replica's tokens twice", () => {
    const clock = { t: midMarch };
    const quota = createTokenQuota({ now: () => clock.t });
    quota.admit(principal(100n, 40n, clock.t)).settle(50n, clock.t);
    // Billing has recorded our 50 tokens since: 90, not 140.
    clock.t += 30_000;
    quota.admit(principal(100n, 90n, clock.t)).settle(5n, clock.t);
    expect(() => quota.admit(principal(100n, 90n, clock.t))).not.toThrow();
    // Billing has not recorded them yet (the metrics pipeline lags): our count stands.
    clock.t += 30_000;
    quota.admit(principal(100n, 40n, clock.t)).settle(4n, clock.t);
    expect(() => quota.admit(principal(100n, 40n, clock.t))).not.toThrow();
    quota.admit(principal(100n, 40n, clock.t)).settle(1n, clock.t);
    expect(refused(() => quota.admit(principal(100n, 40n, clock.t))).code).toBe("insufficient_quota");
  });

  test("other replicas' usage counts from the next authorization on", () => {
    const clock = { t: midMarch };
    const quota = createTokenQuota({ now: () => clock.t });
    quota.admit(principal(100n, 10n, clock.t)).settle(10n, clock.t);
    clock.t += 30_000;
    expect(refused(() => quota.admit(principal(100n, 100n, clock.t))).code).toBe("insufficient_quota");
    // An older authorization still held by a request in flight cannot lower it.
    expect(refused(() => quota.admit(principal(100n, 10n, clock.t - 30_000))).code).toBe("insufficient_quota");
  });

  test("a new billing period starts from zero at once, whatever a cached authorization of the last one says", () => {
    const clock = { t: Date.UTC(2025, 2, 31, 23, 59) };
    const quota = createTokenQuota({ now: () => clock.t });
    const march = principal(100n, 100n, clock.t);
    expect(refused(() => quota.admit(march)).code).toBe("insufficient_quota");
    const request = quota.admit(principal(1000n, 100n, clock.t));
    clock.t = Date.UTC(2025, 3, 1, 0, 1);
    // Counted in March, where it started, as billing records it.
    request.settle(50n, Date.UTC(2025, 2, 31, 23, 59));
    // April counts only its own: neither March's 100 nor the late 50.
    quota.admit(march).settle(99n, clock.t);
    quota.admit(march).settle(1n, clock.t);
    expect(refused(() => quota.admit(march)).code).toBe("insufficient_quota");
  });

  test("billing's figure read just after a period start may be the last period's, and is not used", () => {
    const start = Date.UTC(2025, 3, 1);
    const clock = { t: start + 5 * 60_000 };
    const quota = createTokenQuota({ now: () => clock.t, periodSkewMs: 60_000 });
    // Read 10 ms into April by the gateway's clock: billing's clock may still have been in March.
    expect(() => quota.admit(principal(100n, 500n, start + 10))).not.toThrow();
    expect(refused(() => quota.admit(principal(100n, 500n, start + 60_000))).code).toBe("insufficient_quota");
  });

  test("periods start on the org's billing day at 00:00 UTC", () => {
    expect(periodStart(midMarch, 1)).toBe(Date.UTC(2025, 2, 1));
    expect(periodStart(midMarch, 20)).toBe(Date.UTC(2025, 1, 20));
    expect(periodStart(Date.UTC(2025, 0, 5), 10)).toBe(Date.UTC(2024, 11, 10));
    expect(periodStart(Date.UTC(2025, 2, 20) - 1, 20)).toBe(Date.UTC(2025, 1, 20));
    expect(periodStart(Date.UTC(2025, 2, 20), 20) - periodStart(Date.UTC(2025, 2, 20) - 1, 20)).toBe(28 * day);
  });
});

describe("a rotated key", () => {
  test("carries on its lineage's tokens on this replica, counted before billing has them", () => {
    const quota = createTokenQuota({ now: () => midMarch });
    const old = principal(100n, 0n, midMarch - day, 1, { id: "key_old", lineageId: "key_old" });
    quota.admit(old).settle(90n, midMarch);
    // Rotated: billing has not recorded the 90 yet, so its figure for the new key says 0.
    const rotated = principal(100n, 0n, midMarch, 1, { id: "key_new", lineageId: "key_old" });
    quota.admit(rotated).settle(20n, midMarch);
    expect(refused(() => quota.admit(rotated)).code).toBe("insufficient_quota");
  });
});
