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
 * billing has settled it; what a lease has spent is noted as its requests settle, so it is released at that and
 * billing counts the spend of requests whose usage never reaches it (rows a full spool dropped). Lines are appended
 * ("+id", "=id spent", "-id"); the file is rewritten with the live leases when it grows.
 * Written without fsync: a killed process loses nothing written, and a host that dies takes a pod's directory with it
 * (leases then go at their TTL plus grace, as without the file).
 */
export interface LeaseJournal {
  /** Lease ids a previous process left unreleased in this directory (or in a spool adopted into it). */
  readonly inherited: readonly string[];
  /** What each inherited lease had spent, as last noted (in its budget's unit); absent when nothing was. */
  readonly inheritedSpent: ReadonlyMap<string, bigint>;
  /** Notes a lease id about to be asked for, or held. */
  held(leaseId: string): void;
  /** Notes what leases held have spent in all, after a request settled on them; one write for them all. */
  spent(leases: readonly { leaseId: string; spent: bigint }[]): void;
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
  const inherited = [...live.keys()];
  const inheritedSpent = new Map([...live].filter(([, spent]) => spent > 0n));
  let fd = -1;
  let lines = 0;
  let compactAt = compactLines;
  const rewrite = () => {
    const tmp = `${path}.tmp`;
    const text = linesOf(live);
    writeFileSync(tmp, text, { mode: 0o600 });
    renameSync(tmp, path);
    // Only once the new file is in place: a rewrite that fails (a full disk) goes on appending to the old one, and the
    // descriptor is never left closed here while the process reuses its number for another file.
    if (fd >= 0) closeSync(fd);
    fd = -1;
    fd = openSync(path, "a", 0o600);
    lines = lineCount(text);
    compactAt = compactLines;
  };
  rewrite();
  const append = (line: string) => {
    if (fd < 0) return;
    try {
      write(fd, line);
      lines += lineCount(line);
      if (lines >= compactAt && lines > live.size * 2) {
        // Tried again only after as many lines more, not at every line while the disk refuses it.
        compactAt = lines + compactLines;
        rewrite();
      }
      outage.recovered({ path });
    } catch (e) {
      // Only a lease's early release after a crash is lost (or what it spent noted, counted then as its usage is
      // recorded): billing still frees it at its TTL plus grace.
      outage.failed({ err: e, path });
    }
  };
  return {
    inherited,
    inheritedSpent,
    held(leaseId) {
      if (live.has(leaseId)) return;
      live.set(leaseId, 0n);
      append(`+${leaseId}\n`);
    },
    spent(leases) {
      let text = "";
      for (const { leaseId, spent } of leases) {
        // One settled already (its release landed first) stays crossed out.
        if (!live.has(leaseId) || live.get(leaseId) === spent) continue;
        live.set(leaseId, spent);
        text += `=${leaseId} ${spent}\n`;
      }
      if (text) append(text);
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
  const leases = readLive(join(orphanDir, leaseJournalFile), log);
  if (leases.size === 0) return;
  writeFileSync(join(ownDir, leaseJournalFile), linesOf(leases), { flag: "a", mode: 0o600 });
}

const lineCount = (text: string) => {
  let n = 0;
  for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) n++;
  return n;
};

/** The lines that say `leases` (id -> spent) are live. */
const linesOf = (leases: ReadonlyMap<string, bigint>) =>
  [...leases].map(([id, spent]) => `+${id}\n${spent > 0n ? `=${id} ${spent}\n` : ""}`).join("");

/** Live lease ids, with what each has spent as last noted. */
function readLive(path: string, log?: Logger): Map<string, bigint> {
  const live = new Map<string, bigint>();
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
    const [id = "", spent] = line.slice(1).split(" ");
    if (!/^[A-Za-z0-9_-]{1,128}$/.test(id)) continue;
    if (line[0] === "+" && spent === undefined) {
      if (!live.has(id)) live.set(id, 0n);
    } else if (line[0] === "=" && spent !== undefined && /^\d{1,30}$/.test(spent)) {
      if (live.has(id)) live.set(id, BigInt(spent));
    } else if (line[0] === "-" && spent === undefined) live.delete(id);
  }
  return live;
}
