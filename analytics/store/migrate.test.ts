import { describe, expect, test } from "bun:test";
import { createChdbDriver } from "./chdb-driver.ts";
import type { ClickHouseDriver } from "./driver.ts";
import { bootstrapStatements, loadMigrations, renderMigration } from "./migrate.ts";
import { createAnalyticsStore } from "./store.ts";
import { sampleMetrics, testDataDir } from "./test-store.ts";

// Statements as run, without the comment lines that open some of them.
const render = (cluster?: string) =>
  [
    ...bootstrapStatements({ database: "mesh", cluster }),
    ...loadMigrations().flatMap((m) => renderMigration(m.sql, { database: "mesh", cluster, vars: { ttl_days: 30 } })),
  ].map((s) => s.replace(/^(--.*\n)+/, ""));

/** Records what the store sends; answers reads as a fresh cluster with last year's retention would. */
function recordingDriver(): ClickHouseDriver & { sent: { sql: string; settings?: Record<string, string> }[] } {
  const sent: { sql: string; settings?: Record<string, string> }[] = [];
  return {
    sent,
    async exec(sql) {
      sent.push({ sql });
    },
    async query<T>(sql: string) {
      sent.push({ sql });
      return (sql.includes("system.tables") ? [{ engine_full: "TTL ... + toIntervalDay(400)" }] : []) as T[];
    },
    async insert(table, _columns, _rows, settings) {
      sent.push({ sql: `INSERT INTO ${table}`, settings });
    },
    async ping() {},
    async close() {},
  };
}

describe("DDL for a ClickHouse cluster (CLICKHOUSE_CLUSTER)", () => {
  const statements = render("mesh_cluster");
  const creates = statements.filter((s) => s.startsWith("CREATE"));
  const createOf = (name: string) => creates.find((s) => s.startsWith(`CREATE TABLE IF NOT EXISTS mesh.${name} `));

  test("every statement runs ON CLUSTER, and every MergeTree table is replicated", () => {
    for (const s of statements) expect(s).toContain(" ON CLUSTER mesh_cluster");
    const engines = creates.flatMap((s) => [...s.matchAll(/ENGINE = (\w+)/g)].map((m) => m[1]));
    expect(engines.filter((e) => e?.includes("MergeTree")).every((e) => e?.startsWith("Replicated"))).toBe(true);
  });

  test("sharded tables: a replicated local table per shard and a Distributed table over it", () => {
    for (const [table, key] of [
      ["requests", "sipHash64(request_id)"],
      ["requests_1m", "sipHash64(org_id)"],
      ["requests_1h", "sipHash64(org_id)"],
    ] as const) {
      const local = createOf(`${table}_local`);
      expect(local).toContain("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}'");
      expect(createOf(table)).toBe(
        `CREATE TABLE IF NOT EXISTS mesh.${table} ON CLUSTER mesh_cluster AS mesh.${table}_local\n` +
          `ENGINE = Distributed(mesh_cluster, mesh, ${table}_local, ${key})`,
      );
    }
    expect(createOf("requests_1m_local")).toContain("'{replica}', computed_at)");
    expect(createOf("requests_local")).toContain("replicated_deduplication_window = 10000");
  });

  test("a column type changed in a sharded table is changed in its Distributed table too", () => {
    const alters = statements.filter((s) => s.startsWith("ALTER TABLE")).map((s) => /^ALTER TABLE (\S+)/.exec(s)?.[1]);
    expect(alters).toEqual(["mesh.requests_1m_local", "mesh.requests_1m", "mesh.requests_1h_local", "mesh.requests_1h"]);
  });

  test("small bookkeeping tables are one replicated table across the whole cluster", () => {
    for (const [table, engine] of <const>[
      ["schema_migrations", "ReplicatedReplacingMergeTree('/clickhouse/tables/shared/{database}/{table}', '{shard}-{replica}')"],
      ["rollup_dirty", "ReplicatedMergeTree('/clickhouse/tables/shared/{database}/{table}', '{shard}-{replica}')"],
      ["rollup_state", "ReplicatedReplacingMergeTree('/clickhouse/tables/shared/{database}/{table}', '{shard}-{replica}', updated_at)"],
    ]) {
      expect(createOf(table)).toContain(`ENGINE = ${engine}`);
    }
    expect(statements[0]).toBe("CREATE DATABASE IF NOT EXISTS mesh ON CLUSTER mesh_cluster");
  });

  test("ClickHouse parses every statement", async () => {
    const driver = createChdbDriver(testDataDir());
    try {
      for (const sql of statements) {
        const [parsed] = await driver.query<{ q: string }>("SELECT formatQuery({sql:String}) AS q", { sql });
        expect(parsed?.q).toContain("ON CLUSTER mesh_cluster");
      }
    } finally {
      await driver.close();
    }
  });

  test("the store migrates, sets retention ON CLUSTER and inserts through Distributed tables synchronously", async () => {
    const driver = recordingDriver();
    const store = createAnalyticsStore(driver, { database: "mesh", ttlDays: 30, cluster: "mesh_cluster" });
    await store.migrate();
    const alters = driver.sent.filter((s) => s.sql.includes("MODIFY TTL"));
    expect(alters.map((a) => a.sql)).toEqual([
      "ALTER TABLE mesh.requests_local ON CLUSTER mesh_cluster MODIFY TTL toDateTime(start_time) + INTERVAL 30 DAY",
      "ALTER TABLE mesh.requests_1m_local ON CLUSTER mesh_cluster MODIFY TTL minute + INTERVAL 30 DAY",
      "ALTER TABLE mesh.requests_1h_local ON CLUSTER mesh_cluster MODIFY TTL hour + INTERVAL 30 DAY",
    ]);
    await store.insertRequests([sampleMetrics(new Date())], "token-1");
    expect(driver.sent.find((s) => s.sql === "INSERT INTO mesh.requests")).toEqual({
      sql: "INSERT INTO mesh.requests",
      settings: { distributed_foreground_insert: "1", insert_deduplication_token: "token-1", max_partitions_per_insert_block: "0" },
    });
  });

  test("a roll-up writes through the Distributed rollup tables synchronously, so hours sum minutes every shard has", async () => {
    const recording = recordingDriver();
    const rolledUntil = new Date(Date.now() - 2 * 3_600_000).toISOString().slice(0, 19).replace("T", " ");
    const driver: ClickHouseDriver = {
      ...recording,
      async query<T>(sql: string, params?: Parameters<ClickHouseDriver["query"]>[1]) {
        if (sql.includes("SELECT done_until FROM")) return [{ done_until: rolledUntil }] as T[];
        return recording.query<T>(sql, params);
      },
    };
    const store = createAnalyticsStore(driver, { database: "mesh", ttlDays: 30, cluster: "mesh_cluster" });
    await store.rollUp();
    const rollups = recording.sent.map((s) => s.sql).filter((sql) => /^INSERT INTO mesh\.requests_1[mh] /.test(sql));
    expect(rollups.length).toBeGreaterThanOrEqual(2);
    for (const sql of rollups) expect(sql).toMatch(/^INSERT INTO \S+ \([^)]*\) SETTINGS distributed_foreground_insert = 1\s+SELECT /);
  });
});

test("without a cluster the same migrations create plain tables", () => {
  const statements = render();
  expect(statements.join("\n")).not.toMatch(/ON CLUSTER|Replicated|Distributed|_local/);
  expect(statements.filter((s) => s.startsWith("CREATE TABLE")).map((s) => /mesh\.(\w+)/.exec(s)?.[1])).toEqual([
    "schema_migrations",
    "requests",
    "requests_1m",
    "requests_1h",
    "rollup_dirty",
    "rollup_state",
  ]);
});
