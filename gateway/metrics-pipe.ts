import { clone, create, toBinary } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { type Client, ConnectError } from "@connectrpc/connect";
import { Counter, Gauge, type Registry } from "prom-client";
import {
  type AnalyticsService,
  type IngestMetricsRequest,
  IngestMetricsRequestSchema,
  type RequestMetrics,
  RequestMetricsSchema,
} from "../gen/analytics/v1/analytics_pb.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import { createWaiters } from "../lib/waiters.ts";
import { defaultBatchBytes, rowOverheadBytes, type Spool, type SpoolBatch, SpoolBatchDamagedError } from "./spool.ts";

export interface MetricsShipperOptions {
  client: Pick<Client<typeof AnalyticsService>, "ingestMetrics">;
  spool: Spool;
  instanceId: string;
  log: Logger;
  /** A batch is sealed once this many rows are pending... */
  batchRows?: number;
  /**
   * ...or once they take this many bytes encoded, so every batch fits in one message analytics accepts (a row
   * larger than this alone is shipped without its tags)...
   */
  batchBytes?: number;
  /** ...or this long after its first row arrived. */
  intervalMs?: number;
  /** Rows sent on the stream and not acked yet; more wait in the spool until acks come back. */
  maxInFlightRows?: number;
  /** Reconnect delay: doubles from base to max, with jitter. */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** No ack this long while a batch waits for one means a stuck stream: reconnect and resend. */
  ackTimeoutMs?: number;
  registry?: Registry;
  random?: () => number;
}

export interface ShipperStatus {
  /** The ingest stream is up. */
  connected: boolean;
  /** Rows waiting in the spool (pending and unacked). */
  rows: number;
  /** Spool fill level against its bound. */
  bytes: number;
  maxBytes: number;
  /**
   * The spool has no room for another row as large as the largest recorded (or, before any, as its rows on average),
   * and stays full until back under 90% of its bound; or its disk refuses writes. New rows are dropped or not sealed.
   */
  full: boolean;
  lastError: string | undefined;
}

export interface MetricsShipper {
  /** Spools one finished request; never waits on analytics, never throws. */
  record(metrics: RequestMetrics): void;
  /** Opens the ingest stream and keeps it open (reconnecting) until close. */
  start(): void;
  /** Sends everything spooled and waits for its acks; false when timeoutMs passed first. */
  flush(timeoutMs: number): Promise<boolean>;
  /** Stops streaming; what is not acked stays in the spool (the caller closes the spool). */
  close(): Promise<void>;
  status(): ShipperStatus;
  /** Rows this process has spooled so far... */
  recordedRows(): number;
  /**
   * ...and how many of the first of them analytics has acked, which it does once billing has recorded them: spend of
   * the rows before this count is in billing's usage (a row dropped unspooled counts as acked, as it never will be).
   */
  ackedRows(): number;
}

// A stream that has not failed for this long counts as connected even before its first ack.
const settleMs = 500;
/** A disk that refused a row is tried at least this often, so rows are spooled again within about this of its room. */
const diskProbeMaxMs = 1000;

// A full spool stops counting as full only under this share of its bound, so acks that free room for a row or two,
// taken again by the next requests, do not flap readiness.
const readyFill = 0.9;

// Rows are never larger (the request checks bound one to about 40 KB): caps a guess from a spool's average row.
const rowGuessCapBytes = 64 * 1024;

// Past this share of its bound the spool keeps its room for rows that bill: a flood of requests that cost nothing (a
// key's own 429s and 4xx) is shed there, so it can neither push out billable rows nor bring the spool near readyFill.
const shedFill = 0.8;

/** Whether billing counts anything of a row: cost, or tokens a key's monthly limit counts (a free model's). */
const billable = (m: RequestMetrics) =>
  m.costNanos !== 0n || (m.usage?.inputTokens ?? 0n) !== 0n || (m.usage?.outputTokens ?? 0n) !== 0n;

interface Stream {
  outbox: Outbox<IngestMetricsRequest>;
  abort: AbortController;
  /** Batches sent on this stream and not acked: rows and when they were sent. */
  inFlight: Map<bigint, { rows: number; sentAt: number }>;
  inFlightRows: number;
  /** Highest sequence sent on this stream; batches are sent in sequence order. */
  lastSent: bigint;
  /** When analytics last acked a batch on this stream (performance.now()). */
  lastAckAt: number;
}

/**
 * Ships RequestMetrics to analytics on one long-lived IngestMetrics stream. Rows go to the spool,
 * are sealed into numbered batches (by size or interval) and stay there until analytics acks their
 * sequence. Batches are sent in order within a window of unacked rows, so a slow analytics holds
 * rows on disk rather than in memory; every (re)connect starts again from the oldest unacked batch.
 */
export function createMetricsShipper(options: MetricsShipperOptions): MetricsShipper {
  const { client, spool, instanceId, log } = options;
  const batchRows = options.batchRows ?? 1000;
  const batchBytes = options.batchBytes ?? defaultBatchBytes;
  const intervalMs = options.intervalMs ?? 100;
  // Analytics acks a batch only after its flush is in ClickHouse and billing: the window covers that latency.
  const maxInFlightRows = options.maxInFlightRows ?? 100_000;
  const backoffBaseMs = options.backoffBaseMs ?? 100;
  const backoffMaxMs = options.backoffMaxMs ?? 10_000;
  const ackTimeoutMs = options.ackTimeoutMs ?? 30_000;
  const random = options.random ?? Math.random;

  let sealTimer: ReturnType<typeof setTimeout> | undefined;
  let stream: Stream | undefined;
  // Sequences sent at least once by this process, to count resends.
  const sentBefore = new Set<bigint>();
  let connected = false;
  let lastError: string | undefined;
  // Rows are being dropped: logged once until one is spooled again.
  let dropping = false;
  // Rows that bill nothing are being shed: logged once until one is spooled again.
  let shedding = false;
  // The last row was refused with room for it: the disk refuses writes. Rows are then dropped without trying it (each
  // try created and deleted a segment file on the request path) until a probe or an ack says it may take them again.
  let appendFailing = false;
  // While it does, the disk is tried with backoff, up to diskProbeMaxMs apart.
  let diskProbe: ReturnType<typeof setTimeout> | undefined;
  let diskProbes = 0;
  let largestRow = 0;
  let atBound = false;
  // Rows pending that the spool could not seal (its disk refused the write): retried on the seal timer.
  let sealFailing = false;
  let closed = false;
  let running: Promise<void> | undefined;
  let wakeFromBackoff: (() => void) | undefined;
  const drained = createWaiters();

  const instruments = options.registry ? createInstruments(options.registry, spool, () => connected) : undefined;

  // Which of this process's rows analytics has acked. Rows are counted as the spool takes them, and batches are sealed
  // from the oldest pending rows, so each batch holds a range of them and the acked ones from the first are a count.
  // Rows pending when this process started (adopted from an earlier one) are sealed first and are not counted.
  let spooledRows = 0;
  let foreignPending = spool.pendingRows;
  let sealedOwnRows = 0;
  /** This process's batches in seal order, from `ownHead` on: where each ends in the count, and whether it is acked. */
  const ownBatches: { end: number; acked: boolean }[] = [];
  let ownHead = 0;
  const ownBySequence = new Map<bigint, { end: number; acked: boolean }>();
  let ackedOwnRows = 0;
  const noteSealed = (batch: SpoolBatch) => {
    const foreign = Math.min(foreignPending, batch.rows);
    foreignPending -= foreign;
    if (batch.rows === foreign) return;
    sealedOwnRows += batch.rows - foreign;
    const entry = { end: sealedOwnRows, acked: false };
    ownBatches.push(entry);
    ownBySequence.set(batch.sequence, entry);
  };
  /** Called for every batch the spool forgets: acked, or dropped as damaged. */
  const noteAcked = (sequence: bigint) => {
    const entry = ownBySequence.get(sequence);
    if (!entry) return;
    ownBySequence.delete(sequence);
    entry.acked = true;
    for (let first = ownBatches[ownHead]; first?.acked; first = ownBatches[++ownHead]) ackedOwnRows = first.end;
    if (ownHead > 1024 && ownHead * 2 > ownBatches.length) {
      ownBatches.splice(0, ownHead);
      ownHead = 0;
    }
  };

  // Loud once while batches cannot be read for now (descriptors or memory run out, a disk error), quiet while retrying.
  const readOutage = createOutageLog(
    log,
    { failed: "metrics spool: a batch cannot be read; retrying", recovered: "metrics spool: batches can be read again" },
    "error",
  );
  let readRetry: ReturnType<typeof setTimeout> | undefined;
  let readFailures = 0;

  /** Pumps again after a backoff, while the batch that could not be read stays unacked. */
  const retryReadLater = () => {
    if (readRetry) return;
    const ceiling = Math.min(backoffMaxMs, backoffBaseMs * 2 ** Math.min(readFailures++, 20));
    readRetry = setTimeout(
      () => {
        readRetry = undefined;
        pump();
      },
      ceiling / 2 + (random() * ceiling) / 2,
    );
    readRetry.unref?.();
  };

  /** Sends one batch; false when it cannot be read for now, and sending stops until the retry. */
  const send = (s: Stream, batch: SpoolBatch): boolean => {
    let rows: Uint8Array[];
    try {
      rows = spool.read(batch);
    } catch (e) {
      if (!(e instanceof SpoolBatchDamagedError)) {
        readOutage.failed({ err: e, sequence: batch.sequence, spooled_rows: spool.rows });
        retryReadLater();
        return false;
      }
      // Lost on disk: the rows still whole go, the rest are counted dropped. Acking an empty one moves the stream on.
      const lost = Math.max(0, batch.rows - e.rows.length);
      log.error("a spooled batch is damaged: its unreadable rows are dropped", {
        err: e,
        sequence: batch.sequence,
        dropped_rows: lost,
      });
      instruments?.dropped.inc({ reason: "damaged" }, lost);
      if (e.rows.length === 0) {
        if (spool.ack(batch.sequence)) noteAcked(batch.sequence);
        if (spool.rows === 0) drained.wakeAll();
        return true;
      }
      rows = e.rows;
    }
    readFailures = 0;
    readOutage.recovered({ sequence: batch.sequence });
    if (batch.recovered || sentBefore.has(batch.sequence)) {
      instruments?.resentBatches.inc();
      instruments?.resentRows.inc(batch.rows);
    }
    sentBefore.add(batch.sequence);
    s.outbox.push(encodedBatch(instanceId, batch.sequence, rows));
    s.inFlight.set(batch.sequence, { rows: batch.rows, sentAt: performance.now() });
    s.inFlightRows += batch.rows;
    s.lastSent = batch.sequence;
    return true;
  };

  /** Sends the next unacked batches, oldest first, while the window has room. */
  const pump = () => {
    const s = stream;
    if (!s || readRetry || s.inFlightRows >= maxInFlightRows) return;
    for (const batch of spool.unacked()) {
      if (batch.sequence <= s.lastSent) continue;
      if (s.inFlightRows >= maxInFlightRows || !send(s, batch)) break;
    }
  };

  /** Whether the spool is at its bound (see ShipperStatus.full): from its fill, so also right after a restart. */
  const spoolAtBound = () => {
    const average = spool.rows > 0 ? Math.min(Math.ceil(spool.bytes / spool.rows), rowGuessCapBytes) : 0;
    const next = Math.max(largestRow + rowOverheadBytes, average);
    atBound = atBound ? spool.bytes > spool.maxBytes * readyFill : spool.bytes + next > spool.maxBytes;
    return atBound;
  };

  const full = () => spool.pendingRows >= batchRows || spool.pendingBytes >= batchBytes;

  /** Clears appendFailing once the disk takes a row as large as the one it refused, tried with backoff until then. */
  const probeDiskLater = (rowBytes: number) => {
    if (diskProbe || closed) return;
    const ceiling = Math.min(backoffMaxMs, diskProbeMaxMs, backoffBaseMs * 2 ** Math.min(diskProbes++, 20));
    diskProbe = setTimeout(
      () => {
        diskProbe = undefined;
        if (!appendFailing) return;
        if (!spool.writable(rowBytes)) return probeDiskLater(rowBytes);
        appendFailing = false;
        diskProbes = 0;
      },
      ceiling / 2 + (random() * ceiling) / 2,
    );
    diskProbe.unref?.();
  };

  const armSealTimer = () => {
    if (sealTimer) return;
    sealTimer = setTimeout(() => sealPending(), intervalMs);
    sealTimer.unref?.();
  };

  /** Seals pending rows into batches: all of them, or (fullOnly) those that make full batches, the rest waiting. */
  const sealPending = (fullOnly = false) => {
    if (sealTimer) {
      clearTimeout(sealTimer);
      sealTimer = undefined;
    }
    while (fullOnly ? full() : spool.pendingRows > 0) {
      const batch = spool.seal(batchRows, batchBytes);
      if (!batch) break;
      noteSealed(batch);
    }
    const failed = fullOnly ? full() : spool.pendingRows > 0;
    if (failed && !sealFailing) {
      log.error("metrics spool: rows cannot be sealed; retrying", { pending_rows: spool.pendingRows });
    }
    sealFailing = failed;
    if (spool.pendingRows > 0) armSealTimer();
    pump();
  };

  /**
   * The row of one request, encoded. One larger than a batch may be (tags are its only part a client sizes, and the
   * request checks bound them far below the limit) goes without its tags rather than wedging the stream; one still
   * too large is dropped, which no request or upstream reply can cause.
   */
  const encodeRow = (metrics: RequestMetrics): Uint8Array | undefined => {
    const row = toBinary(RequestMetricsSchema, metrics);
    if (row.length <= batchBytes) return row;
    const untagged = clone(RequestMetricsSchema, metrics);
    untagged.tags = {};
    const trimmed = toBinary(RequestMetricsSchema, untagged);
    const fields = { request_id: metrics.requestId, bytes: row.length, batch_bytes: batchBytes };
    if (trimmed.length <= batchBytes) {
      log.warn("request metrics larger than a batch are shipped without their tags", fields);
      instruments?.trimmed.inc();
      return trimmed;
    }
    log.error("request metrics larger than a batch even without tags are dropped", fields);
    instruments?.dropped.inc({ reason: "too_large" });
    return undefined;
  };

  const onAck = (s: Stream, sequence: bigint) => {
    const sent = s.inFlight.get(sequence);
    // Analytics can only have stored what this stream sent it: an ack of anything else (a peer's bug) would drop
    // rows it never received, and does not show the stream is moving either.
    if (!sent) {
      log.warn("analytics acked a batch this stream did not send; it stays spooled", { sequence });
      return;
    }
    s.lastAckAt = performance.now();
    s.inFlight.delete(sequence);
    s.inFlightRows -= sent.rows;
    sentBefore.delete(sequence);
    if (spool.ack(sequence)) {
      noteAcked(sequence);
      instruments?.acked.inc();
      // Room freed, and a disk that refused writes may take them again: the next append says.
      appendFailing = false;
    }
    if (spool.rows === 0) drained.wakeAll();
    pump();
  };

  /**
   * One stream's life; `up` when it acked something, or lasted settleMs with nothing to send. A stream that takes
   * batches and never acks them (analytics up, billing down) was not up, so the backoff keeps growing. `ended` when
   * analytics ended it without an error, having acked what it read (its connection past its age, say).
   */
  // Loud once per outage, quiet while retrying; its end is an ack, or a stream that stays up with nothing to send.
  const outage = createOutageLog(log, { failed: "analytics ingest stream lost", recovered: "analytics ingest stream is up again" });

  const runStream = async (): Promise<{ up: boolean; ended: boolean }> => {
    const s: Stream = {
      outbox: createOutbox<IngestMetricsRequest>(),
      abort: new AbortController(),
      inFlight: new Map(),
      inFlightRows: 0,
      lastSent: -1n,
      lastAckAt: 0,
    };
    stream = s;
    pump();
    let acked = false;
    let settled = false;
    let ended = false;
    const settle = setTimeout(() => {
      connected = true;
      settled = true;
      if (s.lastSent === -1n) outage.recovered();
    }, settleMs);
    const watchdog = setInterval(
      () => {
        // Stuck is no ack for that long while batches wait: a stream acking steadily behind a backlog (several gateways
        // catching up at once) is slow, and resending its window would only add to the backlog.
        const oldest = s.inFlight.values().next().value;
        if (oldest && performance.now() - Math.max(oldest.sentAt, s.lastAckAt) > ackTimeoutMs) {
          s.abort.abort(new Error("ack timeout"));
        }
      },
      Math.min(ackTimeoutMs, 1000),
    );
    try {
      for await (const res of client.ingestMetrics(s.outbox, { signal: s.abort.signal })) {
        connected = true;
        if (!acked) outage.recovered();
        acked = true;
        lastError = undefined;
        onAck(s, res.ackedSequence);
      }
      lastError = "stream ended by analytics";
      ended = true;
    } catch (e) {
      lastError = s.abort.signal.aborted && !closed ? "no ack in time" : ConnectError.from(e).message;
    } finally {
      clearTimeout(settle);
      clearInterval(watchdog);
      s.outbox.end();
      stream = undefined;
      connected = false;
    }
    return { up: acked || (settled && s.lastSent === -1n), ended };
  };

  const run = async () => {
    let failures = 0;
    while (!closed) {
      const { up, ended } = await runStream();
      if (up) failures = 0;
      if (closed) break;
      instruments?.reconnects.inc();
      // Ended by analytics once it had acked what it read: opened again at once, on a new connection; unacked batches
      // (sent as it stopped reading) go again. Should that fail, it is an outage.
      if (up && ended) {
        log.debug("analytics ended the ingest stream; opening it again");
        continue;
      }
      outage.failed({ err: lastError, spooled_rows: spool.rows });
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
      const row = encodeRow(metrics);
      if (!row) return;
      if (!billable(metrics)) {
        if (spool.bytes + row.length + rowOverheadBytes > spool.maxBytes * shedFill) {
          instruments?.dropped.inc({ reason: "shed" });
          if (!shedding) {
            log.warn("metrics spool nearly full: shedding metrics of requests that bill nothing", {
              spooled_rows: spool.rows,
            });
          }
          shedding = true;
          return;
        }
        shedding = false;
      }
      largestRow = Math.max(largestRow, row.length);
      if (appendFailing || !spool.append(row)) {
        instruments?.dropped.inc({ reason: "full" });
        if (!dropping) log.error("metrics spool full: dropping request metrics", { spooled_rows: spool.rows });
        dropping = true;
        appendFailing = !spoolAtBound();
        if (appendFailing) probeDiskLater(row.length);
        return;
      }
      dropping = false;
      appendFailing = false;
      diskProbes = 0;
      spooledRows++;
      if (full()) sealPending(true);
      else armSealTimer();
    },
    recordedRows: () => spooledRows,
    // Up to the first batch not acked; rows spooled and not sealed yet are not acked.
    ackedRows: () => ackedOwnRows,
    start() {
      // Rows a restart found that the spool could not seal yet.
      if (spool.pendingRows > 0) armSealTimer();
      running ??= run();
    },
    flush(timeoutMs) {
      sealPending();
      return spool.rows === 0 ? Promise.resolve(true) : drained.wait(timeoutMs);
    },
    async close() {
      closed = true;
      if (sealTimer) clearTimeout(sealTimer);
      clearTimeout(readRetry);
      clearTimeout(diskProbe);
      stream?.abort.abort();
      wakeFromBackoff?.();
      await running;
    },
    status: () => ({
      connected,
      rows: spool.rows,
      bytes: spool.bytes,
      maxBytes: spool.maxBytes,
      full: spoolAtBound() || appendFailing || sealFailing,
      lastError,
    }),
  };
}

/**
 * An ingest batch whose rows travel as the bytes the spool holds: each is written as field 3
 * (`metrics`, length-delimited), exactly what encoding the decoded message would produce, without
 * decoding and re-encoding every row.
 */
export function encodedBatch(instanceId: string, sequence: bigint, rows: readonly Uint8Array[]): IngestMetricsRequest {
  const batch = create(IngestMetricsRequestSchema, { gatewayInstanceId: instanceId, sequence });
  batch.$unknown = rows.map((row) => ({ no: 3, wireType: WireType.LengthDelimited, data: lengthPrefixed(row) }));
  return batch;
}

function lengthPrefixed(bytes: Uint8Array): Uint8Array {
  let n = bytes.length;
  let size = 1;
  while (n >= 0x80) {
    n >>>= 7;
    size++;
  }
  const out = new Uint8Array(size + bytes.length);
  n = bytes.length;
  let i = 0;
  while (n >= 0x80) {
    out[i++] = (n & 0x7f) | 0x80;
    n >>>= 7;
  }
  out[i] = n;
  out.set(bytes, size);
  return out;
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
    name: "gateway_spool_bytes",
    help: "Space the metrics spool uses, counted against gateway_spool_limit_bytes.",
    registers: [registry],
    collect() {
      this.set(spool.bytes);
    },
  });
  new Gauge({
    name: "gateway_spool_limit_bytes",
    help: "Bound of the metrics spool; past it new request metrics are dropped.",
    registers: [registry],
    collect() {
      this.set(spool.maxBytes);
    },
  });
  new Counter({
    name: "gateway_spool_sync_failed_rows_total",
    help:
      "Spooled request metrics whose flush to disk failed: still sent, but a host crash before analytics acks them " +
      "loses them.",
    registers: [registry],
    collect() {
      this.reset();
      this.inc(spool.syncFailedRows);
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
  const dropped = new Counter({
    name: "gateway_metrics_dropped_total",
    help:
      "Request metrics dropped: by reason, the spool was full or could not be written (full), lost them on disk " +
      "(damaged), they were too large (too_large), or billed nothing and the spool was nearly full (shed).",
    labelNames: ["reason"],
    registers: [registry],
  });
  // Every reason from zero, so the first drop is an increase.
  for (const reason of ["full", "damaged", "too_large", "shed"]) dropped.inc({ reason }, 0);
  return {
    dropped,
    acked: new Counter({
      name: "gateway_ingest_batches_acked_total",
      help: "Metric batches acked by analytics.",
      registers: [registry],
    }),
    resentBatches: new Counter({
      name: "gateway_ingest_batches_resent_total",
      help: "Metric batches sent again: after a reconnect, or left unacked by an earlier process.",
      registers: [registry],
    }),
    trimmed: new Counter({
      name: "gateway_metrics_trimmed_total",
      help: "Request metrics shipped without their tags: encoded, they were larger than a batch may be.",
      registers: [registry],
    }),
    resentRows: new Counter({
      name: "gateway_ingest_rows_resent_total",
      help: "Request metrics in batches sent again.",
      registers: [registry],
    }),
    reconnects: new Counter({
      name: "gateway_ingest_stream_reconnects_total",
      help: "Times the IngestMetrics stream was lost and reopened.",
      registers: [registry],
    }),
  };
}
