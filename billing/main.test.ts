import { expect, test } from "bun:test";
import { cp, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { readinessIntervalMs } from "../lib/health.ts";
import { freePort, spawnService } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { expectJsonStartFailure, spawnAsContainerInit } from "../lib/testing.ts";
import { isAlive } from "../lib/processes.ts";
import { postmasterPid } from "./store/embedded.ts";
import { migrate, migrationsDir } from "./store/migrate.ts";
import { createTestDatabase } from "./store/test-db.ts";

const root = resolve(import.meta.dir, "..");

/** Billing on its embedded Postgres under `dataDir`, serving on `port`. */
const spawnBilling = (dataDir: string, port: number, level: string, onLine: (line: string) => void) =>
  spawnService({
    name: "billing",
    cmd: [process.execPath, join(root, "billing", "main.ts")],
    cwd: root,
    env: {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: "main-test-admin-token-0123456789",
      BILLING_PORT: String(port),
      DATABASE_URL: undefined,
      LOG_LEVEL: level,
    },
    readyUrl: `http://127.0.0.1:${port}/readyz`,
    readyTimeoutMs: 60_000,
    onLine,
  });

test("exits non-zero when its embedded postgres dies, so a supervisor restarts it", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const port = await freePort();
  const lines: string[] = [];
  const billing = spawnBilling(dataDir, port, "warn", (line) => lines.push(line));
  let pid: number | undefined;
  try {
    await billing.ready;
    pid = await postmasterPid(join(dataDir, "postgres"));
    expect(pid).toBeGreaterThan(0);
    process.kill(pid as number, "SIGKILL");
    const code = await Promise.race([billing.proc.exited, Bun.sleep(5_000).then(() => "still running")]);
    expect(code).toBe(1);
    expect(lines.some((line) => line.includes("embedded postgres exited"))).toBe(true);
  } finally {
    await billing.stop("SIGKILL");
    if (pid && isAlive(pid)) process.kill(pid, "SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test("SIGTERM stops it and its embedded postgres without a warning about the connections it closed", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const port = await freePort();
  const lines: string[] = [];
  const billing = spawnBilling(dataDir, port, "warn", (line) => lines.push(line));
  try {
    await billing.ready;
    // Calls that leave the pool's connections idle, as a serving billing's are.
    const calls = Array.from({ length: 16 }, () =>
      fetch(`http://127.0.0.1:${port}/billing.v1.BillingService/ListOrganizations`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer main-test-admin-token-0123456789" },
        body: "{}",
      }).then((r) => r.status),
    );
    expect(await Promise.all(calls)).toEqual(Array(16).fill(200));
    // A gateway's key change stream: a connection of the pool LISTENs for it.
    const client = createServiceClient(BillingService, {
      baseUrl: `http://127.0.0.1:${port}`,
      bearerToken: "main-test-admin-token-0123456789",
    });
    const watch = client.watchKeyChanges({})[Symbol.asyncIterator]();
    await watch.next();
    billing.proc.kill("SIGTERM");
    await watch.next().catch(() => {});
    expect(await billing.proc.exited).toBe(0);
    expect(lines.filter((line) => /"level":"(warn|error)"/.test(line) && !line.includes("ADMIN_TOKEN"))).toEqual([]);
  } finally {
    await billing.stop("SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test("SIGHUP (its terminal closed, npm run billing) stops it and its embedded postgres, as SIGTERM does", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const port = await freePort();
  const billing = spawnBilling(dataDir, port, "warn", () => {});
  let pid: number | undefined;
  try {
    await billing.ready;
    pid = await postmasterPid(join(dataDir, "postgres"));
    billing.proc.kill("SIGHUP");
    expect(await billing.proc.exited).toBe(0);
    expect(isAlive(pid as number)).toBe(false);
  } finally {
    await billing.stop("SIGKILL");
    if (pid && isAlive(pid)) process.kill(pid, "SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test("/readyz and the gRPC health check answer 503 postgres timeout within about a second while postgres hangs", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const port = await freePort();
  const billing = spawnBilling(dataDir, port, "error", () => {});
  let stopped: number[] = [];
  const resume = () => {
    for (const pid of stopped) if (isAlive(pid)) process.kill(pid, "SIGCONT");
    stopped = [];
  };
  const probe = async () => {
    const started = performance.now();
    const res = await fetch(`http://127.0.0.1:${port}/readyz`, { signal: AbortSignal.timeout(10_000) });
    return { status: res.status, body: await res.json(), ms: performance.now() - started };
  };
  const healthCheck = async () => {
    const res = await fetch(`http://127.0.0.1:${port}/grpc.health.v1.Health/Check`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
      signal: AbortSignal.timeout(10_000),
    });
    return res.json();
  };
  try {
    await billing.ready;
    const pid = (await postmasterPid(join(dataDir, "postgres"))) as number;
    // The postmaster first, so that it starts no child after they are listed; a short-lived one (an autovacuum
    // worker) may be gone before it is signalled.
    process.kill(pid, "SIGSTOP");
    stopped = [pid];
    for (const child of (await Bun.$`pgrep -P ${pid}`.nothrow().text()).split("\n").filter(Boolean).map(Number)) {
      try {
        process.kill(child, "SIGSTOP");
        stopped.push(child);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ESRCH") throw error;
      }
    }
    // The ready answer of the start is reused for up to one interval; after it, probes check postgres again.
    await Bun.sleep(readinessIntervalMs);
    // More probes than the pool has connections: none may hold one while postgres hangs.
    const probes = await Promise.all(Array.from({ length: 25 }, probe));
    for (const { status, body, ms } of probes) {
      expect(status).toBe(503);
      expect(body).toEqual({ status: "not_ready", checks: { postgres: "timeout" } });
      expect(ms).toBeLessThan(3_000);
    }
    expect(await healthCheck()).toEqual({ status: "NOT_SERVING" });
    resume();
    const deadline = Date.now() + 15_000;
    let last = await probe();
    while (last.status !== 200 && Date.now() < deadline) {
      await Bun.sleep(200);
      last = await probe();
    }
    expect(last).toMatchObject({ status: 200, body: { status: "ready", checks: { postgres: "ok" } } });
    expect(await healthCheck()).toEqual({ status: "SERVING" });
  } finally {
    resume();
    await billing.stop("SIGKILL");
    const pid = await postmasterPid(join(dataDir, "postgres"));
    if (pid && isAlive(pid)) process.kill(pid, "SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test.each([
  ["its DATABASE_URL unreachable", "unreachable"],
  ["its embedded postgres unable to start", "unstartable"],
])("with %s it exits 1, every line it writes one JSON object and the password in none", async (_, fault) => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const closed = await freePort();
  try {
    // A file where the embedded server's directory would go.
    if (fault === "unstartable") await Bun.write(join(dataDir, "data"), "not a directory");
    await expectJsonStartFailure(
      [process.execPath, join(root, "billing", "main.ts")],
      {
        MESH_DATA_DIR: fault === "unstartable" ? join(dataDir, "data") : dataDir,
        ADMIN_TOKEN: "main-test-admin-token-0123456789",
        BILLING_PORT: String(await freePort()),
        DATABASE_URL: fault === "unreachable" ? `postgres://mesh:db-pass-0123456789@127.0.0.1:${closed}/mesh` : undefined,
        LOG_LEVEL: "debug",
      },
      "db-pass-0123456789",
      root,
    );
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}, 60_000);

test("with BILLING_PORT taken it exits 1, one JSON error line naming it, its embedded postgres stopped", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const taken = Bun.listen({ hostname: "0.0.0.0", port: 0, socket: { data() {} } });
  let pid: number | undefined;
  try {
    const errors = await expectJsonStartFailure(
      [process.execPath, join(root, "billing", "main.ts")],
      {
        MESH_DATA_DIR: dataDir,
        ADMIN_TOKEN: "main-test-admin-token-0123456789",
        BILLING_PORT: String(taken.port),
        DATABASE_URL: undefined,
        LOG_LEVEL: "warn",
      },
      "main-test-admin-token-0123456789",
      root,
    );
    expect(errors).toEqual([
      expect.objectContaining({ msg: "cannot listen on BILLING_PORT", variable: "BILLING_PORT", port: taken.port }),
    ]);
    pid = await postmasterPid(join(dataDir, "postgres"));
    expect(pid !== undefined && isAlive(pid)).toBe(false);
  } finally {
    taken.stop(true);
    if (pid && isAlive(pid)) process.kill(pid, "SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test("on a database with a migration it lacks that older billing must not write past, it exits 1 having written nothing", async () => {
  const db = await createTestDatabase({ migrate: false });
  const newer = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    // What billing of a later version would have applied.
    await cp(migrationsDir, newer, { recursive: true });
    await writeFile(join(newer, "0999_org_extra.sql"), "-- older-writers: stop\nCREATE TABLE org_extra (id text);\n");
    await migrate(db.pool, newer);
    const recorded = () => db.pool.query("SELECT * FROM schema_migrations ORDER BY name").then((r) => r.rows);
    const before = await recorded();
    const errors = await expectJsonStartFailure(
      [process.execPath, join(root, "billing", "main.ts")],
      {
        ADMIN_TOKEN: "main-test-admin-token-0123456789",
        BILLING_PORT: String(await freePort()),
        DATABASE_URL: db.connectionString,
        LOG_LEVEL: "info",
      },
      "main-test-admin-token-0123456789",
      root,
    );
    expect(errors).toEqual([
      expect.objectContaining({
        msg: "postgres migration failed",
        err: expect.objectContaining({
          message:
            "the database has migration 0999_org_extra.sql applied, which this billing does not have and after which " +
            "older billing must not write; run billing of a version that has it on every replica (see README, Upgrades)",
        }),
      }),
    ]);
    expect(await recorded()).toEqual(before);
  } finally {
    await rm(newer, { recursive: true, force: true });
    await db.drop();
  }
}, 60_000);

test.each(["initialising postgres cluster", "postgres started"])(
  "SIGTERM while it starts (at %p) stops its embedded postgres before it exits, as npm start's Ctrl-C does",
  async (at) => {
    const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
    const port = await freePort();
    const lines: string[] = [];
    let signalled = false;
    const billing = spawnBilling(dataDir, port, "info", (line) => {
      lines.push(line);
      if (!signalled && line.includes(`"msg":"${at}"`)) {
        signalled = true;
        billing.proc.kill("SIGTERM");
      }
    });
    billing.ready.catch(() => {});
    let pid: number | undefined;
    try {
      const code = await Promise.race([billing.proc.exited, Bun.sleep(30_000).then(() => "still running")]);
      expect(signalled).toBe(true);
      pid = Number(/"msg":"postgres started".*"pid":(\d+)/.exec(lines.join("\n"))?.[1]);
      expect(pid).toBeGreaterThan(0);
      expect(code).toBe(0);
      expect(isAlive(pid)).toBe(false);
      expect(lines.some((line) => line.includes('"msg":"postgres stopped"'))).toBe(true);
    } finally {
      await billing.stop("SIGKILL");
      if (pid && isAlive(pid)) process.kill(pid, "SIGKILL");
      await rm(dataDir, { recursive: true, force: true });
    }
  },
  90_000,
);

test("SIGTERM while its migrations wait on a Postgres that never answers ends it at once, as pid 1 of a container", async () => {
  let connected: () => void = () => {};
  const asked = new Promise<void>((resolve) => (connected = resolve));
  const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { open: () => connected(), data() {} } });
  const billing = await spawnAsContainerInit([process.execPath, join(root, "billing", "main.ts")], {
    cwd: root,
    env: {
      ADMIN_TOKEN: "main-test-admin-token-0123456789",
      BILLING_PORT: String(await freePort()),
      DATABASE_URL: `postgres://mesh:db-pass-0123456789@127.0.0.1:${silent.port}/mesh`,
      LOG_LEVEL: "info",
    },
  });
  try {
    await asked;
    const sent = Date.now();
    process.kill(billing.pid, "SIGTERM");
    // Without a handler yet, as pid 1 it ran on until its connection timed out and exited 1, a migration failure.
    const code = await Promise.race([billing.exited, Bun.sleep(10_000).then(() => "still running")]);
    expect(code).toBe(0);
    expect(Date.now() - sent).toBeLessThan(2_000);
    expect(billing.lines.some((line) => line.includes('"msg":"stopped"'))).toBe(true);
  } finally {
    billing.proc.kill("SIGKILL");
    silent.stop(true);
  }
}, 30_000);
