import { type DescMessage, type MessageShape, toBinary } from "@bufbuild/protobuf";
import { sha256Hex } from "../lib/auth.ts";
import { maxAnswerBytes } from "../lib/message-limits.ts";
import type { Page, PageQuery } from "./store/types.ts";
import { id, intInRange, invalid } from "./validate.ts";

const defaultPageSize = 100;
const maxPageSize = 1000;

/**
 * Most of a page's rows an answer holds, encoded (see maxAnswerBytes): a key's allowed models alone may take 200 KB, an
 * invoice's line items more.
 */
export const maxPageBytes = maxAnswerBytes;

/** A List* request's page: its size and where the last ended, and the token of the page after a page read. */
export interface PageAsked<C> extends PageQuery<C> {
  /** Empty when no rows follow `page`; else a token that goes on after its last row, where `cursorOf` says it is. */
  nextPageToken<T>(page: Page<T>, cursorOf: (last: T) => C): string;
  /**
   * A page read, as the messages answered: as many of its rows as take up to `maxBytes` encoded (the first whatever
   * its size), and the token that goes on after the last of them, so a page cut short by size goes on where it ended.
   */
  answer<T, S extends DescMessage>(
    page: Page<T>,
    schema: S,
    message: (row: T) => MessageShape<S>,
    cursorOf: (last: T) => C,
    maxBytes?: number,
  ): { messages: MessageShape<S>[]; nextPageToken: string };
}

/**
 * The page a List* request asks for: page_size 1..1000 (0 is 100) and page_token, whose cursor `cursorFrom` checks.
 * A token carries a digest of the listing it came from (`listing`: the RPC, its org and filters), so one from another
 * list or other filters is refused, INVALID_ARGUMENT: it would start their listing part way, leaving rows out.
 */
export function pageAsked<C>(
  req: { pageSize: number; pageToken: string },
  listing: unknown[],
  cursorFrom: (value: unknown) => C | undefined,
): PageAsked<C> {
  const limit = req.pageSize === 0 ? defaultPageSize : intInRange(req.pageSize, "page_size", 1, maxPageSize);
  const scope = sha256Hex(JSON.stringify(listing)).slice(0, 16);
  let after: C | null = null;
  if (req.pageToken) {
    let issued: unknown;
    try {
      issued = JSON.parse(Buffer.from(req.pageToken, "base64url").toString("utf8"));
    } catch {
      // Refused below.
    }
    // A token is client input like any other: its cursor passes the same checks as the fields it stands for.
    const cursor = Array.isArray(issued) && issued.length === 2 ? cursorFrom(issued[0]) : undefined;
    if (cursor === undefined) throw invalid("page_token", "not a token from a previous response");
    if ((issued as unknown[])[1] !== scope) {
      throw invalid("page_token", "issued for another list, org_id or filters; start from the first page");
    }
    after = cursor;
  }
  const asked: PageAsked<C> = {
    limit,
    after,
    nextPageToken(page, cursorOf) {
      const last = page.items.at(-1);
      if (!page.more || last === undefined) return "";
      return Buffer.from(JSON.stringify([cursorOf(last), scope])).toString("base64url");
    },
    answer(page, schema, message, cursorOf, maxBytes = maxPageBytes) {
      const messages: MessageShape<typeof schema>[] = [];
      let bytes = 0;
      for (const row of page.items) {
        const answered = message(row);
        bytes += toBinary(schema, answered).byteLength;
        if (bytes > maxBytes && messages.length > 0) break;
        messages.push(answered);
      }
      const cut = messages.length < page.items.length;
      const held = cut ? { items: page.items.slice(0, messages.length), more: true } : page;
      return { messages, nextPageToken: asked.nextPageToken(held, cursorOf) };
    },
  };
  return asked;
}

/** A cursor that is the id of the row a page ended on, for lists whose rows are never deleted; checked as ids are. */
export function idCursor(value: unknown): string | undefined {
  if (typeof value !== "string") return undefined;
  try {
    return id(value, "page_token");
  } catch {
    return undefined;
  }
}
