import { clipped } from "../lib/text.ts";
import { type GatewayError, invalidRequest } from "./errors.ts";

/**
 * The request parsers' shared vocabulary: field checks built once at load and errors worded as OpenAI's
 * ("Invalid type for 'temperature': expected a decimal, but got a string instead.") with its codes.
 */

/**
 * Most values (arrays, objects and object members of a JSON body; nested messages, list elements and map entries of an RPC message) a
 * request may hold: far more than the API's own limits let a real one hold, far fewer than the million or so empty
 * ones a 4 MiB body can hold, which cost hundreds of megabytes and seconds to parse or decode.
 */
export const maxRequestNodes = 100_000;

/** Checks a value (null included: optional fields skip absent values before checking); throws a 400 naming `param`. */
export type Check = (value: unknown, param: string) => void;

export const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

export const absent = (v: unknown): v is undefined | null => v === undefined || v === null;

/** What a JSON value is, in the words of OpenAI's type errors. */
function kind(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "number") return !Number.isFinite(v) ? "a non-finite number" : Number.isInteger(v) ? "an integer" : "a decimal";
  if (typeof v === "string") return "a string";
  if (typeof v === "boolean") return "a boolean";
  return typeof v === "object" ? "an object" : typeof v;
}

const quoted = (values: readonly string[]) => values.map((v) => `'${v}'`).join(", ");

export const missing = (param: string): GatewayError =>
  invalidRequest(`Missing required parameter: '${param}'.`, param, "missing_required_parameter");

export const wrongType = (param: string, expected: string, v: unknown): GatewayError =>
  invalidRequest(`Invalid type for '${param}': expected ${expected}, but got ${kind(v)} instead.`, param, "invalid_type");

/** A value none of `supported`, echoed up to 256 characters (a role or type of 100 KB is not sent back whole). */
export const unsupported = (param: string, v: string, supported: readonly string[]): GatewayError =>
  invalidRequest(`Invalid value for '${param}': '${clipped(v, 256)}'. Supported values are: ${quoted(supported)}.`, param, "invalid_value");

/**
 * A file named by id. The gateway serves no Files API, so the id could only name a file of the upstream account every
 * org shares, which the request would have the model read.
 */
export const storedFile = (param: string): GatewayError =>
  invalidRequest(
    `Invalid value for '${param}': files are not served by this gateway, so a file id could only name a file of ` +
      "the upstream account every organization shares; send the file's content instead.",
    param,
    "unsupported_value",
  );

export const emptyArray = (param: string): GatewayError =>
  invalidRequest(
    `Invalid '${param}': empty array. Expected an array with minimum length 1, but got an empty array instead.`,
    param,
    "empty_array",
  );

export const arrayTooLong = (param: string, max: number, length: number): GatewayError =>
  invalidRequest(
    `Invalid '${param}': array too long. Expected an array with maximum length ${max}, but got an array with length ${length} instead.`,
    param,
    "array_above_max_length",
  );

const stringTooLong = (param: string, max: number, text: string): GatewayError =>
  invalidRequest(
    `Invalid '${param}': string too long. Expected a string with maximum length ${max}, but got a string with length ${chars(text)} instead.`,
    param,
    "string_above_max_length",
  );

/** Characters (code points, as OpenAI counts them) of text. */
function chars(text: string): number {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

/** Whether text has more than max characters. A code point is one or two UTF-16 units, so most need no count. */
export function tooLong(text: string, max: number): boolean {
  if (text.length <= max) return false;
  if (text.length > 2 * max) return true;
  let n = 0;
  for (const _ of text) if (++n > max) return true;
  return false;
}

export const string: Check = (v, param) => {
  if (typeof v !== "string") throw wrongType(param, "a string", v);
};

/** A string of at most max characters. */
export const stringUpTo =
  (max: number): Check =>
  (v, param) => {
    if (typeof v !== "string") throw wrongType(param, "a string", v);
    if (tooLong(v, max)) throw stringTooLong(param, max, v);
  };

export const boolean: Check = (v, param) => {
  if (typeof v !== "boolean") throw wrongType(param, "a boolean", v);
};

export const object: Check = (v, param) => {
  if (!isObject(v)) throw wrongType(param, "an object", v);
};

/** A number from min to max inclusive; an integer one also rejects fractions. */
function numberIn(min: number, max: number, integer: boolean): Check {
  const noun = integer ? "integer" : "decimal";
  return (v, param) => {
    if (typeof v !== "number" || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
      throw wrongType(param, `a${integer ? "n integer" : " decimal"}`, v);
    }
    // Past 2^53 a JSON number has already been rounded when it is read: what arrived is not what was sent.
    const got = integer && !Number.isSafeInteger(v) ? "a number past 2^53, which JSON numbers do not carry exactly" : v;
    if (v > max) {
      throw invalidRequest(
        `Invalid '${param}': ${noun} above maximum value. Expected a value <= ${max}, but got ${got} instead.`,
        param,
        `${noun}_above_max_value`,
      );
    }
    if (v < min) {
      throw invalidRequest(
        `Invalid '${param}': ${noun} below minimum value. Expected a value >= ${min}, but got ${got} instead.`,
        param,
        `${noun}_below_min_value`,
      );
    }
  };
}

export const decimal = (min: number, max: number): Check => numberIn(min, max, false);
export const integer = (min: number, max: number): Check => numberIn(min, max, true);

/** One of a fixed set of strings. */
export function oneOf(...values: string[]): Check {
  const allowed = new Set(values);
  return (v, param) => {
    if (typeof v !== "string") throw wrongType(param, "a string", v);
    if (!allowed.has(v)) throw unsupported(param, v, values);
  };
}

/** An array of at most max items, each passing item; `nonEmpty` also rejects []. */
export function arrayOf(item: Check, { max = Number.POSITIVE_INFINITY, nonEmpty = false } = {}): Check {
  return (v, param) => {
    if (!Array.isArray(v)) throw wrongType(param, "an array", v);
    if (nonEmpty && v.length === 0) throw emptyArray(param);
    if (v.length > max) throw arrayTooLong(param, max, v.length);
    for (let i = 0; i < v.length; i++) item(v[i], `${param}[${i}]`);
  };
}

/** An object whose required fields are present and whose fields pass their checks; other fields are left alone. */
export function objectWith(required: Record<string, Check>, optional: Record<string, Check> = {}): Check {
  const needed = Object.keys(required);
  const neededChecks = Object.values(required);
  const allowed = Object.keys(optional);
  const allowedChecks = Object.values(optional);
  return (v, param) => {
    if (!isObject(v)) throw wrongType(param, "an object", v);
    for (let i = 0; i < needed.length; i++) {
      const field = needed[i] as string;
      const x = v[field];
      if (absent(x)) throw missing(`${param}.${field}`);
      (neededChecks[i] as Check)(x, `${param}.${field}`);
    }
    for (let i = 0; i < allowed.length; i++) {
      const field = allowed[i] as string;
      const x = v[field];
      if (!absent(x)) (allowedChecks[i] as Check)(x, `${param}.${field}`);
    }
  };
}

/** An object told apart by its `type`, each type with its own check. */
export function byType(variants: Record<string, Check>): Check {
  const checks = new Map(Object.entries(variants));
  const types = [...checks.keys()];
  return (v, param) => {
    if (!isObject(v)) throw wrongType(param, "an object", v);
    const type = v.type;
    if (absent(type)) throw missing(`${param}.type`);
    if (typeof type !== "string") throw wrongType(`${param}.type`, "a string", type);
    const check = checks.get(type);
    if (!check) throw unsupported(`${param}.type`, type, types);
    check(v, param);
  };
}

/** The public model name every request names. */
export function parseModel(body: Record<string, unknown>): string {
  const model = body.model;
  if (absent(model) || model === "") throw missing("model");
  if (typeof model !== "string") throw wrongType("model", "a string", model);
  return model;
}

const maxUserChars = 256;
const userId = stringUpTo(maxUserChars);

/**
 * The end-user id from the first of `fields` present (each one present checked); empty when none is. Chat
 * completions name theirs in `user` or, as OpenAI now asks, `safety_identifier`.
 */
export function parseUser(body: Record<string, unknown>, fields: readonly string[] = ["user"]): string {
  let found = "";
  for (const field of fields) {
    const value = body[field];
    if (absent(value)) continue;
    userId(value, field);
    found ||= value as string;
  }
  return found;
}
