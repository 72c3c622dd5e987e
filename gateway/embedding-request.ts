import { isObject } from "./chat-request.ts";
import { invalidRequest } from "./errors.ts";
import type { EmbeddingRequest } from "./providers/provider.ts";

/** An embeddings request as the gateway understands it, whether it came over REST or RPC. */
export interface EmbeddingInput {
  /** Public model name asked for. */
  model: string;
  /** The request for upstream; `model` is set per target. */
  upstream: EmbeddingRequest;
  /** End-user id from `user`; empty when absent. */
  user: string;
}

const maxInputs = 2048;

/**
 * Checks model, input (a string, strings, or token arrays, never empty), dimensions, encoding_format
 * and user, as OpenAI does. Throws a 400 naming the field. The encoding defaults to float as in the API.
 */
export function parseEmbeddingInput(body: unknown): EmbeddingInput {
  if (!isObject(body)) throw invalidRequest("The request body must be a JSON object.");
  const model = body.model;
  if (typeof model !== "string" || model === "") {
    throw invalidRequest("`model` is required and must be a non-empty string.", "model", "missing_required_parameter");
  }
  const input = body.input;
  if (typeof input === "string") {
    if (input === "") throw invalidRequest("`input` must not be empty.", "input");
  } else if (Array.isArray(input)) {
    if (input.length === 0 || input.length > maxInputs) {
      throw invalidRequest(`\`input\` must hold 1 to ${maxInputs} items.`, "input", input.length === 0 ? "missing_required_parameter" : "invalid_value");
    }
    const allStrings = input.every((x) => typeof x === "string" && x !== "");
    const tokens = input.every((x) => Number.isInteger(x) && x >= 0);
    const tokenLists = input.every((x) => Array.isArray(x) && x.length > 0 && x.every((t) => Number.isInteger(t) && t >= 0));
    if (!allStrings && !tokens && !tokenLists) {
      throw invalidRequest("`input` must be a non-empty string, an array of them, or token arrays.", "input");
    }
  } else {
    throw invalidRequest("`input` is required: a string or an array of strings.", "input", "missing_required_parameter");
  }
  const dimensions = body.dimensions;
  if (dimensions !== undefined && dimensions !== null && (!Number.isInteger(dimensions) || (dimensions as number) < 1 || (dimensions as number) > 65_536)) {
    throw invalidRequest("`dimensions` must be an integer from 1 to 65536.", "dimensions");
  }
  const format = body.encoding_format ?? "float";
  if (format !== "float" && format !== "base64") throw invalidRequest("`encoding_format` must be `float` or `base64`.", "encoding_format");
  const user = body.user ?? "";
  if (typeof user !== "string" || user.length > 256) throw invalidRequest("`user` must be a string of at most 256 characters.", "user");
  const upstream = { ...body, encoding_format: format } as EmbeddingRequest;
  return { model, upstream, user };
}
