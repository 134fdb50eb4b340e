#!/usr/bin/env bash
# Counts the instructions one mesh-proxy hop executes per call, with
# valgrind's callgrind: a figure that does not move with the machine's
# noise (other tenants, frequency, steal), so two builds can be compared
# on a busy machine where CPU time per call cannot. It counts user-space
# instructions only (the kernel's share, sockets and scheduling, is not
# in it) and says nothing about time spent waiting; bench/mesh.sh remains
# the measure of time.
#
#   load (mesh-bench) -> mesh-proxy under callgrind (h2c in, h2c out) -> echo
#
#   bench/instructions.sh                 # the tree's release build
#   MESH_PROXY=path bench/instructions.sh # another build, e.g. the one before
#   CALLS=5000 bench/instructions.sh      # calls measured (default 2000)
#
# Counters are zeroed after 500 warm-up calls, so start-up and the first
# connections are not counted. Takes under a minute. `KEEP=dir` keeps the
# callgrind files there, for `callgrind_annotate dir/callgrind.*.1`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
calls=${CALLS:-2000}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

source bench/lib.sh
keep "callgrind.*"

"$bin/trellis" certs --dir "$work/certs" --workload bench >/dev/null
echo_port=$(port)
"$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo >"$work/echo.log" 2>&1 &
pids+=($!)
wait_port "$echo_port" "$work/echo.log"

out=$(port)
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.%p" \
  "$proxy" --outbound "127.0.0.1:$out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$(port)" --drain-delay 0s --grace 1s \
  --static-route "*=http://127.0.0.1:$echo_port" \
  --cert "$work/certs/bench.pem" --key "$work/certs/bench.key" --ca "$work/certs/ca.pem" \
  >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
wait_port "$out" "$work/proxy.log"

load() {
  "$bin/mesh-bench" --target "one-hop=127.0.0.1:$out" --rounds 1 --warmup 0s \
    --requests "$1" --duration 600s --rate 0 --stream-duration 0s --concurrency 8 \
    --connections 1 >"$work/load.log" 2>&1 || { cat "$work/load.log" >&2; exit 1; }
}
load 500
callgrind_control -z "$proxy_pid" >/dev/null 2>&1
load "$calls"
callgrind_control -d "$proxy_pid" >/dev/null 2>&1
sleep 1
total=$(cat "$work"/callgrind.* | awk '/^(summary|totals):/ { if ($2 > max) max = $2 } END { print max }')
if [ -z "$total" ] || [ "$total" = 0 ]; then
  echo "callgrind wrote no counts" >&2
  exit 1
fi
echo "$proxy: $((total / calls)) instructions per call (one h2c hop, $calls calls, 8 at a time over 1 connection)"
