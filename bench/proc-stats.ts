import { readdirSync, readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { resolve } from "node:path";
import { procStatFields } from "../lib/processes.ts";

/** Live processes whose ancestor is `pid` (children, grandchildren, ...). */
function descendants(pid: number): number[] {
  const parentOf = new Map<number, number>();
  for (const entry of readdirSync("/proc")) {
    const child = Number(entry);
    if (!Number.isInteger(child)) continue;
    const ppid = Number(procStatFields(child)?.[1]);
    if (Number.isInteger(ppid)) parentOf.set(child, ppid);
  }
  const found: number[] = [];
  const wanted = new Set([pid]);
  let grew = true;
  while (grew) {
    grew = false;
    for (const [child, ppid] of parentOf) {
      if (wanted.has(ppid) && !wanted.has(child)) {
        wanted.add(child);
        found.push(child);
        grew = true;
      }
    }
  }
  return found;
}

/**
 * CPU seconds (user + system) used so far by a process and, with `tree`, by every process under it, counting
 * children that already exited (a Postgres server's backends under billing, for one). /proc counts in 10 ms ticks.
 */
export function cpuSeconds(pid: number, options: { tree?: boolean } = {}): number {
  const ticks = (fields: string[] | undefined, withReaped: boolean) =>
    fields ? Number(fields[11]) + Number(fields[12]) + (withReaped ? Number(fields[13]) + Number(fields[14]) : 0) : 0;
  if (!options.tree) return ticks(procStatFields(pid), false) / 100;
  let total = ticks(procStatFields(pid), true);
  for (const child of descendants(pid)) total += ticks(procStatFields(child), true);
  return total / 100;
}

export function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  return kb / 1024;
}

/** What this machine's cores can carry at `cpuUs` of CPU per unit of work, all processes together. */
export function ceilingPerSecond(cpuUs: number): number {
  return (availableParallelism() * 1e6) / cpuUs;
}

/** This machine's CPU time so far, in ticks: all of it, and what its hypervisor gave other guests (steal). */
function machineTicks(): { total: number; steal: number } {
  const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0] ?? "";
  // user nice system idle iowait irq softirq steal (guest time is counted in user already).
  const fields = line.trim().split(/\s+/).slice(1, 9).map(Number);
  return { total: fields.reduce((a, b) => a + b, 0), steal: fields[7] ?? 0 };
}

/**
 * Starts counting the share of this machine's CPU time its hypervisor took for other guests; the function returned
 * reads it. On a shared VM that share moves timings between runs more than most changes do, so runs show it.
 */
export function stolenShare(): () => number {
  const start = machineTicks();
  return () => {
    const now = machineTicks();
    const total = now.total - start.total;
    return total > 0 ? (now.steal - start.steal) / total : 0;
  };
}

/**
 * BENCH_CPU_PROF=<dir>: the environment that has a Bun service write its CPU profile (`<name>-<bench pid>-<ms>.cpuprofile`,
 * Chrome's format) into <dir> when it exits; bench/profile-summary.ts reads it. Empty when the variable is unset.
 */
export function cpuProfileEnv(name: string, dir = process.env.BENCH_CPU_PROF): Record<string, string> {
  if (!dir) return {};
  return { BUN_OPTIONS: `--cpu-prof --cpu-prof-dir=${resolve(dir)} --cpu-prof-name=${name}-${process.pid}-${Date.now()}.cpuprofile` };
}
