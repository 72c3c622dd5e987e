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

/**
 * Applies the `*.sql` files of `dir` not yet recorded in `schema_migrations`, in name order, in one
 * transaction under an advisory lock. Refuses to run when an applied file has changed since.
 */
export async function migrate(pool: pg.Pool, dir: string = migrationsDir): Promise<MigrationResult> {
  const names = (await readdir(dir)).filter((name) => name.endsWith(".sql")).sort();
  const files = await Promise.all(
    names.map(async (name) => {
      const sql = await readFile(join(dir, name), "utf8");
      return { name, sql, checksum: sha256Hex(sql) };
    }),
  );
  return createDb(pool).transaction(async (tx) => {
    await tx.query("SELECT pg_advisory_xact_lock($1)", [migrationLockKey.toString()]);
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
