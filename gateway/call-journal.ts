import {
  closeSync,
  existsSync,
  ftruncateSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";

/**
 * The calls a gateway replica has in flight, kept in its metrics spool's directory, so that the calls a killed process
 * (kill -9, out of memory, a crash) never finished are still recorded, once: the next process to open that directory
 * (itself restarted, or the replica adopting its spool) records each as interrupted by the gateway (status
 * INTERNAL_ERROR, error code "gateway_interrupted") with no tokens and no cost: the fault was the gateway's, and what
 * its upstream had used is not known. The time until the process was last seen alive counts as upstream time.
 *
 * A call is noted once admitted ("+" and the fields its row needs, as JSON) and crossed out ("-id") just after its row
 * was appended to the spool (or dropped by it). A crash between the two leaves a call noted whose row is written: that
 * row is then the spool's newest (appends are synchronous, and nothing runs between them), so the note of the newest row
 * is never taken for an interrupted call. The file is rewritten with the calls in flight when it grows.
 * A write the disk refuses (full, most likely) empties the file, and calls go unnoted until a rewrite works again: a
 * note whose "-" was lost would have a finished call recorded twice, differently.
 * Written without fsync, as the spool's rows are by default: a killed process loses nothing written. While calls are in
 * flight, the file's time is refreshed every couple of seconds: it says when its process was last alive.
 */
export interface CallJournal {
  /** Notes a call admitted (its metrics as they stand: ids, org and key, model, endpoint, start). */
  begun(metrics: RequestMetrics): void;
  /** Crosses out a call whose row was just appended to the spool (or dropped by it). */
  ended(requestId: string): void;
  /** Closes the file; removes it when no call is in flight. */
  close(): void;
}

/** The journal's file name inside a spool directory. */
export const callJournalFile = "CALLS";

/** error_code of a call a killed gateway never finished. */
export const interruptedCode = "gateway_interrupted";

// The file is rewritten with the calls in flight once it has this many lines, and more than twice as many as calls.
const compactLines = 10_000;
// While the disk refuses writes, the file is tried again after this many lines.
const retryLines = 1000;
// The last moment a process was seen alive is its file's time, refreshed this often.
const aliveRefreshMs = 2000;

/** What a call's note keeps of its metrics: what its row says when the call is recorded as interrupted. */
interface Note {
  id: string;
  start: number;
  trace?: string;
  span?: string;
  org: string;
  project?: string;
  key?: string;
  user?: string;
  model?: string;
  endpoint: number;
  streamed?: true;
  tags?: Record<string, string>;
  instance: string;
}

export interface CallJournalOptions {
  /** The spool's newest row when it was opened (FileSpool.lastRow): its call, if noted, was not interrupted. */
  lastRow?: Uint8Array;
  /** Records a row: the calls the previous process left unfinished go there before the file is emptied. */
  record(metrics: RequestMetrics): void;
  log?: Logger;
  /** Appends text at the descriptor (fs.writeSync); tests fill the disk here. */
  write?: (fd: number, text: string) => number;
}

/**
 * Opens (or creates) the journal in `dir`, a spool directory this process holds locked: first records the calls a
 * previous process there left unfinished.
 */
export function openCallJournal(dir: string, options: CallJournalOptions): CallJournal {
  const path = join(dir, callJournalFile);
  const log = options.log;
  const write = options.write ?? ((fd, text) => writeSync(fd, text));
  const outage = createOutageLog(log, {
    failed: "writing the journal of calls in flight failed; calls a crash cuts go unrecorded meanwhile",
    recovered: "the journal of calls in flight is written again",
  });
  // Recorded before the file is emptied: a crash in between has them recorded twice, alike, which downstream absorbs.
  for (const metrics of interruptedCalls(dir, options.lastRow, log)) options.record(metrics);

  // Each call in flight, by request id, with its note's line.
  const live = new Map<string, string>();
  let fd = -1;
  let lines = 0;
  let compactAt = compactLines;
  let failing = false;

  /** Writes the calls in flight as the whole file; false when the disk refused it. */
  const rewrite = (): boolean => {
    const tmp = `${path}.tmp`;
    try {
      const text = [...live.values()].join("");
      writeFileSync(tmp, text, { mode: 0o600 });
      renameSync(tmp, path);
      if (fd >= 0) closeSync(fd);
      fd = -1;
      fd = openSync(path, "a", 0o600);
      lines = live.size;
      compactAt = compactLines;
      failing = false;
      outage.recovered({ path });
      return true;
    } catch (e) {
      // The new file in place without a descriptor to cross its calls out: it must not outlive them.
      if (fd < 0) distrust(e, () => rmSync(path, { force: true }));
      else outage.failed({ err: e, path });
      // Tried again only after more calls, not at every one while the disk refuses it.
      compactAt = lines + retryLines;
      return false;
    }
  };

  /** Empties the file after a write that failed: none of its notes can be trusted to have their "-" any more. */
  const distrust = (e: unknown, empty = () => ftruncateSync(fd, 0)) => {
    failing = true;
    compactAt = lines + retryLines;
    outage.failed({ err: e, path });
    try {
      empty();
    } catch {
      // Nor can the file be emptied (the disk has gone read-only, say): so no row is written either, and the calls
      // noted there are recorded as interrupted if the process dies, as their rows are then missing.
    }
  };

  const append = (text: string) => {
    lines++;
    if (lines >= compactAt) {
      // The whole file written again holds the line: when it is mostly calls crossed out, or to start again. Refused,
      // the file as it was is kept, and the line goes there as any other: a "-" lost had its call recorded twice.
      if (failing || lines > live.size * 2) {
        if (rewrite() || failing) return;
      } else compactAt = lines + compactLines;
    }
    if (failing) return;
    try {
      const written = write(fd, text);
      if (written !== Buffer.byteLength(text)) throw new Error(`wrote ${written} of ${Buffer.byteLength(text)} bytes`);
    } catch (e) {
      distrust(e);
    }
  };

  rewrite();
  const alive = setInterval(() => {
    if (live.size === 0 || failing) return;
    try {
      const now = new Date();
      utimesSync(path, now, now);
    } catch {
      // Only how long an interrupted call is said to have lasted depends on it.
    }
  }, aliveRefreshMs);
  alive.unref?.();

  return {
    begun(m) {
      const line = `+${JSON.stringify(noteOf(m))}\n`;
      live.set(m.requestId, line);
      append(line);
    },
    ended(requestId) {
      if (!live.delete(requestId)) return;
      append(`-${requestId}\n`);
    },
    close() {
      clearInterval(alive);
      if (fd < 0) return;
      closeSync(fd);
      fd = -1;
      if (live.size === 0) rmSync(path, { force: true });
    },
  };
}

/**
 * The rows of the calls an orphaned spool directory's process left unfinished, encoded, for its adopter to move into its
 * own spool with the orphan's rows (SpoolSidecar.rows).
 */
export function adoptedCalls(orphanDir: string, lastRow: Uint8Array | undefined, log?: Logger): Uint8Array[] {
  return interruptedCalls(orphanDir, lastRow, log).map((m) => toBinary(RequestMetricsSchema, m));
}

function noteOf(m: RequestMetrics): Note {
  const note: Note = {
    id: m.requestId,
    start: m.startTime ? Number(m.startTime.seconds) * 1000 + Math.floor(m.startTime.nanos / 1e6) : 0,
    org: m.orgId,
    endpoint: m.endpoint,
    instance: m.gatewayInstanceId,
  };
  // Empty fields are left out: most calls have no project, user or tags, and an untraced one no ids.
  if (m.traceId) note.trace = m.traceId;
  if (m.spanId) note.span = m.spanId;
  if (m.projectId) note.project = m.projectId;
  if (m.apiKeyId) note.key = m.apiKeyId;
  if (m.endUserId) note.user = m.endUserId;
  if (m.requestedModel) note.model = m.requestedModel;
  if (m.streamed) note.streamed = true;
  for (const _ in m.tags) {
    note.tags = m.tags;
    break;
  }
  return note;
}

/** The calls `dir`'s journal holds unfinished, as the rows that record them interrupted. */
function interruptedCalls(dir: string, lastRow: Uint8Array | undefined, log?: Logger): RequestMetrics[] {
  const path = join(dir, callJournalFile);
  if (!existsSync(path)) return [];
  let text: string;
  let lastAliveMs: number;
  try {
    text = readFileSync(path, "utf8");
    lastAliveMs = statSync(path).mtimeMs;
  } catch (e) {
    log?.warn("reading the journal of calls in flight failed; calls a crash cut there go unrecorded", { err: e, path });
    return [];
  }
  const open = new Map<string, Note>();
  // A line cut short by a crash has no newline: left out (a call half noted had not reached its upstream).
  for (const line of text.slice(0, text.lastIndexOf("\n") + 1).split("\n")) {
    if (line[0] === "-") open.delete(line.slice(1));
    else if (line[0] === "+") {
      const note = parseNote(line.slice(1));
      if (note) open.set(note.id, note);
    }
  }
  // Its row is the spool's newest: the process died between writing it and crossing the call out.
  if (lastRow && open.size > 0) {
    try {
      open.delete(fromBinary(RequestMetricsSchema, lastRow).requestId);
    } catch {
      // A row that does not decode was never the row of a noted call.
    }
  }
  if (open.size > 0) {
    log?.warn("recording the calls a killed gateway left unfinished as interrupted", { dir, calls: open.size });
  }
  return [...open.values()].map((note) => interruptedRow(note, lastAliveMs));
}

function parseNote(json: string): Note | undefined {
  try {
    const note = JSON.parse(json) as Note;
    const valid =
      typeof note.id === "string" &&
      note.id !== "" &&
      Number.isSafeInteger(note.start) &&
      typeof note.org === "string" &&
      Number.isInteger(note.endpoint) &&
      typeof note.instance === "string";
    return valid ? note : undefined;
  } catch {
    return undefined;
  }
}

// No call outlives the longest request time limit a config may set (request_timeout_ms): a process stopped for days
// before it was killed does not make its calls last that long.
const longestCallMs = 3_600_000;

function interruptedRow(note: Note, lastAliveMs: number): RequestMetrics {
  const endMs = Math.min(Math.max(note.start, Math.floor(lastAliveMs)), note.start + longestCallMs);
  const elapsedUs = BigInt(endMs - note.start) * 1000n;
  return create(RequestMetricsSchema, {
    requestId: note.id,
    traceId: note.trace ?? "",
    spanId: note.span ?? "",
    startTime: timestampFromMs(note.start),
    endTime: timestampFromMs(endMs),
    orgId: note.org,
    projectId: note.project ?? "",
    apiKeyId: note.key ?? "",
    endUserId: note.user ?? "",
    requestedModel: note.model ?? "",
    endpoint: note.endpoint,
    streamed: note.streamed === true,
    status: RequestStatus.INTERNAL_ERROR,
    httpStatus: 500,
    errorCode: interruptedCode,
    totalLatencyUs: elapsedUs,
    upstreamLatencyUs: elapsedUs,
    gatewayInstanceId: note.instance,
    tags: note.tags ?? {},
  });
}
