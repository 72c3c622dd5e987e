import {
  create,
  type DescFile,
  type DescMessage,
  type DescService,
  fromBinary,
  type MessageInitShape,
  toBinary,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ConnectRouter } from "@connectrpc/connect";
import {
  type ServerReflectionRequest,
  ServerReflectionRequestSchema,
  type ServerReflectionResponse,
  ServerReflectionResponseSchema,
  ServerReflection as ServerReflectionV1,
} from "../gen/grpc/reflection/v1/reflection_pb.ts";
import {
  ServerReflectionRequestSchema as AlphaRequestSchema,
  ServerReflectionResponseSchema as AlphaResponseSchema,
  ServerReflection as ServerReflectionV1Alpha,
} from "../gen/grpc/reflection/v1alpha/reflection_pb.ts";
import { createStreamCap, probeReadMaxBytes } from "./health.ts";

export interface ReflectionOptions {
  /** Streams (v1 and v1alpha together) open at once on one connection, and on the server; past either, refused. */
  maxStreamsPerConnection?: number;
  maxStreams?: number;
}

/**
 * Registers gRPC server reflection (v1 and v1alpha) describing `services`, so stock tools such as
 * grpcurl can list and describe the API without .proto files.
 */
export function registerReflection(
  router: ConnectRouter,
  services: DescService[],
  options: ReflectionOptions = {},
): void {
  const all = [...services, ServerReflectionV1, ServerReflectionV1Alpha];
  const index = indexFiles(all);
  const answer = (req: ServerReflectionRequest) => respond(req, all, index);
  // A stream lasts as long as its caller keeps it open and needs no key: grpcurl opens one per command.
  const streams = createStreamCap(
    options.maxStreamsPerConnection ?? 16,
    options.maxStreams ?? 1024,
    "too many reflection streams open; close one first",
  );
  router.service(ServerReflectionV1, {
    async *serverReflectionInfo(requests, ctx) {
      const release = streams.take(ctx);
      try {
        for await (const req of requests) yield answer(req);
      } finally {
        release();
      }
    },
  }, { readMaxBytes: probeReadMaxBytes });
  // v1alpha has the same wire format: translate through bytes rather than keep a second implementation.
  router.service(ServerReflectionV1Alpha, {
    async *serverReflectionInfo(requests, ctx) {
      const release = streams.take(ctx);
      try {
        for await (const req of requests) {
          const v1 = fromBinary(ServerReflectionRequestSchema, toBinary(AlphaRequestSchema, req));
          yield fromBinary(AlphaResponseSchema, toBinary(ServerReflectionResponseSchema, answer(v1)));
        }
      } finally {
        release();
      }
    },
  }, { readMaxBytes: probeReadMaxBytes });
}

interface FileIndex {
  byName: Map<string, DescFile>;
  bySymbol: Map<string, DescFile>;
}

function indexFiles(services: DescService[]): FileIndex {
  const byName = new Map<string, DescFile>();
  const bySymbol = new Map<string, DescFile>();
  const addMessage = (file: DescFile, message: DescMessage) => {
    bySymbol.set(message.typeName, file);
    for (const nested of message.nestedMessages) addMessage(file, nested);
    for (const nested of message.nestedEnums) bySymbol.set(nested.typeName, file);
  };
  const addFile = (file: DescFile) => {
    if (byName.has(file.proto.name)) return;
    byName.set(file.proto.name, file);
    for (const message of file.messages) addMessage(file, message);
    for (const e of file.enums) bySymbol.set(e.typeName, file);
    for (const s of file.services) {
      bySymbol.set(s.typeName, file);
      for (const m of s.methods) bySymbol.set(`${s.typeName}.${m.name}`, file);
    }
    for (const dep of file.dependencies) addFile(dep);
  };
  for (const service of services) addFile(service.file);
  return { byName, bySymbol };
}

/** The file and everything it imports, each once, dependencies included as reflection clients expect. */
function withDependencies(file: DescFile): Uint8Array[] {
  const seen = new Set<string>();
  const out: Uint8Array[] = [];
  const visit = (f: DescFile) => {
    if (seen.has(f.proto.name)) return;
    seen.add(f.proto.name);
    out.push(toBinary(FileDescriptorProtoSchema, f.proto));
    for (const dep of f.dependencies) visit(dep);
  };
  visit(file);
  return out;
}

function respond(req: ServerReflectionRequest, services: DescService[], index: FileIndex): ServerReflectionResponse {
  const reply = (messageResponse: MessageInitShape<typeof ServerReflectionResponseSchema>["messageResponse"]) =>
    create(ServerReflectionResponseSchema, { validHost: req.host, originalRequest: req, messageResponse });
  const files = (file: DescFile | undefined, what: string) =>
    file
      ? reply({ case: "fileDescriptorResponse", value: { fileDescriptorProto: withDependencies(file) } })
      : reply({ case: "errorResponse", value: { errorCode: Code.NotFound, errorMessage: `${what} not found` } });
  const request = req.messageRequest;
  switch (request.case) {
    case "listServices":
      return reply({
        case: "listServicesResponse",
        value: { service: services.map((s) => ({ name: s.typeName })) },
      });
    case "fileByFilename":
      return files(index.byName.get(request.value), `file ${request.value}`);
    case "fileContainingSymbol":
      return files(index.bySymbol.get(request.value), `symbol ${request.value}`);
    case "fileContainingExtension":
      return files(undefined, `extension ${request.value.extensionNumber} of ${request.value.containingType}`);
    case "allExtensionNumbersOfType":
      return index.bySymbol.has(request.value)
        ? reply({ case: "allExtensionNumbersResponse", value: { baseTypeName: request.value, extensionNumber: [] } })
        : files(undefined, `type ${request.value}`);
    default:
      return reply({ case: "errorResponse", value: { errorCode: Code.InvalidArgument, errorMessage: "empty request" } });
  }
}
