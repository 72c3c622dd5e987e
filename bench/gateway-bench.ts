/**
 * What the gateway benchmarks share: a fake upstream in its own process, and the whole mesh (billing on embedded
 * Postgres, analytics on chdb) with the model `bench` routed to it.
 */
import { writeFile } from "node:fs/promises";
import * as path from "node:path";
import type { Subprocess } from "bun";
import { type Demo, ensureDemo, type Mesh, startMesh } from "../scripts/mesh.ts";

const adminToken = "bench-admin-token-0123456789";

/** Exact percentiles of float ms (autocannon's own histogram keeps whole ms only). */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = Float64Array.from(values).sort();
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] as number;
}

/** BENCH_GATEWAY_ENV="NAME=value NAME=value": extra environment for the gateway alone (BUN_JSC_logGC=1, say). */
export function benchGatewayEnv(spec = process.env.BENCH_GATEWAY_ENV ?? ""): Record<string, string> {
  const pairs = spec.split(/\s+/).filter(Boolean);
  return Object.fromEntries(pairs.map((pair) => [pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1)]));
}

/** Runs `cmd`, a server that prints its base URL on its first line of output, and waits for that line. */
export async function startUpstream(cmd: string[]): Promise<{ proc: Subprocess<"ignore", "pipe", "inherit">; url: string }> {
  const proc = Bun.spawn(cmd, { stdout: "pipe", stderr: "inherit" });
  const reader = proc.stdout.getReader();
  let line = "";
  while (!line.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) throw new Error("the fake upstream exited before it listened");
    line += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  return { proc, url: line.trim() };
}

/** The mesh in `dataDir`, its gateway serving the model `bench` from `upstreamUrl`, and a demo key for it. */
export async function startBenchMesh(options: {
  dataDir: string;
  upstreamUrl: string;
  gatewayEnv?: Record<string, string>;
  onLine?: (service: string, line: string) => void;
}): Promise<{ mesh: Mesh; demo: Demo }> {
  const configFile = path.join(options.dataDir, "gateway.yaml");
  await writeFile(
    configFile,
    [
      "providers:",
      `  - { name: fake, kind: openai, base_url: "${options.upstreamUrl}" }`,
      "models:",
      "  - name: bench",
      "    targets: [{ provider: fake, model: bench-model }]",
      '    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10" }',
      "",
    ].join("\n"),
  );
  const mesh = await startMesh({
    dataDir: options.dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    env: { LOG_LEVEL: "warn" },
    serviceEnv: { gateway: { GATEWAY_CONFIG: configFile, ...options.gatewayEnv } },
    onLine: options.onLine,
  });
  try {
    return { mesh, demo: await ensureDemo(mesh, { dataDir: options.dataDir, adminToken }) };
  } catch (e) {
    await mesh.stop();
    throw e;
  }
}

/** Waits (up to a minute) until the gateway's metrics spool holds no rows: all it sent is ingested and acked. */
export async function spoolDrained(gatewayUrl: string) {
  const deadline = performance.now() + 60_000;
  while (performance.now() < deadline) {
    const text = await (await fetch(`${gatewayUrl}/metrics`)).text();
    if (Number(/^gateway_spool_rows(?:\{[^}]*\})? (\S+)$/m.exec(text)?.[1] ?? 0) === 0) return;
    await Bun.sleep(200);
  }
  throw new Error("the gateway's metrics spool did not drain within a minute of the warm-up");
}
