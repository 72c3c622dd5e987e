import { create } from "@bufbuild/protobuf";
import { type Client, ConnectError } from "@connectrpc/connect";
import { Counter, Gauge, type Registry } from "prom-client";
import {
  type AnalyticsService,
  type IngestMetricsRequest,
  IngestMetricsRequestSchema,
  type RequestMetrics,
} from "../gen/analytics/v1/analytics_pb.ts";
import type { Logger } from "../lib/log.ts";
import type { Spool, SpoolBatch } from "./spool.ts";

export interface MetricsShipperOptions {
  client: Pick<Client<typeof AnalyticsService>, "ingestMetrics">;
  spool: Spool;
  instanceId: string;
  log: Logger;
  /** A batch is sent once this many rows are pending... */
  batchRows?: number;
  /** ...or this long after its first row arrived. */
  intervalMs?: number;
  /** Reconnect delay: doubles from base to max, with jitter. */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** A batch unacked this long means a stuck stream: reconnect and resend. */
  ackTimeoutMs?: number;
  registry?: Registry;
  random?: () => number;
}

export interface ShipperStatus {
  /** The ingest stream is up. */
  connected: boolean;
  /** Rows waiting in the spool (pending and unacked). */
  rows: number;
  /** The spool is at its bound and new rows are dropped. */
  full: boolean;
  lastError: string | undefined;
}

export interface MetricsShipper {
  /** Queues one finished request; never blocks, never throws. */
  record(metrics: RequestMetrics): void;
  /** Opens the ingest stream and keeps it open (reconnecting) until close. */
  start(): void;
  /** Sends everything queued and waits for its acks; false when timeoutMs passed first. */
  flush(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
  status(): ShipperStatus;
}

// A stream that has not failed for this long counts as connected even before its first ack.
const settleMs = 500;

/**
 * Ships RequestMetrics to analytics on one long-lived IngestMetrics stream. Rows go to the spool,
 * are sealed into numbered batches (by size or interval), and stay there until analytics acks
 * their sequence; every (re)connect first resends all unacked batches in order.
 */
export function createMetricsShipper(options: MetricsShipperOptions): MetricsShipper {
  const { client, spool, instanceId, log } = options;
  const batchRows = options.batchRows ?? 1000;
  const intervalMs = options.intervalMs ?? 100;
  const backoffBaseMs = options.backoffBaseMs ?? 100;
  const backoffMaxMs = options.backoffMaxMs ?? 10_000;
  const ackTimeoutMs = options.ackTimeoutMs ?? 30_000;
  const random = options.random ?? Math.random;

  let sealTimer: ReturnType<typeof setTimeout> | undefined;
  let stream: { outbox: Outbox<IngestMetricsRequest>; abort: AbortController } | undefined;
  // When each unacked batch was last sent on the current stream.
  const sentAt = new Map<bigint, number>();
  let connected = false;
  let lastError: string | undefined;
  let dropping = false;
  let closed = false;
  let running: Promise<void> | undefined;
  let wakeFromBackoff: (() => void) | undefined;
  const drainedWaiters = new Set<() => void>();

  const instruments = options.registry ? createInstruments(options.registry, spool, () => connected) : undefined;

  const send = (batch: SpoolBatch) => {
    if (!stream) return;
    stream.outbox.push(
      create(IngestMetricsRequestSchema, {
        gatewayInstanceId: instanceId,
        sequence: batch.sequence,
        metrics: batch.metrics as RequestMetrics[],
      }),
    );
    sentAt.set(batch.sequence, performance.now());
  };

  const sealPending = () => {
    if (sealTimer) {
      clearTimeout(sealTimer);
      sealTimer = undefined;
    }
    for (let batch = spool.seal(batchRows); batch; batch = spool.seal(batchRows)) send(batch);
  };

  const onAck = (sequence: bigint) => {
    sentAt.delete(sequence);
    if (spool.ack(sequence)) instruments?.acked.inc();
    if (spool.rows === 0) {
      for (const resolve of drainedWaiters) resolve();
      drainedWaiters.clear();
    }
  };

  /** One stream's life; true when it was up (acked something or lasted settleMs). */
  const runStream = async (): Promise<boolean> => {
    const outbox = createOutbox<IngestMetricsRequest>();
    const abort = new AbortController();
    stream = { outbox, abort };
    sentAt.clear();
    for (const batch of spool.unacked()) send(batch);
    let wasUp = false;
    const settle = setTimeout(() => {
      connected = true;
      wasUp = true;
    }, settleMs);
    const watchdog = setInterval(() => {
      const oldest = sentAt.values().next().value;
      if (oldest !== undefined && performance.now() - oldest > ackTimeoutMs) abort.abort(new Error("ack timeout"));
    }, Math.min(ackTimeoutMs, 1000));
    try {
      for await (const res of client.ingestMetrics(outbox, { signal: abort.signal })) {
        connected = true;
        wasUp = true;
        lastError = undefined;
        onAck(res.ackedSequence);
      }
      lastError = "stream ended by analytics";
    } catch (e) {
      lastError = abort.signal.aborted && !closed ? "no ack in time" : ConnectError.from(e).message;
    } finally {
      clearTimeout(settle);
      clearInterval(watchdog);
      outbox.end();
      stream = undefined;
      connected = false;
    }
    return wasUp;
  };

  const run = async () => {
    let failures = 0;
    while (!closed) {
      if (await runStream()) failures = 0;
      if (closed) break;
      instruments?.reconnects.inc();
      // Loud once per outage, quiet while retrying.
      (failures === 0 ? log.warn : log.debug)("analytics ingest stream lost", {
        err: lastError,
        spooled_rows: spool.rows,
      });
      const ceiling = Math.min(backoffMaxMs, backoffBaseMs * 2 ** Math.min(failures++, 20));
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, ceiling / 2 + (random() * ceiling) / 2);
        wakeFromBackoff = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wakeFromBackoff = undefined;
    }
  };

  return {
    record(metrics) {
      if (!spool.append(metrics)) {
        instruments?.dropped.inc();
        if (!dropping) log.error("metrics spool full: dropping request metrics", { spooled_rows: spool.rows });
        dropping = true;
        return;
      }
      dropping = false;
      if (spool.pendingRows >= batchRows) sealPending();
      else if (!sealTimer) {
        sealTimer = setTimeout(sealPending, intervalMs);
        sealTimer.unref?.();
      }
    },
    start() {
      running ??= run();
    },
    flush(timeoutMs) {
      sealPending();
      if (spool.rows === 0) return Promise.resolve(true);
      return new Promise((resolve) => {
        const done = () => {
          clearTimeout(timer);
          resolve(true);
        };
        const timer = setTimeout(() => {
          drainedWaiters.delete(done);
          resolve(false);
        }, timeoutMs);
        drainedWaiters.add(done);
      });
    },
    async close() {
      closed = true;
      if (sealTimer) clearTimeout(sealTimer);
      stream?.abort.abort();
      wakeFromBackoff?.();
      await running;
    },
    status: () => ({ connected, rows: spool.rows, full: spool.rows >= spool.maxRows, lastError }),
  };
}

interface Outbox<T> extends AsyncIterable<T> {
  push(value: T): void;
  /** Ends the iteration once the queued values are taken (a dead stream stops waiting). */
  end(): void;
}

/** The request side of a bidi stream: values pushed from outside, pulled by the transport. */
function createOutbox<T>(): Outbox<T> {
  const queue: T[] = [];
  let ended = false;
  let wake: (() => void) | undefined;
  return {
    push(value) {
      if (ended) return;
      queue.push(value);
      wake?.();
    },
    end() {
      ended = true;
      queue.length = 0;
      wake?.();
    },
    async *[Symbol.asyncIterator]() {
      while (true) {
        const value = queue.shift();
        if (value !== undefined) {
          yield value;
          continue;
        }
        if (ended) return;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
    },
  };
}

function createInstruments(registry: Registry, spool: Spool, connected: () => boolean) {
  new Gauge({
    name: "gateway_spool_rows",
    help: "Request metrics held in the spool, pending or awaiting an ack from analytics.",
    registers: [registry],
    collect() {
      this.set(spool.rows);
    },
  });
  new Gauge({
    name: "gateway_ingest_stream_connected",
    help: "1 while the IngestMetrics stream to analytics is up.",
    registers: [registry],
    collect() {
      this.set(connected() ? 1 : 0);
    },
  });
  return {
    dropped: new Counter({
      name: "gateway_metrics_dropped_total",
      help: "Request metrics dropped because the spool was full.",
      registers: [registry],
    }),
    acked: new Counter({
      name: "gateway_ingest_batches_acked_total",
      help: "Metric batches acked by analytics.",
      registers: [registry],
    }),
    reconnects: new Counter({
      name: "gateway_ingest_stream_reconnects_total",
      help: "Times the IngestMetrics stream was lost and reopened.",
      registers: [registry],
    }),
  };
}
