import { expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { procStatFields, spawnService } from "./processes.ts";

test("a service that exits before it is ready says so with its last output", async () => {
  const service = spawnService({
    name: "doomed",
    cmd: [process.execPath, "--eval", 'console.log("starting"); console.error("listen EADDRINUSE 127.0.0.1:1"); process.exit(1)'],
    env: {},
    readyUrl: "http://127.0.0.1:1/readyz",
    onLine: () => {},
  });
  const error = await service.ready.catch((e: unknown) => e as Error);
  expect(error).toBeInstanceOf(Error);
  expect((error as Error).message).toStartWith("doomed exited with 1 before it was ready; its last output:");
  expect((error as Error).message).toContain("EADDRINUSE");
});

test("a service whose spawner dies without stopping it stops itself, as on SIGTERM", async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "orphan-"));
  const logFile = path.join(dir, "service.log");
  const service = `
    import { appendFileSync } from "node:fs";
    import { createLogger } from ${JSON.stringify(path.join(import.meta.dir, "log.ts"))};
    import { stopOnSignals } from ${JSON.stringify(path.join(import.meta.dir, "runtime.ts"))};
    // Each line to the spawner's pipe too, which is broken once the spawner is gone.
    const write = (line) => {
      appendFileSync(${JSON.stringify(logFile)}, line);
      process.stdout.write(line);
    };
    const log = createLogger({ service: "orphan", write });
    stopOnSignals(log).serving(() => Bun.sleep(1_000));
    setInterval(() => {}, 1_000);
  `;
  // The spawner starts the service and is then killed with SIGKILL, so nothing of its own stops the service.
  const spawner = `
    import { spawnService } from ${JSON.stringify(path.join(import.meta.dir, "processes.ts"))};
    const s = spawnService({ name: "orphan", cmd: [process.execPath, "--eval", ${JSON.stringify(service)}], env: {},
      readyUrl: "http://127.0.0.1:1/readyz", onLine: () => {} });
    s.ready.catch(() => {});
    console.log(s.proc.pid);
    setInterval(() => {}, 1_000);
  `;
  const parent = Bun.spawn([process.execPath, "--eval", spawner], { stdout: "pipe", stderr: "inherit" });
  let pid = 0;
  try {
    const reader = parent.stdout.getReader();
    const { value } = await reader.read();
    pid = Number(new TextDecoder().decode(value).trim());
    expect(pid).toBeGreaterThan(0);
    await Bun.sleep(1_500);
    expect(procStatFields(pid)).toBeDefined();
    parent.kill("SIGKILL");
    await parent.exited;
    const logged = () => readFileSync(logFile, "utf8").trim().split("\n").map((l) => JSON.parse(l));
    while (!existsSync(logFile)) await Bun.sleep(50);
    // A launcher clearing what a killed one left sends SIGTERM to a service already stopping: it finishes its stop.
    process.kill(pid, "SIGTERM");
    const deadline = Date.now() + 10_000;
    while (procStatFields(pid) && procStatFields(pid)?.[0] !== "Z" && Date.now() < deadline) await Bun.sleep(100);
    expect(procStatFields(pid)?.[0] ?? "gone").not.toBe("S");
    expect(logged().map((l) => [l.msg, l.signal])).toEqual([
      ["stopping", "parent exited"],
      ["stopped", undefined],
    ]);
  } finally {
    parent.kill("SIGKILL");
    if (procStatFields(pid)) process.kill(pid, "SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
});
