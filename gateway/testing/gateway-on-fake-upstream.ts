import { afterAll, beforeAll, beforeEach } from "bun:test";
import { type FakeUpstream, startFakeUpstream } from "./fake-upstream.ts";
import { startTestGateway } from "./served-gateway.ts";

// Apart from served-gateway.ts: these are bun:test's hooks, and that file also runs in processes of its own.

export type TestGateway = Awaited<ReturnType<typeof startTestGateway>>;

/**
 * A test file's gateway in front of a fake upstream: both started before its tests, the gateway configured by
 * `routes` of the upstream's URL, and handed to `started`; the upstream's scripts and requests cleared before each
 * test; both stopped after the last.
 */
export function gatewayOnFakeUpstream(
  routes: (upstreamUrl: string) => string,
  started: (served: { upstream: FakeUpstream; gateway: TestGateway }) => void,
): void {
  let upstream: FakeUpstream | undefined;
  let gateway: TestGateway | undefined;
  beforeAll(async () => {
    upstream = startFakeUpstream();
    gateway = await startTestGateway(routes(upstream.url));
    started({ upstream, gateway });
  });
  afterAll(async () => {
    await gateway?.close();
    await upstream?.stop();
  });
  beforeEach(() => upstream?.reset());
}
