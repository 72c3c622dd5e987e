import { expect, test } from "bun:test";
import { context, createContextKey, ROOT_CONTEXT } from "@opentelemetry/api";
import { inContext } from "./streams.ts";
import { setupTelemetry } from "./telemetry.ts";

setupTelemetry({ service: "streams-test", version: "0" });
const step = createContextKey("step");
const request = ROOT_CONTEXT.setValue(step, "the request's");
const active = () => context.active().getValue(step);

test("every step of a stream in a context runs in it: next with and without a value, throw and return", async () => {
  const seen: unknown[] = [];
  async function* messages() {
    try {
      const sent: unknown = yield active();
      seen.push(["sent", sent, active()]);
      try {
        yield 2;
      } catch (e) {
        seen.push(["thrown", (e as Error).message, active()]);
        yield 3;
      }
      yield 4;
    } finally {
      seen.push(["ended", active()]);
    }
  }
  const it = inContext(messages(), request)[Symbol.asyncIterator]();
  expect(await it.next()).toEqual({ done: false, value: "the request's" });
  expect(await it.next("hello")).toEqual({ done: false, value: 2 });
  expect(await it.throw?.(new Error("boom"))).toEqual({ done: false, value: 3 });
  expect(await it.return?.(9)).toEqual({ done: true, value: 9 });
  expect(seen).toEqual([
    ["sent", "hello", "the request's"],
    ["thrown", "boom", "the request's"],
    ["ended", "the request's"],
  ]);
  // Its reader's own context is left as it was.
  expect(active()).toBeUndefined();
});

test("a stream in a context that has no throw or return of its own fails and ends as a generator would", async () => {
  let calls = 0;
  const bare: AsyncIterable<number> = {
    [Symbol.asyncIterator]: () => ({ next: async () => ({ done: false, value: ++calls }) }),
  };
  const it = inContext(bare, request)[Symbol.asyncIterator]();
  expect(await it.next()).toEqual({ done: false, value: 1 });
  await expect(it.throw?.(new Error("boom")) as Promise<unknown>).rejects.toThrow("boom");
  expect(await it.return?.(7)).toEqual({ done: true, value: 7 });
});
