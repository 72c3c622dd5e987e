/**
 * Metrics pipeline throughput on this machine, in one run. A synthetic producer on the gateway side (the real
 * file spool and shipper, in this process) streams request metrics on IngestMetrics to analytics/main.ts (its own
 * process, ClickHouse in process) which writes them to ClickHouse and records them in billing, then acks.
 * Two passes over the same rows, each with a fresh analytics:
 *
 *   stub billing  RecordUsage answered by a stub in this process: what the pipeline itself sustains
 *   real billing  billing/main.ts (its own process, embedded Postgres or DATABASE_URL): the whole mesh
 *
 * Each pass reports end-to-end rows/s (first row spooled to last ack), the ClickHouse and billing legs from
 * analytics' own metrics (rows over the time that leg was busy), CPU per row of each process (billing counted with
 * its Postgres server) and what this machine's cores could carry at their sum, and analytics' RSS over the pass
 * (bounded memory: it must level off, not grow with the rows). The baseline is chdb's raw insert of the same rows (already encoded as JSONCompactEachRow, same
 * table, same batch size) in this process. Checks that every row arrived once everywhere, prints a table, exits.
 *
 *   ./node_modules/.bin/bun bench/pipeline.ts     (BENCH_ROWS=300000, BENCH_FLUSH_ROWS=10000, BENCH_KEYS=8)
 *
 * BENCH_CPU_PROF=<dir> has billing and each analytics write a CPU profile into <dir> (see bench/profile-summary.ts).
 * BENCH_CLICKHOUSE=server has each analytics write through @clickhouse/client to a ClickHouse HTTP server in a process
 * of its own (the test-only one over chdb), as deployed against a ClickHouse server: analytics' RSS is then its own,
 * without the engine's, and the engine's CPU is in none of the CPU rows (compare analytics' own, not the sums, with
 * an in-process run).
 *
 * BENCH_GATEWAYS=<n> (1) splits the rows among n producers in this process, each a gateway of its own: its file spool,
 * instance id and shipper with its own IngestMetrics stream; the producer row and the spool peak are then theirs
 * together. BENCH_BACKLOG=1 has every producer spool all its rows before any shipper starts, then starts them all at
 * once, so analytics takes the catch-up of n gateways at once (as after an outage of analytics), and end to end is
 * timed from the shippers' start.
 *
 * Billing and analytics run with MIMALLOC_PURGE_DELAY=-1, as the launcher and their manifests run them (see README),
 * unless this process's environment sets it; the table says which was used.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { ulid } from "ulid";
import { createChdbDriver, openChdbSession } from "../analytics/store/chdb-driver.ts";
import { requestColumns, toRequestValues } from "../analytics/store/rows.ts";
import { createAnalyticsStore } from "../analytics/store/store.ts";
import { AnalyticsService, type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { Endpoint, TokenUsageSchema } from "../gen/common/v1/common_pb.ts";
import { createMetricsShipper } from "../gateway/metrics-pipe.ts";
import { openFileSpool } from "../gateway/spool-file.ts";
import { createLogger } from "../lib/log.ts";
import { freePort, type ServiceProcess, spawnService } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { startServer } from "../lib/server.ts";
import { ceilingPerSecond, cpuProfileEnv, cpuSeconds, stolenShare } from "./proc-stats.ts";

const rowCount = Number(process.env.BENCH_ROWS ?? 300_000);
const flushRows = Number(process.env.BENCH_FLUSH_ROWS ?? 10_000);
const keyCount = Number(process.env.BENCH_KEYS ?? 8);
const gatewayCount = Number(process.env.BENCH_GATEWAYS ?? 1);
const backlog = process.env.BENCH_BACKLOG === "1";
if (!Number.isInteger(gatewayCount) || gatewayCount < 1) {
  process.stderr.write(`BENCH_GATEWAYS is a number of gateways, 1 or more, not "${process.env.BENCH_GATEWAYS}"\n`);
  process.exit(2);
}
const adminToken = "bench-admin-token-0123456789";
const root = path.resolve(import.meta.dir, "..");
const dataDir = mkdtempSync(path.join(tmpdir(), "bench-pipeline-"));
const log = createLogger({ service: "bench", level: "warn", write: (line) => process.stderr.write(line) });
const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
const mib = (bytes: number) => `${Math.round(bytes / 1024 / 1024)} MiB`;

const purgeDelay = process.env.MIMALLOC_PURGE_DELAY ?? "-1";
const clickhouseMode = process.env.BENCH_CLICKHOUSE ?? "in-process";
if (clickhouseMode !== "in-process" && clickhouseMode !== "server") {
  process.stderr.write(`BENCH_CLICKHOUSE is in-process (the default) or server, not "${clickhouseMode}"\n`);
  process.exit(2);
}
const services: ServiceProcess[] = [];
const stopAll = async () => {
  for (const s of services.splice(0).reverse()) await s.stop();
};
process.on("SIGINT", () => void stopAll().then(() => process.exit(130)));

async function spawn(name: "billing" | "analytics", env: Record<string, string | undefined>): Promise<ServiceProcess> {
  const port = await freePort();
  const portVar = name === "billing" ? "BILLING_PORT" : "ANALYTICS_PORT";
  const service = spawnService({
    name,
    cmd: [process.execPath, path.join(root, name, "main.ts")],
    cwd: root,
    env: {
      ADMIN_TOKEN: adminToken,
      LOG_LEVEL: "warn",
      OTEL_EXPORTER_OTLP_ENDPOINT: undefined,
      MIMALLOC_PURGE_DELAY: purgeDelay,
      [portVar]: String(port),
      ...cpuProfileEnv(name),
      ...env,
    },
    readyUrl: `http://127.0.0.1:${port}/readyz`,
    readyTimeoutMs: 120_000,
    onLine: (line) => process.stderr.write(`[${name}] ${line}\n`),
  });
  services.push(service);
  await service.ready;
  return Object.assign(service, { url: `http://127.0.0.1:${port}` });
}
const urlOf = (service: ServiceProcess) => (service as ServiceProcess & { url: string }).url;

const billingProcess = await spawn("billing", { MESH_DATA_DIR: dataDir });
// A real org and keys: billing checks usage rows against them.
const billing = createServiceClient(BillingService, { baseUrl: urlOf(billingProcess), bearerToken: adminToken, timeoutMs: 60_000 });
const orgId = (await billing.createOrganization({ name: "bench-pipeline" })).organization?.id ?? "";
const keyIds: string[] = [];
for (let i = 0; i < keyCount; i++) keyIds.push((await billing.createApiKey({ orgId, name: `k${i}` })).apiKey?.id ?? "");

const models = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "mock"];
const rowsStartMs = Date.now() - 60_000;
const rows: RequestMetrics[] = Array.from({ length: rowCount }, (_, i) => {
  const at = rowsStartMs + Math.floor((i * 60_000) / rowCount);
  return create(RequestMetricsSchema, {
    requestId: ulid(at),
    traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
    spanId: "00f067aa0ba902b7",
    startTime: timestampFromMs(at),
    endTime: timestampFromMs(at + 850),
    orgId,
    apiKeyId: keyIds[i % keyCount],
    endUserId: `user-${i % 100}`,
    provider: "mock",
    requestedModel: models[i % models.length],
    servedModel: "mock-echo-1",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    status: i % 50 === 0 ? RequestStatus.UPSTREAM_ERROR : RequestStatus.OK,
    httpStatus: i % 50 === 0 ? 502 : 200,
    usage: create(TokenUsageSchema, { inputTokens: BigInt(100 + (i % 400)), outputTokens: BigInt(20 + (i % 200)) }),
    costNanos: BigInt(1000 + (i % 9000)),
    totalLatencyUs: 850_000n,
    upstreamLatencyUs: 840_000n,
    gatewayOverheadUs: 10_000n,
    gatewayInstanceId: "bench-gw",
  });
});
const expectedCost = rows.reduce((sum, m) => sum + m.costNanos, 0n);

// Baseline: chdb's own insert of the same rows, already encoded, into the same table, in this process.
const rawDir = path.join(dataDir, "raw-chdb");
const rawStore = createAnalyticsStore(createChdbDriver(rawDir), { database: "raw", ttlDays: 400 });
await rawStore.migrate();
const bodies: Buffer[] = [];
for (let i = 0; i < rowCount; i += flushRows) {
  const lines = rows.slice(i, i + flushRows).map((m) => JSON.stringify(toRequestValues(m)));
  bodies.push(Buffer.from(`${lines.join("\n")}\n`));
}
const chdb = openChdbSession(rawDir);
let started = performance.now();
for (const values of bodies) {
  await chdb.session.insert({ table: "raw.requests", columns: [...requestColumns], values, format: "JSONCompactEachRow" });
}
const rawRate = rowCount / ((performance.now() - started) / 1000);
chdb.release();
await rawStore.close();

interface Pass {
  endToEnd: number;
  producer: number;
  clickhouseLeg: number;
  billingLeg: number;
  flushes: number;
  /** Analytics RSS when ready, and its peak over each quarter of the rows. */
  rss: { idle: number; quarters: number[] };
  /** CPU time per row, in microseconds: analytics' process, and this one (producer, spool, shipper, stub). */
  cpuUs: { analytics: number; billing: number; gatewaySide: number };
  spoolPeak: number;
  /** Share of this machine's CPU time its hypervisor gave other guests during the pass. */
  stolen: number;
  exact: boolean;
}

/** A ClickHouse HTTP server over chdb in its own process, for BENCH_CLICKHOUSE=server. */
async function spawnClickHouseServer(name: string): Promise<string> {
  const port = await freePort();
  const server = spawnService({
    name: `clickhouse-${name}`,
    cmd: [
      process.execPath,
      path.join(root, "analytics/store/testing/clickhouse-http-server.ts"),
      "--path",
      path.join(dataDir, `${name}-clickhouse`),
      "--port",
      String(port),
    ],
    cwd: root,
    env: {},
    readyUrl: `http://127.0.0.1:${port}/ping`,
    readyTimeoutMs: 120_000,
    onLine: (line) => process.stderr.write(`[clickhouse] ${line}\n`),
  });
  services.push(server);
  await server.ready;
  return `http://127.0.0.1:${port}`;
}

/** One gateway's side of the pipeline: a file spool and a shipper, fed its share of the rows. */
function openGateway(name: string, analyticsUrl: string, share: RequestMetrics[]) {
  const spool = openFileSpool({ root: path.join(dataDir, "spool"), name, maxBytes: 1024 ** 3, fsync: "interval", log });
  const shipper = createMetricsShipper({
    client: createServiceClient(AnalyticsService, { baseUrl: analyticsUrl, bearerToken: adminToken }),
    spool,
    instanceId: `bench-${name}`,
    log,
  });
  return {
    spool,
    shipper,
    /** Records the share a thousand rows at a time, letting the shipper run between them. */
    async produce() {
      for (let i = 0; i < share.length; i += 1000) {
        for (let j = i; j < Math.min(i + 1000, share.length); j++) shipper.record(share[j] as RequestMetrics);
        await new Promise((resolve) => setImmediate(resolve));
      }
    },
  };
}

async function runPass(name: string, billingUrl: string, checkBilling: boolean): Promise<Pass> {
  const analyticsProcess = await spawn("analytics", {
    MESH_DATA_DIR: path.join(dataDir, name),
    BILLING_URL: billingUrl,
    ANALYTICS_FLUSH_ROWS: String(flushRows),
    ANALYTICS_ROLLUP_INTERVAL_MS: "0",
    CLICKHOUSE_URL: clickhouseMode === "server" ? await spawnClickHouseServer(name) : undefined,
  });
  const analyticsUrl = urlOf(analyticsProcess);
  const rss = async () => {
    const status = await Bun.file(`/proc/${analyticsProcess.proc.pid}/status`).text().catch(() => "");
    return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024;
  };
  const idle = await rss();
  // Billing's CPU includes its Postgres server's processes.
  const billingPid = billingProcess.proc.pid;
  const analyticsCpu = cpuSeconds(analyticsProcess.proc.pid);
  const billingCpu = cpuSeconds(billingPid, { tree: true });
  const ownCpu = process.cpuUsage();
  const stolen = stolenShare();
  const gateways = Array.from({ length: gatewayCount }, (_, g) => {
    const share = rows.slice(Math.floor((g * rowCount) / gatewayCount), Math.floor(((g + 1) * rowCount) / gatewayCount));
    return openGateway(`${name}-${g + 1}`, analyticsUrl, share);
  });
  const startShippers = () => {
    for (const gateway of gateways) gateway.shipper.start();
  };
  if (!backlog) startShippers();
  const quarters = [0, 0, 0, 0];
  let spoolPeak = 0;
  const sampler = setInterval(async () => {
    spoolPeak = Math.max(spoolPeak, gateways.reduce((sum, gateway) => sum + gateway.spool.bytes, 0));
    const waitingRows = gateways.reduce((sum, gateway) => sum + gateway.spool.rows, 0);
    const quarter = Math.min(3, Math.floor((4 * (rowCount - waitingRows)) / rowCount));
    const now = await rss();
    quarters[quarter] = Math.max(quarters[quarter] as number, now);
  }, 100);
  started = performance.now();
  await Promise.all(gateways.map((gateway) => gateway.produce()));
  const producedSeconds = (performance.now() - started) / 1000;
  if (backlog) {
    started = performance.now();
    startShippers();
  }
  const flushed = await Promise.all(gateways.map((gateway) => gateway.shipper.flush(600_000)));
  if (!flushed.every(Boolean)) throw new Error(`${name}: analytics did not ack every row`);
  const endToEndSeconds = (performance.now() - started) / 1000;
  const cpuUs = {
    analytics: ((cpuSeconds(analyticsProcess.proc.pid) - analyticsCpu) * 1e6) / rowCount,
    billing: ((cpuSeconds(billingPid, { tree: true }) - billingCpu) * 1e6) / rowCount,
    gatewaySide: (process.cpuUsage(ownCpu).user + process.cpuUsage(ownCpu).system) / rowCount,
  };
  const stolenShareOfPass = stolen();
  clearInterval(sampler);
  for (const gateway of gateways) {
    await gateway.shipper.close();
    gateway.spool.close();
  }

  const metrics = await fetch(`${analyticsUrl}/metrics`).then((r) => r.text());
  const metric = (m: string) => Number(new RegExp(`^${m}(?:\\{[^}]*\\})? ([0-9.e+-]+)$`, "m").exec(metrics)?.[1] ?? Number.NaN);
  const analytics = createServiceClient(AnalyticsService, { baseUrl: analyticsUrl, bearerToken: adminToken, timeoutMs: 60_000 });
  const range = { start: timestampFromMs(rowsStartMs - 60_000), end: timestampFromMs(Date.now() + 60_000) };
  const [usage] = (await analytics.queryUsage({ orgId, range })).rows;
  let exact = usage?.requests === BigInt(rowCount) && usage.costNanos === expectedCost;
  if (checkBilling) {
    const summary = await billing.getUsageSummary({ orgId, startTime: range.start, endTime: range.end });
    exact &&= summary.requests === BigInt(rowCount) && summary.costNanos === expectedCost;
  }
  await analyticsProcess.stop();
  services.splice(services.indexOf(analyticsProcess), 1);
  return {
    endToEnd: rowCount / endToEndSeconds,
    producer: rowCount / producedSeconds,
    clickhouseLeg: rowCount / metric("analytics_ingest_insert_busy_seconds_total"),
    billingLeg: rowCount / metric("analytics_ingest_billing_busy_seconds_total"),
    flushes: metric("analytics_ingest_insert_seconds_count"),
    rss: { idle, quarters },
    cpuUs,
    spoolPeak,
    stolen: stolenShareOfPass,
    exact,
  };
}

// RecordUsage answered at once: the pipeline's own ceiling.
const stub = await startServer({
  name: "billing-stub",
  port: 0,
  log,
  routes: (router) =>
    router.service(BillingService, {
      recordUsage: (req) => ({ inserted: req.records.length, duplicates: 0 }),
    }),
});
const stubPass = await runPass("stub", stub.url, false);
await stub.close(0);
const realPass = await runPass("real", urlOf(billingProcess), true);
await stopAll();
rmSync(dataDir, { recursive: true, force: true });

const total = (pass: Pass, withBilling: boolean) =>
  pass.cpuUs.analytics + pass.cpuUs.gatewaySide + (withBilling ? pass.cpuUs.billing : 0);
const table: string[][] = [
  ["", "stub billing", "real billing"],
  ["end to end: spool -> IngestMetrics -> ClickHouse + billing -> ack (rows/s)", fmt(stubPass.endToEnd), fmt(realPass.endToEnd)],
  ["  producer: appends to the file spool, this process (rows/s)", fmt(stubPass.producer), fmt(realPass.producer)],
  ["  ClickHouse leg: rows / time with an insert running (rows/s)", fmt(stubPass.clickhouseLeg), fmt(realPass.clickhouseLeg)],
  ["  ClickHouse leg / chdb raw insert of the same rows", `${Math.round((100 * stubPass.clickhouseLeg) / rawRate)}%`, `${Math.round((100 * realPass.clickhouseLeg) / rawRate)}%`],
  ["  billing leg: rows / time with RecordUsage running (rows/s)", fmt(stubPass.billingLeg), fmt(realPass.billingLeg)],
  ["  flushes (ClickHouse inserts)", String(stubPass.flushes), String(realPass.flushes)],
  ["analytics RSS: ready, then peak per quarter of the rows", [stubPass.rss.idle, ...stubPass.rss.quarters].map(mib).join(" "), [realPass.rss.idle, ...realPass.rss.quarters].map(mib).join(" ")],
  ["CPU per row: analytics process (us)", stubPass.cpuUs.analytics.toFixed(1), realPass.cpuUs.analytics.toFixed(1)],
  ["CPU per row: this process, gateway side (and the stub) (us)", stubPass.cpuUs.gatewaySide.toFixed(1), realPass.cpuUs.gatewaySide.toFixed(1)],
  ["CPU per row: billing and its Postgres (us)", "-", realPass.cpuUs.billing.toFixed(1)],
  ["CPU per row: all of the above (us)", total(stubPass, false).toFixed(1), total(realPass, true).toFixed(1)],
  ["  what this machine's cores carry at that CPU per row (rows/s)", fmt(ceilingPerSecond(total(stubPass, false))), fmt(ceilingPerSecond(total(realPass, true)))],
  ["gateway spool peak", mib(stubPass.spoolPeak), mib(realPass.spoolPeak)],
  ["machine CPU time taken by the hypervisor for other guests", `${(100 * stubPass.stolen).toFixed(1)}%`, `${(100 * realPass.stolen).toFixed(1)}%`],
  ["every row once, costs exact (ClickHouse; and billing)", String(stubPass.exact), String(realPass.exact)],
  ["MIMALLOC_PURGE_DELAY of billing and analytics (Bun's default: 100)", purgeDelay, purgeDelay],
  ["ClickHouse of analytics (BENCH_CLICKHOUSE)", clickhouseMode, clickhouseMode],
];
const widths = [0, 1, 2].map((c) => Math.max(...table.map((r) => (r[c] ?? "").length)));
const source =
  gatewayCount === 1 && !backlog
    ? ""
    : ` from ${gatewayCount} gateway${gatewayCount === 1 ? "" : "s"}${backlog ? ", spooled before their shippers start" : ""}`;
process.stdout.write(`\nrows: ${fmt(rowCount)}${source}; chdb raw insert of the same rows: ${fmt(rawRate)} rows/s\n`);
for (const r of table) process.stdout.write(`${r.map((cell, c) => (c === 0 ? cell.padEnd(widths[0] ?? 0) : cell.padStart(widths[c] ?? 0))).join("  ")}\n`);
process.exit(stubPass.exact && realPass.exact ? 0 : 1);
