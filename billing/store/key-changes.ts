import { randomUUID } from "node:crypto";
import type pg from "pg";
import { keyChangesChannel } from "./accounts.ts";
import { BillingError } from "./db.ts";
import type { KeyChange } from "./types.ts";

// A watcher this far behind is cut off; it reconnects and starts from a flushed cache.
const maxQueuedChanges = 10_000;

interface Listener {
  /** UNLISTEN and return the connection to the pool. */
  stop(): Promise<void>;
}

interface Watcher {
  push(change: KeyChange): void;
  fail(error: Error): void;
}

export interface KeyChangeFeedOptions {
  /**
   * How often the listening connection is asked to LISTEN again, to know it still answers, and a notification is sent
   * through the pool, to know notifications reach it (1 s by default)...
   */
  checkMs?: number;
  /** ...and how long either may take before the feed fails (2 s by default). */
  checkTimeoutMs?: number;
}

/** What a feed notifies itself through the pool; never a change, never passed to watchers. */
interface Probe {
  probe: string;
}

/**
 * Key changes committed by any billing replica, fanned out to watchers. One pooled connection LISTENs while at
 * least one watcher is subscribed and is returned to the pool when the last one leaves. A connection that stops
 * answering (a hung server, a failed-over one gone without a reset) would hear nothing while watchers' streams went
 * on: it is checked every `checkMs`, and one that does not answer fails the feed, so watchers reload and watch again.
 * So does one that answers but is not told of what commits on other connections (through a pooler in transaction
 * mode, LISTEN runs on whichever server connection is free): the feed notifies itself through the pool, as a change
 * commits, first before watchers are told it is live and then every `checkMs`, and fails when that is not heard.
 */
export function createKeyChangeFeed(pool: pg.Pool, { checkMs = 1_000, checkTimeoutMs = 2_000 }: KeyChangeFeedOptions = {}) {
  const watchers = new Set<Watcher>();
  let listening: Promise<Listener> | undefined;

  const failAll = (cause: Error) => {
    // The driver's words (hosts, states) go to the log with the refusal, not to the watcher.
    const error = new BillingError("unavailable", "key change feed interrupted; watch again", { cause: cause.message });
    for (const watcher of watchers) watcher.fail(error);
  };

  const listen = (): Promise<Listener> => {
    const started = (async () => {
      const client = await pool.connect();
      // The probe not yet heard back, timed from its commit; `starting` waits for the first.
      let probe: { id: string; committedAt?: number } | undefined;
      let starting: { resolve: () => void; reject: (error: Error) => void } | undefined;
      const sendProbe = () => {
        const sent: { id: string; committedAt?: number } = { id: randomUUID() };
        probe = sent;
        const payload = JSON.stringify({ probe: sent.id } satisfies Probe);
        const query = { text: "SELECT pg_notify($1, $2)", values: [keyChangesChannel, payload], query_timeout: checkTimeoutMs };
        pool.query(query as pg.QueryConfig).then(
          () => {
            sent.committedAt = performance.now();
          },
          (error: Error) => {
            // Not sent (the pool cannot reach Postgres): nothing to wait for; a live feed's next check sends another.
            if (probe !== sent) return;
            probe = undefined;
            starting?.reject(error);
          },
        );
      };
      const onNotification = (message: pg.Notification) => {
        if (message.channel !== keyChangesChannel || !message.payload) return;
        const change = JSON.parse(message.payload) as KeyChange | Probe;
        if ("probe" in change) {
          // Other replicas' probes are theirs to hear.
          if (change.probe !== probe?.id) return;
          probe = undefined;
          starting?.resolve();
          return;
        }
        for (const watcher of watchers) watcher.push(change);
      };
      let checking = false;
      const check = setInterval(() => {
        if (probe?.committedAt !== undefined && performance.now() - probe.committedAt > checkTimeoutMs) {
          onError(new Error(`a key change notification committed through the pool was not heard within ${checkTimeoutMs} ms`));
          return;
        }
        if (checking) return;
        checking = true;
        // pg honours query_timeout per query, though its types leave it out.
        client.query({ text: `LISTEN ${keyChangesChannel}`, query_timeout: checkTimeoutMs } as pg.QueryConfig).then(
          () => {
            checking = false;
            // Sent once the listener is idle again, as a change commits: not while a pooler links it to a server.
            if (!probe && !released) sendProbe();
          },
          (error: Error) => onError(error),
        );
      }, checkMs);
      // The client goes back to the pool afterwards, so these handlers must not outlive the LISTEN.
      let released = false;
      const release = (error?: Error) => {
        clearInterval(check);
        if (released) return;
        released = true;
        client.off("notification", onNotification);
        client.off("error", onError);
        client.release(error);
      };
      const onError = (error: Error) => {
        release(error);
        starting?.reject(error);
        // A listener already being stopped has no watchers of its own left to fail.
        if (listening !== started) return;
        listening = undefined;
        failAll(error);
      };
      client.on("notification", onNotification);
      client.on("error", onError);
      try {
        await client.query(`LISTEN ${keyChangesChannel}`);
        // Live once a notification committed elsewhere is heard: a LISTEN that answers may still hear nothing.
        await new Promise<void>((resolve, reject) => {
          starting = { resolve, reject };
          sendProbe();
        });
      } catch (e) {
        release(e as Error);
        throw e;
      } finally {
        starting = undefined;
      }
      return {
        async stop() {
          clearInterval(check);
          try {
            await client.query(`UNLISTEN ${keyChangesChannel}`);
            release();
          } catch (e) {
            release(e as Error);
          }
        },
      };
    })();
    started.catch((error: Error) => {
      if (listening === started) listening = undefined;
      failAll(error);
    });
    return started;
  };

  const unlisten = () => {
    const stopping = listening;
    listening = undefined;
    stopping?.then(
      (listener) => listener.stop(),
      () => {},
    );
  };

  return {
    /**
     * Changes committed from now on, until `signal` aborts or the feed fails. The first item is null,
     * once LISTEN is in effect, so watchers know from then on nothing is missed.
     */
    async *watchKeyChanges(signal: AbortSignal): AsyncGenerator<KeyChange | null> {
      const queue: KeyChange[] = [];
      let failure: Error | undefined;
      let wake = () => {};
      const watcher: Watcher = {
        push(change) {
          if (queue.length >= maxQueuedChanges) {
            failure ??= new BillingError("resource_exhausted", "key change watcher fell too far behind");
          } else {
            queue.push(change);
          }
          wake();
        },
        fail(error) {
          failure ??= error;
          wake();
        },
      };
      let left = false;
      // Runs on abort too: a consumer that stops pulling never resumes this generator to reach `finally`.
      const leave = () => {
        if (left) return;
        left = true;
        signal.removeEventListener("abort", leave);
        watchers.delete(watcher);
        if (watchers.size === 0) unlisten();
        wake();
      };
      signal.addEventListener("abort", leave);
      watchers.add(watcher);
      listening ??= listen();
      try {
        // Changes are only announced once LISTEN is in effect; a failure to listen arrives as `failure`.
        await listening.catch(() => {});
        if (!failure && !signal.aborted) yield null;
        while (!signal.aborted) {
          const change = queue.shift();
          if (change) {
            yield change;
          } else if (failure) {
            throw failure;
          } else {
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        }
      } finally {
        leave();
      }
    },
  };
}
