import type pg from "pg";
import { createAccountStore } from "./accounts.ts";
import { type BudgetLeaseStoreOptions, createBudgetLeaseStore } from "./budget-leases.ts";
import { createDb } from "./db.ts";
import { createDiscountStore } from "./discounts.ts";
import { createInvoiceStore } from "./invoices.ts";
import { createKeyChangeFeed } from "./key-changes.ts";
import { createUsageStore } from "./usage.ts";

/** Everything billing keeps in Postgres, over one pool. */
export function createBillingStore(pool: pg.Pool, options: BudgetLeaseStoreOptions = {}) {
  const db = createDb(pool);
  return {
    ...createAccountStore(db),
    ...createUsageStore(db),
    ...createBudgetLeaseStore(db, options),
    ...createDiscountStore(db),
    ...createInvoiceStore(db),
    ...createKeyChangeFeed(pool),
    /** Round trip to the database, for readiness; past `timeoutMs` it fails and its connection is dropped. */
    async ping(timeoutMs?: number): Promise<void> {
      // pg honours query_timeout per query, though its types leave it out.
      await pool.query({ text: "SELECT 1", query_timeout: timeoutMs } as pg.QueryConfig);
    },
  };
}

export type BillingStore = ReturnType<typeof createBillingStore>;
