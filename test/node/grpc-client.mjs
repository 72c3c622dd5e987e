// A stock grpc-js client under Node, loading the .proto files at run time, so the suite proves
// that a non-Bun, non-Connect gRPC client interoperates with Bun-served RPCs.
// Usage: node grpc-client.mjs <host:port>; prints one JSON line with what it got.
import * as grpc from "@grpc/grpc-js";
import * as loader from "@grpc/proto-loader";
import * as path from "node:path";

const protoDir = path.resolve(import.meta.dirname, "../../proto");
const load = (file) =>
  grpc.loadPackageDefinition(loader.loadSync(file, { includeDirs: [protoDir], keepCase: true, longs: String, defaults: true }));
const target = process.argv[2];
const billing = new (load("billing/v1/billing.proto").billing.v1.BillingService)(target, grpc.credentials.createInsecure());
const analytics = new (load("analytics/v1/analytics.proto").analytics.v1.AnalyticsService)(
  target,
  grpc.credentials.createInsecure(),
);

const metadata = new grpc.Metadata();
metadata.set("authorization", "Bearer node-client-token");

const unary = await new Promise((resolve, reject) =>
  billing.ListOrganizations({}, metadata, (err, res) => (err ? reject(err) : resolve(res))),
);

const acks = await new Promise((resolve, reject) => {
  const got = [];
  const call = analytics.IngestMetrics(metadata);
  call.on("data", (res) => got.push(res.acked_sequence));
  call.on("error", reject);
  call.on("end", () => resolve(got));
  for (let seq = 1; seq <= 3; seq++) {
    call.write({ gateway_instance_id: "node", sequence: seq, metrics: [{ request_id: `req-${seq}` }] });
  }
  call.end();
});

const denied = await new Promise((resolve) =>
  billing.ListOrganizations({}, (err) => resolve(err ? { code: err.code, details: err.details } : null)),
);

console.log(JSON.stringify({ node: process.version, unary, acks, denied }));
grpc.closeClient(billing);
grpc.closeClient(analytics);
