import { expect, test } from "bun:test";
import { spawnService } from "./processes.ts";

test("a service that exits before it is ready says so with its last output", async () => {
  const service = spawnService({
    name: "doomed",
    cmd: [process.execPath, "--eval", 'console.log("starting"); console.error("listen EADDRINUSE 127.0.0.1:1"); process.exit(1)'],
    env: {},
    readyUrl: "http://127.0.0.1:1/readyz",
    onLine: () => {},
  });
  const error = await service.ready.catch((e: unknown) => e as Error);
  expect(error).toBeInstanceOf(Error);
  expect((error as Error).message).toStartWith("doomed exited with 1 before it was ready; its last output:");
  expect((error as Error).message).toContain("EADDRINUSE");
});
