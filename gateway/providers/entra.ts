import type * as Identity from "@azure/identity";
import { clipped } from "../../lib/text.ts";
import type { AzureProviderConfig } from "../config.ts";
import { UpstreamError } from "./provider.ts";

/** What an Azure OpenAI resource takes tokens for, unless a provider names its own scope (a national cloud's). */
export const cognitiveServicesScope = "https://cognitiveservices.azure.com/.default";

/** How long a token fetch may go unanswered before calls stop waiting for it and a new one is made. */
export const tokenFetchHungAfterMs = 15_000;

/**
 * @azure/identity, loaded by a gateway with an `auth: entra_id` provider only: imported, it takes about 50 MB more
 * memory and a quarter of a second at start, which every other gateway is spared.
 */
let identity: typeof Identity | undefined;
const loadIdentity = async () => {
  identity ??= await import("@azure/identity");
  return identity;
};

/**
 * An `auth: entra_id` provider's tokens: each call gets the token current then, the credential caching it and fetching
 * the next one before it expires (from 2 minutes before, a call waiting only in its last second). From a service
 * principal when the provider names one (`clientSecret` is its secret), else from DefaultAzureCredential, which reads
 * the environment (AZURE_FEDERATED_TOKEN_FILE for AKS workload identity, AZURE_CLIENT_SECRET, a VM's managed identity).
 * A fetch is shared by every call that needs it and cannot be cancelled (MSAL's client credential flows take no abort
 * signal, nor its HTTP client a time limit): one whose connection stalls would leave every later call waiting on it, so
 * past tokenFetchHungAfterMs it is left to itself and the next call starts another.
 */
export function entraTokens(config: AzureProviderConfig, clientSecret: string | undefined): () => Promise<string> {
  const options = {
    authorityHost: config.authority_host,
    // An authority the operator named is taken as it is, not checked against Microsoft's list of clouds.
    disableInstanceDiscovery: config.authority_host !== undefined,
    // The gateway retries an attempt, or falls back, within the request's time: a token fetch is not retried behind it.
    retryOptions: { maxRetries: 0 },
  };
  // Loaded as the provider is made, at start, so the first call does not wait for it; a failure is each call's.
  const loaded = loadIdentity().then((id) => ({
    id,
    credential:
      config.tenant_id && config.client_id && clientSecret
        ? new id.ClientSecretCredential(config.tenant_id, config.client_id, clientSecret, options)
        : new id.DefaultAzureCredential(options),
  }));
  loaded.catch(() => {});
  const scope = config.scope ?? cognitiveServicesScope;
  let tokens: (() => Promise<string>) | undefined;
  // Since when calls have waited without any of them getting an answer.
  let waitingSince: number | undefined;
  return async () => {
    const now = performance.now();
    const { id, credential } = await loaded;
    if (!tokens || (waitingSince !== undefined && now - waitingSince > tokenFetchHungAfterMs)) {
      tokens = id.getBearerTokenProvider(credential, scope);
      waitingSince = undefined;
    }
    const own = tokens;
    const token = own();
    waitingSince ??= now;
    try {
      return await token;
    } finally {
      if (own === tokens) waitingSince = undefined;
    }
  };
}

/**
 * A token fetch's failure as the attempt's: no credential to be had (nothing in the environment) or one Entra ID refused
 * (a wrong secret, client or tenant: a 4xx but 408 and 429) is the operator's to fix, anything else (Entra ID or the
 * managed identity endpoint unreachable or failing) may pass. Either counts against the target, as its own refusal
 * would: the upstream is never called without a token.
 */
export function tokenFailure(provider: string, e: unknown, redact: (text: string) => string): UpstreamError {
  const refusal = (status: unknown) => typeof status === "number" && status >= 400 && status < 500 && status !== 408 && status !== 429;
  // Entra ID's refusal comes as MSAL's ServerError (its status, the error code such as invalid_client) within the
  // credential's own error.
  const cause = (e as { cause?: { name?: unknown; status?: unknown } } | undefined)?.cause;
  // Without the library loaded, no error of its own can have come.
  const id = identity;
  const refused =
    (id !== undefined &&
      (e instanceof id.CredentialUnavailableError ||
        (e instanceof id.AggregateAuthenticationError &&
          e.errors.every((inner) => inner instanceof id.CredentialUnavailableError)) ||
        (e instanceof id.AuthenticationError && refusal(e.statusCode)))) ||
    (cause?.name === "ServerError" && refusal(cause.status));
  const words = clipped(redact((e as Error)?.message ?? String(e)).replace(/\s+/g, " "), 500);
  return new UpstreamError(refused ? "misconfigured" : "transient", `${provider}: no Entra ID token: ${words}`);
}
