/**
 * What billing answered about API keys, by the SHA-256 of their secret, with refused keys apart in a map of their own:
 * a flood of made-up keys pushes out only other made-up keys, never the keys that work. Each map is bounded and
 * forgets its least recently stored entry first; with `expired`, entries of no more use go as others are stored, so
 * keys used once over weeks do not stay until the bound pushes them out.
 */
export function createKeyCache<Entry>(options: {
  maxKeys: number;
  maxRejected: number;
  /** Whether an entry can no longer be served, whatever happens. */
  expired?: (entry: Entry) => boolean;
}) {
  const working = new Map<string, Entry>();
  const rejected = new Map<string, Entry>();
  /** Drops the least recently stored entries while they have expired: each goes once, so a store costs that on average. */
  const dropExpired = (from: Map<string, Entry>) => {
    for (const [hash, entry] of from) {
      if (!options.expired?.(entry)) return;
      from.delete(hash);
    }
  };
  return {
    get: (hash: string): Entry | undefined => working.get(hash) ?? rejected.get(hash),
    /** Stores billing's latest answer for a key: `refused` when it does not work (unknown, revoked, expired). */
    set(hash: string, entry: Entry, refused: boolean): void {
      working.delete(hash);
      rejected.delete(hash);
      const into = refused ? rejected : working;
      dropExpired(into);
      // Maps iterate in insertion order: the first key is the least recently stored.
      if (into.size >= (refused ? options.maxRejected : options.maxKeys)) into.delete(into.keys().next().value as string);
      into.set(hash, entry);
    },
    delete(hash: string): void {
      working.delete(hash);
      rejected.delete(hash);
    },
    /** Entries held, working and refused. */
    size: (): number => working.size + rejected.size,
    /** The keys that work, by hash; an entry may be deleted while iterating. */
    working: (): MapIterator<[string, Entry]> => working.entries(),
    /** The keys refused, by hash; an entry may be deleted while iterating. */
    refused: (): MapIterator<[string, Entry]> => rejected.entries(),
  };
}
