import { expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { freePort, spawnService } from "../lib/processes.ts";
import { isAlive, postmasterPid } from "./store/embedded.ts";

const root = resolve(import.meta.dir, "..");

test("exits non-zero when its embedded postgres dies, so a supervisor restarts it", async () => {
  const dataDir = await mkdtemp(join(tmpdir(), "billing-main-"));
  const port = await freePort();
  const lines: string[] = [];
  const billing = spawnService({
    name: "billing",
    cmd: [process.execPath, join(root, "billing", "main.ts")],
    cwd: root,
    env: {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: "main-test-admin-token-0123456789",
      BILLING_PORT: String(port),
      DATABASE_URL: undefined,
      LOG_LEVEL: "warn",
    },
    readyUrl: `http://127.0.0.1:${port}/readyz`,
    readyTimeoutMs: 60_000,
    onLine: (line) => lines.push(line),
  });
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
