#!/usr/bin/env bash
# Builds the registry and its benchmark in release mode and runs it:
# registrations per second and the time for one change to reach 1,000
# watchers, against the real registry process over mTLS on 127.0.0.1.
# Record the summary in bench/RESULTS.md. bench/registry_store.sh runs the
# same measures on the embedded store and on etcd side by side.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p trellis-registry -p trellis-bench
exec target/release/registry-bench "$@"
