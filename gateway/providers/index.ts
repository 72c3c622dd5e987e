import type { ProviderConfig } from "../config.ts";
import { createMockProvider } from "./mock.ts";
import { createOpenAIProvider } from "./openai.ts";
import type { Provider } from "./provider.ts";

export type { Provider } from "./provider.ts";

/**
 * One Provider per configured provider, by name. `env` supplies the upstream keys named by
 * api_key_env; `onMissingKey` hears about each that is unset (those providers fail their calls).
 */
export function createProviders(
  configs: readonly ProviderConfig[],
  env: Record<string, string | undefined>,
  onMissingKey: (provider: string, variable: string) => void = () => {},
): Map<string, Provider> {
  const providers = new Map<string, Provider>();
  for (const config of configs) {
    if (config.kind === "mock") {
      providers.set(config.name, createMockProvider(config));
      continue;
    }
    const apiKey = config.api_key_env ? env[config.api_key_env] || undefined : undefined;
    if (config.api_key_env && !apiKey) onMissingKey(config.name, config.api_key_env);
    providers.set(config.name, createOpenAIProvider(config, apiKey));
  }
  return providers;
}
