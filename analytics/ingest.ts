import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { type Link, ROOT_CONTEXT, trace, type Tracer } from "@opentelemetry/api";
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import type {
  IngestMetricsRequest,
  IngestMetricsResponseSchema,
  RequestMetrics,
} from "../gen/analytics/v1/analytics_pb.ts";
import type { BillingService, UsageRecord } from "../gen/billing/v1/billing_pb.ts";
import { sha256Hex } from "../lib/auth.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import { MAX_COST_NANOS_PER_REQUEST, MAX_TOKENS_PER_REQUEST } from "../lib/money.ts";
import { finishWith, withChildSpan } from "../lib/telemetry.ts";
import { type AnalyticsStore, maxTtlDays } from "./store/store.ts";

/** Most rows in one IngestMetrics batch, and in one RecordUsage call. */
export const maxBatchRows = 10_000;
// A flush span links to at most this many request spans; more would bloat every exported span.
const maxSpanLinks = 128;
// Billing's answers to records it will never take, however often they are resent: invalid, of an org or key it does
// not know, or taking a total past int64 (totals only grow, and resent forever they failed every flush they shared).
const refusals = new Set([Code.InvalidArgument, Code.NotFound, Code.FailedPrecondition]);

export interface IngestOptions {
  /** A flush starts once this many rows are buffered (across every gateway's stream)... */
  flushRows: number;
  /** ...or this long after the oldest buffered row arrived. */
  flushIntervalMs: number;
  /** Rows held in memory (buffered and being flushed)... */
  maxBufferedRows: number;
  /**
   * ...and their estimated size in memory (estimatedBytes); streams are not read while either is reached. A flush
   * also starts once a quarter of it is buffered.
   */
  maxBufferedBytes: number;
  /** ClickHouse inserts in flight at once; acks still go out in insert order. */
  insertConcurrency: number;
  /** Rows per RecordUsage call (at most 10,000)... */
  billingBatchRows: number;
  /** ...and calls in flight at once, across flushes. */
  billingConcurrency: number;
  /**
   * Acks one stream may owe (batches read and not yet acked, plus acks its gateway has not taken yet): past it the
   * stream is not read until its gateway takes acks, so one that never reads them cannot make them pile up.
   */
  maxUnsentAcks: number;
}

export const defaultIngestOptions: IngestOptions = {
  // ClickHouse wants inserts of 10,000 to 100,000 rows, about once a second, not one per request.
  flushRows: 20_000,
  flushIntervalMs: 1000,
  // About 1.2 KB per decoded row: some 120 MB of heap at most. Acks wait for billing, so the rows in flight
  // (and the gateways' windows) must cover a couple of flushes' latency or throughput stalls.
  maxBufferedRows: 100_000,
  // Rows with large tags take up to about 45 KB each: this keeps them, and their copies encoded for ClickHouse
  // while flushes run, inside the manifests' 1 GiB container beside the process's own ~150 MB.
  maxBufferedBytes: 128 * 1024 * 1024,
  // One insert is encoded while the engine writes another.
  insertConcurrency: 2,
  // Two calls of 5,000 keep both billing and its Postgres busy (bench/billing.ts measures the same shape).
  billingBatchRows: 5000,
  billingConcurrency: 2,
  // Far beyond a gateway's window in batches (100 of 1,000 rows, or seconds of batches sealed every 100 ms), at some
  // 100 bytes an ack.
  maxUnsentAcks: 4096,
};

export interface IngestDeps {
  store: AnalyticsStore;
  billing: Client<typeof BillingService>;
  log: Logger;
  options?: Partial<IngestOptions>;
  /** Where ingest metrics are registered; none in most tests. */
  registry?: Registry;
  tracer?: Tracer;
  /** Aborted when the process stops: streams stop being read, what is buffered is flushed and acked, streams end. */
  stopSignal?: AbortSignal;
}

type Ack = MessageInitShape<typeof IngestMetricsResponseSchema>;

/** One gateway's stream: acks waiting to be sent, and how its batches stand. */
interface StreamState {
  acks: Ack[];
  /** Batches read and not yet acked or failed. */
  unacked: number;
  readerDone: boolean;
  failure: ConnectError | undefined;
  wake: (() => void) | undefined;
  /** Wakes the reader waiting for its gateway to take acks. */
  wakeReader: (() => void) | undefined;
}

/** One gateway batch inside the buffer or a flush. */
interface Chunk {
  stream: StreamState;
  sequence: bigint;
  rows: RequestMetrics[];
  /** estimatedBytes of the rows. */
  bytes: number;
}

export interface Ingest {
  /**
   * Handles one IngestMetrics stream: its batches join the shared buffer; yields their acks in order. Once `ending`
   * is aborted (its connection is going away) no more of its batches are read, and it ends once those read are acked.
   */
  handle(batches: AsyncIterable<IngestMetricsRequest>, ending?: AbortSignal): AsyncIterable<Ack>;
}

/**
 * IngestMetrics for every gateway at once. Batches from all streams are buffered together and flushed
 * by size or interval: each flush is one ClickHouse insert, then batched RecordUsage calls, then the acks
 * of every batch it holds. A failure in either step acks nothing: the streams holding those batches end
 * with Unavailable and their gateways resend; request_id makes the resends harmless downstream.
 * Flushes overlap (insertConcurrency inserts, billingConcurrency RecordUsage calls) and are acked in insert order.
 * Memory is bounded by maxBufferedRows and maxBufferedBytes: past either no stream is read, so gateways keep their
 * rows in their spools.
 */
export function createIngest(deps: IngestDeps): Ingest {
  const options = { ...defaultIngestOptions, ...deps.options };
  const tracer = deps.tracer ?? trace.getTracer("analytics");
  const instruments = createInstruments(deps.registry ? [deps.registry] : [], () => ({ rows: held, bytes: heldBytes }));

  let buffer: Chunk[] = [];
  let bufferRows = 0;
  let bufferBytes = 0;
  let bufferSince = 0;
  // Rows buffered plus rows in flushes that have not finished, and their size.
  let held = 0;
  let heldBytes = 0;
  let flushTimer: ReturnType<typeof setTimeout> | undefined;
  let inserting = 0;
  // Acks go out in the order of the inserts, whichever flush's billing finishes first.
  let ackChain: Promise<void> = Promise.resolve();
  let billingCalls = 0;
  const billingWaiters: (() => void)[] = [];
  const roomWaiters = new Set<() => void>();
  const stopping = deps.stopSignal;
  // Every gateway resends what failed, every few seconds: an outage is logged as it starts and as it ends.
  const clickHouseOutage = createOutageLog(
    deps.log,
    { failed: "writing a flush to ClickHouse failed", recovered: "ClickHouse takes flushes again" },
    "error",
  );
  const billingOutage = createOutageLog(
    deps.log,
    { failed: "recording usage in billing failed", recovered: "billing records usage again" },
    "error",
  );

  const full = () => (held >= options.maxBufferedRows || heldBytes >= options.maxBufferedBytes) && !stopping?.aborted;

  const wakeRoom = () => {
    if (full()) return;
    for (const wake of roomWaiters) wake();
    roomWaiters.clear();
  };

  const waitForRoom = (): Promise<void> =>
    full() ? new Promise((resolve) => roomWaiters.add(resolve)) : Promise.resolve();

  const settle = (stream: StreamState) => stream.wake?.();

  const fail = (chunks: readonly Chunk[], error: ConnectError) => {
    for (const chunk of chunks) {
      if (!chunk.stream.failure) chunk.stream.failure = error;
      settle(chunk.stream);
    }
    // Rows of failed streams still buffered would only be resent by their gateways anyway.
    dropFailed();
  };

  const dropFailed = () => {
    const kept = buffer.filter((c) => !c.stream.failure);
    if (kept.length === buffer.length) return;
    for (const chunk of buffer) {
      if (!chunk.stream.failure) continue;
      bufferRows -= chunk.rows.length;
      bufferBytes -= chunk.bytes;
      held -= chunk.rows.length;
      heldBytes -= chunk.bytes;
    }
    buffer = kept;
    wakeRoom();
  };

  /** Starts a flush when one is due and an insert slot is free; otherwise rows keep gathering. */
  const maybeFlush = () => {
    if (inserting >= options.insertConcurrency || buffer.length === 0) return;
    const due =
      bufferRows >= options.flushRows ||
      bufferBytes >= options.maxBufferedBytes / 4 ||
      performance.now() - bufferSince >= options.flushIntervalMs ||
      stopping?.aborted === true;
    if (!due) {
      flushTimer ??= setTimeout(
        () => {
          flushTimer = undefined;
          maybeFlush();
        },
        Math.max(0, options.flushIntervalMs - (performance.now() - bufferSince)),
      );
      return;
    }
    if (flushTimer) {
      clearTimeout(flushTimer);
      flushTimer = undefined;
    }
    const chunks = buffer;
    const rows = bufferRows;
    const bytes = bufferBytes;
    buffer = [];
    bufferRows = 0;
    bufferBytes = 0;
    inserting++;
    void runFlush(chunks, rows, bytes);
  };

  const runFlush = async (chunks: Chunk[], rowCount: number, bytes: number) => {
    const rows = chunks.length === 1 ? (chunks[0] as Chunk).rows : chunks.flatMap((c) => c.rows);
    const links: Link[] = [];
    for (const m of rows) {
      if (links.length >= maxSpanLinks) break;
      if (/^[0-9a-f]{32}$/.test(m.traceId) && /^[0-9a-f]{16}$/.test(m.spanId)) {
        links.push({ context: { traceId: m.traceId, spanId: m.spanId, traceFlags: 1 } });
      }
    }
    const stopTimer = instruments.flushSeconds.startTimer();
    // A flush carries rows of many requests, often from several streams: a trace of its own, linked to theirs.
    await tracer.startActiveSpan(
      "analytics.ingest_flush",
      { links, attributes: { "mesh.flush.rows": rowCount, "mesh.flush.batches": chunks.length } },
      ROOT_CONTEXT,
      async (span) => {
        const inserted = insertRows(rows).finally(() => {
          inserting--;
          maybeFlush();
        });
        // Billing starts once the rows are in ClickHouse, overlapping the next insert and the previous billing.
        const billed = inserted.then(() => recordUsage(rows));
        billed.catch(() => {});
        ackChain = ackChain.then(() =>
          finishWith(span, async () => {
            try {
              const duplicates = await billed;
              for (const chunk of chunks) {
                // Billing counts duplicates per call: a batch's own count is known only when it was flushed alone.
                const duplicateRows = chunks.length === 1 ? duplicates : 0;
                chunk.stream.acks.push({ ackedSequence: chunk.sequence, duplicateRows });
                chunk.stream.unacked--;
                settle(chunk.stream);
              }
              instruments.batches.inc({ outcome: "acked" }, chunks.length);
              instruments.rows.inc(rowCount);
              instruments.duplicates.inc(duplicates);
            } catch (e) {
              instruments.batches.inc({ outcome: "failed" }, chunks.length);
              fail(chunks, ConnectError.from(e, Code.Unavailable));
              throw e;
            } finally {
              stopTimer();
              held -= rowCount;
              heldBytes -= bytes;
              wakeRoom();
            }
          }).catch(() => {}),
        );
        await inserted.catch(() => {});
      },
    );
  };

  async function insertRows(rows: readonly RequestMetrics[]): Promise<void> {
    const stopTimer = instruments.insertSeconds.startTimer();
    instruments.insertBusy.start();
    try {
      await withChildSpan("clickhouse.insert", { "db.system.name": "clickhouse", "db.operation.batch.size": rows.length }, () =>
        deps.store.insertRequests(rows, dedupToken(rows)),
      );
      stopTimer();
      clickHouseOutage.recovered();
    } catch (e) {
      clickHouseOutage.failed({ err: e, rows: rows.length });
      throw new ConnectError("writing the batch to ClickHouse failed; resend it", Code.Unavailable);
    } finally {
      instruments.insertBusy.end();
    }
  }

  /** Records the rows in RecordUsage calls of billingBatchRows; returns how many billing already knew. */
  async function recordUsage(rows: readonly RequestMetrics[]): Promise<number> {
    const stopTimer = instruments.billingSeconds.startTimer();
    instruments.billingBusy.start();
    const records = rows.map(toUsageRecord);
    const size = Math.min(options.billingBatchRows, maxBatchRows);
    const calls: Promise<number>[] = [];
    for (let i = 0; i < records.length; i += size) calls.push(recordBatch(records.slice(i, i + size)));
    try {
      const duplicates = (await Promise.all(calls)).reduce((a, b) => a + b, 0);
      stopTimer();
      return duplicates;
    } finally {
      instruments.billingBusy.end();
    }
  }

  /**
   * One RecordUsage call. Billing refuses a whole call for one record it cannot take (invalid, naming an org or key
   * it does not know, or taking a total past int64), and would refuse every resend: such a call is split, at the
   * boundary between owners (org, project and key) nearest its middle, until the refused records are alone, or are all
   * of one owner refused as not found (an org or key billing does not know is every one of its records' fault alike),
   * and those are set aside (kept in ClickHouse, logged with their request_id, counted), so bad rows never hold back
   * the rest: one owner's thousands take one call, not two for each. Any other failure fails the flush, to be resent.
   */
  async function recordBatch(called: UsageRecord[], sorted = false): Promise<number> {
    const outcome = await callBilling(called);
    if (typeof outcome === "number") return outcome;
    // Each owner's records together (a stable sort: a request's copies keep their order), so they split off whole.
    const records = sorted ? called : byOwner(called);
    const first = ownerOf(records[0] as UsageRecord);
    const oneOwner = records.every((r) => ownerOf(r) === first);
    if (records.length === 1 || (oneOwner && outcome.code === Code.NotFound)) {
      instruments.unbillable.inc(records.length);
      deps.log.error("billing refused usage records; they stay in ClickHouse and are not billed", {
        rows: records.length,
        request_ids: records.slice(0, maxLoggedIds).map((r) => r.requestId),
        org_id: records[0]?.orgId,
        api_key_id: records[0]?.apiKeyId || undefined,
        code: Code[outcome.code],
        err: outcome.rawMessage,
      });
      return 0;
    }
    // A refused call stored nothing: its halves can be tried alone.
    const half = oneOwner ? Math.ceil(records.length / 2) : ownerBoundary(records);
    const [a, b] = await Promise.all([recordBatch(records.slice(0, half), true), recordBatch(records.slice(half), true)]);
    return a + b;
  }

  /** RecordUsage in one of billingConcurrency slots: the duplicates billing counted, or its refusal of the records. */
  async function callBilling(records: UsageRecord[]): Promise<number | ConnectError> {
    // Calls wait in order for one of billingConcurrency slots, so an older flush's calls go first.
    if (billingCalls >= options.billingConcurrency) await new Promise<void>((resolve) => billingWaiters.push(resolve));
    else billingCalls++;
    try {
      const { duplicates } = await deps.billing.recordUsage({ records });
      billingOutage.recovered();
      return duplicates;
    } catch (e) {
      const err = ConnectError.from(e);
      if (refusals.has(err.code)) return err;
      billingOutage.failed({ err, code: Code[err.code] });
      throw new ConnectError(`recording usage in billing failed (${Code[err.code]}); resend the batch`, Code.Unavailable);
    } finally {
      const next = billingWaiters.shift();
      if (next) next();
      else billingCalls--;
    }
  }

  /** Reads one stream into the buffer while there is room, until it ends, fails or the process stops. */
  const read = async (batches: AsyncIterable<IngestMetricsRequest>, stream: StreamState, ending?: AbortSignal) => {
    const pending = batches[Symbol.asyncIterator]();
    const stop = ending && stopping ? AbortSignal.any([stopping, ending]) : (ending ?? stopping);
    try {
      for (;;) {
        await waitForRoom();
        while (stream.acks.length + stream.unacked >= options.maxUnsentAcks && !stream.failure && !stop?.aborted) {
          await new Promise<void>((resolve) => (stream.wakeReader = resolve));
        }
        if (stream.failure) return;
        const next = await nextUnlessStopped(pending, stop);
        if (!next || next.done || stream.failure) return;
        const batch = next.value;
        try {
          validateBatch(batch);
        } catch (e) {
          instruments.batches.inc({ outcome: "rejected" });
          deps.log.warn("rejected an invalid batch", {
            err: e,
            gateway_instance_id: batch.gatewayInstanceId,
            sequence: batch.sequence,
          });
          fail([{ stream, sequence: batch.sequence, rows: [], bytes: 0 }], ConnectError.from(e));
          return;
        }
        // A row without an org (a request refused before its key was accepted, from a gateway that still sends those)
        // is no one's to bill or query: acked with its batch, never stored.
        const rows = batch.metrics.filter((m, i) => {
          if (m.orgId === "") return false;
          const problem = rowProblem(m);
          if (problem === undefined) return true;
          instruments.outOfBounds.inc();
          deps.log.error("set aside a row that cannot be stored as sent; it is neither stored nor billed", {
            err: new ConnectError(`batch ${batch.sequence}, row ${i}: ${problem}`, Code.InvalidArgument),
            request_id: m.requestId,
            org_id: m.orgId,
            gateway_instance_id: batch.gatewayInstanceId,
          });
          return false;
        });
        if (buffer.length === 0) bufferSince = performance.now();
        const bytes = rows.reduce((n, m) => n + estimatedBytes(m), 0);
        buffer.push({ stream, sequence: batch.sequence, rows, bytes });
        bufferRows += rows.length;
        bufferBytes += bytes;
        held += rows.length;
        heldBytes += bytes;
        stream.unacked++;
        maybeFlush();
      }
    } catch (e) {
      // The gateway went away, broke the stream, or sent what is not a batch: nothing more to read from it. Unless it
      // left, its stream ends with why, as a stream ended cleanly says that all it sent was read.
      const err = ConnectError.from(e);
      if (err.code !== Code.Canceled) {
        // A message that does not decode (a string not UTF-8) or is too large: the batch's fault, not analytics'. A
        // connection reset is Internal or ResourceExhausted too, and neither: told apart by connect's own words.
        const undecodable = err.code === Code.Internal && err.rawMessage.startsWith("parse binary");
        const tooLarge = err.code === Code.ResourceExhausted && err.rawMessage.includes("larger than configured readMaxBytes");
        if (undecodable || tooLarge) {
          instruments.batches.inc({ outcome: "rejected" });
          deps.log.warn("rejected a batch that cannot be read", { err });
        } else deps.log.debug("ingest stream ended with an error", { err });
        const refused = undecodable ? new ConnectError(`a batch cannot be read: ${err.rawMessage}`, Code.InvalidArgument) : err;
        fail([{ stream, sequence: 0n, rows: [], bytes: 0 }], refused);
      }
    } finally {
      stream.readerDone = true;
      settle(stream);
      maybeFlush();
    }
  };

  stopping?.addEventListener(
    "abort",
    () => {
      wakeRoom();
      maybeFlush();
    },
    { once: true },
  );

  return {
    async *handle(batches, ending) {
      const stream: StreamState = {
        acks: [],
        unacked: 0,
        readerDone: false,
        failure: undefined,
        wake: undefined,
        wakeReader: undefined,
      };
      const wakeReader = () => {
        stream.wakeReader?.();
        stream.wakeReader = undefined;
      };
      ending?.addEventListener("abort", wakeReader, { once: true });
      stopping?.addEventListener("abort", wakeReader, { once: true });
      instruments.streams.inc();
      void read(batches, stream, ending);
      try {
        for (;;) {
          const ack = stream.acks.shift();
          if (ack) {
            yield ack;
            wakeReader();
            continue;
          }
          if (stream.failure) throw stream.failure;
          if (stream.readerDone && stream.unacked === 0) break;
          await new Promise<void>((resolve) => (stream.wake = resolve));
          stream.wake = undefined;
        }
      } finally {
        instruments.streams.dec();
        // A closed stream cannot be acked: its buffered rows still go in, and its gateway resends them.
        if (!stream.failure) stream.failure = new ConnectError("stream closed", Code.Canceled);
        wakeReader();
        ending?.removeEventListener("abort", wakeReader);
        stopping?.removeEventListener("abort", wakeReader);
      }
    },
  };
}

/** The next batch, or undefined once `stop` is aborted (then the gateway reconnects and resends what is unacked). */
function nextUnlessStopped<T>(
  batches: AsyncIterator<T>,
  stop: AbortSignal | undefined,
): Promise<IteratorResult<T> | undefined> {
  if (!stop) return batches.next();
  if (stop.aborted) return Promise.resolve(undefined);
  return new Promise((resolve, reject) => {
    const onStop = () => resolve(undefined);
    stop.addEventListener("abort", onStop, { once: true });
    batches
      .next()
      .then(resolve, reject)
      .finally(() => stop.removeEventListener("abort", onStop));
  });
}

function validateBatch(batch: IngestMetricsRequest): void {
  if (batch.metrics.length > maxBatchRows) {
    throw new ConnectError(
      `batch ${batch.sequence} has ${batch.metrics.length} rows; at most ${maxBatchRows} are allowed`,
      Code.InvalidArgument,
    );
  }
}

// A day: beyond the gateway's longest request (an hour at most), and summed over any range without wrapping.
const maxLatencyUs = 86_400_000_000n;

/**
 * What keeps a row from being stored as sent, if anything: a missing id or time, a time ClickHouse cannot hold, a
 * negative count, tokens or cost beyond billing's bounds for one request, or a latency over a day. Billing refuses
 * such a row, and stored it would be wrong or lost (see storableStart), or make totals and percentiles nonsense.
 * Refusing its batch would have the gateway resend it forever, holding back every batch after it: it is set aside
 * (logged with its request_id, counted) and the rest of its batch taken, as billing's refusals are.
 */
function rowProblem(m: RequestMetrics): string | undefined {
  const missing = !m.requestId ? "request_id" : !m.startTime ? "start_time" : !m.endTime ? "end_time" : undefined;
  if (missing) return `${missing} is required`;
  if (!storableStart(m.startTime as Timestamp)) {
    return `start_time must be a time from 1970-01-01 to ${new Date(Number(maxStartSeconds) * 1000).toISOString()}`;
  }
  if (!storableTime(m.endTime as Timestamp)) return timeProblem("end_time");
  if (m.firstTokenTime && !storableTime(m.firstTokenTime)) return timeProblem("first_token_time");
  for (const { field, max, value } of rowBounds) {
    const v = value(m);
    if (v < 0n || v > max) return `${field} must be in 0..${max}`;
  }
  return undefined;
}

const timeProblem = (field: string) => `${field} must be a time in years 1900..2299 (nanos 0..999999999)`;

// In the order a row's problems are reported. Built once: a list of them made for each row cost more than the checks.
const rowBounds: { field: string; max: bigint; value: (m: RequestMetrics) => bigint }[] = [
  { field: "usage.input_tokens", max: MAX_TOKENS_PER_REQUEST, value: (m) => m.usage?.inputTokens ?? 0n },
  { field: "usage.cached_input_tokens", max: MAX_TOKENS_PER_REQUEST, value: (m) => m.usage?.cachedInputTokens ?? 0n },
  { field: "usage.output_tokens", max: MAX_TOKENS_PER_REQUEST, value: (m) => m.usage?.outputTokens ?? 0n },
  { field: "usage.reasoning_tokens", max: MAX_TOKENS_PER_REQUEST, value: (m) => m.usage?.reasoningTokens ?? 0n },
  { field: "cost_nanos", max: MAX_COST_NANOS_PER_REQUEST, value: (m) => m.costNanos },
  { field: "total_latency_us", max: maxLatencyUs, value: (m) => m.totalLatencyUs },
  { field: "upstream_latency_us", max: maxLatencyUs, value: (m) => m.upstreamLatencyUs },
  { field: "ttft_us", max: maxLatencyUs, value: (m) => m.ttftUs },
  { field: "gateway_overhead_us", max: maxLatencyUs, value: (m) => m.gatewayOverheadUs },
];

// What DateTime64 columns and the queries hold: a time outside could fail a flush other gateways' rows share, or be
// acked and then missing or wrong in ClickHouse.
const minStorableSeconds = BigInt(Date.UTC(1900, 0, 1) / 1000);
const maxStorableSeconds = BigInt(Date.UTC(2300, 0, 1) / 1000);

function storableTime(ts: Timestamp): boolean {
  return ts.seconds >= minStorableSeconds && ts.seconds < maxStorableSeconds && ts.nanos >= 0 && ts.nanos < 1_000_000_000;
}

// start_time also goes through DateTime, which holds 1970 to 2106 and wraps outside: in the TTL (plus the longest
// retention, so it never wraps past 2106 and expires the row on arrival) and in the rollups' minutes and hours.
const maxStartSeconds = 2n ** 32n - BigInt(maxTtlDays) * 86_400n;

function storableStart(ts: Timestamp): boolean {
  return storableTime(ts) && ts.seconds >= 0n && ts.seconds < maxStartSeconds;
}

// What a decoded row takes in memory, measured on Bun: about 1.2 KB with short strings (ids, names), plus two bytes
// per UTF-16 unit of the strings clients and upstreams size (protobuf-es decodes into two-byte strings) and the
// objects of each tag and budget charge.
const rowBaseBytes = 1200;
const tagBaseBytes = 100;
// The base holds ids, names and codes this short; a gateway gone wrong may send any of them as long as a message.
const shortChars = 64;
const beyondShort = (s: string) => (s.length > shortChars ? 2 * s.length : 0);

/** Estimated memory of a decoded row, for the byte bound: cheap, as every row of every batch is counted. */
export function estimatedBytes(m: RequestMetrics): number {
  let bytes = rowBaseBytes + 2 * (m.endUserId.length + m.requestedModel.length + m.servedModel.length);
  for (const key in m.tags) bytes += tagBaseBytes + 2 * (key.length + (m.tags[key] as string).length);
  bytes +=
    beyondShort(m.requestId) +
    beyondShort(m.traceId) +
    beyondShort(m.spanId) +
    beyondShort(m.orgId) +
    beyondShort(m.projectId) +
    beyondShort(m.apiKeyId) +
    beyondShort(m.provider) +
    beyondShort(m.errorCode) +
    beyondShort(m.gatewayInstanceId);
  for (const charge of m.budgetCharges) bytes += tagBaseBytes + beyondShort(charge.leaseId);
  return bytes;
}

/** The same request ids give the same token, so ClickHouse drops a repeated insert whole. */
export function dedupToken(rows: readonly RequestMetrics[]): string {
  // One hash of the whole list: two updates per row were most of the cost.
  const ids = rows.map((m) => m.requestId).sort();
  return `ingest-${sha256Hex(`${ids.join("\n")}\n`)}`;
}

/** Request ids of records set aside together that their log line names; the rest are counted. */
const maxLoggedIds = 20;

/** Whose a usage record is: its org, project and key, which billing must know. */
const ownerOf = (r: UsageRecord) => `${r.orgId}\n${r.projectId}\n${r.apiKeyId}`;

/** Records in the order of their owners, each owner's in the order they came. */
function byOwner(records: UsageRecord[]): UsageRecord[] {
  const keyed = records.map((record) => ({ record, owner: ownerOf(record) }));
  keyed.sort((a, b) => (a.owner < b.owner ? -1 : a.owner > b.owner ? 1 : 0));
  return keyed.map((k) => k.record);
}

/** The index nearest the middle of records sorted by owner where one owner's end and the next one's begin. */
function ownerBoundary(records: UsageRecord[]): number {
  const mid = Math.ceil(records.length / 2);
  const boundary = (at: number) =>
    at > 0 && at < records.length && ownerOf(records[at - 1] as UsageRecord) !== ownerOf(records[at] as UsageRecord);
  for (let step = 0; step < records.length; step++) {
    if (boundary(mid - step)) return mid - step;
    if (boundary(mid + step)) return mid + step;
  }
  return mid;
}

/**
 * The usage record billing takes for a row. Its fields are already messages and values of the right types, so it is
 * written as the plain object a message is: create() would only check and copy each of them, for every row billed.
 */
export function toUsageRecord(m: RequestMetrics): UsageRecord {
  return {
    $typeName: "billing.v1.UsageRecord",
    requestId: m.requestId,
    orgId: m.orgId,
    projectId: m.projectId,
    apiKeyId: m.apiKeyId,
    model: m.requestedModel,
    provider: m.provider,
    endpoint: m.endpoint,
    usage: m.usage,
    costNanos: m.costNanos,
    occurTime: m.startTime,
    costBreakdown: m.costBreakdown,
    budgetCharges: m.budgetCharges,
  };
}

const flushBuckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** Counts the seconds during which at least one of overlapping operations runs. */
function busyTime(counter: Counter) {
  let running = 0;
  let since = 0;
  return {
    start() {
      if (running++ === 0) since = performance.now();
    },
    end() {
      if (--running === 0) counter.inc((performance.now() - since) / 1000);
    },
  };
}

function createInstruments(registers: Registry[], held: () => { rows: number; bytes: number }) {
  new Gauge({
    name: "analytics_ingest_buffered_rows",
    help: "Request rows held in memory: buffered for the next flush or being flushed.",
    registers,
    collect() {
      this.set(held().rows);
    },
  });
  new Gauge({
    name: "analytics_ingest_buffered_bytes",
    help: "Estimated memory of the request rows held: buffered for the next flush or being flushed.",
    registers,
    collect() {
      this.set(held().bytes);
    },
  });
  const batches = new Counter({
    name: "analytics_ingest_batches_total",
    help: "IngestMetrics batches by outcome: acked, rejected (invalid), failed (ClickHouse or billing).",
    labelNames: ["outcome"] as const,
    registers,
  });
  // Every outcome from zero, so the first failure is an increase (AnalyticsIngestFailing).
  for (const outcome of ["acked", "rejected", "failed"]) batches.inc({ outcome }, 0);
  return {
    streams: new Gauge({
      name: "analytics_ingest_streams",
      help: "Open IngestMetrics streams (one per connected gateway).",
      registers,
    }),
    batches,
    rows: new Counter({
      name: "analytics_ingest_rows_total",
      help: "Request rows in acked batches, resends included.",
      registers,
    }),
    unbillable: new Counter({
      name: "analytics_ingest_unbillable_rows_total",
      help:
        "Rows billing refused as invalid, of an unknown org or key, or past its totals' bound: kept in ClickHouse, " +
        "logged, not billed.",
      registers,
    }),
    outOfBounds: new Counter({
      name: "analytics_ingest_out_of_bounds_rows_total",
      help:
        "Rows without an id or time, with a time ClickHouse cannot hold, a negative count, or one past billing's " +
        "bounds or a day of latency: logged, not stored or billed.",
      registers,
    }),
    duplicates: new Counter({
      name: "analytics_ingest_duplicate_rows_total",
      help: "Acked rows billing already had: resends after a failure or restart.",
      registers,
    }),
    flushSeconds: new Histogram({
      name: "analytics_ingest_flush_seconds",
      help: "Time from the start of a flush to its acks: ClickHouse insert, waiting for the previous flush, billing.",
      buckets: flushBuckets,
      registers,
    }),
    insertSeconds: new Histogram({
      name: "analytics_ingest_insert_seconds",
      help: "Time to write a flush to ClickHouse (successful inserts).",
      buckets: flushBuckets,
      registers,
    }),
    billingSeconds: new Histogram({
      name: "analytics_ingest_billing_seconds",
      help: "Time to record a flush's usage in billing (successful flushes).",
      buckets: flushBuckets,
      registers,
    }),
    // Flushes overlap: rows over busy time is what each leg sustains, where summed durations would understate it.
    insertBusy: busyTime(
      new Counter({
        name: "analytics_ingest_insert_busy_seconds_total",
        help: "Time during which at least one ClickHouse insert was running.",
        registers,
      }),
    ),
    billingBusy: busyTime(
      new Counter({
        name: "analytics_ingest_billing_busy_seconds_total",
        help: "Time during which at least one flush was being recorded in billing.",
        registers,
      }),
    ),
  };
}
