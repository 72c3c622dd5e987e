import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { RequestMetrics } from "../../gen/analytics/v1/analytics_pb.ts";
import type { ClickHouseDriver, QueryParams } from "./driver.ts";

/** Microseconds since the epoch: exact in a double for any date this schema holds. */
export type Micros = number;

export const minuteUs = 60_000_000;
export const hourUs = 60 * minuteUs;
// Past this many minutes awaiting recomputation in one window, a query reads the raw table alone.
const maxDirtyMinutes = 100;
// Items of a list bound as one query parameter: a statement's parameters go in its request's URL, which a server bounds
// (http_max_uri_size, 1 MiB by default) and a proxy in front of one more tightly (nginx at 8 KB by default): a hundred
// minutes, or marks' keys, bind about 4 KB.
const maxListParam = 100;
/**
 * Raw rows one roll-up statement reads at most, by default: a backlog (roll-ups stopped for hours) is rolled up in
 * chunks of whole minutes, each recorded as it is done, so no statement outlasts the client's request timeout.
 */
export const defaultRollupChunkRows = 1_000_000;
// How far ahead one count of pending rows per minute looks (at most 1,440 rows back).
const chunkPlanUs = 24 * hourUs;

/** [from, to) in microseconds. */
export interface Span {
  from: Micros;
  to: Micros;
}

/** Which table answers which part of a query window. */
export interface SourcePlan {
  hours: Span[];
  minutes: Span[];
  raw: Span[];
}

export function micros(ts: Timestamp | undefined): Micros {
  return Number(ts?.seconds ?? 0n) * 1_000_000 + Math.floor((ts?.nanos ?? 0) / 1000);
}

/** "YYYY-MM-DD hh:mm:ss.ffffff" in UTC, the text of DateTime64(6, 'UTC'). */
export function microsText(us: Micros): string {
  const ms = Math.floor(us / 1000);
  const iso = new Date(ms).toISOString();
  // Floored, so an instant before 1970 has its fraction counted forward from its whole second, as the date part is.
  const fraction = ((us % 1_000_000) + 1_000_000) % 1_000_000;
  return `${iso.slice(0, 10)} ${iso.slice(11, 19)}.${String(fraction).padStart(6, "0")}`;
}

/** Parses DateTime or DateTime64 text in UTC. */
export function textMicros(text: string): Micros {
  const ms = Date.parse(`${text.slice(0, 10)}T${text.slice(11, 19)}Z`);
  if (Number.isNaN(ms)) throw new Error(`not a ClickHouse timestamp: ${JSON.stringify(text)}`);
  return ms * 1000 + Number((text.slice(20, 26) || "0").padEnd(6, "0"));
}

const floorTo = (us: Micros, unit: number) => Math.floor(us / unit) * unit;
const ceilTo = (us: Micros, unit: number) => Math.ceil(us / unit) * unit;

/**
 * Splits [start, end) between the hourly rollup (whole hours, when `hourly`), the minute rollup (whole
 * minutes) and the raw table (partial minutes at the edges, minutes not rolled up yet, minutes awaiting a
 * recomputation). Every instant of the window is read from exactly one source.
 */
export function planSources(options: {
  start: Micros;
  end: Micros;
  /** Every minute before this is rolled up. */
  rolledUntil: Micros;
  /** Starts of rolled-up minutes that late rows reached and that are not recomputed yet. */
  dirtyMinutes: readonly Micros[];
  hourly: boolean;
}): SourcePlan {
  const { start, end } = options;
  const m0 = ceilTo(start, minuteUs);
  const m1 = floorTo(Math.min(end, options.rolledUntil), minuteUs);
  const dirty = [...new Set(options.dirtyMinutes)].filter((m) => m >= m0 && m < m1).sort((a, b) => a - b);
  if (m0 >= m1 || dirty.length > maxDirtyMinutes) return { hours: [], minutes: [], raw: [{ from: start, to: end }] };

  const raw: Span[] = [];
  if (start < m0) raw.push({ from: start, to: m0 });
  for (const m of dirty) raw.push({ from: m, to: m + minuteUs });
  if (m1 < end) raw.push({ from: m1, to: end });

  // Clean minutes, then whole clean hours taken out of them.
  let clean: Span[] = [];
  let at = m0;
  for (const m of dirty) {
    if (at < m) clean.push({ from: at, to: m });
    at = m + minuteUs;
  }
  if (at < m1) clean.push({ from: at, to: m1 });
  const hours: Span[] = [];
  if (options.hourly) {
    for (let h = ceilTo(m0, hourUs); h + hourUs <= m1; h += hourUs) {
      if (clean.some((c) => c.from <= h && c.to >= h + hourUs)) hours.push({ from: h, to: h + hourUs });
    }
    for (const h of hours) {
      clean = clean.flatMap((c) => {
        if (c.to <= h.from || c.from >= h.to) return [c];
        const kept: Span[] = [];
        if (c.from < h.from) kept.push({ from: c.from, to: h.from });
        if (c.to > h.to) kept.push({ from: h.to, to: c.to });
        return kept;
      });
    }
  }
  return { hours: coalesce(hours), minutes: coalesce(clean), raw: coalesce(raw.sort((a, b) => a.from - b.from)) };
}

function coalesce(spans: readonly Span[]): Span[] {
  const out: Span[] = [];
  for (const s of spans) {
    const last = out[out.length - 1];
    if (last && last.to === s.from) last.to = s.to;
    else out.push({ ...s });
  }
  return out;
}

export interface RollupTables {
  requests: string;
  minutes: string;
  hours: string;
  dirty: string;
  state: string;
}

export interface RollupResult {
  /** Every minute before this is rolled up (DateTime text). */
  rolledUntil: string;
  /** Minutes recomputed because late rows reached them. */
  recomputedMinutes: number;
}

/**
 * A mark's identity, as a roll-up deletes the marks it read: 32 hex characters whatever the org id, so a statement
 * deleting maxListParam of them binds about 4 KB, inside the 8 KB of a request URL nginx takes by default in front of a
 * server (the org id, minute and time spelt out, as they were, bound about 10 KB: every run failed there, its marks
 * recomputed again and again and never cleared). 128 bits: no two marks share one.
 */
const markKey = "hex(sipHash128(org_id, minute, marked_at))";
const dims = "org_id, project_id, api_key_id, requested_model, provider, status";
// Over Int128, as the rollups hold them: a sum of Int64 wraps silently.
export const totalsSql = ["input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_nanos"]
  .map((column) => `sum(toInt128(${column})) AS ${column}`)
  .join(", ");
const rollupColumns = (time: string) =>
  `${time}, ${dims}, requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, computed_at`;

/**
 * Rollup upkeep. Minutes older than `lagMs` are rolled up from the raw table (FINAL, so each request once).
 * A row is late when its minute may already be rolled up: before the furthest minute any roll-up has claimed
 * (whatever lag or clock that roll-up ran with), or older than lagMs / 2. Ingest marks late rows' minutes, and
 * the next roll-up recomputes them.
 */
export function createRollups(
  driver: ClickHouseDriver,
  tables: RollupTables,
  lagMs: number,
  chunkRows = defaultRollupChunkRows,
  distributed = false,
) {
  const lagUs = lagMs * 1000;
  // Through a Distributed table an insert returns before remote shards have its rows unless told to wait: the hours
  // would be summed from minutes not there yet, and done_until recorded over rows still queued.
  const waitForShards = distributed ? " SETTINGS distributed_foreground_insert = 1" : "";

  const minutesFromRaw = (where: string) =>
    `INSERT INTO ${tables.minutes} (${rollupColumns("minute")})${waitForShards}
     SELECT toStartOfMinute(start_time) AS minute, ${dims}, count() AS requests, ${totalsSql}, now64(6)
     FROM ${tables.requests} FINAL WHERE ${where}
     GROUP BY minute, ${dims}`;
  const hoursFromMinutes = (where: string) =>
    `INSERT INTO ${tables.hours} (${rollupColumns("hour")})${waitForShards}
     SELECT toStartOfHour(minute) AS hour, ${dims}, sum(requests) AS requests, ${totalsSql}, now64(6)
     FROM ${tables.minutes} FINAL WHERE ${where}
     GROUP BY hour, ${dims}`;

  async function rolledUntil(): Promise<Micros | undefined> {
    const [row] = await driver.query<{ done_until: string }>(
      `SELECT done_until FROM ${tables.state} FINAL WHERE name = 'rollups'`,
    );
    return row ? textMicros(row.done_until) : undefined;
  }

  /**
   * Ends of the chunks that roll up [from, to), in order: whole minutes holding at most `chunkRows` raw rows each
   * (counted with duplicates, so at most that many are read), or one minute that alone holds more. Covers up to a day,
   * or, when that day has no rows, one chunk up to the next row's minute (or `to`): a database whose oldest row is
   * years old (a gateway's clock reset) is not walked day by day. Its chunk still claims, then reads, its minutes, so a
   * row stored there meanwhile is rolled up or marked as any other.
   */
  async function chunkEnds(from: Micros, to: Micros): Promise<Micros[]> {
    const until = Math.min(to, from + chunkPlanUs);
    const counts = await driver.query<{ minute: string; n: string }>(
      `SELECT toString(toStartOfMinute(start_time)) AS minute, count() AS n FROM ${tables.requests}
       WHERE start_time >= {from:DateTime64(6, 'UTC')} AND start_time < {to:DateTime64(6, 'UTC')}
       GROUP BY minute ORDER BY minute`,
      { from: microsText(from), to: microsText(until) },
    );
    if (counts.length === 0 && until < to) {
      const [next] = await driver.query<{ minute: string }>(
        `SELECT toString(toStartOfMinute(min(start_time))) AS minute FROM ${tables.requests}
         WHERE start_time >= {from:DateTime64(6, 'UTC')} AND start_time < {to:DateTime64(6, 'UTC')}
         HAVING count() > 0`,
        { from: microsText(until), to: microsText(to) },
      );
      return [next ? textMicros(next.minute) : to];
    }
    const ends: Micros[] = [];
    let start = from;
    let rows = 0;
    for (const { minute, n } of counts) {
      const at = textMicros(minute);
      if (rows + Number(n) > chunkRows && at > start) {
        ends.push(at);
        start = at;
        rows = 0;
      }
      rows += Number(n);
    }
    ends.push(until);
    return ends;
  }

  return {
    rolledUntil,

    /**
     * Minute marks for rows already inserted that arrived late, to insert after them. A roll-up claims its minutes
     * before it reads the raw table and the claim is read here after the rows are stored, so either that roll-up
     * saw the rows or they are marked. On a cluster the claim is read from a replica that may trail the one a
     * roll-up wrote, and of two replicas rolling up at once the one claiming less may overwrite the other's claim
     * while that one reads: there the lagMs / 2 rule still bounds it, for replicas sharing a lag and a clock.
     */
    async lateMarks(rows: readonly RequestMetrics[], now = Date.now()): Promise<string[][]> {
      // Both the claim and done_until: a database rolled up before claims were written has done_until alone.
      const [row] = await driver.query<{ until: string }>(`SELECT max(done_until) AS until FROM ${tables.state} FINAL`);
      const lateBefore = Math.max(now * 1000 - lagUs / 2, row ? textMicros(row.until) : 0);
      // Each org's late minutes, written as text once each: a backlog resent after an outage is late row after row.
      const minutesByOrg = new Map<string, Set<Micros>>();
      for (const m of rows) {
        const start = micros(m.startTime);
        if (start >= lateBefore) continue;
        let minutes = minutesByOrg.get(m.orgId);
        if (!minutes) minutesByOrg.set(m.orgId, (minutes = new Set()));
        minutes.add(floorTo(start, minuteUs));
      }
      return [...minutesByOrg].flatMap(([orgId, minutes]) =>
        [...minutes].map((minute) => [orgId, microsText(minute).slice(0, 19)]),
      );
    },

    /**
     * Rolled-up whole minutes of an org in [start, end) awaiting recomputation, at most one more than planSources
     * takes: partial minutes at the edges are read raw anyway, and counting them could leave dirty minutes out.
     */
    async dirtyMinutes(orgId: string, start: Micros, end: Micros): Promise<Micros[]> {
      const rows = await driver.query<{ minute: string }>(
        `SELECT DISTINCT minute FROM ${tables.dirty}
         WHERE org_id = {org_id:String} AND minute >= {start:DateTime64(6, 'UTC')} AND minute < {end:DateTime64(6, 'UTC')}
         LIMIT ${maxDirtyMinutes + 1}`,
        { org_id: orgId, start: microsText(ceilTo(start, minuteUs)), end: microsText(floorTo(end, minuteUs)) },
      );
      return rows.map((r) => textMicros(r.minute));
    },

    /**
     * Rolls up the minutes closed since the last run and recomputes the marked ones. Once `signal` aborts (the process
     * stopping), a backlog's next chunk and the next org's marked minutes are not started: they wait for the next run.
     */
    async rollUp(now = new Date(), signal?: AbortSignal): Promise<RollupResult> {
      const target = floorTo(now.getTime() * 1000 - lagUs, minuteUs);
      // Marks are read first: their rows committed before them, so everything below sees those rows.
      const marks = await driver.query<{ org_id: string; minute: string; key: string }>(
        `SELECT org_id, minute, ${markKey} AS key FROM ${tables.dirty} LIMIT 100000`,
      );
      let done = await rolledUntil();
      if (done === undefined) {
        const [first] = await driver.query<{ start: string | null }>(
          `SELECT toString(toStartOfMinute(min(start_time))) AS start FROM ${tables.requests} HAVING count() > 0`,
        );
        // Never past the target: minutes after it may still get rows that are not late, and are read raw until rolled.
        done = first?.start ? Math.min(textMicros(first.start), target) : target;
      }
      const before = done;
      while (done < target && !signal?.aborted) {
        for (const end of await chunkEnds(done, target)) {
          if (signal?.aborted) break;
          // Before the raw rows are read: an insert that does not see this claim is seen by the read.
          await driver.insert(tables.state, ["name", "done_until"], [["claimed", microsText(end).slice(0, 19)]]);
          const window: QueryParams = { from: microsText(done), to: microsText(end) };
          await driver.exec(
            minutesFromRaw("start_time >= {from:DateTime64(6, 'UTC')} AND start_time < {to:DateTime64(6, 'UTC')}"),
            window,
          );
          // Every minute of the hours touched, not only this chunk's: another replica may have rolled up the rest of
          // the last one, and this row, written after its, would otherwise replace its whole hour with a part.
          await driver.exec(
            hoursFromMinutes("minute >= {hour_from:DateTime64(6, 'UTC')} AND minute < {hour_to:DateTime64(6, 'UTC')}"),
            { hour_from: microsText(floorTo(done, hourUs)), hour_to: microsText(ceilTo(end, hourUs)) },
          );
          done = end;
          // Each chunk recorded as done: a run stopped part way resumes after it.
          await driver.insert(tables.state, ["name", "done_until"], [["rollups", microsText(done).slice(0, 19)]]);
        }
      }
      if (done === before) {
        await driver.insert(tables.state, ["name", "done_until"], [["rollups", microsText(done).slice(0, 19)]]);
      }
      if (signal?.aborted) return { rolledUntil: microsText(done).slice(0, 19), recomputedMinutes: 0 };

      // Marked minutes rolled up before this run; later ones were just rolled up with their late rows.
      const byOrg = new Map<string, Micros[]>();
      for (const mark of marks) {
        const minute = textMicros(mark.minute);
        if (minute < before) byOrg.set(mark.org_id, [...(byOrg.get(mark.org_id) ?? []), minute]);
      }
      let recomputed = 0;
      for (const [orgId, list] of byOrg) {
        // Stopping, the marks are left for the next run, which recomputes their minutes.
        if (signal?.aborted) return { rolledUntil: microsText(done).slice(0, 19), recomputedMinutes: recomputed };
        const all = [...new Set(list)].sort((a, b) => a - b);
        recomputed += all.length;
        for (let i = 0; i < all.length; i += maxListParam) {
          const minutes = all.slice(i, i + maxListParam);
          const hours = [...new Set(minutes.map((m) => floorTo(m, hourUs)))];
          const first = minutes[0] as Micros;
          const last = minutes[minutes.length - 1] as Micros;
          await driver.exec(
            minutesFromRaw(`org_id = {org_id:String}
              AND start_time >= {from:DateTime64(6, 'UTC')} AND start_time < {to:DateTime64(6, 'UTC')}
              AND toStartOfMinute(start_time) IN {minutes:Array(DateTime('UTC'))}`),
            {
              org_id: orgId,
              from: microsText(first),
              to: microsText(last + minuteUs),
              minutes: minutes.map((m) => microsText(m).slice(0, 19)),
            },
          );
          await driver.exec(
            hoursFromMinutes(`org_id = {org_id:String}
              AND minute >= {from:DateTime64(6, 'UTC')} AND minute < {to:DateTime64(6, 'UTC')}
              AND toStartOfHour(minute) IN {hours:Array(DateTime('UTC'))}`),
            {
              org_id: orgId,
              from: microsText(hours[0] as Micros),
              to: microsText((hours[hours.length - 1] as Micros) + hourUs),
              hours: hours.map((h) => microsText(h).slice(0, 19)),
            },
          );
        }
      }
      // Only the marks read above: one written meanwhile stays for the next run. Each statement also bounds the
      // org and minute of its marks, so it reads their few granules rather than every mark's hash: by hash alone, a
      // statement took about 1 s with 2M marks waiting, and a run clearing 100,000 of them over a quarter of an hour.
      // Compared by code unit, as ClickHouse compares strings by byte (ids and minutes are ASCII); localeCompare's order
      // could put an id outside its chunk's bounds, and its mark would never be deleted.
      const byUnit = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
      const sorted = [...marks].sort((a, b) => byUnit(a.org_id, b.org_id) || byUnit(a.minute, b.minute));
      for (let i = 0; i < sorted.length; i += maxListParam) {
        const chunk = sorted.slice(i, i + maxListParam);
        const minutes = chunk.map((m) => m.minute).sort();
        await driver.exec(
          `DELETE FROM ${tables.dirty}
           WHERE org_id >= {org_from:String} AND org_id <= {org_to:String}
             AND minute >= {minute_from:DateTime('UTC')} AND minute <= {minute_to:DateTime('UTC')}
             AND ${markKey} IN {keys:Array(String)}`,
          {
            org_from: chunk[0]?.org_id ?? "",
            org_to: chunk[chunk.length - 1]?.org_id ?? "",
            minute_from: minutes[0] ?? "",
            minute_to: minutes[minutes.length - 1] ?? "",
            keys: chunk.map((m) => m.key),
          },
        );
      }
      return { rolledUntil: microsText(done).slice(0, 19), recomputedMinutes: recomputed };
    },
  };
}
