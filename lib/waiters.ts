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
