/**
 * What the gateway adds to a request, with full accounting on: a fast fake upstream in its own
 * process, the whole mesh (billing on embedded Postgres, analytics on chdb) with a model routed to
 * it, and autocannon at fixed rates and at saturation, straight to the upstream and through the
 * gateway, whole and streamed. Prints a table and exits. Only 127.0.0.1 is contacted.
 *
 *   ./node_modules/.bin/bun bench/gateway.ts        (BENCH_SECONDS=10 per run, BENCH_CONNECTIONS=50, BENCH_REPEAT=1)
 *
 * This machine's timing varies from run to run by more than the differences worth knowing: BENCH_REPEAT=3 runs
 * every row three times (direct and gateway alternating) and prints medians, with the added latency's spread.
 *
 * BENCH_RATES=200,1000 replaces the fixed rates (500, 1000, 2000; 0 is saturation); BENCH_ONLY=whole:1000,stream:max
 * runs just those rows. Before any row, each gateway path is warmed at saturation for BENCH_WARMUP_SECONDS (20; half
 * that streamed), and measuring waits until the warm-up's metrics are ingested. BENCH_GATEWAY_ENV="NAME=value ..."
 * adds to the gateway's environment (BUN_JSC_logGC=1, say; what the runtime prints is shown on stderr); BENCH_CPU_PROF=<dir>
 * has the gateway write a CPU profile into <dir> (see bench/profile-summary.ts). BENCH_GATEWAY_MEMORY_MB=128 paces the gateway's garbage collector to that much memory, as a
 * container's memory limit does (Bun reads the cgroup's); unset, it is paced to this machine's memory. "CPU/req" is what each process used per request during
 * the gateway's run (gateway, billing with its Postgres, analytics, the fake upstream, and this process, which
 * generates the load; from /proc), in microseconds, and "direct CPU/req" the same for the direct run (upstream and
 * load generator); "gw ceiling" is what this machine's cores could carry at the gateway run's total CPU per
 * request, whatever the scheduling; "ratio bound, gw free" the highest ratio these cores would allow if the gateway
 * itself used no CPU (the direct run's CPU per request against the rest of the gateway run's: accounting in billing,
 * its Postgres and analytics, the upstream and the load generator); "bare proxy" the same load sent through
 * bench/bare-proxy.ts after the gateway's run (Bun's server and fetch in front of the upstream, doing nothing else), so
 * that what the runtime itself adds is measured in the same run as what the gateway adds; "gw RSS" the gateway's peak resident memory during
 * that run; "gw's own overhead" the gateway's own measure of what it added (its gateway_overhead_seconds histogram:
 * arrival to answer less the time waiting on the upstream, so neither network hop nor the wait for a core to run on),
 * as the bucket bound under which half and 99% of the run's requests fell, in ms; "loop delay" how
 * late the gateway's event loop ran its timers during its run (prom-client's 100 ms sampling: the max catches stalls)
 * and the same for this process at 1 ms resolution, since a late load generator adds to every latency it measures;
 * "stolen" the share
 * of this machine's CPU time its hypervisor gave other guests during the row's runs (/proc/stat), which moves
 * latencies between runs more than most changes do. Past its capacity an open-loop rate queues requests in the
 * gateway, so rows beyond it show latency and memory growing with the backlog.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { tmpdir } from "node:os";
import * as path from "node:path";
import autocannon from "autocannon";
import type { Mesh } from "../scripts/mesh.ts";
import { benchGatewayEnv, percentile, spoolDrained, startBenchMesh, startUpstream } from "./gateway-bench.ts";
import { ceilingPerSecond, cpuProfileEnv, cpuSeconds, rssMb, stolenShare } from "./proc-stats.ts";

const seconds = Number(process.env.BENCH_SECONDS ?? 10);
const connections = Number(process.env.BENCH_CONNECTIONS ?? 50);
const repeat = Math.max(1, Number(process.env.BENCH_REPEAT ?? 1));
// 0: as fast as it goes.
const rates = process.env.BENCH_RATES?.split(",").map(Number) ?? [500, 1000, 2000, 0];
const only = process.env.BENCH_ONLY?.split(",").map((s) => s.trim());
const gatewayMemoryMb = Number(process.env.BENCH_GATEWAY_MEMORY_MB ?? 0);
// Seconds of saturating load on each gateway path (whole, then half as long streamed) before any row is measured.
const warmupSeconds = Number(process.env.BENCH_WARMUP_SECONDS ?? 20);
const root = path.resolve(import.meta.dir, "..");

interface Run {
  p50: number;
  p99: number;
  /** Time to the first content token (streams only). */
  ttft50: number;
  ttft99: number;
  rps: number;
  errors: number;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

const decoder = new TextDecoder();
const firstContent = /"content":"[^"]/;

/**
 * Requests at a fixed rate, spread evenly over each millisecond (open loop: a slow answer does not
 * delay the next request). autocannon's own rate limit sends each connection's quota for a second
 * back to back, which measures bursts rather than a rate.
 */
async function paced(url: string, headers: Record<string, string>, body: string, rate: number, duration: number): Promise<Run> {
  const latencies: number[] = [];
  const ttfts: number[] = [];
  let errors = 0;
  const inflight = new Set<Promise<void>>();
  const one = async () => {
    const start = performance.now();
    try {
      const res = await fetch(url, { method: "POST", headers, body });
      const reader = (res.body as ReadableStream<Uint8Array>).getReader();
      let text = "";
      let ttft = Number.NaN;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (Number.isNaN(ttft)) {
          text += decoder.decode(value);
          if (firstContent.test(text)) ttft = performance.now() - start;
        }
      }
      if (res.status !== 200) errors++;
      else {
        latencies.push(performance.now() - start);
        if (!Number.isNaN(ttft)) ttfts.push(ttft);
      }
    } catch {
      errors++;
    }
  };
  const interval = 1000 / rate;
  const begin = performance.now();
  const end = begin + duration * 1000;
  let next = begin;
  let sent = 0;
  for (let now = begin; now < end; now = performance.now()) {
    while (next <= now) {
      const p = one();
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
      next += interval;
      sent++;
    }
    await Bun.sleep(1);
  }
  await Promise.all(inflight);
  return {
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    ttft50: percentile(ttfts, 50),
    ttft99: percentile(ttfts, 99),
    rps: sent / duration,
    errors,
  };
}

/** As many requests as `connections` keep-alive connections carry (closed loop). */
async function saturate(url: string, headers: Record<string, string>, body: string, duration: number): Promise<Run> {
  const result = await autocannon({ url, method: "POST", headers, body, connections, duration });
  return {
    p50: result.latency.p50,
    p99: result.latency.p99,
    ttft50: Number.NaN,
    ttft99: Number.NaN,
    rps: result.requests.total / duration,
    errors: result.errors + result.timeouts + result.non2xx,
  };
}

const fmt = (ms: number) => (Number.isNaN(ms) ? "-" : ms.toFixed(3));
const fmtRate = (n: number) => Math.round(n).toLocaleString("en-US");

async function main() {
  const dataDir = await mkdtemp(path.join(tmpdir(), "bench-gateway-"));
  const upstream = await startUpstream([process.execPath, path.join(root, "gateway/testing/fake-upstream.ts"), "0"]);
  const bareProxy = await startUpstream([process.execPath, path.join(root, "bench/bare-proxy.ts"), upstream.url]);
  const errors: string[] = [];
  let mesh: Mesh | undefined;
  try {
    const started = await startBenchMesh({
      dataDir,
      upstreamUrl: upstream.url,
      gatewayEnv: {
        ...(gatewayMemoryMb > 0 ? { BUN_JSC_forceRAMSize: String(gatewayMemoryMb * 1048576) } : {}),
        ...cpuProfileEnv("gateway"),
        ...benchGatewayEnv(),
      },
      onLine: (service, line) => {
        if (line.includes('"level":"error"')) errors.push(`[${service}] ${line}`);
        // What the runtime itself prints (BUN_JSC_logGC=1's lines, say) is not a log record: shown as it comes.
        if (service === "gateway" && !line.startsWith("{")) process.stderr.write(`[gateway] ${line}\n`);
      },
    });
    mesh = started.mesh;
    const demo = started.demo;
    const gatewayPid = mesh.processes.gateway.proc.pid;
    let peakRss = 0;
    // Peak over the whole benchmark, and over the current gateway run (reset before each).
    let runPeakRss = 0;
    const sampler = setInterval(() => {
      const rss = rssMb(gatewayPid);
      peakRss = Math.max(peakRss, rss);
      runPeakRss = Math.max(runPeakRss, rss);
    }, 100);

    const messages = [{ role: "user", content: "hello benchmark" }];
    const bodyFor = (model: string, stream: boolean) =>
      JSON.stringify({ model, messages, max_tokens: 16, ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}) });
    const json = { "content-type": "application/json" };
    const auth = { ...json, authorization: `Bearer ${demo.apiKey}` };
    const direct = { name: "direct", url: `${upstream.url}/chat/completions`, headers: json, model: "bench-model" };
    // What Bun's server and fetch add with nothing else to do (bench/bare-proxy.ts), in the same run.
    const bare = { name: "bare proxy", url: `${bareProxy.url}/chat/completions`, headers: json, model: "bench-model" };
    const fast = { name: "gateway", url: `${demo.baseUrl}/chat/completions`, headers: auth, model: "bench" };
    // The same REST API on the port it shares with the RPCs (node:http), for comparison.
    const shared = { name: "gateway (rpc port)", url: `${mesh.urls.gateway}/v1/chat/completions`, headers: auth, model: "bench" };
    type Target = typeof direct;
    const run = (t: Target, stream: boolean, rate: number, duration = seconds) =>
      rate > 0 ? paced(t.url, t.headers, bodyFor(t.model, stream), rate, duration) : saturate(t.url, t.headers, bodyFor(t.model, stream), duration);

    const labelOf = (stream: boolean, rate: number, via: Target) =>
      `${stream ? "stream" : "whole"}${via === shared ? "-rpc-port" : ""}:${rate > 0 ? rate : "max"}`;
    const plan: Array<[stream: boolean, rate: number, via: Target]> = [];
    for (const stream of [false, true]) for (const rate of rates) plan.push([stream, rate, fast]);
    plan.push([false, 1000, shared]);
    const planned = (via: Target) => plan.some(([stream, rate, t]) => t === via && (!only || only.includes(labelOf(stream, rate, t))));

    // Warm every path (JIT, connection pools, the key cache, budget leases) before measuring. The engine keeps
    // compiling a path's functions into faster tiers for tens of thousands of requests, on threads that take a core
    // for milliseconds at a time: measured sooner, a run's p99 is the compiler's rather than a running gateway's.
    const warm = (t: Target) => (t === direct || t === bare ? 2 : t === shared && !planned(shared) ? 1 : warmupSeconds);
    for (const t of [direct, bare, fast, shared]) {
      await run(t, false, 0, warm(t));
      await run(t, true, 0, Math.max(1, warm(t) / 2));
    }
    // The warm-up's metrics, sent faster than any measured row sends them, are ingested before measuring starts.
    await spoolDrained(mesh.urls.gateway);

    const rows: string[][] = [];
    // Billing's CPU includes its Postgres server's processes; the load generator is this process.
    const pids = [...(["gateway", "billing", "analytics"] as const).map((name) => mesh?.processes[name].proc.pid ?? 0), upstream.proc.pid];
    const cpuNow = () => {
      const own = process.cpuUsage();
      return [...pids.map((pid) => cpuSeconds(pid, { tree: true })), (own.user + own.system) / 1e6];
    };
    /** One direct run and one gateway run of a plan row, as numbers. */
    /** The gateway's event-loop delay since the last scrape (each scrape restarts prom-client's histogram), in ms. */
    const gatewayLoopDelay = async () => {
      const text = await (await fetch(`${mesh?.urls.gateway}/metrics`)).text();
      const ms = (name: string) => 1000 * Number(new RegExp(`^${name}\\{[^}]*\\} (\\S+)$`, "m").exec(text)?.[1] ?? Number.NaN);
      // The gateway's own count of what it added (gateway_overhead_seconds): requests per bucket bound, cumulative.
      const overhead = new Map<number, number>();
      for (const [, le, count] of text.matchAll(/^gateway_overhead_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$/gm)) {
        const bound = le === "+Inf" ? Number.POSITIVE_INFINITY : Number(le);
        overhead.set(bound, (overhead.get(bound) ?? 0) + Number(count));
      }
      return { p99: ms("nodejs_eventloop_lag_p99_seconds"), max: ms("nodejs_eventloop_lag_max_seconds"), overhead };
    };
    /** The bucket bound (ms) under which `p` percent of a run's requests fall, by the gateway's own histogram. */
    const overheadBound = (before: Map<number, number>, after: Map<number, number>, p: number) => {
      const bounds = [...after.keys()].sort((a, b) => a - b);
      const total = (after.get(Number.POSITIVE_INFINITY) ?? 0) - (before.get(Number.POSITIVE_INFINITY) ?? 0);
      const bound = bounds.find((b) => (after.get(b) ?? 0) - (before.get(b) ?? 0) >= (p / 100) * total);
      return total > 0 && bound !== undefined ? bound * 1000 : Number.NaN;
    };
    const measure = async (stream: boolean, rate: number, via: Target) => {
      const directBefore = cpuNow();
      const stolen = stolenShare();
      const base = await run(direct, stream, rate);
      // Only the fake upstream and the load generator work in a direct run.
      const directUs = cpuNow()
        .map((now, i) => ((now - (directBefore[i] ?? 0)) / Math.max(1, base.rps * seconds)) * 1e6)
        .slice(3)
        .reduce((a, b) => a + b, 0);
      const cpuBefore = cpuNow();
      runPeakRss = 0;
      const scrapeBefore = await gatewayLoopDelay();
      // This process's own delay: a late load generator adds to every latency it measures.
      const ownDelay = monitorEventLoopDelay({ resolution: 1 });
      ownDelay.enable();
      const gw = await run(via, stream, rate);
      ownDelay.disable();
      const perRequest = cpuNow().map((now, i) => ((now - (cpuBefore[i] ?? 0)) / Math.max(1, gw.rps * seconds)) * 1e6);
      const scrape = await gatewayLoopDelay();
      const delay = { gateway: scrape, loadGen: { p99: ownDelay.percentile(99) / 1e6, max: ownDelay.max / 1e6 } };
      const own = [50, 99].map((p) => overheadBound(scrapeBefore.overhead, scrape.overhead, p));
      const bareRun = await run(bare, stream, rate);
      return { base, gw, bare: bareRun, directUs, perRequest, rss: runPeakRss, stolen: stolen(), delay, own };
    };
    for (const [stream, rate, via] of plan) {
      const label = labelOf(stream, rate, via);
      if (only && !only.includes(label)) continue;
      const runs: Awaited<ReturnType<typeof measure>>[] = [];
      for (let i = 0; i < repeat; i++) {
        runs.push(await measure(stream, rate, via));
        if (repeat > 1) process.stderr.write(`${label} run ${i + 1}/${repeat}\n`);
      }
      // The median of each figure over the repeats; the added latencies also show their spread.
      const med = (pick: (r: (typeof runs)[number]) => number) => median(runs.map(pick));
      const spread = (pick: (r: (typeof runs)[number]) => number) => {
        const values = runs.map(pick);
        return repeat > 1 ? ` (${fmt(Math.min(...values))}–${fmt(Math.max(...values))})` : "";
      };
      const added50 = (r: (typeof runs)[number]) => r.gw.p50 - r.base.p50;
      const added99 = (r: (typeof runs)[number]) => r.gw.p99 - r.base.p99;
      const perRequest = [0, 1, 2, 3, 4].map((i) => med((r) => r.perRequest[i] ?? 0));
      rows.push([
        `${stream ? "stream" : "whole"}${via === shared ? " (rpc port)" : ""}`,
        rate > 0 ? String(rate) : "max",
        fmt(med((r) => r.base.p50)),
        fmt(med((r) => r.gw.p50)),
        `${fmt(med(added50))}${spread(added50)}`,
        fmt(med((r) => r.base.p99)),
        fmt(med((r) => r.gw.p99)),
        `${fmt(med(added99))}${spread(added99)}`,
        `${fmt(med((r) => r.bare.p50 - r.base.p50))} / ${fmt(med((r) => r.bare.p99 - r.base.p99))}`,
        `≤${med((r) => r.own[0] ?? Number.NaN)} / ≤${med((r) => r.own[1] ?? Number.NaN)}`,
        stream && rate > 0
          ? `${fmt(med((r) => r.gw.ttft50 - r.base.ttft50))} / ${fmt(med((r) => r.gw.ttft99 - r.base.ttft99))}`
          : "",
        med((r) => r.base.rps).toFixed(0),
        med((r) => r.gw.rps).toFixed(0),
        rate > 0 ? "" : med((r) => r.gw.rps / r.base.rps).toFixed(2),
        rate > 0 ? "" : med((r) => r.bare.rps / r.base.rps).toFixed(2),
        // The ratio's bound on this machine's cores if the gateway's own CPU were zero: the direct run's CPU per
        // request against what the rest of the gateway run (accounting, upstream, load generator) used.
        rate > 0 ? "" : med((r) => r.directUs / r.perRequest.slice(1).reduce((a, b) => a + b, 0)).toFixed(2),
        String(runs.reduce((n, r) => n + r.base.errors + r.gw.errors + r.bare.errors, 0)),
        med((r) => r.directUs).toFixed(0),
        perRequest.map((us) => us.toFixed(0)).join(" / "),
        fmtRate(med((r) => ceilingPerSecond(r.perRequest.reduce((a, b) => a + b, 0)))),
        Math.max(...runs.map((r) => r.rss)).toFixed(0),
        `${fmt(med((r) => r.delay.gateway.p99))} / ${fmt(med((r) => r.delay.gateway.max))} · ${fmt(med((r) => r.delay.loadGen.p99))} / ${fmt(med((r) => r.delay.loadGen.max))}`,
        `${(100 * med((r) => r.stolen)).toFixed(1)}${repeat > 1 ? ` (${runs.map((r) => (100 * r.stolen).toFixed(1)).join(", ")})` : ""}`,
      ]);
      process.stderr.write(`${rows.at(-1)?.join("  ")}\n`);
    }
    clearInterval(sampler);

    const header = ["mode", "req/s", "direct p50", "gw p50", "added p50", "direct p99", "gw p99", "added p99", "bare proxy added p50 / p99", "gw's own overhead p50 / p99", "TTFT added p50/p99", "direct rps", "gw rps", "ratio", "bare proxy ratio", "ratio bound, gw free", "errors", "direct CPU/req µs", "gw CPU/req µs: gw / billing+pg / analytics / upstream / load gen", "gw ceiling req/s", "gw RSS MB", "loop delay p99 / max: gw · load gen", "stolen %"];
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
    const line = (cells: string[]) => `| ${cells.map((c, i) => c.padStart(widths[i] ?? 0)).join(" | ")} |`;
    const out = [
      `gateway benchmark: ${seconds} s per run${repeat > 1 ? `, each row the median of ${repeat} runs (added latency: median (min–max)); gw RSS the peak of all` : ""}; fixed rates paced evenly (open loop), "max" by autocannon with ${connections} connections; ms`,
      line(header),
      line(widths.map((w) => "-".repeat(w))),
      ...rows.map(line),
      `gateway peak RSS: ${peakRss.toFixed(1)} MB${gatewayMemoryMb > 0 ? ` (garbage collector paced to ${gatewayMemoryMb} MiB)` : ""}`,
      ...(errors.length ? [`service errors logged: ${errors.length}`, ...errors.slice(0, 5)] : []),
    ];
    process.stdout.write(`${out.join("\n")}\n`);
  } finally {
    await mesh?.stop();
    bareProxy.proc.kill();
    upstream.proc.kill();
    await Promise.all([bareProxy.proc.exited, upstream.proc.exited]);
    await rm(dataDir, { recursive: true, force: true });
  }
}

await main();
process.exit(0);
