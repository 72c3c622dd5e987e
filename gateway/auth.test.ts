import { describe, expect, setSystemTime, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { Registry } from "prom-client";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { isKeySecretShaped, sha256Hex } from "../lib/auth.ts";
import { connectionEndingKey, connectionKey } from "../lib/health.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { startServer } from "../lib/server.ts";
import { createKeyAuthorizer, type KeyAuthorizerOptions, watchKeyChanges } from "./auth.ts";
import { GatewayError } from "./errors.ts";
import { createBillingFake, createTestLogger } from "./testing.ts";

function setup(now = { t: 1_000_000 }) {
  const billing = createBillingFake({
    "sk-good": { id: "key_1", orgId: "org_1", projectId: "proj_1" },
    "sk-limited": { id: "key_2", orgId: "org_1", allowedModels: ["mock"] },
    "sk-expiring": { id: "key_3", orgId: "org_1", expireMs: now.t + 10_000 },
  });
  const keys = createKeyAuthorizer({
    billing: billing.client,
    hitTtlMs: 30_000,
    missTtlMs: 2_000,
    watching: true,
    now: () => now.t,
    clock: () => now.t,
  });
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

  test("counts cache hits and misses for Prometheus", async () => {
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const registry = new Registry();
    const keys = createKeyAuthorizer({ billing: billing.client, watching: true, registry });
    for (let i = 0; i < 5; i++) await keys.authorize("sk-good");
    const values = (await registry.getSingleMetric("gateway_key_cache_lookups_total")?.get())?.values ?? [];
    const count = (result: string) => values.find((v) => v.labels.result === result)?.value;
    expect([count("hit"), count("miss")]).toEqual([4, 1]);
  });

  test("with a key shape, a token of another shape is refused as an unknown key without asking billing", async () => {
    const shaped = `sk-mesh-${"a".repeat(43)}`;
    const billing = createBillingFake({ [shaped]: { id: "key_1", orgId: "org_1" } });
    const registry = new Registry();
    let shapeTests = 0;
    const keyShaped = (secret: string) => {
      shapeTests++;
      return isKeySecretShaped(secret);
    };
    const keys = createKeyAuthorizer({ billing: billing.client, watching: true, registry, keyShaped });
    for (const token of ["sk-good", `${shaped}b`, shaped.slice(0, -1), `${shaped.slice(0, -1)}-`, "Bearer x"]) {
      const refused = await failure(keys.authorize(token));
      expect([refused.status, refused.code, refused.message]).toEqual([401, "invalid_api_key", "Incorrect API key provided."]);
      expect(() => keys.cached(token)).toThrow("Incorrect API key provided.");
    }
    expect(billing.calls()).toBe(0);
    expect(keys.size()).toBe(0);
    // A well-shaped token is asked about, known or not; the refusal reads the same.
    expect((await keys.authorize(shaped)).apiKeyId).toBe("key_1");
    const unknown = await failure(keys.authorize(`sk-mesh-${"b".repeat(43)}`));
    expect([unknown.status, unknown.code, unknown.message]).toEqual([401, "invalid_api_key", "Incorrect API key provided."]);
    expect(billing.calls()).toBe(2);
    // A key the cache answers for is not tested again: the shape costs the hot path nothing.
    const tested = shapeTests;
    for (let i = 0; i < 10; i++) {
      expect((await keys.authorize(shaped)).apiKeyId).toBe("key_1");
      expect(keys.cached(shaped)?.apiKeyId).toBe("key_1");
    }
    expect(shapeTests).toBe(tested);
    const values = (await registry.getSingleMetric("gateway_key_cache_lookups_total")?.get())?.values ?? [];
    const count = (result: string) => values.find((v) => v.labels.result === result)?.value;
    expect([count("malformed"), count("miss"), count("hit")]).toEqual([10, 2, 20]);
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

  test("a flood of made-up keys does not push working keys out of the cache", async () => {
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const keys = createKeyAuthorizer({ billing: billing.client, maxEntries: 2, maxRejectedEntries: 10, watching: true });
    await keys.authorize("sk-good");
    for (let i = 0; i < 50; i++) await failure(keys.authorize(`sk-mesh-made-up-${i}`));
    const calls = billing.calls();
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(calls);
    // The rejections are remembered too, within their own bound: the last ones are still answered without billing.
    await failure(keys.authorize("sk-mesh-made-up-49"));
    expect(billing.calls()).toBe(calls);
    await failure(keys.authorize("sk-mesh-made-up-0"));
    expect(billing.calls()).toBe(calls + 1);
  });

  test("a revoked key is refused once its cache entry expires, and its leases are told to go back", async () => {
    const now = { t: 1_000_000 };
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const refused: string[] = [];
    const keys = createKeyAuthorizer({
      billing: billing.client,
      hitTtlMs: 30_000,
      watching: true,
      now: () => now.t,
      onRefused: (apiKeyId) => void refused.push(apiKeyId),
    });
    await keys.authorize("sk-good");
    billing.revoke("sk-good");
    now.t += 30_001;
    expect((await failure(keys.authorize("sk-good"))).status).toBe(401);
    // The revocation was not heard on the stream; billing's refusal says it instead.
    expect(refused).toEqual(["key_1"]);
    await failure(keys.authorize("sk-unknown"));
    expect(refused).toEqual(["key_1"]);
  });

  test("carries allowed models and refuses keys past their expire time, even from the cache", async () => {
    const { keys, now } = setup();
    expect((await keys.authorize("sk-limited")).allowedModels).toEqual(new Set(["mock"]));
    await keys.authorize("sk-expiring");
    now.t += 10_000;
    const expired = await failure(keys.authorize("sk-expiring"));
    expect([expired.status, expired.code]).toEqual([401, "expired_api_key"]);
  });

  test("billing down is a 503 that is not cached, logged once per outage", async () => {
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const log = createTestLogger();
    const keys = createKeyAuthorizer({ billing: billing.client, watching: true, log });
    billing.setDown(true);
    for (let i = 0; i < 50; i++) {
      const down = await failure(keys.authorize("sk-good"));
      expect([down.status, down.code]).toEqual([503, "auth_unavailable"]);
    }
    billing.setDown(false);
    expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
    const said = log.lines.map((line) => JSON.parse(line) as { level: string; msg: string });
    expect(said.filter((l) => l.level !== "debug").map((l) => [l.level, l.msg])).toEqual([
      ["warn", "billing AuthorizeKey failed"],
      ["info", "billing AuthorizeKey answers again"],
    ]);
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

  test("keys used once are forgotten once of no more use, not kept until 100,000 push them out", async () => {
    const now = { t: 1_000_000 };
    const secrets = Array.from({ length: 600 }, (_, i) => `sk-${i}`);
    const billing = createBillingFake(Object.fromEntries(secrets.map((s, i) => [s, { id: `key_${i}`, orgId: "org_1" }])));
    const keys = createKeyAuthorizer({ billing: billing.client, hitTtlMs: 30_000, staleMs: 60_000, watching: true, now: () => now.t });
    // A new key a second, and a made-up one: the last minute's keys (the stale window) and 2 s of refusals are held.
    for (const secret of secrets) {
      await keys.authorize(secret);
      await failure(keys.authorize(`made-up-${secret}`));
      now.t += 1_000;
    }
    expect(keys.size()).toBeLessThanOrEqual(65);
    // Those still within the stale window serve while billing is down.
    billing.setDown(true);
    expect((await keys.authorize("sk-599")).apiKeyId).toBe("key_599");
    expect((await keys.authorize("sk-550")).apiKeyId).toBe("key_550");
  });
});

describe("keys while billing cannot be asked", () => {
  function stale(extra: Partial<KeyAuthorizerOptions> = {}) {
    const now = { t: 1_000_000 };
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" }, "sk-other": { id: "key_2", orgId: "org_1" } });
    const log = createTestLogger();
    const registry = new Registry();
    const keys = createKeyAuthorizer({
      billing: billing.client,
      fallbackTtlMs: 1_000,
      staleMs: 60_000,
      now: () => now.t,
      log,
      registry,
      ...extra,
    });
    const staleAdmissions = async () =>
      (await registry.getSingleMetric("gateway_key_stale_admissions_total")?.get())?.values[0]?.value ?? 0;
    return { billing, keys, now, log, staleAdmissions };
  }

  test("a key billing vouched for works on for the stale window, asking billing again at most every fallback TTL", async () => {
    const { billing, keys, now, log, staleAdmissions } = stale();
    await keys.authorize("sk-good");
    billing.setDown(true);
    now.t += 1_500;
    expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
    expect(billing.calls()).toBe(2);
    // Billing was just found down: asked again only once the fallback TTL has passed, in the background.
    for (let i = 0; i < 20; i++) expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
    expect(billing.calls()).toBe(2);
    now.t += 1_000;
    expect((await keys.authorize("sk-good")).apiKeyId).toBe("key_1");
    await Bun.sleep(5);
    expect(billing.calls()).toBe(3);
    expect(await staleAdmissions()).toBe(22);
    // A key billing never vouched for is not admitted.
    const unknown = await failure(keys.authorize("sk-other"));
    expect([unknown.status, unknown.code]).toEqual([503, "auth_unavailable"]);
    // Counted from billing's last answer for the key, not from the start of the outage.
    now.t = 1_000_000 + 60_000;
    const past = await failure(keys.authorize("sk-good"));
    expect([past.status, past.code]).toEqual([503, "auth_unavailable"]);
    expect(log.lines.filter((l) => l.includes("keys it vouched for lately keep working")).length).toBe(1);
  });

  test("billing's refusals still apply at once, and once it answers again every key is checked before it is admitted", async () => {
    const { billing, keys, now, log } = stale();
    await keys.authorize("sk-good");
    await keys.authorize("sk-other");
    billing.setDown(true);
    now.t += 1_500;
    await keys.authorize("sk-good");
    await keys.authorize("sk-other");
    // Revoked while the gateway could not hear it: admitted until billing answers.
    billing.revoke("sk-other");
    billing.revoke("sk-good");
    expect((await keys.authorize("sk-other")).apiKeyId).toBe("key_2");
    billing.setDown(false);
    now.t += 1_000;
    // This key's check in the background hears billing refuse it...
    await keys.authorize("sk-good");
    await Bun.sleep(5);
    const revoked = await failure(keys.authorize("sk-good"));
    expect([revoked.status, revoked.code]).toEqual([401, "invalid_api_key"]);
    // ...and the other key is checked before it is admitted again, not at its own next background check.
    const other = await failure(keys.authorize("sk-other"));
    expect([other.status, other.code]).toEqual([401, "invalid_api_key"]);
    const said = log.lines.map((l) => JSON.parse(l) as { level: string; msg: string }).filter((l) => l.level !== "debug");
    expect(said.filter((l) => l.msg.startsWith("billing ")).map((l) => [l.level, l.msg])).toEqual([
      ["warn", "billing AuthorizeKey failed"],
      ["warn", "billing cannot check API keys; keys it vouched for lately keep working"],
      ["info", "billing AuthorizeKey answers again"],
      ["info", "billing answers again; API keys are checked before they are admitted"],
    ]);
    expect(said.at(-1)).toMatchObject({ stale_admissions: 4 });
  });

  test("the change stream coming back ends the outage too", async () => {
    const { billing, keys, now } = stale();
    await keys.authorize("sk-good");
    billing.setDown(true);
    now.t += 1_500;
    await keys.authorize("sk-good");
    billing.revoke("sk-good");
    billing.setDown(false);
    keys.setWatching(true);
    const revoked = await failure(keys.authorize("sk-good"));
    expect([revoked.status, revoked.code]).toEqual([401, "invalid_api_key"]);
  });

  test("only an unreachable or unavailable billing is an outage; other failures, and a window of 0, are a 503", async () => {
    for (const code of [Code.Internal, Code.PermissionDenied, Code.Unavailable]) {
      let fail = false;
      const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
      const now = { t: 1_000_000 };
      const keys = createKeyAuthorizer({
        billing: {
          authorizeKey: async (req) => {
            if (fail) throw new ConnectError("failed", code);
            return billing.client.authorizeKey(req);
          },
        },
        staleMs: code === Code.Unavailable ? 0 : 60_000,
        now: () => now.t,
      });
      await keys.authorize("sk-good");
      fail = true;
      now.t += 1_500;
      const down = await failure(keys.authorize("sk-good"));
      expect([down.status, down.code]).toEqual([503, "auth_unavailable"]);
    }
  });

  test("a key whose own expiry passed during the outage is refused", async () => {
    const now = { t: 1_000_000 };
    const billing = createBillingFake({ "sk-expiring": { id: "key_3", orgId: "org_1", expireMs: now.t + 5_000 } });
    const keys = createKeyAuthorizer({ billing: billing.client, staleMs: 60_000, now: () => now.t, clock: () => now.t });
    await keys.authorize("sk-expiring");
    billing.setDown(true);
    now.t += 1_500;
    expect((await keys.authorize("sk-expiring")).apiKeyId).toBe("key_3");
    now.t += 5_000;
    const expired = await failure(keys.authorize("sk-expiring"));
    expect([expired.status, expired.code]).toEqual([401, "expired_api_key"]);
  });
});

describe("key cache without and with the change stream", () => {
  test("without the stream entries live only the fallback TTL; keys loaded while it is healthy get the full TTL", async () => {
    const now = { t: 1_000_000 };
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const keys = createKeyAuthorizer({ billing: billing.client, hitTtlMs: 30_000, fallbackTtlMs: 1_000, now: () => now.t });
    await keys.authorize("sk-good");
    now.t += 1_000;
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(2);

    keys.setWatching(true);
    // Loaded before the stream was confirmed: still the short TTL.
    now.t += 1_000;
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(3);
    now.t += 20_000;
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(3);

    // The stream is lost: every entry falls back to the short TTL at once.
    keys.setWatching(false);
    await keys.authorize("sk-good");
    expect(billing.calls()).toBe(4);
  });

  test("a wall clock stepped back keeps no entry longer: TTLs are timed on a clock that is not stepped", async () => {
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    // The stream is down: a key revoked meanwhile is heard of only by asking billing once its entry's 50 ms are over.
    const keys = createKeyAuthorizer({ billing: billing.client, hitTtlMs: 30_000, fallbackTtlMs: 50 });
    await keys.authorize("sk-good");
    billing.revoke("sk-good");
    // NTP steps the host's clock back an hour (it ran fast); the entry's 50 ms pass all the same.
    setSystemTime(new Date(Date.now() - 3_600_000));
    try {
      await Bun.sleep(60);
      expect((await failure(keys.authorize("sk-good"))).status).toBe(401);
      expect(billing.calls()).toBe(2);
    } finally {
      setSystemTime();
    }
  });

  /** Billing whose answers, once `hold` is called, stay on their way until the function it returns is called. */
  function delayedAnswers(billing: ReturnType<typeof createBillingFake>) {
    let gate: Promise<void> | undefined;
    const client: KeyAuthorizerOptions["billing"] = {
      authorizeKey: async (req) => {
        const res = await billing.client.authorizeKey(req);
        await gate;
        return res;
      },
    };
    const hold = () => {
      let open = () => {};
      gate = new Promise<void>((resolve) => (open = resolve));
      return () => {
        gate = undefined;
        open();
      };
    };
    return { client, hold };
  }

  test("a change announced while a load is in flight keeps that load's answer out of the cache", async () => {
    const billing = createBillingFake({ "sk-good": { id: "key_1", orgId: "org_1" } });
    const slow = delayedAnswers(billing);
    const keys = createKeyAuthorizer({ billing: slow.client, watching: true });
    // Billing has answered, but the answer is still on its way when the change is announced.
    const open = slow.hold();
    const loading = keys.authorize("sk-good");
    await Bun.sleep(5);
    billing.revoke("sk-good");
    keys.forget(sha256Hex("sk-good"));
    open();
    // Requests that arrived before the change still get the answer they were waiting for...
    expect((await loading).apiKeyId).toBe("key_1");
    // ...but the next one asks billing again.
    expect((await failure(keys.authorize("sk-good"))).status).toBe(401);
  });

  test("an org's settings change drops every cached key of that org, no other, and every load in flight", async () => {
    const billing = createBillingFake({
      "sk-a": { id: "key_a", orgId: "org_1" },
      "sk-b": { id: "key_b", orgId: "org_1" },
      "sk-other": { id: "key_c", orgId: "org_2" },
    });
    const slow = delayedAnswers(billing);
    const keys = createKeyAuthorizer({ billing: slow.client, watching: true });
    for (const secret of ["sk-a", "sk-other"]) await keys.authorize(secret);
    const open = slow.hold();
    const loading = keys.authorize("sk-b");
    await Bun.sleep(5);
    keys.forgetOrg("org_1");
    open();
    expect((await loading).apiKeyId).toBe("key_b");
    expect(billing.calls()).toBe(3);
    for (const secret of ["sk-a", "sk-b", "sk-other"]) await keys.authorize(secret);
    // key_a and key_b are asked for again; key_c of the other org is still cached.
    expect(billing.calls()).toBe(5);
  });
});

describe("watching key changes", () => {
  type Change = { secretHash: string; apiKeyId: string; revoked: boolean; orgId?: string };
  /** A billing whose WatchKeyChanges stream the test drives: push changes, break the stream. */
  function streamFake() {
    let opened = 0;
    let push: (change: Change | Error) => void = () => {};
    const transport = createRouterTransport((router) =>
      router.service(BillingService, {
        async *watchKeyChanges(_req, ctx) {
          opened++;
          const queue: (Change | Error)[] = [];
          let wake = () => {};
          push = (item) => {
            queue.push(item);
            wake();
          };
          while (!ctx.signal.aborted) {
            const item = queue.shift();
            if (item instanceof Error) throw new ConnectError(item.message, Code.Unavailable);
            if (item) yield item;
            else await new Promise<void>((resolve) => (wake = resolve));
          }
        },
      }),
    );
    return { client: createClient(BillingService, transport), opened: () => opened, push: (item: Parameters<typeof push>[0]) => push(item) };
  }

  function recorder() {
    const forgotten: string[] = [];
    const watching: boolean[] = [];
    const keys = {
      authorize: () => Promise.reject(new Error("unused")),
      forget: (hash: string) => void forgotten.push(hash),
      forgetOrg: (orgId: string) => void forgotten.push(`org ${orgId}`),
      setWatching: (healthy: boolean) => void watching.push(healthy),
    };
    return { keys, forgotten, watching };
  }

  test("drops changed keys, confirms the stream, and reconnects after it fails", async () => {
    const billing = streamFake();
    const { keys, forgotten, watching } = recorder();
    const revoked: string[] = [];
    const registry = new Registry();
    const up = async () => (await registry.getSingleMetric("gateway_key_changes_stream_up")?.get())?.values[0]?.value;
    const watch = watchKeyChanges({
      billing: billing.client,
      keys,
      onRevoked: (apiKeyId) => void revoked.push(apiKeyId),
      backoffMs: 10,
      random: () => 1,
      registry,
    });
    await until(() => billing.opened() === 1);
    // Trusted from billing's first message (it listens by then), not before.
    await Bun.sleep(50);
    expect(watch.healthy()).toBe(false);
    expect(await up()).toBe(0);
    billing.push({ secretHash: "", apiKeyId: "", revoked: false });
    await until(() => watch.healthy());
    expect(watching).toEqual([true]);
    expect(await up()).toBe(1);

    billing.push({ secretHash: "abc", apiKeyId: "key_1", revoked: true });
    await until(() => forgotten.length > 0);
    expect(forgotten).toEqual(["abc"]);
    // Revocations (rotations too) are passed on, so the key's budget leases go back to billing.
    expect(revoked).toEqual(["key_1"]);
    billing.push({ secretHash: "def", apiKeyId: "key_2", revoked: false });
    await until(() => forgotten.length > 1);
    expect(revoked).toEqual(["key_1"]);
    // An org's settings changed: one message for all its keys.
    billing.push({ secretHash: "", apiKeyId: "", revoked: false, orgId: "org_1" });
    await until(() => forgotten.length > 2);
    expect(forgotten).toEqual(["abc", "def", "org org_1"]);

    billing.push(new Error("billing restarting"));
    await until(() => !watch.healthy());
    expect(watching).toEqual([true, false]);
    expect(await up()).toBe(0);
    await until(() => billing.opened() === 2);
    billing.push({ secretHash: "", apiKeyId: "", revoked: false });
    await until(() => watch.healthy());

    await watch.stop();
    expect(watch.healthy()).toBe(false);
  });

  test("over a server whose connections age out, the stream is opened again at once on each new one, missing nothing", async () => {
    const connections: object[] = [];
    let change: ((secretHash: string) => void) | undefined;
    const server = await startServer({
      name: "billing",
      port: 0,
      host: "127.0.0.1",
      log: createTestLogger(),
      // Each connection outlives the silence a stream is trusted through, so an ended stream is opened again at once;
      // that silence is long enough for a busy machine's stalls.
      connectionMaxAgeMs: 1_000,
      routes: (router) =>
        router.service(BillingService, {
          async *watchKeyChanges(_req, ctx) {
            connections.push(ctx.values.get(connectionKey) ?? {});
            const ending = ctx.values.get(connectionEndingKey);
            const changes: string[] = [];
            change = (secretHash) => void changes.push(secretHash);
            // Heartbeats, and any change, until the connection goes past its age.
            while (!ending.aborted && !ctx.signal.aborted) {
              const pending = changes.splice(0);
              for (const secretHash of pending.length > 0 ? pending : [""]) yield { secretHash };
              await Bun.sleep(20);
            }
          },
        }),
    });
    const log = createTestLogger();
    const { keys, forgotten } = recorder();
    // A backoff no test waits out: each stream billing ends is opened again without one.
    const watch = watchKeyChanges({
      billing: createServiceClient(BillingService, { baseUrl: server.url }),
      keys,
      silenceMs: 500,
      backoffMs: 60_000,
      log,
    });
    try {
      await until(() => connections.length >= 3 && watch.healthy(), 20_000);
      expect(new Set(connections).size).toBe(connections.length);
      change?.("abc");
      await until(() => forgotten.includes("abc"), 20_000);
      expect(log.lines.filter((line) => /"level":"(warn|error)"/.test(line))).toEqual([]);
    } finally {
      await watch.stop();
      await server.close(0);
    }
  });

  test("a stream silent past silenceMs (a hung billing replica) is no longer trusted, and is reopened", async () => {
    const billing = streamFake();
    const { keys, watching } = recorder();
    const watch = watchKeyChanges({ billing: billing.client, keys, silenceMs: 400, backoffMs: 10, random: () => 1 });
    await until(() => billing.opened() === 1);
    billing.push({ secretHash: "", apiKeyId: "", revoked: false });
    await until(() => watch.healthy());
    // Heartbeats keep it trusted...
    for (let i = 0; i < 4; i++) {
      await Bun.sleep(50);
      billing.push({ secretHash: "", apiKeyId: "", revoked: false });
    }
    expect(watch.healthy()).toBe(true);
    // ...silence does not.
    await until(() => !watch.healthy());
    expect(watching).toEqual([true, false]);
    await until(() => billing.opened() === 2);
    await watch.stop();
  });

  test("billing down through many retries is logged as the stream fails and as it delivers again, not at every retry", async () => {
    let opened = 0;
    const flaky = {
      watchKeyChanges: (_req: unknown, { signal }: { signal: AbortSignal }) => {
        const attempt = ++opened;
        return (async function* () {
          if (attempt <= 6) throw new ConnectError("connect ECONNREFUSED 10.0.0.3:8081", Code.Unavailable);
          yield { secretHash: "", apiKeyId: "", revoked: false };
          await new Promise((resolve) => signal.addEventListener("abort", resolve));
        })();
      },
    };
    const log = createTestLogger();
    const watch = watchKeyChanges({ billing: flaky as never, keys: recorder().keys, backoffMs: 1, maxBackoffMs: 2, log });
    await until(() => watch.healthy());
    await watch.stop();
    const logged = log.lines.map((line) => JSON.parse(line)).filter((l) => l.level !== "debug");
    expect(logged.map((l) => `${l.level} ${l.msg}`)).toEqual([
      "warn key change stream failed; key cache uses its short TTL until it is back",
      "info key change stream delivers again",
    ]);
    expect(logged[0].err).toBe("connect ECONNREFUSED 10.0.0.3:8081");
    expect(logged[1].failures).toBe(6);
  });

  test("a message confirms the stream at once; a failing stream is retried with growing delays", async () => {
    const billing = streamFake();
    const { keys, watching } = recorder();
    const watch = watchKeyChanges({ billing: billing.client, keys });
    await until(() => billing.opened() === 1);
    expect(watch.healthy()).toBe(false);
    billing.push({ secretHash: "", apiKeyId: "", revoked: false });
    await until(() => watch.healthy());
    expect(watching).toEqual([true]);
    await watch.stop();

    const opened: number[] = [];
    const down = {
      watchKeyChanges: () => {
        opened.push(performance.now());
        return (async function* () {
          throw new ConnectError("connection refused", Code.Unavailable);
        })();
      },
    };
    const retrying = watchKeyChanges({ billing: down as never, keys: recorder().keys, backoffMs: 10, maxBackoffMs: 40, random: () => 1 });
    await until(() => opened.length >= 5);
    await retrying.stop();
    const gaps = opened.slice(1).map((t, i) => t - (opened[i] as number));
    // Timers never fire early, so load on the machine can only stretch these.
    [10, 20, 40, 40].forEach((min, i) => expect(gaps[i] as number).toBeGreaterThanOrEqual(min - 1));
  });
});

async function until(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error("condition not met in time");
    await Bun.sleep(2);
  }
}
