import { describe, expect, test } from "bun:test";
import { sha256Hex } from "../lib/auth.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { GatewayError } from "./errors.ts";
import { createBillingFake } from "./testing.ts";

function setup(now = { t: 1_000_000 }) {
  const billing = createBillingFake({
    "sk-good": { id: "key_1", orgId: "org_1", projectId: "proj_1" },
    "sk-limited": { id: "key_2", orgId: "org_1", allowedModels: ["mock"] },
    "sk-expiring": { id: "key_3", orgId: "org_1", expireMs: now.t + 10_000 },
  });
  const keys = createKeyAuthorizer({ billing: billing.client, hitTtlMs: 30_000, missTtlMs: 2_000, now: () => now.t });
  return { billing, keys, now };
}

const failure = (p: Promise<unknown>) =>
  p.then(
    () => {
      throw new Error("expected a rejection");
    },
    (e: unknown) => e as GatewayError,
  );

describe("key authorizer", () => {
  test("resolves a key to its principal and serves hits without calling billing", async () => {
    const { billing, keys } = setup();
    const principal = await keys.authorize("sk-good");
    expect(principal).toMatchObject({ apiKeyId: "key_1", orgId: "org_1", projectId: "proj_1", allowedModels: undefined });
    expect(billing.calls()).toBe(1);
    for (let i = 0; i < 100; i++) await keys.authorize("sk-good");
    expect(billing.calls()).toBe(1);
  });

  test("concurrent misses for one key share a single billing call", async () => {
    const { billing, keys } = setup();
    const all = await Promise.all(Array.from({ length: 50 }, () => keys.authorize("sk-good")));
    expect(new Set(all.map((p) => p.apiKeyId))).toEqual(new Set(["key_1"]));
    expect(billing.calls()).toBe(1);
  });

  test("missing, unknown and revoked keys are 401; misses are cached briefly", async () => {
    const { billing, keys, now } = setup();
    const missing = await failure(keys.authorize(undefined));
    expect(missing).toBeInstanceOf(GatewayError);
    expect([missing.status, missing.code]).toEqual([401, "missing_api_key"]);
    expect(billing.calls()).toBe(0);

    const unknown = await failure(keys.authorize("sk-nope"));
    expect([unknown.status, unknown.code]).toEqual([401, "invalid_api_key"]);
    await failure(keys.authorize("sk-nope"));
    expect(billing.calls()).toBe(1);
    now.t += 2_001;
    await failure(keys.authorize("sk-nope"));
    expect(billing.calls()).toBe(2);

    await keys.authorize("sk-good");
    billing.revoke("sk-good");
    // Still trusted from the cache until its TTL or an explicit forget...
    await keys.authorize("sk-good");
    keys.forget(sha256Hex("sk-good"));
    const revoked = await failure(keys.authorize("sk-good"));
    expect(revoked.status).toBe(401);
  });

  test("a revoked key is refused once its cache entry expires", async () => {
    const { billing, keys, now } = setup();
    await keys.authorize("sk-good");
    billing.revoke("sk-good");
    now.t += 30_001;
    expect((await failure(keys.authorize("sk-good"))).status).toBe(401);
  });

  test("carries allowed models and refuses keys past their expire time, even from the cache", async () => {
    const { keys, now } = setup();
    expect((await keys.authorize("sk-limited")).allowedModels).toEqual(new Set(["mock"]));
    await keys.authorize("sk-expiring");
    now.t += 10_000;
    const expired = await failure(keys.authorize("sk-expiring"));
    expect([expired.status, expired.code]).toEqual([401, "expired_api_key"]);
  });

  test("billing down is a 503 that is not cached", async () => {
    const { billing, keys } = setup();
    billing.setDown(true);
    const down = await failure(keys.authorize("sk-good"));
    expect([down.status, down.code]).toEqual([503, "auth_unavailable"]);
    billing.setDown(false);
    expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
  });

  test("busy keys are refreshed in the background before they expire", async () => {
    const { billing, keys, now } = setup();
    await keys.authorize("sk-good");
    now.t += 25_000; // past 80% of the TTL
    await keys.authorize("sk-good"); // answered from the cache, refresh started
    await Bun.sleep(5);
    expect(billing.calls()).toBe(2);
    now.t += 10_000; // past the first entry's TTL, inside the refreshed one
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(2);
    // A failed background refresh keeps the entry until it expires.
    billing.setDown(true);
    now.t += 15_000; // past the refreshed entry's refresh point, before its expiry
    expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
  });
});
