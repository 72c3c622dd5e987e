import { readFileSync } from "node:fs";
import * as net from "node:net";
import type { Subprocess } from "bun";
import { clipped } from "./text.ts";

/**
 * The fields of /proc/<pid>/stat after the command name (which is in parentheses and may hold spaces), so
 * index 0 is the state, 1 the parent pid, 11 and 12 utime and stime, 19 starttime; undefined when the
 * process is gone or there is no /proc.
 */
export function procStatFields(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

/** Whether a process runs (a zombie does not). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  // An exited process orphaned by a killed parent stays a zombie until an init process reaps it.
  return procStatFields(pid)?.[0] !== "Z";
}

/** A free TCP port on loopback, picked by the kernel. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

export interface ServiceProcessOptions {
  name: string;
  /** Command and arguments, e.g. [process.execPath, "billing/main.ts"]. */
  cmd: string[];
  env: Record<string, string | undefined>;
  /** URL that answers 200 once the service is ready. */
  readyUrl: string;
  readyTimeoutMs?: number;
  /** Receives each output line; defaults to `[name] line` on stdout. */
  onLine?: (line: string) => void;
  cwd?: string;
}

export interface ServiceProcess {
  name: string;
  proc: Subprocess;
  /** Resolves when /readyz answers 200; rejects if the process exits or the timeout passes. */
  ready: Promise<void>;
  /** Sends the signal and waits for the exit code. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number>;
}

/** Starts a service as a child process with line-prefixed output and a readiness wait. */
/**
 * How long a service has after SIGTERM before it is killed: a gateway at its worst takes about 29 s with the default
 * settings (SHUTDOWN_GRACE_MS 10 s for requests in flight, up to 11 s more for those cut then to be answered, settle and
 * be metered, 5 s to ship its spool, 3 s for traces), and one killed before the end holds its budget leases until their
 * lifetime ends.
 */
export const stopTimeoutMs = 35_000;

/** Set in a spawned service's environment to the pid of the process that spawned it. */
export const parentPidVar = "MESH_PARENT_PID";

export function spawnService(options: ServiceProcessOptions): ServiceProcess {
  const print = options.onLine ?? ((line: string) => process.stdout.write(`[${options.name}] ${line}\n`));
  // Its last words, for the error when it exits before it is ready.
  const recent: string[] = [];
  const onLine = (line: string) => {
    recent.push(clipped(line, 500));
    if (recent.length > 5) recent.shift();
    print(line);
  };
  const proc = Bun.spawn(options.cmd, {
    cwd: options.cwd,
    // Its parent, so it stops itself once this process is gone (see stopOnSignals in lib/runtime.ts).
    env: { ...process.env, ...options.env, [parentPidVar]: String(process.pid) },
    stdout: "pipe",
    stderr: "pipe",
    stdin: "ignore",
    // Its own process group: a terminal's Ctrl-C reaches only the launcher, which stops services in order.
    detached: true,
  });
  void pipeLines(proc.stdout, onLine);
  void pipeLines(proc.stderr, onLine);
  const ready = waitReady(options.readyUrl, options.readyTimeoutMs ?? 30_000, proc, options.name, recent);
  return {
    name: options.name,
    proc,
    ready,
    async stop(signal = "SIGTERM", timeoutMs = stopTimeoutMs) {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode ?? -1;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      const code = await proc.exited;
      clearTimeout(timer);
      return code;
    },
  };
}

async function waitReady(
  url: string,
  timeoutMs: number,
  proc: Subprocess,
  name: string,
  recent: readonly string[],
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      // Its output is still being read when it exits: what is left arrives shortly.
      await Bun.sleep(50);
      const said = recent.length ? `; its last output:\n${recent.join("\n")}` : "";
      throw new Error(`${name} exited with ${proc.exitCode ?? proc.signalCode} before it was ready${said}`);
    }
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1_000) });
      if (res.status === 200) return;
    } catch {
      // not listening yet
    }
    await Bun.sleep(100);
  }
  throw new Error(`${name} was not ready at ${url} within ${timeoutMs} ms`);
}

async function pipeLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const chunk of stream) {
    buffered += decoder.decode(chunk, { stream: true });
    let nl = buffered.indexOf("\n");
    while (nl >= 0) {
      onLine(buffered.slice(0, nl));
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf("\n");
    }
  }
  if (buffered) onLine(buffered);
}

export interface CommandResult {
  stdout: string;
  stderr: string;
  code: number;
}

/** Runs a command to completion and collects its output. */
export async function runCommand(
  cmd: string[],
  options: { cwd?: string; env?: Record<string, string | undefined>; stdin?: string } = {},
): Promise<CommandResult> {
  const proc = Bun.spawn(cmd, {
    cwd: options.cwd,
    env: options.env ? { ...process.env, ...options.env } : undefined,
    stdin: options.stdin === undefined ? "ignore" : new Blob([options.stdin]),
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { stdout, stderr, code };
}
