import { hostname } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ulid } from "ulid";
import { z } from "zod";
import { AnalyticsService } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { isKeySecretShaped } from "../lib/auth.ts";
import { ConfigError, commonEnv, env, exitOnArguments, loadEnvOrExit } from "../lib/config.ts";
import { createCorsPolicy } from "../lib/cors.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { createRuntime, listenOrExit, stopOnSignals } from "../lib/runtime.ts";
import { defaultConnectionMaxAgeGraceMs, defaultReadMaxBytes, startServer } from "../lib/server.ts";
import { createKeyAuthorizer, watchKeyChanges } from "./auth.ts";
import { createBodyBudget } from "./body-budget.ts";
import { createBudgetKeeper } from "./budget.ts";
import { breakerStateMetric, createCircuitBreakers } from "./circuit-breaker.ts";
import { type GatewayConfig, parseGatewayConfig, readGatewayConfigText } from "./config.ts";
import { createConfigReloader } from "./config-reload.ts";
import { errorBody, unparsableRequest } from "./errors.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp, exposedHeaders } from "./http/app.ts";
import { serveRest } from "./http/bun.ts";
import { restRoutes } from "./http/node.ts";
import { createMetricsShipper } from "./metrics-pipe.ts";
import { createProviders, defaultMaxAnswerBytes } from "./providers/index.ts";
import { createRateLimiter } from "./rate-limits.ts";
import { startRateSync } from "./rate-sync.ts";
import { createResponseIds, responseIdKey } from "./response-ids.ts";
import { createReadiness } from "./readiness.ts";
import { createGatewayRequestGate, createGatewayService, gatewayRoutes } from "./service.ts";
import { createStalledStreams } from "./stalled-streams.ts";
import { defaultBatchBytes, minBatchBytes } from "./spool.ts";
import { type FileSpool, lockStaleMs, openFileSpool, SpoolInUseError, spoolDirName } from "./spool-file.ts";
import { adoptLeaseJournal, leaseJournalFile, openLeaseJournal } from "./lease-journal.ts";
import { adoptedCalls, callJournalFile, openCallJournal } from "./call-journal.ts";
import { closeTokenizer } from "./tokenizer.ts";

exitOnArguments({
  command: "npm run gateway",
  script: "gateway/main.ts",
  about: "the OpenAI-compatible API and gateway.v1.GatewayService in front of the configured providers",
});
const cfg = loadEnvOrExit({
  ...commonEnv,
  GATEWAY_PORT: env.port(8080),
  /** Also serve the REST API on this port with Bun's native HTTP server (its fast path); unset: only on GATEWAY_PORT. */
  GATEWAY_REST_PORT: env.int(0, 65535).optional(),
  BILLING_URL: env.httpUrl.default("http://127.0.0.1:8081"),
  ANALYTICS_URL: env.httpUrl.default("http://127.0.0.1:8082"),
  /** Routes and prices, YAML or JSON; read again on SIGHUP. */
  GATEWAY_CONFIG: env.setOrUnset(env.filled.trim().default(fileURLToPath(new URL("./config.default.yaml", import.meta.url)))),
  /** Reads GATEWAY_CONFIG this often and reloads it once its content changed (a ConfigMap updated in place); 0: never. */
  // Read on the serving thread: a poll every few milliseconds would take its time for nothing.
  GATEWAY_CONFIG_POLL_MS: env.periodMs(3_600_000, "never").default(0),
  /** Names this replica in metrics; stable per pod in Kubernetes. */
  GATEWAY_INSTANCE_ID: z
    .string()
    .min(1)
    .max(128)
    // It names the replica's spool directory: ".." would put the spool in the directory holding every replica's.
    .refine((id) => id !== "." && id !== "..", "must name a directory: not . or ..")
    .default(`${hostname()}-${process.pid}`),
  /**
   * Seals the Responses API ids clients get, each bound to its org and the provider that made it; every replica must
   * share it. Unset: a key derived from ADMIN_TOKEN. Changing it makes every earlier response id unknown.
   */
  GATEWAY_RESPONSE_ID_SECRET: env.setOrUnset(z.string().min(32, "must be at least 32 characters").optional()),
  GATEWAY_MAX_BODY_BYTES: env.int(1024, 64 * 1024 * 1024).default(4 * 1024 * 1024),
  /**
   * Request-body bytes all requests in flight may hold at once, on every port; past it a request is refused (503,
   * Unavailable) before its body is read. A body held costs about twice its size in memory while its request runs:
   * the default, a quarter of a 512 MiB container, keeps a burst of large (image) requests within it.
   */
  GATEWAY_MAX_INFLIGHT_BODY_BYTES: env.int(1024, 1024 ** 4).default(128 * 1024 * 1024),
  /**
   * Streams whose client has taken none of a write for 2 s that may be held at once, on every port; past it the one
   * stalled longest is cut. Each costs about 10 MB of a pod's memory until its idle limit: the default, about 320 MB,
   * fits a 512 MiB container beside GATEWAY_MAX_INFLIGHT_BODY_BYTES' bodies.
   */
  GATEWAY_MAX_STALLED_STREAMS: env.int(1, 1_000_000).default(32),
  /** The most of an upstream's whole (not streamed) answer read; past it the attempt fails. */
  GATEWAY_MAX_UPSTREAM_ANSWER_BYTES: env.int(1024 * 1024, 1024 * 1024 * 1024).default(defaultMaxAnswerBytes),
  /**
   * Upstream calls Bun's fetch runs at once (Bun reads it at start; 256 unless set): the others wait inside fetch with
   * their attempt's time running, so a busy replica would time out calls its upstreams never saw.
   */
  BUN_CONFIG_MAX_HTTP_REQUESTS: env.int(1, 65_535).default(256),
  GATEWAY_KEY_CACHE_TTL_MS: env.int(0, 3_600_000).default(30_000),
  /** Key cache TTL while billing's key change stream is down. */
  GATEWAY_KEY_CACHE_FALLBACK_TTL_MS: env.int(0, 3_600_000).default(1000),
  /** How long a key billing vouched for keeps working while billing cannot be asked; 0: a 503 once its TTL is over. */
  GATEWAY_KEY_STALE_SECONDS: env.int(0, 86_400).default(300),
  /** Whole-request limit (attempts, backoff, fallbacks, stream) of models that set no request_timeout_ms. */
  GATEWAY_REQUEST_TIMEOUT_MS: env.int(1, 3_600_000).default(600_000),
  GATEWAY_RETRY_BASE_MS: env.int(0, 60_000).default(100),
  GATEWAY_RETRY_MAX_MS: env.int(0, 600_000).default(2000),
  /** An upstream Retry-After longer than this moves on to the next target instead of waiting. */
  GATEWAY_RETRY_AFTER_MAX_MS: env.int(0, 600_000).default(5000),
  /** Consecutive failures that open a target's circuit breaker. */
  GATEWAY_BREAKER_FAILURES: env.int(1, 1000).default(5),
  GATEWAY_BREAKER_COOLDOWN_MS: env.int(1, 3_600_000).default(30_000),
  /** Output tokens budgeted for requests without max_tokens on models that set no max_output_tokens. */
  GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS: env.int(1, 10_000_000).default(4096),
  /** Lifetime of budget leases; must exceed the longest request time limit by 10 s. */
  GATEWAY_BUDGET_LEASE_TTL_S: env.int(20, 3600).default(900),
  /** A new lease covers about this many seconds of the budget's recent spend. */
  GATEWAY_BUDGET_LEASE_HORIZON_S: env.int(1, 3600).default(60),
  GATEWAY_BUDGET_MIN_LEASE_NANOS: env.bigint(1n).default(1_000_000n),
  GATEWAY_BUDGET_MAX_LEASE_NANOS: env.bigint(1n).default(10_000_000_000n),
  /**
   * Sends billing this replica's per-minute counts and learns the other replicas' this often, so requests_per_minute
   * and tokens_per_minute hold across replicas; 0: each replica counts alone. Each sync is a billing call: more than 20
   * a second per replica would load billing for little.
   */
  GATEWAY_RATE_SYNC_MS: env.periodMs(10_000, "off").default(250),
  /** Holds one metrics spool directory per replica (named by GATEWAY_INSTANCE_ID); default <MESH_DATA_DIR>/spool. */
  GATEWAY_SPOOL_DIR: z.string().trim().min(1).optional(),
  GATEWAY_SPOOL_MAX_BYTES: env.int(1024 * 1024, 1024 ** 4).default(256 * 1024 * 1024),
  /** always: fdatasync per request; interval: every GATEWAY_SPOOL_FSYNC_INTERVAL_MS; never: the OS decides. */
  GATEWAY_SPOOL_FSYNC: z.string().trim().pipe(z.enum(["always", "interval", "never"])).default("interval"),
  GATEWAY_SPOOL_FSYNC_INTERVAL_MS: env.int(1, 60_000).default(1000),
  GATEWAY_METRICS_BATCH_ROWS: env.int(1, 10_000).default(1000),
  /**
   * A batch is also sealed at this many bytes of encoded rows: at least room for several of the largest rows the
   * request checks allow (about 40 KB each), at most half of what analytics accepts in one message.
   */
  GATEWAY_METRICS_BATCH_BYTES: env.int(minBatchBytes, defaultReadMaxBytes / 2).default(defaultBatchBytes),
  GATEWAY_METRICS_INTERVAL_MS: env.int(1, 60_000).default(100),
  /** How long SIGTERM waits for analytics to ack the last metrics. */
  GATEWAY_FLUSH_TIMEOUT_MS: env.int(0, 600_000).default(5000),
});

// Two ports of 0 are two free ports, whichever the system picks.
if (cfg.GATEWAY_REST_PORT !== undefined && cfg.GATEWAY_REST_PORT !== 0 && cfg.GATEWAY_REST_PORT === cfg.GATEWAY_PORT) {
  process.stderr.write(`invalid environment: GATEWAY_REST_PORT (${cfg.GATEWAY_REST_PORT}): must differ from GATEWAY_PORT\n`);
  process.exit(2);
}

// A range whose least is past its most: one of the two would be quietly ignored.
for (const [least, most] of [
  ["GATEWAY_BUDGET_MIN_LEASE_NANOS", "GATEWAY_BUDGET_MAX_LEASE_NANOS"],
  ["GATEWAY_RETRY_BASE_MS", "GATEWAY_RETRY_MAX_MS"],
  // A body of the largest size allowed could never be read.
  ["GATEWAY_MAX_BODY_BYTES", "GATEWAY_MAX_INFLIGHT_BODY_BYTES"],
] as const) {
  if (cfg[least] > cfg[most]) {
    process.stderr.write(`invalid environment: ${least} (${cfg[least]}): must not exceed ${most} (${cfg[most]})\n`);
    process.exit(2);
  }
}

let config: GatewayConfig;
/** What GATEWAY_CONFIG held at start: a poll reloads it once it changes. */
let configText: string;
try {
  configText = readGatewayConfigText(cfg.GATEWAY_CONFIG);
  config = parseGatewayConfig(configText, cfg.GATEWAY_CONFIG);
} catch (e) {
  if (!(e instanceof ConfigError)) throw e;
  process.stderr.write(`${e.message}\n`);
  process.exit(2);
}

/** The longest whole-request time limit of `config`'s models, or the default's, in ms. */
const longestRequestMsOf = (config: GatewayConfig) =>
  Math.max(cfg.GATEWAY_REQUEST_TIMEOUT_MS, ...[...config.models.values()].map((m) => m.requestTimeoutMs ?? 0));
// Leases must outlive every request that reserves on them, or billing could regrant money still in use.
const longestRequestMs = longestRequestMsOf(config);
if (cfg.GATEWAY_BUDGET_LEASE_TTL_S * 1000 < longestRequestMs + 10_000) {
  process.stderr.write(
    `GATEWAY_BUDGET_LEASE_TTL_S: ${cfg.GATEWAY_BUDGET_LEASE_TTL_S} s must exceed the longest request time limit (${longestRequestMs} ms) by 10 s\n`,
  );
  process.exit(2);
}

const runtime = createRuntime("gateway", cfg, cfg.GATEWAY_INSTANCE_ID);
const { log } = runtime;
// A stop signal while it waits for an old spool LOCK ends the start; once the spool is open, its LOCK is released.
const signals = stopOnSignals(log, "reload");
// SIGHUP reloads GATEWAY_CONFIG once the gateway serves (see configReloader below); unhandled, it would end the process.
let reloadConfig = () => log.warn("SIGHUP while the gateway starts: the config it starts with was read already; send it again");
process.on("SIGHUP", () => reloadConfig());

if (cfg.BUN_CONFIG_MAX_HTTP_REQUESTS < 1024) {
  log.warn("upstream calls past this many at once wait inside fetch: set BUN_CONFIG_MAX_HTTP_REQUESTS (4096 in the image)", {
    max_http_requests: cfg.BUN_CONFIG_MAX_HTTP_REQUESTS,
  });
}

const providerOptions: Parameters<typeof createProviders>[2] = {
  onMissingKey: (provider, variable) => log.warn("provider has no API key; its models fail until it is set", { provider, variable }),
  secrets: [cfg.ADMIN_TOKEN, ...(cfg.GATEWAY_RESPONSE_ID_SECRET ? [cfg.GATEWAY_RESPONSE_ID_SECRET] : [])],
  maxAnswerBytes: cfg.GATEWAY_MAX_UPSTREAM_ANSWER_BYTES,
};
let providers: ReturnType<typeof createProviders>;
try {
  providers = createProviders(config.providers, process.env, providerOptions);
} catch (e) {
  if (!(e instanceof ConfigError)) throw e;
  process.stderr.write(`${e.message}\n`);
  process.exit(2);
}
const billingTimeoutMs = 2000;
const billing = createServiceClient(BillingService, {
  baseUrl: cfg.BILLING_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
  timeoutMs: billingTimeoutMs,
});
const analytics = createServiceClient(AnalyticsService, {
  baseUrl: cfg.ANALYTICS_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
});

const keys = createKeyAuthorizer({
  billing,
  hitTtlMs: cfg.GATEWAY_KEY_CACHE_TTL_MS,
  fallbackTtlMs: cfg.GATEWAY_KEY_CACHE_FALLBACK_TTL_MS,
  staleMs: cfg.GATEWAY_KEY_STALE_SECONDS * 1000,
  log,
  registry: runtime.metrics.registry,
  // A key billing now refuses gives its budget leases back, even if its revocation was not heard on the stream.
  onRefused: (apiKeyId, refusedAt) => budget.releaseKey(apiKeyId, refusedAt),
  // Billing makes every key's secret in one shape: any other token is refused here, billing not asked.
  keyShaped: isKeySecretShaped,
});
let spool: FileSpool | undefined;
// A LOCK left by a process that cannot be checked from here (the container before this one, in a pod) is
// waited out; one of a live process of this host and container is a configuration error.
const lockDeadline = Date.now() + lockStaleMs + 5000;
let waited = false;
while (!spool) {
  try {
    spool = openFileSpool({
      root: cfg.GATEWAY_SPOOL_DIR ?? join(cfg.MESH_DATA_DIR, "spool"),
      name: spoolDirName(cfg.GATEWAY_INSTANCE_ID),
      maxBytes: cfg.GATEWAY_SPOOL_MAX_BYTES,
      fsync: cfg.GATEWAY_SPOOL_FSYNC,
      fsyncIntervalMs: cfg.GATEWAY_SPOOL_FSYNC_INTERVAL_MS,
      batchRows: cfg.GATEWAY_METRICS_BATCH_ROWS,
      batchBytes: cfg.GATEWAY_METRICS_BATCH_BYTES,
      log: log.child({ component: "spool" }),
      sidecars: [
        { file: leaseJournalFile, adopt: (orphanDir, ownDir) => adoptLeaseJournal(orphanDir, ownDir, log) },
        { file: callJournalFile, rows: (orphanDir, lastRow) => adoptedCalls(orphanDir, lastRow, log) },
      ],
    });
  } catch (e) {
    if (e instanceof SpoolInUseError && e.mayGoStale && Date.now() < lockDeadline) {
      if (!waited) {
        log.warn("metrics spool locked by a process that cannot be checked from here; waiting for its lock to go stale", {
          dir: e.dir,
          pid: e.pid,
        });
      }
      waited = true;
      await Bun.sleep(1000);
      continue;
    }
    log.error("cannot open the metrics spool", { err: e });
    process.exit(1);
  }
}
log.info("metrics spool open", { dir: spool.dir, ...spool.recovery });
const openSpool = spool;
signals.undoOnStop(() => openSpool.close());
const leaseJournal = openLeaseJournal(spool.dir, log.child({ component: "budget" }));
const budget = createBudgetKeeper({
  billing,
  holder: cfg.GATEWAY_INSTANCE_ID,
  leaseTtlSeconds: cfg.GATEWAY_BUDGET_LEASE_TTL_S,
  leaseHorizonSeconds: cfg.GATEWAY_BUDGET_LEASE_HORIZON_S,
  minLeaseNanos: cfg.GATEWAY_BUDGET_MIN_LEASE_NANOS,
  maxLeaseNanos: cfg.GATEWAY_BUDGET_MAX_LEASE_NANOS,
  billingWaitMs: billingTimeoutMs,
  log: log.child({ component: "budget" }),
  registry: runtime.metrics.registry,
  // A check found billing unreachable, or its change stream has gone silent (before any request asks, in a lull).
  billingDown: () => keys.billingDown() || !keyChanges.healthy(),
  journal: leaseJournal,
  // The shipper is made below; asked only as requests settle and grants are asked for, once it is.
  ingest: { recordedRows: () => shipper.recordedRows(), ackedRows: () => shipper.ackedRows() },
  inherited: {
    leaseIds: leaseJournal.inherited,
    spent: leaseJournal.inheritedSpent,
    recorded: inheritedUsageRecorded(spool),
  },
});
const keyChanges = watchKeyChanges({
  billing,
  keys,
  onRevoked: (apiKeyId) => budget.releaseKey(apiKeyId),
  log: log.child({ component: "key-changes" }),
  registry: runtime.metrics.registry,
});
const shipper = createMetricsShipper({
  client: analytics,
  spool,
  instanceId: cfg.GATEWAY_INSTANCE_ID,
  log: log.child({ component: "metrics-pipe" }),
  batchRows: cfg.GATEWAY_METRICS_BATCH_ROWS,
  batchBytes: cfg.GATEWAY_METRICS_BATCH_BYTES,
  intervalMs: cfg.GATEWAY_METRICS_INTERVAL_MS,
  registry: runtime.metrics.registry,
});
// Calls a killed process left unfinished here are recorded as interrupted before any new one is noted.
const calls = openCallJournal(spool.dir, {
  lastRow: spool.lastRow,
  record: (metrics) => shipper.record(metrics),
  log: log.child({ component: "calls" }),
});
shipper.start();
signals.undoOnStop(async () => {
  await keyChanges.stop();
  await shipper.close();
  leaseJournal.close();
  calls.close();
});

const rateLimits = createRateLimiter({ registry: runtime.metrics.registry });
const rateSync =
  cfg.GATEWAY_RATE_SYNC_MS > 0
    ? startRateSync({
        billing,
        limiter: rateLimits,
        holder: cfg.GATEWAY_INSTANCE_ID,
        intervalMs: cfg.GATEWAY_RATE_SYNC_MS,
        timeoutMs: billingTimeoutMs,
        log: log.child({ component: "rate-sync" }),
        registry: runtime.metrics.registry,
      })
    : undefined;
signals.undoOnStop(() => rateSync?.close());

const breakers = createCircuitBreakers({
  failureThreshold: cfg.GATEWAY_BREAKER_FAILURES,
  cooldownMs: cfg.GATEWAY_BREAKER_COOLDOWN_MS,
  onChange: (target, state) => log.warn("circuit breaker changed", { target, state }),
});
breakerStateMetric(runtime.metrics.registry, breakers);
const core = createGatewayCore({
  config,
  providers,
  keys,
  shipper,
  instanceId: cfg.GATEWAY_INSTANCE_ID,
  log,
  registry: runtime.metrics.registry,
  routing: {
    breakers,
    requestTimeoutMs: cfg.GATEWAY_REQUEST_TIMEOUT_MS,
    backoffBaseMs: cfg.GATEWAY_RETRY_BASE_MS,
    backoffMaxMs: cfg.GATEWAY_RETRY_MAX_MS,
    maxRetryAfterMs: cfg.GATEWAY_RETRY_AFTER_MAX_MS,
  },
  rateLimits,
  budget,
  defaultMaxOutputTokens: cfg.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS,
  calls,
  responseIds: createResponseIds(responseIdKey(cfg.GATEWAY_RESPONSE_ID_SECRET, cfg.ADMIN_TOKEN)),
});
const service = createGatewayService(core);

// A model may not get a longer request time limit than the gateway started with: budget lease lifetimes and
// connection ages were sized by it.
const configReloader = createConfigReloader({
  path: cfg.GATEWAY_CONFIG,
  initialText: configText,
  pollMs: cfg.GATEWAY_CONFIG_POLL_MS,
  log,
  registry: runtime.metrics.registry,
  apply(text) {
    const next = parseGatewayConfig(text, cfg.GATEWAY_CONFIG);
    const longest = longestRequestMsOf(next);
    if (longest > longestRequestMs) {
      throw new ConfigError(
        `a request time limit of ${longest} ms is longer than the gateway started with (${longestRequestMs} ms), which its budget leases and connections are sized by: restart the gateway to raise it`,
      );
    }
    const nextProviders = createProviders(next.providers, process.env, providerOptions);
    core.reconfigure(next, nextProviders);
    return { models: next.models.size, providers: nextProviders.size };
  },
});
reloadConfig = () => configReloader.reload();
const bodies = createBodyBudget({ maxBytes: cfg.GATEWAY_MAX_INFLIGHT_BODY_BYTES, registry: runtime.metrics.registry });
const stalls = createStalledStreams({ max: cfg.GATEWAY_MAX_STALLED_STREAMS, registry: runtime.metrics.registry });
const rest = createRestApp({ core, tracer: runtime.telemetry.tracer, maxBodyBytes: cfg.GATEWAY_MAX_BODY_BYTES });

const cors = createCorsPolicy(cfg.CORS_ALLOWED_ORIGINS, exposedHeaders);
const server = await listenOrExit(log, "GATEWAY_PORT", cfg.GATEWAY_PORT, () =>
  startServer({
    name: "gateway",
    port: cfg.GATEWAY_PORT,
    routes: gatewayRoutes(service, cfg.GATEWAY_MAX_BODY_BYTES, bodies),
    interceptors: runtime.serverInterceptors,
    requestGate: createGatewayRequestGate(core, cfg.GATEWAY_MAX_BODY_BYTES),
    http: restRoutes(rest, { bodies }),
    writeStalls: stalls,
    readiness: createReadiness({ billingUrl: cfg.BILLING_URL, shipper, keysVouchedLately: keys.vouchedLately, log }),
    registry: runtime.metrics.registry,
    log,
    readMaxBytes: cfg.GATEWAY_MAX_BODY_BYTES,
    cors,
    // A request its parser refuses is answered in OpenAI's error shape too, with a request id.
    unparsable: (status, message) => ({
      headers: { "x-request-id": ulid() },
      body: errorBody(unparsableRequest(status, message)),
    }),
    connectionMaxAgeMs: cfg.CONNECTION_MAX_AGE_MS,
    // A request (a streamed completion) may run for as long as its time limit, past the connection's age.
    connectionMaxAgeGraceMs:
      cfg.CONNECTION_MAX_AGE_GRACE_MS ?? Math.max(defaultConnectionMaxAgeGraceMs, longestRequestMs),
  }),
  // Releases the spool's LOCK, which the next start (the next container of a pod) would otherwise wait out.
  () => signals.undoStart(),
);
const restPort = cfg.GATEWAY_REST_PORT;
const fastRest =
  restPort === undefined
    ? undefined
    : await listenOrExit(
        log,
        "GATEWAY_REST_PORT",
        restPort,
        () => serveRest(rest, { port: restPort, maxBodyBytes: cfg.GATEWAY_MAX_BODY_BYTES, log, cors, bodies, stalls }),
        () => signals.undoStart(),
      );
log.info("gateway started", { models: config.models.size, instance: cfg.GATEWAY_INSTANCE_ID, url: server.url, rest_url: fastRest?.url });

signals.serving(async () => {
  configReloader.stop();
  // Requests still running when the grace is over are told so (a 503, an error event) before their connections close.
  let cut = false;
  const cutInFlight = () => {
    if (cut) return;
    cut = true;
    log.warn("requests still running at the end of the shutdown grace period cut", { requests: core.cutInFlight() });
  };
  await Promise.all([
    server.close(cfg.SHUTDOWN_GRACE_MS, cfg.SHUTDOWN_DRAIN_MS, cutInFlight),
    fastRest?.close(cfg.SHUTDOWN_GRACE_MS, cfg.SHUTDOWN_DRAIN_MS, cutInFlight),
  ]);
  // Streams cut at the end of the grace period record what they sent (counting it takes a moment) before the flush.
  // Those still waiting (on billing, say) are metered as cut now: the spool closes below and nothing records after.
  if (!(await core.settled(5_000))) {
    log.warn("requests still unfinished at shutdown metered as cancelled", { requests: core.cutUnfinished() });
  }
  // In-flight requests have settled: hand every lease back with what was spent from it, and tell billing the last of
  // what they counted in their keys' minutes.
  await Promise.all([budget.close(), rateSync?.close()]);
  leaseJournal.close();
  calls.close();
  await keyChanges.stop();
  if (!(await shipper.flush(cfg.GATEWAY_FLUSH_TIMEOUT_MS))) {
    log.error("request metrics not acked by analytics before exit", { rows: shipper.status().rows });
  }
  await shipper.close();
  spool.close();
  // Nothing is metered past the spool: the thread counting tokens goes too.
  closeTokenizer();
  await runtime.telemetry.shutdown();
});

/**
 * Whether the rows an earlier process left in the spool (sealed into batches at open) are all acked: analytics acks a
 * batch once billing has recorded its usage, with what it charged each budget lease.
 */
function inheritedUsageRecorded(spool: FileSpool): () => boolean {
  const last = [...spool.unacked()].at(-1)?.sequence;
  // Rows the open could not seal go into a batch later: then only an empty spool says they are acked.
  if (spool.pendingRows > 0) return () => spool.rows === 0;
  return () => {
    if (last === undefined) return true;
    for (const batch of spool.unacked()) return batch.sequence > last;
    return true;
  };
}
