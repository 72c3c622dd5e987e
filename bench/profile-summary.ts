/**
 * What a service spent its JavaScript time on, from a CPU profile written under BENCH_CPU_PROF (Chrome's
 * .cpuprofile format): samples per function, self and inclusive, within a time window of the profile.
 *
 *   ./node_modules/.bin/bun bench/profile-summary.ts <file.cpuprofile> [from-second] [to-second] [rows]
 *
 * The profiler samples only while JavaScript runs, so sample counts, not the time between samples, measure where
 * it went: an idle stretch is charged to whichever function the next sample lands in. Without a window the summary
 * starts with samples per second of the profile, to find the window of a benchmark's run.
 */
import { readFileSync } from "node:fs";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  samples: number[];
  timeDeltas: number[];
}

const [file, from, to, rowsArg] = process.argv.slice(2);
if (!file) {
  process.stderr.write("usage: bun bench/profile-summary.ts <file.cpuprofile> [from-second] [to-second] [rows]\n");
  process.exit(2);
}
const profile = JSON.parse(readFileSync(file, "utf8")) as Profile;
const rows = Number(rowsArg ?? 40);
const root = `${process.cwd()}/`;
const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of profile.nodes) for (const child of n.children ?? []) parent.set(child, n.id);
const label = ({ callFrame: f }: ProfileNode) =>
  `${f.functionName || "(anonymous)"} ${f.url.replace(/^file:\/\//, "").replace(root, "")}${f.url ? `:${f.lineNumber + 1}` : ""}`;

// Seconds since the profile began, per sample.
let clock = profile.startTime;
const seconds = profile.timeDeltas.map((delta) => {
  clock += delta;
  return (clock - profile.startTime) / 1e6;
});

if (from === undefined) {
  const perSecond = new Map<number, number>();
  for (const s of seconds) perSecond.set(Math.floor(s), (perSecond.get(Math.floor(s)) ?? 0) + 1);
  process.stdout.write(`samples per second: ${[...perSecond].map(([s, n]) => `${s}s ${n}`).join(", ")}\n`);
}
const start = Number(from ?? 0);
const end = Number(to ?? Number.POSITIVE_INFINITY);
const self = new Map<string, number>();
const inclusive = new Map<string, number>();
let total = 0;
profile.samples.forEach((id, i) => {
  const at = seconds[i] as number;
  if (at < start || at > end) return;
  total++;
  const leaf = nodes.get(id);
  if (!leaf) return;
  self.set(label(leaf), (self.get(label(leaf)) ?? 0) + 1);
  const counted = new Set<string>();
  for (let node: ProfileNode | undefined = leaf; node; node = nodes.get(parent.get(node.id) ?? -1)) {
    const name = label(node);
    if (counted.has(name)) continue;
    counted.add(name);
    inclusive.set(name, (inclusive.get(name) ?? 0) + 1);
  }
});
const table = (title: string, counts: Map<string, number>) => {
  process.stdout.write(`\n${title}\n`);
  for (const [name, n] of [...counts].sort((a, b) => b[1] - a[1]).slice(0, rows)) {
    process.stdout.write(`${((100 * n) / total).toFixed(1).padStart(5)}%  ${name}\n`);
  }
};
process.stdout.write(`${total} samples from ${start} s to ${Number.isFinite(end) ? `${end} s` : "the end"}\n`);
table("self", self);
table("inclusive (the function and what it called)", inclusive);
