import { expect, test } from "bun:test";
import { createWaiters } from "./waiters.ts";

test("waiters resolve true when woken and false at their own time limit", async () => {
  const waiters = createWaiters();
  const short = waiters.wait(20);
  const long = waiters.wait(5_000);
  expect(await short).toBe(false);
  waiters.wakeAll();
  expect(await long).toBe(true);
  // A later waiter waits for the next wake.
  const later = waiters.wait(20);
  expect(await later).toBe(false);
});
