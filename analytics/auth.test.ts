import { expect, setSystemTime, test } from "bun:test";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport, type ServiceImpl } from "@connectrpc/connect";
import { BillingService, KeyRefusalReason, KeyRefusalSchema } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "../lib/log.ts";
import { createAnalyticsAuth } from "./auth.ts";

const adminToken = "test-admin-token-0123456789";
const org = "org_auth";
const as = (token: string) => new Headers({ authorization: `Bearer ${token}` });

/** A billing client whose AuthorizeKey is `authorizeKey`, in process. */
const billingAnswering = (authorizeKey: ServiceImpl<typeof BillingService>["authorizeKey"]) =>
  createClient(BillingService, createRouterTransport((r) => r.service(BillingService, { authorizeKey })));

test("a flood of made-up keys does not push a working key out, and a made-up key is checked with billing once", async () => {
  const asked: string[] = [];
  const billing = billingAnswering(async (req) => {
    asked.push(req.secret);
    if (req.secret !== "sk-mesh-of-org") throw new ConnectError("unknown api key", Code.Unauthenticated);
    return { apiKey: { id: "key_1", orgId: org } };
  });
  const auth = createAnalyticsAuth({ adminToken, billing, maxKeys: 2, maxRejectedKeys: 10 });
  const refusal = (token: string) => auth.requireOrgReader(as(token), org).then(() => undefined, (e) => ConnectError.from(e).code);

  await auth.requireOrgReader(as("sk-mesh-of-org"), org);
  for (let i = 0; i < 50; i++) expect(await refusal(`sk-mesh-made-up-${i}`)).toBe(Code.Unauthenticated);
  expect(asked.length).toBe(51);
  await auth.requireOrgReader(as("sk-mesh-of-org"), org);
  expect(await refusal("sk-mesh-made-up-49")).toBe(Code.Unauthenticated);
  // Neither the working key nor the latest made-up one cost another call.
  expect(asked.length).toBe(51);
});

test("a token that is no API key nor the admin's is refused as billing refuses it, without asking billing", async () => {
  let asked = 0;
  const billing = billingAnswering(async () => {
    asked++;
    throw new ConnectError("unknown api key", Code.Unauthenticated);
  });
  const auth = createAnalyticsAuth({ adminToken, billing });
  const refused = await auth.requireOrgReader(as("an-earlier-admin-token-0123456789"), org).catch(ConnectError.from);
  expect([refused?.code, refused?.rawMessage]).toEqual([Code.PermissionDenied, "invalid admin token"]);
  expect(asked).toBe(0);
  // A key billing does not know is still unknown.
  expect(await auth.requireOrgReader(as("sk-mesh-made-up"), org).catch((e) => ConnectError.from(e).code)).toBe(
    Code.Unauthenticated,
  );
  expect(asked).toBe(1);
});

test("a key is not remembered past its expiry: once it expires it reads nothing more, as billing refuses it", async () => {
  let clock = 1_000_000;
  const expireMs = clock + 5_000;
  let asked = 0;
  const billing = billingAnswering(async () => {
    asked++;
    if (clock >= expireMs) throw new ConnectError("api key expired", Code.Unauthenticated);
    return { apiKey: { id: "key_1", orgId: org, limits: { expireTime: timestampFromMs(expireMs) } } };
  });
  const auth = createAnalyticsAuth({ adminToken, billing, ttlMs: 30_000, now: () => clock, clock: () => clock });
  const refusal = () => auth.requireOrgReader(as("sk-mesh-expiring"), org).then(() => undefined, (e) => ConnectError.from(e).code);

  expect(await refusal()).toBeUndefined();
  clock = expireMs - 1;
  expect(await refusal()).toBeUndefined();
  expect(asked).toBe(1);
  clock = expireMs;
  expect(await refusal()).toBe(Code.Unauthenticated);
  expect(asked).toBe(2);
});

test("a key of a suspended org is refused PermissionDenied once its org is no longer remembered, as a revoked key is", async () => {
  let clock = 1_000_000;
  let suspended = false;
  let asked = 0;
  const billing = billingAnswering(async () => {
    asked++;
    if (!suspended) return { apiKey: { id: "key_1", orgId: org } };
    const detail = { desc: KeyRefusalSchema, value: { reason: KeyRefusalReason.ORGANIZATION_SUSPENDED, orgId: org } };
    throw new ConnectError(`organization ${org} is suspended`, Code.PermissionDenied, undefined, [detail]);
  });
  const auth = createAnalyticsAuth({ adminToken, billing, ttlMs: 30_000, rejectedTtlMs: 5_000, now: () => clock });
  const refusal = () =>
    auth.requireOrgReader(as("sk-mesh-suspended"), org).then(
      () => undefined,
      (e) => ConnectError.from(e),
    );

  expect(await refusal()).toBeUndefined();
  suspended = true;
  clock += 29_999;
  expect(await refusal()).toBeUndefined();
  clock += 1;
  const refused = await refusal();
  expect(refused?.code).toBe(Code.PermissionDenied);
  expect(refused?.rawMessage).toBe("the api key's organization is suspended");
  // Remembered as refused for a while, then asked again: reinstated, it reads again.
  suspended = false;
  expect((await refusal())?.code).toBe(Code.PermissionDenied);
  expect(asked).toBe(2);
  clock += 5_000;
  expect(await refusal()).toBeUndefined();
  expect(asked).toBe(3);
});

test("a key check billing cannot answer is logged with billing's words, once until billing answers again", async () => {
  let answer: "refuse token" | "down" | "ok" = "refuse token";
  const billing = billingAnswering(async () => {
    if (answer === "refuse token") throw new ConnectError("invalid admin token", Code.PermissionDenied);
    if (answer === "down") throw new ConnectError("connect ECONNREFUSED 10.0.0.5:8081", Code.Unavailable);
    return { apiKey: { id: "key_1", orgId: org } };
  });
  const lines: Record<string, unknown>[] = [];
  const log = createLogger({ service: "analytics", write: (line) => lines.push(JSON.parse(line)) });
  const auth = createAnalyticsAuth({ adminToken, billing, log });
  const refusal = (token: string) => auth.requireOrgReader(as(token), org).then(() => undefined, (e) => ConnectError.from(e).code);

  // The caller is told to retry; the operator reads why: billing refuses this service's own token.
  expect(await refusal("sk-mesh-first")).toBe(Code.Unavailable);
  expect(await refusal("sk-mesh-second")).toBe(Code.Unavailable);
  answer = "down";
  expect(await refusal("sk-mesh-third")).toBe(Code.Unavailable);
  expect(lines).toEqual([
    expect.objectContaining({ level: "warn", code: "PermissionDenied", err: "invalid admin token" }),
  ]);
  answer = "ok";
  expect(await refusal("sk-mesh-first")).toBeUndefined();
  expect(lines.at(-1)).toEqual(
    expect.objectContaining({ level: "info", msg: "billing AuthorizeKey answers again", failures: 3 }),
  );
});

test("a key is remembered 30 s from when billing was asked, not from its answer: a slow answer adds nothing", async () => {
  let clock = 1_000_000;
  let revoked = false;
  let asked = 0;
  const billing = billingAnswering(async () => {
    asked++;
    if (revoked) throw new ConnectError("api key revoked", Code.Unauthenticated);
    // Billing read the key, then took 20 s over the rest of its answer (its usage figures behind a lock), and the key
    // was revoked meanwhile.
    clock += 20_000;
    revoked = true;
    return { apiKey: { id: "key_1", orgId: org } };
  });
  const auth = createAnalyticsAuth({ adminToken, billing, ttlMs: 30_000, now: () => clock });
  const refusal = () => auth.requireOrgReader(as("sk-mesh-slow"), org).then(() => undefined, (e) => ConnectError.from(e).code);

  const asking = clock;
  expect(await refusal()).toBeUndefined();
  clock = asking + 29_999;
  expect(await refusal()).toBeUndefined();
  expect(asked).toBe(1);
  clock = asking + 30_000;
  expect(await refusal()).toBe(Code.Unauthenticated);
  expect(asked).toBe(2);
});

test("a wall clock stepped back keeps no key longer: how long one is remembered is timed on a clock that is not stepped", async () => {
  let revoked = false;
  let asked = 0;
  const billing = billingAnswering(async () => {
    asked++;
    if (revoked) throw new ConnectError("api key revoked", Code.Unauthenticated);
    return { apiKey: { id: "key_1", orgId: org } };
  });
  const auth = createAnalyticsAuth({ adminToken, billing, ttlMs: 50 });
  const refusal = () => auth.requireOrgReader(as("sk-mesh-stepped"), org).then(() => undefined, (e) => ConnectError.from(e).code);

  expect(await refusal()).toBeUndefined();
  revoked = true;
  // NTP steps the host's clock back an hour (it ran fast); the key's 50 ms pass all the same.
  setSystemTime(new Date(Date.now() - 3_600_000));
  try {
    await Bun.sleep(60);
    expect(await refusal()).toBe(Code.Unauthenticated);
    expect(asked).toBe(2);
  } finally {
    setSystemTime();
  }
});
