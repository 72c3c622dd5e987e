// Stock reflection and health clients under Node: grpc-js-reflection-client (as grpcurl does, over
// reflection v1 and v1alpha) and a grpc-js Health client. Prints one JSON line.
// Usage: node reflection-client.mjs <host:port> <service-to-describe>
import * as grpc from "@grpc/grpc-js";
import * as loader from "@grpc/proto-loader";
import { GrpcReflection } from "grpc-js-reflection-client";
import * as path from "node:path";

const [target, service] = process.argv.slice(2);
const result = {};
for (const version of ["v1", "v1alpha"]) {
  const reflection = new GrpcReflection(target, grpc.credentials.createInsecure(), {}, version);
  const methods = await reflection.listMethods(service);
  result[version] = {
    services: (await reflection.listServices()).sort(),
    methods: methods.map((m) => m.name).sort(),
  };
}
const described = await new GrpcReflection(target, grpc.credentials.createInsecure()).getDescriptorBySymbol(service);
const pkg = described.getPackageObject({ keepCase: true, longs: String, defaults: true });
result.describedHasService = typeof service.split(".").reduce((o, k) => o?.[k], pkg) === "function";

const healthDef = loader.loadSync("grpc/health/v1/health.proto", {
  includeDirs: [path.resolve(import.meta.dirname, "../../third_party/proto")],
  keepCase: true,
  enums: String,
});
const Health = grpc.loadPackageDefinition(healthDef).grpc.health.v1.Health;
const health = new Health(target, grpc.credentials.createInsecure());
const check = (name) =>
  new Promise((resolve) => health.Check({ service: name }, (err, res) => resolve(err ? { code: err.code } : res)));
result.health = { server: await check(""), service: await check(service), unknown: await check("no.Such") };
result.watch = await new Promise((resolve, reject) => {
  const call = health.Watch({ service: "" });
  call.on("data", (res) => {
    resolve(res.status);
    call.cancel();
  });
  call.on("error", (e) => e.code !== grpc.status.CANCELLED && reject(e));
});
console.log(JSON.stringify(result));
process.exit(0);
