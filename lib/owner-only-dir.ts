import { chmodSync, mkdirSync, statSync } from "node:fs";
import type { Logger } from "./log.ts";

/**
 * Makes `dir` (and any missing parent) this user's alone (0700), an existing one too: one made by an older version or
 * under another umask is narrowed at start. Where that is not allowed (a volume the process does not own) it says
 * so and carries on, as the directory still works.
 */
export function ownerOnlyDir(dir: string, log: Logger | undefined): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  try {
    if ((statSync(dir).mode & 0o7777) !== 0o700) chmodSync(dir, 0o700);
  } catch (e) {
    log?.warn("cannot make a data directory readable by this user alone; other local users may read it", {
      err: e,
      dir,
    });
  }
}
