import { expect, test } from "bun:test";
import { Registry } from "prom-client";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import type { BudgetKeeper, Reservation } from "./budget.ts";
import { createTestCore } from "./testing.ts";

test("a request still waiting at shutdown (on billing's lease grant) is metered as cancelled before the spool closes", async () => {
  // Billing answers the lease request only after the shutdown's wait for requests has run out, as a busy one may.
  let grant: (reservation: Reservation) => void = () => {};
  const granted = new Promise<Reservation>((resolve) => (grant = resolve));
  const budget: BudgetKeeper = {
    reserve: () => granted,
    releaseKey() {},
    async close() {},
    snapshot: () => new Map(),
  };
  const { core, shipper } = createTestCore({ budget });
  const call = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  const body = { model: "mock", messages: [{ role: "user", content: "hello" }] };
  const outcome = core.handle(call, () => core.chat(call, body)).catch((e: unknown) => e);
  for (let i = 0; i < 100 && call.principal === undefined; i++) await Bun.sleep(5);

  expect(await core.settled(50)).toBe(false);
  expect(shipper.rows).toEqual([]);
  expect(core.cutUnfinished()).toBe(1);
  expect(shipper.rows).toEqual([
    expect.objectContaining({
      requestId: call.requestId,
      orgId: "org_1",
      apiKeyId: "key_good",
      requestedModel: "mock",
      status: RequestStatus.CANCELLED,
      errorCode: "gateway_shutting_down",
    }),
  ]);
  expect(await core.settled(0)).toBe(true);

  // What the request does once billing answers is recorded nowhere: its one row is the one above.
  grant({ settle: () => [] });
  await outcome;
  expect(shipper.rows.length).toBe(1);
  expect(core.cutUnfinished()).toBe(0);
});

test("a request held up by a slow key check has its overhead in a finite bucket, not only past the last", async () => {
  const registry = new Registry();
  const { core, billing } = createTestCore({ registry });
  // Billing answers AuthorizeKey in 600 ms (the gateway's billing client allows 2 s): all of it is the gateway's.
  billing.setDelay(600);
  const call = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  await core.handle(call, () => core.chat(call, { model: "mock", messages: [{ role: "user", content: "hello" }] }));
  const text = await registry.metrics();
  const finite = [...text.matchAll(/^gateway_overhead_seconds_bucket\{le="([0-9.]+)".*\} (\d+)$/gm)].map((m) => ({
    le: Number(m[1]),
    count: Number(m[2]),
  }));
  // histogram_quantile reads an observation past the last finite bound as that bound (50 ms before).
  expect(finite.find((b) => b.count === 1)?.le).toBeGreaterThanOrEqual(0.5);
  expect(Math.max(...finite.map((b) => b.le))).toBeGreaterThanOrEqual(2);
});

test("a key in the cache is answered at once; a client gone before its key is checked is told so, metered under its org", async () => {
  const { core, billing, shipper } = createTestCore();
  const body = { model: "mock", messages: [{ role: "user", content: "hello" }] };
  const first = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  await core.handle(first, () => core.chat(first, body));
  const asked = billing.calls();

  const cached = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  const checking = core.authorize(cached);
  // Known before anything is awaited.
  expect(cached.principal?.orgId).toBe("org_1");
  expect(await checking).toBe(cached.principal as NonNullable<typeof cached.principal>);
  expect(billing.calls()).toBe(asked);

  const gone = new AbortController();
  gone.abort();
  const left = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good", gone.signal);
  const refused = await core.handle(left, () => core.chat(left, body)).catch((e: unknown) => e);
  expect(refused).toMatchObject({ status: 499, code: "client_closed_request" });
  for (let i = 0; i < 100 && !shipper.rows.some((m) => m.requestId === left.requestId); i++) await Bun.sleep(5);
  expect(shipper.rows.filter((m) => m.requestId === left.requestId)).toEqual([
    expect.objectContaining({ orgId: "org_1", apiKeyId: "key_good", status: RequestStatus.CANCELLED, httpStatus: 499 }),
  ]);
  expect(billing.calls()).toBe(asked);
});

test("a request's metrics are counted under its endpoint, model, provider and outcome, whole or streamed", async () => {
  const registry = new Registry();
  const { core } = createTestCore({ registry });
  const body = { model: "mock", messages: [{ role: "user", content: "hello there" }] };
  const whole = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  await core.handle(whole, () => core.chat(whole, body));
  const streamed = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  const stream = await core.handle(streamed, () => core.chatStream(streamed, { ...body, stream: true }));
  for await (const _ of stream);
  const refused = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
  await core.handle(refused, () => core.chat(refused, { ...body, model: "nope" })).catch(() => {});
  const text = await registry.metrics();
  const series = (name: string) => text.split("\n").filter((line) => line.startsWith(`${name}{`) || line.startsWith(`${name} `));
  expect(series("gateway_requests_total")).toEqual([
    'gateway_requests_total{endpoint="chat_completions",model="mock",provider="mock",status="ok",code="200"} 2',
    'gateway_requests_total{endpoint="chat_completions",model="unknown",provider="",status="invalid_request",code="404"} 1',
  ]);
  expect(series("gateway_request_duration_seconds_count")).toEqual([
    'gateway_request_duration_seconds_count{endpoint="chat_completions"} 3',
  ]);
  expect(series("gateway_overhead_seconds_count")).toEqual(['gateway_overhead_seconds_count{endpoint="chat_completions"} 3']);
  expect(series("gateway_upstream_duration_seconds_count")).toEqual([
    'gateway_upstream_duration_seconds_count{endpoint="chat_completions",provider="mock"} 2',
  ]);
  expect(series("gateway_time_to_first_token_seconds_count")).toEqual([
    'gateway_time_to_first_token_seconds_count{model="mock"} 1',
  ]);
});
