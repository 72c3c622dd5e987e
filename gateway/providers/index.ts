import type { ProviderConfig } from "../config.ts";
import { ConfigError } from "../../lib/config.ts";
import { entraTokens } from "./entra.ts";
import { createMockProvider } from "./mock.ts";
import { createOpenAIProvider } from "./openai.ts";
import type { Provider } from "./provider.ts";

export type { Provider } from "./provider.ts";
export { defaultMaxAnswerBytes } from "./openai.ts";

// Configured headers that carry credentials (a proxy's own key, as Portkey's x-portkey-api-key or Helicone-Auth).
const credentialHeader = /auth|key|token|secret|password|cookie|signature/i;

/** The credentials in a provider's configured headers: each value, and its token alone after a scheme (`Bearer x`). */
function headerSecrets(config: ProviderConfig): string[] {
  const headers = config.kind === "mock" ? undefined : config.headers;
  return Object.entries(headers ?? {})
    .filter(([name]) => credentialHeader.test(name))
    .flatMap(([, value]) => [value.trim(), value.trim().replace(/^[A-Za-z][\w-]*\s+/, "")]);
}

/** Whether fetch would send `key` in a header: a character past Latin-1 or a control one would fail every call. */
function sendable(key: string): boolean {
  try {
    new Headers([["authorization", `Bearer ${key}`]]);
    return true;
  } catch {
    return false;
  }
}

/**
 * One Provider per configured provider, by name. `env` supplies the upstream keys named by api_key_env and the secrets
 * of `auth: entra_id` providers' service principals (client_secret_env); `onMissingKey` hears about each that is unset
 * (those providers fail their calls), while a key fetch could never send (a `…` or a zero-width space copied with it)
 * is a ConfigError naming its variable. Every provider redacts all of those keys and secrets, the credentials in every
 * provider's configured headers, and `secrets` (the admin token), from the upstream's words it passes on.
 */
export function createProviders(
  configs: readonly ProviderConfig[],
  env: Record<string, string | undefined>,
  options: {
    onMissingKey?: (provider: string, variable: string) => void;
    secrets?: readonly string[];
    /** The most of a whole answer read from an upstream, in bytes. */
    maxAnswerBytes?: number;
  } = {},
): Map<string, Provider> {
  // Trimmed as fetch trims a header's value (a Secret made from a file holds the line break after the key): the key an
  // upstream quotes back is then the one redacted, and a blank variable is an unset one.
  const keyOf = (config: ProviderConfig) =>
    config.kind !== "mock" && config.api_key_env ? env[config.api_key_env]?.trim() || undefined : undefined;
  const clientSecretOf = (config: ProviderConfig) =>
    config.kind === "azure" && config.client_secret_env ? env[config.client_secret_env]?.trim() || undefined : undefined;
  // Longest first, so a key that holds another is redacted whole.
  const known = [...configs.map(keyOf), ...configs.map(clientSecretOf), ...configs.flatMap(headerSecrets), ...(options.secrets ?? [])];
  const secrets = [...new Set(known)]
    .filter((s): s is string => s !== undefined)
    .sort((a, b) => b.length - a.length);
  const unsendable = configs.flatMap((c) => {
    const key = keyOf(c);
    return c.kind !== "mock" && key !== undefined && !sendable(key) ? [`${c.api_key_env} (provider ${c.name})`] : [];
  });
  if (unsendable.length > 0) {
    throw new ConfigError(
      `invalid environment: ${unsendable.join(", ")}: the key holds a character no HTTP header may carry (a … or a zero-width space copied with it), so every call would fail`,
    );
  }
  const providers = new Map<string, Provider>();
  for (const config of configs) {
    if (config.kind === "mock") {
      providers.set(config.name, createMockProvider(config));
      continue;
    }
    if (config.kind === "azure" && config.auth === "entra_id") {
      const clientSecret = clientSecretOf(config);
      if (config.client_secret_env && !clientSecret) options.onMissingKey?.(config.name, config.client_secret_env);
      const tokens = !config.client_secret_env || clientSecret ? entraTokens(config, clientSecret) : undefined;
      providers.set(config.name, createOpenAIProvider(config, tokens, secrets, options.maxAnswerBytes));
      continue;
    }
    const apiKey = keyOf(config);
    if (config.api_key_env && !apiKey) options.onMissingKey?.(config.name, config.api_key_env);
    providers.set(config.name, createOpenAIProvider(config, apiKey, secrets, options.maxAnswerBytes));
  }
  return providers;
}
