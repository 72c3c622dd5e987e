/**
 * Where the gateway's slow requests wait. Whole chat completions at a fixed rate, straight to a fake upstream and
 * then through the gateway with full accounting (billing on embedded Postgres, analytics on chdb), each request
 * numbered in its message; the upstream (this file run with --upstream, in its own process) notes when it received
 * and answered each number. Prints, per request:
 *   in        from the load generator's send to the upstream's receipt: both hops, the gateway's work before its
 *             upstream call, and any wait for a core or for a collection to end;
 *   upstream  the upstream's own time;
 *   out       from the upstream's answer to the load generator's receipt.
 * The same load then goes through a bare Bun proxy (bare-proxy.ts: Bun's server and fetch, nothing else), for what the
 * runtime alone adds in the same run. Then the share of requests slower than the direct run's p99 plus 2 ms (a p99
 * target of 2 ms added allows 1%), and the gateway's slow requests' bursts: when, how many, the worst, and how its
 * time split. With BUN_JSC_logGC=1 in BENCH_GATEWAY_ENV it also counts the gateway's collections, their pauses, and
 * the slow requests that overlapped one (a collection's log line is timed when it arrives, so within a millisecond or
 * so).
 *
 *   ./node_modules/.bin/bun bench/gateway-tail.ts   (BENCH_RATE=1000, BENCH_SECONDS=10, BENCH_WARMUP_SECONDS=40)
 *
 * The warm-up runs at the measured rate, so the engine has compiled the gateway's paths before measuring.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { benchGatewayEnv, percentile, spoolDrained, startBenchMesh, startUpstream } from "./gateway-bench.ts";

const rate = Number(process.env.BENCH_RATE ?? 1000);
const seconds = Number(process.env.BENCH_SECONDS ?? 10);
const warmupSeconds = Number(process.env.BENCH_WARMUP_SECONDS ?? 40);
/** What a request may take beyond the direct run's p99 before it counts as slow, in ms. */
const allowanceMs = 2;

/** Wall-clock milliseconds with a microsecond's resolution, comparable between processes on this machine. */
const now = () => performance.timeOrigin + performance.now();

/** The upstream: answers every chat completion at once and notes [number, received, answered] for each. */
function serveUpstream() {
  const seen: number[][] = [];
  const answer = JSON.stringify({
    id: "chatcmpl-tail",
    object: "chat.completion",
    created: 1,
    model: "bench-model",
    choices: [{ index: 0, message: { role: "assistant", content: "noted" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 },
  });
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      const received = now();
      if (req.method === "GET") return Response.json(seen.splice(0));
      const body = (await req.json()) as { messages: Array<{ content: string }> };
      const number = Number(body.messages.at(-1)?.content.slice(1));
      const res = new Response(answer, { headers: { "content-type": "application/json" } });
      seen.push([number, received, now()]);
      return res;
    },
  });
  process.stdout.write(`http://127.0.0.1:${server.port}\n`);
}

interface Timed {
  number: number;
  sent: number;
  total: number;
  in: number;
  upstream: number;
  out: number;
}

let lastNumber = 0;

/** Requests at `rate` a second, spread evenly (open loop), each numbered; when each was sent and answered. */
async function paced(url: string, headers: Record<string, string>, model: string, duration: number) {
  const sent = new Map<number, [sent: number, answered: number]>();
  const inflight = new Set<Promise<void>>();
  let failed = 0;
  const one = async () => {
    const number = ++lastNumber;
    const body = JSON.stringify({ model, messages: [{ role: "user", content: `#${number}` }], max_tokens: 16 });
    const start = now();
    const res = await fetch(url, { method: "POST", headers, body });
    await res.arrayBuffer();
    if (res.status === 200) sent.set(number, [start, now()]);
    else failed++;
  };
  const interval = 1000 / rate;
  const begin = performance.now();
  let next = begin;
  for (let t = begin; t < begin + duration * 1000; t = performance.now()) {
    while (next <= t) {
      const p = one().catch(() => {
        failed++;
      });
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
      next += interval;
    }
    await Bun.sleep(1);
  }
  await Promise.all(inflight);
  return { sent, failed };
}

/** Joins the load generator's times with the upstream's notes. */
async function timed(upstreamUrl: string, sent: Map<number, [number, number]>): Promise<Timed[]> {
  const notes = (await (await fetch(upstreamUrl)).json()) as number[][];
  const rows: Timed[] = [];
  for (const [number, received, answered] of notes as Array<[number, number, number]>) {
    const times = sent.get(number);
    if (!times) continue;
    const [start, end] = times;
    rows.push({ number, sent: start, total: end - start, in: received - start, upstream: answered - received, out: end - answered });
  }
  return rows.sort((a, b) => a.sent - b.sent);
}

const ms = (value: number) => value.toFixed(2);

function summary(name: string, rows: Timed[]): string {
  const part = (pick: (r: Timed) => number) => {
    const values = rows.map(pick);
    return `${ms(percentile(values, 50))} / ${ms(percentile(values, 99))}`;
  };
  return `${name.padEnd(8)} ${String(rows.length).padStart(6)}  total ${part((r) => r.total)}  in ${part((r) => r.in)}  upstream ${part((r) => r.upstream)}  out ${part((r) => r.out)}`;
}

async function main() {
  const dataDir = await mkdtemp(path.join(tmpdir(), "bench-tail-"));
  const upstream = await startUpstream([process.execPath, import.meta.path, "--upstream"]);
  const bareProxy = await startUpstream([process.execPath, path.join(import.meta.dir, "bare-proxy.ts"), upstream.url]);
  // The gateway's collections, from BUN_JSC_logGC=1's lines: when each line arrived, and the pause it reports.
  const collections: Array<[at: number, pauseMs: number]> = [];
  try {
    const { mesh, demo } = await startBenchMesh({
      dataDir,
      upstreamUrl: upstream.url,
      gatewayEnv: benchGatewayEnv(),
      onLine: (service, line) => {
        const pause = service === "gateway" ? /\bp=([\d.]+)ms/.exec(line) : null;
        if (pause) collections.push([now(), Number(pause[1])]);
      },
    });
    try {
      const direct = { url: `${upstream.url}/chat/completions`, headers: { "content-type": "application/json" }, model: "bench-model" };
      const gateway = { url: `${demo.baseUrl}/chat/completions`, headers: { ...direct.headers, authorization: `Bearer ${demo.apiKey}` }, model: "bench" };
      const bare = { ...direct, url: `${bareProxy.url}/chat/completions` };
      await paced(direct.url, direct.headers, direct.model, 2);
      await paced(bare.url, bare.headers, bare.model, 2);
      await paced(gateway.url, gateway.headers, gateway.model, warmupSeconds);
      await spoolDrained(mesh.urls.gateway);
      await fetch(upstream.url);

      const base = await paced(direct.url, direct.headers, direct.model, seconds);
      const directRows = await timed(upstream.url, base.sent);
      collections.length = 0;
      const through = await paced(gateway.url, gateway.headers, gateway.model, seconds);
      const gatewayRows = await timed(upstream.url, through.sent);
      const bareRun = await paced(bare.url, bare.headers, bare.model, seconds);
      const bareRows = await timed(upstream.url, bareRun.sent);

      const slowAfter = percentile(directRows.map((r) => r.total), 99) + allowanceMs;
      const slow = gatewayRows.filter((r) => r.total > slowAfter);
      const share = (rows: Timed[]) => `${((100 * rows.filter((r) => r.total > slowAfter).length) / rows.length).toFixed(2)}%`;
      const begin = gatewayRows[0]?.sent ?? 0;
      console.log(`gateway tail: ${rate} requests/s for ${seconds} s, after ${warmupSeconds} s of warm-up; p50 / p99 in ms`);
      console.log(summary("direct", directRows));
      console.log(summary("gateway", gatewayRows));
      console.log(summary("bare", bareRows));
      console.log(`failed: direct ${base.failed}, gateway ${through.failed}, bare proxy ${bareRun.failed}`);
      console.log(
        `slower than the direct p99 + ${allowanceMs} ms (${ms(slowAfter)} ms): direct ${share(directRows)}, gateway ${share(gatewayRows)}, bare proxy ${share(bareRows)}`,
      );
      // Slow requests less than 30 ms apart belong to one burst.
      const bursts: Timed[][] = [];
      for (const r of slow) {
        const last = bursts.at(-1);
        if (last && r.sent - (last.at(-1) as Timed).sent < 30) last.push(r);
        else bursts.push([r]);
      }
      console.log(`bursts of slow requests: ${bursts.length} (at ms into the run: count, worst = in + upstream + out)`);
      console.log(
        bursts
          .map((burst) => {
            const worst = burst.reduce((a, b) => (b.total > a.total ? b : a));
            return `${Math.round((burst[0] as Timed).sent - begin)}: ${burst.length}, ${ms(worst.total)} = ${ms(worst.in)} + ${ms(worst.upstream)} + ${ms(worst.out)}`;
          })
          .join("   "),
      );
      if (collections.length > 0) {
        const pauses = collections.map(([, pause]) => pause);
        const during = slow.filter((r) => collections.some(([at, pause]) => at - pause - 1 <= r.sent + r.total && at + 1 >= r.sent));
        console.log(
          `gateway collections: ${collections.length}, pauses ${ms(Math.min(...pauses))}-${ms(Math.max(...pauses))} ms (mean ${ms(pauses.reduce((a, b) => a + b, 0) / pauses.length)}); slow requests during one: ${during.length} of ${slow.length}`,
        );
      }
    } finally {
      await mesh.stop();
    }
  } finally {
    bareProxy.proc.kill();
    upstream.proc.kill();
    await rm(dataDir, { recursive: true, force: true });
  }
  process.exit(0);
}

if (process.argv.includes("--upstream")) serveUpstream();
else await main();
