import { expect, test } from "bun:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createAnalyticsAuth } from "./auth.ts";

const adminToken = "test-admin-token-0123456789";
const org = "org_auth";
const as = (token: string) => new Headers({ authorization: `Bearer ${token}` });

test("a flood of made-up keys does not push a working key out, and a made-up key is checked with billing once", async () => {
  const asked: string[] = [];
  const billing = createClient(
    BillingService,
    createRouterTransport((r) =>
      r.service(BillingService, {
        async authorizeKey(req) {
          asked.push(req.secret);
          if (req.secret !== "sk-mesh-of-org") throw new ConnectError("unknown api key", Code.Unauthenticated);
          return { apiKey: { id: "key_1", orgId: org } };
        },
      }),
    ),
  );
  const auth = createAnalyticsAuth({ adminToken, billing, maxKeys: 2, maxRejectedKeys: 10 });
  const refusal = (token: string) => auth.requireOrgReader(as(token), org).then(() => undefined, (e) => ConnectError.from(e).code);

  await auth.requireOrgReader(as("sk-mesh-of-org"), org);
  for (let i = 0; i < 50; i++) expect(await refusal(`sk-mesh-made-up-${i}`)).toBe(Code.Unauthenticated);
  expect(asked.length).toBe(51);
  await auth.requireOrgReader(as("sk-mesh-of-org"), org);
  expect(await refusal("sk-mesh-made-up-49")).toBe(Code.Unauthenticated);
  // Neither the working key nor the latest made-up one cost another call.
  expect(asked.length).toBe(51);
});
