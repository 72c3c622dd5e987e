import { mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { Session } from "chdb";
import type { ClickHouseDriver, QueryParams } from "./driver.ts";

interface SharedSession {
  session: Session;
  users: number;
}

// libchdb binds one data directory per process, so every driver in the process shares one session per path.
const sessions = new Map<string, SharedSession>();

/**
 * The process's chdb session on `path`, shared with every other user of that path in the process;
 * release() closes it once the last user lets go.
 */
export function openChdbSession(path: string): { session: Session; release(): void } {
  const key = resolve(path);
  let shared = sessions.get(key);
  if (!shared) {
    const open = [...sessions.keys()];
    if (open.length > 0) {
      throw new Error(`chdb allows one data directory per process: ${open[0]} is open, ${key} was requested`);
    }
    // Rows hold tenants' request metadata: the directory is this user's alone, as billing's Postgres directory is.
    mkdirSync(key, { recursive: true, mode: 0o700 });
    // Quoted 64-bit integers keep sums of nano-USD exact through JSON.parse (the server default).
    const session = new Session(key, { connectionArgs: ["--output_format_json_quote_64bit_integers=1"] });
    shared = { session, users: 0 };
    sessions.set(key, shared);
  }
  shared.users++;
  const held = shared;
  let released = false;
  return {
    session: held.session,
    release() {
      if (released) return;
      released = true;
      held.users--;
      if (held.users === 0) {
        sessions.delete(key);
        held.session.close();
      }
    },
  };
}

/** The in-process ClickHouse engine with its data under `path`. */
export function createChdbDriver(path: string): ClickHouseDriver {
  const { session, release } = openChdbSession(path);

  const run = (sql: string, params: QueryParams | undefined, format: string) =>
    params && Object.keys(params).length > 0
      ? session.queryBindAsync(sql, params, { format })
      : session.queryAsync(sql, { format });

  return {
    async exec(sql, params) {
      await run(sql, params, "CSV");
    },
    async query<T>(sql: string, params?: QueryParams) {
      const text = (await run(sql, params, "JSONEachRow")).text();
      return text
        .split("\n")
        .filter((line) => line !== "")
        .map((line) => JSON.parse(line) as T);
    },
    async insert(table, columns, rows, settings) {
      if (rows.length === 0) return;
      const body = Buffer.from(`${rows.map((row) => JSON.stringify(row)).join("\n")}\n`);
      await session.insert({ table, columns, values: body, format: "JSONCompactEachRow", settings });
    },
    async ping() {
      await session.queryAsync("SELECT 1", { format: "CSV" });
    },
    async close() {
      release();
    },
  };
}
