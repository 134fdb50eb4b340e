#!/usr/bin/env bash
# Compares, side by side in one run, unary Echo calls (128-byte payload)
# offered at a fixed rate (open loop, 2,000 calls/s by default) by the same
# Python grpcio client (bench/proxyless_load.py, grpc.aio) along three paths:
#   direct     client -> trellis-echo (h2c)
#   sidecar    client -> its own mesh-proxy's outbound port (h2c) -> mTLS
#              -> echo's mesh-proxy inbound -> echo
#   proxyless  client with GRPC_XDS_BOOTSTRAP, target xds:///echo and
#              grpc.xds_channel_credentials -> mTLS -> echo's mesh-proxy
#              inbound -> echo
# Both sidecars and the proxyless client take their routes and endpoints
# from a real trellis-registry (with its xDS ADS on the same port). For
# each path: achieved rate, p50/p90/p99 latency (from when each call was
# due), errors, CPU seconds per 1,000 calls of the client process and of
# each proxy (utime + stime from /proc/PID/stat over the measured window),
# and the machine's steal time (/proc/stat) over the same window. Several
# rounds, the order of the paths rotated from round to round; the table
# gives the medians of the rounds, then every run.
#
# The proxies are the dist build (as it ships, bench/lib.sh), or
# MESH_PROXY; the rest are release builds.
#
# Everything on 127.0.0.1; with taskset and two cores, the registry, echo
# and both proxies share core 0 and the Python client has core 1 (the
# Performance budget's setup in ARCHITECTURE.md). Every process stops with
# the script. Needs target/pytools (scripts/pytools) for grpcio and
# grpcio-tools. Takes about rounds x 3 x (duration + warm-up + ~2 s) after
# the build.
#
#   bench/proxyless.sh [--rounds 3] [--duration 10] [--rate 2000] [--warmup 2]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rounds=3 duration=10 rate=2000 warmup=2
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2 ;;
    --duration) duration=$2 ;;
    --rate) rate=$2 ;;
    --warmup) warmup=$2 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown flag $1 (see --help)" >&2
      exit 2
      ;;
  esac
  shift 2 || { echo "$1 needs a value" >&2; exit 2; }
done

py=target/pytools/bin/python
if ! "$py" -c 'import grpc, grpc_tools.protoc' 2>/dev/null; then
  echo "$py with grpcio and grpcio-tools is needed: run scripts/pytools" >&2
  exit 1
fi

# The dist mesh-proxy (as it ships) and release echo and trellis, a work
# directory, pinning, ports, start, wait_ready, report, and stopping
# everything on exit.
source bench/lib.sh
cargo build --release -p trellis-registry

# wait_up NAME PORT: a listener on PORT, else NAME's log and exit.
wait_up() { wait_port "$2" "$work/$1.log"; }

reg_port=$(port)
certs=$work/certs
"$bin/trellis" certs --dir "$certs" --workload registry,echo,benchclient \
  --xds-bootstrap "127.0.0.1:$reg_port" >/dev/null
identity() { echo --cert "$certs/$1.pem" --key "$certs/$1.key" --ca "$certs/ca.pem"; }

mkdir "$work/stubs" "$work/config" "$work/runs"
"$py" -m grpc_tools.protoc -I proto --python_out="$work/stubs" \
  --grpc_python_out="$work/stubs" proto/trellis/echo/v1/echo.proto

echo "starting the registry, echo, echo's sidecar and the client's sidecar"
# shellcheck disable=SC2046 # identity's words are meant to split
start registry "$bin/trellis-registry" --listen "127.0.0.1:$reg_port" \
  --config-dir "$work/config" $(identity registry)
wait_up registry "$reg_port"

echo_port=$(port)
start echo "$bin/trellis-echo" --listen "127.0.0.1:$echo_port" --name echo-1
wait_up echo "$echo_port"

# echo's sidecar: mTLS inbound in front of echo, registered as `echo`.
echo_in=$(port)
admin_of[echo-sidecar]=$(port)
# shellcheck disable=SC2046
start echo-sidecar "$proxy" --app "127.0.0.1:$echo_port" \
  --inbound "127.0.0.1:$echo_in" --outbound "127.0.0.1:$(port)" \
  --admin "127.0.0.1:${admin_of[echo-sidecar]}" \
  --registry "127.0.0.1:$reg_port" $(identity echo)

# The client's sidecar: no app; routes by gRPC service name, from the
# registry, over mTLS to echo's sidecar.
client_out=$(port)
admin_of[client-sidecar]=$(port)
# shellcheck disable=SC2046
start client-sidecar "$proxy" \
  --inbound "127.0.0.1:$(port)" --outbound "127.0.0.1:$client_out" \
  --admin "127.0.0.1:${admin_of[client-sidecar]}" \
  --registry "127.0.0.1:$reg_port" $(identity benchclient)

for name in echo-sidecar client-sidecar; do wait_ready "$name" "${admin_of[$name]}"; done

paths=(direct sidecar proxyless)
procs=()
for name in registry echo echo-sidecar client-sidecar; do procs+=(--proc "$name=${pid_of[$name]}"); done
echo "pinning: ${server_cpu[*]:-none} for the registry, echo and proxies, ${load_cpu[*]:-none} for the client"
echo "$rounds rounds x ${paths[*]}: $rate calls/s offered for ${duration}s each (after ${warmup}s warm-up)"

status=0
run_limit=$(python3 -c "print(int($duration + $warmup + 90))")
for ((r = 0; r < rounds; r++)); do
  for ((i = 0; i < ${#paths[@]}; i++)); do
    path=${paths[$(((i + r) % ${#paths[@]}))]}
    case $path in
      direct) target=(--target "127.0.0.1:$echo_port") ;;
      sidecar) target=(--target "127.0.0.1:$client_out") ;;
      proxyless) target=(--target "xds:///echo" --xds) ;;
    esac
    out=$work/runs/$path.$r.json
    if ! GRPC_XDS_BOOTSTRAP=$certs/benchclient.xds.json PYTHONPATH=$work/stubs \
      timeout "$run_limit" "${load_cpu[@]}" "$py" bench/proxyless_load.py "${target[@]}" \
      --rate "$rate" --duration "$duration" --warmup "$warmup" "${procs[@]}" \
      >"$out" 2>"$work/runs/$path.$r.err"; then
      echo "round $((r + 1))/$rounds $path: FAILED; its output:"
      tail -n 20 "$work/runs/$path.$r.err"
      rm -f "$out"
      status=1
      continue
    fi
    "$py" - "$out" "$path" "$((r + 1))/$rounds" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
c = d["cpu_s_per_1k"]
print(f"round {sys.argv[3]} {sys.argv[2]:>9}: {d['rate']:7.0f} calls/s, "
      f"p50/p90/p99 {d['p50_us']:.0f}/{d['p90_us']:.0f}/{d['p99_us']:.0f} us, "
      f"errors {d['errors']}, CPU s/1k calls client {c['client']:.3f} "
      f"client-sidecar {c['client-sidecar']:.3f} echo-sidecar {c['echo-sidecar']:.3f}, "
      f"steal {d['steal_pct']:.1f} %", flush=True)
EOF
  done
done

echo
echo "## Medians of $rounds rounds ($rate calls/s offered, ${duration}s each; dist mesh-proxy)"
echo
"$py" - "$work/runs" "${paths[@]}" <<'EOF' || status=1
import glob, json, os, statistics, sys

runs_dir, paths = sys.argv[1], sys.argv[2:]
on_path = {
    "direct": [],
    "sidecar": ["client-sidecar", "echo-sidecar"],
    "proxyless": ["echo-sidecar"],
}
runs = {p: [json.load(open(f)) for f in sorted(glob.glob(os.path.join(runs_dir, f"{p}.*.json")))]
        for p in paths}
med = statistics.median

def cpu(rs, name):
    return med(r["cpu_s_per_1k"][name] for r in rs)

print("| path | calls/s (offered) | p50 µs | p90 µs | p99 µs | errors | client CPU s/1k calls "
      "| client sidecar s/1k | echo sidecar s/1k | proxies total s/1k | echo s/1k | steal % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for p in paths:
    rs = runs[p]
    if not rs:
        print(f"| {p} | no run succeeded | | | | | | | | | | |")
        continue
    offered = rs[0]["offered_rate"]
    proxies = on_path[p]
    cs = f"{cpu(rs, 'client-sidecar'):.3f}" if "client-sidecar" in proxies else "–"
    es = f"{cpu(rs, 'echo-sidecar'):.3f}" if "echo-sidecar" in proxies else "–"
    total = f"{med(sum(r['cpu_s_per_1k'][n] for n in proxies) for r in rs):.3f}" if proxies else "–"
    errors = sum(r["errors"] for r in rs)
    calls = sum(r["calls"] for r in rs)
    print(f"| {p} | {med(r['rate'] for r in rs):,.0f} ({offered:,.0f}) | {med(r['p50_us'] for r in rs):,.0f} "
          f"| {med(r['p90_us'] for r in rs):,.0f} | {med(r['p99_us'] for r in rs):,.0f} "
          f"| {errors} of {calls:,} | {cpu(rs, 'client'):.3f} | {cs} | {es} | {total} "
          f"| {cpu(rs, 'echo'):.3f} | {med(r['steal_pct'] for r in rs):.1f} |")

print()
print("Raw runs (round order as run):")
for p in paths:
    for i, r in enumerate(runs[p]):
        c = r["cpu_s_per_1k"]
        print(f"- {p} #{i + 1}: {r['rate']:.0f} calls/s, p50/p90/p99 {r['p50_us']:.0f}/{r['p90_us']:.0f}/"
              f"{r['p99_us']:.0f} µs (max {r['max_us']:.0f}, client late p99 {r['send_late_p99_us']:.0f}), "
              f"errors {r['errors']} {r['codes']}, CPU s/1k: client {c['client']:.3f}, client-sidecar "
              f"{c['client-sidecar']:.3f}, echo-sidecar {c['echo-sidecar']:.3f}, echo {c['echo']:.3f}, "
              f"registry {c['registry']:.3f}; steal {r['steal_pct']:.2f} %")
        for e in r["error_samples"]:
            print(f"    error: {e}")
if any(not runs[p] for p in paths):
    sys.exit(1)
EOF

# What the proxies saw and said: calls by status, and any warning or error.
echo
report registry echo echo-sidecar client-sidecar || status=1
exit "$status"
