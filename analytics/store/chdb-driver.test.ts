import { afterAll, beforeAll, expect, test } from "bun:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createLogger } from "../../lib/log.ts";
import { query } from "../service.ts";
import { createChdbDriver } from "./chdb-driver.ts";
import { type ClickHouseDriver, ReportQueueFullError } from "./driver.ts";
import { createAnalyticsStore } from "./store.ts";
import { testDatabase, testDataDir } from "./test-store.ts";

// Report queries on the in-process engine, on its real connections: one org's cannot hold the others' or ingest.

const log = createLogger({ service: "analytics-test", level: "error", write: () => {} });
const database = testDatabase("chdb_driver");
let driver: ClickHouseDriver;

beforeAll(async () => {
  driver = createChdbDriver(testDataDir(), { maxQueuedReports: 4 });
  await driver.exec(`CREATE DATABASE ${database}`);
  await driver.exec(`CREATE TABLE ${database}.t (x UInt64) ENGINE = MergeTree ORDER BY x`);
});
afterAll(async () => {
  await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
  await driver.close();
});

/** A parameterized report of `orgId` (as every store report is) that takes about `ms` in the engine. */
const report = (orgId: string, ms: number, signal?: AbortSignal) =>
  driver.query<{ org: string }>(
    `SELECT {org:String} AS org, sleepEachRow({s:Float64}) FROM numbers(3) SETTINGS max_block_size = 1`,
    { org: orgId, s: ms / 3000 },
    { orgId, signal },
  );

test("one org's long report holds neither an insert nor a ping, and another org's report waits one query at most", async () => {
  const t0 = performance.now();
  const done: string[] = [];
  const finish = (name: string) => () => void done.push(name);
  const long = report("org_a", 1500).then(finish("a1"));
  await Bun.sleep(50);
  const more = [2, 3, 4].map((i) => report("org_a", 150).then(finish(`a${i}`)));
  const other = report("org_b", 0).then(finish("b1"));
  const inserted = driver.insert(`${database}.t`, ["x"], [[1]]).then(() => performance.now() - t0);
  const pinged = driver.ping().then(() => performance.now() - t0);
  await Promise.all([long, ...more, other]);
  // Round robin: org_b's one query goes after org_a's running and next, not after all of org_a's.
  // The insert and the ping end well before org_a's first query (1.5 s) does.
  const soon = async (ms: Promise<number>) => ((await ms) < 1000 ? "soon" : `after ${Math.round(await ms)} ms`);
  expect({ order: done, inserted: await soon(inserted), pinged: await soon(pinged) }).toEqual({
    order: ["a1", "a2", "b1", "a3", "a4"],
    inserted: "soon",
    pinged: "soon",
  });
});

test("report queries past the queue's bound are refused as ResourceExhausted; a caller that leaves frees its place", async () => {
  const running = report("org_a", 600);
  await Bun.sleep(50);
  const leaving = new AbortController();
  const left = report("org_a", 0, leaving.signal).catch((e: unknown) => e);
  const queued = [report("org_b", 0), report("org_c", 0), report("org_d", 0)];
  const refused = await query(log, "test", () => report("org_e", 0)).catch((e: unknown) => e);
  expect(refused).toBeInstanceOf(ConnectError);
  expect((refused as ConnectError).code).toBe(Code.ResourceExhausted);
  expect(await driver.query("SELECT 1", undefined, { orgId: "org_e" }).catch((e: unknown) => e)).toBeInstanceOf(
    ReportQueueFullError,
  );
  leaving.abort();
  expect(await left).toBeInstanceOf(Error);
  const taken = report("org_e", 0);
  expect((await Promise.all([running, ...queued, taken])).map(([row]) => row?.org)).toEqual([
    "org_a",
    "org_b",
    "org_c",
    "org_d",
    "org_e",
  ]);
});

test("a store on the in-process engine limits report queries to the driver's shorter time", async () => {
  const statements: string[] = [];
  const short = createChdbDriver(testDataDir(), { reportTimeoutSeconds: 3 });
  const spy: ClickHouseDriver = {
    ...short,
    query: (sql, params, of) => (statements.push(sql), short.query(sql, params, of)),
  };
  const store = createAnalyticsStore(spy, { database, ttlDays: 400 });
  await store.listRequests({ orgId: "org_a", limit: 1, requestId: "none" }).catch(() => {});
  await short.close();
  expect(statements.some((sql) => /max_execution_time = 3\b/.test(sql))).toBe(true);
});
