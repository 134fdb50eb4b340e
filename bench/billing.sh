#!/usr/bin/env bash
# Builds the workspace in release mode and measures sustained
# telco.usage.v1.UsageService/RecordUsage through the edge of the billing
# system, with the bills kept current behind it: billing_bench starts the
# whole billing mesh (registry, user, 2x usage, settlement, archive, each
# with its sidecar, and an h2c edge) on fresh databases of the PostgreSQL
# server on 127.0.0.1:5432 (or DATABASE_URL; see test-support/src/postgres.rs)
# once per round, drives RecordUsage open loop at a fixed rate, then times
# the drain of the outbox and checks every bill against usage's database.
#
# RUNS lists the runs as RATExROUNDS (calls/s x rounds, each round on a
# fresh mesh); each run prints a table with the medians of its rounds, and
# all the tables are printed again at the end. Default: 3 rounds at 1000/s
# (the target) and 1 at 2000/s (the ceiling), 20 s of load each: about 5
# minutes after the build. Every run is bounded by `timeout`, and every
# process of the mesh stops with its round. Record the summary in
# bench/RESULTS.md.
#
# Other flags are passed to billing_bench (see
# `target/release/billing_bench --help`), e.g.
#   RUNS="300x3 500x3" bench/billing.sh --duration 10s --connections 8
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-1000x3 2000x1}
# The mesh logs warnings only while measured (tests log in detail).
export TRELLIS_TEST_LOG=${TRELLIS_TEST_LOG:-warn}
export TRELLIS_TEST_PROXY_LOG=${TRELLIS_TEST_PROXY_LOG:-warn}
for run in $RUNS; do
  case $run in
    [1-9]*x[1-9]*) ;;
    *) echo "RUNS: $run is not RATExROUNDS, e.g. 1000x3" >&2; exit 2 ;;
  esac
done

# Every service must be a release build: billing_bench starts the binaries
# found next to itself.
cargo build --release --workspace
bin=target/release/billing_bench

out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), \
$(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo ' + uncommitted changes outside bench/')"

# run RATE ROUNDS [FLAGS...]: one billing_bench invocation, at most 25
# minutes (rounds are themselves bounded: setup, --duration <= 120 s,
# --drain-limit <= 300 s).
run() {
  local rate=$1 rounds=$2
  shift 2
  echo
  echo "== $rounds round(s) at $rate/s =="
  timeout --signal=TERM --kill-after=30 1500 \
    "$bin" --rounds "$rounds" --rate "$rate" --clk-tck "$(getconf CLK_TCK)" "$@" |
    tee -a "$out"
}

status=0
for spec in $RUNS; do
  run "${spec%x*}" "${spec#*x}" "$@" || status=$?
done

echo
echo "== summaries =="
# Each invocation's summary: from its "summary:" line to its end.
awk '/^round [0-9]+\// {on = 0} /^summary:/ {on = 1} on' "$out"
exit "$status"
