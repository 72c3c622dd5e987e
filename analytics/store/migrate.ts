import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { sha256Hex } from "../../lib/auth.ts";
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
  /** A ClickHouse cluster name (validated identifier): DDL runs ON CLUSTER with Replicated and Distributed tables. */
  cluster?: string;
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
      return { version: name.slice(0, -4), sql, checksum: sha256Hex(sql) };
    });
}

/**
 * Applies the migrations not yet recorded in `<database>.schema_migrations`, in order; returns their versions.
 * Statements must be idempotent (IF NOT EXISTS): a crash between a statement and its record reruns the file.
 * A recorded migration whose file changed stops the process rather than leave the schema unknown.
 */
export async function migrate(driver: ClickHouseDriver, options: MigrateOptions): Promise<string[]> {
  const db = options.database;
  for (const statement of bootstrapStatements(options)) await driver.exec(statement);
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
    for (const statement of renderMigration(migration.sql, options)) await driver.exec(statement);
    await driver.insert(`${db}.schema_migrations`, ["version", "checksum"], [[migration.version, migration.checksum]]);
    applied.push(migration.version);
  }
  return applied;
}

/** The database and the migrations table, before any migration runs. */
export function bootstrapStatements(options: Pick<MigrateOptions, "database" | "cluster">): string[] {
  const sql = `CREATE TABLE IF NOT EXISTS {{shared_table schema_migrations}}
    (version String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
    ENGINE = {{shared_engine ReplacingMergeTree}} ORDER BY version`;
  const onCluster = options.cluster ? ` ON CLUSTER ${options.cluster}` : "";
  return [`CREATE DATABASE IF NOT EXISTS ${options.database}${onCluster}`, ...renderMigration(sql, { ...options, vars: {} })];
}

/**
 * The statements of a migration for this deployment. Besides {{name}} variables, table definitions use:
 *
 * - `{{table t}}`: the table t as created. On a cluster it is `t_local ON CLUSTER c`, a shard's part of t.
 * - `{{engine E(args)}}`: a MergeTree-family engine; on a cluster `ReplicatedE(<keeper path per shard>, '{replica}', args)`.
 * - `{{distributed t key}}`: on a cluster, the Distributed table t over t_local, sharded by key; nothing otherwise.
 * - `{{local t}}`: where t's rows live (t, or t_local on a cluster), for ALTERs.
 * - `{{shared_table t}}` / `{{shared_engine E}}`: a small table replicated to every node of the cluster, unsharded.
 * - `{{alter_distributed t changes}}`: on a cluster, `ALTER TABLE t ON CLUSTER c changes` of the Distributed table t,
 *   whose columns follow t_local's; nothing otherwise.
 * - `{{dedup_window n}}`: the setting that keeps the last n insert dedup tokens.
 */
export function renderMigration(sql: string, options: Omit<MigrateOptions, "dir">): string[] {
  const { database: db, cluster } = options;
  const onCluster = cluster ? ` ON CLUSTER ${cluster}` : "";
  const replicated = (engine: string, keeperPath: string) => {
    if (!cluster) return engine;
    const match = /^(\w*MergeTree)(?:\((.*)\))?$/s.exec(engine.trim());
    if (!match) throw new Error(`migration engine ${engine} is not a MergeTree engine`);
    const args = [`'${keeperPath}'`, keeperPath.includes("{shard}") ? "'{replica}'" : "'{shard}-{replica}'"];
    if (match[2]) args.push(match[2]);
    return `Replicated${match[1]}(${args.join(", ")})`;
  };
  const rendered = sql.replace(/\{\{(\w+)(?:\s+([^}]*?))?\s*\}\}/g, (_, name: string, arg: string | undefined) => {
    switch (name) {
      case "database":
        return db;
      case "table":
        return cluster ? `${db}.${arg}_local${onCluster}` : `${db}.${arg}`;
      case "local":
        return cluster ? `${db}.${arg}_local` : `${db}.${arg}`;
      case "shared_table":
        return `${db}.${arg}${onCluster}`;
      case "engine":
        return replicated(arg ?? "", "/clickhouse/tables/{shard}/{database}/{table}");
      case "shared_engine":
        return replicated(arg ?? "", "/clickhouse/tables/shared/{database}/{table}");
      case "distributed": {
        if (!cluster) return "";
        const [table, ...key] = (arg ?? "").split(/\s+/);
        return `CREATE TABLE IF NOT EXISTS ${db}.${table}${onCluster} AS ${db}.${table}_local
ENGINE = Distributed(${cluster}, ${db}, ${table}_local, ${key.join(" ")})`;
      }
      case "alter_distributed": {
        if (!cluster) return "";
        const [table, ...changes] = (arg ?? "").split(/\s+/);
        return `ALTER TABLE ${db}.${table}${onCluster} ${changes.join(" ")}`;
      }
      case "dedup_window":
        return `${cluster ? "replicated" : "non_replicated"}_deduplication_window = ${arg}`;
      default: {
        const value = options.vars[name];
        if (value === undefined) throw new Error(`migration placeholder {{${name}}} has no value`);
        return String(value);
      }
    }
  });
  return splitStatements(rendered);
}

/** Statements end with ";" at the end of a line; comment-only chunks are dropped. */
export function splitStatements(sql: string): string[] {
  return sql
    .split(/;[ \t]*$/m)
    .map((chunk) => chunk.trim())
    .filter((chunk) => chunk.split("\n").some((line) => line.trim() !== "" && !line.trim().startsWith("--")));
}
