import { Counter, Gauge, type Registry } from "prom-client";
import type { WriteStalls } from "../lib/server.ts";

/**
 * A bound on the streams a replica holds stalled at once, on all its ports: a stream is stalled while a write to its
 * client has waited longer than `stalledAfterMs`, and costs about 10 MB (the gateway's buffers and the kernel's socket
 * buffers, which count against a pod's memory) until its idle limit cuts it. Past the bound the one stalled longest is
 * cut at once, as that limit would cut it, so clients that stop reading cannot take a replica past its memory limit.
 * Only writes that wait are seen: a stream whose client keeps up costs nothing here.
 */
export interface StalledStreams extends WriteStalls {
  readonly max: number;
  /** How many are stalled now. */
  readonly stalled: number;
}

interface Wait {
  since: number;
  cut: () => void;
}

/** How long a write waits before its stream counts as stalled. */
export const defaultStalledAfterMs = 2_000;

export function createStalledStreams(options: {
  max: number;
  stalledAfterMs?: number;
  registry?: Registry;
}): StalledStreams {
  const { max } = options;
  const afterMs = options.stalledAfterMs ?? defaultStalledAfterMs;
  // In the order their writes began waiting, the longest waiting first (a Set iterates in insertion order).
  const waits = new Set<Wait>();
  const cuts = options.registry
    ? new Counter({
        name: "gateway_stalled_streams_cut_total",
        help: "Streams cut because more than gateway_stalled_streams_limit were stalled at once (the longest stalled).",
        registers: [options.registry],
      })
    : undefined;
  const stalledNow = (now: number) => {
    let stalled = 0;
    for (const wait of waits) {
      if (now - wait.since < afterMs) break;
      stalled++;
    }
    return stalled;
  };
  if (options.registry) {
    new Gauge({
      name: "gateway_stalled_streams",
      help: "Streams whose client has taken nothing of a waiting write for a while, counted against the limit.",
      registers: [options.registry],
      collect() {
        this.set(stalledNow(performance.now()));
      },
    });
    new Gauge({
      name: "gateway_stalled_streams_limit",
      help: "Streams that may be stalled at once (GATEWAY_MAX_STALLED_STREAMS).",
      registers: [options.registry],
      collect() {
        this.set(max);
      },
    });
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const arm = (ms: number) => {
    timer = setTimeout(sweep, ms);
    timer.unref?.();
  };
  // Runs as each wait becomes a stall: cuts the longest stalled past the bound, then waits for the next to become one.
  const sweep = () => {
    timer = undefined;
    const now = performance.now();
    const cut: Wait[] = [];
    for (let over = stalledNow(now) - max; over > 0; over--) {
      const [longest] = waits;
      if (longest === undefined) break;
      waits.delete(longest);
      cut.push(longest);
    }
    for (const wait of waits) {
      if (now - wait.since >= afterMs) continue;
      arm(wait.since + afterMs - now);
      break;
    }
    for (const wait of cut) {
      cuts?.inc();
      wait.cut();
    }
  };
  return {
    max,
    get stalled() {
      return stalledNow(performance.now());
    },
    waiting(cut) {
      const wait = { since: performance.now(), cut };
      waits.add(wait);
      if (timer === undefined) arm(afterMs);
      return () => {
        waits.delete(wait);
      };
    },
  };
}
