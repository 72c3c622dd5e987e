import { expect, test } from "bun:test";
import { chownSync, linkSync, readdirSync, readFileSync, statSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { procStatFields, runCommand } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";

const launcher = join(import.meta.dir, "mesh.ts");

test("the launcher reads MESH_READY_TIMEOUT_MS as a whole number in decimal digits, like every other variable", async () => {
  // GATEWAY_PORT is refused too, so nothing starts whatever the launcher makes of the timeout.
  for (const value of ["1e3", "0x3E8", "60000.0"]) {
    const { stdout, stderr, code } = await runCommand([process.execPath, launcher], {
      env: { GATEWAY_PORT: "x", MESH_READY_TIMEOUT_MS: value },
    });
    expect(code).toBe(2);
    expect(stdout).toBe("");
    expect(stderr).toContain(`MESH_READY_TIMEOUT_MS ("${value}"): must be a whole number in decimal digits`);
  }
});

test("npm start -- --help says what configures it, and an argument it does not take is refused, nothing started", async () => {
  const dataDir = join(await mkdtemp(join(tmpdir(), "mesh-args-")), "data");
  try {
    const help = await runCommand([process.execPath, launcher, "--help"], { env: { MESH_DATA_DIR: dataDir } });
    expect(help).toMatchObject({ code: 0, stderr: "" });
    expect(help.stdout).toStartWith("usage: npm start");
    expect(help.stdout).toContain("MESH_DATA_DIR (.data), GATEWAY_PORT (8080)");
    const other = await runCommand([process.execPath, launcher, "--port", "9000"], { env: { MESH_DATA_DIR: dataDir } });
    expect(other).toEqual({
      code: 2,
      stdout: "",
      stderr: 'npm start takes no arguments, not "--port": it is configured by its environment (npm start -- --help)\n',
    });
    expect(readdirSync(join(dataDir, ".."))).toEqual([]);
  } finally {
    await rm(join(dataDir, ".."), { recursive: true, force: true });
  }
});

test("a MESH_DATA_DIR that cannot be a directory (a file there) is refused in one line naming it, nothing started", async () => {
  const dir = await mkdtemp(join(tmpdir(), "mesh-file-"));
  try {
    await writeFile(join(dir, "data"), "");
    const run = await runCommand([process.execPath, launcher], { env: { MESH_DATA_DIR: join(dir, "data") } });
    expect(run.code).toBe(1);
    expect(run.stderr).toMatch(/^mesh failed to start: cannot make the data directory .*\/data \(MESH_DATA_DIR\): EEXIST[^\n]*\n$/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

/** `npm start` on a data directory of its own and free ports, its output read line by line. */
function launch(dataDir: string, env: Record<string, string> = {}) {
  const proc = Bun.spawn([process.execPath, launcher], {
    env: {
      ...process.env,
      MESH_DATA_DIR: dataDir,
      ...{ GATEWAY_PORT: "0", BILLING_PORT: "0", ANALYTICS_PORT: "0", GATEWAY_REST_PORT: "0" },
      ...env,
    },
    stdout: "pipe",
    stderr: "pipe",
  });
  const lines: string[] = [];
  const waiters: Array<() => void> = [];
  const read = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    let buffered = "";
    for await (const chunk of stream) {
      buffered += decoder.decode(chunk, { stream: true });
      const parts = buffered.split("\n");
      buffered = parts.pop() ?? "";
      lines.push(...parts);
      for (const wake of waiters.splice(0)) wake();
    }
  };
  void read(proc.stdout);
  void read(proc.stderr);
  return {
    proc,
    lines,
    /** Its exit code, or "still running" once `timeoutMs` have passed without it. */
    exitCode: (timeoutMs: number) => Promise.race([proc.exited, Bun.sleep(timeoutMs).then(() => "still running")]),
    async waitFor(pattern: RegExp, timeoutMs = 60_000): Promise<string> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const line = lines.find((l) => pattern.test(l));
        if (line !== undefined) return line;
        if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`no ${pattern} in:\n${lines.join("\n")}`);
        await new Promise<void>((wake) => {
          waiters.push(wake);
          setTimeout(wake, 100);
        });
      }
    },
  };
}

/** The launcher's services and the postgres billing started. */
function meshPids(launcherPid: number, lines: string[]): number[] {
  const children = readdirSync("/proc")
    .map(Number)
    .filter((pid) => Number.isInteger(pid) && procStatFields(pid)?.[1] === String(launcherPid));
  const postgres = lines.flatMap((l) => /"msg":"postgres started".*"pid":(\d+)/.exec(l)?.[1] ?? []).map(Number);
  return [...children, ...postgres];
}

/**
 * Runs `body` against `npm start` on a data directory of its own, and any other `launchAgain` starts there. However the
 * body ended, each launcher is killed afterwards with whatever it left running (its services, and the postgres billing
 * started there), and the directory removed: a failing test leaves no service behind.
 */
async function withLaunch(
  body: (mesh: ReturnType<typeof launch>, dataDir: string, launchAgain: () => ReturnType<typeof launch>) => Promise<void>,
  options: { env?: Record<string, string>; prefix?: string } = {},
): Promise<void> {
  const dataDir = await mkdtemp(join(tmpdir(), options.prefix ?? "mesh-launcher-"));
  const mesh = launch(dataDir, options.env);
  const launched = [mesh];
  const launchAgain = () => {
    const next = launch(dataDir, options.env);
    launched.push(next);
    return next;
  };
  try {
    await body(mesh, dataDir, launchAgain);
  } finally {
    for (const each of launched) killLaunched(each, dataDir);
    await rm(dataDir, { recursive: true, force: true });
  }
}

/** Kills a test's launcher and whatever it left running: its services, and the postgres billing started there. */
function killLaunched(mesh: ReturnType<typeof launch>, dataDir: string): void {
  // Found while the launcher lives (its children are reparented once it is killed); a postgres pid from the log only
  // while it is still that directory's postgres, as pids are reused.
  const left = meshPids(mesh.proc.pid, mesh.lines).filter(
    (pid) => procStatFields(pid)?.[1] === String(mesh.proc.pid) || readCmdline(pid).includes(dataDir),
  );
  mesh.proc.kill("SIGKILL");
  for (const pid of left.filter(running)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Gone meanwhile.
    }
  }
}

const readCmdline = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
  } catch {
    return "";
  }
};

function running(pid: number): boolean {
  const state = procStatFields(pid)?.[0];
  return state !== undefined && state !== "Z";
}

test.each(["SIGINT", "SIGTERM"] as const)(
  "%s to the launcher while services start stops those started, postgres too, and says so",
  async (signal) => {
    await withLaunch(async (mesh) => {
      // Billing is ready (and its postgres up); analytics is starting.
      await mesh.waitFor(/^\[analytics\] /);
      const pids = meshPids(mesh.proc.pid, mesh.lines);
      expect(pids.length).toBeGreaterThanOrEqual(3);
      mesh.proc.kill(signal);
      expect(await mesh.proc.exited).toBe(0);
      expect(mesh.lines).toContain("stopped before the mesh was ready");
      expect(pids.filter(running)).toEqual([]);
    });
  },
  90_000,
);

test("a closed terminal (SIGHUP) stops the running mesh as Ctrl-C does, leaving no service behind", async () => {
  await withLaunch(async (mesh) => {
    await mesh.waitFor(/^Ctrl-C stops everything/);
    const pids = meshPids(mesh.proc.pid, mesh.lines);
    expect(pids.length).toBe(4);
    mesh.proc.kill("SIGHUP");
    expect(await mesh.proc.exited).toBe(0);
    expect(mesh.lines.find((l) => l.startsWith("stopped: "))).toBe(
      'stopped: {"gateway":0,"analytics":0,"billing":0}',
    );
    expect(pids.filter(running)).toEqual([]);
  });
}, 90_000);

test("a killed billing's embedded postgres is stopped with the mesh, not left running", async () => {
  await withLaunch(async (mesh) => {
    await mesh.waitFor(/^Ctrl-C stops everything/);
    const billing = meshPids(mesh.proc.pid, mesh.lines).find((pid) =>
      readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("billing/main.ts"),
    );
    const postgres = Number(/"msg":"postgres started".*"pid":(\d+)/.exec(mesh.lines.join("\n"))?.[1]);
    expect(billing).toBeGreaterThan(0);
    expect(running(postgres)).toBe(true);
    process.kill(billing as number, "SIGKILL");
    expect(await mesh.proc.exited).toBe(1);
    expect(mesh.lines).toContain("billing exited unexpectedly with 137; stopping the mesh");
    // Left running until the next npm start on the directory.
    for (let i = 0; i < 200 && running(postgres); i++) await Bun.sleep(50);
    expect(running(postgres)).toBe(false);
  });
}, 90_000);

test("the try npm start prints, pasted into another terminal, gets an answer", async () => {
  const adminToken = "launcher-test-admin-token-0123456789";
  await withLaunch(async (mesh) => {
    await mesh.waitFor(/^Ctrl-C stops everything/);
    const from = mesh.lines.findIndex((l) => l.startsWith("try"));
    const commands = mesh.lines
      .slice(from, mesh.lines.indexOf("Ctrl-C stops everything."))
      .map((l) => l.replace(/^try[^:]*:/, ""))
      .join("\n");
    // A shell of its own, as another terminal's: it has none of the launcher's environment. It sent no key, a 401.
    const { stdout, code } = await runCommand(["env", "-i", `PATH=${process.env.PATH}`, "bash", "-c", commands]);
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toMatchObject({ choices: [{ message: { content: "mock reply: hello" } }] });
    // On ports of its own, meshctl pasted alone asked billing and analytics at 8081 and 8082: refused, or another mesh's.
    const meshctl = /^operate it with meshctl: `(.+)`$/.exec(await mesh.waitFor(/^operate it with meshctl: /))?.[1] ?? "";
    const run = (command: string) =>
      runCommand(["env", "-i", `PATH=${process.env.PATH}`, `HOME=${process.env.HOME}`, "bash", "-c", command], {
        cwd: join(import.meta.dir, ".."),
      });
    const orgs = await run(`${meshctl} --json`);
    expect(orgs.stderr).toBe("");
    const demo = JSON.parse(orgs.stdout).organizations.find((o: { name: string }) => o.name === "demo");
    const usage = await run(`${meshctl.replace("orgs list", `usage --org ${demo.id} --source analytics`)} --json`);
    expect({ stderr: usage.stderr, code: usage.code }).toEqual({ stderr: "", code: 0 });
    // A token of one's own reaches meshctl from a file, not shown: pasted without it, meshctl sent the default, a 401.
    expect(meshctl).toStartWith(`ADMIN_TOKEN="$(cat `);
    expect(mesh.lines.filter((l) => l.includes(adminToken))).toEqual([]);
    mesh.proc.kill("SIGINT");
    expect(await mesh.proc.exited).toBe(0);
  }, { prefix: "mesh launcher's ", env: { ADMIN_TOKEN: adminToken } });
}, 90_000);

test("a second npm start on the data directory of a running one is refused in one line, the first runs on", async () => {
  await withLaunch(async (first, dataDir, launchAgain) => {
    await first.waitFor(/^Ctrl-C stops everything/);
    const pids = meshPids(first.proc.pid, first.lines);
    const second = launchAgain();
    expect(await second.exitCode(30_000)).toBe(1);
    expect(second.lines).toEqual([
      `mesh failed to start: another npm start (pid ${first.proc.pid}) is running the mesh on ${dataDir}: stop it ` +
        `first (Ctrl-C in its terminal, or kill ${first.proc.pid}), or give this one another MESH_DATA_DIR`,
    ]);
    expect(pids.filter(running)).toEqual(pids);
    first.proc.kill("SIGINT");
    expect(await first.proc.exited).toBe(0);
  });
}, 90_000);

test("npm start killed by kill -9 has its services and postgres stop themselves; the next starts with the same key", async () => {
  await withLaunch(async (first, dataDir, launchAgain) => {
    const key = await first.waitFor(/^OPENAI_API_KEY=/);
    await first.waitFor(/^Ctrl-C stops everything/);
    const pids = meshPids(first.proc.pid, first.lines);
    expect(pids.length).toBe(4);
    first.proc.kill("SIGKILL");
    await first.proc.exited;
    // Each stops as on SIGTERM (the gateway ships its spool, billing stops its postgres), with nobody to ask it.
    const deadline = Date.now() + 45_000;
    while (pids.some(running) && Date.now() < deadline) await Bun.sleep(100);
    expect(pids.filter(running)).toEqual([]);

    // What a reader that opened demo.env before the restart holds: replaced whole, never cut short and rewritten.
    const before = await readFile(join(dataDir, "demo.env"), "utf8");
    linkSync(join(dataDir, "demo.env"), join(dataDir, "demo.env.opened"));
    const second = launchAgain();
    expect(await second.waitFor(/^OPENAI_API_KEY=/)).toBe(key);
    await second.waitFor(/^Ctrl-C stops everything/);
    expect(second.lines.filter((l) => l.includes("left running"))).toEqual([]);
    expect(await readFile(join(dataDir, "demo.env.opened"), "utf8")).toBe(before);
    expect(statSync(join(dataDir, "demo.env")).ino).not.toBe(statSync(join(dataDir, "demo.env.opened")).ino);
    second.proc.kill("SIGINT");
    expect(await second.proc.exited).toBe(0);
  });
}, 120_000);

/** A script that takes the launcher's lock on `dataDir`, says "locked" and lets it go. */
const lockScript = (dataDir: string) =>
  [
    `const { lockDataDir } = await import(${JSON.stringify(launcher)});`,
    `const lock = await lockDataDir(${JSON.stringify(dataDir)});`,
    `console.log("locked");`,
    `lock.release();`,
  ].join("\n");

test("a launcher finding services of a killed one still running (hung) stops them before it starts", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "mesh-launcher-"));
  // Stands in for a gateway that did not stop when its launcher was killed.
  const hung = Bun.spawn(["sleep", "60"]);
  try {
    const start = procStatFields(hung.pid)?.[19];
    const stale = { launcher: { pid: 999_999_999, start: "1" }, services: { gateway: { pid: hung.pid, start } } };
    await writeFile(join(dataDir, "mesh.pid"), JSON.stringify(stale));
    const { stdout: out, code } = await runCommand([process.execPath, "--eval", lockScript(dataDir)]);
    expect({ out, code }).toEqual({
      out: `stopping gateway (pid ${hung.pid}), left running by an npm start that was killed\nlocked\n`,
      code: 0,
    });
    expect(await hung.exited).toBe(143);
  } finally {
    hung.kill("SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }
}, 60_000);

test("npm start after the demo org was suspended starts, keeps its key and says how to reinstate the org", async () => {
  await withLaunch(async (first, dataDir, launchAgain) => {
    const key = await first.waitFor(/^OPENAI_API_KEY=/);
    const ready = await first.waitFor(/^mesh ready in /);
    const billingUrl = /billing (http:\S+),/.exec(ready)?.[1] ?? "";
    const billing = createServiceClient(BillingService, {
      baseUrl: billingUrl,
      bearerToken: "dev-admin-token-change-me",
    });
    const demo = (await billing.listOrganizations({})).organizations.find((o) => o.name === "demo");
    await billing.suspendOrganization({ orgId: demo?.id ?? "", reason: "trying it" });
    first.proc.kill("SIGINT");
    expect(await first.proc.exited).toBe(0);

    // Crashed with a stack trace on the key's PERMISSION_DENIED, every time, so billing could not be reached to
    // reinstate the org.
    const second = launchAgain();
    await second.waitFor(/^Ctrl-C stops everything/);
    expect(await second.waitFor(/^OPENAI_API_KEY=/)).toBe(key);
    // The command says where billing is, here not at meshctl's default port.
    const urls = /billing (http:\S+), analytics (http:\S+)$/.exec(await second.waitFor(/^mesh ready in /));
    expect(second.lines).toContain(
      `the demo org ${demo?.id} is suspended: its key is refused (403 organization_suspended) until ` +
        `\`BILLING_URL=${urls?.[1]} ANALYTICS_URL=${urls?.[2]} npm run -s ctl -- orgs reinstate ${demo?.id}\``,
    );
    expect(await readFile(join(dataDir, "demo.env"), "utf8")).toContain(key);
    second.proc.kill("SIGINT");
    expect(await second.proc.exited).toBe(0);
  });
}, 120_000);

test("a demo key npm start cannot set up stops the mesh in order with one line, and exit 1", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "mesh-launcher-"));
  // demo.env cannot be written.
  await mkdir(join(dataDir, "demo.env"));
  const mesh = launch(dataDir);
  try {
    expect(await mesh.exitCode(60_000)).toBe(1);
    const pids = meshPids(mesh.proc.pid, mesh.lines);
    expect(mesh.lines.filter((l) => !l.startsWith("["))).toEqual([
      "mesh failed to start: cannot set up the demo key: EISDIR: illegal operation on a directory, " +
        `rename '${join(dataDir, "demo.env")}.${mesh.proc.pid}' -> '${join(dataDir, "demo.env")}'`,
      "",
      "stopping the mesh...",
      'stopped: {"gateway":0,"analytics":0,"billing":0}',
    ]);
    expect(pids.filter(running)).toEqual([]);
    expect(readdirSync(dataDir)).not.toContain("mesh.pid");
  } finally {
    killLaunched(mesh, dataDir);
    await rm(dataDir, { recursive: true, force: true });
  }
}, 90_000);

test("npm start in a shell that sourced demo.env starts the gateway without the mesh's key as OpenAI's", async () => {
  await withLaunch(async (mesh) => {
    await mesh.waitFor(/^Ctrl-C stops everything/);
    expect(mesh.lines).toContain(
      "OPENAI_API_KEY here is a key of the mesh (demo.env's), not OpenAI's: the gateway starts without it",
    );
    // Taken as the openai provider's key before, and sent to api.openai.com.
    expect(mesh.lines.some((l) => l.startsWith("[gateway] ") && l.includes('"msg":"provider has no API key'))).toBe(
      true,
    );
    mesh.proc.kill("SIGINT");
    expect(await mesh.proc.exited).toBe(0);
  }, { env: { OPENAI_API_KEY: "sk-mesh-JYzXYqoNlmiwkkq7XmNO2oIWzXLo0ZIi5MKo3vhZ3DJ" } });
}, 90_000);

// /proc mounted with hidepid=2 (hardened multi-user hosts) in a mount namespace of its own, as nobody: root's processes
// are hidden from it and refuse its signals.
const remount = 'mount -t proc -o hidepid=2 proc /proc && exec "$@"';
const hiddenProc = ["unshare", "--mount", "--propagation", "private", "sh", "-c", remount, "-"];
const asNobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
const canHideProc =
  process.getuid?.() === 0 &&
  Bun.spawnSync([...hiddenProc, ...asNobody, "test", "!", "-e", "/proc/1/stat"]).exitCode === 0;

test.skipIf(!canHideProc)(
  "a stale mesh.pid whose pids another user's processes now have, hidden by /proc's hidepid, neither refuses nor fails",
  async () => {
    const dataDir = await mkdtemp(join(tmpdir(), "mesh-launcher-"));
    // The killed launcher's pid and its gateway's, taken since by root's processes.
    const others = [Bun.spawn(["sleep", "60"]), Bun.spawn(["sleep", "60"])];
    try {
      const [launcherPid, gatewayPid] = others.map((p) => p.pid);
      chownSync(dataDir, 65534, 65534);
      // Refused as "another npm start (pid ...) is running"; then failed on kill() EPERM.
      for (const stale of [
        { launcher: { pid: launcherPid, start: "1" }, services: {} },
        { launcher: { pid: 999_999_999, start: "1" }, services: { gateway: { pid: gatewayPid, start: "2" } } },
      ]) {
        await writeFile(join(dataDir, "mesh.pid"), JSON.stringify(stale));
        chownSync(join(dataDir, "mesh.pid"), 65534, 65534);
        const { stdout: out, stderr: err, code } = await runCommand(
          [...hiddenProc, ...asNobody, process.execPath, "--eval", lockScript(dataDir)],
          { env: { HOME: dataDir } },
        );
        expect({ out, err, code }).toEqual({ out: "locked\n", err: "", code: 0 });
      }
      expect(others.map((p) => p.exitCode)).toEqual([null, null]);
    } finally {
      for (const p of others) p.kill();
      await rm(dataDir, { recursive: true, force: true });
    }
  },
  30_000,
);

/** Runs `npm start` with `env` to its exit, which must be 1 with the one line `refusal` and nothing in its data directory. */
async function expectRefusedStart(env: Record<string, string>, refusal: string) {
  await withLaunch(
    async (mesh, dataDir) => {
      expect(await mesh.exitCode(30_000)).toBe(1);
      expect(mesh.lines).toEqual([refusal]);
      expect(readdirSync(dataDir)).toEqual([]);
    },
    { env },
  );
}

test("one port given to two services is refused in one line before anything starts", async () => {
  // The gateway was ready on billing's /readyz, the demo key printed, then it could not listen and the mesh stopped.
  await expectRefusedStart(
    { BILLING_PORT: "51999", GATEWAY_PORT: "51999" },
    "mesh failed to start: BILLING_PORT and GATEWAY_PORT are both 51999: give each service a port of its own",
  );
}, 60_000);

test("a port another program holds, one answering every probe, is refused in one line before anything starts", async () => {
  // Another checkout's mesh, say: ready to any probe.
  const other = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("ok") });
  try {
    await expectRefusedStart(
      { BILLING_PORT: String(other.port) },
      `mesh failed to start: port ${other.port} (BILLING_PORT) is in use by another program: stop it, ` +
        "or set BILLING_PORT to a free port",
    );
  } finally {
    await other.stop(true);
  }
}, 60_000);
