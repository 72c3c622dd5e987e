import { AsyncLocalStorage } from "node:async_hooks";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  createContextKey,
  type HandlerContext,
  type Interceptor,
  type StreamRequest,
  type UnaryRequest,
} from "@connectrpc/connect";

/** A request gate: runs once an RPC's headers are in, before its body is read; throws a ConnectError to refuse it. */
export type RequestGate = (context: HandlerContext) => void | Promise<void>;

type Next = Parameters<Interceptor>[0];
type Answer = Awaited<ReturnType<Next>>;

/** A call whose interceptors began at its gate, waiting for its handler. */
interface BegunCall {
  /** Hands the handler's answer to the interceptors, once. */
  handOver(answer: Promise<Answer>): void;
  /** What the interceptors made of it. */
  answer: Promise<Answer>;
  /** Runs in the context the interceptors gave the call (its span). */
  within: <T>(fn: () => T) => T;
}

const begunCall = createContextKey<BegunCall | undefined>(undefined);

/**
 * A call's interceptors, run from its request gate on rather than from its handler: connect runs a gate before any
 * interceptor, so a call the gate turns away would be neither traced nor counted, and what the gate does (a key
 * check, billing's AuthorizeKey) would fall outside the call's span. `gate` wraps each gate so that it runs inside
 * the interceptors; `interceptor` is then the only one connect is given: it hands a gated call's handler to the
 * interceptors begun at its gate, and runs them itself for a call without a gate.
 */
export function gatedInterceptors(interceptors: Interceptor[]) {
  const run = (next: Next) => interceptors.reduceRight((inner, outer) => outer(inner), next);

  const gate =
    (inner: RequestGate): RequestGate =>
    async (ctx) => {
      let handOver: BegunCall["handOver"] = () => {};
      let handedOver = false;
      const handler = new Promise<Answer>((resolve, reject) => {
        handOver = (answer) => {
          handedOver = true;
          resolve(answer);
        };
        // Every RPC's signal aborts once it is answered: one answered before its handler ran (its message too large or
        // unreadable) ends its interceptors with why, too late for them to change what connect writes of it.
        const answered = () => {
          if (!handedOver) {
            undecodableAsInvalid(ctx.signal.reason);
            wellFormed(ctx.signal.reason);
          }
          reject(ctx.signal.reason);
        };
        // A deadline of 0 (`grpc-timeout: 0n`) has passed before the gate runs, and an aborted signal never aborts
        // again: the call would wait for a handler it never hands over, unanswered.
        if (ctx.signal.aborted) answered();
        else ctx.signal.addEventListener("abort", answered, { once: true });
      });
      let within: BegunCall["within"] = (fn) => fn();
      let passed = () => {};
      const through = new Promise<void>((resolve) => (passed = resolve));
      const answer = run(async () => {
        await inner(ctx);
        within = AsyncLocalStorage.snapshot();
        passed();
        return handler;
      })(requestOf(ctx));
      // Connect awaits the answer through `interceptor`; a call refused or answered before its handler leaves it, or
      // the handler's, failed and unawaited.
      answer.catch(() => {});
      handler.catch(() => {});
      // A refusal comes out of the interceptors as they left it, counted and traced.
      await Promise.race([through, answer]);
      ctx.values.set(begunCall, { handOver, answer, within });
    };

  const interceptor: Interceptor = (next) => async (req) => {
    const begun = req.contextValues.get(begunCall);
    if (!begun) return run((call) => next(decodedAsInvalid(call)))(req);
    // A call whose deadline passed or whose client left while its gate ran is already answered with why: its handler
    // does not run (its failure would be thrown into no one's hands, and what it did would be done for no one).
    if (!req.signal.aborted) begun.handOver(begun.within(() => next(decodedAsInvalid(req))));
    return begun.answer;
  };

  return { gate, interceptor };
}

/**
 * connect answers a binary request message protobuf cannot decode (a string that is not UTF-8, as a JavaScript client
 * writes a lone surrogate, or a truncated message) with Internal, a fault of the server's that is logged, counted
 * and traced as one, where the same message sent as JSON is InvalidArgument. The error is made the caller's before
 * connect writes it: the abort that hands it to the call's signal comes first. Only a call that ended before its
 * handler ran, or a failure of a request stream's own messages: a handler's own "parse binary" failure is a response
 * it could not read, the server's fault.
 */
function undecodableAsInvalid(reason: unknown): void {
  if (!(reason instanceof ConnectError) || reason.code !== Code.Internal) return;
  if (!reason.rawMessage.startsWith("parse binary:")) return;
  const invalid = new ConnectError(reason.rawMessage, Code.InvalidArgument);
  Object.assign(reason, { code: invalid.code, message: invalid.message });
}

/**
 * A failure whose message is not well-formed UTF-16 (a lone surrogate: text cut inside a character, as an echo of a
 * client's input is, an upstream's own, or protobuf's quote of a JSON value it cannot decode) left a gRPC or gRPC-Web
 * call unanswered until its deadline, as connect percent-encodes grpc-message with encodeURIComponent, which throws on
 * it: such a surrogate is U+FFFD, as in UTF-8. Changed in place, as connect may already hold it.
 */
export function wellFormed(error: unknown): unknown {
  if (!(error instanceof ConnectError)) return error;
  const text = error.rawMessage.replace(/\p{Cs}/gu, "\ufffd");
  if (text === error.rawMessage) return error;
  const fixed = new ConnectError(text, error.code);
  return Object.assign(error, { rawMessage: fixed.rawMessage, message: fixed.message });
}

/** A request stream whose messages fail to decode as undecodableAsInvalid says; a unary request as it is. */
function decodedAsInvalid<T extends UnaryRequest | StreamRequest>(req: T): T {
  if (!req.stream) return req;
  const messages = req.message;
  const message = {
    async *[Symbol.asyncIterator]() {
      try {
        yield* messages;
      } catch (e) {
        undecodableAsInvalid(e);
        throw e;
      }
    },
  } as typeof messages;
  return { ...req, message };
}

/** A router whose methods' own request gates run inside the interceptors too. */
export function routerWithGates(router: ConnectRouter, gate: (inner: RequestGate) => RequestGate): ConnectRouter {
  type Options = Parameters<ConnectRouter["rpc"]>[2];
  const wrapped = (options: Options): Options =>
    options?.requestGate ? { ...options, requestGate: gate(options.requestGate) } : options;
  const gated: ConnectRouter = {
    get handlers() {
      return router.handlers;
    },
    service(service, impl, options) {
      router.service(service, impl, wrapped(options));
      return gated;
    },
    rpc(method, impl, options) {
      router.rpc(method, impl, wrapped(options));
      return gated;
    },
  };
  return gated;
}

/** The call as its interceptors see it, before its message is read: they look at its method and headers. */
function requestOf(ctx: HandlerContext): UnaryRequest | StreamRequest {
  return {
    stream: ctx.method.methodKind !== "unary",
    service: ctx.service,
    method: ctx.method,
    requestMethod: ctx.requestMethod,
    url: ctx.url,
    signal: ctx.signal,
    header: ctx.requestHeader,
    contextValues: ctx.values,
    message: undefined,
  } as unknown as UnaryRequest | StreamRequest;
}
