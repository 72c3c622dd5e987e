import { hostname } from "node:os";
import type { Interceptor } from "@connectrpc/connect";
import pkg from "../package.json" with { type: "json" };
import { defaultAdminToken, otlpHeaderValues, propagatorNames, type SamplerName, traceExporterNames } from "./config.ts";
import { createLogger, type Logger, type LogLevel } from "./log.ts";
import { createMetrics, type Metrics } from "./metrics.ts";
import { parentPidVar } from "./processes.ts";
import { setupTelemetry, type Telemetry } from "./telemetry.ts";

export interface RuntimeConfig {
  ADMIN_TOKEN: string;
  LOG_LEVEL: LogLevel;
  OTEL_SDK_DISABLED?: boolean | undefined;
  OTEL_TRACES_EXPORTER?: string[] | undefined;
  OTEL_PROPAGATORS?: string[] | undefined;
  OTEL_EXPORTER_OTLP_PROTOCOL?: string | undefined;
  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL?: string | undefined;
  OTEL_BSP_SCHEDULE_DELAY?: number | undefined;
  OTEL_BSP_EXPORT_TIMEOUT?: number | undefined;
  OTEL_BSP_MAX_QUEUE_SIZE?: number | undefined;
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE?: number | undefined;
  OTEL_EXPORTER_OTLP_ENDPOINT?: string | undefined;
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT?: string | undefined;
  OTEL_EXPORTER_OTLP_HEADERS?: string | undefined;
  OTEL_EXPORTER_OTLP_TRACES_HEADERS?: string | undefined;
  OTEL_SERVICE_NAME?: string | undefined;
  OTEL_RESOURCE_ATTRIBUTES?: Record<string, string> | undefined;
  OTEL_TRACES_SAMPLER: SamplerName;
  OTEL_TRACES_SAMPLER_ARG: number;
}

/** Telemetry, logging and metrics of one service process, in the order main.ts needs them. */
export interface Runtime {
  log: Logger;
  telemetry: Telemetry;
  metrics: Metrics;
  /** Tracing then metrics, for startServer. */
  serverInterceptors: Interceptor[];
  /** For clients of other mesh services. */
  clientInterceptors: Interceptor[];
}

/** `instanceId` names this process among the service's replicas in its traces (host name and pid by default). */
export function createRuntime(service: string, config: RuntimeConfig, instanceId = `${hostname()}-${process.pid}`): Runtime {
  const log = createLogger({ service, level: config.LOG_LEVEL });
  const exporters = knownNames(log, "OTEL_TRACES_EXPORTER", config.OTEL_TRACES_EXPORTER, traceExporterNames, "otlp");
  // Disabled or `none`, nowhere to export: spans are not recorded, though trace context still goes onward.
  const otlp = !config.OTEL_SDK_DISABLED && exporters.includes("otlp");
  const telemetry = setupTelemetry({
    service,
    version: pkg.version,
    instanceId,
    serviceName: config.OTEL_SERVICE_NAME,
    resourceAttributes: config.OTEL_RESOURCE_ATTRIBUTES,
    otlpEndpoint: otlp ? config.OTEL_EXPORTER_OTLP_ENDPOINT : undefined,
    otlpTracesEndpoint: otlp ? config.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT : undefined,
    // grpc, warned of below, goes as OpenTelemetry's default does.
    otlpProtocol:
      (config.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? config.OTEL_EXPORTER_OTLP_PROTOCOL) === "http/json"
        ? "http/json"
        : "http/protobuf",
    console: !config.OTEL_SDK_DISABLED && exporters.includes("console"),
    batch: {
      scheduledDelayMillis: config.OTEL_BSP_SCHEDULE_DELAY,
      exportTimeoutMillis: config.OTEL_BSP_EXPORT_TIMEOUT,
      maxQueueSize: config.OTEL_BSP_MAX_QUEUE_SIZE,
      maxExportBatchSize: config.OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    },
    sampler: config.OTEL_TRACES_SAMPLER,
    sampleRatio: config.OTEL_TRACES_SAMPLER_ARG,
    propagators: knownNames(log, "OTEL_PROPAGATORS", config.OTEL_PROPAGATORS, propagatorNames, "tracecontext,baggage"),
    log,
    secrets: otlpHeaderValues(config.OTEL_EXPORTER_OTLP_HEADERS, config.OTEL_EXPORTER_OTLP_TRACES_HEADERS),
  });
  // The general endpoint, where traces go to it.
  const exported = otlp && !config.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  const endpoint = exported ? config.OTEL_EXPORTER_OTLP_ENDPOINT : undefined;
  if (endpoint && /\/v1\/traces\/?$/.test(new URL(endpoint).pathname)) {
    log.warn("OTEL_EXPORTER_OTLP_ENDPOINT ends in /v1/traces, which is appended to it: traces go to .../v1/traces/v1/traces");
  }
  const protocolVariable = config.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
    ? "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    : "OTEL_EXPORTER_OTLP_PROTOCOL";
  if (otlp && config[protocolVariable] === "grpc") {
    log.warn(
      `${protocolVariable} is grpc, which this service does not send: its traces go as OTLP/HTTP (protobuf), so ` +
        "point the endpoint at the collector's OTLP/HTTP port (4318), not its gRPC port (4317), where every export fails",
    );
  }
  if (config.ADMIN_TOKEN === defaultAdminToken) {
    log.warn(
      "ADMIN_TOKEN is unset or the development default, which is published: billing and analytics accept it only " +
        "from this machine (loopback), so services on other hosts or containers cannot use it; " +
        "set a token of your own anywhere but a developer's machine",
    );
  }
  // An error nothing caught (a stray rejection, a throw in a timer) is told in one JSON line like every other, where
  // Bun prints it over many lines that a log pipeline reads as many records; the process carries on, as Bun's does.
  const uncaught = (what: string) => (err: unknown) => log.error(`uncaught: ${what}`, { err });
  process.on("uncaughtException", uncaught("exception"));
  process.on("unhandledRejection", uncaught("promise rejection"));
  const metrics = createMetrics(service);
  return {
    log,
    telemetry,
    metrics,
    serverInterceptors: [telemetry.serverInterceptor, metrics.serverInterceptor],
    clientInterceptors: [metrics.clientInterceptor, telemetry.clientInterceptor],
  };
}

/**
 * The names of a list `variable` (OTEL_TRACES_EXPORTER, say) that are `known`, or `fallback` when it is unset or names
 * none of them. Others are warned of and ignored, as OpenTelemetry's SDKs do: a setting one of them takes never stops
 * the service.
 */
function knownNames<T extends string>(
  log: Logger,
  variable: string,
  names: readonly string[] | undefined,
  known: readonly T[],
  fallback: string,
): T[] {
  const kept = (names ?? []).filter((name): name is T => (known as readonly string[]).includes(name));
  const unknown = (names ?? []).filter((name) => !kept.includes(name as T));
  if (unknown.length > 0) {
    log.warn(
      `${variable} names ${unknown.join(", ")}, which this service does not have (it has ${known.join(", ")}): ` +
        (kept.length > 0 ? "ignored" : `ignored, so ${fallback} is used`),
    );
  }
  return kept.length > 0 ? kept : (fallback.split(",") as T[]);
}

/**
 * Runs `listen`, which opens the port `variable` chose; if that fails (another process holds the port, say), logs one
 * error line naming both, runs `cleanup` (stops what was started so far) and exits 1.
 */
export async function listenOrExit<T>(
  log: Logger,
  variable: string,
  port: number,
  listen: () => T | Promise<T>,
  cleanup?: () => Promise<unknown>,
): Promise<T> {
  try {
    return await listen();
  } catch (e) {
    log.error(`cannot listen on ${variable}`, { variable, port, err: e });
    await cleanup?.().catch((err: unknown) => log.warn("stopping after a failed start failed", { err }));
    process.exit(1);
  }
}

export interface StopSignals {
  /**
   * Adds what a stop before serving must undo (stop a child server, release a lock); a stop signal then runs what was
   * added, the last first, and exits 0.
   */
  undoOnStop(undo: () => unknown): void;
  /** Runs what undoOnStop added, the last first, once: for a start that fails after it (listenOrExit's cleanup). */
  undoStart(): Promise<void>;
  /** `step` of start-up, or once a stop signal has come a promise that never settles: what follows it does not run. */
  unlessStopped<T>(step: Promise<T>): Promise<T>;
  /** From now on SIGTERM or SIGINT runs `stop` (stop accepting, drain, flush) in place of the start-up's undoing. */
  serving(stop: () => Promise<void>): void;
}

/** Not a signal: a stop begun because the process that spawned this one is gone. */
const orphanedSignal = "parent exited";

/**
 * Handles SIGTERM and SIGINT from the start: as pid 1 of a container the kernel drops a signal with no handler (a pod
 * deleted while it migrates waits out its whole grace period for SIGKILL), and elsewhere one would end the process
 * without a word, leaving a child server running. A signal runs `stop` once (exit 0; 1 if it throws), or before
 * `serving` the start-up's undoing; a second signal exits 1 at once. A service spawned by spawnService stops the same
 * way once its spawner is gone. SIGHUP (its terminal closed) stops it too, unless `hangup` is "reload": a process that
 * handles it itself (the gateway rereads its config).
 */
export function stopOnSignals(log: Logger, hangup: "stop" | "reload" = "stop"): StopSignals {
  let stopping = false;
  let stop: (() => Promise<void>) | undefined;
  const undos: (() => unknown)[] = [];
  let undoing: Promise<void> | undefined;
  // Once: a signal during a failed start's undoing waits for it rather than undoing again.
  const undoStart = () =>
    (undoing ??= (async () => {
      for (const undo of undos.reverse()) {
        await (async () => undo())().catch((err: unknown) => log.warn("stopping during start-up failed", { err }));
      }
    })());
  // What started the stop: a stop begun because the parent went is waited out by one signal more (a next launcher
  // clearing what a killed one left sends SIGTERM and waits); any other second signal exits at once.
  let stoppedFor = "";
  const onSignal = (signal: string) => {
    if (stopping && stoppedFor !== orphanedSignal) process.exit(1);
    stoppedFor = signal;
    if (stopping) return;
    stopping = true;
    log.info("stopping", { signal, ...(stop ? {} : { starting: true }) });
    (stop ?? undoStart)().then(
      () => {
        log.info("stopped");
        process.exit(0);
      },
      (e) => {
        log.error("stop failed", { err: e });
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  process.on("SIGINT", () => onSignal("SIGINT"));
  // Unhandled, it would end the process on the spot, leaving what it started (billing's embedded Postgres) running.
  if (hangup === "stop") process.on("SIGHUP", () => onSignal("SIGHUP"));
  // Logs go to pipes that end with whoever reads them (a launcher killed with kill -9): a write to one then fails
  // with EPIPE, which unhandled would end the process on the spot, mid-request or mid-stop.
  for (const out of [process.stdout, process.stderr]) out.on("error", () => {});
  // Spawned by a launcher or a test (spawnService): once that process is gone, a launcher killed with kill -9 or a
  // test run cut short, stop as on SIGTERM rather than run on unwatched, holding ports and data directories.
  const parent = Number(process.env[parentPidVar]);
  if (Number.isSafeInteger(parent) && parent > 0) {
    const orphaned = setInterval(() => {
      if (process.ppid === parent) return;
      clearInterval(orphaned);
      if (!stopping) onSignal(orphanedSignal);
    }, 1_000);
    orphaned.unref();
  }
  return {
    undoOnStop(undo) {
      undos.push(undo);
    },
    undoStart,
    unlessStopped(step) {
      const never = new Promise<never>(() => {});
      return step.then(
        (value) => (stopping ? never : value),
        (e: unknown) => (stopping ? never : Promise.reject(e)),
      );
    },
    serving(serve) {
      stop = serve;
    },
  };
}
