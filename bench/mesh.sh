#!/usr/bin/env bash
# Builds the proxy, the echo service and the mesh benchmark in release mode
# and compares, side by side in one run, unary Echo calls (128-byte payload)
# sent to echo
#   direct   load -> echo
#   one-hop  load -> mesh-proxy (h2c in, h2c out) -> echo
#   mesh     load -> client sidecar (h2c in) -> mTLS -> server sidecar -> echo
# with each proxy's CPU time per call and resident memory. Everything is on
# 127.0.0.1; echo and the proxies share core 0 and the load generator has
# core 1 (the Performance budget's setup in ARCHITECTURE.md). Takes about
# 2 minutes after the build; every process stops with the script. Record
# the summary in bench/RESULTS.md.
#
# Flags are passed to mesh-bench (see `target/release/mesh-bench --help`),
# e.g. `bench/mesh.sh --rounds 3 --duration 2s`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p mesh-proxy -p trellis-echo -p trellis -p trellis-bench
bin=target/release

work=$(mktemp -d)
pids=()
declare -A pid_of admin_of
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT
trap 'exit 130' INT TERM

# Pin when there are two cores to pin to.
server_cpu=() load_cpu=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0)
  load_cpu=(taskset -c 1)
fi

used=" "
port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    case $used in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used+="$p "
      echo "$p"
      return
    fi
  done
}

# start NAME CMD...: runs CMD on the server core, logging to $work/NAME.log.
start() {
  local name=$1
  shift
  "${server_cpu[@]}" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  pid_of[$name]=$!
}

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "$1 did not listen on port $2; its log:" >&2
  cat "$work/$1.log" >&2
  exit 1
}

wait_ready() {
  for _ in $(seq 1 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/ready")" = 200 ]; then return; fi
    sleep 0.05
  done
  echo "$1 is not ready: $(curl -s "http://127.0.0.1:$2/ready"); its log:" >&2
  cat "$work/$1.log" >&2
  exit 1
}

"$bin/trellis" certs --dir "$work/certs" --workload echo,bench >/dev/null
certs=$work/certs
identity() { echo --cert "$certs/$1.pem" --key "$certs/$1.key" --ca "$certs/ca.pem"; }

echo_port=$(port)
start echo "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo
wait_port echo "$echo_port"

# The server sidecar: mTLS inbound in front of echo. No registry; its one
# static route only satisfies the rule that a proxy needs some route.
server_in=$(port) server_admin=$(port)
admin_of[server-sidecar]=$server_admin
start server-sidecar "$bin/mesh-proxy" --app "127.0.0.1:$echo_port" \
  --inbound "127.0.0.1:$server_in" --outbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$server_admin" --drain-delay 0s --grace 1s \
  --static-route 'none.v1.None=http://127.0.0.1:9' $(identity echo)

# The client sidecar: every service to the server sidecar over mTLS.
client_out=$(port) client_admin=$(port)
admin_of[client-sidecar]=$client_admin
start client-sidecar "$bin/mesh-proxy" \
  --outbound "127.0.0.1:$client_out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$client_admin" --drain-delay 0s --grace 1s \
  --static-route "*=https://127.0.0.1:$server_in" $(identity bench)

# One plaintext hop: h2c in, h2c straight to echo.
hop_out=$(port) hop_admin=$(port)
admin_of[one-hop]=$hop_admin
start one-hop "$bin/mesh-proxy" \
  --outbound "127.0.0.1:$hop_out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$hop_admin" --drain-delay 0s --grace 1s \
  --static-route "*=http://127.0.0.1:$echo_port" $(identity bench)

for name in server-sidecar client-sidecar one-hop; do
  wait_ready "$name" "${admin_of[$name]}"
done

echo "pinning: ${server_cpu[*]:-none} for echo and proxies, ${load_cpu[*]:-none} for the load generator"
status=0
"${load_cpu[@]}" "$bin/mesh-bench" \
  --target "direct=127.0.0.1:$echo_port" \
  --target "one-hop=127.0.0.1:$hop_out,one-hop" \
  --target "mesh=127.0.0.1:$client_out,client-sidecar,server-sidecar" \
  --proc "echo=${pid_of[echo]}" \
  --proc "one-hop=${pid_of[one-hop]}" \
  --proc "client-sidecar=${pid_of[client-sidecar]}" \
  --proc "server-sidecar=${pid_of[server-sidecar]}" \
  --clk-tck "$(getconf CLK_TCK)" "$@" || status=$?

# What the proxies saw and said: calls by status, and any warning or error.
echo
for name in echo one-hop client-sidecar server-sidecar; do
  if ! kill -0 "${pid_of[$name]}" 2>/dev/null; then
    echo "$name: EXITED during the run; its log:"
    tail -n 20 "$work/$name.log"
    status=1
    continue
  fi
  if [ -n "${admin_of[$name]:-}" ]; then
    echo "$name: calls by status"
    curl -s "http://127.0.0.1:${admin_of[$name]}/metrics" | grep '^trellis_proxy_requests_total' | sed 's/^/  /' || true
  fi
  problems=$(grep -ciE 'warn|error' "$work/$name.log" || true)
  if [ "$problems" != 0 ]; then
    echo "$name: $problems log lines with warn/error, first ones:"
    grep -iE 'warn|error' "$work/$name.log" | head -n 5 | sed 's/^/    /'
  fi
done
exit "$status"
