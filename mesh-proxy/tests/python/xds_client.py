"""A proxyless client: grpcio's own xDS client and nothing of Trellis.

    GRPC_XDS_BOOTSTRAP=client.xds.json python xds_client.py xds:///echo

Endpoints, balancing, retries and the mTLS to the callee's sidecar all come
from the control plane named in the bootstrap file (the registry). Reads
commands from stdin, one per line, and answers each with one JSON line:

    call N [T]  N Echo calls, each with a deadline of T seconds (5);
                answers {"instances": {name: n},
                "codes": {code: n}, "callers": [...], "errors": [...]}
    quit        exits
"""

import json
import sys
from collections import Counter

import grpc
from trellis.echo.v1 import echo_pb2, echo_pb2_grpc


def main() -> None:
    target = sys.argv[1]
    # Security comes from the clusters' UpstreamTlsContext; the fallback,
    # used only if the control plane sent none, is TLS that no sidecar
    # would accept without a client certificate: never plaintext.
    credentials = grpc.xds_channel_credentials(
        fallback_credentials=grpc.ssl_channel_credentials()
    )
    channel = grpc.secure_channel(target, credentials)
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] != "call":
            print(json.dumps({"error": f"unknown command {words[0]!r}"}), flush=True)
            continue
        timeout = float(words[2]) if len(words) > 2 else 5.0
        instances, codes, callers, errors = Counter(), Counter(), set(), []
        for i in range(int(words[1])):
            try:
                reply = stub.Echo(
                    echo_pb2.EchoRequest(message=f"proxyless {i}"), timeout=timeout
                )
                instances[reply.instance] += 1
                codes["OK"] += 1
                callers.add(reply.caller)
            except grpc.RpcError as e:
                codes[e.code().name] += 1
                if len(errors) < 5:
                    errors.append(f"{e.code().name}: {e.details()}")
        print(
            json.dumps(
                {
                    "instances": instances,
                    "codes": codes,
                    "callers": sorted(callers),
                    "errors": errors,
                }
            ),
            flush=True,
        )
    channel.close()


if __name__ == "__main__":
    main()
