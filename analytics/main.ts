import { join, resolve } from "node:path";
import { createClient } from "@clickhouse/client";
import { z } from "zod";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { commonEnv, env, exitOnArguments, loadEnvOrExit } from "../lib/config.ts";
import { createCorsPolicy } from "../lib/cors.ts";
import { pingReadiness } from "../lib/health.ts";
import { createOutageLog } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { createRuntime, listenOrExit, stopOnSignals } from "../lib/runtime.ts";
import { startServer } from "../lib/server.ts";
import { defaultIngestOptions } from "./ingest.ts";
import { analyticsRoutes } from "./routes.ts";
import { createAnalyticsService, storeUnreachable } from "./service.ts";
import { clickHouseLoggerClass, clientRequestTimeoutMs, createClientDriver } from "./store/client-driver.ts";
import { type ClickHouseDriver, defaultChdbReportTimeoutSeconds } from "./store/driver.ts";
import { createAnalyticsStore, defaultQueryTimeoutSeconds, defaultRollupLagMs, maxTtlDays } from "./store/store.ts";

exitOnArguments({
  command: "npm run analytics",
  script: "analytics/main.ts",
  about: "takes the gateways' request metrics into ClickHouse and billing, and answers usage queries",
});
const cfg = loadEnvOrExit({
  ...commonEnv,
  ANALYTICS_PORT: env.port(8082),
  BILLING_URL: env.httpUrl.default("http://127.0.0.1:8081"),
  /** A ClickHouse server's HTTP URL; unset runs the engine in-process (chdb) under MESH_DATA_DIR/clickhouse. */
  CLICKHOUSE_URL: env.setOrUnset(env.httpUrl.optional()),
  CLICKHOUSE_USER: z.string().default("default"),
  CLICKHOUSE_PASSWORD: z.string().default(""),
  CLICKHOUSE_DATABASE: z
    .string()
    .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be a plain identifier")
    .default("mesh"),
  /** Request rows are dropped this many days after they started (a TTL past 2106 would drop them on arrival). */
  CLICKHOUSE_TTL_DAYS: env.int(1, maxTtlDays).default(400),
  /** A cluster name from the server's remote_servers: DDL runs ON CLUSTER with Replicated and Distributed tables. */
  CLICKHOUSE_CLUSTER: z
    .string()
    .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be a plain identifier")
    .optional(),
  /** Ingest flushes (one ClickHouse insert, then RecordUsage) once this many rows are buffered... */
  ANALYTICS_FLUSH_ROWS: env.int(1, 1_000_000).default(defaultIngestOptions.flushRows),
  /** ...or this long after the oldest buffered row arrived. */
  ANALYTICS_FLUSH_INTERVAL_MS: env.int(1, 60_000).default(defaultIngestOptions.flushIntervalMs),
  /** Rows held in memory by ingest... */
  ANALYTICS_MAX_BUFFERED_ROWS: env.int(1000, 10_000_000).default(defaultIngestOptions.maxBufferedRows),
  /** ...and their estimated bytes; gateways' streams are not read while either is reached. */
  ANALYTICS_MAX_BUFFERED_BYTES: env.int(16 * 1024 * 1024, 64 * 1024 ** 3).default(defaultIngestOptions.maxBufferedBytes),
  /** Rows per RecordUsage call... */
  ANALYTICS_BILLING_BATCH_ROWS: env.int(1, 10_000).default(defaultIngestOptions.billingBatchRows),
  /** ...and RecordUsage calls in flight at once. */
  ANALYTICS_BILLING_CONCURRENCY: env.int(1, 64).default(defaultIngestOptions.billingConcurrency),
  /** How often closed minutes are rolled up (0: never, e.g. when another replica does it). */
  ANALYTICS_ROLLUP_INTERVAL_MS: env.int(0, 3_600_000).default(30_000),
  /** Minutes are rolled up once this old; rows arriving later than half of it are recomputed in. */
  ANALYTICS_ROLLUP_LAG_MS: env.int(60_000, 86_400_000).default(defaultRollupLagMs),
  /** The in-process engine runs report queries one at a time, each stopped after this long (a server's limit is 30 s). */
  ANALYTICS_CHDB_QUERY_TIMEOUT_SECONDS: env.decimal(1, 300).default(defaultChdbReportTimeoutSeconds),
});

/** How long a stop waits for a roll-up still running (see the stop below). */
const rollupStopWaitMs = 5_000;

const runtime = createRuntime("analytics", cfg);
const { log } = runtime;
// A stop signal while the engine loads or migrations wait on a server ends the start: nothing is held yet.
const signals = stopOnSignals(log);

let driver: ClickHouseDriver;
try {
  const clickHouseClient = (url: string) =>
    createClient({
      url,
      username: cfg.CLICKHOUSE_USER,
      password: cfg.CLICKHOUSE_PASSWORD,
      application: "mesh-analytics",
      request_timeout: clientRequestTimeoutMs(defaultQueryTimeoutSeconds),
      log: { LoggerClass: clickHouseLoggerClass(log.child({ component: "clickhouse-client" })) },
    });
  driver = cfg.CLICKHOUSE_URL
    ? // Report queries on connections of their own: busy dashboards do not hold up ingest or readiness.
      createClientDriver(clickHouseClient(cfg.CLICKHOUSE_URL), clickHouseClient(cfg.CLICKHOUSE_URL))
    : // Loaded only when used: the engine's library adds about 150 MB to the process and 0.2 s to its start.
      (await signals.unlessStopped(import("./store/chdb-driver.ts"))).createChdbDriver(
        join(cfg.MESH_DATA_DIR, "clickhouse"),
        { reportTimeoutSeconds: cfg.ANALYTICS_CHDB_QUERY_TIMEOUT_SECONDS, log },
      );
} catch (e) {
  // An unusable MESH_DATA_DIR, say: one JSON line, as billing and the gateway write for theirs.
  log.error("clickhouse failed to start", { err: e });
  process.exit(1);
}
const store = createAnalyticsStore(driver, {
  database: cfg.CLICKHOUSE_DATABASE,
  ttlDays: cfg.CLICKHOUSE_TTL_DAYS,
  cluster: cfg.CLICKHOUSE_CLUSTER,
  rollupLagMs: cfg.ANALYTICS_ROLLUP_LAG_MS,
});
try {
  const applied = await signals.unlessStopped(store.migrate());
  log.info("clickhouse ready", {
    backend: cfg.CLICKHOUSE_URL ? "server" : "chdb",
    // Where the data is, as billing's and the gateway's logs say of theirs; a server's URL without its credentials.
    ...(cfg.CLICKHOUSE_URL
      ? { url: new URL(cfg.CLICKHOUSE_URL).origin }
      : { dataDir: resolve(cfg.MESH_DATA_DIR, "clickhouse") }),
    database: cfg.CLICKHOUSE_DATABASE,
    cluster: cfg.CLICKHOUSE_CLUSTER,
    migrations_applied: applied,
  });
  // A part found damaged at start (a disk that lost writes) is set aside without a word from ClickHouse.
  const detached = await store.detachedParts().catch(() => []);
  if (detached.length > 0) {
    log.warn("clickhouse set aside parts it could not use: their requests are missing from reports, not from billing", {
      parts: detached.map((p) => `${p.table}/${p.name} (${p.reason})`),
    });
  }
} catch (e) {
  log.error("clickhouse migration failed", { err: e });
  process.exit(1);
}

const billing = createServiceClient(BillingService, {
  baseUrl: cfg.BILLING_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
  timeoutMs: 30_000,
});

const stopping = new AbortController();
const service = createAnalyticsService({
  store,
  billing,
  log,
  adminToken: cfg.ADMIN_TOKEN,
  registry: runtime.metrics.registry,
  tracer: runtime.telemetry.tracer,
  stopSignal: stopping.signal,
  ingest: {
    flushRows: cfg.ANALYTICS_FLUSH_ROWS,
    flushIntervalMs: cfg.ANALYTICS_FLUSH_INTERVAL_MS,
    maxBufferedRows: Math.max(cfg.ANALYTICS_MAX_BUFFERED_ROWS, cfg.ANALYTICS_FLUSH_ROWS),
    maxBufferedBytes: cfg.ANALYTICS_MAX_BUFFERED_BYTES,
    billingBatchRows: cfg.ANALYTICS_BILLING_BATCH_ROWS,
    billingConcurrency: cfg.ANALYTICS_BILLING_CONCURRENCY,
  },
});

let rollingUp: Promise<unknown> | undefined;
// Tried every interval while ClickHouse is down: that is logged as it starts and as it ends.
const rollupOutage = createOutageLog(log, {
  failed: "rolling up failed: clickhouse unavailable; the next run retries",
  recovered: "roll-ups run again",
});
const rollupTimer =
  cfg.ANALYTICS_ROLLUP_INTERVAL_MS > 0
    ? setInterval(() => {
        // Stopping, a backlog's run ends after its current chunk rather than holding the shutdown.
        rollingUp ??= store
          .rollUp(undefined, stopping.signal)
          .then((result) => {
            rollupOutage.recovered();
            log.debug("rolled up", { ...result });
          })
          .catch((e) => {
            if (storeUnreachable(e)) rollupOutage.failed({ err: e });
            else log.warn("rolling up failed; the next run retries", { err: e });
          })
          .finally(() => (rollingUp = undefined));
      }, cfg.ANALYTICS_ROLLUP_INTERVAL_MS)
    : undefined;

const server = await listenOrExit(log, "ANALYTICS_PORT", cfg.ANALYTICS_PORT, () =>
  startServer({
    name: "analytics",
    port: cfg.ANALYTICS_PORT,
    routes: analyticsRoutes(service, cfg.ADMIN_TOKEN),
    interceptors: runtime.serverInterceptors,
    readiness: pingReadiness("clickhouse", (timeoutMs) => store.ping(timeoutMs), log),
    registry: runtime.metrics.registry,
    log,
    cors: createCorsPolicy(cfg.CORS_ALLOWED_ORIGINS),
    connectionMaxAgeMs: cfg.CONNECTION_MAX_AGE_MS,
    connectionMaxAgeGraceMs: cfg.CONNECTION_MAX_AGE_GRACE_MS,
  }),
);

signals.serving(async () => {
  // Ingest stops reading, flushes and acks what it holds; its streams then end and the server can close.
  stopping.abort();
  clearInterval(rollupTimer);
  await server.close(cfg.SHUTDOWN_GRACE_MS, cfg.SHUTDOWN_DRAIN_MS);
  // A roll-up statement on a slow server runs until the client's request timeout (45 s), past the 30 s a pod has to
  // stop: it is waited for a few seconds, then given up. Its chunk, not recorded as done, is rolled up again at the
  // next start, replacing any rows the statement still writes; the store is left open, its statement in flight.
  const given = Bun.sleep(rollupStopWaitMs).then(() => false);
  if (await Promise.race([rollingUp?.then(() => true) ?? true, given])) await store.close();
  else {
    log.warn("roll-up still running at shutdown given up; the next start rolls its minutes up", {
      waited_ms: rollupStopWaitMs,
    });
  }
  await runtime.telemetry.shutdown();
});
