#!/usr/bin/env bash
# Load benchmarks of the sidecar (scripts/bench_load.py; with `reload`, scripts/bench_reload.py).
# Needs wrk (apt) and the test venv.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r tests/e2e/requirements.txt; }
./scripts/build-policies.sh
cargo build --release --locked -p sandgate --examples
# `scripts/bench-load.sh reload`: latency during continuous policy reloads instead.
if [ "${1:-}" = reload ]; then exec .venv/bin/python scripts/bench_reload.py; fi
exec .venv/bin/python scripts/bench_load.py
