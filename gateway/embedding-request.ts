import { invalidRequest } from "./errors.ts";
import type { EmbeddingRequest } from "./providers/provider.ts";
import { arrayTooLong, emptyArray, integer, isObject, missing, oneOf, parseModel, parseUser, wrongType } from "./request-checks.ts";

/** An embeddings request as the gateway understands it, whether it came over REST or RPC. */
export interface EmbeddingInput {
  /** Public model name asked for. */
  model: string;
  /** The request for upstream; `model` is set per target. */
  upstream: EmbeddingRequest;
  /** End-user id from `user`; empty when absent. */
  user: string;
}

export const maxInputs = 2048;
const dimensions = integer(1, 65_536);
const encodingFormat = oneOf("float", "base64");

/**
 * Checks model, input, dimensions, encoding_format and user as OpenAI does. Throws a 400 naming the
 * field. The encoding defaults to float as in the API.
 */
export function parseEmbeddingInput(body: unknown): EmbeddingInput {
  if (!isObject(body)) throw invalidRequest("The request body must be a JSON object.");
  const model = parseModel(body);
  parseInput(body.input);
  if (body.dimensions !== undefined && body.dimensions !== null) dimensions(body.dimensions, "dimensions");
  const format = body.encoding_format ?? "float";
  encodingFormat(format, "encoding_format");
  const user = parseUser(body);
  const upstream = { ...body, encoding_format: format } as EmbeddingRequest;
  return { model, upstream, user };
}

/**
 * One input (a string or an array of token ids) or up to 2048 of them (strings or token arrays),
 * none empty.
 */
function parseInput(input: unknown): void {
  if (input === undefined || input === null) throw missing("input");
  if (typeof input === "string") {
    if (input === "") throw invalidRequest("Invalid 'input': empty string. Expected a non-empty string.", "input");
    return;
  }
  if (!Array.isArray(input)) throw wrongType("input", "a string or an array", input);
  if (input.length === 0) throw emptyArray("input");
  // A flat array of token ids is one input, however long.
  if (typeof input[0] === "number") return checkTokens(input, "input");
  if (input.length > maxInputs) throw arrayTooLong("input", maxInputs, input.length);
  const strings = typeof input[0] === "string";
  if (!strings && !Array.isArray(input[0])) throw wrongType("input[0]", "a string or an array of token ids", input[0]);
  for (let i = 0; i < input.length; i++) {
    const item: unknown = input[i];
    if (strings) {
      if (typeof item !== "string") throw wrongType(`input[${i}]`, "a string", item);
      if (item === "") throw invalidRequest(`Invalid 'input[${i}]': empty string. Expected a non-empty string.`, `input[${i}]`);
    } else {
      if (!Array.isArray(item)) throw wrongType(`input[${i}]`, "an array of token ids", item);
      if (item.length === 0) throw emptyArray(`input[${i}]`);
      checkTokens(item, `input[${i}]`);
    }
  }
}

function checkTokens(tokens: readonly unknown[], param: string): void {
  for (let j = 0; j < tokens.length; j++) {
    const t = tokens[j];
    if (typeof t !== "number" || !Number.isInteger(t) || t < 0) {
      throw invalidRequest(`Invalid '${param}[${j}]': expected a token id (a non-negative integer).`, `${param}[${j}]`);
    }
  }
}
