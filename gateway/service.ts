import { create, type DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, createContextKey, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { ChatCompletion, ChatCompletionChunk } from "openai/resources/chat/completions";
import { RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import {
  type ChatCompletionParams,
  ChatCompletionParamsSchema,
  type ChatMessage,
  type CreateChatCompletionResponse,
  CreateChatCompletionResponseSchema,
  type CreateEmbeddingRequest,
  CreateEmbeddingRequestSchema,
  CreateEmbeddingResponseSchema,
  GatewayService,
  type ListModelsResponse,
  ListModelsResponseSchema,
  type StreamChatCompletionResponse,
  StreamChatCompletionResponseSchema,
} from "../gen/gateway/v1/gateway_pb.ts";
import { bearerToken } from "../lib/auth.ts";
import { limitMessages } from "../lib/message-limits.ts";
import { strictJsonOptions } from "../lib/server.ts";
import { maxMessages, maxStops, maxTools } from "./chat-request.ts";
import type { StreamOutcome } from "./chat-stream.ts";
import type { Call, ChatOutcome, GatewayCore, MeteredOutcome } from "./core.ts";
import { maxInputs } from "./embedding-request.ts";
import type { BodyBudget } from "./body-budget.ts";
import {
  bodiesAtCapacity,
  bodyTooLarge,
  cancelled,
  deadlineExceeded,
  GatewayError,
  invalidRequest,
  toConnectError,
  toGatewayError,
} from "./errors.ts";
import { base64Floats } from "./providers/provider.ts";
import { arrayTooLong, maxRequestNodes } from "./request-checks.ts";

/** The call the request gate began for an RPC before its body was read. */
const gatedCall = createContextKey<Call | undefined>(undefined);
/** Why the gate could not check the key (billing did not answer): the handler refuses with it, the model named. */
const uncheckedKey = createContextKey<GatewayError | undefined>(undefined);

const endpoints = new Map<DescMethod, Endpoint>([
  [GatewayService.method.createChatCompletion, Endpoint.CHAT_COMPLETIONS],
  [GatewayService.method.streamChatCompletion, Endpoint.CHAT_COMPLETIONS],
  [GatewayService.method.createEmbedding, Endpoint.EMBEDDINGS],
  [GatewayService.method.listModels, Endpoint.MODELS],
]);

/** How close to its deadline an RPC whose client left counts as timed out rather than cancelled. */
const deadlineSlackMs = 100;

/**
 * The RPC's signal, aborted with DeadlineExceeded when the client's deadline has (all but) passed: a gRPC client resets
 * its stream at its deadline, which can arrive before the server's own timer for that deadline fires.
 */
function callSignal(ctx: HandlerContext): AbortSignal {
  if (ctx.timeoutMs() === undefined) return ctx.signal;
  const controller = new AbortController();
  const forward = () => {
    const passed = (ctx.timeoutMs() ?? Number.POSITIVE_INFINITY) <= deadlineSlackMs;
    controller.abort(passed ? new ConnectError("the operation timed out", Code.DeadlineExceeded) : ctx.signal.reason);
  };
  if (ctx.signal.aborted) forward();
  else ctx.signal.addEventListener("abort", forward, { once: true });
  return controller.signal;
}

const beginCall = (core: GatewayCore, endpoint: Endpoint, ctx: HandlerContext): Call => {
  // Response headers reach the client on errors too, merged into the error's metadata.
  const call = core.begin(endpoint, bearerToken(ctx.requestHeader), callSignal(ctx));
  ctx.responseHeader.set("x-request-id", call.requestId);
  return call;
};

/** The key's rate limit headers, on the response or (merged by Connect) on the error. */
const setLimitHeaders = (call: Call, ctx: HandlerContext) => {
  if (call.limitHeaders) for (const [name, value] of Object.entries(call.limitHeaders)) ctx.responseHeader.set(name, value);
};

const failed = (call: Call, ctx: HandlerContext, e: unknown) => {
  setLimitHeaders(call, ctx);
  // What the failure cost (the prompts of attempts that timed out), in the error's metadata as the REST API's header.
  if (call.metrics.costNanos > 0n) ctx.responseHeader.set("x-gateway-cost-nanos", call.metrics.costNanos.toString());
  return toConnectError(toGatewayError(e));
};

/** The call the gate began for this RPC, handed over once: to its handler, or to the metering of a refusal. */
const takeGatedCall = (ctx: HandlerContext): Call | undefined => {
  const call = ctx.values.get(gatedCall);
  ctx.values.delete(gatedCall);
  return call;
};

/** Why an RPC's message never reached its handler, in the REST API's terms. */
function unreadMessage(reason: unknown, maxBodyBytes: number): GatewayError {
  const error = ConnectError.from(reason);
  if (error.cause instanceof GatewayError) return error.cause;
  if (error.code === Code.ResourceExhausted) return bodyTooLarge(maxBodyBytes);
  if (error.code === Code.DeadlineExceeded) return deadlineExceeded();
  // Connect's node adapter reads a client hanging up (its connection closed, its HTTP/2 stream reset) as Aborted.
  if (error.code === Code.Canceled || error.code === Code.Aborted) return cancelled();
  return invalidRequest(`The request message could not be read: ${error.rawMessage}`);
}

/**
 * The router's request gate: a GatewayService call gets its request id before its body is read, so every answer
 * carries x-request-id. A body whose declared length is over the limit is refused as the REST API refuses it (the
 * key first, then invalid_argument `request_too_large`) without being read; one with no length (gRPC, gRPC-Web text)
 * is cut by the transport's readMaxBytes, which answers resource_exhausted. Either way, and when a message cannot be
 * read at all, the call is metered as REST meters it.
 */
export function createGatewayRequestGate(core: GatewayCore, maxBodyBytes: number) {
  const refuse = (call: Call, error: GatewayError) =>
    core.handle(call, () => core.authorize(call).then(() => Promise.reject(error))).catch((e: unknown) => e);
  return async (ctx: HandlerContext) => {
    const endpoint = endpoints.get(ctx.method);
    if (endpoint === undefined) return;
    const call = beginCall(core, endpoint, ctx);
    // A deadline of 0 (`grpc-timeout: 0m`, which grpc-js sends for one already passed) aborts before any listener:
    // answered at once, metered once the key is checked, as one that passes while billing checks it.
    if (ctx.signal.aborted) {
      const error = unreadMessage(ctx.signal.reason, maxBodyBytes);
      void refuse(call, error);
      throw failed(call, ctx, error);
    }
    ctx.values.set(gatedCall, call);
    // Every RPC's signal aborts once it is answered; the reason is the error, when there was one.
    ctx.signal.addEventListener("abort", () => takeGatedCall(ctx) && void refuse(call, unreadMessage(ctx.signal.reason, maxBodyBytes)), { once: true });
    const declared = Number(ctx.requestHeader.get("content-length") ?? Number.NaN);
    // Only a Connect unary body is the bare message; the others carry it in a 5-byte envelope.
    const enveloped = ctx.protocolName !== "connect" || ctx.method.methodKind !== "unary";
    if (declared - (enveloped ? 5 : 0) > maxBodyBytes) {
      takeGatedCall(ctx);
      throw failed(call, ctx, await refuse(call, bodyTooLarge(maxBodyBytes)));
    }
    // The key too is checked before the message is read: decoding one is what a caller without a key would cost.
    const gone = new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve(), { once: true }));
    const denied = await Promise.race([
      core.authorize(call).then(
        () => undefined,
        (e: unknown) => e,
      ),
      gone,
    ]);
    // A deadline that passes while billing is slow to answer is answered then, not once billing has; metered above.
    if (ctx.signal.aborted) throw failed(call, ctx, unreadMessage(ctx.signal.reason, maxBodyBytes));
    // A key billing could not check is refused by the handler once the message is read, to count it under its model.
    const unchecked = denied instanceof GatewayError && denied.outcome === RequestStatus.UNAVAILABLE;
    if (unchecked && endpoint !== Endpoint.MODELS) ctx.values.set(uncheckedKey, denied);
    else if (denied !== undefined) {
      takeGatedCall(ctx);
      throw failed(call, ctx, await core.handle(call, () => Promise.reject(denied)).catch((e: unknown) => e));
    }
  };
}

/** A refusal as the client gets it, carrying the GatewayError the request gate meters the call with. */
function carrying(error: GatewayError): ConnectError {
  const { code, metadata } = toConnectError(error);
  return new ConnectError(error.message, code, metadata, undefined, error);
}

const maxElements = new Map([
  [ChatCompletionParamsSchema.field.messages, maxMessages],
  [ChatCompletionParamsSchema.field.tools, maxTools],
  [ChatCompletionParamsSchema.field.stop, maxStops],
  [CreateEmbeddingRequestSchema.field.input, maxInputs],
]);

/**
 * GatewayService's routes, each request message held to the contract's list limits and to maxRequestNodes before it
 * is decoded: what the core would refuse after decoding is refused while it is still a few kilobytes of wire bytes.
 * In JSON a field or enum name the contract does not define is InvalidArgument, as OpenAI refuses an unknown
 * parameter: skipped, a misspelt `maxCompletionTokens` or `temperature` would be answered as if it had not been sent.
 * Its bytes count against `bodies`, the bound on request bodies in flight, which answers Unavailable past it.
 */
export function gatewayRoutes(service: ServiceImpl<typeof GatewayService>, maxBodyBytes: number, bodies?: BodyBudget) {
  return (router: ConnectRouter) =>
    limitMessages(router.service(GatewayService, service, { jsonOptions: strictJsonOptions }), {
      maxBytes: maxBodyBytes,
      maxNodes: maxRequestNodes,
      maxElements,
      refuse: (field, max, count) => {
        const error = field
          ? arrayTooLong(field.name, max, count)
          : invalidRequest(`The request message holds more than ${max} nested messages and list elements.`);
        // The error as REST words it; the request gate meters the call with it.
        return new ConnectError(error.message, Code.InvalidArgument, toConnectError(error).metadata, undefined, error);
      },
      // Declared within the limit but inflating past it: refused as a declared length past it is (see the gate).
      inflatedTooLarge: () => carrying(bodyTooLarge(maxBodyBytes)),
      bodies: bodies && {
        hold: () => bodies.hold(),
        refuse: () => carrying(bodiesAtCapacity()),
      },
    });
}

/**
 * GatewayService over Connect, gRPC and gRPC-Web: the same core as the REST API, with the
 * OpenAI parameters carried as typed messages. Every response carries x-request-id.
 */
export function createGatewayService(core: GatewayCore): ServiceImpl<typeof GatewayService> {
  // The gate runs inside the RPC's interceptors: the call it began is already in the RPC's span.
  const begin = (endpoint: Endpoint, ctx: HandlerContext): Call => takeGatedCall(ctx) ?? beginCall(core, endpoint, ctx);

  /** The key's check, the gate's refusal when billing could not answer it, counted under the model named. */
  const authorize = async (call: Call, ctx: HandlerContext, message: { model: string } | undefined) => {
    const unchecked = ctx.values.get(uncheckedKey);
    if (unchecked) {
      core.namedModel(call, message);
      throw unchecked;
    }
    await core.authorize(call);
  };

  return {
    async createChatCompletion(req, ctx) {
      const call = begin(Endpoint.CHAT_COMPLETIONS, ctx);
      try {
        const outcome = await core.handle(call, async () => {
          await authorize(call, ctx, req.params);
          return core.chat(call, chatBody(req.params));
        });
        ctx.responseHeader.set("x-gateway-cost-nanos", outcome.costNanos.toString());
        setLimitHeaders(call, ctx);
        return chatResponse(outcome, call.requestId);
      } catch (e) {
        throw failed(call, ctx, e);
      }
    },

    async listModels(_req, ctx): Promise<ListModelsResponse> {
      const call = begin(Endpoint.MODELS, ctx);
      try {
        const models = await core.handle(call, async () => {
          await core.authorize(call);
          return core.models(call);
        });
        setLimitHeaders(call, ctx);
        return create(ListModelsResponseSchema, {
          models: models.map((route) => ({
            id: route.name,
            ownedBy: route.targets[0]?.provider ?? "",
            inputPerMtok: route.pricing.input,
            cachedInputPerMtok: route.pricing.cachedInput,
            outputPerMtok: route.pricing.output,
          })),
        });
      } catch (e) {
        throw failed(call, ctx, e);
      }
    },

    async *streamChatCompletion(req, ctx) {
      const call = begin(Endpoint.CHAT_COMPLETIONS, ctx);
      let last: ChatCompletionChunk | undefined;
      // What is thrown in while a message is handed out is its write failing: the client left.
      let sending = false;
      try {
        const stream = await core.handle(call, async () => {
          await authorize(call, ctx, req.params);
          return core.chatStream(call, { ...chatBody(req.params), stream: true });
        });
        setLimitHeaders(call, ctx);
        for await (const chunk of stream) {
          last = chunk;
          sending = true;
          yield streamResponse(chunk);
          sending = false;
        }
        sending = true;
        yield create(StreamChatCompletionResponseSchema, {
          id: last?.id ?? "",
          created: int64Of(last?.created),
          model: last?.model ?? "",
          accounting: accounting(stream.outcome as StreamOutcome, call.requestId),
        });
      } catch (e) {
        throw failed(call, ctx, sending ? cancelled() : e);
      }
    },

    async createEmbedding(req, ctx) {
      const call = begin(Endpoint.EMBEDDINGS, ctx);
      try {
        const outcome = await core.handle(call, async () => {
          await authorize(call, ctx, req);
          return core.embed(call, embeddingBody(req));
        });
        ctx.responseHeader.set("x-gateway-cost-nanos", outcome.costNanos.toString());
        setLimitHeaders(call, ctx);
        return create(CreateEmbeddingResponseSchema, {
          model: outcome.response.model,
          data: outcome.response.data.map((d) => ({ index: int32Of(d.index), embedding: floatsOf(d.embedding) })),
          accounting: accounting(outcome, call.requestId),
        });
      } catch (e) {
        throw failed(call, ctx, e);
      }
    },
  };
}

const toolChoiceModes = new Set(["none", "auto", "required"]);

/** ChatCompletionParams as the OpenAI JSON body the core validates; unset optionals stay unset. */
function chatBody(p: ChatCompletionParams | undefined): Record<string, unknown> {
  if (!p) return {};
  const body: Record<string, unknown> = { model: p.model, messages: p.messages.map(messageBody) };
  if (p.temperature !== undefined) body.temperature = p.temperature;
  if (p.topP !== undefined) body.top_p = p.topP;
  if (p.maxTokens !== undefined) body.max_tokens = p.maxTokens;
  if (p.maxCompletionTokens !== undefined) body.max_completion_tokens = p.maxCompletionTokens;
  if (p.stop.length > 0) body.stop = p.stop;
  if (p.n !== undefined) body.n = p.n;
  if (p.seed !== undefined) body.seed = Number(p.seed);
  if (p.user) body.user = p.user;
  if (p.presencePenalty !== undefined) body.presence_penalty = p.presencePenalty;
  if (p.frequencyPenalty !== undefined) body.frequency_penalty = p.frequencyPenalty;
  if (p.tools.length > 0) {
    body.tools = p.tools.map((t) => ({
      type: t.type || "function",
      function: {
        name: t.function?.name ?? "",
        ...(t.function?.description ? { description: t.function.description } : {}),
        ...(t.function?.parameters ? { parameters: t.function.parameters } : {}),
        ...(t.function?.strict ? { strict: true } : {}),
      },
    }));
  }
  if (p.toolChoice) {
    body.tool_choice = toolChoiceModes.has(p.toolChoice)
      ? p.toolChoice
      : { type: "function", function: { name: p.toolChoice } };
  }
  if (p.responseFormat?.type) {
    body.response_format =
      p.responseFormat.type === "json_schema"
        ? { type: "json_schema", json_schema: p.responseFormat.jsonSchema ?? {} }
        : { type: p.responseFormat.type };
  }
  if (Object.keys(p.metadata).length > 0) body.metadata = p.metadata;
  return body;
}

function messageBody(m: ChatMessage): Record<string, unknown> {
  const body: Record<string, unknown> = { role: m.role };
  if (m.parts.length > 0) {
    body.content = m.parts.map(({ part }) => {
      if (part.case === "text") return { type: "text", text: part.value };
      if (part.case === "imageUrl") {
        return { type: "image_url", image_url: { url: part.value.url, ...(part.value.detail ? { detail: part.value.detail } : {}) } };
      }
      // A part with neither set: the core answers that its type is missing.
      return {};
    });
  } else {
    // An assistant turn that only calls tools or refuses has no content.
    body.content = m.content === "" && (m.toolCalls.length > 0 || m.refusal !== "") ? null : m.content;
  }
  if (m.refusal) body.refusal = m.refusal;
  if (m.name) body.name = m.name;
  if (m.toolCalls.length > 0) {
    body.tool_calls = m.toolCalls.map((c) => ({
      id: c.id,
      type: c.type || "function",
      function: { name: c.function?.name ?? "", arguments: c.function?.arguments ?? "" },
    }));
  }
  if (m.toolCallId) body.tool_call_id = m.toolCallId;
  return body;
}

function chatResponse(outcome: ChatOutcome, requestId: string): CreateChatCompletionResponse {
  const c: ChatCompletion = outcome.completion;
  return create(CreateChatCompletionResponseSchema, {
    id: textOf(c.id),
    created: int64Of(c.created),
    model: textOf(c.model),
    systemFingerprint: textOf(c.system_fingerprint),
    choices: c.choices.map((choice) => ({
      index: int32Of(choice.index),
      finishReason: textOf(choice.finish_reason),
      message: {
        role: textOf(choice.message?.role),
        content: textOf(choice.message?.content),
        refusal: textOf(choice.message?.refusal),
        toolCalls: (choice.message?.tool_calls ?? []).flatMap((call) =>
          call.type === "function"
            ? [
                {
                  id: textOf(call.id),
                  type: "function",
                  function: { name: textOf(call.function?.name), arguments: textOf(call.function?.arguments) },
                },
              ]
            : [],
        ),
      },
    })),
    accounting: accounting(outcome, requestId),
  });
}

function accounting(outcome: MeteredOutcome, requestId: string) {
  return {
    requestId,
    usage: outcome.tokens,
    costNanos: outcome.costNanos,
    usageEstimated: outcome.usageEstimated,
    provider: outcome.provider,
  };
}

function streamResponse(chunk: ChatCompletionChunk): StreamChatCompletionResponse {
  return create(StreamChatCompletionResponseSchema, {
    id: textOf(chunk.id),
    created: int64Of(chunk.created),
    model: textOf(chunk.model),
    choices: chunk.choices.map((choice) => ({
      index: int32Of(choice.index),
      role: textOf(choice.delta?.role),
      content: textOf(choice.delta?.content),
      refusal: textOf(choice.delta?.refusal),
      finishReason: textOf(choice.finish_reason),
      toolCalls: (choice.delta?.tool_calls ?? []).map((call) => ({
        index: int32Of(call.index),
        id: textOf(call.id),
        type: textOf(call.type),
        function: { name: textOf(call.function?.name), arguments: textOf(call.function?.arguments) },
      })),
    })),
  });
}

/**
 * CreateEmbeddingRequest as the OpenAI JSON body, for floats. An OpenAI-compatible upstream is asked for them in base64
 * all the same, decoded here: as JSON numbers 2048 vectors of 3072 dimensions are 88 MB from OpenAI, and 137 MB past
 * the gateway's limit on an answer from servers that print each float32 in full (vLLM), where base64 is 34 MB. One that
 * refuses base64 is asked for floats, as a REST client's floats are.
 */
function embeddingBody(req: CreateEmbeddingRequest): Record<string, unknown> {
  const body: Record<string, unknown> = { model: req.model, input: req.input, encoding_format: "float" };
  if (req.dimensions !== undefined) body.dimensions = req.dimensions;
  if (req.user) body.user = req.user;
  return body;
}

/*
 * Upstream JSON as contract fields. An OpenAI-compatible server's answer is relayed as it came over REST; over RPC a
 * field of an odd type (a fractional `created`, tool arguments as an object, vectors as base64) is converted rather
 * than failing an answer the upstream gave and the gateway already metered.
 */
function int64Of(value: unknown): bigint {
  return typeof value === "number" && Number.isFinite(value) ? BigInt(Math.trunc(value)) : 0n;
}

function int32Of(value: unknown): number {
  return typeof value === "number" && Number.isFinite(value) ? Math.max(-(2 ** 31), Math.min(2 ** 31 - 1, Math.trunc(value))) : 0;
}

function textOf(value: unknown): string {
  return typeof value === "string" ? value : value === null || value === undefined ? "" : JSON.stringify(value);
}

/**
 * An embedding as floats: a list of numbers, or base64 of little-endian float32s as OpenAI encodes them. A list of
 * numbers goes as it came: a copy of 2048 vectors of 3072 dimensions is 50 MB more to collect.
 */
function floatsOf(value: unknown): number[] {
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v === "number")) return value;
    return value.map((v) => (typeof v === "number" ? v : Number.NaN));
  }
  return (typeof value === "string" && base64Floats(value)) || [];
}
