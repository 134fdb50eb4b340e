#!/usr/bin/env bash
# Profiles one plaintext mesh-proxy hop at saturation: where its CPU time
# goes, by symbol and by part of the stack (kernel, memory copies,
# allocator, h2, hyper, tokio, the proxy's own code, TLS).
#
#   load (mesh-bench, core 1) -> mesh-proxy (h2c in, h2c out) -> echo
#
# echo and the proxy share core 0, as in bench/mesh.sh. perf samples the
# proxy with the software cpu-clock event (works in a VM without hardware
# counters) while the load runs, then prints the summary. Release builds
# keep their symbols, so the flat profile needs no special build.
#
#   bench/profile.sh [SECONDS]        # default 10
#   MESH_PROXY=path/to/mesh-proxy bench/profile.sh   # profile another build
#   MESH_PROFILE_MODE=mesh bench/profile.sh          # the client sidecar of
#                                                    # the mTLS mesh path
#
# Needs perf (Debian: linux-perf). Writes perf.data into a temporary
# directory, removed at the end; `KEEP=dir` keeps it there instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-10}
mode=${MESH_PROFILE_MODE:-one-hop}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

source bench/lib.sh
keep "perf.data*"

"$bin/trellis" certs --dir "$work/certs" --workload echo,bench >/dev/null
identity() { echo --cert "$work/certs/$1.pem" --key "$work/certs/$1.key" --ca "$work/certs/ca.pem"; }

echo_port=$(port)
"${server_cpu[@]}" "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo >"$work/echo.log" 2>&1 &
pids+=($!)
wait_port "$echo_port" "$work/echo.log"

target=127.0.0.1:$echo_port
if [ "$mode" = mesh ]; then
  server_in=$(port)
  "${server_cpu[@]}" "$proxy" --app "$target" --inbound "127.0.0.1:$server_in" \
    --outbound "127.0.0.1:$(port)" --admin "127.0.0.1:$(port)" --drain-delay 0s --grace 1s \
    --static-route 'none.v1.None=http://127.0.0.1:9' $(identity echo) >"$work/server.log" 2>&1 &
  pids+=($!)
  wait_port "$server_in" "$work/server.log"
  route="*=https://127.0.0.1:$server_in"
else
  route="*=http://$target"
fi
out=$(port)
"${server_cpu[@]}" "$proxy" --outbound "127.0.0.1:$out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$(port)" --drain-delay 0s --grace 1s \
  --static-route "$route" $(identity bench) >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
wait_port "$out" "$work/proxy.log"

echo "profiling $proxy ($mode, pid $proxy_pid) for ${seconds}s at saturation"
"${load_cpu[@]}" "$bin/mesh-bench" --target "direct=127.0.0.1:$out" --rounds 1 \
  --warmup 1s --duration "$((seconds + 2))s" --rate 0 >"$work/load.log" 2>&1 &
load_pid=$!
pids+=($load_pid)
sleep 1.5
perf record -q -e cpu-clock -F 4999 ${PERF_CALL_GRAPH:--g} -p "$proxy_pid" -o "$work/perf.data" -- sleep "$seconds" 2>/dev/null
wait "$load_pid" || { cat "$work/load.log"; exit 1; }
grep -E "calls/s|direct" "$work/load.log" | head -n 3 || true

echo
echo "== by part of the stack (self time) =="
perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null |
  python3 "$(dirname "${BASH_SOURCE[0]}")/profile_summary.py"
