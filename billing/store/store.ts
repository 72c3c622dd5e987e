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
    /** Round trip to the database, for readiness. */
    async ping(): Promise<void> {
      await db.query("SELECT 1");
    },
  };
}

export type BillingStore = ReturnType<typeof createBillingStore>;
