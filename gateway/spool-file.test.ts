import { afterEach, describe, expect, spyOn, test } from "bun:test";
import * as fs from "node:fs";
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { RequestMetricsSchema } from "../gen/analytics/v1/analytics_pb.ts";
import {
  type FileSpool,
  type FileSpoolOptions,
  lockStaleMs,
  openFileSpool,
  SpoolInUseError,
  spoolDirName,
} from "./spool-file.ts";
import { type SpoolBatch, SpoolBatchDamagedError } from "./spool.ts";
import { createFillingDisk, createTestLogger } from "./testing.ts";

const roots: string[] = [];
const open: FileSpool[] = [];
afterEach(() => {
  for (const spool of open.splice(0)) spool.close();
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

function newRoot(): string {
  const root = mkdtempSync(join(tmpdir(), "spool-test-"));
  roots.push(root);
  return root;
}

function openSpool(root: string, options: Partial<FileSpoolOptions> = {}): FileSpool {
  const spool = openFileSpool({ root, name: "gw-1", maxBytes: 1024 * 1024, fsync: "never", log: createTestLogger(), ...options });
  open.push(spool);
  return spool;
}

/** Closes a spool as a crash would leave it: files as written, lock still naming a dead process. */
function abandon(spool: FileSpool) {
  open.splice(open.indexOf(spool), 1);
  spool.close();
  writeFileSync(join(spool.dir, "LOCK"), JSON.stringify({ pid: deadPid, host: hostname(), started: null }));
}

const deadPid = (() => {
  const proc = Bun.spawnSync(["true"]);
  return proc.pid;
})();

const requestId = (i: number) => `req-${String(i).padStart(5, "0")}`;
const row = (i: number) =>
  toBinary(RequestMetricsSchema, create(RequestMetricsSchema, { requestId: requestId(i), costNanos: BigInt(i) }));
const ids = (rows: Uint8Array[]) => rows.map((r) => fromBinary(RequestMetricsSchema, r).requestId);
const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => requestId(from + i));
/** A row whose encoded size grows with `chars`. */
const sizedRow = (i: number, chars: number) =>
  toBinary(
    RequestMetricsSchema,
    create(RequestMetricsSchema, { requestId: requestId(i), endUserId: "u".repeat(chars) }),
  );
// Batches cut by row count alone.
const noByteLimit = Number.POSITIVE_INFINITY;
const segmentFiles = (dir: string) => readdirSync(dir).filter((n) => n.endsWith(".seg")).sort();

describe("file spool", () => {
  test("appends, seals, reads back and acks; acked segments and finally the directory go away", async () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 25; i++) expect(spool.append(row(i))).toBe(true);
    expect(spool.pendingRows).toBe(25);
    const first = spool.seal(10, noByteLimit);
    const second = spool.seal(10, noByteLimit);
    const third = spool.seal(10, noByteLimit);
    expect(spool.seal(10, noByteLimit)).toBeUndefined();
    expect([first?.rows, second?.rows, third?.rows]).toEqual([10, 10, 5]);
    expect(second!.sequence).toBe(first!.sequence + 1n);
    expect([...spool.unacked()].map((b) => b.sequence)).toEqual([first!.sequence, second!.sequence, third!.sequence]);
    expect(ids(spool.read(second!))).toEqual(range(10, 20));
    expect(spool.rows).toBe(25);
    expect(spool.bytes).toBeGreaterThan(25 * 9);

    expect(spool.ack(second!.sequence)).toBe(true);
    expect(spool.ack(second!.sequence)).toBe(false);
    expect(spool.rows).toBe(15);
    expect(spool.ack(first!.sequence)).toBe(true);
    expect(spool.ack(third!.sequence)).toBe(true);
    expect(spool.rows).toBe(0);
    await spool.idle();
    // The segment being written stays (holding the ACK records) and the next one waits, created ahead of need.
    expect(segmentFiles(spool.dir)).toEqual(["0000000001.seg", "0000000002.seg"]);
    spool.close();
    expect(existsSync(spool.dir)).toBe(false);
  });

  test("a batch holds at most maxBytes of encoded rows, but at least one row", () => {
    const spool = openSpool(newRoot());
    const rows = [100, 100, 100, 900, 100].map((chars, i) => sizedRow(i, chars));
    for (const r of rows) spool.append(r);
    expect(spool.pendingBytes).toBe(rows.reduce((n, r) => n + r.length, 0));
    const limit = 2 * rows[0]!.length;
    const batches = [1, 2, 3, 4].map(() => spool.seal(10, limit)!);
    // The fourth row is larger than the limit: it goes alone rather than never.
    expect(batches.map((b) => ids(spool.read(b)))).toEqual([range(0, 2), range(2, 3), range(3, 4), range(4, 5)]);
    expect(spool.pendingBytes).toBe(0);
    expect(spool.seal(10, limit)).toBeUndefined();
  });

  test("rows the spool seals itself at open, left unsealed or adopted, go in batches within both bounds", () => {
    const root = newRoot();
    const crashed = openSpool(root);
    const orphan = openSpool(root, { name: "gw-gone" });
    for (let i = 0; i < 6; i++) crashed.append(sizedRow(i, 100));
    for (let i = 10; i < 16; i++) orphan.append(sizedRow(i, 100));
    abandon(crashed);
    abandon(orphan);
    const limit = 2 * sizedRow(0, 100).length;
    const reopened = openSpool(root, { batchRows: 1000, batchBytes: limit });
    expect(reopened.recovery).toMatchObject({ rows: 6, adoptedRows: 6 });
    const batches = [...reopened.unacked()].map((b) => ids(reopened.read(b)));
    expect(batches).toEqual([range(0, 2), range(2, 4), range(4, 6), range(10, 12), range(12, 14), range(14, 16)]);
  });

  test("a batch beyond the bounds, sealed by an earlier version, is sealed again within them at open, then acked", () => {
    const root = newRoot();
    const before = openSpool(root);
    for (let i = 0; i < 10; i++) before.append(sizedRow(i, 100));
    before.seal(1000, noByteLimit);
    for (let i = 10; i < 12; i++) before.append(sizedRow(i, 100));
    const within = before.seal(1000, noByteLimit)!;
    abandon(before);

    const bounds = { batchRows: 1000, batchBytes: 3 * sizedRow(0, 100).length };
    const after = openSpool(root, bounds);
    expect(after.recovery).toMatchObject({ rows: 12, resealedBatches: 1 });
    const batches = [...after.unacked()];
    const sequences = batches.map((b) => b.sequence);
    // The batch within the bounds keeps its sequence; the new ones follow it, all in the order they are sent.
    expect(sequences[0]).toBe(within.sequence);
    expect(sequences).toEqual([...sequences].sort((a, b) => (a < b ? -1 : 1)));
    expect(batches.every((b) => b.recovered)).toBe(true);
    const expected = [range(10, 12), range(0, 3), range(3, 6), range(6, 9), range(9, 10)];
    expect(batches.map((b) => ids(after.read(b)))).toEqual(expected);
    abandon(after);

    // The old batch's ack is on disk: the next start finds the same batches, no row in two of them.
    const again = openSpool(root, bounds);
    expect(again.recovery).toMatchObject({ rows: 12, resealedBatches: 0 });
    expect([...again.unacked()].map((b) => b.sequence)).toEqual(sequences);
    for (const b of [...again.unacked()]) again.ack(b.sequence);
    expect(again.rows).toBe(0);
  });

  test("a crash before the old batch's ack is written sends its rows twice at worst, never loses them", () => {
    const root = newRoot();
    const before = openSpool(root);
    for (let i = 0; i < 10; i++) before.append(sizedRow(i, 100));
    before.seal(1000, noByteLimit);
    abandon(before);
    const bounds = { batchRows: 1000, batchBytes: 3 * sizedRow(0, 100).length };
    const cut = openSpool(root, bounds);
    expect(cut.recovery.resealedBatches).toBe(1);
    abandon(cut);
    // The ack (9-byte header, 8-byte sequence) is the last record the reopened spool wrote.
    const written = segmentFiles(cut.dir)
      .map((name) => join(cut.dir, name))
      .filter((path) => statSync(path).size > 8)
      .at(-1)!;
    truncateSync(written, statSync(written).size - 17);

    const after = openSpool(root, bounds);
    expect(after.recovery.resealedBatches).toBe(1);
    const rows = [...after.unacked()].flatMap((b) => ids(after.read(b)));
    expect(new Set(rows)).toEqual(new Set(range(0, 10)));
    expect(rows).toHaveLength(20);
  });

  test("a restart resends exactly what was not acked, under the same sequences, and keeps numbering upwards", () => {
    const root = newRoot();
    const before = openSpool(root);
    for (let i = 0; i < 30; i++) before.append(row(i));
    const a = before.seal(10, noByteLimit)!;
    const b = before.seal(10, noByteLimit)!;
    const c = before.seal(10, noByteLimit)!;
    before.ack(b.sequence);
    for (let i = 30; i < 34; i++) before.append(row(i));
    abandon(before);

    const after = openSpool(root);
    expect(after.recovery).toMatchObject({ rows: 24, tornRecords: 0, adoptedRows: 0 });
    const batches = [...after.unacked()];
    expect(batches.map((x) => x.sequence).slice(0, 2)).toEqual([a.sequence, c.sequence]);
    expect(batches.every((x) => x.recovered)).toBe(true);
    expect(batches.map((x) => ids(after.read(x)))).toEqual([range(0, 10), range(20, 30), range(30, 34)]);
    // The unsealed tail was sealed at open under a new, higher sequence.
    expect(batches[2]!.sequence).toBeGreaterThan(c.sequence);
    after.append(row(99));
    expect(after.seal(10, noByteLimit)!.sequence).toBeGreaterThan(batches[2]!.sequence);
    for (const x of batches) after.ack(x.sequence);
    abandon(after);

    const third = openSpool(root);
    expect(ids(third.read([...third.unacked()][0]!))).toEqual([requestId(99)]);
    expect(third.recovery.rows).toBe(1);
  });

  test("a torn record at the tail is skipped; everything before it survives", () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 5; i++) spool.append(row(i));
    const sealed = spool.seal(10, noByteLimit)!;
    spool.append(row(5));
    spool.append(row(6));
    abandon(spool);
    const [file] = segmentFiles(spool.dir);
    const path = join(spool.dir, file!);
    truncateSync(path, statSync(path).size - 3);

    const after = openSpool(root);
    expect(after.recovery.tornRecords).toBe(1);
    const batches = [...after.unacked()];
    expect(batches.map((x) => x.sequence)[0]).toBe(sealed.sequence);
    expect(batches.map((x) => ids(after.read(x)))).toEqual([range(0, 5), range(5, 6)]);
  });

  test("a record whose bytes do not match its checksum ends the segment", () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 3; i++) spool.append(row(i));
    abandon(spool);
    const path = join(spool.dir, segmentFiles(spool.dir)[0]!);
    const bytes = readFileSync(path);
    bytes[bytes.length - 2] = (bytes[bytes.length - 2]! + 1) % 256;
    writeFileSync(path, bytes);
    const after = openSpool(root);
    expect(after.recovery).toMatchObject({ rows: 2, tornRecords: 1 });
  });

  test("a damaged record in the middle of a segment is skipped: every other record, before and after it, is kept", () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 10; i++) spool.append(row(i));
    const acked = spool.seal(5, noByteLimit)!;
    spool.seal(5, noByteLimit);
    for (let i = 10; i < 20; i++) spool.append(row(i));
    spool.seal(100, noByteLimit);
    for (let i = 20; i < 25; i++) spool.append(row(i));
    spool.ack(acked.sequence);
    abandon(spool);
    // Records: rows 0-9, SEALs of 0-4 and 5-9, rows 10-19, their SEAL, rows 20-24, the ACK of 0-4.
    const path = join(spool.dir, segmentFiles(spool.dir)[0]!);
    const bytes = readFileSync(path);
    const records: number[] = [];
    for (let at = 8; at < bytes.length; at += 9 + bytes.readUInt32LE(at)) records.push(at);
    // One byte of row 7's payload flips.
    bytes[records[7]! + 12] = bytes[records[7]! + 12]! ^ 0x40;
    writeFileSync(path, bytes);

    const logger = createTestLogger();
    const after = openSpool(root, { log: logger });
    // Row 7's batch still counts it: reading the batch back tells it is missing.
    expect(after.recovery).toMatchObject({ rows: 20, tornRecords: 0, damagedRecords: 1 });
    expect(logger.lines.some((l) => l.includes("damaged record"))).toBe(true);
    const batches = [...after.unacked()];
    expect(() => after.read(batches[0]!)).toThrow(SpoolBatchDamagedError);
    let damaged: SpoolBatchDamagedError | undefined;
    try {
      after.read(batches[0]!);
    } catch (e) {
      damaged = e as SpoolBatchDamagedError;
    }
    expect(ids(damaged!.rows)).toEqual([requestId(5), requestId(6), requestId(8), requestId(9)]);
    expect(batches.slice(1).flatMap((b) => ids(after.read(b)))).toEqual(range(10, 25));
  });

  for (const flip of [0x01, 0x40]) {
    test(`a record whose length is damaged (bits ${flip.toString(16)}) is skipped up to the next whole record: those after it are read`, () => {
      const root = newRoot();
      const spool = openSpool(root);
      for (let i = 0; i < 5; i++) spool.append(row(i));
      spool.seal(5, noByteLimit);
      for (let i = 5; i < 10; i++) spool.append(row(i));
      abandon(spool);
      // Records: rows 0-4, their SEAL, rows 5-9. Row 1's length is damaged, so it no longer leads to row 2.
      const path = join(spool.dir, segmentFiles(spool.dir)[0]!);
      const bytes = readFileSync(path);
      const second = 8 + 9 + bytes.readUInt32LE(8);
      bytes[second] = bytes[second]! ^ flip;
      writeFileSync(path, bytes);

      const logger = createTestLogger();
      const after = openSpool(root, { log: logger });
      expect(after.recovery).toMatchObject({ rows: 10, tornRecords: 0, damagedRecords: 1 });
      expect(logger.lines.some((l) => l.includes("damaged record"))).toBe(true);
      const [sealed, ...rest] = [...after.unacked()];
      let damaged: SpoolBatchDamagedError | undefined;
      try {
        after.read(sealed!);
      } catch (e) {
        damaged = e as SpoolBatchDamagedError;
      }
      // The damaged row is never sent; the whole rows of its batch and every row after it are.
      expect(ids(damaged!.rows)).toEqual([requestId(0), requestId(2), requestId(3), requestId(4)]);
      expect(rest.flatMap((b) => ids(after.read(b)))).toEqual(range(5, 10));
    });
  }

  test("a segment whose header is damaged keeps its whole records: its unacked batches are neither dropped nor deleted", () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 10; i++) spool.append(row(i));
    spool.ack(spool.seal(5, noByteLimit)!.sequence);
    spool.seal(5, noByteLimit);
    for (let i = 10; i < 12; i++) spool.append(row(i));
    abandon(spool);
    const path = join(spool.dir, segmentFiles(spool.dir)[0]!);
    const bytes = readFileSync(path);
    bytes[0] = bytes[0]! ^ 1;
    writeFileSync(path, bytes);

    const after = openSpool(root);
    expect(after.recovery).toMatchObject({ rows: 7, tornRecords: 0 });
    expect([...after.unacked()].flatMap((b) => ids(after.read(b)))).toEqual(range(5, 12));
    expect(existsSync(path)).toBe(true);
  });

  test("a row cut short by a full disk is cut off and refused; rows after it read back whole, also after a restart", () => {
    const root = newRoot();
    const disk = createFillingDisk();
    const spool = openSpool(root, { write: disk.write });
    for (let i = 0; i < 5; i++) expect(spool.append(row(i))).toBe(true);
    disk.room = 10;
    expect(spool.append(row(5))).toBe(false);
    disk.room = Number.POSITIVE_INFINITY;
    for (let i = 6; i < 10; i++) expect(spool.append(row(i))).toBe(true);
    const batch = spool.seal(100, noByteLimit)!;
    expect(ids(spool.read(batch))).toEqual([...range(0, 5), ...range(6, 10)]);
    abandon(spool);

    const after = openSpool(root);
    expect(after.recovery).toMatchObject({ rows: 9, tornRecords: 0 });
    expect([...after.unacked()].flatMap((b) => ids(after.read(b)))).toEqual([...range(0, 5), ...range(6, 10)]);
  });

  test("a segment closed by a full disk has its rows flushed before its descriptor closes, as a rotated one has", async () => {
    const root = newRoot();
    const disk = createFillingDisk();
    // The fsync timer never fires here: only the close can flush the rows.
    const spool = openSpool(root, { write: disk.write, fsync: "interval", fsyncIntervalMs: 60_000 });
    for (let i = 0; i < 5; i++) expect(spool.append(row(i))).toBe(true);
    await spool.idle();
    const flushed = spyOn(fs, "fdatasync");
    try {
      disk.room = 0;
      expect(spool.append(row(5))).toBe(false);
      await spool.idle();
      expect(flushed).toHaveBeenCalledTimes(1);
    } finally {
      flushed.mockRestore();
    }
  });

  test("a seal the full disk refuses still makes a batch, kept in memory: it is read, acked, and its segment deleted", async () => {
    const root = newRoot();
    const disk = createFillingDisk();
    const spool = openSpool(root, { write: disk.write });
    for (let i = 0; i < 10; i++) spool.append(row(i));
    // The spool's own rows fill the disk: only deleting its segments makes room again.
    disk.room = 0;
    const batch = spool.seal(100, noByteLimit)!;
    expect(batch.rows).toBe(10);
    expect(spool.append(row(10))).toBe(false);
    expect([spool.pendingRows, spool.rows]).toEqual([0, 10]);
    expect(ids(spool.read(batch))).toEqual(range(0, 10));
    expect(spool.ack(batch.sequence)).toBe(true);
    await spool.idle();
    expect([spool.rows, spool.bytes]).toEqual([0, 0]);
    // Only the spare segment, made ahead of need, is left.
    expect(segmentFiles(spool.dir)).toEqual(["0000000002.seg"]);
  });

  test("rows of a batch whose seal the disk refused are found unsealed after a crash, also before rows sealed on disk", () => {
    const root = newRoot();
    const disk = createFillingDisk();
    const spool = openSpool(root, { write: disk.write });
    for (let i = 0; i < 5; i++) spool.append(row(i));
    disk.room = 0;
    expect(spool.seal(100, noByteLimit)?.rows).toBe(5);
    disk.room = Number.POSITIVE_INFINITY;
    for (let i = 5; i < 10; i++) spool.append(row(i));
    spool.seal(100, noByteLimit);
    abandon(spool);

    const after = openSpool(root);
    expect(after.recovery.rows).toBe(10);
    expect([...after.unacked()].flatMap((b) => ids(after.read(b))).sort()).toEqual(range(0, 10));
  });

  test("rows left unsealed by a damaged SEAL are sealed again without the sealed rows after them, at start and adopted", () => {
    const root = newRoot();
    const spool = openSpool(root);
    for (let i = 0; i < 10; i++) spool.append(row(i));
    spool.seal(5, noByteLimit);
    spool.seal(5, noByteLimit);
    for (let i = 10; i < 15; i++) spool.append(row(i));
    abandon(spool);
    // Records: rows 0-9, the SEALs of 0-4 and 5-9, rows 10-14. The first SEAL's checksum is damaged.
    const path = join(spool.dir, segmentFiles(spool.dir)[0]!);
    const bytes = readFileSync(path);
    let at = 8;
    for (let i = 0; i < 10; i++) at += 9 + bytes.readUInt32LE(at);
    bytes[at + 4] = bytes[at + 4]! ^ 1;
    writeFileSync(path, bytes);
    const copy = newRoot();
    cpSync(root, copy, { recursive: true });

    const after = openSpool(root);
    expect(after.recovery).toMatchObject({ rows: 15, damagedRecords: 1 });
    const batches = [...after.unacked()];
    for (const b of batches) expect(after.read(b)).toHaveLength(b.rows);
    expect(batches.flatMap((b) => ids(after.read(b))).sort()).toEqual(range(0, 15));

    const adopter = openSpool(copy, { name: "gw-2" });
    expect(adopter.recovery).toMatchObject({ adoptedRows: 15 });
    expect([...adopter.unacked()].flatMap((b) => ids(adopter.read(b))).sort()).toEqual(range(0, 15));
  });

  test("a disk full at start: the spool opens, seals the rows it found in memory, and leaves no empty segment", async () => {
    const root = newRoot();
    const first = openSpool(root);
    for (let i = 0; i < 5; i++) first.append(row(i));
    await first.idle();
    abandon(first);

    const disk = createFillingDisk();
    disk.room = 0;
    const spool = openSpool(root, { write: disk.write });
    expect(spool.recovery.rows).toBe(5);
    expect(spool.pendingRows).toBe(0);
    expect(spool.append(row(5))).toBe(false);
    await spool.idle();
    for (const name of segmentFiles(spool.dir)) expect(statSync(join(spool.dir, name)).size).toBeGreaterThan(0);
    const [batch] = [...spool.unacked()];
    expect(ids(spool.read(batch!))).toEqual(range(0, 5));
    spool.ack(batch!.sequence);
    await spool.idle();
    expect(segmentFiles(spool.dir)).toEqual([]);
  });

  test("rows past the byte bound are refused until acks free space", () => {
    const root = newRoot();
    const spool = openSpool(root, { maxBytes: 2048, segmentBytes: 1024 });
    let accepted = 0;
    while (spool.append(row(accepted))) accepted++;
    expect(accepted).toBeGreaterThan(10);
    expect(spool.bytes).toBeLessThanOrEqual(2048);
    const batch = spool.seal(1000, noByteLimit)!;
    expect(spool.append(row(1000))).toBe(false);
    spool.ack(batch.sequence);
    // All that is left is the segment holding the ACK record.
    expect(spool.bytes).toBeLessThan(64);
    expect(spool.append(row(1000))).toBe(true);
  });

  test("segments rotate by size and are deleted oldest first as their batches are acked", async () => {
    const root = newRoot();
    const spool = openSpool(root, { segmentBytes: 16 * 1024, maxBytes: 10 * 1024 * 1024 });
    const batches = [];
    for (let b = 0; b < 6; b++) {
      for (let i = 0; i < 1000; i++) spool.append(row(b * 1000 + i));
      batches.push(spool.seal(1000, noByteLimit)!);
    }
    const files = segmentFiles(spool.dir);
    expect(files.length).toBeGreaterThan(2);
    // Acking a newer batch first deletes nothing: the older segment before it is still needed.
    spool.ack(batches[3]!.sequence);
    await spool.idle();
    expect(segmentFiles(spool.dir)).toEqual(expect.arrayContaining(files));
    spool.ack(batches[0]!.sequence);
    await spool.idle();
    expect(segmentFiles(spool.dir)).not.toContain(files[0]);
    expect(ids(spool.read(batches[5]!))).toEqual(range(5000, 6000));
  });

  test("a flush that fails is not retried: its rows are counted, still sent, and the rows after them go to a new segment", async () => {
    const log = createTestLogger();
    const spool = openSpool(newRoot(), { fsync: "interval", fsyncIntervalMs: 10, log });
    for (let i = 0; i < 3; i++) spool.append(row(i));
    const eio = Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" });
    const flush = spyOn(fs, "fdatasync").mockImplementationOnce(((_fd: number, done: (err: Error) => void) =>
      done(eio)) as unknown as typeof fs.fdatasync);
    try {
      await Bun.sleep(60);
    } finally {
      flush.mockRestore();
    }
    expect(spool.syncFailedRows).toBe(3);
    const first = join(spool.dir, "0000000001.seg");
    const size = statSync(first).size;
    for (let i = 3; i < 6; i++) spool.append(row(i));
    await Bun.sleep(60);
    // Flushes of the segment after it would succeed without writing what failed: it is written no more.
    expect(statSync(first).size).toBe(size);
    expect(spool.syncFailedRows).toBe(3);
    const batch = spool.seal(100, noByteLimit) as SpoolBatch;
    expect(ids(spool.read(batch))).toEqual(range(0, 6));
    const errors = log.lines.filter((l) => JSON.parse(l).level === "error");
    expect(errors).toHaveLength(1);
    expect(JSON.parse(errors[0] as string)).toMatchObject({ rows: 3, err: { message: eio.message } });
  });

  test("under fsync always, rows whose flush fails are kept and counted, and the rows after go to one new segment", async () => {
    const spool = openSpool(newRoot(), { fsync: "always" });
    expect(spool.append(row(0))).toBe(true);
    await spool.idle();
    const flush = spyOn(fs, "fdatasyncSync").mockImplementation(() => {
      throw Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" });
    });
    try {
      for (let i = 1; i < 4; i++) expect(spool.append(row(i))).toBe(true);
    } finally {
      flush.mockRestore();
    }
    expect(spool.append(row(4))).toBe(true);
    expect(spool.syncFailedRows).toBe(3);
    await spool.idle();
    // Rows 0 and 1 in the first segment, the others in the next: a disk failing every flush starts no segment per row.
    const size = (id: number) => statSync(join(spool.dir, `000000000${id}.seg`)).size;
    const records = (from: number, to: number) => range(from, to).reduce((n, _, i) => n + 9 + row(from + i).length, 8);
    expect([size(1), size(2)]).toEqual([records(0, 2), records(2, 5)]);
    const batch = spool.seal(100, noByteLimit) as SpoolBatch;
    expect(ids(spool.read(batch))).toEqual(range(0, 5));
  });

  test("every fsync policy keeps the same data", () => {
    for (const fsync of ["always", "interval", "never"] as const) {
      const root = newRoot();
      const spool = openSpool(root, { fsync, fsyncIntervalMs: 5 });
      for (let i = 0; i < 20; i++) spool.append(row(i));
      spool.seal(100, noByteLimit);
      abandon(spool);
      const after = openSpool(root, { fsync });
      expect(after.recovery.rows).toBe(20);
    }
  });

  test("a directory held by a live process is refused; one held by a dead process is taken over", () => {
    const root = newRoot();
    const first = openSpool(root);
    expect(() => openSpool(root)).toThrow(/in use by pid/);
    first.append(row(1));
    abandon(first);
    expect(openSpool(root).recovery.rows).toBe(1);

    const other = join(root, "gw-live");
    mkdirSync(other);
    writeFileSync(join(other, "LOCK"), JSON.stringify({ pid: process.ppid, host: hostname(), started: null }));
    expect(() => openSpool(root, { name: "gw-live" })).toThrow(`in use by pid ${process.ppid}`);
  });

  test("replicas whose instance ids differ only in characters a directory name cannot hold each get a spool of their own", () => {
    const root = newRoot();
    const ids = ["gw/1", "gw:1", "gw 1", "gw_1", "gw_1~"];
    // Sharing one, the second was refused as in use by the first.
    const spools = ids.map((id) => openSpool(root, { name: spoolDirName(id) }));
    expect(new Set(spools.map((s) => s.dir)).size).toBe(ids.length);
    expect(readdirSync(root)).toHaveLength(ids.length);
    // An id a directory can hold keeps its name, so a replica finds the spool it had before.
    expect(spools[3]?.dir).toBe(join(root, "gw_1"));
  });

  test("a LOCK from another container is held while refreshed, and taken over once stale", () => {
    const root = newRoot();
    const before = openSpool(root);
    before.append(row(7));
    abandon(before);
    // The container before this one in the pod: pid 1 on the same hostname, in its own PID namespace.
    const lock = join(before.dir, "LOCK");
    writeFileSync(lock, JSON.stringify({ pid: 1, host: hostname(), started: "1", pidNamespace: "pid:[4026531000]" }));
    let refused: unknown;
    try {
      openSpool(root);
    } catch (e) {
      refused = e;
    }
    expect(refused).toBeInstanceOf(SpoolInUseError);
    expect((refused as SpoolInUseError).mayGoStale).toBe(true);
    const stale = new Date(Date.now() - lockStaleMs - 1000);
    utimesSync(lock, stale, stale);
    expect(openSpool(root).recovery.rows).toBe(1);
    // Another host's LOCK of a version that did not refresh it is still assumed live.
    const other = join(root, "gw-elsewhere");
    mkdirSync(other);
    writeFileSync(join(other, "LOCK"), JSON.stringify({ pid: 1, host: "another-host", started: null }));
    utimesSync(join(other, "LOCK"), stale, stale);
    expect(() => openSpool(root, { name: "gw-elsewhere" })).toThrow(/in use by pid 1/);
  });

  test("an open spool keeps its LOCK fresh", async () => {
    const spool = openSpool(newRoot(), { lockRefreshMs: 20 });
    const lock = join(spool.dir, "LOCK");
    const stale = new Date(Date.now() - lockStaleMs - 1000);
    utimesSync(lock, stale, stale);
    await Bun.sleep(100);
    expect(Date.now() - statSync(lock).mtimeMs).toBeLessThan(1000);
    expect(JSON.parse(readFileSync(lock, "utf8"))).toMatchObject({ pid: process.pid, host: hostname() });
  });

  test("a LOCK that cannot be refreshed is warned of once while it fails, and its recovery told", async () => {
    const log = createTestLogger();
    const spool = openSpool(newRoot(), { lockRefreshMs: 10, log });
    const lock = join(spool.dir, "LOCK");
    const content = readFileSync(lock);
    rmSync(lock);
    await Bun.sleep(200);
    writeFileSync(lock, content);
    await Bun.sleep(50);
    const lines = log.lines.map((l) => JSON.parse(l) as { level: string; msg: string }).filter((l) => /LOCK/.test(l.msg));
    expect(lines.filter((l) => l.level === "warn").map((l) => l.msg)).toEqual(["refreshing the metrics spool's LOCK failed"]);
    expect(lines.filter((l) => l.level === "debug").length).toBeGreaterThan(5);
    expect(lines.filter((l) => l.level === "info").map((l) => l.msg)).toEqual([
      "refreshing the metrics spool's LOCK works again",
    ]);
  });

  test("the spool's directories and files are readable by its own user alone, whatever the umask", async () => {
    const umask = process.umask(0o022);
    try {
      const root = join(newRoot(), "spool");
      const spool = openSpool(root);
      spool.append(row(1));
      await spool.idle();
      const mode = (path: string) => statSync(path).mode & 0o777;
      expect([mode(root), mode(spool.dir)]).toEqual([0o700, 0o700]);
      // The LOCK, the segment being written and the one created ahead of need.
      const files = readdirSync(spool.dir).sort();
      expect(files).toEqual(["0000000001.seg", "0000000002.seg", "LOCK"]);
      expect(files.map((name) => mode(join(spool.dir, name)))).toEqual([0o600, 0o600, 0o600]);
    } finally {
      process.umask(umask);
    }
  });

  test("spool directories an older version left readable by others are narrowed to their own user at start", () => {
    const root = join(newRoot(), "spool");
    mkdirSync(join(root, "gw-1"), { recursive: true, mode: 0o755 });
    const spool = openSpool(root);
    const mode = (path: string) => statSync(path).mode & 0o777;
    expect([mode(root), mode(spool.dir)]).toEqual([0o700, 0o700]);
  });

  test.skipIf(process.getuid?.() !== 0)(
    "a spool root the process may not narrow (a volume it does not own, its lost+found locked) is warned of, and the spool opens",
    async () => {
      // A shared volume's root, owned by root and open to all; the gateway runs as nobody.
      const root = newRoot();
      chmodSync(root, 0o777);
      // A filesystem's own directory at a volume's root, which no spool adopts and nobody may write to.
      mkdirSync(join(root, "lost+found"), { mode: 0o700 });
      const script = [
        `import { createLogger } from ${JSON.stringify(join(import.meta.dir, "../lib/log.ts"))};`,
        `import { openFileSpool } from ${JSON.stringify(join(import.meta.dir, "spool-file.ts"))};`,
        `const log = createLogger({ service: "gateway", write: (line) => process.stdout.write(line) });`,
        `const root = ${JSON.stringify(root)};`,
        `const spool = openFileSpool({ root, name: "gw-1", maxBytes: 1 << 20, fsync: "never", log });`,
        // Its own directory as the spool has it (closing an empty spool removes it).
        `const { uid, mode } = (await import("node:fs")).statSync(spool.dir);`,
        `console.log(JSON.stringify({ msg: "opened", uid, mode: mode & 0o777 }));`,
        `spool.close();`,
      ].join("\n");
      const asNobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
      const child = Bun.spawn([...asNobody, process.execPath, "--eval", script], { stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
      expect({ code, err }).toEqual({ code: 0, err: "" });
      const lines = out.split("\n").filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>);
      expect(lines).toEqual([
        expect.objectContaining({ level: "warn", msg: expect.stringContaining("readable by this user alone"), dir: root }),
        expect.objectContaining({ level: "warn", msg: expect.stringContaining("left alone"), dir: join(root, "lost+found") }),
        { msg: "opened", uid: 65534, mode: 0o700 },
      ]);
      expect(statSync(root).mode & 0o777).toBe(0o777);
    },
  );

  test("a replica restarted under a new name adopts the spools of replicas that are gone", () => {
    const root = newRoot();
    // A live replica's spool is left alone.
    const live = openSpool(root, { name: "gw-live" });
    live.append(row(500));
    const old = openSpool(root, { name: "gw-old-1" });
    const older = openSpool(root, { name: "gw-old-2" });
    for (let i = 0; i < 12; i++) old.append(row(i));
    old.seal(5, noByteLimit);
    old.ack(old.seal(5, noByteLimit)!.sequence);
    for (let i = 100; i < 103; i++) older.append(row(i));
    abandon(old);
    abandon(older);

    const fresh = openSpool(root, { name: "gw-new", batchRows: 4 });
    expect(fresh.recovery.adoptedRows).toBe(10);
    expect(fresh.recovery.adoptedDirs.sort()).toEqual([join(root, "gw-old-1"), join(root, "gw-old-2")]);
    const batches = [...fresh.unacked()];
    expect(batches.every((b) => b.recovered && b.rows <= 4)).toBe(true);
    expect(batches.flatMap((b) => ids(fresh.read(b))).sort()).toEqual([...range(0, 5), ...range(10, 12), ...range(100, 103)]);
    expect(readdirSync(root).sort()).toEqual(["gw-live", "gw-new"]);
    expect(live.rows).toBe(1);
  });

  test("a directory in the root that holds no spool (a volume's lost+found, an operator's) is neither adopted nor deleted", () => {
    const root = newRoot();
    mkdirSync(join(root, "lost+found"));
    writeFileSync(join(root, "lost+found", "#1234"), "a file fsck recovered");
    mkdirSync(join(root, "empty"));
    const fresh = openSpool(root, { name: "gw-new" });
    expect(fresh.recovery.adoptedDirs).toEqual([]);
    expect(readFileSync(join(root, "lost+found", "#1234"), "utf8")).toBe("a file fsck recovered");
    expect(readdirSync(join(root, "lost+found"))).toEqual(["#1234"]);
    expect(readdirSync(join(root, "empty"))).toEqual([]);
  });
});
