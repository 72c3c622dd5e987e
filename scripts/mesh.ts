/**
 * Starts billing, analytics and gateway as separate processes with prefixed logs, waits until
 * all are ready, makes sure a demo org and API key exist, and stops everything on Ctrl-C.
 * `startMesh` is also what the end-to-end tests use.
 */
import { unlinkSync } from "node:fs";
import { link, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import * as net from "node:net";
import * as path from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { BillingService, KeyRefusalReason, KeyRefusalSchema, OrganizationState } from "../gen/billing/v1/billing_pb.ts";
import { commonEnv, defaultAdminToken, env, exitOnArguments, loadEnvOrExit } from "../lib/config.ts";
import { freePort, procStatFields, type ServiceProcess, spawnService, stopTimeoutMs } from "../lib/processes.ts";
import { allPages, createServiceClient } from "../lib/rpc-client.ts";

const root = path.resolve(import.meta.dir, "..");

export interface MeshOptions {
  dataDir: string;
  adminToken: string;
  /**
   * 0 picks a free port. `openai` is the gateway's OpenAI-compatible REST API on Bun's own server (its fast path; the
   * gateway port serves it too, beside the RPCs); a free port when left out.
   */
  ports: { gateway: number; billing: number; analytics: number; openai?: number };
  /** Extra environment for every service (DATABASE_URL, CLICKHOUSE_URL, LOG_LEVEL, ...). */
  env?: Record<string, string | undefined>;
  /** Per-service extra environment. */
  serviceEnv?: Partial<Record<ServiceName, Record<string, string | undefined>>>;
  onLine?: (service: ServiceName, line: string) => void;
  readyTimeoutMs?: number;
  /** Aborted while services start, it stops those started so far and rejects. */
  signal?: AbortSignal;
  /** Told of each service as it is spawned, before it is ready. */
  onSpawn?: (service: ServiceProcess) => void;
}

export type ServiceName = "billing" | "analytics" | "gateway";

export interface Demo {
  baseUrl: string;
  apiKey: string;
  orgId: string;
  /** The demo org is suspended (`meshctl orgs suspend`): its key is refused until the org is reinstated. */
  suspended: boolean;
}

export interface Mesh {
  urls: Record<ServiceName, string>;
  /** The gateway's OpenAI-compatible REST API on its fast port (add /v1 for an SDK's base URL). */
  openaiUrl: string;
  processes: Record<ServiceName, ServiceProcess>;
  /** Starts (again) one service on its port, e.g. after a test killed it. */
  restart(name: ServiceName): Promise<ServiceProcess>;
  /** SIGTERM to gateway, analytics, billing in that order (callers first); returns exit codes. */
  stop(): Promise<Record<ServiceName, number>>;
}

export async function startMesh(options: MeshOptions): Promise<Mesh> {
  // Free ports are picked just before the service that listens on them starts (a port found free can be taken by
  // any connection's local end meanwhile), and each service starts after those it calls.
  const ports = { billing: 0, analytics: 0, gateway: 0, openai: 0 };
  const urls = { billing: "", analytics: "", gateway: "" };
  // The kernel may hand out a port it just handed out: each service gets one no other has.
  const unused = async () => {
    for (;;) {
      const port = await freePort();
      if (!Object.values(ports).includes(port)) return port;
    }
  };
  // A port another program holds would answer the readiness probe in its service's place (another checkout's mesh
  // does, as ready), and the service started for it fails only after those before it: refused at once, in one line.
  // So would a service given another's port: the gateway on billing's was ready on billing's answer, then exited.
  const given = new Map<number, string>();
  for (const [name, variable] of Object.entries(portVariables) as [keyof typeof portVariables, string][]) {
    const port = options.ports[name];
    const other = port ? given.get(port) : undefined;
    if (other) throw new Error(`${other} and ${variable} are both ${port}: give each service a port of its own`);
    if (port) given.set(port, variable);
  }
  for (const [name, variable] of Object.entries(portVariables) as [keyof typeof portVariables, string][]) {
    const port = options.ports[name];
    if (port && (await portInUse(port))) {
      throw new Error(`port ${port} (${variable}) is in use by another program: stop it, or set ${variable} to a free port`);
    }
  }
  const pick = async (name: ServiceName) => {
    ports[name] ||= options.ports[name] || (await unused());
    if (name === "gateway") ports.openai ||= options.ports.openai || (await unused());
    urls[name] = `http://127.0.0.1:${ports[name]}`;
  };
  const spawn = (name: ServiceName) =>
    spawnService({
      name,
      cmd: [process.execPath, path.join(root, name, "main.ts")],
      cwd: root,
      env: {
        MESH_DATA_DIR: options.dataDir,
        ADMIN_TOKEN: options.adminToken,
        // Read by Bun at start: upstream calls past 256 at once would wait inside the gateway's fetch.
        BUN_CONFIG_MAX_HTTP_REQUESTS: process.env.BUN_CONFIG_MAX_HTTP_REQUESTS ?? "4096",
        // Read by Bun at start: the gateway's collections marked by its own thread alone, not handed back and forth
        // with a helper thread that other processes' threads keep off a core (see BUN_JSC_numberOfGCMarkers in README).
        // Its heap sized for 1 GiB of memory, not the host's (see BUN_JSC_forceRAMSize in README).
        ...(name === "gateway"
          ? {
              BUN_JSC_numberOfGCMarkers: process.env.BUN_JSC_numberOfGCMarkers ?? "1",
              BUN_JSC_forceRAMSize: process.env.BUN_JSC_forceRAMSize ?? String(2 ** 30),
            }
          : {
              // Read by Bun's allocator at start: memory billing and analytics free is kept for their next batches
              // rather than handed back to the system and faulted in again (see MIMALLOC_PURGE_DELAY in README).
              MIMALLOC_PURGE_DELAY: process.env.MIMALLOC_PURGE_DELAY ?? "-1",
              // Analytics' heap paced for 512 MiB, as its manifest paces it: what it frees stays in the process, and
              // paced by the host's memory it grew with every batch it took (see BUN_JSC_forceRAMSize in README).
              ...(name === "analytics" && {
                BUN_JSC_forceRAMSize: process.env.BUN_JSC_forceRAMSize ?? String(2 ** 29),
              }),
            }),
        // What is known so far: a service starts after the ones whose addresses it needs.
        ...known({
          BILLING_URL: urls.billing,
          ANALYTICS_URL: urls.analytics,
          BILLING_PORT: ports.billing,
          ANALYTICS_PORT: ports.analytics,
          GATEWAY_PORT: ports.gateway,
          GATEWAY_REST_PORT: ports.openai,
        }),
        ...options.env,
        ...options.serviceEnv?.[name],
      },
      readyUrl: `${urls[name]}/readyz`,
      readyTimeoutMs: options.readyTimeoutMs ?? 60_000,
      onLine: options.onLine && ((line) => options.onLine?.(name, line)),
    });

  const processes = {} as Record<ServiceName, ServiceProcess>;
  const stop = async () => {
    const codes = {} as Record<ServiceName, number>;
    for (const name of ["gateway", "analytics", "billing"] as const) {
      codes[name] = (await processes[name]?.stop()) ?? 0;
    }
    return codes;
  };
  const { signal } = options;
  const interrupted = new Promise<never>((_, reject) => {
    const abort = () => reject(new Error("stopped before the mesh was ready"));
    if (signal?.aborted) abort();
    else signal?.addEventListener("abort", abort, { once: true });
  });
  interrupted.catch(() => {});
  try {
    // The gateway is ready only once billing answers, and its metrics stream to analytics connects at once rather
    // than after a backoff (up to 10 s) that would hold back the first usage.
    for (const name of ["billing", "analytics", "gateway"] as const) {
      await Promise.race([pick(name), interrupted]);
      processes[name] = spawn(name);
      options.onSpawn?.(processes[name]);
      await Promise.race([processes[name].ready, interrupted]);
    }
    if (signal?.aborted) throw new Error("stopped before the mesh was ready");
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    urls,
    openaiUrl: `http://127.0.0.1:${ports.openai}`,
    processes,
    async restart(name) {
      processes[name] = spawn(name);
      await processes[name].ready;
      return processes[name];
    },
    stop,
  };
}

const portVariables = {
  billing: "BILLING_PORT",
  analytics: "ANALYTICS_PORT",
  gateway: "GATEWAY_PORT",
  openai: "GATEWAY_REST_PORT",
} as const;

/** Whether something listens on `port`, so that a service listening on every address, as they do, cannot. */
function portInUse(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "EADDRINUSE"));
    server.listen(port, "0.0.0.0", () => server.close(() => resolve(false)));
  });
}

/** A path as one word for a shell: quoted when it holds more than letters, digits and `_.-/`. */
function shellWord(text: string): string {
  return /^[\w./-]+$/.test(text) ? text : `'${text.replaceAll("'", `'\\''`)}'`;
}

/** The entries that have a value, as environment strings. */
function known(values: Record<string, string | number>): Record<string, string> {
  return Object.fromEntries(Object.entries(values).flatMap(([k, v]) => (v ? [[k, String(v)]] : [])));
}

/** Finds or creates the demo org and a working key, kept in <dataDir>/demo.env across restarts. */
export async function ensureDemo(mesh: Mesh, options: { dataDir: string; adminToken: string }): Promise<Demo> {
  const billing = createServiceClient(BillingService, {
    baseUrl: mesh.urls.billing,
    bearerToken: options.adminToken,
    timeoutMs: 10_000,
  });
  const file = path.join(options.dataDir, "demo.env");
  const baseUrl = `${mesh.openaiUrl}/v1`;
  const saved = await readFile(file, "utf8").catch(() => "");
  const savedKey = /^(?:export )?OPENAI_API_KEY=(.+)$/m.exec(saved)?.[1];
  if (savedKey) {
    try {
      const principal = await billing.authorizeKey({ secret: savedKey });
      await writeDemo(file, baseUrl, savedKey);
      return { baseUrl, apiKey: savedKey, orgId: principal.organization?.id ?? "", suspended: false };
    } catch (e) {
      const err = ConnectError.from(e);
      // Suspended on purpose: the key stays, refused until the org is reinstated, not replaced by one that works.
      const suspended = err
        .findDetails(KeyRefusalSchema)
        .find((d) => d.reason === KeyRefusalReason.ORGANIZATION_SUSPENDED);
      if (suspended) {
        await writeDemo(file, baseUrl, savedKey);
        return { baseUrl, apiKey: savedKey, orgId: suspended.orgId, suspended: true };
      }
      if (err.code !== Code.Unauthenticated) throw e;
    }
  }
  const orgs = await allPages((page) => billing.listOrganizations(page), (r) => r.organizations);
  const org =
    orgs.organizations.find((o) => o.name === "demo") ?? (await billing.createOrganization({ name: "demo" })).organization;
  if (!org) throw new Error("billing returned no organization");
  const created = await billing.createApiKey({ orgId: org.id, name: "demo" });
  await writeDemo(file, baseUrl, created.secret);
  return { baseUrl, apiKey: created.secret, orgId: org.id, suspended: org.state === OrganizationState.SUSPENDED };
}

/** Exported, so `source demo.env` reaches the programs the shell starts (the SDKs read their environment). */
async function writeDemo(file: string, baseUrl: string, apiKey: string) {
  await mkdir(path.dirname(file), { recursive: true });
  await writeWhole(file, `export OPENAI_BASE_URL=${baseUrl}\nexport OPENAI_API_KEY=${apiKey}\n`, "rename");
}

/**
 * Writes `text` (owner-only) to a file of its own, then links it into place (refused if `file` exists) or renames it
 * over `file`: a reader, or a launcher killed mid-write, never leaves it half written.
 */
async function writeWhole(file: string, text: string, place: "link" | "rename"): Promise<void> {
  const temp = `${file}.${process.pid}`;
  await writeFile(temp, text, { mode: 0o600 });
  try {
    await (place === "link" ? link(temp, file) : rename(temp, file));
  } finally {
    await rm(temp, { force: true });
  }
}

/**
 * What meshctl, which asks billing and analytics at their default ports with the default admin token unless told
 * otherwise, needs to reach them. A token of one's own is read from an owner-only file in the data directory, not
 * printed.
 */
async function meshctlEnv(urls: { billing: string; analytics: string }, dataDir: string, adminToken: string): Promise<string> {
  const tokenFile = path.join(dataDir, "admin-token");
  if (adminToken === defaultAdminToken) await rm(tokenFile, { force: true });
  else await writeWhole(tokenFile, adminToken, "rename");
  return (
    (adminToken === defaultAdminToken ? "" : `ADMIN_TOKEN="$(cat ${shellWord(tokenFile)})" `) +
    (urls.billing === "http://127.0.0.1:8081" ? "" : `BILLING_URL=${urls.billing} `) +
    (urls.analytics === "http://127.0.0.1:8082" ? "" : `ANALYTICS_URL=${urls.analytics} `)
  );
}

/** A process by its pid and its start time (pids are reused), as recorded in a launcher's lock file. */
interface ProcessId {
  pid: number;
  start?: string;
}

interface LockContent {
  launcher: ProcessId;
  services: Partial<Record<ServiceName, ProcessId>>;
}

function processId(pid: number): ProcessId {
  return { pid, start: procStatFields(pid)?.[19] };
}

/**
 * Whether that very process still runs: same pid, same start time, not a zombie. One this user may not see or signal
 * (/proc mounted with hidepid=2 shows another user's processes to no one else) is another user's, reusing the pid: a
 * launcher on this directory and its services run as its owner.
 */
function runs(id: ProcessId): boolean {
  const fields = procStatFields(id.pid);
  if (fields) return fields[0] !== "Z" && fields[19] === id.start;
  if (procStatFields(process.pid)) return false;
  try {
    // No /proc: the pid alone.
    process.kill(id.pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Signals a process that may have exited since it was seen running: gone by then is what was wanted. */
function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ESRCH") throw e;
  }
}

export interface DataDirLock {
  /** Records a service the launcher started, so a next launcher stops it if this one is killed before it can. */
  add(name: ServiceName, pid: number): Promise<void>;
  /** Removes the lock file (synchronous, for an exit hook). */
  release(): void;
}

/**
 * Takes `<dataDir>/mesh.pid` for this launcher: a launcher still running on the directory is refused (a second one
 * would stop its Postgres and answer with its services), and the services of one that was killed (kill -9, a crash)
 * and still hold their ports and data are stopped first, gateway to billing.
 */
export async function lockDataDir(
  dataDir: string,
  say: (line: string) => void = (line) => process.stdout.write(`${line}\n`),
): Promise<DataDirLock> {
  const file = path.join(dataDir, "mesh.pid");
  const content: LockContent = { launcher: processId(process.pid), services: {} };
  const write = (place: "link" | "rename") => writeWhole(file, `${JSON.stringify(content)}\n`, place);
  let writing = Promise.resolve();
  await mkdir(dataDir, { recursive: true, mode: 0o700 }).catch((e: Error) => {
    // A file in its place, a parent that is one, a read-only parent: which variable names it.
    throw new Error(`cannot make the data directory ${dataDir} (MESH_DATA_DIR): ${e.message}`);
  });
  for (;;) {
    try {
      await write("link");
      break;
    } catch (e) {
      // A full disk or a read-only directory: which file, which error (ENOSPC says "write" alone).
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") {
        throw new Error(`cannot write ${file}: ${(e as Error).message}`);
      }
    }
    const text = await readFile(file, "utf8").catch(() => "");
    let held: LockContent | undefined;
    try {
      held = JSON.parse(text) as LockContent;
    } catch {
      // Not one a launcher wrote: nothing to stop.
    }
    if (held?.launcher && runs(held.launcher)) {
      throw new Error(
        `another npm start (pid ${held.launcher.pid}) is running the mesh on ${dataDir}: stop it first ` +
          `(Ctrl-C in its terminal, or kill ${held.launcher.pid}), or give this one another MESH_DATA_DIR`,
      );
    }
    for (const name of ["gateway", "analytics", "billing"] as const) {
      const service = held?.services?.[name];
      if (!service || !runs(service)) continue;
      say(`stopping ${name} (pid ${service.pid}), left running by an npm start that was killed`);
      signal(service.pid, "SIGTERM");
      const deadline = Date.now() + stopTimeoutMs;
      while (runs(service) && Date.now() < deadline) await Bun.sleep(50);
      if (runs(service)) signal(service.pid, "SIGKILL");
    }
    await rm(file, { force: true });
  }
  return {
    add(name, pid) {
      content.services[name] = processId(pid);
      // One write at a time: they share their temporary file.
      writing = writing.catch(() => {}).then(() => write("rename"));
      return writing;
    },
    release() {
      try {
        unlinkSync(file);
      } catch {
        // already gone
      }
    },
  };
}

if (import.meta.main) {
  exitOnArguments({
    command: "npm start",
    script: "scripts/mesh.ts",
    about:
      "billing, analytics and the gateway until Ctrl-C\n" +
      "environment: MESH_DATA_DIR (.data), GATEWAY_PORT (8080), GATEWAY_REST_PORT (8090), BILLING_PORT (8081),\n" +
      "ANALYTICS_PORT (8082), ADMIN_TOKEN, MESH_READY_TIMEOUT_MS (60000), and each service's",
  });
  const cfg = loadEnvOrExit({
    MESH_DATA_DIR: commonEnv.MESH_DATA_DIR,
    ADMIN_TOKEN: commonEnv.ADMIN_TOKEN,
    GATEWAY_PORT: env.port(8080),
    BILLING_PORT: env.port(8081),
    ANALYTICS_PORT: env.port(8082),
    GATEWAY_REST_PORT: env.port(8090),
    MESH_READY_TIMEOUT_MS: env.int(1, 86_400_000).default(60_000),
  });
  const dataDir = path.resolve(cfg.MESH_DATA_DIR);
  const started = Date.now();
  const lock = await lockDataDir(dataDir).catch((e: Error) => {
    process.stderr.write(`mesh failed to start: ${e.message}\n`);
    process.exit(1);
  });
  const spawned: ServiceProcess[] = [];
  const interrupt = new AbortController();
  let mesh: Mesh | undefined;
  let stopping = false;
  let failed = false;
  const shutdown = async () => {
    if (stopping) return;
    stopping = true;
    process.stdout.write("\nstopping the mesh...\n");
    // Still starting: startMesh stops the services started so far.
    if (!mesh) return interrupt.abort();
    const codes = await mesh.stop();
    process.stdout.write(`stopped: ${JSON.stringify(codes)}\n`);
    process.exit(!failed && Object.values(codes).every((c) => c === 0) ? 0 : 1);
  };
  // From the start, so Ctrl-C while services start, or a closed terminal (SIGHUP) at any time, stops them in order
  // rather than ending the launcher alone and leaving them running on their ports and data directories.
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, shutdown);
  // Services run in their own process groups; never leave them behind, even if the launcher crashes
  // or its terminal pipe closes under it.
  process.stdout.on("error", () => {});
  process.on("exit", () => {
    for (const p of spawned) p.proc.kill("SIGTERM");
    // Those still stopping (the launcher crashed) are left in the lock file for the next start to wait for.
    if (spawned.every((p) => p.proc.exitCode !== null || p.proc.signalCode !== null)) lock.release();
  });
  // `source .data/demo.env` in this shell set OPENAI_API_KEY to a key of the mesh, which the gateway would take for
  // the openai provider's and send to api.openai.com with every call of its models.
  const meshKeyInShell = process.env.OPENAI_API_KEY?.startsWith("sk-mesh-");
  if (meshKeyInShell) {
    process.stdout.write("OPENAI_API_KEY here is a key of the mesh (demo.env's), not OpenAI's: the gateway starts without it\n");
  }
  mesh = await startMesh({
    dataDir,
    adminToken: cfg.ADMIN_TOKEN,
    ports: { gateway: cfg.GATEWAY_PORT, billing: cfg.BILLING_PORT, analytics: cfg.ANALYTICS_PORT, openai: cfg.GATEWAY_REST_PORT },
    serviceEnv: meshKeyInShell ? { gateway: { OPENAI_API_KEY: "" } } : undefined,
    readyTimeoutMs: cfg.MESH_READY_TIMEOUT_MS,
    signal: interrupt.signal,
    onSpawn: (p) => {
      spawned.push(p);
      lock.add(p.name as ServiceName, p.proc.pid).catch((e: Error) => {
        process.stderr.write(`cannot record ${p.name}'s pid in ${dataDir}: ${e.message}\n`);
      });
    },
  }).catch((e: Error) => {
    if (interrupt.signal.aborted) {
      process.stdout.write("stopped before the mesh was ready\n");
      process.exit(0);
    }
    process.stderr.write(`mesh failed to start: ${e.message}\n`);
    process.exit(1);
  });
  for (const p of Object.values(mesh.processes)) {
    void p.proc.exited.then((code) => {
      if (!stopping) {
        process.stderr.write(`${p.name} exited unexpectedly with ${code}; stopping the mesh\n`);
        // What it started is left in its process group: billing's embedded Postgres, when billing was killed.
        signal(-p.proc.pid, "SIGTERM");
        void shutdown();
      }
    });
  }
  // Stopped in order, as on Ctrl-C, rather than by the exit hook after a stack trace.
  const failStart = (what: string) => (e: Error) => {
    process.stderr.write(`mesh failed to start: ${what}: ${e.message.split("\n")[0]}\n`);
    failed = true;
    void shutdown();
    return new Promise<never>(() => {});
  };
  const demo = await ensureDemo(mesh, { dataDir, adminToken: cfg.ADMIN_TOKEN }).catch(failStart("cannot set up the demo key"));
  const meshctl = await meshctlEnv(mesh.urls, dataDir, cfg.ADMIN_TOKEN).catch(failStart("cannot write meshctl's token file"));
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  process.stdout.write(
    [
      "",
      `mesh ready in ${seconds}s: gateway ${mesh.urls.gateway} (RPCs; OpenAI API on ${mesh.openaiUrl}), billing ${mesh.urls.billing}, analytics ${mesh.urls.analytics}`,
      `OPENAI_BASE_URL=${demo.baseUrl}`,
      `OPENAI_API_KEY=${demo.apiKey}`,
      `(also written to ${path.join(dataDir, "demo.env")})`,
      ...(demo.suspended
        ? [
            `the demo org ${demo.orgId} is suspended: its key is refused (403 organization_suspended) until ` +
              `\`${meshctl}npm run -s ctl -- orgs reinstate ${demo.orgId}\``,
          ]
        : []),
      `operate it with meshctl: \`${meshctl}npm run -s ctl -- orgs list\``,
      "",
      // This process cannot set its shell's OPENAI_API_KEY: the try pasted alone sent none, a 401.
      "try, in another terminal:",
      `  source ${shellWord(path.join(dataDir, "demo.env"))}`,
      `  curl "$OPENAI_BASE_URL/chat/completions" -H "authorization: Bearer $OPENAI_API_KEY" \\`,
      `    -H 'content-type: application/json' -d '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'`,
      "Ctrl-C stops everything.",
      "",
    ].join("\n"),
  );
}
