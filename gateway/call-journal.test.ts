import { afterEach, describe, expect, test } from "bun:test";
import {
  appendFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { adoptedCalls, type CallJournal, callJournalFile, interruptedCode, openCallJournal } from "./call-journal.ts";
import { openFileSpool } from "./spool-file.ts";
import { createTestLogger } from "./testing.ts";

const roots: string[] = [];
const journals: CallJournal[] = [];
afterEach(() => {
  for (const journal of journals.splice(0)) journal.close();
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

function newDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "call-journal-test-"));
  roots.push(dir);
  return dir;
}

const startMs = Date.UTC(2026, 11, 1, 9, 30);

/** A call's metrics as they stand once it is admitted. */
function admitted(i: number, extra: MessageInitShape<typeof RequestMetricsSchema> = {}): RequestMetrics {
  return create(RequestMetricsSchema, {
    requestId: `req-${i}`,
    traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
    spanId: "00f067aa0ba902b7",
    startTime: timestampFromMs(startMs + i),
    orgId: "org_1",
    apiKeyId: "key_1",
    requestedModel: "gpt-4o",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    gatewayInstanceId: "gw-1",
    ...extra,
  });
}

/** Opens the journal in `dir` (as a process starting there would); returns it and what it recorded. */
function open(dir: string, options: { lastRow?: Uint8Array; write?: (fd: number, text: string) => number } = {}) {
  const recorded: RequestMetrics[] = [];
  const journal = openCallJournal(dir, { ...options, record: (m) => recorded.push(m), log: createTestLogger() });
  journals.push(journal);
  return { journal, recorded };
}

/** Leaves a journal as a killed process does: file as written, never closed. */
function kill(journal: CallJournal) {
  journals.splice(journals.indexOf(journal), 1);
}

const idsOf = (rows: RequestMetrics[]) => rows.map((m) => m.requestId).sort();
const journalText = (dir: string) => readFileSync(join(dir, callJournalFile), "utf8");

describe("calls journal", () => {
  test("the calls a killed process left unfinished are recorded once, as interrupted, by the next", () => {
    const dir = newDir();
    const first = open(dir);
    expect(first.recorded).toEqual([]);
    first.journal.begun(admitted(1, { projectId: "proj_1", endUserId: "user-7", tags: { team: "search" } }));
    first.journal.begun(admitted(2, { endpoint: Endpoint.EMBEDDINGS }));
    first.journal.begun(admitted(3, { streamed: true }));
    first.journal.ended("req-2");
    kill(first.journal);
    // Seen alive a minute after the calls began.
    const lastAlive = new Date(startMs + 60_000);
    utimesSync(join(dir, callJournalFile), lastAlive, lastAlive);

    const second = open(dir);
    expect(idsOf(second.recorded)).toEqual(["req-1", "req-3"]);
    const [one, three] = second.recorded.sort((a, b) => a.requestId.localeCompare(b.requestId)) as [
      RequestMetrics,
      RequestMetrics,
    ];
    expect(one).toMatchObject({
      traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
      spanId: "00f067aa0ba902b7",
      orgId: "org_1",
      projectId: "proj_1",
      apiKeyId: "key_1",
      endUserId: "user-7",
      requestedModel: "gpt-4o",
      endpoint: Endpoint.CHAT_COMPLETIONS,
      streamed: false,
      status: RequestStatus.INTERNAL_ERROR,
      httpStatus: 500,
      errorCode: interruptedCode,
      costNanos: 0n,
      gatewayInstanceId: "gw-1",
      tags: { team: "search" },
    });
    expect(one.usage).toBeUndefined();
    expect(timestampDate(one.startTime as never).getTime()).toBe(startMs + 1);
    expect(timestampDate(one.endTime as never).getTime()).toBe(lastAlive.getTime());
    expect(one.totalLatencyUs).toBe(BigInt(60_000 - 1) * 1000n);
    expect(one.upstreamLatencyUs).toBe(one.totalLatencyUs);
    expect(one.gatewayOverheadUs).toBe(0n);
    expect(three.streamed).toBe(true);
    // A process stopped long before it was killed: its calls last no longer than a request may.
    const stopped = newDir();
    const third = open(stopped);
    third.journal.begun(admitted(4));
    kill(third.journal);
    const daysLater = new Date(startMs + 3 * 86_400_000);
    utimesSync(join(stopped, callJournalFile), daysLater, daysLater);
    const [four] = open(stopped).recorded;
    expect(four?.totalLatencyUs).toBe(3_600_000_000n);
    // Recorded once: the file now holds nothing, so a third process (the second killed too) records none again.
    kill(second.journal);
    expect(open(dir).recorded).toEqual([]);
  });

  test("a call whose row is the spool's newest was finished: killed before it was crossed out, it is not recorded", () => {
    const dir = newDir();
    const first = open(dir);
    first.journal.begun(admitted(1));
    first.journal.begun(admitted(2));
    kill(first.journal);
    // req-2's row was appended, then the process died before its "-" line.
    const lastRow = toBinary(RequestMetricsSchema, admitted(2, { status: RequestStatus.OK, costNanos: 5n }));
    expect(idsOf(open(dir, { lastRow }).recorded)).toEqual(["req-1"]);
  });

  test("a note cut short by the crash, or a line that does not parse, is left out", () => {
    const dir = newDir();
    const first = open(dir);
    first.journal.begun(admitted(1));
    kill(first.journal);
    appendFileSync(join(dir, callJournalFile), `+{"id":"req-9"}\n+not json\n-\n+{"id":"req-2","start":${startMs},"org"`);
    expect(idsOf(open(dir).recorded)).toEqual(["req-1"]);
  });

  test("the file is rewritten with the calls in flight as it grows, and still says which they are", () => {
    const dir = newDir();
    const { journal } = open(dir);
    journal.begun(admitted(0));
    for (let i = 1; i <= 12_000; i++) {
      journal.begun(admitted(i));
      journal.ended(`req-${i}`);
    }
    journal.begun(admitted(20_000));
    const lines = journalText(dir).split("\n").length - 1;
    expect(lines).toBeLessThan(10_000);
    kill(journal);
    expect(idsOf(open(dir).recorded)).toEqual(["req-0", "req-20000"]);
  });

  test("a rewrite the disk refuses keeps the line it was to hold: a call crossed out then stays crossed out", () => {
    const dir = newDir();
    const { journal } = open(dir);
    // The rewrite's new file cannot be made (as on a full disk); the file written so far is still there.
    mkdirSync(join(dir, `${callJournalFile}.tmp`));
    journal.begun(admitted(0));
    journal.begun(admitted(5000));
    for (let i = 1; i < 5000; i++) {
      journal.begun(admitted(i));
      // The 10,000th line, where the file is rewritten: req-4999's "-".
      journal.ended(`req-${i}`);
    }
    kill(journal);
    expect(idsOf(open(dir).recorded)).toEqual(["req-0", "req-5000"]);
  });

  test("a write the disk refuses empties the file until writes work again, with the calls then in flight", () => {
    const dir = newDir();
    let full = false;
    const { journal } = open(dir, {
      write: (fd, text) => {
        if (full) throw Object.assign(new Error("ENOSPC: no space left on device"), { code: "ENOSPC" });
        return writeSync(fd, text);
      },
    });
    journal.begun(admitted(1));
    journal.begun(admitted(2));
    full = true;
    // Its "-" refused: the note of req-1 must not outlive it, so the file is emptied.
    journal.ended("req-1");
    expect(journalText(dir)).toBe("");
    journal.begun(admitted(3));
    expect(journalText(dir)).toBe("");
    full = false;
    // Tried again a thousand lines on (a rewrite, which does not go through the failing descriptor's writes).
    for (let i = 100; i < 1100; i++) {
      journal.begun(admitted(i));
      journal.ended(`req-${i}`);
    }
    journal.begun(admitted(4));
    kill(journal);
    expect(idsOf(open(dir).recorded)).toEqual(["req-2", "req-3", "req-4"]);
  });

  test("close removes the file when no call is in flight", () => {
    const dir = newDir();
    const first = open(dir);
    first.journal.begun(admitted(1));
    first.journal.ended("req-1");
    first.journal.close();
    journals.splice(journals.indexOf(first.journal), 1);
    expect(existsSync(join(dir, callJournalFile))).toBe(false);
    const second = open(dir);
    second.journal.begun(admitted(2));
    second.journal.close();
    journals.splice(journals.indexOf(second.journal), 1);
    expect(existsSync(join(dir, callJournalFile))).toBe(true);
  });

  test("a spool adopting a dead replica's directory records its unfinished calls with its rows", () => {
    const root = newDir();
    const sidecars = [{ file: callJournalFile, rows: (orphanDir: string, lastRow?: Uint8Array) => adoptedCalls(orphanDir, lastRow) }];
    const spoolOptions = { maxBytes: 1024 * 1024, fsync: "never" as const, log: createTestLogger(), sidecars };
    const gone = openFileSpool({ root, name: "gw-gone", ...spoolOptions });
    const goneCalls = open(gone.dir, { lastRow: gone.lastRow });
    for (const i of [1, 2, 3]) goneCalls.journal.begun(admitted(i));
    // req-1 finished: its row, then its "-"; req-3's row went in, and the process died before its "-".
    gone.append(toBinary(RequestMetricsSchema, admitted(1, { status: RequestStatus.OK })));
    goneCalls.journal.ended("req-1");
    gone.append(toBinary(RequestMetricsSchema, admitted(3, { status: RequestStatus.OK })));
    kill(goneCalls.journal);
    gone.close();
    writeFileSync(join(gone.dir, "LOCK"), JSON.stringify({ pid: Bun.spawnSync(["true"]).pid, host: hostname(), started: null }));
    expect(statSync(join(gone.dir, callJournalFile)).size).toBeGreaterThan(0);

    const next = openFileSpool({ root, name: "gw-next", ...spoolOptions });
    try {
      expect(next.recovery.adoptedDirs).toEqual([gone.dir]);
      expect(existsSync(gone.dir)).toBe(false);
      next.seal(1000, 1024 * 1024);
      const rows = [...next.unacked()].flatMap((batch) => next.read(batch)).map((r) => fromBinary(RequestMetricsSchema, r));
      expect(rows.map((m) => [m.requestId, m.status])).toEqual([
        ["req-1", RequestStatus.OK],
        ["req-3", RequestStatus.OK],
        ["req-2", RequestStatus.INTERNAL_ERROR],
      ]);
      expect(rows[2]?.errorCode).toBe(interruptedCode);
    } finally {
      next.close();
    }
  });
});
