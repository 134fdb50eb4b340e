"""A client that knows nothing of the mesh's contracts: everything it sends
and reads is built from what the edge's server reflection returns.

    python reflect_client.py HOST:PORT [HEADER=VALUE ...]

Prints one JSON object: the services listed, the description of the echo
service's methods, and the answers to a unary and a server-streaming call
whose requests were built from JSON.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "trellis.echo.v1.EchoService"


def main() -> None:
    target = sys.argv[1]
    metadata = [tuple(arg.split("=", 1)) for arg in sys.argv[2:]]
    channel = grpc.insecure_channel(target)
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)

    services = sorted(database.get_services())
    service = pool.FindServiceByName(SERVICE)
    methods = {
        m.name: {
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "server_streaming": m.server_streaming,
            "client_streaming": m.client_streaming,
        }
        for m in service.methods
    }
    # A message type from an import resolves too (the Sleep request uses
    # google.protobuf.Duration).
    sleep_fields = [
        f.message_type.full_name
        for f in pool.FindMessageTypeByName("trellis.echo.v1.SleepRequest").fields
        if f.message_type is not None
    ]

    def call(method_name, body):
        method = service.FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(json.dumps(body), request_class())
        path = f"/{SERVICE}/{method_name}"
        if method.server_streaming:
            stub = channel.unary_stream(
                path,
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            return [
                json_format.MessageToDict(r)
                for r in stub(request, metadata=metadata, timeout=10)
            ]
        stub = channel.unary_unary(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return json_format.MessageToDict(stub(request, metadata=metadata, timeout=10))

    print(
        json.dumps(
            {
                "services": services,
                "methods": methods,
                "sleep_fields": sleep_fields,
                "echo": call("Echo", {"message": "from python"}),
                "count": call("Count", {"count": 3}),
            }
        )
    )


if __name__ == "__main__":
    main()
