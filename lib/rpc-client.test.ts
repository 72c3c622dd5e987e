import { expect, test } from "bun:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger } from "./log.ts";
import { createServiceClient } from "./rpc-client.ts";
import { startServer } from "./server.ts";

const log = createLogger({ service: "rpc-client-test", level: "error" });

test("a unary call made as its server closes the connection fails Unavailable, not Internal", async () => {
  const outcomes: string[] = [];
  let port = 0;
  // Each round a server holding a stream open closes while a unary call is made, a little later each time.
  for (let round = 0; round < 20; round++) {
    const server = await startServer({
      name: "billing",
      port,
      host: "127.0.0.1",
      log,
      routes: (router) =>
        router.service(BillingService, {
          authorizeKey: async () => ({}),
          async *watchKeyChanges(_req, context) {
            yield {};
            await new Promise((resolve) => context.signal.addEventListener("abort", resolve));
          },
        }),
    });
    port = server.port;
    const client = createServiceClient(BillingService, { baseUrl: server.url, timeoutMs: 10_000 });
    const stop = new AbortController();
    const changes = client.watchKeyChanges({}, { signal: stop.signal, timeoutMs: 0 })[Symbol.asyncIterator]();
    await changes.next();
    await client.authorizeKey({ secret: "k" });
    const closing = server.close(0);
    await Bun.sleep(round % 4);
    outcomes.push(
      await client.authorizeKey({ secret: "k" }).then(
        () => "answered",
        (e: unknown) => Code[ConnectError.from(e).code] as string,
      ),
    );
    await closing;
    stop.abort();
  }
  // Answered before the server stopped taking calls, or refused by it, the connection or the closed port.
  expect(outcomes.filter((outcome) => outcome !== "answered" && outcome !== "Unavailable")).toEqual([]);
}, 60_000);
