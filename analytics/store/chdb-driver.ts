import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { Session } from "chdb";
import type { Logger } from "../../lib/log.ts";
import { ownerOnlyDir } from "../../lib/owner-only-dir.ts";
import { isAlive } from "../../lib/processes.ts";
import {
  type ClickHouseDriver,
  defaultChdbReportTimeoutSeconds,
  type QueryParams,
  type ReportOf,
  ReportQueueFullError,
} from "./driver.ts";

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
export function openChdbSession(path: string, log?: Logger): { session: Session; release(): void } {
  const key = resolve(path);
  let shared = sessions.get(key);
  if (!shared) {
    const open = [...sessions.keys()];
    if (open.length > 0) {
      throw new Error(`chdb allows one data directory per process: ${open[0]} is open, ${key} was requested`);
    }
    // Rows hold tenants' request metadata: the directory is this user's alone, as billing's Postgres directory is.
    ownerOnlyDir(key, log);
    shared = { session: connectOrExplain(key), users: 0 };
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

/**
 * The process's first connection to `key`. The engine refuses a directory another process's engine holds saying only
 * "Failed to create connection": which process holds it, from the pid its `status` file names, is what to stop.
 */
function connectOrExplain(key: string): Session {
  try {
    return connect(key);
  } catch (e) {
    const pid = Number(/^PID: (\d+)$/m.exec(readText(join(key, "status")))?.[1]);
    if (pid > 0 && pid !== process.pid && isAlive(pid)) {
      throw new Error(
        `${key} is in use by the analytics (pid ${pid}) still running on it: stop that one first, or give this one another MESH_DATA_DIR`,
      );
    }
    throw e;
  }
}

function readText(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/** A new connection to the engine on the data directory `key` (an absolute path). */
function connect(key: string): Session {
  // Quoted 64-bit integers keep sums of nano-USD exact through JSON.parse (the server default).
  return new Session(key, { connectionArgs: ["--output_format_json_quote_64bit_integers=1"] });
}

export interface ChdbDriverOptions {
  /**
   * How long a report query may run in the engine (max_execution_time); 10 s by default. Shorter than a server's 30 s
   * because report queries here run one at a time: each other org's report may wait this long per query ahead of it.
   */
  reportTimeoutSeconds?: number;
  /** Report queries waiting for their turn at most (64 by default); past it ReportQueueFullError. */
  maxQueuedReports?: number;
  /** Told when the data directory cannot be made this user's alone. */
  log?: Logger;
}

/**
 * The in-process ClickHouse engine with its data under `path`.
 *
 * A chdb connection runs one query at a time, and the binding runs parameterized queries (every report, most of the
 * roll-up) one at a time in the whole process; connections on one path otherwise run side by side. So report queries
 * take turns on a connection of their own, one org's query after another's (round robin), while ingest's inserts run
 * beside them on the shared connection and the roll-up's statements between them: one org's reports cannot hold the
 * engine for more than one query's time limit at once.
 */
export function createChdbDriver(path: string, options: ChdbDriverOptions = {}): ClickHouseDriver {
  const { session, release } = openChdbSession(path, options.log);
  const reportTimeoutSeconds = options.reportTimeoutSeconds ?? defaultChdbReportTimeoutSeconds;
  const reportQueue = createReportQueue(options.maxQueuedReports ?? 64);
  let reportSession: Session | undefined;

  const run = (on: Session, sql: string, params: QueryParams | undefined, format: string) =>
    params && Object.keys(params).length > 0 ? on.queryBindAsync(sql, params, { format }) : on.queryAsync(sql, { format });

  const rowsOf = <T>(text: string) =>
    text
      .split("\n")
      .filter((line) => line !== "")
      .map((line) => JSON.parse(line) as T);

  return {
    reportTimeoutSeconds,
    // Ingest acks a batch once inserted, and the gateway then drops it from its spool: a part still in the page cache
    // when the host lost power was lost for good (detached as broken at the next start), while billing kept its usage.
    tableSettings: "fsync_after_insert = 1, fsync_part_directory = 1",
    async exec(sql, params) {
      await run(session, sql, params, "CSV");
    },
    async query<T>(sql: string, params?: QueryParams, report?: ReportOf) {
      if (!report) return rowsOf<T>((await run(session, sql, params, "JSONEachRow")).text());
      return reportQueue.run(report, async () => {
        reportSession ??= connect(resolve(path));
        return rowsOf<T>((await run(reportSession, sql, params, "JSONEachRow")).text());
      });
    },
    async insert(table, columns, rows, settings) {
      if (rows.length === 0) return;
      // Appended line by line: joining a list of the lines cost 0.14 µs more per row.
      let text = "";
      for (const row of rows) text += `${JSON.stringify(row)}\n`;
      const body = Buffer.from(text);
      await session.insert({ table, columns, values: body, format: "JSONCompactEachRow", settings });
    },
    async ping() {
      await session.queryAsync("SELECT 1", { format: "CSV" });
    },
    async close() {
      reportSession?.close();
      release();
    },
  };
}

/**
 * Runs report queries one at a time, taking them from the orgs that wait in turn: an org with many queued waits
 * behind no more than one query of each other org.
 */
function createReportQueue(maxQueued: number) {
  // The starts of waiting queries by org, orgs in the order they are next served.
  const waiting = new Map<string, (() => void)[]>();
  let queued = 0;
  let busy = false;

  const next = () => {
    const first = waiting.entries().next();
    if (first.done) {
      busy = false;
      return;
    }
    const [orgId, starts] = first.value;
    const start = starts.shift() as () => void;
    // Served once: to the back of the line, if it has more.
    waiting.delete(orgId);
    if (starts.length > 0) waiting.set(orgId, starts);
    queued--;
    start();
  };

  const turn = ({ orgId, signal }: ReportOf) =>
    new Promise<void>((resolve, reject) => {
      signal?.throwIfAborted();
      if (!busy) {
        busy = true;
        resolve();
        return;
      }
      if (queued >= maxQueued) {
        throw new ReportQueueFullError(`${queued} report queries are waiting for the in-process engine; retry shortly`);
      }
      const start = () => {
        signal?.removeEventListener("abort", leave);
        resolve();
      };
      // A caller that leaves while waiting takes its query out of the line.
      const leave = () => {
        const starts = waiting.get(orgId) ?? [];
        starts.splice(starts.indexOf(start), 1);
        if (starts.length === 0) waiting.delete(orgId);
        queued--;
        reject(signal?.reason);
      };
      signal?.addEventListener("abort", leave, { once: true });
      const starts = waiting.get(orgId);
      if (starts) starts.push(start);
      else waiting.set(orgId, [start]);
      queued++;
    });

  return {
    async run<T>(report: ReportOf, query: () => Promise<T>): Promise<T> {
      await turn(report);
      try {
        return await query();
      } finally {
        next();
      }
    },
  };
}
