import { afterAll, beforeAll, expect, test } from "bun:test";
import { Code } from "@connectrpc/connect";
import { createLogger } from "../lib/log.ts";
import { createDatabaseOutageLog, databaseUnavailable, toConnectError } from "./errors.ts";
import { createDb } from "./store/db.ts";
import { createTestDatabase, type TestDatabase } from "./store/test-db.ts";

const logLines: string[] = [];
const log = createLogger({ service: "billing-test", level: "debug", write: (line) => logLines.push(line) });

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
}, 60_000);
afterAll(() => db.drop());

test("a statement the server cannot take (a protocol violation, 08P01) is Internal, not a database outage", async () => {
  const e = await createDb(db.pool).query("SELECT $1::int AS a, $2::int AS b", [1]).catch((e: unknown) => e);
  expect((e as { code?: string }).code).toBe("08P01");
  const error = toConnectError(e, log, createDatabaseOutageLog(log));
  expect([error.code, error.rawMessage]).toEqual([Code.Internal, "internal error"]);
  // The connection is still sound, and billing goes on using it.
  expect(await createDb(db.pool).query<{ one: number }>("SELECT 1 AS one")).toEqual([{ one: 1 }]);
});

test("a connection the server closed for its idle timeouts (idle_session_timeout, ...) is Unavailable", async () => {
  // Met by a call whose connection the server closes as the pool hands it out, a retry on a new one succeeds.
  const closed = async (setting: string, inTransaction: boolean) => {
    const client = await db.pool.connect();
    const error = new Promise<unknown>((resolve) => client.once("error", resolve));
    if (inTransaction) await client.query("BEGIN");
    await client.query(`SET ${inTransaction ? "LOCAL " : ""}${setting} = '50ms'`);
    const e = await error;
    client.release(e as Error);
    return e;
  };
  for (const [setting, inTransaction, code] of [
    ["idle_session_timeout", false, "57P05"],
    ["idle_in_transaction_session_timeout", true, "25P03"],
  ] as const) {
    const e = await closed(setting, inTransaction);
    expect((e as { code?: string }).code).toBe(code);
    const error = toConnectError(e, log, createDatabaseOutageLog(log));
    expect([setting, error.code, error.rawMessage]).toEqual([setting, Code.Unavailable, databaseUnavailable]);
  }
});
