import { closeSync, existsSync, openSync, readFileSync, renameSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { createOutageLog, type Logger } from "../lib/log.ts";

/**
 * The budget leases a gateway replica holds, kept in its metrics spool's directory, so that a replica killed before it
 * could release them (kill -9, out of memory, a crash) has them released by the next process to open that directory:
 * itself restarted, or the replica adopting its spool. Without it, billing keeps their grants reserved until their TTL
 * plus its grace, and near a budget's end every replica refuses requests for money nobody is using.
 *
 * A lease id is written before it is asked for (an ask whose answer is lost may still be granted) and crossed out once
 * billing has settled it. Lines are appended ("+id", "-id"); the file is rewritten with the live ids when it grows.
 * Written without fsync: a killed process loses nothing written, and a host that dies takes a pod's directory with it
 * (leases then go at their TTL plus grace, as without the file).
 */
export interface LeaseJournal {
  /** Lease ids a previous process left unreleased in this directory (or in a spool adopted into it). */
  readonly inherited: readonly string[];
  /** Notes a lease id about to be asked for, or held. */
  held(leaseId: string): void;
  /** Crosses out a lease billing has settled (or never granted). */
  settled(leaseId: string): void;
  /** Closes the file; removes it when it holds no lease. */
  close(): void;
}

/** The journal's file name inside a spool directory. */
export const leaseJournalFile = "LEASES";

// The file is rewritten with its live ids once it has this many lines, and more than twice as many as live ids.
const compactLines = 1_000;

export interface LeaseJournalOptions {
  /** Appends a line at the descriptor (fs.writeSync); tests fill the disk here. */
  write?: (fd: number, line: string) => number;
}

/** Opens (or creates) the journal in `dir`, a spool directory this process holds locked. */
export function openLeaseJournal(dir: string, log?: Logger, options: LeaseJournalOptions = {}): LeaseJournal {
  const path = join(dir, leaseJournalFile);
  const write = options.write ?? ((fd, line) => writeSync(fd, line));
  // Once while the disk refuses it (full, most likely), not at every lease asked for and given back meanwhile.
  const outage = createOutageLog(log, {
    failed: "writing the budget lease journal failed",
    recovered: "the budget lease journal is written again",
  });
  const live = readLive(path, log);
  const inherited = [...live];
  let fd = -1;
  let lines = 0;
  let compactAt = compactLines;
  const rewrite = () => {
    const tmp = `${path}.tmp`;
    writeFileSync(tmp, [...live].map((id) => `+${id}\n`).join(""), { mode: 0o600 });
    renameSync(tmp, path);
    // Only once the new file is in place: a rewrite that fails (a full disk) goes on appending to the old one, and the
    // descriptor is never left closed here while the process reuses its number for another file.
    if (fd >= 0) closeSync(fd);
    fd = -1;
    fd = openSync(path, "a", 0o600);
    lines = live.size;
    compactAt = compactLines;
  };
  rewrite();
  const append = (line: string) => {
    if (fd < 0) return;
    try {
      write(fd, line);
      lines++;
      if (lines >= compactAt && lines > live.size * 2) {
        // Tried again only after as many lines more, not at every line while the disk refuses it.
        compactAt = lines + compactLines;
        rewrite();
      }
      outage.recovered({ path });
    } catch (e) {
      // Only a lease's early release after a crash is lost: billing still frees it at its TTL plus grace.
      outage.failed({ err: e, path });
    }
  };
  return {
    inherited,
    held(leaseId) {
      if (live.has(leaseId)) return;
      live.add(leaseId);
      append(`+${leaseId}\n`);
    },
    settled(leaseId) {
      if (!live.delete(leaseId)) return;
      append(`-${leaseId}\n`);
    },
    close() {
      if (fd < 0) return;
      closeSync(fd);
      fd = -1;
      if (live.size === 0) rmSync(path, { force: true });
    },
  };
}

/**
 * Adds the live lease ids of an orphaned spool directory's journal to `ownDir`'s, before the orphan is deleted: its
 * rows were just moved into this spool, and its leases are released once they are acked.
 */
export function adoptLeaseJournal(orphanDir: string, ownDir: string, log?: Logger): void {
  const ids = readLive(join(orphanDir, leaseJournalFile), log);
  if (ids.size === 0) return;
  writeFileSync(join(ownDir, leaseJournalFile), [...ids].map((id) => `+${id}\n`).join(""), { flag: "a", mode: 0o600 });
}

function readLive(path: string, log?: Logger): Set<string> {
  const live = new Set<string>();
  if (!existsSync(path)) return live;
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    log?.warn("reading the budget lease journal failed", { err: e, path });
    return live;
  }
  // A line cut short by a crash has no newline: left out (an id half written was never asked for).
  const complete = text.endsWith("\n") ? text : text.slice(0, text.lastIndexOf("\n") + 1);
  for (const line of complete.split("\n")) {
    const id = line.slice(1);
    if (!/^[A-Za-z0-9_-]{1,128}$/.test(id)) continue;
    if (line[0] === "+") live.add(id);
    else if (line[0] === "-") live.delete(id);
  }
  return live;
}
