import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { ClickHouseDriver } from "./driver.ts";

export const migrationsDir = join(import.meta.dir, "..", "migrations");

export interface Migration {
  /** File name without ".sql", e.g. "0001_requests"; applied in lexical order. */
  version: string;
  sql: string;
  /** SHA-256 of the file as written, before substitution. */
  checksum: string;
}

export interface MigrateOptions {
  /** Validated identifier; replaces {{database}}. */
  database: string;
  /** Other {{name}} placeholders and their values (config, never user input). */
  vars: Record<string, string | number>;
  dir?: string;
}

export function loadMigrations(dir = migrationsDir): Migration[] {
  return readdirSync(dir)
    .filter((name) => /^\d{4}_[a-z0-9_]+\.sql$/.test(name))
    .sort()
    .map((name) => {
      const sql = readFileSync(join(dir, name), "utf8");
      return { version: name.slice(0, -4), sql, checksum: createHash("sha256").update(sql).digest("hex") };
    });
}

/**
 * Applies the migrations not yet recorded in `<database>.schema_migrations`, in order; returns their versions.
 * Statements must be idempotent (IF NOT EXISTS): a crash between a statement and its record reruns the file.
 * A recorded migration whose file changed stops the process rather than leave the schema unknown.
 */
export async function migrate(driver: ClickHouseDriver, options: MigrateOptions): Promise<string[]> {
  const db = options.database;
  await driver.exec(`CREATE DATABASE IF NOT EXISTS ${db}`);
  await driver.exec(
    `CREATE TABLE IF NOT EXISTS ${db}.schema_migrations
     (version String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
     ENGINE = ReplacingMergeTree ORDER BY version`,
  );
  const recorded = new Map(
    (await driver.query<{ version: string; checksum: string }>(
      `SELECT version, checksum FROM ${db}.schema_migrations FINAL`,
    )).map((row) => [row.version, row.checksum]),
  );
  const applied: string[] = [];
  for (const migration of loadMigrations(options.dir)) {
    const checksum = recorded.get(migration.version);
    if (checksum !== undefined) {
      if (checksum !== migration.checksum) {
        throw new Error(
          `migration ${migration.version} changed after it was applied to ${db}; add a new migration instead`,
        );
      }
      continue;
    }
    const sql = substitute(migration.sql, { database: db, ...options.vars });
    for (const statement of splitStatements(sql)) await driver.exec(statement);
    await driver.insert(`${db}.schema_migrations`, ["version", "checksum"], [[migration.version, migration.checksum]]);
    applied.push(migration.version);
  }
  return applied;
}

function substitute(sql: string, vars: Record<string, string | number>): string {
  return sql.replace(/\{\{(\w+)\}\}/g, (_, name: string) => {
    const value = vars[name];
    if (value === undefined) throw new Error(`migration placeholder {{${name}}} has no value`);
    return String(value);
  });
}

/** Statements end with ";" at the end of a line; comment-only chunks are dropped. */
export function splitStatements(sql: string): string[] {
  return sql
    .split(/;[ \t]*$/m)
    .map((chunk) => chunk.trim())
    .filter((chunk) => chunk.split("\n").some((line) => line.trim() !== "" && !line.trim().startsWith("--")));
}
