import pg from "pg";
import { createAccountStore } from "./accounts.ts";
import { type BudgetLeaseStoreOptions, createBudgetLeaseStore } from "./budget-leases.ts";
import { createDb } from "./db.ts";
import { createDiscountStore } from "./discounts.ts";
import { createInvoiceStore } from "./invoices.ts";
import { createKeyChangeFeed } from "./key-changes.ts";
import { createRateUsageStore } from "./rate-usage.ts";
import { createUsageStore } from "./usage.ts";

/** Everything billing keeps in Postgres, over one pool. */
export function createBillingStore(pool: pg.Pool, options: BudgetLeaseStoreOptions = {}) {
  const db = createDb(pool);
  // Pings go on a connection of their own: calls holding every connection of the pool are load, and a ping queued
  // behind them would report a database that answers as down, taking every replica out of rotation at once.
  let pingPool: pg.Pool | undefined;
  return {
    ...createAccountStore(db),
    ...createUsageStore(db),
    ...createBudgetLeaseStore(db, options),
    ...createRateUsageStore(db),
    ...createDiscountStore(db),
    ...createInvoiceStore(db),
    ...createKeyChangeFeed(pool),
    /** Round trip to the database, for readiness; past `timeoutMs` it fails and its connection is dropped. */
    async ping(timeoutMs?: number): Promise<void> {
      if (!pingPool) {
        // Idle, its connection closes and holds no process open; one the server dropped is replaced at the next ping.
        pingPool = new pg.Pool({ ...pool.options, max: 1, idleTimeoutMillis: 10_000, allowExitOnIdle: true });
        pingPool.on("error", () => {});
      }
      // pg honours query_timeout per query, though its types leave it out.
      await pingPool.query({ text: "SELECT 1", query_timeout: timeoutMs } as pg.QueryConfig);
    },
    /** Closes the connection pings use; the pool the store was given is its owner's to end. */
    async closePing(): Promise<void> {
      const closing = pingPool;
      pingPool = undefined;
      await closing?.end();
    },
  };
}

export type BillingStore = ReturnType<typeof createBillingStore>;
