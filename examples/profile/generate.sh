#!/usr/bin/env bash
# Generates the Python gRPC stubs of every contract in proto/ into
# target/python-gen (messages *_pb2.py, stubs *_pb2_grpc.py, one package
# per proto package: `from telco.user.v1 import user_pb2`), with grpcio-tools
# from target/pytools (scripts/pytools installs it). The profile service
# imports its own contract and its clients' from there, so both always
# match proto/. Does nothing when the stubs are already up to date; else
# regenerates all of them into a fresh directory and swaps it in, so a
# running service never sees half a tree. Runs from any directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

python=target/pytools/bin/python
out=target/python-gen
[ -x "$python" ] || { echo "generate.sh: $python not found; run scripts/pytools first" >&2; exit 1; }

mapfile -t protos < <(find proto -name '*.proto' -type f | LC_ALL=C sort)
[ ${#protos[@]} -gt 0 ] || { echo "generate.sh: no .proto files under proto/" >&2; exit 1; }

# Up to date: the same contracts (names and contents) and the same
# grpcio-tools as the last generation.
tools_version=$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
stamp=$({ echo "grpcio-tools $tools_version"; sha256sum "${protos[@]}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
  exit 0
fi

mkdir -p target
fresh=$(mktemp -d target/python-gen.XXXXXX)
trap 'rm -rf "$fresh"' EXIT
"$python" -m grpc_tools.protoc -Iproto \
  --python_out="$fresh" --grpc_python_out="$fresh" \
  "${protos[@]#proto/}"
echo "$stamp" >"$fresh/.stamp"

rm -rf "$out.old"
[ -d "$out" ] && mv "$out" "$out.old"
mv "$fresh" "$out"
rm -rf "$out.old"
echo "generate.sh: Python stubs of ${#protos[@]} .proto files in $out" >&2
