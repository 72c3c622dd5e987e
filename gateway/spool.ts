import { toBinary } from "@bufbuild/protobuf";
import { type RequestMetrics, RequestMetricsSchema } from "../gen/analytics/v1/analytics_pb.ts";

/** Rows of finished requests sealed under one sequence number for the ingest stream. */
export interface SpoolBatch {
  readonly sequence: bigint;
  readonly rows: number;
  /** Left by an earlier process (or another replica): analytics may have seen it already. */
  readonly recovered: boolean;
}

/**
 * Where finished requests wait until analytics acks them. The shipper appends each request,
 * seals pending rows into numbered batches, reads batches to send them, and acks them as
 * analytics confirms; a durable implementation keeps all of it across restarts.
 * Rows are held encoded (toBinary of RequestMetrics), the form they travel in.
 */
export interface Spool {
  /** Keeps one finished request before returning; false when the spool is full and the row was dropped. */
  append(metrics: RequestMetrics): boolean;
  /** Cuts up to maxRows pending rows into the next batch; undefined when nothing is pending. */
  seal(maxRows: number): SpoolBatch | undefined;
  /** Sealed batches not acked yet, oldest (lowest sequence) first. */
  unacked(): Iterable<SpoolBatch>;
  /** The encoded rows of an unacked batch, in append order. */
  read(batch: SpoolBatch): Uint8Array[];
  /** Forgets the batch with this sequence; false for unknown sequences (late duplicate acks). */
  ack(sequence: bigint): boolean;
  /** Rows appended but not sealed. */
  readonly pendingRows: number;
  /** All rows held: pending and unacked. */
  readonly rows: number;
  /** Space used, in bytes, counted against maxBytes. */
  readonly bytes: number;
  readonly maxBytes: number;
  /** Makes what is held durable and releases files; the spool is unusable afterwards. */
  close(): void;
}

/**
 * Sequence of the first batch of a spool that remembers none: sequences must keep increasing
 * across restarts of a replica, so a fresh spool starts from the clock (1000 numbers per millisecond).
 */
export const clockSequence = (): bigint => BigInt(Date.now()) * 1000n;

export interface MemorySpoolOptions {
  maxBytes?: number;
  firstSequence?: bigint;
}

// Per-row bookkeeping counted on top of the encoded row, as a file spool's record header is.
const rowOverheadBytes = 9;

/** A Spool in process memory: fast, bounded, and lost with the process. For tests and benchmarks. */
export function createMemorySpool(options: MemorySpoolOptions = {}): Spool {
  const maxBytes = options.maxBytes ?? 64 * 1024 * 1024;
  let next = options.firstSequence ?? clockSequence();
  let pending: Uint8Array[] = [];
  const sealed = new Map<bigint, { batch: SpoolBatch; rows: Uint8Array[] }>();
  let sealedRows = 0;
  let bytes = 0;
  const size = (rows: readonly Uint8Array[]) => rows.reduce((n, r) => n + r.length + rowOverheadBytes, 0);

  return {
    append(metrics) {
      const row = toBinary(RequestMetricsSchema, metrics);
      if (bytes + row.length + rowOverheadBytes > maxBytes) return false;
      pending.push(row);
      bytes += row.length + rowOverheadBytes;
      return true;
    },
    seal(max) {
      if (pending.length === 0) return undefined;
      const rows = pending.slice(0, max);
      pending = pending.slice(max);
      const batch: SpoolBatch = { sequence: next++, rows: rows.length, recovered: false };
      sealed.set(batch.sequence, { batch, rows });
      sealedRows += rows.length;
      return batch;
    },
    *unacked() {
      for (const { batch } of sealed.values()) yield batch;
    },
    read(batch) {
      const entry = sealed.get(batch.sequence);
      if (!entry) throw new Error(`batch ${batch.sequence} is not in the spool`);
      return entry.rows;
    },
    ack(sequence) {
      const entry = sealed.get(sequence);
      if (!entry) return false;
      sealed.delete(sequence);
      sealedRows -= entry.rows.length;
      bytes -= size(entry.rows);
      return true;
    },
    get pendingRows() {
      return pending.length;
    },
    get rows() {
      return pending.length + sealedRows;
    },
    get bytes() {
      return bytes;
    },
    maxBytes,
    close() {},
  };
}
