import { SpanKind, SpanStatusCode, type Tracer } from "@opentelemetry/api";
import { ulid } from "ulid";
import { Endpoint } from "../../gen/common/v1/common_pb.ts";
import { bearerToken } from "../../lib/auth.ts";
import { extractContext } from "../../lib/telemetry.ts";
import type { ModelRoute } from "../config.ts";
import type { GatewayCore } from "../core.ts";
import {
  bodyTooLarge,
  errorBody,
  type GatewayError,
  invalidRequest,
  methodNotAllowed,
  toGatewayError,
  unknownUrl,
} from "../errors.ts";

export interface RestAppOptions {
  core: GatewayCore;
  tracer: Tracer;
  /** Largest request body accepted (413 beyond). */
  maxBodyBytes: number;
}

/** The OpenAI-compatible REST API as a Fetch handler: no sockets here, so tests call it in memory. */
export interface RestApp {
  fetch(request: Request): Promise<Response>;
}

const modelsPrefix = "/v1/models/";

export function createRestApp(options: RestAppOptions): RestApp {
  const { core, tracer, maxBodyBytes } = options;
  const created = Math.floor(Date.now() / 1000);
  const renderModel = (route: ModelRoute) => ({
    id: route.name,
    object: "model",
    created,
    owned_by: route.targets[0]?.provider ?? "",
  });
  // Unrestricted keys (most) all see the same list: render it once.
  const allModels = JSON.stringify({ object: "list", data: core.routes.map(renderModel) });

  const traced = (name: string, request: Request, path: string, handler: () => Promise<Response>) =>
    tracer.startActiveSpan(
      name,
      { kind: SpanKind.SERVER, attributes: { "http.request.method": request.method, "url.path": path } },
      extractContext(request.headers),
      async (span) => {
        try {
          const response = await handler();
          span.setAttribute("http.response.status_code", response.status);
          if (response.status >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
          return response;
        } finally {
          span.end();
        }
      },
    );

  const chatCompletions = async (request: Request) => {
    const call = core.begin(Endpoint.CHAT_COMPLETIONS, bearerToken(request.headers), request.signal);
    try {
      const outcome = await core.handle(call, async () => {
        await core.authorize(call);
        return core.chat(call, await readJson(request, maxBodyBytes));
      });
      return new Response(JSON.stringify(outcome.completion), {
        status: 200,
        headers: {
          "content-type": "application/json",
          "x-request-id": call.requestId,
          "x-gateway-cost-nanos": outcome.costNanos.toString(),
        },
      });
    } catch (e) {
      return errorResponse(toGatewayError(e), call.requestId);
    }
  };

  const listModels = async (request: Request) => {
    const call = core.begin(Endpoint.MODELS, bearerToken(request.headers), request.signal);
    try {
      const body = await core.handle(call, async () => {
        await core.authorize(call);
        const models = core.models(call);
        return models === core.routes ? allModels : JSON.stringify({ object: "list", data: models.map(renderModel) });
      });
      return json(body, call.requestId);
    } catch (e) {
      return errorResponse(toGatewayError(e), call.requestId);
    }
  };

  const retrieveModel = async (request: Request, name: string) => {
    const call = core.begin(Endpoint.MODELS, bearerToken(request.headers), request.signal);
    try {
      const body = await core.handle(call, async () => {
        await core.authorize(call);
        return JSON.stringify(renderModel(core.model(call, name)));
      });
      return json(body, call.requestId);
    } catch (e) {
      return errorResponse(toGatewayError(e), call.requestId);
    }
  };

  return {
    async fetch(request) {
      const path = pathOf(request.url);
      const method = request.method;
      if (path === "/v1/chat/completions") {
        if (method !== "POST") return errorResponse(methodNotAllowed(method, path), ulid());
        return traced("POST /v1/chat/completions", request, path, () => chatCompletions(request));
      }
      if (path === "/v1/models") {
        if (method !== "GET") return errorResponse(methodNotAllowed(method, path), ulid());
        return traced("GET /v1/models", request, path, () => listModels(request));
      }
      if (path.startsWith(modelsPrefix) && path.length > modelsPrefix.length) {
        if (method !== "GET") return errorResponse(methodNotAllowed(method, path), ulid());
        let name: string;
        try {
          name = decodeURIComponent(path.slice(modelsPrefix.length));
        } catch {
          return errorResponse(invalidRequest("The model name in the URL is not valid percent-encoding."), ulid());
        }
        return traced("GET /v1/models/{model}", request, path, () => retrieveModel(request, name));
      }
      return errorResponse(unknownUrl(method, path), ulid());
    },
  };
}

function json(body: string, requestId: string): Response {
  return new Response(body, { status: 200, headers: { "content-type": "application/json", "x-request-id": requestId } });
}

function errorResponse(error: GatewayError, requestId: string): Response {
  return new Response(errorBody(error), {
    status: error.status,
    headers: { "content-type": "application/json", "x-request-id": requestId },
  });
}

/** The path of an absolute URL without parsing all of it. */
function pathOf(url: string): string {
  const start = url.indexOf("/", url.indexOf("//") + 2);
  if (start < 0) return "/";
  const query = url.indexOf("?", start);
  return query < 0 ? url.slice(start) : url.slice(start, query);
}

const decoder = new TextDecoder();

/** The JSON body, read with a size limit: 413 past it, 400 for anything that is not JSON. */
async function readJson(request: Request, limit: number): Promise<unknown> {
  const declared = request.headers.get("content-length");
  if (declared !== null && Number(declared) > limit) throw bodyTooLarge(limit);
  let text = "";
  if (request.body) {
    const reader = request.body.getReader();
    const chunks: Uint8Array[] = [];
    let size = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > limit) {
        await reader.cancel();
        throw bodyTooLarge(limit);
      }
      chunks.push(value);
    }
    text = decoder.decode(chunks.length === 1 ? chunks[0] : concat(chunks, size));
  }
  if (text.trim() === "") throw invalidRequest("The request body is empty; send a JSON object.", null, "invalid_json");
  try {
    return JSON.parse(text);
  } catch {
    throw invalidRequest("We could not parse the JSON body of your request.", null, "invalid_json");
  }
}

function concat(chunks: Uint8Array[], size: number): Uint8Array {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}
