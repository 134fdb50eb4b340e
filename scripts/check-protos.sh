#!/usr/bin/env bash
# Checks the protobuf contracts in proto/:
#   1. `buf lint` (rules in proto/buf.yaml) passes;
#   2. every .proto compiles with protoc (grpcio-tools) into Python stubs;
#   3. every generated *_pb2.py and *_pb2_grpc.py module imports.
# Needs: buf (pip install buf-bin) and python3 with grpcio-tools.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

fail() {
  echo "check-protos: $*" >&2
  exit 1
}

command -v buf >/dev/null 2>&1 \
  || fail "buf not found on PATH; install it with: pip install buf-bin"
command -v python3 >/dev/null 2>&1 || fail "python3 not found on PATH"
python3 -c 'import grpc_tools.protoc' 2>/dev/null \
  || fail "python3 cannot import grpc_tools; install it with: pip install grpcio-tools"

# (a) Lint.
(cd proto && buf lint) || fail "buf lint failed (see above)"

# (b) Generate Python stubs for every .proto under proto/.
mapfile -t protos < <(cd proto && find . -name '*.proto' -type f | sed 's|^\./||' | LC_ALL=C sort)
[[ ${#protos[@]} -gt 0 ]] || fail "no .proto files found under proto/"

out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

proto_args=()
for p in "${protos[@]}"; do
  proto_args+=("proto/$p")
done
python3 -m grpc_tools.protoc -Iproto \
  --python_out="$out_dir" --grpc_python_out="$out_dir" \
  "${proto_args[@]}" || fail "protoc failed to generate Python stubs"

# (c) Import every generated module.
mapfile -t modules < <(cd "$out_dir" && find . -name '*_pb2.py' -o -name '*_pb2_grpc.py' \
  | sed -e 's|^\./||' -e 's|\.py$||' -e 's|/|.|g' | LC_ALL=C sort)
expected=$((2 * ${#protos[@]}))
[[ ${#modules[@]} -eq $expected ]] \
  || fail "expected $expected generated modules, found ${#modules[@]}: ${modules[*]}"

PYTHONPATH="$out_dir" python3 - "${modules[@]}" <<'PY' || fail "a generated module failed to import"
import importlib
import sys

for name in sys.argv[1:]:
    importlib.import_module(name)
PY

echo "protos: buf lint ok, ${#protos[@]} files generated and imported"
