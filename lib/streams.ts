import { Code, ConnectError } from "@connectrpc/connect";
import { type Context, context } from "@opentelemetry/api";

/**
 * A stream of messages that tells `ended` once, when it ends: read to its end (no error), failed (its error), or
 * abandoned by its reader (Canceled). An RPC handler's stream runs after the handler returned, so interceptors that
 * measure the whole call wait for this.
 */
export function onStreamEnd<T>(messages: AsyncIterable<T>, ended: (error?: unknown) => void): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = messages[Symbol.asyncIterator]();
      let open = true;
      const end = (error?: unknown) => {
        if (open) ended(error);
        open = false;
      };
      const step = async (move: () => Promise<IteratorResult<T>>) => {
        try {
          const result = await move();
          if (result.done) end();
          return result;
        } catch (e) {
          end(e);
          throw e;
        }
      };
      return {
        next: (...args: [] | [unknown]) => step(() => it.next(...args)),
        throw: (e?: unknown) => step(() => (it.throw ? it.throw(e) : Promise.reject(e))),
        async return(value?: unknown) {
          try {
            return await (it.return?.(value) ?? { done: true as const, value: value as T });
          } finally {
            // Once the generator behind it has run its cleanup (a stream's metering).
            end(new ConnectError("the stream was abandoned before its end", Code.Canceled));
          }
        },
      };
    },
  };
}

type Move<T> = () => Promise<IteratorResult<T>>;

/**
 * A stream whose `next` and `throw` steps go through `step`, and whose `return` (its reader abandoning it) through
 * `finish`: each is handed the move on the stream behind it, to run when and how it says.
 */
export function eachStep<T>(
  messages: AsyncIterable<T>,
  step: (move: Move<T>) => Promise<IteratorResult<T>>,
  finish: (move: Move<T>) => Promise<IteratorResult<T>> = (move) => move(),
): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = messages[Symbol.asyncIterator]();
      return {
        next: (...args: [] | [unknown]) => step(() => it.next(...args)),
        throw: (e?: unknown) => step(() => (it.throw ? it.throw(e) : Promise.reject(e))),
        return: (value?: unknown) =>
          finish(() => it.return?.(value) ?? Promise.resolve({ done: true as const, value: value as T })),
      };
    },
  };
}

/**
 * A stream whose every step runs in `ctx`: a generator's body runs in the context of whoever calls `next`, so what a
 * handler's stream does after the handler returned (its spans, its logs) belongs to the request's span.
 */
export function inContext<T>(messages: AsyncIterable<T>, ctx: Context): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = messages[Symbol.asyncIterator]();
      // Made once a stream, not once a step (a closure and a list of arguments each, for every message it carries).
      const next = (...args: [] | [unknown]) => it.next(...args);
      const fail = (e?: unknown) => (it.throw ? it.throw(e) : Promise.reject(e));
      const end = (value?: unknown) => it.return?.(value) ?? Promise.resolve({ done: true as const, value: value as T });
      return {
        next: (...args: [] | [unknown]) => context.with(ctx, next, undefined, ...args),
        throw: (e?: unknown) => context.with(ctx, fail, undefined, e),
        return: (value?: unknown) => context.with(ctx, end, undefined, value),
      };
    },
  };
}
