import { afterAll, expect, test } from "bun:test";
import { ClickHouseError, ClickHouseLogLevel, createClient } from "@clickhouse/client";
import { testDatabase, testDataDir } from "../test-store.ts";
import { startClickHouseHttpServer } from "./clickhouse-http-server.ts";

const server = startClickHouseHttpServer({ path: testDataDir(), user: "mesh", password: "s3cret" });
const client = createClient({
  url: server.url,
  username: "mesh",
  password: "s3cret",
  compression: { request: true, response: true },
  // Failures below are on purpose.
  log: { level: ClickHouseLogLevel.OFF },
});
const db = testDatabase("http");
afterAll(async () => {
  await client.command({ query: `DROP DATABASE IF EXISTS ${db}` });
  await client.close();
  await server.stop();
});

test("ping, DDL, compressed inserts with settings, and typed query parameters", async () => {
  expect((await client.ping()).success).toBe(true);
  await client.command({ query: `CREATE DATABASE IF NOT EXISTS ${db}` });
  await client.command({
    query: `CREATE TABLE ${db}.t (id String, n Int64, tags Array(String)) ENGINE = MergeTree ORDER BY id
      SETTINGS non_replicated_deduplication_window = 100`,
  });
  const rows = [
    ["a", "9007199254740993", ["x'y", "back\\slash"]],
    ["b\ttab", "-1", []],
  ];
  for (let i = 0; i < 2; i++) {
    await client.insert({
      table: `${db}.t`,
      columns: ["id", "n", "tags"],
      values: rows,
      format: "JSONCompactEachRow",
      clickhouse_settings: { insert_deduplication_token: "same" },
    });
  }
  const result = await client.query({
    query: `SELECT id, n, tags FROM ${db}.t WHERE id IN {ids:Array(String)} AND n >= {min:Int64} AND id != {not:String} ORDER BY id`,
    query_params: { ids: ["a", "b\ttab", "it's"], min: -5, not: "a\\b'c\nd" },
    format: "JSONEachRow",
    clickhouse_settings: { output_format_json_quote_64bit_integers: 1, max_threads: 1 },
  });
  // Inserted once (same dedup token), 64-bit integers exact, strings with quotes, tabs and backslashes intact.
  expect(await result.json()).toEqual([
    { id: "a", n: "9007199254740993", tags: ["x'y", "back\\slash"] },
    { id: "b\ttab", n: "-1", tags: [] },
  ]);
});

test("errors come back as ClickHouse reports them", async () => {
  const missing = await client.query({ query: `SELECT * FROM ${db}.nope`, format: "JSONEachRow" }).catch((e) => e);
  expect(missing).toBeInstanceOf(ClickHouseError);
  expect(missing).toMatchObject({ code: "60", type: "UNKNOWN_TABLE" });

  const res = await fetch(`${server.url}/?query_id=q1`, {
    method: "POST",
    body: "SELEC 1",
    headers: { authorization: `Basic ${btoa("mesh:s3cret")}` },
  });
  expect(res.status).toBe(400);
  expect(res.headers.get("x-clickhouse-exception-code")).toBe("62");
  expect(res.headers.get("x-clickhouse-query-id")).toBe("q1");
  expect(await res.text()).toMatch(/^Code: 62\. DB::Exception: Syntax error.*\(SYNTAX_ERROR\)/);

  const readonly = await client
    .command({ query: `CREATE TABLE ${db}.ro (id String) ENGINE = Memory`, clickhouse_settings: { readonly: "2" } })
    .catch((e) => e);
  expect(readonly).toMatchObject({ code: "164", type: "READONLY" });

  const anonymous = createClient({ url: server.url, username: "mesh", password: "wrong", log: { level: ClickHouseLogLevel.OFF } });
  expect(await anonymous.query({ query: "SELECT 1" }).catch((e) => e)).toMatchObject({ code: "516" });
  await anonymous.close();
});

test("query parameters sent as multipart form data", async () => {
  const multipart = createClient({ url: server.url, username: "mesh", password: "s3cret", use_multipart_params: true });
  const result = await multipart.query({
    query: "SELECT {a:String} AS a, {b:Array(UInt8)} AS b",
    query_params: { a: "multi\npart", b: [1, 2] },
    format: "JSONEachRow",
  });
  expect(await result.json()).toEqual([{ a: "multi\npart", b: [1, 2] }]);
  await multipart.close();
});
