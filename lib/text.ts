/**
 * `text` cut to at most `max` UTF-16 units, with `mark` after it when cut (an error echoing a client's input, an
 * upstream's message, a log line). The cut never splits a character in two: half of a surrogate pair is not
 * well-formed text, which JSON writes as an escape such as `\ud83d` and encodeURIComponent (gRPC's grpc-message)
 * refuses, so a cut that would fall inside one falls before it.
 */
export function clipped(text: string, max: number, mark = "..."): string {
  if (text.length <= max) return text;
  const last = max > 0 ? text.charCodeAt(max - 1) : 0;
  const end = last >= 0xd800 && last <= 0xdbff ? max - 1 : max;
  return `${text.slice(0, end)}${mark}`;
}
