import { expect, test } from "bun:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { ProjectSchema } from "../gen/billing/v1/billing_pb.ts";
import { idCursor, pageAsked } from "./page-token.ts";

const project = (name: string) => create(ProjectSchema, { id: `prj_${name}`, orgId: "org_1", name });
const size = (name: string) => toBinary(ProjectSchema, project(name)).byteLength;

test("a page answers the rows that fit in its bytes, the first however large, and goes on after the last it holds", () => {
  const asked = pageAsked({ pageSize: 10, pageToken: "" }, ["ListProjects", "org_1"], idCursor);
  const rows = ["a".repeat(50), "b".repeat(50), "c".repeat(50)];
  const page = { items: rows, more: false };
  const cursorOf = (name: string) => `prj_${name}`;

  const whole = asked.answer(page, ProjectSchema, project, cursorOf);
  expect([whole.messages.length, whole.nextPageToken]).toEqual([3, ""]);

  const two = asked.answer(page, ProjectSchema, project, cursorOf, 2 * size(rows[0] as string));
  expect(two.messages.map((m) => m.name)).toEqual(rows.slice(0, 2));
  const next = pageAsked({ pageSize: 10, pageToken: two.nextPageToken }, ["ListProjects", "org_1"], idCursor);
  expect(next.after).toBe(`prj_${rows[1]}`);

  const alone = asked.answer(page, ProjectSchema, project, cursorOf, 1);
  expect(alone.messages.map((m) => m.name)).toEqual(rows.slice(0, 1));
  expect(alone.nextPageToken).not.toBe("");
});
