"""trellis.echo.v1.EchoService in Python (grpcio), for the sidecar tests.

It shows the sidecar needs nothing of a service but gRPC: it learns the
service through grpcio's reflection (v1alpha only) and follows grpcio's
health service. Run with the stubs generated from proto/ on PYTHONPATH:

    python echo_server.py 127.0.0.1:PORT NAME
"""

import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from trellis.echo.v1 import echo_pb2, echo_pb2_grpc


class Echo(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self, name):
        self.name = name

    def Echo(self, request, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return echo_pb2.EchoResponse(
            message=request.message,
            payload=request.payload,
            instance=self.name,
            caller=metadata.get("x-trellis-caller", ""),
            headers=metadata,
        )


def main():
    address, name = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo_pb2_grpc.add_EchoServiceServicer_to_server(Echo(name), server)
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    service = echo_pb2.DESCRIPTOR.services_by_name["EchoService"].full_name
    reflection.enable_server_reflection(
        (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(address)
    server.start()
    print(f"python echo {name} serving on {address}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
