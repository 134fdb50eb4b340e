# Shared by bench/mesh.sh, profile.sh, instructions.sh and ab.sh (sourced,
# from the repository's root): the builds, a work directory and the processes
# started, all removed and stopped on exit, free ports and waiting for one,
# and where to pin (echo and proxies on core 0, the load on core 1).
#
# After sourcing: $proxy is the mesh-proxy to measure (MESH_PROXY, or the
# dist build: the proxy as it ships), $bin the release binaries (echo,
# trellis, mesh-bench), $work a temporary directory; `pids+=($!)` after
# starting a process has it stopped on exit (`start` does it); `keep GLOB`
# copies matching files from $work into $KEEP (when set) before it is
# removed.

if [ -n "${MESH_PROXY:-}" ]; then
  cargo build --release -p trellis-echo -p trellis -p trellis-bench
  proxy=$(realpath "$MESH_PROXY")
else
  cargo build --profile dist -p mesh-proxy
  cargo build --release -p trellis-echo -p trellis -p trellis-bench
  proxy=$PWD/target/dist/mesh-proxy
fi
bin=target/release

work=$(mktemp -d)
pids=()
kept=()
keep() { kept+=("$1"); }
bench_stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ] && [ "${#kept[@]}" -gt 0 ]; then
    mkdir -p "$KEEP"
    for glob in "${kept[@]}"; do cp "$work"/$glob "$KEEP"/ 2>/dev/null || true; done
  fi
  rm -rf "$work"
}
trap bench_stop EXIT
trap 'exit 130' INT TERM

# Pin when there are two cores to pin to: "${server_cpu[@]}" CMD runs CMD
# on the server core, "${load_cpu[@]}" CMD on the load generator's.
server_cpu=() load_cpu=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0)
  load_cpu=(taskset -c 1)
fi

# A free port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT LOG: waits up to a minute for a listener on PORT (slow
# under valgrind), else prints LOG and exits.
wait_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "nothing listens on $1; its log:" >&2
  cat "$2" >&2
  exit 1
}

# The processes `start` ran, by name: their PIDs, and the admin ports the
# caller records for the proxies among them.
declare -A pid_of admin_of

# start NAME CMD...: runs CMD on the server core, logging to $work/NAME.log.
start() {
  local name=$1
  shift
  "${server_cpu[@]}" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  pid_of[$name]=$!
}

# wait_ready NAME ADMIN_PORT: up to 10 s for /ready to answer 200, else
# NAME's log and exit.
wait_ready() {
  for _ in $(seq 1 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/ready")" = 200 ]; then return; fi
    sleep 0.05
  done
  echo "$1 is not ready: $(curl -s "http://127.0.0.1:$2/ready"); its log:" >&2
  cat "$work/$1.log" >&2
  exit 1
}

# report NAME...: what each started process saw and said: whether it is
# still running (else the end of its log), the calls of those with an
# admin port by status, and its first warnings and errors. Fails if one
# exited during the run.
report() {
  local name exited=0
  for name in "$@"; do
    if ! kill -0 "${pid_of[$name]}" 2>/dev/null; then
      echo "$name: EXITED during the run; its log:"
      tail -n 20 "$work/$name.log"
      exited=1
      continue
    fi
    if [ -n "${admin_of[$name]:-}" ]; then
      echo "$name: calls by status"
      curl -s "http://127.0.0.1:${admin_of[$name]}/metrics" | grep '^trellis_proxy_requests_total' | sed 's/^/  /' || true
    fi
    warnings "$name" 5
  done
  return "$exited"
}

# warnings NAME N: how many lines of NAME's log warn or say error, and the
# first N of them.
warnings() {
  local problems
  problems=$(grep -ciE 'warn|error' "$work/$1.log" || true)
  if [ "$problems" != 0 ]; then
    echo "$1: $problems log lines with warn/error, first ones:"
    grep -iE 'warn|error' "$work/$1.log" | head -n "$2" | sed 's/^/    /'
  fi
}
