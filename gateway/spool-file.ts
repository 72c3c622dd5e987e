import {
  close,
  closeSync,
  existsSync,
  fdatasync,
  fdatasyncSync,
  fsync,
  fsyncSync,
  ftruncateSync,
  open,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  rmSync,
  statSync,
  unlink,
  utimesSync,
  write,
  writeFileSync,
  writeSync,
} from "node:fs";
import { createHash } from "node:crypto";
import { hostname } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { createOutageLog, type Logger } from "../lib/log.ts";
import { ownerOnlyDir } from "../lib/owner-only-dir.ts";
import { procStatFields } from "../lib/processes.ts";
import {
  batchLength,
  clockSequence,
  defaultBatchBytes,
  type Spool,
  type SpoolBatch,
  SpoolBatchDamagedError,
} from "./spool.ts";

// Descriptor-level file calls off the event loop (fs/promises would wrap descriptors in handles).
const fsAsync = {
  open: promisify(open),
  write: promisify(write) as (fd: number, data: Uint8Array) => Promise<unknown>,
  fsync: promisify(fsync),
  // Looked up at each call, so tests can watch what is flushed.
  fdatasync: (fd: number) => promisify(fdatasync)(fd),
  close: promisify(close),
  unlink: promisify(unlink),
};

/**
 * On-disk layout. Each gateway replica owns `<root>/<name>/`, holding a LOCK file and numbered
 * segment files `<id>.seg`. A segment starts with the 8-byte magic and is a sequence of records:
 *
 *   u32 LE payload length | u32 LE crc32(type, payload) | u8 type | payload
 *
 *   ROW  (1): RequestMetrics, protobuf binary
 *   SEAL (2): u64 sequence | u32 rows | u32 parts | parts x (u32 segment | u32 start | u32 end)
 *             the batch is every ROW record inside those byte ranges
 *   ACK  (3): u64 sequence
 *
 * Records are only ever appended. Segments are deleted oldest first, each once every batch with rows in
 * it is acked and it is no longer the one being written, so SEAL and ACK records (which may sit in a newer
 * segment) outlive the rows they describe. The next segment is created ahead of need and may be empty.
 * A record cut short by a crash fails its length or crc check and ends the reading of its segment; one damaged in the
 * middle (its crc fails, whether or not its length holds) is skipped up to the next record whose crc holds. ROW
 * records no SEAL covers (never sealed, or sealed while the disk refused the SEAL) are sealed again at the next open.
 */
const magic = Buffer.from("MSPOOL01");
const headerBytes = 9;
const rowType = 1;
const sealType = 2;
const ackType = 3;

export type FsyncPolicy = "always" | "interval" | "never";

export interface FileSpoolOptions {
  /** Directory holding one spool directory per gateway replica. */
  root: string;
  /** This replica's directory under root; other directories there whose owner is gone are adopted. */
  name: string;
  /** Bound on the segment files' total size; rows that do not fit are dropped. */
  maxBytes: number;
  /**
   * When appended rows reach the disk: "always" fdatasyncs every append (survives a host crash, costs a
   * disk flush per request), "interval" every fsyncIntervalMs, "never" leaves it to the OS. A process crash
   * loses nothing in any mode: every append is written to the file before append returns.
   */
  fsync: FsyncPolicy;
  fsyncIntervalMs?: number;
  /** A segment is closed and a new one started once it is this large (and has no pending rows). */
  segmentBytes?: number;
  /** Rows recovered unsealed, or adopted from another directory, are sealed into batches of this many rows... */
  batchRows?: number;
  /** ...and of at most this many bytes of encoded rows (the shipper's limits). */
  batchBytes?: number;
  /** Rows of sealed batches kept in memory for sending; batches beyond it are read back from disk. */
  cacheRows?: number;
  /** How often the open spool refreshes its LOCK, for owners that cannot check this process (default 2 s). */
  lockRefreshMs?: number;
  /** Other components' state kept in this directory (the budget lease journal, the calls in flight). */
  sidecars?: readonly SpoolSidecar[];
  /** Writes length bytes of data from offset at the descriptor's position (fs.writeSync); tests fill the disk here. */
  write?: (fd: number, data: Uint8Array, offset: number, length: number) => number;
  log?: Logger;
}

/**
 * A component's state kept in a spool directory, in `file`: the directory stays at close while that file does. When an
 * orphan is adopted, `rows` gives the rows its file there stands for (`lastRow` is the newest row the orphan held), moved
 * here with the orphan's own; once all are here, `adopt` carries its state into this directory, and the orphan is
 * deleted.
 */
export interface SpoolSidecar {
  file: string;
  rows?(orphanDir: string, lastRow: Uint8Array | undefined): Uint8Array[];
  adopt?(orphanDir: string, ownDir: string): void;
}

/**
 * A LOCK whose owner cannot be checked from here (another host, or another container's PID namespace) is held
 * while its owner refreshes it: one untouched for this long is stale. Hosts sharing a spool root must keep their
 * clocks within a fraction of it.
 */
export const lockStaleMs = 10_000;

/** The spool's directory is locked by another live process, or one this process cannot check. */
export class SpoolInUseError extends Error {
  override name = "SpoolInUseError";
  constructor(
    readonly dir: string,
    readonly pid: number,
    /** The owner could not be checked: its LOCK goes stale within lockStaleMs if it has stopped. */
    readonly mayGoStale: boolean,
  ) {
    super(
      mayGoStale
        ? `spool directory ${dir} is locked by pid ${pid} of another host or container, refreshed in the last ${lockStaleMs / 1000} s`
        : `spool directory ${dir} is in use by pid ${pid}; give each gateway replica its own GATEWAY_INSTANCE_ID`,
    );
  }
}

export interface SpoolRecovery {
  /** Unacked rows found in this replica's own directory (unsealed ones included). */
  rows: number;
  /** Records cut short by a crash, skipped: each ends its segment's reading. */
  tornRecords: number;
  /** Records in the middle of a segment whose bytes were damaged, skipped: the records after them are read. */
  damagedRecords: number;
  /** Batches beyond the batch bounds (sealed by an earlier version or other settings), sealed again within them. */
  resealedBatches: number;
  /** Directories of replicas that are gone, whose rows moved into this spool. */
  adoptedDirs: string[];
  adoptedRows: number;
}

export interface FileSpool extends Spool {
  readonly dir: string;
  readonly recovery: SpoolRecovery;
  /**
   * The newest row this directory held when it was opened, before any orphan's rows moved in: a component that notes
   * each row written just after it (the calls journal) knows from it which row a crash may have cut that note short of.
   */
  readonly lastRow: Uint8Array | undefined;
  /** Resolves once background file work (segment deletions, closes, the spare segment) has caught up. */
  idle(): Promise<void>;
}

interface Part {
  segment: number;
  start: number;
  end: number;
}

interface DiskBatch extends SpoolBatch {
  readonly parts: readonly Part[];
}

interface Segment {
  id: number;
  path: string;
  size: number;
  /** Unacked batches with rows in this segment. */
  refs: number;
}

/** The segment being written, by its descriptor. */
interface Writer {
  segment: Segment;
  fd: number;
  /** Written to since its last flush started. */
  dirty: boolean;
  /** ROW records written since its last flush started. */
  unsynced: number;
}

interface PendingRow extends Part {
  row: Uint8Array;
}

/** A ROW record read from a segment, and its place among the segment's ROW records. */
interface FoundRow extends Part {
  index: number;
}

// Directories this process holds, so a second open in the same process is refused.
const openDirs = new Set<string>();

// Rows hold tenants' request metadata: the spool is this user's alone, as billing's Postgres directory is.
const ownerOnlyFile = 0o600;

/**
 * The spool directory of a replica, by its instance id: the id itself when it is all letters, digits and `._-` (a pod
 * name); any other id has those characters replaced and a hash of the whole id after a `~`, which no id kept as it is
 * holds, so two ids differing only in the replaced characters never share a directory.
 */
export function spoolDirName(instanceId: string): string {
  if (/^[A-Za-z0-9._-]+$/.test(instanceId)) return instanceId;
  const hash = createHash("sha256").update(instanceId).digest("hex").slice(0, 16);
  return `${instanceId.replace(/[^A-Za-z0-9._-]/g, "_")}~${hash}`;
}

/** Opens (or creates) this replica's spool: replays what an earlier process left, then adopts orphans. */
export function openFileSpool(options: FileSpoolOptions): FileSpool {
  const { log } = options;
  const dir = join(options.root, options.name);
  const maxBytes = options.maxBytes;
  const segmentBytes = options.segmentBytes ?? clamp(Math.floor(maxBytes / 16), 64 * 1024, 64 * 1024 * 1024);
  const batchRows = options.batchRows ?? 1000;
  const batchBytes = options.batchBytes ?? defaultBatchBytes;
  // As many as the shipper keeps in flight by default, so sending rarely reads the disk.
  const cacheRows = options.cacheRows ?? 100_000;
  const fsyncPolicy = options.fsync;
  const write = options.write ?? ((fd, data, offset, length) => writeSync(fd, data, offset, length));
  const sidecars = options.sidecars ?? [];

  // The root as well as this replica's own: it holds the other replicas' spools, adopted from there once they are gone.
  for (const path of [options.root, dir]) ownerOnlyDir(path, log);
  const owner = acquireLock(dir);
  if (owner !== undefined) throw new SpoolInUseError(dir, owner.pid, heldByRefresh(owner));
  openDirs.add(dir);
  const lockPath = join(dir, "LOCK");
  // Once per outage: a disk remounted read-only warned at every refresh, every 2 s, for as long as it lasted.
  const lockOutage = createOutageLog(log, {
    failed: "refreshing the metrics spool's LOCK failed",
    recovered: "refreshing the metrics spool's LOCK works again",
  });
  const lockTimer = setInterval(() => {
    try {
      const now = new Date();
      utimesSync(lockPath, now, now);
      lockOutage.recovered({ dir });
    } catch (e) {
      lockOutage.failed({ err: e, dir });
    }
  }, options.lockRefreshMs ?? 2000);
  lockTimer.unref?.();

  const loaded = loadDir(dir, log);
  const segments = loaded.segments;
  const batches = new Map<bigint, DiskBatch>();
  const cache = new Map<bigint, Uint8Array[]>();
  let cachedRows = 0;
  let pending: PendingRow[] = [];
  let pendingBytes = 0;
  let sealedRows = 0;
  let bytes = [...segments.values()].reduce((n, s) => n + s.size, 0);
  let next = loaded.maxSequence >= clockSequence() ? loaded.maxSequence + 1n : clockSequence();
  let current: Writer | undefined;
  let syncFailedRows = 0;
  let closed = false;

  const segmentPath = (id: number) => join(dir, `${String(id).padStart(10, "0")}.seg`);
  let nextSegmentId = Math.max(0, ...segments.keys()) + 1;

  /** Writes all of data at fd's position: a short write (a disk filling up) goes on, one without progress fails. */
  const writeAll = (fd: number, data: Uint8Array) => {
    for (let done = 0; done < data.length;) {
      const n = write(fd, data, done, data.length - done);
      if (n <= 0) throw new Error(`no room to write ${data.length - done} more bytes to the metrics spool`);
      done += n;
    }
  };

  // Loud once while the disk refuses writes (full, most likely), quiet while retrying.
  const diskOutage = createOutageLog(
    log,
    { failed: "metrics spool: writing failed", recovered: "metrics spool: writing works again" },
    "error",
  );
  const writeFailed = (what: string, err: unknown) => diskOutage.failed({ what, err, dir });

  const syncDir = () => {
    const fd = openSync(dir, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  };

  // Creating, syncing, closing and deleting files can stall for a long time while the disk is busy (they wait for
  // the filesystem's journal), so none of it happens on the request path: the next segment is created ahead of
  // need, and closes and deletions run in the background, one after another in the order they were asked for.
  let background: Promise<void> = Promise.resolve();
  const inBackground = (what: string, work: () => Promise<void>) => {
    background = background.then(work).catch((err) => {
      // Once closed, the directory may be gone with what the work was about.
      if (!closed) log?.warn(`metrics spool: ${what} failed`, { err, dir });
    });
  };
  let spare: { id: number; fd: number } | undefined;
  let preparingSpare = false;

  const prepareSpare = () => {
    if (spare || preparingSpare || closed) return;
    preparingSpare = true;
    const id = nextSegmentId++;
    inBackground("creating the next segment", async () => {
      try {
        const fd = await fsAsync.open(segmentPath(id), "wx", ownerOnlyFile);
        try {
          await fsAsync.write(fd, magic);
        } catch (e) {
          // A full disk must not leave a segment without its header behind.
          await fsAsync.close(fd);
          await fsAsync.unlink(segmentPath(id));
          throw e;
        }
        if (fsyncPolicy !== "never") {
          const dirFd = await fsAsync.open(dir, "r");
          await fsAsync.fsync(dirFd).finally(() => fsAsync.close(dirFd));
        }
        if (closed) {
          await fsAsync.close(fd);
          await fsAsync.unlink(segmentPath(id));
          return;
        }
        spare = { id, fd };
      } finally {
        preparingSpare = false;
      }
    });
  };

  const openSegment = () => {
    let id: number;
    let fd: number;
    if (spare) {
      ({ id, fd } = spare);
      spare = undefined;
    } else {
      // No spare yet (the first segment, or rotations faster than the disk): create one here, past any file
      // that appeared meanwhile (a previous owner's spare, created after this spool read the directory).
      for (;;) {
        id = nextSegmentId++;
        try {
          fd = openSync(segmentPath(id), "wx", ownerOnlyFile);
          break;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
        }
      }
      try {
        writeAll(fd, magic);
        if (fsyncPolicy !== "never") syncDir();
      } catch (e) {
        closeSync(fd);
        rmSync(segmentPath(id), { force: true });
        throw e;
      }
    }
    const segment: Segment = { id, path: segmentPath(id), size: magic.length, refs: 0 };
    segments.set(id, segment);
    bytes += magic.length;
    current = { segment, fd, dirty: true, unsynced: 0 };
    prepareSpare();
    return current;
  };

  // Loud once while flushes fail (a disk failing), quiet while they go on failing.
  let syncFailing = false;
  const syncOutage = createOutageLog(
    log,
    {
      failed: "metrics spool: a flush to disk failed; its rows are sent, but a host crash before their ack loses them",
      recovered: "metrics spool: flushes to disk work again",
    },
    "error",
  );

  /**
   * A flush of `rows` rows that failed. No later flush of the file would tell: Linux marks the pages that failed clean
   * and reports the error once, so a retry succeeds without writing them (PostgreSQL, which found this, stops rather
   * than retry). The rows are still sent, from memory or the page cache, but a host crash before analytics acks them
   * loses them: they are counted in syncFailedRows, and the segment, if still written, is written no more, so the rows
   * after them go to a file whose flushes tell the truth and are not read back behind a hole at the next start. Once
   * an outage: a disk failing every flush would otherwise start a segment per row under "always".
   */
  const syncFailed = (writer: Writer, rows: number, err: unknown) => {
    syncFailedRows += rows;
    syncOutage.failed({ err, dir, segment: writer.segment.id, rows });
    if (!syncFailing && current === writer) {
      closeInBackground(writer, false);
      current = undefined;
    }
    syncFailing = true;
  };
  const synced = () => {
    syncFailing = false;
    syncOutage.recovered({ dir });
  };

  /** Closes a segment's descriptor in the background, its rows reaching the disk first unless fsync is "never". */
  const closeInBackground = (writer: Writer, flush: boolean) => {
    const rows = writer.unsynced;
    inBackground("closing a segment", async () => {
      try {
        if (fsyncPolicy !== "never" && flush) {
          try {
            await fsAsync.fdatasync(writer.fd);
            synced();
          } catch (e) {
            syncFailed(writer, rows, e);
          }
        }
      } finally {
        await fsAsync.close(writer.fd);
      }
    });
  };

  const closeCurrent = () => {
    if (!current) return;
    closeInBackground(current, current.dirty);
    current = undefined;
    collectSegments();
  };

  /** Deletes fully acked segments, oldest first, up to the first one still needed. */
  const collectSegments = () => {
    // Rows appended and not sealed yet lie in the oldest pending row's segment and after it.
    const firstPending = pending[0]?.segment ?? Number.POSITIVE_INFINITY;
    for (const segment of [...segments.values()].sort((a, b) => a.id - b.id)) {
      if (segment.refs > 0 || segment === current?.segment || segment.id >= firstPending) return;
      deleteSegment(segment);
    }
  };

  const deleteSegment = (segment: Segment) => {
    if (current?.segment === segment) {
      closeInBackground(current, false);
      current = undefined;
    }
    segments.delete(segment.id);
    bytes -= segment.size;
    inBackground("deleting an acked segment", () => fsAsync.unlink(segment.path));
  };

  /** Appends one record to the current segment; returns its byte range there. */
  const writeRecord = (type: number, payload: Uint8Array): Part => {
    const target = current ?? openSegment();
    const record = Buffer.allocUnsafe(headerBytes + payload.length);
    record.writeUInt32LE(payload.length, 0);
    record[8] = type;
    record.set(payload, headerBytes);
    record.writeUInt32LE(Bun.hash.crc32(record.subarray(8)), 4);
    const start = target.segment.size;
    try {
      writeAll(target.fd, record);
    } catch (e) {
      // Nothing may follow a half-written record: it is cut off, and writing goes on in a new segment.
      try {
        ftruncateSync(target.fd, start);
      } catch (err) {
        log?.warn("metrics spool: cutting off a half-written record failed; it reads as a torn tail", { err, dir });
      }
      // Its rows since the last fsync reach the disk as a rotated segment's do: the fsync timer no longer sees it.
      closeInBackground(target, target.dirty);
      current = undefined;
      throw e;
    }
    diskOutage.recovered({ dir });
    target.segment.size += record.length;
    target.dirty = true;
    if (type === rowType) target.unsynced++;
    bytes += record.length;
    if (fsyncPolicy === "always") {
      target.dirty = false;
      const rows = target.unsynced;
      target.unsynced = 0;
      try {
        fdatasyncSync(target.fd);
        synced();
      } catch (e) {
        // Written all the same: the record is kept, and sent, as any other.
        syncFailed(target, rows, e);
      }
    }
    return { segment: target.segment.id, start, end: start + record.length };
  };

  const appendRow = (row: Uint8Array): boolean => {
    if (closed) return false;
    if (bytes + headerBytes + row.length > maxBytes) return false;
    try {
      pending.push({ ...writeRecord(rowType, row), row });
      pendingBytes += row.length;
      return true;
    } catch (e) {
      writeFailed("writing a row", e);
      return false;
    }
  };

  const addBatch = (batch: DiskBatch, rows: Uint8Array[] | undefined) => {
    batches.set(batch.sequence, batch);
    sealedRows += batch.rows;
    for (const part of batch.parts) {
      const segment = segments.get(part.segment);
      if (segment) segment.refs++;
    }
    if (rows && cachedRows + rows.length <= cacheRows) {
      cache.set(batch.sequence, rows);
      cachedRows += rows.length;
    }
  };

  /**
   * Writes a batch's SEAL record; false when the disk refuses it. The batch is then kept in memory alone, and sent and
   * acked as any other: its rows are on disk with no SEAL covering them, so a restart finds them unsealed and sends
   * them again. Leaving them pending instead would keep their segment, and with it the full disk, forever.
   */
  const writeSeal = (batch: DiskBatch, what: string): boolean => {
    try {
      writeRecord(sealType, encodeSeal(batch.sequence, batch.rows, batch.parts));
      return true;
    } catch (e) {
      writeFailed(what, e);
      return false;
    }
  };

  /** Seals pending rows; adopted rows are marked recovered and not cached. */
  const sealRows = (take: PendingRow[], recovered: boolean): DiskBatch => {
    const parts = partsOf(take);
    const batch: DiskBatch = { sequence: next++, rows: take.length, recovered, parts };
    writeSeal(batch, "sealing a batch");
    addBatch(batch, recovered ? undefined : take.map((p) => p.row));
    return batch;
  };

  /** Seals the oldest pending rows; undefined when none are pending. */
  const sealPending = (maxRows: number, maxBytes: number, recovered: boolean): DiskBatch | undefined => {
    if (pending.length === 0 || closed) return undefined;
    const n = batchLength(pending.length, (i) => (pending[i] as PendingRow).row.length, maxRows, maxBytes);
    const take = n === pending.length ? pending : pending.slice(0, n);
    const batch = sealRows(take, recovered);
    pending = n === pending.length ? [] : pending.slice(n);
    for (const p of take) pendingBytes -= p.row.length;
    if (pending.length === 0 && current && current.segment.size >= segmentBytes) closeCurrent();
    return batch;
  };

  /**
   * A batch's rows read back from its segments. A segment gone, short or damaged throws SpoolBatchDamagedError with
   * the rows still whole; any other error (too many open files, EIO) is thrown as it is, the batch kept for a retry.
   */
  const readBatch = (batch: DiskBatch): Uint8Array[] => {
    const rows: Uint8Array[] = [];
    const damage: string[] = [];
    for (const part of batch.parts) {
      const segment = segments.get(part.segment);
      let buf: Buffer | undefined;
      try {
        buf = segment && readRange(segment.path, part.start, part.end);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      }
      if (!buf) {
        damage.push(`segment ${part.segment} is gone`);
        continue;
      }
      const end = forEachRecord(
        buf,
        0,
        (type, payload) => {
          if (type === rowType) rows.push(payload);
        },
        (start) => damage.push(`segment ${part.segment} has a damaged record at ${part.start + start}`),
      );
      if (buf.length < part.end - part.start) damage.push(`segment ${part.segment} is shorter than expected`);
      else if (end < buf.length) damage.push(`segment ${part.segment} has a damaged record at ${part.start + end}`);
    }
    if (damage.length === 0 && rows.length < batch.rows) damage.push(`${rows.length} of its ${batch.rows} rows found`);
    if (damage.length > 0) throw new SpoolBatchDamagedError(`spool batch ${batch.sequence}: ${damage.join("; ")}`, rows);
    return rows;
  };

  /** Seals rows found on disk into batches within the bounds; false when the disk refused a SEAL (see writeSeal). */
  const sealRecovered = (rows: readonly Part[]): boolean => {
    let written = true;
    for (let i = 0; i < rows.length;) {
      const n = batchLength(rows.length - i, (j) => rowBytes(rows[i + j] as Part), batchRows, batchBytes);
      const parts = partsOf(rows.slice(i, i + n));
      const batch: DiskBatch = { sequence: next++, rows: n, recovered: true, parts };
      if (!writeSeal(batch, "sealing recovered rows")) written = false;
      i += n;
      addBatch(batch, undefined);
    }
    return written;
  };

  // Batches left by the previous process, and rows it appended but never sealed. A batch beyond the bounds would be
  // refused by analytics on every resend: its rows are sealed again in batches within them, and only then is it acked
  // (a crash in between sends them twice, which analytics and billing absorb, but never loses them).
  const beyondBounds: { sequence: bigint; rows: Part[] }[] = [];
  for (const batch of loaded.batches.values()) {
    // A batch's byte ranges hold its rows and their record headers: within the bounds, so are its rows.
    const span = batch.parts.reduce((n, p) => n + p.end - p.start, 0);
    const rows = batch.rows > batchRows || span > batchBytes ? loaded.rowsIn(batch.parts) : undefined;
    if (!rows || batchLength(rows.length, (i) => rowBytes(rows[i] as Part), batchRows, batchBytes) === rows.length) {
      addBatch(batch, undefined);
    } else beyondBounds.push({ sequence: batch.sequence, rows });
  }
  // After the batches kept, so that batches are sent in sequence order.
  for (const { sequence, rows } of beyondBounds) {
    // Unless all its rows are in new batches, the old batch stays unacked and is sealed again at the next start.
    if (!sealRecovered(rows)) continue;
    try {
      writeRecord(ackType, encodeSequence(sequence));
    } catch (e) {
      writeFailed("acking a batch sealed again", e);
    }
  }
  const recovery: SpoolRecovery = {
    rows: sealedRows + loaded.unsealed.length,
    tornRecords: loaded.torn,
    damagedRecords: loaded.damaged,
    resealedBatches: beyondBounds.length,
    adoptedDirs: [],
    adoptedRows: 0,
  };
  sealRecovered(loaded.unsealed);
  collectSegments();

  const fsyncTimer =
    fsyncPolicy === "interval"
      ? setInterval(() => {
          const target = current;
          if (!target?.dirty) return;
          target.dirty = false;
          const rows = target.unsynced;
          target.unsynced = 0;
          fdatasync(target.fd, (err) => {
            // Closed meanwhile (a rotation, the spool's close): no flush was made, and none failed.
            if (err?.code === "EBADF") return;
            if (err) syncFailed(target, rows, err);
            else synced();
          });
        }, options.fsyncIntervalMs ?? 1000)
      : undefined;
  fsyncTimer?.unref?.();

  const spool: FileSpool = {
    dir,
    recovery,
    lastRow: loaded.lastRow,
    append: appendRow,
    seal: (maxRows, maxBytes) => sealPending(maxRows, maxBytes, false),
    unacked: () => batches.values(),
    read(batch) {
      const cached = cache.get(batch.sequence);
      if (cached) return cached;
      const known = batches.get(batch.sequence);
      if (!known) throw new SpoolBatchDamagedError(`batch ${batch.sequence} is not in the spool`);
      return readBatch(known);
    },
    ack(sequence) {
      const batch = batches.get(sequence);
      if (!batch) return false;
      batches.delete(sequence);
      sealedRows -= batch.rows;
      const cached = cache.get(sequence);
      if (cached) {
        cache.delete(sequence);
        cachedRows -= cached.length;
      }
      try {
        writeRecord(ackType, encodeSequence(sequence));
      } catch (e) {
        // A lost ACK record only means a resend after a restart.
        log?.warn("writing an ack to the metrics spool failed", { err: e, dir });
      }
      for (const part of batch.parts) {
        const segment = segments.get(part.segment);
        if (segment) segment.refs--;
      }
      collectSegments();
      return true;
    },
    writable(rowBytes) {
      if (closed) return false;
      // A file of its own, as large as a new segment holding the row: a segment's descriptor cannot take a write back
      // (rows go at its position), and a smaller write could fit in what is left of a block the row does not fit in.
      const path = join(dir, "PROBE");
      try {
        const fd = openSync(path, "w", ownerOnlyFile);
        try {
          writeAll(fd, Buffer.alloc(magic.length + headerBytes + rowBytes));
        } finally {
          closeSync(fd);
          rmSync(path, { force: true });
        }
      } catch (e) {
        writeFailed("trying whether the disk takes writes", e);
        return false;
      }
      diskOutage.recovered({ dir });
      return true;
    },
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
    get syncFailedRows() {
      return syncFailedRows;
    },
    maxBytes,
    idle: async () => {
      // Work queued by the work awaited is awaited too.
      for (let seen: Promise<void> | undefined; seen !== background; ) {
        seen = background;
        await seen;
      }
    },
    close() {
      if (closed) return;
      closed = true;
      if (fsyncTimer) clearInterval(fsyncTimer);
      if (current) {
        const writer = current;
        current = undefined;
        if (fsyncPolicy !== "never" && writer.dirty) {
          try {
            fdatasyncSync(writer.fd);
          } catch (e) {
            syncFailed(writer, writer.unsynced, e);
          }
        }
        closeSync(writer.fd);
      }
      if (spare) {
        closeSync(spare.fd);
        rmSync(segmentPath(spare.id), { force: true });
        spare = undefined;
      }
      clearInterval(lockTimer);
      openDirs.delete(dir);
      if (pending.length === 0 && batches.size === 0) {
        if (!sidecars.some((s) => existsSync(join(dir, s.file)))) rmSync(dir, { recursive: true, force: true });
        else {
          // Empty, but a sidecar's state is for the next process to open or adopt this directory.
          for (const name of readdirSync(dir)) if (/^\d{10}\.seg$/.test(name)) rmSync(join(dir, name), { force: true });
          rmSync(join(dir, "LOCK"), { force: true });
        }
      } else rmSync(join(dir, "LOCK"), { force: true });
    },
  };

  adoptOrphans(options.root, dir, sidecars.map((s) => s.file), log, (orphanDir, orphan) => {
    let moved = 0;
    const sealFull = (force: boolean) => {
      while (
        (pending.length >= batchRows || pendingBytes >= batchBytes || (force && pending.length > 0)) &&
        sealPending(batchRows, batchBytes, true)
      );
    };
    const move = (rows: readonly Uint8Array[]) => {
      for (const row of rows) {
        if (!appendRow(row)) return false;
        moved++;
        sealFull(false);
      }
      return true;
    };
    const orphanReader = createDirReader(orphan.segments);
    let complete = true;
    for (const batch of orphan.batches.values()) {
      if (!(complete = move(orphanReader(batch.parts)))) break;
    }
    if (complete) complete = move(orphanReader(partsOf(orphan.unsealed)));
    for (const sidecar of sidecars) {
      if (complete && sidecar.rows) complete = move(sidecar.rows(orphanDir, orphan.lastRow));
    }
    sealFull(true);
    // The orphan is deleted next: its rows must be on disk here first...
    if (current && fsyncPolicy !== "never") fdatasyncSync(current.fd);
    // ...and, once they all are, its sidecars' state (leases released once those rows are acked).
    if (complete) for (const sidecar of sidecars) sidecar.adopt?.(orphanDir, dir);
    recovery.adoptedRows += moved;
    if (complete) recovery.adoptedDirs.push(orphanDir);
    return complete;
  });
  return spool;
}

interface Loaded {
  segments: Map<number, Segment>;
  /** Unacked batches in sequence order. */
  batches: Map<bigint, DiskBatch>;
  /** Rows no SEAL covers, in append order. */
  unsealed: FoundRow[];
  /** The rows inside a batch's byte ranges. */
  rowsIn(parts: readonly Part[]): FoundRow[];
  maxSequence: bigint;
  torn: number;
  /** Records in the middle of a segment that failed their crc, skipped. */
  damaged: number;
  /** The payload of the newest whole ROW record, acked or not. */
  lastRow: Uint8Array | undefined;
}

/** Replays a spool directory: which batches are sealed and unacked, and which rows were never sealed. */
function loadDir(dir: string, log: Logger | undefined): Loaded {
  const segments = new Map<number, Segment>();
  const rowsBySegment = new Map<number, FoundRow[]>();
  const seals: { sequence: bigint; rows: number; parts: Part[] }[] = [];
  const acked = new Set<bigint>();
  let maxSequence = 0n;
  let torn = 0;
  let damaged = 0;
  let lastRow: Uint8Array | undefined;
  const files = readdirSync(dir)
    .filter((name) => /^\d{10}\.seg$/.test(name))
    .sort();
  for (const name of files) {
    const id = Number(name.slice(0, 10));
    const path = join(dir, name);
    const buf = readFileSync(path);
    segments.set(id, { id, path, size: buf.length, refs: 0 });
    // A damaged header says nothing of the records after it, each checked by its crc: they are read as far as they
    // hold, and batches sealed over them are kept, read back by their byte ranges. Skipping the segment took its
    // unacked batches for acked and deleted it, their rows lost without a count.
    if (buf.length > 0 && (buf.length < magic.length || !buf.subarray(0, magic.length).equals(magic))) {
      log?.warn("a metrics spool segment has a damaged header; its records are read as far as they are whole", { path });
    }
    const rows: FoundRow[] = [];
    rowsBySegment.set(id, rows);
    const end = forEachRecord(
      buf,
      magic.length,
      (type, payload, start, recordEnd) => {
        if (type === rowType) {
          rows.push({ segment: id, start, end: recordEnd, index: rows.length });
          lastRow = payload;
        } else if (type === sealType) {
          const seal = decodeSeal(payload);
          seals.push(seal);
          if (seal.sequence > maxSequence) maxSequence = seal.sequence;
        } else if (type === ackType) {
          // An ACK may name a batch whose SEAL the disk refused: its sequence is not given out again either.
          const sequence = decodeSequence(payload);
          acked.add(sequence);
          if (sequence > maxSequence) maxSequence = sequence;
        }
      },
      // Lost alone: a damaged ROW's batch reads back short and counts it dropped, a damaged SEAL's rows are sealed
      // again and a damaged ACK's batch is sent again (sent twice at worst, which analytics and billing absorb).
      // Ending the reading here lost every record after it, the rows with no count.
      (start, recordEnd) => {
        damaged++;
        log?.warn("skipping a damaged record in a metrics spool segment; the records after it are read", {
          path,
          offset: start,
          bytes: recordEnd - start,
        });
      },
    );
    if (end < buf.length) {
      torn++;
      log?.warn("skipping a torn record at the end of a metrics spool segment", {
        path,
        offset: end,
        bytes: buf.length - end,
      });
    }
  }

  const batches = new Map<bigint, DiskBatch>();
  // Byte ranges of every SEAL, acked or not, by segment: rows outside all of them were never sealed on disk.
  const sealedParts = new Map<number, Part[]>();
  for (const seal of seals) {
    for (const part of seal.parts) {
      const parts = sealedParts.get(part.segment);
      if (parts) parts.push(part);
      else sealedParts.set(part.segment, [part]);
    }
    // A batch whose segment is gone was acked before that segment was deleted.
    if (acked.has(seal.sequence) || !seal.parts.every((p) => rowsBySegment.has(p.segment))) continue;
    batches.set(seal.sequence, { sequence: seal.sequence, rows: seal.rows, recovered: true, parts: seal.parts });
  }
  const unsealed: FoundRow[] = [];
  for (const [id, rows] of [...rowsBySegment].sort(([a], [b]) => a - b)) {
    // A batch the disk refused a SEAL (kept in memory) may precede batches sealed on disk: not only the rows past the
    // last SEAL are unsealed. Rows and ranges go in file order; a range ending at or before a row covers none after it.
    const parts = (sealedParts.get(id) ?? []).sort((a, b) => a.start - b.start);
    let i = 0;
    for (const row of rows) {
      while (i < parts.length && (parts[i] as Part).end <= row.start) i++;
      if (i === parts.length || (parts[i] as Part).start > row.start) unsealed.push(row);
    }
  }
  const rowsIn = (parts: readonly Part[]) =>
    parts.flatMap((part) => {
      const rows = rowsBySegment.get(part.segment) ?? [];
      const first = firstAtOrAfter(rows, part.start);
      let end = first;
      while (end < rows.length && (rows[end] as Part).end <= part.end) end++;
      return rows.slice(first, end);
    });
  // A copy: the payload is a view of its whole segment's buffer.
  return { segments, batches, unsealed, rowsIn, maxSequence, torn, damaged, lastRow: lastRow && Uint8Array.from(lastRow) };
}

/**
 * Calls fn for each whole record from `offset`; returns where the whole records end. A record failing its crc is
 * skipped up to the next whole record, told to `damaged`, and reading goes on there: where its length leads, if that
 * is a whole record (a damaged byte in its payload), else the first offset after it where a record matches its crc (its
 * length damaged too). With no whole record after it (cut short by a crash) the reading ends.
 */
function forEachRecord(
  buf: Uint8Array,
  offset: number,
  fn: (type: number, payload: Uint8Array, start: number, end: number) => void,
  damaged?: (start: number, end: number) => void,
): number {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let at = offset;
  while (at + headerBytes <= buf.length) {
    const end = at + headerBytes + view.getUint32(at, true);
    if (end <= buf.length && wholeRecordAt(buf, view, at)) {
      fn(buf[at + 8] as number, buf.subarray(at + headerBytes, end), at, end);
      at = end;
      continue;
    }
    const next = damaged && nextWholeRecord(buf, view, at, end);
    if (!next) break;
    damaged(at, next);
    at = next;
  }
  return at;
}

/** Where the first whole record after the damaged one at `at` starts (`end` if its length holds), if any does. */
function nextWholeRecord(buf: Uint8Array, view: DataView, at: number, end: number): number | undefined {
  if (end < buf.length && wholeRecordAt(buf, view, end)) return end;
  // A crc holds by chance once in 2^32 offsets. Types where this record's and the next one's are, and a length inside
  // the segment, rule out most offsets before one is computed, so garbage is skipped at a scan's pace.
  for (let p = at + 1; p + headerBytes <= buf.length; p++) {
    if (!knownType(buf[p + 8])) continue;
    const next = p + headerBytes + view.getUint32(p, true);
    if (next > buf.length || (next + headerBytes <= buf.length && !knownType(buf[next + 8]))) continue;
    if (wholeRecordAt(buf, view, p)) return p;
  }
  return undefined;
}

const knownType = (type: number | undefined) => type === rowType || type === sealType || type === ackType;

/** Whether a record starting at `at` is inside buf and matches its crc. */
function wholeRecordAt(buf: Uint8Array, view: DataView, at: number): boolean {
  if (at + headerBytes > buf.length) return false;
  const end = at + headerBytes + view.getUint32(at, true);
  return end <= buf.length && Bun.hash.crc32(buf.subarray(at + 8, end)) === view.getUint32(at + 4, true);
}

function encodeSeal(sequence: bigint, rows: number, parts: readonly Part[]): Uint8Array {
  const buf = Buffer.allocUnsafe(16 + parts.length * 12);
  buf.writeBigUInt64LE(sequence, 0);
  buf.writeUInt32LE(rows, 8);
  buf.writeUInt32LE(parts.length, 12);
  parts.forEach((p, i) => {
    buf.writeUInt32LE(p.segment, 16 + i * 12);
    buf.writeUInt32LE(p.start, 20 + i * 12);
    buf.writeUInt32LE(p.end, 24 + i * 12);
  });
  return buf;
}

function decodeSeal(payload: Uint8Array): { sequence: bigint; rows: number; parts: Part[] } {
  const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  const count = buf.readUInt32LE(12);
  const parts = Array.from({ length: count }, (_, i) => ({
    segment: buf.readUInt32LE(16 + i * 12),
    start: buf.readUInt32LE(20 + i * 12),
    end: buf.readUInt32LE(24 + i * 12),
  }));
  return { sequence: buf.readBigUInt64LE(0), rows: buf.readUInt32LE(8), parts };
}

function encodeSequence(sequence: bigint): Uint8Array {
  const buf = Buffer.allocUnsafe(8);
  buf.writeBigUInt64LE(sequence, 0);
  return buf;
}

function decodeSequence(payload: Uint8Array): bigint {
  return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).readBigUInt64LE(0);
}

/** Index of the first of rows (in file order) that starts at or after offset. */
function firstAtOrAfter(rows: readonly Part[], offset: number): number {
  let low = 0;
  let high = rows.length;
  while (low < high) {
    const mid = (low + high) >>> 1;
    if ((rows[mid] as Part).start < offset) low = mid + 1;
    else high = mid;
  }
  return low;
}

/** Bytes start..end of a file, fewer when it ends sooner. */
function readRange(path: string, start: number, end: number): Buffer {
  const buf = Buffer.allocUnsafe(end - start);
  const fd = openSync(path, "r");
  try {
    let read = 0;
    while (read < buf.length) {
      const n = readSync(fd, buf, read, buf.length - read, start + read);
      if (n === 0) return buf.subarray(0, read);
      read += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** Encoded size of the row a ROW record's range holds. */
const rowBytes = (row: Part) => row.end - row.start - headerBytes;

/**
 * Byte ranges covering consecutive rows, one per segment run. A range holds every ROW record inside it: rows read from
 * a segment with others between them (sealed, under a SEAL after a damaged one) go in separate ranges.
 */
function partsOf(rows: readonly (Part | FoundRow)[]): Part[] {
  const parts: Part[] = [];
  let lastIndex: number | undefined;
  for (const row of rows) {
    const last = parts[parts.length - 1];
    const index = "index" in row ? row.index : undefined;
    const next = index === undefined || lastIndex === undefined || index === lastIndex + 1;
    if (last && last.segment === row.segment && next) last.end = row.end;
    else parts.push({ segment: row.segment, start: row.start, end: row.end });
    lastIndex = index;
  }
  return parts;
}

/** Reads the ROW records inside byte ranges of a directory's segments (whole files; used once per orphan). */
function createDirReader(segments: ReadonlyMap<number, Segment>) {
  const files = new Map<number, Buffer>();
  return (parts: readonly Part[]): Uint8Array[] => {
    const rows: Uint8Array[] = [];
    for (const part of parts) {
      const segment = segments.get(part.segment);
      if (!segment) continue;
      let buf = files.get(part.segment);
      if (!buf) {
        buf = readFileSync(segment.path);
        files.set(part.segment, buf);
      }
      forEachRecord(
        buf.subarray(part.start, part.end),
        0,
        (type, payload) => {
          if (type === rowType) rows.push(payload);
        },
        () => {},
      );
    }
    return rows;
  };
}

/**
 * Moves the rows of sibling directories whose owner process is gone (a replica restarted under a new
 * instance id) into this spool through `adopt`, then deletes them. A crash midway leaves the orphan
 * in place to be adopted again: its rows are then sent twice, which analytics and billing absorb.
 */
function adoptOrphans(
  root: string,
  ownDir: string,
  sidecarFiles: readonly string[],
  log: Logger | undefined,
  adopt: (dir: string, orphan: Loaded) => boolean,
): void {
  // What a spool's directory holds while it has anything to adopt; any other directory is not a spool's, and is kept.
  const spoolFile = (name: string) => name === "LOCK" || /^\d{10}\.seg$/.test(name) || sidecarFiles.includes(name);
  let names: string[];
  try {
    names = readdirSync(root, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return;
  }
  for (const name of names) {
    const dir = join(root, name);
    if (dir === ownDir || openDirs.has(dir)) continue;
    try {
      if (!readdirSync(dir).some(spoolFile) || acquireLock(dir) !== undefined) continue;
    } catch (e) {
      // Not this process's to read or lock (a volume root's lost+found): left alone, as a spool held by another is.
      log?.warn("a directory beside the metrics spool cannot be locked to adopt; it is left alone", { err: e, dir });
      continue;
    }
    let complete = false;
    try {
      complete = adopt(dir, loadDir(dir, log));
    } catch (e) {
      log?.error("adopting an orphaned metrics spool failed", { err: e, dir });
    }
    if (complete) rmSync(dir, { recursive: true, force: true });
    else {
      log?.warn("metrics spool full: part of an orphaned spool stays on disk for a later start", { dir });
      rmSync(join(dir, "LOCK"), { force: true });
    }
  }
}

interface LockOwner {
  pid: number;
  host: string;
  /** Start time of the process in clock ticks since boot, so a recycled pid is not mistaken for the owner. */
  started: string | null;
  /**
   * The owner's PID namespace: containers each have their own, so a restarted gateway in a pod is pid 1 on the same
   * hostname as the one before it. Absent in LOCKs of versions that did not refresh them.
   */
  pidNamespace?: string | null;
}

const ownPidNamespace = (() => {
  try {
    return readlinkSync("/proc/self/ns/pid");
  } catch {
    return null;
  }
})();

/** Whether the owner's process can be looked up from here: same host and same PID namespace. */
function checkable(owner: LockOwner): boolean {
  return owner.host === hostname() && (owner.pidNamespace === undefined || owner.pidNamespace === ownPidNamespace);
}

/** Takes dir/LOCK for this process; returns its live owner instead when there is one. */
function acquireLock(dir: string): LockOwner | undefined {
  const path = join(dir, "LOCK");
  const me: LockOwner = {
    pid: process.pid,
    host: hostname(),
    started: processStart(process.pid),
    pidNamespace: ownPidNamespace,
  };
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      writeFileSync(path, JSON.stringify(me), { flag: "wx", mode: ownerOnlyFile });
      return undefined;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    let owner: LockOwner | undefined;
    try {
      owner = JSON.parse(readFileSync(path, "utf8")) as LockOwner;
    } catch {
      owner = undefined;
    }
    if (owner && isAlive(owner, dir)) return owner;
    rmSync(path, { force: true });
  }
  return { pid: -1, host: hostname(), started: null, pidNamespace: ownPidNamespace };
}

/** An owner that cannot be checked holds its LOCK while it refreshes it; one of an older version, forever. */
function heldByRefresh(owner: LockOwner): boolean {
  return !checkable(owner) && owner.pidNamespace !== undefined;
}

function isAlive(owner: LockOwner, dir: string): boolean {
  if (!checkable(owner)) {
    if (!heldByRefresh(owner)) return true;
    try {
      return Date.now() - statSync(join(dir, "LOCK")).mtimeMs < lockStaleMs;
    } catch {
      return false;
    }
  }
  if (owner.pid === process.pid) return openDirs.has(dir);
  try {
    process.kill(owner.pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  const started = processStart(owner.pid);
  return started === null || owner.started === null || started === owner.started;
}

function processStart(pid: number): string | null {
  return procStatFields(pid)?.[19] ?? null;
}

function clamp(n: number, min: number, max: number): number {
  return Math.min(max, Math.max(min, n));
}
