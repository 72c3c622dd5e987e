/** Callers waiting, each for at most its own time limit, until a condition holds. */
export interface Waiters {
  /** Resolves true at the next `wakeAll`, or false after timeoutMs. */
  wait(timeoutMs: number): Promise<boolean>;
  /** Resolves every current waiter with true. */
  wakeAll(): void;
}

export function createWaiters(): Waiters {
  const waiting = new Set<() => void>();
  return {
    wait(timeoutMs) {
      return new Promise((resolve) => {
        const done = () => {
          clearTimeout(timer);
          resolve(true);
        };
        const timer = setTimeout(() => {
          waiting.delete(done);
          resolve(false);
        }, timeoutMs);
        waiting.add(done);
      });
    },
    wakeAll() {
      for (const done of waiting) done();
      waiting.clear();
    },
  };
}

/**
 * `work`, unless `signal` aborts first: then rejects with `reason()` at once, leaving `work` to finish for whoever else
 * waits on it (a shared lookup), its failure handled.
 */
export function unlessAborted<T>(work: Promise<T>, signal: AbortSignal | undefined, reason: () => unknown): Promise<T> {
  if (!signal) return work;
  if (signal.aborted) {
    work.catch(() => {});
    return Promise.reject(reason());
  }
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(reason());
    signal.addEventListener("abort", abort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener("abort", abort));
  });
}
