import { createHash } from "node:crypto";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { type Link, trace, type Tracer } from "@opentelemetry/api";
import { Counter, Histogram, type Registry } from "prom-client";
import type {
  IngestMetricsRequest,
  IngestMetricsResponseSchema,
  RequestMetrics,
} from "../gen/analytics/v1/analytics_pb.ts";
import { type BillingService, type UsageRecord, UsageRecordSchema } from "../gen/billing/v1/billing_pb.ts";
import type { Logger } from "../lib/log.ts";
import { finishWith } from "../lib/telemetry.ts";
import type { AnalyticsStore } from "./store/store.ts";

/** Most rows in one IngestMetrics batch, and in one RecordUsage call. */
export const maxBatchRows = 10_000;
// A batch span links to at most this many request spans; more would bloat every exported span.
const maxSpanLinks = 128;

export interface IngestDeps {
  store: AnalyticsStore;
  billing: Client<typeof BillingService>;
  log: Logger;
  /** Where ingest metrics are registered; none in most tests. */
  registry?: Registry;
  tracer?: Tracer;
  /** Aborted when the process stops: each stream finishes the batch in hand, acks it and ends cleanly. */
  stopSignal?: AbortSignal;
}

type Ack = MessageInitShape<typeof IngestMetricsResponseSchema>;

/**
 * Handles one IngestMetrics stream. Batches are processed in order; each is written to ClickHouse, then
 * recorded in billing, and only then acked. Any failure ends the stream with an error and no ack for that
 * batch, so the gateway keeps it in its spool and resends it; request_id makes the resend harmless.
 */
export function createIngest(deps: IngestDeps): (batches: AsyncIterable<IngestMetricsRequest>) => AsyncIterable<Ack> {
  const tracer = deps.tracer ?? trace.getTracer("analytics");
  const registers = deps.registry ? [deps.registry] : [];
  const batchesTotal = new Counter({
    name: "analytics_ingest_batches_total",
    help: "IngestMetrics batches by outcome: acked, rejected (invalid), failed (ClickHouse or billing).",
    labelNames: ["outcome"] as const,
    registers,
  });
  const rowsTotal = new Counter({
    name: "analytics_ingest_rows_total",
    help: "Request rows in acked IngestMetrics batches, resends included.",
    registers,
  });
  const batchSeconds = new Histogram({
    name: "analytics_ingest_batch_seconds",
    help: "Time to write a batch to ClickHouse and record it in billing.",
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers,
  });

  async function processBatch(batch: IngestMetricsRequest): Promise<Ack> {
    const log = deps.log.child({ gateway_instance_id: batch.gatewayInstanceId, sequence: batch.sequence });
    const rows = batch.metrics;
    try {
      validateBatch(batch);
    } catch (e) {
      batchesTotal.inc({ outcome: "rejected" });
      log.warn("rejected an invalid batch", { err: e });
      throw e;
    }
    const stopTimer = batchSeconds.startTimer();
    try {
      await insertRows(rows, log);
      const duplicateRows = await recordUsage(rows, log);
      rowsTotal.inc(rows.length);
      batchesTotal.inc({ outcome: "acked" });
      return { ackedSequence: batch.sequence, duplicateRows };
    } catch (e) {
      batchesTotal.inc({ outcome: "failed" });
      throw e;
    } finally {
      stopTimer();
    }
  }

  async function insertRows(rows: readonly RequestMetrics[], log: Logger): Promise<void> {
    try {
      await deps.store.insertRequests(rows, dedupToken(rows));
    } catch (e) {
      log.error("writing batch to ClickHouse failed", { err: e });
      throw new ConnectError("writing the batch to ClickHouse failed; resend it", Code.Unavailable);
    }
  }

  /** Records the billable rows; returns how many billing already knew. */
  async function recordUsage(rows: readonly RequestMetrics[], log: Logger): Promise<number> {
    const records = rows.filter((m) => m.orgId !== "").map(toUsageRecord);
    let duplicates = 0;
    for (let i = 0; i < records.length; i += maxBatchRows) {
      try {
        const res = await deps.billing.recordUsage({ records: records.slice(i, i + maxBatchRows) });
        duplicates += res.duplicates;
      } catch (e) {
        const err = ConnectError.from(e);
        log.error("recording usage in billing failed", { err, code: Code[err.code] });
        throw new ConnectError(
          `recording usage in billing failed (${Code[err.code]}); resend the batch`,
          Code.Unavailable,
        );
      }
    }
    return duplicates;
  }

  return async function* ingest(batches) {
    const pending = batches[Symbol.asyncIterator]();
    for (;;) {
      const next = await nextUnlessStopped(pending, deps.stopSignal);
      if (!next || next.done) return;
      const batch = next.value;
      const links: Link[] = batch.metrics
        .filter((m) => /^[0-9a-f]{32}$/.test(m.traceId) && /^[0-9a-f]{16}$/.test(m.spanId))
        .slice(0, maxSpanLinks)
        .map((m) => ({ context: { traceId: m.traceId, spanId: m.spanId, traceFlags: 1 } }));
      yield await tracer.startActiveSpan(
        "analytics.ingest_batch",
        {
          links,
          attributes: {
            "mesh.gateway_instance_id": batch.gatewayInstanceId,
            "mesh.batch.sequence": batch.sequence.toString(),
            "mesh.batch.rows": batch.metrics.length,
          },
        },
        (span) => finishWith(span, () => processBatch(batch)),
      );
    }
  };
}

/** The next batch, or undefined once `stop` is aborted (then the gateway reconnects and resends what is unacked). */
function nextUnlessStopped<T>(
  batches: AsyncIterator<T>,
  stop: AbortSignal | undefined,
): Promise<IteratorResult<T> | undefined> {
  if (!stop) return batches.next();
  if (stop.aborted) return Promise.resolve(undefined);
  return new Promise((resolve, reject) => {
    const onStop = () => resolve(undefined);
    stop.addEventListener("abort", onStop, { once: true });
    batches
      .next()
      .then(resolve, reject)
      .finally(() => stop.removeEventListener("abort", onStop));
  });
}

function validateBatch(batch: IngestMetricsRequest): void {
  if (batch.metrics.length > maxBatchRows) {
    throw new ConnectError(
      `batch ${batch.sequence} has ${batch.metrics.length} rows; at most ${maxBatchRows} are allowed`,
      Code.InvalidArgument,
    );
  }
  batch.metrics.forEach((m, i) => {
    const missing = !m.requestId ? "request_id" : !m.startTime ? "start_time" : !m.endTime ? "end_time" : undefined;
    if (missing) {
      throw new ConnectError(`batch ${batch.sequence}, row ${i}: ${missing} is required`, Code.InvalidArgument);
    }
  });
}

/** The same request ids give the same token, so ClickHouse drops a resent batch whole. */
export function dedupToken(rows: readonly RequestMetrics[]): string {
  const hash = createHash("sha256");
  for (const id of rows.map((m) => m.requestId).sort()) hash.update(id).update("\n");
  return `ingest-${hash.digest("hex")}`;
}

export function toUsageRecord(m: RequestMetrics): UsageRecord {
  return create(UsageRecordSchema, {
    requestId: m.requestId,
    orgId: m.orgId,
    projectId: m.projectId,
    apiKeyId: m.apiKeyId,
    model: m.requestedModel,
    provider: m.provider,
    endpoint: m.endpoint,
    usage: m.usage,
    costNanos: m.costNanos,
    occurTime: m.startTime,
  });
}
