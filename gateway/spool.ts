import type { RequestMetrics } from "../gen/analytics/v1/analytics_pb.ts";

/** Metrics of finished requests, numbered for the ingest stream. */
export interface SpoolBatch {
  readonly sequence: bigint;
  readonly metrics: readonly RequestMetrics[];
}

/**
 * Where finished requests wait until analytics acks them. The shipper appends each request,
 * seals pending rows into numbered batches, and acks batches as analytics confirms them;
 * a durable implementation keeps all of it across restarts.
 */
export interface Spool {
  /** Keeps one finished request; false when the spool is full and the row was dropped. */
  append(metrics: RequestMetrics): boolean;
  /** Cuts up to maxRows pending rows into the next batch; undefined when nothing is pending. */
  seal(maxRows: number): SpoolBatch | undefined;
  /** Sealed batches not acked yet, oldest first. */
  unacked(): Iterable<SpoolBatch>;
  /** Forgets the batch with this sequence; false for unknown sequences (late duplicate acks). */
  ack(sequence: bigint): boolean;
  /** Rows appended but not sealed. */
  readonly pendingRows: number;
  /** All rows held: pending and unacked. */
  readonly rows: number;
  readonly maxRows: number;
}

export interface MemorySpoolOptions {
  maxRows?: number;
  /**
   * Sequence of the first batch. Sequences must keep increasing across restarts of a replica;
   * a process that remembers nothing starts from the clock (1000 numbers per millisecond).
   */
  firstSequence?: bigint;
}

/** A Spool in process memory: fast, bounded, and lost with the process. */
export function createMemorySpool(options: MemorySpoolOptions = {}): Spool {
  const maxRows = options.maxRows ?? 100_000;
  let next = options.firstSequence ?? BigInt(Date.now()) * 1000n;
  let pending: RequestMetrics[] = [];
  const sealed = new Map<bigint, SpoolBatch>();
  let sealedRows = 0;

  return {
    append(metrics) {
      if (pending.length + sealedRows >= maxRows) return false;
      pending.push(metrics);
      return true;
    },
    seal(max) {
      if (pending.length === 0) return undefined;
      let rows: RequestMetrics[];
      if (pending.length <= max) {
        rows = pending;
        pending = [];
      } else {
        rows = pending.slice(0, max);
        pending = pending.slice(max);
      }
      const batch: SpoolBatch = { sequence: next++, metrics: rows };
      sealed.set(batch.sequence, batch);
      sealedRows += rows.length;
      return batch;
    },
    unacked: () => sealed.values(),
    ack(sequence) {
      const batch = sealed.get(sequence);
      if (!batch) return false;
      sealed.delete(sequence);
      sealedRows -= batch.metrics.length;
      return true;
    },
    get pendingRows() {
      return pending.length;
    },
    get rows() {
      return pending.length + sealedRows;
    },
    maxRows,
  };
}
