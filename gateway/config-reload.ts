import { Counter, type Registry } from "prom-client";
import type { Logger } from "../lib/log.ts";
import { readGatewayConfigText } from "./config.ts";

export interface ConfigReloaderOptions {
  /** The config file (GATEWAY_CONFIG). */
  path: string;
  /** The text the running config was read from at start. */
  initialText: string;
  /**
   * Parses `text` and serves it from the next request on; throws, having changed nothing, to refuse it (its message is
   * logged, so it must hold no secret). Returns what to log of the config applied (counts of models and providers).
   */
  apply(text: string): Record<string, unknown>;
  log: Logger;
  registry?: Registry;
  /** Reads the file this often and reloads it once its content changed; 0 (the default): only reload() does. */
  pollMs?: number;
  /** Reads the file; a ConfigError naming it when it cannot be read. */
  read?: (path: string) => string;
}

export interface ConfigReloader {
  /** Reads the file and applies it, changed or not (SIGHUP). */
  reload(): void;
  /** Stops polling. */
  stop(): void;
}

/**
 * Reloads the gateway's config file on request (SIGHUP) and, with `pollMs`, whenever its content changes (a
 * ConfigMap updated in place). A file that does not hold, or cannot be read, is refused and logged, and the running
 * config stays; a poll refuses it once, not again at every poll while it stays so.
 */
export function createConfigReloader(options: ConfigReloaderOptions): ConfigReloader {
  const { path, log } = options;
  const read = options.read ?? readGatewayConfigText;
  const reloads = options.registry
    ? new Counter({
        name: "gateway_config_reloads_total",
        help: "Reloads of GATEWAY_CONFIG (SIGHUP, or a poll that found it changed): applied, or refused (the running config stays).",
        labelNames: ["result"] as const,
        registers: [options.registry],
      })
    : undefined;
  for (const result of ["applied", "refused"]) reloads?.labels({ result }).inc(0);
  /** What the file held when last read, or why it could not be read: a poll reloads only once it changes. */
  let seen = options.initialText;

  const refuse = (err: string) => {
    reloads?.labels({ result: "refused" }).inc();
    log.error("gateway config not reloaded; the running config stays", { file: path, err });
  };
  /** The file's text, or undefined once it could not be read (`seen` then holds why). */
  const readNow = (): string | undefined => {
    try {
      return read(path);
    } catch (e) {
      seen = (e as Error).message;
      return undefined;
    }
  };
  const apply = (text: string) => {
    seen = text;
    let applied: Record<string, unknown>;
    try {
      applied = options.apply(text);
    } catch (e) {
      refuse((e as Error).message);
      return;
    }
    reloads?.labels({ result: "applied" }).inc();
    log.info("gateway config reloaded", { file: path, ...applied });
  };

  const poll =
    options.pollMs && options.pollMs > 0
      ? setInterval(() => {
          const before = seen;
          const text = readNow();
          if (text === undefined) {
            if (seen !== before) refuse(seen);
          } else if (text !== before) apply(text);
        }, options.pollMs)
      : undefined;
  poll?.unref();

  return {
    reload() {
      const text = readNow();
      if (text === undefined) refuse(seen);
      else apply(text);
    },
    stop() {
      clearInterval(poll);
    },
  };
}
