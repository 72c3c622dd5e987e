/** A watch on something that should keep being heard from: a stream's chunks, a heartbeat. */
export interface SilenceWatch {
  /** Something was heard: the silence starts again from now (and a pause ends). */
  heard(): void;
  /** Not listening for a while (the listener is busy elsewhere, e.g. waiting on its own consumer): no silence counts. */
  pause(): void;
  /** Whether the silence ran out (and `onSilent` was called). */
  readonly expired: boolean;
  stop(): void;
}

/**
 * Calls `onSilent` once nothing has been heard for `ms`. One timer, re-armed only when it fires, so hearing
 * something costs only a timestamp: chunks and heartbeats can be many.
 */
export function watchSilence(ms: number, onSilent: () => void): SilenceWatch {
  let last = performance.now();
  let expired = false;
  let paused = false;
  const check = () => {
    const quiet = performance.now() - last;
    if (paused || quiet < ms) {
      timer = setTimeout(check, paused ? ms : ms - quiet);
      return;
    }
    expired = true;
    onSilent();
  };
  let timer = setTimeout(check, ms);
  return {
    heard() {
      last = performance.now();
      paused = false;
    },
    pause() {
      paused = true;
    },
    get expired() {
      return expired;
    },
    stop() {
      clearTimeout(timer);
    },
  };
}
