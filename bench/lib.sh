# Shared by bench/mesh.sh, profile.sh, instructions.sh and ab.sh (sourced,
# from the repository's root): the builds, a work directory and the processes
# started, all removed and stopped on exit, free ports and waiting for one,
# and where to pin (echo and proxies on core 0, the load on core 1).
#
# After sourcing: $proxy is the mesh-proxy to measure (MESH_PROXY, or the
# dist build: the proxy as it ships), $bin the release binaries (echo,
# trellis, mesh-bench), $work a temporary directory; `pids+=($!)` after
# starting a process has it stopped on exit; `keep GLOB` copies matching
# files from $work into $KEEP (when set) before it is removed.

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
