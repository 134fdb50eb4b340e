#!/usr/bin/env bash
# What tracing costs a call (#13). Builds the proxy as it ships (dist),
# echo, mesh-bench and otlp-sink (release), then measures, side by side in
# one mesh-bench run, unary Echo calls (128-byte payload) on
#   mesh     load -> client sidecar (h2c in) -> mTLS -> server sidecar -> echo
#   hop      load -> mesh-proxy (h2c in, h2c out) -> echo
# with five sets of proxies, one per tracing variant:
#   off      no OTEL_EXPORTER_OTLP_ENDPOINT: nothing recorded, the context
#            (none here) passes through
#   0%       OTEL_TRACES_SAMPLER=always_off: no span, a traceparent is still
#            made and passed on
#   1%       parentbased_traceidratio 0.01: no traceparent comes in, so the
#            first proxy starts the trace and the server sidecar follows it
#   100%     always_on, exporting to a live collector (bench/src/bin/
#            otlp_sink.rs: decodes every export, counts the spans)
#   down     always_on, the collector's endpoint a closed port on 127.0.0.1
# Every round runs all ten targets in turn (mesh-off, hop-off, mesh-0%, ...)
# so the machine's drift falls on all alike; medians of the rounds. Per
# variant: calls/s, p50/p99 at saturation and at a fixed 2,000 calls/s, the
# proxies' CPU µs per call (exact, from schedstat) and the collector's, and
# failed calls; then each proxy's span counters from /metrics
# (trellis_proxy_spans_exported_total, trellis_proxy_spans_dropped_total),
# what the collector received, and the steal time over the run.
#
#   bench/tracing.sh                 # 5 rounds, ~6 minutes after the build
#   bench/tracing.sh --rounds 3 --duration 2s    # flags go to mesh-bench
#   MESH_PROXY=/path/to/mesh-proxy bench/tracing.sh   # another proxy build
#
# Echo, the proxies and the collector share core 0, the load generator has
# core 1 (as in bench/mesh.sh). Every process stops with the script. Record
# the summary in bench/RESULTS.md.
set -euo pipefail
case ${MESH_PROXY:-/} in /*) ;; *) MESH_PROXY=$PWD/$MESH_PROXY ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${MESH_PROXY:-}" ] && [ ! -x "$MESH_PROXY" ]; then
  echo "MESH_PROXY=$MESH_PROXY is not an executable file" >&2
  exit 1
fi
# For mesh-bench; the positional parameters are reused below.
bench_flags=("$@")
# The caller's OTEL_* settings would change what is measured.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^OTEL_' || true)
# The builds ($proxy, $bin), $work, $pids, port, wait_port, start,
# wait_ready, warnings.
source bench/lib.sh

"$bin/trellis" certs --dir "$work/certs" --workload echo,bench >/dev/null
certs=$work/certs
identity() { echo --cert "$certs/$1.pem" --key "$certs/$1.key" --ca "$certs/ca.pem"; }

echo_port=$(port)
start echo "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo
wait_port "$echo_port" "$work/echo.log"

# The collector of the 1 % and 100 % variants.
sink_port=$(port)
start sink "$bin/otlp-sink" --listen "127.0.0.1:$sink_port"
wait_port "$sink_port" "$work/sink.log"
# The "down" variant's collector: a port bound and held by a socket that
# never listens, so connecting is refused and no other process can take
# the port during the run (checked again at the end).
python3 -c 'import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
time.sleep(1e9)' >"$work/closed-port" &
pids+=($!)
for _ in $(seq 1 50); do [ -s "$work/closed-port" ] && break; sleep 0.1; done
closed_port=$(cat "$work/closed-port")

variants=(off 0% 1% 100% down)
# The environment of each variant's proxies.
otel_env() {
  case $1 in
    off) ;;
    0%) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port OTEL_TRACES_SAMPLER=always_off ;;
    1%) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port \
      OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01 ;;
    100%) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port OTEL_TRACES_SAMPLER=always_on ;;
    down) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$closed_port OTEL_TRACES_SAMPLER=always_on ;;
  esac
}

measured=(echo sink)
targets=()
for v in "${variants[@]}"; do
  # shellcheck disable=SC2046 # one word per variable
  set -- $(otel_env "$v")
  environment=(env "$@")
  # The collector's CPU is shown beside the proxies' where it gets spans.
  collector=""
  case $v in 1% | 100%) collector=,sink ;; esac

  # The server sidecar: mTLS inbound in front of echo (its static route
  # only satisfies the rule that a proxy needs some route).
  server_in=$(port) admin=$(port)
  admin_of[server-$v]=$admin
  start "server-$v" "${environment[@]}" "$proxy" --app "127.0.0.1:$echo_port" \
    --inbound "127.0.0.1:$server_in" --outbound "127.0.0.1:$(port)" \
    --admin "127.0.0.1:$admin" --drain-delay 0s --grace 1s \
    --static-route 'none.v1.None=http://127.0.0.1:9' $(identity echo)

  # The client sidecar: every service to the server sidecar over mTLS.
  client_out=$(port) admin=$(port)
  admin_of[client-$v]=$admin
  start "client-$v" "${environment[@]}" "$proxy" \
    --outbound "127.0.0.1:$client_out" --inbound "127.0.0.1:$(port)" \
    --admin "127.0.0.1:$admin" --drain-delay 0s --grace 1s \
    --static-route "*=https://127.0.0.1:$server_in" $(identity bench)

  # One plaintext hop straight to echo.
  hop_out=$(port) admin=$(port)
  admin_of[hop-$v]=$admin
  start "hop-$v" "${environment[@]}" "$proxy" \
    --outbound "127.0.0.1:$hop_out" --inbound "127.0.0.1:$(port)" \
    --admin "127.0.0.1:$admin" --drain-delay 0s --grace 1s \
    --static-route "*=http://127.0.0.1:$echo_port" $(identity bench)

  measured+=("client-$v" "server-$v" "hop-$v")
  targets+=(
    --target "mesh-$v=127.0.0.1:$client_out,client-$v,server-$v$collector"
    --target "hop-$v=127.0.0.1:$hop_out,hop-$v$collector"
  )
done
procs=()
for name in "${measured[@]}"; do procs+=(--proc "$name=${pid_of[$name]}"); done
for v in "${variants[@]}"; do
  for side in server client hop; do wait_ready "$side-$v" "${admin_of[$side-$v]}"; done
done

# Steal time: /proc/stat's cpu lines before and after, and vmstat meanwhile.
cp /proc/stat "$work/stat.before"
vmstat -n 10 >"$work/vmstat.log" 2>&1 &
pids+=($!)

echo "pinning: ${server_cpu[*]:-none} for echo, proxies and collector, ${load_cpu[*]:-none} for the load generator"
status=0
"${load_cpu[@]}" "$bin/mesh-bench" "${targets[@]}" "${procs[@]}" \
  --clk-tck "$(getconf CLK_TCK)" --cpu-clock schedstat --stream-duration 0s "${bench_flags[@]}" \
  | tee "$work/mesh-bench.out" || status=$?
cp /proc/stat "$work/stat.after"

echo
echo "per variant: medians of the rounds; × off, Δ and +CPU are against the"
echo "same path with tracing off, taken within each round, then the median"
python3 bench/tracing_summary.py "$work/mesh-bench.out" || status=1

echo
echo "CPU over the run (/proc/stat; steal is time a hypervisor gave to others):"
python3 - "$work/stat.before" "$work/stat.after" <<'EOF'
import sys
def read(path):
    rows = {}
    for line in open(path):
        if line.startswith("cpu"):
            f = line.split()
            rows[f[0]] = [int(x) for x in f[1:9]]
    return rows
before, after = read(sys.argv[1]), read(sys.argv[2])
for cpu in sorted(after):
    d = [a - b for a, b in zip(after[cpu], before[cpu])]
    total = sum(d) or 1
    user, nice, system, idle, iowait, irq, softirq, steal = d
    print(f"  {cpu:<5} user {100*(user+nice)/total:5.1f} %  system {100*(system+irq+softirq)/total:5.1f} %"
          f"  idle {100*(idle+iowait)/total:5.1f} %  steal {100*steal/total:5.2f} % ({steal} jiffies)")
EOF
echo "  vmstat every 10 s (st = steal %):"
sed 's/^/    /' "$work/vmstat.log"

# Partial batches go out within OTEL_BSP_SCHEDULE_DELAY (5 s by default).
sleep 6
echo
echo "spans by proxy (/metrics, warm-up and first calls included):"
echo "(ctx switches/call: voluntary + involuntary context switches of all the proxy's"
echo "threads since it started, per call it answered: wake-ups between threads)"
printf '  %-12s %10s %10s %12s %14s %18s\n' proxy "calls OK" exported "queue_full" "export_failed" "ctx switches/call"
exported_sum=0
for v in "${variants[@]}"; do
  for side in client server hop; do
    name=$side-$v
    if ! kill -0 "${pid_of[$name]}" 2>/dev/null; then
      echo "  $name: EXITED during the run; its log:"
      tail -n 20 "$work/$name.log"
      status=1
      continue
    fi
    metrics=$(curl -s "http://127.0.0.1:${admin_of[$name]}/metrics")
    value() { echo "$metrics" | awk -v m="$1" '$1 == m { s += $2 } END { print s + 0 }'; }
    ok=$(echo "$metrics" | awk '/^trellis_proxy_requests_total\{/ && /grpc_status="OK"/ { s += $2 } END { print s + 0 }')
    failed=$(echo "$metrics" | awk '/^trellis_proxy_requests_total\{/ && !/grpc_status="OK"/ { s += $2 } END { print s + 0 }')
    exported=$(value trellis_proxy_spans_exported_total)
    queue_full=$(value 'trellis_proxy_spans_dropped_total{reason="queue_full"}')
    export_failed=$(value 'trellis_proxy_spans_dropped_total{reason="export_failed"}')
    exported_sum=$((exported_sum + exported))
    switches=$(cat /proc/"${pid_of[$name]}"/task/*/status 2>/dev/null | awk '/ctxt_switches:/ { s += $2 } END { print s + 0 }')
    per_call=$(awk -v s="$switches" -v n="$ok" 'BEGIN { printf "%.2f", n ? s / n : 0 }')
    printf '  %-12s %10s %10s %12s %14s %18s\n' "$name" "$ok" "$exported" "$queue_full" "$export_failed" "$per_call"
    if [ "$failed" != 0 ]; then
      echo "  $name: $failed calls answered with another status than OK:"
      echo "$metrics" | grep '^trellis_proxy_requests_total' | grep -v 'grpc_status="OK"' | sed 's/^/    /'
      status=1
    fi
  done
done

kill -TERM "${pid_of[sink]}"
wait "${pid_of[sink]}" || true
echo
sed 's/^/  /' "$work/sink.log"
echo "  the proxies counted $exported_sum spans exported"
if (exec 3<>"/dev/tcp/127.0.0.1/$closed_port") 2>/dev/null; then
  echo "  WARNING: something listened on the down variant's port $closed_port during the run"
  status=1
fi

echo
for name in "${measured[@]}"; do warnings "$name" 3; done
keep 'mesh-bench.out'
keep 'vmstat.log'
exit "$status"
