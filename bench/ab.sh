#!/usr/bin/env bash
# Compares two mesh-proxy builds as one plaintext hop, side by side in one
# mesh-bench run: each round runs A then B, so the machine's drift falls
# on both alike, and the summary gives B's calls/s as a ratio of A's and
# each proxy's CPU per call and memory. For changes too small for
# bench/mesh.sh's separate runs to tell apart (this machine moves ±10 %
# between runs minutes apart); bench/instructions.sh is the other way.
#
#   bench/ab.sh OLD_PROXY NEW_PROXY [mesh-bench flags]
#   bench/ab.sh /tmp/old/mesh-proxy target/dist/mesh-proxy --rounds 5 --duration 2s
#
# Echo and both proxies share core 0, the load generator has core 1.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
a=$(realpath "$1") b=$(realpath "$2")
shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESH_PROXY=$a
source bench/lib.sh

"$bin/trellis" certs --dir "$work/certs" --workload bench >/dev/null
echo_port=$(port)
"${server_cpu[@]}" "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo >"$work/echo.log" 2>&1 &
pids+=($!)
wait_port "$echo_port" "$work/echo.log"

targets=() procs=()
for side in a b; do
  binary=$a
  [ "$side" = b ] && binary=$b
  out=$(port)
  "${server_cpu[@]}" "$binary" --outbound "127.0.0.1:$out" --inbound "127.0.0.1:$(port)" \
    --admin "127.0.0.1:$(port)" --drain-delay 0s --grace 1s \
    --static-route "*=http://127.0.0.1:$echo_port" \
    --cert "$work/certs/bench.pem" --key "$work/certs/bench.key" --ca "$work/certs/ca.pem" \
    >"$work/$side.log" 2>&1 &
  pids+=($!)
  targets+=(--target "$side=127.0.0.1:$out,$side")
  procs+=(--proc "$side=$!")
  wait_port "$out" "$work/$side.log"
done

echo "a = $a"
echo "b = $b"
"${load_cpu[@]}" "$bin/mesh-bench" "${targets[@]}" "${procs[@]}" \
  --clk-tck "$(getconf CLK_TCK)" --rate 0 --stream-duration 0s "$@"
