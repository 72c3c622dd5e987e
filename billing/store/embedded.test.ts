import { expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import { createLogger } from "../../lib/log.ts";
import { procStatFields } from "../../lib/processes.ts";
import { isAlive as alive } from "../../lib/processes.ts";
import { type EmbeddedPostgresServer, startEmbeddedPostgres } from "./embedded.ts";

// A first life that creates the cluster, writes a row and prints the postmaster pid, then waits to be killed.
const firstLife = `
  import pg from "pg";
  import { startEmbeddedPostgres } from ${JSON.stringify(join(import.meta.dir, "embedded.ts"))};
  import { createLogger } from ${JSON.stringify(join(import.meta.dir, "../../lib/log.ts"))};
  const log = createLogger({ service: "t", level: "error" });
  const server = await startEmbeddedPostgres({ dataDir: process.argv.at(-1), log });
  const client = new pg.Client({ connectionString: server.connectionString });
  await client.connect();
  await client.query("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')");
  await client.end();
  console.log("ready " + server.pid);
  setInterval(() => {}, 1000);
`;

const startFirstLife = (dataDir: string) =>
  Bun.spawn([process.execPath, "--eval", firstLife, dataDir], { stdout: "pipe", stderr: "inherit" });

/** The postmaster pid a first life prints once its cluster is up. */
async function postmasterOf(child: ReturnType<typeof startFirstLife>): Promise<number> {
  let output = "";
  for await (const chunk of child.stdout) {
    output += new TextDecoder().decode(chunk);
    if (output.includes("\n")) break;
  }
  return Number(/ready (\d+)/.exec(output)?.[1]);
}

test("keeps data across restarts and first stops a server left behind by a killed process", async () => {
  const dir = await mkdtemp(join(tmpdir(), "billing-embedded-"));
  const dataDir = join(dir, "postgres");
  let stalePid = 0;
  let server: EmbeddedPostgresServer | undefined;
  try {
    const child = startFirstLife(dataDir);
    stalePid = await postmasterOf(child);
    expect(stalePid).toBeGreaterThan(0);
    child.kill("SIGKILL");
    await child.exited;
    expect(alive(stalePid)).toBe(true);
    expect((await stat(`${dataDir}.password`)).mode & 0o777).toBe(0o600);

    server = await startEmbeddedPostgres({ dataDir, log: createLogger({ service: "t", level: "error" }) });
    expect(alive(stalePid)).toBe(false);
    expect(server.pid).not.toBe(stalePid);
    expect(server.connectionString).toMatch(/^postgres:\/\/mesh:[^@]+@127\.0\.0\.1:\d+\/billing$/);
    const client = new pg.Client({ connectionString: server.connectionString });
    await client.connect();
    expect((await client.query("SELECT body FROM notes")).rows).toEqual([{ body: "kept" }]);
    await client.end();

    await server.stop();
    expect(alive(server.pid)).toBe(false);
  } finally {
    await server?.stop();
    if (stalePid && alive(stalePid)) process.kill(stalePid, "SIGQUIT");
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("refuses a directory whose postgres a billing still running serves, which runs on", async () => {
  const dir = await mkdtemp(join(tmpdir(), "billing-embedded-"));
  const dataDir = join(dir, "postgres");
  const child = startFirstLife(dataDir);
  try {
    const pid = await postmasterOf(child);
    expect(pid).toBeGreaterThan(0);
    // Stopped it before, as if left by a killed process, and the billing serving on it exited.
    const second = startEmbeddedPostgres({ dataDir, log: createLogger({ service: "t", level: "error" }) });
    await expect(second).rejects.toThrow(
      `${dataDir} is in use by the postgres (pid ${pid}) of a billing still running (pid ${child.pid}): ` +
        "stop that one first, or give this one another MESH_DATA_DIR",
    );
    expect(alive(pid)).toBe(true);
    expect(child.exitCode).toBe(null);
  } finally {
    child.kill("SIGKILL");
    await child.exited;
    const stale = Number(readFileSync(join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
    if (stale && alive(stale)) process.kill(stale, "SIGQUIT");
    for (let i = 0; i < 200 && stale && alive(stale); i++) await Bun.sleep(25);
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("starts on a directory whose postmaster was killed with its parent and is not reaped yet", async () => {
  const dir = await mkdtemp(join(tmpdir(), "billing-embedded-"));
  const dataDir = join(dir, "postgres");
  let server: EmbeddedPostgresServer | undefined;
  const child = startFirstLife(dataDir);
  try {
    const stalePid = await postmasterOf(child);
    expect(stalePid).toBeGreaterThan(0);
    // The parent is stopped, so the killed postmaster stays a zombie, as under an init process that does not reap.
    child.kill("SIGSTOP");
    process.kill(stalePid, "SIGKILL");
    const state = () => readFileSync(`/proc/${stalePid}/stat`, "utf8").split(") ")[1]?.[0];
    for (let i = 0; i < 200 && state() !== "Z"; i++) await Bun.sleep(25);
    expect(state()).toBe("Z");

    server = await startEmbeddedPostgres({ dataDir, log: createLogger({ service: "t", level: "error" }) });
    const client = new pg.Client({ connectionString: server.connectionString });
    await client.connect();
    expect((await client.query("SELECT body FROM notes")).rows).toEqual([{ body: "kept" }]);
    await client.end();
  } finally {
    await server?.stop();
    child.kill("SIGKILL");
    await child.exited;
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("starts on a directory whose first start was killed while initdb ran, initialising it again", async () => {
  const dir = await mkdtemp(join(tmpdir(), "billing-embedded-"));
  const dataDir = join(dir, "postgres");
  let server: EmbeddedPostgresServer | undefined;
  const child = Bun.spawn([process.execPath, "--eval", firstLife, dataDir], { stdout: "ignore", stderr: "ignore" });
  // The process and everything it started (initdb and the postgres it runs), as a crash or kill -9 ends them.
  const tree = (pid: number): number[] => [
    pid,
    ...readdirSync("/proc")
      .map(Number)
      .filter((p) => Number.isInteger(p) && procStatFields(p)?.[1] === String(pid))
      .flatMap(tree),
  ];
  try {
    // initdb writes PG_VERSION first and the control file much later.
    for (let i = 0; i < 2_000 && !existsSync(join(dataDir, "PG_VERSION")); i++) await Bun.sleep(5);
    // initdb's short-lived children may be gone between listing and signalling them.
    const signal = (pid: number, name: NodeJS.Signals) => {
      try {
        process.kill(pid, name);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ESRCH") throw error;
      }
    };
    for (const pid of tree(child.pid)) signal(pid, "SIGSTOP");
    for (const pid of tree(child.pid).reverse()) signal(pid, "SIGKILL");
    await child.exited;
    expect(existsSync(join(dataDir, "PG_VERSION"))).toBe(true);
    // However far initdb got on a loaded machine, it had not finished: the start that ran it had not marked it done.
    expect(existsSync(`${dataDir}.initialising`)).toBe(true);

    server = await startEmbeddedPostgres({ dataDir, log: createLogger({ service: "t", level: "error" }) });
    const client = new pg.Client({ connectionString: server.connectionString });
    await client.connect();
    expect((await client.query("SELECT 1 AS one")).rows).toEqual([{ one: 1 }]);
    await client.end();
  } finally {
    await server?.stop();
    child.kill("SIGKILL");
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);
