#!/usr/bin/env bash
# Builds the registry and its benchmark (release) and compares, side by
# side in one run, the registry's two stores:
#   embedded  one trellis-registry, its state in memory;
#   etcd      a 3-member etcd cluster started here on 127.0.0.1 (free
#             ports, data in a temporary directory) and two registry
#             replicas with --store etcd://<the three members>.
# Each round runs embedded then etcd, each on fresh processes (a fresh etcd
# cluster too), so drift on the machine falls on both alike. In each,
# registry-bench measures registrations per second (8 clients over 4
# connections, spread over the replicas) without and with 1,000 watchers
# attached, and the time for one change, made through the first replica,
# to reach every one of the 1,000 watchers (10 connections x 100 streams,
# spread over the replicas), median and p99. The summary gives the median
# of the rounds for each figure, the machine's busy and steal time over the
# whole run, and etcd's resident memory.
#
# Takes about 3 minutes after the build with the defaults; every
# registry-bench is bounded by `timeout`, etcd gets 20 s to become
# healthy, and every process and temporary directory goes with the script
# (also on Ctrl-C). Record the summary in bench/RESULTS.md.
#
#   ROUNDS=3                  rounds (each: embedded, then etcd)
#   SETUPS="embedded etcd"    which setups to run
#   REGISTRY=/path/to/trellis-registry   that binary instead of a release
#                             build of this tree (trellis-registry is then
#                             not built)
#   KEEP=DIR                  copy the etcd and registry-bench logs there
# Flags are passed to registry-bench (default `--runs 3 --changes 34`: about
# 100 timed changes per setup and round; see
# `target/release/registry-bench --help`), e.g.
#   ROUNDS=1 bench/registry_store.sh --runs 1 --changes 10 --watchers 200
#
# The etcd half needs etcd (Debian package etcd-server; .ci/run installs
# it) and a trellis-registry that has --store; without either it is not
# run, the script says why, and exits 1 after the embedded half.
set -euo pipefail
case ${REGISTRY:-/} in /*) ;; *) REGISTRY=$PWD/$REGISTRY ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=${ROUNDS:-3}
SETUPS=${SETUPS:-embedded etcd}
case $ROUNDS in
  [1-9] | [1-9][0-9]) ;;
  *) echo "ROUNDS=$ROUNDS: give a number of rounds from 1 to 99" >&2; exit 2 ;;
esac
for setup in $SETUPS; do
  case $setup in
    embedded | etcd) ;;
    *) echo "SETUPS: unknown setup '$setup' (embedded, etcd)" >&2; exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then set -- --runs 3 --changes 34; fi

if [ -n "${REGISTRY:-}" ]; then
  if [ ! -x "$REGISTRY" ]; then
    echo "REGISTRY=$REGISTRY is not an executable file" >&2
    exit 2
  fi
  cargo build --release -p trellis-bench
  registry=$REGISTRY
else
  cargo build --release -p trellis-registry -p trellis-bench
  registry=$PWD/target/release/trellis-registry
fi
bench=$PWD/target/release/registry-bench

work=$(mktemp -d)
out=$work/bench.out
etcd_pids=()
bench_pid=
cleanup() {
  if [ -n "$bench_pid" ]; then kill -TERM "$bench_pid" 2>/dev/null || true; fi
  for pid in "${etcd_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$out" "$KEEP"/ 2>/dev/null || true
    find "$work" -name '*.log' -exec cp {} "$KEEP"/ \; 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Why the etcd half cannot run, if it cannot.
etcd_missing=
if [[ " $SETUPS " == *" etcd "* ]]; then
  if ! command -v etcd >/dev/null; then
    etcd_missing="etcd not found: install the Debian package etcd-server (.ci/run does)"
  elif ! "$registry" --help 2>/dev/null | grep -q -- '--store'; then
    etcd_missing="$registry has no --store flag: this trellis-registry predates the etcd store (issue #14), so it cannot run on etcd"
  fi
  if [ -n "$etcd_missing" ]; then
    echo "etcd: NOT MEASURED: $etcd_missing" >&2
  fi
fi

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), \
$(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo ' + uncommitted changes outside bench/')"
[ -n "${REGISTRY:-}" ] && echo "registry: $registry"
command -v etcd >/dev/null && echo "etcd: $(etcd --version 2>/dev/null | head -1)"

# The machine's CPU counters: user nice system idle iowait irq softirq steal.
cpu_sample() { awk '/^cpu / {print $2, $3, $4, $5, $6, $7, $8, $9; exit}' /proc/stat; }
cpu_start=$(cpu_sample)

# start_etcd DIR: a fresh 3-member cluster with its data and logs in DIR;
# sets $store (for --store) and $etcd_pids, and waits until every member
# is healthy (20 s at most).
start_etcd() {
  local dir=$1 cluster="" i token=trellis-bench-$$-$RANDOM
  local -a client peer
  mkdir -p "$dir"
  for i in 0 1 2; do
    client[i]=$(port)
    peer[i]=$(port)
    cluster+="${cluster:+,}m$i=http://127.0.0.1:${peer[i]}"
  done
  local -a endpoints=()
  for i in 0 1 2; do
    etcd --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:${client[i]}" \
      --advertise-client-urls "http://127.0.0.1:${client[i]}" \
      --listen-peer-urls "http://127.0.0.1:${peer[i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${peer[i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new \
      --initial-cluster-token "$token" \
      --logger zap --log-level warn >"$dir/etcd-m$i.log" 2>&1 &
    etcd_pids+=($!)
    endpoints+=("127.0.0.1:${client[i]}")
  done
  store=etcd://$(IFS=,; echo "${endpoints[*]}")
  for i in 0 1 2; do
    local healthy=
    for _ in $(seq 1 200); do
      if curl -s --max-time 1 "http://127.0.0.1:${client[i]}/health" | grep -q '"health":"true"'; then
        healthy=1
        break
      fi
      sleep 0.1
    done
    if [ -z "$healthy" ]; then
      echo "etcd member m$i (client port ${client[i]}) not healthy within 20 s; its log ends:" >&2
      tail -n 30 "$dir/etcd-m$i.log" >&2
      exit 1
    fi
  done
}

# stop_etcd: prints the members' resident memory, stops them, removes DIR.
stop_etcd() {
  local dir=$1 rss=() pid
  for pid in "${etcd_pids[@]}"; do
    rss+=("$(awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo '?')")
  done
  echo "etcd RSS after the round: $(IFS=+; echo "${rss[*]}") MiB" | tee -a "$out"
  for pid in "${etcd_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${etcd_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  etcd_pids=()
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$dir"/*.log "$KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$dir"
}

# bench LABEL FLAGS...: one registry-bench run, at most 5 minutes.
bench() {
  local label=$1
  shift
  timeout --signal=TERM --kill-after=20 300 \
    "$bench" --registry-bin "$registry" --label "$label" "$@" >"$work/bench-$label.txt" 2>&1 &
  bench_pid=$!
  local status=0
  wait "$bench_pid" || status=$?
  bench_pid=
  cat "$work/bench-$label.txt"
  cat "$work/bench-$label.txt" >>"$out"
  if [ "$status" -ne 0 ]; then
    echo "registry-bench ($label) failed (exit $status)" >&2
    return "$status"
  fi
}

status=0
for round in $(seq 1 "$ROUNDS"); do
  for setup in $SETUPS; do
    echo
    echo "== round $round/$ROUNDS: $setup =="
    case $setup in
      embedded)
        bench embedded "$@" || status=1
        ;;
      etcd)
        if [ -n "$etcd_missing" ]; then
          echo "not measured: $etcd_missing"
          status=1
          continue
        fi
        start_etcd "$work/etcd-r$round"
        echo "etcd: 3 members, --store $store"
        bench etcd --replicas 2 --store "$store" "$@" || status=1
        stop_etcd "$work/etcd-r$round"
        ;;
    esac
  done
done
cpu_end=$(cpu_sample)

echo
echo "== summary: medians of $ROUNDS round(s) =="
python3 - "$out" "$cpu_start" "$cpu_end" <<'EOF'
import statistics
import sys

rows = {}
etcd_rss = []
for line in open(sys.argv[1]):
    if line.startswith("result: "):
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        rows.setdefault(fields["setup"], []).append(fields)
    elif line.startswith("etcd RSS after the round: "):
        etcd_rss.append(line.split(": ", 1)[1].strip().removesuffix(" MiB"))


def med(values):
    return statistics.median(values)


def by_position(values, sep, form="{:.2f}"):
    parts = [v.split(sep) for v in values]
    out = []
    for i in range(len(parts[0])):
        column = [float(p[i]) for p in parts if p[i] not in ("-", "?")]
        out.append(form.format(med(column)) if column else "-")
    return out


watchers = sorted({int(r["watchers"]) for runs in rows.values() for r in runs})
watchers = "/".join(f"{w:,}" for w in watchers) or "?"
print(f"| setup | registrations/s, no watchers | registrations/s, {watchers} watchers "
      f"| change reaches all {watchers} watchers, median | p99 (the rounds' median) "
      "| per replica (written through / other) | registry RSS (MiB) |")
print("|---|---|---|---|---|---|---|")
for setup, runs in rows.items():
    replicas = runs[0]["replicas"]
    per = by_position([r["by_replica_ms"] for r in runs], "/")
    rss = by_position([r["rss_mib"] for r in runs], "+", "{:.1f}")
    print(
        f"| {setup} ({replicas} replica{'s' if replicas != '1' else ''}) "
        f"| {med([float(r['reg_idle']) for r in runs]):,.0f} "
        f"| {med([float(r['reg_busy']) for r in runs]):,.0f} "
        f"| {med([float(r['fanout_ms']) for r in runs]):.2f} ms "
        f"| {med([float(r['p99_ms']) for r in runs]):.2f} ms "
        f"| {' / '.join(p + ' ms' for p in per) if replicas != '1' else '-'} "
        f"| {' + '.join(rss)} |"
    )
print()
for setup, runs in rows.items():
    print(f"raw {setup}: registrations/s idle "
          + ", ".join(r["reg_idle"] for r in runs)
          + "; with watchers " + ", ".join(r["reg_busy"] for r in runs)
          + "; fan-out median ms " + ", ".join(r["fanout_ms"] for r in runs)
          + "; p99 ms " + ", ".join(r["p99_ms"] for r in runs))
if etcd_rss:
    print("etcd RSS per round (MiB): " + ", ".join(etcd_rss))
a = [int(x) for x in sys.argv[2].split()]
b = [int(x) for x in sys.argv[3].split()]
d = [y - x for x, y in zip(a, b)]
total = sum(d) or 1
print(f"machine over the run: busy {100 * (total - d[3] - d[4]) / total:.1f} %, "
      f"iowait {100 * d[4] / total:.1f} %, steal {100 * d[7] / total:.1f} %")
EOF
if [ -n "$etcd_missing" ]; then
  echo "etcd: NOT MEASURED: $etcd_missing" >&2
fi
exit "$status"
