import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport, type ServiceImpl } from "@connectrpc/connect";
import type { IngestMetricsRequestSchema } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService, type UsageRecord } from "../gen/billing/v1/billing_pb.ts";
import { type AnalyticsServiceDeps, createAnalyticsService } from "./service.ts";

/**
 * An in-test BillingService that only records usage: idempotent by request_id like the real one,
 * remembers every call, and fails on demand. Serve it with createRouterTransport or startServer.
 */
export function createRecordingBilling(options: { onRecord?: (records: UsageRecord[]) => void | Promise<void> } = {}) {
  const calls: UsageRecord[][] = [];
  const stored = new Map<string, UsageRecord>();
  let failure: ConnectError | undefined;
  const impl: Partial<ServiceImpl<typeof BillingService>> = {
    async recordUsage(req) {
      if (failure) throw failure;
      await options.onRecord?.(req.records);
      calls.push(req.records);
      let inserted = 0;
      for (const record of req.records) {
        if (stored.has(record.requestId)) continue;
        stored.set(record.requestId, record);
        inserted++;
      }
      return { inserted, duplicates: req.records.length - inserted };
    },
  };
  return {
    impl,
    calls,
    stored,
    /** Until called again with false, every RecordUsage fails with Unavailable. */
    fail(on = true) {
      failure = on ? new ConnectError("billing is down", Code.Unavailable) : undefined;
    },
  };
}

/** An analytics service of `deps` whose billing is `billing`, a recording one, served in process. */
export function createAnalyticsWithRecordingBilling(
  deps: Omit<AnalyticsServiceDeps, "billing">,
  billing = createRecordingBilling(),
) {
  const client = createClient(BillingService, createRouterTransport((r) => r.service(BillingService, billing.impl)));
  return { service: createAnalyticsService({ ...deps, billing: client }), billing };
}

/** An IngestMetrics input stream the test feeds one batch at a time, like a gateway's spool. */
export function createBatchQueue() {
  type Batch = MessageInitShape<typeof IngestMetricsRequestSchema>;
  const items: Batch[] = [];
  let wake: (() => void) | undefined;
  let ended = false;
  let taken = 0;
  return {
    /** Batches the stream has pulled so far. */
    get taken() {
      return taken;
    },
    push(batch: Batch) {
      items.push(batch);
      wake?.();
    },
    end() {
      ended = true;
      wake?.();
    },
    async *[Symbol.asyncIterator]() {
      for (;;) {
        const next = items.shift();
        if (next) {
          taken++;
          yield next;
        }
        else if (ended) return;
        else await new Promise<void>((resolve) => (wake = resolve));
      }
    },
  };
}
