import { expect } from "bun:test";
import { rm } from "node:fs/promises";
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
