import { expect, test } from "bun:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { runCommand } from "../lib/processes.ts";
import { dripAndSlowRoutes, startTestGateway } from "./testing/served-gateway.ts";

// What a SIGTERM does to requests still running when its grace period is over: each is told the gateway is going
// away, in its protocol's form, and metered as cut by the gateway, not as a client that left.
const routes = dripAndSlowRoutes;
const messages = [{ role: "user", content: "x".repeat(4000) }];

test("requests still running when the shutdown grace is over get a 503, an error event or Unavailable", async () => {
  const gateway = await startTestGateway(routes);
  const post = (base: string, model: string, stream: boolean) =>
    fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body: JSON.stringify({ model, stream, messages }),
    });
  const wholes = [gateway.restUrl, gateway.url].map((base) => post(base, "slow", false));
  const streams = await Promise.all([gateway.restUrl, gateway.url].map((base) => post(base, "drip", true)));
  const rpc = gateway.rpc("sk-good");
  const rpcWhole = rpc.createChatCompletion({ params: { model: "slow", messages } }).then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
  const rpcStream = (async () => {
    try {
      for await (const _ of rpc.streamChatCompletion({ params: { model: "drip", messages } }));
    } catch (e) {
      return ConnectError.from(e);
    }
  })();
  // Every stream under way, every whole answer waiting on its upstream.
  const readers = streams.map((res) => res.body?.getReader() as ReadableStreamDefaultReader<Uint8Array>);
  const seen = await Promise.all(readers.map(async (r) => new TextDecoder().decode((await r.read()).value)));
  await Bun.sleep(200);

  // Both ports call it, as main.ts wires them: the first call cuts.
  const cuts: number[] = [];
  await gateway.close(300, () => void cuts.push(gateway.core.cutInFlight()));
  expect(cuts[0]).toBe(6);

  for (const res of await Promise.all(wholes)) {
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).toBe("1");
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("gateway_shutting_down");
  }
  for (const [i, reader] of readers.entries()) {
    let text = seen[i] as string;
    for (let step = await reader.read(); !step.done; step = await reader.read()) text += new TextDecoder().decode(step.value);
    const last = JSON.parse(text.trimEnd().split("\n\n").at(-1)?.slice("data: ".length) ?? "") as { error?: { code: string } };
    expect(last.error?.code).toBe("gateway_shutting_down");
  }
  for (const error of [await rpcWhole, await rpcStream]) {
    expect(error?.code).toBe(Code.Unavailable);
    expect(error?.metadata.get("x-error-code")).toBe("gateway_shutting_down");
  }
  // Metered once their counts are made, which the answers did not wait for; main.ts waits so before flushing.
  expect(await gateway.core.settled(10_000)).toBe(true);
  expect(gateway.shipper.rows).toHaveLength(6);
  for (const row of gateway.shipper.rows) {
    expect([row.status, row.httpStatus, row.errorCode]).toEqual([RequestStatus.CANCELLED, 503, "gateway_shutting_down"]);
  }
}, 20_000);

test("a request waiting on billing's key check when the grace is over is answered at once, metered once it is known", async () => {
  const gateway = await startTestGateway(routes);
  gateway.billing.setDelay(4000);
  const started = performance.now();
  const answer = fetch(`${gateway.restUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
    body: JSON.stringify({ model: "drip", messages }),
  });
  await Bun.sleep(100);
  await gateway.close(100, () => void gateway.core.cutInFlight());
  const res = await answer;
  expect(res.status).toBe(503);
  expect(((await res.json()) as { error: { code: string } }).error.code).toBe("gateway_shutting_down");
  // Not once billing has answered, four seconds in.
  expect(performance.now() - started).toBeLessThan(2000);
  const row = await gateway.row(res.headers.get("x-request-id") ?? "", 15_000);
  expect([row.orgId, row.status, row.httpStatus, row.errorCode]).toEqual(["org_1", RequestStatus.CANCELLED, 503, "gateway_shutting_down"]);
  expect(await gateway.core.settled(0)).toBe(true);
}, 20_000);

test("requests cut at the end of the grace are answered without waiting for their counts, and metered with them", async () => {
  // Counts that take 2 s, as the first does while the encoding loads: once the answers waited for them, and the
  // server, past its second for the cut answers, closed their connections unanswered.
  const { stdout, stderr, code } = await runCommand([process.execPath, `${import.meta.dir}/testing/shutdown-slow-count.ts`]);
  expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
  const out = JSON.parse(stdout) as {
    whole: { status: number; body: string; ms: number };
    stream: { last: string; ms: number };
    settled: boolean;
    metered: number;
    rows: { status: number; input: number }[];
  };
  expect(out.whole.status).toBe(503);
  expect((JSON.parse(out.whole.body) as { error: { code: string } }).error.code).toBe("gateway_shutting_down");
  expect((JSON.parse(out.stream.last.slice("data: ".length)) as { error: { code: string } }).error.code).toBe(
    "gateway_shutting_down",
  );
  expect(Math.max(out.whole.ms, out.stream.ms)).toBeLessThan(1_000);
  // Recorded once counted: the prompts by the slow thread (a token a character), before the shutdown went on.
  expect(out.settled).toBe(true);
  expect(out.metered).toBeGreaterThanOrEqual(2_000);
  expect(out.rows).toEqual([
    { status: 503, input: 37 },
    { status: 503, input: 37 },
  ]);
}, 30_000);
