#!/usr/bin/env bash
# Builds the proxy as it ships (the dist profile: fat LTO), the echo
# service and the mesh benchmark (release), and compares, side by side in one run, unary Echo calls (128-byte payload)
# and server-streaming Count calls sent to echo
#   direct   load -> echo
#   one-hop  load -> mesh-proxy (h2c in, h2c out) -> echo
#   nginx    load -> nginx grpc_pass (h2c in, h2c out) -> echo
#   haproxy  load -> HAProxy (h2c in, h2c out) -> echo
#   mesh     load -> client sidecar (h2c in) -> mTLS -> server sidecar -> echo
# with each proxy's CPU time per call (per message when streaming) and
# resident memory. nginx and HAProxy are the references for one-hop: one
# worker process, one thread, no logging, connections to echo kept alive;
# they are left out, with a line saying so, when /usr/sbin/nginx or
# /usr/sbin/haproxy is not installed. Everything is on 127.0.0.1; echo and
# the proxies share core 0 and the load generator has core 1 (the
# Performance budget's setup in ARCHITECTURE.md). Takes about 3 minutes
# after the build (2 without nginx and HAProxy); every process stops with
# the script. Record the summary in bench/RESULTS.md.
#
# MESH_PROXY=/path/to/mesh-proxy benchmarks that binary instead of
# target/dist/mesh-proxy, and the mesh-proxy package is not built: run
# the script once per build, e.g. a copy of the old one then the new one,
# for a before/after comparison on the same machine.
#
# Flags are passed to mesh-bench (see `target/release/mesh-bench --help`),
# e.g. `bench/mesh.sh --rounds 3 --duration 2s --stream-duration 0`.
set -euo pipefail
case ${MESH_PROXY:-/} in /*) ;; *) MESH_PROXY=$PWD/$MESH_PROXY ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${MESH_PROXY:-}" ] && [ ! -x "$MESH_PROXY" ]; then
  echo "MESH_PROXY=$MESH_PROXY is not an executable file" >&2
  exit 1
fi
# The builds ($proxy: MESH_PROXY or the dist build), $work, $pids, port,
# wait_port, start, wait_ready, report.
source bench/lib.sh
nginx=/usr/sbin/nginx haproxy=/usr/sbin/haproxy
missing=()
[ -x "$nginx" ] || missing+=(nginx)
[ -x "$haproxy" ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  echo "not installed, so not measured as one-hop references: ${missing[*]} (apt-get install nginx haproxy)"
fi

"$bin/trellis" certs --dir "$work/certs" --workload echo,bench >/dev/null
certs=$work/certs
identity() { echo --cert "$certs/$1.pem" --key "$certs/$1.key" --ca "$certs/ca.pem"; }

echo_port=$(port)
start echo "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo
wait_port "$echo_port" "$work/echo.log"

# The server sidecar: mTLS inbound in front of echo. No registry; its one
# static route only satisfies the rule that a proxy needs some route.
server_in=$(port) server_admin=$(port)
admin_of[server-sidecar]=$server_admin
start server-sidecar "$proxy" --app "127.0.0.1:$echo_port" \
  --inbound "127.0.0.1:$server_in" --outbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$server_admin" --drain-delay 0s --grace 1s \
  --static-route 'none.v1.None=http://127.0.0.1:9' $(identity echo)

# The client sidecar: every service to the server sidecar over mTLS.
client_out=$(port) client_admin=$(port)
admin_of[client-sidecar]=$client_admin
start client-sidecar "$proxy" \
  --outbound "127.0.0.1:$client_out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$client_admin" --drain-delay 0s --grace 1s \
  --static-route "*=https://127.0.0.1:$server_in" $(identity bench)

# One plaintext hop: h2c in, h2c straight to echo.
hop_out=$(port) hop_admin=$(port)
admin_of[one-hop]=$hop_admin
start one-hop "$proxy" \
  --outbound "127.0.0.1:$hop_out" --inbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:$hop_admin" --drain-delay 0s --grace 1s \
  --static-route "*=http://127.0.0.1:$echo_port" $(identity bench)

# The processes measured, and the targets in the order they run in a round
# (direct first: the baseline).
measured=(echo one-hop client-sidecar server-sidecar)
targets=(
  --target "direct=127.0.0.1:$echo_port"
  --target "one-hop=127.0.0.1:$hop_out,one-hop"
)

# The references for one-hop: nginx and HAProxy as the same one plaintext
# hop, one process with one thread, nothing logged per call. Both keep
# their HTTP/2 connections to echo open across calls as mesh-proxy does
# (nginx only with an upstream block's `keepalive`, and it sends one call
# per upstream connection, so it keeps more of them than callers), and
# neither closes a client connection during the run: nginx would by default
# after 1,000 calls on it, and both once it has been idle for a minute or
# so while the other targets ran, and the reconnects would be measured.
if [ -x "$nginx" ]; then
  nginx_port=$(port)
  mkdir "$work/nginx"
  cat >"$work/nginx.conf" <<EOF
# master_process off: the one process that serves is the one measured.
master_process off;
daemon off;
worker_processes 1;
pid $work/nginx/nginx.pid;
# Into $work/nginx.log, which the script reads for warnings at the end.
error_log stderr warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 1h;
  upstream echo {
    server 127.0.0.1:$echo_port;
    keepalive 256;
    keepalive_requests 1000000000;
    keepalive_timeout 1h;
  }
  server {
    listen 127.0.0.1:$nginx_port http2;
    location / { grpc_pass grpc://echo; }
  }
}
EOF
  start nginx "$nginx" -p "$work/nginx" -e stderr -c "$work/nginx.conf"
  wait_port "$nginx_port" "$work/nginx.log"
  measured+=(nginx)
  targets+=(--target "nginx=127.0.0.1:$nginx_port,nginx")
fi
if [ -x "$haproxy" ]; then
  haproxy_port=$(port)
  cat >"$work/haproxy.cfg" <<EOF
# No log lines: nothing is logged.
global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 1h
  timeout http-keep-alive 1h
  timeout server 1h
frontend grpc
  bind 127.0.0.1:$haproxy_port proto h2
  default_backend echo
backend echo
  server echo 127.0.0.1:$echo_port proto h2
EOF
  # -db: in the foreground, one process (no master).
  start haproxy "$haproxy" -db -f "$work/haproxy.cfg"
  wait_port "$haproxy_port" "$work/haproxy.log"
  measured+=(haproxy)
  targets+=(--target "haproxy=127.0.0.1:$haproxy_port,haproxy")
fi
targets+=(--target "mesh=127.0.0.1:$client_out,client-sidecar,server-sidecar")
procs=()
for name in "${measured[@]}"; do procs+=(--proc "$name=${pid_of[$name]}"); done

for name in server-sidecar client-sidecar one-hop; do
  wait_ready "$name" "${admin_of[$name]}"
done

echo "pinning: ${server_cpu[*]:-none} for echo and proxies, ${load_cpu[*]:-none} for the load generator"
status=0
"${load_cpu[@]}" "$bin/mesh-bench" "${targets[@]}" "${procs[@]}" \
  --clk-tck "$(getconf CLK_TCK)" "$@" || status=$?

# What the proxies saw and said: calls by status, and any warning or error.
echo
report "${measured[@]}" || status=1
exit "$status"
