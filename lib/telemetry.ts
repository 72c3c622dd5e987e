import {
  type Attributes,
  context,
  diag,
  DiagLogLevel,
  propagation,
  type Span,
  SpanKind,
  type SpanOptions,
  SpanStatusCode,
  type TextMapGetter,
  type TextMapPropagator,
  type TextMapSetter,
  trace,
  type Tracer,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import {
  CompositePropagator,
  ExportResultCode,
  hrTimeToMilliseconds,
  hrTimeToTimeStamp,
  W3CBaggagePropagator,
  W3CTraceContextPropagator,
} from "@opentelemetry/core";
import { OTLPTraceExporter as OTLPJsonTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { OTLPTraceExporter as OTLPProtobufTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { B3InjectEncoding, B3Propagator } from "@opentelemetry/propagator-b3";
import { defaultResource, resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  type ReadableSpan,
  type Sampler,
  SimpleSpanProcessor,
  type SpanExporter,
  type SpanProcessor,
  TraceIdRatioBasedSampler,
  TracerProvider,
} from "@opentelemetry/sdk-trace";
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from "@opentelemetry/semantic-conventions";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { PropagatorName, SamplerName } from "./config.ts";
import { type Logger, redactSecrets } from "./log.ts";
import { inContext, onStreamEnd } from "./streams.ts";

export interface TelemetryOptions {
  service: string;
  version: string;
  /** This process among the service's replicas (`service.instance.id`). */
  instanceId?: string;
  /** OTEL_SERVICE_NAME: the spans' service.name in place of `service`. */
  serviceName?: string | undefined;
  /** OTEL_RESOURCE_ATTRIBUTES: added to the spans' resource, over `version` and `instanceId` (not over serviceName). */
  resourceAttributes?: Record<string, string> | undefined;
  /** OTLP/HTTP base endpoint, e.g. http://collector:4318; traces go to <endpoint>/v1/traces. */
  otlpEndpoint?: string | undefined;
  /** OTLP/HTTP traces endpoint, used as it is, over otlpEndpoint (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). */
  otlpTracesEndpoint?: string | undefined;
  /** OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: how spans are encoded for the OTLP/HTTP endpoint (default http/protobuf). */
  otlpProtocol?: "http/protobuf" | "http/json";
  /** OTEL_BSP_*: how spans are batched for the OTLP exporter (SDK defaults, but 500 ms between exports). */
  batch?: {
    scheduledDelayMillis?: number | undefined;
    exportTimeoutMillis?: number | undefined;
    maxQueueSize?: number | undefined;
    maxExportBatchSize?: number | undefined;
  };
  /** OTEL_TRACES_SAMPLER (default parentbased_traceidratio). */
  sampler?: SamplerName;
  /** Fraction of traces the traceidratio samplers sample, 0..1 (default 1). */
  sampleRatio?: number;
  /** OTEL_TRACES_EXPORTER=console: each span, as it ends, is one info line of `log`. */
  console?: boolean;
  /**
   * OTEL_PROPAGATORS: the headers a caller's trace context is read from and sent onward in, every one of them
   * (default W3C's traceparent and baggage); `none` alone, none.
   */
  propagators?: readonly PropagatorName[];
  /** Extra exporter, exported synchronously (tests pass an InMemorySpanExporter). */
  exporter?: SpanExporter;
  /** Where OpenTelemetry's own warnings and errors go (failed exports among them); nowhere when unset. */
  log?: Logger;
  /**
   * Values redacted from those warnings and errors besides key-shaped words: the OTLP headers' credentials, which a
   * collector refusing an export may quote back in the answer the exporter's error carries.
   */
  secrets?: readonly string[];
  /** How long shutdown waits for the last spans to be exported (default 3 s). */
  shutdownTimeoutMs?: number;
}

export interface Telemetry {
  tracer: Tracer;
  /** Opens a server span per RPC, continuing the caller's trace context. */
  serverInterceptor: Interceptor;
  /** Opens a client span per RPC and injects its trace context into the request headers. */
  clientInterceptor: Interceptor;
  /** Exports the last spans, for `shutdownTimeoutMs` at most; never rejects (a failure is logged). */
  shutdown(): Promise<void>;
}

let installed = false;

/** Installs the global tracer provider, context manager and propagators. Call first in main.ts. */
export function setupTelemetry(options: TelemetryOptions): Telemetry {
  if (options.log) logDiagnostics(options.log, options.secrets);
  const processors: SpanProcessor[] = [];
  const base = options.otlpEndpoint?.replace(/\/$/, "");
  const url = options.otlpTracesEndpoint ?? (base && `${base}/v1/traces`);
  if (url) {
    const { scheduledDelayMillis = 500, exportTimeoutMillis, maxQueueSize, maxExportBatchSize } = options.batch ?? {};
    // Both read OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION and the certificates, and their _TRACES_ forms.
    const OTLPTraceExporter = options.otlpProtocol === "http/json" ? OTLPJsonTraceExporter : OTLPProtobufTraceExporter;
    processors.push(
      new BatchSpanProcessor({
        exporter: new OTLPTraceExporter({ url }),
        scheduledDelayMillis,
        ...(exportTimeoutMillis !== undefined && { exportTimeoutMillis }),
        ...(maxQueueSize !== undefined && { maxQueueSize }),
        ...(maxExportBatchSize !== undefined && { maxExportBatchSize }),
      }),
    );
  }
  if (options.console && options.log) {
    processors.push(new SimpleSpanProcessor({ exporter: logExporter(options.log) }));
  }
  if (options.exporter) processors.push(new SimpleSpanProcessor({ exporter: options.exporter }));
  const provider = new TracerProvider({
    // The SDK's telemetry.sdk.* attributes, the service's own, then the operator's, as OpenTelemetry SDKs merge them.
    resource: defaultResource().merge(
      resourceFromAttributes({
        [ATTR_SERVICE_NAME]: options.service,
        [ATTR_SERVICE_VERSION]: options.version,
        // Still incubating in the conventions, so not in their stable entry point.
        ...(options.instanceId && { "service.instance.id": options.instanceId }),
        ...options.resourceAttributes,
        ...(options.serviceName && { [ATTR_SERVICE_NAME]: options.serviceName }),
      }),
    ),
    // With nowhere to export, record nothing but what a caller's traceparent asks a parent-based sampler for: spans still
    // carry context (ids in logs, traceparent onward), and a span not recorded would send the caller's decision onward
    // as unsampled, so billing, analytics and upstreams that trace would drop the caller's trace.
    sampler: createSampler(options.sampler ?? "parentbased_traceidratio", options.sampleRatio ?? 1, processors.length > 0),
    spanProcessors: processors,
  });
  if (!installed) {
    // Globals can be set once per process; tests that start several services share them.
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    installed = true;
  }
  // The last service set up in a process decides (each test's its own), as the propagators are the process's.
  propagation.disable();
  propagation.setGlobalPropagator(
    new CompositePropagator({
      propagators: (options.propagators ?? ["tracecontext", "baggage"]).flatMap((name) => propagators[name]()),
    }),
  );
  trace.setGlobalTracerProvider(provider);
  const tracer = provider.getTracer(options.service, options.version);
  return {
    tracer,
    serverInterceptor: rpcServerTracing(tracer),
    clientInterceptor: rpcClientTracing(tracer),
    async shutdown() {
      // A collector that is down or hung costs the last spans, not the exit code or seconds of the termination grace
      // (the exporter retries a refused export for 7 s, and waits 10 s for an answer).
      const timeoutMs = options.shutdownTimeoutMs ?? 3000;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const expired = new Promise<Error>((resolve) => {
        timer = setTimeout(() => resolve(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      });
      const err = await Promise.race([provider.shutdown().then(() => undefined, (e: unknown) => e), expired]);
      clearTimeout(timer);
      if (err !== undefined) options.log?.error("opentelemetry: spans not exported at shutdown", { err });
    },
  };
}

/** OTEL_PROPAGATORS' names. B3's propagator reads both of its forms, whichever it sends. */
const propagators: Record<PropagatorName, () => TextMapPropagator[]> = {
  tracecontext: () => [new W3CTraceContextPropagator()],
  baggage: () => [new W3CBaggagePropagator()],
  b3: () => [new B3Propagator({ injectEncoding: B3InjectEncoding.SINGLE_HEADER })],
  b3multi: () => [new B3Propagator({ injectEncoding: B3InjectEncoding.MULTI_HEADER })],
  none: () => [],
};

/**
 * The sampler OTEL_TRACES_SAMPLER names. One that is not parent-based decides alone, whatever a caller's traceparent
 * asks: clients on the internet cannot have every request they send traced. Not `exporting`, it samples nothing itself.
 */
function createSampler(name: SamplerName, ratio: number, exporting: boolean): Sampler {
  const own = !exporting || name.endsWith("always_off")
    ? new AlwaysOffSampler()
    : name.endsWith("traceidratio")
      ? new TraceIdRatioBasedSampler(ratio)
      : new AlwaysOnSampler();
  return name.startsWith("parentbased_") ? new ParentBasedSampler({ root: own }) : own;
}

/**
 * Writes each span as one JSON line of `log`, as the service's other lines are (OpenTelemetry's console exporter prints
 * an object over many lines, which a log pipeline reads as many records). Attributes' text passes redactSecrets.
 */
function logExporter(log: Logger): SpanExporter {
  const kinds = ["internal", "server", "client", "producer", "consumer"];
  const statuses = ["unset", "ok", "error"];
  const line = (span: ReadableSpan) => {
    const { traceId, spanId } = span.spanContext();
    log.info("span", {
      trace_id: traceId,
      span_id: spanId,
      ...(span.parentSpanContext && { parent_span_id: span.parentSpanContext.spanId }),
      name: span.name,
      kind: kinds[span.kind],
      start: hrTimeToTimeStamp(span.startTime),
      duration_ms: hrTimeToMilliseconds(span.duration),
      status: statuses[span.status.code],
      ...(span.status.message && { status_message: span.status.message }),
      attributes: Object.fromEntries(
        Object.entries(span.attributes).map(([k, v]) => [k, typeof v === "string" ? redactSecrets(v) : v]),
      ),
    });
  };
  return {
    export(spans, done) {
      for (const span of spans) line(span);
      done({ code: ExportResultCode.SUCCESS });
    },
    shutdown: async () => {},
  };
}

/** A message OpenTelemetry repeats (an export to a collector that is down, every 500 ms) is logged once this often. */
export const diagnosticEveryMs = 60_000;

/**
 * What makes a diagnostic a repeat of another: a failed export's error (its properties as JSON) without the collector's
 * answer (`data`), which may differ at every export (a request id, a time) while the failure stays the same.
 */
function repeatOf(message: string): string {
  if (!message.startsWith("{")) return message;
  try {
    const { data: _, ...error } = JSON.parse(message) as Record<string, unknown>;
    return JSON.stringify(error);
  } catch {
    return message;
  }
}

/** Sends OpenTelemetry's warnings and errors, an export's failure among them, to `log`, `secrets` redacted. */
function logDiagnostics(log: Logger, secrets: readonly string[] = []): void {
  const lastLogged = new Map<string, number>();
  // Longest first, so a value that holds another is redacted whole.
  const known = [...new Set(secrets)].sort((a, b) => b.length - a.length);
  const emit =
    (level: "warn" | "error") =>
    (raw: string, ...args: unknown[]) => {
      // A failed export's message is its error's properties, the collector's answer among them.
      const message = redactSecrets(raw, known);
      const key = repeatOf(message);
      const now = Date.now();
      if (now - (lastLogged.get(key) ?? -Infinity) < diagnosticEveryMs) return;
      // Messages that vary without end (ones naming a span) cannot grow the map past a bound.
      if (lastLogged.size >= 1000) lastLogged.clear();
      lastLogged.set(key, now);
      const details = args.map((a) => redactSecrets(String(a), known));
      log[level](`opentelemetry: ${message}`, args.length > 0 ? { details } : undefined);
    };
  const ignore = () => {};
  diag.setLogger(
    { error: emit("error"), warn: emit("warn"), info: ignore, debug: ignore, verbose: ignore },
    { logLevel: DiagLogLevel.WARN, suppressOverrideMessage: true },
  );
}

const headerGetter: TextMapGetter<Headers> = {
  keys: (h) => [...h.keys()],
  get: (h, key) => h.get(key) ?? undefined,
};
const headerSetter: TextMapSetter<Headers> = { set: (h, key, value) => h.set(key, value) };

/** The trace context of incoming headers, in the formats OTEL_PROPAGATORS names (also used by the REST API). */
export function extractContext(headers: Headers) {
  return propagation.extract(context.active(), headers, headerGetter);
}

/**
 * The headers that carry the active trace context onward, in the formats OTEL_PROPAGATORS names, for a call that no
 * interceptor sees (an upstream's HTTP request); none when there is no context to carry. Baggage stays behind: it is
 * whatever the client put there, and an upstream is a third party (api.openai.com), not a service of the mesh.
 */
export function outgoingTraceHeaders(): Record<string, string> {
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  delete carrier.baggage;
  return carrier;
}

/**
 * An RPC span's attributes, `rpc.system` by the protocol its content type names: `grpc` for gRPC and gRPC-Web (which
 * OpenTelemetry's conventions give no value of its own), `connect_rpc` for the Connect protocol (application/proto,
 * application/json, application/connect+...).
 */
function rpcAttributes(req: { service: { typeName: string }; method: { name: string }; header: Headers }) {
  const grpc = /^application\/grpc(?:-web)?(?:[+;]|$)/i.test(req.header.get("content-type") ?? "");
  return { "rpc.system": grpc ? "grpc" : "connect_rpc", "rpc.service": req.service.typeName, "rpc.method": req.method.name };
}

function rpcServerTracing(tracer: Tracer): Interceptor {
  return (next) => async (req) => {
    const parent = extractContext(req.header);
    const name = `${req.service.typeName}/${req.method.name}`;
    return tracer.startActiveSpan(
      name,
      { kind: SpanKind.SERVER, attributes: rpcAttributes(req) },
      parent,
      async (span) => {
        const res = await next(req).catch((e: unknown) => finishWith(span, () => Promise.reject(e), serverErrors));
        if (!res.stream) return finishWith(span, async () => succeeded(span, res), serverErrors);
        // A stream's messages are made after the handler returns: its span ends with the stream and they are made in it.
        const ended = (error?: unknown) =>
          void finishWith(
            span,
            async () => {
              if (error !== undefined) throw error;
              succeeded(span, undefined);
            },
            serverErrors,
          ).catch(() => {});
        return { ...res, message: onStreamEnd(inContext(res.message, context.active()), ended) };
      },
    );
  };
}

function rpcClientTracing(tracer: Tracer): Interceptor {
  return (next) => async (req) => {
    const name = `${req.service.typeName}/${req.method.name}`;
    return tracer.startActiveSpan(
      name,
      { kind: SpanKind.CLIENT, attributes: rpcAttributes(req) },
      (span) => {
        propagation.inject(context.active(), req.header, headerSetter);
        // A stream's code comes at its end, after the span (it ends once the call has answered).
        return finishWith(span, () => next(req).then((res) => (res.stream ? res : succeeded(span, res))));
      },
    );
  };
}

/** Records a call's success as the gRPC conventions require its code (0, OK, which Connect's Code does not name). */
function succeeded<T>(span: Span, value: T): T {
  span.setAttribute("rpc.grpc.status_code", 0);
  return value;
}

/**
 * The codes that are a server's own failure, as OpenTelemetry's RPC conventions hold: a server span ends in error only
 * on these, as an HTTP server's does only on a 5xx; a caller's mistake (a bad key, a model not found, a rate limit)
 * leaves it unset, its code in rpc.grpc.status_code.
 */
const serverErrors: ReadonlySet<Code> = new Set([
  Code.Unknown,
  Code.DeadlineExceeded,
  Code.Unimplemented,
  Code.Internal,
  Code.Unavailable,
  Code.DataLoss,
]);

/**
 * Runs fn inside span, records its outcome and ends the span. A client's stream ends it when the call returns. A failure
 * with a code in `errors` (any but Canceled by default) sets the span's status to error.
 */
export async function finishWith<T>(span: Span, fn: () => Promise<T>, errors?: ReadonlySet<Code>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    const err = ConnectError.from(e);
    span.setAttribute("rpc.grpc.status_code", err.code);
    // What the call's own code said of it (the gateway's OpenAI code), or else Connect's name for the status code.
    if ((span as Partial<ReadableSpan>).attributes?.["error.type"] === undefined) {
      span.setAttribute("error.type", err.metadata.get("x-error-code") || codeToString(err.code));
    }
    if (errors ? errors.has(err.code) : err.code !== Code.Canceled) {
      span.setStatus({ code: SpanStatusCode.ERROR, message: redactSecrets(err.rawMessage) });
    }
    throw e;
  } finally {
    span.end();
  }
}

/**
 * Runs fn in a child span of the active span when that span is recording, else just runs fn, so
 * fine-grained spans cost nothing when tracing is off or the request is not sampled.
 */
export function withChildSpan<T>(name: string, attributes: Attributes, fn: () => T): T {
  if (!trace.getActiveSpan()?.isRecording()) return fn();
  return trace.getTracer("mesh").startActiveSpan(name, { attributes }, (span) => {
    const fail = (e: unknown) => {
      setSpanError(span, e);
      span.end();
      throw e;
    };
    try {
      const result = fn();
      if (result instanceof Promise) {
        return result.then((value) => {
          span.end();
          return value;
        }, fail) as T;
      }
      span.end();
      return result;
    } catch (e) {
      return fail(e);
    }
  });
}

/**
 * Starts a child span of the active span when that span is recording, as withChildSpan does, for work that goes on
 * after a callback returns (a stream): its caller ends it. Undefined when the active span is not recording.
 */
export function startChildSpan(name: string, options: SpanOptions): Span | undefined {
  if (!trace.getActiveSpan()?.isRecording()) return undefined;
  return trace.getTracer("mesh").startSpan(name, options);
}

/** Sets span's status to error with e's words, exported as logs are: an upstream's words may quote a key. */
export function setSpanError(span: Span, e: unknown): void {
  span.setStatus({ code: SpanStatusCode.ERROR, message: redactSecrets(e instanceof Error ? e.message : String(e)) });
}
