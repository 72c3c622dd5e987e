/**
 * A test gateway (startTestGateway) in a process of its own, for what a process reads once at start (the CAs of
 * NODE_EXTRA_CA_CERTS) or providers read from the environment (DefaultAzureCredential): its routes are the YAML file
 * named by the first argument, its providers read this process's environment. It prints `listening <REST URL>`, then
 * each request's metrics as `row <JSON>` and each log line as `log <JSON>` as they come, and exits when stdin closes.
 *   bun gateway/testing/gateway-process.ts routes.yaml
 */
import { readFileSync } from "node:fs";
import { toJsonString } from "@bufbuild/protobuf";
import { RequestMetricsSchema } from "../../gen/analytics/v1/analytics_pb.ts";
import { startTestGateway } from "./served-gateway.ts";

const path = process.argv[2];
if (!path) throw new Error("usage: gateway-process.ts routes.yaml");
const gateway = await startTestGateway(readFileSync(path, "utf8"), { env: process.env });
console.log(`listening ${gateway.restUrl}`);
let rows = 0;
let lines = 0;
const report = setInterval(() => {
  for (; rows < gateway.shipper.rows.length; rows++) {
    console.log(`row ${toJsonString(RequestMetricsSchema, gateway.shipper.rows[rows]!)}`);
  }
  for (; lines < gateway.log.lines.length; lines++) console.log(`log ${gateway.log.lines[lines]}`);
}, 10);
for await (const _ of process.stdin);
clearInterval(report);
await gateway.close();
process.exit(0);
