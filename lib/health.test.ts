import { afterAll, beforeAll, describe, expect, setSystemTime, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.ts";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.ts";
import { ServerReflection as ServerReflectionAlpha } from "../gen/grpc/reflection/v1alpha/reflection_pb.ts";
import { createReadinessPoller, pingReadiness, readinessIntervalMs, registerHealth } from "./health.ts";
import { createLogger } from "./log.ts";
import { registerReflection } from "./reflection.ts";
import { type RunningServer, startServer } from "./server.ts";

const log = createLogger({ service: "t", level: "error", write: () => {} });

test("a ping that never settles is a timeout once its bound has passed, and is told the bound", async () => {
  let given: number | undefined;
  const readiness = pingReadiness(
    "clickhouse",
    (timeoutMs) => {
      given = timeoutMs;
      return new Promise(() => {});
    },
    log,
    50,
  );
  const started = performance.now();
  expect(await readiness()).toEqual({ ready: false, checks: { clickhouse: "timeout" } });
  expect(performance.now() - started).toBeLessThan(1_000);
  expect(given).toBe(50);
  expect(await pingReadiness("clickhouse", async () => {}, log)()).toEqual({ ready: true, checks: { clickhouse: "ok" } });
  const failing = pingReadiness("postgres", () => Promise.reject(new Error("ECONNREFUSED 10.0.0.1:5432")), log);
  expect(await failing()).toEqual({ ready: false, checks: { postgres: "unreachable" } });
});

test("a store down for many checks is logged as the outage starts and as it ends, not at every check", async () => {
  const lines: string[] = [];
  let down = true;
  const readiness = pingReadiness(
    "postgres",
    () => (down ? Promise.reject(new Error("connect ECONNREFUSED 10.0.0.1:5432")) : Promise.resolve()),
    createLogger({ service: "t", write: (line) => lines.push(line) }),
  );
  for (let i = 0; i < 30; i++) expect((await readiness()).ready).toBe(false);
  down = false;
  for (let i = 0; i < 3; i++) expect((await readiness()).ready).toBe(true);
  const logged = lines.map((line) => JSON.parse(line));
  expect(logged.map((l) => `${l.level} ${l.msg}`)).toEqual([
    "warn readiness: postgres does not answer",
    "info readiness: postgres answers again",
  ]);
  expect(logged[0].err.message).toBe("connect ECONNREFUSED 10.0.0.1:5432");
  expect(logged[1].failures).toBe(30);
});

test("a wall clock stepped back keeps no readiness result past its interval", async () => {
  let ready = false;
  const poller = createReadinessPoller(async () => ({ ready, checks: {} }), 50);
  expect((await poller.current()).ready).toBe(false);
  ready = true;
  // NTP steps the host's clock back an hour (it ran fast); the result's 50 ms pass all the same.
  setSystemTime(new Date(Date.now() - 3_600_000));
  try {
    await Bun.sleep(60);
    expect((await poller.current()).ready).toBe(true);
  } finally {
    setSystemTime();
  }
});

describe("health under many probes", () => {
  let pings = 0;
  let ready = true;
  let server: RunningServer;
  beforeAll(async () => {
    server = await startServer({
      name: "t",
      port: 0,
      host: "127.0.0.1",
      log,
      routes: () => {},
      readiness: async () => {
        pings++;
        return { ready, checks: { store: ready ? "ok" : "unreachable" } };
      },
    });
  });
  afterAll(() => server.close(1_000));

  test("hundreds of Watch streams and probes check readiness once per interval, and every stream hears changes", async () => {
    const stop = new AbortController();
    // Connections of their own, each with as many streams as one connection may hold.
    const clients = Array.from({ length: 20 }, () =>
      createClient(Health, createGrpcTransport({ baseUrl: server.url })),
    );
    const seen: Status[][] = [];
    const streams = clients.flatMap((client) =>
      Array.from({ length: 16 }, async () => {
        const statuses: Status[] = [];
        seen.push(statuses);
        try {
          for await (const res of client.watch({}, { signal: stop.signal })) statuses.push(res.status);
        } catch (e) {
          if (!stop.signal.aborted) throw e;
        }
      }),
    );
    const everyStream = async (status: Status) => {
      const deadline = Date.now() + 5_000;
      while (seen.some((s) => s.at(-1) !== status) && Date.now() < deadline) await Bun.sleep(20);
      expect(seen.filter((s) => s.at(-1) === status).length).toBe(320);
    };
    await everyStream(Status.SERVING);
    pings = 0;
    const started = performance.now();
    while (performance.now() - started < 3_000) {
      const answers = await Promise.all(Array.from({ length: 20 }, () => fetch(`${server.url}/readyz`)));
      expect(answers.map((r) => r.status)).toEqual(Array(20).fill(200));
      await Bun.sleep(100);
    }
    expect(pings).toBeLessThanOrEqual(Math.ceil((performance.now() - started) / readinessIntervalMs) + 1);

    // One stream more on a full connection is refused; the others are not disturbed.
    const extra = await (async () => {
      for await (const _ of clients[0]!.watch({}, { signal: stop.signal })) return undefined;
    })().catch((e: unknown) => ConnectError.from(e));
    expect((extra as ConnectError).code).toBe(Code.ResourceExhausted);

    ready = false;
    await everyStream(Status.NOT_SERVING);
    ready = true;
    await everyStream(Status.SERVING);
    expect(seen.every((s) => s.join() === [Status.SERVING, Status.NOT_SERVING, Status.SERVING].join())).toBe(true);
    stop.abort();
    await Promise.all(streams);
  }, 30_000);

  test("health and reflection requests are read up to 64 KiB", async () => {
    const transport = createGrpcTransport({ baseUrl: server.url });
    const check = await createClient(Health, transport)
      .check({ service: "x".repeat(100_000) })
      .catch((e: unknown) => ConnectError.from(e));
    expect((check as ConnectError).code).toBe(Code.ResourceExhausted);
    const reflection = createClient(ServerReflection, transport);
    async function* one(host: string) {
      yield { host, messageRequest: { case: "listServices" as const, value: "" } };
    }
    const big = await (async () => {
      for await (const res of reflection.serverReflectionInfo(one("h".repeat(100_000)))) return res;
    })().catch((e: unknown) => ConnectError.from(e));
    expect((big as ConnectError).code).toBe(Code.ResourceExhausted);
    for await (const res of reflection.serverReflectionInfo(one("localhost"))) {
      expect(res.messageResponse.case).toBe("listServicesResponse");
    }
  });
  test("a connection holds 16 reflection streams at most, taking another once one ends", async () => {
    const reflection = createClient(ServerReflection, createGrpcTransport({ baseUrl: server.url }));
    const stop = new AbortController();
    const held = Array.from({ length: 17 }, () => new AbortController());
    // Each asks once, then keeps its request stream open, as a caller that never leaves.
    const open = (signal: AbortSignal) => {
      async function* ask() {
        yield { host: "", messageRequest: { case: "listServices" as const, value: "" } };
        await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
      }
      const responses = reflection.serverReflectionInfo(ask(), { signal })[Symbol.asyncIterator]();
      return responses.next().then(
        (r) => r.value?.messageResponse.case,
        (e: unknown) => ConnectError.from(e),
      );
    };
    const first = await Promise.all(held.slice(0, 16).map((c) => open(c.signal)));
    expect(first).toEqual(Array(16).fill("listServicesResponse"));
    const refused = await open(held[16]!.signal);
    expect((refused as ConnectError).code).toBe(Code.ResourceExhausted);
    held[0]!.abort();
    let again: unknown;
    for (const deadline = Date.now() + 5_000; Date.now() < deadline; await Bun.sleep(20)) {
      again = await open(stop.signal);
      if (again === "listServicesResponse") break;
    }
    expect(again).toBe("listServicesResponse");
    stop.abort();
    for (const c of held) c.abort();
  });
});

test("reflection streams (v1 and v1alpha together) past the server's total are refused", async () => {
  const transport = createRouterTransport((router) => registerReflection(router, [], { maxStreams: 3 }));
  const v1 = createClient(ServerReflection, transport);
  const alpha = createClient(ServerReflectionAlpha, transport);
  const stop = new AbortController();
  async function* ask() {
    yield { host: "", messageRequest: { case: "listServices" as const, value: "" } };
    await new Promise((resolve) => stop.signal.addEventListener("abort", resolve, { once: true }));
  }
  const first = (responses: AsyncIterable<{ messageResponse: { case: string | undefined } }>) =>
    responses[Symbol.asyncIterator]()
      .next()
      .then(
        (r) => r.value?.messageResponse.case,
        (e: unknown) => ConnectError.from(e),
      );
  const opened = [
    await first(v1.serverReflectionInfo(ask(), { signal: stop.signal })),
    await first(alpha.serverReflectionInfo(ask(), { signal: stop.signal })),
    await first(v1.serverReflectionInfo(ask(), { signal: stop.signal })),
  ];
  expect(opened).toEqual(Array(3).fill("listServicesResponse"));
  const fourth = await first(alpha.serverReflectionInfo(ask(), { signal: stop.signal }));
  expect((fourth as ConnectError).code).toBe(Code.ResourceExhausted);
  stop.abort();
});

test("Watch streams past the server's total are refused", async () => {
  const transport = createRouterTransport((router) =>
    registerHealth(router, {
      services: [],
      readiness: createReadinessPoller(async () => ({ ready: true, checks: {} })),
      stopSignal: new AbortController().signal,
      maxWatches: 3,
    }),
  );
  const client = createClient(Health, transport);
  const stop = new AbortController();
  const firsts = await Promise.all(
    Array.from({ length: 3 }, async () => {
      const it = client.watch({}, { signal: stop.signal })[Symbol.asyncIterator]();
      return (await it.next()).value?.status;
    }),
  );
  expect(firsts).toEqual([Status.SERVING, Status.SERVING, Status.SERVING]);
  const fourth = await client
    .watch({})
    [Symbol.asyncIterator]()
    .next()
    .catch((e: unknown) => ConnectError.from(e));
  expect((fourth as ConnectError).code).toBe(Code.ResourceExhausted);
  stop.abort();
});
