import { afterAll, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, runCommand } from "../lib/processes.ts";
import { expectJsonStartFailure, spawnAsContainerInit, waitForLine } from "../lib/testing.ts";
import { eventually } from "../test/support.ts";

const dataDir = mkdtempSync(join(tmpdir(), "gateway-main-"));
afterAll(() => rmSync(dataDir, { recursive: true, force: true }));
const main = join(import.meta.dir, "main.ts");
const adminToken = "main-test-admin-token-0123456789";

/** Starts the gateway with `env` (on any port, in the test's data directory) and expects exit 2 with this one line. */
async function expectRefused(env: Record<string, string>, line: string) {
  const { stdout, stderr, code } = await runCommand([process.execPath, main], {
    env: { MESH_DATA_DIR: dataDir, GATEWAY_PORT: "0", ...env },
  });
  expect(code).toBe(2);
  expect(stdout).toBe("");
  expect(stderr).toBe(`${line}\n`);
}

test.each(["GATEWAY_PORT", "GATEWAY_REST_PORT"])("with %s taken it exits 1, one JSON error line naming it", async (variable) => {
  const taken = Bun.listen({ hostname: "0.0.0.0", port: 0, socket: { data() {} } });
  const free = String(await freePort());
  try {
    const errors = await expectJsonStartFailure(
      [process.execPath, main],
      {
        MESH_DATA_DIR: dataDir,
        ADMIN_TOKEN: adminToken,
        GATEWAY_INSTANCE_ID: `taken-${variable}`,
        GATEWAY_PORT: variable === "GATEWAY_PORT" ? String(taken.port) : free,
        GATEWAY_REST_PORT: variable === "GATEWAY_REST_PORT" ? String(taken.port) : free,
        LOG_LEVEL: "warn",
      },
      adminToken,
    );
    expect(errors).toEqual([expect.objectContaining({ msg: `cannot listen on ${variable}`, variable, port: taken.port })]);
  } finally {
    taken.stop(true);
  }
}, 60_000);

test.each(["GATEWAY_PORT", "GATEWAY_REST_PORT"])(
  "with %s taken it releases its spool's LOCK as it exits: the next container opens the spool without waiting",
  async (variable) => {
    const spoolDir = join(dataDir, `taken-spool-${variable}`);
    const taken = Bun.listen({ hostname: "0.0.0.0", port: 0, socket: { data() {} } });
    const env = {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: adminToken,
      GATEWAY_INSTANCE_ID: "gw-taken",
      GATEWAY_SPOOL_DIR: spoolDir,
      LOG_LEVEL: "info",
    };
    const ports = async (busy: boolean) => {
      const free = String(await freePort());
      const [port, rest] = variable === "GATEWAY_PORT" ? [busy ? String(taken.port) : free, undefined] : [free, String(taken.port)];
      return { GATEWAY_PORT: port, GATEWAY_REST_PORT: busy ? rest : undefined };
    };
    try {
      // Containers of one pod, one after the other: the next cannot check the process of the one before.
      const first = await spawnAsContainerInit([process.execPath, main], { env: { ...env, ...(await ports(true)) } });
      expect(await first.exited).toBe(1);
      await waitForLine(first.lines, `cannot listen on ${variable}`);
      expect(existsSync(join(spoolDir, "gw-taken", "LOCK"))).toBe(false);
      const next = await spawnAsContainerInit([process.execPath, main], { env: { ...env, ...(await ports(false)) } });
      try {
        await waitForLine(next.lines, "gateway started");
        expect(next.lines.filter((line) => line.includes("waiting for its lock to go stale"))).toEqual([]);
      } finally {
        process.kill(next.pid, "SIGTERM");
        await Promise.race([next.exited, Bun.sleep(10_000)]);
        next.proc.kill("SIGKILL");
      }
    } finally {
      taken.stop(true);
    }
  },
  60_000,
);

test("GATEWAY_REST_PORT equal to GATEWAY_PORT is refused with the environment", async () => {
  const port = String(await freePort());
  await expectRefused(
    { GATEWAY_PORT: port, GATEWAY_REST_PORT: port },
    `invalid environment: GATEWAY_REST_PORT (${port}): must differ from GATEWAY_PORT`,
  );
});

test("a least past its most (lease sizes, retry backoff, body bytes) is refused with the environment, not quietly ignored", async () => {
  const pairs = [
    ["GATEWAY_BUDGET_MIN_LEASE_NANOS", "5000000000", "GATEWAY_BUDGET_MAX_LEASE_NANOS", "1000000000"],
    ["GATEWAY_RETRY_BASE_MS", "3000", "GATEWAY_RETRY_MAX_MS", "2000"],
    // A body of the largest size allowed could never be read.
    ["GATEWAY_MAX_BODY_BYTES", "8388608", "GATEWAY_MAX_INFLIGHT_BODY_BYTES", "4194304"],
  ];
  for (const [least, low, most, high] of pairs as [string, string, string, string][]) {
    await expectRefused({ [least]: low, [most]: high }, `invalid environment: ${least} (${low}): must not exceed ${most} (${high})`);
  }
});

test("a budget lease lifetime not 10 s past the longest request time limit, a model's too, is refused at start", async () => {
  // A request must be settled, and its lease given back, before billing takes the lease for expired and grants its
  // money again; a request's time limit ends it however slowly its client reads.
  const config = join(dataDir, "long-model.yaml");
  writeFileSync(
    config,
    `providers:
  - { name: mock, kind: mock, latency_ms: 0 }
models:
  - name: long
    targets: [{ provider: mock, model: mock-long }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    request_timeout_ms: 1800000
`,
  );
  const cases = [
    [{ GATEWAY_BUDGET_LEASE_TTL_S: "20", GATEWAY_REQUEST_TIMEOUT_MS: "10001" }, 20, 10_001],
    [{ GATEWAY_CONFIG: config }, 900, 1_800_000],
  ] as const;
  for (const [env, ttl, longest] of cases) {
    await expectRefused(env, `GATEWAY_BUDGET_LEASE_TTL_S: ${ttl} s must exceed the longest request time limit (${longest} ms) by 10 s`);
  }
});

test("GATEWAY_CONFIG_POLL_MS between 0 and 50, a poll that would take the serving thread's time for nothing, is refused with the environment", async () => {
  for (const ms of ["1", "49"]) {
    await expectRefused({ GATEWAY_CONFIG_POLL_MS: ms }, `invalid environment: GATEWAY_CONFIG_POLL_MS ("${ms}"): must be 0 (never) or at least 50 (ms)`);
  }
});

test("GATEWAY_RATE_SYNC_MS between 0 and 50, more billing calls a second than they are worth, is refused with the environment", async () => {
  for (const ms of ["1", "49"]) {
    await expectRefused({ GATEWAY_RATE_SYNC_MS: ms }, `invalid environment: GATEWAY_RATE_SYNC_MS ("${ms}"): must be 0 (off) or at least 50 (ms)`);
  }
});

test("GATEWAY_INSTANCE_ID of . or .., which would name the spool's parent directory, is refused with the environment", async () => {
  for (const id of [".", ".."]) {
    await expectRefused({ GATEWAY_INSTANCE_ID: id }, `invalid environment: GATEWAY_INSTANCE_ID ("${id}"): must name a directory: not . or ..`);
  }
});

test("GATEWAY_RESPONSE_ID_SECRET shorter than 32 characters, or set but blank, is refused with the environment, unshown", async () => {
  for (const [secret, shown] of [["too-short-a-secret", '"***"'], ["  ", "set but blank"]]) {
    await expectRefused({ GATEWAY_RESPONSE_ID_SECRET: secret as string }, `invalid environment: GATEWAY_RESPONSE_ID_SECRET (${shown}): must be at least 32 characters`);
  }
});

test("SIGTERM while it waits for the spool LOCK of the container before it ends it at once, as pid 1 of a container", async () => {
  const spoolDir = join(dataDir, "held-spool");
  mkdirSync(join(spoolDir, "gw-held"), { recursive: true });
  // The container before this one in the pod, whose LOCK is still fresh: this one waits up to 15 s for it to go stale.
  const lock = { pid: 1, host: hostname(), started: "1", pidNamespace: "pid:[4026531000]" };
  writeFileSync(join(spoolDir, "gw-held", "LOCK"), JSON.stringify(lock));
  const gateway = await spawnAsContainerInit([process.execPath, main], {
    env: {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: adminToken,
      GATEWAY_INSTANCE_ID: "gw-held",
      GATEWAY_SPOOL_DIR: spoolDir,
      GATEWAY_PORT: String(await freePort()),
      LOG_LEVEL: "info",
    },
  });
  try {
    await waitForLine(gateway.lines, "waiting for its lock to go stale");
    const sent = Date.now();
    process.kill(gateway.pid, "SIGTERM");
    const code = await Promise.race([gateway.exited, Bun.sleep(5_000).then(() => "still running")]);
    expect(code).toBe(0);
    expect(Date.now() - sent).toBeLessThan(2_000);
    expect(gateway.lines.some((line) => line.includes('"msg":"stopped"'))).toBe(true);
  } finally {
    gateway.proc.kill("SIGKILL");
  }
}, 30_000);

test("GATEWAY_CONFIG_POLL_MS reloads the config file once its content changes, refuses one that does not hold once, and SIGHUP reloads it", async () => {
  const config = join(dataDir, "polled.yaml");
  const model = (name: string) => `  - name: ${name}
    targets: [{ provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`;
  const file = (...names: string[]) => `providers:\n  - { name: mock, kind: mock }\nmodels:\n${names.map(model).join("")}`;
  // Replaced whole, as a ConfigMap's files are: a poll never reads one half written.
  const put = (text: string) => {
    writeFileSync(`${config}.new`, text);
    renameSync(`${config}.new`, config);
  };
  put(file("first"));
  const port = await freePort();
  const gateway = await spawnAsContainerInit([process.execPath, main], {
    env: {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: adminToken,
      GATEWAY_INSTANCE_ID: "gw-polled",
      GATEWAY_PORT: String(port),
      GATEWAY_CONFIG: config,
      GATEWAY_CONFIG_POLL_MS: "50",
      LOG_LEVEL: "info",
    },
  });
  const logged = (msg: string) => gateway.lines.filter((line) => line.includes(`"msg":"${msg}`));
  const reloaded = () => logged("gateway config reloaded");
  const refused = () => logged("gateway config not reloaded");
  try {
    await waitForLine(gateway.lines, "gateway started");
    await Bun.sleep(200);
    // Unchanged, it is not read as new.
    expect(reloaded()).toEqual([]);

    put(file("first", "second"));
    await eventually(() => reloaded().length === 1, { intervalMs: 20 });
    expect(reloaded()).toEqual([expect.stringContaining('"models":2')]);

    put("models: [");
    await eventually(() => refused().length === 1, { intervalMs: 20 });
    rmSync(config);
    await eventually(() => refused().length === 2, { intervalMs: 20 });
    // Each refused once, however many polls see it since.
    await Bun.sleep(300);
    expect(refused()).toEqual([expect.stringContaining("line 1"), expect.stringContaining("cannot read gateway config")]);

    put(file("first", "second", "third"));
    await eventually(() => reloaded().length === 2, { intervalMs: 20 });
    expect(reloaded()[1]).toContain('"models":3');
    process.kill(gateway.pid, "SIGHUP");
    await eventually(() => reloaded().length === 3, { intervalMs: 20 });
    expect(reloaded().length).toBe(3);

    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    expect(metrics).toMatch(/^gateway_config_reloads_total\{[^}]*result="applied"[^}]*\} 3$/m);
    expect(metrics).toMatch(/^gateway_config_reloads_total\{[^}]*result="refused"[^}]*\} 2$/m);
  } finally {
    process.kill(gateway.pid, "SIGTERM");
    await Promise.race([gateway.exited, Bun.sleep(10_000)]);
    gateway.proc.kill("SIGKILL");
  }
}, 60_000);
