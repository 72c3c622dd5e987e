import { expect } from "bun:test";
import { rm, writeFile } from "node:fs/promises";
import * as path from "node:path";
import type { Mesh } from "../scripts/mesh.ts";

/** Helpers shared by tests that wait on other processes or background work. */

export interface EventuallyOptions {
  /** Give up after this long; default 10 s. */
  timeoutMs?: number;
  /** Pause between probes; default 100 ms. */
  intervalMs?: number;
  /** What is awaited, for the failure message. */
  what?: string;
}

/**
 * Probes until `probe` yields something other than undefined or false and returns it. A probe that throws counts
 * as not yet (the service may be restarting); its last error is in the failure message if time runs out.
 */
export async function eventually<T>(
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  options: EventuallyOptions = {},
): Promise<T> {
  const { timeoutMs = 10_000, intervalMs = 100, what = "condition" } = options;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() > deadline) {
      const cause = lastError === undefined ? "" : ` (last probe failed: ${(lastError as Error).message ?? lastError})`;
      throw new Error(`${what}: not reached within ${timeoutMs} ms${cause}`);
    }
    await Bun.sleep(intervalMs);
  }
}

/** Stops a test's mesh, every service expected to exit 0, then removes its data directory, however the stop went. */
export async function stopMesh(mesh: Pick<Mesh, "stop"> | undefined, dataDir: string | undefined): Promise<void> {
  try {
    const codes = await mesh?.stop();
    if (codes) expect(codes).toEqual({ gateway: 0, analytics: 0, billing: 0 });
  } finally {
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  }
}

/**
 * Writes `<dir>/routes.yaml`, a gateway config of one mock model `m` (10 ms latency) priced $0.01 per million input
 * tokens and `outputPerMtok` per million output tokens; returns its path, for GATEWAY_CONFIG.
 */
export async function writeMockModelConfig(dir: string, outputPerMtok: string): Promise<string> {
  const config = path.join(dir, "routes.yaml");
  await writeFile(
    config,
    `providers:
  - { name: mock, kind: mock, latency_ms: 10 }
models:
  - name: m
    targets: [{ provider: mock, model: mock-m }]
    pricing: { input_per_mtok: "0.01", output_per_mtok: "${outputPerMtok}" }
`,
  );
  return config;
}
