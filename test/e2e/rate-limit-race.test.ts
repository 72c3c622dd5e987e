/**
 * A key's per-minute limits over two gateway replicas, with real processes: billing (on Postgres), analytics and two
 * gateways syncing their counts through billing every 250 ms (the default). Half a key's minute is used on one
 * replica; once the other has synced, it admits only what is left. The test is sequenced (each replica has served
 * the key before the other's requests, and a sync has come between), so the slack is zero. Each replica counting
 * alone (GATEWAY_RATE_SYNC_MS=0, as every replica did before) the second admits 19 of its 20, 29 requests in all, and
 * 8 more requests' tokens where 4 or 5 fit.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { raceChat, raceInputTokens, raceMaxTokens, type Replicas, startReplicas } from "./replicas.ts";

const N = 20;
// Longer than several syncs of both replicas, however busy the machine.
const syncedMs = 1_500;

let replicas: Replicas;
let orgId: string;

beforeAll(async () => {
  replicas = await startReplicas({ name: "rate", pricing: { input: "1", output: "1" } });
  orgId = (await replicas.billing.createOrganization({ name: "rate race" })).organization?.id as string;
}, 120_000);

afterAll(async () => {
  await replicas?.stop();
}, 60_000);

/** `count` requests to `gateway` with `key`, one after another. */
async function oneByOne(gateway: string, key: string, count: number): Promise<Response[]> {
  const responses: Response[] = [];
  for (let i = 0; i < count; i++) responses.push(await raceChat(gateway, key));
  return responses;
}

const statuses = (responses: Response[]) => responses.map((r) => r.status);

describe("a key's per-minute limits over two gateway replicas", () => {
  test(`requests_per_minute ${N}: half used on one replica, the other admits only the other half`, async () => {
    const [a, b] = replicas.gateways as [string, string];
    const { secret } = await replicas.billing.createApiKey({ orgId, name: "rpm", limits: { requestsPerMinute: N } });
    // Each replica serves the key once, so each asks billing for the other's counts of it from then on.
    expect(statuses(await oneByOne(b, secret, 1))).toEqual([200]);
    expect(statuses(await oneByOne(a, secret, N / 2 - 1))).toEqual(Array(N / 2 - 1).fill(200));
    await Bun.sleep(syncedMs);

    const burst = await Promise.all(Array.from({ length: N }, () => raceChat(b, secret)));
    const admitted = burst.filter((r) => r.status === 200);
    const refused = burst.filter((r) => r.status !== 200);
    process.stdout.write(`rate race: requests_per_minute=${N} second replica admitted ${admitted.length} of ${N} after ${N / 2} elsewhere\n`);
    expect(admitted).toHaveLength(N / 2);
    expect(refused).toHaveLength(N / 2);
    for (const res of refused) {
      expect(res.status).toBe(429);
      expect(res.headers.get("x-ratelimit-remaining-requests")).toBe("0");
      expect(await res.json()).toMatchObject({ error: { code: "rate_limit_exceeded", type: "requests" } });
    }
    // The first replica learns the second's requests too: the minute is full there as well.
    await Bun.sleep(syncedMs);
    const late = await raceChat(a, secret);
    expect(late.status).toBe(429);
    expect(await late.json()).toMatchObject({ error: { type: "requests" } });
  }, 60_000);

  test("tokens_per_minute: what one replica used counts on the other", async () => {
    // The mock's usage of a race request, counted from its end: 27 input and 20 output tokens.
    const used = Number(raceInputTokens) + raceMaxTokens;
    const limit = 10 * used;
    const [a, b] = replicas.gateways as [string, string];
    const { secret } = await replicas.billing.createApiKey({
      orgId,
      name: "tpm",
      limits: { tokensPerMinute: BigInt(limit) },
    });
    expect(statuses(await oneByOne(b, secret, 1))).toEqual([200]);
    expect(statuses(await oneByOne(a, secret, 4))).toEqual([200, 200, 200, 200]);
    await Bun.sleep(syncedMs);

    // One at a time, so each counts at its usage before the next is admitted: the rest of the minute, no more.
    const rest = await oneByOne(b, secret, 10);
    const served = rest.filter((r) => r.status === 200).length;
    process.stdout.write(`rate race: tokens_per_minute=${limit} second replica served ${served} more after ${5 * used} tokens\n`);
    expect((5 + served) * used).toBeLessThanOrEqual(limit);
    expect(served).toBeGreaterThanOrEqual(4);
    const refused = rest.filter((r) => r.status !== 200);
    expect(refused.length).toBeGreaterThan(0);
    for (const res of refused) {
      expect(res.status).toBe(429);
      expect(await res.json()).toMatchObject({ error: { code: "rate_limit_exceeded", type: "tokens" } });
    }
  }, 60_000);

  test("neither replica's sync with billing failed", async () => {
    for (const gateway of replicas.gateways) {
      const text = await (await fetch(`${gateway}/metrics`)).text();
      expect(/^gateway_rate_sync_failures_total(?:\{[^}]*\})? (\d+)$/m.exec(text)?.[1]).toBe("0");
    }
  });
});
