import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type pg from "pg";
import { sha256Hex } from "../../lib/auth.ts";
import { createDb } from "./db.ts";

export const migrationsDir = fileURLToPath(new URL("../migrations", import.meta.url));

// Arbitrary constant shared by every billing replica so only one migrates at a time.
const migrationLockKey = 4_610_221_830_017n;

export interface MigrationResult {
  /** File names applied by this call, in order. */
  applied: string[];
  /** Applied migrations not among this code's (it was rolled back across them), each one older code may write past. */
  unknown: string[];
}

// Upgrades run old and new replicas side by side, and a rollback, an old pod restarting mid-rollout or a second
// deployment on the same database starts old code on a newer schema. That is safe for migrations that only add what old
// code satisfies (most: a column with a default, an index). One after which older code must not write (it drops what
// older code reads, or adds what it would not keep, as 0007 and 0018 do) says so in a line of its own:
//
//   -- older-writers: stop
//
// Its applied row records that, and billing without that migration then refuses to start against the database, as it
// does for any later one declaring it (README, Upgrades). The line is left out of the checksum, so a migration already
// applied can be declared so later without counting as changed.
const olderWritersStop = /^-- older-writers: stop[ \t]*(?:\r?\n|$)/m;

export interface MigrateOptions {
  /**
   * How long a run waits for a lock on a table before it rolls back, to run again after a pause (5 s by default):
   * waiting, it would hold back every call queued behind its lock request for as long as the session holding the
   * table (a pg_dump, an operator's open transaction) goes on.
   */
  lockTimeoutMs?: number;
  /** Told of each run that gave up on a lock, numbered from 1, before the pause. */
  onLockWait?: (attempt: number, error: Error) => void;
}

// SQLSTATE lock_not_available: lock_timeout passed.
const lockNotAvailable = "55P03";

/**
 * Applies the `*.sql` files of `dir` not yet recorded in `schema_migrations`, in name order, in one
 * transaction under an advisory lock. Refuses to run, writing nothing, when an applied file has changed since, or
 * when an applied migration not in `dir` is one after which older code must not write. A run that waits
 * `lockTimeoutMs` for a table's lock is rolled back, letting the calls queued behind it through, and run again.
 */
export async function migrate(
  pool: pg.Pool,
  dir: string = migrationsDir,
  { lockTimeoutMs = 5_000, onLockWait }: MigrateOptions = {},
): Promise<MigrationResult> {
  const names = (await readdir(dir)).filter((name) => name.endsWith(".sql")).sort();
  const files = await Promise.all(
    names.map(async (name) => {
      const sql = await readFile(join(dir, name), "utf8");
      const checksum = sha256Hex(sql.replace(olderWritersStop, ""));
      return { name, sql, checksum, stopsOlderWriters: olderWritersStop.test(sql) };
    }),
  );
  for (let attempt = 1; ; attempt++) {
    try {
      return await migrateOnce(pool, files, lockTimeoutMs);
    } catch (e) {
      const error = e as Error & { code?: string; cause?: { code?: string } };
      if ((error.cause?.code ?? error.code) !== lockNotAvailable) throw e;
      onLockWait?.(attempt, error);
      // Up to 10 s, spread so that replicas starting together do not queue for the lock all at once.
      await Bun.sleep(Math.min(attempt, 10) * (500 + 500 * Math.random()));
    }
  }
}

interface MigrationFile {
  name: string;
  sql: string;
  checksum: string;
  stopsOlderWriters: boolean;
}

async function migrateOnce(
  pool: pg.Pool,
  files: MigrationFile[],
  lockTimeoutMs: number,
): Promise<MigrationResult> {
  return createDb(pool).transaction(async (tx) => {
    await tx.query("SELECT pg_advisory_xact_lock($1)", [migrationLockKey.toString()]);
    // After the advisory lock, which a replica starting beside a long migration waits for as long as it takes.
    await tx.query(`SET LOCAL lock_timeout = ${Math.max(1, Math.round(lockTimeoutMs))}`);
    await tx.query(`CREATE TABLE IF NOT EXISTS schema_migrations (
      name                text PRIMARY KEY,
      checksum            text NOT NULL,
      applied_at          timestamptz NOT NULL DEFAULT now(),
      stops_older_writers boolean NOT NULL DEFAULT false
    )`);
    // Only where it is missing: ALTER TABLE would wait for any session reading the table (a pg_dump) on every start.
    const [column] = await tx.query<{ found: boolean }>(
      "SELECT count(*) > 0 AS found FROM pg_attribute WHERE attrelid = 'schema_migrations'::regclass AND attname = $1",
      ["stops_older_writers"],
    );
    if (!column?.found) {
      await tx.query("ALTER TABLE schema_migrations ADD COLUMN stops_older_writers boolean NOT NULL DEFAULT false");
    }
    const rows = await tx.query<{ name: string; checksum: string; stops_older_writers: boolean }>(
      "SELECT name, checksum, stops_older_writers FROM schema_migrations ORDER BY name",
    );
    const known = new Set(files.map((file) => file.name));
    const unknown = rows.filter((row) => !known.has(row.name));
    const newest = unknown.findLast((row) => row.stops_older_writers);
    if (newest) {
      throw new Error(
        `the database has migration ${newest.name} applied, which this billing does not have and after which older ` +
          `billing must not write; run billing of a version that has it on every replica (see README, Upgrades)`,
      );
    }
    const done = new Map(rows.map((row) => [row.name, row.checksum]));
    // Declared since it was applied: billing without it is refused from now on.
    const declared = files.filter((file) => file.stopsOlderWriters && done.has(file.name)).map((file) => file.name);
    await tx.query(
      "UPDATE schema_migrations SET stops_older_writers = true WHERE name = ANY($1) AND NOT stops_older_writers",
      [declared],
    );
    const applied: string[] = [];
    for (const file of files) {
      const checksum = done.get(file.name);
      if (checksum !== undefined) {
        if (checksum !== file.checksum) throw new Error(`migration ${file.name} changed after it was applied`);
        continue;
      }
      try {
        await tx.query(file.sql);
      } catch (e) {
        throw new Error(`migration ${file.name} failed: ${(e as Error).message}`, { cause: e });
      }
      await tx.query("INSERT INTO schema_migrations (name, checksum, stops_older_writers) VALUES ($1, $2, $3)", [
        file.name,
        file.checksum,
        file.stopsOlderWriters,
      ]);
      applied.push(file.name);
    }
    return { applied, unknown: unknown.map((row) => row.name) };
  });
}
