/**
 * Run under a low `ulimit -n` by metrics-pipe.test.ts: reopens the file spool at argv[2] (its batches recovered, so
 * read from disk), takes every file descriptor left, starts a shipper to an in-memory analytics, gives the descriptors
 * back after argv[3] ms, flushes, and prints what happened as one JSON line.
 */
import { closeSync, openSync } from "node:fs";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { Registry } from "prom-client";
import { AnalyticsService } from "../../gen/analytics/v1/analytics_pb.ts";
import { createMetricsShipper } from "../metrics-pipe.ts";
import { openFileSpool } from "../spool-file.ts";
import { createTestLogger } from "../testing.ts";

const [root = "", holdMs = "300"] = process.argv.slice(2);
const received: string[] = [];
const transport = createRouterTransport((router) =>
  router.service(AnalyticsService, {
    async *ingestMetrics(requests) {
      for await (const req of requests) {
        received.push(...req.metrics.map((m) => m.requestId));
        yield { ackedSequence: req.sequence };
      }
    },
  }),
);
const log = createTestLogger();
const registry = new Registry();
const spool = openFileSpool({ root, name: "gw", maxBytes: 1 << 20, fsync: "never", log });
const held: number[] = [];
let exhausted = "";
try {
  for (;;) held.push(openSync("/dev/null", "r"));
} catch (e) {
  exhausted = (e as NodeJS.ErrnoException).code ?? String(e);
}
const shipper = createMetricsShipper({
  client: createClient(AnalyticsService, transport),
  spool,
  instanceId: "gw",
  log,
  registry,
  intervalMs: 10,
  backoffBaseMs: 10,
  backoffMaxMs: 50,
});
shipper.start();
await Bun.sleep(Number(holdMs));
const spooledWhileHeld = spool.rows;
for (const fd of held.splice(0)) closeSync(fd);
const flushed = await shipper.flush(5000);
const dropped = await registry.getSingleMetric("gateway_metrics_dropped_total")?.get();
await shipper.close();
spool.close();
const messages = log.lines.map((l) => JSON.parse(l) as { level: string; msg: string });
console.log(
  JSON.stringify({
    exhausted,
    spooledWhileHeld,
    flushed,
    received,
    dropped: dropped?.values.reduce((n, v) => n + v.value, 0) ?? 0,
    errors: messages.filter((m) => m.level === "error").map((m) => m.msg),
  }),
);
