import { expect, test } from "bun:test";
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
