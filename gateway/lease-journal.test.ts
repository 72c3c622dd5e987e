import { afterEach, describe, expect, test } from "bun:test";
import {
  appendFileSync,
  closeSync,
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { adoptLeaseJournal, leaseJournalFile, openLeaseJournal } from "./lease-journal.ts";
import { openFileSpool } from "./spool-file.ts";
import { createTestLogger } from "./testing.ts";

const roots: string[] = [];
afterEach(() => {
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

function newRoot(): string {
  const root = mkdtempSync(join(tmpdir(), "lease-journal-test-"));
  roots.push(root);
  return root;
}

const deadPid = Bun.spawnSync(["true"]).pid;
const sidecars = [{ file: leaseJournalFile, adopt: (orphanDir: string, ownDir: string) => adoptLeaseJournal(orphanDir, ownDir) }];
const openSpool = (root: string, name: string) =>
  openFileSpool({ root, name, maxBytes: 1024 * 1024, fsync: "never", log: createTestLogger(), sidecars });

describe("budget lease journal", () => {
  test("the leases a killed process held are what the next one inherits; those settled are not", () => {
    const dir = newRoot();
    const first = openLeaseJournal(dir);
    expect(first.inherited).toEqual([]);
    for (const id of ["lease_a", "lease_b", "lease_c"]) first.held(id);
    first.settled("lease_b");
    // Killed: never closed, and its last line cut short.
    appendFileSync(join(dir, leaseJournalFile), "+lease_");
    const second = openLeaseJournal(dir);
    expect(second.inherited).toEqual(["lease_a", "lease_c"]);
    // Inherited leases stay noted until settled, so a second crash keeps them too.
    second.settled("lease_a");
    expect(openLeaseJournal(dir).inherited).toEqual(["lease_c"]);
  });

  test("what each lease spent is inherited with it, through rewrites, cut lines and an adopted spool", () => {
    const root = newRoot();
    const gone = openSpool(root, "gw-gone");
    const first = openLeaseJournal(gone.dir);
    first.held("lease_a");
    first.held("lease_b");
    first.spent([
      { leaseId: "lease_a", spent: 5n },
      { leaseId: "lease_b", spent: 7n },
    ]);
    first.spent([{ leaseId: "lease_a", spent: 12n }]);
    first.settled("lease_b");
    // Settled before its request's spend was noted: stays crossed out.
    first.spent([{ leaseId: "lease_b", spent: 9n }]);
    for (let i = 0; i < 1_000; i++) first.spent([{ leaseId: "lease_a", spent: 100n + BigInt(i) }]);
    // Killed, its last line cut short.
    appendFileSync(join(gone.dir, leaseJournalFile), "=lease_a 99999");
    const second = openLeaseJournal(gone.dir);
    expect(second.inherited).toEqual(["lease_a"]);
    expect([...second.inheritedSpent]).toEqual([["lease_a", 1_099n]]);
    gone.close();
    writeFileSync(join(gone.dir, "LOCK"), JSON.stringify({ pid: deadPid, host: hostname(), started: null }));
    const adopter = openSpool(root, "gw-next");
    const adopted = openLeaseJournal(adopter.dir);
    expect([...adopted.inheritedSpent]).toEqual([["lease_a", 1_099n]]);
    adopted.settled("lease_a");
    adopted.close();
    adopter.close();
  });

  test("grows by lines and is rewritten with the live leases; closed empty, it is gone", () => {
    const dir = newRoot();
    const journal = openLeaseJournal(dir);
    journal.held("lease_kept");
    for (let i = 0; i < 5_000; i++) {
      journal.held(`lease_${i}`);
      journal.settled(`lease_${i}`);
    }
    expect(readFileSync(join(dir, leaseJournalFile), "utf8").split("\n").length).toBeLessThan(1_100);
    expect(openLeaseJournal(dir).inherited).toEqual(["lease_kept"]);
    journal.settled("lease_kept");
    journal.close();
    expect(existsSync(join(dir, leaseJournalFile))).toBe(false);
  });

  test("a rewrite the disk refuses leaves it appending to its file, and closes no file the process opened since", () => {
    const dir = newRoot();
    const journal = openLeaseJournal(dir);
    journal.held("lease_kept");
    // The rewritten file cannot be written (a full disk): a directory stands where it goes.
    mkdirSync(join(dir, `${leaseJournalFile}.tmp`));
    for (let i = 0; i < 600; i++) {
      journal.held(`lease_${i}`);
      journal.settled(`lease_${i}`);
    }
    // A file opened meanwhile takes the lowest free descriptor number.
    const otherPath = join(dir, "0000000001.seg");
    const other = openSync(otherPath, "w");
    journal.held("lease_after");
    expect(() => fstatSync(other)).not.toThrow();
    closeSync(other);
    expect(readFileSync(otherPath, "utf8")).toBe("");
    rmSync(join(dir, `${leaseJournalFile}.tmp`), { recursive: true });
    expect(openLeaseJournal(dir).inherited).toEqual(["lease_kept", "lease_after"]);
  });

  test("a disk that refuses its lines is warned of once, and its end logged once, while leases come and go", () => {
    const dir = newRoot();
    const log = createTestLogger();
    let full = false;
    const write = (fd: number, line: string) => {
      if (full) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
      return writeSync(fd, line);
    };
    const journal = openLeaseJournal(dir, log, { write });
    journal.held("lease_before");
    full = true;
    for (let i = 0; i < 100; i++) {
      journal.held(`lease_${i}`);
      journal.settled(`lease_${i}`);
    }
    full = false;
    journal.held("lease_after");
    const logged = log.lines.map((line) => JSON.parse(line) as { level: string; msg: string; failures?: number });
    expect(logged.filter((l) => l.level === "warn").map((l) => l.msg)).toEqual(["writing the budget lease journal failed"]);
    expect(logged.filter((l) => l.level === "info")).toMatchObject([
      { msg: "the budget lease journal is written again", failures: 200 },
    ]);
    expect(openLeaseJournal(dir).inherited).toEqual(["lease_before", "lease_after"]);
  });

  test("a spool adopted from a replica that is gone brings its leases; an empty spool with leases is kept at close", () => {
    const root = newRoot();
    const gone = openSpool(root, "gw-gone");
    const goneLeases = openLeaseJournal(gone.dir);
    goneLeases.held("lease_of_the_dead");
    gone.close();
    // Its spool was empty, but its leases are still to be released: the directory stays.
    expect(readdirSync(gone.dir)).toEqual([leaseJournalFile]);
    writeFileSync(join(gone.dir, "LOCK"), JSON.stringify({ pid: deadPid, host: hostname(), started: null }));

    const adopter = openSpool(root, "gw-next");
    expect(adopter.recovery.adoptedDirs).toEqual([gone.dir]);
    expect(readdirSync(root)).toEqual(["gw-next"]);
    const journal = openLeaseJournal(adopter.dir);
    expect(journal.inherited).toEqual(["lease_of_the_dead"]);
    journal.settled("lease_of_the_dead");
    journal.close();
    adopter.close();
    expect(readdirSync(root)).toEqual([]);
  });
});
