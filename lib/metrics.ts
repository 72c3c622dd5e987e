import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import { collectDefaultMetrics, Counter, type CounterConfiguration, Histogram, Registry } from "prom-client";
import { onStreamEnd } from "./streams.ts";

export interface Metrics {
  registry: Registry;
  serverInterceptor: Interceptor;
  clientInterceptor: Interceptor;
}

// Up to the gateway's default whole-request limit (GATEWAY_REQUEST_TIMEOUT_MS): its chat RPCs wait on upstreams for
// minutes, and a call past the last finite bucket would read as that bucket's bound in every quantile.
const rpcBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

/** One registry per process with process metrics and RPC server/client metrics. */
export function createMetrics(service: string): Metrics {
  const registry = new Registry();
  registry.setDefaultLabels({ service });
  // The event-loop delay is sampled every 100 ms rather than prom-client's 10 ms: each sample is a wakeup, and at
  // 10 ms they cost an idle service about 0.8% of a core under Bun; stalls worth seeing still show.
  collectDefaultMetrics({ register: registry, eventLoopMonitoringPrecision: 100 });
  // These gauges carry a counter's "_total" suffix, which promtool rejects; the handle counts add little.
  for (const name of ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"]) {
    registry.removeSingleMetric(name);
  }
  // Under Bun, the per-heap-space gauges walk every object on the heap at each scrape, holding up the event loop for
  // it: 240 ms at 1.5 million objects. The heap's total and used size stay (nodejs_heap_size_*_bytes).
  for (const part of ["total", "used", "available"]) registry.removeSingleMetric(`nodejs_heap_space_size_${part}_bytes`);
  const labelNames = ["rpc_service", "rpc_method", "code"] as const;
  const serverHandled = new Counter({
    name: "rpc_server_handled_total",
    help: "RPCs completed by the server, by service, method and status code.",
    labelNames,
    registers: [registry],
  });
  const serverDuration = new Histogram({
    name: "rpc_server_handling_seconds",
    help: "Time from receiving an RPC to returning its response (streams: the whole stream).",
    labelNames,
    buckets: rpcBuckets,
    registers: [registry],
  });
  const clientHandled = new Counter({
    name: "rpc_client_handled_total",
    help: "RPCs completed by this process as a client, by service, method and status code.",
    labelNames,
    registers: [registry],
  });
  const clientDuration = new Histogram({
    name: "rpc_client_handling_seconds",
    help: "Time from starting an outgoing RPC to receiving its response headers.",
    labelNames,
    buckets: rpcBuckets,
    registers: [registry],
  });
  // A server's stream is counted when it ends, with the code its client saw; a client's when its headers arrive.
  const observe = (counter: Counter, histogram: Histogram, wholeStreams: boolean): Interceptor => (next) => async (req) => {
    const start = performance.now();
    const record = (error?: unknown) => {
      // Connect's own names for codes, as its clients and grpcurl print them: permission_denied, resource_exhausted.
      const code = error === undefined ? "ok" : codeToString(ConnectError.from(error).code);
      const labels = { rpc_service: req.service.typeName, rpc_method: req.method.name, code };
      counter.inc(labels);
      histogram.observe(labels, (performance.now() - start) / 1000);
    };
    let res: Awaited<ReturnType<typeof next>>;
    try {
      res = await next(req);
    } catch (e) {
      record(e);
      throw e;
    }
    if (wholeStreams && res.stream) return { ...res, message: onStreamEnd(res.message, record) };
    record();
    return res;
  };
  return {
    registry,
    serverInterceptor: observe(serverHandled, serverDuration, true),
    clientInterceptor: observe(clientHandled, clientDuration, false),
  };
}

/**
 * One `T` for each series of values of `labelNames`, made by `make` the first time, then found by the values alone: a
 * metric's series are few, the requests that touch them many.
 */
export function bySeries<L extends string, T>(
  labelNames: readonly [L, ...L[]],
  make: (labels: Record<L, string | number>) => T,
): (labels: Record<L, string | number>) => T {
  const last = labelNames.length - 1;
  // By the value of each label in turn, the series' own last.
  const root = new Map<unknown, unknown>();
  return (labels) => {
    let level = root;
    for (let i = 0; i < last; i++) {
      const value = labels[labelNames[i] as L];
      let next = level.get(value) as Map<unknown, unknown> | undefined;
      if (!next) level.set(value, (next = new Map()));
      level = next;
    }
    const value = labels[labelNames[last] as L];
    let found = level.get(value) as T | undefined;
    if (found === undefined) level.set(value, (found = make(labels)));
    return found;
  };
}

/** A counter of whole numbers, increased as prom-client's are: by 1 unless told how much. */
export interface TalliedCounter<L extends string> {
  inc(labels: Record<L, string | number>, by?: number): void;
}

/**
 * A prom-client counter for counts that grow with every request: its own inc() writes each label of the series into a
 * new string every time (600 bytes of garbage for five labels), so increments are summed here by series, found by their
 * label values, and added to the counter whenever it is read (each scrape). A series shows from its first increment,
 * of 0 too, as the counter's own would. Whole numbers only: sums of fractions in another order could differ in their
 * last bits.
 */
export function createTalliedCounter<L extends string>(
  config: Omit<CounterConfiguration<L>, "collect"> & { labelNames: readonly [L, ...L[]] },
): TalliedCounter<L> {
  interface Series {
    labels: Record<L, string | number>;
    count: number;
  }
  const series: Series[] = [];
  new Counter<L>({
    ...config,
    collect() {
      for (const s of series) {
        this.inc(s.labels, s.count);
        s.count = 0;
      }
    },
  });
  const seriesOf = bySeries(config.labelNames, (labels): Series => {
    const made = { labels: { ...labels }, count: 0 };
    series.push(made);
    return made;
  });
  return {
    inc(labels, by = 1) {
      // Refused here, as the counter would refuse it, rather than when it is read.
      if (!Number.isSafeInteger(by) || by < 0) throw new TypeError(`Not a count to add to a counter: ${by}`);
      seriesOf(labels).count += by;
    },
  };
}
