/** Rows of finished requests sealed under one sequence number for the ingest stream. */
export interface SpoolBatch {
  readonly sequence: bigint;
  readonly rows: number;
  /** Left by an earlier process (or another replica): analytics may have seen it already. */
  readonly recovered: boolean;
}

/**
 * A batch the spool holds but cannot give back whole: its file is gone, shorter than its records, or damaged. Reading
 * it again will not help; any other error from read (too many open files, EIO) may pass, and the batch is kept.
 */
export class SpoolBatchDamagedError extends Error {
  override name = "SpoolBatchDamagedError";
  constructor(
    message: string,
    /** The rows that could still be read whole, in append order. */
    readonly rows: Uint8Array[] = [],
  ) {
    super(message);
  }
}

/**
 * Where finished requests wait until analytics acks them. The shipper appends each request,
 * seals pending rows into numbered batches, reads batches to send them, and acks them as
 * analytics confirms; a durable implementation keeps all of it across restarts.
 * Rows are held encoded (toBinary of RequestMetrics), the form they travel in.
 */
export interface Spool {
  /** Keeps one finished request's encoded row before returning; false when the spool is full and it was dropped. */
  append(row: Uint8Array): boolean;
  /**
   * Cuts the oldest pending rows into the next batch: up to maxRows, and up to maxBytes of encoded rows unless the
   * first row alone is larger. Undefined when nothing is pending.
   */
  seal(maxRows: number, maxBytes: number): SpoolBatch | undefined;
  /** Sealed batches not acked yet, oldest (lowest sequence) first. */
  unacked(): Iterable<SpoolBatch>;
  /**
   * The encoded rows of an unacked batch, in append order. Throws SpoolBatchDamagedError when they cannot all be read
   * and never will; any other error is worth a retry.
   */
  read(batch: SpoolBatch): Uint8Array[];
  /** Forgets the batch with this sequence; false for unknown sequences (late duplicate acks). */
  ack(sequence: bigint): boolean;
  /**
   * Whether a row of this many bytes could be written now, tried without one: after an append its disk refused, this
   * tells when the disk takes writes again though no request comes to try. True where nothing refuses writes.
   */
  writable(rowBytes: number): boolean;
  /** Rows appended but not sealed... */
  readonly pendingRows: number;
  /** ...and their encoded size. */
  readonly pendingBytes: number;
  /** All rows held: pending and unacked. */
  readonly rows: number;
  /** Space used, in bytes, counted against maxBytes. */
  readonly bytes: number;
  /**
   * Rows whose flush to disk failed since the spool opened: still sent, but a host crash before analytics acks them
   * loses them.
   */
  readonly syncFailedRows: number;
  readonly maxBytes: number;
  /** Makes what is held durable and releases files; the spool is unusable afterwards. */
  close(): void;
}

/**
 * Sequence of the first batch of a spool that remembers none: sequences must keep increasing
 * across restarts of a replica, so a fresh spool starts from the clock (1000 numbers per millisecond).
 */
export const clockSequence = (): bigint => BigInt(Date.now()) * 1000n;

/**
 * Encoded rows in one batch at most, by default: analytics takes IngestMetrics messages of up to 16 MiB, and the
 * largest row the gateway's request checks let through (16 tags of 64 and 512 four-byte characters, a 256-character
 * user) takes about 40 KB.
 */
export const defaultBatchBytes = 4 * 1024 * 1024;

/** The least a batch's bytes may be bounded to: room for a few of those largest rows. */
export const minBatchBytes = 256 * 1024;

export interface MemorySpoolOptions {
  maxBytes?: number;
  firstSequence?: bigint;
}

/** Per-row bookkeeping counted against a spool's bound on top of the encoded row (a file spool's record header). */
export const rowOverheadBytes = 9;

/**
 * How many of the `count` oldest pending rows, `bytes(i)` each when encoded, make the next batch: at most maxRows
 * and at most maxBytes, but at least one, so a row larger than maxBytes goes alone.
 */
export function batchLength(count: number, bytes: (i: number) => number, maxRows: number, maxBytes: number): number {
  let n = 0;
  let size = 0;
  while (n < count && n < maxRows) {
    size += bytes(n);
    if (n > 0 && size > maxBytes) break;
    n++;
  }
  return n;
}

/** A Spool in process memory: fast, bounded, and lost with the process. For tests and benchmarks. */
export function createMemorySpool(options: MemorySpoolOptions = {}): Spool {
  const maxBytes = options.maxBytes ?? 64 * 1024 * 1024;
  let next = options.firstSequence ?? clockSequence();
  let pending: Uint8Array[] = [];
  let pendingBytes = 0;
  const sealed = new Map<bigint, { batch: SpoolBatch; rows: Uint8Array[] }>();
  let sealedRows = 0;
  let bytes = 0;
  const size = (rows: readonly Uint8Array[]) => rows.reduce((n, r) => n + r.length + rowOverheadBytes, 0);

  return {
    append(row) {
      if (bytes + row.length + rowOverheadBytes > maxBytes) return false;
      pending.push(row);
      pendingBytes += row.length;
      bytes += row.length + rowOverheadBytes;
      return true;
    },
    seal(maxRows, maxBatchBytes) {
      if (pending.length === 0) return undefined;
      const n = batchLength(pending.length, (i) => (pending[i] as Uint8Array).length, maxRows, maxBatchBytes);
      const rows = pending.slice(0, n);
      pending = pending.slice(n);
      for (const row of rows) pendingBytes -= row.length;
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
      if (!entry) throw new SpoolBatchDamagedError(`batch ${batch.sequence} is not in the spool`);
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
    writable: () => true,
    get pendingRows() {
      return pending.length;
    },
    get pendingBytes() {
      return pendingBytes;
    },
    get rows() {
      return pending.length + sealedRows;
    },
    get bytes() {
      return bytes;
    },
    syncFailedRows: 0,
    maxBytes,
    close() {},
  };
}
