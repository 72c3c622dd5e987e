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
}

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
 * transaction under an advisory lock. Refuses to run when an applied file has changed since. A run that waits
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
      return { name, sql, checksum: sha256Hex(sql) };
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

async function migrateOnce(
  pool: pg.Pool,
  files: { name: string; sql: string; checksum: string }[],
  lockTimeoutMs: number,
): Promise<MigrationResult> {
  return createDb(pool).transaction(async (tx) => {
    await tx.query("SELECT pg_advisory_xact_lock($1)", [migrationLockKey.toString()]);
    // After the advisory lock, which a replica starting beside a long migration waits for as long as it takes.
    await tx.query(`SET LOCAL lock_timeout = ${Math.max(1, Math.round(lockTimeoutMs))}`);
    await tx.query(`CREATE TABLE IF NOT EXISTS schema_migrations (
      name       text PRIMARY KEY,
      checksum   text NOT NULL,
      applied_at timestamptz NOT NULL DEFAULT now()
    )`);
    const rows = await tx.query<{ name: string; checksum: string }>("SELECT name, checksum FROM schema_migrations");
    const done = new Map(rows.map((row) => [row.name, row.checksum]));
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
      await tx.query("INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", [file.name, file.checksum]);
      applied.push(file.name);
    }
    return { applied };
  });
}
