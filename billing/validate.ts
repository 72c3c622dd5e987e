import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

/** Request validation; every failure is InvalidArgument naming the field as in the .proto. */

export function invalid(field: string, problem: string): ConnectError {
  return new ConnectError(`${field}: ${problem}`, Code.InvalidArgument);
}

// Control characters (C0, DEL, C1) and line or paragraph separators: Postgres refuses NUL outright, and no billing
// text (names, ids, models) is multi-line.
const controlCharacter = /[\p{Cc}\u2028\u2029]/u;
// Something to see: a name of only spaces, zero-width or other format characters looks like no name at all.
const visible = /[^\p{Z}\p{Cf}\s]/u;

/**
 * The check every text and id input passes through: no control characters, and `min`..`max` characters counted
 * as Postgres' char_length counts them (code points, not UTF-16 units).
 */
function characters(value: string, field: string, min: number, max: number): string {
  if (controlCharacter.test(value)) throw invalid(field, "must not contain control characters");
  let length = value.length;
  // Code points are at most UTF-16 units and at least half of them: counted only when that could decide a bound.
  if (length > max || length < 2 * min) length = [...value].length;
  if (length < min) throw invalid(field, min === 1 ? "required" : `at least ${min} characters`);
  if (length > max) throw invalid(field, `at most ${max} characters`);
  return value;
}

/**
 * Trimmed text of `min`..`max` characters, in Unicode's composed form (NFC), so names that look the same are the
 * same; text that is required must have a visible character.
 */
export function text(value: string, field: string, { min = 1, max = 200 } = {}): string {
  const normalized = characters(value.trim().normalize("NFC"), field, min, max);
  if (min > 0 && !visible.test(normalized)) throw invalid(field, "required");
  return normalized;
}

/** A non-empty identifier such as "org_01J..." (ids are never trimmed or rewritten). */
export function id(value: string, field: string): string {
  return characters(value, field, 1, 128);
}

/** A create's optional idempotency key (request_id): empty means none. */
export function requestId(value: string): string | null {
  if (value === "") return null;
  if (!/^[A-Za-z0-9_-]{1,128}$/.test(value)) throw invalid("request_id", "must be 1..128 letters, digits, _ or -");
  return value;
}

/** An optional identifier: empty means absent. */
export function optionalId(value: string, field: string): string | null {
  return value === "" ? null : id(value, field);
}

export function intInRange(value: number, field: string, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) throw invalid(field, `must be in ${min}..${max}`);
  return value;
}

export function nonNegative(value: bigint, field: string): bigint {
  if (value < 0n) throw invalid(field, "must not be negative");
  return value;
}

/** 0..`max`. */
export function atMost(value: bigint, field: string, max: bigint): bigint {
  if (nonNegative(value, field) > max) throw invalid(field, `at most ${max}`);
  return value;
}

export function positive(value: bigint, field: string): bigint {
  if (value <= 0n) throw invalid(field, "must be positive");
  return value;
}

// Postgres timestamptz and JS Date both hold years 1..9999 exactly; beyond that a timestamp is a mistake.
// setUTCFullYear, because Date.UTC reads years 0..99 as 1900..1999.
const minInstantMs = new Date(0).setUTCFullYear(1, 0, 1);
const maxInstantMs = new Date(0).setUTCFullYear(10_000, 0, 1);

/**
 * A timestamp as a Date (to the millisecond, rounded down: 23:59:59.9999 is still that day, and that billing period),
 * InvalidArgument outside years 1..9999 or with nanos outside 0..999,999,999, as Timestamp's definition has them.
 */
export function instant(value: Timestamp, field: string): Date {
  // Out of range, nanos would move the instant by seconds, into another day or billing period.
  if (!(value.nanos >= 0 && value.nanos <= 999_999_999)) throw invalid(`${field}.nanos`, "must be 0..999999999");
  const ms = Number(value.seconds) * 1000 + Math.floor(value.nanos / 1_000_000);
  if (!(ms >= minInstantMs && ms < maxInstantMs)) throw invalid(field, "must be a time in years 1..9999");
  return new Date(ms);
}

/**
 * A bound of a range of usage, rounded up to the millisecond usage is stored to, so that [start, end) selects exactly
 * the rows within it (a start of 10:00:00.0005 leaves out a row at 10:00:00.000); InvalidArgument as for instant.
 */
export function rangeBound(value: Timestamp, field: string): Date {
  const at = instant(value, field);
  return value.nanos % 1_000_000 === 0 ? at : new Date(at.getTime() + 1);
}

// A billing period lasts a month from a day up to the 28th: anchored from February of year 1 to November of 9999,
// every period lies within years 1..9999.
const minAnchorMs = new Date(0).setUTCFullYear(1, 1, 1);
const maxAnchorMs = new Date(0).setUTCFullYear(9999, 11, 1);

/** An instant whose billing period is wanted: InvalidArgument unless that period lies within years 1..9999. */
export function periodAnchor(at: Date, field: string): Date {
  const ms = at.getTime();
  if (!(ms >= minAnchorMs && ms < maxAnchorMs)) {
    throw invalid(field, "must be a time from 0001-02-01 to 9999-11-30, so that its billing period lies in years 1..9999");
  }
  return at;
}

/** A time range with both bounds set must not be empty; `startField` and `endField` name them. */
export function ordered(start: Date | null, end: Date | null, startField: string, endField: string): void {
  if (start && end && end <= start) throw invalid(endField, `must be after ${startField}`);
}

/**
 * A usage range as a request gives it, [start_time, end_time), each bound rounded up to the millisecond as usage is
 * stored (rangeBound): INVALID_ARGUMENT when end_time is not after start_time as sent, while bounds that round to the
 * same millisecond make an empty range, not an invalid one.
 */
export function usageBounds(start: Timestamp | undefined, end: Timestamp | undefined): { start?: Date; end?: Date } {
  const range = { start: start && rangeBound(start, "start_time"), end: end && rangeBound(end, "end_time") };
  if (start && end && (end.seconds < start.seconds || (end.seconds === start.seconds && end.nanos <= start.nanos))) {
    throw invalid("end_time", "must be after start_time");
  }
  return range;
}
