"""A Python gRPC client of gateway.v1.GatewayService, with messages built at run time from the contracts' descriptor
set (`buf build -o`), as any language's client can be: no generated code. Prints what it saw as one JSON object.

    python3 gateway_client.py <host:port> <api key> <descriptor set file>
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

target, api_key, descriptor_set = sys.argv[1:4]

pool = descriptor_pool.DescriptorPool()
files = descriptor_pb2.FileDescriptorSet()
with open(descriptor_set, "rb") as f:
    files.ParseFromString(f.read())
for file in files.file:
    pool.Add(file)


def message(name):
    descriptor = pool.FindMessageTypeByName(name)
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def method(kind, name, request, response):
    return getattr(channel, kind)(
        f"/gateway.v1.GatewayService/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message(f"gateway.v1.{response}").FromString,
    )


def params(content):
    return {"model": "ok", "messages": [{"role": "user", "content": content}], "max_tokens": 16}


channel = grpc.insecure_channel(target)
auth = [("authorization", f"Bearer {api_key}")]
seen = {}

list_models = method("unary_unary", "ListModels", "ListModelsRequest", "ListModelsResponse")
models = list_models(message("gateway.v1.ListModelsRequest")(), metadata=auth, timeout=10)
seen["models"] = [m.id for m in models.models]

create = method("unary_unary", "CreateChatCompletion", "CreateChatCompletionRequest", "CreateChatCompletionResponse")
request = json_format.ParseDict({"params": params("hello from python")}, message("gateway.v1.CreateChatCompletionRequest")())
reply, call = create.with_call(request, metadata=auth, timeout=10)
seen["content"] = reply.choices[0].message.content
seen["cost_nanos"] = reply.accounting.cost_nanos
seen["request_id"] = dict(call.initial_metadata()).get("x-request-id")

stream = method("unary_stream", "StreamChatCompletion", "StreamChatCompletionRequest", "StreamChatCompletionResponse")
request = json_format.ParseDict({"params": params("streamed to python")}, message("gateway.v1.StreamChatCompletionRequest")())
pieces, accounting = [], None
for chunk in stream(request, metadata=auth, timeout=10):
    pieces.extend(choice.content for choice in chunk.choices)
    if chunk.HasField("accounting"):
        accounting = chunk.accounting
seen["streamed"] = "".join(pieces)
seen["streamed_output_tokens"] = accounting.usage.output_tokens if accounting else None

try:
    create(json_format.ParseDict({"params": params("x")}, message("gateway.v1.CreateChatCompletionRequest")()),
           metadata=[("authorization", "Bearer sk-wrong")], timeout=10)
    seen["refused"] = None
except grpc.RpcError as e:
    seen["refused"] = {"code": e.code().name, "error_code": dict(e.trailing_metadata() or ()).get("x-error-code"),
                       "message": e.details()}

try:
    bad = {"params": {**params("x"), "temperature": 5}}
    create(json_format.ParseDict(bad, message("gateway.v1.CreateChatCompletionRequest")()), metadata=auth, timeout=10)
    seen["invalid"] = None
except grpc.RpcError as e:
    trailers = dict(e.trailing_metadata() or ())
    seen["invalid"] = {"code": e.code().name, "param": trailers.get("x-error-param"), "message": e.details()}

print(json.dumps(seen))
